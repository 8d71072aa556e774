//! `vmm run --guest builtin`: the CPL3 guest on userfaultfd-served hugetlb
//! RAM through the TDP MMU, with each uffd mode and each invalidation kind
//! interleaved with its run (>= 100 invalidations, agreement check after
//! every one, checksum against the model).

use guests::builtin::Pattern;
use integration_tests::{require_hugepages_2m, require_kvm_root};
use notifier::hostconf::HugepageReservation;
use std::sync::Mutex;
use vmm::guest_ram_uffd::UffdMode;
use vmm::memory::HugePages;
use vmm::run::{self, RunArgs, RunError};
use vmm::run_inval::InvalKind;

const MEM: u64 = 64 << 20;
/// One run at a time: runs share the hugetlb pool.
static SERIAL: Mutex<()> = Mutex::new(());

const BENCH_MEM: u64 = 512 << 20;

fn ready() -> Option<(std::sync::MutexGuard<'static, ()>, HugepageReservation)> {
    ready_for(MEM)
}

fn ready_for(mem: u64) -> Option<(std::sync::MutexGuard<'static, ()>, HugepageReservation)> {
    if !require_kvm_root() {
        return None;
    }
    let lock = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let pool = require_hugepages_2m(mem)?;
    Some((lock, pool))
}

fn args(mode: UffdMode, kind: InvalKind) -> RunArgs {
    let mut a = RunArgs::new(MEM, mode);
    a.passes = 11;
    a.inval_per_pass = 10;
    a.invalidate = kind;
    a.verify = true;
    a.pattern = Pattern::Lcg;
    a.stride = 64 << 10;
    a.timeout = 60;
    a
}

#[test]
fn every_page_goes_through_the_mmu() {
    let Some(_g) = ready() else { return };
    for mode in [UffdMode::Minor, UffdMode::Missing] {
        let mut a = args(mode, InvalKind::None);
        a.pattern = Pattern::Sequential;
        a.stride = 4096;
        let r = run::run(&a).unwrap_or_else(|e| panic!("{mode}: {e}"));
        let pages = MEM / (2 << 20);
        assert!(r.checksum_ok, "{mode}: {r:?}");
        assert_eq!(r.faults, pages, "{mode}: one fault per huge page");
        assert_eq!(r.stats.pf_fixed, pages, "{mode}");
        assert_eq!(r.stats.pages_2m, pages, "{mode}");
        assert_eq!(r.verify_failures, 0, "{mode}: {:?}", r.verify_mismatches);
        assert_eq!(r.result.passes_done, 11);
        assert_eq!(r.progress_exits, 11);
    }
}

#[test]
fn invalidations_interleaved_keep_agreement_and_data() {
    let Some(_g) = ready() else { return };
    for mode in [UffdMode::Minor, UffdMode::Missing] {
        for kind in [
            InvalKind::Protect,
            InvalKind::WriteProtect,
            InvalKind::Discard,
            InvalKind::PunchHole,
            InvalKind::Mixed,
        ] {
            let r = run::run(&args(mode, kind)).unwrap_or_else(|e| panic!("{mode} {kind:?}: {e}"));
            assert!(r.invalidations >= 100, "{mode} {kind:?}");
            assert_eq!(r.verify_checks, r.invalidations + 1);
            assert_eq!(
                r.verify_failures, 0,
                "{mode} {kind:?}: {:?}",
                r.verify_mismatches
            );
            assert!(r.checksum_ok, "{mode} {kind:?}: {r:?}");
            assert!(
                r.stats.remote_tlb_flush > 0,
                "{mode} {kind:?}: zaps flushed"
            );
            if matches!(kind, InvalKind::Discard | InvalKind::PunchHole) {
                // Removed pages come back through the MMU's fault path.
                assert!(r.faults > MEM / (2 << 20), "{mode} {kind:?}: {}", r.faults);
            }
        }
    }
}

