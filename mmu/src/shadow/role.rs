//! Roles and guest paging formats (KVM: `union kvm_mmu_page_role`, the
//! `ACC_*` masks, and the per-format half of `paging_tmpl.h`): what a shadow
//! page's role distinguishes, and the [`GuestPaging`] trait a guest
//! page-table format implements so the shadow MMU can walk it. The x86-64
//! impl lives here; the EPT impl lives with nested TDP ([`crate::nested`]),
//! the only user of that format.

use super::ShadowMmu;
use crate::guest_walk::{AccessKind, GuestPhysMem, Translation, WalkError, X86Paging};

/// Access bits of a role / guest entry (`ACC_*_MASK`). For EPT, USER
/// stands for R, as in KVM.
pub const ACC_EXEC: u8 = 1;
pub const ACC_WRITE: u8 = 2;
pub const ACC_USER: u8 = 4;
pub const ACC_ALL: u8 = 7;

/// `ACC_*` bits from write / exec / user (EPT: read) permissions.
pub fn acc_bits(write: bool, exec: bool, user: bool) -> u8 {
    (if write { ACC_WRITE } else { 0 })
        | (if exec { ACC_EXEC } else { 0 })
        | (if user { ACC_USER } else { 0 })
}

/// `union kvm_mmu_page_role`, the fields this MMU distinguishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Role {
    pub level: u8,
    pub direct: bool,
    pub access: u8,
    pub guest_mode: bool,
}

/// A guest paging format the shadow MMU can shadow.
pub trait GuestPaging: Clone + Send + Sync + std::fmt::Debug + 'static {
    /// Pages built for this format have `role.guest_mode` (nested).
    const GUEST_MODE: bool;
    /// Gfn of the root table (CR3 / EPTP).
    fn root_gfn(&self) -> u64;
    fn walk(
        &self,
        mem: &dyn GuestPhysMem,
        addr: u64,
        access: AccessKind,
        set_ad: bool,
    ) -> Result<Translation, WalkError>;
    /// `ACC_*` bits granted by one guest entry.
    fn entry_access(&self, pte: u64) -> u8;
}

impl GuestPaging for X86Paging {
    const GUEST_MODE: bool = false;

    fn root_gfn(&self) -> u64 {
        (self.cr3 & ((1u64 << 52) - 1)) >> 12
    }

    fn walk(
        &self,
        mem: &dyn GuestPhysMem,
        addr: u64,
        access: AccessKind,
        set_ad: bool,
    ) -> Result<Translation, WalkError> {
        crate::guest_walk::walk_x86(mem, self, addr, access, set_ad)
    }

    fn entry_access(&self, pte: u64) -> u8 {
        use crate::guest_walk::x86;
        acc_bits(
            pte & x86::RW != 0,
            !(self.efer_nx && pte & x86::NX != 0),
            pte & x86::US != 0,
        )
    }
}

impl<P: GuestPaging> ShadowMmu<P> {
    pub fn role(level: u8, direct: bool, access: u8) -> Role {
        Role {
            level,
            direct,
            access,
            guest_mode: P::GUEST_MODE,
        }
    }
}
