use super::*;
use crate::memslot::{Memslot, Memslots};
use crate::mmu_notifier::KvmMmuNotifier;
use crate::spte::Writability;
use crate::tlb::RemoteTlb;
use crate::yielder::{YieldMode, YieldPolicy};
use notifier::{Delivery, HvaRange, Invalidation, MmuNotifyEvent};
use proptest::prelude::*;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

/// pfn = gfn + PFN_OFF: congruent at every level, so any size can map.
const PFN_OFF: u64 = 1 << 20;
/// One 1G-backed slot of 8 GiB at gfn 0 (hva 1G-aligned).
const SLOT_PAGES: u64 = 8 << 18;
const SLOT_HVA: u64 = 0x4000_0000_0000;

fn mmu() -> TdpMmu {
    let slot = Memslot::new(0, 0, SLOT_PAGES, SLOT_HVA, PageSize::Size1G).unwrap();
    TdpMmu::new(MmuContext::new(
        Memslots::new(vec![slot], 0).unwrap(),
        RemoteTlb::default(),
    ))
}

fn resolver(
    level: PageSize,
) -> impl Fn(&Memslot, u64, u64, bool) -> Result<HostPage, ResolveError> {
    move |_, gfn, _, _| {
        Ok(HostPage {
            pfn: gfn + PFN_OFF,
            level,
            writable: true,
        })
    }
}

fn fault(m: &TdpMmu, gfn: u64, level: PageSize) -> FaultOutcome {
    m.page_fault(gfn, false, &resolver(level)).unwrap()
}

#[test]
fn faults_install_the_largest_allowed_leaf() {
    let m = mmu();
    assert_eq!(
        fault(&m, 5, PageSize::Size4K),
        FaultOutcome::Fixed(PageSize::Size4K)
    );
    assert_eq!(
        fault(&m, 5, PageSize::Size4K),
        FaultOutcome::Spurious(PageSize::Size4K)
    );
    assert_eq!(
        fault(&m, 1000, PageSize::Size2M),
        FaultOutcome::Fixed(PageSize::Size2M)
    );
    assert_eq!(
        fault(&m, (1 << 18) + 7, PageSize::Size1G),
        FaultOutcome::Fixed(PageSize::Size1G)
    );
    // A 4K fault inside the 1G leaf is spurious.
    assert_eq!(
        fault(&m, (1 << 18) + 9999, PageSize::Size4K),
        FaultOutcome::Spurious(PageSize::Size1G)
    );
    // A 2M fault where a table with 4K leaves exists maps 4K.
    assert_eq!(
        fault(&m, 6, PageSize::Size2M),
        FaultOutcome::Fixed(PageSize::Size4K)
    );
    let l = m.lookup((1 << 18) + 12345).unwrap();
    assert_eq!((l.gfn, l.level), (1 << 18, PageSize::Size1G));
    assert_eq!(l.pfn_of((1 << 18) + 12345), (1 << 18) + 12345 + PFN_OFF);
    assert_eq!(l.spte.writability(), Some(Writability::Writable));
    let s = m.stats().snapshot();
    assert_eq!((s.pages_4k, s.pages_2m, s.pages_1g), (2, 1, 1));
    assert_eq!((s.pf_taken, s.pf_fixed), (6, 4));
    // root + L3 + L2 + L1 for gfn 5, L2 for the 1G-region of gfn 2^18 not needed.
    assert_eq!(s.tdp_mmu_pages, 4);
}

