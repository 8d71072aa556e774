//! Guest page-table walkers over untrusted guest-physical memory
//! (KVM: `arch/x86/kvm/mmu/paging_tmpl.h`, `FNAME(walk_addr_generic)`).
//!
//! Two formats:
//! - [`walk_x86`]: x86-64 4-level paging (CR3 -> PML4 -> PDPT -> PD -> PT),
//!   1 GiB / 2 MiB guest pages, U/S, R/W, NX, reserved bits, CR0.WP, SMEP,
//!   Accessed/Dirty updates. Used by the shadow MMU (the guest's own tables).
//! - [`walk_ept`]: Intel EPT 4-level format (R/W/X, memtype, IPAT, large
//!   pages, EPT A/D). Used by nested TDP (an L1 hypervisor's tables for L2).
//!
//! Guest page tables are untrusted, racy memory: every entry is read exactly
//! once into a local, the walk is bounded by the 4 levels (a table that points
//! at itself just costs four reads), every read goes through [`GuestPhysMem`]
//! which refuses anything outside guest RAM, and every failure is a typed
//! [`WalkError`]. A/D updates use compare-exchange against the value read; if
//! the guest changed the entry meanwhile the whole walk restarts, at most
//! [`MAX_WALK_RETRIES`] times (KVM's `retry_walk`).

use notifier::PageSize;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};

pub const PAGE_SHIFT: u32 = 12;
pub const PAGE_SIZE: u64 = 1 << PAGE_SHIFT;
/// Levels of a 4-level walk; level 1 maps 4 KiB.
pub const ROOT_LEVEL: u8 = 4;
/// A/D compare-exchange races tolerated before the walk gives up.
pub const MAX_WALK_RETRIES: u32 = 8;

/// Errors of guest-physical memory accesses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MemError {
    #[error("guest physical address {gpa:#x} is outside guest RAM")]
    OutsideRam { gpa: u64 },
    #[error("guest physical address {gpa:#x} is not 8-byte aligned")]
    Misaligned { gpa: u64 },
}

/// Guest RAM as seen by a page-table walker: bounds-checked 64-bit accesses.
pub trait GuestPhysMem {
    /// Read the 8 bytes at `gpa` (8-byte aligned) once.
    fn read_u64(&self, gpa: u64) -> Result<u64, MemError>;
    /// Atomically replace `old` with `new` at `gpa`; `Ok(false)` if the
    /// value was not `old` any more.
    fn cmpxchg_u64(&self, gpa: u64, old: u64, new: u64) -> Result<bool, MemError>;
}

/// Sparse guest RAM: `size` bytes, only written pages are stored (zero
/// elsewhere). Thread-safe; the model plane and the tests use it for guest
/// RAM far larger than the machine (a 4 TiB L1 with a few MiB of tables).
#[derive(Debug, Default)]
pub struct SparseGuestMem {
    size: u64,
    pages: parking_lot::RwLock<HashMap<u64, Box<[AtomicU64]>>>,
}

impl SparseGuestMem {
    pub fn new(size: u64) -> Self {
        Self {
            size,
            pages: Default::default(),
        }
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    fn check(&self, gpa: u64) -> Result<(), MemError> {
        if !gpa.is_multiple_of(8) {
            return Err(MemError::Misaligned { gpa });
        }
        if gpa.checked_add(8).is_none_or(|end| end > self.size) {
            return Err(MemError::OutsideRam { gpa });
        }
        Ok(())
    }

    /// Store a u64 (host side: the generator or a test writing guest RAM).
    pub fn write_u64(&self, gpa: u64, val: u64) -> Result<(), MemError> {
        self.check(gpa)?;
        let gfn = gpa >> PAGE_SHIFT;
        let idx = ((gpa & (PAGE_SIZE - 1)) / 8) as usize;
        if let Some(p) = self.pages.read().get(&gfn) {
            p[idx].store(val, Ordering::SeqCst);
            return Ok(());
        }
        let mut w = self.pages.write();
        let p = w
            .entry(gfn)
            .or_insert_with(|| (0..512).map(|_| AtomicU64::new(0)).collect());
        p[idx].store(val, Ordering::SeqCst);
        Ok(())
    }

    /// Pages actually stored.
    pub fn stored_pages(&self) -> usize {
        self.pages.read().len()
    }
}

impl GuestPhysMem for SparseGuestMem {
    fn read_u64(&self, gpa: u64) -> Result<u64, MemError> {
        self.check(gpa)?;
        let idx = ((gpa & (PAGE_SIZE - 1)) / 8) as usize;
        Ok(self
            .pages
            .read()
            .get(&(gpa >> PAGE_SHIFT))
            .map_or(0, |p| p[idx].load(Ordering::SeqCst)))
    }

