//! The Linux guest recipe end to end: provision (download, verify, extract,
//! build) into the default cache, provision again (cached), and check what
//! the VMM will boot; the same for the `debian-6.12` pin (a zstd bzImage),
//! and its `kvm.ko.xz` read from the package and decompressed.

use std::process::Command;
use std::time::Instant;

use guests::linux::{self, bzimage, cpio, decompress, elf, recipe, ProvisionOptions, INIT_MARKER};
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
    let t = Instant::now();
    let decoded = bzimage::extract_vmlinux(&bz).unwrap();
    eprintln!(
        "6.1 extract ({}): {:.3} s, {} -> {} bytes",
        decoded.compression,
        t.elapsed().as_secs_f64(),
        bz.len(),
        decoded.bytes.len()
    );
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
    // The pins agree with Debian's signed index, where apt knows them.
    for pkg in recipe::KERNELS
        .iter()
        .map(|k| k.package)
        .chain([recipe::BUSYBOX])
    {
        let out = Command::new("apt-cache")
            .args(["show", "--no-all-versions", &pkg.spec()])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        if let Some((_, sha)) = linux::apt::stanza_fields(&text, "SHA256").first() {
            assert_eq!(*sha, pkg.sha256, "{} pin vs apt's index", pkg.spec());
        }
    }
    eprintln!(
        "vmlinux {} bytes (entry {:#x}), initramfs {} bytes, {} entries",
        vmlinux.len(),
        info.entry,
        initrd.len(),
        entries.len()
    );
}

#[test]
fn damaged_cache_is_repaired() {
    if !require(
        "apt-get and dpkg-deb (a Debian host) for the Linux guest recipe",
        runs("apt-get") && runs("dpkg-deb"),
    ) {
        return;
    }
    // Seed a private cache with the shared cache's verified packages, then
    // damage one package and the built image's stamp.
    let shared = linux::provision(&ProvisionOptions::quiet()).expect("provision");
    let shared_debs = shared
        .vmlinux
        .ancestors()
        .nth(3)
        .expect("cache root above linux/<release>/vmlinux")
        .join("debs");
    let cache = std::env::temp_dir().join(format!("hvmm-recipe-repair-{}", std::process::id()));
    let debs = cache.join("debs");
    std::fs::create_dir_all(&debs).unwrap();
    for pkg in [recipe::KERNEL, recipe::BUSYBOX] {
        std::fs::copy(
            shared_debs.join(pkg.file_name()),
            debs.join(pkg.file_name()),
        )
        .unwrap();
    }
    let busybox_deb = debs.join(recipe::BUSYBOX.file_name());
    std::fs::write(&busybox_deb, b"damaged").unwrap();
    let messages = std::cell::RefCell::new(Vec::<String>::new());
    let record = |m: &str| messages.borrow_mut().push(m.to_string());
    let opts = ProvisionOptions {
        cache_dir: cache.clone(),
        progress: Some(&record),
    };
    let image = linux::provision(&opts).expect("provision repairs the damaged package");
    let log = messages.borrow().join("\n");
    assert!(log.contains("downloading again"), "{log}");
    assert!(
        log.contains(&format!("downloading {}", recipe::BUSYBOX.spec())),
        "{log}"
    );
    assert!(
        !log.contains(&recipe::KERNEL.spec()),
        "the intact kernel package is reused: {log}"
    );
    linux::apt::verify(&recipe::BUSYBOX, &busybox_deb).unwrap();
    assert_eq!(
        std::fs::read(&image.initramfs).unwrap(),
        std::fs::read(&shared.initramfs).unwrap(),
        "the initramfs is reproducible"
    );

    // A stamp that no longer matches makes the next call rebuild.
    let stamp = image.vmlinux.with_file_name("STAMP");
    std::fs::write(&stamp, "fingerprint stale\n").unwrap();
    messages.borrow_mut().clear();
    linux::provision(&opts).unwrap();
    assert!(messages.borrow().iter().any(|m| m.contains("ready in")));
    messages.borrow_mut().clear();
    linux::provision(&opts).unwrap();
    assert!(messages.borrow().is_empty(), "a valid cache is silent");
    let _ = std::fs::remove_dir_all(&cache);
}

#[test]
fn debian_6_12_provisions_from_a_zstd_bzimage() {
    if !require(
        "apt-get and dpkg-deb (a Debian host) for the Linux guest recipe",
        runs("apt-get") && runs("dpkg-deb"),
    ) {
        return;
    }
    let pin = recipe::kernel_by_name("debian-6.12").expect("the 6.12 pin");
    let image = linux::provision_kernel(pin, &ProvisionOptions::default())
        .expect("provision the 6.12 guest");
    assert_eq!(image.kernel_version, pin.release);
    assert!(image
        .vmlinux
        .ends_with(format!("linux/{}/vmlinux", pin.release)));
    let again = linux::provision_kernel(pin, &ProvisionOptions::quiet()).unwrap();
    assert_eq!(again, image);
    let default = linux::provision(&ProvisionOptions::quiet()).unwrap();
    assert_ne!(
        default.vmlinux, image.vmlinux,
        "one cache directory per release"
    );
    assert_eq!(
        std::fs::read(&default.initramfs).unwrap(),
        std::fs::read(&image.initramfs).unwrap(),
        "the initramfs (busybox pin) is shared"
    );

    let bz = std::fs::read(image.bzimage()).unwrap();
    let t = Instant::now();
    let decoded = bzimage::extract_vmlinux(&bz).unwrap();
    eprintln!(
        "6.12 extract ({}): {:.3} s, {} -> {} bytes",
        decoded.compression,
        t.elapsed().as_secs_f64(),
        bz.len(),
        decoded.bytes.len()
    );
    assert_eq!(decoded.compression, bzimage::Compression::Zstd);
    let vmlinux = std::fs::read(&image.vmlinux).unwrap();
    assert!(
        decoded.bytes == vmlinux,
        "cached vmlinux differs from the payload"
    );
    let info = elf::check_x86_64_exec(&vmlinux).unwrap();
    assert!(info.entry_in_load_segment());

    // The package's KVM module, as someone loading it would read it.
    let debs = image
        .vmlinux
        .ancestors()
        .nth(3)
        .expect("cache root above linux/<release>/vmlinux")
        .join("debs");
    let deb = debs.join(pin.package.file_name());
    linux::apt::verify(&pin.package, &deb).unwrap();
    let member = format!(
        "{}kernel/arch/x86/kvm/kvm.ko.xz",
        pin.modules_member_prefix()
    );
    let xz = linux::deb::read_members(&deb, &[&member])
        .unwrap()
        .pop()
        .unwrap();
    let ko = decompress::module(&member, &xz).expect("kvm.ko.xz decompresses");
    assert!(elf::is_elf(&ko));
    assert_eq!(ko[16], 1, "ET_REL: a relocatable module");
    assert!(
        ko.windows(b"vermagic=".len() + pin.release.len())
            .any(|w| w.ends_with(pin.release.as_bytes()) && w.starts_with(b"vermagic=")),
        "kvm.ko's vermagic names {}",
        pin.release
    );
    eprintln!("kvm.ko.xz {} -> {} bytes", xz.len(), ko.len());
}
