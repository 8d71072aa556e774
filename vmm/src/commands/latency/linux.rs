//! `vmm latency --guest linux`: the same scenarios on the Linux guest's
//! RAM while its kernel boots.
//!
//! The Debian guest of `vmm run --guest linux` boots on shared 2 MiB
//! hugetlb RAM served by userfaultfd MINOR faults through the project's
//! TDP MMU, on its own threads ([`linux::boot`] on a boot thread, the
//! uffd fault thread). Once the kernel has been faulting its RAM in for a
//! while (the warm-up), the scenarios run against that RAM - host syscall,
//! kernel tracepoint and TDP MMU layers - while the guest keeps booting.
//! A guest store to RAM made read-only for a moment makes `KVM_RUN`
//! answer EFAULT: the vCPU re-enters (counted). Then the guest is stopped;
//! it need not reach init.
//!
//! The guest layer: the kernel command line carries `hvmm.probe`, so the
//! initramfs's `/init` starts the project's latency probe
//! ([`guests::linux::probe`], a static ELF: 64 MiB populated and locked,
//! the `rdtsc` gap loop) and the VMM listens on its ports
//! ([`crate::devices::probe`]). When the probe says hello within the
//! warm-up (the emulated SVM host, `vmm host`, where guest user space
//! runs), every scenario's window is closed through the epoch port and the
//! guest layer is filled in from the probe's windows; without a hello (this
//! machine's KVM, PVM: guest user space cannot make a system call) the
//! layer is skipped with the reason.
//!
//! What this guest cannot give yet: the shadow-MMU layer
//! (the project's shadow MMU would need a walker over the booting kernel's
//! changing page tables; the probe's identity tables are what it
//! shadows). `memtest=1` would touch all of RAM early, but the Debian
//! cloud kernel is built without `CONFIG_MEMTEST`: the boot's own touching
//! (kernel image, memmap, page tables, allocations) is what is mapped.
//!
//! "Populated" is what the guest has faulted in; the VMM re-maps those
//! pages in the MMU before each iteration. The sparse and empty states
//! would mean discarding the guest kernel's working set under it: left out.
//! Hole punch and MADV_REMOVE drop page-cache data the guest kernel owns,
//! so the range is copied out through the VMM's own mapping before the
//! (timed) syscall and written back after it (untimed).

use super::measure::{MmuSample, State, Target};
use super::report::{summarize, LatencyReport};
use super::{
    measure, new_report, open_tracer, run_session, skip, start_retrying, LatencyArgs, LatencyError,
};
use crate::devices::probe::{ProbeChannel, ProbeState};
use crate::machine::linux::{self, BootError, BootHooks, BootInputs, BootMemory, LinuxBoot};
use crate::memory::fault::{self, FaultOptions, FaultReport, FaultThread};
use crate::memory::mmu::{recorded_tdp, Mapped, ZapRecorder};
use crate::memory::uffd::{UffdGuestRam, UffdMode};
use crate::report::progress_bar;
use crate::thread;
use guests::probe::ProbeWindow;
use mmu::memslot::PAGE_SHIFT;
use mmu::tdp::TdpMmu;
use mmu::yielder::YieldReport;
use notifier::hostmm::Backing;
use notifier::PageSize;
use notifier::Subscribers;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

/// Why the Linux guest has no guest layer (reported in `skipped`) when
/// its probe never said hello.
pub const NO_GUEST_LAYER: &str =
    "the latency probe in the Linux guest's initramfs (`hvmm.probe`, port 0x7e0) did not say hello \
within the warm-up: under this machine's KVM (PVM) guest user space cannot make a system call at \
all, so /init never starts it; on the emulated SVM host (`vmm host`) it runs and fills this layer. \
Host, kernel and MMU layers are measured while the guest runs";

/// The `skipped` entry of the guest layer (see [`super::new_report`]).
const GUEST_LAYER_SKIP: &str = "guest layer of a Linux guest";

/// Gaps above this are the probe's stalls (as the built-in probe's).
const STALL: Duration = Duration::from_micros(2);

