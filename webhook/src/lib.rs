//! Outpost admission webhook: rewrites pod image references to the connected registry and injects its pull secret, for namespaces labelled outpost.io/inject=enabled. Fails open: it never blocks a pod.
//!
//! The command line is in place so the binary, image and chart can be wired up; the
//! subcommands arrive with their own issues.

use clap::Parser;

#[derive(Parser, Debug)]
#[command(
    name = "outpost-webhook",
    version,
    about = "Outpost admission webhook: rewrites pod image references to the connected registry and injects its pull secret, for namespaces labelled outpost.io/inject=enabled. Fails open: it never blocks a pod.",
    arg_required_else_help = true
)]
pub struct Cli {}
