//! Shared helpers for the integration tests in this folder.

/// True when running under CI (`CI=true`): tests that need `/dev/kvm`,
/// hugepages or root fail loudly there instead of skipping.
pub fn in_ci() -> bool {
    std::env::var("CI")
        .map(|v| v == "true" || v == "1")
        .unwrap_or(false)
}

/// Skip (outside CI) or fail (in CI) a test whose prerequisite is missing.
/// Returns `true` when the test should go on.
pub fn require(what: &str, available: bool) -> bool {
    if available {
        return true;
    }
    if in_ci() {
        panic!("CI=true but {what} is not available: this test cannot be skipped in CI");
    }
    eprintln!("SKIP: {what} not available");
    false
}

/// `/dev/kvm` opens read-write and we are root (to reserve hugepages):
/// [`require`]d.
pub fn require_kvm_root() -> bool {
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    require("/dev/kvm", kvm) && require("root (to reserve hugepages)", root)
}

/// `mem` bytes of free 2 MiB hugepages, reserved for the caller's run
/// ([`require`]d; the pool shrinks back when the reservation drops).
pub fn require_hugepages_2m(mem: u64) -> Option<notifier::hostconf::HugepageReservation> {
    use notifier::PageSize;
    let pool = notifier::hostconf::HugepageReservation::require(
        PageSize::Size2M,
        mem / PageSize::Size2M.bytes(),
    );
    if !require("free 2M hugepages for guest RAM", pool.is_ok()) {
        return None;
    }
    pool.ok()
}

/// Where [`tiny_elf`] loads its code (16 MiB, the kernel's usual paddr).
pub const KERNEL_PADDR: u64 = 0x100_0000;

/// A minimal ELF64 x86-64 executable: one PT_LOAD of `code` at 16 MiB
/// (memsz `memsz`), entry at its first byte.
pub fn tiny_elf(code: &[u8], memsz: u64) -> Vec<u8> {
    let code_off = 0x100u64;
    let mut b = Vec::new();
    b.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
    b.extend_from_slice(&2u16.to_le_bytes()); // e_type EXEC
    b.extend_from_slice(&62u16.to_le_bytes()); // e_machine x86-64
    b.extend_from_slice(&1u32.to_le_bytes());
    b.extend_from_slice(&KERNEL_PADDR.to_le_bytes()); // e_entry
    b.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
    b.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    b.extend_from_slice(&0u32.to_le_bytes());
    for v in [64u16, 56, 1, 64, 0, 0] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    b.extend_from_slice(&7u32.to_le_bytes()); // RWX
    for v in [
        code_off,
        KERNEL_PADDR,
        KERNEL_PADDR,
        code.len() as u64,
        memsz.max(code.len() as u64),
        0x1000,
    ] {
        b.extend_from_slice(&v.to_le_bytes());
    }
    b.resize(notifier::convert::u64_to_usize(code_off), 0);
    b.extend_from_slice(code);
    b
}

/// An initramfs with nothing in it (a trailer-only newc archive): what
/// the crafted kernels get.
pub fn empty_initrd() -> Vec<u8> {
    guests::linux::cpio::CpioWriter::new(Vec::new())
        .finish()
        .expect("an empty cpio archive")
}

/// Prints `msg` on COM1 (`out dx, al` per byte), then resets via the i8042.
pub fn serial_then_reset(msg: &str) -> Vec<u8> {
    let mut c = vec![0x48, 0x8d, 0x35, 17, 0, 0, 0]; // lea rsi, [rip+17] (msg)
    c.extend_from_slice(&[0x66, 0xba, 0xf8, 0x03]); // mov dx, 0x3f8
    c.extend_from_slice(&[0xac, 0x84, 0xc0, 0x74, 0x03, 0xee, 0xeb, 0xf8]); // lodsb; test; jz +3; out; jmp -8
    c.extend_from_slice(&[0xb0, 0xfe, 0xe6, 0x64, 0xf4]); // mov al,0xfe; out 0x64,al; hlt
    c.extend_from_slice(msg.as_bytes());
    c.push(0);
    c
}

/// The Linux guest image for the boot tests: `VMM_TEST_KERNEL` and
/// `VMM_TEST_INITRD`, else the provisioned Debian image.
pub fn linux_image() -> Option<(std::path::PathBuf, std::path::PathBuf)> {
    if let (Ok(k), Ok(i)) = (
        std::env::var("VMM_TEST_KERNEL"),
        std::env::var("VMM_TEST_INITRD"),
    ) {
        return Some((k.into(), i.into()));
    }
    match vmm::machine::linux::default_image() {
        Ok(x) => Some(x),
        Err(e) => {
            eprintln!("no Linux guest image: {e}");
            None
        }
    }
}

/// The KVM this test runs on: the two hosts the project tests on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvmHost {
    /// This build machine's `kvm_pvm`: shadow MMU only, guest CPL0 code
    /// emulated, guest user space cannot make a system call.
    Pvm,
    /// `vmm host`'s emulated AMD SVM host (`kvm_amd` under QEMU TCG): TDP
    /// MMU, nested SVM, guest user space.
    EmulatedSvm,
    /// Any other KVM (real hardware): behaves like the emulated host.
    Other,
}

/// Which KVM module serves `/dev/kvm`.
pub fn kvm_host() -> KvmHost {
    if std::path::Path::new("/sys/module/kvm_pvm").exists() {
        KvmHost::Pvm
    } else if std::env::var("HVMM_HOST").is_ok_and(|h| h == "emulated-svm") {
        KvmHost::EmulatedSvm
    } else {
        KvmHost::Other
    }
}

/// Guest user space runs (system calls work) on this host.
pub fn guest_userland_works() -> bool {
    kvm_host() != KvmHost::Pvm
}

/// The `vmm` binary `cargo test --workspace` built beside the test
/// binaries (`target/<profile>/vmm`; the test binaries are in `deps/`).
pub fn vmm_binary() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let bin = exe
        .parent()
        .and_then(std::path::Path::parent)
        .map(|d| d.join("vmm"))
        .expect("target directory");
    assert!(
        bin.is_file(),
        "{} is missing: build it with `cargo build --release -p vmm` (cargo test --workspace does)",
        bin.display()
    );
    bin
}
