//! `vmm host [options] -- <vmm subcommand and its args>`: run a command of
//! ours inside the emulated AMD SVM host ([`crate::machine::emulated_host`]),
//! a KVM host with the TDP MMU, nested SVM and guest user space, whose
//! kernel is the user's choice. `vmm host` exits with the inner command's
//! status and ends with its JSON line (when it printed one), to which the
//! host's own report is added as `emulated_host`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use guests::host::HostKernel;
use guests::linux::recipe::{self, KernelPin};
use guests::linux::ProvisionOptions;
use serde_json::{json, Value};

use crate::cli::{parse_size, OnOff, EXIT_ERROR};
use crate::machine::emulated_host::qemu::TcgThreads;
use crate::machine::emulated_host::{EmulatedHost, HostError, HostRun};

/// Arguments of `vmm host`.
#[derive(clap::Args, Debug, Clone)]
pub struct HostArgs {
    /// The host's kernel: debian-6.1, debian-6.12 (pinned Debian cloud
    /// kernels), or the PATH of a bzImage (with --modules).
    #[arg(long, default_value = "debian-6.1")]
    pub kernel: String,
    /// With a bzImage PATH: the directory holding its irqbypass, kvm and
    /// kvm-amd modules (.ko, .ko.xz, .ko.zst or .ko.gz; searched recursively).
    #[arg(long)]
    pub modules: Option<PathBuf>,
    /// Host RAM (e.g. 6G; a bare number is MiB). QEMU allocates it as the
    /// host touches it.
    #[arg(long, default_value = "6G", value_parser = parse_size)]
    pub mem: u64,
    /// Host vCPUs.
    #[arg(long, default_value_t = 2)]
    pub cpus: u32,
    /// How QEMU's TCG runs the host's vCPUs: multi (MTTCG, a thread each;
    /// the host kernel's text patching was seen to hang) or single (one
    /// thread takes turns; Linux guests were seen to deadlock on an
    /// interrupt delivered with IF=0).
    #[arg(long, value_enum, default_value = "multi")]
    pub tcg: TcgThreads,
    /// 2 MiB hugepages to reserve inside before the command runs (default:
    /// all of --mem but 2 GiB, for the host kernel, the initramfs and the
    /// command).
    #[arg(long)]
    pub hugepages: Option<u64>,
    /// 1 GiB hugepages, reserved by the host kernel at boot
    /// (`hugepagesz=1G hugepages=N`: at run time the host's memory is too
    /// fragmented for them).
    #[arg(long, default_value_t = 0)]
    pub hugepages_1g: u64,
    /// A sysctl applied inside before the command runs (repeatable).
    #[arg(long = "sysctl", value_name = "KEY=VALUE")]
    pub sysctls: Vec<String>,
    /// kvm_amd's nested paging (npt=0: the host KVM shadows every guest's
    /// page tables, with rmaps).
    #[arg(long, value_enum, default_value = "on")]
    pub npt: OnOff,
    /// kvm_amd's nested SVM (guests may run their own SVM guests).
    #[arg(long, value_enum, default_value = "on")]
    pub nested: OnOff,
    /// An environment variable of the inner command (repeatable).
    #[arg(long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    /// A file to carry into the host at the same path (repeatable; inner
    /// arguments naming existing files are carried without it).
    #[arg(long = "carry")]
    pub carry: Vec<PathBuf>,
    /// The command after `--` is a program (carried with its libraries),
    /// not a vmm subcommand.
    #[arg(long)]
    pub exec: bool,
    /// Appended to the host kernel's command line.
    #[arg(long)]
    pub append: Option<String>,
    /// Stop QEMU after this many seconds.
    #[arg(long, default_value_t = 1800)]
    pub timeout: u64,
    /// Stop QEMU once the host kernel reports a soft lockup of this many
    /// seconds (its watchdog, on the console); 0: never.
    #[arg(long, default_value_t = 120)]
    pub lockup_limit: u64,
    /// Keep the run directory (initramfs, console and channel logs).
    #[arg(long)]
    pub keep: bool,
    /// Do not stream the host's console to stdout.
    #[arg(long)]
    pub quiet: bool,
    /// The command: a vmm subcommand and its arguments (or, with --exec, a program).
    #[arg(last = true, required = true, value_name = "COMMAND")]
    pub command: Vec<String>,
}

