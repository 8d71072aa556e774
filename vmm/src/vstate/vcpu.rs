//! One vCPU: its fd, the state it starts in, and the one `KVM_RUN` loop.
//!
//! [`Vcpu::run`] enters the guest until an [`ExitHandler`] - the part each
//! guest kind brings (the Linux machine's port I/O devices and emulation
//! assist, the built-in guests' MMIO doorbells) - stops it, or an exit no
//! handler takes ends the run with a [`VcpuError`] that carries the vCPU's
//! registers.
//!
//! One kick mechanism: while a run has a deadline, stop flags or a sample
//! period ([`RunControl`]), a kicker thread scoped to the run sends the
//! vCPU thread `SIGRTMIN` (a no-op handler: `KVM_RUN` returns `EINTR`).
//! To stop a run it keeps kicking every 20 ms until the run has returned,
//! since a signal can land just before the thread enters `KVM_RUN`. A kick
//! that does not stop the run goes to [`ExitHandler::kicked`] (a profiling
//! sample). A third reason to kick: [`RunControl::reevaluate_irqs`], set
//! when a PIC interrupt waits unserved ([`super::irqchip`]); the vCPU
//! thread then makes KVM look at pending interrupts again
//! ([`Vcpu::reevaluate_interrupts`]) before it re-enters.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs, Msrs};
use kvm_ioctls::{VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::vm::SlotMemory;
use crate::arch::x86_64::emulate::{CpuState, CpuStateError, SUBERROR_EMULATION};
use crate::arch::x86_64::regs;

/// What an [`ExitHandler`] makes of an exit.
#[derive(Debug)]
pub enum Handled<S> {
    /// Enter the guest again.
    Continue,
    /// End the run with this result.
    Stop(S),
    /// Not an exit this guest expects (described): the run ends with
    /// [`VcpuError::Unexpected`].
    Unhandled(String),
}

/// The part of the `KVM_RUN` loop a guest kind brings. Every exit it does
/// not override is unexpected.
pub trait ExitHandler {
    /// What a run the handler ends returns (its result, or its error).
    type Stop;

    fn io_in(&mut self, port: u16, data: &mut [u8]) -> Handled<Self::Stop> {
        Handled::Unhandled(format!("IoIn(port {port:#x}, {} bytes)", data.len()))
    }
    fn io_out(&mut self, port: u16, data: &[u8]) -> Handled<Self::Stop> {
        Handled::Unhandled(format!("IoOut(port {port:#x}, {data:x?})"))
    }
    fn mmio_read(&mut self, addr: u64, data: &mut [u8]) -> Handled<Self::Stop> {
        Handled::Unhandled(format!("MmioRead({addr:#x}, {} bytes)", data.len()))
    }
    fn mmio_write(&mut self, addr: u64, data: &[u8]) -> Handled<Self::Stop> {
        Handled::Unhandled(format!("MmioWrite({addr:#x}, {data:x?})"))
    }
    fn hlt(&mut self) -> Handled<Self::Stop> {
        Handled::Unhandled("Hlt".into())
    }
    /// `KVM_EXIT_SYSTEM_EVENT` of type `kind` (reset, shutdown, ...).
    fn system_event(&mut self, kind: u32) -> Handled<Self::Stop> {
        Handled::Unhandled(format!("SystemEvent({kind})"))
    }
    /// `KVM_EXIT_INTERNAL_ERROR` with `KVM_INTERNAL_ERROR_EMULATION`: the
    /// host's instruction emulator gave up on the instruction at RIP.
    fn emulation_failure(&mut self, _vcpu: &Vcpu) -> Handled<Self::Stop> {
        Handled::Unhandled("emulation failure".into())
    }
    /// A guest access KVM could not map: `KVM_RUN` answered `EFAULT`
    /// (`gpa` None), or `KVM_EXIT_MEMORY_FAULT`. Unhandled, the run ends
    /// with the `EFAULT`.
    fn memory_fault(&mut self, _vcpu: &Vcpu, gpa: Option<u64>) -> Handled<Self::Stop> {
        Handled::Unhandled(format!("memory fault at gpa {gpa:x?}"))
    }
    /// A kick that did not stop the run (a [`RunControl::sample_every`]
    /// tick).
    fn kicked(&mut self, _vcpu: &Vcpu) -> Handled<Self::Stop> {
        Handled::Continue
    }
}

/// When a run must stop, and how often to kick it.
#[derive(Debug, Clone, Default)]
pub struct RunControl {
    /// Stop when this passes ([`VcpuError::TimedOut`]).
    pub deadline: Option<Instant>,
    /// Stop as soon as any of these is set ([`VcpuError::Stopped`]): the
    /// VMM's own stop request, a helper thread that failed.
    pub stop: Vec<Arc<AtomicBool>>,
    /// Kick the vCPU this often; each kick goes to [`ExitHandler::kicked`].
    pub sample_every: Option<Duration>,
    /// When set, the vCPU is kicked and, before it enters the guest
    /// again, clears it and calls [`Vcpu::reevaluate_interrupts`].
    pub reevaluate_irqs: Option<Arc<AtomicBool>>,
}

impl RunControl {
    /// A run that times out `after` from now (saturating: a timeout too
    /// large for the clock never fires).
    pub fn timeout(after: Duration) -> Self {
        RunControl {
            deadline: Instant::now().checked_add(after),
            ..Default::default()
        }
    }

    /// Also stop when `flag` is set.
    pub fn stop_on(mut self, flag: Arc<AtomicBool>) -> Self {
        self.stop.push(flag);
        self
    }

    fn stop_requested(&self) -> bool {
        self.stop.iter().any(|f| f.load(Ordering::Acquire))
    }

    fn timed_out(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d)
    }

    fn watched(&self) -> bool {
        self.deadline.is_some()
            || !self.stop.is_empty()
            || self.sample_every.is_some()
            || self.reevaluate_irqs.is_some()
    }

    fn reevaluate_requested(&self) -> bool {
        self.reevaluate_irqs
            .as_ref()
            .is_some_and(|f| f.load(Ordering::Acquire))
    }

    /// Clears the re-evaluation request; true if there was one.
    fn take_reevaluate(&self) -> bool {
        self.reevaluate_irqs
            .as_ref()
            .is_some_and(|f| f.swap(false, Ordering::AcqRel))
    }
}

