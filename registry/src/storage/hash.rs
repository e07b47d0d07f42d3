//! Incremental content hashing for the digests Outpost accepts.

use aws_lc_rs::digest;
use outpost_core::{Algorithm, Digest};

pub struct Hasher {
    algorithm: Algorithm,
    ctx: digest::Context,
}

impl Hasher {
    pub fn new(algorithm: Algorithm) -> Self {
        let alg = match algorithm {
            Algorithm::Sha256 => &digest::SHA256,
            Algorithm::Sha512 => &digest::SHA512,
        };
        Hasher {
            algorithm,
            ctx: digest::Context::new(alg),
        }
    }

    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    pub fn update(&mut self, data: &[u8]) {
        self.ctx.update(data);
    }

    pub fn finish(self) -> Digest {
        let out = self.ctx.finish();
        let mut hex = String::with_capacity(out.as_ref().len() * 2);
        for b in out.as_ref() {
            hex.push(char::from(b"0123456789abcdef"[usize::from(b >> 4)]));
            hex.push(char::from(b"0123456789abcdef"[usize::from(b & 0xf)]));
        }
        Digest::new(self.algorithm, &hex).unwrap_or_else(|_| unreachable!("hex of a real hash"))
    }
}

/// Digest of `data` in one call.
pub fn digest_of(algorithm: Algorithm, data: &[u8]) -> Digest {
    let mut h = Hasher::new(algorithm);
    h.update(data);
    h.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_digests() {
        assert_eq!(
            digest_of(Algorithm::Sha256, b"").to_string(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert!(
            digest_of(Algorithm::Sha512, b"abc")
                .to_string()
                .starts_with("sha512:ddaf35a193617aba")
        );
    }
}
