//! Memslots: guest-physical ranges backed by host virtual memory
//! (`struct kvm_memory_slot`), and the translation a host invalidation needs
//! from an hva range to the gfn ranges of the slots it overlaps
//! (`__kvm_handle_hva_range` / `hva_to_gfn_memslot` in `virt/kvm/kvm_main.c`).

use notifier::HvaRange;
use notifier::PageSize;
use thiserror::Error;

pub const PAGE_SHIFT: u32 = 12;
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum MemslotError {
    #[error("memslot {id}: no pages")]
    Empty { id: u32 },
    #[error("memslot {id}: userspace_addr {hva:#x} is not page aligned")]
    UnalignedHva { id: u32, hva: u64 },
    #[error("memslot {id}: gfn or hva range overflows")]
    Overflow { id: u32 },
    #[error("memslots {a} and {b} overlap in guest-physical space")]
    Overlap { a: u32, b: u32 },
    #[error("memslot id {id} used twice")]
    DuplicateId { id: u32 },
}

/// `struct kvm_memory_slot`, plus the host backing page size (hugetlb 2M /
/// 1G, or 4K) that bounds the leaf size a fault may install.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Memslot {
    pub id: u32,
    pub base_gfn: u64,
    pub npages: u64,
    /// hva of `base_gfn`.
    pub userspace_addr: u64,
    /// Host backing page size.
    pub backing: PageSize,
    /// `KVM_MEM_READONLY`.
    pub readonly: bool,
}

/// The part of one memslot a host invalidation covers (`struct
/// kvm_gfn_range`): gfns `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GfnRange<'a> {
    pub slot: &'a Memslot,
    pub start: u64,
    pub end: u64,
}

impl Memslot {
    pub fn new(
        id: u32,
        base_gfn: u64,
        npages: u64,
        userspace_addr: u64,
        backing: PageSize,
    ) -> Result<Self, MemslotError> {
        if npages == 0 {
            return Err(MemslotError::Empty { id });
        }
        if userspace_addr & (PAGE_SIZE - 1) != 0 {
            return Err(MemslotError::UnalignedHva {
                id,
                hva: userspace_addr,
            });
        }
        let fits = base_gfn.checked_add(npages).is_some()
            && npages
                .checked_mul(PAGE_SIZE)
                .and_then(|b| b.checked_add(userspace_addr))
                .is_some();
        if !fits {
            return Err(MemslotError::Overflow { id });
        }
        Ok(Self {
            id,
            base_gfn,
            npages,
            userspace_addr,
            backing,
            readonly: false,
        })
    }

    pub fn read_only(mut self) -> Self {
        self.readonly = true;
        self
    }

    /// First gfn past the slot.
    pub fn gfn_end(&self) -> u64 {
        self.base_gfn + self.npages
    }

    /// First hva past the slot.
    pub fn hva_end(&self) -> u64 {
        self.userspace_addr + self.npages * PAGE_SIZE
    }

    pub fn contains_gfn(&self, gfn: u64) -> bool {
        gfn >= self.base_gfn && gfn < self.gfn_end()
    }

    pub fn hva_range(&self) -> HvaRange {
        HvaRange::new(self.userspace_addr, self.hva_end())
    }

    /// `__gfn_to_hva_memslot`.
    pub fn gfn_to_hva(&self, gfn: u64) -> Option<u64> {
        self.contains_gfn(gfn)
            .then(|| self.userspace_addr + ((gfn - self.base_gfn) << PAGE_SHIFT))
    }

    /// `hva_to_gfn_memslot`: `hva` must be within (or at the end of) the slot.
    pub fn hva_to_gfn(&self, hva: u64) -> u64 {
        self.base_gfn + ((hva - self.userspace_addr) >> PAGE_SHIFT)
    }

