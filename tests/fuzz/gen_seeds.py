#!/usr/bin/env python3
"""Writes the committed seed corpus (seeds/<target>/): tiny hand-made
inputs shaped like the unit tests' ones. Needs python3, and the zstd and
lz4 tools for those two payloads. Run from anywhere; it overwrites."""
import bz2, gzip, lzma, os, struct, subprocess, zlib

HERE = os.path.dirname(os.path.abspath(__file__))


def put(target, name, data):
    d = os.path.join(HERE, "seeds", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def tiny_elf(body, paddr=0x100_0000):
    """guests::linux::elf::tests::tiny_elf: one PT_LOAD at `paddr`."""
    eh = bytearray(64)
    eh[0:7] = b"\x7fELF\x02\x01\x01"
    struct.pack_into("<HHIQQQIHHHHHH", eh, 16, 2, 62, 1, paddr, 64, 0, 0, 64, 56, 1, 0, 0, 0)
    ph = struct.pack("<IIQQQQQQ", 1, 5, 120, 0xFFFF_FFFF_8100_0000, paddr, len(body), len(body) + 0x1000, 0x1000)
    return bytes(eh) + ph + body


def bzimage(payload, version=0x020F):
    """A fake bzImage as guests::linux::bzimage's tests build it."""
    setup_sects = 3
    pm = (setup_sects + 1) * 512
    off = 0x40
    b = bytearray(pm + off)
    b[0x1F1] = setup_sects
    b[0x1FE:0x200] = b"\x55\xaa"
    b[0x202:0x206] = b"HdrS"
    struct.pack_into("<H", b, 0x206, version)
    struct.pack_into("<I", b, 0x230, 0x20_0000)  # kernel_alignment
    struct.pack_into("<I", b, 0x22C, 0x7FFF_FFFF)  # initrd_addr_max
    struct.pack_into("<II", b, 0x248, off, len(payload))
    return bytes(b) + payload + struct.pack("<I", 0)


def tool(args, data):
    return subprocess.run(args, input=data, stdout=subprocess.PIPE, check=True).stdout


def lzop_stored(data):
    """An lzop file (version 0x1030, no checksums) with one stored block."""
    h = bytes([0x89, 0x4C, 0x5A, 0x4F, 0x00, 0x0D, 0x0A, 0x1A, 0x0A])
    h += struct.pack(">HHHB", 0x1030, 0x2080, 0x0940, 1)[:7]
    h += struct.pack(">I", 0) + struct.pack(">II", 0o100644, 0) + b"\x00" + struct.pack(">I", 0)
    return h + struct.pack(">II", len(data), len(data)) + data + struct.pack(">I", 0)


def lzop_lzo1x():
    """32 x 'a': a literal, a distance-1 M3 match of 31, the end marker."""
    block = bytes([0x12, ord("a"), 0x3D, 0x00, 0x00, 0x11, 0x00, 0x00])
    s = lzop_stored(b"")[:-4]
    return s + struct.pack(">II", 32, len(block)) + block + struct.pack(">I", 0)


def lz4_legacy_literal(data):
    """Legacy frame, one literal-only LZ4 block (len < 15), size trailer."""
    block = bytes([len(data) << 4]) + data
    return struct.pack("<II", 0x184C2102, len(block)) + block + struct.pack("<I", len(data))


def zstd_raw(data):
    """A zstd frame: single segment, 1-byte content size, one raw block."""
    return bytes([0x28, 0xB5, 0x2F, 0xFD, 0x20, len(data)]) + struct.pack("<I", (len(data) << 3) | 1)[:3] + data


def newc(entries):
    out = bytearray()
    for ino, (name, mode, data) in enumerate(entries + [("TRAILER!!!", 0, b"")]):
        f = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0]
        out += b"070701" + b"".join(b"%08x" % v for v in f) + name.encode() + b"\0"
        out += b"\0" * (-len(out) % 4) + data
        out += b"\0" * (-len(out) % 4)
    return bytes(out)


body = bytes([0x90] * 16 + [0xF4, 0xEB, 0xFE])
elf = tiny_elf(body)

# parse_size
for i, s in enumerate(["256M", "1G", "512", "64k", " 4T ", "18446744073709551615", "0K", "17179869184G", "1x"]):
    put("parse_size", f"s{i}", s.encode())

