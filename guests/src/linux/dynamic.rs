//! What a dynamically linked x86-64 program needs to start: its `PT_INTERP`
//! (the dynamic loader) and its `DT_NEEDED` libraries, read from the ELF
//! (the emulated host's image carries the `vmm` binary and the test
//! binaries with their libraries), and their resolution to files on this
//! machine, transitively, the way glibc's `ld.so` searches its default
//! directories (`elf/dl-load.c`: `_dl_map_object` -> the system search path;
//! this reader ignores `DT_RPATH`/`DT_RUNPATH` and `ld.so.cache`, which the
//! programs we carry do not use).

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

use thiserror::Error;

use super::bytes;

const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const DT_NULL: u64 = 0;
const DT_NEEDED: u64 = 1;
const DT_STRTAB: u64 = 5;
const EHDR_LEN: u64 = 64;
const PHDR_LEN: u64 = 56;
const DYN_LEN: u64 = 16;
/// Bounds the work on a hostile header.
const MAX_PHNUM: u64 = 256;
const MAX_DYN: u64 = 4096;

/// The directories `ld.so` searches by default on a Debian x86-64 system
/// (multiarch first), in order.
pub const SYSTEM_LIB_DIRS: &[&str] = &[
    "/lib/x86_64-linux-gnu",
    "/usr/lib/x86_64-linux-gnu",
    "/lib64",
    "/usr/lib64",
    "/lib",
    "/usr/lib",
];

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DynamicError {
    #[error("not an ELF64 little-endian x86-64 file")]
    NotElf,
    #[error("ELF {0}")]
    Truncated(#[from] bytes::Truncated),
    #[error("ELF has {0} program headers (more than {MAX_PHNUM})")]
    BadPhnum(u64),
    #[error("ELF dynamic section: {0}")]
    BadDynamic(&'static str),
    #[error("{}: {detail}", path.display())]
    Read { path: PathBuf, detail: String },
    #[error("{lib}, needed by {}, is in none of {SYSTEM_LIB_DIRS:?}", by.display())]
    NotFound { lib: String, by: PathBuf },
}

/// A program's loader and direct library names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DynamicDeps {
    /// `PT_INTERP`, e.g. `/lib64/ld-linux-x86-64.so.2`; `None` for a static program.
    pub interp: Option<String>,
    /// `DT_NEEDED` entries, in order.
    pub needed: Vec<String>,
}

struct Phdr {
    p_type: u32,
    offset: u64,
    vaddr: u64,
    filesz: u64,
}

fn phdrs(data: &[u8]) -> Result<Vec<Phdr>, DynamicError> {
    let h = bytes::slice(data, "ELF header", 0, EHDR_LEN)?;
    // ELFCLASS64, little-endian, EM_X86_64.
    if &h[..4] != b"\x7fELF" || h[4] != 2 || h[5] != 1 || bytes::le16(h, 18) != Some(62) {
        return Err(DynamicError::NotElf);
    }
    let phoff = bytes::read_le64(h, "e_phoff", 32)?;
    let phnum = u64::from(bytes::read_le16(h, "e_phnum", 56)?);
    if phnum > MAX_PHNUM {
        return Err(DynamicError::BadPhnum(phnum));
    }
    let table = bytes::slice(data, "program headers", phoff, phnum * PHDR_LEN)?;
    Ok(table
        .as_chunks::<56>()
        .0
        .iter()
        .map(|ph| Phdr {
            p_type: u32::from_le_bytes([ph[0], ph[1], ph[2], ph[3]]),
            offset: u64::from_le_bytes(ph[8..16].try_into().unwrap_or_default()),
            vaddr: u64::from_le_bytes(ph[16..24].try_into().unwrap_or_default()),
            filesz: u64::from_le_bytes(ph[32..40].try_into().unwrap_or_default()),
        })
        .collect())
}

/// The file offset of virtual address `vaddr`, through the `PT_LOAD`s.
fn file_offset(phdrs: &[Phdr], vaddr: u64) -> Option<u64> {
    phdrs
        .iter()
        .filter(|p| p.p_type == PT_LOAD)
        .find(|p| vaddr >= p.vaddr && vaddr - p.vaddr < p.filesz)
        .map(|p| p.offset + (vaddr - p.vaddr))
}

/// The NUL-terminated string at `off` of `data`.
fn c_str(data: &[u8], off: u64) -> Result<String, DynamicError> {
    let start = usize::try_from(off).map_err(|_| DynamicError::BadDynamic("string offset"))?;
    let rest = data
        .get(start..)
        .ok_or(DynamicError::BadDynamic("string outside the file"))?;
    let end = rest
        .iter()
        .position(|&b| b == 0)
        .ok_or(DynamicError::BadDynamic("unterminated string"))?;
    Ok(String::from_utf8_lossy(&rest[..end]).into_owned())
}

/// Reads `PT_INTERP` and the `DT_NEEDED` names of an x86-64 ELF (executable
/// or shared object). A static program has neither.
pub fn dynamic_deps(data: &[u8]) -> Result<DynamicDeps, DynamicError> {
    let phdrs = phdrs(data)?;
    let mut deps = DynamicDeps::default();
    if let Some(p) = phdrs.iter().find(|p| p.p_type == PT_INTERP) {
        deps.interp = Some(c_str(
            bytes::slice(data, "PT_INTERP", p.offset, p.filesz)?,
            0,
        )?);
    }
    let Some(dynamic) = phdrs.iter().find(|p| p.p_type == PT_DYNAMIC) else {
        return Ok(deps);
    };
    let table = bytes::slice(
        data,
        "PT_DYNAMIC",
        dynamic.offset,
        dynamic.filesz.min(MAX_DYN * DYN_LEN),
    )?;
    let entries: Vec<(u64, u64)> = table
        .as_chunks::<16>()
        .0
        .iter()
        .map(|e| {
            (
                u64::from_le_bytes(e[..8].try_into().unwrap_or_default()),
                u64::from_le_bytes(e[8..].try_into().unwrap_or_default()),
            )
        })
        .take_while(|&(tag, _)| tag != DT_NULL)
        .collect();
    let strtab = entries
        .iter()
        .find(|&&(tag, _)| tag == DT_STRTAB)
        .and_then(|&(_, vaddr)| file_offset(&phdrs, vaddr))
        .ok_or(DynamicError::BadDynamic("no DT_STRTAB inside a PT_LOAD"))?;
    for &(tag, val) in &entries {
        if tag == DT_NEEDED {
            let off = strtab
                .checked_add(val)
                .ok_or(DynamicError::BadDynamic("DT_NEEDED offset overflows"))?;
            deps.needed.push(c_str(data, off)?);
        }
    }
    Ok(deps)
}

/// Every file `program` needs to start on a machine that has none of this
/// one's libraries: the loader (at its `PT_INTERP` path) and each library,
/// transitively, at the path it was found in [`SYSTEM_LIB_DIRS`]. The
/// program itself is not in the list.
pub fn runtime_files(program: &Path) -> Result<Vec<PathBuf>, DynamicError> {
    let read = |p: &Path| {
        fs::read(p).map_err(|e| DynamicError::Read {
            path: p.to_path_buf(),
            detail: e.to_string(),
        })
    };
    let mut files = BTreeSet::new();
    let mut seen = BTreeSet::new();
    let mut todo = vec![program.to_path_buf()];
    while let Some(elf) = todo.pop() {
        let deps = dynamic_deps(&read(&elf)?)?;
        if let Some(interp) = deps.interp {
            files.insert(PathBuf::from(interp));
        }
        for lib in deps.needed {
            if !seen.insert(lib.clone()) {
                continue;
            }
            let found = SYSTEM_LIB_DIRS
                .iter()
                .map(|d| Path::new(d).join(&lib))
                .find(|p| p.is_file())
                .ok_or_else(|| DynamicError::NotFound {
                    lib: lib.clone(),
                    by: elf.clone(),
                })?;
            files.insert(found.clone());
            todo.push(found);
        }
    }
    Ok(files.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_interp_and_needed_of_this_test_binary() {
        let exe = std::env::current_exe().unwrap();
        let deps = dynamic_deps(&fs::read(&exe).unwrap()).unwrap();
        assert!(deps.interp.unwrap().contains("ld-linux-x86-64"));
        assert!(deps.needed.iter().any(|n| n.starts_with("libc.so")));
        let files = runtime_files(&exe).unwrap();
        assert!(files.iter().any(|f| f.ends_with("libc.so.6")), "{files:?}");
        assert!(files.iter().all(|f| f.is_file()));
    }

    #[test]
    fn hostile_headers_are_errors_not_panics() {
        assert!(matches!(
            dynamic_deps(b"\x7fELF"),
            Err(DynamicError::Truncated(_))
        ));
        assert_eq!(dynamic_deps(&[0u8; 64]), Err(DynamicError::NotElf));
        let mut h = vec![0u8; 64];
        h[..6].copy_from_slice(b"\x7fELF\x02\x01");
        h[18] = 62;
        h[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
        h[56] = 1;
        assert!(matches!(dynamic_deps(&h), Err(DynamicError::Truncated(_))));
        h[56..58].copy_from_slice(&1000u16.to_le_bytes());
        assert_eq!(dynamic_deps(&h), Err(DynamicError::BadPhnum(1000)));
    }
}
