//! Outpost node agent: configures containerd (certs.d hosts.toml) and k3s (registries.yaml) on
//! each node to trust Outpost's CA and mirror upstream registries through it, and removes what
//! it wrote on cleanup.

pub mod agent;
pub mod cli;
pub mod metrics;
pub mod node;
pub mod preflight;
pub mod reconcile;
pub mod render;
pub mod server;

pub use cli::Cli;
