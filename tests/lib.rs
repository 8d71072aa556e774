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

/// A hugetlb pool grown so that `pages` pages are free; `nr_hugepages` is
/// restored on drop. `dir` is the pool's sysfs directory, e.g.
/// `/sys/kernel/mm/hugepages/hugepages-2048kB`.
pub struct HugepagePool {
    dir: String,
    before: u64,
}

fn read_sysfs_u64(p: &str) -> u64 {
    std::fs::read_to_string(p)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

impl HugepagePool {
    /// Grow the pool at `dir` until `pages` are free (not reserved).
    pub fn reserve(dir: &str, pages: u64) -> Result<Self, String> {
        let before = read_sysfs_u64(&format!("{dir}/nr_hugepages"));
        let free = read_sysfs_u64(&format!("{dir}/free_hugepages"))
            .saturating_sub(read_sysfs_u64(&format!("{dir}/resv_hugepages")));
        let g = HugepagePool {
            dir: dir.to_string(),
            before,
        };
        if free < pages {
            let want = before + pages - free;
            let _ = std::fs::write(format!("{dir}/nr_hugepages"), want.to_string());
            let got = read_sysfs_u64(&format!("{dir}/nr_hugepages"));
            if got < want {
                return Err(format!("the kernel gave {got} of {want} pages in {dir}"));
            }
        }
        Ok(g)
    }
}

impl Drop for HugepagePool {
    fn drop(&mut self) {
        let _ = std::fs::write(
            format!("{}/nr_hugepages", self.dir),
            self.before.to_string(),
        );
    }
}
