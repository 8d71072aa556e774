//! The kernel plane's L1 memory (`--backing`) and the host invalidations of
//! it (`--kinds`): one `MAP_NORESERVE` mapping of any
//! [`notifier::hostmm::Backing`] - anonymous (4 KiB pages: `MADV_NOHUGEPAGE`),
//! THP (`MADV_HUGEPAGE`), private hugetlb, or a memfd mapped shared (shmem
//! for 4 KiB, hugetlbfs for 2M/1G) - and what the host does to a prefix of
//! it: `dontneed`, `mprotect` (read-only and back), `munmap` (and the same
//! mapping again, in place), and on a memfd `punch-hole`
//! (`fallocate(PUNCH_HOLE)`) and `remove` (`madvise(MADV_REMOVE)`).

use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};

use notifier::hostmm::Backing;
use notifier::{Mmap, PageSize};

/// A host invalidation of the L1's memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum KernelInval {
    Dontneed,
    /// Read-only and back, both measured.
    Mprotect,
    /// Only the read-only call measured (made writable again after).
    MprotectRo,
    /// Only the call back to read-write measured (made read-only before):
    /// it meets the rmaps the first call emptied.
    MprotectRw,
    Munmap,
    PunchHole,
    Remove,
    /// A 3 s window of `kernel.numa_balancing=1` (restored after) over the
    /// whole L1: the NUMA scanner's own ranges (run by the kernel plane,
    /// not a syscall on the memory).
    NumaHint,
}

