//! The userfaultfd fault-handling thread: read a fault on the guest-facing
//! mapping, run the MMU's TDP fault path for its gfn (sequence snapshot,
//! host page resolved by populating the huge page with CONTINUE/COPY
//! without waking, re-check under `mmu_lock`, install the SPTE), retry
//! while an invalidation races it, then wake the faulting vCPU.
//!
//! Fault-to-resume is measured from the moment the fault message is read
//! to the return of `UFFDIO_WAKE` (the handler's share; the guest-observed
//! cost including the kernel's delivery and wake-ups is what
//! `tests/run_builtin.rs::bench_fault_cost` measures).
//!
//! Known limit: `Retry` is retried here, on the fault thread, until the
//! invalidation ends. That is safe only while no invalidation waits for
//! this thread. With `UFFD_FEATURE_EVENT_REMOVE` requested it would: a
//! `madvise` announced through `notifier::ops` holds its range "in progress"
//! while the kernel blocks it until this thread reads the REMOVE message -
//! a deadlock (seen when tried). Delivering REMOVE events needs the retry
//! to leave the loop (read events, re-handle the fault) first; and
//! `UFFDIO_CONTINUE`/`COPY` then answer `EAGAIN` while an event is pending.

use crate::guest_ram_uffd::UffdGuestRam;
use mmu::memslot::{Memslot, PAGE_SHIFT};
use mmu::spte::PageLevel;
use mmu::tdp::TdpMmu;
use mmu::tdp::{FaultError, FaultOutcome, HostPage, ResolveError};
use notifier::uffd::{UffdEvent, UFFD_PAGEFAULT_FLAG_WRITE};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

#[derive(Debug, thiserror::Error)]
pub enum FaultThreadError {
    #[error("reading userfaultfd: {0}")]
    Read(#[source] notifier::Error),
    #[error("fault at hva {hva:#x} outside guest RAM")]
    OutOfRange { hva: u64 },
    #[error("MMU fault on gfn {gfn:#x}: {source}")]
    Mmu {
        gfn: u64,
        #[source]
        source: FaultError,
    },
    #[error("waking gfn {gfn:#x}: {source}")]
    Wake {
        gfn: u64,
        #[source]
        source: crate::guest_ram_uffd::UffdRamError,
    },
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct LatencyUs {
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
}

impl LatencyUs {
    /// Nearest-rank percentiles of nanosecond samples.
    pub fn from_ns(samples: &[u64]) -> Self {
        if samples.is_empty() {
            return Self::default();
        }
        let mut s = samples.to_vec();
        s.sort_unstable();
        let at = |q: f64| {
            let i = ((q * s.len() as f64).ceil() as usize).clamp(1, s.len()) - 1;
            s[i] as f64 / 1000.0
        };
        LatencyUs {
            p50: at(0.50),
            p99: at(0.99),
            max: s[s.len() - 1] as f64 / 1000.0,
        }
    }
}

/// What the fault thread did.
#[derive(Debug, Clone, Default)]
pub struct FaultReport {
    /// Fault messages read.
    pub faults: u64,
    /// MMU faults that said `Retry` and were run again.
    pub fault_retries: u64,
    /// Faults whose page was already present when resolved (EEXIST).
    pub already_present: u64,
    /// Faults on a gfn the MMU already mapped (`RET_PF_SPURIOUS`).
    pub spurious: u64,
    /// Fault-to-resume per fault, ns.
    pub fault_to_resume_ns: Vec<u64>,
    /// Non-pagefault events seen (ignored).
    pub other_events: u64,
}

/// Resolve one fault at `hva`: the MMU fault path with populate-as-resolve,
/// then wake; accounted in `rep`.
pub fn handle_fault(
    ram: &UffdGuestRam,
    mmu: &TdpMmu,
    hva: u64,
    write: bool,
    rep: &mut FaultReport,
) -> Result<(), FaultThreadError> {
    let base = ram.guest_hva();
    if hva < base || hva - base >= ram.size() {
        return Err(FaultThreadError::OutOfRange { hva });
    }
    let gpa = hva - base;
    let gfn = gpa >> PAGE_SHIFT;
    let level = match ram.hugepages() {
        crate::memory::HugePages::Huge1G => PageLevel::L1G,
        _ => PageLevel::L2M,
    };
    let already = std::cell::Cell::new(false);
    // __kvm_faultin_pfn: make the host page present (no wake) and name its
    // pfn; the memfd page index is the pfn (gpa == memfd offset).
    let resolver = |_slot: &Memslot, gfn: u64, _hva: u64, _write: bool| {
        let gpa = gfn << PAGE_SHIFT;
        match ram.populate(gpa) {
            Ok(mapped) => {
                already.set(already.get() | !mapped);
                Ok(HostPage {
                    pfn: gfn,
                    level,
                    writable: true,
                })
            }
            Err(e) => Err(ResolveError::Host {
                hva: ram.guest_hva() + gpa,
                reason: e.to_string(),
            }),
        }
    };
    loop {
        match mmu.page_fault(gfn, write, &resolver) {
            Ok(FaultOutcome::Retry) => {
                rep.fault_retries += 1;
                std::thread::yield_now();
            }
            Ok(FaultOutcome::Spurious(_)) => {
                rep.spurious += 1;
                break;
            }
            Ok(FaultOutcome::Fixed(_)) => break,
            Err(source) => return Err(FaultThreadError::Mmu { gfn, source }),
        }
    }
    if already.get() {
        rep.already_present += 1;
    }
    ram.wake(gpa)
        .map_err(|source| FaultThreadError::Wake { gfn, source })
}

/// Run the fault loop on a new thread until `stop` is set. With `spin`,
/// the thread polls the userfaultfd without sleeping (burns a CPU, saves
/// the handler's wake-up latency).
pub fn spawn(
    ram: Arc<UffdGuestRam>,
    mmu: Arc<TdpMmu>,
    stop: Arc<AtomicBool>,
    spin: bool,
) -> JoinHandle<Result<FaultReport, FaultThreadError>> {
    std::thread::Builder::new()
        .name("uffd-fault".into())
        .spawn(move || {
            let mut rep = FaultReport::default();
            while !stop.load(Ordering::Acquire) {
                let ev = ram
                    .uffd()
                    .read_event(if spin { 0 } else { 50 })
                    .map_err(FaultThreadError::Read)?;
                match ev {
                    None => {}
                    Some(UffdEvent::Pagefault { address, flags }) => {
                        let t0 = Instant::now();
                        rep.faults += 1;
                        let write = flags & UFFD_PAGEFAULT_FLAG_WRITE != 0;
                        handle_fault(&ram, &mmu, address, write, &mut rep)?;
                        rep.fault_to_resume_ns.push(t0.elapsed().as_nanos() as u64);
                    }
                    Some(_) => rep.other_events += 1,
                }
            }
            Ok(rep)
        })
        .expect("spawning the uffd fault thread")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles() {
        let ns: Vec<u64> = (1..=100).map(|i| i * 1000).collect();
        let l = LatencyUs::from_ns(&ns);
        assert_eq!(l.p50, 50.0);
        assert_eq!(l.p99, 99.0);
        assert_eq!(l.max, 100.0);
        assert_eq!(LatencyUs::from_ns(&[]), LatencyUs::default());
    }
}
