//! The kernel's choice of notifier ranges, as pure functions.
//!
//! Every function here answers "which `mmu_notifier_invalidate_range_start`
//! calls will Linux 6.18 make for this operation, in which order, with which
//! `MMU_NOTIFY_*` event" from a description of the VMAs and of which PUD
//! entries are non-none. No syscalls: `ops` feeds these from `HostMm`, and the
//! differential check in `check` compares them with the kernel's tracepoint.
//!
//! Rules (mm/mprotect.c, mm/hugetlb.c, mm/memory.c, mm/huge_memory.c, mm/vma.c
//! as of 6.18; each checked against the kernel's tracepoint by `check`):
//! * non-hugetlb change_protection (mprotect, NUMA hinting, uffd-wp):
//!   `change_pud_range()` starts one `PROTECTION_VMA` notifier at the first
//!   non-none PUD entry of each PGD entry walked and runs it to the end of
//!   that walk; nothing when every PUD entry is none.
//! * hugetlb change_protection: `PROTECTION_VMA` over the range, always, widened
//!   by `adjust_range_if_pmd_sharing_possible()` for shared VMAs.
//! * hugetlb zaps (madvise DONTNEED, hole punch, mremap's page-table move):
//!   `CLEAR`, widened the same way; munmap: one `UNMAP` over the exact span.
//! * VMA splits: a shared hugetlb VMA split inside a PUD it fully covers
//!   unshares that PUD's PMD table (`hugetlb_split()` -> `hugetlb_unshare_pmds()`,
//!   `CLEAR` over the PUD); a non-hugetlb split at an address that is not
//!   2 MiB-aligned splits the huge PMD there (`__split_huge_pmd()`, `CLEAR` over
//!   that 2 MiB) when the PUD entry is non-none, populated or not.

use crate::subscriber::{HvaRange, MmuNotifyEvent};

pub const PAGE_SIZE: u64 = 4096;
pub const PMD_SIZE: u64 = 2 << 20;
pub const PUD_SIZE: u64 = 1 << 30;
/// One PGD entry with 4-level paging (512 GiB).
pub const PGDIR_SIZE: u64 = 1 << 39;

pub fn align_down(x: u64, a: u64) -> u64 {
    x & !(a - 1)
}

pub fn align_up(x: u64, a: u64) -> u64 {
    align_down(x.saturating_add(a - 1), a)
}

/// A VMA as the notifier rules need to see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmaShape {
    pub range: HvaRange,
    /// hugetlb page size (`vma_kernel_pagesize`), `None` for ordinary memory.
    pub hugetlb: Option<u64>,
    /// `VM_MAYSHARE` (MAP_SHARED).
    pub may_share: bool,
    /// Current `PROT_*` bits.
    pub prot: i32,
}

impl VmaShape {
    fn with_range(&self, start: u64, end: u64) -> Self {
        Self {
            range: HvaRange::new(start, end),
            ..*self
        }
    }
}

/// One predicted `invalidate_range_start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub struct Notified {
    pub range: HvaRange,
    pub event: MmuNotifyEvent,
}

impl Notified {
    fn new(start: u64, end: u64, event: MmuNotifyEvent) -> Self {
        Self {
            range: HvaRange::new(start, end),
            event,
        }
    }
}

/// Why an operation cannot be predicted (the kernel would refuse it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PredictError {
    #[error("start {start:#x} is not aligned to the hugetlb page size {align:#x}")]
    Unaligned { start: u64, align: u64 },
}

/// `adjust_range_if_pmd_sharing_possible()`.
pub fn adjust_range_if_pmd_sharing_possible(vma: &VmaShape, r: HvaRange) -> HvaRange {
    let v_start = align_up(vma.range.start, PUD_SIZE);
    let v_end = align_down(vma.range.end, PUD_SIZE);
    if vma.hugetlb.is_none()
        || !vma.may_share
        || v_end <= v_start
        || r.end <= v_start
        || r.start >= v_end
    {
        return r;
    }
    let mut out = r;
    if out.start > v_start {
        out.start = align_down(out.start, PUD_SIZE);
    }
    if out.end < v_end {
        out.end = align_up(out.end, PUD_SIZE);
    }
    out
}

