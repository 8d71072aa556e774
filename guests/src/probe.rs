//! The built-in latency probe: a CPL3 program (same system page as
//! [`crate::builtin`]: GDT, TSS, identity page tables, MMIO doorbells) that
//! loops forever over its working set and measures, with `rdtsc`, how long
//! the guest was kept from running.
//!
//! Per slot it reads the TSC, takes the gap since the previous read, keeps
//! the largest gap and the sum/count of gaps above a threshold (a refault
//! or any other stall), and stores the TSC into the slot (a write touch).
//! The VMM drives it through the control words of the params page, written
//! through its own mapping while the vCPU runs:
//!
//! * `epoch`: the VMM bumps it to close the current measurement window.
//!   The guest notices within `check_every` slots (or at once when idle),
//!   publishes the closed window's [`ProbeWindow`] into the result page,
//!   writing `ack_epoch` last, resets its figures and starts a new pass
//!   from the working set's base with the (possibly changed) mode.
//! * `mode`: [`ProbeMode`]: touch every `stride` bytes, one slot per
//!   `sparse_stride`, or nothing (idle: the loop only reads the TSC).
//! * `stop`: ring the done doorbell and spin.
//!
//! `passes_total` in the result page is updated live at the end of every
//! pass (never reset), so the VMM can wait for the guest to have re-touched
//! its whole working set after an invalidation.

use crate::builtin::{self, BuiltinError, LAYOUT};
use iced_x86::code_asm::*;

pub const PROBE_MAGIC: u64 = 0x5052_4f42_4521_2121; // "PROBE!!!"
pub const PROBE_DONE: u64 = 0x5052_4f42_444f_4e45;

/// What the probe touches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub enum ProbeMode {
    /// Touch nothing in the working set; only read the TSC.
    Idle = 0,
    /// One slot every `stride` bytes of the working set.
    All = 1,
    /// One slot every `sparse_stride` bytes (one page per GiB).
    Sparse = 2,
}

/// Byte offsets of the control words in the params page.
pub mod ctl {
    pub const MAGIC: u64 = 0;
    pub const WS_BASE: u64 = 8;
    pub const WS_SIZE: u64 = 16;
    pub const STRIDE: u64 = 24;
    pub const EPOCH: u64 = 32;
    pub const MODE: u64 = 40;
    pub const STOP: u64 = 48;
    pub const STALL_TSC: u64 = 56;
    pub const SPARSE_STRIDE: u64 = 64;
    pub const CHECK_EVERY: u64 = 72;
    /// Number of control words.
    pub const WORDS: usize = 10;
}

/// Byte offsets of the published figures in the result page.
pub mod res {
    pub const ACK_EPOCH: u64 = 0;
    pub const MAX_GAP: u64 = 8;
    pub const STALL_SUM: u64 = 16;
    pub const STALL_COUNT: u64 = 24;
    pub const TOUCHES: u64 = 32;
    pub const PASSES: u64 = 40;
    pub const TSC: u64 = 48;
    pub const DONE: u64 = 56;
    pub const PASSES_TOTAL: u64 = 64;
    /// Number of result words.
    pub const WORDS: usize = 9;
}

/// The probe's start-up configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ProbeParams {
    pub ws_base: u64,
    pub ws_size: u64,
    pub stride: u64,
    pub mode: ProbeMode,
    /// Gaps above this many TSC ticks count as stalls.
    pub stall_tsc: u64,
    pub sparse_stride: u64,
    /// Slots between two looks at the control words.
    pub check_every: u64,
}

impl ProbeParams {
    /// Check against guest RAM of `mem` bytes.
    pub fn validate(&self, mem: u64) -> Result<(), BuiltinError> {
        builtin::check_mem(mem)?;
        for s in [self.stride, self.sparse_stride] {
            if s == 0 || !s.is_multiple_of(8) {
                return Err(BuiltinError::Stride(s));
            }
        }
        let end = self.ws_base.checked_add(self.ws_size);
        if self.ws_base < LAYOUT.ws_min || self.ws_size == 0 || end.is_none_or(|e| e > mem) {
            return Err(BuiltinError::WorkingSet {
                base: self.ws_base,
                size: self.ws_size,
                min: LAYOUT.ws_min,
                mem,
            });
        }
        if self.check_every == 0 {
            return Err(BuiltinError::Passes);
        }
        Ok(())
    }

    /// The params page's initial control words.
    pub fn to_page(&self) -> [u64; ctl::WORDS] {
        [
            PROBE_MAGIC,
            self.ws_base,
            self.ws_size,
            self.stride,
            0,
            self.mode as u64,
            0,
            self.stall_tsc,
            self.sparse_stride,
            self.check_every,
        ]
    }
}

/// One closed measurement window, as the guest published it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct ProbeWindow {
    /// The epoch the VMM opened when it closed this window.
    pub ack_epoch: u64,
    pub max_gap_tsc: u64,
    pub stall_sum_tsc: u64,
    pub stall_count: u64,
    pub touches: u64,
    pub passes: u64,
    /// The guest's TSC when it published.
    pub tsc: u64,
    pub done: bool,
    pub passes_total: u64,
}

