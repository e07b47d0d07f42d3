//! The mirror configuration the webhook and the node agent both read (spec sections 8 and 9):
//! which registry host the nodes pull from, and which upstream registries it mirrors.
//!
//! ```toml
//! registry = "192.100.100.1"            # host[:port] the nodes pull from
//! registry_plain_http = false           # the registry serves plain HTTP (labs; no CA)
//! pull_secret = "outpost-pull"          # webhook: injected into imagePullSecrets
//! skip_node_selector = false            # webhook: true = no outpost.io/trusted affinity
//! check_availability = true             # webhook: HEAD the image on the registry first
//! [[rule]]
//! upstream = "myacr.azurecr.io"         # docker.io, ghcr.io, host:port ... allowed
//! repositories = ["hello-world", "team-a/**"]   # optional; default all
//! ca_file = "/etc/outpost/upstream-ca.crt"      # node agent: CA of the upstream (optional)
//! plain_http = false                    # node agent: the upstream speaks plain HTTP (labs)
//! ```
//!
//! Parsing is strict: unknown keys are refused, so a typo fails loudly instead of silently
//! mirroring nothing.

use std::fmt;
use std::str::FromStr;

use serde::Deserialize;

use crate::pattern::RepositoryPattern;

/// Docker Hub's name in image references.
pub const DOCKER_HUB: &str = "docker.io";
/// The host that actually serves Docker Hub's registry API.
pub const DOCKER_HUB_ENDPOINT: &str = "registry-1.docker.io";
/// Other spellings of Docker Hub that image references use.
pub const DOCKER_HUB_ALIASES: &[&str] = &["index.docker.io", "registry-1.docker.io"];

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("config is not valid TOML for Outpost: {0}")]
    Toml(String),
    #[error(
        "{field}: {value:?} is not a registry host[:port] (lower-case host name, IPv4, or [IPv6], optional port 1-65535)"
    )]
    BadHost { field: String, value: String },
    #[error("rule {index} ({upstream}): {message}")]
    BadRule {
        index: usize,
        upstream: String,
        message: String,
    },
    #[error("pull_secret {0:?} is not a valid Kubernetes secret name")]
    BadSecretName(String),
}

/// A registry host with an optional port, as image references write it: `myacr.azurecr.io`,
/// `registry.local:5000`, `10.0.0.5`, `[fd00::1]:5000`. Always lower case.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Host(String);

impl Host {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// True for Docker Hub in any of its spellings.
    pub fn is_docker_hub(&self) -> bool {
        self.0 == DOCKER_HUB || DOCKER_HUB_ALIASES.contains(&self.0.as_str())
    }

    /// The host that serves the registry API for this name (Docker Hub's is not `docker.io`).
    pub fn endpoint(&self) -> &str {
        if self.is_docker_hub() {
            DOCKER_HUB_ENDPOINT
        } else {
            &self.0
        }
    }

    /// The name image references use for this registry (`docker.io` for every Hub alias).
    pub fn canonical(&self) -> Host {
        if self.is_docker_hub() {
            Host(DOCKER_HUB.to_owned())
        } else {
            self.clone()
        }
    }
}

/// Why a host string is not a registry host, without saying which field held it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a registry host[:port]")]
pub struct HostError(pub String);

impl FromStr for Host {
    type Err = HostError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || HostError(s.to_owned());
        let (name, port) = if let Some(rest) = s.strip_prefix('[') {
            // [IPv6] with an optional :port.
            let (addr, after) = rest.split_once(']').ok_or_else(bad)?;
            addr.parse::<std::net::Ipv6Addr>().map_err(|_| bad())?;
            if addr.bytes().any(|b| b.is_ascii_uppercase()) {
                return Err(bad());
            }
            match after {
                "" => (None, None),
                p => (None, Some(p.strip_prefix(':').ok_or_else(bad)?)),
            }
        } else {
            match s.rsplit_once(':') {
                Some((n, p)) => (Some(n), Some(p)),
                None => (Some(s), None),
            }
        };
        if let Some(name) = name
            && !valid_hostname(name)
        {
            return Err(bad());
        }
        if let Some(p) = port {
            let ok = !p.is_empty()
                && p.bytes().all(|b| b.is_ascii_digit())
                && !p.starts_with('0')
                && p.parse::<u16>().is_ok_and(|n| n > 0);
            if !ok {
                return Err(bad());
            }
        }
        Ok(Host(s.to_owned()))
    }
}

