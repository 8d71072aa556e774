//! Kernel-side invalidation sources wired into a running VM.
//!
//! The VMM's own operations on guest RAM go through `notifier::ops` and are
//! announced before the syscall (`Delivery::Before`). Everything else the
//! kernel does to the guest-facing mapping reaches the MMU only through
//! what user space can observe:
//!
//! | source | what | delivery | thread |
//! |---|---|---|---|
//! | `uffd` | REMOVE (madvise DONTNEED/REMOVE), UNMAP, REMAP messages on guest RAM's userfaultfd | after the fact (REMOVE: `end` after the zap) | the fault thread ([`crate::memory::fault`]) |
//! | `trace` | `kvm:kvm_unmap_hva_range`: every notifier invalidation of this mm (mprotect, hole punch, ... by anyone) | after the fact, event unknown | [`TracePump`] |
//!
//! Both deliver to the [`Subscribers`] the MMU's `KvmMmuNotifier` is
//! registered with; [`SourceCounts`] says how many invalidations each
//! delivered and how many found SPTEs to zap. An after-the-fact zap of a
//! range the MMU already dropped, or re-faulted since, is harmless: the MMU
//! may map less than the host, never more. A [`super::bystander`] makes
//! such invalidations on purpose.

use super::bystander::BystanderReport;
use crate::failpoint::{self, Injected, Point};
use mmu::tdp::TdpMmu;
use notifier::pagemap::Pagemap;
use notifier::trace::TraceSource;
use notifier::uffd::{event_invalidations, wait_for_zap, UffdEvent};
use notifier::{Delivery, Invalidation, Subscribers};
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Which kernel-side sources feed the MMU (`--events`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct EventSources {
    pub uffd: bool,
    pub trace: bool,
    /// `auto`: each source where available, no error where not.
    pub auto: bool,
}

impl Default for EventSources {
    fn default() -> Self {
        EventSources {
            uffd: true,
            trace: true,
            auto: true,
        }
    }
}

impl FromStr for EventSources {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let mut e = EventSources {
            uffd: false,
            trace: false,
            auto: false,
        };
        for part in s.split(',').map(str::trim) {
            match part {
                "auto" => e = EventSources::default(),
                "none" | "" => {}
                "uffd" => e.uffd = true,
                "trace" => e.trace = true,
                _ => {
                    return Err(format!(
                        "unknown event source {part:?}: expected auto, none, uffd, trace (comma-separated)"
                    ))
                }
            }
        }
        Ok(e)
    }
}

/// What one source delivered.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct SourceCounts {
    /// Invalidations delivered (start + end).
    pub events: u64,
    /// Of those, overlapping guest RAM (a memslot).
    pub in_guest_ram: u64,
    /// Of those, finding leaf SPTEs in their range just before `start`
    /// (so `start` zapped them, unless a concurrent zap won).
    pub zapping: u64,
    /// Leaf SPTEs found that way.
    pub leaves_zapped: u64,
}

/// The userfaultfd source's messages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct UffdEventCounts {
    pub remove: u64,
    pub unmap: u64,
    pub remap: u64,
    /// FORK or unknown messages (not requested; counted, ignored).
    pub other: u64,
    pub delivered: SourceCounts,
}

/// Deliver one invalidation to `subs`: `start`, then `between` (e.g. wait
/// for the host's zap), then `end`; counted in `counts`.
pub fn deliver(
    subs: &Subscribers,
    tdp: &TdpMmu,
    inv: &Invalidation,
    between: impl FnOnce(),
    counts: &mut SourceCounts,
) {
    counts.events += 1;
    let slots = tdp.context().memslots();
    let mut overlaps = false;
    let mut leaves = 0u64;
    for r in slots.hva_range_to_gfn_ranges(inv.range) {
        overlaps = true;
        tdp.for_each_leaf(r.start, r.end, |_| leaves += 1);
    }
    subs.start(inv);
    between();
    subs.end(inv);
    if overlaps {
        counts.in_guest_ram += 1;
    }
    if leaves > 0 {
        counts.zapping += 1;
        counts.leaves_zapped += leaves;
    }
}

