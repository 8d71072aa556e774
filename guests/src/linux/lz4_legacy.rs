//! The LZ4 "legacy" frame format that Linux uses for LZ4-compressed kernels
//! (`lz4 -l`, decoded at boot by the kernel's `lib/decompress_unlz4.c`).
//!
//! Layout of a bzImage payload compressed this way:
//! - the 4-byte LE magic `0x184C2102`;
//! - blocks, each a 4-byte LE compressed size then that many bytes of raw
//!   LZ4 block data, each decoding to at most 8 MiB; a 4-byte word equal to
//!   the magic between blocks starts a concatenated stream and is skipped
//!   (as the kernel does);
//! - the kernel build appends the uncompressed size as a last 4-byte LE word
//!   (`size_append`), which is not part of the LZ4 stream.
//!
//! Each block is decoded with `lz4_flex::block::decompress_into` straight
//! into its slot of an output buffer sized from the declared total, so a
//! block that decodes larger than 8 MiB or past the declared size is an
//! error, never an unbounded allocation.

use thiserror::Error;

use super::bytes;
use notifier::convert::{u32_to_usize, u64_to_usize, usize_to_u64};

/// The legacy frame magic (LE on disk: `02 21 4c 18`).
pub const MAGIC: u32 = 0x184C_2102;
/// The most one block may decode to (`LZ4_DEFAULT_UNCOMPRESSED_CHUNK_SIZE`).
pub const BLOCK_MAX: usize = 8 << 20;
/// The largest uncompressed size we accept: far above any kernel, and a bound
/// on what a hostile size field can make us allocate.
pub const MAX_UNCOMPRESSED: usize = 512 << 20;

