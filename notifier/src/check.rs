//! The differential check: run a battery of real operations on guest-RAM-like
//! mappings, each announced with the ranges `predict` expects, and compare
//! with what the kernel really notified (`kvm:kvm_unmap_hva_range`).
//!
//! Per case: fresh mappings, setup (populate, register), a sentinel to flush
//! the ring buffer, the operation, a second sentinel; the events between the
//! two that fall on the case's VMAs and come from this process's tasks are
//! the observed ranges. A case matches when the predicted and observed ranges
//! are the same multiset (the tracepoint has no event type, so only ranges
//! are compared).

use crate::error::{is_root, Error, Result};
use crate::hostconf::{HugepageReservation, SysctlGuard};
use crate::hostmm::{Backing, HostMm, PageSize, Placement, RegionId};
use crate::ops::Discard;
use crate::predict::{Notified, PMD_SIZE as M2, PUD_SIZE as G};
use crate::subscriber::{HvaRange, MmuNotifyEvent, Subscribers};
use crate::trace::TraceSource;
use crate::uffd::{Uffd, UFFDIO_REGISTER_MODE_WP, UFFD_FEATURE_WP_HUGETLBFS_SHMEM};
use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const K4: u64 = 4096;
const M: u64 = 1 << 20;
const RO: i32 = libc::PROT_READ;

/// One range in the report, absolute and relative to the case's first region.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RangeOut {
    pub start: String,
    pub end: String,
    /// `[+off,+off)` relative to the case's first region.
    pub rel: String,
    /// Predicted event (`None` for observed: the tracepoint has none).
    pub event: Option<MmuNotifyEvent>,
}

/// One compared case.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CaseResult {
    pub name: String,
    pub predicted: Vec<RangeOut>,
    pub observed: Vec<RangeOut>,
    #[serde(rename = "match")]
    pub matched: bool,
}

/// A case that could not run here, and why.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Skipped {
    pub name: String,
    pub reason: String,
}

/// The whole check.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub cases: Vec<CaseResult>,
    pub skipped: Vec<Skipped>,
    pub elapsed_ms: u64,
}

impl Report {
    pub fn all_match(&self) -> bool {
        self.cases.iter().all(|c| c.matched)
    }

    pub fn mismatches(&self) -> Vec<&CaseResult> {
        self.cases.iter().filter(|c| !c.matched).collect()
    }

    /// Markdown table.
    pub fn table(&self) -> String {
        let mut s = String::from("| # | case | predicted (range, event) | observed (tracepoint) | match |\n|---|---|---|---|---|\n");
        for (i, c) in self.cases.iter().enumerate() {
            let p: Vec<String> = c
                .predicted
                .iter()
                .map(|r| format!("{} {}", r.rel, r.event.map(event_name).unwrap_or("")))
                .collect();
            let o: Vec<String> = c.observed.iter().map(|r| r.rel.clone()).collect();
            let none = || "none".to_string();
            let p = if p.is_empty() { none() } else { p.join(" ") };
            let o = if o.is_empty() { none() } else { o.join(" ") };
            s += &format!(
                "| {} | {} | {} | {} | {} |\n",
                i + 1,
                c.name,
                p,
                o,
                if c.matched { "yes" } else { "**NO**" }
            );
        }
        for k in &self.skipped {
            s += &format!("| - | {} | skipped: {} | | |\n", k.name, k.reason);
        }
        s
    }
}

fn event_name(e: MmuNotifyEvent) -> &'static str {
    match e {
        MmuNotifyEvent::Unmap => "UNMAP",
        MmuNotifyEvent::Clear => "CLEAR",
        MmuNotifyEvent::ProtectionVma => "PROTECTION_VMA",
        MmuNotifyEvent::ProtectionPage => "PROTECTION_PAGE",
        MmuNotifyEvent::SoftDirty => "SOFT_DIRTY",
        MmuNotifyEvent::Release => "RELEASE",
        MmuNotifyEvent::Migrate => "MIGRATE",
        MmuNotifyEvent::Exclusive => "EXCLUSIVE",
        MmuNotifyEvent::Unknown => "?",
    }
}

