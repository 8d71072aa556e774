//! Guest-virtual access for the VMM: GVA -> GPA through the project's own
//! walk of the guest's page tables in the vCPU's paging mode
//! (`mmu::guest_walk::modes`: no paging, 32-bit, PAE, 4-level, 5-level -
//! Intel SDM Vol. 3A, 4.1.1 and 4.3-4.6; KVM's `FNAME(walk_addr_generic)`
//! in `arch/x86/kvm/mmu/paging_tmpl.h`), with the access rights of the
//! vCPU's CPL (U/S and R/W at CPL 3, SDM 4.6), and bounds-checked reads and
//! writes of guest RAM through it. Guest page tables are untrusted: each
//! entry is read once, the walk is bounded, and a pointer outside guest RAM
//! is a typed error.

use kvm_bindings::kvm_sregs;
use mmu::guest_walk::modes::{self, ModePaging};
use mmu::guest_walk::{AccessKind, GuestPhysMem, MemError, WalkError};
use notifier::convert::u64_to_usize;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::regs::CR0_PE;

const PAGE: u64 = 4096;

/// Guest-virtual access errors.
#[derive(Debug, thiserror::Error)]
pub enum GvaError {
    /// The guest page tables do not translate the gva for this access.
    #[error("gva {gva:#x}: {source}")]
    Walk {
        gva: u64,
        #[source]
        source: WalkError,
    },
    /// The gpa is outside guest RAM.
    #[error("gpa {gpa:#x} (+{len}) is outside guest RAM")]
    OutsideRam { gpa: u64, len: usize },
}

/// Guest RAM as the walker reads it: bounds-checked 8-byte reads through
/// vm-memory. The VMM only looks at guest page tables (no A/D updates), so
/// a compare-exchange is never issued; one that were would be refused.
struct WalkMem<'a>(&'a GuestMemoryMmap);

impl GuestPhysMem for WalkMem<'_> {
    fn read_u64(&self, gpa: u64) -> Result<u64, MemError> {
        if !gpa.is_multiple_of(8) {
            return Err(MemError::Misaligned { gpa });
        }
        self.0
            .read_obj::<u64>(GuestAddress(gpa))
            .map_err(|_| MemError::OutsideRam { gpa })
    }

    fn cmpxchg_u64(&self, _gpa: u64, _old: u64, _new: u64) -> Result<bool, MemError> {
        Ok(false)
    }
}

/// How the vCPU translates its linear addresses: the paging mode and its
/// flags, and whether its accesses are user-mode ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Paging {
    pub mode: ModePaging,
    /// CPL 3: accesses need U/S (and R/W for writes) at every level.
    pub user: bool,
}

/// The CPL: 0 in real mode (CR0.PE = 0), else the DPL of SS, which is how
/// KVM reports the CPL in `kvm_sregs` (`svm_get_segment()` sets SS.DPL from
/// the VMCB's CPL; `vmx_get_cpl()` reads it from SS's access rights).
pub fn cpl(sregs: &kvm_sregs) -> u8 {
    if sregs.cr0 & CR0_PE == 0 {
        0
    } else {
        sregs.ss.dpl & 3
    }
}

/// The paging mode and CPL the vCPU's control registers and segments say
/// (SDM Vol. 3A, Table 4-1: CR0.PG, CR4.PAE, EFER.LMA, CR4.LA57).
pub fn paging(sregs: &kvm_sregs) -> Paging {
    Paging {
        mode: ModePaging::from_regs(sregs.cr0, sregs.cr3, sregs.cr4, sregs.efer),
        user: cpl(sregs) == 3,
    }
}

/// Translate a guest-virtual address for `access` at the vCPU's CPL
/// (`access.user` is set from [`Paging::user`]).
pub fn translate(
    mem: &GuestMemoryMmap,
    paging: &Paging,
    gva: u64,
    access: AccessKind,
) -> Result<u64, GvaError> {
    let access = AccessKind {
        user: paging.user,
        ..access
    };
    modes::walk(&WalkMem(mem), &paging.mode, gva, access)
        .map(|t| t.gpa)
        .map_err(|source| GvaError::Walk { gva, source })
}

/// Split `[gva, gva+len)` at page boundaries: (gva, offset in buf, len).
fn chunks(gva: u64, len: usize) -> impl Iterator<Item = (u64, usize, usize)> {
    let mut done = 0usize;
    std::iter::from_fn(move || {
        if done >= len {
            return None;
        }
        let va = gva.wrapping_add(done as u64);
        let n = u64_to_usize(PAGE - (va % PAGE)).min(len - done);
        let r = (va, done, n);
        done += n;
        Some(r)
    })
}

