//! `vmm run --guest builtin`: the CPL3 guest on userfaultfd-served hugetlb
//! RAM through the TDP MMU, with each uffd mode and each invalidation kind
//! interleaved with its run (>= 100 invalidations, agreement check after
//! every one, checksum against the model).

use guests::builtin::Pattern;
use integration_tests::{require, require_hugepages_2m, require_kvm_root};
use notifier::hostconf::HugepageReservation;
use notifier::PageSize;
use std::sync::Mutex;
use std::time::Duration;
use vmm::host::events::EventSources;
use vmm::host::invalidator::InvalKind;
// The built-in guest's run (`vmm run --guest builtin`).
use vmm::machine::builtin::touch::{
    self as run, TouchArgs as RunArgs, TouchError as RunError, TouchReport as RunReport,
};
use vmm::memory::uffd::UffdMode;

const MEM: u64 = 64 << 20;
/// One run at a time: runs share the hugetlb pool.
static SERIAL: Mutex<()> = Mutex::new(());

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
            // The kernel-side sources ran alongside (default `--events auto`).
            let u = r.events.uffd.expect("uffd events requested");
            if kind == InvalKind::Discard {
                // Every madvise raised a REMOVE the fault thread read.
                assert!(u.remove >= r.invalidations, "{mode}: {u:?}");
                assert_eq!(u.delivered.in_guest_ram, u.remove);
            }
            if require("the kvm tracepoint (tracefs)", r.events.trace.is_some()) {
                let t = r.events.trace.unwrap();
                assert!(t.in_guest_ram >= r.invalidations, "{mode} {kind:?}: {t:?}");
            }
        }
    }
}

#[test]
fn bad_arguments_are_typed_errors() {
    // `--guest` is typed: an unknown guest is refused when parsing.
    {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            a: vmm::commands::run::RunArgs,
        }
        assert!(Cli::try_parse_from(["x", "--guest", "windows"]).is_err());
        assert!(Cli::try_parse_from(["x", "--guest", "linux"]).is_ok());
    }
    let mut a = RunArgs::new(MEM, UffdMode::Minor);
    a.stride = 12;
    assert!(matches!(run::run(&a), Err(RunError::Guest(_))));
    // MINOR faults need a page cache: private anonymous RAM has none.
    for thp in [false, true] {
        let mut a = RunArgs::new(MEM, UffdMode::Minor);
        a.backing = Some(notifier::hostmm::Backing::Anon { thp });
        let e = run::run(&a).unwrap_err();
        assert!(e.to_string().contains("no page cache"), "{e}");
    }
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
    // Each racing madvise blocked until the fault thread read its REMOVE,
    // also while faults in its range were parked: no deadlock.
    let u = r.events.uffd.expect("uffd events");
    assert!(u.remove >= r.race_invalidations, "{u:?}");
    // Discards lose data in MISSING mode: refused.
    let mut a = args(UffdMode::Missing, InvalKind::None);
    a.race_discard_us = 20;
    assert!(run::run(&a).is_err());
}

/// Run in a thread; a run that does not finish in `limit` is a deadlock.
fn run_bounded(a: RunArgs, limit: Duration) -> Result<RunReport, String> {
    let (tx, rx) = std::sync::mpsc::channel();
    let what = format!(
        "{} {:?} bystander {} us",
        a.uffd, a.invalidate, a.bystander_us
    );
    std::thread::spawn(move || {
        let _ = tx.send(run::run(&a).map_err(|e| e.to_string()));
    });
    match rx.recv_timeout(limit) {
        Ok(r) => r,
        Err(_) => panic!("{what}: no result within {limit:?} (deadlock?)"),
    }
}

