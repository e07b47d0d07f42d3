//! Self-managed certificates: issuance (names, key usage, a chain rustls verifies), renewal,
//! each phase of a CA rotation under an injected clock, and the decisions of replicas racing on
//! the same Secret.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use outpost_webhook::certs::pki::{self, Pair, Sans};
use outpost_webhook::certs::plan::{CaState, Decision, LeafState, Timings, decide_ca, decide_leaf};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::ServerCertVerifier;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use x509_parser::prelude::{FromDer, X509Certificate};

const DAY: u64 = 24 * 3600;

fn t0() -> SystemTime {
    UNIX_EPOCH + Duration::from_secs(1_800_000_000)
}

fn days(n: u64) -> Duration {
    Duration::from_secs(n * DAY)
}

fn registry_sans() -> Sans {
    Sans {
        dns: [
            "outpost-registry",
            "outpost-registry.edge",
            "outpost-registry.edge.svc",
            "outpost-registry.edge.svc.cluster.local",
            "localhost",
        ]
        .map(String::from)
        .into(),
        ips: ["127.0.0.1", "10.96.100.100"]
            .map(|i| i.parse::<IpAddr>().unwrap())
            .into(),
    }
}

fn ders(pem: &str) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap()
}

/// Verifies `leaf` for `name` at `at` with rustls' WebPKI verifier trusting `bundle` only.
fn verify(leaf: &str, bundle: &str, name: &str, at: SystemTime) -> Result<(), rustls::Error> {
    let mut roots = rustls::RootCertStore::empty();
    for c in ders(bundle) {
        roots.add(c).unwrap();
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .unwrap();
    let leaf = ders(leaf).remove(0);
    verifier
        .verify_server_cert(
            &leaf,
            &[],
            &ServerName::try_from(name.to_owned()).unwrap(),
            &[],
            UnixTime::since_unix_epoch(at.duration_since(UNIX_EPOCH).unwrap()),
        )
        .map(|_| ())
}

fn written<T: std::fmt::Debug>(d: Decision<T>) -> (T, &'static str) {
    match d {
        Decision::Write(t, why) => (t, why),
        Decision::Keep(t) => panic!("expected a write, kept {t:?}"),
    }
}

fn kept<T: std::fmt::Debug>(d: Decision<T>) -> T {
    match d {
        Decision::Keep(t) => t,
        Decision::Write(t, why) => panic!("expected no write, wrote ({why}) {t:?}"),
    }
}

fn new_ca(t: &Timings, now: SystemTime) -> CaState {
    written(decide_ca(None, "outpost-ca", now, t).unwrap()).0
}

fn issue(ca: &CaState, t: &Timings, now: SystemTime) -> LeafState {
    written(decide_leaf(None, ca, &registry_sans(), now, t).unwrap()).0
}

#[test]
fn issues_a_p256_ca_and_serving_certificates_that_verify() {
    let t = Timings::default();
    t.check().unwrap();
    let ca = new_ca(&t, t0());
    assert_eq!(ca.bundle, vec![ca.signer.cert.clone()]);
    assert!(ca.next.is_none());
    let ca_info = pki::info(&ca.signer.cert).unwrap();
    assert!(ca_info.is_ca);
    assert_eq!(ca_info.not_after, t0() + t.ca_validity);
    assert!(pki::key_matches(&ca.signer));

    let leaf = issue(&ca, &t, t0());
    assert_eq!(leaf.bundle, ca.bundle_pem());
    let info = pki::info(&leaf.pair.cert).unwrap();
    assert_eq!(info.sans, registry_sans());
    assert!(!info.is_ca);
    assert_eq!(info.not_after, t0() + t.cert_validity);
    assert!(info.not_before < t0(), "backdated for clock skew");
    assert!(pki::key_matches(&leaf.pair));
    assert!(pki::signed_by(&leaf.pair.cert, &ca.signer.cert));

    // Key usage and algorithm as promised: ECDSA P-256, digitalSignature, serverAuth only.
    let der = ders(&leaf.pair.cert).remove(0);
    let (_, x) = X509Certificate::from_der(&der).unwrap();
    let ku = x.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature() && !ku.key_cert_sign());
    let eku = x.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.server_auth && !eku.client_auth);
    assert_eq!(
        x.public_key()
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .map(|o| o.to_id_string()),
        Some("1.2.840.10045.3.1.7".to_owned()),
        "P-256"
    );
    assert!(leaf.pair.key.contains("BEGIN PRIVATE KEY"));
    assert!(
        !format!("{:?}", leaf.pair).contains("PRIVATE KEY"),
        "Debug hides the key"
    );

    // rustls verifies the chain for every name and the IPs, and nothing else.
    let bundle = ca.bundle_pem();
    for name in [
        "outpost-registry.edge.svc",
        "localhost",
        "127.0.0.1",
        "10.96.100.100",
    ] {
        verify(&leaf.pair.cert, &bundle, name, t0()).unwrap_or_else(|e| panic!("{name}: {e}"));
    }
    assert!(verify(&leaf.pair.cert, &bundle, "example.com", t0()).is_err());
    let other = new_ca(&t, t0());
    assert!(verify(&leaf.pair.cert, &other.bundle_pem(), "localhost", t0()).is_err());
    // rustls serves it.
    outpost_webhook::tls::from_pem(leaf.pair.cert.as_bytes(), leaf.pair.key.as_bytes()).unwrap();
}

