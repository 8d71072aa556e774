//! The `kvm:kvm_unmap_hva_range` tracepoint as an invalidation source.
//!
//! KVM emits it at the top of `kvm_mmu_notifier_invalidate_range_start()`
//! with the exact `[start, end)` of every notifier invalidation of an mm that
//! has a KVM VM attached - so this source opens `/dev/kvm` and creates a VM
//! (no vCPU, no memslot) and keeps it for its lifetime: without it the kernel
//! calls no notifier and the tracepoint never fires.
//!
//! To leave the machine's tracing state alone it uses a private tracefs
//! instance (`instances/notifier-<pid>-<n>`, its own ring buffer, only this
//! event enabled) and removes it on drop; tracefs is mounted if it is not,
//! and unmounted again on drop if this source mounted it.
//!
//! The ring buffer is asynchronous and per CPU: the kernel never waits for
//! it. Events are delivered as `Delivery::AfterTheFact` with event
//! `MmuNotifyEvent::Unknown` (the tracepoint carries no event type) and
//! `blockable: false` (nor the blockable flag). To know that everything up to
//! a point has been read, [`TraceSource::sentinel`] writes a marker into the
//! same buffer and [`TraceSource::drain_until`] reads until it shows up.

use crate::error::{is_root, Error, Result};
use crate::subscriber::{Delivery, HvaRange, Invalidation, MmuNotifyEvent, Subscribers};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const TRACEFS: &str = "/sys/kernel/tracing";
pub(crate) const EVENT: &str = "events/kvm/kvm_unmap_hva_range";
const MARK: &str = "notifier-sentinel ";

/// One `kvm_unmap_hva_range` record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct TraceEvent {
    pub range: HvaRange,
    /// Trace clock timestamp in nanoseconds.
    pub timestamp_ns: u64,
    /// The task that ran the invalidation.
    pub tid: i32,
}

impl TraceEvent {
    pub fn invalidation(&self) -> Invalidation {
        Invalidation {
            range: self.range,
            event: MmuNotifyEvent::Unknown,
            blockable: false,
            delivery: Delivery::AfterTheFact,
        }
    }
}

/// A parsed line of `trace_pipe`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TraceLine {
    Event(TraceEvent),
    Sentinel(u64),
    /// `CPU:<cpu> [LOST <n> EVENTS]`: the per-CPU ring buffer overwrote
    /// `n` events before they were read (`print_trace_line()` of
    /// kernel/trace/trace.c prints it when `iter->lost_events` is set).
    Lost {
        cpu: u32,
        events: u64,
    },
    Other,
}

impl TraceEvent {
    /// What a `[LOST n EVENTS]` line stands for: invalidations of unknown
    /// ranges, so of every address - whoever mapped anything must drop it
    /// (the SPTEs of a lost range would otherwise outlive the host's PTEs).
    pub fn lost() -> Self {
        TraceEvent {
            range: HvaRange::new(0, u64::MAX),
            timestamp_ns: 0,
            tid: -1,
        }
    }

    /// Whether this is [`TraceEvent::lost`].
    pub fn is_lost(&self) -> bool {
        self.tid == -1 && self.range == HvaRange::new(0, u64::MAX)
    }
}

/// `CPU:<cpu> [LOST <n> EVENTS]`.
fn parse_lost(line: &str) -> Option<TraceLine> {
    let rest = line.trim().strip_prefix("CPU:")?;
    let (cpu, rest) = rest.split_once(' ')?;
    let n = rest
        .trim()
        .strip_prefix("[LOST ")?
        .strip_suffix(" EVENTS]")?;
    Some(TraceLine::Lost {
        cpu: cpu.parse().ok()?,
        events: n.parse().ok()?,
    })
}

/// `<secs>.<fraction>:` in nanoseconds: 1 to 9 fraction digits (the
/// kernel prints 6, or 9 with a nanosecond clock); None for anything else
/// and for a time past `u64::MAX` ns.
fn parse_ts(tok: &str) -> Option<u64> {
    let tok = tok.strip_suffix(':')?;
    let (s, frac) = tok.split_once('.')?;
    let digits = |d: &str| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit());
    if !digits(s) || !digits(frac) || frac.len() > 9 {
        return None;
    }
    let secs: u64 = s.parse().ok()?;
    let mut ns: u64 = frac.parse().ok()?;
    for _ in frac.len()..9 {
        ns *= 10;
    }
    secs.checked_mul(1_000_000_000)?.checked_add(ns)
}

