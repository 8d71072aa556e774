//! `--emulated-hosts debian-6.1,debian-6.12`: the kernel A/B in one
//! command. Before this host's own run, the same kernel-plane arguments run
//! inside each emulated SVM host - this binary's `vmm host --kernel K
//! --cpus 1 --hugepages 0 --mem M -- soft-lockup --plane kernel ... --json`,
//! a process of its own - and each host's report (its last stdout line)
//! joins this run's plot and report as `--with` files would.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use serde_json::Value;

use super::plots::{self, PlotsError, Run};
use super::SoftLockupArgs;

/// Emulated-host RAM for an L1 of `l1` bytes: the host KVM's rmaps (8
/// bytes per 4 KiB gfn once a shadow MMU is in use: 2 GiB per TiB) over
/// 6 GiB for the host kernel, its page cache of the image, the shadow
/// pages and the populating guest's pages.
pub fn host_mem_mib(l1: u64) -> u64 {
    let rmaps = (l1 / 4096) * 8;
    6144 + rmaps.div_ceil(1 << 20)
}

/// The inner command's arguments: the kernel plane of `args`, as JSON.
fn inner_args(args: &SoftLockupArgs, l1: &str) -> Vec<String> {
    let mut a: Vec<String> = ["soft-lockup", "--plane", "kernel", "--l1", l1, "--json"]
        .map(String::from)
        .into();
    let kinds: Vec<&str> = args.kinds.iter().map(|k| k.name()).collect();
    a.extend(["--kinds".into(), kinds.join(",")]);
    a.extend(["--repeat".into(), args.repeat.to_string()]);
    a.extend(["--backing".into(), args.backing.to_string()]);
    if let Some(t) = args.watchdog_thresh {
        a.extend(["--watchdog-thresh".into(), t.to_string()]);
    }
    if let Some(p) = args.populate {
        let mode = match p {
            super::PopulateMode::Direct => "direct",
            super::PopulateMode::Nested => "nested",
        };
        a.extend(["--populate".into(), mode.into()]);
        a.extend(["--density".into(), args.density.to_string()]);
    }
    a
}

/// Runs the kernel plane of `args` inside the emulated host `kernel`; its
/// console goes to stderr, its report comes back.
pub fn run_on(kernel: &str, args: &SoftLockupArgs, l1: u64) -> Result<Run, PlotsError> {
    let err = |why: String| PlotsError::Host {
        kernel: kernel.to_string(),
        why,
    };
    let exe = std::env::current_exe().map_err(|e| err(format!("this binary: {e}")))?;
    let l1_arg = format!("{}M", l1 >> 20);
    let mut child = Command::new(exe)
        .args([
            "host",
            "--kernel",
            kernel,
            "--cpus",
            "1",
            "--hugepages",
            "0",
        ])
        .args(["--mem", &format!("{}M", host_mem_mib(l1)), "--"])
        .args(inner_args(args, &l1_arg))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| err(format!("spawning vmm host: {e}")))?;
    let mut last = None;
    if let Some(out) = child.stdout.take() {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            eprintln!("{line}");
            last = Some(line);
        }
    }
    let status = child.wait().map_err(|e| err(e.to_string()))?;
    if !status.success() {
        return Err(err(format!("vmm host ended with {status}")));
    }
    last.and_then(|l| serde_json::from_str::<Value>(&l).ok())
        .and_then(|v| plots::run_of(&v))
        .ok_or_else(|| err("no kernel-plane report as its last line".into()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        a: SoftLockupArgs,
    }

    #[test]
    fn the_inner_command_carries_the_kernel_plane_arguments() {
        let cli = Cli::try_parse_from([
            "x",
            "--plane",
            "kernel",
            "--kinds",
            "dontneed,punch-hole",
            "--populate",
            "nested",
            "--density",
            "0.001",
            "--watchdog-thresh",
            "1",
            "--backing",
            "shared-2M",
        ])
        .unwrap();
        let a = inner_args(&cli.a, "2048M").join(" ");
        assert_eq!(
            a,
            "soft-lockup --plane kernel --l1 2048M --json --kinds dontneed,punch-hole --repeat 3 --backing shared-2M --watchdog-thresh 1 --populate nested --density 0.001"
        );
        // 2 TiB: 4 GiB of rmaps over the 6 GiB base.
        assert_eq!(host_mem_mib(2 << 40), 10240);
    }
}
