//! `vmm latency`: how long host invalidations of guest RAM take, seen from
//! four layers at once, on the built-in probe guest ([`guests::probe`]).
//!
//! For every RAM configuration (shared/private hugetlb x 2M/1G pages,
//! anonymous 4 KiB or THP, shmem; what cannot run here is skipped with the
//! reason) the probe boots, populates
//! its working set, and each scenario ([`measure::scenarios`]: protect over
//! 2M/1G/whole RAM x populated/sparse/empty, discard, punch hole,
//! write-protect, NUMA hinting - a measured no-op on hugetlb, real
//! `task_numa_work` ranges on anonymous RAM, and beside it the same window
//! with guest RAM opted out by `mbind(MPOL_LOCAL)`) runs many times. Per
//! iteration:
//!
//! * **host**: the syscall's CLOCK_MONOTONIC duration (it includes real
//!   KVM's zap and, unless plain KVM, the project's MMU zap: `notifier::ops`
//!   announces before the syscall);
//! * **kernel**: the `kvm:kvm_unmap_hva_range` ranges this thread caused
//!   over guest RAM during that syscall (sentinels around it), and, with the
//!   instance's `trace_clock` set to `mono`, the time from the first notifier
//!   to the syscall's return (trace_pipe prints microseconds: 1 us
//!   resolution); `samples.json` keeps each record's range and offset;
//! * **guest**: the probe's longest TSC gap in a window that opens before
//!   the syscall and closes after the probe re-touched its working set
//!   twice, and its stalls (gaps above 2 us: refaults);
//! * **mmu**: the project's TDP zaps the syscall caused (total time,
//!   longest non-yield stretch, leaves visited, yields);
//! * **mmu_shadow**: the project's shadow MMU (the probe's identity page
//!   tables shadowed) for the same syscall: rmap heads walked, shadow pages
//!   zapped (a range over the system page drops the shadowed page tables).
//!
//! Before each iteration the VMM maps what the probe touches in both
//! project MMUs (a protection change leaves the host pages present, so
//! only KVM refaults, not userfaultfd). A guest store while the host has
//! the RAM read-only makes `KVM_RUN` answer EFAULT; the vCPU thread
//! re-enters (counted in `efault_retries`). Punch-hole and MADV_REMOVE
//! are followed, untimed, by re-filling the page cache (the probe's next
//! touch must be a MINOR fault); the probe's window includes that.
//!
//! `--compare` repeats each configuration on plain KVM (no userfaultfd, no
//! project MMU) and reports project/plain ratios.
//!
//! `--guest linux` runs the populated-state scenarios on the Linux guest's
//! RAM while its kernel boots (host, kernel and MMU layers; no guest layer
//! on this host): see [`linux`].

pub mod linux;
pub mod measure;
mod plots;
pub mod report;
pub mod session;