/// A bad `vmm host` argument.
#[derive(Debug, thiserror::Error)]
pub enum HostArgError {
    #[error("--{what} {value:?}: expected KEY=VALUE")]
    NotKeyValue { what: &'static str, value: String },
    #[error("--cpus 0: the host needs a vCPU")]
    NoCpus,
    #[error("--mem {0} MiB: the emulated host needs at least 512 MiB")]
    TooLittleMemory(u64),
    #[error("hugepages of {pool_mib} MiB (--hugepages x 2 MiB + --hugepages-1g x 1 GiB) do not fit in --mem {mem_mib} MiB with 384 MiB for the host kernel")]
    TooManyHugepages { pool_mib: u64, mem_mib: u64 },
    #[error("--exec {0}: no such program")]
    NoProgram(String),
    #[error("cannot find the running vmm binary: {0}")]
    SelfExe(std::io::Error),
    #[error(transparent)]
    Host(#[from] HostError),
    #[error(transparent)]
    Image(#[from] guests::host::HostImageError),
    #[error("guest image: {0}")]
    Guest(#[from] guests::linux::RecipeError),
}

fn key_value(what: &'static str, s: &str) -> Result<(String, String), HostArgError> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() && !k.contains(char::is_whitespace) => {
            Ok((k.to_string(), v.to_string()))
        }
        _ => Err(HostArgError::NotKeyValue {
            what,
            value: s.to_string(),
        }),
    }
}

/// The pinned Linux guests an inner vmm command boots: every kernel it
/// names, and the default one when it boots Linux without naming a kernel
/// file (`boot`, `--guest linux`).
fn guest_kernels(argv: &[String]) -> Vec<&'static KernelPin> {
    let mut pins: Vec<&'static KernelPin> = argv
        .iter()
        .filter_map(|a| recipe::kernel_by_name(a))
        .collect();
    let boots_linux = argv.first().is_some_and(|c| c == "boot")
        || argv
            .windows(2)
            .any(|w| w[0] == "--guest" && w[1] == "linux")
        || argv.iter().any(|a| a == "--guest=linux");
    let names_kernel = argv
        .iter()
        .any(|a| a == "--kernel" || a.starts_with("--kernel="));
    if boots_linux && !names_kernel {
        pins.push(recipe::DEFAULT_KERNEL);
    }
    pins.dedup_by_key(|p| p.name);
    pins
}

/// The files a provisioned guest kernel consists of (what the cache's
/// stamp check reads).
fn guest_files(pin: &KernelPin, opts: &ProvisionOptions<'_>) -> Result<Vec<PathBuf>, HostArgError> {
    let image = guests::linux::provision_kernel(pin, opts)?;
    let stamp = image.vmlinux.with_file_name("STAMP");
    Ok(vec![image.vmlinux, image.initramfs, stamp])
}

/// The run these arguments describe.
fn plan(args: &HostArgs, opts: &ProvisionOptions<'_>) -> Result<EmulatedHost, HostArgError> {
    if args.cpus == 0 {
        return Err(HostArgError::NoCpus);
    }
    let mem_mib = args.mem >> 20;
    if mem_mib < 512 {
        return Err(HostArgError::TooLittleMemory(mem_mib));
    }
    let hugepages_2m = args.hugepages.unwrap_or(mem_mib.saturating_sub(2048) / 2);
    let pool_mib = hugepages_2m
        .saturating_mul(2)
        .saturating_add(args.hugepages_1g.saturating_mul(1024));
    if pool_mib.saturating_add(384) > mem_mib {
        return Err(HostArgError::TooManyHugepages { pool_mib, mem_mib });
    }
    let mut user_env = Vec::new();
    for e in &args.env {
        user_env.push(key_value("env", e)?);
    }
    for s in &args.sysctls {
        key_value("sysctl", s)?;
    }
    let kernel = HostKernel::parse(&args.kernel, args.modules.as_deref())?;
    let vmm = std::env::current_exe()
        .and_then(|p| p.canonicalize())
        .map_err(HostArgError::SelfExe)?;
    let cwd = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("/"));
    let mut programs = vec![vmm.clone()];
    let mut argv = args.command.clone();
    let mut files: Vec<PathBuf> = Vec::new();
    if args.exec {
        let program = Path::new(&argv[0])
            .canonicalize()
            .map_err(|_| HostArgError::NoProgram(argv[0].clone()))?;
        argv[0] = program.display().to_string();
        programs.insert(0, program);
    } else {
        for pin in guest_kernels(&argv) {
            files.extend(guest_files(pin, opts)?);
        }
        argv.insert(0, vmm.display().to_string());
    }
    // Arguments naming files here are carried at their absolute paths.
    for a in argv.iter().skip(1) {
        let value = a.split_once('=').map_or(a.as_str(), |(_, v)| v);
        let p = cwd.join(value);
        if value.len() < 4096 && p.is_file() {
            files.push(p);
        }
    }
    files.extend(args.carry.iter().map(|c| cwd.join(c)));
    let mut env = vec![
        (
            guests::linux::CACHE_ENV.to_string(),
            opts.cache_dir.display().to_string(),
        ),
        // What the tests read to know which host they run on.
        ("HVMM_HOST".to_string(), "emulated-svm".to_string()),
    ];
    env.extend(user_env);
    Ok(EmulatedHost {
        kernel,
        mem: mem_mib << 20,
        cpus: args.cpus,
        tcg: args.tcg,
        npt: args.npt == OnOff::On,
        nested: args.nested == OnOff::On,
        hugepages_2m,
        sysctls: args.sysctls.clone(),
        env,
        programs,
        files,
        argv,
        cwd,
        append: {
            let mut words: Vec<String> = Vec::new();
            if args.hugepages_1g > 0 {
                words.push(format!("hugepagesz=1G hugepages={}", args.hugepages_1g));
            }
            words.extend(args.append.clone());
            (!words.is_empty()).then(|| words.join(" "))
        },
        timeout: Duration::from_secs(args.timeout),
        lockup_limit: (args.lockup_limit > 0).then(|| Duration::from_secs(args.lockup_limit)),
        keep: args.keep,
        echo: !args.quiet,
    })
}

