//! Host state is put back on every exit path of every subcommand that
//! changes it (`notifier::restore`, `notifier::hoststate`):
//!
//! * SIGINT and SIGTERM in the middle of a run of `latency`, `notifier-check`,
//!   `soft-lockup --plane kernel`, `nested-run`, `bench fault-cost`, `run`
//!   and `boot`: `kernel.numa_balancing`, `kernel.watchdog_thresh`, the 2M
//!   and 1G hugetlb pools, the run's tracefs instances and its
//!   `/run/hvmm/state-<pid>` are as before once it is gone;
//! * SIGKILL: the state is left, the next `vmm` (any subcommand) restores
//!   it and says so on stderr;
//! * two runs at once: a sysctl's original comes back only when both are
//!   done, and a pool shrinks by each run's own pages.
//!
//! The pool tests make the vmm grow the pool cheaply: this process first
//! takes a reservation (an unpopulated private `MAP_HUGETLB` mapping) of all
//! but a few free pages, so a 128 MiB guest is short of pages.
//!
//! Needs root, /dev/kvm, tracefs and 2M hugepages ([`require`]d: fail under
//! CI=true). One test at a time (they share the host's settings).

use integration_tests::{require, require_kvm_root, tiny_elf, vmm_binary};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

const NUMA: &str = "/proc/sys/kernel/numa_balancing";
const THRESH: &str = "/proc/sys/kernel/watchdog_thresh";
const POOL_2M: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages";
const POOL_1G: &str = "/sys/kernel/mm/hugepages/hugepages-1048576kB/nr_hugepages";
const INSTANCES: &str = "/sys/kernel/tracing/instances";
const STATE_DIR: &str = "/run/hvmm";

fn read(path: &str) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .trim()
        .to_string()
}

fn read_u64(path: &str) -> u64 {
    read(path).parse().unwrap_or(0)
}

/// The settings the subcommands change.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Host {
    numa: String,
    thresh: String,
    pool_2m: u64,
    pool_1g: u64,
}

/// Which of [`Host`]'s settings a subcommand changes (the others may be
/// changed meanwhile by whoever else uses the machine).
const W_NUMA: u8 = 1;
const W_THRESH: u8 = 2;
const W_2M: u8 = 4;
const W_1G: u8 = 8;

fn watched(subcommand: &str) -> u8 {
    match subcommand {
        "latency" => W_NUMA | W_2M,
        "notifier-check" => W_NUMA | W_2M | W_1G,
        "soft-lockup" => W_NUMA | W_THRESH,
        _ => W_2M,
    }
}

impl Host {
    /// Only the `watch`ed settings (the others blank).
    fn masked(&self, watch: u8) -> Host {
        let pick = |w: u8, s: &String| {
            if watch & w != 0 {
                s.clone()
            } else {
                String::new()
            }
        };
        Host {
            numa: pick(W_NUMA, &self.numa),
            thresh: pick(W_THRESH, &self.thresh),
            pool_2m: if watch & W_2M != 0 { self.pool_2m } else { 0 },
            pool_1g: if watch & W_1G != 0 { self.pool_1g } else { 0 },
        }
    }

    fn now() -> Self {
        Host {
            numa: read(NUMA),
            thresh: read(THRESH),
            pool_2m: read_u64(POOL_2M),
            pool_1g: read_u64(POOL_1G),
        }
    }
}

/// Root, KVM, tracefs and `numa_balancing` off (nothing to see restored
/// where it is on already), else skip / fail under CI.
fn ready() -> bool {
    if !require_kvm_root() {
        return false;
    }
    if !require("tracefs instances", Path::new(INSTANCES).is_dir()) {
        return false;
    }
    require("kernel.numa_balancing=0 before the test", read(NUMA) == "0")
}

fn instances_of(pid: u32) -> Vec<String> {
    let prefix = format!("notifier-{pid}-");
    std::fs::read_dir(INSTANCES)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default()
}

fn state_file(pid: u32) -> PathBuf {
    Path::new(STATE_DIR).join(format!("state-{pid}"))
}

