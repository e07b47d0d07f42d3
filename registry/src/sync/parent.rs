//! The client of the parent registry: `oci-client` for the OCI Distribution calls (it follows
//! the Basic and bearer-token challenges with the sync token), plus the catalog, whose bearer
//! scope (`registry:catalog:*`) oci-client cannot ask for. Every call retries transient faults
//! with jittered exponential backoff.

use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use outpost_core::{Digest, RepositoryName};
use reqwest::header::{HeaderValue, WWW_AUTHENTICATE};

use super::connection::{ConnectionString, Protocol};
use crate::content::manifest::MANIFEST_TYPES;
use crate::storage::ByteStream;

/// The largest catalog or tags page asked for at once.
const PAGE: usize = 1000;
/// Requests to the parent that fail transiently are tried this many times in all.
pub const ATTEMPTS: u32 = 4;
const BACKOFF_BASE: Duration = Duration::from_millis(250);
const BACKOFF_CAP: Duration = Duration::from_secs(5);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest silence from the parent in the middle of a response.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ParentError {
    #[error("parent unreachable: {0}")]
    Unreachable(String),
    #[error("parent refused the sync token: {0}")]
    Unauthorized(String),
    #[error("parent denied access: {0}")]
    Denied(String),
    #[error("not found at the parent: {0}")]
    NotFound(String),
    #[error("parent answered unexpectedly: {0}")]
    Protocol(String),
    #[error("cannot read the parent CA bundle {path}: {source}")]
    Ca {
        path: String,
        source: std::io::Error,
    },
}

impl ParentError {
    /// Worth trying again: the parent or the link may come back.
    pub fn is_transient(&self) -> bool {
        matches!(self, ParentError::Unreachable(_))
    }

    /// The parent could not be used at all (as opposed to one repository or image failing).
    pub fn is_contact_failure(&self) -> bool {
        matches!(
            self,
            ParentError::Unreachable(_) | ParentError::Unauthorized(_)
        )
    }
}

fn from_status(code: u16, what: String) -> ParentError {
    match code {
        401 => ParentError::Unauthorized(what),
        403 => ParentError::Denied(what),
        404 => ParentError::NotFound(what),
        408 | 429 | 500..=599 => ParentError::Unreachable(format!("HTTP {code}: {what}")),
        _ => ParentError::Protocol(format!("HTTP {code}: {what}")),
    }
}

impl From<OciDistributionError> for ParentError {
    fn from(e: OciDistributionError) -> Self {
        use OciDistributionError as E;
        match e {
            E::RequestError(r) => {
                if let Some(s) = r.status() {
                    from_status(s.as_u16(), r.to_string())
                } else {
                    ParentError::Unreachable(r.to_string())
                }
            }
            E::IoError(io) => ParentError::Unreachable(io.to_string()),
            E::ServerError { code, url, message } => {
                from_status(code, format!("{url}: {}", message.trim()))
            }
            E::UnauthorizedError { url } => ParentError::Unauthorized(url),
            E::AuthenticationFailure(reason) => ParentError::Unauthorized(reason.trim().into()),
            E::ImageManifestNotFoundError(m) => ParentError::NotFound(m),
            E::RegistryError { envelope, url } => {
                let text = format!("{url}: {envelope}");
                let codes: Vec<&OciErrorCode> = envelope.errors.iter().map(|e| &e.code).collect();
                let any = |f: fn(&OciErrorCode) -> bool| codes.iter().any(|c| f(c));
                if any(|c| {
                    matches!(
                        c,
                        OciErrorCode::NameUnknown
                            | OciErrorCode::ManifestUnknown
                            | OciErrorCode::BlobUnknown
                            | OciErrorCode::NotFound
                    )
                }) {
                    ParentError::NotFound(text)
                } else if any(|c| matches!(c, OciErrorCode::Unauthorized)) {
                    ParentError::Unauthorized(text)
                } else if any(|c| matches!(c, OciErrorCode::Denied)) {
                    ParentError::Denied(text)
                } else if any(|c| matches!(c, OciErrorCode::Toomanyrequests)) {
                    ParentError::Unreachable(text)
                } else {
                    ParentError::Protocol(text)
                }
            }
            other => ParentError::Protocol(other.to_string()),
        }
    }
}

fn from_reqwest(e: reqwest::Error) -> ParentError {
    match e.status() {
        Some(s) => from_status(s.as_u16(), e.to_string()),
        None => ParentError::Unreachable(e.to_string()),
    }
}

