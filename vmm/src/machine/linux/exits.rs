//! The Linux guest's half of the `KVM_RUN` loop: port I/O to the legacy
//! devices, the i8042 / system-event reset, the emulation assist for what
//! the host's emulator gives up on, EFAULT re-entry while the VMM holds
//! guest RAM read-only, and profiling samples on kicks.

use std::io::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use vm_memory::GuestMemoryMmap;

use super::profile::Profiler;
use super::BootError;
use crate::arch::x86_64::emulate::{self, AssistCounts};
use crate::devices::{PioAction, PioBus};
use crate::report::timeline::Timeline;
use crate::vstate::{ExitHandler, Handled, Vcpu};

/// How the guest ended a run that its handler stopped.
#[derive(Debug)]
pub enum LinuxStop {
    /// It reset (i8042 0xFE, or a reset/shutdown system event).
    Reset,
    /// An exit the VMM could not carry out (an instruction the assist
    /// does not handle).
    Error(BootError),
}

/// See the module docs.
pub struct LinuxExits {
    pub pio: PioBus,
    /// The VMM's view of guest RAM (the assist's fetch and operands, the
    /// profiler's stack reads).
    pub mem: GuestMemoryMmap,
    pub timeline: Arc<Mutex<Timeline>>,
    pub assists: AssistCounts,
    /// Print the first use of each assist on stderr.
    pub verbose_assists: bool,
    pub profiler: Option<Profiler>,
    /// When set, `KVM_RUN` answering EFAULT (a guest store to RAM the VMM
    /// made read-only for a moment) is counted here and re-entered.
    pub efault_retries: Option<Arc<AtomicU64>>,
}

impl ExitHandler for LinuxExits {
    type Stop = LinuxStop;

    fn io_in(&mut self, port: u16, data: &mut [u8]) -> Handled<LinuxStop> {
        self.pio.io_in(port, data);
        Handled::Continue
    }

    fn io_out(&mut self, port: u16, data: &[u8]) -> Handled<LinuxStop> {
        if self.pio.io_out(port, data) == PioAction::Reset {
            if let Ok(mut t) = self.timeline.lock() {
                t.mark_reboot();
            }
            return Handled::Stop(LinuxStop::Reset);
        }
        Handled::Continue
    }

    fn mmio_read(&mut self, _addr: u64, data: &mut [u8]) -> Handled<LinuxStop> {
        // No MMIO devices: reads float high.
        data.fill(0xff);
        Handled::Continue
    }

    fn mmio_write(&mut self, _addr: u64, _data: &[u8]) -> Handled<LinuxStop> {
        Handled::Continue
    }

    fn hlt(&mut self) -> Handled<LinuxStop> {
        Handled::Continue
    }

    fn system_event(&mut self, kind: u32) -> Handled<LinuxStop> {
        if kind == kvm_bindings::KVM_SYSTEM_EVENT_RESET
            || kind == kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN
        {
            return Handled::Stop(LinuxStop::Reset);
        }
        Handled::Unhandled(format!("system event {kind}"))
    }

    fn emulation_failure(&mut self, vcpu: &Vcpu) -> Handled<LinuxStop> {
        match emulate::emulation_failure(vcpu, &self.mem, &mut self.assists) {
            Ok(a) => {
                if self.verbose_assists && self.assists.0.get(&a.mnemonic) == Some(&1) {
                    let t = self
                        .timeline
                        .lock()
                        .map(|t| t.now().as_secs_f64())
                        .unwrap_or(0.0);
                    // On the vCPU thread: a closed stderr must not panic it.
                    let _ = writeln!(
                        std::io::stderr(),
                        "[vmm {t:8.3}] assist: first {} at {:#x}",
                        a.mnemonic,
                        a.rip
                    );
                }
                Handled::Continue
            }
            Err(e) => Handled::Stop(LinuxStop::Error(e.into())),
        }
    }

    fn memory_fault(&mut self, _vcpu: &Vcpu, gpa: Option<u64>) -> Handled<LinuxStop> {
        match &self.efault_retries {
            Some(n) => {
                n.fetch_add(1, Ordering::Relaxed);
                std::thread::yield_now();
                Handled::Continue
            }
            None => Handled::Unhandled(format!("memory fault at gpa {gpa:x?}")),
        }
    }

    fn kicked(&mut self, vcpu: &Vcpu) -> Handled<LinuxStop> {
        if let Some(p) = self.profiler.as_mut() {
            p.sample(vcpu, &self.mem, &self.assists);
        }
        Handled::Continue
    }
}