/// A `vmm` child, its stderr in a file.
struct Run {
    child: Child,
    pid: u32,
    what: String,
    /// The settings it changes ([`watched`]).
    watch: u8,
    err: PathBuf,
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("hvmm-host-state-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d.join(name)
}

fn start(args: &[&str]) -> Run {
    let what = args.join(" ");
    let err = scratch(&format!("stderr-{}", args.join("_").replace('/', "_")));
    let child = Command::new(vmm_binary())
        .args(args)
        .env("VMM_PROGRESS", "0")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err).unwrap())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn vmm {what}: {e}"));
    let pid = child.id();
    Run {
        child,
        pid,
        what,
        watch: watched(args[0]),
        err,
    }
}

impl Run {
    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.err).unwrap_or_default()
    }

    /// Wait until `cond` holds while the run is still going.
    fn wait_for(&mut self, what: &str, cond: impl Fn(u32) -> bool) {
        let t0 = Instant::now();
        while !cond(self.pid) {
            if let Some(st) = self.child.try_wait().unwrap() {
                panic!(
                    "vmm {} ended ({st}) before {what}; stderr:\n{}",
                    self.what,
                    self.stderr()
                );
            }
            assert!(
                t0.elapsed() < Duration::from_secs(120),
                "vmm {}: no {what} in 120 s; stderr:\n{}",
                self.what,
                self.stderr()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Still running (not ended on its own, e.g. short of pages).
    fn assert_running(&mut self, when: &str) {
        if let Some(st) = self.child.try_wait().unwrap() {
            panic!(
                "vmm {} ended ({st}) {when}; stderr:\n{}",
                self.what,
                self.stderr()
            );
        }
    }

    fn signal(&mut self, sig: libc::c_int) -> ExitStatus {
        let pid = i32::try_from(self.pid).unwrap();
        // SAFETY: kill(2) on the child this test started and has not reaped.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
        self.child.wait().unwrap()
    }
}

impl Drop for Run {
    /// A failed test's run: SIGTERM (it restores), SIGKILL if it hangs.
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_some() {
            return;
        }
        if let Ok(pid) = i32::try_from(self.pid) {
            // SAFETY: kill(2) on the child this test started, not reaped.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let t0 = Instant::now();
        while t0.elapsed() < Duration::from_secs(5) {
            if self.child.try_wait().ok().flatten().is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// After the run is gone: the settings as `before` (a pool shrinks when
/// the dead process's pages are freed: a moment), no tracefs instance and
/// no state file of it.
fn assert_restored(run: &Run, before: &Host) {
    let (w, before) = (run.watch, before.masked(run.watch));
    let t0 = Instant::now();
    while Host::now().masked(w) != before && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        Host::now().masked(w),
        before,
        "vmm {}: host settings left changed; stderr:\n{}",
        run.what,
        run.stderr()
    );
    assert_eq!(
        instances_of(run.pid),
        Vec::<String>::new(),
        "vmm {}: tracefs instance left",
        run.what
    );
    assert!(
        !state_file(run.pid).exists(),
        "vmm {}: {} left",
        run.what,
        state_file(run.pid).display()
    );
}

/// Signal `sig` once `cond` holds, then check it ended by the signal (or,
/// for a command with a graceful stop, on its own) with the host restored.
fn signal_mid_run(args: &[&str], sig: libc::c_int, what: &str, cond: impl Fn(u32) -> bool) {
    signal_mid_run_after(args, sig, what, cond, Duration::ZERO)
}

/// [`signal_mid_run`], `settle` after `cond` (the run under way: its guest
/// running, a graceful handler installed).
fn signal_mid_run_after(
    args: &[&str],
    sig: libc::c_int,
    what: &str,
    cond: impl Fn(u32) -> bool,
    settle: Duration,
) {
    let before = Host::now();
    let mut run = start(args);
    let t0 = Instant::now();
    run.wait_for(what, cond);
    let changed_after = t0.elapsed();
    if !settle.is_zero() {
        std::thread::sleep(settle);
        run.assert_running("before the signal");
    }
    let st = run.signal(sig);
    let graceful = args[0] == "boot";
    assert!(
        st.signal() == Some(sig) || (graceful && st.code().is_some()),
        "vmm {}: {st}; stderr:\n{}",
        run.what,
        run.stderr()
    );
    assert_restored(&run, &before);
    eprintln!(
        "vmm {}: {what} after {:.2} s, signal {sig} ({st}): restored in {:.2} s",
        run.what,
        changed_after.as_secs_f64(),
        t0.elapsed().as_secs_f64()
    );
}

/// A reservation of all but `keep` of the free 2M pages, held by this
/// process without touching them (an unpopulated private hugetlb mapping
/// reserves its pages at mmap): a small vmm guest then grows the pool.
struct Hog {
    addr: *mut libc::c_void,
    len: usize,
}

impl Hog {
    fn leave(keep: u64) -> Option<Hog> {
        let avail = notifier::hostconf::free_hugepages(notifier::PageSize::Size2M);
        let pages = avail.saturating_sub(keep);
        if pages == 0 {
            return Some(Hog {
                addr: std::ptr::null_mut(),
                len: 0,
            });
        }
        let len = usize::try_from(pages << 21).ok()?;
        // SAFETY: a fresh anonymous mapping at an address the kernel picks;
        // nothing else refers to it and it is never touched.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_HUGETLB,
                -1,
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return None;
        }
        Some(Hog { addr, len })
    }
}

impl Drop for Hog {
    fn drop(&mut self) {
        if self.len > 0 {
            // SAFETY: the mapping this Hog made, unmapped once.
            unsafe { libc::munmap(self.addr, self.len) };
        }
    }
}

/// [`Hog::leave`], [`require`]d.
fn hog() -> Option<Hog> {
    let h = Hog::leave(8);
    if !require("a reservation of the free 2M hugepages", h.is_some()) {
        return None;
    }
    h
}

fn pool_grew(before: u64) -> impl Fn(u32) -> bool {
    move |_| read_u64(POOL_2M) > before
}

fn numa_on(_: u32) -> bool {
    read(NUMA) == "1"
}

/// The run's state file names `what`.
fn recorded(what: &'static str) -> impl Fn(u32) -> bool {
    move |pid| {
        std::fs::read_to_string(state_file(pid))
            .map(|s| s.contains(what))
            .unwrap_or(false)
    }
}

const LATENCY_NUMA: &[&str] = &[
    "latency",
    "--configs",
    "thp",
    "--mem",
    "256M",
    "--quick",
    "--numa-window-ms",
    "60000",
];

#[test]
fn latency_signal_mid_run_restores_numa_balancing_the_pool_and_tracefs() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    if !ready() {
        return;
    }
    // numa_balancing and the tracefs instance: the NUMA-hinting window.
    let both = |pid: u32| numa_on(pid) && !instances_of(pid).is_empty();
    signal_mid_run(LATENCY_NUMA, libc::SIGINT, "numa_balancing=1", both);
    signal_mid_run(LATENCY_NUMA, libc::SIGTERM, "numa_balancing=1", both);
    let Some(_hog) = hog() else { return };
    let pool = read_u64(POOL_2M);
    let args = [
        "latency",
        "--configs",
        "shared-2M",
        "--mem",
        "128M",
        "--quick",
    ];
    signal_mid_run(&args, libc::SIGINT, "a grown 2M pool", pool_grew(pool));
    signal_mid_run(&args, libc::SIGTERM, "a grown 2M pool", pool_grew(pool));
}

#[test]
fn notifier_check_signal_mid_run_restores_the_pools_numa_balancing_and_tracefs() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    if !ready() {
        return;
    }
    let Some(_hog) = hog() else { return };
    // Its 2M and 1G reservations come first, then the tracefs instance.
    let traced = |pid: u32| {
        let grown = recorded("hugepages-2048kB")(pid);
        if grown && !instances_of(pid).is_empty() {
            eprintln!("1G pool {} at the signal", read(POOL_1G));
            return true;
        }
        false
    };
    signal_mid_run(
        &["notifier-check"],
        libc::SIGINT,
        "the pools grown and a tracefs instance",
        traced,
    );
    // The NUMA-hinting cases (some seconds in).
    signal_mid_run(
        &["notifier-check"],
        libc::SIGTERM,
        "numa_balancing=1",
        numa_on,
    );
}

#[test]
fn soft_lockup_kernel_plane_signal_mid_run_restores_watchdog_thresh_and_numa_balancing() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    if !ready() {
        return;
    }
    let thresh = read(THRESH);
    let other = if thresh == "7" { "8" } else { "7" };
    let args = [
        "soft-lockup",
        "--plane",
        "kernel",
        "--l1",
        "1G",
        "--kinds",
        "numa-hint",
        "--repeat",
        "3",
        "--watchdog-thresh",
        other,
    ];
    signal_mid_run(&args, libc::SIGINT, "watchdog_thresh changed", |_| {
        read(THRESH) == other
    });
    signal_mid_run(&args, libc::SIGTERM, "numa_balancing=1", |pid| {
        numa_on(pid) && read(THRESH) == other && !instances_of(pid).is_empty()
    });
}

