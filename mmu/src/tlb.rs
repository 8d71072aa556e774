//! Remote TLB flushes (`kvm_flush_remote_tlbs`): the MMU calls the hook, the
//! VMM decides what a flush means (kick vCPUs, nothing in the model plane).

use crate::stats::MmuStats;
use std::sync::Arc;

/// Returns whether a flush was actually performed (KVM counts
/// `remote_tlb_flush` only then).
pub type FlushHook = Arc<dyn Fn() -> bool + Send + Sync>;

#[derive(Clone, Default)]
pub struct RemoteTlb {
    hook: Option<FlushHook>,
}

impl std::fmt::Debug for RemoteTlb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteTlb")
            .field("hook", &self.hook.is_some())
            .finish()
    }
}

impl RemoteTlb {
    pub fn new(hook: Option<FlushHook>) -> Self {
        Self { hook }
    }

    /// `kvm_flush_remote_tlbs`: one request, one flush if the hook did one.
    /// Without a hook (model plane) the flush is counted as performed.
    pub fn flush(&self, stats: &MmuStats) {
        MmuStats::inc(&stats.remote_tlb_flush_requests);
        let done = self.hook.as_ref().map_or(true, |h| h());
        if done {
            MmuStats::inc(&stats.remote_tlb_flush);
        }
    }
}
