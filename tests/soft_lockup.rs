//! The nested-TDP soft-lockup suite (model plane, no KVM needed): an L1 of
//! 1 TiB with a sparse L2, host invalidations of 1 GiB, 64 GiB and 1 TiB
//! zapped through the rmaps (blind walk, every head), with and without
//! yielding, while a watchdog needs `mmu_lock` every millisecond.
//!
//! Behaviour, not speed: stretch bounds are in rmap heads; the never-yield
//! growth is a ratio between ranges measured in the same run.
//!
//! Also the kernel plane's contract (`--plane kernel`: this host's KVM,
//! its invalidations measured by a SCHED_FIFO watchdog and the tracepoint).

use mmu::model::{NestedModelConfig, TableShape, MODEL_L1_HVA};
use mmu::shadow::WalkMode;
use mmu::YieldPolicy;
use std::time::Duration;
use vmm::commands::soft_lockup::kernel::{KernelPlaneError, KernelPlaneReport};
use vmm::commands::soft_lockup::{
    empty_range_speedup, predicted, run, RangeSource, Scenario, SoftLockupArgs, SoftLockupReport,
};

const MAX_UNITS: u64 = 1024;
/// More heads of zap work than this from the watchdog wanting the lock to
/// the zapper's next release: starved. One stretch plus the progress
/// publication step (the watchdog starts from the last published count) -
/// whether or not the watchdog was on a CPU at that release (see
/// `mmu::watchdog::WatchdogReport::worst_wait_work`). A 1 GiB range is 256
/// stretches; a never-yield zap holds the watchdog off for all of it.
const STARVED_HEADS: u64 = MAX_UNITS + mmu::shadow::zap::PROGRESS_EVERY;

/// `vmm soft-lockup <args>` parsed as the CLI would.
fn args_of(args: &[&str]) -> SoftLockupArgs {
    use clap::Parser;
    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        a: SoftLockupArgs,
    }
    let mut v = vec!["vmm-soft-lockup"];
    v.extend_from_slice(args);
    Cli::try_parse_from(v).unwrap().a
}

/// `vmm soft-lockup --plane kernel <args>`, run.
fn kernel_run(args: &[&str]) -> Result<KernelPlaneReport, KernelPlaneError> {
    let mut v = vec!["--plane", "kernel"];
    v.extend_from_slice(args);
    vmm::commands::soft_lockup::kernel_plane(&args_of(&v))?.run()
}

/// The timing-sensitive tests run one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}
const GIB_PAGES: u64 = 1 << 18;

fn scenario(range_gib: u64, yield_on: bool, mode: WalkMode) -> Scenario {
    Scenario {
        model: NestedModelConfig {
            l1_bytes: 1 << 40,
            density: 0.0001,
            shape: TableShape::Shuffled,
            seed: range_gib,
            ..Default::default()
        },
        zap: (0, range_gib * GIB_PAGES),
        policy: if yield_on {
            YieldPolicy::default().with_max_units(MAX_UNITS)
        } else {
            YieldPolicy::never()
        },
        mode,
        watchdog_period: Duration::from_millis(1),
        via_notifier: false,
        invalidations: Vec::new(),
        ranges: RangeSource::Direct,
    }
}

/// Heads of levels 4K, 2M and 1G in a 1 GiB-aligned range.
fn heads(range_gib: u64) -> u64 {
    range_gib * (GIB_PAGES + 512 + 1)
}

fn go(range_gib: u64, yield_on: bool) -> SoftLockupReport {
    let r = run(&scenario(range_gib, yield_on, WalkMode::Blind)).expect("scenario runs");
    eprintln!(
        "{range_gib} GiB yield={yield_on}: stretch {} ns / {} heads, watchdog worst {} ns / {} heads / {} work ({} acquisitions), zap {} ns, {} heads, {} sptes",
        r.max_stretch_ns, r.max_stretch_entries, r.watchdog_worst_wait_ns, r.watchdog_worst_wait_entries, r.watchdog_worst_wait_work,
        r.watchdog_acquisitions, r.zap_ns, r.rmap_entries_visited, r.sptes_zapped
    );
    // The blind walk visits every head of the range, empty ones included,
    // and nothing stays mapped in it (run() checked every L2 page).
    assert_eq!(r.rmap_entries_visited, heads(range_gib));
    assert!(r.translations_checked > 0);
    r
}

