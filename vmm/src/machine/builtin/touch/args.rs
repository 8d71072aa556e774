//! What the touch guest's run is made of: its RAM, how faults are served,
//! what invalidates it while it runs.

use std::path::PathBuf;

use guests::builtin::{Params, Pattern, LAYOUT};
use notifier::PageSize;

use crate::cli::parse_backing;
use crate::cli::{parse_ram_size, parse_size};
use crate::host::events::EventSources;
use crate::host::invalidator::InvalKind;
use crate::memory::uffd::UffdMode;
use notifier::hostmm::Backing;

/// The built-in touch guest's run: its RAM, how faults are served, what
/// invalidates it while it runs (`vmm run --guest builtin`; `vmm bench`
/// runs variants of it). Most of it applies to `--guest linux` too.
#[derive(clap::Args, Debug, Clone)]
pub struct TouchArgs {
    /// Guest RAM size (e.g. 256M, 2G; a bare number is MiB).
    #[arg(long, default_value = "2G", value_parser = parse_ram_size)]
    pub mem: u64,
    /// hugetlb page size backing guest RAM (a shared memfd): 2M or 1G.
    #[arg(long, default_value = "2M", value_parser = crate::memory::parse_hugepages)]
    pub hugepages: PageSize,
    /// Guest RAM's backing, instead of a hugetlb memfd of `--hugepages`:
    /// shared-2M, shared-1G, private-2M, private-1G, shmem (a plain memfd,
    /// 4 KiB pages; MINOR or MISSING), anon (private anonymous, 4 KiB:
    /// MISSING) or thp (anonymous with MADV_HUGEPAGE: MISSING, each 2 MiB
    /// block collapsed to a huge PMD; the MMU maps 2 MiB where the host
    /// does).
    #[arg(long, value_parser = parse_backing)]
    pub backing: Option<Backing>,
    /// As root, grow the hugetlb pool so the guest RAM fits, for this run
    /// only (nr_hugepages is lowered again at exit).
    #[arg(long)]
    pub reserve_hugepages: bool,
    /// How faults are resolved: minor (UFFDIO_CONTINUE), missing
    /// (UFFDIO_COPY), or the baselines without userfaultfd: kernel (the
    /// kernel's own hugetlb first touch), kernel-prefilled (page cache
    /// populated first).
    #[arg(long, value_enum, default_value = "minor")]
    pub uffd: UffdMode,
    /// Passes over the working set.
    #[arg(long, default_value_t = 3)]
    pub passes: u64,
    /// Working-set size (default: all RAM above the first 2 MiB).
    #[arg(long, value_parser = parse_size)]
    pub ws: Option<u64>,
    /// Bytes between touched 8-byte slots (multiple of 8).
    #[arg(long, default_value_t = 4096)]
    pub stride: u64,
    /// Visit order: seq or lcg.
    #[arg(long, default_value = "seq")]
    pub pattern: Pattern,
    /// LCG seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Host invalidation run between passes on part of the guest-facing
    /// mapping: none, protect, write-protect, discard, punch-hole, mixed.
    #[arg(long, value_enum, default_value = "none")]
    pub invalidate: InvalKind,
    /// Invalidations per pass boundary.
    #[arg(long, default_value_t = 1)]
    pub inval_per_pass: u64,
    /// After each invalidation (and at the end), check that the MMU's
    /// mapped gfns agree with PAGEMAP_SCAN of the guest-facing mapping.
    #[arg(long)]
    pub verify: bool,
    /// Fault all guest RAM in before the guest runs (only with
    /// --uffd kernel*): the no-fault baseline.
    #[arg(long)]
    pub prefault: bool,
    /// While the guest runs, discard a random run of huge pages every this
    /// many microseconds (0: off; only with --uffd minor/kernel-prefilled,
    /// where the data survives): faults race invalidations and retry.
    #[arg(long, default_value_t = 0)]
    pub race_discard_us: u64,
    /// The fault thread busy-polls the userfaultfd instead of sleeping in
    /// poll(2) (costs a CPU; removes the handler's wake-up latency).
    #[arg(long)]
    pub spin_faults: bool,
    /// Resolve faults with a CONTINUE/COPY that wakes the vCPU itself,
    /// before the MMU installs its SPTE (one ioctl instead of two).
    #[arg(long)]
    pub wake_early: bool,
    /// Pin the fault thread to this CPU.
    #[arg(long)]
    pub fault_cpu: Option<usize>,
    /// After resolving a fault, map this many following huge pages ahead
    /// (populate + SPTE) while the vCPU runs (0: off).
    #[arg(long, default_value_t = 0)]
    pub fault_around: u64,
    /// Kernel-side invalidation sources feeding the MMU while the guest
    /// runs: auto (each where available), none, or a list of uffd
    /// (REMOVE/UNMAP/REMAP messages) and trace (kvm:kvm_unmap_hva_range).
    #[arg(long, default_value = "auto")]
    pub events: EventSources,
    /// A bystander thread issues raw madvise/mprotect on guest RAM (not
    /// through the VMM's host-mm model) every this many microseconds while
    /// the guest runs, and MADV_REMOVE + mprotect(PROT_READ) at pass
    /// boundaries (0: off).
    #[arg(long, default_value_t = 0)]
    pub bystander_us: u64,
    /// Give up after this many seconds (the built-in guest).
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
    /// The KVM device.
    #[arg(long, default_value = "/dev/kvm", hide = true)]
    pub kvm_dev: PathBuf,
}

