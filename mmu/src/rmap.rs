//! Reverse maps: for each (memslot, level, gfn), the SPTEs that map it
//! (KVM: `struct kvm_rmap_head`, `struct pte_list_desc`, mmu.c "About
//! rmap_head encoding").
//!
//! Compact form, as KVM's:
//! - a head is one `u64`: 0 = empty; bit 0 clear = the single [`SpteRef`]
//!   inline; bit 0 set = index of a [`PteListDesc`] chain (`KVM_RMAP_MANY`).
//! - a descriptor holds up to [`PTE_LIST_EXT`] = 14 entries, a `more` link
//!   and `spte_count` / `tail_count`; new descriptors become the head, tail
//!   descriptors are always full, removal fills the hole with the head's last
//!   entry, so counting is O(1).
//!
//! SPTEs are named by [`SpteRef`] (shadow-page id, index) instead of a
//! pointer: the shadow MMU owns its pages in a slab.
//!
//! Heads live in [`RmapArray`]s, one per memslot and level, allocated lazily
//! in chunks of [`RMAP_CHUNK`] heads on first insert. A 4 TiB L1 at 4 KiB has
//! 2^30 heads (8 GiB if allocated as KVM does with `__vcalloc`); with lazy
//! chunks empty regions cost nothing to store, and [`RmapArray::get`] still
//! answers for every head position, so a blind walk still visits - and
//! yield-checks - every head. Reading an unallocated head is cheaper than
//! KVM's read of a zero head from memory; the walk's cost per head is still
//! O(1) and its count is exact.

use notifier::convert::u64_to_usize;

/// Entries per descriptor (`PTE_LIST_EXT`): 4+4+4+14*8 = 124 bytes.
pub const PTE_LIST_EXT: usize = 14;
/// [`PTE_LIST_EXT`] as the descriptors' count type.
const PTE_LIST_EXT_U32: u32 = 14;
const _: () = assert!(PTE_LIST_EXT_U32 as usize == PTE_LIST_EXT);
/// Heads per lazily allocated chunk: 512 heads = 4 KiB, one 2 MiB region at
/// the 4 KiB level.
pub const RMAP_CHUNK: usize = 512;
/// Chains longer than this are zapped on insert (`RMAP_RECYCLE_THRESHOLD`).
pub const RMAP_RECYCLE_THRESHOLD: u64 = 1000;

const RMAP_MANY: u64 = 1;

/// One SPTE: shadow page id and index in its 512 entries. Never 0 and bit 0
/// always clear, so it can sit inline in a head.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpteRef(u64);

impl SpteRef {
    pub fn new(sp: u32, index: u16) -> Self {
        debug_assert!(index < 512);
        // sp + 1 so that no SpteRef is 0 (an empty head).
        SpteRef(((sp as u64 + 1) << 10) | ((index as u64 & 511) << 1))
    }

    // Cannot truncate: bits 10.. hold a `u32` id + 1 (only `new` builds a
    // SpteRef), so the difference fits `u32`. On the rmap walk: no check.
    #[allow(clippy::cast_possible_truncation)]
    pub fn sp(self) -> u32 {
        ((self.0 >> 10) - 1) as u32
    }

    pub fn index(self) -> usize {
        ((self.0 >> 1) & 511) as usize
    }
}

/// `struct pte_list_desc`.
#[derive(Debug, Clone, Copy)]
pub struct PteListDesc {
    /// Next descriptor + 1 (0: none).
    more: u32,
    spte_count: u32,
    /// Entries in all descriptors after this one.
    tail_count: u32,
    sptes: [SpteRef; PTE_LIST_EXT],
}

/// All descriptors of one MMU, with a free list.
#[derive(Debug, Default)]
pub struct DescArena {
    descs: Vec<PteListDesc>,
    free: Vec<u32>,
}

impl DescArena {
    fn alloc(&mut self, d: PteListDesc) -> u32 {
        if let Some(i) = self.free.pop() {
            self.descs[i as usize] = d;
            return i;
        }
        // Descriptor ids are `u32` (heads and `more` links store them): an
        // arena past 2^32 descriptors (~500 GiB of them) is refused rather
        // than aliased.
        let id = u32::try_from(self.descs.len()).expect("rmap descriptor ids exceed u32");
        self.descs.push(d);
        id
    }

    fn release(&mut self, i: u32) {
        self.free.push(i);
    }

    /// Descriptors in use.
    pub fn in_use(&self) -> usize {
        self.descs.len() - self.free.len()
    }
}

/// `struct kvm_rmap_head`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RmapHead(u64);

impl RmapHead {
    pub const EMPTY: RmapHead = RmapHead(0);

    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    // Cannot truncate: a head with RMAP_MANY set is only built by `many`
    // from a `u32` descriptor id. On the rmap walk: no check.
    #[allow(clippy::cast_possible_truncation)]
    fn desc(self) -> Option<u32> {
        (self.0 & RMAP_MANY != 0).then_some((self.0 >> 1) as u32)
    }

    fn many(desc: u32) -> Self {
        RmapHead(((desc as u64) << 1) | RMAP_MANY)
    }

