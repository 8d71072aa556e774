//! `vmm soft-lockup`: the nested-TDP soft-lockup scenario on the model
//! plane (`mmu::model`, this file), or on the host kernel's own KVM
//! (`--plane kernel`, [`kernel`]: its memory and invalidations in
//! [`l1ram`], the model beside it in [`side_by_side`], the plot in
//! [`plots`], the A/B across emulated hosts in [`ab`]).
//!
//! An L1 of up to 4 TiB maps a fraction of its memory into an L2 through
//! EPT tables; the nested MMU shadows them. A host invalidation of an L1
//! range (mprotect notifies whole PUD ranges) then zaps through the rmaps of
//! every gfn in it. A watchdog thread stands for the kernel's soft-lockup
//! detector: every `--watchdog-ms` it needs `mmu_lock` and records how long
//! it waited (and how many rmap heads the zapper visited meanwhile). Without
//! yielding (KVM before 6.12) its wait is the whole zap; with yielding it is
//! at most one stretch.

use mmu::model::MODEL_L1_HVA;
use mmu::model::{build_nested, ModelError, NestedModel, NestedModelConfig, TableShape};
use mmu::shadow::{NotifierZap, WalkMode, ZapOptions, ZapProgress, ZapReport};
use mmu::watchdog::{watchdog_until, WatchdogReport};
use mmu::{KvmMmuNotifier, MmuStatsSnapshot, RemoteTlb, YieldPolicy};
use notifier::convert::duration_ns;
use notifier::subscriber::{Delivery, HvaRange, Invalidation, MmuNotifyEvent, Subscribers};
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::cli::{self, parse_size, Report, SizeError, ZapArgs};
use crate::machine::builtin::populate::PopulateError;

pub mod ab;
pub mod kernel;
pub mod l1ram;
pub mod plots;
pub mod side_by_side;

/// Which MMU `vmm soft-lockup` measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Plane {
    /// The project's model MMU (`mmu::model`).
    Model,
    /// This host's KVM: host invalidations of a VM's huge memslots.
    Kernel,
}

/// Where `vmm soft-lockup`'s invalidation ranges come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum RangeSource {
    Direct,
    Mprotect,
    NumaHint,
}

/// Who populates the kernel plane's L1 (`guests::l1svm::Mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PopulateMode {
    Direct,
    Nested,
}

