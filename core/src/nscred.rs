//! Namespace-scoped pull credentials (issue 17): the webhook mints one per namespace, the
//! registry verifies it, both through this one implementation and the keys of
//! `--token-signing-key-file` ([`crate::keys`]).
//!
//! Format: `opns1.<kid>.<payload>.<signature>`, the last two unpadded base64url. The payload is
//! JSON `{"v":1,"ns":..,"repos":[patterns],"actions":["content/read","metadata/read"],
//! "iat":..,"exp":..}` (seconds since the epoch); the signature is HMAC-SHA256 over
//! `opns1.<kid>.<payload>` with the key named by `kid` (the first key of the file when minted;
//! any key of the file verifies, so keys rotate with overlap). The `opns1.` prefix tells it
//! apart from client token passwords (letters and digits only) and from bearer tokens (JWTs).
//!
//! As a Basic credential (a pull secret), the username is the namespace and the password the
//! credential.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use serde::{Deserialize, Serialize};

use crate::keys::SigningKeys;
use crate::pattern::RepositoryPattern;

/// Every credential starts with this.
pub const PREFIX: &str = "opns1.";
/// The payload's format version.
pub const VERSION: u32 = 1;
/// The actions a namespace credential grants: pull only.
pub const ACTIONS: [&str; 2] = ["content/read", "metadata/read"];
/// How far in the future `iat` may lie, for clocks of minting and verifying hosts that
/// disagree a little. Expiry gets no leeway: a credential stops working at `exp` at the latest.
pub const CLOCK_SKEW_SECS: u64 = 60;
/// Most repository patterns in one credential (keeps the pull secret and its checks small).
pub const MAX_PATTERNS: usize = 64;

/// A verified credential.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespaceCredential {
    pub namespace: String,
    pub repositories: Vec<RepositoryPattern>,
    pub issued_at: u64,
    pub expires_at: u64,
    /// The id of the key that signed it.
    pub kid: String,
}

impl NamespaceCredential {
    /// True if the credential may pull `repository`.
    pub fn allows(&self, repository: &str) -> bool {
        self.repositories.iter().any(|p| p.matches(repository))
    }
}

/// Why a credential was not minted or not accepted. Never carries the credential or a key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NsCredError {
    #[error("namespace credential is malformed")]
    Malformed,
    #[error("namespace credential was signed with a key this registry does not have")]
    UnknownKey,
    #[error("namespace credential signature is not valid")]
    BadSignature,
    #[error("namespace credential has expired")]
    Expired,
    #[error("namespace credential is not valid yet")]
    NotYetValid,
    #[error("namespace credential has format version {0}, this build reads {VERSION}")]
    Version(u32),
    #[error("namespace credential grants actions other than pull")]
    Actions,
    #[error("{0:?} is not a Kubernetes namespace name")]
    Namespace(String),
    #[error("a namespace credential needs 1 to {MAX_PATTERNS} repository patterns")]
    Patterns,
    #[error("a namespace credential must expire after it is issued")]
    Lifetime,
    #[error("the token signing key file holds no key")]
    NoKey,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Payload {
    v: u32,
    ns: String,
    repos: Vec<String>,
    actions: Vec<String>,
    iat: u64,
    exp: u64,
}

/// A Kubernetes namespace name: an RFC 1123 label.
pub fn valid_namespace(ns: &str) -> bool {
    let b = ns.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
        && b[0] != b'-'
        && b[b.len() - 1] != b'-'
}

/// True if `s` has the shape of a namespace credential (not whether it is valid).
pub fn looks_like(s: &str) -> bool {
    s.starts_with(PREFIX)
}

