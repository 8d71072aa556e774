//! Legacy port-I/O devices: the COM1 8250 (vm-superio) whose output goes to
//! stdout, a log file and the boot timeline; the i8042 reset line; and the
//! port-I/O dispatch of the vCPU loop.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, Events, MutEventSubscriber};
use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::timeline::Timeline;

/// COM1.
pub const COM1_BASE: u16 = 0x3f8;
/// COM1's IRQ line.
pub const COM1_GSI: u32 = 4;
/// i8042 command/status port.
pub const I8042_CMD: u16 = 0x64;
/// i8042 data port.
pub const I8042_DATA: u16 = 0x60;
/// i8042 command: pulse the CPU reset line.
pub const I8042_RESET: u8 = 0xfe;

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

/// What a port write asks the VMM to do.
#[derive(Debug, PartialEq, Eq)]
pub enum PioAction {
    /// Nothing.
    None,
    /// The guest pulsed the reset line (i8042 0xFE).
    Reset,
}

/// Port-I/O dispatch for the vCPU thread.
pub struct PioBus {
    /// COM1.
    pub serial: Arc<Mutex<SerialDevice>>,
}

impl PioBus {
    /// Guest `in` from `port`.
    pub fn io_in(&self, port: u16, data: &mut [u8]) {
        match port {
            // `rep insb` arrives as several bytes for the same port.
            p if (COM1_BASE..COM1_BASE + 8).contains(&p) => {
                if let Ok(mut s) = self.serial.lock() {
                    for b in data.iter_mut() {
                        *b = s.read((p - COM1_BASE) as u8);
                    }
                }
            }
            // i8042 status/data: nothing to read, input buffer empty.
            I8042_CMD | I8042_DATA => data.fill(0),
            // CMOS/RTC: zeros (no update in progress, a valid-looking clock).
            0x70 | 0x71 => data.fill(0),
            _ => data.fill(0xff),
        }
    }

    /// Guest `out` to `port`.
    pub fn io_out(&self, port: u16, data: &[u8]) -> PioAction {
        match port {
            // `rep outsb` arrives as several bytes for the same port.
            p if (COM1_BASE..COM1_BASE + 8).contains(&p) => {
                if let Ok(mut s) = self.serial.lock() {
                    for &b in data {
                        // A failed stdout/log write must not stop the guest.
                        let _ = s.write((p - COM1_BASE) as u8, b);
                    }
                }
                PioAction::None
            }
            I8042_CMD if data.first() == Some(&I8042_RESET) => PioAction::Reset,
            _ => PioAction::None,
        }
    }
}

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
            let _ = s.enqueue_raw_bytes(&buf[..n as usize]);
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        // stdin may be a file or /dev/null, which epoll refuses: no input then.
        let _ = ops.add(Events::new_raw(0, EventSet::IN));
    }
}

/// Ends the event loop when the vCPU thread is done.
pub struct ExitWatch {
    /// Written by the vCPU thread when it stops.
    pub evt: EventFd,
    /// Set once the event fires.
    pub done: Arc<std::sync::atomic::AtomicBool>,
}

impl MutEventSubscriber for ExitWatch {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.evt.read();
        self.done.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new(&self.evt, EventSet::IN));
    }
}
