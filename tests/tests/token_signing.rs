//! Replicas share bearer token signing keys (`--token-signing-key-file`): two `serve`
//! processes on one Azurite container accept each other's tokens for pulls and pushes, keep
//! doing so across a key rotation done while they run, and a process without the file refuses
//! them. A bad key file is refused at start with one line that holds no key material.

use std::process::Command;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use outpost_e2e::tokens::{bearer_token, full_access_tokens_file};
use outpost_e2e::{Registry, bin, emulators, http, pseudo_random, run_ok, run_timeout, sha256};
use reqwest::StatusCode;
use serde_json::{Value, json};

const MEDIA: &str = "application/vnd.oci.image.manifest.v1+json";

fn generate_key() -> String {
    let key = run_ok(Command::new(bin("outpost-registry")).args(["token-signing-key", "generate"]));
    let key = key.trim().to_owned();
    assert_eq!(STANDARD.decode(&key).unwrap().len(), 32, "{key}");
    key
}

/// The `kid` of a token's header.
fn kid(token: &str) -> String {
    let h = URL_SAFE_NO_PAD
        .decode(token.split('.').next().unwrap())
        .unwrap();
    let v: Value = serde_json::from_slice(&h).unwrap();
    v["kid"].as_str().unwrap().to_owned()
}

/// Pushes a small image (config, layer, manifest) to `reg` with `token`; returns the status
/// of the manifest PUT (or of the first request that failed) and the manifest digest.
fn push(reg: &Registry, token: &str, repo: &str, tag: &str, seed: u64) -> (StatusCode, String) {
    let c = http();
    let config = format!(r#"{{"architecture":"amd64","os":"linux","seed":{seed}}}"#).into_bytes();
    let layer = pseudo_random(seed, 4096);
    let mut descs = Vec::new();
    for data in [&config, &layer] {
        let digest = sha256(data);
        let r = c
            .post(format!(
                "{}/v2/{repo}/blobs/uploads/?digest={digest}",
                reg.url()
            ))
            .bearer_auth(token)
            .header("content-type", "application/octet-stream")
            .body(data.clone())
            .send()
            .unwrap();
        if r.status() != StatusCode::CREATED {
            return (r.status(), String::new());
        }
        descs.push(json!({"digest": digest, "size": data.len()}));
    }
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": MEDIA,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": descs[0]["digest"], "size": descs[0]["size"]},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                    "digest": descs[1]["digest"], "size": descs[1]["size"]}],
    }))
    .unwrap();
    let r = c
        .put(format!("{}/v2/{repo}/manifests/{tag}", reg.url()))
        .bearer_auth(token)
        .header("content-type", MEDIA)
        .body(manifest.clone())
        .send()
        .unwrap();
    (r.status(), sha256(&manifest))
}

