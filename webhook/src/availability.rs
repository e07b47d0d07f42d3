//! Can Outpost serve this image? A `HEAD` on the manifest at the Outpost registry, with the
//! pull secret's credentials, a short timeout, and a brief cache shared by concurrent
//! admissions: one request in flight per image, however many pods ask at once.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use base64::Engine;
use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use outpost_core::{Host, ImageReference};
use reqwest::StatusCode;
use reqwest::header::{ACCEPT, AUTHORIZATION, WWW_AUTHENTICATE};

/// The manifest media types a runtime accepts; a registry may 404 a HEAD without them.
const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
    application/vnd.oci.image.manifest.v1+json, \
    application/vnd.docker.distribution.manifest.list.v2+json, \
    application/vnd.docker.distribution.manifest.v2+json";

/// Above this many cached entries, expired ones are swept on insert.
const SWEEP_ABOVE: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum AvailabilityError {
    #[error("cannot read the registry CA file {path}: {reason}")]
    Ca { path: String, reason: String },
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
}

/// `Ok` if Outpost can serve the image, else why not (for the pod annotation).
pub type Outcome = Result<(), String>;

/// Host, repository, manifest reference.
type Key = (String, String, String);

struct Entry {
    started: Instant,
    outcome: Shared<BoxFuture<'static, Outcome>>,
}

pub struct Settings {
    /// Per-request timeout of the HEAD (and token request).
    pub timeout: Duration,
    /// How long an answer is reused.
    pub cache_ttl: Duration,
    /// PEM CA bundle for Outpost's certificate, trusted instead of the system roots.
    pub ca_file: Option<PathBuf>,
    /// A `.dockerconfigjson` file (the mounted pull secret) with Outpost's credentials.
    pub auth_file: Option<PathBuf>,
    /// Use `http://` (loopback labs and tests only).
    pub plain_http: bool,
    /// Without credentials for the Outpost host in `auth_file`: a short-lived namespace
    /// credential minted with these keys (the registry may refuse anonymous pulls, and the
    /// chart then has no client token for the checks).
    pub mint: Option<CheckMint>,
}

/// The namespace credential the checks mint for themselves: `namespace` (the webhook's own)
/// pulling everything, valid for [`CHECK_CREDENTIAL_SECS`]; never stored or logged.
pub struct CheckMint {
    pub credentials: Arc<crate::nscred::Credentials>,
    pub namespace: String,
}

/// Lifetime of a check credential: only the one HEAD (and token request) uses it.
const CHECK_CREDENTIAL_SECS: u64 = 300;

pub struct Checker {
    /// Rebuilt when the managed trust bundle changes (a CA rotation).
    client: RwLock<reqwest::Client>,
    settings: Settings,
    cache: Mutex<HashMap<Key, Entry>>,
}

impl Checker {
    pub fn new(settings: Settings) -> Result<Arc<Self>, AvailabilityError> {
        let roots = match &settings.ca_file {
            Some(path) => {
                let err = |reason: String| AvailabilityError::Ca {
                    path: path.display().to_string(),
                    reason,
                };
                let pem = std::fs::read(path).map_err(|e| err(e.to_string()))?;
                Some(roots(&pem).map_err(err)?)
            }
            None => None,
        };
        let client = build_client(&settings, roots)?;
        Ok(Arc::new(Checker {
            client: RwLock::new(client),
            settings,
            cache: Mutex::new(HashMap::new()),
        }))
    }

    /// Trusts only the CAs of `pem` (the managed trust bundle) from now on.
    pub fn set_ca_bundle(&self, pem: &[u8]) -> Result<(), AvailabilityError> {
        let certs = roots(pem).map_err(|reason| AvailabilityError::Ca {
            path: "the managed trust bundle".into(),
            reason,
        })?;
        let client = build_client(&self.settings, Some(certs))?;
        match self.client.write() {
            Ok(mut c) => *c = client,
            Err(p) => *p.into_inner() = client,
        }
        Ok(())
    }

