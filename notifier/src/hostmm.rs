//! Guest RAM as the host kernel sees it: regions (private anonymous hugetlb,
//! shared hugetlb memfd with 2 MiB or 1 GiB pages, plain anonymous/THP memory)
//! and the VMAs they are made of, kept in step with every operation (a
//! partial mprotect splits a VMA, munmap punches holes, mremap moves them).
//!
//! `HostMm` owns every mapping it creates and unmaps them on drop. Which PUD
//! entries are non-none (the input of the kernel's mprotect range rule) is
//! learnt from PAGEMAP_SCAN and remembered: page tables outlive the pages
//! (after MADV_DONTNEED the PMD table stays) until the VMAs around them go.

use crate::convert::u64_to_usize;
use crate::error::{Error, Result};
use crate::mmap::Mmap;
use crate::page_size::PageSize;
use crate::pagemap::Pagemap;
use crate::predict::{align_down, align_up, FileVma, PmdState, VmaShape, PMD_SIZE, PUD_SIZE};
use crate::subscriber::{HvaRange, Subscribers};
use std::collections::BTreeSet;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};

/// What backs a region of guest RAM: the one RAM-backing type of the
/// workspace (the VMM's `--hugepages` and `--configs` name one of these).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize)]
pub enum Backing {
    /// `MAP_PRIVATE|MAP_ANONYMOUS|MAP_HUGETLB` (a huge size).
    PrivateHugetlb(PageSize),
    /// A memfd mapped `MAP_SHARED`: `MFD_HUGETLB` for a huge size (PMD
    /// sharing possible), a plain (shmem) memfd for 4 KiB.
    SharedMemfd(PageSize),
    /// `MAP_PRIVATE|MAP_ANONYMOUS`, with `MADV_HUGEPAGE` when `thp`.
    Anon { thp: bool },
}

impl Backing {
    pub fn page_size(self) -> PageSize {
        match self {
            Backing::PrivateHugetlb(p) | Backing::SharedMemfd(p) => p,
            Backing::Anon { .. } => PageSize::Size4K,
        }
    }

    pub fn is_hugetlb(self) -> bool {
        match self {
            Backing::PrivateHugetlb(_) => true,
            Backing::SharedMemfd(p) => p.is_huge(),
            Backing::Anon { .. } => false,
        }
    }

    /// Whether the memory is a shared memfd (a file: hole punch, a second
    /// mapping, MINOR faults).
    pub fn is_shared(self) -> bool {
        matches!(self, Backing::SharedMemfd(_))
    }
}

/// `shared-2M`, `private-1G`, `shared-4K` (a plain memfd), `anon`, `thp`.
impl std::fmt::Display for Backing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Backing::SharedMemfd(p) => write!(f, "shared-{p}"),
            Backing::PrivateHugetlb(p) => write!(f, "private-{p}"),
            Backing::Anon { thp: false } => f.write_str("anon"),
            Backing::Anon { thp: true } => f.write_str("thp"),
        }
    }
}

impl std::str::FromStr for Backing {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let bad = || {
            format!(
                "unknown RAM backing {s:?}: expected shared-2M, shared-1G, shared-4K, \
                 private-2M, private-1G, anon or thp"
            )
        };
        let s = s.trim();
        match s.to_ascii_lowercase().as_str() {
            "anon" => return Ok(Backing::Anon { thp: false }),
            "thp" => return Ok(Backing::Anon { thp: true }),
            _ => {}
        }
        let (kind, size) = s.split_once('-').ok_or_else(bad)?;
        let size: PageSize = size.parse().map_err(|_| bad())?;
        match kind.to_ascii_lowercase().as_str() {
            "shared" => Ok(Backing::SharedMemfd(size)),
            "private" if size.is_huge() => Ok(Backing::PrivateHugetlb(size)),
            _ => Err(bad()),
        }
    }
}

/// Where to place a region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    /// Alignment of `base - offset` (e.g. 1 GiB to control PUD spanning).
    pub align: u64,
    /// Offset from that aligned address.
    pub offset: u64,
}

impl Placement {
    /// At a 1 GiB-aligned address.
    pub fn pud_aligned() -> Self {
        Self {
            align: PUD_SIZE,
            offset: 0,
        }
    }

