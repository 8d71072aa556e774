//! The emulated AMD SVM host (`vmm host`): QEMU's TCG emulates SVM with
//! nested paging, a Debian kernel under it loads the real `kvm_amd`, and a
//! command of ours (a `vmm` subcommand, or a test binary) runs inside - on
//! a KVM host with the TDP MMU, nested SVM and guest user space, which this
//! machine's PVM KVM has not.
//!
//! A run: provision the host's base image ([`guests::host`]), write the
//! run's overlay (the programs with their libraries, the files they read,
//! `/init`'s orders), boot QEMU, stream the console, watch the channel
//! (COM2, a file here) for the command's start, status and last line,
//! stop QEMU at the timeout.

pub mod qemu;

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use guests::host::init::{ChannelReport, HostConfig};
use guests::host::{self, HostImageError, HostKernel, Overlay, OverlayError};
use guests::linux::ProvisionOptions;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum HostError {
    #[error(
        "{} not found: install it with `apt-get install qemu-system-x86`",
        qemu::QEMU
    )]
    QemuMissing,
    #[error("emulated host image: {0}")]
    Image(#[from] HostImageError),
    #[error("emulated host image: {0}")]
    Overlay(#[from] OverlayError),
    #[error("the emulated host's kernel {kernel} has no {module} module")]
    NoKvmModule { kernel: String, module: String },
    #[error("the emulated host could not load {module}; its dmesg ends:\n{dmesg}")]
    ModuleLoad { module: String, dmesg: String },
    #[error("the emulated host failed at {step}; its dmesg ends:\n{dmesg}")]
    Setup { step: String, dmesg: String },
    #[error(
        "QEMU ended ({status}) before the host's /init finished; {stderr}console ends:\n{console}"
    )]
    QemuDied {
        status: String,
        stderr: String,
        console: String,
    },
    #[error(
        "timeout: the emulated host ran {0} s without finishing (QEMU killed; raise --timeout)"
    )]
    Timeout(u64),
    #[error(
        "the emulated host did not start the command within {secs} s of QEMU's start (it boots in 5-20 s; QEMU killed); console ends:\n{console}"
    )]
    NoBoot { secs: u64, console: String },
    #[error(
        "the emulated host stopped: no heartbeat from its /init for {secs} s while the command ran (QEMU killed); console ends:\n{console}"
    )]
    Hung { secs: u64, console: String },
    #[error(
        "the emulated host's kernel reported a CPU stuck for {secs} s (--lockup-limit {limit} s; QEMU killed): {line}\nconsole ends:\n{console}"
    )]
    Lockup {
        secs: u64,
        limit: u64,
        line: String,
        console: String,
    },
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> HostError {
    let path = path.to_path_buf();
    move |source| HostError::Io { op, path, source }
}

