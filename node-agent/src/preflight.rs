//! Checks of the node's containerd config that decide whether the files the agent writes take
//! effect: the CRI registry's `config_path` must name the hosts directory, legacy
//! `registry.mirrors` beside it make containerd refuse to start the CRI plugin, and
//! `discard_unpacked_layers` throws away layers the node may need to serve again.

use std::path::{Path, PathBuf};

/// One finding, with a stable name for the metric and the event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Warning {
    pub check: &'static str,
    pub message: String,
}

impl Warning {
    /// The Event reason. One per check: Events with the same reason on the same node are
    /// folded into one series that keeps the first note, so two findings need two reasons.
    pub fn reason(&self) -> &'static str {
        match self.check {
            "config_unreadable" => "ContainerdConfigUnreadable",
            "config_path_unset" => "ContainerdConfigPathUnset",
            "config_path_elsewhere" => "ContainerdConfigPathElsewhere",
            "legacy_mirrors" => "ContainerdLegacyMirrors",
            "discard_unpacked_layers" => "ContainerdDiscardUnpackedLayers",
            _ => "ContainerdConfig",
        }
    }
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
/// it (its `config_path` must include it); `same_dir` says whether a `config_path` entry names
/// that directory.
pub fn check_containerd(
    text: &str,
    hosts_dir: &Path,
    same_dir: impl Fn(&Path) -> bool,
) -> Vec<Warning> {
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
        .any(|p| same_dir(Path::new(p.trim_end_matches('/'))))
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

/// The files an `imports` entry names, as the agent sees them: an absolute path is the node's
/// (so under `root`, unless it already points there), a relative one is relative to the main
/// config's directory; a `*` in the file name matches as in Go's `filepath.Glob`, results in
/// lexical order as containerd reads them.
fn import_files(root: &Path, main: &Path, pattern: &str) -> Vec<PathBuf> {
    let p = Path::new(pattern);
    let path = if p.is_absolute() {
        if p.starts_with(root) && root != Path::new("/") {
            p.to_path_buf()
        } else {
            root.join(p.strip_prefix("/").unwrap_or(p))
        }
    } else {
        main.parent().unwrap_or(Path::new("")).join(p)
    };
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
    let Some((prefix, suffix)) = name.split_once('*') else {
        return vec![path];
    };
    let dir = path.parent().unwrap_or(Path::new(""));
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let n = e.file_name().to_str()?.to_owned();
            // One `*` per name is what configs use (`conf.d/*.toml`); a second one matches
            // nothing rather than something containerd would not read.
            (!suffix.contains('*')
                && n.len() >= prefix.len() + suffix.len()
                && n.starts_with(prefix)
                && n.ends_with(suffix))
            .then(|| dir.join(n))
        })
        .collect();
    out.sort();
    out
}

/// containerd's config as containerd reads it: the main file (`main`, the agent's path to it)
/// with the files its `imports` name applied in order. As in containerd 1.x, an imported
/// file's `[plugins."<id>"]` section replaces the main file's section for that plugin, and
/// other top-level keys are overridden. Returns TOML text for [`check_containerd`] (the main
/// file's own text when it has no imports or does not parse, so the checks see it as it is),
/// or `None` when the main file cannot be read.
pub fn effective_config(root: &Path, main: &Path) -> Option<String> {
    let text = std::fs::read_to_string(main).ok()?;
    let Ok(mut doc) = toml::from_str::<toml::Table>(&text) else {
        return Some(text);
    };
    let imports: Vec<String> = doc
        .get("imports")
        .and_then(|i| i.as_array())
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    if imports.is_empty() {
        return Some(text);
    }
    for pattern in &imports {
        for file in import_files(root, main, pattern) {
            if file == main {
                continue;
            }
            let Some(imported) = std::fs::read_to_string(&file)
                .ok()
                .and_then(|t| toml::from_str::<toml::Table>(&t).ok())
            else {
                // containerd refuses to start on an unreadable import; the checks below
                // still judge what can be read.
                tracing::warn!(path = %file.display(), "cannot read or parse a file containerd's config imports");
                continue;
            };
            for (k, v) in imported {
                match (k.as_str(), v) {
                    ("plugins", toml::Value::Table(plugins)) => {
                        let entry = doc
                            .entry("plugins")
                            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
                        if let Some(t) = entry.as_table_mut() {
                            t.extend(plugins);
                        }
                    }
                    ("imports" | "version", _) => {}
                    (_, v) => {
                        doc.insert(k, v);
                    }
                }
            }
        }
    }
    Some(toml::to_string(&doc).unwrap_or(text))
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
        let dir = Path::new("/etc/containerd/certs.d");
        check_containerd(text, dir, |p| p == dir)
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
    fn imported_files_are_part_of_the_config() {
        let root = tempfile::tempdir().unwrap();
        let etc = root.path().join("etc/containerd");
        std::fs::create_dir_all(etc.join("conf.d")).unwrap();
        let main = etc.join("config.toml");
        std::fs::write(
            &main,
            "version = 2\nimports = [\"/etc/containerd/conf.d/*.toml\"]\n[plugins.\"io.containerd.grpc.v1.cri\".containerd]\n  discard_unpacked_layers = true\n",
        )
        .unwrap();
        let eff = |_: ()| effective_config(root.path(), &main).unwrap();
        assert_eq!(
            checks(&eff(())),
            ["config_path_unset", "discard_unpacked_layers"]
        );
        // A drop-in sets config_path: its CRI section replaces the main file's.
        std::fs::write(
            etc.join("conf.d/10-registry.toml"),
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry]\n  config_path = \"/etc/containerd/certs.d\"\n",
        )
        .unwrap();
        std::fs::write(etc.join("conf.d/README"), "not toml [").unwrap();
        assert!(checks(&eff(())).is_empty(), "{}", eff(()));
        // A later drop-in (lexical order) adds legacy mirrors.
        std::fs::write(
            etc.join("conf.d/20-mirrors.toml"),
            "version = 2\n[plugins.\"io.containerd.grpc.v1.cri\".registry.mirrors.\"docker.io\"]\n  endpoint = [\"https://m\"]\n",
        )
        .unwrap();
        assert_eq!(checks(&eff(())), ["config_path_unset", "legacy_mirrors"]);
        // A relative import, and no file: the main file as it is.
        std::fs::write(&main, "version = 2\nimports = [\"missing.toml\"]\n").unwrap();
        assert_eq!(checks(&eff(())), ["config_path_unset"]);
        assert!(effective_config(root.path(), &etc.join("nope.toml")).is_none());
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
