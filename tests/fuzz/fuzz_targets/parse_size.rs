//! `vmm::cli::parse_size` against an independent model in u128 arithmetic,
//! and the round trip of every accepted size through its K form.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm::cli::{parse_size, SizeError};

/// The documented grammar: optional K/M/G/T suffix (either case, binary
/// units), a bare number is MiB, surrounding whitespace ignored.
fn model(s: &str) -> Option<Result<u64, ()>> {
    let t = s.trim();
    let (num, shift) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 10),
        Some('m' | 'M') => (&t[..t.len() - 1], 20),
        Some('g' | 'G') => (&t[..t.len() - 1], 30),
        Some('t' | 'T') => (&t[..t.len() - 1], 40),
        _ => (t, 20),
    };
    if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    // Leading zeros do not change the value; 40 significant digits cannot fit.
    let sig = num.trim_start_matches('0');
    if sig.len() > 30 {
        return Some(Err(()));
    }
    let n: u128 = if sig.is_empty() { 0 } else { sig.parse().ok()? };
    Some(u64::try_from(n << shift).map_err(|_| ()))
}

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    let got = parse_size(s);
    match (model(s), &got) {
        (None, Err(SizeError::Bad(b))) => assert_eq!(b, s),
        (Some(Err(())), Err(SizeError::Overflow(b))) => assert_eq!(b, s),
        (Some(Ok(want)), Ok(n)) => assert_eq!(*n, want, "{s:?}"),
        (want, got) => panic!("{s:?}: model {want:?}, parse_size {got:?}"),
    }
    if let Ok(n) = got {
        // Every accepted size is a whole number of KiB; its K form and, when
        // whole, its M/G forms parse back to it.
        assert_eq!(n % 1024, 0);
        assert_eq!(parse_size(&format!("{}K", n >> 10)), Ok(n));
        assert_eq!(parse_size(&format!(" {}k ", n >> 10)), Ok(n));
        if n % (1 << 20) == 0 {
            assert_eq!(parse_size(&format!("{}", n >> 20)), Ok(n));
        }
        if n % (1 << 30) == 0 {
            assert_eq!(parse_size(&format!("{}G", n >> 30)), Ok(n));
        }
    }
});