    /// `offset` bytes past a 1 GiB-aligned address.
    pub fn pud_offset(offset: u64) -> Self {
        Self {
            align: PUD_SIZE,
            offset,
        }
    }
}

/// Handle of a region in a [`HostMm`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RegionId(pub usize);

/// A region: one mmap of guest RAM (its VMAs may later split or move).
#[derive(Debug)]
pub struct Region {
    pub id: RegionId,
    pub base: u64,
    pub len: u64,
    pub backing: Backing,
    memfd: Option<OwnedFd>,
}

impl Region {
    pub fn range(&self) -> HvaRange {
        HvaRange::new(self.base, self.base + self.len)
    }

    /// The memfd of a shared region.
    pub fn memfd(&self) -> Option<RawFd> {
        self.memfd.as_ref().map(|f| f.as_raw_fd())
    }
}

/// One VMA as the kernel has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vma {
    pub shape: VmaShape,
    /// The region it belongs to (`None`: a reservation made by `HostMm`).
    pub region: Option<RegionId>,
    /// File offset mapped at `shape.range.start` (shared memfd regions).
    pub file_offset: Option<u64>,
    /// A private VMA that has faulted has an `anon_vma` (fork must copy it).
    pub anon_vma: bool,
    /// `MADV_DONTFORK` (`VM_DONTCOPY`): fork skips it.
    pub dontfork: bool,
    /// `MADV_WIPEONFORK` (`VM_WIPEONFORK`): fork copies no page of it.
    pub wipeonfork: bool,
    /// Registered with a userfaultfd (`VM_UFFD_*`): never merged with an
    /// unregistered neighbour.
    pub uffd: bool,
}

/// The guest RAM of this process and its notifier subscribers (the kernel's
/// `mm->notifier_subscriptions`).
pub struct HostMm {
    pub(crate) subs: Subscribers,
    regions: Vec<Region>,
    /// Every VMA this HostMm owns, sorted by address, non-overlapping.
    vmas: Vec<Vma>,
    /// PUD indices (addr >> 30) known to have a PMD table.
    pud_tables: BTreeSet<u64>,
    pub(crate) pagemap: Pagemap,
}

fn prot_rw() -> i32 {
    libc::PROT_READ | libc::PROT_WRITE
}

impl HostMm {
    pub fn new(subs: Subscribers) -> Result<Self> {
        Ok(Self {
            subs,
            regions: Vec::new(),
            vmas: Vec::new(),
            pud_tables: BTreeSet::new(),
            pagemap: Pagemap::open()?,
        })
    }

    pub fn subscribers(&self) -> &Subscribers {
        &self.subs
    }

    pub fn region(&self, id: RegionId) -> Option<&Region> {
        self.regions.iter().find(|r| r.id == id)
    }

    /// The original range of region `id` (an error naming `op` if unknown).
    pub fn region_range(&self, id: RegionId, op: &'static str) -> Result<HvaRange> {
        self.region(id)
            .map(|r| r.range())
            .ok_or(Error::OutOfRegion {
                op,
                start: 0,
                end: 0,
            })
    }

    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    pub fn vmas(&self) -> &[Vma] {
        &self.vmas
    }

    /// VMA shapes intersecting `r`, in address order.
    pub fn shapes(&self, r: HvaRange) -> Vec<VmaShape> {
        self.vmas
            .iter()
            .filter(|v| v.shape.range.overlaps(&r))
            .map(|v| v.shape)
            .collect()
    }

    /// The VMAs of this HostMm mapping the memfd of `id`, with file offsets.
    pub fn file_mappings(&self, id: RegionId) -> Vec<FileVma> {
        self.vmas
            .iter()
            .filter(|v| v.region == Some(id))
            .filter_map(|v| {
                v.file_offset.map(|offset| FileVma {
                    vma: v.shape,
                    offset,
                })
            })
            .collect()
    }

