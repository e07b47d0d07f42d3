//! What the agent writes, as pure functions of the mirror config and the registry's CA: the
//! containerd `certs.d` files, and the k3s `registries.yaml` merged with what is already there.

use std::path::{Path, PathBuf};
use std::time::Duration;

use outpost_core::{MirrorConfig, MirrorRule};
use serde_norway::{Mapping, Value};

/// First line of every file the agent owns; a file without it is never touched.
pub const MANAGED_HEADER: &str = "# managed by outpost-node-agent";

/// containerd's default hosts directory, relative to the root.
pub const CERTS_D: &str = "etc/containerd/certs.d";
/// k3s's registries file, relative to the root.
pub const REGISTRIES_YAML: &str = "etc/rancher/k3s/registries.yaml";
/// RKE2's registries file (same format as k3s's), relative to the root.
pub const RKE2_REGISTRIES_YAML: &str = "etc/rancher/rke2/registries.yaml";

/// Where on the node the agent writes, relative to the root: distributions keep containerd's
/// hosts directory and the registries file in different places.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// containerd's hosts directory (its CRI `config_path`).
    pub hosts_dir: PathBuf,
    /// The registries.yaml k3s or RKE2 reads at start.
    pub registries_yaml: PathBuf,
}

impl Default for Layout {
    fn default() -> Self {
        Layout {
            hosts_dir: PathBuf::from(CERTS_D),
            registries_yaml: PathBuf::from(REGISTRIES_YAML),
        }
    }
}

impl Layout {
    /// Where the agent keeps the registry's CA for registries.yaml: `outpost/` beside it.
    pub fn ca_dir(&self) -> PathBuf {
        self.registries_yaml
            .parent()
            .unwrap_or(Path::new(""))
            .join("outpost")
    }

    /// The CA file registries.yaml's `configs.<registry>.tls.ca_file` names.
    pub fn k3s_ca_path(&self, cfg: &MirrorConfig) -> PathBuf {
        self.ca_dir().join(cfg.registry.as_str()).join("ca.crt")
    }
}

/// A node path (`/etc/containerd/certs.d`) as a path relative to the root.
pub fn relative_to_root(p: &Path) -> PathBuf {
    p.components()
        .filter(|c| matches!(c, std::path::Component::Normal(_)))
        .collect()
}

#[derive(Debug, Clone, Default)]
pub struct RenderOptions {
    /// `dial_timeout` for the mirror, so a node falls back quickly when Outpost is down
    /// (containerd 2.1+; 1.6 and 1.7 ignore the key and fall back on a refused connection or
    /// after their own connect timeout).
    pub dial_timeout: Option<Duration>,
    /// `Authorization` header value for pulls from the registry (node credentials).
    pub authorization: Option<String>,
    /// Username and password for k3s's `configs.<registry>.auth`.
    pub basic: Option<(String, String)>,
}

/// A file the agent wants, with its whole content (the header included).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredFile {
    /// Relative to the root.
    pub path: PathBuf,
    pub content: String,
    /// Holds credentials: written 0600.
    pub private: bool,
}

/// A TOML basic string, quoted and escaped.
fn q(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

fn scheme(plain: bool) -> &'static str {
    if plain { "http" } else { "https" }
}

/// The `[host."https://R"]` table pointing at the registry, with its CA relative to the hosts
/// directory it sits in (containerd resolves a relative `ca` against that directory); plain
/// HTTP registries get `[host."http://R"]` and no CA.
fn registry_host_table(
    cfg: &MirrorConfig,
    ca: Option<&str>,
    opts: &RenderOptions,
    dial: bool,
) -> String {
    let url = registry_url(cfg);
    let mut t = format!(
        "[host.{}]\n  capabilities = [\"pull\", \"resolve\"]\n",
        q(&url)
    );
    if let Some(ca) = ca.filter(|_| !cfg.registry_plain_http) {
        t.push_str(&format!("  ca = {}\n", q(ca)));
    }
    if dial && let Some(d) = opts.dial_timeout {
        // A Go duration string: whole seconds, or milliseconds for anything finer.
        let text = if d.subsec_millis() == 0 {
            format!("{}s", d.as_secs())
        } else {
            format!("{}ms", d.as_millis())
        };
        t.push_str(&format!("  dial_timeout = {}\n", q(&text)));
    }
    if let Some(a) = &opts.authorization {
        t.push_str(&format!(
            "\n  [host.{}.header]\n    Authorization = {}\n",
            q(&url),
            q(a)
        ));
    }
    t
}