/// A blob body from the parent and the offset it starts at (0 when the parent ignored a Range).
pub struct BlobBody {
    pub starts_at: u64,
    /// The blob's whole size, when the parent said (Content-Length).
    pub total: Option<u64>,
    pub body: ByteStream,
}

/// A connection to the parent registry, built from a connection string. Rebuilt (not mutated)
/// when the credentials change.
pub struct Parent {
    client: Client,
    /// For the catalog's own challenge flow; same TLS trust as `client`.
    http: reqwest::Client,
    auth: RegistryAuth,
    /// `host[:port]` the API is reached at (the login server).
    registry: String,
    scheme: &'static str,
    user: String,
    password: String,
}

impl std::fmt::Debug for Parent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Parent")
            .field("registry", &self.registry)
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// The first non-empty of an environment variable's upper- and lowercase spellings.
fn env_var(name: &str) -> Option<String> {
    [name.to_owned(), name.to_ascii_lowercase()]
        .iter()
        .find_map(|n| std::env::var(n).ok().filter(|v| !v.trim().is_empty()))
}

/// Proxies for the parent from `HTTPS_PROXY`, `HTTP_PROXY` and `NO_PROXY` (sites often reach
/// the cloud only through one). Loopback never goes through the proxy.
struct ProxyEnv {
    https: Option<String>,
    http: Option<String>,
    no_proxy: String,
}

impl ProxyEnv {
    fn read() -> Self {
        let mut no_proxy = String::from("127.0.0.1,localhost,::1");
        if let Some(more) = env_var("NO_PROXY") {
            no_proxy.push(',');
            no_proxy.push_str(&more);
        }
        ProxyEnv {
            https: env_var("HTTPS_PROXY"),
            http: env_var("HTTP_PROXY"),
            no_proxy,
        }
    }

    fn apply(&self, mut b: reqwest::ClientBuilder) -> Result<reqwest::ClientBuilder, ParentError> {
        let bad = |e: reqwest::Error| ParentError::Protocol(format!("proxy setting: {e}"));
        let none = || reqwest::NoProxy::from_string(&self.no_proxy);
        if let Some(p) = &self.https {
            b = b.proxy(reqwest::Proxy::https(p).map_err(bad)?.no_proxy(none()));
        }
        if let Some(p) = &self.http {
            b = b.proxy(reqwest::Proxy::http(p).map_err(bad)?.no_proxy(none()));
        }
        Ok(b)
    }
}

fn user_agent() -> &'static str {
    concat!("outpost-registry/", env!("CARGO_PKG_VERSION"))
}

impl Parent {
    pub fn new(conn: &ConnectionString, ca_file: Option<&PathBuf>) -> Result<Self, ParentError> {
        let registry = conn.login_server();
        let pem = match ca_file {
            Some(p) => Some(std::fs::read(p).map_err(|source| ParentError::Ca {
                path: p.display().to_string(),
                source,
            })?),
            None => None,
        };
        let proxies = ProxyEnv::read();
        let config = ClientConfig {
            https_proxy: proxies.https.clone(),
            http_proxy: proxies.http.clone(),
            no_proxy: Some(proxies.no_proxy.clone()),
            protocol: match conn.protocol {
                Protocol::Https => ClientProtocol::Https,
                Protocol::Http => ClientProtocol::Http,
            },
            extra_root_certificates: pem
                .iter()
                .map(|data| Certificate {
                    encoding: CertificateEncoding::Pem,
                    data: data.clone(),
                })
                .collect(),
            connect_timeout: Some(CONNECT_TIMEOUT),
            read_timeout: Some(READ_TIMEOUT),
            user_agent: user_agent(),
            // Whole indexes are synced, never one platform picked from them.
            platform_resolver: None,
            ..Default::default()
        };
        let client = Client::try_from(config)
            .map_err(|e| ParentError::Protocol(format!("cannot build the parent client: {e}")))?;
        let mut http = reqwest::Client::builder()
            .user_agent(user_agent())
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(READ_TIMEOUT);
        if let Some(data) = &pem {
            for cert in
                reqwest::Certificate::from_pem_bundle(data).map_err(|e| ParentError::Ca {
                    path: ca_file.map(|p| p.display().to_string()).unwrap_or_default(),
                    source: std::io::Error::other(e),
                })?
            {
                http = http.add_root_certificate(cert);
            }
        }
        let http = proxies
            .apply(http)?
            .build()
            .map_err(|e| ParentError::Protocol(format!("cannot build the parent client: {e}")))?;
        Ok(Parent {
            client,
            http,
            auth: RegistryAuth::Basic(
                conn.sync_token_name.clone(),
                conn.sync_token_password.clone(),
            ),
            registry,
            scheme: conn.protocol.scheme(),
            user: conn.sync_token_name.clone(),
            password: conn.sync_token_password.clone(),
        })
    }

