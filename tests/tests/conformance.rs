//! Walks every endpoint of the OCI Distribution v1.1 API and the spec's error codes against a
//! running outpost-registry, over real HTTP: every case on a storage directory (module `fs`),
//! on Azure Blob Storage through Azurite (module `azblob`) and on S3 through moto (module `s3`),
//! a fresh container or bucket per case.

use std::collections::BTreeMap;

use outpost_e2e::emulators::Backend;
use outpost_e2e::metrics::{Sample, samples};
use outpost_e2e::{Registry, header, http, pseudo_random, raw_request, sha256, sha512};
use reqwest::StatusCode;
use reqwest::blocking::{Client, Response};
use serde_json::{Value, json};

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const EMPTY_SHA256: &str =
    "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

struct T {
    reg: Registry,
    c: Client,
}

impl T {
    fn new(backend: Backend) -> Self {
        T {
            reg: Registry::start_on(backend, &[]),
            c: http(),
        }
    }

    fn u(&self, path: &str) -> String {
        format!("{}{path}", self.reg.url())
    }

    fn push_blob(&self, repo: &str, data: &[u8]) -> String {
        let d = sha256(data);
        let r = self
            .c
            .post(self.u(&format!("/v2/{repo}/blobs/uploads/?digest={d}")))
            .body(data.to_vec())
            .send()
            .unwrap();
        assert_eq!(r.status(), StatusCode::CREATED, "push blob");
        d
    }

    /// Pushes config + one layer and returns (manifest JSON, its bytes).
    fn image(&self, repo: &str, seed: u64, media_type: &str) -> Vec<u8> {
        let (config_type, layer_type) = if media_type == DOCKER_MANIFEST {
            (
                "application/vnd.docker.container.image.v1+json",
                "application/vnd.docker.image.rootfs.diff.tar.gzip",
            )
        } else {
            (
                "application/vnd.oci.image.config.v1+json",
                "application/vnd.oci.image.layer.v1.tar+gzip",
            )
        };
        let config = format!("{{\"seed\":{seed}}}").into_bytes();
        let layer = pseudo_random(seed, 1000);
        let cd = self.push_blob(repo, &config);
        let ld = self.push_blob(repo, &layer);
        serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": media_type,
            "config": {"mediaType": config_type, "digest": cd, "size": config.len()},
            "layers": [{"mediaType": layer_type, "digest": ld, "size": layer.len()}],
        }))
        .unwrap()
    }

    fn put_manifest(&self, repo: &str, reference: &str, media_type: &str, body: &[u8]) -> Response {
        self.c
            .put(self.u(&format!("/v2/{repo}/manifests/{reference}")))
            .header("content-type", media_type)
            .body(body.to_vec())
            .send()
            .unwrap()
    }

    fn get(&self, path: &str) -> Response {
        self.c.get(self.u(path)).send().unwrap()
    }
}

/// Asserts the status and that the body is the spec's error form with `code`.
fn expect_error(r: Response, status: StatusCode, code: &str) {
    assert_eq!(r.status(), status, "status for expected {code}");
    assert_eq!(header(&r, "content-type"), "application/json");
    let body: Value = r.json().expect("error body is JSON");
    let errors = body["errors"].as_array().expect("errors array");
    assert_eq!(errors[0]["code"], code, "{body}");
    assert!(errors[0]["message"].is_string(), "{body}");
}

/// Each case is a function of a running registry; this makes one test of it per backend.
macro_rules! on_every_backend {
    ($($case:ident),* $(,)?) => {
        mod fs {
            $(#[test]
            fn $case() {
                super::$case(super::T::new(super::Backend::Fs));
            })*
        }
        mod azblob {
            $(#[test]
            fn $case() {
                super::$case(super::T::new(super::Backend::Azurite));
            })*
        }
        mod s3 {
            $(#[test]
            fn $case() {
                super::$case(super::T::new(super::Backend::Moto));
            })*
        }
    };
}

on_every_backend!(
    base_endpoint,
    blob_get_head_and_range_edges,
    monolithic_and_empty_uploads,
    chunked_uploads_in_order_only,
    upload_sessions_cancel_and_isolation,
    cross_repository_mount,
    manifests_push_pull_and_negotiation,
    manifest_refusals,
    invalid_references,
    truncated_blob_upload_is_never_visible,
    indexes_need_their_children,
    tags_list_paginates,
    catalog_paginates,
    catalog_pages_nested_names_in_lexical_order,
    deletes,
    referrers_and_subject,
    bad_names_and_paths,
    health_and_metrics,
);

fn base_endpoint(t: T) {
    let r = t.get("/v2/");
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(
        header(&r, "docker-distribution-api-version"),
        "registry/2.0"
    );
    assert_eq!(r.text().unwrap(), "{}");
    let r = t.c.head(t.u("/v2/")).send().unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = t.get("/v2");
    assert_eq!(r.status(), StatusCode::PERMANENT_REDIRECT);
}