/// Remove the `notifier-<pid>-<n>` instances whose process is gone: a
/// process killed before its [`TraceSource`] dropped (a timed-out test)
/// leaves its instance behind with the event still enabled, costing every
/// later invalidation a trace record. Best effort: errors are ignored.
fn reap_dead_instances(instances: &Path) {
    let Ok(dir) = std::fs::read_dir(instances) else {
        return;
    };
    for e in dir.flatten() {
        let name = e.file_name();
        let Some(pid) = instance_pid(&name.to_string_lossy()) else {
            continue;
        };
        if Path::new("/proc").join(pid.to_string()).exists() {
            continue;
        }
        let _ = std::fs::write(e.path().join(EVENT).join("enable"), "0");
        let _ = std::fs::remove_dir(e.path());
    }
}

/// The pid in an instance name `notifier-<pid>-<n>`.
fn instance_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("notifier-")?;
    let (pid, n) = rest.split_once('-')?;
    n.parse::<u64>().ok()?;
    pid.parse().ok()
}

fn parse_hex(tok: &str) -> Option<u64> {
    u64::from_str_radix(tok.trim().trim_start_matches("0x"), 16).ok()
}

/// Parse one text line of trace_pipe, e.g.
/// `  vmm-1234  [001] ..... 12.345678: kvm_unmap_hva_range: mmu notifier unmap range: 0x7f..00 -- 0x7f..00`.
pub fn parse_line(line: &str) -> TraceLine {
    let (head, rest, is_event) = if let Some((h, r)) = line.split_once(": kvm_unmap_hva_range: ") {
        (h, r, true)
    } else if let Some((h, r)) = line.split_once(": tracing_mark_write: ") {
        (h, r, false)
    } else {
        return parse_lost(line).unwrap_or(TraceLine::Other);
    };
    if !is_event {
        return match rest
            .trim()
            .strip_prefix(MARK)
            .and_then(|n| n.trim().parse().ok())
        {
            Some(n) => TraceLine::Sentinel(n),
            None => TraceLine::Other,
        };
    }
    let toks: Vec<&str> = head.split_whitespace().collect();
    let Some(ts) = toks.last().and_then(|t| parse_ts(&format!("{t}:"))) else {
        return TraceLine::Other;
    };
    // The task is "comm-tid" in the token before "[cpu]"; comm may hold '-'.
    let tid = toks
        .iter()
        .position(|t| t.starts_with('['))
        .and_then(|i| i.checked_sub(1))
        .and_then(|i| toks.get(i))
        .and_then(|t| t.rsplit_once('-'))
        .and_then(|(_, tid)| tid.parse().ok())
        .unwrap_or(-1);
    let Some(r) = rest.split_once("range:").map(|(_, r)| r) else {
        return TraceLine::Other;
    };
    let Some((a, b)) = r.split_once("--") else {
        return TraceLine::Other;
    };
    match (parse_hex(a), parse_hex(b)) {
        (Some(start), Some(end)) => TraceLine::Event(TraceEvent {
            range: HvaRange::new(start, end),
            timestamp_ns: ts,
            tid,
        }),
        _ => TraceLine::Other,
    }
}

static INSTANCE_SEQ: AtomicU64 = AtomicU64::new(0);

/// The tracepoint source. See the module docs.
pub struct TraceSource {
    instance: PathBuf,
    pipe: Option<File>,
    marker: Option<File>,
    next_sentinel: u64,
    pending: String,
    /// Events the ring buffer dropped (`[LOST n EVENTS]`), in all.
    lost_events: u64,
    _vm: kvm_ioctls::VmFd,
    _kvm: kvm_ioctls::Kvm,
    /// The instance in this process's [`crate::hoststate`] record (removed
    /// by the next vmm after a SIGKILL).
    record: Option<u64>,
    /// Removes the instance if a fatal signal ends the process first.
    on_signal: Option<crate::restore::Armed>,
    /// Dropped after the instance is removed (field order).
    _mount: MountRef,
}

/// Process-wide tracefs use: (sources alive, mounted by this process).
static MOUNT: std::sync::Mutex<(usize, bool)> = std::sync::Mutex::new((0, false));

/// A use of tracefs; the last one unmounts it if this process mounted it.
struct MountRef {
    target: std::ffi::CString,
}