    pub fn registry(&self) -> &str {
        &self.registry
    }

    fn tag_ref(&self, repo: &RepositoryName, tag: &str) -> Reference {
        Reference::with_tag(
            self.registry.clone(),
            repo.as_str().to_owned(),
            tag.to_owned(),
        )
    }

    fn digest_ref(&self, repo: &RepositoryName, digest: &Digest) -> Reference {
        Reference::with_digest(
            self.registry.clone(),
            repo.as_str().to_owned(),
            digest.to_string(),
        )
    }

    fn any_ref(&self, repo: &RepositoryName, reference: &outpost_core::Reference) -> Reference {
        match reference {
            outpost_core::Reference::Digest(d) => self.digest_ref(repo, d),
            outpost_core::Reference::Tag(t) => self.tag_ref(repo, t.as_str()),
        }
    }

    /// Runs `op` until it succeeds, fails for good, or `ATTEMPTS` are spent.
    async fn retry<T, F, Fut>(&self, what: &str, op: F) -> Result<T, ParentError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, ParentError>>,
    {
        self.retry_n(what, ATTEMPTS, op).await
    }

    async fn retry_n<T, F, Fut>(
        &self,
        what: &str,
        attempts: u32,
        mut op: F,
    ) -> Result<T, ParentError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, ParentError>>,
    {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match op().await {
                Err(e) if e.is_transient() && attempt < attempts => {
                    let wait = backoff(attempt);
                    tracing::debug!(%what, attempt, error = %e, ?wait, "parent request failed; retrying");
                    tokio::time::sleep(wait).await;
                }
                other => return other,
            }
        }
    }

    /// Checks the parent answers at all (`GET /v2/`), following its auth challenge. True when
    /// the parent is an Outpost, which says so in a header of that answer: only then does a
    /// child report its state, so other parents never see a request they do not know.
    pub async fn ping(&self) -> Result<bool, ParentError> {
        self.retry("ping", || async {
            let url = format!("{}://{}/v2/", self.scheme, self.registry);
            let resp = self.http.get(&url).send().await.map_err(from_reqwest)?;
            let s = resp.status().as_u16();
            if s == 200 || s == 401 {
                Ok(resp
                    .headers()
                    .get(super::report::OUTPOST_API_HEADER)
                    .is_some_and(|v| v.as_bytes() == super::report::OUTPOST_API_VERSION.as_bytes()))
            } else {
                Err(from_status(s, url))
            }
        })
        .await
    }

    /// Sends this registry's state to an Outpost parent (`PUT /outpost/v1/children/<name>`),
    /// as the sync token (Basic, which an Outpost always accepts). One attempt: the next run
    /// reports again.
    pub async fn report(&self, name: &str, body: Vec<u8>) -> Result<(), ParentError> {
        let url = format!(
            "{}://{}{}{name}",
            self.scheme,
            self.registry,
            super::report::REPORT_PATH
        );
        let resp = self
            .http
            .put(&url)
            .basic_auth(&self.user, Some(&self.password))
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body)
            .send()
            .await
            .map_err(from_reqwest)?;
        match resp.status().as_u16() {
            200 | 204 => Ok(()),
            s => Err(from_status(s, url)),
        }
    }

    /// Every repository the sync token may list, following pagination.
    pub async fn catalog(&self) -> Result<Vec<String>, ParentError> {
        let mut out = Vec::new();
        let mut last: Option<String> = None;
        let bearer: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);
        // Bounded: a parent that keeps paging past a million names is not to be believed.
        for _ in 0..1000 {
            let mut url = format!("{}://{}/v2/_catalog?n={PAGE}", self.scheme, self.registry);
            if let Some(l) = &last {
                url.push_str("&last=");
                url.push_str(&form_encode(l));
            }
            let page: CatalogPage = self
                .retry("catalog", || self.get_json(&url, &bearer))
                .await?;
            let n = page.repositories.len();
            last = page.repositories.last().cloned();
            out.extend(page.repositories);
            if n < PAGE || last.is_none() {
                break;
            }
        }
        Ok(out)
    }

    /// GET with the challenge flow for the `registry:catalog:*` scope.
    async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        url: &str,
        bearer: &std::sync::Mutex<Option<String>>,
    ) -> Result<T, ParentError> {
        let mut req = self.http.get(url);
        let known = bearer.lock().unwrap_or_else(|p| p.into_inner()).clone();
        if let Some(t) = known {
            req = req.bearer_auth(t);
        }
        let mut resp = req.send().await.map_err(from_reqwest)?;
        if resp.status() == reqwest::StatusCode::UNAUTHORIZED {
            let challenge = resp.headers().get(WWW_AUTHENTICATE).cloned();
            let req = match challenge.as_ref().and_then(Challenge::parse) {
                Some(Challenge::Basic) | None => self
                    .http
                    .get(url)
                    .basic_auth(&self.user, Some(&self.password)),
                Some(Challenge::Bearer { realm, service }) => {
                    let token = self.bearer_token(&realm, service.as_deref()).await?;
                    *bearer.lock().unwrap_or_else(|p| p.into_inner()) = Some(token.clone());
                    self.http.get(url).bearer_auth(token)
                }
            };
            resp = req.send().await.map_err(from_reqwest)?;
        }
        let status = resp.status().as_u16();
        if status != 200 {
            return Err(from_status(status, url.to_owned()));
        }
        resp.json()
            .await
            .map_err(|e| ParentError::Protocol(format!("{url}: {e}")))
    }

    async fn bearer_token(
        &self,
        realm: &str,
        service: Option<&str>,
    ) -> Result<String, ParentError> {
        #[derive(serde::Deserialize)]
        struct TokenBody {
            token: Option<String>,
            access_token: Option<String>,
        }
        let mut query = vec![("scope", "registry:catalog:*")];
        if let Some(s) = service {
            query.push(("service", s));
        }
        let resp = self
            .http
            .get(realm)
            .query(&query)
            .basic_auth(&self.user, Some(&self.password))
            .send()
            .await
            .map_err(from_reqwest)?;
        let status = resp.status().as_u16();
        if status != 200 {
            return Err(from_status(status, format!("token endpoint {realm}")));
        }
        let body: TokenBody = resp
            .json()
            .await
            .map_err(|e| ParentError::Protocol(format!("token endpoint {realm}: {e}")))?;
        body.token
            .or(body.access_token)
            .ok_or_else(|| ParentError::Protocol(format!("token endpoint {realm} gave no token")))
    }

    /// Every tag of `repo`, following pagination.
    pub async fn tags(&self, repo: &RepositoryName) -> Result<Vec<String>, ParentError> {
        let image = self.tag_ref(repo, "latest");
        let mut out: Vec<String> = Vec::new();
        for _ in 0..1000 {
            let last = out.last().cloned();
            let page = self
                .retry("tags", || async {
                    Ok(self
                        .client
                        .list_tags(&image, &self.auth, Some(PAGE), last.as_deref())
                        .await?)
                })
                .await?;
            let n = page.tags.len();
            // A parent that ignores `last` would repeat the same page forever.
            if n == 0 || out.last() == page.tags.last() {
                break;
            }
            out.extend(page.tags);
            if n < PAGE {
                break;
            }
        }
        out.sort();
        out.dedup();
        Ok(out)
    }

    /// The digest a tag points at (a HEAD, so nothing is downloaded when nothing changed).
    pub async fn tag_digest(
        &self,
        repo: &RepositoryName,
        tag: &outpost_core::Tag,
    ) -> Result<Digest, ParentError> {
        self.resolve(repo, &outpost_core::Reference::Tag(tag.clone()))
            .await
    }

    /// The digest a tag or digest reference resolves to at the parent (a HEAD).
    pub async fn resolve(
        &self,
        repo: &RepositoryName,
        reference: &outpost_core::Reference,
    ) -> Result<Digest, ParentError> {
        let image = self.any_ref(repo, reference);
        let d = self
            .retry("manifest digest", || async {
                Ok(self
                    .client
                    .fetch_manifest_digest(&image, &self.auth)
                    .await?)
            })
            .await?;
        d.parse()
            .map_err(|e| ParentError::Protocol(format!("parent digest {d:?}: {e}")))
    }

    /// A manifest's bytes, by digest (checked against it) or by tag.
    pub async fn manifest(
        &self,
        repo: &RepositoryName,
        reference: &outpost_core::Reference,
    ) -> Result<Bytes, ParentError> {
        self.manifest_with(repo, reference, ATTEMPTS).await
    }

    /// [`Parent::manifest`] with a bound on attempts: a client waiting on a pull-through
    /// cannot sit through the backoff a scheduled sync can afford.
    pub async fn manifest_with(
        &self,
        repo: &RepositoryName,
        reference: &outpost_core::Reference,
        attempts: u32,
    ) -> Result<Bytes, ParentError> {
        let image = self.any_ref(repo, reference);
        let (body, _) = self
            .retry_n("manifest", attempts, || async {
                Ok(self
                    .client
                    .pull_manifest_raw(&image, &self.auth, &MANIFEST_TYPES)
                    .await?)
            })
            .await?;
        Ok(body)
    }

    /// Digests of the manifests that name `subject` as their subject (OCI 1.1 referrers API,
    /// or the referrers tag schema on parents without it).
    pub async fn referrers(
        &self,
        repo: &RepositoryName,
        subject: &Digest,
    ) -> Result<Vec<Digest>, ParentError> {
        let image = self.digest_ref(repo, subject);
        // oci-client only stores credentials on calls that take them; make sure they are there.
        self.client
            .store_auth_if_needed(image.resolve_registry(), &self.auth)
            .await;
        let index = self
            .retry("referrers", || async {
                Ok(self.client.pull_referrers(&image, None).await?)
            })
            .await?;
        Ok(index
            .manifests
            .iter()
            .filter_map(|m| m.digest.parse().ok())
            .collect())
    }

    /// Opens a blob at `offset` (a Range request when above zero). One attempt: the caller
    /// resumes from what it stored.
    pub async fn blob(
        &self,
        repo: &RepositoryName,
        digest: &Digest,
        offset: u64,
    ) -> Result<BlobBody, ParentError> {
        let image = self.digest_ref(repo, digest);
        self.client
            .store_auth_if_needed(image.resolve_registry(), &self.auth)
            .await;
        let d = digest.to_string();
        let layer: &str = &d;
        if offset == 0 {
            let s = self.client.pull_blob_stream(&image, layer).await?;
            return Ok(BlobBody {
                starts_at: 0,
                total: s.content_length,
                body: Box::pin(s.stream),
            });
        }
        match self
            .client
            .pull_blob_stream_partial(&image, layer, offset, None)
            .await?
        {
            oci_client::client::BlobResponse::Partial(s) => Ok(BlobBody {
                starts_at: offset,
                total: s.content_length.map(|n| n + offset),
                body: Box::pin(s.stream),
            }),
            oci_client::client::BlobResponse::Full(s) => Ok(BlobBody {
                starts_at: 0,
                total: s.content_length,
                body: Box::pin(s.stream),
            }),
        }
    }

    pub async fn blob_exists(
        &self,
        repo: &RepositoryName,
        digest: &Digest,
    ) -> Result<bool, ParentError> {
        let image = self.digest_ref(repo, digest);
        self.client
            .store_auth_if_needed(image.resolve_registry(), &self.auth)
            .await;
        self.retry("blob exists", || async {
            Ok(self.client.blob_exists(&image, &digest.to_string()).await?)
        })
        .await
    }

    /// Uploads a blob from a stream (one attempt: the stream cannot be replayed).
    pub async fn push_blob<S>(
        &self,
        repo: &RepositoryName,
        digest: &Digest,
        size: u64,
        body: S,
    ) -> Result<(), ParentError>
    where
        S: Stream<Item = Result<Bytes, std::io::Error>> + Send + 'static,
    {
        let image = self.digest_ref(repo, digest);
        self.client
            .auth(&image, &self.auth, oci_client::RegistryOperation::Push)
            .await?;
        let body = body.map(|r| r.map_err(OciDistributionError::IoError));
        self.client
            .push_blob_stream(&image, body, &digest.to_string(), Some(size))
            .await?;
        Ok(())
    }

    pub async fn push_manifest(
        &self,
        repo: &RepositoryName,
        reference: &outpost_core::Reference,
        media_type: &str,
        content: Bytes,
    ) -> Result<(), ParentError> {
        let image = match reference {
            outpost_core::Reference::Digest(d) => self.digest_ref(repo, d),
            outpost_core::Reference::Tag(t) => self.tag_ref(repo, t.as_str()),
        };
        let ct = HeaderValue::from_str(media_type)
            .map_err(|_| ParentError::Protocol(format!("media type {media_type:?}")))?;
        self.client
            .auth(&image, &self.auth, oci_client::RegistryOperation::Push)
            .await?;
        self.retry("push manifest", || async {
            Ok(self
                .client
                .push_manifest_raw(&image, content.clone(), ct.clone())
                .await?)
        })
        .await?;
        Ok(())
    }
}

