//! `vmm`: one subcommand per job. Each subcommand's logic lives in its own
//! module of the `vmm` library; this file only parses and dispatches.

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// A small KVM VMM on hugetlb guest RAM with its own secondary MMU.
#[derive(Parser)]
#[command(name = "vmm", version)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    // One variant per subcommand, e.g.
    // /// Boot a Linux guest.
    // Boot(vmm::boot::BootArgs),
    /// Compare predicted host notifier ranges with the kernel's tracepoint.
    NotifierCheck(vmm::notifier_check::NotifierCheckArgs),
    /// Boot a Linux guest on hugetlb RAM and print the boot timeline.
    Boot(vmm::boot::BootArgs),
    /// Run a built-in guest on userfaultfd-served RAM through the project's MMU.
    Run(vmm::run::RunArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::NotifierCheck(a) => vmm::notifier_check::run(&a),
        Cmd::Boot(args) => vmm::boot::main(args),
        Cmd::Run(args) => vmm::run::main(args),
    }
}
