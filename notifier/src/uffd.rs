//! userfaultfd: a minimal binding of our own and the `UffdSource` that turns
//! non-cooperative events into invalidations.
//!
//! Why not the `userfaultfd` crate: its `userfaultfd-sys` runs bindgen at
//! build time, which needs `libclang.so` (this machine has only
//! `libclang-cpp.so.14`, no `libclang-*-dev`), it pulls `thiserror` 1 next to
//! our `thiserror` 2, and it names none of the features hugetlb guest RAM
//! needs (`WP_HUGETLBFS_SHMEM`, `WP_UNPOPULATED`, `WP_ASYNC`). Like Cloud
//! Hypervisor, we define the handful of uapi structs and ioctl numbers we use
//! (include/uapi/linux/userfaultfd.h, Linux 6.8+) and call them through `libc`.
//!
//! What the events mean for a secondary MMU (research §4, measured here):
//! * `REMOVE` (madvise DONTNEED/REMOVE) is queued *before* the zap and the
//!   caller sleeps until the message is read - but it resumes as soon as
//!   `read()` returns. The handler therefore delivers `start` immediately
//!   after `read()`, then waits (sleeping, bounded by [`REMOVE_ZAP_WAIT`])
//!   until PAGEMAP_SCAN shows the range empty, then delivers `end`, before
//!   reading the next message. `start` beating the zap is a race unless the
//!   handler runs `SCHED_FIFO` on the CPU the caller is pinned to
//!   ([`UffdOptions::realtime_cpu`]): then the woken caller cannot run until
//!   the handler sleeps. Measured here with an ordinary handler thread, the
//!   zap won 167-197 of 200 rounds, so REMOVE is labelled `Delivery::Before` only
//!   with a realtime handler (and that holds for callers pinned to its CPU),
//!   `Delivery::AfterTheFact` otherwise.
//! * `UNMAP` and `REMAP` arrive after the page tables are gone:
//!   `Delivery::AfterTheFact`.
//! * `FORK`: the parent's private mappings were write-protected for COW
//!   (`MMU_NOTIFY_PROTECTION_PAGE`), after the fact; the child's uffd is closed.

use crate::error::{Error, Result};
use crate::pagemap::Pagemap;
use crate::predict::{adjust_range_if_pmd_sharing_possible, VmaShape};
use crate::subscriber::{Delivery, HvaRange, Invalidation, MmuNotifyEvent, Subscribers};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

const UFFD_API: u64 = 0xAA;
const UFFDIO: u64 = 0xAA;

const fn ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (UFFDIO << 8) | nr
}
const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}
#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}
#[repr(C)]
#[derive(Default)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioCopy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}
#[repr(C)]
#[derive(Default)]
struct UffdioContinue {
    range: UffdioRange,
    mode: u64,
    mapped: i64,
}

const UFFDIO_API_IOCTL: u64 = ioc(IOC_READ | IOC_WRITE, 0x3F, std::mem::size_of::<UffdioApi>());
const UFFDIO_REGISTER: u64 = ioc(
    IOC_READ | IOC_WRITE,
    0x00,
    std::mem::size_of::<UffdioRegister>(),
);
const UFFDIO_UNREGISTER: u64 = ioc(IOC_READ, 0x01, std::mem::size_of::<UffdioRange>());
const UFFDIO_WRITEPROTECT: u64 = ioc(
    IOC_READ | IOC_WRITE,
    0x06,
    std::mem::size_of::<UffdioWriteprotect>(),
);

const UFFDIO_WAKE: u64 = ioc(IOC_READ, 0x02, std::mem::size_of::<UffdioRange>());
const UFFDIO_COPY: u64 = ioc(
    IOC_READ | IOC_WRITE,
    0x03,
    std::mem::size_of::<UffdioCopy>(),
);
const UFFDIO_CONTINUE: u64 = ioc(
    IOC_READ | IOC_WRITE,
    0x07,
    std::mem::size_of::<UffdioContinue>(),
);

