//! The scenarios of `vmm latency` and one measured iteration of each:
//! host syscall time, the tracepoint's ranges for it, the probe's window,
//! and the project's MMU zaps.

use super::session::Session;
use super::LatencyError;
use crate::memory::uffd::UffdGuestRam;
use guests::probe::{ProbeMode, ProbeWindow};
use notifier::ops::Discard;
use notifier::sched::mono_ns;
use notifier::trace::{TraceEvent, TraceSource};
use notifier::HvaRange;
use std::sync::Arc;
use std::time::Duration;

/// What the scenarios run on: guest RAM with the project's MMUs, and the
/// guest layer where there is one (the built-in probe: [`Session`]; the
/// Linux guest: [`super::linux::LinuxSession`], no guest layer).
pub trait Target {
    fn ram(&self) -> &Arc<UffdGuestRam>;
    fn mem(&self) -> u64 {
        self.ram().size()
    }
    /// The TDP MMU's zaps since the last call (None: no project MMU).
    fn tdp_zaps(&self) -> Option<Vec<mmu::yielder::YieldReport>>;
    /// The shadow MMU's zaps since the last call, with the rmaps they
    /// walked (None: no shadow MMU).
    fn shadow_sample(&self) -> Option<MmuSample>;
    /// Map what the guest touches in `[gs, ge)` in the project's MMUs.
    fn remap_mmu(&self, gs: u64, ge: u64) -> Result<(), LatencyError>;
    /// Close the guest layer's window and open the next (None: the target
    /// has no guest layer).
    fn close_window(&mut self) -> Result<Option<ProbeWindow>, LatencyError>;
    /// After an operation: let the guest touch its RAM again.
    fn settle(&mut self) -> Result<(), LatencyError>;
    /// Put guest RAM into `state` (outside any measurement).
    fn prepare(&mut self, state: State) -> Result<(), LatencyError>;
    /// Before an operation that drops the page cache of `[gs, ge)` (hole
    /// punch, MADV_REMOVE): keep what the guest needs back (untimed).
    fn before_drop(&mut self, gs: u64, ge: u64) -> Result<(), LatencyError>;
    /// After it: re-fill the page cache so the next touch is a MINOR
    /// fault again (untimed).
    fn after_drop(&mut self, gs: u64, ge: u64) -> Result<(), LatencyError>;
    /// An operation failed with `e`: if one of the target's threads died
    /// (and so caused it), that thread's own error instead.
    fn root_cause(&mut self, e: LatencyError) -> LatencyError {
        e
    }
}

/// The fault thread's own error once it died (its flag raised), joined.
pub(super) fn fault_thread_death(
    t: &mut Option<crate::memory::fault::FaultThread>,
) -> Option<LatencyError> {
    if !t
        .as_ref()?
        .progress
        .failed()
        .load(std::sync::atomic::Ordering::Acquire)
    {
        return None;
    }
    let t = t.take()?;
    Some(match crate::thread::join("uffd-fault", t.handle) {
        Ok(Err(e)) => LatencyError::Guest(format!("fault thread: {e}")),
        Ok(Ok(_)) => LatencyError::Guest("the fault thread stopped".into()),
        Err(p) => LatencyError::Guest(p.to_string()),
    })
}

/// The VMM's operation on guest RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Op {
    /// `mprotect(PROT_READ)`, then back to RW (timed as `restore`).
    Protect,
    /// `madvise(MADV_DONTNEED)`.
    DiscardDontneed,
    /// `madvise(MADV_REMOVE)` (shared only; the page cache is re-filled
    /// afterwards, untimed).
    DiscardRemove,
    /// `fallocate(PUNCH_HOLE)` on the memfd (re-filled afterwards, untimed).
    PunchHole,
    /// `UFFDIO_WRITEPROTECT` on, then off (timed as `restore`).
    WriteProtect,
    /// NUMA-hinting protection by the kernel's `task_numa_work`.
    NumaHint,
    /// The same window with guest RAM opted out of NUMA balancing by its
    /// memory policy (`mbind(MPOL_LOCAL)`: [`notifier::mempolicy`]), the
    /// mitigation measured beside [`Op::NumaHint`].
    NumaHintOptOut,
}

