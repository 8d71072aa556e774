//! The host state vmm processes changed, recorded under `/run/hvmm` so that
//! it can be put back whatever ends a process - and shared, so that two vmm
//! processes never undo each other's changes.
//!
//! Files (the directory is `HVMM_STATE_DIR` if set, else `/run/hvmm`):
//!
//! * `lock`: every change of host state, its record and every restore runs
//!   under an exclusive `flock` of it (a [`Section`]; the signal handler of
//!   [`crate::restore`] takes it too, on the same descriptor).
//! * `state-<pid>`: what process `<pid>` changed and has not put back yet,
//!   rewritten atomically (a temporary file renamed over it) before each
//!   change and after each restore, removed when nothing is left:
//!
//!   ```text
//!   hvmm-state 1
//!   pid 1234
//!   start 5678            (its start time, /proc/<pid>/stat field 22)
//!   comm vmm
//!   sysctl /proc/sys/kernel/numa_balancing 0 1 <ns>   (path original set when)
//!   pool /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages 64  (pages added)
//!   tracefs /sys/kernel/tracing/instances/notifier-1234-0
//!   ```
//!
//!   Values are written with `%`-escapes for `%`, space, tab and newline.
//! * `hold-<path with / as .>`: one per sysctl some live vmm changed. Its
//!   content is the sysctl's path and its **original** value, written by the
//!   first changer; every process that changes the sysctl keeps it open
//!   with a shared `flock` until it is done. So the kernel counts the
//!   holders, and a process killed by any signal stops holding at once. A
//!   later changer takes its original from the file (not the value the
//!   first one set); the one that finds, after unlocking, that an exclusive
//!   non-blocking lock succeeds is the last and writes the original back
//!   and removes the file. One that is not the last writes back the value
//!   the newest remaining holder set, if that differs.
//!
//! Hugetlb pools need no holder count: each reservation records the pages
//! it added and gives back exactly those (read, subtract, write), so
//! another process's pages stay. Tracefs instances are private to their
//! process.
//!
//! [`recover_dead`] (run at every `vmm` start, and before the first change
//! of a process that did not run it) puts back what processes that died
//! without restoring (SIGKILL, a crash) left: for each `state-<pid>` whose
//! process is gone - `/proc/<pid>/stat` missing, a zombie, or a different
//! start time (a reused pid) - sysctls nobody holds any more get their
//! original, pools lose the pages the dead process added, its tracefs
//! instances are removed; then hold files nobody holds are restored too.
//! Each restore is reported in a line such as `restored
//! kernel.numa_balancing=0 left by dead vmm pid 1234`.

use crate::error::{Error, Result};
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

/// Where the records live unless `HVMM_STATE_DIR` says otherwise.
pub const DEFAULT_DIR: &str = "/run/hvmm";

/// The record directory.
pub fn dir() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| {
        std::env::var_os("HVMM_STATE_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DIR))
    })
    .clone()
}

/// One change a process made and has not put back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// A sysctl: its file, the value before any vmm changed it, the value
    /// this process set, and when (CLOCK_REALTIME ns: newest wins).
    Sysctl {
        path: String,
        original: String,
        set: String,
        seq: u64,
    },
    /// A hugetlb pool's `nr_hugepages` and the pages this process added.
    Pool { path: String, added: u64 },
    /// A tracefs instance directory this process created.
    Tracefs { dir: String },
}

/// A process's record: `state-<pid>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub pid: u32,
    /// Start time in clock ticks since boot (0: unknown).
    pub start: u64,
    pub comm: String,
    pub entries: Vec<Entry>,
}

/// Why a state file could not be read.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("not a vmm state file (no `hvmm-state 1` header)")]
    Header,
    #[error("line {line}: {what}")]
    Line { line: usize, what: String },
    #[error("no pid line")]
    NoPid,
}

