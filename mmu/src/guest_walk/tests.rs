//! Walkers against an independent reference walker on random (often
//! malformed) page tables: same translation or the same typed error.

#![allow(
    clippy::too_many_arguments,
    clippy::manual_is_multiple_of,
    clippy::nonminimal_bool
)]

use super::*;
use proptest::prelude::*;
use std::cell::RefCell;

/// Guest RAM for the tests: a plain map of 8-byte words, `size` bytes.
struct MapMem {
    size: u64,
    words: RefCell<HashMap<u64, u64>>,
    /// Fail this many compare-exchanges (a racing guest).
    fail_cmpxchg: RefCell<u32>,
}

impl MapMem {
    fn new(size: u64, words: HashMap<u64, u64>) -> Self {
        Self {
            size,
            words: RefCell::new(words),
            fail_cmpxchg: RefCell::new(0),
        }
    }
}

impl GuestPhysMem for MapMem {
    fn read_u64(&self, gpa: u64) -> Result<u64, MemError> {
        if gpa % 8 != 0 {
            return Err(MemError::Misaligned { gpa });
        }
        if gpa >= self.size || self.size - gpa < 8 {
            return Err(MemError::OutsideRam { gpa });
        }
        Ok(*self.words.borrow().get(&gpa).unwrap_or(&0))
    }
    fn cmpxchg_u64(&self, gpa: u64, old: u64, new: u64) -> Result<bool, MemError> {
        let cur = self.read_u64(gpa)?;
        let mut f = self.fail_cmpxchg.borrow_mut();
        if *f > 0 {
            *f -= 1;
            return Ok(false);
        }
        if cur != old {
            return Ok(false);
        }
        self.words.borrow_mut().insert(gpa, new);
        Ok(true)
    }
}

/// Reference x86-64 walker, written from the SDM tables in a different
/// shape (recursive, no shared helpers) and without A/D updates.
fn ref_x86(
    words: &HashMap<u64, u64>,
    size: u64,
    p: &X86Paging,
    gva: u64,
    acc: AccessKind,
) -> Result<(u64, u8, EffectiveAccess), WalkError> {
    let sext = if gva & (1 << 47) != 0 {
        0xffff_0000_0000_0000
    } else {
        0
    };
    if gva & 0xffff_0000_0000_0000 != sext {
        return Err(WalkError::NonCanonical { addr: gva });
    }
    let maxpa = p.maxphyaddr as u64;
    let pa_ok = |v: u64| maxpa >= 52 || (v >> maxpa) & ((1u64 << (52 - maxpa)) - 1) == 0;
    if !pa_ok(p.cr3) {
        return Err(WalkError::BadRoot { root: p.cr3 });
    }
    let frame = |v: u64| v & ((1u64 << maxpa.min(52)) - 1) & !0xfff;
    fn go(
        words: &HashMap<u64, u64>,
        size: u64,
        p: &X86Paging,
        gva: u64,
        acc: AccessKind,
        table: u64,
        level: u8,
        mut eff: EffectiveAccess,
        pa_ok: &dyn Fn(u64) -> bool,
        frame: &dyn Fn(u64) -> u64,
    ) -> Result<(u64, u8, EffectiveAccess), WalkError> {
        let shift = 12 + 9 * (level as u64 - 1);
        let at = table + ((gva >> shift) % 512) * 8;
        if at + 8 > size {
            return Err(WalkError::OutsideRam { gpa: at });
        }
        let e = *words.get(&at).unwrap_or(&0);
        if e & 1 == 0 {
            return Err(WalkError::NotPresent { level });
        }
        let ps = e & 0x80 != 0;
        let bad = !pa_ok(e)
            || (!p.efer_nx && e >> 63 == 1)
            || (level == 4 && ps)
            || (level == 3 && ps && (!p.gbpages || (e >> 13) % (1 << 17) != 0))
            || (level == 2 && ps && (e >> 13) % (1 << 8) != 0);
        if bad {
            return Err(WalkError::Reserved { level });
        }
        eff.write = eff.write && e & 2 != 0;
        eff.user = eff.user && e & 4 != 0;
        eff.exec = eff.exec && !(p.efer_nx && e >> 63 == 1);
        if level == 1 || (level <= 3 && ps) {
            let mask = (1u64 << shift) - 1;
            let gpa = (frame(e) & !mask) | (gva & mask);
            let fault = (acc.user && !eff.user)
                || (acc.write && !eff.write && (acc.user || p.cr0_wp))
                || (acc.fetch && (!eff.exec || (p.smep && !acc.user && eff.user)));
            if fault {
                return Err(WalkError::Protection {
                    level,
                    access: acc,
                    allowed: eff,
                });
            }
            return Ok((gpa, level, eff));
        }
        go(
            words,
            size,
            p,
            gva,
            acc,
            frame(e),
            level - 1,
            eff,
            pa_ok,
            frame,
        )
    }
    let all = EffectiveAccess {
        read: true,
        write: true,
        exec: true,
        user: true,
    };
    go(
        words,
        size,
        p,
        gva,
        acc,
        frame(p.cr3),
        4,
        all,
        &pa_ok,
        &frame,
    )
}

