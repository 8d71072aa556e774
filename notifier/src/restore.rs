//! Host values to write back if a signal ends the process before the
//! guards that changed them drop (`kernel.numa_balancing`, a hugetlb pool's
//! `nr_hugepages`: [`crate::hostconf`]).
//!
//! A guard [`arm`]s a slot with the file and the value it must get back;
//! dropping the [`Armed`] claim disarms it (the guard restores the value
//! itself first). [`install`] makes SIGINT, SIGTERM and SIGHUP write every
//! armed value back - newest first, so nested changes of one file end at
//! the oldest value - and then end the process with the signal's default
//! action, as if nothing had been caught. The handler uses only
//! async-signal-safe calls (`open`, `write`, `close`, `signal`, `raise`)
//! on bytes prepared when the slot was armed; it allocates nothing and
//! takes no lock. A command that handles the signal itself (the Linux
//! boot's graceful stop) replaces the handler for its run; its guards then
//! restore on the normal path.

use std::cell::UnsafeCell;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

const SLOTS: usize = 16;
const PATH_MAX: usize = 192;
const VALUE_MAX: usize = 48;

const FREE: u8 = 0;
const FILLING: u8 = 1;
const ARMED: u8 = 2;

struct Slot {
    state: AtomicU8,
    /// When it was armed (restore order: newest first).
    seq: AtomicU64,
    /// NUL-terminated path.
    path: UnsafeCell<[u8; PATH_MAX]>,
    value: UnsafeCell<[u8; VALUE_MAX]>,
    len: UnsafeCell<usize>,
}

// SAFETY: `path`, `value` and `len` are written only by the thread that
// moved `state` FREE -> FILLING (a compare-exchange: one owner) and read
// only while `state` is ARMED, which that thread publishes with a Release
// store after writing them and readers observe with an Acquire load; a slot
// goes back to FREE only after its owner stopped writing.
unsafe impl Sync for Slot {}

impl Slot {
    const fn new() -> Self {
        Slot {
            state: AtomicU8::new(FREE),
            seq: AtomicU64::new(0),
            path: UnsafeCell::new([0; PATH_MAX]),
            value: UnsafeCell::new([0; VALUE_MAX]),
            len: UnsafeCell::new(0),
        }
    }
}

static TABLE: [Slot; SLOTS] = [const { Slot::new() }; SLOTS];
static NEXT_SEQ: AtomicU64 = AtomicU64::new(1);

/// A slot armed with a value to write back; disarmed on drop.
#[derive(Debug)]
pub struct Armed(usize);

impl Drop for Armed {
    fn drop(&mut self) {
        if let Some(s) = TABLE.get(self.0) {
            s.state.store(FREE, Ordering::Release);
        }
    }
}

/// Arm a slot: on a fatal signal, write `value` to `path`. `None` if every
/// slot is taken or the path or value does not fit (the guard still
/// restores on drop; only the signal path is lost).
pub fn arm(path: &Path, value: &str) -> Option<Armed> {
    let p = path.as_os_str().as_bytes();
    let v = value.as_bytes();
    if p.len() >= PATH_MAX || v.len() > VALUE_MAX || p.contains(&0) {
        return None;
    }
    for (i, s) in TABLE.iter().enumerate() {
        if s.state
            .compare_exchange(FREE, FILLING, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            continue;
        }
        // SAFETY: this thread owns the slot (FREE -> FILLING above); no
        // reader looks at it until the ARMED store below.
        unsafe {
            let path_buf = &mut *s.path.get();
            path_buf[..p.len()].copy_from_slice(p);
            path_buf[p.len()] = 0;
            (&mut *s.value.get())[..v.len()].copy_from_slice(v);
            *s.len.get() = v.len();
        }
        s.seq
            .store(NEXT_SEQ.fetch_add(1, Ordering::Relaxed), Ordering::Relaxed);
        s.state.store(ARMED, Ordering::Release);
        return Some(Armed(i));
    }
    None
}

/// Write every armed value back, newest first. Async-signal-safe.
pub fn restore_all() {
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
        let Some((i, q)) = pick else { return };
        last = q;
        let s = &TABLE[i];
        // SAFETY: the slot is ARMED (Acquire above): its bytes are complete
        // and nobody writes them until it is FREE again; `path` is
        // NUL-terminated within PATH_MAX (`arm`), `len <= VALUE_MAX`. open,
        // write and close are async-signal-safe and touch no Rust state.
        unsafe {
            let fd = libc::open(
                (*s.path.get()).as_ptr().cast(),
                libc::O_WRONLY | libc::O_CLOEXEC,
            );
            if fd >= 0 {
                let _ = libc::write(fd, (*s.value.get()).as_ptr().cast(), *s.len.get());
                libc::close(fd);
            }
        }
    }
}

extern "C" fn on_fatal_signal(sig: libc::c_int) {
    restore_all();
    // SAFETY: signal and raise are async-signal-safe; with the default
    // action back, the raised signal (blocked while this handler runs)
    // ends the process once the handler returns.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
}

/// Make SIGINT, SIGTERM and SIGHUP restore every armed value, then end the
/// process as the signal would have.
pub fn install() -> std::io::Result<()> {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: a zeroed sigaction is valid; the handler is an
        // `extern "C" fn(c_int)` that only makes async-signal-safe calls.
        let rc = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_fatal_signal as extern "C" fn(libc::c_int) as usize;
            libc::sigemptyset(&mut sa.sa_mask);
            sa.sa_flags = libc::SA_RESTART;
            libc::sigaction(sig, &sa, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn armed_values_are_written_back_newest_first() {
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
}