/// Deliver a non-cooperative userfaultfd message (called by the fault
/// thread, the one reader of the userfaultfd). REMOVE is after the fact
/// (an ordinary thread loses the race to the zap): `end` waits until the
/// range is gone from the host page table (bounded), so no fault can
/// install an SPTE for a page about to disappear.
pub fn deliver_uffd_event(
    subs: &Subscribers,
    tdp: &TdpMmu,
    ev: &UffdEvent,
    pagemap: Option<&mut Pagemap>,
    counts: &mut UffdEventCounts,
) {
    match ev {
        UffdEvent::Remove { .. } => counts.remove += 1,
        UffdEvent::Unmap { .. } => counts.unmap += 1,
        UffdEvent::Remap { .. } => counts.remap += 1,
        UffdEvent::Pagefault { .. } => return,
        UffdEvent::Fork { .. } | UffdEvent::Other(_) => {
            counts.other += 1;
            return;
        }
    }
    // Guest RAM is registered MINOR/MISSING + WP: no PMD sharing, so the
    // kernel's range is the message's (no widening needed).
    let mut pagemap = pagemap;
    for inv in event_invalidations(ev, &[], Delivery::AfterTheFact) {
        let wait = |pm: Option<&mut Pagemap>| {
            if let (UffdEvent::Remove { .. }, Some(pm)) = (ev, pm) {
                wait_for_zap(pm, inv.range);
            }
        };
        let pm = pagemap.as_deref_mut();
        deliver(subs, tdp, &inv, || wait(pm), &mut counts.delivered);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EventsError {
    #[error("tracepoint source: {0}")]
    Trace(#[source] notifier::Error),
    #[error("bystander {op} on [{start:#x}, {end:#x}): {source}")]
    Raw {
        op: &'static str,
        start: u64,
        end: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("bystander thread is gone")]
    BystanderGone,
    #[error("spawning the {0} thread: {1}")]
    Spawn(&'static str, #[source] std::io::Error),
    #[error(transparent)]
    Panicked(#[from] crate::thread::ThreadPanicked),
    #[error("the {0} thread is gone")]
    Gone(&'static str),
    #[error(transparent)]
    Injected(#[from] Injected),
}

/// The tracepoint source pumped on its own thread while the guest runs.
/// Dropping it stops the thread too (and so removes the tracefs instance).
pub struct TracePump {
    stop: Arc<AtomicBool>,
    /// Raised when the thread ends on an error or a panic.
    failed: Arc<AtomicBool>,
    handle: Option<JoinHandle<Result<SourceCounts, EventsError>>>,
}

impl TracePump {
    /// Open the source here (errors are the caller's to report), pump it
    /// every `every` on a new thread.
    pub fn start(
        subs: Subscribers,
        tdp: Arc<TdpMmu>,
        every: Duration,
    ) -> Result<Self, EventsError> {
        let mut src = TraceSource::open().map_err(EventsError::Trace)?;
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        let failed = Arc::new(AtomicBool::new(false));
        let f = failed.clone();
        let on_fail = move || f.store(true, Ordering::Release);
        let handle = crate::thread::spawn_helper("trace-pump", on_fail, move || {
            let mut counts = SourceCounts::default();
            let mut pump = |src: &mut TraceSource| -> Result<(), EventsError> {
                failpoint::hit(Point::TracePump)?;
                for e in src.collect().map_err(EventsError::Trace)? {
                    deliver(&subs, &tdp, &e.invalidation(), || {}, &mut counts);
                }
                Ok(())
            };
            while !st.load(Ordering::Acquire) {
                pump(&mut src)?;
                std::thread::sleep(every);
            }
            pump(&mut src)?; // what happened up to the stop
            Ok(counts)
        })
        .map_err(|e| EventsError::Spawn("trace-pump", e))?;
        Ok(TracePump {
            stop,
            failed,
            handle: Some(handle),
        })
    }

    /// Raised when the pump died (an error or a panic): invalidations of
    /// guest RAM would go unheard from then on, so the run stops on it.
    pub fn failed(&self) -> Arc<AtomicBool> {
        self.failed.clone()
    }

    /// Stop after a last drain; what was delivered.
    pub fn finish(mut self) -> Result<SourceCounts, EventsError> {
        self.stop.store(true, Ordering::Release);
        match self.handle.take() {
            Some(h) => crate::thread::join("trace-pump", h)?,
            None => Err(EventsError::Gone("trace-pump")),
        }
    }
}

impl Drop for TracePump {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Everything the kernel-side sources and the bystander did in one run.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct EventsReport {
    pub sources: Option<EventSources>,
    /// The userfaultfd source (when guest RAM asked for events).
    pub uffd: Option<UffdEventCounts>,
    /// Resolutions that met `EAGAIN` (an event pending) and were retried.
    pub uffd_eagain: u64,
    /// The tracepoint source (when it ran).
    pub trace: Option<SourceCounts>,
    /// Why the tracepoint source did not run (`--events auto`).
    pub trace_unavailable: Option<String>,
    pub bystander: Option<BystanderReport>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use mmu::memslot::{Memslot, Memslots, PAGE_SHIFT};
    use mmu::tdp::{FaultOutcome, HostPage, ResolveError};
    use mmu::{KvmMmuNotifier, MmuContext, RemoteTlb, YieldPolicy};
    use notifier::PageSize;

    const HVA: u64 = 0x7000_0000_0000;
    const M2: u64 = 2 << 20;

    /// 16 MiB of guest RAM at `HVA`, every 2M page mapped by the MMU.
    fn mapped_mmu() -> (Subscribers, Arc<TdpMmu>) {
        let slot = Memslot::new(0, 0, (16 * M2) >> PAGE_SHIFT, HVA, PageSize::Size2M).unwrap();
        let ctx = MmuContext::new(Memslots::new(vec![slot], 1).unwrap(), RemoteTlb::new(None));
        let tdp = Arc::new(TdpMmu::new(ctx.clone()));
        let n = Arc::new(KvmMmuNotifier::new(ctx, YieldPolicy::default()));
        n.add_mmu(tdp.clone());
        let subs = Subscribers::new();
        subs.register(n);
        let host = |_: &Memslot, gfn: u64, _: u64, _: bool| -> Result<HostPage, ResolveError> {
            Ok(HostPage {
                pfn: gfn,
                level: PageSize::Size2M,
                writable: true,
            })
        };
        for p in 0..16 {
            let out = tdp.page_fault((p * M2) >> PAGE_SHIFT, true, &host).unwrap();
            assert!(matches!(out, FaultOutcome::Fixed(PageSize::Size2M)));
        }
        (subs, tdp)
    }

    #[test]
    fn uffd_events_zap_what_they_cover() {
        let (subs, tdp) = mapped_mmu();
        let mut c = UffdEventCounts::default();
        let r = |a: u64, b: u64| (HVA + a * M2, HVA + b * M2);
        let (s1, e1) = r(2, 4);
        let (s2, e2) = r(12, 13);
        let (s3, e3) = r(32, 33);
        for ev in [
            UffdEvent::Unmap { start: s1, end: e1 },
            UffdEvent::Remap {
                from: HVA + 8 * M2,
                to: 0x7100_0000_0000,
                len: M2,
            },
            UffdEvent::Remove { start: s2, end: e2 },
            // Outside guest RAM: delivered, zaps nothing.
            UffdEvent::Remove { start: s3, end: e3 },
            // Not an invalidation.
            UffdEvent::Pagefault {
                address: HVA,
                flags: 0,
            },
        ] {
            deliver_uffd_event(&subs, &tdp, &ev, None, &mut c);
        }
        let mapped: Vec<u64> = tdp
            .mapped_leaves()
            .iter()
            .map(|l| (l.gfn << PAGE_SHIFT) / M2)
            .collect();
        let want: Vec<u64> = (0..16).filter(|p| ![2, 3, 8, 12].contains(p)).collect();
        assert_eq!(mapped, want);
        assert_eq!((c.unmap, c.remap, c.remove, c.other), (1, 1, 2, 0));
        assert_eq!(c.delivered.events, 4);
        assert_eq!(c.delivered.in_guest_ram, 3);
        assert_eq!(c.delivered.zapping, 3);
        assert_eq!(c.delivered.leaves_zapped, 4);
    }

    #[test]
    fn sources_parse() {
        let e: EventSources = "uffd,trace".parse().unwrap();
        assert!(e.uffd && e.trace && !e.auto);
        let e: EventSources = "none".parse().unwrap();
        assert!(!e.uffd && !e.trace);
        let e: EventSources = "trace".parse().unwrap();
        assert!(!e.uffd && e.trace);
        assert_eq!(
            "auto".parse::<EventSources>().unwrap(),
            EventSources::default()
        );
        assert!("bpf".parse::<EventSources>().is_err());
    }
}
