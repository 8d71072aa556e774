//! `vmm run --guest builtin`: the built-in CPL3 guest on userfaultfd-served
//! hugetlb RAM whose every page goes through the project's TDP MMU.
//!
//! No guest kernel: the VMM writes [`guests::builtin::system_image`] (GDT,
//! TSS, identity page tables with U/S, the program, params), starts the vCPU
//! in long mode directly at CPL3, and handles the guest's progress and done
//! doorbells (MMIO stores). Faults on guest RAM are served by
//! [`crate::uffd_fault`]. Between passes (the vCPU stopped in a progress
//! exit), [`crate::run_inval`] can run host invalidations and the
//! MMU-vs-pagemap agreement check. While it runs, the kernel-side sources
//! of [`crate::host_events`] (userfaultfd REMOVE/UNMAP/REMAP, the
//! `kvm:kvm_unmap_hva_range` tracepoint) deliver invalidations the VMM did
//! not issue itself, e.g. a `--bystander-us` thread's raw madvise/mprotect.

use crate::boot::parse_size;
use crate::builtin_vm::{BuiltinVm, BuiltinVmError, Watchdog};
use crate::guest_ram_uffd::{UffdGuestRam, UffdMode, UffdRamError};
use crate::host_events::{self, Bystander, EventSources, EventsReport, TracePump};
use crate::kvm;
use crate::run_inval::{InvalKind, Invalidator};
use crate::uffd_fault::{self, FaultOptions, FaultThreadError, LatencyUs};
use guests::builtin::{self, GuestResult, Params, Pattern, LAYOUT};
use kvm_ioctls::VcpuExit;
use mmu::MmuStatsSnapshot;
use notifier::PageSize;
use notifier::Subscribers;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Arguments of `vmm run`.
#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// The guest: `builtin`, or `linux` (the `vmm boot` guest; see `crate::run_linux`).
    #[arg(long, default_value = "builtin")]
    pub guest: String,
    /// Guest RAM size (e.g. 256M, 2G; bare numbers are MiB).
    #[arg(long, default_value = "2G", value_parser = parse_size)]
    pub mem: u64,
    /// hugetlb page size backing guest RAM: 2M or 1G.
    #[arg(long, default_value = "2M", value_parser = crate::memory::parse_hugepages)]
    pub hugepages: PageSize,
    /// How faults are resolved: minor (UFFDIO_CONTINUE), missing
    /// (UFFDIO_COPY), or the baselines without userfaultfd: kernel (the
    /// kernel's own hugetlb first touch), kernel-prefilled (page cache
    /// populated first).
    #[arg(long, default_value = "minor")]
    pub uffd: UffdMode,
    /// Passes over the working set.
    #[arg(long, default_value_t = 3)]
    pub passes: u64,
    /// Working-set size (default: all RAM above the first 2 MiB).
    #[arg(long, value_parser = parse_size)]
    pub ws: Option<u64>,
    /// Bytes between touched 8-byte slots (multiple of 8).
    #[arg(long, default_value_t = 4096)]
    pub stride: u64,
    /// Visit order: seq or lcg.
    #[arg(long, default_value = "seq")]
    pub pattern: Pattern,
    /// LCG seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Host invalidation run between passes on part of the guest-facing
    /// mapping: none, protect, write-protect, discard, punch-hole, mixed.
    #[arg(long, default_value = "none")]
    pub invalidate: InvalKind,
    /// Invalidations per pass boundary.
    #[arg(long, default_value_t = 1)]
    pub inval_per_pass: u64,
    /// After each invalidation (and at the end), check that the MMU's
    /// mapped gfns agree with PAGEMAP_SCAN of the guest-facing mapping.
    #[arg(long)]
    pub verify: bool,
    /// Fault all guest RAM in before the guest runs (only with
    /// --uffd kernel*): the no-fault baseline.
    #[arg(long)]
    pub prefault: bool,
    /// While the guest runs, discard a random run of huge pages every this
    /// many microseconds (0: off; only with --uffd minor/kernel-prefilled,
    /// where the data survives): faults race invalidations and retry.
    #[arg(long, default_value_t = 0)]
    pub race_discard_us: u64,
    /// The fault thread busy-polls the userfaultfd instead of sleeping in
    /// poll(2) (costs a CPU; removes the handler's wake-up latency).
    #[arg(long)]
    pub spin_faults: bool,
    /// Resolve faults with a CONTINUE/COPY that wakes the vCPU itself,
    /// before the MMU installs its SPTE (one ioctl instead of two).
    #[arg(long)]
    pub wake_early: bool,
    /// Pin the fault thread to this CPU.
    #[arg(long)]
    pub fault_cpu: Option<usize>,
    /// After resolving a fault, map this many following huge pages ahead
    /// (populate + SPTE) while the vCPU runs (0: off).
    #[arg(long, default_value_t = 0)]
    pub fault_around: u64,
    /// Kernel-side invalidation sources feeding the MMU while the guest
    /// runs: auto (each where available), none, or a list of uffd
    /// (REMOVE/UNMAP/REMAP messages) and trace (kvm:kvm_unmap_hva_range).
    #[arg(long, default_value = "auto")]
    pub events: EventSources,
    /// A bystander thread issues raw madvise/mprotect on guest RAM (not
    /// through the VMM's host-mm model) every this many microseconds while
    /// the guest runs, and MADV_REMOVE + mprotect(PROT_READ) at pass
    /// boundaries (0: off).
    #[arg(long, default_value_t = 0)]
    pub bystander_us: u64,
    /// Print the JSON report as the last stdout line.
    #[arg(long)]
    pub json: bool,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
    /// The KVM device.
    #[arg(long, default_value = "/dev/kvm", hide = true)]
    pub kvm_dev: PathBuf,
    #[command(flatten)]
    pub linux: crate::run_linux::LinuxArgs,
}

