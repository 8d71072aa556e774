//! `guests::linux::cpio::parse` on arbitrary bytes: never panics, the
//! entries it returns lie inside the input, and re-encoding them as newc
//! parses back to the same entries (the writer's own archives, too).
#![no_main]

use guests::linux::cpio::{self, CpioWriter, Entry, MAGIC, TRAILER};
use libfuzzer_sys::fuzz_target;

fn pad4(v: &mut Vec<u8>) {
    while !v.len().is_multiple_of(4) {
        v.push(0);
    }
}

/// A newc archive of `entries` (every field as parsed) and the trailer.
fn encode(entries: &[Entry<'_>]) -> Vec<u8> {
    let mut out = Vec::new();
    let trailer = Entry {
        name: TRAILER.to_string(),
        ino: 0,
        mode: 0,
        uid: 0,
        gid: 0,
        nlink: 1,
        mtime: 0,
        rdev_major: 0,
        rdev_minor: 0,
        data: &[],
    };
    for e in entries.iter().chain(std::iter::once(&trailer)) {
        let fields = [
            e.ino,
            e.mode,
            e.uid,
            e.gid,
            e.nlink,
            e.mtime,
            u32::try_from(e.data.len()).unwrap(),
            0,
            0,
            e.rdev_major,
            e.rdev_minor,
            u32::try_from(e.name.len() + 1).unwrap(),
            0,
        ];
        out.extend_from_slice(MAGIC);
        for f in fields {
            out.extend_from_slice(format!("{f:08x}").as_bytes());
        }
        out.extend_from_slice(e.name.as_bytes());
        out.push(0);
        pad4(&mut out);
        out.extend_from_slice(e.data);
        pad4(&mut out);
    }
    out
}

fuzz_target!(|data: &[u8]| {
    if let Ok(entries) = cpio::parse(data) {
        let range = data.as_ptr_range();
        for e in &entries {
            assert!(!e.name.contains('\0'));
            assert_ne!(e.name, TRAILER);
            let r = e.data.as_ptr_range();
            assert!(e.data.is_empty() || (range.start <= r.start && r.end <= range.end));
        }
        let again = encode(&entries);
        assert_eq!(cpio::parse(&again).unwrap(), entries);
    }
    // The writer: names and contents from the input, read back as written.
    let text = String::from_utf8_lossy(data);
    let mut w = CpioWriter::new(Vec::new());
    // The last entry written under each name.
    let mut written = std::collections::BTreeMap::new();
    for (i, part) in text.split('\n').take(16).enumerate() {
        let (name, body) = part.split_once('=').unwrap_or((part, ""));
        let r = match i % 3 {
            0 => w.file(name, 0o644, body.as_bytes()),
            1 => w.dir(name, 0o755),
            _ => w.symlink(name, body),
        };
        if r.is_ok() {
            written.insert(
                name.trim_start_matches('/').to_string(),
                (i % 3, body.to_string()),
            );
        }
    }
    let archive = w.finish().unwrap();
    let back = cpio::parse(&archive).unwrap();
    assert!(back.len() >= written.len());
    for (name, (kind, body)) in &written {
        let e = back.iter().rev().find(|e| &e.name == name).unwrap();
        match kind {
            0 => assert!(e.is_file() && e.data == body.as_bytes()),
            1 => assert!(e.is_dir() && e.data.is_empty()),
            _ => assert!(e.is_symlink() && e.data == body.as_bytes()),
        }
    }
});
