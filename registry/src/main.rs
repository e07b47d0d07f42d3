use std::process::ExitCode;

use clap::Parser;
use outpost_registry::cli::{self, Cli};

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(e) => {
            // The error chain, without a backtrace: these are messages for operators.
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run() -> anyhow::Result<ExitCode> {
    // One crypto provider for every TLS use in the process.
    rustls::crypto::aws_lc_rs::default_provider()
        .install_default()
        .map_err(|_| anyhow::anyhow!("a rustls crypto provider was already installed"))?;
    let args = Cli::parse();
    outpost_logging::init(args.log, &["outpost_registry"]);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    Ok(rt.block_on(cli::run(args))?)
}
