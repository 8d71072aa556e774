//! Emulation-failure assist: when the host's instruction emulator gives up
//! (KVM_EXIT_INTERNAL_ERROR, suberror 1), decode the instruction at RIP
//! (fetched through the guest page tables, bounds-checked) and carry it out
//! for the guest, or stop with a register dump.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use iced_x86::{
    Decoder, DecoderOptions, Formatter, Instruction, Mnemonic, NasmFormatter, OpKind, Register,
};
use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::GuestMemoryMmap;

use crate::gva::{self, GvaError};

/// KVM_INTERNAL_ERROR_EMULATION.
pub const SUBERROR_EMULATION: u32 = 1;
const RFLAGS_AC: u64 = 1 << 18;
const RFLAGS_ZF: u64 = 1 << 6;
const RFLAGS_ARITH: u64 = 0x8d5; // CF PF AF ZF SF OF

/// Assist errors.
#[derive(Debug, thiserror::Error)]
pub enum AssistError {
    /// A vCPU ioctl failed.
    #[error("{what}: {source}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Guest memory could not be accessed.
    #[error("guest memory access at rip {rip:#x}: {source}")]
    Guest {
        rip: u64,
        #[source]
        source: GvaError,
    },
    /// The bytes at RIP do not decode.
    #[error("undecodable instruction at rip {rip:#x}: bytes {bytes}")]
    Undecodable { rip: u64, bytes: String },
    /// An instruction this assist does not handle.
    #[error("unhandled emulation failure at rip {rip:#x}: {text} (bytes {bytes})\n{dump}")]
    Unhandled {
        rip: u64,
        text: String,
        bytes: String,
        dump: String,
    },
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> AssistError {
    move |source| AssistError::Kvm { what, source }
}

/// Count of assisted instructions per mnemonic.
#[derive(Debug, Default, Clone)]
pub struct AssistCounts(pub BTreeMap<String, u64>);

impl AssistCounts {
    fn add(&mut self, m: &str) {
        *self.0.entry(m.to_string()).or_default() += 1;
    }
}

fn hex(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The 64-bit value of a full GPR.
pub fn gpr64(regs: &kvm_regs, r: Register) -> Option<u64> {
    Some(match r {
        Register::RAX => regs.rax,
        Register::RBX => regs.rbx,
        Register::RCX => regs.rcx,
        Register::RDX => regs.rdx,
        Register::RSI => regs.rsi,
        Register::RDI => regs.rdi,
        Register::RSP => regs.rsp,
        Register::RBP => regs.rbp,
        Register::R8 => regs.r8,
        Register::R9 => regs.r9,
        Register::R10 => regs.r10,
        Register::R11 => regs.r11,
        Register::R12 => regs.r12,
        Register::R13 => regs.r13,
        Register::R14 => regs.r14,
        Register::R15 => regs.r15,
        Register::RIP => regs.rip,
        _ => return None,
    })
}

fn gpr64_mut(regs: &mut kvm_regs, r: Register) -> Option<&mut u64> {
    Some(match r {
        Register::RAX => &mut regs.rax,
        Register::RBX => &mut regs.rbx,
        Register::RCX => &mut regs.rcx,
        Register::RDX => &mut regs.rdx,
        Register::RSI => &mut regs.rsi,
        Register::RDI => &mut regs.rdi,
        Register::RSP => &mut regs.rsp,
        Register::RBP => &mut regs.rbp,
        Register::R8 => &mut regs.r8,
        Register::R9 => &mut regs.r9,
        Register::R10 => &mut regs.r10,
        Register::R11 => &mut regs.r11,
        Register::R12 => &mut regs.r12,
        Register::R13 => &mut regs.r13,
        Register::R14 => &mut regs.r14,
        Register::R15 => &mut regs.r15,
        _ => return None,
    })
}

/// Read a GPR of any width (8-bit high registers are not used by the
/// instructions handled here and read as None).
fn read_reg(regs: &kvm_regs, r: Register) -> Option<u64> {
    if r.is_gpr8() && matches!(r, Register::AH | Register::BH | Register::CH | Register::DH) {
        return None;
    }
    let full = gpr64(regs, r.full_register())?;
    Some(match r.size() {
        8 => full,
        4 => full & 0xffff_ffff,
        2 => full & 0xffff,
        1 => full & 0xff,
        _ => return None,
    })
}

/// Write a GPR with x86 semantics (32-bit writes zero-extend).
fn write_reg(regs: &mut kvm_regs, r: Register, v: u64) -> Option<()> {
    let size = r.size();
    let slot = gpr64_mut(regs, r.full_register())?;
    *slot = match size {
        8 => v,
        4 => v & 0xffff_ffff,
        2 => (*slot & !0xffff) | (v & 0xffff),
        _ => return None,
    };
    Some(())
}

/// A register dump for the stop message.
pub fn dump(regs: &kvm_regs, sregs: &kvm_sregs) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "rip {:#018x} rsp {:#018x} rflags {:#x}\nrax {:#018x} rbx {:#018x} rcx {:#018x} rdx {:#018x}\nrsi {:#018x} rdi {:#018x} rbp {:#018x}\nr8  {:#018x} r9  {:#018x} r10 {:#018x} r11 {:#018x}\nr12 {:#018x} r13 {:#018x} r14 {:#018x} r15 {:#018x}",
        regs.rip, regs.rsp, regs.rflags, regs.rax, regs.rbx, regs.rcx, regs.rdx, regs.rsi,
        regs.rdi, regs.rbp, regs.r8, regs.r9, regs.r10, regs.r11, regs.r12, regs.r13, regs.r14,
        regs.r15
    );
    let _ = write!(
        s,
        "cs {:#x} (dpl {}) cr0 {:#x} cr2 {:#x} cr3 {:#x} cr4 {:#x} efer {:#x} fs.base {:#x} gs.base {:#x}",
        sregs.cs.selector, sregs.cs.dpl, sregs.cr0, sregs.cr2, sregs.cr3, sregs.cr4, sregs.efer,
        sregs.fs.base, sregs.gs.base
    );
    s
}

