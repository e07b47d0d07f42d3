//! Talking to registries in the suites: a small OCI client, the admin API of a running
//! Outpost, and loading images into a registry with skopeo.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use reqwest::blocking::Client;
use serde_json::Value;

use crate::*;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json, application/vnd.oci.image.index.v1+json, application/vnd.docker.distribution.manifest.v2+json, application/vnd.docker.distribution.manifest.list.v2+json";
pub const MIB: u64 = 1024 * 1024;

/// GETs `url` and reads the body in 1 MiB pieces (constant memory for large blobs): the
/// status, how many bytes came and their digest (`sha256:…`). Panics if the request or the
/// body read fails.
pub fn get_digest(url: &str) -> (u16, u64, String) {
    let mut resp = http()
        .get(url)
        .send()
        .unwrap_or_else(|e| panic!("GET {url}: {e}"));
    let status = resp.status().as_u16();
    let mut ctx = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    // Bounded by the body's length; the client's timeout bounds a stalled body.
    loop {
        let k = std::io::Read::read(&mut resp, &mut buf)
            .unwrap_or_else(|e| panic!("GET {url}: body after {n} bytes: {e}"));
        if k == 0 {
            break;
        }
        ctx.update(&buf[..k]);
        n += k as u64;
    }
    let hex: String = ctx
        .finish()
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    (status, n, format!("sha256:{hex}"))
}

pub fn conn(name: &str, user: &str, pass: &str, host: &str, proto: &str) -> String {
    format!(
        "ConnectedRegistryName={name};SyncTokenName={user};SyncTokenPassword={pass};ParentGatewayEndpoint={host};ParentEndpointProtocol={proto}"
    )
}

pub fn client_with_ca(ca: Option<&Path>) -> Client {
    let mut b = Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(120));
    if let Some(ca) = ca {
        let cert = reqwest::Certificate::from_pem(&std::fs::read(ca).unwrap()).unwrap();
        b = b.tls_certs_only([cert]);
    }
    b.build().unwrap()
}

/// Where a registry is and how to talk to it.
pub struct Endpoint {
    pub base: String,
    pub client: Client,
    pub basic: Option<(String, String)>,
}

impl Endpoint {
    pub fn plain(host: &str) -> Self {
        Endpoint {
            base: format!("http://{host}"),
            client: client_with_ca(None),
            basic: None,
        }
    }

    pub fn get(&self, path: &str) -> reqwest::blocking::Response {
        let mut r = self
            .client
            .get(format!("{}{path}", self.base))
            .header("accept", ACCEPT);
        if let Some((u, p)) = &self.basic {
            r = r.basic_auth(u, Some(p));
        }
        r.send().unwrap()
    }

    /// A manifest's exact bytes, or None on 404.
    pub fn manifest(&self, repo: &str, reference: &str) -> Option<Vec<u8>> {
        let r = self.get(&format!("/v2/{repo}/manifests/{reference}"));
        match r.status().as_u16() {
            200 => Some(r.bytes().unwrap().to_vec()),
            404 => None,
            s => panic!("manifest {repo}:{reference}: HTTP {s}"),
        }
    }

