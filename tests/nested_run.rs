//! `vmm nested-run`: nested TDP on the real plane. The built-in L1
//! hypervisor runs under real KVM on hugetlb RAM and writes EPT tables for
//! an L2 into its own RAM; the VMM shadows them with the nested MMU, faults
//! every L2 page (L2 accesses are simulated: no VMX here), checks every
//! translation against a reference walk of the guest's tables, mprotects all
//! of L1's RAM through `notifier::ops` (the nested MMU's rmap zap, with the
//! soft-lockup watchdog on `mmu_lock`), and lets the L1 edit its tables.
//!
//! Behaviour, not speed: no stale translation after the L1's edits or the
//! host invalidations, stretch and watchdog bounds in rmap heads.

use integration_tests::{require_hugepages_2m, require_kvm_root};
use notifier::hostconf::HugepageReservation;
use notifier::PageSize;
use std::sync::{Mutex, MutexGuard};
use vmm::cli::OnOff;
use vmm::commands::nested_run::{run, NestedRunArgs, NestedRunError, NestedRunReport, WriteTrack};
use vmm::memory::uffd::UffdRamError;
use vmm::memory::MemoryError;

const MEM: u64 = 256 << 20;
const L2: u64 = 64 << 20;
const MAX_UNITS: u64 = 1024;
/// More heads of zap work than this from the watchdog wanting the lock to
/// the zapper's next release: starved (as in the model-plane suite,
/// tests/soft_lockup.rs).
const STARVED_HEADS: u64 = MAX_UNITS + mmu::shadow::zap::PROGRESS_EVERY;
/// Rmap heads of levels 4K, 2M and 1G the blind walk visits in L1's RAM.
const HEADS: u64 = (MEM >> 12) + (MEM >> 21) + 1;

/// One run at a time: runs share the hugetlb pool and the 2 cores.
static SERIAL: Mutex<()> = Mutex::new(());

fn ready() -> Option<(MutexGuard<'static, ()>, HugepageReservation)> {
    if !require_kvm_root() {
        return None;
    }
    let lock = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    Some((lock, require_hugepages_2m(MEM)?))
}

fn args(page: PageSize, yield_mode: OnOff) -> NestedRunArgs {
    let mut a = NestedRunArgs::new(MEM, L2, page);
    a.zap.yield_mode = yield_mode;
    a.zap.blind = true;
    a.zap.max_units = MAX_UNITS;
    a.timeout = 60;
    a
}

/// `run`, again (a few times) when other users of the machine took the
/// free hugepages between our reservation and the run.
fn run_retrying(a: &NestedRunArgs) -> NestedRunReport {
    let mut _pool = None;
    for attempt in 0.. {
        match run(a) {
            Err(NestedRunError::Ram(UffdRamError::Memory(MemoryError::NotEnoughHugepages {
                ..
            }))) if attempt < 5 => {
                std::thread::sleep(std::time::Duration::from_secs(2));
                _pool = require_hugepages_2m(MEM);
            }
            r => return r.unwrap_or_else(|e| panic!("{a:?}: {e}")),
        }
    }
    unreachable!("the loop returns")
}

fn go(a: &NestedRunArgs) -> NestedRunReport {
    let r = run_retrying(a);
    eprintln!(
        "{} yield={}: {} faults, {} tables shadowed, {} write faults, {} silent; stretch {} ns / {} heads, {} yields, watchdog {} ns / {} heads / {} work, zap {} ns, {} heads",
        r.l2_page, r.yield_on, r.l2_faults, r.ept_tables_shadowed, r.table_write_faults,
        r.unannounced_writes_detected, r.max_stretch_ns, r.max_stretch_entries, r.yields,
        r.watchdog_worst_wait_ns, r.watchdog_worst_wait_entries, r.watchdog_worst_wait_work,
        r.zap_ns, r.rmap_entries_visited
    );
    // The L1 built what its model says, the shadow agrees with a reference
    // walk everywhere, and nothing stale survived an edit or a zap.
    assert_eq!(r.vmlaunches, a.edits + 1, "{r:?}");
    assert_eq!(r.model_mismatches, 0, "{r:?}");
    assert_eq!(r.translation_mismatches, 0, "{:?}", r.first_stale);
    assert_eq!(r.stale_translations, 0, "{:?}", r.first_stale);
    assert_eq!(r.translations_checked, 2 * r.vmlaunches * r.l2_samples);
    assert!(r.l2_faults >= r.translations_checked);
    assert!(r.ept_tables_shadowed > 0 && r.ept_tables_shadowed <= r.guest_tables_used);
    assert!(r.write_tracked_gfns > 0);
    assert!(
        r.sptes_zapped > 0,
        "the host invalidations zapped L2 mappings"
    );
    // mprotect(PROT_READ) and back per vmlaunch (the table pool's own
    // protection is not counted); the blind walk visits every head of L1's
    // RAM each time.
    assert_eq!(r.invalidations, 2 * r.vmlaunches);
    // (One zap per VMA: the pool's own protection splits L1's VMA in three,
    // each range's walk visits its own 2M and 1G heads.)
    assert!(r.rmap_entries_visited >= r.invalidations * (MEM >> 12) * 99 / 100);
    assert!(r.rmap_entries_visited <= r.invalidations * (HEADS + 8));
    assert!(r.ok());
    r
}

