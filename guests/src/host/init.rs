//! The emulated host's `/init` and the channel it reports through.
//!
//! `/init` (busybox sh) mounts what KVM tests and the VMM use (proc, sys,
//! devtmpfs, tracefs, debugfs, hugetlbfs; /tmp and /run stay on the
//! initramfs's own tmpfs, where the carried files are), loads `irqbypass`, `kvm`
//! and `kvm-amd` (with `npt=` and `nested=`), reserves 2 MiB hugepages,
//! applies the sysctls, runs the command of `/hvmm/cmd` with its stdout on
//! the console (and in a file) and its stderr on the console, then powers
//! off. Everything the host side needs to know travels on COM2
//! (`/dev/ttyS1`, a file on the host) as lines `HVMM-HOST <key> <value>`:
//! the host kernel, the KVM module parameters, the command's start and end
//! (host uptime), its exit status and the last line of its stdout (its JSON
//! report, when it prints one).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

/// Every channel line starts with this word.
pub const CHANNEL_PREFIX: &str = "HVMM-HOST";

/// The host's modules directory in the image, and the load order.
pub const MODULES_DIR: &str = "lib/modules/hvmm";
/// Loaded in this order (kvm needs irqbypass; kvm-amd needs kvm).
pub const MODULES: [&str; 3] = ["irqbypass", "kvm", "kvm-amd"];

/// `/init`. `/hvmm/config` sets NPT, NESTED, HUGEPAGES and CWD; `/hvmm/sysctl`
/// holds one `key=value` per line; `/hvmm/cmd` is the command (a shell
/// script that exports its environment and `exec`s the program).
pub const INIT_SCRIPT: &str = r#"#!/bin/sh
/bin/busybox --install -s /bin
export PATH=/bin
# The console is a terminal, but a log streamed to the outer vmm: no bars.
export VMM_PROGRESS=0
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/shm /dev/hugepages /tmp /run
mount -t tmpfs tmpfs /dev/shm
mount -t hugetlbfs hugetlbfs /dev/hugepages
mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
ch=/dev/ttyS1
say() { echo "HVMM-HOST $*" > $ch; }
bye() { say done; sync; poweroff -f; echo o > /proc/sysrq-trigger; sleep 10; }
fail() {
  say error "$*"
  dmesg | tail -n 40 | while read -r l; do say dmesg "$l"; done
  bye
}
say init "$(cut -d' ' -f1 /proc/uptime)"
. /hvmm/config
say kernel "$(uname -r)"
for m in irqbypass kvm kvm-amd; do
  f=/lib/modules/hvmm/$m.ko
  [ -e $f ] || fail "module-missing $m"
  if [ $m = kvm-amd ]; then insmod $f npt=$NPT nested=$NESTED || fail "module-load $m"
  else insmod $f || fail "module-load $m"; fi
done
[ -e /dev/kvm ] || fail "no-dev-kvm"
say tdp_mmu "$(cat /sys/module/kvm/parameters/tdp_mmu 2>/dev/null || echo n/a)"
say npt "$(cat /sys/module/kvm_amd/parameters/npt)"
say nested "$(cat /sys/module/kvm_amd/parameters/nested)"
echo "$HUGEPAGES" > /proc/sys/vm/nr_hugepages
say hugepages "$(cat /proc/sys/vm/nr_hugepages)"
say hugepages_1g "$(cat /sys/kernel/mm/hugepages/hugepages-1048576kB/nr_hugepages 2>/dev/null || echo 0)"
say modules "$(cut -d' ' -f1 /proc/uptime)"
while read -r s; do
  [ -n "$s" ] || continue
  sysctl -w "$s" > /dev/null || fail "sysctl $s"
done < /hvmm/sysctl
cd "$CWD" 2>/dev/null || cd /
say start "$(cut -d' ' -f1 /proc/uptime)"
( while sleep 5; do say beat "$(cut -d' ' -f1 /proc/uptime)"; done ) &
beat=$!
( sh /hvmm/cmd 2> /dev/console; echo $? > /tmp/hvmm-status ) | tee /tmp/hvmm-stdout
kill $beat
say end "$(cut -d' ' -f1 /proc/uptime)"
say status "$(cat /tmp/hvmm-status)"
printf 'HVMM-HOST json %s\n' "$(tail -n 1 /tmp/hvmm-stdout)" > $ch
bye
"#;