    fn cmpxchg_u64(&self, gpa: u64, old: u64, new: u64) -> Result<bool, MemError> {
        self.check(gpa)?;
        let idx = ((gpa & (PAGE_SIZE - 1)) / 8) as usize;
        if let Some(p) = self.pages.read().get(&(gpa >> PAGE_SHIFT)) {
            return Ok(p[idx]
                .compare_exchange(old, new, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok());
        }
        if old != 0 {
            return Ok(false);
        }
        let mut w = self.pages.write();
        let p = w
            .entry(gpa >> PAGE_SHIFT)
            .or_insert_with(|| (0..512).map(|_| AtomicU64::new(0)).collect());
        Ok(p[idx]
            .compare_exchange(old, new, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok())
    }
}

/// The kind of access that caused the walk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct AccessKind {
    pub write: bool,
    /// CPL 3 (x86 walks only).
    pub user: bool,
    /// Instruction fetch.
    pub fetch: bool,
}

impl AccessKind {
    pub const READ: Self = Self {
        write: false,
        user: false,
        fetch: false,
    };
    pub const WRITE: Self = Self {
        write: true,
        user: false,
        fetch: false,
    };
    pub const FETCH: Self = Self {
        write: false,
        user: false,
        fetch: true,
    };
}

/// Effective permissions of a translation (AND over the levels; NX is OR).
/// For x86: `read` is always true, `user` is U/S. For EPT: R/W/X, `user`
/// is unused (false).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct EffectiveAccess {
    pub read: bool,
    pub write: bool,
    pub exec: bool,
    pub user: bool,
}

/// Address bits translated below `level` (12, 21, 30, 39).
pub const fn level_shift(level: u8) -> u32 {
    PAGE_SHIFT + 9 * (level as u32 - 1)
}

fn level_index(addr: u64, level: u8) -> u64 {
    (addr >> level_shift(level)) & 511
}

/// A completed walk: where it led and what it read on the way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Translation {
    /// Guest physical address of the accessed byte.
    pub gpa: u64,
    pub page_size: PageSize,
    pub access: EffectiveAccess,
    /// Dirty bit of the leaf after the walk (x86 D / EPT D).
    pub dirty: bool,
    /// EPT leaf memory type (bits 5:3) and IPAT; 0/false for x86.
    pub memtype: u8,
    pub ipat: bool,
    /// `table_gfn[level-1]`: gfn of the guest table read at `level`
    /// (the shadow MMU write-protects these). Levels below the leaf are 0.
    pub table_gfn: [u64; 4],
    /// `pte[level-1]`: the entry read at `level` (each read once).
    pub pte: [u64; 4],
}

impl Translation {
    pub fn leaf_level(&self) -> u8 {
        self.page_size.level()
    }

    pub fn gfn(&self) -> u64 {
        self.gpa >> PAGE_SHIFT
    }
}

/// Walk failures. `level` is the level of the entry that failed (4 = root).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WalkError {
    #[error("address {addr:#x} is not canonical")]
    NonCanonical { addr: u64 },
    #[error("root table address {root:#x} has reserved bits set")]
    BadRoot { root: u64 },
    #[error("entry not present at level {level}")]
    NotPresent { level: u8 },
    #[error("reserved bits set (or EPT misconfiguration) at level {level}")]
    Reserved { level: u8 },
    #[error("page-table read at {gpa:#x} is outside guest RAM")]
    OutsideRam { gpa: u64 },
    #[error("protection violation at leaf level {level}: {access:?} not allowed by {allowed:?}")]
    Protection {
        level: u8,
        access: AccessKind,
        allowed: EffectiveAccess,
    },
    #[error(
        "guest kept changing its page tables during the walk (A/D update raced {retries} times)"
    )]
    Raced { retries: u32 },
}