/// `%`-escapes; the empty string is `-` (a leading `-` is escaped).
fn enc(s: &str) -> String {
    if s.is_empty() {
        return "-".into();
    }
    let mut o = String::with_capacity(s.len());
    for (i, c) in s.chars().enumerate() {
        match c {
            '-' if i == 0 => o.push_str("%2d"),
            '%' => o.push_str("%25"),
            ' ' => o.push_str("%20"),
            '\t' => o.push_str("%09"),
            '\n' => o.push_str("%0a"),
            c => o.push(c),
        }
    }
    o
}

fn dec(s: &str) -> Option<String> {
    if s == "-" {
        return Some(String::new());
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let h = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(h, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

impl Record {
    /// The file's text.
    pub fn render(&self) -> String {
        let mut s = format!(
            "hvmm-state 1\npid {}\nstart {}\ncomm {}\n",
            self.pid,
            self.start,
            enc(&self.comm)
        );
        for e in &self.entries {
            match e {
                Entry::Sysctl {
                    path,
                    original,
                    set,
                    seq,
                } => s.push_str(&format!(
                    "sysctl {} {} {} {seq}\n",
                    enc(path),
                    enc(original),
                    enc(set)
                )),
                Entry::Pool { path, added } => s.push_str(&format!("pool {} {added}\n", enc(path))),
                Entry::Tracefs { dir } => s.push_str(&format!("tracefs {}\n", enc(dir))),
            }
        }
        s
    }

    /// Read a state file's text; any malformed line is an error.
    pub fn parse(text: &str) -> std::result::Result<Self, ParseError> {
        let mut lines = text.lines().enumerate();
        if lines.next().map(|(_, l)| l.trim()) != Some("hvmm-state 1") {
            return Err(ParseError::Header);
        }
        let mut pid = None;
        let mut start = 0;
        let mut comm = String::new();
        let mut entries = Vec::new();
        for (n, line) in lines {
            let bad = |what: &str| ParseError::Line {
                line: n + 1,
                what: what.to_string(),
            };
            let f: Vec<&str> = line.split_whitespace().collect();
            let field = |i: usize| -> std::result::Result<String, ParseError> {
                f.get(i)
                    .and_then(|v| dec(v))
                    .ok_or_else(|| bad("missing or badly escaped field"))
            };
            let num = |i: usize| -> std::result::Result<u64, ParseError> {
                f.get(i)
                    .and_then(|v| v.parse().ok())
                    .ok_or_else(|| bad("not a number"))
            };
            match f.first().copied() {
                None => {}
                Some("pid") => {
                    pid = Some(u32::try_from(num(1)?).map_err(|_| bad("pid out of range"))?)
                }
                Some("start") => start = num(1)?,
                Some("comm") => comm = field(1).unwrap_or_default(),
                Some("sysctl") if f.len() == 5 => entries.push(Entry::Sysctl {
                    path: field(1)?,
                    original: field(2)?,
                    set: field(3)?,
                    seq: num(4)?,
                }),
                Some("pool") if f.len() == 3 => entries.push(Entry::Pool {
                    path: field(1)?,
                    added: num(2)?,
                }),
                Some("tracefs") if f.len() == 2 => entries.push(Entry::Tracefs { dir: field(1)? }),
                Some(_) => return Err(bad("unknown or malformed entry")),
            }
        }
        Ok(Record {
            pid: pid.ok_or(ParseError::NoPid)?,
            start,
            comm,
            entries,
        })
    }
}

/// The start time (clock ticks since boot) of `pid`, and whether it is a
/// zombie, from `/proc/<pid>/stat`; `None` if there is no such process.
fn proc_start(pid: u32) -> Option<(u64, bool)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // comm may hold spaces and parentheses: fields resume after the last ')'.
    let rest = &s[s.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let zombie = matches!(f.first().copied(), Some("Z" | "X"));
    // Field 3 (state) is f[0]; field 22 (starttime) is f[19].
    Some((f.get(19)?.parse().ok()?, zombie))
}

/// Whether the process a record names is still the one that wrote it.
pub fn alive(pid: u32, start: u64) -> bool {
    match proc_start(pid) {
        None => false,
        Some((_, true)) => false,
        Some((s, false)) => start == 0 || s == start,
    }
}

fn my_record_header() -> (u32, u64, String) {
    let pid = std::process::id();
    let start = proc_start(pid).map(|(s, _)| s).unwrap_or(0);
    let comm = std::fs::read_to_string("/proc/self/comm")
        .map(|c| c.trim().to_string())
        .unwrap_or_default();
    (pid, start, comm)
}

fn host_err(path: &Path, source: std::io::Error) -> Error {
    Error::HostState {
        path: path.display().to_string(),
        source,
    }
}

/// The hold file of the sysctl at `path`.
pub fn hold_path(path: &Path) -> PathBuf {
    let key: String = path
        .to_string_lossy()
        .trim_start_matches('/')
        .chars()
        .map(|c| {
            if c == '/' || c.is_whitespace() {
                '.'
            } else {
                c
            }
        })
        .collect();
    dir().join(format!("hold-{key}"))
}

/// A hold file's content: the sysctl's path and original value.
pub fn render_hold(path: &Path, original: &str) -> String {
    format!(
        "path {}\noriginal {}\n",
        enc(&path.to_string_lossy()),
        enc(original)
    )
}

/// `(path, original)` from a hold file's content.
pub fn parse_hold(text: &str) -> Option<(String, String)> {
    let mut path = None;
    let mut original = None;
    for l in text.lines() {
        match l.split_once(' ') {
            Some(("path", v)) => path = dec(v.trim()),
            Some(("original", v)) => original = dec(v.trim()),
            _ => {}
        }
    }
    Some((path?, original?))
}

/// A sysctl's dotted name for messages (`kernel.numa_balancing`).
fn display_name(path: &str) -> String {
    match path.strip_prefix("/proc/sys/") {
        Some(n) => n.replace('/', "."),
        None => path.to_string(),
    }
}

struct Local {
    lock: Option<File>,
    /// The directory cannot be used (no writable /run): changes are still
    /// undone on exit and on a signal, but not recorded nor shared.
    unrecorded: bool,
    entries: Vec<(u64, Entry)>,
    next_id: u64,
    header: Option<(u32, u64, String)>,
}

static LOCAL: Mutex<Local> = Mutex::new(Local {
    lock: None,
    unrecorded: false,
    entries: Vec::new(),
    next_id: 1,
    header: None,
});
static RECOVERED: AtomicBool = AtomicBool::new(false);

/// The cross-process critical section: this process's record (in-process
/// mutex), the signals of [`crate::restore`] blocked on this thread, and
/// the exclusive `flock` of `lock`. Dropping it leaves in reverse order.
pub struct Section {
    local: MutexGuard<'static, Local>,
    old_mask: libc::sigset_t,
    locked: bool,
}

fn block_signals() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset/sigaddset initialise it
    // and pthread_sigmask only changes this thread's mask, saving the old
    // one into `old`.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in crate::restore::signals() {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old);
        old
    }
}

fn flock(f: &File, op: libc::c_int) -> std::io::Result<()> {
    loop {
        // SAFETY: flock on a descriptor `f` owns for the call.
        if unsafe { libc::flock(f.as_raw_fd(), op) } == 0 {
            return Ok(());
        }
        let e = std::io::Error::last_os_error();
        if e.kind() != std::io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// Enter the section (creating the directory and the lock file if needed).
/// The first section of a process that has not run [`recover_dead`]
/// recovers first and prints what it restored on stderr.
pub fn section() -> Result<Section> {
    let mut s = enter()?;
    if !RECOVERED.swap(true, Ordering::AcqRel) {
        for m in s.recover() {
            eprintln!("vmm: {m}");
        }
    }
    Ok(s)
}

fn open_lock() -> Result<File> {
    let d = dir();
    std::fs::create_dir_all(&d).map_err(|e| host_err(&d, e))?;
    let p = d.join("lock");
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&p)
        .map_err(|e| host_err(&p, e))
}

fn enter() -> Result<Section> {
    let local = LOCAL.lock().unwrap_or_else(|e| e.into_inner());
    let old_mask = block_signals();
    crate::restore::section_enter();
    let mut s = Section {
        local,
        old_mask,
        locked: false,
    };
    if s.local.lock.is_none() && !s.local.unrecorded {
        match open_lock() {
            Ok(f) => {
                crate::restore::set_lock_fd(f.as_raw_fd());
                s.local.lock = Some(f);
            }
            Err(e) => {
                eprintln!(
                    "vmm: {e}: host changes are undone at exit and on SIGINT/SIGTERM/SIGHUP, \
                     but neither recorded for after a SIGKILL nor shared with other vmm processes"
                );
                s.local.unrecorded = true;
            }
        }
    }
    if let Some(f) = s.local.lock.as_ref() {
        flock(f, libc::LOCK_EX).map_err(|e| host_err(&dir().join("lock"), e))?;
    }
    s.locked = true;
    Ok(s)
}

impl Drop for Section {
    fn drop(&mut self) {
        if self.locked {
            if let Some(f) = self.local.lock.as_ref() {
                let _ = flock(f, libc::LOCK_UN);
            }
        }
        crate::restore::section_leave();
        // SAFETY: restores this thread's mask saved by `block_signals`.
        unsafe {
            libc::pthread_sigmask(libc::SIG_SETMASK, &self.old_mask, std::ptr::null_mut());
        }
    }
}

fn state_path(pid: u32) -> PathBuf {
    dir().join(format!("state-{pid}"))
}

/// Every `state-<pid>` file: (pid from the name, path).
fn state_files() -> Vec<(u32, PathBuf)> {
    let Ok(rd) = std::fs::read_dir(dir()) else {
        return Vec::new();
    };
    rd.flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let pid = name.strip_prefix("state-")?.parse().ok()?;
            Some((pid, e.path()))
        })
        .collect()
}

