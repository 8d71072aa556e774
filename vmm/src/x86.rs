//! x86-64 vCPU boot state for the 64-bit Linux boot protocol: low-memory
//! layout, GDT, identity page tables, registers, boot MSRs, LAPIC LVTs and
//! the CPUID this host can really run.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, CpuId, Msrs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// GDT.
pub const GDT_ADDR: u64 = 0x500;
/// IDT (empty, limit 7: any early exception triple-faults).
pub const IDT_ADDR: u64 = 0x520;
/// Zero page (boot_params).
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer.
pub const BOOT_STACK: u64 = 0x8ff0;
/// PML4; PDPT and PD follow it.
pub const PML4_ADDR: u64 = 0x9000;
const PDPT_ADDR: u64 = 0xa000;
const PD_ADDR: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// Command line size limit (what Linux accepts on x86).
pub const CMDLINE_MAX: usize = 2048;
/// EBDA start: RAM below it is usable.
pub const EBDA_START: u64 = 0x9_fc00;

/// vCPU setup errors (each wraps the failing KVM ioctl).
#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    /// A KVM vCPU ioctl failed.
    #[error("{what}: {source}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Writing boot structures to guest memory failed.
    #[error("writing {0} to guest memory failed")]
    GuestWrite(&'static str),
    /// KVM accepted fewer MSRs than given.
    #[error("KVM set {set} of {want} boot MSRs")]
    Msrs { set: usize, want: usize },
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> CpuError {
    move |source| CpuError::Kvm { what, source }
}

/// A GDT entry from (flags, base, limit) as Linux' GDT_ENTRY macro.
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << 32)
        | ((u64::from(flags) & 0xf0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << 32)
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

/// The kvm_segment a GDT entry describes.
pub fn segment_from_gdt(entry: u64, index: u16) -> kvm_segment {
    let limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    kvm_segment {
        base: ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000),
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: if (entry >> 47) & 1 == 1 { 0 } else { 1 },
        padding: 0,
    }
}

/// The part of long-mode entry state every guest shares: the GDT (`base`,
/// `entries`) and IDT (`base`, `limit`) registers, `code` in CS, `data` in
/// SS and every data segment, `tss` in TR, and CR3. CR0/CR4/EFER stay with
/// the caller (the kernel entry adds bits to KVM's reset state; the
/// built-in guest sets its own).
pub fn set_long_mode_segments(
    sregs: &mut kvm_sregs,
    gdt: (u64, usize),
    idt: (u64, u16),
    [code, data, tss]: [kvm_segment; 3],
    cr3: u64,
) {
    sregs.gdt.base = gdt.0;
    sregs.gdt.limit = (gdt.1 * 8 - 1) as u16;
    sregs.idt.base = idt.0;
    sregs.idt.limit = idt.1;
    sregs.cs = code;
    sregs.ss = data;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.tr = tss;
    sregs.cr3 = cr3;
}

