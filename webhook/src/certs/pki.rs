//! Issuing and reading certificates: an ECDSA P-256 CA, serving certificates it signs, and what
//! the decisions need to know about stored ones (validity, names, issuer, key match). Errors
//! never quote key material.

use std::collections::BTreeSet;
use std::fmt;
use std::net::IpAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PKCS_ECDSA_P256_SHA256, SanType,
};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

/// Certificates start this long before they are made: clocks of the nodes and the API server
/// may lag the one that issued them.
pub const BACKDATE: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("cannot generate a key pair: {0}")]
    Key(String),
    #[error("cannot issue the certificate: {0}")]
    Issue(String),
    #[error("unreadable certificate: {0}")]
    Parse(String),
}

/// A certificate (PEM) and its private key (PKCS#8 PEM).
#[derive(Clone, PartialEq, Eq)]
pub struct Pair {
    pub cert: String,
    pub key: String,
}

impl fmt::Debug for Pair {
    // The key stays out of every log and panic message.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pair")
            .field("cert", &self.cert)
            .field("key", &"<redacted>")
            .finish()
    }
}

/// The names a serving certificate must carry.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Sans {
    pub dns: BTreeSet<String>,
    pub ips: BTreeSet<IpAddr>,
}

impl Sans {
    pub fn is_empty(&self) -> bool {
        self.dns.is_empty() && self.ips.is_empty()
    }
}

/// What the decisions read from a certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Info {
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub sans: Sans,
    pub is_ca: bool,
}

fn secs(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

fn from_secs(s: i64) -> SystemTime {
    if s >= 0 {
        UNIX_EPOCH + Duration::from_secs(s.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_secs(s.unsigned_abs())
    }
}

fn offset(t: SystemTime) -> Result<time::OffsetDateTime, PkiError> {
    // Whole seconds: that is what X.509 stores, so a re-read certificate compares equal.
    time::OffsetDateTime::from_unix_timestamp(secs(t))
        .map_err(|e| PkiError::Issue(format!("time out of range: {e}")))
}

/// PEM of one DER certificate, 64 characters a line.
pub fn to_pem(der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// The certificates of a PEM bundle, each re-encoded the same way (so equal certificates
/// compare equal as text). Unreadable blocks are an error.
pub fn split_bundle(pem: &str) -> Result<Vec<String>, PkiError> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .map(|c| {
            c.map(|der| to_pem(&der))
                .map_err(|e| PkiError::Parse(format!("PEM: {e}")))
        })
        .collect()
}

fn first_der(pem: &str) -> Result<CertificateDer<'static>, PkiError> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .next()
        .ok_or_else(|| PkiError::Parse("no certificate in the PEM".into()))?
        .map_err(|e| PkiError::Parse(format!("PEM: {e}")))
}

fn parse(der: &[u8]) -> Result<X509Certificate<'_>, PkiError> {
    X509Certificate::from_der(der)
        .map(|(_, c)| c)
        .map_err(|e| PkiError::Parse(format!("X.509: {e}")))
}

/// Validity, names and CA flag of the first certificate in `pem`.
pub fn info(pem: &str) -> Result<Info, PkiError> {
    let der = first_der(pem)?;
    let cert = parse(&der)?;
    let mut sans = Sans::default();
    if let Ok(Some(ext)) = cert.subject_alternative_name() {
        for name in &ext.value.general_names {
            match name {
                GeneralName::DNSName(d) => {
                    sans.dns.insert((*d).to_owned());
                }
                GeneralName::IPAddress(b) => {
                    if let Ok(a) = <[u8; 4]>::try_from(*b) {
                        sans.ips.insert(IpAddr::from(a));
                    } else if let Ok(a) = <[u8; 16]>::try_from(*b) {
                        sans.ips.insert(IpAddr::from(a));
                    }
                }
                _ => {}
            }
        }
    }
    Ok(Info {
        not_before: from_secs(cert.validity().not_before.timestamp()),
        not_after: from_secs(cert.validity().not_after.timestamp()),
        sans,
        is_ca: cert.is_ca(),
    })
}

/// Whether the first certificate of `cert` was signed by the key of the first of `ca`.
pub fn signed_by(cert: &str, ca: &str) -> bool {
    let (Ok(c), Ok(a)) = (first_der(cert), first_der(ca)) else {
        return false;
    };
    let (Ok(c), Ok(a)) = (parse(&c), parse(&a)) else {
        return false;
    };
    c.issuer() == a.subject() && c.verify_signature(Some(a.public_key())).is_ok()
}

/// Whether `pair.key` is the private key of `pair.cert`.
pub fn key_matches(pair: &Pair) -> bool {
    let Ok(key) = KeyPair::from_pem(&pair.key) else {
        return false;
    };
    let Ok(der) = first_der(&pair.cert) else {
        return false;
    };
    parse(&der)
        .is_ok_and(|c| c.public_key().subject_public_key.data.as_ref() == key.public_key_raw())
}

fn p256() -> Result<KeyPair, PkiError> {
    KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| PkiError::Key(e.to_string()))
}

/// A self-signed CA valid from `now` for `validity`, named `<name>@<unix seconds>` (as
/// Kubernetes names its own self-signed CAs) so that the CAs of one rotation differ by name.
pub fn new_ca(name: &str, now: SystemTime, validity: Duration) -> Result<Pair, PkiError> {
    let key = p256()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("{name}@{}", secs(now)));
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = offset(now - BACKDATE)?;
    params.not_after = offset(now + validity)?;
    let cert = params
        .self_signed(&key)
        .map_err(|e| PkiError::Issue(e.to_string()))?;
    Ok(Pair {
        cert: to_pem(cert.der()),
        key: key.serialize_pem(),
    })
}

/// A serving certificate for `sans`, signed by `ca`, valid from `now` for `validity` but never
/// past the CA's own end.
pub fn issue(
    ca: &Pair,
    sans: &Sans,
    now: SystemTime,
    validity: Duration,
) -> Result<Pair, PkiError> {
    if sans.is_empty() {
        return Err(PkiError::Issue(
            "no DNS name or IP address to certify".into(),
        ));
    }
    let ca_key = KeyPair::from_pem(&ca.key)
        .map_err(|_| PkiError::Parse("the CA's private key is unreadable".into()))?;
    let ca_end = info(&ca.cert)?.not_after;
    let issuer = Issuer::from_ca_cert_pem(&ca.cert, ca_key)
        .map_err(|e| PkiError::Parse(format!("CA certificate: {e}")))?;
    let key = p256()?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    let cn = sans
        .dns
        .iter()
        .next()
        .cloned()
        .or_else(|| sans.ips.iter().next().map(|i| i.to_string()))
        .unwrap_or_default();
    dn.push(DnType::CommonName, cn);
    params.distinguished_name = dn;
    for d in &sans.dns {
        let name = d
            .clone()
            .try_into()
            .map_err(|e| PkiError::Issue(format!("DNS name {d:?}: {e}")))?;
        params.subject_alt_names.push(SanType::DnsName(name));
    }
    params
        .subject_alt_names
        .extend(sans.ips.iter().map(|ip| SanType::IpAddress(*ip)));
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.use_authority_key_identifier_extension = true;
    params.not_before = offset(now - BACKDATE)?;
    params.not_after = offset((now + validity).min(ca_end))?;
    let cert = params
        .signed_by(&key, &issuer)
        .map_err(|e| PkiError::Issue(e.to_string()))?;
    Ok(Pair {
        cert: to_pem(cert.der()),
        key: key.serialize_pem(),
    })
}
