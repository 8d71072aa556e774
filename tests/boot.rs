//! `vmm boot`: typed setup errors, the triple-fault / reset / init-killed
//! paths with tiny crafted ELF kernels (seconds each, every backing), and the
//! real Debian kernel booted to /init.
//!
//! CI boots Linux once (2M hugepages). The 1G and `none` Linux boots run
//! only with `VMM_BOOT_ALL=1` (minutes each on this project's machines); the
//! quick crafted-kernel paths cover those backings in every run.
//! Kernel/initrd for the Linux boots: `VMM_TEST_KERNEL`/`VMM_TEST_INITRD`,
//! else the provisioned guest image (`vmm::machine::linux::default_image`).

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use integration_tests::{empty_initrd, linux_image, require, serial_then_reset, tiny_elf};
use notifier::hostconf::HugepageReservation;
use notifier::PageSize;
use vmm::arch::x86_64::layout::MAX_LOW_RAM;
use vmm::commands::boot::{self, BootArgs};
use vmm::loader::kernel::KernelError;
use vmm::machine::linux::BootError;
use vmm::memory::MemoryError;
use vmm::vstate::KvmError;

/// Tests that change hugetlb pools run one at a time.
static POOL: Mutex<()> = Mutex::new(());

fn kvm_ok() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vmm-boot-tests-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

