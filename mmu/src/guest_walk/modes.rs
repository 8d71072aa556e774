//! A read-only walk of the guest's tables in whatever paging mode the vCPU
//! is in - the VMM's view of guest-virtual addresses (the emulation assist,
//! the profiler). [`super::walk_x86`] stays the shadow MMU's 4-level walk
//! with A/D updates; this one only reads, and follows:
//!
//! - Intel SDM Vol. 3A, 4.1.1 "Four Paging Modes" (Table 4-1): CR0.PG = 0
//!   is no paging (linear = physical); CR4.PAE = 0 is 32-bit paging;
//!   EFER.LMA = 0 with PAE is PAE paging; otherwise 4-level, or 5-level
//!   with CR4.LA57.
//! - 4.3 "32-Bit Paging": 4-byte entries, CR3[31:12] -> PD -> PT, 4 MiB
//!   pages when CR4.PSE and PDE.PS (PSE-36: PDE bits 16:13 are physical
//!   address bits 35:32), no NX.
//! - 4.4 "PAE Paging": the four PDPTEs at CR3[31:5] (bits 2:1, 8:5 and 63
//!   reserved, no access rights), then PD -> PT with 8-byte entries, 2 MiB
//!   pages, bits 62:MAXPHYADDR reserved.
//! - 4.5 "4-Level Paging and 5-Level Paging": canonical addresses (bits
//!   63:47 or 63:56 equal), PML5 -> PML4 -> PDPT -> PD -> PT, 1 GiB / 2 MiB
//!   pages.
//! - 4.6 "Access Rights": U/S for CPL 3 accesses, R/W for writes at CPL 3
//!   and, with CR0.WP, at CPL < 3, XD with EFER.NXE (PAE and long modes),
//!   SMEP for supervisor fetches from user pages.
//!
//! KVM does the same in `arch/x86/kvm/mmu/paging_tmpl.h`,
//! `FNAME(walk_addr_generic)` (PTTYPE 32 for 32-bit paging, PTTYPE 64 for
//! PAE - `PT32E_ROOT_LEVEL` starts from `mmu->get_pdptr()` - and long
//! mode), with the reserved-bit masks of `__reset_rsvds_bits_mask()` in
//! `arch/x86/kvm/mmu/mmu.c` and `permission_fault()`. One difference: a CPU
//! (and KVM) loads the PDPTEs when CR3 is written; `KVM_GET_SREGS` does
//! not report them, so this walk reads them from guest RAM at CR3.
//!
//! As in [`super`], every entry is read once and every failure is a typed
//! [`WalkError`].

use super::{
    above_maxphy, bits, level_shift, phys_addr_mask, x86, AccessKind, EffectiveAccess,
    GuestPhysMem, WalkError, X86Paging, PAGE_SHIFT,
};

/// The paging mode CR0, CR4 and EFER select (SDM Vol. 3A, Table 4-1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum X86Mode {
    /// CR0.PG = 0: linear addresses are physical.
    NoPaging,
    /// CR4.PAE = 0: two levels of 4-byte entries.
    Bits32,
    /// EFER.LMA = 0 with CR4.PAE: the PDPTEs, then two levels.
    Pae,
    /// IA-32e, 4 levels.
    Level4,
    /// IA-32e with CR4.LA57, 5 levels.
    Level5,
}

/// CR0.PG.
pub const CR0_PG: u64 = 1 << 31;
/// CR0.WP.
pub const CR0_WP: u64 = 1 << 16;
/// CR4.PSE.
pub const CR4_PSE: u64 = 1 << 4;
/// CR4.PAE.
pub const CR4_PAE: u64 = 1 << 5;
/// CR4.LA57.
pub const CR4_LA57: u64 = 1 << 12;
/// CR4.SMEP.
pub const CR4_SMEP: u64 = 1 << 20;
/// EFER.LMA.
pub const EFER_LMA: u64 = 1 << 10;
/// EFER.NXE.
pub const EFER_NXE: u64 = 1 << 11;