impl Op {
    pub fn name(self) -> &'static str {
        match self {
            Op::Protect => "protect",
            Op::DiscardDontneed => "discard_dontneed",
            Op::DiscardRemove => "discard_remove",
            Op::PunchHole => "punch_hole",
            Op::WriteProtect => "write_protect",
            Op::NumaHint => "numa_hint",
            Op::NumaHintOptOut => "numa_hint_mbind_local",
        }
    }

    /// A window of the kernel's NUMA scanner rather than a syscall.
    pub fn is_numa(self) -> bool {
        matches!(self, Op::NumaHint | Op::NumaHintOptOut)
    }
}

/// What guest RAM holds when the operation runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// The probe touches its whole working set.
    Populated,
    /// One huge page per GiB present and touched.
    Sparse,
    /// Only the system page present; the probe touches nothing.
    Empty,
}

impl State {
    pub fn name(self) -> &'static str {
        match self {
            State::Populated => "populated",
            State::Sparse => "sparse",
            State::Empty => "empty",
        }
    }
    pub fn probe_mode(self) -> ProbeMode {
        match self {
            State::Populated => ProbeMode::All,
            State::Sparse => ProbeMode::Sparse,
            State::Empty => ProbeMode::Idle,
        }
    }
}

/// One scenario: an operation over gpas `[gs, ge)` in a RAM state.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Scenario {
    pub op: Op,
    pub state: State,
    pub gs: u64,
    pub ge: u64,
    /// "2M", "1G", "whole".
    pub size: String,
}

impl Scenario {
    pub fn name(&self) -> String {
        format!("{}/{}/{}", self.op.name(), self.size, self.state.name())
    }
    pub fn range_bytes(&self) -> u64 {
        self.ge - self.gs
    }
}

/// The project's MMU work for one syscall (all zaps it caused).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct MmuSample {
    pub zaps: u64,
    pub total_ns: u64,
    pub longest_ns: u64,
    /// Units of zap work (leaves visited).
    pub units: u64,
    pub yields: u64,
    /// Shadow MMU: rmap heads visited.
    pub rmaps: u64,
    /// Shadow MMU: shadow pages (of guest page tables) zapped, with the
    /// children they orphaned (a range over the probe's page tables drops
    /// the whole hierarchy).
    pub shadow_pages: u64,
}

/// One `kvm_unmap_hva_range` record of a measured syscall.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct TraceRange {
    /// The range as guest-physical addresses (hva - guest RAM base; a
    /// range may start below gpa 0 or end above RAM: printed as the kernel
    /// gave it, offset by the base).
    pub gpa_start: i64,
    pub gpa_end: i64,
    /// After the syscall's entry (trace clock mono), ns.
    pub at_ns: Option<u64>,
}

/// One iteration.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Sample {
    /// The operation's syscall (CLOCK_MONOTONIC around it; it includes
    /// real KVM's zap and, unless plain KVM, the project's MMU zap).
    pub host_ns: u64,
    /// The restoring syscall, where there is one.
    pub restore_ns: Option<u64>,
    /// Tracepoint ranges over guest RAM from this thread during the
    /// operation's syscall / the restoring one.
    pub ranges: u64,
    pub restore_ranges: u64,
    /// Syscall entry to the first notifier (tracepoint timestamp; needs
    /// the mono trace clock).
    pub entry_to_notify_ns: Option<u64>,
    /// First notifier to syscall return.
    pub notify_to_return_ns: Option<u64>,
    /// The probe's longest gap in the window around the iteration.
    pub guest_max_gap_ns: Option<u64>,
    pub guest_stalls: u64,
    pub guest_stall_ns: u64,
    pub mmu: Option<MmuSample>,
    pub restore_mmu: Option<MmuSample>,
    /// The shadow MMU's zaps for the operation's syscall.
    pub shadow: Option<MmuSample>,
    /// The tracepoint's records for the operation's syscall.
    pub trace: Vec<TraceRange>,
}