/// Pulls `repo:tag` (manifest, then every blob) from `reg` with `token`; the first status
/// that is not 200, or 200.
fn pull(reg: &Registry, token: &str, repo: &str, tag: &str) -> StatusCode {
    let c = http();
    let r = c
        .get(format!("{}/v2/{repo}/manifests/{tag}", reg.url()))
        .bearer_auth(token)
        .header("accept", MEDIA)
        .send()
        .unwrap();
    if r.status() != StatusCode::OK {
        return r.status();
    }
    let m: Value = r.json().unwrap();
    let mut digests = vec![m["config"]["digest"].as_str().unwrap().to_owned()];
    digests.extend(
        m["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["digest"].as_str().unwrap().to_owned()),
    );
    for d in digests {
        let r = c
            .get(format!("{}/v2/{repo}/blobs/{d}", reg.url()))
            .bearer_auth(token)
            .send()
            .unwrap();
        if r.status() != StatusCode::OK {
            return r.status();
        }
        assert_eq!(sha256(&r.bytes().unwrap()), d);
    }
    StatusCode::OK
}

#[test]
fn replicas_share_signing_keys_across_a_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let (tokens, pw) = full_access_tokens_file(dir.path());
    let keys = dir.path().join("signing-keys");
    let (key_a, key_b) = (generate_key(), generate_key());
    std::fs::write(&keys, format!("# replicas' bearer token keys\n{key_a}\n")).unwrap();
    let keys_arg = keys.display().to_string();
    let storage = emulators::azurite();
    let flags = [
        "--tokens",
        tokens.as_str(),
        "--token-signing-key-file",
        keys_arg.as_str(),
    ];
    let a = Registry::start_on_storage(Some(storage.clone()), &flags);
    let b = Registry::start_on_storage(Some(storage.clone()), &flags);
    let lone = Registry::start_on_storage(Some(storage), &["--tokens", tokens.as_str()]);

    // A's token pushes through B and pulls through B (and A: the same container).
    let from_a = bearer_token(&a.url(), &pw, "shared/app");
    let kid_a = kid(&from_a);
    assert_eq!(
        push(&b, &from_a, "shared/app", "v1", 1).0,
        StatusCode::CREATED
    );
    assert_eq!(pull(&b, &from_a, "shared/app", "v1"), StatusCode::OK);
    assert_eq!(pull(&a, &from_a, "shared/app", "v1"), StatusCode::OK);
    // B signs with the same key.
    assert_eq!(kid(&bearer_token(&b.url(), &pw, "shared/app")), kid_a);
    // A process with a key of its own refuses A's tokens, and A refuses its tokens.
    assert_eq!(
        pull(&lone, &from_a, "shared/app", "v1"),
        StatusCode::UNAUTHORIZED
    );
    let from_lone = bearer_token(&lone.url(), &pw, "shared/app");
    assert_eq!(pull(&lone, &from_lone, "shared/app", "v1"), StatusCode::OK);
    assert_eq!(
        pull(&a, &from_lone, "shared/app", "v1"),
        StatusCode::UNAUTHORIZED
    );

    // Rotation while both run: the new key first, the old one still listed.
    std::fs::write(&keys, format!("{key_b}\n# old\n{key_a}\n")).unwrap();
    for reg in [&a, &b] {
        outpost_e2e::wait_until("the new key signs", Duration::from_secs(30), || {
            kid(&bearer_token(&reg.url(), &pw, "shared/app")) != kid_a
        });
    }
    let (new_a, new_b) = (
        bearer_token(&a.url(), &pw, "shared/app"),
        bearer_token(&b.url(), &pw, "shared/app"),
    );
    assert_eq!(kid(&new_a), kid(&new_b));
    for reg in [&a, &b] {
        assert_eq!(pull(reg, &from_a, "shared/app", "v1"), StatusCode::OK);
        assert_eq!(pull(reg, &new_a, "shared/app", "v1"), StatusCode::OK);
        assert_eq!(pull(reg, &new_b, "shared/app", "v1"), StatusCode::OK);
    }
    let (status, digest) = push(&a, &new_b, "shared/app", "v2", 2);
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(
        push(&b, &new_a, "shared/app", "v3", 3).0,
        StatusCode::CREATED
    );
    assert_eq!(pull(&b, &new_b, "shared/app", "v2"), StatusCode::OK);
    assert!(!digest.is_empty());

    // A file that does not parse keeps the previous keys, and the log says why without
    // the keys.
    std::fs::write(&keys, "not base64 !!\n").unwrap();
    outpost_e2e::wait_until("the bad file is reported", Duration::from_secs(30), || {
        a.log_text().contains("token signing key file not reloaded")
    });
    assert_eq!(pull(&a, &from_a, "shared/app", "v1"), StatusCode::OK);
    assert_eq!(pull(&a, &new_b, "shared/app", "v1"), StatusCode::OK);

    // The old key removed: its tokens are refused by both, the new key's still accepted.
    std::fs::write(&keys, format!("{key_b}\n")).unwrap();
    for reg in [&a, &b] {
        outpost_e2e::wait_until(
            "the old key's token is refused",
            Duration::from_secs(30),
            || pull(reg, &from_a, "shared/app", "v1") == StatusCode::UNAUTHORIZED,
        );
        assert_eq!(pull(reg, &new_a, "shared/app", "v3"), StatusCode::OK);
    }
    for reg in [&a, &b, &lone] {
        let log = reg.log_text();
        for key in [&key_a, &key_b] {
            assert!(!log.contains(key.trim_end_matches('=')), "a key in the log");
        }
    }
    assert!(
        lone.log_text()
            .contains("signed with a key of this process")
    );
}

#[test]
fn bad_key_files_are_refused_at_start_with_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let (tokens, _) = full_access_tokens_file(dir.path());
    let key = generate_key();
    let short = STANDARD.encode([9u8; 16]);
    let cases: [(&str, Option<String>, &str); 4] = [
        ("missing", None, "cannot read token signing key file"),
        ("empty", Some("# nothing yet\n\n".into()), "holds no key"),
        (
            "short",
            Some(format!("{key}\n{short}\n")),
            "line 2: the key has 16 bytes",
        ),
        (
            "encoding",
            Some(format!("{key}x!\n")),
            "line 1: the key is not valid base64",
        ),
    ];
    for (name, content, expect) in cases {
        let path = dir.path().join(name);
        if let Some(c) = &content {
            std::fs::write(&path, c).unwrap();
        }
        let out = run_timeout(
            Command::new(bin("outpost-registry")).args([
                "serve",
                "--storage",
                &dir.path().join("data").display().to_string(),
                "--listen",
                "127.0.0.1:0",
                "--admin-listen",
                "127.0.0.1:0",
                "--tokens",
                &tokens,
                "--token-signing-key-file",
                &path.display().to_string(),
            ]),
            Duration::from_secs(60),
        );
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{name}: started");
        let last = err.lines().last().unwrap_or_default();
        assert!(
            last.starts_with("error: ") && last.contains(expect),
            "{name}: {err}"
        );
        assert!(
            !err.contains(key.trim_end_matches('=')),
            "{name}: key in {err}"
        );
        assert!(
            !err.contains(short.trim_end_matches('=')),
            "{name}: key in {err}"
        );
    }
}
