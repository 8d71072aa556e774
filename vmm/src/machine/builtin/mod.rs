//! The built-in guests' machine (`guests::builtin`, `guests::probe`,
//! `guests::l1hv`): one memslot over a [`UffdGuestRam`]'s guest-facing
//! mapping at gpa 0, one vCPU started in long mode directly at CPL3 at the
//! program's entry, no devices: the guests talk through MMIO doorbells,
//! the [`ExitHandler`](crate::vstate::ExitHandler) of whoever runs them
//! reads them ([`touch`]: the touch guest end to end). [`populate`] is the
//! odd one: `guests::l1svm`'s system slot beside huge data memslots, at
//! CPL0 when it is a guest hypervisor.

pub mod populate;
pub mod touch;

use std::sync::Arc;

use kvm_ioctls::Kvm;

use crate::memory::uffd::UffdGuestRam;
use crate::vstate::vcpu::SetupError;
use crate::vstate::{Vcpu, Vm, VmError};

#[derive(Debug, thiserror::Error)]
pub enum BuiltinVmError {
    #[error(transparent)]
    Vm(#[from] VmError),
    #[error(transparent)]
    Setup(#[from] SetupError),
}

/// The VM and its vCPU, set up at CPL3 and ready to run. The vCPU and the
/// VM keep the RAM's mapping alive.
pub struct BuiltinVm {
    pub vcpu: Vcpu,
    pub vm: Vm,
}

impl BuiltinVm {
    /// Slot 0 = all of `ram` at gpa 0, vCPU 0 at CPL3 at the program's
    /// entry.
    pub fn new(kvm: &Kvm, ram: Arc<UffdGuestRam>) -> Result<Self, BuiltinVmError> {
        let mut vm = Vm::new(kvm)?;
        vm.add_memslot(0, 0, ram)?;
        let vcpu = vm.create_vcpu(0)?;
        vcpu.setup_cpl3()?;
        Ok(BuiltinVm { vcpu, vm })
    }
}

/// The value of an MMIO doorbell store (little-endian, up to 8 bytes).
pub fn doorbell_u64(data: &[u8]) -> u64 {
    let mut w = [0u8; 8];
    let n = data.len().min(8);
    w[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(w)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doorbells_are_little_endian_and_bounded() {
        assert_eq!(doorbell_u64(&[1, 2]), 0x0201);
        assert_eq!(doorbell_u64(&[0xff; 12]), u64::MAX);
        assert_eq!(doorbell_u64(&[]), 0);
    }
}