impl RunArgs {
    /// Defaults, for library callers.
    pub fn new(mem: u64, uffd: UffdMode) -> Self {
        RunArgs {
            guest: "builtin".into(),
            mem,
            hugepages: PageSize::Size2M,
            uffd,
            passes: 3,
            ws: None,
            stride: 4096,
            pattern: Pattern::Sequential,
            seed: 1,
            invalidate: InvalKind::None,
            inval_per_pass: 1,
            verify: false,
            prefault: false,
            spin_faults: false,
            race_discard_us: 0,
            wake_early: false,
            fault_cpu: None,
            fault_around: 0,
            events: EventSources::default(),
            bystander_us: 0,
            json: false,
            timeout: 300,
            kvm_dev: "/dev/kvm".into(),
            linux: Default::default(),
        }
    }

    /// The guest's params for these arguments.
    pub fn params(&self) -> Params {
        let base = LAYOUT.ws_min;
        Params {
            ws_base: base,
            ws_size: self.ws.unwrap_or(self.mem.saturating_sub(base)),
            stride: self.stride,
            passes: self.passes,
            pattern: self.pattern,
            seed: self.seed,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("unknown guest {0:?}: `builtin` or `linux`")]
    UnknownGuest(String),
    #[error(transparent)]
    Kvm(#[from] kvm::KvmError),
    #[error(transparent)]
    Guest(#[from] builtin::BuiltinError),
    #[error(transparent)]
    Ram(#[from] UffdRamError),
    #[error(transparent)]
    Memslot(#[from] mmu::memslot::MemslotError),
    #[error("fault thread: {0}")]
    Fault(#[from] FaultThreadError),
    #[error("fault thread panicked")]
    FaultPanic,
    #[error("guest stopped unexpectedly: {exit} at rip {rip:#x}")]
    Exit { exit: String, rip: u64 },
    #[error("guest did not finish within {0} s")]
    Timeout(u64),
    #[error("invalidation: {0}")]
    Inval(#[from] crate::run_inval::InvalError),
    #[error(transparent)]
    Setup(#[from] BuiltinVmError),
    #[error(transparent)]
    Events(#[from] host_events::EventsError),
    #[error("the fault thread stopped")]
    FaultStopped,
    #[error("the fault thread did not settle within 2 s")]
    Unsettled,
}

/// The `--json` summary.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunReport {
    pub guest: String,
    pub uffd: UffdMode,
    pub mem_mib: u64,
    pub hugepages: String,
    pub params: Params,
    pub faults: u64,
    /// Huge pages mapped ahead by `--fault-around`.
    pub prefetched: u64,
    /// Wake-early faults dropped because their page was removed after the
    /// vCPU had resumed (see `uffd_fault::FaultReport::abandoned`).
    pub abandoned: u64,
    pub fault_retries: u64,
    pub already_present: u64,
    pub spurious: u64,
    pub fault_to_resume_us: LatencyUs,
    /// Time in UFFDIO_CONTINUE/COPY per fault attempt.
    pub populate_us: LatencyUs,
    pub stats: MmuStatsSnapshot,
    pub result: GuestResult,
    pub expected_checksum: u64,
    pub expected_touches: u64,
    pub checksum_ok: bool,
    pub progress_exits: u64,
    pub invalidations: u64,
    /// Discards that raced the running guest (`--race-discard-us`).
    pub race_invalidations: u64,
    pub verify_checks: u64,
    pub verify_failures: u64,
    pub verify_mismatches: Vec<String>,
    /// Kernel-side invalidation sources and the bystander.
    pub events: EventsReport,
    pub guest_run_s: f64,
    pub total_s: f64,
}

impl RunReport {
    /// Whether the run is a success.
    pub fn ok(&self) -> bool {
        self.checksum_ok
            && self.verify_failures == 0
            && self.result.done
            && self
                .events
                .bystander
                .as_ref()
                .is_none_or(|b| b.zap_timeouts == 0)
    }
}

/// Run the built-in guest once.
pub fn run(args: &RunArgs) -> Result<RunReport, RunError> {
    let t_start = Instant::now();
    if args.guest != "builtin" {
        return Err(RunError::UnknownGuest(args.guest.clone()));
    }
    let params = args.params();
    let image = builtin::system_image(&params, args.mem)?;
    let kvm = kvm::open(&args.kvm_dev)?;

    let subs = Subscribers::new();
    let mut ram = UffdGuestRam::with_events(
        args.mem,
        args.hugepages,
        args.uffd,
        subs.clone(),
        args.events.uffd,
    )?;
    ram.load(0, &image)?;
    if args.prefault {
        ram.prefault()?;
    }
    let ram = Arc::new(ram);
    let size = ram.size();
    // Host invalidations of guest RAM reach the MMU: Subscribers ->
    // KvmMmuNotifier -> TDP zap.
    let (ctx, tdp) = uffd_fault::tdp_mmu_for(&ram, &subs)?;
    let mut inval = Invalidator::new(
        &ram,
        &tdp,
        args.invalidate,
        args.verify,
        params.ws_base,
        params.ws_size,
    )?;

    // A discard-picking invalidator over the working set, not verifying.
    let discarder = || {
        Invalidator::new(
            &ram,
            &tdp,
            InvalKind::Discard,
            false,
            params.ws_base,
            params.ws_size,
        )
    };
    let racer = if args.race_discard_us > 0 {
        if !args.uffd.prefilled() {
            return Err(crate::run_inval::InvalError::RaceNeedsPrefill.into());
        }
        Some(discarder()?)
    } else {
        None
    };
    let mut events = EventsReport {
        sources: Some(args.events),
        ..EventsReport::default()
    };
    let bystander_picker = if args.bystander_us > 0 {
        Some(discarder()?)
    } else {
        None
    };
    let trace = if args.events.trace {
        match TracePump::start(subs.clone(), tdp.clone(), Duration::from_millis(2)) {
            Ok(p) => Some(p),
            Err(e) if args.events.auto => {
                events.trace_unavailable = Some(e.to_string());
                None
            }
            Err(e) => return Err(e.into()),
        }
    } else {
        None
    };
    let stop = Arc::new(AtomicBool::new(false));
    let fault_thread = uffd_fault::spawn_with(
        ram.clone(),
        tdp.clone(),
        stop.clone(),
        FaultOptions {
            spin: args.spin_faults,
            wake_early: args.wake_early,
            cpu: args.fault_cpu,
            fault_around: args.fault_around,
        },
    );
    let settle = fault_thread.progress.clone();
    let mut bystander_zeroed = Vec::new();
    let mut bystander_report = None;

    let result = (|| -> Result<(u64, f64, u64), RunError> {
        let mut bvm = BuiltinVm::new(&kvm, ram.clone())?;
        let watchdog = Watchdog::start(Duration::from_secs(args.timeout), settle.failed())?;
        let race_stop = Arc::new(AtomicBool::new(false));
        let racer = racer.map(|inv| {
            crate::run_inval::spawn_racer(
                inv,
                Duration::from_micros(args.race_discard_us),
                race_stop.clone(),
            )
        });
        let stop_racer = |racer: Option<std::thread::JoinHandle<_>>| -> Result<u64, RunError> {
            race_stop.store(true, Ordering::Release);
            match racer {
                None => Ok(0),
                Some(h) => Ok(h.join().map_err(|_| RunError::FaultPanic)??),
            }
        };
        let mut racer = racer;
        let mut bystander = bystander_picker.map(|picker| {
            Bystander::start(
                ram.clone(),
                tdp.clone(),
                picker,
                Duration::from_micros(args.bystander_us),
                trace.is_some(),
            )
        });
        let t_run = Instant::now();
        let mut progress = 0u64;
        loop {
            let exit = bvm.vcpu.run();
            if settle.failed().load(Ordering::Acquire) {
                return Err(RunError::FaultStopped);
            }
            if watchdog.fired() {
                let _ = stop_racer(racer.take());
                if let Some(b) = bystander.take() {
                    let _ = b.finish();
                }
                return Err(RunError::Timeout(args.timeout));
            }
            match exit {
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    if addr == LAYOUT.progress_mmio {
                        progress += 1;
                        let mut w = [0u8; 4];
                        let n = data.len().min(4);
                        w[..n].copy_from_slice(&data[..n]);
                        let passes_done = u64::from(u32::from_le_bytes(w));
                        if passes_done < params.passes {
                            if let Some(b) = &bystander {
                                // Raw invalidations behind the VMM's back;
                                // the check runs once their events landed.
                                bystander_zeroed.extend(b.pause_at_boundary(passes_done)?);
                                if !settle.settle(Duration::from_secs(2)) {
                                    return Err(RunError::Unsettled);
                                }
                                inval.verify_now()?;
                            }
                            inval.between_passes(passes_done, args.inval_per_pass)?;
                            if let Some(b) = &bystander {
                                b.resume();
                            }
                        }
                    } else if addr == LAYOUT.done_mmio {
                        break;
                    }
                }
                Ok(VcpuExit::MmioRead(_, data)) => data.fill(0),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                Ok(other) => {
                    let what = format!("{other:?}");
                    let (exit, rip) = bvm.describe_exit(what);
                    return Err(RunError::Exit { exit, rip });
                }
                Err(e) => {
                    let rip = bvm.vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
                    return Err(RunError::Exit {
                        exit: format!("KVM_RUN: {e}"),
                        rip,
                    });
                }
            }
        }
        let run_s = t_run.elapsed().as_secs_f64();
        let raced = stop_racer(racer.take())?;
        if let Some(b) = bystander.take() {
            bystander_report = Some(b.finish()?);
            if !settle.settle(Duration::from_secs(2)) {
                return Err(RunError::Unsettled);
            }
        }
        drop(watchdog);
        inval.final_check()?;
        Ok((progress, run_s, raced))
    })();

    stop.store(true, Ordering::Release);
    let faults = fault_thread
        .handle
        .join()
        .map_err(|_| RunError::FaultPanic)?;
    let trace = trace.map(TracePump::finish).transpose();
    let faults = faults?; // the root cause when the run stopped for it
    let (progress_exits, guest_run_s, race_invalidations) = result?;
    events.trace = trace?;
    events.uffd = ram.events().then_some(faults.events);
    events.uffd_eagain = faults.eagain;
    events.bystander = bystander_report;

    let result = GuestResult::from_words(ram.read_u64s::<4>(LAYOUT.result)?);
    let mut zeroed = inval.zeroed().to_vec();
    zeroed.extend(bystander_zeroed);
    let (expected_checksum, expected_touches) = builtin::expected(&params, &zeroed)?;
    let checksum_ok = result.done
        && result.checksum == expected_checksum
        && result.touches == expected_touches
        && result.passes_done == params.passes;
    Ok(RunReport {
        guest: args.guest.clone(),
        uffd: args.uffd,
        mem_mib: size >> 20,
        hugepages: crate::memory::hugepages_name(args.hugepages),
        params,
        faults: faults.faults,
        prefetched: faults.prefetched,
        abandoned: faults.abandoned,
        fault_retries: faults.fault_retries,
        already_present: faults.already_present,
        spurious: faults.spurious,
        fault_to_resume_us: LatencyUs::from_ns(&faults.fault_to_resume_ns),
        populate_us: LatencyUs::from_ns(&faults.populate_ns),
        stats: ctx.stats.snapshot(),
        result,
        expected_checksum,
        expected_touches,
        checksum_ok,
        progress_exits,
        invalidations: inval.count(),
        race_invalidations,
        verify_checks: inval.checks(),
        verify_failures: inval.failures(),
        verify_mismatches: inval.mismatches.clone(),
        events,
        guest_run_s,
        total_s: t_start.elapsed().as_secs_f64(),
    })
}

/// `vmm run`: print a summary (and the JSON line with `--json`).
pub fn main(args: RunArgs) -> ExitCode {
    if args.guest == "linux" {
        return crate::run_linux::main(&args);
    }
    match run(&args) {
        Ok(r) => {
            let l = r.fault_to_resume_us;
            println!(
                "builtin guest, {} MiB {} hugetlb, uffd {}: {} faults ({} retries), \
                 fault-to-resume p50 {:.1} us p99 {:.1} us max {:.1} us; \
                 {} touches in {:.3} s; checksum {} ({:#x}); {} invalidations, \
                 {} verify checks, {} failures; pf_taken {} pf_fixed {}",
                r.mem_mib,
                r.hugepages,
                r.uffd,
                r.faults,
                r.fault_retries,
                l.p50,
                l.p99,
                l.max,
                r.result.touches,
                r.guest_run_s,
                if r.checksum_ok { "ok" } else { "MISMATCH" },
                r.result.checksum,
                r.invalidations,
                r.verify_checks,
                r.verify_failures,
                r.stats.pf_taken,
                r.stats.pf_fixed,
            );
            let e = &r.events;
            if let Some(u) = &e.uffd {
                println!(
                    "uffd events: {} remove, {} unmap, {} remap ({} EAGAIN retries); \
                     {} in guest RAM, {} zapped SPTEs ({} leaves)",
                    u.remove,
                    u.unmap,
                    u.remap,
                    e.uffd_eagain,
                    u.delivered.in_guest_ram,
                    u.delivered.zapping,
                    u.delivered.leaves_zapped
                );
            }
            match (&e.trace, &e.trace_unavailable) {
                (Some(t), _) => println!(
                    "tracepoint: {} invalidations, {} in guest RAM, {} zapped SPTEs ({} leaves)",
                    t.events, t.in_guest_ram, t.zapping, t.leaves_zapped
                ),
                (None, Some(why)) => println!("tracepoint: unavailable ({why})"),
                _ => {}
            }
            if let Some(b) = &e.bystander {
                println!(
                    "bystander: {} discards + {} mprotect pairs while running, {} MADV_REMOVE + \
                     {} mprotect(PROT_READ) at boundaries; {} zaps proven, {} zap timeouts",
                    b.concurrent_discards,
                    b.concurrent_protects,
                    b.boundary_removes,
                    b.boundary_protects,
                    b.zaps_proven,
                    b.zap_timeouts
                );
            }
            if args.json {
                match serde_json::to_string(&r) {
                    Ok(s) => println!("{s}"),
                    Err(e) => eprintln!("vmm run: JSON: {e}"),
                }
            }
            if r.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("vmm run: {e}");
            ExitCode::FAILURE
        }
    }
}