/// What `/init` is told to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostConfig {
    /// `kvm_amd npt=`.
    pub npt: bool,
    /// `kvm_amd nested=`.
    pub nested: bool,
    /// 2 MiB hugepages to reserve before the command runs.
    pub hugepages_2m: u64,
    /// `key=value` sysctls applied before the command runs.
    pub sysctls: Vec<String>,
    /// Environment of the command.
    pub env: Vec<(String, String)>,
    /// Working directory of the command (made in the image if need be).
    pub cwd: PathBuf,
    /// The program (an absolute path in the image) and its arguments.
    pub argv: Vec<String>,
}

/// `s` quoted for sh: inside single quotes, each `'` as `'\''`.
pub fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

impl HostConfig {
    /// The files `/init` reads, as (path in the image, contents).
    pub fn files(&self) -> [(&'static str, String); 3] {
        let config = format!(
            "NPT={}\nNESTED={}\nHUGEPAGES={}\nCWD={}\n",
            u8::from(self.npt),
            u8::from(self.nested),
            self.hugepages_2m,
            sh_quote(&self.cwd.to_string_lossy())
        );
        let mut sysctl = String::new();
        for s in &self.sysctls {
            let _ = writeln!(sysctl, "{s}");
        }
        let mut cmd = String::new();
        for (k, v) in &self.env {
            let _ = writeln!(cmd, "export {k}={}", sh_quote(v));
        }
        let argv: Vec<String> = self.argv.iter().map(|a| sh_quote(a)).collect();
        let _ = writeln!(cmd, "exec {}", argv.join(" "));
        [
            ("hvmm/config", config),
            ("hvmm/sysctl", sysctl),
            ("hvmm/cmd", cmd),
        ]
    }
}

/// What the channel said, in the order `/init` says it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ChannelReport {
    /// Heartbeats while the command runs (`/init` says `beat` every 5 s of
    /// host uptime): the host's user space is being scheduled.
    pub beats: u64,
    /// `uname -r` of the host.
    pub kernel: Option<String>,
    /// `/sys/module/kvm/parameters/tdp_mmu` (Y/N, or n/a before 5.x).
    pub tdp_mmu: Option<String>,
    pub npt: Option<String>,
    pub nested: Option<String>,
    /// 2 MiB hugepages reserved (what the kernel gave).
    pub hugepages: Option<u64>,
    /// 1 GiB hugepages the host kernel reserved at boot.
    pub hugepages_1g: Option<u64>,
    /// Host uptime (s) when `/init` started.
    pub init: Option<f64>,
    /// Host uptime (s) once the modules are loaded and the hugepages reserved.
    pub modules: Option<f64>,
    /// Host uptime (s) when the command started, and when it ended.
    pub start: Option<f64>,
    pub end: Option<f64>,
    /// The command's exit status as the shell saw it (128 + n: killed by signal n).
    pub status: Option<i32>,
    /// The last line of the command's stdout.
    pub last_line: Option<String>,
    /// A setup step that failed (`module-load kvm-amd`, ...).
    pub error: Option<String>,
    /// The host's dmesg tail, sent after an error.
    pub dmesg: Vec<String>,
    /// `/init` finished (it powers off next).
    pub done: bool,
    /// Keys this reader does not know, kept for the report.
    pub other: BTreeMap<String, String>,
}

