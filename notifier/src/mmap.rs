//! One owned raw memory mapping for the workspace: `mmap(2)` at a
//! kernel-chosen address, `munmap(2)` on drop.
//!
//! [`Mmap`] owns exactly the address range `[addr, addr + len)`: nothing
//! else in the process maps, unmaps or remaps it while the value lives (a
//! caller that does so through a raw pointer takes that on itself). The safe
//! constructors never pass `MAP_FIXED`, so they cannot replace a mapping
//! somebody else owns; [`Mmap::map_fixed_anon`] / [`Mmap::map_fixed_shared`]
//! replace part of the range this value owns (`&mut self`), and
//! [`Mmap::keep`] trims it. [`Mmap::into_raw`] hands the range to a caller
//! that keeps its own bookkeeping (`HostMm`).
//!
//! Hugetlb mappings: the kernel rounds the length of a hugetlb mapping up to
//! the huge page size, and an unaligned `munmap` of one fails; so a hugetlb
//! length (and address, for the `map_fixed_*` methods) must be a multiple of
//! the huge page size, and `MAP_HUGETLB` needs an explicit `MAP_HUGE_*` size.
//! A file descriptor on hugetlbfs (an `MFD_HUGETLB` memfd) is recognised by
//! `fstatfs`; its page size is its `st_blksize`.

use crate::convert::usize_to_u64;
use crate::error::{Error, Result};
use crate::subscriber::HvaRange;
use std::os::fd::{AsRawFd, BorrowedFd};

/// The `MAP_*` flags the constructors accept on top of the mapping type:
/// `MAP_POPULATE`, `MAP_NORESERVE`, `MAP_HUGETLB` with its `MAP_HUGE_*` size
/// bits, `MAP_LOCKED`, `MAP_NONBLOCK`, `MAP_STACK`. Anything else (above all
/// `MAP_FIXED` / `MAP_FIXED_NOREPLACE`, which would let a constructor replace
/// memory it does not own, and the type bits `MAP_SHARED` / `MAP_PRIVATE`,
/// which the constructor chooses) is refused with [`Error::Unsupported`].
pub const EXTRA_FLAGS: i32 = libc::MAP_POPULATE
    | libc::MAP_NORESERVE
    | libc::MAP_HUGETLB
    | (libc::MAP_HUGE_MASK << libc::MAP_HUGE_SHIFT)
    | libc::MAP_LOCKED
    | libc::MAP_NONBLOCK
    | libc::MAP_STACK;

/// An owned memory mapping, unmapped on drop.
#[derive(Debug)]
pub struct Mmap {
    /// Invariant: `[addr, addr + len)` is mapped and owned by this value
    /// alone; `len > 0`.
    addr: u64,
    len: usize,
}

/// What a new mapping maps.
#[derive(Clone, Copy)]
enum Source<'fd> {
    Anon,
    Shared(BorrowedFd<'fd>),
}

impl Mmap {
    /// A private anonymous mapping of `len` bytes with protection `prot`
    /// (`PROT_*`) and the extra `flags` of [`EXTRA_FLAGS`] (e.g.
    /// `MAP_POPULATE`, `MAP_NORESERVE`), at a kernel-chosen address.
    pub fn anon(len: usize, prot: i32, flags: i32) -> Result<Self> {
        Self::check_flags("Mmap::anon", flags)?;
        Self::check_huge("Mmap::anon", Source::Anon, flags, 0, len)?;
        Self::map_raw(
            "mmap(MAP_PRIVATE|MAP_ANONYMOUS)",
            0,
            len,
            prot,
            flags,
            Source::Anon,
        )
    }

