//! `vmm nested-run`: nested TDP on the real plane. The built-in "L1
//! hypervisor" guest ([`guests::l1hv`]) runs at CPL3 in a real KVM VM on
//! hugetlb RAM, builds EPT tables for an L2 in its own RAM and rings the
//! EPTP ("vmlaunch"); the VMM shadows those tables with the project's
//! `NestedMmu` reading them straight out of guest RAM (`plane.rs`).
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
//!    (`guests::l1hv::L1hvParams::l1_gpa`).
//! 4. Host invalidation: `mprotect(PROT_READ)` of L1 RAM (default: all of it,
//!    a PUD's worth on 1 GiB) then back to RW, through `notifier::ops`
//!    (HostMm -> Subscribers -> KvmMmuNotifier -> the nested MMU's rmap
//!    zap), with the soft-lockup watchdog of [`mmu::watchdog`] waiting
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

mod plane;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use guests::l1hv::{self, L1hvConfig, L1hvError};
use mmu::memslot::{Memslot, Memslots};
use mmu::shadow::ZapProgress;
use mmu::{MmuContext, MmuStatsSnapshot, RemoteTlb};
use notifier::hostconf::HugepageReservation;
use notifier::hostmm::Backing;
use notifier::{HvaRange, PageSize, Subscribers};

use crate::arch::x86_64::emulate::EmulateError;
use crate::cli::{self, parse_ram_size, parse_size, OnOff, Report, ZapArgs};
use crate::machine::builtin::{doorbell_u64, BuiltinVm, BuiltinVmError};
use crate::memory::mmu::ZapRecorder;
use crate::memory::uffd::{UffdGuestRam, UffdMode, UffdRamError};
use crate::vstate::{kvm, ExitHandler, Handled, KvmError, RunControl, Vcpu, VcpuError};
use plane::{sample_gpas, store_word, NestedPlane};