/// `Y`/`1` as true, `N`/`0` as false, anything else (n/a) as null.
fn flag(v: Option<&str>) -> Value {
    match v.map(str::trim) {
        Some("Y" | "y" | "1") => Value::Bool(true),
        Some("N" | "n" | "0") => Value::Bool(false),
        _ => Value::Null,
    }
}

/// The host's report, as the `emulated_host` object.
pub fn host_json(r: &HostRun) -> Value {
    let c = &r.channel;
    json!({
        "kernel": r.kernel_name,
        "tcg": r.tcg,
        "release": c.kernel,
        "tdp_mmu": flag(c.tdp_mmu.as_deref()),
        "npt": flag(c.npt.as_deref()),
        "nested": flag(c.nested.as_deref()),
        "hugepages_2m": c.hugepages,
        "hugepages_1g": c.hugepages_1g,
        "s_to_command_start": r.s_to_start,
        "uptime_at_init": c.init,
        "uptime_at_modules": c.modules,
        "uptime_at_command": c.start,
        "s_command": c.wall_s(),
        "s_qemu": r.s_qemu,
        "s_image": r.s_image,
        "image_bytes": r.image_bytes,
        "status": c.status,
        "kernel_lockups": r.lockups,
    })
}

fn host_text(r: &HostRun) -> String {
    let c = &r.channel;
    let opt = |v: Option<f64>| v.map_or("?".to_string(), |s| format!("{s:.1}"));
    format!(
        "[host] {} ({}): tdp_mmu={} npt={} nested={}, {} x 2M + {} x 1G hugepages\n\
         [host] /init at host uptime {} s; command started {} s after QEMU, ran {} s (emulated time), status {}; QEMU ran {:.1} s, image built in {:.1} s",
        c.kernel.as_deref().unwrap_or("?"),
        r.kernel_name,
        c.tdp_mmu.as_deref().unwrap_or("?"),
        c.npt.as_deref().unwrap_or("?"),
        c.nested.as_deref().unwrap_or("?"),
        c.hugepages.map_or("?".into(), |h| h.to_string()),
        c.hugepages_1g.map_or("?".into(), |h| h.to_string()),
        opt(c.init),
        opt(r.s_to_start),
        opt(c.wall_s()),
        c.status.map_or("?".into(), |s| s.to_string()),
        r.s_qemu,
        r.s_image,
    )
}

