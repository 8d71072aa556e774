//! The invalidator: host invalidations of guest RAM the VMM makes itself
//! between the built-in guest's passes (and racing it), and the
//! MMU-vs-kernel agreement check.
//!
//! Between two passes (the vCPU stopped in a progress exit) the VMM runs
//! its own operations on part of the guest-facing mapping through
//! `notifier::ops`, which announce the kernel's notifier ranges to the
//! [`Subscribers`](notifier::Subscribers) the MMU's [`KvmMmuNotifier`](mmu::KvmMmuNotifier)
//! is registered with; the MMU zaps what they cover.
//!
//! | kind | operation | guest data |
//! |---|---|---|
//! | protect | `mprotect(PROT_READ)` then back to RW | kept |
//! | write-protect | `UFFDIO_WRITEPROTECT` on, then off | kept |
//! | discard | MINOR: `MADV_DONTNEED` (page cache keeps it); MISSING: `MADV_REMOVE` | MINOR kept; MISSING zeroed |
//! | punch-hole | `fallocate(PUNCH_HOLE)` on the memfd (MINOR: re-filled with zeroed pages so the next touch is a MINOR fault again) | zeroed |
//!
//! The agreement check (`--verify`): every huge page the MMU maps is
//! present in the guest-facing mapping (PAGEMAP_SCAN); after a zapping
//! operation (discard, punch-hole) its range is absent from both. A
//! protection change leaves host pages present and the MMU empty there,
//! which the check allows (the MMU may map less than the host has).

use crate::memory::uffd::UffdGuestRam;
use guests::builtin::Zeroed;
use mmu::memslot::PAGE_SHIFT;
use mmu::tdp::TdpMmu;
use notifier::convert::u64_to_usize;
use notifier::ops::Discard;
use notifier::HvaRange;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

/// Which invalidations run between passes (`--invalidate`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
pub enum InvalKind {
    None,
    Protect,
    #[value(alias = "wp")]
    WriteProtect,
    Discard,
    PunchHole,
    /// All four in turn.
    Mixed,
}

const ROTATION: [InvalKind; 4] = [
    InvalKind::Protect,
    InvalKind::WriteProtect,
    InvalKind::Discard,
    InvalKind::PunchHole,
];

