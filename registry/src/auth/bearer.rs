//! Short-lived bearer tokens issued by our own token endpoint: compact JWTs signed with
//! HMAC-SHA256 under a key that lives only in this process (a restart simply sends clients
//! back to the token endpoint).

use std::time::{SystemTime, UNIX_EPOCH};

use aws_lc_rs::hmac;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
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
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum BearerError {
    #[error("bearer token is malformed")]
    Malformed,
    #[error("bearer token signature is not valid")]
    BadSignature,
    #[error("bearer token has expired")]
    Expired,
    #[error("bearer token was issued for another service")]
    WrongAudience,
}

pub struct Signer {
    key: hmac::Key,
}

const HEADER: &str = r#"{"alg":"HS256","typ":"JWT"}"#;

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl Signer {
    /// A signer with a fresh random key.
    pub fn random() -> Result<Self, aws_lc_rs::error::Unspecified> {
        let rng = aws_lc_rs::rand::SystemRandom::new();
        Ok(Signer {
            key: hmac::Key::generate(hmac::HMAC_SHA256, &rng)?,
        })
    }

    pub fn issue(&self, claims: &Claims) -> String {
        let payload = serde_json::to_vec(claims).unwrap_or_default();
        let signing_input = format!("{}.{}", B64.encode(HEADER), B64.encode(payload));
        let tag = hmac::sign(&self.key, signing_input.as_bytes());
        format!("{signing_input}.{}", B64.encode(tag.as_ref()))
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
        let signing_input = &token[..h.len() + 1 + p.len()];
        hmac::verify(&self.key, signing_input.as_bytes(), &sig)
            .map_err(|_| BearerError::BadSignature)?;
        // Signed by us, so the header can only be ours; the payload still gets checked.
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
