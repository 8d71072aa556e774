//! Which pages of guest RAM are populated: a thin binding of the
//! `PAGEMAP_SCAN` ioctl (Linux 6.7+, no crate wraps it; `libc` has none of its
//! definitions) filtered on `PAGE_IS_PRESENT`, with a `/proc/self/pagemap`
//! fallback for older kernels.
//!
//! This module never asks for a write-protecting scan: `PM_SCAN_WP_MATCHING`
//! over an unpopulated hugetlb range self-deadlocks on kernels without the
//! 2026 fixes to `pagemap_scan_hugetlb_entry()`, so `flags` is always 0.

use crate::convert::u64_to_usize;
use crate::error::{Error, Result};
use crate::subscriber::HvaRange;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

/// `PAGE_IS_PRESENT` (include/uapi/linux/fs.h).
pub const PAGE_IS_PRESENT: u64 = 1 << 3;
/// `PAGE_IS_HUGE`: also reported for unpopulated hugetlb ranges.
pub const PAGE_IS_HUGE: u64 = 1 << 6;

/// `struct page_region`.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct PageRegion {
    start: u64,
    end: u64,
    categories: u64,
}

/// `struct pm_scan_arg`.
#[repr(C)]
#[derive(Debug, Default)]
struct PmScanArg {
    size: u64,
    flags: u64,
    start: u64,
    end: u64,
    walk_end: u64,
    vec: u64,
    vec_len: u64,
    max_pages: u64,
    category_inverted: u64,
    category_mask: u64,
    category_anyof_mask: u64,
    return_mask: u64,
}

/// `_IOWR('f', 16, struct pm_scan_arg)`.
const PAGEMAP_SCAN: u64 =
    (3 << 30) | ((std::mem::size_of::<PmScanArg>() as u64) << 16) | ((b'f' as u64) << 8) | 16;

const VEC_LEN: usize = 256;

/// Which interface answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    PagemapScan,
    ProcPagemap,
}

/// A handle on `/proc/self/pagemap`.
pub struct Pagemap {
    file: File,
    scan_works: bool,
    /// `/proc/kpageflags`, opened on first need (root only).
    kpageflags: Option<File>,
}

impl Pagemap {
    pub fn open() -> Result<Self> {
        let file = File::open("/proc/self/pagemap").map_err(|source| Error::Syscall {
            op: "open /proc/self/pagemap",
            source,
        })?;
        Ok(Self {
            file,
            scan_works: true,
            kpageflags: None,
        })
    }

    /// The interface the last call used.
    pub fn method(&self) -> Method {
        if self.scan_works {
            Method::PagemapScan
        } else {
            Method::ProcPagemap
        }
    }

    /// Populated (present) runs inside `r`, merged, in address order.
    pub fn present(&mut self, r: HvaRange) -> Result<Vec<HvaRange>> {
        if r.is_empty() {
            return Ok(Vec::new());
        }
        if let Some(v) = self.scan_if_it_works(r, PAGE_IS_PRESENT)? {
            return Ok(v);
        }
        self.read_present(r)
    }

    /// True when any page of `r` is present.
    pub fn any_present(&mut self, r: HvaRange) -> Result<bool> {
        Ok(!self.present(r)?.is_empty())
    }

    /// Whether all of `r` is present and mapped by huge page-table entries
    /// (`PAGE_IS_HUGE`: a PMD- or PUD-mapped THP or hugetlb page;
    /// `pagemap_thp_category()` of fs/proc/task_mmu.c, 6.7+): what KVM's
    /// `host_pfn_mapping_level()` reads from the host page tables before
    /// it maps a huge SPTE. Without PAGEMAP_SCAN (before 6.7) the answer
    /// comes from [`Self::whole_folio_mapped`]. `Ok(None)`: neither can
    /// tell (no PAGEMAP_SCAN and no root for the PFNs) - the caller must
    /// assume small pages.
    pub fn huge_mapped(&mut self, r: HvaRange) -> Result<Option<bool>> {
        if r.is_empty() {
            return Ok(None);
        }
        if let Some(v) = self.scan_if_it_works(r, PAGE_IS_PRESENT | PAGE_IS_HUGE)? {
            return Ok(Some(v.len() == 1 && v[0] == r));
        }
        self.whole_folio_mapped(r)
    }

