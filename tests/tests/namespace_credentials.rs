//! Namespace-scoped pull credentials (issue 17, registry side), end to end over HTTPS with
//! anonymous pull off: credentials minted by `namespace-credential mint` with the keys of
//! `--token-signing-key-file` pull their own namespace's images with skopeo and nothing else
//! (403, or 404 on containerd's mirror path); the scope matrix of expired, forged, tampered,
//! foreign and revoked credentials over Basic and the bearer flow; the token endpoint; what the
//! admin API, `token list` and the metrics show; no credential text in the log or metrics.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use outpost_e2e::cri::{self, CriContainerd};
use outpost_e2e::metrics::samples;
use outpost_e2e::tokens::client_token;
use outpost_e2e::{
    Containerd, Layout, Registry, TestPki, bin, header, require, run_ok, run_timeout, sha256,
};
use reqwest::StatusCode;
use reqwest::blocking::{Client, RequestBuilder, Response};
use serde_json::Value;

fn cli(args: &[&str]) -> String {
    run_ok(Command::new(bin("outpost-registry")).args(args))
}

fn mint(keys: &Path, namespace: &str, repositories: &str, ttl: &str) -> String {
    let out = cli(&[
        "namespace-credential",
        "mint",
        "--namespace",
        namespace,
        "--repositories",
        repositories,
        "--ttl",
        ttl,
        "--token-signing-key-file",
        keys.to_str().unwrap(),
    ]);
    let cred = out.trim().to_owned();
    assert!(
        cred.starts_with("opns1.") && !cred.contains(char::is_whitespace),
        "{cred}"
    );
    cred
}

fn https_client(ca: &Path) -> Client {
    let ca = reqwest::Certificate::from_pem(&std::fs::read(ca).unwrap()).unwrap();
    Client::builder()
        .no_proxy()
        .tls_certs_only([ca])
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

struct Env {
    reg: Registry,
    pki: TestPki,
    tokens: PathBuf,
    keys: PathBuf,
    admin_pw: String,
    node_pw: String,
    dir: tempfile::TempDir,
}

impl Env {
    fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.reg.port)
    }

    fn client(&self) -> Client {
        https_client(&self.pki.ca_cert)
    }

    fn certs_dir(&self) -> PathBuf {
        let certs = self.dir.path().join("certs.d");
        std::fs::create_dir_all(&certs).unwrap();
        std::fs::copy(&self.pki.ca_cert, certs.join("ca.crt")).unwrap();
        certs
    }

    fn skopeo(&self, args: &[&str]) -> std::process::Output {
        run_timeout(
            Command::new(require("skopeo"))
                .arg("--insecure-policy")
                .args(args),
            Duration::from_secs(120),
        )
    }

    fn metrics(&self) -> String {
        self.client()
            .get(self.url("/metrics"))
            .send()
            .unwrap()
            .text()
            .unwrap()
    }

    fn ns_count(&self, result: &str, namespace: &str) -> f64 {
        samples(&self.metrics())
            .into_iter()
            .find(|s| {
                s.name == "outpost_namespace_credential_authentications_total"
                    && s.labels.get("result").map(String::as_str) == Some(result)
                    && s.labels.get("namespace").map(String::as_str) == Some(namespace)
            })
            .map_or(0.0, |s| s.value)
    }
}

