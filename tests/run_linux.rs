//! `vmm run --guest linux`: the Linux guest on userfaultfd-served hugetlb
//! RAM whose every guest fault goes through the project's TDP MMU.
//!
//! A crafted kernel (console + reset, seconds) checks the plumbing on each
//! mode; CI boots the real Debian kernel once (2M, MINOR) to /init, then
//! checks that the MMU's mapped gfns agree with PAGEMAP_SCAN.
//! Kernel/initrd for the Linux boot: `VMM_TEST_KERNEL`/`VMM_TEST_INITRD`,
//! else the provisioned guest image.

use integration_tests::{linux_image, require, require_kvm_root, serial_then_reset, tiny_elf};
use notifier::hostconf::HugepageReservation;
use notifier::PageSize;
use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard};
use vmm::cli::Guest;
use vmm::commands::run::linux::{self as run_linux, RunLinuxError};
use vmm::commands::run::RunArgs;
use vmm::host::invalidator::InvalKind;
use vmm::memory::uffd::UffdMode;

/// One run at a time: runs share the hugetlb pool.
static SERIAL: Mutex<()> = Mutex::new(());

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vmm-run-linux-tests-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

/// /dev/kvm, root and `mem` bytes of free 2M hugepages (reserved for the
/// guard's lifetime), one test at a time.
fn ready(mem: u64) -> Option<(MutexGuard<'static, ()>, HugepageReservation)> {
    if !require_kvm_root() {
        return None;
    }
    let lock = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let pool = HugepageReservation::require(PageSize::Size2M, mem / PageSize::Size2M.bytes());
    if let Err(e) = &pool {
        eprintln!("2M hugepages: {e}");
    }
    if !require("free 2M hugepages for guest RAM", pool.is_ok()) {
        return None;
    }
    Some((lock, pool.unwrap()))
}

fn args(kernel: PathBuf, initrd: PathBuf, mem: u64, mode: UffdMode) -> RunArgs {
    let mut a = RunArgs::new(mem, mode);
    a.guest = Guest::Linux;
    a.linux.kernel = Some(kernel);
    a.linux.initrd = Some(initrd);
    a.linux.quiet = true;
    a.boot_timeout = 60;
    a.linux.serial_log = Some(scratch(&format!("serial-{mode}-{mem}.log")));
    a
}

