//! COM1: the 8250 UART (vm-superio) whose output goes to stdout, a log
//! file and the boot timeline, with its IRQ raised through an irqfd and
//! stdin fed in by the event loop.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::report::timeline::Timeline;

/// COM1's first port.
pub const COM1_BASE: u16 = 0x3f8;
/// COM1's IRQ line.
pub const COM1_GSI: u32 = 4;

/// An eventfd the serial device raises its IRQ through (registered as irqfd).
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Where serial output goes: stdout (unless quiet), the log file, the timeline.
///
/// The vCPU thread writes here with the serial lock held, so nothing here
/// may block on a reader: stdout is written by a [`Console`] thread fed
/// through a bounded queue. When stdout is not read (`vmm boot | sleep`),
/// the queue fills and further echo is dropped and counted
/// ([`SerialOut::echo_dropped`]); the log file still gets every byte.
pub struct SerialOut {
    echo: Option<Console>,
    log: BufWriter<File>,
    timeline: Arc<Mutex<Timeline>>,
}

/// Chunks of console output queued for stdout at most (each a `write`
/// from the UART: usually one byte, a line at most).
const CONSOLE_QUEUE: usize = 4096;

/// The stdout writer thread and its queue.
struct Console {
    /// `None` once dropping.
    tx: Option<SyncSender<Vec<u8>>>,
    dropped: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// How long a [`Console`] that goes waits for stdout to take what is
/// queued (a reader that keeps up drains in microseconds).
const CONSOLE_DRAIN: std::time::Duration = std::time::Duration::from_secs(2);

impl Console {
    /// `None` if the thread cannot be spawned (no echo then).
    fn start() -> Option<Self> {
        let (tx, rx) = sync_channel::<Vec<u8>>(CONSOLE_QUEUE);
        let thread = std::thread::Builder::new()
            .name("console".into())
            .spawn(move || {
                // Ends when the sender goes; waited for a bounded time
                // only (a stalled stdout must not hold up the VMM's exit).
                let mut out = io::stdout().lock();
                for chunk in rx {
                    if out.write_all(&chunk).is_err() {
                        return; // stdout closed: nothing more to echo
                    }
                    if chunk.contains(&b'\n') {
                        let _ = out.flush();
                    }
                }
                let _ = out.flush();
            })
            .ok()?;
        Some(Console {
            tx: Some(tx),
            dropped: Arc::new(AtomicU64::new(0)),
            thread: Some(thread),
        })
    }

    fn send(&self, buf: &[u8]) {
        let sent = self.tx.as_ref().map(|tx| tx.try_send(buf.to_vec()));
        if let Some(Err(TrySendError::Full(_) | TrySendError::Disconnected(_))) | None = sent {
            self.dropped.fetch_add(buf.len() as u64, Ordering::Relaxed);
        }
    }
}

impl Drop for Console {
    /// Let stdout take what is queued, for [`CONSOLE_DRAIN`] at most; a
    /// reader that stalls longer loses the rest (the log has it).
    fn drop(&mut self) {
        drop(self.tx.take());
        let t0 = std::time::Instant::now();
        while self.thread.as_ref().is_some_and(|t| !t.is_finished()) && t0.elapsed() < CONSOLE_DRAIN
        {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        if let Some(t) = self.thread.take().filter(|t| t.is_finished()) {
            let _ = t.join();
        }
    }
}

impl SerialOut {
    /// A sink writing to `log` and, if `echo`, to stdout.
    pub fn new(echo: bool, log: File, timeline: Arc<Mutex<Timeline>>) -> Self {
        SerialOut {
            echo: if echo { Console::start() } else { None },
            log: BufWriter::new(log),
            timeline,
        }
    }

    /// The count of console bytes not echoed to stdout because it was not
    /// read fast enough (or was closed); they are in the log file.
    pub fn echo_dropped(&self) -> Option<Arc<AtomicU64>> {
        self.echo.as_ref().map(|c| c.dropped.clone())
    }
}

impl Write for SerialOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if let Some(c) = &self.echo {
            c.send(buf);
        }
        self.log.write_all(buf)?;
        if buf.contains(&b'\n') {
            self.log.flush()?;
        }
        if let Ok(mut t) = self.timeline.lock() {
            t.feed(buf);
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        self.log.flush()
    }
}

/// The COM1 device.
pub type SerialDevice = Serial<IrqTrigger, NoEvents, SerialOut>;

/// Feeds stdin into the serial device (event-manager subscriber).
pub struct StdinInput {
    /// COM1.
    pub serial: Arc<Mutex<SerialDevice>>,
}

impl MutEventSubscriber for StdinInput {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let mut buf = [0u8; 64];
        // SAFETY: reading into a valid, owned buffer of the given length from fd 0.
        let n = unsafe { libc::read(0, buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 || events.event_set().contains(EventSet::HANG_UP) {
            let _ = ops.remove(events);
            return;
        }
        if let Ok(mut s) = self.serial.lock() {
            let n = usize::try_from(n).unwrap_or(0).min(buf.len());
            let _ = s.enqueue_raw_bytes(&buf[..n]);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        // stdin may be a file or /dev/null, which epoll refuses: no input then.
        let _ = ops.add(Events::new_raw(0, EventSet::IN));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the Linux 8250 driver's interrupt-driven TX relies on
    /// (`serial8250_start_tx` sets IER.THRI and waits for the THRE
    /// interrupt; `serial8250_do_startup`'s UART_BUG_THRE test expects it
    /// raised again after IER is cleared and set): with THR empty, which
    /// it always is here, enabling THRI raises the IRQ at once, each time.
    #[test]
    fn ier_thri_with_an_empty_thr_raises_the_irq() {
        let evt = EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).unwrap();
        let mut uart = Serial::new(IrqTrigger(evt.try_clone().unwrap()), Vec::new());
        const IER: u8 = 1;
        const IIR: u8 = 2;
        const THRI: u8 = 0x02;
        assert!(evt.read().is_err(), "no interrupt before IER is written");
        for round in 0..2 {
            uart.write(IER, THRI).unwrap();
            assert_eq!(evt.read().unwrap(), 1, "round {round}: IRQ raised");
            // IIR: THRE pending (0x02, FIFO bits set), then cleared.
            assert_eq!(uart.read(IIR) & 0x0f, 0x02, "round {round}");
            assert_eq!(uart.read(IIR) & 0x0f, 0x01, "round {round}");
            uart.write(IER, 0).unwrap();
        }
        // A byte written while THRI is on raises it again (TX continues).
        uart.write(IER, THRI).unwrap();
        let _ = evt.read();
        let _ = uart.read(IIR);
        uart.write(0, b'x').unwrap();
        assert_eq!(evt.read().unwrap(), 1);
        assert_eq!(uart.writer().as_slice(), b"x");
    }
}
