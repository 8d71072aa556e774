//! `vmm notifier-check`: the differential check of predicted notifier ranges
//! against the kernel's `kvm:kvm_unmap_hva_range` tracepoint
//! (`notifier::check`). Prints a markdown table; with `--json` the last
//! stdout line is `{"cases":[{name,predicted,observed,match},...],...}`.

use std::process::ExitCode;

/// Arguments of `vmm notifier-check`.
#[derive(Debug, clap::Args)]
pub struct NotifierCheckArgs {
    /// Print the report as one JSON object on the last stdout line.
    #[arg(long)]
    pub json: bool,
    /// Leave out the NUMA-hinting cases (they turn kernel.numa_balancing on
    /// for a few seconds).
    #[arg(long)]
    pub no_numa: bool,
}

/// Run the check; exit 0 when every case matches, 1 on a mismatch, 2 when
/// the check could not run.
pub fn run(args: &NotifierCheckArgs) -> ExitCode {
    let opts = notifier::check::CheckOptions {
        numa: !args.no_numa,
        ..Default::default()
    };
    let report = match notifier::check::run(opts) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("notifier-check: {e}");
            return ExitCode::from(2);
        }
    };
    print!("{}", report.table());
    println!(
        "{} cases, {} match, {} skipped, {:.1} s",
        report.cases.len(),
        report.cases.iter().filter(|c| c.matched).count(),
        report.skipped.len(),
        report.elapsed_ms as f64 / 1000.0
    );
    if args.json {
        match serde_json::to_string(&report) {
            Ok(j) => println!("{j}"),
            Err(e) => {
                eprintln!("notifier-check: JSON: {e}");
                return ExitCode::from(2);
            }
        }
    }
    if report.all_match() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}
