//! Loading a Linux guest: the kernel image ([`kernel`]: ELF vmlinux or
//! bzImage, validated as untrusted input), the initramfs, the command line
//! ([`cmdline`]) and the zero page ([`zeropage`]) of the 64-bit boot
//! protocol, written to guest memory before the first `KVM_RUN`.

pub mod cmdline;
pub mod kernel;
pub mod zeropage;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::arch::x86_64::layout::CMDLINE_ADDR;
use kernel::{KernelError, KernelImage};
use notifier::convert::usize_to_u64;

/// What went wrong writing a guest's boot images.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Kernel(#[from] KernelError),
    #[error("kernel command line: {0}")]
    Cmdline(String),
    #[error("zero page: {0}")]
    ZeroPage(#[from] zeropage::ZeroPageError),
    #[error("writing {what} to guest memory: {reason}")]
    Write { what: &'static str, reason: String },
}

/// Write `image`, `initrd` (at the top of low memory the kernel allows),
/// the command line `line` and the zero page into `mem` (`mem_size`
/// bytes); returns the kernel's 64-bit entry point.
pub fn load_linux(
    mem: &GuestMemoryMmap,
    mem_size: u64,
    image: &KernelImage,
    initrd: &[u8],
    line: &str,
) -> Result<u64, LoadError> {
    let entry = image.load(mem, mem_size)?;
    let addr_max = zeropage::initrd_addr_max(image.setup_header.as_ref());
    let initrd_len = usize_to_u64(initrd.len());
    let initrd_addr = kernel::initrd_addr(initrd_len, mem_size, image.phys_end, addr_max)?;
    mem.write_slice(initrd, GuestAddress(initrd_addr))
        .map_err(|e| LoadError::Write {
            what: "the initrd",
            reason: e.to_string(),
        })?;
    let cmdline = cmdline::checked(line).map_err(LoadError::Cmdline)?;
    linux_loader::loader::load_cmdline(mem, GuestAddress(CMDLINE_ADDR), &cmdline)
        .map_err(|e| LoadError::Cmdline(e.to_string()))?;
    // The size of what was written: linux-loader trims the line's leading
    // and trailing whitespace, so `line.len() + 1` could overstate it.
    let written = cmdline
        .as_cstring()
        .map_err(|e| LoadError::Cmdline(e.to_string()))?
        .as_bytes_with_nul()
        .len();
    let params = zeropage::boot_params(
        image.setup_header,
        mem_size,
        written,
        Some((initrd_addr, initrd_len)),
    )?;
    zeropage::write(mem, &params).map_err(|e| LoadError::Write {
        what: "the zero page",
        reason: e.to_string(),
    })?;
    Ok(entry.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::layout::ZERO_PAGE_ADDR;
    use linux_loader::loader::bootparam::boot_params;
    use std::path::Path;

    /// A minimal ELF64 x86-64 executable: one PT_LOAD of `body` at
    /// physical 0x100_0000 (the guests crate's test ELF).
    fn tiny_elf(body: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 64 + 56];
        f[..7].copy_from_slice(b"\x7fELF\x02\x01\x01");
        f[16..18].copy_from_slice(&2u16.to_le_bytes());
        f[18..20].copy_from_slice(&62u16.to_le_bytes());
        f[20..24].copy_from_slice(&1u32.to_le_bytes());
        f[24..32].copy_from_slice(&0x100_0000u64.to_le_bytes());
        f[32..40].copy_from_slice(&64u64.to_le_bytes());
        f[52..54].copy_from_slice(&64u16.to_le_bytes());
        f[54..56].copy_from_slice(&56u16.to_le_bytes());
        f[56..58].copy_from_slice(&1u16.to_le_bytes());
        let len = u64::try_from(body.len()).unwrap();
        let ph = &mut f[64..];
        ph[0..4].copy_from_slice(&1u32.to_le_bytes());
        ph[8..16].copy_from_slice(&120u64.to_le_bytes());
        ph[16..24].copy_from_slice(&0xffff_ffff_8100_0000u64.to_le_bytes());
        ph[24..32].copy_from_slice(&0x100_0000u64.to_le_bytes());
        ph[32..40].copy_from_slice(&len.to_le_bytes());
        ph[40..48].copy_from_slice(&(len + 0x1000).to_le_bytes());
        f.extend_from_slice(body);
        f
    }

    /// Found by the `kernel_loader` fuzz target: the zero page's
    /// `cmdline_size` counted the line as given, whitespace that
    /// linux-loader trims included, not the line written to guest RAM.
    #[test]
    fn cmdline_size_is_what_was_written() {
        let size = 32u64 << 20;
        let mem =
            GuestMemoryMmap::from_ranges(&[(GuestAddress(0), usize::try_from(size).unwrap())])
                .unwrap();
        let image = KernelImage::from_bytes(Path::new("t"), tiny_elf(&[0x90; 16])).unwrap();
        let entry = load_linux(&mem, size, &image, b"initrd", "  console=ttyS0\t").unwrap();
        assert_eq!(entry, 0x100_0000);
        let p: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_ADDR)).unwrap();
        let written = "console=ttyS0";
        assert_eq!(
            usize::try_from(p.hdr.cmdline_size).unwrap(),
            written.len() + 1
        );
        let mut b = vec![0u8; written.len() + 1];
        mem.read_slice(&mut b, GuestAddress(CMDLINE_ADDR)).unwrap();
        assert_eq!(&b[..written.len()], written.as_bytes());
        assert_eq!(b[written.len()], 0);
    }
}
