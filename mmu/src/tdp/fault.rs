//! The TDP fault path (`kvm_tdp_mmu_page_fault` with `kvm_faultin_pfn` and
//! `is_page_fault_stale`): snapshot `mmu_invalidate_seq`, resolve the host
//! page through the caller's [`ResolvePfn`], take `mmu_lock` for read,
//! re-check the sequence for the gfn, install with compare-exchange.

use super::{level_span, spte_index, PageTable, TdpMmu, GFN_LIMIT, ROOT_LEVEL};
use crate::memslot::Memslot;
use crate::spte::{LeafAttrs, Spte, SpteError, Writability};
use crate::stats::MmuStats;
use notifier::PageSize;
use std::sync::atomic::{AtomicU64, Ordering};
use thiserror::Error;

/// What the host (primary MMU) has at an hva: `__kvm_faultin_pfn`'s answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HostPage {
    /// pfn backing the faulting gfn's hva (not the huge page's first pfn).
    pub pfn: u64,
    /// Size of the host mapping (`host_pfn_mapping_level`).
    pub level: PageSize,
    pub writable: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ResolveError {
    #[error("hva {hva:#x} has no host page")]
    Unmapped { hva: u64 },
    #[error("host fault at hva {hva:#x}: {reason}")]
    Host { hva: u64, reason: String },
}

/// Resolves a gfn's hva to a host page. The VMM resolves through
/// userfaultfd/hugetlb; the model plane synthetically. It may block; it runs
/// without `mmu_lock`, after the sequence snapshot.
pub trait ResolvePfn {
    fn resolve(
        &self,
        slot: &Memslot,
        gfn: u64,
        hva: u64,
        write: bool,
    ) -> Result<HostPage, ResolveError>;
}

impl<F> ResolvePfn for F
where
    F: Fn(&Memslot, u64, u64, bool) -> Result<HostPage, ResolveError>,
{
    fn resolve(
        &self,
        slot: &Memslot,
        gfn: u64,
        hva: u64,
        write: bool,
    ) -> Result<HostPage, ResolveError> {
        self(slot, gfn, hva, write)
    }
}

