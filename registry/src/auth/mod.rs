//! Who may do what: client tokens and scope maps (`--tokens`), Basic and bearer
//! authentication, anonymous access, readonly mode, and the per-request decision.

pub mod bearer;
pub mod keys;
pub mod limiter;
pub mod namespace;
pub mod tokens;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use aws_lc_rs::hmac;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use outpost_core::nscred::{self, NamespaceCredential, NsCredError};
use outpost_core::{RepositoryName, RepositoryPattern};

use bearer::{AccessEntry, BearerError, Claims, NamespaceGrant, Signer};
use keys::KeyFileError;
use limiter::FailureLimiter;
use namespace::NamespaceAuth;
pub use tokens::{Action, Actions, gateway_repository};
use tokens::{Token, TokenSet, TokensError, TokensFile};

/// The `service` of our bearer challenge; tokens for any other service are refused.
pub const SERVICE: &str = "outpost";
/// Window over which failed authentications per client address are counted.
const FAILURE_WINDOW: Duration = Duration::from_secs(60);
/// How often the tokens file is checked for changes.
const TOKENS_POLL: Duration = Duration::from_secs(2);
/// Verified bearer tokens remembered at most.
const BEARER_CACHE_MAX: usize = 10_000;
/// Longest Authorization header considered; anything longer is malformed.
const MAX_AUTHORIZATION_LEN: usize = 8192;

/// What a request without credentials may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Anonymous {
    /// Nothing: every request needs credentials.
    None,
    /// Pull (content/read, metadata/read) only.
    Pull,
    /// Everything (a loopback listener without `--tokens`).
    Full,
}

impl Anonymous {
    fn actions(self) -> Actions {
        match self {
            Anonymous::None => Actions::NONE,
            Anonymous::Pull => [Action::ContentRead, Action::MetadataRead]
                .into_iter()
                .collect(),
            Anonymous::Full => Actions::all(),
        }
    }
}

/// Credentials presented with a request.
#[derive(Clone)]
pub enum Credentials {
    None,
    Basic { name: String, password: String },
    Bearer(String),
}

impl std::fmt::Debug for Credentials {
    // Never prints secrets.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Credentials::None => f.write_str("None"),
            Credentials::Basic { name, .. } => write!(f, "Basic({name})"),
            Credentials::Bearer(_) => f.write_str("Bearer(..)"),
        }
    }
}

impl Credentials {
    /// Parses an `Authorization` header value.
    pub fn parse(header: Option<&[u8]>) -> Result<Credentials, Denial> {
        let Some(raw) = header else {
            return Ok(Credentials::None);
        };
        let malformed = || Denial::Unauthorized {
            reason: "malformed Authorization header".into(),
            scopes: Vec::new(),
            insufficient: false,
        };
        if raw.len() > MAX_AUTHORIZATION_LEN {
            return Err(malformed());
        }
        let text = std::str::from_utf8(raw).map_err(|_| malformed())?.trim();
        let (scheme, rest) = text.split_once(' ').ok_or_else(malformed)?;
        let rest = rest.trim();
        if scheme.eq_ignore_ascii_case("basic") {
            let decoded = B64.decode(rest).map_err(|_| malformed())?;
            let decoded = String::from_utf8(decoded).map_err(|_| malformed())?;
            let (name, password) = decoded.split_once(':').ok_or_else(malformed)?;
            Ok(Credentials::Basic {
                name: name.to_owned(),
                password: password.to_owned(),
            })
        } else if scheme.eq_ignore_ascii_case("bearer") && !rest.is_empty() {
            Ok(Credentials::Bearer(rest.to_owned()))
        } else {
            Err(malformed())
        }
    }
}

/// Who a request was authenticated as.
#[derive(Debug, Clone)]
pub enum Principal {
    Anonymous(Actions),
    Token(Arc<Token>),
    /// A namespace credential (pull on its patterns only).
    Namespace(Arc<NamespaceCredential>),
    Bearer {
        claims: Arc<Claims>,
        /// The client token the bearer token was issued to (None: anonymous or a namespace).
        token: Option<Arc<Token>>,
        /// The namespace credential it was issued for.
        namespace: Option<Arc<NamespaceCredential>>,
        anonymous: Actions,
    },
}

