//! Shared helpers for the integration tests in this folder.

/// True when running under CI (`CI=true`): tests that need `/dev/kvm`,
/// hugepages or root fail loudly there instead of skipping.
pub fn in_ci() -> bool {
    std::env::var("CI")
        .map(|v| v == "true" || v == "1")
        .unwrap_or(false)
}

/// Skip (outside CI) or fail (in CI) a test whose prerequisite is missing.
/// Returns `true` when the test should go on.
pub fn require(what: &str, available: bool) -> bool {
    if available {
        return true;
    }
    if in_ci() {
        panic!("CI=true but {what} is not available: this test cannot be skipped in CI");
    }
    eprintln!("SKIP: {what} not available");
    false
}

/// `/dev/kvm` opens read-write and we are root (to reserve hugepages):
/// [`require`]d.
pub fn require_kvm_root() -> bool {
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    require("/dev/kvm", kvm) && require("root (to reserve hugepages)", root)
}

/// `mem` bytes of free 2 MiB hugepages, reserved for the caller's run
/// ([`require`]d; the pool shrinks back when the reservation drops).
pub fn require_hugepages_2m(mem: u64) -> Option<notifier::hostconf::HugepageReservation> {
    use notifier::hostmm::PageSize;
    let pool = notifier::hostconf::HugepageReservation::require(
        PageSize::Huge2M,
        mem / PageSize::Huge2M.bytes(),
    );
    if !require("free 2M hugepages for guest RAM", pool.is_ok()) {
        return None;
    }
    pool.ok()
}