/// The tracepoint source with what is needed to attribute its events.
pub struct Tracer {
    pub src: TraceSource,
    /// Whether event timestamps are CLOCK_MONOTONIC (`trace_clock` mono
    /// set on the instance and verified).
    pub mono: bool,
}

impl Tracer {
    pub fn open() -> Result<Self, notifier::Error> {
        let src = TraceSource::open()?;
        let mono = std::fs::write(src.instance().join("trace_clock"), "mono").is_ok();
        Ok(Tracer { src, mono })
    }

    fn mark(&mut self) -> Result<u64, LatencyError> {
        Ok(self.src.sentinel()?)
    }

    fn drain(&mut self, n: u64) -> Result<Vec<TraceEvent>, LatencyError> {
        Ok(self.src.drain_until(n, Duration::from_secs(5))?)
    }
}

fn gettid() -> i32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() }
}

pub(super) fn fold(zaps: Vec<mmu::yielder::YieldReport>) -> MmuSample {
    let mut out = MmuSample::default();
    for r in zaps {
        out.zaps += 1;
        out.total_ns += r.total_ns;
        out.longest_ns = out.longest_ns.max(r.longest.ns);
        out.units += r.units;
        out.yields += r.yields;
    }
    out
}

/// The TDP MMU's zaps since the last call.
fn mmu_sample(s: &dyn Target) -> Option<MmuSample> {
    s.tdp_zaps().map(fold)
}

fn shadow_sample(s: &dyn Target) -> Option<MmuSample> {
    s.shadow_sample()
}

/// Forget zaps not caused by a measured syscall.
pub(super) fn discard_zaps(s: &dyn Target) {
    let _ = (mmu_sample(s), shadow_sample(s));
}

/// Run the operation's syscall(s) once; returns (host ns, restore ns).
fn run_op(s: &dyn Target, sc: &Scenario, restore: bool) -> Result<u64, LatencyError> {
    let ram = s.ram();
    let base = ram.guest_hva();
    let r = HvaRange::new(base + sc.gs, base + sc.ge);
    let mut mm = ram.hostmm();
    let t0 = mono_ns();
    let res = match (sc.op, restore) {
        (Op::Protect, false) => mm.protect(r, libc::PROT_READ).map(drop),
        (Op::Protect, true) => mm.protect(r, libc::PROT_READ | libc::PROT_WRITE).map(drop),
        (Op::WriteProtect, w) => mm.write_protect(ram.uffd(), r, !w).map(drop),
        (Op::DiscardDontneed, _) => mm.discard(r, Discard::DontNeed).map(drop),
        (Op::DiscardRemove, _) => mm.discard(r, Discard::Remove).map(drop),
        (Op::PunchHole, _) => mm.punch_hole(ram.region(), sc.gs, sc.ge - sc.gs).map(drop),
        (Op::NumaHint | Op::NumaHintOptOut, _) => Ok(()),
    };
    let t1 = mono_ns();
    res.map_err(|e| LatencyError::Op {
        op: sc.op.name(),
        source: e,
    })?;
    Ok(t1 - t0)
}

fn has_restore(op: Op) -> bool {
    matches!(op, Op::Protect | Op::WriteProtect)
}

/// Put guest RAM into `state` (outside any measurement): discard the
/// working set and let the probe touch what the state keeps.
pub(super) fn prepare(s: &mut Session, state: State) -> Result<(), LatencyError> {
    if state != State::Populated || s.mode() != ProbeMode::All {
        s.set_mode(ProbeMode::Idle)?;
        let ram = s.ram.clone();
        let base = ram.guest_hva();
        let p = s.params;
        let ps = ram.page_bytes();
        let ws0 = p.ws_base.div_ceil(ps) * ps;
        if ws0 < ram.size() {
            let r = HvaRange::new(base + ws0, base + ram.size());
            ram.hostmm()
                .discard(r, Discard::DontNeed)
                .map_err(|e| LatencyError::Op {
                    op: "discard (preparing the RAM state)",
                    source: e,
                })?;
        }
        discard_zaps(s);
        s.set_mode(state.probe_mode())?;
    }
    s.wait_passes(2)?;
    Target::remap_mmu(s, 0, s.mem())?;
    discard_zaps(s);
    Ok(())
}

