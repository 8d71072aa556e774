//! The project's secondary MMU, named as KVM names it.
//!
//! - [`stats`]: counters with KVM's binary-stats names.
//! - [`lock`]: `mmu_lock`, an rwlock that knows whether anyone waits for it.
//! - [`yielder`]: the one yield mechanism every zap uses (TDP leaves, rmap
//!   entries), with the longest non-yield stretch measured.
//! - [`tlb`]: the remote TLB flush hook and its counters.
//! - [`guest_walk`]: x86-64 and EPT guest page-table walkers over untrusted
//!   guest memory.
//! - [`rmap`]: reverse maps in KVM's compact form, lazily allocated arrays.
//! - [`populated`]: hierarchical bitmap of populated rmap heads.
//! - [`shadow`]: the shadow MMU (shadow pages by (gfn, role), write
//!   tracking, fault path, yielding rmap zaps).
//! - [`nested`]: nested TDP, the shadow MMU over an L1's EPT tables.
//! - [`model`]: model-plane generators (L1 up to 4 TiB, L2 density, shapes).

pub mod guest_walk;
pub mod lock;
pub mod model;
pub mod nested;
pub mod populated;
pub mod rmap;
pub mod shadow;
pub mod stats;
pub mod tlb;
pub mod yielder;

pub use lock::MmuLock;
pub use stats::{MmuStats, MmuStatsSnapshot};
pub use tlb::RemoteTlb;
pub use yielder::{Stretch, YieldMode, YieldPolicy, Yielder};