fn blob_get_head_and_range_edges(t: T) {
    let data = pseudo_random(1, 10_000);
    let d = t.push_blob("r/blob", &data);
    let r =
        t.c.head(t.u(&format!("/v2/r/blob/blobs/{d}")))
            .send()
            .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "content-length"), "10000");
    assert_eq!(header(&r, "docker-content-digest"), d);
    assert!(r.bytes().unwrap().is_empty());

    let r = t.get(&format!("/v2/r/blob/blobs/{d}"));
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "etag"), format!("\"{d}\""));
    assert_eq!(header(&r, "accept-ranges"), "bytes");
    assert_eq!(r.bytes().unwrap().as_ref(), &data[..]);

    let ranged = |range: &str| {
        t.c.get(t.u(&format!("/v2/r/blob/blobs/{d}")))
            .header("range", range)
            .send()
            .unwrap()
    };
    for (range, first, last) in [
        ("bytes=0-0", 0usize, 0usize),
        ("bytes=0-9999", 0, 9999),
        ("bytes=9999-", 9999, 9999),
        ("bytes=5000-", 5000, 9999),
        ("bytes=100-199", 100, 199),
        ("bytes=-3", 9997, 9999),
        ("bytes=-20000", 0, 9999),
        ("bytes=9000-123456", 9000, 9999),
    ] {
        let r = ranged(range);
        assert_eq!(r.status(), StatusCode::PARTIAL_CONTENT, "{range}");
        assert_eq!(
            header(&r, "content-range"),
            format!("bytes {first}-{last}/10000"),
            "{range}"
        );
        assert_eq!(r.bytes().unwrap().as_ref(), &data[first..=last], "{range}");
    }
    for range in ["bytes=10000-", "bytes=20000-30000", "bytes=-0"] {
        let r = ranged(range);
        assert_eq!(r.status(), StatusCode::RANGE_NOT_SATISFIABLE, "{range}");
        assert_eq!(header(&r, "content-range"), "bytes */10000");
    }
    // Ranges we do not serve partially are ignored, as HTTP allows: the whole blob comes back.
    for range in ["bytes=abc", "bytes=0-1,5-6", "items=0-1", "bytes=9-1"] {
        let r = ranged(range);
        assert_eq!(r.status(), StatusCode::OK, "{range}");
        assert_eq!(r.bytes().unwrap().len(), 10_000);
    }
    let r =
        t.c.get(t.u(&format!("/v2/r/blob/blobs/{d}")))
            .header("if-none-match", format!("\"{d}\""))
            .send()
            .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_MODIFIED);

    let missing = sha256(b"missing");
    expect_error(
        t.get(&format!("/v2/r/blob/blobs/{missing}")),
        StatusCode::NOT_FOUND,
        "BLOB_UNKNOWN",
    );
    let r =
        t.c.head(t.u(&format!("/v2/r/blob/blobs/{missing}")))
            .send()
            .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    // A blob is only visible in the repositories it was pushed or mounted to.
    expect_error(
        t.get(&format!("/v2/r/other/blobs/{d}")),
        StatusCode::NOT_FOUND,
        "BLOB_UNKNOWN",
    );
}

fn monolithic_and_empty_uploads(t: T) {
    let r =
        t.c.post(t.u(&format!("/v2/m/blobs/uploads/?digest={EMPTY_SHA256}")))
            .send()
            .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(
        header(&r, "location"),
        format!("/v2/m/blobs/{EMPTY_SHA256}")
    );
    assert_eq!(header(&r, "docker-content-digest"), EMPTY_SHA256);
    let r = t.get(&format!("/v2/m/blobs/{EMPTY_SHA256}"));
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "content-length"), "0");

    // Wrong digest for the content.
    let wrong = sha256(b"something else");
    expect_error(
        t.c.post(t.u(&format!("/v2/m/blobs/uploads/?digest={wrong}")))
            .body("content")
            .send()
            .unwrap(),
        StatusCode::BAD_REQUEST,
        "DIGEST_INVALID",
    );
    expect_error(
        t.get(&format!("/v2/m/blobs/{wrong}")),
        StatusCode::NOT_FOUND,
        "BLOB_UNKNOWN",
    );
    for bad in [
        "sha256:1234",
        "md5:d41d8cd98f00b204e9800998ecf8427e",
        "sha256",
        "nonsense",
    ] {
        expect_error(
            t.c.post(t.u(&format!("/v2/m/blobs/uploads/?digest={bad}")))
                .body("content")
                .send()
                .unwrap(),
            StatusCode::BAD_REQUEST,
            "DIGEST_INVALID",
        );
    }

    // POST then a single PUT carrying the whole blob.
    let data = pseudo_random(2, 5000);
    let d = sha256(&data);
    let r = t.c.post(t.u("/v2/m/blobs/uploads/")).send().unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    let loc = header(&r, "location");
    assert!(loc.starts_with("/v2/m/blobs/uploads/"), "{loc}");
    assert_eq!(header(&r, "range"), "0-0");
    assert!(!header(&r, "docker-upload-uuid").is_empty());
    let r =
        t.c.put(t.u(&format!("{loc}?digest={d}")))
            .body(data.clone())
            .send()
            .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(header(&r, "docker-content-digest"), d);
    assert_eq!(
        t.get(&format!("/v2/m/blobs/{d}")).bytes().unwrap().as_ref(),
        &data[..]
    );

    // sha512 content.
    let d512 = sha512(&data);
    let r =
        t.c.post(t.u(&format!("/v2/m/blobs/uploads/?digest={d512}")))
            .body(data.clone())
            .send()
            .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(
        t.get(&format!("/v2/m/blobs/{d512}"))
            .bytes()
            .unwrap()
            .as_ref(),
        &data[..]
    );
}

