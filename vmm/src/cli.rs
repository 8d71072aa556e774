//! What every subcommand shares: the one size parser, the argument groups
//! several commands flatten in (`#[command(flatten)]`), and the one way a
//! command's outcome becomes stdout, stderr and an exit code.
//!
//! Exit codes, the same for every subcommand:
//! - 0: the command ran and its verdict is success;
//! - 1 ([`EXIT_FAILED`]): it ran and its verdict is a failure (a
//!   mismatch, a wrong checksum, a stale translation, a guest that ended in
//!   an error);
//! - 2 ([`EXIT_ERROR`]): it could not run (bad input, no KVM, too few
//!   hugepages, a setup step that failed).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use mmu::YieldPolicy;

/// Exit code of a command that ran and failed its check.
pub const EXIT_FAILED: u8 = 1;
/// Exit code of a command that could not run.
pub const EXIT_ERROR: u8 = 2;

/// A size argument that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("bad size {0:?}: a number with a K, M, G or T suffix, e.g. 256M or 1G (a bare number is MiB)")]
    Bad(String),
    #[error("size {0:?} does not fit in 64 bits")]
    Overflow(String),
    #[error("guest RAM of {0:?} is no RAM: give a size such as 256M")]
    Zero(String),
}

/// `--backing` (and `vmm latency`'s configurations): a
/// [`notifier::hostmm::Backing`] name - shared-2M, shared-1G, private-2M,
/// private-1G, shared-4K, anon, thp - or `shmem`, a plain memfd
/// (shared-4K).
pub fn parse_backing(s: &str) -> Result<notifier::hostmm::Backing, String> {
    if s.trim().eq_ignore_ascii_case("shmem") {
        return Ok(notifier::hostmm::Backing::SharedMemfd(
            notifier::PageSize::Size4K,
        ));
    }
    s.parse()
}

/// A size in bytes from `256M`, `1G`, `4T`, `64K` (binary units, either
/// case); a bare number is MiB (`512` = 512 MiB) in every argument of
/// every subcommand.
pub fn parse_size(s: &str) -> Result<u64, SizeError> {
    let t = s.trim();
    let (num, shift) = match t.char_indices().last() {
        Some((i, 'k' | 'K')) => (&t[..i], 10),
        Some((i, 'm' | 'M')) => (&t[..i], 20),
        Some((i, 'g' | 'G')) => (&t[..i], 30),
        Some((i, 't' | 'T')) => (&t[..i], 40),
        _ => (t, 20),
    };
    if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) {
        return Err(SizeError::Bad(s.to_string()));
    }
    let n: u64 = num
        .parse()
        .map_err(|_| SizeError::Overflow(s.to_string()))?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| SizeError::Overflow(s.to_string()))
}

/// A guest RAM size (`--mem`): a [`parse_size`] that is not zero. Whether
/// it is whole pages of the backing is checked where the backing is known
/// ([`crate::memory::check_whole_pages`]): never rounded silently.
pub fn parse_ram_size(s: &str) -> Result<u64, SizeError> {
    match parse_size(s)? {
        0 => Err(SizeError::Zero(s.to_string())),
        n => Ok(n),
    }
}

/// The Linux guest: kernel, initramfs, command line and console (`vmm
/// boot`, and `vmm run --guest linux`).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct LinuxGuestArgs {
    /// Kernel: a file (ELF vmlinux, or bzImage in any compression: gzip, bzip2, lzma,
    /// xz, lzo, lz4, zstd), or a pinned Debian kernel by name (debian-6.1, debian-6.12),
    /// provisioned with its initramfs. Default: debian-6.1.
    #[arg(long)]
    pub kernel: Option<PathBuf>,
    /// Initramfs (newc cpio). Default: the provisioned image's.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Replace the default kernel command line.
    #[arg(long)]
    pub cmdline: Option<String>,
    /// Append to the kernel command line.
    #[arg(long)]
    pub append: Option<String>,
    /// Serial log file (default: a fresh run directory under /tmp/vmm-runs).
    #[arg(long)]
    pub serial_log: Option<PathBuf>,
    /// Do not echo the guest console to stdout.
    #[arg(long)]
    pub quiet: bool,
}

/// Which guest a command runs (`--guest` of `vmm run` and `vmm latency`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Guest {
    /// The built-in CPL3 guest (`vmm run`: passes over a working set and a
    /// checksum; `vmm latency`: the probe).
    #[default]
    Builtin,
    /// The Linux guest of `vmm boot`.
    Linux,
}

impl std::fmt::Display for Guest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Guest::Builtin => "builtin",
            Guest::Linux => "linux",
        })
    }
}

/// Yield on/off.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum OnOff {
    On,
    Off,
}

