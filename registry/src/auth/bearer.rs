//! Short-lived bearer tokens issued by our own token endpoint: compact JWTs signed with
//! HMAC-SHA256, under a key that lives only in this process (a restart simply sends clients
//! back to the token endpoint) or under the keys of `--token-signing-key-file`, shared by
//! every replica. The header's `kid` (a short hash of the key) picks the verifying key.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use outpost_core::SigningKeys;
use serde::{Deserialize, Serialize};

/// Issuer named in every token.
pub const ISSUER: &str = "outpost-registry";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessEntry {
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
    pub actions: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    pub aud: String,
    /// Token name; empty for anonymous access.
    pub sub: String,
    pub iat: u64,
    pub exp: u64,
    pub access: Vec<AccessEntry>,
    /// Set when the token was issued for a namespace credential: what that credential
    /// grants, so the token stays within it (older replicas ignore the field and refuse the
    /// token, as its `sub` names no client token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ns: Option<NamespaceGrant>,
}

/// The namespace credential a bearer token was issued for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamespaceGrant {
    pub namespace: String,
    pub repos: Vec<String>,
    /// The key that signed the credential: removing it from the key file revokes the token.
    pub kid: String,
    /// The credential's own expiry.
    pub exp: u64,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum BearerError {
    #[error("bearer token is malformed")]
    Malformed,
    #[error("bearer token signature is not valid")]
    BadSignature,
    #[error("bearer token was signed with a key this registry does not have")]
    UnknownKey,
    #[error("bearer token has expired")]
    Expired,
    #[error("bearer token was issued for another service")]
    WrongAudience,
}

/// Signs with the first key, verifies with any.
pub struct Signer {
    keys: SigningKeys,
}

impl std::fmt::Debug for Signer {
    // Key ids only, never keys.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Signer")
            .field("kids", &self.kids())
            .finish()
    }
}

/// The encoded JWT header naming key `kid`.
fn header(kid: &str) -> String {
    B64.encode(format!(r#"{{"alg":"HS256","typ":"JWT","kid":"{kid}"}}"#))
}

#[derive(Deserialize)]
struct Header {
    alg: String,
    kid: Option<String>,
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Signer {
    /// A signer with a fresh random key.
    pub fn random() -> Result<Self, aws_lc_rs::error::Unspecified> {
        let mut bytes = [0u8; 32];
        aws_lc_rs::rand::fill(&mut bytes)?;
        Ok(Self::from_keys(&[bytes.to_vec()]))
    }

    /// A signer from raw keys: the first signs, every one verifies. `keys` must not be empty.
    pub fn from_keys(keys: &[Vec<u8>]) -> Self {
        Self::from_set(SigningKeys::from_raw(keys))
    }

    /// A signer over the keys of a key file.
    pub fn from_set(keys: SigningKeys) -> Self {
        Signer { keys }
    }

    /// The keys, which also verify namespace credentials.
    pub fn keys(&self) -> &SigningKeys {
        &self.keys
    }

    /// The key ids, the signing key's first.
    pub fn kids(&self) -> Vec<String> {
        self.keys.kids()
    }

    pub fn issue(&self, claims: &Claims) -> String {
        let Some(k) = self.keys.signing() else {
            return String::new();
        };
        let payload = serde_json::to_vec(claims).unwrap_or_default();
        let signing_input = format!("{}.{}", header(k.kid()), B64.encode(payload));
        let tag = k.sign(signing_input.as_bytes());
        format!("{signing_input}.{}", B64.encode(tag))
    }

    /// Checks signature, expiry and audience; returns the claims.
    pub fn verify(&self, token: &str, audience: &str) -> Result<Claims, BearerError> {
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(BearerError::Malformed);
        };
        let sig = B64.decode(s).map_err(|_| BearerError::Malformed)?;
        // The header is read before the signature is checked only to pick the key: a forged
        // kid selects a key the forger does not have.
        let header: Header = B64
            .decode(h)
            .ok()
            .and_then(|h| serde_json::from_slice(&h).ok())
            .ok_or(BearerError::Malformed)?;
        if header.alg != "HS256" {
            return Err(BearerError::Malformed);
        }
        let kid = header.kid.ok_or(BearerError::UnknownKey)?;
        let key = self.keys.find(&kid).ok_or(BearerError::UnknownKey)?;
        let signing_input = &token[..h.len() + 1 + p.len()];
        if !key.verify(signing_input.as_bytes(), &sig) {
            return Err(BearerError::BadSignature);
        }
        // Signed by us; the payload still gets checked.
        let payload = B64.decode(p).map_err(|_| BearerError::Malformed)?;
        let claims: Claims =
            serde_json::from_slice(&payload).map_err(|_| BearerError::Malformed)?;
        if claims.iss != ISSUER {
            return Err(BearerError::Malformed);
        }
        if claims.aud != audience {
            return Err(BearerError::WrongAudience);
        }
        if claims.exp <= now_secs() {
            return Err(BearerError::Expired);
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(exp: u64) -> Claims {
        Claims {
            iss: ISSUER.into(),
            aud: "outpost".into(),
            sub: "t".into(),
            iat: now_secs(),
            exp,
            access: vec![AccessEntry {
                kind: "repository".into(),
                name: "a/b".into(),
                actions: vec!["content/read".into()],
            }],
            ns: None,
        }
    }

    #[test]
    fn round_trip_and_forgeries() {
        let s = Signer::random().unwrap();
        let t = s.issue(&claims(now_secs() + 60));
        assert_eq!(s.verify(&t, "outpost").unwrap().access[0].name, "a/b");
        assert_eq!(
            s.verify(&t, "other").unwrap_err(),
            BearerError::WrongAudience
        );
        let other = Signer::random().unwrap();
        assert_eq!(
            other.verify(&t, "outpost").unwrap_err(),
            BearerError::UnknownKey
        );
        // Another key's token relabelled with our kid: the signature does not match.
        let relabelled = format!(
            "{}.{}",
            header(&s.kids()[0]),
            other
                .issue(&claims(now_secs() + 60))
                .split_once('.')
                .unwrap()
                .1
        );
        assert_eq!(
            s.verify(&relabelled, "outpost").unwrap_err(),
            BearerError::BadSignature
        );
        // Payload swapped under the original signature.
        let parts: Vec<&str> = t.split('.').collect();
        let mut c = claims(now_secs() + 60);
        c.access[0].actions.push("content/write".into());
        let forged = format!(
            "{}.{}.{}",
            parts[0],
            B64.encode(serde_json::to_vec(&c).unwrap()),
            parts[2]
        );
        assert_eq!(
            s.verify(&forged, "outpost").unwrap_err(),
            BearerError::BadSignature
        );
        let expired = s.issue(&claims(now_secs() - 1));
        assert_eq!(
            s.verify(&expired, "outpost").unwrap_err(),
            BearerError::Expired
        );
        for junk in ["", "a.b", "a.b.c.d", "!!.??.**", "e30.e30.e30"] {
            assert!(s.verify(junk, "outpost").is_err(), "{junk}");
        }
    }
}