/// Read `buf.len()` bytes at `gva`.
pub fn read(
    mem: &GuestMemoryMmap,
    paging: &Paging,
    gva: u64,
    buf: &mut [u8],
) -> Result<(), GvaError> {
    for (va, off, n) in chunks(gva, buf.len()) {
        let gpa = translate(mem, paging, va, AccessKind::READ)?;
        mem.read_slice(&mut buf[off..off + n], GuestAddress(gpa))
            .map_err(|_| GvaError::OutsideRam { gpa, len: n })?;
    }
    Ok(())
}

/// Read up to `buf.len()` bytes at `gva`, stopping at the first page that
/// cannot be read; returns how many bytes were read (for instruction fetch).
pub fn read_prefix(
    mem: &GuestMemoryMmap,
    paging: &Paging,
    gva: u64,
    buf: &mut [u8],
) -> Result<usize, GvaError> {
    let fetch = AccessKind {
        fetch: true,
        ..AccessKind::READ
    };
    let mut got = 0;
    for (va, off, n) in chunks(gva, buf.len()) {
        let r = translate(mem, paging, va, fetch).and_then(|gpa| {
            mem.read_slice(&mut buf[off..off + n], GuestAddress(gpa))
                .map_err(|_| GvaError::OutsideRam { gpa, len: n })
        });
        match r {
            Ok(()) => got += n,
            Err(e) if got == 0 => return Err(e),
            Err(_) => break,
        }
    }
    Ok(got)
}