#[test]
fn misaligned_host_pfn_or_slot_lowers_the_level() {
    let m = mmu();
    let odd = |_: &Memslot, gfn: u64, _: u64, _: bool| {
        Ok(HostPage {
            pfn: gfn + 1,
            level: PageSize::Size1G,
            writable: false,
        })
    };
    assert_eq!(
        m.page_fault(3, false, &odd).unwrap(),
        FaultOutcome::Fixed(PageSize::Size4K)
    );
    assert_eq!(
        m.lookup(3).unwrap().spte.writability(),
        Some(Writability::ReadOnly)
    );
    assert_eq!(
        m.page_fault(3 + 512, true, &odd),
        Err(FaultError::WriteToReadOnly { gfn: 515 })
    );
    assert_eq!(
        m.page_fault(SLOT_PAGES, false, &odd),
        Err(FaultError::NoMemslot { gfn: SLOT_PAGES })
    );
    assert_eq!(
        m.page_fault(GFN_LIMIT, false, &odd),
        Err(FaultError::GfnOutOfRange { gfn: GFN_LIMIT })
    );
}

#[test]
fn fault_inside_an_invalidation_retries_and_installs_nothing() {
    let m = mmu();
    let ctx = m.context().clone();
    {
        let _w = ctx.mmu_lock.write();
        ctx.seq.begin();
        ctx.seq.range_add(100, 200);
    }
    assert_eq!(fault(&m, 150, PageSize::Size4K), FaultOutcome::Retry);
    assert_eq!(
        fault(&m, 300, PageSize::Size4K),
        FaultOutcome::Fixed(PageSize::Size4K)
    );
    assert!(m.lookup(150).is_none());
    // The snapshot is taken before the host page is resolved: an invalidation
    // that ends while the resolver runs forces a retry.
    let racing = |_: &Memslot, gfn: u64, _: u64, _: bool| {
        let _w = ctx.mmu_lock.write();
        assert!(ctx.seq.end());
        Ok(HostPage {
            pfn: gfn + PFN_OFF,
            level: PageSize::Size4K,
            writable: true,
        })
    };
    assert_eq!(
        m.page_fault(400, false, &racing).unwrap(),
        FaultOutcome::Retry
    );
    assert!(m.lookup(400).is_none());
    assert_eq!(
        fault(&m, 150, PageSize::Size4K),
        FaultOutcome::Fixed(PageSize::Size4K)
    );
    assert_eq!(m.stats().snapshot().fault_retries, 2);
}

#[test]
fn zap_clears_leaves_frees_tables_and_counts_flushes() {
    let m = mmu();
    for gfn in 0..2048 {
        fault(&m, gfn, PageSize::Size4K);
    }
    fault(&m, 4096, PageSize::Size2M);
    let pages_before = m.stats().snapshot().tdp_mmu_pages;
    assert_eq!(pages_before, 1 + 1 + 1 + 4);
    let r = m.zap_range(10, 20, YieldPolicy::default());
    assert_eq!(r.yields, 0);
    assert!(m.leaves_in(10, 20).is_empty());
    assert_eq!(m.leaves_in(0, 2048).len(), 2038);
    // Whole range: every 4K table is freed, the 2M leaf goes too (overlap).
    // (A slice that never runs out: on a loaded machine the default one
    // can expire mid-zap, and a yield flushes first - one flush more.)
    m.zap_range(
        0,
        4097,
        YieldPolicy::default().with_slice(std::time::Duration::from_secs(60)),
    );
    assert!(m.mapped_leaves().is_empty());
    let s = m.stats().snapshot();
    assert_eq!((s.pages_4k, s.pages_2m), (0, 0));
    assert_eq!(s.tdp_mmu_pages, 1, "only the root is left");
    assert_eq!((s.remote_tlb_flush_requests, s.remote_tlb_flush), (2, 2));
    // Nothing mapped: no flush requested.
    m.zap_range(0, GFN_LIMIT, YieldPolicy::default());
    assert_eq!(m.stats().snapshot().remote_tlb_flush_requests, 2);
    // Huge leaves come back once the tables are gone.
    assert_eq!(
        fault(&m, 7, PageSize::Size1G),
        FaultOutcome::Fixed(PageSize::Size1G)
    );
}

