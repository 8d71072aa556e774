//! Fault / invalidation stress (no stale translation; racing faults retry):
//! several fault threads race one thread that invalidates host ranges through
//! `KvmMmuNotifier` (registered in a `notifier::Subscribers` list, as the
//! host sources deliver them) and replaces the host pages behind them.
//!
//! After every `invalidate_range_start` and until `end`: nothing in the range
//! is mapped. After every `end`: every leaf (in the range and elsewhere) maps
//! the host's current page, never a pfn resolved before an invalidation.
//!
//! A fifth thread walks the tables locklessly (lookups, leaf scans) while
//! zaps free emptied tables: freed tables are poisoned, and no walk may see
//! the poison (invariant 3).
//!
//! Duration: `MMU_STRESS_SECS` (default 10):
//! `MMU_STRESS_SECS=10 cargo test -p mmu --release --test stress`

use mmu::memslot::{Memslot, Memslots};
use mmu::tdp::{FaultOutcome, HostPage, Leaf, ResolveError, ResolvePfn, TdpMmu, POISON_PFN};
use mmu::{KvmMmuNotifier, MmuContext, RemoteTlb, YieldPolicy};
use notifier::convert::u64_to_usize;
use notifier::PageSize;
use notifier::{Delivery, HvaRange, Invalidation, MmuNotifyEvent, Subscribers};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        // xorshift64*
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The primary MMU: one base pfn per host page of each slot.
struct Host {
    slots: Vec<(Memslot, Vec<AtomicU64>)>,
    next_pfn: AtomicU64,
    resolves: AtomicU64,
}

impl Host {
    fn new(slots: &[Memslot]) -> Self {
        let host = Host {
            slots: Vec::new(),
            next_pfn: AtomicU64::new(1 << 30),
            resolves: AtomicU64::new(0),
        };
        let slots = slots
            .iter()
            .map(|s| {
                let n = s.npages >> s.backing.gfn_shift();
                (
                    *s,
                    (0..n)
                        .map(|_| AtomicU64::new(host.fresh(s.backing)))
                        .collect(),
                )
            })
            .collect();
        Host { slots, ..host }
    }

    /// A never-used, `level`-aligned pfn run.
    fn fresh(&self, level: PageSize) -> u64 {
        let n = level.pages();
        let p = self.next_pfn.fetch_add(2 * n, Ordering::Relaxed);
        (p + n - 1) & !(n - 1)
    }

    fn slot(&self, id: u32) -> &(Memslot, Vec<AtomicU64>) {
        &self.slots[id as usize]
    }

    fn pfn(&self, id: u32, gfn: u64) -> u64 {
        let (s, pages) = self.slot(id);
        let off = gfn - s.base_gfn;
        pages[u64_to_usize(off >> s.backing.gfn_shift())].load(Ordering::Acquire)
            + (off & (s.backing.pages() - 1))
    }

    /// The host zaps and refaults the pages of `[gfn_start, gfn_end)`.
    fn replace(&self, id: u32, gfn_start: u64, gfn_end: u64) {
        let (s, pages) = self.slot(id);
        let shift = s.backing.gfn_shift();
        for i in (gfn_start - s.base_gfn) >> shift..(gfn_end - s.base_gfn) >> shift {
            pages[u64_to_usize(i)].store(self.fresh(s.backing), Ordering::Release);
        }
    }
}

impl ResolvePfn for Host {
    fn resolve(
        &self,
        slot: &Memslot,
        gfn: u64,
        _hva: u64,
        _write: bool,
    ) -> Result<HostPage, ResolveError> {
        let page = HostPage {
            pfn: self.pfn(slot.id, gfn),
            level: slot.backing,
            writable: true,
        };
        // Host faults take time (userfaultfd, hugetlb allocation): widen the
        // window between reading the host mapping and installing the SPTE.
        let n = self.resolves.fetch_add(1, Ordering::Relaxed);
        if n.is_multiple_of(64) {
            std::thread::sleep(Duration::from_micros(500));
        } else if n.is_multiple_of(8) {
            std::thread::yield_now();
        }
        Ok(page)
    }
}

