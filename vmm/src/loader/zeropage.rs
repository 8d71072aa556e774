//! The zero page (`boot_params`) of the 64-bit Linux boot protocol:
//! setup header, command line pointer, initrd and the e820 map.

use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::arch::x86_64::layout::{CMDLINE_ADDR, EBDA_START, HIMEM_START, ZERO_PAGE_ADDR};

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
/// Default initrd_addr_max for boot protocol >= 2.03.
pub const INITRD_ADDR_MAX_DEFAULT: u64 = 0x7fff_ffff;

/// The e820 map: low RAM, the EBDA/ROM hole, RAM from 1 MiB to the end.
pub fn e820_map(mem_size: u64) -> Vec<(u64, u64, u32)> {
    vec![
        (0, EBDA_START, E820_RAM),
        (EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
        (HIMEM_START, mem_size - HIMEM_START, E820_RAM),
    ]
}

/// The boot_params for this guest. `hdr` is the bzImage's setup header,
/// if the kernel came as a bzImage.
pub fn boot_params(
    hdr: Option<setup_header>,
    mem_size: u64,
    cmdline_len: usize,
    initrd: Option<(u64, u64)>,
) -> boot_params {
    let mut p = boot_params {
        hdr: hdr.unwrap_or_default(),
        ..Default::default()
    };
    p.hdr.boot_flag = 0xaa55;
    p.hdr.header = 0x5372_6448; // "HdrS"
    if p.hdr.version == 0 {
        p.hdr.version = 0x020f;
        p.hdr.kernel_alignment = 0x100_0000;
        p.hdr.initrd_addr_max = INITRD_ADDR_MAX_DEFAULT as u32;
    }
    p.hdr.type_of_loader = 0xff;
    p.hdr.loadflags |= 0x01; // LOADED_HIGH
    p.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    p.hdr.cmdline_size = cmdline_len as u32;
    if let Some((addr, len)) = initrd {
        p.hdr.ramdisk_image = addr as u32;
        p.hdr.ramdisk_size = len as u32;
    }
    let map = e820_map(mem_size);
    for (i, (addr, size, t)) in map.iter().enumerate() {
        p.e820_table[i] = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: *t,
        };
    }
    p.e820_entries = map.len() as u8;
    p
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
        let p = boot_params(None, 256 << 20, 100, Some((0x0f00_0000, 0x1000)));
        assert_eq!(p.e820_entries, 3);
        let e = p.e820_table[2];
        assert_eq!({ e.addr }, HIMEM_START);
        assert_eq!({ e.size }, (256 << 20) - HIMEM_START);
        assert_eq!({ p.hdr.ramdisk_image }, 0x0f00_0000);
        assert_eq!({ p.hdr.boot_flag }, 0xaa55);
    }
}