impl Section {
    /// Whether changes are recorded and shared (the directory is usable).
    pub fn recorded(&self) -> bool {
        !self.local.unrecorded
    }

    /// Record a change before it is made; returns its id.
    pub fn add(&mut self, e: Entry) -> Result<u64> {
        let id = self.local.next_id;
        self.local.next_id += 1;
        self.local.entries.push((id, e));
        if let Err(err) = self.write_state() {
            self.local.entries.retain(|(i, _)| *i != id);
            return Err(err);
        }
        Ok(id)
    }

    /// Replace entry `id`.
    pub fn update(&mut self, id: u64, e: Entry) -> Result<()> {
        for (i, x) in self.local.entries.iter_mut() {
            if *i == id {
                *x = e.clone();
            }
        }
        self.write_state()
    }

    /// The change `id` was put back.
    pub fn remove(&mut self, id: u64) -> Result<()> {
        self.local.entries.retain(|(i, _)| *i != id);
        self.write_state()
    }

    fn write_state(&mut self) -> Result<()> {
        if self.local.unrecorded {
            return Ok(());
        }
        let (pid, start, comm) = self
            .local
            .header
            .get_or_insert_with(my_record_header)
            .clone();
        let path = state_path(pid);
        if self.local.entries.is_empty() {
            return match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(host_err(&path, e)),
                _ => Ok(()),
            };
        }
        crate::restore::set_state_path(&path);
        let rec = Record {
            pid,
            start,
            comm,
            entries: self.local.entries.iter().map(|(_, e)| e.clone()).collect(),
        };
        let tmp = dir().join(format!("state-{pid}.tmp"));
        std::fs::write(&tmp, rec.render()).map_err(|e| host_err(&tmp, e))?;
        std::fs::rename(&tmp, &path).map_err(|e| host_err(&path, e))
    }

    /// The value the newest other holder of the sysctl at `path` set: this
    /// process's other entries and live processes' records.
    pub fn newest_other_set(&self, path: &str, except: u64) -> Option<String> {
        let mut best: Option<(u64, String)> = None;
        let mut consider = |e: &Entry| {
            if let Entry::Sysctl {
                path: p, set, seq, ..
            } = e
            {
                if p == path && best.as_ref().is_none_or(|(b, _)| seq > b) {
                    best = Some((*seq, set.clone()));
                }
            }
        };
        for (i, e) in &self.local.entries {
            if *i != except {
                consider(e);
            }
        }
        let me = std::process::id();
        for (pid, p) in state_files() {
            if pid == me {
                continue;
            }
            let Ok(rec) = std::fs::read_to_string(&p)
                .map_err(|_| ())
                .and_then(|t| Record::parse(&t).map_err(|_| ()))
            else {
                continue;
            };
            if !alive(rec.pid, rec.start) {
                continue;
            }
            rec.entries.iter().for_each(&mut consider);
        }
        best.map(|(_, v)| v)
    }

    /// Put back what dead processes left; returns one line per restore.
    pub fn recover(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        let me = std::process::id();
        for (pid, p) in state_files() {
            if pid == me {
                continue;
            }
            let rec = match std::fs::read_to_string(&p) {
                Ok(t) => Record::parse(&t),
                Err(_) => continue,
            };
            let rec = match rec {
                Ok(r) => r,
                Err(e) => {
                    if !alive(pid, 0) {
                        out.push(format!(
                            "removed unreadable state file {} of dead vmm pid {pid} ({e}); nothing restored from it",
                            p.display()
                        ));
                        let _ = std::fs::remove_file(&p);
                    }
                    continue;
                }
            };
            if alive(rec.pid, rec.start) {
                continue;
            }
            for e in &rec.entries {
                if let Some(m) = undo_dead(e) {
                    out.push(format!("{m} left by dead vmm pid {}", rec.pid));
                }
            }
            let _ = std::fs::remove_file(&p);
            let _ = std::fs::remove_file(dir().join(format!("state-{pid}.tmp")));
        }
        // Hold files nobody holds whose record is gone (a handler that
        // removed the record and was killed before restoring).
        if let Ok(rd) = std::fs::read_dir(dir()) {
            for e in rd.flatten() {
                if !e.file_name().to_string_lossy().starts_with("hold-") {
                    continue;
                }
                if let Some(m) = restore_unheld(&e.path(), None) {
                    out.push(format!("{m} left by a dead vmm"));
                }
            }
        }
        out
    }
}

