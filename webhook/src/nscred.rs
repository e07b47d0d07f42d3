//! Namespace credentials: what the pull-secret controller needs to mint a credential of its
//! own for every opted-in namespace instead of copying one shared secret. The namespace's
//! allowed repository patterns (its `outpost.io/repositories` annotation, else the default
//! scope), and the shared token signing key file the registry verifies them with.
//!
//! The credential format itself belongs to `outpost_core::nscred`, which the registry
//! verifies with; [`KeyFile`] loads the key file, follows its changes and mints through it
//! (behind the small [`Mint`] trait).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, RwLock};

use outpost_core::RepositoryPattern;

/// The namespace annotation naming the repositories its credential may pull
/// (`team-a/**, base/*`). Set by cluster admins; namespaces without it get the default scope.
pub const REPOSITORIES_ANNOTATION: &str = "outpost.io/repositories";

/// Why an annotation was refused. Carries the offending entry (annotations are not secret).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScopeError {
    #[error(
        "{REPOSITORIES_ANNOTATION} is empty; it must list repository patterns, comma-separated"
    )]
    Empty,
    #[error("{REPOSITORIES_ANNOTATION} has an empty entry (two commas, or a trailing comma)")]
    EmptyEntry,
    #[error("{REPOSITORIES_ANNOTATION}: {0}")]
    Pattern(#[from] outpost_core::PatternError),
    #[error(
        "{REPOSITORIES_ANNOTATION} lists {0} patterns; a credential holds {MAX_PATTERNS} at most"
    )]
    TooMany(usize),
}

/// Most patterns in one credential (the shared format's limit).
pub use outpost_core::nscred::MAX_PATTERNS;

/// A namespace's allowed patterns: sorted and without duplicates, so equal scopes compare and
/// print equal however the annotation orders them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope(Vec<RepositoryPattern>);

impl Scope {
    pub fn new(mut patterns: Vec<RepositoryPattern>) -> Scope {
        patterns.sort_by(|a, b| a.as_str().cmp(b.as_str()));
        patterns.dedup();
        Scope(patterns)
    }

    /// Parses an annotation value: patterns separated by commas, spaces around them ignored.
    pub fn parse(text: &str) -> Result<Scope, ScopeError> {
        if text.trim().is_empty() {
            return Err(ScopeError::Empty);
        }
        let mut patterns = Vec::new();
        for entry in text.split(',') {
            let entry = entry.trim();
            if entry.is_empty() {
                return Err(ScopeError::EmptyEntry);
            }
            patterns.push(entry.parse::<RepositoryPattern>()?);
        }
        let scope = Scope::new(patterns);
        if scope.0.len() > MAX_PATTERNS {
            return Err(ScopeError::TooMany(scope.0.len()));
        }
        Ok(scope)
    }

    pub fn patterns(&self) -> &[RepositoryPattern] {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// True if a credential of this scope may pull `repository`.
    pub fn allows(&self, repository: &str) -> bool {
        self.0.iter().any(|p| p.matches(repository))
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, p) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            f.write_str(p.as_str())?;
        }
        Ok(())
    }
}

/// The scope of a namespace from its annotation, or `default` without one.
pub fn scope_of(annotation: Option<&str>, default: &Scope) -> Result<Scope, ScopeError> {
    match annotation {
        Some(text) => Scope::parse(text),
        None => Ok(default.clone()),
    }
}