/// One measured iteration of `sc` (not NUMA hinting: see [`numa_window`]).
pub fn iteration(
    s: &mut dyn Target,
    tr: Option<&mut Tracer>,
    sc: &Scenario,
) -> Result<Sample, LatencyError> {
    s.remap_mmu(sc.gs, sc.ge)?;
    discard_zaps(s);
    let mut tr = tr;
    let tid = gettid();
    let mut marks = None;
    if let Some(t) = tr.as_deref_mut() {
        let m0 = t.mark()?;
        t.drain(m0)?;
    }
    let drops = matches!(sc.op, Op::PunchHole | Op::DiscardRemove);
    if drops {
        s.before_drop(sc.gs, sc.ge)?;
    }
    // Open the window; the guest restarts its pass.
    s.close_window()?;
    let t0 = mono_ns();
    let host_ns = run_op(s, sc, false)?;
    let mmu = mmu_sample(s);
    let shadow = shadow_sample(s);
    if let Some(t) = tr.as_deref_mut() {
        marks = Some((t.mark()?, 0));
    }
    let (restore_ns, restore_mmu) = if has_restore(sc.op) {
        let ns = run_op(s, sc, true)?;
        let r = mmu_sample(s);
        discard_zaps(s);
        (Some(ns), r)
    } else {
        (None, None)
    };
    if let (Some(t), Some(m)) = (tr.as_deref_mut(), marks.as_mut()) {
        m.1 = t.mark()?;
    }
    if drops {
        s.after_drop(sc.gs, sc.ge)?;
    }
    s.settle()?;
    let w = s.close_window()?;
    let mut sample = Sample {
        host_ns,
        restore_ns,
        mmu,
        restore_mmu,
        shadow,
        ..Sample::default()
    };
    guest_window(&mut sample, w);
    if let (Some(t), Some((m1, m2))) = (tr, marks) {
        let guest = s.ram().guest_range();
        let ours = |e: &TraceEvent| e.tid == tid && e.range.overlaps(&guest);
        let first: Vec<TraceEvent> = t.drain(m1)?.into_iter().filter(ours).collect();
        let second: Vec<TraceEvent> = t.drain(m2)?.into_iter().filter(ours).collect();
        sample.ranges = first.len() as u64;
        sample.restore_ranges = second.len() as u64;
        let base = s.ram().guest_hva();
        sample.trace = first
            .iter()
            .map(|e| trace_range(e, base, t0, t.mono))
            .collect();
        if t.mono {
            if let Some(f) = first.iter().map(|e| e.timestamp_ns).min() {
                let t1 = t0 + host_ns;
                if f >= t0 && f <= t1 {
                    sample.entry_to_notify_ns = Some(f - t0);
                    sample.notify_to_return_ns = Some(t1 - f);
                }
            }
        }
    }
    Ok(sample)
}

