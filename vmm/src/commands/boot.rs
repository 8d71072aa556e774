//! `vmm boot`: boot a Linux guest (ELF vmlinux or bzImage in any compression, or a pinned kernel by name, + initrd) on
//! hugetlb guest RAM (or a plain memfd) and report the boot timeline. The
//! boot itself is the Linux machine's ([`crate::machine::linux`]).

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use notifier::hostmm::Backing;
use notifier::PageSize;

use crate::cli::{self, parse_ram_size, LinuxGuestArgs, Report};
use crate::machine::linux::{
    self, BootError, BootHooks, BootInputs, BootMemory, BootReport, LinuxBoot, Profile,
    DEFAULT_INIT_MARKER,
};
use crate::memory::{self, GuestMemorySlot, GuestRam};

/// Arguments of `vmm boot`.
#[derive(clap::Args, Debug, Clone)]
pub struct BootArgs {
    #[command(flatten)]
    pub linux: LinuxGuestArgs,
    /// Guest RAM size (e.g. 256M, 1G; a bare number is MiB).
    #[arg(long, default_value = "256M", value_parser = parse_ram_size)]
    pub mem: u64,
    /// Guest RAM backing: 2M, 1G (hugetlb memfd) or none (plain memfd).
    #[arg(long, default_value = "2M", value_parser = memory::parse_hugepages)]
    pub hugepages: PageSize,
    /// Guest RAM's backing instead of a memfd of `--hugepages`: shared-2M,
    /// shared-1G, shmem, anon or thp (private anonymous memory: the
    /// kernel's own faults, no file).
    #[arg(long, value_parser = crate::cli::parse_backing)]
    pub backing: Option<Backing>,
    /// As root, grow the hugetlb pool so the guest RAM fits, for this run
    /// only (nr_hugepages is lowered again at exit). Without it a short pool
    /// is an error that says how to reserve the pages.
    #[arg(long)]
    pub reserve_hugepages: bool,
    /// Print the JSON report as the last stdout line.
    #[arg(long)]
    pub json: bool,
    /// Give up after this many seconds (the run ends with an error).
    #[arg(long, default_value_t = 900)]
    pub timeout: u64,
    /// The line /init prints when user space runs.
    #[arg(long, default_value = DEFAULT_INIT_MARKER)]
    pub init_marker: String,
    /// Sample the guest RIP every this many milliseconds (0 = off).
    #[arg(long, default_value_t = 0)]
    pub profile_ms: u64,
    /// System.map for symbolising profile samples.
    #[arg(long)]
    pub system_map: Option<PathBuf>,
    /// The KVM device.
    #[arg(long, default_value = "/dev/kvm", hide = true)]
    pub kvm_dev: PathBuf,
}

impl BootArgs {
    /// Arguments with the defaults, for library callers.
    pub fn new(kernel: PathBuf, initrd: PathBuf) -> Self {
        let boot = LinuxBoot::new(kernel, initrd);
        BootArgs {
            linux: boot.guest,
            mem: 256 << 20,
            hugepages: PageSize::Size2M,
            backing: None,
            reserve_hugepages: false,
            json: false,
            timeout: boot.timeout.as_secs(),
            init_marker: boot.init_marker,
            profile_ms: 0,
            system_map: None,
            kvm_dev: boot.kvm_dev,
        }
    }

    /// The Linux boot these arguments describe.
    pub fn boot(&self) -> LinuxBoot {
        LinuxBoot {
            guest: self.linux.clone(),
            timeout: Duration::from_secs(self.timeout),
            init_marker: self.init_marker.clone(),
            profile: (self.profile_ms > 0).then(|| Profile {
                every: Duration::from_millis(self.profile_ms),
                system_map: self.system_map.clone(),
            }),
            kvm_dev: self.kvm_dev.clone(),
        }
    }
}

/// Boot a guest on plain hugetlb (or memfd) RAM. Setup problems are `Err`;
/// a boot that ran returns a report (whose `error` says if it ended in a
/// runtime error).
pub fn run(args: &BootArgs) -> Result<BootReport, BootError> {
    let cfg = args.boot();
    let inputs = BootInputs::prepare(&cfg)?;
    // Declared before the RAM so it is dropped after it: the pool shrinks
    // back only once the guest's pages are gone.
    let backing = args.backing.unwrap_or(Backing::SharedMemfd(args.hugepages));
    let _pool = linux::reserve_pool(
        args.reserve_hugepages && backing.is_hugetlb(),
        args.mem,
        backing.page_size(),
    )?;
    let ram = GuestRam::new(args.mem, backing)?;
    let memory = BootMemory {
        mem: ram.mem.clone(),
        slot: std::sync::Arc::new(GuestMemorySlot(ram.mem.clone())),
        size: ram.size,
        hugepages: ram.hugepages,
        staging: None,
    };
    linux::boot(&cfg, inputs, memory, BootHooks::default())
}

impl Report for BootReport {
    fn text(&self) -> String {
        format!("\n{}\nserial log: {}", self.text, self.serial_log.display())
    }
    fn json(&self) -> serde_json::Value {
        self.json.clone()
    }
    fn ok(&self) -> bool {
        self.error.is_none() && self.exit.name() != "error"
    }
    fn error(&self) -> Option<String> {
        self.error.as_ref().map(ToString::to_string)
    }
}

/// The `--json` line of a boot that could not start.
pub fn error_json(reason: &str) -> serde_json::Value {
    serde_json::json!({"init_reached": false, "userland": false, "exit": "error",
        "reason": reason, "assists": {}, "ms_to_first_run": null, "ms_to_init": null})
}

/// `vmm boot`.
pub fn main(args: BootArgs) -> ExitCode {
    cli::conclude("vmm boot", args.json, run(&args), Some(&error_json))
}
