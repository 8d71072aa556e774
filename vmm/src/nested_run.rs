//! `vmm nested-run`: nested TDP on the real plane. The built-in "L1
//! hypervisor" guest ([`guests::l1hv`]) runs at CPL3 in a real KVM VM on
//! hugetlb RAM, builds EPT tables for an L2 in its own RAM and rings the
//! EPTP ("vmlaunch"); the VMM shadows those tables with the project's
//! [`NestedMmu`] reading them straight out of guest RAM ([`L1Mem`]).
//!
//! There is no VMX on this host (nor does the guest execute VMLAUNCH): **L2
//! does not run**. Its accesses are simulated by the VMM: at each vmlaunch
//! every L2 page is faulted through the nested MMU (a write access), as L2's
//! first touches would be. What is real: the L1 program and the tables it
//! wrote (untrusted, read once per entry through the host mapping), the
//! host mm operations on L1's RAM and their mmu_notifier ranges, and real
//! KVM (here the host's shadow MMU) running L1.
//!
//! At each vmlaunch (generation `g`: 0 after the build, then one per edit
//! round):
//! 1. Silent writes: every write-tracked gfn whose contents differ from what
//!    was shadowed is handled as a write fault (`unannounced_writes_detected`).
//! 2. Stale check: every present shadow translation must equal a reference
//!    walk of the guest's current tables (`stale_after_edits`).
//! 3. Run L2: fault every L2 page; check each translation against the
//!    reference walk and the reference walk against the guest's own model
//!    ([`L1hvParams::l1_gpa`]).
//! 4. Host invalidation: `mprotect(PROT_READ)` of L1 RAM (default: all of it,
//!    a PUD's worth on 1 GiB) then back to RW, through `notifier::ops`
//!    (HostMm -> Subscribers -> KvmMmuNotifier -> the nested MMU's rmap
//!    zap), with the soft-lockup watchdog of [`crate::soft_lockup`] waiting
//!    on `mmu_lock`; after it, no shadow translation may map the range
//!    (`stale_after_invalidation`).
//! 5. (`trap`: write-protect the table pool in the host.) Re-fault L2 (the
//!    tables are shadowed and write-tracked again), take a snapshot of every
//!    write-tracked gfn, and write the next generation (0: stop) into the
//!    guest's control word.
//!
//! Between vmlaunches the guest edits its tables. How the VMM learns of
//! each store (`--write-track`):
//! - `trap` (default, KVM's way): the huge pages of the L1's EPT table pool
//!   are write-protected in the host (`mprotect(PROT_READ)` through
//!   `notifier::ops`, before the tables are shadowed again), so a store to
//!   them cannot be mapped writable by KVM: `KVM_RUN` fails with `EFAULT`
//!   (on this host without a `KVM_EXIT_MEMORY_FAULT` exit reason). The VMM
//!   decodes the instruction at the L1's rip (iced-x86; it must be an
//!   8-byte register store into the pool), performs the store through its
//!   own mapping, steps over it, and handles it as KVM handles a write fault
//!   on a write-protected guest table (`kvm_mmu_track_write`: zap the gfn's
//!   shadow pages) if the gfn is write-tracked (`table_write_faults`). The
//!   host protects 2 MiB at a time, so stores to gfns no longer tracked trap
//!   too (`untracked_table_writes`: KVM would not have faulted).
//! - `announce`: the L1 follows each store with an MMIO store of the
//!   entry's gpa; handled the same way.
//! - `contents`: the L1 says nothing and nothing traps; at the next
//!   vmlaunch every write-tracked gfn whose contents differ from the
//!   snapshot taken when it was shadowed is handled as written
//!   (`unannounced_writes_detected`). This check runs in every mode: the L1
//!   is untrusted.

