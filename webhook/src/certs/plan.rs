//! What the stored certificates should become, decided from what is stored and the time alone,
//! so that replicas racing on the same Secrets agree: the one whose write lands first wins and
//! the others, re-reading, find nothing left to do.
//!
//! CA rotation with overlap: when the signing CA has a third of its validity left, a new CA is
//! made and published in the trust bundle (next to the current one) without signing anything;
//! once the bundle with both has been out for the overlap period, the new CA becomes the signer
//! and every serving certificate is re-issued by it; an old CA leaves the bundle when it expires.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime};

use super::pki::{self, BACKDATE, Info, Pair, PkiError, Sans};

/// Secret keys: the signing CA in `tls.crt`/`tls.key` (kubernetes.io/tls), the bundle of every
/// trusted CA, newest first, in `ca.crt`; during a rotation the coming CA in `next.*`.
pub const CERT: &str = "tls.crt";
pub const KEY: &str = "tls.key";
pub const BUNDLE: &str = "ca.crt";
pub const NEXT_CERT: &str = "next.crt";
pub const NEXT_KEY: &str = "next.key";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timings {
    /// Validity of a new CA.
    pub ca_validity: Duration,
    /// Validity of a new serving certificate; renewed with a third left.
    pub cert_validity: Duration,
    /// How long a coming CA is trusted before it signs.
    pub overlap: Duration,
}

impl Default for Timings {
    fn default() -> Self {
        const DAY: u64 = 24 * 3600;
        Timings {
            ca_validity: Duration::from_secs(3 * 365 * DAY),
            cert_validity: Duration::from_secs(90 * DAY),
            overlap: Duration::from_secs(30 * DAY),
        }
    }
}

impl Timings {
    /// The rotation only works if a serving certificate issued just before a promotion, and
    /// the overlap itself, fit in the third of the CA's life left when the rotation starts.
    pub fn check(&self) -> Result<(), String> {
        if self.ca_validity.is_zero() || self.cert_validity.is_zero() || self.overlap.is_zero() {
            return Err("certificate validities and the CA overlap must be more than zero".into());
        }
        if self.cert_validity + self.overlap >= self.ca_validity / 3 {
            return Err(format!(
                "the serving certificates' validity ({}s) plus the CA overlap ({}s) must be less \
                 than a third of the CA validity ({}s)",
                self.cert_validity.as_secs(),
                self.overlap.as_secs(),
                self.ca_validity.as_secs()
            ));
        }
        Ok(())
    }
}

/// The CA Secret's content.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaState {
    pub signer: Pair,
    pub next: Option<Pair>,
    /// Every trusted CA certificate (PEM each), newest first.
    pub bundle: Vec<String>,
}

fn text(data: &BTreeMap<String, Vec<u8>>, key: &str) -> Result<Option<String>, String> {
    data.get(key)
        .map(|b| String::from_utf8(b.clone()).map_err(|_| format!("{key} is not text")))
        .transpose()
}

fn pair(cert: &str, key: String) -> Result<Pair, String> {
    let cert = pki::split_bundle(cert)
        .map_err(|e| e.to_string())?
        .into_iter()
        .next()
        .ok_or("no certificate")?;
    let p = Pair { cert, key };
    if !pki::key_matches(&p) {
        return Err("the key does not belong to the certificate".into());
    }
    Ok(p)
}

impl CaState {
    pub fn from_data(data: &BTreeMap<String, Vec<u8>>) -> Result<Self, String> {
        let cert = text(data, CERT)?.ok_or("no tls.crt")?;
        let key = text(data, KEY)?.ok_or("no tls.key")?;
        let signer = pair(&cert, key).map_err(|e| format!("signing CA: {e}"))?;
        let next = match (text(data, NEXT_CERT)?, text(data, NEXT_KEY)?) {
            (Some(c), Some(k)) => Some(pair(&c, k).map_err(|e| format!("coming CA: {e}"))?),
            _ => None,
        };
        let bundle = match text(data, BUNDLE)? {
            Some(b) => pki::split_bundle(&b).map_err(|e| format!("ca.crt: {e}"))?,
            None => Vec::new(),
        };
        Ok(CaState {
            signer,
            next,
            bundle,
        })
    }

    pub fn to_data(&self) -> BTreeMap<String, Vec<u8>> {
        let mut d = BTreeMap::from([
            (CERT.to_owned(), self.signer.cert.clone().into_bytes()),
            (KEY.to_owned(), self.signer.key.clone().into_bytes()),
            (BUNDLE.to_owned(), self.bundle_pem().into_bytes()),
        ]);
        if let Some(n) = &self.next {
            d.insert(NEXT_CERT.to_owned(), n.cert.clone().into_bytes());
            d.insert(NEXT_KEY.to_owned(), n.key.clone().into_bytes());
        }
        d
    }

    pub fn bundle_pem(&self) -> String {
        self.bundle.concat()
    }
}

/// A serving certificate Secret's content.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeafState {
    pub pair: Pair,
    /// The trust bundle (`ca.crt`) stored beside it.
    pub bundle: String,
}

impl LeafState {
    pub fn from_data(data: &BTreeMap<String, Vec<u8>>) -> Result<Self, String> {
        let cert = text(data, CERT)?.ok_or("no tls.crt")?;
        let key = text(data, KEY)?.ok_or("no tls.key")?;
        let pair = pair(&cert, key)?;
        let bundle = text(data, BUNDLE)?.unwrap_or_default();
        Ok(LeafState { pair, bundle })
    }

