//! Decoding on the host whatever the kernel decodes at boot: a bzImage
//! payload in any compression the x86 boot protocol allows (gzip, bzip2,
//! lzma, xz, lzo, lz4, zstd: `CONFIG_KERNEL_*`), and kernel modules as
//! Debian ships them (`.ko`, `.ko.xz`, `.ko.zst`, `.ko.gz`).
//!
//! Each format as the kernel build writes it (`scripts/Makefile.lib`) and
//! the kernel reads it (`lib/decompress_*.c`):
//!
//! | format | written by | read by the kernel | decoded here with |
//! |---|---|---|---|
//! | gzip | `cmd_gzip`: `gzip -n -f -9` | `lib/decompress_inflate.c` `__gunzip()` | `flate2` (miniz_oxide) |
//! | bzip2 | `cmd_bzip2_with_size`: `bzip2 -9` | `lib/decompress_bunzip2.c` `bunzip2()` | `bzip2` (libbz2-rs-sys) |
//! | lzma | `cmd_lzma_with_size`: `lzma -9`, the legacy .lzma ("alone") format | `lib/decompress_unlzma.c` `unlzma()` | `lzma-rust2` `LzmaReader` |
//! | xz | `cmd_xzkern_with_size`: `scripts/xz_wrap.sh`, `xz --check=crc32 --x86 --lzma2=...` | `lib/decompress_unxz.c` `unxz()` | `lzma-rust2` `XzReader` (BCJ x86) |
//! | lzo | `cmd_lzo_with_size`: `lzop -9` | `lib/decompress_unlzo.c` `unlzo()` | [`super::lzo`] (by hand) |
//! | lz4 | `cmd_lz4_with_size`: `lz4 -l -9` (legacy frame) | `lib/decompress_unlz4.c` `unlz4()` | [`super::lz4_legacy`] framing + `lz4_flex` blocks |
//! | zstd | `cmd_zstd22_with_size`: `zstd -22 --ultra` | `lib/decompress_unzstd.c` `unzstd()` | `ruzstd` |
//!
//! The `*_with_size` commands append the uncompressed size as 4 LE bytes
//! (`size_append`): every decoder here stops at the end of its stream and
//! ignores what follows (the LZ4 framing, which has no end marker, checks
//! it). The output is capped ([`MAX_OUTPUT`], or the caller's limit): a
//! crafted payload is [`DecompressError::TooLarge`], never an exhausted
//! memory, and bad input is an error, never a panic.

use std::io::{self, Read};

use thiserror::Error;

use super::elf;
use super::lz4_legacy::{self, Lz4LegacyError};
use super::lzo::{self, LzoError};
use notifier::convert::{u32_to_usize, usize_to_u64};

/// The most a payload may decode to: far above any kernel (a Debian
/// vmlinux is 30-60 MiB) or module.
pub const MAX_OUTPUT: usize = 512 << 20;

/// The largest zstd window accepted. `lib/decompress_unzstd.c` allows
/// `1 << ZSTD_WINDOWLOG_MAX` (2 GiB on 64-bit) and `zstd -22 --ultra` uses
/// up to 128 MiB (window log 27); a window larger than [`MAX_OUTPUT`] can
/// never be needed to produce at most that much output, and the decoder
/// reserves the window up front, so the cap is the output cap.
pub const ZSTD_MAX_WINDOW: u64 = usize_to_u64(MAX_OUTPUT);

/// What a payload is compressed with, recognised by its magic bytes (the
/// kernel's `lib/decompress.c` `compressed_formats` table).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Lz4Legacy,
    Gzip,
    Xz,
    Zstd,
    Bzip2,
    Lzma,
    Lzo,
    /// An ELF already (CONFIG_KERNEL_UNCOMPRESSED).
    None,
    Unknown([u8; 4]),
}

impl std::fmt::Display for Compression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Compression::Lz4Legacy => f.write_str("LZ4 (legacy frame)"),
            Compression::Gzip => f.write_str("gzip"),
            Compression::Xz => f.write_str("xz"),
            Compression::Zstd => f.write_str("zstd"),
            Compression::Bzip2 => f.write_str("bzip2"),
            Compression::Lzma => f.write_str("lzma"),
            Compression::Lzo => f.write_str("lzo"),
            Compression::None => f.write_str("uncompressed"),
            Compression::Unknown(m) => write!(f, "of unknown compression (magic {m:02x?})"),
        }
    }
}