/// If nobody holds the hold file at `hold`, write its original back and
/// remove it; the message says what was restored.
fn restore_unheld(hold: &Path, fallback: Option<(&str, &str)>) -> Option<String> {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(hold)
        .ok()?;
    // SAFETY: flock on the descriptor `f` owns.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return None; // a live vmm holds it and will restore it
    }
    let mut text = String::new();
    let _ = f.read_to_string(&mut text);
    let (path, original) = match parse_hold(&text) {
        Some(x) => x,
        None => {
            let (p, o) = fallback?;
            (p.to_string(), o.to_string())
        }
    };
    let _ = std::fs::remove_file(hold);
    let now = std::fs::read_to_string(&path).unwrap_or_default();
    if now.trim() == original {
        return None;
    }
    std::fs::write(&path, &original).ok()?;
    Some(format!("restored {}={original}", display_name(&path)))
}

fn undo_dead(e: &Entry) -> Option<String> {
    match e {
        Entry::Sysctl { path, original, .. } => {
            restore_unheld(&hold_path(Path::new(path)), Some((path, original)))
        }
        Entry::Pool { path, added } => {
            let nr: u64 = std::fs::read_to_string(path).ok()?.trim().parse().ok()?;
            let to = nr.saturating_sub(*added);
            std::fs::write(path, to.to_string()).ok()?;
            let now: u64 = std::fs::read_to_string(path)
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(to);
            let pool = Path::new(path)
                .parent()
                .and_then(Path::file_name)
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            Some(format!(
                "restored {pool}/nr_hugepages={now} (-{added} pages)"
            ))
        }
        Entry::Tracefs { dir } => {
            let d = Path::new(dir);
            if !d.is_dir() {
                return None;
            }
            let _ = std::fs::write(d.join(crate::trace::EVENT).join("enable"), "0");
            std::fs::remove_dir(d).ok()?;
            Some(format!("removed tracefs instance {dir}"))
        }
    }
}

