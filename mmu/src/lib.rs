//! The project's secondary MMU, named as KVM names it.
//!
//! - [`stats`]: counters with KVM's binary-stats names.
//! - [`lock`]: `mmu_lock`, an rwlock that knows whether anyone waits for it.
//! - [`yielder`]: the one yield mechanism every zap uses (TDP leaves, rmap
//!   entries), with the longest non-yield stretch measured.
//! - [`memslot`]: memslots and hva range -> (slot, gfn range).
//! - [`spte`]: the SPTE as one `u64`, the four legal writability states
//!   (TDP and shadow SPTEs alike).
//! - [`tdp`]: the TDP MMU (radix tree by gfn, 4K/2M/1G leaves, seq-checked
//!   faults, yielding zaps, epoch-freed tables).
//! - [`invalidate`]: the per-VM MMU context, the `SecondaryMmu` trait and
//!   `KvmMmuNotifier`, the host-invalidation subscriber.
//! - [`clock`]: the cheap monotonic clock the yielder samples (TSC).
//! - [`tlb`]: the remote TLB flush hook and its counters.
//! - [`guest_walk`]: x86-64 and EPT guest page-table walkers over untrusted
//!   guest memory.
//! - [`rmap`]: reverse maps in KVM's compact form, lazily allocated arrays.
//! - [`populated`]: hierarchical bitmap of populated rmap heads.
//! - [`shadow`]: the shadow MMU (shadow pages by (gfn, role), write
//!   tracking, fault path, yielding rmap zaps), on the same [`MmuContext`]
//!   and invalidation path as the TDP MMU.
//! - [`nested`]: nested TDP, the shadow MMU over an L1's EPT tables.
//! - [`model`]: model-plane generators (L1 up to 4 TiB, L2 density, shapes).

pub mod clock;
pub mod guest_walk;
pub mod invalidate;
pub mod lock;
pub mod memslot;
pub mod model;
pub mod nested;
pub mod populated;
pub mod rmap;
pub mod shadow;
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