/// Mints a credential for `namespace` pulling `patterns`, valid from `issued_at` until
/// `expires_at` (seconds since the epoch), signed with the first key.
pub fn mint(
    keys: &SigningKeys,
    namespace: &str,
    patterns: &[RepositoryPattern],
    issued_at: u64,
    expires_at: u64,
) -> Result<String, NsCredError> {
    if !valid_namespace(namespace) {
        return Err(NsCredError::Namespace(namespace.to_owned()));
    }
    if patterns.is_empty() || patterns.len() > MAX_PATTERNS {
        return Err(NsCredError::Patterns);
    }
    if expires_at <= issued_at {
        return Err(NsCredError::Lifetime);
    }
    let key = keys.signing().ok_or(NsCredError::NoKey)?;
    let payload = Payload {
        v: VERSION,
        ns: namespace.to_owned(),
        repos: patterns.iter().map(|p| p.as_str().to_owned()).collect(),
        actions: ACTIONS.iter().map(|a| (*a).to_owned()).collect(),
        iat: issued_at,
        exp: expires_at,
    };
    let json = serde_json::to_vec(&payload).map_err(|_| NsCredError::Malformed)?;
    let signed = format!("{PREFIX}{}.{}", key.kid(), B64.encode(json));
    let tag = key.sign(signed.as_bytes());
    Ok(format!("{signed}.{}", B64.encode(tag)))
}

