//! The TDP MMU: a 4-level radix tree of SPTEs keyed by gfn, as KVM's
//! `arch/x86/kvm/mmu/tdp_mmu.c`.
//!
//! - Table level 4 is the root (each SPTE covers 512 GiB of guest-physical
//!   space), level 3 SPTEs cover 1 GiB, level 2 2 MiB, level 1 4 KiB.
//!   Leaves live at levels 3 (1G), 2 (2M) and 1 (4K); 48-bit guest-physical
//!   addresses (gfn < 2^36).
//! - A page-table page is 512 `AtomicU64` SPTEs, 4 KiB aligned; a non-leaf
//!   SPTE holds its child's address in the pfn field.
//! - Faults (`fault`) run under `mmu_lock` held for read and install with
//!   compare-exchange; zaps (`zap`) run under the write lock and yield.
//! - Page-table pages are freed only by zaps (write lock) and only through
//!   crossbeam-epoch, so lockless walkers ([`TdpMmu::lookup`],
//!   [`TdpMmu::for_each_leaf`]) that pinned the epoch never see freed memory
//!   (KVM: RCU-freed `kvm_mmu_page`s). Tables come from 2 MiB chunks
//!   (`pool`), are recycled after the grace period and poisoned while free.
//! - Deviation from KVM: a fault whose huge leaf would replace an existing
//!   page table maps one level lower instead (KVM replaces the table and
//!   zaps its children); zaps free emptied tables, so huge leaves return.
//!   And the locked staleness check covers the whole span of the leaf
//!   about to be installed, not only the faulting gfn.

mod fault;
mod pool;
mod zap;

pub use fault::{FaultError, FaultOutcome, HostPage, ResolveError, ResolvePfn};
pub use pool::POISON_PFN;

use crate::context::MmuContext;
use crate::spte::Spte;
use crate::stats::MmuStats;
use crossbeam_epoch as epoch;
use notifier::convert::u64_to_usize;
use notifier::PageSize;
use pool::TablePool;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// SPTEs per page-table page.
pub const SPTES_PER_TABLE: usize = 512;
/// Table level of the root.
pub const ROOT_LEVEL: u8 = 4;
/// First gfn the tree cannot map (48-bit guest-physical addresses).
pub const GFN_LIMIT: u64 = 1 << 36;

/// One page-table page (`kvm_mmu_page.spt`).
#[repr(C, align(4096))]
pub(crate) struct PageTable {
    pub(crate) spte: [AtomicU64; SPTES_PER_TABLE],
}

const _: () = assert!(std::mem::size_of::<PageTable>() == 4096);

impl PageTable {
    /// The child table a present non-leaf SPTE points to.
    ///
    /// # Safety
    /// `spte` must be a present non-leaf SPTE read from a table of this MMU,
    /// and the caller must keep the child alive for `'a`: hold `mmu_lock`
    /// (tables are only unlinked under the write lock, and then freed after
    /// an epoch grace period) or an epoch guard pinned before the read.
    #[inline]
    unsafe fn child<'a>(spte: Spte) -> &'a PageTable {
        // SAFETY: see the function contract; the address came from the
        // table pool when the SPTE was built.
        unsafe { &*(spte.table_addr() as *const PageTable) }
    }
}

/// gfns one SPTE at table `level` covers.
#[inline]
pub(crate) const fn level_span(level: u8) -> u64 {
    1 << (9 * (level as u32 - 1))
}

#[inline]
pub(crate) const fn spte_index(gfn: u64, level: u8) -> usize {
    ((gfn >> (9 * (level as u32 - 1))) & 511) as usize
}

/// Entries `[first, last)` of a table at `level` whose first gfn is `base`
/// that overlap `[start, end)`, and whether the range covers the whole table.
#[inline]
pub(crate) fn bounds(level: u8, base: u64, start: u64, end: u64) -> (usize, usize, bool) {
    let span = level_span(level);
    let first = if start > base {
        u64_to_usize((start - base) / span)
    } else {
        0
    };
    let last = u64_to_usize(
        end.saturating_sub(base)
            .div_ceil(span)
            .min(SPTES_PER_TABLE as u64),
    );
    let full = start <= base && end >= base + span * SPTES_PER_TABLE as u64;
    (first, last, full)
}

/// A leaf found by a walk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Leaf {
    /// First gfn the leaf maps.
    pub gfn: u64,
    pub level: PageSize,
    pub spte: Spte,
}

impl Leaf {
    /// pfn backing `gfn` (which must be inside the leaf).
    pub fn pfn_of(&self, gfn: u64) -> u64 {
        self.spte.pfn() + (gfn - self.gfn)
    }

    pub fn gfn_end(&self) -> u64 {
        self.gfn + self.level.pages()
    }
}

/// The TDP MMU of one address space.
pub struct TdpMmu {
    ctx: Arc<MmuContext>,
    pool: Arc<TablePool>,
    root: NonNull<PageTable>,
}

// SAFETY: the root is owned by this TdpMmu (never freed before Drop) and is
// plain atomics; everything else is Send + Sync.
unsafe impl Send for TdpMmu {}
// SAFETY: as above; all shared access to tables goes through atomics.
unsafe impl Sync for TdpMmu {}

impl std::fmt::Debug for TdpMmu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TdpMmu").field("root", &self.root).finish()
    }
}

