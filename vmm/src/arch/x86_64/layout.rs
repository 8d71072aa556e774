//! The guest physical layout of a Linux guest, in one place (constants
//! only). Low memory holds the boot structures the VMM writes before the
//! first `KVM_RUN`; RAM is one region at gpa 0 below the 32-bit MMIO gap.

/// GDT.
pub const GDT_ADDR: u64 = 0x500;
/// IDT (empty, limit 7: any early exception triple-faults).
pub const IDT_ADDR: u64 = 0x520;
/// Zero page (`boot_params`).
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer.
pub const BOOT_STACK: u64 = 0x8ff0;
/// Boot page tables: PML4, then the PDPT and the PD (identity map of the
/// first 1 GiB with 2 MiB pages).
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
pub const PD_ADDR: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x2_0000;
/// Command line size limit (what Linux accepts on x86, `COMMAND_LINE_SIZE`).
pub const CMDLINE_MAX: usize = 2048;
/// EBDA start: RAM below it is usable.
pub const EBDA_START: u64 = 0x9_fc00;
/// Where high memory starts (1 MiB): the kernel loads above it.
pub const HIMEM_START: u64 = 0x10_0000;
/// The largest guest RAM of this layout: one region below 3 GiB.
pub const MAX_LOW_RAM: u64 = 3 << 30;
/// KVM's TSS (`KVM_SET_TSS_ADDR`): three pages below 4 GiB, as Firecracker.
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
