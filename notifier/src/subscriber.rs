//! The subscriber API: what a secondary MMU receives for a host invalidation.
//!
//! Mirrors the kernel's `struct mmu_notifier_range` (start, end, event,
//! `MMU_NOTIFIER_RANGE_BLOCKABLE`) plus one thing the kernel never has to say:
//! whether this process learnt of the invalidation *before* the host zapped
//! its page tables (its own operations, userfaultfd REMOVE) or only after the
//! fact (the `kvm:kvm_unmap_hva_range` tracepoint, userfaultfd UNMAP/REMAP).

use std::sync::{Arc, RwLock};

/// The kernel's `enum mmu_notifier_event` (include/linux/mmu_notifier.h).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum MmuNotifyEvent {
    /// munmap, mremap (move).
    Unmap,
    /// madvise(DONTNEED/REMOVE), hole punch, PMD unshare, hugetlb COW.
    Clear,
    /// mprotect, NUMA hinting, userfaultfd write-protect.
    ProtectionVma,
    /// Per-page protection change (fork COW).
    ProtectionPage,
    SoftDirty,
    Release,
    Migrate,
    Exclusive,
    /// The tracepoint does not carry the event type.
    Unknown,
}

/// When this process learns of an invalidation relative to the host's zap.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Delivery {
    /// `start` is delivered before the host's page tables change and `end`
    /// after: the contract of a kernel mmu_notifier.
    Before,
    /// Delivered after the host already moved on (tracepoint, UNMAP, REMAP):
    /// the subscriber can only catch up.
    AfterTheFact,
}

/// A host virtual address range `[start, end)`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub struct HvaRange {
    pub start: u64,
    pub end: u64,
}

impl HvaRange {
    pub fn new(start: u64, end: u64) -> Self {
        Self { start, end }
    }

    pub fn len(&self) -> u64 {
        self.end.saturating_sub(self.start)
    }

    pub fn is_empty(&self) -> bool {
        self.end <= self.start
    }

    pub fn overlaps(&self, other: &HvaRange) -> bool {
        self.start < other.end && other.start < self.end
    }
}

/// One host invalidation, as `invalidate_range_start/end` see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Invalidation {
    pub range: HvaRange,
    pub event: MmuNotifyEvent,
    /// `mmu_notifier_range_blockable()`: the subscriber may sleep / yield.
    pub blockable: bool,
    pub delivery: Delivery,
}

/// A secondary MMU. `start` must not return while any of its SPTEs maps a
/// page in the range (invariant 1), and no SPTE may be established in the
/// range until the matching `end`.
pub trait InvalidationSubscriber: Send + Sync {
    fn invalidate_range_start(&self, inv: &Invalidation);
    fn invalidate_range_end(&self, inv: &Invalidation);
}

/// The subscriber list of one guest address space (the kernel's
/// `mm->notifier_subscriptions`). Sources call [`Subscribers::start`] and
/// [`Subscribers::end`]; every registered MMU sees both, in registration order.
#[derive(Default, Clone)]
pub struct Subscribers {
    list: Arc<RwLock<Vec<Arc<dyn InvalidationSubscriber>>>>,
}

impl Subscribers {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn register(&self, sub: Arc<dyn InvalidationSubscriber>) {
        self.write().push(sub);
    }

    pub fn len(&self) -> usize {
        self.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn start(&self, inv: &Invalidation) {
        for s in self.read().iter() {
            s.invalidate_range_start(inv);
        }
    }

    pub fn end(&self, inv: &Invalidation) {
        for s in self.read().iter() {
            s.invalidate_range_end(inv);
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, Vec<Arc<dyn InvalidationSubscriber>>> {
        // A panicking subscriber poisons nothing we rely on: the list is only
        // ever pushed to.
        self.list.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Vec<Arc<dyn InvalidationSubscriber>>> {
        self.list.write().unwrap_or_else(|e| e.into_inner())
    }
}
