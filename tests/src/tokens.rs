//! Client tokens for the suites that need a registry requiring authentication.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

use crate::{bin, http, run_ok};

/// The client token [`full_access_tokens_file`] creates.
pub const CLIENT: &str = "ci";

/// Adds to the tokens file `tokens` a scope map and a client token, both named `name`,
/// allowing `actions` on the repositories `pattern` matches; the token's password.
pub fn client_token(tokens: &Path, name: &str, pattern: &str, actions: &[&str]) -> String {
    let cli = |args: &[&str]| {
        run_ok(
            Command::new(bin("outpost-registry"))
                .args(args)
                .arg("--tokens")
                .arg(tokens),
        )
    };
    let mut map = vec![
        "scope-map",
        "create",
        "--name",
        name,
        "--repository",
        pattern,
    ];
    map.extend_from_slice(actions);
    cli(&map);
    let out = cli(&[
        "token",
        "create",
        "--name",
        name,
        "--scope-map",
        name,
        "-o",
        "json",
    ]);
    let v: Value = serde_json::from_str(&out).expect("token create -o json");
    v["password1"].as_str().expect("password1").to_owned()
}

/// A tokens file under `dir` with one client token, [`CLIENT`], allowed everything;
/// (path, its password).
pub fn full_access_tokens_file(dir: &Path) -> (String, String) {
    let path = dir.join("tokens.toml");
    let password = client_token(
        &path,
        CLIENT,
        "**",
        &[
            "content/read",
            "content/write",
            "metadata/read",
            "metadata/write",
        ],
    );
    (path.display().to_string(), password)
}

/// A bearer token for pull and push on `repo` from the token endpoint at `base` (a registry's
/// URL), asked as [`CLIENT`] with `password`.
pub fn bearer_token(base: &str, password: &str, repo: &str) -> String {
    let r = http()
        .get(format!(
            "{base}/oauth2/token?service=outpost&scope=repository:{repo}:pull,push"
        ))
        .basic_auth(CLIENT, Some(password))
        .send()
        .expect("token request");
    assert_eq!(r.status(), 200, "token endpoint at {base}");
    let v: Value = r.json().expect("token json");
    v["token"].as_str().expect("a token").to_owned()
}