    /// The largest leaf a fault at `gfn` may install as far as the slot is
    /// concerned: no larger than the host backing, the whole aligned block
    /// inside the slot, and gfn and hva equally aligned within it (KVM's
    /// `lpage_info` disallow rules for slot edges and misaligned slots).
    pub fn max_level(&self, gfn: u64) -> PageSize {
        let mut level = self.backing;
        while let Some(lower) = level.lower() {
            if self.level_fits(gfn, level) {
                return level;
            }
            level = lower;
        }
        PageSize::Size4K
    }

    fn level_fits(&self, gfn: u64, level: PageSize) -> bool {
        let mask = level.pages() - 1;
        let block = gfn & !mask;
        let hva_pfn = self.userspace_addr >> PAGE_SHIFT;
        block >= self.base_gfn
            && block + level.pages() <= self.gfn_end()
            && (hva_pfn & mask) == (self.base_gfn & mask)
    }
}

/// The memslots of one address space, sorted by `base_gfn`, with a
/// generation (`kvm_memslots.generation`) that changes on every update.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Memslots {
    slots: Vec<Memslot>,
    generation: u64,
}

impl Memslots {
    pub fn new(mut slots: Vec<Memslot>, generation: u64) -> Result<Self, MemslotError> {
        slots.sort_by_key(|s| s.base_gfn);
        for w in slots.windows(2) {
            if w[0].gfn_end() > w[1].base_gfn {
                return Err(MemslotError::Overlap {
                    a: w[0].id,
                    b: w[1].id,
                });
            }
        }
        let mut ids: Vec<u32> = slots.iter().map(|s| s.id).collect();
        ids.sort_unstable();
        if let Some(w) = ids.windows(2).find(|w| w[0] == w[1]) {
            return Err(MemslotError::DuplicateId { id: w[0] });
        }
        Ok(Self { slots, generation })
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn iter(&self) -> impl Iterator<Item = &Memslot> {
        self.slots.iter()
    }

    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// `gfn_to_memslot`.
    pub fn gfn_to_memslot(&self, gfn: u64) -> Option<&Memslot> {
        let i = self.slots.partition_point(|s| s.base_gfn <= gfn);
        let slot = self.slots.get(i.checked_sub(1)?)?;
        slot.contains_gfn(gfn).then_some(slot)
    }

    /// The gfn ranges of every slot `range` overlaps, as
    /// `__kvm_handle_hva_range` builds them: the hva range clipped to the
    /// slot, start rounded down and end rounded up to whole gfns. Several
    /// slots may alias the same hvas; each is reported.
    pub fn hva_range_to_gfn_ranges(&self, range: HvaRange) -> impl Iterator<Item = GfnRange<'_>> {
        self.slots.iter().filter_map(move |slot| {
            let hva_start = range.start.max(slot.userspace_addr);
            let hva_end = range.end.min(slot.hva_end());
            (hva_start < hva_end).then(|| GfnRange {
                slot,
                start: slot.hva_to_gfn(hva_start),
                end: slot.hva_to_gfn(hva_end + PAGE_SIZE - 1),
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: u64 = 1 << 30;

    fn slots() -> Memslots {
        Memslots::new(
            vec![
                Memslot::new(
                    0,
                    0,
                    (G / PAGE_SIZE) * 2,
                    0x7f00_0000_0000,
                    PageSize::Size1G,
                )
                .unwrap(),
                Memslot::new(1, 0x100000, 1024, 0x7e00_0000_0000, PageSize::Size2M).unwrap(),
            ],
            1,
        )
        .unwrap()
    }

    #[test]
    fn hva_range_clips_and_rounds_to_gfns() {
        let s = slots();
        let r: Vec<_> = s
            .hva_range_to_gfn_ranges(HvaRange::new(0x7f00_0000_1800, 0x7f00_0000_3001))
            .map(|r| (r.slot.id, r.start, r.end))
            .collect();
        assert_eq!(r, vec![(0, 1, 4)]);
        // Spanning past the slot end is clipped.
        let r: Vec<_> = s
            .hva_range_to_gfn_ranges(HvaRange::new(
                0x7e00_0000_0000 + 1000 * PAGE_SIZE,
                0x7e00_1000_0000,
            ))
            .map(|r| (r.slot.id, r.start, r.end))
            .collect();
        assert_eq!(r, vec![(1, 0x100000 + 1000, 0x100000 + 1024)]);
        // No overlap: nothing.
        assert_eq!(
            s.hva_range_to_gfn_ranges(HvaRange::new(0x1000, 0x2000))
                .count(),
            0
        );
    }

    #[test]
    fn aliased_slots_are_all_reported() {
        let s = Memslots::new(
            vec![
                Memslot::new(0, 0, 16, 0x10000, PageSize::Size4K).unwrap(),
                Memslot::new(1, 100, 16, 0x10000, PageSize::Size4K).unwrap(),
            ],
            0,
        )
        .unwrap();
        let r: Vec<_> = s
            .hva_range_to_gfn_ranges(HvaRange::new(0x12000, 0x13000))
            .map(|r| (r.slot.id, r.start, r.end))
            .collect();
        assert_eq!(r, vec![(0, 2, 3), (1, 102, 103)]);
    }

    #[test]
    fn gfn_lookup_and_hva() {
        let s = slots();
        assert_eq!(s.gfn_to_memslot(5).unwrap().id, 0);
        assert_eq!(s.gfn_to_memslot(0x100000 + 1023).unwrap().id, 1);
        assert!(s.gfn_to_memslot(0x100000 + 1024).is_none());
        assert!(s.gfn_to_memslot(0x80000).is_none());
        let slot = s.gfn_to_memslot(3).unwrap();
        assert_eq!(slot.gfn_to_hva(3), Some(0x7f00_0000_3000));
        assert_eq!(slot.hva_to_gfn(0x7f00_0000_3fff), 3);
    }

    #[test]
    fn max_level_follows_backing_edges_and_alignment() {
        let s = slots();
        let big = s.gfn_to_memslot(0).unwrap();
        assert_eq!(big.max_level(12345), PageSize::Size1G);
        let small = s.gfn_to_memslot(0x100000).unwrap();
        assert_eq!(small.max_level(0x100000 + 5), PageSize::Size2M);
        // A 2M-backed slot whose hva is only 4K-congruent to its gfns.
        let mis = Memslot::new(2, 0, 4096, 0x7d00_0000_1000, PageSize::Size2M).unwrap();
        assert_eq!(mis.max_level(600), PageSize::Size4K);
        // Slot edges: a slot starting mid-2M block cannot map its first block huge.
        let edge = Memslot::new(
            3,
            256,
            2048,
            0x7c00_0000_0000 + 256 * PAGE_SIZE,
            PageSize::Size2M,
        )
        .unwrap();
        assert_eq!(edge.max_level(300), PageSize::Size4K);
        assert_eq!(edge.max_level(600), PageSize::Size2M);
        assert_eq!(
            edge.max_level(2048 + 255),
            PageSize::Size4K,
            "last block sticks out"
        );
    }

    #[test]
    fn bad_slots_are_refused() {
        assert_eq!(
            Memslot::new(0, 0, 0, 0, PageSize::Size4K),
            Err(MemslotError::Empty { id: 0 })
        );
        assert!(matches!(
            Memslot::new(0, 0, 1, 0x1001, PageSize::Size4K),
            Err(MemslotError::UnalignedHva { .. })
        ));
        assert!(matches!(
            Memslot::new(0, u64::MAX, 2, 0, PageSize::Size4K),
            Err(MemslotError::Overflow { .. })
        ));
        let a = Memslot::new(0, 0, 10, 0, PageSize::Size4K).unwrap();
        let b = Memslot::new(1, 5, 10, 0x100000, PageSize::Size4K).unwrap();
        assert_eq!(
            Memslots::new(vec![a, b], 0),
            Err(MemslotError::Overlap { a: 0, b: 1 })
        );
        let c = Memslot::new(0, 20, 10, 0x100000, PageSize::Size4K).unwrap();
        assert_eq!(
            Memslots::new(vec![a, c], 0),
            Err(MemslotError::DuplicateId { id: 0 })
        );
    }
}
