//! Bounds-checked reads from untrusted images (kernel files, archives): the
//! one set of little-endian readers of the workspace.
//!
//! - [`le16`] / [`le32`] / [`le64`]: at any offset, `None` when out of
//!   bounds (offsets that overflow included);
//! - [`read_le16`] / [`read_le32`] / [`read_le64`] and [`slice()`]: the same
//!   with a [`Truncated`] error naming what was read;
//! - [`Header`]: a fixed-size header checked for length once, whose reads
//!   at constant offsets are checked at compile time and cannot fail.

use notifier::convert::usize_to_u64;
use thiserror::Error;

/// A read that falls outside the image.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("truncated: {what} needs bytes {start}..{end}, the image has {len}")]
pub struct Truncated {
    pub what: &'static str,
    pub start: u64,
    pub end: u64,
    pub len: usize,
}

impl Truncated {
    fn at(data: &[u8], what: &'static str, start: u64, len: u64) -> Self {
        Truncated {
            what,
            start,
            end: start.saturating_add(len),
            len: data.len(),
        }
    }
}

/// `data[start..start + len]`, or [`Truncated`] naming `what` was read.
pub fn slice<'a>(
    data: &'a [u8],
    what: &'static str,
    start: u64,
    len: u64,
) -> Result<&'a [u8], Truncated> {
    range(data, start, len).ok_or_else(|| Truncated::at(data, what, start, len))
}

/// `data[start..start + len]`, or `None` when any of it is out of bounds
/// (including offsets that overflow).
pub fn range(data: &[u8], start: u64, len: u64) -> Option<&[u8]> {
    let s = usize::try_from(start).ok()?;
    let e = usize::try_from(start.checked_add(len)?).ok()?;
    data.get(s..e)
}

/// The `N` bytes at `off`, or `None` when out of bounds.
fn array<const N: usize>(data: &[u8], off: usize) -> Option<[u8; N]> {
    data.get(off..)?.first_chunk::<N>().copied()
}

/// Little-endian `u16` at `off`, or `None` when out of bounds.
pub fn le16(data: &[u8], off: usize) -> Option<u16> {
    array(data, off).map(u16::from_le_bytes)
}

/// Little-endian `u32` at `off`, or `None` when out of bounds.
pub fn le32(data: &[u8], off: usize) -> Option<u32> {
    array(data, off).map(u32::from_le_bytes)
}

/// Little-endian `u64` at `off`, or `None` when out of bounds.
pub fn le64(data: &[u8], off: usize) -> Option<u64> {
    array(data, off).map(u64::from_le_bytes)
}

fn read<const N: usize>(data: &[u8], what: &'static str, off: usize) -> Result<[u8; N], Truncated> {
    array(data, off).ok_or_else(|| Truncated::at(data, what, usize_to_u64(off), usize_to_u64(N)))
}

/// Little-endian `u16` at `off`, or [`Truncated`] naming `what` was read.
pub fn read_le16(data: &[u8], what: &'static str, off: usize) -> Result<u16, Truncated> {
    read(data, what, off).map(u16::from_le_bytes)
}

/// Little-endian `u32` at `off`, or [`Truncated`] naming `what` was read.
pub fn read_le32(data: &[u8], what: &'static str, off: usize) -> Result<u32, Truncated> {
    read(data, what, off).map(u32::from_le_bytes)
}

/// Little-endian `u64` at `off`, or [`Truncated`] naming `what` was read.
pub fn read_le64(data: &[u8], what: &'static str, off: usize) -> Result<u64, Truncated> {
    read(data, what, off).map(u64::from_le_bytes)
}

/// A fixed-size header of `N` bytes, bounds-checked once: its readers take
/// the offset as a constant and check `OFF + width <= N` at compile time,
/// so they cannot fail (nor silently read 0).
///
/// ```
/// use guests::linux::bytes::Header;
/// let file = [0x7f, b'E', b'L', b'F', 2, 1, 1, 0, 0x34, 0x12];
/// let h = Header::<8>::at(&file, "ident", 2).unwrap();
/// assert_eq!(h.le16::<6>(), 0x1234);
/// assert_eq!(h.u8::<2>(), 2);
/// assert!(Header::<16>::at(&file, "ident", 0).is_err());
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header<'a, const N: usize>(&'a [u8; N]);

