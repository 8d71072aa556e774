//! Shadow and nested MMU against a reference model: after any sequence of
//! faults, zaps and guest table writes, every present shadow translation
//! agrees with a fresh guest walk, maps no gfn a zap covered since it was
//! last faulted, and no gfn holding a shadowed guest table is writable.

use super::*;
use crate::guest_walk::{ept, walk_x86, x86, EptPaging, SparseGuestMem, X86Paging};
use crate::memslot::{Memslot, Memslots};
use crate::model::{build_nested, splitmix, NestedModelConfig, TableShape};
use crate::{KvmMmuNotifier, MmuLock, YieldMode, YieldPolicy};
use notifier::subscriber::InvalidationSubscriber;
use notifier::PageSize;
use proptest::prelude::*;

const RAM_PAGES: u64 = 4096; // 16 MiB

/// A context with one memslot of guest RAM at gfn 0, hva 0x1_0000_0000
/// (so, with the model plane's identity host, pfn 0x10_0000 + gfn), backed
/// by pages of `max_level` (1 = 4K, 2 = 2M).
fn slot_ctx(npages: u64, max_level: u8) -> Arc<MmuContext> {
    let backing = PageSize::from_level(max_level).expect("level 1..=3");
    let slot = Memslot::new(0, 0, npages, 0x1_0000_0000, backing).unwrap();
    MmuContext::new(Memslots::new(vec![slot], 0).unwrap(), RemoteTlb::default())
}

/// x86 guest tables: PML4 at gfn 1, tables allocated upward from gfn 2,
/// mapping `maps` (gva page, gfn, writable, large 2M).
fn build_x86(mem: &SparseGuestMem, maps: &[(u64, u64, bool, bool)]) -> X86Paging {
    let mut next = 2u64;
    let mut tables: HashMap<(u8, u64), u64> = HashMap::new();
    for &(vpage, gfn, w, large) in maps {
        let gva = vpage << 12;
        let mut table = 1u64;
        let leaf_level = if large { 2 } else { 1 };
        for level in (leaf_level + 1..=4u8).rev() {
            let key = (level, gva >> level_shift(level));
            let child = *tables.entry(key).or_insert_with(|| {
                next += 1;
                next - 1
            });
            let at = (table << 12) + ((gva >> level_shift(level)) & 511) * 8;
            if mem.read_u64(at).unwrap() == 0 {
                mem.write_u64(at, (child << 12) | 7).unwrap();
            }
            table = child;
        }
        let at = (table << 12) + ((gva >> level_shift(leaf_level)) & 511) * 8;
        let frame = if large { gfn & !511 } else { gfn };
        let v = (frame << 12)
            | x86::P
            | x86::US
            | if w { x86::RW } else { 0 }
            | if large { x86::PS } else { 0 };
        mem.write_u64(at, v).unwrap();
    }
    X86Paging::new(1 << 12)
}

/// The reference check: every present shadow translation among `gvas`
/// matches a fresh guest walk (gfn, pfn), and no writable leaf maps a
/// write-tracked gfn.
fn check<P: GuestPaging>(
    mmu: &ShadowMmu<P>,
    paging: &P,
    addrs: &[u64],
    zapped: &[(u64, u64)],
) -> Result<(), TestCaseError> {
    let slots = mmu.context().memslots();
    for &a in addrs {
        if let Some(m) = mmu.translate(paging, a) {
            let t = paging.walk(&**mmu.guest_mem(), a, AccessKind::READ, false);
            let t = t.map_err(|e| {
                TestCaseError::fail(format!(
                    "{a:#x}: shadow maps {m:?} but guest walk fails: {e}"
                ))
            })?;
            prop_assert_eq!(m.gfn, t.gfn(), "addr {:#x}", a);
            let hva = slots
                .gfn_to_memslot(t.gfn())
                .and_then(|s| s.gfn_to_hva(t.gfn()));
            prop_assert_eq!(Some(m.pfn), hva.map(|h| h >> 12), "identity host");
            if m.writable {
                prop_assert!(
                    t.access.write,
                    "writable SPTE for a read-only guest mapping at {:#x}",
                    a
                );
            }
            for &(s, e) in zapped {
                prop_assert!(
                    !(m.gfn >= s && m.gfn < e),
                    "stale translation {:#x} -> gfn {:#x} after zap {:#x}..{:#x}",
                    a,
                    m.gfn,
                    s,
                    e
                );
            }
        }
    }
    for (gfn, _level, writable) in mmu.leaves() {
        if writable {
            prop_assert!(
                !mmu.is_write_tracked(gfn),
                "gfn {:#x} holds a shadowed table but is mapped writable",
                gfn
            );
        }
    }
    Ok(())
}

