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
//! Only the framing is decoded here; each block is decoded by
//! `lz4_flex::block::decompress_into` straight into its slot of the output,
//! at most 8 MiB and never past the caller's limit, so a hostile stream is
//! an error, never an unbounded allocation.

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

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum Lz4LegacyError {
    #[error("LZ4 legacy stream truncated at offset {offset}: {what}")]
    Truncated { offset: usize, what: &'static str },
    #[error("not an LZ4 legacy stream: magic {found:#010x}, expected {MAGIC:#010x}")]
    BadMagic { found: u32 },
    #[error("LZ4 stream decodes to more than the {limit}-byte limit")]
    TooLarge { limit: usize },
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

/// Decodes a whole payload: magic, blocks, the optional size trailer, into
/// at most [`MAX_UNCOMPRESSED`] bytes.
pub fn decompress(payload: &[u8]) -> Result<Vec<u8>, Lz4LegacyError> {
    decompress_limited(payload, MAX_UNCOMPRESSED)
}

/// [`decompress`] into at most `limit` bytes ([`Lz4LegacyError::TooLarge`]
/// past it).
///
/// Follows `unlz4()` of the kernel's `lib/decompress_unlz4.c`: after the
/// magic, 4-byte LE chunk sizes each followed by that many bytes of LZ4
/// block data decoding to at most 8 MiB; a chunk size equal to the magic
/// is skipped (a concatenated stream); a chunk size of 0, or fewer than 4
/// bytes left, ends the stream. A last 4-byte word with nothing after it
/// is the build's `size_append` trailer (absent in what `lz4 -l` writes
/// alone): it must then equal the decoded size.
pub fn decompress_limited(payload: &[u8], limit: usize) -> Result<Vec<u8>, Lz4LegacyError> {
    let magic = bytes::read_le32(payload, "magic", 0)?;
    if magic != MAGIC {
        return Err(Lz4LegacyError::BadMagic { found: magic });
    }
    // The last word, if it is the size trailer, sizes the output at once;
    // whether it is one is known only at the end (no trailer after a
    // stream of `lz4 -l` alone), so it is only a capacity hint here.
    let hint = payload
        .len()
        .checked_sub(4)
        .filter(|&at| at >= 4)
        .and_then(|at| bytes::le32(payload, at))
        .map_or(0, u32_to_usize)
        .min(limit)
        .min(payload.len().saturating_mul(255));
    let mut out = Vec::with_capacity(hint);
    let mut pos = 4usize;
    let mut block = 0usize;
    let mut trailer = None;
    while pos < payload.len() {
        let size = bytes::read_le32(payload, "block size", pos)?;
        if pos + 4 == payload.len() {
            // The size trailer (or a final end-of-stream 0).
            trailer = Some(u32_to_usize(size)).filter(|&n| n != 0 || out.is_empty());
            break;
        }
        if size == MAGIC {
            pos += 4;
            continue;
        }
        if size == 0 {
            break;
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
            payload,
            "block data",
            usize_to_u64(data_at),
            usize_to_u64(size),
        )?;
        let produced = out.len();
        let room = BLOCK_MAX.min(limit - produced);
        out.resize(produced + room, 0);
        let decoded = lz4_flex::block::decompress_into(input, &mut out[produced..]);
        let n = match decoded {
            Ok(n) => n,
            Err(lz4_flex::block::DecompressError::OutputTooSmall { .. }) if room < BLOCK_MAX => {
                return Err(Lz4LegacyError::TooLarge { limit });
            }
            Err(e) => {
                return Err(Lz4LegacyError::Corrupt {
                    block,
                    offset: pos,
                    reason: e.to_string(),
                })
            }
        };
        out.truncate(produced + n);
        pos = data_at + size;
        block += 1;
    }
    if let Some(declared) = trailer {
        if declared != out.len() {
            return Err(Lz4LegacyError::SizeMismatch {
                declared,
                actual: out.len(),
            });
        }
    }
    Ok(out)
}

/// Encodes `data` in the legacy framing with the kernel's size trailer.
/// The inverse of [`decompress`]; used by tests to build payloads. More
/// than [`MAX_UNCOMPRESSED`] bytes is [`Lz4LegacyError::TooLarge`], as
/// `decompress` would say (the 32-bit trailer could not hold 4 GiB).
pub fn compress(data: &[u8]) -> Result<Vec<u8>, Lz4LegacyError> {
    let too_large = || Lz4LegacyError::TooLarge {
        limit: MAX_UNCOMPRESSED,
    };
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
            match cut {
                // The magic alone: an empty stream, as the kernel reads it.
                4 => assert_eq!(decompress(&packed[..cut]).unwrap(), b""),
                // Without the size trailer: what `lz4 -l` writes alone.
                c if c == packed.len() - 4 => {
                    assert_eq!(decompress(&packed[..cut]).unwrap(), data)
                }
                _ => assert!(decompress(&packed[..cut]).is_err(), "cut at {cut}"),
            }
        }
    }

    #[test]
    fn limit_is_enforced_with_and_without_trailer() {
        let data = sample(BLOCK_MAX + 5000);
        let packed = compress(&data).unwrap();
        assert!(matches!(
            decompress_limited(&packed, data.len() - 1),
            Err(Lz4LegacyError::TooLarge { .. })
        ));
        let bare = &packed[..packed.len() - 4];
        for limit in [0, 100, BLOCK_MAX, data.len() - 1] {
            assert!(
                matches!(
                    decompress_limited(bare, limit),
                    Err(Lz4LegacyError::TooLarge { .. })
                ),
                "limit {limit}"
            );
        }
        assert_eq!(decompress_limited(bare, data.len()).unwrap(), data);
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
        // A hostile trailer allocates nothing: it is a mismatch.
        packed[n - 4..].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            decompress(&packed),
            Err(Lz4LegacyError::SizeMismatch { .. })
        ));
    }
}