impl X86Mode {
    /// SDM Vol. 3A, 4.1.1: the mode of CR0.PG, CR4.PAE, EFER.LMA, CR4.LA57.
    pub fn from_regs(cr0: u64, cr4: u64, efer: u64) -> Self {
        if cr0 & CR0_PG == 0 {
            X86Mode::NoPaging
        } else if cr4 & CR4_PAE == 0 {
            X86Mode::Bits32
        } else if efer & EFER_LMA == 0 {
            X86Mode::Pae
        } else if cr4 & CR4_LA57 != 0 {
            X86Mode::Level5
        } else {
            X86Mode::Level4
        }
    }

    /// Whether linear addresses are 64 bits wide (IA-32e) or 32.
    pub fn is_long(self) -> bool {
        matches!(self, X86Mode::Level4 | X86Mode::Level5)
    }
}

/// Everything a walk in [`X86Mode`] depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModePaging {
    pub mode: X86Mode,
    /// CR3, CR0.WP, EFER.NXE, CR4.SMEP, 1 GiB pages, MAXPHYADDR.
    pub x86: X86Paging,
    /// CR4.PSE: 4 MiB pages in 32-bit paging (PAE and IA-32e always
    /// have large pages).
    pub pse: bool,
}

impl ModePaging {
    /// The mode and flags of these control registers (`gbpages` and
    /// `maxphyaddr` as [`X86Paging::new`] has them).
    pub fn from_regs(cr0: u64, cr3: u64, cr4: u64, efer: u64) -> Self {
        let mut x86 = X86Paging::new(cr3);
        x86.cr0_wp = cr0 & CR0_WP != 0;
        x86.smep = cr4 & CR4_SMEP != 0;
        x86.efer_nx = efer & EFER_NXE != 0;
        ModePaging {
            mode: X86Mode::from_regs(cr0, cr4, efer),
            x86,
            pse: cr4 & CR4_PSE != 0,
        }
    }
}

/// Where a [`walk`] led.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModeTranslation {
    pub gpa: u64,
    /// Level of the leaf (1 = 4 KiB; 2 = 2 MiB, or 4 MiB in 32-bit
    /// paging; 3 = 1 GiB); 0 without paging.
    pub level: u8,
    /// Bytes the leaf maps (4096 without paging).
    pub page_bytes: u64,
    /// Effective rights (AND over the levels; `exec` false where XD is set).
    pub access: EffectiveAccess,
}

/// Translate the linear address `gva` for `access` (`access.user`: a CPL 3
/// access) in `p`'s mode. Outside IA-32e mode linear addresses are 32 bits:
/// the upper half of `gva` is dropped, as the CPU's address wraps at 4 GiB.
pub fn walk(
    mem: &dyn GuestPhysMem,
    p: &ModePaging,
    gva: u64,
    access: AccessKind,
) -> Result<ModeTranslation, WalkError> {
    match p.mode {
        X86Mode::NoPaging => Ok(ModeTranslation {
            gpa: gva & 0xffff_ffff,
            level: 0,
            page_bytes: 1 << PAGE_SHIFT,
            access: EffectiveAccess {
                read: true,
                write: true,
                exec: true,
                user: true,
            },
        }),
        X86Mode::Bits32 => walk32(mem, p, gva & 0xffff_ffff, access),
        X86Mode::Pae => walk_pae(mem, p, gva & 0xffff_ffff, access),
        X86Mode::Level4 => walk_long(mem, p, gva, access, 4),
        X86Mode::Level5 => walk_long(mem, p, gva, access, 5),
    }
}

fn all_rights() -> EffectiveAccess {
    EffectiveAccess {
        read: true,
        write: true,
        exec: true,
        user: true,
    }
}

/// SDM 4.6 / KVM `permission_fault()`: the same rule as the 4-level
/// walker's.
fn check(
    p: &ModePaging,
    access: AccessKind,
    a: EffectiveAccess,
    level: u8,
) -> Result<(), WalkError> {
    let x = &p.x86;
    let denied = (access.user && !a.user)
        || (access.write && !a.write && (access.user || x.cr0_wp))
        || (access.fetch && !a.exec)
        || (access.fetch && !access.user && x.smep && a.user);
    if denied {
        return Err(WalkError::Protection {
            level,
            access,
            allowed: a,
        });
    }
    Ok(())
}

fn accumulate(a: &mut EffectiveAccess, pte: u64, nx: bool) {
    a.write &= pte & x86::RW != 0;
    a.user &= pte & x86::US != 0;
    if nx {
        a.exec &= pte & x86::NX == 0;
    }
}