#[derive(Debug, Clone)]
enum Op {
    Fault(usize, bool),
    Zap(u64, u64, bool),
    /// The guest rewrites the leaf of mapping i to a new gfn.
    Remap(usize, u64),
}

fn ops(n: usize) -> impl Strategy<Value = Vec<Op>> {
    prop::collection::vec(
        prop_oneof![
            6 => (0..n, any::<bool>()).prop_map(|(i, w)| Op::Fault(i, w)),
            2 => (0..RAM_PAGES, 1..600u64, any::<bool>()).prop_map(|(s, l, b)| Op::Zap(s, s + l, b)),
            1 => (0..n, 0..RAM_PAGES).prop_map(|(i, g)| Op::Remap(i, g)),
        ],
        1..60,
    )
}

fn maps() -> impl Strategy<Value = Vec<(u64, u64, bool, bool)>> {
    // gva pages spread over a few 1 GiB / 2 MiB areas so tables are shared;
    // gfns anywhere in RAM, including the tables' own gfns (1..~40).
    prop::collection::vec(
        (
            0u64..4,
            0u64..4,
            0u64..512,
            0..RAM_PAGES,
            any::<bool>(),
            0u8..8,
        ),
        1..40,
    )
    .prop_map(|v| {
        v.into_iter()
            .map(|(g, m, p, gfn, w, l)| {
                let large = l == 0;
                let vpage = (g << 18) | (m << 9) | if large { 0 } else { p };
                (vpage, if l == 1 { gfn % 40 } else { gfn }, w, large)
            })
            .collect()
    })
}