/// A bystander thread issues raw madvise(MADV_DONTNEED / MADV_REMOVE) and
/// raw mprotect on guest RAM - not through the VMM's host-mm model, so no
/// `Delivery::Before` announcement - while the guest runs and the VMM's own
/// invalidations are interleaved. The MMU is zapped through the
/// userfaultfd REMOVE messages and the tracepoint, the agreement check
/// holds after every boundary, the checksum counts the pages MADV_REMOVE
/// zeroed, and nothing deadlocks (a madvise blocked on its REMOVE while a
/// fault retries in the same range is the case the fault thread must get
/// out of).
#[test]
fn bystander_raw_invalidations_reach_the_mmu() {
    let Some(_g) = ready() else { return };
    for mode in [UffdMode::Minor, UffdMode::Missing] {
        let mut a = args(mode, InvalKind::Mixed);
        a.bystander_us = 200;
        let r = run_bounded(a, Duration::from_secs(120)).unwrap_or_else(|e| panic!("{mode}: {e}"));
        let b = r.events.bystander.clone().expect("bystander ran");
        let u = r.events.uffd.expect("uffd events");
        assert_eq!(r.verify_failures, 0, "{mode}: {:?}", r.verify_mismatches);
        assert!(r.checksum_ok, "{mode}: {r:?}");
        assert_eq!(b.boundary_removes, 10, "{mode}: one per boundary");
        assert_eq!(
            b.zap_timeouts, 0,
            "{mode}: the MMU was zapped after each raw op"
        );
        assert!(b.zaps_proven > 0, "{mode}: {b:?}");
        assert!(
            b.concurrent_discards > 0 && b.concurrent_protects > 0,
            "{b:?}"
        );
        // Every raw madvise reached the fault thread as a REMOVE, and some
        // found SPTEs the VMM had not zapped itself.
        assert!(
            u.remove >= b.boundary_removes + b.concurrent_discards,
            "{u:?} {b:?}"
        );
        assert!(u.delivered.zapping > 0, "{mode}: {u:?}");
        assert_eq!(r.verify_checks, r.invalidations + 1 + b.boundary_removes);
        if require("the kvm tracepoint (tracefs)", r.events.trace.is_some()) {
            let t = r.events.trace.unwrap();
            assert!(
                t.zapping > 0,
                "{mode}: raw mprotects zapped via the tracepoint: {t:?}"
            );
        }
    }
}

/// Each source alone still zaps the MMU for raw invalidations: the
/// tracepoint alone (no uffd events: MADV_REMOVE is seen only there) and
/// the userfaultfd alone (mprotect is then seen by nobody, which the
/// presence check cannot tell - it leaves the pages present).
#[test]
fn each_event_source_alone() {
    let Some(_g) = ready() else { return };
    for (src, mode) in [("trace", UffdMode::Minor), ("uffd", UffdMode::Missing)] {
        let mut a = args(mode, InvalKind::None);
        a.bystander_us = 300;
        a.events = src.parse::<EventSources>().unwrap();
        let r = run_bounded(a, Duration::from_secs(120)).unwrap_or_else(|e| panic!("{src}: {e}"));
        let b = r.events.bystander.clone().unwrap();
        assert_eq!(r.verify_failures, 0, "{src}: {:?}", r.verify_mismatches);
        assert!(r.checksum_ok, "{src}: {r:?}");
        assert_eq!(b.zap_timeouts, 0, "{src}: {b:?}");
        match src {
            "trace" => {
                assert!(r.events.uffd.is_none());
                assert!(r.events.trace.is_some(), "{:?}", r.events.trace_unavailable);
                assert!(r.events.trace.unwrap().zapping > 0);
            }
            _ => {
                assert!(r.events.trace.is_none());
                assert!(r.events.uffd.unwrap().delivered.zapping > 0);
            }
        }
    }
}

/// Waking the vCPU in the resolving ioctl (before the SPTE install) and a
/// busy-polling fault thread change nothing the guest or the MMU can tell.
#[test]
fn wake_early_and_spin_keep_every_page_in_the_mmu() {
    let Some(_g) = ready() else { return };
    for mode in [UffdMode::Minor, UffdMode::Missing] {
        let mut a = args(mode, InvalKind::Discard);
        a.wake_early = true;
        a.spin_faults = true;
        a.fault_cpu = Some(0);
        let r = run_bounded(a, Duration::from_secs(120)).unwrap_or_else(|e| panic!("{mode}: {e}"));
        assert!(r.checksum_ok, "{mode}: {r:?}");
        assert_eq!(r.verify_failures, 0, "{mode}: {:?}", r.verify_mismatches);
        // A fault whose page was discarded after its vCPU had resumed is
        // dropped, not re-populated (that would undo the discard).
        assert_eq!(
            r.stats.pf_fixed + r.spurious + r.abandoned,
            r.faults,
            "{mode}: {r:?}"
        );
    }
}

