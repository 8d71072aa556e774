//! The Linux guest's latency-probe channel ([`guests::linux::probe`]):
//! port 0x7e0 (`in`: the VMM's epoch; `out`: message words) and 0x7e4
//! (`in`: the stall threshold in TSC ticks), 32-bit accesses only.
//!
//! Everything the guest writes is untrusted: words are reassembled by the
//! bounded [`Decoder`], an unknown tag or a wrong-sized access is counted
//! and dropped, never trusted further.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use guests::linux::probe::{Decoder, ProbeMessage, PORT_DATA, PORT_STALL};
use guests::probe::ProbeWindow;

/// What the probe reported so far.
#[derive(Debug, Clone, Default)]
pub struct ProbeState {
    /// The hello: (working-set base in the probe's address space, MiB, version).
    pub hello: Option<(u64, u32, u32)>,
    /// The last window message.
    pub last: Option<ProbeWindow>,
    /// A failed start: (step, syscall return).
    pub fail: Option<(u32, u32)>,
    /// Windows received.
    pub windows: u64,
    /// Words or accesses that were not the protocol.
    pub bad: u64,
}

/// See the module docs. Shared by the vCPU thread and the VMM's scenarios.
#[derive(Debug, Default)]
pub struct ProbeChannel {
    epoch: AtomicU64,
    stall_tsc: AtomicU64,
    state: Mutex<(Decoder, ProbeState)>,
}

impl ProbeChannel {
    /// A channel answering `stall_tsc` on the threshold port.
    pub fn new(stall_tsc: u64) -> Self {
        let c = ProbeChannel::default();
        c.stall_tsc.store(stall_tsc, Ordering::Relaxed);
        c
    }

    /// Whether `port` is the channel's.
    pub fn claims(port: u16) -> bool {
        port == PORT_DATA || port == PORT_STALL
    }

    /// Open a new epoch (closing the probe's window); returns it.
    pub fn bump_epoch(&self) -> u64 {
        self.epoch.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// A copy of what the probe reported.
    pub fn state(&self) -> ProbeState {
        self.state
            .lock()
            .map(|s| s.1.clone())
            .unwrap_or_else(|p| p.into_inner().1.clone())
    }

    fn with_state(&self, f: impl FnOnce(&mut Decoder, &mut ProbeState)) {
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let (d, s) = &mut *g;
        f(d, s);
    }

    /// Guest `in`.
    pub fn io_in(&self, port: u16, data: &mut [u8]) {
        let v = match port {
            PORT_DATA => self.epoch.load(Ordering::Acquire),
            _ => self.stall_tsc.load(Ordering::Relaxed),
        };
        // The low 32 bits, little-endian, in as many bytes as were read.
        let b = (v & 0xffff_ffff).to_le_bytes();
        for (d, s) in data.iter_mut().zip(b.iter()) {
            *d = *s;
        }
        if data.len() != 4 {
            self.with_state(|_, s| s.bad += 1);
        }
    }

    /// Guest `out`.
    pub fn io_out(&self, port: u16, data: &[u8]) {
        self.with_state(|d, s| {
            let Ok(w) = <[u8; 4]>::try_from(data) else {
                s.bad += 1;
                return;
            };
            if port != PORT_DATA {
                s.bad += 1;
                return;
            }
            match d.push(u32::from_le_bytes(w)) {
                Ok(Some(ProbeMessage::Hello {
                    ws_base,
                    ws_mib,
                    version,
                })) => s.hello = Some((ws_base, ws_mib, version)),
                Ok(Some(ProbeMessage::Window(w))) => {
                    s.last = Some(w);
                    s.windows += 1;
                }
                Ok(Some(ProbeMessage::Fail { step, ret })) => s.fail = Some((step, ret)),
                Ok(None) => {}
                Err(_) => s.bad += 1,
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use guests::linux::probe::{TAG_HELLO, TAG_WINDOW};

    fn out(c: &ProbeChannel, w: u32) {
        c.io_out(PORT_DATA, &w.to_le_bytes());
    }

    #[test]
    fn epoch_threshold_hello_and_window() {
        let c = ProbeChannel::new(5000);
        let mut b = [0u8; 4];
        c.io_in(PORT_STALL, &mut b);
        assert_eq!(u32::from_le_bytes(b), 5000);
        assert_eq!(c.bump_epoch(), 1);
        c.io_in(PORT_DATA, &mut b);
        assert_eq!(u32::from_le_bytes(b), 1);
        for w in [TAG_HELLO, 0x1000, 0, 64, 1] {
            out(&c, w);
        }
        assert_eq!(c.state().hello, Some((0x1000, 64, 1)));
        out(&c, TAG_WINDOW);
        for i in 0..18 {
            out(&c, if i % 2 == 0 { 1 } else { 0 });
        }
        let s = c.state();
        assert_eq!((s.windows, s.last.map(|w| w.ack_epoch)), (1, Some(1)));
        assert_eq!(s.bad, 0);
    }

    #[test]
    fn garbage_is_counted_not_trusted() {
        let c = ProbeChannel::new(1);
        out(&c, 0xdead_beef);
        c.io_out(PORT_DATA, &[1, 2]);
        c.io_out(PORT_STALL, &[1, 2, 3, 4]);
        let mut b = [0u8; 1];
        c.io_in(PORT_DATA, &mut b);
        let s = c.state();
        assert_eq!(s.bad, 4);
        assert!(s.hello.is_none() && s.last.is_none());
    }
}