pub const UFFD_FEATURE_EVENT_FORK: u64 = 1 << 1;
pub const UFFD_FEATURE_EVENT_REMAP: u64 = 1 << 2;
pub const UFFD_FEATURE_EVENT_REMOVE: u64 = 1 << 3;
pub const UFFD_FEATURE_EVENT_UNMAP: u64 = 1 << 6;
pub const UFFD_FEATURE_MISSING_HUGETLBFS: u64 = 1 << 4;
pub const UFFD_FEATURE_MINOR_HUGETLBFS: u64 = 1 << 9;
/// MINOR faults on shmem (a memfd without hugetlb), Linux 5.14+.
pub const UFFD_FEATURE_MINOR_SHMEM: u64 = 1 << 10;
pub const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
/// Write-protect marks unpopulated anonymous pages too (6.5+).
pub const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;

pub const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
pub const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
pub const UFFDIO_REGISTER_MODE_MINOR: u64 = 1 << 2;
/// `UFFDIO_COPY_MODE_DONTWAKE` / `UFFDIO_CONTINUE_MODE_DONTWAKE`: resolve
/// without waking the faulting thread (wake later with [`Uffd::wake`]).
const RESOLVE_MODE_DONTWAKE: u64 = 1 << 0;
/// `uffd_msg.pagefault.flags`.
pub const UFFD_PAGEFAULT_FLAG_WRITE: u64 = 1 << 0;
pub const UFFD_PAGEFAULT_FLAG_WP: u64 = 1 << 1;
pub const UFFD_PAGEFAULT_FLAG_MINOR: u64 = 1 << 2;
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;

const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
const UFFD_EVENT_FORK: u8 = 0x13;
const UFFD_EVENT_REMAP: u8 = 0x14;
const UFFD_EVENT_REMOVE: u8 = 0x15;
const UFFD_EVENT_UNMAP: u8 = 0x16;
const MSG_SIZE: usize = 32;

/// A decoded `struct uffd_msg`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UffdEvent {
    Pagefault { address: u64, flags: u64 },
    Fork { ufd: i32 },
    Remap { from: u64, to: u64, len: u64 },
    Remove { start: u64, end: u64 },
    Unmap { start: u64, end: u64 },
    Other(u8),
}

fn u64_at(b: &[u8; MSG_SIZE], off: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[off..off + 8]);
    u64::from_ne_bytes(x)
}

/// `struct uffd_msg.arg.fork.ufd` is a `__u32` holding an fd (an `int`).
fn i32_at(b: &[u8; MSG_SIZE], off: usize) -> i32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[off..off + 4]);
    i32::from_ne_bytes(x)
}

impl UffdEvent {
    /// Decode the 32-byte packed `struct uffd_msg` (event at 0, union at 8).
    pub fn decode(b: &[u8; MSG_SIZE]) -> Self {
        match b[0] {
            UFFD_EVENT_PAGEFAULT => UffdEvent::Pagefault {
                flags: u64_at(b, 8),
                address: u64_at(b, 16),
            },
            UFFD_EVENT_FORK => UffdEvent::Fork { ufd: i32_at(b, 8) },
            UFFD_EVENT_REMAP => UffdEvent::Remap {
                from: u64_at(b, 8),
                to: u64_at(b, 16),
                len: u64_at(b, 24),
            },
            UFFD_EVENT_REMOVE => UffdEvent::Remove {
                start: u64_at(b, 8),
                end: u64_at(b, 16),
            },
            UFFD_EVENT_UNMAP => UffdEvent::Unmap {
                start: u64_at(b, 8),
                end: u64_at(b, 16),
            },
            e => UffdEvent::Other(e),
        }
    }
}

/// A userfaultfd (non-blocking, close-on-exec).
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
    features: u64,
    /// The features asked for: what `UFFDIO_API` enabled on this context
    /// (`userfaultfd_api()` stores the request in `ctx->features`; the
    /// answer's `features` lists all the kernel offers).
    enabled: u64,
}

