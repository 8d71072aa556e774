//! The SPTE: one `u64` per entry of a secondary page table, with KVM's
//! concepts (`arch/x86/kvm/mmu/spte.h`) and our own software bit positions
//! (KVM's move between kernel versions too; only the concepts are stable).
//!
//! | bits   | meaning |
//! |--------|---------|
//! | 0      | R: readable, the hardware "present" bit (EPT R) |
//! | 1      | W: writable (hardware) |
//! | 2      | X: executable |
//! | 3..=5  | memtype (EPT MT) |
//! | 7      | large page (2 MiB / 1 GiB leaf) |
//! | 8 / 9  | accessed / dirty |
//! | 10     | user: the guest granted user-mode access (shadow paging's U/S; EPT's user-mode execute position) |
//! | 11     | MMU-present (software): every leaf and non-leaf SPTE |
//! | 12..=51| pfn (leaf), table address >> 12 (TDP non-leaf), shadow page id (shadow non-leaf), gfn (MMIO) |
//! | 57 / 58| host-writable / MMU-writable (software) |
//!
//! Non-present is `0`. An MMIO SPTE is not MMU-present: W|X without R (an
//! EPT misconfiguration), the gfn in the pfn field and a memslot generation
//! in bits 3..=10.
//!
//! Writability: only the four legal (HostW, MMUW, W) states of KVM's
//! `is_writable_pte()` comment are constructible, through [`Writability`].

use notifier::PageSize;
use thiserror::Error;

pub const SPTE_R: u64 = 1 << 0;
pub const SPTE_W: u64 = 1 << 1;
pub const SPTE_X: u64 = 1 << 2;
pub const SPTE_MEMTYPE_SHIFT: u32 = 3;
pub const SPTE_MEMTYPE_MASK: u64 = 0b111 << SPTE_MEMTYPE_SHIFT;
pub const SPTE_LARGE: u64 = 1 << 7;
pub const SPTE_ACCESSED: u64 = 1 << 8;
pub const SPTE_DIRTY: u64 = 1 << 9;
/// `ACC_USER_MASK` in a leaf: the guest's tables grant user-mode access.
pub const SPTE_USER: u64 = 1 << 10;
/// `SPTE_MMU_PRESENT_MASK`.
pub const SPTE_MMU_PRESENT: u64 = 1 << 11;
pub const SPTE_PFN_SHIFT: u32 = 12;
/// `SPTE_BASE_ADDR_MASK`: bits 51:12.
pub const SPTE_PFN_MASK: u64 = ((1 << 52) - 1) & !((1 << 12) - 1);
pub const SPTE_HOST_WRITABLE: u64 = 1 << 57;
pub const SPTE_MMU_WRITABLE: u64 = 1 << 58;
/// `SHADOW_NONPRESENT_VALUE` (ours: zero, so fresh tables are all
/// non-present).
pub const SPTE_NONPRESENT: u64 = 0;
/// RWX: what distinguishes MMIO from other non-MMU-present values.
pub const SPTE_MMIO_MASK: u64 = SPTE_R | SPTE_W | SPTE_X;
/// W|X without R: `VMX_EPT_MISCONFIG_WX_VALUE`.
pub const SPTE_MMIO_VALUE: u64 = SPTE_W | SPTE_X;
pub const SPTE_MMIO_GEN_SHIFT: u32 = 3;
pub const SPTE_MMIO_GEN_BITS: u32 = 8;
pub const SPTE_MMIO_GEN_MASK: u64 = ((1 << SPTE_MMIO_GEN_BITS) - 1) << SPTE_MMIO_GEN_SHIFT;
/// Largest pfn (40 bits, MAXPHYADDR 52).
pub const PFN_MAX: u64 = SPTE_PFN_MASK >> SPTE_PFN_SHIFT;

