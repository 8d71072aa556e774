//! Write tracking of guest page-table gfns (KVM: `page_track.c` and the
//! `account_shadowed` / `kvm_mmu_slot_gfn_write_protect` /
//! `kvm_mmu_track_write` paths of `mmu.c`). Every gfn that holds a guest
//! page table an indirect shadow page shadows is tracked
//! (`ShadowState::shadowed`, whose list lengths are `gfn_write_track`):
//! the first shadow page of a gfn write-protects every SPTE mapping it, a
//! tracked gfn is never mapped writable or by a large page, and a guest
//! write to it faults ([`FaultOutcome::Emulate`](super::FaultOutcome)) and,
//! once emulated, zaps its shadow pages ([`ShadowMmu::guest_table_write`]).

use super::page::ShadowState;
use super::{GuestPaging, ShadowMmu};
use crate::MmuStats;

impl ShadowState {
    pub(super) fn is_tracked(&self, start: u64, end: u64) -> bool {
        self.shadowed.range(start..end).next().is_some()
    }

    /// `account_shadowed`: indirect shadow page `id` shadows the guest
    /// table at `gfn`; the first one write-protects the gfn. Returns whether
    /// a TLB flush is needed.
    pub(super) fn account_shadowed(&mut self, gfn: u64, id: u32) -> bool {
        let list = self.shadowed.entry(gfn).or_default();
        list.push(id);
        list.len() == 1 && self.write_protect_gfn(gfn)
    }

    /// `unaccount_shadowed`: shadow page `id` of `gfn` is gone; the last
    /// one untracks the gfn.
    pub(super) fn unaccount_shadowed(&mut self, gfn: u64, id: u32) {
        if let Some(list) = self.shadowed.get_mut(&gfn) {
            list.retain(|x| *x != id);
            if list.is_empty() {
                self.shadowed.remove(&gfn);
            }
        }
    }

    /// `kvm_mmu_slot_gfn_write_protect` for shadowing: clear W and
    /// MMU-writable in every SPTE mapping `gfn`, at every level.
    pub(super) fn write_protect_gfn(&mut self, gfn: u64) -> bool {
        let Some(s) = self.slot_of(gfn) else {
            return false;
        };
        let mut refs = std::mem::take(&mut self.scratch);
        let mut flush = false;
        for level in 1..=3u8 {
            refs.clear();
            let slot = &self.slots[s];
            slot.rmap[level as usize - 1]
                .get(slot.index(level, gfn))
                .for_each(&self.descs, |r| refs.push(r));
            for r in &refs {
                let sp = self.page_mut(r.sp());
                let old = sp.spt[r.index()];
                flush |= old.is_writable();
                sp.spt[r.index()] = old.shadow_write_protect();
            }
        }
        self.scratch = refs;
        flush
    }

    /// Zap every indirect shadow page of gfns in `start..end`.
    pub(super) fn zap_shadowed_gfns(&mut self, start: u64, end: u64, stats: &MmuStats) -> u64 {
        let ids: Vec<u32> = self
            .shadowed
            .range(start..end)
            .flat_map(|(_, v)| v.iter().copied())
            .collect();
        ids.into_iter().map(|id| self.zap_sp(id, stats)).sum()
    }

    /// The first indirect shadow page of a gfn in `start..end`.
    pub(super) fn first_shadowed(&self, start: u64, end: u64) -> Option<(u64, u32)> {
        self.shadowed
            .range(start..end)
            .find_map(|(g, v)| v.first().map(|id| (*g, *id)))
    }
}

impl<P: GuestPaging> ShadowMmu<P> {
    /// The guest wrote a page table we shadow (after emulating the write):
    /// zap the shadow pages of `gfn` so the next fault re-reads it
    /// (`kvm_mmu_track_write`, simplified to zapping).
    pub fn guest_table_write(&self, gfn: u64) -> u64 {
        let ctx = &*self.ctx;
        let _g = ctx.mmu_lock.write();
        let mut st = self.synced_state();
        let n = st.zap_shadowed_gfns(gfn, gfn + 1, &ctx.stats);
        if n > 0 {
            ctx.tlb.flush(&ctx.stats);
        }
        n
    }

    /// Is `gfn` write-tracked (holds a shadowed guest page table)?
    pub fn is_write_tracked(&self, gfn: u64) -> bool {
        self.state.lock().is_tracked(gfn, gfn + 1)
    }
}