    /// A PROT_NONE reservation large enough to hold `len` bytes placed as
    /// `place` asks, and the offset of that placement inside it. Dropping
    /// the reservation (every error path) unmaps all of it.
    fn reserve_placed(op: &'static str, len: u64, place: Placement) -> Result<(Mmap, usize)> {
        let total = len
            .checked_add(place.align)
            .and_then(|t| t.checked_add(place.offset))
            .ok_or(Error::Unsupported {
                op,
                why: "length + alignment + offset overflow the address space",
            })?;
        let res = Mmap::reserve(u64_to_usize(total))?;
        // align_up(r0) - r0 < align, so [addr, addr + len) ends inside the
        // reservation.
        let addr = align_up(res.addr(), place.align.max(4096)) + place.offset;
        let off = u64_to_usize(addr - res.addr());
        Ok((res, off))
    }

    /// Map a region of guest RAM. Hugetlb regions use `MAP_NORESERVE`: huge
    /// pages are taken when touched ([`Self::populate`]).
    pub fn map(&mut self, backing: Backing, len: u64, place: Placement) -> Result<RegionId> {
        self.map_with(backing, len, place, libc::MAP_NORESERVE)
    }

    /// [`Self::map`], but a private hugetlb region's pages are reserved
    /// from the pool at mmap (`hugetlb_reserve_pages()`, no
    /// `MAP_NORESERVE`; a shared memfd is reserved by its alias): the
    /// mmap fails with ENOMEM if the pool is short, and a page taken later
    /// (a UFFDIO_COPY, a first touch) always comes, whoever else drains the
    /// pool meanwhile; without it that is ENOMEM in the fault path or a
    /// SIGBUS.
    pub fn map_reserved(
        &mut self,
        backing: Backing,
        len: u64,
        place: Placement,
    ) -> Result<RegionId> {
        // A shared memfd's reservation is its inode's, made by any mapping
        // without MAP_NORESERVE (the VMM's alias of guest RAM is one); the
        // guest-facing mapping keeps MAP_NORESERVE (measured: reserving it
        // too, a 1 GiB MISSING run with exactly one free page got ENOMEM
        // from its UFFDIO_COPY; why is not established).
        let noreserve = if matches!(backing, Backing::PrivateHugetlb(_)) {
            0
        } else {
            libc::MAP_NORESERVE
        };
        self.map_with(backing, len, place, noreserve)
    }

    fn map_with(
        &mut self,
        backing: Backing,
        len: u64,
        place: Placement,
        noreserve: libc::c_int,
    ) -> Result<RegionId> {
        if backing == Backing::PrivateHugetlb(PageSize::Size4K) {
            return Err(Error::Unsupported {
                op: "map",
                why: "private hugetlb needs a huge page size (2M or 1G)",
            });
        }
        let ps = backing.page_size().bytes();
        if len == 0 || !len.is_multiple_of(ps) || !place.offset.is_multiple_of(ps) {
            return Err(Error::Unaligned {
                op: "map",
                start: place.offset,
                end: place.offset + len,
                align: ps,
            });
        }
        let place = Placement {
            align: place.align.max(ps),
            offset: place.offset,
        };
        let (mut res, off) = Self::reserve_placed("map", len, place)?;
        let ulen = u64_to_usize(len);
        let mut memfd = None;
        match backing {
            Backing::PrivateHugetlb(p) => res.map_fixed_anon(
                off,
                ulen,
                prot_rw(),
                libc::MAP_HUGETLB | noreserve | p.huge_flag(),
            )?,
            Backing::Anon { .. } => {
                res.map_fixed_anon(off, ulen, prot_rw(), libc::MAP_NORESERVE)?;
            }
            Backing::SharedMemfd(p) => {
                let name = c"guest-ram";
                // SAFETY: valid NUL-terminated name; flags are plain bits.
                let fd = unsafe { libc::memfd_create(name.as_ptr(), p.memfd_flags()) };
                if fd < 0 {
                    return Err(Error::last_os("memfd_create"));
                }
                // SAFETY: fd was just returned by memfd_create and is owned by nobody else.
                let owned = unsafe { OwnedFd::from_raw_fd(fd) };
                let size = libc::off_t::try_from(len).map_err(|_| Error::Unsupported {
                    op: "map",
                    why: "the region is larger than a file offset (off_t) can express",
                })?;
                // SAFETY: ftruncate on our own memfd; no memory is passed.
                if unsafe { libc::ftruncate(owned.as_raw_fd(), size) } != 0 {
                    return Err(Error::last_os("ftruncate(memfd)"));
                }
                res.map_fixed_shared(off, ulen, owned.as_fd(), prot_rw(), noreserve)?;
                memfd = Some(owned);
            }
        }
        // The slack around the placement goes; what is left is guest RAM.
        let ram = res.keep(off, ulen)?;
        let addr = ram.addr();
        if let Backing::Anon { thp } = backing {
            let advice = if thp {
                libc::MADV_HUGEPAGE
            } else {
                libc::MADV_NOHUGEPAGE
            };
            // SAFETY: advisory madvise on the mapping `ram` owns; it changes
            // no memory contents.
            unsafe { libc::madvise(ram.as_ptr().cast(), ram.len(), advice) };
        }
        // From here the VMA list owns the mapping (split, moved and unmapped
        // through it; Drop unmaps what is left).
        let _ = ram.into_raw();
        let id = RegionId(self.regions.iter().map(|r| r.id.0 + 1).max().unwrap_or(0));
        self.regions.push(Region {
            id,
            base: addr,
            len,
            backing,
            memfd,
        });
        let shape = VmaShape {
            range: HvaRange::new(addr, addr + len),
            hugetlb: backing.is_hugetlb().then_some(backing.page_size().bytes()),
            may_share: backing.is_shared(),
            prot: prot_rw(),
        };
        let file_offset = backing.is_shared().then_some(0);
        self.insert_vma(Vma {
            shape,
            region: Some(id),
            file_offset,
            anon_vma: false,
            dontfork: false,
            wipeonfork: false,
            uffd: false,
        });
        Ok(id)
    }

