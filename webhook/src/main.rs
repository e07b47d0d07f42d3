use clap::Parser;

fn main() {
    let _ = outpost_webhook::Cli::parse();
}
