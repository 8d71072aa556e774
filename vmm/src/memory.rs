//! Guest RAM: one shared memfd (hugetlb 2M/1G, or plain) mapped through
//! vm-memory and registered as KVM memslot 0 at gpa 0.

use std::fs::File;
use std::os::fd::FromRawFd;
use std::str::FromStr;

use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap};

/// The page size backing guest RAM (`--hugepages`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HugePages {
    /// hugetlb 2 MiB pages.
    Huge2M,
    /// hugetlb 1 GiB pages.
    Huge1G,
    /// A plain (4 KiB page) memfd.
    None,
}

impl HugePages {
    /// Page size in bytes (4 KiB for `None`).
    pub fn page_size(self) -> u64 {
        match self {
            HugePages::Huge2M => 2 << 20,
            HugePages::Huge1G => 1 << 30,
            HugePages::None => 4096,
        }
    }

    /// The sysfs directory of this hugetlb pool.
    pub fn sysfs_dir(self) -> Option<&'static str> {
        match self {
            HugePages::Huge2M => Some("/sys/kernel/mm/hugepages/hugepages-2048kB"),
            HugePages::Huge1G => Some("/sys/kernel/mm/hugepages/hugepages-1048576kB"),
            HugePages::None => None,
        }
    }

    pub fn memfd_flags(self) -> libc::c_uint {
        // MFD_HUGE_SHIFT is 26: log2(page size) << 26 picks the pool.
        match self {
            HugePages::Huge2M => libc::MFD_CLOEXEC | libc::MFD_HUGETLB | (21 << 26),
            HugePages::Huge1G => libc::MFD_CLOEXEC | libc::MFD_HUGETLB | (30 << 26),
            HugePages::None => libc::MFD_CLOEXEC,
        }
    }
}

impl FromStr for HugePages {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "2m" | "2mb" | "2048k" => Ok(HugePages::Huge2M),
            "1g" | "1gb" => Ok(HugePages::Huge1G),
            "none" | "off" | "4k" => Ok(HugePages::None),
            _ => Err(format!("unknown page size {s:?}: expected 2M, 1G or none")),
        }
    }
}

impl std::fmt::Display for HugePages {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HugePages::Huge2M => "2M",
            HugePages::Huge1G => "1G",
            HugePages::None => "none",
        })
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
         echo {suggest} > {dir}/nr_hugepages"
    )]
    NotEnoughHugepages {
        size: HugePages,
        free: u64,
        needed: u64,
        suggest: u64,
        dir: &'static str,
    },
    /// The pool does not exist on this kernel.
    #[error("no {size} hugetlb pool on this host ({dir} is missing)")]
    NoPool { size: HugePages, dir: &'static str },
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
    pub hugepages: HugePages,
    /// The shared memfd (kept for other mappings, e.g. uffd MINOR).
    pub memfd: std::sync::Arc<File>,
}

/// The largest guest RAM this layout supports (single region below 3 GiB).
pub const MAX_LOW_RAM: u64 = 3 << 30;

/// Round `size` up to the backing page size.
pub fn rounded_size(size: u64, hp: HugePages) -> u64 {
    let ps = hp.page_size();
    size.div_ceil(ps) * ps
}

/// Check a hugetlb pool: `free`/`reserved` are the pool's sysfs figures.
pub fn check_hugepages(
    hp: HugePages,
    size: u64,
    free: u64,
    reserved: u64,
    total: u64,
) -> Result<(), MemoryError> {
    let Some(dir) = hp.sysfs_dir() else {
        return Ok(());
    };
    let needed = size / hp.page_size();
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

fn read_sysfs_u64(path: &str) -> Option<u64> {
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
pub fn validate(size: u64, hp: HugePages) -> Result<u64, MemoryError> {
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
    if let Some(dir) = hp.sysfs_dir() {
        let Some(total) = read_sysfs_u64(&format!("{dir}/nr_hugepages")) else {
            return Err(MemoryError::NoPool { size: hp, dir });
        };
        let free = read_sysfs_u64(&format!("{dir}/free_hugepages")).unwrap_or(0);
        let resv = read_sysfs_u64(&format!("{dir}/resv_hugepages")).unwrap_or(0);
        check_hugepages(hp, size, free, resv, total)?;
    }
    Ok(size)
}

impl GuestRam {
    /// Create `size` bytes of guest RAM (rounded up to the page size).
    pub fn new(size: u64, hp: HugePages) -> Result<Self, MemoryError> {
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
            .with_hugetlbfs(hp != HugePages::None)
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
    fn parse_sizes() {
        assert_eq!("2M".parse::<HugePages>().unwrap(), HugePages::Huge2M);
        assert_eq!("1g".parse::<HugePages>().unwrap(), HugePages::Huge1G);
        assert_eq!("none".parse::<HugePages>().unwrap(), HugePages::None);
        assert!("3M".parse::<HugePages>().is_err());
    }

    #[test]
    fn not_enough_hugepages_says_free_needed_and_command() {
        let e = check_hugepages(HugePages::Huge2M, 256 << 20, 10, 2, 10).unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("8 free"), "{msg}");
        assert!(msg.contains("128 needed"), "{msg}");
        assert!(
            msg.contains("echo 130 > /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages"),
            "{msg}"
        );
        assert!(check_hugepages(HugePages::Huge2M, 256 << 20, 200, 0, 200).is_ok());
        assert!(check_hugepages(HugePages::None, 256 << 20, 0, 0, 0).is_ok());
    }

    #[test]
    fn larger_than_host_is_refused() {
        let e = validate(1 << 50, HugePages::None).unwrap_err();
        assert!(matches!(e, MemoryError::LargerThanHost { .. }), "{e}");
    }

    #[test]
    fn rounding() {
        assert_eq!(rounded_size(256 << 20, HugePages::Huge1G), 1 << 30);
        assert_eq!(rounded_size(3 << 20, HugePages::Huge2M), 4 << 20);
    }
}
