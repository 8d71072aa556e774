//! The Linux guest recipe: a pinned Debian cloud kernel (one of
//! [`recipe::KERNELS`]: `debian-6.1`, the default, or `debian-6.12`) and
//! busybox, fetched with `apt-get download`, verified by sha256, turned into
//! an uncompressed `vmlinux` and a minimal initramfs, cached.
//!
//! ```no_run
//! let image = guests::linux::provision(&Default::default())?;
//! println!("{} {}", image.vmlinux.display(), image.initramfs.display());
//! let pin = guests::linux::recipe::kernel_by_name("debian-6.12").unwrap();
//! let image = guests::linux::provision_kernel(pin, &Default::default())?;
//! # Ok::<(), guests::linux::RecipeError>(())
//! ```
//!
//! Cache layout (`<workspace>/.cache/guests/` unless `HVMM_CACHE` or
//! [`ProvisionOptions::cache_dir`] says otherwise):
//! - `debs/<pkg>_<version>_amd64.deb`: the downloaded packages;
//! - `linux/<release>/{vmlinuz,config,vmlinux,initramfs.cpio}` and `STAMP`,
//!   which records the recipe fingerprint and the artefacts' sizes: a second
//!   `provision` that finds them matching returns at once.

pub mod apt;
pub mod bytes;
pub mod bzimage;
pub mod cpio;
pub mod deb;
pub mod decompress;
pub mod dynamic;
pub mod elf;
pub mod initramfs;
pub mod lz4_legacy;
pub mod lzo;
pub mod probe;
pub mod recipe;

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::time::Instant;

use thiserror::Error;

pub use initramfs::INIT_MARKER;

/// A progress callback: one short line per long step.
pub type Progress<'a> = &'a dyn Fn(&str);

/// Environment variable that overrides the default cache directory.
pub const CACHE_ENV: &str = "HVMM_CACHE";

#[derive(Debug, Error)]
pub enum RecipeError {
    #[error("{tool} not found: the Linux guest recipe needs apt-get, apt-cache and dpkg-deb (a Debian/Ubuntu host)")]
    ToolMissing { tool: String },
    #[error("apt's package lists do not know {package}: run `apt-get update` as root (the lists are missing or older than the recipe's pin)")]
    AptListsStale { package: String },
    #[error("{package} is not downloadable even after apt-get update: the pinned version has left the configured archives; update guests/src/linux/recipe.rs")]
    PackageUnavailable { package: String },
    #[error("`{command}` failed ({status}): {stderr}")]
    CommandFailed {
        command: String,
        status: String,
        stderr: String,
    },
    #[error("sha256 mismatch for {}: expected {expected}, actual {actual}", file.display())]
    ChecksumMismatch {
        file: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("cannot read the data of {}: {detail}", deb.display())]
    Extract { deb: PathBuf, detail: String },
    #[error("{} has no member {member}", deb.display())]
    DebMemberMissing { deb: PathBuf, member: String },
    #[error("kernel image: {0}")]
    BzImage(#[from] bzimage::BzImageError),
    #[error("busybox from the package is not an x86-64 executable: {0}")]
    Busybox(elf::ElfError),
    #[error("initramfs: {0}")]
    Cpio(#[from] cpio::CpioError),
    #[error("{0}")]
    Probe(#[from] probe::ProbeElfError),
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// What the VMM boots: an uncompressed ELF kernel and a newc initramfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinuxImage {
    pub vmlinux: PathBuf,
    pub initramfs: PathBuf,
    /// The kernel release, e.g. `6.1.0-50-cloud-amd64`.
    pub kernel_version: String,
}

impl LinuxImage {
    /// The original compressed kernel (bzImage), kept next to `vmlinux`.
    pub fn bzimage(&self) -> PathBuf {
        self.vmlinux.with_file_name("vmlinuz")
    }
}

/// Where and how to provision.
pub struct ProvisionOptions<'a> {
    pub cache_dir: PathBuf,
    /// Called with one line per long step (download, extract, decompress).
    pub progress: Option<Progress<'a>>,
}

impl std::fmt::Debug for ProvisionOptions<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProvisionOptions")
            .field("cache_dir", &self.cache_dir)
            .field("progress", &self.progress.is_some())
            .finish()
    }
}