#[derive(serde::Deserialize)]
struct CatalogPage {
    #[serde(default)]
    repositories: Vec<String>,
}

/// A `WWW-Authenticate` challenge, as far as the catalog needs it.
#[derive(Debug, PartialEq, Eq)]
enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
    },
}

impl Challenge {
    fn parse(h: &HeaderValue) -> Option<Challenge> {
        let s = h.to_str().ok()?.trim();
        let (scheme, rest) = s.split_once(' ').unwrap_or((s, ""));
        if scheme.eq_ignore_ascii_case("basic") {
            return Some(Challenge::Basic);
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        let mut realm = None;
        let mut service = None;
        for (k, v) in auth_params(rest) {
            match k.to_ascii_lowercase().as_str() {
                "realm" => realm = Some(v),
                "service" => service = Some(v),
                _ => {}
            }
        }
        Some(Challenge::Bearer {
            realm: realm?,
            service,
        })
    }
}

/// `k="v", k2=v2` pairs of an auth challenge (quoted values may hold commas).
fn auth_params(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut rest = s.trim();
    while !rest.is_empty() {
        let Some((k, after)) = rest.split_once('=') else {
            break;
        };
        let k = k.trim().trim_start_matches(',').trim().to_owned();
        let after = after.trim_start();
        let (v, next) = if let Some(q) = after.strip_prefix('"') {
            let mut v = String::new();
            let mut chars = q.char_indices();
            let mut end = q.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, n)) = chars.next() {
                            v.push(n);
                        }
                    }
                    '"' => {
                        end = i + 1;
                        break;
                    }
                    c => v.push(c),
                }
            }
            (v, &q[end..])
        } else {
            let end = after.find(',').unwrap_or(after.len());
            (after[..end].trim().to_owned(), &after[end..])
        };
        out.push((k, v));
        rest = next.trim_start().trim_start_matches(',').trim_start();
    }
    out
}

