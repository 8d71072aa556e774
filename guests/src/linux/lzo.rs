//! LZO-compressed kernels: the lzop file format (`lzop -9`, the kernel's
//! `cmd_lzo_with_size`) and the LZO1X block format inside it, decoded by
//! hand.
//!
//! Why by hand: the LZO crates on crates.io are GPL (`lzo1x`, `rust-lzo`,
//! `minilzo-rs`: the workspace is Apache-2.0) or index out of bounds on a
//! corrupt stream (`lzokay-native` 0.1: a panic, and no output bound). The
//! format is small: [`lzo1x_decompress`] follows the byte-sequence rules of
//! the kernel's `Documentation/staging/lzo.rst` (the LZO1X bitstream that
//! `lzo1x_decompress_safe()` reads), every read and back-reference checked,
//! the output bounded by the block's declared size.
//!
//! The lzop framing follows `parse_header()` and `unlzo()` of the kernel's
//! `lib/decompress_unlzo.c`:
//! - the 9-byte magic `89 4c 5a 4f 00 0d 0a 1a 0a`;
//! - version (BE16), then library version, version needed to extract and
//!   method (7 bytes with the version); a level byte when version >= 0x0940;
//!   flags (BE32), plus a 4-byte filter when `F_H_FILTER`; mode and
//!   mtime_low (8 bytes), mtime_high when version >= 0x0940; a file name
//!   (length byte + bytes); the header checksum (4 bytes);
//! - blocks: uncompressed size (BE32, 0 ends the stream, at most 256 KiB),
//!   compressed size (BE32, non-zero, at most the uncompressed size), the
//!   checksums, the data: LZO1X when smaller than the uncompressed size,
//!   else stored.
//!
//! The kernel skips exactly 4 checksum bytes per block (lzop's default:
//! adler32 of the uncompressed data). This decoder reads the checksums
//! lzop's flags declare (adler32/crc32 of the uncompressed data, and of the
//! compressed data when it is compressed), which is the same for what
//! `lzop` writes by default, and verifies the uncompressed adler32 when
//! present. Bytes after the end-of-stream block (the kernel's size
//! trailer) are ignored.

use thiserror::Error;

use notifier::convert::u32_to_usize;

/// The lzop file magic.
pub const MAGIC: [u8; 9] = [0x89, 0x4c, 0x5a, 0x4f, 0x00, 0x0d, 0x0a, 0x1a, 0x0a];
/// The largest uncompressed block (`LZO_BLOCK_SIZE` in decompress_unlzo.c).
pub const BLOCK_MAX: usize = 256 * 1024;

const F_ADLER32_D: u32 = 0x0000_0001;
const F_ADLER32_C: u32 = 0x0000_0002;
const F_CRC32_D: u32 = 0x0000_0100;
const F_CRC32_C: u32 = 0x0000_0200;
const F_H_FILTER: u32 = 0x0000_0800;

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum LzoError {
    #[error("lzop stream truncated at offset {offset}: {what}")]
    Truncated { offset: usize, what: &'static str },
    #[error("not an lzop stream (no lzop magic)")]
    BadMagic,
    #[error("lzop block at offset {offset}: {reason}")]
    BadBlock { offset: usize, reason: String },
    #[error("lzop block at offset {offset}: adler32 {actual:#010x} of the decoded data, the block says {expected:#010x}")]
    Checksum {
        offset: usize,
        expected: u32,
        actual: u32,
    },
    #[error("lzop stream decodes to more than the {limit}-byte limit")]
    TooLarge { limit: usize },
    #[error("LZO1X block at offset {offset}: {reason}")]
    Corrupt { offset: usize, reason: &'static str },
}

/// True when `data` starts with the lzop magic.
pub fn is_lzop(data: &[u8]) -> bool {
    data.starts_with(&MAGIC)
}

/// A cursor over the input whose reads name what they read.
struct Input<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Input<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], LzoError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.data.len());
        let Some(end) = end else {
            return Err(LzoError::Truncated {
                offset: self.pos,
                what,
            });
        };
        let s = &self.data[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, LzoError> {
        Ok(self.take(1, what)?[0])
    }

    fn be16(&mut self, what: &'static str) -> Result<u16, LzoError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn be32(&mut self, what: &'static str) -> Result<u32, LzoError> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
}

