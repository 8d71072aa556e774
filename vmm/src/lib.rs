//! The VMM: KVM VM and vCPUs, hugetlb guest RAM, Linux boot, devices, the
//! event loop and the `vmm` subcommands.

pub mod assist;
pub mod bench;
pub mod boot;
pub mod builtin_vm;
pub mod devices;
pub mod guest_ram_uffd;
pub mod gva;
pub mod host_events;
pub mod kernel;
pub mod kvm;
pub mod latency;
pub mod memory;
pub mod nested_run;
pub mod notifier_check;
pub mod plot;
pub mod run;
pub mod run_inval;
pub mod run_linux;
pub mod soft_lockup;
pub mod timeline;
pub mod uffd_fault;
pub mod x86;
pub mod zeropage;