/// A minted credential, as containerd sends it over Basic.
pub struct Minted {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Minted {
    // The password is the credential: never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Minted")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// What the controller needs of the shared format: the signing key's id (it changes on
/// rotation, which re-mints) and minting.
pub trait Mint: Send + Sync {
    fn kid(&self) -> String;
    /// True if `kid` names a key of the file (signing or verifying only).
    fn knows(&self, kid: &str) -> bool;
    /// A credential for `namespace` pulling `scope` (read only), issued at `issued` and valid
    /// until `expires` (Unix seconds).
    fn mint(
        &self,
        namespace: &str,
        scope: &Scope,
        issued: u64,
        expires: u64,
    ) -> Result<Minted, MintError>;
}

/// The format's refusal to mint (never carries key material).
#[derive(Debug, thiserror::Error)]
#[error("cannot mint a credential for namespace {namespace}: {reason}")]
pub struct MintError {
    pub namespace: String,
    pub reason: String,
}

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read namespace credential key file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// The format's own refusal: it names the file and line, never key material.
    #[error(transparent)]
    Invalid(outpost_core::KeyFileError),
    #[error("namespace credential key file {path} is not loaded yet")]
    NotLoaded { path: String },
}

/// Parses a key file's text into a minter (the first key signs).
pub type Parser = fn(&Path, &str) -> Result<Arc<dyn Mint>, KeyError>;

/// The signing key file, re-read when its content changes (a Secret volume swaps it on
/// rotation); a broken edit keeps the last good keys.
pub struct KeyFile {
    path: PathBuf,
    parse: Parser,
    current: RwLock<Option<(String, Arc<dyn Mint>)>>,
}

impl KeyFile {
    pub fn new(path: PathBuf, parse: Parser) -> KeyFile {
        KeyFile {
            path,
            parse,
            current: RwLock::new(None),
        }
    }

    /// Re-reads the file; true when the keys changed (a first load included).
    pub fn reload(&self) -> Result<bool, KeyError> {
        let text = std::fs::read_to_string(&self.path).map_err(|source| KeyError::Read {
            path: self.path.display().to_string(),
            source,
        })?;
        let same = match self.current.read() {
            Ok(c) => c.as_ref().is_some_and(|(t, _)| *t == text),
            Err(p) => p.into_inner().as_ref().is_some_and(|(t, _)| *t == text),
        };
        if same {
            return Ok(false);
        }
        let minter = (self.parse)(&self.path, &text)?;
        let mut w = match self.current.write() {
            Ok(w) => w,
            Err(p) => p.into_inner(),
        };
        *w = Some((text, minter));
        Ok(true)
    }

    /// The current minter; loads the file first if it never loaded.
    pub fn minter(&self) -> Result<Arc<dyn Mint>, KeyError> {
        let loaded = |c: &Option<(String, Arc<dyn Mint>)>| c.as_ref().map(|(_, m)| Arc::clone(m));
        let now = match self.current.read() {
            Ok(c) => loaded(&c),
            Err(p) => loaded(&p.into_inner()),
        };
        if let Some(m) = now {
            return Ok(m);
        }
        self.reload()?;
        match self.current.read() {
            Ok(c) => loaded(&c),
            Err(p) => loaded(&p.into_inner()),
        }
        .ok_or_else(|| KeyError::NotLoaded {
            path: self.path.display().to_string(),
        })
    }
}

/// The shared format (`outpost_core::nscred`) under the keys of one file.
struct CoreMint(outpost_core::SigningKeys);

impl Mint for CoreMint {
    fn kid(&self) -> String {
        self.0
            .signing()
            .map(|k| k.kid().to_owned())
            .unwrap_or_default()
    }

    fn knows(&self, kid: &str) -> bool {
        self.0.find(kid).is_some()
    }

