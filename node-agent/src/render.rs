//! What the agent writes, as pure functions of the mirror config and the registry's CA: the
//! containerd `certs.d` files, and the k3s `registries.yaml` merged with what is already there.

use std::path::PathBuf;
use std::time::Duration;

use outpost_core::{Host, MirrorConfig, MirrorRule};
use serde_norway::{Mapping, Value};

/// First line of every file the agent owns; a file without it is never touched.
pub const MANAGED_HEADER: &str = "# managed by outpost-node-agent";

/// Where containerd's hosts directory is, relative to the root.
pub const CERTS_D: &str = "etc/containerd/certs.d";
/// k3s's registries file, relative to the root.
pub const REGISTRIES_YAML: &str = "etc/rancher/k3s/registries.yaml";
/// Where the agent keeps the registry's CA for k3s, relative to the root.
pub const K3S_CA_DIR: &str = "etc/rancher/k3s/outpost";

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
/// directory it sits in (containerd resolves a relative `ca` against that directory).
fn registry_host_table(registry: &Host, ca: &str, opts: &RenderOptions, dial: bool) -> String {
    let url = format!("https://{registry}");
    let mut t = format!(
        "[host.{}]\n  capabilities = [\"pull\", \"resolve\"]\n  ca = {}\n",
        q(&url),
        q(ca)
    );
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

/// Every file of the containerd configuration: the registry's CA and hosts.toml, and one
/// hosts.toml per upstream with the registry as its mirror and the upstream as fallback.
pub fn containerd_files(
    cfg: &MirrorConfig,
    ca_pem: &str,
    opts: &RenderOptions,
) -> Vec<DesiredFile> {
    let r = &cfg.registry;
    let base = PathBuf::from(CERTS_D);
    let mut files = vec![
        DesiredFile {
            path: base.join(r.as_str()).join("ca.crt"),
            content: format!("{MANAGED_HEADER}\n{}\n", ca_pem.trim_end()),
            private: false,
        },
        DesiredFile {
            path: base.join(r.as_str()).join("hosts.toml"),
            content: format!(
                "{MANAGED_HEADER}\nserver = {}\n\n{}",
                q(&format!("https://{r}")),
                registry_host_table(r, "ca.crt", opts, false)
            ),
            private: opts.authorization.is_some(),
        },
    ];
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
            path: base.join(u.as_str()).join("hosts.toml"),
            content: format!(
                "{MANAGED_HEADER}\n{server}\n{}",
                registry_host_table(r, &format!("../{r}/ca.crt"), opts, true)
            ),
            private: opts.authorization.is_some(),
        });
    }
    files
}

/// The CA file k3s's `configs.<registry>.tls.ca_file` names, relative to the root.
pub fn k3s_ca_path(cfg: &MirrorConfig) -> PathBuf {
    PathBuf::from(K3S_CA_DIR)
        .join(cfg.registry.as_str())
        .join("ca.crt")
}

/// The CA file for k3s.
pub fn k3s_ca_file(cfg: &MirrorConfig, ca_pem: &str) -> DesiredFile {
    DesiredFile {
        path: k3s_ca_path(cfg),
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

/// Merges the mirrors and the registry's TLS config into `existing` (registries.yaml as it is
/// now), removing keys the agent owned before and no longer wants, and never changing an
/// entry it does not own.
pub fn merge_registries_yaml(
    existing: Option<&str>,
    previously_owned: &OwnedYamlKeys,
    cfg: &MirrorConfig,
    ca_path_on_host: &str,
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

    let mirrors = section(&mut doc, "mirrors")?;
    for rule in first_rules(cfg) {
        let key = rule.upstream.as_str().to_owned();
        if mirrors.contains_key(Value::String(key.clone())) {
            refused.push(format!("mirrors.{key}"));
            continue;
        }
        let mut m = Mapping::new();
        m.insert(
            Value::String("endpoint".into()),
            Value::Sequence(vec![
                Value::String(format!("https://{registry}")),
                Value::String(format!(
                    "{}://{}",
                    scheme(rule.plain_http),
                    rule.upstream.endpoint()
                )),
            ]),
        );
        mirrors.insert(Value::String(key.clone()), Value::Mapping(m));
        owned.mirrors.push(key);
    }

    let configs = section(&mut doc, "configs")?;
    if configs.contains_key(Value::String(registry.to_owned())) {
        refused.push(format!("configs.{registry}"));
    } else {
        let mut tls = Mapping::new();
        tls.insert(
            Value::String("ca_file".into()),
            Value::String(ca_path_on_host.to_owned()),
        );
        let mut c = Mapping::new();
        c.insert(Value::String("tls".into()), Value::Mapping(tls));
        if let Some((user, pass)) = &opts.basic {
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
        configs.insert(Value::String(registry.to_owned()), Value::Mapping(c));
        owned.configs.push(registry.to_owned());
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
            let files = containerd_files(&c, "PEM", &opts);
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
        let files = containerd_files(&c, "PEM", &RenderOptions::default());
        assert_eq!(files.len(), 3);
        assert!(files[2].content.contains("server = \"https://u\""));
    }
}
