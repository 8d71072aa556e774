//! The project's secondary MMU, named as KVM names it.
//!
//! - [`stats`]: counters with KVM's binary-stats names.
//! - [`lock`]: `mmu_lock`, an rwlock that knows whether anyone waits for it.
//! - [`yielder`]: the one yield mechanism every zap uses (TDP leaves, rmap
//!   entries), with the longest non-yield stretch measured.
//! - [`memslot`]: memslots and hva range -> (slot, gfn range).
//! - [`spte`]: the SPTE as one `u64`, the four legal writability states.
//! - [`tdp`]: the TDP MMU (radix tree by gfn, 4K/2M/1G leaves, seq-checked
//!   faults, yielding zaps, epoch-freed tables).
//! - [`invalidate`]: the per-VM MMU context, the `SecondaryMmu` trait and
//!   `KvmMmuNotifier`, the host-invalidation subscriber.
//! - [`tlb`]: the remote TLB flush hook and its counters.

pub mod invalidate;
pub mod lock;
pub mod memslot;
pub mod spte;
pub mod stats;
pub mod tdp;
pub mod tlb;
pub mod yielder;

pub use invalidate::{KvmMmuNotifier, MmuContext, SecondaryMmu};
pub use lock::MmuLock;
pub use stats::{MmuStats, MmuStatsSnapshot};
pub use tlb::RemoteTlb;
pub use yielder::{Stretch, YieldMode, YieldPolicy, Yielder};
