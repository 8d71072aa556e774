//! `vmm latency`: how long host invalidations of guest RAM take, seen from
//! four layers at once, on the built-in probe guest ([`guests::probe`]).
//!
//! For every RAM configuration (shared/private hugetlb x 2M/1G pages; what
//! cannot run here is skipped with the reason) the probe boots, populates
//! its working set, and each scenario ([`measure::scenarios`]: protect over
//! 2M/1G/whole RAM x populated/sparse/empty, discard, punch hole,
//! write-protect, NUMA hinting) runs many times. Per iteration:
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
pub mod session;

use crate::boot::parse_size;
use crate::guest_ram_uffd::UffdRamError;
use crate::uffd_fault::LatencyUs;
use measure::{Op, Sample, Scenario, Target, Tracer};
use notifier::hostconf::{HugepageReservation, SysctlGuard};
use notifier::HvaRange;
use notifier::PageSize;
use session::Session;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Arguments of `vmm latency`.
#[derive(clap::Args, Debug, Clone)]
pub struct LatencyArgs {
    /// The guest: `builtin` (the CPL3 probe) or `linux` (the Debian guest
    /// while its kernel boots: host, kernel and MMU layers; no guest layer
    /// on this host).
    #[arg(long, default_value = "builtin")]
    pub guest: String,
    /// Guest RAM on 2 MiB pages (1 GiB-page configurations use 2 GiB).
    #[arg(long, default_value = "2G", value_parser = parse_size)]
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
    /// shared-1G, private-1G.
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
            guest: "builtin".into(),
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
        if sc.op == Op::NumaHint {
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
    #[error(transparent)]
    Memslot(#[from] mmu::memslot::MemslotError),
    #[error(transparent)]
    Vm(#[from] crate::builtin_vm::BuiltinVmError),
    #[error(transparent)]
    Kvm(#[from] crate::kvm::KvmError),
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
    Inval(#[from] crate::run_inval::InvalError),
    #[error("unknown guest {0:?}: `builtin` or `linux`")]
    UnknownGuest(String),
    #[error("unknown configuration {0:?}: shared-2M, private-2M, shared-1G, private-1G")]
    Config(String),
}

/// p50/p99/max in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Figure {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

impl Figure {
    fn of(ns: &[u64]) -> Self {
        let l = LatencyUs::from_ns(ns);
        Figure {
            p50: l.p50,
            p99: l.p99,
            max: l.max,
        }
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct HostLayer {
    #[serde(flatten)]
    pub fig: Figure,
    /// The restoring syscall (mprotect RW, write-protect off).
    pub restore: Option<Figure>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct KernelLayer {
    /// First notifier to syscall return (trace_clock mono); zeros for a
    /// no-op.
    #[serde(flatten)]
    pub fig: Figure,
    /// Tracepoint ranges over guest RAM per iteration (the fewest seen).
    pub ranges: u64,
    pub ranges_total: u64,
    /// Iterations whose syscall left no range in the trace.
    pub iterations_without_range: u64,
    pub restore_ranges_total: u64,
    /// Syscall entry to the first notifier.
    pub entry_to_notify: Option<Figure>,
    /// Whether timestamps were CLOCK_MONOTONIC.
    pub timed: bool,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct GuestLayer {
    /// The probe's longest gap per iteration.
    #[serde(flatten)]
    pub fig: Figure,
    /// Mean stall (gap above 2 us: refault) per iteration that had any.
    pub refault: Option<Figure>,
    pub stalls_total: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct MmuLayer {
    /// Total zap time per iteration (TDP).
    #[serde(flatten)]
    pub fig: Figure,
    /// Most leaves visited by one iteration's zaps.
    pub leaves: u64,
    pub max_stretch_us: f64,
    pub yields: u64,
    pub zaps: u64,
    /// The restoring syscall's zaps, total time.
    pub restore: Option<Figure>,
}

/// The shadow MMU's zaps (rmap walk) for the operation's syscall.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ShadowLayer {
    /// Total zap time per iteration.
    #[serde(flatten)]
    pub fig: Figure,
    /// Most rmap heads visited by one iteration's zaps.
    pub rmaps: u64,
    /// Most shadow pages zapped by one iteration's zaps.
    pub shadow_pages: u64,
    pub max_stretch_us: f64,
    pub yields: u64,
    pub zaps: u64,
}

/// Plain KVM against the project, in the same run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Compare {
    pub plain_host: Figure,
    pub plain_guest: Option<Figure>,
    /// project p50 / plain p50.
    pub host_ratio: f64,
    pub guest_ratio: Option<f64>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct ScenarioReport {
    pub name: String,
    pub config: String,
    pub op: Op,
    pub size: String,
    pub state: measure::State,
    pub range_bytes: u64,
    pub iterations: usize,
    /// The layers this scenario has figures for.
    pub layers: Vec<&'static str>,
    pub host: Option<HostLayer>,
    pub kernel: Option<KernelLayer>,
    pub guest: Option<GuestLayer>,
    /// The project's TDP MMU.
    pub mmu: Option<MmuLayer>,
    /// The project's shadow MMU (guest page tables shadowed, rmap zaps).
    pub mmu_shadow: Option<ShadowLayer>,
    pub compare: Option<Compare>,
    pub note: Option<String>,
    #[serde(skip)]
    pub samples: Vec<Sample>,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Skipped {
    pub what: String,
    pub why: String,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct LatencyReport {
    pub guest: String,
    pub scenarios: Vec<ScenarioReport>,
    pub skipped: Vec<Skipped>,
    /// KVM_RUN EFAULT re-entries (guest stores while RAM was read-only).
    pub efault_retries: u64,
    pub trace_clock_mono: bool,
    /// Per session: the guest's TSC against the host's.
    pub tsc: Vec<(String, session::TscCheck)>,
    pub plots: Vec<String>,
    pub elapsed_s: f64,
}

/// One RAM configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Config {
    shared: bool,
    hp: PageSize,
}

impl Config {
    fn name(&self) -> String {
        format!(
            "{}-{}",
            if self.shared { "shared" } else { "private" },
            if self.hp == PageSize::Size1G {
                "1G"
            } else {
                "2M"
            }
        )
    }
    fn parse(s: &str) -> Result<Self, LatencyError> {
        let (kind, size) = s
            .trim()
            .split_once('-')
            .ok_or_else(|| LatencyError::Config(s.into()))?;
        let shared = match kind {
            "shared" => true,
            "private" => false,
            _ => return Err(LatencyError::Config(s.into())),
        };
        let hp = match size {
            "2M" | "2m" => PageSize::Size2M,
            "1G" | "1g" => PageSize::Size1G,
            _ => return Err(LatencyError::Config(s.into())),
        };
        Ok(Config { shared, hp })
    }
}

fn skip(rep: &mut LatencyReport, what: impl Into<String>, why: impl Into<String>) {
    rep.skipped.push(Skipped {
        what: what.into(),
        why: why.into(),
    });
}

/// A busy thread touching an anonymous region: with `numa_balancing=1`
/// it makes the kernel's `task_numa_work` scan this mm. Stops on drop.
struct NumaToucher {
    region: HvaRange,
    stop: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl NumaToucher {
    fn start(len: u64) -> Result<Self, LatencyError> {
        // SAFETY: a fresh private anonymous mapping; checked below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len as usize,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(LatencyError::Guest(format!(
                "mmap of the NUMA control region: {}",
                std::io::Error::last_os_error()
            )));
        }
        let region = HvaRange::new(p as u64, p as u64 + len);
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let handle = std::thread::Builder::new()
            .name("numa-touch".into())
            .spawn(move || {
                while !st.load(Ordering::Relaxed) {
                    let mut a = region.start;
                    while a < region.end {
                        // SAFETY: inside the anonymous mapping, which is
                        // unmapped only after this thread is joined (Drop).
                        unsafe {
                            std::ptr::write_volatile(
                                a as *mut u8,
                                std::ptr::read_volatile(a as *const u8).wrapping_add(1),
                            )
                        };
                        a += 4096;
                    }
                }
            })
            .map_err(|e| LatencyError::Guest(format!("spawning the NUMA toucher: {e}")))?;
        Ok(NumaToucher {
            region,
            stop,
            handle: Some(handle),
        })
    }
}

impl Drop for NumaToucher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        // SAFETY: the mapping created in `start`; its only user is joined.
        unsafe {
            libc::munmap(
                self.region.start as *mut libc::c_void,
                self.region.len() as usize,
            )
        };
    }
}

/// The samples of one scenario on one RAM mode.
struct Measured {
    sc: Scenario,
    samples: Vec<Sample>,
    note: Option<String>,
}

/// Run every scenario on one session.
fn run_session(
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
        if sc.op == Op::NumaHint {
            if !notifier::error::is_root() {
                skip(
                    rep,
                    format!("{label} numa_hint"),
                    "needs root to set kernel.numa_balancing",
                );
                progress.inc(args.numa_windows() as u64);
                continue;
            }
            let guard = match SysctlGuard::set("kernel.numa_balancing", "1") {
                Ok(g) => g,
                Err(e) => {
                    skip(rep, format!("{label} numa_hint"), e.to_string());
                    progress.inc(args.numa_windows() as u64);
                    continue;
                }
            };
            let toucher = NumaToucher::start(32 << 20)?;
            let mut samples = Vec::new();
            let mut on_control = 0;
            for _ in 0..args.numa_windows() {
                let (smp, c) = measure::numa_window(
                    s,
                    tr.as_mut(),
                    toucher.region,
                    Duration::from_millis(args.numa_window_ms),
                )?;
                samples.push(smp);
                on_control += c;
                progress.inc(1);
            }
            drop(toucher);
            drop(guard);
            let on_guest: u64 = samples.iter().map(|x| x.ranges).sum();
            let zaps: u64 = samples.iter().filter_map(|x| x.mmu).map(|m| m.zaps).sum();
            let note = format!(
                "measured no-op: {} window(s) of {} ms with kernel.numa_balancing=1; \
                 task_numa_work skips hugetlb VMAs: {on_guest} tracepoint range(s) on guest RAM, \
                 {zaps} MMU zap(s); {on_control} range(s) on a 32 MiB anonymous control region \
                 (the scanner ran{}); no syscall: user space cannot call change_prot_numa",
                samples.len(),
                args.numa_window_ms,
                if on_control == 0 {
                    " - or not yet: none seen"
                } else {
                    ""
                },
            );
            out.push(Measured {
                sc: sc.clone(),
                samples,
                note: Some(note),
            });
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

fn summarize(
    config: &str,
    m: Measured,
    traced: bool,
    mono: bool,
    plain: Option<&Measured>,
) -> ScenarioReport {
    let smp = &m.samples;
    let numa = m.sc.op == Op::NumaHint;
    let mut layers = Vec::new();
    let host = (!numa).then(|| {
        layers.push("host");
        let restore: Vec<u64> = smp.iter().filter_map(|x| x.restore_ns).collect();
        HostLayer {
            fig: Figure::of(&smp.iter().map(|x| x.host_ns).collect::<Vec<_>>()),
            restore: (!restore.is_empty()).then(|| Figure::of(&restore)),
        }
    });
    let kernel = traced.then(|| {
        layers.push("kernel");
        let n2r: Vec<u64> = smp.iter().filter_map(|x| x.notify_to_return_ns).collect();
        let e2n: Vec<u64> = smp.iter().filter_map(|x| x.entry_to_notify_ns).collect();
        KernelLayer {
            fig: Figure::of(&n2r),
            ranges: smp.iter().map(|x| x.ranges).min().unwrap_or(0),
            ranges_total: smp.iter().map(|x| x.ranges).sum(),
            iterations_without_range: smp.iter().filter(|x| x.ranges == 0).count() as u64,
            restore_ranges_total: smp.iter().map(|x| x.restore_ranges).sum(),
            entry_to_notify: (!e2n.is_empty()).then(|| Figure::of(&e2n)),
            timed: mono && !n2r.is_empty(),
        }
    });
    let gaps: Vec<u64> = smp.iter().filter_map(|x| x.guest_max_gap_ns).collect();
    let guest = (!gaps.is_empty()).then(|| {
        layers.push("guest");
        let refault: Vec<u64> = smp
            .iter()
            .filter(|x| x.guest_stalls > 0)
            .map(|x| x.guest_stall_ns / x.guest_stalls)
            .collect();
        GuestLayer {
            fig: Figure::of(&gaps),
            refault: (!refault.is_empty()).then(|| Figure::of(&refault)),
            stalls_total: smp.iter().map(|x| x.guest_stalls).sum(),
        }
    });
    let mmus: Vec<_> = smp.iter().filter_map(|x| x.mmu).collect();
    let mmu = (!mmus.is_empty()).then(|| {
        layers.push("mmu");
        let restore: Vec<u64> = smp
            .iter()
            .filter_map(|x| x.restore_mmu)
            .map(|r| r.total_ns)
            .collect();
        MmuLayer {
            fig: Figure::of(&mmus.iter().map(|x| x.total_ns).collect::<Vec<_>>()),
            leaves: mmus.iter().map(|x| x.units).max().unwrap_or(0),
            max_stretch_us: mmus.iter().map(|x| x.longest_ns).max().unwrap_or(0) as f64 / 1000.0,
            yields: mmus.iter().map(|x| x.yields).sum(),
            zaps: mmus.iter().map(|x| x.zaps).sum(),
            restore: (!restore.is_empty()).then(|| Figure::of(&restore)),
        }
    });
    let shadows: Vec<_> = smp.iter().filter_map(|x| x.shadow).collect();
    let mmu_shadow = (!shadows.is_empty()).then(|| {
        layers.push("mmu_shadow");
        ShadowLayer {
            fig: Figure::of(&shadows.iter().map(|x| x.total_ns).collect::<Vec<_>>()),
            rmaps: shadows.iter().map(|x| x.rmaps).max().unwrap_or(0),
            shadow_pages: shadows.iter().map(|x| x.shadow_pages).max().unwrap_or(0),
            max_stretch_us: shadows.iter().map(|x| x.longest_ns).max().unwrap_or(0) as f64 / 1000.0,
            yields: shadows.iter().map(|x| x.yields).sum(),
            zaps: shadows.iter().map(|x| x.zaps).sum(),
        }
    });
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    let compare = plain.and_then(|p| {
        let h = host.as_ref()?;
        let plain_host = Figure::of(&p.samples.iter().map(|x| x.host_ns).collect::<Vec<_>>());
        let pg: Vec<u64> = p
            .samples
            .iter()
            .filter_map(|x| x.guest_max_gap_ns)
            .collect();
        let plain_guest = (!pg.is_empty()).then(|| Figure::of(&pg));
        Some(Compare {
            host_ratio: ratio(h.fig.p50, plain_host.p50),
            guest_ratio: match (&guest, &plain_guest) {
                (Some(g), Some(pg)) => Some(ratio(g.fig.p50, pg.p50)),
                _ => None,
            },
            plain_host,
            plain_guest,
        })
    });
    ScenarioReport {
        name: format!("{config}/{}", m.sc.name()),
        config: config.to_string(),
        op: m.sc.op,
        size: m.sc.size.clone(),
        state: m.sc.state,
        range_bytes: m.sc.range_bytes(),
        iterations: smp.len(),
        layers,
        host,
        kernel,
        guest,
        mmu,
        mmu_shadow,
        compare,
        note: m.note,
        samples: m.samples,
    }
}

/// Start a session once `pages` huge pages are free: the pool is shared
/// with other users of the machine, so a shortfall (or ENOSPC while
/// populating) is waited out a few times before giving up.
fn start_retrying<S>(
    ps: PageSize,
    pages: u64,
    start: impl Fn() -> Result<S, LatencyError>,
) -> Result<(S, Option<HugepageReservation>), LatencyError> {
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
    match args.guest.as_str() {
        "builtin" => {}
        "linux" => return run_linux(args),
        other => return Err(LatencyError::UnknownGuest(other.into())),
    }
    let configs: Vec<Config> = args
        .configs
        .split(',')
        .filter(|s| !s.trim().is_empty())
        .map(Config::parse)
        .collect::<Result<_, _>>()?;
    let mut rep = new_report(
        args,
        "this host's KVM (PVM) cannot run a Linux guest's user space; the built-in CPL3 probe is the guest layer \
         (`--guest linux` measures the host, kernel and MMU layers on a booting Linux guest)",
    );
    let kvm = crate::kvm::open(&args.kvm_dev)?;
    let mut tracer = open_tracer(&mut rep);
    let stall_tsc = mmu::clock::ticks(Duration::from_micros(2));
    // Plan: the scenarios of each configuration that can run.
    let mut plan = Vec::new();
    for c in configs {
        let name = c.name();
        let mem = if c.hp == PageSize::Size1G {
            2 << 30
        } else {
            args.mem
        };
        let ps = if c.hp == PageSize::Size1G {
            PageSize::Size1G
        } else {
            PageSize::Size2M
        };
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
        let (scs, skipped) = measure::scenarios(*mem, ps.bytes(), c.shared, true);
        for (what, why) in skipped {
            skip(&mut rep, format!("{} {what}", c.name()), why);
        }
        let n: u64 = scs.iter().map(|s| args.steps(s)).sum();
        total += n * if args.compare { 2 } else { 1 };
        per_config.push(scs);
    }
    let progress = progress_bar(total);
    let timeout = Duration::from_secs(args.timeout);
    for ((c, mem, ps), scs) in plan.iter().zip(per_config) {
        let name = c.name();
        let pages = mem.div_ceil(ps.bytes());
        let project = (|| -> Result<Vec<Measured>, LatencyError> {
            let (mut s, _pool) = start_retrying(*ps, pages, || {
                Session::start(&kvm, *mem, c.hp, c.shared, true, stall_tsc, timeout)
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
                skip(&mut rep, name, format!("failed: {e}"));
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
                    Session::start(&kvm, *mem, c.hp, c.shared, false, stall_tsc, timeout)
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
                    skip(
                        &mut rep,
                        format!("{name} plain KVM (--compare)"),
                        format!("failed: {e}"),
                    );
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
fn new_report(args: &LatencyArgs, why: &str) -> LatencyReport {
    let mut rep = LatencyReport {
        guest: args.guest.clone(),
        ..Default::default()
    };
    skip(&mut rep, "guest layer of a Linux guest", why);
    rep
}

/// The kernel layer's tracepoint source, or why there is none (skipped).
fn open_tracer(rep: &mut LatencyReport) -> Option<Tracer> {
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

fn progress_bar(total: u64) -> indicatif::ProgressBar {
    if std::io::stderr().is_terminal() {
        let pb = indicatif::ProgressBar::new(total);
        if let Ok(st) = indicatif::ProgressStyle::with_template(
            "{elapsed_precise} [{bar:40}] {pos}/{len} {msg}",
        ) {
            pb.set_style(st.progress_chars("=> "));
        }
        pb
    } else {
        indicatif::ProgressBar::hidden()
    }
}

/// `--guest linux`: boot the Linux guest on MMU-served shared 2M RAM
/// (uffd MINOR), let its kernel fault RAM in, run the populated-state
/// scenarios on that RAM while it boots, stop it. See [`linux`].
fn run_linux(args: &LatencyArgs) -> Result<LatencyReport, LatencyError> {
    let t_start = Instant::now();
    let mut rep = new_report(args, linux::NO_GUEST_LAYER);
    skip(
        &mut rep,
        "mmu_shadow layer of a Linux guest",
        linux::NO_SHADOW_LAYER,
    );
    skip(
        &mut rep,
        "shared-2M sparse, empty",
        "the VMM cannot make a booting kernel's RAM sparse or empty without discarding its working set",
    );
    skip(
        &mut rep,
        "private-2M, shared-1G, private-1G",
        "--guest linux runs on shared 2 MiB RAM served by uffd MINOR faults (as `vmm run --guest linux`)",
    );
    let mut tracer = open_tracer(&mut rep);
    let name = "linux-shared-2M".to_string();
    let mem = args.mem;
    let ps = PageSize::Size2M;
    let (mut scs, skipped) = measure::scenarios(mem, ps.bytes(), true, true);
    for (what, why) in skipped {
        skip(&mut rep, format!("{name} {what}"), why);
    }
    scs.retain(|s| s.state == measure::State::Populated);
    let total: u64 = scs.iter().map(|s| args.steps(s)).sum();
    let (mut s, _pool) = start_retrying(ps, mem.div_ceil(ps.bytes()), || {
        linux::LinuxSession::start(mem, args.kvm_dev.clone(), Duration::from_secs(args.timeout))
    })?;
    let (warm, enough) = if args.quick {
        (args.warmup.unwrap_or(30), (mem / 8) >> 20)
    } else {
        (args.warmup.unwrap_or(90), (mem / 4) >> 20)
    };
    let warm = Duration::from_secs(warm);
    let progress = progress_bar(total);
    progress.set_message(format!("{name}: the guest kernel faults its RAM in"));
    let w = s.warm_up(warm, enough)?;
    let measured = run_session(&mut s, &mut tracer, &scs, args, &mut rep, &progress, &name);
    let still_running = s.running();
    rep.efault_retries += s.efaults();
    let log = s.serial_log.clone();
    let exit = s.stop();
    progress.finish_and_clear();
    let measured = measured?;
    let exit = exit?;
    let mono = rep.trace_clock_mono;
    let mut first = true;
    for m in measured {
        let mut r = summarize(&name, m, tracer.is_some(), mono, None);
        if first {
            first = false;
            let note = format!(
                "linux guest: measured from {:.0} s into its boot, {} MiB of {} MiB faulted in through the MMU ({} leaves); guest {} during the scenarios, then stopped ({exit}); last console line {:?}; serial log {}",
                w.seconds,
                w.mapped_mib,
                mem >> 20,
                w.leaves,
                if still_running { "running" } else { "NOT running" },
                linux::last_line(&log),
                log.display()
            );
            r.note = Some(match r.note {
                Some(n) => format!("{note}; {n}"),
                None => note,
            });
        }
        rep.scenarios.push(r);
    }
    drop(tracer);
    rep.elapsed_s = t_start.elapsed().as_secs_f64();
    Ok(rep)
}

fn fmt_fig(f: &Figure) -> String {
    format!("{:>10.1} {:>10.1} {:>10.1}", f.p50, f.p99, f.max)
}

/// The terminal table: one row per scenario and layer (microseconds).
pub fn table(rep: &LatencyReport) -> String {
    let mut t = String::new();
    let w = rep
        .scenarios
        .iter()
        .map(|s| s.name.len())
        .max()
        .unwrap_or(8)
        .max(8);
    t += &format!(
        "{:<w$} {:<6} {:>10} {:>10} {:>10}  {}\n",
        "scenario", "layer", "p50 us", "p99 us", "max us", "notes"
    );
    for s in &rep.scenarios {
        let mut first = true;
        let mut row = |layer: &str, f: &Figure, extra: String| {
            let name = if first { s.name.as_str() } else { "" };
            first = false;
            t += &format!("{name:<w$} {layer:<6} {}  {extra}\n", fmt_fig(f));
        };
        if let Some(h) = &s.host {
            let mut extra = h
                .restore
                .map(|r| format!("restore p50 {:.1}", r.p50))
                .unwrap_or_default();
            if let Some(c) = &s.compare {
                extra += &format!(
                    "  x{:.2} vs plain KVM ({:.1})",
                    c.host_ratio, c.plain_host.p50
                );
            }
            row("host", &h.fig, extra);
        }
        if let Some(k) = &s.kernel {
            row(
                "kernel",
                &k.fig,
                format!(
                    "{} range(s)/iter, {} without{}",
                    k.ranges,
                    k.iterations_without_range,
                    if k.timed { "" } else { ", untimed" }
                ),
            );
        }
        if let Some(g) = &s.guest {
            let mut extra = g
                .refault
                .map(|r| format!("refault p50 {:.1}, {} stalls", r.p50, g.stalls_total))
                .unwrap_or_else(|| format!("{} stalls", g.stalls_total));
            if let Some(r) = s.compare.as_ref().and_then(|c| c.guest_ratio) {
                extra += &format!("  x{r:.2} vs plain KVM");
            }
            row("guest", &g.fig, extra);
        }
        if let Some(m) = &s.mmu {
            row(
                "mmu",
                &m.fig,
                format!(
                    "{} leaves, stretch {:.1} us, {} yields",
                    m.leaves, m.max_stretch_us, m.yields
                ),
            );
        }
        if let Some(m) = &s.mmu_shadow {
            row(
                "shadow",
                &m.fig,
                format!(
                    "{} rmaps, {} shadow pages, stretch {:.1} us, {} yields",
                    m.rmaps, m.shadow_pages, m.max_stretch_us, m.yields
                ),
            );
        }
        if let Some(n) = &s.note {
            t += &format!("{:<w$} note: {n}\n", "");
        }
    }
    for k in &rep.skipped {
        t += &format!("skipped: {}: {}\n", k.what, k.why);
    }
    t
}

/// Write report.json, samples.json, table.txt and the plots under `dir`.
fn write_out(dir: &std::path::Path, rep: &mut LatencyReport) -> Result<(), String> {
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    rep.plots = plots(dir, rep);
    let samples: Vec<_> = rep
        .scenarios
        .iter()
        .map(|s| serde_json::json!({"name": s.name, "samples": s.samples}))
        .collect();
    let w = |name: &str, body: String| {
        std::fs::write(dir.join(name), body)
            .map_err(|e| format!("{}: {e}", dir.join(name).display()))
    };
    w(
        "samples.json",
        serde_json::to_string_pretty(&samples).unwrap_or_default(),
    )?;
    w("table.txt", table(rep))?;
    w(
        "report.json",
        serde_json::to_string_pretty(rep).unwrap_or_default(),
    )?;
    Ok(())
}

/// Latency vs range size per layer (protect, populated) per configuration,
/// and a histogram per scenario. Failures are reported, not fatal.
fn plots(dir: &std::path::Path, rep: &mut LatencyReport) -> Vec<String> {
    use crate::plot;
    let mut written = Vec::new();
    let mut errors = Vec::new();
    let mut configs: Vec<String> = rep.scenarios.iter().map(|s| s.config.clone()).collect();
    configs.dedup();
    for c in &configs {
        let prot: Vec<&ScenarioReport> = rep
            .scenarios
            .iter()
            .filter(|s| {
                &s.config == c && s.op == Op::Protect && s.state == measure::State::Populated
            })
            .collect();
        let mut series = Vec::new();
        let layer = |name: &str, f: &dyn Fn(&ScenarioReport) -> Option<f64>| plot::Series {
            label: name.into(),
            points: prot
                .iter()
                .filter_map(|s| Some((s.range_bytes as f64, f(s)?)))
                .collect(),
        };
        series.push(layer("host", &|s| s.host.as_ref().map(|h| h.fig.p50)));
        series.push(layer("kernel", &|s| {
            s.kernel.as_ref().filter(|k| k.timed).map(|k| k.fig.p50)
        }));
        series.push(layer("guest", &|s| s.guest.as_ref().map(|g| g.fig.p50)));
        series.push(layer("mmu", &|s| s.mmu.as_ref().map(|m| m.fig.p50)));
        series.push(layer("mmu_shadow", &|s| {
            s.mmu_shadow.as_ref().map(|m| m.fig.p50)
        }));
        series.retain(|s| !s.points.is_empty());
        let title = format!("{c}: mprotect RO, populated RAM: p50 vs range size");
        let stem = dir.join(format!("{c}-protect-vs-size"));
        match plot::line_chart(
            &stem,
            &plot::LineChart {
                title: &title,
                x_label: "range (bytes)",
                y_label: "p50 (us)",
                log_x: true,
                log_y: true,
                series: &series,
            },
        ) {
            Ok(w) => written.push(w.svg.display().to_string()),
            Err(e) => errors.push(e.to_string()),
        }
    }
    for s in &rep.scenarios {
        let us = |v: Vec<u64>| {
            v.into_iter()
                .map(|x| x as f64 / 1000.0)
                .collect::<Vec<f64>>()
        };
        let mut samples = Vec::new();
        if s.host.is_some() {
            samples.push((
                "host".to_string(),
                us(s.samples.iter().map(|x| x.host_ns).collect()),
            ));
        }
        samples.push((
            "kernel".to_string(),
            us(s.samples
                .iter()
                .filter_map(|x| x.notify_to_return_ns)
                .collect()),
        ));
        samples.push((
            "guest".to_string(),
            us(s.samples
                .iter()
                .filter_map(|x| x.guest_max_gap_ns)
                .collect()),
        ));
        samples.push((
            "mmu".to_string(),
            us(s.samples
                .iter()
                .filter_map(|x| x.mmu)
                .map(|m| m.total_ns)
                .collect()),
        ));
        samples.push((
            "mmu_shadow".to_string(),
            us(s.samples
                .iter()
                .filter_map(|x| x.shadow)
                .map(|m| m.total_ns)
                .collect()),
        ));
        samples.retain(|(_, v)| v.iter().any(|&x| x > 0.0));
        if samples.is_empty() {
            // A measured no-op (NUMA hinting without a guest layer).
            continue;
        }
        let stem = dir.join(format!("hist-{}", s.name.replace('/', "-")));
        let title = format!("{}: latency histogram", s.name);
        match plot::histogram(
            &stem,
            &plot::Histogram {
                title: &title,
                x_label: "latency (us)",
                samples: &samples,
            },
        ) {
            Ok(w) => written.push(w.svg.display().to_string()),
            Err(e) => errors.push(e.to_string()),
        }
    }
    errors.sort();
    errors.dedup();
    for e in errors {
        skip(rep, "plots", e);
    }
    written
}

/// `vmm latency`: table on stdout (JSON as the last line with `--json`);
/// non-zero only if nothing could be measured.
pub fn main(args: LatencyArgs) -> ExitCode {
    let mut rep = match run(&args) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("vmm latency: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(dir) = &args.out {
        if let Err(e) = write_out(dir, &mut rep) {
            skip(&mut rep, "--out", e);
        }
    }
    print!("{}", table(&rep));
    println!(
        "{} scenario(s) in {:.1} s{}",
        rep.scenarios.len(),
        rep.elapsed_s,
        args.out
            .as_ref()
            .map(|d| format!("; results in {}", d.display()))
            .unwrap_or_default()
    );
    if args.json {
        match serde_json::to_string(&rep) {
            Ok(s) => println!("{s}"),
            Err(e) => eprintln!("vmm latency: JSON: {e}"),
        }
    }
    if rep.scenarios.is_empty() {
        eprintln!("vmm latency: nothing could be measured");
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn configs_parse() {
        let c = Config::parse("private-1G").unwrap();
        assert!(!c.shared);
        assert_eq!(c.hp, PageSize::Size1G);
        assert_eq!(c.name(), "private-1G");
        assert_eq!(Config::parse(" shared-2m").unwrap().name(), "shared-2M");
        for bad in ["shared", "anon-2M", "shared-4K", ""] {
            assert!(Config::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn figures_and_table() {
        let f = Figure::of(&[1000, 2000, 3000]);
        assert_eq!((f.p50, f.max), (2.0, 3.0));
        let sc = measure::Scenario {
            op: Op::Protect,
            state: measure::State::Populated,
            gs: 0,
            ge: 2 << 20,
            size: "2M".into(),
        };
        let smp = Sample {
            host_ns: 5000,
            ranges: 2,
            notify_to_return_ns: Some(3000),
            guest_max_gap_ns: Some(9000),
            mmu: Some(measure::MmuSample {
                zaps: 1,
                total_ns: 1000,
                ..Default::default()
            }),
            ..Default::default()
        };
        let m = Measured {
            sc,
            samples: vec![smp; 3],
            note: None,
        };
        let r = summarize("shared-2M", m, true, true, None);
        assert_eq!(r.layers, vec!["host", "kernel", "guest", "mmu"]);
        assert_eq!(r.kernel.as_ref().unwrap().iterations_without_range, 0);
        let rep = LatencyReport {
            scenarios: vec![r],
            ..Default::default()
        };
        let t = table(&rep);
        assert!(t.contains("shared-2M/protect/2M/populated"), "{t}");
        assert!(t.contains("kernel"));
        let v = serde_json::to_value(&rep).unwrap();
        assert_eq!(v["scenarios"][0]["host"]["p50"], 5.0);
        assert_eq!(v["scenarios"][0]["kernel"]["ranges"], 2);
    }
}
