//! The invalidation sequence (KVM's `mmu_invalidate_seq`,
//! `mmu_invalidate_in_progress`, `mmu_invalidate_range_start/end`).
//! Placeholder: filled by the mmu work (issue 3).

/// See module docs.
#[derive(Debug, Default)]
pub struct InvalidationSeq {}
