//! The vCPU state a guest starts in, as values (`vstate::Vcpu` applies
//! them): the 64-bit Linux boot protocol (long mode, identity-mapped first
//! GiB, `rsi` = zero page) and long mode at CPL3 for the built-in guests.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_sregs};

use super::gdt::{segment_from_gdt, set_long_mode_segments};
use super::layout::{
    BOOT_STACK, GDT_ADDR, IDT_ADDR, PDPT_ADDR, PD_ADDR, PML4_ADDR, ZERO_PAGE_ADDR,
};
use mmu::guest_walk::x86::{P, PS, RW};

pub const CR0_PE: u64 = 1 << 0;
pub const CR0_MP: u64 = 1 << 1;
pub const CR0_ET: u64 = 1 << 4;
pub const CR0_NE: u64 = 1 << 5;
pub const CR0_WP: u64 = 1 << 16;
pub const CR0_PG: u64 = 1 << 31;
pub const CR4_PAE: u64 = 1 << 5;
pub const CR4_SMEP: u64 = 1 << 20;
pub const EFER_LME: u64 = 1 << 8;
pub const EFER_LMA: u64 = 1 << 10;
pub const EFER_NXE: u64 = 1 << 11;
/// RFLAGS bit 1 (always set).
pub const RFLAGS_FIXED: u64 = 0x2;

/// The Linux boot GDT: null, CODE64, DATA, TSS.
pub const LINUX_GDT: [u64; 4] = [
    0,
    0x00af_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
    0x008f_8b00_0000_ffff,
];

/// What the VMM writes to guest memory before a Linux boot: the GDT, an
/// empty IDT and the identity page tables of the first GiB (2 MiB pages),
/// as (gpa, value) words.
pub fn linux_boot_tables() -> impl Iterator<Item = (u64, u64)> {
    let gdt = LINUX_GDT
        .into_iter()
        .zip(0u64..)
        .map(|(e, i)| (GDT_ADDR + 8 * i, e));
    let tables = [
        (IDT_ADDR, 0),
        (PML4_ADDR, PDPT_ADDR | P | RW),
        (PDPT_ADDR, PD_ADDR | P | RW),
    ];
    let pd = (0..512u64).map(|i| (PD_ADDR + i * 8, (i << 21) | P | RW | PS));
    gdt.chain(tables).chain(pd)
}

/// Long mode at CPL0 for the kernel entry: the boot GDT's segments, CR3 at
/// the boot page tables, PAE, PG|PE|ET, LME|LMA (added to KVM's reset
/// state).
pub fn linux_boot_sregs(sregs: &mut kvm_sregs) {
    let seg = |i: u16| segment_from_gdt(LINUX_GDT[usize::from(i)], i);
    set_long_mode_segments(
        sregs,
        (GDT_ADDR, LINUX_GDT.len()),
        (IDT_ADDR, 7),
        [seg(1), seg(2), seg(3)],
        PML4_ADDR,
    );
    sregs.cr4 |= CR4_PAE;
    sregs.cr0 |= CR0_PG | CR0_PE | CR0_ET;
    sregs.efer |= EFER_LME | EFER_LMA;
}

/// The kernel entry's registers: `rip` at the 64-bit entry, the boot stack,
/// `rsi` at the zero page.
pub fn linux_boot_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rflags: RFLAGS_FIXED,
        rip: entry,
        rsp: BOOT_STACK,
        rbp: BOOT_STACK,
        rsi: ZERO_PAGE_ADDR,
        ..Default::default()
    }
}

/// The FPU at reset (FCW 0x37f, MXCSR 0x1f80).
pub fn reset_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// The MSRs a booting kernel expects: SYSENTER/SYSCALL zeroed, TSC 0, fast
/// strings, MTRRs enabled with write-back default.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    [
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
    .collect()
}

/// LAPIC register offsets of LVT0 and LVT1.
pub const APIC_LVT0: usize = 0x350;
pub const APIC_LVT1: usize = 0x360;
/// LVT delivery modes.
pub const APIC_MODE_NMI: u32 = 0x4;
pub const APIC_MODE_EXTINT: u32 = 0x7;

/// Set the delivery mode of the LVT at `off` in a `kvm_lapic_state`'s
/// register page: LVT0 = ExtINT (the 8259 reaches the CPU), LVT1 = NMI.
pub fn set_lvt_mode(regs: &mut [i8], off: usize, mode: u32) {
    let Some(r) = regs.get_mut(off..off + 4) else {
        return;
    };
    let mut v = [0u8; 4];
    for (b, r) in v.iter_mut().zip(r.iter()) {
        *b = r.to_ne_bytes()[0];
    }
    let val = (u32::from_le_bytes(v) & !0x700) | (mode << 8);
    for (r, b) in r.iter_mut().zip(val.to_le_bytes()) {
        *r = i8::from_ne_bytes([b]);
    }
}

/// Long mode at CPL3 for the built-in guests (`guests::builtin`): user
/// code and stack segments of their GDT, the busy 64-bit TSS, CR3 at their
/// identity tables, interrupts off (they talk through MMIO doorbells).
pub fn cpl3_sregs(sregs: &mut kvm_sregs) {
    builtin_sregs(sregs, 3);
}