/// Adler-32 (RFC 1950), as lzop computes it over each block.
pub fn adler32(data: &[u8]) -> u32 {
    const MOD: u32 = 65521;
    let (mut a, mut b) = (1u32, 0u32);
    // 5552 is the most bytes the sums can take before they must be reduced.
    for chunk in data.chunks(5552) {
        for &x in chunk {
            a += u32::from(x);
            b += a;
        }
        a %= MOD;
        b %= MOD;
    }
    (b << 16) | a
}

/// Decodes an lzop stream (one file) into at most `limit` bytes.
pub fn decompress(payload: &[u8], limit: usize) -> Result<Vec<u8>, LzoError> {
    let mut inp = Input {
        data: payload,
        pos: 0,
    };
    if inp.take(MAGIC.len(), "magic")? != MAGIC {
        return Err(LzoError::BadMagic);
    }
    // parse_header(): version, then library version, version needed and
    // method (7 bytes in all).
    let version = inp.be16("header version")?;
    inp.take(5, "header versions and method")?;
    if version >= 0x0940 {
        inp.take(1, "header level")?;
    }
    let flags = inp.be32("header flags")?;
    if flags & F_H_FILTER != 0 {
        inp.take(4, "header filter")?;
    }
    inp.take(8, "header mode and mtime")?;
    if version >= 0x0940 {
        inp.take(4, "header mtime_high")?;
    }
    let name_len = usize::from(inp.u8("header name length")?);
    inp.take(name_len, "header file name")?;
    inp.take(4, "header checksum")?;

    let d_sums = usize::from(flags & F_ADLER32_D != 0) + usize::from(flags & F_CRC32_D != 0);
    let c_sums = usize::from(flags & F_ADLER32_C != 0) + usize::from(flags & F_CRC32_C != 0);
    let mut out = Vec::new();
    loop {
        let at = inp.pos;
        let dst_len = u32_to_usize(inp.be32("block uncompressed size")?);
        if dst_len == 0 {
            break;
        }
        if dst_len > BLOCK_MAX {
            return Err(LzoError::BadBlock {
                offset: at,
                reason: format!(
                    "uncompressed size {dst_len} is over the {BLOCK_MAX}-byte block size"
                ),
            });
        }
        let src_len = u32_to_usize(inp.be32("block compressed size")?);
        if src_len == 0 || src_len > dst_len {
            return Err(LzoError::BadBlock {
                offset: at,
                reason: format!("compressed size {src_len} for {dst_len} bytes"),
            });
        }
        let adler_d = if flags & F_ADLER32_D != 0 {
            Some(inp.be32("block checksum")?)
        } else {
            None
        };
        let rest =
            d_sums - usize::from(adler_d.is_some()) + if src_len < dst_len { c_sums } else { 0 };
        inp.take(4 * rest, "block checksums")?;
        let data = inp.take(src_len, "block data")?;
        if out.len() + dst_len > limit {
            return Err(LzoError::TooLarge { limit });
        }
        let start = out.len();
        if src_len == dst_len {
            out.extend_from_slice(data);
        } else {
            lzo1x_decompress(data, &mut out, dst_len)
                .map_err(|reason| LzoError::Corrupt { offset: at, reason })?;
        }
        if let Some(expected) = adler_d {
            let actual = adler32(&out[start..]);
            if actual != expected {
                return Err(LzoError::Checksum {
                    offset: at,
                    expected,
                    actual,
                });
            }
        }
    }
    Ok(out)
}