/// Reference EPT walker (SDM 29.3.2-29.3.3), same spirit.
fn ref_ept(
    words: &HashMap<u64, u64>,
    size: u64,
    p: &EptPaging,
    gpa: u64,
    acc: AccessKind,
) -> Result<(u64, u8, EffectiveAccess, u8), WalkError> {
    let maxpa = p.maxphyaddr as u64;
    let pa_ok = |v: u64| maxpa >= 52 || (v >> maxpa) & ((1u64 << (52 - maxpa)) - 1) == 0;
    if (p.eptp >> 3) & 7 != 3 || !pa_ok(p.eptp) || (p.eptp >> 7) & 0x1f != 0 {
        return Err(WalkError::BadRoot { root: p.eptp });
    }
    if gpa >= 1 << 48 {
        return Err(WalkError::NonCanonical { addr: gpa });
    }
    let frame = |v: u64| v & ((1u64 << maxpa.min(52)) - 1) & !0xfff;
    let mut table = frame(p.eptp);
    let mut eff = EffectiveAccess {
        read: true,
        write: true,
        exec: true,
        user: false,
    };
    for level in (1..=4u8).rev() {
        let shift = 12 + 9 * (level as u64 - 1);
        let at = table + ((gpa >> shift) & 511) * 8;
        if at + 8 > size {
            return Err(WalkError::OutsideRam { gpa: at });
        }
        let e = *words.get(&at).unwrap_or(&0);
        let (r, w, x) = (e & 1 != 0, e & 2 != 0, e & 4 != 0);
        if !r && !w && !x {
            return Err(WalkError::NotPresent { level });
        }
        let ps = e & 0x80 != 0 && level > 1;
        let is_leaf = level == 1 || ps;
        let mt = (e >> 3) & 7;
        let bad = !pa_ok(e)
            || (w && !r)
            || (x && !r && !w && !p.exec_only)
            || (level == 4 && (e >> 3) & 0x1f != 0)
            || (level < 4 && !is_leaf && (e >> 3) & 0xf != 0)
            || (is_leaf && (mt == 2 || mt == 3 || mt == 7))
            || (level == 3 && ps && (!p.gbpages || (e >> 12) % (1 << 18) != 0))
            || (level == 2 && ps && (e >> 12) % (1 << 9) != 0);
        if bad {
            return Err(WalkError::Reserved { level });
        }
        eff.read &= r;
        eff.write &= w;
        eff.exec &= x;
        if is_leaf {
            let mask = (1u64 << shift) - 1;
            let denied = if acc.fetch {
                !eff.exec
            } else if acc.write {
                !eff.write
            } else {
                !eff.read
            };
            if denied {
                return Err(WalkError::Protection {
                    level,
                    access: acc,
                    allowed: eff,
                });
            }
            return Ok(((frame(e) & !mask) | (gpa & mask), level, eff, mt as u8));
        }
        table = frame(e);
    }
    unreachable!("level 1 is always a leaf")
}

const RAM_PAGES: u64 = 32;