/// Arguments of `vmm soft-lockup`.
#[derive(Debug, Clone, clap::Args)]
pub struct SoftLockupArgs {
    /// Which MMU: the project's model, or this host's KVM (`kernel`).
    #[arg(long, value_enum, default_value = "model")]
    pub plane: Plane,
    /// L1 guest memory size (e.g. 4T, 64G, 1G; at most 4T; a bare number
    /// is MiB). Default: 4T on the model plane, 64G on the kernel plane
    /// (whose shadow MMU allocates 8 bytes of rmap per 4 KiB page).
    #[arg(long)]
    pub l1: Option<String>,
    /// Kernel plane: the host invalidations, each over 1/16, 1/4 and all
    /// of the L1.
    #[arg(
        long,
        value_enum,
        value_delimiter = ',',
        default_value = "dontneed,mprotect,munmap"
    )]
    pub kinds: Vec<kernel::KernelInval>,
    /// Kernel plane: what backs the L1 (always `MAP_NORESERVE`): anon
    /// (4 KiB pages), thp, shared-4K (shmem), shared-2M, shared-1G
    /// (hugetlbfs memfds), private-2M, private-1G.
    #[arg(long, default_value = "anon")]
    pub backing: notifier::hostmm::Backing,
    /// Kernel plane: runs per kind and size (the fastest syscall and the
    /// worst stretch are reported).
    #[arg(long, default_value_t = 3)]
    pub repeat: u32,
    /// Kernel plane: `kernel.watchdog_thresh` for the run (restored after),
    /// so the kernel's soft-lockup detector fires at 2 x this many seconds.
    #[arg(long)]
    pub watchdog_thresh: Option<u32>,
    /// Fraction of L1 4 KiB pages mapped into L2 (0..=1); on the kernel
    /// plane, the fraction `--populate` writes.
    #[arg(long, default_value_t = 0.0001)]
    pub density: f64,
    /// Kernel plane: a guest writes `--density` of the L1's pages before
    /// each measurement, so the host KVM holds SPTEs and rmaps there:
    /// `direct` (the L1 itself) or `nested` (an L2 under the built-in SVM
    /// guest hypervisor: nested NPT; needs a host whose KVM offers SVM,
    /// such as `vmm host`). Default: none (every rmap head empty).
    #[arg(long, value_enum)]
    pub populate: Option<PopulateMode>,
    #[command(flatten)]
    pub zap: ZapArgs,
    /// Size of the invalidated L1 range, from gfn 0 (default: all of L1).
    #[arg(long)]
    pub range: Option<String>,
    /// Guest EPT table shape: linear, shuffled, huge or aliased:K.
    #[arg(long, default_value = "linear")]
    pub shape: String,
    /// Host backing level for L1: 1 = 4 KiB pages, 2 = 2 MiB hugetlb.
    #[arg(long, default_value_t = 1)]
    pub host_level: u8,
    /// Refuse models whose MMU memory estimate exceeds this (e.g. 4G).
    #[arg(long, default_value = "4G")]
    pub budget: String,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Deliver the invalidation as a host mmu_notifier event (mprotect of
    /// the range: MMU_NOTIFY_PROTECTION_VMA, blockable) through
    /// `notifier::subscriber::Subscribers` instead of calling the zap.
    #[arg(long)]
    pub via_notifier: bool,
    /// Where the invalidation ranges come from: `direct` (the whole
    /// `--range` as one notification), or the kernel's own ranges as
    /// `notifier::predict` computes them for the L1 VMA: `mprotect` of the
    /// range (one per PGD entry on 4 KiB host pages: the PUD-level ranges
    /// of the soft lockup) or a `numa-hint` scan window (`change_prot_numa`;
    /// nothing on hugetlb host pages, as in the kernel). Anything but
    /// `direct` implies `--via-notifier`.
    #[arg(long, value_enum, default_value = "direct")]
    pub ranges: RangeSource,
    /// The NUMA-hinting scan window (`numa_balancing_scan_size_mb`).
    #[arg(long, default_value = "256M")]
    pub numa_window: String,
    /// Kernel plane: write report.json, table.txt and the stretch-vs-range
    /// plot (log-log, a line per kernel and kind) under this directory.
    #[arg(long)]
    pub out: Option<std::path::PathBuf>,
    /// Kernel plane: also zap the same ranges on the project's model (an
    /// L1 of `--l1` at `--density`), blind without and with yielding and
    /// by the summary, and compare its cost per rmap head with the
    /// kernel's dontneed per gfn.
    #[arg(long)]
    pub model: bool,
    /// Kernel plane, with `--out`: an earlier run's saved `--json` output
    /// (an emulated host's, say) whose points join the plot (repeatable).
    #[arg(long = "with", requires = "out")]
    pub with: Vec<std::path::PathBuf>,
    /// Kernel plane: first run the same arguments inside each of these
    /// emulated SVM hosts (`vmm host --kernel K`, e.g.
    /// `debian-6.1,debian-6.12`), whose reports join this run's (and its
    /// `--out` plot): the kernel A/B in one command. Where this host
    /// offers no SVM, its own run of `--populate nested` is left empty
    /// (said in the report).
    #[arg(long, value_delimiter = ',')]
    pub emulated_hosts: Vec<String>,
    /// Print one JSON object as the last stdout line.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum SoftLockupError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Size(#[from] SizeError),
    #[error("--range {range} bytes must be a multiple of 4 KiB and at most the L1 size {l1}")]
    BadRange { range: u64, l1: u64 },
    #[error("{0} applies to --plane kernel only")]
    KernelOnly(&'static str),
    #[error("--max-units must be at least 1, --watchdog-ms at least 1")]
    BadYieldArgs,
    #[error("stale translation after the zap: {0}")]
    Stale(String),
    #[error("the watchdog thread panicked, or the model MMU was shared")]
    Watchdog,
}

/// A resolved scenario.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub model: NestedModelConfig,
    /// Invalidated L1 gfns.
    pub zap: (u64, u64),
    pub policy: YieldPolicy,
    pub mode: WalkMode,
    pub watchdog_period: Duration,
    /// Deliver through the notifier subscriber path.
    pub via_notifier: bool,
    /// The host invalidations to deliver (unused for `direct`: the whole
    /// zap range).
    pub invalidations: Vec<Invalidation>,
    pub ranges: RangeSource,
}

