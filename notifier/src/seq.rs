//! The invalidation sequence: KVM's `mmu_invalidate_seq`,
//! `mmu_invalidate_in_progress` and `mmu_invalidate_range_start/end`
//! (`virt/kvm/kvm_main.c`, `include/linux/kvm_host.h`).
//!
//! Invalidation side, always under `mmu_lock` held for write:
//! [`begin`](InvalidationSeq::begin) (in-progress count up; the first of a
//! group of concurrent invalidations resets the range),
//! [`range_add`](InvalidationSeq::range_add) (the in-progress range becomes
//! the min/max union of every concurrent range), then the zap, and later
//! [`end`](InvalidationSeq::end) (`seq++`, then in-progress count down).
//!
//! Fault side: [`snapshot`](InvalidationSeq::snapshot) **before** resolving
//! the host page, the lockless pre-check
//! [`retry_unsafe`](InvalidationSeq::retry_unsafe) (an optimisation only),
//! then under `mmu_lock` (read or write) the authoritative
//! [`retry`](InvalidationSeq::retry) (`mmu_invalidate_retry_gfn`) right before
//! installing an SPTE. A fault that resolved its pfn from a host mapping an
//! invalidation is tearing down always sees either the in-progress range or a
//! changed `seq`, and retries. False positives (the union range, the global
//! `seq`) only cost a retry; there are no false negatives under the lock.
//!
//! Memory ordering: `mmu_lock` orders everything the locked check reads. The
//! one lockless edge is the snapshot: `end` bumps `seq` with `Release` after
//! the host changed its page tables, and `snapshot` reads it with `Acquire`
//! (KVM's `smp_rmb()` after reading `mmu_invalidate_seq`), so a fault whose
//! snapshot already sees the new `seq` also sees the new host mapping.
//! The protocol is model-checked with loom: `tests/loom_seq.rs`.

use crate::sync::{AtomicU64, Ordering};

/// `INVALID_GPA`: no range recorded yet.
const INVALID_GFN: u64 = u64::MAX;

/// A snapshot of `mmu_invalidate_seq` (`fault->mmu_seq`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SeqSnapshot(u64);

impl SeqSnapshot {
    pub fn value(self) -> u64 {
        self.0
    }
}

/// See the module docs.
#[derive(Debug)]
pub struct InvalidationSeq {
    /// `mmu_invalidate_seq`.
    seq: AtomicU64,
    /// `mmu_invalidate_in_progress`.
    in_progress: AtomicU64,
    /// `mmu_invalidate_range_start` (inclusive gfn).
    range_start: AtomicU64,
    /// `mmu_invalidate_range_end` (exclusive gfn).
    range_end: AtomicU64,
}

impl Default for InvalidationSeq {
    fn default() -> Self {
        Self::new()
    }
}

impl InvalidationSeq {
    pub fn new() -> Self {
        Self {
            seq: AtomicU64::new(0),
            in_progress: AtomicU64::new(0),
            range_start: AtomicU64::new(INVALID_GFN),
            range_end: AtomicU64::new(INVALID_GFN),
        }
    }

    /// `kvm_mmu_invalidate_begin`. Caller holds `mmu_lock` for write.
    pub fn begin(&self) {
        let before = self.in_progress.fetch_add(1, Ordering::AcqRel);
        if before == 0 {
            // The first of a group of concurrent invalidations: no range yet.
            self.range_start.store(INVALID_GFN, Ordering::Relaxed);
            self.range_end.store(INVALID_GFN, Ordering::Relaxed);
        }
    }

    /// `kvm_mmu_invalidate_range_add`: union `[start, end)` (gfns) into the
    /// in-progress range. Caller holds `mmu_lock` for write, after `begin`.
    pub fn range_add(&self, start: u64, end: u64) {
        debug_assert!(
            self.in_progress.load(Ordering::Relaxed) > 0,
            "range_add outside begin/end"
        );
        let cur_start = self.range_start.load(Ordering::Relaxed);
        if cur_start == INVALID_GFN {
            self.range_start.store(start, Ordering::Relaxed);
            self.range_end.store(end, Ordering::Relaxed);
        } else {
            // "Fully tracking multiple concurrent ranges has diminishing
            // returns": keep the min/max union until all of them end.
            self.range_start
                .store(cur_start.min(start), Ordering::Relaxed);
            let cur_end = self.range_end.load(Ordering::Relaxed);
            self.range_end.store(cur_end.max(end), Ordering::Relaxed);
        }
    }

    /// `kvm_mmu_invalidate_end`: `seq++`, then (`smp_wmb`) in-progress count
    /// down. Caller holds `mmu_lock` for write.
    ///
    /// Returns `false` (and changes nothing) if no invalidation was in
    /// progress: an unbalanced `end` is the caller's bug (KVM's `KVM_BUG_ON`).
    pub fn end(&self) -> bool {
        if self.in_progress.load(Ordering::Relaxed) == 0 {
            return false;
        }
        self.seq.fetch_add(1, Ordering::Release);
        self.in_progress.fetch_sub(1, Ordering::Release);
        true
    }

    /// `fault->mmu_seq = kvm->mmu_invalidate_seq; smp_rmb();` - take it
    /// before resolving the host page.
    #[inline]
    pub fn snapshot(&self) -> SeqSnapshot {
        SeqSnapshot(self.seq.load(Ordering::Acquire))
    }

