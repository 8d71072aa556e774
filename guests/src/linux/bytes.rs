//! Bounds-checked reads from untrusted images (kernel files, archives).

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

/// `data[start..start + len]`, or [`Truncated`] naming `what` was read.
pub fn slice<'a>(
    data: &'a [u8],
    what: &'static str,
    start: u64,
    len: u64,
) -> Result<&'a [u8], Truncated> {
    range(data, start, len).ok_or(Truncated {
        what,
        start,
        end: start.saturating_add(len),
        len: data.len(),
    })
}

/// `data[start..start + len]`, or `None` when any of it is out of bounds
/// (including offsets that overflow).
pub(crate) fn range(data: &[u8], start: u64, len: u64) -> Option<&[u8]> {
    let s = usize::try_from(start).ok()?;
    let e = usize::try_from(start.checked_add(len)?).ok()?;
    data.get(s..e)
}

/// Little-endian integer at `off`, or `None` when out of bounds.
pub(crate) fn le16(data: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        data.get(off..off.checked_add(2)?)?.try_into().ok()?,
    ))
}

pub(crate) fn le32(data: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        data.get(off..off.checked_add(4)?)?.try_into().ok()?,
    ))
}

pub(crate) fn le64(data: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        data.get(off..off.checked_add(8)?)?.try_into().ok()?,
    ))
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
    }
}