/// NUMA hinting over one window of `len`: the kernel's scanner runs
/// (`kernel.numa_balancing=1`, a busy thread of this process touching an
/// anonymous control region), the probe keeps touching. The window is
/// stretched (up to three times `len`) until the scanner has been seen on
/// the control region: `task_tick_numa()` queues the scan only once a
/// thread has run for its scan period (CPU time, not wall time), so "no
/// range on guest RAM" is a finding only where the scanner ran at all.
/// The ranges seen on guest RAM are then delivered to the project's MMUs.
/// Returns the sample for guest RAM and the tracepoint ranges seen on the
/// control region.
pub fn numa_window(
    s: &mut dyn Target,
    tr: Option<&mut Tracer>,
    control: HvaRange,
    len: Duration,
) -> Result<(Sample, u64), LatencyError> {
    discard_zaps(s);
    let mut tr = tr;
    if let Some(t) = tr.as_deref_mut() {
        let m0 = t.mark()?;
        t.drain(m0)?;
    }
    s.close_window()?;
    let t0 = mono_ns();
    let opened = std::time::Instant::now();
    let step = len.min(Duration::from_millis(500));
    let tids = our_tids();
    let mine = |e: &TraceEvent| tids.contains(&e.tid);
    let mut ev: Vec<TraceEvent> = Vec::new();
    loop {
        std::thread::sleep(step);
        let Some(t) = tr.as_deref_mut() else {
            if opened.elapsed() >= len {
                break;
            }
            continue;
        };
        let m = t.mark()?;
        ev.extend(t.drain(m)?);
        let scanned = ev.iter().any(|e| mine(e) && e.range.overlaps(&control));
        let long = opened.elapsed();
        if long >= len && (scanned || long >= 3 * len) {
            break;
        }
    }
    let w = s.close_window()?;
    let mut sample = Sample::default();
    guest_window(&mut sample, w);
    let guest = s.ram().guest_range();
    let on_guest: Vec<TraceEvent> = ev
        .iter()
        .filter(|e| mine(e) && e.range.overlaps(&guest))
        .copied()
        .collect();
    let on_control = ev
        .iter()
        .filter(|e| mine(e) && e.range.overlaps(&control))
        .count() as u64;
    if let Some(t) = tr {
        sample.ranges = on_guest.len() as u64;
        sample.trace = on_guest
            .iter()
            .map(|e| trace_range(e, guest.start, t0, t.mono))
            .collect();
        // The kernel's NUMA scanner is nobody's syscall: the tracepoint is
        // the only source that sees it (after the fact), and delivers it to
        // the project's MMUs now (host/events.rs: an after-the-fact zap of a
        // range the host already restored is harmless).
        TraceSource::deliver(s.ram().subscribers(), &on_guest);
    }
    sample.mmu = mmu_sample(s);
    sample.shadow = shadow_sample(s);
    Ok((sample, on_control))
}

/// A tracepoint record as gpas, timed from `t0` (the mono trace clock).
fn trace_range(e: &TraceEvent, base: u64, t0: u64, mono: bool) -> TraceRange {
    TraceRange {
        gpa_start: e.range.start.wrapping_sub(base).cast_signed(),
        gpa_end: e.range.end.wrapping_sub(base).cast_signed(),
        at_ns: (mono && e.timestamp_ns >= t0).then(|| e.timestamp_ns - t0),
    }
}

/// The guest layer's figures from its window, if it has one.
fn guest_window(sample: &mut Sample, w: Option<ProbeWindow>) {
    let Some(w) = w else { return };
    let ns = |t: u64| mmu::clock::nanos(t);
    sample.guest_max_gap_ns = Some(ns(w.max_gap_tsc));
    sample.guest_stalls = w.stall_count;
    sample.guest_stall_ns = ns(w.stall_sum_tsc);
}

