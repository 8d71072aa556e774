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

use crate::convert::duration_ms;
use crate::convert::u64_to_usize;
use crate::error::{is_root, Error, Result};
use crate::hostconf::{HugepageReservation, SysctlGuard};
use crate::hostmm::{Backing, HostMm, Placement};
use crate::ops::Discard;
use crate::predict::{Notified, PMD_SIZE as M2, PUD_SIZE as G};
use crate::subscriber::{HvaRange, MmuNotifyEvent, Subscribers};
use crate::trace::TraceSource;
use crate::uffd::{
    Uffd, UFFDIO_REGISTER_MODE_MISSING, UFFDIO_REGISTER_MODE_WP, UFFD_FEATURE_WP_HUGETLBFS_SHMEM,
    UFFD_FEATURE_WP_UNPOPULATED,
};
use crate::workload::NumaToucher;
use crate::PageSize;
use std::collections::BTreeSet;
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
    /// The HostMm VMA model agreed with /proc/self/maps after the operation.
    pub vmas_match: bool,
    /// The observed ranges came in the predicted order (informational: the
    /// per-CPU ring buffer orders by timestamp only).
    pub in_order: bool,
    /// Ranges equal (as multisets) and the VMA model agreed.
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
                match (c.matched, c.vmas_match) {
                    (true, _) => "yes",
                    (false, true) => "**NO**",
                    (false, false) => "**NO** (VMA model)",
                }
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
    let sign = if off < 0 { "-" } else { "+" };
    let mut x = off.unsigned_abs();
    if x == 0 {
        return format!("{sign}0");
    }
    let mut parts = Vec::new();
    for (unit, name) in [(G, "G"), (M, "M"), (K4 / 4, "K")] {
        let unit = u128::from(unit);
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

struct Ctx<'a> {
    trace: &'a mut TraceSource,
}

/// What a case run produced.
struct Measured {
    base: u64,
    predicted: Vec<Notified>,
    observed: Vec<HvaRange>,
    /// `HostMm`'s VMA model equals /proc/self/maps after the operation.
    vmas_match: bool,
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
        let vmas_match = mm.model_matches_kernel()?;
        Ok(Measured {
            base,
            predicted,
            observed,
            vmas_match,
        })
    }
}

fn compare(name: &str, m: Measured) -> CaseResult {
    let mut p: Vec<HvaRange> = m.predicted.iter().map(|n| n.range).collect();
    let mut o = m.observed.clone();
    let in_order = p == o;
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
        vmas_match: m.vmas_match,
        in_order,
        matched: p == o && m.vmas_match,
    }
}

fn rr(base: u64, off: u64, len: u64) -> HvaRange {
    HvaRange::new(base + off, base + off + len)
}

/// The operation of a case, offsets relative to the region base (file
/// offsets for `Punch`).
#[derive(Debug, Clone, Copy)]
enum Op {
    DontNeed(u64, u64),
    Remove(u64, u64),
    Punch(u64, u64),
    Protect(u64, u64),
    Unmap(u64, u64),
    /// mremap of the whole region onto a fresh PROT_NONE reservation.
    RemapWhole,
    /// UFFDIO_WRITEPROTECT after registering the whole region in WP mode.
    WriteProtect(u64, u64),
    /// fork() a child that exits at once.
    Fork,
    /// MADV_DONTFORK on the region, then fork().
    ForkDontFork,
    /// MADV_WIPEONFORK on the region, then fork().
    ForkWipeOnFork,
    /// mremap of `[+off, +off+len)` onto a fresh PROT_NONE reservation
    /// placed this many bytes past a 1 GiB boundary.
    RemapPart(u64, u64, u64),
    /// MADV_FREE.
    Free(u64, u64),
    /// MADV_COLLAPSE (with `true`: after MADV_HUGEPAGE on the whole region,
    /// so a region populated with 4 KiB pages becomes eligible).
    Collapse(u64, u64, bool),
    /// mremap shrinking the region in place to this length.
    Shrink(u64),
    /// UFFDIO_REGISTER (MISSING) of a range.
    Register(u64, u64),
    /// UFFDIO_WRITEPROTECT with `UFFD_FEATURE_WP_UNPOPULATED` asked for
    /// (`true`) or not, after registering the whole region in WP mode.
    WriteProtectAnon(u64, u64, bool),
    /// Map the region's memfd a second time, then punch a hole (file
    /// offsets) or MADV_REMOVE through the first mapping (`true`).
    AliasedPunch(u64, u64, bool),
}