impl Uffd {
    /// `userfaultfd(2)` + `UFFDIO_API` asking for `features`.
    pub fn open(features: u64) -> Result<Self> {
        // SAFETY: the userfaultfd syscall takes one int of flags and returns
        // a new fd or -1.
        let fd =
            unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) };
        if fd < 0 {
            return Err(Error::UffdRefused {
                source: std::io::Error::last_os_error(),
            });
        }
        // A descriptor is an `int`: the kernel never returns a larger one.
        let fd = RawFd::try_from(fd).map_err(|_| Error::Syscall {
            op: "userfaultfd",
            source: std::io::Error::other(format!("descriptor {fd} is not an int")),
        })?;
        // SAFETY: fd is a fresh descriptor owned by nobody else.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let mut api = UffdioApi {
            api: UFFD_API,
            features,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API reads and writes one `struct uffdio_api`, which
        // `api` is, alive for the call.
        if unsafe {
            libc::ioctl(
                fd.as_raw_fd(),
                UFFDIO_API_IOCTL as _,
                &mut api as *mut UffdioApi,
            )
        } != 0
        {
            let source = std::io::Error::last_os_error();
            if source.raw_os_error() == Some(libc::EINVAL) {
                return Err(Error::UffdFeatures {
                    missing: features,
                    offered: 0,
                });
            }
            return Err(Error::UffdRefused { source });
        }
        if api.features & features != features {
            return Err(Error::UffdFeatures {
                missing: features & !api.features,
                offered: api.features,
            });
        }
        Ok(Self {
            fd,
            features: api.features,
            enabled: features,
        })
    }

    /// What the kernel offers.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// What this context enabled (asked for at open).
    pub fn enabled(&self) -> u64 {
        self.enabled
    }

    /// `UFFDIO_REGISTER`; returns the ioctls allowed on the range.
    pub fn register(&self, r: HvaRange, mode: u64) -> Result<u64> {
        let mut reg = UffdioRegister {
            range: UffdioRange {
                start: r.start,
                len: r.len(),
            },
            mode,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads/writes one `struct uffdio_register`.
        if unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                UFFDIO_REGISTER as _,
                &mut reg as *mut UffdioRegister,
            )
        } != 0
        {
            return Err(Error::last_os("ioctl(UFFDIO_REGISTER)"));
        }
        Ok(reg.ioctls)
    }

    /// `UFFDIO_UNREGISTER`.
    pub fn unregister(&self, r: HvaRange) -> Result<()> {
        self.range_ioctl(UFFDIO_UNREGISTER, r, "ioctl(UFFDIO_UNREGISTER)")
    }

    /// Give the context up for good when its reader is gone: `/dev/null`
    /// takes the fd's number (`dup2`, atomic), so the last reference to the
    /// userfaultfd file drops and `userfaultfd_release()` runs. That wakes
    /// every thread waiting on it - faulting threads (`fault_wqh`) and,
    /// unlike `UFFDIO_UNREGISTER`, the callers of madvise/munmap/mremap
    /// asleep in `userfaultfd_event_wait_completion()` until a reader takes
    /// their event - and clears the registration of every VMA, so the
    /// kernel serves later faults itself. The fd number stays valid (no
    /// other file can take it); its ioctls fail from then on.
    pub fn retire(&self) -> Result<()> {
        let null = std::fs::File::open("/dev/null").map_err(|source| Error::Syscall {
            op: "open(/dev/null)",
            source,
        })?;
        // SAFETY: dup2 on two fds this process owns: `null`, open above,
        // and `self.fd`, which `self` keeps open; dup2 atomically makes
        // `self.fd`'s number refer to /dev/null, so `OwnedFd` still owns
        // (and will close) a valid descriptor.
        let rc = unsafe { libc::dup2(null.as_raw_fd(), self.fd.as_raw_fd()) };
        if rc < 0 {
            return Err(Error::last_os("dup2(/dev/null, userfaultfd)"));
        }
        Ok(())
    }

    /// An ioctl whose argument is one `struct uffdio_range` (`UNREGISTER`,
    /// `WAKE`).
    fn range_ioctl(&self, req: u64, r: HvaRange, op: &'static str) -> Result<()> {
        let mut range = UffdioRange {
            start: r.start,
            len: r.len(),
        };
        // SAFETY: `req` is UFFDIO_UNREGISTER or UFFDIO_WAKE, which read one
        // `struct uffdio_range`, alive for the call.
        if unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                req as _,
                &mut range as *mut UffdioRange,
            )
        } != 0
        {
            return Err(Error::last_os(op));
        }
        Ok(())
    }

    /// `UFFDIO_WRITEPROTECT` (set when `wp`, clear otherwise).
    pub fn write_protect(&self, r: HvaRange, wp: bool) -> Result<()> {
        let mut w = UffdioWriteprotect {
            range: UffdioRange {
                start: r.start,
                len: r.len(),
            },
            mode: if wp { UFFDIO_WRITEPROTECT_MODE_WP } else { 0 },
        };
        // SAFETY: UFFDIO_WRITEPROTECT reads/writes one `struct uffdio_writeprotect`.
        if unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                UFFDIO_WRITEPROTECT as _,
                &mut w as *mut UffdioWriteprotect,
            )
        } != 0
        {
            return Err(Error::last_os("ioctl(UFFDIO_WRITEPROTECT)"));
        }
        Ok(())
    }

    /// `UFFDIO_CONTINUE`: map the page-cache pages already present at
    /// `r` (MINOR mode; no copy). Returns `Ok(false)` if the range was
    /// already mapped (`EEXIST`). With `wake == false` the faulting thread
    /// stays asleep until [`wake`](Self::wake).
    pub fn continue_range(&self, r: HvaRange, wake: bool) -> Result<bool> {
        let mut c = UffdioContinue {
            range: UffdioRange {
                start: r.start,
                len: r.len(),
            },
            mode: if wake { 0 } else { RESOLVE_MODE_DONTWAKE },
            mapped: 0,
        };
        // SAFETY: UFFDIO_CONTINUE reads/writes one `struct uffdio_continue`,
        // alive for the call; it maps pages only inside a registered range.
        let rc = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                UFFDIO_CONTINUE as _,
                &mut c as *mut UffdioContinue,
            )
        };
        resolve_result(rc, "ioctl(UFFDIO_CONTINUE)")
    }

    /// `UFFDIO_COPY`: allocate pages at `dst` and fill them from `src`
    /// (MISSING mode). `Ok(false)` if already mapped (`EEXIST`).
    pub fn copy(&self, dst: HvaRange, src: &[u8], wake: bool) -> Result<bool> {
        if (src.len() as u64) < dst.len() {
            return Err(Error::Unsupported {
                op: "UFFDIO_COPY",
                why: "source shorter than the destination range",
            });
        }
        let mut c = UffdioCopy {
            dst: dst.start,
            src: src.as_ptr() as u64,
            len: dst.len(),
            mode: if wake { 0 } else { RESOLVE_MODE_DONTWAKE },
            copy: 0,
        };
        // SAFETY: UFFDIO_COPY reads/writes one `struct uffdio_copy`; the
        // kernel reads `len` bytes from `src`, which we checked is that long
        // and which is borrowed for the call.
        let rc = unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                UFFDIO_COPY as _,
                &mut c as *mut UffdioCopy,
            )
        };
        resolve_result(rc, "ioctl(UFFDIO_COPY)")
    }

    /// `UFFDIO_WAKE`: wake threads faulting in `r`.
    pub fn wake(&self, r: HvaRange) -> Result<()> {
        self.range_ioctl(UFFDIO_WAKE, r, "ioctl(UFFDIO_WAKE)")
    }

    /// Wait up to `timeout_ms` for a message; `Ok(None)` on timeout.
    pub fn read_event(&self, timeout_ms: i32) -> Result<Option<UffdEvent>> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                return Ok(None);
            }
            return Err(Error::Syscall {
                op: "poll(userfaultfd)",
                source: e,
            });
        }
        if n == 0 {
            return Ok(None);
        }
        let mut b = [0u8; MSG_SIZE];
        // SAFETY: reads at most MSG_SIZE bytes into `b`.
        let got = unsafe {
            libc::read(
                self.fd.as_raw_fd(),
                b.as_mut_ptr().cast::<libc::c_void>(),
                MSG_SIZE,
            )
        };
        if got < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EAGAIN) {
                return Ok(None);
            }
            return Err(Error::Syscall {
                op: "read(userfaultfd)",
                source: e,
            });
        }
        if usize::try_from(got) != Ok(MSG_SIZE) {
            return Ok(None);
        }
        Ok(Some(UffdEvent::decode(&b)))
    }
}