impl Compression {
    /// Every compression a bzImage payload may use, the uncompressed one
    /// included.
    pub const ALL: [Compression; 8] = [
        Compression::Gzip,
        Compression::Bzip2,
        Compression::Lzma,
        Compression::Xz,
        Compression::Lzo,
        Compression::Lz4Legacy,
        Compression::Zstd,
        Compression::None,
    ];

    /// Identifies a payload by its first bytes.
    pub fn detect(payload: &[u8]) -> Compression {
        let p = payload;
        if lz4_legacy::is_lz4_legacy(p) {
            Compression::Lz4Legacy
        } else if p.starts_with(&[0x1f, 0x8b]) {
            Compression::Gzip
        } else if p.starts_with(&[0xfd, b'7', b'z', b'X', b'Z', 0x00]) {
            Compression::Xz
        } else if p.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
            Compression::Zstd
        } else if p.starts_with(b"BZh") {
            Compression::Bzip2
        } else if p.starts_with(&[0x5d, 0x00, 0x00]) {
            Compression::Lzma
        } else if lzo::is_lzop(p) {
            Compression::Lzo
        } else if elf::is_elf(p) {
            Compression::None
        } else {
            let mut m = [0u8; 4];
            for (d, s) in m.iter_mut().zip(p) {
                *d = *s;
            }
            Compression::Unknown(m)
        }
    }
}

