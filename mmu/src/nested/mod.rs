//! Nested TDP (shadow EPT): the shadow MMU of [`crate::shadow`] run over an
//! L1 hypervisor's EPT tables for its L2 ([`EptPaging`]), with
//! `role.guest_mode` set. The "guest addresses" faulted are L2 gpas; the
//! tables and the pages they map are L1 gfns, so the rmaps are keyed by L1
//! gfn - and a host invalidation of an L1 range can find what maps it only
//! through them (`crate::shadow::zap`).

use crate::guest_walk::{
    ept, walk_ept, AccessKind, EptPaging, GuestPhysMem, Translation, WalkError,
};
use crate::shadow::{acc_bits, GuestPaging, ShadowMmu};

/// The nested-TDP MMU.
pub type NestedMmu = ShadowMmu<EptPaging>;

impl GuestPaging for EptPaging {
    const GUEST_MODE: bool = true;

    fn root_gfn(&self) -> u64 {
        (self.eptp & ((1u64 << 52) - 1)) >> 12
    }

    fn walk(
        &self,
        mem: &dyn GuestPhysMem,
        addr: u64,
        access: AccessKind,
        set_ad: bool,
    ) -> Result<Translation, WalkError> {
        walk_ept(mem, self, addr, access, set_ad)
    }

    /// As KVM's EPT `FNAME(gpte_access)`: R is carried as ACC_USER.
    fn entry_access(&self, pte: u64) -> u8 {
        acc_bits(pte & ept::W != 0, pte & ept::X != 0, pte & ept::R != 0)
    }
}
