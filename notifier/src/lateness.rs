//! A `SCHED_FIFO` watchdog pinned to one CPU that wakes every period: its
//! worst wake-up lateness is the longest stretch in which that CPU did not
//! reschedule. A FIFO thread whose timer fired preempts anything
//! `SCHED_OTHER` at the CPU's next schedule point, so kernel code that runs
//! on without one - an rmap walk in an mmu-notifier that never reaches
//! `cond_resched()` - holds it off for exactly that long. (A `SCHED_OTHER`
//! spinner would measure the fair scheduler's slices instead: about half
//! these figures, PLATFORM.md.)
//!
//! The thread owns nothing but its counters; it stops when the watchdog is
//! dropped, and a thread that died makes [`LatenessWatchdog::measure`]
//! fail instead of reporting a quiet CPU.

use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::convert::duration_ns;
use crate::sched::mono_ns;

#[derive(Debug, thiserror::Error)]
pub enum LatenessError {
    #[error("lateness watchdog: cannot pin to CPU {cpu}: {source}")]
    Pin {
        cpu: usize,
        #[source]
        source: io::Error,
    },
    #[error("lateness watchdog: SCHED_FIFO priority {priority} refused ({source}): run as root (or with CAP_SYS_NICE)")]
    Fifo {
        priority: i32,
        #[source]
        source: io::Error,
    },
    #[error("lateness watchdog: cannot spawn its thread: {0}")]
    Spawn(#[source] io::Error),
    #[error("lateness watchdog: its thread ended while measuring")]
    Died,
}

#[derive(Debug, Default)]
struct Counters {
    stop: AtomicBool,
    /// Worst lateness since the last [`LatenessWatchdog::take_worst`] (ns).
    worst_ns: AtomicU64,
    wakeups: AtomicU64,
}

/// The running watchdog.
pub struct LatenessWatchdog {
    counters: Arc<Counters>,
    thread: Option<JoinHandle<()>>,
    period: Duration,
    cpu: usize,
}

/// Sleep until the `CLOCK_MONOTONIC` time `at_ns`.
fn sleep_until(at_ns: u64) {
    let ts = libc::timespec {
        tv_sec: libc::time_t::try_from(at_ns / 1_000_000_000).unwrap_or(libc::time_t::MAX),
        tv_nsec: libc::c_long::try_from(at_ns % 1_000_000_000).unwrap_or(0),
    };
    // SAFETY: `ts` is a valid timespec; the remainder pointer may be null
    // with TIMER_ABSTIME. EINTR just ends this sleep early (the loop
    // measures from the deadline, so an early wake is not lateness).
    unsafe {
        libc::clock_nanosleep(
            libc::CLOCK_MONOTONIC,
            libc::TIMER_ABSTIME,
            &ts,
            std::ptr::null_mut(),
        )
    };
}

impl LatenessWatchdog {
    /// Starts the watchdog on `cpu`, waking every `period`, at `SCHED_FIFO`
    /// `priority`. Returns once the thread runs there (or why it cannot).
    pub fn start(cpu: usize, period: Duration, priority: i32) -> Result<Self, LatenessError> {
        let counters = Arc::new(Counters::default());
        let c = counters.clone();
        let period_ns = duration_ns(period).max(1);
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(format!("lateness-cpu{cpu}"))
            .spawn(move || {
                let setup = crate::sched::pin_to_cpu(cpu)
                    .map_err(|source| LatenessError::Pin { cpu, source })
                    .and_then(|()| {
                        crate::sched::set_fifo(priority)
                            .map_err(|source| LatenessError::Fifo { priority, source })
                    });
                let ok = setup.is_ok();
                let _ = ready_tx.send(setup);
                if ok {
                    watch(&c, period_ns);
                }
            })
            .map_err(LatenessError::Spawn)?;
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(LatenessWatchdog {
                counters,
                thread: Some(thread),
                period,
                cpu,
            }),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => Err(LatenessError::Died),
        }
    }

    /// The CPU it watches.
    pub fn cpu(&self) -> usize {
        self.cpu
    }

    /// Wake-ups so far.
    pub fn wakeups(&self) -> u64 {
        self.counters.wakeups.load(Ordering::Relaxed)
    }

