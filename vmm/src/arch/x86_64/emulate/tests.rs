//! The emulator against a mock vCPU in 64-bit mode on identity page tables.

use super::*;
use std::cell::RefCell;
use vm_memory::{Bytes, GuestAddress};

/// A vCPU in 64-bit mode (CR0.PG, CR4.PAE, EFER.LMA) at CPL 0 on identity
/// page tables of the first 2 MiB (PML4 0x1000 -> PDPT 0x2000 -> PD
/// 0x3000, one 2 MiB page).
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

const CODE: u64 = 0x10_0000;

fn setup(code: &[u8]) -> (MockCpu, GuestMemoryMmap) {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
    mem.write_obj(0x2003u64, GuestAddress(0x1000)).unwrap();
    mem.write_obj(0x3003u64, GuestAddress(0x2000)).unwrap();
    mem.write_obj(0x83u64, GuestAddress(0x3000)).unwrap();
    mem.write_slice(code, GuestAddress(CODE)).unwrap();
    let sregs = kvm_sregs {
        cr0: super::super::regs::CR0_PE | super::super::regs::CR0_PG,
        cr3: 0x1000,
        cr4: super::super::regs::CR4_PAE,
        efer: super::super::regs::EFER_LME | super::super::regs::EFER_LMA,
        cs: kvm_bindings::kvm_segment {
            l: 1,
            ..Default::default()
        },
        ..Default::default()
    };
    let cpu = MockCpu {
        regs: RefCell::new(kvm_regs {
            rip: CODE,
            ..Default::default()
        }),
        sregs,
        fpu: RefCell::new(kvm_fpu::default()),
        injected: RefCell::new(Vec::new()),
    };
    (cpu, mem)
}

#[test]
fn int3_steps_and_injects_bp() {
    let (cpu, mem) = setup(&[0xcc]);
    let mut n = AssistCounts::default();
    let a = emulation_failure(&cpu, &mem, &mut n).unwrap();
    assert_eq!(a.mnemonic, "int3");
    assert_eq!(cpu.regs.borrow().rip, CODE + 1);
    assert_eq!(*cpu.injected.borrow(), vec![VECTOR_BP]);
    assert_eq!(n.0["int3"], 1);
}

/// `popcnt rax, [rbx]` counts the bits of the memory source (operand
/// 1), not of whatever sits at the address of operand 0.
#[test]
fn popcnt_reads_its_memory_source() {
    // f3 48 0f b8 03: popcnt rax, qword ptr [rbx]
    let (cpu, mem) = setup(&[0xf3, 0x48, 0x0f, 0xb8, 0x03]);
    mem.write_obj(0xffu64, GuestAddress(0x8000)).unwrap();
    mem.write_obj(0x1u64, GuestAddress(0)).unwrap();
    cpu.regs.borrow_mut().rbx = 0x8000;
    emulation_failure(&cpu, &mem, &mut AssistCounts::default()).unwrap();
    let r = *cpu.regs.borrow();
    assert_eq!(r.rax, 8);
    assert_eq!(r.rip, CODE + 5);
    assert_eq!(r.rflags & RFLAGS_ZF, 0);
}

#[test]
fn rip_wraps_instead_of_overflowing() {
    let (cpu, mem) = setup(&[0x90]);
    let d = fetch(&cpu, &mem).unwrap();
    let regs = kvm_regs {
        rip: u64::MAX,
        ..d.regs
    };
    complete(&cpu, &d, regs).unwrap();
    assert_eq!(cpu.regs.borrow().rip, 0);
}

#[test]
fn stores_are_decoded_with_their_target() {
    // 48 89 0a: mov [rdx], rcx
    let (cpu, mem) = setup(&[0x48, 0x89, 0x0a]);
    {
        let mut r = cpu.regs.borrow_mut();
        r.rdx = 0x9008;
        r.rcx = 0xdead_beef;
    }
    let d = fetch(&cpu, &mem).unwrap();
    assert_eq!(
        d.store(&mem),
        Some(Store {
            gpa: 0x9008,
            value: 0xdead_beef,
            len: 8
        })
    );
    // Not a store: none.
    let (cpu, mem) = setup(&[0x90]);
    assert_eq!(fetch(&cpu, &mem).unwrap().store(&mem), None);
}

