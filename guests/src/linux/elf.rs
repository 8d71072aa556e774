//! Just enough ELF64 to check that an extracted kernel is an x86-64
//! executable and to describe where it loads: the VMM's loader
//! (linux-loader) does the real loading. This is the kernel ELF validation
//! of the workspace: [`check_x86_64_exec`] then [`ElfInfo::phys_end`] for
//! the end of the physical range the kernel loads into.
//!
//! What [`check_x86_64_exec`] checks: the ELF magic; ELFCLASS64,
//! little-endian; `e_machine` x86-64; `e_type` ET_EXEC; `e_phentsize` 56;
//! 1..=256 program headers, all inside the file; for every `PT_LOAD`, its
//! file range `[p_offset, p_offset + p_filesz)` inside the file and its
//! physical end `p_paddr + max(p_memsz, p_filesz)` without overflow; at
//! least one `PT_LOAD`.

use thiserror::Error;

use super::bytes::{self, Header};
use notifier::convert::usize_to_u64;

/// `e_machine` of x86-64.
pub const EM_X86_64: u16 = 62;
/// `p_type` of a loadable segment.
pub const PT_LOAD: u32 = 1;

const EHDR_LEN: usize = 64;
const PHDR_LEN: usize = 56;
/// More program headers than any kernel has: bounds the work on a hostile header.
const MAX_PHNUM: u16 = 256;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ElfError {
    #[error("not an ELF file (magic {found:02x?}, expected 7f 45 4c 46)")]
    NotElf { found: Vec<u8> },
    #[error("ELF file {0}")]
    Truncated(#[from] bytes::Truncated),
    #[error("not an ELF64 little-endian file (EI_CLASS {class}, EI_DATA {data})")]
    NotElf64Le { class: u8, data: u8 },
    #[error("ELF e_machine is {0}, expected {EM_X86_64} (x86-64)")]
    WrongMachine(u16),
    #[error("ELF e_type is {0}, expected 2 (ET_EXEC)")]
    NotExecutable(u16),
    #[error("ELF e_phentsize is {0}, expected {PHDR_LEN}")]
    BadPhentsize(u16),
    #[error("ELF has {0} program headers (0 or more than {MAX_PHNUM})")]
    BadPhnum(u16),
    #[error("ELF has no PT_LOAD segment: nothing to load")]
    NoLoadSegment,
    #[error("ELF PT_LOAD #{segment}: p_paddr {paddr:#x} + size {size:#x} overflows the physical address space")]
    PhysOverflow {
        segment: usize,
        paddr: u64,
        size: u64,
    },
}

/// One `PT_LOAD` program header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadSegment {
    pub offset: u64,
    pub vaddr: u64,
    pub paddr: u64,
    pub filesz: u64,
    pub memsz: u64,
}

/// What the checks found: entry point and loadable segments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElfInfo {
    pub entry: u64,
    pub load_segments: Vec<LoadSegment>,
}

impl ElfInfo {
    /// True when the entry point lies inside a loadable segment, by physical
    /// or by virtual address (a Linux vmlinux's `e_entry` is physical).
    pub fn entry_in_load_segment(&self) -> bool {
        self.load_segments.iter().any(|s| {
            let inside = |base: u64| self.entry >= base && self.entry - base < s.memsz;
            inside(s.paddr) || inside(s.vaddr)
        })
    }

    /// The end of the physical range the kernel loads into: the maximum over
    /// the `PT_LOAD` segments of `paddr + max(memsz, filesz)` (a loader
    /// copies `filesz` bytes and zeroes up to `memsz`). An error when there
    /// is no `PT_LOAD` or an end overflows; never for an `ElfInfo` that
    /// [`check_x86_64_exec`] returned, which checked both.
    pub fn phys_end(&self) -> Result<u64, ElfError> {
        let mut end = None;
        for (segment, s) in self.load_segments.iter().enumerate() {
            let size = s.memsz.max(s.filesz);
            let e = s.paddr.checked_add(size).ok_or(ElfError::PhysOverflow {
                segment,
                paddr: s.paddr,
                size,
            })?;
            end = Some(end.map_or(e, |x: u64| x.max(e)));
        }
        end.ok_or(ElfError::NoLoadSegment)
    }
}

/// True when `data` starts with the ELF magic.
pub fn is_elf(data: &[u8]) -> bool {
    data.starts_with(b"\x7fELF")
}