/// A 4-byte entry: the half of the aligned 8-byte word it lies in.
fn read_u32(mem: &dyn GuestPhysMem, gpa: u64) -> Result<u64, WalkError> {
    let word = mem.read_u64(gpa & !7)?;
    Ok(if gpa & 4 != 0 {
        word >> 32
    } else {
        word & 0xffff_ffff
    })
}

/// SDM 4.3: CR3[31:12] -> PDE (gva 31:22) -> PTE (gva 21:12); a PDE with PS
/// and CR4.PSE maps 4 MiB (PSE-36 address bits 35:32 in PDE bits 16:13,
/// bits 21:17 reserved - KVM's `rsvd_bits(17, 21)` for a PSE-36 CPU).
/// No reserved bits otherwise, no XD.
fn walk32(
    mem: &dyn GuestPhysMem,
    p: &ModePaging,
    gva: u64,
    access: AccessKind,
) -> Result<ModeTranslation, WalkError> {
    let mut a = all_rights();
    let pd = p.x86.cr3 & 0xffff_f000;
    let pde = read_u32(mem, pd + ((gva >> 22) & 0x3ff) * 4)?;
    if pde & x86::P == 0 {
        return Err(WalkError::NotPresent { level: 2 });
    }
    accumulate(&mut a, pde, false);
    if p.pse && pde & x86::PS != 0 {
        if pde & bits(17, 21) != 0 {
            return Err(WalkError::Reserved { level: 2 });
        }
        let base = (pde & 0xffc0_0000) | (((pde >> 13) & 0xf) << 32);
        check(p, access, a, 2)?;
        return Ok(ModeTranslation {
            gpa: base | (gva & 0x3f_ffff),
            level: 2,
            page_bytes: 4 << 20,
            access: a,
        });
    }
    let pte = read_u32(mem, (pde & 0xffff_f000) + ((gva >> 12) & 0x3ff) * 4)?;
    if pte & x86::P == 0 {
        return Err(WalkError::NotPresent { level: 1 });
    }
    accumulate(&mut a, pte, false);
    check(p, access, a, 1)?;
    Ok(ModeTranslation {
        gpa: (pte & 0xffff_f000) | (gva & 0xfff),
        level: 1,
        page_bytes: 1 << PAGE_SHIFT,
        access: a,
    })
}

/// SDM 4.4: the PDPTE (gva 31:30) of the 32-byte table at CR3[31:5], then
/// the 8-byte PD and PT. KVM: `PT32E_ROOT_LEVEL`, `rsvd_bits_mask[0][2]`
/// for the PDPTE (63, 62:MAXPHYADDR, 8:5, 2:1), 62:MAXPHYADDR (and 63
/// without NXE) in the others.
fn walk_pae(
    mem: &dyn GuestPhysMem,
    p: &ModePaging,
    gva: u64,
    access: AccessKind,
) -> Result<ModeTranslation, WalkError> {
    let maxphy = p.x86.maxphyaddr;
    let high = above_maxphy(maxphy) | bits(52, 62);
    let pdpte = mem.read_u64((p.x86.cr3 & 0xffff_ffe0) + ((gva >> 30) & 3) * 8)?;
    if pdpte & x86::P == 0 {
        return Err(WalkError::NotPresent { level: 3 });
    }
    if pdpte & (x86::NX | high | bits(5, 8) | bits(1, 2)) != 0 {
        return Err(WalkError::Reserved { level: 3 });
    }
    walk_tables(mem, p, gva, access, pdpte & phys_addr_mask(maxphy), 2, high)
}

/// SDM 4.5: canonical `gva` (bits 63:47, or 63:56 with 5 levels, equal),
/// CR3 -> `levels` levels of 8-byte entries.
fn walk_long(
    mem: &dyn GuestPhysMem,
    p: &ModePaging,
    gva: u64,
    access: AccessKind,
    levels: u8,
) -> Result<ModeTranslation, WalkError> {
    let top = gva.cast_signed() >> (level_shift(levels) + 8);
    if top != 0 && top != -1 {
        return Err(WalkError::NonCanonical { addr: gva });
    }
    let x = &p.x86;
    if x.cr3 & above_maxphy(x.maxphyaddr) != 0 {
        return Err(WalkError::BadRoot { root: x.cr3 });
    }
    let high = above_maxphy(x.maxphyaddr);
    walk_tables(
        mem,
        p,
        gva,
        access,
        x.cr3 & phys_addr_mask(x.maxphyaddr),
        levels,
        high,
    )
}

