//! Client tokens, scope maps and TLS, end to end over HTTPS: the scope matrix with Basic and
//! bearer credentials, token edits without restart, real clients (skopeo, containerd), certificate
//! rotation under load, and hostile input.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use outpost_e2e::{
    Containerd, Layout, Registry, TestPki, bin, header, pseudo_random, require, run_ok,
    run_timeout, sha256,
};
use reqwest::StatusCode;
use reqwest::blocking::{Client, RequestBuilder, Response};
use serde_json::{Value, json};

struct Tokens {
    path: PathBuf,
}

impl Tokens {
    fn cli(&self, args: &[&str]) -> String {
        run_ok(
            Command::new(bin("outpost-registry"))
                .args(args)
                .arg("--tokens")
                .arg(&self.path),
        )
    }

    /// Creates a token and returns its password1.
    fn token(&self, name: &str, scope_map: &str) -> String {
        let out = self.cli(&[
            "token",
            "create",
            "--name",
            name,
            "--scope-map",
            scope_map,
            "-o",
            "json",
        ]);
        let v: Value = serde_json::from_str(&out).unwrap();
        v["password1"].as_str().unwrap().to_owned()
    }
}

struct Env {
    reg: Registry,
    pki: TestPki,
    tokens: Tokens,
    _dir: tempfile::TempDir,
    admin_pw: String,
    full_pw: String,
    reader_pw: String,
    disabled_pw: String,
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

fn setup(extra: &[&str]) -> Env {
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::create(dir.path());
    let tokens = Tokens {
        path: dir.path().join("tokens.toml"),
    };
    tokens.cli(&[
        "scope-map",
        "create",
        "--name",
        "admin",
        "--repository",
        "**",
        "content/read",
        "content/write",
        "content/delete",
        "metadata/read",
        "metadata/write",
    ]);
    tokens.cli(&[
        "scope-map",
        "create",
        "--name",
        "in-full",
        "--repository",
        "in/**",
        "content/read",
        "content/write",
        "content/delete",
        "metadata/read",
    ]);
    tokens.cli(&[
        "scope-map",
        "create",
        "--name",
        "in-read",
        "--repository",
        "in/**",
        "content/read",
    ]);
    let admin_pw = tokens.token("admin", "admin");
    let full_pw = tokens.token("full", "in-full");
    let reader_pw = tokens.token("reader", "in-read");
    let disabled_pw = tokens.token("disabled", "in-full");
    tokens.cli(&[
        "token", "update", "--name", "disabled", "--status", "disabled",
    ]);
    let mut args = vec![
        "--tls-cert".to_owned(),
        pki.cert.display().to_string(),
        "--tls-key".to_owned(),
        pki.key.display().to_string(),
        "--tokens".to_owned(),
        tokens.path.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let reg = Registry::start_with_args(&argv);
    Env {
        reg,
        pki,
        tokens,
        _dir: dir,
        admin_pw,
        full_pw,
        reader_pw,
        disabled_pw,
    }
}

impl Env {
    fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.reg.port)
    }

    fn client(&self) -> Client {
        https_client(&self.pki.ca_cert)
    }

    /// Pushes a small image with the admin token, over Basic.
    fn push_image(&self, repo: &str, tag: &str, seed: u64) {
        let c = self.client();
        let basic = |r: RequestBuilder| r.basic_auth("admin", Some(&self.admin_pw));
        let push = |data: Vec<u8>| {
            let d = sha256(&data);
            let r = basic(c.post(self.url(&format!("/v2/{repo}/blobs/uploads/?digest={d}"))))
                .body(data)
                .send()
                .unwrap();
            assert_eq!(r.status(), StatusCode::CREATED);
            d
        };
        let config = push(b"{}".to_vec());
        let layer = push(pseudo_random(seed, 1000));
        let m = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config, "size": 2},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": layer, "size": 1000}],
        }))
        .unwrap();
        let r = basic(c.put(self.url(&format!("/v2/{repo}/manifests/{tag}"))))
            .header("content-type", "application/vnd.oci.image.manifest.v1+json")
            .body(m)
            .send()
            .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED);
    }
}