/// Notifiers of `__split_vma(vma, addr)` (before the split takes effect).
pub fn split_vma(vma: &VmaShape, addr: u64, pud_present: &dyn Fn(u64) -> bool) -> Vec<Notified> {
    let mut out = Vec::new();
    if addr <= vma.range.start || addr >= vma.range.end {
        return out;
    }
    match vma.hugetlb {
        Some(_) => {
            // hugetlb_split(): unshare the PUD around addr if the VMA covers it.
            if vma.may_share && !addr.is_multiple_of(PUD_SIZE) {
                let floor = align_down(addr, PUD_SIZE);
                let ceil = floor + PUD_SIZE;
                if floor >= vma.range.start && ceil <= vma.range.end {
                    out.push(Notified::new(floor, ceil, MmuNotifyEvent::Clear));
                }
            }
        }
        None => {
            // vma_adjust_trans_huge() -> split_huge_pmd_if_needed(): only when a
            // whole 2 MiB block around addr is in the VMA and the PMD table
            // exists (mm_find_pmd()); __split_huge_pmd() notifies first.
            let down = align_down(addr, PMD_SIZE);
            if !addr.is_multiple_of(PMD_SIZE)
                && down >= vma.range.start
                && down + PMD_SIZE <= vma.range.end
                && pud_present(addr)
            {
                out.push(Notified::new(down, down + PMD_SIZE, MmuNotifyEvent::Clear));
            }
        }
    }
    out
}

/// `change_protection()` over `r` (inside `vma`): mprotect, NUMA hint, uffd-wp.
pub fn change_protection(
    vma: &VmaShape,
    r: HvaRange,
    pud_present: &dyn Fn(u64) -> bool,
) -> Vec<Notified> {
    if r.is_empty() {
        return Vec::new();
    }
    if vma.hugetlb.is_some() {
        let w = adjust_range_if_pmd_sharing_possible(vma, r);
        return vec![Notified {
            range: w,
            event: MmuNotifyEvent::ProtectionVma,
        }];
    }
    let mut out = Vec::new();
    let mut addr = r.start;
    while addr < r.end {
        // One change_p4d_range()/change_pud_range() walk per PGD entry.
        let pgd_end = (align_down(addr, PGDIR_SIZE) + PGDIR_SIZE).min(r.end);
        let mut a = addr;
        while a < pgd_end {
            if pud_present(a) {
                out.push(Notified::new(a, pgd_end, MmuNotifyEvent::ProtectionVma));
                break;
            }
            a = align_down(a, PUD_SIZE) + PUD_SIZE;
        }
        addr = pgd_end;
    }
    out
}

/// Intersection of `r` with the VMAs, in address order.
fn pieces<'a>(vmas: &'a [VmaShape], r: HvaRange) -> impl Iterator<Item = &'a VmaShape> + 'a {
    vmas.iter().filter(move |v| v.range.overlaps(&r))
}

/// `mprotect(r, prot)`: per VMA whose protection changes, the splits at the
/// range ends (start first), then change_protection on the resulting VMA.
pub fn mprotect(
    vmas: &[VmaShape],
    r: HvaRange,
    prot: i32,
    pud_present: &dyn Fn(u64) -> bool,
) -> Vec<Notified> {
    let mut out = Vec::new();
    for v in pieces(vmas, r) {
        if v.prot == prot {
            continue; // mprotect_fixup(): newflags == oldflags
        }
        let mut cur = *v;
        if r.start > cur.range.start {
            out.extend(split_vma(&cur, r.start, pud_present));
            cur = cur.with_range(r.start, cur.range.end);
        }
        if r.end < cur.range.end {
            out.extend(split_vma(&cur, r.end, pud_present));
            cur = cur.with_range(cur.range.start, r.end);
        }
        out.extend(change_protection(&cur, cur.range, pud_present));
    }
    out
}

/// NUMA hinting (`task_numa_work()` -> `change_prot_numa()`) over the scan
/// window `w` of one VMA. hugetlb VMAs are skipped by `task_numa_work()`:
/// nothing is notified for them.
pub fn numa_hint(vma: &VmaShape, w: HvaRange, pud_present: &dyn Fn(u64) -> bool) -> Vec<Notified> {
    if vma.hugetlb.is_some() {
        return Vec::new();
    }
    change_protection(vma, w, pud_present)
}