/// How a zap through the rmaps yields and how the soft-lockup watchdog
/// watches it (`vmm soft-lockup`, `vmm nested-run`).
#[derive(clap::Args, Debug, Clone, Copy, PartialEq, Eq)]
pub struct ZapArgs {
    /// Yield during the zap (on) or never (off: KVM before 6.12).
    #[arg(long = "yield", value_enum, default_value = "on")]
    pub yield_mode: OnOff,
    /// Visit every rmap head (KVM's walk) instead of the populated summary.
    #[arg(long)]
    pub blind: bool,
    /// Most rmap heads per stretch when yielding.
    #[arg(long, default_value_t = 4096)]
    pub max_units: u64,
    /// Longest stretch in time when yielding, microseconds.
    #[arg(long, default_value_t = 20)]
    pub slice_us: u64,
    /// The watchdog needs mmu_lock every this many milliseconds.
    #[arg(long, default_value_t = 1)]
    pub watchdog_ms: u64,
}

impl Default for ZapArgs {
    fn default() -> Self {
        ZapArgs {
            yield_mode: OnOff::On,
            blind: false,
            max_units: 4096,
            slice_us: 20,
            watchdog_ms: 1,
        }
    }
}

impl ZapArgs {
    /// The zap's yield policy: yield after `max_units` rmap heads or
    /// `slice_us` (on), or never (off: KVM before 6.12).
    pub fn policy(&self) -> YieldPolicy {
        match self.yield_mode {
            OnOff::On => YieldPolicy::default()
                .with_max_units(self.max_units)
                .with_slice(std::time::Duration::from_micros(self.slice_us)),
            OnOff::Off => YieldPolicy::never().with_max_units(self.max_units),
        }
    }

    /// The rmap walk: every head (`--blind`), or the populated summary.
    pub fn walk(&self) -> mmu::shadow::WalkMode {
        if self.blind {
            mmu::shadow::WalkMode::Blind
        } else {
            mmu::shadow::WalkMode::Summary
        }
    }

    /// `--max-units` and `--watchdog-ms` of 0 cannot run.
    pub fn valid(&self) -> bool {
        self.max_units > 0 && self.watchdog_ms > 0
    }
}

/// What a command's run produced, for [`conclude`].
pub trait Report {
    /// The human-readable report for stdout.
    fn text(&self) -> String;
    /// The `--json` object, printed as the last stdout line.
    fn json(&self) -> serde_json::Value;
    /// The verdict: success (exit 0) or failure ([`EXIT_FAILED`]).
    fn ok(&self) -> bool;
    /// An error the run ended with (printed on stderr before the report).
    fn error(&self) -> Option<String> {
        None
    }
}

/// Print a command's outcome and return its exit code. A report prints
/// its text (and with `json` its JSON line) and exits 0 or
/// [`EXIT_FAILED`]; an error prints `<cmd>: <error>` on stderr (and, with
/// `json` and an `error_json`, that JSON line) and exits [`EXIT_ERROR`].
/// A closed stdout (`| head`) is ignored, not a panic.
pub fn conclude<R: Report, E: std::fmt::Display>(
    cmd: &str,
    json: bool,
    outcome: Result<R, E>,
    error_json: Option<&dyn Fn(&str) -> serde_json::Value>,
) -> ExitCode {
    let mut out = String::new();
    let code = match outcome {
        Ok(r) => {
            if let Some(e) = r.error() {
                // (A closed stderr is not a panic either.)
                let _ = writeln!(std::io::stderr(), "{cmd}: {e}");
            }
            out += &r.text();
            if !out.ends_with('\n') {
                out.push('\n');
            }
            if json {
                out += &format!("{}\n", r.json());
            }
            if r.ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_FAILED)
            }
        }
        Err(e) => {
            let e = e.to_string();
            let _ = writeln!(std::io::stderr(), "{cmd}: {e}");
            if let (true, Some(j)) = (json, error_json) {
                out += &format!("{}\n", j(&e));
            }
            ExitCode::from(EXIT_ERROR)
        }
    };
    let _ = std::io::stdout().lock().write_all(out.as_bytes());
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_have_one_meaning() {
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert_eq!(parse_size("4t"), Ok(4 << 40));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size(" 512 "), Ok(512 << 20));
        for bad in ["x", "", "M", "-1G", "1.5G", "4X", "0x10M"] {
            assert!(matches!(parse_size(bad), Err(SizeError::Bad(_))), "{bad}");
        }
        assert!(matches!(
            parse_size("99999999999T"),
            Err(SizeError::Overflow(_))
        ));
        assert!(matches!(
            parse_size("99999999999999999999999"),
            Err(SizeError::Overflow(_))
        ));
    }

    #[test]
    fn guest_ram_is_never_zero() {
        for zero in ["0", "0M", "0k", " 0G"] {
            assert!(
                matches!(parse_ram_size(zero), Err(SizeError::Zero(_))),
                "{zero}"
            );
        }
        assert_eq!(parse_ram_size("1"), Ok(1 << 20));
    }

    #[test]
    fn zap_args_policy() {
        let z = ZapArgs::default();
        assert!(z.valid());
        assert_eq!(z.policy().max_units, 4096);
        let off = ZapArgs {
            yield_mode: OnOff::Off,
            ..z
        };
        assert_eq!(off.policy().mode, mmu::YieldMode::NeverYield);
        assert!(!ZapArgs { max_units: 0, ..z }.valid());
    }
}