# trace_line (notifier::trace's test lines)
for i, s in enumerate([
    "   notifier-chec-4242    [001] d..1.  1234.567890: kvm_unmap_hva_range: mmu notifier unmap range: 0x007f0000000000 -- 0x007f0000200000\n",
    "  <...>-77  [000] .....  5.000001: tracing_mark_write: notifier-sentinel 12\n",
    "CPU:3 [LOST 1234 EVENTS]\n",
    "  vmm-1 [000] ..... 18446744073.709551615: kvm_unmap_hva_range: mmu notifier unmap range: 0x0 -- 0xffffffffffffffff\n",
]):
    put("trace_line", f"l{i}", s.encode())

# timeline: a console with the milestones the timeline looks for
put("timeline", "boot", b"\x05[    0.000000] Linux version 6.1.0\r\n[    1.234567] Run /init as init process\nHVMM-INIT-OK MemTotal: 1 GiB\n")
put("timeline", "killed", b"\x00init[1]: segfault at 0 ip 0 sp 0 error 4\nKernel panic - not syncing: Attempted to kill init! exitcode=0x0000000b\n")
put("timeline", "exit", b"\x10[ 2.0] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100\n")

# cpio: what the initramfs writer writes
put("cpio", "initramfs", newc([("dev", 0o40755, b""), ("init", 0o100755, b"#!/bin/sh\necho HVMM-INIT-OK\n"), ("bin/sh", 0o120777, b"busybox"), ("dev/console", 0o20600, b"")]))
put("cpio", "empty", newc([]))
put("cpio", "names", b"init=echo hi\nbin\nbin/sh=busybox\n")

# bzimage_decompress: byte 0 picks the decoder (Compression::ALL order:
# gzip bzip2 lzma xz lzo lz4 zstd none; 8 lzop, 9 lz4 legacy, 10 bzImage)
put("bzimage_decompress", "gzip", b"\x00" + gzip.compress(elf, mtime=0))
put("bzimage_decompress", "bzip2", b"\x01" + bz2.compress(elf))
put("bzimage_decompress", "lzma", b"\x02" + lzma.compress(elf, format=lzma.FORMAT_ALONE))
put("bzimage_decompress", "xz", b"\x03" + lzma.compress(elf, format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC32))
put("bzimage_decompress", "lzo", b"\x04" + lzop_stored(b"hello lzop"))
put("bzimage_decompress", "lz4", b"\x05" + tool(["lz4", "-l", "-c", "-q"], elf))
put("bzimage_decompress", "zstd", b"\x06" + tool(["zstd", "-q", "-c"], elf))
put("bzimage_decompress", "none", b"\x07" + elf)
put("bzimage_decompress", "lzop1x", b"\x08" + lzop_lzo1x())
put("bzimage_decompress", "lz4lit", b"\x09" + lz4_legacy_literal(b"hello lz4"))
put("bzimage_decompress", "bz-gzip", b"\x0a" + bzimage(gzip.compress(elf, mtime=0)))
put("bzimage_decompress", "bz-zstd", b"\x0a" + bzimage(zstd_raw(b"\x7fELF" + bytes(8))))

# kernel_loader: RAM in 64 KiB units (u16), cmdline length (u16), initrd
# length (u32), then the command line, the initrd, the kernel
def loader(units, cmd, initrd, kernel):
    return struct.pack("<HHI", units, len(cmd), len(initrd)) + cmd + initrd + kernel

put("kernel_loader", "elf", loader(511, b"console=ttyS0 panic=-1", b"070701initrd", elf))
put("kernel_loader", "bzimage", loader(1023, b"console=ttyS0", bytes(100), bzimage(elf)))
put("kernel_loader", "bz-lz4", loader(400, b"", b"", bzimage(tool(["lz4", "-l", "-c", "-q"], elf))))
put("kernel_loader", "small-ram", loader(15, b"x", b"y", elf))

# guest_walk: flags, MAXPHYADDR, kind (bit 0: EPT), gva, CR3/EPTP, RAM
def walk(flags, maxpa, kind, gva, root, words):
    ram = bytearray(0x5000)
    for gpa, v in words:
        struct.pack_into("<Q", ram, gpa, v)
    return bytes([flags, maxpa, kind]) + struct.pack("<QQ", gva, root) + bytes(ram)

