//! A bzImage's real-mode setup header (Documentation/arch/x86/boot.rst) and
//! the extraction of the `vmlinux` ELF from its compressed payload, on the
//! host: booting the ELF directly skips the decompressor, which would run at
//! emulated speed in a guest on a shadow-paging host. Every compression the
//! boot protocol allows is decoded ([`super::decompress`]).

use thiserror::Error;

use super::bytes::{self, Header};
pub use super::decompress::Compression;
use super::decompress::{self, DecompressError};
use super::elf::{self, ElfError, ElfInfo};
#[cfg(test)]
use super::lz4_legacy;

/// `setup_sects` (u8): size of the real-mode setup in 512-byte sectors (0 means 4).
pub const OFF_SETUP_SECTS: usize = 0x1f1;
/// `boot_flag` (u16): 0xAA55.
pub const OFF_BOOT_FLAG: usize = 0x1fe;
/// `header` (u32): the magic "HdrS".
pub const OFF_HEADER: usize = 0x202;
/// `version` (u16): boot protocol version.
pub const OFF_VERSION: usize = 0x206;
/// `payload_offset` (u32, protocol 2.08+): from the protected-mode code start.
pub const OFF_PAYLOAD_OFFSET: usize = 0x248;
/// `payload_length` (u32, protocol 2.08+).
pub const OFF_PAYLOAD_LENGTH: usize = 0x24c;
/// Bytes of the file the header fields above need.
pub const HEADER_END: usize = 0x250;
/// The first protocol with `payload_offset`/`payload_length`.
pub const MIN_VERSION: u16 = 0x0208;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum BzImageError {
    #[error("bzImage {0}")]
    Truncated(#[from] bytes::Truncated),
    #[error("not a bzImage: no \"HdrS\" magic at {OFF_HEADER:#x} (found {found:02x?})")]
    BadMagic { found: [u8; 4] },
    #[error("bzImage boot protocol {major}.{minor:02} is older than 2.08 (no payload fields)")]
    OldProtocol { major: u8, minor: u8 },
    #[error("bzImage payload is {0}: not gzip, bzip2, lzma, xz, lzo, lz4, zstd or an ELF")]
    UnknownCompression(Compression),
    #[error("bzImage payload: {0}")]
    Decompress(DecompressError),
    #[error("decompressed payload is not a usable vmlinux: {0}")]
    NotElf(#[from] ElfError),
}

impl From<DecompressError> for BzImageError {
    fn from(e: DecompressError) -> Self {
        match e {
            DecompressError::UnknownFormat { magic } => {
                BzImageError::UnknownCompression(Compression::Unknown(magic))
            }
            other => BzImageError::Decompress(other),
        }
    }
}

/// The setup-header fields this module uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SetupHeader {
    /// `setup_sects` as stored (0 is read as 4 by [`SetupHeader::setup_size`]).
    pub setup_sects: u8,
    pub version: u16,
    pub payload_offset: u32,
    pub payload_length: u32,
}

impl SetupHeader {
    /// Bytes before the protected-mode code: the boot sector plus the setup.
    pub fn setup_size(&self) -> usize {
        let sects = if self.setup_sects == 0 {
            4
        } else {
            self.setup_sects
        };
        (usize::from(sects) + 1) * 512
    }

    /// File offset of the compressed payload.
    pub fn payload_start(&self) -> u64 {
        self.setup_size() as u64 + u64::from(self.payload_offset)
    }
}

/// True when `data` carries the "HdrS" setup-header magic.
pub fn is_bzimage(data: &[u8]) -> bool {
    data.get(OFF_HEADER..OFF_HEADER + 4) == Some(b"HdrS")
}

/// Parses and checks the setup header (magic, protocol >= 2.08).
pub fn parse_header(data: &[u8]) -> Result<SetupHeader, BzImageError> {
    // Checked once: the reads below are at constant offsets inside the
    // HEADER_END bytes, checked at compile time.
    let h = Header::<HEADER_END>::at(data, "setup header", 0)?;
    let found = h.fixed::<OFF_HEADER, 4>();
    if &found != b"HdrS" {
        return Err(BzImageError::BadMagic { found });
    }
    let version = h.le16::<OFF_VERSION>();
    if version < MIN_VERSION {
        let [minor, major] = version.to_le_bytes();
        return Err(BzImageError::OldProtocol { major, minor });
    }
    Ok(SetupHeader {
        setup_sects: h.u8::<OFF_SETUP_SECTS>(),
        version,
        payload_offset: h.le32::<OFF_PAYLOAD_OFFSET>(),
        payload_length: h.le32::<OFF_PAYLOAD_LENGTH>(),
    })
}

/// The bounds-checked compressed payload of a bzImage.
pub fn payload(data: &[u8]) -> Result<(SetupHeader, &[u8]), BzImageError> {
    let hdr = parse_header(data)?;
    let p = bytes::slice(
        data,
        "payload",
        hdr.payload_start(),
        u64::from(hdr.payload_length),
    )?;
    Ok((hdr, p))
}

/// A kernel extracted from a bzImage, checked to be an x86-64 ELF executable.
#[derive(Debug, Clone)]
pub struct Vmlinux {
    pub header: SetupHeader,
    pub compression: Compression,
    pub elf: ElfInfo,
    pub bytes: Vec<u8>,
}

/// Extracts and checks `vmlinux` from a bzImage.
pub fn extract_vmlinux(data: &[u8]) -> Result<Vmlinux, BzImageError> {
    let (header, payload) = payload(data)?;
    let compression = Compression::detect(payload);
    let bytes = decompress::decompress(compression, payload)?;
    let elf = elf::check_x86_64_exec(&bytes)?;
    Ok(Vmlinux {
        header,
        compression,
        elf,
        bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linux::elf::tests::tiny_elf;
    use notifier::convert::{u64_to_usize, usize_to_u64};

    /// A minimal fake bzImage: boot sector + `setup_sects` sectors, then a
    /// protected-mode area holding `payload` at `payload_offset`.
    fn fake_bzimage(payload: &[u8]) -> Vec<u8> {
        let setup_sects = 3u8;
        let pm_start = (usize::from(setup_sects) + 1) * 512;
        let payload_offset = 0x40usize;
        let mut img = vec![0u8; pm_start + payload_offset];
        img[OFF_SETUP_SECTS] = setup_sects;
        img[OFF_BOOT_FLAG..OFF_BOOT_FLAG + 2].copy_from_slice(&0xaa55u16.to_le_bytes());
        img[OFF_HEADER..OFF_HEADER + 4].copy_from_slice(b"HdrS");
        img[OFF_VERSION..OFF_VERSION + 2].copy_from_slice(&0x020fu16.to_le_bytes());
        img[OFF_PAYLOAD_OFFSET..OFF_PAYLOAD_OFFSET + 4]
            .copy_from_slice(&u32::try_from(payload_offset).unwrap().to_le_bytes());
        img[OFF_PAYLOAD_LENGTH..OFF_PAYLOAD_LENGTH + 4]
            .copy_from_slice(&u32::try_from(payload.len()).unwrap().to_le_bytes());
        img.extend_from_slice(payload);
        // Trailing bytes after the payload (as a signed image has) are ignored.
        img.extend_from_slice(&[0xee; 100]);
        img
    }

    #[test]
    fn round_trip_lz4_legacy() {
        let body: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        let elf = tiny_elf(&body);
        let img = fake_bzimage(&lz4_legacy::compress(&elf).unwrap());
        let v = extract_vmlinux(&img).unwrap();
        assert_eq!(v.compression, Compression::Lz4Legacy);
        assert_eq!(v.header.version, 0x020f);
        assert_eq!(v.bytes, elf);
        assert_eq!(v.elf.entry, 0x100_0000);
    }

    #[test]
    fn uncompressed_payload_is_accepted() {
        let elf = tiny_elf(&[1, 2, 3]);
        let v = extract_vmlinux(&fake_bzimage(&elf)).unwrap();
        assert_eq!(v.compression, Compression::None);
        assert_eq!(v.bytes, elf);
    }

    #[test]
    fn truncated_header_and_payload() {
        let img = fake_bzimage(&lz4_legacy::compress(&tiny_elf(&[0; 64])).unwrap());
        assert!(matches!(
            extract_vmlinux(&img[..0x100]),
            Err(BzImageError::Truncated(t)) if t.what == "setup header"
        ));
        let pm_end = img.len() - 100 - 10;
        assert!(matches!(
            extract_vmlinux(&img[..pm_end]),
            Err(BzImageError::Truncated(t)) if t.what == "payload"
        ));
    }

    #[test]
    fn bad_magic_and_old_protocol() {
        let mut img = fake_bzimage(&[]);
        img[OFF_HEADER] = b'X';
        assert!(matches!(
            extract_vmlinux(&img),
            Err(BzImageError::BadMagic { .. })
        ));
        let mut img = fake_bzimage(&[]);
        img[OFF_VERSION..OFF_VERSION + 2].copy_from_slice(&0x0206u16.to_le_bytes());
        assert_eq!(
            extract_vmlinux(&img).unwrap_err(),
            BzImageError::OldProtocol { major: 2, minor: 6 }
        );
    }

    #[test]
    fn hostile_payload_offset_is_truncated_not_a_panic() {
        let mut img = fake_bzimage(&[0; 16]);
        img[OFF_PAYLOAD_OFFSET..OFF_PAYLOAD_OFFSET + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        img[OFF_PAYLOAD_LENGTH..OFF_PAYLOAD_LENGTH + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            extract_vmlinux(&img),
            Err(BzImageError::Truncated(_))
        ));
    }

    #[test]
    fn corrupted_payload_is_an_error() {
        let elf = tiny_elf(&vec![0x5a; 50_000]);
        let mut packed = lz4_legacy::compress(&elf).unwrap();
        // Break the first block's first token: a match offset of zero.
        let n = packed.len();
        for b in &mut packed[8..n - 4] {
            *b = 0xff;
        }
        assert!(matches!(
            extract_vmlinux(&fake_bzimage(&packed)),
            Err(BzImageError::Decompress(DecompressError::Lz4(_)))
        ));
    }

    #[test]
    fn every_compression_is_extracted() {
        // The fixtures the kernel build's own tools wrote (with the size
        // trailer), each as a bzImage payload.
        let elf = crate::linux::decompress::tests::fixture_elf();
        for ext in ["gz", "bz2", "lzma", "xz", "lzo", "lz4", "zst"] {
            let path = format!("{}/tests/fixtures/elf.{ext}", env!("CARGO_MANIFEST_DIR"));
            let payload = std::fs::read(&path).unwrap();
            let v =
                extract_vmlinux(&fake_bzimage(&payload)).unwrap_or_else(|e| panic!("{ext}: {e}"));
            assert_eq!(v.bytes, elf, "{ext}");
            assert_eq!(v.compression, Compression::detect(&payload));
            assert!(!matches!(
                v.compression,
                Compression::None | Compression::Unknown(_)
            ));
        }
    }

    #[test]
    fn unknown_compression_is_named() {
        let err = extract_vmlinux(&fake_bzimage(&[0x42, 0x42, 0x42, 0x42, 0])).unwrap_err();
        assert_eq!(
            err,
            BzImageError::UnknownCompression(Compression::Unknown([0x42; 4]))
        );
        assert!(err.to_string().contains("unknown compression"), "{err}");
        // A known magic with a broken stream is a decode error, not "unknown".
        for magic in [
            &[0x1f, 0x8b, 8, 0][..],
            &[0xfd, b'7', b'z', b'X', b'Z', 0][..],
            &[0x28, 0xb5, 0x2f, 0xfd][..],
        ] {
            assert!(matches!(
                extract_vmlinux(&fake_bzimage(magic)),
                Err(BzImageError::Decompress(_))
            ));
        }
    }

    #[test]
    fn random_damage_never_panics() {
        let body: Vec<u8> = (0..20_000u32).map(|i| (i % 13) as u8).collect();
        let img = fake_bzimage(&lz4_legacy::compress(&tiny_elf(&body)).unwrap());
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..2000 {
            let mut bad = img.clone();
            for _ in 0..1 + next() % 4 {
                let at = u64_to_usize(next() % usize_to_u64(bad.len()));
                bad[at] = next().to_le_bytes()[0];
            }
            let cut = bad.len() - u64_to_usize(next() % 64);
            // Any outcome but a panic is fine; a success must still be an ELF.
            if let Ok(v) = extract_vmlinux(&bad[..cut]) {
                assert!(elf::is_elf(&v.bytes));
            }
        }
    }

    #[test]
    fn payload_that_is_not_elf() {
        let img = fake_bzimage(&lz4_legacy::compress(b"definitely not an ELF file").unwrap());
        assert!(matches!(
            extract_vmlinux(&img),
            Err(BzImageError::NotElf(ElfError::NotElf { .. }))
        ));
    }
}
