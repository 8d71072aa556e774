//! Architecture support: the x86-64 guest physical layout, boot-time vCPU
//! state, CPUID filtering, guest-virtual access and the instruction
//! emulator of emulation-failure exits.

pub mod x86_64;