/// Why a run ended without its handler stopping it.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// `KVM_EXIT_SHUTDOWN`: the guest triple-faulted.
    #[error("guest triple fault (KVM_EXIT_SHUTDOWN)\n{dump}")]
    Shutdown { dump: String },
    /// `KVM_EXIT_INTERNAL_ERROR` other than an emulation failure.
    #[error("KVM internal error, suberror {suberror}\n{dump}")]
    Internal { suberror: u32, dump: String },
    /// An exit the guest's handler does not take.
    #[error("unexpected vCPU exit: {exit} at rip {rip:#x}")]
    Unexpected {
        exit: String,
        rip: u64,
        /// rflags, CS and its DPL, CR0, RSP.
        state: String,
    },
    /// `KVM_RUN` failed.
    #[error("KVM_RUN: {source} (guest rip {rip:#x})")]
    Run {
        rip: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
    /// [`Vcpu::reevaluate_interrupts`] failed.
    #[error(
        "re-evaluating pending interrupts (KVM_GET/SET_MP_STATE): {source} (guest rip {rip:#x})"
    )]
    Reevaluate {
        rip: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The [`RunControl::deadline`] passed; `dump`: the registers then.
    #[error("the guest ran past its deadline (guest rip {rip:#x})")]
    TimedOut { rip: u64, dump: String },
    /// One of the [`RunControl::stop`] flags was set.
    #[error("the guest was stopped (guest rip {rip:#x})")]
    Stopped { rip: u64 },
    /// The kick signal's handler could not be installed.
    #[error("installing the vCPU kick signal handler: {0}")]
    Signal(String),
    /// A test's failpoint ([`crate::failpoint`]).
    #[error(transparent)]
    Injected(#[from] crate::failpoint::Injected),
}

/// A vCPU ioctl that failed while setting up the vCPU, or a boot structure
/// that did not fit in guest memory.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Kvm(#[from] CpuStateError),
    #[error("writing {0} to guest memory failed")]
    GuestWrite(&'static str),
    #[error("KVM set {set} of {want} boot MSRs")]
    Msrs { set: usize, want: usize },
}

fn ioctl(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> CpuStateError {
    move |source| CpuStateError { what, source }
}

/// The kick signal (`SIGRTMIN`, no-op handler), installed once.
fn kick_signal() -> Result<libc::c_int, VcpuError> {
    extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}
    static INSTALLED: OnceLock<Result<(), String>> = OnceLock::new();
    let sig = vmm_sys_util::signal::SIGRTMIN();
    INSTALLED
        .get_or_init(|| {
            vmm_sys_util::signal::register_signal_handler(sig, on_kick).map_err(|e| e.to_string())
        })
        .clone()
        .map_err(VcpuError::Signal)?;
    Ok(sig)
}

/// Sets `done` when dropped, also when the run loop unwinds, so the
/// scoped kicker always ends.
struct Done<'a>(&'a AtomicBool);