    /// A PROT_NONE anonymous reservation of `len` bytes (a target for
    /// mremap), owned and unmapped by this HostMm.
    pub fn reserve(&mut self, len: u64, place: Placement) -> Result<HvaRange> {
        let (res, off) = Self::reserve_placed("reserve", len, place)?;
        // The VMA list owns the reservation from here.
        let range = res.keep(off, u64_to_usize(len))?.into_raw();
        let shape = VmaShape {
            range,
            hugetlb: None,
            may_share: false,
            prot: libc::PROT_NONE,
        };
        self.insert_vma(Vma {
            shape,
            region: None,
            file_offset: None,
            anon_vma: false,
            dontfork: false,
            wipeonfork: false,
            uffd: false,
        });
        Ok(shape.range)
    }

    /// Touch one byte per backing page in `r` (populates page tables).
    pub fn populate(&mut self, r: HvaRange) -> Result<()> {
        let shapes = self.shapes(r);
        if shapes.is_empty() {
            return Err(Error::OutOfRegion {
                op: "populate",
                start: r.start,
                end: r.end,
            });
        }
        for s in shapes {
            let step = s.hugetlb.unwrap_or(4096);
            let mut a = align_down(r.start.max(s.range.start), step);
            while a < r.end.min(s.range.end) {
                if s.prot & libc::PROT_WRITE == 0 {
                    return Err(Error::Unsupported {
                        op: "populate",
                        why: "range is not writable",
                    });
                }
                // SAFETY: `a` lies in a writable VMA owned by this HostMm
                // (checked above), so a one-byte volatile write is in bounds.
                unsafe { std::ptr::write_volatile(a as *mut u8, 1) };
                a += step;
            }
        }
        for v in self
            .vmas
            .iter_mut()
            .filter(|v| v.shape.range.overlaps(&r) && !v.shape.may_share)
        {
            v.anon_vma = true;
        }
        self.refresh_puds(r)
    }

    /// Record PUDs that now hold populated pages (PAGEMAP_SCAN).
    pub fn refresh_puds(&mut self, r: HvaRange) -> Result<()> {
        for p in self.pagemap.present(r)? {
            let mut a = align_down(p.start, PUD_SIZE);
            while a < p.end {
                self.pud_tables.insert(a >> 30);
                a += PUD_SIZE;
            }
        }
        Ok(())
    }

    /// Whether the PUD entry covering `addr` is (known to be) non-none.
    pub fn pud_present(&self, addr: u64) -> bool {
        self.pud_tables.contains(&(addr >> 30))
    }

    /// Populated runs in `r`.
    pub fn present(&mut self, r: HvaRange) -> Result<Vec<HvaRange>> {
        self.pagemap.present(r)
    }

