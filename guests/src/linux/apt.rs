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

/// True when apt's package lists know this exact version.
fn apt_knows(pkg: &DebPackage) -> Result<bool, RecipeError> {
    let out = run(
        Command::new("apt-cache").args(["show", "--no-all-versions", &pkg.spec()]),
        false,
    )?;
    Ok(out.status.success() && !out.stdout.is_empty())
}

/// Makes sure apt can download every pinned package: when its lists are
/// missing or predate a pin, runs `apt-get update` (as root) or says to.
pub fn ensure_lists(pkgs: &[DebPackage], progress: Progress<'_>) -> Result<(), RecipeError> {
    let missing = |pkgs: &[DebPackage]| -> Result<Vec<DebPackage>, RecipeError> {
        let mut m = Vec::new();
        for p in pkgs {
            if !apt_knows(p)? {
                m.push(*p);
            }
        }
        Ok(m)
    };
    let lacking = missing(pkgs)?;
    let Some(first) = lacking.first() else {
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
    if let Some(p) = missing(pkgs)?.first() {
        return Err(RecipeError::PackageUnavailable { package: p.spec() });
    }
    Ok(())
}

/// Returns the verified `.deb` of `pkg` in `debs_dir`, downloading it with
/// `apt-get download` when it is missing or does not match its pin.
pub fn fetch(
    pkg: &DebPackage,
    debs_dir: &Path,
    progress: Progress<'_>,
) -> Result<PathBuf, RecipeError> {
    let target = debs_dir.join(pkg.file_name());
    if target.is_file() {
        match verify(pkg, &target) {
            Ok(()) => return Ok(target),
            Err(RecipeError::ChecksumMismatch { actual, .. }) => {
                progress(&format!(
                    "cached {} has sha256 {actual}, not the pinned {}: downloading again",
                    target.display(),
                    pkg.sha256
                ));
            }
            Err(e) => return Err(e),
        }
    }
    ensure_lists(&[*pkg], progress)?;
    // Download into a private, empty directory, then move into place: a
    // partial or foreign file never sits under the final name.
    let tmp = debs_dir.join(format!(".download-{}-{}", pkg.name, std::process::id()));
    let _ = fs::remove_dir_all(&tmp);
    fs::create_dir_all(&tmp).map_err(io_err("create", &tmp))?;
    progress(&format!("downloading {} with apt-get download", pkg.spec()));
    let result = (|| {
        run(
            Command::new("apt-get")
                .args(["download", "-q", &pkg.spec()])
                .current_dir(&tmp),
            true,
        )?;
        let deb = fs::read_dir(&tmp)
            .map_err(io_err("list", &tmp))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|x| x == "deb"))
            .ok_or_else(|| RecipeError::CommandFailed {
                command: format!("apt-get download {}", pkg.spec()),
                status: "exit status: 0".into(),
                stderr: format!("no .deb appeared in {}", tmp.display()),
            })?;
        verify(pkg, &deb)?;
        fs::rename(&deb, &target).map_err(io_err("rename", &target))
    })();
    let _ = fs::remove_dir_all(&tmp);
    result?;
    Ok(target)
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
    fn missing_tool_is_a_typed_error() {
        let err = run(&mut Command::new("hvmm-no-such-tool-xyz"), true).unwrap_err();
        assert!(
            matches!(err, RecipeError::ToolMissing { ref tool } if tool == "hvmm-no-such-tool-xyz")
        );
    }
}