impl ProbeWindow {
    /// Decode the result page's words.
    pub fn from_words(w: [u64; res::WORDS]) -> Self {
        ProbeWindow {
            ack_epoch: w[0],
            max_gap_tsc: w[1],
            stall_sum_tsc: w[2],
            stall_count: w[3],
            touches: w[4],
            passes: w[5],
            tsc: w[6],
            done: w[7] == PROBE_DONE,
            passes_total: w[8],
        }
    }
}

/// The system page for the probe: [`builtin::system_image_with`] and the probe
/// program.
pub fn system_image(p: &ProbeParams, mem: u64) -> Result<Vec<u8>, BuiltinError> {
    p.validate(mem)?;
    builtin::system_image_with(&p.to_page(), &program()?, mem)
}

/// Assemble the probe for [`LAYOUT`].
pub fn program() -> Result<Vec<u8>, BuiltinError> {
    assemble().map_err(|e| BuiltinError::Asm(e.to_string()))
}

/// `rax = rdtsc`; the gap since `r11` into `rdx`; `r11 = rax`; fold the
/// gap into max (`r12`) and, above the threshold, stall sum/count
/// (`r13`/`r14`). Clobbers rdx.
fn emit_gap(a: &mut CodeAssembler) -> Result<(), IcedError> {
    let mut no_max = a.create_label();
    let mut no_stall = a.create_label();
    a.rdtsc()?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)?;
    a.mov(rdx, rax)?;
    a.sub(rdx, r11)?;
    a.mov(r11, rax)?;
    a.cmp(rdx, r12)?;
    a.jbe(no_max)?;
    a.mov(r12, rdx)?;
    a.set_label(&mut no_max)?;
    a.cmp(rdx, qword_ptr(rsi + ctl::STALL_TSC))?;
    a.jbe(no_stall)?;
    a.add(r13, rdx)?;
    a.inc(r14)?;
    a.set_label(&mut no_stall)?;
    Ok(())
}

/// The control words: a new epoch (in rax) goes to `publish`, `stop` to
/// `stop`; otherwise fall through.
fn emit_control(
    a: &mut CodeAssembler,
    publish: CodeLabel,
    stop: CodeLabel,
) -> Result<(), IcedError> {
    a.mov(rax, qword_ptr(rsi + ctl::EPOCH))?;
    a.cmp(rax, rbx)?;
    a.jne(publish)?;
    a.mov(rax, qword_ptr(rsi + ctl::STOP))?;
    a.test(rax, rax)?;
    a.jnz(stop)?;
    Ok(())
}

