//! Host state to put back if a signal ends the process before the guards
//! that changed it drop ([`crate::hostconf`]'s sysctls and hugetlb pools,
//! [`crate::trace`]'s tracefs instances).
//!
//! A guard arms a slot with what must be undone; dropping the [`Armed`]
//! claim disarms it (the guard undoes the change itself first). Four kinds:
//!
//! * a plain write of saved bytes to a file ([`arm`]);
//! * a shared sysctl ([`arm_sysctl`]): the slot holds a descriptor of the
//!   sysctl's hold file in [`crate::hoststate`]'s directory, `flock`ed
//!   shared for as long as this process needs the value. The original is
//!   written back only when this process was the last holder (its own lock
//!   dropped, an exclusive non-blocking lock succeeds), and the hold file
//!   is then unlinked; another live vmm's lock keeps the value;
//! * a hugetlb pool ([`arm_pool`]): `nr_hugepages` is read, lowered by the
//!   pages this process added, and written - relative, so another
//!   process's reservation stays;
//! * a tracefs instance ([`arm_tracefs`]): its event disabled, its open
//!   descriptors closed, its directory removed (`rmdir`, retried briefly
//!   while the kernel says EBUSY).
//!
//! [`install`] makes SIGINT, SIGTERM and SIGHUP undo every armed slot -
//! newest first, so nested changes of one file end at the oldest value -
//! under [`crate::hoststate`]'s cross-process lock, remove this process's
//! state file, and then end the process with the signal's default action,
//! as if nothing had been caught. The handler only makes async-signal-safe
//! system calls (`open`, `read`, `write`, `close`, `flock`, `unlink`,
//! `rmdir`, `nanosleep`, `getpid`, `signal`, `raise`) on bytes prepared
//! when the slot was armed; it allocates nothing and takes no lock of this
//! process's (the `flock` is the kernel's, on a descriptor opened before).
//! It waits (bounded) for a thread of this process that is in the middle of
//! a [`crate::hoststate`] section; those threads block the three signals
//! for the section, so the handler never interrupts one. A forked child
//! that inherited the handler does nothing but die: only the process that
//! installed it owns the slots.
//!
//! Two fatal signals at once (on two threads) restore once: the second
//! handler waits for the first.
//!
//! A command that handles the signal itself (the Linux boot's graceful
//! stop) replaces the handler for its run; its guards then restore on the
//! normal path. What a SIGKILL leaves behind is undone by the next vmm's
//! [`crate::hoststate::recover_dead`].

use std::cell::UnsafeCell;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, AtomicU8, Ordering};

const SLOTS: usize = 32;
const PATH_MAX: usize = 192;
const VALUE_MAX: usize = 48;

const FREE: u8 = 0;
const FILLING: u8 = 1;
const ARMED: u8 = 2;

const KIND_WRITE: u8 = 0;
const KIND_SYSCTL: u8 = 1;
const KIND_POOL: u8 = 2;
const KIND_TRACEFS: u8 = 3;

/// How long the handler waits for a section of another thread of this
/// process, for another process's lock, and for a busy tracefs instance.
const WAIT_SECTION_MS: u32 = 3000;
const WAIT_LOCK_MS: u32 = 3000;
const WAIT_RMDIR_MS: u32 = 500;

struct Slot {
    state: AtomicU8,
    /// When it was armed (restore order: newest first).
    seq: AtomicU64,
    kind: AtomicU8,
    /// NUL-terminated: the file written (write, sysctl, pool) or the
    /// directory removed (tracefs).
    path: UnsafeCell<[u8; PATH_MAX]>,
    /// NUL-terminated: the hold file (sysctl) or the event's `enable` file
    /// (tracefs).
    aux: UnsafeCell<[u8; PATH_MAX]>,
    value: UnsafeCell<[u8; VALUE_MAX]>,
    len: UnsafeCell<usize>,
    /// Pages added (pool).
    count: AtomicU64,
    /// The hold file's descriptor (sysctl); the instance's open files
    /// (tracefs); -1 when none.
    fds: [AtomicI32; 2],
}