    /// A `MAP_SHARED` mapping of the first `len` bytes (offset 0) of the
    /// file behind `fd`, with protection `prot` and the extra `flags` of
    /// [`EXTRA_FLAGS`], at a kernel-chosen address. The mapping keeps the
    /// file alive; `fd` may be closed afterwards. Pages past the end of the
    /// file raise `SIGBUS` when touched.
    pub fn shared(fd: BorrowedFd<'_>, len: usize, prot: i32, flags: i32) -> Result<Self> {
        let src = Source::Shared(fd);
        Self::check_flags("Mmap::shared", flags)?;
        Self::check_huge("Mmap::shared", src, flags, 0, len)?;
        Self::map_raw("mmap(MAP_SHARED)", 0, len, prot, flags, src)
    }

    /// `len` bytes of `PROT_NONE` address space (`MAP_NORESERVE`, no memory
    /// committed): a placement to carve mappings from with the `map_fixed_*`
    /// methods and [`Mmap::keep`], or a target for `mremap`.
    pub fn reserve(len: usize) -> Result<Self> {
        Self::map_raw(
            "mmap(reserve)",
            0,
            len,
            libc::PROT_NONE,
            libc::MAP_NORESERVE,
            Source::Anon,
        )
    }

    /// Start address.
    pub fn addr(&self) -> u64 {
        self.addr
    }

    /// Length in bytes (never 0).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: a mapping has at least one page (for clippy's
    /// `len_without_is_empty`).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// `[addr, addr + len)`.
    pub fn range(&self) -> HvaRange {
        HvaRange::new(self.addr, self.addr + usize_to_u64(self.len))
    }

    /// The start as a raw pointer. Accessing memory through it is the
    /// caller's `unsafe`: it must respect the mapping's protection and end,
    /// and must not outlive this value.
    pub fn as_ptr(&self) -> *mut u8 {
        self.addr as *mut u8
    }

    /// The mapped bytes as a slice.
    ///
    /// # Safety
    ///
    /// The mapping must be readable (`PROT_READ`), every page of it must be
    /// backed (a file mapping must not extend past the end of the file), and
    /// nothing may write these bytes while the slice lives: not this process
    /// through a raw pointer or another mapping of the same file, not another
    /// process sharing the file, not the kernel on its behalf (e.g.
    /// `UFFDIO_COPY`, `read(2)` into it).
    pub unsafe fn as_slice(&self) -> &[u8] {
        // SAFETY: `[addr, addr + len)` is mapped for as long as `self` lives
        // (type invariant) and the borrow of `self` keeps it from being
        // dropped, trimmed or replaced (`&mut self` methods) meanwhile; the
        // caller guarantees it is readable, backed and not written.
        unsafe { std::slice::from_raw_parts(self.as_ptr(), self.len) }
    }

    /// Give up ownership: the range stays mapped and is returned; unmapping
    /// it is now the caller's job.
    pub fn into_raw(self) -> HvaRange {
        let r = self.range();
        std::mem::forget(self);
        r
    }

    /// Replace `[addr + offset, addr + offset + len)` of this mapping with a
    /// fresh private anonymous mapping (`MAP_FIXED`) with `prot` and the
    /// extra `flags` of [`EXTRA_FLAGS`]. On error the range is unchanged (the
    /// kernel checks before it replaces) and still owned by `self`.
    pub fn map_fixed_anon(
        &mut self,
        offset: usize,
        len: usize,
        prot: i32,
        flags: i32,
    ) -> Result<()> {
        self.map_fixed(offset, len, prot, flags, Source::Anon)
    }

    /// Replace `[addr + offset, addr + offset + len)` of this mapping with a
    /// `MAP_SHARED` mapping of the file behind `fd` from file offset 0
    /// (`MAP_FIXED`), with `prot` and the extra `flags` of [`EXTRA_FLAGS`].
    pub fn map_fixed_shared(
        &mut self,
        offset: usize,
        len: usize,
        fd: BorrowedFd<'_>,
        prot: i32,
        flags: i32,
    ) -> Result<()> {
        self.map_fixed(offset, len, prot, flags, Source::Shared(fd))
    }

