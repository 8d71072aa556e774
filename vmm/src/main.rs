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
    /// Boot a Linux guest on hugetlb RAM and print the boot timeline.
    Boot(vmm::boot::BootArgs),
    /// Run a built-in guest on userfaultfd-served RAM through the project's MMU.
    Run(vmm::run::RunArgs),
    /// Compare predicted host notifier ranges with the kernel's tracepoint.
    NotifierCheck(vmm::notifier_check::NotifierCheckArgs),
    /// Nested-TDP soft-lockup scenario (model plane): zap an L1 range through the rmaps with a watchdog.
    SoftLockup(vmm::soft_lockup::SoftLockupArgs),
    /// Invalidation latency per layer (host, kernel, guest, MMU) on the built-in probe guest.
    Latency(vmm::latency::LatencyArgs),
    /// Benchmarks measured side by side with their baseline (fault-cost).
    Bench(vmm::bench::BenchArgs),
    /// Nested TDP, real plane: the built-in L1-hypervisor guest's EPT tables shadowed, host invalidations with a watchdog.
    NestedRun(vmm::nested_run::NestedRunArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Boot(args) => vmm::boot::main(args),
        Cmd::Run(args) => vmm::run::main(args),
        Cmd::NotifierCheck(a) => vmm::notifier_check::run(&a),
        Cmd::SoftLockup(a) => vmm::soft_lockup::main(&a),
        Cmd::Latency(a) => vmm::latency::main(a),
        Cmd::Bench(a) => vmm::bench::main(a),
        Cmd::NestedRun(a) => vmm::nested_run::main(a),
    }
}