impl ChannelReport {
    /// Parses the channel's text (lines may end in `\r\n`; other lines are
    /// ignored).
    pub fn parse(text: &str) -> ChannelReport {
        let mut r = ChannelReport::default();
        for line in text.lines() {
            let line = line.trim_end_matches('\r');
            let Some(rest) = line.strip_prefix(CHANNEL_PREFIX) else {
                continue;
            };
            let rest = rest.strip_prefix(' ').unwrap_or(rest);
            let (key, value) = rest.split_once(' ').unwrap_or((rest, ""));
            let v = value.to_string();
            match key {
                "kernel" => r.kernel = Some(v),
                "tdp_mmu" => r.tdp_mmu = Some(v),
                "npt" => r.npt = Some(v),
                "nested" => r.nested = Some(v),
                "hugepages" => r.hugepages = v.trim().parse().ok(),
                "hugepages_1g" => r.hugepages_1g = v.trim().parse().ok(),
                "init" => r.init = v.trim().parse().ok(),
                "modules" => r.modules = v.trim().parse().ok(),
                "start" => r.start = v.trim().parse().ok(),
                "end" => r.end = v.trim().parse().ok(),
                "status" => r.status = v.trim().parse().ok(),
                "json" => r.last_line = Some(v),
                "error" => r.error = Some(v),
                "dmesg" => r.dmesg.push(v),
                "beat" => r.beats += 1,
                "done" => r.done = true,
                _ => {
                    r.other.insert(key.to_string(), v);
                }
            }
        }
        r
    }

    /// The command's wall time inside the host (s).
    pub fn wall_s(&self) -> Option<f64> {
        Some(self.end? - self.start?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_survives_quotes_and_spaces() {
        assert_eq!(sh_quote("a b"), "'a b'");
        assert_eq!(sh_quote("it's"), r"'it'\''s'");
    }

    #[test]
    fn config_files_carry_everything() {
        let c = HostConfig {
            npt: true,
            nested: false,
            hugepages_2m: 512,
            sysctls: vec!["vm.overcommit_memory=1".into()],
            env: vec![("CI".into(), "true".into())],
            cwd: "/work/x".into(),
            argv: vec![
                "/bin/vmm".into(),
                "boot".into(),
                "--append".into(),
                "a b".into(),
            ],
        };
        let [(_, config), (_, sysctl), (_, cmd)] = c.files();
        assert_eq!(config, "NPT=1\nNESTED=0\nHUGEPAGES=512\nCWD='/work/x'\n");
        assert_eq!(sysctl, "vm.overcommit_memory=1\n");
        assert_eq!(
            cmd,
            "export CI='true'\nexec '/bin/vmm' 'boot' '--append' 'a b'\n"
        );
    }

    #[test]
    fn channel_parses_what_init_says() {
        let text = "junk\r\nHVMM-HOST kernel 6.12.117+deb12-cloud-amd64\r\n\
            HVMM-HOST tdp_mmu Y\nHVMM-HOST npt 1\nHVMM-HOST nested 1\n\
            HVMM-HOST hugepages 1024\nHVMM-HOST start 5.12\nHVMM-HOST beat 5.2\n\
            HVMM-HOST beat 10.2\nHVMM-HOST end 9.62\n\
            HVMM-HOST status 0\nHVMM-HOST json {\"ok\": true}\r\nHVMM-HOST done\n";
        let r = ChannelReport::parse(text);
        assert_eq!(r.kernel.as_deref(), Some("6.12.117+deb12-cloud-amd64"));
        assert_eq!(r.tdp_mmu.as_deref(), Some("Y"));
        assert_eq!(r.hugepages, Some(1024));
        assert_eq!(r.beats, 2);
        assert_eq!(r.status, Some(0));
        assert_eq!(r.last_line.as_deref(), Some("{\"ok\": true}"));
        assert!((r.wall_s().unwrap() - 4.5).abs() < 1e-9);
        assert!(r.done && r.error.is_none());
        let e = ChannelReport::parse("HVMM-HOST error module-load kvm-amd\nHVMM-HOST dmesg x y\n");
        assert_eq!(e.error.as_deref(), Some("module-load kvm-amd"));
        assert_eq!(e.dmesg, vec!["x y"]);
    }

    #[test]
    fn init_script_reads_the_files_config_writes() {
        for f in ["/hvmm/config", "/hvmm/sysctl", "/hvmm/cmd", "/dev/ttyS1"] {
            assert!(INIT_SCRIPT.contains(f), "{f}");
        }
        for m in MODULES {
            assert!(INIT_SCRIPT.contains(m));
        }
        assert!(INIT_SCRIPT.contains(MODULES_DIR));
    }
}
