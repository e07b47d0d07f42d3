//! Outpost node agent: configures containerd (certs.d hosts.toml) and k3s (registries.yaml) on each node to trust Outpost's CA and mirror upstream registries through it, and removes what it wrote on cleanup.
//!
//! The command line is in place so the binary, image and chart can be wired up; the
//! subcommands arrive with their own issues.

use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    name = "outpost-node-agent",
    version,
    about = "Outpost node agent: configures containerd (certs.d hosts.toml) and k3s (registries.yaml) on each node to trust Outpost's CA and mirror upstream registries through it, and removes what it wrote on cleanup.",
    arg_required_else_help = true
)]
pub struct Cli {}