/// Put back what dead vmm processes left (see the module docs); returns
/// one line per restore. Cheap when there is nothing: a missing directory
/// is not even locked. Without root nothing can be restored; then the
/// lines say what is left.
pub fn recover_dead() -> Vec<String> {
    RECOVERED.store(true, Ordering::Release);
    let d = dir();
    if !d.is_dir() {
        return Vec::new();
    }
    if !crate::error::is_root() {
        let me = std::process::id();
        return state_files()
            .into_iter()
            .filter(|(pid, _)| *pid != me && !alive(*pid, 0))
            .map(|(pid, p)| {
                format!(
                    "{} of dead vmm pid {pid} needs root to be restored",
                    p.display()
                )
            })
            .collect();
    }
    match enter() {
        Ok(mut s) => s.recover(),
        Err(e) => vec![format!("cannot restore what dead vmm processes left: {e}")],
    }
}

/// A hold on a sysctl (see the module docs): its hold file open and locked
/// shared, its original. [`crate::hostconf::SysctlGuard`] uses it.
#[derive(Debug)]
pub(crate) struct SysctlHold {
    pub path: PathBuf,
    pub original: String,
    hold: PathBuf,
    /// The hold file, locked shared; `None` when unrecorded (not shared).
    file: Option<File>,
    id: u64,
    armed: Option<crate::restore::Armed>,
}

