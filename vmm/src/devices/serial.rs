//! COM1: the 8250 UART (vm-superio) whose output goes to stdout, a log
//! file and the boot timeline, with its IRQ raised through an irqfd and
//! stdin fed in by the event loop.

use std::fs::File;
use std::io::{self, BufWriter, Write};
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
pub struct SerialOut {
    echo: bool,
    log: BufWriter<File>,
    timeline: Arc<Mutex<Timeline>>,
}

impl SerialOut {
    /// A sink writing to `log` and, if `echo`, to stdout.
    pub fn new(echo: bool, log: File, timeline: Arc<Mutex<Timeline>>) -> Self {
        SerialOut {
            echo,
            log: BufWriter::new(log),
            timeline,
        }
    }
}

impl Write for SerialOut {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.echo {
            let mut out = io::stdout().lock();
            out.write_all(buf)?;
            if buf.contains(&b'\n') {
                out.flush()?;
            }
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
        self.log.flush()?;
        io::stdout().flush()
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
