//! The shadow page fault (KVM: `FNAME(page_fault)` and `FNAME(fetch)` of
//! `paging_tmpl.h`, `make_spte`): walk the guest's tables, resolve the host
//! page under the invalidation-sequence protocol, pick the largest level
//! the guest page, memslot, host page and write tracking allow, build or
//! reuse shadow pages from the root down and install the leaf SPTE.

use super::page::{count_page, index, span, spte_ref, ShadowState};
use super::{GuestPaging, ShadowMmu, ACC_ALL, ACC_EXEC, ACC_USER, ACC_WRITE};
use crate::guest_walk::{AccessKind, Translation, WalkError, ROOT_LEVEL};
use crate::memslot::Memslot;
use crate::spte::{LeafAttrs, Spte, SpteError, Writability};
use crate::tdp::{HostPage, ResolveError};
use crate::MmuStats;
use notifier::PageSize;
use notifier::SeqSnapshot;

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
    /// The context is bugged (an invalidation did not complete).
    #[error("the MMU is bugged (an invalidation did not complete): no more faults")]
    VmBugged,
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

impl<P: GuestPaging> ShadowMmu<P> {
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
        if ctx.is_bugged() {
            return Err(FaultError::VmBugged);
        }
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
            st.rmap_add(base, target, spte_ref(sp, i), stats, tlb);
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
}
