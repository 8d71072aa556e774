//! SIGINT during a Linux boot (`vmm::machine::linux::boot`): it stops that
//! boot with `BootError::Interrupted` and no other. The boot's handler is
//! installed for the boot only: afterwards the process's previous handler
//! is back, and a second boot in the same process runs to its end. (Its
//! own test binary: the signal goes to the whole process.)

use integration_tests::{require, serial_then_reset, tiny_elf};
use notifier::PageSize;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;
use vmm::commands::boot::{self, BootArgs};
use vmm::machine::linux::BootError;

static OURS: AtomicU32 = AtomicU32::new(0);

extern "C" fn count(_: libc::c_int) {
    OURS.fetch_add(1, Ordering::SeqCst);
}

fn handler_of(sig: libc::c_int) -> usize {
    // SAFETY: all-zero is a valid sigaction; sigaction with a null new
    // action only reads the current one into `old`.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(sig, std::ptr::null(), &mut old);
        old.sa_sigaction
    }
}

#[test]
fn an_interrupt_stops_one_boot_and_leaves_the_handler_as_it_was() {
    let kvm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !require("/dev/kvm", kvm) {
        return;
    }
    // SAFETY: installs a handler that only increments an atomic.
    unsafe { libc::signal(libc::SIGINT, count as extern "C" fn(libc::c_int) as usize) };
    let ours = handler_of(libc::SIGINT);
    let dir = std::env::temp_dir().join(format!("vmm-boot-signals-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("scratch dir");
    let initrd = dir.join("initrd");
    std::fs::write(&initrd, integration_tests::empty_initrd()).expect("initrd");
    let args = |name: &str, code: Vec<u8>| {
        let k = dir.join(name);
        std::fs::write(&k, tiny_elf(&code, 0)).expect("kernel");
        let mut a = BootArgs::new(k, initrd.clone());
        a.hugepages = PageSize::Size4K;
        a.mem = 32 << 20;
        a.linux.quiet = true;
        a.timeout = 60;
        a.linux.serial_log = Some(dir.join(format!("{name}.log")));
        a
    };

    // A guest that spins (`jmp $`) until the signal stops it.
    let spin = args("spin", vec![0xeb, 0xfe]);
    let killer = std::thread::spawn(|| {
        std::thread::sleep(Duration::from_millis(1500));
        // SAFETY: kill(2) to this process.
        unsafe { libc::kill(libc::getpid(), libc::SIGINT) };
    });
    let r = boot::run(&spin).expect("spin boot");
    killer.join().expect("killer");
    assert!(
        matches!(r.error, Some(BootError::Interrupted { .. })),
        "{:?}",
        r.error
    );
    assert_eq!(OURS.load(Ordering::SeqCst), 0, "the boot took the signal");
    assert_eq!(
        handler_of(libc::SIGINT),
        ours,
        "the previous handler is back"
    );

    // The next boot is not interrupted by the last one's signal.
    let hello = args("hello", serial_then_reset("hello\n"));
    let r = boot::run(&hello).expect("hello boot");
    assert!(r.error.is_none(), "{:?}", r.error);
    assert_eq!(r.json["exit"], "reboot", "{}", r.json);

    // SAFETY: kill(2) to this process; our handler counts it.
    unsafe { libc::kill(libc::getpid(), libc::SIGINT) };
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        OURS.load(Ordering::SeqCst),
        1,
        "a signal after the boots is ours"
    );
}
