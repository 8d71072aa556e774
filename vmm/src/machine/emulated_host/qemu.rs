//! The QEMU process of the emulated host: its command line, and the
//! console (COM1 on QEMU's stdout) forwarded line by line to ours and to a
//! log.

use notifier::kmsg::KernelReport;
use std::collections::VecDeque;
use std::fs::File;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// The emulator binary.
pub const QEMU: &str = "qemu-system-x86_64";

/// What the QEMU command line is made of.
#[derive(Debug, Clone)]
pub struct QemuConfig {
    pub bzimage: PathBuf,
    pub initrd: PathBuf,
    /// The second serial port's file (`/dev/ttyS1` inside: the channel).
    pub channel: PathBuf,
    pub mem_mib: u64,
    pub cpus: u32,
    /// The host kernel's command line.
    pub append: String,
    pub tcg: TcgThreads,
}

/// How QEMU's TCG runs the vCPUs: `single`, one host thread taking turns
/// among them; `multi` (MTTCG), one host thread each. Measured here
/// (QEMU 7.2, 2 host cores, 2 vCPUs, debian-6.1 host), each has its own
/// failure, both QEMU's:
/// - `multi`: the host kernel's live text patching (`text_poke_bp()`, from
///   a tracepoint or static key flip) once waited forever for the other
///   vCPU's IPI answer (a soft lockup, 900 s and counting), once oopsed on
///   its own int3 (6.12), and one host boot of three stayed silent.
/// - `single`: a Linux guest on userfaultfd RAM deadlocked in 3 of 9 boots
///   (0 of 8 under `multi`): its vCPU spun in
///   `native_queued_spin_lock_slowpath()` on the hard-IRQ stack with the
///   lock held by the code it interrupted - an interrupt delivered while
///   the guest had IF=0 (the VMM injects none itself; KVM's in-kernel PIC
///   does, through QEMU's SVM emulation).
///
/// `multi` is the default: the boot hang ends at [`super::BOOT_LIMIT`]
/// and the soft lockup at `--lockup-limit`, both as typed errors, while
/// a guest deadlock looks like a hang of the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TcgThreads {
    Single,
    Multi,
}

impl TcgThreads {
    fn accel(self) -> &'static str {
        match self {
            TcgThreads::Single => "tcg,thread=single",
            TcgThreads::Multi => "tcg,thread=multi",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            TcgThreads::Single => "single",
            TcgThreads::Multi => "multi",
        }
    }
}

impl QemuConfig {
    /// The arguments. Measured choices (PLATFORM.md, "A second host"): TCG
    /// with the threading asked for ([`TcgThreads`]), q35, a `qemu64` CPU
    /// with SVM and nested paging (NPT) - the CPU model QEMU's SVM emulation
    /// is known to boot `kvm_amd` on - and 1 GiB pages (`pdpe1gb`: without
    /// it the host has no 1 GiB hugepage pool, and the 1G backings skip),
    /// 48 physical address bits (`phys-bits=48`: qemu64's default 40 caps
    /// the host KVM's guest physical space at 1 TiB, `kvm_mmu_max_gfn()`,
    /// and a memslot reaching past it is EINVAL; TCG takes 48); no
    /// default devices, no display, COM1 on stdio, COM2 to the channel file,
    /// and a reboot ends QEMU.
    pub fn args(&self) -> Vec<String> {
        let mut a: Vec<String> = [
            "-nodefaults",
            "-no-user-config",
            "-accel",
            self.tcg.accel(),
            "-machine",
            "q35",
            "-cpu",
            "qemu64,+svm,+npt,+pdpe1gb,phys-bits=48",
            "-display",
            "none",
            "-monitor",
            "none",
            "-serial",
            "stdio",
            "-no-reboot",
        ]
        .map(String::from)
        .to_vec();
        a.push("-serial".into());
        a.push(format!("file:{}", self.channel.display()));
        a.push("-m".into());
        a.push(format!("{}M", self.mem_mib));
        a.push("-smp".into());
        a.push(self.cpus.to_string());
        a.push("-kernel".into());
        a.push(self.bzimage.display().to_string());
        a.push("-initrd".into());
        a.push(self.initrd.display().to_string());
        a.push("-append".into());
        a.push(self.append.clone());
        a
    }

