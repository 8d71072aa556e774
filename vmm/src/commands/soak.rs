//! `vmm soak`: the built-in guest on MMU-served RAM for a chosen time, one
//! run after another, with everything that can race it: invalidations of
//! every kind between passes (`mixed`: protect, write-protect, discard,
//! punch-hole), discards racing the running guest (fault retries), a
//! bystander's raw madvise/mprotect, userfaultfd events and the
//! tracepoint. Each run checks the guest's checksum against the model
//! (lost writes) and the MMU against PAGEMAP_SCAN after every invalidation
//! (disagreements). Across runs the process's own resources are counted
//! from /proc/self: open fds, threads, RSS - a leak shows as a count that
//! does not come back.
//!
//! A command, not a timed test: it reports the counts; a short soak is
//! what the test suite runs.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use guests::builtin::Pattern;
use notifier::PageSize;

use crate::cli::{self, parse_ram_size, Report};
use crate::host::invalidator::InvalKind;
use crate::machine::builtin::touch::{self, TouchArgs, TouchReport};
use crate::memory::uffd::UffdMode;

#[derive(clap::Args, Debug, Clone)]
pub struct SoakArgs {
    /// How long to soak, in seconds.
    #[arg(long, default_value_t = 600)]
    pub seconds: u64,
    /// Guest RAM (2 MiB hugetlb pages).
    #[arg(long, default_value = "256M", value_parser = parse_ram_size)]
    pub mem: u64,
    /// Passes over the working set per run (invalidations between each).
    #[arg(long, default_value_t = 40)]
    pub passes: u64,
    /// As root, grow the 2 MiB pool so guest RAM fits (lowered at exit).
    #[arg(long)]
    pub reserve_hugepages: bool,
    /// RSS growth (MiB) from the end of the first run to the end of the
    /// soak that still counts as flat.
    #[arg(long, default_value_t = 16)]
    pub rss_slack_mib: u64,
    /// Print the JSON report as the last stdout line.
    #[arg(long)]
    pub json: bool,
}

/// The process's own resources, from /proc/self.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct ProcCounts {
    pub fds: u64,
    pub threads: u64,
    pub rss_kib: u64,
}

impl ProcCounts {
    pub fn now() -> Self {
        let count = |dir: &str| std::fs::read_dir(dir).map_or(0, |d| d.count() as u64);
        let rss_kib = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("VmRSS:"))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse().ok())
            })
            .unwrap_or(0);
        ProcCounts {
            // (read_dir holds one fd of its own while it counts, every time.)
            fds: count("/proc/self/fd"),
            threads: count("/proc/self/task"),
            rss_kib,
        }
    }
}

/// One run's configuration in the rotation of three: MINOR with discards
/// racing the guest (they keep the data: the page cache is populated; the
/// guest's faults retry), MINOR with the bystander, MISSING with the
/// bystander (its discards zero data, which the model replays). Racing
/// discards and the bystander do not go together: the bystander's
/// boundary checks wait for the fault thread to go idle, which a stream
/// of racing REMOVE events never lets it.
fn round_args(a: &SoakArgs, round: u64) -> TouchArgs {
    let (mode, race, bystander) = match round % 3 {
        0 => (UffdMode::Minor, 500, 0),
        1 => (UffdMode::Minor, 0, 300),
        _ => (UffdMode::Missing, 0, 300),
    };
    let mut t = TouchArgs::new(a.mem, mode);
    t.hugepages = PageSize::Size2M;
    t.reserve_hugepages = a.reserve_hugepages;
    t.passes = a.passes;
    t.invalidate = InvalKind::Mixed;
    t.inval_per_pass = 2;
    t.verify = true;
    t.pattern = if round.is_multiple_of(2) {
        Pattern::Lcg
    } else {
        Pattern::Sequential
    };
    t.seed = round + 1;
    t.stride = 4096 + 8 * (round % 7);
    t.race_discard_us = race;
    t.bystander_us = bystander;
    t.timeout = 300;
    t
}