/// The thread ids of this process (`/proc/self/task`).
fn our_tids() -> Vec<i32> {
    std::fs::read_dir("/proc/self/task")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The scenarios for RAM of `mem` bytes on `page`-byte huge pages.
/// `shared`: the RAM is a memfd (hole punch and MADV_REMOVE apply);
/// `uffd`: userfaultfd is registered (write-protect applies);
/// `numa_scanned`: NUMA balancing scans the RAM (not hugetlb), so the
/// opt-out is measured beside it.
/// Returns the scenarios and what was left out, with why.
pub fn scenarios(
    mem: u64,
    page: u64,
    shared: bool,
    uffd: bool,
    numa_scanned: bool,
) -> (Vec<Scenario>, Vec<(String, String)>) {
    const G: u64 = 1 << 30;
    let mut out = Vec::new();
    let mut skipped = Vec::new();
    // 2M: the first working-set page; 1G: [1G, 2G) (holds the second
    // sparse page); whole: all RAM, the system page included.
    let mut sizes: Vec<(String, u64, u64)> = Vec::new();
    if page <= 2 << 20 {
        sizes.push(("2M".into(), 2 << 20, 4 << 20));
    } else {
        skipped.push((
            "2M ranges".into(),
            format!(
                "guest RAM is on {} MiB pages: hugetlb ranges must be page-aligned",
                page >> 20
            ),
        ));
    }
    if mem >= 2 * G {
        sizes.push(("1G".into(), G, 2 * G));
    } else {
        skipped.push((
            "1G ranges".into(),
            format!(
                "guest RAM is {} MiB: a 1 GiB range off the system page needs 2 GiB",
                mem >> 20
            ),
        ));
    }
    for state in [State::Populated, State::Sparse, State::Empty] {
        for (size, gs, ge) in sizes.iter().cloned().chain([("whole".to_string(), 0, mem)]) {
            out.push(Scenario {
                op: Op::Protect,
                state,
                gs,
                ge,
                size,
            });
        }
    }
    let mut ops = vec![Op::DiscardDontneed];
    if shared {
        ops.extend([Op::DiscardRemove, Op::PunchHole]);
    } else {
        skipped.push((
            "discard_remove, punch_hole".into(),
            "private RAM has no file to punch (MADV_REMOVE answers EACCES)".into(),
        ));
    }
    if uffd {
        ops.push(Op::WriteProtect);
    } else {
        skipped.push((
            "write_protect".into(),
            "plain KVM RAM is not registered with userfaultfd (UFFDIO_WRITEPROTECT needs it)"
                .into(),
        ));
    }
    for op in ops {
        for (size, gs, ge) in sizes.iter().cloned() {
            out.push(Scenario {
                op,
                state: State::Populated,
                gs,
                ge,
                size,
            });
        }
    }
    out.push(Scenario {
        op: Op::NumaHint,
        state: State::Populated,
        gs: 0,
        ge: mem,
        size: "whole".into(),
    });
    if numa_scanned {
        out.push(Scenario {
            op: Op::NumaHintOptOut,
            state: State::Populated,
            gs: 0,
            ge: mem,
            size: "whole".into(),
        });
    } else {
        skipped.push((
            "numa_hint_mbind_local".into(),
            "task_numa_work skips hugetlb VMAs: there is nothing to opt out of".into(),
        ));
    }
    (out, skipped)
}

#[cfg(test)]
mod tests {
    use super::*;

    const M: u64 = 1 << 20;
    const G: u64 = 1 << 30;

    #[test]
    fn shared_2m_plan_covers_every_operation() {
        let (scs, skipped) = scenarios(2 * G, 2 * M, true, true, false);
        // protect: 3 sizes x 3 states; 4 range operations x 2 sizes; NUMA.
        assert_eq!(scs.len(), 9 + 8 + 1);
        assert_eq!(skipped.len(), 1, "{skipped:?}");
        let whole = scs.iter().find(|s| s.size == "whole").unwrap();
        assert_eq!((whole.gs, whole.ge), (0, 2 * G));
        let g = scs.iter().find(|s| s.size == "1G").unwrap();
        assert_eq!(g.range_bytes(), G);
        // States are grouped, so each is prepared once.
        let states: Vec<State> = scs.iter().map(|s| s.state).collect();
        let changes = states.windows(2).filter(|w| w[0] != w[1]).count();
        assert_eq!(changes, 3);
    }

    #[test]
    fn private_and_1g_plans_say_what_they_leave_out() {
        let (scs, skipped) = scenarios(512 * M, 2 * M, false, false, false);
        assert!(scs
            .iter()
            .all(|s| !matches!(s.op, Op::PunchHole | Op::DiscardRemove | Op::WriteProtect)));
        assert!(scs.iter().all(|s| s.size != "1G"));
        assert_eq!(skipped.len(), 4, "{skipped:?}");
        let (scs, skipped) = scenarios(2 * G, G, true, true, false);
        assert!(scs.iter().all(|s| s.size != "2M"));
        assert!(skipped.iter().any(|(w, _)| w.contains("2M")));
        // Every range is aligned to the page size.
        for s in scs {
            assert_eq!(s.gs % G, 0, "{}", s.name());
            assert_eq!(s.ge % G, 0, "{}", s.name());
        }
    }
}