fn chunked_uploads_in_order_only(t: T) {
    let data = pseudo_random(3, 3 * 4096 + 17);
    let d = sha256(&data);
    let r = t.c.post(t.u("/v2/c/blobs/uploads/")).send().unwrap();
    let loc = header(&r, "location");
    let patch = |from: usize, to: usize| {
        t.c.patch(t.u(&loc))
            .header("content-type", "application/octet-stream")
            .header("content-range", format!("{from}-{}", to - 1))
            .body(data[from..to].to_vec())
            .send()
            .unwrap()
    };
    let r = patch(0, 4096);
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert_eq!(header(&r, "range"), "0-4095");
    assert_eq!(header(&r, "location"), loc);
    // Out of order: a gap, and a repeat of the first chunk.
    for (from, to) in [(8192, 12288), (0, 4096)] {
        let r = patch(from, to);
        assert_eq!(r.status(), StatusCode::RANGE_NOT_SATISFIABLE);
        assert_eq!(header(&r, "range"), "0-4095");
    }
    // Content-Length disagreeing with Content-Range.
    expect_error(
        t.c.patch(t.u(&loc))
            .header("content-range", "4096-5000")
            .body(vec![0u8; 10])
            .send()
            .unwrap(),
        StatusCode::BAD_REQUEST,
        "SIZE_INVALID",
    );
    let r = patch(4096, 8192);
    assert_eq!(header(&r, "range"), "0-8191");
    let r = t.get(&loc);
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(header(&r, "range"), "0-8191");
    // A streamed chunk without Content-Range appends.
    let r =
        t.c.patch(t.u(&loc))
            .body(data[8192..12288].to_vec())
            .send()
            .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    assert_eq!(header(&r, "range"), "0-12287");
    // PUT without or with a bad digest.
    expect_error(
        t.c.put(t.u(&loc)).send().unwrap(),
        StatusCode::BAD_REQUEST,
        "DIGEST_INVALID",
    );
    let wrong = sha256(b"wrong");
    expect_error(
        t.c.put(t.u(&format!("{loc}?digest={wrong}")))
            .send()
            .unwrap(),
        StatusCode::BAD_REQUEST,
        "DIGEST_INVALID",
    );
    // The final chunk rides on the PUT.
    let r =
        t.c.put(t.u(&format!("{loc}?digest={d}")))
            .header("content-range", format!("12288-{}", data.len() - 1))
            .body(data[12288..].to_vec())
            .send()
            .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(header(&r, "location"), format!("/v2/c/blobs/{d}"));
    assert_eq!(
        t.get(&format!("/v2/c/blobs/{d}")).bytes().unwrap().as_ref(),
        &data[..]
    );
    // The session is gone.
    expect_error(t.get(&loc), StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN");
    expect_error(
        t.c.patch(t.u(&loc)).body("x").send().unwrap(),
        StatusCode::NOT_FOUND,
        "BLOB_UPLOAD_UNKNOWN",
    );
}

fn upload_sessions_cancel_and_isolation(t: T) {
    let r = t.c.post(t.u("/v2/s/blobs/uploads/")).send().unwrap();
    let loc = header(&r, "location");
    let id = loc.rsplit('/').next().unwrap().to_owned();
    // The session is bound to its repository.
    expect_error(
        t.get(&format!("/v2/other/blobs/uploads/{id}")),
        StatusCode::NOT_FOUND,
        "BLOB_UPLOAD_UNKNOWN",
    );
    for bogus in ["nope", "..%2F..%2Fetc", "00000000000000000000000000000000"] {
        expect_error(
            t.get(&format!("/v2/s/blobs/uploads/{bogus}")),
            StatusCode::NOT_FOUND,
            "BLOB_UPLOAD_UNKNOWN",
        );
    }
    let r = t.c.delete(t.u(&loc)).send().unwrap();
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    expect_error(t.get(&loc), StatusCode::NOT_FOUND, "BLOB_UPLOAD_UNKNOWN");
    expect_error(
        t.c.delete(t.u(&loc)).send().unwrap(),
        StatusCode::NOT_FOUND,
        "BLOB_UPLOAD_UNKNOWN",
    );
}

fn cross_repository_mount(t: T) {
    let data = pseudo_random(4, 2048);
    let d = t.push_blob("src/app", &data);
    expect_error(
        t.get(&format!("/v2/dst/app/blobs/{d}")),
        StatusCode::NOT_FOUND,
        "BLOB_UNKNOWN",
    );
    let r =
        t.c.post(t.u(&format!(
            "/v2/dst/app/blobs/uploads/?mount={d}&from=src/app"
        )))
        .send()
        .unwrap();
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(header(&r, "location"), format!("/v2/dst/app/blobs/{d}"));
    assert_eq!(header(&r, "docker-content-digest"), d);
    assert_eq!(
        t.get(&format!("/v2/dst/app/blobs/{d}"))
            .bytes()
            .unwrap()
            .as_ref(),
        &data[..]
    );
    // Not mountable (the source lacks it, or no source): a new upload session instead.
    let missing = sha256(b"not there");
    for q in [
        format!("mount={missing}&from=src/app"),
        format!("mount={d}&from=nowhere"),
        format!("mount={d}"),
    ] {
        let r =
            t.c.post(t.u(&format!("/v2/dst/other/blobs/uploads/?{q}")))
                .send()
                .unwrap();
        assert_eq!(r.status(), StatusCode::ACCEPTED, "{q}");
        assert!(header(&r, "location").starts_with("/v2/dst/other/blobs/uploads/"));
    }
    expect_error(
        t.c.post(t.u("/v2/dst/app/blobs/uploads/?mount=sha256:zz&from=src/app"))
            .send()
            .unwrap(),
        StatusCode::BAD_REQUEST,
        "DIGEST_INVALID",
    );
    expect_error(
        t.c.post(t.u(&format!(
            "/v2/dst/app/blobs/uploads/?mount={d}&from=..%2Fsrc"
        )))
        .send()
        .unwrap(),
        StatusCode::BAD_REQUEST,
        "NAME_INVALID",
    );
}

fn manifests_push_pull_and_negotiation(t: T) {
    let body = t.image("app/web", 5, OCI_MANIFEST);
    let d = sha256(&body);
    let r = t.put_manifest("app/web", "v1", OCI_MANIFEST, &body);
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(header(&r, "docker-content-digest"), d);
    assert_eq!(header(&r, "location"), format!("/v2/app/web/manifests/{d}"));

    for reference in ["v1", d.as_str()] {
        let r = t.get(&format!("/v2/app/web/manifests/{reference}"));
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(header(&r, "content-type"), OCI_MANIFEST);
        assert_eq!(header(&r, "docker-content-digest"), d);
        assert_eq!(header(&r, "etag"), format!("\"{d}\""));
        assert_eq!(r.bytes().unwrap().as_ref(), &body[..]);
        let r =
            t.c.head(t.u(&format!("/v2/app/web/manifests/{reference}")))
                .send()
                .unwrap();
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(header(&r, "content-length"), body.len().to_string());
        assert_eq!(header(&r, "docker-content-digest"), d);
    }
    // The manifest is also a blob of the repository.
    assert_eq!(
        t.get(&format!("/v2/app/web/blobs/{d}")).status(),
        StatusCode::OK
    );

    // Accept negotiation.
    let with_accept = |accept: &str| {
        t.c.get(t.u("/v2/app/web/manifests/v1"))
            .header("accept", accept)
            .send()
            .unwrap()
    };
    assert_eq!(
        with_accept(&format!("{DOCKER_MANIFEST}, {OCI_MANIFEST};q=0.9")).status(),
        StatusCode::OK
    );
    assert_eq!(with_accept("*/*").status(), StatusCode::OK);
    expect_error(
        with_accept(&format!("{DOCKER_MANIFEST}, {DOCKER_LIST}")),
        StatusCode::NOT_FOUND,
        "MANIFEST_UNKNOWN",
    );

    // Docker schema 2 keeps its media type.
    let docker = t.image("app/web", 6, DOCKER_MANIFEST);
    let r = t.put_manifest("app/web", "docker", DOCKER_MANIFEST, &docker);
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = with_accept_tag(&t, "docker", DOCKER_MANIFEST);
    assert_eq!(header(&r, "content-type"), DOCKER_MANIFEST);
    assert_eq!(r.bytes().unwrap().as_ref(), &docker[..]);

    // By digest: the right one, a wrong one, and sha512.
    let r = t.put_manifest("app/web", &d, OCI_MANIFEST, &body);
    assert_eq!(r.status(), StatusCode::CREATED);
    let other = sha256(b"other");
    expect_error(
        t.put_manifest("app/web", &other, OCI_MANIFEST, &body),
        StatusCode::BAD_REQUEST,
        "DIGEST_INVALID",
    );
    let d512 = sha512(&body);
    let r = t.put_manifest("app/web", &d512, OCI_MANIFEST, &body);
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(header(&r, "docker-content-digest"), d512);
    let r = t.get(&format!("/v2/app/web/manifests/{d512}"));
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "docker-content-digest"), d512);

    expect_error(
        t.get("/v2/app/web/manifests/nope"),
        StatusCode::NOT_FOUND,
        "MANIFEST_UNKNOWN",
    );
    expect_error(
        t.get(&format!("/v2/app/web/manifests/{other}")),
        StatusCode::NOT_FOUND,
        "MANIFEST_UNKNOWN",
    );
    // GET allows only 200 and 404 (end-3): an unparsable digest names nothing stored.
    expect_error(
        t.get("/v2/app/web/manifests/sha256:xyz"),
        StatusCode::NOT_FOUND,
        "MANIFEST_UNKNOWN",
    );
}