fn assemble() -> Result<Vec<u8>, IcedError> {
    let l = LAYOUT;
    let mut a = CodeAssembler::new(64)?;
    let mut new_pass = a.create_label();
    let mut slot = a.create_label();
    let mut pass_done = a.create_label();
    let mut idle = a.create_label();
    let mut publish = a.create_label();
    let mut stop = a.create_label();
    let mut spin = a.create_label();

    // rsi: control words, rdi: result page, rbx: current epoch,
    // r8/r9: slot address/end, r10: stride, r11: previous TSC,
    // r12..r15: max gap, stall sum, stall count, touches; rbp: passes;
    // rcx: slots until the next control check.
    a.mov(rsi, l.params)?;
    a.mov(rdi, l.result)?;
    // Epoch 0 is the boot window: the first epoch the VMM writes closes
    // it, however early it is written.
    a.xor(ebx, ebx)?;
    a.xor(r12, r12)?;
    a.xor(r13, r13)?;
    a.xor(r14, r14)?;
    a.xor(r15, r15)?;
    a.xor(rbp, rbp)?;
    a.rdtsc()?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)?;
    a.mov(r11, rax)?;

    a.set_label(&mut new_pass)?;
    a.mov(rcx, qword_ptr(rsi + ctl::CHECK_EVERY))?;
    a.mov(rax, qword_ptr(rsi + ctl::MODE))?;
    a.test(rax, rax)?;
    a.jz(idle)?;
    a.mov(r8, qword_ptr(rsi + ctl::WS_BASE))?;
    a.mov(r9, r8)?;
    a.add(r9, qword_ptr(rsi + ctl::WS_SIZE))?;
    a.mov(r10, qword_ptr(rsi + ctl::STRIDE))?;
    a.cmp(rax, ProbeMode::Sparse as i32)?;
    a.jne(slot)?;
    a.mov(r10, qword_ptr(rsi + ctl::SPARSE_STRIDE))?;

    a.set_label(&mut slot)?;
    a.cmp(r8, r9)?;
    a.jae(pass_done)?;
    emit_gap(&mut a)?;
    a.mov(qword_ptr(r8), rax)?; // the touch
    a.inc(r15)?;
    a.add(r8, r10)?;
    a.dec(rcx)?;
    a.jnz(slot)?;
    a.mov(rcx, qword_ptr(rsi + ctl::CHECK_EVERY))?;
    emit_control(&mut a, publish, stop)?;
    a.jmp(slot)?;

    a.set_label(&mut pass_done)?;
    a.inc(rbp)?;
    a.inc(qword_ptr(rdi + res::PASSES_TOTAL))?;
    emit_control(&mut a, publish, stop)?;
    a.jmp(new_pass)?;

    // Idle: the gap loop without touches; the control words every round,
    // and back to touching when the mode changes.
    a.set_label(&mut idle)?;
    emit_gap(&mut a)?;
    emit_control(&mut a, publish, stop)?;
    a.mov(rax, qword_ptr(rsi + ctl::MODE))?;
    a.test(rax, rax)?;
    a.jnz(new_pass)?;
    a.jmp(idle)?;

    // rax: the new epoch. Figures first, ack last (x86 stores are ordered).
    a.set_label(&mut publish)?;
    a.mov(rbx, rax)?;
    a.mov(qword_ptr(rdi + res::MAX_GAP), r12)?;
    a.mov(qword_ptr(rdi + res::STALL_SUM), r13)?;
    a.mov(qword_ptr(rdi + res::STALL_COUNT), r14)?;
    a.mov(qword_ptr(rdi + res::TOUCHES), r15)?;
    a.mov(qword_ptr(rdi + res::PASSES), rbp)?;
    a.rdtsc()?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)?;
    a.mov(r11, rax)?;
    a.mov(qword_ptr(rdi + res::TSC), rax)?;
    a.mov(qword_ptr(rdi + res::ACK_EPOCH), rbx)?;
    a.xor(r12, r12)?;
    a.xor(r13, r13)?;
    a.xor(r14, r14)?;
    a.xor(r15, r15)?;
    a.xor(rbp, rbp)?;
    a.jmp(new_pass)?;

    a.set_label(&mut stop)?;
    a.mov(rax, PROBE_DONE)?;
    a.mov(qword_ptr(rdi + res::DONE), rax)?;
    a.mov(rdx, l.done_mmio)?;
    a.mov(dword_ptr(rdx), ebx)?;
    a.set_label(&mut spin)?;
    a.pause()?;
    a.jmp(spin)?;

    a.assemble(l.code)
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions, Mnemonic};
    use notifier::convert::u64_to_usize;

    fn params() -> ProbeParams {
        ProbeParams {
            ws_base: 2 << 20,
            ws_size: 62 << 20,
            stride: 4096,
            mode: ProbeMode::All,
            stall_tsc: 4000,
            sparse_stride: 1 << 30,
            check_every: 64,
        }
    }

    #[test]
    fn probe_decodes_and_runs_at_cpl3() {
        let code = program().unwrap();
        let mut d = Decoder::with_ip(64, &code, LAYOUT.code, DecoderOptions::NONE);
        let ins: Vec<_> = d.iter().collect();
        assert!(ins.iter().all(|i| !i.is_invalid()));
        assert!(ins.iter().any(|i| i.mnemonic() == Mnemonic::Rdtsc));
        assert!(ins.iter().all(|i| !matches!(
            i.mnemonic(),
            Mnemonic::Hlt | Mnemonic::Cli | Mnemonic::Sti | Mnemonic::Out | Mnemonic::In
        )));
    }

    #[test]
    fn image_carries_control_words() {
        let p = params();
        let img = system_image(&p, 64 << 20).unwrap();
        let rd = |gpa: u64| crate::linux::bytes::le64(&img, u64_to_usize(gpa)).unwrap();
        assert_eq!(rd(LAYOUT.params + ctl::MAGIC), PROBE_MAGIC);
        assert_eq!(rd(LAYOUT.params + ctl::MODE), ProbeMode::All as u64);
        assert_eq!(rd(LAYOUT.params + ctl::CHECK_EVERY), 64);
        assert_eq!(rd(LAYOUT.result + res::ACK_EPOCH), 0);
    }

    #[test]
    fn validation() {
        assert!(params().validate(64 << 20).is_ok());
        let bad = [
            ProbeParams {
                stride: 12,
                ..params()
            },
            ProbeParams {
                ws_base: 0,
                ..params()
            },
            ProbeParams {
                ws_size: 64 << 20,
                ..params()
            },
            ProbeParams {
                check_every: 0,
                ..params()
            },
        ];
        for b in bad {
            assert!(b.validate(64 << 20).is_err(), "{b:?}");
        }
    }

    #[test]
    fn window_decodes() {
        let w = ProbeWindow::from_words([3, 10, 20, 2, 100, 1, 999, PROBE_DONE, 7]);
        assert_eq!(w.ack_epoch, 3);
        assert_eq!(w.stall_count, 2);
        assert!(w.done);
        assert_eq!(w.passes_total, 7);
    }
}