use crate::cli::{self, parse_ram_size, Guest, Report};
use crate::memory::uffd::UffdRamError;
use crate::report::progress_bar;
use measure::{Op, Sample, Scenario, Target, Tracer};
use notifier::hostconf::{HugepageReservation, SysctlGuard};
use notifier::hostmm::Backing;
use notifier::workload::NumaToucher;
use notifier::PageSize;
use report::{summarize, Failed, LatencyReport, Skipped};
use session::Session;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// Arguments of `vmm latency`.
#[derive(clap::Args, Debug, Clone)]
pub struct LatencyArgs {
    /// The guest: `builtin` (the CPL3 probe) or `linux` (the Debian guest
    /// while its kernel boots: host, kernel and MMU layers; no guest layer
    /// on this host).
    #[arg(long, value_enum, default_value = "builtin")]
    pub guest: Guest,
    /// Guest RAM on 2 MiB pages (1 GiB-page configurations use 2 GiB).
    #[arg(long, default_value = "2G", value_parser = parse_ram_size)]
    pub mem: u64,
    /// Iterations per scenario.
    #[arg(long, default_value_t = 20)]
    pub iterations: u32,
    /// A few iterations of every scenario (for tests).
    #[arg(long)]
    pub quick: bool,
    /// Also run every configuration on plain KVM (no userfaultfd, no
    /// project MMU) and report the project's overhead as a ratio.
    #[arg(long)]
    pub compare: bool,
    /// Configurations to run (comma-separated): shared-2M, private-2M,
    /// shared-1G, private-1G (hugetlb: NUMA hinting skips it), anon
    /// (private anonymous, 4 KiB pages), thp (the same with MADV_HUGEPAGE,
    /// huge PMDs), shmem (a plain memfd, 4 KiB pages).
    #[arg(long, default_value = "shared-2M,private-2M,shared-1G,private-1G")]
    pub configs: String,
    /// Length of one NUMA-hinting window, ms.
    #[arg(long, default_value_t = 3000)]
    pub numa_window_ms: u64,
    /// Print the JSON report as the last stdout line.
    #[arg(long)]
    pub json: bool,
    /// Write report.json, samples.json, table.txt and the plots here.
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// --guest linux: let the guest kernel fault its RAM in for this many
    /// seconds before the scenarios start (default 90, --quick 30; sooner
    /// once a quarter of RAM - an eighth with --quick - is mapped).
    #[arg(long)]
    pub warmup: Option<u64>,
    /// Give up on a configuration after this many seconds.
    #[arg(long, default_value_t = 1800)]
    pub timeout: u64,
    /// The KVM device.
    #[arg(long, default_value = "/dev/kvm", hide = true)]
    pub kvm_dev: PathBuf,
}

impl LatencyArgs {
    /// Defaults, for library callers.
    pub fn new() -> Self {
        LatencyArgs {
            guest: Guest::Builtin,
            mem: 2 << 30,
            iterations: 20,
            quick: false,
            compare: false,
            configs: "shared-2M,private-2M,shared-1G,private-1G".into(),
            numa_window_ms: 3000,
            json: false,
            out: None,
            warmup: None,
            timeout: 1800,
            kvm_dev: "/dev/kvm".into(),
        }
    }

    fn iterations(&self) -> u32 {
        if self.quick {
            3
        } else {
            self.iterations.max(1)
        }
    }

    /// Progress steps of one scenario.
    fn steps(&self, sc: &Scenario) -> u64 {
        if sc.op.is_numa() {
            self.numa_windows() as u64
        } else {
            self.iterations() as u64
        }
    }

    fn numa_windows(&self) -> u32 {
        if self.quick {
            1
        } else {
            2
        }
    }
}