#[test]
fn yield_bound_in_work_units() {
    let m = mmu();
    for gfn in 0..(3 * 512 + 17) {
        fault(&m, gfn, PageSize::Size4K);
    }
    let policy = YieldPolicy::default()
        .with_max_units(100)
        .with_slice(Duration::from_secs(60));
    let r = m.zap_range(0, 1 << 20, policy);
    assert!(r.longest.units <= 100, "{r:?}");
    assert!(r.yields >= 15, "{r:?}");
    assert!(m.mapped_leaves().is_empty());
    assert_eq!(m.stats().snapshot().tdp_mmu_pages, 1);
    // A flush before every yield that had zapped something, one at the end.
    let s = m.stats().snapshot();
    assert!(
        s.remote_tlb_flush_requests >= 15 && s.remote_tlb_flush_requests <= r.yields + 1,
        "{s:?}"
    );
    assert_eq!(s.zap_yields, r.yields);
    assert_eq!(s.max_zap_stretch_leaves, r.longest.units);

    // max_units = 1 still makes progress.
    for gfn in 0..600 {
        fault(&m, gfn, PageSize::Size4K);
    }
    let r = m.zap_range(0, 600, YieldPolicy::default().with_max_units(1));
    assert_eq!(r.longest.units, 1);
    assert!(m.mapped_leaves().is_empty());
}

#[test]
fn never_yield_is_one_stretch_over_the_whole_range() {
    let m = mmu();
    for gfn in 0..(2 * 512) {
        fault(&m, gfn, PageSize::Size4K);
    }
    let r = m.zap_range(0, 1024, YieldPolicy::never().with_max_units(10));
    assert_eq!(r.yields, 0);
    // 2 level-1 tables of 512 + their 2 level-2 entries + 1 + 1 above.
    assert_eq!(r.longest.units, r.units);
    assert_eq!(r.units, 1024 + 2 + 1 + 1);
    assert_eq!(YieldPolicy::never().mode, YieldMode::NeverYield);
}

#[test]
fn empty_range_costs_one_visit_per_top_level_spte() {
    let m = mmu();
    // 4 TiB = 8 root SPTEs, all non-present.
    let r = m.zap_range(0, 4 << 28, YieldPolicy::default());
    assert_eq!(r.units, 8);
    fault(&m, 1, PageSize::Size4K);
    // Now the first 512 GiB has a table: 512 1G entries, one present.
    let r = m.zap_range(1 << 18, 4 << 28, YieldPolicy::default());
    assert_eq!(r.units, 1 + 511 + 7);
}

#[derive(Debug, Clone)]
enum Op {
    Fault {
        gfn: u64,
        level: PageSize,
    },
    Zap {
        start: u64,
        len: u64,
        max_units: u64,
    },
    /// A host invalidation of gfns `[start, start + len)` through
    /// `KvmMmuNotifier`, with a fault between its start and end.
    Invalidate {
        start: u64,
        len: u64,
        gfn: u64,
        level: PageSize,
    },
}

fn level() -> impl Strategy<Value = PageSize> {
    prop_oneof![
        Just(PageSize::Size4K),
        Just(PageSize::Size2M),
        Just(PageSize::Size1G)
    ]
}

/// gfns clustered in the first few GiB so that faults and zaps overlap.
fn gfn() -> impl Strategy<Value = u64> {
    prop_oneof![
        0..4096u64,
        0..(3u64 << 18),
        (1u64 << 18) - 600..(1u64 << 18) + 600
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => (gfn(), level()).prop_map(|(gfn, level)| Op::Fault { gfn, level }),
        1 => (gfn(), prop_oneof![1..64u64, 1..2048u64, 1..(1u64 << 19)], 1..5000u64)
            .prop_map(|(start, len, max_units)| Op::Zap { start, len, max_units }),
        1 => (gfn(), prop_oneof![1..64u64, 1..2048u64], gfn(), level())
            .prop_map(|(start, len, gfn, level)| Op::Invalidate { start, len, gfn, level }),
    ]
}

fn model_zap(model: &mut BTreeMap<u64, (PageSize, u64)>, start: u64, end: u64) {
    model.retain(|g, (l, _)| *g + l.pages() <= start || *g >= end);
}

