//! `vmm run --guest builtin`: the built-in CPL3 guest on userfaultfd-served
//! hugetlb RAM whose every page goes through the project's TDP MMU.
//!
//! No guest kernel: the VMM writes [`guests::builtin::system_image`] (GDT,
//! TSS, identity page tables with U/S, the program, params), starts the vCPU
//! in long mode directly at CPL3, and handles the guest's progress and done
//! doorbells (MMIO stores). Faults on guest RAM are served by
//! [`crate::uffd_fault`]. Between passes (the vCPU stopped in a progress
//! exit), [`crate::run_inval`] can run host invalidations and the
//! MMU-vs-pagemap agreement check.

use crate::boot::parse_size;
use crate::guest_ram_uffd::{UffdGuestRam, UffdMode, UffdRamError};
use crate::memory::HugePages;
use crate::run_inval::{InvalKind, Invalidator};
use crate::uffd_fault::{self, FaultThreadError, LatencyUs};
use crate::{kvm, x86};
use guests::builtin::{self, GuestResult, Params, Pattern, LAYOUT};
use kvm_bindings::{kvm_regs, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{VcpuExit, VcpuFd};
use mmu::memslot::{Memslot, Memslots, PAGE_SHIFT};
use mmu::spte::PageLevel;
use mmu::tdp::TdpMmu;
use mmu::{KvmMmuNotifier, MmuContext, MmuStatsSnapshot, RemoteTlb, YieldPolicy};
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
    #[arg(long, default_value = "2M")]
    pub hugepages: HugePages,
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
            hugepages: HugePages::Huge2M,
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
    #[error("{what}: {source}")]
    Vm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Cpu(#[from] x86::CpuError),
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
    #[error("signal handler: {0}")]
    Signal(String),
}

fn vm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> RunError {
    move |source| RunError::Vm { what, source }
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
    pub fault_retries: u64,
    pub already_present: u64,
    pub spurious: u64,
    pub fault_to_resume_us: LatencyUs,
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
    pub guest_run_s: f64,
    pub total_s: f64,
}

impl RunReport {
    /// Whether the run is a success.
    pub fn ok(&self) -> bool {
        self.checksum_ok && self.verify_failures == 0 && self.result.done
    }
}

/// The segment/paging state for the built-in guest: long mode, CPL3 code
/// and stack segments, the busy 64-bit TSS, CR3 at the identity tables,
/// interrupts off (the guest talks through MMIO doorbells).
fn setup_cpl3(vcpu: &VcpuFd) -> Result<(), RunError> {
    let gdt = builtin::gdt();
    let mut sregs = vcpu.get_sregs().map_err(vm_err("KVM_GET_SREGS"))?;
    let seg = |i: u16, rpl: u16| {
        let mut s = x86::segment_from_gdt(gdt[i as usize], i);
        s.selector |= rpl;
        s
    };
    let ucs = seg(builtin::SEL_USER_CS >> 3, 3);
    let uds = seg(builtin::SEL_USER_DS >> 3, 3);
    let tss = seg(builtin::SEL_TSS >> 3, 0);
    x86::set_long_mode_segments(
        &mut sregs,
        (LAYOUT.gdt, gdt.len()),
        (0, 0),
        [ucs, uds, tss],
        LAYOUT.pml4,
    );
    sregs.cr4 = 0x20; // PAE
    sregs.cr0 = 0x8000_0033; // PG | NE | ET | MP | PE
    sregs.efer = 0x500; // LME | LMA
    vcpu.set_sregs(&sregs).map_err(vm_err("KVM_SET_SREGS"))?;
    let regs = kvm_regs {
        rflags: 0x2,
        rip: LAYOUT.code,
        rsp: LAYOUT.stack_top,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(vm_err("KVM_SET_REGS"))?;
    Ok(())
}

extern "C" fn watchdog_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Interrupts KVM_RUN on the creating thread after a deadline.
struct Watchdog {
    stop: Arc<AtomicBool>,
    fired: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    fn start(timeout: Duration) -> Result<Self, RunError> {
        static ONCE: std::sync::Once = std::sync::Once::new();
        let mut err = None;
        ONCE.call_once(|| {
            err = vmm_sys_util::signal::register_signal_handler(
                vmm_sys_util::signal::SIGRTMIN() + 1,
                watchdog_handler,
            )
            .err();
        });
        if let Some(e) = err {
            return Err(RunError::Signal(e.to_string()));
        }
        // SAFETY: pthread_self has no preconditions.
        let target = unsafe { libc::pthread_self() };
        let stop = Arc::new(AtomicBool::new(false));
        let fired = Arc::new(AtomicBool::new(false));
        let (s, f) = (stop.clone(), fired.clone());
        let handle = std::thread::spawn(move || {
            let deadline = Instant::now() + timeout;
            while !s.load(Ordering::Acquire) {
                if Instant::now() >= deadline {
                    f.store(true, Ordering::Release);
                    // Keep kicking: a signal can land just before KVM_RUN.
                    // SAFETY: `target` is the vCPU thread, alive until
                    // `stop` is set (Watchdog is dropped on that thread
                    // before it exits); the signal has a no-op handler.
                    unsafe { libc::pthread_kill(target, vmm_sys_util::signal::SIGRTMIN() + 1) };
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        Ok(Watchdog {
            stop,
            fired,
            handle: Some(handle),
        })
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
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
    let mut ram = UffdGuestRam::new(args.mem, args.hugepages, args.uffd, subs.clone())?;
    ram.load(0, &image)?;
    if args.prefault {
        ram.prefault()?;
    }
    let ram = Arc::new(ram);
    let size = ram.size();
    let backing = match args.hugepages {
        HugePages::Huge1G => PageLevel::L1G,
        _ => PageLevel::L2M,
    };
    let slot = Memslot::new(0, 0, size >> PAGE_SHIFT, ram.guest_hva(), backing)?;
    let ctx = MmuContext::new(Memslots::new(vec![slot], 1)?, RemoteTlb::new(None));
    let tdp = Arc::new(TdpMmu::new(ctx.clone()));
    // Host invalidations of guest RAM reach the MMU: Subscribers ->
    // KvmMmuNotifier -> TDP zap.
    let notifier = Arc::new(KvmMmuNotifier::new(ctx.clone(), YieldPolicy::default()));
    notifier.add_mmu(tdp.clone());
    subs.register(notifier);
    let mut inval = Invalidator::new(
        &ram,
        &tdp,
        args.invalidate,
        args.verify,
        params.ws_base,
        params.ws_size,
    )?;

    let racer = if args.race_discard_us > 0 {
        if !args.uffd.prefilled() {
            return Err(crate::run_inval::InvalError::RaceNeedsPrefill.into());
        }
        let inv = Invalidator::new(
            &ram,
            &tdp,
            InvalKind::Discard,
            false,
            params.ws_base,
            params.ws_size,
        )?;
        Some(inv)
    } else {
        None
    };
    let stop = Arc::new(AtomicBool::new(false));
    let fault_thread = uffd_fault::spawn(ram.clone(), tdp.clone(), stop.clone(), args.spin_faults);

    let result = (|| -> Result<(u64, f64, u64), RunError> {
        let vm = kvm.create_vm().map_err(vm_err("KVM_CREATE_VM"))?;
        vm.set_tss_address(0xfffb_d000)
            .map_err(vm_err("KVM_SET_TSS_ADDR"))?;
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: size,
            userspace_addr: ram.guest_hva(),
        };
        // SAFETY: the guest-facing mapping covers `size` bytes at
        // `guest_hva` and is owned by `ram`, which outlives the VM (the VM
        // is dropped at the end of this closure, `ram` after it).
        unsafe { vm.set_user_memory_region(region) }
            .map_err(vm_err("KVM_SET_USER_MEMORY_REGION"))?;
        let mut vcpu = vm.create_vcpu(0).map_err(vm_err("KVM_CREATE_VCPU"))?;
        let mut cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(vm_err("KVM_GET_SUPPORTED_CPUID"))?;
        x86::filter_cpuid(&mut cpuid);
        vcpu.set_cpuid2(&cpuid).map_err(vm_err("KVM_SET_CPUID2"))?;
        setup_cpl3(&vcpu)?;

        let watchdog = Watchdog::start(Duration::from_secs(args.timeout))?;
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
        let t_run = Instant::now();
        let mut progress = 0u64;
        loop {
            let exit = vcpu.run();
            if watchdog.fired.load(Ordering::Acquire) {
                let _ = stop_racer(racer.take());
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
                            inval.between_passes(passes_done, args.inval_per_pass)?;
                        }
                    } else if addr == LAYOUT.done_mmio {
                        break;
                    }
                }
                Ok(VcpuExit::MmioRead(_, data)) => data.fill(0),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                Ok(other) => {
                    let mut exit = format!("{other:?}");
                    if let (Ok(r), Ok(sr)) = (vcpu.get_regs(), vcpu.get_sregs()) {
                        exit += &format!(
                            " (rflags {:#x}, cs {:#x} dpl {}, cr0 {:#x}, rsp {:#x})",
                            r.rflags, sr.cs.selector, sr.cs.dpl, sr.cr0, r.rsp
                        );
                    }
                    let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
                    return Err(RunError::Exit { exit, rip });
                }
                Err(e) => {
                    let rip = vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
                    return Err(RunError::Exit {
                        exit: format!("KVM_RUN: {e}"),
                        rip,
                    });
                }
            }
        }
        let run_s = t_run.elapsed().as_secs_f64();
        let raced = stop_racer(racer.take())?;
        drop(watchdog);
        inval.final_check()?;
        Ok((progress, run_s, raced))
    })();

    stop.store(true, Ordering::Release);
    let faults = fault_thread.join().map_err(|_| RunError::FaultPanic)?;
    let (progress_exits, guest_run_s, race_invalidations) = result?;
    let faults = faults?;

    let result = GuestResult::from_words(ram.read_u64s::<4>(LAYOUT.result)?);
    let (expected_checksum, expected_touches) = builtin::expected(&params, inval.zeroed())?;
    let checksum_ok = result.done
        && result.checksum == expected_checksum
        && result.touches == expected_touches
        && result.passes_done == params.passes;
    Ok(RunReport {
        guest: args.guest.clone(),
        uffd: args.uffd,
        mem_mib: size >> 20,
        hugepages: args.hugepages.to_string(),
        params,
        faults: faults.faults,
        fault_retries: faults.fault_retries,
        already_present: faults.already_present,
        spurious: faults.spurious,
        fault_to_resume_us: LatencyUs::from_ns(&faults.fault_to_resume_ns),
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