use crate::assist::gpr64;
use crate::boot::parse_size;
use crate::builtin_vm::{BuiltinVm, BuiltinVmError, Watchdog};
use crate::guest_ram_uffd::{UffdGuestRam, UffdMode, UffdRamError};
use crate::run::RunError;
use crate::soft_lockup::{watchdog_until, OnOff, WatchdogReport};
use guests::l1hv::{self, L1hvConfig, L1hvError, L1hvParams};
use iced_x86::{Decoder, DecoderOptions, Mnemonic, OpKind, Register};
use kvm_ioctls::VcpuExit;
use mmu::guest_walk::{walk_ept, AccessKind, EptPaging, GuestPhysMem, MemError, PAGE_SHIFT};
use mmu::memslot::{Memslot, Memslots};
use mmu::nested::NestedMmu;
use mmu::shadow::{FaultError, FaultOutcome, NotifierZap, WalkMode, ZapProgress, ZapReport};
use mmu::tdp::HostPage;
use mmu::yielder::YieldReport;
use mmu::{KvmMmuNotifier, MmuContext, MmuStatsSnapshot, RemoteTlb, YieldPolicy};
use notifier::hostconf::HugepageReservation;
use notifier::subscriber::{Invalidation, InvalidationSubscriber};
use notifier::PageSize;
use notifier::{HvaRange, Subscribers};
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Arguments of `vmm nested-run`.
#[derive(clap::Args, Debug, Clone)]
pub struct NestedRunArgs {
    /// L1 guest RAM (2 MiB hugetlb).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    pub mem: u64,
    /// As root, grow the 2 MiB hugetlb pool so L1's RAM fits, for this run
    /// only (lowered again at exit).
    #[arg(long)]
    pub reserve_hugepages: bool,
    /// L2 guest-physical size.
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    pub l2: u64,
    /// L2 page size of the L1's EPT leaves: 4K, 2M or 1G.
    #[arg(long, default_value = "4K")]
    pub l2_page: PageSize,
    /// Fraction of L2 pages the L1 maps.
    #[arg(long, default_value_t = 0.5)]
    pub density: f64,
    /// Fraction of L2 pages the L1 edits per round.
    #[arg(long, default_value_t = 0.25)]
    pub edit_fraction: f64,
    /// EPT edit rounds after the first vmlaunch.
    #[arg(long, default_value_t = 3)]
    pub edits: u64,
    /// How the VMM learns of the L1's stores to its EPT tables: trap (the
    /// table pool's huge pages are write-protected in the host, a store
    /// exits with a memory fault and is emulated: KVM's way), announce (the
    /// L1 rings a doorbell with each entry's gpa), contents (the L1 says
    /// nothing; the VMM compares the write-tracked gfns at each vmlaunch).
    #[arg(long, value_enum, default_value = "trap")]
    pub write_track: WriteTrack,
    /// Negative control: ignore the L1's EPT stores (announced or not), so
    /// the stale-translation check must find them.
    #[arg(long, hide = true)]
    pub ignore_table_writes: bool,
    /// Bytes of L1 RAM (from gpa 0) mprotected per vmlaunch (default: all).
    #[arg(long, value_parser = parse_size)]
    pub protect: Option<u64>,
    /// Yield during the zap (on) or never (off: KVM before 6.12).
    #[arg(long = "yield", value_enum, default_value = "on")]
    pub yield_mode: OnOff,
    /// Visit every rmap head (KVM's walk) instead of the populated summary.
    #[arg(long)]
    pub blind: bool,
    /// Most rmap heads per stretch when yielding.
    #[arg(long, default_value_t = 4096)]
    pub max_units: u64,
    /// Longest stretch in time when yielding, microseconds.
    #[arg(long, default_value_t = 20)]
    pub slice_us: u64,
    /// The watchdog needs mmu_lock every this many milliseconds.
    #[arg(long, default_value_t = 1)]
    pub watchdog_ms: u64,
    /// Run twice, yield off then on, and print the ratios of the watchdog's
    /// worst wait (the baseline measured in the same invocation).
    #[arg(long)]
    pub compare: bool,
    /// Print the JSON report as the last stdout line.
    #[arg(long)]
    pub json: bool,
    /// Give up after this many seconds of guest run time.
    #[arg(long, default_value_t = 120)]
    pub timeout: u64,
    /// The KVM device.
    #[arg(long, default_value = "/dev/kvm", hide = true)]
    pub kvm_dev: PathBuf,
}

impl NestedRunArgs {
    /// Defaults, for library callers.
    pub fn new(mem: u64, l2: u64, l2_page: PageSize) -> Self {
        Self {
            mem,
            reserve_hugepages: false,
            l2,
            l2_page,
            density: 0.5,
            edit_fraction: 0.25,
            edits: 3,
            write_track: WriteTrack::Trap,
            ignore_table_writes: false,
            protect: None,
            yield_mode: OnOff::On,
            blind: false,
            max_units: 4096,
            slice_us: 20,
            watchdog_ms: 1,
            compare: false,
            json: false,
            timeout: 120,
            kvm_dev: "/dev/kvm".into(),
        }
    }

    pub fn config(&self) -> L1hvConfig {
        L1hvConfig {
            mem: self.mem,
            l2_size: self.l2,
            page: self.l2_page,
            density: self.density,
            edit_fraction: self.edit_fraction,
            announce: self.write_track == WriteTrack::Announce,
        }
    }
}

/// How the L1's EPT-table stores reach the VMM (`--write-track`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum WriteTrack {
    Trap,
    Announce,
    Contents,
}

