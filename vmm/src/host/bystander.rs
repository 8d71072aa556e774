//! A "bystander" that invalidates guest RAM behind the VMM's back: raw
//! `madvise`/`mprotect` on guest RAM from its own thread, not through
//! `HostMm`, so only the kernel-side sources ([`super::events`]) can tell
//! the MMU. While the guest runs, operations that keep the data
//! (`MADV_DONTNEED` - the memfd's page cache keeps it - and `mprotect`
//! adding then dropping `PROT_EXEC`, which the guest does not notice); at
//! pass boundaries, with the vCPU stopped, `MADV_REMOVE` (data zeroed,
//! accounted for in the expected checksum) and `mprotect(PROT_READ)` then
//! back, each followed by a bounded wait for the MMU to have been zapped by
//! the uffd event or the tracepoint.

use super::events::EventsError;
use super::invalidator::Invalidator;
use crate::failpoint::{self, Point};
use crate::memory::uffd::UffdGuestRam;
use guests::builtin::Zeroed;
use mmu::memslot::PAGE_SHIFT;
use mmu::tdp::TdpMmu;
use notifier::convert::u64_to_usize;
use notifier::HvaRange;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What the bystander did.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct BystanderReport {
    /// Raw `MADV_DONTNEED` while the guest ran.
    pub concurrent_discards: u64,
    /// Raw `mprotect` pairs (RW -> RWX -> RW) while the guest ran.
    pub concurrent_protects: u64,
    /// Raw `MADV_REMOVE` at pass boundaries (data zeroed).
    pub boundary_removes: u64,
    /// Raw `mprotect(PROT_READ)` + back at pass boundaries.
    pub boundary_protects: u64,
    /// Boundary operations after which the MMU still mapped part of the
    /// range when the wait ran out (no source zapped it).
    pub zap_timeouts: u64,
    /// Boundary operations whose range the MMU mapped before (so the wait
    /// proved a zap).
    pub zaps_proven: u64,
}

enum Request {
    /// At the boundary before pass `next_pass` (vCPU stopped): run the
    /// boundary operations, reply, then wait for `Resume`.
    Boundary {
        next_pass: u64,
        reply: mpsc::Sender<Result<Vec<Zeroed>, EventsError>>,
    },
    Resume,
    Stop,
}

/// Raw madvise/mprotect on guest RAM from another thread. See the module docs.
/// Dropping it stops the thread.
pub struct Bystander {
    tx: mpsc::Sender<Request>,
    /// Raised when the thread ends on an error or a panic.
    failed: Arc<AtomicBool>,
    handle: Option<JoinHandle<Result<BystanderReport, EventsError>>>,
}

/// How long a boundary operation waits for the MMU to be zapped.
pub const ZAP_WAIT: Duration = Duration::from_secs(2);

struct Raw {
    ram: Arc<UffdGuestRam>,
    tdp: Arc<TdpMmu>,
    picker: Invalidator,
    /// Whether the tracepoint pump runs (mprotect is seen only by it).
    trace: bool,
    rep: BystanderReport,
}

impl Raw {
    fn range(&mut self) -> (u64, u64, HvaRange) {
        let (gs, ge) = self.picker.pick();
        let base = self.ram.guest_hva();
        (gs, ge, HvaRange::new(base + gs, base + ge))
    }

    fn err(op: &'static str, r: HvaRange) -> EventsError {
        EventsError::Raw {
            op,
            start: r.start,
            end: r.end,
            source: std::io::Error::last_os_error(),
        }
    }

    fn madvise(r: HvaRange, advice: libc::c_int, op: &'static str) -> Result<(), EventsError> {
        // SAFETY: `r` lies inside the guest-facing mapping (picked inside
        // the working set), which Rust code only reaches by pointer; the
        // advice drops page-table entries, never a Rust allocation.
        if unsafe { libc::madvise(r.start as *mut libc::c_void, u64_to_usize(r.len()), advice) }
            != 0
        {
            return Err(Self::err(op, r));
        }
        Ok(())
    }

    fn mprotect(r: HvaRange, prot: libc::c_int, op: &'static str) -> Result<(), EventsError> {
        // SAFETY: as in `madvise`; huge-page aligned inside guest RAM.
        if unsafe { libc::mprotect(r.start as *mut libc::c_void, u64_to_usize(r.len()), prot) } != 0
        {
            return Err(Self::err(op, r));
        }
        Ok(())
    }

    fn mapped(&self, gs: u64, ge: u64) -> bool {
        !self
            .tdp
            .leaves_in(gs >> PAGE_SHIFT, ge >> PAGE_SHIFT)
            .is_empty()
    }

    /// With the vCPU stopped nothing re-faults: wait until the MMU maps
    /// nothing in `[gs, ge)`.
    fn wait_zapped(&mut self, gs: u64, ge: u64, was_mapped: bool) {
        let t0 = Instant::now();
        while self.mapped(gs, ge) {
            if t0.elapsed() > ZAP_WAIT {
                self.rep.zap_timeouts += 1;
                return;
            }
            std::thread::sleep(Duration::from_micros(100));
        }
        if was_mapped {
            self.rep.zaps_proven += 1;
        }
    }