fn setup() -> Env {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::create(dir.path());
    let tokens = dir.path().join("tokens.toml");
    let admin_pw = client_token(
        &tokens,
        "admin",
        "**",
        &[
            "content/read",
            "content/write",
            "content/delete",
            "metadata/read",
            "metadata/write",
        ],
    );
    // A node credential as the chart's nodeScope makes it: pull on an explicit allow list.
    let node_pw = client_token(
        &tokens,
        "node",
        "base/*",
        &["content/read", "metadata/read"],
    );
    let keys = dir.path().join("signing-keys");
    let key_a = cli(&["token-signing-key", "generate"]);
    let key_c = cli(&["token-signing-key", "generate"]);
    // C verifies only; it is the key revoked later.
    std::fs::write(
        &keys,
        format!("{}\n# to be revoked\n{}\n", key_a.trim(), key_c.trim()),
    )
    .unwrap();
    std::fs::write(dir.path().join("key-c"), key_c.trim()).unwrap();
    let args = [
        "--tls-cert".to_owned(),
        pki.cert.display().to_string(),
        "--tls-key".to_owned(),
        pki.key.display().to_string(),
        "--tokens".to_owned(),
        tokens.display().to_string(),
        "--token-signing-key-file".to_owned(),
        keys.display().to_string(),
        // Every refused case below comes from this one address.
        "--max-auth-failures".to_owned(),
        "10000".to_owned(),
    ];
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    // Debug logs every request: the log checked for credential text below is the fullest.
    let reg = Registry::start_with_env(None, &argv, &[("OUTPOST_LOG_LEVEL", "debug")]);
    Env {
        reg,
        pki,
        tokens,
        keys,
        admin_pw,
        node_pw,
        dir,
    }
}

/// Swaps the payload of `cred` for the payload of `other` under `cred`'s signature.
fn with_payload_of(cred: &str, other: &str) -> String {
    let p: Vec<&str> = cred.split('.').collect();
    let q: Vec<&str> = other.split('.').collect();
    assert_eq!((p.len(), q.len()), (4, 4));
    format!("{}.{}.{}.{}", p[0], p[1], q[2], p[3])
}

/// `cred` with its signature's first character changed.
fn flipped_signature(cred: &str) -> String {
    let (head, sig) = cred.rsplit_once('.').unwrap();
    let mut sig = sig.as_bytes().to_vec();
    sig[0] = if sig[0] == b'A' { b'B' } else { b'A' };
    format!("{head}.{}", String::from_utf8(sig).unwrap())
}