#[test]
fn bad_arguments_are_typed_errors() {
    let mut a = RunArgs::new(MEM, UffdMode::Minor);
    a.guest = "linux".into();
    assert!(matches!(run::run(&a), Err(RunError::UnknownGuest(_))));
    let mut a = RunArgs::new(MEM, UffdMode::Minor);
    a.stride = 12;
    assert!(matches!(run::run(&a), Err(RunError::Guest(_))));
    let mut a = RunArgs::new(MEM, UffdMode::Minor);
    a.hugepages = HugePages::None;
    let e = run::run(&a).unwrap_err();
    assert!(e.to_string().contains("hugetlb"), "{e}");
}

/// Benchmark (run with `--ignored --nocapture`): guest-observed cost per
/// huge-page first touch, MINOR+CONTINUE vs MISSING+COPY vs the kernel's
/// own hugetlb fault (fresh page, and page-cache page), each as the median
/// guest run time minus the median of a run with all RAM prefaulted, over
/// the number of huge pages; printed with ratios against the kernel's own.
#[test]
#[ignore]
fn bench_fault_cost() {
    let Some(_g) = ready_for(BENCH_MEM) else {
        return;
    };
    let reps = 7;
    let pages = (BENCH_MEM / (2 << 20)) as f64;
    let median = |mode: UffdMode, prefault: bool, spin: bool| -> (f64, f64) {
        let mut t = Vec::new();
        let mut p50 = Vec::new();
        for _ in 0..reps {
            let mut a = RunArgs::new(BENCH_MEM, mode);
            a.passes = 1;
            a.prefault = prefault;
            a.spin_faults = spin;
            let r = run::run(&a).unwrap_or_else(|e| panic!("{mode}: {e}"));
            assert!(r.checksum_ok);
            t.push(r.guest_run_s);
            p50.push(r.fault_to_resume_us.p50);
        }
        t.sort_by(f64::total_cmp);
        p50.sort_by(f64::total_cmp);
        (t[reps / 2], p50[reps / 2])
    };
    let (warm, _) = median(UffdMode::KernelPrefilled, true, false);
    let per_fault = |mode, spin| {
        let (t, p50) = median(mode, false, spin);
        (((t - warm) / pages * 1e6).max(0.0), p50)
    };
    let (kernel, _) = per_fault(UffdMode::Kernel, false);
    let (kernel_pc, _) = per_fault(UffdMode::KernelPrefilled, false);
    let (minor, minor_p50) = per_fault(UffdMode::Minor, false);
    let (minor_spin, _) = per_fault(UffdMode::Minor, true);
    let (missing, missing_p50) = per_fault(UffdMode::Missing, false);
    println!("guest-observed cost per 2M first touch ({BENCH_MEM} bytes, median of {reps}):");
    println!("  kernel own (fresh page)       {kernel:8.1} us");
    println!("  kernel own (page-cache page)  {kernel_pc:8.1} us");
    println!("  MINOR+CONTINUE                {minor:8.1} us (handler p50 {minor_p50:.1} us)");
    println!("  MINOR+CONTINUE, spinning fault thread {minor_spin:8.1} us");
    println!("  MISSING+COPY                  {missing:8.1} us (handler p50 {missing_p50:.1} us)");
    println!(
        "  CONTINUE / kernel page-cache fault {:.2}x (spinning {:.2}x); CONTINUE / kernel fresh {:.2}x; COPY / CONTINUE {:.1}x",
        minor / kernel_pc.max(1e-3),
        minor_spin / kernel_pc.max(1e-3),
        minor / kernel.max(1e-3),
        missing / minor.max(1e-3)
    );
}

#[test]
fn faults_racing_discards_retry_and_keep_data() {
    let Some(_g) = ready() else { return };
    let mut a = args(UffdMode::Minor, InvalKind::None);
    a.passes = 20;
    a.race_discard_us = 20;
    let r = run::run(&a).unwrap_or_else(|e| panic!("{e}"));
    assert!(r.race_invalidations > 0);
    assert!(r.checksum_ok, "{r:?}");
    assert_eq!(r.verify_failures, 0, "{:?}", r.verify_mismatches);
    assert!(r.faults > MEM / (2 << 20), "discarded pages fault again");
    assert_eq!(r.stats.fault_retries, r.fault_retries);
    // Discards lose data in MISSING mode: refused.
    let mut a = args(UffdMode::Missing, InvalKind::None);
    a.race_discard_us = 20;
    assert!(run::run(&a).is_err());
}
