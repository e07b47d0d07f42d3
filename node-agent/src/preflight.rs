//! Checks of the node's containerd config that decide whether the files the agent writes take
//! effect: the CRI registry's `config_path` must name the hosts directory, legacy
//! `registry.mirrors` beside it make containerd refuse to start the CRI plugin, and
//! `discard_unpacked_layers` throws away layers the node may need to serve again.

use std::path::Path;

/// One finding, with a stable name for the metric and the event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    pub check: &'static str,
    pub message: String,
}

/// Every check the agent reports on, for metrics that show 0 as well as 1.
pub const CHECKS: [&str; 5] = [
    "config_unreadable",
    "config_path_unset",
    "config_path_elsewhere",
    "legacy_mirrors",
    "discard_unpacked_layers",
];

fn get<'a>(v: &'a toml::Value, path: &[&str]) -> Option<&'a toml::Value> {
    path.iter().try_fold(v, |cur, k| cur.get(*k))
}

/// Checks containerd's config text. `hosts_dir` is where the agent writes, as containerd sees
/// it (its `config_path` must include it).
pub fn check_containerd(text: &str, hosts_dir: &Path) -> Vec<Warning> {
    let v: toml::Value = match toml::from_str(text) {
        Ok(v) => v,
        Err(e) => {
            return vec![Warning {
                check: "config_unreadable",
                message: format!("containerd's config is not valid TOML: {e}"),
            }];
        }
    };
    let version = v.get("version").and_then(|x| x.as_integer()).unwrap_or(1);
    // Where the image/registry settings live in each config version.
    let (registry, discard): (Vec<&str>, Vec<&str>) = match version {
        3 => (
            vec!["plugins", "io.containerd.cri.v1.images", "registry"],
            vec![
                "plugins",
                "io.containerd.cri.v1.images",
                "discard_unpacked_layers",
            ],
        ),
        2 => (
            vec!["plugins", "io.containerd.grpc.v1.cri", "registry"],
            vec![
                "plugins",
                "io.containerd.grpc.v1.cri",
                "containerd",
                "discard_unpacked_layers",
            ],
        ),
        _ => (
            vec!["plugins", "cri", "registry"],
            vec!["plugins", "cri", "containerd", "discard_unpacked_layers"],
        ),
    };
    let mut out = Vec::new();
    let reg = get(&v, &registry);
    let config_path = reg
        .and_then(|r| r.get("config_path"))
        .and_then(|p| p.as_str())
        .unwrap_or("");
    if config_path.is_empty() {
        out.push(Warning {
            check: "config_path_unset",
            message: format!(
                "containerd's CRI registry config_path is not set, so it ignores the hosts \
                 directory: set [{}] config_path = \"{}\" and restart containerd",
                registry.join("."),
                hosts_dir.display()
            ),
        });
    } else if !config_path
        .split(':')
        .any(|p| Path::new(p.trim_end_matches('/')) == hosts_dir)
    {
        out.push(Warning {
            check: "config_path_elsewhere",
            message: format!(
                "containerd's CRI registry config_path is {config_path:?}, which does not \
                 include {}, where the agent writes",
                hosts_dir.display()
            ),
        });
    }
    let legacy = reg
        .and_then(|r| r.get("mirrors"))
        .and_then(|m| m.as_table())
        .is_some_and(|t| !t.is_empty());
    if legacy {
        out.push(Warning {
            check: "legacy_mirrors",
            message: "containerd's config has legacy registry.mirrors entries: containerd \
                      refuses them beside config_path; move them to hosts.toml files"
                .into(),
        });
    }
    if get(&v, &discard).and_then(|d| d.as_bool()) == Some(true) {
        out.push(Warning {
            check: "discard_unpacked_layers",
            message: "containerd discards layers after unpacking (discard_unpacked_layers = \
                      true): images cannot be re-served or re-unpacked from this node's store"
                .into(),
        });
    }
    out
}

/// Whether a finding keeps the node from trusting the registry through hosts.toml.
pub fn blocks_trust(w: &Warning) -> bool {
    matches!(
        w.check,
        "config_path_unset" | "config_path_elsewhere" | "legacy_mirrors"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checks(text: &str) -> Vec<&'static str> {
        check_containerd(text, Path::new("/etc/containerd/certs.d"))
            .iter()
            .map(|w| w.check)
            .collect()
    }

    #[test]
    fn version_2_configs() {
        let good = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"/etc/containerd/certs.d\"\n";
        assert!(checks(good).is_empty());
        assert_eq!(checks("version = 2\n"), ["config_path_unset"]);
        let legacy = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"/etc/containerd/certs.d\"\n[plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.\"docker.io\"]\n  endpoint = [\"https://m\"]\n";
        assert_eq!(checks(legacy), ["legacy_mirrors"]);
        let discard = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"/etc/containerd/certs.d:/other\"\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  discard_unpacked_layers = true\n";
        assert_eq!(checks(discard), ["discard_unpacked_layers"]);
        let elsewhere = "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"/opt/certs\"\n";
        assert_eq!(checks(elsewhere), ["config_path_elsewhere"]);
    }

    #[test]
    fn versions_1_and_3_and_garbage() {
        assert_eq!(
            checks("[plugins.cri.registry]\nconfig_path = \"/etc/containerd/certs.d\"\n"),
            Vec::<&str>::new()
        );
        assert_eq!(
            checks(
                "version = 3\n[plugins.\"io.containerd.cri.v1.images\"]\ndiscard_unpacked_layers = true\n[plugins.\"io.containerd.cri.v1.images\".registry]\nconfig_path = \"/etc/containerd/certs.d\"\n"
            ),
            ["discard_unpacked_layers"]
        );
        assert_eq!(checks("not toml ["), ["config_unreadable"]);
    }
}
