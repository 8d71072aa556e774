//! MMU statistics under the names KVM exports through its binary stats fd
//! (`arch/x86/kvm/x86.c` `kvm_vm_stats_desc[]` / `kvm_vcpu_stats_desc[]`),
//! plus the project's own yield and retry figures.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

macro_rules! mmu_stats {
    ($( $(#[$doc:meta])* $name:ident ),* $(,)?) => {
        /// Live counters. Instant counters (`pages_*`) go up and down,
        /// peak counters (`max_*`) only rise, the rest are cumulative.
        #[derive(Debug, Default)]
        pub struct MmuStats {
            $( $(#[$doc])* pub $name: AtomicU64, )*
        }

        /// A point-in-time copy of [`MmuStats`], serialisable with KVM's names.
        #[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
        pub struct MmuStatsSnapshot {
            $( $(#[$doc])* pub $name: u64, )*
        }

        impl MmuStats {
            pub fn snapshot(&self) -> MmuStatsSnapshot {
                MmuStatsSnapshot { $( $name: self.$name.load(Relaxed), )* }
            }
        }
    };
}

mmu_stats! {
    /// Present 4 KiB leaf SPTEs (instant).
    pages_4k,
    /// Present 2 MiB leaf SPTEs (instant).
    pages_2m,
    /// Present 1 GiB leaf SPTEs (instant).
    pages_1g,
    /// Remote TLB flushes actually performed.
    remote_tlb_flush,
    /// Calls to `flush_remote_tlbs`.
    remote_tlb_flush_requests,
    /// Page faults handled by the MMU.
    pf_taken,
    /// Page faults that installed an SPTE.
    pf_fixed,
    /// Shadow pages zapped (shadow / nested MMU).
    mmu_shadow_zapped,
    /// Longest rmap chain seen (peak).
    max_mmu_rmap_size,
    /// Shadow page lookups that had to allocate.
    mmu_cache_miss,
    /// Times a zap gave up `mmu_lock` (ours).
    zap_yields,
    /// Longest time a zap held `mmu_lock` without a yield, ns (ours, peak).
    max_zap_stretch_ns,
    /// Most leaves / rmap entries a zap visited without a yield (ours, peak).
    max_zap_stretch_leaves,
    /// Faults that found the invalidation sequence changed or their gfn
    /// under invalidation, and retried (ours).
    fault_retries,
    /// Page-table pages (4 KiB each) the TDP MMU holds, root included
    /// (instant; KVM keeps this as `kvm->arch.tdp_mmu_pages`).
    tdp_mmu_pages,
}

impl MmuStats {
    /// `pages_4k` / `pages_2m` / `pages_1g`: the leaf counter of `level`.
    pub fn pages(&self, level: notifier::PageSize) -> &AtomicU64 {
        use notifier::PageSize;
        match level {
            PageSize::Size4K => &self.pages_4k,
            PageSize::Size2M => &self.pages_2m,
            PageSize::Size1G => &self.pages_1g,
        }
    }

    pub fn inc(counter: &AtomicU64) {
        counter.fetch_add(1, Relaxed);
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    pub fn sub(counter: &AtomicU64, n: u64) {
        counter.fetch_sub(n, Relaxed);
    }

    pub fn peak(counter: &AtomicU64, value: u64) {
        counter.fetch_max(value, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_and_peaks() {
        let s = MmuStats::default();
        MmuStats::inc(&s.pf_taken);
        MmuStats::peak(&s.max_mmu_rmap_size, 7);
        MmuStats::peak(&s.max_mmu_rmap_size, 3);
        assert_eq!(s.snapshot().pf_taken, 1);
        assert_eq!(s.snapshot().max_mmu_rmap_size, 7);
    }
}