    fn concurrent(&mut self, n: u64) -> Result<(), EventsError> {
        let (_, _, r) = self.range();
        const RW: libc::c_int = libc::PROT_READ | libc::PROT_WRITE;
        if n.is_multiple_of(2) {
            Self::madvise(r, libc::MADV_DONTNEED, "madvise(MADV_DONTNEED)")?;
            self.rep.concurrent_discards += 1;
        } else {
            Self::mprotect(r, RW | libc::PROT_EXEC, "mprotect(RWX)")?;
            Self::mprotect(r, RW, "mprotect(RW)")?;
            self.rep.concurrent_protects += 1;
        }
        Ok(())
    }

    fn boundary(&mut self, next_pass: u64) -> Result<Vec<Zeroed>, EventsError> {
        let (gs, ge, r) = self.range();
        let was = self.mapped(gs, ge);
        Self::madvise(r, libc::MADV_REMOVE, "madvise(MADV_REMOVE)")?;
        self.rep.boundary_removes += 1;
        if self.ram.events() || self.trace {
            self.wait_zapped(gs, ge, was);
        }
        let zeroed = vec![Zeroed {
            before_pass: next_pass,
            start: gs,
            end: ge,
        }];
        let (gs, ge, r) = self.range();
        let was = self.mapped(gs, ge);
        Self::mprotect(r, libc::PROT_READ, "mprotect(PROT_READ)")?;
        if self.trace {
            self.wait_zapped(gs, ge, was);
        }
        Self::mprotect(r, libc::PROT_READ | libc::PROT_WRITE, "mprotect(RW)")?;
        self.rep.boundary_protects += 1;
        Ok(zeroed)
    }
}

impl Bystander {
    /// Start the thread: a concurrent operation every `every` on pages of
    /// the working set `picker` picks from. `trace`: whether the
    /// tracepoint pump runs (boundary mprotects then wait for its zap).
    pub fn start(
        ram: Arc<UffdGuestRam>,
        tdp: Arc<TdpMmu>,
        picker: Invalidator,
        every: Duration,
        trace: bool,
    ) -> Result<Self, EventsError> {
        let (tx, rx) = mpsc::channel();
        let failed = Arc::new(AtomicBool::new(false));
        let f = failed.clone();
        let on_fail = move || f.store(true, Ordering::Release);
        let handle = crate::thread::spawn_helper("bystander", on_fail, move || {
            let mut raw = Raw {
                ram,
                tdp,
                picker,
                trace,
                rep: BystanderReport::default(),
            };
            let mut n = 0u64;
            loop {
                match rx.recv_timeout(every) {
                    Err(mpsc::RecvTimeoutError::Timeout) => {
                        failpoint::hit(Point::Bystander)?;
                        raw.concurrent(n)?;
                        n += 1;
                    }
                    Ok(Request::Boundary { next_pass, reply }) => {
                        let _ = reply.send(raw.boundary(next_pass));
                        // Paused until the vCPU thread is done with
                        // the boundary (its checks must not race us).
                        match rx.recv() {
                            Ok(Request::Resume) => {}
                            _ => break,
                        }
                    }
                    Ok(Request::Resume) => {}
                    Ok(Request::Stop) | Err(mpsc::RecvTimeoutError::Disconnected) => break,
                }
            }
            Ok(raw.rep)
        })
        .map_err(|e| EventsError::Spawn("bystander", e))?;
        Ok(Bystander {
            tx,
            failed,
            handle: Some(handle),
        })
    }

    /// Raised when the thread died (an error or a panic).
    pub fn failed(&self) -> Arc<AtomicBool> {
        self.failed.clone()
    }

    /// At a pass boundary (vCPU stopped): run the boundary operations and
    /// pause the thread until [`resume`](Self::resume); returns the gpa
    /// ranges whose data was discarded.
    pub fn pause_at_boundary(&self, next_pass: u64) -> Result<Vec<Zeroed>, EventsError> {
        let (reply, rx) = mpsc::channel();
        self.tx
            .send(Request::Boundary { next_pass, reply })
            .map_err(|_| EventsError::BystanderGone)?;
        rx.recv().map_err(|_| EventsError::BystanderGone)?
    }

    pub fn resume(&self) {
        let _ = self.tx.send(Request::Resume);
    }

    /// Stop and report.
    pub fn finish(mut self) -> Result<BystanderReport, EventsError> {
        let _ = self.tx.send(Request::Stop);
        match self.handle.take() {
            Some(h) => crate::thread::join("bystander", h)?,
            None => Err(EventsError::Gone("bystander")),
        }
    }
}

impl Drop for Bystander {
    fn drop(&mut self) {
        let _ = self.tx.send(Request::Stop);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
