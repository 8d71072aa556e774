//! Fault injection (`vmm::failpoint`, `HVMM_FAILPOINT`): the vCPU thread
//! or a helper thread (the userfaultfd fault thread, its event reader, the
//! tracepoint pump, the bystander) panics or fails at a chosen point. In
//! every case `vmm` stops within [`BOUND`], says which thread died and
//! why, exits non-zero and leaves the host as it found it (hugetlb pool,
//! tracefs instances). Beside them, the hangs the injection found or that
//! were reported: a stalled stdout reader, a sampling period too long for
//! the clock.

use integration_tests::{require, require_kvm_root, serial_then_reset, tiny_elf, vmm_binary};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// How long a run may take to stop after its thread died.
const BOUND: Duration = Duration::from_secs(10);

/// One vmm at a time: runs share the hugetlb pool.
static SERIAL: Mutex<()> = Mutex::new(());

fn ready() -> Option<MutexGuard<'static, ()>> {
    if !require_kvm_root() {
        return None;
    }
    let free = std::fs::read_to_string(POOL_FREE).unwrap_or_default();
    let free: u64 = free.trim().parse().unwrap_or(0);
    // 64 MiB of guest RAM, or root to grow the pool (--reserve-hugepages).
    if !require(
        "2M hugepages (or root to reserve them)",
        free >= 32 || is_root(),
    ) {
        return None;
    }
    Some(SERIAL.lock().unwrap_or_else(|e| e.into_inner()))
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

const POOL: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages";
const POOL_FREE: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages";
const INSTANCES: &str = "/sys/kernel/tracing/instances";

fn read_trimmed(p: &str) -> String {
    std::fs::read_to_string(p)
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The tracefs instances a process `pid` left behind.
fn instances_of(pid: u32) -> Vec<String> {
    let prefix = format!("notifier-{pid}-");
    std::fs::read_dir(INSTANCES)
        .map(|d| {
            d.filter_map(Result::ok)
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.starts_with(&prefix))
                .collect()
        })
        .unwrap_or_default()
}

/// A finished run: status, stderr, how long it took, its pid.
struct Ran {
    status: ExitStatus,
    stderr: String,
    took: Duration,
    pid: u32,
}

/// Wait for `child` for `limit` at most (then kill it: the test fails on
/// the time, not by hanging).
fn wait(mut child: Child, limit: Duration) -> Ran {
    let t0 = Instant::now();
    let pid = child.id();
    let mut stderr = child.stderr.take().expect("piped stderr");
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let status = loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            break st;
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            break child.wait().expect("wait");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let took = t0.elapsed();
    Ran {
        status,
        stderr: reader.join().unwrap_or_default(),
        took,
        pid,
    }
}