    fn mint(
        &self,
        namespace: &str,
        scope: &Scope,
        issued: u64,
        expires: u64,
    ) -> Result<Minted, MintError> {
        // As a Basic credential: the namespace is the username, the credential the password.
        outpost_core::nscred::mint(&self.0, namespace, scope.patterns(), issued, expires)
            .map(|password| Minted {
                username: namespace.to_owned(),
                password,
            })
            .map_err(|e| MintError {
                namespace: namespace.to_owned(),
                reason: e.to_string(),
            })
    }
}

/// Parses a key file (the registry's --token-signing-key-file format) into a minter.
pub fn parse_key_file(path: &Path, text: &str) -> Result<Arc<dyn Mint>, KeyError> {
    let keys = outpost_core::SigningKeys::parse(path, text).map_err(KeyError::Invalid)?;
    Ok(Arc::new(CoreMint(keys)))
}

/// Namespace-credential mode of the pull-secret controller.
pub struct Credentials {
    pub keys: KeyFile,
    /// Validity of a new credential; renewed at half of it.
    pub lifetime: std::time::Duration,
    /// The scope of namespaces without the annotation (empty: they get no credential).
    pub default_scope: Scope,
    /// The nodes' mirror-path credential, if the controller keeps one.
    pub node: Option<NodeCredential>,
    /// Each namespace's scope, kept by the controller for the admission.
    pub scopes: Arc<ScopeTable>,
}

impl Credentials {
    pub fn new(
        keys: KeyFile,
        lifetime: std::time::Duration,
        default_scope: Scope,
        node: Option<NodeCredential>,
    ) -> Credentials {
        let scopes = Arc::new(ScopeTable::new(default_scope.clone()));
        Credentials {
            keys,
            lifetime,
            default_scope,
            node,
            scopes,
        }
    }
}

/// A Secret `secret` in the webhook's own namespace holding a credential (username that
/// namespace) pulling `scope`, for the node agents (containerd's mirror path). An empty
/// scope: no credential (the controller deletes its own secret of that name).
#[derive(Debug, Clone)]
pub struct NodeCredential {
    pub secret: String,
    pub scope: Scope,
}

/// What each opted-in namespace may pull, as the controller's last pass computed it, for the
/// admission: a pod is moved to Outpost only for images its namespace's credential can pull,
/// so anything else keeps its upstream name (and the pod's own pull secrets apply there)
/// instead of failing against Outpost with a 403.
pub struct ScopeTable {
    default: Scope,
    /// Namespace → its scope, or why it has none; `None` before the first pass.
    known: RwLock<Option<BTreeMap<String, Result<Scope, String>>>>,
    /// For namespaces the last pass did not see (opted in since): read at admission.
    client: OnceLock<kube::Client>,
}

impl ScopeTable {
    pub fn new(default: Scope) -> ScopeTable {
        ScopeTable {
            default,
            known: RwLock::new(None),
            client: OnceLock::new(),
        }
    }

    pub fn set_client(&self, client: kube::Client) {
        let _ = self.client.set(client);
    }

    /// Replaces what is known with one pass's outcome: `scopes` of the namespaces that hold
    /// a credential and `invalid` (namespace → why) of those that hold none.
    pub fn replace(
        &self,
        scopes: &BTreeMap<String, Scope>,
        invalid: impl IntoIterator<Item = (String, String)>,
    ) {
        let mut map: BTreeMap<String, Result<Scope, String>> = scopes
            .iter()
            .map(|(ns, s)| (ns.clone(), Ok(s.clone())))
            .collect();
        map.extend(invalid.into_iter().map(|(ns, why)| (ns, Err(why))));
        if let Ok(mut known) = self.known.write() {
            *known = Some(map);
        }
    }

    fn cached(&self, namespace: &str) -> Option<Result<Scope, String>> {
        self.known.read().ok()?.as_ref()?.get(namespace).cloned()
    }