impl From<MemError> for WalkError {
    fn from(e: MemError) -> Self {
        match e {
            MemError::OutsideRam { gpa } | MemError::Misaligned { gpa } => {
                WalkError::OutsideRam { gpa }
            }
        }
    }
}

/// Mask of bits `lo..=hi`.
pub const fn bits(lo: u32, hi: u32) -> u64 {
    (u64::MAX >> (63 - hi)) & !((1u64 << lo) - 1)
}

/// Physical-address bits of a table/page pointer, given MAXPHYADDR.
fn phys_addr_mask(maxphyaddr: u8) -> u64 {
    bits(PAGE_SHIFT, maxphyaddr.clamp(32, 52) as u32 - 1)
}

/// Bits 51:MAXPHYADDR, reserved in every entry of both formats.
fn above_maxphy(maxphyaddr: u8) -> u64 {
    let m = maxphyaddr.clamp(32, 52) as u32;
    if m >= 52 {
        0
    } else {
        bits(m, 51)
    }
}

/// Low address bits that must be zero in a large-page leaf at `level`
/// (bits 20:13 for 2 MiB, 29:13 for 1 GiB; bit 12 is PAT in x86, reserved
/// in EPT - the callers add it).
fn large_page_rsvd(level: u8) -> u64 {
    bits(13, level_shift(level) - 1)
}

// ---------------------------------------------------------------- x86-64 ---

pub mod x86 {
    //! x86 page-table entry bits (`PT_*_MASK`).
    pub const P: u64 = 1 << 0;
    pub const RW: u64 = 1 << 1;
    pub const US: u64 = 1 << 2;
    pub const A: u64 = 1 << 5;
    pub const D: u64 = 1 << 6;
    pub const PS: u64 = 1 << 7;
    /// PAT bit of a large-page leaf.
    pub const PAT_LARGE: u64 = 1 << 12;
    pub const NX: u64 = 1 << 63;
}

/// Paging mode state a walk depends on (CR0.WP, CR4.SMEP, EFER.NX, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct X86Paging {
    pub cr3: u64,
    pub cr0_wp: bool,
    pub efer_nx: bool,
    pub smep: bool,
    /// 1 GiB pages supported (CPUID PDPE1GB); without it PS in a PDPTE is
    /// reserved.
    pub gbpages: bool,
    pub maxphyaddr: u8,
}

impl X86Paging {
    pub fn new(cr3: u64) -> Self {
        Self {
            cr3,
            cr0_wp: true,
            efer_nx: true,
            smep: false,
            gbpages: true,
            maxphyaddr: 52,
        }
    }

    /// Reserved bits of an entry at `level`, given whether it is a leaf
    /// (KVM: `rsvd_bits_mask` of `__reset_rsvds_bits_mask`).
    pub fn rsvd_mask(&self, level: u8, large: bool) -> u64 {
        let mut m = above_maxphy(self.maxphyaddr);
        if !self.efer_nx {
            m |= x86::NX;
        }
        match (level, large) {
            (4, _) => m |= x86::PS,
            (3, true) if !self.gbpages => m |= x86::PS,
            (3 | 2, true) => m |= large_page_rsvd(level),
            _ => {}
        }
        m
    }
}