/// `madvise(r, MADV_DONTNEED)`: per VMA, `zap_page_range_single_batched()`.
/// hugetlb: start must be huge-aligned, the end is rounded down (a sub-page
/// length is a silent no-op), notified even when unpopulated. Ordinary
/// memory: a huge PMD the zap covers only in part is split first -
/// `zap_pmd_range()` calls `__split_huge_pmd()` when `next - addr !=
/// HPAGE_PMD_SIZE`, which notifies `CLEAR` over that 2 MiB (`huge_pmd`
/// says whether the host maps the 2 MiB block at an address with a huge
/// PMD; a PMD the zap covers whole is zapped as one, `zap_huge_pmd()`).
pub fn dontneed(
    vmas: &[VmaShape],
    r: HvaRange,
    huge_pmd: &dyn Fn(u64) -> bool,
) -> Result<Vec<Notified>, PredictError> {
    let mut out = Vec::new();
    for v in pieces(vmas, r) {
        let start = r.start.max(v.range.start);
        let mut end = r.end.min(v.range.end);
        if let Some(hps) = v.hugetlb {
            if start % hps != 0 {
                return Err(PredictError::Unaligned { start, align: hps });
            }
            end = align_down(end, hps);
        } else {
            end = align_up(end, PAGE_SIZE);
        }
        if end <= start {
            continue;
        }
        let w = adjust_range_if_pmd_sharing_possible(v, HvaRange::new(start, end));
        out.push(Notified {
            range: w,
            event: MmuNotifyEvent::Clear,
        });
        if v.hugetlb.is_none() {
            out.extend(partial_huge_pmds(HvaRange::new(start, end), huge_pmd));
        }
    }
    Ok(out)
}

/// `__split_huge_pmd()` of each huge PMD that `r` covers only in part
/// (one at each unaligned end, or one when both ends share a block).
fn partial_huge_pmds(r: HvaRange, huge_pmd: &dyn Fn(u64) -> bool) -> Vec<Notified> {
    let mut blocks = vec![align_down(r.start, PMD_SIZE)];
    let last = align_down(r.end - 1, PMD_SIZE);
    if last != blocks[0] {
        blocks.push(last);
    }
    blocks
        .into_iter()
        .filter(|&b| !(r.start <= b && b + PMD_SIZE <= r.end) && huge_pmd(b))
        .map(|b| Notified::new(b, b + PMD_SIZE, MmuNotifyEvent::Clear))
        .collect()
}

/// `madvise(r, MADV_FREE)` (anonymous VMAs only, else EINVAL):
/// `madvise_free_single_vma()` opens one `CLEAR` notifier over the VMA's
/// piece of `r` (the length rounded up to pages), populated or not. A
/// huge PMD covered in part is split through `split_folio()`, whose rmap
/// walk notifies too: those pieces are refused here (`None`), not guessed.
pub fn madv_free(
    vmas: &[VmaShape],
    r: HvaRange,
    huge_pmd: &dyn Fn(u64) -> bool,
) -> Option<Vec<Notified>> {
    let mut out = Vec::new();
    for v in pieces(vmas, r) {
        if v.hugetlb.is_some() || v.may_share {
            return None;
        }
        let piece = HvaRange::new(
            r.start.max(v.range.start),
            align_up(r.end, PAGE_SIZE).min(v.range.end),
        );
        if !partial_huge_pmds(piece, huge_pmd).is_empty() {
            return None;
        }
        out.push(Notified {
            range: piece,
            event: MmuNotifyEvent::Clear,
        });
    }
    Some(out)
}

/// What one 2 MiB block holds, for `MADV_COLLAPSE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PmdState {
    /// No page table, or one with no page present.
    Empty,
    /// Mapped by PTEs, some present (and written).
    Ptes,
    /// Mapped by a huge PMD already.
    Huge,
}

/// `madvise(r, MADV_COLLAPSE)` on an anonymous VMA: `madvise_collapse()`
/// walks the whole 2 MiB blocks inside `r` (`hstart = round_up(start)`,
/// `hend = round_down(end)`); `hpage_collapse_scan_pmd()` stops at a block
/// with no PTE table or none present (`find_pmd_or_thp_or_none()`,
/// `SCAN_PAGE_RO` when nothing writable was found) and at one already huge
/// (`SCAN_PMD_MAPPED`); the rest are collapsed by `collapse_huge_page()`,
/// which notifies `CLEAR` over the block.
pub fn collapse(vmas: &[VmaShape], r: HvaRange, state: &dyn Fn(u64) -> PmdState) -> Vec<Notified> {
    let mut out = Vec::new();
    for v in pieces(vmas, r) {
        if v.hugetlb.is_some() || v.may_share {
            continue;
        }
        let mut b = align_up(r.start.max(v.range.start), PMD_SIZE);
        let end = align_down(r.end.min(v.range.end), PMD_SIZE);
        while b < end {
            if state(b) == PmdState::Ptes {
                out.push(Notified::new(b, b + PMD_SIZE, MmuNotifyEvent::Clear));
            }
            b += PMD_SIZE;
        }
    }
    out
}

