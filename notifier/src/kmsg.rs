//! The kernel's own detectors of a CPU that does not reschedule, as they
//! print: one classifier of their lines ([`KernelReport::classify`]), used
//! for `/dev/kmsg` here ([`Kmsg`]) and for an emulated host's console.
//!
//! The lines, in the kernel's words:
//! - `watchdog: BUG: soft lockup - CPU#1 stuck for 45s! [comm:pid]`
//!   (`watchdog_timer_fn()`, kernel/watchdog.c; fires after
//!   2 x `kernel.watchdog_thresh` seconds);
//! - `rcu: INFO: rcu_preempt self-detected stall on CPU`, `rcu: INFO:
//!   rcu_sched detected stalls on CPUs/tasks:` (`print_cpu_stall()`,
//!   `print_other_cpu_stall()`, kernel/rcu/tree_stall.h);
//! - `sched: CPU 1 need_resched set for > 100000000 ns (25 ticks) without
//!   schedule` (`resched_latency_warn()`, kernel/sched/core.c; with
//!   `sched_feat(LATENCY_WARN)`).

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::AsRawFd;

/// A report of one of the kernel's detectors, with its line verbatim.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelReport {
    pub kind: ReportKind,
    pub line: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportKind {
    /// The soft-lockup detector: the CPU was stuck this many seconds.
    SoftLockup { secs: u64 },
    /// An RCU CPU stall warning.
    RcuStall,
    /// need_resched was set this long without a schedule (ns).
    NeedResched { ns: u64 },
}

impl KernelReport {
    /// The report `line` is, if it is one (a line without one is `None`).
    pub fn classify(line: &str) -> Option<Self> {
        let kind = if let Some(secs) = soft_lockup_secs(line) {
            ReportKind::SoftLockup { secs }
        } else if line.contains("rcu: INFO:") && line.contains("stall") {
            ReportKind::RcuStall
        } else if let Some(ns) = need_resched_ns(line) {
            ReportKind::NeedResched { ns }
        } else {
            return None;
        };
        Some(KernelReport {
            kind,
            line: line.to_string(),
        })
    }

    /// Seconds of a soft lockup.
    pub fn soft_lockup_secs(&self) -> Option<u64> {
        match self.kind {
            ReportKind::SoftLockup { secs } => Some(secs),
            _ => None,
        }
    }
}

fn soft_lockup_secs(line: &str) -> Option<u64> {
    let rest = line.split_once("soft lockup - CPU#")?.1;
    let secs = rest.split_once("stuck for ")?.1.split_once("s!")?.0;
    secs.trim().parse().ok()
}

fn need_resched_ns(line: &str) -> Option<u64> {
    let rest = line.split_once("need_resched set for > ")?.1;
    rest.split_once(" ns")?.0.trim().parse().ok()
}

/// `/dev/kmsg` from the moment it was opened: each read is one record,
/// `prio,seq,usec,flags;message` (Documentation/ABI/testing/dev-kmsg).
/// The backlog before [`Kmsg::open`] is skipped (`SEEK_END`).
pub struct Kmsg {
    file: File,
    /// Records the kernel overwrote before we read them (`EPIPE`).
    pub lost: u64,
}

/// The longest record `/dev/kmsg` hands out (`CONSOLE_EXT_LOG_MAX`).
const RECORD_MAX: usize = 8192;

impl Kmsg {
    /// Opens `/dev/kmsg` non-blocking, positioned after the last record.
    /// Needs read access to it (root, or `kernel.dmesg_restrict=0`).
    pub fn open() -> io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/kmsg")?;
        // SAFETY: lseek on a descriptor `file` owns; no memory is passed.
        if unsafe { libc::lseek(file.as_raw_fd(), 0, libc::SEEK_END) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Kmsg { file, lost: 0 })
    }

    /// Every detector report the kernel logged since the last call.
    pub fn reports(&mut self) -> io::Result<Vec<KernelReport>> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; RECORD_MAX];
        loop {
            match self.file.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    let record = String::from_utf8_lossy(&buf[..n]);
                    if let Some(r) = KernelReport::classify(record_message(&record)) {
                        out.push(r);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => self.lost += 1,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }
}

/// The message of a `/dev/kmsg` record: after the first `;`, up to the
/// end of its first line (continuation lines start with a space).
fn record_message(record: &str) -> &str {
    let msg = record.split_once(';').map_or(record, |(_, m)| m);
    msg.lines().next().unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_three_detectors_lines_are_classified() {
        let r = KernelReport::classify(
            "[   82.748622] watchdog: BUG: soft lockup - CPU#1 stuck for 45s! [trace-pump:172]",
        )
        .unwrap();
        assert_eq!(r.kind, ReportKind::SoftLockup { secs: 45 });
        assert_eq!(r.soft_lockup_secs(), Some(45));
        assert_eq!(
            KernelReport::classify("rcu: INFO: rcu_preempt self-detected stall on CPU")
                .unwrap()
                .kind,
            ReportKind::RcuStall
        );
        assert_eq!(
            KernelReport::classify("rcu: INFO: rcu_sched detected stalls on CPUs/tasks:")
                .unwrap()
                .kind,
            ReportKind::RcuStall
        );
        assert_eq!(
            KernelReport::classify(
                "sched: CPU 1 need_resched set for > 100000000 ns (25 ticks) without schedule"
            )
            .unwrap()
            .kind,
            ReportKind::NeedResched { ns: 100_000_000 }
        );
        for not in [
            "soft lockup - CPU#1 stuck for xs!",
            "test soft_lockup_suite ... ok",
            "rcu: Hierarchical RCU implementation.",
            "need_resched set for > lots ns",
        ] {
            assert_eq!(KernelReport::classify(not), None, "{not}");
        }
    }

    #[test]
    fn kmsg_records_are_cut_to_their_message() {
        assert_eq!(
            record_message("0,1234,5678,-;watchdog: BUG: soft lockup - CPU#0 stuck for 23s! [a:1]\n SUBSYSTEM=x\n"),
            "watchdog: BUG: soft lockup - CPU#0 stuck for 23s! [a:1]"
        );
        assert_eq!(record_message("no header"), "no header");
        assert_eq!(record_message(""), "");
    }

    #[test]
    fn kmsg_opens_at_its_end_as_root() {
        if !crate::error::is_root() {
            return;
        }
        let mut k = Kmsg::open().expect("/dev/kmsg");
        k.reports().expect("read /dev/kmsg");
        assert_eq!(k.lost, 0);
    }
}