#[derive(Debug, thiserror::Error)]
pub enum NestedRunError {
    #[error(transparent)]
    Run(#[from] RunError),
    #[error(transparent)]
    Setup(#[from] BuiltinVmError),
    #[error(transparent)]
    Ram(#[from] UffdRamError),
    #[error(transparent)]
    Guest(#[from] L1hvError),
    #[error(transparent)]
    Memslot(#[from] mmu::memslot::MemslotError),
    #[error("host mm operation: {0}")]
    HostMm(#[from] notifier::Error),
    #[error("nested fault at L2 gpa {gpa:#x}: {err}")]
    Fault { gpa: u64, err: FaultError },
    #[error("--protect {0:#x} must be a non-zero multiple of 2 MiB within L1 RAM")]
    BadProtect(u64),
    #[error("--max-units and --watchdog-ms must be at least 1")]
    BadYieldArgs,
    #[error("the L1 guest reported an error (doorbell {0:#x}): its EPT table pool ran out")]
    GuestError(u64),
    #[error("the L1 guest rang vmlaunch more often than asked ({0})")]
    TooManyLaunches(u64),
    #[error("the watchdog thread panicked")]
    Watchdog,
    #[error("the control word at {0:#x} kept changing while the guest was stopped")]
    ControlWord(u64),
    #[error("memory fault at rip {rip:#x} not an 8-byte register store into the write-protected EPT table pool: {what}")]
    UnexpectedFault { rip: u64, what: String },
    #[error("{what}: {source}")]
    Vcpu {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// The `--json` summary. The zap figures are those of `vmm soft-lockup`
/// (worst over every host invalidation of the run).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct NestedRunReport {
    pub mem_mib: u64,
    pub l2_bytes: u64,
    pub l2_page: String,
    pub l2_pages: u64,
    /// L2 gpas whose accesses are simulated (one per L2 page, or per 2 MiB
    /// of a 1 GiB L2 page).
    pub l2_samples: u64,
    pub density: f64,
    pub announce: bool,
    pub write_track: String,
    pub yield_on: bool,
    pub walk: String,
    pub protect_bytes: u64,
    pub vmlaunches: u64,
    pub edit_rounds: u64,
    /// EPT table pages the guest allocated.
    pub guest_tables_used: u64,
    /// Nested page faults taken for simulated L2 accesses.
    pub l2_faults: u64,
    /// Simulated L2 accesses to unmapped pages (an EPT violation for L1).
    pub l2_ept_violations: u64,
    /// Simulated L2 accesses the L1 mapped outside its RAM (L2 MMIO).
    pub l2_mmio_accesses: u64,
    pub translations_checked: u64,
    /// Shadow translations that disagreed with the reference walk after
    /// faulting (must be 0).
    pub translation_mismatches: u64,
    /// Reference walks that disagreed with the guest program's model.
    pub model_mismatches: u64,
    /// Present shadow translations the guest's tables no longer give, after
    /// its EPT edits, plus those into a host-invalidated range (must be 0).
    pub stale_translations: u64,
    pub stale_after_edits: u64,
    pub stale_after_invalidation: u64,
    pub first_stale: Vec<String>,
    /// Most guest EPT table gfns shadowed at once, and write-tracked.
    pub ept_tables_shadowed: u64,
    pub write_tracked_gfns: u64,
    /// EPT stores (trapped or announced) to write-tracked gfns: KVM's write
    /// faults on write-protected guest tables.
    pub table_write_faults: u64,
    /// EPT stores to gfns not tracked (any more): KVM would not fault (with
    /// `trap`, the 2 MiB host protection traps them anyway).
    pub untracked_table_writes: u64,
    /// Stores trapped by the host write protection and emulated.
    pub table_write_traps: u64,
    /// Write-tracked gfns found changed without an announcement.
    pub unannounced_writes_detected: u64,
    pub shadow_pages_zapped_by_writes: u64,
    pub invalidations: u64,
    pub notified_ranges: u64,
    pub max_stretch_ns: u64,
    pub max_stretch_entries: u64,
    pub yields: u64,
    pub watchdog_worst_wait_ns: u64,
    pub watchdog_worst_wait_entries: u64,
    pub watchdog_worst_wait_work: u64,
    pub watchdog_acquisitions: u64,
    /// Longest single zap (one notifier start), and all of them.
    pub zap_ns: u64,
    pub zap_ns_total: u64,
    pub rmap_entries_visited: u64,
    pub sptes_zapped: u64,
    pub shadow_pages_zapped: u64,
    pub l2_fault_ns: u64,
    pub guest_run_s: f64,
    pub total_s: f64,
    pub stats: MmuStatsSnapshot,
}

impl NestedRunReport {
    /// Whether the run is a success.
    pub fn ok(&self) -> bool {
        self.stale_translations == 0
            && self.translation_mismatches == 0
            && self.model_mismatches == 0
            && self.vmlaunches > 0
    }
}

/// L1's RAM as the nested MMU's walker sees it: bounds-checked reads of
/// the host mapping (through the VMM's alias of the memfd), each entry read
/// once; the only writes are a walker's A/D updates (compare-exchange), and
/// only if the L1's EPTP enables A/D (the built-in L1's does not).
pub struct L1Mem(pub Arc<UffdGuestRam>);

impl GuestPhysMem for L1Mem {
    fn read_u64(&self, gpa: u64) -> Result<u64, MemError> {
        if !gpa.is_multiple_of(8) {
            return Err(MemError::Misaligned { gpa });
        }
        self.0
            .read_u64s::<1>(gpa)
            .map(|w| w[0])
            .map_err(|_| MemError::OutsideRam { gpa })
    }

    fn cmpxchg_u64(&self, gpa: u64, old: u64, new: u64) -> Result<bool, MemError> {
        if !gpa.is_multiple_of(8) {
            return Err(MemError::Misaligned { gpa });
        }
        self.0
            .cmpxchg_u64(gpa, old, new)
            .map_err(|_| MemError::OutsideRam { gpa })
    }
}

/// Registered after the [`KvmMmuNotifier`]: keeps the yield report of
/// each `invalidate_range_start` (one per notified range) for the figures.
struct YieldRecorder {
    notifier: Arc<KvmMmuNotifier>,
    reports: parking_lot::Mutex<Vec<YieldReport>>,
}

impl InvalidationSubscriber for YieldRecorder {
    fn invalidate_range_start(&self, _inv: &Invalidation) {
        if let Some(r) = self.notifier.last_report() {
            self.reports.lock().push(r);
        }
    }
    fn invalidate_range_end(&self, _inv: &Invalidation) {}
}

/// The VMM's side of the L1: its nested MMU and what the checks found.
struct NestedPlane {
    ram: Arc<UffdGuestRam>,
    mem: Arc<L1Mem>,
    ctx: Arc<MmuContext>,
    yields: Arc<YieldRecorder>,
    progress: Arc<ZapProgress>,
    walk: WalkMode,
    backing: PageSize,
    mmu: Option<Arc<NestedMmu>>,
    params: L1hvParams,
    protect: HvaRange,
    watchdog_period: Duration,
    ignore_table_writes: bool,
    write_track: WriteTrack,
    /// The huge pages holding the L1's EPT table pool (host-write-protected
    /// with `--write-track trap`).
    pool: HvaRange,
    /// Contents of every write-tracked gfn as last shadowed.
    snapshots: HashMap<u64, Box<[u64; 512]>>,
    r: NestedRunReport,
}

/// L2 gpas the VMM simulates accesses to: one per L2 page, or per 2 MiB
/// (the host page size) of a 1 GiB L2 page, at a varying 4 KiB offset
/// inside large pages.
fn sample_gpas(p: &L1hvParams) -> impl Iterator<Item = u64> + '_ {
    let step = p.page.bytes().min(2 << 20);
    let n = (p.npages << p.page.shift()) / step;
    (0..n).map(move |k| (k * step) | ((k << PAGE_SHIFT) & (step - 1)))
}

impl NestedPlane {
    fn paging(&self, eptp: u64) -> EptPaging {
        EptPaging {
            eptp,
            ..EptPaging::new(0, false)
        }
    }

    /// The nested MMU, built at the first vmlaunch.
    fn mmu(&mut self) -> Arc<NestedMmu> {
        if let Some(m) = &self.mmu {
            return m.clone();
        }
        let backing = self.backing;
        // __kvm_faultin_pfn: L1's RAM is fully populated (prefilled
        // memfd); the pfn is the memfd page index, as for the TDP MMU.
        let host = move |_slot: &Memslot, gfn: u64, _hva: u64, _write: bool| {
            Ok(HostPage {
                pfn: gfn,
                level: backing,
                writable: true,
            })
        };
        let mut mmu = NestedMmu::new(self.ctx.clone(), self.mem.clone()).with_host(Arc::new(host));
        mmu.set_notifier_zap(NotifierZap {
            mode: self.walk,
            progress: Some(self.progress.clone()),
        });
        let mmu = Arc::new(mmu);
        self.yields.notifier.add_mmu(mmu.clone());
        self.mmu = Some(mmu.clone());
        mmu
    }

    fn stale(&mut self, what: String) {
        self.r.stale_translations += 1;
        if self.r.first_stale.len() < 8 {
            self.r.first_stale.push(what);
        }
    }

    /// An announced store to the EPT entry at `gpa`.
    fn table_write(&mut self, gpa: u64) {
        let gfn = gpa >> PAGE_SHIFT;
        match &self.mmu {
            _ if self.ignore_table_writes => {}
            Some(m) if m.is_write_tracked(gfn) => {
                self.r.table_write_faults += 1;
                self.r.shadow_pages_zapped_by_writes += m.guest_table_write(gfn);
            }
            _ => self.r.untracked_table_writes += 1,
        }
    }

    /// The vmlaunch doorbell for generation `gen`.
    fn vmlaunch(&mut self, eptp: u64, gen: u64) -> Result<(), NestedRunError> {
        self.r.vmlaunches += 1;
        let paging = self.paging(eptp);
        let mmu = self.mmu();
        // 1. Stores the L1 did not announce: what changed in tracked gfns.
        let changed: Vec<u64> = self
            .snapshots
            .iter()
            .filter(|_| !self.ignore_table_writes)
            .filter(|(gfn, snap)| {
                self.ram
                    .read_u64s::<512>(**gfn << PAGE_SHIFT)
                    .map_or(true, |now| now[..] != snap[..])
            })
            .map(|(gfn, _)| *gfn)
            .collect();
        for gfn in changed {
            if mmu.is_write_tracked(gfn) {
                self.r.unannounced_writes_detected += 1;
                self.r.shadow_pages_zapped_by_writes += mmu.guest_table_write(gfn);
            }
        }
        // 2. No stale translation after the L1's edits.
        let params = self.params;
        for gpa in sample_gpas(&params) {
            if let Some(m) = mmu.translate(&paging, gpa) {
                let want = self.reference(&paging, gpa);
                if want != Some(m.gfn) {
                    self.r.stale_after_edits += 1;
                    self.stale(format!(
                        "gen {gen}: L2 gpa {gpa:#x} -> L1 gfn {:#x}, tables say {want:x?}",
                        m.gfn
                    ));
                }
            }
        }
        // 3. Run L2.
        let t = Instant::now();
        self.fault_all(&mmu, &paging)?;
        self.r.l2_fault_ns += t.elapsed().as_nanos() as u64;
        self.check_translations(&mmu, &paging, Some(gen));
        let tracked = self.tracked_tables(&mmu);
        self.r.ept_tables_shadowed = self.r.ept_tables_shadowed.max(tracked.len() as u64);
        self.r.write_tracked_gfns = self
            .r
            .write_tracked_gfns
            .max(tracked.iter().filter(|&&g| mmu.is_write_tracked(g)).count() as u64);
        // 4. Host invalidation of L1 RAM.
        self.invalidate(&mmu, &paging)?;
        // 5. (`trap`: write-protect the table pool in the host, before the
        // tables are shadowed again: a host invalidation of a range zaps
        // the shadow pages of the guest tables in it.) L2 touches its pages
        // again; remember what was shadowed.
        self.protect_pool(&mmu)?;
        self.fault_all(&mmu, &paging)?;
        self.check_translations(&mmu, &paging, None);
        self.snapshots.clear();
        for gfn in self.tracked_tables(&mmu) {
            if let Ok(words) = self.ram.read_u64s::<512>(gfn << PAGE_SHIFT) {
                self.snapshots.insert(gfn, Box::new(words));
            }
        }
        Ok(())
    }

    /// The reference: a fresh walk of the guest's tables, no A/D updates.
    fn reference(&self, paging: &EptPaging, gpa: u64) -> Option<u64> {
        walk_ept(&*self.mem, paging, gpa, AccessKind::READ, false)
            .ok()
            .map(|t| t.gfn())
    }

    /// Gfns of guest EPT tables with shadow pages (write-tracked).
    fn tracked_tables(&self, mmu: &NestedMmu) -> Vec<u64> {
        let mut v: Vec<u64> = mmu
            .roles()
            .into_iter()
            .filter(|(_, role)| !role.direct)
            .map(|(gfn, _)| gfn)
            .collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// Simulated L2 writes to every L2 page.
    fn fault_all(&mut self, mmu: &NestedMmu, paging: &EptPaging) -> Result<(), NestedRunError> {
        let params = self.params;
        for gpa in sample_gpas(&params) {
            for _ in 0..8 {
                self.r.l2_faults += 1;
                match mmu.page_fault(paging, gpa, AccessKind::WRITE) {
                    Ok(FaultOutcome::Retry) => continue,
                    Ok(_) => {}
                    // An EPT violation/misconfig L1 would handle.
                    Err(FaultError::Guest(_)) => self.r.l2_ept_violations += 1,
                    // L1 mapped the L2 page to a gpa outside its RAM: MMIO
                    // for L2, which this VMM does not emulate.
                    Err(FaultError::NoMemslot { .. }) => self.r.l2_mmio_accesses += 1,
                    Err(err) => return Err(NestedRunError::Fault { gpa, err }),
                }
                break;
            }
        }
        Ok(())
    }

    /// Every L2 page: the shadow translation equals the reference walk, and
    /// (with `gen`) the reference walk equals the guest program's model.
    fn check_translations(&mut self, mmu: &NestedMmu, paging: &EptPaging, gen: Option<u64>) {
        let params = self.params;
        for gpa in sample_gpas(&params) {
            self.r.translations_checked += 1;
            let want = self.reference(paging, gpa);
            let got = mmu.translate(paging, gpa).map(|m| m.gfn);
            if got != want {
                self.r.translation_mismatches += 1;
                if self.r.first_stale.len() < 8 {
                    self.r.first_stale.push(format!(
                        "L2 gpa {gpa:#x}: shadow {got:x?}, reference walk {want:x?}"
                    ));
                }
            }
            if let Some(g) = gen {
                if want != params.l1_gpa(gpa, g).map(|a| a >> PAGE_SHIFT) {
                    self.r.model_mismatches += 1;
                }
            }
        }
    }

    /// One `mprotect` of `range` through `notifier::ops`, with the watchdog
    /// waiting on `mmu_lock` while the zap runs; its figures go into the
    /// report if `record`.
    fn watched_protect(
        &mut self,
        mmu: &NestedMmu,
        range: HvaRange,
        prot: i32,
        record: bool,
    ) -> Result<(), NestedRunError> {
        self.progress.started.store(false, Ordering::Release);
        self.progress.done.store(false, Ordering::Release);
        let over = Arc::new(AtomicBool::new(false));
        let wd = {
            let (ctx, progress, period, over) = (
                self.ctx.clone(),
                self.progress.clone(),
                self.watchdog_period,
                over.clone(),
            );
            std::thread::spawn(move || {
                watchdog_until(&ctx, &progress, period, || over.load(Ordering::Acquire))
            })
        };
        // One zap per VMA the kernel notifies (the pool's protection splits
        // L1's VMA in three); the watchdog runs over all of them.
        let res = self.ram.hostmm().protect(range, prot);
        over.store(true, Ordering::Release);
        let wd: WatchdogReport = wd.join().map_err(|_| NestedRunError::Watchdog)?;
        let notes = res?;
        if !record {
            mmu.take_notifier_reports();
            self.yields.reports.lock().clear();
            return Ok(());
        }
        self.r.invalidations += 1;
        self.r.notified_ranges += notes.len() as u64;
        let r = &mut self.r;
        r.watchdog_worst_wait_ns = r.watchdog_worst_wait_ns.max(wd.worst_wait_ns);
        r.watchdog_worst_wait_entries = r.watchdog_worst_wait_entries.max(wd.worst_wait_entries);
        r.watchdog_worst_wait_work = r.watchdog_worst_wait_work.max(wd.worst_wait_work);
        r.watchdog_acquisitions += wd.acquisitions;
        for y in std::mem::take(&mut *self.yields.reports.lock()) {
            r.max_stretch_ns = r.max_stretch_ns.max(y.longest.ns);
            r.max_stretch_entries = r.max_stretch_entries.max(y.longest.units);
            r.yields += y.yields;
            r.zap_ns = r.zap_ns.max(y.total_ns);
            r.zap_ns_total += y.total_ns;
        }
        for z in mmu.take_notifier_reports() {
            let z: ZapReport = z;
            r.rmap_entries_visited += z.rmap_heads_visited;
            r.sptes_zapped += z.sptes_zapped;
            r.shadow_pages_zapped += z.shadow_pages_zapped;
        }
        Ok(())
    }

    /// 4.: protect the range read-only (the zap), check, and restore RW.
    fn invalidate(&mut self, mmu: &NestedMmu, paging: &EptPaging) -> Result<(), NestedRunError> {
        self.watched_protect(mmu, self.protect, libc::PROT_READ, true)?;
        let base = self.ram.guest_hva();
        let (g0, g1) = (
            (self.protect.start - base) >> PAGE_SHIFT,
            (self.protect.end - base) >> PAGE_SHIFT,
        );
        let params = self.params;
        for gpa in sample_gpas(&params) {
            if let Some(m) = mmu.translate(paging, gpa) {
                if (g0..g1).contains(&m.gfn) {
                    self.r.stale_after_invalidation += 1;
                    self.stale(format!(
                        "L2 gpa {gpa:#x} still maps L1 gfn {:#x} inside the invalidated range",
                        m.gfn
                    ));
                }
            }
        }
        self.watched_protect(mmu, self.protect, libc::PROT_READ | libc::PROT_WRITE, true)
    }

    /// `--write-track trap`: write-protect the table pool in the host, so
    /// the L1's next EPT store faults.
    fn protect_pool(&mut self, mmu: &NestedMmu) -> Result<(), NestedRunError> {
        if self.write_track == WriteTrack::Trap {
            self.watched_protect(mmu, self.pool, libc::PROT_READ, false)?;
        }
        Ok(())
    }

    /// A store the host write protection trapped (`x86_emulate_instruction`
    /// for a write to a write-protected guest table): decode the L1's
    /// instruction, perform the store through the VMM's mapping, step over
    /// it, and handle it as the write fault it is.
    fn emulate_table_store(&mut self, vcpu: &kvm_ioctls::VcpuFd) -> Result<(), NestedRunError> {
        let vcpu_err = |what| move |source| NestedRunError::Vcpu { what, source };
        let mut regs = vcpu.get_regs().map_err(vcpu_err("KVM_GET_REGS"))?;
        let rip = regs.rip;
        let bad = |what: String| NestedRunError::UnexpectedFault { rip, what };
        // The L1 runs on identity page tables: its rip is a gpa.
        let base = rip & !7;
        let words = self
            .ram
            .read_u64s::<3>(base)
            .map_err(|e| bad(e.to_string()))?;
        let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        let code = &bytes[(rip - base) as usize..];
        let insn = Decoder::with_ip(64, code, rip, DecoderOptions::NONE).decode();
        let is_store = insn.mnemonic() == Mnemonic::Mov
            && insn.op_count() == 2
            && insn.op0_kind() == OpKind::Memory
            && insn.op1_kind() == OpKind::Register
            && insn.op1_register().is_gpr64();
        if !is_store {
            return Err(bad(format!("{:?} {:?}", insn.mnemonic(), insn.code())));
        }
        let addr = insn
            .virtual_address(0, 0, |r, _, _| match r {
                Register::ES | Register::CS | Register::SS | Register::DS => Some(0),
                r => gpr64(&regs, r),
            })
            .ok_or_else(|| bad("address".into()))?;
        let value = gpr64(&regs, insn.op1_register()).ok_or_else(|| bad("source".into()))?;
        let (p0, p1) = (
            self.pool.start - self.ram.guest_hva(),
            self.pool.end - self.ram.guest_hva(),
        );
        if !(p0..p1).contains(&addr) || !addr.is_multiple_of(8) {
            return Err(bad(format!("store to {addr:#x}")));
        }
        store(&self.ram, addr, value)?;
        regs.rip += insn.len() as u64;
        vcpu.set_regs(&regs).map_err(vcpu_err("KVM_SET_REGS"))?;
        self.r.table_write_traps += 1;
        self.table_write(addr);
        Ok(())
    }
}

/// Decode an MMIO store's data (little-endian, up to 8 bytes).
fn mmio_u64(data: &[u8]) -> u64 {
    let mut w = [0u8; 8];
    let n = data.len().min(8);
    w[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(w)
}

/// Store `v` at `gpa` while the guest is stopped (the control word; with
/// the only vCPU in an exit nobody races, so a few tries are plenty).
fn store(ram: &UffdGuestRam, gpa: u64, v: u64) -> Result<(), NestedRunError> {
    for _ in 0..16 {
        let [old] = ram.read_u64s::<1>(gpa)?;
        if ram.cmpxchg_u64(gpa, old, v)? {
            return Ok(());
        }
    }
    Err(NestedRunError::ControlWord(gpa))
}

/// Run the L1 guest once.
pub fn run(args: &NestedRunArgs) -> Result<NestedRunReport, NestedRunError> {
    let t_start = Instant::now();
    if args.max_units == 0 || args.watchdog_ms == 0 {
        return Err(NestedRunError::BadYieldArgs);
    }
    let params = args.config().params()?;
    let image = l1hv::system_image(&params, args.mem)?;
    let protect_bytes = args.protect.unwrap_or(args.mem);
    if protect_bytes == 0 || !protect_bytes.is_multiple_of(2 << 20) || protect_bytes > args.mem {
        return Err(NestedRunError::BadProtect(protect_bytes));
    }
    let kvm = crate::kvm::open(&args.kvm_dev).map_err(RunError::from)?;
    // (A pool the kernel cannot grow far enough is left to the RAM's own
    // check, whose error says how many pages are free and needed.)
    let _pool = if args.reserve_hugepages {
        Some(HugepageReservation::reserve(
            PageSize::Size2M,
            args.mem.div_ceil(PageSize::Size2M.bytes()),
        )?)
    } else {
        None
    };
    let subs = Subscribers::new();
    // Prefilled hugetlb memfd, no userfaultfd: real KVM faults L1's RAM in
    // itself; the project's MMU here is the nested one.
    let mut ram = UffdGuestRam::new(
        args.mem,
        PageSize::Size2M,
        UffdMode::KernelPrefilled,
        subs.clone(),
    )?;
    ram.load(0, &image)?;
    let ram = Arc::new(ram);
    let slot = Memslot::new(
        0,
        0,
        ram.size() >> PAGE_SHIFT,
        ram.guest_hva(),
        PageSize::Size2M,
    )?;
    let ctx = MmuContext::new(Memslots::new(vec![slot], 1)?, RemoteTlb::new(None));
    let policy: YieldPolicy = args.yield_mode.policy(args.max_units, args.slice_us);
    let notifier = Arc::new(KvmMmuNotifier::new(ctx.clone(), policy));
    subs.register(notifier.clone());
    let yields = Arc::new(YieldRecorder {
        notifier,
        reports: Default::default(),
    });
    subs.register(yields.clone());
    let walk = if args.blind {
        WalkMode::Blind
    } else {
        WalkMode::Summary
    };
    let mut plane = NestedPlane {
        mem: Arc::new(L1Mem(ram.clone())),
        ram: ram.clone(),
        ctx: ctx.clone(),
        yields,
        progress: Arc::new(ZapProgress {
            hold_until_contended: true,
            ..Default::default()
        }),
        walk,
        backing: PageSize::Size2M,
        mmu: None,
        params,
        protect: HvaRange::new(ram.guest_hva(), ram.guest_hva() + protect_bytes),
        watchdog_period: Duration::from_millis(args.watchdog_ms),
        ignore_table_writes: args.ignore_table_writes,
        write_track: args.write_track,
        pool: {
            let (b, e) = (
                params.table_base,
                params.table_end.div_ceil(2 << 20) * (2 << 20),
            );
            HvaRange::new(ram.guest_hva() + b, ram.guest_hva() + e.min(args.mem))
        },
        snapshots: HashMap::new(),
        r: NestedRunReport {
            mem_mib: args.mem >> 20,
            l2_bytes: args.l2,
            l2_page: args.l2_page.to_string(),
            l2_pages: params.npages,
            l2_samples: sample_gpas(&params).count() as u64,
            density: args.density,
            announce: params.announce,
            write_track: format!("{:?}", args.write_track),
            yield_on: args.yield_mode == OnOff::On,
            walk: format!("{walk:?}"),
            protect_bytes,
            ..Default::default()
        },
    };

    let guest_run_s = {
        let mut bvm = BuiltinVm::new(&kvm, ram.clone())?;
        let timer = Watchdog::start(
            Duration::from_secs(args.timeout),
            Arc::new(std::sync::atomic::AtomicBool::new(false)),
        )?;
        let mut guest_s = 0.0;
        let mut t_run = Instant::now();
        let mut gen = 0u64;
        loop {
            let exit = bvm.vcpu.run();
            if timer.fired() {
                return Err(RunError::Timeout(args.timeout).into());
            }
            match exit {
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    let v = mmio_u64(data);
                    if addr == l1hv::EPT_WRITE_MMIO {
                        plane.table_write(v);
                    } else if addr == l1hv::EPTP_MMIO {
                        guest_s += t_run.elapsed().as_secs_f64();
                        if gen > args.edits {
                            return Err(NestedRunError::TooManyLaunches(gen));
                        }
                        plane.vmlaunch(v, gen)?;
                        gen += 1;
                        let next = if gen <= args.edits { gen } else { 0 };
                        store(&ram, l1hv::CTRL_GPA, next)?;
                        plane.r.edit_rounds = gen - 1;
                        t_run = Instant::now();
                    } else if addr == guests::builtin::LAYOUT.done_mmio {
                        guest_s += t_run.elapsed().as_secs_f64();
                        break;
                    } else if addr == l1hv::ERROR_MMIO {
                        return Err(NestedRunError::GuestError(addr));
                    }
                }
                Ok(VcpuExit::MmioRead(_, data)) => data.fill(0),
                // A store to the write-protected table pool (KVM: -EFAULT,
                // with KVM_EXIT_MEMORY_FAULT where the kernel fills it in).
                Ok(VcpuExit::MemoryFault { .. }) if args.write_track == WriteTrack::Trap => {
                    plane.emulate_table_store(&bvm.vcpu)?
                }
                Err(e) if e.errno() == libc::EFAULT && args.write_track == WriteTrack::Trap => {
                    plane.emulate_table_store(&bvm.vcpu)?
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
                Ok(other) => {
                    let what = format!("{other:?}");
                    let (exit, rip) = bvm.describe_exit(what);
                    return Err(RunError::Exit { exit, rip }.into());
                }
                Err(e) => {
                    let (exit, rip) = bvm.describe_exit(format!("KVM_RUN: {e}"));
                    return Err(RunError::Exit { exit, rip }.into());
                }
            }
        }
        guest_s
    };
    let [tables] = ram.read_u64s::<1>(l1hv::TABLES_USED_GPA)?;
    let mut r = plane.r;
    r.guest_tables_used = tables;
    r.guest_run_s = guest_run_s;
    r.total_s = t_start.elapsed().as_secs_f64();
    r.stats = ctx.stats.snapshot();
    Ok(r)
}

/// `vmm nested-run`.
pub fn main(args: NestedRunArgs) -> ExitCode {
    if !args.compare {
        return main_one(&args);
    }
    let mut reports = Vec::new();
    for y in [OnOff::Off, OnOff::On] {
        let a = NestedRunArgs {
            yield_mode: y,
            ..args.clone()
        };
        match run(&a) {
            Ok(r) => reports.push(r),
            Err(e) => {
                eprintln!("vmm nested-run (yield {y:?}): {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let (off, on) = (&reports[0], &reports[1]);
    let ratio = |a: u64, b: u64| a as f64 / b.max(1) as f64;
    let cmp = serde_json::json!({
        "watchdog_worst_wait_ns_off_over_on": ratio(off.watchdog_worst_wait_ns, on.watchdog_worst_wait_ns),
        "watchdog_worst_wait_work_off_over_on": ratio(off.watchdog_worst_wait_work, on.watchdog_worst_wait_work),
        "max_stretch_entries_off_over_on": ratio(off.max_stretch_entries, on.max_stretch_entries),
        "yield_off": off,
        "yield_on": on,
    });
    println!(
        "nested-run, yield off vs on (same invocation): watchdog worst wait {:.3} ms vs {:.3} ms ({:.1}x), \
         zap work it was held off by {} vs {} rmap heads ({:.0}x); longest stretch {} vs {} heads; stale {} / {}",
        off.watchdog_worst_wait_ns as f64 / 1e6,
        on.watchdog_worst_wait_ns as f64 / 1e6,
        ratio(off.watchdog_worst_wait_ns, on.watchdog_worst_wait_ns),
        off.watchdog_worst_wait_work,
        on.watchdog_worst_wait_work,
        ratio(off.watchdog_worst_wait_work, on.watchdog_worst_wait_work),
        off.max_stretch_entries,
        on.max_stretch_entries,
        off.stale_translations,
        on.stale_translations,
    );
    if args.json {
        println!("{cmp}");
    }
    if off.ok() && on.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

fn main_one(args: &NestedRunArgs) -> ExitCode {
    match run(args) {
        Ok(r) => {
            let ms = |ns: u64| ns as f64 / 1e6;
            println!(
                "nested-run: L1 {} MiB, L2 {} MiB of {} pages ({} pages, density {}), {} vmlaunches, {} edit rounds, write-track {}; \
                 {} L2 faults ({} EPT violations), {} EPT tables shadowed, {} write-tracked, {} table write faults ({} stores trapped), {} silent writes found; \
                 {} translations checked: {} mismatches, {} model mismatches, {} stale ({} after edits, {} after invalidation)",
                r.mem_mib, r.l2_bytes >> 20, r.l2_page, r.l2_pages, r.density, r.vmlaunches, r.edit_rounds, r.write_track,
                r.l2_faults, r.l2_ept_violations, r.ept_tables_shadowed, r.write_tracked_gfns, r.table_write_faults, r.table_write_traps,
                r.unannounced_writes_detected, r.translations_checked, r.translation_mismatches, r.model_mismatches,
                r.stale_translations, r.stale_after_edits, r.stale_after_invalidation
            );
            println!(
                "  {} host invalidations of {} MiB ({} notified ranges), yield {}, walk {}: longest zap {:.3} ms, \
                 longest stretch {:.3} ms / {} heads, {} yields, {} rmap heads visited, {} sptes zapped; \
                 watchdog worst wait {:.3} ms / {} heads over {} acquisitions",
                r.invalidations, r.protect_bytes >> 20, r.notified_ranges,
                if r.yield_on { "on" } else { "off" }, r.walk, ms(r.zap_ns), ms(r.max_stretch_ns),
                r.max_stretch_entries, r.yields, r.rmap_entries_visited, r.sptes_zapped,
                ms(r.watchdog_worst_wait_ns), r.watchdog_worst_wait_entries, r.watchdog_acquisitions
            );
            for s in &r.first_stale {
                println!("  stale: {s}");
            }
            if args.json {
                match serde_json::to_string(&r) {
                    Ok(s) => println!("{s}"),
                    Err(e) => eprintln!("vmm nested-run: JSON: {e}"),
                }
            }
            if r.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("vmm nested-run: {e}");
            ExitCode::FAILURE
        }
    }
}
