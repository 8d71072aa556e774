//! `vmm run --guest linux`: the Linux guest of `vmm boot`, booted on
//! userfaultfd-served hugetlb RAM whose every guest fault goes through the
//! project's TDP MMU.
//!
//! Guest RAM is a [`UffdGuestRam`]: KVM's memslot is its guest-facing
//! mapping (registered with userfaultfd), so every first touch by the guest
//! (or by KVM on the guest's behalf: the host's instruction emulator reads
//! and writes guest memory through that hva too) arrives at
//! [`crate::uffd_fault`], which runs `TdpMmu::page_fault` under the
//! invalidation sequence, populates the huge page and wakes the vCPU. The
//! VMM's own accesses - the loader (kernel, initramfs, command line, zero
//! page, boot page tables), the emulation assist's instruction fetch and
//! gva walks, the profiler - go through a second `MAP_SHARED` mapping of
//! the same memfd that is not registered (the VMM's view), so they never
//! fault on the guest-facing mapping. The boot itself is
//! [`boot::boot_on`]: the same VM, devices, assist and timeline as
//! `vmm boot`, with the memory backing as a parameter.
//!
//! Modes: `--uffd minor` (page cache filled up front, the loader writes it
//! through the VMM's view, faults resolved with `UFFDIO_CONTINUE`),
//! `--uffd missing` (nothing in the page cache: the loader writes a staging
//! memory whose non-zero huge pages become the first `UFFDIO_COPY` of each,
//! see [`staging_for`]; every other page is COPYed as zeros), and the
//! baselines `kernel` / `kernel-prefilled` (no userfaultfd, the MMU sees no
//! faults).