/// One run of a command inside the emulated host.
#[derive(Debug, Clone)]
pub struct EmulatedHost {
    pub kernel: HostKernel,
    /// Host RAM (bytes).
    pub mem: u64,
    pub cpus: u32,
    /// How QEMU runs the vCPUs.
    pub tcg: qemu::TcgThreads,
    pub npt: bool,
    pub nested: bool,
    /// 2 MiB hugepages reserved inside before the command runs.
    pub hugepages_2m: u64,
    pub sysctls: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Programs carried with their libraries (the first is `argv[0]`'s).
    pub programs: Vec<PathBuf>,
    /// Files carried as they are.
    pub files: Vec<PathBuf>,
    /// The command: `argv[0]` is an absolute path in the image.
    pub argv: Vec<String>,
    /// Working directory of the command.
    pub cwd: PathBuf,
    /// Extra host kernel command line.
    pub append: Option<String>,
    pub timeout: Duration,
    /// End the run when the host kernel reports a soft lockup this long
    /// (its own detector, on the console); None: only the timeout ends it.
    pub lockup_limit: Option<Duration>,
    /// Keep the run directory (image, console and channel logs).
    pub keep: bool,
    /// Echo the console to stdout.
    pub echo: bool,
}

/// What a run measured and what the channel said.
#[derive(Debug, Clone)]
pub struct HostRun {
    /// The kernel as named on the command line.
    pub kernel_name: String,
    pub tcg: qemu::TcgThreads,
    pub channel: ChannelReport,
    /// Seconds from QEMU's start to the command's start, seen here.
    pub s_to_start: Option<f64>,
    /// Seconds from QEMU's start to its exit.
    pub s_qemu: f64,
    /// Seconds spent building the image (base and overlay).
    pub s_image: f64,
    /// The initramfs QEMU loaded (bytes).
    pub image_bytes: u64,
    /// Where the console and channel logs are.
    pub run_dir: PathBuf,
    /// The host kernel's soft-lockup and RCU-stall reports, verbatim.
    pub lockups: Vec<String>,
}

/// The host kernel's command line: the console on COM1, errors only, a
/// panic ends QEMU (reboot, with `-no-reboot`).
pub const HOST_CMDLINE: &str = "console=ttyS0 quiet panic=-1";

/// How long the host may take from QEMU's start to the command's: it
/// boots in 5-20 s (PLATFORM.md); under multi-threaded TCG one boot was
/// seen silent for 10 minutes, which this turns into an error at once.
pub const BOOT_LIMIT: Duration = Duration::from_secs(240);

/// How long the host's `/init` may go without a heartbeat (it beats every
/// 5 s of host uptime) while the command runs: a whole emulated machine
/// was seen to stop under MTTCG, console and all, until the timeout.
pub const HEARTBEAT_LIMIT: Duration = Duration::from_secs(120);

/// How often the channel file is read while QEMU runs.
const POLL: Duration = Duration::from_millis(20);

impl EmulatedHost {
    /// Builds the image, boots it, runs the command. `Err` when the host
    /// could not run the command; a command that ran (whatever its status)
    /// is `Ok`.
    pub fn run(&self, opts: &ProvisionOptions<'_>) -> Result<HostRun, HostError> {
        if !qemu::available() {
            return Err(HostError::QemuMissing);
        }
        let t0 = Instant::now();
        let base = host::provision(&self.kernel, opts)?;
        let run_dir = run_dir();
        fs::create_dir_all(&run_dir).map_err(io_err("create", &run_dir))?;
        let initrd = run_dir.join("initrd.cpio");
        let image_bytes = self.write_image(&base.base_cpio, &initrd)?;
        let s_image = t0.elapsed().as_secs_f64();
        eprintln!(
            "[host] image {:.1} MiB in {:.1} s; booting {} under QEMU (TCG {}, SVM+NPT), {} MiB, {} vCPUs",
            image_bytes as f64 / f64::from(1u32 << 20),
            s_image,
            self.kernel.name(),
            self.tcg.name(),
            self.mem >> 20,
            self.cpus
        );
        let outcome = self.boot(&base.bzimage, &initrd, &run_dir);
        if !self.keep {
            let _ = fs::remove_file(&initrd);
        }
        let (channel, s_to_start, s_qemu, lockups) = outcome?;
        if !self.keep && channel.error.is_none() {
            let _ = fs::remove_dir_all(&run_dir);
        }
        Ok(HostRun {
            kernel_name: self.kernel.name(),
            tcg: self.tcg,
            channel,
            s_to_start,
            s_qemu,
            s_image,
            image_bytes,
            run_dir,
            lockups,
        })
    }

    /// The initramfs: the base archive, then this run's overlay.
    fn write_image(&self, base: &Path, out: &Path) -> Result<u64, HostError> {
        let mut o = Overlay::create_after(out, base)?;
        for p in &self.programs {
            o.program(p)?;
        }
        for f in &self.files {
            o.carry(f)?;
        }
        o.config(&HostConfig {
            npt: self.npt,
            nested: self.nested,
            hugepages_2m: self.hugepages_2m,
            sysctls: self.sysctls.clone(),
            env: self.env.clone(),
            cwd: self.cwd.clone(),
            argv: self.argv.clone(),
        })?;
        Ok(o.finish()?)
    }