fn with_accept_tag(t: &T, tag: &str, accept: &str) -> Response {
    t.c.get(t.u(&format!("/v2/app/web/manifests/{tag}")))
        .header("accept", accept)
        .send()
        .unwrap()
}

fn manifest_refusals(t: T) {
    let good = t.image("bad/input", 7, OCI_MANIFEST);
    let v: Value = serde_json::from_slice(&good).unwrap();

    let schema1 =
        br#"{"schemaVersion":1,"name":"bad/input","tag":"v1","fsLayers":[],"history":[]}"#;
    for ct in [
        "application/vnd.docker.distribution.manifest.v1+prettyjws",
        "application/vnd.docker.distribution.manifest.v1+json",
        "application/json",
    ] {
        expect_error(
            t.put_manifest("bad/input", "s1", ct, schema1),
            StatusCode::BAD_REQUEST,
            "MANIFEST_INVALID",
        );
    }
    let mut unknown_type = v.clone();
    unknown_type["mediaType"] = json!("application/vnd.example.unknown+json");
    expect_error(
        t.put_manifest(
            "bad/input",
            "u",
            "application/vnd.example.unknown+json",
            &serde_json::to_vec(&unknown_type).unwrap(),
        ),
        StatusCode::BAD_REQUEST,
        "MANIFEST_INVALID",
    );
    // mediaType and Content-Type disagree.
    expect_error(
        t.put_manifest("bad/input", "mm", OCI_INDEX, &good),
        StatusCode::BAD_REQUEST,
        "MANIFEST_INVALID",
    );
    expect_error(
        t.put_manifest("bad/input", "j", OCI_MANIFEST, b"{not json"),
        StatusCode::BAD_REQUEST,
        "MANIFEST_INVALID",
    );
    let mut bad_digest = v.clone();
    bad_digest["layers"][0]["digest"] = json!("sha256:../../etc/passwd");
    expect_error(
        t.put_manifest(
            "bad/input",
            "bd",
            OCI_MANIFEST,
            &serde_json::to_vec(&bad_digest).unwrap(),
        ),
        StatusCode::BAD_REQUEST,
        "MANIFEST_INVALID",
    );
    let mut missing = v.clone();
    missing["layers"][0]["digest"] = json!(sha256(b"never pushed"));
    expect_error(
        t.put_manifest(
            "bad/input",
            "mb",
            OCI_MANIFEST,
            &serde_json::to_vec(&missing).unwrap(),
        ),
        StatusCode::BAD_REQUEST,
        "MANIFEST_BLOB_UNKNOWN",
    );
    expect_error(
        t.get("/v2/bad/input/manifests/mb"),
        StatusCode::NOT_FOUND,
        "MANIFEST_UNKNOWN",
    );
    // Blobs pushed to another repository do not count.
    expect_error(
        t.put_manifest("bad/elsewhere", "x", OCI_MANIFEST, &good),
        StatusCode::BAD_REQUEST,
        "MANIFEST_BLOB_UNKNOWN",
    );
    // Over 4 MiB.
    let mut huge = v.clone();
    huge["annotations"] = json!({ "pad": "x".repeat(4 * 1024 * 1024) });
    expect_error(
        t.put_manifest(
            "bad/input",
            "huge",
            OCI_MANIFEST,
            &serde_json::to_vec(&huge).unwrap(),
        ),
        StatusCode::PAYLOAD_TOO_LARGE,
        "SIZE_INVALID",
    );
    expect_error(
        t.put_manifest("bad/input", "-bad-tag", OCI_MANIFEST, &good),
        StatusCode::BAD_REQUEST,
        "TAG_INVALID",
    );
    // A body shorter than its Content-Length.
    let req = format!(
        "PUT /v2/bad/input/manifests/trunc HTTP/1.1\r\nHost: x\r\nContent-Type: {OCI_MANIFEST}\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        good.len()
    );
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(&good[..good.len() / 2]);
    let (status, text) = raw_request(t.reg.port, &bytes, true);
    assert!(status == 400 || status == 0, "truncated manifest: {text}");
    expect_error(
        t.get("/v2/bad/input/manifests/trunc"),
        StatusCode::NOT_FOUND,
        "MANIFEST_UNKNOWN",
    );
    // Still healthy after all of that.
    assert_eq!(
        t.put_manifest("bad/input", "ok", OCI_MANIFEST, &good)
            .status(),
        StatusCode::CREATED
    );
}