    /// Keep `[addr + offset, addr + offset + len)` and unmap the rest. On
    /// error `self` is dropped: what it still owned is unmapped, a part
    /// already given up is not touched again.
    pub fn keep(mut self, offset: usize, len: usize) -> Result<Self> {
        self.sub_range("Mmap::keep", offset, len)?;
        if offset > 0 {
            // SAFETY: `[addr, addr + offset)` is the head of the range this
            // value owns; no reference into it exists (we hold `self` by
            // value).
            if unsafe { libc::munmap(self.as_ptr().cast(), offset) } != 0 {
                return Err(Error::last_os("munmap(Mmap::keep head)"));
            }
            // The head is gone: from here `self` owns only the rest, so an
            // error below never unmaps the head again (another thread may
            // have mapped something there meanwhile).
            self.addr += usize_to_u64(offset);
            self.len -= offset;
        }
        let tail = self.len - len;
        if tail > 0 {
            // SAFETY: `[addr + len, addr + len + tail)` is the tail of the
            // range this value owns; no reference into it exists.
            if unsafe { libc::munmap(self.as_ptr().wrapping_add(len).cast(), tail) } != 0 {
                return Err(Error::last_os("munmap(Mmap::keep tail)"));
            }
            self.len = len;
        }
        Ok(self)
    }

    fn map_fixed(
        &mut self,
        offset: usize,
        len: usize,
        prot: i32,
        flags: i32,
        src: Source<'_>,
    ) -> Result<()> {
        const OP: &str = "Mmap::map_fixed";
        Self::check_flags(OP, flags)?;
        self.sub_range(OP, offset, len)?;
        let at = self.addr + usize_to_u64(offset);
        Self::check_huge(OP, src, flags, at, len)?;
        let m = Self::map_raw(
            "mmap(MAP_FIXED)",
            at,
            len,
            prot,
            flags | libc::MAP_FIXED,
            src,
        )?;
        // The new mapping lies inside `self`'s range, which keeps owning
        // (and will unmap) it.
        std::mem::forget(m);
        Ok(())
    }

    /// Checks that `[offset, offset + len)` is a non-empty part of this
    /// mapping.
    fn sub_range(&self, op: &'static str, offset: usize, len: usize) -> Result<()> {
        match offset.checked_add(len) {
            Some(end) if len > 0 && end <= self.len => Ok(()),
            _ => Err(Error::OutOfRegion {
                op,
                start: self.addr.saturating_add(usize_to_u64(offset)),
                end: self
                    .addr
                    .saturating_add(usize_to_u64(offset))
                    .saturating_add(usize_to_u64(len)),
            }),
        }
    }

    fn check_flags(op: &'static str, flags: i32) -> Result<()> {
        if flags & !EXTRA_FLAGS != 0 {
            return Err(Error::Unsupported {
                op,
                why: "only MAP_POPULATE, MAP_NORESERVE, MAP_HUGETLB (+ MAP_HUGE_*), MAP_LOCKED, \
                      MAP_NONBLOCK and MAP_STACK may be added (never MAP_FIXED or a mapping type)",
            });
        }
        Ok(())
    }

    /// If the kernel would round this mapping to a huge page size (a
    /// `MAP_HUGETLB` or hugetlbfs mapping), checks that `addr` (0: the
    /// kernel's choice) and `len` are multiples of it: a rounded length
    /// would make a `MAP_FIXED` replace more than asked, and the drop's
    /// `munmap` fail.
    fn check_huge(
        op: &'static str,
        src: Source<'_>,
        flags: i32,
        addr: u64,
        len: usize,
    ) -> Result<()> {
        let page = match src {
            Source::Anon if flags & libc::MAP_HUGETLB != 0 => {
                let shift = (flags >> libc::MAP_HUGE_SHIFT) & libc::MAP_HUGE_MASK;
                if shift == 0 {
                    return Err(Error::Unsupported {
                        op,
                        why: "MAP_HUGETLB needs an explicit MAP_HUGE_2MB or MAP_HUGE_1GB size",
                    });
                }
                1u64 << shift
            }
            Source::Anon => return Ok(()),
            Source::Shared(fd) => match hugetlbfs_page_size(fd)? {
                Some(page) => page,
                None => return Ok(()),
            },
        };
        let len = usize_to_u64(len);
        if !addr.is_multiple_of(page) || !len.is_multiple_of(page) {
            return Err(Error::Unaligned {
                op,
                start: addr,
                end: addr.saturating_add(len),
                align: page,
            });
        }
        Ok(())
    }