/// MISSING mode on 1 GiB pages: one 1 GiB `UFFDIO_COPY` whose source is
/// resident, so it needs no second gigantic page (a non-resident source
/// makes the kernel copy through a temporary huge page outside the
/// reservation: ENOMEM with a pool sized for the guest, which used to
/// leave the vCPU asleep in its fault until the watchdog).
#[test]
fn missing_mode_on_1g_pages_needs_one_page() {
    if !require_kvm_root() {
        return;
    }
    let _lock = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let pool = HugepageReservation::require(PageSize::Size1G, 1);
    if !require("one free 1G hugepage", pool.is_ok()) {
        return;
    }
    // Hold every other free 1G page, so a COPY needing a temporary one fails.
    let spare = notifier::hostconf::free_hugepages(PageSize::Size1G).saturating_sub(1);
    // SAFETY: memfd_create with a static NUL-terminated name; checked.
    let fd = unsafe {
        libc::memfd_create(
            c"hold-1g".as_ptr(),
            libc::MFD_HUGETLB | libc::MFD_HUGE_1GB | libc::MFD_CLOEXEC,
        )
    };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: a fresh fd we own from here on.
    let _hold = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    if spare > 0 {
        let len = libc::off_t::try_from(spare << 30).unwrap();
        // SAFETY: fallocate on our own memfd.
        let rc = unsafe { libc::fallocate(fd, 0, 0, len) };
        assert_eq!(rc, 0, "holding {spare} spare 1G pages");
    }
    assert_eq!(notifier::hostconf::free_hugepages(PageSize::Size1G), 1);
    let mut a = RunArgs::new(1 << 30, UffdMode::Missing);
    a.hugepages = PageSize::Size1G;
    a.passes = 1;
    a.stride = 2 << 20;
    a.timeout = 60;
    a.events = "none".parse().unwrap();
    let r = run_bounded(a, Duration::from_secs(90)).unwrap_or_else(|e| panic!("{e}"));
    assert!(r.checksum_ok, "{r:?}");
    assert_eq!(r.faults, 1);
    assert_eq!(r.stats.pages_1g, 1);
}

/// Fault-around maps pages ahead of the guest through the same fault path:
/// with the VMM's invalidations and a bystander's raw ones interleaved, the
/// agreement check and the checksum still hold, and fewer faults reach the
/// fault thread than pages the MMU maps.
#[test]
fn fault_around_keeps_agreement() {
    let Some(_g) = ready() else { return };
    for mode in [UffdMode::Minor, UffdMode::Missing] {
        let mut a = args(mode, InvalKind::Mixed);
        a.fault_around = 4;
        a.bystander_us = 300;
        let r = run_bounded(a, Duration::from_secs(120)).unwrap_or_else(|e| panic!("{mode}: {e}"));
        assert_eq!(r.verify_failures, 0, "{mode}: {:?}", r.verify_mismatches);
        assert!(r.checksum_ok, "{mode}: {r:?}");
        assert!(r.prefetched > 0, "{mode}: {r:?}");
        // Every fault read ends Fixed or Spurious; prefetches add Fixed.
        assert_eq!(
            r.stats.pf_fixed,
            r.faults - r.spurious + r.prefetched,
            "{mode}"
        );
    }
}