#[test]
fn unknown_and_undecodable_are_typed_errors() {
    let (cpu, mem) = setup(&[0x0f, 0xa2]); // cpuid
    let e = emulation_failure(&cpu, &mem, &mut AssistCounts::default()).unwrap_err();
    assert!(matches!(e, EmulateError::Unhandled { .. }), "{e}");
    let (cpu, mem) = setup(&[0xd6]); // salc: invalid in 64-bit mode
    let e = emulation_failure(&cpu, &mem, &mut AssistCounts::default()).unwrap_err();
    assert!(matches!(e, EmulateError::Undecodable { .. }), "{e}");
    // RIP outside what the page tables map.
    let (cpu, mem) = setup(&[0x90]);
    cpu.regs.borrow_mut().rip = 0x4000_0000;
    let e = emulation_failure(&cpu, &mem, &mut AssistCounts::default()).unwrap_err();
    assert!(matches!(e, EmulateError::Guest { .. }), "{e}");
}

#[test]
fn fxsave_roundtrip() {
    let mut f = kvm_fpu {
        fcw: 0x37f,
        fsw: 0x1234,
        ftwx: 0x5a,
        last_opcode: 7,
        last_ip: 0xffff_ffff_8100_0000,
        last_dp: 0x42,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    f.xmm[15] = [9; 16];
    f.fpr[7] = [3; 16];
    let img = fxsave_image(&f, true);
    assert_eq!(&img[24..28], &0x1f80u32.to_le_bytes());
    let mut g = kvm_fpu::default();
    fxrstor_image(&mut g, &img, true);
    assert_eq!(
        (g.fcw, g.fsw, g.ftwx, g.last_ip, g.mxcsr),
        (f.fcw, f.fsw, f.ftwx, f.last_ip, f.mxcsr)
    );
    assert_eq!(g.xmm[15], [9; 16]);
    assert_eq!(g.fpr[7], [3; 16]);
}

#[test]
fn register_widths() {
    let mut r = kvm_regs {
        rax: 0xffff_ffff_ffff_ffff,
        ..Default::default()
    };
    write_reg(&mut r, Register::EAX, 5).unwrap();
    assert_eq!(r.rax, 5);
    r.rbx = 0xaaaa_bbbb_cccc_dddd;
    write_reg(&mut r, Register::BX, 1).unwrap();
    assert_eq!(r.rbx, 0xaaaa_bbbb_cccc_0001);
    assert_eq!(read_reg(&r, Register::EBX), Some(0xcccc_0001));
    assert_eq!(read_reg(&r, Register::AH), None);
}

/// The fetch follows the vCPU's CPL and paging mode: at CPL 3 the
/// supervisor-only identity tables refuse it; with CR0.PG clear the same
/// bytes are fetched at gpa = gva, whatever CR3 says.
#[test]
fn fetch_follows_cpl_and_paging_mode() {
    let (mut cpu, mem) = setup(&[0x90]);
    cpu.sregs.ss.dpl = 3;
    let e = emulation_failure(&cpu, &mem, &mut AssistCounts::default()).unwrap_err();
    assert!(
        matches!(
            e,
            EmulateError::Guest {
                source: GvaError::Walk {
                    source: mmu::guest_walk::WalkError::Protection { .. },
                    ..
                },
                ..
            }
        ),
        "{e}"
    );
    let (mut cpu, mem) = setup(&[0x90]);
    cpu.sregs.cr0 = super::super::regs::CR0_PE;
    cpu.sregs.cr3 = 0xdead_0000;
    cpu.sregs.cs.l = 0;
    cpu.sregs.cs.db = 1;
    let a = emulation_failure(&cpu, &mem, &mut AssistCounts::default()).unwrap();
    assert_eq!(
        (a.mnemonic.as_str(), cpu.regs.borrow().rip),
        ("nop", CODE + 1)
    );
}