#[test]
fn stored_state_round_trips_and_nothing_is_rewritten_while_valid() {
    let t = Timings::default();
    let ca = new_ca(&t, t0());
    let back = CaState::from_data(&ca.to_data()).unwrap();
    assert_eq!(back, ca);
    let leaf = issue(&ca, &t, t0());
    assert_eq!(LeafState::from_data(&leaf.to_data()).unwrap(), leaf);
    for at in [t0(), t0() + days(30), t0() + days(59)] {
        kept(decide_ca(Some(Ok(back.clone())), "outpost-ca", at, &t).unwrap());
        kept(decide_leaf(Some(Ok(leaf.clone())), &ca, &registry_sans(), at, &t).unwrap());
    }
    // A key that is not the certificate's is unreadable state, not a usable pair.
    let mut data = leaf.to_data();
    data.insert("tls.key".into(), new_ca(&t, t0()).signer.key.into_bytes());
    assert!(LeafState::from_data(&data).is_err());
}

#[test]
fn serving_certificates_are_renewed_with_a_third_left_and_on_changed_names() {
    let t = Timings::default();
    let ca = new_ca(&t, t0());
    let leaf = issue(&ca, &t, t0());
    // 90 d validity: kept at 59 d, renewed at 61 d (29 d left).
    kept(
        decide_leaf(
            Some(Ok(leaf.clone())),
            &ca,
            &registry_sans(),
            t0() + days(59),
            &t,
        )
        .unwrap(),
    );
    let (renewed, why) = written(
        decide_leaf(
            Some(Ok(leaf.clone())),
            &ca,
            &registry_sans(),
            t0() + days(61),
            &t,
        )
        .unwrap(),
    );
    assert_eq!(why, "renewed");
    assert_ne!(renewed.pair, leaf.pair);
    assert_eq!(
        pki::info(&renewed.pair.cert).unwrap().not_after,
        t0() + days(61) + t.cert_validity
    );
    // A new Service IP: re-issued at once with it.
    let mut sans = registry_sans();
    sans.ips.insert("10.96.0.50".parse().unwrap());
    let (moved, why) = written(decide_leaf(Some(Ok(leaf.clone())), &ca, &sans, t0(), &t).unwrap());
    assert_eq!(why, "re-issued for changed names");
    assert_eq!(pki::info(&moved.pair.cert).unwrap().sans, sans);
    // Unreadable: re-issued.
    let (_, why) =
        written(decide_leaf(Some(Err("garbage".into())), &ca, &registry_sans(), t0(), &t).unwrap());
    assert!(why.contains("unreadable"), "{why}");
}

