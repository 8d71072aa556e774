//! The shadow MMU (KVM: `mmu.c` shadow paths, `paging_tmpl.h`).
//!
//! Shadow pages are keyed by (gfn, [`Role`]) in a hash; an indirect page
//! shadows the guest page table at its gfn, a direct page maps a linear
//! range (a guest large page backed by smaller host pages). A fault walks
//! the guest's tables ([`GuestPaging::walk`]), then builds or reuses shadow
//! pages from the root down and installs the leaf SPTE, adding it to the
//! rmap of (memslot, level, gfn). Every gfn that holds a shadowed guest page
//! table is write-protected (W and MMU-writable cleared in every SPTE that
//! maps it; `gfn_write_track`), so a guest write to it faults and is
//! emulated ([`FaultOutcome::Emulate`], then [`ShadowMmu::guest_table_write`]).
//!
//! The same machinery runs nested TDP ([`crate::nested`]): the guest tables
//! are then an L1 hypervisor's EPT tables for its L2, `role.guest_mode` is
//! set, and the rmaps are keyed by L1 gfn.
//!
//! One mechanism with the TDP MMU: the MMU runs on a shared
//! [`MmuContext`] (`struct kvm`: `mmu_lock`, the invalidation sequence,
//! stats, the TLB hook, the memslots; a TDP MMU may share it), its SPTEs
//! are [`crate::spte::Spte`]s, its faults use the context's
//! snapshot/`retry_unsafe`/`retry_range` protocol, and host invalidations
//! reach it only through [`crate::KvmMmuNotifier`] (it is a
//! [`crate::SecondaryMmu`]). Its per-memslot rmaps ([`slot`]) follow the
//! context's memslots; zapping what a deleted or moved memslot mapped is
//! the memslot updater's job (before [`MmuContext::set_memslots`]).
//!
//! Locking: [`MmuContext::mmu_lock`] (write) is `mmu_lock`; the state sits
//! in a mutex taken only while `mmu_lock` is held for write (so it is never
//! contended) and dropped with it whenever a zap yields ([`zap`]).

pub mod slot;
pub mod zap;

use crate::guest_walk::{
    level_shift, AccessKind, GuestPhysMem, Translation, WalkError, X86Paging, ROOT_LEVEL,
};
use crate::invalidate::MmuContext;
use crate::memslot::{Memslot, Memslots};
use crate::rmap::{DescArena, SpteRef, RMAP_RECYCLE_THRESHOLD};
use crate::spte::{LeafAttrs, Spte, SpteError, Writability};
use crate::tdp::{HostPage, ResolveError, ResolvePfn};
use crate::{MmuStats, RemoteTlb};
use notifier::PageSize;
use notifier::SeqSnapshot;
use parking_lot::{Mutex, MutexGuard};
use slot::ShadowSlot;
use std::collections::{BTreeMap, HashMap};
use std::marker::PhantomData;
use std::sync::Arc;

pub use zap::{NotifierZap, WalkMode, ZapOptions, ZapProgress, ZapReport};

/// Access bits of a role / guest entry (`ACC_*_MASK`). For EPT, USER
/// stands for R, as in KVM.
pub const ACC_EXEC: u8 = 1;
pub const ACC_WRITE: u8 = 2;
pub const ACC_USER: u8 = 4;
pub const ACC_ALL: u8 = 7;

/// `ACC_*` bits from write / exec / user (EPT: read) permissions.
pub fn acc_bits(write: bool, exec: bool, user: bool) -> u8 {
    (if write { ACC_WRITE } else { 0 })
        | (if exec { ACC_EXEC } else { 0 })
        | (if user { ACC_USER } else { 0 })
}

/// `union kvm_mmu_page_role`, the fields this MMU distinguishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Role {
    pub level: u8,
    pub direct: bool,
    pub access: u8,
    pub guest_mode: bool,
}

/// A guest paging format the shadow MMU can shadow.
pub trait GuestPaging: Clone + Send + Sync + std::fmt::Debug + 'static {
    /// Pages built for this format have `role.guest_mode` (nested).
    const GUEST_MODE: bool;
    /// Gfn of the root table (CR3 / EPTP).
    fn root_gfn(&self) -> u64;
    fn walk(
        &self,
        mem: &dyn GuestPhysMem,
        addr: u64,
        access: AccessKind,
        set_ad: bool,
    ) -> Result<Translation, WalkError>;
    /// `ACC_*` bits granted by one guest entry.
    fn entry_access(&self, pte: u64) -> u8;
}