impl Drop for Done<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Release);
    }
}

/// The kicker: see the module docs. It alone reads the clock: when the
/// deadline passes it sets `expired`, which the run loop checks (one load
/// per exit, no clock read on the vCPU's path).
fn kicker(
    target: libc::pthread_t,
    sig: libc::c_int,
    ctl: &RunControl,
    expired: &AtomicBool,
    done: &AtomicBool,
) {
    const POLL: Duration = Duration::from_millis(20);
    // A period too long for the clock never samples.
    let mut next_sample = ctl.sample_every.and_then(|p| Instant::now().checked_add(p));
    while !done.load(Ordering::Acquire) {
        let now = Instant::now();
        if ctl.timed_out() {
            expired.store(true, Ordering::Release);
        }
        let stopping = ctl.stop_requested() || expired.load(Ordering::Acquire);
        // A re-evaluation request is kicked until the vCPU thread takes
        // it (a signal that lands outside KVM_RUN is lost).
        if stopping || ctl.reevaluate_requested() || next_sample.is_some_and(|t| now >= t) {
            // SAFETY: `target` is the thread inside `Vcpu::run`, which
            // joins this scoped thread before it returns, so the thread
            // is alive; the signal's handler is a no-op.
            unsafe { libc::pthread_kill(target, sig) };
            if let Some(p) = ctl.sample_every {
                next_sample = now.checked_add(p);
            }
        }
        let mut nap = POLL;
        if let Some(t) = next_sample {
            nap = nap.min(t.saturating_duration_since(now));
        }
        if let Some(d) = ctl.deadline {
            nap = nap.min(d.saturating_duration_since(now));
        }
        std::thread::sleep(nap.max(Duration::from_micros(100)));
    }
}

/// A vCPU. It keeps the memory of the VM's memslots mapped while it lives
/// (field order: the fd goes first).
pub struct Vcpu {
    fd: VcpuFd,
    _memory: Vec<Arc<dyn SlotMemory>>,
}

impl Vcpu {
    pub(super) fn new(fd: VcpuFd, memory: Vec<Arc<dyn SlotMemory>>) -> Self {
        Vcpu {
            fd,
            _memory: memory,
        }
    }

    /// The 64-bit Linux boot protocol: the boot GDT, IDT and identity
    /// tables written to `mem`, long mode at the kernel's `entry`, the FPU
    /// at reset, the boot MSRs, LAPIC LVT0 = ExtINT and LVT1 = NMI.
    pub fn setup_linux_boot(&self, mem: &GuestMemoryMmap, entry: u64) -> Result<(), SetupError> {
        for (gpa, v) in regs::linux_boot_tables() {
            mem.write_obj(v, GuestAddress(gpa))
                .map_err(|_| SetupError::GuestWrite("the boot GDT and page tables"))?;
        }
        let mut sregs = self.sregs()?;
        regs::linux_boot_sregs(&mut sregs);
        self.fd.set_sregs(&sregs).map_err(ioctl("KVM_SET_SREGS"))?;
        self.set_regs(&regs::linux_boot_regs(entry))?;
        self.set_fpu(&regs::reset_fpu())?;
        let entries = regs::boot_msrs();
        let want = entries.len();
        let msrs = Msrs::from_entries(&entries).map_err(|_| SetupError::Msrs { set: 0, want })?;
        let set = self.fd.set_msrs(&msrs).map_err(ioctl("KVM_SET_MSRS"))?;
        if set != want {
            return Err(SetupError::Msrs { set, want });
        }
        let mut lapic = self.fd.get_lapic().map_err(ioctl("KVM_GET_LAPIC"))?;
        regs::set_lvt_mode(&mut lapic.regs, regs::APIC_LVT0, regs::APIC_MODE_EXTINT);
        regs::set_lvt_mode(&mut lapic.regs, regs::APIC_LVT1, regs::APIC_MODE_NMI);
        self.fd.set_lapic(&lapic).map_err(ioctl("KVM_SET_LAPIC"))?;
        Ok(())
    }

