//! Shadow and nested MMU against a reference model: after any sequence of
//! faults, zaps and guest table writes, every present shadow translation
//! agrees with a fresh guest walk, maps no gfn a zap covered since it was
//! last faulted, and no gfn holding a shadowed guest table is writable.

use super::*;
use crate::guest_walk::{
    ept, level_shift, walk_x86, x86, AccessKind, EptPaging, SparseGuestMem, WalkError, X86Paging,
};
use crate::memslot::{Memslot, Memslots};
use crate::model::{build_nested, splitmix, NestedModelConfig, TableShape};
use crate::{KvmMmuNotifier, MmuLock, YieldMode, YieldPolicy};
use notifier::subscriber::InvalidationSubscriber;
use notifier::PageSize;
use proptest::prelude::*;
use std::collections::HashMap;

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
                        let leaf = t.leaf_level();
                        let lvl = usize::from(leaf);
                        let at = (t.table_gfn[lvl - 1] << 12) + ((maps[i].0 << 12 >> level_shift(leaf)) & 511) * 8;
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
                let heads = e - s;
                prop_assert!(r.rmap_heads_visited.abs_diff(heads + heads / 512) <= 4, "{:?}", r);
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

mod invalidation;
