//! The Linux guest's legacy port-I/O devices and their dispatch from the
//! vCPU's `KVM_EXIT_IO`: COM1 ([`serial`]), the i8042 reset line, and the
//! CMOS/RTC read as zeros, and the latency probe's channel ([`probe`]).

pub mod probe;
pub mod serial;

use std::sync::{Arc, Mutex};

use serial::{SerialDevice, COM1_BASE};

/// i8042 command/status port.
pub const I8042_CMD: u16 = 0x64;
/// i8042 data port.
pub const I8042_DATA: u16 = 0x60;
/// i8042 command: pulse the CPU reset line.
pub const I8042_RESET: u8 = 0xfe;
/// CMOS/RTC index and data ports.
pub const CMOS_INDEX: u16 = 0x70;
pub const CMOS_DATA: u16 = 0x71;

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
    /// The latency probe's ports, when the VMM listens on them.
    pub probe: Option<Arc<probe::ProbeChannel>>,
}

impl PioBus {
    /// Guest `in` from `port`.
    pub fn io_in(&self, port: u16, data: &mut [u8]) {
        match port {
            // `rep insb` arrives as several bytes for the same port.
            p if (COM1_BASE..COM1_BASE + 8).contains(&p) => {
                if let Ok(mut s) = self.serial.lock() {
                    for b in data.iter_mut() {
                        *b = s.read(com1_offset(p));
                    }
                }
            }
            // i8042 status/data: nothing to read, input buffer empty.
            I8042_CMD | I8042_DATA => data.fill(0),
            // CMOS/RTC: zeros (no update in progress, a valid-looking clock).
            CMOS_INDEX | CMOS_DATA => data.fill(0),
            p if probe::ProbeChannel::claims(p) && self.probe.is_some() => {
                if let Some(c) = &self.probe {
                    c.io_in(p, data);
                }
            }
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
                        let _ = s.write(com1_offset(p), b);
                    }
                }
                PioAction::None
            }
            I8042_CMD if data.first() == Some(&I8042_RESET) => PioAction::Reset,
            p if probe::ProbeChannel::claims(p) => {
                if let Some(c) = &self.probe {
                    c.io_out(p, data);
                }
                PioAction::None
            }
            _ => PioAction::None,
        }
    }
}

/// The register offset of a COM1 port (0..8: checked by the caller).
fn com1_offset(port: u16) -> u8 {
    u8::try_from(port - COM1_BASE).unwrap_or(u8::MAX)
}
