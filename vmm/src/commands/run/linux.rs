//! `vmm run --guest linux`: the Linux guest of `vmm boot`, booted on
//! userfaultfd-served hugetlb RAM whose every guest fault goes through the
//! project's TDP MMU.
//!
//! Guest RAM is a [`UffdGuestRam`]: KVM's memslot is its guest-facing
//! mapping (registered with userfaultfd), so every first touch by the guest
//! (or by KVM on the guest's behalf: the host's instruction emulator reads
//! and writes guest memory through that hva too) arrives at
//! [`crate::memory::fault`], which runs `TdpMmu::page_fault` under the
//! invalidation sequence, populates the huge page and wakes the vCPU. The
//! VMM's own accesses - the loader (kernel, initramfs, command line, zero
//! page, boot page tables), the emulation assist's instruction fetch and
//! gva walks, the profiler - go through a second `MAP_SHARED` mapping of
//! the same memfd that is not registered (the VMM's view), so they never
//! fault on the guest-facing mapping. The boot itself is
//! [`crate::machine::linux::boot`]: the same VM, devices, assist and
//! timeline as `vmm boot`, with the memory backing as a parameter.
//!
//! Modes: `--uffd minor` (page cache filled up front, the loader writes it
//! through the VMM's view, faults resolved with `UFFDIO_CONTINUE`),
//! `--uffd missing` (nothing in the page cache: the loader writes a staging
//! memory whose non-zero huge pages become the first `UFFDIO_COPY` of each,
//! see [`staging_for`]; every other page is COPYed as zeros), and the
//! baselines `kernel` / `kernel-prefilled` (no userfaultfd, the MMU sees no
//! faults).

use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mmu::MmuStatsSnapshot;
use notifier::hostmm::Backing;
use notifier::Subscribers;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::RunArgs;
use crate::cli::{self, Report};
use crate::host::invalidator::{InvalError, InvalKind, Invalidator, Racer};
use crate::machine::linux::{
    self, BootError, BootHooks, BootInputs, BootMemory, BootReport, LinuxBoot, Staging,
    DEFAULT_INIT_MARKER,
};
use crate::memory::fault::{self, FaultOptions, FaultReport, FaultThreadError};
use crate::memory::mmu::{tdp_mmu_for, Mapped};
use crate::memory::uffd::{UffdGuestRam, UffdMode, UffdRamError};
use crate::report::timeline::Timeline;
use crate::report::Percentiles;

