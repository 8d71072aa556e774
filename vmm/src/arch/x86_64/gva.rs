//! Guest-virtual access for the VMM: GVA -> GPA through the project's own
//! walk of the guest's page tables (`mmu::guest_walk`, the walker the
//! shadow MMU uses), and bounds-checked reads and writes of guest RAM
//! through it. Guest page tables are untrusted: each entry is read once,
//! the walk is bounded, and a pointer outside guest RAM is a typed error.

use kvm_bindings::kvm_sregs;
use mmu::guest_walk::{walk_x86, AccessKind, GuestPhysMem, MemError, WalkError, X86Paging};
use notifier::convert::u64_to_usize;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::regs::{CR0_WP, CR4_SMEP, EFER_NXE};

const PAGE: u64 = 4096;

/// Guest-virtual access errors.
#[derive(Debug, thiserror::Error)]
pub enum GvaError {
    /// The guest page tables do not translate the gva for this access.
    #[error("gva {gva:#x}: {source}")]
    Walk {
        gva: u64,
        #[source]
        source: WalkError,
    },
    /// The gpa is outside guest RAM.
    #[error("gpa {gpa:#x} (+{len}) is outside guest RAM")]
    OutsideRam { gpa: u64, len: usize },
}

/// Guest RAM as the walker reads it: bounds-checked 8-byte reads through
/// vm-memory. The VMM only looks at guest page tables (no A/D updates), so
/// a compare-exchange is never issued; one that were would be refused.
struct WalkMem<'a>(&'a GuestMemoryMmap);

impl GuestPhysMem for WalkMem<'_> {
    fn read_u64(&self, gpa: u64) -> Result<u64, MemError> {
        if !gpa.is_multiple_of(8) {
            return Err(MemError::Misaligned { gpa });
        }
        self.0
            .read_obj::<u64>(GuestAddress(gpa))
            .map_err(|_| MemError::OutsideRam { gpa })
    }

    fn cmpxchg_u64(&self, _gpa: u64, _old: u64, _new: u64) -> Result<bool, MemError> {
        Ok(false)
    }
}

/// The paging mode the vCPU's control registers say.
pub fn paging(sregs: &kvm_sregs) -> X86Paging {
    let mut p = X86Paging::new(sregs.cr3);
    p.cr0_wp = sregs.cr0 & CR0_WP != 0;
    p.smep = sregs.cr4 & CR4_SMEP != 0;
    p.efer_nx = sregs.efer & EFER_NXE != 0;
    p
}

/// Translate a guest-virtual address for a supervisor access.
pub fn translate(
    mem: &GuestMemoryMmap,
    paging: &X86Paging,
    gva: u64,
    access: AccessKind,
) -> Result<u64, GvaError> {
    walk_x86(&WalkMem(mem), paging, gva, access, false)
        .map(|t| t.gpa)
        .map_err(|source| GvaError::Walk { gva, source })
}

/// Split `[gva, gva+len)` at page boundaries: (gva, offset in buf, len).
fn chunks(gva: u64, len: usize) -> impl Iterator<Item = (u64, usize, usize)> {
    let mut done = 0usize;
    std::iter::from_fn(move || {
        if done >= len {
            return None;
        }
        let va = gva.wrapping_add(done as u64);
        let n = u64_to_usize(PAGE - (va % PAGE)).min(len - done);
        let r = (va, done, n);
        done += n;
        Some(r)
    })
}

/// Read `buf.len()` bytes at `gva`.
pub fn read(
    mem: &GuestMemoryMmap,
    paging: &X86Paging,
    gva: u64,
    buf: &mut [u8],
) -> Result<(), GvaError> {
    for (va, off, n) in chunks(gva, buf.len()) {
        let gpa = translate(mem, paging, va, AccessKind::READ)?;
        mem.read_slice(&mut buf[off..off + n], GuestAddress(gpa))
            .map_err(|_| GvaError::OutsideRam { gpa, len: n })?;
    }
    Ok(())
}

/// Read up to `buf.len()` bytes at `gva`, stopping at the first page that
/// cannot be read; returns how many bytes were read (for instruction fetch).
pub fn read_prefix(
    mem: &GuestMemoryMmap,
    paging: &X86Paging,
    gva: u64,
    buf: &mut [u8],
) -> Result<usize, GvaError> {
    let fetch = AccessKind {
        fetch: true,
        ..AccessKind::READ
    };
    let mut got = 0;
    for (va, off, n) in chunks(gva, buf.len()) {
        let r = translate(mem, paging, va, fetch).and_then(|gpa| {
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
pub fn write(
    mem: &GuestMemoryMmap,
    paging: &X86Paging,
    gva: u64,
    buf: &[u8],
) -> Result<(), GvaError> {
    let mut plan = Vec::new();
    for (va, off, n) in chunks(gva, buf.len()) {
        plan.push((translate(mem, paging, va, AccessKind::WRITE)?, off, n));
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

    /// 4 MiB of guest RAM with PML4 at 0x1000 -> PDPT 0x2000 -> PD 0x3000
    /// mapping gva 0xffff_8000_0020_0000 (PML4 index 256) to gpa 0x20_0000
    /// with one 2 MiB page.
    fn guest() -> (GuestMemoryMmap, X86Paging) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        mem.write_obj(0x2003u64, GuestAddress(0x1000 + 256 * 8))
            .unwrap();
        mem.write_obj(0x3003u64, GuestAddress(0x2000)).unwrap();
        mem.write_obj(0x20_0083u64, GuestAddress(0x3000 + 8))
            .unwrap();
        (mem, X86Paging::new(0x1000))
    }

    #[test]
    fn walks_the_guest_tables() {
        let (mem, p) = guest();
        let gpa = translate(&mem, &p, 0xffff_8000_0020_1234, AccessKind::READ).unwrap();
        assert_eq!(gpa, 0x20_1234);
        let e = translate(&mem, &p, 0xffff_8000_0040_0000, AccessKind::READ).unwrap_err();
        assert!(
            matches!(
                e,
                GvaError::Walk {
                    source: WalkError::NotPresent { .. },
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn a_table_pointer_outside_guest_ram_is_a_typed_error() {
        let (mem, p) = guest();
        // The PD pointer now points 1 GiB past the end of guest RAM.
        mem.write_obj(0x4000_3003u64, GuestAddress(0x2000)).unwrap();
        let e = translate(&mem, &p, 0xffff_8000_0020_0000, AccessKind::READ).unwrap_err();
        assert!(
            matches!(
                e,
                GvaError::Walk {
                    source: WalkError::OutsideRam { .. },
                    ..
                }
            ),
            "{e}"
        );
    }

    #[test]
    fn chunks_split_at_pages() {
        let v: Vec<_> = chunks(0xff0, 0x20).collect();
        assert_eq!(v, vec![(0xff0, 0, 0x10), (0x1000, 0x10, 0x10)]);
        let v: Vec<_> = chunks(0x1000, 512).collect();
        assert_eq!(v, vec![(0x1000, 0, 512)]);
        assert_eq!(chunks(0, 0).count(), 0);
    }
}