/// What a namespace credential grants on `repo`.
fn namespace_actions(c: &NamespaceCredential, repo: &str) -> Actions {
    if c.allows(repo) {
        Anonymous::Pull.actions()
    } else {
        Actions::NONE
    }
}

impl Principal {
    /// What the principal's standing permissions (scope map or anonymous policy) allow.
    fn permitted(&self, repo: &str) -> Actions {
        match self {
            Principal::Anonymous(a) => *a,
            Principal::Token(t) => t.scope_map.actions_for(repo),
            Principal::Namespace(c)
            | Principal::Bearer {
                namespace: Some(c), ..
            } => namespace_actions(c, repo),
            Principal::Bearer { token: Some(t), .. } => t.scope_map.actions_for(repo),
            Principal::Bearer {
                token: None,
                anonymous,
                ..
            } => *anonymous,
        }
    }

    /// What a bearer token's claims grant on `repo` (everything for other principals).
    fn granted(&self, repo: &str) -> Actions {
        match self {
            Principal::Bearer { claims, .. } => claims
                .access
                .iter()
                .filter(|e| e.kind == "repository" && e.name == repo)
                .flat_map(|e| e.actions.iter().filter_map(|a| Action::parse(a)))
                .collect(),
            _ => Actions::all(),
        }
    }

    /// Whether the principal may do `action` on `repo` right now.
    pub fn may(&self, repo: &str, action: Action) -> bool {
        self.permitted(repo).contains(action) && self.granted(repo).contains(action)
    }

    /// Whether `repo` shows in this principal's catalog (granted the catalog, the standing
    /// permissions decide per repository).
    pub fn may_list(&self, repo: &str) -> bool {
        self.permitted(repo).contains(Action::MetadataRead)
    }

    fn has_credentials(&self) -> bool {
        !matches!(self, Principal::Anonymous(_))
    }

    /// Whether any repository could be listed in the catalog by this principal.
    fn may_list_catalog(&self) -> bool {
        let standing = match self {
            Principal::Anonymous(a) => a.contains(Action::MetadataRead),
            // Pull includes metadata/read on every pattern of the credential.
            Principal::Namespace(_)
            | Principal::Bearer {
                namespace: Some(_), ..
            } => true,
            Principal::Token(t) | Principal::Bearer { token: Some(t), .. } => t
                .scope_map
                .rules
                .iter()
                .any(|r| r.actions.contains(Action::MetadataRead)),
            Principal::Bearer { anonymous, .. } => anonymous.contains(Action::MetadataRead),
        };
        let granted = match self {
            Principal::Bearer { claims, .. } => claims
                .access
                .iter()
                .any(|e| e.kind == "registry" && e.name == "catalog"),
            _ => true,
        };
        standing && granted
    }
}

/// Why a request may not proceed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Denial {
    /// 401 with a challenge for `scopes` (docker scope strings).
    Unauthorized {
        reason: String,
        scopes: Vec<String>,
        insufficient: bool,
    },
    /// 403: authenticated, but not allowed.
    Denied(String),
    /// 429: too many failed attempts from this address.
    TooMany(Duration),
}

/// One permission a request needs.
#[derive(Debug, Clone)]
pub struct Need {
    pub repo: RepositoryName,
    pub action: Action,
}

/// The docker scope string asking for `action` on `repo`.
pub fn scope_for(repo: &str, action: Action) -> String {
    let actions = match action {
        Action::ContentRead => "pull",
        // Pushing clients also check what is already there.
        Action::ContentWrite => "pull,push",
        Action::ContentDelete => "delete",
        Action::MetadataRead => "metadata_read",
        Action::MetadataWrite => "metadata_write",
        Action::MessageWrite => "message_write",
    };
    format!("repository:{repo}:{actions}")
}

/// The scope string for listing the catalog.
pub const CATALOG_SCOPE: &str = "registry:catalog:*";