    /// Long mode at CPL3 at the built-in guests' entry ([`regs::cpl3_sregs`]).
    pub fn setup_cpl3(&self) -> Result<(), SetupError> {
        self.setup_builtin(regs::cpl3_sregs)
    }

    /// Long mode at CPL0 at the same entry ([`regs::cpl0_sregs`]).
    pub fn setup_cpl0(&self) -> Result<(), SetupError> {
        self.setup_builtin(regs::cpl0_sregs)
    }

    fn setup_builtin(&self, sregs_for: fn(&mut kvm_sregs)) -> Result<(), SetupError> {
        let mut sregs = self.sregs()?;
        sregs_for(&mut sregs);
        self.fd.set_sregs(&sregs).map_err(ioctl("KVM_SET_SREGS"))?;
        self.set_regs(&regs::cpl3_regs())?;
        Ok(())
    }

    /// Make KVM evaluate pending interrupts when this vCPU next enters
    /// the guest: writing its own MP state back (`KVM_GET_MP_STATE`, then
    /// `KVM_SET_MP_STATE` of the same state) raises `KVM_REQ_EVENT` and
    /// changes nothing else. Call it between runs, from the vCPU's thread.
    /// See [`super::irqchip`] for the interrupt this recovers.
    pub fn reevaluate_interrupts(&self) -> Result<(), kvm_ioctls::Error> {
        let mp = self.fd.get_mp_state()?;
        self.fd.set_mp_state(mp)
    }

    /// The guest's RIP (0 if the registers cannot be read).
    pub fn rip(&self) -> u64 {
        self.regs().map(|r| r.rip).unwrap_or(0)
    }

    /// A full register dump for error messages.
    pub fn dump(&self) -> String {
        match (self.regs(), self.sregs()) {
            (Ok(r), Ok(s)) => regs::dump(&r, &s),
            _ => "(registers unavailable)".into(),
        }
    }

    /// rflags, CS and its DPL, CR0 and RSP: the state an unexpected exit
    /// is reported with.
    pub fn state(&self) -> String {
        match (self.regs(), self.sregs()) {
            (Ok(r), Ok(s)) => format!(
                "rflags {:#x}, cs {:#x} dpl {}, cr0 {:#x}, rsp {:#x}",
                r.rflags, s.cs.selector, s.cs.dpl, s.cr0, r.rsp
            ),
            _ => "registers unavailable".into(),
        }
    }