/// The 512-byte FXSAVE image of `fpu` (64-bit layout if `rex_w`).
pub fn fxsave_image(fpu: &kvm_fpu, rex_w: bool) -> [u8; 512] {
    let mut b = [0u8; 512];
    b[0..2].copy_from_slice(&fpu.fcw.to_le_bytes());
    b[2..4].copy_from_slice(&fpu.fsw.to_le_bytes());
    b[4] = fpu.ftwx;
    b[6..8].copy_from_slice(&fpu.last_opcode.to_le_bytes());
    if rex_w {
        b[8..16].copy_from_slice(&fpu.last_ip.to_le_bytes());
        b[16..24].copy_from_slice(&fpu.last_dp.to_le_bytes());
    } else {
        b[8..12].copy_from_slice(&(fpu.last_ip as u32).to_le_bytes());
        b[16..20].copy_from_slice(&(fpu.last_dp as u32).to_le_bytes());
    }
    b[24..28].copy_from_slice(&fpu.mxcsr.to_le_bytes());
    b[28..32].copy_from_slice(&0xffffu32.to_le_bytes());
    for i in 0..8 {
        b[32 + i * 16..48 + i * 16].copy_from_slice(&fpu.fpr[i]);
    }
    for i in 0..16 {
        b[160 + i * 16..176 + i * 16].copy_from_slice(&fpu.xmm[i]);
    }
    b
}

/// Load an FXSAVE image into `fpu`.
pub fn fxrstor_image(fpu: &mut kvm_fpu, b: &[u8; 512], rex_w: bool) {
    let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
    let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
    let u64_at = |o: usize| u64::from(u32_at(o)) | (u64::from(u32_at(o + 4)) << 32);
    fpu.fcw = u16_at(0);
    fpu.fsw = u16_at(2);
    fpu.ftwx = b[4];
    fpu.last_opcode = u16_at(6);
    if rex_w {
        fpu.last_ip = u64_at(8);
        fpu.last_dp = u64_at(16);
    } else {
        fpu.last_ip = u64::from(u32_at(8));
        fpu.last_dp = u64::from(u32_at(16));
    }
    fpu.mxcsr = u32_at(24) & 0xffff;
    for i in 0..8 {
        fpu.fpr[i].copy_from_slice(&b[32 + i * 16..48 + i * 16]);
    }
    for i in 0..16 {
        fpu.xmm[i].copy_from_slice(&b[160 + i * 16..176 + i * 16]);
    }
}

