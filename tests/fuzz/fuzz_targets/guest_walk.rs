//! The guest page-table walkers (`mmu::guest_walk`: x86-64 and EPT, and
//! the VMM's walk in every x86 paging mode, `guest_walk::modes`) over guest
//! memory made of the fuzzer's bytes. Never panics; a translation keeps the
//! page offset and allows the access; with A/D updates the walk translates
//! the same, changes only A/D bits of the entries it read, and a second
//! walk changes nothing more; in 4-level mode the VMM's walk and the shadow
//! MMU's agree.
#![no_main]

use std::cell::Cell;

use libfuzzer_sys::fuzz_target;
use mmu::guest_walk::modes::{self, ModePaging, X86Mode};
use mmu::guest_walk::{
    ept, walk_ept, walk_x86, x86, AccessKind, EptPaging, GuestPhysMem, MemError, Translation,
    WalkError, X86Paging,
};

/// Guest RAM of the fuzzer's bytes (whole u64s), at gpa 0.
struct Mem(Vec<Cell<u64>>);

impl Mem {
    fn word(&self, gpa: u64) -> Result<&Cell<u64>, MemError> {
        if !gpa.is_multiple_of(8) {
            return Err(MemError::Misaligned { gpa });
        }
        usize::try_from(gpa / 8)
            .ok()
            .and_then(|i| self.0.get(i))
            .ok_or(MemError::OutsideRam { gpa })
    }
    fn snapshot(&self) -> Vec<u64> {
        self.0.iter().map(Cell::get).collect()
    }
}

impl GuestPhysMem for Mem {
    fn read_u64(&self, gpa: u64) -> Result<u64, MemError> {
        Ok(self.word(gpa)?.get())
    }
    fn cmpxchg_u64(&self, gpa: u64, old: u64, new: u64) -> Result<bool, MemError> {
        let w = self.word(gpa)?;
        if w.get() != old {
            return Ok(false);
        }
        w.set(new);
        Ok(true)
    }
}

fn le64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_le_bytes(a)
}

fn check_ok(t: &Translation, gva: u64) {
    let size = t.page_size.bytes();
    assert_eq!(t.gpa & (size - 1), gva & (size - 1));
    let leaf = t.pte[usize::from(t.leaf_level()) - 1];
    assert_ne!(leaf, 0);
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 19 {
        return;
    }
    let (flags, maxpa, kind) = (data[0], data[1], data[2]);
    let gva = le64(&data[3..11]);
    let root = le64(&data[11..19]);
    let mem = Mem(data[19..]
        .chunks_exact(8)
        .map(|c| Cell::new(le64(c)))
        .collect());
    let bit = |n: u8| flags & (1 << n) != 0;
    let access = AccessKind {
        write: bit(4),
        user: bit(5),
        fetch: bit(6),
    };
    let set_ad = bit(7);
    let before = mem.snapshot();
    let ept_paging = kind & 1 != 0;
    let walk = |set_ad| -> Result<Translation, WalkError> {
        if ept_paging {
            let p = EptPaging {
                eptp: root,
                exec_only: bit(0),
                gbpages: bit(3),
                maxphyaddr: maxpa,
            };
            walk_ept(&mem, &p, gva, access, set_ad)
        } else {
            let p = X86Paging {
                cr3: root,
                cr0_wp: bit(0),
                efer_nx: bit(1),
                smep: bit(2),
                gbpages: bit(3),
                maxphyaddr: maxpa,
            };
            walk_x86(&mem, &p, gva, access, set_ad)
        }
    };
    if !ept_paging {
        // Bits 3:1 of `kind`: the mode of the VMM's walk.
        let mode = match (kind >> 1) & 7 {
            0 => X86Mode::NoPaging,
            1 => X86Mode::Bits32,
            2 => X86Mode::Pae,
            3 => X86Mode::Level5,
            _ => X86Mode::Level4,
        };
        let mp = ModePaging {
            mode,
            x86: X86Paging {
                cr3: root,
                cr0_wp: bit(0),
                efer_nx: bit(1),
                smep: bit(2),
                gbpages: bit(3),
                maxphyaddr: maxpa,
            },
            pse: kind & 0x10 != 0,
        };
        let r = modes::walk(&mem, &mp, gva, access);
        assert_eq!(mem.snapshot(), before);
        if let Ok(t) = &r {
            let off = t.page_bytes - 1;
            assert!(t.page_bytes.is_power_of_two());
            assert_eq!(t.gpa & off, gva & off);
            match mode {
                X86Mode::NoPaging => assert!(t.gpa < 1 << 32),
                // PSE-36: 36 address bits.
                X86Mode::Bits32 => assert!(t.gpa < 1 << 36),
                _ => {}
            }
            assert!(!access.user || t.access.user);
            assert!(!access.fetch || t.access.exec);
            assert!(!access.write || t.access.write || (!access.user && !bit(0)));
        }
        if mode == X86Mode::Level4 {
            let shadow = walk_x86(&mem, &mp.x86, gva, access, false);
            assert_eq!(
                r.map(|t| (t.gpa, t.level, t.access)),
                shadow.map(|t| (t.gpa, t.leaf_level(), t.access))
            );
        }
    }
    let plain = walk(false);
    // Without A/D updates a walk only reads, and reads the same again.
    assert_eq!(mem.snapshot(), before);
    assert_eq!(walk(false), plain);
    let Ok(t) = plain else {
        return;
    };
    check_ok(&t, gva);
    if ept_paging {
        assert!(!access.write || t.access.write);
        assert!(!access.fetch || t.access.exec);
        assert!(access.write || access.fetch || t.access.read);
    } else {
        assert!(!access.user || t.access.user);
        assert!(!access.fetch || t.access.exec);
        assert!(!access.write || t.access.write || (!access.user && !bit(0)));
    }
    if !set_ad {
        return;
    }
    let ad = walk(true).expect("an A/D walk fails where the plain one passed");
    assert_eq!(
        (ad.gpa, ad.page_size, ad.access),
        (t.gpa, t.page_size, t.access)
    );
    let ad_bits = if ept_paging {
        ept::A | ept::D
    } else {
        x86::A | x86::D
    };
    let after = mem.snapshot();
    for (i, (a, b)) in before.iter().zip(&after).enumerate() {
        if a != b {
            assert_eq!(a & !ad_bits, b & !ad_bits, "word {i} changed beyond A/D");
        }
    }
    let again = walk(true).unwrap();
    assert_eq!(again.gpa, ad.gpa);
    assert_eq!(mem.snapshot(), after, "a second A/D walk changed memory");
});