impl MountRef {
    fn acquire(root: &Path) -> Result<Self> {
        use std::os::unix::ffi::OsStrExt;
        let unavailable = |reason: &str| Error::TracefsUnavailable {
            path: root.display().to_string(),
            reason: reason.into(),
        };
        let target = std::ffi::CString::new(root.as_os_str().as_bytes())
            .map_err(|_| unavailable("path contains a NUL byte"))?;
        let mut g = MOUNT.lock().unwrap_or_else(|e| e.into_inner());
        if !root.join("instances").is_dir() {
            if !root.is_dir() {
                return Err(unavailable(
                    "directory missing (kernel without CONFIG_TRACING?)",
                ));
            }
            // SAFETY: NUL-terminated strings valid for the call; no data argument.
            let rc = unsafe {
                libc::mount(
                    c"nodev".as_ptr(),
                    target.as_ptr(),
                    c"tracefs".as_ptr(),
                    0,
                    std::ptr::null(),
                )
            };
            if rc != 0 {
                return Err(Error::TracefsMount {
                    path: root.display().to_string(),
                    source: std::io::Error::last_os_error(),
                });
            }
            g.1 = true;
        }
        g.0 += 1;
        Ok(Self { target })
    }
}

impl Drop for MountRef {
    fn drop(&mut self) {
        let mut g = MOUNT.lock().unwrap_or_else(|e| e.into_inner());
        g.0 = g.0.saturating_sub(1);
        if g.0 == 0 && g.1 {
            // SAFETY: unmounting the tracefs this process mounted, now that
            // no source of ours uses it. EBUSY (another process has files
            // open) leaves it mounted, which is harmless.
            if unsafe { libc::umount(self.target.as_ptr()) } == 0 {
                g.1 = false;
            }
        }
    }
}

fn tracefs_err(path: &Path, source: std::io::Error) -> Error {
    Error::Tracefs {
        path: path.display().to_string(),
        source,
    }
}

fn write_file(path: &Path, s: &str) -> Result<()> {
    std::fs::write(path, s).map_err(|e| tracefs_err(path, e))
}

impl TraceSource {
    /// Mount tracefs if needed, create a private instance with only
    /// `kvm:kvm_unmap_hva_range` enabled, and attach a KVM VM to this mm.
    pub fn open() -> Result<Self> {
        Self::open_at(Path::new(TRACEFS))
    }

