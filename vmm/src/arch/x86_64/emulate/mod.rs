//! The VMM's instruction emulator: decode the instruction at RIP (fetched
//! through the guest's page tables, [`super::gva`]) with iced-x86 and carry
//! it out on the vCPU's state ([`CpuState`]).
//!
//! Two callers, one decoder:
//! - [`emulation_failure`]: `KVM_EXIT_INTERNAL_ERROR` with suberror
//!   `KVM_INTERNAL_ERROR_EMULATION` - the host's own emulator gave up (on
//!   the PVM host: int3, fwait, fninit/fnclex, ldmxcsr/stmxcsr,
//!   fxsave/fxrstor, fnstcw/fldcw/fnstsw, clac/stac, popcnt: README,
//!   Booting Linux).
//!   Anything else stops with a register dump.
//! - [`fetch`] + [`Decoded::store`] + [`complete`]: a store the VMM trapped
//!   itself (a write to guest memory the host write-protected, `KVM_RUN`
//!   answering EFAULT), performed by the caller on its own mapping - what
//!   KVM's `x86_emulate_instruction()` does for a write to a
//!   write-protected guest page table.
//!
//! Guest memory and registers are untrusted: every access is bounds-checked
//! through the guest's page tables, address arithmetic wraps as the CPU's
//! does, and an instruction that is not understood is a typed error.

use std::collections::BTreeMap;

use iced_x86::{
    Decoder, DecoderOptions, Formatter, Instruction, Mnemonic, NasmFormatter, OpKind, Register,
};
use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use mmu::guest_walk::AccessKind;
use vm_memory::GuestMemoryMmap;

use super::gva::{self, GvaError};
use super::regs::dump;

/// `KVM_INTERNAL_ERROR_EMULATION`.
pub const SUBERROR_EMULATION: u32 = 1;
const RFLAGS_AC: u64 = 1 << 18;
const RFLAGS_ZF: u64 = 1 << 6;
/// CF PF AF ZF SF OF.
const RFLAGS_ARITH: u64 = 0x8d5;
/// `#BP`.
const VECTOR_BP: u8 = 3;

/// A vCPU ioctl that failed.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {source}")]
pub struct CpuStateError {
    pub what: &'static str,
    #[source]
    pub source: kvm_ioctls::Error,
}

/// The vCPU state the emulator reads and writes: `vstate::Vcpu`, or a
/// mock in tests.
pub trait CpuState {
    fn regs(&self) -> Result<kvm_regs, CpuStateError>;
    fn set_regs(&self, regs: &kvm_regs) -> Result<(), CpuStateError>;
    fn sregs(&self) -> Result<kvm_sregs, CpuStateError>;
    fn fpu(&self) -> Result<kvm_fpu, CpuStateError>;
    fn set_fpu(&self, fpu: &kvm_fpu) -> Result<(), CpuStateError>;
    /// Inject exception `vector` (no error code) before the next entry.
    fn inject_exception(&self, vector: u8) -> Result<(), CpuStateError>;
}

