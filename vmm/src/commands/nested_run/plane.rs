//! The VMM's side of the L1 hypervisor: its nested MMU over the L1's EPT
//! tables, the checks at each vmlaunch (silent writes, stale translations,
//! the simulated L2, the host invalidation under the watchdog), and the
//! emulation of the L1's trapped stores to its table pool.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use guests::l1hv::L1hvParams;
use mmu::guest_walk::{walk_ept, AccessKind, EptPaging, PAGE_SHIFT};
use mmu::memslot::Memslot;
use mmu::nested::NestedMmu;
use mmu::shadow::{FaultError, FaultOutcome, NotifierZap, WalkMode, ZapProgress, ZapReport};
use mmu::tdp::HostPage;
use mmu::watchdog::{watchdog_until, WatchdogReport};
use mmu::MmuContext;
use notifier::{HvaRange, PageSize};
use vm_memory::GuestMemoryMmap;

use super::{NestedRunError, NestedRunReport, WriteTrack};
use crate::arch::x86_64::emulate;
use crate::memory::mmu::ZapRecorder;
use crate::memory::uffd::UffdGuestRam;
use crate::vstate::Vcpu;

/// The VMM's side of the L1: its nested MMU and what the checks found.
pub(super) struct NestedPlane {
    pub ram: Arc<UffdGuestRam>,
    /// The VMM's view of the L1's RAM (the emulator's instruction fetch).
    pub view: GuestMemoryMmap,
    pub ctx: Arc<MmuContext>,
    /// The notifier of host invalidations, its zaps recorded.
    pub zaps: Arc<ZapRecorder>,
    pub progress: Arc<ZapProgress>,
    pub walk: WalkMode,
    pub backing: PageSize,
    pub mmu: Option<Arc<NestedMmu>>,
    pub params: L1hvParams,
    pub protect: HvaRange,
    pub watchdog_period: Duration,
    pub ignore_table_writes: bool,
    pub write_track: WriteTrack,
    /// The huge pages holding the L1's EPT table pool (host-write-protected
    /// with `--write-track trap`).
    pub pool: HvaRange,
    /// Contents of every write-tracked gfn as last shadowed.
    pub snapshots: HashMap<u64, Box<[u64; 512]>>,
    pub r: NestedRunReport,
}

/// L2 gpas the VMM simulates accesses to: one per L2 page, or per 2 MiB
/// (the host page size) of a 1 GiB L2 page, at a varying 4 KiB offset
/// inside large pages.
pub(super) fn sample_gpas(p: &L1hvParams) -> impl Iterator<Item = u64> + '_ {
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
        let mut mmu = NestedMmu::new(self.ctx.clone(), self.ram.clone()).with_host(Arc::new(host));
        mmu.set_notifier_zap(NotifierZap {
            mode: self.walk,
            progress: Some(self.progress.clone()),
        });
        let mmu = Arc::new(mmu);
        self.zaps.notifier().add_mmu(mmu.clone());
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
    pub fn table_write(&mut self, gpa: u64) {
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
    pub fn vmlaunch(&mut self, eptp: u64, gen: u64) -> Result<(), NestedRunError> {
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
        self.r.l2_fault_ns += notifier::convert::duration_ns(t.elapsed());
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
        walk_ept(&*self.ram, paging, gpa, AccessKind::READ, false)
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
            std::thread::Builder::new()
                .name("watchdog".into())
                .spawn(move || {
                    watchdog_until(&ctx, &progress, period, || over.load(Ordering::Acquire))
                })
                .map_err(NestedRunError::Spawn)?
        };
        // One zap per VMA the kernel notifies (the pool's protection splits
        // L1's VMA in three); the watchdog runs over all of them.
        let res = self.ram.hostmm().protect(range, prot);
        over.store(true, Ordering::Release);
        let wd: WatchdogReport = wd.join().map_err(|_| NestedRunError::Watchdog)?;
        let notes = res?;
        if !record {
            mmu.take_notifier_reports();
            self.zaps.take();
            return Ok(());
        }
        self.r.invalidations += 1;
        self.r.notified_ranges += notes.len() as u64;
        let r = &mut self.r;
        r.watchdog_worst_wait_ns = r.watchdog_worst_wait_ns.max(wd.worst_wait_ns);
        r.watchdog_worst_wait_entries = r.watchdog_worst_wait_entries.max(wd.worst_wait_entries);
        r.watchdog_worst_wait_work = r.watchdog_worst_wait_work.max(wd.worst_wait_work);
        r.watchdog_acquisitions += wd.acquisitions;
        for y in self.zaps.take() {
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
    pub fn emulate_table_store(&mut self, vcpu: &Vcpu) -> Result<(), NestedRunError> {
        let d = emulate::fetch(vcpu, &self.view)?;
        let rip = d.regs.rip;
        let bad = |what: String| NestedRunError::UnexpectedFault { rip, what };
        let store = d
            .store(&self.view)
            .filter(|s| s.len == 8)
            .ok_or_else(|| bad(format!("{:?} {:?}", d.insn.mnemonic(), d.insn.code())))?;
        let base = self.ram.guest_hva();
        let (p0, p1) = (self.pool.start - base, self.pool.end - base);
        if !(p0..p1).contains(&store.gpa) || !store.gpa.is_multiple_of(8) {
            return Err(bad(format!("store to {:#x}", store.gpa)));
        }
        store_word(&self.ram, store.gpa, store.value)?;
        emulate::complete(vcpu, &d, d.regs)?;
        self.r.table_write_traps += 1;
        self.table_write(store.gpa);
        Ok(())
    }
}

/// Store `v` at `gpa` while the guest is stopped (the control word; with
/// the only vCPU in an exit nobody races, so a few tries are plenty).
pub(super) fn store_word(ram: &UffdGuestRam, gpa: u64, v: u64) -> Result<(), NestedRunError> {
    for _ in 0..16 {
        let [old] = ram.read_u64s::<1>(gpa)?;
        if ram.cmpxchg_u64(gpa, old, v)? {
            return Ok(());
        }
    }
    Err(NestedRunError::ControlWord(gpa))
}
