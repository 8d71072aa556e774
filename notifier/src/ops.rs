//! Operations on guest RAM that announce their invalidations the way a kernel
//! mmu_notifier subscriber would see them: for each operation, the notifier
//! ranges and `MMU_NOTIFY_*` events Linux will use are predicted
//! ([`crate::predict`]) and delivered through [`Subscribers::start`](crate::Subscribers::start)
//! (`Delivery::Before`, blockable) *before* the syscall; the syscall runs;
//! then [`Subscribers::end`](crate::Subscribers::end) for each, in reverse order. The kernel issues its
//! notifiers one after the other inside the syscall; from user space they are
//! all open across it, which is a superset of the kernel's windows.
//!
//! The model in [`HostMm`] is updated after the syscall (VMA splits, holes,
//! moves). Alignment rules of hugetlb are checked first and refused with
//! [`Error::Unaligned`] instead of letting the kernel answer `EINVAL`.
//!
//! NUMA hinting is not an operation: user space cannot call
//! `change_prot_numa()`; the kernel's `task_numa_work()` does when
//! `kernel.numa_balancing` is on and a task of this mm runs long enough.
//! [`HostMm::predict_numa_hint`] says what it will notify (nothing on hugetlb:
//! `task_numa_work()` skips hugetlb VMAs); the tracepoint source delivers the
//! real ones, after the fact.

use crate::convert::u64_to_usize;
use crate::error::{Error, Result};
use crate::hostmm::{HostMm, RegionId};
use crate::predict::{self, Notified, PredictError};
use crate::subscriber::{Delivery, HvaRange, Invalidation};
use crate::uffd::Uffd;

/// Which `madvise()` discard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Discard {
    /// `MADV_DONTNEED`: hugetlb start must be huge-aligned, the length is
    /// rounded down to whole huge pages.
    DontNeed,
    /// `MADV_REMOVE`: hole punch in the backing memfd (shared only), rounded
    /// inwards to whole huge pages.
    Remove,
}

