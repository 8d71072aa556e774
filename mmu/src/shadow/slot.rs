//! The shadow MMU's per-memslot data (`struct kvm_arch_memory_slot`): rmaps
//! and populated summaries per level for one [`Memslot`] of the shared
//! [`MmuContext`](crate::MmuContext), kept in the shadow MMU by slot id;
//! and the rmap operations on them (add, remove, zap one head), the
//! mechanism the fault path, write protection and the zapper share.

use super::page::{count_page, ShadowState};
use crate::guest_walk::level_shift;
use crate::memslot::{Memslot, Memslots};
use crate::populated::PopulatedMap;
use crate::rmap::{RmapArray, SpteRef, RMAP_RECYCLE_THRESHOLD};
use crate::spte::Spte;
use crate::{MmuStats, RemoteTlb};
use std::sync::Arc;

/// Rmap levels: 4K, 2M, 1G (`KVM_NR_PAGE_SIZES`).
pub const NR_PAGE_SIZES: usize = 3;

/// Largest gfn the shadow MMU tracks (the guest walkers' 52-bit gpa space
/// is not needed; rmap indices stay below 2^40).
pub const SHADOW_GFN_LIMIT: u64 = 1 << 40;

#[derive(Debug)]
pub struct ShadowSlot {
    pub slot: Memslot,
    pub rmap: [RmapArray; NR_PAGE_SIZES],
    pub populated: [PopulatedMap; NR_PAGE_SIZES],
}

fn gfn_shift(level: u8) -> u32 {
    level_shift(level) - 12
}

impl ShadowSlot {
    /// `None` if the slot reaches past [`SHADOW_GFN_LIMIT`]: the shadow MMU
    /// then treats its gfns as in no memslot.
    pub fn new(slot: &Memslot) -> Option<Self> {
        if slot.gfn_end() > SHADOW_GFN_LIMIT {
            return None;
        }
        let heads = |level: u8| {
            let s = gfn_shift(level);
            ((slot.gfn_end() - 1) >> s) - (slot.base_gfn >> s) + 1
        };
        Some(Self {
            slot: *slot,
            rmap: [
                RmapArray::new(heads(1)),
                RmapArray::new(heads(2)),
                RmapArray::new(heads(3)),
            ],
            populated: [
                PopulatedMap::new(heads(1)),
                PopulatedMap::new(heads(2)),
                PopulatedMap::new(heads(3)),
            ],
        })
    }

    /// `gfn_to_index`: the head of `gfn` at `level`.
    #[inline]
    pub fn index(&self, level: u8, gfn: u64) -> u64 {
        let s = gfn_shift(level);
        (gfn >> s) - (self.slot.base_gfn >> s)
    }

    pub fn rmap_bytes(&self) -> u64 {
        self.rmap.iter().map(|r| r.bytes()).sum::<u64>()
            + self.populated.iter().map(|p| p.bytes()).sum::<u64>()
    }
}

/// The rmaps of the shadow MMU's state (KVM: `rmap_add`, `rmap_remove`,
/// `kvm_zap_rmap`), and the per-memslot arrays following the context's
/// memslots. Caller holds `mmu_lock` for write.
impl ShadowState {
    /// Follow the context's memslots: keep the rmaps of unchanged slots,
    /// start empty ones for new or changed slots, drop those of deleted
    /// slots (zapping what they mapped is the memslot updater's job, as
    /// for the TDP MMU). Caller holds `mmu_lock` for write.
    pub(super) fn sync_memslots(&mut self, memslots: Arc<Memslots>) {
        if self
            .memslots
            .as_ref()
            .is_some_and(|m| Arc::ptr_eq(m, &memslots))
        {
            return;
        }
        let mut old = std::mem::take(&mut self.slots);
        for m in memslots.iter() {
            match old.iter().position(|s| s.slot == *m) {
                Some(i) => self.slots.push(old.swap_remove(i)),
                None => self.slots.extend(ShadowSlot::new(m)),
            }
        }
        self.memslots = Some(memslots);
    }

    pub(super) fn slot_of(&self, gfn: u64) -> Option<usize> {
        self.slots.iter().position(|s| s.slot.contains_gfn(gfn))
    }

    pub(super) fn rmap_add(
        &mut self,
        gfn: u64,
        level: u8,
        r: SpteRef,
        stats: &MmuStats,
        tlb: &RemoteTlb,
    ) {
        let Some(s) = self.slot_of(gfn) else { return };
        let slot = &mut self.slots[s];
        let idx = slot.index(level, gfn);
        let Some(head) = slot.rmap[level as usize - 1].get_mut(idx) else {
            return;
        };
        let n = head.add(&mut self.descs, r);
        slot.populated[level as usize - 1].set(idx);
        MmuStats::peak(&stats.max_mmu_rmap_size, n);
        if n > RMAP_RECYCLE_THRESHOLD {
            // `__rmap_add`: a chain this long is zapped whole.
            if self.zap_rmap_head(s, level, idx, stats) > 0 {
                tlb.flush(stats);
            }
        }
    }

    pub(super) fn rmap_remove(&mut self, gfn: u64, level: u8, r: SpteRef) {
        let Some(s) = self.slot_of(gfn) else { return };
        let slot = &mut self.slots[s];
        let idx = slot.index(level, gfn);
        if let Some(head) = slot.rmap[level as usize - 1].get_mut(idx) {
            head.remove(&mut self.descs, r);
            if head.is_empty() {
                slot.populated[level as usize - 1].clear(idx);
            }
        }
    }

    /// `kvm_zap_rmap`: clear every SPTE in one head; returns how many.
    pub(super) fn zap_rmap_head(&mut self, s: usize, level: u8, idx: u64, stats: &MmuStats) -> u64 {
        let mut refs = std::mem::take(&mut self.scratch);
        refs.clear();
        let slot = &mut self.slots[s];
        if let Some(head) = slot.rmap[level as usize - 1].get_mut(idx) {
            head.take_all(&mut self.descs, &mut refs);
            slot.populated[level as usize - 1].clear(idx);
        }
        for r in &refs {
            self.page_mut(r.sp()).spt[r.index()] = Spte::NONPRESENT;
            count_page(stats, level, false);
        }
        let n = refs.len() as u64;
        self.scratch = refs;
        n
    }
}
