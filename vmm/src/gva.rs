//! Guest-virtual access for the VMM: GVA -> GPA and bounds-checked reads
//! and writes of guest RAM through it.
//!
//! The translation is ONE function (`gva_to_gpa`) so it can be swapped for
//! the shared software walker (`mmu::guest_walk`) when that lands.

use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

const PAGE: u64 = 4096;

/// Guest-virtual access errors.
#[derive(Debug, thiserror::Error)]
pub enum GvaError {
    /// KVM_TRANSLATE failed.
    #[error("KVM_TRANSLATE of gva {gva:#x}: {source}")]
    Translate {
        gva: u64,
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The gva is not mapped in the guest page tables.
    #[error("gva {0:#x} is not mapped by the guest page tables")]
    Unmapped(u64),
    /// The gpa is outside guest RAM.
    #[error("gpa {gpa:#x} (+{len}) is outside guest RAM")]
    OutsideRam { gpa: u64, len: usize },
}

/// Translate a guest-virtual address with the vCPU's current page tables.
// TODO(merge): swap for mmu::guest_walk (software walk of guest page tables).
pub fn gva_to_gpa(vcpu: &VcpuFd, gva: u64) -> Result<u64, GvaError> {
    let t = vcpu
        .translate_gva(gva)
        .map_err(|source| GvaError::Translate { gva, source })?;
    if t.valid == 0 {
        return Err(GvaError::Unmapped(gva));
    }
    Ok(t.physical_address)
}

/// Split `[gva, gva+len)` at page boundaries: (gva, offset in buf, len).
fn chunks(gva: u64, len: usize) -> impl Iterator<Item = (u64, usize, usize)> {
    let mut done = 0usize;
    std::iter::from_fn(move || {
        if done >= len {
            return None;
        }
        let va = gva.wrapping_add(done as u64);
        let n = ((PAGE - (va % PAGE)) as usize).min(len - done);
        let r = (va, done, n);
        done += n;
        Some(r)
    })
}

/// Read `buf.len()` bytes at `gva`.
pub fn read(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    gva: u64,
    buf: &mut [u8],
) -> Result<(), GvaError> {
    for (va, off, n) in chunks(gva, buf.len()) {
        let gpa = gva_to_gpa(vcpu, va)?;
        mem.read_slice(&mut buf[off..off + n], GuestAddress(gpa))
            .map_err(|_| GvaError::OutsideRam { gpa, len: n })?;
    }
    Ok(())
}

/// Read up to `buf.len()` bytes at `gva`, stopping at the first page that
/// cannot be read; returns how many bytes were read (for instruction fetch).
pub fn read_prefix(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    gva: u64,
    buf: &mut [u8],
) -> Result<usize, GvaError> {
    let mut got = 0;
    for (va, off, n) in chunks(gva, buf.len()) {
        let r = gva_to_gpa(vcpu, va).and_then(|gpa| {
            mem.read_slice(&mut buf[off..off + n], GuestAddress(gpa))
                .map_err(|_| GvaError::OutsideRam { gpa, len: n })
        });
        match r {
            Ok(()) => got += n,
            Err(e) if got == 0 => return Err(e),
            Err(_) => break,
        }
    }
    Ok(got)
}

/// Write `buf` at `gva`. All pages are translated before any byte is written.
pub fn write(vcpu: &VcpuFd, mem: &GuestMemoryMmap, gva: u64, buf: &[u8]) -> Result<(), GvaError> {
    let mut plan = Vec::new();
    for (va, off, n) in chunks(gva, buf.len()) {
        plan.push((gva_to_gpa(vcpu, va)?, off, n));
    }
    for (gpa, off, n) in plan {
        mem.write_slice(&buf[off..off + n], GuestAddress(gpa))
            .map_err(|_| GvaError::OutsideRam { gpa, len: n })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_split_at_pages() {
        let v: Vec<_> = chunks(0xff0, 0x20).collect();
        assert_eq!(v, vec![(0xff0, 0, 0x10), (0x1000, 0x10, 0x10)]);
        let v: Vec<_> = chunks(0x1000, 512).collect();
        assert_eq!(v, vec![(0x1000, 0, 512)]);
        assert_eq!(chunks(0, 0).count(), 0);
    }
}
