//! Order of start/end as a recording subscriber sees it, per source:
//! * operations (`HostMm` ops): `start` while the pages are still present,
//!   `end` after the syscall (pages gone for discards, hole punches, unmaps);
//! * userfaultfd REMOVE: `start` before the zap (page still present, with the
//!   handler SCHED_FIFO on the CPU the caller is pinned to), `end` after it;
//!   UNMAP after the fact;
//! * the tracepoint: after the fact, event unknown.

use integration_tests::require;
use notifier::hostconf::HugepageReservation;
use notifier::hostmm::{Backing, HostMm, Placement};
use notifier::ops::Discard;
use notifier::pagemap::Pagemap;
use notifier::trace::TraceSource;
use notifier::uffd::{UffdOptions, UffdSource};
use notifier::PageSize;
use notifier::{
    Delivery, HvaRange, Invalidation, InvalidationSubscriber, MmuNotifyEvent, Subscribers,
};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const M2: u64 = 2 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Start,
    End,
}

#[derive(Debug, Clone, Copy)]
struct Rec {
    phase: Phase,
    inv: Invalidation,
    /// Was the probe page present in pagemap inside the callback?
    probe_present: Option<bool>,
}

struct Recorder {
    log: Mutex<Vec<Rec>>,
    probe: Mutex<Option<HvaRange>>,
    pagemap: Mutex<Pagemap>,
}

impl Recorder {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            log: Mutex::default(),
            probe: Mutex::default(),
            pagemap: Mutex::new(Pagemap::open().expect("open pagemap")),
        })
    }

    fn record(&self, phase: Phase, inv: &Invalidation) {
        let probe = *self.probe.lock().unwrap();
        let probe_present = probe.filter(|p| p.overlaps(&inv.range)).map(|p| {
            self.pagemap
                .lock()
                .unwrap()
                .any_present(p)
                .expect("PAGEMAP_SCAN")
        });
        self.log.lock().unwrap().push(Rec {
            phase,
            inv: *inv,
            probe_present,
        });
    }

    fn set_probe(&self, r: HvaRange) {
        *self.probe.lock().unwrap() = Some(r);
    }

    fn take(&self) -> Vec<Rec> {
        std::mem::take(&mut *self.log.lock().unwrap())
    }

    /// Wait until an `end` of `event` was recorded.
    fn wait_end(&self, event: MmuNotifyEvent, timeout: Duration) -> Vec<Rec> {
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            if self
                .log
                .lock()
                .unwrap()
                .iter()
                .any(|r| r.phase == Phase::End && r.inv.event == event)
            {
                break;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        self.take()
    }
}

/// A recorder registered in a fresh subscriber list.
fn recording() -> (Arc<Recorder>, Subscribers) {
    let rec = Recorder::new();
    let subs = Subscribers::new();
    subs.register(rec.clone());
    (rec, subs)
}

/// A HostMm whose own announcements go to an empty list, holding one
/// populated private 2M hugetlb region of `len` bytes; returns its base.
fn quiet_private_region(len: u64, populated: u64) -> (HostMm, u64) {
    let mut mm = HostMm::new(Subscribers::new()).unwrap();
    let id = mm
        .map(
            Backing::PrivateHugetlb(PageSize::Size2M),
            len,
            Placement::pud_offset(M2),
        )
        .unwrap();
    let b = mm.region(id).unwrap().base;
    mm.populate(HvaRange::new(b, b + populated)).unwrap();
    (mm, b)
}

impl InvalidationSubscriber for Recorder {
    fn invalidate_range_start(&self, inv: &Invalidation) {
        self.record(Phase::Start, inv);
    }
    fn invalidate_range_end(&self, inv: &Invalidation) {
        self.record(Phase::End, inv);
    }
}

/// The start/end pair of the invalidation covering `probe`.
fn pair(log: &[Rec], probe: HvaRange) -> (Rec, Rec) {
    let s = log
        .iter()
        .position(|r| r.phase == Phase::Start && r.inv.range.overlaps(&probe))
        .expect("a start covering the probe");
    let e = log
        .iter()
        .position(|r| r.phase == Phase::End && r.inv == log[s].inv)
        .expect("a matching end");
    assert!(s < e, "start must come before end: {log:?}");
    (log[s], log[e])
}