/// LZ4's worst-case expansion of `n` input bytes (`LZ4_COMPRESSBOUND`).
const fn compress_bound(n: usize) -> usize {
    n + n / 255 + 16
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum Lz4LegacyError {
    #[error("LZ4 legacy stream truncated at offset {offset}: {what}")]
    Truncated { offset: usize, what: &'static str },
    #[error("not an LZ4 legacy stream: magic {found:#010x}, expected {MAGIC:#010x}")]
    BadMagic { found: u32 },
    #[error("declared uncompressed size {0} bytes exceeds the {MAX_UNCOMPRESSED}-byte limit")]
    TooLarge(usize),
    #[error("LZ4 block {block} at offset {offset}: compressed size {size} is larger than any 8 MiB block can need")]
    BlockTooLarge {
        block: usize,
        offset: usize,
        size: usize,
    },
    #[error("LZ4 block {block} at offset {offset} is corrupt: {reason}")]
    Corrupt {
        block: usize,
        offset: usize,
        reason: String,
    },
    #[error("LZ4 stream decodes to {actual} bytes, but its trailer declares {declared}")]
    SizeMismatch { declared: usize, actual: usize },
}

/// A short read names the offset it started at and what it read.
impl From<bytes::Truncated> for Lz4LegacyError {
    fn from(t: bytes::Truncated) -> Self {
        Lz4LegacyError::Truncated {
            // Every read here starts at a `usize` offset: lossless.
            offset: u64_to_usize(t.start),
            what: t.what,
        }
    }
}

/// True when `data` starts with the legacy frame magic.
pub fn is_lz4_legacy(data: &[u8]) -> bool {
    data.starts_with(&MAGIC.to_le_bytes())
}

/// Decodes a whole payload: magic, blocks, trailing uncompressed size.
pub fn decompress(payload: &[u8]) -> Result<Vec<u8>, Lz4LegacyError> {
    let magic = bytes::read_le32(payload, "magic", 0)?;
    if magic != MAGIC {
        return Err(Lz4LegacyError::BadMagic { found: magic });
    }
    let trailer_at =
        payload
            .len()
            .checked_sub(4)
            .filter(|&at| at >= 4)
            .ok_or(Lz4LegacyError::Truncated {
                offset: payload.len(),
                what: "uncompressed-size trailer",
            })?;
    let declared = u32_to_usize(bytes::read_le32(
        payload,
        "uncompressed-size trailer",
        trailer_at,
    )?);
    if declared > MAX_UNCOMPRESSED {
        return Err(Lz4LegacyError::TooLarge(declared));
    }
    let stream = &payload[..trailer_at];
    let mut out = vec![0u8; declared];
    let mut produced = 0usize;
    let mut pos = 4usize;
    let mut block = 0usize;
    while pos < stream.len() {
        let size = bytes::read_le32(stream, "block size", pos)?;
        if size == MAGIC {
            pos += 4;
            continue;
        }
        let size = u32_to_usize(size);
        let data_at = pos + 4;
        if size > compress_bound(BLOCK_MAX) {
            return Err(Lz4LegacyError::BlockTooLarge {
                block,
                offset: pos,
                size,
            });
        }
        let input = bytes::slice(
            stream,
            "block data",
            usize_to_u64(data_at),
            usize_to_u64(size),
        )?;
        let slot_end = declared.min(produced + BLOCK_MAX);
        let n =
            lz4_flex::block::decompress_into(input, &mut out[produced..slot_end]).map_err(|e| {
                Lz4LegacyError::Corrupt {
                    block,
                    offset: pos,
                    reason: e.to_string(),
                }
            })?;
        produced += n;
        pos = data_at + size;
        block += 1;
    }
    if produced != declared {
        return Err(Lz4LegacyError::SizeMismatch {
            declared,
            actual: produced,
        });
    }
    Ok(out)
}

/// Encodes `data` in the legacy framing with the kernel's size trailer.
/// The inverse of [`decompress`]; used by tests to build payloads. More
/// than [`MAX_UNCOMPRESSED`] bytes is [`Lz4LegacyError::TooLarge`], as
/// `decompress` would say (the 32-bit trailer could not hold 4 GiB).
pub fn compress(data: &[u8]) -> Result<Vec<u8>, Lz4LegacyError> {
    let too_large = || Lz4LegacyError::TooLarge(data.len());
    if data.len() > MAX_UNCOMPRESSED {
        return Err(too_large());
    }
    let total = u32::try_from(data.len()).map_err(|_| too_large())?;
    let mut out = MAGIC.to_le_bytes().to_vec();
    for chunk in data.chunks(BLOCK_MAX) {
        let block = lz4_flex::block::compress(chunk);
        // A block of at most 8 MiB compresses to at most
        // compress_bound(8 MiB) < 4 GiB: never an error.
        let size = u32::try_from(block.len()).map_err(|_| too_large())?;
        out.extend_from_slice(&size.to_le_bytes());
        out.extend_from_slice(&block);
    }
    out.extend_from_slice(&total.to_le_bytes());
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The low 8 bits (a test pattern: truncation wanted).
    fn low_byte(x: usize) -> u8 {
        x.to_le_bytes()[0]
    }

    fn sample(len: usize) -> Vec<u8> {
        // Compressible but not trivial: a counter pattern with some noise.
        (0..len)
            .map(|i| low_byte(i / 7) ^ low_byte((i * 31) >> 11))
            .collect()
    }

    #[test]
    fn round_trip_small_and_multi_block() {
        for len in [0, 1, 1000, BLOCK_MAX, BLOCK_MAX + 12345] {
            let data = sample(len);
            let packed = compress(&data).unwrap();
            assert_eq!(decompress(&packed).unwrap(), data, "len {len}");
        }
    }

    #[test]
    fn skips_a_magic_between_blocks() {
        let data = sample(BLOCK_MAX + 100);
        let mut packed = MAGIC.to_le_bytes().to_vec();
        for chunk in data.chunks(BLOCK_MAX) {
            let block = lz4_flex::block::compress(chunk);
            packed.extend_from_slice(&MAGIC.to_le_bytes());
            packed.extend_from_slice(&u32::try_from(block.len()).unwrap().to_le_bytes());
            packed.extend_from_slice(&block);
        }
        packed.extend_from_slice(&u32::try_from(data.len()).unwrap().to_le_bytes());
        assert_eq!(decompress(&packed).unwrap(), data);
    }

    #[test]
    fn bad_magic() {
        let mut packed = compress(b"hello").unwrap();
        packed[0] ^= 0xff;
        assert!(matches!(
            decompress(&packed),
            Err(Lz4LegacyError::BadMagic { .. })
        ));
    }

    #[test]
    fn truncated_anywhere_is_an_error_not_a_panic() {
        let data = sample(5000);
        let packed = compress(&data).unwrap();
        for cut in 0..packed.len() {
            assert!(decompress(&packed[..cut]).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn corrupted_block_is_an_error() {
        let data = sample(100_000);
        let packed = compress(&data).unwrap();
        // Flip bytes throughout the block data: every result must be an Err or
        // (if the flip happened to stay valid) data of the declared size.
        for at in (8..packed.len() - 4).step_by(97) {
            let mut bad = packed.clone();
            bad[at] ^= 0xa5;
            if let Ok(out) = decompress(&bad) {
                assert_eq!(out.len(), data.len());
            }
        }
        // A block-size field pointing past the end.
        let mut bad = packed.clone();
        bad[4..8].copy_from_slice(&u32::try_from(packed.len()).unwrap().to_le_bytes());
        assert!(matches!(
            decompress(&bad),
            Err(Lz4LegacyError::Truncated { .. })
        ));
    }

    #[test]
    fn size_mismatch_and_hostile_size() {
        let data = sample(3000);
        let mut packed = compress(&data).unwrap();
        let n = packed.len();
        packed[n - 4..].copy_from_slice(&2000u32.to_le_bytes());
        assert!(decompress(&packed).is_err());
        packed[n - 4..].copy_from_slice(&4000u32.to_le_bytes());
        assert_eq!(
            decompress(&packed),
            Err(Lz4LegacyError::SizeMismatch {
                declared: 4000,
                actual: 3000
            })
        );
        packed[n - 4..].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decompress(&packed),
            Err(Lz4LegacyError::TooLarge(_))
        ));
    }
}