#[test]
fn faults_never_keep_a_stale_translation_across_invalidations() {
    let secs: u64 = std::env::var("MMU_STRESS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let slots = vec![
        // 16 MiB of 4K pages, 256 MiB of 2M pages, 2 GiB of 1G pages.
        Memslot::new(0, 0, 4096, 0x7000_0000_0000, PageSize::Size4K).unwrap(),
        Memslot::new(1, 1 << 18, 1 << 16, 0x7100_0000_0000, PageSize::Size2M).unwrap(),
        Memslot::new(2, 1 << 19, 1 << 19, 0x7200_0000_0000, PageSize::Size1G).unwrap(),
    ];
    let host = Arc::new(Host::new(&slots));
    let ctx = MmuContext::new(
        Memslots::new(slots.clone(), 0).unwrap(),
        RemoteTlb::default(),
    );
    let tdp = Arc::new(TdpMmu::new(ctx.clone()));
    let notifier = Arc::new(KvmMmuNotifier::new(ctx.clone(), YieldPolicy::default()));
    notifier.add_mmu(tdp.clone());
    let subscribers = Subscribers::new();
    subscribers.register(notifier.clone());

    let stop = Arc::new(AtomicBool::new(false));
    // The gfn range being invalidated (start << 32 | len): half the faults
    // aim at it.
    let hot = Arc::new(AtomicU64::new(0));
    let faulters: Vec<_> = (0..3u64)
        .map(|t| {
            let (tdp, host, stop, slots, hot) = (
                tdp.clone(),
                host.clone(),
                stop.clone(),
                slots.clone(),
                hot.clone(),
            );
            std::thread::spawn(move || {
                let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ (t + 1));
                let mut counts = [0u64; 3];
                while !stop.load(Ordering::Relaxed) {
                    let h = hot.load(Ordering::Relaxed);
                    let gfn = if rng.below(2) == 0 && h != 0 {
                        (h >> 32) + rng.below(h & 0xffff_ffff)
                    } else {
                        let s = &slots[u64_to_usize(rng.below(3))];
                        s.base_gfn + rng.below(s.npages)
                    };
                    let out = tdp
                        .page_fault(gfn, rng.below(2) == 0, &*host)
                        .expect("fault");
                    match out {
                        FaultOutcome::Fixed(_) => counts[0] += 1,
                        FaultOutcome::Spurious(_) => counts[1] += 1,
                        FaultOutcome::Retry => counts[2] += 1,
                    }
                }
                counts
            })
        })
        .collect();

    // Lockless walkers racing the zaps that free tables (invariant 3): a
    // freed table is poisoned, so a walker that could reach one would see
    // POISON_PFN leaves.
    let walker = {
        let (tdp, stop, slots) = (tdp.clone(), stop.clone(), slots.clone());
        std::thread::spawn(move || {
            let mut rng = Rng(7);
            let mut walks = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let s = &slots[u64_to_usize(rng.below(3))];
                let gfn = s.base_gfn + rng.below(s.npages);
                let poisoned = |l: &Leaf| l.spte.pfn() >= POISON_PFN;
                if let Some(l) = tdp.lookup(gfn) {
                    assert!(!poisoned(&l), "walker reached a freed table: {l:?}");
                }
                for l in tdp.leaves_in(gfn, gfn + 4096) {
                    assert!(!poisoned(&l), "walker reached a freed table: {l:?}");
                }
                walks += 1;
            }
            walks
        })
    };

    let mut rng = Rng(42);
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut invalidations = 0u64;
    while Instant::now() < deadline {
        let s = &slots[u64_to_usize(rng.below(3))];
        let host_pages = s.npages >> s.backing.gfn_shift();
        let first = rng.below(host_pages);
        let n = 1 + rng.below((host_pages - first).min(if s.backing == PageSize::Size4K {
            1024
        } else {
            8
        }));
        let gfn_start = s.base_gfn + (first << s.backing.gfn_shift());
        let gfn_end = gfn_start + (n << s.backing.gfn_shift());
        let range = HvaRange::new(
            s.gfn_to_hva(gfn_start).unwrap(),
            s.gfn_to_hva(gfn_end - 1).unwrap() + 4096,
        );
        let inv = Invalidation {
            range,
            event: MmuNotifyEvent::Clear,
            blockable: rng.below(4) != 0,
            delivery: Delivery::Before,
        };
        hot.store(gfn_start << 32 | (gfn_end - gfn_start), Ordering::Relaxed);
        subscribers.start(&inv);
        let mapped = tdp.leaves_in(gfn_start, gfn_end);
        assert!(
            mapped.is_empty(),
            "mapped right after invalidate_range_start: {:?}",
            &mapped[..1]
        );
        host.replace(s.id, gfn_start, gfn_end);
        std::thread::yield_now();
        let mapped = tdp.leaves_in(gfn_start, gfn_end);
        assert!(
            mapped.is_empty(),
            "installed between start and end: {:?}",
            &mapped[..1]
        );
        subscribers.end(&inv);
        // No invalidation is in progress now, and only this thread changes
        // the host: every leaf anywhere must map the host's current page. A
        // fault that resolved a pfn before any earlier invalidation and
        // installed it later would show here.
        for leaf in tdp.mapped_leaves() {
            let id = slots
                .iter()
                .find(|s| s.contains_gfn(leaf.gfn))
                .expect("leaf outside slots")
                .id;
            let want = host.pfn(id, leaf.gfn);
            assert_eq!(
                leaf.spte.pfn(),
                want,
                "stale translation: {leaf:?} (host has {want:#x})"
            );
        }
        invalidations += 1;
        // Let the faults fill the tables again between invalidations.
        std::thread::sleep(Duration::from_micros(50));
    }
    stop.store(true, Ordering::Relaxed);
    let walks = walker.join().unwrap();
    let mut counts = [0u64; 3];
    for f in faulters {
        let c = f.join().unwrap();
        for i in 0..3 {
            counts[i] += c[i];
        }
    }
    let st = ctx.stats.snapshot();
    eprintln!(
        "stress {secs}s: {invalidations} invalidations, {walks} lockless walks, faults fixed {} spurious {} retry {}; {st:?}",
        counts[0], counts[1], counts[2]
    );
    assert!(invalidations > 10 && counts[0] > 0);
    assert_eq!(st.fault_retries, counts[2]);
    assert_eq!(ctx.seq.in_progress(), 0);

    // Accounting survived the races: zap everything, nothing is left.
    let leaves = tdp.mapped_leaves();
    let count = |l| leaves.iter().filter(|x| x.level == l).count() as u64;
    assert_eq!(
        (st.pages_4k, st.pages_2m, st.pages_1g),
        (
            count(PageSize::Size4K),
            count(PageSize::Size2M),
            count(PageSize::Size1G)
        )
    );
    tdp.zap_range(0, 1 << 36, YieldPolicy::default());
    let st = ctx.stats.snapshot();
    assert_eq!(
        (st.pages_4k, st.pages_2m, st.pages_1g, st.tdp_mmu_pages),
        (0, 0, 0, 1)
    );
}