#[test]
fn pool_growing_subcommands_signal_mid_run_restore_the_pool() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    if !ready() {
        return;
    }
    let kernel = scratch("spin-kernel");
    std::fs::write(&kernel, tiny_elf(&[0xeb, 0xfe], 0)).unwrap(); // jmp $
    let initrd = scratch("initrd");
    std::fs::write(&initrd, integration_tests::empty_initrd()).unwrap();
    let (k, i) = (kernel.to_str().unwrap(), initrd.to_str().unwrap());
    let runs: [&[&str]; 4] = [
        &[
            "nested-run",
            "--mem",
            "128M",
            "--l2",
            "64M",
            "--reserve-hugepages",
            "--edits",
            "1000000",
        ],
        &[
            "bench",
            "fault-cost",
            "--mem",
            "128M",
            "--reps",
            "100000",
            "--reserve-hugepages",
        ],
        &[
            "run",
            "--guest",
            "builtin",
            "--mem",
            "128M",
            "--reserve-hugepages",
            "--passes",
            "100000000",
        ],
        &[
            "boot",
            "--kernel",
            k,
            "--initrd",
            i,
            "--mem",
            "128M",
            "--reserve-hugepages",
            "--quiet",
            "--timeout",
            "120",
        ],
    ];
    let Some(_hog) = hog() else { return };
    let pool = read_u64(POOL_2M);
    for args in runs {
        for sig in [libc::SIGINT, libc::SIGTERM] {
            let grown = |pid: u32| pool_grew(pool)(pid) && recorded("pool")(pid);
            signal_mid_run_after(
                args,
                sig,
                "a grown 2M pool",
                grown,
                Duration::from_millis(300),
            );
        }
    }
}