// SAFETY: `path`, `aux`, `value` and `len` are written only by the thread
// that moved `state` FREE -> FILLING (a compare-exchange: one owner) and
// read only while `state` is ARMED, which that thread publishes with a
// Release store after writing them and readers observe with an Acquire
// load; a slot goes back to FREE only after its owner stopped writing. The
// other fields are atomics.
unsafe impl Sync for Slot {}

impl Slot {
    const fn new() -> Self {
        Slot {
            state: AtomicU8::new(FREE),
            seq: AtomicU64::new(0),
            kind: AtomicU8::new(KIND_WRITE),
            path: UnsafeCell::new([0; PATH_MAX]),
            aux: UnsafeCell::new([0; PATH_MAX]),
            value: UnsafeCell::new([0; VALUE_MAX]),
            len: UnsafeCell::new(0),
            count: AtomicU64::new(0),
            fds: [AtomicI32::new(-1), AtomicI32::new(-1)],
        }
    }
}

static TABLE: [Slot; SLOTS] = [const { Slot::new() }; SLOTS];
static NEXT_SEQ: AtomicU64 = AtomicU64::new(1);

/// The process whose slots these are (0: not known yet).
static OWNER: AtomicI32 = AtomicI32::new(0);
/// [`crate::hoststate`]'s lock file descriptor, -1 until it is opened.
static LOCK_FD: AtomicI32 = AtomicI32::new(-1);
/// Threads of this process inside a [`crate::hoststate`] section.
static BUSY: AtomicI32 = AtomicI32::new(0);
/// Set by the handler before it restores: the process is ending, and no
/// new section may begin (a thread whose tracefs read fails once the
/// handler closed the instance's files would otherwise record again).
static DYING: AtomicBool = AtomicBool::new(false);
/// The handler that set [`DYING`] is done restoring.
static RESTORED: AtomicBool = AtomicBool::new(false);
/// This process's state file, NUL-terminated, once [`STATE_SET`].
struct StatePath(UnsafeCell<[u8; PATH_MAX]>);
// SAFETY: written once by the thread that wins STATE_FILLING's
// compare-exchange, read only after STATE_SET is observed true (Acquire
// after its Release store).
unsafe impl Sync for StatePath {}
static STATE_PATH: StatePath = StatePath(UnsafeCell::new([0; PATH_MAX]));
static STATE_FILLING: AtomicBool = AtomicBool::new(false);
static STATE_SET: AtomicBool = AtomicBool::new(false);

/// A slot armed with something to undo; disarmed on drop.
#[derive(Debug)]
pub struct Armed(usize);

impl Armed {
    /// Pool slots: the pages this process really added (known once the
    /// kernel answered the write).
    pub fn set_count(&self, count: u64) {
        if let Some(s) = TABLE.get(self.0) {
            s.count.store(count, Ordering::Release);
        }
    }

    /// Tracefs slots: the instance's open files the handler must close
    /// before its `rmdir` (-1: none).
    pub fn set_fds(&self, a: i32, b: i32) {
        if let Some(s) = TABLE.get(self.0) {
            s.fds[0].store(a, Ordering::Release);
            s.fds[1].store(b, Ordering::Release);
        }
    }
}

impl Drop for Armed {
    fn drop(&mut self) {
        if let Some(s) = TABLE.get(self.0) {
            for fd in &s.fds {
                fd.store(-1, Ordering::Relaxed);
            }
            s.state.store(FREE, Ordering::Release);
        }
    }
}

/// Copy `src` into `dst` NUL-terminated; false if it does not fit.
fn fits(p: &[u8], max: usize) -> bool {
    p.len() < max && !p.contains(&0)
}