    fn client(&self) -> reqwest::Client {
        match self.client.read() {
            Ok(c) => c.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    /// Whether `image` (already on the Outpost host) can be served. Concurrent calls for the
    /// same image share one request; answers are reused for the cache TTL.
    pub async fn check(self: &Arc<Self>, image: &ImageReference) -> Outcome {
        let key = (
            image.host().to_string(),
            image.repository().as_str().to_owned(),
            image.manifest_reference(),
        );
        let fut = {
            let mut cache = match self.cache.lock() {
                Ok(c) => c,
                Err(poisoned) => poisoned.into_inner(),
            };
            let now = Instant::now();
            match cache.get(&key) {
                Some(e) if now.duration_since(e.started) < self.settings.cache_ttl => {
                    e.outcome.clone()
                }
                _ => {
                    if cache.len() > SWEEP_ABOVE {
                        let ttl = self.settings.cache_ttl;
                        cache.retain(|_, e| now.duration_since(e.started) < ttl);
                    }
                    let me = Arc::clone(self);
                    let host = image.host().clone();
                    let (_, repo, reference) = key.clone();
                    // Spawned, so the check completes and is cached even if the admission
                    // that started it runs out of budget and stops waiting.
                    let task = tokio::spawn(async move { me.head(&host, &repo, &reference).await });
                    let outcome = async move {
                        task.await
                            .unwrap_or_else(|e| Err(format!("availability check failed: {e}")))
                    }
                    .boxed()
                    .shared();
                    cache.insert(
                        key,
                        Entry {
                            started: now,
                            outcome: outcome.clone(),
                        },
                    );
                    outcome
                }
            }
        };
        fut.await
    }

    fn url(&self, host: &Host, path: &str) -> String {
        let scheme = if self.settings.plain_http {
            "http"
        } else {
            "https"
        };
        format!("{scheme}://{host}{path}")
    }

    async fn head(&self, host: &Host, repo: &str, reference: &str) -> Outcome {
        let url = self.url(host, &format!("/v2/{repo}/manifests/{reference}"));
        let basic = self.basic_auth(host).or_else(|| self.minted_auth());
        let client = self.client();
        let send = |auth: Option<String>| {
            let mut req = client.head(&url).header(ACCEPT, MANIFEST_ACCEPT);
            if let Some(a) = auth {
                req = req.header(AUTHORIZATION, a);
            }
            req.send()
        };
        let describe = |e: reqwest::Error| {
            if e.is_timeout() {
                format!(
                    "Outpost did not answer within {} ms",
                    self.settings.timeout.as_millis()
                )
            } else {
                format!("Outpost unreachable: {}", error_chain(&e))
            }
        };
        let mut resp = send(basic.clone()).await.map_err(describe)?;
        if resp.status() == StatusCode::UNAUTHORIZED
            && let Some(challenge) = resp
                .headers()
                .get(WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .and_then(BearerChallenge::parse)
        {
            let token = self.token(&challenge, repo, basic).await?;
            resp = send(Some(format!("Bearer {token}")))
                .await
                .map_err(describe)?;
        }
        match resp.status() {
            s if s.is_success() => Ok(()),
            StatusCode::NOT_FOUND => Err(format!(
                "{repo}:{reference} is not on Outpost {host} (manifest unknown)"
            )),
            s @ (StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) => Err(format!(
                "Outpost {host} refused access to {repo} (HTTP {})",
                s.as_u16()
            )),
            s => Err(format!("Outpost {host} answered HTTP {}", s.as_u16())),
        }
    }

    /// Token for a bearer challenge (registries that do not take Basic on /v2).
    async fn token(
        &self,
        challenge: &BearerChallenge,
        repo: &str,
        basic: Option<String>,
    ) -> Result<String, String> {
        let scope = challenge
            .scope
            .clone()
            .unwrap_or_else(|| format!("repository:{repo}:pull"));
        let mut url = reqwest::Url::parse(&challenge.realm).map_err(|e| {
            format!(
                "Outpost token realm {:?} is not a URL: {e}",
                challenge.realm
            )
        })?;
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("scope", &scope);
            if let Some(s) = &challenge.service {
                q.append_pair("service", s);
            }
        }
        let mut req = self.client().get(url);
        let basic_sent = basic.is_some();
        if let Some(b) = basic {
            req = req.header(AUTHORIZATION, b);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| format!("Outpost token request failed: {}", error_chain(&e)))?;
        match resp.status() {
            s if s.is_success() => {}
            s @ (StatusCode::UNAUTHORIZED | StatusCode::FORBIDDEN) => {
                let creds = if basic_sent {
                    "the pull secret's"
                } else {
                    "no"
                };
                return Err(format!(
                    "Outpost refused access to {repo} with {creds} credentials (token endpoint HTTP {})",
                    s.as_u16()
                ));
            }
            s => {
                return Err(format!(
                    "Outpost token endpoint answered HTTP {}",
                    s.as_u16()
                ));
            }
        }
        #[derive(serde::Deserialize)]
        struct TokenBody {
            token: Option<String>,
            access_token: Option<String>,
        }
        let body: TokenBody = resp
            .json()
            .await
            .map_err(|e| format!("Outpost token response unreadable: {e}"))?;
        body.token
            .or(body.access_token)
            .ok_or_else(|| "Outpost token response holds no token".to_owned())
    }

    /// `Basic …` with a fresh check credential, when keys are given and load.
    fn minted_auth(&self) -> Option<String> {
        let m = self.settings.mint.as_ref()?;
        let minter = match m.credentials.keys.minter() {
            Ok(k) => k,
            Err(e) => {
                tracing::warn!(error = %e, "no check credential: the signing key file does not load");
                return None;
            }
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let all = crate::nscred::Scope::parse("**").ok()?;
        match minter.mint(&m.namespace, &all, now, now + CHECK_CREDENTIAL_SECS) {
            Ok(c) => Some(format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD
                    .encode(format!("{}:{}", c.username, c.password))
            )),
            Err(e) => {
                tracing::warn!(error = %e, "no check credential");
                None
            }
        }
    }

    /// `Basic …` from the dockerconfigjson file's entry for the Outpost host. Read on every
    /// check (only cache misses), so a rotated secret applies at once.
    fn basic_auth(&self, host: &Host) -> Option<String> {
        let path = self.settings.auth_file.as_ref()?;
        let text = match std::fs::read(path) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(file = %path.display(), error = %e, "cannot read the registry auth file");
                return None;
            }
        };
        let creds = credentials_for(&text, host.as_str());
        if creds.is_none() {
            tracing::debug!(file = %path.display(), %host, "no credentials for the Outpost host in the auth file");
        }
        creds
    }
}