/// A yielding run: every stretch within the unit budget, the watchdog in.
fn go_yielding(range_gib: u64) -> SoftLockupReport {
    let y = go(range_gib, true);
    assert!(y.max_stretch_entries <= MAX_UNITS, "{y:?}");
    assert!(y.yields >= heads(range_gib) / MAX_UNITS - 1);
    assert!(y.watchdog_acquisitions >= 1);
    y
}

#[test]
fn soft_lockup_suite() {
    let _s = serial();
    let mut never = Vec::new();
    for gib in [1u64, 64, 1024] {
        // With yielding: no stretch beyond the unit budget, and the watchdog
        // held off by one stretch at most.
        let y = go_yielding(gib);
        assert!(
            y.watchdog_worst_wait_work <= STARVED_HEADS,
            "watchdog starved: held off by {} heads of zap work (budget {MAX_UNITS})",
            y.watchdog_worst_wait_work
        );
        // Never yield: one stretch, the whole range; the watchdog (waiting
        // from the start) waits for all of it.
        // (Small ranges: best of 3, so one preemption does not skew the ratio.)
        let runs = if gib < 1024 { 3 } else { 1 };
        let n = (0..runs)
            .map(|_| {
                let n = go(gib, false);
                assert_eq!(n.yields, 0);
                // (Units: every rmap head, then every shadowed guest table
                // in the range - L1's EPT tables sit at its top.)
                assert_eq!(n.max_stretch_entries, heads(gib) + n.shadow_pages_visited);
                assert_eq!(n.watchdog_worst_wait_entries, heads(gib));
                assert_eq!(n.watchdog_worst_wait_work, heads(gib));
                n
            })
            .min_by_key(|n| n.watchdog_worst_wait_ns)
            .unwrap();
        if gib == 1024 {
            assert!(
                y.watchdog_worst_wait_ns * 4 < n.watchdog_worst_wait_ns,
                "yielding did not shorten the watchdog's wait: {} vs {} ns",
                y.watchdog_worst_wait_ns,
                n.watchdog_worst_wait_ns
            );
        }
        never.push(n);
    }
    // The never-yield wait grows with the range: exactly in heads (64x,
    // 16x), and in time as a ratio (expected the same; loose bounds, the
    // machine is shared).
    let e: Vec<f64> = never
        .iter()
        .map(|r| r.watchdog_worst_wait_entries as f64)
        .collect();
    assert!(e[1] / e[0] >= 60.0 && e[2] / e[1] >= 15.0, "{e:?}");
    let w: Vec<f64> = never
        .iter()
        .map(|r| r.watchdog_worst_wait_ns as f64)
        .collect();
    assert!(
        w[1] / w[0] >= 4.0,
        "64 GiB vs 1 GiB wait ratio {:.1}",
        w[1] / w[0]
    );
    assert!(
        w[2] / w[0] >= 16.0,
        "1 TiB vs 1 GiB wait ratio {:.1}",
        w[2] / w[0]
    );
}

#[test]
fn summary_walk_zaps_the_same_and_visits_only_populated_heads() {
    let _s = serial();
    for yield_on in [true, false] {
        let r = run(&scenario(1024, yield_on, WalkMode::Summary)).unwrap();
        assert_eq!(r.rmap_entries_visited, r.rmap_heads_populated);
        let b = run(&scenario(1024, yield_on, WalkMode::Blind)).unwrap();
        assert_eq!(r.sptes_zapped, b.sptes_zapped);
        assert_eq!(r.sptes_zapped, b.l2_pages_mapped);
    }
}

/// The same scenario delivered as a host event: one blockable
/// MMU_NOTIFY_PROTECTION_VMA for the L1 range through
/// `notifier::subscriber::Subscribers` (what an mprotect of a PUD range
/// notifies).
#[test]
fn via_the_notifier_path() {
    let _s = serial();
    for yield_on in [true, false] {
        let sc = Scenario {
            via_notifier: true,
            ..scenario(64, yield_on, WalkMode::Blind)
        };
        let r = run(&sc).unwrap();
        assert!(r.via_notifier);
        assert_eq!(r.rmap_entries_visited, heads(64));
        assert!(r.sptes_zapped > 0 && r.translations_checked > 0);
        if yield_on {
            assert!(
                r.max_stretch_entries <= MAX_UNITS && r.watchdog_worst_wait_work <= STARVED_HEADS,
                "{r:?}"
            );
        } else {
            assert_eq!(r.watchdog_worst_wait_work, heads(64));
        }
    }
}