/// DNS name or IPv4 address, lower case: labels of `[a-z0-9-]`, not starting or ending in `-`.
fn valid_hostname(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

impl fmt::Display for Host {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One upstream registry mirrored through Outpost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorRule {
    /// The upstream as image references name it, canonical (`docker.io` for every Hub alias).
    pub upstream: Host,
    /// Repositories this rule covers; empty means all.
    pub repositories: Vec<RepositoryPattern>,
    /// The upstream's CA certificate file, for nodes falling back to it (node agent).
    pub ca_file: Option<String>,
    /// The upstream serves plain HTTP (labs only; node agent).
    pub plain_http: bool,
}

impl MirrorRule {
    /// True if this rule covers `repository` (a path at the upstream, e.g. `library/nginx`).
    pub fn covers(&self, repository: &str) -> bool {
        self.repositories.is_empty() || self.repositories.iter().any(|p| p.matches(repository))
    }
}

/// The whole mirror configuration, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MirrorConfig {
    /// The Outpost registry the nodes pull from.
    pub registry: Host,
    /// The registry serves plain HTTP (labs): nodes reach it without TLS and need no CA.
    pub registry_plain_http: bool,
    /// Secret injected into `imagePullSecrets` (webhook); `None` when the file names none.
    pub pull_secret: Option<String>,
    pub skip_node_selector: bool,
    pub check_availability: bool,
    /// In file order: the first rule that matches an image wins.
    pub rules: Vec<MirrorRule>,
}

impl MirrorConfig {
    /// The first rule whose upstream is `host` and which covers `repository`.
    pub fn rule_for(&self, host: &Host, repository: &str) -> Option<&MirrorRule> {
        let host = host.canonical();
        self.rules
            .iter()
            .find(|r| r.upstream == host && r.covers(repository))
    }

    /// Distinct upstream hosts, in first-seen order.
    pub fn upstreams(&self) -> Vec<&Host> {
        let mut out: Vec<&Host> = Vec::new();
        for r in &self.rules {
            if !out.contains(&&r.upstream) {
                out.push(&r.upstream);
            }
        }
        out
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    registry: String,
    #[serde(default)]
    registry_plain_http: bool,
    #[serde(default)]
    pull_secret: Option<String>,
    #[serde(default)]
    skip_node_selector: bool,
    #[serde(default = "default_true")]
    check_availability: bool,
    #[serde(default, rename = "rule")]
    rules: Vec<RawRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    upstream: String,
    #[serde(default)]
    repositories: Vec<String>,
    #[serde(default)]
    ca_file: Option<String>,
    #[serde(default)]
    plain_http: bool,
}

fn default_true() -> bool {
    true
}

/// A DNS-1123 subdomain, what Kubernetes accepts as a Secret name.
fn valid_secret_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        })
}

