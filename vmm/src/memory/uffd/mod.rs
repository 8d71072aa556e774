//! Guest RAM served by userfaultfd: one shared hugetlb memfd mapped twice.
//!
//! * The **guest-facing** mapping (`MAP_SHARED` of the memfd) is KVM's
//!   memslot and is registered with userfaultfd, so every first touch by the
//!   guest (or by KVM on its behalf) arrives at the VMM as a fault.
//! * The **alias** (another `MAP_SHARED` of the same memfd) is how the VMM
//!   reaches the page cache without faulting.
//!
//! Two modes:
//! * [`UffdMode::Minor`]: the page cache is populated up front
//!   (`fallocate`, then the system image written through the alias); the
//!   guest-facing mapping is registered MINOR and a fault is resolved with
//!   `UFFDIO_CONTINUE`, which maps the page-cache page: no copy.
//! * [`UffdMode::Missing`] (Firecracker's way, the baseline): nothing is in
//!   the page cache; the mapping is registered MISSING and a fault is
//!   resolved with `UFFDIO_COPY` from a staged buffer (the system image for
//!   page 0, zeros otherwise), a copy of a whole huge page.
//!
//! The guest-facing mapping is a [`HostMm`] region, so the VMM's own
//! operations on it (`notifier::ops`: protect, discard, punch_hole,
//! write_protect) announce their invalidations to the [`Subscribers`] the
//! MMU registered with.
//!
//! A COPY source must be resident (`copy.rs`: staged pages and a zero
//! source that is the shared zero page).
//!
//! Private hugetlb RAM (`Backing::PrivateHugetlb`, `MAP_PRIVATE`, MISSING
//! or the kernel's own fault only): no memfd and no alias; the VMM reaches
//! guest RAM through the guest-facing mapping itself (its pages fault through the same
//! userfaultfd), and no file operation (hole punch, page-cache refill)
//! applies.
//!
//! Resolution never wakes the faulting thread by itself (DONTWAKE): the
//! fault handler wakes it after the MMU installed its SPTE - unless the
//! handler asks for [`UffdGuestRam::populate_and_wake`] (see
//! [`super::fault`] for why waking first is correct here).
//!
//! Non-cooperative events: when built with `events`, the userfaultfd also
//! asks for `UFFD_FEATURE_EVENT_REMOVE | EVENT_UNMAP | EVENT_REMAP`, so a
//! `madvise(DONTNEED/REMOVE)`, `munmap` or `mremap` of guest RAM by *any*
//! thread - not only through [`HostMm`] - reaches the fault thread, which
//! delivers it to [`UffdGuestRam::subscribers`]. Such a madvise blocks in
//! the kernel until the message is read, and `UFFDIO_CONTINUE`/`COPY`
//! answer `EAGAIN` meanwhile ([`UffdRamError::is_again`]).

mod copy;

use crate::memory::{self, MemoryError};
use crate::vstate::SlotMemory;
use copy::{make_resident, ZeroSource};
use mmu::guest_walk::{GuestPhysMem, MemError};
use notifier::convert::u64_to_usize;
use notifier::hostmm::{Backing, HostMm, Placement, RegionId};
use notifier::uffd::{
    Uffd, UFFDIO_REGISTER_MODE_MINOR, UFFDIO_REGISTER_MODE_MISSING, UFFDIO_REGISTER_MODE_WP,
    UFFD_FEATURE_EVENT_REMAP, UFFD_FEATURE_EVENT_REMOVE, UFFD_FEATURE_EVENT_UNMAP,
    UFFD_FEATURE_MINOR_HUGETLBFS, UFFD_FEATURE_MINOR_SHMEM, UFFD_FEATURE_MISSING_HUGETLBFS,
    UFFD_FEATURE_WP_HUGETLBFS_SHMEM,
};
use notifier::Mmap;
use notifier::PageSize;
use notifier::{HvaRange, Subscribers};
use parking_lot::{Mutex, MutexGuard};
use std::collections::BTreeMap;
use std::os::fd::{BorrowedFd, RawFd};
use vm_memory::GuestMemoryMmap;

