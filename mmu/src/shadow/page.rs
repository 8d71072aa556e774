//! Shadow pages (KVM: `struct kvm_mmu_page` and the shadow-page half of
//! `mmu.c`): the hash of pages keyed by (gfn, [`Role`]), finding or
//! creating a page (`kvm_mmu_get_shadow_page`), linking it under a parent
//! SPTE, dropping SPTEs and zapping pages with the children they orphan,
//! the `pages_*` counters, and the read-only views of what is mapped
//! ([`ShadowMmu::translate`], [`ShadowMmu::footprint`]).
//!
//! [`ShadowState`] is everything behind the MMU's state mutex; the rmaps it
//! holds are [`super::slot`]'s, the write tracking of guest-table gfns is
//! [`super::page_track`]'s.

use super::slot::ShadowSlot;
use super::{GuestPaging, Role, ShadowMmu, ACC_ALL};
use crate::guest_walk::{level_shift, ROOT_LEVEL};
use crate::memslot::Memslots;
use crate::rmap::{DescArena, SpteRef};
use crate::spte::Spte;
use crate::MmuStats;
use notifier::PageSize;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// `struct kvm_mmu_page`, the parts this MMU uses.
#[derive(Debug)]
pub(super) struct ShadowPage {
    pub(super) gfn: u64,
    pub(super) role: Role,
    pub(super) spt: Box<[Spte; 512]>,
    /// `shadowed_translation`: the gfn each leaf SPTE maps (kept for direct
    /// pages too, to find the rmap on removal).
    pub(super) gfns: Box<[u64; 512]>,
    /// Parent SPTEs pointing here (`parent_ptes`).
    pub(super) parent_ptes: Vec<SpteRef>,
}

/// A present shadow translation (for tests and reports).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShadowMapping {
    pub gfn: u64,
    pub pfn: u64,
    pub level: u8,
    pub writable: bool,
}

/// Sizes of what the MMU holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ShadowFootprint {
    pub shadow_pages: u64,
    pub shadowed_gfns: u64,
    pub rmap_descs: u64,
    pub rmap_bytes: u64,
    pub populated_heads: u64,
}

/// Everything behind [`ShadowMmu`]'s state mutex (taken only with
/// `mmu_lock` held for write).
pub(super) struct ShadowState {
    pub(super) pages: Vec<Option<ShadowPage>>,
    pub(super) free_ids: Vec<u32>,
    pub(super) hash: HashMap<(u64, Role), u32>,
    /// gfn -> indirect shadow pages shadowing it; `gfn_write_track[gfn]` is
    /// the length.
    pub(super) shadowed: BTreeMap<u64, Vec<u32>>,
    /// Per-memslot rmaps, for the memslots of `memslots`.
    pub(super) slots: Vec<ShadowSlot>,
    /// The context's memslots `slots` was built for.
    pub(super) memslots: Option<Arc<Memslots>>,
    pub(super) descs: DescArena,
    pub(super) scratch: Vec<SpteRef>,
}

/// The [`SpteRef`] of entry `i` of shadow page `sp` (rmaps, `parent_ptes`).
// Cannot truncate: `i` indexes a page's 512 SPTEs, so it is below 512 and
// fits the `u16` of `SpteRef::new`. On the fault path and the page zap: no
// check.
#[allow(clippy::cast_possible_truncation)]
#[inline]
pub(super) fn spte_ref(sp: u32, i: usize) -> SpteRef {
    debug_assert!(i < 512);
    SpteRef::new(sp, i as u16)
}

pub(super) fn index(addr: u64, level: u8) -> usize {
    ((addr >> level_shift(level)) & 511) as usize
}

pub(super) fn span(level: u8) -> u64 {
    1u64 << (level_shift(level) - 12)
}

pub(super) fn count_page(stats: &MmuStats, level: u8, up: bool) {
    let c = stats.pages(PageSize::from_level(level).unwrap_or(PageSize::Size1G));
    if up {
        MmuStats::inc(c);
    } else {
        MmuStats::sub(c, 1);
    }
}

impl ShadowState {
    pub(super) fn new() -> Self {
        Self {
            pages: Vec::new(),
            free_ids: Vec::new(),
            hash: HashMap::new(),
            shadowed: BTreeMap::new(),
            slots: Vec::new(),
            memslots: None,
            descs: DescArena::default(),
            scratch: Vec::new(),
        }
    }

    pub(super) fn page(&self, id: u32) -> &ShadowPage {
        self.pages[id as usize].as_ref().expect("live shadow page")
    }

    pub(super) fn page_mut(&mut self, id: u32) -> &mut ShadowPage {
        self.pages[id as usize].as_mut().expect("live shadow page")
    }

    /// `kvm_mmu_get_shadow_page`: find or create; returns (id, flush needed).
    pub(super) fn get_or_create_sp(
        &mut self,
        gfn: u64,
        role: Role,
        stats: &MmuStats,
    ) -> (u32, bool) {
        if let Some(&id) = self.hash.get(&(gfn, role)) {
            return (id, false);
        }
        MmuStats::inc(&stats.mmu_cache_miss);
        let sp = ShadowPage {
            gfn,
            role,
            spt: Box::new([Spte::NONPRESENT; 512]),
            gfns: Box::new([0; 512]),
            parent_ptes: Vec::new(),
        };
        let id = match self.free_ids.pop() {
            Some(id) => {
                self.pages[id as usize] = Some(sp);
                id
            }
            None => {
                // Shadow page ids are `u32` (SPTE links and rmap entries
                // store them): past 2^32 pages (32 TiB of them) the MMU
                // refuses rather than aliases.
                let id = u32::try_from(self.pages.len()).expect("shadow page ids exceed u32");
                self.pages.push(Some(sp));
                id
            }
        };
        self.hash.insert((gfn, role), id);
        let flush = !role.direct && self.account_shadowed(gfn, id);
        (id, flush)
    }