/// `+1G+2M`-style offset.
pub fn fmt_off(off: i128) -> String {
    let (sign, mut x) = if off < 0 {
        ("-", (-off) as u64)
    } else {
        ("+", off as u64)
    };
    if x == 0 {
        return format!("{sign}0");
    }
    let mut parts = Vec::new();
    for (unit, name) in [(G, "G"), (M, "M"), (K4 / 4, "K")] {
        if x >= unit {
            parts.push(format!("{}{}", x / unit, name));
            x %= unit;
        }
    }
    if x > 0 {
        parts.push(format!("{x}"));
    }
    format!("{sign}{}", parts.join("+"))
}

fn out(r: HvaRange, base: u64, event: Option<MmuNotifyEvent>) -> RangeOut {
    let rel = |a: u64| fmt_off(a as i128 - base as i128);
    RangeOut {
        start: format!("{:#x}", r.start),
        end: format!("{:#x}", r.end),
        rel: format!("[{},{})", rel(r.start), rel(r.end)),
        event,
    }
}

fn our_tids() -> BTreeSet<i32> {
    std::fs::read_dir("/proc/self/task")
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// What a case needs from the host.
#[derive(Debug, Clone, Copy, Default)]
struct Needs {
    gib_pages: u64,
}

struct Ctx<'a> {
    trace: &'a mut TraceSource,
}

/// What a case run produced.
struct Measured {
    base: u64,
    predicted: Vec<Notified>,
    observed: Vec<HvaRange>,
}

impl Ctx<'_> {
    /// Flush, run `op`, collect the tracepoint events on `mm`'s VMAs.
    fn measure(
        &mut self,
        mm: &mut HostMm,
        op: impl FnOnce(&mut HostMm) -> Result<Vec<Notified>>,
    ) -> Result<Measured> {
        let mut span: Vec<HvaRange> = mm.vmas().iter().map(|v| v.shape.range).collect();
        let base = mm.regions().first().map(|r| r.base).unwrap_or(0);
        self.trace.collect()?;
        let predicted = op(mm)?;
        let events = self.trace.collect()?;
        span.extend(mm.vmas().iter().map(|v| v.shape.range));
        let tids = our_tids();
        let observed = events
            .iter()
            .filter(|e| tids.contains(&e.tid) && span.iter().any(|s| s.overlaps(&e.range)))
            .map(|e| e.range)
            .collect();
        Ok(Measured {
            base,
            predicted,
            observed,
        })
    }
}

fn compare(name: &str, m: Measured) -> CaseResult {
    let mut p: Vec<HvaRange> = m.predicted.iter().map(|n| n.range).collect();
    let mut o = m.observed.clone();
    p.sort();
    o.sort();
    CaseResult {
        name: name.to_string(),
        predicted: m
            .predicted
            .iter()
            .map(|n| out(n.range, m.base, Some(n.event)))
            .collect(),
        observed: m.observed.iter().map(|r| out(*r, m.base, None)).collect(),
        matched: p == o,
    }
}

fn rr(base: u64, off: u64, len: u64) -> HvaRange {
    HvaRange::new(base + off, base + off + len)
}

/// A fresh HostMm with one region; returns (mm, id, base).
fn one(backing: Backing, len: u64, place: Placement) -> Result<(HostMm, RegionId, u64)> {
    let mut mm = HostMm::new(Subscribers::new())?;
    let id = mm.map(backing, len, place)?;
    let base = mm.region(id).map(|r| r.base).unwrap_or(0);
    Ok((mm, id, base))
}

type CaseFn = Box<dyn Fn(&mut Ctx) -> Result<Measured>>;

