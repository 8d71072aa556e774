//! `vmm run`: a guest on userfaultfd-served hugetlb RAM whose every page
//! goes through the project's TDP MMU - the built-in CPL3 guest
//! ([`crate::machine::builtin::touch`]) or the Linux guest of `vmm boot`
//! ([`linux`]).

pub mod linux;

use std::process::ExitCode;

use crate::cli::{self, Guest, LinuxGuestArgs};
use crate::machine::builtin::touch::{self, TouchArgs};
use crate::memory::uffd::UffdMode;

/// Arguments of `vmm run`.
#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// The guest: the built-in CPL3 guest, or the `vmm boot` Linux guest.
    #[arg(long, value_enum, default_value = "builtin")]
    pub guest: Guest,
    #[command(flatten)]
    pub touch: TouchArgs,
    /// --guest linux: the kernel, initramfs, command line and console.
    #[command(flatten)]
    pub linux: LinuxGuestArgs,
    /// --guest linux: give up after this many seconds (a boot takes minutes here).
    #[arg(long, default_value_t = 3600)]
    pub boot_timeout: u64,
    /// Print the JSON report as the last stdout line.
    #[arg(long)]
    pub json: bool,
}

impl RunArgs {
    /// Options given that the chosen guest does not use: refused, never
    /// silently ignored.
    pub fn foreign_options(&self) -> Vec<&'static str> {
        match self.guest {
            Guest::Linux => self.touch.builtin_only_set(),
            Guest::Builtin => {
                let l = &self.linux;
                [
                    ("--kernel", l.kernel.is_some()),
                    ("--initrd", l.initrd.is_some()),
                    ("--cmdline", l.cmdline.is_some()),
                    ("--append", l.append.is_some()),
                    ("--serial-log", l.serial_log.is_some()),
                    ("--quiet", l.quiet),
                    ("--boot-timeout", self.boot_timeout != 3600),
                ]
                .into_iter()
                .filter_map(|(name, set)| set.then_some(name))
                .collect()
            }
        }
    }

    /// Defaults, for library callers.
    pub fn new(mem: u64, uffd: UffdMode) -> Self {
        RunArgs {
            guest: Guest::Builtin,
            touch: TouchArgs::new(mem, uffd),
            linux: LinuxGuestArgs::default(),
            boot_timeout: 3600,
            json: false,
        }
    }
}

/// `vmm run`.
pub fn main(args: RunArgs) -> ExitCode {
    match args.guest {
        Guest::Builtin => {
            let foreign = args.foreign_options();
            if !foreign.is_empty() {
                let e = format!(
                    "--guest builtin does not use {} (options of --guest linux)",
                    foreign.join(", ")
                );
                return cli::conclude::<touch::TouchReport, _>("vmm run", args.json, Err(e), None);
            }
            let r = touch::run(&args.touch);
            cli::conclude("vmm run", args.json, r, None)
        }
        Guest::Linux => linux::main(&args),
    }
}