#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum DecompressError {
    #[error("payload is of unknown compression (magic {magic:02x?})")]
    UnknownFormat { magic: [u8; 4] },
    #[error("{format} payload is truncated: {detail}")]
    Truncated { format: Compression, detail: String },
    #[error("{format} payload is corrupt: {detail}")]
    Corrupt { format: Compression, detail: String },
    #[error("{format} payload decodes to more than the {limit}-byte limit")]
    TooLarge { format: Compression, limit: usize },
    #[error("{0}")]
    Lz4(#[from] Lz4LegacyError),
    #[error("{0}")]
    Lzo(#[from] LzoError),
    #[error("{name}: not a kernel module name (.ko, .ko.xz, .ko.zst or .ko.gz)")]
    ModuleName { name: String },
    #[error("{name}: the name says {expected}, the bytes are {found}")]
    ModuleMismatch {
        name: String,
        expected: Compression,
        found: Compression,
    },
    #[error("{name}: the module is not an ELF file once decompressed")]
    ModuleNotElf { name: String },
}

/// Decodes `payload`, compressed with `c`, into at most [`MAX_OUTPUT`]
/// bytes. Bytes after the end of the compressed stream (the kernel's size
/// trailer) are ignored. `Compression::None` is the payload itself.
pub fn decompress(c: Compression, payload: &[u8]) -> Result<Vec<u8>, DecompressError> {
    decompress_limited(c, payload, MAX_OUTPUT)
}

/// [`decompress`] into at most `limit` bytes.
pub fn decompress_limited(
    c: Compression,
    payload: &[u8],
    limit: usize,
) -> Result<Vec<u8>, DecompressError> {
    let hint = size_hint(payload, limit);
    match c {
        Compression::None => {
            if payload.len() > limit {
                return Err(DecompressError::TooLarge { format: c, limit });
            }
            Ok(payload.to_vec())
        }
        Compression::Unknown(magic) => Err(DecompressError::UnknownFormat { magic }),
        // unlz4(): the legacy frame by hand, LZ4 blocks by lz4_flex.
        Compression::Lz4Legacy => {
            lz4_legacy::decompress_limited(payload, limit).map_err(|e| match e {
                Lz4LegacyError::TooLarge { limit } => {
                    DecompressError::TooLarge { format: c, limit }
                }
                other => other.into(),
            })
        }
        // unlzo(): lzop framing and LZO1X blocks by hand.
        Compression::Lzo => lzo::decompress(payload, limit).map_err(|e| match e {
            LzoError::TooLarge { limit } => DecompressError::TooLarge { format: c, limit },
            other => other.into(),
        }),
        // __gunzip(): one gzip member (CRC32 and ISIZE checked), anything
        // after it ignored.
        Compression::Gzip => read_capped(c, flate2::read::GzDecoder::new(payload), limit, hint),
        // bunzip2(): one bzip2 stream (block and stream CRCs checked).
        Compression::Bzip2 => read_capped(c, bzip2::read::BzDecoder::new(payload), limit, hint),
        // unlzma(): the 13-byte .lzma header (properties, dictionary size,
        // uncompressed size or all-ones for "until the end marker"), then
        // raw LZMA.
        Compression::Lzma => {
            let r = lzma_rust2::LzmaReader::new_mem_limit(payload, u32::MAX, None)
                .map_err(|e| io_error(c, &e))?;
            read_capped(c, r, limit, hint)
        }
        // unxz(): one .xz stream, any filter chain xz-embedded supports
        // (the kernel's is BCJ x86 + LZMA2, CRC32 check); single-stream,
        // as the trailer would read as bad stream padding.
        Compression::Xz => read_capped(c, lzma_rust2::XzReader::new(payload, false), limit, hint),
        // unzstd(): one frame, windows up to ZSTD_MAX_WINDOW, the content
        // checksum checked when the frame has one.
        Compression::Zstd => zstd(payload, limit, hint),
    }
}

fn zstd(payload: &[u8], limit: usize, hint: usize) -> Result<Vec<u8>, DecompressError> {
    let c = Compression::Zstd;
    let mut frame = ruzstd::decoding::FrameDecoder::new();
    frame.set_max_window_size(ZSTD_MAX_WINDOW);
    let mut r =
        ruzstd::decoding::StreamingDecoder::new_with_decoder(payload, frame).map_err(|e| {
            DecompressError::Corrupt {
                format: c,
                detail: format!("frame header: {e}"),
            }
        })?;
    let out = read_capped(c, &mut r, limit, hint)?;
    let frame = r.into_frame_decoder();
    if !frame.is_finished() {
        return Err(DecompressError::Truncated {
            format: c,
            detail: "the frame has no last block".into(),
        });
    }
    if let (Some(stored), Some(computed)) = (
        frame.get_checksum_from_data(),
        frame.get_calculated_checksum(),
    ) {
        if stored != computed {
            return Err(DecompressError::Corrupt {
                format: c,
                detail: format!("content checksum {computed:#010x}, the frame says {stored:#010x}"),
            });
        }
    }
    Ok(out)
}

/// A capacity to start from: the kernel's size trailer when it is
/// plausible for this payload, else a guess; never above `limit`.
fn size_hint(payload: &[u8], limit: usize) -> usize {
    let guess = payload.len().saturating_mul(4);
    let trailer = payload
        .len()
        .checked_sub(4)
        .and_then(|at| super::bytes::le32(payload, at))
        .map(u32_to_usize)
        .filter(|&n| n <= payload.len().saturating_mul(64));
    trailer.unwrap_or(guess).min(limit)
}

fn io_error(format: Compression, e: &io::Error) -> DecompressError {
    let detail = e.to_string();
    if e.kind() == io::ErrorKind::UnexpectedEof {
        DecompressError::Truncated { format, detail }
    } else {
        DecompressError::Corrupt { format, detail }
    }
}

/// Reads `r` to its end, failing past `limit` bytes.
fn read_capped(
    format: Compression,
    r: impl Read,
    limit: usize,
    hint: usize,
) -> Result<Vec<u8>, DecompressError> {
    let mut out = Vec::with_capacity(hint);
    r.take(usize_to_u64(limit).saturating_add(1))
        .read_to_end(&mut out)
        .map_err(|e| io_error(format, &e))?;
    if out.len() > limit {
        return Err(DecompressError::TooLarge { format, limit });
    }
    Ok(out)
}

/// The compression a module file name says (`kernel/module/decompress.c`
/// reads gzip, xz and zstd modules; `scripts/Makefile.modinst` writes them
/// with `gzip -n`, `xz --check=crc32 --lzma2=dict=1MiB`, `zstd`).
pub fn module_compression(file_name: &str) -> Option<Compression> {
    let base = file_name.rsplit('/').next().unwrap_or(file_name);
    [
        (".ko", Compression::None),
        (".ko.xz", Compression::Xz),
        (".ko.zst", Compression::Zstd),
        (".ko.gz", Compression::Gzip),
    ]
    .into_iter()
    .find(|(suffix, _)| base.len() > suffix.len() && base.ends_with(suffix))
    .map(|(_, c)| c)
}

/// A kernel module as Debian ships it (`foo.ko`, `foo.ko.xz`, `foo.ko.zst`,
/// `foo.ko.gz`; a path is fine) -> the plain ELF `.ko` bytes. The bytes must
/// be what the name says.
pub fn module(file_name: &str, bytes: &[u8]) -> Result<Vec<u8>, DecompressError> {
    let name = || file_name.to_string();
    let expected = module_compression(file_name)
        .ok_or_else(|| DecompressError::ModuleName { name: name() })?;
    let found = Compression::detect(bytes);
    // An uncompressed module is any ELF: `detect` says `None` for it.
    if found != expected {
        return Err(DecompressError::ModuleMismatch {
            name: name(),
            expected,
            found,
        });
    }
    let ko = decompress(expected, bytes)?;
    if !elf::is_elf(&ko) {
        return Err(DecompressError::ModuleNotElf { name: name() });
    }
    Ok(ko)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::linux::elf::tests::tiny_elf;
    use std::io::Write;

    /// The body of the fixtures' ELF: x86-like code with relative calls and
    /// jumps (what BCJ x86 rewrites), text, and zero runs.
    pub(crate) fn fixture_body() -> Vec<u8> {
        let mut v = Vec::new();
        for i in 0u32..400 {
            v.extend_from_slice(&[0x55, 0x48, 0x89, 0xe5, 0xe8]);
            v.extend_from_slice(&(0x1000u32.wrapping_sub(i * 16)).to_le_bytes());
            v.extend_from_slice(&[0x48, 0x85, 0xc0, 0x0f, 0x84]);
            v.extend_from_slice(&(i * 7).to_le_bytes());
            v.extend_from_slice(&[0xe9]);
            v.extend_from_slice(&(i.wrapping_mul(0x0101_0101)).to_le_bytes());
            v.extend_from_slice(&[0x5d, 0xc3]);
        }
        v.extend_from_slice(b"Linux version 6.12 (hvmm test fixture) #1 SMP\n");
        v.extend_from_slice(&[0u8; 700]);
        v
    }

    /// The ELF every fixture under `tests/fixtures/` compresses.
    pub(crate) fn fixture_elf() -> Vec<u8> {
        tiny_elf(&fixture_body())
    }

    /// A test input: an ELF (so `module` accepts it) of `len` body bytes.
    fn sample(len: usize) -> Vec<u8> {
        let body: Vec<u8> = (0..len)
            .map(|i| {
                let x = i.wrapping_mul(2_654_435_761) >> 13;
                if i % 3000 < 900 {
                    0
                } else {
                    (x ^ (i / 64)).to_le_bytes()[0] & 0x3f
                }
            })
            .collect();
        tiny_elf(&body)
    }

    fn size_trailer(data: &[u8]) -> [u8; 4] {
        u32::try_from(data.len()).unwrap().to_le_bytes()
    }

    /// `data` compressed with `c` by the crates' own encoders, with the
    /// kernel's size trailer. `None` where the test has no encoder (lzo,
    /// covered by the `lzop` fixture and `lzo`'s own tests).
    fn encode(c: Compression, data: &[u8]) -> Option<Vec<u8>> {
        let mut out = match c {
            Compression::Gzip => {
                let mut w = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
                w.write_all(data).unwrap();
                w.finish().unwrap()
            }
            Compression::Bzip2 => {
                let mut w = bzip2::write::BzEncoder::new(Vec::new(), bzip2::Compression::best());
                w.write_all(data).unwrap();
                w.finish().unwrap()
            }
            Compression::Lzma => {
                let mut opts = lzma_rust2::LzmaOptions::with_preset(6);
                opts.dict_size = 1 << 20;
                let mut w =
                    lzma_rust2::LzmaWriter::new_use_header(Vec::new(), &opts, None).unwrap();
                w.write_all(data).unwrap();
                w.finish().unwrap()
            }
            Compression::Xz => {
                let mut opts = lzma_rust2::XzOptions::with_preset(6);
                opts.lzma_options.dict_size = 1 << 20;
                opts.filters = vec![lzma_rust2::FilterConfig::new_bcj_x86(0)];
                opts.set_check_sum_type(lzma_rust2::CheckType::Crc32);
                let mut w = lzma_rust2::XzWriter::new(Vec::new(), opts).unwrap();
                w.write_all(data).unwrap();
                w.finish().unwrap()
            }
            Compression::Zstd => {
                ruzstd::encoding::compress_to_vec(data, ruzstd::encoding::CompressionLevel::Fastest)
            }
            Compression::Lz4Legacy => return Some(lz4_legacy::compress(data).unwrap()),
            Compression::None => return Some(data.to_vec()),
            Compression::Lzo | Compression::Unknown(_) => return None,
        };
        out.extend_from_slice(&size_trailer(data));
        Some(out)
    }

    #[test]
    fn round_trip_every_format_with_the_crates_encoders() {
        for len in [0, 1, 5000, 300_000] {
            let data = sample(len);
            for c in Compression::ALL {
                let Some(packed) = encode(c, &data) else {
                    continue;
                };
                assert_eq!(Compression::detect(&packed), c, "len {len}");
                let out = decompress(c, &packed).unwrap_or_else(|e| panic!("{c}: {e}"));
                assert!(out == data, "{c} len {len}: decodes to other bytes");
            }
        }
    }

    #[test]
    fn trailing_bytes_are_tolerated() {
        let data = sample(20_000);
        for c in Compression::ALL {
            let Some(mut packed) = encode(c, &data) else {
                continue;
            };
            if c == Compression::None || c == Compression::Lz4Legacy {
                continue;
            }
            // Without the trailer, with it, and with more after it (a
            // signed image's appended data).
            let n = packed.len();
            assert_eq!(decompress(c, &packed[..n - 4]).unwrap(), data, "{c}");
            assert_eq!(decompress(c, &packed).unwrap(), data, "{c}");
            packed.extend_from_slice(&[0xa5; 61]);
            assert_eq!(decompress(c, &packed).unwrap(), data, "{c}");
        }
    }

    #[test]
    fn truncated_payloads_are_errors_not_panics() {
        let data = sample(40_000);
        for c in Compression::ALL {
            let Some(packed) = encode(c, &data) else {
                continue;
            };
            if c == Compression::None {
                continue;
            }
            // Cut inside the stream proper (not just the trailer).
            let stream = packed.len() - 4;
            for cut in (0..stream - 8).step_by(97).chain(stream - 8..stream) {
                let r = decompress(c, &packed[..cut]);
                assert!(r.is_err(), "{c}: a cut at {cut}/{stream} decoded");
            }
        }
    }

    #[test]
    fn corrupt_payloads_are_errors_not_panics() {
        let data = sample(30_000);
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for c in Compression::ALL {
            let Some(packed) = encode(c, &data) else {
                continue;
            };
            if c == Compression::None {
                continue;
            }
            let mut errors = 0;
            let tries = 300;
            for _ in 0..tries {
                let mut bad = packed.clone();
                for _ in 0..1 + next() % 3 {
                    let at = usize::try_from(next() % usize_to_u64(bad.len() - 4)).unwrap();
                    bad[at] ^= next().to_le_bytes()[0] | 1;
                }
                // Any outcome but a panic; the checksummed formats must
                // notice nearly every change.
                match decompress_limited(c, &bad, 4 << 20) {
                    Err(_) => errors += 1,
                    Ok(out) if out != data => {}
                    Ok(_) => {}
                }
            }
            assert!(
                errors > tries / 2,
                "{c}: only {errors}/{tries} damaged payloads failed"
            );
        }
    }

    #[test]
    fn output_cap_is_enforced() {
        // 4 MiB of zeros: a few KiB compressed in every format.
        let data = vec![0u8; 4 << 20];
        for c in Compression::ALL {
            let Some(packed) = encode(c, &data) else {
                continue;
            };
            for limit in [0, 1000, (4 << 20) - 1] {
                let r = decompress_limited(c, &packed, limit);
                assert_eq!(
                    r,
                    Err(DecompressError::TooLarge { format: c, limit }),
                    "{c} limit {limit}"
                );
            }
            assert_eq!(
                decompress_limited(c, &packed, 4 << 20).unwrap().len(),
                4 << 20
            );
        }
        let lzo = fixture("lzo");
        assert!(matches!(
            decompress_limited(Compression::Lzo, &lzo, 100),
            Err(DecompressError::TooLarge { .. })
        ));
    }

    #[test]
    fn unknown_magic_is_an_error() {
        let r = decompress(
            Compression::detect(b"\x00\x01\x02\x03rest"),
            b"\x00\x01\x02\x03rest",
        );
        assert_eq!(
            r,
            Err(DecompressError::UnknownFormat {
                magic: [0, 1, 2, 3]
            })
        );
        assert!(r.unwrap_err().to_string().contains("unknown"));
    }

    fn fixture(ext: &str) -> Vec<u8> {
        let path = format!("{}/tests/fixtures/elf.{ext}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    }

    #[test]
    fn fixtures_come_from_the_project_elf() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures");
        if std::env::var_os("HVMM_WRITE_FIXTURES").is_some() {
            // Step one of tests/fixtures/gen.sh.
            std::fs::write(format!("{dir}/elf.bin"), fixture_elf()).unwrap();
        }
        assert_eq!(fixture("bin"), fixture_elf());
        for (ext, _) in FIXTURES {
            assert!(fixture(ext).len() < 8 << 10, "elf.{ext} is not tiny");
        }
    }

    /// `tests/fixtures/elf.<ext>`: `elf.bin` compressed by the Debian tools
    /// the kernel build runs, with the size trailer (`gen.sh`).
    const FIXTURES: [(&str, Compression); 7] = [
        ("gz", Compression::Gzip),
        ("bz2", Compression::Bzip2),
        ("lzma", Compression::Lzma),
        ("xz", Compression::Xz),
        ("lzo", Compression::Lzo),
        ("lz4", Compression::Lz4Legacy),
        ("zst", Compression::Zstd),
    ];

    #[test]
    fn fixtures_from_the_kernel_build_tools_decode() {
        let elf = fixture_elf();
        for (ext, c) in FIXTURES {
            let packed = fixture(ext);
            assert_eq!(Compression::detect(&packed), c, "elf.{ext}");
            assert_eq!(
                packed[packed.len() - 4..],
                size_trailer(&elf),
                "elf.{ext} trailer"
            );
            let out = decompress(c, &packed).unwrap_or_else(|e| panic!("elf.{ext}: {e}"));
            assert!(out == elf, "elf.{ext} decodes to other bytes");
        }
    }

    #[test]
    fn xz_fixture_uses_the_bcj_x86_filter() {
        // Block header: size byte, flags (2 filters), then the first
        // filter's ID 0x04 (BCJ x86) before LZMA2 (0x21).
        let xz = fixture("xz");
        assert_eq!(xz[12 + 1] & 0x03, 1, "two filters");
        assert_eq!(xz[12 + 2], 0x04, "BCJ x86 first");
    }

    #[test]
    fn zstd_fixture_has_the_ultra_window() {
        // Frame header descriptor without Single_Segment: a window
        // descriptor follows; exponent 27 - 10 = 17 is the 128 MiB window
        // of `zstd -22 --ultra` from stdin.
        let z = fixture("zst");
        assert_eq!(z[4] & 0x20, 0, "no single-segment flag");
        assert_eq!(z[5] >> 3, 17, "window log 27");
        // A window above the cap is refused, not allocated.
        let mut huge = z.clone();
        huge[5] = (31 - 10) << 3;
        assert!(matches!(
            decompress(Compression::Zstd, &huge),
            Err(DecompressError::Corrupt { .. })
        ));
    }

    #[test]
    fn modules_by_name() {
        let ko = sample(10_000);
        let gz = encode(Compression::Gzip, &ko).unwrap();
        let xz = encode(Compression::Xz, &ko).unwrap();
        let zst = encode(Compression::Zstd, &ko).unwrap();
        assert_eq!(module("kvm.ko", &ko).unwrap(), ko);
        assert_eq!(module("kernel/arch/x86/kvm/kvm.ko.xz", &xz).unwrap(), ko);
        assert_eq!(module("kvm.ko.zst", &zst).unwrap(), ko);
        assert_eq!(module("kvm.ko.gz", &gz).unwrap(), ko);
        // The module fixtures: what Makefile.modinst writes (gen.sh).
        assert_eq!(
            module("elf.ko.xz", &fixture("ko.xz")).unwrap(),
            fixture_elf()
        );
        assert_eq!(
            module("elf.ko.zst", &fixture("ko.zst")).unwrap(),
            fixture_elf()
        );
        assert_eq!(
            module("elf.ko.gz", &fixture("ko.gz")).unwrap(),
            fixture_elf()
        );

        assert!(matches!(
            module("kvm.ko.bz2", &ko),
            Err(DecompressError::ModuleName { .. })
        ));
        assert!(matches!(
            module(".ko", &ko),
            Err(DecompressError::ModuleName { .. })
        ));
        assert_eq!(
            module("kvm.ko.xz", &zst),
            Err(DecompressError::ModuleMismatch {
                name: "kvm.ko.xz".into(),
                expected: Compression::Xz,
                found: Compression::Zstd
            })
        );
        assert!(matches!(
            module("kvm.ko", b"not an elf"),
            Err(DecompressError::ModuleMismatch { .. })
        ));
        let not_elf = encode(Compression::Gzip, b"plain text, not an ELF").unwrap();
        assert!(matches!(
            module("a.ko.gz", &not_elf),
            Err(DecompressError::ModuleNotElf { .. })
        ));
        let mut cut = xz.clone();
        cut.truncate(xz.len() / 2);
        assert!(matches!(
            module("kvm.ko.xz", &cut),
            Err(DecompressError::Truncated { .. })
        ));
    }
}
