//! The Linux guest recipe end to end: provision (download, verify, extract,
//! build) into the default cache, provision again (cached), and check what
//! the VMM will boot.

use std::process::Command;
use std::time::Instant;

use guests::linux::{self, bzimage, cpio, elf, recipe, ProvisionOptions, INIT_MARKER};
use integration_tests::require;

fn runs(tool: &str) -> bool {
    Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn linux_recipe_provisions_a_bootable_image() {
    if !require(
        "apt-get and dpkg-deb (a Debian host) for the Linux guest recipe",
        runs("apt-get") && runs("dpkg-deb"),
    ) {
        return;
    }
    let opts = ProvisionOptions::default();
    let t = Instant::now();
    let image = linux::provision(&opts).expect("provision the Linux guest");
    let first = t.elapsed();
    let t = Instant::now();
    let again = linux::provision(&ProvisionOptions::quiet()).expect("provision again");
    let second = t.elapsed();
    eprintln!(
        "provision: first call {:.2} s, second (cached) {:.3} s, cache {}",
        first.as_secs_f64(),
        second.as_secs_f64(),
        opts.cache_dir.display()
    );
    assert_eq!(again, image, "a second provision returns the same image");
    assert_eq!(image.kernel_version, recipe::KERNEL_RELEASE);

    // vmlinux: an x86-64 ELF executable whose entry lies in a loadable
    // segment above 1 MiB, identical to what the kept bzImage decodes to.
    let vmlinux = std::fs::read(&image.vmlinux).unwrap();
    let info = elf::check_x86_64_exec(&vmlinux).unwrap();
    assert!(info.entry >= 0x10_0000, "entry {:#x}", info.entry);
    assert!(
        info.entry_in_load_segment(),
        "entry {:#x} outside PT_LOADs",
        info.entry
    );
    let bz = std::fs::read(image.bzimage()).unwrap();
    let decoded = bzimage::extract_vmlinux(&bz).unwrap();
    assert_eq!(decoded.compression, bzimage::Compression::Lz4Legacy);
    assert!(
        decoded.bytes == vmlinux,
        "cached vmlinux differs from the bzImage payload"
    );

    // initramfs: parses, /init carries the marker, busybox is a static
    // x86-64 executable, the console device node is there.
    let initrd = std::fs::read(&image.initramfs).unwrap();
    let entries = cpio::parse(&initrd).unwrap();
    let find = |name: &str| {
        entries
            .iter()
            .find(|e| e.name == name)
            .unwrap_or_else(|| panic!("initramfs lacks {name}"))
    };
    let init = find("init");
    assert!(init.is_file() && init.mode & 0o100 != 0);
    let script = std::str::from_utf8(init.data).unwrap();
    assert!(script.contains(INIT_MARKER) && script.contains("reboot -f"));
    elf::check_x86_64_exec(find("bin/busybox").data).unwrap();
    assert!(find("bin/sh").is_symlink());
    let console = find("dev/console");
    assert!(console.is_char_dev() && (console.rdev_major, console.rdev_minor) == (5, 1));
    eprintln!(
        "vmlinux {} bytes (entry {:#x}), initramfs {} bytes, {} entries",
        vmlinux.len(),
        info.entry,
        initrd.len(),
        entries.len()
    );
}