    /// Boots QEMU and waits for it: the channel's report, the seconds to
    /// the command's start, QEMU's run time and the kernel's lockup reports.
    fn boot(
        &self,
        bzimage: &Path,
        initrd: &Path,
        run_dir: &Path,
    ) -> Result<(ChannelReport, Option<f64>, f64, Vec<String>), HostError> {
        let channel_path = run_dir.join("channel.log");
        let append = match &self.append {
            Some(a) => format!("{HOST_CMDLINE} {a}"),
            None => HOST_CMDLINE.to_string(),
        };
        let cfg = qemu::QemuConfig {
            bzimage: bzimage.to_path_buf(),
            initrd: initrd.to_path_buf(),
            channel: channel_path.clone(),
            mem_mib: self.mem >> 20,
            cpus: self.cpus,
            append,
            tcg: self.tcg,
        };
        let start = Instant::now();
        let mut child = cfg.spawn().map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                HostError::QemuMissing
            } else {
                HostError::Io {
                    op: "start",
                    path: PathBuf::from(qemu::QEMU),
                    source: e,
                }
            }
        })?;
        let watch: qemu::Console = Arc::new(Mutex::new(Default::default()));
        let console = child.stdout.take().map(|out| {
            qemu::pump_console(out, &run_dir.join("console.log"), self.echo, watch.clone())
        });
        let stderr = child.stderr.take().map(qemu::pump_stderr);
        let mut s_to_start = None;
        let mut seen = 0usize;
        let mut text = String::new();
        let mut beats = (0u64, Instant::now());
        let status = loop {
            if read_new(&channel_path, &mut seen, &mut text) {
                let report = ChannelReport::parse(&text);
                if s_to_start.is_none() && report.start.is_some() {
                    s_to_start = Some(start.elapsed().as_secs_f64());
                    beats.1 = Instant::now();
                }
                if report.beats > beats.0 {
                    beats = (report.beats, Instant::now());
                }
            }
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) => {}
                Err(e) => {
                    let _ = child.kill();
                    return Err(io_err("wait for", Path::new(qemu::QEMU))(e));
                }
            }
            let beat_age = s_to_start.map(|_| beats.1.elapsed());
            if let Some(e) = self.stop_reason(start.elapsed(), beat_age, &watch) {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
            std::thread::sleep(POLL);
        };
        let s_qemu = start.elapsed().as_secs_f64();
        read_new(&channel_path, &mut seen, &mut text);
        let channel = ChannelReport::parse(&text);
        let fwd = console.and_then(|c| c.ok()).and_then(|h| h.join().ok());
        if let Some(line) = fwd.and_then(|f| f.finish(channel.last_line.as_deref())) {
            println!("{line}");
        }
        let stderr = stderr.and_then(|h| h.join().ok()).unwrap_or_default();
        if let Some(step) = &channel.error {
            let dmesg = channel.dmesg.join("\n");
            let (what, rest) = step.split_once(' ').unwrap_or((step, ""));
            return Err(match what {
                "module-missing" => HostError::NoKvmModule {
                    kernel: channel.kernel.clone().unwrap_or_default(),
                    module: rest.to_string(),
                },
                "module-load" => HostError::ModuleLoad {
                    module: rest.to_string(),
                    dmesg,
                },
                _ => HostError::Setup {
                    step: step.clone(),
                    dmesg,
                },
            });
        }
        let (console, lockups) = watch
            .lock()
            .map(|w| (w.tail(), w.lockups.clone()))
            .unwrap_or_default();
        if channel.status.is_none() {
            let stderr = stderr.trim();
            return Err(HostError::QemuDied {
                status: status.to_string(),
                stderr: if stderr.is_empty() {
                    String::new()
                } else {
                    format!("QEMU says: {stderr}; ")
                },
                console,
            });
        }
        Ok((channel, s_to_start, s_qemu, lockups))
    }

    /// Why QEMU must be stopped now, if it must: `--timeout`; no command
    /// started by [`BOOT_LIMIT`]; no heartbeat for [`HEARTBEAT_LIMIT`]
    /// while it runs (`beat_age`: since the last beat, once it started);
    /// or a host soft lockup of [`Self::lockup_limit`] or more (a host CPU
    /// stuck that long does not come back in a useful time: under TCG one
    /// was seen stuck until the timeout, 900 s and counting).
    fn stop_reason(
        &self,
        elapsed: Duration,
        beat_age: Option<Duration>,
        watch: &qemu::Console,
    ) -> Option<HostError> {
        let console = || watch.lock().map(|w| w.tail()).unwrap_or_default();
        if elapsed > self.timeout {
            return Some(HostError::Timeout(self.timeout.as_secs()));
        }
        match beat_age {
            None if elapsed > BOOT_LIMIT => {
                return Some(HostError::NoBoot {
                    secs: BOOT_LIMIT.as_secs(),
                    console: console(),
                })
            }
            Some(age) if age > HEARTBEAT_LIMIT => {
                return Some(HostError::Hung {
                    secs: age.as_secs(),
                    console: console(),
                })
            }
            _ => {}
        }
        let limit = self.lockup_limit?;
        let w = watch.lock().ok()?;
        let (secs, line) = w.worst_soft_lockup.as_ref()?;
        (Duration::from_secs(*secs) >= limit).then(|| HostError::Lockup {
            secs: *secs,
            limit: limit.as_secs(),
            line: line.clone(),
            console: w.tail(),
        })
    }
}

/// Appends what `path` gained since `seen` bytes to `text`; true when it
/// gained anything.
fn read_new(path: &Path, seen: &mut usize, text: &mut String) -> bool {
    let Ok(mut f) = fs::File::open(path) else {
        return false;
    };
    let mut buf = Vec::new();
    if f.read_to_end(&mut buf).is_ok() && buf.len() > *seen {
        text.push_str(&String::from_utf8_lossy(&buf[*seen..]));
        *seen = buf.len();
        return true;
    }
    false
}

/// A fresh directory under `/tmp/vmm-runs` for this run's files.
fn run_dir() -> PathBuf {
    let ts = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    PathBuf::from(format!("/tmp/vmm-runs/host-{ts}-{}", std::process::id()))
}
