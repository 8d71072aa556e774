//! Workloads that make the kernel act on this process's memory.
//!
//! [`NumaToucher`]: with `kernel.numa_balancing=1`, the kernel's NUMA
//! scanner (`task_numa_work`, run from the task-work of a task that keeps
//! running) changes the protection of this mm's anonymous memory a window at
//! a time, and every change is an mmu_notifier invalidation. The scanner
//! only runs for a task that is busy and touches memory, so the toucher
//! keeps threads writing one byte per 4 KiB page of its regions until it is
//! dropped.

use crate::error::{Error, Result};
use crate::mmap::Mmap;
use crate::subscriber::HvaRange;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// The stride of the touch loop: one byte per 4 KiB page.
pub const TOUCH_STRIDE: u64 = 4096;

/// Threads that read and write one byte per 4 KiB page of some regions, in a
/// loop, until the value is dropped. Dropping it stops and joins the threads
/// before an owned region is unmapped, on every path including unwinding.
#[derive(Debug)]
pub struct NumaToucher {
    stop: Arc<AtomicBool>,
    handles: Vec<JoinHandle<()>>,
    ranges: Arc<[HvaRange]>,
    /// The region of [`NumaToucher::start`]. Fields drop after
    /// `Drop::drop`, so it is unmapped only once the threads are joined.
    owned: Option<Mmap>,
}

impl NumaToucher {
    /// Maps a private anonymous read-write region of `len` bytes of its own
    /// and starts `threads` threads (named `numa-touch-<i>`) touching it.
    pub fn start(len: usize, threads: usize) -> Result<Self> {
        let region = Mmap::anon(len, libc::PROT_READ | libc::PROT_WRITE, 0)?;
        let ranges: Arc<[HvaRange]> = Arc::from([region.range()]);
        Self::spawn(ranges, threads, Some(region))
    }

    /// Starts `threads` threads (named `numa-touch-<i>`) touching `ranges`,
    /// memory the caller owns. Only anonymous memory (4 KiB pages or THP) is
    /// scanned by `task_numa_work`; hugetlb is skipped, but touching it is
    /// harmless.
    ///
    /// # Safety
    ///
    /// Until the returned value is dropped (its drop joins the threads):
    /// - every byte of every range is mapped readable and writable, and
    ///   backed (not a file mapping past the end of its file): nothing
    ///   unmaps, remaps or write-protects it (`munmap`, `mremap`,
    ///   `mprotect`, `UFFDIO_WRITEPROTECT`; discarding it with
    ///   `MADV_DONTNEED` is fine);
    /// - no Rust reference (`&[u8]`, `&mut [u8]`) to those bytes exists: the
    ///   threads read and write them concurrently (each 4096th byte from the
    ///   start of a range is incremented, repeatedly), so the caller must not
    ///   rely on those bytes' contents either.
    ///
    /// Declaring the value after the owner of the memory makes it drop
    /// first on unwinding.
    pub unsafe fn over(ranges: Vec<HvaRange>, threads: usize) -> Result<Self> {
        Self::spawn(Arc::from(ranges), threads, None)
    }

    /// The region [`NumaToucher::start`] mapped (`None` for
    /// [`NumaToucher::over`]).
    pub fn region(&self) -> Option<HvaRange> {
        self.owned.as_ref().map(Mmap::range)
    }

    /// Every range the threads touch.
    pub fn ranges(&self) -> &[HvaRange] {
        &self.ranges
    }

    /// How many threads run.
    pub fn threads(&self) -> usize {
        self.handles.len()
    }

    /// Spawns the threads. On a failed spawn the threads already running
    /// are stopped and joined (the drop of the partly built value) before
    /// the error is returned, and an owned region is unmapped after them.
    fn spawn(ranges: Arc<[HvaRange]>, threads: usize, owned: Option<Mmap>) -> Result<Self> {
        if threads == 0 {
            return Err(Error::Unsupported {
                op: "NumaToucher",
                why: "it needs at least one thread",
            });
        }
        let mut t = NumaToucher {
            stop: Arc::new(AtomicBool::new(false)),
            handles: Vec::with_capacity(threads),
            ranges,
            owned,
        };
        for i in 0..threads {
            let name = format!("numa-touch-{i}");
            let stop = t.stop.clone();
            let ranges = t.ranges.clone();
            let h = std::thread::Builder::new()
                .name(name.clone())
                .spawn(move || touch_until(&ranges, &stop))
                .map_err(|source| Error::Spawn { name, source })?;
            t.handles.push(h);
        }
        Ok(t)
    }
}

