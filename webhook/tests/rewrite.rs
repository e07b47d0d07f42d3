//! The rewrite rule over image-reference forms: Docker Hub normalisation, hosts with ports,
//! tags, digests and tag+digest, repository patterns, hosts without a rule, references already
//! on Outpost, and invalid references (left alone).

use outpost_core::MirrorConfig;
use outpost_webhook::mutate::{Decision, KeepReason, decide};

const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

const CONFIG: &str = r#"
registry = "outpost.local:5000"
[[rule]]
upstream = "myacr.azurecr.io"
repositories = ["hello-world", "team-a/**", "samples/*", "app-*"]
[[rule]]
upstream = "index.docker.io"
repositories = ["library/*", "bitnami/**"]
[[rule]]
upstream = "registry.local:5000"
[[rule]]
upstream = "ghcr.io"
repositories = ["org/*"]
[[rule]]
upstream = "10.0.0.7:5000"
[[rule]]
upstream = "[fd00::1]:5000"
"#;

#[derive(Debug)]
enum Want {
    To(String),
    NoRule,
    OnOutpost,
    Invalid,
}
use Want::*;

fn to(s: &str) -> Want {
    To(format!("outpost.local:5000/{}", s.replace("{D}", D)))
}

#[test]
fn rewrite_table() {
    let config: MirrorConfig = CONFIG.parse().unwrap();
    let table: Vec<(String, Want)> = vec![
        // Docker Hub short names and aliases.
        ("nginx".into(), to("library/nginx")),
        ("nginx:1.27".into(), to("library/nginx:1.27")),
        ("nginx:latest".into(), to("library/nginx:latest")),
        ("library/nginx".into(), to("library/nginx")),
        ("docker.io/nginx".into(), to("library/nginx")),
        ("docker.io/library/nginx".into(), to("library/nginx")),
        ("index.docker.io/nginx".into(), to("library/nginx")),
        (
            "index.docker.io/library/nginx:1".into(),
            to("library/nginx:1"),
        ),
        (
            "registry-1.docker.io/library/nginx:1".into(),
            to("library/nginx:1"),
        ),
        (format!("nginx@{D}"), to("library/nginx@{D}")),
        (format!("nginx:1.27@{D}"), to("library/nginx:1.27@{D}")),
        ("bitnami/redis:7".into(), to("bitnami/redis:7")),
        ("bitnami/charts/redis".into(), to("bitnami/charts/redis")),
        ("docker.io/bitnami/redis".into(), to("bitnami/redis")),
        ("envoyproxy/envoy:v1.30.1".into(), NoRule),
        ("docker.io/library/nginx/extra".into(), NoRule),
        // A registry with rules per repository pattern.
        ("myacr.azurecr.io/hello-world".into(), to("hello-world")),
        (
            "myacr.azurecr.io/hello-world:latest".into(),
            to("hello-world:latest"),
        ),
        (
            format!("myacr.azurecr.io/hello-world@{D}"),
            to("hello-world@{D}"),
        ),
        (
            format!("myacr.azurecr.io/hello-world:v1@{D}"),
            to("hello-world:v1@{D}"),
        ),
        ("myacr.azurecr.io/team-a/api".into(), to("team-a/api")),
        (
            "myacr.azurecr.io/team-a/x/y/z:1".into(),
            to("team-a/x/y/z:1"),
        ),
        // `**` matches no segment too.
        ("myacr.azurecr.io/team-a".into(), to("team-a")),
        ("myacr.azurecr.io/team-b/api".into(), NoRule),
        ("myacr.azurecr.io/samples/one".into(), to("samples/one")),
        ("myacr.azurecr.io/samples/one/two".into(), NoRule),
        (
            "myacr.azurecr.io/app-frontend:3".into(),
            to("app-frontend:3"),
        ),
        ("myacr.azurecr.io/app".into(), NoRule),
        ("myacr.azurecr.io/hello-world-2".into(), NoRule),
        // A port makes a different host.
        ("myacr.azurecr.io:443/hello-world".into(), NoRule),
        ("other.azurecr.io/hello-world".into(), NoRule),
        // Hosts with ports, IPs.
        ("registry.local:5000/app:1".into(), to("app:1")),
        (format!("registry.local:5000/a/b/c@{D}"), to("a/b/c@{D}")),
        ("registry.local/app".into(), NoRule),
        ("registry.local:5001/app".into(), NoRule),
        ("10.0.0.7:5000/tools/x:2".into(), to("tools/x:2")),
        ("[fd00::1]:5000/app".into(), to("app")),
        ("localhost:5000/app".into(), NoRule),
        ("localhost/app".into(), NoRule),
        (format!("ghcr.io/org/tool:1.0@{D}"), to("org/tool:1.0@{D}")),
        ("ghcr.io/org/sub/tool".into(), NoRule),
        ("ghcr.io/other/tool".into(), NoRule),
        // Already on Outpost (re-invocation, or written so by hand).
        ("outpost.local:5000/library/nginx".into(), OnOutpost),
        ("outpost.local:5000/hello-world:latest".into(), OnOutpost),
        // Invalid: left exactly as written.
        ("MyACR.azurecr.io/hello-world".into(), Invalid),
        ("myacr.azurecr.io/Hello:latest".into(), Invalid),
        ("NGINX".into(), Invalid),
        ("docker.io/Library/nginx".into(), Invalid),
        ("nginx:bad:tag".into(), Invalid),
        ("nginx@sha256:short".into(), Invalid),
        (format!("nginx@{}", D.to_uppercase()), Invalid),
        ("".into(), Invalid),
        (" nginx".into(), Invalid),
        ("myacr.azurecr.io//hello-world".into(), Invalid),
        ("myacr.azurecr.io:0/hello-world".into(), Invalid),
    ];
    assert!(table.len() >= 40);
    let mut failures = Vec::new();
    for (input, want) in &table {
        let got = decide(input, &config);
        let ok = match (want, &got) {
            (To(s), Decision::Rewrite(r)) => r.to_string() == *s,
            (NoRule, Decision::Keep(KeepReason::NoRule)) => true,
            (OnOutpost, Decision::Keep(KeepReason::OnOutpost)) => true,
            (Invalid, Decision::Keep(KeepReason::Invalid(_))) => true,
            _ => false,
        };
        if !ok {
            failures.push(format!("{input:?}: want {want:?}, got {got:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Rules are tried in file order; a later rule for the same host still applies to what the
/// earlier one does not cover.
#[test]
fn rules_in_order_for_one_host() {
    let config: MirrorConfig = r#"
registry = "outpost.local"
[[rule]]
upstream = "quay.io"
repositories = ["a/*"]
[[rule]]
upstream = "quay.io"
repositories = ["b/**"]
"#
    .parse()
    .unwrap();
    let quay: outpost_core::Host = "quay.io".parse().unwrap();
    assert_eq!(
        config
            .rule_for(&quay, "a/x")
            .map(|r| r.repositories[0].as_str()),
        Some("a/*")
    );
    assert_eq!(
        config
            .rule_for(&quay, "b/x/y")
            .map(|r| r.repositories[0].as_str()),
        Some("b/**")
    );
    assert!(
        matches!(decide("quay.io/b/x/y:1", &config), Decision::Rewrite(r) if r.to_string() == "outpost.local/b/x/y:1")
    );
    assert!(matches!(
        decide("quay.io/c/x", &config),
        Decision::Keep(KeepReason::NoRule)
    ));
}
