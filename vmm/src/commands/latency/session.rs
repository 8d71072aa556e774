//! One RAM configuration of `vmm latency`: guest RAM, the project's MMU
//! (unless it is the plain-KVM baseline), the uffd fault thread, and the
//! probe guest running on its own vCPU thread, driven through its control
//! words.

use super::measure::{self, MmuSample, State, Target};
use super::LatencyError;
use crate::machine::builtin::BuiltinVm;
use crate::memory::fault::{self, FaultOptions, FaultReport, FaultThread};
use crate::memory::mmu::{context_for, recorded_tdp, ZapRecorder};
use crate::memory::uffd::{UffdGuestRam, UffdMode};
use crate::thread;
use crate::vstate::{ExitHandler, Handled, RunControl, Vcpu, VcpuError};
use guests::builtin::LAYOUT;
use guests::probe::{self, ctl, res, ProbeMode, ProbeParams, ProbeWindow};
use kvm_ioctls::Kvm;
use mmu::guest_walk::{AccessKind, SparseGuestMem, X86Paging};
use mmu::memslot::Memslot;
use mmu::shadow::{FaultOutcome as ShadowOutcome, ShadowMmu};
use mmu::tdp::{HostPage, TdpMmu};
use mmu::yielder::YieldReport;
use notifier::hostmm::Backing;
use notifier::Subscribers;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// What the vCPU thread saw.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct VcpuStats {
    /// `KVM_RUN` answered EFAULT (a guest store to RAM the host made
    /// read-only) and was re-entered.
    pub efault_retries: u64,
    pub exits: u64,
}

/// The project's MMUs for one session, each on its own context and
/// notifier so their zaps are measured apart: the TDP MMU (gpa -> host
/// page), and the shadow MMU (guest virtual -> host page, through the
/// probe's identity page tables), whose zaps walk the rmaps the way this
/// host's KVM (shadow paging) does.
pub struct ProjectMmu {
    pub tdp: Arc<TdpMmu>,
    pub zaps: Arc<ZapRecorder>,
    pub shadow: Arc<ShadowMmu<X86Paging>>,
    pub shadow_zaps: Arc<ZapRecorder>,
}

pub struct Session {
    pub ram: Arc<UffdGuestRam>,
    pub mmu: Option<ProjectMmu>,
    pub params: ProbeParams,
    epoch: u64,
    mode: ProbeMode,
    fault_stop: Arc<AtomicBool>,
    fault_thread: Option<FaultThread>,
    vcpu_thread: Option<JoinHandle<Result<VcpuStats, String>>>,
    efaults: Arc<AtomicU64>,
    /// Guest TSC minus host TSC, and the uncertainty (host ticks between
    /// the epoch write and the acknowledgement the guest stamped).
    pub tsc_check: TscCheck,
}

/// Whether the guest's `rdtsc` reads the host's TSC (PVM runs guest CPL3
/// natively: it should, unless KVM applies an offset). Only deltas are
/// used; this is reported.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct TscCheck {
    pub guest_minus_host_ticks: i64,
    pub uncertainty_ticks: u64,
}

const ACK_TIMEOUT: Duration = Duration::from_secs(60);