/// `mremap(addr, old_len, new_len, 0)` with `new_len < old_len` (a VMA
/// shrinks in place): `do_vmi_munmap()` of the tail `[addr + new_len, addr +
/// old_len)` - the [`munmap`] rule.
pub fn mremap_shrink(
    vmas: &[VmaShape],
    old: HvaRange,
    new_len: u64,
    pud_present: &dyn Fn(u64) -> bool,
) -> Vec<Notified> {
    munmap(
        vmas,
        HvaRange::new(old.start + new_len, old.end),
        pud_present,
    )
}

/// `UFFDIO_REGISTER` over `r`: `userfaultfd_register()` changes VMA flags
/// only (`vma_modify_flags_uffd()`), so what it notifies are the splits at
/// the ends of `r` inside the VMAs it touches ([`split_vma`]).
pub fn uffd_register(
    vmas: &[VmaShape],
    r: HvaRange,
    pud_present: &dyn Fn(u64) -> bool,
) -> Vec<Notified> {
    let mut out = Vec::new();
    for v in pieces(vmas, r) {
        let mut cur = *v;
        if r.start > cur.range.start {
            out.extend(split_vma(&cur, r.start, pud_present));
            cur = cur.with_range(r.start, cur.range.end);
        }
        if r.end < cur.range.end {
            out.extend(split_vma(&cur, r.end, pud_present));
        }
    }
    out
}

/// A VMA mapping a file (memfd) at `pgoff` bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FileVma {
    pub vma: VmaShape,
    /// File offset (bytes) mapped at `vma.range.start`.
    pub offset: u64,
}

/// `fallocate(PUNCH_HOLE, off, len)` on a hugetlbfs file (also what
/// `madvise(MADV_REMOVE)` does): the hole is rounded inwards to whole huge
/// pages, then every VMA mapping part of it gets `unmap_hugepage_range()`
/// (`CLEAR`, widened for PMD sharing), populated or not.
pub fn punch_hole(mappings: &[FileVma], hpage: u64, off: u64, len: u64) -> Vec<Notified> {
    let hole_start = align_up(off, hpage);
    let hole_end = align_down(off.saturating_add(len), hpage);
    let mut out = Vec::new();
    if hole_end <= hole_start {
        return out;
    }
    for m in mappings {
        let f_start = m.offset;
        let f_end = m.offset + m.vma.range.len();
        let s = hole_start.max(f_start);
        let e = hole_end.min(f_end);
        if e <= s {
            continue;
        }
        let r = HvaRange::new(
            m.vma.range.start + (s - f_start),
            m.vma.range.start + (e - f_start),
        );
        out.push(Notified {
            range: adjust_range_if_pmd_sharing_possible(&m.vma, r),
            event: MmuNotifyEvent::Clear,
        });
    }
    out
}

/// `munmap(r)`: splits at both ends, then one `UNMAP` over the whole span
/// (`unmap_vmas()`), nothing if no VMA intersects.
pub fn munmap(vmas: &[VmaShape], r: HvaRange, pud_present: &dyn Fn(u64) -> bool) -> Vec<Notified> {
    let mut out = Vec::new();
    let hit: Vec<&VmaShape> = pieces(vmas, r).collect();
    if hit.is_empty() {
        return out;
    }
    if let Some(first) = hit.first() {
        out.extend(split_vma(first, r.start, pud_present));
    }
    if let Some(last) = hit.last() {
        // After a split at r.start the VMA holding r.end starts at r.start.
        let mut l = **last;
        if r.start > l.range.start {
            l = l.with_range(r.start, l.range.end);
        }
        out.extend(split_vma(&l, r.end, pud_present));
    }
    out.push(Notified {
        range: r,
        event: MmuNotifyEvent::Unmap,
    });
    out
}

