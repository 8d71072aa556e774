//! x86-64: one file per concept.
//!
//! - [`layout`]: the guest physical layout (constants only).
//! - [`gdt`]: GDT entries and the segments they describe.
//! - [`regs`]: the vCPU state a guest starts in (64-bit Linux boot
//!   protocol; long mode at CPL3 for the built-in guests).
//! - [`cpuid`]: the CPUID this host can run.
//! - [`gva`]: guest-virtual reads and writes through the guest's page
//!   tables.
//! - [`emulate`]: the instruction emulator for what the host's own
//!   emulator gives up on, and for stores the VMM traps.

pub mod cpuid;
pub mod emulate;
pub mod gdt;
pub mod gva;
pub mod layout;
pub mod regs;
