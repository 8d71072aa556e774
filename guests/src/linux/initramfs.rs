//! The guest's initramfs: a static busybox, the applet links `/init` uses,
//! the two device nodes the kernel and the shell need, and `/init` itself.
//! Kept uncompressed and minimal: the guest kernel unpacks it at emulated
//! speed.

use super::cpio::{CpioError, CpioWriter};

/// The line `/init` prints once user space runs: the VMM looks for it on the
/// serial console.
pub const INIT_MARKER: &str = "HVMM-INIT-OK";

/// The busybox applets `/init` runs (each gets a `/bin/<applet>` link).
pub const APPLETS: &[&str] = &["sh", "mount", "grep", "reboot", "sleep"];

/// A kernel command-line word that keeps the guest's user space up after
/// the marker instead of rebooting (`vmm latency --guest linux` measures
/// while the guest runs; the VMM stops it). Dotted, so the kernel does not
/// pass it to init as an argument.
pub const STAY_PARAM: &str = "hvmm.stay";

/// The initramfs layout's version: part of the recipe's stamp, so a cached
/// image built before a change is rebuilt (2: the latency probe).
pub const VERSION: u32 = 2;

/// `/init`: mount /proc and /sys, print the marker, the memory lines the
/// VMM reports, start the latency probe ([`super::probe`]) in the
/// background with [`super::probe::PROBE_PARAM`] on the command line, and reboot (the kernel command line carries `reboot=k`, so
/// the reboot is an i8042 reset the VMM sees as a clean exit) - or, with
/// [`STAY_PARAM`] on the command line, idle until the VMM stops the guest.
/// The sysrq write is a fallback should `reboot -f` return.
pub const INIT_SCRIPT: &str = "#!/bin/sh
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
echo HVMM-INIT-OK
grep -E '^(MemTotal|HugePages_[A-Za-z]+):' /proc/meminfo
if grep -qw hvmm.probe /proc/cmdline; then
  echo HVMM-PROBE-START
  /bin/hvmm-probe &
fi
if grep -qw hvmm.stay /proc/cmdline; then
  echo HVMM-STAY
  while :; do sleep 1; done
fi
reboot -f
echo b > /proc/sysrq-trigger
";

/// Builds the newc archive around `busybox` (the static binary's bytes).
/// `probe`: the latency probe's executable ([`super::probe::executable`]).
pub fn build(busybox: &[u8], probe: &[u8]) -> Result<Vec<u8>, CpioError> {
    let mut w = CpioWriter::new(Vec::with_capacity(busybox.len() + 4096));
    w.dir("dev", 0o755)?;
    w.char_dev("dev/console", 0o600, 5, 1)?;
    w.char_dev("dev/null", 0o666, 1, 3)?;
    w.dir("proc", 0o555)?;
    w.dir("sys", 0o555)?;
    w.dir("bin", 0o755)?;
    w.file("bin/busybox", 0o755, busybox)?;
    for applet in APPLETS {
        w.symlink(&format!("bin/{applet}"), "busybox")?;
    }
    w.file(super::probe::PROBE_PATH, 0o755, probe)?;
    w.file("init", 0o755, INIT_SCRIPT.as_bytes())?;
    w.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linux::cpio;

    #[test]
    fn script_prints_the_marker_and_uses_only_linked_applets() {
        assert!(INIT_SCRIPT
            .lines()
            .any(|l| l == format!("echo {INIT_MARKER}")));
        for line in INIT_SCRIPT.lines().skip(1) {
            let cmd = line.split_whitespace().next().unwrap_or("");
            // `export`, `echo`, `if`, `while` and `fi` are shell syntax or builtins.
            assert!(
                ["export", "echo", "if", "while", "fi"].contains(&cmd)
                    || APPLETS.contains(&cmd)
                    || cmd == format!("/{}", super::super::probe::PROBE_PATH),
                "{cmd} is neither a builtin nor a linked applet"
            );
        }
    }

    #[test]
    fn stay_word_is_the_one_init_looks_for() {
        assert!(INIT_SCRIPT.contains(&format!("grep -qw {STAY_PARAM} /proc/cmdline")));
        let probe = crate::linux::probe::PROBE_PARAM;
        assert!(INIT_SCRIPT.contains(&format!("grep -qw {probe} /proc/cmdline")));
    }

    #[test]
    fn image_has_init_busybox_links_and_devices() {
        let img = build(b"\x7fELF static busybox", b"\x7fELF probe").unwrap();
        let entries = cpio::parse(&img).unwrap();
        let find = |n: &str| entries.iter().find(|e| e.name == n).unwrap();
        let init = find("init");
        assert!(init.is_file() && init.mode & 0o111 != 0);
        assert_eq!(init.data, INIT_SCRIPT.as_bytes());
        assert_eq!(find("bin/busybox").data, b"\x7fELF static busybox");
        let probe = find(crate::linux::probe::PROBE_PATH);
        assert!(probe.is_file() && probe.mode & 0o111 != 0 && probe.data == b"\x7fELF probe");
        for a in APPLETS {
            let l = find(&format!("bin/{a}"));
            assert!(l.is_symlink() && l.data == b"busybox");
        }
        let console = find("dev/console");
        assert!(console.is_char_dev());
        assert_eq!((console.rdev_major, console.rdev_minor), (5, 1));
        let null = find("dev/null");
        assert_eq!((null.rdev_major, null.rdev_minor), (1, 3));
        assert!(find("proc").is_dir() && find("sys").is_dir());
    }
}