#[test]
fn empty_gib_summary_beats_blind_walk() {
    let _s = serial();
    let (blind, summary, heads) = empty_range_speedup(1 << 30, 11).unwrap();
    eprintln!("empty 1 GiB: blind {blind} ns ({heads} heads), summary {summary} ns");
    assert_eq!(heads, GIB_PAGES + 512 + 1);
    assert!(
        blind >= 50 * summary,
        "speed-up {:.1}x < 50x",
        blind as f64 / summary.max(1) as f64
    );
}

#[test]
fn bad_arguments_are_errors_not_panics() {
    for args in [
        &["x", "--l1", "4X"][..],
        &["x", "--l1", "8T"],
        &["x", "--l1", "3M"],
        &["x", "--l1", "1G", "--range", "2G"],
        &["x", "--l1", "1G", "--density", "1.5"],
        &["x", "--l1", "1G", "--shape", "spiral"],
        &["x", "--l1", "4T", "--density", "1", "--budget", "1G"],
        &["x", "--l1", "1G", "--max-units", "0"],
    ] {
        let a = args_of(&args[1..]);
        let r = Scenario::from_args(&a).and_then(|sc| run(&sc));
        assert!(r.is_err(), "{args:?} accepted");
        eprintln!("{args:?}: {}", r.unwrap_err());
    }
    // Kernel-plane options on the model plane are refused, not ignored.
    for flag in [
        &["--populate", "direct"][..],
        &["--model"],
        &["--out", "/tmp/x"],
    ] {
        let mut args = vec!["--l1", "1G"];
        args.extend_from_slice(flag);
        let Err(e) = vmm::commands::soft_lockup::run_args(&args_of(&args)) else {
            panic!("{flag:?} accepted on the model plane");
        };
        assert!(e.to_string().contains("--plane kernel only"), "{e}");
    }
}

/// Input (c): the kernel's own ranges from `notifier::predict`. An mprotect
/// of all of a 1 TiB L1 on 4 KiB host pages notifies one range per PGD
/// entry (2 x 512 GiB, the PUD-level ranges of the soft lockup); zapped
/// through `KvmMmuNotifier`, every head is still visited, each stretch
/// stays within the budget and the watchdog gets in.
#[test]
fn predicted_mprotect_ranges_zap_every_head_with_yielding() {
    let _s = serial();
    let mut sc = scenario(1024, true, WalkMode::Blind);
    let l1 = notifier::HvaRange::new(MODEL_L1_HVA, MODEL_L1_HVA + (1 << 40));
    sc.invalidations = predicted(RangeSource::Mprotect, l1, l1, 1, 256 << 20);
    sc.ranges = RangeSource::Mprotect;
    sc.via_notifier = true;
    let r = run(&sc).expect("scenario runs");
    assert_eq!(r.notified_ranges, vec![512 << 30, 512 << 30]);
    assert_eq!(r.rmap_entries_visited, heads(1024));
    assert!(r.max_stretch_entries <= MAX_UNITS, "{r:?}");
    assert!(
        r.watchdog_worst_wait_work <= STARVED_HEADS,
        "watchdog starved: {} heads of zap work",
        r.watchdog_worst_wait_work
    );
}

/// NUMA hinting: one scan window on 4 KiB host pages, nothing on hugetlb
/// (the kernel's scanner skips hugetlb VMAs).
#[test]
fn predicted_numa_hint_ranges() {
    let l1 = notifier::HvaRange::new(MODEL_L1_HVA, MODEL_L1_HVA + (1 << 40));
    let anon = predicted(RangeSource::NumaHint, l1, l1, 1, 256 << 20);
    assert_eq!(anon.len(), 1);
    assert_eq!(
        anon[0].range,
        notifier::HvaRange::new(l1.start, l1.start + (256 << 20))
    );
    assert!(predicted(RangeSource::NumaHint, l1, l1, 2, 256 << 20).is_empty());
}