/// Random tables: for each of a few addresses, an entry on its path at
/// every level, pointing at a random page (in RAM, often a page already
/// used: loops and sharing; sometimes outside RAM), random flags, sometimes
/// a reserved bit.
fn tables() -> impl Strategy<Value = (HashMap<u64, u64>, Vec<u64>, u64)> {
    let specials = vec![
        1u64 << 63,
        1 << 51,
        1 << 45,
        1 << 13,
        1 << 20,
        1 << 12,
        1 << 29,
        1 << 8,
    ];
    let extra = prop_oneof![12 => Just(0u64), 1 => prop::sample::select(specials)];
    let entry = (0u64..RAM_PAGES + 2, any::<u16>(), extra);
    let path = (any::<u64>(), prop::collection::vec(entry, 4));
    (prop::collection::vec(path, 1..6), 0u64..RAM_PAGES).prop_map(|(paths, root)| {
        let mut words = HashMap::new();
        let mut addrs = Vec::new();
        for (addr, entries) in paths {
            // Make it canonical most of the time.
            let addr = if addr % 7 == 0 {
                addr
            } else {
                ((addr << 16).cast_signed() >> 16).cast_unsigned()
            };
            let mut table = root;
            for (i, (page, flags, extra)) in entries.into_iter().enumerate() {
                let level = 4 - u32::try_from(i).expect("4 levels");
                let at = table * 4096 + ((addr >> (12 + 9 * (level - 1))) & 511) * 8;
                // Mostly present and permissive, bits 0..8 random.
                // Half the entries have random low bits (mostly malformed for
                // EPT), the others are clean: present/RWX, maybe PS, maybe
                // WB memtype (x86: PCD|A), maybe A.
                let random_low = flags & 0xe000 == 0xe000;
                let ps = !random_low && level > 1 && flags & 0x1800 == 0x1800;
                let low = if random_low {
                    // Random low bits (mostly malformed for EPT).
                    flags as u64 & 0x1ff
                } else {
                    // Clean: present/RWX (sometimes one permission bit
                    // dropped), sometimes PS, a WB memtype on leaves (x86:
                    // PCD|A), sometimes A.
                    let mut l = 0x7;
                    if flags & 0x7 == 0 {
                        l &= !(1 << ((flags >> 3) % 3));
                    }
                    if ps {
                        l |= 0x80;
                    }
                    if (ps || level == 1) && flags & 0x400 != 0 {
                        l |= 6 << 3;
                    }
                    if flags & 0x200 != 0 {
                        l |= 1 << 8;
                    }
                    l
                };
                // Large pages point at a 1 GiB-aligned frame (0 or 1 GiB:
                // inside or outside RAM).
                let page = if ps { (page % 2) << 18 } else { page };
                let nx = if flags & 0xf0 == 0xf0 { 1 << 63 } else { 0 };
                let v = (page << 12) | low | extra | nx;
                words.entry(at).or_insert(v);
                table = page;
            }
            addrs.push(addr);
        }
        (words, addrs, root)
    })
}

