//! Typed errors of the notifier crate. Each one says what the operator can do
//! about it; nothing in this crate panics on a failed syscall.

use std::io;

/// Errors of the host-side invalidation machinery.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what} needs root (CAP_SYS_ADMIN): run as root, e.g. `sudo vmm notifier-check`")]
    NotRoot { what: &'static str },

    #[error("this kernel has no {size_kib} KiB hugetlb pool ({dir} is missing): the CPU or the kernel does not offer that page size (1 GiB pages need the CPU's pdpe1gb flag and CONFIG_HUGETLBFS)")]
    NoPool { size_kib: u64, dir: String },

    #[error("tracefs is not available at {path} ({reason}): the kernel needs CONFIG_TRACING and tracefs must be mountable (`mount -t tracefs nodev /sys/kernel/tracing`)")]
    TracefsUnavailable { path: String, reason: String },

    #[error("mounting tracefs at {path} failed: {source}; mount it by hand (`mount -t tracefs nodev {path}`) or run as root")]
    TracefsMount { path: String, source: io::Error },

    #[error("tracepoint kvm:kvm_unmap_hva_range is missing ({path}): load the kvm module (`modprobe kvm`) so its events exist")]
    TracepointMissing { path: String },

    #[error("tracefs file {path}: {source}")]
    Tracefs { path: String, source: io::Error },

    #[error("cannot open a KVM VM ({reason}): the kvm tracepoint only fires for an mm with a KVM VM attached; check that /dev/kvm exists and is accessible")]
    Kvm { reason: String },

    #[error("userfaultfd refused ({source}): run as root, or allow it with `sysctl vm.unprivileged_userfaultfd=1`, and check CONFIG_USERFAULTFD")]
    UffdRefused { source: io::Error },

    #[error("userfaultfd does not offer features {missing:#x} (kernel offers {offered:#x}): a newer kernel is needed")]
    UffdFeatures { missing: u64, offered: u64 },

    #[error("{op}: range [{start:#x}, {end:#x}) is not aligned to the {align:#x}-byte page size of this hugetlb mapping: round it to whole huge pages")]
    Unaligned {
        op: &'static str,
        start: u64,
        end: u64,
        align: u64,
    },

    #[error("{op}: range [{start:#x}, {end:#x}) is not inside a region of this HostMm")]
    OutOfRegion {
        op: &'static str,
        start: u64,
        end: u64,
    },

    #[error("{op}: not supported on this region: {why}")]
    Unsupported { op: &'static str, why: &'static str },

    #[error("not enough {size_kib} KiB hugepages: need {needed}, could reserve {got}: free memory or reserve them at boot (`hugepagesz=1G hugepages=2` on the kernel command line)")]
    Hugepages {
        size_kib: u64,
        needed: u64,
        got: u64,
    },

    #[error("{op} failed: {source}")]
    Syscall { op: &'static str, source: io::Error },

    #[error("spawning thread {name} failed: {source}; the process or the system is out of threads or memory (`ulimit -u`, `kernel.threads-max`)")]
    Spawn { name: String, source: io::Error },

    #[error("sysctl {path}: {source}")]
    Sysctl { path: String, source: io::Error },

    #[error("host state record {path}: {source}; vmm records what it changes on the host under /run/hvmm (HVMM_STATE_DIR overrides) so that it can be put back: run as root on a writable /run")]
    HostState { path: String, source: io::Error },
}

impl Error {
    /// The last OS error, tagged with the syscall that produced it.
    pub(crate) fn last_os(op: &'static str) -> Self {
        Error::Syscall {
            op,
            source: io::Error::last_os_error(),
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// True when the process runs with effective uid 0.
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}
