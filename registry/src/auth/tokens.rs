//! The tokens file (`--tokens`, TOML): scope maps and client tokens, as Azure's connected
//! registry defines them. Only argon2id hashes are stored; plaintext passwords are refused.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::Arc;

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use outpost_core::RepositoryPattern;
use serde::{Deserialize, Serialize};

/// One of the actions a scope map grants on a repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    ContentRead,
    ContentWrite,
    ContentDelete,
    MetadataRead,
    MetadataWrite,
    /// A connected registry reporting its state to this one, its parent (ACR's
    /// `gateway/<name>/message/write`): granted on the gateway pseudo-repository
    /// `gateway/<name>` (see [`gateway_repository`]), meaningless on any other.
    MessageWrite,
}

/// The pseudo-repository a scope map names to let the connected registry `name` report to this
/// one with `message/write`, as ACR's `gateway/<name>/message/write`. Repository names are
/// lowercase, connected registry names need not be.
pub fn gateway_repository(name: &str) -> String {
    format!("gateway/{}", name.to_ascii_lowercase())
}

impl Action {
    pub const ALL: [Action; 6] = [
        Action::ContentRead,
        Action::ContentWrite,
        Action::ContentDelete,
        Action::MetadataRead,
        Action::MetadataWrite,
        Action::MessageWrite,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Action::ContentRead => "content/read",
            Action::ContentWrite => "content/write",
            Action::ContentDelete => "content/delete",
            Action::MetadataRead => "metadata/read",
            Action::MetadataWrite => "metadata/write",
            Action::MessageWrite => "message/write",
        }
    }

    pub fn parse(s: &str) -> Option<Action> {
        Action::ALL.into_iter().find(|a| a.as_str() == s)
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }

    /// Whether the action changes content (refused in readonly mode). A report changes no
    /// content: a readonly registry in the middle of a chain still hears its children.
    pub fn is_write(self) -> bool {
        matches!(
            self,
            Action::ContentWrite | Action::ContentDelete | Action::MetadataWrite
        )
    }
}

/// A set of actions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Actions(u8);

impl Actions {
    pub const NONE: Actions = Actions(0);

    pub fn all() -> Actions {
        Action::ALL.into_iter().collect()
    }

    pub fn contains(self, a: Action) -> bool {
        self.0 & a.bit() != 0
    }

    pub fn insert(&mut self, a: Action) {
        self.0 |= a.bit();
    }

    pub fn union(self, other: Actions) -> Actions {
        Actions(self.0 | other.0)
    }

    pub fn intersect(self, other: Actions) -> Actions {
        Actions(self.0 & other.0)
    }

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    pub fn iter(self) -> impl Iterator<Item = Action> {
        Action::ALL.into_iter().filter(move |a| self.contains(*a))
    }
}

impl FromIterator<Action> for Actions {
    fn from_iter<I: IntoIterator<Item = Action>>(iter: I) -> Self {
        let mut s = Actions::NONE;
        for a in iter {
            s.insert(a);
        }
        s
    }
}

// ---- the file as written on disk ----

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokensFile {
    #[serde(default, rename = "scope_map", skip_serializing_if = "Vec::is_empty")]
    pub scope_maps: Vec<ScopeMapEntry>,
    #[serde(default, rename = "token", skip_serializing_if = "Vec::is_empty")]
    pub tokens: Vec<TokenEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScopeMapEntry {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default)]
    pub rules: Vec<RuleEntry>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleEntry {
    pub repository: String,
    pub actions: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenEntry {
    pub name: String,
    pub scope_map: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password1: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub password2: Option<String>,
    #[serde(default = "enabled_default")]
    pub enabled: bool,
}

fn enabled_default() -> bool {
    true
}

#[derive(Debug, thiserror::Error)]
pub enum TokensError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
    #[error("tokens file is not valid TOML: {0}")]
    Syntax(String),
    #[error("{0}")]
    Invalid(String),
}