/// Walk the x86-64 4-level tables for `gva`. With `set_ad`, set Accessed in
/// every entry used and Dirty in the leaf for a write, after the permission
/// check passed (as the CPU does).
pub fn walk_x86(
    mem: &dyn GuestPhysMem,
    paging: &X86Paging,
    gva: u64,
    access: AccessKind,
    set_ad: bool,
) -> Result<Translation, WalkError> {
    // Canonical: bits 63:47 all equal (an arithmetic shift of the address
    // read as two's complement).
    let top = gva.cast_signed() >> 47;
    if top != 0 && top != -1 {
        return Err(WalkError::NonCanonical { addr: gva });
    }
    if paging.cr3 & above_maxphy(paging.maxphyaddr) != 0 {
        return Err(WalkError::BadRoot { root: paging.cr3 });
    }
    walk(mem, paging, gva, access, set_ad)
}

impl PageFormat for X86Paging {
    const PS: u64 = x86::PS;
    fn root_and_maxphyaddr(&self) -> (u64, u8) {
        (self.cr3, self.maxphyaddr)
    }
    fn start_access(&self) -> EffectiveAccess {
        EffectiveAccess {
            read: true,
            write: true,
            exec: true,
            user: true,
        }
    }
    fn present(&self, pte: u64) -> bool {
        pte & x86::P != 0
    }
    fn invalid(&self, level: u8, pte: u64, large: bool) -> bool {
        pte & self.rsvd_mask(level, large) != 0
    }
    fn accumulate(&self, a: &mut EffectiveAccess, pte: u64) {
        a.write &= pte & x86::RW != 0;
        a.user &= pte & x86::US != 0;
        if self.efer_nx {
            a.exec &= pte & x86::NX == 0;
        }
    }
    /// KVM: `permission_fault` / `update_permission_bitmask`.
    fn denied(&self, access: AccessKind, a: EffectiveAccess) -> bool {
        (access.user && !a.user)
            || (access.write && !a.write && (access.user || self.cr0_wp))
            || (access.fetch && !a.exec)
            || (access.fetch && !access.user && self.smep && a.user)
    }
    fn ad_bits(&self) -> Option<(u64, u64)> {
        Some((x86::A, x86::D))
    }
    fn leaf_attrs(&self, t: &mut Translation, leaf: u64) {
        t.dirty = leaf & x86::D != 0;
    }
}

/// What differs between guest page-table formats; [`walk`] does the rest.
trait PageFormat {
    /// Page-size bit of an entry.
    const PS: u64;
    /// CR3 / EPTP and MAXPHYADDR.
    fn root_and_maxphyaddr(&self) -> (u64, u8);
    /// Effective access before the first entry.
    fn start_access(&self) -> EffectiveAccess;
    fn present(&self, pte: u64) -> bool;
    /// Reserved bits set or a misconfiguration.
    fn invalid(&self, level: u8, pte: u64, large: bool) -> bool;
    fn accumulate(&self, a: &mut EffectiveAccess, pte: u64);
    fn denied(&self, access: AccessKind, allowed: EffectiveAccess) -> bool;
    /// (Accessed, Dirty) bits to set, if the format has them enabled.
    fn ad_bits(&self) -> Option<(u64, u64)>;
    /// Memtype, IPAT, dirty of the leaf.
    fn leaf_attrs(&self, t: &mut Translation, leaf: u64);
}