fn hugepages(n: u64) -> Option<HugepageReservation> {
    let r = HugepageReservation::reserve(PageSize::Size2M, n).ok();
    let ok = r.as_ref().map(|r| r.available >= n).unwrap_or(false);
    if require(&format!("{n} free 2 MiB hugepages"), ok) {
        r
    } else {
        None
    }
}

#[test]
fn operations_start_before_pages_go_and_end_after() {
    if !require("root (hugepage reservation)", notifier::error::is_root()) {
        return;
    }
    let Some(_hp) = hugepages(32) else { return };
    let (rec, subs) = recording();
    let mut mm = HostMm::new(subs).unwrap();
    let id = mm
        .map(
            Backing::PrivateHugetlb(PageSize::Size2M),
            16 << 20,
            Placement::pud_offset(M2),
        )
        .unwrap();
    let b = mm.region(id).unwrap().base;
    let probe = HvaRange::new(b, b + 4096);
    rec.set_probe(probe);

    // DONTNEED: present at start, gone at end.
    mm.populate(HvaRange::new(b, b + 8 * M2)).unwrap();
    mm.discard(HvaRange::new(b, b + M2), Discard::DontNeed)
        .unwrap();
    let (s, e) = pair(&rec.take(), probe);
    assert_eq!(
        (s.probe_present, e.probe_present),
        (Some(true), Some(false))
    );
    assert_eq!(s.inv.delivery, Delivery::Before);
    assert_eq!(s.inv.event, MmuNotifyEvent::Clear);
    assert!(s.inv.blockable);

    // mprotect: present at both (nothing is discarded).
    mm.populate(HvaRange::new(b, b + M2)).unwrap();
    mm.protect(HvaRange::new(b, b + M2), libc::PROT_READ)
        .unwrap();
    let (s, e) = pair(&rec.take(), probe);
    assert_eq!((s.probe_present, e.probe_present), (Some(true), Some(true)));
    assert_eq!(s.inv.event, MmuNotifyEvent::ProtectionVma);

    // munmap: present at start, gone at end.
    let probe2 = HvaRange::new(b + 2 * M2, b + 2 * M2 + 4096);
    rec.set_probe(probe2);
    mm.unmap(HvaRange::new(b + 2 * M2, b + 3 * M2)).unwrap();
    let (s, e) = pair(&rec.take(), probe2);
    assert_eq!(
        (s.probe_present, e.probe_present),
        (Some(true), Some(false))
    );
    assert_eq!(s.inv.event, MmuNotifyEvent::Unmap);

    // Hole punch in a shared memfd: present at start, gone at end.
    let sid = mm
        .map(
            Backing::SharedMemfd(PageSize::Size2M),
            16 << 20,
            Placement::pud_offset(M2),
        )
        .unwrap();
    let sb = mm.region(sid).unwrap().base;
    let probe3 = HvaRange::new(sb + M2, sb + M2 + 4096);
    rec.set_probe(probe3);
    mm.populate(HvaRange::new(sb, sb + 4 * M2)).unwrap();
    mm.punch_hole(sid, M2, M2).unwrap();
    let (s, e) = pair(&rec.take(), probe3);
    assert_eq!(
        (s.probe_present, e.probe_present),
        (Some(true), Some(false))
    );
}

/// Pins the calling thread to one CPU; restores the old mask on drop.
struct Pin(libc::cpu_set_t);

impl Pin {
    fn to(cpu: usize) -> Self {
        // SAFETY: cpu_set_t is plain data.
        let mut old: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: valid out-pointer of the right size; pid 0 = this thread.
        let rc =
            unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut old) };
        assert_eq!(rc, 0);
        // SAFETY: as above.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid cpu_set_t.
        unsafe { libc::CPU_SET(cpu, &mut set) };
        // SAFETY: valid mask of the right size; pid 0 = this thread.
        let rc =
            unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
        assert_eq!(rc, 0);
        Pin(old)
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        // SAFETY: restoring the mask read in `to`.
        unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &self.0) };
    }
}