impl GuestPaging for X86Paging {
    const GUEST_MODE: bool = false;

    fn root_gfn(&self) -> u64 {
        (self.cr3 & ((1u64 << 52) - 1)) >> 12
    }

    fn walk(
        &self,
        mem: &dyn GuestPhysMem,
        addr: u64,
        access: AccessKind,
        set_ad: bool,
    ) -> Result<Translation, WalkError> {
        crate::guest_walk::walk_x86(mem, self, addr, access, set_ad)
    }

    fn entry_access(&self, pte: u64) -> u8 {
        use crate::guest_walk::x86;
        acc_bits(
            pte & x86::RW != 0,
            !(self.efer_nx && pte & x86::NX != 0),
            pte & x86::US != 0,
        )
    }
}

/// `struct kvm_mmu_page`, the parts this MMU uses.
#[derive(Debug)]
struct ShadowPage {
    gfn: u64,
    role: Role,
    spt: Box<[Spte; 512]>,
    /// `shadowed_translation`: the gfn each leaf SPTE maps (kept for direct
    /// pages too, to find the rmap on removal).
    gfns: Box<[u64; 512]>,
    /// Parent SPTEs pointing here (`parent_ptes`).
    parent_ptes: Vec<SpteRef>,
}

/// What a fault did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultOutcome {
    /// An SPTE was installed (`RET_PF_FIXED`).
    Fixed { level: u8, pfn: u64, writable: bool },
    /// The SPTE was already there (`RET_PF_SPURIOUS`).
    Spurious,
    /// The mapping changed under the fault; retry (`RET_PF_RETRY`).
    Retry,
    /// A write to a gfn holding a shadowed guest page table: emulate it, then
    /// call [`ShadowMmu::guest_table_write`] (`RET_PF_EMULATE`).
    Emulate { gfn: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FaultError {
    /// Inject into the guest (a #PF, or an EPT violation/misconfig for L1).
    #[error("guest fault: {0}")]
    Guest(#[from] WalkError),
    /// No memslot: MMIO, emulate.
    #[error("gfn {gfn:#x} is in no memslot")]
    NoMemslot { gfn: u64 },
    /// The host page behind the gfn could not be resolved.
    #[error(transparent)]
    Host(#[from] ResolveError),
    /// The host page cannot be put in an SPTE (pfn too large).
    #[error(transparent)]
    Spte(#[from] SpteError),
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

pub(crate) struct ShadowState {
    pages: Vec<Option<ShadowPage>>,
    free_ids: Vec<u32>,
    hash: HashMap<(u64, Role), u32>,
    /// gfn -> indirect shadow pages shadowing it; `gfn_write_track[gfn]` is
    /// the length.
    shadowed: BTreeMap<u64, Vec<u32>>,
    /// Per-memslot rmaps, for the memslots of `memslots`.
    slots: Vec<ShadowSlot>,
    /// The context's memslots `slots` was built for.
    memslots: Option<Arc<Memslots>>,
    descs: DescArena,
    scratch: Vec<SpteRef>,
}

/// Host pages the shadow MMU resolves gfns through (see
/// [`ShadowMmu::with_host`]).
pub type SharedResolver = Arc<dyn ResolvePfn + Send + Sync>;

/// The model plane's host: hva page `n` is pfn `n`, backed at the slot's
/// backing size, writable unless the slot is read-only.
pub fn identity_host(
    slot: &Memslot,
    _gfn: u64,
    hva: u64,
    _write: bool,
) -> Result<HostPage, ResolveError> {
    Ok(HostPage {
        pfn: hva >> 12,
        level: slot.backing,
        writable: !slot.readonly,
    })
}

/// A shadow MMU over guest RAM `mem` for paging format `P`.
///
/// `mmu_lock`, the invalidation sequence, stats, the TLB hook and the
/// memslots are the shared [`MmuContext`]'s; host invalidations reach the
/// MMU through [`crate::KvmMmuNotifier`] (it implements
/// [`crate::SecondaryMmu`]).
pub struct ShadowMmu<P: GuestPaging> {
    ctx: Arc<MmuContext>,
    state: Mutex<ShadowState>,
    mem: Arc<dyn GuestPhysMem + Send + Sync>,
    host: SharedResolver,
    notifier_zap: NotifierZap,
    /// Reports of the zaps host invalidations started, oldest first.
    notifier_reports: Mutex<Vec<ZapReport>>,
    _paging: PhantomData<P>,
}

/// `make_spte` for a shadow leaf: the guest's `acc` bits, writable only if
/// the access wants it and the guest, the host and write tracking allow it;
/// the (HostW, MMUW, W) state is one of the four legal ones.
fn leaf_spte(
    pfn: u64,
    level: u8,
    acc: u8,
    want_w: bool,
    host_w: bool,
    mmu_w: bool,
) -> Result<Spte, SpteError> {
    let writability = match (host_w, mmu_w) {
        (false, _) => Writability::ReadOnly,
        (true, false) => Writability::ShadowWriteProtected,
        (true, true) if want_w && acc & ACC_WRITE != 0 => Writability::Writable,
        (true, true) => Writability::WriteProtected,
    };
    let level = PageSize::from_level(level).unwrap_or(PageSize::Size4K);
    Spte::leaf(
        pfn,
        level,
        LeafAttrs {
            writability,
            exec: acc & ACC_EXEC != 0,
            user: acc & ACC_USER != 0,
            dirty: false,
            ..LeafAttrs::default()
        },
    )
}

fn index(addr: u64, level: u8) -> usize {
    ((addr >> level_shift(level)) & 511) as usize
}

fn span(level: u8) -> u64 {
    1u64 << (level_shift(level) - 12)
}

fn count_page(stats: &MmuStats, level: u8, up: bool) {
    let c = stats.pages(PageSize::from_level(level).unwrap_or(PageSize::Size1G));
    if up {
        MmuStats::inc(c);
    } else {
        MmuStats::sub(c, 1);
    }
}

impl ShadowState {
    fn new() -> Self {
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

    /// Follow the context's memslots: keep the rmaps of unchanged slots,
    /// start empty ones for new or changed slots, drop those of deleted
    /// slots (zapping what they mapped is the memslot updater's job, as
    /// for the TDP MMU). Caller holds `mmu_lock` for write.
    fn sync_memslots(&mut self, memslots: Arc<Memslots>) {
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

    fn page(&self, id: u32) -> &ShadowPage {
        self.pages[id as usize].as_ref().expect("live shadow page")
    }

    fn page_mut(&mut self, id: u32) -> &mut ShadowPage {
        self.pages[id as usize].as_mut().expect("live shadow page")
    }

    fn slot_of(&self, gfn: u64) -> Option<usize> {
        self.slots.iter().position(|s| s.slot.contains_gfn(gfn))
    }

    fn is_tracked(&self, start: u64, end: u64) -> bool {
        self.shadowed.range(start..end).next().is_some()
    }

    /// `kvm_mmu_get_shadow_page`: find or create; returns (id, flush needed).
    fn get_or_create_sp(&mut self, gfn: u64, role: Role, stats: &MmuStats) -> (u32, bool) {
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
                self.pages.push(Some(sp));
                (self.pages.len() - 1) as u32
            }
        };
        self.hash.insert((gfn, role), id);
        let mut flush = false;
        if !role.direct {
            let list = self.shadowed.entry(gfn).or_default();
            list.push(id);
            if list.len() == 1 {
                flush = self.write_protect_gfn(gfn);
            }
        }
        (id, flush)
    }

    /// `kvm_mmu_slot_gfn_write_protect` for shadowing: clear W and
    /// MMU-writable in every SPTE mapping `gfn`, at every level.
    fn write_protect_gfn(&mut self, gfn: u64) -> bool {
        let Some(s) = self.slot_of(gfn) else {
            return false;
        };
        let mut refs = std::mem::take(&mut self.scratch);
        let mut flush = false;
        for level in 1..=3u8 {
            refs.clear();
            let slot = &self.slots[s];
            slot.rmap[level as usize - 1]
                .get(slot.index(level, gfn))
                .for_each(&self.descs, |r| refs.push(r));
            for r in &refs {
                let sp = self.page_mut(r.sp());
                let old = sp.spt[r.index()];
                flush |= old.is_writable();
                sp.spt[r.index()] = old.shadow_write_protect();
            }
        }
        self.scratch = refs;
        flush
    }

    fn rmap_add(&mut self, gfn: u64, level: u8, r: SpteRef, stats: &MmuStats, tlb: &RemoteTlb) {
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

    fn rmap_remove(&mut self, gfn: u64, level: u8, r: SpteRef) {
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
    fn zap_rmap_head(&mut self, s: usize, level: u8, idx: u64, stats: &MmuStats) -> u64 {
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

    /// Clear one SPTE with its bookkeeping (`drop_spte` / `mmu_page_zap_pte`).
    /// Returns shadow pages zapped as a consequence (orphaned children).
    fn drop_spte(&mut self, id: u32, i: usize, stats: &MmuStats) -> u64 {
        let (spte, level, gfn) = {
            let sp = self.page(id);
            (sp.spt[i], sp.role.level, sp.gfns[i])
        };
        if !spte.is_mmu_present() {
            return 0;
        }
        self.page_mut(id).spt[i] = Spte::NONPRESENT;
        if spte.is_last(level) {
            self.rmap_remove(gfn, level, SpteRef::new(id, i as u16));
            count_page(stats, level, false);
            return 0;
        }
        let child = spte.shadow_child();
        let me = SpteRef::new(id, i as u16);
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
    fn zap_sp(&mut self, id: u32, stats: &MmuStats) -> u64 {
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
                    self.rmap_remove(sp.gfns[i], sp.role.level, SpteRef::new(id, i as u16));
                    count_page(stats, sp.role.level, false);
                } else {
                    let child = spte.shadow_child();
                    let me = SpteRef::new(id, i as u16);
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
                if let Some(list) = self.shadowed.get_mut(&sp.gfn) {
                    list.retain(|x| *x != id);
                    if list.is_empty() {
                        self.shadowed.remove(&sp.gfn);
                    }
                }
            }
            self.free_ids.push(id);
            MmuStats::inc(&stats.mmu_shadow_zapped);
            zapped += 1;
        }
        zapped
    }

    /// Zap every indirect shadow page of gfns in `start..end`.
    fn zap_shadowed_gfns(&mut self, start: u64, end: u64, stats: &MmuStats) -> u64 {
        let ids: Vec<u32> = self
            .shadowed
            .range(start..end)
            .flat_map(|(_, v)| v.iter().copied())
            .collect();
        ids.into_iter().map(|id| self.zap_sp(id, stats)).sum()
    }

    /// The first indirect shadow page of a gfn in `start..end`.
    fn first_shadowed(&self, start: u64, end: u64) -> Option<(u64, u32)> {
        self.shadowed
            .range(start..end)
            .find_map(|(g, v)| v.first().map(|id| (*g, *id)))
    }

    fn link(&mut self, parent: u32, i: usize, child: u32) {
        self.page_mut(parent).spt[i] = Spte::shadow_link(child);
        self.page_mut(child)
            .parent_ptes
            .push(SpteRef::new(parent, i as u16));
    }
}

impl<P: GuestPaging> ShadowMmu<P> {
    /// A shadow MMU on `ctx` (shared with any other MMU of the address
    /// space) over guest memory `mem`, resolving host pages with the model
    /// plane's [`identity_host`] until [`Self::with_host`] says otherwise.
    pub fn new(ctx: Arc<MmuContext>, mem: Arc<dyn GuestPhysMem + Send + Sync>) -> Self {
        Self {
            ctx,
            state: Mutex::new(ShadowState::new()),
            mem,
            host: Arc::new(identity_host),
            notifier_zap: NotifierZap::default(),
            notifier_reports: Mutex::new(Vec::new()),
            _paging: PhantomData,
        }
    }

    /// Resolve host pages through `host` (`__kvm_faultin_pfn`).
    pub fn with_host(mut self, host: SharedResolver) -> Self {
        self.host = host;
        self
    }

    /// How zaps started by host invalidations run (walk mode, progress for
    /// observers; the yield policy is the [`crate::KvmMmuNotifier`]'s).
    pub fn set_notifier_zap(&mut self, z: NotifierZap) {
        self.notifier_zap = z;
    }

    /// Take the reports of the zaps host invalidations have started.
    pub fn take_notifier_reports(&self) -> Vec<ZapReport> {
        std::mem::take(&mut *self.notifier_reports.lock())
    }

    pub fn context(&self) -> &Arc<MmuContext> {
        &self.ctx
    }

    pub fn stats(&self) -> &MmuStats {
        &self.ctx.stats
    }

    pub fn tlb(&self) -> &RemoteTlb {
        &self.ctx.tlb
    }

    pub fn guest_mem(&self) -> &Arc<dyn GuestPhysMem + Send + Sync> {
        &self.mem
    }

    pub fn role(level: u8, direct: bool, access: u8) -> Role {
        Role {
            level,
            direct,
            access,
            guest_mode: P::GUEST_MODE,
        }
    }

    /// The state, its rmaps following the context's memslots. Caller holds
    /// `mmu_lock` for write.
    fn synced_state(&self) -> MutexGuard<'_, ShadowState> {
        let mut st = self.state.lock();
        st.sync_memslots(self.ctx.memslots());
        st
    }

    /// The shadow page fault (`FNAME(page_fault)` + `FNAME(fetch)`): walk the
    /// guest tables (setting A/D), then build shadow pages down to the leaf.
    pub fn page_fault(
        &self,
        paging: &P,
        addr: u64,
        access: AccessKind,
    ) -> Result<FaultOutcome, FaultError> {
        let ctx = &*self.ctx;
        MmuStats::inc(&ctx.stats.pf_taken);
        // fault->mmu_seq, taken before anything is resolved (the guest walk
        // included), re-checked under the lock (`is_page_fault_stale`).
        let snap = ctx.seq.snapshot();
        let walk = paging.walk(&*self.mem, addr, access, true)?;
        let gfn = walk.gfn();
        if ctx.seq.retry_unsafe(snap, gfn) {
            return Ok(self.retry());
        }
        let slots = ctx.memslots();
        let slot = slots
            .gfn_to_memslot(gfn)
            .ok_or(FaultError::NoMemslot { gfn })?;
        let hva = slot.gfn_to_hva(gfn).ok_or(FaultError::NoMemslot { gfn })?;
        let host = self.host.resolve(slot, gfn, hva, access.write)?;
        if ctx.seq.retry_unsafe(snap, gfn) {
            return Ok(self.retry());
        }
        let _g = ctx.mmu_lock.write();
        let mut st = self.synced_state();
        let r = self.fetch(&mut st, paging, &walk, addr, access, slot, host, snap);
        if matches!(r, Ok(FaultOutcome::Fixed { .. })) {
            MmuStats::inc(&ctx.stats.pf_fixed);
        }
        r
    }

    fn retry(&self) -> FaultOutcome {
        MmuStats::inc(&self.ctx.stats.fault_retries);
        FaultOutcome::Retry
    }

    #[allow(clippy::too_many_arguments)]
    fn fetch(
        &self,
        st: &mut ShadowState,
        paging: &P,
        walk: &Translation,
        addr: u64,
        access: AccessKind,
        slot: &Memslot,
        host: HostPage,
        snap: SeqSnapshot,
    ) -> Result<FaultOutcome, FaultError> {
        let stats = &self.ctx.stats;
        let tlb = &self.ctx.tlb;
        let guest_leaf = walk.leaf_level();
        let gfn = walk.gfn();
        if st.slot_of(gfn).is_none() {
            return Err(FaultError::NoMemslot { gfn });
        }
        // acc_at[l]: access granted by the guest entries from the root to l.
        let mut acc_at = [ACC_ALL; 5];
        let mut a = ACC_ALL;
        for l in (guest_leaf..=ROOT_LEVEL).rev() {
            a &= paging.entry_access(walk.pte[l as usize - 1]);
            acc_at[l as usize] = a;
        }
        let acc = acc_at[guest_leaf as usize];
        // Host level: as large as the guest page, the memslot (backing,
        // edges, alignment), the host page and write tracking allow
        // (`kvm_mmu_max_mapping_level`).
        let mut target = guest_leaf
            .min(slot.max_level(gfn).level())
            .min(host.level.level())
            .min(3);
        while target > 1 {
            let base = gfn & !(span(target) - 1);
            // The huge page must be backed by an equally aligned pfn run.
            let aligned = (host.pfn ^ gfn) & (span(target) - 1) == 0;
            if aligned && !st.is_tracked(base, base + span(target)) {
                break;
            }
            target -= 1;
        }
        // `mmu_invalidate_retry_gfn`, for the whole range the leaf will map.
        let base = gfn & !(span(target) - 1);
        if self.ctx.seq.retry_range(snap, base, base + span(target)) {
            return Ok(self.retry());
        }
        let pfn = host.pfn - (gfn - base);
        let host_w = host.writable && !slot.readonly;
        // Refuse an SPTE that cannot exist before building anything.
        leaf_spte(pfn, target, acc, false, host_w, false)?;
        let mut flush = false;
        let (mut sp, f) = st.get_or_create_sp(
            paging.root_gfn(),
            Self::role(ROOT_LEVEL, false, ACC_ALL),
            stats,
        );
        flush |= f;
        for level in ((target + 1)..=ROOT_LEVEL).rev() {
            let i = index(addr, level);
            let child_level = level - 1;
            // The page this walk needs below: the guest table it read at
            // child_level, or a direct page under a guest large page.
            let (cgfn, role) = if child_level >= guest_leaf {
                (
                    walk.table_gfn[child_level as usize - 1],
                    Self::role(child_level, false, acc_at[level as usize]),
                )
            } else {
                (
                    gfn & !(span(child_level + 1) - 1),
                    Self::role(child_level, true, acc),
                )
            };
            let spte = st.page(sp).spt[i];
            if spte.is_mmu_present() && !spte.is_last(level) {
                let child = spte.shadow_child();
                let c = st.page(child);
                if (c.gfn, c.role) == (cgfn, role) {
                    sp = child;
                    continue;
                }
            }
            if spte.is_mmu_present() {
                // A large leaf where this walk needs a table, or a link to a
                // page the guest's tables no longer lead to
                // (`FNAME(gpte_changed)`): unlink it.
                st.drop_spte(sp, i, stats);
                flush = true;
            }
            let (child, f) = st.get_or_create_sp(cgfn, role, stats);
            flush |= f;
            st.link(sp, i, child);
            sp = child;
        }
        let base = gfn & !(span(target) - 1);
        if target > 1 && st.is_tracked(base, base + span(target)) {
            // Shadowing on the way down made the large page impossible.
            if flush {
                tlb.flush(stats);
            }
            return Ok(FaultOutcome::Retry);
        }
        let tracked = st.is_tracked(gfn, gfn + 1);
        let mmu_w = host_w && !tracked;
        let want_w = acc & ACC_WRITE != 0 && (access.write || walk.dirty);
        let new = leaf_spte(pfn, target, acc, want_w, host_w, mmu_w)?;
        let i = index(addr, target);
        let old = st.page(sp).spt[i];
        let outcome = if old.is_mmu_present() && old.pfn() == pfn {
            flush |= old.is_writable() && !new.is_writable();
            st.page_mut(sp).spt[i] = new;
            if old == new {
                FaultOutcome::Spurious
            } else {
                FaultOutcome::Fixed {
                    level: target,
                    pfn,
                    writable: new.is_writable(),
                }
            }
        } else {
            if old.is_mmu_present() {
                st.drop_spte(sp, i, stats);
                flush = true;
            }
            let page = st.page_mut(sp);
            page.spt[i] = new;
            page.gfns[i] = base;
            count_page(stats, target, true);
            st.rmap_add(base, target, SpteRef::new(sp, i as u16), stats, tlb);
            FaultOutcome::Fixed {
                level: target,
                pfn,
                writable: new.is_writable(),
            }
        };
        if flush {
            tlb.flush(stats);
        }
        if access.write && tracked {
            return Ok(FaultOutcome::Emulate { gfn });
        }
        Ok(outcome)
    }

    /// The guest wrote a page table we shadow (after emulating the write):
    /// zap the shadow pages of `gfn` so the next fault re-reads it
    /// (`kvm_mmu_track_write`, simplified to zapping).
    pub fn guest_table_write(&self, gfn: u64) -> u64 {
        let ctx = &*self.ctx;
        let _g = ctx.mmu_lock.write();
        let mut st = self.synced_state();
        let n = st.zap_shadowed_gfns(gfn, gfn + 1, &ctx.stats);
        if n > 0 {
            ctx.tlb.flush(&ctx.stats);
        }
        n
    }

    /// Zap everything (`kvm_mmu_zap_all`).
    pub fn zap_all(&self) -> u64 {
        let ctx = &*self.ctx;
        let _g = ctx.mmu_lock.write();
        let mut st = self.synced_state();
        let ids: Vec<u32> = st.hash.values().copied().collect();
        let n: u64 = ids.into_iter().map(|id| st.zap_sp(id, &ctx.stats)).sum();
        ctx.tlb.flush(&ctx.stats);
        n
    }

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

    /// Is `gfn` write-tracked (holds a shadowed guest page table)?
    pub fn is_write_tracked(&self, gfn: u64) -> bool {
        self.state.lock().is_tracked(gfn, gfn + 1)
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

#[cfg(test)]
mod tests;
