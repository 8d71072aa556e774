//! The x86-64 page sizes, one type for every place a page size appears:
//! a host page (hugetlb pool, THP), a guest page-table leaf (an L1's EPT
//! leaf for its L2) and a secondary-MMU leaf (an SPTE). The kernel has the
//! same one concept: `enum pg_level` (arch/x86/include/asm/pgtable_types.h),
//! `PG_LEVEL_4K` / `PG_LEVEL_2M` / `PG_LEVEL_1G`, used by mm and KVM alike
//! (`kvm_mmu_max_mapping_level()` answers with the host's mapping level).

use std::path::PathBuf;
use std::str::FromStr;

/// A page size: 4 KiB, 2 MiB or 1 GiB. The discriminant is the x86 level
/// (`PG_LEVEL_*`: 1 = 4K).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum PageSize {
    Size4K = 1,
    Size2M = 2,
    Size1G = 3,
}

impl PageSize {
    /// Every size, smallest first.
    pub const ALL: [PageSize; 3] = [PageSize::Size4K, PageSize::Size2M, PageSize::Size1G];

    /// The x86 / KVM level number (`PG_LEVEL_4K` = 1).
    pub fn level(self) -> u8 {
        self as u8
    }

    /// The size at x86 level `n` (1 = 4K, 2 = 2M, 3 = 1G).
    pub fn from_level(n: u8) -> Option<Self> {
        match n {
            1 => Some(Self::Size4K),
            2 => Some(Self::Size2M),
            3 => Some(Self::Size1G),
            _ => None,
        }
    }

    /// log2 of the size in bytes: 12, 21, 30.
    pub fn shift(self) -> u32 {
        12 + self.gfn_shift()
    }

    /// log2 of [`pages`](Self::pages): 0, 9, 18.
    pub fn gfn_shift(self) -> u32 {
        9 * (self as u32 - 1)
    }

    pub fn bytes(self) -> u64 {
        1 << self.shift()
    }

    /// 4 KiB pages (gfns) in one page of this size: 1, 512, 262144
    /// (`KVM_PAGES_PER_HPAGE`).
    pub fn pages(self) -> u64 {
        1 << self.gfn_shift()
    }

    /// The size in KiB (the hugetlb pool's sysfs name).
    pub fn kib(self) -> u64 {
        self.bytes() / 1024
    }

    /// The next smaller size, if any.
    pub fn lower(self) -> Option<Self> {
        Self::from_level(self as u8 - 1)
    }

    /// Whether pages of this size come from a hugetlb pool.
    pub fn is_huge(self) -> bool {
        self != PageSize::Size4K
    }

    /// The `MAP_HUGE_*` / `MFD_HUGE_*` bits that pick this pool
    /// (log2(size) << `MAP_HUGE_SHIFT`, 26); 0 for 4 KiB.
    pub fn huge_flag(self) -> i32 {
        match self {
            PageSize::Size4K => 0,
            PageSize::Size2M => libc::MAP_HUGE_2MB,
            PageSize::Size1G => libc::MAP_HUGE_1GB,
        }
    }

    /// `memfd_create` flags for a memfd of this page size: `MFD_CLOEXEC`,
    /// plus `MFD_HUGETLB` and the pool bits for a huge size.
    pub fn memfd_flags(self) -> libc::c_uint {
        let pool = match self {
            PageSize::Size4K => return libc::MFD_CLOEXEC,
            PageSize::Size2M => libc::MFD_HUGE_2MB,
            PageSize::Size1G => libc::MFD_HUGE_1GB,
        };
        libc::MFD_CLOEXEC | libc::MFD_HUGETLB | pool
    }

    /// The hugetlb pool's sysfs directory
    /// (`/sys/kernel/mm/hugepages/hugepages-<kib>kB`); `None` for 4 KiB.
    pub fn hugetlb_pool(self) -> Option<PathBuf> {
        self.is_huge().then(|| {
            PathBuf::from(format!(
                "/sys/kernel/mm/hugepages/hugepages-{}kB",
                self.kib()
            ))
        })
    }
}

impl FromStr for PageSize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "4k" | "4kb" | "4kib" => Ok(PageSize::Size4K),
            "2m" | "2mb" | "2mib" | "2048k" => Ok(PageSize::Size2M),
            "1g" | "1gb" | "1gib" => Ok(PageSize::Size1G),
            _ => Err(format!("unknown page size {s:?}: expected 4K, 2M or 1G")),
        }
    }
}

impl std::fmt::Display for PageSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            PageSize::Size4K => "4K",
            PageSize::Size2M => "2M",
            PageSize::Size1G => "1G",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_levels_and_flags() {
        assert_eq!(PageSize::Size4K.pages(), 1);
        assert_eq!(PageSize::Size2M.pages(), 512);
        assert_eq!(PageSize::Size1G.pages(), 262_144);
        assert_eq!(PageSize::Size1G.bytes(), 1 << 30);
        assert_eq!(PageSize::Size2M.shift(), 21);
        assert_eq!(PageSize::Size1G.lower(), Some(PageSize::Size2M));
        assert_eq!(PageSize::Size4K.lower(), None);
        for p in PageSize::ALL {
            assert_eq!(PageSize::from_level(p.level()), Some(p));
            assert_eq!(p.to_string().parse::<PageSize>(), Ok(p));
        }
        assert_eq!(PageSize::Size2M.huge_flag(), 21 << 26);
        assert_eq!(PageSize::Size1G.huge_flag(), 30 << 26);
        assert_eq!(PageSize::Size4K.memfd_flags(), libc::MFD_CLOEXEC);
        assert_eq!(
            PageSize::Size2M.hugetlb_pool().unwrap(),
            PathBuf::from("/sys/kernel/mm/hugepages/hugepages-2048kB")
        );
        assert_eq!(PageSize::Size4K.hugetlb_pool(), None);
        assert!("3M".parse::<PageSize>().is_err());
        assert_eq!("2mb".parse::<PageSize>(), Ok(PageSize::Size2M));
    }
}
