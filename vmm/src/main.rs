//! `vmm`: one subcommand per job; each lives in `vmm::commands`. This file
//! only parses and dispatches.

use clap::{Parser, Subcommand};
use std::process::ExitCode;
use vmm::commands;

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
    Boot(commands::boot::BootArgs),
    /// Run a guest on userfaultfd-served RAM through the project's MMU.
    Run(commands::run::RunArgs),
    /// Compare predicted host notifier ranges with the kernel's tracepoint.
    NotifierCheck(commands::notifier_check::NotifierCheckArgs),
    /// Nested-TDP soft lockups: zap an L1 range through the model MMU's rmaps with a watchdog, or (--plane kernel) measure this host kernel's own walk under host invalidations.
    SoftLockup(commands::soft_lockup::SoftLockupArgs),
    /// Invalidation latency per layer (host, kernel, guest, MMU) on the built-in probe guest.
    Latency(commands::latency::LatencyArgs),
    /// Benchmarks measured side by side with their baseline (fault-cost).
    Bench(commands::bench::BenchArgs),
    /// Nested TDP, real plane: the built-in L1-hypervisor guest's EPT tables shadowed, host invalidations with a watchdog.
    NestedRun(commands::nested_run::NestedRunArgs),
    /// Soak: the built-in guest on MMU-served RAM for a chosen time under every racing invalidation; lost writes, MMU disagreements, leaked fds/threads/RSS.
    Soak(commands::soak::SoakArgs),
    /// Run a vmm subcommand inside an emulated AMD SVM host (QEMU TCG, the real kvm_amd, TDP MMU, nested SVM).
    Host(commands::host::HostArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A test's failure injection (vmm::failpoint): a spec that does not
    // parse is an error, never silently ignored.
    if let Err(e) = vmm::failpoint::check_env() {
        eprintln!("vmm: {e}");
        return ExitCode::from(2);
    }
    // Ctrl-C / SIGTERM / SIGHUP write back the host settings a command
    // changed (sysctls, hugetlb pools) before the process ends.
    if let Err(e) = notifier::restore::install() {
        eprintln!("vmm: host settings will not be restored on a signal: {e}");
    }
    // What a vmm killed by SIGKILL left changed (its /run/hvmm record):
    // put back before anything else touches the host.
    for line in notifier::hoststate::recover_dead() {
        eprintln!("vmm: {line}");
    }
    match cli.cmd {
        Cmd::Boot(a) => commands::boot::main(a),
        Cmd::Run(a) => commands::run::main(a),
        Cmd::NotifierCheck(a) => commands::notifier_check::main(&a),
        Cmd::SoftLockup(a) => commands::soft_lockup::main(&a),
        Cmd::Latency(a) => commands::latency::main(a),
        Cmd::Bench(a) => commands::bench::main(a),
        Cmd::NestedRun(a) => commands::nested_run::main(a),
        Cmd::Host(a) => commands::host::main(a),
        Cmd::Soak(a) => commands::soak::main(&a),
    }
}