impl SysctlHold {
    /// Hold `path` and set it to `value`.
    pub fn set(path: &Path, value: &str) -> Result<Self> {
        let mut sec = section()?;
        let hold = hold_path(path);
        if !sec.recorded() {
            let now = std::fs::read_to_string(path).map_err(|source| Error::Sysctl {
                path: path.display().to_string(),
                source,
            })?;
            let original = now.trim().to_string();
            let me = SysctlHold {
                path: path.to_path_buf(),
                armed: crate::restore::arm(path, &original),
                original,
                hold,
                file: None,
                id: 0,
            };
            if let Err(source) = std::fs::write(path, value) {
                me.release_in(&mut sec);
                return Err(Error::Sysctl {
                    path: path.display().to_string(),
                    source,
                });
            }
            return Ok(me);
        }
        let mut tries = 0;
        let mut file = loop {
            tries += 1;
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&hold)
                .map_err(|e| host_err(&hold, e))?;
            flock(&f, libc::LOCK_SH).map_err(|e| host_err(&hold, e))?;
            // A dying holder's handler that could not get the lock in
            // time may have unlinked it meanwhile: hold the file that is
            // there.
            use std::os::unix::fs::MetadataExt;
            let same = match (f.metadata(), std::fs::metadata(&hold)) {
                (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
                _ => false,
            };
            if same {
                break f;
            }
            if tries >= 8 {
                return Err(host_err(
                    &hold,
                    std::io::Error::other("the hold file keeps being replaced"),
                ));
            }
        };
        let mut text = String::new();
        file.read_to_string(&mut text)
            .map_err(|e| host_err(&hold, e))?;
        let original = match parse_hold(&text) {
            Some((_, o)) => o,
            None => {
                let now = std::fs::read_to_string(path).map_err(|source| Error::Sysctl {
                    path: path.display().to_string(),
                    source,
                })?;
                let o = now.trim().to_string();
                file.set_len(0).map_err(|e| host_err(&hold, e))?;
                file.rewind().map_err(|e| host_err(&hold, e))?;
                file.write_all(render_hold(path, &o).as_bytes())
                    .map_err(|e| host_err(&hold, e))?;
                o
            }
        };
        let seq = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        let id = sec.add(Entry::Sysctl {
            path: path.to_string_lossy().into_owned(),
            original: original.clone(),
            set: value.to_string(),
            seq,
        })?;
        let armed = crate::restore::arm_sysctl(path, &original, &hold, file.as_raw_fd());
        let me = SysctlHold {
            path: path.to_path_buf(),
            original,
            hold,
            file: Some(file),
            id,
            armed,
        };
        if let Err(source) = std::fs::write(path, value) {
            me.release_in(&mut sec);
            return Err(Error::Sysctl {
                path: path.display().to_string(),
                source,
            });
        }
        Ok(me)
    }