impl Default for LatencyArgs {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LatencyError {
    #[error(transparent)]
    Probe(#[from] guests::builtin::BuiltinError),
    #[error(transparent)]
    Ram(#[from] UffdRamError),
    #[error("fault thread: {0}")]
    Fault(#[from] crate::memory::fault::FaultThreadError),
    #[error(transparent)]
    Memslot(#[from] mmu::memslot::MemslotError),
    #[error(transparent)]
    Vm(#[from] crate::machine::builtin::BuiltinVmError),
    #[error(transparent)]
    Kvm(#[from] crate::vstate::KvmError),
    #[error("probe guest: {0}")]
    Guest(String),
    #[error("{op}: {source}")]
    Op {
        op: &'static str,
        #[source]
        source: notifier::Error,
    },
    #[error("tracepoint: {0}")]
    Trace(#[from] notifier::Error),
    #[error(transparent)]
    Inval(#[from] crate::host::invalidator::InvalError),
    #[error("unknown configuration {0:?}: shared-2M, private-2M, shared-1G, private-1G, anon, thp, shmem")]
    Config(String),
}

/// One RAM configuration: hugetlb (shared memfd or private), shmem
/// (`shared-4K`, also `shmem`), anonymous 4 KiB (`anon`) or THP (`thp`).
fn parse_config(s: &str) -> Result<Backing, LatencyError> {
    cli::parse_backing(s).map_err(|_| LatencyError::Config(s.trim().into()))
}

/// A configuration that started and failed: the run fails too.
fn fail(rep: &mut LatencyReport, what: impl Into<String>, e: &LatencyError) {
    rep.failed.push(Failed {
        what: what.into(),
        error: e.to_string(),
    });
}

pub(super) fn skip(rep: &mut LatencyReport, what: impl Into<String>, why: impl Into<String>) {
    rep.skipped.push(Skipped {
        what: what.into(),
        why: why.into(),
    });
}

/// The samples of one scenario on one RAM mode.
pub(super) struct Measured {
    sc: Scenario,
    samples: Vec<Sample>,
    note: Option<String>,
}

/// Run every scenario on one session.
pub(super) fn run_session(
    s: &mut dyn Target,
    tr: &mut Option<Tracer>,
    scs: &[Scenario],
    args: &LatencyArgs,
    rep: &mut LatencyReport,
    progress: &indicatif::ProgressBar,
    label: &str,
) -> Result<Vec<Measured>, LatencyError> {
    run_scenarios(s, tr, scs, args, rep, progress, label).map_err(|e| s.root_cause(e))
}

fn run_scenarios(
    s: &mut dyn Target,
    tr: &mut Option<Tracer>,
    scs: &[Scenario],
    args: &LatencyArgs,
    rep: &mut LatencyReport,
    progress: &indicatif::ProgressBar,
    label: &str,
) -> Result<Vec<Measured>, LatencyError> {
    let mut out = Vec::new();
    let mut state = None;
    for sc in scs {
        progress.set_message(format!("{label} {}", sc.name()));
        if state != Some(sc.state) {
            s.prepare(sc.state)?;
            state = Some(sc.state);
        }
        if sc.op.is_numa() {
            if let Some(m) = numa_scenario(s, tr, sc, args, rep, progress, label)? {
                out.push(m);
            }
            continue;
        }
        let mut samples = Vec::new();
        for _ in 0..args.iterations() {
            samples.push(measure::iteration(s, tr.as_mut(), sc)?);
            progress.inc(1);
        }
        out.push(Measured {
            sc: sc.clone(),
            samples,
            note: None,
        });
    }
    Ok(out)
}

/// One NUMA-hinting scenario: `kernel.numa_balancing=1` for its windows
/// (restored after, also on errors: [`SysctlGuard`]), a 32 MiB anonymous
/// control region touched meanwhile (so "no range" on guest RAM means
/// the scanner skipped it, not that it did not run), and for
/// [`Op::NumaHintOptOut`] guest RAM opted out by its memory policy
/// ([`notifier::mempolicy`]; the default policy is given back after).
/// `None`: skipped, with the reason in `rep`.
fn numa_scenario(
    s: &mut dyn Target,
    tr: &mut Option<Tracer>,
    sc: &Scenario,
    args: &LatencyArgs,
    rep: &mut LatencyReport,
    progress: &indicatif::ProgressBar,
    label: &str,
) -> Result<Option<Measured>, LatencyError> {
    let what = format!("{label} {}", sc.op.name());
    if !notifier::error::is_root() {
        skip(rep, what, "needs root to set kernel.numa_balancing");
        progress.inc(args.numa_windows() as u64);
        return Ok(None);
    }
    let guard = match SysctlGuard::set("kernel.numa_balancing", "1") {
        Ok(g) => g,
        Err(e) => {
            skip(rep, what, e.to_string());
            progress.inc(args.numa_windows() as u64);
            return Ok(None);
        }
    };
    let ram = s.ram().clone();
    let opt_out = sc.op == Op::NumaHintOptOut;
    if opt_out {
        notifier::mempolicy::opt_out_of_numa_balancing(ram.guest_range()).map_err(|e| {
            LatencyError::Op {
                op: "opting guest RAM out of NUMA balancing",
                source: e,
            }
        })?;
    }
    let toucher = NumaToucher::start(32 << 20, 1).map_err(|e| LatencyError::Op {
        op: "the NUMA-touching control workload",
        source: e,
    })?;
    let control = toucher
        .region()
        .ok_or_else(|| LatencyError::Guest("the NUMA toucher has no region".into()))?;
    let mut samples = Vec::new();
    let mut on_control = 0;
    let windows = (|| {
        for _ in 0..args.numa_windows() {
            s.remap_mmu(0, s.mem())?;
            let (smp, c) = measure::numa_window(
                s,
                tr.as_mut(),
                control,
                Duration::from_millis(args.numa_window_ms),
            )?;
            samples.push(smp);
            on_control += c;
            progress.inc(1);
        }
        Ok::<(), LatencyError>(())
    })();
    drop(toucher);
    drop(guard);
    if opt_out {
        notifier::mempolicy::default_policy(ram.guest_range()).map_err(|e| LatencyError::Op {
            op: "giving guest RAM its default memory policy back",
            source: e,
        })?;
    }
    windows?;
    let on_guest: u64 = samples.iter().map(|x| x.ranges).sum();
    let zaps: u64 = samples.iter().filter_map(|x| x.mmu).map(|m| m.zaps).sum();
    let stalls: u64 = samples.iter().map(|x| x.guest_stalls).sum();
    let scanner = if on_control == 0 {
        " - or not yet: none seen"
    } else {
        ""
    };
    let head = format!(
        "{} window(s) of {} ms with kernel.numa_balancing=1: {on_guest} tracepoint range(s) \
         on guest RAM, {zaps} MMU zap(s), {stalls} guest stall(s); {on_control} range(s) on a \
         32 MiB anonymous control region (the scanner ran{scanner})",
        samples.len(),
        args.numa_window_ms,
    );
    let note = if ram.backing().is_hugetlb() {
        format!(
            "measured no-op: {head}; task_numa_work skips hugetlb VMAs; no syscall: user \
             space cannot call change_prot_numa"
        )
    } else if opt_out {
        format!(
            "guest RAM under mbind(MPOL_LOCAL): {head}; vma_policy_mof() is false, so \
             task_numa_work skips it (the per-process prctl PR_SET_NUMA_BALANCING was never \
             merged: no kernel has it)"
        )
    } else {
        format!(
            "{head}; the ranges reach the project's MMUs from the tracepoint, after the \
             fact: change_prot_numa makes the PTEs PROT_NONE, KVM zaps, the guest's next \
             touch is a NUMA-hinting fault"
        )
    };
    Ok(Some(Measured {
        sc: sc.clone(),
        samples,
        note: Some(note),
    }))
}

/// Start a session once `pages` huge pages are free: the pool is shared
/// with other users of the machine, so a shortfall (or ENOSPC while
/// populating) is waited out a few times before giving up.
pub(super) fn start_retrying<S>(
    ps: PageSize,
    pages: u64,
    start: impl Fn() -> Result<S, LatencyError>,
) -> Result<(S, Option<HugepageReservation>), LatencyError> {
    if !ps.is_huge() {
        // Not hugetlb: no pool to wait for.
        return Ok((start()?, None));
    }
    let mut attempt = 0;
    loop {
        let pool = HugepageReservation::reserve(ps, pages).ok();
        let t0 = Instant::now();
        while notifier::hostconf::free_hugepages(ps) < pages
            && t0.elapsed() < Duration::from_secs(20)
        {
            std::thread::sleep(Duration::from_millis(500));
        }
        match start() {
            Ok(s) => return Ok((s, pool)),
            Err(LatencyError::Ram(_)) if attempt < 3 => {
                attempt += 1;
                drop(pool);
                std::thread::sleep(Duration::from_secs(5));
            }
            Err(e) => return Err(e),
        }
    }
}

/// Run `vmm latency`. Errors only for what makes the whole run
/// impossible; what cannot run is listed in `skipped`.
pub fn run(args: &LatencyArgs) -> Result<LatencyReport, LatencyError> {
    let t_start = Instant::now();
    if args.guest == Guest::Linux {
        return linux::run(args);
    }
    let configs: Vec<Backing> = args
        .configs
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(parse_config)
        .collect::<Result<_, _>>()?;
    let mut rep = new_report(
        args,
        "this run's guest is the built-in CPL3 probe, which is its guest layer; `--guest linux` measures a \
         booting Linux guest, with its own view from the initramfs probe where guest user space runs (the \
         emulated SVM host; not under this machine's PVM KVM)",
    );
    let kvm = crate::vstate::kvm::open(&args.kvm_dev)?;
    let mut tracer = open_tracer(&mut rep);
    let stall_tsc = mmu::clock::ticks(Duration::from_micros(2));
    // Plan: the scenarios of each configuration that can run.
    let mut plan = Vec::new();
    for c in configs {
        let name = c.to_string();
        let ps = c.page_size();
        let mem = if ps == PageSize::Size1G {
            2 << 30
        } else {
            args.mem
        };
        if !c.is_hugetlb() {
            plan.push((c, mem, ps));
            continue;
        }
        let pages = mem.div_ceil(ps.bytes());
        let pool = match HugepageReservation::reserve(ps, pages) {
            Ok(p) if p.available >= pages => p,
            Ok(p) => {
                skip(
                    &mut rep,
                    name,
                    format!(
                        "needs {pages} free {} hugepages, {} could be reserved",
                        if ps == PageSize::Size1G {
                            "1 GiB"
                        } else {
                            "2 MiB"
                        },
                        p.available
                    ),
                );
                continue;
            }
            Err(e) => {
                skip(&mut rep, name, format!("no hugepages: {e}"));
                continue;
            }
        };
        drop(pool);
        plan.push((c, mem, ps));
    }
    let mut per_config = Vec::new();
    let mut total = 0u64;
    for (c, mem, ps) in &plan {
        let (scs, skipped) =
            measure::scenarios(*mem, ps.bytes(), c.is_shared(), true, !c.is_hugetlb());
        for (what, why) in skipped {
            skip(&mut rep, format!("{c} {what}"), why);
        }
        let n: u64 = scs.iter().map(|s| args.steps(s)).sum();
        total += n * if args.compare { 2 } else { 1 };
        per_config.push(scs);
    }
    let progress = progress_bar(total);
    let timeout = Duration::from_secs(args.timeout);
    for ((c, mem, ps), scs) in plan.iter().zip(per_config) {
        let name = c.to_string();
        let pages = mem.div_ceil(ps.bytes());
        let project = (|| -> Result<Vec<Measured>, LatencyError> {
            let (mut s, _pool) = start_retrying(*ps, pages, || {
                Session::start(&kvm, *mem, *c, true, stall_tsc, timeout)
            })?;
            rep.tsc.push((name.clone(), s.tsc_check));
            let m = run_session(&mut s, &mut tracer, &scs, args, &mut rep, &progress, &name)?;
            rep.efault_retries += s.efaults();
            s.stop()?;
            Ok(m)
        })();
        let project = match project {
            Ok(m) => m,
            Err(e) => {
                fail(&mut rep, name, &e);
                continue;
            }
        };
        let plain = if args.compare {
            let scs_plain: Vec<Scenario> = scs
                .iter()
                .filter(|s| s.op != Op::WriteProtect)
                .cloned()
                .collect();
            let r = (|| -> Result<Vec<Measured>, LatencyError> {
                let (mut s, _pool) = start_retrying(*ps, pages, || {
                    Session::start(&kvm, *mem, *c, false, stall_tsc, timeout)
                })?;
                let label = format!("{name} plain");
                let m = run_session(
                    &mut s,
                    &mut tracer,
                    &scs_plain,
                    args,
                    &mut rep,
                    &progress,
                    &label,
                )?;
                rep.efault_retries += s.efaults();
                s.stop()?;
                Ok(m)
            })();
            match r {
                Ok(m) => {
                    skip(
                        &mut rep,
                        format!("{name} plain KVM write_protect"),
                        "plain KVM RAM is not registered with userfaultfd (UFFDIO_WRITEPROTECT needs it)",
                    );
                    m
                }
                Err(e) => {
                    fail(&mut rep, format!("{name} plain KVM (--compare)"), &e);
                    Vec::new()
                }
            }
        } else {
            Vec::new()
        };
        let mono = rep.trace_clock_mono;
        for m in project {
            let p = plain.iter().find(|p| p.sc == m.sc);
            rep.scenarios
                .push(summarize(&name, m, tracer.is_some(), mono, p));
        }
    }
    progress.finish_and_clear();
    drop(tracer);
    rep.elapsed_s = t_start.elapsed().as_secs_f64();
    Ok(rep)
}

/// An empty report for `args.guest`, the Linux guest's layer skipped with
/// `why`.
pub(super) fn new_report(args: &LatencyArgs, why: &str) -> LatencyReport {
    let mut rep = LatencyReport {
        guest: args.guest,
        ..Default::default()
    };
    skip(&mut rep, "guest layer of a Linux guest", why);
    rep
}

/// The kernel layer's tracepoint source, or why there is none (skipped).
pub(super) fn open_tracer(rep: &mut LatencyReport) -> Option<Tracer> {
    match Tracer::open() {
        Ok(t) => {
            rep.trace_clock_mono = t.mono;
            Some(t)
        }
        Err(e) => {
            skip(
                rep,
                "kernel layer (kvm_unmap_hva_range tracepoint)",
                e.to_string(),
            );
            None
        }
    }
}

/// A `vmm latency` run and where its files went.
pub struct LatencyOutcome {
    pub report: LatencyReport,
    pub out: Option<PathBuf>,
}

impl Report for LatencyOutcome {
    fn text(&self) -> String {
        let rep = &self.report;
        format!(
            "{}{} scenario(s) in {:.1} s{}",
            report::table(rep),
            rep.scenarios.len(),
            rep.elapsed_s,
            self.out
                .as_ref()
                .map(|d| format!("; results in {}", d.display()))
                .unwrap_or_default()
        )
    }
    fn json(&self) -> serde_json::Value {
        serde_json::to_value(&self.report).unwrap_or_default()
    }
    /// Success unless a configuration failed or nothing could be
    /// measured (skips alone are not failures).
    fn ok(&self) -> bool {
        !self.report.scenarios.is_empty() && self.report.failed.is_empty()
    }
    fn error(&self) -> Option<String> {
        let rep = &self.report;
        if let Some(f) = rep.failed.first() {
            return Some(format!(
                "{} configuration(s) failed; first {}: {}",
                rep.failed.len(),
                f.what,
                f.error
            ));
        }
        rep.scenarios
            .is_empty()
            .then(|| "nothing could be measured".into())
    }
}

/// `vmm latency`: table on stdout (JSON as the last line with `--json`),
/// files under `--out`; a failure if a configuration failed or nothing
/// could be measured.
pub fn main(args: LatencyArgs) -> ExitCode {
    let outcome = run(&args).map(|mut report| {
        if let Some(dir) = &args.out {
            if let Err(e) = plots::write_out(dir, &mut report) {
                skip(&mut report, "--out", e);
            }
        }
        LatencyOutcome {
            report,
            out: args.out.clone(),
        }
    });
    cli::conclude("vmm latency", args.json, outcome, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_parse() {
        let c = parse_config("private-1G").unwrap();
        assert_eq!(c, Backing::PrivateHugetlb(PageSize::Size1G));
        assert_eq!(c.to_string(), "private-1G");
        assert_eq!(parse_config(" shared-2m").unwrap().to_string(), "shared-2M");
        // Beside hugetlb: private anonymous, THP and shmem (a 4 KiB memfd).
        assert_eq!(parse_config("thp").unwrap(), Backing::Anon { thp: true });
        assert_eq!(parse_config("anon").unwrap(), Backing::Anon { thp: false });
        assert_eq!(
            parse_config("shmem").unwrap(),
            Backing::SharedMemfd(PageSize::Size4K)
        );
        for bad in ["shared", "anon-2M", "shared-3M", "private-4K", ""] {
            assert!(parse_config(bad).is_err(), "{bad}");
        }
    }
}
