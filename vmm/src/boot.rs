//! `vmm boot`: boot a Linux guest (ELF vmlinux or LZ4 bzImage + initrd) on
//! hugetlb guest RAM and report the boot timeline.
//!
//! The memory backing is a parameter of [`boot_on`] ([`BootMemory`]: the
//! VMM's view, KVM's memslot hva, optional loader staging): [`run`] boots
//! on plain hugetlb RAM, `crate::run_linux` on userfaultfd-served RAM.
//!
//! Threads: the vCPU thread runs KVM_RUN and handles port I/O, resets,
//! emulation failures and profiling samples; the main thread runs the
//! event-manager loop (stdin -> serial, the vCPU-exit eventfd), the timeout
//! and the profiling clock.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use kvm_bindings::{kvm_pit_config, kvm_userspace_memory_region, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{VcpuExit, VcpuFd};
use linux_loader::loader::{load_cmdline, Cmdline};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vm_superio::Serial;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::assist::{self, AssistCounts, AssistError};
use crate::devices::{ExitWatch, IrqTrigger, PioAction, PioBus, SerialOut, StdinInput, COM1_GSI};
use crate::gva;
use crate::kernel::{self, KernelError, KernelImage};
use crate::kvm::{self, KvmError};
use crate::memory::{GuestRam, MemoryError};
use crate::timeline::{Exit, Timeline};
use crate::x86::{self, CpuError, CMDLINE_ADDR, CMDLINE_MAX};
use crate::zeropage;
use notifier::hostconf::HugepageReservation;
use notifier::PageSize;

/// `clearcpuid=` list: host-passthrough CPUID features whose instructions
/// the host emulator cannot run at guest CPL0 (see PLATFORM.md).
pub const CLEARCPUID: &str = "ssse3,sse4_1,sse4_2,pclmulqdq,aes,avx,avx2,sha_ni,popcnt,rdrand,rdseed,fsgsbase,smap,smep,invpcid,pcid,avx512f";

/// initcalls skipped by default: work a booting guest does not need that
/// costs minutes of emulated CPL0 time here (found with `--profile-ms`):
/// ftrace's weak-function check (a kallsyms lookup per ftrace record), the
/// trace-event enum-map rewrite and tracefs event directories, the blake2s
/// self-test, and the kfunc registrations whose first call parses and
/// verifies the whole vmlinux BTF (tcp_cubic's among them: the guest's TCP
/// falls back to reno).
pub const INITCALL_BLACKLIST: &str = "ftrace_check_for_weak_functions,trace_eval_init,\
event_trace_init,blake2s_mod_init,cubictcp_register,bpf_tcp_ca_kfunc_init,\
bpf_prog_test_run_init,bpf_key_sig_kfuncs_init,kfunc_init";

/// The default kernel command line (chosen by measurement; see README).
/// `mitigations=off` makes the kernel patch every return/retpoline site
/// once at boot, instead of running the SRSO/retpoline thunks on every
/// call and return; `rodata=off` skips the read-only remapping and the W+X
/// page-table walk.
pub fn default_cmdline() -> String {
    format!(
        "console=ttyS0 reboot=k panic=-1 nowatchdog init_on_alloc=0 audit=0 apparmor=0 \
         security=none mitigations=off cryptomgr.notests pci=off rodata=off 8250.nr_uarts=1 \
         initcall_blacklist={INITCALL_BLACKLIST} clearcpuid={CLEARCPUID}"
    )
}

/// The marker line the project's initramfs prints from /init.
pub const DEFAULT_INIT_MARKER: &str = guests::linux::INIT_MARKER;

/// TSS address (three pages below the 4 GiB boundary, as Firecracker).
const TSS_ADDR: usize = 0xfffb_d000;

pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, 'k' | 'K')) => (&s[..i], 1u64 << 10),
        Some((i, 'm' | 'M')) => (&s[..i], 1 << 20),
        Some((i, 'g' | 'G')) => (&s[..i], 1 << 30),
        Some((i, 't' | 'T')) => (&s[..i], 1 << 40),
        _ => (s, 1 << 20), // bare numbers are MiB
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("bad size {s:?} (e.g. 256M, 1G)"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} overflows"))
}

