//! Guest RAM and what serves it.
//!
//! - this file: what a RAM configuration must satisfy (size, hugetlb pool,
//!   the layout's limit), and [`GuestRam`]: one shared memfd mapped
//!   through vm-memory, the RAM of a plain `vmm boot`;
//! - [`uffd`]: RAM whose guest-facing mapping is registered with
//!   userfaultfd, so every page the guest touches is one the project's MMU
//!   mapped;
//! - [`fault`]: the userfaultfd fault thread;
//! - [`mmu`]: the project's MMUs wired to that RAM and to the host
//!   invalidations announced on it.
//!
//! How RAM is backed is one type across the workspace,
//! [`notifier::hostmm::Backing`] (`shared-2M`, `private-1G`, a plain
//! memfd as `shared-4K`, ...); its page size is [`notifier::PageSize`].

pub mod fault;
pub mod mmu;
pub mod uffd;

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;

use notifier::hostmm::Backing;
use notifier::PageSize;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestRegionMmap};

use crate::arch::x86_64::layout::MAX_LOW_RAM;
use crate::vstate::SlotMemory;

/// `--hugepages`: a hugetlb page size (2M, 1G), or `none` (also `4K`): a
/// plain memfd of 4 KiB pages.
pub fn parse_hugepages(s: &str) -> Result<PageSize, String> {
    match s.to_ascii_lowercase().as_str() {
        "none" | "off" => Ok(PageSize::Size4K),
        _ => s
            .parse()
            .map_err(|_| format!("unknown page size {s:?}: expected 2M, 1G or none")),
    }
}

/// The `--hugepages` value that names `ps` (`none` for 4 KiB pages).
pub fn hugepages_name(ps: PageSize) -> String {
    if ps.is_huge() {
        ps.to_string()
    } else {
        "none".into()
    }
}

/// Guest RAM errors.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// Requested more than the host has.
    #[error(
        "guest memory of {requested} MiB is larger than the host's {host_total} MiB (MemTotal)"
    )]
    LargerThanHost { requested: u64, host_total: u64 },
    /// The layout is a single region below the 32-bit MMIO gap.
    #[error(
        "guest memory of {requested} MiB is above the {max} MiB this VMM lays out below 4 GiB"
    )]
    AboveLayoutLimit { requested: u64, max: u64 },
    /// Not enough free hugepages in the pool.
    #[error(
        "not enough free {size} hugepages: {free} free, {needed} needed; reserve them with: \
         echo {suggest} > {}/nr_hugepages", dir.display()
    )]
    NotEnoughHugepages {
        size: PageSize,
        free: u64,
        needed: u64,
        suggest: u64,
        dir: PathBuf,
    },
    /// The pool does not exist on this kernel.
    #[error("no {size} hugetlb pool on this host ({} is missing)", dir.display())]
    NoPool { size: PageSize, dir: PathBuf },
    /// A backing this RAM cannot be.
    #[error("guest RAM of this kind cannot be {0}")]
    Backing(Backing),
    /// memfd_create/ftruncate/dup failed.
    #[error("creating the guest RAM memfd failed: {0}")]
    Memfd(#[source] std::io::Error),
    /// mmap of the memfd failed.
    #[error("mapping guest RAM failed: {0}")]
    Mmap(String),
    /// No RAM at all.
    #[error("guest RAM of 0 bytes: give --mem a size, e.g. 256M")]
    Empty,
    /// Not a whole number of the backing's pages (never rounded silently).
    #[error("guest RAM of {size} bytes is not a whole number of {page} pages: use {}", suggest(*.size, *.page))]
    NotWholePages { size: u64, page: PageSize },
}

/// The whole-page sizes either side of `size` (`--mem` values).
fn suggest(size: u64, page: PageSize) -> String {
    let mib = |b: u64| {
        if b.is_multiple_of(1 << 20) {
            format!("{}M", b >> 20)
        } else {
            format!("{}K", b >> 10)
        }
    };
    let down = size - size % page.bytes();
    let up = down.saturating_add(page.bytes());
    if down == 0 {
        mib(up)
    } else {
        format!("{} or {}", mib(down), mib(up))
    }
}