/// Appends the decoding of one LZO1X block (a stream ending with its
/// end-of-stream instruction, nothing after it) to `out`, which must then
/// have grown by exactly `expected` bytes. Back-references reach only into
/// this block's output, as lzop compresses each block on its own.
pub fn lzo1x_decompress(
    src: &[u8],
    out: &mut Vec<u8>,
    expected: usize,
) -> Result<(), &'static str> {
    let base = out.len();
    let limit = base + expected;
    let mut ip = 0usize;
    let next = |ip: &mut usize| -> Result<u8, &'static str> {
        let b = *src.get(*ip).ok_or("input overrun")?;
        *ip += 1;
        Ok(b)
    };
    // `zero_bytes * 255 + non_zero_byte` of the long length encodings.
    let long_len = |ip: &mut usize, bias: usize| -> Result<usize, &'static str> {
        let mut n = bias;
        loop {
            match next(ip)? {
                0 => n = n.checked_add(255).ok_or("length overflow")?,
                b => return n.checked_add(usize::from(b)).ok_or("length overflow"),
            }
        }
    };
    let literals = |ip: &mut usize, out: &mut Vec<u8>, n: usize| -> Result<(), &'static str> {
        let end = ip.checked_add(n).filter(|&e| e <= src.len());
        let end = end.ok_or("input overrun")?;
        if out.len() + n > limit {
            return Err("output overrun");
        }
        out.extend_from_slice(&src[*ip..end]);
        *ip = end;
        Ok(())
    };

    // The number of literals the last instruction copied: 0, 1-3, or 4
    // for "4 or more" (it changes what instructions 0..15 mean).
    let mut state = 0usize;
    // As lzo1x_decompress_safe(): a stream of 5 bytes or more starting with
    // 17 names its bitstream version in the next byte (1 is LZO-RLE, which
    // zram uses and lzop never writes).
    if src.len() >= 5 && src[0] == 17 {
        if src[1] != 0 {
            return Err("LZO-RLE bitstream (version byte 1): not what lzop writes");
        }
        ip = 2;
    }
    match src.get(ip).copied() {
        Some(b) if b > 17 => {
            // 18..255: copy (b - 17) literals.
            ip += 1;
            let n = usize::from(b - 17);
            literals(&mut ip, out, n)?;
            state = n.min(4);
        }
        _ => {}
    }
    loop {
        let inst = next(&mut ip)?;
        let (len, dist, s) = match inst {
            // 1LLDDDSS / 01LDDDSS (M2): 3-8 bytes within 2 KiB.
            64..=255 => {
                let h = usize::from(next(&mut ip)?);
                let len = usize::from(inst >> 5) + 1;
                let dist = (h << 3) + usize::from((inst >> 2) & 7) + 1;
                (len, dist, usize::from(inst & 3))
            }
            // 001LLLLL (M3): within 16 KiB.
            32..=63 => {
                let len = match usize::from(inst & 31) {
                    0 => long_len(&mut ip, 31)?,
                    l => l,
                } + 2;
                let d = usize::from(u16::from_le_bytes([next(&mut ip)?, next(&mut ip)?]));
                (len, (d >> 2) + 1, d & 3)
            }
            // 0001HLLL (M4): 16-48 KiB; distance 16384 ends the stream.
            16..=31 => {
                let len = match usize::from(inst & 7) {
                    0 => long_len(&mut ip, 7)?,
                    l => l,
                } + 2;
                let d = usize::from(u16::from_le_bytes([next(&mut ip)?, next(&mut ip)?]));
                let dist = 16384 + (usize::from(inst & 8) << 11) + (d >> 2);
                if dist == 16384 {
                    if ip != src.len() {
                        return Err("bytes after the end-of-stream instruction");
                    }
                    if out.len() != limit {
                        return Err("block decodes to fewer bytes than its header says");
                    }
                    return Ok(());
                }
                (len, dist, d & 3)
            }
            // 0000LLLL after no literals: a run of 4 or more literals.
            0..=15 if state == 0 => {
                let n = match usize::from(inst) {
                    0 => long_len(&mut ip, 15)?,
                    l => l,
                } + 3;
                literals(&mut ip, out, n)?;
                state = 4;
                continue;
            }
            // 0000DDSS after 1-3 literals: 2 bytes within 1 KiB.
            0..=15 if state < 4 => {
                let h = usize::from(next(&mut ip)?);
                (
                    2,
                    (h << 2) + usize::from(inst >> 2) + 1,
                    usize::from(inst & 3),
                )
            }
            // 0000DDSS after 4+ literals: 3 bytes 2-3 KiB back.
            0..=15 => {
                let h = usize::from(next(&mut ip)?);
                (
                    3,
                    (h << 2) + usize::from(inst >> 2) + 2049,
                    usize::from(inst & 3),
                )
            }
        };
        let produced = out.len() - base;
        if dist > produced {
            return Err("back-reference before the start of the block");
        }
        if out.len() + len > limit {
            return Err("output overrun");
        }
        // Byte by byte: the source may overlap what this copy writes.
        let from = out.len() - dist;
        for i in 0..len {
            let b = out[from + i];
            out.push(b);
        }
        literals(&mut ip, out, s)?;
        state = s;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(len: usize) -> Vec<u8> {
        // Text-like with repeats near and far, and some noise.
        let words: [&[u8]; 6] = [
            b"kernel ",
            b"module ",
            b"\x00\x00\x00\x00",
            b"lzo ",
            b"x86 ",
            b"\xe8\x10\x20\x30\x40",
        ];
        let mut v = Vec::with_capacity(len);
        let mut x = 0x1234_5678u32;
        while v.len() < len {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let w = words[usize::try_from(x % 6).unwrap()];
            v.extend_from_slice(w);
            if x.is_multiple_of(7) {
                v.push(x.to_le_bytes()[1]);
            }
        }
        v.truncate(len);
        v
    }

    /// An lzop file as `lzop` 1.04 writes one from stdin (version 0x1040,
    /// method LZO1X-999, flags = adler32 of the uncompressed data), blocks
    /// compressed by lzokay-native's independent LZO1X encoder.
    fn lzop(data: &[u8], flags: u32) -> Vec<u8> {
        let mut f = MAGIC.to_vec();
        f.extend_from_slice(&0x1040u16.to_be_bytes());
        f.extend_from_slice(&0x20a0u16.to_be_bytes());
        f.extend_from_slice(&0x0940u16.to_be_bytes());
        f.push(3); // method: LZO1X-999
        f.push(9); // level
        f.extend_from_slice(&flags.to_be_bytes());
        f.extend_from_slice(&[0; 12]); // mode, mtime_low, mtime_high
        f.push(0); // no file name
        f.extend_from_slice(&[0; 4]); // header checksum (not checked)
        for block in data.chunks(BLOCK_MAX) {
            let packed = lzokay_native::compress(block).unwrap();
            f.extend_from_slice(&u32::try_from(block.len()).unwrap().to_be_bytes());
            let stored = packed.len() >= block.len();
            let body = if stored { block } else { &packed };
            f.extend_from_slice(&u32::try_from(body.len()).unwrap().to_be_bytes());
            if flags & F_ADLER32_D != 0 {
                f.extend_from_slice(&adler32(block).to_be_bytes());
            }
            if flags & F_CRC32_D != 0 {
                f.extend_from_slice(&[0xcc; 4]);
            }
            if !stored && flags & F_ADLER32_C != 0 {
                f.extend_from_slice(&adler32(body).to_be_bytes());
            }
            f.extend_from_slice(body);
        }
        f.extend_from_slice(&0u32.to_be_bytes());
        f
    }

    #[test]
    fn adler32_known_value() {
        // RFC 1950's example value for "Wikipedia".
        assert_eq!(adler32(b"Wikipedia"), 0x11e6_0398);
        assert_eq!(adler32(b""), 1);
    }

    #[test]
    fn round_trip_with_an_independent_encoder() {
        for len in [0, 1, 3, 17, 300, 5000, BLOCK_MAX, 3 * BLOCK_MAX + 777] {
            let data = sample(len);
            let packed = lzop(&data, F_ADLER32_D);
            assert_eq!(decompress(&packed, usize::MAX).unwrap(), data, "len {len}");
        }
        // Every checksum lzop can declare is skipped at its place.
        let data = sample(100_000);
        let all = F_ADLER32_D | F_CRC32_D | F_ADLER32_C;
        assert_eq!(decompress(&lzop(&data, all), usize::MAX).unwrap(), data);
        assert_eq!(decompress(&lzop(&data, 0), usize::MAX).unwrap(), data);
    }

    #[test]
    fn incompressible_blocks_are_stored() {
        let mut x = 0x9e37_79b9u32;
        let data: Vec<u8> = (0..70_000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x.to_le_bytes()[0]
            })
            .collect();
        assert_eq!(
            decompress(&lzop(&data, F_ADLER32_D), usize::MAX).unwrap(),
            data
        );
    }

    #[test]
    fn damage_is_an_error_never_a_panic() {
        let data = sample(20_000);
        let packed = lzop(&data, F_ADLER32_D);
        for cut in 0..packed.len() {
            assert!(decompress(&packed[..cut], usize::MAX).is_err(), "cut {cut}");
        }
        let mut flipped = 0;
        for at in 9..packed.len() {
            let mut bad = packed.clone();
            bad[at] ^= 0x5a;
            match decompress(&bad, usize::MAX) {
                Ok(out) => assert_eq!(out, data, "a flip at {at} decoded to other data"),
                Err(_) => flipped += 1,
            }
        }
        assert!(flipped > packed.len() / 2);
    }

    #[test]
    fn checksum_mismatch_is_reported() {
        let data = sample(1000);
        let mut packed = lzop(&data, F_ADLER32_D);
        let hdr = MAGIC.len() + 2 + 5 + 1 + 4 + 12 + 1 + 4;
        packed[hdr + 8] ^= 1;
        assert!(matches!(
            decompress(&packed, usize::MAX),
            Err(LzoError::Checksum { .. })
        ));
    }

    #[test]
    fn limit_and_block_size_bounds() {
        let data = sample(BLOCK_MAX + 10);
        let packed = lzop(&data, F_ADLER32_D);
        assert_eq!(
            decompress(&packed, BLOCK_MAX),
            Err(LzoError::TooLarge { limit: BLOCK_MAX })
        );
        let hdr = MAGIC.len() + 2 + 5 + 1 + 4 + 12 + 1 + 4;
        let mut bad = packed.clone();
        bad[hdr..hdr + 4].copy_from_slice(&u32::try_from(BLOCK_MAX + 1).unwrap().to_be_bytes());
        assert!(matches!(
            decompress(&bad, usize::MAX),
            Err(LzoError::BadBlock { .. })
        ));
    }

    #[test]
    fn lzo1x_rejects_hostile_streams() {
        let mut out = Vec::new();
        // A match before any output.
        assert!(lzo1x_decompress(&[0x40, 0x00], &mut out, 16).is_err());
        // A literal run longer than the block.
        out.clear();
        assert!(lzo1x_decompress(&[0x00, 0x00, 0x00, 0x01], &mut out, 16).is_err());
        // Only the end marker, for an empty block.
        out.clear();
        assert_eq!(lzo1x_decompress(&[0x11, 0x00, 0x00], &mut out, 0), Ok(()));
        assert!(lzo1x_decompress(&[0x11, 0x01, 0x11, 0x00, 0x00], &mut out, 0).is_err());
        out.clear();
        assert_eq!(
            lzo1x_decompress(&[0x15, b'a', b'b', b'c', b'd', 0x11, 0, 0], &mut out, 4),
            Ok(())
        );
        assert_eq!(out, b"abcd");
    }
}