fn roots(pem: &[u8]) -> Result<Vec<reqwest::Certificate>, String> {
    let certs = reqwest::Certificate::from_pem_bundle(pem).map_err(|e| e.to_string())?;
    if certs.is_empty() {
        return Err("no certificate in it".into());
    }
    Ok(certs)
}

fn build_client(
    settings: &Settings,
    roots: Option<Vec<reqwest::Certificate>>,
) -> Result<reqwest::Client, AvailabilityError> {
    let mut builder = reqwest::Client::builder()
        .timeout(settings.timeout)
        .connect_timeout(settings.timeout)
        .pool_idle_timeout(Duration::from_secs(60))
        .user_agent(concat!("outpost-webhook/", env!("CARGO_PKG_VERSION")));
    if let Some(certs) = roots {
        // Only these CAs: Outpost's certificate comes from the cluster's own issuer.
        builder = builder.tls_certs_only(certs);
    }
    builder
        .build()
        .map_err(|e| AvailabilityError::Client(e.to_string()))
}

/// The `Authorization` value for `host` in a `.dockerconfigjson` (or legacy `.dockercfg`)
/// document: its `auth` field, or `username`/`password`.
pub fn credentials_for(doc: &[u8], host: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(doc).ok()?;
    let auths = v.get("auths").unwrap_or(&v).as_object()?;
    let entry = auths.iter().find_map(|(k, e)| {
        let k = k
            .trim_start_matches("https://")
            .trim_start_matches("http://");
        let k = k.split('/').next().unwrap_or(k);
        (k == host).then_some(e)
    })?;
    if let Some(auth) = entry.get("auth").and_then(|a| a.as_str())
        && !auth.is_empty()
    {
        return Some(format!("Basic {auth}"));
    }
    let user = entry.get("username")?.as_str()?;
    let pass = entry.get("password")?.as_str()?;
    let b64 = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"));
    Some(format!("Basic {b64}"))
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[derive(Debug, PartialEq, Eq)]
struct BearerChallenge {
    realm: String,
    service: Option<String>,
    scope: Option<String>,
}

impl BearerChallenge {
    /// `Bearer realm="…",service="…",scope="…"`.
    fn parse(header: &str) -> Option<Self> {
        let rest = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))?;
        let mut realm = None;
        let mut service = None;
        let mut scope = None;
        let mut s = rest.trim();
        while !s.is_empty() {
            let (name, after) = s.split_once('=')?;
            let after = after.strip_prefix('"')?;
            let (value, tail) = after.split_once('"')?;
            match name.trim() {
                "realm" => realm = Some(value.to_owned()),
                "service" => service = Some(value.to_owned()),
                "scope" => scope = Some(value.to_owned()),
                _ => {}
            }
            s = tail.trim_start_matches([',', ' ']);
        }
        Some(BearerChallenge {
            realm: realm?,
            service,
            scope,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_dockerconfigjson() {
        let doc = br#"{"auths":{"10.0.0.1:5000":{"auth":"dTpw"},"https://other.io/v1/":{"username":"a","password":"b"}}}"#;
        assert_eq!(
            credentials_for(doc, "10.0.0.1:5000").as_deref(),
            Some("Basic dTpw")
        );
        assert_eq!(
            credentials_for(doc, "other.io").as_deref(),
            Some("Basic YTpi")
        );
        assert_eq!(credentials_for(doc, "nowhere.io"), None);
        assert_eq!(credentials_for(b"not json", "x"), None);
    }

    fn settings(auth_file: Option<PathBuf>, mint: Option<CheckMint>) -> Settings {
        Settings {
            timeout: Duration::from_secs(1),
            cache_ttl: Duration::from_secs(1),
            ca_file: None,
            auth_file,
            plain_http: true,
            mint,
        }
    }

    #[test]
    fn checks_mint_a_short_lived_credential_without_a_pull_secret() {
        let dir = tempfile::tempdir().unwrap();
        let key_path = dir.path().join("signing-keys");
        let key_text = format!("{}\n", outpost_core::keys::generate().unwrap());
        std::fs::write(&key_path, &key_text).unwrap();
        let mint = || CheckMint {
            credentials: Arc::new(crate::nscred::Credentials::new(
                crate::nscred::KeyFile::new(key_path.clone(), crate::nscred::parse_key_file),
                Duration::from_secs(3600),
                crate::nscred::Scope::parse("**").unwrap(),
                None,
            )),
            namespace: "outpost".into(),
        };
        let checker = Checker::new(settings(None, Some(mint()))).unwrap();
        let basic = checker.minted_auth().expect("a minted credential");
        let raw = base64::engine::general_purpose::STANDARD
            .decode(basic.strip_prefix("Basic ").unwrap())
            .unwrap();
        let (user, password) = std::str::from_utf8(&raw).unwrap().split_once(':').unwrap();
        assert_eq!(user, "outpost");
        let keys = outpost_core::SigningKeys::parse(&key_path, &key_text).unwrap();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        let cred = outpost_core::nscred::verify(&keys, password, now).unwrap();
        assert_eq!(cred.namespace, "outpost");
        assert!(cred.allows("any/repo/at/all"), "{cred:?}");
        assert!(
            cred.expires_at <= now + CHECK_CREDENTIAL_SECS,
            "short-lived: {cred:?}"
        );
        // The pull secret's entry wins when it names the host; nothing without keys.
        let auth = dir.path().join("auth.json");
        std::fs::write(&auth, br#"{"auths":{"r.local":{"auth":"dTpw"}}}"#).unwrap();
        let host: Host = "r.local".parse().unwrap();
        let with_file = Checker::new(settings(Some(auth), Some(mint()))).unwrap();
        assert_eq!(with_file.basic_auth(&host).as_deref(), Some("Basic dTpw"));
        assert!(
            Checker::new(settings(None, None))
                .unwrap()
                .minted_auth()
                .is_none()
        );
    }

    #[test]
    fn parses_bearer_challenges() {
        let c = BearerChallenge::parse(
            r#"Bearer realm="https://r.io/oauth2/token",service="r.io",scope="repository:a:pull""#,
        )
        .unwrap();
        assert_eq!(c.realm, "https://r.io/oauth2/token");
        assert_eq!(c.service.as_deref(), Some("r.io"));
        assert_eq!(c.scope.as_deref(), Some("repository:a:pull"));
        assert!(BearerChallenge::parse("Basic realm=\"x\"").is_none());
        assert!(BearerChallenge::parse("Bearer service=\"x\"").is_none());
    }
}
