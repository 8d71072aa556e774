//! `vmm bench fault-cost`: what a guest observes per huge-page first
//! touch when its RAM is served by userfaultfd through the project's MMU,
//! against the kernel's own hugetlb fault, measured side by side in one
//! run.
//!
//! Method: the built-in guest touches each 2 MiB page of its working set
//! once (one pass, stride 2 MiB), so its run time is `pages` first touches
//! plus a small fixed part. The same run with all guest RAM prefaulted
//! (`kernel-prefilled --prefault`: no host fault at all; KVM still builds
//! its own mapping of each page) is the warm baseline; `(run - warm) /
//! pages` is the guest-observed cost of one host fault. Variants run
//! round-robin, `reps` times each, medians taken, so drift on a shared
//! machine hits all of them alike.
//!
//! Apples to apples: `kernel-prefilled` is the kernel mapping a page that
//! is already in the memfd's page cache - exactly what `UFFDIO_CONTINUE`
//! does - and `kernel` is the kernel allocating and zeroing a fresh page -
//! what `UFFDIO_COPY` of zeros does. Ratios: CONTINUE / kernel-prefilled,
//! CONTINUE / kernel, COPY / CONTINUE.
//!
//! A second, finer measurement without the guest: a VMM thread touches
//! each huge page of the same RAM once and times each touch (the host
//! observes its own fault-to-resume, p50 over the pages). It resolves
//! faults with the same fault thread and MMU, so the ratios compare the
//! same paths without KVM's share, and a per-touch p50 is far less
//! sensitive to other load than a run-time difference: on a busy shared
//! machine the kernel's page-cache fault (~1-2 us per page) drowns in the
//! run-to-run noise of the guest runs.
//!
//! The event sources are off for these runs (`--events none`): they cost
//! nothing per fault, but the tracepoint pump thread would compete for the
//! two CPUs.

use crate::cli::{self, parse_ram_size, Report};
use crate::host::events::EventSources;
use crate::machine::builtin::touch::{self, TouchArgs, TouchError};
use crate::memory::fault::{self, FaultOptions};
use crate::memory::mmu::tdp_mmu;
use crate::memory::uffd::{UffdGuestRam, UffdMode};
use crate::report::Percentiles;
use crate::thread::pin_to_cpu;
use notifier::convert::{duration_ns, u64_to_usize};
use notifier::hostconf::HugepageReservation;
use notifier::hostmm::Backing;
use notifier::PageSize;
use notifier::Subscribers;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

/// `vmm bench ...`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchArgs {
    #[command(subcommand)]
    pub cmd: BenchCmd,
}

#[derive(clap::Subcommand, Debug, Clone)]
pub enum BenchCmd {
    /// Guest-observed cost of a huge-page first touch: MINOR+CONTINUE vs
    /// MISSING+COPY vs the kernel's own hugetlb fault, as ratios.
    FaultCost(FaultCostArgs),
}

/// Arguments of `vmm bench fault-cost`.
#[derive(clap::Args, Debug, Clone)]
pub struct FaultCostArgs {
    /// Guest RAM (2 MiB pages; every page above the first is touched once).
    #[arg(long, default_value = "512M", value_parser = parse_ram_size)]
    pub mem: u64,
    /// Runs per variant (medians are reported).
    #[arg(long, default_value_t = 7)]
    pub reps: usize,
    /// Pin the vCPU thread to CPU 0 and the fault thread to CPU 1.
    #[arg(long)]
    pub pin: bool,
    /// Grow the 2 MiB hugetlb pool for the run if needed (root); restored
    /// at exit.
    #[arg(long)]
    pub reserve_hugepages: bool,
    /// Print the JSON report as the last stdout line.
    #[arg(long)]
    pub json: bool,
}

/// One way of serving first touches.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Variant {
    pub name: &'static str,
    pub mode: UffdMode,
    pub prefault: bool,
    pub spin: bool,
    pub wake_early: bool,
    /// Fault-around pages (amortises faults: not a per-fault cost).
    pub fault_around: u64,
}