impl HostMm {
    fn pud_fn(&self) -> impl Fn(u64) -> bool + '_ {
        move |a| self.pud_present(a)
    }

    fn announce<T>(&self, notes: &[Notified], f: impl FnOnce() -> Result<T>) -> Result<T> {
        let invs: Vec<Invalidation> = notes
            .iter()
            .map(|n| Invalidation {
                range: n.range,
                event: n.event,
                blockable: true,
                delivery: Delivery::Before,
            })
            .collect();
        for i in &invs {
            self.subs.start(i);
        }
        let out = f();
        for i in invs.iter().rev() {
            self.subs.end(i);
        }
        out
    }

    fn check_inside(&self, op: &'static str, r: HvaRange) -> Result<()> {
        if r.is_empty() || self.shapes(r).is_empty() {
            return Err(Error::OutOfRegion {
                op,
                start: r.start,
                end: r.end,
            });
        }
        Ok(())
    }

    /// Every hugetlb VMA piece of `r` must start and end on its page size.
    fn check_huge_aligned(&self, op: &'static str, r: HvaRange) -> Result<()> {
        for v in self.shapes(r) {
            if let Some(hps) = v.hugetlb {
                let s = r.start.max(v.range.start);
                let e = r.end.min(v.range.end);
                if s % hps != 0 || e % hps != 0 {
                    return Err(Error::Unaligned {
                        op,
                        start: r.start,
                        end: r.end,
                        align: hps,
                    });
                }
            }
        }
        Ok(())
    }

    fn unaligned(op: &'static str, r: HvaRange, e: PredictError) -> Error {
        match e {
            PredictError::Unaligned { align, .. } => Error::Unaligned {
                op,
                start: r.start,
                end: r.end,
                align,
            },
        }
    }

    /// `mprotect(r, prot)`. Returns the announced notifiers.
    pub fn protect(&mut self, r: HvaRange, prot: i32) -> Result<Vec<Notified>> {
        self.check_inside("protect", r)?;
        self.check_huge_aligned("protect", r)?;
        self.refresh_puds(r)?;
        let notes = predict::mprotect(&self.shapes(r), r, prot, &self.pud_fn());
        self.announce(&notes, || {
            // SAFETY: `r` lies in VMAs owned by this HostMm (checked above);
            // changing their protection cannot affect memory Rust owns.
            if unsafe { libc::mprotect(r.start as *mut libc::c_void, u64_to_usize(r.len()), prot) }
                != 0
            {
                return Err(Error::last_os("mprotect"));
            }
            Ok(())
        })?;
        self.apply_mprotect(r, prot);
        Ok(notes)
    }

    /// `madvise(r, MADV_DONTNEED | MADV_REMOVE)`.
    pub fn discard(&mut self, r: HvaRange, how: Discard) -> Result<Vec<Notified>> {
        self.check_inside("discard", r)?;
        let shapes = self.shapes(r);
        let notes = match how {
            Discard::DontNeed => {
                let huge = self.huge_pmds(r, true)?;
                predict::dontneed(&shapes, r, &|b| huge.contains(&b))
                    .map_err(|e| Self::unaligned("discard(MADV_DONTNEED)", r, e))?
            }
            Discard::Remove => {
                let mut notes = Vec::new();
                for v in self.vmas().iter().filter(|v| v.shape.range.overlaps(&r)) {
                    // shmem punches whole 4 KiB pages (`shmem_fallocate()`
                    // rounds the hole in to PAGE_SIZE), hugetlbfs whole
                    // huge pages (`hugetlbfs_punch_hole()`).
                    let hps = v.shape.hugetlb.unwrap_or(4096);
                    let (Some(id), Some(off)) = (v.region, v.file_offset) else {
                        return Err(Error::Unsupported { op: "discard(MADV_REMOVE)", why: "only shared memfd regions can be hole-punched (MAP_PRIVATE gives EACCES)" });
                    };
                    let s = r.start.max(v.shape.range.start);
                    let e = r.end.min(v.shape.range.end);
                    let foff = off + (s - v.shape.range.start);
                    notes.extend(predict::punch_hole(
                        &self.file_mappings(id),
                        hps,
                        foff,
                        e - s,
                    ));
                }
                notes
            }
        };
        let advice = match how {
            Discard::DontNeed => libc::MADV_DONTNEED,
            Discard::Remove => libc::MADV_REMOVE,
        };
        self.announce(&notes, || madvise(r, advice, "madvise"))?;
        Ok(notes)
    }

    /// `fallocate(PUNCH_HOLE|KEEP_SIZE)` on the memfd of a shared region
    /// (file offsets). No userfaultfd event exists for this one.
    pub fn punch_hole(&mut self, id: RegionId, offset: u64, len: u64) -> Result<Vec<Notified>> {
        let region = self.region(id).ok_or(Error::OutOfRegion {
            op: "punch_hole",
            start: offset,
            end: offset + len,
        })?;
        let fd = region.memfd().ok_or(Error::Unsupported {
            op: "punch_hole",
            why: "region has no memfd (not a shared memfd region)",
        })?;
        let hps = region.backing.page_size().bytes();
        let out_of_file = || Error::OutOfRegion {
            op: "punch_hole",
            start: offset,
            end: offset.saturating_add(len),
        };
        // fallocate takes off_t (i64): larger offsets are past any memfd.
        let foff = libc::off_t::try_from(offset).map_err(|_| out_of_file())?;
        let flen = libc::off_t::try_from(len).map_err(|_| out_of_file())?;
        let notes = predict::punch_hole(&self.file_mappings(id), hps, offset, len);
        self.announce(&notes, || {
            // SAFETY: fallocate on our own memfd; the pages it frees are only
            // mapped by VMAs owned by this HostMm.
            if unsafe {
                libc::fallocate(
                    fd,
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    foff,
                    flen,
                )
            } != 0
            {
                return Err(Error::last_os("fallocate(PUNCH_HOLE)"));
            }
            Ok(())
        })?;
        Ok(notes)
    }

    /// `munmap(r)`.
    pub fn unmap(&mut self, r: HvaRange) -> Result<Vec<Notified>> {
        self.check_inside("unmap", r)?;
        self.check_huge_aligned("unmap", r)?;
        self.refresh_puds(r)?;
        let notes = predict::munmap(&self.shapes(r), r, &self.pud_fn());
        self.announce(&notes, || {
            // SAFETY: `r` lies in VMAs owned by this HostMm (checked above),
            // which forgets them right after; no Rust reference points there.
            if unsafe { libc::munmap(r.start as *mut libc::c_void, u64_to_usize(r.len())) } != 0 {
                return Err(Error::last_os("munmap"));
            }
            Ok(())
        })?;
        self.apply_munmap(r);
        Ok(notes)
    }

    /// `mremap(old, len, MREMAP_MAYMOVE|MREMAP_FIXED, dst)` of whole VMAs
    /// onto `dst` (typically a range from [`HostMm::reserve`]).
    pub fn remap(&mut self, old: HvaRange, dst: u64) -> Result<Vec<Notified>> {
        self.check_inside("remap", old)?;
        self.check_huge_aligned("remap", old)?;
        let shapes = self.shapes(old);
        let [v] = shapes.as_slice() else {
            return Err(Error::Unsupported {
                op: "remap",
                why: "the range must be exactly one VMA",
            });
        };
        if v.range != old {
            return Err(Error::Unsupported {
                op: "remap",
                why: "the range must be exactly one VMA",
            });
        }
        if let Some(hps) = v.hugetlb {
            if !dst.is_multiple_of(hps) {
                return Err(Error::Unaligned {
                    op: "remap",
                    start: dst,
                    end: dst + old.len(),
                    align: hps,
                });
            }
        }
        let dst_r = HvaRange::new(dst, dst + old.len());
        let dst_shapes = self.shapes(dst_r);
        let notes = predict::mremap_move(v, dst_r, &dst_shapes, &self.pud_fn());
        self.announce(&notes, || mremap_fixed(old, dst))?;
        self.apply_mremap(old, dst);
        Ok(notes)
    }

    /// `mremap(old, len, MREMAP_MAYMOVE|MREMAP_FIXED, dst)` of part (or
    /// all) of one ordinary VMA onto `dst` (typically a range from
    /// [`HostMm::reserve`]): [`predict::mremap_move_part`], with the huge
    /// PMDs of `old` and whether the 2 MiB below each start is free of
    /// mappings (`/proc/self/maps`) read first.
    pub fn remap_part(&mut self, old: HvaRange, dst: u64) -> Result<Vec<Notified>> {
        self.check_inside("remap_part", old)?;
        let shapes = self.shapes(old);
        let [v] = shapes.as_slice() else {
            return Err(Error::Unsupported {
                op: "remap_part",
                why: "the range must lie in one VMA",
            });
        };
        let v = *v;
        if v.hugetlb.is_some() || old.start < v.range.start || old.end > v.range.end {
            return Err(Error::Unsupported {
                op: "remap_part",
                why: "the range must lie in one non-hugetlb VMA (hugetlb: use remap)",
            });
        }
        self.refresh_puds(old)?;
        let dst_r = HvaRange::new(dst, dst + old.len());
        let dst_shapes = self.shapes(dst_r);
        let huge = self.huge_pmds(old, false)?;
        let free_below = |a: u64| -> Result<bool> {
            let below = HvaRange::new(predict::align_down(a, predict::PMD_SIZE), a);
            Ok(below.is_empty() || crate::hostmm::kernel_vmas(below)?.is_empty())
        };
        let (free_old, free_new) = (free_below(old.start)?, free_below(dst)?);
        let notes = {
            let pud = self.pud_fn();
            let st = predict::MoveState {
                pud_present: &pud,
                huge_pmd: &|b| huge.contains(&b),
                free_below_old: free_old,
                free_below_new: free_new,
            };
            predict::mremap_move_part(&v, old, dst_r, &dst_shapes, &st)
        };
        self.announce(&notes, || mremap_fixed(old, dst))?;
        self.apply_mremap(old, dst);
        Ok(notes)
    }

    /// `UFFDIO_WRITEPROTECT(r)` through `uffd` (which must have `r`
    /// registered in WP mode), one ioctl per VMA `r` covers: 6.1's
    /// `mwriteprotect_range()` (mm/userfaultfd.c) takes a range "fully
    /// within a single existing vma" and answers ENOENT otherwise (a range
    /// an earlier mprotect split); later kernels walk the VMAs themselves
    /// (`for_each_vma_range`), one `uffd_wp_range()` - one notifier range -
    /// per VMA either way, so the prediction is the same.
    pub fn write_protect(&mut self, uffd: &Uffd, r: HvaRange, wp: bool) -> Result<Vec<Notified>> {
        self.check_inside("write_protect", r)?;
        self.refresh_puds(r)?;
        let shapes = self.shapes(r);
        // With pte markers (`userfaultfd_wp_use_markers()`: file memory
        // always, anonymous with WP_UNPOPULATED) `change_prepare()` of
        // mm/mprotect.c allocates the page tables down to the PTEs before
        // `change_pud_range()` looks for a non-none PUD: every PUD is
        // present and the notifier opens at the range start.
        let markers = wp
            && shapes.iter().all(|v| v.hugetlb.is_none())
            && (shapes.iter().all(|v| v.may_share)
                || uffd.enabled() & crate::uffd::UFFD_FEATURE_WP_UNPOPULATED != 0);
        let pud = self.pud_fn();
        let all = |_: u64| true;
        let pud_present: &dyn Fn(u64) -> bool = if markers { &all } else { &pud };
        let notes = predict::uffd_writeprotect(&shapes, r, pud_present)
            .map_err(|e| Self::unaligned("write_protect", r, e))?;
        let pieces: Vec<HvaRange> = shapes
            .iter()
            .map(|s| HvaRange::new(s.range.start.max(r.start), s.range.end.min(r.end)))
            .filter(|p| !p.is_empty())
            .collect();
        self.announce(&notes, || {
            match pieces.iter().try_for_each(|p| uffd.write_protect(*p, wp)) {
                // A VMA split this HostMm did not make (a raw mprotect of
                // someone else's): split at the kernel's own VMAs.
                Err(Error::Syscall { source, .. })
                    if source.raw_os_error() == Some(libc::ENOENT) =>
                {
                    kernel_vma_pieces(r)?
                        .iter()
                        .try_for_each(|p| uffd.write_protect(*p, wp))
                }
                other => other,
            }
        })?;
        Ok(notes)
    }

    /// `madvise(MADV_DONTFORK)` over a whole region (no VMA split, so no
    /// notifier): fork will skip it.
    pub fn set_dontfork(&mut self, id: RegionId) -> Result<()> {
        for v in self.vmas().iter().filter(|v| v.region == Some(id)) {
            madvise(v.shape.range, libc::MADV_DONTFORK, "madvise(MADV_DONTFORK)")?;
        }
        self.apply_dontfork(id);
        Ok(())
    }

    /// `madvise(MADV_WIPEONFORK)` over a whole region (anonymous private
    /// memory only; no VMA split, no notifier).
    pub fn set_wipeonfork(&mut self, id: RegionId) -> Result<()> {
        for v in self.vmas().iter().filter(|v| v.region == Some(id)) {
            madvise(
                v.shape.range,
                libc::MADV_WIPEONFORK,
                "madvise(MADV_WIPEONFORK)",
            )?;
        }
        self.apply_wipeonfork(id);
        Ok(())
    }

    /// `madvise(r, MADV_FREE)` on anonymous memory. A huge PMD `r` covers
    /// only in part is refused (its split goes through `split_folio()`'s
    /// rmap walk: not predicted).
    pub fn free(&mut self, r: HvaRange) -> Result<Vec<Notified>> {
        self.check_inside("free", r)?;
        let huge = self.huge_pmds(r, true)?;
        let notes = predict::madv_free(&self.shapes(r), r, &|b| huge.contains(&b)).ok_or(
            Error::Unsupported {
                op: "madvise(MADV_FREE)",
                why: "only anonymous memory, and no huge PMD covered in part",
            },
        )?;
        self.announce(&notes, || madvise(r, libc::MADV_FREE, "madvise(MADV_FREE)"))?;
        Ok(notes)
    }

    /// `madvise(r, MADV_COLLAPSE)` (6.1+): collapse the 2 MiB blocks of `r`
    /// mapped by PTEs into huge PMDs.
    pub fn collapse(&mut self, r: HvaRange) -> Result<Vec<Notified>> {
        /// `MADV_COLLAPSE` (include/uapi/asm-generic/mman-common.h).
        const MADV_COLLAPSE: i32 = 25;
        self.check_inside("collapse", r)?;
        let states = self.pmd_states(r)?;
        let state = |b: u64| {
            states
                .iter()
                .find(|(a, _)| *a == b)
                .map_or(predict::PmdState::Empty, |(_, s)| *s)
        };
        let notes = predict::collapse(&self.shapes(r), r, &state);
        // `madvise_collapse()` collapses what it can and answers for the
        // last block it could not: EINVAL (`madvise_collapse_errno()`'s
        // default) for an empty one - the other blocks are collapsed all
        // the same.
        let some_empty = states.iter().any(|(_, s)| *s == predict::PmdState::Empty);
        self.announce(&notes, || {
            match madvise(r, MADV_COLLAPSE, "madvise(MADV_COLLAPSE)") {
                Err(Error::Syscall { source, .. })
                    if some_empty && source.raw_os_error() == Some(libc::EINVAL) =>
                {
                    Ok(())
                }
                other => other,
            }
        })?;
        Ok(notes)
    }

    /// `mremap(old, old_len, new_len, 0)` shrinking one VMA in place.
    pub fn shrink(&mut self, old: HvaRange, new_len: u64) -> Result<Vec<Notified>> {
        self.check_inside("shrink", old)?;
        if new_len == 0 || new_len >= old.len() {
            return Err(Error::Unsupported {
                op: "shrink",
                why: "the new length must be shorter than the old and not 0",
            });
        }
        let tail = HvaRange::new(old.start + new_len, old.end);
        self.check_huge_aligned("shrink", tail)?;
        self.refresh_puds(old)?;
        let notes = predict::mremap_shrink(&self.shapes(old), old, new_len, &self.pud_fn());
        self.announce(&notes, || {
            // SAFETY: `old` lies in VMAs owned by this HostMm, which forgets
            // the tail right after; no Rust reference points there.
            let p = unsafe {
                libc::mremap(
                    old.start as *mut libc::c_void,
                    u64_to_usize(old.len()),
                    u64_to_usize(new_len),
                    0,
                )
            };
            if p == libc::MAP_FAILED {
                return Err(Error::last_os("mremap(shrink)"));
            }
            Ok(())
        })?;
        self.apply_shrink(old, new_len);
        Ok(notes)
    }

    /// `UFFDIO_REGISTER` of `r` on `uffd` with `mode`.
    pub fn uffd_register(&mut self, uffd: &Uffd, r: HvaRange, mode: u64) -> Result<Vec<Notified>> {
        self.check_inside("uffd_register", r)?;
        self.refresh_puds(r)?;
        let notes = predict::uffd_register(&self.shapes(r), r, &self.pud_fn());
        self.announce(&notes, || uffd.register(r, mode).map(|_| ()))?;
        self.apply_uffd_register(r);
        Ok(notes)
    }

    /// `fork()` a child that exits at once: what a VMM spawning a helper
    /// does to its guest RAM (COW write-protection of private memory). The
    /// child only calls `_exit`.
    pub fn fork_exit(&mut self) -> Result<Vec<Notified>> {
        let vmas = self.vmas().to_vec();
        let mut fv = Vec::new();
        for v in vmas {
            let present = !v.shape.may_share && self.pagemap.any_present(v.shape.range)?;
            fv.push(predict::ForkVma {
                shape: v.shape,
                anon_vma: v.anon_vma || present,
                dontfork: v.dontfork,
                wipeonfork: v.wipeonfork,
            });
        }
        let notes = predict::fork(&fv);
        self.announce(&notes, || {
            // SAFETY: the child runs only `_exit` (async-signal-safe), so
            // forking a multi-threaded process is sound here.
            let pid = unsafe { libc::fork() };
            if pid == 0 {
                // SAFETY: leave the child at once without running any Rust code.
                unsafe { libc::_exit(0) };
            }
            if pid < 0 {
                return Err(Error::last_os("fork"));
            }
            let mut status = 0;
            // SAFETY: reaping the child just created.
            unsafe { libc::waitpid(pid, &mut status, 0) };
            Ok(())
        })?;
        Ok(notes)
    }

    /// What `task_numa_work()` notifies when it scans region `id` in one
    /// window covering each VMA (its 256 MiB budget covers smaller VMAs):
    /// the PUD rule of change_protection; nothing for hugetlb.
    pub fn predict_numa_hint(&mut self, id: RegionId) -> Result<Vec<Notified>> {
        let r = self.region_range(id, "numa_hint")?;
        self.refresh_puds(r)?;
        let mut out = Vec::new();
        for v in self.shapes(r) {
            out.extend(predict::numa_hint(&v, v.range, &self.pud_fn()));
        }
        Ok(out)
    }
}