    fn insert_vma(&mut self, v: Vma) {
        let pos = self
            .vmas
            .partition_point(|x| x.shape.range.start < v.shape.range.start);
        self.vmas.insert(pos, v);
    }

    /// Split the VMA containing `addr` there (model only).
    fn split_at(&mut self, addr: u64) {
        if let Some(i) = self
            .vmas
            .iter()
            .position(|v| v.shape.range.start < addr && addr < v.shape.range.end)
        {
            let v = self.vmas[i];
            let mut lo = v;
            lo.shape.range.end = addr;
            let mut hi = v;
            hi.shape.range.start = addr;
            hi.file_offset = v.file_offset.map(|o| o + (addr - v.shape.range.start));
            self.vmas[i] = lo;
            self.vmas.insert(i + 1, hi);
        }
    }

    /// Merge adjacent anonymous non-hugetlb VMAs with equal protections, as
    /// `vma_merge()` does (hugetlb VMAs are `VM_DONTEXPAND`: never merged).
    fn merge(&mut self) {
        let mut i = 0;
        while i + 1 < self.vmas.len() {
            let (a, b) = (self.vmas[i], self.vmas[i + 1]);
            if a.shape.hugetlb.is_none()
                && b.shape.hugetlb.is_none()
                && a.file_offset.is_none()
                && b.file_offset.is_none()
                && a.region == b.region
                && a.shape.prot == b.shape.prot
                && a.dontfork == b.dontfork
                && a.wipeonfork == b.wipeonfork
                && a.uffd == b.uffd
                && a.shape.range.end == b.shape.range.start
            {
                self.vmas[i].shape.range.end = b.shape.range.end;
                self.vmas[i].anon_vma |= b.anon_vma;
                self.vmas.remove(i + 1);
            } else {
                i += 1;
            }
        }
    }

    pub(crate) fn apply_dontfork(&mut self, id: RegionId) {
        for v in self.vmas.iter_mut().filter(|v| v.region == Some(id)) {
            v.dontfork = true;
        }
    }

    pub(crate) fn apply_wipeonfork(&mut self, id: RegionId) {
        for v in self.vmas.iter_mut().filter(|v| v.region == Some(id)) {
            v.wipeonfork = true;
        }
    }

    pub(crate) fn apply_uffd_register(&mut self, r: HvaRange) {
        self.split_at(r.start);
        self.split_at(r.end);
        for v in self.vmas.iter_mut().filter(|v| v.shape.range.overlaps(&r)) {
            v.uffd = true;
        }
    }

    pub(crate) fn apply_shrink(&mut self, old: HvaRange, new_len: u64) {
        self.apply_munmap(HvaRange::new(old.start + new_len, old.end));
    }

    /// Map the memfd of shared region `id` a second time, whole, at a
    /// kernel-chosen address (as a VMM maps guest RAM for its own
    /// accesses): one more VMA of the file for every file operation to
    /// notify.
    pub fn map_alias(&mut self, id: RegionId) -> Result<HvaRange> {
        let region = self.region(id).ok_or(Error::Unsupported {
            op: "map_alias",
            why: "no such region",
        })?;
        let (len, backing) = (region.len, region.backing);
        let fd = region.memfd.as_ref().ok_or(Error::Unsupported {
            op: "map_alias",
            why: "only a shared memfd region has a file to map again",
        })?;
        let m = Mmap::shared(
            fd.as_fd(),
            u64_to_usize(len),
            prot_rw(),
            libc::MAP_NORESERVE,
        )?;
        // The VMA list owns the mapping from here.
        let range = m.into_raw();
        self.insert_vma(Vma {
            shape: VmaShape {
                range,
                hugetlb: backing.is_hugetlb().then_some(backing.page_size().bytes()),
                may_share: true,
                prot: prot_rw(),
            },
            region: Some(id),
            file_offset: Some(0),
            anon_vma: false,
            dontfork: false,
            wipeonfork: false,
            uffd: false,
        });
        Ok(range)
    }

