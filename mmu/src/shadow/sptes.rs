//! The shadow MMU's SPTE encoding, in one place.
//!
//! Shadow SPTEs stay plain `u64`s with these private constants (legacy x86
//! paging format plus KVM's software bits, positions as in Linux 6.12's
//! non-EPT layout). When `crate::spte::Spte` (the TDP MMU's type) settles,
//! this module is the only one to switch over.
//!
//! Non-leaf SPTEs point at a shadow page by its slab id (stored in the pfn
//! field): shadow pages live in the MMU's slab, not at host addresses.

pub const PRESENT: u64 = 1 << 0;
pub const WRITABLE: u64 = 1 << 1;
pub const USER: u64 = 1 << 2;
pub const LARGE: u64 = 1 << 7;
/// `DEFAULT_SPTE_HOST_WRITABLE`: the host mapping is writable.
pub const HOST_WRITABLE: u64 = 1 << 9;
/// `DEFAULT_SPTE_MMU_WRITABLE`: the MMU allows W (clear while the gfn holds
/// a shadowed guest page table).
pub const MMU_WRITABLE: u64 = 1 << 10;
/// `SPTE_MMU_PRESENT_MASK`.
pub const MMU_PRESENT: u64 = 1 << 11;
pub const NX: u64 = 1 << 63;
const PFN_MASK: u64 = ((1u64 << 52) - 1) & !0xfff;

use super::{ACC_EXEC, ACC_USER, ACC_WRITE};

pub fn make_leaf(
    pfn: u64,
    acc: u8,
    writable: bool,
    host_writable: bool,
    mmu_writable: bool,
    large: bool,
) -> u64 {
    let mut s = PRESENT | MMU_PRESENT | ((pfn << 12) & PFN_MASK);
    if acc & ACC_USER != 0 {
        s |= USER;
    }
    if acc & ACC_EXEC == 0 {
        s |= NX;
    }
    if writable && acc & ACC_WRITE != 0 && host_writable && mmu_writable {
        s |= WRITABLE;
    }
    if host_writable {
        s |= HOST_WRITABLE;
    }
    if mmu_writable {
        s |= MMU_WRITABLE;
    }
    if large {
        s |= LARGE;
    }
    s
}

pub fn make_nonleaf(child: u32) -> u64 {
    PRESENT | WRITABLE | USER | MMU_PRESENT | ((child as u64) << 12)
}

pub fn is_present(s: u64) -> bool {
    s & MMU_PRESENT != 0
}

pub fn is_leaf(s: u64, level: u8) -> bool {
    level == 1 || s & LARGE != 0
}

pub fn is_writable(s: u64) -> bool {
    s & WRITABLE != 0
}

pub fn pfn(s: u64) -> u64 {
    (s & PFN_MASK) >> 12
}

pub fn child(s: u64) -> u32 {
    pfn(s) as u32
}

/// Write-protect for a shadowed guest page table: clear W and MMU-writable
/// (state "1 0 0" of KVM's table).
pub fn wrprot_for_shadowing(s: u64) -> u64 {
    s & !(WRITABLE | MMU_WRITABLE)
}
