//! The userfaultfd thread: the one reader of guest RAM's userfaultfd. It
//! reads page faults and runs the MMU's TDP fault path for their gfn
//! (sequence snapshot, host page resolved by populating the huge page with
//! CONTINUE/COPY, re-check under `mmu_lock`, install the SPTE), and it reads
//! the non-cooperative events (REMOVE, UNMAP, REMAP) and delivers them to
//! the [`Subscribers`](notifier::Subscribers) the MMU is registered with
//! ([`crate::host::events::deliver_uffd_event`]).
//!
//! **Events are always read.** A `madvise` announced through
//! `notifier::ops` holds its range "in progress" (faults in it say `Retry`)
//! while the kernel blocks that madvise until someone reads its REMOVE
//! message; and `UFFDIO_CONTINUE`/`COPY` answer `EAGAIN` while any event is
//! pending. A thread that retried a fault in place would wait for itself.
//! So a fault that says `Retry` (or `EAGAIN`) is parked in a queue and the
//! thread goes back to reading the userfaultfd (without sleeping while
//! faults are parked); parked faults are re-attempted once per round, after
//! whatever was read has been handled.
//!
//! **When the vCPU is woken.** By default resolution does not wake
//! (DONTWAKE) and the thread wakes the faulting vCPU after the MMU
//! installed its SPTE. With [`FaultOptions::wake_early`] the
//! CONTINUE/COPY ioctl wakes it itself (one ioctl instead of two, and the
//! SPTE install leaves the critical path). That is correct here because
//! the host page table is the mapping the guest really runs on: KVM maps
//! the page from it as soon as the vCPU retries, and the project's MMU is a
//! secondary MMU that must never map *more* than the host - it may lag. The
//! SPTE is still installed under the sequence re-check after the wake: an
//! invalidation that raced the populate makes the fault retry (it installs
//! nothing stale), and an install after the wake cannot outlive a later
//! invalidation, which zaps it. What waking early gives up is only the
//! "guest resumes with the SPTE already there" ordering, which a real TDP
//! MMU (where the SPTE *is* the guest's mapping) would need: there the
//! vCPU would just fault again on the missing SPTE and wait for `mmu_lock`.
//!
//! Fault-to-resume is measured from the moment the fault message is read
//! to the wake (the handler's share; the guest-observed cost including the
//! kernel's delivery and wake-ups is what `vmm bench fault-cost` measures).

