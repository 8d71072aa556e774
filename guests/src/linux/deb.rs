//! Reading files out of a `.deb` without installing it.
//!
//! `dpkg-deb --fsys-tarfile` streams the package's data.tar, already
//! decompressed whatever its compression (xz for the kernel); the `tar`
//! crate picks the few members we need from that stream in memory and stops
//! reading once it has them. Unlike `dpkg-deb -x` this writes nothing else
//! and decompresses little: the kernel package's `boot/` files come first,
//! before ~100 MiB of modules the guest never uses.

use notifier::convert::u64_to_usize;
use std::io::Read;
use std::path::Path;
use std::process::{Command, Stdio};

use super::apt::{describe, tool_error};
use super::RecipeError;

/// No member we read is near this: bounds what a damaged header can make us
/// allocate.
const MAX_MEMBER: u64 = 256 << 20;

fn normalise(path: &str) -> &str {
    path.trim_start_matches("./").trim_start_matches('/')
}

/// Reads the regular files `members` (paths as in `dpkg-deb -c`, with or
/// without `./`) from `deb`, in the order asked.
pub fn read_members(deb: &Path, members: &[&str]) -> Result<Vec<Vec<u8>>, RecipeError> {
    let wanted: Vec<Vec<&str>> = members.iter().map(|m| vec![*m]).collect();
    let wanted: Vec<&[&str]> = wanted.iter().map(Vec::as_slice).collect();
    Ok(read_any_of(deb, &wanted)?
        .into_iter()
        .map(|(_, data)| data)
        .collect())
}

/// Like [`read_members`], where each wanted file may have several names (a
/// kernel module is `kvm.ko`, `kvm.ko.xz` or `kvm.ko.zst` depending on the
/// kernel): returns, per entry of `wanted`, the name found and its bytes.
pub fn read_any_of(deb: &Path, wanted: &[&[&str]]) -> Result<Vec<(String, Vec<u8>)>, RecipeError> {
    let mut cmd = Command::new("dpkg-deb");
    cmd.arg("--fsys-tarfile")
        .arg(deb)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let command = describe(&cmd);
    let bad = |detail: String| RecipeError::Extract {
        deb: deb.to_path_buf(),
        detail,
    };
    let mut child = cmd.spawn().map_err(|e| tool_error("dpkg-deb", e))?;
    let Some(stdout) = child.stdout.take() else {
        return Err(bad("dpkg-deb has no stdout pipe".into()));
    };
    let mut found: Vec<Option<(String, Vec<u8>)>> = vec![None; wanted.len()];
    // Ok(true) when every member was found before the end of the stream.
    let scan = (|| -> Result<bool, RecipeError> {
        let mut archive = tar::Archive::new(stdout);
        let entries = archive.entries().map_err(|e| bad(e.to_string()))?;
        for entry in entries {
            let mut entry = entry.map_err(|e| bad(e.to_string()))?;
            let path = entry.path().map_err(|e| bad(e.to_string()))?;
            let Some(path) = path.to_str().map(|p| normalise(p).to_string()) else {
                continue;
            };
            let Some(i) = wanted
                .iter()
                .position(|names| names.iter().any(|m| normalise(m) == path))
            else {
                continue;
            };
            if !entry.header().entry_type().is_file() {
                return Err(bad(format!("{path} is not a regular file")));
            }
            let size = entry.size();
            if size > MAX_MEMBER {
                return Err(bad(format!(
                    "{path} is {size} bytes, over the {MAX_MEMBER}-byte limit"
                )));
            }
            let mut data = Vec::with_capacity(u64_to_usize(size));
            entry
                .read_to_end(&mut data)
                .map_err(|e| bad(format!("reading {path}: {e}")))?;
            found[i] = Some((path, data));
            if found.iter().all(Option::is_some) {
                return Ok(true);
            }
        }
        Ok(false)
    })();
    // The stream's reader is gone: when we stopped early, dpkg-deb ends on
    // a broken pipe (its exit status then says nothing; the .deb's sha256
    // was checked before). Reap it whatever happened; its stderr explains a
    // failed stream.
    let mut stderr = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut stderr);
    }
    let status = child.wait().map_err(|e| tool_error("dpkg-deb", e))?;
    let stopped_early = scan?;
    if !stopped_early && !status.success() {
        return Err(RecipeError::CommandFailed {
            command,
            status: status.to_string(),
            stderr: stderr.trim().to_string(),
        });
    }
    found
        .into_iter()
        .zip(wanted)
        .map(|(data, names)| {
            data.ok_or_else(|| RecipeError::DebMemberMissing {
                deb: deb.to_path_buf(),
                member: names.join(" or "),
            })
        })
        .collect()
}
