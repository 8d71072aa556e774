//! Host invalidations reaching the shadow and nested MMU: through the
//! [`KvmMmuNotifier`] by hva, racing faults that must retry, the flush
//! before every yield, rmap chain recycling, one context shared with a TDP
//! MMU, and rmaps following the context's memslots.

use super::*;

#[test]
fn notifier_invalidation_zaps_through_hva() {
    use notifier::subscriber::{Delivery, HvaRange, Invalidation, MmuNotifyEvent};
    let m = half_mapped_model(64 << 20);
    let before = m.check_no_stale((0, 0), u64::MAX, 1).unwrap();
    assert_eq!(before, m.l2_pages());
    let hva = crate::model::MODEL_L1_HVA;
    let inv = Invalidation {
        range: HvaRange::new(hva, hva + (64 << 20)),
        event: MmuNotifyEvent::ProtectionVma,
        blockable: false,
        delivery: Delivery::Before,
    };
    let n = notifier_for(&m, YieldPolicy::default());
    n.invalidate_range_start(&inv);
    n.invalidate_range_end(&inv);
    assert_eq!(m.check_no_stale((0, 1 << 14), u64::MAX, 1).unwrap(), 0);
    assert_eq!(m.mmu.context().seq.seq(), 1, "the shared sequence ended");
    assert!(m.mmu.stats().snapshot().remote_tlb_flush >= 1);
    let _ = YieldMode::Yield;
}

/// Faults racing with a yielding invalidation: while it is in progress no
/// fault installs an SPTE in its range (they retry), so when
/// `invalidate_range_start` returns nothing in the range is mapped, even
/// though the zap let faults in at every yield.
#[test]
fn racing_faults_retry_during_a_yielding_invalidation() {
    use notifier::subscriber::{Delivery, HvaRange, Invalidation, MmuNotifyEvent};
    use std::sync::atomic::{AtomicBool, Ordering};
    let m = half_mapped_model(256 << 20);
    let n = notifier_for(&m, YieldPolicy::default().with_max_units(16));
    let m = Arc::new(m);
    let stop = Arc::new(AtomicBool::new(false));
    let faulter = {
        let (m, stop) = (m.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut k = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let _ = m
                    .mmu
                    .page_fault(&m.paging, (k % m.l2_pages()) << 12, AccessKind::WRITE);
                k += 97;
            }
        })
    };
    let hva = crate::model::MODEL_L1_HVA;
    for round in 0..20u64 {
        let (s, e) = (round * 3000, round * 3000 + 20000);
        let inv = Invalidation {
            range: HvaRange::new(hva + (s << 12), hva + (e << 12)),
            event: MmuNotifyEvent::Clear,
            blockable: true,
            delivery: Delivery::Before,
        };
        n.invalidate_range_start(&inv);
        let leaked: Vec<_> = m
            .mmu
            .leaves()
            .into_iter()
            .filter(|(g, _, _)| *g >= s && *g < e)
            .collect();
        n.invalidate_range_end(&inv);
        assert!(
            leaked.is_empty(),
            "round {round}: mapped during the invalidation: {:?}",
            &leaked[..leaked.len().min(4)]
        );
    }
    stop.store(true, Ordering::Relaxed);
    faulter.join().unwrap();
    let s = m.mmu.stats().snapshot();
    assert!(s.zap_yields > 0 && s.fault_retries > 0, "{s:?}");
}