/// The spec's endpoint table allows only 200 and 404 for GET and HEAD of a manifest (end-3), so
/// a reference that is not a valid tag or digest is unknown there; on PUT it is the client's
/// error (TAG_INVALID).
fn invalid_references(t: T) {
    let body = t.image("conf/badref", 7, OCI_MANIFEST);
    for reference in [".INVALID_MANIFEST_NAME", "-dash", "sha256:zz"] {
        let r = t.get(&format!("/v2/conf/badref/manifests/{reference}"));
        expect_error(r, StatusCode::NOT_FOUND, "MANIFEST_UNKNOWN");
        let r =
            t.c.head(t.u(&format!("/v2/conf/badref/manifests/{reference}")))
                .send()
                .unwrap();
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "HEAD {reference}");
    }
    let r = t.put_manifest("conf/badref", ".INVALID_MANIFEST_NAME", OCI_MANIFEST, &body);
    expect_error(r, StatusCode::BAD_REQUEST, "TAG_INVALID");
    let r = t.put_manifest("conf/badref", "sha256:zz", OCI_MANIFEST, &body);
    expect_error(r, StatusCode::BAD_REQUEST, "DIGEST_INVALID");
}

fn truncated_blob_upload_is_never_visible(t: T) {
    let data = pseudo_random(8, 100_000);
    let d = sha256(&data);
    let req = format!(
        "POST /v2/trunc/blobs/uploads/?digest={d} HTTP/1.1\r\nHost: x\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        data.len()
    );
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(&data[..50_000]);
    let (status, _) = raw_request(t.reg.port, &bytes, true);
    assert!(status == 400 || status == 0, "status {status}");
    expect_error(
        t.get(&format!("/v2/trunc/blobs/{d}")),
        StatusCode::NOT_FOUND,
        "BLOB_UNKNOWN",
    );
}

fn indexes_need_their_children(t: T) {
    let a = t.image("multi", 10, OCI_MANIFEST);
    let b = t.image("multi", 11, OCI_MANIFEST);
    let index = |children: &[&[u8]], media: &str| {
        serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": media,
            "manifests": children.iter().enumerate().map(|(i, c)| json!({
                "mediaType": if media == DOCKER_LIST { DOCKER_MANIFEST } else { OCI_MANIFEST },
                "digest": sha256(c),
                "size": c.len(),
                "platform": {"architecture": if i == 0 {"amd64"} else {"arm64"}, "os": "linux"},
            })).collect::<Vec<_>>(),
        }))
        .unwrap()
    };
    let idx = index(&[&a, &b], OCI_INDEX);
    expect_error(
        t.put_manifest("multi", "all", OCI_INDEX, &idx),
        StatusCode::BAD_REQUEST,
        "MANIFEST_BLOB_UNKNOWN",
    );
    assert_eq!(
        t.put_manifest("multi", &sha256(&a), OCI_MANIFEST, &a)
            .status(),
        StatusCode::CREATED
    );
    assert_eq!(
        t.put_manifest("multi", &sha256(&b), OCI_MANIFEST, &b)
            .status(),
        StatusCode::CREATED
    );
    let r = t.put_manifest("multi", "all", OCI_INDEX, &idx);
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(header(&r, "docker-content-digest"), sha256(&idx));
    let r = t.get("/v2/multi/manifests/all");
    assert_eq!(header(&r, "content-type"), OCI_INDEX);
    assert_eq!(r.bytes().unwrap().as_ref(), &idx[..]);

    let da = t.image("multi", 12, DOCKER_MANIFEST);
    assert_eq!(
        t.put_manifest("multi", &sha256(&da), DOCKER_MANIFEST, &da)
            .status(),
        StatusCode::CREATED
    );
    let list = index(&[&da], DOCKER_LIST);
    assert_eq!(
        t.put_manifest("multi", "list", DOCKER_LIST, &list).status(),
        StatusCode::CREATED
    );
    let r = t.get("/v2/multi/manifests/list");
    assert_eq!(header(&r, "content-type"), DOCKER_LIST);
}