/// Guest RAM must be a non-zero whole number of its backing's pages.
pub fn check_whole_pages(size: u64, page: PageSize) -> Result<u64, MemoryError> {
    if size == 0 {
        return Err(MemoryError::Empty);
    }
    if !size.is_multiple_of(page.bytes()) {
        return Err(MemoryError::NotWholePages { size, page });
    }
    Ok(size)
}

/// Round `size` up to the backing page size.
pub fn rounded_size(size: u64, hp: PageSize) -> u64 {
    size.div_ceil(hp.bytes()) * hp.bytes()
}

/// Check a hugetlb pool: `free`/`reserved`/`total` are the pool's sysfs
/// figures.
pub fn check_hugepages(
    hp: PageSize,
    size: u64,
    free: u64,
    reserved: u64,
    total: u64,
) -> Result<(), MemoryError> {
    let Some(dir) = hp.hugetlb_pool() else {
        return Ok(());
    };
    let needed = size / hp.bytes();
    let available = free.saturating_sub(reserved);
    if available < needed {
        return Err(MemoryError::NotEnoughHugepages {
            size: hp,
            free: available,
            needed,
            suggest: total + (needed - available),
            dir,
        });
    }
    Ok(())
}

fn read_sysfs_u64(path: &std::path::Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// MemTotal from /proc/meminfo, in bytes.
pub fn host_mem_total() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kb.checked_mul(1024)
}

/// Validate a requested size: whole pages of `hp`, then against the host,
/// the layout and the pool.
pub fn validate(size: u64, hp: PageSize) -> Result<u64, MemoryError> {
    let size = check_whole_pages(size, hp)?;
    if let Some(total) = host_mem_total() {
        if size > total {
            return Err(MemoryError::LargerThanHost {
                requested: size >> 20,
                host_total: total >> 20,
            });
        }
    }
    if size > MAX_LOW_RAM {
        return Err(MemoryError::AboveLayoutLimit {
            requested: size >> 20,
            max: MAX_LOW_RAM >> 20,
        });
    }
    if let Some(dir) = hp.hugetlb_pool() {
        let Some(total) = read_sysfs_u64(&dir.join("nr_hugepages")) else {
            return Err(MemoryError::NoPool { size: hp, dir });
        };
        // The pages of a VM destroyed a moment ago can come back to the
        // pool a little later (measured: the second of two back-to-back
        // 1 GiB boots of one process found 0 free pages): a short pool
        // is looked at again for up to POOL_SETTLE before it is an error.
        let started = std::time::Instant::now();
        loop {
            let free = read_sysfs_u64(&dir.join("free_hugepages")).unwrap_or(0);
            let resv = read_sysfs_u64(&dir.join("resv_hugepages")).unwrap_or(0);
            match check_hugepages(hp, size, free, resv, total) {
                Err(e) if started.elapsed() >= POOL_SETTLE => return Err(e),
                Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
                Ok(()) => break,
            }
        }
    }
    Ok(size)
}

/// How long a short hugepage pool is waited on (see [`validate`]).
const POOL_SETTLE: std::time::Duration = std::time::Duration::from_secs(2);