/// The 4-level walk both formats share: each entry read once, at most four
/// reads per attempt, A/D by compare-exchange with bounded restarts.
fn walk<F: PageFormat>(
    mem: &dyn GuestPhysMem,
    f: &F,
    addr: u64,
    access: AccessKind,
    set_ad: bool,
) -> Result<Translation, WalkError> {
    let (root, maxphyaddr) = f.root_and_maxphyaddr();
    let addr_mask = phys_addr_mask(maxphyaddr);
    for _ in 0..=MAX_WALK_RETRIES {
        let mut t = Translation {
            gpa: 0,
            page_size: PageSize::Size4K,
            access: f.start_access(),
            dirty: false,
            memtype: 0,
            ipat: false,
            table_gfn: [0; 4],
            pte: [0; 4],
        };
        let mut table = root & addr_mask;
        let mut level = ROOT_LEVEL;
        let leaf_level = loop {
            let pte = mem.read_u64(table + level_index(addr, level) * 8)?;
            t.table_gfn[level as usize - 1] = table >> PAGE_SHIFT;
            t.pte[level as usize - 1] = pte;
            if !f.present(pte) {
                return Err(WalkError::NotPresent { level });
            }
            let large = level > 1 && pte & F::PS != 0;
            if f.invalid(level, pte, large) {
                return Err(WalkError::Reserved { level });
            }
            f.accumulate(&mut t.access, pte);
            if level == 1 || large {
                break level;
            }
            table = pte & addr_mask;
            level -= 1;
        };
        let leaf = t.pte[leaf_level as usize - 1];
        let size = PageSize::from_level(leaf_level).unwrap_or(PageSize::Size4K);
        t.page_size = size;
        t.gpa = (leaf & addr_mask & !(size.bytes() - 1)) | (addr & (size.bytes() - 1));
        f.leaf_attrs(&mut t, leaf);
        if f.denied(access, t.access) {
            return Err(WalkError::Protection {
                level: leaf_level,
                access,
                allowed: t.access,
            });
        }
        let Some((a_bit, d_bit)) = f.ad_bits().filter(|_| set_ad) else {
            return Ok(t);
        };
        if update_ad(mem, &mut t, addr, leaf_level, a_bit, d_bit, access.write)? {
            return Ok(t);
        }
    }
    Err(WalkError::Raced {
        retries: MAX_WALK_RETRIES,
    })
}

/// Set `a_bit` in every entry from the root to the leaf and `d_bit` in the
/// leaf if `write`, each by compare-exchange against the value the walk
/// read. `Ok(false)`: the guest changed an entry, restart the walk.
fn update_ad(
    mem: &dyn GuestPhysMem,
    t: &mut Translation,
    addr: u64,
    leaf_level: u8,
    a_bit: u64,
    d_bit: u64,
    write: bool,
) -> Result<bool, WalkError> {
    for level in (leaf_level..=ROOT_LEVEL).rev() {
        let i = level as usize - 1;
        let old = t.pte[i];
        let mut new = old | a_bit;
        if level == leaf_level && write {
            new |= d_bit;
        }
        if new == old {
            continue;
        }
        let pte_gpa = (t.table_gfn[i] << PAGE_SHIFT) + level_index(addr, level) * 8;
        if !mem.cmpxchg_u64(pte_gpa, old, new)? {
            return Ok(false);
        }
        t.pte[i] = new;
        if level == leaf_level {
            t.dirty = new & d_bit != 0;
        }
    }
    Ok(true)
}

// ------------------------------------------------------------------- EPT ---

pub mod ept {
    //! EPT entry bits (`VMX_EPT_*`).
    pub const R: u64 = 1 << 0;
    pub const W: u64 = 1 << 1;
    pub const X: u64 = 1 << 2;
    pub const RWX: u64 = R | W | X;
    pub const MT_SHIFT: u32 = 3;
    pub const MT_MASK: u64 = 7 << MT_SHIFT;
    pub const IPAT: u64 = 1 << 6;
    pub const PS: u64 = 1 << 7;
    pub const A: u64 = 1 << 8;
    pub const D: u64 = 1 << 9;
    /// EPTP: walk length - 1 in bits 5:3, A/D enable in bit 6.
    pub const EPTP_PWL_SHIFT: u32 = 3;
    pub const EPTP_AD: u64 = 1 << 6;
    pub const MT_UC: u8 = 0;
    pub const MT_WB: u8 = 6;
}

/// An L1 hypervisor's EPT configuration for its L2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EptPaging {
    pub eptp: u64,
    /// Execute-only translations allowed (IA32_VMX_EPT_VPID_CAP bit 0).
    pub exec_only: bool,
    pub gbpages: bool,
    pub maxphyaddr: u8,
}

impl EptPaging {
    /// A 4-level, write-back EPTP for the table at `root_gpa`.
    pub fn new(root_gpa: u64, ad: bool) -> Self {
        let eptp = (root_gpa & !(PAGE_SIZE - 1))
            | ept::MT_WB as u64
            | (3 << ept::EPTP_PWL_SHIFT)
            | if ad { ept::EPTP_AD } else { 0 };
        Self {
            eptp,
            exec_only: true,
            gbpages: true,
            maxphyaddr: 52,
        }
    }