/// A COPY/CONTINUE return code: mapped now, already mapped, or an error.
fn resolve_result(rc: libc::c_int, op: &'static str) -> Result<bool> {
    if rc == 0 {
        return Ok(true);
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EEXIST) {
        return Ok(false);
    }
    Err(Error::Syscall { op, source: e })
}

/// How the event handler runs.
#[derive(Debug, Clone, Copy, Default)]
pub struct UffdOptions {
    /// Pin the handler to this CPU with `SCHED_FIFO` priority 1 (root): a
    /// REMOVE caller pinned to the same CPU cannot resume its zap before the
    /// handler has delivered start and end.
    pub realtime_cpu: Option<usize>,
}

/// Non-cooperative userfaultfd events as invalidations.
pub struct UffdSource {
    uffd: Arc<Uffd>,
    registered: Arc<Mutex<Vec<VmaShape>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// Features the source asks for.
pub const SOURCE_FEATURES: u64 = UFFD_FEATURE_EVENT_FORK
    | UFFD_FEATURE_EVENT_REMAP
    | UFFD_FEATURE_EVENT_REMOVE
    | UFFD_FEATURE_EVENT_UNMAP
    | UFFD_FEATURE_WP_HUGETLBFS_SHMEM;

impl UffdSource {
    pub fn start(subs: Subscribers, opts: UffdOptions) -> Result<Self> {
        let uffd = Arc::new(Uffd::open(SOURCE_FEATURES)?);
        let registered: Arc<Mutex<Vec<VmaShape>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (u, reg, st) = (uffd.clone(), registered.clone(), stop.clone());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<()>>();
        let thread = std::thread::Builder::new()
            .name("uffd-events".into())
            .spawn(move || {
                let setup = match opts.realtime_cpu {
                    Some(cpu) => make_realtime(cpu),
                    None => Ok(()),
                };
                let ok = setup.is_ok();
                let _ = ready_tx.send(setup);
                if ok {
                    let remove = if opts.realtime_cpu.is_some() {
                        Delivery::Before
                    } else {
                        Delivery::AfterTheFact
                    };
                    handler_loop(&u, &reg, &st, &subs, remove);
                }
            })
            .map_err(|source| Error::Syscall {
                op: "spawn uffd handler",
                source,
            })?;
        let setup = ready_rx.recv().unwrap_or(Ok(()));
        let mut me = Self {
            uffd,
            registered,
            stop,
            thread: Some(thread),
        };
        if let Err(e) = setup {
            me.shutdown();
            return Err(e);
        }
        Ok(me)
    }