/// How long the probe may take to answer a new epoch (emulation time).
const ACK_TIMEOUT: Duration = Duration::from_secs(30);

/// How long the guest runs after an operation before its window closes
/// (a 64 MiB pass of the probe takes a few ms under TCG).
const SETTLE_PROBE: Duration = Duration::from_millis(100);

/// Why the Linux guest has no shadow-MMU layer.
pub const NO_SHADOW_LAYER: &str =
    "the project's shadow MMU shadows the probe's fixed identity page \
tables; the booting Linux kernel's page tables change under it and are not walked";

/// What the boot thread returns: how the boot ended, in words.
type BootOutcome = Result<String, String>;

/// The Linux guest booting on MMU-served RAM, for the scenarios.
pub struct LinuxSession {
    ram: Arc<UffdGuestRam>,
    tdp: Arc<TdpMmu>,
    zaps: Arc<ZapRecorder>,
    /// The VMM's own mapping of the memfd (not registered with uffd).
    view: GuestMemoryMmap,
    /// gpas of the huge pages the guest had faulted in at the last
    /// `prepare`: what "populated" re-maps.
    touched: Vec<u64>,
    /// Data kept across a hole punch: (gpa, bytes).
    kept: Option<(u64, Vec<u8>)>,
    boot_stop: Arc<AtomicBool>,
    boot_thread: Option<JoinHandle<BootOutcome>>,
    fault_stop: Arc<AtomicBool>,
    fault_thread: Option<FaultThread>,
    efaults: Arc<AtomicU64>,
    pub serial_log: PathBuf,
    started: Instant,
    /// The latency probe's channel.
    probe: Arc<ProbeChannel>,
    /// Whether the probe said hello by the end of the warm-up: the guest
    /// layer is measured.
    probe_live: bool,
    /// Why a probe that said hello is not used (its first window failed).
    pub probe_error: Option<String>,
}

/// How the warm-up went.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct WarmUp {
    pub seconds: f64,
    /// What the TDP MMU mapped when the scenarios started.
    pub mapped_mib: u64,
    pub leaves: u64,
    /// Seconds into the boot when the probe said hello (None: never).
    pub probe_hello_s: Option<f64>,
}