/// Arguments of `vmm boot`.
#[derive(clap::Args, Debug, Clone)]
pub struct BootArgs {
    /// Kernel: ELF vmlinux or bzImage (LZ4 payload). Default: the provisioned Debian image.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Initramfs (newc cpio). Default: the provisioned image's.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Guest RAM size (e.g. 256M, 1G; bare numbers are MiB).
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    pub mem: u64,
    /// Guest RAM backing: 2M, 1G (hugetlb memfd) or none (plain memfd).
    #[arg(long, default_value = "2M", value_parser = crate::memory::parse_hugepages)]
    pub hugepages: PageSize,
    /// As root, grow the hugetlb pool so the guest RAM fits, for this run
    /// only (nr_hugepages is lowered again at exit). Without it a short pool
    /// is an error that says how to reserve the pages.
    #[arg(long)]
    pub reserve_hugepages: bool,
    /// Replace the default kernel command line.
    #[arg(long)]
    pub cmdline: Option<String>,
    /// Append to the kernel command line.
    #[arg(long)]
    pub append: Option<String>,
    /// Serial log file (default: a fresh run directory under /tmp/vmm-runs).
    #[arg(long)]
    pub serial_log: Option<PathBuf>,
    /// Print the JSON report as the last stdout line.
    #[arg(long)]
    pub json: bool,
    /// Give up after this many seconds (the run ends with an error).
    #[arg(long, default_value_t = 900)]
    pub timeout: u64,
    /// The line /init prints when user space runs.
    #[arg(long, default_value = DEFAULT_INIT_MARKER)]
    pub init_marker: String,
    /// Do not echo the guest console to stdout.
    #[arg(long)]
    pub quiet: bool,
    /// Sample the guest RIP every this many milliseconds (0 = off).
    #[arg(long, default_value_t = 0)]
    pub profile_ms: u64,
    /// System.map for symbolising profile samples.
    #[arg(long)]
    pub system_map: Option<PathBuf>,
    /// The KVM device.
    #[arg(long, default_value = "/dev/kvm", hide = true)]
    pub kvm_dev: PathBuf,
}

impl BootArgs {
    /// Arguments with the defaults, for library callers.
    pub fn new(kernel: PathBuf, initrd: PathBuf) -> Self {
        BootArgs {
            kernel: Some(kernel),
            initrd: Some(initrd),
            mem: 256 << 20,
            hugepages: PageSize::Size2M,
            reserve_hugepages: false,
            cmdline: None,
            append: None,
            serial_log: None,
            json: false,
            timeout: 900,
            init_marker: DEFAULT_INIT_MARKER.to_string(),
            quiet: false,
            profile_ms: 0,
            system_map: None,
            kvm_dev: PathBuf::from("/dev/kvm"),
        }
    }
}