    /// The worst lateness since the last call (and starts a new window).
    pub fn take_worst(&self) -> Duration {
        Duration::from_nanos(self.counters.worst_ns.swap(0, Ordering::AcqRel))
    }

    /// Runs `f` and returns its result with the worst lateness seen from
    /// just before it to two periods after it (so the late wake-up that
    /// ends a stretch `f` caused has landed).
    pub fn measure<T>(&self, f: impl FnOnce() -> T) -> Result<(T, Duration), LatenessError> {
        self.alive()?;
        let woke = self.wakeups();
        self.take_worst();
        let out = f();
        std::thread::sleep(self.period * 2);
        // The thread woke at least once since: it is still watching.
        let deadline = std::time::Instant::now() + self.period * 100 + Duration::from_secs(1);
        while self.wakeups() == woke {
            self.alive()?;
            if std::time::Instant::now() > deadline {
                return Err(LatenessError::Died);
            }
            std::thread::sleep(self.period);
        }
        Ok((out, self.take_worst()))
    }

    fn alive(&self) -> Result<(), LatenessError> {
        match &self.thread {
            Some(t) if !t.is_finished() => Ok(()),
            _ => Err(LatenessError::Died),
        }
    }
}

/// The watchdog's loop: sleep to the next deadline; lateness is how long
/// after it the thread ran. Missed deadlines are skipped, not queued (one
/// stretch is one late wake-up).
fn watch(c: &Counters, period_ns: u64) {
    let mut next = mono_ns().saturating_add(period_ns);
    while !c.stop.load(Ordering::Relaxed) {
        sleep_until(next);
        let now = mono_ns();
        if now < next {
            continue;
        }
        c.worst_ns.fetch_max(now - next, Ordering::AcqRel);
        c.wakeups.fetch_add(1, Ordering::Relaxed);
        next = next.saturating_add(period_ns).max(now.saturating_add(1));
    }
}

impl Drop for LatenessWatchdog {
    fn drop(&mut self) {
        self.counters.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A higher-priority FIFO thread spinning on the watched CPU is a
    /// stretch in which the watchdog cannot run: it is measured, and the
    /// window after it starts afresh. (A shared machine may steal the CPU
    /// for a while in any window, so quiet windows are bounded only as a
    /// pair: at least one of them is shorter than the stretch.)
    #[test]
    fn a_stretch_that_holds_the_cpu_is_measured() {
        if !crate::error::is_root() {
            if std::env::var_os("CI").is_some() {
                panic!("CI=true: this test needs root (SCHED_FIFO)");
            }
            eprintln!("SKIP: needs root (SCHED_FIFO)");
            return;
        }
        let w = LatenessWatchdog::start(0, Duration::from_millis(1), 10).unwrap();
        assert_eq!(w.cpu(), 0);
        let ((), quiet) = w
            .measure(|| std::thread::sleep(Duration::from_millis(30)))
            .unwrap();
        assert!(w.wakeups() >= 3, "{} wake-ups in 30 ms", w.wakeups());
        let hold = Duration::from_millis(40);
        let ((), held) = w
            .measure(|| {
                std::thread::spawn(move || {
                    crate::sched::pin_to_cpu(0).unwrap();
                    crate::sched::set_fifo(20).unwrap();
                    let t0 = std::time::Instant::now();
                    while t0.elapsed() < hold {
                        std::hint::spin_loop();
                    }
                })
                .join()
                .unwrap();
            })
            .unwrap();
        assert!(held >= hold - Duration::from_millis(5), "held {held:?}");
        let ((), after) = w.measure(|| ()).unwrap();
        assert!(
            quiet.min(after) < hold,
            "quiet {quiet:?}, after {after:?}, held {held:?}"
        );
    }

    #[test]
    fn a_refused_priority_is_a_typed_error() {
        assert!(matches!(
            LatenessWatchdog::start(0, Duration::from_millis(1), 1000),
            Err(LatenessError::Fifo { priority: 1000, .. })
        ));
        assert!(matches!(
            LatenessWatchdog::start(1 << 20, Duration::from_millis(1), 10),
            Err(LatenessError::Pin { .. })
        ));
    }
}
