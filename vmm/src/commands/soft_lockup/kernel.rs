//! `vmm soft-lockup --plane kernel`: the host kernel's own walk. A VM on
//! this host gets memslots over `--l1` of `MAP_NORESERVE` memory (by
//! default anonymous with `MADV_NOHUGEPAGE`: 4 KiB host pages) from gpa
//! 4 GiB. With no guest every rmap head is empty (the case PLATFORM.md
//! measured); with `--populate` a guest writes `--density` of its pages
//! first and again before every measurement ([`PopulatingGuest`]: directly,
//! or as the L2 of a built-in guest hypervisor, so the host KVM shadows its
//! NPT - nested TDP, rmaps by L1 gfn). Then host invalidations of growing
//! prefixes of it - `dontneed` (one `madvise(MADV_DONTNEED)`: one notifier
//! range), `mprotect` (read-only and back: the kernel notifies PUD- or
//! PGD-level ranges, `change_protection()`), `munmap` (and the same range
//! mapped again), and on memfds `punch-hole` and `remove`. Each syscall
//! runs on the CPU a `SCHED_FIFO` watchdog is pinned to
//! ([`notifier::lateness`]): its worst wake-up lateness is the longest
//! stretch in which the kernel did not reschedule. Beside it: the
//! `kvm:kvm_unmap_hva_range` tracepoint (how many ranges, how large) and
//! the kernel's own detectors from `/dev/kmsg` ([`notifier::kmsg`]),
//! quoted. Per kind, a line through (GiB, stretch) says at what range the
//! stretch would reach the kernel's soft-lockup threshold (2 x
//! `kernel.watchdog_thresh`) and whether the kernel yields
//! ([`crate::report::fit`]).
//!
//! The memory and the invalidations of it are [`super::l1ram`]'s
//! (`--backing`, `--kinds`, punch-hole and remove on memfd backings); the
//! plot is [`super::plots`]'. Not yet here (issue 13): NUMA-hint windows.

use std::sync::Arc;
use std::time::Duration;

use notifier::hostconf::SysctlGuard;
use notifier::hostmm::Backing;
use notifier::kmsg::{KernelReport, Kmsg};
use notifier::lateness::{LatenessError, LatenessWatchdog};
use notifier::sched::mono_ns;
use notifier::trace::TraceSource;
use notifier::HvaRange;
use serde_json::{json, Value};

use guests::l1svm::{self, Mode, Touch};

use crate::cli::Report;
use crate::machine::builtin::populate::{PopulateError, PopulatingGuest};
use crate::report::fit::{self, Line, Verdict};
use crate::report::progress_bar;
use crate::vstate::kvm::{self, KvmError};
use crate::vstate::vm::{SlotMemory, Vm, VmError};

pub use super::l1ram::KernelInval;
use super::l1ram::{L1Ram, L1RamError};