x86 = [(0x1000 + 256 * 8, 0x2003), (0x2000, 0x3003), (0x3000 + 8, 0x20_0083), (0x3000 + 16, 0x4007), (0x4000 + 8, 0x8000_0000_0000_9067)]
# kind bits 3:1: the mode of guest_walk::modes (0 none, 1 32-bit, 2 PAE,
# 3 5-level, 4+ 4-level); bit 4: CR4.PSE
put("guest_walk", "x86-2m", walk(0b1000_1011, 52, 8, 0xFFFF_8000_0020_1234, 0x1000, x86))
put("guest_walk", "x86-4k-user", walk(0b1011_1011, 46, 8, 0xFFFF_8000_0040_1008, 0x1000, x86))
put("guest_walk", "nopaging", walk(0b0001_0000, 52, 0, 0x1234_5678, 0, []))
bits32 = [(0x1000 + 4, 0x2007 | (0x0C00_0087 << 32)), (0x2000 + 8, 0x5007)]
put("guest_walk", "bits32", walk(0b0010_0001, 52, 0x12, 0x0040_2123, 0x1000, bits32))
put("guest_walk", "bits32-4m", walk(0b0000_0001, 52, 0x12, 0x00C1_2345, 0x1000, bits32))
pae = [(0x1020, 0x3001), (0x1028, 0x4001), (0x3000, 0x2007), (0x2000 + 5 * 8, 0x8000_0000_0000_7007), (0x4000 + 8, 0x80_0087)]
put("guest_walk", "pae", walk(0b0000_0011, 52, 4, 0x5ABC, 0x1020, pae))
put("guest_walk", "pae-2m", walk(0b0100_0011, 52, 4, 0x4020_0010, 0x1020, pae))
la57 = [(0x0 + 8, 0x1007), (0x1000, 0x2007), (0x2000, 0x3007), (0x3000, 0x4007), (0x4000 + 8, 0x9007)]
put("guest_walk", "la57", walk(0b0000_0011, 52, 6, 0x0001_0000_0000_1008, 0x0, la57))
ept = [(0x1000, 0x2007), (0x2000, 0x3007), (0x3000 + 8, 0x20_00B7), (0x3000 + 16, 0x4007), (0x4000 + 8, 0x9037)]
put("guest_walk", "ept-2m", walk(0b1001_1001, 48, 1, 0x20_1234, 0x1000 | 6 | (3 << 3) | (1 << 6), ept))
put("guest_walk", "ept-4k", walk(0b0000_1001, 52, 1, 0x40_1008, 0x1000 | 6 | (3 << 3), ept))

# emulate: rip, rax rbx rcx rdx rsi rdi rbp r8, rflags, cr0 cr3 cr4 efer,
# fpu (mxcsr, fcw, fsw), segment byte (bit 0 CS.L, bit 1 CS.D, bits 3:2
# CPL); then guest RAM from gpa 0
def emulate(rip, gprs, cr0, cr3, cr4, efer, seg, ram):
    h = struct.pack("<Q", rip) + struct.pack("<8Q", *gprs) + struct.pack("<Q", 2)
    h += struct.pack("<QQQQ", cr0, cr3, cr4, efer) + struct.pack("<IHH", 0x1F80, 0x37F, 0) + bytes([seg])
    return h + ram

long_ram = bytearray(0x4100)
for gpa, v in [(0x1000, 0x2003), (0x2000, 0x3003), (0x3000, 0x83), (0x3ff8, 0xff)]:
    struct.pack_into("<Q", long_ram, gpa, v)
long_ram[0x4000:0x4005] = bytes([0xF3, 0x48, 0x0F, 0xB8, 0x03])  # popcnt rax, [rbx]
PG, PE, PAE, LME, LMA = 1 << 31, 1, 1 << 5, 1 << 8, 1 << 10
put("emulate", "long-popcnt", emulate(0x4000, [0, 0x3FF8, 0, 0, 0, 0, 0, 0], PG | PE, 0x1000, PAE, LME | LMA, 1, bytes(long_ram)))
flat = bytearray(0x200)
flat[0x100:0x104] = bytes([0x0F, 0xAE, 0x10, 0xCC])  # ldmxcsr [eax]; int3
put("emulate", "flat32-ldmxcsr", emulate(0x100, [0x180, 0, 0, 0, 0, 0, 0, 0], PE, 0, 0, 0, 2, bytes(flat)))
for i, code in enumerate([b"\xcc", b"\x9b", b"\xdb\xe3", b"\x0f\x01\xca", b"\xf3\x0f\xb8\xc1", b"\x48\x0f\xae\x00", b"\xdf\xe0", b"\x48\x89\x0a"]):
    ram = bytearray(0x200)
    ram[0x100:0x100 + len(code)] = code
    put("emulate", f"flat64-{i}", emulate(0x100, [0x180, 0, 5, 0x40, 0, 0, 0, 0], PE, 0, 0, 0, 1, bytes(ram)))