/// `size` bytes of the memfd `fd` mapped `MAP_SHARED` as a vm-memory
/// `GuestMemoryMmap` at gpa 0 (its own mapping: the memfd is dup'ed).
/// Without `MAP_NORESERVE`, so hugetlb pages are reserved at mmap time and
/// a short pool fails here, not with SIGBUS later.
pub fn memfd_guest_memory(
    fd: RawFd,
    size: u64,
    hp: PageSize,
) -> Result<GuestMemoryMmap, MemoryError> {
    // SAFETY: dup of a descriptor the caller has open; the result is
    // checked and owned by the File from here on.
    let dup = unsafe { libc::dup(fd) };
    if dup < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: `dup` was just returned by dup(2) and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(dup) };
    let len = usize::try_from(size).map_err(|_| MemoryError::Mmap("size".into()))?;
    let region = MmapRegionBuilder::new(len)
        .with_file_offset(FileOffset::new(file, 0))
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_SHARED)
        .with_hugetlbfs(hp.is_huge())
        .build()
        .map_err(|e| MemoryError::Mmap(e.to_string()))?;
    let region = GuestRegionMmap::new(region, GuestAddress(0))
        .ok_or_else(|| MemoryError::Mmap("region overflows the guest address space".into()))?;
    GuestMemoryMmap::from_regions(vec![region]).map_err(|e| MemoryError::Mmap(e.to_string()))
}

/// Guest RAM of a plain boot: one shared memfd (hugetlb, or plain for
/// 4 KiB pages) or private anonymous memory (4 KiB or THP) and the vm-memory view over it, which is also KVM's
/// memslot.
pub struct GuestRam {
    /// The memory as vm-memory sees it (one region at gpa 0).
    pub mem: GuestMemoryMmap,
    /// Size in bytes.
    pub size: u64,
    /// Backing page size.
    pub hugepages: PageSize,
    /// The shared memfd (kept for other mappings); `None` for anonymous
    /// RAM.
    pub memfd: Option<Arc<File>>,
}

impl GuestRam {
    /// `size` bytes of RAM (whole pages) backed as `backing`, which must
    /// be a shared memfd.
    pub fn new(size: u64, backing: Backing) -> Result<Self, MemoryError> {
        let hp = match backing {
            Backing::SharedMemfd(hp) => hp,
            Backing::Anon { thp } => return Self::anonymous(size, thp),
            Backing::PrivateHugetlb(_) => return Err(MemoryError::Backing(backing)),
        };
        let size = validate(size, hp)?;
        // SAFETY: the name is a NUL-terminated literal; flags are valid
        // memfd_create flags; the return value is checked.
        let fd = unsafe { libc::memfd_create(c"vmm-guest-ram".as_ptr(), hp.memfd_flags()) };
        if fd < 0 {
            return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
        }
        // SAFETY: fd was just returned by memfd_create and is owned by nobody else.
        let file = unsafe { File::from_raw_fd(fd) };
        file.set_len(size).map_err(MemoryError::Memfd)?;
        let mem = memfd_guest_memory(file.as_raw_fd(), size, hp)?;
        Ok(GuestRam {
            mem,
            size,
            hugepages: hp,
            memfd: Some(Arc::new(file)),
        })
    }
}

impl GuestRam {
    /// `size` bytes of private anonymous RAM (4 KiB pages, whole ones;
    /// `thp`: `MADV_HUGEPAGE`, so the kernel's first touch of a 2 MiB
    /// block maps a huge PMD - `do_huge_pmd_anonymous_page()`), no file.
    fn anonymous(size: u64, thp: bool) -> Result<Self, MemoryError> {
        let size = validate(size, PageSize::Size4K)?;
        let len = usize::try_from(size).map_err(|_| MemoryError::Mmap("size".into()))?;
        let region = MmapRegionBuilder::new(len)
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| MemoryError::Mmap(e.to_string()))?;
        let advice = if thp {
            libc::MADV_HUGEPAGE
        } else {
            libc::MADV_NOHUGEPAGE
        };
        // SAFETY: advice on the region just mapped (owned by `region`,
        // `len` bytes); it changes no contents.
        unsafe { libc::madvise(region.as_ptr().cast(), len, advice) };
        let region = GuestRegionMmap::new(region, GuestAddress(0))
            .ok_or_else(|| MemoryError::Mmap("region overflows the guest address space".into()))?;
        let mem = GuestMemoryMmap::from_regions(vec![region])
            .map_err(|e| MemoryError::Mmap(e.to_string()))?;
        Ok(GuestRam {
            mem,
            size,
            hugepages: PageSize::Size4K,
            memfd: None,
        })
    }
}