fn model_fault(
    m: &TdpMmu,
    model: &mut BTreeMap<u64, (PageSize, u64)>,
    gfn: u64,
    level: PageSize,
) -> Result<(), TestCaseError> {
    let covered = model
        .range(..=gfn)
        .next_back()
        .filter(|(g, (l, _))| gfn < *g + l.pages())
        .map(|(_, (l, _))| *l);
    match fault(m, gfn, level) {
        FaultOutcome::Fixed(l) => {
            prop_assert!(covered.is_none(), "installed over {covered:?}");
            prop_assert!(l <= level);
            let base = gfn & !(l.pages() - 1);
            prop_assert!(model.range(base..base + l.pages()).next().is_none());
            model.insert(base, (l, base + PFN_OFF));
        }
        FaultOutcome::Spurious(l) => prop_assert_eq!(Some(l), covered),
        FaultOutcome::Retry => prop_assert!(false, "retry outside any invalidation"),
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Faults of all sizes, yielding zaps and host invalidations (with a
    /// fault racing each) against a BTreeMap of leaves.
    #[test]
    fn tdp_matches_a_reference_model(ops in proptest::collection::vec(op(), 1..60)) {
        let m = Arc::new(mmu());
        let notifier = KvmMmuNotifier::new(m.context().clone(), YieldPolicy::default().with_max_units(100));
        notifier.add_mmu(m.clone());
        // first gfn -> (level, pfn)
        let mut model: BTreeMap<u64, (PageSize, u64)> = BTreeMap::new();
        for op in ops {
            match op {
                Op::Fault { gfn, level } => model_fault(&m, &mut model, gfn, level)?,
                Op::Zap { start, len, max_units } => {
                    let end = start + len;
                    let r = m.zap_range(start, end, YieldPolicy::default().with_max_units(max_units));
                    prop_assert!(r.longest.units <= max_units);
                    model_zap(&mut model, start, end);
                    prop_assert!(m.leaves_in(start, end).is_empty(), "leaf left in [{start:#x}, {end:#x})");
                }
                Op::Invalidate { start, len, gfn, level } => {
                    let end = start + len;
                    let hva = |g: u64| SLOT_HVA + (g << 12);
                    let inv = Invalidation {
                        range: HvaRange::new(hva(start), hva(end)),
                        event: MmuNotifyEvent::Clear,
                        blockable: true,
                        delivery: Delivery::Before,
                    };
                    let r = notifier.start(&inv).expect("slot overlaps");
                    prop_assert!(r.longest.units <= 100);
                    model_zap(&mut model, start, end);
                    prop_assert!(m.leaves_in(start, end).is_empty());
                    let span = gfn & !(level.pages() - 1);
                    if span < end && start < span + level.pages() {
                        prop_assert_eq!(fault(&m, gfn, level), FaultOutcome::Retry);
                    } else {
                        model_fault(&m, &mut model, gfn, level)?;
                    }
                    prop_assert!(m.leaves_in(start, end).is_empty(), "installed during the invalidation");
                    notifier.end(&inv);
                }
            }
            let leaves: BTreeMap<u64, (PageSize, u64)> =
                m.mapped_leaves().into_iter().map(|l| (l.gfn, (l.level, l.spte.pfn()))).collect();
            prop_assert_eq!(&leaves, &model);
            for (g, (l, pfn)) in &model {
                let found = m.lookup(g + l.pages() - 1).unwrap();
                prop_assert_eq!((found.gfn, found.level, found.spte.pfn()), (*g, *l, *pfn));
            }
            let s = m.stats().snapshot();
            let count = |lv| model.values().filter(|(l, _)| *l == lv).count() as u64;
            prop_assert_eq!((s.pages_4k, s.pages_2m, s.pages_1g),
                (count(PageSize::Size4K), count(PageSize::Size2M), count(PageSize::Size1G)));
        }
    }
}