/// Arguments of `vmm nested-run`.
#[derive(clap::Args, Debug, Clone)]
pub struct NestedRunArgs {
    /// L1 guest RAM (2 MiB hugetlb).
    #[arg(long, default_value = "1G", value_parser = parse_ram_size)]
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
    #[command(flatten)]
    pub zap: ZapArgs,
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
            zap: ZapArgs::default(),
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
    Kvm(#[from] KvmError),
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
    Fault {
        gpa: u64,
        err: mmu::shadow::FaultError,
    },
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
    #[error("spawning the watchdog thread: {0}")]
    Spawn(#[source] std::io::Error),
    #[error("guest did not finish within {0} s")]
    Timeout(u64),
    #[error("guest stopped unexpectedly: {exit} at rip {rip:#x}")]
    Exit { exit: String, rip: u64 },
    #[error("emulating the L1's store: {0}")]
    Emulate(#[from] EmulateError),
    #[error("the control word at {0:#x} kept changing while the guest was stopped")]
    ControlWord(u64),
    #[error("memory fault at rip {rip:#x} not an 8-byte register store into the write-protected EPT table pool: {what}")]
    UnexpectedFault { rip: u64, what: String },
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

/// The L1's doorbells and trapped stores, handed to the [`NestedPlane`].
struct L1Exits<'a> {
    plane: &'a mut NestedPlane,
    ram: &'a UffdGuestRam,
    edits: u64,
    /// The next vmlaunch's generation.
    gen: u64,
    trap: bool,
    /// Guest run time, without the VMM's work at vmlaunches.
    guest_s: f64,
    t_run: Instant,
}

impl L1Exits<'_> {
    fn vmlaunch(&mut self, eptp: u64) -> Result<(), NestedRunError> {
        self.guest_s += self.t_run.elapsed().as_secs_f64();
        if self.gen > self.edits {
            return Err(NestedRunError::TooManyLaunches(self.gen));
        }
        self.plane.vmlaunch(eptp, self.gen)?;
        self.gen += 1;
        let next = if self.gen <= self.edits { self.gen } else { 0 };
        store_word(self.ram, l1hv::CTRL_GPA, next)?;
        self.plane.r.edit_rounds = self.gen - 1;
        self.t_run = Instant::now();
        Ok(())
    }
}

impl ExitHandler for L1Exits<'_> {
    type Stop = Result<(), NestedRunError>;

    fn mmio_write(&mut self, addr: u64, data: &[u8]) -> Handled<Self::Stop> {
        let v = doorbell_u64(data);
        if addr == l1hv::EPT_WRITE_MMIO {
            self.plane.table_write(v);
        } else if addr == l1hv::EPTP_MMIO {
            if let Err(e) = self.vmlaunch(v) {
                return Handled::Stop(Err(e));
            }
        } else if addr == guests::builtin::LAYOUT.done_mmio {
            self.guest_s += self.t_run.elapsed().as_secs_f64();
            return Handled::Stop(Ok(()));
        } else if addr == l1hv::ERROR_MMIO {
            return Handled::Stop(Err(NestedRunError::GuestError(addr)));
        }
        Handled::Continue
    }

    fn mmio_read(&mut self, _addr: u64, data: &mut [u8]) -> Handled<Self::Stop> {
        data.fill(0);
        Handled::Continue
    }

    /// A store to the write-protected table pool (KVM: -EFAULT, with
    /// KVM_EXIT_MEMORY_FAULT where the kernel fills it in).
    fn memory_fault(&mut self, vcpu: &Vcpu, gpa: Option<u64>) -> Handled<Self::Stop> {
        if !self.trap {
            return Handled::Unhandled(format!("memory fault at gpa {gpa:x?}"));
        }
        match self.plane.emulate_table_store(vcpu) {
            Ok(()) => Handled::Continue,
            Err(e) => Handled::Stop(Err(e)),
        }
    }
}

/// Run the L1 guest once.
pub fn run(args: &NestedRunArgs) -> Result<NestedRunReport, NestedRunError> {
    let t_start = Instant::now();
    if !args.zap.valid() {
        return Err(NestedRunError::BadYieldArgs);
    }
    let params = args.config().params()?;
    let image = l1hv::system_image(&params, args.mem)?;
    let protect_bytes = args.protect.unwrap_or(args.mem);
    if protect_bytes == 0 || !protect_bytes.is_multiple_of(2 << 20) || protect_bytes > args.mem {
        return Err(NestedRunError::BadProtect(protect_bytes));
    }
    let kvm = kvm::open(&args.kvm_dev)?;
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
        Backing::SharedMemfd(PageSize::Size2M),
        UffdMode::KernelPrefilled,
        subs.clone(),
        true,
    )?;
    ram.load(0, &image)?;
    let view = ram.vmm_view()?;
    let ram = Arc::new(ram);
    let slot = Memslot::new(
        0,
        0,
        ram.size() >> mmu::guest_walk::PAGE_SHIFT,
        ram.guest_hva(),
        PageSize::Size2M,
    )?;
    let ctx = MmuContext::new(Memslots::new(vec![slot], 1)?, RemoteTlb::new(None));
    let zaps = ZapRecorder::register(&subs, ctx.clone(), args.zap.policy());
    let walk = args.zap.walk();
    let mut plane = NestedPlane {
        ram: ram.clone(),
        view,
        ctx: ctx.clone(),
        zaps,
        progress: Arc::new(ZapProgress {
            hold_until_contended: true,
            ..Default::default()
        }),
        walk,
        backing: PageSize::Size2M,
        mmu: None,
        params,
        protect: HvaRange::new(ram.guest_hva(), ram.guest_hva() + protect_bytes),
        watchdog_period: Duration::from_millis(args.zap.watchdog_ms),
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
            l2_samples: notifier::convert::usize_to_u64(sample_gpas(&params).count()),
            density: args.density,
            announce: params.announce,
            write_track: format!("{:?}", args.write_track),
            yield_on: args.zap.yield_mode == OnOff::On,
            walk: format!("{walk:?}"),
            protect_bytes,
            ..Default::default()
        },
    };

    let guest_run_s = {
        let mut bvm = BuiltinVm::new(&kvm, ram.clone())?;
        let mut exits = L1Exits {
            plane: &mut plane,
            ram: &ram,
            edits: args.edits,
            gen: 0,
            trap: args.write_track == WriteTrack::Trap,
            guest_s: 0.0,
            t_run: Instant::now(),
        };
        let ctl = RunControl::timeout(Duration::from_secs(args.timeout));
        match bvm.vcpu.run(&mut exits, &ctl) {
            Ok(r) => r?,
            Err(VcpuError::TimedOut { .. }) => return Err(NestedRunError::Timeout(args.timeout)),
            Err(VcpuError::Unexpected { exit, rip, state }) => {
                return Err(NestedRunError::Exit {
                    exit: format!("{exit} ({state})"),
                    rip,
                })
            }
            Err(e) => {
                return Err(NestedRunError::Exit {
                    exit: e.to_string(),
                    rip: bvm.vcpu.rip(),
                })
            }
        }
        exits.guest_s
    };
    let [tables] = ram.read_u64s::<1>(l1hv::TABLES_USED_GPA)?;
    let mut r = plane.r;
    r.guest_tables_used = tables;
    r.guest_run_s = guest_run_s;
    r.total_s = t_start.elapsed().as_secs_f64();
    r.stats = ctx.stats.snapshot();
    Ok(r)
}