    /// Starts QEMU with stdin closed, stdout and stderr piped. QEMU gets
    /// SIGKILL when the thread that started it dies (`PR_SET_PDEATHSIG`):
    /// a killed `vmm host` never leaves an emulated host running.
    pub fn spawn(&self) -> std::io::Result<Child> {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(QEMU);
        cmd.args(self.args())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: the closure runs in the child between fork and exec and
        // only calls prctl, which is async-signal-safe; it touches no
        // memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd.spawn()
    }
}

/// True when the emulator is on `PATH`.
pub fn available() -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(QEMU).is_file()))
}

/// Forwards console lines to stdout as they come, except that a line that
/// looks like a JSON object is held until the next line of the command
/// arrives: the inner command's JSON report is its last stdout line, and
/// `vmm host` prints it once, as its own last line, with the host's report
/// added. Kernel messages (`[   15.2] reboot: Power down`) pass without
/// releasing it: only they can follow the command's last line.
#[derive(Debug, Default)]
pub struct Forward {
    held: Option<String>,
}

impl Forward {
    /// The lines to print now for a new console `line`.
    pub fn line(&mut self, line: &str) -> Vec<String> {
        if is_kernel_message(line) {
            return vec![line.to_string()];
        }
        let mut out: Vec<String> = self.held.take().into_iter().collect();
        if line.trim_start().starts_with('{') {
            self.held = Some(line.to_string());
        } else {
            out.push(line.to_string());
        }
        out
    }

    /// At the end: the held line, unless it is the inner report `json`.
    pub fn finish(self, json: Option<&str>) -> Option<String> {
        self.held.filter(|h| Some(h.trim()) != json.map(str::trim))
    }
}

/// A printk line on the console: `[ seconds.micros] text`.
fn is_kernel_message(line: &str) -> bool {
    line.strip_prefix('[')
        .and_then(|r| r.split_once(']'))
        .is_some_and(|(t, _)| {
            let t = t.trim();
            !t.is_empty() && t.bytes().all(|b| b.is_ascii_digit() || b == b'.')
        })
}

/// What the console said that the run needs while QEMU runs: its last
/// lines (for error reports) and the host kernel's own lockup detectors.
#[derive(Debug, Default)]
pub struct ConsoleWatch {
    tail: VecDeque<String>,
    /// Soft-lockup and RCU-stall lines, verbatim (the first 16).
    pub lockups: Vec<String>,
    /// The longest soft lockup reported so far (seconds) and its line.
    pub worst_soft_lockup: Option<(u64, String)>,
}

pub type Console = Arc<Mutex<ConsoleWatch>>;
const TAIL_LINES: usize = 40;
const MAX_LOCKUP_LINES: usize = 16;

impl ConsoleWatch {
    fn line(&mut self, line: &str) {
        if self.tail.len() == TAIL_LINES {
            self.tail.pop_front();
        }
        self.tail.push_back(line.to_string());
        // The console carries the inner command's output too, which may
        // quote kernel lines (`vmm soft-lockup` does): only the kernel's
        // own lines count.
        if !is_printk(line) {
            return;
        }
        let Some(report) = KernelReport::classify(line) else {
            return;
        };
        if let Some(secs) = report.soft_lockup_secs() {
            if self
                .worst_soft_lockup
                .as_ref()
                .is_none_or(|(w, _)| secs > *w)
            {
                self.worst_soft_lockup = Some((secs, line.to_string()));
            }
        }
        if self.lockups.len() < MAX_LOCKUP_LINES {
            self.lockups.push(report.line);
        }
    }

    /// The console's last lines.
    pub fn tail(&self) -> String {
        self.tail.iter().cloned().collect::<Vec<_>>().join("\n")
    }
}

/// A kernel console line: it starts with printk's `[    seconds.micros]`
/// (Debian's kernels are built with `CONFIG_PRINTK_TIME`).
fn is_printk(line: &str) -> bool {
    line.strip_prefix('[')
        .and_then(|r| r.split_once(']'))
        .is_some_and(|(t, _)| t.trim().parse::<f64>().is_ok())
}

