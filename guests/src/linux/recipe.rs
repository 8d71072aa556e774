//! What the Linux guest is made of, pinned: exact Debian package versions
//! and the sha256 of each `.deb` (the value apt's signed index lists as
//! `SHA256:` for that version; `apt-cache show <pkg>=<version>` shows it).
//!
//! The kernels are a named list ([`KERNELS`]: `debian-6.1`, the default, and
//! `debian-6.12`). To move a pin or add one: `apt-get update && apt-cache
//! policy 'linux-image-6.1*-cloud-amd64'`, pick a version, `apt-get
//! download` it, `sha256sum` it (the `SHA256:` of `apt-cache show
//! <pkg>=<version>`), and update or add a [`KernelPin`].

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

/// A pinned kernel the recipe can provision, chosen by [`name`](Self::name)
/// (`vmm boot --kernel debian-6.12`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelPin {
    /// What `--kernel` calls it, e.g. `debian-6.1`.
    pub name: &'static str,
    /// The `linux-image-*` package.
    pub package: DebPackage,
    /// The kernel release the package installs (`/boot/vmlinuz-<release>`,
    /// `/lib/modules/<release>/`).
    pub release: &'static str,
}

impl KernelPin {
    /// Path of the kernel image inside the package's data.tar.
    pub fn vmlinuz_member(&self) -> String {
        format!("boot/vmlinuz-{}", self.release)
    }

    /// Path of the kernel config inside the package's data.tar.
    pub fn config_member(&self) -> String {
        format!("boot/config-{}", self.release)
    }

    /// The directory of the package's modules inside its data.tar
    /// (`lib/modules/<release>/`, with the slash): e.g.
    /// `lib/modules/<release>/kernel/arch/x86/kvm/kvm.ko.xz` for 6.12.
    pub fn modules_member_prefix(&self) -> String {
        format!("lib/modules/{}/", self.release)
    }
}

/// The Debian 12 (bookworm) cloud kernel, 6.1 line: the default. 6.1.176-1
/// is the bookworm point-release kernel (in `bookworm/main` and in
/// `bookworm-security`), so it stays downloadable longer than a
/// security-only upload. Its bzImage payload is LZ4 (`CONFIG_KERNEL_LZ4=y`).
pub const DEBIAN_6_1: KernelPin = KernelPin {
    name: "debian-6.1",
    package: DebPackage {
        name: "linux-image-6.1.0-50-cloud-amd64",
        version: "6.1.176-1",
        sha256: "efe19f605b6f54a8352e68d85a629abb2d30b72a085faef603a9152590baa791",
    },
    release: "6.1.0-50-cloud-amd64",
};

/// The 6.12 cloud kernel of bookworm-security (the trixie kernel built for
/// bookworm). Its bzImage payload is zstd (`CONFIG_KERNEL_ZSTD=y`, `zstd -22
/// --ultra`), its modules `.ko.xz`.
pub const DEBIAN_6_12: KernelPin = KernelPin {
    name: "debian-6.12",
    package: DebPackage {
        name: "linux-image-6.12.117+deb12-cloud-amd64",
        version: "6.12.117-1~deb12u1",
        sha256: "5195b288dec79e2981d6b84457f38b7ce7310a2d702930ec7d07209c7f78ce37",
    },
    release: "6.12.117+deb12-cloud-amd64",
};

/// Every kernel the recipe can provision.
pub const KERNELS: &[KernelPin] = &[DEBIAN_6_1, DEBIAN_6_12];

/// The kernel `provision` and `vmm boot` without `--kernel` use.
pub const DEFAULT_KERNEL: &KernelPin = &DEBIAN_6_1;

/// The pinned kernel called `name` (`debian-6.1`, `debian-6.12`).
pub fn kernel_by_name(name: &str) -> Option<&'static KernelPin> {
    KERNELS.iter().find(|k| k.name == name)
}

/// The names of [`KERNELS`], comma-separated (for messages).
pub fn kernel_names() -> String {
    KERNELS
        .iter()
        .map(|k| k.name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The default kernel's package ([`DEFAULT_KERNEL`]`.package`).
pub const KERNEL: DebPackage = DEFAULT_KERNEL.package;

/// The default kernel's release ([`DEFAULT_KERNEL`]`.release`).
pub const KERNEL_RELEASE: &str = DEFAULT_KERNEL.release;

/// Static busybox: the whole of the guest's user space.
pub const BUSYBOX: DebPackage = DebPackage {
    name: "busybox-static",
    version: "1:1.35.0-4+deb12u1+b1",
    sha256: "3d3fdbe91d4660c873e14b092c213fe81c1da6362daa236eb25d0171eb108744",
};

/// Path of the static busybox inside busybox-static's data.tar.
pub const BUSYBOX_MEMBER: &str = "bin/busybox";

/// Bumped when the way artefacts are built changes without any input above
/// changing (e.g. a fix in the cpio writer).
const BUILD_REVISION: u32 = 1;

/// A digest of everything one kernel's built artefacts depend on: its pin
/// and busybox's, the `/init` script and applets, the build revision. The
/// cache keeps built artefacts only while this matches.
pub fn fingerprint(kernel: &KernelPin) -> String {
    let mut h = Sha256::new();
    h.update(format!("rev={BUILD_REVISION}\n"));
    for p in [kernel.package, BUSYBOX] {
        h.update(format!("{}={} {}\n", p.name, p.version, p.sha256));
    }
    h.update(kernel.release);
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
        let packages = KERNELS.iter().map(|k| k.package).chain([BUSYBOX]);
        for p in packages {
            assert_eq!(p.sha256.len(), 64);
            assert!(p
                .sha256
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase()));
            assert!(!p.file_name().contains(':'));
        }
        for k in KERNELS {
            assert!(k.package.name.ends_with(k.release), "{}", k.name);
            assert_eq!(kernel_by_name(k.name), Some(k));
            assert_eq!(k.vmlinuz_member(), format!("boot/vmlinuz-{}", k.release));
            assert!(k.modules_member_prefix().starts_with("lib/modules/"));
            assert!(k.modules_member_prefix().ends_with('/'));
            assert_eq!(fingerprint(k), fingerprint(k));
        }
        assert_eq!(kernel_by_name("debian-6.1"), Some(&DEBIAN_6_1));
        assert_eq!(kernel_by_name("debian-6.12"), Some(&DEBIAN_6_12));
        assert_eq!(kernel_by_name("debian-7"), None);
        assert_eq!(DEFAULT_KERNEL, &DEBIAN_6_1);
        assert_eq!(kernel_names(), "debian-6.1, debian-6.12");
        assert_ne!(fingerprint(&DEBIAN_6_1), fingerprint(&DEBIAN_6_12));
        assert_eq!(
            DEBIAN_6_12.config_member(),
            "boot/config-6.12.117+deb12-cloud-amd64"
        );
        assert_eq!(
            BUSYBOX.file_name(),
            "busybox-static_1%3a1.35.0-4+deb12u1+b1_amd64.deb"
        );
    }
}