/// The four legal (HostW, MMUW, W) states (spte.h, above `is_writable_pte`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum Writability {
    /// (1, 1, 1): writable.
    Writable,
    /// (1, 1, 0): write-protected for dirty logging / access tracking; the
    /// fast path may make it writable again without `mmu_lock`.
    WriteProtected,
    /// (1, 0, 0): write-protected because the MMU shadows a guest page table
    /// at this gfn; only `mmu_lock` holders may change it.
    ShadowWriteProtected,
    /// (0, 0, 0): read-only memslot or host VMA.
    ReadOnly,
}

impl Writability {
    pub const ALL: [Writability; 4] = [
        Writability::Writable,
        Writability::WriteProtected,
        Writability::ShadowWriteProtected,
        Writability::ReadOnly,
    ];

    fn bits(self) -> u64 {
        match self {
            Self::Writable => SPTE_HOST_WRITABLE | SPTE_MMU_WRITABLE | SPTE_W,
            Self::WriteProtected => SPTE_HOST_WRITABLE | SPTE_MMU_WRITABLE,
            Self::ShadowWriteProtected => SPTE_HOST_WRITABLE,
            Self::ReadOnly => 0,
        }
    }

    fn from_bits(raw: u64) -> Option<Self> {
        let bits = raw & (SPTE_HOST_WRITABLE | SPTE_MMU_WRITABLE | SPTE_W);
        Self::ALL.into_iter().find(|w| w.bits() == bits)
    }
}

/// EPT memory types (`MTRR_TYPE_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum MemType {
    Uc = 0,
    Wc = 1,
    Wt = 4,
    Wp = 5,
    Wb = 6,
}

impl MemType {
    pub const ALL: [MemType; 5] = [
        MemType::Uc,
        MemType::Wc,
        MemType::Wt,
        MemType::Wp,
        MemType::Wb,
    ];

    fn from_bits(v: u64) -> Option<Self> {
        Self::ALL.into_iter().find(|m| *m as u64 == v)
    }
}

/// Attributes of a leaf SPTE.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LeafAttrs {
    pub writability: Writability,
    pub exec: bool,
    pub memtype: MemType,
    pub accessed: bool,
    pub dirty: bool,
    /// User-mode access (shadow paging; TDP leaves always grant it).
    pub user: bool,
}