#[test]
fn uffd_remove_before_the_zap_unmap_remap_fork_after_the_fact() {
    if !require("root (SCHED_FIFO, hugepages)", notifier::error::is_root()) {
        return;
    }
    let Some(_hp) = hugepages(32) else { return };
    let (rec, subs) = recording();
    let _pin = Pin::to(0);
    let src = match UffdSource::start(
        subs,
        UffdOptions {
            realtime_cpu: Some(0),
        },
    ) {
        Ok(s) => s,
        Err(e) => panic!("userfaultfd source: {e}"),
    };
    // The operations' own announcements go to an empty list: only the
    // userfaultfd source reports to the recorder here.
    let (mut mm, b) = quiet_private_region(16 << 20, 8 * M2);
    src.register(mm.shapes(HvaRange::new(b, b + 1))[0]).unwrap();

    for round in 0..5u64 {
        let at = b + round * M2;
        let probe = HvaRange::new(at, at + 4096);
        rec.set_probe(probe);
        mm.discard(HvaRange::new(at, at + M2), Discard::DontNeed)
            .unwrap();
        let log = rec.wait_end(MmuNotifyEvent::Clear, Duration::from_secs(2));
        let (s, e) = pair(&log, probe);
        assert_eq!(s.inv.delivery, Delivery::Before);
        assert_eq!(s.inv.range, HvaRange::new(at, at + M2));
        assert_eq!(
            s.probe_present,
            Some(true),
            "round {round}: REMOVE start must come before the zap: {log:?}"
        );
        assert_eq!(
            e.probe_present,
            Some(false),
            "round {round}: REMOVE end must come after the zap: {log:?}"
        );
    }

    let gone = HvaRange::new(b + 6 * M2, b + 7 * M2);
    rec.set_probe(gone);
    mm.unmap(gone).unwrap();
    let log = rec.wait_end(MmuNotifyEvent::Unmap, Duration::from_secs(2));
    let (s, _) = pair(&log, gone);
    assert_eq!(s.inv.delivery, Delivery::AfterTheFact);
    assert_eq!(s.inv.range, gone);
    assert_eq!(
        s.probe_present,
        Some(false),
        "UNMAP arrives after the pages are gone"
    );

    // REMOVE on a shared VMA spanning an aligned 1 GiB block is widened to
    // that block, like the kernel's own notifier.
    let sid = mm
        .map(
            Backing::SharedMemfd(PageSize::Size2M),
            2 << 30,
            Placement::pud_aligned(),
        )
        .unwrap();
    let sb = mm.region(sid).unwrap().base;
    let at = sb + (512 << 20);
    mm.populate(HvaRange::new(at, at + M2)).unwrap();
    src.register(mm.shapes(HvaRange::new(sb, sb + 1))[0])
        .unwrap();
    let probe = HvaRange::new(at, at + 4096);
    rec.set_probe(probe);
    mm.discard(HvaRange::new(at, at + M2), Discard::DontNeed)
        .unwrap();
    let log = rec.wait_end(MmuNotifyEvent::Clear, Duration::from_secs(2));
    let (s, e) = pair(&log, probe);
    assert_eq!(s.inv.range, HvaRange::new(sb, sb + (1 << 30)));
    assert_eq!(
        (s.probe_present, e.probe_present),
        (Some(true), Some(false))
    );

    // mremap: REMAP (and UNMAP of the old range) after the fact.
    let old = HvaRange::new(b + 7 * M2, b + 8 * M2);
    let dst = mm
        .reserve(
            M2,
            Placement {
                align: M2,
                offset: 0,
            },
        )
        .unwrap();
    rec.set_probe(old);
    mm.remap(old, dst.start).unwrap();
    let log = rec.wait_end(MmuNotifyEvent::Unmap, Duration::from_secs(2));
    let (s, _) = pair(&log, old);
    assert_eq!(s.inv.delivery, Delivery::AfterTheFact);
    assert_eq!(s.inv.range, old);

    // fork: the parent's private mappings were write-protected for COW.
    // SAFETY: the child only calls _exit (async-signal-safe).
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: leaving the child at once, without running destructors.
        unsafe { libc::_exit(0) };
    }
    assert!(pid > 0, "fork failed");
    let mut status = 0;
    // SAFETY: waiting for the child just created.
    unsafe { libc::waitpid(pid, &mut status, 0) };
    let log = rec.wait_end(MmuNotifyEvent::ProtectionPage, Duration::from_secs(2));
    let fork_inv = log
        .iter()
        .find(|r| r.inv.event == MmuNotifyEvent::ProtectionPage)
        .expect("FORK delivered as PROTECTION_PAGE");
    assert_eq!(fork_inv.inv.delivery, Delivery::AfterTheFact);
    assert_eq!(fork_inv.inv.range, HvaRange::new(b, b + (16 << 20)));
}

