//! The Helm chart through the real Helm library (helm-sdkpy, installed by tests/run.sh): lint
//! clean for the defaults and every documented scenario, failing for typos and bad
//! combinations; and the plain manifests in sync with the chart.

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
