//! Self-managed certificates (when neither cert-manager nor given Secrets provide them): a CA
//! and the registry's and the webhook's serving certificates, kept in Secrets shared by every
//! replica, renewed before they expire, the CA rotated with overlap, and the webhook
//! configuration's `caBundle` kept equal to the trust bundle.

pub mod manager;
pub mod pki;
pub mod plan;

pub use manager::{CertError, Leaf, Role, Snapshot, Spec};
pub use plan::Timings;

/// Labels on every Secret the manager writes, so an uninstall finds them.
pub const MANAGED_BY_LABEL: &str = crate::secrets::MANAGED_BY_LABEL;
pub const MANAGED_BY: &str = crate::secrets::MANAGED_BY;
/// `ca`, `registry` or `webhook`.
pub const CERTIFICATE_LABEL: &str = "outpost.io/certificate";