/// `https://R`, or `http://R` for a plain-HTTP registry.
pub fn registry_url(cfg: &MirrorConfig) -> String {
    format!("{}://{}", scheme(cfg.registry_plain_http), cfg.registry)
}

/// The first rule of each upstream decides its server settings (CA, plain HTTP).
fn first_rules(cfg: &MirrorConfig) -> Vec<&MirrorRule> {
    let mut out: Vec<&MirrorRule> = Vec::new();
    for r in &cfg.rules {
        if !out.iter().any(|o| o.upstream == r.upstream) {
            out.push(r);
        }
    }
    out
}

/// Every file of the containerd configuration under `hosts_dir`: the registry's CA (not for a
/// plain-HTTP registry) and hosts.toml, and one hosts.toml per upstream with the registry as
/// its mirror and the upstream as fallback.
pub fn containerd_files(
    cfg: &MirrorConfig,
    ca_pem: Option<&str>,
    opts: &RenderOptions,
    hosts_dir: &Path,
) -> Vec<DesiredFile> {
    let r = &cfg.registry;
    let mut files = Vec::new();
    let ca_pem = ca_pem.filter(|_| !cfg.registry_plain_http);
    if let Some(pem) = ca_pem {
        files.push(DesiredFile {
            path: hosts_dir.join(r.as_str()).join("ca.crt"),
            content: format!("{MANAGED_HEADER}\n{}\n", pem.trim_end()),
            private: false,
        });
    }
    files.push(DesiredFile {
        path: hosts_dir.join(r.as_str()).join("hosts.toml"),
        content: format!(
            "{MANAGED_HEADER}\nserver = {}\n\n{}",
            q(&registry_url(cfg)),
            registry_host_table(cfg, ca_pem.map(|_| "ca.crt"), opts, false)
        ),
        private: opts.authorization.is_some(),
    });
    let upstream_ca = format!("../{r}/ca.crt");
    for rule in first_rules(cfg) {
        let u = &rule.upstream;
        let mut server = format!(
            "server = {}\n",
            q(&format!("{}://{}", scheme(rule.plain_http), u.endpoint()))
        );
        if let Some(ca) = &rule.ca_file {
            server.push_str(&format!("ca = {}\n", q(ca)));
        }
        files.push(DesiredFile {
            path: hosts_dir.join(u.as_str()).join("hosts.toml"),
            content: format!(
                "{MANAGED_HEADER}\n{server}\n{}",
                registry_host_table(cfg, ca_pem.map(|_| upstream_ca.as_str()), opts, true)
            ),
            private: opts.authorization.is_some(),
        });
    }
    files
}

/// The CA file for registries.yaml.
pub fn k3s_ca_file(layout: &Layout, cfg: &MirrorConfig, ca_pem: &str) -> DesiredFile {
    DesiredFile {
        path: layout.k3s_ca_path(cfg),
        content: format!("{MANAGED_HEADER}\n{}\n", ca_pem.trim_end()),
        private: false,
    }
}

/// Keys the agent put into registries.yaml, so later runs and cleanup touch only those.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OwnedYamlKeys {
    pub mirrors: Vec<String>,
    pub configs: Vec<String>,
}

/// What a merge of registries.yaml produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct YamlMerge {
    pub content: String,
    pub owned: OwnedYamlKeys,
    /// Entries someone else wrote for a key the agent wanted; left as they are.
    pub refused: Vec<String>,
    /// The registry's own entries (its CA, or its plain-HTTP endpoint) are the agent's.
    pub registry_ok: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("registries.yaml is not a YAML mapping: {0}")]
    Yaml(String),
}

/// The mapping under `key`, created when absent; an error when someone made it something else.
fn section<'a>(map: &'a mut Mapping, key: &str) -> Result<&'a mut Mapping, RenderError> {
    map.entry(Value::String(key.to_owned()))
        .or_insert_with(|| Value::Mapping(Mapping::new()))
        .as_mapping_mut()
        .ok_or_else(|| RenderError::Yaml(format!("{key} is not a mapping")))
}

