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
    let params = zeropage::boot_params(
        image.setup_header,
        mem_size,
        line.len() + 1,
        Some((initrd_addr, initrd_len)),
    )?;
    zeropage::write(mem, &params).map_err(|e| LoadError::Write {
        what: "the zero page",
        reason: e.to_string(),
    })?;
    Ok(entry.0)
}