/// The thread body: one pass over every range per check of `stop`.
fn touch_until(ranges: &[HvaRange], stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        for r in ranges {
            let mut a = r.start;
            while a < r.end {
                let p = a as *mut u8;
                // SAFETY: `a` lies in `r`, which stays mapped readable and
                // writable, with no Rust reference into it, until this
                // thread is joined: the contract of `NumaToucher::over`, or
                // for `start` the `Mmap` owned by the `NumaToucher`, which
                // is unmapped only after `Drop` joined this thread. Volatile:
                // the accesses are the point, they must not be elided.
                unsafe { p.write_volatile(p.read_volatile().wrapping_add(1)) };
                a += TOUCH_STRIDE;
            }
        }
    }
}

impl Drop for NumaToucher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for h in self.handles.drain(..) {
            // A thread that panicked has stopped touching too.
            let _ = h.join();
        }
        // `owned` (if any) is unmapped when the fields drop, after this.
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pagemap::Pagemap;
    use std::time::{Duration, Instant};

    /// Waits until every page of `r` is populated (the threads touched it).
    fn wait_populated(r: HvaRange) {
        let mut pm = Pagemap::open().unwrap();
        let t0 = Instant::now();
        while pm.present(r).unwrap() != vec![r] {
            assert!(t0.elapsed() < Duration::from_secs(20), "never touched");
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn thread_names() -> Vec<String> {
        std::fs::read_dir("/proc/self/task")
            .unwrap()
            .filter_map(|e| std::fs::read_to_string(e.ok()?.path().join("comm")).ok())
            .map(|s| s.trim().to_string())
            .collect()
    }

    #[test]
    fn owned_region_is_touched_by_named_threads() {
        let t = NumaToucher::start(1 << 20, 2).unwrap();
        let r = t.region().unwrap();
        assert_eq!(t.ranges(), &[r]);
        assert_eq!(t.threads(), 2);
        wait_populated(r);
        // A thread takes its name when it first runs (std sets it from the
        // new thread): on a busy machine one may not have run yet.
        let t0 = Instant::now();
        let mut names = thread_names();
        while !["numa-touch-0", "numa-touch-1"]
            .iter()
            .all(|want| names.iter().any(|n| n == want))
        {
            assert!(t0.elapsed() < Duration::from_secs(20), "{names:?}");
            std::thread::sleep(Duration::from_millis(5));
            names = thread_names();
        }
        drop(t);
    }

    #[test]
    fn caller_owned_regions() {
        let rw = libc::PROT_READ | libc::PROT_WRITE;
        let a = Mmap::anon(64 * 4096, rw, 0).unwrap();
        let b = Mmap::anon(32 * 4096, rw, 0).unwrap();
        // SAFETY: `a` and `b` are read-write anonymous mappings that outlive
        // `t` (declared before it, dropped after it) and nothing else
        // accesses.
        let t = unsafe { NumaToucher::over(vec![a.range(), b.range()], 1) }.unwrap();
        assert_eq!(t.region(), None);
        wait_populated(a.range());
        wait_populated(b.range());
        drop(t);
        // Joined: the counters stay where they are.
        // SAFETY: readable, anonymous, and the toucher's threads are joined.
        let before = unsafe { a.as_slice() }[0];
        std::thread::sleep(Duration::from_millis(20));
        // SAFETY: as above.
        assert_eq!(unsafe { a.as_slice() }[0], before);
    }

    #[test]
    fn zero_threads_is_an_error() {
        assert!(matches!(
            NumaToucher::start(4096, 0),
            Err(Error::Unsupported { .. })
        ));
    }
}