/// `mremap(old, len, MREMAP_MAYMOVE|MREMAP_FIXED, new)` of a whole VMA `old`
/// onto `dst` (occupied by `dst_vmas`, unmapped first): the destination's
/// munmap, the page-table move (hugetlb: `CLEAR` widened; otherwise
/// `UNMAP`), then the munmap of the old range.
pub fn mremap_move(
    old: &VmaShape,
    dst: HvaRange,
    dst_vmas: &[VmaShape],
    pud_present: &dyn Fn(u64) -> bool,
) -> Vec<Notified> {
    let mut out = munmap(dst_vmas, dst, pud_present);
    let ev = if old.hugetlb.is_some() {
        MmuNotifyEvent::Clear
    } else {
        MmuNotifyEvent::Unmap
    };
    out.push(Notified {
        range: adjust_range_if_pmd_sharing_possible(old, old.range),
        event: ev,
    });
    out.push(Notified {
        range: old.range,
        event: MmuNotifyEvent::Unmap,
    });
    out
}

/// `try_realign_addr()` with `PMD_MASK` (mm/mremap.c, called from
/// `move_page_tables()` when the copy reaches a PMD boundary): both
/// addresses are aligned down to 2 MiB when they are misaligned by the same
/// amount, each starts its VMA (`old_starts_vma`; the new VMA starts at
/// `new` unless it merged), and nothing is mapped in the 2 MiB below either
/// (`can_align_down()`: `free_below_*`). Returns the start the page-table
/// move - and its notifier - uses.
pub fn realign_move_start(
    old: u64,
    new: u64,
    len: u64,
    old_starts_vma: bool,
    free_below_old: bool,
    free_below_new: bool,
) -> u64 {
    let off = old & (PMD_SIZE - 1);
    if len < PMD_SIZE - off || off == 0 || off != new & (PMD_SIZE - 1) {
        return old;
    }
    if !old_starts_vma || !free_below_old || !free_below_new {
        return old;
    }
    align_down(old, PMD_SIZE)
}

/// What [`mremap_move_part`] needs to know about the address space.
pub struct MoveState<'a> {
    /// PUD entry non-none at an address (the split rule).
    pub pud_present: &'a dyn Fn(u64) -> bool,
    /// The 2 MiB block at an address is mapped by a huge PMD.
    pub huge_pmd: &'a dyn Fn(u64) -> bool,
    /// Nothing mapped in `[old & PMD_MASK, old)` / `[new & PMD_MASK, new)`.
    pub free_below_old: bool,
    pub free_below_new: bool,
}

/// `mremap(old, len, MREMAP_MAYMOVE|MREMAP_FIXED, dst)` of `old`, a part
/// (or all) of the ordinary VMA `vma` (`move_vma()`, mm/mremap.c): the
/// destination's munmap; `move_page_tables()`'s `UNMAP` from the realigned
/// start ([`realign_move_start`]) to the old end, during which every huge
/// PMD whose block the move's extent does not cover whole is split
/// (`split_huge_pmd()`: `CLEAR` over the block; when old and new are not
/// mutually 2 MiB-aligned no extent is a whole PMD); then
/// `do_vmi_munmap()` of `old`: the [`munmap`] rule (splits at its ends,
/// `UNMAP`).
pub fn mremap_move_part(
    vma: &VmaShape,
    old: HvaRange,
    dst: HvaRange,
    dst_vmas: &[VmaShape],
    st: &MoveState,
) -> Vec<Notified> {
    let mut out = munmap(dst_vmas, dst, st.pud_present);
    let start = realign_move_start(
        old.start,
        dst.start,
        old.len(),
        vma.range.start == old.start,
        st.free_below_old,
        st.free_below_new,
    );
    out.push(Notified::new(start, old.end, MmuNotifyEvent::Unmap));
    let mutual = old.start % PMD_SIZE == dst.start % PMD_SIZE;
    let mut b = align_down(old.start, PMD_SIZE);
    while b < old.end {
        let whole = b >= old.start && b + PMD_SIZE <= old.end;
        if (!mutual || !whole) && (st.huge_pmd)(b) {
            out.push(Notified::new(b, b + PMD_SIZE, MmuNotifyEvent::Clear));
        }
        b += PMD_SIZE;
    }
    let old_vma = [*vma];
    out.extend(munmap(&old_vma, old, st.pud_present));
    out
}

/// `UFFDIO_WRITEPROTECT(r)` (set or clear): change_protection with
/// `MM_CP_UFFD_WP`; hugetlb needs huge-aligned start and length.
pub fn uffd_writeprotect(
    vmas: &[VmaShape],
    r: HvaRange,
    pud_present: &dyn Fn(u64) -> bool,
) -> Result<Vec<Notified>, PredictError> {
    let mut out = Vec::new();
    for v in pieces(vmas, r) {
        let piece = HvaRange::new(r.start.max(v.range.start), r.end.min(v.range.end));
        if let Some(hps) = v.hugetlb {
            if !piece.start.is_multiple_of(hps) || !piece.end.is_multiple_of(hps) {
                return Err(PredictError::Unaligned {
                    start: piece.start,
                    align: hps,
                });
            }
        }
        out.extend(change_protection(v, piece, pud_present));
    }
    Ok(out)
}