/// Names of tokens and scope maps: 1 to 50 of `[A-Za-z0-9_-]`.
pub fn valid_name(n: &str) -> bool {
    (1..=50).contains(&n.len())
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

// ---- the validated, in-memory form ----

#[derive(Debug)]
pub struct Rule {
    pub pattern: RepositoryPattern,
    pub actions: Actions,
}

#[derive(Debug)]
pub struct ScopeMap {
    pub name: String,
    pub rules: Vec<Rule>,
}

impl ScopeMap {
    /// Everything the scope map grants on `repo`.
    pub fn actions_for(&self, repo: &str) -> Actions {
        self.rules
            .iter()
            .filter(|r| r.pattern.matches(repo))
            .fold(Actions::NONE, |acc, r| acc.union(r.actions))
    }
}

#[derive(Debug)]
pub struct Token {
    pub name: String,
    pub scope_map: Arc<ScopeMap>,
    /// PHC strings of the token's passwords (slot 1 and 2).
    pub hashes: [Option<String>; 2],
    pub enabled: bool,
}

impl Token {
    /// Verifies a password against both slots (argon2; slow by design). Returns the slot.
    pub fn verify(&self, password: &str) -> Option<u8> {
        self.hashes
            .iter()
            .position(|h| h.as_deref().is_some_and(|h| verify_hash(h, password)))
            .map(|i| i as u8 + 1)
    }
}

/// Checks `password` against a PHC string (the comparison inside is constant-time).
pub fn verify_hash(hash: &str, password: &str) -> bool {
    PasswordHash::new(hash).is_ok_and(|parsed| {
        Argon2::default()
            .verify_password(password.as_bytes(), &parsed)
            .is_ok()
    })
}

/// All tokens of a tokens file, by name.
#[derive(Debug, Default)]
pub struct TokenSet {
    pub tokens: HashMap<String, Arc<Token>>,
}

fn parse_rules(map: &str, rules: &[RuleEntry]) -> Result<Vec<Rule>, TokensError> {
    rules
        .iter()
        .map(|r| {
            let pattern: RepositoryPattern = r
                .repository
                .parse()
                .map_err(|e| TokensError::Invalid(format!("scope map {map:?}: {e}")))?;
            let mut actions = Actions::NONE;
            for a in &r.actions {
                actions.insert(Action::parse(a).ok_or_else(|| {
                    TokensError::Invalid(format!(
                        "scope map {map:?}: unknown action {a:?} (use content/read, content/write, \
                         content/delete, metadata/read, metadata/write or message/write)"
                    ))
                })?);
            }
            Ok(Rule { pattern, actions })
        })
        .collect()
}

fn check_hash(token: &str, slot: u8, h: &str) -> Result<(), TokensError> {
    let ok = h.starts_with("$argon2id$") && PasswordHash::new(h).is_ok();
    if !ok {
        // The value is never echoed: it might be a plaintext password.
        return Err(TokensError::Invalid(format!(
            "token {token:?}: password{slot} is not an argon2id hash (plaintext passwords are not \
             accepted; use `outpost-registry token create` or `token update --generate-password`)"
        )));
    }
    Ok(())
}

impl TokensFile {
    pub fn parse(text: &str) -> Result<Self, TokensError> {
        toml::from_str(text).map_err(|e| TokensError::Syntax(e.message().to_owned()))
    }

    pub fn load(path: &Path) -> Result<Self, TokensError> {
        match std::fs::read_to_string(path) {
            Ok(t) => Self::parse(&t),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(TokensFile::default()),
            Err(source) => Err(TokensError::Read {
                path: path.display().to_string(),
                source,
            }),
        }
    }

    /// Checks every rule and builds the in-memory set.
    pub fn validate(&self) -> Result<TokenSet, TokensError> {
        let mut maps: HashMap<&str, Arc<ScopeMap>> = HashMap::new();
        for m in &self.scope_maps {
            if !valid_name(&m.name) {
                return Err(TokensError::Invalid(format!(
                    "scope map name {:?} must be 1-50 of A-Z a-z 0-9 - _",
                    m.name
                )));
            }
            let sm = Arc::new(ScopeMap {
                name: m.name.clone(),
                rules: parse_rules(&m.name, &m.rules)?,
            });
            if maps.insert(&m.name, sm).is_some() {
                return Err(TokensError::Invalid(format!(
                    "scope map {:?} is defined twice",
                    m.name
                )));
            }
        }
        let mut set = TokenSet::default();
        for t in &self.tokens {
            if !valid_name(&t.name) {
                return Err(TokensError::Invalid(format!(
                    "token name {:?} must be 1-50 of A-Z a-z 0-9 - _",
                    t.name
                )));
            }
            let sm = maps.get(t.scope_map.as_str()).ok_or_else(|| {
                TokensError::Invalid(format!(
                    "token {:?} names scope map {:?}, which is not defined",
                    t.name, t.scope_map
                ))
            })?;
            for (slot, h) in [(1, &t.password1), (2, &t.password2)] {
                if let Some(h) = h {
                    check_hash(&t.name, slot, h)?;
                }
            }
            let token = Arc::new(Token {
                name: t.name.clone(),
                scope_map: sm.clone(),
                hashes: [t.password1.clone(), t.password2.clone()],
                enabled: t.enabled,
            });
            if set.tokens.insert(t.name.clone(), token).is_some() {
                return Err(TokensError::Invalid(format!(
                    "token {:?} is defined twice",
                    t.name
                )));
            }
        }
        Ok(set)
    }

    /// Writes the file atomically (temp file in the same directory, fsync, rename).
    pub fn save(&self, path: &Path) -> Result<(), TokensError> {
        let err = |source| TokensError::Write {
            path: path.display().to_string(),
            source,
        };
        let text = toml::to_string(self).map_err(|e| err(std::io::Error::other(e.to_string())))?;
        // Hashes only, but still nobody else's business.
        crate::storage::fs::write_file_atomic(path, text.as_bytes(), 0o600).map_err(err)
    }

    pub fn scope_map_mut(&mut self, name: &str) -> Option<&mut ScopeMapEntry> {
        self.scope_maps.iter_mut().find(|m| m.name == name)
    }

    pub fn token_mut(&mut self, name: &str) -> Option<&mut TokenEntry> {
        self.tokens.iter_mut().find(|t| t.name == name)
    }

    /// Scope maps no token uses are fine; a token must not lose its scope map.
    pub fn tokens_using(&self, scope_map: &str) -> Vec<String> {
        self.tokens
            .iter()
            .filter(|t| t.scope_map == scope_map)
            .map(|t| t.name.clone())
            .collect()
    }
}

/// A new random password: 44 characters of A-Z a-z 0-9 (about 260 bits).
pub fn generate_password() -> Result<String, TokensError> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut out = String::with_capacity(44);
    let mut buf = [0u8; 64];
    while out.len() < 44 {
        aws_lc_rs::rand::fill(&mut buf)
            .map_err(|_| TokensError::Invalid("the system random generator failed".into()))?;
        // Rejection sampling keeps every character equally likely.
        for b in buf {
            if (b as usize) < 248 && out.len() < 44 {
                out.push(ALPHABET[b as usize % 62] as char);
            }
        }
    }
    Ok(out)
}