/// The largest memslot KVM takes (`KVM_MEM_MAX_NR_PAGES`, 2^31 - 1 pages
/// in include/linux/kvm_host.h), rounded down to 1 GiB.
const SLOT_MAX: u64 = (((1u64 << 31) - 1) * 4096) & !((1 << 30) - 1);
/// The watchdog's period and `SCHED_FIFO` priority.
const PERIOD: Duration = Duration::from_millis(1);
const PRIORITY: i32 = 90;
/// Prefixes of the L1 the sweep invalidates: 1/16, 1/4, all of it.
const SWEEP: [u64; 3] = [16, 4, 1];
/// The longest quiet window the verdict's floor is measured over.
const QUIET_LONG_MAX: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum KernelPlaneError {
    #[error("--l1 {0} bytes: the kernel plane takes 64 MiB to 4 TiB in whole 2 MiB")]
    BadSize(u64),
    #[error("--l1 {l1} bytes is not a whole number of --backing {backing}'s {page} pages")]
    NotWholePages {
        l1: u64,
        backing: Backing,
        page: u64,
    },
    #[error("--kinds {kind} needs a file behind the memory: --backing shared-4K, shared-2M or shared-1G (not {backing})")]
    NeedsFile {
        kind: &'static str,
        backing: Backing,
    },
    #[error(transparent)]
    Ram(#[from] L1RamError),
    #[error("--l1 {l1_gib} GiB needs {need_mib} MiB of kernel memory for the host KVM's rmaps (8 bytes per 4 KiB gfn: 2 GiB per TiB, vmalloc'ed when a shadow MMU is in use, as here) but only {available_mib} MiB is available: a smaller --l1, or more memory (vmm host --mem)")]
    RmapMemory {
        l1_gib: u64,
        need_mib: u64,
        available_mib: u64,
    },
    #[error("--kinds numa-hint: NUMA balancing does not scan hugetlb memory (task_numa_work() skips it): --backing anon, thp or shared-4K, not {0}")]
    NumaHugetlb(Backing),
    #[error("--populate writes {need} huge pages of {page} MiB but the pool has {free} free: reserve them (nr_hugepages) or lower --density")]
    PoolTooSmall { need: u64, free: u64, page: u64 },
    #[error(transparent)]
    Size(#[from] crate::cli::SizeError),
    #[error(transparent)]
    Kvm(#[from] KvmError),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Lateness(#[from] LatenessError),
    #[error("{op} failed: {source}")]
    Syscall {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Host(#[from] notifier::Error),
    #[error("cannot tell which CPU this thread runs on")]
    NoCpu,
    #[error(transparent)]
    Populate(#[from] PopulateError),
    #[error(transparent)]
    Plots(#[from] super::plots::PlotsError),
    #[error("the model beside the kernel: {0}")]
    Model(#[from] mmu::model::ModelError),
}

/// What the kernel plane runs.
#[derive(Debug, Clone)]
pub struct KernelPlane {
    pub l1: u64,
    /// What backs the L1 (`MAP_NORESERVE` always).
    pub backing: Backing,
    pub kinds: Vec<KernelInval>,
    pub repeat: u32,
    /// `kernel.watchdog_thresh` for the run (restored after).
    pub watchdog_thresh: Option<u32>,
    /// A guest that writes some of the L1's pages before each measurement.
    pub populate: Option<Populate>,
}

/// Who writes the pages, and which fraction of them.
#[derive(Debug, Clone, Copy)]
pub struct Populate {
    pub mode: Mode,
    pub density: f64,
}

/// The longest a populating round may take (under TCG a nested round of
/// 2^18 pages takes minutes).
const ROUND_LIMIT: Duration = Duration::from_secs(900);

/// What the populating guest did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PopulateReport {
    pub mode: Mode,
    pub density: f64,
    pub pages: u64,
    pub stride_bytes: u64,
    pub rounds: u64,
    pub first_round_ms: f64,
    pub worst_round_ms: f64,
}

/// One memslot's part of [`L1Ram`].
struct SlotPart {
    ram: Arc<L1Ram>,
    offset: u64,
    len: u64,
}

// SAFETY: the part lies inside the mapping (built from its length), which
// lives as long as the `Arc` this value holds; the mapping is only ever
// replaced in place with the same length (munmap + MAP_FIXED), never moved.
unsafe impl SlotMemory for SlotPart {
    fn slot_hva(&self) -> u64 {
        self.ram.addr() + self.offset
    }
    fn slot_size(&self) -> u64 {
        self.len
    }
}

/// One measurement.
#[derive(Debug, Clone, serde::Serialize)]
pub struct KernelPoint {
    pub kind: KernelInval,
    pub bytes: u64,
    /// The fastest syscall of the repeats (ns).
    pub syscall_ns: u64,
    /// The worst stretch without a reschedule over the repeats (ns).
    pub lateness_ns: u64,
    /// `kvm_unmap_hva_range` ranges in the L1 per syscall, and the largest.
    pub ranges: Option<u64>,
    pub largest_range: Option<u64>,
    /// Each repeat's syscall time and stretch (ns), in run order.
    pub runs: Vec<(u64, u64)>,
    /// The median over the repeats of stretch / syscall time: ~1 when the
    /// kernel holds the CPU for the whole syscall.
    pub stretch_per_syscall: f64,
}

/// Per kind: the line through (GiB, stretch ms) and what it says.
#[derive(Debug, Clone, serde::Serialize)]
pub struct KernelFit {
    pub kind: KernelInval,
    pub ms_per_gib: Option<f64>,
    /// The range (GiB) at which the stretch reaches the soft-lockup
    /// threshold, by the line.
    pub gib_at_soft_lockup: Option<f64>,
    pub verdict: Verdict,
}

#[derive(Debug, Clone)]
pub struct KernelPlaneReport {
    pub kernel: String,
    pub backing: Backing,
    pub cpu: usize,
    pub l1: u64,
    pub slots: usize,
    pub watchdog_thresh_s: u32,
    /// The watchdog's lateness over a quiet CPU (ns): the probe floor.
    pub floor_ns: u64,
    /// Its worst lateness over one quiet window as long as the longest
    /// syscall of the sweep (ns, at most 10 s): what a CPU
    /// that holds nothing shows over that time (under TCG: several ms).
    pub quiet_long_ns: u64,
    pub points: Vec<KernelPoint>,
    pub fits: Vec<KernelFit>,
    pub kernel_reports: Vec<KernelReport>,
    /// Why there are no range counts (no tracefs, not root).
    pub trace_note: Option<String>,
    /// Why `/dev/kmsg` was not read.
    pub kmsg_note: Option<String>,
    pub populate: Option<PopulateReport>,
    /// The plot `--out` wrote.
    pub plot: Option<std::path::PathBuf>,
    /// `--model`: the same ranges on the project's model.
    pub model: Option<super::side_by_side::SideBySide>,
    /// The runs of `--with` and `--emulated-hosts`.
    pub earlier: Vec<super::plots::Run>,
    /// What the report should say first (the A/B's host without SVM).
    pub note: Option<String>,
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

fn watchdog_thresh() -> u32 {
    std::fs::read_to_string("/proc/sys/kernel/watchdog_thresh")
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(10)
}

/// The host KVM's rmap arrays for `l1` bytes (`memslot_rmap_alloc()`: one
/// 8-byte head per 4 KiB gfn, and per 2 MiB and 1 GiB frame) against
/// `available` bytes, when `shadow` says they get allocated at all (this
/// machine's PVM KVM, `kvm_amd npt=0`, or a nested guest's shadow NPT; the
/// TDP MMU alone allocates none).
pub fn check_rmap_memory(l1: u64, available: u64, shadow: bool) -> Result<(), KernelPlaneError> {
    let gfns = l1 / 4096;
    let need = (gfns + gfns / 512 + gfns / (512 * 512)) * 8;
    // Leave a tenth for everything else the run needs.
    if shadow && need > available / 10 * 9 {
        return Err(KernelPlaneError::RmapMemory {
            l1_gib: l1 >> 30,
            need_mib: need.div_ceil(1 << 20),
            available_mib: available >> 20,
        });
    }
    Ok(())
}

/// Whether this host's KVM will allocate rmaps for the L1's memslots.
fn shadow_mmu_in_use(nested: bool) -> bool {
    let read = |p: &str| std::fs::read_to_string(p).map(|s| s.trim().to_string());
    nested
        || std::path::Path::new("/sys/module/kvm_pvm").exists()
        || read("/sys/module/kvm_amd/parameters/npt").is_ok_and(|v| v == "N" || v == "0")
        || read("/sys/module/kvm_intel/parameters/ept").is_ok_and(|v| v == "N" || v == "0")
}

fn mem_available() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemAvailable:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(u64::MAX, |kib| kib * 1024)
}

impl KernelPlane {
    /// On hugetlb (`MAP_NORESERVE`: nothing reserved) every huge page the
    /// guest writes comes from the pool at fault time; a short pool would
    /// end the run with an EFAULT from KVM_RUN. Say it before.
    fn check_pool(&self, touch: &Touch) -> Result<(), KernelPlaneError> {
        let page = self.backing.page_size();
        let Some(dir) = page.hugetlb_pool().filter(|_| self.backing.is_hugetlb()) else {
            return Ok(());
        };
        // Pages one stride apart share a huge page when the stride is smaller.
        let per_page = (page.bytes() / touch.stride.max(1)).max(1);
        let need = touch.pages.div_ceil(per_page);
        let free = std::fs::read_to_string(dir.join("free_hugepages"))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0);
        if free < need {
            return Err(KernelPlaneError::PoolTooSmall {
                need,
                free,
                page: page.bytes() >> 20,
            });
        }
        Ok(())
    }

    pub fn run(&self) -> Result<KernelPlaneReport, KernelPlaneError> {
        const MIB2: u64 = 2 << 20;
        if self.l1 < (64 << 20) || self.l1 > (4 << 40) || !self.l1.is_multiple_of(MIB2) {
            return Err(KernelPlaneError::BadSize(self.l1));
        }
        let page = self.backing.page_size().bytes();
        if !self.l1.is_multiple_of(page) {
            return Err(KernelPlaneError::NotWholePages {
                l1: self.l1,
                backing: self.backing,
                page,
            });
        }
        if self.kinds.contains(&KernelInval::NumaHint) && self.backing.is_hugetlb() {
            return Err(KernelPlaneError::NumaHugetlb(self.backing));
        }
        if let Some(k) = self.kinds.iter().find(|k| k.needs_file()) {
            if !self.backing.is_shared() {
                return Err(KernelPlaneError::NeedsFile {
                    kind: k.name(),
                    backing: self.backing,
                });
            }
        }
        let nested = self.populate.is_some_and(|p| p.mode == Mode::Nested);
        check_rmap_memory(self.l1, mem_available(), shadow_mmu_in_use(nested))?;
        let touch = match self.populate {
            Some(p) => {
                let t = Touch::new(p.mode, self.l1, p.density).map_err(PopulateError::from)?;
                self.check_pool(&t)?;
                Some(t)
            }
            None => None,
        };
        let _thresh = match self.watchdog_thresh {
            Some(t) => Some(SysctlGuard::set("kernel.watchdog_thresh", &t.to_string())?),
            None => None,
        };
        let kvm = kvm::open(std::path::Path::new("/dev/kvm"))?;
        let mut vm = Vm::new(&kvm)?;
        let ram = Arc::new(L1Ram::new(self.backing, self.l1)?);
        let mut slots = 0usize;
        let mut offset = 0u64;
        while offset < self.l1 {
            let len = SLOT_MAX.min(self.l1 - offset);
            let part = SlotPart {
                ram: ram.clone(),
                offset,
                len,
            };
            vm.add_memslot(
                u32::try_from(slots).unwrap_or(u32::MAX),
                l1svm::DATA_GPA + offset,
                Arc::new(part),
            )?;
            slots += 1;
            offset += len;
        }
        let mut guest = match (self.populate, touch) {
            (Some(p), Some(touch)) => {
                let slot = u32::try_from(slots).unwrap_or(u32::MAX);
                Some((p, PopulatingGuest::new(&mut vm, slot, touch)?))
            }
            _ => None,
        };
        let cpu = notifier::sched::current_cpu().ok_or(KernelPlaneError::NoCpu)?;
        notifier::sched::pin_to_cpu(cpu).map_err(|source| KernelPlaneError::Syscall {
            op: "sched_setaffinity",
            source,
        })?;
        let watchdog = LatenessWatchdog::start(cpu, PERIOD, PRIORITY)?;
        let (mut kmsg, kmsg_note) = match Kmsg::open() {
            Ok(k) => (Some(k), None),
            Err(e) => (None, Some(e.to_string())),
        };
        let (mut trace, trace_note) = match TraceSource::open() {
            Ok(t) => (Some(t), None),
            Err(e) => (None, Some(e.to_string())),
        };
        // The probe floor: the median of five quiet windows (a shared
        // machine steals the CPU now and then; the median is the usual).
        let mut quiet = Vec::new();
        for _ in 0..5 {
            let ((), late) = watchdog.measure(|| std::thread::sleep(Duration::from_millis(20)))?;
            quiet.push(notifier::convert::duration_ns(late));
        }
        quiet.sort_unstable();
        let floor_ns = quiet[quiet.len() / 2];
        let first_round = match guest.as_mut() {
            Some((_, g)) => Some(g.round(ROUND_LIMIT)?),
            None => None,
        };
        let base = ram.addr();
        let mut points = Vec::new();
        let sizes: usize = self
            .kinds
            .iter()
            .map(|&k| {
                if k == KernelInval::NumaHint {
                    1
                } else {
                    SWEEP.len()
                }
            })
            .sum();
        let steps = sizes * self.repeat.max(1) as usize;
        let progress = progress_bar(steps as u64);
        for &kind in &self.kinds {
            // NUMA hinting is not a range the VMM picks: one window over
            // the whole L1.
            let divs: &[u64] = if kind == KernelInval::NumaHint {
                &[1]
            } else {
                &SWEEP
            };
            for &div in divs {
                let bytes = (self.l1 / div) & !(page - 1);
                let mut p = KernelPoint {
                    kind,
                    bytes,
                    syscall_ns: u64::MAX,
                    lateness_ns: 0,
                    ranges: None,
                    largest_range: None,
                    runs: Vec::new(),
                    stretch_per_syscall: 0.0,
                };
                for _ in 0..self.repeat.max(1) {
                    progress.set_message(format!("{} {} MiB", kind.name(), bytes >> 20));
                    if let Some((_, g)) = guest.as_mut() {
                        g.round(ROUND_LIMIT)?;
                    }
                    ram.prepare(kind, bytes)?;
                    if let Some(t) = trace.as_mut() {
                        t.collect()?;
                    }
                    let (res, late) = if kind == KernelInval::NumaHint {
                        numa_window(&watchdog)?
                    } else {
                        watchdog.measure(|| {
                            let t0 = mono_ns();
                            ram.invalidate(kind, bytes)
                                .map(|()| mono_ns() - t0)
                                .map_err(KernelPlaneError::from)
                        })?
                    };
                    ram.finish(kind, bytes)?;
                    let (took, late) = (res?, notifier::convert::duration_ns(late));
                    p.syscall_ns = p.syscall_ns.min(took);
                    p.lateness_ns = p.lateness_ns.max(late);
                    p.runs.push((took, late));
                    if let Some(t) = trace.as_mut() {
                        let mine = l1_ranges(&t.collect()?, HvaRange::new(base, base + self.l1));
                        p.ranges = Some(mine.len() as u64);
                        p.largest_range = mine.iter().map(HvaRange::len).max();
                    }
                    progress.inc(1);
                }
                p.stretch_per_syscall = median_ratio(&p.runs);
                points.push(p);
            }
        }
        let kernel_reports = kmsg
            .as_mut()
            .and_then(|k| k.reports().ok())
            .unwrap_or_default();
        let longest = points.iter().map(|p| p.syscall_ns).max().unwrap_or(0);
        let window = Duration::from_nanos(longest).clamp(Duration::from_millis(20), QUIET_LONG_MAX);
        // The least of three quiet windows: a host that preempts this whole
        // machine once (an emulated host beside another QEMU) must not
        // raise the floor above what the walks held.
        let mut quiet_long = Duration::MAX;
        for _ in 0..3 {
            let ((), late) = watchdog.measure(|| std::thread::sleep(window))?;
            quiet_long = quiet_long.min(late);
        }
        let quiet_long_ns = notifier::convert::duration_ns(quiet_long);
        // Nothing was held below twice what a quiet CPU shows, over a
        // short window or over the longest syscall's time.
        let held_floor_ns = 2 * floor_ns.max(quiet_long_ns);
        let thresh = watchdog_thresh();
        let fits = self
            .kinds
            .iter()
            .map(|&kind| fit_of(kind, &points, held_floor_ns, thresh))
            .collect();
        progress.finish_and_clear();
        let populate = guest.map(|(p, g)| PopulateReport {
            mode: p.mode,
            density: p.density,
            pages: g.touch.pages,
            stride_bytes: g.touch.stride,
            rounds: g.rounds,
            first_round_ms: first_round.map_or(0.0, |d| d.as_secs_f64() * 1e3),
            worst_round_ms: g.worst_round.as_secs_f64() * 1e3,
        });
        drop(vm);
        Ok(KernelPlaneReport {
            kernel: kernel_release(),
            backing: self.backing,
            cpu,
            l1: self.l1,
            slots,
            watchdog_thresh_s: thresh,
            floor_ns,
            quiet_long_ns,
            points,
            fits,
            kernel_reports,
            trace_note,
            kmsg_note,
            populate,
            plot: None,
            model: None,
            earlier: Vec::new(),
            note: None,
        })
    }
}

/// How long a `numa-hint` window lasts (`vmm latency`'s too).
const NUMA_WINDOW: Duration = Duration::from_secs(3);

/// One `numa-hint` window: `kernel.numa_balancing=1` (restored after) while
/// a thread of this process touches memory of its own - the scanner,
/// `task_numa_work()`, runs from a busy task's task-work and changes the
/// protection of this mm's anonymous memory (the L1 included) a window at a
/// time. The toucher is started from this thread, pinned to the watched
/// CPU, and inherits that affinity: the scan runs where the watchdog
/// looks. Returns the window's length as the "syscall" time.
fn numa_window(
    watchdog: &LatenessWatchdog,
) -> Result<(Result<u64, KernelPlaneError>, Duration), KernelPlaneError> {
    let _on = SysctlGuard::set("kernel.numa_balancing", "1")?;
    let toucher = notifier::workload::NumaToucher::start(32 << 20, 1)?;
    let out = watchdog.measure(|| {
        let t0 = mono_ns();
        std::thread::sleep(NUMA_WINDOW);
        Ok(mono_ns() - t0)
    })?;
    drop(toucher);
    Ok(out)
}

/// The ranges the kernel notified in `l1`, once each: every KVM VM of
/// this mm fires `kvm_unmap_hva_range` for the same range (ours, and the
/// one [`TraceSource`] attaches so that the event exists), back to back
/// from the same task.
fn l1_ranges(events: &[notifier::trace::TraceEvent], l1: HvaRange) -> Vec<HvaRange> {
    let mut out: Vec<(HvaRange, i32)> = Vec::new();
    for e in events {
        if e.range.start >= l1.end || e.range.end <= l1.start {
            continue;
        }
        if out.last() != Some(&(e.range, e.tid)) {
            out.push((e.range, e.tid));
        }
    }
    out.into_iter().map(|(r, _)| r).collect()
}

const GIB: f64 = (1u64 << 30) as f64;

/// The median of stretch / syscall over `runs` (0 with none).
fn median_ratio(runs: &[(u64, u64)]) -> f64 {
    let mut r: Vec<f64> = runs
        .iter()
        .map(|&(took, late)| late as f64 / took.max(1) as f64)
        .collect();
    r.sort_by(f64::total_cmp);
    r.get(r.len() / 2).copied().unwrap_or(0.0)
}

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

/// A walk that does not yield holds the CPU for most of the walk of the
/// largest notified range (measured: 0.88-0.99 of it on 6.1 and 6.18); one
/// that yields, for a sliver (6.12 at populated heads: 0.002-0.02). Below
/// this share of it the stretch is noise, however it grew (TCG's timer
/// noise reaches 10 ms over a 4 s syscall).
const HELD_MIN: f64 = 0.25;

/// At the largest range of `kind`: the stretch over the syscall time
/// spent per notified range of the largest size (`syscall x largest range
/// / bytes`; without tracepoint counts, the whole syscall).
fn held_share(points: &[KernelPoint], kind: KernelInval) -> Option<f64> {
    let p = points
        .iter()
        .filter(|p| p.kind == kind)
        .max_by_key(|p| p.bytes)?;
    let largest = p.largest_range.unwrap_or(p.bytes).min(p.bytes).max(1);
    let per_range = p.syscall_ns as f64 * largest as f64 / p.bytes.max(1) as f64;
    Some(p.lateness_ns as f64 / per_range.max(1.0))
}

/// The fit of `kind`'s points; a stretch at or below `floor_ns` held nothing.
fn fit_of(kind: KernelInval, points: &[KernelPoint], floor_ns: u64, thresh_s: u32) -> KernelFit {
    let xy: Vec<(f64, f64)> = points
        .iter()
        .filter(|p| p.kind == kind)
        .map(|p| (p.bytes as f64 / GIB, ms(p.lateness_ns)))
        .collect();
    let line = Line::least_squares(&xy);
    // The soft-lockup detector fires after 2 x watchdog_thresh seconds.
    let threshold_ms = 2.0 * f64::from(thresh_s) * 1000.0;
    let verdict = match fit::verdict(&xy, ms(floor_ns)) {
        Verdict::DoesNotYield if held_share(points, kind).is_some_and(|h| h < HELD_MIN) => {
            Verdict::Yields
        }
        v => v,
    };
    KernelFit {
        kind,
        ms_per_gib: line.map(|l| l.slope),
        // A bounded stretch never reaches it, whatever the line's slope.
        gib_at_soft_lockup: line
            .filter(|_| verdict == Verdict::DoesNotYield)
            .and_then(|l| l.x_at(threshold_ms)),
        verdict,
    }
}

impl Report for KernelPlaneReport {
    fn text(&self) -> String {
        let rmaps = match &self.populate {
            None => "empty rmaps".to_string(),
            Some(p) => format!(
                "{} pages ({} of them, one every {} MiB) written {} before each measurement ({} rounds, the first {:.0} ms, the longest {:.0} ms)",
                p.pages,
                p.density,
                p.stride_bytes >> 20,
                match p.mode {
                    Mode::Direct => "by the L1",
                    Mode::Nested => "by an L2 under the built-in SVM guest hypervisor (nested NPT)",
                },
                p.rounds,
                p.first_round_ms,
                p.worst_round_ms
            ),
        };
        let mut s = format!(
            "kernel plane on {} (CPU {}): L1 {} GiB of MAP_NORESERVE {} memory in {} memslot(s), {rmaps}; SCHED_FIFO watchdog every {} ms (quiet-CPU lateness {:.2} ms, {:.2} ms over the longest syscall's time)\n",
            self.kernel,
            self.cpu,
            self.l1 >> 30,
            self.backing,
            self.slots,
            PERIOD.as_millis(),
            ms(self.floor_ns),
            ms(self.quiet_long_ns)
        );
        s += &format!(
            "{:<11} {:>10} {:>12} {:>13} {:>9} {:>8} {:>12}\n",
            "kind", "range", "syscall ms", "stretch ms", "/syscall", "ranges", "ms per GiB"
        );
        for p in &self.points {
            s += &format!(
                "{:<11} {:>6} MiB {:>12.2} {:>13.2} {:>9.2} {:>8} {:>12.3}\n",
                p.kind.name(),
                p.bytes >> 20,
                ms(p.syscall_ns),
                ms(p.lateness_ns),
                p.stretch_per_syscall,
                p.ranges.map_or("-".into(), |r| r.to_string()),
                ms(p.lateness_ns) / (p.bytes as f64 / GIB)
            );
        }
        for f in &self.fits {
            s += &format!(
                "{}: {}; {} ms per GiB; the soft-lockup threshold ({} s) at {}\n",
                f.kind.name(),
                f.verdict.name(),
                f.ms_per_gib.map_or("-".into(), |v| format!("{v:.3}")),
                2 * self.watchdog_thresh_s,
                f.gib_at_soft_lockup
                    .map_or("never (the stretch does not grow)".into(), |g| format!(
                        "{g:.0} GiB"
                    )),
            );
        }
        if let Some(n) = &self.trace_note {
            s += &format!("no tracepoint ranges: {n}\n");
        }
        if let Some(n) = &self.kmsg_note {
            s += &format!("the kernel's own detectors were not read: {n}\n");
        }
        for r in &self.kernel_reports {
            s += &format!("the kernel reported: {}\n", r.line);
        }
        if let Some(m) = &self.model {
            s += &m.text();
        }
        for r in &self.earlier {
            s += &format!("beside it, {} - stretch (syscall) ms:", r.label);
            for p in &r.points {
                s += &format!(
                    " {} {:.0} GiB {:.1} ({:.1});",
                    p.kind, p.gib, p.stretch_ms, p.syscall_ms
                );
            }
            for (kind, verdict) in &r.verdicts {
                s += &format!(" {kind}: {verdict};");
            }
            s += "\n";
            for l in &r.kernel_reports {
                s += &format!("  its kernel reported: {l}\n");
            }
        }
        if let Some(n) = &self.note {
            s += &format!("note: {n}\n");
        }
        if let Some(p) = &self.plot {
            s += &format!("plot: {}\n", p.display());
        }
        s
    }

    fn json(&self) -> Value {
        json!({
            "plane": "kernel",
            "kernel": self.kernel,
            "cpu": self.cpu,
            "l1_bytes": self.l1,
            "backing": self.backing.to_string(),
            "memslots": self.slots,
            "watchdog_thresh_s": self.watchdog_thresh_s,
            "floor_ns": self.floor_ns,
            "quiet_long_ns": self.quiet_long_ns,
            "points": self.points,
            "fits": self.fits,
            "kernel_reports": self.kernel_reports.iter().map(|r| r.line.clone()).collect::<Vec<_>>(),
            "trace_note": self.trace_note,
            "kmsg_note": self.kmsg_note,
            "populate": self.populate,
            "plot": self.plot,
            "model": self.model,
            "earlier": self.earlier,
            "note": self.note,
        })
    }

    fn ok(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use notifier::trace::TraceEvent;

    #[test]
    fn each_range_counts_once_whatever_the_number_of_vms() {
        let l1 = HvaRange::new(0x1000_0000, 0x2000_0000);
        let ev = |start, end, tid| TraceEvent {
            range: HvaRange::new(start, end),
            timestamp_ns: 0,
            tid,
        };
        let events = [
            ev(0x1000_0000, 0x1800_0000, 7),
            ev(0x1000_0000, 0x1800_0000, 7),
            ev(0x0, 0x1000, 7),
            ev(0x1800_0000, 0x2000_0000, 7),
            ev(0x1800_0000, 0x2000_0000, 7),
            ev(0x1800_0000, 0x2000_0000, 9),
        ];
        let r = l1_ranges(&events, l1);
        assert_eq!(r.len(), 3, "{r:?}");
        assert_eq!(r[0].len(), 0x800_0000);
    }

    fn point(
        kind: KernelInval,
        gib: u64,
        syscall_ms: f64,
        stretch_ms: f64,
        largest_gib: u64,
    ) -> KernelPoint {
        KernelPoint {
            kind,
            bytes: gib << 30,
            syscall_ns: notifier::convert::f64_to_u64_saturating(syscall_ms * 1e6),
            lateness_ns: notifier::convert::f64_to_u64_saturating(stretch_ms * 1e6),
            ranges: Some(1),
            largest_range: Some(largest_gib << 30),
            runs: Vec::new(),
            stretch_per_syscall: 0.0,
        }
    }

    #[test]
    fn verdicts_on_the_measured_nested_a_b() {
        use KernelInval::*;
        // debian-6.12, nested, 2 TiB (2026-12-02): munmap's stretch grew
        // 4.1 -> 10 ms of a 4.6 s syscall (noise); mprotect's 512 GiB
        // ranges were each one stretch; 6.1's dontneed held it all.
        let sweep = |kind, syscall: [f64; 3], stretch: [f64; 3], largest: [u64; 3]| {
            [128, 512, 2048]
                .iter()
                .enumerate()
                .map(|(i, &g)| point(kind, g, syscall[i], stretch[i], largest[i]))
                .collect::<Vec<_>>()
        };
        let munmap = sweep(
            Munmap,
            [303.7, 1087.9, 4606.3],
            [4.1, 4.3, 10.0],
            [128, 512, 2048],
        );
        assert_eq!(
            fit_of(Munmap, &munmap, 2_000_000, 1).verdict,
            Verdict::Yields
        );
        let mprotect = sweep(
            Mprotect,
            [406.0, 1942.8, 8477.8],
            [110.0, 633.8, 908.3],
            [82, 429, 512],
        );
        assert_eq!(
            fit_of(Mprotect, &mprotect, 2_000_000, 1).verdict,
            Verdict::DoesNotYield
        );
        let dontneed = sweep(
            Dontneed,
            [350.1, 1308.7, 4057.9],
            [316.2, 1151.6, 3740.0],
            [128, 512, 2048],
        );
        let f = fit_of(Dontneed, &dontneed, 2_000_000, 1);
        assert_eq!(f.verdict, Verdict::DoesNotYield);
        // 2 s (watchdog_thresh 1) at about 1.1 TiB by the line.
        let g = f.gib_at_soft_lockup.unwrap();
        assert!((900.0..1400.0).contains(&g), "{g}");
    }

    #[test]
    fn the_stretch_ratio_is_the_median_run_not_the_worst() {
        assert_eq!(median_ratio(&[]), 0.0);
        let r = median_ratio(&[(10, 9), (10, 30), (10, 10)]);
        assert!((r - 1.0).abs() < 1e-9, "{r}");
        assert_eq!(median_ratio(&[(0, 5)]), 5.0);
    }

    #[test]
    fn rmaps_that_do_not_fit_are_refused_with_what_they_need() {
        let gib = 1u64 << 30;
        // 1 TiB: 2 GiB + 4 MiB + 8 KiB of heads, rounded up.
        let e = check_rmap_memory(1 << 40, 2 * gib, true)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("needs 2053 MiB") && e.contains("2048 MiB is available"),
            "{e}"
        );
        assert!(check_rmap_memory(1 << 40, 3 * gib, true).is_ok());
        // The TDP MMU alone allocates none.
        assert!(check_rmap_memory(4 << 40, gib, false).is_ok());
    }

    #[test]
    fn bad_sizes_are_refused_before_kvm() {
        for l1 in [0, 32 << 20, (64 << 20) + 4096, 8 << 40] {
            let k = KernelPlane {
                l1,
                backing: Backing::Anon { thp: false },
                kinds: vec![KernelInval::Dontneed],
                repeat: 1,
                watchdog_thresh: None,
                populate: None,
            };
            assert!(matches!(k.run(), Err(KernelPlaneError::BadSize(_))), "{l1}");
        }
    }
}
