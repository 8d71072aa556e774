//! The built-in touch guest end to end (`vmm run --guest builtin`, and the
//! variants `vmm bench fault-cost` measures): the CPL3 guest on
//! userfaultfd-served hugetlb RAM whose every page goes through the
//! project's TDP MMU.
//!
//! No guest kernel: the VMM writes [`guests::builtin::system_image`] (GDT,
//! TSS, identity page tables with U/S, the program, params) and starts the
//! vCPU at CPL3 ([`crate::machine::builtin`]); its exit handler here reads
//! the guest's progress and done doorbells (MMIO stores). Faults on guest
//! RAM are served by [`crate::memory::fault`]. Between passes (the vCPU
//! stopped in a progress exit), the [`Invalidator`] can run host
//! invalidations and the MMU-vs-pagemap agreement check. While it runs,
//! the kernel-side sources of [`crate::host::events`] (userfaultfd
//! REMOVE/UNMAP/REMAP, the `kvm:kvm_unmap_hva_range` tracepoint) deliver
//! invalidations the VMM did not issue itself, e.g. a `--bystander-us`
//! thread's raw madvise/mprotect.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use guests::builtin::{self, GuestResult, Params, LAYOUT};
use mmu::MmuStatsSnapshot;
use notifier::Subscribers;

mod args;

pub use args::TouchArgs;

use super::{doorbell_u64, BuiltinVm, BuiltinVmError};
use crate::cli::{Guest, Report};
use crate::host::bystander::Bystander;
use crate::host::events::{EventsError, EventsReport, TracePump};
use crate::host::invalidator::{InvalError, InvalKind, Invalidator, Racer};
use crate::machine::linux::reserve_pool;
use crate::memory::fault::{self, FaultOptions, FaultProgress, FaultThreadError};
use crate::memory::mmu::tdp_mmu_for;
use crate::memory::uffd::{UffdGuestRam, UffdMode, UffdRamError};
use crate::report::Percentiles;
use crate::vstate::{kvm, ExitHandler, Handled, KvmError, RunControl, VcpuError};
use guests::builtin::Zeroed;

