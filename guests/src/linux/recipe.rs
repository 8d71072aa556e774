//! What the Linux guest is made of, pinned: exact Debian package versions
//! and the sha256 of each `.deb` (the value apt's signed index lists as
//! `SHA256:` for that version; `apt-cache show <pkg>=<version>` shows it).
//!
//! To move to another kernel: `apt-get update && apt-cache policy
//! 'linux-image-6.1*-cloud-amd64'`, pick a version, `apt-get download` it,
//! `sha256sum` it, and update [`KERNEL`] and [`KERNEL_RELEASE`].

use sha2::{Digest, Sha256};

use super::initramfs;

/// One pinned Debian binary package.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DebPackage {
    pub name: &'static str,
    /// Exact Debian version (with epoch when it has one).
    pub version: &'static str,
    /// sha256 of the `.deb` file, lowercase hex.
    pub sha256: &'static str,
}

impl DebPackage {
    /// `name=version`, as `apt-get download` and `apt-cache show` take it.
    pub fn spec(&self) -> String {
        format!("{}={}", self.name, self.version)
    }

    /// The cache file name: `name_version_amd64.deb` with the epoch colon
    /// replaced (a colon in a file name upsets tools; apt writes `%3a`).
    pub fn file_name(&self) -> String {
        format!(
            "{}_{}_amd64.deb",
            self.name,
            self.version.replace(':', "%3a")
        )
    }
}

/// The Debian 12 (bookworm) cloud kernel, 6.1 line. 6.1.176-1 is the
/// bookworm point-release kernel (in `bookworm/main` and in
/// `bookworm-security`), so it stays downloadable longer than a
/// security-only upload. Its bzImage payload is LZ4 (`CONFIG_KERNEL_LZ4=y`).
pub const KERNEL: DebPackage = DebPackage {
    name: "linux-image-6.1.0-50-cloud-amd64",
    version: "6.1.176-1",
    sha256: "efe19f605b6f54a8352e68d85a629abb2d30b72a085faef603a9152590baa791",
};

/// The kernel release the package installs (`/boot/vmlinuz-<release>`).
pub const KERNEL_RELEASE: &str = "6.1.0-50-cloud-amd64";

/// A kernel the recipes know by name: the Debian package that ships it and
/// the release it installs. The same package serves as the Linux guest's
/// kernel (`vmm boot --kernel debian-6.12`) and as the emulated host's
/// (`vmm host --kernel debian-6.12`), whose kvm modules it also ships.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelPin {
    /// The name on the command line, e.g. `debian-6.1`.
    pub name: &'static str,
    pub package: DebPackage,
    /// `uname -r` of the kernel, e.g. `6.1.0-50-cloud-amd64`.
    pub release: &'static str,
}

impl KernelPin {
    /// The bzImage inside the package's data.tar.
    pub fn vmlinuz_member(&self) -> String {
        format!("boot/vmlinuz-{}", self.release)
    }
    /// The kernel config inside the package's data.tar.
    pub fn config_member(&self) -> String {
        format!("boot/config-{}", self.release)
    }
    /// Where the package's modules live, with a trailing `/`.
    pub fn modules_member_prefix(&self) -> String {
        format!("lib/modules/{}/", self.release)
    }
}

/// Debian 12's 6.1 cloud kernel (the default guest and host kernel).
pub const DEBIAN_6_1: KernelPin = KernelPin {
    name: "debian-6.1",
    package: KERNEL,
    release: KERNEL_RELEASE,
};

/// Debian 12's 6.12 cloud kernel (bookworm-security; its bzImage payload is
/// zstd, its modules `.ko.xz`).
pub const DEBIAN_6_12: KernelPin = KernelPin {
    name: "debian-6.12",
    package: DebPackage {
        name: "linux-image-6.12.117+deb12-cloud-amd64",
        version: "6.12.117-1~deb12u1",
        sha256: "5195b288dec79e2981d6b84457f38b7ce7310a2d702930ec7d07209c7f78ce37",
    },
    release: "6.12.117+deb12-cloud-amd64",
};

/// Every kernel known by name.
pub const KERNELS: &[KernelPin] = &[DEBIAN_6_1, DEBIAN_6_12];

/// The kernel used when none is named.
pub const DEFAULT_KERNEL: &KernelPin = &DEBIAN_6_1;

/// The pinned kernel called `name`.
pub fn kernel_by_name(name: &str) -> Option<&'static KernelPin> {
    KERNELS.iter().find(|k| k.name == name)
}

/// Static busybox: the whole of the guest's user space.
pub const BUSYBOX: DebPackage = DebPackage {
    name: "busybox-static",
    version: "1:1.35.0-4+deb12u1+b1",
    sha256: "3d3fdbe91d4660c873e14b092c213fe81c1da6362daa236eb25d0171eb108744",
};

/// Path of the kernel image inside the kernel package's data.tar.
pub fn vmlinuz_member() -> String {
    format!("boot/vmlinuz-{KERNEL_RELEASE}")
}

/// Path of the kernel config inside the kernel package's data.tar.
pub fn config_member() -> String {
    format!("boot/config-{KERNEL_RELEASE}")
}

/// Path of the static busybox inside busybox-static's data.tar.
pub const BUSYBOX_MEMBER: &str = "bin/busybox";

/// Bumped when the way artefacts are built changes without any input above
/// changing (e.g. a fix in the cpio writer).
const BUILD_REVISION: u32 = 1;

/// A digest of everything the built artefacts depend on: the pins, the
/// `/init` script and applets, the build revision. The cache keeps built
/// artefacts only while this matches.
pub fn fingerprint() -> String {
    let mut h = Sha256::new();
    h.update(format!("rev={BUILD_REVISION}\n"));
    for p in [KERNEL, BUSYBOX] {
        h.update(format!("{}={} {}\n", p.name, p.version, p.sha256));
    }
    h.update(KERNEL_RELEASE);
    h.update(initramfs::INIT_SCRIPT);
    for a in initramfs::APPLETS {
        h.update(a);
        h.update("\n");
    }
    hex(&h.finalize())
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pins_are_well_formed() {
        for p in [KERNEL, BUSYBOX] {
            assert_eq!(p.sha256.len(), 64);
            assert!(p
                .sha256
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
            assert!(!p.file_name().contains(':'));
        }
        assert!(KERNEL.name.ends_with(KERNEL_RELEASE));
        assert_eq!(
            BUSYBOX.file_name(),
            "busybox-static_1%3a1.35.0-4+deb12u1+b1_amd64.deb"
        );
        assert_eq!(fingerprint(), fingerprint());
    }
}
