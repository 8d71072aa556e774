//! Fetching pinned `.deb`s with the system's apt (`apt-get download`, no
//! installation) into the cache, verified against the recipe's sha256.

use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use sha2::{Digest, Sha256};

use super::recipe::{hex, DebPackage};
use super::{io_err, Progress, RecipeError};

/// Runs `cmd`, mapping "not found" to [`RecipeError::ToolMissing`] and a
/// non-zero exit to [`RecipeError::CommandFailed`] when `must_succeed`.
pub(crate) fn run(cmd: &mut Command, must_succeed: bool) -> Result<Output, RecipeError> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let out = cmd
        .output()
        .map_err(|source| tool_error(&program, source))?;
    if must_succeed && !out.status.success() {
        return Err(RecipeError::CommandFailed {
            command: describe(cmd),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(out)
}

pub(crate) fn tool_error(program: &str, source: io::Error) -> RecipeError {
    if source.kind() == io::ErrorKind::NotFound {
        RecipeError::ToolMissing {
            tool: program.to_string(),
        }
    } else {
        RecipeError::Io {
            op: "run",
            path: PathBuf::from(program),
            source,
        }
    }
}

pub(crate) fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        s.push(' ');
        s.push_str(&a.to_string_lossy());
    }
    s
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// sha256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<String, RecipeError> {
    let mut f = fs::File::open(path).map_err(io_err("open", path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(io_err("read", path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

/// Checks the file's sha256 against the pin.
pub fn verify(pkg: &DebPackage, path: &Path) -> Result<(), RecipeError> {
    let actual = sha256_file(path)?;
    if actual != pkg.sha256 {
        return Err(RecipeError::ChecksumMismatch {
            file: path.to_path_buf(),
            expected: pkg.sha256.to_string(),
            actual,
        });
    }
    Ok(())
}

/// `(Package, <field>)` of every stanza of `apt-cache show` output that has
/// both fields.
pub fn stanza_fields<'t>(text: &'t str, field: &str) -> Vec<(&'t str, &'t str)> {
    let mut found = Vec::new();
    for stanza in text.split("\n\n") {
        let get = |key: &str| {
            stanza.lines().find_map(|l| {
                l.strip_prefix(key)
                    .and_then(|r| r.strip_prefix(": "))
                    .map(str::trim)
            })
        };
        if let (Some(p), Some(v)) = (get("Package"), get(field)) {
            found.push((p, v));
        }
    }
    found
}

/// The pins among `pkgs` that apt's package lists do not offer, from one
/// `apt-cache show` (which prints a stanza per version it knows and stays
/// silent, exit 0, about the ones it does not).
fn unknown_to_apt(pkgs: &[DebPackage]) -> Result<Vec<DebPackage>, RecipeError> {
    let mut cmd = Command::new("apt-cache");
    cmd.args(["show", "--no-all-versions"]);
    cmd.args(pkgs.iter().map(DebPackage::spec));
    let out = run(&mut cmd, false)?;
    let text = String::from_utf8_lossy(&out.stdout);
    let known = stanza_fields(&text, "Version");
    Ok(pkgs
        .iter()
        .filter(|p| !known.iter().any(|(n, v)| *n == p.name && *v == p.version))
        .copied()
        .collect())
}

/// Makes sure apt can download every pinned package: when its lists are
/// missing or predate a pin, runs `apt-get update` (as root) or says to.
pub fn ensure_lists(pkgs: &[DebPackage], progress: Progress<'_>) -> Result<(), RecipeError> {
    let Some(first) = unknown_to_apt(pkgs)?.first().copied() else {
        return Ok(());
    };
    if !is_root() {
        return Err(RecipeError::AptListsStale {
            package: first.spec(),
        });
    }
    progress(&format!(
        "apt's package lists lack {}: running apt-get update",
        first.spec()
    ));
    run(
        Command::new("apt-get").args(["update", "-qq", "-o", "DPkg::Lock::Timeout=120"]),
        true,
    )?;
    if let Some(p) = unknown_to_apt(pkgs)?.first() {
        return Err(RecipeError::PackageUnavailable { package: p.spec() });
    }
    Ok(())
}

/// Returns the verified `.deb`s of `pkgs` in `debs_dir` (same order),
/// downloading with one `apt-get download` those that are missing or do not
/// match their pin.
pub fn fetch<const N: usize>(
    pkgs: &[DebPackage; N],
    debs_dir: &Path,
    progress: Progress<'_>,
) -> Result<[PathBuf; N], RecipeError> {
    let targets = pkgs.map(|p| debs_dir.join(p.file_name()));
    let mut wanted = Vec::new();
    for (pkg, target) in pkgs.iter().zip(&targets) {
        if !target.is_file() {
            wanted.push(*pkg);
            continue;
        }
        match verify(pkg, target) {
            Ok(()) => {}
            Err(RecipeError::ChecksumMismatch { actual, .. }) => {
                progress(&format!(
                    "cached {} has sha256 {actual}, not the pinned {}: downloading again",
                    target.display(),
                    pkg.sha256
                ));
                wanted.push(*pkg);
            }
            Err(e) => return Err(e),
        }
    }
    if wanted.is_empty() {
        return Ok(targets);
    }
    ensure_lists(&wanted, progress)?;
    // Download into a private, empty directory, then move into place: a
    // partial or foreign file never sits under the final name.
    // Callers hold the cache lock: leftovers of an interrupted run are stale.
    if let Ok(dir) = fs::read_dir(debs_dir) {
        for e in dir.flatten() {
            if e.file_name().to_string_lossy().starts_with(".download-") {
                let _ = fs::remove_dir_all(e.path());
            }
        }
    }
    let tmp = debs_dir.join(format!(".download-{}", std::process::id()));
    fs::create_dir_all(&tmp).map_err(io_err("create", &tmp))?;
    let specs: Vec<String> = wanted.iter().map(DebPackage::spec).collect();
    progress(&format!(
        "downloading {} with apt-get download",
        specs.join(" ")
    ));
    let result = (|| {
        run(
            Command::new("apt-get")
                .args(["download", "-q"])
                .args(&specs)
                .current_dir(&tmp),
            true,
        )?;
        let debs: Vec<PathBuf> = fs::read_dir(&tmp)
            .map_err(io_err("list", &tmp))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "deb"))
            .collect();
        for pkg in &wanted {
            // apt names the file `<name>_<version with %3a for ':'>_<arch>.deb`.
            let prefix = format!("{}_", pkg.name);
            let deb = debs
                .iter()
                .find(|d| {
                    d.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with(&prefix))
                })
                .ok_or_else(|| RecipeError::CommandFailed {
                    command: format!("apt-get download {}", specs.join(" ")),
                    status: "exit status: 0".into(),
                    stderr: format!("no {prefix}*.deb appeared in {}", tmp.display()),
                })?;
            verify(pkg, deb)?;
            let target = debs_dir.join(pkg.file_name());
            fs::rename(deb, &target).map_err(io_err("rename", &target))?;
        }
        Ok(())
    })();
    let _ = fs::remove_dir_all(&tmp);
    result.map(|()| targets)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linux::recipe::BUSYBOX;

    #[test]
    fn checksum_mismatch_names_expected_and_actual() {
        let path = std::env::temp_dir().join(format!("guests-apt-test-{}.deb", std::process::id()));
        fs::write(&path, b"not the package").unwrap();
        let err = verify(&BUSYBOX, &path).unwrap_err();
        let _ = fs::remove_file(&path);
        match &err {
            RecipeError::ChecksumMismatch {
                expected, actual, ..
            } => {
                assert_eq!(expected, BUSYBOX.sha256);
                // sha256("not the package")
                assert_eq!(actual.len(), 64);
                assert_ne!(actual, expected);
            }
            other => panic!("unexpected {other:?}"),
        }
        let msg = err.to_string();
        assert!(msg.contains(BUSYBOX.sha256) && msg.contains("expected"));
    }

    #[test]
    fn apt_cache_show_stanzas() {
        let text = "Package: busybox-static\nVersion: 1:1.35.0-4+deb12u1+b1\nSHA256: abc\n\n\
                    Package: linux-image-6.1.0-50-cloud-amd64\nSource: linux-signed-amd64 (6.1.176-1)\n\
                    Version: 6.1.176-1\nSHA256: def\n\nPackage: no-version\n";
        assert_eq!(
            stanza_fields(text, "Version"),
            [
                ("busybox-static", "1:1.35.0-4+deb12u1+b1"),
                ("linux-image-6.1.0-50-cloud-amd64", "6.1.176-1")
            ]
        );
        assert_eq!(stanza_fields(text, "SHA256")[1].1, "def");
    }

    #[test]
    fn missing_tool_is_a_typed_error() {
        let err = run(&mut Command::new("hvmm-no-such-tool-xyz"), true).unwrap_err();
        assert!(
            matches!(err, RecipeError::ToolMissing { ref tool } if tool == "hvmm-no-such-tool-xyz")
        );
    }
}