#[derive(Debug, thiserror::Error)]
pub enum TouchError {
    #[error(transparent)]
    Kvm(#[from] KvmError),
    #[error(transparent)]
    Guest(#[from] builtin::BuiltinError),
    #[error(transparent)]
    Ram(#[from] UffdRamError),
    #[error(transparent)]
    Memslot(#[from] mmu::memslot::MemslotError),
    #[error("--reserve-hugepages: {0}")]
    Reserve(String),
    #[error("fault thread: {0}")]
    Fault(#[from] FaultThreadError),
    #[error(transparent)]
    Panicked(#[from] crate::thread::ThreadPanicked),
    #[error("guest stopped unexpectedly: {exit} at rip {rip:#x}")]
    Exit { exit: String, rip: u64 },
    #[error("the guest rang the progress doorbell with pass {got}, expected pass {expected} (of {passes})")]
    Doorbell {
        got: u64,
        expected: u64,
        passes: u64,
    },
    #[error("the vCPU: {0}")]
    Vcpu(VcpuError),
    #[error("guest did not finish within {0} s")]
    Timeout(u64),
    #[error("invalidation: {0}")]
    Inval(#[from] InvalError),
    #[error(transparent)]
    Setup(#[from] BuiltinVmError),
    #[error(transparent)]
    Events(#[from] EventsError),
    /// The run was stopped because a helper thread died; its own error
    /// (reported first when it has one) says why.
    #[error("a helper thread stopped")]
    HelperStopped,
    #[error("the fault thread did not settle within 2 s")]
    Unsettled,
}

impl TouchError {
    /// A built-in guest's run that ended without its done doorbell.
    /// `stopped`: what a set stop flag means for this run.
    pub fn from_vcpu(e: VcpuError, timeout: u64, stopped: TouchError) -> Self {
        match e {
            VcpuError::TimedOut { .. } => TouchError::Timeout(timeout),
            VcpuError::Stopped { .. } => stopped,
            VcpuError::Unexpected { exit, rip, state } => TouchError::Exit {
                exit: format!("{exit} ({state})"),
                rip,
            },
            VcpuError::Run { rip, source } => TouchError::Exit {
                exit: format!("KVM_RUN: {source}"),
                rip,
            },
            other => TouchError::Vcpu(other),
        }
    }
}

/// The `--json` summary.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TouchReport {
    pub guest: Guest,
    pub uffd: UffdMode,
    pub mem_mib: u64,
    pub hugepages: String,
    /// Guest RAM's backing (`--backing`).
    pub backing: String,
    pub params: Params,
    pub faults: u64,
    /// Huge pages mapped ahead by `--fault-around`.
    pub prefetched: u64,
    /// Wake-early faults dropped because their page was removed after the
    /// vCPU had resumed (see [`crate::memory::fault::FaultReport::abandoned`]).
    pub abandoned: u64,
    pub fault_retries: u64,
    pub already_present: u64,
    pub spurious: u64,
    pub fault_to_resume_us: Percentiles,
    /// Time in UFFDIO_CONTINUE/COPY per fault attempt.
    pub populate_us: Percentiles,
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

impl TouchReport {
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

/// The guest's doorbells: progress after each pass (the VMM's
/// between-pass work runs here, the vCPU stopped in the exit), done at the
/// end.
struct TouchExits<'a> {
    passes: u64,
    per_pass: u64,
    inval: &'a mut Invalidator,
    bystander: Option<&'a Bystander>,
    settle: &'a FaultProgress,
    /// Ranges the bystander zeroed at pass boundaries.
    zeroed: Vec<Zeroed>,
    progress_exits: u64,
    /// The last pass boundary handled.
    last_boundary: u64,
}

/// The pass count a progress doorbell carries, checked: each boundary once,
/// in order, within the run's passes. The guest controls the value; a
/// guest ringing without limit would otherwise make the VMM invalidate
/// (and the checksum model replay) without limit. `Ok(None)`: the last
/// pass (nothing to do between passes).
fn next_boundary(last: u64, passes_done: u64, passes: u64) -> Result<Option<u64>, TouchError> {
    if passes_done != last + 1 || passes_done > passes {
        return Err(TouchError::Doorbell {
            got: passes_done,
            expected: last + 1,
            passes,
        });
    }
    Ok((passes_done < passes).then_some(passes_done))
}

impl TouchExits<'_> {
    fn between_passes(&mut self, passes_done: u64) -> Result<(), TouchError> {
        let Some(passes_done) = next_boundary(self.last_boundary, passes_done, self.passes)? else {
            self.last_boundary = passes_done;
            return Ok(());
        };
        self.last_boundary = passes_done;
        if let Some(b) = self.bystander {
            // Raw invalidations behind the VMM's back; the check runs once
            // their events landed.
            self.zeroed.extend(b.pause_at_boundary(passes_done)?);
            if !self.settle.settle(Duration::from_secs(2)) {
                return Err(TouchError::Unsettled);
            }
            self.inval.verify_now()?;
        }
        self.inval.between_passes(passes_done, self.per_pass)?;
        if let Some(b) = self.bystander {
            b.resume();
        }
        Ok(())
    }
}

impl ExitHandler for TouchExits<'_> {
    type Stop = Result<(), TouchError>;

    fn mmio_write(&mut self, addr: u64, data: &[u8]) -> Handled<Self::Stop> {
        if addr == LAYOUT.progress_mmio {
            self.progress_exits += 1;
            // The guest stores a 32-bit pass count.
            let passes_done = doorbell_u64(data) & 0xffff_ffff;
            if let Err(e) = self.between_passes(passes_done) {
                return Handled::Stop(Err(e));
            }
        } else if addr == LAYOUT.done_mmio {
            return Handled::Stop(Ok(()));
        }
        Handled::Continue
    }

    fn mmio_read(&mut self, _addr: u64, data: &mut [u8]) -> Handled<Self::Stop> {
        data.fill(0);
        Handled::Continue
    }
}

/// Run the built-in guest once.
pub fn run(args: &TouchArgs) -> Result<TouchReport, TouchError> {
    let t_start = Instant::now();
    let params = args.params();
    let image = builtin::system_image(&params, args.mem)?;
    let kvm = kvm::open(&args.kvm_dev)?;
    // Dropped after the RAM: the pool shrinks back once the pages are gone.
    let backing = args.backing();
    let _pool = reserve_pool(
        args.reserve_hugepages && backing.is_hugetlb(),
        args.mem,
        backing.page_size(),
    )
    .map_err(|e| TouchError::Reserve(e.to_string()))?;

    let subs = Subscribers::new();
    let mut ram = UffdGuestRam::new(args.mem, backing, args.uffd, subs.clone(), args.events.uffd)?;
    ram.load(0, &image)?;
    if args.prefault {
        ram.prefault()?;
    }
    let ram = Arc::new(ram);
    let size = ram.size();
    // Host invalidations of guest RAM reach the MMU: Subscribers ->
    // KvmMmuNotifier -> TDP zap.
    let (ctx, tdp) = tdp_mmu_for(&ram, &subs)?;
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
            return Err(InvalError::RaceNeedsPrefill.into());
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
    let fault_thread = fault::spawn(
        ram.clone(),
        tdp.clone(),
        stop.clone(),
        FaultOptions {
            spin: args.spin_faults,
            wake_early: args.wake_early,
            cpu: args.fault_cpu,
            fault_around: args.fault_around,
        },
    )?;
    let settle = fault_thread.progress.clone();
    let mut bystander_zeroed = Vec::new();
    let mut bystander_report = None;

    let result = (|| -> Result<(u64, f64, u64), TouchError> {
        let mut bvm = BuiltinVm::new(&kvm, ram.clone())?;
        let racer = Racer::start(racer, Duration::from_micros(args.race_discard_us))?;
        let bystander = bystander_picker
            .map(|picker| {
                Bystander::start(
                    ram.clone(),
                    tdp.clone(),
                    picker,
                    Duration::from_micros(args.bystander_us),
                    trace.is_some(),
                )
            })
            .transpose()?;
        let mut exits = TouchExits {
            passes: params.passes,
            per_pass: args.inval_per_pass,
            inval: &mut inval,
            bystander: bystander.as_ref(),
            settle: &settle,
            zeroed: Vec::new(),
            progress_exits: 0,
            last_boundary: 0,
        };
        // A dead helper thread stops the run: a dead fault thread leaves
        // the vCPU asleep in a fault, a dead tracepoint pump leaves
        // invalidations unheard.
        let mut ctl = RunControl::timeout(Duration::from_secs(args.timeout))
            .stop_on(settle.failed())
            .stop_on(racer.failed());
        for f in [
            trace.as_ref().map(TracePump::failed),
            bystander.as_ref().map(Bystander::failed),
        ]
        .into_iter()
        .flatten()
        {
            ctl = ctl.stop_on(f);
        }
        let t_run = Instant::now();
        let ran = bvm.vcpu.run(&mut exits, &ctl);
        let run_s = t_run.elapsed().as_secs_f64();
        let progress = exits.progress_exits;
        bystander_zeroed = std::mem::take(&mut exits.zeroed);
        drop(exits);
        // The helpers' own errors first: one of them is why a run stopped.
        let raced = racer.finish()?;
        if let Some(b) = bystander {
            bystander_report = Some(b.finish()?);
        }
        match ran {
            Ok(r) => r?,
            Err(e) => {
                return Err(TouchError::from_vcpu(
                    e,
                    args.timeout,
                    TouchError::HelperStopped,
                ))
            }
        }
        if bystander_report.is_some() && !settle.settle(Duration::from_secs(2)) {
            return Err(TouchError::Unsettled);
        }
        inval.final_check()?;
        Ok((progress, run_s, raced))
    })();

    stop.store(true, Ordering::Release);
    let faults = crate::thread::join("uffd-fault", fault_thread.handle)?;
    let trace = trace.map(TracePump::finish).transpose();
    // The helpers' errors first: the root cause when the run stopped for
    // one of them.
    let faults = faults?;
    events.trace = trace?;
    let (progress_exits, guest_run_s, race_invalidations) = result?;
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
    Ok(TouchReport {
        guest: Guest::Builtin,
        uffd: args.uffd,
        mem_mib: size >> 20,
        hugepages: crate::memory::hugepages_name(args.backing().page_size()),
        backing: args.backing().to_string(),
        params,
        faults: faults.faults,
        prefetched: faults.prefetched,
        abandoned: faults.abandoned,
        fault_retries: faults.fault_retries,
        already_present: faults.already_present,
        spurious: faults.spurious,
        fault_to_resume_us: Percentiles::from_ns(&faults.fault_to_resume_ns),
        populate_us: Percentiles::from_ns(&faults.populate_ns),
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

impl Report for TouchReport {
    fn text(&self) -> String {
        let r = self;
        let l = r.fault_to_resume_us;
        let mut out = format!(
            "builtin guest, {} MiB {} hugetlb, uffd {}: {} faults ({} retries), \
             fault-to-resume p50 {:.1} us p99 {:.1} us max {:.1} us; \
             {} touches in {:.3} s; checksum {} ({:#x}); {} invalidations, \
             {} verify checks, {} failures; pf_taken {} pf_fixed {}\n",
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
            out += &format!(
                "uffd events: {} remove, {} unmap, {} remap ({} EAGAIN retries); \
                 {} in guest RAM, {} zapped SPTEs ({} leaves)\n",
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
            (Some(t), _) => {
                out += &format!(
                    "tracepoint: {} invalidations, {} in guest RAM, {} zapped SPTEs ({} leaves)\n",
                    t.events, t.in_guest_ram, t.zapping, t.leaves_zapped
                )
            }
            (None, Some(why)) => out += &format!("tracepoint: unavailable ({why})\n"),
            _ => {}
        }
        if let Some(b) = &e.bystander {
            out += &format!(
                "bystander: {} discards + {} mprotect pairs while running, {} MADV_REMOVE + \
                 {} mprotect(PROT_READ) at boundaries; {} zaps proven, {} zap timeouts\n",
                b.concurrent_discards,
                b.concurrent_protects,
                b.boundary_removes,
                b.boundary_protects,
                b.zaps_proven,
                b.zap_timeouts
            );
        }
        out
    }
    fn json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }
    fn ok(&self) -> bool {
        TouchReport::ok(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_pass_boundary_is_taken_once_in_order() {
        assert_eq!(next_boundary(0, 1, 3).ok(), Some(Some(1)));
        assert_eq!(next_boundary(1, 2, 3).ok(), Some(Some(2)));
        // The last pass: nothing between passes.
        assert_eq!(next_boundary(2, 3, 3).ok(), Some(None));
        // A guest ringing again, skipping, going back or past the end.
        for (last, got) in [(1, 1), (1, 3), (2, 1), (3, 4), (0, u64::MAX)] {
            assert!(
                matches!(
                    next_boundary(last, got, 3),
                    Err(TouchError::Doorbell { .. })
                ),
                "{last} -> {got}"
            );
        }
    }
}