const fn v(name: &'static str, mode: UffdMode, spin: bool, wake_early: bool) -> Variant {
    Variant {
        name,
        mode,
        prefault: false,
        spin,
        wake_early,
        fault_around: 0,
    }
}

/// The warm baseline and the variants, in run order.
pub const VARIANTS: [Variant; 9] = [
    Variant {
        name: "warm (prefaulted)",
        mode: UffdMode::KernelPrefilled,
        prefault: true,
        spin: false,
        wake_early: false,
        fault_around: 0,
    },
    v("kernel, fresh page", UffdMode::Kernel, false, false),
    v(
        "kernel, page-cache page",
        UffdMode::KernelPrefilled,
        false,
        false,
    ),
    v("CONTINUE", UffdMode::Minor, false, false),
    v("CONTINUE, spin", UffdMode::Minor, true, false),
    v("CONTINUE, spin, wake-early", UffdMode::Minor, true, true),
    Variant {
        name: "CONTINUE, fault-around 8 (amortised)",
        mode: UffdMode::Minor,
        prefault: false,
        spin: false,
        wake_early: false,
        fault_around: 8,
    },
    v("COPY", UffdMode::Missing, false, false),
    v("COPY, spin, wake-early", UffdMode::Missing, true, true),
];

/// One variant's medians.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VariantResult {
    pub variant: Variant,
    /// Median guest run time, s.
    pub run_s: f64,
    /// Guest-observed cost per first touch, us: (run - warm) / pages.
    pub per_fault_us: f64,
    /// The same from the fastest run of each (least disturbed by other
    /// load on a shared machine): (min run - min warm) / pages.
    pub per_fault_min_us: f64,
    /// Median of the runs' handler share p50 (read to wake), us.
    pub handler_p50_us: f64,
    /// Median of the runs' CONTINUE/COPY ioctl p50, us.
    pub populate_p50_us: f64,
    /// Host thread touching each page once: median over reps of the
    /// per-touch p50, us (none for the warm baseline and fault-around).
    pub host_touch_p50_us: Option<f64>,
    pub faults: u64,
}