fn write(name: &str, bytes: &[u8]) -> PathBuf {
    let p = scratch(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn args(kernel: &Path, initrd: &Path, hp: PageSize, mem: u64) -> BootArgs {
    let mut a = BootArgs::new(kernel.to_path_buf(), initrd.to_path_buf());
    a.hugepages = hp;
    a.mem = mem;
    a.linux.quiet = true;
    a.timeout = 60;
    a.linux.serial_log = Some(scratch(&format!("serial-{hp}-{mem}.log")));
    a
}

/// Grows the hugetlb pool of `hp` so `pages` are free, for the guard's
/// lifetime (the notifier crate's reservation: free minus reserved pages).
fn reserve(hp: PageSize, pages: u64) -> Result<HugepageReservation, String> {
    let size = hp;
    HugepageReservation::require(size, pages).map_err(|e| e.to_string())
}

#[test]
fn kvm_device_missing_is_a_typed_error() {
    let k = write("k-missing-kvm", &tiny_elf(&[0xf4], 0));
    let mut a = args(&k, &k, PageSize::Size4K, 32 << 20);
    a.kvm_dev = PathBuf::from("/nonexistent/kvm");
    let e = boot::run(&a).unwrap_err();
    assert!(matches!(e, BootError::Kvm(KvmError::Missing(_))), "{e}");
    a.kvm_dev = PathBuf::from("/dev/null");
    let e = boot::run(&a).unwrap_err();
    assert!(matches!(e, BootError::Kvm(KvmError::NotKvm { .. })), "{e}");
}

#[test]
fn bad_kernels_and_initrds_are_typed_errors() {
    if !require("/dev/kvm", kvm_ok()) {
        return;
    }
    let initrd = write("initrd", &empty_initrd());
    let good = write("k-good", &tiny_elf(&[0xf4], 0));
    type Case = (PathBuf, PathBuf, fn(&BootError) -> bool);
    let cases: Vec<Case> = vec![
        (scratch("no-such-kernel"), initrd.clone(), |e| {
            matches!(e, BootError::Kernel(KernelError::KernelMissing(_)))
        }),
        (write("k-text", &[b'x'; 8192]), initrd.clone(), |e| {
            matches!(e, BootError::Kernel(KernelError::NotKernel(_)))
        }),
        (
            write("k-trunc", &tiny_elf(&[0x90; 4096], 0)[..0x180]),
            initrd.clone(),
            |e| matches!(e, BootError::Kernel(KernelError::Truncated(_))),
        ),
        (good.clone(), scratch("no-such-initrd"), |e| {
            matches!(e, BootError::Kernel(KernelError::InitrdMissing(_)))
        }),
        // Truncated, or not an initramfs at all: refused at load time (the
        // guest would otherwise boot for minutes, then find no /init).
        (good.clone(), write("initrd-trunc", b"070701"), |e| {
            matches!(e, BootError::Kernel(KernelError::BadInitrd { .. }))
        }),
        (
            good.clone(),
            write("initrd-cut", &empty_initrd()[..100]),
            |e| matches!(e, BootError::Kernel(KernelError::BadInitrd { .. })),
        ),
        (good.clone(), write("initrd-text", b"hello world"), |e| {
            matches!(e, BootError::Kernel(KernelError::BadInitrd { .. }))
        }),
    ];
    for (k, i, ok) in cases {
        let e = boot::run(&args(&k, &i, PageSize::Size4K, 32 << 20)).unwrap_err();
        assert!(ok(&e), "{}: unexpected {e}", k.display());
    }
}

#[test]
fn memory_too_small_or_too_large_is_a_typed_error() {
    if !require("/dev/kvm", kvm_ok()) {
        return;
    }
    let initrd = write("initrd-small", &empty_initrd());
    // Kernel segment ends at 16 + 64 MiB; the guest has 32 MiB.
    let big = write("k-big", &tiny_elf(&[0xf4], 64 << 20));
    let e = boot::run(&args(&big, &initrd, PageSize::Size4K, 32 << 20)).unwrap_err();
    assert!(
        matches!(e, BootError::Kernel(KernelError::MemoryTooSmall { .. })),
        "{e}"
    );
    // Kernel fits, kernel + 20 MiB initrd does not.
    let k = write("k-small", &tiny_elf(&[0xf4], 0));
    let fat = write("initrd-fat", &vec![0u8; 20 << 20]);
    let e = boot::run(&args(&k, &fat, PageSize::Size4K, 32 << 20)).unwrap_err();
    assert!(
        matches!(e, BootError::Kernel(KernelError::MemoryTooSmall { .. })),
        "{e}"
    );
    assert!(e.to_string().contains("--mem"), "{e}");
    let e = boot::run(&args(&k, &initrd, PageSize::Size4K, 1 << 50)).unwrap_err();
    assert!(
        matches!(e, BootError::Memory(MemoryError::LargerThanHost { .. })),
        "{e}"
    );
}

#[test]
fn not_enough_hugepages_says_free_needed_and_command() {
    if !require("/dev/kvm", kvm_ok()) || !require("root", is_root()) {
        return;
    }
    let _pool = POOL.lock().unwrap_or_else(|p| p.into_inner());
    let free = notifier::hostconf::free_hugepages(PageSize::Size1G);
    let mem = (free + 1) << 30;
    if mem > MAX_LOW_RAM {
        eprintln!("SKIP: {free} free 1G pages, cannot ask for more within the 3 GiB layout");
        return;
    }
    let k = write("k-hp", &tiny_elf(&[0xf4], 0));
    let initrd = write("initrd-hp", &empty_initrd());
    let e = boot::run(&args(&k, &initrd, PageSize::Size1G, mem)).unwrap_err();
    let BootError::Memory(MemoryError::NotEnoughHugepages {
        free: f, needed, ..
    }) = &e
    else {
        panic!("unexpected {e}");
    };
    assert_eq!((*f, *needed), (free, free + 1));
    assert!(e.to_string().contains("echo "), "{e}");
    assert!(
        e.to_string().contains("hugepages-1048576kB/nr_hugepages"),
        "{e}"
    );
}

/// The quick guest paths on one backing: triple fault (ud2 with an empty
/// IDT), int3 assist then triple fault, console + i8042 reset, and the
/// init-killed classification from console lines.
fn quick_paths(hp: PageSize, mem: u64) {
    let initrd = write(&format!("initrd-{hp}"), &empty_initrd());
    let ud2 = write(&format!("k-ud2-{hp}"), &tiny_elf(&[0x0f, 0x0b], 0));
    let r = boot::run(&args(&ud2, &initrd, hp, mem)).unwrap();
    assert!(
        matches!(r.error, Some(BootError::TripleFault { .. })),
        "{:?}",
        r.error
    );
    assert_eq!(r.json["exit"], "error");
    assert!(r.json["ms_to_first_run"].is_u64());

    let int3 = write(&format!("k-int3-{hp}"), &tiny_elf(&[0xcc], 0));
    let r = boot::run(&args(&int3, &initrd, hp, mem)).unwrap();
    assert!(
        matches!(r.error, Some(BootError::TripleFault { .. })),
        "{:?}",
        r.error
    );
    if integration_tests::kvm_host() == integration_tests::KvmHost::Pvm {
        // PVM only: its emulated CPL0 reports an int3 as an emulation
        // failure, which the VMM's assist turns into a #BP.
        assert_eq!(r.json["assists"]["int3"], 1, "{}", r.json);
    } else {
        // Hardware (and the emulated SVM host) deliver the #BP themselves.
        assert!(r.json["assists"]["int3"].is_null(), "{}", r.json);
    }

    let hello = write(
        &format!("k-hello-{hp}"),
        &tiny_elf(&serial_then_reset("hello\n"), 0),
    );
    let r = boot::run(&args(&hello, &initrd, hp, mem)).unwrap();
    assert!(r.error.is_none(), "{:?}", r.error);
    assert_eq!(r.json["exit"], "reboot", "{}", r.json);
    assert_eq!(std::fs::read_to_string(&r.serial_log).unwrap(), "hello\n");

    let killed = write(
        &format!("k-killed-{hp}"),
        &tiny_elf(
            &serial_then_reset(
                "Run /init as init process\ninit[1]: segfault at ffffffff81c00080\n\
                 Kernel panic - not syncing: Attempted to kill init! exitcode=0x0000000b\n",
            ),
            0,
        ),
    );
    let r = boot::run(&args(&killed, &initrd, hp, mem)).unwrap();
    assert_eq!(r.json["exit"], "init-killed", "{}", r.json);
    assert_eq!(r.json["init_reached"], true);
    assert_eq!(r.json["userland"], false);
    assert!(
        r.json["reason"].as_str().unwrap().contains("signal 11"),
        "{}",
        r.json
    );
}

#[test]
fn quick_paths_plain_memfd() {
    if !require("/dev/kvm", kvm_ok()) {
        return;
    }
    quick_paths(PageSize::Size4K, 32 << 20);
}

#[test]
fn quick_paths_2m_hugepages() {
    if !require("/dev/kvm", kvm_ok()) || !require("root (to reserve hugepages)", is_root()) {
        return;
    }
    let _pool = POOL.lock().unwrap_or_else(|p| p.into_inner());
    let g = reserve(PageSize::Size2M, 16);
    if !require("16 free 2M hugepages", g.is_ok()) {
        return;
    }
    quick_paths(PageSize::Size2M, 32 << 20);
}

#[test]
fn quick_paths_1g_hugepages() {
    if !require("/dev/kvm", kvm_ok()) || !require("root (to reserve hugepages)", is_root()) {
        return;
    }
    let _pool = POOL.lock().unwrap_or_else(|p| p.into_inner());
    let g = reserve(PageSize::Size1G, 1);
    if let Err(why) = &g {
        eprintln!("1G hugepages: {why}");
    }
    if !require("one free 1G hugepage", g.is_ok()) {
        return;
    }
    quick_paths(PageSize::Size1G, 1 << 30);
}

fn boot_linux(hp: PageSize, mem: u64, pages: u64) {
    if !require("/dev/kvm", kvm_ok()) || !require("root (to reserve hugepages)", is_root()) {
        return;
    }
    let img = linux_image();
    if !require("the Linux guest image", img.is_some()) {
        return;
    }
    let (k, i) = img.unwrap();
    let _pool = POOL.lock().unwrap_or_else(|p| p.into_inner());
    let g = if hp == PageSize::Size4K {
        Ok(None)
    } else {
        reserve(hp, pages).map(Some)
    };
    if let Err(why) = &g {
        eprintln!("{hp} hugepages: {why}");
    }
    if !require(&format!("{pages} free {hp} hugepages"), g.is_ok()) {
        return;
    }
    let mut a = args(&k, &i, hp, mem);
    a.timeout = 2400;
    a.linux.serial_log = Some(scratch(&format!("linux-{hp}.log")));
    let r = boot::run(&a).unwrap();
    eprintln!("{}\n{}", r.text, r.json);
    assert!(
        r.error.is_none(),
        "{:?} (serial log {})",
        r.error,
        r.serial_log.display()
    );
    assert_eq!(r.json["init_reached"], true, "{}", r.json);
    if integration_tests::guest_userland_works() {
        // The emulated SVM host (and real hardware): /init prints the
        // marker and reboots.
        assert_eq!(r.json["userland"], true, "{}", r.json);
        assert_eq!(r.json["exit"], "reboot", "{}", r.json);
    } else {
        // This machine's PVM KVM: no system calls from guest user space.
        assert_eq!(r.json["exit"], "init-killed", "{}", r.json);
    }
}

#[test]
fn boots_debian_to_init_on_2m_hugepages() {
    boot_linux(PageSize::Size2M, 256 << 20, 128);
}

fn boot_all() -> bool {
    let on = std::env::var("VMM_BOOT_ALL").is_ok_and(|v| v == "1");
    if !on {
        eprintln!("SKIP: set VMM_BOOT_ALL=1 to boot Linux on this backing too (minutes)");
    }
    on
}

#[test]
fn boots_debian_to_init_on_1g_hugepages() {
    if boot_all() {
        boot_linux(PageSize::Size1G, 1 << 30, 1);
    }
}

#[test]
fn boots_debian_to_init_on_plain_memfd() {
    if boot_all() {
        boot_linux(PageSize::Size4K, 256 << 20, 0);
    }
}

#[test]
fn reserve_hugepages_grows_the_pool_for_the_run_and_restores_it() {
    if !require("/dev/kvm", kvm_ok()) || !require("root (to grow the pool)", is_root()) {
        return;
    }
    let _pool = POOL.lock().unwrap_or_else(|p| p.into_inner());
    let nr = || {
        std::fs::read_to_string("/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages")
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    // Eight 2 MiB pages more than a new mapping can get right now.
    let pages = notifier::hostconf::free_hugepages(PageSize::Size2M) + 8;
    let mem = pages * (2 << 20);
    if mem > MAX_LOW_RAM {
        eprintln!("SKIP: {pages} pages would exceed the 3 GiB low-RAM layout");
        return;
    }
    let before = nr();
    let initrd = write("initrd-reserve", &empty_initrd());
    let hello = write("k-reserve", &tiny_elf(&serial_then_reset("hello\n"), 0));
    let mut a = args(&hello, &initrd, PageSize::Size2M, mem);
    // Without the flag: the typed error that says how to reserve them.
    let e = boot::run(&a).unwrap_err();
    assert!(
        matches!(e, BootError::Memory(MemoryError::NotEnoughHugepages { .. })),
        "{e}"
    );
    // With it: the run gets its RAM, and the pool is back afterwards.
    a.reserve_hugepages = true;
    let r = boot::run(&a).unwrap();
    assert!(r.error.is_none(), "{:?}", r.error);
    assert_eq!(r.json["exit"], "reboot", "{}", r.json);
    assert_eq!(nr(), before, "nr_hugepages restored");
}