    /// The userfaultfd (for `UFFDIO_WRITEPROTECT`).
    pub fn uffd(&self) -> &Uffd {
        &self.uffd
    }

    /// Register a VMA in write-protect mode: the cheapest mode that delivers
    /// REMOVE/UNMAP/REMAP without intercepting faults. On a shared hugetlb
    /// VMA this disables PMD sharing (and the kernel unshares, notifying).
    pub fn register(&self, vma: VmaShape) -> Result<()> {
        self.uffd.register(vma.range, UFFDIO_REGISTER_MODE_WP)?;
        self.registered
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(vma);
        Ok(())
    }

    fn shutdown(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for UffdSource {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn make_realtime(cpu: usize) -> Result<()> {
    let os = |op: &'static str| move |source| Error::Syscall { op, source };
    crate::sched::pin_to_cpu(cpu).map_err(os("sched_setaffinity(uffd handler)"))?;
    crate::sched::set_fifo(1).map_err(os("sched_setscheduler(SCHED_FIFO)"))
}

/// The invalidation an event stands for (`None` for page faults).
///
/// `remove`: how REMOVE is labelled - `Delivery::Before` only when the
/// handler is realtime (see [`UffdOptions::realtime_cpu`]); an ordinary
/// handler thread loses the race to the zap almost always (measured: the
/// page was still present at `start` in only 3 and 33 of 200 rounds in two runs).
pub fn event_invalidations(
    ev: &UffdEvent,
    registered: &[VmaShape],
    remove: Delivery,
) -> Vec<Invalidation> {
    let inv = |range: HvaRange, event, delivery| Invalidation {
        range,
        event,
        blockable: true,
        delivery,
    };
    match *ev {
        UffdEvent::Remove { start, end } => {
            let r = HvaRange::new(start, end);
            // The kernel's notifier is widened for PMD sharing; tell the MMU
            // at least as much.
            let w = registered
                .iter()
                .filter(|v| v.range.overlaps(&r))
                .map(|v| adjust_range_if_pmd_sharing_possible(v, r))
                .fold(r, |a, b| {
                    HvaRange::new(a.start.min(b.start), a.end.max(b.end))
                });
            vec![inv(w, MmuNotifyEvent::Clear, remove)]
        }
        UffdEvent::Unmap { start, end } => vec![inv(
            HvaRange::new(start, end),
            MmuNotifyEvent::Unmap,
            Delivery::AfterTheFact,
        )],
        UffdEvent::Remap { from, len, .. } => vec![inv(
            HvaRange::new(from, from + len),
            MmuNotifyEvent::Unmap,
            Delivery::AfterTheFact,
        )],
        UffdEvent::Fork { .. } => registered
            .iter()
            .filter(|v| !v.may_share)
            .map(|v| {
                inv(
                    v.range,
                    MmuNotifyEvent::ProtectionPage,
                    Delivery::AfterTheFact,
                )
            })
            .collect(),
        UffdEvent::Pagefault { .. } | UffdEvent::Other(_) => Vec::new(),
    }
}

/// How long the handler waits for the kernel to finish a REMOVE's zap
/// before delivering `end` anyway (e.g. when another thread re-faults).
pub const REMOVE_ZAP_WAIT: std::time::Duration = std::time::Duration::from_millis(100);

/// After a REMOVE's `start`, the kernel resumes the madvise caller; wait
/// (sleeping, so a caller pinned to this CPU can run) until no page of the
/// range is present any more, so `end` comes after the zap.
pub fn wait_for_zap(pm: &mut Pagemap, r: HvaRange) {
    let t0 = std::time::Instant::now();
    while t0.elapsed() < REMOVE_ZAP_WAIT {
        match pm.any_present(r) {
            Ok(true) => std::thread::sleep(std::time::Duration::from_micros(20)),
            _ => return,
        }
    }
}

fn handler_loop(
    uffd: &Uffd,
    registered: &Mutex<Vec<VmaShape>>,
    stop: &AtomicBool,
    subs: &Subscribers,
    remove: Delivery,
) {
    let mut pagemap = Pagemap::open().ok();
    while !stop.load(Ordering::Acquire) {
        let ev = match uffd.read_event(20) {
            Ok(Some(ev)) => ev,
            Ok(None) => continue,
            Err(_) => {
                std::thread::sleep(std::time::Duration::from_millis(20));
                continue;
            }
        };
        let invs = {
            let reg = registered.lock().unwrap_or_else(|e| e.into_inner());
            event_invalidations(&ev, &reg, remove)
        };
        for inv in &invs {
            subs.start(inv);
            if let (UffdEvent::Remove { start, end }, Some(pm)) = (ev, pagemap.as_mut()) {
                wait_for_zap(pm, HvaRange::new(start, end));
            }
            subs.end(inv);
        }
        if let UffdEvent::Fork { ufd } = ev {
            // SAFETY: the kernel installed `ufd` in our fd table for this
            // message; nobody else knows it, so we own and close it.
            drop(unsafe { OwnedFd::from_raw_fd(ufd) });
        }
        if let UffdEvent::Remap { to, len, .. } = ev {
            // Keep following the moved range.
            let mut reg = registered.lock().unwrap_or_else(|e| e.into_inner());
            if let UffdEvent::Remap { from, .. } = ev {
                for v in reg
                    .iter_mut()
                    .filter(|v| v.range.start == from && v.range.len() == len)
                {
                    v.range = HvaRange::new(to, to + len);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ioctl_numbers_match_uapi() {
        assert_eq!(UFFDIO_API_IOCTL, 0xc018_aa3f);
        assert_eq!(UFFDIO_WAKE, 0x8010_aa02);
        assert_eq!(UFFDIO_COPY, 0xc028_aa03);
        assert_eq!(UFFDIO_CONTINUE, 0xc020_aa07);
        assert_eq!(UFFDIO_REGISTER, 0xc020_aa00);
        assert_eq!(UFFDIO_UNREGISTER, 0x8010_aa01);
        assert_eq!(UFFDIO_WRITEPROTECT, 0xc018_aa06);
    }

    #[test]
    fn decode_remove_and_remap() {
        let mut b = [0u8; MSG_SIZE];
        b[0] = UFFD_EVENT_REMOVE;
        b[8..16].copy_from_slice(&0x1000u64.to_ne_bytes());
        b[16..24].copy_from_slice(&0x3000u64.to_ne_bytes());
        assert_eq!(
            UffdEvent::decode(&b),
            UffdEvent::Remove {
                start: 0x1000,
                end: 0x3000
            }
        );
        b[0] = UFFD_EVENT_REMAP;
        b[24..32].copy_from_slice(&0x2000u64.to_ne_bytes());
        assert_eq!(
            UffdEvent::decode(&b),
            UffdEvent::Remap {
                from: 0x1000,
                to: 0x3000,
                len: 0x2000
            }
        );
    }
}
