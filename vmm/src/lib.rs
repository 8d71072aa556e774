//! The VMM: KVM VM and vCPUs, hugetlb guest RAM, Linux boot, devices, the
//! event loop and the `vmm` subcommands.

pub mod notifier_check;
pub mod soft_lockup;