fn zap_opts(blind: bool) -> ZapOptions<'static> {
    ZapOptions {
        policy: YieldPolicy::default().with_max_units(7),
        mode: if blind {
            WalkMode::Blind
        } else {
            WalkMode::Summary
        },
        progress: None,
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(150))]

    #[test]
    fn shadow_x86_no_stale_translation(maps in maps(), ops in ops(40), max_level in 1u8..3) {
        let mem = Arc::new(SparseGuestMem::new(RAM_PAGES << 12));
        let paging = build_x86(&mem, &maps);
        let mmu = ShadowMmu::<X86Paging>::new(slot_ctx(RAM_PAGES, max_level), mem.clone());
        let addrs: Vec<u64> = maps.iter().flat_map(|m| [m.0 << 12, (m.0 << 12) + 0x1000 * 7]).collect();
        let mut zapped: Vec<(u64, u64)> = Vec::new();
        for op in ops {
            match op {
                Op::Fault(i, w) => {
                    let i = i % maps.len();
                    let a = maps[i].0 << 12;
                    let acc = if w { AccessKind::WRITE } else { AccessKind::READ };
                    match mmu.page_fault(&paging, a, acc) {
                        Ok(FaultOutcome::Emulate { gfn }) => { mmu.guest_table_write(gfn); }
                        Ok(_) | Err(FaultError::Guest(_)) => {}
                        Err(e) => prop_assert!(false, "{:?}", e),
                    }
                    // Faulting maps again what it walks: drop zaps it re-covers.
                    // (a large leaf maps its whole range again).
                    if let Some(m) = mmu.translate(&paging, a) {
                        let n = 1u64 << (9 * (m.level as u64 - 1));
                        let lo = m.gfn & !(n - 1);
                        zapped.retain(|&(s, e)| e <= lo || s >= lo + n);
                    }
                }
                Op::Zap(s, e, blind) => {
                    let r = mmu.zap_gfn_range(s, e, &zap_opts(blind));
                    prop_assert!(r.yields.longest.units <= 7);
                    zapped.retain(|&(a, b)| b <= s || a >= e);
                    zapped.push((s, e));
                }
                Op::Remap(i, gfn) => {
                    let i = i % maps.len();
                    let t = walk_x86(&*mem, &paging, maps[i].0 << 12, AccessKind::READ, false);
                    if let Ok(t) = t {
                        let lvl = t.leaf_level() as usize;
                        let at = (t.table_gfn[lvl - 1] << 12) + ((maps[i].0 << 12 >> level_shift(lvl as u8)) & 511) * 8;
                        let frame = if lvl > 1 { gfn & !511 } else { gfn };
                        mem.write_u64(at, (t.pte[lvl - 1] & 0xfff) | (frame << 12)).unwrap();
                        // The write hit a shadowed table: the MMU hears of it
                        // (the emulated write / write-tracking path).
                        prop_assert!(mmu.is_write_tracked(t.table_gfn[lvl - 1]) || mmu.translate(&paging, maps[i].0 << 12).is_none());
                        mmu.guest_table_write(t.table_gfn[lvl - 1]);
                    }
                }
            }
            check(&mmu, &paging, &addrs, &zapped)?;
        }
        let s = mmu.stats().snapshot();
        let leaves = mmu.leaves();
        prop_assert_eq!(s.pages_4k + s.pages_2m + s.pages_1g, leaves.len() as u64, "page stats track present leaves");
        prop_assert!(mmu.roles().iter().all(|(_, r)| !r.guest_mode));
        // Zap everything: nothing left mapped.
        mmu.zap_gfn_range(0, RAM_PAGES, &zap_opts(false));
        prop_assert!(mmu.leaves().is_empty());
        prop_assert_eq!(mmu.footprint().populated_heads, 0);
        prop_assert_eq!(mmu.footprint().rmap_descs, 0);
    }

    #[test]
    fn nested_zap_no_stale_translation(density in 0.01f64..0.3, shape in 0u8..4, seed in any::<u64>(),
                                        zaps in prop::collection::vec((0u64..65536, 1u64..20000, any::<bool>(), any::<bool>()), 1..4)) {
        let shape = [TableShape::Linear, TableShape::Shuffled, TableShape::Huge, TableShape::Aliased(2)][shape as usize];
        let cfg = NestedModelConfig { l1_bytes: 256 << 20, density, shape, seed, host_max_level: 1 + (seed % 2) as u8, ..Default::default() };
        let m = build_nested(cfg, RemoteTlb::default()).unwrap();
        let mut rng = seed;
        for (s, len, blind, never) in zaps {
            let policy = if never { YieldPolicy::never() } else { YieldPolicy::default().with_max_units(64) };
            let opts = ZapOptions { policy, mode: if blind { WalkMode::Blind } else { WalkMode::Summary }, progress: None };
            let e = (s + len).min(65536);
            let r = m.mmu.zap_gfn_range(s, e, &opts);
            if never { prop_assert_eq!(r.yields.yields, 0); } else { prop_assert!(r.yields.longest.units <= 64); }
            if blind {
                // Every head position of the three levels, empty ones included.
                let heads = (e - s) as i64;
                prop_assert!((r.rmap_heads_visited as i64 - heads - heads / 512).abs() <= 4, "{:?}", r);
            }
            let present = m.check_no_stale((s, e), u64::MAX, splitmix(&mut rng)).map_err(TestCaseError::fail)?;
            prop_assert!(present <= m.l2_pages());
            // Fault everything back: translations return, consistent.
            for k in 0..m.l2_pages() {
                let _ = m.mmu.page_fault(&m.paging, k << 12, AccessKind::WRITE);
            }
            prop_assert_eq!(m.check_no_stale((0, 0), u64::MAX, 1).map_err(TestCaseError::fail)?, m.l2_pages());
        }
    }
}