/// What the assist did.
#[derive(Debug, Clone)]
pub struct Assisted {
    /// Lower-case mnemonic.
    pub mnemonic: String,
    /// Where.
    pub rip: u64,
}

/// Carry out the instruction at RIP that the host's emulator failed on.
pub fn handle_emulation_failure(
    vcpu: &VcpuFd,
    mem: &GuestMemoryMmap,
    counts: &mut AssistCounts,
) -> Result<Assisted, AssistError> {
    let mut regs = vcpu.get_regs().map_err(kvm("KVM_GET_REGS"))?;
    let sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    let rip = regs.rip;
    let fetch = sregs.cs.base.wrapping_add(rip);
    let mut bytes = [0u8; 15];
    let got = gva::read_prefix(vcpu, mem, fetch, &mut bytes)
        .map_err(|source| AssistError::Guest { rip, source })?;
    let bytes = &bytes[..got];
    let bitness = if sregs.cs.l == 1 {
        64
    } else if sregs.cs.db == 1 {
        32
    } else {
        16
    };
    let mut decoder = Decoder::with_ip(bitness, bytes, rip, DecoderOptions::NONE);
    let insn = decoder.decode();
    if insn.is_invalid() {
        return Err(AssistError::Undecodable {
            rip,
            bytes: hex(bytes),
        });
    }
    let len = insn.len() as u64;
    let insn_bytes = &bytes[..insn.len().min(bytes.len())];
    let regs0 = regs;
    let unhandled = |why: &str| {
        let mut text = String::new();
        NasmFormatter::new().format(&insn, &mut text);
        if !why.is_empty() {
            text.push_str(&format!(" [{why}]"));
        }
        AssistError::Unhandled {
            rip,
            text,
            bytes: hex(insn_bytes),
            dump: dump(&regs0, &sregs),
        }
    };
    let ea = |insn: &Instruction| -> Option<u64> {
        insn.virtual_address(0, 0, |r, _, _| match r {
            Register::FS => Some(sregs.fs.base),
            Register::GS => Some(sregs.gs.base),
            Register::ES | Register::CS | Register::SS | Register::DS => Some(0),
            r => read_reg(&regs0, r),
        })
    };
    let guest = |source| AssistError::Guest { rip, source };

    match insn.mnemonic() {
        Mnemonic::Int3 => {
            regs.rip += len;
            vcpu.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))?;
            let mut ev = vcpu.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?;
            ev.exception.injected = 1;
            ev.exception.nr = 3;
            ev.exception.has_error_code = 0;
            ev.exception.error_code = 0;
            vcpu.set_vcpu_events(&ev)
                .map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
        }
        Mnemonic::Wait | Mnemonic::Nop | Mnemonic::Emms => {
            regs.rip += len;
            vcpu.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))?;
        }
        Mnemonic::Clac | Mnemonic::Stac => {
            if insn.mnemonic() == Mnemonic::Clac {
                regs.rflags &= !RFLAGS_AC;
            } else {
                regs.rflags |= RFLAGS_AC;
            }
            regs.rip += len;
            vcpu.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))?;
        }
        Mnemonic::Popcnt => {
            let dst = insn.op0_register();
            let src = match insn.op1_kind() {
                OpKind::Register => read_reg(&regs, insn.op1_register())
                    .ok_or_else(|| unhandled("source register"))?,
                OpKind::Memory => {
                    let a = ea(&insn).ok_or_else(|| unhandled("address"))?;
                    let n = dst.size();
                    let mut b = [0u8; 8];
                    gva::read(vcpu, mem, a, &mut b[..n]).map_err(guest)?;
                    u64::from_le_bytes(b)
                }
                _ => return Err(unhandled("operand")),
            };
            write_reg(&mut regs, dst, u64::from(src.count_ones()))
                .ok_or_else(|| unhandled("dest register"))?;
            regs.rflags &= !RFLAGS_ARITH;
            if src == 0 {
                regs.rflags |= RFLAGS_ZF;
            }
            regs.rip += len;
            vcpu.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))?;
        }
        m @ (Mnemonic::Fninit | Mnemonic::Fnclex) => {
            let mut fpu = vcpu.get_fpu().map_err(kvm("KVM_GET_FPU"))?;
            if m == Mnemonic::Fninit {
                fpu.fcw = 0x37f;
                fpu.fsw = 0;
                fpu.ftwx = 0;
                fpu.last_opcode = 0;
                fpu.last_ip = 0;
                fpu.last_dp = 0;
            } else {
                fpu.fsw &= !0x80ff;
            }
            vcpu.set_fpu(&fpu).map_err(kvm("KVM_SET_FPU"))?;
            regs.rip += len;
            vcpu.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))?;
        }
        m @ (Mnemonic::Ldmxcsr
        | Mnemonic::Stmxcsr
        | Mnemonic::Fxsave
        | Mnemonic::Fxsave64
        | Mnemonic::Fxrstor
        | Mnemonic::Fxrstor64
        | Mnemonic::Fnstcw
        | Mnemonic::Fldcw
        | Mnemonic::Fnstsw) => {
            let mut fpu = vcpu.get_fpu().map_err(kvm("KVM_GET_FPU"))?;
            if m == Mnemonic::Fnstsw && insn.op0_kind() == OpKind::Register {
                write_reg(&mut regs, Register::AX, u64::from(fpu.fsw))
                    .ok_or_else(|| unhandled("ax"))?;
            } else {
                if insn.op0_kind() != OpKind::Memory {
                    return Err(unhandled("operand"));
                }
                let a = ea(&insn).ok_or_else(|| unhandled("address"))?;
                let w64 = matches!(m, Mnemonic::Fxsave64 | Mnemonic::Fxrstor64);
                match m {
                    Mnemonic::Ldmxcsr => {
                        let mut b = [0u8; 4];
                        gva::read(vcpu, mem, a, &mut b).map_err(guest)?;
                        fpu.mxcsr = u32::from_le_bytes(b) & 0xffff;
                    }
                    Mnemonic::Stmxcsr => {
                        gva::write(vcpu, mem, a, &fpu.mxcsr.to_le_bytes()).map_err(guest)?
                    }
                    Mnemonic::Fnstcw => {
                        gva::write(vcpu, mem, a, &fpu.fcw.to_le_bytes()).map_err(guest)?
                    }
                    Mnemonic::Fnstsw => {
                        gva::write(vcpu, mem, a, &fpu.fsw.to_le_bytes()).map_err(guest)?
                    }
                    Mnemonic::Fldcw => {
                        let mut b = [0u8; 2];
                        gva::read(vcpu, mem, a, &mut b).map_err(guest)?;
                        fpu.fcw = u16::from_le_bytes(b);
                    }
                    Mnemonic::Fxsave | Mnemonic::Fxsave64 => {
                        gva::write(vcpu, mem, a, &fxsave_image(&fpu, w64)).map_err(guest)?
                    }
                    _ => {
                        let mut b = [0u8; 512];
                        gva::read(vcpu, mem, a, &mut b).map_err(guest)?;
                        fxrstor_image(&mut fpu, &b, w64);
                    }
                }
                if matches!(
                    m,
                    Mnemonic::Ldmxcsr | Mnemonic::Fldcw | Mnemonic::Fxrstor | Mnemonic::Fxrstor64
                ) {
                    vcpu.set_fpu(&fpu).map_err(kvm("KVM_SET_FPU"))?;
                }
            }
            regs.rip += len;
            vcpu.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))?;
        }
        _ => return Err(unhandled("")),
    }
    let mnemonic = format!("{:?}", insn.mnemonic()).to_lowercase();
    counts.add(&mnemonic);
    Ok(Assisted { mnemonic, rip })
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