/// Guest RAM that is not hugetlb, through the same MMU: anonymous 4 KiB
/// pages and shmem (one fault per 4 KiB page, 4 KiB SPTEs) and THP (one
/// MISSING fault per 2 MiB block, collapsed into a huge PMD, so the MMU
/// maps 2 MiB leaves where the host does), each with interleaved
/// invalidations (`mixed`: protect, write-protect, discard - hole punch on
/// shmem), the agreement check after every one and the checksum.
#[test]
fn anonymous_thp_and_shmem_ram() {
    if !require_kvm_root() {
        return;
    }
    let _lock = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    // None of these backings is hugetlb: they must run with the 2 MiB pool
    // empty (every free page held here, given back on drop).
    let free = notifier::hostconf::free_hugepages(PageSize::Size2M);
    let _held = (free > 0).then(|| {
        let len = usize::try_from(free * (2 << 20)).unwrap();
        notifier::mmap::Mmap::anon(
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_HUGETLB | libc::MAP_HUGE_2MB | libc::MAP_POPULATE,
        )
        .expect("hold the free 2 MiB hugetlb pages")
    });
    assert_eq!(notifier::hostconf::free_hugepages(PageSize::Size2M), 0);
    for (backing, mode) in [
        ("anon", UffdMode::Missing),
        ("thp", UffdMode::Missing),
        ("shmem", UffdMode::Minor),
        ("shmem", UffdMode::Missing),
    ] {
        let what = format!("{backing} {mode}");
        let mut a = RunArgs::new(MEM, mode);
        a.backing = Some(vmm::cli::parse_backing(backing).unwrap());
        a.pattern = Pattern::Sequential;
        a.stride = 4096;
        a.passes = 3;
        a.verify = true;
        let r = run::run(&a).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(r.checksum_ok, "{what}: {r:?}");
        assert_eq!(r.verify_failures, 0, "{what}: {:?}", r.verify_mismatches);
        if backing == "thp" {
            // One fault per 2 MiB block, each mapped as one 2 MiB leaf - no
            // 4 KiB leaf anywhere. (A block's own collapse is notified to
            // the tracepoint and may reach the MMU after its leaf went in:
            // that zap leaves the MMU mapping less than the host, never
            // more, so pages_2m may end below the block count.)
            let blocks = MEM / (2 << 20);
            assert!(r.faults <= 2 * blocks, "{what}: {} faults", r.faults);
            assert_eq!(r.stats.pages_4k, 0, "{what}: {:?}", r.stats);
            assert!(r.stats.pages_2m >= blocks / 2, "{what}: {:?}", r.stats);
        } else {
            assert_eq!(r.stats.pages_2m, 0, "{what}: {:?}", r.stats);
            assert!(r.faults >= (MEM - (2 << 20)) / 4096, "{what}: {}", r.faults);
        }
        let mut a = args(mode, InvalKind::Mixed);
        a.backing = Some(vmm::cli::parse_backing(backing).unwrap());
        let r = run::run(&a).unwrap_or_else(|e| panic!("{what} mixed: {e}"));
        assert!(r.invalidations >= 100, "{what}");
        assert!(r.checksum_ok, "{what} mixed: {r:?}");
        assert_eq!(
            r.verify_failures, 0,
            "{what} mixed: {:?}",
            r.verify_mismatches
        );
    }
}

/// MISSING-mode RAM takes its huge pages one fault at a time, long after
/// the pool was checked: they are reserved at mmap (no `MAP_NORESERVE`),
/// so another process draining the pool meanwhile cannot turn a fault into
/// ENOMEM (or the VMM's own touch into SIGBUS).
#[test]
fn missing_mode_ram_reserves_its_huge_pages_at_mmap() {
    let Some(_g) = ready() else { return };
    const RESV: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB/resv_hugepages";
    let resv = || -> u64 {
        std::fs::read_to_string(RESV)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    };
    for backing in [
        notifier::hostmm::Backing::PrivateHugetlb(PageSize::Size2M),
        notifier::hostmm::Backing::SharedMemfd(PageSize::Size2M),
    ] {
        let before = resv();
        let ram = vmm::memory::uffd::UffdGuestRam::new(
            MEM,
            backing,
            UffdMode::Missing,
            notifier::Subscribers::new(),
            false,
        )
        .unwrap_or_else(|e| panic!("{backing}: {e}"));
        assert_eq!(
            resv() - before,
            MEM / (2 << 20),
            "{backing}: every page reserved, none taken yet"
        );
        drop(ram);
    }
}

/// The fault path's host page is writable only when the fault was a write:
/// the kernel checked the VMA before handing the fault to userfaultfd, but
/// a read fault says nothing of whether the host maps the page writable
/// (an mprotect(PROT_READ) may be in force), so the MMU maps it read-only.
/// (It used to report every page writable.)
#[test]
fn a_read_fault_maps_read_only_a_write_fault_writable() {
    let Some(_g) = ready() else { return };
    let subs = notifier::Subscribers::new();
    let ram = vmm::memory::uffd::UffdGuestRam::new(
        MEM,
        notifier::hostmm::Backing::SharedMemfd(PageSize::Size2M),
        UffdMode::Minor,
        subs.clone(),
        false,
    )
    .expect("guest RAM");
    let (_ctx, tdp) = vmm::memory::mmu::tdp_mmu_for(&ram, &subs).expect("TDP MMU");
    let mut rep = vmm::memory::fault::FaultReport::default();
    let base = ram.guest_hva();
    vmm::memory::fault::handle_fault(&ram, &tdp, base, false, &mut rep).expect("read fault");
    let read = tdp.lookup(0).expect("mapped after the read fault");
    assert!(!read.spte.is_writable(), "read fault: {:?}", read.spte);
    let gpa = 4 << 20;
    vmm::memory::fault::handle_fault(&ram, &tdp, base + gpa, true, &mut rep).expect("write fault");
    let write = tdp.lookup(gpa >> 12).expect("mapped after the write fault");
    assert!(write.spte.is_writable(), "write fault: {:?}", write.spte);
}