impl<'a, const N: usize> Header<'a, N> {
    /// The `N` bytes of `data` at `start`, or [`Truncated`] naming `what`.
    pub fn at(data: &'a [u8], what: &'static str, start: u64) -> Result<Self, Truncated> {
        usize::try_from(start)
            .ok()
            .and_then(|s| data.get(s..)?.first_chunk::<N>())
            .map(Header)
            .ok_or_else(|| Truncated::at(data, what, start, usize_to_u64(N)))
    }

    /// A header over an array of the right size.
    pub fn new(bytes: &'a [u8; N]) -> Self {
        Header(bytes)
    }

    /// The header's bytes.
    pub fn bytes(self) -> &'a [u8; N] {
        self.0
    }

    /// The byte at `OFF`.
    pub fn u8<const OFF: usize>(self) -> u8 {
        self.fixed::<OFF, 1>()[0]
    }

    /// Little-endian `u16` at `OFF`.
    pub fn le16<const OFF: usize>(self) -> u16 {
        u16::from_le_bytes(self.fixed::<OFF, 2>())
    }

    /// Little-endian `u32` at `OFF`.
    pub fn le32<const OFF: usize>(self) -> u32 {
        u32::from_le_bytes(self.fixed::<OFF, 4>())
    }

    /// Little-endian `u64` at `OFF`.
    pub fn le64<const OFF: usize>(self) -> u64 {
        u64::from_le_bytes(self.fixed::<OFF, 8>())
    }

    /// The `W` bytes at `OFF`.
    pub fn fixed<const OFF: usize, const W: usize>(self) -> [u8; W] {
        const { assert!(OFF + W <= N, "read past the end of a fixed-size header") };
        let mut out = [0u8; W];
        out.copy_from_slice(&self.0[OFF..OFF + W]);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_of_bounds_is_none() {
        let d = [1u8, 2, 3, 4, 5];
        assert_eq!(range(&d, 1, 3), Some(&d[1..4]));
        assert_eq!(range(&d, 3, 3), None);
        assert_eq!(range(&d, u64::MAX, 2), None);
        assert_eq!(le32(&d, 1), Some(0x0504_0302));
        assert_eq!(le32(&d, 2), None);
        assert_eq!(le16(&d, usize::MAX), None);
        assert_eq!(le64(&d, 0), None);
        assert_eq!(le16(&d, 3), Some(0x0504));
    }

    #[test]
    fn typed_reads_name_what_was_read() {
        let d = [1u8, 2, 3, 4, 5];
        assert_eq!(read_le16(&d, "x", 0), Ok(0x0201));
        assert_eq!(
            read_le32(&d, "block size", 3),
            Err(Truncated {
                what: "block size",
                start: 3,
                end: 7,
                len: 5
            })
        );
        assert!(read_le64(&d, "y", usize::MAX).is_err());
        assert_eq!(
            slice(&d, "z", u64::MAX, 2).unwrap_err().end,
            u64::MAX,
            "saturates"
        );
    }

    #[test]
    fn fixed_header_reads() {
        let d: Vec<u8> = (0u8..32).collect();
        let h = Header::<16>::at(&d, "hdr", 8).unwrap();
        assert_eq!(h.u8::<0>(), 8);
        assert_eq!(h.le16::<1>(), 0x0a09);
        assert_eq!(h.le32::<12>(), 0x1716_1514);
        assert_eq!(h.le64::<8>(), 0x1716_1514_1312_1110);
        assert_eq!(h.bytes()[15], 23);
        assert_eq!(
            Header::<16>::at(&d, "hdr", 20),
            Err(Truncated {
                what: "hdr",
                start: 20,
                end: 36,
                len: 32
            })
        );
        let a = [0xffu8; 4];
        assert_eq!(Header::new(&a).le32::<0>(), u32::MAX);
    }
}
