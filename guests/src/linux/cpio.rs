//! The "newc" cpio format that the kernel unpacks into its initial rootfs
//! (Documentation/driver-api/early-userspace/buffer-format.rst): a writer,
//! and a small bounds-checked reader to check images (tests, tools).
//!
//! Each entry is a 110-byte ASCII header (`070701` and 13 8-digit hex
//! fields), the NUL-terminated name padded to 4 bytes, then the data padded
//! to 4 bytes. The archive ends with an entry named `TRAILER!!!`.

use super::decompress::{decompress, Compression, DecompressError};
use notifier::convert::{u64_to_usize, usize_to_u64};
use std::io::{self, Write};

use thiserror::Error;

pub const MAGIC: &[u8; 6] = b"070701";
pub const TRAILER: &str = "TRAILER!!!";
const HEADER_LEN: usize = 110;
const FIELDS: [&str; 13] = [
    "ino",
    "mode",
    "uid",
    "gid",
    "nlink",
    "mtime",
    "filesize",
    "devmajor",
    "devminor",
    "rdevmajor",
    "rdevminor",
    "namesize",
    "check",
];

pub const S_IFMT: u32 = 0o170000;
pub const S_IFDIR: u32 = 0o040000;
pub const S_IFREG: u32 = 0o100000;
pub const S_IFLNK: u32 = 0o120000;
pub const S_IFCHR: u32 = 0o020000;

#[derive(Debug, Error)]
pub enum CpioError {
    #[error("cpio name {0:?} is empty, contains NUL, or is the trailer name")]
    BadName(String),
    #[error("cpio entry {name:?}: {what} {value} does not fit the format's 32 bits")]
    TooLarge {
        name: String,
        what: &'static str,
        value: u64,
    },
    #[error("cpio write: {0}")]
    Io(#[from] io::Error),
    #[error("cpio archive truncated at offset {offset}: {what}")]
    Truncated { offset: usize, what: &'static str },
    #[error("cpio header at offset {offset}: magic {found:?}, expected \"070701\"")]
    BadMagic { offset: usize, found: String },
    #[error("cpio header at offset {offset}: field {field} is not 8 hex digits")]
    BadField { offset: usize, field: &'static str },
    #[error("cpio entry at offset {offset}: name is not NUL-terminated UTF-8 without other NULs")]
    BadStoredName { offset: usize },
    #[error("cpio archive has no {TRAILER} entry")]
    MissingTrailer,
    #[error(
        "initramfs: {magic:02x?} at offset {offset} is neither a cpio archive nor a compressed one"
    )]
    Junk { offset: usize, magic: Vec<u8> },
    #[error("initramfs: the compressed archive at offset {offset}: {source}")]
    Compressed {
        offset: usize,
        #[source]
        source: DecompressError,
    },
}

/// What an initramfs holds, as the kernel's unpacker would see it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InitramfsSummary {
    /// newc archives (each up to its trailer), compressed ones included.
    pub archives: usize,
    pub entries: usize,
    /// Compressed archives among them.
    pub compressed: usize,
}

/// Check an initramfs the way `unpack_to_rootfs()` (init/initramfs.c)
/// reads it, so that a truncated or corrupt one is an error at load time
/// rather than a guest that boots for minutes and then cannot mount its
/// root: a sequence of NUL padding, uncompressed newc archives (each up to
/// its `TRAILER!!!`) and compressed streams (`decompress_method()`: gzip,
/// bzip2, lzma, xz, lzo, lz4, zstd) whose contents are such a sequence in
/// turn. What follows a compressed stream is not checked (this decoder
/// does not say where the stream ended; the kernel's does).
pub fn check_initramfs(data: &[u8]) -> Result<InitramfsSummary, CpioError> {
    let mut sum = InitramfsSummary::default();
    check_segments(data, &mut sum, true)?;
    Ok(sum)
}

