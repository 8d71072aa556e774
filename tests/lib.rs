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