impl Report for NestedRunReport {
    fn text(&self) -> String {
        let r = self;
        let ms = |ns: u64| ns as f64 / 1e6;
        let mut out = format!(
            "nested-run: L1 {} MiB, L2 {} MiB of {} pages ({} pages, density {}), {} vmlaunches, {} edit rounds, write-track {}; \
             {} L2 faults ({} EPT violations), {} EPT tables shadowed, {} write-tracked, {} table write faults ({} stores trapped), {} silent writes found; \
             {} translations checked: {} mismatches, {} model mismatches, {} stale ({} after edits, {} after invalidation)\n",
            r.mem_mib, r.l2_bytes >> 20, r.l2_page, r.l2_pages, r.density, r.vmlaunches, r.edit_rounds, r.write_track,
            r.l2_faults, r.l2_ept_violations, r.ept_tables_shadowed, r.write_tracked_gfns, r.table_write_faults, r.table_write_traps,
            r.unannounced_writes_detected, r.translations_checked, r.translation_mismatches, r.model_mismatches,
            r.stale_translations, r.stale_after_edits, r.stale_after_invalidation
        );
        out += &format!(
            "  {} host invalidations of {} MiB ({} notified ranges), yield {}, walk {}: longest zap {:.3} ms, \
             longest stretch {:.3} ms / {} heads, {} yields, {} rmap heads visited, {} sptes zapped; \
             watchdog worst wait {:.3} ms / {} heads over {} acquisitions\n",
            r.invalidations, r.protect_bytes >> 20, r.notified_ranges,
            if r.yield_on { "on" } else { "off" }, r.walk, ms(r.zap_ns), ms(r.max_stretch_ns),
            r.max_stretch_entries, r.yields, r.rmap_entries_visited, r.sptes_zapped,
            ms(r.watchdog_worst_wait_ns), r.watchdog_worst_wait_entries, r.watchdog_acquisitions
        );
        for s in &r.first_stale {
            out += &format!("  stale: {s}\n");
        }
        out
    }
    fn json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }
    fn ok(&self) -> bool {
        NestedRunReport::ok(self)
    }
}

/// `--compare`: the same run with yield off, then on, in one invocation.
pub struct NestedCompare {
    pub off: NestedRunReport,
    pub on: NestedRunReport,
}

fn ratio(a: u64, b: u64) -> f64 {
    a as f64 / b.max(1) as f64
}

impl Report for NestedCompare {
    fn text(&self) -> String {
        let (off, on) = (&self.off, &self.on);
        format!(
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
        )
    }
    fn json(&self) -> serde_json::Value {
        let (off, on) = (&self.off, &self.on);
        serde_json::json!({
            "watchdog_worst_wait_ns_off_over_on": ratio(off.watchdog_worst_wait_ns, on.watchdog_worst_wait_ns),
            "watchdog_worst_wait_work_off_over_on": ratio(off.watchdog_worst_wait_work, on.watchdog_worst_wait_work),
            "max_stretch_entries_off_over_on": ratio(off.max_stretch_entries, on.max_stretch_entries),
            "yield_off": off,
            "yield_on": on,
        })
    }
    fn ok(&self) -> bool {
        self.off.ok() && self.on.ok()
    }
}

/// Yield off, then on.
pub fn compare(args: &NestedRunArgs) -> Result<NestedCompare, NestedRunError> {
    let with = |yield_mode| NestedRunArgs {
        zap: ZapArgs {
            yield_mode,
            ..args.zap
        },
        ..args.clone()
    };
    Ok(NestedCompare {
        off: run(&with(OnOff::Off))?,
        on: run(&with(OnOff::On))?,
    })
}

/// `vmm nested-run`.
pub fn main(args: NestedRunArgs) -> ExitCode {
    if args.compare {
        cli::conclude("vmm nested-run", args.json, compare(&args), None)
    } else {
        cli::conclude("vmm nested-run", args.json, run(&args), None)
    }
}