/// Write GDT, IDT and identity page tables (first 1 GiB, 2 MiB pages); set
/// sregs for long mode, regs for the kernel entry, the FPU, boot MSRs.
pub fn setup_vcpu(vcpu: &VcpuFd, mem: &GuestMemoryMmap, entry: u64) -> Result<(), CpuError> {
    let gdt = [
        gdt_entry(0, 0, 0),
        gdt_entry(0xa09b, 0, 0xfffff), // CODE64
        gdt_entry(0xc093, 0, 0xfffff), // DATA
        gdt_entry(0x808b, 0, 0xfffff), // TSS
    ];
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_ADDR + i as u64 * 8))
            .map_err(|_| CpuError::GuestWrite("GDT"))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_ADDR))
        .map_err(|_| CpuError::GuestWrite("IDT"))?;
    mem.write_obj(PDPT_ADDR | 0x03, GuestAddress(PML4_ADDR))
        .map_err(|_| CpuError::GuestWrite("PML4"))?;
    mem.write_obj(PD_ADDR | 0x03, GuestAddress(PDPT_ADDR))
        .map_err(|_| CpuError::GuestWrite("PDPT"))?;
    for i in 0..512u64 {
        mem.write_obj((i << 21) | 0x83, GuestAddress(PD_ADDR + i * 8))
            .map_err(|_| CpuError::GuestWrite("PD"))?;
    }

    let mut sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    let code = segment_from_gdt(gdt[1], 1);
    let data = segment_from_gdt(gdt[2], 2);
    let tss = segment_from_gdt(gdt[3], 3);
    set_long_mode_segments(
        &mut sregs,
        (GDT_ADDR, gdt.len()),
        (IDT_ADDR, 7),
        [code, data, tss],
        PML4_ADDR,
    );
    sregs.cr4 |= 0x20; // PAE
    sregs.cr0 |= 0x8000_0001 | 0x10; // PG | PE | ET
    sregs.efer |= 0x500; // LME | LMA
    vcpu.set_sregs(&sregs).map_err(kvm("KVM_SET_SREGS"))?;

    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: BOOT_STACK,
        rbp: BOOT_STACK,
        rsi: ZERO_PAGE_ADDR,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))?;

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("KVM_SET_FPU"))?;

    let entries: Vec<kvm_msr_entry> = [
        (0x174u32, 0u64),       // SYSENTER_CS
        (0x175, 0),             // SYSENTER_ESP
        (0x176, 0),             // SYSENTER_EIP
        (0xc000_0081, 0),       // STAR
        (0xc000_0083, 0),       // CSTAR
        (0xc000_0102, 0),       // KERNEL_GS_BASE
        (0xc000_0084, 0),       // SYSCALL_MASK
        (0xc000_0082, 0),       // LSTAR
        (0x10, 0),              // TSC
        (0x1a0, 1),             // MISC_ENABLE: fast strings
        (0x2ff, (1 << 11) | 6), // MTRRdefType: enabled, write-back
    ]
    .iter()
    .map(|&(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect();
    let msrs = Msrs::from_entries(&entries).map_err(|_| CpuError::Msrs {
        set: 0,
        want: entries.len(),
    })?;
    let set = vcpu.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
    if set != entries.len() {
        return Err(CpuError::Msrs {
            set,
            want: entries.len(),
        });
    }
    Ok(())
}

/// LAPIC: LVT0 = ExtINT (the 8259 reaches the CPU), LVT1 = NMI.
pub fn setup_lapic(vcpu: &VcpuFd) -> Result<(), CpuError> {
    let mut lapic = vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
    let set_lvt = |regs: &mut [i8], off: usize, mode: u32| {
        let mut v = [0u8; 4];
        for (i, b) in v.iter_mut().enumerate() {
            *b = regs[off + i] as u8;
        }
        let val = (u32::from_le_bytes(v) & !0x700) | (mode << 8);
        for (i, b) in val.to_le_bytes().iter().enumerate() {
            regs[off + i] = *b as i8;
        }
    };
    set_lvt(&mut lapic.regs, 0x350, 0x7); // LVT0: ExtINT
    set_lvt(&mut lapic.regs, 0x360, 0x4); // LVT1: NMI
    vcpu.set_lapic(&lapic).map_err(kvm("KVM_SET_LAPIC"))
}

/// Highest basic CPUID leaf we expose: below 0xd, so Linux sees no XSAVE
/// state leaf and uses FXSAVE (the host emulator cannot run xsave/xrstor).
pub const MAX_BASIC_LEAF: u32 = 0xb;

/// Filter KVM_GET_SUPPORTED_CPUID to what this host can run at emulated CPL0.
pub fn filter_cpuid(cpuid: &mut CpuId) {
    for e in cpuid.as_mut_slice().iter_mut() {
        match e.function {
            0 => e.eax = e.eax.min(MAX_BASIC_LEAF),
            1 => {
                // CX16 (13), XSAVE (26), OSXSAVE (27), AVX (28), F16C (29),
                // RDRAND (30) off; hypervisor (31) on.
                e.ecx &= !((1 << 13) | (1 << 26) | (1 << 27) | (1 << 28) | (1 << 29) | (1 << 30));
                e.ecx |= 1 << 31;
                e.ebx &= 0x00ff_ffff; // APIC id 0
            }
            7 if e.index == 0 => {
                // AVX2 (5), AVX512* (16,17,21,26-28,30,31), RDSEED (18),
                // SHA (29), INVPCID (10) off.
                e.ebx &= !((1 << 5)
                    | (1 << 10)
                    | (1 << 16)
                    | (1 << 17)
                    | (1 << 18)
                    | (1 << 21)
                    | (1 << 26)
                    | (1 << 27)
                    | (1 << 28)
                    | (1 << 29)
                    | (1 << 30)
                    | (1 << 31));
                e.ecx = 0;
                e.edx = 0;
            }
            0xb => e.edx = 0, // x2APIC id
            _ => {}
        }
    }
}

/// vCPU `id` of `vm` with the host's supported CPUID, filtered for this
/// host ([`filter_cpuid`]): the one way every guest's vCPU is made. On
/// error, the ioctl that failed.
pub fn create_vcpu(
    kvm: &kvm_ioctls::Kvm,
    vm: &kvm_ioctls::VmFd,
    id: u64,
) -> Result<kvm_ioctls::VcpuFd, (&'static str, kvm_ioctls::Error)> {
    let vcpu = vm.create_vcpu(id).map_err(|e| ("KVM_CREATE_VCPU", e))?;
    let mut cpuid = kvm
        .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| ("KVM_GET_SUPPORTED_CPUID", e))?;
    filter_cpuid(&mut cpuid);
    vcpu.set_cpuid2(&cpuid).map_err(|e| ("KVM_SET_CPUID2", e))?;
    Ok(vcpu)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_roundtrip() {
        let c = segment_from_gdt(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!((c.l, c.g, c.present, c.type_, c.s), (1, 1, 1, 0xb, 1));
        assert_eq!(c.limit, 0xffff_ffff);
        assert_eq!(c.selector, 8);
        let t = segment_from_gdt(gdt_entry(0x808b, 0, 0xfffff), 3);
        assert_eq!((t.s, t.type_), (0, 0xb));
    }
}