#[derive(Debug, thiserror::Error)]
pub enum InvalError {
    #[error("{op} on [{start:#x}, {end:#x}): {source}")]
    Op {
        op: &'static str,
        start: u64,
        end: u64,
        #[source]
        source: notifier::Error,
    },
    #[error("PAGEMAP_SCAN: {0}")]
    Pagemap(#[source] notifier::Error),
    #[error("re-filling the page cache after a hole punch: {0}")]
    Refill(#[source] std::io::Error),
    #[error("the working set has no whole huge page to invalidate")]
    NoRoom,
    #[error(
        "racing discards need a page cache populated up front (--uffd minor or kernel-prefilled)"
    )]
    RaceNeedsPrefill,
    #[error("spawning the racer thread: {0}")]
    Spawn(#[source] std::io::Error),
    #[error(transparent)]
    Panicked(#[from] crate::thread::ThreadPanicked),
}

/// Runs invalidations and agreement checks; remembers what reads as zero.
pub struct Invalidator {
    ram: Arc<UffdGuestRam>,
    tdp: Arc<TdpMmu>,
    kind: InvalKind,
    verify: bool,
    /// Huge pages of the working set: [first, end) page indices.
    pages: (u64, u64),
    rng: u64,
    zeroed: Vec<Zeroed>,
    count: u64,
    checks: u64,
    failures: u64,
    /// The first few disagreements, for the report.
    pub mismatches: Vec<String>,
}

impl Invalidator {
    /// For the working set `[ws_base, ws_base + ws_size)`.
    pub fn new(
        ram: &Arc<UffdGuestRam>,
        tdp: &Arc<TdpMmu>,
        kind: InvalKind,
        verify: bool,
        ws_base: u64,
        ws_size: u64,
    ) -> Result<Self, InvalError> {
        let ps = ram.page_bytes();
        let first = ws_base.div_ceil(ps);
        let end = (ws_base + ws_size) / ps;
        if kind != InvalKind::None && first >= end {
            return Err(InvalError::NoRoom);
        }
        Ok(Invalidator {
            ram: ram.clone(),
            tdp: tdp.clone(),
            kind,
            verify,
            pages: (first, end),
            rng: 0x2545_f491_4f6c_dd1d,
            zeroed: Vec::new(),
            count: 0,
            checks: 0,
            failures: 0,
            mismatches: Vec::new(),
        })
    }

    pub fn zeroed(&self) -> &[Zeroed] {
        &self.zeroed
    }
    pub fn count(&self) -> u64 {
        self.count
    }
    pub fn checks(&self) -> u64 {
        self.checks
    }
    pub fn failures(&self) -> u64 {
        self.failures
    }

    /// A pseudo-random run of 1..=4 huge pages inside the working set, as a
    /// gpa range.
    pub fn pick(&mut self) -> (u64, u64) {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let (first, end) = self.pages;
        let n = end - first;
        let start = first + self.rng % n;
        let len = (1 + (self.rng >> 32) % 4).min(end - start);
        let ps = self.ram.page_bytes();
        (start * ps, (start + len) * ps)
    }

    /// `n` invalidations before pass `next_pass`, each followed by the
    /// agreement check when verifying.
    pub fn between_passes(&mut self, next_pass: u64, n: u64) -> Result<(), InvalError> {
        if self.kind == InvalKind::None {
            return Ok(());
        }
        for _ in 0..n {
            let kind = match self.kind {
                // Private RAM has no file to punch: its turn discards.
                InvalKind::Mixed => match ROTATION[u64_to_usize(self.count % 4)] {
                    InvalKind::PunchHole if !self.ram.is_shared() => InvalKind::Discard,
                    k => k,
                },
                k => k,
            };
            let (gs, ge) = self.pick();
            let zapped = self.apply(kind, gs, ge, next_pass)?;
            self.count += 1;
            if self.verify {
                self.check(zapped.then_some((gs, ge)))?;
            }
        }
        Ok(())
    }

    /// Run one operation on gpas `[gs, ge)`; returns whether it removed the
    /// host pages (so the range must be absent from both afterwards).
    fn apply(
        &mut self,
        kind: InvalKind,
        gs: u64,
        ge: u64,
        next_pass: u64,
    ) -> Result<bool, InvalError> {
        let base = self.ram.guest_hva();
        let r = HvaRange::new(base + gs, base + ge);
        let err = |op: &'static str| {
            move |source| InvalError::Op {
                op,
                start: r.start,
                end: r.end,
                source,
            }
        };
        let minor = self.ram.mode().prefilled();
        let mut mm = self.ram.hostmm();
        match kind {
            InvalKind::None | InvalKind::Mixed => Ok(false),
            InvalKind::Protect => {
                mm.protect(r, libc::PROT_READ)
                    .map_err(err("mprotect(PROT_READ)"))?;
                mm.protect(r, libc::PROT_READ | libc::PROT_WRITE)
                    .map_err(err("mprotect(PROT_READ|PROT_WRITE)"))?;
                Ok(false)
            }
            InvalKind::WriteProtect => {
                let uffd = self.ram.uffd();
                mm.write_protect(uffd, r, true)
                    .map_err(err("UFFDIO_WRITEPROTECT"))?;
                mm.write_protect(uffd, r, false)
                    .map_err(err("UFFDIO_WRITEPROTECT(off)"))?;
                Ok(false)
            }
            InvalKind::Discard => {
                // A shared memfd keeps its page cache across DONTNEED
                // (MINOR refaults find the data); MISSING needs the file
                // emptied too (REMOVE). Private RAM: DONTNEED drops the
                // pages themselves (REMOVE answers EACCES).
                let how = if minor || !self.ram.is_shared() {
                    Discard::DontNeed
                } else {
                    Discard::Remove
                };
                mm.discard(r, how).map_err(err("madvise"))?;
                if !minor {
                    self.zeroed.push(Zeroed {
                        before_pass: next_pass,
                        start: gs,
                        end: ge,
                    });
                }
                Ok(true)
            }
            InvalKind::PunchHole => {
                let region = self.ram.region();
                mm.punch_hole(region, gs, ge - gs)
                    .map_err(err("fallocate(PUNCH_HOLE)"))?;
                drop(mm);
                if minor {
                    refill(&self.ram, gs, ge)?;
                }
                self.zeroed.push(Zeroed {
                    before_pass: next_pass,
                    start: gs,
                    end: ge,
                });
                Ok(true)
            }
        }
    }

    /// The agreement check (also run at the end of a verified run).
    pub fn final_check(&mut self) -> Result<(), InvalError> {
        self.verify_now()
    }

    /// The agreement check now, when verifying (e.g. after invalidations
    /// someone else made).
    pub fn verify_now(&mut self) -> Result<(), InvalError> {
        if self.verify {
            self.check(None)?;
        }
        Ok(())
    }

    fn check(&mut self, zapped: Option<(u64, u64)>) -> Result<(), InvalError> {
        self.checks += 1;
        let base = self.ram.guest_hva();
        let present = self
            .ram
            .hostmm()
            .present(self.ram.guest_range())
            .map_err(InvalError::Pagemap)?;
        let mut bad = Vec::new();
        for leaf in self.tdp.mapped_leaves() {
            let s = base + (leaf.gfn << PAGE_SHIFT);
            let e = base + (leaf.gfn_end() << PAGE_SHIFT);
            if !covered(&present, s, e) {
                bad.push(format!(
                    "MMU maps gfn {:#x} ({:?}) but the host page is not present",
                    leaf.gfn, leaf.level
                ));
            }
            if let Some((zs, ze)) = zapped {
                if leaf.gfn << PAGE_SHIFT < ze && leaf.gfn_end() << PAGE_SHIFT > zs {
                    bad.push(format!("MMU still maps gfn {:#x} after its zap", leaf.gfn));
                }
            }
        }
        if let Some((zs, ze)) = zapped {
            if present
                .iter()
                .any(|p| p.start < base + ze && p.end > base + zs)
            {
                bad.push(format!(
                    "host pages present in zapped gpa range [{zs:#x}, {ze:#x})"
                ));
            }
        }
        if !bad.is_empty() {
            self.failures += 1;
            for b in bad {
                if self.mismatches.len() < 10 {
                    self.mismatches.push(b);
                }
            }
        }
        Ok(())
    }
}

/// Re-populate the page cache of gpas `[gs, ge)` with zeroed pages after a
/// hole punch, so the next touch is a MINOR fault again (what `--uffd
/// minor` needs: a missing page-cache page is a MISSING fault there).
pub fn refill(ram: &UffdGuestRam, gs: u64, ge: u64) -> Result<(), InvalError> {
    let off = |v: u64| {
        libc::off_t::try_from(v)
            .map_err(|_| InvalError::Refill(std::io::Error::from_raw_os_error(libc::EOVERFLOW)))
    };
    let (start, len) = (off(gs)?, off(ge.min(ram.size()).saturating_sub(gs))?);
    // SAFETY: fallocate on the RAM's own memfd; the range is the caller's
    // gpa range (the memfd offset is the gpa), clipped to the RAM size.
    let rc = unsafe { libc::fallocate(ram.memfd(), 0, start, len) };
    if rc != 0 {
        return Err(InvalError::Refill(std::io::Error::last_os_error()));
    }
    Ok(())
}

/// While the guest runs: a thread that discards (`MADV_DONTNEED`) a random
/// run of huge pages every `every`, so guest faults race invalidations (the
/// fault path must retry, invariant 2). Only where discarding keeps the
/// data (page cache populated up front), so the checksum still holds.
/// Stopped and joined on [`Racer::finish`] or on drop (an early return).
pub struct Racer {
    stop: Arc<AtomicBool>,
    /// Raised when the thread ends on an error or a panic.
    failed: Arc<AtomicBool>,
    handle: Option<JoinHandle<Result<u64, InvalError>>>,
}

impl Racer {
    /// Start discarding through `inv` (none: a racer that does nothing).
    pub fn start(inv: Option<Invalidator>, every: Duration) -> Result<Self, InvalError> {
        let stop = Arc::new(AtomicBool::new(false));
        let failed = Arc::new(AtomicBool::new(false));
        let handle = match inv {
            None => None,
            Some(mut inv) => {
                let st = stop.clone();
                let f = failed.clone();
                let on_fail = move || f.store(true, Ordering::Release);
                let h = crate::thread::spawn_helper("racer", on_fail, move || {
                    while !st.load(Ordering::Acquire) {
                        let (gs, ge) = inv.pick();
                        inv.apply(InvalKind::Discard, gs, ge, 0)?;
                        inv.count += 1;
                        std::thread::sleep(every);
                    }
                    Ok(inv.count)
                })
                .map_err(InvalError::Spawn)?;
                Some(h)
            }
        };
        Ok(Racer {
            stop,
            failed,
            handle,
        })
    }