fn check_segments(data: &[u8], sum: &mut InitramfsSummary, outer: bool) -> Result<(), CpioError> {
    let mut pos = 0usize;
    while let Some(rest) = data.get(pos..).filter(|r| !r.is_empty()) {
        if rest[0] == 0 {
            pos += 1; // padding between archives
            continue;
        }
        if rest.starts_with(MAGIC) || rest.starts_with(b"070702") {
            let (entries, end) = parse_archive(data, pos)?;
            sum.archives += 1;
            sum.entries += entries.len();
            pos = end;
            continue;
        }
        let c = Compression::detect(rest);
        if !outer || matches!(c, Compression::Unknown(_) | Compression::None) {
            return Err(CpioError::Junk {
                offset: pos,
                magic: rest.iter().take(6).copied().collect(),
            });
        }
        let inner = decompress(c, rest).map_err(|source| CpioError::Compressed {
            offset: pos,
            source,
        })?;
        sum.compressed += 1;
        return check_segments(&inner, sum, false);
    }
    Ok(())
}

fn pad4(n: usize) -> usize {
    (4 - n % 4) % 4
}

/// Writes a newc archive. Entries get increasing inode numbers, uid/gid 0
/// and mtime 0 (the output is reproducible). Names are stored without a
/// leading `/`; parents must be written before their children.
pub struct CpioWriter<W: Write> {
    out: W,
    next_ino: u32,
    written: u64,
}

impl<W: Write> CpioWriter<W> {
    pub fn new(out: W) -> Self {
        CpioWriter {
            out,
            next_ino: 1,
            written: 0,
        }
    }

    fn put(&mut self, b: &[u8]) -> Result<(), CpioError> {
        self.out.write_all(b)?;
        self.written += b.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> Result<(), CpioError> {
        let n = pad4(u64_to_usize(self.written));
        self.put(&[0u8; 3][..n])
    }

    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        nlink: u32,
        rdev: (u32, u32),
        data: &[u8],
    ) -> Result<(), CpioError> {
        let filesize = u32::try_from(data.len()).map_err(|_| CpioError::TooLarge {
            name: name.to_string(),
            what: "file size",
            value: usize_to_u64(data.len()),
        })?;
        let ino = if name == TRAILER { 0 } else { self.next_ino };
        self.next_ino += u32::from(name != TRAILER);
        // checked_name: name.len() < u32::MAX, so + 1 fits.
        let namesize = u32::try_from(name.len() + 1).map_err(|_| CpioError::TooLarge {
            name: name.to_string(),
            what: "name size",
            value: usize_to_u64(name.len() + 1),
        })?;
        let fields = [
            ino, mode, 0, 0, nlink, 0, filesize, 0, 0, rdev.0, rdev.1, namesize, 0,
        ];
        let mut hdr = String::with_capacity(HEADER_LEN);
        hdr.push_str("070701");
        for v in fields {
            hdr.push_str(&format!("{v:08x}"));
        }
        self.put(hdr.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()?;
        self.put(data)?;
        self.pad()
    }

    fn checked_name(name: &str) -> Result<&str, CpioError> {
        let n = name.trim_start_matches('/');
        if n.is_empty() || n.contains('\0') || n == TRAILER || n.len() >= u32::MAX as usize {
            return Err(CpioError::BadName(name.to_string()));
        }
        Ok(n)
    }

    /// A directory (`perm` like 0o755).
    pub fn dir(&mut self, name: &str, perm: u32) -> Result<(), CpioError> {
        let n = Self::checked_name(name)?;
        self.entry(n, S_IFDIR | (perm & 0o7777), 2, (0, 0), &[])
    }

    /// A regular file.
    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> Result<(), CpioError> {
        let n = Self::checked_name(name)?;
        self.entry(n, S_IFREG | (perm & 0o7777), 1, (0, 0), data)
    }

    /// A symbolic link to `target` (stored as the entry's data).
    pub fn symlink(&mut self, name: &str, target: &str) -> Result<(), CpioError> {
        let n = Self::checked_name(name)?;
        self.entry(n, S_IFLNK | 0o777, 1, (0, 0), target.as_bytes())
    }

    /// A character device node with device number `major:minor`.
    pub fn char_dev(
        &mut self,
        name: &str,
        perm: u32,
        major: u32,
        minor: u32,
    ) -> Result<(), CpioError> {
        let n = Self::checked_name(name)?;
        self.entry(n, S_IFCHR | (perm & 0o7777), 1, (major, minor), &[])
    }

    /// The sink, for bytes before the first entry (another archive): the
    /// writer's alignment counts from its first entry, so what goes there
    /// must keep a 4-byte multiple.
    pub fn sink(&mut self) -> &mut W {
        &mut self.out
    }

    /// Writes the trailer and returns the sink.
    pub fn finish(mut self) -> Result<W, CpioError> {
        self.entry(TRAILER, 0, 1, (0, 0), &[])?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// One entry read back from an archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry<'a> {
    pub name: String,
    pub ino: u32,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub mtime: u32,
    pub rdev_major: u32,
    pub rdev_minor: u32,
    pub data: &'a [u8],
}

impl Entry<'_> {
    pub fn file_type(&self) -> u32 {
        self.mode & S_IFMT
    }
    pub fn is_dir(&self) -> bool {
        self.file_type() == S_IFDIR
    }
    pub fn is_file(&self) -> bool {
        self.file_type() == S_IFREG
    }
    pub fn is_symlink(&self) -> bool {
        self.file_type() == S_IFLNK
    }
    pub fn is_char_dev(&self) -> bool {
        self.file_type() == S_IFCHR
    }
}

/// Parses a whole newc archive up to its trailer (which is not returned).
pub fn parse(data: &[u8]) -> Result<Vec<Entry<'_>>, CpioError> {
    parse_archive(data, 0).map(|(entries, _)| entries)
}