fn code(r: Response) -> (StatusCode, String) {
    let status = r.status();
    let body: Value = r.json().unwrap_or(Value::Null);
    (
        status,
        body["errors"][0]["code"].as_str().unwrap_or("").to_owned(),
    )
}

/// Parses `Bearer realm="..",service="..",scope=".."`.
fn challenge(r: &Response) -> Vec<(String, String)> {
    let h = header(r, "www-authenticate");
    let rest = h
        .strip_prefix("Bearer ")
        .unwrap_or_else(|| panic!("bearer challenge: {h:?}"));
    let mut out = Vec::new();
    let mut s = rest;
    while let Some(eq) = s.find('=') {
        let key = s[..eq].trim_start_matches(',').trim().to_owned();
        let after = &s[eq + 2..];
        let end = after.find('"').unwrap();
        out.push((key, after[..end].to_owned()));
        s = &after[end + 1..];
    }
    out
}

#[derive(Clone, Copy, Debug)]
enum Cred<'a> {
    None,
    Valid(&'a str, &'a str),
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Scheme {
    Basic,
    Bearer,
}

/// Sends a request the way a registry client does: Basic directly, or bearer by following
/// the 401 challenge to the token endpoint.
fn send(
    env: &Env,
    scheme: Scheme,
    cred: Cred,
    make: &dyn Fn(&Client) -> RequestBuilder,
) -> Response {
    let c = env.client();
    match (scheme, cred) {
        (_, Cred::None) => make(&c).send().unwrap(),
        (Scheme::Basic, Cred::Valid(u, p)) => make(&c).basic_auth(u, Some(p)).send().unwrap(),
        (Scheme::Bearer, Cred::Valid(u, p)) => {
            let first = make(&c).send().unwrap();
            if first.status() != StatusCode::UNAUTHORIZED {
                return first;
            }
            let ch = challenge(&first);
            let get = |k: &str| ch.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone());
            let realm = get("realm").unwrap();
            let mut q = vec![("service", get("service").unwrap())];
            if let Some(scope) = get("scope") {
                q.push(("scope", scope));
            }
            let t = c
                .get(&realm)
                .query(&q)
                .basic_auth(u, Some(p))
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
    }
}