/// Flush before yield: whenever the zap lets someone else take `mmu_lock`,
/// every SPTE it has zapped so far has been flushed (the flush hook records
/// the leaf count it saw; an observer holding the lock compares).
#[test]
fn zap_flushes_before_every_yield_and_at_the_end() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    // The hook reads the stats of the context it belongs to: set once the
    // context exists (weakly, no cycle).
    let ctx_cell: Arc<std::sync::OnceLock<std::sync::Weak<MmuContext>>> = Default::default();
    let flushed_at = Arc::new(AtomicU64::new(u64::MAX));
    let hook = {
        let (ctx_cell, flushed_at) = (ctx_cell.clone(), flushed_at.clone());
        Arc::new(move || {
            if let Some(ctx) = ctx_cell.get().and_then(|w| w.upgrade()) {
                flushed_at.store(ctx.stats.pages_4k.load(Ordering::SeqCst), Ordering::SeqCst);
            }
            true
        })
    };
    let cfg = NestedModelConfig {
        l1_bytes: 256 << 20,
        density: 0.5,
        shape: TableShape::Linear,
        ..Default::default()
    };
    let m = build_nested(cfg, RemoteTlb::new(Some(hook))).unwrap();
    let ctx = m.mmu.context().clone();
    ctx_cell.set(Arc::downgrade(&ctx)).unwrap();
    let before = ctx.stats.pages_4k.load(Ordering::SeqCst);
    assert!(before > 0);
    let done = Arc::new(AtomicBool::new(false));
    let looked = Arc::new(AtomicBool::new(false));
    let observer = {
        let (ctx, flushed_at, done, looked) = (
            ctx.clone(),
            flushed_at.clone(),
            done.clone(),
            looked.clone(),
        );
        std::thread::spawn(move || {
            let (lock, stats): (&MmuLock, _) = (&ctx.mmu_lock, &ctx.stats);
            let (mut looks, mut mid_zap) = (0u64, 0u64);
            while !done.load(Ordering::SeqCst) {
                let _g = lock.read();
                let now = stats.pages_4k.load(Ordering::SeqCst);
                if now != before {
                    // Some SPTEs are gone: the last flush saw exactly this.
                    assert_eq!(
                        flushed_at.load(Ordering::SeqCst),
                        now,
                        "unflushed zaps visible across a yield"
                    );
                    mid_zap += (now != 0) as u64;
                }
                looks += 1;
                looked.store(true, Ordering::SeqCst);
                drop(_g);
                std::thread::sleep(std::time::Duration::from_micros(20));
            }
            (looks, mid_zap)
        })
    };
    let opts = ZapOptions {
        policy: YieldPolicy::default().with_max_units(32),
        mode: WalkMode::Blind,
        progress: None,
    };
    // The observer must be looking before the zap starts.
    while !looked.load(Ordering::SeqCst) {
        std::thread::yield_now();
    }
    let r = m.mmu.zap_gfn_range(0, 1 << 16, &opts);
    done.store(true, Ordering::SeqCst);
    let (looks, _mid) = observer.join().unwrap();
    assert!(looks > 0);
    assert_eq!(ctx.stats.pages_4k.load(Ordering::SeqCst), 0);
    assert_eq!(flushed_at.load(Ordering::SeqCst), 0, "final flush");
    assert!(r.yields.yields > 0 && r.tlb_flushes > 1, "{r:?}");
}

/// `RMAP_RECYCLE_THRESHOLD`: an rmap chain longer than 1000 is zapped whole
/// on insert; `max_mmu_rmap_size` records the peak.
#[test]
fn long_rmap_chains_are_recycled() {
    let mem = Arc::new(SparseGuestMem::new(RAM_PAGES << 12));
    let maps: Vec<_> = (0..1001u64).map(|v| (v, 0x300, false, false)).collect();
    let paging = build_x86(&mem, &maps);
    let mmu = ShadowMmu::<X86Paging>::new(slot_ctx(RAM_PAGES, 1), mem);
    for v in 0..1000u64 {
        mmu.page_fault(&paging, v << 12, AccessKind::READ).unwrap();
    }
    assert_eq!(mmu.stats().snapshot().max_mmu_rmap_size, 1000);
    assert_eq!(mmu.leaves().len(), 1000);
    assert!(mmu.footprint().rmap_descs >= 1000 / 14);
    mmu.page_fault(&paging, 1000 << 12, AccessKind::READ)
        .unwrap();
    let s = mmu.stats().snapshot();
    assert_eq!(s.max_mmu_rmap_size, 1001);
    assert!(mmu.leaves().is_empty(), "the whole chain was zapped");
    assert_eq!(s.pages_4k, 0);
    assert_eq!(mmu.footprint().rmap_descs, 0);
}

/// A nested model with half of L1 mapped linearly.
fn half_mapped_model(l1_bytes: u64) -> crate::model::NestedModel {
    let cfg = NestedModelConfig {
        l1_bytes,
        density: 0.5,
        shape: TableShape::Linear,
        ..Default::default()
    };
    build_nested(cfg, RemoteTlb::default()).unwrap()
}

/// The host-invalidation subscriber of `m`'s context, driving its MMU.
fn notifier_for(m: &crate::model::NestedModel, policy: YieldPolicy) -> KvmMmuNotifier {
    let n = KvmMmuNotifier::new(m.mmu.context().clone(), policy);
    n.add_mmu(m.mmu.clone());
    n
}