fn vmm(failpoint: &str, args: &[&str]) -> Command {
    let mut c = Command::new(vmm_binary());
    c.args(args)
        .env("HVMM_FAILPOINT", failpoint)
        // A backtrace makes a panic slow to unwind: the window in which
        // other threads block on the dying one (a madvise waiting for its
        // REMOVE event to be read) is wide open, as it was when found.
        .env("RUST_BACKTRACE", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    c
}

/// Run `args` with `failpoint` armed: it must stop in bounded time,
/// non-zero, naming the failpoint (and so the thread), with the host's
/// pool and tracefs as they were.
fn dies_cleanly(failpoint: &str, args: &[&str], says: &str) {
    let pool0 = read_trimmed(POOL);
    let child = vmm(failpoint, args).spawn().expect("spawn vmm");
    let r = wait(child, BOUND * 6);
    let what = format!("{failpoint}: {} after {:?}\n{}", r.status, r.took, r.stderr);
    assert!(!r.status.success(), "exit status: {what}");
    assert!(r.took < BOUND, "stopped in bounded time: {what}");
    assert!(r.stderr.contains(says), "says {says:?}: {what}");
    assert_eq!(
        read_trimmed(POOL),
        pool0,
        "nr_hugepages left changed: {what}"
    );
    assert!(
        instances_of(r.pid).is_empty(),
        "tracefs instances left: {:?}: {what}",
        instances_of(r.pid)
    );
}

/// The built-in guest on MINOR-served RAM with every helper thread running:
/// invalidations between passes, userfaultfd events and the tracepoint,
/// a bystander racing discards and mprotects.
const BUILTIN: &[&str] = &[
    "run",
    "--guest",
    "builtin",
    "--mem",
    "64M",
    "--reserve-hugepages",
    "--uffd",
    "minor",
    "--passes",
    "20",
    "--invalidate",
    "discard",
    "--events",
    "uffd,trace",
    "--bystander-us",
    "200",
];

#[test]
fn every_thread_that_dies_stops_the_builtin_run() {
    let Some(_g) = ready() else { return };
    let tracefs = Path::new(INSTANCES).is_dir();
    if !require("tracefs (the tracepoint pump)", tracefs) {
        return;
    }
    for (fp, says) in [
        // The vCPU runs on the main thread here: a panic is the process's.
        ("vcpu=panic@3", "failpoint vcpu: injected panic"),
        ("vcpu=error@3", "failpoint vcpu: injected error"),
        (
            "uffd-fault=panic@5",
            "the uffd-fault thread panicked: failpoint uffd-fault",
        ),
        ("uffd-fault=error@5", "failpoint uffd-fault: injected error"),
        // The event reader dies holding a REMOVE whose madvise waits for
        // it (the bystander's or the invalidator's).
        (
            "uffd-event=panic@2",
            "the uffd-fault thread panicked: failpoint uffd-event",
        ),
        ("uffd-event=error@2", "failpoint uffd-event: injected error"),
        (
            "trace-pump=panic@3",
            "the trace-pump thread panicked: failpoint trace-pump",
        ),
        ("trace-pump=error@3", "failpoint trace-pump: injected error"),
        (
            "bystander=panic@2",
            "the bystander thread panicked: failpoint bystander",
        ),
        ("bystander=error@2", "failpoint bystander: injected error"),
    ] {
        dies_cleanly(fp, BUILTIN, says);
    }
}

#[test]
fn a_failpoint_that_does_not_parse_is_refused() {
    let child = vmm("vcpu=hang", BUILTIN).spawn().expect("spawn");
    let r = wait(child, BOUND);
    assert_eq!(r.status.code(), Some(2), "{}", r.stderr);
    assert!(r.stderr.contains("HVMM_FAILPOINT"), "{}", r.stderr);
}

fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vmm-fault-injection-{}", std::process::id()));
    std::fs::create_dir_all(&d).expect("scratch dir");
    d.join(name)
}

/// A crafted kernel that prints `msg` and resets, and an empty initramfs.
fn crafted(msg: &str) -> (PathBuf, PathBuf) {
    let k = scratch(&format!("kernel-{}", msg.len()));
    std::fs::write(&k, tiny_elf(&serial_then_reset(msg), 0)).expect("kernel");
    let i = scratch("initrd");
    std::fs::write(&i, integration_tests::empty_initrd()).expect("initrd");
    (k, i)
}

fn linux_args<'a>(cmd: &'a [&'a str], k: &'a Path, i: &'a Path, log: &'a Path) -> Vec<&'a str> {
    let mut a = cmd.to_vec();
    a.extend([
        "--kernel",
        k.to_str().unwrap_or_default(),
        "--initrd",
        i.to_str().unwrap_or_default(),
        "--serial-log",
        log.to_str().unwrap_or_default(),
        "--mem",
        "32M",
        "--reserve-hugepages",
    ]);
    a
}

/// The Linux machine's vCPU runs on its own thread: the event loop must
/// notice its death (it never writes the exit event), and `vmm run --guest
/// linux` must stop the boot when its fault thread dies.
#[test]
fn a_dead_vcpu_or_fault_thread_ends_the_linux_boot() {
    let Some(_g) = ready() else { return };
    let (k, i) = crafted("hello\n");
    let log = scratch("serial.log");
    let boot = linux_args(&["boot", "--quiet"], &k, &i, &log);
    dies_cleanly(
        "vcpu=panic@1",
        &boot,
        "the vcpu0 thread panicked: failpoint vcpu",
    );
    dies_cleanly("vcpu=error@1", &boot, "failpoint vcpu: injected error");
    let run = linux_args(&["run", "--guest", "linux", "--quiet"], &k, &i, &log);
    dies_cleanly(
        "uffd-fault=panic@1",
        &run,
        "the uffd-fault thread panicked: failpoint uffd-fault",
    );
    dies_cleanly(
        "uffd-fault=error@1",
        &run,
        "failpoint uffd-fault: injected error",
    );
}

/// `vmm latency`: a configuration whose fault thread dies is a failure of
/// the run (exit non-zero, the thread's own error), not a skip.
#[test]
fn a_dead_fault_thread_fails_the_latency_run() {
    let Some(_g) = ready() else { return };
    dies_cleanly(
        "uffd-fault=panic@3",
        &[
            "latency",
            "--configs",
            "shared-2M",
            "--mem",
            "64M",
            "--quick",
        ],
        "the uffd-fault thread panicked: failpoint uffd-fault",
    );
}