/// The last stdout line: the inner JSON object with `emulated_host` added,
/// or an object of the host's report alone.
pub fn final_json(inner: Option<&str>, host: Value) -> Value {
    match inner.and_then(|l| serde_json::from_str::<Value>(l.trim()).ok()) {
        Some(Value::Object(mut m)) => {
            m.insert("emulated_host".into(), host);
            Value::Object(m)
        }
        _ => json!({ "emulated_host": host }),
    }
}

/// `vmm host`.
pub fn main(args: HostArgs) -> ExitCode {
    let opts = ProvisionOptions::default();
    let wants_json = args.command.iter().any(|a| a == "--json");
    let outcome = plan(&args, &opts).and_then(|h| Ok(h.run(&opts)?));
    match outcome {
        Ok(r) => {
            eprintln!("{}", host_text(&r));
            for l in &r.lockups {
                eprintln!("[host] the host kernel reported: {l}");
            }
            if r.channel.status.is_some_and(|s| s > 128) {
                eprintln!(
                    "vmm host: the inner command was killed by signal {}",
                    r.channel.status.unwrap_or(0) - 128
                );
            }
            if args.keep {
                eprintln!("[host] run directory: {}", r.run_dir.display());
            }
            let host = host_json(&r);
            if wants_json
                || r.channel
                    .last_line
                    .as_deref()
                    .is_some_and(|l| l.starts_with('{'))
            {
                println!("{}", final_json(r.channel.last_line.as_deref(), host));
            }
            let status = r.channel.status.unwrap_or(i32::from(EXIT_ERROR));
            ExitCode::from(u8::try_from(status).unwrap_or(EXIT_ERROR))
        }
        Err(e) => {
            eprintln!("vmm host: {e}");
            if wants_json {
                println!(
                    "{}",
                    json!({"error": e.to_string(), "emulated_host": {"kernel": args.kernel}})
                );
            }
            ExitCode::from(EXIT_ERROR)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(s: &str) -> Vec<String> {
        s.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn guest_kernels_follow_the_inner_command() {
        let names =
            |s: &str| -> Vec<&str> { guest_kernels(&argv(s)).iter().map(|p| p.name).collect() };
        assert_eq!(names("boot --json"), ["debian-6.1"]);
        assert_eq!(names("boot --kernel debian-6.12 --json"), ["debian-6.12"]);
        assert_eq!(names("run --guest linux"), ["debian-6.1"]);
        assert_eq!(names("run --guest builtin --verify"), Vec::<&str>::new());
        assert_eq!(names("boot --kernel /x/vmlinux"), Vec::<&str>::new());
    }

    #[test]
    fn final_line_is_the_inner_report_with_the_host_added() {
        let host = json!({"tdp_mmu": true});
        let v = final_json(
            Some("{\"userland\": true, \"exit\": \"reboot\"}"),
            host.clone(),
        );
        assert_eq!(v["userland"], true);
        assert_eq!(v["exit"], "reboot");
        assert_eq!(v["emulated_host"]["tdp_mmu"], true);
        assert_eq!(
            final_json(Some("not json"), host.clone()),
            json!({"emulated_host": host})
        );
        assert_eq!(flag(Some("Y")), Value::Bool(true));
        assert_eq!(flag(Some("0")), Value::Bool(false));
        assert_eq!(flag(Some("n/a")), Value::Null);
    }

    #[test]
    fn key_values_are_checked() {
        assert_eq!(
            key_value("env", "CI=true").unwrap(),
            ("CI".into(), "true".into())
        );
        assert!(key_value("env", "CI").is_err());
        assert!(key_value("sysctl", "=1").is_err());
    }
}
