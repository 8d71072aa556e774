//! The per-run archive of the emulated host's initramfs: files carried from
//! this machine at the paths they have here (so a binary finds the paths
//! compiled into it: a test's `CARGO_BIN_EXE_vmm`, the guest cache), each
//! program with its loader and libraries, and `/init`'s orders.

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io::{self, BufWriter};
use std::os::unix::fs::PermissionsExt;
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use thiserror::Error;

use super::init::HostConfig;
use crate::linux::cpio::{CpioError, CpioWriter};
use crate::linux::dynamic::{self, DynamicError};

#[derive(Debug, Error)]
pub enum OverlayError {
    #[error("cannot {op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{} is not an absolute, normal path: the host image carries files at the path they have here", .0.display())]
    BadPath(PathBuf),
    #[error("{0}")]
    Cpio(#[from] CpioError),
    #[error("libraries of {}: {source}", program.display())]
    Libraries {
        program: PathBuf,
        #[source]
        source: DynamicError,
    },
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> OverlayError {
    let path = path.to_path_buf();
    move |source| OverlayError::Io { op, path, source }
}

/// A newc archive being written to a file, with the parents of every entry.
pub struct Overlay {
    w: CpioWriter<BufWriter<File>>,
    path: PathBuf,
    dirs: BTreeSet<PathBuf>,
    files: BTreeSet<PathBuf>,
    /// Bytes of file data carried.
    pub carried_bytes: u64,
    /// Strip debug sections from carried programs (`objcopy --strip-debug`,
    /// when binutils is installed): the image then shrinks several times.
    pub strip: bool,
}

/// The image path of `path`: relative, normal (no `..`), not empty.
fn image_path(path: &Path) -> Result<PathBuf, OverlayError> {
    let bad = || OverlayError::BadPath(path.to_path_buf());
    if !path.is_absolute() {
        return Err(bad());
    }
    let mut rel = PathBuf::new();
    for c in path.components() {
        match c {
            Component::RootDir => {}
            Component::Normal(n) => rel.push(n),
            _ => return Err(bad()),
        }
    }
    if rel.as_os_str().is_empty() {
        return Err(bad());
    }
    Ok(rel)
}

impl Overlay {
    /// Starts the archive at `path`.
    pub fn create(path: &Path) -> Result<Self, OverlayError> {
        let f = File::create(path).map_err(io_err("create", path))?;
        Ok(Overlay {
            w: CpioWriter::new(BufWriter::with_capacity(1 << 20, f)),
            path: path.to_path_buf(),
            dirs: BTreeSet::new(),
            files: BTreeSet::new(),
            carried_bytes: 0,
            strip: true,
        })
    }

    /// Starts the archive at `path` after a copy of the archive `base` (the
    /// kernel unpacks concatenated archives; zero padding between them is
    /// allowed and keeps this one 4-byte aligned, as newc needs).
    pub fn create_after(path: &Path, base: &Path) -> Result<Self, OverlayError> {
        use std::io::Write;
        let mut o = Self::create(path)?;
        let mut b = File::open(base).map_err(io_err("open", base))?;
        let n = io::copy(&mut b, o.w.sink()).map_err(io_err("copy", base))?;
        let pad = [0u8; 3];
        let pad = &pad[..usize::try_from((4 - n % 4) % 4).unwrap_or(0)];
        o.w.sink().write_all(pad).map_err(io_err("write", path))?;
        Ok(o)
    }

    /// Makes `dir` (relative) and its parents, once each.
    fn mkdirs(&mut self, dir: &Path) -> Result<(), OverlayError> {
        let mut cur = PathBuf::new();
        for c in dir.components() {
            cur.push(c);
            if self.dirs.insert(cur.clone()) {
                self.w.dir(&cur.to_string_lossy(), 0o755)?;
            }
        }
        Ok(())
    }

    /// A directory at absolute `path` (and its parents).
    pub fn dir(&mut self, path: &Path) -> Result<(), OverlayError> {
        let rel = image_path(path)?;
        self.mkdirs(&rel)
    }

    /// `data` as the file at absolute `path`; a path given twice keeps the first.
    pub fn bytes(&mut self, path: &Path, mode: u32, data: &[u8]) -> Result<(), OverlayError> {
        let rel = image_path(path)?;
        if !self.files.insert(rel.clone()) {
            return Ok(());
        }
        if let Some(parent) = rel.parent() {
            self.mkdirs(parent)?;
        }
        self.carried_bytes += data.len() as u64;
        self.w.file(&rel.to_string_lossy(), mode, data)?;
        Ok(())
    }

    /// This machine's file `path`, at the same path (its contents: a
    /// symlink is followed).
    pub fn file(&mut self, path: &Path) -> Result<(), OverlayError> {
        let data = fs::read(path).map_err(io_err("read", path))?;
        let mode = fs::metadata(path)
            .map_err(io_err("stat", path))?
            .permissions()
            .mode();
        self.bytes(path, mode & 0o7777, &data)
    }

    /// A program (debug sections stripped when [`Overlay::strip`]), its
    /// loader and its libraries, each at its path here; a script as it is.
    pub fn program(&mut self, path: &Path) -> Result<(), OverlayError> {
        if !is_elf(path) {
            // A script: its interpreter is the image's busybox sh.
            return self.file(path);
        }
        let libs = dynamic::runtime_files(path).map_err(|source| OverlayError::Libraries {
            program: path.to_path_buf(),
            source,
        })?;
        match self.stripped(path) {
            Some(data) => self.bytes(path, 0o755, &data)?,
            None => self.file(path)?,
        }
        for lib in libs {
            self.file(&lib)?;
        }
        Ok(())
    }

    /// A file to carry: an executable ELF as a [`Overlay::program`] (with
    /// its libraries), anything else (a guest vmlinux, data) as it is.
    pub fn carry(&mut self, path: &Path) -> Result<(), OverlayError> {
        let exec = fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o111 != 0);
        if exec && is_elf(path) {
            self.program(path)
        } else {
            self.file(path)
        }
    }

    /// `path` without debug sections, or `None` when objcopy is missing or fails.
    fn stripped(&self, path: &Path) -> Option<Vec<u8>> {
        if !self.strip {
            return None;
        }
        let tmp = self
            .path
            .with_extension(format!("strip-{}", std::process::id()));
        let ok = Command::new("objcopy")
            .arg("--strip-debug")
            .arg(path)
            .arg(&tmp)
            .output()
            .is_ok_and(|o| o.status.success());
        let data = ok.then(|| fs::read(&tmp).ok()).flatten();
        let _ = fs::remove_file(&tmp);
        data
    }

    /// `/init`'s orders (and the command's working directory).
    pub fn config(&mut self, cfg: &HostConfig) -> Result<(), OverlayError> {
        self.dir(&cfg.cwd)?;
        for (path, text) in cfg.files() {
            self.bytes(&Path::new("/").join(path), 0o755, text.as_bytes())?;
        }
        Ok(())
    }

    /// Writes the trailer; returns the archive's size.
    pub fn finish(self) -> Result<u64, OverlayError> {
        let path = self.path.clone();
        let out = self.w.finish()?;
        out.into_inner()
            .map_err(|e| OverlayError::Io {
                op: "write",
                path: path.clone(),
                source: e.into_error(),
            })?
            .sync_all()
            .map_err(io_err("sync", &path))?;
        Ok(fs::metadata(&path).map_err(io_err("stat", &path))?.len())
    }
}

/// True when `path` starts with the ELF magic.
fn is_elf(path: &Path) -> bool {
    let mut head = [0u8; 4];
    File::open(path)
        .and_then(|mut f| io::Read::read_exact(&mut f, &mut head))
        .is_ok()
        && head == *b"\x7fELF"
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linux::cpio;

    #[test]
    fn carries_files_at_their_paths_with_parents_once() {
        let dir = std::env::temp_dir().join(format!("hvmm-overlay-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let out = dir.join("o.cpio");
        let mut o = Overlay::create(&out).unwrap();
        o.bytes(Path::new("/a/b/c"), 0o644, b"one").unwrap();
        o.bytes(Path::new("/a/b/d"), 0o644, b"two").unwrap();
        o.bytes(Path::new("/a/b/c"), 0o644, b"dup").unwrap();
        assert!(matches!(
            o.bytes(Path::new("rel"), 0o644, b""),
            Err(OverlayError::BadPath(_))
        ));
        assert!(matches!(
            o.bytes(Path::new("/a/../etc"), 0o644, b""),
            Err(OverlayError::BadPath(_))
        ));
        o.program(&std::env::current_exe().unwrap()).unwrap();
        o.finish().unwrap();
        let data = fs::read(&out).unwrap();
        let _ = fs::remove_dir_all(&dir);
        let entries = cpio::parse(&data).unwrap();
        let names: Vec<&str> = entries.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(&names[..4], ["a", "a/b", "a/b/c", "a/b/d"]);
        assert_eq!(entries[2].data, b"one");
        assert!(names.iter().any(|n| n.ends_with("libc.so.6")), "{names:?}");
        assert!(names.iter().any(|n| n.contains("ld-linux-x86-64")));
    }
}