impl Session {
    /// Boot the probe on `mem` bytes of `backing` RAM; with
    /// `project_mmu` the RAM's invalidations reach the project's TDP MMU.
    pub fn start(
        kvm: &Kvm,
        mem: u64,
        backing: Backing,
        project_mmu: bool,
        stall_tsc: u64,
        timeout: Duration,
    ) -> Result<Self, LatencyError> {
        let params = ProbeParams {
            ws_base: LAYOUT.ws_min,
            ws_size: mem - LAYOUT.ws_min,
            stride: 4096,
            mode: ProbeMode::All,
            stall_tsc,
            sparse_stride: 1 << 30,
            check_every: 64,
        };
        let image = probe::system_image(&params, mem)?;
        let subs = Subscribers::new();
        // The project: MINOR faults on a shared memfd, MISSING+COPY on
        // private RAM; plain KVM: the kernel's own faults.
        let mode = match (backing.is_shared(), project_mmu) {
            (true, true) => UffdMode::Minor,
            (true, false) => UffdMode::KernelPrefilled,
            (false, true) => UffdMode::Missing,
            (false, false) => UffdMode::Kernel,
        };
        // No non-cooperative events: the VMM's own operations announce
        // their ranges, and a REMOVE zap from the fault thread would land
        // in another measurement.
        let mut ram = UffdGuestRam::new(mem, backing, mode, subs.clone(), false)?;
        let mode = ram.mode();
        ram.load(0, &image)?;
        let ram = Arc::new(ram);
        let mmu = if project_mmu {
            let level = backing.page_size();
            let (tdp, zaps) = recorded_tdp(&ram, &subs)?;
            let sctx = context_for(&ram)?;
            let shadow = Arc::new(
                ShadowMmu::<X86Paging>::new(sctx.clone(), page_tables(&image, mem)).with_host(
                    Arc::new(move |_: &Memslot, gfn: u64, _: u64, _: bool| {
                        // gpa == memfd offset: the gfn names the host page.
                        Ok(HostPage {
                            pfn: gfn,
                            level,
                            writable: true,
                        })
                    }),
                ),
            );
            let shadow_zaps = ZapRecorder::for_mmu(&subs, sctx, shadow.clone());
            Some(ProjectMmu {
                tdp,
                zaps,
                shadow,
                shadow_zaps,
            })
        } else {
            None
        };
        let fault_stop = Arc::new(AtomicBool::new(false));
        let fault_thread = match (&mmu, mode.uses_uffd()) {
            (Some(m), true) => Some(fault::spawn(
                ram.clone(),
                m.tdp.clone(),
                fault_stop.clone(),
                FaultOptions::default(),
            )?),
            _ => None,
        };
        let bvm = BuiltinVm::new(kvm, ram.clone())?;
        let stop_on = fault_thread.as_ref().map(|t| t.progress.failed());
        let efaults = Arc::new(AtomicU64::new(0));
        let ef = efaults.clone();
        let vcpu_thread = std::thread::Builder::new()
            .name("probe-vcpu".into())
            .spawn(move || vcpu_loop(bvm, timeout, stop_on, &ef))
            .map_err(|e| LatencyError::Guest(format!("spawning the vCPU thread: {e}")))?;
        let mut s = Session {
            ram,
            mmu,
            params,
            epoch: 0,
            mode: ProbeMode::All,
            fault_stop,
            fault_thread,
            vcpu_thread: Some(vcpu_thread),
            efaults,
            tsc_check: TscCheck::default(),
        };
        // The first window: the guest is up once it acknowledges.
        s.close_window()?;
        // The tightest of a few acknowledgements bounds the offset.
        let mut best: Option<TscCheck> = None;
        for _ in 0..8 {
            let before = mmu::clock::now();
            let w = s.close_window()?;
            let after = mmu::clock::now();
            let c = TscCheck {
                guest_minus_host_ticks: w.tsc.wrapping_sub(before / 2 + after / 2).cast_signed(),
                uncertainty_ticks: after.saturating_sub(before) / 2,
            };
            if best.is_none_or(|b| c.uncertainty_ticks < b.uncertainty_ticks) {
                best = Some(c);
            }
        }
        s.tsc_check = best.unwrap_or_default();
        Ok(s)
    }

    pub fn mem(&self) -> u64 {
        self.ram.size()
    }

    fn result(&self) -> Result<ProbeWindow, LatencyError> {
        Ok(ProbeWindow::from_words(
            self.ram.read_u64s::<{ res::WORDS }>(LAYOUT.result)?,
        ))
    }

    /// Passes the guest completed since boot.
    pub fn passes_total(&self) -> Result<u64, LatencyError> {
        Ok(self.ram.read_u64s::<1>(LAYOUT.result + res::PASSES_TOTAL)?[0])
    }

