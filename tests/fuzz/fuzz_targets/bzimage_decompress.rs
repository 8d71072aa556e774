//! bzImage extraction and every payload decoder. The first byte picks the
//! decoder (`Compression::ALL`, then lzop and LZ4-legacy directly, then the
//! whole bzImage extractor); the rest is its input. Never panics, never
//! returns more than the limit, `detect` agrees with the magic, and LZ4
//! legacy round-trips.
#![no_main]

use guests::linux::bzimage;
use guests::linux::decompress::{decompress_limited, Compression, DecompressError};
use guests::linux::{lz4_legacy, lzo};
use libfuzzer_sys::fuzz_target;

/// Small enough that a decompression bomb costs milliseconds.
const LIMIT: usize = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, input)) = data.split_first() else {
        return;
    };
    let detected = Compression::detect(input);
    let all = Compression::ALL;
    match usize::from(pick) % (all.len() + 3) {
        i if i < all.len() => {
            let c = all[i];
            match decompress_limited(c, input, LIMIT) {
                Ok(out) => {
                    assert!(out.len() <= LIMIT);
                    if c == Compression::None {
                        assert_eq!(out, input);
                    }
                }
                Err(DecompressError::TooLarge { limit, .. }) => assert_eq!(limit, LIMIT),
                Err(_) => {}
            }
            // What `detect` says decodes as that format or fails typed.
            let _ = decompress_limited(detected, input, LIMIT);
        }
        8 => {
            if let Ok(out) = lzo::decompress(input, LIMIT) {
                assert!(out.len() <= LIMIT);
                assert!(lzo::is_lzop(input));
            }
        }
        9 => {
            if let Ok(out) = lz4_legacy::decompress_limited(input, LIMIT) {
                assert!(out.len() <= LIMIT);
                assert_eq!(detected, Compression::Lz4Legacy);
            }
            // Any bytes compress and decode back.
            let packed = lz4_legacy::compress(input).unwrap();
            assert_eq!(lz4_legacy::decompress(&packed).unwrap(), input);
            assert_eq!(Compression::detect(&packed), Compression::Lz4Legacy);
        }
        _ => {
            if let Ok((hdr, payload)) = bzimage::payload(input) {
                assert!(bzimage::is_bzimage(input));
                assert_eq!(payload.len(), usize::try_from(hdr.payload_length).unwrap());
                assert!(hdr.version >= bzimage::MIN_VERSION);
            }
            if let Ok(v) = bzimage::extract_vmlinux(input) {
                assert_eq!(guests::linux::elf::check_x86_64_exec(&v.bytes), Ok(v.elf));
            }
        }
    }
});