    /// `pte_list_add`: returns the entry count after the insert.
    pub fn add(&mut self, arena: &mut DescArena, spte: SpteRef) -> u64 {
        match (self.is_empty(), self.desc()) {
            (true, _) => {
                *self = RmapHead(spte.0);
                1
            }
            (false, None) => {
                let mut sptes = [SpteRef(0); PTE_LIST_EXT];
                sptes[0] = SpteRef(self.0);
                sptes[1] = spte;
                let d = arena.alloc(PteListDesc {
                    more: 0,
                    spte_count: 2,
                    tail_count: 0,
                    sptes,
                });
                *self = RmapHead::many(d);
                2
            }
            (false, Some(mut d)) => {
                let head = arena.descs[d as usize];
                if head.spte_count == PTE_LIST_EXT_U32 {
                    let tail_count = head.tail_count + PTE_LIST_EXT_U32;
                    d = arena.alloc(PteListDesc {
                        more: d + 1,
                        spte_count: 0,
                        tail_count,
                        sptes: [SpteRef(0); PTE_LIST_EXT],
                    });
                    *self = RmapHead::many(d);
                }
                let h = &mut arena.descs[d as usize];
                h.sptes[h.spte_count as usize] = spte;
                h.spte_count += 1;
                (h.tail_count + h.spte_count) as u64
            }
        }
    }

    /// `pte_list_remove`: false if `spte` was not in the list.
    pub fn remove(&mut self, arena: &mut DescArena, spte: SpteRef) -> bool {
        let Some(head) = self.desc() else {
            if !self.is_empty() && self.0 == spte.0 {
                *self = RmapHead::EMPTY;
                return true;
            }
            return false;
        };
        let mut d = head;
        loop {
            let desc = arena.descs[d as usize];
            if let Some(i) = desc.sptes[..desc.spte_count as usize]
                .iter()
                .position(|s| *s == spte)
            {
                // Fill the hole with the head's last entry (tail stays full).
                let h = &mut arena.descs[head as usize];
                h.spte_count -= 1;
                let last = h.sptes[h.spte_count as usize];
                let (h_count, h_more) = (h.spte_count, h.more);
                arena.descs[d as usize].sptes[i] = last;
                if h_count == 0 {
                    arena.release(head);
                    *self = if h_more == 0 {
                        RmapHead::EMPTY
                    } else {
                        RmapHead::many(h_more - 1)
                    };
                }
                return true;
            }
            if desc.more == 0 {
                return false;
            }
            d = desc.more - 1;
        }
    }

    /// `pte_list_count`, O(1).
    pub fn count(self, arena: &DescArena) -> u64 {
        match (self.is_empty(), self.desc()) {
            (true, _) => 0,
            (false, None) => 1,
            (false, Some(d)) => {
                let h = &arena.descs[d as usize];
                (h.tail_count + h.spte_count) as u64
            }
        }
    }

    /// Every entry, head descriptor first.
    pub fn for_each(self, arena: &DescArena, mut f: impl FnMut(SpteRef)) {
        match (self.is_empty(), self.desc()) {
            (true, _) => {}
            (false, None) => f(SpteRef(self.0)),
            (false, Some(mut d)) => loop {
                let desc = &arena.descs[d as usize];
                desc.sptes[..desc.spte_count as usize]
                    .iter()
                    .for_each(|s| f(*s));
                if desc.more == 0 {
                    break;
                }
                d = desc.more - 1;
            },
        }
    }

    /// Empty the list, freeing its descriptors; returns the entries
    /// (`kvm_zap_all_rmap_sptes` without the SPTE side).
    pub fn take_all(&mut self, arena: &mut DescArena, out: &mut Vec<SpteRef>) {
        self.for_each(arena, |s| out.push(s));
        let mut d = self.desc();
        while let Some(i) = d {
            let more = arena.descs[i as usize].more;
            arena.release(i);
            d = (more != 0).then(|| more - 1);
        }
        *self = RmapHead::EMPTY;
    }
}

/// The heads of one memslot at one level, allocated in chunks on first
/// insert (see the module docs).
#[derive(Debug, Default)]
pub struct RmapArray {
    len: u64,
    chunks: Vec<Option<Box<[RmapHead; RMAP_CHUNK]>>>,
}

