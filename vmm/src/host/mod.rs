//! The host side of a running VM: what invalidates guest RAM and how the
//! VMM hears of it.
//!
//! - [`invalidator`]: the VMM's own operations on guest RAM (announced
//!   through `notifier::ops` before the syscall) and the MMU-vs-PAGEMAP_SCAN
//!   agreement check;
//! - [`events`]: the kernel-side sources (userfaultfd REMOVE/UNMAP/REMAP,
//!   the `kvm:kvm_unmap_hva_range` tracepoint) delivering what others do;
//! - [`bystander`]: a workload that invalidates guest RAM behind the VMM's
//!   back, for those sources to catch.
//!
//! All of it delivers to the `notifier::Subscribers` the MMU's
//! `KvmMmuNotifier` is registered with: host event -> notifier -> mmu.

pub mod bystander;
pub mod events;
pub mod invalidator;
