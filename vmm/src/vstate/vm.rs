//! One VM: the VM fd, its memslots, the in-kernel irqchip and PIT, and its
//! vCPUs (created with the CPUID this host can run).

use std::sync::Arc;

use kvm_bindings::{
    kvm_irqchip, kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_IRQCHIP_PIC_MASTER,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use vmm_sys_util::eventfd::EventFd;

use super::vcpu::Vcpu;
use crate::arch::x86_64::{cpuid, layout::KVM_TSS_ADDR};

/// A VM-level KVM ioctl that failed.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct VmError {
    pub what: &'static str,
    #[source]
    pub source: kvm_ioctls::Error,
}

fn ioctl(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError { what, source }
}

/// Memory a memslot may point at: a mapping of `slot_size()` bytes at
/// `slot_hva()` that stays mapped as long as the value lives.
///
/// # Safety
/// An implementation promises that `[slot_hva(), slot_hva() + slot_size())`
/// is one mapping it owns and unmaps only when dropped: KVM reads and
/// writes it for as long as the VM and its vCPUs hold a reference, and the
/// [`Vm`] and every [`Vcpu`] hold one.
pub unsafe trait SlotMemory: Send + Sync {
    fn slot_hva(&self) -> u64;
    fn slot_size(&self) -> u64;
}

/// A VM. Field order is drop order: the fd goes before the memory its
/// memslots point at.
pub struct Vm {
    fd: VmFd,
    /// The host's supported CPUID, filtered for this host ([`cpuid::filter`]).
    cpuid: CpuId,
    memory: Vec<Arc<dyn SlotMemory>>,
}

impl Vm {
    /// `KVM_CREATE_VM`, the TSS KVM needs on x86 (`KVM_SET_TSS_ADDR`), and
    /// the CPUID its vCPUs get.
    pub fn new(kvm: &Kvm) -> Result<Self, VmError> {
        let fd = kvm.create_vm().map_err(ioctl("KVM_CREATE_VM"))?;
        fd.set_tss_address(notifier::convert::u64_to_usize(KVM_TSS_ADDR))
            .map_err(ioctl("KVM_SET_TSS_ADDR"))?;
        let mut cpuid = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(ioctl("KVM_GET_SUPPORTED_CPUID"))?;
        cpuid::filter(&mut cpuid);
        Ok(Vm {
            fd,
            cpuid,
            memory: Vec::new(),
        })
    }

    /// The CPUID its vCPUs get.
    pub fn cpuid(&self) -> &CpuId {
        &self.cpuid
    }

    /// The in-kernel irqchip (PIC, IOAPIC, LAPICs) and PIT (speaker dummy).
    pub fn create_irqchip(&self) -> Result<(), VmError> {
        self.fd
            .create_irq_chip()
            .map_err(ioctl("KVM_CREATE_IRQCHIP"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        self.fd.create_pit2(pit).map_err(ioctl("KVM_CREATE_PIT2"))
    }

    /// The master PIC's requests that should be reaching the vCPU now
    /// ([`irqchip::waiting`](super::irqchip::waiting): raised, unmasked,
    /// none in service), read with `KVM_GET_IRQCHIP` (callable while the
    /// vCPU runs).
    pub fn pic_waiting(&self) -> Result<u8, VmError> {
        let mut chip = kvm_irqchip {
            chip_id: KVM_IRQCHIP_PIC_MASTER,
            ..Default::default()
        };
        self.fd
            .get_irqchip(&mut chip)
            .map_err(ioctl("KVM_GET_IRQCHIP"))?;
        // SAFETY: for KVM_IRQCHIP_PIC_MASTER, KVM fills the `pic` member
        // of the union (a plain-data struct, any bit pattern valid).
        let pic = unsafe { chip.chip.pic };
        Ok(super::irqchip::waiting(pic.irr, pic.imr, pic.isr))
    }

    /// Memslot `slot` at `gpa` over all of `mem`; the VM keeps `mem` alive.
    pub fn add_memslot(
        &mut self,
        slot: u32,
        gpa: u64,
        mem: Arc<dyn SlotMemory>,
    ) -> Result<(), VmError> {
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: gpa,
            memory_size: mem.slot_size(),
            userspace_addr: mem.slot_hva(),
        };
        // SAFETY: `SlotMemory` promises the range is one mapping that lives
        // as long as `mem`; this VM and each of its vCPUs keep a clone of
        // `mem`, dropped after their fds (field order).
        unsafe { self.fd.set_user_memory_region(region) }
            .map_err(ioctl("KVM_SET_USER_MEMORY_REGION"))?;
        self.memory.push(mem);
        Ok(())
    }

    /// Raise `gsi` whenever `evt` is written (`KVM_IRQFD`).
    pub fn register_irqfd(&self, evt: &EventFd, gsi: u32) -> Result<(), VmError> {
        self.fd.register_irqfd(evt, gsi).map_err(ioctl("KVM_IRQFD"))
    }

    /// vCPU `id` with the VM's CPUID: the one way every guest's vCPU is
    /// made. Add the memslots first: the vCPU keeps their memory alive.
    pub fn create_vcpu(&self, id: u64) -> Result<Vcpu, VmError> {
        let fd = self.fd.create_vcpu(id).map_err(ioctl("KVM_CREATE_VCPU"))?;
        fd.set_cpuid2(&self.cpuid)
            .map_err(ioctl("KVM_SET_CPUID2"))?;
        Ok(Vcpu::new(fd, self.memory.clone()))
    }
}
