//! The zero page (`boot_params`) of the 64-bit Linux boot protocol:
//! setup header, command line pointer, initrd and the e820 map.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use notifier::convert::usize_to_u64;

use crate::arch::x86_64::layout::{CMDLINE_ADDR, EBDA_START, HIMEM_START, ZERO_PAGE_ADDR};

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
/// Default initrd_addr_max for boot protocol >= 2.03.
pub const INITRD_ADDR_MAX_DEFAULT: u64 = 0x7fff_ffff;

/// A value the 32-bit fields of `boot_params` cannot hold, or RAM that
/// ends below the high memory the map describes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ZeroPageError {
    #[error("{what} {value:#x} does not fit the 32-bit boot_params field")]
    TooWide { what: &'static str, value: u64 },
    #[error("guest RAM of {mem_size:#x} bytes ends below 1 MiB: no room for the kernel")]
    NoHighMemory { mem_size: u64 },
}

fn field32(what: &'static str, value: u64) -> Result<u32, ZeroPageError> {
    u32::try_from(value).map_err(|_| ZeroPageError::TooWide { what, value })
}

/// The e820 map: low RAM, the EBDA/ROM hole, RAM from 1 MiB to the end.
pub fn e820_map(mem_size: u64) -> Result<Vec<(u64, u64, u32)>, ZeroPageError> {
    let high = mem_size
        .checked_sub(HIMEM_START)
        .filter(|&h| h > 0)
        .ok_or(ZeroPageError::NoHighMemory { mem_size })?;
    Ok(vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
        (HIMEM_START, high, E820_RAM),
    ])
}

/// The boot_params for this guest. `hdr` is the bzImage's setup header,
/// if the kernel came as a bzImage.
pub fn boot_params(
    hdr: Option<setup_header>,
    mem_size: u64,
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
) -> Result<boot_params, ZeroPageError> {
    let mut p = boot_params {
        hdr: hdr.unwrap_or_default(),
        ..Default::default()
    };
    p.hdr.boot_flag = 0xaa55;
    p.hdr.header = 0x5372_6448; // "HdrS"
    if p.hdr.version == 0 {
        p.hdr.version = 0x020f;
        p.hdr.kernel_alignment = 0x100_0000;
        p.hdr.initrd_addr_max = field32("initrd_addr_max", INITRD_ADDR_MAX_DEFAULT)?;
    }
    p.hdr.type_of_loader = 0xff;
    p.hdr.loadflags |= 0x01; // LOADED_HIGH
    p.hdr.cmd_line_ptr = field32("cmd_line_ptr", CMDLINE_ADDR)?;
    p.hdr.cmdline_size = field32("cmdline_size", usize_to_u64(cmdline_len))?;
    if let Some((addr, len)) = initrd {
        p.hdr.ramdisk_image = field32("ramdisk_image", addr)?;
        p.hdr.ramdisk_size = field32("ramdisk_size", len)?;
    }
    let map = e820_map(mem_size)?;
    for (i, (addr, size, t)) in map.iter().enumerate() {
        p.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *t,
        };
    }
    // Three entries (e820_map).
    p.e820_entries = u8::try_from(map.len()).unwrap_or(u8::MAX);
    Ok(p)
}

/// The initrd_addr_max the kernel's header asks for.
pub fn initrd_addr_max(hdr: Option<&setup_header>) -> u64 {
    match hdr {
        Some(h) if h.version >= 0x203 && h.initrd_addr_max != 0 => u64::from(h.initrd_addr_max),
        _ => INITRD_ADDR_MAX_DEFAULT,
    }
}

/// Write boot_params to the zero page.
pub fn write(mem: &GuestMemoryMmap, p: &boot_params) -> Result<(), vm_memory::GuestMemoryError> {
    mem.write_obj(*p, GuestAddress(ZERO_PAGE_ADDR))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_and_initrd() {
        let p = boot_params(None, 256 << 20, 100, Some((0x0f00_0000, 0x1000))).unwrap();
        assert_eq!(p.e820_entries, 3);
        let e = p.e820_table[2];
        assert_eq!({ e.addr }, HIMEM_START);
        assert_eq!({ e.size }, (256 << 20) - HIMEM_START);
        assert_eq!({ p.hdr.ramdisk_image }, 0x0f00_0000);
        assert_eq!({ p.hdr.boot_flag }, 0xaa55);
        // RAM that ends at or below 1 MiB, an initrd above 4 GiB: errors.
        assert_eq!(
            e820_map(HIMEM_START),
            Err(ZeroPageError::NoHighMemory {
                mem_size: HIMEM_START
            })
        );
        assert!(matches!(
            boot_params(None, 256 << 20, 100, Some((1 << 32, 1))),
            Err(ZeroPageError::TooWide { .. })
        ));
    }
}