impl Default for LeafAttrs {
    fn default() -> Self {
        Self {
            writability: Writability::Writable,
            exec: true,
            memtype: MemType::Wb,
            accessed: true,
            dirty: false,
            user: true,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum SpteError {
    #[error("pfn {pfn:#x} does not fit in the SPTE (max {PFN_MAX:#x})")]
    PfnTooLarge { pfn: u64 },
    #[error("pfn {pfn:#x} is not aligned to a {level:?} leaf")]
    PfnMisaligned { pfn: u64, level: PageSize },
    #[error("table address {addr:#x} is not a 4 KiB aligned address the SPTE can hold")]
    BadTableAddress { addr: u64 },
    #[error("SPTE {raw:#x}: illegal (HostW, MMUW, W) combination")]
    IllegalWritability { raw: u64 },
    #[error("SPTE {raw:#x}: not MMU-present, not MMIO and not the non-present value")]
    IllegalNonPresent { raw: u64 },
    #[error("SPTE {raw:#x}: reserved memtype")]
    IllegalMemType { raw: u64 },
    #[error("MMIO generation {gen} does not fit in {SPTE_MMIO_GEN_BITS} bits")]
    MmioGenTooLarge { gen: u64 },
}

/// What every non-leaf SPTE grants: all access, left to the leaves to
/// restrict.
const NON_LEAF_BITS: u64 = SPTE_MMU_PRESENT
    | SPTE_R
    | SPTE_W
    | SPTE_X
    | SPTE_ACCESSED
    | SPTE_HOST_WRITABLE
    | SPTE_MMU_WRITABLE;

/// One SPTE. `Copy`, compared and stored as its raw `u64`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
#[repr(transparent)]
pub struct Spte(u64);

impl std::fmt::Debug for Spte {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if !self.is_mmu_present() {
            if self.is_mmio() {
                return write!(
                    f,
                    "Spte(mmio gfn={:#x} gen={})",
                    self.mmio_gfn(),
                    self.mmio_gen()
                );
            }
            return write!(f, "Spte(non-present {:#x})", self.0);
        }
        write!(
            f,
            "Spte({:#x} pfn={:#x} {:?}{}{}{})",
            self.0,
            self.pfn(),
            self.writability(),
            if self.is_large() { " large" } else { "" },
            if self.is_accessed() { " A" } else { "" },
            if self.is_dirty() { " D" } else { "" },
        )
    }
}

impl Spte {
    pub const NONPRESENT: Spte = Spte(SPTE_NONPRESENT);

    /// Validate a raw value (e.g. one read back from a table).
    pub fn try_from_raw(raw: u64) -> Result<Self, SpteError> {
        if raw & SPTE_MMU_PRESENT == 0 {
            return if raw == SPTE_NONPRESENT || raw & SPTE_MMIO_MASK == SPTE_MMIO_VALUE {
                Ok(Spte(raw))
            } else {
                Err(SpteError::IllegalNonPresent { raw })
            };
        }
        if Writability::from_bits(raw).is_none() {
            return Err(SpteError::IllegalWritability { raw });
        }
        if MemType::from_bits((raw & SPTE_MEMTYPE_MASK) >> SPTE_MEMTYPE_SHIFT).is_none() {
            return Err(SpteError::IllegalMemType { raw });
        }
        Ok(Spte(raw))
    }

    /// Trusted raw value: one this module produced (stored in our tables).
    #[inline]
    pub(crate) const fn from_raw_unchecked(raw: u64) -> Self {
        Spte(raw)
    }

    #[inline]
    pub const fn raw(self) -> u64 {
        self.0
    }

    /// `make_spte` for a leaf at `level` mapping `pfn` (the first pfn of the
    /// huge page for 2M/1G leaves).
    pub fn leaf(pfn: u64, level: PageSize, attrs: LeafAttrs) -> Result<Self, SpteError> {
        if pfn > PFN_MAX {
            return Err(SpteError::PfnTooLarge { pfn });
        }
        if pfn & (level.pages() - 1) != 0 {
            return Err(SpteError::PfnMisaligned { pfn, level });
        }
        let mut raw =
            SPTE_MMU_PRESENT | SPTE_R | attrs.writability.bits() | (pfn << SPTE_PFN_SHIFT);
        raw |= (attrs.memtype as u64) << SPTE_MEMTYPE_SHIFT;
        if attrs.exec {
            raw |= SPTE_X;
        }
        if level != PageSize::Size4K {
            raw |= SPTE_LARGE;
        }
        if attrs.accessed {
            raw |= SPTE_ACCESSED;
        }
        if attrs.dirty {
            raw |= SPTE_DIRTY;
        }
        if attrs.user {
            raw |= SPTE_USER;
        }
        Ok(Spte(raw))
    }

    /// A shadow MMU's non-leaf SPTE: shadow pages live in the shadow MMU's
    /// slab, not at host addresses, so the address field holds the child's
    /// slab id (read back with [`shadow_child`](Self::shadow_child)).
    pub fn shadow_link(child: u32) -> Self {
        Spte(NON_LEAF_BITS | SPTE_USER | ((child as u64) << SPTE_PFN_SHIFT))
    }

    /// The child shadow page id of a [`shadow_link`](Self::shadow_link).
    // Cannot truncate: a shadow link's pfn field holds the `u32` id
    // `shadow_link` put there. On the fault path and the page zap: no check.
    #[allow(clippy::cast_possible_truncation)]
    #[inline]
    pub const fn shadow_child(self) -> u32 {
        self.pfn() as u32
    }

    /// `make_nonleaf_spte`: points at a child table at `table_addr`
    /// (4 KiB aligned, below 2^52).
    pub fn non_leaf(table_addr: u64) -> Result<Self, SpteError> {
        if table_addr & 0xfff != 0 || table_addr & !SPTE_PFN_MASK != 0 || table_addr == 0 {
            return Err(SpteError::BadTableAddress { addr: table_addr });
        }
        Ok(Spte(NON_LEAF_BITS | table_addr))
    }

    /// `make_mmio_spte`: caches "this gfn is MMIO" for memslot generation
    /// `gen`.
    pub fn mmio(gfn: u64, gen: u64) -> Result<Self, SpteError> {
        if gfn > PFN_MAX {
            return Err(SpteError::PfnTooLarge { pfn: gfn });
        }
        if gen >> SPTE_MMIO_GEN_BITS != 0 {
            return Err(SpteError::MmioGenTooLarge { gen });
        }
        Ok(Spte(
            SPTE_MMIO_VALUE | (gen << SPTE_MMIO_GEN_SHIFT) | (gfn << SPTE_PFN_SHIFT),
        ))
    }

    /// `is_shadow_present_pte`.
    #[inline]
    pub const fn is_mmu_present(self) -> bool {
        self.0 & SPTE_MMU_PRESENT != 0
    }

    /// Hardware-visible present (readable).
    #[inline]
    pub const fn is_present(self) -> bool {
        self.is_mmu_present() && self.0 & SPTE_R != 0
    }

    /// `is_mmio_spte`.
    #[inline]
    pub const fn is_mmio(self) -> bool {
        !self.is_mmu_present() && self.0 & SPTE_MMIO_MASK == SPTE_MMIO_VALUE
    }

    /// `is_large_pte`.
    #[inline]
    pub const fn is_large(self) -> bool {
        self.0 & SPTE_LARGE != 0
    }

    /// `is_last_spte(spte, level)`: a leaf at table level `level` (1..=4).
    #[inline]
    pub const fn is_last(self, level: u8) -> bool {
        level == 1 || self.is_large()
    }

    /// `is_writable_pte`.
    #[inline]
    pub const fn is_writable(self) -> bool {
        self.0 & SPTE_W != 0
    }

    pub const fn is_host_writable(self) -> bool {
        self.0 & SPTE_HOST_WRITABLE != 0
    }

    pub const fn is_mmu_writable(self) -> bool {
        self.0 & SPTE_MMU_WRITABLE != 0
    }

    pub const fn is_executable(self) -> bool {
        self.0 & SPTE_X != 0
    }

    pub const fn is_user(self) -> bool {
        self.0 & SPTE_USER != 0
    }

    pub const fn is_accessed(self) -> bool {
        self.0 & SPTE_ACCESSED != 0
    }

    pub const fn is_dirty(self) -> bool {
        self.0 & SPTE_DIRTY != 0
    }

    /// The (HostW, MMUW, W) state; `None` only for non-MMU-present values.
    pub fn writability(self) -> Option<Writability> {
        self.is_mmu_present()
            .then(|| Writability::from_bits(self.0))
            .flatten()
    }

    pub fn memtype(self) -> Option<MemType> {
        MemType::from_bits((self.0 & SPTE_MEMTYPE_MASK) >> SPTE_MEMTYPE_SHIFT)
    }

    /// `spte_to_pfn`.
    #[inline]
    pub const fn pfn(self) -> u64 {
        (self.0 & SPTE_PFN_MASK) >> SPTE_PFN_SHIFT
    }

    /// The child table address of a non-leaf SPTE.
    #[inline]
    pub const fn table_addr(self) -> u64 {
        self.0 & SPTE_PFN_MASK
    }

    pub const fn mmio_gfn(self) -> u64 {
        self.pfn()
    }

    pub const fn mmio_gen(self) -> u64 {
        (self.0 & SPTE_MMIO_GEN_MASK) >> SPTE_MMIO_GEN_SHIFT
    }

    /// Clear W, keep HostW/MMUW (dirty logging). Legal from every state.
    pub fn write_protect(self) -> Self {
        Spte(self.0 & !SPTE_W)
    }

    /// Clear W and MMU-writable (shadowed guest page table; under
    /// `mmu_lock`, followed by a TLB flush).
    pub fn shadow_write_protect(self) -> Self {
        Spte(self.0 & !(SPTE_W | SPTE_MMU_WRITABLE))
    }

    /// The fast-page-fault transition: make writable again, only if
    /// MMU-writable (which implies host-writable).
    pub fn make_writable(self) -> Option<Self> {
        (self.is_mmu_present() && self.is_mmu_writable()).then_some(Spte(self.0 | SPTE_W))
    }

    pub fn with_accessed(self, accessed: bool) -> Self {
        Spte(if accessed {
            self.0 | SPTE_ACCESSED
        } else {
            self.0 & !SPTE_ACCESSED
        })
    }

    pub fn with_dirty(self, dirty: bool) -> Self {
        Spte(if dirty {
            self.0 | SPTE_DIRTY
        } else {
            self.0 & !SPTE_DIRTY
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_attrs() -> impl Iterator<Item = LeafAttrs> {
        Writability::ALL.into_iter().flat_map(|writability| {
            MemType::ALL.into_iter().flat_map(move |memtype| {
                (0..16u8).map(move |b| LeafAttrs {
                    writability,
                    memtype,
                    exec: b & 1 != 0,
                    accessed: b & 2 != 0,
                    dirty: b & 4 != 0,
                    user: b & 8 != 0,
                })
            })
        })
    }

    #[test]
    fn every_legal_leaf_round_trips() {
        let mut n = 0;
        for level in PageSize::ALL {
            for pfn in [
                0,
                level.pages(),
                0x1234 * level.pages(),
                PFN_MAX & !(level.pages() - 1),
            ] {
                for a in all_attrs() {
                    let s = Spte::leaf(pfn, level, a).unwrap();
                    assert_eq!(Spte::try_from_raw(s.raw()), Ok(s));
                    assert!(s.is_mmu_present() && s.is_present() && !s.is_mmio());
                    assert_eq!(s.pfn(), pfn);
                    assert_eq!(s.writability(), Some(a.writability));
                    assert_eq!(s.memtype(), Some(a.memtype));
                    assert_eq!(s.is_executable(), a.exec);
                    assert_eq!(s.is_accessed(), a.accessed);
                    assert_eq!(s.is_dirty(), a.dirty);
                    assert_eq!(s.is_user(), a.user);
                    assert_eq!(s.is_large(), level != PageSize::Size4K);
                    assert!(s.is_last(level.level()));
                    // W implies MMUW implies HostW.
                    assert!(!s.is_writable() || s.is_mmu_writable());
                    assert!(!s.is_mmu_writable() || s.is_host_writable());
                    n += 1;
                }
            }
        }
        assert_eq!(n, 3 * 4 * 4 * 5 * 16);
    }

    #[test]
    fn exactly_four_writability_states_are_legal() {
        let base = Spte::leaf(0x42, PageSize::Size4K, LeafAttrs::default())
            .unwrap()
            .raw()
            & !(SPTE_W | SPTE_HOST_WRITABLE | SPTE_MMU_WRITABLE);
        let mut legal = Vec::new();
        for bits in 0..8u64 {
            let raw = base
                | if bits & 4 != 0 { SPTE_HOST_WRITABLE } else { 0 }
                | if bits & 2 != 0 { SPTE_MMU_WRITABLE } else { 0 }
                | if bits & 1 != 0 { SPTE_W } else { 0 };
            match Spte::try_from_raw(raw) {
                Ok(s) => legal.push((bits, s.writability().unwrap())),
                Err(e) => assert_eq!(e, SpteError::IllegalWritability { raw }),
            }
        }
        assert_eq!(
            legal,
            vec![
                (0b000, Writability::ReadOnly),
                (0b100, Writability::ShadowWriteProtected),
                (0b110, Writability::WriteProtected),
                (0b111, Writability::Writable),
            ]
        );
    }

    #[test]
    fn writability_transitions_stay_legal() {
        for w in Writability::ALL {
            let s = Spte::leaf(
                7,
                PageSize::Size4K,
                LeafAttrs {
                    writability: w,
                    ..LeafAttrs::default()
                },
            )
            .unwrap();
            let wp = s.write_protect();
            assert!(Spte::try_from_raw(wp.raw()).is_ok() && !wp.is_writable());
            let swp = s.shadow_write_protect();
            assert!(Spte::try_from_raw(swp.raw()).is_ok() && !swp.is_mmu_writable());
            match s.make_writable() {
                Some(x) => {
                    assert!(matches!(
                        w,
                        Writability::Writable | Writability::WriteProtected
                    ));
                    assert_eq!(x.writability(), Some(Writability::Writable));
                }
                None => assert!(matches!(
                    w,
                    Writability::ShadowWriteProtected | Writability::ReadOnly
                )),
            }
        }
    }

    #[test]
    fn non_present_and_mmio_encodings() {
        assert!(!Spte::NONPRESENT.is_mmu_present());
        assert!(!Spte::NONPRESENT.is_mmio());
        assert_eq!(Spte::NONPRESENT.writability(), None);
        for gen in [0, 1, 255] {
            for gfn in [0, 0xabcde, PFN_MAX] {
                let m = Spte::mmio(gfn, gen).unwrap();
                assert!(m.is_mmio() && !m.is_mmu_present() && !m.is_present());
                assert_eq!((m.mmio_gfn(), m.mmio_gen()), (gfn, gen));
                assert_eq!(Spte::try_from_raw(m.raw()), Ok(m));
                assert_eq!(m.make_writable(), None);
            }
        }
        assert_eq!(
            Spte::mmio(0, 256),
            Err(SpteError::MmioGenTooLarge { gen: 256 })
        );
        // Not present, not MMIO: garbage.
        assert!(Spte::try_from_raw(SPTE_R).is_err());
        assert!(Spte::try_from_raw(SPTE_DIRTY).is_err());
    }

    #[test]
    fn non_leaf_points_at_its_table() {
        let s = Spte::non_leaf(0x7f00_1234_5000).unwrap();
        assert!(s.is_mmu_present() && !s.is_large() && !s.is_last(2));
        assert_eq!(s.table_addr(), 0x7f00_1234_5000);
        assert_eq!(Spte::try_from_raw(s.raw()), Ok(s));
        assert!(Spte::non_leaf(0x1001).is_err());
        assert!(Spte::non_leaf(0).is_err());
        assert!(Spte::non_leaf(1 << 52).is_err());
    }

    #[test]
    fn bad_pfns_are_refused() {
        let a = LeafAttrs::default();
        assert_eq!(
            Spte::leaf(PFN_MAX + 1, PageSize::Size4K, a),
            Err(SpteError::PfnTooLarge { pfn: PFN_MAX + 1 })
        );
        assert_eq!(
            Spte::leaf(1, PageSize::Size2M, a),
            Err(SpteError::PfnMisaligned {
                pfn: 1,
                level: PageSize::Size2M
            })
        );
        assert_eq!(
            Spte::leaf(512, PageSize::Size1G, a),
            Err(SpteError::PfnMisaligned {
                pfn: 512,
                level: PageSize::Size1G
            })
        );
    }

    #[test]
    fn reserved_memtype_is_refused() {
        let s = Spte::leaf(1, PageSize::Size4K, LeafAttrs::default()).unwrap();
        let raw = (s.raw() & !SPTE_MEMTYPE_MASK) | (2 << SPTE_MEMTYPE_SHIFT);
        assert_eq!(
            Spte::try_from_raw(raw),
            Err(SpteError::IllegalMemType { raw })
        );
    }

    #[test]
    fn levels() {
        assert_eq!(PageSize::Size4K.pages(), 1);
        assert_eq!(PageSize::Size2M.pages(), 512);
        assert_eq!(PageSize::Size1G.pages(), 262_144);
        assert_eq!(PageSize::Size1G.bytes(), 1 << 30);
        assert_eq!(PageSize::Size1G.lower(), Some(PageSize::Size2M));
        assert_eq!(PageSize::Size4K.lower(), None);
    }
}
