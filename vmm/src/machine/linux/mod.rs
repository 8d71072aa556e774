//! The Linux machine: a Debian kernel (ELF vmlinux or bzImage) and
//! initramfs booted with the 64-bit boot protocol on one VM with an
//! in-kernel irqchip and PIT, COM1 and the i8042 reset line, and the boot
//! timeline it produces. `vmm boot`, `vmm run --guest linux` and `vmm
//! latency --guest linux` all boot through [`boot`]; what differs is the
//! guest RAM ([`BootMemory`]: plain hugetlb RAM, or userfaultfd-served RAM
//! with the VMM's own view and optional loader staging) and the hooks.
//!
//! Threads: the vCPU thread runs [`Vcpu::run`] with the Linux exit handler
//! ([`exits`]); the main thread runs the event-manager loop (stdin ->
//! serial, the vCPU-exit eventfd), watches SIGINT/SIGTERM and calls the
//! caller's tick hook. The deadline and the profiling clock are the vCPU
//! run's own ([`RunControl`]).

pub mod exits;
pub mod profile;

use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use notifier::hostconf::HugepageReservation;
use notifier::PageSize;
use vm_memory::GuestMemoryMmap;
use vm_superio::Serial;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::arch::x86_64::emulate::EmulateError;
use crate::cli::LinuxGuestArgs;
use crate::devices::serial::{IrqTrigger, SerialOut, StdinInput, COM1_GSI};
use crate::devices::PioBus;
use crate::loader::kernel::{self, KernelError, KernelImage};
use crate::loader::zeropage::ZeroPageError;
use crate::loader::{self, cmdline, LoadError};
use crate::memory::{self, MemoryError};
use crate::report::timeline::{Exit, Timeline};
use crate::vstate::irqchip::{StuckIrqWatch, STUCK_AFTER};
use crate::vstate::vcpu::SetupError;
use crate::vstate::{kvm, KvmError, RunControl, SlotMemory, Vcpu, VcpuError, Vm, VmError};
use exits::{LinuxExits, LinuxStop};
use profile::{Profiler, Symbols};

