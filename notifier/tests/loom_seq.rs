//! Loom model of the fault / invalidation sequence protocol (racing faults
//! retry: KVM's `mmu_invalidate_retry_gfn`): over all interleavings of one
//! fault and one invalidation, the fault never installs a stale translation
//! and never installs anything in the range between `start` and `end`.
//!
//! Compiles to nothing without the cfg. Run with a separate target dir so the
//! cfg change does not invalidate the normal build:
//!
//! ```text
//! RUSTFLAGS="--cfg loom" CARGO_TARGET_DIR=target/loom \
//!     cargo test -p notifier --release --test loom_seq
//! ```
//!
//! Exhaustive: about 1-2 minutes on a 2-core machine. With
//! `LOOM_MAX_PREEMPTIONS=3` it takes about a second and still fails if the
//! snapshot is taken after resolving the pfn or if `seq`'s Release/Acquire
//! pair is weakened to Relaxed (both mutations checked).
#![cfg(loom)]

use loom::sync::atomic::{AtomicU64, Ordering};
use loom::sync::{Arc, RwLock};
use loom::thread;
use notifier::InvalidationSeq;

const GFN: u64 = 7;
const OLD_PFN: u64 = 0x1000;
const NEW_PFN: u64 = 0x2000;
const NONE: u64 = 0;

/// One guest's state: `mmu_lock`, the sequence, the host's mapping of the
/// gfn's hva (the primary MMU) and the secondary MMU's SPTE for the gfn.
struct Vm {
    mmu_lock: RwLock<()>,
    seq: InvalidationSeq,
    host_pte: AtomicU64,
    spte: AtomicU64,
}

impl Vm {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            mmu_lock: RwLock::new(()),
            seq: InvalidationSeq::new(),
            host_pte: AtomicU64::new(OLD_PFN),
            spte: AtomicU64::new(NONE),
        })
    }

    /// A host invalidation of `[start, end)` that replaces the page behind
    /// GFN if it is in the range: notifier start (begin, range_add, zap),
    /// the host changes its page table, notifier end.
    fn invalidate(&self, start: u64, end: u64) {
        {
            let _w = self.mmu_lock.write().unwrap();
            self.seq.begin();
            self.seq.range_add(start, end);
            if (start..end).contains(&GFN) {
                self.spte.store(NONE, Ordering::Relaxed);
            }
        }
        if (start..end).contains(&GFN) {
            self.host_pte.store(NEW_PFN, Ordering::Relaxed);
        }
        {
            let _w = self.mmu_lock.write().unwrap();
            if (start..end).contains(&GFN) {
                // Invariant 1/2: nothing established between start and end.
                assert_eq!(
                    self.spte.load(Ordering::Relaxed),
                    NONE,
                    "SPTE installed inside the invalidation"
                );
            }
            assert!(self.seq.end());
        }
    }

    /// One attempt of the TDP fault path: snapshot, lockless pre-check,
    /// resolve the pfn from the host, pre-check again, lock, check, install.
    /// Returns whether it installed.
    fn fault_once(&self) -> bool {
        let snap = self.seq.snapshot();
        if self.seq.retry_unsafe(snap, GFN) {
            return false;
        }
        let pfn = self.host_pte.load(Ordering::Relaxed);
        if self.seq.retry_unsafe(snap, GFN) {
            return false;
        }
        let _r = self.mmu_lock.read().unwrap();
        if self.seq.retry(snap, GFN) {
            return false;
        }
        let _ = self
            .spte
            .compare_exchange(NONE, pfn, Ordering::Relaxed, Ordering::Relaxed);
        true
    }
}

#[test]
fn fault_racing_an_invalidation_never_installs_a_stale_pfn() {
    loom::model(|| {
        let vm = Vm::new();
        let inv = {
            let vm = vm.clone();
            thread::spawn(move || vm.invalidate(GFN, GFN + 1))
        };
        vm.fault_once();
        inv.join().unwrap();
        let spte = vm.spte.load(Ordering::Relaxed);
        assert!(
            spte == NONE || spte == NEW_PFN,
            "stale translation survived: {spte:#x}"
        );
    });
}

#[test]
fn fault_outside_the_range_is_not_blocked_by_the_range() {
    // The invalidation covers other gfns; the fault may still retry (the
    // global seq moved) but whatever it installs is the current pfn.
    loom::model(|| {
        let vm = Vm::new();
        let inv = {
            let vm = vm.clone();
            thread::spawn(move || vm.invalidate(GFN + 1, GFN + 10))
        };
        vm.fault_once();
        inv.join().unwrap();
        let spte = vm.spte.load(Ordering::Relaxed);
        assert!(spte == NONE || spte == OLD_PFN, "{spte:#x}");
    });
}

#[test]
fn fault_after_the_invalidation_installs_the_new_pfn() {
    loom::model(|| {
        let vm = Vm::new();
        let inv = {
            let vm = vm.clone();
            thread::spawn(move || vm.invalidate(GFN, GFN + 1))
        };
        inv.join().unwrap();
        assert!(vm.fault_once(), "no invalidation in flight: must install");
        assert_eq!(vm.spte.load(Ordering::Relaxed), NEW_PFN);
    });
}