/// An argon2id PHC string for `password`.
pub fn hash_password(password: &str) -> Result<String, TokensError> {
    let mut salt = [0u8; 16];
    aws_lc_rs::rand::fill(&mut salt)
        .map_err(|_| TokensError::Invalid("the system random generator failed".into()))?;
    let salt =
        SaltString::encode_b64(&salt).map_err(|e| TokensError::Invalid(format!("salt: {e}")))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| TokensError::Invalid(format!("hashing failed: {e}")))
}

/// Parses `--repository REPO ACTION...` groups into rules, checking each.
pub fn rules_from_args(groups: &[Vec<String>]) -> Result<Vec<RuleEntry>, TokensError> {
    let mut out = Vec::new();
    for g in groups {
        let (repo, actions) = g
            .split_first()
            .ok_or_else(|| TokensError::Invalid("--repository needs REPO ACTION...".into()))?;
        if actions.is_empty() {
            return Err(TokensError::Invalid(format!(
                "--repository {repo} needs at least one action"
            )));
        }
        let rule = RuleEntry {
            repository: repo.clone(),
            actions: actions.to_vec(),
        };
        parse_rules("(command line)", std::slice::from_ref(&rule))?;
        out.push(rule);
    }
    // One rule per repository pattern: later groups for the same pattern add actions.
    let mut merged: Vec<RuleEntry> = Vec::new();
    for r in out {
        match merged.iter_mut().find(|m| m.repository == r.repository) {
            Some(m) => {
                let have: HashSet<String> = m.actions.iter().cloned().collect();
                m.actions
                    .extend(r.actions.into_iter().filter(|a| !have.contains(a)));
            }
            None => merged.push(r),
        }
    }
    Ok(merged)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_example_parses() {
        let h = hash_password("s3cret").unwrap();
        let text = format!(
            r#"
[[scope_map]]
name = "all-repos-read"
rules = [ {{ repository = "staging-temp/**", actions = ["content/read", "metadata/read"] }} ]

[[token]]
name = "all-repos-pull-token"
scope_map = "all-repos-read"
password1 = "{h}"
enabled = true
"#
        );
        let set = TokensFile::parse(&text).unwrap().validate().unwrap();
        let t = &set.tokens["all-repos-pull-token"];
        assert_eq!(t.verify("s3cret"), Some(1));
        assert_eq!(t.verify("wrong"), None);
        let a = t.scope_map.actions_for("staging-temp/x/y");
        assert!(a.contains(Action::ContentRead) && a.contains(Action::MetadataRead));
        assert!(!a.contains(Action::ContentWrite));
        assert!(t.scope_map.actions_for("other").is_empty());
    }

    #[test]
    fn refusals_name_the_problem_without_echoing_secrets() {
        let plain = r#"
[[scope_map]]
name = "m"
rules = []
[[token]]
name = "t"
scope_map = "m"
password1 = "hunter2-plaintext"
"#;
        let e = TokensFile::parse(plain)
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("password1") && !e.contains("hunter2"), "{e}");
        let missing_map = "[[token]]\nname = \"t\"\nscope_map = \"nope\"\n";
        assert!(TokensFile::parse(missing_map).unwrap().validate().is_err());
        let bad_action =
            "[[scope_map]]\nname = \"m\"\nrules = [{ repository = \"a\", actions = [\"pull\"] }]\n";
        assert!(TokensFile::parse(bad_action).unwrap().validate().is_err());
        assert!(
            TokensFile::parse("[[token]]\nname = \"t\"\nscope_map = \"m\"\nextra = 1\n").is_err()
        );
    }

    #[test]
    fn passwords_are_random_and_alphanumeric() {
        let a = generate_password().unwrap();
        let b = generate_password().unwrap();
        assert_eq!(a.len(), 44);
        assert_ne!(a, b);
        assert!(a.bytes().all(|c| c.is_ascii_alphanumeric()));
    }

    #[test]
    fn rule_groups_merge_by_pattern() {
        let g = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let rules = rules_from_args(&[
            g(&["a/**", "content/read"]),
            g(&["b", "content/write"]),
            g(&["a/**", "metadata/read", "content/read"]),
        ])
        .unwrap();
        assert_eq!(rules.len(), 2);
        assert_eq!(rules[0].actions, vec!["content/read", "metadata/read"]);
        assert!(rules_from_args(&[g(&["a"])]).is_err());
        assert!(rules_from_args(&[g(&["a", "push"])]).is_err());
    }
}
