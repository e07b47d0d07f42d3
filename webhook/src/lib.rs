//! Outpost admission webhook: rewrites pod image references to the connected registry and
//! injects its pull secret, for namespaces labelled `outpost.io/inject=enabled`. Fails open:
//! it never blocks a pod.

pub mod admission;
pub mod availability;
pub mod certs;
pub mod cli;
pub mod config;
pub mod duration;
pub mod metrics;
pub mod mutate;
pub mod nscred;
pub mod secrets;
pub mod server;
pub mod tls;
pub mod uninstall;

pub use cli::Cli;
