//! `UFFDIO_COPY` sources, which must be resident. On hugetlb the kernel
//! first copies with page faults disabled; if the source is not present it
//! falls back to copying outside `mmap_lock` into a *temporary* huge page
//! allocated outside the reservation (`alloc_hugetlb_folio_vma`), then
//! retries. With 1 GiB pages that temporary page is a second free gigantic
//! page, which a pool sized for the guest does not have: the COPY fails
//! (`ENOMEM`) and the guest's fault is never resolved. Hence staged pages
//! go through [`make_resident`] and zeros come from a [`ZeroSource`].
//! Measured with both pages free: a 1 GiB COPY from a lazily zeroed buffer
//! takes ~0.6 s (the fallback path), from a resident one ~0.3 s.

use notifier::Mmap;

use super::UffdRamError;

/// Make every page of a COPY source buffer resident (write the value each
/// page already holds, including the last, possibly partial, page): see
/// the module docs. Every staged COPY source must go through this.
pub fn make_resident(buf: &mut [u8]) {
    let start = buf.as_ptr() as usize;
    let len = buf.len();
    // One byte in every 4 KiB page the buffer touches.
    let mut off = 0usize;
    while off < len {
        // SAFETY: `off < len`: a valid element of `buf`, which we borrow
        // mutably; volatile so the store of its own value is kept.
        unsafe {
            let p = buf.as_mut_ptr().add(off);
            std::ptr::write_volatile(p, std::ptr::read_volatile(p));
        }
        off = ((start + off) / 4096 + 1) * 4096 - start;
    }
}

/// A read-only private anonymous `MAP_POPULATE` mapping: every page is the
/// shared zero page, so a resident COPY source of zeros that costs no
/// memory.
pub(super) struct ZeroSource(Mmap);

impl ZeroSource {
    pub(super) fn new(len: usize) -> Result<Self, UffdRamError> {
        Ok(ZeroSource(Mmap::anon(
            len,
            libc::PROT_READ,
            libc::MAP_POPULATE,
        )?))
    }

    pub(super) fn as_slice(&self) -> &[u8] {
        // SAFETY: a private read-only mapping nobody writes (PROT_READ),
        // mapped until `self` drops (not while this borrow lives).
        unsafe { self.0.as_slice() }
    }
}