/// One case of the battery.
struct Spec {
    name: &'static str,
    backing: Backing,
    len: u64,
    place: Placement,
    /// Ranges touched before the operation.
    populate: &'static [(u64, u64)],
    op: Op,
}

impl Spec {
    fn gib_pages(&self) -> u64 {
        match self.backing.page_size() {
            PageSize::Size1G => self.len / G,
            _ => 0,
        }
    }

    fn run(&self, c: &mut Ctx) -> Result<Measured> {
        let mut mm = HostMm::new(Subscribers::new())?;
        let id = mm.map(self.backing, self.len, self.place)?;
        let b = mm.region(id).map(|r| r.base).unwrap_or(0);
        for &(off, len) in self.populate {
            mm.populate(rr(b, off, len))?;
        }
        match self.op {
            Op::DontNeed(o, l) => {
                c.measure(&mut mm, |mm| mm.discard(rr(b, o, l), Discard::DontNeed))
            }
            Op::Remove(o, l) => c.measure(&mut mm, |mm| mm.discard(rr(b, o, l), Discard::Remove)),
            Op::Punch(o, l) => c.measure(&mut mm, |mm| mm.punch_hole(id, o, l)),
            Op::Protect(o, l) => c.measure(&mut mm, |mm| mm.protect(rr(b, o, l), RO)),
            Op::Unmap(o, l) => c.measure(&mut mm, |mm| mm.unmap(rr(b, o, l))),
            Op::RemapWhole => {
                let dst = mm.reserve(
                    self.len,
                    Placement {
                        align: M2,
                        offset: 0,
                    },
                )?;
                c.measure(&mut mm, |mm| mm.remap(rr(b, 0, self.len), dst.start))
            }
            Op::Fork => c.measure(&mut mm, |mm| mm.fork_exit()),
            Op::ForkDontFork => {
                mm.set_dontfork(id)?;
                c.measure(&mut mm, |mm| mm.fork_exit())
            }
            Op::WriteProtect(o, l) => {
                let uffd = Uffd::open(UFFD_FEATURE_WP_HUGETLBFS_SHMEM)?;
                uffd.register(rr(b, 0, self.len), UFFDIO_REGISTER_MODE_WP)?;
                c.measure(&mut mm, |mm| mm.write_protect(&uffd, rr(b, o, l), true))
            }
            Op::ForkWipeOnFork => {
                mm.set_wipeonfork(id)?;
                c.measure(&mut mm, |mm| mm.fork_exit())
            }
            Op::Free(o, l) => c.measure(&mut mm, |mm| mm.free(rr(b, o, l))),
            Op::RemapPart(o, l, dst_off) => {
                let dst = mm.reserve(l, Placement::pud_offset(dst_off))?;
                c.measure(&mut mm, |mm| mm.remap_part(rr(b, o, l), dst.start))
            }
            Op::Collapse(o, l, advise) => {
                if advise {
                    // SAFETY: advisory madvise on the region this HostMm
                    // owns; it changes no memory contents.
                    unsafe {
                        libc::madvise(
                            b as *mut libc::c_void,
                            u64_to_usize(self.len),
                            libc::MADV_HUGEPAGE,
                        )
                    };
                }
                c.measure(&mut mm, |mm| mm.collapse(rr(b, o, l)))
            }
            Op::Shrink(new_len) => c.measure(&mut mm, |mm| mm.shrink(rr(b, 0, self.len), new_len)),
            Op::Register(o, l) => {
                let uffd = Uffd::open(0)?;
                c.measure(&mut mm, |mm| {
                    mm.uffd_register(&uffd, rr(b, o, l), UFFDIO_REGISTER_MODE_MISSING)
                })
            }
            Op::WriteProtectAnon(o, l, unpopulated) => {
                let uffd = Uffd::open(if unpopulated {
                    UFFD_FEATURE_WP_UNPOPULATED
                } else {
                    0
                })?;
                uffd.register(rr(b, 0, self.len), UFFDIO_REGISTER_MODE_WP)?;
                c.measure(&mut mm, |mm| mm.write_protect(&uffd, rr(b, o, l), true))
            }
            Op::AliasedPunch(o, l, remove) => {
                mm.map_alias(id)?;
                if remove {
                    c.measure(&mut mm, |mm| mm.discard(rr(b, o, l), Discard::Remove))
                } else {
                    c.measure(&mut mm, |mm| mm.punch_hole(id, o, l))
                }
            }
        }
    }
}