/// Pumps QEMU's stdout: each line (without `\r`) to `log`, to our stdout
/// through [`Forward`], and to the [`ConsoleWatch`]. Ends at EOF (QEMU
/// exited); returns the forwarder to finish.
pub fn pump_console(
    out: impl Read + Send + 'static,
    log: &Path,
    echo: bool,
    watch: Console,
) -> std::io::Result<JoinHandle<Forward>> {
    let mut log = File::create(log)?;
    Ok(std::thread::spawn(move || {
        let mut fwd = Forward::default();
        let mut reader = BufReader::new(out);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            let line = String::from_utf8_lossy(&buf);
            let line = line.trim_end_matches(['\n', '\r']).to_string();
            let _ = writeln!(log, "{line}");
            if echo {
                let mut o = std::io::stdout().lock();
                for l in fwd.line(&line) {
                    // A closed stdout (`| head`) must not stop the pump.
                    let _ = writeln!(o, "{l}");
                }
                let _ = o.flush();
            }
            if let Ok(mut w) = watch.lock() {
                w.line(&line);
            }
        }
        fwd
    }))
}

/// Collects QEMU's stderr (its warnings and errors).
pub fn pump_stderr(err: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = BufReader::new(err).read_to_string(&mut s);
        s
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_are_held_until_the_next_line() {
        let mut f = Forward::default();
        assert_eq!(f.line("booting"), vec!["booting"]);
        assert!(f.line("{\"a\":1}").is_empty());
        assert_eq!(f.line("more"), vec!["{\"a\":1}", "more"]);
        assert!(f.line(" {\"b\":2}").is_empty());
        assert_eq!(
            f.line("[   15.203991] reboot: Power down"),
            vec!["[   15.203991] reboot: Power down"]
        );
        assert_eq!(f.finish(Some("{\"b\":2}")), None);
        let mut g = Forward::default();
        g.line("{\"c\":3}");
        assert_eq!(g.finish(Some("{\"d\":4}")).as_deref(), Some("{\"c\":3}"));
    }

    #[test]
    fn soft_lockups_and_rcu_stalls_are_watched() {
        let mut w = ConsoleWatch::default();
        w.line("[   82.748622] watchdog: BUG: soft lockup - CPU#1 stuck for 45s! [trace-pump:172]");
        w.line("[   58.577630] rcu: INFO: rcu_preempt self-detected stall on CPU");
        w.line("[  110.746485] watchdog: BUG: soft lockup - CPU#1 stuck for 71s! [trace-pump:172]");
        w.line("[  111.0] watchdog: BUG: soft lockup - CPU#0 stuck for 22s! [kworker/0:1:33]");
        // The inner command quoting the kernel is not the kernel.
        w.line("the kernel reported: watchdog: BUG: soft lockup - CPU#0 stuck for 99s! [vmm:104]");
        w.line("{\"kernel_reports\":[\"watchdog: BUG: soft lockup - CPU#0 stuck for 99s! [x]\"]}");
        w.line("test every_page_goes_through_the_mmu ... ok");
        assert_eq!(w.lockups.len(), 4);
        let (secs, line) = w.worst_soft_lockup.clone().unwrap();
        assert_eq!(secs, 71);
        assert!(line.contains("CPU#1 stuck for 71s"));
        assert!(w.tail().ends_with("... ok"));
    }

    #[test]
    fn command_line_has_svm_npt_and_both_serial_ports() {
        let c = QemuConfig {
            bzimage: "/k".into(),
            initrd: "/i".into(),
            channel: "/c".into(),
            mem_mib: 4096,
            cpus: 2,
            append: "console=ttyS0".into(),
            tcg: TcgThreads::Single,
        };
        let a = c.args().join(" ");
        assert!(a.contains("-accel tcg,thread=single"));
        assert!(a.contains("-cpu qemu64,+svm,+npt,+pdpe1gb,phys-bits=48"));
        assert!(a.contains("-serial stdio -no-reboot -serial file:/c"));
        assert!(a.contains("-m 4096M -smp 2 -kernel /k -initrd /i -append console=ttyS0"));
    }
}