fn stderr_progress(msg: &str) {
    eprintln!("[guests] {msg}");
}

fn no_progress(_: &str) {}

/// `$HVMM_CACHE` when set and non-empty, else `<workspace>/.cache/guests`
/// (the workspace root this crate was built in).
pub fn default_cache_dir() -> PathBuf {
    match std::env::var_os(CACHE_ENV) {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => {
            let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
            manifest
                .parent()
                .unwrap_or(manifest)
                .join(".cache")
                .join("guests")
        }
    }
}

impl Default for ProvisionOptions<'_> {
    /// The default cache directory, progress lines on stderr.
    fn default() -> Self {
        ProvisionOptions {
            cache_dir: default_cache_dir(),
            progress: Some(&stderr_progress),
        }
    }
}

impl<'a> ProvisionOptions<'a> {
    /// Same as `default()` without progress output.
    pub fn quiet() -> Self {
        ProvisionOptions {
            progress: None,
            ..Default::default()
        }
    }

    pub fn with_cache_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.cache_dir = dir.into();
        self
    }
}

/// An exclusive `flock` on `<cache>/.lock` for the duration of a provision:
/// concurrent test threads and processes share one cache.
pub(crate) struct CacheLock(fs::File);

impl CacheLock {
    pub(crate) fn acquire(path: &Path) -> Result<Self, RecipeError> {
        let f = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|source| RecipeError::Io {
                op: "open",
                path: path.to_path_buf(),
                source,
            })?;
        use std::os::fd::AsRawFd;
        // SAFETY: flock on a descriptor this File owns and keeps open; no
        // memory is passed.
        let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) };
        if rc != 0 {
            return Err(RecipeError::Io {
                op: "lock",
                path: path.to_path_buf(),
                source: io::Error::last_os_error(),
            });
        }
        Ok(CacheLock(f))
    }
}