fn claim(
    kind: u8,
    path: &[u8],
    aux: &[u8],
    value: &[u8],
    count: u64,
    fds: [i32; 2],
) -> Option<Armed> {
    if !fits(path, PATH_MAX) || !fits(aux, PATH_MAX) || value.len() > VALUE_MAX {
        return None;
    }
    ensure_installed();
    for (i, s) in TABLE.iter().enumerate() {
        if s.state
            .compare_exchange(FREE, FILLING, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            continue;
        }
        // SAFETY: this thread owns the slot (FREE -> FILLING above); no
        // reader looks at it until the ARMED store below. Lengths were
        // checked against the buffers above.
        unsafe {
            let path_buf = &mut *s.path.get();
            path_buf[..path.len()].copy_from_slice(path);
            path_buf[path.len()] = 0;
            let aux_buf = &mut *s.aux.get();
            aux_buf[..aux.len()].copy_from_slice(aux);
            aux_buf[aux.len()] = 0;
            (&mut *s.value.get())[..value.len()].copy_from_slice(value);
            *s.len.get() = value.len();
        }
        s.kind.store(kind, Ordering::Relaxed);
        s.count.store(count, Ordering::Relaxed);
        s.fds[0].store(fds[0], Ordering::Relaxed);
        s.fds[1].store(fds[1], Ordering::Relaxed);
        s.seq
            .store(NEXT_SEQ.fetch_add(1, Ordering::Relaxed), Ordering::Relaxed);
        s.state.store(ARMED, Ordering::Release);
        return Some(Armed(i));
    }
    None
}

/// Arm a slot: on a fatal signal, write `value` to `path`. `None` if every
/// slot is taken or the path or value does not fit (the guard still
/// restores on drop; only the signal path is lost).
pub fn arm(path: &Path, value: &str) -> Option<Armed> {
    claim(
        KIND_WRITE,
        path.as_os_str().as_bytes(),
        b"",
        value.as_bytes(),
        0,
        [-1, -1],
    )
}

/// Arm a shared sysctl: on a fatal signal, unlock `hold_fd` (a descriptor
/// of `hold`, locked `LOCK_SH`) and, if no other process holds `hold`,
/// write `original` to `path` and unlink `hold`.
pub fn arm_sysctl(path: &Path, original: &str, hold: &Path, hold_fd: i32) -> Option<Armed> {
    claim(
        KIND_SYSCTL,
        path.as_os_str().as_bytes(),
        hold.as_os_str().as_bytes(),
        original.as_bytes(),
        0,
        [hold_fd, -1],
    )
}

/// Arm a hugetlb pool: on a fatal signal, lower `nr_path` by `added`
/// pages (read, subtract, write).
pub fn arm_pool(nr_path: &Path, added: u64) -> Option<Armed> {
    claim(
        KIND_POOL,
        nr_path.as_os_str().as_bytes(),
        b"",
        b"",
        added,
        [-1, -1],
    )
}

/// Arm a tracefs instance: on a fatal signal, write `0` to `enable`, close
/// the descriptors given by [`Armed::set_fds`] and remove `dir`.
pub fn arm_tracefs(dir: &Path, enable: &Path) -> Option<Armed> {
    claim(
        KIND_TRACEFS,
        dir.as_os_str().as_bytes(),
        enable.as_os_str().as_bytes(),
        b"",
        0,
        [-1, -1],
    )
}

/// [`crate::hoststate`]: its lock file's descriptor (kept open for the
/// process's life) and this process's state file.
pub(crate) fn set_lock_fd(fd: i32) {
    LOCK_FD.store(fd, Ordering::Release);
}

pub(crate) fn set_state_path(path: &Path) {
    let p = path.as_os_str().as_bytes();
    if !fits(p, PATH_MAX)
        || STATE_FILLING
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
    {
        return;
    }
    // SAFETY: only the thread that won the compare-exchange above writes,
    // and nobody reads before STATE_SET's Release store below.
    unsafe {
        let buf = &mut *STATE_PATH.0.get();
        buf[..p.len()].copy_from_slice(p);
        buf[p.len()] = 0;
    }
    STATE_SET.store(true, Ordering::Release);
}