    /// Clear one SPTE with its bookkeeping (`drop_spte` / `mmu_page_zap_pte`).
    /// Returns shadow pages zapped as a consequence (orphaned children).
    pub(super) fn drop_spte(&mut self, id: u32, i: usize, stats: &MmuStats) -> u64 {
        let (spte, level, gfn) = {
            let sp = self.page(id);
            (sp.spt[i], sp.role.level, sp.gfns[i])
        };
        if !spte.is_mmu_present() {
            return 0;
        }
        self.page_mut(id).spt[i] = Spte::NONPRESENT;
        if spte.is_last(level) {
            self.rmap_remove(gfn, level, spte_ref(id, i));
            count_page(stats, level, false);
            return 0;
        }
        let child = spte.shadow_child();
        let me = spte_ref(id, i);
        let c = self.page_mut(child);
        c.parent_ptes.retain(|p| *p != me);
        if c.parent_ptes.is_empty() {
            return self.zap_sp(child, stats);
        }
        0
    }

    /// `kvm_mmu_prepare_zap_page` + commit: unlink from parents, drop every
    /// SPTE (recursing into orphaned children), forget the page. Returns
    /// pages zapped.
    pub(super) fn zap_sp(&mut self, id: u32, stats: &MmuStats) -> u64 {
        let mut zapped = 0;
        let mut work = vec![id];
        while let Some(id) = work.pop() {
            let Some(sp) = self.pages[id as usize].take() else {
                continue;
            };
            for p in &sp.parent_ptes {
                if let Some(parent) = self.pages[p.sp() as usize].as_mut() {
                    parent.spt[p.index()] = Spte::NONPRESENT;
                }
            }
            for (i, &spte) in sp.spt.iter().enumerate() {
                if !spte.is_mmu_present() {
                    continue;
                }
                if spte.is_last(sp.role.level) {
                    self.rmap_remove(sp.gfns[i], sp.role.level, spte_ref(id, i));
                    count_page(stats, sp.role.level, false);
                } else {
                    let child = spte.shadow_child();
                    let me = spte_ref(id, i);
                    if let Some(c) = self.pages[child as usize].as_mut() {
                        c.parent_ptes.retain(|p| *p != me);
                        if c.parent_ptes.is_empty() {
                            work.push(child);
                        }
                    }
                }
            }
            self.hash.remove(&(sp.gfn, sp.role));
            if !sp.role.direct {
                self.unaccount_shadowed(sp.gfn, id);
            }
            self.free_ids.push(id);
            MmuStats::inc(&stats.mmu_shadow_zapped);
            zapped += 1;
        }
        zapped
    }

    pub(super) fn link(&mut self, parent: u32, i: usize, child: u32) {
        self.page_mut(parent).spt[i] = Spte::shadow_link(child);
        self.page_mut(child).parent_ptes.push(spte_ref(parent, i));
    }
}

impl<P: GuestPaging> ShadowMmu<P> {
    /// The shadow translation of `addr` under `paging`'s root, if present.
    pub fn translate(&self, paging: &P, addr: u64) -> Option<ShadowMapping> {
        let _g = self.ctx.mmu_lock.read();
        let st = self.state.lock();
        let mut sp = *st
            .hash
            .get(&(paging.root_gfn(), Self::role(ROOT_LEVEL, false, ACC_ALL)))?;
        for level in (1..=ROOT_LEVEL).rev() {
            let page = st.page(sp);
            let i = index(addr, level);
            let spte = page.spt[i];
            if !spte.is_mmu_present() {
                return None;
            }
            if spte.is_last(level) {
                let off = (addr >> 12) & (span(level) - 1);
                return Some(ShadowMapping {
                    gfn: page.gfns[i] + off,
                    pfn: spte.pfn() + off,
                    level,
                    writable: spte.is_writable(),
                });
            }
            sp = spte.shadow_child();
        }
        None
    }

    /// Every present leaf: (gfn, level, writable). For reference checks.
    pub fn leaves(&self) -> Vec<(u64, u8, bool)> {
        let _g = self.ctx.mmu_lock.read();
        let st = self.state.lock();
        let mut out = Vec::new();
        for sp in st.pages.iter().flatten() {
            for (i, &s) in sp.spt.iter().enumerate() {
                if s.is_mmu_present() && s.is_last(sp.role.level) {
                    out.push((sp.gfns[i], sp.role.level, s.is_writable()));
                }
            }
        }
        out
    }

    /// Every role in the shadow-page hash.
    pub fn roles(&self) -> Vec<(u64, Role)> {
        self.state.lock().hash.keys().copied().collect()
    }

    pub fn footprint(&self) -> ShadowFootprint {
        let st = self.state.lock();
        ShadowFootprint {
            shadow_pages: st.hash.len() as u64,
            shadowed_gfns: st.shadowed.len() as u64,
            rmap_descs: st.descs.in_use() as u64,
            rmap_bytes: st.slots.iter().map(|s| s.rmap_bytes()).sum(),
            populated_heads: st
                .slots
                .iter()
                .flat_map(|s| s.populated.iter().map(|p| p.count()))
                .sum(),
        }
    }
}
