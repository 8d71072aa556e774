//! A guard against a PIC interrupt that KVM's in-kernel irqchip leaves
//! pending for good.
//!
//! A Linux guest without ACPI or MP tables (the Debian cloud kernels are
//! built without `CONFIG_X86_MPPARSE`, and this VMM writes no ACPI tables)
//! runs in "virtual wire mode": every device interrupt - the PIT tick,
//! COM1 - goes through the in-kernel 8259 PIC and the LAPIC's LINT0 as
//! ExtINT. KVM looks at the PIC's output only when that output rises
//! (`pic_unlock()` kicks a vCPU whose LAPIC accepts ExtINT and raises
//! `KVM_REQ_EVENT`) or when something else raises `KVM_REQ_EVENT`. Linux's
//! `setup_local_APIC()` soft-disables the LAPIC (`APIC_SPIV = 0x2ff`,
//! which masks LVT0), then enables it again (`APIC_SPIV = 0x3ff`,
//! `APIC_LVT0 = 0x700`); a PIC interrupt raised in between finds no vCPU
//! that accepts it, so no vCPU is told, the LVT0 write that re-enables
//! ExtINT does not look at the PIC again, and while the request stays in
//! the PIC's IRR further edges on that line coalesce into it. From then
//! on the guest gets no interrupt from the PIC at all: no timer tick, and
//! no COM1 THRE interrupt, so the 8250 driver's interrupt-driven TX never
//! runs and the first user-space write to the console blocks forever.
//! Seen on an emulated AMD SVM host (QEMU TCG): there the window is about
//! 8 ms of trapped LAPIC MMIO against a 4 ms PIT period, and every boot
//! hit it (host tracepoints: the PIT edge between the two SPIV writes was
//! the last `kvm_inj_virq`; `KVM_GET_IRQCHIP` at the timeout: master IRR
//! 0x11 - IRQ0 and IRQ4 - unmasked, ISR 0, LVT0 0x700, RFLAGS.IF 1).
//!
//! The guard: the VMM samples the master PIC ([`super::Vm::pic_waiting`]);
//! a request that stays raised, unmasked and unserved for
//! [`STUCK_AFTER`] ([`StuckIrqWatch`]) makes the vCPU thread write its own
//! MP state back ([`super::Vcpu::reevaluate_interrupts`]), which raises
//! `KVM_REQ_EVENT`, so KVM injects the pending ExtINT at the next entry
//! (or opens an interrupt window if the guest has interrupts off). A
//! guest that merely runs with interrupts off that long gets a harmless
//! re-evaluation.

use std::time::{Duration, Instant};

/// How long a PIC request may wait unserved before the vCPU is told to
/// look again. A guest taking interrupts serves one within microseconds,
/// but at emulated speed Linux can run with interrupts off for a hundred
/// milliseconds and more (a console write under QEMU TCG): those
/// re-evaluations are harmless, this keeps them rare.
pub const STUCK_AFTER: Duration = Duration::from_millis(500);

/// The requests of one 8259 that should be reaching the CPU now: raised
/// (`irr`) and unmasked (`imr`), while none is in service (`isr`: a
/// request of lower priority legitimately waits for the EOI).
pub fn waiting(irr: u8, imr: u8, isr: u8) -> u8 {
    if isr != 0 {
        return 0;
    }
    irr & !imr
}

/// Tells when a PIC request has waited [`STUCK_AFTER`] (or `after`).
#[derive(Debug)]
pub struct StuckIrqWatch {
    after: Duration,
    /// The lines waiting at every sample since `since`.
    lines: u8,
    since: Option<Instant>,
    /// How many times [`observe`](Self::observe) said "re-evaluate".
    pub fired: u64,
}

impl Default for StuckIrqWatch {
    fn default() -> Self {
        Self::new(STUCK_AFTER)
    }
}

impl StuckIrqWatch {
    /// A watch that fires once lines have waited `after`.
    pub fn new(after: Duration) -> Self {
        StuckIrqWatch {
            after,
            lines: 0,
            since: None,
            fired: 0,
        }
    }