/// The 8-byte-entry levels `top..=1` from `table`, with `high` reserved
/// in every entry (KVM: `rsvd_bits_mask` for PT64 and PT32E levels 2..5).
fn walk_tables(
    mem: &dyn GuestPhysMem,
    p: &ModePaging,
    gva: u64,
    access: AccessKind,
    mut table: u64,
    top: u8,
    high: u64,
) -> Result<ModeTranslation, WalkError> {
    let x = &p.x86;
    let addr_mask = phys_addr_mask(x.maxphyaddr);
    let mut a = all_rights();
    let mut level = top;
    loop {
        let index = (gva >> level_shift(level)) & 511;
        let pte = mem.read_u64(table + index * 8)?;
        if pte & x86::P == 0 {
            return Err(WalkError::NotPresent { level });
        }
        let large = matches!(level, 2 | 3) && pte & x86::PS != 0;
        let mut rsvd = high;
        if !x.efer_nx {
            rsvd |= x86::NX;
        }
        match (level, large) {
            (4 | 5, _) => rsvd |= x86::PS,
            (3, true) if !x.gbpages => rsvd |= x86::PS,
            (2 | 3, true) => rsvd |= bits(13, level_shift(level) - 1),
            _ => {}
        }
        if pte & rsvd != 0 {
            return Err(WalkError::Reserved { level });
        }
        accumulate(&mut a, pte, x.efer_nx);
        if level == 1 || large {
            let size = 1u64 << level_shift(level);
            check(p, access, a, level)?;
            return Ok(ModeTranslation {
                gpa: (pte & addr_mask & !(size - 1)) | (gva & (size - 1)),
                level,
                page_bytes: size,
                access: a,
            });
        }
        table = pte & addr_mask;
        level -= 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guest_walk::{walk_x86, SparseGuestMem};

    const RW: u64 = x86::P | x86::RW;
    const URW: u64 = x86::P | x86::RW | x86::US;

    fn paging(mode: X86Mode, cr3: u64) -> ModePaging {
        ModePaging {
            mode,
            x86: X86Paging::new(cr3),
            pse: true,
        }
    }

    /// 32-bit entries are stored in the halves of the 8-byte words.
    fn put32(mem: &SparseGuestMem, gpa: u64, v: u32) {
        let word = mem.read_u64(gpa & !7).unwrap();
        let v = u64::from(v);
        let new = if gpa & 4 != 0 {
            (word & 0xffff_ffff) | (v << 32)
        } else {
            (word & !0xffff_ffff) | v
        };
        mem.write_u64(gpa & !7, new).unwrap();
    }

    #[test]
    fn the_mode_follows_cr0_cr4_efer() {
        let m = X86Mode::from_regs;
        assert_eq!(m(0, CR4_PAE, EFER_LMA), X86Mode::NoPaging);
        assert_eq!(m(CR0_PG, 0, 0), X86Mode::Bits32);
        assert_eq!(m(CR0_PG, CR4_PAE, 0), X86Mode::Pae);
        assert_eq!(m(CR0_PG, CR4_PAE, EFER_LMA), X86Mode::Level4);
        assert_eq!(m(CR0_PG, CR4_PAE | CR4_LA57, EFER_LMA), X86Mode::Level5);
        let p = ModePaging::from_regs(CR0_PG | CR0_WP, 0x1000, CR4_PSE | CR4_SMEP, EFER_NXE);
        assert!(p.pse && p.x86.cr0_wp && p.x86.smep && p.x86.efer_nx);
    }

    #[test]
    fn no_paging_is_identity_on_32_bits() {
        let mem = SparseGuestMem::new(1 << 20);
        let p = paging(X86Mode::NoPaging, 0);
        let t = walk(&mem, &p, 0x1_0000_1234, AccessKind::WRITE).unwrap();
        assert_eq!((t.gpa, t.level), (0x1234, 0));
    }

    #[test]
    fn bits32_tables_and_4m_pages() {
        let mem = SparseGuestMem::new(1 << 20);
        // PD 0x1000: PDE 1 -> PT 0x2000, PTE 2 -> 0x5000; PDE 3: a 4 MiB
        // page at 0x1_0c00_0000 (PSE-36 bit 13 = address bit 32).
        put32(&mem, 0x1000 + 4, 0x2000 | 7);
        put32(&mem, 0x2000 + 2 * 4, 0x5000 | 7);
        put32(&mem, 0x1000 + 3 * 4, 0x0c00_0000 | (1 << 13) | 0x87);
        let p = paging(X86Mode::Bits32, 0x1000);
        let t = walk(&mem, &p, 0x0040_2123, AccessKind::READ).unwrap();
        assert_eq!((t.gpa, t.level, t.page_bytes), (0x5123, 1, 4096));
        let t = walk(&mem, &p, 0x00c1_2345, AccessKind::READ).unwrap();
        assert_eq!((t.gpa, t.level, t.page_bytes), (0x1_0c01_2345, 2, 4 << 20));
        // Without CR4.PSE the PS bit is ignored: the PDE points to a table.
        let p = ModePaging { pse: false, ..p };
        let t = walk(&mem, &p, 0x00c0_0000, AccessKind::READ);
        assert!(!matches!(t, Ok(ModeTranslation { level: 2, .. })));
        // PSE-36 reserved bits 21:17.
        put32(&mem, 0x1000 + 3 * 4, 0x0c00_0000 | (1 << 17) | 0x87);
        let p = ModePaging { pse: true, ..p };
        assert_eq!(
            walk(&mem, &p, 0x00c0_0000, AccessKind::READ),
            Err(WalkError::Reserved { level: 2 })
        );
        // The upper half of the address is dropped.
        let t = walk(&mem, &p, 0xffff_ffff_0040_2123, AccessKind::READ).unwrap();
        assert_eq!(t.gpa, 0x5123);
    }

    #[test]
    fn pae_starts_from_the_pdptes() {
        let mem = SparseGuestMem::new(1 << 20);
        // PDPT at 0x1020 (32-byte aligned): PDPTE 0 -> PD 0x3000 -> PT
        // 0x4000, PTE 5 -> 0x7000; PDPTE 1 -> PD 0x6000 with a 2 MiB page.
        mem.write_u64(0x1020, 0x3001).unwrap();
        mem.write_u64(0x1028, 0x6001).unwrap();
        mem.write_u64(0x3000, 0x4000 | 7).unwrap();
        mem.write_u64(0x4000 + 5 * 8, 0x7000 | 7 | x86::NX).unwrap();
        mem.write_u64(0x6000 + 8, 0x80_0000 | 0x87).unwrap();
        let p = paging(X86Mode::Pae, 0x1020);
        let t = walk(&mem, &p, 0x5abc, AccessKind::READ).unwrap();
        assert_eq!((t.gpa, t.level, t.access.exec), (0x7abc, 1, false));
        assert!(matches!(
            walk(&mem, &p, 0x5abc, AccessKind::FETCH),
            Err(WalkError::Protection { level: 1, .. })
        ));
        let t = walk(&mem, &p, 0x4020_0010, AccessKind::READ).unwrap();
        assert_eq!((t.gpa, t.level, t.page_bytes), (0x80_0010, 2, 2 << 20));
        // R/W in a PDPTE is reserved; so is XD without EFER.NXE.
        mem.write_u64(0x1020, 0x3003).unwrap();
        assert_eq!(
            walk(&mem, &p, 0x5abc, AccessKind::READ),
            Err(WalkError::Reserved { level: 3 })
        );
        mem.write_u64(0x1020, 0x3001).unwrap();
        let mut nonx = p;
        nonx.x86.efer_nx = false;
        assert_eq!(
            walk(&mem, &nonx, 0x5abc, AccessKind::READ),
            Err(WalkError::Reserved { level: 1 })
        );
        // Bits 62:52 are reserved in PAE entries (ignored in IA-32e ones).
        mem.write_u64(0x3000, 0x4000 | 7 | (1 << 60)).unwrap();
        assert_eq!(
            walk(&mem, &p, 0x5abc, AccessKind::READ),
            Err(WalkError::Reserved { level: 2 })
        );
    }

    #[test]
    fn five_levels_with_la57() {
        let mem = SparseGuestMem::new(1 << 20);
        // gva 0x0001_0000_0000_1000: PML5 index 1 -> 0x2000 -> 0x3000 ->
        // 0x4000 -> 0x5000, PTE 1 -> 0x9000.
        mem.write_u64(0x1000 + 8, 0x2000 | 7).unwrap();
        mem.write_u64(0x2000, 0x3000 | 7).unwrap();
        mem.write_u64(0x3000, 0x4000 | 7).unwrap();
        mem.write_u64(0x4000, 0x5000 | 7).unwrap();
        mem.write_u64(0x5000 + 8, 0x9000 | 7).unwrap();
        let p = paging(X86Mode::Level5, 0x1000);
        let t = walk(&mem, &p, 0x0001_0000_0000_1008, AccessKind::READ).unwrap();
        assert_eq!((t.gpa, t.level), (0x9008, 1));
        // Canonical at bit 56, not 47.
        assert_eq!(
            walk(&mem, &p, 1 << 56, AccessKind::READ),
            Err(WalkError::NonCanonical { addr: 1 << 56 })
        );
        let four = paging(X86Mode::Level4, 0x1000);
        assert!(matches!(
            walk(&mem, &four, 0x0001_0000_0000_1008, AccessKind::READ),
            Err(WalkError::NonCanonical { .. })
        ));
    }

    #[test]
    fn cpl3_needs_user_pages_and_write_rights() {
        let mem = SparseGuestMem::new(1 << 20);
        // 4-level: gva 0 -> supervisor page 0x8000, gva 0x1000 -> a user
        // read-only page 0x9000.
        mem.write_u64(0x1000, 0x2000 | URW).unwrap();
        mem.write_u64(0x2000, 0x3000 | URW).unwrap();
        mem.write_u64(0x3000, 0x4000 | URW).unwrap();
        mem.write_u64(0x4000, 0x8000 | RW).unwrap();
        mem.write_u64(0x4008, 0x9000 | x86::P | x86::US).unwrap();
        let mut p = paging(X86Mode::Level4, 0x1000);
        let user = |write| AccessKind {
            write,
            user: true,
            fetch: false,
        };
        assert!(walk(&mem, &p, 0x10, AccessKind::READ).is_ok());
        assert!(matches!(
            walk(&mem, &p, 0x10, user(false)),
            Err(WalkError::Protection { .. })
        ));
        assert_eq!(walk(&mem, &p, 0x1010, user(false)).unwrap().gpa, 0x9010);
        assert!(matches!(
            walk(&mem, &p, 0x1010, user(true)),
            Err(WalkError::Protection { .. })
        ));
        // A supervisor write to a read-only page faults only with CR0.WP.
        assert!(walk(&mem, &p, 0x1010, AccessKind::WRITE).is_err());
        p.x86.cr0_wp = false;
        assert!(walk(&mem, &p, 0x1010, AccessKind::WRITE).is_ok());
        assert!(walk(&mem, &p, 0x1010, user(true)).is_err());
    }

    #[test]
    fn four_levels_agree_with_the_shadow_walker() {
        let mem = SparseGuestMem::new(4 << 20);
        mem.write_u64(0x1000 + 256 * 8, 0x2003).unwrap();
        mem.write_u64(0x2000, 0x3003).unwrap();
        mem.write_u64(0x3000 + 8, 0x20_0083).unwrap();
        let p = paging(X86Mode::Level4, 0x1000);
        for gva in [
            0xffff_8000_0020_1234u64,
            0xffff_8000_0040_0000,
            0x10,
            1 << 47,
        ] {
            for access in [AccessKind::READ, AccessKind::WRITE, AccessKind::FETCH] {
                let a = walk(&mem, &p, gva, access).map(|t| (t.gpa, t.level, t.access));
                let b = walk_x86(&mem, &p.x86, gva, access, false)
                    .map(|t| (t.gpa, t.leaf_level(), t.access));
                assert_eq!(a, b, "{gva:#x} {access:?}");
            }
        }
    }
}