fn tags_list_paginates(t: T) {
    let body = t.image("paged", 20, OCI_MANIFEST);
    let mut tags: Vec<String> = (0..12).map(|i| format!("t{i:02}")).collect();
    tags.push("Latest".into());
    tags.push("_under".into());
    for tag in &tags {
        assert_eq!(
            t.put_manifest("paged", tag, OCI_MANIFEST, &body).status(),
            StatusCode::CREATED
        );
    }
    tags.sort();
    let r = t.get("/v2/paged/tags/list");
    assert_eq!(r.status(), StatusCode::OK);
    assert!(header(&r, "link").is_empty());
    let v: Value = r.json().unwrap();
    assert_eq!(v["name"], "paged");
    assert_eq!(v["tags"], json!(tags));

    // Follow Link headers page by page.
    let mut seen = Vec::new();
    let mut next = "/v2/paged/tags/list?n=5".to_owned();
    for _ in 0..10 {
        let r = t.get(&next);
        assert_eq!(r.status(), StatusCode::OK);
        let link = header(&r, "link");
        let v: Value = r.json().unwrap();
        let page: Vec<String> = serde_json::from_value(v["tags"].clone()).unwrap();
        assert!(page.len() <= 5);
        seen.extend(page);
        if link.is_empty() {
            break;
        }
        assert!(link.ends_with("rel=\"next\""), "{link}");
        next = link[1..link.find('>').unwrap()].to_owned();
    }
    assert_eq!(seen, tags);

    let page = |q: &str| -> Value { t.get(&format!("/v2/paged/tags/list?{q}")).json().unwrap() };
    assert_eq!(page("n=0")["tags"], json!([]));
    assert_eq!(page("last=t11")["tags"], json!([]));
    assert_eq!(page(&format!("last={}", tags[1]))["tags"], json!(tags[2..]));
    assert_eq!(page("n=2&last=t05")["tags"], json!(["t06", "t07"]));
    assert_eq!(page("n=100")["tags"], json!(tags));
    expect_error(
        t.get("/v2/paged/tags/list?n=abc"),
        StatusCode::BAD_REQUEST,
        "PAGINATION_NUMBER_INVALID",
    );
    expect_error(
        t.get("/v2/unknown/repo/tags/list"),
        StatusCode::NOT_FOUND,
        "NAME_UNKNOWN",
    );
}

fn catalog_paginates(t: T) {
    let names = ["a/one", "a/two", "b", "c/d/e/f", "zed"];
    for (i, n) in names.iter().enumerate() {
        let body = t.image(n, 30 + i as u64, OCI_MANIFEST);
        assert_eq!(
            t.put_manifest(n, "v1", OCI_MANIFEST, &body).status(),
            StatusCode::CREATED
        );
    }
    let v: Value = t.get("/v2/_catalog").json().unwrap();
    assert_eq!(v["repositories"], json!(names));
    let r = t.get("/v2/_catalog?n=2");
    assert_eq!(
        header(&r, "link"),
        "</v2/_catalog?n=2&last=a%2Ftwo>; rel=\"next\""
    );
    let v: Value = r.json().unwrap();
    assert_eq!(v["repositories"], json!(["a/one", "a/two"]));
    let r = t.get("/v2/_catalog?n=2&last=a%2Ftwo");
    let v: Value = r.json().unwrap();
    assert_eq!(v["repositories"], json!(["b", "c/d/e/f"]));
    let v: Value = t.get("/v2/_catalog?n=2&last=c/d/e/f").json().unwrap();
    assert_eq!(v["repositories"], json!(["zed"]));
    let v: Value = t.get("/v2/_catalog?n=0").json().unwrap();
    assert_eq!(v["repositories"], json!([]));
    expect_error(
        t.get("/v2/_catalog?n=-1"),
        StatusCode::BAD_REQUEST,
        "PAGINATION_NUMBER_INVALID",
    );
}

/// Full names sort as strings: `a-b` and `a.b` come between `a` and `a/b` ('-' and '.' sort
/// before '/'), which a walk of the nested folders would not give by itself. Paging by the
/// Link header at every page size must give the same list, each name once.
fn catalog_pages_nested_names_in_lexical_order(t: T) {
    let pushed = [
        "a/b/c", "ab", "a", "a-b", "a/b", "a.b", "a_b", "a0", "a-b/c", "b/a", "a/b-c",
    ];
    for (i, n) in pushed.iter().enumerate() {
        let body = t.image(n, 60 + i as u64, OCI_MANIFEST);
        assert_eq!(
            t.put_manifest(n, "v1", OCI_MANIFEST, &body).status(),
            StatusCode::CREATED
        );
    }
    let mut sorted: Vec<&str> = pushed.to_vec();
    sorted.sort_unstable();
    assert_eq!(
        sorted,
        [
            "a", "a-b", "a-b/c", "a.b", "a/b", "a/b-c", "a/b/c", "a0", "a_b", "ab", "b/a"
        ]
    );
    let v: Value = t.get("/v2/_catalog").json().unwrap();
    assert_eq!(v["repositories"], json!(sorted));
    for n in 1..=4 {
        let mut got: Vec<String> = Vec::new();
        let mut next = Some(format!("/v2/_catalog?n={n}"));
        // Bounded: one page per name at most, and one more that ends it.
        for _ in 0..=pushed.len() {
            let Some(url) = next.take() else { break };
            let r = t.get(&url);
            assert_eq!(r.status(), StatusCode::OK);
            next = r
                .headers()
                .get("link")
                .map(|l| l.to_str().unwrap().to_owned())
                .map(|l| {
                    let (target, rel) = l.split_once("; ").unwrap();
                    assert_eq!(rel, "rel=\"next\"");
                    target
                        .trim_start_matches('<')
                        .trim_end_matches('>')
                        .to_owned()
                });
            let v: Value = r.json().unwrap();
            let page: Vec<String> = v["repositories"]
                .as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_str().unwrap().to_owned())
                .collect();
            assert!(page.len() <= n);
            got.extend(page);
        }
        assert!(next.is_none(), "paging at n={n} ended");
        assert_eq!(got, sorted, "pages of {n}");
    }
    let v: Value = t.get("/v2/_catalog?n=3&last=a%2F").json().unwrap();
    assert_eq!(v["repositories"], json!(["a/b", "a/b-c", "a/b/c"]));
    let v: Value = t.get("/v2/_catalog?n=2&last=a-b").json().unwrap();
    assert_eq!(v["repositories"], json!(["a-b/c", "a.b"]));
}