    /// [`Self::open`] with tracefs at `root` (mounted there if needed).
    pub fn open_at(root: &Path) -> Result<Self> {
        if !is_root() {
            return Err(Error::NotRoot {
                what: "the kvm tracepoint source (tracefs)",
            });
        }
        let mount = MountRef::acquire(root)?;
        let root = root.to_path_buf();
        if !root.join(EVENT).is_dir() {
            return Err(Error::TracepointMissing {
                path: root.join(EVENT).display().to_string(),
            });
        }
        // The VM first: no VM, no events.
        let kvm = match kvm_ioctls::Kvm::new() {
            Ok(k) => k,
            Err(e) => {
                return Err(Error::Kvm {
                    reason: format!("open /dev/kvm: {e}"),
                });
            }
        };
        let vm = match kvm.create_vm() {
            Ok(v) => v,
            Err(e) => {
                return Err(Error::Kvm {
                    reason: format!("KVM_CREATE_VM: {e}"),
                });
            }
        };
        reap_dead_instances(&root.join("instances"));
        let name = format!(
            "notifier-{}-{}",
            std::process::id(),
            INSTANCE_SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let instance = root.join("instances").join(name);
        // Recorded and armed before it exists. Best effort: without the
        // record (no writable /run) only a SIGKILL leaves it behind, and
        // the reaping above removes it once this pid is gone.
        let record = crate::hoststate::section().ok().and_then(|mut sec| {
            sec.add(crate::hoststate::Entry::Tracefs {
                dir: instance.to_string_lossy().into_owned(),
            })
            .ok()
        });
        let on_signal =
            crate::restore::arm_tracefs(&instance, &instance.join(EVENT).join("enable"));
        if let Err(e) = std::fs::create_dir(&instance) {
            drop(on_signal);
            forget_record(record);
            return Err(tracefs_err(&instance, e));
        }
        let mut me = Self {
            instance: instance.clone(),
            record,
            on_signal,
            _mount: mount,
            pipe: None,
            marker: None,
            next_sentinel: 1,
            pending: String::new(),
            lost_events: 0,
            _vm: vm,
            _kvm: kvm,
        };
        // From here on, Drop undoes everything.
        write_file(&instance.join(EVENT).join("enable"), "1")?;
        me.marker = Some(
            OpenOptions::new()
                .write(true)
                .open(instance.join("trace_marker"))
                .map_err(|e| tracefs_err(&instance, e))?,
        );
        let pipe_path = instance.join("trace_pipe");
        me.pipe = Some(
            OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(&pipe_path)
                .map_err(|e| tracefs_err(&pipe_path, e))?,
        );
        if let Some(a) = &me.on_signal {
            let fd = |f: &Option<File>| f.as_ref().map_or(-1, |f| f.as_raw_fd());
            a.set_fds(fd(&me.pipe), fd(&me.marker));
        }
        Ok(me)
    }

    /// The tracefs instance directory in use.
    pub fn instance(&self) -> &Path {
        &self.instance
    }

    /// Events the ring buffer dropped so far. Each `[LOST n EVENTS]` is
    /// also returned by the drain as one [`TraceEvent::lost`] - an
    /// invalidation of everything - so no subscriber keeps a stale mapping.
    pub fn lost_events(&self) -> u64 {
        self.lost_events
    }

    /// Write a sentinel into the ring buffer; returns its number.
    pub fn sentinel(&mut self) -> Result<u64> {
        let n = self.next_sentinel;
        self.next_sentinel += 1;
        let Some(marker) = self.marker.as_mut() else {
            return Err(tracefs_err(
                &self.instance,
                std::io::Error::from(std::io::ErrorKind::NotConnected),
            ));
        };
        marker
            .write_all(format!("{MARK}{n}\n").as_bytes())
            .map_err(|e| tracefs_err(&self.instance, e))?;
        Ok(n)
    }

    /// Read events until sentinel `n` is seen (or `timeout`).
    pub fn drain_until(&mut self, n: u64, timeout: Duration) -> Result<Vec<TraceEvent>> {
        let deadline = Instant::now() + timeout;
        let mut out = Vec::new();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            while let Some(i) = self.pending.find('\n') {
                let line: String = self.pending.drain(..=i).collect();
                match parse_line(&line) {
                    TraceLine::Event(e) => out.push(e),
                    TraceLine::Sentinel(m) if m >= n => return Ok(out),
                    TraceLine::Lost { events, .. } => {
                        self.lost_events = self.lost_events.saturating_add(events);
                        out.push(TraceEvent::lost());
                    }
                    _ => {}
                }
            }
            let Some(pipe) = self.pipe.as_mut() else {
                return Ok(out);
            };
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Tracefs {
                    path: self.instance.display().to_string(),
                    source: std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!("sentinel {n} not seen in trace_pipe"),
                    ),
                });
            }
            let ms = (deadline - now).as_millis().min(100) as i32;
            let mut pfd = libc::pollfd {
                fd: pipe.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            unsafe { libc::poll(&mut pfd, 1, ms) };
            match pipe.read(&mut buf) {
                Ok(k) => self.pending.push_str(&String::from_utf8_lossy(&buf[..k])),
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        || e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(tracefs_err(&self.instance, e)),
            }
        }
    }

    /// Everything recorded so far (sentinel + drain).
    pub fn collect(&mut self) -> Result<Vec<TraceEvent>> {
        let n = self.sentinel()?;
        self.drain_until(n, Duration::from_secs(5))
    }

    /// Deliver events to subscribers: start then end, after the fact.
    pub fn deliver(subs: &Subscribers, events: &[TraceEvent]) {
        for e in events {
            let inv = e.invalidation();
            subs.start(&inv);
            subs.end(&inv);
        }
    }

    /// Collect and deliver everything recorded so far; returns the count.
    pub fn pump(&mut self, subs: &Subscribers) -> Result<usize> {
        let ev = self.collect()?;
        Self::deliver(subs, &ev);
        Ok(ev.len())
    }
}

/// The instance is gone: out of this process's record.
fn forget_record(record: Option<u64>) {
    if let Some(id) = record {
        if let Ok(mut sec) = crate::hoststate::section() {
            let _ = sec.remove(id);
        }
    }
}

/// How long dropping a [`TraceSource`] retries an instance removal that
/// says EBUSY.
const RMDIR_RETRY: std::time::Duration = std::time::Duration::from_secs(2);