fn cases() -> Vec<(String, Needs, CaseFn)> {
    use Backing::*;
    use PageSize::*;
    let span = Placement::pud_aligned();
    let small = Placement::pud_offset(M2);
    let mut v: Vec<(String, Needs, CaseFn)> = Vec::new();
    let mut add = |name: &str, needs: Needs, f: CaseFn| v.push((name.to_string(), needs, f));
    let n0 = Needs::default();
    let g1 = Needs { gib_pages: 1 };
    let g2 = Needs { gib_pages: 2 };

    // --- shared 2M memfd, 2 GiB at a 1 GiB-aligned address (PMD sharing possible)
    add(
        "shared 2M 2G-span: DONTNEED 2M @+512M populated",
        n0,
        Box::new(move |c| {
            let (mut mm, _, b) = one(SharedMemfd(Huge2M), 2 * G, span)?;
            mm.populate(rr(b, G / 2, 2 * M2))?;
            c.measure(&mut mm, |mm| {
                mm.discard(rr(b, G / 2, M2), Discard::DontNeed)
            })
        }),
    );
    add(
        "shared 2M 2G-span: DONTNEED 2M @+512M unpopulated",
        n0,
        Box::new(move |c| {
            let (mut mm, _, b) = one(SharedMemfd(Huge2M), 2 * G, span)?;
            c.measure(&mut mm, |mm| {
                mm.discard(rr(b, G / 2, M2), Discard::DontNeed)
            })
        }),
    );
    add(
        "shared 2M 2G-span: MADV_REMOVE 2M @+1G+2M",
        n0,
        Box::new(move |c| {
            let (mut mm, _, b) = one(SharedMemfd(Huge2M), 2 * G, span)?;
            mm.populate(rr(b, G + M2, M2))?;
            c.measure(&mut mm, |mm| mm.discard(rr(b, G + M2, M2), Discard::Remove))
        }),
    );
    add(
        "shared 2M 2G-span: punch-hole file 1G+2M",
        n0,
        Box::new(move |c| {
            let (mut mm, id, b) = one(SharedMemfd(Huge2M), 2 * G, span)?;
            mm.populate(rr(b, G, M2))?;
            c.measure(&mut mm, |mm| mm.punch_hole(id, G, M2))
        }),
    );
    add(
        "shared 2M 2G-span: punch-hole 1G+4K,2M (rounds to empty)",
        n0,
        Box::new(move |c| {
            let (mut mm, id, b) = one(SharedMemfd(Huge2M), 2 * G, span)?;
            mm.populate(rr(b, G, 2 * M2))?;
            c.measure(&mut mm, |mm| mm.punch_hole(id, G + K4, M2))
        }),
    );
    add(
        "shared 2M 2G-span: mprotect 2M @+512M (split unshares PUD)",
        n0,
        Box::new(move |c| {
            let (mut mm, _, b) = one(SharedMemfd(Huge2M), 2 * G, span)?;
            mm.populate(rr(b, G / 2, M2))?;
            c.measure(&mut mm, |mm| mm.protect(rr(b, G / 2, M2), RO))
        }),
    );
    add(
        "shared 2M 2G-span: mprotect [+1G,+2G) (PUD-aligned split)",
        n0,
        Box::new(move |c| {
            let (mut mm, _, b) = one(SharedMemfd(Huge2M), 2 * G, span)?;
            mm.populate(rr(b, G, M2))?;
            c.measure(&mut mm, |mm| mm.protect(rr(b, G, G), RO))
        }),
    );
    add(
        "shared 2M 2G-span: mprotect whole, unpopulated",
        n0,
        Box::new(move |c| {
            let (mut mm, _, b) = one(SharedMemfd(Huge2M), 2 * G, span)?;
            c.measure(&mut mm, |mm| mm.protect(rr(b, 0, 2 * G), RO))
        }),
    );
    add(
        "shared 2M 2G-span: munmap 2M @+512M",
        n0,
        Box::new(move |c| {
            let (mut mm, _, b) = one(SharedMemfd(Huge2M), 2 * G, span)?;
            mm.populate(rr(b, G / 2, M2))?;
            c.measure(&mut mm, |mm| mm.unmap(rr(b, G / 2, M2)))
        }),
    );
    add(
        "shared 2M 2G-span: uffd write-protect 2M @+512M",
        n0,
        Box::new(move |c| {
            let (mut mm, id, b) = one(SharedMemfd(Huge2M), 2 * G, span)?;
            mm.populate(rr(b, G / 2, M2))?;
            let uffd = Uffd::open(UFFD_FEATURE_WP_HUGETLBFS_SHMEM)?;
            let whole = mm.region(id).map(|r| r.range()).unwrap_or(rr(b, 0, 2 * G));
            uffd.register(whole, UFFDIO_REGISTER_MODE_WP)?;
            c.measure(&mut mm, |mm| {
                mm.write_protect(&uffd, rr(b, G / 2, M2), true)
            })
        }),
    );

    // --- shared 2M memfd, 32 MiB not spanning a PUD
    add(
        "shared 2M 32M: DONTNEED 2M @+4M",
        n0,
        Box::new(move |c| {
            let (mut mm, _, b) = one(SharedMemfd(Huge2M), 32 * M, small)?;
            mm.populate(rr(b, 0, 8 * M))?;
            c.measure(&mut mm, |mm| {
                mm.discard(rr(b, 4 * M, M2), Discard::DontNeed)
            })
        }),
    );
    add(
        "shared 2M 32M: mprotect 4M @+8M (split, no unshare)",
        n0,
        Box::new(move |c| {
            let (mut mm, _, b) = one(SharedMemfd(Huge2M), 32 * M, small)?;
            mm.populate(rr(b, 8 * M, 4 * M))?;
            c.measure(&mut mm, |mm| mm.protect(rr(b, 8 * M, 4 * M), RO))
        }),
    );
    add(
        "shared 2M 32M: punch-hole 1M,5M (rounds in to [2M,6M))",
        n0,
        Box::new(move |c| {
            let (mut mm, id, b) = one(SharedMemfd(Huge2M), 32 * M, small)?;
            mm.populate(rr(b, 0, 8 * M))?;
            c.measure(&mut mm, |mm| mm.punch_hole(id, M, 5 * M))
        }),
    );
    add(
        "shared 2M 32M: MADV_REMOVE 3M @+2M (rounds in)",
        n0,
        Box::new(move |c| {
            let (mut mm, _, b) = one(SharedMemfd(Huge2M), 32 * M, small)?;
            mm.populate(rr(b, 0, 8 * M))?;
            c.measure(&mut mm, |mm| {
                mm.discard(rr(b, 2 * M, 3 * M), Discard::Remove)
            })
        }),
    );
    add(
        "shared 2M 32M: mremap whole to a reservation",
        n0,
        Box::new(move |c| {
            let (mut mm, _, b) = one(SharedMemfd(Huge2M), 32 * M, small)?;
            mm.populate(rr(b, 0, 4 * M))?;
            let dst = mm.reserve(
                32 * M,
                Placement {
                    align: M2,
                    offset: 0,
                },
            )?;
            c.measure(&mut mm, |mm| mm.remap(rr(b, 0, 32 * M), dst.start))
        }),
    );

    // --- private hugetlb 2M
    add(
        "private 2M 1G-span: DONTNEED 2M @+0 populated",
        n0,
        Box::new(move |c| {
            let (mut mm, _, b) = one(PrivateHugetlb(Huge2M), 2 * G, span)?;
            mm.populate(rr(b, 0, M2))?;
            c.measure(&mut mm, |mm| mm.discard(rr(b, 0, M2), Discard::DontNeed))
        }),
    );
    add(
        "private 2M: DONTNEED 2M+4K (length rounds down)",
        n0,
        Box::new(move |c| {
            let (mut mm, _, b) = one(PrivateHugetlb(Huge2M), 16 * M, small)?;
            mm.populate(rr(b, 0, 4 * M))?;
            c.measure(&mut mm, |mm| {
                mm.discard(rr(b, 0, M2 + K4), Discard::DontNeed)
            })
        }),
    );
    add(
        "private 2M: DONTNEED 4K (sub-page: no-op)",
        n0,
        Box::new(move |c| {
            let (mut mm, _, b) = one(PrivateHugetlb(Huge2M), 16 * M, small)?;
            mm.populate(rr(b, 0, M2))?;
            c.measure(&mut mm, |mm| mm.discard(rr(b, 0, K4), Discard::DontNeed))
        }),
    );
    add(
        "private 2M: mprotect 16M unpopulated",
        n0,
        Box::new(move |c| {
            let (mut mm, _, b) = one(PrivateHugetlb(Huge2M), 16 * M, small)?;
            c.measure(&mut mm, |mm| mm.protect(rr(b, 0, 16 * M), RO))
        }),
    );
    add(
        "private 2M 2G-span: mprotect 2M @+512M (no unshare)",
        n0,
        Box::new(move |c| {
            let (mut mm, _, b) = one(PrivateHugetlb(Huge2M), 2 * G, span)?;
            mm.populate(rr(b, G / 2, M2))?;
            c.measure(&mut mm, |mm| mm.protect(rr(b, G / 2, M2), RO))
        }),
    );
    add(
        "private 2M: munmap 2M @+2M",
        n0,
        Box::new(move |c| {
            let (mut mm, _, b) = one(PrivateHugetlb(Huge2M), 16 * M, small)?;
            mm.populate(rr(b, 0, 8 * M))?;
            c.measure(&mut mm, |mm| mm.unmap(rr(b, M2, M2)))
        }),
    );
    add(
        "private 2M: mremap whole to a reservation",
        n0,
        Box::new(move |c| {
            let (mut mm, _, b) = one(PrivateHugetlb(Huge2M), 16 * M, small)?;
            mm.populate(rr(b, 0, 4 * M))?;
            let dst = mm.reserve(
                16 * M,
                Placement {
                    align: M2,
                    offset: 0,
                },
            )?;
            c.measure(&mut mm, |mm| mm.remap(rr(b, 0, 16 * M), dst.start))
        }),
    );

    // --- 1 GiB pages
    add(
        "shared 1G x1: mprotect 1G",
        g1,
        Box::new(move |c| {
            let (mut mm, _, b) = one(SharedMemfd(Huge1G), G, span)?;
            mm.populate(rr(b, 0, G))?;
            c.measure(&mut mm, |mm| mm.protect(rr(b, 0, G), RO))
        }),
    );
    add(
        "shared 1G x1: DONTNEED 1G",
        g1,
        Box::new(move |c| {
            let (mut mm, _, b) = one(SharedMemfd(Huge1G), G, span)?;
            mm.populate(rr(b, 0, G))?;
            c.measure(&mut mm, |mm| mm.discard(rr(b, 0, G), Discard::DontNeed))
        }),
    );
    add(
        "private 1G x1: DONTNEED 1G",
        g1,
        Box::new(move |c| {
            let (mut mm, _, b) = one(PrivateHugetlb(Huge1G), G, span)?;
            mm.populate(rr(b, 0, G))?;
            c.measure(&mut mm, |mm| mm.discard(rr(b, 0, G), Discard::DontNeed))
        }),
    );
    add(
        "shared 1G x2: punch-hole second 1G",
        g2,
        Box::new(move |c| {
            let (mut mm, id, b) = one(SharedMemfd(Huge1G), 2 * G, span)?;
            mm.populate(rr(b, 0, 2 * G))?;
            c.measure(&mut mm, |mm| mm.punch_hole(id, G, G))
        }),
    );
    add(
        "shared 1G x2: munmap second 1G",
        g2,
        Box::new(move |c| {
            let (mut mm, _, b) = one(SharedMemfd(Huge1G), 2 * G, span)?;
            mm.populate(rr(b, 0, 2 * G))?;
            c.measure(&mut mm, |mm| mm.unmap(rr(b, G, G)))
        }),
    );

    // --- plain anonymous memory: the PUD-level mprotect rule
    add(
        "anon 4G: mprotect [+1G,+2G) nothing touched",
        n0,
        Box::new(move |c| {
            let (mut mm, _, b) = one(Anon { thp: false }, 4 * G, span)?;
            c.measure(&mut mm, |mm| mm.protect(rr(b, G, G), RO))
        }),
    );
    add(
        "anon 4G: one 4K touched @+1.5G, mprotect [+1G,+2G)",
        n0,
        Box::new(move |c| {
            let (mut mm, _, b) = one(Anon { thp: false }, 4 * G, span)?;
            mm.populate(rr(b, G + G / 2, K4))?;
            c.measure(&mut mm, |mm| mm.protect(rr(b, G, G), RO))
        }),
    );
    add(
        "anon 4G: one 4K touched @+1.5G, mprotect 4K @+1.75G",
        n0,
        Box::new(move |c| {
            let (mut mm, _, b) = one(Anon { thp: false }, 4 * G, span)?;
            mm.populate(rr(b, G + G / 2, K4))?;
            c.measure(&mut mm, |mm| mm.protect(rr(b, G + 3 * G / 4, K4), RO))
        }),
    );
    add(
        "anon 4G: one 4K touched @+1.5G, mprotect whole",
        n0,
        Box::new(move |c| {
            let (mut mm, _, b) = one(Anon { thp: false }, 4 * G, span)?;
            mm.populate(rr(b, G + G / 2, K4))?;
            c.measure(&mut mm, |mm| mm.protect(rr(b, 0, 4 * G), RO))
        }),
    );
    add(
        "anon 64M: DONTNEED 64K @+1M",
        n0,
        Box::new(move |c| {
            let (mut mm, _, b) = one(Anon { thp: false }, 64 * M, span)?;
            mm.populate(rr(b, 0, 4 * M))?;
            c.measure(&mut mm, |mm| {
                mm.discard(rr(b, M, 64 * 1024), Discard::DontNeed)
            })
        }),
    );
    add(
        "anon 64M: munmap 1M @+2M",
        n0,
        Box::new(move |c| {
            let (mut mm, _, b) = one(Anon { thp: false }, 64 * M, span)?;
            mm.populate(rr(b, 0, 4 * M))?;
            c.measure(&mut mm, |mm| mm.unmap(rr(b, 2 * M, M)))
        }),
    );
    v
}