/// A `configs.<host>` entry: TLS CA and/or basic auth.
fn config_entry(ca_file: Option<&str>, basic: Option<&(String, String)>) -> Mapping {
    let mut c = Mapping::new();
    if let Some(ca) = ca_file {
        let mut tls = Mapping::new();
        tls.insert(
            Value::String("ca_file".into()),
            Value::String(ca.to_owned()),
        );
        c.insert(Value::String("tls".into()), Value::Mapping(tls));
    }
    if let Some((user, pass)) = basic {
        let mut auth = Mapping::new();
        auth.insert(
            Value::String("username".into()),
            Value::String(user.clone()),
        );
        auth.insert(
            Value::String("password".into()),
            Value::String(pass.clone()),
        );
        c.insert(Value::String("auth".into()), Value::Mapping(auth));
    }
    c
}

/// Merges the mirrors and the registry's TLS config into `existing` (registries.yaml as it is
/// now), removing keys the agent owned before and no longer wants, and never changing an
/// entry it does not own. `ca_path_on_host` is the registry's CA as the node sees it (`None`
/// for a plain-HTTP registry, which gets a mirror entry of its own with its `http://`
/// endpoint instead, since k3s would otherwise reach it over HTTPS). An upstream's `ca_file`
/// becomes `configs.<upstream>.tls.ca_file`.
pub fn merge_registries_yaml(
    existing: Option<&str>,
    previously_owned: &OwnedYamlKeys,
    cfg: &MirrorConfig,
    ca_path_on_host: Option<&str>,
    opts: &RenderOptions,
) -> Result<YamlMerge, RenderError> {
    let mut doc: Mapping = match existing.map(str::trim) {
        None | Some("") => Mapping::new(),
        Some(text) => match serde_norway::from_str::<Value>(text) {
            Ok(Value::Mapping(m)) => m,
            Ok(Value::Null) => Mapping::new(),
            Ok(_) => return Err(RenderError::Yaml("top level is not a mapping".into())),
            Err(e) => return Err(RenderError::Yaml(e.to_string())),
        },
    };
    let mut owned = OwnedYamlKeys::default();
    let mut refused = Vec::new();
    let registry = cfg.registry.as_str();
    let plain = cfg.registry_plain_http;
    let registry_url = registry_url(cfg);
    let mut registry_ok = true;

    // Drop what the agent owned; what it still wants is written again below.
    for (section, keys) in [
        ("mirrors", &previously_owned.mirrors),
        ("configs", &previously_owned.configs),
    ] {
        if let Some(Value::Mapping(m)) = doc.get_mut(Value::String(section.into())) {
            for k in keys {
                m.remove(Value::String(k.clone()));
            }
        }
    }

    let endpoints = |list: Vec<String>| {
        let mut m = Mapping::new();
        m.insert(
            Value::String("endpoint".into()),
            Value::Sequence(list.into_iter().map(Value::String).collect()),
        );
        Value::Mapping(m)
    };
    let mirrors = section(&mut doc, "mirrors")?;
    if plain {
        if mirrors.contains_key(Value::String(registry.to_owned())) {
            refused.push(format!("mirrors.{registry}"));
            registry_ok = false;
        } else {
            mirrors.insert(
                Value::String(registry.to_owned()),
                endpoints(vec![registry_url.clone()]),
            );
            owned.mirrors.push(registry.to_owned());
        }
    }
    for rule in first_rules(cfg) {
        let key = rule.upstream.as_str().to_owned();
        if mirrors.contains_key(Value::String(key.clone())) {
            refused.push(format!("mirrors.{key}"));
            continue;
        }
        mirrors.insert(
            Value::String(key.clone()),
            endpoints(vec![
                registry_url.clone(),
                format!("{}://{}", scheme(rule.plain_http), rule.upstream.endpoint()),
            ]),
        );
        owned.mirrors.push(key);
    }

    let configs = section(&mut doc, "configs")?;
    let mut wanted: Vec<(String, Mapping, bool)> = Vec::new();
    let registry_entry = config_entry(ca_path_on_host.filter(|_| !plain), opts.basic.as_ref());
    if !registry_entry.is_empty() {
        wanted.push((registry.to_owned(), registry_entry, !plain));
    }
    for rule in first_rules(cfg) {
        if let Some(ca) = &rule.ca_file {
            let key = rule.upstream.endpoint().to_owned();
            if key != registry && !wanted.iter().any(|(k, _, _)| *k == key) {
                wanted.push((key, config_entry(Some(ca), None), false));
            }
        }
    }
    for (key, entry, needed_for_trust) in wanted {
        if configs.contains_key(Value::String(key.clone())) {
            refused.push(format!("configs.{key}"));
            registry_ok &= !needed_for_trust;
            continue;
        }
        configs.insert(Value::String(key.clone()), Value::Mapping(entry));
        owned.configs.push(key);
    }
    // Empty sections the agent created are not left behind.
    for section in ["mirrors", "configs"] {
        if matches!(doc.get(Value::String(section.into())), Some(Value::Mapping(m)) if m.is_empty())
        {
            doc.remove(Value::String(section.into()));
        }
    }
    let body = serde_norway::to_string(&Value::Mapping(doc))
        .map_err(|e| RenderError::Yaml(e.to_string()))?;
    Ok(YamlMerge {
        content: format!("{MANAGED_HEADER}\n{body}"),
        owned,
        refused,
        registry_ok,
    })
}