    fn internal_suberror(&mut self) -> u32 {
        // SAFETY: called for KVM_EXIT_INTERNAL_ERROR only, so the
        // `internal` member of the kvm_run union is the valid one.
        unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror }
    }

    /// Run the guest until `h` stops it or `ctl` says so. See the module
    /// docs for the kick.
    pub fn run<H: ExitHandler>(
        &mut self,
        h: &mut H,
        ctl: &RunControl,
    ) -> Result<H::Stop, VcpuError> {
        // Nothing to watch: nothing ever expires, no kicker.
        let expired = AtomicBool::new(false);
        if !ctl.watched() {
            return self.run_loop(h, ctl, &expired);
        }
        let sig = kick_signal()?;
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        let done = AtomicBool::new(false);
        std::thread::scope(|s| {
            let _done = Done(&done);
            let kick = std::thread::Builder::new()
                .name("vcpu-kick".into())
                .spawn_scoped(s, || kicker(me, sig, ctl, &expired, &done));
            if let Err(e) = kick {
                return Err(VcpuError::Signal(format!("spawning the kicker: {e}")));
            }
            self.run_loop(h, ctl, &expired)
        })
    }

    fn run_loop<H: ExitHandler>(
        &mut self,
        h: &mut H,
        ctl: &RunControl,
        expired: &AtomicBool,
    ) -> Result<H::Stop, VcpuError> {
        loop {
            if expired.load(Ordering::Acquire) {
                return Err(VcpuError::TimedOut {
                    rip: self.rip(),
                    dump: self.dump(),
                });
            }
            if ctl.stop_requested() {
                return Err(VcpuError::Stopped { rip: self.rip() });
            }
            if ctl.take_reevaluate() {
                if let Err(source) = self.reevaluate_interrupts() {
                    return Err(VcpuError::Reevaluate {
                        rip: self.rip(),
                        source,
                    });
                }
            }
            let exit = self.fd.run();
            crate::failpoint::hit(crate::failpoint::Point::Vcpu)?;
            let step = match exit {
                Ok(VcpuExit::IoOut(port, data)) => h.io_out(port, data),
                Ok(VcpuExit::IoIn(port, data)) => h.io_in(port, data),
                Ok(VcpuExit::MmioRead(addr, data)) => h.mmio_read(addr, data),
                Ok(VcpuExit::MmioWrite(addr, data)) => h.mmio_write(addr, data),
                Ok(VcpuExit::Hlt) => h.hlt(),
                Ok(VcpuExit::SystemEvent(kind, _)) => h.system_event(kind),
                Ok(VcpuExit::Shutdown) => return Err(VcpuError::Shutdown { dump: self.dump() }),
                Ok(VcpuExit::InternalError) => {
                    let suberror = self.internal_suberror();
                    if suberror != SUBERROR_EMULATION {
                        return Err(VcpuError::Internal {
                            suberror,
                            dump: self.dump(),
                        });
                    }
                    h.emulation_failure(self)
                }
                Ok(VcpuExit::MemoryFault { gpa, .. }) => h.memory_fault(self, Some(gpa)),
                Ok(VcpuExit::Intr) => self.kicked(h, ctl, expired),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.kicked(h, ctl, expired)
                }
                Err(e) if e.errno() == libc::EFAULT => match h.memory_fault(self, None) {
                    Handled::Unhandled(_) => {
                        return Err(VcpuError::Run {
                            rip: self.rip(),
                            source: e,
                        })
                    }
                    step => step,
                },
                Ok(other) => Handled::Unhandled(format!("{other:?}")),
                Err(e) => {
                    return Err(VcpuError::Run {
                        rip: self.rip(),
                        source: e,
                    })
                }
            };
            match step {
                Handled::Continue => {}
                Handled::Stop(s) => return Ok(s),
                Handled::Unhandled(exit) => {
                    return Err(VcpuError::Unexpected {
                        exit,
                        rip: self.rip(),
                        state: self.state(),
                    })
                }
            }
        }
    }

    /// A kick: the loop's own checks stop the run; otherwise the handler's.
    fn kicked<H: ExitHandler>(
        &self,
        h: &mut H,
        ctl: &RunControl,
        expired: &AtomicBool,
    ) -> Handled<H::Stop> {
        if expired.load(Ordering::Acquire) || ctl.stop_requested() {
            return Handled::Continue;
        }
        h.kicked(self)
    }
}

impl CpuState for Vcpu {
    fn regs(&self) -> Result<kvm_regs, CpuStateError> {
        self.fd.get_regs().map_err(ioctl("KVM_GET_REGS"))
    }
    fn set_regs(&self, regs: &kvm_regs) -> Result<(), CpuStateError> {
        self.fd.set_regs(regs).map_err(ioctl("KVM_SET_REGS"))
    }
    fn sregs(&self) -> Result<kvm_sregs, CpuStateError> {
        self.fd.get_sregs().map_err(ioctl("KVM_GET_SREGS"))
    }
    fn fpu(&self) -> Result<kvm_fpu, CpuStateError> {
        self.fd.get_fpu().map_err(ioctl("KVM_GET_FPU"))
    }
    fn set_fpu(&self, fpu: &kvm_fpu) -> Result<(), CpuStateError> {
        self.fd.set_fpu(fpu).map_err(ioctl("KVM_SET_FPU"))
    }
    fn inject_exception(&self, vector: u8) -> Result<(), CpuStateError> {
        let mut ev = self
            .fd
            .get_vcpu_events()
            .map_err(ioctl("KVM_GET_VCPU_EVENTS"))?;
        ev.exception.injected = 1;
        ev.exception.nr = vector;
        ev.exception.has_error_code = 0;
        ev.exception.error_code = 0;
        self.fd
            .set_vcpu_events(&ev)
            .map_err(ioctl("KVM_SET_VCPU_EVENTS"))
    }
}
