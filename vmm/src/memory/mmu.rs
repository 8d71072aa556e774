//! The project's MMUs wired to guest RAM: a TDP MMU whose memslot 0 is the
//! RAM's guest-facing mapping, subscribed to the host invalidations
//! announced on the RAM (`Subscribers -> KvmMmuNotifier -> zap`), and a
//! recorder of every zap's yield report for the measurements.

use std::sync::Arc;

use mmu::memslot::{Memslot, MemslotError, Memslots, PAGE_SHIFT};
use mmu::tdp::TdpMmu;
use mmu::yielder::YieldReport;
use mmu::{KvmMmuNotifier, MmuContext, RemoteTlb, SecondaryMmu, YieldPolicy};
use notifier::{Invalidation, InvalidationSubscriber, Subscribers};
use parking_lot::Mutex;

use super::uffd::UffdGuestRam;

/// Memslot 0 over `ram`'s guest-facing mapping at gpa 0, leaves up to the
/// RAM's page size, on an MMU context of its own.
pub fn context_for(ram: &UffdGuestRam) -> Result<Arc<MmuContext>, MemslotError> {
    let slot = Memslot::new(
        0,
        0,
        ram.size() >> PAGE_SHIFT,
        ram.guest_hva(),
        ram.page_size(),
    )?;
    Ok(MmuContext::new(
        Memslots::new(vec![slot], 1)?,
        RemoteTlb::new(None),
    ))
}

/// The TDP MMU serving `ram`'s faults ([`context_for`]), not subscribed to
/// any host invalidation.
pub fn tdp_mmu(ram: &UffdGuestRam) -> Result<(Arc<MmuContext>, Arc<TdpMmu>), MemslotError> {
    let ctx = context_for(ram)?;
    let tdp = Arc::new(TdpMmu::new(ctx.clone()));
    Ok((ctx, tdp))
}

/// [`tdp_mmu`], subscribed to the host invalidations announced on `subs`:
/// Subscribers -> KvmMmuNotifier -> TDP zap.
pub fn tdp_mmu_for(
    ram: &UffdGuestRam,
    subs: &Subscribers,
) -> Result<(Arc<MmuContext>, Arc<TdpMmu>), MemslotError> {
    let (ctx, tdp) = tdp_mmu(ram)?;
    let notifier = Arc::new(KvmMmuNotifier::new(ctx.clone(), YieldPolicy::default()));
    notifier.add_mmu(tdp.clone());
    subs.register(notifier);
    Ok((ctx, tdp))
}

/// Forwards invalidations to a [`KvmMmuNotifier`] and keeps every zap's
/// [`YieldReport`] (one per `invalidate_range_start` that zapped), so a
/// measurement can take exactly the zaps its operation caused.
pub struct ZapRecorder {
    notifier: Arc<KvmMmuNotifier>,
    reports: Mutex<Vec<YieldReport>>,
}

impl ZapRecorder {
    /// A notifier on `ctx` zapping with `policy`, recorded, subscribed to
    /// `subs`; add its MMUs with [`Self::notifier`]`.add_mmu`.
    pub fn register(subs: &Subscribers, ctx: Arc<MmuContext>, policy: YieldPolicy) -> Arc<Self> {
        let notifier = Arc::new(KvmMmuNotifier::new(ctx, policy));
        let z = Arc::new(ZapRecorder {
            notifier,
            reports: Mutex::new(Vec::new()),
        });
        subs.register(z.clone());
        z
    }

    /// [`Self::register`] with the default policy, zapping `mmu`.
    pub fn for_mmu(
        subs: &Subscribers,
        ctx: Arc<MmuContext>,
        mmu: Arc<dyn SecondaryMmu>,
    ) -> Arc<Self> {
        let z = Self::register(subs, ctx, YieldPolicy::default());
        z.notifier.add_mmu(mmu);
        z
    }

    pub fn notifier(&self) -> &Arc<KvmMmuNotifier> {
        &self.notifier
    }

    /// The zaps since the last call.
    pub fn take(&self) -> Vec<YieldReport> {
        std::mem::take(&mut *self.reports.lock())
    }
}

impl InvalidationSubscriber for ZapRecorder {
    fn invalidate_range_start(&self, inv: &Invalidation) {
        if let Some(r) = self.notifier.start(inv) {
            self.reports.lock().push(r);
        }
    }
    fn invalidate_range_end(&self, inv: &Invalidation) {
        self.notifier.end(inv);
    }
}

/// The TDP MMU for `ram`, its zaps recorded by a [`ZapRecorder`]
/// subscribed to `subs`.
pub fn recorded_tdp(
    ram: &UffdGuestRam,
    subs: &Subscribers,
) -> Result<(Arc<TdpMmu>, Arc<ZapRecorder>), MemslotError> {
    let (ctx, tdp) = tdp_mmu(ram)?;
    let zaps = ZapRecorder::for_mmu(subs, ctx, tdp.clone());
    Ok((tdp, zaps))
}

/// What a TDP MMU maps at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Mapped {
    /// Milliseconds since the VMM started.
    pub ms: u64,
    /// Leaf SPTEs.
    pub leaves: u64,
    /// 4 KiB pages they cover.
    pub pages_4k: u64,
    /// The same in MiB.
    pub mib: u64,
}

impl Mapped {
    /// What `tdp` maps now, stamped `ms`.
    pub fn of(tdp: &TdpMmu, ms: u64) -> Self {
        let leaves = tdp.mapped_leaves();
        let pages_4k: u64 = leaves.iter().map(|l| l.gfn_end() - l.gfn).sum();
        Mapped {
            ms,
            leaves: notifier::convert::usize_to_u64(leaves.len()),
            pages_4k,
            mib: (pages_4k << PAGE_SHIFT) >> 20,
        }
    }
}
