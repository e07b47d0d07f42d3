use std::process::ExitCode;

use clap::Parser;
use outpost_node_agent::cli::{self, Cli};

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run() -> anyhow::Result<ExitCode> {
    // One crypto provider for every TLS use in the process (the Kubernetes client).
    rustls::crypto::aws_lc_rs::default_provider()
        .install_default()
        .map_err(|_| anyhow::anyhow!("a rustls crypto provider was already installed"))?;
    let args = Cli::parse();
    outpost_logging::init(args.log, &["outpost_node_agent"]);
    // Small and mostly idle: two worker threads are plenty.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(cli::run(args))
}