fn deletes(t: T) {
    let body = t.image("del", 40, OCI_MANIFEST);
    let d = sha256(&body);
    t.put_manifest("del", "v1", OCI_MANIFEST, &body);
    t.put_manifest("del", "v2", OCI_MANIFEST, &body);
    // A tag alone.
    let r = t.c.delete(t.u("/v2/del/manifests/v1")).send().unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    expect_error(
        t.get("/v2/del/manifests/v1"),
        StatusCode::NOT_FOUND,
        "MANIFEST_UNKNOWN",
    );
    assert_eq!(t.get("/v2/del/manifests/v2").status(), StatusCode::OK);
    // The manifest, and with it its remaining tags.
    let r =
        t.c.delete(t.u(&format!("/v2/del/manifests/{d}")))
            .send()
            .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    expect_error(
        t.get(&format!("/v2/del/manifests/{d}")),
        StatusCode::NOT_FOUND,
        "MANIFEST_UNKNOWN",
    );
    expect_error(
        t.get("/v2/del/manifests/v2"),
        StatusCode::NOT_FOUND,
        "MANIFEST_UNKNOWN",
    );
    let v: Value = t.get("/v2/del/tags/list").json().unwrap();
    assert_eq!(v["tags"], json!([]));
    expect_error(
        t.c.delete(t.u(&format!("/v2/del/manifests/{d}")))
            .send()
            .unwrap(),
        StatusCode::NOT_FOUND,
        "MANIFEST_UNKNOWN",
    );
    // Blobs.
    let v: Value = serde_json::from_slice(&body).unwrap();
    let layer = v["layers"][0]["digest"].as_str().unwrap();
    let r =
        t.c.delete(t.u(&format!("/v2/del/blobs/{layer}")))
            .send()
            .unwrap();
    assert_eq!(r.status(), StatusCode::ACCEPTED);
    expect_error(
        t.get(&format!("/v2/del/blobs/{layer}")),
        StatusCode::NOT_FOUND,
        "BLOB_UNKNOWN",
    );
    expect_error(
        t.c.delete(t.u(&format!("/v2/del/blobs/{layer}")))
            .send()
            .unwrap(),
        StatusCode::NOT_FOUND,
        "BLOB_UNKNOWN",
    );
    expect_error(
        t.c.delete(t.u("/v2/del/blobs/sha256:bad")).send().unwrap(),
        StatusCode::BAD_REQUEST,
        "DIGEST_INVALID",
    );
}

fn referrers_and_subject(t: T) {
    let subject = t.image("ref", 50, OCI_MANIFEST);
    let sd = sha256(&subject);
    t.put_manifest("ref", "v1", OCI_MANIFEST, &subject);
    let empty_cfg = t.push_blob("ref", b"{}");
    let artifact = |artifact_type: Option<&str>, config_type: &str, seed: u64| {
        let layer = pseudo_random(seed, 64);
        let ld = t.push_blob("ref", &layer);
        let mut m = json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": config_type, "digest": empty_cfg, "size": 2},
            "layers": [{"mediaType": "application/octet-stream", "digest": ld, "size": 64}],
            "subject": {"mediaType": OCI_MANIFEST, "digest": sd, "size": subject.len()},
            "annotations": {"org.example.seed": seed.to_string()},
        });
        if let Some(a) = artifact_type {
            m["artifactType"] = json!(a);
        }
        serde_json::to_vec(&m).unwrap()
    };
    let sig = artifact(
        Some("application/vnd.example.signature"),
        "application/vnd.oci.empty.v1+json",
        51,
    );
    let sbom = artifact(None, "application/vnd.example.sbom", 52);
    for a in [&sig, &sbom] {
        let r = t.put_manifest("ref", &sha256(a), OCI_MANIFEST, a);
        assert_eq!(r.status(), StatusCode::CREATED);
        assert_eq!(header(&r, "oci-subject"), sd);
    }
    let r = t.get(&format!("/v2/ref/referrers/{sd}"));
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "content-type"), OCI_INDEX);
    assert!(header(&r, "oci-filters-applied").is_empty());
    let v: Value = r.json().unwrap();
    assert_eq!(v["mediaType"], OCI_INDEX);
    assert_eq!(v["schemaVersion"], 2);
    let list = v["manifests"].as_array().unwrap();
    assert_eq!(list.len(), 2);
    let by_digest = |d: &str| list.iter().find(|m| m["digest"] == d).cloned().unwrap();
    let s = by_digest(&sha256(&sig));
    assert_eq!(s["artifactType"], "application/vnd.example.signature");
    assert_eq!(s["size"], sig.len());
    assert_eq!(s["mediaType"], OCI_MANIFEST);
    assert_eq!(s["annotations"]["org.example.seed"], "51");
    // Without artifactType, the config's media type stands in.
    assert_eq!(
        by_digest(&sha256(&sbom))["artifactType"],
        "application/vnd.example.sbom"
    );

    let r = t.get(&format!(
        "/v2/ref/referrers/{sd}?artifactType=application/vnd.example.sbom"
    ));
    assert_eq!(header(&r, "oci-filters-applied"), "artifactType");
    let v: Value = r.json().unwrap();
    assert_eq!(v["manifests"].as_array().unwrap().len(), 1);
    assert_eq!(v["manifests"][0]["digest"], sha256(&sbom));
    let v: Value = t
        .get(&format!(
            "/v2/ref/referrers/{sd}?artifactType=application/none"
        ))
        .json()
        .unwrap();
    assert_eq!(v["manifests"], json!([]));

    // A digest nobody refers to, and a bad digest.
    let v: Value = t
        .get(&format!("/v2/ref/referrers/{}", sha256(b"x")))
        .json()
        .unwrap();
    assert_eq!(v["manifests"], json!([]));
    expect_error(
        t.get("/v2/ref/referrers/sha256:nothex"),
        StatusCode::BAD_REQUEST,
        "DIGEST_INVALID",
    );
    // Deleting a referrer removes it from the list.
    t.c.delete(t.u(&format!("/v2/ref/manifests/{}", sha256(&sig))))
        .send()
        .unwrap();
    let v: Value = t.get(&format!("/v2/ref/referrers/{sd}")).json().unwrap();
    assert_eq!(v["manifests"].as_array().unwrap().len(), 1);
    // The subject need not exist when the referrer is pushed.
    let orphan = {
        let mut m: Value =
            serde_json::from_slice(&artifact(Some("a/b"), "application/x", 53)).unwrap();
        m["subject"]["digest"] = json!(sha256(b"future subject"));
        serde_json::to_vec(&m).unwrap()
    };
    assert_eq!(
        t.put_manifest("ref", &sha256(&orphan), OCI_MANIFEST, &orphan)
            .status(),
        StatusCode::CREATED
    );
}