impl RunArgs {
    /// The Linux boot of `--guest linux`.
    pub fn linux_boot(&self) -> LinuxBoot {
        LinuxBoot {
            guest: self.linux.clone(),
            timeout: Duration::from_secs(self.boot_timeout),
            init_marker: DEFAULT_INIT_MARKER.to_string(),
            profile: None,
            kvm_dev: self.touch.kvm_dev.clone(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunLinuxError {
    #[error("--guest linux does not run --invalidate {0:?} (between-pass invalidations are for the builtin guest); try --race-discard-us")]
    Invalidate(InvalKind),
    #[error("--guest linux needs a shared memfd (--backing shared-2M, shared-1G or shmem), not {0}: the kernel and initramfs are loaded through the VMM's own mapping of the file")]
    PrivateRam(Backing),
    #[error("--guest linux does not use {0} (options of the built-in guest)")]
    BuiltinOnly(String),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Ram(#[from] UffdRamError),
    #[error(transparent)]
    Memslot(#[from] mmu::memslot::MemslotError),
    #[error("the MISSING-mode staging memory: {0}")]
    View(String),
    #[error("fault thread: {0}")]
    Fault(#[from] FaultThreadError),
    #[error(transparent)]
    Panicked(#[from] crate::thread::ThreadPanicked),
    #[error("agreement check / racing discards: {0}")]
    Inval(#[from] InvalError),
}

/// A `vmm run --guest linux` that ran.
#[derive(Debug)]
pub struct LinuxRunReport {
    /// The boot (timeline, exit, serial log) as `vmm boot` reports it.
    pub boot: BootReport,
    pub uffd: UffdMode,
    pub mem_mib: u64,
    /// The hugetlb page size (`--hugepages`).
    pub hugepages: String,
    pub faults: u64,
    pub fault_retries: u64,
    pub already_present: u64,
    pub spurious: u64,
    pub fault_to_resume_us: Percentiles,
    /// MMU counters at the end of the run.
    pub stats: MmuStatsSnapshot,
    /// MMU counters when the kernel's `Run /init` line was seen.
    pub stats_at_init: Option<MmuStatsSnapshot>,
    /// What the MMU mapped when `Run /init` was seen (within a tick).
    pub mapped_at_init: Option<Mapped>,
    /// What the MMU mapped at the end.
    pub mapped_at_end: Mapped,
    /// Discards that raced the booting guest (`--race-discard-us`).
    pub race_invalidations: u64,
    /// MMU-vs-PAGEMAP_SCAN agreement checks run and failed.
    pub verify_checks: u64,
    pub verify_failures: u64,
    pub verify_mismatches: Vec<String>,
    /// The JSON report: the boot's keys plus the MMU's.
    pub json: serde_json::Value,
}

impl LinuxRunReport {
    /// Whether the guest reached init on MMU-agreeing RAM without a
    /// runtime error.
    pub fn ok(&self) -> bool {
        self.boot.error.is_none()
            && self.boot.json["init_reached"] == true
            && self.verify_failures == 0
    }
}

/// MISSING mode: the loader writes into anonymous scratch memory (pages
/// allocated on first write); before the vCPU runs, every huge page of it
/// that is not all zeros is staged in `ram` for its first `UFFDIO_COPY`.
/// Pages left out fault in as zeros, as the kernel's own first touch would
/// give. So every page the guest touches arrives as a fault.
pub fn staging_for(ram: &Arc<UffdGuestRam>) -> Result<Staging, RunLinuxError> {
    let size = usize::try_from(ram.size()).map_err(|_| RunLinuxError::View("size".into()))?;
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), size)])
        .map_err(|e| RunLinuxError::View(format!("staging memory: {e}")))?;
    let ram = ram.clone();
    let commit = move |mem: &GuestMemoryMmap| -> Result<(), String> {
        let page = ram.page_bytes();
        let mut buf = vec![0u8; notifier::convert::u64_to_usize(page)];
        let mut gpa = 0;
        while gpa < ram.size() {
            mem.read_slice(&mut buf, GuestAddress(gpa))
                .map_err(|e| format!("reading staged gpa {gpa:#x}: {e}"))?;
            if buf.iter().any(|&b| b != 0) {
                ram.stage(gpa, &buf).map_err(|e| e.to_string())?;
            }
            gpa += page;
        }
        Ok(())
    };
    Ok(Staging {
        mem,
        commit: Box::new(commit),
    })
}

/// Boot the Linux guest on userfaultfd-served RAM through the TDP MMU.
/// Setup problems are `Err`; a boot that ran returns a report.
pub fn run(args: &RunArgs) -> Result<LinuxRunReport, RunLinuxError> {
    let t_start = Instant::now();
    let foreign = args.foreign_options();
    if !foreign.is_empty() {
        return Err(RunLinuxError::BuiltinOnly(foreign.join(", ")));
    }
    if args.touch.invalidate != InvalKind::None {
        return Err(RunLinuxError::Invalidate(args.touch.invalidate));
    }
    if args.touch.race_discard_us > 0 && !args.touch.uffd.prefilled() {
        return Err(InvalError::RaceNeedsPrefill.into());
    }
    let cfg = args.linux_boot();
    let inputs = BootInputs::prepare(&cfg)?;
    // Dropped after the RAM: the pool shrinks back once the pages are gone.
    let backing = args.touch.backing();
    if !backing.is_shared() {
        return Err(RunLinuxError::PrivateRam(backing));
    }
    let _pool = linux::reserve_pool(
        args.touch.reserve_hugepages && backing.is_hugetlb(),
        args.touch.mem,
        backing.page_size(),
    )?;

    let subs = Subscribers::new();
    let ram = UffdGuestRam::new(args.touch.mem, backing, args.touch.uffd, subs.clone(), true)?;
    let view = ram.vmm_view()?;
    if args.touch.prefault {
        ram.prefault()?;
    }
    let ram = Arc::new(ram);
    let size = ram.size();
    let (ctx, tdp) = tdp_mmu_for(&ram, &subs)?;

    let stop = Arc::new(AtomicBool::new(false));
    let fault_thread = fault::spawn(
        ram.clone(),
        tdp.clone(),
        stop.clone(),
        FaultOptions {
            spin: args.touch.spin_faults,
            ..FaultOptions::default()
        },
    )?;
    let racer = if args.touch.race_discard_us > 0 {
        Some(Invalidator::new(
            &ram,
            &tdp,
            InvalKind::Discard,
            false,
            0,
            size,
        )?)
    } else {
        None
    };
    let racer = Racer::start(racer, Duration::from_micros(args.touch.race_discard_us))?;

    let memory = BootMemory {
        mem: view,
        slot: ram.clone(),
        size,
        hugepages: args.touch.hugepages,
        staging: match args.touch.uffd {
            UffdMode::Missing => Some(staging_for(&ram)?),
            _ => None,
        },
    };
    let mut at_init: Option<(Mapped, MmuStatsSnapshot)> = None;
    let mut on_tick = |t: &Timeline| {
        if at_init.is_none() && t.run_init.is_some() {
            let ms = notifier::convert::duration_ns(t_start.elapsed()) / 1_000_000;
            at_init = Some((Mapped::of(&tdp, ms), ctx.stats.snapshot()));
        }
        false
    };
    let booted = linux::boot(
        &cfg,
        inputs,
        memory,
        BootHooks {
            on_tick: Some(&mut on_tick),
            // A dead fault thread would leave the guest on plain kernel
            // faults, bypassing the MMU: stop then.
            stop_on: Some(fault_thread.progress.failed()),
            ..BootHooks::default()
        },
    );

    let raced = racer.finish();
    stop.store(true, Ordering::Release);
    let faults = crate::thread::join("uffd-fault", fault_thread.handle)?;
    // The fault thread's error first: it is why the boot was stopped.
    let faults: FaultReport = faults?;
    let boot = booted?;
    let race_invalidations = raced?;

    // The MMU's mapped gfns against PAGEMAP_SCAN of the guest-facing mapping.
    let mut check = Invalidator::new(&ram, &tdp, InvalKind::None, true, 0, size)?;
    check.final_check()?;
    let mapped_at_end = Mapped::of(
        &tdp,
        notifier::convert::duration_ns(t_start.elapsed()) / 1_000_000,
    );
    let stats = ctx.stats.snapshot();
    let fault_to_resume_us = Percentiles::from_ns(&faults.fault_to_resume_ns);
    let (mapped_at_init, stats_at_init) = match at_init {
        Some((m, s)) => (Some(m), Some(s)),
        None => (None, None),
    };
    let mut json = boot.json.clone();
    if let Some(o) = json.as_object_mut() {
        let extra = serde_json::json!({
            "guest": "linux",
            "uffd": args.touch.uffd,
            "faults": faults.faults,
            "fault_retries": faults.fault_retries,
            "already_present": faults.already_present,
            "spurious": faults.spurious,
            "fault_to_resume_us": fault_to_resume_us,
            "stats": stats,
            "stats_at_init": stats_at_init,
            "mapped_at_init": mapped_at_init,
            "mapped_at_end": mapped_at_end,
            "race_invalidations": race_invalidations,
            "verify_checks": check.checks(),
            "verify_failures": check.failures(),
            "verify_mismatches": check.mismatches,
            "total_s": t_start.elapsed().as_secs_f64(),
        });
        if let serde_json::Value::Object(e) = extra {
            o.extend(e);
        }
    }
    Ok(LinuxRunReport {
        boot,
        uffd: args.touch.uffd,
        mem_mib: size >> 20,
        hugepages: args.touch.hugepages.to_string(),
        faults: faults.faults,
        fault_retries: faults.fault_retries,
        already_present: faults.already_present,
        spurious: faults.spurious,
        fault_to_resume_us,
        stats,
        stats_at_init,
        mapped_at_init,
        mapped_at_end,
        race_invalidations,
        verify_checks: check.checks(),
        verify_failures: check.failures(),
        verify_mismatches: check.mismatches.clone(),
        json,
    })
}

impl Report for LinuxRunReport {
    fn text(&self) -> String {
        let r = self;
        let l = r.fault_to_resume_us;
        let init = r
            .mapped_at_init
            .map(|m| format!("{} MiB in {} leaves", m.mib, m.leaves))
            .unwrap_or_else(|| "-".into());
        format!(
            "\n{}\nserial log: {}\nlinux guest, {} MiB {} hugetlb, uffd {}: {} faults \
             ({} retries), fault-to-resume p50 {:.1} us p99 {:.1} us max {:.1} us; \
             pf_taken {} pf_fixed {}; MMU mapped at init: {init}, at end: {} MiB; \
             agreement with PAGEMAP_SCAN: {}",
            r.boot.text,
            r.boot.serial_log.display(),
            r.mem_mib,
            r.hugepages,
            r.uffd,
            r.faults,
            r.fault_retries,
            l.p50,
            l.p99,
            l.max,
            r.stats.pf_taken,
            r.stats.pf_fixed,
            r.mapped_at_end.mib,
            if r.verify_failures == 0 {
                "ok".to_string()
            } else {
                format!("FAILED {:?}", r.verify_mismatches)
            },
        )
    }
    fn json(&self) -> serde_json::Value {
        self.json.clone()
    }
    fn ok(&self) -> bool {
        LinuxRunReport::ok(self)
    }
    fn error(&self) -> Option<String> {
        self.boot.error.as_ref().map(ToString::to_string)
    }
}

/// The `--json` line of a `--guest linux` run that could not start.
fn error_json(reason: &str) -> serde_json::Value {
    serde_json::json!({"guest": "linux", "init_reached": false, "exit": "error",
        "reason": reason})
}

/// `vmm run --guest linux`: the boot timeline and the MMU summary.
pub fn main(args: &RunArgs) -> ExitCode {
    cli::conclude("vmm run", args.json, run(args), Some(&error_json))
}