    fn release_in(mut self, sec: &mut Section) {
        drop(self.armed.take());
        let Some(file) = self.file.take() else {
            let _ = std::fs::write(&self.path, &self.original);
            return;
        };
        let _ = flock(&file, libc::LOCK_UN);
        // SAFETY: flock on the descriptor `file` owns.
        let last = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0;
        if last {
            let _ = std::fs::write(&self.path, &self.original);
            let _ = std::fs::remove_file(&self.hold);
        } else if let Some(v) = sec.newest_other_set(&self.path.to_string_lossy(), self.id) {
            let now = std::fs::read_to_string(&self.path).unwrap_or_default();
            if now.trim() != v {
                let _ = std::fs::write(&self.path, &v);
            }
        }
        drop(file);
        let _ = sec.remove(self.id);
    }

    /// Give the hold up: the last holder writes the original back.
    pub fn release(self) {
        match section() {
            Ok(mut sec) => self.release_in(&mut sec),
            Err(_) => {
                // No lock (cannot happen once one was had): restore alone.
                let _ = std::fs::write(&self.path, &self.original);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let r = Record {
            pid: 1234,
            start: 5678,
            comm: "vmm x".into(),
            entries: vec![
                Entry::Sysctl {
                    path: "/proc/sys/kernel/numa_balancing".into(),
                    original: "0".into(),
                    set: "1".into(),
                    seq: 42,
                },
                Entry::Sysctl {
                    path: "/proc/sys/kernel/printk".into(),
                    original: "4\t4 1 7%".into(),
                    set: "".into(),
                    seq: 43,
                },
                Entry::Sysctl {
                    path: "/x".into(),
                    original: "-1".into(),
                    set: "-".into(),
                    seq: 44,
                },
                Entry::Pool {
                    path: "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages".into(),
                    added: 64,
                },
                Entry::Tracefs {
                    dir: "/sys/kernel/tracing/instances/notifier-1234-0".into(),
                },
            ],
        };
        let t = r.render();
        assert!(
            t.contains("sysctl /proc/sys/kernel/numa_balancing 0 1 42\n"),
            "{t}"
        );
        assert_eq!(Record::parse(&t), Ok(r));
    }

    #[test]
    fn bad_state_files_are_errors_not_panics() {
        assert_eq!(Record::parse(""), Err(ParseError::Header));
        assert_eq!(Record::parse("garbage\n"), Err(ParseError::Header));
        assert_eq!(Record::parse("hvmm-state 1\n"), Err(ParseError::NoPid));
        assert!(matches!(
            Record::parse("hvmm-state 1\npid x\n"),
            Err(ParseError::Line { line: 2, .. })
        ));
        assert!(matches!(
            Record::parse("hvmm-state 1\npid 1\npool /x\n"),
            Err(ParseError::Line { line: 3, .. })
        ));
        assert!(matches!(
            Record::parse("hvmm-state 1\npid 1\nsysctl /x %zz 1 2\n"),
            Err(ParseError::Line { line: 3, .. })
        ));
        assert!(matches!(
            Record::parse("hvmm-state 1\npid 1\nwhat\n"),
            Err(ParseError::Line { line: 3, .. })
        ));
    }

    #[test]
    fn hold_files_round_trip() {
        let p = Path::new("/proc/sys/kernel/watchdog_thresh");
        let t = render_hold(p, "10");
        assert_eq!(
            parse_hold(&t),
            Some(("/proc/sys/kernel/watchdog_thresh".into(), "10".into()))
        );
        assert_eq!(parse_hold(""), None);
        assert!(hold_path(p).ends_with("hold-proc.sys.kernel.watchdog_thresh"));
        assert_eq!(
            display_name("/proc/sys/kernel/numa_balancing"),
            "kernel.numa_balancing"
        );
    }

    #[test]
    fn this_process_is_alive_and_a_reused_pid_is_not() {
        let (pid, start, _) = my_record_header();
        assert!(start > 0);
        assert!(alive(pid, start));
        assert!(alive(pid, 0));
        assert!(!alive(pid, start + 1));
        assert!(!alive(u32::MAX - 1, 0));
    }
}
