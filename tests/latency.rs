//! `vmm latency --quick`: a short pass over every scenario on the built-in
//! probe guest; asserts the report's structure: every scenario has figures
//! for every layer it claims, the tracepoint saw a range for every syscall
//! the kernel notifies (none for NUMA hinting on hugetlb), and the guest
//! probe reported.

use integration_tests::require;
use vmm::latency::{self, LatencyArgs};

fn ready() -> bool {
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    require("/dev/kvm", kvm) && require("root (hugepages, tracefs, numa_balancing)", root)
}

#[test]
fn quick_pass_has_every_layer() {
    if !ready() {
        return;
    }
    let mut a = LatencyArgs::new();
    a.quick = true;
    a.mem = 512 << 20;
    a.configs = "shared-2M,private-2M".into();
    a.numa_window_ms = 2000;
    a.timeout = 300;
    let rep = latency::run(&a).expect("vmm latency --quick");
    let v = serde_json::to_value(&rep).unwrap();
    let skipped = v["skipped"].as_array().unwrap();
    let why = |what: &str| {
        skipped
            .iter()
            .filter(|s| s["what"].as_str().unwrap_or("").contains(what))
            .map(|s| s["why"].to_string())
            .collect::<Vec<_>>()
    };
    let scenarios = v["scenarios"].as_array().unwrap();
    assert!(
        require(
            "free 2M hugepages for a 512 MiB guest",
            !scenarios.is_empty()
        ),
        "nothing measured: {skipped:?}"
    );
    let traced = why("kernel layer").is_empty();
    assert!(
        require("tracefs (kvm_unmap_hva_range)", traced),
        "{:?}",
        why("kernel layer")
    );
    let mut ops = std::collections::BTreeSet::new();
    for s in scenarios {
        let name = s["name"].as_str().unwrap();
        let op = s["op"].as_str().unwrap();
        ops.insert(format!("{op}/{}", s["state"].as_str().unwrap()));
        let layers: Vec<&str> = s["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l.as_str().unwrap())
            .collect();
        for l in &layers {
            for q in ["p50", "p99", "max"] {
                let x = s[l][q].as_f64();
                assert!(x.is_some_and(|x| x >= 0.0), "{name}: {l}.{q} missing: {s}");
            }
            assert!(s[l]["max"].as_f64() >= s[l]["p50"].as_f64(), "{name}: {l}");
        }
        // The guest probe reported in every scenario.
        assert!(layers.contains(&"guest"), "{name}: no guest layer");
        assert!(
            s["guest"]["max"].as_f64().unwrap() > 0.0,
            "{name}: probe silent"
        );
        assert!(layers.contains(&"mmu"), "{name}: no mmu layer");
        assert!(
            layers.contains(&"mmu_shadow"),
            "{name}: no shadow MMU layer"
        );
        assert!(layers.contains(&"kernel"), "{name}: no kernel layer");
        if op == "numa_hint" {
            // task_numa_work skips hugetlb: a measured no-op.
            assert_eq!(s["kernel"]["ranges_total"], 0, "{name}");
            assert_eq!(s["mmu"]["zaps"], 0, "{name}");
            assert_eq!(s["mmu_shadow"]["zaps"], 0, "{name}");
            assert!(!layers.contains(&"host"), "{name}: no syscall to time");
        } else {
            assert!(layers.contains(&"host"), "{name}: no host layer");
            assert_eq!(
                s["kernel"]["iterations_without_range"], 0,
                "{name}: a syscall without a tracepoint range"
            );
            assert!(s["kernel"]["ranges"].as_u64().unwrap() >= 1, "{name}");
            assert!(
                s["mmu"]["zaps"].as_u64().unwrap() >= 1,
                "{name}: no MMU zap"
            );
        }
    }
    for want in [
        "protect/populated",
        "protect/sparse",
        "protect/empty",
        "discard_dontneed/populated",
        "punch_hole/populated",
        "write_protect/populated",
        "numa_hint/populated",
    ] {
        assert!(ops.contains(want), "missing scenario {want}: {ops:?}");
    }
    // The table names every scenario.
    let t = latency::table(&rep);
    for s in scenarios {
        assert!(t.contains(s["name"].as_str().unwrap()));
    }
}
