//! The populating guest's machine (`guests::l1svm`): a system memslot at
//! gpa 0 holding the image (tables, VMCB, programs), one vCPU at CPL3
//! (direct) or CPL0 (the guest hypervisor), and [`PopulatingGuest::round`]:
//! run the guest until it has written every page once more, so the host
//! KVM holds SPTEs and rmaps for all of them again. The vCPU is out of
//! `KVM_RUN` between rounds: the host invalidates while no vCPU runs,
//! which changes nothing in what the notifier's rmap walk does.

use std::sync::Arc;
use std::time::{Duration, Instant};

use guests::l1svm::{self, Mode, Touch};
use notifier::Mmap;

use super::doorbell_u64;
use crate::arch::x86_64::cpuid;
use crate::vstate::vcpu::{ExitHandler, Handled, RunControl, SetupError, VcpuError};
use crate::vstate::vm::{SlotMemory, Vm, VmError};
use crate::vstate::Vcpu;

#[derive(Debug, thiserror::Error)]
pub enum PopulateError {
    #[error(transparent)]
    Image(#[from] l1svm::L1svmError),
    #[error("this host's KVM offers its guests no SVM with nested paging (KVM_GET_SUPPORTED_CPUID: leaf 0x80000001 ECX.SVM, leaf 0x8000000a EDX.NP): load kvm_amd with nested=1 - the emulated host (`vmm host`) does; this machine's PVM KVM cannot run a guest hypervisor")]
    NoSvm,
    #[error("the system memslot: {0}")]
    Map(#[from] notifier::Error),
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Setup(#[from] SetupError),
    #[error("populating round {round}: {source}")]
    Vcpu {
        round: u64,
        #[source]
        source: VcpuError,
    },
    #[error("populating round {round}: the L2 left with #VMEXIT code {code:#x} (exit_info_1 {info1:#x}, exit_info_2 {info2:#x}), not VMMCALL")]
    L2Exit {
        round: u64,
        code: u64,
        info1: u64,
        info2: u64,
    },
}

/// The system slot's memory: one anonymous mapping.
struct SysRam(Mmap);

// SAFETY: the mapping is owned by this value and unmapped only when it is
// dropped; the VM and vCPU hold `Arc`s of it.
unsafe impl SlotMemory for SysRam {
    fn slot_hva(&self) -> u64 {
        self.0.addr()
    }
    fn slot_size(&self) -> u64 {
        self.0.len() as u64
    }
}

impl SysRam {
    fn bytes(&self) -> &[u8] {
        // SAFETY: the mapping is `len()` readable bytes that live as long
        // as `self`; the guest writes only its data region (other
        // memslots), never this one after the VMM wrote the image, except
        // for the VMCB fields the processor writes at #VMEXIT - read here
        // only between runs, with the vCPU out of KVM_RUN.
        unsafe { std::slice::from_raw_parts(self.0.as_ptr(), self.0.len()) }
    }
}

/// Ends a run at the round doorbell with the value stored there.
struct RoundDoorbell;

impl ExitHandler for RoundDoorbell {
    type Stop = u64;
    fn mmio_write(&mut self, addr: u64, data: &[u8]) -> Handled<u64> {
        if addr == l1svm::ROUND_MMIO {
            Handled::Stop(doorbell_u64(data))
        } else {
            Handled::Unhandled(format!("MmioWrite({addr:#x}, {data:x?})"))
        }
    }
}

/// The guest, ready for rounds.
pub struct PopulatingGuest {
    pub touch: Touch,
    sys: Arc<SysRam>,
    vcpu: Vcpu,
    pub rounds: u64,
    /// The longest round so far.
    pub worst_round: Duration,
}

impl PopulatingGuest {
    /// The image in a new memslot `slot` at gpa 0, and the vCPU. Add the
    /// data memslots (from `l1svm::DATA_GPA`) first: the vCPU keeps the
    /// VM's memory alive.
    pub fn new(vm: &mut Vm, slot: u32, touch: Touch) -> Result<Self, PopulateError> {
        if touch.mode == Mode::Nested && !cpuid::svm_with_npt(vm.cpuid()) {
            return Err(PopulateError::NoSvm);
        }
        let img = touch.image()?;
        let rw = libc::PROT_READ | libc::PROT_WRITE;
        let map = Mmap::anon(img.len(), rw, 0)?;
        // SAFETY: the mapping is `img.len()` writable bytes, new, and no
        // other reference to it exists yet.
        unsafe { std::ptr::copy_nonoverlapping(img.as_ptr(), map.as_ptr(), img.len()) };
        let sys = Arc::new(SysRam(map));
        vm.add_memslot(slot, 0, sys.clone())?;
        let vcpu = vm.create_vcpu(0)?;
        match touch.mode {
            Mode::Direct => vcpu.setup_cpl3()?,
            Mode::Nested => vcpu.setup_cpl0()?,
        }
        Ok(PopulatingGuest {
            touch,
            sys,
            vcpu,
            rounds: 0,
            worst_round: Duration::ZERO,
        })
    }

    /// One round over every page; how long it took. A round has `limit`.
    pub fn round(&mut self, limit: Duration) -> Result<Duration, PopulateError> {
        let round = self.rounds + 1;
        let t0 = Instant::now();
        let code = self
            .vcpu
            .run(&mut RoundDoorbell, &RunControl::timeout(limit))
            .map_err(|source| PopulateError::Vcpu { round, source })?;
        let took = t0.elapsed();
        if code != l1svm::EXIT_VMMCALL {
            let img = self.sys.bytes();
            return Err(PopulateError::L2Exit {
                round,
                code,
                info1: l1svm::vmcb_word(img, l1svm::vmcb::EXIT_INFO_1),
                info2: l1svm::vmcb_word(img, l1svm::vmcb::EXIT_INFO_2),
            });
        }
        self.rounds = round;
        self.worst_round = self.worst_round.max(took);
        Ok(took)
    }
}