    pub fn ad_enabled(&self) -> bool {
        self.eptp & ept::EPTP_AD != 0
    }

    /// Reserved bits of an entry (misconfiguration if set).
    pub fn rsvd_mask(&self, level: u8, large: bool) -> u64 {
        let mut m = above_maxphy(self.maxphyaddr);
        match (level, large) {
            // Non-leaf: memtype/IPAT bits 6:3 reserved, PS reserved at 4.
            (4, _) => m |= bits(3, 7),
            (3, true) if !self.gbpages => m |= ept::PS,
            (3 | 2, true) => m |= large_page_rsvd(level) | (1 << 12),
            (1, _) => {}
            _ => m |= bits(3, 6),
        }
        m
    }

    /// EPT misconfiguration by permission bits or memtype.
    fn misconfigured(&self, pte: u64, leaf: bool) -> bool {
        let (r, w, x) = (pte & ept::R != 0, pte & ept::W != 0, pte & ept::X != 0);
        if w && !r {
            return true;
        }
        if x && !r && !w && !self.exec_only {
            return true;
        }
        leaf && matches!((pte & ept::MT_MASK) >> ept::MT_SHIFT, 2 | 3 | 7)
    }
}

/// Walk an EPT (L1's tables for its L2) for the L2 guest-physical `l2_gpa`.
/// `access.user` is ignored. With `set_ad` and EPTP A/D enabled, sets A in
/// every entry and D in the leaf for a write.
pub fn walk_ept(
    mem: &dyn GuestPhysMem,
    paging: &EptPaging,
    l2_gpa: u64,
    access: AccessKind,
    set_ad: bool,
) -> Result<Translation, WalkError> {
    let pwl = (paging.eptp >> ept::EPTP_PWL_SHIFT) & 7;
    let root_rsvd = above_maxphy(paging.maxphyaddr) | bits(7, 11);
    if pwl != 3 || paging.eptp & root_rsvd != 0 {
        return Err(WalkError::BadRoot { root: paging.eptp });
    }
    if l2_gpa >> 48 != 0 {
        return Err(WalkError::NonCanonical { addr: l2_gpa });
    }
    walk(mem, paging, l2_gpa, access, set_ad)
}

impl PageFormat for EptPaging {
    const PS: u64 = ept::PS;
    fn root_and_maxphyaddr(&self) -> (u64, u8) {
        (self.eptp, self.maxphyaddr)
    }
    fn start_access(&self) -> EffectiveAccess {
        EffectiveAccess {
            read: true,
            write: true,
            exec: true,
            user: false,
        }
    }
    fn present(&self, pte: u64) -> bool {
        pte & ept::RWX != 0
    }
    fn invalid(&self, level: u8, pte: u64, large: bool) -> bool {
        pte & self.rsvd_mask(level, large) != 0 || self.misconfigured(pte, level == 1 || large)
    }
    fn accumulate(&self, a: &mut EffectiveAccess, pte: u64) {
        a.read &= pte & ept::R != 0;
        a.write &= pte & ept::W != 0;
        a.exec &= pte & ept::X != 0;
    }
    /// EPT violation: the access kind's permission is missing.
    fn denied(&self, access: AccessKind, a: EffectiveAccess) -> bool {
        (access.fetch && !a.exec)
            || (access.write && !a.write)
            || (!access.fetch && !access.write && !a.read)
    }
    fn ad_bits(&self) -> Option<(u64, u64)> {
        self.ad_enabled().then_some((ept::A, ept::D))
    }
    fn leaf_attrs(&self, t: &mut Translation, leaf: u64) {
        t.memtype = ((leaf & ept::MT_MASK) >> ept::MT_SHIFT) as u8;
        t.ipat = leaf & ept::IPAT != 0;
        t.dirty = leaf & ept::D != 0;
    }
}

pub mod modes;

#[cfg(test)]
mod tests;