    /// KVM_RUN EFAULT re-entries so far.
    pub fn efaults(&self) -> u64 {
        self.efaults.load(Ordering::Relaxed)
    }

    fn check_alive(&mut self) -> Result<(), LatencyError> {
        // (Finished also when it panicked.)
        if self.vcpu_thread.as_ref().is_some_and(|h| !h.is_finished()) {
            return Ok(());
        }
        if let Some(e) = measure::fault_thread_death(&mut self.fault_thread) {
            return Err(e);
        }
        let why = match self.vcpu_thread.take().map(|h| thread::join("vcpu", h)) {
            Some(Ok(Err(e))) => e,
            Some(Err(p)) => p.to_string(),
            _ => "vCPU stopped".into(),
        };
        Err(LatencyError::Guest(why))
    }

    /// Close the current window (bump the epoch, wait for the guest's
    /// acknowledgement) and return its figures; a new window starts.
    pub fn close_window(&mut self) -> Result<ProbeWindow, LatencyError> {
        self.epoch += 1;
        self.ram.write_u64(LAYOUT.params + ctl::EPOCH, self.epoch)?;
        let t0 = Instant::now();
        loop {
            let w = self.result()?;
            if w.ack_epoch == self.epoch {
                return Ok(w);
            }
            self.check_alive()?;
            if t0.elapsed() > ACK_TIMEOUT {
                return Err(LatencyError::Guest(format!(
                    "probe did not acknowledge epoch {} within {:?} (result page {:?}, {} KVM_RUN EFAULTs)",
                    self.epoch,
                    ACK_TIMEOUT,
                    w,
                    self.efaults()
                )));
            }
            std::thread::yield_now();
        }
    }

    /// Switch what the guest touches (takes effect at the next window).
    pub fn set_mode(&mut self, mode: ProbeMode) -> Result<(), LatencyError> {
        self.mode = mode;
        self.ram.write_u64(LAYOUT.params + ctl::MODE, mode as u64)?;
        self.close_window()?;
        Ok(())
    }

    pub fn mode(&self) -> ProbeMode {
        self.mode
    }

    /// Wait until the guest finished `n` more whole passes over its
    /// working set (idle: a short pause instead).
    pub fn wait_passes(&mut self, n: u64) -> Result<(), LatencyError> {
        if self.mode == ProbeMode::Idle {
            std::thread::sleep(Duration::from_millis(1));
            return Ok(());
        }
        let p0 = self.passes_total()?;
        let t0 = Instant::now();
        while self.passes_total()? < p0 + n {
            self.check_alive()?;
            if t0.elapsed() > ACK_TIMEOUT {
                return Err(LatencyError::Guest(format!(
                    "probe made no {n} passes within {ACK_TIMEOUT:?}"
                )));
            }
            std::thread::sleep(Duration::from_micros(200));
        }
        Ok(())
    }

    /// The gpas the guest's current mode touches (plus the system page):
    /// huge-page starts in `[gs, ge)`.
    pub fn touched_pages(&self, gs: u64, ge: u64) -> Vec<u64> {
        let ps = self.ram.page_bytes();
        let mut out = Vec::new();
        if gs == 0 {
            out.push(0);
        }
        let p = &self.params;
        match self.mode {
            ProbeMode::Idle => {}
            ProbeMode::All => {
                let mut a = p.ws_base.max(gs) & !(ps - 1);
                while a < ge.min(p.ws_base + p.ws_size) {
                    if a >= gs && !out.contains(&a) {
                        out.push(a);
                    }
                    a += ps;
                }
            }
            ProbeMode::Sparse => {
                let mut a = p.ws_base;
                while a < p.ws_base + p.ws_size {
                    let page = a & !(ps - 1);
                    if a >= gs && a < ge && !out.contains(&page) {
                        out.push(page);
                    }
                    a += p.sparse_stride;
                }
            }
        }
        out
    }