impl LinuxSession {
    /// Boot the provisioned Debian guest on `mem` bytes of shared 2 MiB
    /// hugetlb RAM (uffd MINOR) on its own thread.
    pub fn start(mem: u64, kvm_dev: PathBuf, timeout: Duration) -> Result<Self, LatencyError> {
        let boot_err = |e: BootError| LatencyError::Guest(format!("linux guest: {e}"));
        let (kernel, initrd) = linux::default_image().map_err(boot_err)?;
        let serial_log =
            std::env::temp_dir().join(format!("vmm-latency-linux-{}.log", std::process::id()));
        let mut cfg = LinuxBoot::new(kernel, initrd);
        cfg.guest.quiet = true;
        // Where guest user space runs (the emulated SVM host), /init would
        // reboot within seconds: keep the guest up until it is stopped.
        // And start the latency probe there.
        cfg.guest.append = Some(format!(
            "{} {}",
            guests::linux::initramfs::STAY_PARAM,
            guests::linux::probe::PROBE_PARAM
        ));
        cfg.guest.serial_log = Some(serial_log.clone());
        cfg.timeout = timeout.max(Duration::from_secs(1));
        cfg.kvm_dev = kvm_dev;
        let inputs = BootInputs::prepare(&cfg).map_err(boot_err)?;

        mmu::clock::calibrate_once();
        let probe = Arc::new(ProbeChannel::new(mmu::clock::ticks(STALL)));
        let probe_hook = probe.clone();
        let subs = Subscribers::new();
        // No non-cooperative events: the VMM's own operations announce
        // their ranges (as the probe's session).
        let ram = UffdGuestRam::new(
            mem,
            Backing::SharedMemfd(PageSize::Size2M),
            UffdMode::Minor,
            subs.clone(),
            false,
        )?;
        let ram = Arc::new(ram);
        let (tdp, zaps) = recorded_tdp(&ram, &subs)?;
        let view = ram.vmm_view()?;
        let boot_view = ram.vmm_view()?;
        let size = ram.size();
        let fault_stop = Arc::new(AtomicBool::new(false));
        let fault_thread = fault::spawn(
            ram.clone(),
            tdp.clone(),
            fault_stop.clone(),
            FaultOptions::default(),
        )?;
        let fault_failed = fault_thread.progress.failed();
        let slot = ram.clone();
        let boot_stop = Arc::new(AtomicBool::new(false));
        let efaults = Arc::new(AtomicU64::new(0));
        let (stop, ef) = (boot_stop.clone(), efaults.clone());
        let stop_tick = stop.clone();
        let boot_thread = std::thread::Builder::new()
            .name("linux-boot".into())
            .spawn(move || -> BootOutcome {
                let t0 = Instant::now();
                let memory = BootMemory {
                    mem: boot_view,
                    slot,
                    size,
                    hugepages: PageSize::Size2M,
                    staging: None,
                };
                let r = linux::boot(
                    &cfg,
                    inputs,
                    memory,
                    BootHooks {
                        on_tick: Some(&mut |_| stop_tick.load(Ordering::Acquire)),
                        efault_retries: Some(ef),
                        stop_on: Some(fault_failed),
                        probe: Some(probe_hook),
                    },
                );
                let secs = t0.elapsed().as_secs();
                match r {
                    Ok(_) if stop.load(Ordering::Acquire) => {
                        Ok(format!("by the VMM {secs} s into its boot"))
                    }
                    Ok(rep) => Ok(match rep.error {
                        Some(e) => format!("{} after {secs} s ({e})", rep.exit.name()),
                        None => format!("{} after {secs} s", rep.exit.name()),
                    }),
                    Err(e) => Err(e.to_string()),
                }
            })
            .map_err(|e| LatencyError::Guest(format!("spawning the boot thread: {e}")))?;
        Ok(LinuxSession {
            ram,
            tdp,
            zaps,
            view,
            touched: Vec::new(),
            kept: None,
            boot_stop,
            boot_thread: Some(boot_thread),
            fault_stop,
            fault_thread: Some(fault_thread),
            efaults,
            serial_log,
            started: Instant::now(),
            probe,
            probe_live: false,
            probe_error: None,
        })
    }

    /// Whether the guest is still running.
    pub fn running(&self) -> bool {
        self.boot_thread.as_ref().is_some_and(|h| !h.is_finished())
    }

    fn check_running(&mut self) -> Result<(), LatencyError> {
        if self.running() {
            return Ok(());
        }
        let why = match self.boot_thread.take().map(|h| thread::join("boot", h)) {
            Some(Ok(Ok(exit))) => format!("boot ended early: {exit}"),
            Some(Ok(Err(e))) => format!("boot failed: {e}"),
            Some(Err(p)) => p.to_string(),
            None => "boot thread gone".into(),
        };
        Err(LatencyError::Guest(format!(
            "linux guest: {why} (serial log {})",
            self.serial_log.display()
        )))
    }

    /// What the TDP MMU maps: (MiB, leaves).
    fn mapped(&self) -> (u64, u64) {
        let m = Mapped::of(&self.tdp, 0);
        (m.mib, m.leaves)
    }

