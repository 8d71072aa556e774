//! GDT entries and the `kvm_segment`s they describe.

use kvm_bindings::{kvm_segment, kvm_sregs};

/// A GDT entry from (flags, base, limit), as Linux's `GDT_ENTRY` macro.
pub fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((u64::from(base) & 0xff00_0000) << 32)
        | ((u64::from(flags) & 0xf0ff) << 40)
        | ((u64::from(limit) & 0x000f_0000) << 32)
        | ((u64::from(base) & 0x00ff_ffff) << 16)
        | (u64::from(limit) & 0x0000_ffff)
}

/// Bits `lo..lo+width` of `entry` (`width` <= 32).
fn field(entry: u64, lo: u32, width: u32) -> u32 {
    let v = (entry >> lo) & ((1 << width) - 1);
    // The mask keeps at most 32 bits.
    u32::try_from(v).unwrap_or(u32::MAX)
}

/// One bit of `entry`.
fn bit(entry: u64, at: u32) -> u8 {
    u8::from((entry >> at) & 1 == 1)
}

/// The `kvm_segment` GDT entry `entry` at `index` describes.
pub fn segment_from_gdt(entry: u64, index: u16) -> kvm_segment {
    let limit = field(entry, 0, 16) | (field(entry, 48, 4) << 16);
    let g = bit(entry, 55);
    let present = bit(entry, 47);
    kvm_segment {
        base: u64::from(field(entry, 16, 24)) | (u64::from(field(entry, 56, 8)) << 24),
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector: index * 8,
        type_: u8::try_from(field(entry, 40, 4)).unwrap_or(0),
        present,
        dpl: u8::try_from(field(entry, 45, 2)).unwrap_or(0),
        db: bit(entry, 54),
        s: bit(entry, 44),
        l: bit(entry, 53),
        g,
        avl: bit(entry, 52),
        unusable: 1 - present,
        padding: 0,
    }
}

/// The part of long-mode entry state every guest shares: the GDT (`base`,
/// `entries`) and IDT (`base`, `limit`) registers, `code` in CS, `data` in
/// SS and every data segment, `tss` in TR, and CR3. CR0/CR4/EFER stay with
/// the caller.
pub fn set_long_mode_segments(
    sregs: &mut kvm_sregs,
    gdt: (u64, usize),
    idt: (u64, u16),
    [code, data, tss]: [kvm_segment; 3],
    cr3: u64,
) {
    sregs.gdt.base = gdt.0;
    // A GDT of at most 8192 entries (the architectural limit) has a 16-bit limit.
    sregs.gdt.limit = u16::try_from(gdt.1 * 8 - 1).unwrap_or(u16::MAX);
    sregs.idt.base = idt.0;
    sregs.idt.limit = idt.1;
    sregs.cs = code;
    sregs.ss = data;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.tr = tss;
    sregs.cr3 = cr3;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gdt_roundtrip() {
        let c = segment_from_gdt(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!((c.l, c.g, c.present, c.type_, c.s), (1, 1, 1, 0xb, 1));
        assert_eq!(c.limit, 0xffff_ffff);
        assert_eq!(c.selector, 8);
        assert_eq!(c.unusable, 0);
        let t = segment_from_gdt(gdt_entry(0x808b, 0, 0xfffff), 3);
        assert_eq!((t.s, t.type_), (0, 0xb));
        let d = segment_from_gdt(gdt_entry(0xc0f3, 0x1234_5678, 0x5_4321), 2);
        assert_eq!((d.base, d.dpl, d.db, d.g), (0x1234_5678, 3, 1, 1));
        assert_eq!(d.limit, 0x5432_1fff);
        assert_eq!(segment_from_gdt(0, 0).unusable, 1);
    }
}
