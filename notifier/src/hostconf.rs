//! Host settings a check or test changes temporarily, restored on drop (also
//! when unwinding from a panic, on SIGINT/SIGTERM/SIGHUP through
//! [`crate::restore`], and after a SIGKILL by the next vmm through
//! [`crate::hoststate`]): hugetlb pool sizes and sysctls such as
//! `kernel.numa_balancing`, shared between concurrent vmm processes.

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
/// `nr_hugepages` if needed; on drop lowers it by what it added - relative
/// to the pool size then, so pages another process added meanwhile stay.
/// The pages added are recorded in this process's state file
/// ([`crate::hoststate`]) before the pool grows, and given back on a fatal
/// signal ([`crate::restore`]) or, after a SIGKILL, by the next vmm.
#[derive(Debug)]
pub struct HugepageReservation {
    size: PageSize,
    added: u64,
    /// Free pages once the reservation was made.
    pub available: u64,
    /// The [`crate::hoststate`] record of the pages added.
    record: Option<u64>,
    /// Lowers the pool by `added` if a signal ends the process first.
    _on_signal: Option<crate::restore::Armed>,
}

impl HugepageReservation {
    fn none(size: PageSize, available: u64) -> Self {
        Self {
            size,
            added: 0,
            available,
            record: None,
            _on_signal: None,
        }
    }

    /// Reserve up to `count` pages; never fails for a shortfall: look at
    /// `available` (or use [`Self::require`]).
    pub fn reserve(size: PageSize, count: u64) -> Result<Self> {
        let Some(dir) = size.hugetlb_pool() else {
            // 4 KiB pages come from no pool: nothing to reserve.
            return Ok(Self::none(size, count));
        };
        let nr_path = dir.join("nr_hugepages");
        pool_exists(size, &dir)?;
        let free = free_hugepages(size);
        if free >= count {
            return Ok(Self::none(size, free));
        }
        if !is_root() {
            return Err(Error::NotRoot {
                what: "reserving hugepages (sysfs nr_hugepages)",
            });
        }
        // One vmm at a time reads and grows a pool (the record, the write
        // and the read-back agree).
        let mut sec = crate::hoststate::section()?;
        let free = free_hugepages(size);
        if free >= count {
            return Ok(Self::none(size, free));
        }
        let nr = read_u64(&nr_path)?;
        let want = nr + (count - free);
        let path = nr_path.to_string_lossy().into_owned();
        // Recorded before the write: a SIGKILL between the two gives back
        // what was asked for.
        let id = sec.add(crate::hoststate::Entry::Pool {
            path: path.clone(),
            added: want - nr,
        })?;
        let on_signal = crate::restore::arm_pool(&nr_path, want - nr);
        // A shortfall shows up as fewer pages, not as an error. Gigantic
        // pages need contiguous memory: compact once and retry.
        let wrote = write_str(&nr_path, &want.to_string()).is_ok();
        let mut now = if wrote {
            read_u64(&nr_path).unwrap_or(want)
        } else {
            nr
        };
        if now < want {
            let _ = write_str(&PathBuf::from("/proc/sys/vm/compact_memory"), "1");
            if write_str(&nr_path, &want.to_string()).is_ok() {
                now = read_u64(&nr_path).unwrap_or(want);
            }
        }
        let added = now.saturating_sub(nr);
        let mut me = Self {
            size,
            added,
            available: 0,
            record: Some(id),
            _on_signal: on_signal,
        };
        if let Some(a) = &me._on_signal {
            a.set_count(added);
        }
        // Errors rewriting the record are not the reservation's: the
        // record keeps the pages asked for. (No `?` while `me` lives: its
        // drop would enter a second section on this thread.)
        if added == 0 {
            me._on_signal = None;
            me.record = None;
            let _ = sec.remove(id);
        } else {
            let _ = sec.update(id, crate::hoststate::Entry::Pool { path, added });
        }
        drop(sec);
        me.available = free_hugepages(size);
        Ok(me)
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

    /// Pages this reservation added to the pool.
    pub fn added(&self) -> u64 {
        self.added
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
        let sec = crate::hoststate::section();
        self._on_signal = None;
        let nr_path = dir.join("nr_hugepages");
        if let Ok(nr) = read_u64(&nr_path) {
            let _ = write_str(&nr_path, &nr.saturating_sub(self.added).to_string());
        }
        if let (Ok(mut sec), Some(id)) = (sec, self.record.take()) {
            let _ = sec.remove(id);
        }
    }
}

/// A sysctl set for the guard's lifetime, restored on drop - shared with
/// other vmm processes ([`crate::hoststate`]): the value it had before the
/// first of them changed it comes back when the last one is done, also on
/// a fatal signal ([`crate::restore`]) and, after a SIGKILL, from the next
/// vmm's start.
#[derive(Debug)]
pub struct SysctlGuard {
    hold: Option<crate::hoststate::SysctlHold>,
}

impl SysctlGuard {
    /// `name` in dotted form, e.g. `kernel.numa_balancing`.
    pub fn set(name: &str, value: &str) -> Result<Self> {
        let path = PathBuf::from("/proc/sys").join(name.replace('.', "/"));
        std::fs::read_to_string(&path).map_err(|source| Error::Sysctl {
            path: path.display().to_string(),
            source,
        })?;
        if !is_root() {
            return Err(Error::NotRoot {
                what: "changing sysctls",
            });
        }
        Ok(Self {
            hold: Some(crate::hoststate::SysctlHold::set(&path, value)?),
        })
    }

    /// The value the sysctl had before any vmm changed it (what comes back).
    pub fn original(&self) -> &str {
        self.hold.as_ref().map_or("", |h| h.original.as_str())
    }
}

impl Drop for SysctlGuard {
    fn drop(&mut self) {
        if let Some(h) = self.hold.take() {
            h.release();
        }
    }
}

/// A pool the kernel does not have is its own error, not a sysfs read
/// error on a path that does not exist.
fn pool_exists(size: PageSize, dir: &std::path::Path) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    Err(Error::NoPool {
        size_kib: size.kib(),
        dir: dir.display().to_string(),
    })
}

#[cfg(test)]
mod pool_tests {
    use super::*;

    #[test]
    fn a_missing_pool_says_so() {
        let e = pool_exists(
            PageSize::Size1G,
            std::path::Path::new("/nonexistent/hugepages-1048576kB"),
        )
        .unwrap_err();
        assert!(
            matches!(
                e,
                Error::NoPool {
                    size_kib: 1048576,
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("pdpe1gb"), "{e}");
        if let Some(dir) = PageSize::Size2M.hugetlb_pool().filter(|d| d.is_dir()) {
            assert!(pool_exists(PageSize::Size2M, &dir).is_ok());
        }
    }
}