/// Emulation errors.
#[derive(Debug, thiserror::Error)]
pub enum EmulateError {
    #[error(transparent)]
    Cpu(#[from] CpuStateError),
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
    /// An instruction this emulator does not carry out.
    #[error("unhandled emulation failure at rip {rip:#x}: {text} (bytes {bytes})\n{dump}")]
    Unhandled {
        rip: u64,
        text: String,
        bytes: String,
        dump: String,
    },
}

/// Count of emulated instructions per mnemonic.
#[derive(Debug, Default, Clone)]
pub struct AssistCounts(pub BTreeMap<String, u64>);

impl AssistCounts {
    fn add(&mut self, m: &str) {
        *self.0.entry(m.to_string()).or_default() += 1;
    }
}

/// What [`emulation_failure`] did.
#[derive(Debug, Clone)]
pub struct Assisted {
    /// Lower-case mnemonic.
    pub mnemonic: String,
    pub rip: u64,
}

fn hex(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The 64-bit value of a full general-purpose register (or RIP).
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

/// A GPR of any width (the 8-bit high registers read as None: no
/// instruction handled here uses them).
fn read_reg(regs: &kvm_regs, r: Register) -> Option<u64> {
    if matches!(r, Register::AH | Register::BH | Register::CH | Register::DH) {
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
        // The 32-bit layout keeps the low halves.
        b[8..12].copy_from_slice(&fpu.last_ip.to_le_bytes()[..4]);
        b[16..20].copy_from_slice(&fpu.last_dp.to_le_bytes()[..4]);
    }
    b[24..28].copy_from_slice(&fpu.mxcsr.to_le_bytes());
    b[28..32].copy_from_slice(&0xffffu32.to_le_bytes());
    for (i, r) in fpu.fpr.iter().enumerate() {
        b[32 + i * 16..48 + i * 16].copy_from_slice(r);
    }
    for (i, x) in fpu.xmm.iter().enumerate() {
        b[160 + i * 16..176 + i * 16].copy_from_slice(x);
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
    for (i, r) in fpu.fpr.iter_mut().enumerate() {
        r.copy_from_slice(&b[32 + i * 16..48 + i * 16]);
    }
    for (i, x) in fpu.xmm.iter_mut().enumerate() {
        x.copy_from_slice(&b[160 + i * 16..176 + i * 16]);
    }
}

/// The instruction at RIP, decoded, with the state it was decoded in.
pub struct Decoded {
    pub insn: Instruction,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    /// The instruction's bytes (for messages).
    pub bytes: Vec<u8>,
    paging: gva::Paging,
}

impl Decoded {
    fn rip(&self) -> u64 {
        self.regs.rip
    }

    /// The effective address of memory operand `op` (segment bases: FS/GS
    /// from the vCPU, 0 for the others, as in 64-bit mode).
    fn address(&self, op: u32) -> Option<u64> {
        self.insn.virtual_address(op, 0, |r, _, _| match r {
            Register::FS => Some(self.sregs.fs.base),
            Register::GS => Some(self.sregs.gs.base),
            Register::ES | Register::CS | Register::SS | Register::DS => Some(0),
            r => read_reg(&self.regs, r),
        })
    }

    fn unhandled(&self, why: &str) -> EmulateError {
        let mut text = String::new();
        NasmFormatter::new().format(&self.insn, &mut text);
        if !why.is_empty() {
            text.push_str(&format!(" [{why}]"));
        }
        EmulateError::Unhandled {
            rip: self.rip(),
            text,
            bytes: hex(&self.bytes),
            dump: dump(&self.regs, &self.sregs),
        }
    }

    fn guest(&self) -> impl FnOnce(GvaError) -> EmulateError {
        let rip = self.rip();
        move |source| EmulateError::Guest { rip, source }
    }

    fn read(&self, mem: &GuestMemoryMmap, gva: u64, buf: &mut [u8]) -> Result<(), EmulateError> {
        gva::read(mem, &self.paging, gva, buf).map_err(self.guest())
    }

    fn write(&self, mem: &GuestMemoryMmap, gva: u64, buf: &[u8]) -> Result<(), EmulateError> {
        gva::write(mem, &self.paging, gva, buf).map_err(self.guest())
    }

    /// `mov m, r` (a store of a 1, 2, 4 or 8-byte register): where it
    /// stores (the gpa, translated for a write) and what. `None` for any
    /// other instruction or an address the guest's tables do not map for
    /// a write.
    pub fn store(&self, mem: &GuestMemoryMmap) -> Option<Store> {
        let insn = &self.insn;
        if insn.mnemonic() != Mnemonic::Mov
            || insn.op_count() != 2
            || insn.op0_kind() != OpKind::Memory
            || insn.op1_kind() != OpKind::Register
        {
            return None;
        }
        let src = insn.op1_register();
        let value = read_reg(&self.regs, src)?;
        let gva = self.address(0)?;
        let len = src.size();
        let gpa = gva::translate(mem, &self.paging, gva, AccessKind::WRITE).ok()?;
        Some(Store { gpa, value, len })
    }
}

/// A store [`Decoded::store`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Store {
    pub gpa: u64,
    pub value: u64,
    /// Bytes stored: 1, 2, 4 or 8.
    pub len: usize,
}

/// Fetch (through the guest's page tables) and decode the instruction at
/// RIP.
pub fn fetch(cpu: &dyn CpuState, mem: &GuestMemoryMmap) -> Result<Decoded, EmulateError> {
    let regs = cpu.regs()?;
    let sregs = cpu.sregs()?;
    let rip = regs.rip;
    let paging = gva::paging(&sregs);
    let mut buf = [0u8; 15];
    let got = gva::read_prefix(mem, &paging, sregs.cs.base.wrapping_add(rip), &mut buf)
        .map_err(|source| EmulateError::Guest { rip, source })?;
    let bytes = &buf[..got];
    let bitness = match (sregs.cs.l, sregs.cs.db) {
        (1, _) => 64,
        (_, 1) => 32,
        _ => 16,
    };
    let insn = Decoder::with_ip(bitness, bytes, rip, DecoderOptions::NONE).decode();
    if insn.is_invalid() {
        return Err(EmulateError::Undecodable {
            rip,
            bytes: hex(bytes),
        });
    }
    Ok(Decoded {
        bytes: bytes[..insn.len().min(bytes.len())].to_vec(),
        insn,
        regs,
        sregs,
        paging,
    })
}

/// Step over the decoded instruction with `regs` (its effects on the
/// registers already applied): RIP advances by its length, wrapping as the
/// CPU does.
pub fn complete(cpu: &dyn CpuState, d: &Decoded, mut regs: kvm_regs) -> Result<(), EmulateError> {
    regs.rip = regs.rip.wrapping_add(d.insn.len() as u64);
    Ok(cpu.set_regs(&regs)?)
}

/// Carry out the instruction at RIP that the host's emulator failed on.
pub fn emulation_failure(
    cpu: &dyn CpuState,
    mem: &GuestMemoryMmap,
    counts: &mut AssistCounts,
) -> Result<Assisted, EmulateError> {
    let d = fetch(cpu, mem)?;
    let insn = d.insn;
    let mut regs = d.regs;
    match insn.mnemonic() {
        Mnemonic::Int3 => {
            // Trap-like: #BP is delivered with RIP after the instruction.
            complete(cpu, &d, regs)?;
            cpu.inject_exception(VECTOR_BP)?;
        }
        Mnemonic::Wait | Mnemonic::Nop | Mnemonic::Emms => complete(cpu, &d, regs)?,
        Mnemonic::Clac | Mnemonic::Stac => {
            if insn.mnemonic() == Mnemonic::Clac {
                regs.rflags &= !RFLAGS_AC;
            } else {
                regs.rflags |= RFLAGS_AC;
            }
            complete(cpu, &d, regs)?;
        }
        Mnemonic::Popcnt => {
            let dst = insn.op0_register();
            let src = match insn.op1_kind() {
                OpKind::Register => read_reg(&regs, insn.op1_register())
                    .ok_or_else(|| d.unhandled("source register"))?,
                OpKind::Memory => {
                    // The source is operand 1.
                    let a = d.address(1).ok_or_else(|| d.unhandled("address"))?;
                    let mut b = [0u8; 8];
                    d.read(mem, a, &mut b[..dst.size().min(8)])?;
                    u64::from_le_bytes(b)
                }
                _ => return Err(d.unhandled("operand")),
            };
            write_reg(&mut regs, dst, u64::from(src.count_ones()))
                .ok_or_else(|| d.unhandled("dest register"))?;
            regs.rflags &= !RFLAGS_ARITH;
            if src == 0 {
                regs.rflags |= RFLAGS_ZF;
            }
            complete(cpu, &d, regs)?;
        }
        m @ (Mnemonic::Fninit | Mnemonic::Fnclex) => {
            let mut fpu = cpu.fpu()?;
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
            cpu.set_fpu(&fpu)?;
            complete(cpu, &d, regs)?;
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
            let mut fpu = cpu.fpu()?;
            if m == Mnemonic::Fnstsw && insn.op0_kind() == OpKind::Register {
                write_reg(&mut regs, Register::AX, u64::from(fpu.fsw))
                    .ok_or_else(|| d.unhandled("ax"))?;
            } else {
                if insn.op0_kind() != OpKind::Memory {
                    return Err(d.unhandled("operand"));
                }
                let a = d.address(0).ok_or_else(|| d.unhandled("address"))?;
                let w64 = matches!(m, Mnemonic::Fxsave64 | Mnemonic::Fxrstor64);
                match m {
                    Mnemonic::Ldmxcsr => {
                        let mut b = [0u8; 4];
                        d.read(mem, a, &mut b)?;
                        fpu.mxcsr = u32::from_le_bytes(b) & 0xffff;
                    }
                    Mnemonic::Stmxcsr => d.write(mem, a, &fpu.mxcsr.to_le_bytes())?,
                    Mnemonic::Fnstcw => d.write(mem, a, &fpu.fcw.to_le_bytes())?,
                    Mnemonic::Fnstsw => d.write(mem, a, &fpu.fsw.to_le_bytes())?,
                    Mnemonic::Fldcw => {
                        let mut b = [0u8; 2];
                        d.read(mem, a, &mut b)?;
                        fpu.fcw = u16::from_le_bytes(b);
                    }
                    Mnemonic::Fxsave | Mnemonic::Fxsave64 => {
                        d.write(mem, a, &fxsave_image(&fpu, w64))?
                    }
                    _ => {
                        let mut b = [0u8; 512];
                        d.read(mem, a, &mut b)?;
                        fxrstor_image(&mut fpu, &b, w64);
                    }
                }
                if matches!(
                    m,
                    Mnemonic::Ldmxcsr | Mnemonic::Fldcw | Mnemonic::Fxrstor | Mnemonic::Fxrstor64
                ) {
                    cpu.set_fpu(&fpu)?;
                }
            }
            complete(cpu, &d, regs)?;
        }
        _ => return Err(d.unhandled("")),
    }
    let mnemonic = format!("{:?}", insn.mnemonic()).to_lowercase();
    counts.add(&mnemonic);
    Ok(Assisted {
        mnemonic,
        rip: d.rip(),
    })
}

#[cfg(test)]
mod tests;