    /// Let the guest kernel fault its RAM in for `secs` (or until
    /// `enough_mib` is mapped and the probe has said hello and closed a
    /// first window), then report what is mapped.
    pub fn warm_up(&mut self, secs: Duration, enough_mib: u64) -> Result<WarmUp, LatencyError> {
        let mut hello_at = None;
        while self.started.elapsed() < secs {
            self.check_running()?;
            let st = self.probe.state();
            if st.hello.is_some() && hello_at.is_none() {
                hello_at = Some(self.started.elapsed().as_secs_f64());
            }
            if st.fail.is_some() {
                break;
            }
            if self.mapped().0 >= enough_mib && hello_at.is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        self.check_running()?;
        if self.probe.state().hello.is_some() && self.probe.state().fail.is_none() {
            hello_at.get_or_insert(self.started.elapsed().as_secs_f64());
            // A first window: the probe loops (its working set mapped).
            // If it never comes, the guest layer is skipped with why.
            match self.probe_window() {
                Ok(_) => self.probe_live = true,
                Err(e) if self.running() => self.probe_error = Some(e.to_string()),
                Err(e) => return Err(e),
            }
        }
        let (mapped_mib, leaves) = self.mapped();
        Ok(WarmUp {
            seconds: self.started.elapsed().as_secs_f64(),
            mapped_mib,
            leaves,
            probe_hello_s: hello_at,
        })
    }

    /// What the probe reported.
    pub fn probe_state(&self) -> ProbeState {
        self.probe.state()
    }

    /// Close the probe's window: a new epoch, then wait for its window
    /// message acknowledging it.
    fn probe_window(&mut self) -> Result<ProbeWindow, LatencyError> {
        let epoch = self.probe.bump_epoch();
        let t0 = Instant::now();
        loop {
            let st = self.probe.state();
            if let Some(w) = st.last.filter(|w| w.ack_epoch == epoch) {
                return plausible(w);
            }
            self.check_running()?;
            if t0.elapsed() > ACK_TIMEOUT {
                return Err(LatencyError::Guest(format!(
                    "linux guest's probe did not acknowledge epoch {epoch} within {ACK_TIMEOUT:?} \
                     (last window {:?}, {} windows, {} bad words, {} KVM_RUN EFAULTs)",
                    st.last,
                    st.windows,
                    st.bad,
                    self.efaults()
                )));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// KVM_RUN EFAULT re-entries so far.
    pub fn efaults(&self) -> u64 {
        self.efaults.load(Ordering::Relaxed)
    }

    /// Stop the guest and the threads; returns how the boot ended.
    pub fn stop(mut self) -> Result<String, LatencyError> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<String, LatencyError> {
        self.boot_stop.store(true, Ordering::Release);
        let boot = self.boot_thread.take().map(|h| thread::join("boot", h));
        self.fault_stop.store(true, Ordering::Release);
        let faults = (self.fault_thread.take()).map(|t| thread::join("uffd-fault", t.handle));
        match faults {
            Some(Ok(Err(e))) => return Err(LatencyError::Guest(format!("fault thread: {e}"))),
            Some(Err(p)) => return Err(LatencyError::Guest(p.to_string())),
            _ => {}
        }
        match boot {
            Some(Ok(Ok(exit))) => Ok(exit),
            Some(Ok(Err(e))) => Err(LatencyError::Guest(format!("linux guest: {e}"))),
            Some(Err(p)) => Err(LatencyError::Guest(p.to_string())),
            None => Ok("stopped".into()),
        }
    }
}

impl Drop for LinuxSession {
    fn drop(&mut self) {
        if self.boot_thread.is_some() || self.fault_thread.is_some() {
            let _ = self.shutdown();
        }
    }
}

impl Target for LinuxSession {
    fn root_cause(&mut self, e: LatencyError) -> LatencyError {
        measure::fault_thread_death(&mut self.fault_thread).unwrap_or(e)
    }
    fn ram(&self) -> &Arc<UffdGuestRam> {
        &self.ram
    }
    fn tdp_zaps(&self) -> Option<Vec<YieldReport>> {
        Some(self.zaps.take())
    }
    fn shadow_sample(&self) -> Option<MmuSample> {
        None
    }
    /// Re-map the pages the guest had faulted in (as its next touch would).
    fn remap_mmu(&self, gs: u64, ge: u64) -> Result<(), LatencyError> {
        let mut rep = FaultReport::default();
        for &gpa in self.touched.iter().filter(|&&g| g >= gs && g < ge) {
            fault::handle_fault(
                &self.ram,
                &self.tdp,
                self.ram.guest_hva() + gpa,
                true,
                &mut rep,
            )
            .map_err(|e| LatencyError::Guest(format!("re-mapping gpa {gpa:#x}: {e}")))?;
        }
        Ok(())
    }
    fn close_window(&mut self) -> Result<Option<ProbeWindow>, LatencyError> {
        self.check_running()?;
        if !self.probe_live {
            return Ok(None);
        }
        self.probe_window().map(Some)
    }
    fn settle(&mut self) -> Result<(), LatencyError> {
        // A few guest ticks' worth of running; with the probe, a few of
        // its passes (it re-touches what the operation took away).
        std::thread::sleep(if self.probe_live {
            SETTLE_PROBE
        } else {
            Duration::from_millis(2)
        });
        Ok(())
    }
    fn prepare(&mut self, state: State) -> Result<(), LatencyError> {
        if state != State::Populated {
            return Err(LatencyError::Guest(format!(
                "the Linux guest's RAM cannot be made {}",
                state.name()
            )));
        }
        let ps = self.ram.page_bytes();
        let mut pages: Vec<u64> = self
            .tdp
            .mapped_leaves()
            .iter()
            .map(|l| (l.gfn << PAGE_SHIFT) & !(ps - 1))
            .collect();
        pages.dedup();
        self.touched = pages;
        self.remap_mmu(0, self.ram.size())?;
        super::measure::discard_zaps(self);
        Ok(())
    }
    fn before_drop(&mut self, gs: u64, ge: u64) -> Result<(), LatencyError> {
        let len = notifier::convert::u64_to_usize(ge.min(self.ram.size()).saturating_sub(gs));
        let mut buf = vec![0u8; len];
        self.view
            .read_slice(&mut buf, GuestAddress(gs))
            .map_err(|e| LatencyError::Guest(format!("keeping gpa {gs:#x}: {e}")))?;
        self.kept = Some((gs, buf));
        Ok(())
    }
    fn after_drop(&mut self, gs: u64, ge: u64) -> Result<(), LatencyError> {
        crate::host::invalidator::refill(&self.ram, gs, ge)?;
        if let Some((gpa, buf)) = self.kept.take() {
            self.view
                .write_slice(&buf, GuestAddress(gpa))
                .map_err(|e| LatencyError::Guest(format!("restoring gpa {gpa:#x}: {e}")))?;
        }
        Ok(())
    }
}

/// `--guest linux`: boot the Linux guest on MMU-served shared 2M RAM
/// (uffd MINOR), let its kernel fault RAM in, run the populated-state
/// scenarios on that RAM while it boots, stop it (see the module docs).
pub(super) fn run(args: &LatencyArgs) -> Result<LatencyReport, LatencyError> {
    let t_start = Instant::now();
    let mut rep = new_report(args, NO_GUEST_LAYER);
    rep.skipped.retain(|k| k.what != GUEST_LAYER_SKIP);
    skip(
        &mut rep,
        "mmu_shadow layer of a Linux guest",
        NO_SHADOW_LAYER,
    );
    skip(
        &mut rep,
        "shared-2M sparse, empty",
        "the VMM cannot make a booting kernel's RAM sparse or empty without discarding its working set",
    );
    skip(
        &mut rep,
        "private-2M, shared-1G, private-1G",
        "--guest linux runs on shared 2 MiB RAM served by uffd MINOR faults (as `vmm run --guest linux`)",
    );
    let mut tracer = open_tracer(&mut rep);
    let name = "linux-shared-2M".to_string();
    let mem = args.mem;
    let ps = PageSize::Size2M;
    let (mut scs, skipped) = measure::scenarios(mem, ps.bytes(), true, true, false);
    for (what, why) in skipped {
        skip(&mut rep, format!("{name} {what}"), why);
    }
    scs.retain(|s| s.state == measure::State::Populated);
    let total: u64 = scs.iter().map(|s| args.steps(s)).sum();
    let (mut s, _pool) = start_retrying(ps, mem.div_ceil(ps.bytes()), || {
        LinuxSession::start(mem, args.kvm_dev.clone(), Duration::from_secs(args.timeout))
    })?;
    let (warm, enough) = if args.quick {
        (args.warmup.unwrap_or(30), (mem / 8) >> 20)
    } else {
        (args.warmup.unwrap_or(90), (mem / 4) >> 20)
    };
    let warm = Duration::from_secs(warm);
    let progress = progress_bar(total);
    progress.set_message(format!("{name}: the guest kernel faults its RAM in"));
    let w = s.warm_up(warm, enough)?;
    let pst = s.probe_state();
    if w.probe_hello_s.is_none() || pst.fail.is_some() || s.probe_error.is_some() {
        let why = match pst.fail {
            Some((step, ret)) => format!(
                "the latency probe in the Linux guest failed to start (step {step}, syscall returned {})",
                i64::from(ret.cast_signed())
            ),
            None => match &s.probe_error {
                Some(e) => format!("the latency probe said hello but its first window failed: {e}"),
                None => NO_GUEST_LAYER.to_string(),
            },
        };
        skip(&mut rep, GUEST_LAYER_SKIP, why);
    }
    let measured = run_session(&mut s, &mut tracer, &scs, args, &mut rep, &progress, &name);
    let still_running = s.running();
    let pst_end = s.probe_state();
    rep.efault_retries += s.efaults();
    let log = s.serial_log.clone();
    let exit = s.stop();
    progress.finish_and_clear();
    let measured = measured?;
    let exit = exit?;
    let mono = rep.trace_clock_mono;
    let mut first = true;
    for m in measured {
        let mut r = summarize(&name, m, tracer.is_some(), mono, None);
        if first {
            first = false;
            let note = format!(
                "linux guest: measured from {:.0} s into its boot, {} MiB of {} MiB faulted in through the MMU ({} leaves); {}; guest {} during the scenarios, then stopped ({exit}); last console line {:?}; serial log {}",
                w.seconds,
                w.mapped_mib,
                mem >> 20,
                w.leaves,
                match w.probe_hello_s {
                    Some(t) => format!(
                        "probe hello {t:.1} s into the boot, {} windows, {} bad words",
                        pst_end.windows, pst_end.bad
                    ),
                    None => "no probe hello".to_string(),
                },
                if still_running { "running" } else { "NOT running" },
                last_line(&log),
                log.display()
            );
            r.note = Some(match r.note {
                Some(n) => format!("{note}; {n}"),
                None => note,
            });
        }
        rep.scenarios.push(r);
    }
    drop(tracer);
    rep.elapsed_s = t_start.elapsed().as_secs_f64();
    Ok(rep)
}

/// Longer than any window: a figure above it is not a measurement.
const MAX_WINDOW: Duration = Duration::from_secs(3600);

/// A window from the guest (untrusted) whose times fit in [`MAX_WINDOW`].
fn plausible(w: ProbeWindow) -> Result<ProbeWindow, LatencyError> {
    let max = mmu::clock::ticks(MAX_WINDOW);
    if w.max_gap_tsc > max || w.stall_sum_tsc > max || w.stall_count > w.touches.max(1) * 2 {
        return Err(LatencyError::Guest(format!(
            "linux guest's probe sent an implausible window: {w:?}"
        )));
    }
    Ok(w)
}

/// The last non-empty line of the guest's console log (empty if none).
pub fn last_line(log: &std::path::Path) -> String {
    std::fs::read(log)
        .map(|b| {
            String::from_utf8_lossy(&b)
                .lines()
                .map(str::trim)
                .rfind(|l| !l.is_empty())
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn implausible_windows_are_errors_not_figures() {
        let ok = ProbeWindow {
            ack_epoch: 1,
            max_gap_tsc: 1000,
            stall_sum_tsc: 5000,
            stall_count: 3,
            touches: 16384,
            ..Default::default()
        };
        assert!(plausible(ok).is_ok());
        for bad in [
            ProbeWindow {
                max_gap_tsc: u64::MAX,
                ..ok
            },
            ProbeWindow {
                stall_sum_tsc: u64::MAX,
                ..ok
            },
            ProbeWindow {
                stall_count: 1 << 40,
                ..ok
            },
        ] {
            assert!(matches!(plausible(bad), Err(LatencyError::Guest(_))));
        }
    }
}
