//! Opening /dev/kvm with errors that say what is wrong.

use std::fs::OpenOptions;
use std::os::fd::IntoRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use kvm_ioctls::Kvm;

/// /dev/kvm errors.
#[derive(Debug, thiserror::Error)]
pub enum KvmError {
    /// No such device node.
    #[error("{0} does not exist: KVM is not available on this host (load kvm_intel/kvm_amd, or enable nested virtualization)")]
    Missing(PathBuf),
    /// The node exists but we may not open it.
    #[error("{0} is not accessible: permission denied (run as root or add this user to the `kvm` group)")]
    NotPermitted(PathBuf),
    /// Opening failed otherwise.
    #[error("opening {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The node is not a KVM device (or speaks another API).
    #[error("{path} is not a KVM device: {why}")]
    NotKvm { path: PathBuf, why: String },
}

/// Map an open(2) error on `path` to a KvmError.
pub fn classify_open_error(path: &Path, e: std::io::Error) -> KvmError {
    match e.kind() {
        std::io::ErrorKind::NotFound => KvmError::Missing(path.to_path_buf()),
        std::io::ErrorKind::PermissionDenied => KvmError::NotPermitted(path.to_path_buf()),
        _ => KvmError::Open {
            path: path.to_path_buf(),
            source: e,
        },
    }
}

/// Open the KVM device at `path` and check its API version.
pub fn open(path: &Path) -> Result<Kvm, KvmError> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| classify_open_error(path, e))?;
    let fd = f.into_raw_fd();
    // SAFETY: fd is an open file descriptor we own (just released by File);
    // Kvm takes ownership and closes it on drop.
    let kvm = unsafe { <Kvm as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    // KVM_GET_API_VERSION on a non-KVM fd fails with ENOTTY (kvm-ioctls
    // returns the raw ioctl result, negative on error).
    let v = kvm.get_api_version();
    if v != 12 {
        return Err(KvmError::NotKvm {
            path: path.to_path_buf(),
            why: if v < 0 {
                format!(
                    "KVM_GET_API_VERSION failed: {}",
                    std::io::Error::last_os_error()
                )
            } else {
                format!("API version {v}, expected 12")
            },
        });
    }
    Ok(kvm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_device() {
        let e = open(Path::new("/nonexistent/kvm")).err().unwrap();
        assert!(matches!(e, KvmError::Missing(_)), "{e}");
    }

    #[test]
    fn not_a_kvm_device() {
        let e = open(Path::new("/dev/null")).err().unwrap();
        assert!(matches!(e, KvmError::NotKvm { .. }), "{e}");
    }

    #[test]
    fn permission_denied_is_named() {
        let e = classify_open_error(
            Path::new("/dev/kvm"),
            std::io::Error::from_raw_os_error(libc::EACCES),
        );
        assert!(matches!(e, KvmError::NotPermitted(_)));
        assert!(e.to_string().contains("kvm` group"));
    }
}