use super::uffd::{UffdGuestRam, UffdRamError};
use crate::failpoint::{self, Injected, Point};
use crate::host::events::{self, UffdEventCounts};
use mmu::memslot::{Memslot, PAGE_SHIFT};
use mmu::tdp::TdpMmu;
use mmu::tdp::{FaultError, FaultOutcome, HostPage, ResolveError};
use notifier::convert::{duration_ns, u64_to_usize};
use notifier::pagemap::Pagemap;
use notifier::uffd::{UffdEvent, UFFD_PAGEFAULT_FLAG_WRITE};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

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
        source: UffdRamError,
    },
    #[error("spawning the fault thread: {0}")]
    Spawn(#[source] std::io::Error),
    #[error(transparent)]
    Injected(#[from] Injected),
    #[error("pinning the fault thread to CPU {cpu}: {source}")]
    Pin {
        cpu: usize,
        #[source]
        source: std::io::Error,
    },
}

/// What the fault thread did.
#[derive(Debug, Clone, Default)]
pub struct FaultReport {
    /// Fault messages read.
    pub faults: u64,
    /// MMU faults that said `Retry` and were run again.
    pub fault_retries: u64,
    /// Resolutions answered `EAGAIN` (an event was pending).
    pub eagain: u64,
    /// Faults whose page was already present when resolved (EEXIST).
    pub already_present: u64,
    /// Faults on a gfn the MMU already mapped (`RET_PF_SPURIOUS`).
    pub spurious: u64,
    /// Fault-to-resume per fault, ns.
    pub fault_to_resume_ns: Vec<u64>,
    /// Time in CONTINUE/COPY per attempt, ns (the rest of the handler's
    /// share is the MMU and the wake, which on a busy machine includes
    /// being preempted by the woken vCPU thread).
    pub populate_ns: Vec<u64>,
    /// Non-cooperative events read and delivered.
    pub events: UffdEventCounts,
    /// Huge pages mapped ahead by fault-around (no fault of their own).
    pub prefetched: u64,
    /// Wake-early faults whose vCPU had already resumed and whose host page
    /// an invalidation removed before the SPTE could be installed: dropped
    /// (the MMU may map less than the host; the guest faults again if it
    /// touches the page).
    pub abandoned: u64,
}

/// How the fault thread runs.
#[derive(Debug, Clone, Copy, Default)]
pub struct FaultOptions {
    /// Busy-poll the userfaultfd instead of sleeping in poll(2) (costs a
    /// CPU; removes the handler's wake-up latency).
    pub spin: bool,
    /// Resolve with a CONTINUE/COPY that wakes the vCPU itself, before the
    /// SPTE is installed (see the module docs).
    pub wake_early: bool,
    /// Pin the thread to this CPU.
    pub cpu: Option<usize>,
    /// After waking a vCPU, map this many following huge pages ahead
    /// (populate + SPTE, nobody to wake), while the vCPU runs.
    pub fault_around: u64,
}

/// What the thread publishes while it runs.
#[derive(Debug, Default)]
pub struct FaultProgress {
    /// Reads of the userfaultfd that found nothing, with no fault parked.
    idle_reads: AtomicU64,
    /// Set when the thread stopped on an error: whoever faults now sleeps
    /// until someone gives up on it.
    failed: Arc<AtomicBool>,
}

impl FaultProgress {
    /// The flag set when the thread stopped on an error.
    pub fn failed(&self) -> Arc<AtomicBool> {
        self.failed.clone()
    }

    /// Wait until the thread has been idle once after this call: every
    /// message read before the call (e.g. the REMOVE of a madvise that
    /// already returned) has been handled and its invalidation delivered.
    /// `false` on timeout.
    pub fn settle(&self, timeout: Duration) -> bool {
        let seen = self.idle_reads.load(Ordering::Acquire);
        let t0 = Instant::now();
        while t0.elapsed() < timeout {
            if self.idle_reads.load(Ordering::Acquire) > seen {
                return true;
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        false
    }
}

/// A running fault thread.
pub struct FaultThread {
    pub handle: JoinHandle<Result<FaultReport, FaultThreadError>>,
    pub progress: Arc<FaultProgress>,
}

/// One fault attempt's outcome.
enum Attempt {
    Done,
    /// Come back later; `woken`: this attempt already woke the vCPU.
    Retry {
        woken: bool,
    },
    /// Dropped (see [`FaultReport::abandoned`]).
    Abandoned,
}

/// How an attempt makes the host page present.
#[derive(Clone, Copy)]
enum Resolve<'a> {
    /// CONTINUE/COPY; with `wake`, the same ioctl wakes the vCPU.
    Populate { wake: bool },
    /// A re-attempt of a fault whose vCPU an earlier attempt already woke
    /// (wake-early): the guest ran on, and an invalidation may have removed
    /// the page since, on purpose (a discard). Populating it again would
    /// undo that; map only what the host still has.
    PresentOnly(&'a std::cell::RefCell<Option<Pagemap>>),
}

/// Try to resolve the fault at `hva` once: the MMU fault path with
/// populate-as-resolve, then wake. `Retry` when an invalidation raced it
/// or an event is pending (`EAGAIN`): the caller reads the userfaultfd and
/// comes back.
fn try_fault(
    ram: &UffdGuestRam,
    mmu: &TdpMmu,
    hva: u64,
    write: bool,
    how: Resolve<'_>,
    ahead: u64,
    rep: &mut FaultReport,
) -> Result<Attempt, FaultThreadError> {
    let base = ram.guest_hva();
    if hva < base || hva - base >= ram.size() {
        return Err(FaultThreadError::OutOfRange { hva });
    }
    let gpa = hva - base;
    let gfn = gpa >> PAGE_SHIFT;
    let already = std::cell::Cell::new(false);
    let woken = std::cell::Cell::new(false);
    let again = std::cell::Cell::new(false);
    let gone = std::cell::Cell::new(false);
    let populate_ns = std::cell::Cell::new(0u64);
    // __kvm_faultin_pfn: make the host page present and name its pfn; the
    // memfd page index is the pfn (gpa == memfd offset).
    let resolver = |_slot: &Memslot, gfn: u64, _hva: u64, _write: bool| {
        let gpa = gfn << PAGE_SHIFT;
        let t0 = Instant::now();
        let r = match how {
            Resolve::Populate { wake: true } => ram.populate_and_wake(gpa),
            Resolve::Populate { wake: false } => ram.populate(gpa),
            Resolve::PresentOnly(pm) => {
                let present = pm
                    .borrow_mut()
                    .as_mut()
                    .is_some_and(|pm| pm.any_present(ram.page_range(gpa)).unwrap_or(false));
                gone.set(!present);
                Ok(false)
            }
        };
        if gone.get() {
            return Err(ResolveError::Host {
                hva: ram.guest_hva() + gpa,
                reason: "removed since the vCPU resumed".into(),
            });
        }
        let wake_early = matches!(how, Resolve::Populate { wake: true });
        populate_ns.set(populate_ns.get() + duration_ns(t0.elapsed()));
        match r {
            Ok(mapped) => {
                already.set(already.get() | !mapped);
                woken.set(woken.get() | (wake_early && mapped));
                Ok(HostPage {
                    pfn: gfn,
                    level: ram.host_level(gpa),
                    // Writable only for a write fault: the kernel hands a
                    // fault to userfaultfd only after the VMA allowed the
                    // access (`access_error()` on the CPU path, GUP's
                    // `check_vma_flags()` on KVM's), so a write fault means
                    // the host mapping is writable; a read fault says
                    // nothing of it (the VMA may be read-only: mprotect,
                    // write-protect), so it maps read-only, as KVM's
                    // `hva_to_pfn()` does when it cannot get a writable page.
                    writable: write,
                })
            }
            Err(e) => {
                again.set(e.is_again());
                Err(ResolveError::Host {
                    hva: ram.guest_hva() + gpa,
                    reason: e.to_string(),
                })
            }
        }
    };
    let outcome = mmu.page_fault(gfn, write, &resolver);
    rep.populate_ns.push(populate_ns.get());
    match outcome {
        Ok(FaultOutcome::Retry) => {
            rep.fault_retries += 1;
            return Ok(Attempt::Retry { woken: woken.get() });
        }
        Ok(FaultOutcome::Spurious(_)) => rep.spurious += 1,
        Ok(FaultOutcome::Fixed(_)) => {}
        Err(_) if again.get() => {
            rep.eagain += 1;
            return Ok(Attempt::Retry { woken: woken.get() });
        }
        Err(_) if gone.get() => {
            rep.abandoned += 1;
            return Ok(Attempt::Abandoned);
        }
        Err(source) => return Err(FaultThreadError::Mmu { gfn, source }),
    }
    if already.get() {
        rep.already_present += 1;
    }
    // Fault-around, host half: make the next pages present before the
    // wake, so the resumed vCPU does not fault on them; their SPTEs come
    // after the wake ([`fault_around`]).
    let ps = ram.page_bytes();
    for page in (gpa / ps + 1..).take(u64_to_usize(ahead)) {
        let g = page * ps;
        if g >= ram.size() {
            break;
        }
        if mmu.lookup(g >> PAGE_SHIFT).is_none() && ram.populate(g).is_err() {
            break;
        }
    }
    if !woken.get() && !matches!(how, Resolve::PresentOnly(_)) {
        ram.wake(gpa)
            .map_err(|source| FaultThreadError::Wake { gfn, source })?;
    }
    Ok(Attempt::Done)
}

/// Fault-around, MMU half (after the wake): map up to `n` huge pages after
/// the one at `hva` that the MMU does not map yet (made present before the
/// wake by [`try_fault`]; MMU ⊆ host holds meanwhile), through the same
/// fault path (sequence protocol,
/// populate without waking). Anything in the way - an invalidation in
/// progress (`Retry`), a pending event (`EAGAIN`), an error - just ends
/// the prefetch: the guest's own fault will come for that page.
fn fault_around(ram: &UffdGuestRam, mmu: &TdpMmu, hva: u64, n: u64, rep: &mut FaultReport) {
    let ps = ram.page_bytes();
    let Some(gpa) = hva.checked_sub(ram.guest_hva()) else {
        return;
    };
    let resolver = |_slot: &Memslot, gfn: u64, _hva: u64, _write: bool| {
        let gpa = gfn << PAGE_SHIFT;
        ram.populate(gpa)
            .map(|_| HostPage {
                pfn: gfn,
                level: ram.host_level(gpa),
                // No access to go by (nobody faulted): read-only, as for a
                // read fault in [`try_fault`].
                writable: false,
            })
            .map_err(|e| ResolveError::Host {
                hva: ram.guest_hva() + gpa,
                reason: e.to_string(),
            })
    };
    let first = gpa / ps + 1;
    for page in first..first + n {
        let gpa = page * ps;
        if gpa >= ram.size() {
            break;
        }
        let gfn = gpa >> PAGE_SHIFT;
        if mmu.lookup(gfn).is_some() {
            continue;
        }
        match mmu.page_fault(gfn, false, &resolver) {
            Ok(FaultOutcome::Fixed(_)) => rep.prefetched += 1,
            Ok(FaultOutcome::Spurious(_)) => {}
            Ok(FaultOutcome::Retry) | Err(_) => break,
        }
    }
}

/// Resolve one fault at `hva` to the end, retrying in place. Only for
/// callers that know no invalidation waits for this thread (nothing reads
/// events meanwhile); the fault thread itself parks instead.
pub fn handle_fault(
    ram: &UffdGuestRam,
    mmu: &TdpMmu,
    hva: u64,
    write: bool,
    rep: &mut FaultReport,
) -> Result<(), FaultThreadError> {
    while let Attempt::Retry { .. } = try_fault(
        ram,
        mmu,
        hva,
        write,
        Resolve::Populate { wake: false },
        0,
        rep,
    )? {
        std::thread::yield_now();
    }
    Ok(())
}

/// A fault read but not resolved yet.
struct Parked {
    hva: u64,
    write: bool,
    read_at: Instant,
    /// An attempt already woke the vCPU (wake-early).
    woken: bool,
}

/// Run the fault loop on a new thread until `stop` is set.
pub fn spawn(
    ram: Arc<UffdGuestRam>,
    mmu: Arc<TdpMmu>,
    stop: Arc<AtomicBool>,
    opts: FaultOptions,
) -> Result<FaultThread, FaultThreadError> {
    let progress = Arc::new(FaultProgress::default());
    let prog = progress.clone();
    let failed = progress.failed.clone();
    let unreg = ram.clone();
    // On an error or a panic: nobody reads the userfaultfd any more. Raise
    // the flag the vCPU run stops on, and retire the context, which wakes
    // every thread asleep on it - a vCPU in a fault (inside KVM's guest
    // page-table walk it does not even see signals) and a madvise waiting
    // for its REMOVE event to be read - and lets the kernel serve the rest
    // itself, so the run can stop.
    let on_fail = move || {
        failed.store(true, Ordering::Release);
        if unreg.uffd().retire().is_err() {
            let _ = unreg.uffd().unregister(unreg.guest_range());
        }
    };
    let handle = crate::thread::spawn_helper("uffd-fault", on_fail, move || {
        fault_loop(&ram, &mmu, &stop, opts, &prog)
    })
    .map_err(FaultThreadError::Spawn)?;
    Ok(FaultThread { handle, progress })
}

fn fault_loop(
    ram: &UffdGuestRam,
    mmu: &TdpMmu,
    stop: &AtomicBool,
    opts: FaultOptions,
    progress: &FaultProgress,
) -> Result<FaultReport, FaultThreadError> {
    if let Some(cpu) = opts.cpu {
        crate::thread::pin_to_cpu(cpu).map_err(|source| FaultThreadError::Pin { cpu, source })?;
    }
    let mut rep = FaultReport::default();
    let mut parked: VecDeque<Parked> = VecDeque::new();
    let pagemap = std::cell::RefCell::new(Pagemap::open().ok());
    while !stop.load(Ordering::Acquire) {
        // Sleep in poll(2) only when nothing is parked.
        let timeout = if opts.spin || !parked.is_empty() {
            0
        } else {
            10
        };
        match ram
            .uffd()
            .read_event(timeout)
            .map_err(FaultThreadError::Read)?
        {
            None => {
                if parked.is_empty() {
                    progress.idle_reads.fetch_add(1, Ordering::Release);
                    if opts.spin {
                        // Busy-poll, but give the CPU to anyone runnable
                        // (on a machine with fewer free CPUs than
                        // spinners, the vCPU thread).
                        std::thread::yield_now();
                    }
                }
            }
            Some(UffdEvent::Pagefault { address, flags }) => {
                failpoint::hit(Point::UffdFault)?;
                let read_at = Instant::now();
                rep.faults += 1;
                let write = flags & UFFD_PAGEFAULT_FLAG_WRITE != 0;
                // The common case first: nothing parked, resolve right away.
                let mut woken = false;
                if parked.is_empty() {
                    match try_fault(
                        ram,
                        mmu,
                        address,
                        write,
                        Resolve::Populate {
                            wake: opts.wake_early,
                        },
                        opts.fault_around,
                        &mut rep,
                    )? {
                        Attempt::Done | Attempt::Abandoned => {
                            rep.fault_to_resume_ns.push(duration_ns(read_at.elapsed()));
                            fault_around(ram, mmu, address, opts.fault_around, &mut rep);
                            continue;
                        }
                        Attempt::Retry { woken: w } => woken = w,
                    }
                }
                parked.push_back(Parked {
                    hva: address,
                    write,
                    read_at,
                    woken,
                });
                continue; // read whatever else is there first
            }
            Some(ev) => {
                failpoint::hit(Point::UffdEvent)?;
                events::deliver_uffd_event(
                    ram.subscribers(),
                    mmu,
                    &ev,
                    pagemap.borrow_mut().as_mut(),
                    &mut rep.events,
                );
                continue;
            }
        }
        // Nothing (more) to read: re-attempt each parked fault once.
        let n = parked.len();
        let mut progressed = false;
        for _ in 0..n {
            let Some(mut p) = parked.pop_front() else {
                break;
            };
            let how = if p.woken {
                Resolve::PresentOnly(&pagemap)
            } else {
                Resolve::Populate {
                    wake: opts.wake_early,
                }
            };
            match try_fault(ram, mmu, p.hva, p.write, how, opts.fault_around, &mut rep)? {
                Attempt::Done => {
                    rep.fault_to_resume_ns
                        .push(duration_ns(p.read_at.elapsed()));
                    fault_around(ram, mmu, p.hva, opts.fault_around, &mut rep);
                    progressed = true;
                }
                Attempt::Abandoned => progressed = true,
                Attempt::Retry { woken } => {
                    p.woken |= woken;
                    parked.push_back(p);
                }
            }
        }
        if !parked.is_empty() && !progressed {
            std::thread::yield_now();
        }
    }
    Ok(rep)
}