impl Scenario {
    pub fn from_args(a: &SoftLockupArgs) -> Result<Self, SoftLockupError> {
        let l1 = parse_size(a.l1.as_deref().unwrap_or("4T"))?;
        let shape: TableShape = a.shape.parse()?;
        let model = NestedModelConfig {
            l1_bytes: l1,
            density: a.density,
            shape,
            seed: a.seed,
            host_max_level: a.host_level,
            memory_budget: parse_size(&a.budget)?,
        };
        model.validate()?;
        let range = match &a.range {
            Some(r) => parse_size(r)?,
            None => l1,
        };
        if range % 4096 != 0 || range > l1 {
            return Err(SoftLockupError::BadRange { range, l1 });
        }
        if !a.zap.valid() {
            return Err(SoftLockupError::BadYieldArgs);
        }
        let policy = a.zap.policy();
        let r = HvaRange::new(MODEL_L1_HVA, MODEL_L1_HVA + range);
        let invalidations = predicted(
            a.ranges,
            HvaRange::new(MODEL_L1_HVA, MODEL_L1_HVA + l1),
            r,
            a.host_level,
            parse_size(&a.numa_window)?,
        );
        Ok(Self {
            model,
            zap: (0, range >> 12),
            policy,
            mode: a.zap.walk(),
            watchdog_period: Duration::from_millis(a.zap.watchdog_ms),
            via_notifier: a.via_notifier || a.ranges != RangeSource::Direct,
            invalidations,
            ranges: a.ranges,
        })
    }
}

