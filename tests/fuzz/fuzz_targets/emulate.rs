//! The emulation assist (`vmm::arch::x86_64::emulate`) against a mock vCPU
//! whose registers, control registers and guest memory (page tables and
//! code) come from the fuzzer. Never panics; a failure leaves the vCPU as
//! it was; a success steps RIP over exactly the decoded instruction,
//! changes no register it should not, and popcnt's result and flags match
//! its operand.
#![no_main]

use std::cell::RefCell;

use iced_x86::{Mnemonic, OpKind, Register};
use kvm_bindings::{kvm_fpu, kvm_regs, kvm_segment, kvm_sregs};
use libfuzzer_sys::fuzz_target;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::arch::x86_64::emulate::{
    emulation_failure, fetch, gpr64, AssistCounts, CpuState, CpuStateError,
};

/// Guest RAM: 1 MiB, the fuzzer's image at gpa 0.
const RAM: usize = 1 << 20;
const HEADER: usize = 8 + 8 * 8 + 8 + 4 * 8 + 1 + 8;

struct MockCpu {
    regs: RefCell<kvm_regs>,
    sregs: kvm_sregs,
    fpu: RefCell<kvm_fpu>,
    injected: RefCell<Vec<u8>>,
}

impl CpuState for MockCpu {
    fn regs(&self) -> Result<kvm_regs, CpuStateError> {
        Ok(*self.regs.borrow())
    }
    fn set_regs(&self, r: &kvm_regs) -> Result<(), CpuStateError> {
        *self.regs.borrow_mut() = *r;
        Ok(())
    }
    fn sregs(&self) -> Result<kvm_sregs, CpuStateError> {
        Ok(self.sregs)
    }
    fn fpu(&self) -> Result<kvm_fpu, CpuStateError> {
        Ok(*self.fpu.borrow())
    }
    fn set_fpu(&self, f: &kvm_fpu) -> Result<(), CpuStateError> {
        *self.fpu.borrow_mut() = *f;
        Ok(())
    }
    fn inject_exception(&self, v: u8) -> Result<(), CpuStateError> {
        self.injected.borrow_mut().push(v);
        Ok(())
    }
}

const GPRS: [Register; 16] = [
    Register::RAX,
    Register::RBX,
    Register::RCX,
    Register::RDX,
    Register::RSI,
    Register::RDI,
    Register::RSP,
    Register::RBP,
    Register::R8,
    Register::R9,
    Register::R10,
    Register::R11,
    Register::R12,
    Register::R13,
    Register::R14,
    Register::R15,
];

fn fpu_key(f: &kvm_fpu) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&f.fcw.to_le_bytes());
    v.extend_from_slice(&f.fsw.to_le_bytes());
    v.push(f.ftwx);
    v.extend_from_slice(&f.mxcsr.to_le_bytes());
    v.extend_from_slice(&f.last_ip.to_le_bytes());
    for r in &f.fpr {
        v.extend_from_slice(r);
    }
    for x in &f.xmm {
        v.extend_from_slice(x);
    }
    v
}