/// The report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct FaultCostReport {
    pub mem_mib: u64,
    pub pages: u64,
    pub reps: usize,
    pub pinned: bool,
    pub results: Vec<VariantResult>,
    /// CONTINUE (default and best variant) / kernel page-cache fault.
    pub continue_over_kernel_pagecache: f64,
    pub best_continue_over_kernel_pagecache: f64,
    /// CONTINUE / kernel fresh-page fault.
    pub continue_over_kernel_fresh: f64,
    pub best_continue_over_kernel_fresh: f64,
    /// COPY / CONTINUE (default variants, and best of each).
    pub copy_over_continue: f64,
    pub best_copy_over_best_continue: f64,
    /// The ratios from the fastest runs (`per_fault_min_us`), default
    /// variants: CONTINUE / kernel page-cache, CONTINUE / kernel fresh,
    /// COPY / CONTINUE.
    pub min_continue_over_kernel_pagecache: f64,
    pub min_continue_over_kernel_fresh: f64,
    pub min_copy_over_continue: f64,
    /// The ratios of the host-touch p50s (default variants).
    pub host_continue_over_kernel_pagecache: f64,
    pub host_continue_over_kernel_fresh: f64,
    pub host_copy_over_continue: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{variant}: {source}")]
    Run {
        variant: &'static str,
        #[source]
        source: TouchError,
    },
    #[error("{variant}: wrong checksum")]
    Checksum { variant: &'static str },
    #[error("hugepages: {0}")]
    Pool(#[source] notifier::Error),
    #[error("pinning the vCPU thread: {0}")]
    Pin(#[source] std::io::Error),
    #[error("--reps must be at least 1")]
    NoReps,
    #[error("{variant} (host touch): {reason}")]
    HostTouch {
        variant: &'static str,
        reason: String,
    },
}

/// Host-observed first touches: a thread of ours reads one byte of each
/// huge page of fresh guest RAM served as `var` says; ns per touch.
fn host_touch(mem: u64, var: &Variant, pin: bool) -> Result<Vec<u64>, BenchError> {
    let err = |e: &dyn std::fmt::Display| BenchError::HostTouch {
        variant: var.name,
        reason: e.to_string(),
    };
    let ram = UffdGuestRam::new(
        mem,
        Backing::SharedMemfd(PageSize::Size2M),
        var.mode,
        Subscribers::new(),
        false,
    )
    .map_err(|e| err(&e))?;
    let ram = Arc::new(ram);
    let size = ram.size();
    let (_, tdp) = tdp_mmu(&ram).map_err(|e| err(&e))?;
    let stop = Arc::new(AtomicBool::new(false));
    let thread = if var.mode.uses_uffd() {
        let opts = FaultOptions {
            spin: var.spin,
            wake_early: var.wake_early,
            cpu: pin.then_some(1),
            fault_around: 0,
        };
        Some(fault::spawn(ram.clone(), tdp.clone(), stop.clone(), opts).map_err(|e| err(&e))?)
    } else {
        None
    };
    let page = ram.page_bytes();
    let mut ns = Vec::with_capacity(u64_to_usize(size / page));
    for p in 0..size / page {
        let a = ram.guest_hva() + p * page;
        let t = Instant::now();
        // SAFETY: `a` is inside the guest-facing mapping, alive as long as
        // `ram`; a volatile one-byte read (the first touch of its page).
        unsafe { std::ptr::read_volatile(a as *const u8) };
        ns.push(duration_ns(t.elapsed()));
    }
    stop.store(true, Ordering::Release);
    if let Some(t) = thread {
        crate::thread::join("uffd-fault", t.handle)
            .map_err(|e| err(&e))?
            .map_err(|e| err(&e))?;
    }
    Ok(ns)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Run the benchmark.
pub fn fault_cost(a: &FaultCostArgs) -> Result<FaultCostReport, BenchError> {
    if a.reps == 0 {
        return Err(BenchError::NoReps);
    }
    let page = PageSize::Size2M.bytes();
    let _pool = if a.reserve_hugepages {
        Some(
            HugepageReservation::require(PageSize::Size2M, a.mem / page)
                .map_err(BenchError::Pool)?,
        )
    } else {
        None
    };
    if a.pin {
        pin_to_cpu(0).map_err(BenchError::Pin)?;
    }
    let args = |var: &Variant| {
        let mut r = TouchArgs::new(a.mem, var.mode);
        r.passes = 1;
        r.stride = page;
        r.prefault = var.prefault;
        r.spin_faults = var.spin;
        r.wake_early = var.wake_early;
        r.fault_around = var.fault_around;
        r.fault_cpu = a.pin.then_some(1);
        r.events = "none".parse::<EventSources>().unwrap_or_default();
        r
    };
    let pages = TouchArgs::new(a.mem, UffdMode::Minor).params().ws_size / page;
    let mut run_s = vec![Vec::new(); VARIANTS.len()];
    let mut p50 = vec![Vec::new(); VARIANTS.len()];
    let mut pop = vec![Vec::new(); VARIANTS.len()];
    let mut faults = vec![0u64; VARIANTS.len()];
    let mut host = vec![Vec::new(); VARIANTS.len()];
    for _ in 0..a.reps {
        for (i, var) in VARIANTS.iter().enumerate() {
            let r = touch::run(&args(var)).map_err(|source| BenchError::Run {
                variant: var.name,
                source,
            })?;
            if !r.checksum_ok {
                return Err(BenchError::Checksum { variant: var.name });
            }
            run_s[i].push(r.guest_run_s);
            if !var.prefault && var.fault_around == 0 {
                let ns = host_touch(a.mem, var, a.pin)?;
                host[i].push(Percentiles::from_ns(&ns).p50);
            }
            p50[i].push(r.fault_to_resume_us.p50);
            pop[i].push(r.populate_us.p50);
            faults[i] = r.faults;
        }
    }
    let warm = median(&mut run_s[0]);
    let warm_min = run_s[0][0]; // sorted by `median`
    let results: Vec<VariantResult> = VARIANTS
        .iter()
        .enumerate()
        .map(|(i, var)| {
            let t = median(&mut run_s[i]);
            let t_min = run_s[i][0];
            VariantResult {
                variant: *var,
                run_s: t,
                per_fault_us: if var.prefault {
                    0.0
                } else {
                    ((t - warm) / pages as f64 * 1e6).max(0.0)
                },
                per_fault_min_us: if var.prefault {
                    0.0
                } else {
                    ((t_min - warm_min) / pages as f64 * 1e6).max(0.0)
                },
                handler_p50_us: median(&mut p50[i]),
                populate_p50_us: median(&mut pop[i]),
                host_touch_p50_us: (!host[i].is_empty()).then(|| median(&mut host[i])),
                faults: faults[i],
            }
        })
        .collect();
    let cost = |name: &str| {
        results
            .iter()
            .find(|r| r.variant.name == name)
            .map(|r| r.per_fault_us.max(1e-3))
            .unwrap_or(f64::NAN)
    };
    let best = |mode: UffdMode| {
        results
            .iter()
            .filter(|r| r.variant.mode == mode && r.variant.fault_around == 0)
            .map(|r| r.per_fault_us.max(1e-3))
            .fold(f64::INFINITY, f64::min)
    };
    let cost_min = |name: &str| {
        results
            .iter()
            .find(|r| r.variant.name == name)
            .map(|r| r.per_fault_min_us.max(1e-3))
            .unwrap_or(f64::NAN)
    };
    let (kpc_min, kfresh_min) = (
        cost_min("kernel, page-cache page"),
        cost_min("kernel, fresh page"),
    );
    let (cont_min, copy_min) = (cost_min("CONTINUE"), cost_min("COPY"));
    let host_cost = |name: &str| {
        results
            .iter()
            .find(|r| r.variant.name == name)
            .and_then(|r| r.host_touch_p50_us)
            .unwrap_or(f64::NAN)
    };
    let (hkpc, hkfresh) = (
        host_cost("kernel, page-cache page"),
        host_cost("kernel, fresh page"),
    );
    let (hcont, hcopy) = (host_cost("CONTINUE"), host_cost("COPY"));
    let (kpc, kfresh) = (cost("kernel, page-cache page"), cost("kernel, fresh page"));
    let (cont, copy) = (cost("CONTINUE"), cost("COPY"));
    let (best_cont, best_copy) = (best(UffdMode::Minor), best(UffdMode::Missing));
    Ok(FaultCostReport {
        mem_mib: a.mem >> 20,
        pages,
        reps: a.reps,
        pinned: a.pin,
        continue_over_kernel_pagecache: cont / kpc,
        best_continue_over_kernel_pagecache: best_cont / kpc,
        continue_over_kernel_fresh: cont / kfresh,
        best_continue_over_kernel_fresh: best_cont / kfresh,
        copy_over_continue: copy / cont,
        best_copy_over_best_continue: best_copy / best_cont,
        min_continue_over_kernel_pagecache: cont_min / kpc_min,
        min_continue_over_kernel_fresh: cont_min / kfresh_min,
        min_copy_over_continue: copy_min / cont_min,
        host_continue_over_kernel_pagecache: hcont / hkpc,
        host_continue_over_kernel_fresh: hcont / hkfresh,
        host_copy_over_continue: hcopy / hcont,
        results,
    })
}

impl Report for FaultCostReport {
    fn text(&self) -> String {
        use std::fmt::Write as _;
        let r = self;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "guest-observed cost per 2 MiB first touch: {} MiB guest, {} pages, median of {}{}",
            r.mem_mib,
            r.pages,
            r.reps,
            if r.pinned { ", pinned" } else { "" }
        );
        let _ = writeln!(
            out,
            "| variant | guest run (ms) | guest: per first touch (us) | fastest run: per first touch (us) | host touch p50 (us) | handler p50 (us) | CONTINUE/COPY p50 (us) | faults |"
        );
        let _ = writeln!(out, "|---|---|---|---|---|---|---|---|");
        for v in &r.results {
            let _ = writeln!(
                out,
                "| {} | {:.2} | {:.1} | {:.1} | {} | {:.1} | {:.1} | {} |",
                v.variant.name,
                v.run_s * 1e3,
                v.per_fault_us,
                v.per_fault_min_us,
                v.host_touch_p50_us
                    .map(|x| format!("{x:.1}"))
                    .unwrap_or_else(|| "-".into()),
                v.handler_p50_us,
                v.populate_p50_us,
                v.faults
            );
        }
        let _ = writeln!(
            out,
            "CONTINUE / kernel page-cache fault: {:.2}x (best variant {:.2}x); \
             CONTINUE / kernel fresh-page fault: {:.2}x (best {:.2}x); \
             COPY / CONTINUE: {:.1}x (best / best {:.1}x)",
            r.continue_over_kernel_pagecache,
            r.best_continue_over_kernel_pagecache,
            r.continue_over_kernel_fresh,
            r.best_continue_over_kernel_fresh,
            r.copy_over_continue,
            r.best_copy_over_best_continue
        );
        let _ = writeln!(
            out,
            "fastest runs: CONTINUE / kernel page-cache fault {:.2}x; CONTINUE / kernel \
             fresh-page fault {:.2}x; COPY / CONTINUE {:.1}x",
            r.min_continue_over_kernel_pagecache,
            r.min_continue_over_kernel_fresh,
            r.min_copy_over_continue
        );
        let _ = writeln!(
            out,
            "host touch p50: CONTINUE / kernel page-cache fault {:.2}x; CONTINUE / kernel \
             fresh-page fault {:.2}x; COPY / CONTINUE {:.1}x",
            r.host_continue_over_kernel_pagecache,
            r.host_continue_over_kernel_fresh,
            r.host_copy_over_continue
        );
        let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
        let _ = writeln!(
            out,
            "targets (guest-observed, medians): CONTINUE <= 3x kernel page-cache fault: {} \
             (best variant: {}); CONTINUE <= 3x kernel fresh-page fault: {}; \
             COPY >= 5x CONTINUE: {}",
            verdict(r.continue_over_kernel_pagecache <= 3.0),
            verdict(r.best_continue_over_kernel_pagecache <= 3.0),
            verdict(r.continue_over_kernel_fresh <= 3.0),
            verdict(r.copy_over_continue >= 5.0)
        );
        let _ = writeln!(
            out,
            "targets (host touch p50): CONTINUE <= 3x kernel page-cache fault: {}; \
             CONTINUE <= 3x kernel fresh-page fault: {}; COPY >= 5x CONTINUE: {}",
            verdict(r.host_continue_over_kernel_pagecache <= 3.0),
            verdict(r.host_continue_over_kernel_fresh <= 3.0),
            verdict(r.host_copy_over_continue >= 5.0)
        );
        out
    }
    fn json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }
    /// A benchmark reports figures; its targets are not a verdict.
    fn ok(&self) -> bool {
        true
    }
}

/// `vmm bench ...`: print the table (and the JSON line with `--json`).
pub fn main(args: BenchArgs) -> ExitCode {
    let BenchCmd::FaultCost(a) = args.cmd;
    cli::conclude("vmm bench fault-cost", a.json, fault_cost(&a), None)
}