    /// The one `mmap` call. `addr` is 0 (kernel's choice) unless `flags`
    /// has `MAP_FIXED`, in which case the callers guarantee that
    /// `[addr, addr + len)` lies inside a mapping they own exclusively.
    fn map_raw(
        op: &'static str,
        addr: u64,
        len: usize,
        prot: i32,
        flags: i32,
        src: Source<'_>,
    ) -> Result<Self> {
        let (kind, fd) = match src {
            Source::Anon => (libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1),
            Source::Shared(fd) => (libc::MAP_SHARED, fd.as_raw_fd()),
        };
        // SAFETY: without MAP_FIXED the kernel picks an address that
        // overlaps no existing mapping, so nothing of this process is
        // replaced; with MAP_FIXED (only from `map_fixed`) the range lies
        // inside the mapping `&mut self` owns exclusively, checked by
        // `sub_range`, and no reference into it exists while `&mut self`
        // is held. `fd` is -1 or a descriptor borrowed for the call. No
        // memory of ours is passed to the kernel.
        let p = unsafe { libc::mmap(addr as *mut libc::c_void, len, prot, kind | flags, fd, 0) };
        if p == libc::MAP_FAILED {
            return Err(Error::last_os(op));
        }
        Ok(Mmap {
            addr: p as u64,
            len,
        })
    }
}

/// The huge page size of the file behind `fd` if it is on hugetlbfs.
fn hugetlbfs_page_size(fd: BorrowedFd<'_>) -> Result<Option<u64>> {
    // SAFETY: `statfs` is plain old data: all-zero is a valid value.
    let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs writes one `struct statfs` into `fs`, which lives
    // across the call; `fd` is borrowed, so open.
    if unsafe { libc::fstatfs(fd.as_raw_fd(), &mut fs) } != 0 {
        return Err(Error::last_os("fstatfs"));
    }
    if fs.f_type != libc::HUGETLBFS_MAGIC {
        return Ok(None);
    }
    // SAFETY: as above, for `struct stat`.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat writes one `struct stat` into `st`, alive across the call.
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } != 0 {
        return Err(Error::last_os("fstat"));
    }
    // hugetlbfs reports its huge page size as the block size.
    u64::try_from(st.st_blksize)
        .ok()
        .filter(|b| b.is_power_of_two())
        .map(Some)
        .ok_or(Error::Unsupported {
            op: "fstat",
            why: "hugetlbfs reported a block size that is not a power of two",
        })
}