/// The next vmm (a `boot` that fails at once) restores what a SIGKILLed one
/// left and says so; returns its stderr.
fn next_vmm_restores() -> String {
    let out = Command::new(vmm_binary())
        .args(["boot", "--kernel", "/nonexistent"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn sigkill_leaves_a_record_the_next_vmm_restores() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    if !ready() {
        return;
    }
    // numa_balancing and a tracefs instance.
    let before = Host::now();
    let mut run = start(LATENCY_NUMA);
    run.wait_for("numa_balancing=1 and a tracefs instance", |pid| {
        numa_on(pid) && !instances_of(pid).is_empty() && recorded("tracefs")(pid)
    });
    assert_eq!(run.signal(libc::SIGKILL).signal(), Some(libc::SIGKILL));
    assert_eq!(read(NUMA), "1", "a SIGKILL restores nothing by itself");
    assert!(state_file(run.pid).exists());
    let t0 = Instant::now();
    let said = next_vmm_restores();
    let took = t0.elapsed();
    assert!(
        said.contains(&format!(
            "restored kernel.numa_balancing={} left by dead vmm pid {}",
            before.numa, run.pid
        )),
        "{said}"
    );
    assert!(
        said.contains(&format!("left by dead vmm pid {}", run.pid)) && said.contains("tracefs"),
        "{said}"
    );
    assert_restored(&run, &before);
    eprintln!("numa_balancing and tracefs restored by the next vmm in {took:?}");

    // watchdog_thresh.
    let other = if before.thresh == "7" { "8" } else { "7" };
    let mut run = start(&[
        "soft-lockup",
        "--plane",
        "kernel",
        "--l1",
        "1G",
        "--kinds",
        "numa-hint",
        "--watchdog-thresh",
        other,
    ]);
    run.wait_for("watchdog_thresh changed and recorded", |pid| {
        read(THRESH) == other && recorded("watchdog_thresh")(pid)
    });
    run.signal(libc::SIGKILL);
    let said = next_vmm_restores();
    assert!(
        said.contains(&format!(
            "restored kernel.watchdog_thresh={} left by dead vmm pid {}",
            before.thresh, run.pid
        )),
        "{said}"
    );
    assert_restored(&run, &before);

    // A 2M pool: lowered by what the dead run added.
    let Some(hog) = hog() else { return };
    let before = Host::now();
    let mut run = start(&[
        "bench",
        "fault-cost",
        "--mem",
        "128M",
        "--reps",
        "100000",
        "--reserve-hugepages",
    ]);
    run.wait_for("a grown 2M pool, recorded", |pid| {
        read_u64(POOL_2M) > before.pool_2m && recorded("pool")(pid)
    });
    run.signal(libc::SIGKILL);
    std::thread::sleep(Duration::from_millis(200));
    assert!(read_u64(POOL_2M) > before.pool_2m, "the pool stays grown");
    let said = next_vmm_restores();
    assert!(
        said.contains(&format!(
            "restored hugepages-2048kB/nr_hugepages={} (-",
            before.pool_2m
        )) && said.contains(&format!("left by dead vmm pid {}", run.pid)),
        "{said}"
    );
    assert_restored(&run, &before);
    drop(hog);
}

#[test]
fn two_runs_at_once_restore_numa_balancing_only_after_both() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    if !ready() {
        return;
    }
    let before = Host::now();
    let mut a = start(LATENCY_NUMA);
    a.wait_for("numa_balancing=1", numa_on);
    let mut b = start(LATENCY_NUMA);
    b.wait_for("numa_balancing recorded", recorded("numa_balancing"));
    // The first ends (a signal): the second still needs it.
    a.signal(libc::SIGINT);
    assert_eq!(read(NUMA), "1", "the first run out restored numa_balancing");
    let hold = Path::new(STATE_DIR).join("hold-proc.sys.kernel.numa_balancing");
    assert!(hold.exists());
    // This process joins with a guard of its own and leaves again (the
    // normal release path): the value stays for b.
    let g = notifier::hostconf::SysctlGuard::set("kernel.numa_balancing", "1").unwrap();
    assert_eq!(g.original(), before.numa, "the first changer's original");
    drop(g);
    assert_eq!(read(NUMA), "1", "a guard's drop restored under a live run");
    b.signal(libc::SIGTERM);
    assert_restored(&a, &before);
    assert_restored(&b, &before);
    assert!(!hold.exists());

    // The other way round: this process first, a run joins, this process
    // leaves first, the run's SIGKILL leaves it to the next vmm... while
    // this process holds a new guard: nobody restores under a holder.
    let g = notifier::hostconf::SysctlGuard::set("kernel.numa_balancing", "1").unwrap();
    let mut c = start(LATENCY_NUMA);
    c.wait_for("numa_balancing recorded", recorded("numa_balancing"));
    c.signal(libc::SIGKILL);
    let said = next_vmm_restores();
    assert!(!said.contains("numa_balancing"), "{said}");
    assert_eq!(read(NUMA), "1");
    drop(g);
    assert_eq!(read(NUMA), before.numa, "the last holder restores");
    assert_restored(&c, &before);
}

#[test]
fn two_runs_at_once_give_back_their_own_pages_only() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    if !ready() {
        return;
    }
    let Some(_hog) = hog() else { return };
    let before = Host::now();
    // A run whose RAM stays mapped (bench maps its RAM per repetition: a
    // second run could not count on the pages the first left free).
    let args = [
        "run",
        "--guest",
        "builtin",
        "--mem",
        "128M",
        "--reserve-hugepages",
        "--passes",
        "100000000",
    ];
    let mut a = start(&args);
    a.wait_for("a grown 2M pool, recorded", |pid| {
        read_u64(POOL_2M) > before.pool_2m && recorded("pool")(pid)
    });
    let after_a = read_u64(POOL_2M);
    // a has mapped all its RAM (its pages reserved: what the hog left is
    // free again): b is short by nearly all of its RAM.
    let t0 = Instant::now();
    while notifier::hostconf::free_hugepages(notifier::PageSize::Size2M) > 8
        && t0.elapsed() < Duration::from_secs(20)
    {
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut b = start(&args);
    b.wait_for("the pool grown again, recorded", |pid| {
        read_u64(POOL_2M) > after_a && recorded("pool")(pid)
    });
    let added_b = read_u64(POOL_2M) - after_a;
    // b got its RAM and runs (it did not end short of pages).
    std::thread::sleep(Duration::from_millis(300));
    b.assert_running("with its pages");
    a.assert_running("before the signal");
    a.signal(libc::SIGINT);
    assert_eq!(
        read_u64(POOL_2M),
        before.pool_2m + added_b,
        "the first run out took more than its own pages"
    );
    b.signal(libc::SIGTERM);
    assert_restored(&a, &before);
    assert_restored(&b, &before);
}
