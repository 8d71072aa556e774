//! Zapping leaves of `[start, end)` under `mmu_lock` held for write
//! (`tdp_mmu_zap_leafs`), yielding (`tdp_mmu_iter_cond_resched`).
//!
//! - Every SPTE visited, present or not, at any level, is one unit of work
//!   for the [`Yielder`]; non-present subtrees are skipped where they are
//!   found, so an empty range costs one visit per top-level SPTE.
//! - A huge leaf that overlaps the range is zapped whole.
//! - When the yielder says so: flush the TLB if anything was zapped since the
//!   last flush, publish the page counters, release the lock (letting
//!   faults in), re-take it, and restart the walk from the root at the next
//!   gfn (`tdp_iter_restart`). The walk always makes progress: it yields
//!   only after the SPTE it visited.
//! - Tables left empty are unlinked and freed through crossbeam-epoch, after
//!   every lockless walker that could still see them unpinned. A table
//!   whose whole span was zapped in one stretch is known empty; one the
//!   stretch entered part-way (range start, or resuming after a yield) or
//!   changed while only partly covering it is scanned: at most two tables
//!   per level per stretch, 512 loads each.
//!
//! The [`SecondaryMmu`] impl through which host invalidations
//! ([`KvmMmuNotifier`](crate::KvmMmuNotifier)) zap is here too.

use super::pool::{TablePool, TablePtr};
use super::{bounds, level_span, PageTable, TdpMmu, GFN_LIMIT, ROOT_LEVEL};
use crate::lock::{MmuLock, MmuWriteGuard};
use crate::memslot::Memslot;
use crate::mmu_notifier::SecondaryMmu;
use crate::spte::{Spte, SPTE_MMU_PRESENT};
use crate::stats::MmuStats;
use crate::yielder::{YieldPolicy, YieldReport, Yielder};
use crossbeam_epoch::{self as epoch, Guard};
use notifier::PageSize;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Work done since the counters were last published.
#[derive(Default)]
struct ZapAcct {
    zapped: [u64; 3],
    tables_freed: u64,
    /// A leaf was zapped since the last TLB flush.
    flush: bool,
}

struct Walk<'y, 'a> {
    pool: &'y Arc<TablePool>,
    yielder: &'y mut Yielder<'a>,
    acct: ZapAcct,
    epoch: Guard,
}

/// The walk stopped to yield; resume at this gfn.
struct YieldAt(u64);

impl TdpMmu {
    /// Zap every leaf overlapping gfns `[start, end)`. Caller holds the write
    /// lock through `guard`; `flush` says a TLB flush is already pending
    /// (from earlier work under this lock hold). Returns whether one is
    /// still pending: the caller flushes before unlocking (one flush per
    /// notification, `kvm_flush_remote_tlbs`).
    pub fn zap_gfn_range(
        &self,
        guard: &mut MmuWriteGuard<'_>,
        start: u64,
        end: u64,
        yielder: &mut Yielder<'_>,
        flush: bool,
    ) -> bool {
        let end = end.min(GFN_LIMIT);
        let stats = &self.ctx.stats;
        let mut w = Walk {
            pool: &self.pool,
            yielder,
            acct: ZapAcct {
                flush,
                ..ZapAcct::default()
            },
            epoch: epoch::pin(),
        };
        let mut next = start;
        while next < end {
            match zap_table(self.root(), ROOT_LEVEL, 0, next, end, &mut w) {
                Ok(_) => break,
                Err(YieldAt(resume)) => {
                    publish(stats, &mut w.acct);
                    if w.acct.flush {
                        self.ctx.tlb.flush(stats);
                        w.acct.flush = false;
                    }
                    // rcu_read_unlock; cond_resched_rwlock_write; rcu_read_lock.
                    w.epoch.repin_after(|| MmuLock::yield_write(guard));
                    w.yielder.yielded();
                    next = resume;
                }
            }
        }
        publish(stats, &mut w.acct);
        w.epoch.flush();
        w.acct.flush
    }

    /// Take the write lock, zap `[start, end)` with `policy`, flush once,
    /// unlock. For callers outside an invalidation (tests, benchmarks,
    /// memslot deletion); host invalidations go through
    /// [`KvmMmuNotifier`](crate::KvmMmuNotifier).
    pub fn zap_range(&self, start: u64, end: u64, policy: YieldPolicy) -> YieldReport {
        let ctx = &*self.ctx;
        let mut guard = ctx.mmu_lock.write();
        let mut yielder = Yielder::new(policy, &ctx.mmu_lock, &ctx.stats);
        if self.zap_gfn_range(&mut guard, start, end, &mut yielder, false) {
            ctx.tlb.flush(&ctx.stats);
        }
        drop(guard);
        yielder.finish()
    }
}

