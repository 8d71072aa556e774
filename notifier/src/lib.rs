//! Host side of the secondary MMU: every way a host page-table invalidation of
//! guest RAM becomes visible to this process, turned into one stream of
//! `invalidate_range_start` / `invalidate_range_end` for the project's MMUs.
//!
//! Data flows one way: host event -> a source in this crate -> a
//! [`subscriber::InvalidationSubscriber`] (implemented by `mmu`). Nothing in
//! this crate knows about SPTEs.
//!
//! * [`convert`]: the lossless integer conversions of a 64-bit host.
//! * [`page_size`]: the x86 page sizes (4K/2M/1G), one type for the workspace.
//! * [`mmap`]: one owned raw memory mapping (`mmap`/`munmap`).
//! * [`hostmm`]: guest RAM regions and their VMAs as the kernel sees them.
//! * [`predict`]: the kernel's notifier ranges, as pure functions.
//! * [`ops`]: operations on guest RAM that announce (start) before the
//!   syscall and end after it.
//! * [`pagemap`]: populated ranges (PAGEMAP_SCAN, /proc/self/pagemap).
//! * [`trace`]: the `kvm:kvm_unmap_hva_range` tracepoint source.
//! * [`uffd`]: the userfaultfd source (REMOVE/UNMAP/REMAP/FORK).
//! * [`workload`]: busy threads that make the kernel act on this mm
//!   (the NUMA scanner).
//! * [`check`]: the differential check (predicted vs tracepoint).
//! * [`kmsg`]: the kernel's own soft-lockup, RCU-stall and need_resched
//!   reports (`/dev/kmsg`, or any console's lines).
//! * [`lateness`]: a `SCHED_FIFO` watchdog pinned to a CPU: the longest
//!   stretch in which that CPU did not reschedule.
//! * [`hostconf`], [`restore`], [`hoststate`]: host settings changed for a
//!   run (sysctls, hugetlb pools) and put back on drop, on a signal, and
//!   after a SIGKILL by the next vmm; shared between concurrent processes.

pub mod check;
pub mod convert;
pub mod error;
pub mod hostconf;
pub mod hostmm;
pub mod hoststate;
pub mod kmsg;
pub mod lateness;
pub mod mempolicy;
pub mod mmap;
pub mod ops;
pub mod page_size;
pub mod pagemap;
pub mod predict;
pub mod restore;
pub mod sched;
pub mod seq;
pub mod subscriber;
mod sync;
pub mod trace;
pub mod uffd;
pub mod workload;

pub use error::{Error, Result};
pub use mmap::Mmap;
pub use page_size::PageSize;
pub use seq::{InvalidationSeq, SeqSnapshot};
pub use subscriber::{
    Delivery, HvaRange, Invalidation, InvalidationSubscriber, MmuNotifyEvent, Subscribers,
};
