//! The emulated AMD SVM host's image (`vmm host`): QEMU boots a Debian
//! kernel's bzImage with an initramfs of two concatenated newc archives (the
//! kernel unpacks both, `init/initramfs.c`: `unpack_to_rootfs` runs over
//! every archive of the buffer):
//! - the **base**, cached per kernel: static busybox, the kernel's
//!   `irqbypass`, `kvm` and `kvm-amd` modules (decompressed), the host's
//!   [`init::INIT_SCRIPT`];
//! - the **overlay**, written per run ([`Overlay`]): the programs the run
//!   carries (the `vmm` binary, test binaries) with the loader and libraries
//!   they need, the files they read, each at the path it has on this
//!   machine, and `/init`'s orders ([`init::HostConfig`]).
//!
//! Cache layout: `<cache>/hosts/<release>/{vmlinuz, base.cpio, STAMP}`.

pub mod init;
mod overlay;

pub use overlay::{Overlay, OverlayError};

use std::fs;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use thiserror::Error;

use crate::linux::cpio::{CpioError, CpioWriter};
use crate::linux::recipe::{self, hex, KernelPin};
use crate::linux::{
    apt, deb, decompress, elf, io_err, write_atomic, CacheLock, ProvisionOptions, RecipeError,
};

#[derive(Debug, Error)]
pub enum HostImageError {
    #[error(transparent)]
    Recipe(#[from] RecipeError),
    #[error("{kernel} has no {module} module (looked for {looked}): the emulated host needs a kernel built with KVM and KVM_AMD as modules")]
    NoKvmModule {
        kernel: String,
        module: &'static str,
        looked: String,
    },
    #[error("module {name}: {detail}")]
    Module { name: String, detail: String },
    #[error("host image: {0}")]
    Cpio(#[from] CpioError),
    #[error("--kernel {0}: neither a kernel name ({names}) nor a bzImage file", names = recipe::KERNELS.iter().map(|k| k.name).collect::<Vec<_>>().join(", "))]
    UnknownKernel(String),
    #[error("--kernel {} is a file: give --modules DIR, the directory holding its irqbypass, kvm and kvm-amd modules", .0.display())]
    ModulesNeeded(PathBuf),
    #[error("{} is not a bzImage (no HdrS header): QEMU boots a bzImage", .0.display())]
    NotBzImage(PathBuf),
}

/// The emulated host's kernel: a pinned Debian package, or a bzImage of
/// the user's with the directory its modules are in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostKernel {
    Pinned(&'static KernelPin),
    Custom { bzimage: PathBuf, modules: PathBuf },
}

impl HostKernel {
    /// `--kernel NAME|PATH [--modules DIR]`.
    pub fn parse(kernel: &str, modules: Option<&Path>) -> Result<Self, HostImageError> {
        if let Some(pin) = recipe::kernel_by_name(kernel) {
            return Ok(HostKernel::Pinned(pin));
        }
        let path = PathBuf::from(kernel);
        if !path.is_file() {
            return Err(HostImageError::UnknownKernel(kernel.to_string()));
        }
        let modules = modules.ok_or_else(|| HostImageError::ModulesNeeded(path.clone()))?;
        Ok(HostKernel::Custom {
            bzimage: path,
            modules: modules.to_path_buf(),
        })
    }

    /// The kernel's name for reports: the pin's name or the file's path.
    pub fn name(&self) -> String {
        match self {
            HostKernel::Pinned(p) => p.name.to_string(),
            HostKernel::Custom { bzimage, .. } => bzimage.display().to_string(),
        }
    }
}

/// A provisioned host: what QEMU boots (`-kernel`) and the base archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostBase {
    pub bzimage: PathBuf,
    pub base_cpio: PathBuf,
    /// The cache directory's name: the release of a pinned kernel, or
    /// `custom-<digest>`.
    pub label: String,
}

/// Where each module sits under `lib/modules/<release>/`, without suffix.
const MODULE_PATHS: [(&str, &str); 3] = [
    ("irqbypass", "kernel/virt/lib/irqbypass"),
    ("kvm", "kernel/arch/x86/kvm/kvm"),
    ("kvm-amd", "kernel/arch/x86/kvm/kvm-amd"),
];
/// How Debian ships modules: plain, or compressed (6.12: `.ko.xz`).
const MODULE_SUFFIXES: [&str; 4] = [".ko", ".ko.xz", ".ko.zst", ".ko.gz"];

/// Bumped when the base image changes without its inputs changing.
const BUILD_REVISION: u32 = 1;

fn fingerprint(kernel_digest: &str) -> String {
    let mut h = Sha256::new();
    h.update(format!("host-rev={BUILD_REVISION}\n{kernel_digest}\n"));
    let b = recipe::BUSYBOX;
    h.update(format!("{}={} {}\n", b.name, b.version, b.sha256));
    h.update(init::INIT_SCRIPT);
    hex(&h.finalize())
}

/// Provides the host's bzImage and base archive, building them on first use.
pub fn provision(
    kernel: &HostKernel,
    opts: &ProvisionOptions<'_>,
) -> Result<HostBase, HostImageError> {
    let progress = |m: &str| {
        if let Some(p) = opts.progress {
            p(m);
        }
    };
    let cache = &opts.cache_dir;
    let debs = cache.join("debs");
    fs::create_dir_all(&debs).map_err(io_err("create", &debs))?;
    // One builder at a time: concurrent `vmm host` runs (the test suite's
    // threads) would otherwise race on the same temporary files.
    let _lock = CacheLock::acquire(&cache.join(".lock"))?;
    let (label, kernel_digest) = match kernel {
        HostKernel::Pinned(p) => (p.release.to_string(), p.package.sha256.to_string()),
        HostKernel::Custom { bzimage, modules } => {
            let d = apt::sha256_file(bzimage)?;
            let label = format!("custom-{}", &d[..16]);
            (label, format!("{d} {}", modules.display()))
        }
    };
    let out = cache.join("hosts").join(&label);
    let base = HostBase {
        bzimage: out.join("vmlinuz"),
        base_cpio: out.join("base.cpio"),
        label: label.clone(),
    };
    let stamp = fingerprint(&kernel_digest);
    if fs::read_to_string(out.join("STAMP")).is_ok_and(|s| s == stamp)
        && base.bzimage.is_file()
        && base.base_cpio.is_file()
    {
        return Ok(base);
    }
    progress(&format!(
        "building the emulated host image {label} into {}",
        out.display()
    ));
    fs::create_dir_all(&out).map_err(io_err("create", &out))?;
    let _ = fs::remove_file(out.join("STAMP"));
    let [busybox_deb] = apt::fetch(&[recipe::BUSYBOX], &debs, &|m| progress(m))?;
    let busybox = deb::read_members(&busybox_deb, &[recipe::BUSYBOX_MEMBER])?
        .pop()
        .unwrap_or_default();
    elf::check_x86_64_exec(&busybox).map_err(RecipeError::Busybox)?;
    let (vmlinuz, modules) = match kernel {
        HostKernel::Pinned(pin) => pinned_kernel(pin, &debs, &|m| progress(m))?,
        HostKernel::Custom { bzimage, modules } => custom_kernel(bzimage, modules)?,
    };
    if !crate::linux::bzimage::is_bzimage(&vmlinuz) {
        return Err(HostImageError::NotBzImage(base.bzimage.clone()));
    }
    let mut w = CpioWriter::new(Vec::with_capacity(busybox.len() + (8 << 20)));
    for d in [
        "bin", "dev", "proc", "sys", "tmp", "run", "etc", "root", "lib",
    ] {
        w.dir(d, 0o755)?;
    }
    w.dir("lib/modules", 0o755)?;
    w.dir(init::MODULES_DIR, 0o755)?;
    w.char_dev("dev/console", 0o600, 5, 1)?;
    w.char_dev("dev/null", 0o666, 1, 3)?;
    w.file("bin/busybox", 0o755, &busybox)?;
    w.symlink("bin/sh", "busybox")?;
    for (name, data) in &modules {
        w.file(&format!("{}/{name}.ko", init::MODULES_DIR), 0o644, data)?;
    }
    w.file("init", 0o755, init::INIT_SCRIPT.as_bytes())?;
    let cpio = w.finish()?;
    write_atomic(&base.bzimage, &vmlinuz)?;
    write_atomic(&base.base_cpio, &cpio)?;
    write_atomic(&out.join("STAMP"), stamp.as_bytes())?;
    progress(&format!(
        "emulated host image ready: bzImage {} KiB, base archive {} KiB",
        vmlinuz.len() >> 10,
        cpio.len() >> 10
    ));
    Ok(base)
}

type Modules = Vec<(&'static str, Vec<u8>)>;

/// The bzImage and kvm modules of a pinned Debian package.
fn pinned_kernel(
    pin: &KernelPin,
    debs: &Path,
    progress: crate::linux::Progress<'_>,
) -> Result<(Vec<u8>, Modules), HostImageError> {
    let [deb_path] = apt::fetch(&[pin.package], debs, progress)?;
    let prefix = pin.modules_member_prefix();
    let names: Vec<Vec<String>> = MODULE_PATHS
        .iter()
        .map(|(_, p)| {
            MODULE_SUFFIXES
                .iter()
                .map(|s| format!("{prefix}{p}{s}"))
                .collect()
        })
        .collect();
    let vmlinuz = [pin.vmlinuz_member()];
    let mut wanted: Vec<Vec<&str>> = vec![vmlinuz.iter().map(String::as_str).collect()];
    wanted.extend(names.iter().map(|n| n.iter().map(String::as_str).collect()));
    let wanted: Vec<&[&str]> = wanted.iter().map(Vec::as_slice).collect();
    let found = deb::read_any_of(&deb_path, &wanted).map_err(|e| match e {
        RecipeError::DebMemberMissing { member, .. } if member.contains(".ko") => {
            let module = MODULE_PATHS
                .iter()
                .find(|(_, p)| member.contains(p))
                .map_or("kvm", |(m, _)| *m);
            HostImageError::NoKvmModule {
                kernel: pin.name.to_string(),
                module,
                looked: member,
            }
        }
        e => HostImageError::Recipe(e),
    })?;
    let mut found = found.into_iter();
    let (_, vmlinuz) = found.next().unwrap_or_default();
    let mut modules = Vec::new();
    for ((name, _), (file, bytes)) in MODULE_PATHS.iter().zip(found) {
        modules.push((*name, plain_module(&file, &bytes)?));
    }
    Ok((vmlinuz, modules))
}

/// A user's bzImage, and its modules found anywhere under `dir`.
fn custom_kernel(bzimage: &Path, dir: &Path) -> Result<(Vec<u8>, Modules), HostImageError> {
    let vmlinuz = fs::read(bzimage).map_err(io_err("read", bzimage))?;
    let mut files = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for e in fs::read_dir(&d).map_err(io_err("read", &d))?.flatten() {
            let p = e.path();
            if p.is_dir() {
                todo.push(p);
            } else {
                files.push(p);
            }
        }
    }
    let mut found = Vec::new();
    for (name, _) in MODULE_PATHS {
        let file = files
            .iter()
            .find(|f| {
                let n = f
                    .file_name()
                    .map(|n| n.to_string_lossy())
                    .unwrap_or_default();
                MODULE_SUFFIXES.iter().any(|s| n == format!("{name}{s}"))
            })
            .ok_or_else(|| HostImageError::NoKvmModule {
                kernel: bzimage.display().to_string(),
                module: name,
                looked: format!(
                    "{name}{{{}}} under {}",
                    MODULE_SUFFIXES.join(","),
                    dir.display()
                ),
            })?;
        found.push((name, file));
    }
    // All three found: only then read and decompress them.
    let mut modules = Vec::new();
    for (name, file) in found {
        let bytes = fs::read(file).map_err(io_err("read", file))?;
        modules.push((name, plain_module(&file.to_string_lossy(), &bytes)?));
    }
    Ok((vmlinuz, modules))
}

/// A module as `insmod` takes it (busybox's insmod reads plain `.ko`).
fn plain_module(file: &str, bytes: &[u8]) -> Result<Vec<u8>, HostImageError> {
    decompress::module(file, bytes).map_err(|e| HostImageError::Module {
        name: file.to_string(),
        detail: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_names_and_paths() {
        assert_eq!(
            HostKernel::parse("debian-6.12", None).unwrap(),
            HostKernel::Pinned(&recipe::DEBIAN_6_12)
        );
        assert!(matches!(
            HostKernel::parse("debian-9", None),
            Err(HostImageError::UnknownKernel(_))
        ));
        let exe = std::env::current_exe().unwrap();
        let exe = exe.to_str().unwrap();
        assert!(matches!(
            HostKernel::parse(exe, None),
            Err(HostImageError::ModulesNeeded(_))
        ));
        assert!(matches!(
            HostKernel::parse(exe, Some(Path::new("/tmp"))),
            Ok(HostKernel::Custom { .. })
        ));
    }

    #[test]
    fn custom_kernel_without_kvm_amd_says_so() {
        let dir = std::env::temp_dir().join(format!("hvmm-mods-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("kvm.ko"), b"x").unwrap();
        fs::write(dir.join("irqbypass.ko"), b"x").unwrap();
        let exe = std::env::current_exe().unwrap();
        let err = custom_kernel(&exe, &dir).unwrap_err();
        let _ = fs::remove_dir_all(&dir);
        assert!(
            matches!(
                err,
                HostImageError::NoKvmModule {
                    module: "kvm-amd",
                    ..
                }
            ),
            "{err}"
        );
    }
}