fuzz_target!(|data: &[u8]| {
    if data.len() < HEADER {
        return;
    }
    let mut at = 0;
    let mut u64_at = || {
        let mut a = [0u8; 8];
        a.copy_from_slice(&data[at..at + 8]);
        at += 8;
        u64::from_le_bytes(a)
    };
    let rip = u64_at();
    let g: Vec<u64> = (0..8).map(|_| u64_at()).collect();
    let rflags = u64_at() | 2;
    let (cr0, cr3, cr4, efer) = (u64_at(), u64_at(), u64_at(), u64_at());
    let fpu_bits = u64_at();
    let seg = data[HEADER - 1];
    let regs = kvm_regs {
        rip,
        rax: g[0],
        rbx: g[1],
        rcx: g[2],
        rdx: g[3],
        rsi: g[4],
        rdi: g[5],
        rbp: g[6],
        r8: g[7],
        rsp: g[0].rotate_left(17),
        rflags,
        ..Default::default()
    };
    let cs = kvm_segment {
        l: seg & 1,
        db: (seg >> 1) & 1,
        dpl: (seg >> 2) & 3,
        present: 1,
        s: 1,
        type_: 11,
        selector: u16::from(seg >> 2 & 3),
        ..Default::default()
    };
    let ss = kvm_segment {
        dpl: (seg >> 2) & 3,
        selector: u16::from(seg >> 2 & 3),
        ..Default::default()
    };
    let sregs = kvm_sregs {
        cr0,
        cr3,
        cr4,
        efer,
        cs,
        ss,
        ..Default::default()
    };
    let [m0, m1, m2, m3, c0, c1, s0, s1] = fpu_bits.to_le_bytes();
    let fpu = kvm_fpu {
        mxcsr: u32::from_le_bytes([m0, m1, m2, m3]),
        fcw: u16::from_le_bytes([c0, c1]),
        fsw: u16::from_le_bytes([s0, s1]),
        ..Default::default()
    };
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), RAM)]).unwrap();
    let image = &data[HEADER..];
    mem.write_slice(&image[..image.len().min(RAM)], GuestAddress(0))
        .unwrap();
    let cpu = MockCpu {
        regs: RefCell::new(regs),
        sregs,
        fpu: RefCell::new(fpu),
        injected: RefCell::new(Vec::new()),
    };

    // What the assist will decode, fetched the same way; a store's shape.
    let decoded = fetch(&cpu, &mem);
    if let Ok(d) = &decoded {
        if let Some(s) = d.store(&mem) {
            assert!(matches!(s.len, 1 | 2 | 4 | 8));
        }
    }
    let mut counts = AssistCounts::default();
    let r = emulation_failure(&cpu, &mem, &mut counts);
    let after = *cpu.regs.borrow();
    let fpu_after = *cpu.fpu.borrow();
    let injected = cpu.injected.borrow().clone();
    let a = match r {
        Err(_) => {
            // Nothing was done to the vCPU.
            assert_eq!(fpu_key(&fpu_after), fpu_key(&fpu));
            assert!(injected.is_empty());
            assert_eq!(after.rip, regs.rip);
            for r in GPRS {
                assert_eq!(gpr64(&after, r), gpr64(&regs, r));
            }
            assert_eq!(after.rflags, regs.rflags);
            return;
        }
        Ok(a) => a,
    };
    let d = decoded.expect("the assist succeeded where fetch failed");
    let insn = d.insn;
    assert_eq!(a.rip, rip);
    assert_eq!(a.mnemonic, format!("{:?}", insn.mnemonic()).to_lowercase());
    assert_eq!(counts.0.get(&a.mnemonic), Some(&1));
    assert_eq!(after.rip, rip.wrapping_add(insn.len() as u64));
    assert_eq!(
        injected,
        if insn.mnemonic() == Mnemonic::Int3 {
            vec![3]
        } else {
            vec![]
        }
    );
    let written = match insn.mnemonic() {
        Mnemonic::Popcnt => Some(insn.op0_register().full_register()),
        Mnemonic::Fnstsw if insn.op0_kind() == OpKind::Register => Some(Register::RAX),
        _ => None,
    };
    for r in GPRS {
        if Some(r) != written {
            assert_eq!(gpr64(&after, r), gpr64(&regs, r), "{r:?} changed");
        }
    }
    if insn.mnemonic() == Mnemonic::Popcnt {
        let dst = insn.op0_register();
        let width = u64::try_from(dst.size()).unwrap() * 8;
        let mask = if width == 64 {
            u64::MAX
        } else {
            (1 << width) - 1
        };
        let v = gpr64(&after, dst.full_register()).unwrap() & mask;
        assert!(v <= width);
        // ZF says the source was zero, i.e. the count is.
        assert_eq!(after.rflags & (1 << 6) != 0, v == 0);
        assert_eq!(after.rflags & 0x8d5 & !(1 << 6), 0);
        if insn.op1_kind() == OpKind::Register {
            let src = gpr64(&regs, insn.op1_register().full_register()).unwrap();
            assert_eq!(v, u64::from((src & mask).count_ones()));
        }
    }
});