/// Checks that `data` is an ELF64 little-endian x86-64 executable whose
/// program headers are in bounds, and returns its entry and `PT_LOAD`s.
pub fn check_x86_64_exec(data: &[u8]) -> Result<ElfInfo, ElfError> {
    if !is_elf(data) {
        return Err(ElfError::NotElf {
            found: data.iter().take(4).copied().collect(),
        });
    }
    // The reads below are at constant offsets inside `ehdr` and each `ph`,
    // checked against their sizes at compile time.
    let ehdr = Header::<EHDR_LEN>::at(data, "ELF header", 0)?;
    let (class, endian) = (ehdr.u8::<4>(), ehdr.u8::<5>());
    if class != 2 || endian != 1 {
        return Err(ElfError::NotElf64Le {
            class,
            data: endian,
        });
    }
    let e_type = ehdr.le16::<16>();
    let machine = ehdr.le16::<18>();
    if machine != EM_X86_64 {
        return Err(ElfError::WrongMachine(machine));
    }
    if e_type != 2 {
        return Err(ElfError::NotExecutable(e_type));
    }
    let entry = ehdr.le64::<24>();
    let phoff = ehdr.le64::<32>();
    let phentsize = ehdr.le16::<54>();
    let phnum = ehdr.le16::<56>();
    if usize::from(phentsize) != PHDR_LEN {
        return Err(ElfError::BadPhentsize(phentsize));
    }
    if phnum == 0 || phnum > MAX_PHNUM {
        return Err(ElfError::BadPhnum(phnum));
    }
    let phdrs = bytes::slice(
        data,
        "program headers",
        phoff,
        u64::from(phnum) * usize_to_u64(PHDR_LEN),
    )?;
    let mut load_segments = Vec::new();
    // `phdrs` is phnum * PHDR_LEN long: no remainder.
    for ph in phdrs.as_chunks::<PHDR_LEN>().0 {
        let ph = Header::new(ph);
        if ph.le32::<0>() != PT_LOAD {
            continue;
        }
        let seg = LoadSegment {
            offset: ph.le64::<8>(),
            vaddr: ph.le64::<16>(),
            paddr: ph.le64::<24>(),
            filesz: ph.le64::<32>(),
            memsz: ph.le64::<40>(),
        };
        bytes::slice(data, "PT_LOAD segment data", seg.offset, seg.filesz)?;
        load_segments.push(seg);
    }
    let info = ElfInfo {
        entry,
        load_segments,
    };
    // At least one PT_LOAD, and no physical end overflows.
    info.phys_end()?;
    Ok(info)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A minimal valid ELF64 x86-64 executable: header, one PT_LOAD covering
    /// `body`, entry at the start of the segment (physical 0x100_0000).
    pub(crate) fn tiny_elf(body: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; EHDR_LEN + PHDR_LEN];
        f[..4].copy_from_slice(b"\x7fELF");
        f[4] = 2;
        f[5] = 1;
        f[6] = 1;
        f[16..18].copy_from_slice(&2u16.to_le_bytes());
        f[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        f[20..24].copy_from_slice(&1u32.to_le_bytes());
        f[24..32].copy_from_slice(&0x100_0000u64.to_le_bytes());
        f[32..40].copy_from_slice(&(EHDR_LEN as u64).to_le_bytes());
        f[52..54].copy_from_slice(&u16::try_from(EHDR_LEN).unwrap().to_le_bytes());
        f[54..56].copy_from_slice(&u16::try_from(PHDR_LEN).unwrap().to_le_bytes());
        f[56..58].copy_from_slice(&1u16.to_le_bytes());
        let ph = &mut f[EHDR_LEN..];
        let off = (EHDR_LEN + PHDR_LEN) as u64;
        ph[0..4].copy_from_slice(&PT_LOAD.to_le_bytes());
        ph[8..16].copy_from_slice(&off.to_le_bytes());
        ph[16..24].copy_from_slice(&0xffff_ffff_8100_0000u64.to_le_bytes());
        ph[24..32].copy_from_slice(&0x100_0000u64.to_le_bytes());
        ph[32..40].copy_from_slice(&(body.len() as u64).to_le_bytes());
        ph[40..48].copy_from_slice(&(body.len() as u64 + 0x1000).to_le_bytes());
        f.extend_from_slice(body);
        f
    }

    #[test]
    fn accepts_minimal_executable() {
        let info = check_x86_64_exec(&tiny_elf(&[0x90; 32])).unwrap();
        assert_eq!(info.entry, 0x100_0000);
        assert_eq!(info.load_segments.len(), 1);
        assert!(info.entry_in_load_segment());
        // memsz = 32 + 0x1000 > filesz.
        assert_eq!(info.phys_end(), Ok(0x100_0000 + 32 + 0x1000));
    }

    /// Program header 0 of a `tiny_elf`, field at `off`.
    fn set_ph(elf: &mut [u8], off: usize, v: u64) {
        elf[EHDR_LEN + off..EHDR_LEN + off + 8].copy_from_slice(&v.to_le_bytes());
    }

    #[test]
    fn phys_end_is_the_max_of_paddr_plus_the_larger_size() {
        let mut elf = tiny_elf(&[0x90; 64]);
        set_ph(&mut elf, 40, 16); // memsz < filesz: filesz counts
        let info = check_x86_64_exec(&elf).unwrap();
        assert_eq!(info.phys_end(), Ok(0x100_0000 + 64));
        let mut two = info.clone();
        two.load_segments.push(LoadSegment {
            offset: 0,
            vaddr: 0,
            paddr: 0x20_0000,
            filesz: 0,
            memsz: 0x1000,
        });
        assert_eq!(two.phys_end(), Ok(0x100_0000 + 64));
        two.load_segments[1].paddr = 0x200_0000;
        assert_eq!(two.phys_end(), Ok(0x200_1000));
        let none = ElfInfo {
            entry: 0,
            load_segments: Vec::new(),
        };
        assert_eq!(none.phys_end(), Err(ElfError::NoLoadSegment));
    }

    #[test]
    fn rejects_what_the_vmm_rejected() {
        // A segment whose file range ends past the file.
        let mut elf = tiny_elf(&[0x90; 32]);
        set_ph(&mut elf, 32, 33);
        assert!(matches!(
            check_x86_64_exec(&elf),
            Err(ElfError::Truncated(t)) if t.what == "PT_LOAD segment data"
        ));
        // A file range that overflows.
        let mut elf = tiny_elf(&[0x90; 32]);
        set_ph(&mut elf, 8, u64::MAX);
        assert!(matches!(
            check_x86_64_exec(&elf),
            Err(ElfError::Truncated(_))
        ));
        // A physical end that overflows.
        let mut elf = tiny_elf(&[0x90; 32]);
        set_ph(&mut elf, 24, u64::MAX - 0x10);
        assert_eq!(
            check_x86_64_exec(&elf),
            Err(ElfError::PhysOverflow {
                segment: 0,
                paddr: u64::MAX - 0x10,
                size: 32 + 0x1000
            })
        );
        // No PT_LOAD.
        let mut elf = tiny_elf(&[0x90; 32]);
        elf[EHDR_LEN..EHDR_LEN + 4].copy_from_slice(&4u32.to_le_bytes()); // PT_NOTE
        assert_eq!(check_x86_64_exec(&elf), Err(ElfError::NoLoadSegment));
        // e_phentsize.
        let mut elf = tiny_elf(&[]);
        elf[54] = 64;
        assert_eq!(check_x86_64_exec(&elf), Err(ElfError::BadPhentsize(64)));
        // Big-endian.
        let mut elf = tiny_elf(&[]);
        elf[5] = 2;
        assert!(matches!(
            check_x86_64_exec(&elf),
            Err(ElfError::NotElf64Le { data: 2, .. })
        ));
        // Program headers past the end of the file.
        let mut elf = tiny_elf(&[]);
        elf[56] = 2;
        assert!(matches!(
            check_x86_64_exec(&elf),
            Err(ElfError::Truncated(t)) if t.what == "program headers"
        ));
    }

    #[test]
    fn rejects_non_elf_and_truncation() {
        assert!(matches!(
            check_x86_64_exec(b"MZ\0\0"),
            Err(ElfError::NotElf { .. })
        ));
        let elf = tiny_elf(&[0x90; 32]);
        for cut in [4, 40, EHDR_LEN + 10, elf.len() - 1] {
            assert!(
                matches!(check_x86_64_exec(&elf[..cut]), Err(ElfError::Truncated(_))),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn rejects_wrong_machine_and_class() {
        let mut elf = tiny_elf(&[]);
        elf[18] = 40; // EM_ARM
        assert_eq!(check_x86_64_exec(&elf), Err(ElfError::WrongMachine(40)));
        let mut elf = tiny_elf(&[]);
        elf[4] = 1;
        assert!(matches!(
            check_x86_64_exec(&elf),
            Err(ElfError::NotElf64Le { class: 1, .. })
        ));
    }

    #[test]
    fn hostile_program_header_offset_is_an_error() {
        let mut elf = tiny_elf(&[]);
        elf[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            check_x86_64_exec(&elf),
            Err(ElfError::Truncated(_))
        ));
    }
}