/// Checks the signature (with the key `kid` names), the format and the validity period at
/// `now` (seconds since the epoch); returns what the credential grants.
pub fn verify(
    keys: &SigningKeys,
    credential: &str,
    now: u64,
) -> Result<NamespaceCredential, NsCredError> {
    let rest = credential
        .strip_prefix(PREFIX)
        .ok_or(NsCredError::Malformed)?;
    let mut parts = rest.split('.');
    let (Some(kid), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(NsCredError::Malformed);
    };
    let sig = B64.decode(s).map_err(|_| NsCredError::Malformed)?;
    // A forged kid only selects a key the forger does not have.
    let key = keys.find(kid).ok_or(NsCredError::UnknownKey)?;
    let signed = &credential[..PREFIX.len() + kid.len() + 1 + p.len()];
    if !key.verify(signed.as_bytes(), &sig) {
        return Err(NsCredError::BadSignature);
    }
    // Signed with our key; the content is still checked, in case a minter had a bug.
    let json = B64.decode(p).map_err(|_| NsCredError::Malformed)?;
    let payload: Payload = serde_json::from_slice(&json).map_err(|_| NsCredError::Malformed)?;
    if payload.v != VERSION {
        return Err(NsCredError::Version(payload.v));
    }
    if payload.actions.is_empty()
        || payload
            .actions
            .iter()
            .any(|a| !ACTIONS.contains(&a.as_str()))
    {
        return Err(NsCredError::Actions);
    }
    if !valid_namespace(&payload.ns) {
        return Err(NsCredError::Malformed);
    }
    if payload.repos.is_empty() || payload.repos.len() > MAX_PATTERNS {
        return Err(NsCredError::Patterns);
    }
    let repositories = payload
        .repos
        .iter()
        .map(|r| r.parse::<RepositoryPattern>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|_| NsCredError::Malformed)?;
    if payload.exp <= payload.iat {
        return Err(NsCredError::Lifetime);
    }
    if payload.exp <= now {
        return Err(NsCredError::Expired);
    }
    if payload.iat > now.saturating_add(CLOCK_SKEW_SECS) {
        return Err(NsCredError::NotYetValid);
    }
    Ok(NamespaceCredential {
        namespace: payload.ns,
        repositories,
        issued_at: payload.iat,
        expires_at: payload.exp,
        kid: kid.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::keys::generate;

    const NOW: u64 = 1_800_000_000;

    fn keys(lines: &[&str]) -> SigningKeys {
        SigningKeys::parse(Path::new("k"), &lines.join("\n")).unwrap()
    }

    fn pats(p: &[&str]) -> Vec<RepositoryPattern> {
        p.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn parts(c: &str) -> Vec<String> {
        c.split('.').map(str::to_owned).collect()
    }

    /// Re-signs nothing: swaps the payload under the original signature.
    fn with_payload(c: &str, payload: &serde_json::Value) -> String {
        let p = parts(c);
        format!(
            "{}.{}.{}.{}",
            p[0],
            p[1],
            B64.encode(serde_json::to_vec(payload).unwrap()),
            p[3]
        )
    }

    #[test]
    fn round_trip() {
        let a = generate().unwrap();
        let k = keys(&[&a]);
        let c = mint(
            &k,
            "team-a",
            &pats(&["team-a/**", "shared/*"]),
            NOW,
            NOW + 3600,
        )
        .unwrap();
        assert!(c.starts_with("opns1."));
        assert!(looks_like(&c));
        assert!(!c.contains(a.trim_end_matches('=')));
        let v = verify(&k, &c, NOW + 10).unwrap();
        assert_eq!(v.namespace, "team-a");
        assert_eq!(v.repositories, pats(&["team-a/**", "shared/*"]));
        assert_eq!((v.issued_at, v.expires_at), (NOW, NOW + 3600));
        assert_eq!(v.kid, k.kids()[0]);
        assert!(v.allows("team-a/app"));
        assert!(v.allows("team-a/x/y"));
        assert!(v.allows("shared/base"));
        assert!(!v.allows("shared/a/b"));
        assert!(!v.allows("team-b/app"));
        // The payload is readable JSON with exactly the documented fields.
        let json: serde_json::Value =
            serde_json::from_slice(&B64.decode(&parts(&c)[2]).unwrap()).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"v":1,"ns":"team-a","repos":["team-a/**","shared/*"],
                "actions":["content/read","metadata/read"],"iat":NOW,"exp":NOW+3600})
        );
    }

    #[test]
    fn validity_period() {
        let k = keys(&[&generate().unwrap()]);
        let c = mint(&k, "ns", &pats(&["ns/**"]), NOW, NOW + 60).unwrap();
        assert!(verify(&k, &c, NOW + 59).is_ok());
        // Stops working at exp, not a second later.
        assert_eq!(verify(&k, &c, NOW + 60).unwrap_err(), NsCredError::Expired);
        assert_eq!(
            verify(&k, &c, NOW + 6000).unwrap_err(),
            NsCredError::Expired
        );
        // Issued in the future beyond the clock skew allowance.
        assert!(verify(&k, &c, NOW - CLOCK_SKEW_SECS).is_ok());
        assert_eq!(
            verify(&k, &c, NOW - CLOCK_SKEW_SECS - 1).unwrap_err(),
            NsCredError::NotYetValid
        );
        let later = mint(&k, "ns", &pats(&["ns/**"]), NOW + 3600, NOW + 7200).unwrap();
        assert_eq!(
            verify(&k, &later, NOW).unwrap_err(),
            NsCredError::NotYetValid
        );
    }

    #[test]
    fn wrong_and_unknown_keys() {
        let (a, b) = (generate().unwrap(), generate().unwrap());
        let ka = keys(&[&a]);
        let kb = keys(&[&b]);
        let c = mint(&ka, "ns", &pats(&["ns/**"]), NOW, NOW + 60).unwrap();
        assert_eq!(verify(&kb, &c, NOW).unwrap_err(), NsCredError::UnknownKey);
        // B's credential relabelled with A's kid: the signature does not match.
        let cb = mint(&kb, "ns", &pats(&["ns/**"]), NOW, NOW + 60).unwrap();
        let p = parts(&cb);
        let relabelled = format!("{}.{}.{}.{}", p[0], ka.kids()[0], p[2], p[3]);
        assert_eq!(
            verify(&ka, &relabelled, NOW).unwrap_err(),
            NsCredError::BadSignature
        );
        let unknown = format!("{}.{}.{}.{}", p[0], "0000000000000000", p[2], p[3]);
        assert_eq!(
            verify(&ka, &unknown, NOW).unwrap_err(),
            NsCredError::UnknownKey
        );
        // No keys at all: nothing mints, nothing verifies.
        let none = SigningKeys::from_raw(&[]);
        assert_eq!(
            mint(&none, "ns", &pats(&["ns/**"]), NOW, NOW + 60).unwrap_err(),
            NsCredError::NoKey
        );
        assert_eq!(verify(&none, &c, NOW).unwrap_err(), NsCredError::UnknownKey);
    }

    #[test]
    fn tampering() {
        let k = keys(&[&generate().unwrap()]);
        let c = mint(&k, "team-a", &pats(&["team-a/**"]), NOW, NOW + 60).unwrap();
        let base = serde_json::json!({"v":1,"ns":"team-a","repos":["team-a/**"],
            "actions":["content/read","metadata/read"],"iat":NOW,"exp":NOW+60});
        // Each forgery below changes exactly one field of the real payload.
        let real: serde_json::Value =
            serde_json::from_slice(&B64.decode(&parts(&c)[2]).unwrap()).unwrap();
        assert_eq!(real, base);
        let mut tampered = Vec::new();
        for (field, value) in [
            ("repos", serde_json::json!(["**"])),
            ("repos", serde_json::json!(["team-a/**", "team-b/**"])),
            ("ns", serde_json::json!("team-b")),
            (
                "actions",
                serde_json::json!(["content/read", "content/write"]),
            ),
            ("exp", serde_json::json!(NOW + 1_000_000)),
            ("iat", serde_json::json!(NOW - 1)),
        ] {
            let mut p = base.clone();
            p[field] = value;
            tampered.push(with_payload(&c, &p));
        }
        // A flipped signature character.
        let mut sig = parts(&c)[3].clone().into_bytes();
        sig[0] = if sig[0] == b'A' { b'B' } else { b'A' };
        let p = parts(&c);
        tampered.push(format!(
            "{}.{}.{}.{}",
            p[0],
            p[1],
            p[2],
            String::from_utf8(sig).unwrap()
        ));
        for t in &tampered {
            assert_eq!(verify(&k, t, NOW).unwrap_err(), NsCredError::BadSignature);
        }
    }

    #[test]
    fn rotation_with_overlap() {
        let (old, new) = (generate().unwrap(), generate().unwrap());
        let only_old = keys(&[&old]);
        let c_old = mint(&only_old, "ns", &pats(&["ns/**"]), NOW, NOW + 60).unwrap();
        // The new key added second: the old one still signs, both verify.
        let old_new = keys(&[&old, &new]);
        assert!(verify(&old_new, &c_old, NOW).is_ok());
        // The new key first: it signs, the old one (second) still verifies.
        let new_old = keys(&[&new, &old]);
        assert!(verify(&new_old, &c_old, NOW).is_ok());
        let c_new = mint(&new_old, "ns", &pats(&["ns/**"]), NOW, NOW + 60).unwrap();
        assert_eq!(
            verify(&new_old, &c_new, NOW).unwrap().kid,
            new_old.kids()[0]
        );
        assert!(verify(&old_new, &c_new, NOW).is_ok());
        // The old key removed: its credentials stop working.
        let only_new = keys(&[&new]);
        assert_eq!(
            verify(&only_new, &c_old, NOW).unwrap_err(),
            NsCredError::UnknownKey
        );
        assert!(verify(&only_new, &c_new, NOW).is_ok());
    }

    #[test]
    fn garbage_and_mint_refusals() {
        let k = keys(&[&generate().unwrap()]);
        let kid = k.kids()[0].clone();
        for junk in [
            "",
            "opns1.",
            "opns1...",
            "opns1.a.b",
            "opns1.a.b.c.d",
            &format!("opns1.{kid}.!!.??"),
            &format!("opns1.{kid}.e30.e30"),
            "eyJhbGciOiJIUzI1NiJ9.e30.e30",
            "AbCdEf0123456789AbCdEf0123456789AbCdEf012345",
            "opns2.x.y.z",
        ] {
            let e = verify(&k, junk, NOW).unwrap_err();
            assert!(
                matches!(
                    e,
                    NsCredError::Malformed | NsCredError::UnknownKey | NsCredError::BadSignature
                ),
                "{junk}: {e}"
            );
            assert!(junk.is_empty() || !e.to_string().contains(junk));
        }
        assert!(!looks_like("AbCdEf0123456789AbCdEf0123456789AbCdEf012345"));
        let p = pats(&["ns/**"]);
        for bad_ns in ["", "Team-A", "-a", "a-", "a.b", &"a".repeat(64)] {
            assert!(matches!(
                mint(&k, bad_ns, &p, NOW, NOW + 1).unwrap_err(),
                NsCredError::Namespace(_)
            ));
        }
        assert_eq!(
            mint(&k, "ns", &[], NOW, NOW + 1).unwrap_err(),
            NsCredError::Patterns
        );
        let many: Vec<RepositoryPattern> = (0..=MAX_PATTERNS)
            .map(|i| format!("r{i}").parse().unwrap())
            .collect();
        assert_eq!(
            mint(&k, "ns", &many, NOW, NOW + 1).unwrap_err(),
            NsCredError::Patterns
        );
        assert_eq!(
            mint(&k, "ns", &p, NOW, NOW).unwrap_err(),
            NsCredError::Lifetime
        );
    }
}