    /// The scope of `namespace`'s credential, or why it has none. A namespace the last pass
    /// did not see is read from the API server (the pod may come a moment after its
    /// namespace was labelled, before the controller's pass).
    pub async fn lookup(&self, namespace: &str) -> Result<Scope, String> {
        if let Some(known) = self.cached(namespace) {
            return known;
        }
        let client = self
            .client
            .get()
            .ok_or("the namespace scopes are not loaded yet")?;
        let api = kube::Api::<k8s_openapi::api::core::v1::Namespace>::all(client.clone());
        let ns = api
            .get_opt(namespace)
            .await
            .map_err(|e| format!("cannot read the namespace: {e}"))?
            .ok_or("the namespace does not exist")?;
        let annotations = ns.metadata.annotations.unwrap_or_default();
        match scope_of(
            annotations.get(REPOSITORIES_ANNOTATION).map(String::as_str),
            &self.default,
        ) {
            Ok(scope) if scope.is_empty() => Err("its scope is empty".into()),
            Ok(scope) => Ok(scope),
            Err(e) => Err(e.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn annotations_parse_sorted_and_deduplicated() {
        let s = Scope::parse(" team-a/** ,base/*, team-a/**").unwrap();
        assert_eq!(s.to_string(), "base/*, team-a/**");
        assert_eq!(s, Scope::parse("base/*,team-a/**").unwrap());
        assert!(s.patterns()[1].matches("team-a/x/y"));
        assert!(!s.patterns().iter().any(|p| p.matches("team-b/x")));
        assert_eq!(Scope::parse("**").unwrap().to_string(), "**");
    }

    #[test]
    fn invalid_annotations_are_refused() {
        assert_eq!(Scope::parse("").unwrap_err(), ScopeError::Empty);
        assert_eq!(Scope::parse("  ").unwrap_err(), ScopeError::Empty);
        assert_eq!(Scope::parse("a/**,").unwrap_err(), ScopeError::EmptyEntry);
        assert_eq!(Scope::parse("a,,b").unwrap_err(), ScopeError::EmptyEntry);
        assert!(matches!(
            Scope::parse("Team-A/**").unwrap_err(),
            ScopeError::Pattern(_)
        ));
        assert!(matches!(
            Scope::parse("team-a/**x").unwrap_err(),
            ScopeError::Pattern(_)
        ));
        let e = Scope::parse("team a/**").unwrap_err().to_string();
        assert!(
            e.contains(REPOSITORIES_ANNOTATION) && e.contains("team a/**"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn the_table_answers_from_the_last_pass() {
        let table = ScopeTable::new(Scope::parse("**").unwrap());
        // Before any pass and without API access: nothing is known, and it says so.
        assert!(
            table
                .lookup("team-a")
                .await
                .unwrap_err()
                .contains("not loaded")
        );
        let scopes = BTreeMap::from([("team-a".to_owned(), Scope::parse("team-a/**").unwrap())]);
        table.replace(&scopes, [("team-c".to_owned(), "bad pattern".to_owned())]);
        let a = table.lookup("team-a").await.unwrap();
        assert!(a.allows("team-a/app") && !a.allows("team-b/app"));
        assert_eq!(table.lookup("team-c").await.unwrap_err(), "bad pattern");
        // A pass replaces everything: team-a opted out.
        table.replace(&BTreeMap::new(), []);
        assert!(table.lookup("team-a").await.is_err());
    }

    #[test]
    fn default_without_annotation() {
        let d = Scope::parse("**").unwrap();
        assert_eq!(scope_of(None, &d).unwrap(), d);
        assert_eq!(
            scope_of(Some("x/*"), &d).unwrap().to_string(),
            "x/*".to_owned()
        );
        assert!(scope_of(Some(""), &d).is_err());
        assert!(Scope::new(Vec::new()).is_empty());
        let many: Vec<String> = (0..=MAX_PATTERNS).map(|i| format!("r{i}")).collect();
        assert_eq!(
            Scope::parse(&many.join(",")).unwrap_err(),
            ScopeError::TooMany(MAX_PATTERNS + 1)
        );
    }

    #[test]
    fn key_file_mints_what_the_shared_format_verifies_and_follows_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        let (a, b) = (
            outpost_core::keys::generate().unwrap(),
            outpost_core::keys::generate().unwrap(),
        );
        std::fs::write(&path, format!("{a}\n")).unwrap();
        let file = KeyFile::new(path.clone(), parse_key_file);
        let m = file.minter().unwrap();
        let keys_a = outpost_core::SigningKeys::parse(&path, &a).unwrap();
        assert_eq!(m.kid(), keys_a.kids()[0]);
        let scope = Scope::parse("team-a/**").unwrap();
        let cred = m.mint("team-a", &scope, 100, 200).unwrap();
        assert_eq!(cred.username, "team-a");
        assert!(!format!("{cred:?}").contains(&cred.password));
        let v = outpost_core::nscred::verify(&keys_a, &cred.password, 150).unwrap();
        assert_eq!(v.namespace, "team-a");
        assert!(v.allows("team-a/x") && !v.allows("team-b/x"));
        assert!(!file.reload().unwrap(), "unchanged");

        // The new key first: minting switches to it.
        std::fs::write(&path, format!("{b}\n{a}\n")).unwrap();
        assert!(file.reload().unwrap());
        let keys_b = outpost_core::SigningKeys::parse(&path, &b).unwrap();
        assert_eq!(file.minter().unwrap().kid(), keys_b.kids()[0]);

        // A broken edit is refused and the last good keys stay; the error shows no key.
        std::fs::write(&path, format!("{}\n", &b[..20])).unwrap();
        let e = file.reload().unwrap_err().to_string();
        assert!(!e.contains(&b[..20]), "{e}");
        assert_eq!(file.minter().unwrap().kid(), keys_b.kids()[0]);
        let missing = KeyFile::new(dir.path().join("none"), parse_key_file);
        assert!(matches!(missing.minter(), Err(KeyError::Read { .. })));
    }
}
