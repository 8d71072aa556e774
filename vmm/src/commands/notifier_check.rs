//! `vmm notifier-check`: the differential check of predicted notifier ranges
//! against the kernel's `kvm:kvm_unmap_hva_range` tracepoint
//! (`notifier::check`). Prints a markdown table; with `--json` the last
//! stdout line is `{"cases":[{name,predicted,observed,match},...],...}`.

use std::process::ExitCode;

use notifier::check::{self, CheckOptions, Report as CheckReport};

use crate::cli::{self, Report};

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

impl Report for CheckReport {
    fn text(&self) -> String {
        format!(
            "{}{} cases, {} match, {} skipped, {:.1} s",
            self.table(),
            self.cases.len(),
            self.cases.iter().filter(|c| c.matched).count(),
            self.skipped.len(),
            self.elapsed_ms as f64 / 1000.0
        )
    }
    fn json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }
    fn ok(&self) -> bool {
        self.all_match()
    }
}

/// Run the check; exit 0 when every case matches, 1 on a mismatch, 2 when
/// the check could not run.
pub fn main(args: &NotifierCheckArgs) -> ExitCode {
    let opts = CheckOptions {
        numa: !args.no_numa,
        ..Default::default()
    };
    cli::conclude("vmm notifier-check", args.json, check::run(opts), None)
}