    /// Map the pages the guest touches in `[gs, ge)` in the project's MMU
    /// (what the guest's touches would have done had KVM's fault reached
    /// userfaultfd: after a protection change the host pages stay present,
    /// so only KVM refaults, not the project's MMU).
    pub fn remap_mmu(&self, gs: u64, ge: u64) -> Result<(), LatencyError> {
        let (Some(m), true) = (&self.mmu, self.ram.mode().uses_uffd()) else {
            return Ok(());
        };
        let mut rep = FaultReport::default();
        let paging = X86Paging::new(LAYOUT.pml4);
        for gpa in self.touched_pages(gs, ge) {
            fault::handle_fault(
                &self.ram,
                &m.tdp,
                self.ram.guest_hva() + gpa,
                true,
                &mut rep,
            )
            .map_err(|e| LatencyError::Guest(format!("re-mapping gpa {gpa:#x}: {e}")))?;
            // The shadow MMU: the probe's identity mapping (gva == gpa); a
            // user write, except on the system page, which holds the guest
            // page tables (write-tracked: read access there).
            let access = AccessKind {
                write: gpa != 0,
                user: true,
                fetch: false,
            };
            for _ in 0..1000 {
                match m.shadow.page_fault(&paging, gpa, access) {
                    Ok(ShadowOutcome::Retry) => std::thread::yield_now(),
                    Ok(_) => break,
                    Err(e) => {
                        return Err(LatencyError::Guest(format!(
                            "shadow fault at gva {gpa:#x}: {e}"
                        )))
                    }
                }
            }
        }
        Ok(())
    }

    /// Stop the guest and the threads.
    pub fn stop(mut self) -> Result<VcpuStats, LatencyError> {
        self.shutdown()
    }

    fn shutdown(&mut self) -> Result<VcpuStats, LatencyError> {
        let _ = self.ram.write_u64(LAYOUT.params + ctl::STOP, 1);
        let vcpu = self.vcpu_thread.take().map(|h| thread::join("vcpu", h));
        self.fault_stop.store(true, Ordering::Release);
        let faults = (self.fault_thread.take()).map(|t| thread::join("uffd-fault", t.handle));
        let stats = match vcpu {
            Some(Ok(Ok(s))) => s,
            Some(Ok(Err(e))) => return Err(LatencyError::Guest(e)),
            Some(Err(p)) => return Err(LatencyError::Guest(p.to_string())),
            None => VcpuStats::default(),
        };
        match faults {
            Some(Ok(Err(e))) => Err(LatencyError::Guest(format!("fault thread: {e}"))),
            Some(Err(p)) => Err(LatencyError::Guest(p.to_string())),
            _ => Ok(stats),
        }
    }
}

impl Target for Session {
    fn root_cause(&mut self, e: LatencyError) -> LatencyError {
        measure::fault_thread_death(&mut self.fault_thread).unwrap_or(e)
    }
    fn ram(&self) -> &Arc<UffdGuestRam> {
        &self.ram
    }
    fn tdp_zaps(&self) -> Option<Vec<YieldReport>> {
        Some(self.mmu.as_ref()?.zaps.take())
    }
    fn shadow_sample(&self) -> Option<MmuSample> {
        let m = self.mmu.as_ref()?;
        let mut out = measure::fold(m.shadow_zaps.take());
        for r in m.shadow.take_notifier_reports() {
            out.rmaps += r.rmap_heads_visited;
            out.shadow_pages += r.shadow_pages_zapped;
        }
        Some(out)
    }
    fn remap_mmu(&self, gs: u64, ge: u64) -> Result<(), LatencyError> {
        Session::remap_mmu(self, gs, ge)
    }
    fn close_window(&mut self) -> Result<Option<ProbeWindow>, LatencyError> {
        Session::close_window(self).map(Some)
    }
    fn settle(&mut self) -> Result<(), LatencyError> {
        self.wait_passes(2)
    }
    fn prepare(&mut self, state: State) -> Result<(), LatencyError> {
        measure::prepare(self, state)
    }
    fn before_drop(&mut self, _gs: u64, _ge: u64) -> Result<(), LatencyError> {
        // The probe re-writes what it touches: nothing to keep.
        Ok(())
    }
    fn after_drop(&mut self, gs: u64, ge: u64) -> Result<(), LatencyError> {
        if self.ram.mode().prefilled() {
            crate::host::invalidator::refill(&self.ram, gs, ge)?;
        }
        Ok(())
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if self.vcpu_thread.is_some() || self.fault_thread.is_some() {
            let _ = self.shutdown();
        }
    }
}