/// The host invalidations of L1 range `r` (inside the L1 VMA `l1`): the
/// whole range (`direct`), or what `notifier::predict` says the kernel
/// notifies for an mprotect of it or a NUMA-hinting scan window at its
/// start. Every L1 PUD is populated in the model.
pub fn predicted(
    src: RangeSource,
    l1: HvaRange,
    r: HvaRange,
    host_level: u8,
    numa_window: u64,
) -> Vec<Invalidation> {
    use notifier::predict::{self, VmaShape};
    let vma = VmaShape {
        range: l1,
        hugetlb: (host_level >= 2).then_some(2 << 20),
        may_share: false,
        prot: libc::PROT_READ | libc::PROT_WRITE,
    };
    let all_present = |_: u64| true;
    let notified = match src {
        RangeSource::Direct => vec![predict::Notified {
            range: r,
            event: MmuNotifyEvent::ProtectionVma,
        }],
        RangeSource::Mprotect => predict::mprotect(&[vma], r, libc::PROT_READ, &all_present),
        RangeSource::NumaHint => {
            let w = HvaRange::new(r.start, (r.start + numa_window).min(r.end));
            predict::numa_hint(&vma, w, &all_present)
        }
    };
    notified
        .into_iter()
        .map(|n| Invalidation {
            range: n.range,
            event: n.event,
            blockable: true,
            delivery: Delivery::Before,
        })
        .collect()
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct SoftLockupReport {
    pub l1_bytes: u64,
    pub range_bytes: u64,
    pub density: f64,
    pub shape: TableShape,
    pub yield_on: bool,
    pub walk: WalkMode,
    pub via_notifier: bool,
    pub ranges: RangeSource,
    /// The notified ranges, in bytes (several for a PGD-spanning mprotect).
    pub notified_ranges: Vec<u64>,
    pub max_units: u64,
    pub slice_ns: u64,
    pub watchdog_period_ns: u64,
    pub max_stretch_ns: u64,
    pub max_stretch_entries: u64,
    pub yields: u64,
    pub watchdog_worst_wait_ns: u64,
    pub watchdog_worst_wait_entries: u64,
    pub watchdog_worst_wait_work: u64,
    pub watchdog_acquisitions: u64,
    pub zap_ns: u64,
    pub rmap_entries_visited: u64,
    pub rmap_heads_populated: u64,
    pub sptes_zapped: u64,
    pub shadow_pages_visited: u64,
    pub shadow_pages_zapped: u64,
    pub tlb_flushes: u64,
    pub l2_pages_mapped: u64,
    pub build_ns: u64,
    pub mmu_bytes_estimate: u64,
    pub translations_checked: u64,
    pub stats: MmuStatsSnapshot,
}

/// Build the model, zap the range with the watchdog running, check for
/// stale translations.
pub fn run(sc: &Scenario) -> Result<SoftLockupReport, SoftLockupError> {
    let mut model = build_nested(sc.model, RemoteTlb::default())?;
    let ctx = model.mmu.context().clone();
    let progress = Arc::new(ZapProgress {
        hold_until_contended: true,
        ..Default::default()
    });
    if sc.via_notifier {
        let z = NotifierZap {
            mode: sc.mode,
            progress: Some(progress.clone()),
        };
        Arc::get_mut(&mut model.mmu)
            .ok_or(SoftLockupError::Watchdog)?
            .set_notifier_zap(z);
    }
    // The operation is over when every invalidation has been delivered
    // (several zaps, one per notified range) or the direct zap is done.
    let over = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let wd = {
        let (ctx, progress, period) = (ctx.clone(), progress.clone(), sc.watchdog_period);
        let over = over.clone();
        std::thread::spawn(move || {
            watchdog_until(&ctx, &progress, period, || over.load(Ordering::Acquire))
        })
    };
    let rep = if sc.via_notifier {
        // The host invalidations, to the context's KvmMmuNotifier driving
        // the nested MMU.
        let notifier = Arc::new(KvmMmuNotifier::new(ctx.clone(), sc.policy));
        notifier.add_mmu(model.mmu.clone());
        let subs = Subscribers::new();
        subs.register(notifier.clone());
        let flushes = ctx.stats.snapshot().remote_tlb_flush_requests;
        let mut yields = Vec::new();
        let direct = [Invalidation {
            range: HvaRange::new(
                MODEL_L1_HVA + (sc.zap.0 << 12),
                MODEL_L1_HVA + (sc.zap.1 << 12),
            ),
            event: MmuNotifyEvent::ProtectionVma,
            blockable: true,
            delivery: Delivery::Before,
        }];
        let invalidations = match sc.ranges {
            RangeSource::Direct => &direct[..],
            _ => &sc.invalidations[..],
        };
        for inv in invalidations {
            subs.start(inv);
            subs.end(inv);
            yields.extend(notifier.last_report());
        }
        over.store(true, Ordering::Release);
        let mut rep = merge(&model.mmu.take_notifier_reports(), &yields);
        rep.tlb_flushes = ctx.stats.snapshot().remote_tlb_flush_requests - flushes;
        rep
    } else {
        let opts = ZapOptions {
            policy: sc.policy,
            mode: sc.mode,
            progress: Some(&progress),
        };
        let rep = model.mmu.zap_gfn_range(sc.zap.0, sc.zap.1, &opts);
        over.store(true, Ordering::Release);
        rep
    };
    let wd = wd.join().map_err(|_| SoftLockupError::Watchdog)?;
    let checked = check(&model, sc.zap)?;
    Ok(report(sc, &model, &rep, wd, checked, ctx.stats.snapshot()))
}

/// One report for an operation that zapped once per notified range: work
/// summed, the longest stretch and the zap time of the worst range (the
/// yields are the notifier's, one report per range).
fn merge(zaps: &[ZapReport], yields: &[mmu::yielder::YieldReport]) -> ZapReport {
    let mut out = ZapReport::default();
    for z in zaps {
        out.rmap_heads_visited += z.rmap_heads_visited;
        out.rmap_heads_populated += z.rmap_heads_populated;
        out.sptes_zapped += z.sptes_zapped;
        out.shadow_pages_visited += z.shadow_pages_visited;
        out.shadow_pages_zapped += z.shadow_pages_zapped;
    }
    for y in yields {
        if y.longest.ns > out.yields.longest.ns {
            out.yields.longest = y.longest;
        }
        out.yields.units += y.units;
        out.yields.yields += y.yields;
        out.yields.total_ns += y.total_ns;
    }
    out
}

/// No stale translation: sampled L2 pages (all of them up to 1M) either
/// miss or map what the tables say, outside the zapped range.
fn check(model: &NestedModel, zap: (u64, u64)) -> Result<u64, SoftLockupError> {
    let samples = model.l2_pages().min(1 << 20);
    model
        .check_no_stale(zap, samples, 7)
        .map_err(SoftLockupError::Stale)?;
    Ok(samples)
}

fn report(
    sc: &Scenario,
    m: &NestedModel,
    z: &ZapReport,
    wd: WatchdogReport,
    checked: u64,
    stats: MmuStatsSnapshot,
) -> SoftLockupReport {
    SoftLockupReport {
        l1_bytes: sc.model.l1_bytes,
        range_bytes: (sc.zap.1 - sc.zap.0) << 12,
        density: sc.model.density,
        shape: sc.model.shape,
        yield_on: sc.policy.mode == mmu::YieldMode::Yield,
        walk: sc.mode,
        via_notifier: sc.via_notifier,
        ranges: sc.ranges,
        notified_ranges: match sc.ranges {
            RangeSource::Direct => vec![(sc.zap.1 - sc.zap.0) << 12],
            _ => sc.invalidations.iter().map(|i| i.range.len()).collect(),
        },
        max_units: sc.policy.max_units,
        slice_ns: duration_ns(sc.policy.slice),
        watchdog_period_ns: duration_ns(sc.watchdog_period),
        max_stretch_ns: z.yields.longest.ns,
        max_stretch_entries: z.yields.longest.units,
        yields: z.yields.yields,
        watchdog_worst_wait_ns: wd.worst_wait_ns,
        watchdog_worst_wait_entries: wd.worst_wait_entries,
        watchdog_worst_wait_work: wd.worst_wait_work,
        watchdog_acquisitions: wd.acquisitions,
        zap_ns: z.yields.total_ns,
        rmap_entries_visited: z.rmap_heads_visited,
        rmap_heads_populated: z.rmap_heads_populated,
        sptes_zapped: z.sptes_zapped,
        shadow_pages_visited: z.shadow_pages_visited,
        shadow_pages_zapped: z.shadow_pages_zapped,
        tlb_flushes: z.tlb_flushes,
        l2_pages_mapped: m.l2_pages(),
        build_ns: m.build_ns,
        mmu_bytes_estimate: m.estimate_bytes,
        translations_checked: checked,
        stats,
    }
}

/// Empty-range zap: blind walk vs populated summary, measured side by side
/// (alternating, medians of `reps`). Returns (blind_ns, summary_ns, heads
/// the blind walk visited).
pub fn empty_range_speedup(
    range_bytes: u64,
    reps: usize,
) -> Result<(u64, u64, u64), SoftLockupError> {
    // 64x the range of L1 with a few mapped regions, all outside the
    // measured (first) range.
    let l1 = (range_bytes * 64).clamp(64 << 20, mmu::model::MAX_L1_BYTES);
    let cfg = NestedModelConfig {
        l1_bytes: l1,
        density: 0.002,
        ..Default::default()
    };
    let m = build_nested(cfg, RemoteTlb::default())?;
    let pages = range_bytes >> 12;
    let start = (0..l1 / range_bytes)
        .map(|b| b * pages)
        .find(|&s| {
            m.l1_regions
                .iter()
                .all(|&r| r * 512 + 512 <= s || r * 512 >= s + pages)
                && s + pages <= m.table_gfn_range().0
        })
        .ok_or(SoftLockupError::BadRange {
            range: range_bytes,
            l1,
        })?;
    let (mut blind, mut summary) = (Vec::new(), Vec::new());
    let mut heads = 0;
    for _ in 0..reps.max(1) {
        for (mode, out) in [
            (WalkMode::Blind, &mut blind),
            (WalkMode::Summary, &mut summary),
        ] {
            let t = Instant::now();
            let r = m.mmu.zap_gfn_range(
                start,
                start + pages,
                &ZapOptions {
                    policy: YieldPolicy::default(),
                    mode,
                    progress: None,
                },
            );
            out.push(duration_ns(t.elapsed()));
            if mode == WalkMode::Blind {
                heads = r.rmap_heads_visited;
            }
        }
    }
    let median = |v: &mut Vec<u64>| {
        v.sort_unstable();
        v[v.len() / 2]
    };
    Ok((median(&mut blind), median(&mut summary), heads))
}

/// A soft-lockup run and, beside it, the empty-range blind walk against
/// the populated summary (1 GiB, medians of 11).
#[derive(Debug, Clone)]
pub struct SoftLockupOutcome {
    pub report: SoftLockupReport,
    pub empty_1g_blind_ns: u64,
    pub empty_1g_summary_ns: u64,
}

impl Report for SoftLockupOutcome {
    fn text(&self) -> String {
        use std::fmt::Write as _;
        let r = &self.report;
        let ms = |ns: u64| ns as f64 / 1e6;
        let mut out = String::new();
        let _ = writeln!(out,
            "soft-lockup: L1 {} GiB, range {} GiB, density {}, shape {:?}, yield {}, walk {:?}, {} L2 pages mapped (built in {:.1} ms)",
            r.l1_bytes >> 30,
            r.range_bytes as f64 / (1u64 << 30) as f64,
            r.density,
            r.shape,
            if r.yield_on { "on" } else { "off" },
            r.walk,
            r.l2_pages_mapped,
            ms(r.build_ns)
        );
        let _ = writeln!(
            out,
            "  zap {:.3} ms, {} rmap heads visited ({} populated), {} sptes zapped, {} yields",
            ms(r.zap_ns),
            r.rmap_entries_visited,
            r.rmap_heads_populated,
            r.sptes_zapped,
            r.yields
        );
        let _ = writeln!(
            out,
            "  longest stretch {:.3} ms / {} heads",
            ms(r.max_stretch_ns),
            r.max_stretch_entries
        );
        let _ = writeln!(
            out,
            "  watchdog worst wait {:.3} ms / {} heads ({} heads of zap work) over {} acquisitions",
            ms(r.watchdog_worst_wait_ns),
            r.watchdog_worst_wait_entries,
            r.watchdog_worst_wait_work,
            r.watchdog_acquisitions
        );
        let _ = writeln!(
            out,
            "  empty 1 GiB: blind {:.1} us, summary {:.2} us ({:.0}x)",
            self.empty_1g_blind_ns as f64 / 1e3,
            self.empty_1g_summary_ns as f64 / 1e3,
            self.speedup()
        );
        out
    }
    fn json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(&self.report).unwrap_or_default();
        if let Some(o) = v.as_object_mut() {
            o.insert("empty_1g_blind_ns".into(), self.empty_1g_blind_ns.into());
            o.insert(
                "empty_1g_summary_ns".into(),
                self.empty_1g_summary_ns.into(),
            );
            o.insert("empty_1g_speedup".into(), self.speedup().into());
        }
        v
    }
    fn ok(&self) -> bool {
        true
    }
}