fn access() -> impl Strategy<Value = AccessKind> {
    (any::<bool>(), any::<bool>(), any::<bool>()).prop_map(|(write, user, fetch)| AccessKind {
        write: write && !fetch,
        user,
        fetch,
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn x86_matches_reference((words, addrs, root) in tables(), acc in access(),
                              wp in any::<bool>(), nx in any::<bool>(), smep in any::<bool>(),
                              gb in any::<bool>(), maxpa in prop::sample::select(vec![36u8, 46, 52]),
                              set_ad in any::<bool>()) {
        let size = RAM_PAGES * 4096;
        let p = X86Paging { cr3: root << 12, cr0_wp: wp, efer_nx: nx, smep, gbpages: gb, maxphyaddr: maxpa };
        for &gva in &addrs {
            let mem = MapMem::new(size, words.clone());
            let got = walk_x86(&mem, &p, gva, acc, set_ad);
            let want = ref_x86(&words, size, &p, gva, acc);
            match (got, want) {
                (Ok(t), Ok((gpa, level, eff))) => {
                    prop_assert_eq!(t.gpa, gpa);
                    prop_assert_eq!(t.leaf_level(), level);
                    prop_assert_eq!(t.access, eff);
                    if set_ad {
                        // A set on every level used; D set on the leaf for a
                        // write and untouched elsewhere (unless a looping
                        // table makes a non-leaf entry the leaf entry too).
                        let entry = |l: u8| (t.table_gfn[l as usize - 1] << 12) + ((gva >> level_shift(l)) & 511) * 8;
                        let leaf_at = entry(level);
                        for l in level..=4 {
                            let at = entry(l);
                            let now = mem.read_u64(at).unwrap();
                            prop_assert!(now & x86::A != 0);
                            if l == level && acc.write {
                                prop_assert!(now & x86::D != 0);
                            } else if at != leaf_at {
                                prop_assert_eq!(now & x86::D, words.get(&at).copied().unwrap_or(0) & x86::D);
                            }
                        }
                    } else {
                        prop_assert_eq!(&*mem.words.borrow(), &words, "no A/D writes without set_ad");
                    }
                }
                (Err(e), Err(r)) => {
                    prop_assert_eq!(e, r);
                    prop_assert_eq!(&*mem.words.borrow(), &words, "a failed walk writes nothing");
                }
                (g, w) => prop_assert!(false, "gva {:#x}: walker {:?} reference {:?}", gva, g, w),
            }
        }
    }

    #[test]
    fn ept_matches_reference((words, addrs, root) in tables(), acc in access(),
                             exec_only in any::<bool>(), gb in any::<bool>(),
                             maxpa in prop::sample::select(vec![36u8, 46, 52]),
                             ad in any::<bool>(), set_ad in any::<bool>(), junk in 0u64..12) {
        let size = RAM_PAGES * 4096;
        let mut p = EptPaging::new(root << 12, ad);
        p.exec_only = exec_only;
        p.gbpages = gb;
        p.maxphyaddr = maxpa;
        if junk == 0 { p.eptp |= 1 << 8; } // reserved EPTP bit
        let acc = AccessKind { user: false, ..acc };
        for &gpa in &addrs {
            let gpa = gpa & ((1 << 48) - 1) | if junk == 1 { 1 << 50 } else { 0 };
            let mem = MapMem::new(size, words.clone());
            let got = walk_ept(&mem, &p, gpa, acc, set_ad);
            let want = ref_ept(&words, size, &p, gpa, acc);
            match (got, want) {
                (Ok(t), Ok((gpa2, level, eff, mt))) => {
                    prop_assert_eq!(t.gpa, gpa2);
                    prop_assert_eq!(t.leaf_level(), level);
                    prop_assert_eq!(t.access, eff);
                    prop_assert_eq!(t.memtype, mt);
                    if !(set_ad && ad) {
                        prop_assert_eq!(&*mem.words.borrow(), &words);
                    }
                }
                (Err(e), Err(r)) => prop_assert_eq!(e, r),
                (g, w) => prop_assert!(false, "gpa {:#x}: walker {:?} reference {:?}", gpa, g, w),
            }
        }
    }
}

fn identity_tables(mem: &SparseGuestMem) -> u64 {
    // PML4 at page 1, PDPT at 2, PD at 3, PT at 4; gva 0x5000 -> gpa 0x7000.
    mem.write_u64(0x1000, 0x2000 | 7).unwrap();
    mem.write_u64(0x2000, 0x3000 | 7).unwrap();
    mem.write_u64(0x3000, 0x4000 | 7).unwrap();
    mem.write_u64(0x4000 + 5 * 8, 0x7000 | 7).unwrap();
    // A 2 MiB page at gva 2 MiB -> gpa 4 MiB, read-only.
    mem.write_u64(0x3000 + 8, 0x40_0000 | x86::PS | 5).unwrap();
    0x1000
}

#[test]
fn x86_basic_ad_and_large_pages() {
    let mem = SparseGuestMem::new(16 << 20);
    let p = X86Paging::new(identity_tables(&mem));
    let t = walk_x86(&mem, &p, 0x5123, AccessKind::WRITE, true).unwrap();
    assert_eq!(t.gpa, 0x7123);
    assert_eq!(t.page_size, PageSize::Size4K);
    assert!(t.dirty);
    assert_eq!(t.table_gfn, [4, 3, 2, 1]);
    assert_eq!(
        mem.read_u64(0x4000 + 5 * 8).unwrap() & (x86::A | x86::D),
        x86::A | x86::D
    );
    let t = walk_x86(&mem, &p, 0x20_1234, AccessKind::READ, true).unwrap();
    assert_eq!(t.gpa, 0x40_1234);
    assert_eq!(t.page_size, PageSize::Size2M);
    assert!(!t.access.write);
    assert!(matches!(
        walk_x86(&mem, &p, 0x20_1234, AccessKind::WRITE, true),
        Err(WalkError::Protection { level: 2, .. })
    ));
    assert_eq!(
        walk_x86(&mem, &p, 0x9000, AccessKind::READ, false),
        Err(WalkError::NotPresent { level: 1 })
    );
    assert!(matches!(
        walk_x86(&mem, &p, 1 << 50, AccessKind::READ, false),
        Err(WalkError::NonCanonical { .. })
    ));
}

#[test]
fn x86_pointer_outside_ram_and_self_loop() {
    let mem = SparseGuestMem::new(1 << 20);
    mem.write_u64(0x1000, (1 << 30) | 7).unwrap();
    let p = X86Paging::new(0x1000);
    assert_eq!(
        walk_x86(&mem, &p, 0, AccessKind::READ, false),
        Err(WalkError::OutsideRam { gpa: 1 << 30 })
    );
    // Every level points back at the same table: the walk ends after 4 reads
    // with a 4K translation to the table itself.
    mem.write_u64(0x1000, 0x1000 | 7).unwrap();
    let t = walk_x86(&mem, &p, 0x10, AccessKind::READ, true).unwrap();
    assert_eq!(t.gpa, 0x1010);
}

#[test]
fn racing_guest_restarts_then_gives_up() {
    let mut words = HashMap::new();
    words.insert(0x1000, 0x2000 | 7);
    words.insert(0x2000, 0x3000 | 7);
    words.insert(0x3000, 0x4000 | 7);
    words.insert(0x4000, 0x5000 | 7);
    let mem = MapMem::new(1 << 20, words);
    let p = X86Paging::new(0x1000);
    *mem.fail_cmpxchg.borrow_mut() = 2;
    assert_eq!(
        walk_x86(&mem, &p, 0, AccessKind::READ, true).unwrap().gpa,
        0x5000
    );
    // Reset A bits and make the guest win every race.
    for a in [0x1000u64, 0x2000, 0x3000, 0x4000] {
        let v = mem.read_u64(a).unwrap() & !x86::A;
        mem.words.borrow_mut().insert(a, v);
    }
    *mem.fail_cmpxchg.borrow_mut() = u32::MAX;
    assert_eq!(
        walk_x86(&mem, &p, 0, AccessKind::READ, true),
        Err(WalkError::Raced {
            retries: MAX_WALK_RETRIES
        })
    );
}

#[test]
fn ept_basic() {
    let mem = SparseGuestMem::new(16 << 20);
    let rwx_wb = ept::RWX | ((ept::MT_WB as u64) << ept::MT_SHIFT);
    mem.write_u64(0x1000, 0x2000 | ept::RWX).unwrap();
    mem.write_u64(0x2000, 0x3000 | ept::RWX).unwrap();
    mem.write_u64(0x3000, 0x4000 | ept::RWX).unwrap();
    mem.write_u64(
        0x4000 + 8,
        0x9000 | ept::R | ((ept::MT_WB as u64) << ept::MT_SHIFT),
    )
    .unwrap();
    mem.write_u64(0x3000 + 8, 0x60_0000 | ept::PS | rwx_wb)
        .unwrap();
    let p = EptPaging::new(0x1000, true);
    let t = walk_ept(&mem, &p, 0x1042, AccessKind::READ, true).unwrap();
    assert_eq!(t.gpa, 0x9042);
    assert_eq!(t.memtype, ept::MT_WB);
    assert_eq!(
        t.access,
        EffectiveAccess {
            read: true,
            write: false,
            exec: false,
            user: false
        }
    );
    assert!(mem.read_u64(0x4008).unwrap() & ept::A != 0);
    assert!(matches!(
        walk_ept(&mem, &p, 0x1042, AccessKind::WRITE, true),
        Err(WalkError::Protection { level: 1, .. })
    ));
    let t = walk_ept(&mem, &p, 0x20_0010, AccessKind::WRITE, true).unwrap();
    assert_eq!(
        (t.gpa, t.page_size, t.dirty),
        (0x60_0010, PageSize::Size2M, true)
    );
    // W without R is a misconfiguration.
    mem.write_u64(0x4000 + 16, 0xa000 | ept::W).unwrap();
    assert_eq!(
        walk_ept(&mem, &p, 0x2000, AccessKind::READ, false),
        Err(WalkError::Reserved { level: 1 })
    );
}