/// Actions named by a token request's scope (docker names and ACR names).
fn requested_actions(list: &str) -> Actions {
    let mut out = Actions::NONE;
    for a in list.split(',') {
        let add: &[Action] = match a.trim() {
            "pull" => &[Action::ContentRead, Action::MetadataRead],
            "push" => &[Action::ContentWrite, Action::MetadataWrite],
            "delete" => &[Action::ContentDelete],
            "metadata_read" => &[Action::MetadataRead],
            "metadata_write" => &[Action::MetadataWrite],
            "content_read" => &[Action::ContentRead],
            "content_write" => &[Action::ContentWrite],
            "content_delete" => &[Action::ContentDelete],
            "message_write" => &[Action::MessageWrite],
            "*" => &Action::ALL,
            _ => &[],
        };
        for x in add {
            out.insert(*x);
        }
    }
    out
}

pub struct AuthOptions {
    pub tokens_file: Option<PathBuf>,
    pub anonymous: Anonymous,
    pub readonly: bool,
    /// Failed authentications per client address per minute before it gets 429s.
    pub max_failures: u32,
    /// How long an issued bearer token is valid.
    pub token_lifetime: Duration,
    /// Keys shared by every replica (`--token-signing-key-file`); `None`: a random key of
    /// this process.
    pub signing_key_file: Option<PathBuf>,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error(transparent)]
    Tokens(#[from] TokensError),
    #[error(transparent)]
    SigningKeys(#[from] KeyFileError),
    #[error("the system random generator failed")]
    Random,
}

pub struct Auth {
    tokens_file: Option<PathBuf>,
    set: RwLock<Arc<TokenSet>>,
    anonymous: Anonymous,
    readonly: bool,
    token_lifetime: Duration,
    signer: RwLock<Arc<Signer>>,
    signing_key_file: Option<PathBuf>,
    /// SHA-256 of the key file as last loaded (not its text: that is key material).
    last_keys: Mutex<Option<Vec<u8>>>,
    /// Keys the cache of passwords already verified with argon2.
    cache_key: hmac::Key,
    verified: Mutex<HashMap<String, Vec<hmac::Tag>>>,
    /// Bearer tokens already verified, by their full text: a hit skips the HMAC and the JSON.
    bearer_cache: RwLock<HashMap<String, Arc<Claims>>>,
    limiter: FailureLimiter,
    /// Verified against for unknown names, so a miss costs what a hit costs.
    dummy_hash: String,
    last_text: Mutex<Option<String>>,
    /// Namespace credentials accepted, and their counter.
    namespaces: NamespaceAuth,
}

/// Outcome of a token request: the JSON body to send.
pub struct IssuedToken {
    pub token: String,
    pub expires_in: u64,
    pub issued_at: u64,
}

impl Auth {
    pub fn new(opts: AuthOptions) -> Result<Self, AuthError> {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        let signer = match &opts.signing_key_file {
            Some(_) => Signer::from_keys(&[]),
            None => {
                tracing::info!(
                    "bearer tokens are signed with a key of this process: other replicas and \
                     restarts do not accept them (--token-signing-key-file shares keys)"
                );
                Signer::random().map_err(|_| AuthError::Random)?
            }
        };
        let auth = Auth {
            set: RwLock::new(Arc::new(TokenSet::default())),
            anonymous: opts.anonymous,
            readonly: opts.readonly,
            token_lifetime: opts.token_lifetime,
            signer: RwLock::new(Arc::new(signer)),
            signing_key_file: opts.signing_key_file,
            last_keys: Mutex::new(None),
            cache_key: hmac::Key::generate(hmac::HMAC_SHA256, &rng)
                .map_err(|_| AuthError::Random)?,
            verified: Mutex::new(HashMap::new()),
            bearer_cache: RwLock::new(HashMap::new()),
            limiter: FailureLimiter::new(opts.max_failures, FAILURE_WINDOW),
            dummy_hash: tokens::hash_password("outpost-dummy-password")?,
            last_text: Mutex::new(None),
            namespaces: NamespaceAuth::default(),
            tokens_file: opts.tokens_file,
        };
        if auth.tokens_file.is_some() {
            // At start a broken file is fatal; later it only keeps the previous set.
            auth.reload()?;
        }
        auth.reload_signing_keys()?;
        Ok(auth)
    }

    pub fn readonly(&self) -> bool {
        self.readonly
    }

    pub fn anonymous(&self) -> Anonymous {
        self.anonymous
    }

    /// Namespace credentials accepted since start, and their authentication counter.
    pub fn namespaces(&self) -> &NamespaceAuth {
        &self.namespaces
    }

    /// Re-reads the tokens file if its content changed. Returns whether it changed.
    pub fn reload(&self) -> Result<bool, TokensError> {
        let Some(path) = &self.tokens_file else {
            return Ok(false);
        };
        let text = std::fs::read_to_string(path).map_err(|source| TokensError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let mut last = self.last_text.lock().unwrap_or_else(|p| p.into_inner());
        if last.as_deref() == Some(text.as_str()) {
            return Ok(false);
        }
        let set = TokensFile::parse(&text)?.validate()?;
        let n = set.tokens.len();
        *self.set.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(set);
        self.verified
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        *last = Some(text);
        tracing::info!(tokens = n, file = %path.display(), "tokens loaded");
        Ok(true)
    }

    /// Re-reads the signing key file if its content changed. Returns whether it changed.
    pub fn reload_signing_keys(&self) -> Result<bool, KeyFileError> {
        let Some(path) = &self.signing_key_file else {
            return Ok(false);
        };
        let (signer, text) = keys::load(path)?;
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, text.as_bytes());
        let mut last = self.last_keys.lock().unwrap_or_else(|p| p.into_inner());
        if last.as_deref() == Some(digest.as_ref()) {
            return Ok(false);
        }
        let kids = signer.kids();
        *self.signer.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(signer);
        // A removed key must stop verifying now, not when its cached tokens expire.
        self.bearer_cache
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        *last = Some(digest.as_ref().to_vec());
        tracing::info!(
            keys = kids.len(),
            signing_kid = %kids.first().map(String::as_str).unwrap_or(""),
            file = %path.display(),
            "token signing keys loaded"
        );
        Ok(true)
    }

    fn signer(&self) -> Arc<Signer> {
        self.signer
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Polls the tokens and signing key files and applies changes; a file that fails to load
    /// keeps the previous set. Kubernetes swaps a `..data` symlink: reading by path follows it.
    pub fn spawn_watcher(self: &Arc<Self>) {
        if self.tokens_file.is_none() && self.signing_key_file.is_none() {
            return;
        }
        let auth = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(TOKENS_POLL).await;
                let a = auth.clone();
                let r = tokio::task::spawn_blocking(move || (a.reload(), a.reload_signing_keys()))
                    .await;
                match r {
                    Ok((tokens, keys)) => {
                        if let Err(e) = tokens {
                            tracing::warn!(error = %e, "tokens file not reloaded; keeping the previous tokens")
                        }
                        if let Err(e) = keys {
                            tracing::warn!(error = %e, "token signing key file not reloaded; keeping the previous keys")
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "tokens reload task failed"),
                }
            }
        });
    }

    fn token(&self, name: &str) -> Option<Arc<Token>> {
        self.set
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .tokens
            .get(name)
            .cloned()
    }

    fn cache_tag(&self, name: &str, password: &str) -> hmac::Tag {
        let mut ctx = hmac::Context::with_key(&self.cache_key);
        ctx.update(name.as_bytes());
        ctx.update(&[0]);
        ctx.update(password.as_bytes());
        ctx.sign()
    }

    fn cached(&self, name: &str, tag: &hmac::Tag) -> bool {
        let map = self.verified.lock().unwrap_or_else(|p| p.into_inner());
        map.get(name).is_some_and(|tags| {
            tags.iter().any(|t| {
                aws_lc_rs::constant_time::verify_slices_are_equal(t.as_ref(), tag.as_ref()).is_ok()
            })
        })
    }

    fn unauthorized(reason: &str) -> Denial {
        Denial::Unauthorized {
            reason: reason.to_owned(),
            scopes: Vec::new(),
            insufficient: false,
        }
    }

    /// Establishes who is asking. Failed attempts count against the client's address.
    pub async fn authenticate(
        self: &Arc<Self>,
        ip: IpAddr,
        creds: Credentials,
    ) -> Result<Principal, Denial> {
        // Without a tokens file no client token can be checked: like any registry without
        // auth, ignore credentials (a client with stored logins still pulls from a loopback
        // Outpost). Namespace credentials and the bearer tokens issued for them need only
        // the signing key file.
        if self.tokens_file.is_none() {
            let namespace_only = self.signing_key_file.is_some()
                && match &creds {
                    Credentials::Basic { password, .. } => nscred::looks_like(password),
                    // Verified once, below, where a namespace's token is told from others.
                    Credentials::Bearer(_) => true,
                    Credentials::None => false,
                };
            if !namespace_only {
                return Ok(Principal::Anonymous(self.anonymous.actions()));
            }
        }
        match creds {
            Credentials::None => Ok(Principal::Anonymous(self.anonymous.actions())),
            Credentials::Basic { name, password } if nscred::looks_like(&password) => {
                self.limiter.check(ip).map_err(Denial::TooMany)?;
                self.authenticate_namespace(ip, &name, &password)
            }
            Credentials::Basic { name, password } => {
                self.limiter.check(ip).map_err(Denial::TooMany)?;
                let token = self.token(&name);
                let tag = self.cache_tag(&name, &password);
                let ok = match &token {
                    Some(t) if self.cached(&name, &tag) => t.enabled,
                    _ => {
                        let (t2, me) = (token.clone(), self.clone());
                        // argon2 is deliberately slow: keep it off the async threads.
                        tokio::task::spawn_blocking(move || match t2 {
                            Some(t) => t.verify(&password).is_some() && t.enabled,
                            None => {
                                let _ = tokens::verify_hash(&me.dummy_hash, &password);
                                false
                            }
                        })
                        .await
                        .unwrap_or(false)
                    }
                };
                match token {
                    Some(t) if ok => {
                        let mut map = self.verified.lock().unwrap_or_else(|p| p.into_inner());
                        let tags = map.entry(name).or_default();
                        // At most the two passwords a token can have.
                        if !tags.iter().any(|x| x.as_ref() == tag.as_ref()) {
                            if tags.len() >= 2 {
                                tags.remove(0);
                            }
                            tags.push(tag);
                        }
                        Ok(Principal::Token(t))
                    }
                    _ => {
                        self.limiter.record_failure(ip);
                        Err(Self::unauthorized("invalid username or password"))
                    }
                }
            }
            Credentials::Bearer(tok) => {
                let verified = self.verify_bearer(&tok);
                // Without a tokens file only a namespace's bearer token counts; any other is
                // ignored, as credentials are without one.
                if self.tokens_file.is_none() && !verified.as_ref().is_ok_and(|c| c.ns.is_some()) {
                    return Ok(Principal::Anonymous(self.anonymous.actions()));
                }
                self.limiter.check(ip).map_err(Denial::TooMany)?;
                match verified {
                    Ok(claims) if claims.ns.is_some() => {
                        let namespace = self.bearer_namespace(&claims)?;
                        Ok(Principal::Bearer {
                            claims,
                            token: None,
                            namespace: Some(namespace),
                            anonymous: Actions::NONE,
                        })
                    }
                    Ok(claims) => {
                        let token = if claims.sub.is_empty() {
                            None
                        } else {
                            match self.token(&claims.sub) {
                                Some(t) if t.enabled => Some(t),
                                _ => return Err(Self::unauthorized("token revoked or disabled")),
                            }
                        };
                        Ok(Principal::Bearer {
                            claims,
                            token,
                            namespace: None,
                            anonymous: self.anonymous.actions(),
                        })
                    }
                    Err(e) => {
                        if e != BearerError::Expired {
                            self.limiter.record_failure(ip);
                        }
                        Err(Self::unauthorized(&e.to_string()))
                    }
                }
            }
        }
    }

    /// Checks a namespace credential presented as Basic `name`:`password`. The username must
    /// be the credential's namespace. Refusals are 401 like a wrong password; an expired
    /// credential does not count against the address (a node whose pods still hold an old
    /// secret must not lock out the others).
    fn authenticate_namespace(
        &self,
        ip: IpAddr,
        name: &str,
        password: &str,
    ) -> Result<Principal, Denial> {
        let now = bearer::now_secs();
        let checked = nscred::verify(self.signer().keys(), password, now).and_then(|c| {
            if c.namespace == name {
                Ok(c)
            } else {
                Err(NsCredError::Namespace(String::new()))
            }
        });
        match checked {
            Ok(c) => {
                self.namespaces.accepted(&c, now);
                Ok(Principal::Namespace(Arc::new(c)))
            }
            Err(e) => {
                let result = match &e {
                    NsCredError::Namespace(_) => "wrong_username",
                    e => namespace::result_of(e),
                };
                self.namespaces.refused(result, name);
                if !matches!(e, NsCredError::Expired | NsCredError::NotYetValid) {
                    self.limiter.record_failure(ip);
                }
                Err(Self::unauthorized(match e {
                    NsCredError::Expired => "namespace credential has expired",
                    NsCredError::NotYetValid => "namespace credential is not valid yet",
                    _ => "invalid username or password",
                }))
            }
        }
    }

    /// The namespace credential a bearer token was issued for, if its signing key is still
    /// in the key file (removing a key revokes the bearer tokens of its credentials too).
    fn bearer_namespace(&self, claims: &Claims) -> Result<Arc<NamespaceCredential>, Denial> {
        let revoked = || Self::unauthorized("namespace credential revoked");
        let g = claims.ns.as_ref().ok_or_else(revoked)?;
        if self.signer().keys().find(&g.kid).is_none() || g.exp <= bearer::now_secs() {
            return Err(revoked());
        }
        let repositories = g
            .repos
            .iter()
            .map(|r| r.parse::<RepositoryPattern>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| revoked())?;
        Ok(Arc::new(NamespaceCredential {
            namespace: g.namespace.clone(),
            repositories,
            issued_at: claims.iat,
            expires_at: g.exp,
            kid: g.kid.clone(),
        }))
    }

    /// Verifies a bearer token, from the cache when this exact token was seen before.
    fn verify_bearer(&self, tok: &str) -> Result<Arc<Claims>, BearerError> {
        let cached = self
            .bearer_cache
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(tok)
            .cloned();
        if let Some(c) = cached {
            return if c.exp > bearer::now_secs() {
                Ok(c)
            } else {
                Err(BearerError::Expired)
            };
        }
        let signer = self.signer();
        let claims = Arc::new(signer.verify(tok, SERVICE)?);
        let mut cache = self.bearer_cache.write().unwrap_or_else(|p| p.into_inner());
        // Keys reloaded meanwhile: the reload cleared the cache, do not put back a token
        // verified with keys that may be gone.
        if !Arc::ptr_eq(&signer, &self.signer()) {
            return Ok(claims);
        }
        // Tokens live five minutes; dropping the lot now and then bounds the memory.
        if cache.len() >= BEARER_CACHE_MAX {
            cache.clear();
        }
        cache.insert(tok.to_owned(), claims.clone());
        Ok(claims)
    }

    /// Decides whether `principal` may do everything in `needs`.
    pub fn authorize(&self, principal: &Principal, needs: &[Need]) -> Result<(), Denial> {
        if self.readonly && needs.iter().any(|n| n.action.is_write()) {
            return Err(Denial::Denied(
                "this registry is readonly: pushes and deletes are refused".into(),
            ));
        }
        if needs.is_empty() {
            // The base endpoint: anyone authenticated, or anonymous if it may do anything.
            if principal.has_credentials() || !self.anonymous.actions().is_empty() {
                return Ok(());
            }
            return Err(Self::unauthorized("authentication required"));
        }
        for n in needs {
            let repo = n.repo.as_str();
            if principal.may(repo, n.action) {
                continue;
            }
            let scopes = needs
                .iter()
                .map(|n| scope_for(n.repo.as_str(), n.action))
                .collect();
            return Err(if !principal.has_credentials() {
                Denial::Unauthorized {
                    reason: "authentication required".into(),
                    scopes,
                    insufficient: false,
                }
            } else if principal.permitted(repo).contains(n.action) {
                // Allowed, but this bearer token was not issued for it: fetch another.
                Denial::Unauthorized {
                    reason: "bearer token does not cover this request".into(),
                    scopes,
                    insufficient: true,
                }
            } else {
                Denial::Denied(format!(
                    "{} on {repo} is outside the token's scope",
                    n.action.as_str()
                ))
            });
        }
        Ok(())
    }

    /// Whether the principal may list the catalog (then filtered per repository).
    pub fn authorize_catalog(&self, principal: &Principal) -> Result<(), Denial> {
        if principal.may_list_catalog() {
            return Ok(());
        }
        Err(if principal.has_credentials() {
            match principal {
                Principal::Bearer { .. } => Denial::Unauthorized {
                    reason: "bearer token does not cover the catalog".into(),
                    scopes: vec![CATALOG_SCOPE.into()],
                    insufficient: true,
                },
                _ => Denial::Denied("the token may not read metadata of any repository".into()),
            }
        } else {
            Denial::Unauthorized {
                reason: "authentication required".into(),
                scopes: vec![CATALOG_SCOPE.into()],
                insufficient: false,
            }
        })
    }

    /// Issues a bearer token for `scopes` to an authenticated (or anonymous) principal. What
    /// is granted is what was asked for and is allowed; never more.
    pub fn issue(
        &self,
        principal: &Principal,
        service: Option<&str>,
        scopes: &[String],
    ) -> Result<IssuedToken, Denial> {
        if service.is_some_and(|s| s != SERVICE) {
            return Err(Denial::Denied(format!(
                "this token endpoint issues tokens for service {SERVICE:?} only"
            )));
        }
        let sub = match principal {
            Principal::Token(t) => t.name.clone(),
            // Not a client token name (those have no ':'): older replicas refuse it.
            Principal::Namespace(c) => format!("namespace:{}", c.namespace),
            Principal::Anonymous(a) if !a.is_empty() => String::new(),
            _ => return Err(Self::unauthorized("authentication required")),
        };
        let mut access = Vec::new();
        for s in scopes.iter().flat_map(|s| s.split(' ')) {
            let mut parts = s.splitn(3, ':');
            let (Some(kind), Some(name), Some(actions)) =
                (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            match kind {
                "repository" => {
                    let Ok(repo) = name.parse::<RepositoryName>() else {
                        continue;
                    };
                    let mut granted =
                        requested_actions(actions).intersect(principal.permitted(repo.as_str()));
                    if self.readonly {
                        granted = granted.iter().filter(|a| !a.is_write()).collect();
                    }
                    if !granted.is_empty() {
                        access.push(AccessEntry {
                            kind: "repository".into(),
                            name: repo.to_string(),
                            actions: granted.iter().map(|a| a.as_str().to_owned()).collect(),
                        });
                    }
                }
                "registry" if name == "catalog" && principal.may_list_catalog() => {
                    access.push(AccessEntry {
                        kind: "registry".into(),
                        name: "catalog".into(),
                        actions: vec!["*".into()],
                    });
                }
                _ => {}
            }
        }
        let now = bearer::now_secs();
        let mut lifetime = self.token_lifetime.as_secs().max(1);
        let ns = match principal {
            Principal::Namespace(c) => {
                // The token ends when the credential does, at the latest.
                lifetime = lifetime.min(c.expires_at.saturating_sub(now)).max(1);
                Some(NamespaceGrant {
                    namespace: c.namespace.clone(),
                    repos: c
                        .repositories
                        .iter()
                        .map(|p| p.as_str().to_owned())
                        .collect(),
                    kid: c.kid.clone(),
                    exp: c.expires_at,
                })
            }
            _ => None,
        };
        let token = self.signer().issue(&Claims {
            iss: bearer::ISSUER.into(),
            aud: SERVICE.into(),
            sub,
            iat: now,
            exp: now + lifetime,
            access,
            ns,
        });
        Ok(IssuedToken {
            token,
            expires_in: lifetime,
            issued_at: now,
        })
    }
}

#[cfg(test)]
mod tests;
