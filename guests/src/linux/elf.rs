//! Just enough ELF64 to check that an extracted kernel is an x86-64
//! executable and to describe where it loads: the VMM's loader
//! (linux-loader) does the real loading.

use thiserror::Error;

use super::bytes;

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
}

// Fixed-offset reads inside a header already sliced to its full length.
fn u16_at(b: &[u8], off: usize) -> u16 {
    bytes::le16(b, off).unwrap_or(0)
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    bytes::le32(b, off).unwrap_or(0)
}

fn u64_at(b: &[u8], off: usize) -> u64 {
    bytes::le64(b, off).unwrap_or(0)
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
    // The fixed-size reads below index into `ehdr`, which is EHDR_LEN long.
    let ehdr = bytes::slice(data, "ELF header", 0, EHDR_LEN as u64)?;
    let (class, endian) = (ehdr[4], ehdr[5]);
    if class != 2 || endian != 1 {
        return Err(ElfError::NotElf64Le {
            class,
            data: endian,
        });
    }
    let e_type = u16_at(ehdr, 16);
    let machine = u16_at(ehdr, 18);
    if machine != EM_X86_64 {
        return Err(ElfError::WrongMachine(machine));
    }
    if e_type != 2 {
        return Err(ElfError::NotExecutable(e_type));
    }
    let entry = u64_at(ehdr, 24);
    let phoff = u64_at(ehdr, 32);
    let phentsize = u16_at(ehdr, 54);
    let phnum = u16_at(ehdr, 56);
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
        u64::from(phnum) * PHDR_LEN as u64,
    )?;
    let mut load_segments = Vec::new();
    for ph in phdrs.chunks_exact(PHDR_LEN) {
        if u32_at(ph, 0) != PT_LOAD {
            continue;
        }
        let seg = LoadSegment {
            offset: u64_at(ph, 8),
            vaddr: u64_at(ph, 16),
            paddr: u64_at(ph, 24),
            filesz: u64_at(ph, 32),
            memsz: u64_at(ph, 40),
        };
        bytes::slice(data, "PT_LOAD segment data", seg.offset, seg.filesz)?;
        load_segments.push(seg);
    }
    Ok(ElfInfo {
        entry,
        load_segments,
    })
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
        f[52..54].copy_from_slice(&(EHDR_LEN as u16).to_le_bytes());
        f[54..56].copy_from_slice(&(PHDR_LEN as u16).to_le_bytes());
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