    /// One sample taken at `now` of the lines [`waiting`]; true when the
    /// same line has been waiting at every sample for `after` (then the
    /// watch starts over, so it fires at most once per `after`).
    pub fn observe(&mut self, waiting: u8, now: Instant) -> bool {
        let still = waiting & self.lines;
        let since = match self.since {
            Some(t) if still != 0 => t,
            _ => {
                self.lines = waiting;
                self.since = (waiting != 0).then_some(now);
                return false;
            }
        };
        self.lines = still;
        if now.saturating_duration_since(since) < self.after {
            return false;
        }
        self.lines = 0;
        self.since = None;
        self.fired += 1;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn waiting_is_raised_unmasked_and_not_behind_one_in_service() {
        // The state read at the timeout of the stuck boot: IRQ0 and IRQ4.
        assert_eq!(waiting(0x11, 0xea, 0x00), 0x11);
        assert_eq!(waiting(0x11, 0xff, 0x00), 0);
        assert_eq!(waiting(0x10, 0xea, 0x01), 0);
        assert_eq!(waiting(0x00, 0x00, 0x00), 0);
    }

    #[test]
    fn a_request_left_pending_fires_once_per_period() {
        let t0 = Instant::now();
        let mut w = StuckIrqWatch::new(200 * MS);
        assert!(!w.observe(0x11, t0));
        assert!(!w.observe(0x11, t0 + 100 * MS));
        assert!(w.observe(0x11, t0 + 200 * MS));
        // Starts over: the next firing needs another full period.
        assert!(!w.observe(0x11, t0 + 300 * MS));
        assert!(!w.observe(0x11, t0 + 400 * MS));
        assert!(w.observe(0x11, t0 + 500 * MS));
        assert_eq!(w.fired, 2);
    }

    #[test]
    fn requests_the_guest_serves_never_fire() {
        let t0 = Instant::now();
        let mut w = StuckIrqWatch::new(200 * MS);
        // A tick raised at every sample, but served in between (the
        // sample after it sees none), or a different line each time.
        for i in 0..20u32 {
            let now = t0 + i * 100 * MS;
            let lines = [0x01, 0x00, 0x10, 0x01, 0x10][usize::try_from(i).unwrap() % 5];
            assert!(!w.observe(lines, now), "sample {i}");
        }
        // One line that stays while others come and go does fire.
        assert!(!w.observe(0x00, t0 + 2900 * MS));
        assert!(!w.observe(0x11, t0 + 3000 * MS));
        assert!(!w.observe(0x10, t0 + 3100 * MS));
        assert!(w.observe(0x12, t0 + 3200 * MS));
        assert_eq!(w.fired, 1);
    }

    /// The race itself, on the real /dev/kvm: a guest that soft-disables
    /// its LAPIC, has the VMM raise COM1's IRQ4 (through the irqfd, as the
    /// serial device does) while it is disabled, then enables the LAPIC and
    /// LVT0 as ExtINT - the steps of Linux's `setup_local_APIC()` - and
    /// waits with `sti; hlt` for the PIC interrupt.
    mod on_kvm {
        use std::path::Path;
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::Arc;
        use std::time::{Duration, Instant};

        use mmu::guest_walk::x86::{P, PS, RW};
        use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
        use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

        use super::super::StuckIrqWatch;
        use crate::arch::x86_64::emulate::CpuState;
        use crate::arch::x86_64::layout::PDPT_ADDR;
        use crate::devices::serial::COM1_GSI;
        use crate::memory::GuestMemorySlot;
        use crate::vstate::{kvm, ExitHandler, Handled, RunControl, Vcpu, VcpuError, Vm};

        const CODE: u64 = 0x1000;
        const IDT: u64 = 0x2000;
        const IDTR: u64 = 0x3000;
        const LAPIC_PD: u64 = 0xc000;
        /// The PIC's vector base the guest programs (IRQ4 -> 0x34).
        const VECTOR_BASE: u8 = 0x30;
        /// Guest -> VMM: "raise IRQ4 now" / "the IRQ4 handler ran".
        const PORT_RAISE: u16 = 0x10;
        const PORT_DELIVERED: u16 = 0x12;

        /// 64-bit CPL0 code at CODE (assembled with GNU as): lidt [IDTR];
        /// ICW1-4 and OCW1 to the master PIC (vector base 0x30, only IRQ4
        /// unmasked); ebx = LAPIC base; SPIV = 0xff (soft-disabled);
        /// out PORT_RAISE; SPIV = 0x1ff; LVT0 = 0x700 (ExtINT); sti;
        /// 1: hlt; jmp 1b. The IRQ4 handler at CODE + 0x100: out
        /// PORT_DELIVERED; cli; 2: hlt; jmp 2b.
        const GUEST: &[u8] = &[
            0x0f,
            0x01,
            0x1c,
            0x25,
            0x00,
            0x30,
            0x00,
            0x00, // lidt [0x3000]
            0xb0,
            0x11,
            0xe6,
            0x20,
            0xb0,
            VECTOR_BASE,
            0xe6,
            0x21, // ICW1, ICW2
            0xb0,
            0x04,
            0xe6,
            0x21,
            0xb0,
            0x01,
            0xe6,
            0x21, // ICW3, ICW4
            0xb0,
            0xef,
            0xe6,
            0x21, // OCW1: IRQ4 only
            0xbb,
            0x00,
            0x00,
            0xe0,
            0xfe, // mov ebx, 0xfee00000
            0xc7,
            0x83,
            0xf0,
            0x00,
            0x00,
            0x00,
            0xff,
            0x00,
            0x00,
            0x00, // SPIV = 0xff
            0xe6,
            0x10, // out PORT_RAISE
            0xc7,
            0x83,
            0xf0,
            0x00,
            0x00,
            0x00,
            0xff,
            0x01,
            0x00,
            0x00, // SPIV = 0x1ff
            0xc7,
            0x83,
            0x50,
            0x03,
            0x00,
            0x00,
            0x00,
            0x07,
            0x00,
            0x00, // LVT0 = 0x700
            0xfb,
            0xf4,
            0xeb,
            0xfd, // sti; 1: hlt; jmp 1b
        ];
        const HANDLER: &[u8] = &[0xe6, 0x12, 0xfa, 0xf4, 0xeb, 0xfd];

        /// The VMM side: raise IRQ4 on PORT_RAISE and wait until the PIC
        /// holds it (so it lands while the LAPIC is disabled), stop on
        /// PORT_DELIVERED.
        struct Probe<'a> {
            vm: &'a Vm,
            irq: &'a EventFd,
        }

        impl ExitHandler for Probe<'_> {
            type Stop = Result<(), String>;
            fn io_out(&mut self, port: u16, _data: &[u8]) -> Handled<Self::Stop> {
                match port {
                    PORT_RAISE => {
                        if let Err(e) = self.irq.write(1) {
                            return Handled::Stop(Err(format!("irqfd: {e}")));
                        }
                        let until = Instant::now() + Duration::from_secs(5);
                        while self.vm.pic_waiting().map_or(0, |w| w) & (1 << COM1_GSI) == 0 {
                            if Instant::now() > until {
                                return Handled::Stop(Err("IRQ4 never reached the PIC".into()));
                            }
                            std::thread::sleep(Duration::from_millis(1));
                        }
                        Handled::Continue
                    }
                    PORT_DELIVERED => Handled::Stop(Ok(())),
                    p => Handled::Unhandled(format!("out to port {p:#x}")),
                }
            }
            fn kicked(&mut self, _vcpu: &Vcpu) -> Handled<Self::Stop> {
                Handled::Continue
            }
        }