impl TdpMmu {
    pub fn new(ctx: Arc<MmuContext>) -> Self {
        MmuStats::inc(&ctx.stats.tdp_mmu_pages);
        let pool = Arc::new(TablePool::default());
        let root = pool.alloc();
        Self { ctx, pool, root }
    }

    #[inline]
    pub(crate) fn root(&self) -> &PageTable {
        // SAFETY: the root lives as long as self.
        unsafe { self.root.as_ref() }
    }

    pub fn context(&self) -> &Arc<MmuContext> {
        &self.ctx
    }

    pub fn stats(&self) -> &MmuStats {
        &self.ctx.stats
    }

    /// Lockless walk to the leaf mapping `gfn`, if any (what a vCPU's
    /// hardware walk would find).
    pub fn lookup(&self, gfn: u64) -> Option<Leaf> {
        if gfn >= GFN_LIMIT {
            return None;
        }
        let _guard = epoch::pin();
        let mut table: &PageTable = self.root();
        let mut level = ROOT_LEVEL;
        loop {
            let spte = Spte::from_raw_unchecked(
                table.spte[spte_index(gfn, level)].load(Ordering::Acquire),
            );
            if !spte.is_mmu_present() {
                return None;
            }
            if spte.is_last(level) {
                let level = PageSize::from_level(level)?;
                return Some(Leaf {
                    gfn: gfn & !(level.pages() - 1),
                    level,
                    spte,
                });
            }
            // SAFETY: present non-leaf SPTE of this tree, read under the
            // epoch guard `_guard` pinned above.
            table = unsafe { PageTable::child(spte) };
            level -= 1;
        }
    }

    /// Lockless walk of every leaf overlapping `[start, end)`, in gfn order.
    pub fn for_each_leaf(&self, start: u64, end: u64, mut f: impl FnMut(Leaf)) {
        let end = end.min(GFN_LIMIT);
        if start >= end {
            return;
        }
        let _guard = epoch::pin();
        walk_leaves(self.root(), ROOT_LEVEL, 0, start, end, &mut f);
    }

    /// Every leaf overlapping `[start, end)` (for verification).
    pub fn leaves_in(&self, start: u64, end: u64) -> Vec<Leaf> {
        let mut v = Vec::new();
        self.for_each_leaf(start, end, |l| v.push(l));
        v
    }

    /// Every leaf in the tree.
    pub fn mapped_leaves(&self) -> Vec<Leaf> {
        self.leaves_in(0, GFN_LIMIT)
    }

    /// Every gfn some leaf maps, expanded (for small models only).
    pub fn mapped_gfns(&self) -> Vec<u64> {
        self.mapped_leaves()
            .iter()
            .flat_map(|l| l.gfn..l.gfn_end())
            .collect()
    }

    /// Bytes of page-table pages in use (4 KiB each, root included).
    pub fn table_bytes(&self) -> u64 {
        self.ctx.stats.tdp_mmu_pages.load(Ordering::Relaxed) * 4096
    }

    /// Bytes of table chunks obtained from the allocator (virtual; only
    /// the tables ever used are resident).
    pub fn table_pool_bytes(&self) -> u64 {
        self.pool.chunk_bytes()
    }
}

fn walk_leaves(
    table: &PageTable,
    level: u8,
    base: u64,
    start: u64,
    end: u64,
    f: &mut impl FnMut(Leaf),
) {
    let span = level_span(level);
    let (first, last, _) = bounds(level, base, start, end);
    for i in first..last {
        let spte = Spte::from_raw_unchecked(table.spte[i].load(Ordering::Acquire));
        if !spte.is_mmu_present() {
            continue;
        }
        let gfn = base + i as u64 * span;
        if spte.is_last(level) {
            if let Some(level) = PageSize::from_level(level) {
                f(Leaf { gfn, level, spte });
            }
        } else {
            // SAFETY: present non-leaf SPTE, the caller pinned the epoch.
            let child = unsafe { PageTable::child(spte) };
            walk_leaves(child, level - 1, gfn, start, end, f);
        }
    }
}

/// Free a whole subtree. Only for `Drop`, when no walker can exist.
fn free_subtree(pool: &TablePool, table: NonNull<PageTable>, level: u8, stats: &MmuStats) {
    // SAFETY: `table` is a live table of the tree being dropped.
    let t = unsafe { table.as_ref() };
    for e in t.spte.iter() {
        let spte = Spte::from_raw_unchecked(e.load(Ordering::Relaxed));
        if spte.is_mmu_present() && !spte.is_last(level) {
            if let Some(child) = NonNull::new(spte.table_addr() as *mut PageTable) {
                free_subtree(pool, child, level - 1, stats);
            }
        } else if spte.is_mmu_present() {
            if let Some(l) = PageSize::from_level(level) {
                MmuStats::sub(stats.pages(l), 1);
            }
        }
    }
    // SAFETY: from this pool; the tree is being dropped (`&mut TdpMmu`), so
    // no SPTE or walker will reference it again.
    unsafe { pool.release(table) };
    MmuStats::sub(&stats.tdp_mmu_pages, 1);
}

impl Drop for TdpMmu {
    fn drop(&mut self) {
        free_subtree(&self.pool, self.root, ROOT_LEVEL, &self.ctx.stats);
    }
}

#[cfg(test)]
mod tests;