/// `--plane kernel` on a small L1: every kind at every size is measured
/// (a syscall time, a stretch), the tracepoint saw the L1's ranges, the
/// fit has a verdict per kind, and the L1's memory is usable after the
/// munmap/re-map (the run ends cleanly). Figures are not judged here.
#[test]
fn kernel_plane_measures_every_kind_and_size() {
    if !integration_tests::require_kvm_root() {
        return;
    }
    let _s = serial();
    let rep = kernel_run(&["--l1", "1G", "--repeat", "2"]).expect("kernel plane");
    let v = vmm::cli::Report::json(&rep);
    eprintln!("{}", vmm::cli::Report::text(&rep));
    let points = v["points"].as_array().unwrap();
    assert_eq!(points.len(), 9, "{v}");
    for p in points {
        assert!(p["syscall_ns"].as_u64().unwrap() > 0, "{p}");
        assert!(p["lateness_ns"].as_u64().is_some(), "{p}");
        let ranges = p["ranges"].as_u64().expect("tracepoint ranges as root");
        // madvise and munmap notify their whole range (zap_page_range_single(),
        // unmap_region()); mprotect only where page tables exist on 6.1
        // (change_pmd_range() starts the notifier lazily), so maybe none.
        if p["kind"] != "mprotect" {
            assert!(ranges >= 1, "{p}");
        }
        if let Some(largest) = p["largest_range"].as_u64() {
            assert!(largest <= p["bytes"].as_u64().unwrap(), "{p}");
        }
    }
    let fits = v["fits"].as_array().unwrap();
    assert_eq!(fits.len(), 3, "{v}");
    for f in fits {
        assert!(
            ["yields", "does-not-yield", "undecided"].contains(&f["verdict"].as_str().unwrap()),
            "{f}"
        );
    }
    assert_eq!(v["memslots"], 1);
    // `--model`: the same ranges on the model, per head beside the
    // kernel's dontneed per gfn.
    let sizes: Vec<u64> = points
        .iter()
        .take(3)
        .map(|p| p["bytes"].as_u64().unwrap())
        .collect();
    let side =
        vmm::commands::soft_lockup::side_by_side::measure(1 << 30, 0.0001, &sizes, &rep.points)
            .unwrap();
    eprintln!("{}", side.text());
    assert!(side.kernel_ns_per_gfn.unwrap() > 0.0);
    assert!(side.model_over_kernel.unwrap() > 0.0);
}

/// `--populate`: a guest writes `--density` of the L1's pages first and
/// again before every measurement, so the host KVM's walk meets populated
/// rmap heads. `direct` runs on every host; `nested` (an L2 under the
/// built-in SVM guest hypervisor, nested NPT) runs where the host KVM
/// offers SVM - the emulated host - and is refused with the reason on
/// this machine's PVM KVM, which has none.
#[test]
fn kernel_plane_with_a_populating_guest() {
    if !integration_tests::require_kvm_root() {
        return;
    }
    use integration_tests::{kvm_host, KvmHost};
    let _s = serial();
    let run = |mode: &str| {
        kernel_run(&[
            "--l1",
            "4G",
            "--repeat",
            "1",
            "--kinds",
            "dontneed,munmap",
            "--populate",
            mode,
            "--density",
            "0.001",
        ])
    };
    let check = |rep: &KernelPlaneReport, mode: &str| {
        let v = vmm::cli::Report::json(rep);
        eprintln!("{}", vmm::cli::Report::text(rep));
        let p = &v["populate"];
        assert_eq!(p["mode"], mode, "{v}");
        // round(4 GiB / 4 KiB * 0.001) pages, 4 MiB apart.
        assert_eq!(p["pages"], 1049, "{v}");
        assert_eq!(p["stride_bytes"], ((4u64 << 30) / 1049) & !0xfff, "{v}");
        // The first round, then one before each of 2 kinds x 3 sizes.
        assert_eq!(p["rounds"], 7, "{v}");
        for pt in v["points"].as_array().unwrap() {
            assert!(pt["ranges"].as_u64().unwrap() >= 1, "{pt}");
            assert_eq!(pt["runs"].as_array().unwrap().len(), 1, "{pt}");
        }
    };
    check(&run("direct").expect("direct populate"), "direct");
    match (kvm_host(), run("nested")) {
        (KvmHost::Pvm, Ok(_)) => panic!("PVM KVM ran a guest hypervisor"),
        (_, Ok(r)) => check(&r, "nested"),
        // The emulated host always offers SVM; other hardware may not.
        (host, Err(e)) if host != KvmHost::EmulatedSvm => {
            let e = e.to_string();
            assert!(e.contains("no SVM") && e.contains("vmm host"), "{e}");
        }
        (_, Err(e)) => panic!("nested populate under the emulated SVM host: {e}"),
    }
}