impl FromStr for MirrorConfig {
    type Err = ConfigError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| ConfigError::Toml(e.to_string()))?;
        let registry: Host = raw.registry.parse().map_err(|_| ConfigError::BadHost {
            field: "registry".into(),
            value: raw.registry.clone(),
        })?;
        if let Some(s) = &raw.pull_secret
            && !valid_secret_name(s)
        {
            return Err(ConfigError::BadSecretName(s.clone()));
        }
        let mut rules = Vec::with_capacity(raw.rules.len());
        for (i, r) in raw.rules.into_iter().enumerate() {
            let index = i + 1;
            let upstream: Host = r.upstream.parse().map_err(|_| ConfigError::BadHost {
                field: format!("rule {index} upstream"),
                value: r.upstream.clone(),
            })?;
            let rule_err = |message: String| ConfigError::BadRule {
                index,
                upstream: r.upstream.clone(),
                message,
            };
            if upstream.canonical() == registry.canonical() {
                return Err(rule_err(
                    "the upstream is the Outpost registry itself".into(),
                ));
            }
            let repositories = r
                .repositories
                .iter()
                .map(|p| p.parse::<RepositoryPattern>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| rule_err(e.to_string()))?;
            if r.ca_file.as_deref().is_some_and(str::is_empty) {
                return Err(rule_err("ca_file is empty".into()));
            }
            if r.plain_http && r.ca_file.is_some() {
                return Err(rule_err("plain_http and ca_file exclude each other".into()));
            }
            rules.push(MirrorRule {
                upstream: upstream.canonical(),
                repositories,
                ca_file: r.ca_file,
                plain_http: r.plain_http,
            });
        }
        Ok(MirrorConfig {
            registry,
            registry_plain_http: raw.registry_plain_http,
            pull_secret: raw.pull_secret,
            skip_node_selector: raw.skip_node_selector,
            check_availability: raw.check_availability,
            rules,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_spec_example() {
        let c: MirrorConfig = r#"
registry = "192.100.100.1"
pull_secret = "outpost-pull"
skip_node_selector = false
check_availability = true
[[rule]]
upstream = "myacr.azurecr.io"
repositories = ["hello-world", "team-a/**"]
[[rule]]
upstream = "index.docker.io"
"#
        .parse()
        .unwrap();
        assert_eq!(c.registry.as_str(), "192.100.100.1");
        assert_eq!(c.pull_secret.as_deref(), Some("outpost-pull"));
        assert!(c.check_availability);
        assert_eq!(c.rules.len(), 2);
        assert_eq!(c.rules[1].upstream.as_str(), "docker.io");
        assert_eq!(c.rules[1].upstream.endpoint(), "registry-1.docker.io");
        let acr: Host = "myacr.azurecr.io".parse().unwrap();
        assert!(c.rule_for(&acr, "hello-world").is_some());
        assert!(c.rule_for(&acr, "team-a/x/y").is_some());
        assert!(c.rule_for(&acr, "team-b/x").is_none());
        let hub: Host = "registry-1.docker.io".parse().unwrap();
        assert!(c.rule_for(&hub, "library/nginx").is_some());
        assert_eq!(c.upstreams().len(), 2);
    }

    #[test]
    fn defaults_and_strictness() {
        let c: MirrorConfig = "registry = \"outpost.local:5000\"".parse().unwrap();
        assert!(c.check_availability);
        assert!(!c.skip_node_selector);
        assert!(c.pull_secret.is_none());
        assert!(c.rules.is_empty());
        assert!(!c.registry_plain_http);
        let lab: MirrorConfig = "registry = \"10.0.0.5\"\nregistry_plain_http = true"
            .parse()
            .unwrap();
        assert!(lab.registry_plain_http);
        let typo = "registry = \"r\"\ncheck_availabilty = true";
        assert!(matches!(
            typo.parse::<MirrorConfig>(),
            Err(ConfigError::Toml(_))
        ));
        let rule_typo = "registry = \"r\"\n[[rule]]\nupstream = \"u\"\nrepos = []";
        assert!(rule_typo.parse::<MirrorConfig>().is_err());
    }

    #[test]
    fn rejects_bad_values() {
        for text in [
            "registry = \"Outpost.local\"",
            "registry = \"r:0\"",
            "registry = \"r:65536\"",
            "registry = \"https://r\"",
            "registry = \"r/path\"",
            "registry = \"\"",
            "registry = \"r\"\npull_secret = \"Bad_Name\"",
            "registry = \"r\"\n[[rule]]\nupstream = \"r\"",
            "registry = \"r\"\n[[rule]]\nupstream = \"u\"\nrepositories = [\"a/**b\"]",
            "registry = \"r\"\n[[rule]]\nupstream = \"u\"\nca_file = \"/x\"\nplain_http = true",
        ] {
            assert!(text.parse::<MirrorConfig>().is_err(), "{text}");
        }
    }

    #[test]
    fn hosts() {
        for ok in [
            "a",
            "my-acr.azurecr.io",
            "10.0.0.5:5000",
            "[fd00::1]",
            "[fd00::1]:443",
            "localhost:1",
        ] {
            assert!(ok.parse::<Host>().is_ok(), "{ok}");
        }
        for bad in [
            "",
            "A.b",
            "a:",
            "a:01",
            "-a",
            "a-.b",
            "a..b",
            "[fd00::1",
            "[FD00::1]",
            "a b",
            "a_b",
        ] {
            assert!(bad.parse::<Host>().is_err(), "{bad}");
        }
        assert!("index.docker.io".parse::<Host>().unwrap().is_docker_hub());
    }
}