impl SecondaryMmu for TdpMmu {
    fn unmap_gfn_range(
        &self,
        guard: &mut MmuWriteGuard<'_>,
        _slot: &Memslot,
        start: u64,
        end: u64,
        yielder: &mut Yielder<'_>,
        flush: bool,
    ) -> bool {
        self.zap_gfn_range(guard, start, end, yielder, flush)
    }
}

fn publish(stats: &MmuStats, acct: &mut ZapAcct) {
    for (i, level) in PageSize::ALL.into_iter().enumerate() {
        if acct.zapped[i] != 0 {
            MmuStats::sub(stats.pages(level), acct.zapped[i]);
            acct.zapped[i] = 0;
        }
    }
    if acct.tables_freed != 0 {
        MmuStats::sub(&stats.tdp_mmu_pages, acct.tables_freed);
        acct.tables_freed = 0;
    }
}

/// Zap within one table. `Ok(empty)`: done with this table, and whether it
/// now holds no present SPTE (so the parent may free it).
fn zap_table(
    table: &PageTable,
    level: u8,
    base: u64,
    start: u64,
    end: u64,
    w: &mut Walk<'_, '_>,
) -> Result<bool, YieldAt> {
    if level == 1 {
        return zap_leaf_table(table, base, start, end, w);
    }
    let span = level_span(level);
    let (first, last, full) = bounds(level, base, start, end);
    let mut changed = false;
    for i in first..last {
        let entry = &table.spte[i];
        let spte = Spte::from_raw_unchecked(entry.load(Ordering::Relaxed));
        let gfn = base + i as u64 * span;
        if spte.is_mmu_present() {
            if spte.is_last(level) {
                entry.store(0, Ordering::Relaxed);
                w.acct.zapped[level as usize - 1] += 1;
                w.acct.flush = true;
                changed = true;
            } else {
                // SAFETY: present non-leaf SPTE of this tree; we hold the
                // write lock, the only context that unlinks tables.
                let child = unsafe { PageTable::child(spte) };
                if zap_table(child, level - 1, gfn, start, end, w)? {
                    free_table(entry, spte, w);
                    changed = true;
                }
            }
        }
        if w.yielder.need_yield() {
            return Err(YieldAt(gfn + span));
        }
    }
    Ok(full || ((changed || start > base) && is_empty(table)))
}

/// The level-1 loop, kept tight: one load per SPTE, a store per present
/// one, one yield check per SPTE.
fn zap_leaf_table(
    table: &PageTable,
    base: u64,
    start: u64,
    end: u64,
    w: &mut Walk<'_, '_>,
) -> Result<bool, YieldAt> {
    let (first, last, full) = bounds(1, base, start, end);
    let (zapped, stopped) = clear_leaves(&table.spte[first..last], w.yielder);
    if zapped != 0 {
        w.acct.zapped[0] += zapped;
        w.acct.flush = true;
    }
    if let Some(i) = stopped {
        return Err(YieldAt(base + (first + i) as u64 + 1));
    }
    Ok(full || ((zapped != 0 || start > base) && is_empty(table)))
}

/// Clear the present leaves of `entries`, one yield check per SPTE. Returns
/// how many were present and, if the yielder said so, the index after which
/// to stop. The yielder is a parameter of its own (not reached through
/// `Walk`) so that the compiler knows the SPTE stores do not alias it and
/// keeps its unit counter in a register.
#[inline]
fn clear_leaves(entries: &[AtomicU64], yielder: &mut Yielder<'_>) -> (u64, Option<usize>) {
    let mut zapped = 0u64;
    for (i, entry) in entries.iter().enumerate() {
        if entry.load(Ordering::Relaxed) & SPTE_MMU_PRESENT != 0 {
            entry.store(0, Ordering::Relaxed);
            zapped += 1;
        }
        if yielder.need_yield() {
            return (zapped, Some(i));
        }
    }
    (zapped, None)
}

fn is_empty(table: &PageTable) -> bool {
    table
        .spte
        .iter()
        .all(|e| e.load(Ordering::Relaxed) & SPTE_MMU_PRESENT == 0)
}

/// Unlink an empty child table and free it once no lockless walker can
/// still hold it (`handle_removed_pt` + `call_rcu`).
fn free_table(entry: &AtomicU64, spte: Spte, w: &mut Walk<'_, '_>) {
    entry.store(0, Ordering::Release);
    let Some(table) = NonNull::new(spte.table_addr() as *mut PageTable) else {
        return;
    };
    let table = TablePtr(table);
    let pool = w.pool.clone();
    // SAFETY: the table was reachable only through `entry`, which no longer
    // points to it, so no new walker can find it; walkers that already did
    // are pinned, and the closure runs only after they all unpinned. It
    // owns an Arc of the pool, so the pool outlives it.
    unsafe {
        w.epoch.defer_unchecked(move || {
            let table = table;
            pool.release(table.0)
        })
    };
    w.acct.tables_freed += 1;
}