    /// The pre-6.7 answer, for a 2 MiB-aligned 2 MiB `r` (else `None`):
    /// every page of `r` is present, the PFNs run in order from a PFN aligned to the
    /// range's size, and the first is the head of a THP folio
    /// (`/proc/kpageflags`: `KPF_THP` and `KPF_COMPOUND_HEAD`, set by
    /// `stable_page_flags()` of fs/proc/page.c). That is one huge folio
    /// mapped whole and in order: the translation a huge SPTE gives is the
    /// host's, even if the host maps it with PTEs (a PMD split that left
    /// the folio whole), and any later change to it is notified over its
    /// range, which zaps the huge SPTE. `Ok(None)` when the PFNs are
    /// hidden (not root: `pagemap_read()` zeroes them without
    /// CAP_SYS_ADMIN) or `/proc/kpageflags` cannot be read.
    fn whole_folio_mapped(&mut self, r: HvaRange) -> Result<Option<bool>> {
        const PS: u64 = 4096;
        const PRESENT: u64 = 1 << 63;
        const PFN_MASK: u64 = (1 << 55) - 1;
        const KPF_COMPOUND_HEAD: u64 = 1 << 15;
        const KPF_THP: u64 = 1 << 22;
        // Only a THP's own size: a PMD (the only THP order a PMD maps).
        let pages = r.len() / PS;
        if pages != 512 || !r.start.is_multiple_of(r.len()) {
            return Ok(None);
        }
        let mut bytes = vec![0u8; u64_to_usize(pages * 8)];
        self.file
            .read_exact_at(&mut bytes, r.start / PS * 8)
            .map_err(|source| Error::Syscall {
                op: "read /proc/self/pagemap",
                source,
            })?;
        let entry = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[i * 8..i * 8 + 8]);
            u64::from_ne_bytes(b)
        };
        let first = entry(0);
        let pfn = first & PFN_MASK;
        if first & PRESENT == 0 {
            return Ok(Some(false));
        }
        if pfn == 0 {
            return Ok(None);
        }
        let in_order = (0..u64_to_usize(pages))
            .all(|i| entry(i) & PRESENT != 0 && entry(i) & PFN_MASK == pfn + i as u64);
        if !pfn.is_multiple_of(pages) || !in_order {
            return Ok(Some(false));
        }
        if self.kpageflags.is_none() {
            self.kpageflags = File::open("/proc/kpageflags").ok();
        }
        let Some(k) = self.kpageflags.as_ref() else {
            return Ok(None);
        };
        let mut b = [0u8; 8];
        if k.read_exact_at(&mut b, pfn * 8).is_err() {
            return Ok(None);
        }
        let flags = u64::from_ne_bytes(b);
        Ok(Some(flags & KPF_THP != 0 && flags & KPF_COMPOUND_HEAD != 0))
    }

    /// [`Self::scan`], or `None` once this kernel has said it has no
    /// PAGEMAP_SCAN (ENOTTY, or EINVAL for an unknown `size`): the caller
    /// falls back to `/proc/self/pagemap`.
    fn scan_if_it_works(&mut self, r: HvaRange, mask: u64) -> Result<Option<Vec<HvaRange>>> {
        if !self.scan_works {
            return Ok(None);
        }
        match self.scan(r, mask) {
            Ok(v) => Ok(Some(v)),
            Err(e)
                if e.raw_os_error() == Some(libc::ENOTTY)
                    || e.raw_os_error() == Some(libc::EINVAL) =>
            {
                self.scan_works = false;
                Ok(None)
            }
            Err(source) => Err(Error::Syscall {
                op: "ioctl(PAGEMAP_SCAN)",
                source,
            }),
        }
    }

    /// The runs of `r` whose pages have every category of `mask`.
    fn scan(&self, r: HvaRange, mask: u64) -> std::io::Result<Vec<HvaRange>> {
        let mut out: Vec<HvaRange> = Vec::new();
        let mut buf = [PageRegion::default(); VEC_LEN];
        let mut start = r.start;
        while start < r.end {
            let mut arg = PmScanArg {
                size: std::mem::size_of::<PmScanArg>() as u64,
                flags: 0, // never PM_SCAN_WP_MATCHING (module docs)
                start,
                end: r.end,
                vec: buf.as_mut_ptr() as u64,
                vec_len: VEC_LEN as u64,
                category_mask: mask,
                return_mask: mask,
                ..Default::default()
            };
            // SAFETY: `arg` is a correctly sized `struct pm_scan_arg` living
            // across the call; `vec` points at `VEC_LEN` writable
            // `struct page_region` entries in `buf`, which outlives the call.
            // The kernel only writes into `arg` and `buf`.
            let n = unsafe {
                libc::ioctl(
                    self.file.as_raw_fd(),
                    PAGEMAP_SCAN as _,
                    &mut arg as *mut PmScanArg,
                )
            };
            // Negative: the ioctl failed.
            let Ok(n) = usize::try_from(n) else {
                return Err(std::io::Error::last_os_error());
            };
            for reg in buf.iter().take(n) {
                push_merged(&mut out, HvaRange::new(reg.start, reg.end));
            }
            if arg.walk_end <= start {
                break;
            }
            start = arg.walk_end;
        }
        Ok(out)
    }

    fn read_present(&self, r: HvaRange) -> Result<Vec<HvaRange>> {
        const PS: u64 = 4096;
        const CHUNK: u64 = 4096; // entries per pread
        let mut out = Vec::new();
        let first = r.start / PS;
        let last = r.end.div_ceil(PS);
        let mut idx = first;
        let mut bytes = vec![0u8; u64_to_usize(CHUNK * 8)];
        while idx < last {
            let n = (last - idx).min(CHUNK);
            let want = u64_to_usize(n * 8);
            self.file
                .read_exact_at(&mut bytes[..want], idx * 8)
                .map_err(|source| Error::Syscall {
                    op: "read /proc/self/pagemap",
                    source,
                })?;
            for (i, e) in bytes[..want].chunks_exact(8).enumerate() {
                let mut b = [0u8; 8];
                b.copy_from_slice(e);
                if u64::from_ne_bytes(b) & (1 << 63) != 0 {
                    let a = (idx + i as u64) * PS;
                    push_merged(&mut out, HvaRange::new(a.max(r.start), (a + PS).min(r.end)));
                }
            }
            idx += n;
        }
        Ok(out)
    }
}