impl SoftLockupOutcome {
    fn speedup(&self) -> f64 {
        self.empty_1g_blind_ns as f64 / self.empty_1g_summary_ns.max(1) as f64
    }
}

/// The scenario of `args`, run, with the empty-range comparison.
pub fn run_args(args: &SoftLockupArgs) -> Result<SoftLockupOutcome, SoftLockupError> {
    let kernel_only = [
        ("--populate", args.populate.is_some()),
        ("--watchdog-thresh", args.watchdog_thresh.is_some()),
        ("--out", args.out.is_some()),
        ("--with", !args.with.is_empty()),
        ("--model", args.model),
        ("--emulated-hosts", !args.emulated_hosts.is_empty()),
    ];
    if let Some((flag, _)) = kernel_only.iter().find(|(_, set)| *set) {
        return Err(SoftLockupError::KernelOnly(flag));
    }
    let sc = Scenario::from_args(args)?;
    let report = run(&sc)?;
    let (empty_1g_blind_ns, empty_1g_summary_ns, _) = empty_range_speedup(1 << 30, 11)?;
    Ok(SoftLockupOutcome {
        report,
        empty_1g_blind_ns,
        empty_1g_summary_ns,
    })
}

/// `vmm soft-lockup`.
pub fn main(args: &SoftLockupArgs) -> ExitCode {
    match args.plane {
        Plane::Model => cli::conclude("vmm soft-lockup", args.json, run_args(args), None),
        Plane::Kernel => cli::conclude("vmm soft-lockup", args.json, kernel_main(args), None),
    }
}