    /// Which 2 MiB blocks of `r`'s non-hugetlb pieces the host maps with a
    /// huge PMD: every block, or (`ends_only`) the two at each piece's
    /// ends - all a partial zap can split.
    pub(crate) fn huge_pmds(&mut self, r: HvaRange, ends_only: bool) -> Result<BTreeSet<u64>> {
        let mut out = BTreeSet::new();
        for v in self.shapes(r) {
            if v.hugetlb.is_some() {
                continue;
            }
            let s = align_down(r.start.max(v.range.start), PMD_SIZE);
            let e = r.end.min(v.range.end);
            let last = align_down(e.saturating_sub(1), PMD_SIZE);
            let mut b = s;
            while b <= last {
                if self.pagemap.huge_mapped(HvaRange::new(b, b + PMD_SIZE))? == Some(true) {
                    out.insert(b);
                }
                b = if ends_only && b < last {
                    last
                } else {
                    b + PMD_SIZE
                };
            }
        }
        Ok(out)
    }

    /// What each whole 2 MiB block inside `r` holds (for `MADV_COLLAPSE`).
    pub(crate) fn pmd_states(&mut self, r: HvaRange) -> Result<Vec<(u64, PmdState)>> {
        let mut out = Vec::new();
        let mut b = align_up(r.start, PMD_SIZE);
        while b + PMD_SIZE <= r.end {
            let block = HvaRange::new(b, b + PMD_SIZE);
            let st = if self.pagemap.huge_mapped(block)? == Some(true) {
                PmdState::Huge
            } else if self.pagemap.any_present(block)? {
                PmdState::Ptes
            } else {
                PmdState::Empty
            };
            out.push((b, st));
            b += PMD_SIZE;
        }
        Ok(out)
    }

    pub(crate) fn apply_mprotect(&mut self, r: HvaRange, prot: i32) {
        self.split_at(r.start);
        self.split_at(r.end);
        for v in self.vmas.iter_mut().filter(|v| v.shape.range.overlaps(&r)) {
            v.shape.prot = prot;
        }
        self.merge();
    }

    pub(crate) fn apply_munmap(&mut self, r: HvaRange) {
        self.split_at(r.start);
        self.split_at(r.end);
        self.vmas.retain(|v| !v.shape.range.overlaps(&r));
        self.forget_empty_puds(r);
    }

    /// PMD tables of PUDs left without any of our VMAs are freed by
    /// `free_pgtables()`.
    fn forget_empty_puds(&mut self, r: HvaRange) {
        let mut a = align_down(r.start, PUD_SIZE);
        while a < r.end {
            let pud = HvaRange::new(a, a + PUD_SIZE);
            if !self.vmas.iter().any(|v| v.shape.range.overlaps(&pud)) {
                self.pud_tables.remove(&(a >> 30));
            }
            a += PUD_SIZE;
        }
    }

    pub(crate) fn apply_mremap(&mut self, old: HvaRange, dst: u64) {
        self.split_at(old.start);
        self.split_at(old.end);
        let dst_r = HvaRange::new(dst, dst + old.len());
        self.apply_munmap(dst_r);
        let moved: Vec<Vma> = self
            .vmas
            .iter()
            .filter(|v| v.shape.range.overlaps(&old))
            .copied()
            .collect();
        self.vmas.retain(|v| !v.shape.range.overlaps(&old));
        for mut v in moved {
            let delta = v.shape.range.start - old.start;
            let len = v.shape.range.len();
            v.shape.range = HvaRange::new(dst + delta, dst + delta + len);
            self.insert_vma(v);
        }
        let _ = self.refresh_puds(dst_r);
        self.forget_empty_puds(old);
    }

    /// Drop a region: unmap all its VMAs (no notification, no subscriber
    /// involvement: use `ops::unmap` for an announced unmap).
    pub fn unmap_silently(&mut self, id: RegionId) {
        let (gone, keep): (Vec<Vma>, Vec<Vma>) =
            self.vmas.iter().partition(|v| v.region == Some(id));
        self.vmas = keep;
        for v in &gone {
            // SAFETY: the VMA was created by this HostMm and is still mapped
            // (the model tracks every change made through it).
            unsafe {
                libc::munmap(
                    v.shape.range.start as *mut libc::c_void,
                    u64_to_usize(v.shape.range.len()),
                )
            };
            self.forget_empty_puds(v.shape.range);
        }
        self.regions.retain(|r| r.id != id);
    }
}