fn bad_names_and_paths(t: T) {
    // Sent raw: an HTTP library would normalise these paths before sending.
    for path in [
        "/v2/../manifests/latest",
        "/v2/a/../../manifests/latest",
        "/v2/%2e%2e/manifests/latest",
        "/v2/a/%2e%2e/%2e%2e/blobs/sha256:abc",
        "/v2/a%2fb/tags/list",
        "/v2/UPPER/tags/list",
        "/v2/a//b/tags/list",
        "/v2/-a/tags/list",
    ] {
        let (status, text) = raw_request(
            t.reg.port,
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
            false,
        );
        assert!(
            status == 400 && text.contains("NAME_INVALID"),
            "{path}: {status} {text}"
        );
    }
    let long = "a".repeat(256);
    expect_error(
        t.get(&format!("/v2/{long}/tags/list")),
        StatusCode::BAD_REQUEST,
        "NAME_INVALID",
    );
    for d in [
        "sha256:abc",
        "sha256:ZZ",
        "md5:d41d8cd98f00b204e9800998ecf8427e",
        "sha256",
    ] {
        expect_error(
            t.get(&format!("/v2/x/blobs/{d}")),
            StatusCode::BAD_REQUEST,
            "DIGEST_INVALID",
        );
    }
    expect_error(
        t.get("/v2/x/whatever/else"),
        StatusCode::NOT_FOUND,
        "UNSUPPORTED",
    );
    expect_error(t.get("/nothing"), StatusCode::NOT_FOUND, "UNSUPPORTED");
    expect_error(
        t.c.post(t.u("/v2/x/manifests/latest")).send().unwrap(),
        StatusCode::METHOD_NOT_ALLOWED,
        "UNSUPPORTED",
    );
    expect_error(
        t.c.delete(t.u("/v2/_catalog")).send().unwrap(),
        StatusCode::METHOD_NOT_ALLOWED,
        "UNSUPPORTED",
    );
    // Nothing above was a server error.
    let metrics = t.get("/metrics").text().unwrap();
    let errors: Vec<Sample> = samples(&metrics)
        .into_iter()
        .filter(|s| {
            s.name == "outpost_http_requests_total"
                && s.labels.get("status").is_some_and(|c| c.starts_with('5'))
        })
        .collect();
    assert!(errors.is_empty(), "server errors: {errors:?}");
}

fn health_and_metrics(t: T) {
    assert_eq!(t.get("/healthz").status(), StatusCode::OK);
    assert_eq!(t.get("/readyz").status(), StatusCode::OK);
    let data = pseudo_random(60, 4321);
    let d = t.push_blob("m", &data);
    t.get(&format!("/v2/m/blobs/{d}")).bytes().unwrap();
    let r = t.get("/metrics");
    assert_eq!(r.status(), StatusCode::OK);
    let text = r.text().unwrap();
    let all = samples(&text);
    let value = |name: &str, labels: &[(&str, &str)]| {
        let wanted: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        all.iter()
            .find(|s| s.name == name && s.labels == wanted)
            .map(|s| s.value)
            .unwrap_or_else(|| panic!("no sample {name}{labels:?} in\n{text}"))
    };
    let get = [("method", "GET"), ("route", "blobs")];
    assert_eq!(
        value(
            "outpost_http_requests_total",
            &[get[0], get[1], ("status", "200")]
        ),
        1.0
    );
    assert_eq!(
        value(
            "outpost_http_requests_total",
            &[("method", "POST"), ("route", "uploads"), ("status", "201")]
        ),
        1.0
    );
    // The blob GET is in the histogram: counted once, and in the +Inf bucket.
    assert_eq!(
        value("outpost_http_request_duration_seconds_count", &get),
        1.0
    );
    assert_eq!(
        value(
            "outpost_http_request_duration_seconds_bucket",
            &[get[0], get[1], ("le", "+Inf")]
        ),
        1.0
    );
    assert_eq!(value("outpost_blob_bytes_served_total", &[]), 4321.0);
    assert!(value("outpost_storage_bytes", &[]) >= 0.0);
    // The admin listener answers health too.
    let admin = format!("http://127.0.0.1:{}", t.reg.admin_port);
    assert_eq!(
        t.c.get(format!("{admin}/healthz")).send().unwrap().status(),
        StatusCode::OK
    );
}