#[test]
fn scope_matrix() {
    // Every failed case below comes from this one address: let them all through the limiter.
    let env = setup(&["--max-auth-failures", "1000"]);
    env.push_image("in/app", "v1", 1);
    env.push_image("out/app", "v1", 2);
    type Make = Box<dyn Fn(&Client, &str) -> RequestBuilder>;
    let actions: Vec<(&str, Make, StatusCode)> = vec![
        (
            "content/read",
            Box::new(|c: &Client, u: &str| c.get(format!("{u}/manifests/v1"))),
            StatusCode::OK,
        ),
        (
            "content/write",
            Box::new(|c: &Client, u: &str| c.post(format!("{u}/blobs/uploads/"))),
            StatusCode::ACCEPTED,
        ),
        (
            // Authorised, then the missing tag: 404 proves the decision was yes.
            "content/delete",
            Box::new(|c: &Client, u: &str| c.delete(format!("{u}/manifests/no-such-tag"))),
            StatusCode::NOT_FOUND,
        ),
        (
            "metadata/read",
            Box::new(|c: &Client, u: &str| c.get(format!("{u}/tags/list"))),
            StatusCode::OK,
        ),
    ];
    let mut checked = 0;
    for scheme in [Scheme::Basic, Scheme::Bearer] {
        for (action, make, ok_status) in &actions {
            for repo in ["in/app", "out/app"] {
                let base = env.url(&format!("/v2/{repo}"));
                let mk = |c: &Client| make(c, &base);
                let cases: Vec<(&str, Cred, StatusCode, &str)> = vec![
                    ("none", Cred::None, StatusCode::UNAUTHORIZED, "UNAUTHORIZED"),
                    (
                        "invalid",
                        Cred::Valid("full", "wrong-password"),
                        StatusCode::UNAUTHORIZED,
                        "UNAUTHORIZED",
                    ),
                    (
                        "disabled",
                        Cred::Valid("disabled", &env.disabled_pw),
                        StatusCode::UNAUTHORIZED,
                        "UNAUTHORIZED",
                    ),
                    (
                        "valid",
                        Cred::Valid("full", &env.full_pw),
                        if repo == "in/app" {
                            *ok_status
                        } else {
                            StatusCode::FORBIDDEN
                        },
                        if repo == "in/app" { "" } else { "DENIED" },
                    ),
                    (
                        "read-only token",
                        Cred::Valid("reader", &env.reader_pw),
                        if repo == "in/app" && *action == "content/read" {
                            StatusCode::OK
                        } else {
                            StatusCode::FORBIDDEN
                        },
                        if repo == "in/app" && *action == "content/read" {
                            ""
                        } else {
                            "DENIED"
                        },
                    ),
                ];
                for (what, cred, want_status, want_code) in cases {
                    let r = send(&env, scheme, cred, &mk);
                    let challenge_hdr = header(&r, "www-authenticate");
                    let (status, got_code) = code(r);
                    let ctx = format!("{scheme:?} {what} {action} on {repo}");
                    assert_eq!(status, want_status, "{ctx}");
                    if !want_code.is_empty() {
                        assert_eq!(got_code, want_code, "{ctx}");
                    }
                    if status == StatusCode::UNAUTHORIZED {
                        assert!(
                            challenge_hdr.starts_with("Bearer realm=\"https://127.0.0.1:"),
                            "{ctx}: {challenge_hdr}"
                        );
                        assert!(challenge_hdr.contains("service=\"outpost\""), "{ctx}");
                    }
                    checked += 1;
                }
            }
        }
    }
    assert_eq!(checked, 2 * 4 * 2 * 5);

    // The catalog lists only what the caller may read.
    let r = send(
        &env,
        Scheme::Basic,
        Cred::Valid("full", &env.full_pw),
        &|c: &Client| c.get(env.url("/v2/_catalog")),
    );
    let v: Value = r.json().unwrap();
    assert_eq!(v["repositories"], json!(["in/app"]));
    let r = send(
        &env,
        Scheme::Bearer,
        Cred::Valid("admin", &env.admin_pw),
        &|c: &Client| c.get(env.url("/v2/_catalog")),
    );
    let v: Value = r.json().unwrap();
    assert_eq!(v["repositories"], json!(["in/app", "out/app"]));
    let r = send(
        &env,
        Scheme::Basic,
        Cred::Valid("reader", &env.reader_pw),
        &|c: &Client| c.get(env.url("/v2/_catalog")),
    );
    assert_eq!(code(r), (StatusCode::FORBIDDEN, "DENIED".into()));
    // /v2/ answers 401 with a challenge, then 200 with any valid credentials.
    let r = env.client().get(env.url("/v2/")).send().unwrap();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let r = send(
        &env,
        Scheme::Basic,
        Cred::Valid("reader", &env.reader_pw),
        &|c: &Client| c.get(env.url("/v2/")),
    );
    assert_eq!(r.status(), StatusCode::OK);
}