/// The same at CPL0, with the GDT's kernel segments: the built-in guest
/// hypervisor (`guests::l1svm`), which needs WRMSR and VMRUN.
pub fn cpl0_sregs(sregs: &mut kvm_sregs) {
    builtin_sregs(sregs, 0);
}

fn builtin_sregs(sregs: &mut kvm_sregs, cpl: u16) {
    use guests::builtin::{self, LAYOUT};
    let gdt = builtin::gdt();
    let seg = |sel: u16, rpl: u16| {
        let i = sel >> 3;
        let mut s = segment_from_gdt(gdt[usize::from(i)], i);
        s.selector |= rpl;
        s
    };
    let (cs, ds) = if cpl == 3 {
        (builtin::SEL_USER_CS, builtin::SEL_USER_DS)
    } else {
        (builtin::SEL_KERNEL_CS, builtin::SEL_KERNEL_DS)
    };
    set_long_mode_segments(
        sregs,
        (LAYOUT.gdt, gdt.len()),
        (0, 0),
        [seg(cs, cpl), seg(ds, cpl), seg(builtin::SEL_TSS, 0)],
        LAYOUT.pml4,
    );
    sregs.cr4 = CR4_PAE;
    sregs.cr0 = CR0_PG | CR0_NE | CR0_ET | CR0_MP | CR0_PE;
    sregs.efer = EFER_LME | EFER_LMA;
}

/// The built-in guests' entry registers.
pub fn cpl3_regs() -> kvm_regs {
    use guests::builtin::LAYOUT;
    kvm_regs {
        rflags: RFLAGS_FIXED,
        rip: LAYOUT.code,
        rsp: LAYOUT.stack_top,
        ..Default::default()
    }
}

/// A register dump for error messages.
pub fn dump(regs: &kvm_regs, sregs: &kvm_sregs) -> String {
    format!(
        "rip {:#018x} rsp {:#018x} rflags {:#x}\nrax {:#018x} rbx {:#018x} rcx {:#018x} rdx {:#018x}\nrsi {:#018x} rdi {:#018x} rbp {:#018x}\nr8  {:#018x} r9  {:#018x} r10 {:#018x} r11 {:#018x}\nr12 {:#018x} r13 {:#018x} r14 {:#018x} r15 {:#018x}\n\
         cs {:#x} (dpl {}) cr0 {:#x} cr2 {:#x} cr3 {:#x} cr4 {:#x} efer {:#x} fs.base {:#x} gs.base {:#x}",
        regs.rip, regs.rsp, regs.rflags, regs.rax, regs.rbx, regs.rcx, regs.rdx, regs.rsi,
        regs.rdi, regs.rbp, regs.r8, regs.r9, regs.r10, regs.r11, regs.r12, regs.r13, regs.r14,
        regs.r15, sregs.cs.selector, sregs.cs.dpl, sregs.cr0, sregs.cr2, sregs.cr3, sregs.cr4,
        sregs.efer, sregs.fs.base, sregs.gs.base
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::gdt::gdt_entry;

    #[test]
    fn the_boot_gdt_is_what_gdt_entry_builds() {
        assert_eq!(
            LINUX_GDT,
            [
                gdt_entry(0, 0, 0),
                gdt_entry(0xa09b, 0, 0xfffff),
                gdt_entry(0xc093, 0, 0xfffff),
                gdt_entry(0x808b, 0, 0xfffff),
            ]
        );
    }

    #[test]
    fn boot_tables_identity_map_the_first_gib() {
        let t: Vec<(u64, u64)> = linux_boot_tables().collect();
        assert_eq!(t.len(), 4 + 3 + 512);
        assert!(t.contains(&(PML4_ADDR, PDPT_ADDR | 3)));
        assert!(t.contains(&(PD_ADDR + 8 * 511, (511 << 21) | 0x83)));
        let mut s = kvm_sregs::default();
        linux_boot_sregs(&mut s);
        assert_eq!((s.cs.l, s.cs.selector, s.tr.selector), (1, 8, 24));
        assert_eq!(s.cr0 & 0x8000_0011, 0x8000_0011);
        assert_eq!(s.efer & 0x500, 0x500);
        let mut c = kvm_sregs::default();
        cpl3_sregs(&mut c);
        assert_eq!((c.cs.dpl, c.cr0), (3, 0x8000_0033));
    }

    #[test]
    fn lvt_mode_keeps_other_bits() {
        let mut regs = [0i8; 1024];
        regs[APIC_LVT0] = 0x10;
        regs[APIC_LVT0 + 1] = 0x07; // mode bits set: replaced
        regs[APIC_LVT0 + 2] = 0x01; // masked: kept
        set_lvt_mode(&mut regs, APIC_LVT0, APIC_MODE_NMI);
        assert_eq!(regs[APIC_LVT0..APIC_LVT0 + 3], [0x10, 0x04, 0x01]);
        set_lvt_mode(&mut regs, 1022, APIC_MODE_NMI); // out of range: ignored
    }
}
