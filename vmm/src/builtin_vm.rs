//! A KVM VM for the built-in CPL3 guests (`guests::builtin`,
//! `guests::probe`): one memslot over a [`UffdGuestRam`]'s guest-facing
//! mapping, one vCPU started in long mode directly at CPL3, and a watchdog
//! that interrupts `KVM_RUN` after a deadline. Used by `vmm run` and
//! `vmm latency`.

use crate::guest_ram_uffd::UffdGuestRam;
use crate::x86;
use guests::builtin::{self, LAYOUT};
use kvm_bindings::{kvm_regs, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum BuiltinVmError {
    #[error("{what}: {source}")]
    Vm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error(transparent)]
    Cpu(#[from] x86::CpuError),
    #[error("signal handler: {0}")]
    Signal(String),
}

fn vm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> BuiltinVmError {
    move |source| BuiltinVmError::Vm { what, source }
}

/// The VM, its vCPU (set up at CPL3, ready for `KVM_RUN`) and the guest
/// RAM its memslot points at. Field order is drop order: the vCPU and the
/// VM go before the RAM mapping they use.
pub struct BuiltinVm {
    pub vcpu: VcpuFd,
    pub vm: VmFd,
    ram: Arc<UffdGuestRam>,
}

impl BuiltinVm {
    /// Create the VM with slot 0 = all of `ram` at gpa 0 and vCPU 0 at
    /// CPL3 at `LAYOUT.code`.
    pub fn new(kvm: &Kvm, ram: Arc<UffdGuestRam>) -> Result<Self, BuiltinVmError> {
        let vm = kvm.create_vm().map_err(vm_err("KVM_CREATE_VM"))?;
        vm.set_tss_address(0xfffb_d000)
            .map_err(vm_err("KVM_SET_TSS_ADDR"))?;
        let region = kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: ram.size(),
            userspace_addr: ram.guest_hva(),
        };
        // SAFETY: the guest-facing mapping covers `size` bytes at
        // `guest_hva` and is owned by `ram`, which this struct holds and
        // drops after the VM and the vCPU (field order).
        unsafe { vm.set_user_memory_region(region) }
            .map_err(vm_err("KVM_SET_USER_MEMORY_REGION"))?;
        let vcpu = x86::create_vcpu(kvm, &vm, 0).map_err(|(what, e)| vm_err(what)(e))?;
        setup_cpl3(&vcpu)?;
        Ok(BuiltinVm { vcpu, vm, ram })
    }

    pub fn ram(&self) -> &Arc<UffdGuestRam> {
        &self.ram
    }

    /// A description of an unexpected exit, with the vCPU's state.
    pub fn describe_exit(&self, exit: String) -> (String, u64) {
        let mut exit = exit;
        if let (Ok(r), Ok(sr)) = (self.vcpu.get_regs(), self.vcpu.get_sregs()) {
            exit += &format!(
                " (rflags {:#x}, cs {:#x} dpl {}, cr0 {:#x}, rsp {:#x})",
                r.rflags, sr.cs.selector, sr.cs.dpl, sr.cr0, r.rsp
            );
        }
        let rip = self.vcpu.get_regs().map(|r| r.rip).unwrap_or(0);
        (exit, rip)
    }
}

/// The segment/paging state for the built-in guests: long mode, CPL3 code
/// and stack segments, the busy 64-bit TSS, CR3 at the identity tables,
/// interrupts off (the guest talks through MMIO doorbells).
fn setup_cpl3(vcpu: &VcpuFd) -> Result<(), BuiltinVmError> {
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
pub struct Watchdog {
    stop: Arc<AtomicBool>,
    fired: Arc<AtomicBool>,
    handle: Option<std::thread::JoinHandle<()>>,
}

impl Watchdog {
    /// Kick after `timeout`, or as soon as `abort` is set (e.g. the fault
    /// thread died and the vCPU sleeps in a fault nobody will resolve).
    pub fn start(timeout: Duration, abort: Arc<AtomicBool>) -> Result<Self, BuiltinVmError> {
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
            return Err(BuiltinVmError::Signal(e.to_string()));
        }
        // SAFETY: pthread_self has no preconditions.
        let target = unsafe { libc::pthread_self() };
        let stop = Arc::new(AtomicBool::new(false));
        let fired = Arc::new(AtomicBool::new(false));
        let (s, f) = (stop.clone(), fired.clone());
        let handle = std::thread::spawn(move || {
            let deadline = Instant::now() + timeout;
            while !s.load(Ordering::Acquire) {
                if Instant::now() >= deadline || abort.load(Ordering::Acquire) {
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

    /// Whether the deadline passed.
    pub fn fired(&self) -> bool {
        self.fired.load(Ordering::Acquire)
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