impl RmapArray {
    pub fn new(len: u64) -> Self {
        let n = u64_to_usize(len.div_ceil(RMAP_CHUNK as u64));
        Self {
            len,
            chunks: (0..n).map(|_| None).collect(),
        }
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The head at `idx`; unallocated and out-of-range heads are empty.
    #[inline]
    pub fn get(&self, idx: u64) -> RmapHead {
        match self.chunks.get(u64_to_usize(idx / RMAP_CHUNK as u64)) {
            Some(Some(c)) => c[u64_to_usize(idx % RMAP_CHUNK as u64)],
            _ => RmapHead::EMPTY,
        }
    }

    /// How many heads from `idx` (below `end`) are empty before the first
    /// populated one: the blind walk's inner loop (KVM's
    /// `slot_rmap_walk_next()` skips empty heads the same way, in a tight
    /// loop over the array). Unallocated chunks are empty without a look.
    #[inline]
    pub fn empty_run(&self, idx: u64, end: u64) -> u64 {
        const CHUNK: u64 = RMAP_CHUNK as u64;
        let mut i = idx;
        while i < end {
            let c = i / CHUNK;
            let chunk_end = end.min((c + 1) * CHUNK);
            if let Some(Some(heads)) = self.chunks.get(u64_to_usize(c)) {
                let (from, to) = (u64_to_usize(i % CHUNK), u64_to_usize(chunk_end - c * CHUNK));
                if let Some(p) = heads[from..to].iter().position(|h| !h.is_empty()) {
                    return i - idx + p as u64;
                }
            }
            i = chunk_end;
        }
        end.saturating_sub(idx)
    }

    /// The head at `idx` for update, allocating its chunk. `None` if out of
    /// range.
    pub fn get_mut(&mut self, idx: u64) -> Option<&mut RmapHead> {
        if idx >= self.len {
            return None;
        }
        let c = self.chunks[u64_to_usize(idx / RMAP_CHUNK as u64)]
            .get_or_insert_with(|| Box::new([RmapHead::EMPTY; RMAP_CHUNK]));
        Some(&mut c[u64_to_usize(idx % RMAP_CHUNK as u64)])
    }

    /// Bytes of allocated heads and chunk table.
    pub fn bytes(&self) -> u64 {
        let allocated = self.chunks.iter().filter(|c| c.is_some()).count() as u64;
        allocated * (RMAP_CHUNK as u64 * 8) + self.chunks.len() as u64 * 8
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_runs_stop_at_the_first_populated_head() {
        let mut a = RmapArray::new(4 * RMAP_CHUNK as u64);
        // Chunk 0 unallocated; a head in chunk 2.
        let at = 2 * RMAP_CHUNK as u64 + 7;
        *a.get_mut(at).unwrap() = RmapHead(2);
        assert_eq!(a.empty_run(0, at + 10), at);
        assert_eq!(a.empty_run(at, at + 10), 0);
        assert_eq!(a.empty_run(at + 1, at + 10), 9);
        assert_eq!(a.empty_run(5, 5), 0);
        // Past the end: empty, like `get`.
        assert_eq!(
            a.empty_run(at + 1, 10 * RMAP_CHUNK as u64),
            10 * RMAP_CHUNK as u64 - at - 1
        );
    }

    #[test]
    fn compact_form_add_remove_count() {
        let mut arena = DescArena::default();
        let mut h = RmapHead::EMPTY;
        let refs: Vec<_> = (0..100u32)
            .map(|i| SpteRef::new(i, (i % 512) as u16))
            .collect();
        for (n, r) in refs.iter().enumerate() {
            assert_eq!(h.add(&mut arena, *r), n as u64 + 1);
            assert_eq!(h.count(&arena), n as u64 + 1);
        }
        assert_eq!(arena.in_use(), 100usize.div_ceil(PTE_LIST_EXT));
        // Remove in an order that punches holes in tail descriptors.
        for (n, r) in refs.iter().enumerate().filter(|(i, _)| i % 3 == 0) {
            assert!(h.remove(&mut arena, *r), "{n}");
            assert!(!h.remove(&mut arena, *r));
        }
        let mut left = Vec::new();
        h.for_each(&arena, |s| left.push(s));
        left.sort();
        let want: Vec<_> = refs
            .iter()
            .enumerate()
            .filter(|(i, _)| i % 3 != 0)
            .map(|(_, r)| *r)
            .collect();
        assert_eq!(left, want);
        assert_eq!(h.count(&arena), want.len() as u64);
        let mut out = Vec::new();
        h.take_all(&mut arena, &mut out);
        assert!(h.is_empty());
        assert_eq!(arena.in_use(), 0);
        assert_eq!(out.len(), want.len());
    }

    #[test]
    fn single_entry_inline() {
        let mut arena = DescArena::default();
        let mut h = RmapHead::EMPTY;
        let r = SpteRef::new(7, 511);
        assert_eq!((r.sp(), r.index()), (7, 511));
        h.add(&mut arena, r);
        assert_eq!(arena.in_use(), 0);
        assert!(h.remove(&mut arena, r));
        assert!(h.is_empty());
    }

    #[test]
    fn lazy_array_costs_nothing_when_empty() {
        let mut a = RmapArray::new(1 << 30);
        assert_eq!(a.bytes(), (1 << 30) / RMAP_CHUNK as u64 * 8);
        assert!(a.get(12345).is_empty());
        assert!(a.get(1 << 40).is_empty());
        assert!(a.get_mut(1 << 30).is_none());
        a.get_mut(12345)
            .unwrap()
            .add(&mut DescArena::default(), SpteRef::new(1, 1));
        assert!(!a.get(12345).is_empty());
        assert_eq!(a.bytes(), (1 << 30) / RMAP_CHUNK as u64 * 8 + 4096);
    }
}