        /// A VM and vCPU with the guest loaded, and the irqfd on IRQ4.
        fn machine(kvm: &kvm_ioctls::Kvm) -> (Vm, Vcpu, EventFd) {
            let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 2 << 20)]).unwrap();
            let mut vm = Vm::new(kvm).unwrap();
            vm.create_irqchip().unwrap();
            vm.add_memslot(0, 0, Arc::new(GuestMemorySlot(mem.clone())))
                .unwrap();
            let irq = EventFd::new(EFD_NONBLOCK).unwrap();
            vm.register_irqfd(&irq, COM1_GSI).unwrap();
            let vcpu = vm.create_vcpu(0).unwrap();
            // Long mode at CPL0 with the Linux boot tables, plus a 2 MiB
            // page over the LAPIC's MMIO (PDPT[3] -> PD, PD[0x1f7]).
            vcpu.setup_linux_boot(&mem, CODE).unwrap();
            mem.write_obj(LAPIC_PD | P | RW, GuestAddress(PDPT_ADDR + 3 * 8))
                .unwrap();
            let lapic_pde: u64 = 0xfee0_0000 | P | RW | PS | 0x10; // PCD
            mem.write_obj(lapic_pde, GuestAddress(LAPIC_PD + 0x1f7 * 8))
                .unwrap();
            mem.write_slice(GUEST, GuestAddress(CODE)).unwrap();
            mem.write_slice(HANDLER, GuestAddress(CODE + 0x100))
                .unwrap();
            // The IRQ4 vector's 64-bit interrupt gate, and the IDTR.
            let cs = vcpu.sregs().unwrap().cs.selector;
            let handler = CODE + 0x100;
            let mut gate = [0u8; 16];
            gate[0..2].copy_from_slice(&handler.to_le_bytes()[0..2]);
            gate[2..4].copy_from_slice(&cs.to_le_bytes());
            gate[5] = 0x8e; // present, DPL 0, interrupt gate
            gate[6..8].copy_from_slice(&handler.to_le_bytes()[2..4]);
            gate[8..12].copy_from_slice(&handler.to_le_bytes()[4..8]);
            let vector = u64::from(VECTOR_BASE) + u64::from(COM1_GSI);
            mem.write_slice(&gate, GuestAddress(IDT + 16 * vector))
                .unwrap();
            mem.write_obj(0x0fffu16, GuestAddress(IDTR)).unwrap();
            mem.write_obj(IDT, GuestAddress(IDTR + 2)).unwrap();
            (vm, vcpu, irq)
        }

        #[test]
        fn pic_interrupt_raised_while_the_lapic_is_disabled_is_delivered() {
            let Ok(kvm) = kvm::open(Path::new("/dev/kvm")) else {
                eprintln!("skipped: no usable /dev/kvm");
                return;
            };
            // KVM alone (the VMM before this guard), for the record: on
            // the emulated SVM host's 6.1/6.12 KVM the interrupt is lost.
            let (vm, mut vcpu, irq) = machine(&kvm);
            let ctl = RunControl::timeout(Duration::from_secs(3));
            let alone = vcpu.run(&mut Probe { vm: &vm, irq: &irq }, &ctl);
            let alone_delivered = matches!(alone, Ok(Ok(())));
            if let Ok(Err(e)) = &alone {
                panic!("{e}");
            }
            assert!(
                alone_delivered || matches!(alone, Err(VcpuError::TimedOut { .. })),
                "{alone:?}"
            );
            eprintln!("KVM alone delivered the interrupt: {alone_delivered}");
            drop((vcpu, vm, irq));

            // With the guard: the PIC sampled as the boot's main loop does,
            // the vCPU told to re-evaluate.
            let (vm, mut vcpu, irq) = machine(&kvm);
            // The re-evaluation itself works on this host (it need not
            // be lost here for the guard to fire)...
            vcpu.reevaluate_interrupts().unwrap();
            // ... and one is requested before the first entry, so the run
            // loop's path is taken on every host.
            let flag = Arc::new(AtomicBool::new(true));
            let ctl = RunControl {
                reevaluate_irqs: Some(flag.clone()),
                ..RunControl::timeout(Duration::from_secs(30))
            };
            let mut watch = StuckIrqWatch::new(Duration::from_millis(100));
            let done = AtomicBool::new(false);
            let guarded = std::thread::scope(|s| {
                let run = s.spawn(|| {
                    let r = vcpu.run(&mut Probe { vm: &vm, irq: &irq }, &ctl);
                    done.store(true, Ordering::Release);
                    r
                });
                while !done.load(Ordering::Acquire) {
                    if let Ok(lines) = vm.pic_waiting() {
                        if watch.observe(lines, Instant::now()) {
                            flag.store(true, Ordering::Release);
                        }
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                run.join().unwrap()
            });
            assert!(matches!(guarded, Ok(Ok(()))), "{guarded:?}");
            if !alone_delivered {
                assert!(watch.fired >= 1);
            }
        }
    }
}