    pub fn tags(&self, repo: &str) -> Vec<String> {
        let r = self.get(&format!("/v2/{repo}/tags/list"));
        if r.status() == 404 {
            return Vec::new();
        }
        let v: Value = r.json().unwrap();
        let mut t: Vec<String> = v["tags"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default();
        t.sort();
        t
    }

    pub fn catalog(&self) -> Vec<String> {
        let v: Value = self.get("/v2/_catalog").json().unwrap();
        v["repositories"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_str().unwrap().to_owned())
            .collect()
    }

    pub fn blob(&self, repo: &str, digest: &str) -> Vec<u8> {
        let r = self.get(&format!("/v2/{repo}/blobs/{digest}"));
        assert_eq!(r.status(), 200, "blob {repo}@{digest}");
        r.bytes().unwrap().to_vec()
    }

    /// Pushes a blob monolithically.
    pub fn push_blob(&self, repo: &str, data: &[u8]) -> String {
        let digest = sha256(data);
        let mut r = self
            .client
            .post(format!(
                "{}/v2/{repo}/blobs/uploads/?digest={digest}",
                self.base
            ))
            .header("content-type", "application/octet-stream")
            .body(data.to_vec());
        if let Some((u, p)) = &self.basic {
            r = r.basic_auth(u, Some(p));
        }
        let resp = r.send().unwrap();
        if resp.status() == 202 {
            // docker-registry 2.8 wants POST then PUT.
            let loc = header(&resp, "location");
            let url = if loc.starts_with("http") {
                loc
            } else {
                format!("{}{loc}", self.base)
            };
            let sep = if url.contains('?') { '&' } else { '?' };
            let mut r = self
                .client
                .put(format!("{url}{sep}digest={digest}"))
                .header("content-type", "application/octet-stream")
                .body(data.to_vec());
            if let Some((u, p)) = &self.basic {
                r = r.basic_auth(u, Some(p));
            }
            let resp = r.send().unwrap();
            assert_eq!(resp.status(), 201, "blob PUT: {}", resp.text().unwrap());
        } else {
            assert_eq!(resp.status(), 201, "blob POST");
        }
        digest
    }

    pub fn push_manifest(&self, repo: &str, reference: &str, media_type: &str, body: &[u8]) -> u16 {
        let mut r = self
            .client
            .put(format!("{}/v2/{repo}/manifests/{reference}", self.base))
            .header("content-type", media_type)
            .body(body.to_vec());
        if let Some((u, p)) = &self.basic {
            r = r.basic_auth(u, Some(p));
        }
        r.send().unwrap().status().as_u16()
    }

    pub fn delete_manifest(&self, repo: &str, digest: &str) {
        let r = self
            .client
            .delete(format!("{}/v2/{repo}/manifests/{digest}", self.base))
            .send()
            .unwrap();
        assert_eq!(r.status(), 202, "delete {repo}@{digest}");
    }
}

pub fn admin_status(reg: &Registry) -> Value {
    http()
        .get(format!(
            "http://127.0.0.1:{}/outpost/v1/status",
            reg.admin_port
        ))
        .send()
        .unwrap()
        .json()
        .unwrap()
}

/// Polls until `f` holds, at most `timeout`; panics with `what` and the registry's log.
pub fn wait_for(
    reg: &Registry,
    what: &str,
    timeout: Duration,
    mut f: impl FnMut(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let s = admin_status(reg);
        if f(&s) {
            return s;
        }
        if Instant::now() > deadline {
            panic!(
                "{what} not reached in {timeout:?}; status {s:#}\nlog:\n{}",
                reg.log_text()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits for a run numbered `min_run` or later to finish, and returns its result.
pub fn wait_run(reg: &Registry, min_run: u64, timeout: Duration) -> Value {
    wait_for(reg, &format!("sync run {min_run} finished"), timeout, |s| {
        !s["syncing"].as_bool().unwrap_or(true)
            && s["lastRun"]["number"].as_u64().unwrap_or(0) >= min_run
            && s["lastRun"]["result"].is_string()
    })
}

/// Waits for run `min_run` to finish, checks that it succeeded (the log shown if not), and
/// returns the status.
pub fn wait_run_success(reg: &Registry, min_run: u64, timeout: Duration) -> Value {
    let s = wait_run(reg, min_run, timeout);
    assert_eq!(
        s["lastRun"]["result"],
        "success",
        "{s:#}\n{}",
        reg.log_text()
    );
    s
}

pub fn last_run(s: &Value) -> u64 {
    s["lastRun"]["number"].as_u64().unwrap_or(0)
}

/// `outpost-registry <cmd> --admin <this registry's admin API>`.
pub fn admin_cli(reg: &Registry, args: &[&str]) -> std::process::Output {
    run_timeout(
        Command::new(bin("outpost-registry"))
            .args(args)
            .arg("--admin")
            .arg(format!("http://127.0.0.1:{}", reg.admin_port)),
        Duration::from_secs(120),
    )
}

/// Asks for a run now and waits until it ends successfully.
pub fn sync_now(reg: &Registry) {
    let out = admin_cli(reg, &["sync", "--wait", "--timeout", "90s"]);
    assert!(
        out.status.success(),
        "sync --wait failed: {}{}\nlog:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        reg.log_text()
    );
}

/// Derives image `new` from `base` in a layout by adding one layer with `files`; `base`'s
/// layers stay shared.
pub fn derive_image(layout: &Layout, base: &str, new: &str, files: &[(&str, Vec<u8>)]) {
    let umoci = require("umoci");
    let img = |t: &str| format!("{}:{t}", layout.path.display());
    let work = layout.path.with_file_name(format!("bundle-{new}"));
    run_ok(
        Command::new(&umoci)
            .args(["unpack", "--rootless", "--image", &img(base)])
            .arg(&work),
    );
    for (p, content) in files {
        let target = work.join("rootfs").join(p);
        std::fs::create_dir_all(target.parent().unwrap()).unwrap();
        std::fs::write(target, content).unwrap();
    }
    run_ok(
        Command::new(&umoci)
            .args(["repack", "--image", &img(new)])
            .arg(&work),
    );
    let _ = std::fs::remove_dir_all(&work);
}

pub fn manifest_json(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes).unwrap()
}

/// Copies `tag` of the layout into `repo:dest_tag` at a plain-HTTP registry.
pub fn load(layout: &Layout, tag: &str, host: &str, repo_tag: &str, extra: &[&str]) {
    let src = format!("oci:{}:{tag}", layout.path.display());
    let dst = format!("docker://{host}/{repo_tag}");
    let mut args = vec!["copy", "--all", "--dest-tls-verify=false"];
    args.extend_from_slice(extra);
    args.push(&src);
    args.push(&dst);
    skopeo(&args);
}

/// The value of a series (`name` or `name{k="v"}`) in a Prometheus text page; panics if absent.
pub fn metric(text: &str, name: &str) -> u64 {
    crate::metrics::sample(text, name).unwrap_or_else(|| panic!("no {name} in metrics")) as u64
}

/// The registry's metrics page.
pub fn metrics_text(reg: &Registry) -> String {
    http()
        .get(format!("{}/metrics", reg.url()))
        .send()
        .unwrap()
        .text()
        .unwrap()
}

/// Every tag and manifest (children of indexes too) of `repo` is byte-identical at `b`.
pub fn assert_repo_identical(a: &Endpoint, b: &Endpoint, repo: &str) {
    let tags = a.tags(repo);
    assert!(!tags.is_empty(), "{repo} has tags at the parent");
    assert_eq!(b.tags(repo), tags, "tags of {repo}");
    for t in &tags {
        let ma = a.manifest(repo, t).unwrap();
        let mb = b
            .manifest(repo, t)
            .unwrap_or_else(|| panic!("{repo}:{t} missing"));
        assert_eq!(sha256(&ma), sha256(&mb), "{repo}:{t} differs");
        assert_eq!(ma, mb);
        if let Some(children) = manifest_json(&ma)["manifests"].as_array() {
            for c in children {
                let d = c["digest"].as_str().unwrap();
                assert_eq!(b.manifest(repo, d), a.manifest(repo, d), "{repo}@{d}");
            }
        }
    }
}

/// Digest -> size of the distinct blobs under the given manifests (indexes followed).
pub fn blob_sizes(ep: &Endpoint, refs: &[(&str, &str)]) -> std::collections::BTreeMap<String, u64> {
    let mut seen = std::collections::BTreeMap::new();
    fn walk(
        ep: &Endpoint,
        repo: &str,
        reference: &str,
        seen: &mut std::collections::BTreeMap<String, u64>,
    ) {
        let m = manifest_json(&ep.manifest(repo, reference).unwrap());
        if let Some(children) = m["manifests"].as_array() {
            for c in children {
                walk(ep, repo, c["digest"].as_str().unwrap(), seen);
            }
            return;
        }
        let mut descs = vec![m["config"].clone()];
        descs.extend(m["layers"].as_array().unwrap().iter().cloned());
        for d in descs {
            seen.insert(
                d["digest"].as_str().unwrap().to_owned(),
                d["size"].as_u64().unwrap(),
            );
        }
    }
    for (repo, r) in refs {
        walk(ep, repo, r, &mut seen);
    }
    seen
}

/// A registry image whose one layer is `layer` (pushed directly: no tar needed to fetch a
/// blob); returns the layer's digest.
pub fn push_raw_image(ep: &Endpoint, repo: &str, tag: &str, layer: &[u8]) -> String {
    let config =
        br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let cfg = ep.push_blob(repo, config);
    let digest = ep.push_blob(repo, layer);
    let m = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cfg, "size": config.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": digest, "size": layer.len()}],
    });
    let bytes = serde_json::to_vec(&m).unwrap();
    assert_eq!(ep.push_manifest(repo, tag, OCI_MANIFEST, &bytes), 201);
    digest
}

/// Waits until `repo:tag` is stored (listed in the tags, which only happens once whole).
pub fn wait_stored(reg: &Registry, repo: &str, tag: &str) {
    let ep = Endpoint::plain(&reg.host());
    let deadline = Instant::now() + Duration::from_secs(60);
    while !ep.tags(repo).iter().any(|t| t == tag) {
        assert!(
            Instant::now() < deadline,
            "{repo}:{tag} not stored in time\n{}",
            reg.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// POSTs a staging request (`body`: `{"images": [...]}`) to the admin API; its id.
pub fn stage(reg: &Registry, body: &str) -> String {
    let resp: Value = http()
        .post(format!(
            "http://127.0.0.1:{}/outpost/v1/staging",
            reg.admin_port
        ))
        .body(body.to_owned())
        .send()
        .unwrap()
        .json()
        .unwrap();
    resp["id"].as_str().unwrap().to_owned()
}

/// GET /outpost/v1/staging/{id}.
pub fn staging_get(reg: &Registry, id: &str) -> Value {
    http()
        .get(format!(
            "http://127.0.0.1:{}/outpost/v1/staging/{id}",
            reg.admin_port
        ))
        .send()
        .unwrap()
        .json()
        .unwrap()
}