/// Write `buf` at `gva`. All pages are translated before any byte is written.
pub fn write(mem: &GuestMemoryMmap, paging: &Paging, gva: u64, buf: &[u8]) -> Result<(), GvaError> {
    let mut plan = Vec::new();
    for (va, off, n) in chunks(gva, buf.len()) {
        plan.push((translate(mem, paging, va, AccessKind::WRITE)?, off, n));
    }
    for (gpa, off, n) in plan {
        mem.write_slice(&buf[off..off + n], GuestAddress(gpa))
            .map_err(|_| GvaError::OutsideRam { gpa, len: n })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::regs::{CR0_PG, CR0_WP, CR4_PAE, EFER_LMA, EFER_LME, EFER_NXE};
    use super::*;
    use mmu::guest_walk::modes::CR4_LA57;

    /// 4 MiB of guest RAM with PML4 at 0x1000 -> PDPT 0x2000 -> PD 0x3000
    /// mapping gva 0xffff_8000_0020_0000 (PML4 index 256) to gpa 0x20_0000
    /// with one 2 MiB page.
    fn guest() -> (GuestMemoryMmap, Paging) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        mem.write_obj(0x2003u64, GuestAddress(0x1000 + 256 * 8))
            .unwrap();
        mem.write_obj(0x3003u64, GuestAddress(0x2000)).unwrap();
        mem.write_obj(0x20_0083u64, GuestAddress(0x3000 + 8))
            .unwrap();
        (mem, paging(&long_mode(0)))
    }

    /// A vCPU in 4-level long mode at `cpl`, CR3 0x1000.
    fn long_mode(cpl: u8) -> kvm_sregs {
        let mut s = kvm_sregs {
            cr0: CR0_PE | CR0_PG | CR0_WP,
            cr3: 0x1000,
            cr4: CR4_PAE,
            efer: EFER_LME | EFER_LMA | EFER_NXE,
            ..Default::default()
        };
        s.ss.dpl = cpl;
        s.cs.dpl = cpl;
        s
    }

    /// The walk follows CR0.PG, CR4.PAE, EFER.LMA and CR4.LA57 instead
    /// of assuming 4-level long mode: without paging a gva is its gpa; a
    /// 32-bit and a PAE guest's tables are walked as such.
    #[test]
    fn the_walk_follows_the_guests_paging_mode() {
        let (mem, _) = guest();
        let mut s = long_mode(0);
        // No paging: gva = gpa, whatever CR3 points at.
        s.cr0 = CR0_PE;
        let p = paging(&s);
        assert_eq!(
            translate(&mem, &p, 0x12_3456, AccessKind::READ).unwrap(),
            0x12_3456
        );
        let mut b = [0u8; 8];
        mem.write_obj(0x1122_3344u64, GuestAddress(0x30_0000))
            .unwrap();
        read(&mem, &p, 0x30_0000, &mut b).unwrap();
        assert_eq!(u64::from_le_bytes(b), 0x1122_3344);
        // 32-bit paging: PD 0x10_0000, PDE 0 -> PT 0x10_1000, PTE 3 -> 0x30_0000.
        mem.write_obj(0x10_1007u32, GuestAddress(0x10_0000))
            .unwrap();
        mem.write_obj(0x30_0007u32, GuestAddress(0x10_1000 + 3 * 4))
            .unwrap();
        s.cr0 = CR0_PE | CR0_PG;
        s.cr3 = 0x10_0000;
        s.cr4 = 0;
        s.efer = 0;
        let p = paging(&s);
        assert_eq!(
            translate(&mem, &p, 0x3010, AccessKind::READ).unwrap(),
            0x30_0010
        );
        // PAE: PDPT 0x10_2000, PDPTE 0 -> PD 0x10_3000 with a 2 MiB page at 0x20_0000.
        mem.write_obj(0x10_3001u64, GuestAddress(0x10_2000))
            .unwrap();
        mem.write_obj(0x20_0087u64, GuestAddress(0x10_3000))
            .unwrap();
        s.cr3 = 0x10_2000;
        s.cr4 = CR4_PAE;
        let p = paging(&s);
        assert_eq!(
            translate(&mem, &p, 0x1234, AccessKind::READ).unwrap(),
            0x20_1234
        );
        // 5-level (LA57): the 4-level tables at CR3 are now a PML5.
        s = long_mode(0);
        s.cr4 |= CR4_LA57;
        let p = paging(&s);
        let e = translate(&mem, &p, 0xffff_8000_0020_1234, AccessKind::READ).unwrap_err();
        assert!(matches!(e, GvaError::Walk { .. }), "{e}");
    }

    /// At CPL 3 a supervisor page is out of reach and a read-only one
    /// cannot be written (the assist used to walk every access as a
    /// supervisor one).
    #[test]
    fn cpl3_accesses_need_user_and_write_rights() {
        let (mem, _) = guest();
        let user = paging(&long_mode(3));
        assert!(user.user);
        let e = translate(&mem, &user, 0xffff_8000_0020_1234, AccessKind::READ).unwrap_err();
        assert!(
            matches!(
                e,
                GvaError::Walk {
                    source: WalkError::Protection { .. },
                    ..
                }
            ),
            "{e}"
        );
        // The same tables with U/S everywhere and a read-only leaf.
        mem.write_obj(0x2007u64, GuestAddress(0x1000 + 256 * 8))
            .unwrap();
        mem.write_obj(0x3007u64, GuestAddress(0x2000)).unwrap();
        mem.write_obj(0x20_0085u64, GuestAddress(0x3000 + 8))
            .unwrap();
        let va = 0xffff_8000_0020_1234;
        assert_eq!(
            translate(&mem, &user, va, AccessKind::READ).unwrap(),
            0x20_1234
        );
        assert!(translate(&mem, &user, va, AccessKind::WRITE).is_err());
        assert!(write(&mem, &user, va, &[1]).is_err());
        // CPL 0 with CR0.WP: refused too; without WP a supervisor write passes.
        let sup = paging(&long_mode(0));
        assert!(translate(&mem, &sup, va, AccessKind::WRITE).is_err());
        let mut s = long_mode(0);
        s.cr0 &= !CR0_WP;
        assert_eq!(
            translate(&mem, &paging(&s), va, AccessKind::WRITE).unwrap(),
            0x20_1234
        );
        // Real mode is CPL 0 whatever SS says.
        let mut s = long_mode(3);
        s.cr0 = 0;
        assert_eq!(cpl(&s), 0);
    }

    #[test]
    fn walks_the_guest_tables() {
        let (mem, p) = guest();
        let gpa = translate(&mem, &p, 0xffff_8000_0020_1234, AccessKind::READ).unwrap();
        assert_eq!(gpa, 0x20_1234);
        let e = translate(&mem, &p, 0xffff_8000_0040_0000, AccessKind::READ).unwrap_err();
        assert!(
            matches!(
                e,
                GvaError::Walk {
                    source: WalkError::NotPresent { .. },
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn a_table_pointer_outside_guest_ram_is_a_typed_error() {
        let (mem, p) = guest();
        // The PD pointer now points 1 GiB past the end of guest RAM.
        mem.write_obj(0x4000_3003u64, GuestAddress(0x2000)).unwrap();
        let e = translate(&mem, &p, 0xffff_8000_0020_0000, AccessKind::READ).unwrap_err();
        assert!(
            matches!(
                e,
                GvaError::Walk {
                    source: WalkError::OutsideRam { .. },
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn chunks_split_at_pages() {
        let v: Vec<_> = chunks(0xff0, 0x20).collect();
        assert_eq!(v, vec![(0xff0, 0, 0x10), (0x1000, 0x10, 0x10)]);
        let v: Vec<_> = chunks(0x1000, 512).collect();
        assert_eq!(v, vec![(0x1000, 0, 512)]);
        assert_eq!(chunks(0, 0).count(), 0);
    }
}