/// Boot errors.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// /dev/kvm.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// Guest RAM.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// `--reserve-hugepages` could not grow the pool.
    #[error("--reserve-hugepages: {0}")]
    Reserve(#[source] notifier::Error),
    /// Kernel/initrd.
    #[error(transparent)]
    Kernel(#[from] KernelError),
    /// vCPU state.
    #[error(transparent)]
    Cpu(#[from] CpuError),
    /// A VM-level KVM ioctl.
    #[error("{what}: {source}")]
    Vm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    /// No kernel given, and the default image could not be provisioned.
    #[error(
        "no --kernel/--initrd given and the default Linux image could not be provisioned: {0}"
    )]
    Provision(#[from] guests::linux::RecipeError),
    /// Bad command line.
    #[error("kernel command line: {0}")]
    Cmdline(String),
    /// Serial log.
    #[error("serial log {path}: {source}")]
    SerialLog {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The guest triple-faulted (KVM_EXIT_SHUTDOWN).
    #[error("guest triple fault (KVM_EXIT_SHUTDOWN)\n{dump}")]
    TripleFault { dump: String },
    /// An emulation failure the assist could not handle.
    #[error(transparent)]
    Assist(#[from] AssistError),
    /// KVM_EXIT_INTERNAL_ERROR other than emulation.
    #[error("KVM internal error, suberror {suberror}\n{dump}")]
    Internal { suberror: u32, dump: String },
    /// An exit this VMM does not expect.
    #[error("unexpected vCPU exit: {0}")]
    UnexpectedExit(String),
    /// The boot took longer than --timeout.
    #[error("timed out after {secs} s (guest rip {rip:#x})")]
    Timeout { secs: u64, rip: u64 },
    /// SIGINT/SIGTERM.
    #[error("interrupted by a signal (guest rip {rip:#x})")]
    Interrupted { rip: u64 },
    /// Handing the loader's staging memory over to guest RAM.
    #[error("staging guest RAM: {0}")]
    Staging(String),
    /// Thread/eventfd/event-manager plumbing.
    #[error("VMM plumbing: {0}")]
    Plumbing(String),
}

/// The result of a boot that ran.
#[derive(Debug)]
pub struct BootReport {
    /// How it ended.
    pub exit: Exit,
    /// The runtime error, if it ended with one.
    pub error: Option<BootError>,
    /// Human-readable timeline.
    pub text: String,
    /// JSON report.
    pub json: serde_json::Value,
    /// Where the serial log is.
    pub serial_log: PathBuf,
}

/// The default guest image: the pinned Debian kernel and the project's
/// initramfs, provisioned (downloaded, verified, extracted) on first use.
pub fn default_image() -> Result<(PathBuf, PathBuf), BootError> {
    let image = guests::linux::provision(&guests::linux::ProvisionOptions::default())?;
    Ok((image.vmlinux, image.initramfs))
}

fn vm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> BootError {
    move |source| BootError::Vm { what, source }
}

/// How the vCPU thread stopped.
enum VcpuStop {
    Reset,
    Error(BootError),
}

struct VcpuResult {
    stop: VcpuStop,
    samples: BTreeMap<u64, u64>,
    assists: AssistCounts,
    last_rip: u64,
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Set by SIGINT/SIGTERM: stop the guest and still print the report.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn interrupt_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn regs_dump(vcpu: &VcpuFd) -> String {
    match (vcpu.get_regs(), vcpu.get_sregs()) {
        (Ok(r), Ok(s)) => assist::dump(&r, &s),
        _ => "(registers unavailable)".into(),
    }
}

struct VcpuCtx {
    vcpu: VcpuFd,
    mem: GuestMemoryMmap,
    pio: PioBus,
    stop: Arc<AtomicBool>,
    timeline: Arc<Mutex<Timeline>>,
    exit_evt: EventFd,
    sample: Option<Arc<Symbols>>,
    verbose_assists: bool,
    /// Re-enter `KVM_RUN` on EFAULT (counted here) instead of stopping.
    efaults: Option<Arc<AtomicU64>>,
}

fn vcpu_loop(mut c: VcpuCtx) -> VcpuResult {
    let mut prof = c.sample.clone().map(|syms| Profiler {
        syms,
        samples: BTreeMap::new(),
        recent: BTreeMap::new(),
        callers: BTreeMap::new(),
    });
    let mut assists = AssistCounts::default();
    if let Ok(mut t) = c.timeline.lock() {
        t.mark_first_run();
    }
    let stop = loop {
        if c.stop.load(Ordering::SeqCst) {
            break VcpuStop::Error(BootError::Plumbing("stopped".into()));
        }
        let exit = c.vcpu.run();
        match exit {
            Ok(VcpuExit::IoOut(port, data)) => {
                if c.pio.io_out(port, data) == PioAction::Reset {
                    if let Ok(mut t) = c.timeline.lock() {
                        t.mark_reboot();
                    }
                    break VcpuStop::Reset;
                }
            }
            Ok(VcpuExit::IoIn(port, data)) => c.pio.io_in(port, data),
            Ok(VcpuExit::MmioRead(_, data)) => data.fill(0xff),
            Ok(VcpuExit::MmioWrite(..)) | Ok(VcpuExit::Hlt) => {}
            Ok(VcpuExit::Shutdown) => {
                break VcpuStop::Error(BootError::TripleFault {
                    dump: regs_dump(&c.vcpu),
                })
            }
            Ok(VcpuExit::SystemEvent(t, _)) => {
                if t == kvm_bindings::KVM_SYSTEM_EVENT_RESET
                    || t == kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN
                {
                    break VcpuStop::Reset;
                }
                break VcpuStop::Error(BootError::UnexpectedExit(format!("system event {t}")));
            }
            Ok(VcpuExit::InternalError) => {
                // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so the
                // `internal` member of the kvm_run union is the valid one.
                let suberror = unsafe { c.vcpu.get_kvm_run().__bindgen_anon_1.internal.suberror };
                if suberror != assist::SUBERROR_EMULATION {
                    break VcpuStop::Error(BootError::Internal {
                        suberror,
                        dump: regs_dump(&c.vcpu),
                    });
                }
                match assist::handle_emulation_failure(&c.vcpu, &c.mem, &mut assists) {
                    Ok(a) => {
                        if c.verbose_assists && assists.0.get(&a.mnemonic) == Some(&1) {
                            let t = c
                                .timeline
                                .lock()
                                .map(|t| t.now().as_secs_f64())
                                .unwrap_or(0.0);
                            eprintln!("[vmm {t:8.3}] assist: first {} at {:#x}", a.mnemonic, a.rip);
                        }
                    }
                    Err(e) => break VcpuStop::Error(e.into()),
                }
            }
            Ok(VcpuExit::Intr) => {
                if let Some(p) = prof.as_mut() {
                    p.sample(&c.vcpu, &c.mem, &assists)
                }
            }
            Ok(other) => break VcpuStop::Error(BootError::UnexpectedExit(format!("{other:?}"))),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                if let Some(p) = prof.as_mut() {
                    p.sample(&c.vcpu, &c.mem, &assists)
                }
            }
            Err(e) if e.errno() == libc::EFAULT && c.efaults.is_some() => {
                // A guest store to RAM the VMM made read-only for a moment
                // (BootHooks::efault_retries): re-enter.
                if let Some(n) = &c.efaults {
                    n.fetch_add(1, Ordering::Relaxed);
                }
                std::thread::yield_now();
            }
            Err(e) => {
                break VcpuStop::Error(BootError::Vm {
                    what: "KVM_RUN",
                    source: e,
                })
            }
        }
    };
    let last_rip = c.vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
    let _ = c.exit_evt.write(1);
    VcpuResult {
        stop,
        samples: prof.map(|p| p.samples).unwrap_or_default(),
        assists,
        last_rip,
    }
}

/// Profiling state of the vCPU thread.
struct Profiler {
    syms: Arc<Symbols>,
    samples: BTreeMap<u64, u64>,
    recent: BTreeMap<u64, u64>,
    /// Kernel-text addresses found on the guest stack: approximate callers.
    callers: BTreeMap<String, u64>,
}

impl Profiler {
    fn sample(&mut self, vcpu: &VcpuFd, mem: &GuestMemoryMmap, assists: &AssistCounts) {
        let Ok(r) = vcpu.get_regs() else { return };
        *self.samples.entry(r.rip).or_default() += 1;
        *self.recent.entry(r.rip).or_default() += 1;
        let mut stack = [0u8; 1024];
        if gva::read(vcpu, mem, r.rsp & !7, &mut stack).is_ok() {
            let mut seen = Vec::new();
            for w in stack.chunks_exact(8) {
                let a = u64::from_le_bytes(w.try_into().unwrap_or([0; 8]));
                if (0xffff_ffff_8100_0000..0xffff_ffff_c000_0000).contains(&a) {
                    let n = self.syms.name(a);
                    if !seen.contains(&n) {
                        seen.push(n);
                    }
                    if seen.len() == 4 {
                        break;
                    }
                }
            }
            for n in seen {
                *self.callers.entry(n).or_default() += 1;
            }
        }
        // Live view for long boots: every 40 samples, what the last 40 were.
        if self.recent.values().sum::<u64>() >= 40 {
            let mut top: Vec<_> = self.callers.iter().collect();
            top.sort_by(|a, b| b.1.cmp(a.1));
            let top: Vec<_> = top
                .iter()
                .take(8)
                .map(|(n, c)| format!("{n}:{c}"))
                .collect();
            eprint!(
                "{}on stack: {}\nassists so far: {:?}\n",
                self.syms.report(&self.recent, 6),
                top.join(" "),
                assists.0
            );
            self.recent.clear();
            self.callers.clear();
        }
    }
}

/// Kernel text symbols from a System.map, sorted by address.
#[derive(Default)]
pub struct Symbols(Vec<(u64, String)>);

impl Symbols {
    /// Parse a System.map (missing or unreadable: no symbols).
    pub fn load(system_map: Option<&Path>) -> Symbols {
        let mut v: Vec<(u64, String)> = system_map
            .and_then(|p| std::fs::read_to_string(p).ok())
            .map(|s| {
                s.lines()
                    .filter_map(|l| {
                        let mut it = l.split_whitespace();
                        let a = u64::from_str_radix(it.next()?, 16).ok()?;
                        let t = it.next()?;
                        let n = it.next()?;
                        matches!(t, "t" | "T" | "W" | "w").then(|| (a, n.to_string()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        Symbols(v)
    }

    /// The function containing `rip`.
    pub fn name(&self, rip: u64) -> String {
        match self.0.partition_point(|(a, _)| *a <= rip) {
            0 => format!("{rip:#x}"),
            i => self.0[i - 1].1.clone(),
        }
    }

    /// Top functions by sample count.
    pub fn report(&self, samples: &BTreeMap<u64, u64>, top: usize) -> String {
        let mut by: BTreeMap<String, u64> = BTreeMap::new();
        let total: u64 = samples.values().sum();
        for (&rip, &n) in samples {
            *by.entry(self.name(rip)).or_default() += n;
        }
        let mut v: Vec<_> = by.into_iter().collect();
        v.sort_by_key(|e| std::cmp::Reverse(e.1));
        let mut s = format!("--- guest profile: {total} samples ---\n");
        for (name, n) in v.iter().take(top) {
            s += &format!(
                "{:6.2}% {n:6} {name}\n",
                *n as f64 * 100.0 / total.max(1) as f64
            );
        }
        s
    }
}

fn run_dir_log() -> PathBuf {
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    PathBuf::from(format!("/tmp/vmm-runs/boot-{ts}-{}", std::process::id())).join("serial.log")
}

/// `--reserve-hugepages`: grow the pool so `mem` bytes of `hp` RAM fit. A
/// pool the kernel cannot grow far enough is left to the RAM's own check,
/// whose error says how many pages are free and needed.
pub fn reserve_pool(
    reserve: bool,
    mem: u64,
    hp: PageSize,
) -> Result<Option<HugepageReservation>, BootError> {
    if !reserve || !hp.is_huge() {
        return Ok(None);
    }
    let pages = crate::memory::rounded_size(mem, hp) / hp.bytes();
    HugepageReservation::reserve(hp, pages)
        .map(Some)
        .map_err(BootError::Reserve)
}

/// What a boot needs before its guest RAM exists: /dev/kvm, the kernel
/// image and the initramfs (all checked), and the clock the timeline
/// starts from.
pub struct BootInputs {
    start: Instant,
    kvm: kvm_ioctls::Kvm,
    image: KernelImage,
    initrd: Vec<u8>,
}

impl BootInputs {
    /// Open /dev/kvm, the kernel (default: the provisioned image) and the
    /// initramfs.
    pub fn prepare(args: &BootArgs) -> Result<Self, BootError> {
        let start = Instant::now();
        let kvm = kvm::open(&args.kvm_dev)?;
        let (kernel_path, initrd_path) = match (&args.kernel, &args.initrd) {
            (Some(k), Some(i)) => (k.clone(), i.clone()),
            (k, i) => {
                let (dk, di) = default_image()?;
                (k.clone().unwrap_or(dk), i.clone().unwrap_or(di))
            }
        };
        let image = KernelImage::open(&kernel_path)?;
        let initrd = kernel::read_initrd(&initrd_path)?;
        Ok(BootInputs {
            start,
            kvm,
            image,
            initrd,
        })
    }
}

/// Guest RAM as a boot uses it: the VMM's own view and KVM's memslot.
pub struct BootMemory {
    /// What the VMM reads and writes: the loader, the vCPU's boot tables,
    /// the emulation assist and the profiler.
    pub mem: GuestMemoryMmap,
    /// The hva KVM's memslot 0 maps at gpa 0. It may be another mapping of
    /// the same memory than `mem` (userfaultfd-served RAM: only the guest
    /// faults on it); the caller keeps it mapped until the boot returns.
    pub slot_hva: u64,
    /// Size in bytes (both mappings).
    pub size: u64,
    /// Backing page size (for the report).
    pub hugepages: PageSize,
    /// Where the loader writes instead of `mem`, if anywhere.
    pub staging: Option<Staging>,
}

/// Scratch memory the loader writes (kernel, initramfs, command line, zero
/// page, boot page tables) when guest RAM must not take the VMM's writes
/// before the guest runs (userfaultfd MISSING: a page the VMM wrote would
/// never fault). `commit` hands the contents over before the first KVM_RUN.
pub struct Staging {
    /// The scratch memory (gpa 0, the guest RAM's size).
    pub mem: GuestMemoryMmap,
    /// Moves what the loader wrote into guest RAM's first faults.
    pub commit: StagingCommit,
}

/// [`Staging::commit`]: takes the staging memory, says what went wrong.
pub type StagingCommit = Box<dyn FnOnce(&GuestMemoryMmap) -> Result<(), String>>;

/// Boot a guest on plain hugetlb (or memfd) RAM. Setup problems are `Err`;
/// a boot that ran returns a report (whose `error` says if it ended in a
/// runtime error).
pub fn run(args: &BootArgs) -> Result<BootReport, BootError> {
    let inputs = BootInputs::prepare(args)?;
    // Declared before the RAM so it is dropped after it: the pool shrinks
    // back only once the guest's pages are gone.
    let _pool = reserve_pool(args.reserve_hugepages, args.mem, args.hugepages)?;
    let ram = GuestRam::new(args.mem, args.hugepages)?;
    let host = ram
        .mem
        .get_host_address(GuestAddress(0))
        .map_err(|e| BootError::Plumbing(e.to_string()))?;
    let memory = BootMemory {
        mem: ram.mem.clone(),
        slot_hva: host as u64,
        size: ram.size,
        hugepages: ram.hugepages,
        staging: None,
    };
    boot_on(args, inputs, memory, &mut |_| {})
}

/// Boot on `ram`: create the VM (memslot 0 = `ram.slot_hva`), load the
/// kernel, initramfs, command line and zero page through `ram.mem`, run the
/// vCPU and the event loop until reset, error, timeout or signal.
/// `on_tick` sees the timeline from the main thread every tick (~200 ms).
pub fn boot_on(
    args: &BootArgs,
    inputs: BootInputs,
    ram: BootMemory,
    on_tick: &mut dyn FnMut(&Timeline),
) -> Result<BootReport, BootError> {
    boot_with(
        args,
        inputs,
        ram,
        BootHooks {
            on_tick: &mut |t| {
                on_tick(t);
                false
            },
            efault_retries: None,
        },
    )
}

/// What a caller of [`boot_with`] adds to a boot.
pub struct BootHooks<'a> {
    /// Sees the timeline every tick; returning true stops the guest (the
    /// report's error then says it was stopped).
    pub on_tick: &'a mut dyn FnMut(&Timeline) -> bool,
    /// When set, `KVM_RUN` answering EFAULT (a guest store to RAM the VMM
    /// made read-only for a moment) is counted here and re-entered instead
    /// of ending the boot.
    pub efault_retries: Option<Arc<AtomicU64>>,
}

/// [`boot_on`] with [`BootHooks`].
pub fn boot_with(
    args: &BootArgs,
    inputs: BootInputs,
    mut ram: BootMemory,
    hooks: BootHooks,
) -> Result<BootReport, BootError> {
    let BootHooks {
        on_tick,
        efault_retries,
    } = hooks;
    let BootInputs {
        start,
        kvm,
        image,
        initrd,
    } = inputs;
    let mem = ram.mem.clone();
    // What the loader writes through (the staging memory, if any).
    let load = ram
        .staging
        .as_ref()
        .map_or_else(|| mem.clone(), |s| s.mem.clone());

    let vm = kvm.create_vm().map_err(vm_err("KVM_CREATE_VM"))?;
    vm.set_tss_address(TSS_ADDR)
        .map_err(vm_err("KVM_SET_TSS_ADDR"))?;
    vm.create_irq_chip().map_err(vm_err("KVM_CREATE_IRQCHIP"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(vm_err("KVM_CREATE_PIT2"))?;
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: ram.size,
        userspace_addr: ram.slot_hva,
    };
    // SAFETY: `ram.slot_hva` maps `ram.size` bytes of guest RAM that the
    // caller keeps mapped until this function returns; the VM is dropped
    // before that.
    unsafe { vm.set_user_memory_region(region) }.map_err(vm_err("KVM_SET_USER_MEMORY_REGION"))?;

    // Kernel, initrd, command line, zero page.
    let entry = image.load(&load, ram.size)?;
    let addr_max = zeropage::initrd_addr_max(image.setup_header.as_ref());
    let initrd_addr = kernel::initrd_addr(initrd.len() as u64, ram.size, image.phys_end, addr_max)?;
    vm_memory::Bytes::write_slice(&load, &initrd, GuestAddress(initrd_addr))
        .map_err(|e| BootError::Plumbing(format!("writing initrd: {e}")))?;
    let mut line = args.cmdline.clone().unwrap_or_else(default_cmdline);
    if let Some(a) = &args.append {
        line.push(' ');
        line.push_str(a);
    }
    let mut cmdline = Cmdline::new(CMDLINE_MAX).map_err(|e| BootError::Cmdline(e.to_string()))?;
    cmdline
        .insert_str(&line)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    load_cmdline(&load, GuestAddress(CMDLINE_ADDR), &cmdline)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    let params = zeropage::boot_params(
        image.setup_header,
        ram.size,
        line.len() + 1,
        Some((initrd_addr, initrd.len() as u64)),
    );
    zeropage::write(&load, &params).map_err(|e| BootError::Plumbing(format!("zero page: {e}")))?;
    drop(image);
    drop(initrd);

    // vCPU.
    let vcpu = x86::create_vcpu(&kvm, &vm, 0).map_err(|(what, e)| vm_err(what)(e))?;
    x86::setup_vcpu(&vcpu, &load, entry.0)?;
    x86::setup_lapic(&vcpu)?;
    if let Some(s) = ram.staging.take() {
        (s.commit)(&s.mem).map_err(BootError::Staging)?;
    }
    drop(load);

    // Devices.
    let log_path = args.serial_log.clone().unwrap_or_else(run_dir_log);
    if let Some(dir) = log_path.parent() {
        std::fs::create_dir_all(dir).map_err(|source| BootError::SerialLog {
            path: log_path.clone(),
            source,
        })?;
    }
    let log = File::create(&log_path).map_err(|source| BootError::SerialLog {
        path: log_path.clone(),
        source,
    })?;
    let timeline = Arc::new(Mutex::new(Timeline::new(start, &args.init_marker)));
    let plumb = |e: std::io::Error| BootError::Plumbing(e.to_string());
    let irq = EventFd::new(EFD_NONBLOCK).map_err(plumb)?;
    vm.register_irqfd(&irq, COM1_GSI)
        .map_err(vm_err("KVM_IRQFD"))?;
    let serial = Arc::new(Mutex::new(Serial::new(
        IrqTrigger(irq),
        SerialOut::new(!args.quiet, log, timeline.clone()),
    )));

    // Event loop: stdin -> serial, vCPU exit.
    let exit_evt = EventFd::new(EFD_NONBLOCK).map_err(plumb)?;
    let done = Arc::new(AtomicBool::new(false));
    let mut em: EventManager<Box<dyn MutEventSubscriber + Send>> =
        EventManager::new().map_err(|e| BootError::Plumbing(format!("event manager: {e:?}")))?;
    em.add_subscriber(Box::new(StdinInput {
        serial: serial.clone(),
    }));
    em.add_subscriber(Box::new(ExitWatch {
        evt: exit_evt.try_clone().map_err(plumb)?,
        done: done.clone(),
    }));

    static KICK: std::sync::Once = std::sync::Once::new();
    let mut kick_err = None;
    KICK.call_once(|| {
        kick_err = register_signal_handler(SIGRTMIN(), kick_handler)
            .and_then(|_| register_signal_handler(libc::SIGINT, interrupt_handler))
            .and_then(|_| register_signal_handler(libc::SIGTERM, interrupt_handler))
            .err();
    });
    if let Some(e) = kick_err {
        return Err(BootError::Plumbing(format!("signal handler: {e}")));
    }

    let stop = Arc::new(AtomicBool::new(false));
    let ctx = VcpuCtx {
        vcpu,
        mem,
        pio: PioBus { serial },
        stop: stop.clone(),
        timeline: timeline.clone(),
        exit_evt,
        sample: (args.profile_ms > 0).then(|| Arc::new(Symbols::load(args.system_map.as_deref()))),
        verbose_assists: !args.quiet,
        efaults: efault_retries,
    };
    let handle = std::thread::Builder::new()
        .name("vcpu0".into())
        .spawn(move || vcpu_loop(ctx))
        .map_err(plumb)?;

    let deadline = start + Duration::from_secs(args.timeout);
    let mut timed_out = false;
    let mut was_interrupted = false;
    let mut next_sample = Instant::now() + Duration::from_millis(args.profile_ms);
    while !done.load(Ordering::SeqCst) {
        let tick = if args.profile_ms > 0 {
            args.profile_ms.min(200)
        } else {
            200
        };
        if let Err(e) = em.run_with_timeout(tick as i32) {
            if !matches!(e, event_manager::Error::Epoll(ref e) if e.errno() == libc::EINTR) {
                stop.store(true, Ordering::SeqCst);
                let _ = handle.kill(SIGRTMIN());
            }
        }
        if let Ok(t) = timeline.lock() {
            if on_tick(&t) {
                stop.store(true, Ordering::SeqCst);
                let _ = handle.kill(SIGRTMIN());
            }
        }
        let now = Instant::now();
        let interrupted = INTERRUPTED.load(Ordering::SeqCst);
        if now >= deadline || interrupted || stop.load(Ordering::SeqCst) {
            was_interrupted |= interrupted;
            timed_out |= now >= deadline;
            stop.store(true, Ordering::SeqCst);
            let _ = handle.kill(SIGRTMIN());
        } else if args.profile_ms > 0 && now >= next_sample {
            next_sample = now + Duration::from_millis(args.profile_ms);
            let _ = handle.kill(SIGRTMIN());
        }
    }
    let res = handle
        .join()
        .map_err(|_| BootError::Plumbing("vCPU thread panicked".into()))?;

    let error = match res.stop {
        VcpuStop::Reset => None,
        VcpuStop::Error(_) if was_interrupted && !timed_out => {
            Some(BootError::Interrupted { rip: res.last_rip })
        }
        VcpuStop::Error(_) if timed_out => Some(BootError::Timeout {
            secs: args.timeout,
            rip: res.last_rip,
        }),
        VcpuStop::Error(e) => Some(e),
    };
    let t = timeline
        .lock()
        .map_err(|_| BootError::Plumbing("timeline lock".into()))?;
    let exit = t.classify(error.as_ref().map(|e| e.to_string()));
    let assists: Vec<(String, u64)> = res.assists.0.into_iter().collect();
    let mut text = t.report(&exit, &assists);
    if args.profile_ms > 0 {
        let syms = Symbols::load(args.system_map.as_deref());
        text = format!("{}\n{text}", syms.report(&res.samples, 30));
    }
    let json = t.json(
        &exit,
        &assists,
        serde_json::json!({
            "mem_mib": ram.size >> 20,
            "hugepages": crate::memory::hugepages_name(ram.hugepages),
            "cmdline": line,
            "serial_log": log_path,
        }),
    );
    drop(t);
    Ok(BootReport {
        exit,
        error,
        text,
        json,
        serial_log: log_path,
    })
}

/// `vmm boot` entry: run, print the timeline (and JSON), map to an exit code.
pub fn main(args: BootArgs) -> std::process::ExitCode {
    use std::process::ExitCode;
    match run(&args) {
        Ok(r) => {
            if let Some(e) = &r.error {
                eprintln!("vmm boot: {e}");
            }
            println!("\n{}\nserial log: {}", r.text, r.serial_log.display());
            if args.json {
                println!("{}", r.json);
            }
            if r.error.is_some() || r.exit.name() == "error" {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            }
        }
        Err(e) => {
            eprintln!("vmm boot: {e}");
            if args.json {
                println!(
                    "{}",
                    serde_json::json!({"init_reached": false, "userland": false, "exit": "error",
                        "reason": e.to_string(), "assists": {}, "ms_to_first_run": null, "ms_to_init": null})
                );
            }
            ExitCode::from(2)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256M").unwrap(), 256 << 20);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("512").unwrap(), 512 << 20);
        assert!(parse_size("x").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn profile_symbolises() {
        let dir = std::env::temp_dir().join(format!("vmm-prof-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let map = dir.join("System.map");
        std::fs::write(
            &map,
            "ffffffff81000000 T _text\nffffffff81001000 T foo\nffffffff81002000 t bar\n",
        )
        .unwrap();
        let mut s = BTreeMap::new();
        s.insert(0xffff_ffff_8100_1010, 3);
        s.insert(0xffff_ffff_8100_2fff, 1);
        let r = Symbols::load(Some(&map)).report(&s, 10);
        assert!(r.contains("foo") && r.contains("bar"), "{r}");
        let _ = std::fs::remove_dir_all(dir);
    }
}