impl KernelInval {
    pub fn name(self) -> &'static str {
        match self {
            KernelInval::Dontneed => "dontneed",
            KernelInval::Mprotect => "mprotect",
            KernelInval::MprotectRo => "mprotect-ro",
            KernelInval::MprotectRw => "mprotect-rw",
            KernelInval::Munmap => "munmap",
            KernelInval::PunchHole => "punch-hole",
            KernelInval::Remove => "remove",
            KernelInval::NumaHint => "numa-hint",
        }
    }

    /// Whether it needs a file (a memfd) behind the memory.
    pub fn needs_file(self) -> bool {
        matches!(self, KernelInval::PunchHole | KernelInval::Remove)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum L1RamError {
    #[error("{op} of the L1's memory failed: {source}")]
    Syscall {
        op: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Map(#[from] notifier::Error),
}

fn os(op: &'static str) -> L1RamError {
    L1RamError::Syscall {
        op,
        source: std::io::Error::last_os_error(),
    }
}

const RW: i32 = libc::PROT_READ | libc::PROT_WRITE;

/// The L1's memory.
pub struct L1Ram {
    map: Mmap,
    backing: Backing,
    /// The memfd of a shared backing.
    fd: Option<OwnedFd>,
}

impl L1Ram {
    /// `len` bytes (a multiple of the backing's page size: the caller
    /// checks) of `backing`, `MAP_NORESERVE`.
    pub fn new(backing: Backing, len: u64) -> Result<Self, L1RamError> {
        let n = notifier::convert::u64_to_usize(len);
        let (map, fd) = match backing {
            Backing::Anon { .. } => (Mmap::anon(n, RW, libc::MAP_NORESERVE)?, None),
            Backing::PrivateHugetlb(p) => (
                Mmap::anon(
                    n,
                    RW,
                    libc::MAP_NORESERVE | libc::MAP_HUGETLB | p.huge_flag(),
                )?,
                None,
            ),
            Backing::SharedMemfd(p) => {
                let fd = memfd(p, len)?;
                (
                    Mmap::shared(fd.as_fd(), n, RW, libc::MAP_NORESERVE)?,
                    Some(fd),
                )
            }
        };
        let ram = L1Ram { map, backing, fd };
        ram.advise_thp(ram.addr(), len)?;
        Ok(ram)
    }

    pub fn addr(&self) -> u64 {
        self.map.addr()
    }

    pub fn len(&self) -> u64 {
        self.map.len() as u64
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    pub fn backing(&self) -> Backing {
        self.backing
    }

    /// Anonymous memory: `MADV_NOHUGEPAGE` (a populating guest's writes
    /// stay 4 KiB host pages: THP would make each a 2 MiB page and a 2 MiB
    /// SPTE, leaving the 4 KiB rmap level empty - PLATFORM.md's trap - at
    /// 512 times the memory) or, for `thp`, `MADV_HUGEPAGE`.
    fn advise_thp(&self, hva: u64, len: u64) -> Result<(), L1RamError> {
        let Backing::Anon { thp } = self.backing else {
            return Ok(());
        };
        let advice = if thp {
            libc::MADV_HUGEPAGE
        } else {
            libc::MADV_NOHUGEPAGE
        };
        // SAFETY: advice only, over a range of the L1 mapping.
        let r = unsafe { libc::madvise(hva as *mut libc::c_void, to_usize(len), advice) };
        if r != 0 {
            return Err(os("madvise(MADV_(NO)HUGEPAGE)"));
        }
        Ok(())
    }

    /// What `kind` needs done, unmeasured, before it runs: the read-only
    /// call of [`KernelInval::MprotectRw`].
    pub fn prepare(&self, kind: KernelInval, len: u64) -> Result<(), L1RamError> {
        match kind {
            KernelInval::MprotectRw => self.protect(len, libc::PROT_READ),
            _ => Ok(()),
        }
    }

    /// What `kind` leaves to undo, unmeasured, after it ran: the call back
    /// to read-write of [`KernelInval::MprotectRo`].
    pub fn finish(&self, kind: KernelInval, len: u64) -> Result<(), L1RamError> {
        match kind {
            KernelInval::MprotectRo => self.protect(len, RW),
            _ => Ok(()),
        }
    }

    fn protect(&self, len: u64, prot: i32) -> Result<(), L1RamError> {
        // SAFETY: the range is inside the L1 mapping, which no Rust
        // reference points into; the protection ends as it was created.
        if unsafe { libc::mprotect(self.addr() as *mut libc::c_void, to_usize(len), prot) } != 0 {
            return Err(os(if prot == RW {
                "mprotect(PROT_READ|PROT_WRITE)"
            } else {
                "mprotect(PROT_READ)"
            }));
        }
        Ok(())
    }

    /// Runs `kind` over the first `len` bytes (a multiple of the page size),
    /// between [`Self::prepare`] and [`Self::finish`].
    pub fn invalidate(&self, kind: KernelInval, len: u64) -> Result<(), L1RamError> {
        let hva = self.addr();
        let ptr = hva as *mut libc::c_void;
        let n = to_usize(len);
        let madvise = |advice, op| {
            // SAFETY: the range is inside the L1 mapping, which no Rust
            // reference points into; dropping its pages is what we want.
            if unsafe { libc::madvise(ptr, n, advice) } != 0 {
                return Err(os(op));
            }
            Ok(())
        };
        match kind {
            KernelInval::Dontneed => madvise(libc::MADV_DONTNEED, "madvise(MADV_DONTNEED)")?,
            KernelInval::Remove => {
                self.file(kind)?;
                madvise(libc::MADV_REMOVE, "madvise(MADV_REMOVE)")?;
            }
            KernelInval::PunchHole => {
                let fd = self.file(kind)?;
                let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                let l = libc::off_t::try_from(len).unwrap_or(libc::off_t::MAX);
                // SAFETY: a plain syscall on our memfd.
                if unsafe { libc::fallocate(fd, mode, 0, l) } != 0 {
                    return Err(os("fallocate(PUNCH_HOLE)"));
                }
            }
            KernelInval::Mprotect => {
                self.protect(len, libc::PROT_READ)?;
                self.protect(len, RW)?;
            }
            KernelInval::MprotectRo => self.protect(len, libc::PROT_READ)?,
            KernelInval::MprotectRw => self.protect(len, RW)?,
            KernelInval::NumaHint => {
                return Err(L1RamError::Syscall {
                    op: "numa-hint (a window, not a syscall on the memory)",
                    source: std::io::Error::from_raw_os_error(libc::EINVAL),
                })
            }
            KernelInval::Munmap => {
                // SAFETY: the range is inside the L1 mapping and is mapped
                // again at once with the flags it was created with, so the
                // `Mmap` that owns it finds it mapped when it unmaps it.
                if unsafe { libc::munmap(ptr, n) } != 0 {
                    return Err(os("munmap"));
                }
                self.map_again(hva, len)?;
            }
        }
        Ok(())
    }

    /// The memfd `kind` works on (refused for memory without one before
    /// the run: [`KernelInval::needs_file`]).
    fn file(&self, kind: KernelInval) -> Result<i32, L1RamError> {
        self.fd
            .as_ref()
            .map(|f| f.as_raw_fd())
            .ok_or_else(|| L1RamError::Syscall {
                op: kind.name(),
                source: std::io::Error::from_raw_os_error(libc::EBADF),
            })
    }

    /// The hole `munmap` left at the start, mapped again as created.
    fn map_again(&self, hva: u64, len: u64) -> Result<(), L1RamError> {
        let ptr = hva as *mut libc::c_void;
        let fixed = libc::MAP_NORESERVE | libc::MAP_FIXED;
        let (flags, fd) = match self.backing {
            Backing::Anon { .. } => (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | fixed, -1),
            Backing::PrivateHugetlb(p) => (
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB | p.huge_flag() | fixed,
                -1,
            ),
            Backing::SharedMemfd(_) => (libc::MAP_SHARED | fixed, self.file(KernelInval::Munmap)?),
        };
        // SAFETY: MAP_FIXED over the hole just made, nothing else can have
        // been placed there by us; the file offset is the hole's (0). On
        // failure the run stops with the error and the hole is never
        // touched.
        let p = unsafe { libc::mmap(ptr, to_usize(len), RW, flags, fd, 0) };
        if p == libc::MAP_FAILED {
            return Err(os("mmap(MAP_FIXED) after munmap"));
        }
        self.advise_thp(hva, len)
    }
}

fn to_usize(n: u64) -> usize {
    notifier::convert::u64_to_usize(n)
}

/// A memfd of `len` bytes with pages of `page` (hugetlbfs for huge sizes).
fn memfd(page: PageSize, len: u64) -> Result<OwnedFd, L1RamError> {
    // SAFETY: a NUL-terminated name and valid flags.
    let fd = unsafe { libc::memfd_create(c"vmm-soft-lockup-l1".as_ptr(), page.memfd_flags()) };
    if fd < 0 {
        return Err(os("memfd_create"));
    }
    // SAFETY: fd was just returned by memfd_create and is owned by nobody else.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let l = libc::off_t::try_from(len).unwrap_or(libc::off_t::MAX);
    // SAFETY: a plain syscall on the memfd we own.
    if unsafe { libc::ftruncate(fd.as_raw_fd(), l) } != 0 {
        return Err(os("ftruncate(memfd)"));
    }
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn first_byte(ram: &L1Ram) -> u8 {
        // SAFETY: the mapping is readable and at least one page long.
        unsafe { std::ptr::read_volatile(ram.addr() as *const u8) }
    }

    fn write_first(ram: &L1Ram, v: u8) {
        // SAFETY: as above, and writable; no Rust reference points into it.
        unsafe { std::ptr::write_volatile(ram.addr() as *mut u8, v) }
    }

    #[test]
    fn every_kind_drops_the_data_and_leaves_the_memory_usable() {
        let ram = L1Ram::new(Backing::SharedMemfd(PageSize::Size4K), 1 << 20).unwrap();
        for kind in [
            KernelInval::Dontneed,
            KernelInval::Munmap,
            KernelInval::PunchHole,
            KernelInval::Remove,
        ] {
            write_first(&ram, 7);
            ram.invalidate(kind, 64 << 10).unwrap();
            // Shared memory keeps its data through DONTNEED and munmap (the
            // page cache holds it); punching and removing free it.
            let want = if kind.needs_file() { 0 } else { 7 };
            assert_eq!(first_byte(&ram), want, "{kind:?}");
        }
        ram.invalidate(KernelInval::Mprotect, 1 << 20).unwrap();
        write_first(&ram, 1);
        for kind in [KernelInval::MprotectRo, KernelInval::MprotectRw] {
            ram.prepare(kind, 1 << 20).unwrap();
            ram.invalidate(kind, 1 << 20).unwrap();
            ram.finish(kind, 1 << 20).unwrap();
            // Writable again either way.
            write_first(&ram, 2);
        }
        let anon = L1Ram::new(Backing::Anon { thp: false }, 1 << 20).unwrap();
        write_first(&anon, 9);
        anon.invalidate(KernelInval::Munmap, 1 << 20).unwrap();
        assert_eq!(first_byte(&anon), 0);
        let e = anon.invalidate(KernelInval::PunchHole, 4096).unwrap_err();
        assert!(e.to_string().contains("punch-hole"), "{e}");
    }
}
