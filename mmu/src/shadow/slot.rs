//! The shadow MMU's view of a memslot: its gfn range, where it is in the
//! host, and its rmaps and populated summaries per level
//! (`struct kvm_arch_memory_slot`).

use crate::guest_walk::level_shift;
use crate::populated::PopulatedMap;
use crate::rmap::RmapArray;

/// Rmap levels: 4K, 2M, 1G (`KVM_NR_PAGE_SIZES`).
pub const NR_PAGE_SIZES: usize = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SlotConfig {
    pub id: u32,
    pub base_gfn: u64,
    pub npages: u64,
    /// Host virtual address of the slot's first byte.
    pub userspace_addr: u64,
    /// Host page frame of the slot's first page (the model plane makes one
    /// up; SPTEs carry it).
    pub base_pfn: u64,
    pub writable: bool,
    /// Largest level the host backing allows (1 = 4K, 2 = 2M, 3 = 1G).
    pub max_level: u8,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SlotError {
    #[error("memslot {id} is empty or its gfn range overflows")]
    BadRange { id: u32 },
    #[error("memslot {id} overlaps memslot {other}")]
    Overlap { id: u32, other: u32 },
    #[error("memslot {id} has max_level {level}, not 1..=3")]
    BadLevel { id: u32, level: u8 },
    #[error("no memslot {id}")]
    NoSuchSlot { id: u32 },
}

#[derive(Debug)]
pub struct ShadowSlot {
    pub cfg: SlotConfig,
    pub rmap: [RmapArray; NR_PAGE_SIZES],
    pub populated: [PopulatedMap; NR_PAGE_SIZES],
}

fn gfn_shift(level: u8) -> u32 {
    level_shift(level) - 12
}

impl ShadowSlot {
    pub fn new(cfg: SlotConfig) -> Result<Self, SlotError> {
        if cfg.npages == 0
            || cfg
                .base_gfn
                .checked_add(cfg.npages)
                .is_none_or(|e| e > 1 << 40)
        {
            return Err(SlotError::BadRange { id: cfg.id });
        }
        if !(1..=3).contains(&cfg.max_level) {
            return Err(SlotError::BadLevel {
                id: cfg.id,
                level: cfg.max_level,
            });
        }
        let heads = |level: u8| {
            let s = gfn_shift(level);
            ((cfg.base_gfn + cfg.npages - 1) >> s) - (cfg.base_gfn >> s) + 1
        };
        Ok(Self {
            cfg,
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

    pub fn end_gfn(&self) -> u64 {
        self.cfg.base_gfn + self.cfg.npages
    }

    pub fn contains(&self, gfn: u64) -> bool {
        gfn >= self.cfg.base_gfn && gfn < self.end_gfn()
    }

    /// `gfn_to_index`: the head of `gfn` at `level`.
    #[inline]
    pub fn index(&self, level: u8, gfn: u64) -> u64 {
        let s = gfn_shift(level);
        (gfn >> s) - (self.cfg.base_gfn >> s)
    }

    pub fn pfn(&self, gfn: u64) -> u64 {
        self.cfg.base_pfn + (gfn - self.cfg.base_gfn)
    }

    /// Host virtual address range -> gfn range inside this slot.
    pub fn hva_to_gfns(&self, start: u64, end: u64) -> Option<(u64, u64)> {
        let base = self.cfg.userspace_addr;
        let slot_end = base.checked_add(self.cfg.npages << 12)?;
        let (s, e) = (start.max(base), end.min(slot_end));
        if s >= e {
            return None;
        }
        Some((
            self.cfg.base_gfn + ((s - base) >> 12),
            self.cfg.base_gfn + (e - base).div_ceil(4096),
        ))
    }

    pub fn rmap_bytes(&self) -> u64 {
        self.rmap.iter().map(|r| r.bytes()).sum::<u64>()
            + self.populated.iter().map(|p| p.bytes()).sum::<u64>()
    }
}
