//! Kernel and initrd images: validation, bzImage payload extraction and
//! loading with linux-loader (64-bit Linux boot protocol).
//!
//! Kernel images are untrusted input: every offset is bounds-checked and a
//! malformed image is a typed error.

use std::io::Cursor;
use std::path::{Path, PathBuf};

use guests::linux::bzimage::is_bzimage;
use guests::linux::elf::{self, is_elf, ElfError};
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{Elf, KernelLoader};
use vm_memory::{ByteValued, GuestAddress, GuestMemoryMmap};

use crate::arch::x86_64::layout::HIMEM_START;
/// bzImage: offset of the setup header.
const SETUP_HDR_OFF: usize = 0x1f1;

/// Kernel/initrd errors.
#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    /// The kernel file does not exist.
    #[error(
        "kernel image {} does not exist (--kernel takes a file or a pinned kernel: {})",
        .0.display(),
        guests::linux::recipe::kernel_names()
    )]
    KernelMissing(PathBuf),
    /// The initrd file does not exist.
    #[error("initrd {0} does not exist")]
    InitrdMissing(PathBuf),
    /// The initrd is not an initramfs the kernel could unpack (truncated,
    /// corrupt, not cpio).
    #[error("initrd {}: {source}", path.display())]
    BadInitrd {
        path: PathBuf,
        #[source]
        source: guests::linux::cpio::CpioError,
    },
    /// Reading a file failed.
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Neither ELF nor bzImage.
    #[error("{0} is neither an ELF vmlinux nor a bzImage")]
    NotKernel(PathBuf),
    /// The image ends before what its headers describe.
    #[error("kernel image is truncated: {0}")]
    Truncated(String),
    /// A well-formed ELF that is not an x86-64 executable.
    #[error("kernel ELF is not a 64-bit x86-64 executable: {0}")]
    NotX86_64(String),
    /// The bzImage cannot be turned into a vmlinux.
    #[error("bzImage: {0}")]
    BzImage(#[from] guests::linux::bzimage::BzImageError),
    /// linux-loader refused the image.
    #[error("loading the kernel: {0}")]
    Load(#[from] linux_loader::loader::Error),
    /// Kernel (+ initrd) does not fit in guest RAM.
    #[error(
        "guest memory too small: {what} needs {needed_mib} MiB of guest RAM, the guest has {mem_mib} MiB (use --mem)"
    )]
    MemoryTooSmall {
        what: &'static str,
        needed_mib: u64,
        mem_mib: u64,
    },
}

/// A kernel ready to load: an ELF vmlinux and, from a bzImage, its setup header.
pub struct KernelImage {
    /// The ELF vmlinux bytes.
    pub vmlinux: Vec<u8>,
    /// The bzImage's setup header (None for a bare vmlinux).
    pub setup_header: Option<setup_header>,
    /// Highest guest-physical byte a PT_LOAD segment covers (exclusive).
    pub phys_end: u64,
}

fn read_file(path: &Path, missing: fn(PathBuf) -> KernelError) -> Result<Vec<u8>, KernelError> {
    std::fs::read(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            missing(path.to_path_buf())
        } else {
            KernelError::Read {
                path: path.to_path_buf(),
                source: e,
            }
        }
    })
}

/// A checked ELF vmlinux (the guests crate's ELF checks) and the end of
/// its loaded physical range.
pub fn validate_elf(b: &[u8]) -> Result<u64, KernelError> {
    let elf_err = |e: ElfError| match e {
        ElfError::Truncated(t) => KernelError::Truncated(t.to_string()),
        ElfError::NotElf { .. } => KernelError::Truncated("ELF header".into()),
        other => KernelError::NotX86_64(other.to_string()),
    };
    elf::check_x86_64_exec(b)
        .and_then(|info| info.phys_end())
        .map_err(elf_err)
}

/// Extract the vmlinux from a bzImage (the guests crate's extractor: setup
/// header, payload in any compression, ELF check) and return it with the
/// setup header the zero page starts from.
pub fn extract_bzimage(b: &[u8]) -> Result<(Vec<u8>, setup_header), KernelError> {
    let vmlinux = guests::linux::bzimage::extract_vmlinux(b)?;
    let mut hdr = setup_header::default();
    let hl = std::mem::size_of::<setup_header>();
    hdr.as_mut_slice().copy_from_slice(
        b.get(SETUP_HDR_OFF..SETUP_HDR_OFF + hl)
            .ok_or_else(|| KernelError::Truncated("setup header".into()))?,
    );
    Ok((vmlinux.bytes, hdr))
}

impl KernelImage {
    /// Read and validate a kernel: an ELF vmlinux or a bzImage.
    pub fn open(path: &Path) -> Result<Self, KernelError> {
        let b = read_file(path, KernelError::KernelMissing)?;
        Self::from_bytes(path, b)
    }