fn code(r: Response) -> (StatusCode, String) {
    let status = r.status();
    let body: Value = r.json().unwrap_or(Value::Null);
    (
        status,
        body["errors"][0]["code"].as_str().unwrap_or("").to_owned(),
    )
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Scheme {
    Basic,
    Bearer,
}

/// Sends a request as a registry client does: Basic directly, or bearer through the
/// challenge and the token endpoint.
fn send(
    env: &Env,
    scheme: Scheme,
    (user, pw): (&str, &str),
    make: &dyn Fn(&Client) -> RequestBuilder,
) -> Response {
    let c = env.client();
    if scheme == Scheme::Basic {
        return make(&c).basic_auth(user, Some(pw)).send().unwrap();
    }
    let first = make(&c).send().unwrap();
    if first.status() != StatusCode::UNAUTHORIZED {
        return first;
    }
    let ch = header(&first, "www-authenticate");
    let scope = ch
        .split("scope=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .unwrap_or("")
        .to_owned();
    let t = c
        .get(env.url("/oauth2/token"))
        .query(&[("service", "outpost"), ("scope", scope.as_str())])
        .basic_auth(user, Some(pw))
        .send()
        .unwrap();
    if t.status() != StatusCode::OK {
        return t;
    }
    let tok: Value = t.json().unwrap();
    make(&c)
        .bearer_auth(tok["token"].as_str().unwrap())
        .send()
        .unwrap()
}

#[test]
fn namespace_credentials_pull_their_scope_only() {
    let env = setup();
    let host = format!("127.0.0.1:{}", env.reg.port);
    let certs = env.certs_dir();
    let certs_s = certs.to_str().unwrap();
    let layout = Layout::new(env.dir.path());
    layout.add_image("v1", "amd64", &[("etc/team", b"private".to_vec())]);
    let src = format!("oci:{}:v1", layout.path.display());
    for repo in ["team-a/app", "team-b/app", "base/alpine"] {
        let out = env.skopeo(&[
            "copy",
            "--dest-cert-dir",
            certs_s,
            "--dest-creds",
            &format!("admin:{}", env.admin_pw),
            &src,
            &format!("docker://{host}/{repo}:v1"),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let digest = layout.descriptor("v1")["digest"]
        .as_str()
        .unwrap()
        .to_owned();

    let cred_a = mint(&env.keys, "team-a", "team-a/**,base/*", "1h");
    let cred_b = mint(&env.keys, "team-b", "team-b/**", "1h");

    // skopeo with team-a's credential pulls team-a/app whole, and is refused team-b/app.
    let out_dir = env.dir.path().join("pulled");
    let out = env.skopeo(&[
        "copy",
        "--src-cert-dir",
        certs_s,
        "--src-creds",
        &format!("team-a:{cred_a}"),
        &format!("docker://{host}/team-a/app:v1"),
        &format!("oci:{}:v1", out_dir.display()),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pulled: Value =
        serde_json::from_slice(&std::fs::read(out_dir.join("index.json")).unwrap()).unwrap();
    assert_eq!(pulled["manifests"][0]["digest"], digest.as_str());
    let out = env.skopeo(&[
        "inspect",
        "--raw",
        "--cert-dir",
        certs_s,
        "--creds",
        &format!("team-a:{cred_a}"),
        &format!("docker://{host}/base/alpine:v1"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(sha256(&out.stdout), digest);
    let out = env.skopeo(&[
        "inspect",
        "--raw",
        "--cert-dir",
        certs_s,
        "--creds",
        &format!("team-a:{cred_a}"),
        &format!("docker://{host}/team-b/app:v1"),
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(err.contains("denied") || err.contains("403"), "{err}");
    // Nor may it push into its own namespace.
    let out = env.skopeo(&[
        "copy",
        "--dest-cert-dir",
        certs_s,
        "--dest-creds",
        &format!("team-a:{cred_a}"),
        &src,
        &format!("docker://{host}/team-a/new:v1"),
    ]);
    assert!(!out.status.success());
    // Without credentials (anonymous pull off): refused.
    let out = env.skopeo(&[
        "inspect",
        "--raw",
        "--cert-dir",
        certs_s,
        &format!("docker://{host}/team-a/app:v1"),
    ]);
    assert!(!out.status.success());

    // containerd's mirror path (`?ns=`): outside the scope a 404, so containerd moves on to
    // the upstream; inside it, the image; without the parameter, 403.
    let manifest = |repo: &str, query: &str, cred: &str| {
        let r = env
            .client()
            .get(env.url(&format!("/v2/{repo}/manifests/v1{query}")))
            .header("accept", "application/vnd.oci.image.manifest.v1+json")
            .basic_auth("team-a", Some(cred))
            .send()
            .unwrap();
        code(r)
    };
    assert_eq!(
        manifest("team-b/app", "?ns=docker.io", &cred_a),
        (StatusCode::NOT_FOUND, "NAME_UNKNOWN".into())
    );
    assert_eq!(
        manifest("team-a/app", "?ns=docker.io", &cred_a).0,
        StatusCode::OK
    );
    assert_eq!(
        manifest("team-b/app", "", &cred_a),
        (StatusCode::FORBIDDEN, "DENIED".into())
    );
    // A refused credential stays a 401 on the mirror path.
    assert_eq!(
        manifest("team-b/app", "?ns=docker.io", &flipped_signature(&cred_a)).0,
        StatusCode::UNAUTHORIZED
    );
    // The node credential (a client token) on the mirror path alike: its allow list is
    // served, anything else is a 404 there and a 403 elsewhere.
    let node = |repo: &str, query: &str| {
        let r = env
            .client()
            .get(env.url(&format!("/v2/{repo}/manifests/v1{query}")))
            .header("accept", "application/vnd.oci.image.manifest.v1+json")
            .basic_auth("node", Some(&env.node_pw))
            .send()
            .unwrap();
        code(r)
    };
    assert_eq!(node("base/alpine", "?ns=docker.io").0, StatusCode::OK);
    assert_eq!(
        node("team-a/app", "?ns=docker.io"),
        (StatusCode::NOT_FOUND, "NAME_UNKNOWN".into())
    );
    assert_eq!(
        node("team-a/app", ""),
        (StatusCode::FORBIDDEN, "DENIED".into())
    );

    // OAuth2 password grant at the token endpoint, as for a client token.
    let r = env
        .client()
        .post(env.url("/oauth2/token"))
        .header("content-type", "application/x-www-form-urlencoded")
        // The credential is URL-safe as it is (hex, base64url and dots).
        .body(format!(
            "grant_type=password&service=outpost&username=team-a&password={cred_a}\
             &scope=repository%3Ateam-a%2Fapp%3Apull%2Cpush%20repository%3Ateam-b%2Fapp%3Apull"
        ))
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let tok: Value = r.json().unwrap();
    let bearer = tok["access_token"].as_str().unwrap().to_owned();
    assert!(tok["expires_in"].as_u64().unwrap() <= 300);
    let get = |repo: &str| {
        env.client()
            .get(env.url(&format!("/v2/{repo}/manifests/v1")))
            .header("accept", "application/vnd.oci.image.manifest.v1+json")
            .bearer_auth(&bearer)
            .send()
            .unwrap()
            .status()
    };
    assert_eq!(get("team-a/app"), StatusCode::OK);
    assert_eq!(get("team-b/app"), StatusCode::FORBIDDEN);

    // The scope matrix. Credentials for team-a presented as team-a.
    let expired = mint(&env.keys, "team-a", "team-a/**", "1s");
    let key_c_only = env.dir.path().join("key-c-only");
    std::fs::copy(env.dir.path().join("key-c"), &key_c_only).unwrap();
    let revoked = mint(&key_c_only, "team-a", "team-a/**", "1h");
    let foreign_key = env.dir.path().join("foreign");
    std::fs::write(&foreign_key, cli(&["token-signing-key", "generate"])).unwrap();
    let wrong_key = mint(&foreign_key, "team-a", "team-a/**", "1h");
    let wide = mint(&env.keys, "team-a", "**", "1h");
    let tampered = with_payload_of(&cred_a, &wide);
    let bad_sig = flipped_signature(&cred_a);
    // The key C credential works until C is removed from the key file.
    assert_eq!(
        send(&env, Scheme::Basic, ("team-a", &revoked), &|c| c
            .get(env.url("/v2/team-a/app/manifests/v1"))
            .header(
                "accept",
                "application/vnd.oci.image.manifest.v1+json"
            ))
        .status(),
        StatusCode::OK
    );
    let text = std::fs::read_to_string(&env.keys).unwrap();
    std::fs::write(&env.keys, text.lines().next().unwrap()).unwrap();
    outpost_e2e::wait_until(
        "the key file reload revokes key C",
        Duration::from_secs(30),
        || {
            send(&env, Scheme::Basic, ("team-a", &revoked), &|c| {
                c.get(env.url("/v2/team-a/app/manifests/v1"))
            })
            .status()
                == StatusCode::UNAUTHORIZED
        },
    );
    // The 1 s credential has expired by now (the reload took at least one 2 s poll); make sure.
    std::thread::sleep(Duration::from_millis(1100));

    type Make = Box<dyn Fn(&Client, &str) -> RequestBuilder>;
    let actions: Vec<(&str, Make, StatusCode)> = vec![
        (
            "content/read",
            Box::new(|c: &Client, u: &str| {
                c.get(format!("{u}/manifests/v1"))
                    .header("accept", "application/vnd.oci.image.manifest.v1+json")
            }),
            StatusCode::OK,
        ),
        (
            "metadata/read",
            Box::new(|c: &Client, u: &str| c.get(format!("{u}/tags/list"))),
            StatusCode::OK,
        ),
        (
            "content/write",
            Box::new(|c: &Client, u: &str| c.post(format!("{u}/blobs/uploads/"))),
            StatusCode::FORBIDDEN,
        ),
        (
            "content/delete",
            Box::new(|c: &Client, u: &str| c.delete(format!("{u}/manifests/no-such-tag"))),
            StatusCode::FORBIDDEN,
        ),
    ];
    let (mut checked, mut leaks) = (0, 0);
    for scheme in [Scheme::Basic, Scheme::Bearer] {
        for (action, make, in_scope) in &actions {
            for repo in ["team-a/app", "team-b/app"] {
                let base = env.url(&format!("/v2/{repo}"));
                let mk = |c: &Client| make(c, &base);
                let own = if repo == "team-a/app" {
                    *in_scope
                } else {
                    StatusCode::FORBIDDEN
                };
                let cases: Vec<(&str, (&str, &str), StatusCode)> = vec![
                    ("valid", ("team-a", &cred_a), own),
                    ("expired", ("team-a", &expired), StatusCode::UNAUTHORIZED),
                    (
                        "wrong signature",
                        ("team-a", &bad_sig),
                        StatusCode::UNAUTHORIZED,
                    ),
                    (
                        "unknown key",
                        ("team-a", &wrong_key),
                        StatusCode::UNAUTHORIZED,
                    ),
                    (
                        "tampered scope",
                        ("team-a", &tampered),
                        StatusCode::UNAUTHORIZED,
                    ),
                    (
                        "revoked key",
                        ("team-a", &revoked),
                        StatusCode::UNAUTHORIZED,
                    ),
                    (
                        "other namespace's credential as team-a",
                        ("team-a", &cred_b),
                        StatusCode::UNAUTHORIZED,
                    ),
                    (
                        "other namespace's credential",
                        ("team-b", &cred_b),
                        if repo == "team-b/app" {
                            *in_scope
                        } else {
                            StatusCode::FORBIDDEN
                        },
                    ),
                ];
                for (what, cred, want) in cases {
                    let (status, got_code) = code(send(&env, scheme, cred, &mk));
                    let ctx = format!("{scheme:?} {what} {action} on {repo}");
                    if want != *in_scope && status.is_success() {
                        leaks += 1;
                    }
                    assert_eq!(status, want, "{ctx}");
                    match status {
                        StatusCode::FORBIDDEN => assert_eq!(got_code, "DENIED", "{ctx}"),
                        StatusCode::UNAUTHORIZED => assert_eq!(got_code, "UNAUTHORIZED", "{ctx}"),
                        _ => {}
                    }
                    checked += 1;
                }
            }
        }
    }
    assert_eq!(checked, 2 * 4 * 2 * 8);
    assert_eq!(leaks, 0);

    // The catalog shows a credential its own repositories only.
    let r = env
        .client()
        .get(env.url("/v2/_catalog"))
        .basic_auth("team-a", Some(&cred_a))
        .send()
        .unwrap();
    let v: Value = r.json().unwrap();
    assert_eq!(
        v["repositories"],
        serde_json::json!(["base/alpine", "team-a/app"])
    );

    // Metrics by result and namespace; a namespace nobody signed gets no label of its own.
    assert!(env.ns_count("accepted", "team-a") >= 1.0);
    assert!(env.ns_count("accepted", "team-b") >= 1.0);
    assert!(env.ns_count("expired", "team-a") >= 1.0);
    assert!(env.ns_count("bad_signature", "team-a") >= 1.0);
    assert!(env.ns_count("unknown_key", "team-a") >= 1.0);
    assert!(env.ns_count("wrong_username", "team-a") >= 1.0);
    let before = env.ns_count("unknown_key", "");
    let r = env
        .client()
        .get(env.url("/v2/"))
        .basic_auth("nobody-signed-this", Some(&wrong_key))
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(env.ns_count("unknown_key", ""), before + 1.0);
    assert!(
        samples(&env.metrics())
            .iter()
            .all(|s| s.labels.get("namespace").map(String::as_str) != Some("nobody-signed-this"))
    );

    // The admin API and `token list --admin` show the namespaces accepted, with their
    // patterns and expiry.
    let admin = format!("https://127.0.0.1:{}", env.reg.admin_port);
    let v: Value = env
        .client()
        .get(format!("{admin}/outpost/v1/namespace-credentials"))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let list = v["namespaceCredentials"].as_array().unwrap();
    let names: Vec<&str> = list
        .iter()
        .map(|c| c["namespace"].as_str().unwrap())
        .collect();
    assert_eq!(names, vec!["team-a", "team-b"]);
    // Of team-a's credentials, the one issued last shows (on a tie, the one accepted last:
    // cred_a, used in the matrix after key C's credential was revoked).
    let iat = |c: &str| {
        let payload = URL_SAFE_NO_PAD
            .decode(c.split('.').nth(2).unwrap())
            .unwrap();
        serde_json::from_slice::<Value>(&payload).unwrap()["iat"]
            .as_u64()
            .unwrap()
    };
    let shown = if iat(&revoked) > iat(&cred_a) {
        serde_json::json!(["team-a/**"])
    } else {
        serde_json::json!(["team-a/**", "base/*"])
    };
    assert_eq!(list[0]["repositories"], shown);
    assert_eq!(list[1]["repositories"], serde_json::json!(["team-b/**"]));
    assert!(list[0]["expiresAt"].as_u64().unwrap() > list[0]["issuedAt"].as_u64().unwrap());
    let out = cli(&[
        "token",
        "list",
        "--tokens",
        env.tokens.to_str().unwrap(),
        "--admin",
        &admin,
        "--admin-ca-file",
        env.pki.ca_cert.to_str().unwrap(),
        "-o",
        "json",
    ]);
    let mut lines = out.lines();
    let tokens: Value = serde_json::from_str(lines.next().unwrap()).unwrap();
    assert_eq!(tokens[0]["name"], "admin");
    let namespaces: Value = serde_json::from_str(lines.next().unwrap()).unwrap();
    assert_eq!(namespaces[1]["namespace"], "team-b");
    assert_eq!(
        namespaces[1]["repositories"],
        serde_json::json!(["team-b/**"])
    );
    let text = cli(&[
        "token",
        "list",
        "--tokens",
        env.tokens.to_str().unwrap(),
        "--admin",
        &admin,
        "--admin-ca-file",
        env.pki.ca_cert.to_str().unwrap(),
    ]);

    // No credential text in the log, the metrics or the listings: neither whole nor its
    // signature nor its payload.
    let log = env.reg.log_text();
    let metrics = env.metrics();
    for c in [
        &cred_a, &cred_b, &expired, &revoked, &wrong_key, &tampered, &bad_sig, &wide,
    ] {
        let parts: Vec<&str> = c.split('.').collect();
        for secret in [c.as_str(), parts[3], parts[2]] {
            for (what, hay) in [
                ("log", &log),
                ("metrics", &metrics),
                ("token list", &text),
                ("token list json", &out),
            ] {
                assert!(!hay.contains(secret), "{what} holds credential text");
            }
        }
    }
}

/// The `outpost_http_requests_total` count of manifest requests (HEAD or GET) answered with
/// `status`.
fn manifest_gets(metrics: &str, status: &str) -> f64 {
    samples(metrics)
        .iter()
        .filter(|s| {
            s.name == "outpost_http_requests_total"
                && s.labels.get("route").map(String::as_str) == Some("manifests")
                && s.labels.get("status").map(String::as_str) == Some(status)
        })
        .map(|s| s.value)
        .sum()
}

#[test]
fn containerd_falls_back_to_the_upstream_outside_the_scope() {
    let env = setup();
    let host = format!("127.0.0.1:{}", env.reg.port);
    let certs = env.certs_dir();
    let certs_s = certs.to_str().unwrap();
    // The upstream: a plain loopback registry anyone may pull from, holding team-b/app only.
    let upstream = Registry::start();
    let up = upstream.host();
    let layout = Layout::new(env.dir.path());
    layout.add_image("a", "amd64", &[("etc/who", b"team-a".to_vec())]);
    layout.add_image("b", "amd64", &[("etc/who", b"team-b".to_vec())]);
    let src = |tag: &str| format!("oci:{}:{tag}", layout.path.display());
    // Outpost holds both; the upstream only team-b's.
    for (tag, repo) in [("a", "team-a/app"), ("b", "team-b/app")] {
        let out = env.skopeo(&[
            "copy",
            "--dest-cert-dir",
            certs_s,
            "--dest-creds",
            &format!("admin:{}", env.admin_pw),
            &src(tag),
            &format!("docker://{host}/{repo}:v1"),
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = env.skopeo(&[
        "copy",
        "--dest-tls-verify=false",
        &src("b"),
        &format!("docker://{up}/team-b/app:v1"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cred_a = mint(&env.keys, "team-a", "team-a/**", "1h");

    // containerd's hosts.toml for the upstream: Outpost first as a mirror, then the upstream.
    let ctd = Containerd::start();
    let hosts_dir = env.dir.path().join("hosts");
    std::fs::create_dir_all(hosts_dir.join(&up)).unwrap();
    std::fs::write(
        hosts_dir.join(&up).join("hosts.toml"),
        format!(
            "server = \"http://{up}\"\n\
             [host.\"https://{host}\"]\n  capabilities = [\"pull\", \"resolve\"]\n  ca = \"{}\"\n",
            env.pki.ca_cert.display()
        ),
    )
    .unwrap();
    let hosts_s = hosts_dir.to_str().unwrap();
    let pull = |repo: &str| {
        ctd.ctr(&[
            "image",
            "pull",
            "--snapshotter",
            "native",
            "--hosts-dir",
            hosts_s,
            "--user",
            &format!("team-a:{cred_a}"),
            &format!("{up}/{repo}:v1"),
        ])
    };
    let before = manifest_gets(&env.metrics(), "404");
    let up_before = manifest_gets(&upstream_metrics(&upstream), "200");
    // In scope: Outpost serves it (the upstream does not even have it).
    pull("team-a/app");
    // Outside: Outpost answers 404 on the mirror path and containerd pulls from the upstream.
    pull("team-b/app");
    let list = ctd.ctr(&["image", "ls", "-q"]);
    assert!(list.contains(&format!("{up}/team-a/app:v1")), "{list}");
    assert!(list.contains(&format!("{up}/team-b/app:v1")), "{list}");
    let digest_of = |tag: &str| {
        layout.descriptor(tag)["digest"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let images = ctd.ctr(&["image", "ls"]);
    for (repo, tag) in [("team-a/app", "a"), ("team-b/app", "b")] {
        let line = images
            .lines()
            .find(|l| l.starts_with(&format!("{up}/{repo}:v1")))
            .unwrap();
        assert!(line.contains(&digest_of(tag)), "{line}");
    }
    assert!(manifest_gets(&env.metrics(), "404") > before);
    assert!(manifest_gets(&upstream_metrics(&upstream), "200") > up_before);
    assert!(env.ns_count("accepted", "team-a") >= 1.0);
}

fn upstream_metrics(reg: &Registry) -> String {
    reqwest::blocking::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(format!("{}/metrics", reg.url()))
        .send()
        .unwrap()
        .text()
        .unwrap()
}

/// The two pods of one unchanged Deployment, as kubelet pulls their images through the CRI
/// (the pod's pull secret sent as username and password, no server address). In `team-a` the
/// webhook moved the image to Outpost and the pod's secret holds team-a's credential: Outpost
/// serves it and the upstream is not asked. In `team-b` the webhook left the image on its
/// upstream (outside team-b's scope; see the webhook's `only_images_within_the_namespace_scope_move`),
/// whose only credential is team-b's own: containerd tries Outpost as the node's mirror
/// (no node credential: the chart's default `nodeScope: []`), is refused, and pulls from the
/// upstream with team-b's credential. team-b's Outpost credential on the moved name is refused.
#[test]
fn team_b_falls_back_to_an_upstream_requiring_its_own_credentials() {
    let env = setup();
    let host = format!("127.0.0.1:{}", env.reg.port);
    let certs = env.certs_dir();
    let certs_s = certs.to_str().unwrap();
    // The upstream requires credentials: an anonymous pull there fails.
    let up_tokens = env.dir.path().join("upstream-tokens.toml");
    let pusher = client_token(
        &up_tokens,
        "pusher",
        "**",
        &[
            "content/read",
            "content/write",
            "metadata/read",
            "metadata/write",
        ],
    );
    let team_b_upstream = client_token(
        &up_tokens,
        "team-b",
        "team-a/**",
        &["content/read", "metadata/read"],
    );
    let upstream = Registry::start_with_args(&["--tokens", up_tokens.to_str().unwrap()]);
    let up = format!("127.0.0.1:{}", upstream.port);
    let layout = Layout::new(env.dir.path());
    layout.add_image("v1", "amd64", &[("etc/who", b"the app".to_vec())]);
    let src = format!("oci:{}:v1", layout.path.display());
    for (dest, flags) in [
        (
            format!("docker://{host}/team-a/app:v1"),
            vec![
                "--dest-cert-dir".to_owned(),
                certs_s.to_owned(),
                "--dest-creds".to_owned(),
                format!("admin:{}", env.admin_pw),
            ],
        ),
        (
            format!("docker://{up}/team-a/app:v1"),
            vec![
                "--dest-tls-verify=false".to_owned(),
                "--dest-creds".to_owned(),
                format!("pusher:{pusher}"),
            ],
        ),
    ] {
        let mut args = vec!["copy".to_owned()];
        args.extend(flags);
        args.push(src.clone());
        args.push(dest);
        let argv: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = env.skopeo(&argv);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let cred_a = mint(&env.keys, "team-a", "team-a/**", "1h");
    let cred_b = mint(&env.keys, "team-b", "team-b/**", "1h");

    // The node: containerd's CRI reads hosts.toml files, as the node agent writes them: Outpost
    // trusted by its CA, and Outpost as the mirror of the upstream.
    let root = tempfile::tempdir().unwrap();
    let ctrd = CriContainerd::start(root.path());
    let hosts = root.path().join("etc/containerd/certs.d");
    let ca = env.pki.ca_cert.display();
    for (dir, text) in [
        (
            host.clone(),
            format!("server = \"https://{host}\"\n[host.\"https://{host}\"]\n  ca = \"{ca}\"\n"),
        ),
        (
            up.clone(),
            format!(
                "server = \"http://{up}\"\n\
                 [host.\"https://{host}\"]\n  capabilities = [\"pull\", \"resolve\"]\n  ca = \"{ca}\"\n"
            ),
        ),
    ] {
        std::fs::create_dir_all(hosts.join(&dir)).unwrap();
        std::fs::write(hosts.join(&dir).join("hosts.toml"), text).unwrap();
    }
    let pull = |image: &str, auth: Option<(&str, &str)>| {
        cri::pull_image_as(&ctrd.socket, image, auth, Duration::from_secs(60))
    };
    let upstream_gets = || manifest_gets(&upstream_metrics(&upstream), "200");
    // Without a node credential the mirror request is anonymous: Outpost challenges (401);
    // the token request containerd then makes with the pod's credential (kubelet's carry no
    // server address) is refused, and containerd tries the next host.
    let refused_as_mirror = || {
        let m = env.metrics();
        manifest_gets(&m, "401") + manifest_gets(&m, "404")
    };

    // team-a's pod: the moved image, with team-a's secret, from Outpost alone.
    let up_before = upstream_gets();
    let image_a = pull(&format!("{host}/team-a/app:v1"), Some(("team-a", &cred_a)))
        .unwrap_or_else(|e| panic!("team-a's CRI pull: {e}\n{}", ctrd.log_text()));
    assert!(image_a.starts_with("sha256:"), "{image_a}");
    assert_eq!(
        upstream_gets(),
        up_before,
        "team-a's pull reached the upstream"
    );
    assert!(env.ns_count("accepted", "team-a") >= 1.0);

    // team-b's credential cannot take the moved name from Outpost.
    let denied = pull(&format!("{host}/team-a/app:v1"), Some(("team-b", &cred_b)))
        .expect_err("team-b pulled team-a's image from Outpost");
    assert!(
        denied.contains("403") || denied.contains("denied"),
        "{denied}"
    );

    // Without credentials the upstream refuses: the fallback below works by team-b's own.
    let image = format!("{up}/team-a/app:v1");
    pull(&image, None).expect_err("the upstream served an anonymous pull");

    // team-b's pod: the upstream name and team-b's upstream credential. Outpost, tried first
    // as the mirror, refuses; the upstream serves it.
    let (up_before, refused_before) = (upstream_gets(), refused_as_mirror());
    let b_before = env.ns_count("accepted", "team-b");
    let image_b = pull(&image, Some(("team-b", &team_b_upstream)))
        .unwrap_or_else(|e| panic!("team-b's CRI pull: {e}\n{}", ctrd.log_text()));
    assert_eq!(image_b, image_a, "the same image either way");
    assert!(
        refused_as_mirror() > refused_before,
        "Outpost was not tried"
    );
    assert!(upstream_gets() > up_before, "the upstream did not serve it");
    // Outpost took nothing from team-b's upstream credential.
    assert_eq!(env.ns_count("accepted", "team-b"), b_before);
}