/// The probe's page tables (a copy of the system image's: the probe never
/// writes them) as the shadow MMU's view of guest memory.
fn page_tables(image: &[u8], mem: u64) -> Arc<SparseGuestMem> {
    let m = SparseGuestMem::new(mem);
    let gib = mem.div_ceil(1 << 30).max(4);
    let end = (LAYOUT.pml4 + (2 + gib) * 0x1000).min(image.len() as u64);
    let mut gpa = LAYOUT.pml4;
    while gpa + 8 <= end {
        let o = notifier::convert::u64_to_usize(gpa);
        let mut w = [0u8; 8];
        w.copy_from_slice(&image[o..o + 8]);
        let v = u64::from_le_bytes(w);
        if v != 0 {
            // In range and aligned by construction.
            let _ = m.write_u64(gpa, v);
        }
        gpa += 8;
    }
    Arc::new(m)
}

/// The probe's doorbells: done at the end; every other store (a window
/// acknowledgement the VMM reads from guest RAM) just continues. EFAULT
/// from KVM_RUN (a guest store to RAM the host made read-only for a
/// moment) re-enters, counted.
struct ProbeExits<'a> {
    stats: VcpuStats,
    efaults: &'a AtomicU64,
}

impl ExitHandler for ProbeExits<'_> {
    type Stop = ();

    fn mmio_write(&mut self, addr: u64, _data: &[u8]) -> Handled<()> {
        self.stats.exits += 1;
        if addr == LAYOUT.done_mmio {
            return Handled::Stop(());
        }
        Handled::Continue
    }

    fn mmio_read(&mut self, _addr: u64, data: &mut [u8]) -> Handled<()> {
        self.stats.exits += 1;
        data.fill(0);
        Handled::Continue
    }

    fn memory_fault(&mut self, _vcpu: &Vcpu, _gpa: Option<u64>) -> Handled<()> {
        self.stats.exits += 1;
        self.stats.efault_retries += 1;
        self.efaults.fetch_add(1, Ordering::Relaxed);
        std::thread::yield_now();
        Handled::Continue
    }
}

/// Run the probe until it rings the done doorbell (or the fault thread
/// dies, or `timeout` passes).
fn vcpu_loop(
    mut bvm: BuiltinVm,
    timeout: Duration,
    stop_on: Option<Arc<AtomicBool>>,
    efaults: &AtomicU64,
) -> Result<VcpuStats, String> {
    let mut ctl = RunControl::timeout(timeout);
    if let Some(f) = stop_on {
        ctl = ctl.stop_on(f);
    }
    let mut exits = ProbeExits {
        stats: VcpuStats::default(),
        efaults,
    };
    match bvm.vcpu.run(&mut exits, &ctl) {
        Ok(()) => Ok(exits.stats),
        Err(VcpuError::TimedOut { .. }) => Err(format!(
            "probe guest still running after {timeout:?} (--timeout); {}",
            bvm.vcpu.dump()
        )),
        Err(VcpuError::Stopped { rip }) => Err(format!(
            "probe guest stopped at rip {rip:#x}: the fault thread died"
        )),
        Err(e) => Err(format!("probe guest stopped: {e}")),
    }
}