/// The kernel plane: the runs of `--with` read first, the measurement,
/// then `--out`.
fn kernel_main(
    args: &SoftLockupArgs,
) -> Result<kernel::KernelPlaneReport, kernel::KernelPlaneError> {
    let mut earlier = plots::read_runs(&args.with)?;
    let mut plane = kernel_plane(args)?;
    for k in &args.emulated_hosts {
        earlier.push(ab::run_on(k, args, plane.l1)?);
    }
    let mut rep = match plane.run() {
        // The A/B's own host without SVM: its run goes on without the guest.
        Err(kernel::KernelPlaneError::Populate(e @ PopulateError::NoSvm))
            if !args.emulated_hosts.is_empty() =>
        {
            plane.populate = None;
            let mut rep = plane.run()?;
            rep.note = Some(format!("this host: {e}; its run has empty rmaps"));
            rep
        }
        r => r?,
    };
    rep.earlier = earlier;
    if args.model {
        let mut sizes: Vec<u64> = rep.points.iter().map(|p| p.bytes).collect();
        sizes.sort_unstable();
        sizes.dedup();
        rep.model = Some(side_by_side::measure(
            plane.l1,
            args.density,
            &sizes,
            &rep.points,
        )?);
    }
    if let Some(dir) = &args.out {
        rep.plot = Some(plots::write_out(dir, &rep)?);
    }
    Ok(rep)
}

/// The kernel plane of `args`.
pub fn kernel_plane(
    args: &SoftLockupArgs,
) -> Result<kernel::KernelPlane, kernel::KernelPlaneError> {
    let l1 = parse_size(args.l1.as_deref().unwrap_or("64G"))?;
    Ok(kernel::KernelPlane {
        l1,
        backing: args.backing,
        kinds: args.kinds.clone(),
        repeat: args.repeat,
        watchdog_thresh: args.watchdog_thresh,
        populate: args.populate.map(|m| kernel::Populate {
            mode: match m {
                PopulateMode::Direct => guests::l1svm::Mode::Direct,
                PopulateMode::Nested => guests::l1svm::Mode::Nested,
            },
            density: args.density,
        }),
    })
}