/// A whole rotation, phase by phase: trusted first, signing after the overlap, dropped after
/// it expires; at every step every served certificate verifies against the bundle published
/// before it was issued (what the clients have).
#[test]
fn the_ca_rotates_with_overlap() {
    let t = Timings::default(); // CA 3 y, rotation at 1 y left, overlap 30 d.
    let year = days(365);
    let ca1 = new_ca(&t, t0());

    // Phase 0: two thirds of the life kept as is (leaves renewed meanwhile: not CA business).
    kept(
        decide_ca(
            Some(Ok(ca1.clone())),
            "outpost-ca",
            t0() + 2 * year - days(1),
            &t,
        )
        .unwrap(),
    );

    // Phase 1: a third left: a new CA is published next to the old one, signing nothing yet.
    let p1 = t0() + 2 * year + days(1);
    // The serving certificate of the day (renewed every 60 days until then).
    let leaf1 = issue(&ca1, &t, p1 - days(1));
    let (ca2, why) = written(decide_ca(Some(Ok(ca1.clone())), "outpost-ca", p1, &t).unwrap());
    assert!(why.contains("trusted before it signs"), "{why}");
    assert_eq!(ca2.signer, ca1.signer, "the old CA still signs");
    let next = ca2.next.clone().expect("a coming CA");
    assert_eq!(
        ca2.bundle,
        vec![next.cert.clone(), ca1.signer.cert.clone()],
        "newest first"
    );
    // Leaves keep their certificate but get the new bundle (the registry's goes to the nodes).
    let (l, why) =
        written(decide_leaf(Some(Ok(leaf1.clone())), &ca2, &registry_sans(), p1, &t).unwrap());
    assert_eq!(why, "trust bundle updated");
    assert_eq!(l.pair, leaf1.pair);
    assert_eq!(l.bundle, ca2.bundle_pem());
    let leaf1 = l;
    // During the overlap nothing moves.
    let during = p1 + t.overlap - Duration::from_secs(120);
    let ca2 = kept(decide_ca(Some(Ok(ca2)), "outpost-ca", during, &t).unwrap());
    kept(decide_leaf(Some(Ok(leaf1.clone())), &ca2, &registry_sans(), during, &t).unwrap());

    // Phase 2: after the overlap the new CA signs; the old one stays trusted.
    let p2 = p1 + t.overlap;
    let (ca3, why) = written(decide_ca(Some(Ok(ca2.clone())), "outpost-ca", p2, &t).unwrap());
    assert!(why.contains("signs from now on"), "{why}");
    assert_eq!(ca3.signer, next);
    assert!(ca3.next.is_none());
    assert_eq!(ca3.bundle, ca2.bundle, "both still trusted");
    let (leaf2, why) =
        written(decide_leaf(Some(Ok(leaf1.clone())), &ca3, &registry_sans(), p2, &t).unwrap());
    assert_eq!(why, "re-issued by the current CA");
    assert!(pki::signed_by(&leaf2.pair.cert, &next.cert));
    // Clients that still hold the phase-1 bundle trust the new leaf; the old leaf is still
    // trusted by the current bundle.
    verify(&leaf2.pair.cert, &leaf1.bundle, "localhost", p2).unwrap();
    verify(&leaf1.pair.cert, &ca3.bundle_pem(), "localhost", p2).unwrap();

    // Phase 3: the old CA expires and leaves the bundle; nothing else changes.
    let p3 = t0() + t.ca_validity + Duration::from_secs(1);
    let (ca4, why) = written(decide_ca(Some(Ok(ca3.clone())), "outpost-ca", p3, &t).unwrap());
    assert_eq!(why, "trust bundle updated");
    assert_eq!(ca4.signer, next);
    assert_eq!(ca4.bundle, vec![next.cert.clone()]);
    // (leaf2 was renewed meanwhile in real life; at p3 it only needs the bundle.)
    let leaf2b = written(
        decide_leaf(
            Some(Ok(leaf2.clone())),
            &ca4,
            &registry_sans(),
            p2 + days(1),
            &t,
        )
        .unwrap(),
    )
    .0;
    assert_eq!(leaf2b.pair, leaf2.pair);
    kept(decide_ca(Some(Ok(ca4)), "outpost-ca", p3 + days(1), &t).unwrap());
}