/// The marker line the project's initramfs prints from /init.
pub const DEFAULT_INIT_MARKER: &str = guests::linux::INIT_MARKER;

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
    Setup(#[from] SetupError),
    /// A VM-level KVM ioctl.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The default or a named (pinned) guest image could not be provisioned.
    #[error(
        "the Linux guest image (the default, or the kernel named by --kernel) could not be provisioned: {0}"
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
    Assist(#[from] EmulateError),
    /// KVM_EXIT_INTERNAL_ERROR other than emulation.
    #[error("KVM internal error, suberror {suberror}\n{dump}")]
    Internal { suberror: u32, dump: String },
    /// An exit this VMM does not expect.
    #[error("unexpected vCPU exit: {0}")]
    UnexpectedExit(String),
    /// `KVM_RUN` failed.
    #[error(transparent)]
    Run(VcpuError),
    /// The boot took longer than its timeout; `dump`: the registers then.
    #[error("timed out after {secs} s (guest rip {rip:#x})\n{dump}")]
    Timeout { secs: u64, rip: u64, dump: String },
    /// SIGINT/SIGTERM.
    #[error("interrupted by a signal (guest rip {rip:#x})")]
    Interrupted { rip: u64 },
    /// Handing the loader's staging memory over to guest RAM.
    #[error("staging guest RAM: {0}")]
    Staging(String),
    /// Thread/eventfd/event-manager plumbing.
    #[error("VMM plumbing: {0}")]
    Plumbing(String),
    /// The vCPU thread panicked.
    #[error(transparent)]
    Panicked(#[from] crate::thread::ThreadPanicked),
}

impl From<LoadError> for BootError {
    fn from(e: LoadError) -> Self {
        match e {
            LoadError::Kernel(k) => BootError::Kernel(k),
            LoadError::Cmdline(c) => BootError::Cmdline(c),
            LoadError::ZeroPage(ZeroPageError::NoHighMemory { mem_size }) => {
                BootError::Kernel(KernelError::MemoryTooSmall {
                    what: "the e820 map (RAM above 1 MiB)",
                    needed_mib: 2,
                    mem_mib: mem_size >> 20,
                })
            }
            LoadError::ZeroPage(z) => BootError::Plumbing(z.to_string()),
            LoadError::Write { what, reason } => {
                BootError::Plumbing(format!("writing {what}: {reason}"))
            }
        }
    }
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

/// A guest RIP profile: sample every `every`, symbolise with `system_map`.
#[derive(Debug, Clone)]
pub struct Profile {
    pub every: Duration,
    pub system_map: Option<PathBuf>,
}

/// What a Linux boot is, besides its memory.
#[derive(Debug, Clone)]
pub struct LinuxBoot {
    /// Kernel, initramfs, command line, console.
    pub guest: LinuxGuestArgs,
    /// Give up after this long (the report's error says so).
    pub timeout: Duration,
    /// The line /init prints when user space runs.
    pub init_marker: String,
    pub profile: Option<Profile>,
    /// The KVM device.
    pub kvm_dev: PathBuf,
}

impl LinuxBoot {
    /// A boot of `kernel` and `initrd` with the defaults.
    pub fn new(kernel: PathBuf, initrd: PathBuf) -> Self {
        LinuxBoot {
            guest: LinuxGuestArgs {
                kernel: Some(kernel),
                initrd: Some(initrd),
                ..Default::default()
            },
            timeout: Duration::from_secs(900),
            init_marker: DEFAULT_INIT_MARKER.to_string(),
            profile: None,
            kvm_dev: PathBuf::from("/dev/kvm"),
        }
    }
}

/// The default guest image: the default pinned Debian kernel
/// (`guests::linux::recipe::DEFAULT_KERNEL`) and the project's initramfs,
/// provisioned (downloaded, verified, extracted) on first use.
pub fn default_image() -> Result<(PathBuf, PathBuf), BootError> {
    let pin = guests::linux::recipe::DEFAULT_KERNEL;
    let image = guests::linux::provision_kernel(pin, &guests::linux::ProvisionOptions::default())?;
    Ok((image.vmlinux, image.initramfs))
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
    let pages = memory::rounded_size(mem, hp) / hp.bytes();
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
    /// Open /dev/kvm, the kernel and the initramfs. `--kernel` is a file
    /// (ELF vmlinux or bzImage), or the name of a pinned kernel
    /// (`guests::linux::recipe::KERNELS`, e.g. `debian-6.12`: that kernel
    /// is provisioned and its vmlinux and initramfs used); without it, the
    /// default pinned image. `--initrd` replaces the provisioned initramfs.
    pub fn prepare(cfg: &LinuxBoot) -> Result<Self, BootError> {
        let start = Instant::now();
        let kvm = kvm::open(&cfg.kvm_dev)?;
        let pinned = match &cfg.guest.kernel {
            None => Some(guests::linux::recipe::DEFAULT_KERNEL),
            // A name of the list, even when a file of that name exists
            // (`./debian-6.1` for the file).
            Some(k) => k.to_str().and_then(guests::linux::recipe::kernel_by_name),
        };
        // Neither a pinned name nor a file: say so (with the names) before
        // provisioning anything.
        if let (None, Some(k)) = (pinned, &cfg.guest.kernel) {
            if !k.exists() {
                return Err(KernelError::KernelMissing(k.clone()).into());
            }
        }
        let (kernel_path, initrd_path) = match (pinned, &cfg.guest.kernel, &cfg.guest.initrd) {
            // A file and an initrd: nothing to provision.
            (None, Some(k), Some(i)) => (k.clone(), i.clone()),
            (Some(pin), _, i) => {
                let opts = guests::linux::ProvisionOptions::default();
                let image = guests::linux::provision_kernel(pin, &opts)?;
                (image.vmlinux, i.clone().unwrap_or(image.initramfs))
            }
            // A file without an initrd: the default image's initramfs.
            (None, k, i) => {
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
    /// What KVM's memslot 0 maps at gpa 0: the same mapping as `mem`, or
    /// another mapping of the same memory (userfaultfd-served RAM: only
    /// the guest faults on it). The VM keeps it alive.
    pub slot: Arc<dyn SlotMemory>,
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

/// What a caller adds to a boot.
#[derive(Default)]
pub struct BootHooks<'a> {
    /// Sees the timeline every tick (~200 ms) on the main thread;
    /// returning true stops the guest (the report's error then says it was
    /// stopped).
    pub on_tick: Option<&'a mut dyn FnMut(&Timeline) -> bool>,
    /// When set, `KVM_RUN` answering EFAULT (a guest store to RAM the VMM
    /// made read-only for a moment) is counted here and re-entered instead
    /// of ending the boot.
    pub efault_retries: Option<Arc<AtomicU64>>,
    /// Also stop the guest when this is set (a helper thread that failed).
    pub stop_on: Option<Arc<AtomicBool>>,
    /// Listen on the latency probe's ports (`crate::devices::probe`).
    pub probe: Option<Arc<crate::devices::probe::ProbeChannel>>,
}

/// Set by SIGINT/SIGTERM during a boot: stop the guest and still print
/// the report.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn interrupt_handler(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// SIGINT and SIGTERM set [`INTERRUPTED`] for one boot: installed with
/// [`InterruptWatch::install`] (the flag cleared first), and the previous
/// handlers - `notifier::restore`'s, which writes host settings back and
/// ends the process - are put back on drop. A second boot in the same
/// process starts uninterrupted; a signal after the boot acts as it would
/// have without one.
struct InterruptWatch {
    old: [(libc::c_int, libc::sigaction); 2],
}

impl InterruptWatch {
    fn install() -> Result<Self, BootError> {
        INTERRUPTED.store(false, Ordering::SeqCst);
        let mut old = [
            (libc::SIGINT, empty_sigaction()),
            (libc::SIGTERM, empty_sigaction()),
        ];
        for (sig, prev) in &mut old {
            let mut act = empty_sigaction();
            act.sa_sigaction = interrupt_handler as extern "C" fn(libc::c_int) as usize;
            // SAFETY: `act` is a fully initialised sigaction whose handler
            // only stores to an atomic (async-signal-safe); `prev` is
            // valid for the old action to be written to.
            let rc = unsafe {
                libc::sigemptyset(&mut act.sa_mask);
                libc::sigaction(*sig, &act, prev)
            };
            if rc != 0 {
                return Err(BootError::Plumbing(format!(
                    "signal handler: {}",
                    std::io::Error::last_os_error()
                )));
            }
        }
        Ok(InterruptWatch { old })
    }
}

impl Drop for InterruptWatch {
    fn drop(&mut self) {
        for (sig, prev) in &self.old {
            // SAFETY: `prev` is the action sigaction returned for `sig`
            // in `install`; putting it back has no other effect.
            unsafe { libc::sigaction(*sig, prev, std::ptr::null_mut()) };
        }
    }
}

fn empty_sigaction() -> libc::sigaction {
    // SAFETY: sigaction is a plain C struct for which all-zero bytes is a
    // valid value (SIG_DFL, empty mask, no flags).
    unsafe { std::mem::zeroed() }
}

/// Ends the event loop when the vCPU thread is done.
struct ExitWatch {
    /// Written by the vCPU thread when it stops.
    evt: EventFd,
    /// Set once the event fires.
    done: Arc<AtomicBool>,
}

impl MutEventSubscriber for ExitWatch {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.evt.read();
        self.done.store(true, Ordering::SeqCst);
    }

    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new(&self.evt, EventSet::IN));
    }
}

/// A fresh run directory's serial log.
fn run_dir_log() -> PathBuf {
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    PathBuf::from(format!("/tmp/vmm-runs/boot-{ts}-{}", std::process::id())).join("serial.log")
}

/// What the vCPU thread hands back.
struct VcpuDone {
    result: Result<LinuxStop, VcpuError>,
    exits: LinuxExits,
}

/// Boot on `ram`: create the VM (memslot 0 = `ram.slot`), load the kernel,
/// initramfs, command line and zero page through `ram.mem` (or its
/// staging), run the vCPU and the event loop until reset, error, timeout
/// or signal. Setup problems are `Err`; a boot that ran returns a report
/// (whose `error` says if it ended in a runtime error).
pub fn boot(
    cfg: &LinuxBoot,
    inputs: BootInputs,
    mut ram: BootMemory,
    hooks: BootHooks,
) -> Result<BootReport, BootError> {
    let BootHooks {
        mut on_tick,
        efault_retries,
        stop_on,
        probe,
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

    let mut vm = Vm::new(&kvm)?;
    vm.create_irqchip()?;
    vm.add_memslot(0, 0, ram.slot.clone())?;
    let line = cmdline::compose(cfg.guest.cmdline.as_deref(), cfg.guest.append.as_deref());
    let entry = loader::load_linux(&load, ram.size, &image, &initrd, &line)?;
    drop(image);
    drop(initrd);
    let mut vcpu: Vcpu = vm.create_vcpu(0)?;
    vcpu.setup_linux_boot(&load, entry)?;
    if let Some(s) = ram.staging.take() {
        (s.commit)(&s.mem).map_err(BootError::Staging)?;
    }
    drop(load);

    // Devices.
    let log_path = cfg.guest.serial_log.clone().unwrap_or_else(run_dir_log);
    let log_err = |source| BootError::SerialLog {
        path: log_path.clone(),
        source,
    };
    if let Some(dir) = log_path.parent() {
        std::fs::create_dir_all(dir).map_err(log_err)?;
    }
    let log = File::create(&log_path).map_err(log_err)?;
    let timeline = Arc::new(Mutex::new(Timeline::new(start, &cfg.init_marker)));
    let plumb = |e: std::io::Error| BootError::Plumbing(e.to_string());
    let irq = EventFd::new(EFD_NONBLOCK).map_err(plumb)?;
    vm.register_irqfd(&irq, COM1_GSI)?;
    let out = SerialOut::new(!cfg.guest.quiet, log, timeline.clone());
    let echo_dropped = out.echo_dropped();
    let serial = Arc::new(Mutex::new(Serial::new(IrqTrigger(irq), out)));

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
    let _interrupts = InterruptWatch::install()?;

    // The vCPU thread.
    let stop = Arc::new(AtomicBool::new(false));
    let mut ctl = RunControl {
        deadline: start.checked_add(cfg.timeout),
        ..Default::default()
    }
    .stop_on(stop.clone());
    if let Some(f) = stop_on {
        ctl = ctl.stop_on(f);
    }
    ctl.sample_every = cfg.profile.as_ref().map(|p| p.every);
    // A PIC interrupt KVM left pending (vstate::irqchip): the main loop
    // watches the PIC, the vCPU thread makes KVM look again.
    let reevaluate = Arc::new(AtomicBool::new(false));
    ctl.reevaluate_irqs = Some(reevaluate.clone());
    let mut irq_watch = StuckIrqWatch::default();
    let mut exits = LinuxExits {
        pio: PioBus { serial, probe },
        mem,
        timeline: timeline.clone(),
        assists: Default::default(),
        verbose_assists: !cfg.guest.quiet,
        profiler: cfg
            .profile
            .as_ref()
            .map(|p| Profiler::new(Arc::new(Symbols::load(p.system_map.as_deref())))),
        efault_retries,
    };
    let handle = std::thread::Builder::new()
        .name("vcpu0".into())
        .spawn(move || {
            if let Ok(mut t) = exits.timeline.lock() {
                t.mark_first_run();
            }
            let result = vcpu.run(&mut exits, &ctl);
            let _ = exit_evt.write(1);
            VcpuDone { result, exits }
        })
        .map_err(plumb)?;

    let mut was_interrupted = false;
    // (A vCPU thread that died without writing its exit event ends the
    // loop too: the join below says so.)
    while !done.load(Ordering::SeqCst) && !handle.is_finished() {
        if let Err(e) = em.run_with_timeout(200) {
            if !matches!(e, event_manager::Error::Epoll(ref e) if e.errno() == libc::EINTR) {
                stop.store(true, Ordering::SeqCst);
            }
        }
        if let Ok(lines) = vm.pic_waiting() {
            if irq_watch.observe(lines, Instant::now()) {
                reevaluate.store(true, Ordering::Release);
            }
        }
        if let (Some(f), Ok(t)) = (on_tick.as_mut(), timeline.lock()) {
            if f(&t) {
                stop.store(true, Ordering::SeqCst);
            }
        }
        if INTERRUPTED.load(Ordering::SeqCst) {
            was_interrupted = true;
            stop.store(true, Ordering::SeqCst);
        }
    }
    let VcpuDone { result, exits } = crate::thread::join("vcpu0", handle)?;

    let error = match result {
        Ok(LinuxStop::Reset) => None,
        Ok(LinuxStop::Error(e)) => Some(e),
        Err(VcpuError::Stopped { rip }) if was_interrupted => Some(BootError::Interrupted { rip }),
        Err(VcpuError::Stopped { .. }) => Some(BootError::Plumbing("stopped".into())),
        Err(VcpuError::TimedOut { rip, dump }) => Some(BootError::Timeout {
            secs: cfg.timeout.as_secs(),
            rip,
            dump,
        }),
        Err(VcpuError::Shutdown { dump }) => Some(BootError::TripleFault { dump }),
        Err(VcpuError::Internal { suberror, dump }) => Some(BootError::Internal { suberror, dump }),
        Err(VcpuError::Unexpected { exit, .. }) => Some(BootError::UnexpectedExit(exit)),
        Err(e) => Some(BootError::Run(e)),
    };
    let t = timeline
        .lock()
        .map_err(|_| BootError::Plumbing("timeline lock".into()))?;
    let exit = t.classify(error.as_ref().map(|e| e.to_string()));
    let assists: Vec<(String, u64)> = exits.assists.0.into_iter().collect();
    let mut text = t.report(&exit, &assists);
    if irq_watch.fired > 0 {
        text.push_str(&format!(
            "\ninterrupts re-evaluated: {} (a PIC request waited {} ms unserved)",
            irq_watch.fired,
            STUCK_AFTER.as_millis()
        ));
    }
    let not_echoed = echo_dropped.map_or(0, |d| d.load(Ordering::Relaxed));
    if not_echoed > 0 {
        text.push_str(&format!(
            "\nconsole: {not_echoed} bytes not echoed to stdout (it was not read fast enough); the serial log has them all"
        ));
    }
    if let (Some(p), Some(profile)) = (exits.profiler, &cfg.profile) {
        let syms = Symbols::load(profile.system_map.as_deref());
        text = format!("{}\n{text}", syms.report(&p.samples, 30));
    }
    let json = t.json(
        &exit,
        &assists,
        serde_json::json!({
            "mem_mib": ram.size >> 20,
            "hugepages": memory::hugepages_name(ram.hugepages),
            "cmdline": line,
            "serial_log": log_path,
            "irq_reevaluations": irq_watch.fired,
            "console_bytes_not_echoed": not_echoed,
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