/// registries.yaml without the agent's keys: what cleanup leaves. `None` when nothing else
/// remains.
pub fn strip_registries_yaml(
    existing: &str,
    owned: &OwnedYamlKeys,
) -> Result<Option<Mapping>, RenderError> {
    let mut doc = match serde_norway::from_str::<Value>(existing) {
        Ok(Value::Mapping(m)) => m,
        Ok(Value::Null) => Mapping::new(),
        Ok(_) => return Err(RenderError::Yaml("top level is not a mapping".into())),
        Err(e) => return Err(RenderError::Yaml(e.to_string())),
    };
    for (section, keys) in [("mirrors", &owned.mirrors), ("configs", &owned.configs)] {
        let k = Value::String(section.into());
        if let Some(Value::Mapping(m)) = doc.get_mut(&k) {
            for key in keys {
                m.remove(Value::String(key.clone()));
            }
            if m.is_empty() {
                doc.remove(&k);
            }
        }
    }
    Ok((!doc.is_empty()).then_some(doc))
}

/// Parses YAML text into a mapping for comparisons (`None` for empty).
pub fn yaml_mapping(text: &str) -> Option<Mapping> {
    match serde_norway::from_str::<Value>(text) {
        Ok(Value::Mapping(m)) if !m.is_empty() => Some(m),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(text: &str) -> MirrorConfig {
        text.parse().unwrap()
    }

    #[test]
    fn quoting_survives_odd_values() {
        for v in ["a\"b", "back\\slash", "it's", "https://r:5000"] {
            let t: toml::Table = toml::from_str(&format!("k = {}", q(v))).unwrap();
            assert_eq!(t["k"].as_str(), Some(v));
        }
        assert_eq!(q("https://r"), "\"https://r\"");
    }

    #[test]
    fn dial_timeouts_are_go_durations() {
        let c = cfg("registry = \"r\"\n[[rule]]\nupstream = \"u\"\n");
        for (d, want) in [
            (Duration::from_millis(500), "\"500ms\""),
            (Duration::from_secs(3), "\"3s\""),
        ] {
            let opts = RenderOptions {
                dial_timeout: Some(d),
                ..Default::default()
            };
            let files = containerd_files(&c, Some("PEM"), &opts, Path::new(CERTS_D));
            assert!(
                files[2].content.contains(&format!("dial_timeout = {want}")),
                "{}",
                files[2].content
            );
            // The registry's own hosts.toml has no fallback, so no dial timeout.
            assert!(!files[1].content.contains("dial_timeout"));
        }
    }

    #[test]
    fn first_rule_of_an_upstream_wins() {
        let c = cfg(
            "registry = \"r\"\n[[rule]]\nupstream = \"u\"\nrepositories = [\"a\"]\n[[rule]]\nupstream = \"u\"\nplain_http = true\n",
        );
        let files = containerd_files(
            &c,
            Some("PEM"),
            &RenderOptions::default(),
            Path::new(CERTS_D),
        );
        assert_eq!(files.len(), 3);
        assert!(files[2].content.contains("server = \"https://u\""));
    }
}
