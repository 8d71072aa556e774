//! Guest RAM: one shared memfd (hugetlb 2M/1G, or plain) mapped through
//! vm-memory and registered as KVM memslot 0 at gpa 0.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::path::PathBuf;

use notifier::PageSize;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

/// `--hugepages`: a hugetlb page size (2M, 1G), or `none` (also `4K`):
/// a plain memfd of 4 KiB pages.
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
    /// memfd_create/ftruncate failed.
    #[error("creating the guest RAM memfd failed: {0}")]
    Memfd(#[source] std::io::Error),
    /// mmap of the memfd failed.
    #[error("mapping guest RAM failed: {0}")]
    Mmap(String),
}

/// Guest RAM: the memfd and the vm-memory view over it.
pub struct GuestRam {
    /// The memory as vm-memory sees it (one region at gpa 0).
    pub mem: GuestMemoryMmap,
    /// Size in bytes.
    pub size: u64,
    /// Backing page size.
    pub hugepages: PageSize,
    /// The shared memfd (kept for other mappings, e.g. uffd MINOR).
    pub memfd: std::sync::Arc<File>,
}

/// The largest guest RAM this layout supports (single region below 3 GiB).
pub const MAX_LOW_RAM: u64 = 3 << 30;

/// Round `size` up to the backing page size.
pub fn rounded_size(size: u64, hp: PageSize) -> u64 {
    let ps = hp.bytes();
    size.div_ceil(ps) * ps
}

/// Check a hugetlb pool: `free`/`reserved` are the pool's sysfs figures.
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
    Some(kb * 1024)
}

/// Validate a requested size against the host and the pools.
pub fn validate(size: u64, hp: PageSize) -> Result<u64, MemoryError> {
    let size = rounded_size(size, hp);
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
        let free = read_sysfs_u64(&dir.join("free_hugepages")).unwrap_or(0);
        let resv = read_sysfs_u64(&dir.join("resv_hugepages")).unwrap_or(0);
        check_hugepages(hp, size, free, resv, total)?;
    }
    Ok(size)
}

impl GuestRam {
    /// Create `size` bytes of guest RAM (rounded up to the page size).
    pub fn new(size: u64, hp: PageSize) -> Result<Self, MemoryError> {
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
        let len = usize::try_from(size).map_err(|_| MemoryError::Mmap("size".into()))?;
        // MAP_SHARED without MAP_NORESERVE: the hugetlb pages are reserved
        // at mmap time, so a short pool fails here and not with SIGBUS later.
        let region = MmapRegionBuilder::new(len)
            .with_file_offset(FileOffset::new(
                file.try_clone().map_err(MemoryError::Memfd)?,
                0,
            ))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_SHARED)
            .with_hugetlbfs(hp != PageSize::Size4K)
            .build()
            .map_err(|e| MemoryError::Mmap(e.to_string()))?;
        let region = GuestRegionMmap::new(region, GuestAddress(0))
            .ok_or_else(|| MemoryError::Mmap("region overflows the guest address space".into()))?;
        let mem = GuestMemoryMmap::from_regions(vec![region])
            .map_err(|e| MemoryError::Mmap(e.to_string()))?;
        Ok(GuestRam {
            mem,
            size,
            hugepages: hp,
            memfd: std::sync::Arc::new(file),
        })
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
    fn rounding() {
        assert_eq!(rounded_size(256 << 20, PageSize::Size1G), 1 << 30);
        assert_eq!(rounded_size(3 << 20, PageSize::Size2M), 4 << 20);
    }
}
