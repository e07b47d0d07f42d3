//! The token signing key file (`--token-signing-key-file`): the keys the registry's replicas
//! sign and verify bearer tokens with, and the webhook mints namespace credentials with.
//!
//! Format: one key per line, the standard base64 of at least 32 random bytes (padding
//! optional); blank lines and lines starting with `#` are ignored. The first key signs, every
//! key verifies. Rotation: add the new key second, roll out, move it first, wait one token
//! lifetime, remove the old one.
//!
//! Parsing only: callers read the file (this crate does no I/O) and report read failures
//! through [`KeyFileError::Read`], so every binary words them alike.

use std::path::Path;

use aws_lc_rs::hmac;
use base64::Engine;
use base64::engine::general_purpose::STANDARD_NO_PAD as B64;

/// Shortest key accepted, in bytes (HMAC-SHA256's block of security).
pub const MIN_KEY_BYTES: usize = 32;

/// Why a key file was refused. Never carries key material: only the path and line numbers.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("cannot read token signing key file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("token signing key file {path} holds no key (one base64 key per line)")]
    NoKey { path: String },
    #[error(
        "token signing key file {path}, line {line}: the key has {len} bytes, at least {MIN_KEY_BYTES} are needed"
    )]
    Short {
        path: String,
        line: usize,
        len: usize,
    },
    #[error("token signing key file {path}, line {line}: the key is not valid base64")]
    Encoding { path: String, line: usize },
}

/// One HMAC-SHA256 key and its id.
pub struct SigningKey {
    /// First 8 bytes of the key's SHA-256, in hex: names the key, reveals nothing of it.
    kid: String,
    key: hmac::Key,
}

impl SigningKey {
    pub fn new(raw: &[u8]) -> Self {
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, raw);
        let kid = digest.as_ref()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        SigningKey {
            kid,
            key: hmac::Key::new(hmac::HMAC_SHA256, raw),
        }
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// HMAC-SHA256 of `data`.
    pub fn sign(&self, data: &[u8]) -> Vec<u8> {
        hmac::sign(&self.key, data).as_ref().to_vec()
    }

    /// Checks `tag` against `data` in constant time.
    pub fn verify(&self, data: &[u8], tag: &[u8]) -> bool {
        hmac::verify(&self.key, data, tag).is_ok()
    }
}

/// The keys of a key file, in file order: the first signs, every one verifies.
pub struct SigningKeys {
    keys: Vec<SigningKey>,
}

impl std::fmt::Debug for SigningKeys {
    // Key ids only, never keys.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKeys")
            .field("kids", &self.kids())
            .finish()
    }
}

impl SigningKeys {
    /// Keys from raw bytes, in order. An empty list signs nothing and verifies nothing.
    pub fn from_raw(keys: &[Vec<u8>]) -> Self {
        SigningKeys {
            keys: keys.iter().map(|k| SigningKey::new(k)).collect(),
        }
    }

    /// Parses the text of a key file; `path` only names the file in errors.
    pub fn parse(path: &Path, text: &str) -> Result<Self, KeyFileError> {
        let path = || path.display().to_string();
        let mut keys = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let bytes =
                B64.decode(line.trim_end_matches('='))
                    .map_err(|_| KeyFileError::Encoding {
                        path: path(),
                        line: i + 1,
                    })?;
            if bytes.len() < MIN_KEY_BYTES {
                return Err(KeyFileError::Short {
                    path: path(),
                    line: i + 1,
                    len: bytes.len(),
                });
            }
            keys.push(bytes);
        }
        if keys.is_empty() {
            return Err(KeyFileError::NoKey { path: path() });
        }
        Ok(Self::from_raw(&keys))
    }

    /// The signing key (the first), if any.
    pub fn signing(&self) -> Option<&SigningKey> {
        self.keys.first()
    }

    /// The key named `kid`.
    pub fn find(&self, kid: &str) -> Option<&SigningKey> {
        self.keys.iter().find(|k| k.kid == kid)
    }

    /// The key ids, the signing key's first.
    pub fn kids(&self) -> Vec<String> {
        self.keys.iter().map(|k| k.kid.clone()).collect()
    }
}

/// A new key line: the base64 of 32 bytes from the system random generator.
pub fn generate() -> Result<String, aws_lc_rs::error::Unspecified> {
    let mut bytes = [0u8; MIN_KEY_BYTES];
    aws_lc_rs::rand::fill(&mut bytes)?;
    Ok(base64::engine::general_purpose::STANDARD.encode(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p() -> &'static Path {
        Path::new("keys.txt")
    }

    #[test]
    fn good_file_with_comments_and_padding() {
        let a = generate().unwrap();
        let b = generate().unwrap();
        assert!(a.ends_with('='), "44 base64 characters end in one pad");
        let text = format!(
            "# signing keys\n\n  {a}  \n# the next one verifies only\n{}\n",
            b.trim_end_matches('=')
        );
        let s = SigningKeys::parse(p(), &text).unwrap();
        assert_eq!(s.kids().len(), 2);
        let first = SigningKeys::parse(p(), &a).unwrap();
        assert_eq!(s.kids()[0], first.kids()[0]);
        assert_ne!(s.kids()[0], s.kids()[1]);
        assert_eq!(s.signing().unwrap().kid(), first.kids()[0]);
        let tag = s.signing().unwrap().sign(b"data");
        assert!(first.find(&s.kids()[0]).unwrap().verify(b"data", &tag));
        assert!(!first.find(&s.kids()[0]).unwrap().verify(b"datA", &tag));
        assert!(first.find(&s.kids()[1]).is_none());
    }

    #[test]
    fn refusals_name_the_line_never_the_key() {
        let short = base64::engine::general_purpose::STANDARD.encode([7u8; 31]);
        let e = SigningKeys::parse(p(), &format!("# c\n{short}\n")).unwrap_err();
        assert!(
            matches!(
                e,
                KeyFileError::Short {
                    line: 2,
                    len: 31,
                    ..
                }
            ),
            "{e}"
        );
        assert!(!e.to_string().contains(&short));
        let bad = "not*base64*at*all*but*long*enough*to*be*a*key*!!";
        let e = SigningKeys::parse(p(), &format!("{}\n{bad}\n", generate().unwrap())).unwrap_err();
        assert!(matches!(e, KeyFileError::Encoding { line: 2, .. }), "{e}");
        assert!(!e.to_string().contains(bad));
        for empty in ["", "\n\n", "# only a comment\n   \n"] {
            assert!(matches!(
                SigningKeys::parse(p(), empty).unwrap_err(),
                KeyFileError::NoKey { .. }
            ));
        }
    }

    #[test]
    fn kid_is_a_hash_not_the_key() {
        let a = generate().unwrap();
        let s = SigningKeys::parse(p(), &a).unwrap();
        let kid = &s.kids()[0];
        assert_eq!(kid.len(), 16);
        assert!(kid.bytes().all(|c| c.is_ascii_hexdigit()));
        // Same key, same kid: replicas and the webhook agree sharing nothing but the file.
        assert_eq!(SigningKeys::parse(p(), &a).unwrap().kids()[0], *kid);
        assert!(!format!("{s:?}").contains(a.trim_end_matches('=')));
    }
}