/// One `struct kvm`: a TDP MMU and a shadow MMU on one context, one
/// `KvmMmuNotifier` driving both. An invalidation zaps both, flushes once,
/// and its in-progress range (the shared sequence) makes faults of either
/// MMU retry.
#[test]
fn tdp_and_shadow_share_one_context_and_notifier() {
    use crate::tdp::TdpMmu;
    use notifier::subscriber::{Delivery, HvaRange, Invalidation, MmuNotifyEvent};
    let ctx = slot_ctx(RAM_PAGES, 1);
    let mem = Arc::new(SparseGuestMem::new(RAM_PAGES << 12));
    let paging = build_x86(
        &mem,
        &[(0x10, 0x100, true, false), (0x11, 0x900, true, false)],
    );
    let shadow = Arc::new(ShadowMmu::<X86Paging>::new(ctx.clone(), mem));
    let tdp = Arc::new(TdpMmu::new(ctx.clone()));
    // No yield (no waiter, a slice that never runs out): exactly one flush.
    let policy = YieldPolicy::default().with_slice(std::time::Duration::from_secs(60));
    let n = KvmMmuNotifier::new(ctx.clone(), policy);
    n.add_mmu(tdp.clone());
    n.add_mmu(shadow.clone());
    for gfn in [0x100, 0x900] {
        tdp.page_fault(gfn, true, &identity_host).unwrap();
    }
    for a in [0x10000, 0x11000] {
        assert!(matches!(
            shadow.page_fault(&paging, a, AccessKind::WRITE),
            Ok(FaultOutcome::Fixed { .. })
        ));
    }
    // Invalidate the hvas of gfns 0x100..0x200.
    let hva = |gfn: u64| 0x1_0000_0000 + (gfn << 12);
    let inv = Invalidation {
        range: HvaRange::new(hva(0x100), hva(0x200)),
        event: MmuNotifyEvent::Unmap,
        blockable: true,
        delivery: Delivery::Before,
    };
    let flushes = ctx.stats.snapshot().remote_tlb_flush_requests;
    n.invalidate_range_start(&inv);
    assert_eq!(
        ctx.stats.snapshot().remote_tlb_flush_requests,
        flushes + 1,
        "one flush for both MMUs"
    );
    assert!(tdp.leaves_in(0x100, 0x101).is_empty());
    assert_eq!(tdp.leaves_in(0x900, 0x901).len(), 1);
    assert!(shadow.translate(&paging, 0x10000).is_none());
    assert!(shadow.translate(&paging, 0x11000).is_some());
    assert_eq!(shadow.take_notifier_reports().len(), 1);
    // In progress: faults of both MMUs in the range retry.
    assert_eq!(
        shadow.page_fault(&paging, 0x10000, AccessKind::WRITE),
        Ok(FaultOutcome::Retry)
    );
    assert_eq!(
        tdp.page_fault(0x100, true, &identity_host).unwrap(),
        crate::tdp::FaultOutcome::Retry
    );
    n.invalidate_range_end(&inv);
    assert_eq!(ctx.seq.seq(), 1);
    assert!(matches!(
        shadow.page_fault(&paging, 0x10000, AccessKind::WRITE),
        Ok(FaultOutcome::Fixed { .. })
    ));
}

/// The shadow MMU follows the context's memslots: a memslot added later is
/// faultable at once, and the rmaps of an unchanged memslot are kept (a zap
/// still finds what was mapped before the update).
#[test]
fn rmaps_follow_the_context_memslots() {
    let ctx = slot_ctx(RAM_PAGES, 1);
    let slot0 = *ctx.memslots().gfn_to_memslot(0).unwrap();
    let mem = Arc::new(SparseGuestMem::new((2 * RAM_PAGES) << 12));
    let high = RAM_PAGES + 5;
    let paging = build_x86(
        &mem,
        &[(0x10, 0x100, true, false), (0x11, high, true, false)],
    );
    let mmu = ShadowMmu::<X86Paging>::new(ctx.clone(), mem);
    assert!(matches!(
        mmu.page_fault(&paging, 0x10000, AccessKind::WRITE),
        Ok(FaultOutcome::Fixed { .. })
    ));
    assert_eq!(
        mmu.page_fault(&paging, 0x11000, AccessKind::WRITE),
        Err(FaultError::NoMemslot { gfn: high })
    );
    let slot1 = Memslot::new(1, RAM_PAGES, RAM_PAGES, 0x2_0000_0000, PageSize::Size4K).unwrap();
    ctx.set_memslots(Memslots::new(vec![slot0, slot1], 1).unwrap());
    assert_eq!(
        mmu.page_fault(&paging, 0x11000, AccessKind::WRITE),
        Ok(FaultOutcome::Fixed {
            level: 1,
            pfn: (0x2_0000_0000 >> 12) + 5,
            writable: true
        })
    );
    let r = mmu.zap_gfn_range(0, 2 * RAM_PAGES, &ZapOptions::default());
    assert_eq!(r.sptes_zapped, 2, "{r:?}");
    assert!(mmu.leaves().is_empty());
}