/// The guest's console goes to stdout; a reader that stops reading must
/// not stop the guest: the vCPU thread writes with the serial lock held,
/// so the echo is queued for a console thread and dropped when the queue
/// is full (the log keeps every byte). Before, the vCPU blocked in
/// `write` and neither the timeout nor SIGINT could end the run.
#[test]
fn a_stalled_stdout_does_not_stop_the_guest() {
    let Some(_g) = ready() else { return };
    // Far more than a pipe (64 KiB) and the console queue hold.
    let msg = "x".repeat(63) + "\n";
    let msg = msg.repeat(4096);
    let (k, i) = crafted(&msg);
    let log = scratch("serial-stalled.log");
    let args = linux_args(&["boot", "--timeout", "60"], &k, &i, &log);
    let mut child = Command::new(vmm_binary())
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vmm");
    // Nobody reads stdout until the guest has printed everything.
    let t0 = Instant::now();
    let full = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0) >= msg.len() as u64;
    while !full(&log) && t0.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let printed = std::fs::metadata(&log).map(|m| m.len()).unwrap_or(0);
    let mut stdout = child.stdout.take().expect("piped stdout");
    let drain = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let r = wait(child, Duration::from_secs(30));
    let out = drain.join().unwrap_or_default();
    assert_eq!(
        printed,
        msg.len() as u64,
        "the guest printed all while stdout was not read (took {:?}): {}",
        t0.elapsed(),
        r.stderr
    );
    assert!(r.status.success(), "{}: {}", r.status, r.stderr);
    assert!(
        out.contains("bytes not echoed to stdout"),
        "the report says so: {}",
        &out[out.len().saturating_sub(2000)..]
    );
}

/// `--profile-ms` and `--timeout` as large as they parse: a deadline or
/// sampling instant past the clock's range is "never", not an overflow
/// panic in the kicker thread.
#[test]
fn periods_too_long_for_the_clock_mean_never() {
    let Some(_g) = ready() else { return };
    let (k, i) = crafted("hello\n");
    let log = scratch("serial-long.log");
    let max = u64::MAX.to_string();
    let mut args = linux_args(&["boot", "--quiet", "--profile-ms"], &k, &i, &log);
    args.insert(3, &max);
    args.extend(["--timeout", &max]);
    let child = vmm("", &args).spawn().expect("spawn vmm");
    let r = wait(child, Duration::from_secs(60));
    assert!(r.status.success(), "{}: {}", r.status, r.stderr);
    let builtin = vmm(
        "",
        &[
            "run",
            "--guest",
            "builtin",
            "--mem",
            "64M",
            "--reserve-hugepages",
            "--timeout",
            &max,
        ],
    )
    .spawn()
    .expect("spawn vmm");
    let r = wait(builtin, Duration::from_secs(60));
    assert!(r.status.success(), "{}: {}", r.status, r.stderr);
}

/// `vmm soak` (a command, not a timed test: this runs it briefly): no
/// lost guest writes, no MMU-vs-PAGEMAP_SCAN disagreement, fds and threads
/// back to their start values, in runs of every rotation.
#[test]
fn a_short_soak_loses_nothing_and_leaks_nothing() {
    let Some(_g) = ready() else { return };
    let out = Command::new(vmm_binary())
        .args([
            "soak",
            "--seconds",
            "8",
            "--mem",
            "64M",
            "--passes",
            "10",
            "--reserve-hugepages",
            "--json",
        ])
        .stdin(Stdio::null())
        .output()
        .expect("vmm soak");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}: {stdout}\n{stderr}", out.status);
    let j: serde_json::Value = stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .expect("a JSON report line");
    assert!(
        j["runs"].as_u64().unwrap_or(0) >= 3,
        "every rotation ran: {j}"
    );
    assert_eq!(j["lost_write_runs"], 0, "{j}");
    assert_eq!(j["disagreements"], 0, "{j}");
    assert!(j["verify_checks"].as_u64().unwrap_or(0) > 0, "{j}");
    assert!(j["race_invalidations"].as_u64().unwrap_or(0) > 0, "{j}");
    assert!(j["bystander_ops"].as_u64().unwrap_or(0) > 0, "{j}");
    assert_eq!(j["end"]["fds"], j["start"]["fds"], "{j}");
    assert_eq!(j["end"]["threads"], j["start"]["threads"], "{j}");
}