/// The newc archive that starts at `start`: its entries and the offset
/// just past its trailer's record.
fn parse_archive(data: &[u8], start: usize) -> Result<(Vec<Entry<'_>>, usize), CpioError> {
    let mut entries = Vec::new();
    let mut pos = start;
    loop {
        let hdr = data
            .get(pos..pos + HEADER_LEN)
            .ok_or(CpioError::Truncated {
                offset: pos,
                what: "header",
            })?;
        // newc, or newc with checksums (`070702`, which the kernel reads too).
        if &hdr[..6] != MAGIC && &hdr[..6] != b"070702" {
            return Err(CpioError::BadMagic {
                offset: pos,
                found: String::from_utf8_lossy(&hdr[..6]).into_owned(),
            });
        }
        let mut f = [0u32; 13];
        for (i, v) in f.iter_mut().enumerate() {
            let digits = &hdr[6 + i * 8..14 + i * 8];
            *v = std::str::from_utf8(digits)
                .ok()
                .filter(|s| s.bytes().all(|b| b.is_ascii_hexdigit()))
                .and_then(|s| u32::from_str_radix(s, 16).ok())
                .ok_or(CpioError::BadField {
                    offset: pos,
                    field: FIELDS[i],
                })?;
        }
        let [ino, mode, uid, gid, nlink, mtime, filesize, _, _, rdev_major, rdev_minor, namesize, _] =
            f;
        let name_at = pos + HEADER_LEN;
        let namesize = namesize as usize;
        let raw_name = data
            .get(name_at..name_at + namesize)
            .ok_or(CpioError::Truncated {
                offset: name_at,
                what: "name",
            })?;
        // One NUL, the last byte: the kernel reads the name as a C string,
        // so a name with another NUL would not be the one it unpacks.
        let name = match raw_name.split_last() {
            Some((0, n)) if !n.contains(&0) => std::str::from_utf8(n).ok(),
            _ => None,
        }
        .ok_or(CpioError::BadStoredName { offset: pos })?
        .to_string();
        let data_at = name_at + namesize + pad4(HEADER_LEN + namesize);
        let filesize = filesize as usize;
        let body = data
            .get(data_at..data_at + filesize)
            .ok_or(CpioError::Truncated {
                offset: data_at,
                what: "file data",
            })?;
        if name == TRAILER {
            return Ok((entries, data_at + filesize + pad4(filesize)));
        }
        entries.push(Entry {
            name,
            ino,
            mode,
            uid,
            gid,
            nlink,
            mtime,
            rdev_major,
            rdev_minor,
            data: body,
        });
        pos = data_at + filesize + pad4(filesize);
        if pos >= data.len() {
            return Err(CpioError::MissingTrailer);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn archive(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut w = CpioWriter::new(Vec::new());
        for (name, data) in files {
            w.file(name, 0o644, data).unwrap();
        }
        w.finish().unwrap()
    }

    fn gzip(data: &[u8]) -> Vec<u8> {
        use std::io::Write as _;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(data).unwrap();
        e.finish().unwrap()
    }

    /// What `unpack_to_rootfs()` takes: archives, NUL padding between
    /// them, a compressed archive after them (the early-microcode layout).
    #[test]
    fn initramfs_as_the_kernel_unpacks_it() {
        let a = archive(&[("init", b"#!/bin/sh\n")]);
        let b = archive(&[
            ("kernel/x86/microcode/GenuineIntel.bin", &[7; 100]),
            ("y", b""),
        ]);
        let one = check_initramfs(&a).unwrap();
        assert_eq!((one.archives, one.entries, one.compressed), (1, 1, 0));
        let mut cat = b.clone();
        cat.extend_from_slice(&[0; 512]);
        cat.extend_from_slice(&gzip(&a));
        let s = check_initramfs(&cat).unwrap();
        assert_eq!((s.archives, s.entries, s.compressed), (2, 3, 1));
        assert_eq!(check_initramfs(&[]).unwrap(), InitramfsSummary::default());
    }

    #[test]
    fn a_truncated_or_foreign_initramfs_is_refused() {
        let a = archive(&[("init", &[1; 300])]);
        for cut in [6, 110, 200, a.len() - 4] {
            assert!(check_initramfs(&a[..cut]).is_err(), "cut at {cut}");
        }
        assert!(matches!(
            check_initramfs(b"hello"),
            Err(CpioError::Junk { offset: 0, .. })
        ));
        let mut trailing = a.clone();
        trailing.extend_from_slice(b"junk");
        assert!(matches!(
            check_initramfs(&trailing),
            Err(CpioError::Junk { .. })
        ));
        let gz = gzip(&a);
        assert!(matches!(
            check_initramfs(&gz[..gz.len() / 2]),
            Err(CpioError::Compressed { .. })
        ));
        // A compressed stream inside a compressed stream is junk to the
        // kernel's cpio state machine.
        assert!(matches!(
            check_initramfs(&gzip(&gz)),
            Err(CpioError::Junk { .. })
        ));
    }

    const SAMPLE_NAMES: [&str; 8] = [
        "dev",
        "dev/console",
        "dev/null",
        "bin",
        "bin/busybox",
        "bin/sh",
        "init",
        "empty",
    ];

    fn sample() -> Vec<u8> {
        let mut w = CpioWriter::new(Vec::new());
        w.dir("/dev", 0o755).unwrap();
        w.char_dev("/dev/console", 0o600, 5, 1).unwrap();
        w.char_dev("dev/null", 0o666, 1, 3).unwrap();
        w.dir("bin", 0o755).unwrap();
        w.file("bin/busybox", 0o755, b"\x7fELF fake busybox")
            .unwrap();
        w.symlink("bin/sh", "busybox").unwrap();
        w.file("init", 0o755, b"#!/bin/sh\necho hi\n").unwrap();
        w.file("empty", 0o644, b"").unwrap();
        w.finish().unwrap()
    }

    #[test]
    fn layout_is_newc() {
        let a = sample();
        assert_eq!(&a[..6], b"070701");
        assert_eq!(a.len() % 4, 0);
        // The trailer is the last entry, 110 + 11 bytes padded to 124.
        let tail = &a[a.len() - 124..];
        assert_eq!(&tail[..6], b"070701");
        assert_eq!(&tail[110..120], TRAILER.as_bytes());
        // First header: ino 1, mode 040755, nlink 2, namesize 4 ("dev\0").
        let h = std::str::from_utf8(&a[..110]).unwrap();
        assert_eq!(&h[6..14], "00000001");
        assert_eq!(&h[14..22], "000041ed");
        assert_eq!(&h[38..46], "00000002");
        assert_eq!(&h[94..102], "00000004");
        assert_eq!(&a[110..114], b"dev\0");
    }

    #[test]
    fn round_trip_all_kinds() {
        let a = sample();
        let e = parse(&a).unwrap();
        let names: Vec<&str> = e.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, SAMPLE_NAMES);
        assert!(e[0].is_dir() && e[0].mode & 0o7777 == 0o755);
        assert!(e[1].is_char_dev() && (e[1].rdev_major, e[1].rdev_minor) == (5, 1));
        assert_eq!(e[1].mode & 0o7777, 0o600);
        assert!(e[2].is_char_dev() && (e[2].rdev_major, e[2].rdev_minor) == (1, 3));
        assert!(e[4].is_file() && e[4].data == b"\x7fELF fake busybox");
        assert!(e[5].is_symlink() && e[5].data == b"busybox");
        assert_eq!(e[6].data, b"#!/bin/sh\necho hi\n");
        assert!(e[7].is_file() && e[7].data.is_empty());
        let inos: Vec<u32> = e.iter().map(|e| e.ino).collect();
        assert_eq!(inos, (1..=8).collect::<Vec<_>>());
    }

    #[test]
    fn bad_names_are_refused() {
        let mut w = CpioWriter::new(Vec::new());
        assert!(matches!(
            w.file("/", 0o644, b""),
            Err(CpioError::BadName(_))
        ));
        assert!(matches!(
            w.file("a\0b", 0o644, b""),
            Err(CpioError::BadName(_))
        ));
        assert!(matches!(w.dir(TRAILER, 0o755), Err(CpioError::BadName(_))));
    }

    #[test]
    fn reader_rejects_damage_without_panicking() {
        let a = sample();
        for cut in 0..a.len() {
            assert!(parse(&a[..cut]).is_err(), "cut at {cut}");
        }
        let mut bad = a.clone();
        bad[0] = b'9';
        assert!(matches!(parse(&bad), Err(CpioError::BadMagic { .. })));
        let mut bad = a.clone();
        bad[20] = b'g';
        assert!(matches!(
            parse(&bad),
            Err(CpioError::BadField { field: "mode", .. })
        ));
        let mut bad = a.clone();
        // namesize of the first entry: huge.
        bad[94..102].copy_from_slice(b"ffffffff");
        assert!(matches!(parse(&bad), Err(CpioError::Truncated { .. })));
    }

    #[test]
    fn cpio_tool_lists_what_we_wrote() {
        // Cross-check with GNU cpio when it is installed.
        let Ok(mut child) = std::process::Command::new("cpio")
            .args(["-t", "--quiet"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
        else {
            eprintln!("SKIP: cpio not installed");
            return;
        };
        let a = sample();
        child.stdin.take().unwrap().write_all(&a).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success());
        let listed = String::from_utf8(out.stdout).unwrap();
        assert_eq!(listed.lines().collect::<Vec<_>>(), SAMPLE_NAMES);
    }

    /// Found by the `cpio` fuzz target: a stored name with a NUL before
    /// its terminating one was returned whole ("a\0c"), where the kernel's
    /// initramfs unpacker reads the name as a C string ("a").
    #[test]
    fn a_name_with_an_inner_nul_is_refused() {
        let mut w = CpioWriter::new(Vec::new());
        w.file("abc", 0o644, b"x").unwrap();
        let mut a = w.finish().unwrap();
        assert_eq!(&a[HEADER_LEN..HEADER_LEN + 4], b"abc\0");
        a[HEADER_LEN + 1] = 0;
        assert!(matches!(
            parse(&a),
            Err(CpioError::BadStoredName { offset: 0 })
        ));
    }
}