/// `madvise(r, advice)`, `r` lying in VMAs owned by the calling HostMm;
/// `op` names the call in the error.
fn madvise(r: HvaRange, advice: i32, op: &'static str) -> Result<()> {
    // SAFETY: `r` is guest RAM of the caller's HostMm, never memory Rust
    // owns; the advices used (DONTNEED, REMOVE, FREE, COLLAPSE, DONTFORK,
    // WIPEONFORK) drop, keep or copy its contents or change VMA flags only.
    if unsafe { libc::madvise(r.start as *mut libc::c_void, u64_to_usize(r.len()), advice) } != 0 {
        return Err(Error::last_os(op));
    }
    Ok(())
}

/// `mremap(old, len, MREMAP_MAYMOVE|MREMAP_FIXED, dst)`, `old` and `dst`
/// being ranges of VMAs owned by the calling HostMm.
fn mremap_fixed(old: HvaRange, dst: u64) -> Result<()> {
    // SAFETY: both ranges belong to VMAs owned by the caller's HostMm (the
    // destination is its own or unmapped); MREMAP_FIXED replaces only it.
    let p = unsafe {
        libc::mremap(
            old.start as *mut libc::c_void,
            u64_to_usize(old.len()),
            u64_to_usize(old.len()),
            libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
            dst as *mut libc::c_void,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(Error::last_os("mremap"));
    }
    Ok(())
}

/// `r` cut at the boundaries of this process's VMAs (`/proc/self/maps`).
fn kernel_vma_pieces(r: HvaRange) -> Result<Vec<HvaRange>> {
    let maps = std::fs::read_to_string("/proc/self/maps").map_err(|source| Error::Syscall {
        op: "read /proc/self/maps",
        source,
    })?;
    Ok(maps
        .lines()
        .filter_map(|l| {
            let (a, b) = l.split_whitespace().next()?.split_once('-')?;
            let (a, b) = (
                u64::from_str_radix(a, 16).ok()?,
                u64::from_str_radix(b, 16).ok()?,
            );
            let p = HvaRange::new(a.max(r.start), b.min(r.end));
            (a < r.end && b > r.start && !p.is_empty()).then_some(p)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::hostmm::{Backing, Placement};
    use crate::subscriber::Subscribers;
    use crate::PageSize;

    /// Unaligned hugetlb ranges are refused with a typed error before any
    /// syscall or announcement (MAP_NORESERVE: no huge page is needed).
    #[test]
    fn unaligned_hugetlb_ranges_are_typed_errors() {
        let Ok(mut mm) = HostMm::new(Subscribers::new()) else {
            return;
        };
        let Ok(id) = mm.map(
            Backing::PrivateHugetlb(PageSize::Size2M),
            8 << 20,
            Placement::pud_offset(2 << 20),
        ) else {
            eprintln!("SKIP: hugetlb mmap refused here");
            return;
        };
        let b = mm.region(id).map(|r| r.base).unwrap_or(0);
        let r = HvaRange::new(b + 4096, b + (2 << 20));
        assert!(
            matches!(mm.protect(r, libc::PROT_READ), Err(Error::Unaligned { align, .. }) if align == 2 << 20)
        );
        assert!(matches!(mm.unmap(r), Err(Error::Unaligned { .. })));
        assert!(matches!(
            mm.discard(r, Discard::DontNeed),
            Err(Error::Unaligned { .. })
        ));
        assert!(matches!(
            mm.discard(HvaRange::new(b, b + (2 << 20)), Discard::Remove),
            Err(Error::Unsupported { .. })
        ));
        let msg = mm
            .protect(r, libc::PROT_READ)
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(msg.contains("round it to whole huge pages"), "{msg}");
        assert!(matches!(
            mm.protect(HvaRange::new(1, 2), libc::PROT_READ),
            Err(Error::OutOfRegion { .. })
        ));
    }
}