    pub fn to_data(&self) -> BTreeMap<String, Vec<u8>> {
        BTreeMap::from([
            (CERT.to_owned(), self.pair.cert.clone().into_bytes()),
            (KEY.to_owned(), self.pair.key.clone().into_bytes()),
            (BUNDLE.to_owned(), self.bundle.clone().into_bytes()),
        ])
    }
}

/// A decision: keep what is stored, or write this (and why, for the log).
#[derive(Debug)]
pub enum Decision<T> {
    Keep(T),
    Write(T, &'static str),
}

fn remaining(info: &Info, now: SystemTime) -> Duration {
    info.not_after.duration_since(now).unwrap_or(Duration::ZERO)
}

/// When a CA was published: it is made (and written) `BACKDATE` after its notBefore.
fn published(info: &Info) -> SystemTime {
    info.not_before + BACKDATE
}

/// The CA Secret's next content. `stored`: nothing yet, unreadable (why), or what is there.
pub fn decide_ca(
    stored: Option<Result<CaState, String>>,
    name: &str,
    now: SystemTime,
    t: &Timings,
) -> Result<Decision<CaState>, PkiError> {
    let fresh = |why| -> Result<Decision<CaState>, PkiError> {
        let ca = pki::new_ca(name, now, t.ca_validity)?;
        Ok(Decision::Write(
            CaState {
                bundle: vec![ca.cert.clone()],
                signer: ca,
                next: None,
            },
            why,
        ))
    };
    let current = match stored {
        None => return fresh("created"),
        // Someone broke it: nothing in it can be trusted to sign; start over.
        Some(Err(_)) => return fresh("the stored CA was unreadable; replaced"),
        Some(Ok(s)) => s,
    };
    let mut s = current.clone();
    let mut why = None;
    let mut signer = pki::info(&s.signer.cert)?;
    if signer.not_after <= now {
        // Expired (the manager did not run for a long time): sign with the coming CA if it is
        // still valid, else with a new one. Trust breaks until nodes get the bundle.
        let next = s
            .next
            .take()
            .filter(|n| pki::info(&n.cert).is_ok_and(|i| i.not_after > now));
        s.signer = match next {
            Some(n) => n,
            None => pki::new_ca(name, now, t.ca_validity)?,
        };
        signer = pki::info(&s.signer.cert)?;
        why = Some("the signing CA had expired");
    }
    if let Some(next) = &s.next {
        let ni = pki::info(&next.cert)?;
        if published(&ni) + t.overlap <= now {
            s.signer = next.clone();
            s.next = None;
            signer = ni;
            why = Some("rotation: the new CA signs from now on");
        }
    }
    if s.next.is_none() && remaining(&signer, now) < t.ca_validity / 3 {
        s.next = Some(pki::new_ca(name, now, t.ca_validity)?);
        why = Some("rotation: a new CA is trusted before it signs");
    }
    // The bundle: the coming CA, the signer, and every earlier CA until it expires; newest
    // first, each once.
    let mut trusted: Vec<(SystemTime, String)> = Vec::new();
    let candidates = s
        .next
        .iter()
        .map(|n| n.cert.clone())
        .chain(std::iter::once(s.signer.cert.clone()))
        .chain(current.bundle.iter().cloned());
    for cert in candidates {
        if trusted.iter().any(|(_, c)| *c == cert) {
            continue;
        }
        match pki::info(&cert) {
            Ok(i) if i.not_after > now => trusted.push((i.not_before, cert)),
            _ => {}
        }
    }
    trusted.sort_by_key(|c| std::cmp::Reverse(c.0));
    s.bundle = trusted.into_iter().map(|(_, c)| c).collect();
    if why.is_none() && s.bundle != current.bundle {
        why = Some("trust bundle updated");
    }
    Ok(match why {
        Some(w) if s != current => Decision::Write(s, w),
        _ => Decision::Keep(s),
    })
}

/// A serving certificate Secret's next content, given the CA state just decided.
pub fn decide_leaf(
    stored: Option<Result<LeafState, String>>,
    ca: &CaState,
    sans: &Sans,
    now: SystemTime,
    t: &Timings,
) -> Result<Decision<LeafState>, PkiError> {
    let bundle = ca.bundle_pem();
    let reissue = |why| -> Result<Decision<LeafState>, PkiError> {
        Ok(Decision::Write(
            LeafState {
                pair: pki::issue(&ca.signer, sans, now, t.cert_validity)?,
                bundle: bundle.clone(),
            },
            why,
        ))
    };
    let current = match stored {
        None => return reissue("issued"),
        Some(Err(_)) => return reissue("the stored certificate was unreadable; re-issued"),
        Some(Ok(l)) => l,
    };
    let info = match pki::info(&current.pair.cert) {
        Ok(i) => i,
        Err(_) => return reissue("the stored certificate was unreadable; re-issued"),
    };
    if !pki::signed_by(&current.pair.cert, &ca.signer.cert) {
        return reissue("re-issued by the current CA");
    }
    if info.sans != *sans {
        return reissue("re-issued for changed names");
    }
    let signer_end = pki::info(&ca.signer.cert)?.not_after;
    // A certificate cut short at its CA's end cannot be extended: the CA's rotation renews it.
    if remaining(&info, now) < t.cert_validity / 3 && info.not_after < signer_end {
        return reissue("renewed");
    }
    if current.bundle != bundle {
        return Ok(Decision::Write(
            LeafState {
                pair: current.pair,
                bundle,
            },
            "trust bundle updated",
        ));
    }
    Ok(Decision::Keep(current))
}
