//! The shadow MMU's per-memslot data (`struct kvm_arch_memory_slot`): rmaps
//! and populated summaries per level for one [`Memslot`] of the shared
//! [`MmuContext`](crate::MmuContext), kept in the shadow MMU by slot id.

use crate::guest_walk::level_shift;
use crate::memslot::Memslot;
use crate::populated::PopulatedMap;
use crate::rmap::RmapArray;

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