fn push_merged(v: &mut Vec<HvaRange>, r: HvaRange) {
    if let Some(last) = v.last_mut() {
        if last.end == r.start {
            last.end = r.end;
            return;
        }
    }
    v.push(r);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mmap::Mmap;

    #[test]
    fn ioctl_number_matches_uapi() {
        assert_eq!(std::mem::size_of::<PmScanArg>(), 96);
        assert_eq!(PAGEMAP_SCAN, 0xc060_6610);
    }

    #[test]
    fn scan_and_fallback_agree_on_anon_memory() {
        let m = Mmap::anon(64 * 4096, libc::PROT_READ | libc::PROT_WRITE, 0).unwrap();
        let base = m.addr();
        for i in [3usize, 4, 10] {
            // SAFETY: page `i` of the 64-page read-write mapping `m`.
            unsafe { m.as_ptr().add(i * 4096).write_volatile(1) };
        }
        let r = m.range();
        let mut pm = Pagemap::open().unwrap();
        let a = pm.present(r).unwrap();
        let b = pm.read_present(r).unwrap();
        assert_eq!(a, b);
        assert_eq!(
            a,
            vec![
                HvaRange::new(base + 3 * 4096, base + 5 * 4096),
                HvaRange::new(base + 10 * 4096, base + 11 * 4096)
            ]
        );
    }

    /// PAGEMAP_SCAN's huge flag and the pre-6.7 answer (PFNs in order from
    /// a THP head) agree: a collapsed 2 MiB block is huge, a block of
    /// 4 KiB pages and a 4 KiB range inside a huge one are not.
    #[test]
    fn huge_scan_and_kpageflags_agree_on_thp() {
        const M2: usize = 2 << 20;
        let m = Mmap::anon(4 * M2, libc::PROT_READ | libc::PROT_WRITE, 0).unwrap();
        let huge = HvaRange::new(m.addr().next_multiple_of(M2 as u64), 0);
        let huge = HvaRange::new(huge.start, huge.start + M2 as u64);
        let small = HvaRange::new(huge.end, huge.end + M2 as u64);
        // SAFETY: `huge` and `small` lie inside the read-write mapping `m`
        // (4 x 2 MiB long, so 3 aligned blocks fit); madvise only advises.
        unsafe {
            libc::madvise(huge.start as *mut libc::c_void, M2, libc::MADV_HUGEPAGE);
            libc::madvise(small.start as *mut libc::c_void, M2, libc::MADV_NOHUGEPAGE);
            for off in (0..M2).step_by(4096) {
                (huge.start as *mut u8).add(off).write_volatile(1);
                (small.start as *mut u8).add(off).write_volatile(1);
            }
            libc::madvise(
                huge.start as *mut libc::c_void,
                M2,
                25, /* MADV_COLLAPSE */
            );
        }
        let mut pm = Pagemap::open().unwrap();
        let Some(by_scan) = pm.huge_mapped(huge).unwrap() else {
            return; // no PAGEMAP_SCAN, or no root for the PFNs
        };
        if !by_scan {
            eprintln!("THP off here: nothing to compare");
            return;
        }
        let by_flags = pm.whole_folio_mapped(huge).unwrap();
        if by_flags.is_none() {
            return; // not root
        }
        assert_eq!(by_flags, Some(true));
        assert_eq!(pm.whole_folio_mapped(small).unwrap(), Some(false));
        assert_eq!(pm.huge_mapped(small).unwrap(), Some(false));
        let inner = HvaRange::new(huge.start, huge.start + 4096);
        assert_eq!(pm.whole_folio_mapped(inner).unwrap(), None);
    }
}
