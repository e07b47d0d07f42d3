//! The Helm chart through the real Helm library (helm-sdkpy, installed by tests/run.sh): lint
//! clean for the defaults and every documented scenario, failing for typos and bad
//! combinations; rendered objects checked per scenario; every flag the templates pass known to
//! its binary; and the plain manifests in sync with the chart.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use outpost_e2e::*;

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
}

#[test]
fn chart_lints_clean_for_every_scenario_and_fails_for_typos() {
    let out = run_timeout(
        Command::new("python3")
            .arg(repo().join("charts/tests/lint.py"))
            .current_dir(repo()),
        Duration::from_secs(300),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("chart lint: 14 passed, 0 failed"), "{text}");
}

#[test]
fn manifests_are_in_sync_with_the_chart() {
    let out = run_timeout(
        Command::new("python3")
            .arg(repo().join("manifests/generate.py"))
            .arg("--check")
            .current_dir(repo()),
        Duration::from_secs(120),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("manifests in sync"), "{text}");
    // What kubectl apply -k gets: every object of the default install, none twice.
    let yaml = std::fs::read_to_string(repo().join("manifests/outpost.yaml")).unwrap();
    let mut objects: Vec<String> = Vec::new();
    let (mut kind, mut name) = (String::new(), String::new());
    for line in yaml.lines() {
        if line == "---" {
            kind.clear();
            name.clear();
        } else if let Some(k) = line.strip_prefix("kind: ") {
            kind = k.to_string();
        } else if let Some(n) = line.strip_prefix("  name: ")
            && name.is_empty()
        {
            name = n.to_string();
            objects.push(format!("{kind}/{name}"));
        }
    }
    for expected in [
        "Deployment/outpost-registry",
        "Service/outpost-registry",
        "PersistentVolumeClaim/outpost-data",
        "DaemonSet/outpost-node-agent",
        "Deployment/outpost-webhook",
        "PodDisruptionBudget/outpost-webhook",
        "MutatingWebhookConfiguration/outpost-webhook",
        "Certificate/outpost-registry",
    ] {
        assert!(
            objects.iter().any(|o| o == expected),
            "{expected} missing: {objects:?}"
        );
    }
    let mut unique = objects.clone();
    unique.sort();
    unique.dedup();
    assert_eq!(unique.len(), objects.len(), "{objects:?}");
    assert!(
        !yaml.contains("connection-string: \""),
        "no connection string in plain YAML"
    );
}

/// `(subcommand, --flag)` pairs a template passes to its binary: the `args:` list (first item
/// the subcommand) and inline `command: [binary, subcommand, flags...]` arrays (the preStop).
fn template_flags(template: &str, binary: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut sub: Option<String> = None;
    let mut in_args = false;
    for line in template.lines() {
        let t = line.trim();
        if t == "args:" {
            in_args = true;
            sub = None;
            continue;
        }
        if let Some(array) = t
            .strip_prefix("command: [")
            .and_then(|r| r.strip_suffix(']'))
        {
            let items: Vec<&str> = array
                .split(',')
                .map(|s| s.trim().trim_matches('"'))
                .collect();
            if items.first().is_some_and(|b| b.ends_with(binary)) && items.len() > 1 {
                for flag in &items[2..] {
                    out.push((items[1].to_string(), flag_name(flag)));
                }
            }
            continue;
        }
        if in_args {
            match t.strip_prefix("- ") {
                Some(item) if item.starts_with("--") => {
                    let sub = sub.clone().expect("args start with a subcommand");
                    out.push((sub, flag_name(item)));
                }
                Some(item) if sub.is_none() => sub = Some(item.to_string()),
                Some(_) => {}
                // Template directives ({{- if }}) sit inside the list; anything else ends it.
                None if t.starts_with("{{") => {}
                None => in_args = false,
            }
        }
    }
    out
}

fn flag_name(arg: &str) -> String {
    arg.split('=').next().unwrap_or(arg).to_string()
}

#[test]
fn every_flag_the_chart_passes_exists_in_the_binary() {
    let templates = repo().join("charts/outpost/templates");
    let mut checked = 0;
    for (file, binary) in [
        ("registry.yaml", "outpost-registry"),
        ("webhook.yaml", "outpost-webhook"),
        ("node-agent.yaml", "outpost-node-agent"),
    ] {
        let text = std::fs::read_to_string(templates.join(file)).unwrap();
        let flags = template_flags(&text, binary);
        assert!(flags.len() >= 5, "{file}: too few flags found: {flags:?}");
        for (sub, flag) in flags {
            let out = run_timeout(
                Command::new(bin(binary)).args([sub.as_str(), "--help"]),
                Duration::from_secs(30),
            );
            assert!(out.status.success(), "{binary} {sub} --help failed");
            let help = String::from_utf8_lossy(&out.stdout);
            let known = help
                .split(|c: char| c.is_whitespace() || c == ',' || c == '[')
                .any(|word| word == flag || word.starts_with(&format!("{flag}=")));
            assert!(
                known,
                "{file} passes {flag} to `{binary} {sub}`, which has no such flag:\n{help}"
            );
            checked += 1;
        }
    }
    assert!(checked >= 30, "only {checked} flags checked");
}

#[test]
fn rendered_objects_match_the_chart_promises_in_every_scenario() {
    let out = run_timeout(
        Command::new("python3")
            .arg(repo().join("charts/tests/render_checks.py"))
            .current_dir(repo()),
        Duration::from_secs(300),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("render checks: 6 passed, 0 failed"), "{text}");
}