/// What a soak saw.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SoakReport {
    pub seconds: f64,
    pub runs: u64,
    /// Runs whose guest checksum did not match the model.
    pub lost_write_runs: u64,
    pub verify_checks: u64,
    /// MMU-vs-PAGEMAP_SCAN disagreements.
    pub disagreements: u64,
    pub invalidations: u64,
    pub race_invalidations: u64,
    pub bystander_ops: u64,
    pub fault_retries: u64,
    pub faults: u64,
    /// Before the first run, after it (warm), at the end.
    pub start: ProcCounts,
    pub warm: ProcCounts,
    pub end: ProcCounts,
    pub rss_slack_mib: u64,
    /// The error a run ended with (the soak stops there).
    pub error: Option<String>,
}

impl SoakReport {
    fn add(&mut self, r: &TouchReport) {
        self.runs += 1;
        self.lost_write_runs += u64::from(!r.checksum_ok);
        self.verify_checks += r.verify_checks;
        self.disagreements += r.verify_failures;
        self.invalidations += r.invalidations;
        self.race_invalidations += r.race_invalidations;
        self.fault_retries += r.fault_retries;
        self.faults += r.faults;
        if let Some(b) = &r.events.bystander {
            self.bystander_ops += b.concurrent_discards
                + b.concurrent_protects
                + b.boundary_removes
                + b.boundary_protects;
        }
    }

    fn rss_growth_kib(&self) -> i64 {
        i64::try_from(self.end.rss_kib).unwrap_or(i64::MAX)
            - i64::try_from(self.warm.rss_kib).unwrap_or(i64::MAX)
    }
}

pub fn run(a: &SoakArgs) -> SoakReport {
    let t0 = Instant::now();
    let until = Duration::from_secs(a.seconds);
    let mut rep = SoakReport {
        start: ProcCounts::now(),
        rss_slack_mib: a.rss_slack_mib,
        ..SoakReport::default()
    };
    let progress = crate::report::progress_bar(a.seconds);
    let mut round = 0u64;
    while rep.runs == 0 || t0.elapsed() < until {
        progress.set_message(format!("run {round}"));
        match touch::run(&round_args(a, round)) {
            Ok(r) => rep.add(&r),
            Err(e) => {
                rep.error = Some(format!("run {round}: {e}"));
                break;
            }
        }
        if round == 0 {
            rep.warm = ProcCounts::now();
        }
        round += 1;
        progress.set_position(t0.elapsed().as_secs().min(a.seconds));
    }
    progress.finish_and_clear();
    rep.end = ProcCounts::now();
    rep.seconds = t0.elapsed().as_secs_f64();
    rep
}

impl Report for SoakReport {
    fn text(&self) -> String {
        let r = self;
        format!(
            "soak: {} runs in {:.0} s (built-in guest on MMU-served 2M hugetlb RAM, MINOR and MISSING in turn)\n\
             lost guest writes: {} runs of {} failed their checksum\n\
             MMU vs PAGEMAP_SCAN: {} disagreements in {} checks\n\
             raced: {} invalidations between passes (protect, write-protect, discard, punch-hole), \
             {} discards racing the guest, {} bystander syscalls; {} faults, {} fault retries\n\
             process: fds {} -> {} (after the first run {}), threads {} -> {} ({}), \
             RSS {} MiB after the first run -> {} MiB ({:+} KiB; flat within {} MiB)\n",
            r.runs,
            r.seconds,
            r.lost_write_runs,
            r.runs,
            r.disagreements,
            r.verify_checks,
            r.invalidations,
            r.race_invalidations,
            r.bystander_ops,
            r.faults,
            r.fault_retries,
            r.start.fds,
            r.end.fds,
            r.warm.fds,
            r.start.threads,
            r.end.threads,
            r.warm.threads,
            r.warm.rss_kib >> 10,
            r.end.rss_kib >> 10,
            r.rss_growth_kib(),
            r.rss_slack_mib,
        )
    }
    fn json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }
    fn ok(&self) -> bool {
        self.error.is_none()
            && self.lost_write_runs == 0
            && self.disagreements == 0
            && self.end.fds == self.start.fds
            && self.end.threads == self.start.threads
            && self.rss_growth_kib() <= i64::try_from(self.rss_slack_mib << 10).unwrap_or(0)
    }
    fn error(&self) -> Option<String> {
        self.error.clone()
    }
}

pub fn main(a: &SoakArgs) -> ExitCode {
    let r: Result<SoakReport, String> = Ok(run(a));
    cli::conclude("vmm soak", a.json, r, None)
}