    /// Raised when the thread died (an error or a panic).
    pub fn failed(&self) -> Arc<AtomicBool> {
        self.failed.clone()
    }

    /// Stop it; how many discards it made.
    pub fn finish(mut self) -> Result<u64, InvalError> {
        self.stop.store(true, Ordering::Release);
        match self.handle.take() {
            None => Ok(0),
            Some(h) => crate::thread::join("racer", h)?,
        }
    }
}

impl Drop for Racer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Whether the merged, sorted runs cover `[s, e)` entirely.
fn covered(runs: &[HvaRange], s: u64, e: u64) -> bool {
    let i = runs.partition_point(|r| r.end <= s);
    runs.get(i).is_some_and(|r| r.start <= s && r.end >= e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn covered_runs() {
        let runs = [HvaRange::new(0x1000, 0x3000), HvaRange::new(0x5000, 0x6000)];
        assert!(covered(&runs, 0x1000, 0x3000));
        assert!(covered(&runs, 0x2000, 0x3000));
        assert!(!covered(&runs, 0x2000, 0x4000));
        assert!(!covered(&runs, 0x3000, 0x4000));
        assert!(covered(&runs, 0x5000, 0x6000));
        assert!(!covered(&[], 0, 1));
    }

    #[test]
    fn kinds_parse() {
        use clap::ValueEnum;
        let parse = |s| InvalKind::from_str(s, false);
        assert_eq!(parse("mixed"), Ok(InvalKind::Mixed));
        assert_eq!(parse("wp"), Ok(InvalKind::WriteProtect));
        assert_eq!(parse("write-protect"), Ok(InvalKind::WriteProtect));
        assert_eq!(parse("punch-hole"), Ok(InvalKind::PunchHole));
        assert!(parse("zap").is_err());
    }
}