/// A VMA as `fork()` sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ForkVma {
    pub shape: VmaShape,
    /// Private VMA that has faulted (`vma->anon_vma`).
    pub anon_vma: bool,
    /// `VM_DONTCOPY` (`MADV_DONTFORK`).
    pub dontfork: bool,
    /// `VM_WIPEONFORK` (`MADV_WIPEONFORK`): `dup_mmap()` gives the child an
    /// empty VMA and skips `copy_page_range()`.
    pub wipeonfork: bool,
}

/// `fork()`: `dup_mmap()` skips `VM_DONTCOPY` VMAs and copies no page
/// table of `VM_WIPEONFORK` ones; `copy_page_range()`
/// skips VMAs `vma_needs_copy()` rejects (no `anon_vma`, not PFNMAP, not
/// uffd-wp); a private hugetlb VMA gets `CLEAR` over the whole VMA
/// (`copy_hugetlb_page_range()`), another COW VMA `PROTECTION_PAGE` over the
/// whole VMA; shared VMAs are not COW: nothing.
pub fn fork(vmas: &[ForkVma]) -> Vec<Notified> {
    vmas.iter()
        .filter(|v| !v.dontfork && !v.wipeonfork && v.anon_vma && !v.shape.may_share)
        .map(|v| {
            let ev = if v.shape.hugetlb.is_some() {
                MmuNotifyEvent::Clear
            } else {
                MmuNotifyEvent::ProtectionPage
            };
            Notified {
                range: v.shape.range,
                event: ev,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const G: u64 = PUD_SIZE;
    const M2: u64 = PMD_SIZE;
    const BASE: u64 = 0x7f00_0000_0000; // 1 GiB aligned (and 512 GiB aligned)
    const RW: i32 = libc::PROT_READ | libc::PROT_WRITE;

    fn shared2m(start: u64, len: u64) -> VmaShape {
        VmaShape {
            range: HvaRange::new(start, start + len),
            hugetlb: Some(M2),
            may_share: true,
            prot: RW,
        }
    }
    fn private2m(start: u64, len: u64) -> VmaShape {
        VmaShape {
            may_share: false,
            ..shared2m(start, len)
        }
    }
    fn anon(start: u64, len: u64) -> VmaShape {
        VmaShape {
            range: HvaRange::new(start, start + len),
            hugetlb: None,
            may_share: false,
            prot: RW,
        }
    }
    fn n(s: u64, e: u64, ev: MmuNotifyEvent) -> Notified {
        Notified::new(s, e, ev)
    }
    fn none(_: u64) -> bool {
        false
    }
    use MmuNotifyEvent::*;

    #[test]
    fn shared_hugetlb_dontneed_widened_to_pud() {
        let v = shared2m(BASE, 2 * G);
        let r = HvaRange::new(BASE + G / 2, BASE + G / 2 + M2);
        assert_eq!(
            dontneed(&[v], r, &|_| false).unwrap(),
            vec![n(BASE, BASE + G, Clear)]
        );
    }

    #[test]
    fn private_hugetlb_dontneed_exact_and_rounded_down() {
        let v = private2m(BASE, G);
        assert_eq!(
            dontneed(&[v], HvaRange::new(BASE, BASE + M2), &|_| false).unwrap(),
            vec![n(BASE, BASE + M2, Clear)]
        );
        assert_eq!(
            dontneed(&[v], HvaRange::new(BASE, BASE + M2 + 4096), &|_| false).unwrap(),
            vec![n(BASE, BASE + M2, Clear)]
        );
        assert!(dontneed(&[v], HvaRange::new(BASE, BASE + 4096), &|_| false)
            .unwrap()
            .is_empty());
        assert!(dontneed(&[v], HvaRange::new(BASE + 4096, BASE + M2), &|_| false).is_err());
    }

    #[test]
    fn shared_not_spanning_pud_not_widened() {
        let v = shared2m(BASE + M2, 16 * M2);
        let r = HvaRange::new(BASE + 4 * M2, BASE + 5 * M2);
        assert_eq!(
            dontneed(&[v], r, &|_| false).unwrap(),
            vec![n(r.start, r.end, Clear)]
        );
    }

    #[test]
    fn thp_dontneed_splits_partly_covered_huge_pmds() {
        let v = anon(BASE, 64 << 20);
        let huge = |a: u64| a < BASE + 8 * M2;
        // Inside one huge PMD: the zap and the split of that block.
        let r = HvaRange::new(BASE + M2 + 4096, BASE + M2 + 8192);
        assert_eq!(
            dontneed(&[v], r, &huge).unwrap(),
            vec![n(r.start, r.end, Clear), n(BASE + M2, BASE + 2 * M2, Clear)]
        );
        // Across two: both split; a whole block is zapped as one.
        let r = HvaRange::new(BASE + M2 / 2, BASE + 2 * M2 + M2 / 2);
        assert_eq!(
            dontneed(&[v], r, &huge).unwrap(),
            vec![
                n(r.start, r.end, Clear),
                n(BASE, BASE + M2, Clear),
                n(BASE + 2 * M2, BASE + 3 * M2, Clear)
            ]
        );
        let r = HvaRange::new(BASE + 2 * M2, BASE + 4 * M2);
        assert_eq!(
            dontneed(&[v], r, &huge).unwrap(),
            vec![n(r.start, r.end, Clear)]
        );
        // Not huge there: no split.
        let r = HvaRange::new(BASE + 20 * M2 + 4096, BASE + 20 * M2 + 8192);
        assert_eq!(
            dontneed(&[v], r, &huge).unwrap(),
            vec![n(r.start, r.end, Clear)]
        );
    }

    #[test]
    fn collapse_notifies_blocks_mapped_by_ptes() {
        let v = anon(BASE, 64 << 20);
        let state = |a: u64| match (a - BASE) / M2 {
            0 | 1 => PmdState::Ptes,
            2 => PmdState::Huge,
            _ => PmdState::Empty,
        };
        // [4K, 8M): blocks 1..4 whole inside; block 0 is not.
        let r = HvaRange::new(BASE + 4096, BASE + 4 * M2);
        assert_eq!(
            collapse(&[v], r, &state),
            vec![n(BASE + M2, BASE + 2 * M2, Clear)]
        );
        assert!(collapse(&[private2m(BASE, 8 * M2)], r, &state).is_empty());
    }

    #[test]
    fn punch_hole_rounds_inwards_and_widens() {
        let v = shared2m(BASE, 2 * G);
        let m = [FileVma { vma: v, offset: 0 }];
        assert_eq!(
            punch_hole(&m, M2, G, M2),
            vec![n(BASE + G, BASE + 2 * G, Clear)]
        );
        assert!(punch_hole(&m, M2, G + 4096, M2 - 8192).is_empty());
        let small = [FileVma {
            vma: shared2m(BASE + M2, 8 * M2),
            offset: 0,
        }];
        assert_eq!(
            punch_hole(&small, M2, M2 / 2, 3 * M2),
            vec![n(BASE + 2 * M2, BASE + 4 * M2, Clear)]
        );
    }

    #[test]
    fn partial_mprotect_of_shared_hugetlb_unshares_then_protects() {
        let v = shared2m(BASE, 2 * G);
        let r = HvaRange::new(BASE + G / 2, BASE + G / 2 + M2);
        assert_eq!(
            mprotect(&[v], r, libc::PROT_READ, &none),
            vec![n(BASE, BASE + G, Clear), n(r.start, r.end, ProtectionVma)]
        );
        // PUD-aligned half: no split inside a PUD, protection over exactly it.
        let r2 = HvaRange::new(BASE + G, BASE + 2 * G);
        assert_eq!(
            mprotect(&[v], r2, libc::PROT_READ, &none),
            vec![n(r2.start, r2.end, ProtectionVma)]
        );
        // Same protection: nothing at all.
        assert!(mprotect(&[v], r2, RW, &none).is_empty());
    }

    #[test]
    fn hugetlb_mprotect_unpopulated_is_notified() {
        let v = private2m(BASE + M2, 8 * M2);
        assert_eq!(
            mprotect(&[v], v.range, libc::PROT_READ, &none),
            vec![n(v.range.start, v.range.end, ProtectionVma)]
        );
    }

    #[test]
    fn anon_mprotect_pud_rule() {
        let v = anon(BASE, 4 * G);
        // Nothing touched: nothing.
        assert!(mprotect(
            &[v],
            HvaRange::new(BASE + G, BASE + 2 * G),
            libc::PROT_READ,
            &none
        )
        .is_empty());
        // One page touched in [1G,2G): the whole walked range from that PUD.
        let touched = |a: u64| align_down(a, G) == BASE + G;
        assert_eq!(
            mprotect(
                &[v],
                HvaRange::new(BASE, BASE + 4 * G),
                libc::PROT_READ,
                &touched
            ),
            vec![n(BASE + G, BASE + 4 * G, ProtectionVma)]
        );
        // 4 KiB inside a populated PUD at a 2 MiB boundary: the PMD split at
        // the unaligned end, then the 4 KiB protection change.
        let a = BASE + G + 3 * G / 4;
        assert_eq!(
            mprotect(&[v], HvaRange::new(a, a + 4096), libc::PROT_READ, &touched),
            vec![n(a, a + M2, Clear), n(a, a + 4096, ProtectionVma)]
        );
    }

    #[test]
    fn anon_change_protection_one_notifier_per_pgd_entry() {
        let v = anon(BASE, 2 * PGDIR_SIZE);
        let all = |_: u64| true;
        assert_eq!(
            change_protection(&v, v.range, &all),
            vec![
                n(BASE, BASE + PGDIR_SIZE, ProtectionVma),
                n(BASE + PGDIR_SIZE, BASE + 2 * PGDIR_SIZE, ProtectionVma)
            ]
        );
    }

    #[test]
    fn numa_hint_skips_hugetlb() {
        let v = private2m(BASE, G);
        assert!(numa_hint(&v, v.range, &|_| true).is_empty());
        let a = anon(BASE, 64 << 20);
        assert_eq!(
            numa_hint(&a, a.range, &|_| true),
            vec![n(a.range.start, a.range.end, ProtectionVma)]
        );
    }

    #[test]
    fn munmap_exact_with_unshare_split() {
        let v = shared2m(BASE, 2 * G);
        let r = HvaRange::new(BASE + G / 2, BASE + G / 2 + M2);
        assert_eq!(
            munmap(&[v], r, &none),
            vec![n(BASE, BASE + G, Clear), n(r.start, r.end, Unmap)]
        );
        let p = private2m(BASE, 8 * M2);
        assert_eq!(
            munmap(&[p], HvaRange::new(BASE + M2, BASE + 2 * M2), &none),
            vec![n(BASE + M2, BASE + 2 * M2, Unmap)]
        );
        assert!(munmap(&[p], HvaRange::new(BASE + G, BASE + 2 * G), &none).is_empty());
    }

    #[test]
    fn uffd_wp_widened_on_shared() {
        let v = shared2m(BASE, 2 * G);
        let r = HvaRange::new(BASE + G / 2, BASE + G / 2 + M2);
        assert_eq!(
            uffd_writeprotect(&[v], r, &none).unwrap(),
            vec![n(BASE, BASE + G, ProtectionVma)]
        );
        assert!(uffd_writeprotect(&[v], HvaRange::new(BASE, BASE + 4096), &none).is_err());
    }

    #[test]
    fn fork_copies_only_private_faulted_copyable_vmas() {
        let f = |shape, anon_vma, dontfork| ForkVma {
            shape,
            anon_vma,
            dontfork,
            wipeonfork: false,
        };
        let p = private2m(BASE, 8 * M2);
        let a = anon(BASE + G, 64 << 20);
        let sh = shared2m(BASE + 2 * G, 8 * M2);
        assert_eq!(
            fork(&[f(p, true, false), f(a, true, false), f(sh, false, false)]),
            vec![
                n(p.range.start, p.range.end, Clear),
                n(a.range.start, a.range.end, ProtectionPage)
            ]
        );
        assert!(fork(&[f(p, false, false), f(a, true, true)]).is_empty());
    }

    #[test]
    fn adjust_only_inside_the_pud_aligned_core() {
        let v = shared2m(BASE + G - 4 * M2, G + 8 * M2); // core [BASE+G, BASE+2G)
        let outside = HvaRange::new(BASE + G - 2 * M2, BASE + G - M2);
        assert_eq!(adjust_range_if_pmd_sharing_possible(&v, outside), outside);
        let inside = HvaRange::new(BASE + G + M2, BASE + G + 2 * M2);
        assert_eq!(
            adjust_range_if_pmd_sharing_possible(&v, inside),
            HvaRange::new(BASE + G, BASE + 2 * G)
        );
    }
}