#[rustfmt::skip]
fn cases() -> Vec<Spec> {
    use Backing::*;
    use PageSize::*;
    let span = Placement::pud_aligned();
    let small = Placement::pud_offset(M2);
    let anon = Anon { thp: false };
    let thp = Anon { thp: true };
    let spec = |name, backing, len, place, populate, op| Spec {
        name,
        backing,
        len,
        place,
        populate,
        op,
    };
    vec![
        // shared 2M memfd, 2 GiB at a 1 GiB-aligned address (PMD sharing possible)
        spec("shared 2M 2G-span: DONTNEED 2M @+512M populated", SharedMemfd(Size2M), 2 * G, span, &[(G / 2, 2 * M2)], Op::DontNeed(G / 2, M2)),
        spec("shared 2M 2G-span: DONTNEED 2M @+512M unpopulated", SharedMemfd(Size2M), 2 * G, span, &[], Op::DontNeed(G / 2, M2)),
        spec("shared 2M 2G-span: MADV_REMOVE 2M @+1G+2M", SharedMemfd(Size2M), 2 * G, span, &[(G + M2, M2)], Op::Remove(G + M2, M2)),
        spec("shared 2M 2G-span: punch-hole file 1G+2M", SharedMemfd(Size2M), 2 * G, span, &[(G, M2)], Op::Punch(G, M2)),
        spec("shared 2M 2G-span: punch-hole 1G+4K,2M (rounds to empty)", SharedMemfd(Size2M), 2 * G, span, &[(G, 2 * M2)], Op::Punch(G + K4, M2)),
        spec("shared 2M 2G-span: mprotect 2M @+512M (split unshares PUD)", SharedMemfd(Size2M), 2 * G, span, &[(G / 2, M2)], Op::Protect(G / 2, M2)),
        spec("shared 2M 2G-span: mprotect [+1G,+2G) (PUD-aligned split)", SharedMemfd(Size2M), 2 * G, span, &[(G, M2)], Op::Protect(G, G)),
        spec("shared 2M 2G-span: mprotect whole, unpopulated", SharedMemfd(Size2M), 2 * G, span, &[], Op::Protect(0, 2 * G)),
        spec("shared 2M 2G-span: munmap 2M @+512M", SharedMemfd(Size2M), 2 * G, span, &[(G / 2, M2)], Op::Unmap(G / 2, M2)),
        spec("shared 2M 2G-span: uffd write-protect 2M @+512M", SharedMemfd(Size2M), 2 * G, span, &[(G / 2, M2)], Op::WriteProtect(G / 2, M2)),
        // shared 2M memfd, 2 GiB starting 512 MiB past a 1 GiB boundary: only [+512M,+1.5G) is an aligned 1 GiB block
        spec("shared 2M 2G @1G+512M: DONTNEED 2M @+0 (outside the aligned block)", SharedMemfd(Size2M), 2 * G, Placement::pud_offset(G / 2), &[(0, M2)], Op::DontNeed(0, M2)),
        spec("shared 2M 2G @1G+512M: DONTNEED 2M @+1G (inside the aligned block)", SharedMemfd(Size2M), 2 * G, Placement::pud_offset(G / 2), &[(G, M2)], Op::DontNeed(G, M2)),
        spec("shared 2M 2G @1G+512M: mprotect 2M @+1G (split inside the block)", SharedMemfd(Size2M), 2 * G, Placement::pud_offset(G / 2), &[(G, M2)], Op::Protect(G, M2)),
        // shared 2M memfd, 32 MiB not spanning a PUD
        spec("shared 2M 32M: DONTNEED 2M @+4M", SharedMemfd(Size2M), 32 * M, small, &[(0, 8 * M)], Op::DontNeed(4 * M, M2)),
        spec("shared 2M 32M: mprotect 4M @+8M (split, no unshare)", SharedMemfd(Size2M), 32 * M, small, &[(8 * M, 4 * M)], Op::Protect(8 * M, 4 * M)),
        spec("shared 2M 32M: punch-hole 1M,5M (rounds in to [2M,6M))", SharedMemfd(Size2M), 32 * M, small, &[(0, 8 * M)], Op::Punch(M, 5 * M)),
        spec("shared 2M 32M: MADV_REMOVE 3M @+2M (rounds in)", SharedMemfd(Size2M), 32 * M, small, &[(0, 8 * M)], Op::Remove(2 * M, 3 * M)),
        spec("shared 2M 32M: mremap whole to a reservation", SharedMemfd(Size2M), 32 * M, small, &[(0, 4 * M)], Op::RemapWhole),
        // private hugetlb 2M
        spec("private 2M 2G-span: DONTNEED 2M @+0 populated", PrivateHugetlb(Size2M), 2 * G, span, &[(0, M2)], Op::DontNeed(0, M2)),
        spec("private 2M: DONTNEED 2M+4K (length rounds down)", PrivateHugetlb(Size2M), 16 * M, small, &[(0, 4 * M)], Op::DontNeed(0, M2 + K4)),
        spec("private 2M: DONTNEED 4K (sub-page: no-op)", PrivateHugetlb(Size2M), 16 * M, small, &[(0, M2)], Op::DontNeed(0, K4)),
        spec("private 2M: mprotect 16M unpopulated", PrivateHugetlb(Size2M), 16 * M, small, &[], Op::Protect(0, 16 * M)),
        spec("private 2M 2G-span: mprotect 2M @+512M (no unshare)", PrivateHugetlb(Size2M), 2 * G, span, &[(G / 2, M2)], Op::Protect(G / 2, M2)),
        spec("private 2M: munmap 2M @+2M", PrivateHugetlb(Size2M), 16 * M, small, &[(0, 8 * M)], Op::Unmap(M2, M2)),
        spec("private 2M: mremap whole to a reservation", PrivateHugetlb(Size2M), 16 * M, small, &[(0, 4 * M)], Op::RemapWhole),
        // 1 GiB pages
        spec("shared 1G x1: mprotect 1G", SharedMemfd(Size1G), G, span, &[(0, G)], Op::Protect(0, G)),
        spec("shared 1G x1: DONTNEED 1G", SharedMemfd(Size1G), G, span, &[(0, G)], Op::DontNeed(0, G)),
        spec("private 1G x1: DONTNEED 1G", PrivateHugetlb(Size1G), G, span, &[(0, G)], Op::DontNeed(0, G)),
        spec("shared 1G x2: punch-hole second 1G", SharedMemfd(Size1G), 2 * G, span, &[(0, 2 * G)], Op::Punch(G, G)),
        spec("shared 1G x2: munmap second 1G", SharedMemfd(Size1G), 2 * G, span, &[(0, 2 * G)], Op::Unmap(G, G)),
        // plain anonymous memory: the PUD-level mprotect rule
        spec("anon 4G: mprotect [+1G,+2G) nothing touched", anon, 4 * G, span, &[], Op::Protect(G, G)),
        spec("anon 4G: one 4K touched @+1.5G, mprotect [+1G,+2G)", anon, 4 * G, span, &[(G + G / 2, K4)], Op::Protect(G, G)),
        spec("anon 4G: one 4K touched @+1.5G, mprotect 4K @+1.75G", anon, 4 * G, span, &[(G + G / 2, K4)], Op::Protect(G + 3 * G / 4, K4)),
        spec("anon 4G: one 4K touched @+1.5G, mprotect whole", anon, 4 * G, span, &[(G + G / 2, K4)], Op::Protect(0, 4 * G)),
        spec("anon MADV_HUGEPAGE 64M, 8M touched: mprotect 4K @+5M (splits a huge PMD)", Anon { thp: true }, 64 * M, span, &[(0, 8 * M)], Op::Protect(5 * M, K4)),
        spec("anon 64M: DONTNEED 64K @+1M", anon, 64 * M, span, &[(0, 4 * M)], Op::DontNeed(M, 64 * 1024)),
        spec("anon 64M: munmap 1M @+2M", anon, 64 * M, span, &[(0, 4 * M)], Op::Unmap(2 * M, M)),
        // fork of the VMM (COW write-protection of private memory)
        spec("fork: private 2M 16M populated", PrivateHugetlb(Size2M), 16 * M, small, &[(0, 4 * M)], Op::Fork),
        spec("fork: private 2M 16M unpopulated (no anon_vma)", PrivateHugetlb(Size2M), 16 * M, small, &[], Op::Fork),
        spec("fork: private 2M 16M populated, MADV_DONTFORK", PrivateHugetlb(Size2M), 16 * M, small, &[(0, 4 * M)], Op::ForkDontFork),
        spec("fork: shared 2M 32M populated (not COW)", SharedMemfd(Size2M), 32 * M, small, &[(0, 4 * M)], Op::Fork),
        spec("fork: anon 64M one 4K touched", anon, 64 * M, span, &[(M, K4)], Op::Fork),
        // THP: partial zaps split huge PMDs (`zap_pmd_range()` -> `__split_huge_pmd()`)
        spec("thp 64M, 8M touched: DONTNEED 4K @+5M (splits its huge PMD)", thp, 64 * M, span, &[(0, 8 * M)], Op::DontNeed(5 * M, K4)),
        spec("thp 64M, 8M touched: DONTNEED [+3M,+5M) (splits two huge PMDs)", thp, 64 * M, span, &[(0, 8 * M)], Op::DontNeed(3 * M, M2)),
        spec("thp 64M, 8M touched: DONTNEED 2M @+4M (a whole PMD: no split)", thp, 64 * M, span, &[(0, 8 * M)], Op::DontNeed(4 * M, M2)),
        spec("thp 64M, 8M touched: munmap 1M @+5M (VMA split inside a huge PMD)", thp, 64 * M, span, &[(0, 8 * M)], Op::Unmap(5 * M, M)),
        spec("thp 8M touched: mremap whole to a reservation (huge PMDs move whole)", thp, 8 * M, span, &[(0, 8 * M)], Op::RemapWhole),
        // mremap moves: part of a THP range; realigned to a PMD boundary (`try_realign_addr()`)
        spec("thp 64M, 8M touched: mremap [+1M,+5M) to a 1M-misaligned reservation", thp, 64 * M, span, &[(0, 8 * M)], Op::RemapPart(M, 4 * M, G / 2 + M)),
        spec("thp 64M, 8M touched: mremap [+2M,+6M) to an aligned reservation (whole PMDs)", thp, 64 * M, span, &[(0, 8 * M)], Op::RemapPart(M2, 4 * M, G / 2)),
        spec("anon 8M @1G+1M, 4M touched: mremap whole to a reservation @+1M (realigned down)", anon, 8 * M, Placement::pud_offset(M), &[(0, 4 * M)], Op::RemapPart(0, 8 * M, G / 2 + M)),
        spec("anon 8M @1G+1M, 4M touched: mremap whole to an aligned reservation (no realign)", anon, 8 * M, Placement::pud_offset(M), &[(0, 4 * M)], Op::RemapPart(0, 8 * M, G / 2)),
        // MADV_COLLAPSE (`madvise_collapse()` -> `collapse_huge_page()`)
        spec("anon 4K pages, 4M touched, then MADV_HUGEPAGE: MADV_COLLAPSE [0,+8M)", anon, 64 * M, span, &[(0, 4 * M)], Op::Collapse(0, 8 * M, true)),
        spec("anon 4K pages, 4M touched, then MADV_HUGEPAGE: MADV_COLLAPSE [+1M,+7M) (whole blocks only)", anon, 64 * M, span, &[(0, 4 * M)], Op::Collapse(M, 6 * M, true)),
        spec("thp 64M, 8M touched (huge already): MADV_COLLAPSE [0,+8M)", thp, 64 * M, span, &[(0, 8 * M)], Op::Collapse(0, 8 * M, false)),
        // MADV_FREE (`madvise_free_single_vma()`)
        spec("anon 64M, 4M touched: MADV_FREE 64K @+1M", anon, 64 * M, span, &[(0, 4 * M)], Op::Free(M, 64 * 1024)),
        spec("anon 64M unpopulated: MADV_FREE 1M @+8M", anon, 64 * M, span, &[], Op::Free(8 * M, M)),
        // mremap shrink (`do_vmi_munmap()` of the tail)
        spec("anon 64M, 8M touched: mremap shrink to 32M", anon, 64 * M, span, &[(0, 8 * M)], Op::Shrink(32 * M)),
        spec("thp 64M, 8M touched: mremap shrink to 5M (splits the huge PMD at the cut)", thp, 64 * M, span, &[(0, 8 * M)], Op::Shrink(5 * M)),
        spec("shared 2M 32M: mremap shrink to 16M", SharedMemfd(Size2M), 32 * M, small, &[(0, 4 * M)], Op::Shrink(16 * M)),
        // fork with MADV_WIPEONFORK / MADV_DONTFORK on anonymous memory
        spec("fork: anon 64M 4M touched, MADV_WIPEONFORK", anon, 64 * M, span, &[(0, 4 * M)], Op::ForkWipeOnFork),
        spec("fork: anon 64M 4M touched, MADV_DONTFORK", anon, 64 * M, span, &[(0, 4 * M)], Op::ForkDontFork),
        // userfaultfd registration and write-protect of unpopulated memory
        spec("anon 64M 4M touched: UFFDIO_REGISTER whole (flags only)", anon, 64 * M, span, &[(0, 4 * M)], Op::Register(0, 64 * M)),
        spec("thp 64M 16M touched: UFFDIO_REGISTER [+5M,+9M) (VMA splits inside huge PMDs)", thp, 64 * M, span, &[(0, 16 * M)], Op::Register(5 * M, 4 * M)),
        spec("anon 4G unpopulated: uffd-wp [+1G,+2G) without WP_UNPOPULATED", anon, 4 * G, span, &[], Op::WriteProtectAnon(G, G, false)),
        spec("anon 4G unpopulated: uffd-wp [+1G,+2G) with WP_UNPOPULATED (markers)", anon, 4 * G, span, &[], Op::WriteProtectAnon(G, G, true)),
        // a memfd mapped twice: every mapping of the file is notified
        spec("shared 2M 32M mapped twice: punch-hole 4M @+8M", SharedMemfd(Size2M), 32 * M, small, &[(0, 16 * M)], Op::AliasedPunch(8 * M, 4 * M, false)),
        spec("shared 2M 32M mapped twice: MADV_REMOVE 2M @+4M", SharedMemfd(Size2M), 32 * M, small, &[(0, 16 * M)], Op::AliasedPunch(4 * M, M2, true)),
        spec("shmem 32M mapped twice: punch-hole 1M @+4M", SharedMemfd(Size4K), 32 * M, span, &[(0, 16 * M)], Op::AliasedPunch(4 * M, M, false)),
    ]
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
/// scanner (`task_numa_work`) protects the anonymous regions (4 KiB pages and
/// THP) and skips the hugetlb one. One case result per region.
fn numa_cases(c: &mut Ctx, timeout: Duration) -> Result<Vec<CaseResult>> {
    let regions: [(&str, Backing, u64); 3] = [
        (
            "NUMA hint (numa_balancing=1): anon 32M populated",
            Backing::Anon { thp: false },
            32 * M,
        ),
        (
            "NUMA hint (numa_balancing=1): anon MADV_HUGEPAGE 64M populated",
            Backing::Anon { thp: true },
            64 * M,
        ),
        (
            "NUMA hint (numa_balancing=1): private hugetlb 2M 16M (skipped by task_numa_work)",
            Backing::PrivateHugetlb(PageSize::Size2M),
            16 * M,
        ),
    ];
    let mut mm = HostMm::new(Subscribers::new())?;
    let mut ids = Vec::new();
    for (_, backing, len) in regions {
        let id = mm.map(backing, len, Placement::pud_aligned())?;
        let r = mm.region_range(id, "numa")?;
        mm.populate(r)?;
        ids.push((id, r, backing.is_hugetlb()));
    }
    let mut predicted = Vec::new();
    for &(id, _, _) in &ids {
        predicted.push(mm.predict_numa_hint(id)?);
    }
    let anon: Vec<HvaRange> = ids.iter().filter(|x| !x.2).map(|x| x.1).collect();
    c.trace.collect()?;
    let guard = SysctlGuard::set("kernel.numa_balancing", "1")?;
    // SAFETY: `anon` are the read-write anonymous regions of `mm`, which
    // is not touched (mapped, unmapped, protected) until `toucher` is
    // dropped below; declared after `mm`, it is dropped first on unwinding
    // too. Nothing reads the bytes it increments. A failed spawn joins the
    // threads already running before it returns (and `guard` restores the
    // sysctl).
    let toucher = unsafe { NumaToucher::over(anon.clone(), 2) }?;
    let t0 = Instant::now();
    let mut events = Vec::new();
    // An error returns early: `toucher` drops (stops, joins) first, then
    // `guard`, then `mm` (reverse declaration order).
    while t0.elapsed() < timeout {
        std::thread::sleep(Duration::from_millis(500));
        events.extend(c.trace.collect()?);
        let tids = our_tids();
        events.retain(|e| tids.contains(&e.tid));
        let all_seen = anon
            .iter()
            .all(|r| events.iter().any(|e| e.range.overlaps(r)));
        if all_seen && t0.elapsed() > Duration::from_secs(3) {
            break;
        }
    }
    drop(toucher);
    drop(guard);
    let vmas_match = mm.model_matches_kernel()?;
    let mut out = Vec::new();
    for (((name, _, _), (_, r, hugetlb)), p) in regions.iter().zip(&ids).zip(predicted) {
        let distinct: BTreeSet<HvaRange> = events
            .iter()
            .filter(|e| e.range.overlaps(r))
            .map(|e| e.range)
            .collect();
        let m = Measured {
            base: r.start,
            predicted: p,
            observed: distinct.into_iter().collect(),
            vmas_match,
        };
        let mut res = compare(&format!("{name} (distinct ranges)"), m);
        if !hugetlb {
            // The scanner must have run at all for "none = none" not to pass.
            res.matched &= !res.observed.is_empty();
        }
        out.push(res);
    }
    Ok(out)
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
    let _r2m = HugepageReservation::require(PageSize::Size2M, 64)?;
    let r1g = HugepageReservation::reserve(PageSize::Size1G, 2)?;
    let gib = r1g.available;
    let mut trace = TraceSource::open()?;
    let mut ctx = Ctx { trace: &mut trace };
    let mut report = Report {
        cases: Vec::new(),
        skipped: Vec::new(),
        elapsed_ms: 0,
    };
    for spec in cases() {
        if spec.gib_pages() > gib {
            report.skipped.push(Skipped {
                name: spec.name.to_string(),
                reason: format!(
                    "needs {} free 1 GiB hugepage(s), only {gib} could be reserved",
                    spec.gib_pages()
                ),
            });
            continue;
        }
        match spec.run(&mut ctx) {
            Ok(m) => report.cases.push(compare(spec.name, m)),
            // A userfaultfd feature this kernel lacks (WP_UNPOPULATED: 6.5+).
            Err(e @ Error::UffdFeatures { .. }) => report.skipped.push(Skipped {
                name: spec.name.to_string(),
                reason: e.to_string(),
            }),
            // A kernel without MADV_COLLAPSE (before 6.1), or one that
            // refuses it for the whole range: nothing to compare.
            Err(Error::Syscall {
                op: "madvise(MADV_COLLAPSE)",
                source,
            }) => report.skipped.push(Skipped {
                name: spec.name.to_string(),
                reason: format!("MADV_COLLAPSE refused: {source}"),
            }),
            Err(e) => return Err(e),
        }
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
    report.elapsed_ms = duration_ms(t0.elapsed());
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
