//! The VMM: KVM VMs and vCPUs, guest RAM and what serves it, the guest
//! machines, the host-side invalidation sources, and the `vmm`
//! subcommands. Read top-down, the data flow of a host invalidation is
//! `host` (or the kernel) -> `notifier` -> `mmu` -> `report`:
//!
//! - [`commands`]: one module per subcommand (args, run, report).
//! - [`machine`]: the guest kinds - the Linux machine (loader, devices,
//!   emulation assist, boot timeline) and the built-in CPL3 guests.
//! - [`host`]: what invalidates guest RAM and how the VMM hears of it (its
//!   own operations, userfaultfd events, the tracepoint, a bystander).
//! - [`memory`]: guest RAM (hugetlb memfds, userfaultfd-served RAM), the
//!   fault thread, and the project's MMUs wired to it.
//! - [`vstate`]: the VM and vCPU objects and the one `KVM_RUN` loop.
//! - [`loader`]: kernel, initramfs, command line, zero page.
//! - [`devices`]: COM1 and the legacy port-I/O devices.
//! - [`arch`]: the x86-64 layout, boot state, CPUID, guest-virtual access,
//!   the instruction emulator.
//! - [`report`]: percentiles, the boot timeline, plots.
//! - [`cli`]: size parsing, shared argument groups, the one exit harness.

pub mod arch;
pub mod cli;
pub mod commands;
pub mod devices;
pub mod failpoint;
pub mod host;
pub mod loader;
pub mod machine;
pub mod memory;
pub mod report;
pub mod thread;
pub mod vstate;