/// How guest RAM faults are resolved (`--uffd`). `Kernel*` are baselines
/// that bypass the project's MMU.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, clap::ValueEnum)]
pub enum UffdMode {
    /// MINOR faults on a pre-populated page cache, `UFFDIO_CONTINUE`.
    Minor,
    /// MISSING faults, `UFFDIO_COPY`.
    Missing,
    /// Baseline without userfaultfd: the kernel's own hugetlb first touch
    /// (allocate and zero a huge page). The MMU sees no faults.
    #[value(alias = "none")]
    Kernel,
    /// Baseline without userfaultfd, page cache populated up front: the
    /// kernel's own fault maps the page-cache page (what CONTINUE does).
    KernelPrefilled,
}

impl UffdMode {
    /// Whether the page cache is populated up front.
    pub fn prefilled(self) -> bool {
        matches!(self, UffdMode::Minor | UffdMode::KernelPrefilled)
    }
    /// Whether faults go through userfaultfd (and the MMU).
    pub fn uses_uffd(self) -> bool {
        matches!(self, UffdMode::Minor | UffdMode::Missing)
    }
}

impl std::fmt::Display for UffdMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            UffdMode::Minor => "minor",
            UffdMode::Missing => "missing",
            UffdMode::Kernel => "kernel",
            UffdMode::KernelPrefilled => "kernel-prefilled",
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UffdRamError {
    #[error(transparent)]
    Memory(#[from] MemoryError),
    #[error("userfaultfd RAM needs hugetlb pages (--hugepages 2M or 1G)")]
    NotHugetlb,
    #[error("{op}: {source}")]
    Os {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Uffd(#[from] notifier::Error),
    #[error("private RAM has no page cache to fill: --uffd {0} needs a shared memfd")]
    NoPageCache(UffdMode),
    #[error("prefaulting guest RAM would bypass userfaultfd: only with --uffd kernel*")]
    PrefaultWithUffd,
    #[error("host mm lost the guest RAM region")]
    NoRegion,
    #[error("gpa range [{gpa:#x}, +{len:#x}) is outside guest RAM of {size:#x} bytes")]
    OutOfRange { gpa: u64, len: u64, size: u64 },
}

impl UffdRamError {
    /// `EAGAIN` from `UFFDIO_CONTINUE`/`COPY`: a non-cooperative event
    /// (REMOVE, UNMAP, REMAP) is pending on the userfaultfd; read it and
    /// retry.
    pub fn is_again(&self) -> bool {
        matches!(self, UffdRamError::Uffd(notifier::Error::Syscall { source, .. })
            if source.raw_os_error() == Some(libc::EAGAIN))
    }
}

/// The non-cooperative events guest RAM asks for.
pub const EVENT_FEATURES: u64 =
    UFFD_FEATURE_EVENT_REMOVE | UFFD_FEATURE_EVENT_UNMAP | UFFD_FEATURE_EVENT_REMAP;

fn os(op: &'static str) -> UffdRamError {
    UffdRamError::Os {
        op,
        source: std::io::Error::last_os_error(),
    }
}

/// Guest RAM on a shared hugetlb memfd, guest-facing mapping registered
/// with userfaultfd. Drop order: the uffd closes before the mappings go
/// (the alias, then the guest-facing region and the memfd with `hostmm`).
pub struct UffdGuestRam {
    uffd: Uffd,
    mode: UffdMode,
    backing: Backing,
    /// The unit faults are resolved in, and the largest leaf the MMU may
    /// map: the hugetlb page size, 4 KiB for anonymous memory and shmem,
    /// 2 MiB for THP (a leaf that large only where the host maps a huge
    /// PMD: [`Self::host_level`]).
    page: PageSize,
    /// THP: where [`Self::host_level`] reads the host's mapping size.
    pagemap: Mutex<Option<notifier::pagemap::Pagemap>>,
    size: u64,
    /// hva of gpa 0 (the guest-facing region's base).
    guest_hva: u64,
    /// `None` for private RAM (reached through the guest-facing mapping).
    alias: Option<Mmap>,
    region: RegionId,
    /// -1 for private RAM.
    memfd: RawFd,
    /// MISSING mode: huge pages with contents (by huge-page-aligned gpa)
    /// for their first COPY; every other page is COPYed from `zeros`.
    staged: Mutex<BTreeMap<u64, Box<[u8]>>>,
    /// MISSING mode: a huge page of zeros to COPY (resident).
    zeros: Option<ZeroSource>,
    hostmm: Mutex<HostMm>,
    /// Where host invalidations of guest RAM are delivered.
    subs: Subscribers,
    /// Whether the userfaultfd delivers REMOVE/UNMAP/REMAP.
    events: bool,
}

impl UffdGuestRam {
    /// `size` bytes of hugetlb RAM backed as `backing` (a shared memfd or
    /// private hugetlb; checked against the pool first), served as `mode`
    /// says. The VMM's operations on it are announced to `subs`; with
    /// `events`, so are the userfaultfd's REMOVE/UNMAP/REMAP messages (by
    /// the fault thread, [`EVENT_FEATURES`]). Private RAM has no page cache
    /// to fill: MISSING or the kernel's own first touch only.
    pub fn new(
        size: u64,
        backing: Backing,
        mode: UffdMode,
        subs: Subscribers,
        events: bool,
    ) -> Result<Self, UffdRamError> {
        let (hp, shared) = match backing {
            Backing::SharedMemfd(p) => (p, true),
            Backing::PrivateHugetlb(p) if p.is_huge() => (p, false),
            Backing::PrivateHugetlb(_) => return Err(UffdRamError::NotHugetlb),
            // THP: faults are resolved a 2 MiB block at a time, so the
            // block can be collapsed into a huge PMD ([`Self::resolve`]).
            Backing::Anon { thp: true } => (PageSize::Size2M, false),
            Backing::Anon { thp: false } => (PageSize::Size4K, false),
        };
        if !shared && mode.prefilled() {
            return Err(UffdRamError::NoPageCache(mode));
        }
        // Whole units (a THP block too), but only hugetlb has a pool to
        // check.
        let size = memory::check_whole_pages(size, hp)?;
        let pool = if backing.is_hugetlb() {
            hp
        } else {
            PageSize::Size4K
        };
        let size = memory::validate(size, pool)?;
        let mut hostmm = HostMm::new(subs.clone())?;
        // Reserved: the pool is checked above, and the pages must still be
        // there when a fault takes them (MISSING mode takes them one by
        // one, after the check).
        let region = hostmm.map_reserved(
            backing,
            size,
            Placement {
                // A PUD-aligned base for anonymous RAM too: THP blocks
                // line up with guest 2 MiB frames, and the PUD-level
                // mprotect rule sees whole PUDs.
                align: if backing.is_hugetlb() {
                    hp.bytes()
                } else {
                    PageSize::Size1G.bytes()
                },
                offset: 0,
            },
        )?;
        let (guest_hva, memfd) = {
            let r = hostmm.region(region).ok_or(UffdRamError::NoRegion)?;
            match (shared, r.memfd()) {
                (true, Some(fd)) => (r.base, fd),
                (false, _) => (r.base, -1),
                (true, None) => return Err(UffdRamError::NoRegion),
            }
        };
        if mode.prefilled() {
            // Populate the page cache: MINOR faults need a page to map.
            let len = libc::off_t::try_from(size).map_err(|_| UffdRamError::Os {
                op: "fallocate(guest RAM memfd)",
                source: std::io::Error::from_raw_os_error(libc::EOVERFLOW),
            })?;
            // SAFETY: fallocate on the region's memfd over its whole length.
            if unsafe { libc::fallocate(memfd, 0, 0, len) } != 0 {
                return Err(os("fallocate(guest RAM memfd)"));
            }
        }
        let alias = if shared {
            // SAFETY: `memfd` is the region's memfd, owned by `hostmm`,
            // which outlives this borrow (it is moved into the RAM below).
            let fd = unsafe { BorrowedFd::borrow_raw(memfd) };
            let len = notifier::convert::u64_to_usize(size);
            Some(Mmap::shared(
                fd,
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                0,
            )?)
        } else {
            None
        };
        let (features, reg) = match (mode, backing.is_hugetlb()) {
            (UffdMode::Minor, true) => (UFFD_FEATURE_MINOR_HUGETLBFS, UFFDIO_REGISTER_MODE_MINOR),
            (UffdMode::Minor, false) => (UFFD_FEATURE_MINOR_SHMEM, UFFDIO_REGISTER_MODE_MINOR),
            (UffdMode::Missing, true) => {
                (UFFD_FEATURE_MISSING_HUGETLBFS, UFFDIO_REGISTER_MODE_MISSING)
            }
            // Anonymous memory and shmem: MISSING needs no feature bit.
            (UffdMode::Missing, false) => (0, UFFDIO_REGISTER_MODE_MISSING),
            (UffdMode::Kernel | UffdMode::KernelPrefilled, _) => (0, 0),
        };
        // Write-protect mode too, for `notifier::ops` write_protect.
        let (features, reg) = (
            features | UFFD_FEATURE_WP_HUGETLBFS_SHMEM,
            reg | UFFDIO_REGISTER_MODE_WP,
        );
        // Events only where the range is registered (with uffd modes).
        let events = events && mode.uses_uffd();
        let features = if events {
            features | EVENT_FEATURES
        } else {
            features
        };
        let uffd = Uffd::open(features)?;
        if mode.uses_uffd() {
            uffd.register(HvaRange::new(guest_hva, guest_hva + size), reg)?;
        }
        let page = notifier::convert::u64_to_usize(hp.bytes());
        Ok(UffdGuestRam {
            uffd,
            mode,
            backing,
            page: hp,
            pagemap: Mutex::new(None),
            size,
            guest_hva,
            alias,
            region,
            memfd,
            staged: Mutex::new(BTreeMap::new()),
            zeros: if mode == UffdMode::Missing {
                Some(ZeroSource::new(page)?)
            } else {
                None
            },
            hostmm: Mutex::new(hostmm),
            subs,
            events,
        })
    }

    /// The subscriber list host invalidations of guest RAM go to.
    pub fn subscribers(&self) -> &Subscribers {
        &self.subs
    }
    /// Whether the userfaultfd delivers REMOVE/UNMAP/REMAP events.
    pub fn events(&self) -> bool {
        self.events
    }

    pub fn mode(&self) -> UffdMode {
        self.mode
    }
    pub fn size(&self) -> u64 {
        self.size
    }
    pub fn backing(&self) -> Backing {
        self.backing
    }
    /// The unit a fault is resolved in and the memslot's largest leaf: the
    /// hugetlb page size, 4 KiB (anonymous memory, shmem) or 2 MiB (THP).
    pub fn page_size(&self) -> PageSize {
        self.page
    }

    /// The size the host maps the page at `gpa` with - the largest leaf the
    /// MMU may install for it (KVM: `host_pfn_mapping_level()`, which reads
    /// the host page tables; here PAGEMAP_SCAN's `PAGE_IS_HUGE`). Hugetlb:
    /// its page size; THP: 2 MiB where the whole block is a huge PMD, else
    /// 4 KiB (also where this kernel cannot say: a smaller SPTE than the
    /// host mapping is always correct, a larger one never).
    pub fn host_level(&self, gpa: u64) -> PageSize {
        if self.backing != (Backing::Anon { thp: true }) {
            return self.page;
        }
        let mut pm = self.pagemap.lock();
        if pm.is_none() {
            *pm = notifier::pagemap::Pagemap::open().ok();
        }
        let huge = pm
            .as_mut()
            .and_then(|pm| pm.huge_mapped(self.page_range(gpa)).ok().flatten());
        if huge == Some(true) {
            PageSize::Size2M
        } else {
            PageSize::Size4K
        }
    }
    /// [`Self::page_size`] in bytes.
    pub fn page_bytes(&self) -> u64 {
        self.page_size().bytes()
    }
    pub fn uffd(&self) -> &Uffd {
        &self.uffd
    }
    /// Whether the RAM is a shared memfd (private: no file, no alias).
    pub fn is_shared(&self) -> bool {
        self.alias.is_some()
    }
    /// Where the VMM reaches gpa 0: the alias, or (private RAM) the
    /// guest-facing mapping.
    fn access_base(&self) -> u64 {
        self.alias.as_ref().map_or(self.guest_hva, Mmap::addr)
    }
    /// The memfd (owned by the host-mm region); -1 for private RAM.
    pub fn memfd(&self) -> RawFd {
        self.memfd
    }
    /// The guest-facing region in [`HostMm`].
    pub fn region(&self) -> RegionId {
        self.region
    }
    /// The host mm model owning the guest-facing mapping (for
    /// `notifier::ops` on it).
    pub fn hostmm(&self) -> MutexGuard<'_, HostMm> {
        self.hostmm.lock()
    }
    /// hva of gpa 0 in the guest-facing mapping (KVM's `userspace_addr`).
    pub fn guest_hva(&self) -> u64 {
        self.guest_hva
    }
    /// The guest-facing mapping as an hva range.
    pub fn guest_range(&self) -> HvaRange {
        HvaRange::new(self.guest_hva, self.guest_hva + self.size)
    }

    fn check(&self, gpa: u64, len: u64) -> Result<(), UffdRamError> {
        if gpa.checked_add(len).is_none_or(|e| e > self.size) {
            return Err(UffdRamError::OutOfRange {
                gpa,
                len,
                size: self.size,
            });
        }
        Ok(())
    }

    /// Put `bytes` at `gpa` before the guest runs: see [`Self::stage`].
    pub fn load(&mut self, gpa: u64, bytes: &[u8]) -> Result<(), UffdRamError> {
        self.stage(gpa, bytes)
    }

    /// Put `bytes` at `gpa` before the guest touches them: through the
    /// alias (MINOR and the baselines: the page cache is there), or staged
    /// for the first COPY of each huge page they span (MISSING: writing the
    /// page cache would make the guest's first touch no fault at all).
    pub fn stage(&self, gpa: u64, bytes: &[u8]) -> Result<(), UffdRamError> {
        let len = bytes.len() as u64;
        self.check(gpa, len)?;
        match self.mode {
            UffdMode::Minor | UffdMode::Kernel | UffdMode::KernelPrefilled => {
                // SAFETY: [gpa, gpa+len) is inside the alias (checked), which
                // lives as long as self; `bytes` cannot overlap it (it is a
                // borrowed Rust slice, the alias is only reached by pointer).
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        bytes.as_ptr(),
                        (self.access_base() + gpa) as *mut u8,
                        bytes.len(),
                    )
                };
            }
            UffdMode::Missing => {
                let page = self.page_bytes();
                let mut staged = self.staged.lock();
                let mut at = gpa;
                while at < gpa + len {
                    let base = at & !(page - 1);
                    let end = (base + page).min(gpa + len);
                    let dst = staged
                        .entry(base)
                        .or_insert_with(|| vec![0u8; u64_to_usize(page)].into_boxed_slice());
                    let src = &bytes[u64_to_usize(at - gpa)..u64_to_usize(end - gpa)];
                    dst[u64_to_usize(at - base)..u64_to_usize(end - base)].copy_from_slice(src);
                    at = end;
                }
            }
        }
        Ok(())
    }

    /// MISSING mode: how many huge pages are staged for their first COPY.
    pub fn staged_pages(&self) -> usize {
        self.staged.lock().len()
    }

    /// Read `n` u64s at `gpa` through the alias (after the guest ran: the
    /// page is in the page cache in both modes).
    pub fn read_u64s<const N: usize>(&self, gpa: u64) -> Result<[u64; N], UffdRamError> {
        self.check(gpa, N as u64 * 8)?;
        if !gpa.is_multiple_of(8) {
            return Err(UffdRamError::OutOfRange {
                gpa,
                len: N as u64 * 8,
                size: self.size,
            });
        }
        let mut out = [0u64; N];
        for (i, o) in out.iter_mut().enumerate() {
            // SAFETY: inside the alias or, for private RAM, the guest-facing
            // mapping (checked; both cover `size` bytes and live as long as
            // self; a missing private page faults through the userfaultfd
            // like the guest's own touch), 8-byte aligned (checked;
            // the mapping is page aligned); a volatile read of shared memory
            // the guest may have written.
            *o = unsafe {
                std::ptr::read_volatile((self.access_base() + gpa + i as u64 * 8) as *const u64)
            };
        }
        Ok(out)
    }

    /// The aligned u64 at `gpa`, inside guest RAM, in the VMM's view (the
    /// alias, or for private RAM the guest-facing mapping).
    fn word(&self, gpa: u64) -> Result<u64, UffdRamError> {
        self.check(gpa, 8)?;
        if !gpa.is_multiple_of(8) {
            return Err(UffdRamError::OutOfRange {
                gpa,
                len: 8,
                size: self.size,
            });
        }
        Ok(self.access_base() + gpa)
    }

    /// Atomically replace `old` with `new` at `gpa` (a page-table walker's
    /// A/D update); `Ok(false)` if the value changed.
    pub fn cmpxchg_u64(&self, gpa: u64, old: u64, new: u64) -> Result<bool, UffdRamError> {
        let addr = self.word(gpa)?;
        // SAFETY: `word` checked that the 8 bytes are inside a mapping of
        // `size` bytes that lives as long as self, 8-byte aligned (the
        // mapping is page aligned); other writers (the guest) only race at
        // the hardware level, which an atomic access tolerates.
        let a = unsafe { &*(addr as *const std::sync::atomic::AtomicU64) };
        Ok(a.compare_exchange(
            old,
            new,
            std::sync::atomic::Ordering::SeqCst,
            std::sync::atomic::Ordering::SeqCst,
        )
        .is_ok())
    }

    /// Write one u64 at `gpa` while the guest runs (the latency probe's
    /// control words).
    pub fn write_u64(&self, gpa: u64, v: u64) -> Result<(), UffdRamError> {
        let addr = self.word(gpa)?;
        // SAFETY: as in `cmpxchg_u64` (checked, aligned, lives as long as
        // self); a volatile store to memory the guest reads concurrently.
        unsafe { std::ptr::write_volatile(addr as *mut u64, v) };
        Ok(())
    }

    /// The huge page containing `gpa`, as a guest-facing hva range.
    pub fn page_range(&self, gpa: u64) -> HvaRange {
        let page = self.page_bytes();
        let start = self.guest_hva + (gpa & !(page - 1));
        HvaRange::new(start, start + page)
    }

    /// Make the huge page containing `gpa` present in the guest-facing
    /// mapping without waking the faulting thread: CONTINUE (MINOR) or COPY
    /// (MISSING). `Ok(false)`: it already was.
    pub fn populate(&self, gpa: u64) -> Result<bool, UffdRamError> {
        self.resolve(gpa, false)
    }

    /// [`Self::populate`] and wake the faulting thread in the same ioctl.
    /// The kernel wakes only when it mapped the page: on `Ok(false)`
    /// (already present) the caller still has to [`Self::wake`].
    pub fn populate_and_wake(&self, gpa: u64) -> Result<bool, UffdRamError> {
        self.resolve(gpa, true)
    }

    fn resolve(&self, gpa: u64, wake: bool) -> Result<bool, UffdRamError> {
        self.check(gpa, 1)?;
        let r = self.page_range(gpa);
        Ok(match self.mode {
            UffdMode::Minor => self.uffd.continue_range(r, wake)?,
            UffdMode::Kernel | UffdMode::KernelPrefilled => false,
            UffdMode::Missing => {
                // A staged page is COPYed once; after that the page cache
                // has it (a page discarded later faults back as zeros, as
                // the kernel's own first touch would give). The source
                // must be resident: hugetlb COPYs with page faults off, and
                // a non-resident source makes the kernel copy through a
                // second, unreserved huge page (ENOMEM with a tight pool).
                let base = r.start - self.guest_hva;
                // THP: wake only after the collapse below.
                let thp = self.backing == (Backing::Anon { thp: true });
                let copy_wakes = wake && !thp;
                let mut staged = self.staged.lock();
                let mapped = match staged.get_mut(&base) {
                    Some(b) => {
                        make_resident(b);
                        self.uffd.copy(r, b, copy_wakes)?
                    }
                    None => {
                        let zeros = self.zeros.as_ref().map(ZeroSource::as_slice).unwrap_or(&[]);
                        self.uffd.copy(r, zeros, copy_wakes)?
                    }
                };
                staged.remove(&base);
                drop(staged);
                if thp && mapped {
                    self.collapse(r);
                    if wake {
                        self.uffd.wake(r)?;
                    }
                }
                mapped
            }
        })
    }

    /// THP: make the 2 MiB block `r` that UFFDIO_COPY just filled with 4 KiB
    /// pages a huge PMD, as the kernel's own first touch of a
    /// `MADV_HUGEPAGE` range would have (`do_huge_pmd_anonymous_page()`
    /// answers a registered range with a MISSING fault instead):
    /// `MADV_COLLAPSE` (6.1+; `madvise_collapse()` in mm/khugepaged.c). It
    /// fails on a kernel without it, or without a free huge page, and the
    /// block stays 4 KiB pages: [`Self::host_level`] reads which it is.
    fn collapse(&self, r: HvaRange) {
        const MADV_COLLAPSE: libc::c_int = 25;
        // SAFETY: advice on a range of the guest-facing mapping, which this
        // value owns; a collapse copies the pages into a huge page and
        // keeps their contents.
        let _ = unsafe {
            libc::madvise(
                r.start as *mut libc::c_void,
                u64_to_usize(r.len()),
                MADV_COLLAPSE,
            )
        };
    }

    /// Fault every huge page of the guest-facing mapping in from here (a
    /// read per page), so the guest's run has no host faults: the warm
    /// baseline of the fault-cost benchmark. Only without userfaultfd.
    pub fn prefault(&self) -> Result<(), UffdRamError> {
        if self.mode.uses_uffd() {
            return Err(UffdRamError::PrefaultWithUffd);
        }
        let mut a = self.guest_hva;
        while a < self.guest_hva + self.size {
            // SAFETY: `a` is inside the guest-facing mapping (RW, owned by
            // `hostmm` for as long as self lives); a volatile one-byte read.
            unsafe { std::ptr::read_volatile(a as *const u8) };
            a += self.page_bytes();
        }
        Ok(())
    }

    /// Wake whoever faults in the huge page containing `gpa`.
    pub fn wake(&self, gpa: u64) -> Result<(), UffdRamError> {
        Ok(self.uffd.wake(self.page_range(gpa))?)
    }
}