impl Drop for CacheLock {
    fn drop(&mut self) {
        use std::os::fd::AsRawFd;
        // SAFETY: as in acquire; closing the file would release it anyway.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

pub(crate) fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> RecipeError {
    let path = path.to_path_buf();
    move |source| RecipeError::Io { op, path, source }
}

/// Writes `data` to `path` through a temporary file and a rename.
pub(crate) fn write_atomic(path: &Path, data: &[u8]) -> Result<(), RecipeError> {
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, data).map_err(io_err("write", &tmp))?;
    fs::rename(&tmp, path).map_err(io_err("rename", path))
}

const STAMP: &str = "STAMP";
const STAMPED: [&str; 2] = ["vmlinux", "initramfs.cpio"];

fn stamp_text(dir: &Path, kernel: &recipe::KernelPin) -> Option<String> {
    let mut s = format!(
        "fingerprint {}\ninitramfs {}\n",
        recipe::fingerprint(kernel),
        initramfs::VERSION
    );
    for name in STAMPED {
        let len = fs::metadata(dir.join(name)).ok()?.len();
        s.push_str(&format!("{name} {len}\n"));
    }
    Some(s)
}

fn stamp_valid(dir: &Path, kernel: &recipe::KernelPin) -> bool {
    match (fs::read_to_string(dir.join(STAMP)), stamp_text(dir, kernel)) {
        (Ok(found), Some(expected)) => found == expected,
        _ => false,
    }
}

fn mib(n: usize) -> String {
    format!("{:.1} MiB", n as f64 / (1024.0 * 1024.0))
}

/// Provides the default Linux guest image ([`recipe::DEFAULT_KERNEL`]):
/// [`provision_kernel`] of it.
pub fn provision(opts: &ProvisionOptions<'_>) -> Result<LinuxImage, RecipeError> {
    provision_kernel(recipe::DEFAULT_KERNEL, opts)
}

/// Provides the Linux guest image of the pinned kernel `pin`, building it
/// on first use: download and verify its package and busybox's, extract
/// `vmlinux` from the kernel's bzImage (whatever its compression), build
/// the initramfs. Later calls find the stamped artefacts in
/// `linux/<release>/` and return at once.
pub fn provision_kernel(
    pin: &recipe::KernelPin,
    opts: &ProvisionOptions<'_>,
) -> Result<LinuxImage, RecipeError> {
    let progress: Progress<'_> = opts.progress.unwrap_or(&no_progress);
    let cache = &opts.cache_dir;
    fs::create_dir_all(cache).map_err(io_err("create", cache))?;
    let _lock = CacheLock::acquire(&cache.join(".lock"))?;
    let out = cache.join("linux").join(pin.release);
    let image = LinuxImage {
        vmlinux: out.join("vmlinux"),
        initramfs: out.join("initramfs.cpio"),
        kernel_version: pin.release.to_string(),
    };
    if stamp_valid(&out, pin) {
        return Ok(image);
    }
    let started = Instant::now();
    progress(&format!(
        "provisioning Linux guest {} ({}) into {}",
        pin.name,
        pin.release,
        out.display()
    ));
    let debs = cache.join("debs");
    fs::create_dir_all(&debs).map_err(io_err("create", &debs))?;
    fs::create_dir_all(&out).map_err(io_err("create", &out))?;
    let _ = fs::remove_file(out.join(STAMP));

    let [kernel_deb, busybox_deb] = apt::fetch(&[pin.package, recipe::BUSYBOX], &debs, progress)?;
    let fetched = started.elapsed();

    progress(&format!(
        "extracting the kernel from {}",
        kernel_deb.display()
    ));
    let (vmlinuz_m, config_m) = (pin.vmlinuz_member(), pin.config_member());
    let mut k = deb::read_members(&kernel_deb, &[&vmlinuz_m, &config_m])?.into_iter();
    let (vmlinuz, config) = (k.next().unwrap_or_default(), k.next().unwrap_or_default());

    let extracted = started.elapsed();
    let (payload_len, payload_format) = bzimage::payload(&vmlinuz)
        .map_or((0, bzimage::Compression::Unknown([0; 4])), |(_, p)| {
            (p.len(), bzimage::Compression::detect(p))
        });
    progress(&format!(
        "decompressing vmlinux from the bzImage payload ({}, {payload_format})",
        mib(payload_len)
    ));
    let vmlinux = bzimage::extract_vmlinux(&vmlinuz)?;
    let decompressed = started.elapsed();

    let busybox = deb::read_members(&busybox_deb, &[recipe::BUSYBOX_MEMBER])?
        .pop()
        .unwrap_or_default();
    elf::check_x86_64_exec(&busybox).map_err(RecipeError::Busybox)?;
    let initrd = initramfs::build(&busybox, &probe::executable()?)?;

    write_atomic(&out.join("vmlinuz"), &vmlinuz)?;
    write_atomic(&out.join("config"), &config)?;
    write_atomic(&image.vmlinux, &vmlinux.bytes)?;
    write_atomic(&image.initramfs, &initrd)?;
    let stamp = stamp_text(&out, pin).ok_or_else(|| RecipeError::Io {
        op: "stat",
        path: out.clone(),
        source: io::Error::from(io::ErrorKind::NotFound),
    })?;
    write_atomic(&out.join(STAMP), stamp.as_bytes())?;
    let done = started.elapsed();
    progress(&format!(
        "Linux guest ready in {:.2} s (fetch+verify {:.2} s, kernel extract {:.2} s, \
         decompress {:.2} s, initramfs+write {:.2} s): vmlinux {} ({} payload), initramfs {}",
        done.as_secs_f64(),
        fetched.as_secs_f64(),
        (extracted - fetched).as_secs_f64(),
        (decompressed - extracted).as_secs_f64(),
        (done - decompressed).as_secs_f64(),
        mib(vmlinux.bytes.len()),
        vmlinux.compression,
        mib(initrd.len())
    ));
    Ok(image)
}
