//! The kernel loader (`vmm::loader`): an ELF vmlinux or a bzImage, an
//! initrd and a command line, loaded into guest RAM of a fuzzer-chosen
//! size. Never panics; a successful load leaves a zero page that says what
//! was loaded (boot flag, e820 covering exactly the RAM, the command line
//! and the initrd where it points, above the kernel, inside RAM).
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use linux_loader::loader::bootparam::boot_params;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::arch::x86_64::layout::{CMDLINE_ADDR, ZERO_PAGE_ADDR};
use vmm::loader::kernel::KernelImage;
use vmm::loader::load_linux;

/// Header: RAM size in 64 KiB units (u16), command-line length (u16),
/// initrd length (u32); then the command line, the initrd, the kernel.
const HEADER: usize = 8;

fuzz_target!(|data: &[u8]| {
    if data.len() < HEADER {
        return;
    }
    let ram_units = u64::from(u16::from_le_bytes([data[0], data[1]]));
    let cmd_len = usize::from(u16::from_le_bytes([data[2], data[3]]));
    let initrd_len =
        usize::try_from(u32::from_le_bytes([data[4], data[5], data[6], data[7]])).unwrap();
    let rest = &data[HEADER..];
    let cmd_len = cmd_len.min(rest.len());
    let (cmd, rest) = rest.split_at(cmd_len);
    let initrd_len = initrd_len.min(rest.len());
    let (initrd, kernel) = rest.split_at(initrd_len);
    let line = String::from_utf8_lossy(cmd);

    // The ELF checks agree with themselves.
    if let Ok(info) = guests::linux::elf::check_x86_64_exec(kernel) {
        info.phys_end().expect("phys_end of a checked ELF");
    }
    let Ok(image) = KernelImage::from_bytes(Path::new("fuzz"), kernel.to_vec()) else {
        return;
    };
    // 64 KiB .. 64 MiB of RAM (at least the zero page and command line).
    let mem_size = (ram_units % 1024 + 1) << 16;
    let mem =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), usize::try_from(mem_size).unwrap())])
            .unwrap();
    let Ok(_entry) = load_linux(&mem, mem_size, &image, initrd, &line) else {
        return;
    };
    let p: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_ADDR)).unwrap();
    assert_eq!({ p.hdr.boot_flag }, 0xaa55);
    assert_eq!({ p.hdr.header }, 0x5372_6448);
    assert_eq!(u64::from(p.hdr.cmd_line_ptr), CMDLINE_ADDR);
    assert!(image.phys_end <= mem_size);
    let n = usize::from(p.e820_entries);
    assert!(n > 0 && n <= p.e820_table.len());
    let mut covered = 0u64;
    let mut next = 0u64;
    for e in &p.e820_table[..n] {
        assert_eq!({ e.addr }, next, "e820 has a gap or overlap");
        next = e.addr.checked_add(e.size).unwrap();
        covered += e.size;
    }
    assert_eq!(covered, mem_size);
    // The command line as given (linux-loader trims surrounding
    // whitespace), NUL-terminated, and the size the zero page says.
    let line = line.trim();
    assert_eq!(usize::try_from(p.hdr.cmdline_size).unwrap(), line.len() + 1);
    let mut stored = vec![0u8; line.len() + 1];
    mem.read_slice(&mut stored, GuestAddress(CMDLINE_ADDR))
        .unwrap();
    assert_eq!(&stored[..line.len()], line.as_bytes());
    assert_eq!(stored[line.len()], 0);
    // The initrd where the zero page says, above the kernel, inside RAM.
    let (addr, size) = (
        u64::from(p.hdr.ramdisk_image),
        u64::from(p.hdr.ramdisk_size),
    );
    assert_eq!(size, u64::try_from(initrd.len()).unwrap());
    assert!(addr >= image.phys_end);
    assert!(addr.checked_add(size).unwrap() <= mem_size);
    assert_eq!(addr % 4096, 0);
    let mut back = vec![0u8; initrd.len()];
    mem.read_slice(&mut back, GuestAddress(addr)).unwrap();
    assert_eq!(back, initrd);
});