#[test]
fn tracepoint_events_are_after_the_fact() {
    if !require("root", notifier::error::is_root()) {
        return;
    }
    if !require("/dev/kvm", Path::new("/dev/kvm").exists()) {
        return;
    }
    let Some(_hp) = hugepages(8) else { return };
    let mut trace = match TraceSource::open() {
        Ok(t) => t,
        Err(e) => {
            if require(&format!("kvm tracepoint source ({e})"), false) {
                unreachable!()
            }
            return;
        }
    };
    let (rec, subs) = recording();
    let (mut mm, b) = quiet_private_region(8 << 20, 4 * M2);
    trace.collect().unwrap();
    let predicted = mm
        .discard(HvaRange::new(b, b + M2), Discard::DontNeed)
        .unwrap();
    trace.pump(&subs).unwrap();
    let log = rec.take();
    let (s, e) = pair(&log, predicted[0].range);
    assert_eq!(s.inv.range, predicted[0].range);
    assert_eq!(s.inv.delivery, Delivery::AfterTheFact);
    assert_eq!(s.inv.event, MmuNotifyEvent::Unknown);
    assert_eq!(e.inv, s.inv);

    // Dropping the source removes its tracefs instance.
    let instance = trace.instance().to_path_buf();
    assert!(instance.is_dir());
    drop(trace);
    assert!(!instance.exists(), "{} left behind", instance.display());
}

/// Measurement, not a pass/fail rule: how often a REMOVE `start` beats the
/// zap, with an ordinary handler thread and with a SCHED_FIFO handler on the
/// CPU the caller is pinned to.
/// `cargo test --release -p integration-tests --test notifier_order -- --ignored --nocapture`
#[test]
#[ignore]
fn measure_remove_race() {
    if !require("root (hugepages)", notifier::error::is_root()) {
        return;
    }
    let Some(_hp) = hugepages(8) else { return };
    for realtime in [false, true] {
        let (rec, subs) = recording();
        let _pin = realtime.then(|| Pin::to(0));
        let opts = UffdOptions {
            realtime_cpu: realtime.then_some(0),
        };
        let src = UffdSource::start(subs, opts).unwrap();
        let (mut mm, b) = quiet_private_region(2 * M2, 2 * M2);
        src.register(mm.shapes(HvaRange::new(b, b + 1))[0]).unwrap();
        let probe = HvaRange::new(b, b + 4096);
        rec.set_probe(probe);
        let rounds = 200;
        let mut before = 0;
        for _ in 0..rounds {
            mm.populate(HvaRange::new(b, b + M2)).unwrap();
            mm.discard(HvaRange::new(b, b + M2), Discard::DontNeed)
                .unwrap();
            let log = rec.wait_end(MmuNotifyEvent::Clear, Duration::from_secs(2));
            let (s, _) = pair(&log, probe);
            if s.probe_present == Some(true) {
                before += 1;
            }
        }
        let mode = if realtime {
            "SCHED_FIFO handler, caller pinned to its CPU"
        } else {
            "ordinary handler thread"
        };
        println!("REMOVE start saw the page still present in {before}/{rounds} rounds ({mode})");
    }
}