/// `RET_PF_*`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultOutcome {
    /// `RET_PF_FIXED`: installed a leaf of this size.
    Fixed(PageSize),
    /// `RET_PF_SPURIOUS`: a leaf of this size already maps the gfn.
    Spurious(PageSize),
    /// `RET_PF_RETRY`: an invalidation raced the fault; nothing installed.
    Retry,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum FaultError {
    #[error("gfn {gfn:#x} is in no memslot")]
    NoMemslot { gfn: u64 },
    #[error("gfn {gfn:#x} is beyond the 48-bit guest-physical space")]
    GfnOutOfRange { gfn: u64 },
    #[error("write fault on read-only gfn {gfn:#x}")]
    WriteToReadOnly { gfn: u64 },
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    #[error(transparent)]
    Spte(#[from] SpteError),
    /// The context is bugged ([`MmuContext::mark_bugged`]): an invalidation
    /// did not complete, so nothing more is mapped.
    #[error("the MMU is bugged (an invalidation did not complete): no more faults")]
    VmBugged,
}

/// What to install: the gfn, the pfn behind it, the largest size allowed.
#[derive(Debug, Clone, Copy)]
struct LeafRequest {
    gfn: u64,
    pfn: u64,
    level: PageSize,
    attrs: LeafAttrs,
}

impl LeafRequest {
    fn spte(&self, level: PageSize) -> Result<Spte, SpteError> {
        let off = self.gfn & (level.pages() - 1);
        Spte::leaf(self.pfn - off, level, self.attrs)
    }
}

impl TdpMmu {
    /// One page fault on `gfn`. A `Retry` means the vCPU re-enters and
    /// faults again (`fault_retries` counts it).
    pub fn page_fault<R: ResolvePfn + ?Sized>(
        &self,
        gfn: u64,
        write: bool,
        resolver: &R,
    ) -> Result<FaultOutcome, FaultError> {
        let ctx = &*self.ctx;
        MmuStats::inc(&ctx.stats.pf_taken);
        if ctx.is_bugged() {
            return Err(FaultError::VmBugged);
        }
        if gfn >= GFN_LIMIT {
            return Err(FaultError::GfnOutOfRange { gfn });
        }
        let slots = ctx.memslots();
        let slot = slots
            .gfn_to_memslot(gfn)
            .ok_or(FaultError::NoMemslot { gfn })?;
        if write && slot.readonly {
            return Err(FaultError::WriteToReadOnly { gfn });
        }
        // fault->mmu_seq, taken before the host page is resolved.
        let snap = ctx.seq.snapshot();
        if ctx.seq.retry_unsafe(snap, gfn) {
            return Ok(self.retry());
        }
        let hva = slot.gfn_to_hva(gfn).ok_or(FaultError::NoMemslot { gfn })?;
        let host = resolver.resolve(slot, gfn, hva, write)?;
        if write && !host.writable {
            return Err(FaultError::WriteToReadOnly { gfn });
        }
        if ctx.seq.retry_unsafe(snap, gfn) {
            return Ok(self.retry());
        }
        let mut level = slot.max_level(gfn).min(host.level);
        // The huge page must be backed by an equally aligned pfn run.
        while level != PageSize::Size4K && (host.pfn ^ gfn) & (level.pages() - 1) != 0 {
            level = level.lower().unwrap_or(PageSize::Size4K);
        }
        let writability = if host.writable && !slot.readonly {
            Writability::Writable
        } else {
            Writability::ReadOnly
        };
        let req = LeafRequest {
            gfn,
            pfn: host.pfn,
            level,
            attrs: LeafAttrs {
                writability,
                accessed: true,
                dirty: write,
                ..LeafAttrs::default()
            },
        };
        req.spte(level)?; // validate before taking the lock

        let _read = ctx.mmu_lock.read();
        // is_page_fault_stale(): mmu_invalidate_retry_gfn under the lock,
        // for every gfn the leaf will map.
        let span_start = gfn & !(level.pages() - 1);
        if ctx
            .seq
            .retry_range(snap, span_start, span_start + level.pages())
        {
            return Ok(self.retry());
        }
        let out = self.map(&req)?;
        if let FaultOutcome::Fixed(_) = out {
            MmuStats::inc(&ctx.stats.pf_fixed);
        }
        Ok(out)
    }

    /// [`page_fault`](Self::page_fault) until it does not say `Retry` (a vCPU
    /// re-entering the guest and faulting again).
    pub fn page_fault_retrying<R: ResolvePfn + ?Sized>(
        &self,
        gfn: u64,
        write: bool,
        resolver: &R,
    ) -> Result<FaultOutcome, FaultError> {
        loop {
            match self.page_fault(gfn, write, resolver)? {
                FaultOutcome::Retry => std::thread::yield_now(),
                out => return Ok(out),
            }
        }
    }

    fn retry(&self) -> FaultOutcome {
        MmuStats::inc(&self.ctx.stats.fault_retries);
        FaultOutcome::Retry
    }

    /// `kvm_tdp_mmu_map`: walk down, allocating missing tables with
    /// compare-exchange, and install the leaf at the goal level. Caller holds
    /// `mmu_lock` for read.
    ///
    /// A huge leaf already covering the gfn makes the fault spurious. A
    /// page table already present at the goal level (smaller leaves below)
    /// makes the fault map one level lower instead of replacing the table
    /// (KVM replaces it and zaps the children; we leave that to zaps, which
    /// free emptied tables, after which huge leaves come back).
    fn map(&self, req: &LeafRequest) -> Result<FaultOutcome, FaultError> {
        let stats = &self.ctx.stats;
        let mut goal = req.level;
        let mut table: &PageTable = self.root();
        let mut level = ROOT_LEVEL;
        loop {
            let entry = &table.spte[spte_index(req.gfn, level)];
            let mut cur = Spte::from_raw_unchecked(entry.load(Ordering::Acquire));
            if level == goal.level() {
                if !cur.is_mmu_present() {
                    let new = req.spte(goal)?;
                    match set_spte_atomic(entry, cur, new) {
                        Ok(()) => {
                            MmuStats::inc(stats.pages(goal));
                            return Ok(FaultOutcome::Fixed(goal));
                        }
                        Err(now) => cur = now,
                    }
                }
                if cur.is_last(level) {
                    return Ok(FaultOutcome::Spurious(goal));
                }
                // A table sits where the huge leaf would go: map lower.
                goal = goal.lower().unwrap_or(PageSize::Size4K);
            } else if !cur.is_mmu_present() {
                let new_table = self.pool.alloc();
                let release = |t| {
                    // SAFETY: allocated just now from our pool, never
                    // published in an SPTE.
                    unsafe { self.pool.release(t) }
                };
                let new = match Spte::non_leaf(new_table.as_ptr() as u64) {
                    Ok(s) => s,
                    Err(e) => {
                        release(new_table);
                        return Err(e.into());
                    }
                };
                match set_spte_atomic(entry, cur, new) {
                    Ok(()) => {
                        MmuStats::inc(&stats.tdp_mmu_pages);
                        cur = new;
                    }
                    Err(now) => {
                        // Another fault installed something first.
                        release(new_table);
                        cur = now;
                    }
                }
            }
            if cur.is_last(level) {
                // A larger leaf already maps the gfn.
                let l = PageSize::from_level(level).unwrap_or(PageSize::Size1G);
                return Ok(FaultOutcome::Spurious(l));
            }
            debug_assert!(level > 1 && level_span(level) > 1);
            // SAFETY: present non-leaf SPTE of this tree; we hold mmu_lock
            // for read, and tables are unlinked only under the write lock.
            table = unsafe { PageTable::child(cur) };
            level -= 1;
        }
    }
}

/// `tdp_mmu_set_spte_atomic`: install `new` if the SPTE still holds `old`;
/// otherwise return what it holds now.
#[inline]
fn set_spte_atomic(entry: &AtomicU64, old: Spte, new: Spte) -> Result<(), Spte> {
    entry
        .compare_exchange(old.raw(), new.raw(), Ordering::AcqRel, Ordering::Acquire)
        .map(|_| ())
        .map_err(Spte::from_raw_unchecked)
}
