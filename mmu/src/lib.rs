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
//! - [`context`]: [`MmuContext`], the per-VM MMU context (the MMU half of
//!   `struct kvm`: `mmu_lock`, the invalidation sequence, stats, TLB hook,
//!   memslots) every MMU of an address space shares.
//! - [`mmu_notifier`]: the [`SecondaryMmu`] trait every MMU implements and
//!   [`KvmMmuNotifier`], the host-invalidation subscriber that turns
//!   `invalidate_range_start/end` into locked, yielding zaps
//!   (`kvm_mmu_notifier_invalidate_range_start/end`).
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
//! - [`watchdog`]: the soft-lockup detector's stand-in, a thread that needs
//!   `mmu_lock` every period while a zap runs.
//! - [`model`]: model-plane generators (L1 up to 4 TiB, L2 density, shapes).

pub mod clock;
pub mod context;
pub mod guest_walk;
pub mod lock;
pub mod memslot;
pub mod mmu_notifier;
pub mod model;
pub mod nested;
pub mod populated;
pub mod rmap;
pub mod shadow;
pub mod spte;
pub mod stats;
pub mod tdp;
pub mod tlb;
pub mod watchdog;
pub mod yielder;

pub use context::MmuContext;
pub use lock::MmuLock;
pub use mmu_notifier::{KvmMmuNotifier, SecondaryMmu};
pub use stats::{MmuStats, MmuStatsSnapshot};
pub use tlb::RemoteTlb;
pub use yielder::{Stretch, YieldMode, YieldPolicy, Yielder};