/// The vm-memory view as a memslot: region 0 at gpa 0, mapped while the
/// `GuestMemoryMmap` (and so any clone of it) lives.
pub struct GuestMemorySlot(pub GuestMemoryMmap);

// SAFETY: a GuestMemoryMmap owns its regions' mappings (reference-counted
// across clones) and unmaps them only when the last clone is dropped; this
// value holds one, and the range is region 0's.
unsafe impl SlotMemory for GuestMemorySlot {
    fn slot_hva(&self) -> u64 {
        self.0
            .get_host_address(GuestAddress(0))
            .map_or(0, |p| p as u64)
    }
    fn slot_size(&self) -> u64 {
        self.0.iter().next().map_or(0, |r| r.size() as u64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_enough_hugepages_says_free_needed_and_command() {
        let e = check_hugepages(PageSize::Size2M, 256 << 20, 10, 2, 10).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("8 free"), "{msg}");
        assert!(msg.contains("128 needed"), "{msg}");
        assert!(
            msg.contains("echo 130 > /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"),
            "{msg}"
        );
        assert!(check_hugepages(PageSize::Size2M, 256 << 20, 200, 0, 200).is_ok());
        assert!(check_hugepages(PageSize::Size4K, 256 << 20, 0, 0, 0).is_ok());
    }

    #[test]
    fn larger_than_host_is_refused() {
        let e = validate(1 << 50, PageSize::Size4K).unwrap_err();
        assert!(matches!(e, MemoryError::LargerThanHost { .. }), "{e}");
    }

    #[test]
    fn sizes_are_whole_pages_never_rounded() {
        assert!(matches!(
            validate(0, PageSize::Size4K),
            Err(MemoryError::Empty)
        ));
        for (size, page, says) in [
            (1 << 20, PageSize::Size2M, "use 2M"),
            (3000 << 10, PageSize::Size2M, "use 2M or 4M"),
            (1025 << 20, PageSize::Size2M, "use 1024M or 1026M"),
            (256 << 20, PageSize::Size1G, "use 1024M"),
            (4097, PageSize::Size4K, "use 4K or 8K"),
        ] {
            let e = validate(size, page).unwrap_err();
            assert!(matches!(e, MemoryError::NotWholePages { .. }), "{e}");
            assert!(e.to_string().ends_with(says), "{e}");
        }
        assert_eq!(
            check_whole_pages(4 << 20, PageSize::Size2M).ok(),
            Some(4 << 20)
        );
    }

    #[test]
    fn rounding_and_names() {
        assert_eq!(rounded_size(256 << 20, PageSize::Size1G), 1 << 30);
        assert_eq!(rounded_size(3 << 20, PageSize::Size2M), 4 << 20);
        assert_eq!(parse_hugepages("none"), Ok(PageSize::Size4K));
        assert_eq!(parse_hugepages("1g"), Ok(PageSize::Size1G));
        assert!(parse_hugepages("3M").is_err());
        assert_eq!(hugepages_name(PageSize::Size4K), "none");
        assert_eq!(hugepages_name(PageSize::Size2M), "2M");
    }

    #[test]
    fn plain_memfd_ram_is_a_memslot() {
        let ram = GuestRam::new(8 << 20, Backing::SharedMemfd(PageSize::Size4K)).unwrap();
        let slot = GuestMemorySlot(ram.mem.clone());
        assert_eq!(slot.slot_size(), 8 << 20);
        assert_ne!(slot.slot_hva(), 0);
        let anon = GuestRam::new(8 << 20, Backing::Anon { thp: true }).unwrap();
        assert!(anon.memfd.is_none());
        assert_eq!(GuestMemorySlot(anon.mem.clone()).slot_size(), 8 << 20);
        let e = GuestRam::new(8 << 20, Backing::PrivateHugetlb(PageSize::Size2M))
            .err()
            .unwrap();
        assert!(matches!(e, MemoryError::Backing(_)), "{e}");
    }
}
