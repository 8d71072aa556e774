use clap::{Parser, Subcommand};

/// A small KVM VMM on hugetlb guest RAM with its own secondary MMU.
#[derive(Parser)]
#[command(name = "vmm", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {}

fn main() {
    let _ = Cli::parse();
}
