//! `vmm run --guest builtin`: the CPL3 guest on userfaultfd-served hugetlb
//! RAM through the TDP MMU, with each uffd mode and each invalidation kind
//! interleaved with its run (>= 100 invalidations, agreement check after
//! every one, checksum against the model).

use guests::builtin::Pattern;
use integration_tests::{require, HugepagePool};
use std::sync::Mutex;
use vmm::guest_ram_uffd::UffdMode;
use vmm::memory::HugePages;
use vmm::run::{self, RunArgs, RunError};
use vmm::run_inval::InvalKind;

const MEM: u64 = 64 << 20;
/// One run at a time: runs share the hugetlb pool.
static SERIAL: Mutex<()> = Mutex::new(());

fn ready() -> Option<(std::sync::MutexGuard<'static, ()>, HugepagePool)> {
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !require("/dev/kvm", kvm) || !require("root (to reserve hugepages)", root) {
        return None;
    }
    let lock = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let pool = HugepagePool::reserve(
        HugePages::Huge2M.sysfs_dir().unwrap(),
        MEM / HugePages::Huge2M.page_size(),
    );
    if !require("32 free 2M hugepages", pool.is_ok()) {
        return None;
    }
    Some((lock, pool.unwrap()))
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
