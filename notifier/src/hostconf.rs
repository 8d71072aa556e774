//! Host settings a check or test changes temporarily, restored on drop (also
//! when unwinding from a panic, and on SIGINT/SIGTERM/SIGHUP once
//! [`crate::restore::install`]ed): hugetlb pool sizes and sysctls such as
//! `kernel.numa_balancing`.

use crate::error::{is_root, Error, Result};
use crate::PageSize;
use std::path::PathBuf;

fn read_u64(path: &PathBuf) -> Result<u64> {
    let s = std::fs::read_to_string(path).map_err(|source| Error::Sysctl {
        path: path.display().to_string(),
        source,
    })?;
    s.trim().parse().map_err(|_| Error::Sysctl {
        path: path.display().to_string(),
        source: std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("not a number: {s:?}"),
        ),
    })
}

fn write_str(path: &PathBuf, v: &str) -> Result<()> {
    std::fs::write(path, v).map_err(|source| Error::Sysctl {
        path: path.display().to_string(),
        source,
    })
}

/// Huge pages of `size` a new mapping can get right now: free pages minus
/// those already promised to other mappings' reservations (`resv_hugepages`;
/// a free-but-reserved page faulted by someone else is a SIGBUS). 0 for
/// 4 KiB, which has no pool.
pub fn free_hugepages(size: PageSize) -> u64 {
    let Some(dir) = size.hugetlb_pool() else {
        return 0;
    };
    let free = read_u64(&dir.join("free_hugepages")).unwrap_or(0);
    let resv = read_u64(&dir.join("resv_hugepages")).unwrap_or(0);
    free.saturating_sub(resv)
}

/// Makes sure `count` free huge pages of one size exist, raising
/// `nr_hugepages` if needed; on drop lowers it by what it added.
#[derive(Debug)]
pub struct HugepageReservation {
    size: PageSize,
    added: u64,
    /// Free pages once the reservation was made.
    pub available: u64,
    /// Writes the pool size found back if a signal ends the process first.
    _on_signal: Option<crate::restore::Armed>,
}

impl HugepageReservation {
    /// Reserve up to `count` pages; never fails for a shortfall: look at
    /// `available` (or use [`Self::require`]).
    pub fn reserve(size: PageSize, count: u64) -> Result<Self> {
        let Some(dir) = size.hugetlb_pool() else {
            // 4 KiB pages come from no pool: nothing to reserve.
            return Ok(Self {
                size,
                added: 0,
                available: count,
                _on_signal: None,
            });
        };
        let nr_path = dir.join("nr_hugepages");
        let free = free_hugepages(size);
        if free >= count {
            return Ok(Self {
                size,
                added: 0,
                available: free,
                _on_signal: None,
            });
        }
        if !is_root() {
            return Err(Error::NotRoot {
                what: "reserving hugepages (sysfs nr_hugepages)",
            });
        }
        let nr = read_u64(&nr_path)?;
        let on_signal = crate::restore::arm(&nr_path, &nr.to_string());
        let want = nr + (count - free);
        // A shortfall shows up as fewer pages, not as an error. Gigantic
        // pages need contiguous memory: compact once and retry.
        let _ = write_str(&nr_path, &want.to_string());
        let mut now = read_u64(&nr_path)?;
        if now < want {
            let _ = write_str(&PathBuf::from("/proc/sys/vm/compact_memory"), "1");
            let _ = write_str(&nr_path, &want.to_string());
            now = read_u64(&nr_path)?;
        }
        let added = now.saturating_sub(nr);
        Ok(Self {
            size,
            added,
            available: free_hugepages(size),
            _on_signal: on_signal,
        })
    }

    /// Like [`Self::reserve`] but a shortfall is an error.
    pub fn require(size: PageSize, count: u64) -> Result<Self> {
        let r = Self::reserve(size, count)?;
        if r.available < count {
            return Err(Error::Hugepages {
                size_kib: size.kib(),
                needed: count,
                got: r.available,
            });
        }
        Ok(r)
    }
}

impl Drop for HugepageReservation {
    fn drop(&mut self) {
        if self.added == 0 {
            return;
        }
        let Some(dir) = self.size.hugetlb_pool() else {
            return;
        };
        let nr_path = dir.join("nr_hugepages");
        if let Ok(nr) = read_u64(&nr_path) {
            let _ = write_str(&nr_path, &nr.saturating_sub(self.added).to_string());
        }
    }
}

/// A sysctl set for the guard's lifetime, restored on drop.
#[derive(Debug)]
pub struct SysctlGuard {
    path: PathBuf,
    old: String,
    /// Writes `old` back if a signal ends the process first.
    _on_signal: Option<crate::restore::Armed>,
}

impl SysctlGuard {
    /// `name` in dotted form, e.g. `kernel.numa_balancing`.
    pub fn set(name: &str, value: &str) -> Result<Self> {
        let path = PathBuf::from("/proc/sys").join(name.replace('.', "/"));
        let old = std::fs::read_to_string(&path).map_err(|source| Error::Sysctl {
            path: path.display().to_string(),
            source,
        })?;
        if !is_root() {
            return Err(Error::NotRoot {
                what: "changing sysctls",
            });
        }
        let old = old.trim().to_string();
        let on_signal = crate::restore::arm(&path, &old);
        write_str(&path, value)?;
        Ok(Self {
            path,
            old,
            _on_signal: on_signal,
        })
    }
}

impl Drop for SysctlGuard {
    fn drop(&mut self) {
        let _ = write_str(&self.path, &self.old);
    }
}