impl TouchArgs {
    /// Defaults, for library callers.
    pub fn new(mem: u64, uffd: UffdMode) -> Self {
        TouchArgs {
            mem,
            hugepages: PageSize::Size2M,
            backing: None,
            reserve_hugepages: false,
            uffd,
            passes: 3,
            ws: None,
            stride: 4096,
            pattern: Pattern::Sequential,
            seed: 1,
            invalidate: InvalKind::None,
            inval_per_pass: 1,
            verify: false,
            prefault: false,
            spin_faults: false,
            race_discard_us: 0,
            wake_early: false,
            fault_cpu: None,
            fault_around: 0,
            events: EventSources::default(),
            bystander_us: 0,
            timeout: 300,
            kvm_dev: "/dev/kvm".into(),
        }
    }

    /// The options set away from their defaults that only the built-in
    /// guest uses (`vmm run --guest linux` refuses them rather than
    /// ignoring them).
    pub fn builtin_only_set(&self) -> Vec<&'static str> {
        let d = Self::new(self.mem, self.uffd);
        [
            ("--passes", self.passes != d.passes),
            ("--ws", self.ws != d.ws),
            ("--stride", self.stride != d.stride),
            ("--pattern", self.pattern != d.pattern),
            ("--seed", self.seed != d.seed),
            ("--inval-per-pass", self.inval_per_pass != d.inval_per_pass),
            ("--verify", self.verify != d.verify),
            ("--wake-early", self.wake_early != d.wake_early),
            ("--fault-cpu", self.fault_cpu != d.fault_cpu),
            ("--fault-around", self.fault_around != d.fault_around),
            ("--events", self.events != d.events),
            ("--bystander-us", self.bystander_us != d.bystander_us),
            ("--timeout", self.timeout != d.timeout),
        ]
        .into_iter()
        .filter_map(|(name, set)| set.then_some(name))
        .collect()
    }

    /// Guest RAM's backing: `--backing`, else a shared memfd of
    /// `--hugepages`.
    pub fn backing(&self) -> Backing {
        self.backing.unwrap_or(Backing::SharedMemfd(self.hugepages))
    }

    /// The guest's params for these arguments.
    pub fn params(&self) -> Params {
        let base = LAYOUT.ws_min;
        Params {
            ws_base: base,
            ws_size: self.ws.unwrap_or(self.mem.saturating_sub(base)),
            stride: self.stride,
            passes: self.passes,
            pattern: self.pattern,
            seed: self.seed,
        }
    }
}