/// One line of `/proc/self/maps`: range and `PROT_*` bits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelVma {
    pub range: HvaRange,
    pub prot: i32,
}

/// The kernel's VMAs (`/proc/self/maps`) overlapping `r`.
pub fn kernel_vmas(r: HvaRange) -> Result<Vec<KernelVma>> {
    let maps = std::fs::read_to_string("/proc/self/maps").map_err(|source| Error::Syscall {
        op: "read /proc/self/maps",
        source,
    })?;
    let mut out = Vec::new();
    for line in maps.lines() {
        let mut it = line.split_whitespace();
        let (Some(span), Some(perms)) = (it.next(), it.next()) else {
            continue;
        };
        let Some((a, b)) = span.split_once('-') else {
            continue;
        };
        let (Ok(start), Ok(end)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) else {
            continue;
        };
        let range = HvaRange::new(start, end);
        if !range.overlaps(&r) {
            continue;
        }
        let p = perms.as_bytes();
        let mut prot = 0;
        for (i, bit) in [
            (0, libc::PROT_READ),
            (1, libc::PROT_WRITE),
            (2, libc::PROT_EXEC),
        ] {
            if p.get(i).is_some_and(|c| *c != b'-') {
                prot |= bit;
            }
        }
        out.push(KernelVma { range, prot });
    }
    Ok(out)
}

impl HostMm {
    /// Does the model agree with the kernel? Kernel VMAs are clipped to the
    /// hull of the model's VMAs, and pieces outside every model VMA (other
    /// mappings in holes) are ignored.
    pub fn model_matches_kernel(&self) -> Result<bool> {
        let (Some(first), Some(last)) = (self.vmas.first(), self.vmas.last()) else {
            return Ok(true);
        };
        let hull = HvaRange::new(
            first.shape.range.start,
            self.vmas
                .iter()
                .map(|v| v.shape.range.end)
                .max()
                .unwrap_or(last.shape.range.end),
        );
        let kernel: Vec<KernelVma> = kernel_vmas(hull)?
            .into_iter()
            .map(|k| KernelVma {
                range: HvaRange::new(k.range.start.max(hull.start), k.range.end.min(hull.end)),
                prot: k.prot,
            })
            .filter(|k| self.vmas.iter().any(|v| v.shape.range.overlaps(&k.range)))
            .collect();
        let model: Vec<KernelVma> = self
            .vmas
            .iter()
            .map(|v| KernelVma {
                range: v.shape.range,
                prot: v.shape.prot,
            })
            .collect();
        Ok(kernel == model)
    }
}

impl Drop for HostMm {
    fn drop(&mut self) {
        for v in &self.vmas {
            // SAFETY: every VMA in the list was mapped by this HostMm and is
            // unmapped exactly once, here.
            unsafe {
                libc::munmap(
                    v.shape.range.start as *mut libc::c_void,
                    u64_to_usize(v.shape.range.len()),
                )
            };
        }
        // memfds close with their OwnedFd.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The model follows the kernel through a partial mprotect (split into
    /// three VMAs), the mprotect back (merge) and a munmap in the middle.
    #[test]
    fn vma_model_follows_splits_merges_and_holes() {
        let mut mm = HostMm::new(Subscribers::new()).unwrap();
        let id = mm
            .map(
                Backing::Anon { thp: false },
                64 << 20,
                Placement {
                    align: 2 << 20,
                    offset: 0,
                },
            )
            .unwrap();
        let b = mm.region_range(id, "test").unwrap().start;
        assert!(mm.model_matches_kernel().unwrap());
        let mid = HvaRange::new(b + (8 << 20), b + (12 << 20));
        mm.protect(mid, libc::PROT_READ).unwrap();
        assert_eq!(mm.vmas().len(), 3);
        assert!(mm.model_matches_kernel().unwrap());
        mm.protect(mid, libc::PROT_READ | libc::PROT_WRITE).unwrap();
        assert_eq!(mm.vmas().len(), 1);
        assert!(mm.model_matches_kernel().unwrap());
        mm.unmap(HvaRange::new(b + (16 << 20), b + (18 << 20)))
            .unwrap();
        assert_eq!(mm.vmas().len(), 2);
        assert!(mm.model_matches_kernel().unwrap());
    }
}