#[test]
fn an_expired_ca_is_replaced_at_once() {
    let t = Timings::default();
    let ca = new_ca(&t, t0());
    let late = t0() + t.ca_validity + days(10);
    let (s, why) = written(decide_ca(Some(Ok(ca.clone())), "outpost-ca", late, &t).unwrap());
    assert!(why.contains("expired"), "{why}");
    assert_ne!(s.signer, ca.signer);
    assert_eq!(
        s.bundle,
        vec![s.signer.cert.clone()],
        "the expired CA is gone"
    );
    assert!(pki::info(&s.signer.cert).unwrap().not_after > late);
}

/// Timings of seconds (what the hidden flags allow a test to run): the same phases.
#[test]
fn a_rotation_runs_in_seconds_with_short_timings() {
    let t = Timings {
        ca_validity: Duration::from_secs(30),
        cert_validity: Duration::from_secs(4),
        overlap: Duration::from_secs(3),
    };
    t.check().unwrap();
    assert!(
        Timings {
            overlap: Duration::from_secs(7),
            ..t
        }
        .check()
        .is_err()
    );
    let ca = new_ca(&t, t0());
    let at = |s: u64| t0() + Duration::from_secs(s);
    kept(decide_ca(Some(Ok(ca.clone())), "c", at(19), &t).unwrap());
    let (ca, _) = written(decide_ca(Some(Ok(ca)), "c", at(21), &t).unwrap());
    assert!(ca.next.is_some());
    let ca = kept(decide_ca(Some(Ok(ca)), "c", at(23), &t).unwrap());
    let (ca, _) = written(decide_ca(Some(Ok(ca)), "c", at(24), &t).unwrap());
    assert!(ca.next.is_none() && ca.bundle.len() == 2);
    let (ca, _) = written(decide_ca(Some(Ok(ca)), "c", at(31), &t).unwrap());
    assert_eq!(ca.bundle.len(), 1);
}

/// Two replicas read the same Secret and decide the same thing; the first write lands, the
/// second meets a Conflict, reads again, and finds nothing left to do, so it adopts the
/// winner's certificates instead of overwriting them.
#[test]
fn racing_replicas_agree() {
    let t = Timings::default();
    // Both find no CA: both decide to create; one create wins.
    let a = new_ca(&t, t0());
    let b = new_ca(&t, t0());
    assert_ne!(a.signer, b.signer);
    // The loser re-reads the winner's CA: keep it.
    let adopted = kept(decide_ca(Some(Ok(a.clone())), "outpost-ca", t0(), &t).unwrap());
    assert_eq!(adopted, a);
    // Same for a serving certificate, and for a renewal at the same moment.
    let leaf = issue(&a, &t, t0());
    kept(decide_leaf(Some(Ok(leaf.clone())), &a, &registry_sans(), t0(), &t).unwrap());
    let when = t0() + days(61);
    let r1 =
        written(decide_leaf(Some(Ok(leaf.clone())), &a, &registry_sans(), when, &t).unwrap()).0;
    let r2 = written(decide_leaf(Some(Ok(leaf)), &a, &registry_sans(), when, &t).unwrap()).0;
    assert_ne!(r1.pair, r2.pair, "both issued, one lands");
    kept(decide_leaf(Some(Ok(r1)), &a, &registry_sans(), when, &t).unwrap());
    // A rotation start: the loser sees the winner's coming CA and keeps it.
    let start = t0() + days(2 * 365 + 1);
    let w = written(decide_ca(Some(Ok(a.clone())), "outpost-ca", start, &t).unwrap()).0;
    let w2 = kept(decide_ca(Some(Ok(w.clone())), "outpost-ca", start, &t).unwrap());
    assert_eq!(w2, w);
    // Replicas whose clocks differ by seconds still agree on a state written by either.
    kept(
        decide_ca(
            Some(Ok(w)),
            "outpost-ca",
            start + Duration::from_secs(5),
            &t,
        )
        .unwrap(),
    );
}

#[test]
fn a_certificate_for_an_unrelated_ca_is_reissued() {
    let t = Timings::default();
    let a = new_ca(&t, t0());
    let b = new_ca(&t, t0());
    let leaf = issue(&a, &t, t0());
    let (l, why) = written(decide_leaf(Some(Ok(leaf)), &b, &registry_sans(), t0(), &t).unwrap());
    assert_eq!(why, "re-issued by the current CA");
    assert!(pki::signed_by(&l.pair.cert, &b.signer.cert));
    let _: Pair = l.pair;
}
