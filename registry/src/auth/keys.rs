//! The token signing key file (`--token-signing-key-file`): the keys every replica signs and
//! verifies bearer tokens with, so a token from one replica is accepted by all of them.
//!
//! The parsing is outpost-core's (`outpost_core::keys`), shared with the webhook, which mints
//! namespace credentials with the same keys.
//!
//! Format: one key per line, the standard base64 of at least 32 random bytes (padding
//! optional); blank lines and lines starting with `#` are ignored. The first key signs, every
//! key verifies. Rotation: add the new key second, roll out, move it first, wait one token
//! lifetime, remove the old one.

use std::path::Path;

use outpost_core::SigningKeys;
pub use outpost_core::keys::{KeyFileError, MIN_KEY_BYTES, generate};

use super::bearer::Signer;

/// Parses the text of a key file into a signer (first key signs, all verify).
pub fn parse(path: &Path, text: &str) -> Result<Signer, KeyFileError> {
    Ok(Signer::from_set(SigningKeys::parse(path, text)?))
}

/// Reads and parses a key file.
pub fn load(path: &Path) -> Result<(Signer, String), KeyFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeyFileError::Read {
        path: path.display().to_string(),
        source,
    })?;
    Ok((parse(path, &text)?, text))
}

#[cfg(test)]
mod tests {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD_NO_PAD as B64;

    use super::*;
    use crate::auth::bearer::{AccessEntry, BearerError, Claims, ISSUER, now_secs};

    fn claims() -> Claims {
        Claims {
            iss: ISSUER.into(),
            aud: "outpost".into(),
            sub: "t".into(),
            iat: now_secs(),
            exp: now_secs() + 60,
            access: vec![AccessEntry {
                kind: "repository".into(),
                name: "a/b".into(),
                actions: vec!["content/read".into()],
            }],
            ns: None,
        }
    }

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
        let s = parse(p(), &text).unwrap();
        assert_eq!(s.kids().len(), 2);
        // The first listed key signs.
        let first = parse(p(), &a).unwrap();
        assert_eq!(s.kids()[0], first.kids()[0]);
        assert_ne!(s.kids()[0], s.kids()[1]);
        let t = s.issue(&claims());
        assert_eq!(first.verify(&t, "outpost").unwrap().sub, "t");
        // What a file may hold is outpost-core's to check (its tests); reading it is ours.
        let e = load(Path::new("/nonexistent/outpost-keys")).unwrap_err();
        assert!(matches!(e, KeyFileError::Read { .. }), "{e}");
    }

    #[test]
    fn kid_is_a_hash_not_the_key() {
        let a = generate().unwrap();
        let s = parse(p(), &a).unwrap();
        let kid = &s.kids()[0];
        assert_eq!(kid.len(), 16);
        assert!(kid.bytes().all(|c| c.is_ascii_hexdigit()));
        // Same key, same kid: replicas agree without sharing anything but the file.
        assert_eq!(parse(p(), &a).unwrap().kids()[0], *kid);
        let header = s.issue(&claims()).split('.').next().unwrap().to_owned();
        let header = String::from_utf8(B64.decode(header).unwrap()).unwrap();
        assert!(header.contains(&format!(r#""kid":"{kid}""#)), "{header}");
        assert!(!header.contains(a.trim_end_matches('=')));
        assert!(!format!("{s:?}").contains(a.trim_end_matches('=')));
    }

    #[test]
    fn rotation() {
        let (a, b) = (generate().unwrap(), generate().unwrap());
        let only_a = parse(p(), &a).unwrap();
        let token_a = only_a.issue(&claims());
        // Step 1: the new key is added second; A still signs, B is accepted.
        let a_then_b = parse(p(), &format!("{a}\n{b}\n")).unwrap();
        assert_eq!(a_then_b.verify(&token_a, "outpost").unwrap().sub, "t");
        let still_a = a_then_b.issue(&claims());
        assert_eq!(only_a.verify(&still_a, "outpost").unwrap().sub, "t");
        // Step 2: B moves first and signs; tokens signed with A still verify.
        let b_then_a = parse(p(), &format!("{b}\n{a}\n")).unwrap();
        assert_eq!(b_then_a.verify(&token_a, "outpost").unwrap().sub, "t");
        let token_b = b_then_a.issue(&claims());
        assert_eq!(a_then_b.verify(&token_b, "outpost").unwrap().sub, "t");
        assert_eq!(
            only_a.verify(&token_b, "outpost").unwrap_err(),
            BearerError::UnknownKey
        );
        // Step 3: A removed; its tokens are refused, B's still verify.
        let only_b = parse(p(), &b).unwrap();
        assert_eq!(
            only_b.verify(&token_a, "outpost").unwrap_err(),
            BearerError::UnknownKey
        );
        assert_eq!(only_b.verify(&token_b, "outpost").unwrap().sub, "t");
    }
}
