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
//!
//! One small file per mechanism, as KVM splits `arch/x86/kvm/mmu/`:
//! - `role`: [`Role`], the `ACC_*` bits and [`GuestPaging`], the
//!   format-specific half of `paging_tmpl.h` (the x86 impl; EPT's is nested
//!   TDP's, [`crate::nested`]).
//! - `page`: shadow pages (`struct kvm_mmu_page`) and their hash by
//!   (gfn, role): find or create, link, drop an SPTE, zap a page with the
//!   children it orphans, the `pages_*` counts, and the read-only views
//!   ([`ShadowMmu::translate`], [`ShadowMmu::leaves`],
//!   [`ShadowMmu::footprint`]).
//! - [`slot`]: the per-memslot rmaps and populated summaries, following
//!   the context's memslots, and the rmap operations (add, remove, zap one
//!   head) the fault path, write protection and the zapper share.
//! - `page_track`: write tracking of guest page-table gfns
//!   (`page_track.c`): write-protecting a gfn when it is first shadowed,
//!   [`ShadowMmu::guest_table_write`].
//! - `fault`: the fault path (`FNAME(page_fault)` / `FNAME(fetch)`) and the
//!   leaf SPTE it builds ([`FaultOutcome`], [`FaultError`]).
//! - [`zap`]: the yielding rmap zap of a gfn range, [`ShadowMmu::zap_all`]
//!   and the [`crate::SecondaryMmu`] impl host invalidations call.
//! - `tests` (the reference-model checks, write tracking, roles) and
//!   `tests/invalidation` (invalidations, racing faults, flushes, memslots).
//!
//! The rmap operations sit with the per-memslot rmaps in [`slot`] rather
//! than in `page` (KVM keeps both in `mmu.c`): they are what write
//! protection and the zapper walk, and need only the slot arrays and the
//! SPTE they clear. `role`, `page`, `page_track` and `fault` are private;
//! everything they export is re-exported here, so the public paths are
//! `mmu::shadow::{Role, FaultOutcome, ...}` as before the split.

mod fault;
mod page;
mod page_track;
mod role;
pub mod slot;
pub mod zap;

use crate::context::MmuContext;
use crate::guest_walk::GuestPhysMem;
use crate::memslot::Memslot;
use crate::tdp::{HostPage, ResolveError, ResolvePfn};
use crate::{MmuStats, RemoteTlb};
use page::ShadowState;
use parking_lot::{Mutex, MutexGuard};
use std::marker::PhantomData;
use std::sync::Arc;

pub use fault::{FaultError, FaultOutcome};
pub use page::{ShadowFootprint, ShadowMapping};
pub use role::{acc_bits, GuestPaging, Role, ACC_ALL, ACC_EXEC, ACC_USER, ACC_WRITE};
pub use zap::{NotifierZap, WalkMode, ZapOptions, ZapProgress, ZapReport};

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

    /// The state, its rmaps following the context's memslots. Caller holds
    /// `mmu_lock` for write.
    fn synced_state(&self) -> MutexGuard<'_, ShadowState> {
        let mut st = self.state.lock();
        st.sync_memslots(self.ctx.memslots());
        st
    }
}

#[cfg(test)]
mod tests;