/// How the check runs.
#[derive(Debug, Clone, Copy)]
pub struct CheckOptions {
    /// Run the NUMA-hinting cases (turns `kernel.numa_balancing` on for them).
    pub numa: bool,
    /// How long to wait for the kernel's NUMA scanner.
    pub numa_timeout: Duration,
}

impl Default for CheckOptions {
    fn default() -> Self {
        Self {
            numa: true,
            numa_timeout: Duration::from_secs(30),
        }
    }
}

/// NUMA hinting: a 2-thread busy task with `kernel.numa_balancing=1`; the
/// scanner (`task_numa_work`) protects the anonymous region and skips the
/// hugetlb one. Returns two case results.
fn numa_cases(c: &mut Ctx, timeout: Duration) -> Result<Vec<CaseResult>> {
    let mut mm = HostMm::new(Subscribers::new())?;
    let anon = mm.map(
        Backing::Anon { thp: false },
        32 * M,
        Placement::pud_aligned(),
    )?;
    let huge = mm.map(
        Backing::PrivateHugetlb(PageSize::Huge2M),
        16 * M,
        Placement::pud_aligned(),
    )?;
    let ar = mm
        .region(anon)
        .map(|r| r.range())
        .ok_or(Error::OutOfRegion {
            op: "numa",
            start: 0,
            end: 0,
        })?;
    let hr = mm
        .region(huge)
        .map(|r| r.range())
        .ok_or(Error::OutOfRegion {
            op: "numa",
            start: 0,
            end: 0,
        })?;
    mm.populate(ar)?;
    mm.populate(hr)?;
    let pa = mm.predict_numa_hint(anon)?;
    let ph = mm.predict_numa_hint(huge)?;
    c.trace.collect()?;
    let guard = SysctlGuard::set("kernel.numa_balancing", "1")?;
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for (i, r) in [ar, ar].into_iter().enumerate() {
        let st = stop.clone();
        let t = std::thread::Builder::new()
            .name(format!("numa-touch-{i}"))
            .spawn(move || {
                while !st.load(Ordering::Relaxed) {
                    let mut a = r.start;
                    while a < r.end {
                        // SAFETY: `r` is a writable anonymous region owned by
                        // `mm`, which outlives these threads (joined below).
                        unsafe {
                            std::ptr::write_volatile(
                                a as *mut u8,
                                std::ptr::read_volatile(a as *const u8).wrapping_add(1),
                            )
                        };
                        a += K4;
                    }
                }
            })
            .map_err(|source| Error::Syscall {
                op: "spawn numa worker",
                source,
            })?;
        workers.push(t);
    }
    let t0 = Instant::now();
    let mut events = Vec::new();
    let mut result = Ok(());
    while t0.elapsed() < timeout {
        std::thread::sleep(Duration::from_millis(500));
        match c.trace.collect() {
            Ok(ev) => events.extend(ev),
            Err(e) => {
                result = Err(e);
                break;
            }
        }
        let tids = our_tids();
        events.retain(|e| tids.contains(&e.tid));
        if events.iter().any(|e| e.range.overlaps(&ar)) && t0.elapsed() > Duration::from_secs(3) {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for w in workers {
        let _ = w.join();
    }
    drop(guard);
    result?;
    let distinct = |r: HvaRange| -> Vec<HvaRange> {
        let s: BTreeSet<HvaRange> = events
            .iter()
            .filter(|e| e.range.overlaps(&r))
            .map(|e| e.range)
            .collect();
        s.into_iter().collect()
    };
    let a = Measured {
        base: ar.start,
        predicted: pa,
        observed: distinct(ar),
    };
    let h = Measured {
        base: hr.start,
        predicted: ph,
        observed: distinct(hr),
    };
    let mut ra = compare(
        "NUMA hint (numa_balancing=1): anon 32M, populated (distinct ranges)",
        a,
    );
    ra.matched &= !ra.observed.is_empty();
    let rh = compare(
        "NUMA hint (numa_balancing=1): private hugetlb 2M 16M (skipped by task_numa_work)",
        h,
    );
    Ok(vec![ra, rh])
}

/// Run the check. Needs root, /dev/kvm, tracefs, hugepages (reserved here,
/// restored after).
pub fn run(opts: CheckOptions) -> Result<Report> {
    if !is_root() {
        return Err(Error::NotRoot {
            what: "the notifier differential check",
        });
    }
    let t0 = Instant::now();
    let _r2m = HugepageReservation::require(PageSize::Huge2M, 64)?;
    let r1g = HugepageReservation::reserve(PageSize::Huge1G, 2)?;
    let gib = r1g.available;
    let mut trace = TraceSource::open()?;
    let mut ctx = Ctx { trace: &mut trace };
    let mut report = Report {
        cases: Vec::new(),
        skipped: Vec::new(),
        elapsed_ms: 0,
    };
    for (name, needs, f) in cases() {
        if needs.gib_pages > gib {
            report.skipped.push(Skipped {
                name,
                reason: format!(
                    "needs {} free 1 GiB hugepage(s), only {gib} could be reserved",
                    needs.gib_pages
                ),
            });
            continue;
        }
        let m = f(&mut ctx)?;
        report.cases.push(compare(&name, m));
    }
    if opts.numa {
        report
            .cases
            .extend(numa_cases(&mut ctx, opts.numa_timeout)?);
    } else {
        report.skipped.push(Skipped {
            name: "NUMA hint cases".into(),
            reason: "disabled by options".into(),
        });
    }
    drop(trace);
    report.elapsed_ms = t0.elapsed().as_millis() as u64;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_print_compactly() {
        assert_eq!(fmt_off(0), "+0");
        assert_eq!(fmt_off((G + 2 * M) as i128), "+1G+2M");
        assert_eq!(fmt_off(-(4096i128)), "-4K");
        assert_eq!(fmt_off((G / 2) as i128), "+512M");
    }

    #[test]
    fn battery_is_large_enough() {
        assert!(cases().len() + 2 >= 25);
    }
}