/// A section of [`crate::hoststate`] begins (signals blocked by the
/// caller) / ends. Once the handler runs, a thread that would begin one
/// parks instead until the handler's signal ends the process.
pub(crate) fn section_enter() {
    loop {
        BUSY.fetch_add(1, Ordering::SeqCst);
        if !DYING.load(Ordering::SeqCst) {
            return;
        }
        BUSY.fetch_sub(1, Ordering::SeqCst);
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

pub(crate) fn section_leave() {
    BUSY.fetch_sub(1, Ordering::SeqCst);
}

fn sleep_ms(ms: u32) {
    let ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: libc::c_long::from(ms) * 1_000_000,
    };
    // SAFETY: nanosleep with a valid timespec and no remainder pointer;
    // async-signal-safe.
    unsafe { libc::nanosleep(&ts, std::ptr::null_mut()) };
}

/// Write `buf` to the NUL-terminated `path`. Async-signal-safe.
fn write_to(path: *const libc::c_char, buf: &[u8]) {
    // SAFETY: `path` is NUL-terminated (slot invariant); open, write and
    // close are async-signal-safe and touch no Rust state.
    unsafe {
        let fd = libc::open(path, libc::O_WRONLY | libc::O_CLOEXEC);
        if fd >= 0 {
            let _ = libc::write(fd, buf.as_ptr().cast(), buf.len());
            libc::close(fd);
        }
    }
}

/// The decimal number at the start of the NUL-terminated file `path`.
/// Async-signal-safe.
fn read_u64_at(path: *const libc::c_char) -> Option<u64> {
    let mut buf = [0u8; 32];
    // SAFETY: `path` is NUL-terminated; the read stays within `buf`.
    let n = unsafe {
        let fd = libc::open(path, libc::O_RDONLY | libc::O_CLOEXEC);
        if fd < 0 {
            return None;
        }
        let n = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
        libc::close(fd);
        n
    };
    let n = usize::try_from(n).ok()?;
    let mut v: u64 = 0;
    let mut digits = 0;
    for &b in buf.get(..n)? {
        if !b.is_ascii_digit() {
            break;
        }
        v = v.checked_mul(10)?.checked_add(u64::from(b - b'0'))?;
        digits += 1;
    }
    (digits > 0).then_some(v)
}

/// `v` in decimal into `buf`; returns the digits' slice. No allocation.
fn format_u64(mut v: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    &buf[i..]
}

fn undo(s: &Slot) {
    // SAFETY (for the buffers below): the slot is ARMED (checked with
    // Acquire by the caller): its bytes are complete and nobody writes them
    // until it is FREE again; both paths are NUL-terminated within
    // PATH_MAX (`claim`), `len <= VALUE_MAX`.
    let path: *const libc::c_char = s.path.get().cast();
    let aux: *const libc::c_char = s.aux.get().cast();
    // SAFETY: as above.
    let value: &[u8] = unsafe { &(&*s.value.get())[..*s.len.get()] };
    match s.kind.load(Ordering::Relaxed) {
        KIND_WRITE => write_to(path, value),
        KIND_SYSCTL => {
            let fd = s.fds[0].load(Ordering::Acquire);
            if fd < 0 {
                write_to(path, value);
                return;
            }
            // SAFETY: flock and unlink are plain system calls on a
            // descriptor this process opened and a NUL-terminated path.
            // Unlocking first, then taking the lock exclusively without
            // blocking, succeeds only if no other open file description -
            // another process, or another guard of this one - still holds
            // it shared.
            unsafe {
                libc::flock(fd, libc::LOCK_UN);
                if libc::flock(fd, libc::LOCK_EX | libc::LOCK_NB) == 0 {
                    write_to(path, value);
                    libc::unlink(aux);
                }
            }
        }
        KIND_POOL => {
            let added = s.count.load(Ordering::Acquire);
            if added == 0 {
                return;
            }
            if let Some(nr) = read_u64_at(path) {
                let mut buf = [0u8; 20];
                write_to(path, format_u64(nr.saturating_sub(added), &mut buf));
            }
        }
        KIND_TRACEFS => {
            write_to(aux, b"0");
            for fd in &s.fds {
                let fd = fd.swap(-1, Ordering::AcqRel);
                if fd >= 0 {
                    // SAFETY: a descriptor of the instance this process
                    // opened; the process ends right after the handler, so
                    // no Rust owner uses it again. close is async-signal-safe.
                    unsafe { libc::close(fd) };
                }
            }
            let mut waited = 0;
            // SAFETY: rmdir on a NUL-terminated path; async-signal-safe.
            while unsafe { libc::rmdir(path) } != 0 {
                // SAFETY: reading errno right after the failed call.
                let busy = unsafe { *libc::__errno_location() } == libc::EBUSY;
                if !busy || waited >= WAIT_RMDIR_MS {
                    break;
                }
                sleep_ms(5);
                waited += 5;
            }
        }
        _ => {}
    }
}

/// Undo every armed slot, newest first, under the cross-process lock, and
/// remove this process's state file. Async-signal-safe.
pub fn restore_all() {
    let mut waited = 0;
    while BUSY.load(Ordering::SeqCst) > 0 && waited < WAIT_SECTION_MS {
        sleep_ms(1);
        waited += 1;
    }
    let lock = LOCK_FD.load(Ordering::Acquire);
    if lock >= 0 {
        let mut waited = 0;
        // SAFETY: flock on the lock file's descriptor this process keeps
        // open; a plain system call.
        while unsafe { libc::flock(lock, libc::LOCK_EX | libc::LOCK_NB) } != 0
            && waited < WAIT_LOCK_MS
        {
            sleep_ms(1);
            waited += 1;
        }
    }
    let mut last = u64::MAX;
    loop {
        // The armed slot with the highest seq below `last`.
        let mut pick: Option<(usize, u64)> = None;
        for (i, s) in TABLE.iter().enumerate() {
            if s.state.load(Ordering::Acquire) != ARMED {
                continue;
            }
            let q = s.seq.load(Ordering::Relaxed);
            if q < last && pick.is_none_or(|(_, b)| q > b) {
                pick = Some((i, q));
            }
        }
        let Some((i, q)) = pick else { break };
        last = q;
        undo(&TABLE[i]);
    }
    if STATE_SET.load(Ordering::Acquire) {
        // SAFETY: the path is complete and NUL-terminated once STATE_SET
        // is seen; unlink is async-signal-safe.
        unsafe { libc::unlink(STATE_PATH.0.get().cast()) };
    }
    if lock >= 0 {
        // SAFETY: as for the lock above.
        unsafe { libc::flock(lock, libc::LOCK_UN) };
    }
}

extern "C" fn on_fatal_signal(sig: libc::c_int) {
    // SAFETY: getpid is async-signal-safe.
    let me = unsafe { libc::getpid() };
    let owner = OWNER.load(Ordering::Acquire);
    if owner == 0 || owner == me {
        if DYING.swap(true, Ordering::SeqCst) {
            // Another thread's handler is restoring (two signals at once):
            // undoing twice would lower a pool twice. Wait for it.
            let mut waited = 0;
            while !RESTORED.load(Ordering::SeqCst) && waited < 2 * WAIT_SECTION_MS {
                sleep_ms(1);
                waited += 1;
            }
        } else {
            restore_all();
            RESTORED.store(true, Ordering::SeqCst);
        }
    }
    // SAFETY: signal and raise are async-signal-safe; with the default
    // action back, the raised signal (blocked while this handler runs)
    // ends the process once the handler returns.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
}

const SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// The signals the handler is installed for (the sections block them).
pub(crate) fn signals() -> [libc::c_int; 3] {
    SIGNALS
}

fn install_one(sig: libc::c_int) -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction is valid; the handler is an
    // `extern "C" fn(c_int)` that only makes async-signal-safe calls.
    let rc = unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_fatal_signal as extern "C" fn(libc::c_int) as usize;
        // The other two are blocked while it runs on this thread: one
        // restore, not one nested in another.
        libc::sigemptyset(&mut sa.sa_mask);
        for other in SIGNALS {
            libc::sigaddset(&mut sa.sa_mask, other);
        }
        sa.sa_flags = libc::SA_RESTART;
        libc::sigaction(sig, &sa, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Make SIGINT, SIGTERM and SIGHUP undo every armed slot, then end the
/// process as the signal would have.
pub fn install() -> std::io::Result<()> {
    // SAFETY: getpid has no preconditions.
    OWNER.store(unsafe { libc::getpid() }, Ordering::Release);
    for sig in SIGNALS {
        install_one(sig)?;
    }
    Ok(())
}

/// Before the first slot is armed: [`install`] the handler for each of the
/// signals whose action is still the default (a library user - a test -
/// that never called [`install`]); a handler someone else installed (the
/// Linux boot's graceful stop) or an ignored signal (`nohup`) is left.
fn ensure_installed() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if OWNER.load(Ordering::Acquire) == 0 {
            // SAFETY: getpid has no preconditions.
            OWNER.store(unsafe { libc::getpid() }, Ordering::Release);
        }
        for sig in SIGNALS {
            // SAFETY: sigaction with a null new action only reads the
            // current one into a zeroed struct.
            let old = unsafe {
                let mut old: libc::sigaction = std::mem::zeroed();
                if libc::sigaction(sig, std::ptr::null(), &mut old) != 0 {
                    continue;
                }
                old
            };
            if old.sa_sigaction == libc::SIG_DFL {
                let _ = install_one(sig);
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `restore_all` undoes every slot of the process: one test at a time.
    static ONE: std::sync::Mutex<()> = std::sync::Mutex::new(());

    #[test]
    fn armed_values_are_written_back_newest_first() {
        let _one = ONE.lock().unwrap_or_else(|e| e.into_inner());
        let dir = std::env::temp_dir().join(format!("hvmm-restore-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("value");
        // No O_TRUNC in the handler (proc and sysfs files take a write as
        // the whole value): start shorter than what is restored.
        std::fs::write(&f, "c").unwrap();
        let a = arm(&f, "oldest").unwrap();
        let b = arm(&f, "newer").unwrap();
        let other = dir.join("other");
        let c = arm(&other, "x").unwrap();
        drop(c); // disarmed: not written
        restore_all();
        assert_eq!(std::fs::read_to_string(&f).unwrap(), "oldest");
        assert!(!other.exists());
        drop((a, b));
        std::fs::write(&f, "changed").unwrap();
        restore_all();
        assert_eq!(std::fs::read_to_string(&f).unwrap(), "changed");
        assert!(arm(&f, &"x".repeat(VALUE_MAX + 1)).is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_pool_is_lowered_by_what_was_added_only() {
        let _one = ONE.lock().unwrap_or_else(|e| e.into_inner());
        let dir = std::env::temp_dir().join(format!("hvmm-restore-pool-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("nr_hugepages");
        // 100 at first, this process added 30, another process 20.
        std::fs::write(&f, "150\n").unwrap();
        let a = arm_pool(&f, 0).unwrap();
        a.set_count(30);
        restore_all();
        // Written without truncation: "120" over "150\n" leaves "120\n".
        assert_eq!(std::fs::read_to_string(&f).unwrap().trim(), "120");
        drop(a);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_shared_sysctl_is_restored_by_the_last_holder_only() {
        let _one = ONE.lock().unwrap_or_else(|e| e.into_inner());
        use std::os::fd::AsRawFd;
        let dir = std::env::temp_dir().join(format!("hvmm-restore-sysctl-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("numa_balancing");
        let hold = dir.join("hold");
        std::fs::write(&f, "1").unwrap();
        std::fs::write(&hold, "").unwrap();
        let lock_sh = |file: &std::fs::File| {
            // SAFETY: flock on a descriptor the File owns.
            assert_eq!(unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_SH) }, 0);
        };
        let mine = std::fs::File::open(&hold).unwrap();
        let other = std::fs::File::open(&hold).unwrap();
        lock_sh(&mine);
        lock_sh(&other);
        let a = arm_sysctl(&f, "0", &hold, mine.as_raw_fd()).unwrap();
        restore_all();
        // The other holder keeps the value and the hold file.
        assert_eq!(std::fs::read_to_string(&f).unwrap(), "1");
        assert!(hold.exists());
        drop(other);
        lock_sh(&mine);
        restore_all();
        assert_eq!(std::fs::read_to_string(&f).unwrap(), "0");
        assert!(!hold.exists());
        drop(a);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn numbers_format_without_allocating() {
        let mut b = [0u8; 20];
        assert_eq!(format_u64(0, &mut b), b"0");
        assert_eq!(format_u64(1280, &mut b), b"1280");
        assert_eq!(format_u64(u64::MAX, &mut b), b"18446744073709551615");
    }
}