    /// `mmu_invalidate_retry_gfn_unsafe`: the lockless pre-check. A `true`
    /// is reliable (retry, don't even take the lock); a `false` proves
    /// nothing - the locked [`retry`](Self::retry) decides.
    #[inline]
    pub fn retry_unsafe(&self, snapshot: SeqSnapshot, gfn: u64) -> bool {
        self.check(snapshot, gfn, Ordering::Acquire)
    }

    /// `mmu_invalidate_retry_gfn`: caller holds `mmu_lock` (read or write).
    /// `true`: an invalidation covering `gfn` is in progress or one ended
    /// since `snapshot`; the fault must not install its SPTE.
    #[inline]
    pub fn retry(&self, snapshot: SeqSnapshot, gfn: u64) -> bool {
        // The lock orders these loads against begin/range_add/end.
        self.check(snapshot, gfn, Ordering::Relaxed)
    }

    /// [`retry`](Self::retry) for every gfn of `[start, end)` at once: a
    /// fault about to install a huge leaf asks for the whole span the leaf
    /// will map (stricter than KVM, which checks the faulting gfn and relies
    /// on host invalidations covering whole host huge pages). Caller holds
    /// `mmu_lock`.
    #[inline]
    pub fn retry_range(&self, snapshot: SeqSnapshot, start: u64, end: u64) -> bool {
        self.check_range(snapshot, start, end, Ordering::Relaxed)
    }

    fn check(&self, snapshot: SeqSnapshot, gfn: u64, order: Ordering) -> bool {
        self.check_range(snapshot, gfn, gfn.saturating_add(1), order)
    }

    fn check_range(&self, snapshot: SeqSnapshot, start: u64, end: u64, order: Ordering) -> bool {
        if self.in_progress.load(order) != 0 {
            // A range_add may not have happened yet (start/end INVALID):
            // KVM then compares against INVALID_GPA too, which never
            // contains a real gfn; the seq check below still holds.
            let r_start = self.range_start.load(order);
            let r_end = self.range_end.load(order);
            if r_start != INVALID_GFN && start < r_end && r_start < end {
                return true;
            }
        }
        self.seq.load(order) != snapshot.0
    }

    /// `mmu_invalidate_in_progress` (for assertions and reports).
    pub fn in_progress(&self) -> u64 {
        self.in_progress.load(Ordering::Acquire)
    }

    /// The merged in-progress range, if an invalidation is in progress and
    /// added one.
    pub fn in_progress_range(&self) -> Option<(u64, u64)> {
        if self.in_progress.load(Ordering::Acquire) == 0 {
            return None;
        }
        let start = self.range_start.load(Ordering::Relaxed);
        (start != INVALID_GFN).then(|| (start, self.range_end.load(Ordering::Relaxed)))
    }

    /// Current `mmu_invalidate_seq`.
    pub fn seq(&self) -> u64 {
        self.seq.load(Ordering::Acquire)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    #[test]
    fn fault_inside_in_progress_range_retries() {
        let s = InvalidationSeq::new();
        let snap = s.snapshot();
        s.begin();
        s.range_add(100, 200);
        assert!(s.retry(snap, 100));
        assert!(s.retry(snap, 199));
        assert!(!s.retry(snap, 200), "end is exclusive");
        assert!(!s.retry(snap, 99));
        assert!(s.end());
        assert!(s.retry(snap, 50), "seq moved since the snapshot");
        assert!(
            !s.retry(s.snapshot(), 150),
            "a fresh snapshot after end is fine"
        );
    }

    #[test]
    fn concurrent_ranges_merge_until_all_end() {
        let s = InvalidationSeq::new();
        s.begin();
        s.range_add(10, 20);
        s.begin();
        s.range_add(100, 110);
        assert_eq!(s.in_progress_range(), Some((10, 110)));
        let snap = s.snapshot();
        assert!(s.retry(snap, 50), "the union is a false positive by design");
        assert!(s.end());
        assert_eq!(s.in_progress_range(), Some((10, 110)), "union persists");
        assert!(s.end());
        assert_eq!(s.in_progress_range(), None);
        assert_eq!(s.seq(), 2);
        // A new group starts from scratch.
        s.begin();
        s.range_add(500, 501);
        assert_eq!(s.in_progress_range(), Some((500, 501)));
        assert!(s.end());
    }

    #[test]
    fn range_check_catches_any_overlap() {
        let s = InvalidationSeq::new();
        let snap = s.snapshot();
        s.begin();
        s.range_add(600, 700);
        assert!(
            s.retry_range(snap, 512, 1024),
            "2M leaf overlapping the range"
        );
        assert!(!s.retry_range(snap, 0, 512));
        assert!(!s.retry_range(snap, 700, 1212));
        assert!(s.end());
    }

    #[test]
    fn unbalanced_end_is_refused() {
        let s = InvalidationSeq::new();
        assert!(!s.end());
        assert_eq!(s.seq(), 0);
    }

    #[test]
    fn begin_without_range_still_catches_through_seq() {
        let s = InvalidationSeq::new();
        let snap = s.snapshot();
        s.begin();
        assert!(!s.retry_unsafe(snap, 5), "no range yet, seq unchanged");
        assert!(s.end());
        assert!(s.retry_unsafe(snap, 5));
    }
}