#[test]
fn real_plane_yield_on_and_off() {
    let Some(_g) = ready() else { return };
    // Yielding: no stretch beyond the unit budget, the watchdog never held
    // off by more than one stretch of zap work.
    let y = go(&args(PageSize::Size4K, OnOff::On));
    // The L1's stores to its shadowed tables trapped (host write
    // protection) and were handled as KVM's write faults.
    assert!(y.table_write_traps > 0 && y.table_write_faults > 0, "{y:?}");
    assert_eq!(y.unannounced_writes_detected, 0);
    assert!(y.max_stretch_entries <= MAX_UNITS, "{y:?}");
    assert!(y.yields >= y.invalidations * (HEADS / MAX_UNITS - 1));
    assert!(
        y.watchdog_worst_wait_work <= STARVED_HEADS,
        "watchdog starved: held off by {} heads of zap work",
        y.watchdog_worst_wait_work
    );
    // Never yield: each zap is one stretch over every head of its range (the
    // first, before the table pool's protection split the VMA: all of L1's
    // RAM) and the watchdog, waiting from the start, waits for all of it.
    let n = go(&args(PageSize::Size4K, OnOff::Off));
    assert_eq!(n.yields, 0);
    assert!(n.max_stretch_entries >= HEADS);
    assert_eq!(n.watchdog_worst_wait_entries, HEADS);
    assert_eq!(n.watchdog_worst_wait_work, HEADS);
}

#[test]
fn every_write_tracking_mode_and_large_pages() {
    let Some(_g) = ready() else { return };
    // The L1 announces each store through a doorbell.
    let mut a = args(PageSize::Size4K, OnOff::On);
    a.write_track = WriteTrack::Announce;
    let s = go(&a);
    assert!(s.table_write_faults > 0);
    assert_eq!(s.table_write_traps, 0);
    // The L1 says nothing and nothing traps: the VMM finds every edited,
    // write-tracked table by its contents at the next vmlaunch.
    a.write_track = WriteTrack::Contents;
    let s = go(&a);
    assert_eq!(s.table_write_faults, 0);
    assert_eq!(s.table_write_traps, 0);
    assert!(s.unannounced_writes_detected > 0);
    // 2 MiB EPT leaves on 2 MiB host pages: 2 MiB SPTEs; stores trapped.
    let l = go(&args(PageSize::Size2M, OnOff::On));
    assert!(l.stats.pages_2m > 0, "{l:?}");
    assert!(l.table_write_faults > 0 && l.table_write_traps > 0);
}

#[test]
fn ignoring_the_l1s_edits_leaves_stale_translations() {
    let Some(_g) = ready() else { return };
    // Negative control: a VMM that neither handles the write faults nor
    // checks the tracked gfns keeps translations the L1 removed or moved.
    let mut a = args(PageSize::Size4K, OnOff::On);
    a.ignore_table_writes = true;
    let r = run_retrying(&a);
    assert!(r.stale_after_edits > 0, "{r:?}");
    assert_eq!(r.stale_after_invalidation, 0);
    assert!(!r.ok());
}

#[test]
fn bad_arguments_are_typed_errors() {
    let mut a = args(PageSize::Size4K, OnOff::On);
    a.protect = Some(3 << 20);
    assert!(matches!(run(&a), Err(NestedRunError::BadProtect(_))));
    let mut a = args(PageSize::Size4K, OnOff::On);
    a.l2 = MEM * 4;
    assert!(matches!(run(&a), Err(NestedRunError::Guest(_))));
    let mut a = args(PageSize::Size4K, OnOff::On);
    a.density = 0.0;
    assert!(matches!(run(&a), Err(NestedRunError::Guest(_))));
    let mut a = args(PageSize::Size4K, OnOff::On);
    a.zap.watchdog_ms = 0;
    assert!(matches!(run(&a), Err(NestedRunError::BadYieldArgs)));
}
