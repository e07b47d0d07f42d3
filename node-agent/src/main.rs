use clap::Parser;

fn main() {
    let _ = outpost_node_agent::Cli::parse();
}