fn form_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Full-jitter exponential backoff: a random wait up to base * 2^(attempt-1), capped.
pub fn backoff(attempt: u32) -> Duration {
    let ceiling = BACKOFF_BASE
        .saturating_mul(1u32 << attempt.saturating_sub(1).min(16))
        .min(BACKOFF_CAP);
    let mut b = [0u8; 4];
    let r = if aws_lc_rs::rand::fill(&mut b).is_ok() {
        u32::from_le_bytes(b)
    } else {
        u32::MAX / 2
    };
    // Never below a tenth of the ceiling, so retries do not hammer a struggling parent.
    let frac = 0.1 + 0.9 * (r as f64 / u32::MAX as f64);
    ceiling.mul_f64(frac)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges() {
        let h = HeaderValue::from_static(
            r#"Bearer realm="https://auth.example/token?x=1,y",service="reg",scope="repository:a:pull""#,
        );
        assert_eq!(
            Challenge::parse(&h),
            Some(Challenge::Bearer {
                realm: "https://auth.example/token?x=1,y".into(),
                service: Some("reg".into())
            })
        );
        assert_eq!(
            Challenge::parse(&HeaderValue::from_static(r#"Basic realm="Registry Realm""#)),
            Some(Challenge::Basic)
        );
        assert_eq!(
            Challenge::parse(&HeaderValue::from_static("Bearer service=x")),
            None
        );
    }

    #[test]
    fn backoff_grows_and_is_capped() {
        for attempt in 1..20 {
            let b = backoff(attempt);
            let ceiling = BACKOFF_BASE
                .saturating_mul(1 << (attempt - 1).min(16))
                .min(BACKOFF_CAP);
            assert!(b <= ceiling && b >= ceiling / 10, "{attempt}: {b:?}");
        }
    }

    #[test]
    fn errors_map_to_kinds() {
        assert!(from_status(503, "x".into()).is_transient());
        assert!(matches!(
            from_status(404, "x".into()),
            ParentError::NotFound(_)
        ));
        assert!(from_status(401, "x".into()).is_contact_failure());
        assert!(!from_status(403, "x".into()).is_contact_failure());
    }
}