impl Drop for Mmap {
    fn drop(&mut self) {
        // SAFETY: `[addr, addr + len)` is mapped and owned by this value
        // alone (type invariant; `into_raw` forgets the value instead), and
        // no reference into it outlives `self` (`as_slice` borrows it). A
        // failure (only possible if somebody broke the invariant through a
        // raw pointer) leaves the range mapped: a leak, nothing unsound.
        unsafe { libc::munmap(self.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pagemap::Pagemap;
    use std::os::fd::{AsFd, FromRawFd, OwnedFd};

    const PS: usize = 4096;
    const RW: i32 = libc::PROT_READ | libc::PROT_WRITE;

    /// A 4-page memfd called `name` (its mappings show in /proc/self/maps
    /// under that name, which no other test uses: a robust way to see them
    /// while other tests map and unmap memory in parallel).
    fn memfd(name: &std::ffi::CStr) -> OwnedFd {
        // SAFETY: valid NUL-terminated name; plain flags.
        let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: fresh descriptor owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: ftruncate on our own memfd.
        assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), 4 * 4096) }, 0);
        fd
    }

    /// The VMAs mapping the memfd called `name`.
    fn maps_of(name: &str) -> Vec<HvaRange> {
        let needle = format!("/memfd:{name} ");
        std::fs::read_to_string("/proc/self/maps")
            .unwrap()
            .lines()
            .filter(|l| l.contains(&needle))
            .filter_map(|l| {
                let (a, b) = l.split_whitespace().next()?.split_once('-')?;
                Some(HvaRange::new(
                    u64::from_str_radix(a, 16).ok()?,
                    u64::from_str_radix(b, 16).ok()?,
                ))
            })
            .collect()
    }

    #[test]
    fn anon_read_write() {
        let m = Mmap::anon(16 * PS, RW, 0).unwrap();
        assert_eq!(m.range().len(), usize_to_u64(16 * PS));
        assert_eq!(m.len(), 16 * PS);
        assert!(!m.is_empty());
        // SAFETY: inside the read-write mapping just made.
        unsafe { m.as_ptr().add(5 * PS).write_volatile(7) };
        // SAFETY: readable, anonymous (backed), nothing else writes it.
        assert_eq!(unsafe { m.as_slice() }[5 * PS], 7);
    }

    #[test]
    fn drop_unmaps() {
        let fd = memfd(c"mmap-test-drop");
        let m = Mmap::shared(fd.as_fd(), 4 * PS, RW, 0).unwrap();
        assert_eq!(maps_of("mmap-test-drop"), vec![m.range()]);
        drop(m);
        assert_eq!(maps_of("mmap-test-drop"), vec![]);
    }

    #[test]
    fn populate_and_read_only_zero_source() {
        let m = Mmap::anon(8 * PS, libc::PROT_READ, libc::MAP_POPULATE).unwrap();
        let mut pm = Pagemap::open().unwrap();
        assert_eq!(pm.present(m.range()).unwrap(), vec![m.range()]);
        // SAFETY: readable anonymous memory that nothing writes (PROT_READ).
        assert!(unsafe { m.as_slice() }.iter().all(|b| *b == 0));
    }

    #[test]
    fn refuses_fixed_type_and_unaligned_huge_flags() {
        for f in [
            libc::MAP_FIXED,
            libc::MAP_FIXED_NOREPLACE,
            libc::MAP_SHARED,
            libc::MAP_PRIVATE,
        ] {
            assert!(matches!(
                Mmap::anon(PS, libc::PROT_READ, f),
                Err(Error::Unsupported { .. })
            ));
        }
        assert!(matches!(
            Mmap::anon(PS, libc::PROT_READ, libc::MAP_HUGETLB),
            Err(Error::Unsupported { .. })
        ));
        let huge_2m = libc::MAP_HUGETLB | crate::PageSize::Size2M.huge_flag();
        assert!(matches!(
            Mmap::anon(PS, libc::PROT_READ, huge_2m),
            Err(Error::Unaligned { align, .. }) if align == 2 << 20
        ));
        assert!(matches!(
            Mmap::anon(0, libc::PROT_READ, 0),
            Err(Error::Syscall { op, .. }) if op.starts_with("mmap")
        ));
    }

    #[test]
    fn map_fixed_in_a_reservation_then_keep() {
        let fd = memfd(c"mmap-test-keep");
        let a = Mmap::shared(fd.as_fd(), 4 * PS, RW, 0).unwrap();
        // A reservation with the memfd mapped in its middle, then trimmed.
        let mut res = Mmap::reserve(16 * PS).unwrap();
        let whole = res.range();
        res.map_fixed_shared(4 * PS, 4 * PS, fd.as_fd(), RW, 0)
            .unwrap();
        assert!(matches!(
            res.map_fixed_anon(14 * PS, 4 * PS, RW, 0),
            Err(Error::OutOfRegion { .. })
        ));
        assert!(matches!(
            res.map_fixed_anon(4 * PS, PS, RW, libc::MAP_FIXED),
            Err(Error::Unsupported { .. })
        ));
        let b = res.keep(4 * PS, 4 * PS).unwrap();
        assert_eq!(b.addr(), whole.start + usize_to_u64(4 * PS));
        assert_eq!(b.len(), 4 * PS);
        let mut both = maps_of("mmap-test-keep");
        both.sort();
        let mut want = vec![a.range(), b.range()];
        want.sort();
        assert_eq!(both, want);

        // SAFETY: inside both read-write mappings of the 4-page memfd.
        unsafe { a.as_ptr().add(PS + 3).write_volatile(0x5a) };
        // SAFETY: as above; the write through `a` is done.
        assert_eq!(unsafe { b.as_ptr().add(PS + 3).read_volatile() }, 0x5a);

        let r = b.into_raw();
        drop(a);
        // `into_raw` left it mapped.
        assert_eq!(maps_of("mmap-test-keep"), vec![r]);
        // SAFETY: `into_raw` gave us the range; nothing else uses it.
        let rc = unsafe { libc::munmap(r.start as *mut libc::c_void, 4 * PS) };
        assert_eq!(rc, 0);
        assert_eq!(maps_of("mmap-test-keep"), vec![]);
    }

    #[test]
    fn hugetlb_memfd_length_must_be_whole_huge_pages() {
        let p = crate::PageSize::Size2M;
        // SAFETY: valid NUL-terminated name; plain flags.
        let fd = unsafe { libc::memfd_create(c"mmap-test-huge".as_ptr(), p.memfd_flags()) };
        if fd < 0 {
            eprintln!("skipped: no hugetlb memfd here");
            return;
        }
        // SAFETY: fresh descriptor owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let huge = crate::convert::u64_to_usize(p.bytes());
        // SAFETY: ftruncate on our own memfd.
        assert_eq!(unsafe { libc::ftruncate(fd.as_raw_fd(), 2 << 20) }, 0);
        assert!(matches!(
            Mmap::shared(fd.as_fd(), PS, RW, libc::MAP_NORESERVE),
            Err(Error::Unaligned { align, .. }) if align == p.bytes()
        ));
        // MAP_NORESERVE: no huge page is taken until touched.
        let m = Mmap::shared(fd.as_fd(), huge, RW, libc::MAP_NORESERVE).unwrap();
        assert_eq!(m.len(), huge);
        let mut res = Mmap::reserve(3 * huge).unwrap();
        let off = crate::convert::u64_to_usize(
            crate::predict::align_up(res.addr(), p.bytes()) - res.addr(),
        );
        assert!(matches!(
            res.map_fixed_shared(off, PS, fd.as_fd(), RW, libc::MAP_NORESERVE),
            Err(Error::Unaligned { .. })
        ));
        res.map_fixed_shared(off, huge, fd.as_fd(), RW, libc::MAP_NORESERVE)
            .unwrap();
        let kept = res.keep(off, huge).unwrap();
        assert_eq!(maps_of("mmap-test-huge").len(), 2);
        drop((m, kept));
        assert_eq!(maps_of("mmap-test-huge"), vec![]);
    }

    #[test]
    fn keep_out_of_range_is_an_error() {
        let res = Mmap::reserve(4 * PS).unwrap();
        assert!(matches!(
            res.keep(2 * PS, 3 * PS),
            Err(Error::OutOfRegion { .. })
        ));
        let res = Mmap::reserve(4 * PS).unwrap();
        assert!(matches!(res.keep(PS, 0), Err(Error::OutOfRegion { .. })));
    }
}