impl Drop for TraceSource {
    fn drop(&mut self) {
        // The signal handler must not close descriptors about to be reused.
        if let Some(a) = &self.on_signal {
            a.set_fds(-1, -1);
        }
        // Every open file of the instance must be closed or rmdir says EBUSY.
        self.pipe = None;
        self.marker = None;
        let _ = std::fs::write(self.instance.join(EVENT).join("enable"), "0");
        // EBUSY while another process still holds one of its files: a
        // child forked by another thread of this process inherits them
        // until it exits or execs (`__remove_instance()` refuses while
        // `tr->ref` is raised). Retry briefly; what is left is reaped by
        // the next `open()` once this process is gone.
        let deadline = std::time::Instant::now() + RMDIR_RETRY;
        while let Err(e) = std::fs::remove_dir(&self.instance) {
            if e.raw_os_error() != Some(libc::EBUSY) || std::time::Instant::now() >= deadline {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        self.on_signal = None;
        if self.instance.exists() {
            // Left for the reaping (this pid dead) and the next vmm.
            return;
        }
        forget_record(self.record.take());
        // `_mount` unmounts after this, if it is the last user.
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_names_give_their_pid() {
        assert_eq!(instance_pid("notifier-4549-0"), Some(4549));
        assert_eq!(instance_pid("notifier-12-34"), Some(12));
        assert_eq!(instance_pid("notifier-x-0"), None);
        assert_eq!(instance_pid("notifier-12"), None);
        assert_eq!(instance_pid("other-12-0"), None);
    }

    #[test]
    fn missing_tracefs_is_a_typed_error() {
        match TraceSource::open_at(Path::new("/nonexistent/tracing")) {
            Err(Error::TracefsUnavailable { reason, .. }) => assert!(reason.contains("missing")),
            Err(Error::NotRoot { .. }) => {} // not root: refused before looking
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("opened a tracefs that does not exist"),
        }
    }

    #[test]
    fn parses_event_and_sentinel_lines() {
        let l = "   notifier-chec-4242    [001] d..1.  1234.567890: kvm_unmap_hva_range: mmu notifier unmap range: 0x007f0000000000 -- 0x007f0000200000\n";
        assert_eq!(
            parse_line(l),
            TraceLine::Event(TraceEvent {
                range: HvaRange::new(0x7f00_0000_0000, 0x7f00_0020_0000),
                timestamp_ns: 1_234_567_890_000,
                tid: 4242
            })
        );
        let m = "  <...>-77  [000] .....  5.000001: tracing_mark_write: notifier-sentinel 12\n";
        assert_eq!(parse_line(m), TraceLine::Sentinel(12));
        assert_eq!(parse_line("# tracer: nop"), TraceLine::Other);
    }

    #[test]
    fn lost_events_are_not_other_lines() {
        assert_eq!(
            parse_line("CPU:3 [LOST 1234 EVENTS]\n"),
            TraceLine::Lost {
                cpu: 3,
                events: 1234
            }
        );
        assert_eq!(parse_line("CPU:3 [LOST x EVENTS]"), TraceLine::Other);
        assert!(TraceEvent::lost().is_lost());
        let guest_ram = HvaRange::new(0x7f00_0000_0000, 0x7f00_4000_0000);
        assert!(TraceEvent::lost().range.overlaps(&guest_ram));
    }

    /// Found by the `trace_line` fuzz target: a timestamp past u64
    /// nanoseconds (`secs * 1e9 + ns` overflowed) panicked; a fraction of
    /// more than 9 digits was read as that many nanoseconds.
    #[test]
    fn timestamps_out_of_range_are_not_events() {
        let line = |ts: &str| {
            format!("  vmm-1 [000] ..... {ts}: kvm_unmap_hva_range: mmu notifier unmap range: 0x0 -- 0x1000")
        };
        assert_eq!(parse_line(&line("18446744073.709551616")), TraceLine::Other);
        assert_eq!(
            parse_line(&line("99999999999999999999.0")),
            TraceLine::Other
        );
        assert_eq!(parse_line(&line("1.0000000001")), TraceLine::Other);
        assert_eq!(parse_line(&line("1.-5")), TraceLine::Other);
        match parse_line(&line("18446744073.709551615")) {
            TraceLine::Event(e) => assert_eq!(e.timestamp_ns, u64::MAX),
            other => panic!("{other:?}"),
        }
        match parse_line(&line("2.5")) {
            TraceLine::Event(e) => assert_eq!(e.timestamp_ns, 2_500_000_000),
            other => panic!("{other:?}"),
        }
    }
}