use crate::boot::{self, BootArgs, BootError, BootInputs, BootMemory, BootReport, Staging};
use crate::guest_ram_uffd::{UffdGuestRam, UffdMode, UffdRamError};
use crate::run::RunArgs;
use crate::run_inval::{self, InvalError, InvalKind, Invalidator};
use crate::timeline::Timeline;
use crate::uffd_fault::{self, FaultReport, FaultThreadError, LatencyUs};
use mmu::memslot::PAGE_SHIFT;
use mmu::tdp::TdpMmu;
use mmu::MmuStatsSnapshot;
use notifier::Subscribers;
use std::fs::File;
use std::os::fd::FromRawFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{Bytes, FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

/// The `vmm run` options that only `--guest linux` uses.
#[derive(clap::Args, Debug, Clone)]
pub struct LinuxArgs {
    /// --guest linux: kernel (ELF vmlinux or LZ4 bzImage). Default: the provisioned Debian image.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// --guest linux: initramfs (newc cpio). Default: the provisioned image's.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// --guest linux: replace the default kernel command line.
    #[arg(long)]
    pub cmdline: Option<String>,
    /// --guest linux: append to the kernel command line.
    #[arg(long)]
    pub append: Option<String>,
    /// --guest linux: serial log file (default: a fresh run directory under /tmp/vmm-runs).
    #[arg(long)]
    pub serial_log: Option<PathBuf>,
    /// --guest linux: do not echo the guest console to stdout.
    #[arg(long)]
    pub quiet: bool,
    /// --guest linux: give up after this many seconds (a boot takes minutes here).
    #[arg(long, default_value_t = 3600)]
    pub boot_timeout: u64,
    /// --guest linux: as root, grow the hugetlb pool so the guest RAM fits,
    /// for this run only.
    #[arg(long)]
    pub reserve_hugepages: bool,
}

impl Default for LinuxArgs {
    fn default() -> Self {
        LinuxArgs {
            kernel: None,
            initrd: None,
            cmdline: None,
            append: None,
            serial_log: None,
            quiet: false,
            boot_timeout: 3600,
            reserve_hugepages: false,
        }
    }
}

impl LinuxArgs {
    /// The `vmm boot` arguments for this run.
    pub fn boot_args(&self, run: &RunArgs) -> BootArgs {
        BootArgs {
            kernel: self.kernel.clone(),
            initrd: self.initrd.clone(),
            mem: run.mem,
            hugepages: run.hugepages,
            reserve_hugepages: self.reserve_hugepages,
            cmdline: self.cmdline.clone(),
            append: self.append.clone(),
            serial_log: self.serial_log.clone(),
            json: run.json,
            timeout: self.boot_timeout,
            init_marker: boot::DEFAULT_INIT_MARKER.to_string(),
            quiet: self.quiet,
            profile_ms: 0,
            system_map: None,
            kvm_dev: run.kvm_dev.clone(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunLinuxError {
    #[error("--guest linux does not run --invalidate {0:?} (between-pass invalidations are for the builtin guest); try --race-discard-us")]
    Invalidate(InvalKind),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Ram(#[from] UffdRamError),
    #[error(transparent)]
    Memslot(#[from] mmu::memslot::MemslotError),
    #[error("the VMM's view of guest RAM: {0}")]
    View(String),
    #[error("fault thread: {0}")]
    Fault(#[from] FaultThreadError),
    #[error("a helper thread panicked")]
    Panic,
    #[error("agreement check / racing discards: {0}")]
    Inval(#[from] InvalError),
}

/// What the MMU maps at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Mapped {
    /// Milliseconds since the VMM started.
    pub ms: u64,
    /// Leaf SPTEs.
    pub leaves: u64,
    /// 4 KiB pages they cover.
    pub pages_4k: u64,
    /// The same in MiB.
    pub mib: u64,
}

impl Mapped {
    fn of(tdp: &TdpMmu, ms: u64) -> Self {
        let leaves = tdp.mapped_leaves();
        let pages_4k: u64 = leaves.iter().map(|l| l.gfn_end() - l.gfn).sum();
        Mapped {
            ms,
            leaves: leaves.len() as u64,
            pages_4k,
            mib: (pages_4k << PAGE_SHIFT) >> 20,
        }
    }
}

/// A `vmm run --guest linux` that ran.
#[derive(Debug)]
pub struct LinuxRunReport {
    /// The boot (timeline, exit, serial log) as `vmm boot` reports it.
    pub boot: BootReport,
    pub uffd: UffdMode,
    pub faults: u64,
    pub fault_retries: u64,
    pub already_present: u64,
    pub spurious: u64,
    pub fault_to_resume_us: LatencyUs,
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

/// The VMM's view of `ram`: another `MAP_SHARED` mapping of its memfd, not
/// registered with userfaultfd, as a vm-memory `GuestMemoryMmap` at gpa 0.
/// It reaches the page cache directly (MINOR: filled up front), so the
/// VMM's accesses never fault on the guest-facing mapping.
pub fn vmm_view(ram: &UffdGuestRam) -> Result<GuestMemoryMmap, RunLinuxError> {
    let view = |e: String| RunLinuxError::View(e);
    // SAFETY: dup of the memfd `ram` owns (open for as long as `ram`); the
    // new descriptor is checked and owned by the File from here on.
    let fd = unsafe { libc::dup(ram.memfd()) };
    if fd < 0 {
        return Err(view(format!(
            "dup(memfd): {}",
            std::io::Error::last_os_error()
        )));
    }
    // SAFETY: `fd` was just returned by dup and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    let len = usize::try_from(ram.size()).map_err(|_| view("size".into()))?;
    let region = MmapRegionBuilder::new(len)
        .with_file_offset(FileOffset::new(file, 0))
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_SHARED)
        .with_hugetlbfs(true)
        .build()
        .map_err(|e| view(e.to_string()))?;
    let region = GuestRegionMmap::new(region, GuestAddress(0))
        .ok_or_else(|| view("region overflows the guest address space".into()))?;
    GuestMemoryMmap::from_regions(vec![region]).map_err(|e| view(e.to_string()))
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
        let page = ram.page_size();
        let mut buf = vec![0u8; page as usize];
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
    if args.invalidate != InvalKind::None {
        return Err(RunLinuxError::Invalidate(args.invalidate));
    }
    if args.race_discard_us > 0 && !args.uffd.prefilled() {
        return Err(InvalError::RaceNeedsPrefill.into());
    }
    let boot_args = args.linux.boot_args(args);
    let inputs = BootInputs::prepare(&boot_args)?;
    // Dropped after the RAM: the pool shrinks back once the pages are gone.
    let _pool = boot::reserve_pool(boot_args.reserve_hugepages, args.mem, args.hugepages)?;

    let subs = Subscribers::new();
    let ram = UffdGuestRam::new(args.mem, args.hugepages, args.uffd, subs.clone())?;
    let view = vmm_view(&ram)?;
    if args.prefault {
        ram.prefault()?;
    }
    let ram = Arc::new(ram);
    let size = ram.size();
    let (ctx, tdp) = crate::uffd_fault::tdp_mmu_for(&ram, &subs)?;

    let stop = Arc::new(AtomicBool::new(false));
    let fault_thread = uffd_fault::spawn(ram.clone(), tdp.clone(), stop.clone(), args.spin_faults);
    let race_stop = Arc::new(AtomicBool::new(false));
    let racer = if args.race_discard_us > 0 {
        let inv = Invalidator::new(&ram, &tdp, InvalKind::Discard, false, 0, size)?;
        Some(run_inval::spawn_racer(
            inv,
            Duration::from_micros(args.race_discard_us),
            race_stop.clone(),
        ))
    } else {
        None
    };

    let memory = BootMemory {
        mem: view,
        slot_hva: ram.guest_hva(),
        size,
        hugepages: args.hugepages,
        staging: match args.uffd {
            UffdMode::Missing => Some(staging_for(&ram)?),
            _ => None,
        },
    };
    let mut at_init: Option<(Mapped, MmuStatsSnapshot)> = None;
    let mut on_tick = |t: &Timeline| {
        if at_init.is_none() && t.run_init.is_some() {
            let ms = t_start.elapsed().as_millis() as u64;
            at_init = Some((Mapped::of(&tdp, ms), ctx.stats.snapshot()));
        }
    };
    let booted = boot::boot_on(&boot_args, inputs, memory, &mut on_tick);

    race_stop.store(true, Ordering::Release);
    let raced = racer.map(|h| h.join().map_err(|_| RunLinuxError::Panic));
    stop.store(true, Ordering::Release);
    let faults = fault_thread.join().map_err(|_| RunLinuxError::Panic)?;
    let boot = booted?;
    let faults: FaultReport = faults?;
    let race_invalidations = match raced {
        None => 0,
        Some(r) => r??,
    };

    // The MMU's mapped gfns against PAGEMAP_SCAN of the guest-facing mapping.
    let mut check = Invalidator::new(&ram, &tdp, InvalKind::None, true, 0, size)?;
    check.final_check()?;
    let mapped_at_end = Mapped::of(&tdp, t_start.elapsed().as_millis() as u64);
    let stats = ctx.stats.snapshot();
    let fault_to_resume_us = LatencyUs::from_ns(&faults.fault_to_resume_ns);
    let (mapped_at_init, stats_at_init) = match at_init {
        Some((m, s)) => (Some(m), Some(s)),
        None => (None, None),
    };
    let mut json = boot.json.clone();
    if let Some(o) = json.as_object_mut() {
        let extra = serde_json::json!({
            "guest": "linux",
            "uffd": args.uffd,
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
        uffd: args.uffd,
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

/// `vmm run --guest linux`: print the boot timeline and the MMU summary
/// (and the JSON line with `--json`).
pub fn main(args: &RunArgs) -> ExitCode {
    match run(args) {
        Ok(r) => {
            if let Some(e) = &r.boot.error {
                eprintln!("vmm run: {e}");
            }
            let l = r.fault_to_resume_us;
            let init = r
                .mapped_at_init
                .map(|m| format!("{} MiB in {} leaves", m.mib, m.leaves))
                .unwrap_or_else(|| "-".into());
            println!(
                "\n{}\nserial log: {}\nlinux guest, {} MiB {} hugetlb, uffd {}: {} faults \
                 ({} retries), fault-to-resume p50 {:.1} us p99 {:.1} us max {:.1} us; \
                 pf_taken {} pf_fixed {}; MMU mapped at init: {init}, at end: {} MiB; \
                 agreement with PAGEMAP_SCAN: {}",
                r.boot.text,
                r.boot.serial_log.display(),
                args.mem >> 20,
                args.hugepages,
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
            );
            if args.json {
                println!("{}", r.json);
            }
            if r.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("vmm run: {e}");
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({"guest": "linux", "init_reached": false, "exit": "error",
                        "reason": e.to_string()})
                );
            }
            ExitCode::from(2)
        }
    }
}