#[test]
fn write_protection_of_guest_tables_and_roles() {
    let mem = Arc::new(SparseGuestMem::new(RAM_PAGES << 12));
    // gva page 0x10 maps gfn 1 (the PML4 itself), writable; 0x11 maps gfn 0x100.
    let paging = build_x86(&mem, &[(0x10, 1, true, false), (0x11, 0x100, true, false)]);
    let mmu = ShadowMmu::<X86Paging>::new(slot_ctx(RAM_PAGES, 1), mem.clone());
    assert_eq!(
        mmu.page_fault(&paging, 0x11000, AccessKind::WRITE),
        Ok(FaultOutcome::Fixed {
            level: 1,
            pfn: 0x10_0100,
            writable: true
        })
    );
    // A write to the PML4 through its guest mapping must be emulated.
    assert_eq!(
        mmu.page_fault(&paging, 0x10000, AccessKind::WRITE),
        Ok(FaultOutcome::Emulate { gfn: 1 })
    );
    let m = mmu.translate(&paging, 0x10000).unwrap();
    assert!(!m.writable && mmu.is_write_tracked(1));
    let s = mmu.stats().snapshot();
    assert_eq!(
        s.mmu_cache_miss, 4,
        "root + 3 levels of indirect shadow pages"
    );
    let roles = mmu.roles();
    assert_eq!(roles.len(), 4);
    assert!(roles.iter().all(|(_, r)| !r.direct && r.access == ACC_ALL));
    // The table holding gva 0x11's leaf moves: zap its shadow, refault.
    assert_eq!(
        mmu.guest_table_write(1),
        4,
        "the root and its orphaned children"
    );
    assert!(mmu.translate(&paging, 0x11000).is_none());
    assert!(mmu.stats().snapshot().mmu_shadow_zapped >= 4);
}

#[test]
fn nested_roles_ept_access_and_rmap_chains() {
    let mem = Arc::new(SparseGuestMem::new(RAM_PAGES << 12));
    // EPT: L2 gpa 0 and 0x1000 both map L1 gfn 0x200 (a chain of 2); L2 gpa
    // 0x2000 maps 0x201 read/exec only.
    let paging = EptPaging::new(0x1000, false);
    mem.write_u64(0x1000, 0x2000 | ept::RWX).unwrap();
    mem.write_u64(0x2000, 0x3000 | ept::RWX).unwrap();
    mem.write_u64(0x3000, 0x4000 | ept::RWX).unwrap();
    let wb = (ept::MT_WB as u64) << ept::MT_SHIFT;
    mem.write_u64(0x4000, 0x200000 | ept::RWX | wb).unwrap();
    mem.write_u64(0x4008, 0x200000 | ept::RWX | wb).unwrap();
    mem.write_u64(0x4010, 0x201000 | ept::R | ept::X | wb)
        .unwrap();
    let mmu = crate::nested::NestedMmu::new(slot_ctx(RAM_PAGES, 1), mem);
    for a in [0, 0x1000] {
        assert!(matches!(
            mmu.page_fault(&paging, a, AccessKind::WRITE),
            Ok(FaultOutcome::Fixed { writable: true, .. })
        ));
    }
    assert!(matches!(
        mmu.page_fault(&paging, 0x2000, AccessKind::WRITE),
        Err(FaultError::Guest(WalkError::Protection { .. }))
    ));
    assert!(matches!(
        mmu.page_fault(&paging, 0x2000, AccessKind::READ),
        Ok(FaultOutcome::Fixed {
            writable: false,
            ..
        })
    ));
    assert_eq!(mmu.stats().snapshot().max_mmu_rmap_size, 2);
    assert!(mmu.roles().iter().all(|(_, r)| r.guest_mode));
    let r = mmu.zap_gfn_range(0x200, 0x201, &ZapOptions::default());
    assert_eq!(r.sptes_zapped, 2);
    assert!(mmu.translate(&paging, 0).is_none() && mmu.translate(&paging, 0x1000).is_none());
    assert!(mmu.translate(&paging, 0x2000).is_some());
}

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