/// `--backing`: a memfd (shmem, hugetlbfs) behind the L1, and the kinds
/// only a file has (`punch-hole`: `fallocate(PUNCH_HOLE)`, `remove`:
/// `MADV_REMOVE`), each notifying the L1; bad combinations are refused
/// before KVM with what would work.
#[test]
fn kernel_plane_backings_and_file_kinds() {
    let plane = |args: &[&str]| {
        let mut v = vec!["--repeat", "1"];
        v.extend_from_slice(args);
        kernel_run(&v)
    };
    let e = plane(&["--l1", "1G", "--kinds", "punch-hole"]).unwrap_err();
    assert!(e.to_string().contains("shared-2M"), "{e}");
    let e = plane(&["--l1", "1536M", "--backing", "shared-1G"]).unwrap_err();
    assert!(e.to_string().contains("whole number"), "{e}");
    // More 1 GiB pages to write than any pool here holds: said before KVM.
    let e = plane(&[
        "--l1",
        "4T",
        "--backing",
        "shared-1G",
        "--populate",
        "direct",
        "--density",
        "0.0001",
    ])
    .unwrap_err();
    assert!(e.to_string().contains("huge pages of 1024 MiB"), "{e}");
    if !integration_tests::require_kvm_root() {
        return;
    }
    let _s = serial();
    for backing in ["shared-4K", "shared-2M"] {
        let rep = plane(&[
            "--l1",
            "1G",
            "--backing",
            backing,
            "--kinds",
            "dontneed,punch-hole,remove,munmap",
        ])
        .unwrap_or_else(|e| panic!("{backing}: {e}"));
        let v = vmm::cli::Report::json(&rep);
        assert_eq!(v["backing"], backing, "{v}");
        let points = v["points"].as_array().unwrap();
        assert_eq!(points.len(), 12, "{v}");
        for p in points {
            assert!(p["ranges"].as_u64().unwrap() >= 1, "{backing}: {p}");
        }
    }
}

/// `--kinds numa-hint`: one 3 s window of `kernel.numa_balancing=1` (its
/// old value restored after) with a toucher thread on the watched CPU, so
/// `task_numa_work()` scans this mm - the L1 included; hugetlb backings,
/// which the scanner skips, are refused.
#[test]
fn kernel_plane_numa_hint_window() {
    let plane = |args: &[&str]| {
        let mut v = vec!["--repeat", "1", "--kinds", "numa-hint"];
        v.extend_from_slice(args);
        kernel_run(&v)
    };
    let e = plane(&["--l1", "1G", "--backing", "shared-2M"]).unwrap_err();
    assert!(e.to_string().contains("does not scan hugetlb"), "{e}");
    if !integration_tests::require_kvm_root() {
        return;
    }
    let _s = serial();
    let before = std::fs::read_to_string("/proc/sys/kernel/numa_balancing").unwrap();
    let rep = plane(&["--l1", "1G", "--populate", "direct", "--density", "0.01"]).unwrap();
    let v = vmm::cli::Report::json(&rep);
    eprintln!("{}", vmm::cli::Report::text(&rep));
    let points = v["points"].as_array().unwrap();
    assert_eq!(points.len(), 1, "{v}");
    assert_eq!(points[0]["bytes"], 1u64 << 30, "{v}");
    assert!(
        points[0]["syscall_ns"].as_u64().unwrap() >= 3_000_000_000,
        "{v}"
    );
    assert_eq!(
        std::fs::read_to_string("/proc/sys/kernel/numa_balancing").unwrap(),
        before,
        "kernel.numa_balancing not restored"
    );
}

/// Not root: the kernel plane stops with what it needs, a failing status.
#[test]
fn kernel_plane_as_nobody_says_it_needs_root() {
    if !integration_tests::require_kvm_root() {
        return;
    }
    // The emulated host's image has no util-linux; the path is the same code.
    if integration_tests::kvm_host() == integration_tests::KvmHost::EmulatedSvm {
        eprintln!("SKIP: no setpriv inside the emulated host");
        return;
    }
    let setpriv = std::path::Path::new("/usr/bin/setpriv");
    if !integration_tests::require("setpriv (util-linux)", setpriv.exists()) {
        return;
    }
    // A copy nobody may run (the build tree may not be traversable).
    let bin = std::env::temp_dir().join(format!("vmm-nobody-{}", std::process::id()));
    std::fs::copy(integration_tests::vmm_binary(), &bin).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = std::process::Command::new(setpriv)
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(&bin)
        .args([
            "soft-lockup",
            "--plane",
            "kernel",
            "--l1",
            "1G",
            "--repeat",
            "1",
        ])
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&bin);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("run as root"), "{err}");
}