impl UffdGuestRam {
    /// The VMM's view of the RAM as vm-memory memory at gpa 0: another
    /// `MAP_SHARED` mapping of the memfd, not registered with userfaultfd,
    /// so the VMM's own accesses (the loader, the emulator, the profiler)
    /// never fault on the guest-facing mapping. Shared RAM only.
    pub fn vmm_view(&self) -> Result<GuestMemoryMmap, UffdRamError> {
        if !self.is_shared() {
            return Err(UffdRamError::NoPageCache(self.mode));
        }
        Ok(memory::memfd_guest_memory(
            self.memfd,
            self.size,
            self.page_size(),
        )?)
    }
}

// SAFETY: the guest-facing mapping covers `size` bytes at `guest_hva`; it
// is a region of `hostmm`, which this value owns and which unmaps it only
// when dropped.
unsafe impl SlotMemory for UffdGuestRam {
    fn slot_hva(&self) -> u64 {
        self.guest_hva
    }
    fn slot_size(&self) -> u64 {
        self.size
    }
}

/// The RAM as a guest page-table walker reads it (the nested MMU over an
/// L1's EPT tables): bounds-checked reads of the VMM's view, each entry
/// read once; the only writes are a walker's A/D updates
/// (compare-exchange).
impl GuestPhysMem for UffdGuestRam {
    fn read_u64(&self, gpa: u64) -> Result<u64, MemError> {
        if !gpa.is_multiple_of(8) {
            return Err(MemError::Misaligned { gpa });
        }
        self.read_u64s::<1>(gpa)
            .map(|w| w[0])
            .map_err(|_| MemError::OutsideRam { gpa })
    }

    fn cmpxchg_u64(&self, gpa: u64, old: u64, new: u64) -> Result<bool, MemError> {
        if !gpa.is_multiple_of(8) {
            return Err(MemError::Misaligned { gpa });
        }
        UffdGuestRam::cmpxchg_u64(self, gpa, old, new).map_err(|_| MemError::OutsideRam { gpa })
    }
}