#[test]
fn token_edits_apply_without_restart() {
    let env = setup(&[]);
    env.push_image("in/app", "v1", 3);
    let get = |user: &str, pw: &str| {
        env.client()
            .get(env.url("/v2/in/app/manifests/v1"))
            .basic_auth(user, Some(pw))
            .send()
            .unwrap()
            .status()
    };
    assert_eq!(get("full", &env.full_pw), StatusCode::OK);
    // Rotation: a password2 first, then password1 regenerated.
    let out = env.tokens.cli(&[
        "token",
        "update",
        "--name",
        "full",
        "--generate-password",
        "2",
        "-o",
        "json",
    ]);
    let pw2 = serde_json::from_str::<Value>(&out).unwrap()["password2"]
        .as_str()
        .unwrap()
        .to_owned();
    outpost_e2e::wait_until("password2 accepted", Duration::from_secs(15), || {
        get("full", &pw2) == StatusCode::OK
    });
    let out = env.tokens.cli(&[
        "token",
        "update",
        "--name",
        "full",
        "--generate-password",
        "1",
        "-o",
        "json",
    ]);
    let new1 = serde_json::from_str::<Value>(&out).unwrap()["password1"]
        .as_str()
        .unwrap()
        .to_owned();
    outpost_e2e::wait_until("old password1 refused", Duration::from_secs(15), || {
        get("full", &env.full_pw) == StatusCode::UNAUTHORIZED
    });
    assert_eq!(get("full", &pw2), StatusCode::OK);
    assert_eq!(get("full", &new1), StatusCode::OK);
    // Disable and re-enable.
    env.tokens
        .cli(&["token", "update", "--name", "full", "--status", "disabled"]);
    outpost_e2e::wait_until("disabled token refused", Duration::from_secs(15), || {
        get("full", &new1) == StatusCode::UNAUTHORIZED
    });
    env.tokens
        .cli(&["token", "update", "--name", "full", "--status", "enabled"]);
    outpost_e2e::wait_until("enabled token accepted", Duration::from_secs(15), || {
        get("full", &new1) == StatusCode::OK
    });
    // Scope changes apply to bearer tokens already issued too.
    env.tokens.cli(&[
        "scope-map",
        "update",
        "--name",
        "in-full",
        "--remove-repository",
        "in/**",
        "content/read",
    ]);
    outpost_e2e::wait_until("scope narrowed", Duration::from_secs(15), || {
        get("full", &new1) == StatusCode::FORBIDDEN
    });
    // A broken file keeps the last good tokens.
    std::fs::write(&env.tokens.path, "this is [not toml").unwrap();
    std::thread::sleep(Duration::from_secs(3));
    assert_eq!(get("reader", &env.reader_pw), StatusCode::OK);
    assert!(env.reg.log_text().contains("keeping the previous tokens"));
    // Plaintext passwords are never echoed in the log.
    assert!(!env.reg.log_text().contains(&env.reader_pw));
}