    /// Validate kernel bytes (`path` is for messages).
    pub fn from_bytes(path: &Path, b: Vec<u8>) -> Result<Self, KernelError> {
        if is_elf(&b) {
            let phys_end = validate_elf(&b)?;
            return Ok(KernelImage {
                vmlinux: b,
                setup_header: None,
                phys_end,
            });
        }
        if is_bzimage(&b) {
            let (vmlinux, hdr) = extract_bzimage(&b)?;
            let phys_end = validate_elf(&vmlinux)?;
            return Ok(KernelImage {
                vmlinux,
                setup_header: Some(hdr),
                phys_end,
            });
        }
        if b.len() < 0x206 && (b.starts_with(b"\x7fEL") || b.len() > 0x1ff) {
            return Err(KernelError::Truncated(
                "file shorter than any header".into(),
            ));
        }
        Err(KernelError::NotKernel(path.to_path_buf()))
    }

    /// Load into guest memory; returns the 64-bit entry point.
    pub fn load(&self, mem: &GuestMemoryMmap, mem_size: u64) -> Result<GuestAddress, KernelError> {
        if self.phys_end > mem_size {
            return Err(KernelError::MemoryTooSmall {
                what: "the kernel",
                needed_mib: self.phys_end.div_ceil(1 << 20),
                mem_mib: mem_size >> 20,
            });
        }
        let r = Elf::load(
            mem,
            None,
            &mut Cursor::new(&self.vmlinux),
            Some(GuestAddress(HIMEM_START)),
        )?;
        Ok(r.kernel_load)
    }
}

/// Read the initrd and check it is an initramfs the kernel can unpack
/// ([`guests::linux::cpio::check_initramfs`]).
pub fn read_initrd(path: &Path) -> Result<Vec<u8>, KernelError> {
    let bytes = read_file(path, KernelError::InitrdMissing)?;
    guests::linux::cpio::check_initramfs(&bytes).map_err(|source| KernelError::BadInitrd {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(bytes)
}

/// Where the initrd goes: page-aligned at the top of low memory, above the kernel.
pub fn initrd_addr(
    initrd_len: u64,
    mem_size: u64,
    kernel_end: u64,
    addr_max: u64,
) -> Result<u64, KernelError> {
    let top = mem_size.min(addr_max.saturating_add(1));
    let too_small = || KernelError::MemoryTooSmall {
        what: "the kernel + initrd",
        needed_mib: (kernel_end + initrd_len).div_ceil(1 << 20) + 1,
        mem_mib: mem_size >> 20,
    };
    let addr = top.checked_sub(initrd_len).ok_or_else(too_small)? & !0xfff;
    if addr < kernel_end {
        return Err(too_small());
    }
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_a_kernel() {
        let e = KernelImage::from_bytes(Path::new("x"), vec![0u8; 4096])
            .err()
            .unwrap();
        assert!(matches!(e, KernelError::NotKernel(_)), "{e}");
    }

    #[test]
    fn truncated_elf_header() {
        let e = KernelImage::from_bytes(Path::new("x"), b"\x7fELF\x02\x01".to_vec())
            .err()
            .unwrap();
        assert!(matches!(e, KernelError::Truncated(_)), "{e}");
    }

    #[test]
    fn missing_files() {
        let e = KernelImage::open(Path::new("/nonexistent/vmlinux"))
            .err()
            .unwrap();
        assert!(matches!(e, KernelError::KernelMissing(_)), "{e}");
        // `--kernel debian-6.21`: the message lists the pinned names.
        let msg = e.to_string();
        assert!(msg.contains("debian-6.1, debian-6.12"), "{msg}");
        let e = read_initrd(Path::new("/nonexistent/initrd")).unwrap_err();
        assert!(matches!(e, KernelError::InitrdMissing(_)), "{e}");
    }

    #[test]
    fn truncated_bzimage_payload() {
        let mut b = vec![0u8; 0x1000];
        b[0x1f1] = 1;
        b[0x1fe] = 0x55;
        b[0x1ff] = 0xaa;
        b[0x202..0x206].copy_from_slice(b"HdrS");
        b[0x206..0x208].copy_from_slice(&0x020fu16.to_le_bytes()); // protocol 2.15
        b[0x24c..0x250].copy_from_slice(&0x10_0000u32.to_le_bytes());
        let e = KernelImage::from_bytes(Path::new("x"), b).err().unwrap();
        assert!(
            matches!(
                e,
                KernelError::BzImage(guests::linux::bzimage::BzImageError::Truncated(_))
            ),
            "{e}"
        );
    }

    #[test]
    fn initrd_placement() {
        assert_eq!(
            initrd_addr(0x2000, 0x100_0000, 0x80_0000, u64::MAX).unwrap(),
            0xff_e000
        );
        assert!(initrd_addr(0x90_0000, 0x100_0000, 0x80_0000, u64::MAX).is_err());
        assert_eq!(
            initrd_addr(0x1000, 0x1_0000_0000, 0, 0x7fff_ffff).unwrap(),
            0x7fff_f000
        );
    }
}