#[test]
fn between_pass_invalidations_and_missing_races_are_typed_errors() {
    let k = scratch("none");
    let mut a = args(k.clone(), k, 32 << 20, UffdMode::Minor);
    a.touch.invalidate = InvalKind::Discard;
    let e = run_linux::run(&a).unwrap_err();
    assert!(matches!(e, RunLinuxError::Invalidate(_)), "{e}");
    a.touch.invalidate = InvalKind::None;
    // Options of the other guest are refused, not silently ignored.
    a.touch.passes = 5;
    a.touch.stride = 64;
    let e = run_linux::run(&a).unwrap_err();
    assert!(matches!(e, RunLinuxError::BuiltinOnly(_)), "{e}");
    assert!(e.to_string().contains("--passes, --stride"), "{e}");
    a.touch.passes = 3;
    a.touch.stride = 4096;
    let out = std::process::Command::new(integration_tests::vmm_binary())
        .args([
            "run",
            "--guest",
            "builtin",
            "--kernel",
            "/nonexistent",
            "--mem",
            "64M",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("--guest builtin does not use --kernel"),
        "{err}"
    );
    a.touch.uffd = UffdMode::Missing;
    a.touch.race_discard_us = 100;
    let e = run_linux::run(&a).unwrap_err();
    assert!(matches!(e, RunLinuxError::Inval(_)), "{e}");
}

/// A crafted kernel that prints and resets, on each mode: the loader's
/// writes (through the VMM's view, or staged for MISSING) reach the guest, the guest's touches fault
/// through the MMU (MINOR) or the kernel (baselines), and the MMU agrees
/// with the host page tables at the end.
/// (MISSING: the kernel's page is staged, so its bytes arrive by COPY.)
#[test]
fn crafted_kernel_runs_on_uffd_ram_through_the_mmu() {
    const MEM: u64 = 32 << 20;
    let Some(_g) = ready(MEM) else { return };
    let k = scratch("k-hello");
    std::fs::write(&k, tiny_elf(&serial_then_reset("hello\n"), 0)).unwrap();
    let i = scratch("initrd-hello");
    std::fs::write(&i, integration_tests::empty_initrd()).unwrap();
    for mode in [
        UffdMode::Minor,
        UffdMode::Missing,
        UffdMode::Kernel,
        UffdMode::KernelPrefilled,
    ] {
        let r = run_linux::run(&args(k.clone(), i.clone(), MEM, mode))
            .unwrap_or_else(|e| panic!("{mode}: {e}"));
        assert!(r.boot.error.is_none(), "{mode}: {:?}", r.boot.error);
        assert_eq!(r.json["exit"], "reboot", "{mode}: {}", r.json);
        assert_eq!(
            std::fs::read_to_string(&r.boot.serial_log).unwrap(),
            "hello\n",
            "{mode}"
        );
        assert_eq!(r.verify_checks, 1, "{mode}");
        assert_eq!(r.verify_failures, 0, "{mode}: {:?}", r.verify_mismatches);
        if mode.uses_uffd() {
            // At least the boot tables' page and the kernel's page.
            assert!(r.faults >= 2, "{mode}: {}", r.json);
            assert!(r.stats.pf_fixed >= 2, "{mode}: {}", r.json);
            assert_eq!(r.mapped_at_end.leaves, r.stats.pf_fixed, "{}", r.json);
        } else {
            assert_eq!(r.faults, 0, "{mode}: the baselines bypass the MMU");
            assert_eq!(r.mapped_at_end.leaves, 0, "{mode}");
        }
    }
}

/// The real guest: boots to /init with every page of its RAM served by the
/// MMU's fault path. 13 min alone, ~32 min with other boots sharing the two
/// cores on this project's machines (emulated CPL0): hence the long timeout.
#[test]
fn linux_boots_to_init_on_mmu_served_ram() {
    const MEM: u64 = 256 << 20;
    let img = linux_image();
    let Some(_g) = ready(MEM) else { return };
    if !require("the Linux guest image", img.is_some()) {
        return;
    }
    let (k, i) = img.unwrap();
    let mut a = args(k, i, MEM, UffdMode::Minor);
    a.boot_timeout = 3600;
    a.linux.serial_log = Some(scratch("linux-minor.log"));
    let r = run_linux::run(&a).unwrap();
    eprintln!("{}\n{}", r.boot.text, r.json);
    assert!(
        r.boot.error.is_none(),
        "{:?} (serial log {})",
        r.boot.error,
        r.boot.serial_log.display()
    );
    assert_eq!(r.json["init_reached"], true, "{}", r.json);
    if r.json["userland"] == true {
        assert_eq!(r.json["exit"], "reboot", "{}", r.json);
    } else {
        // This project's machines: no system calls from guest user space.
        assert_eq!(r.json["exit"], "init-killed", "{}", r.json);
    }
    assert!(r.faults > 0, "{}", r.json);
    assert!(r.stats.pf_fixed > 0, "{}", r.json);
    let at_init = r.mapped_at_init.expect("MMU snapshot at init");
    assert!(at_init.leaves > 0, "{}", r.json);
    // Every fault the MMU fixed is a 2M leaf it still maps (nothing zapped).
    assert_eq!(r.mapped_at_end.leaves, r.stats.pf_fixed, "{}", r.json);
    assert_eq!(r.verify_checks, 1);
    assert_eq!(r.verify_failures, 0, "{:?}", r.verify_mismatches);
}