#[test]
fn readonly_mode_and_anonymous_pull() {
    let env = setup(&["--mode", "readonly", "--anonymous-pull"]);
    // Every push is DENIED, whatever the credentials.
    for admin in [true, false] {
        let mut req = env.client().post(env.url("/v2/in/app/blobs/uploads/"));
        if admin {
            req = req.basic_auth("admin", Some(&env.admin_pw));
        }
        assert_eq!(
            code(req.send().unwrap()),
            (StatusCode::FORBIDDEN, "DENIED".into())
        );
    }
    // Anonymous pulls are allowed (the repository is empty: 404, not 401).
    let r = env
        .client()
        .get(env.url("/v2/in/app/manifests/v1"))
        .send()
        .unwrap();
    assert_eq!(code(r), (StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN".into()));
    let r = env.client().get(env.url("/v2/_catalog")).send().unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    // A bearer token asked for push gets pull only.
    let t: Value = env
        .client()
        .get(env.url("/oauth2/token?service=outpost&scope=repository:in/app:pull,push"))
        .basic_auth("admin", Some(&env.admin_pw))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let payload = t["token"]
        .as_str()
        .unwrap()
        .split('.')
        .nth(1)
        .unwrap()
        .to_owned();
    let claims = String::from_utf8(base64_url(&payload)).unwrap();
    assert!(
        claims.contains("content/read") && !claims.contains("content/write"),
        "{claims}"
    );
}

fn base64_url(s: &str) -> Vec<u8> {
    let table = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut bits = 0u32;
    let mut n = 0;
    let mut out = Vec::new();
    for c in s.bytes() {
        let v = table.iter().position(|t| *t == c).unwrap() as u32;
        bits = (bits << 6) | v;
        n += 6;
        if n >= 8 {
            n -= 8;
            out.push((bits >> n) as u8);
            bits &= (1 << n) - 1;
        }
    }
    out
}

#[test]
fn oauth2_password_grant_and_token_endpoint_errors() {
    let env = setup(&[]);
    let c = env.client();
    let r = c
        .post(env.url("/oauth2/token"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!(
            "grant_type=password&username=full&password={}&service=outpost&scope=repository%3Ain%2Fapp%3Apull&client_id=test",
            env.full_pw
        ))
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "cache-control"), "no-store");
    let v: Value = r.json().unwrap();
    assert!(
        v["access_token"].is_string() && v["expires_in"] == 300,
        "{v}"
    );
    assert!(v["issued_at"].as_str().unwrap().ends_with('Z'));
    let r = c
        .post(env.url("/oauth2/token"))
        .body("grant_type=refresh_token&refresh_token=x")
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    // Wrong password, another service, no credentials (no anonymous access configured).
    let r = c
        .get(env.url("/oauth2/token?service=outpost"))
        .basic_auth("full", Some("nope"))
        .send()
        .unwrap();
    assert_eq!(code(r).0, StatusCode::UNAUTHORIZED);
    let r = c
        .get(env.url("/oauth2/token?service=elsewhere&scope=repository:in/app:pull"))
        .basic_auth("full", Some(&env.full_pw))
        .send()
        .unwrap();
    assert_eq!(code(r), (StatusCode::FORBIDDEN, "DENIED".into()));
    let r = c
        .get(env.url("/oauth2/token?service=outpost"))
        .send()
        .unwrap();
    assert_eq!(code(r).0, StatusCode::UNAUTHORIZED);
}

#[test]
fn hostile_authorization_is_a_clear_4xx() {
    let env = setup(&[]);
    env.push_image("in/app", "v1", 4);
    let c = env.client();
    let url = env.url("/v2/in/app/manifests/v1");
    let other = setup(&[]);
    let foreign: Value = other
        .client()
        .get(other.url("/oauth2/token?service=outpost&scope=repository:in/app:pull"))
        .basic_auth("full", Some(&other.full_pw))
        .send()
        .unwrap()
        .json()
        .unwrap();
    let foreign = foreign["token"].as_str().unwrap().to_owned();
    let mut tampered = foreign.clone();
    tampered.push('x');
    let long = format!("Basic {}", "A".repeat(20_000));
    let headers: Vec<String> = vec![
        "Basic".into(),
        "Basic !!!notbase64!!!".into(),
        "Basic bm9jb2xvbg==".into(),
        "Bearer".into(),
        "Bearer a.b".into(),
        "Bearer e30.e30.e30".into(),
        format!("Bearer {foreign}"),
        format!("Bearer {tampered}"),
        "Negotiate abc".into(),
        long,
    ];
    for h in &headers {
        let r = c.get(&url).header("authorization", h).send().unwrap();
        let status = r.status();
        // Over HTTP/2 (reqwest negotiates it when its `http2` feature is on, which object_store
        // turns on in the workspace build) the 20 KB header exceeds the server's 16 KiB header
        // list limit and hyper answers 431 before auth sees it: as clear a 4xx, never a pass.
        let too_large =
            h.len() > 16 * 1024 && status == StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE;
        assert!(
            status == StatusCode::UNAUTHORIZED
                || status == StatusCode::TOO_MANY_REQUESTS
                || too_large,
            "{}: {status}",
            &h[..h.len().min(40)]
        );
    }
    // Non-UTF-8 bytes and an oversized header block.
    let r = c
        .get(&url)
        .header(
            "authorization",
            reqwest::header::HeaderValue::from_bytes(b"Basic \xff\xfe").unwrap(),
        )
        .send()
        .unwrap();
    assert!(r.status().is_client_error());
    let r = c
        .get(&url)
        .header("x-padding", "p".repeat(1024 * 1024))
        .send();
    assert!(r.map(|r| r.status().is_client_error()).unwrap_or(true));
    // After a burst of failures this address is throttled; the server stayed up throughout.
    for _ in 0..25 {
        let _ = c.get(&url).basic_auth("full", Some("guess")).send();
    }
    let r = c
        .get(&url)
        .basic_auth("full", Some(&env.full_pw))
        .send()
        .unwrap();
    assert_eq!(code(r).1, "TOOMANYREQUESTS");
    assert!(env.reg.log_text().find("panicked").is_none());
    let metrics = c.get(env.url("/metrics")).send().unwrap().text().unwrap();
    assert!(!metrics.contains("status=\"500\""));
}

#[test]
fn skopeo_and_containerd_authenticate_over_https() {
    let env = setup(&[]);
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs.d");
    std::fs::create_dir_all(&certs).unwrap();
    std::fs::copy(&env.pki.ca_cert, certs.join("ca.crt")).unwrap();
    let layout = Layout::new(dir.path());
    layout.add_image("v1", "amd64", &[("etc/hello", b"auth".to_vec())]);
    let src = format!("oci:{}:v1", layout.path.display());
    let dst = format!("docker://127.0.0.1:{}/in/app:v1", env.reg.port);
    let skopeo = |args: &[&str]| {
        run_timeout(
            Command::new(require("skopeo"))
                .arg("--insecure-policy")
                .args(args),
            Duration::from_secs(120),
        )
    };
    let certs_s = certs.to_str().unwrap();
    // A read-only token cannot push.
    let out = skopeo(&[
        "copy",
        "--dest-cert-dir",
        certs_s,
        "--dest-creds",
        &format!("reader:{}", env.reader_pw),
        &src,
        &dst,
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(err.contains("denied"), "{err}");
    // The full token can, and pull back with bearer tokens.
    let out = skopeo(&[
        "copy",
        "--dest-cert-dir",
        certs_s,
        "--dest-creds",
        &format!("full:{}", env.full_pw),
        &src,
        &dst,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = skopeo(&[
        "inspect",
        "--raw",
        "--cert-dir",
        certs_s,
        "--creds",
        &format!("reader:{}", env.reader_pw),
        &dst,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(sha256(&out.stdout), layout.descriptor("v1")["digest"]);
    // Without credentials: refused.
    let out = skopeo(&["inspect", "--raw", "--cert-dir", certs_s, &dst]);
    assert!(!out.status.success());

    // containerd pulls with --user through the bearer flow, verifying our CA (named in a
    // hosts.toml, since ctr would try plain HTTP on a loopback address otherwise).
    let ctd = Containerd::start();
    let host = format!("127.0.0.1:{}", env.reg.port);
    let hosts_dir = dir.path().join("hosts");
    std::fs::create_dir_all(hosts_dir.join(&host)).unwrap();
    std::fs::write(
        hosts_dir.join(&host).join("hosts.toml"),
        format!(
            "server = \"https://{host}\"\n[host.\"https://{host}\"]\n  capabilities = [\"pull\", \"resolve\"]\n  ca = \"{}\"\n",
            env.pki.ca_cert.display()
        ),
    )
    .unwrap();
    let image = format!("{host}/in/app:v1");
    let hosts_s = hosts_dir.to_str().unwrap();
    ctd.ctr(&[
        "image",
        "pull",
        "--snapshotter",
        "native",
        "--hosts-dir",
        hosts_s,
        "--user",
        &format!("reader:{}", env.reader_pw),
        &image,
    ]);
    let list = ctd.ctr(&["image", "ls", "-q"]);
    assert!(list.contains(&image), "{list}");
    // And is refused with a wrong password.
    let out = run_timeout(
        Command::new(require("ctr"))
            .arg("--address")
            .arg(&ctd.socket)
            .args([
                "image",
                "pull",
                "--snapshotter",
                "native",
                "--hosts-dir",
                hosts_s,
                "--user",
                "reader:wrong",
            ])
            .arg(&image),
        Duration::from_secs(60),
    );
    assert!(!out.status.success());
}

#[test]
fn certificate_rotation_keeps_in_flight_downloads() {
    let env = setup(&[]);
    // A 48 MiB blob to download slowly while the certificate changes.
    let data = pseudo_random(5, 48 * 1024 * 1024);
    let d = sha256(&data);
    let r = env
        .client()
        .post(env.url(&format!("/v2/in/big/blobs/uploads/?digest={d}")))
        .basic_auth("full", Some(&env.full_pw))
        .body(data.clone())
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    let mut download = env
        .client()
        .get(env.url(&format!("/v2/in/big/blobs/{d}")))
        .basic_auth("full", Some(&env.full_pw))
        .send()
        .unwrap();
    let mut got = vec![0u8; 1024 * 1024];
    let mut n = 0;
    while n < got.len() {
        n += std::io::Read::read(&mut download, &mut got[n..]).unwrap();
    }
    // A second CA and certificate, swapped in the way a secret volume update does.
    let dir2 = tempfile::tempdir().unwrap();
    let pki2 = TestPki::create(dir2.path());
    let stage = env.pki.cert.with_extension("new");
    std::fs::copy(&pki2.key, &stage).unwrap();
    std::fs::rename(&stage, &env.pki.key).unwrap();
    std::fs::copy(&pki2.cert, &stage).unwrap();
    std::fs::rename(&stage, &env.pki.cert).unwrap();
    let new_client = https_client(&pki2.ca_cert);
    outpost_e2e::wait_until("new certificate served", Duration::from_secs(15), || {
        new_client.get(env.url("/v2/")).send().is_ok()
    });
    // Old CA no longer validates new connections.
    assert!(env.client().get(env.url("/v2/")).send().is_err());
    // The download that started before the rotation completes intact.
    let mut rest = Vec::new();
    std::io::Read::read_to_end(&mut download, &mut rest).unwrap();
    got.extend_from_slice(&rest);
    assert_eq!(got.len(), data.len());
    assert_eq!(sha256(&got), d);
}

#[test]
fn tokens_follow_a_kubernetes_secret_volume_swap() {
    // A secret volume: tokens.toml -> ..data/tokens.toml, ..data -> ..<timestamp>/; an update
    // writes a new timestamped directory and swaps the ..data symlink atomically.
    let env = setup(&[]);
    env.push_image("in/app", "v1", 6);
    let vol = env._dir.path().join("volume");
    let v1 = vol.join("..2026_11_22_v1");
    std::fs::create_dir_all(&v1).unwrap();
    std::fs::copy(&env.tokens.path, v1.join("tokens.toml")).unwrap();
    std::os::unix::fs::symlink("..2026_11_22_v1", vol.join("..data")).unwrap();
    std::os::unix::fs::symlink("..data/tokens.toml", vol.join("tokens.toml")).unwrap();
    let args = [
        "--tls-cert".to_owned(),
        env.pki.cert.display().to_string(),
        "--tls-key".to_owned(),
        env.pki.key.display().to_string(),
        "--tokens".to_owned(),
        vol.join("tokens.toml").display().to_string(),
    ];
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let reg = Registry::start_with_args(&argv);
    let get = |pw: &str| {
        env.client()
            .get(format!("https://127.0.0.1:{}/v2/", reg.port))
            .basic_auth("reader", Some(pw))
            .send()
            .unwrap()
            .status()
    };
    assert_eq!(get(&env.reader_pw), StatusCode::OK);
    // New content in a new directory, then the swap.
    let staged = Tokens {
        path: env._dir.path().join("staged.toml"),
    };
    std::fs::copy(&env.tokens.path, &staged.path).unwrap();
    let out = staged.cli(&[
        "token",
        "update",
        "--name",
        "reader",
        "--generate-password",
        "1",
        "-o",
        "json",
    ]);
    let new_pw = serde_json::from_str::<Value>(&out).unwrap()["password1"]
        .as_str()
        .unwrap()
        .to_owned();
    let v2 = vol.join("..2026_11_22_v2");
    std::fs::create_dir_all(&v2).unwrap();
    std::fs::copy(&staged.path, v2.join("tokens.toml")).unwrap();
    std::os::unix::fs::symlink("..2026_11_22_v2", vol.join("..data_tmp")).unwrap();
    std::fs::rename(vol.join("..data_tmp"), vol.join("..data")).unwrap();
    std::fs::remove_dir_all(&v1).unwrap();
    outpost_e2e::wait_until("swapped secret applied", Duration::from_secs(15), || {
        get(&new_pw) == StatusCode::OK
    });
    assert_eq!(get(&env.reader_pw), StatusCode::UNAUTHORIZED);
}

#[test]
fn expired_bearer_tokens_are_refused() {
    let env = setup(&["--token-lifetime", "1s"]);
    env.push_image("in/app", "v1", 7);
    let t: Value = env
        .client()
        .get(env.url("/oauth2/token?service=outpost&scope=repository:in/app:pull"))
        .basic_auth("reader", Some(&env.reader_pw))
        .send()
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(t["expires_in"], 1);
    let tok = t["token"].as_str().unwrap().to_owned();
    let get = || {
        env.client()
            .get(env.url("/v2/in/app/manifests/v1"))
            .bearer_auth(&tok)
            .send()
            .unwrap()
    };
    // Valid now (unless this machine stalled past the second), refused once it has passed.
    let first = get().status();
    assert!(first == StatusCode::OK || first == StatusCode::UNAUTHORIZED);
    std::thread::sleep(Duration::from_millis(2100));
    let r = get();
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    let body: Value = r.json().unwrap();
    assert!(
        body["errors"][0]["message"]
            .as_str()
            .unwrap()
            .contains("expired"),
        "{body}"
    );
}
