//! The Linux guest's latency probe: a static, libc-free x86-64 ELF
//! executable the project writes itself (machine code assembled with
//! iced-x86, wrapped in a one-segment ELF64 header), started by the
//! initramfs's `/init` when the kernel command line carries
//! [`PROBE_PARAM`].
//!
//! It is the loop of the built-in probe ([`crate::probe`]) in a Linux
//! process: `iopl(3)`, then `mmap` of [`WS_SIZE`] bytes of private
//! anonymous memory with `MAP_POPULATE`, `mlock`, and forever: read the TSC
//! per slot (one 8-byte store every [`STRIDE`] bytes), keep the longest gap
//! and the sum/count of gaps above the VMM's stall threshold.
//!
//! The channel to the VMM is port I/O (32-bit accesses; the guest kernel
//! grants the ports with `iopl(3)`, the probe runs as root):
//!
//! * `in` [`PORT_EPOCH`]: the VMM's current epoch (low 32 bits). The probe
//!   reads it every [`CHECK_EVERY`] slots (or pass end); a new epoch closes
//!   the window: the probe writes a [`TAG_WINDOW`] message and starts a new
//!   pass. The exit the `in` itself causes is not counted: the probe
//!   re-reads the TSC after it.
//! * `in` [`PORT_STALL`]: the stall threshold in TSC ticks (read once).
//! * `out` [`PORT_DATA`]: messages of 32-bit words, a tag first:
//!   [`TAG_HELLO`] + 4 words (working-set base lo/hi, size in MiB, the
//!   probe's version); [`TAG_WINDOW`] + 18 words (the nine
//!   [`crate::probe::res`] words of a [`ProbeWindow`], each low half
//!   first); [`TAG_FAIL`] + 2 words (step, the syscall's return value).
//!
//! Port [`PORT_EPOCH`] = [`PORT_DATA`] = 0x7e0 and [`PORT_STALL`] = 0x7e4:
//! unused by the guest's devices (COM1 0x3f8, i8042 0x60/0x64, CMOS 0x70).

use crate::probe::{res, ProbeWindow};
use iced_x86::code_asm::*;

/// The kernel command-line word that makes `/init` start the probe.
pub const PROBE_PARAM: &str = "hvmm.probe";
/// Where the initramfs carries it.
pub const PROBE_PATH: &str = "bin/hvmm-probe";
/// `in`: epoch; `out`: message words.
pub const PORT_DATA: u16 = 0x7e0;
pub const PORT_EPOCH: u16 = PORT_DATA;
/// `in`: the stall threshold in TSC ticks.
pub const PORT_STALL: u16 = 0x7e4;
/// Message tags.
pub const TAG_HELLO: u32 = 0x4856_4d01;
pub const TAG_WINDOW: u32 = 0x4856_4d02;
pub const TAG_FAIL: u32 = 0x4856_4d03;
/// Words after each tag.
pub const HELLO_WORDS: usize = 4;
pub const WINDOW_WORDS: usize = 2 * res::WORDS;
pub const FAIL_WORDS: usize = 2;
/// The probe program's version (in its hello).
pub const VERSION: u32 = 1;
/// The working set, in MiB and bytes.
pub const WS_MIB: u32 = 64;
pub const WS_SIZE: u64 = (WS_MIB as u64) << 20;
/// Bytes between two touched slots (one per 4 KiB page).
pub const STRIDE: i32 = 4096;
/// Slots between two looks at the epoch port.
pub const CHECK_EVERY: u32 = 1024;

/// Where the executable loads (one RWX segment: code, then its data page).
const BASE: u64 = 0x40_0000;
const CODE_OFF: usize = 0x80;
const DATA: u64 = BASE + 0x1000;
const MEM_SIZE: u64 = 0x2000;
/// Data page words.
const D_WS_BASE: u64 = 0;
const D_WS_END: u64 = 8;
const D_STALL: u64 = 16;

/// Failure steps reported in a [`TAG_FAIL`] message (also the exit code).
pub const FAIL_IOPL: u32 = 1;
pub const FAIL_MMAP: u32 = 2;

const SYS_MMAP: i32 = 9;
const SYS_MLOCK: i32 = 149;
const SYS_IOPL: i32 = 172;
const SYS_EXIT: i32 = 60;

#[derive(Debug, thiserror::Error)]
pub enum ProbeElfError {
    #[error("assembling the Linux probe: {0}")]
    Asm(String),
    #[error("the Linux probe's code ({0} bytes) does not fit before its data page")]
    TooBig(usize),
}

/// The probe executable's bytes.
pub fn executable() -> Result<Vec<u8>, ProbeElfError> {
    let code = assemble().map_err(|e| ProbeElfError::Asm(e.to_string()))?;
    if CODE_OFF + code.len() > 0x1000 {
        return Err(ProbeElfError::TooBig(code.len()));
    }
    Ok(elf_exec(&code))
}

/// A minimal static ELF64 executable: the ELF header, one `PT_LOAD`
/// program header mapping the whole file at [`BASE`] (RWX, [`MEM_SIZE`]
/// bytes of memory: the code and a zeroed data page), the code at
/// [`CODE_OFF`], the entry point on its first byte.
fn elf_exec(code: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(CODE_OFF + code.len());
    let filesz = (CODE_OFF + code.len()) as u64;
    // e_ident
    f.extend_from_slice(b"\x7fELF");
    f.extend_from_slice(&[2, 1, 1, 0]); // ELFCLASS64, LSB, EV_CURRENT, SYSV
    f.extend_from_slice(&[0; 8]);
    f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    f.extend_from_slice(&1u32.to_le_bytes()); // e_version
    f.extend_from_slice(&(BASE + CODE_OFF as u64).to_le_bytes()); // e_entry
    f.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
    f.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    f.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    f.extend_from_slice(&64u16.to_le_bytes()); // e_ehsize
    f.extend_from_slice(&56u16.to_le_bytes()); // e_phentsize
    f.extend_from_slice(&1u16.to_le_bytes()); // e_phnum
    f.extend_from_slice(&64u16.to_le_bytes()); // e_shentsize
    f.extend_from_slice(&0u16.to_le_bytes()); // e_shnum
    f.extend_from_slice(&0u16.to_le_bytes()); // e_shstrndx
                                              // PT_LOAD
    f.extend_from_slice(&1u32.to_le_bytes()); // p_type
    f.extend_from_slice(&7u32.to_le_bytes()); // p_flags RWX
    f.extend_from_slice(&0u64.to_le_bytes()); // p_offset
    f.extend_from_slice(&BASE.to_le_bytes()); // p_vaddr
    f.extend_from_slice(&BASE.to_le_bytes()); // p_paddr
    f.extend_from_slice(&filesz.to_le_bytes()); // p_filesz
    f.extend_from_slice(&MEM_SIZE.to_le_bytes()); // p_memsz
    f.extend_from_slice(&0x1000u64.to_le_bytes()); // p_align
    f.resize(CODE_OFF, 0);
    f.extend_from_slice(code);
    f
}

/// `rax = rdtsc` (64-bit); clobbers rdx.
fn emit_tsc(a: &mut CodeAssembler) -> Result<(), IcedError> {
    a.rdtsc()?;
    a.shl(rdx, 32)?;
    a.or(rax, rdx)?;
    Ok(())
}

/// The TSC into rax, the gap since `r11` folded into max (`r12`) and,
/// above the threshold, stall sum/count (`r13`/`r14`); `r11 = rax`.
fn emit_gap(a: &mut CodeAssembler) -> Result<(), IcedError> {
    let mut no_max = a.create_label();
    let mut no_stall = a.create_label();
    emit_tsc(a)?;
    a.mov(rdx, rax)?;
    a.sub(rdx, r11)?;
    a.mov(r11, rax)?;
    a.cmp(rdx, r12)?;
    a.jbe(no_max)?;
    a.mov(r12, rdx)?;
    a.set_label(&mut no_max)?;
    a.cmp(rdx, qword_ptr(rsi + D_STALL))?;
    a.jbe(no_stall)?;
    a.add(r13, rdx)?;
    a.inc(r14)?;
    a.set_label(&mut no_stall)?;
    Ok(())
}

/// Read the epoch port; a new epoch (in rax) goes to `publish`; else the
/// TSC is re-read into `r11` so the port exit is not counted as a gap.
fn emit_control(a: &mut CodeAssembler, publish: CodeLabel) -> Result<(), IcedError> {
    a.mov(edx, u32::from(PORT_EPOCH))?;
    a.in_(eax, dx)?;
    a.cmp(rax, rbx)?;
    a.jne(publish)?;
    emit_tsc(a)?;
    a.mov(r11, rax)?;
    Ok(())
}

/// `out dx, reg` as two 32-bit words, low half first (dx = [`PORT_DATA`]).
fn emit_out64(a: &mut CodeAssembler, r: AsmRegister64) -> Result<(), IcedError> {
    a.mov(rax, r)?;
    a.out(dx, eax)?;
    a.shr(rax, 32)?;
    a.out(dx, eax)?;
    Ok(())
}

/// Report a failed step (rax: the syscall's return) and exit with it.
fn emit_fail(a: &mut CodeAssembler, step: u32) -> Result<(), IcedError> {
    a.mov(rcx, rax)?;
    a.mov(edx, u32::from(PORT_DATA))?;
    a.mov(eax, TAG_FAIL)?;
    a.out(dx, eax)?;
    a.mov(eax, step)?;
    a.out(dx, eax)?;
    a.mov(rax, rcx)?;
    a.out(dx, eax)?;
    a.mov(eax, SYS_EXIT)?;
    a.mov(edi, step)?;
    a.syscall()?;
    Ok(())
}

fn assemble() -> Result<Vec<u8>, IcedError> {
    let mut a = CodeAssembler::new(64)?;
    let mut iopl_failed = a.create_label();
    let mut mmap_failed = a.create_label();
    let mut new_pass = a.create_label();
    let mut slot = a.create_label();
    let mut pass_done = a.create_label();
    let mut publish = a.create_label();

    // iopl(3): the ports. Failing, nothing can be reported: exit.
    a.mov(eax, SYS_IOPL)?;
    a.mov(edi, 3)?;
    a.syscall()?;
    a.test(rax, rax)?;
    a.jnz(iopl_failed)?;
    // mmap(0, WS_SIZE, RW, PRIVATE|ANONYMOUS|POPULATE, -1, 0)
    a.mov(eax, SYS_MMAP)?;
    a.xor(edi, edi)?;
    a.mov(rsi, WS_SIZE)?;
    a.mov(edx, 3)?;
    a.mov(r10d, 0x02 | 0x20 | 0x8000)?;
    a.mov(r8, -1i64)?;
    a.xor(r9d, r9d)?;
    a.syscall()?;
    a.cmp(rax, -4095)?;
    a.jae(mmap_failed)?;
    a.mov(r12, rax)?;
    // mlock(base, WS_SIZE): best effort (the populate already faulted it).
    a.mov(rdi, rax)?;
    a.mov(rsi, WS_SIZE)?;
    a.mov(eax, SYS_MLOCK)?;
    a.syscall()?;
    // The data page: working set, threshold from the VMM.
    a.mov(rsi, DATA)?;
    a.mov(qword_ptr(rsi + D_WS_BASE), r12)?;
    a.mov(rax, r12)?;
    a.mov(rcx, WS_SIZE)?;
    a.add(rax, rcx)?;
    a.mov(qword_ptr(rsi + D_WS_END), rax)?;
    a.mov(edx, u32::from(PORT_STALL))?;
    a.in_(eax, dx)?;
    a.mov(qword_ptr(rsi + D_STALL), rax)?;
    // Hello.
    a.mov(edx, u32::from(PORT_DATA))?;
    a.mov(eax, TAG_HELLO)?;
    a.out(dx, eax)?;
    emit_out64(&mut a, r12)?;
    a.mov(eax, WS_MIB)?;
    a.out(dx, eax)?;
    a.mov(eax, VERSION)?;
    a.out(dx, eax)?;

    // rsi: data page, rbx: current epoch, r8/r9: slot/end, r11: previous
    // TSC, r12..r15: max gap, stall sum, stall count, touches; rbp: passes,
    // rdi: passes in all, rcx: slots until the next control check.
    a.xor(ebx, ebx)?;
    a.xor(r12, r12)?;
    a.xor(r13, r13)?;
    a.xor(r14, r14)?;
    a.xor(r15, r15)?;
    a.xor(rbp, rbp)?;
    a.xor(edi, edi)?;
    emit_tsc(&mut a)?;
    a.mov(r11, rax)?;

    a.set_label(&mut new_pass)?;
    a.mov(ecx, CHECK_EVERY)?;
    a.mov(r8, qword_ptr(rsi + D_WS_BASE))?;
    a.mov(r9, qword_ptr(rsi + D_WS_END))?;

    a.set_label(&mut slot)?;
    a.cmp(r8, r9)?;
    a.jae(pass_done)?;
    emit_gap(&mut a)?;
    a.mov(qword_ptr(r8), rax)?; // the touch
    a.inc(r15)?;
    a.add(r8, STRIDE)?;
    a.dec(ecx)?;
    a.jnz(slot)?;
    a.mov(ecx, CHECK_EVERY)?;
    emit_control(&mut a, publish)?;
    a.jmp(slot)?;

    a.set_label(&mut pass_done)?;
    a.inc(rbp)?;
    a.inc(rdi)?;
    emit_control(&mut a, publish)?;
    a.jmp(new_pass)?;

    // rax: the new epoch. The window message in res order.
    a.set_label(&mut publish)?;
    a.mov(rbx, rax)?;
    emit_tsc(&mut a)?;
    a.mov(r11, rax)?;
    a.mov(edx, u32::from(PORT_DATA))?;
    a.mov(eax, TAG_WINDOW)?;
    a.out(dx, eax)?;
    for r in [rbx, r12, r13, r14, r15, rbp, r11] {
        emit_out64(&mut a, r)?;
    }
    a.xor(eax, eax)?; // done: never
    a.out(dx, eax)?;
    a.out(dx, eax)?;
    emit_out64(&mut a, rdi)?;
    a.xor(r12, r12)?;
    a.xor(r13, r13)?;
    a.xor(r14, r14)?;
    a.xor(r15, r15)?;
    a.xor(rbp, rbp)?;
    emit_tsc(&mut a)?;
    a.mov(r11, rax)?;
    a.jmp(new_pass)?;

    a.set_label(&mut iopl_failed)?;
    a.mov(eax, SYS_EXIT)?;
    a.mov(edi, FAIL_IOPL)?;
    a.syscall()?;
    a.set_label(&mut mmap_failed)?;
    emit_fail(&mut a, FAIL_MMAP)?;

    a.assemble(BASE + CODE_OFF as u64)
}

/// What the probe said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeMessage {
    Hello {
        ws_base: u64,
        ws_mib: u32,
        version: u32,
    },
    Window(ProbeWindow),
    Fail {
        step: u32,
        ret: u32,
    },
}

/// A word the decoder could not place (untrusted guest data).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("probe channel: word {0:#x} is no message tag")]
pub struct BadTag(pub u32);

/// Reassembles messages from the `out` words (bounded: at most one
/// message's words are buffered).
#[derive(Debug, Default)]
pub struct Decoder {
    tag: Option<u32>,
    words: Vec<u32>,
}

impl Decoder {
    /// One word from the guest; a message when it completes one.
    pub fn push(&mut self, w: u32) -> Result<Option<ProbeMessage>, BadTag> {
        let Some(tag) = self.tag else {
            if ![TAG_HELLO, TAG_WINDOW, TAG_FAIL].contains(&w) {
                return Err(BadTag(w));
            }
            self.tag = Some(w);
            self.words.clear();
            return Ok(None);
        };
        self.words.push(w);
        let need = match tag {
            TAG_HELLO => HELLO_WORDS,
            TAG_WINDOW => WINDOW_WORDS,
            _ => FAIL_WORDS,
        };
        if self.words.len() < need {
            return Ok(None);
        }
        self.tag = None;
        let q = |i: usize| u64::from(self.words[2 * i]) | (u64::from(self.words[2 * i + 1]) << 32);
        Ok(Some(match tag {
            TAG_HELLO => ProbeMessage::Hello {
                ws_base: q(0),
                ws_mib: self.words[2],
                version: self.words[3],
            },
            TAG_WINDOW => {
                let mut r = [0u64; res::WORDS];
                for (i, v) in r.iter_mut().enumerate() {
                    *v = q(i);
                }
                ProbeMessage::Window(ProbeWindow::from_words(r))
            }
            _ => ProbeMessage::Fail {
                step: self.words[0],
                ret: self.words[1],
            },
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::linux::elf;
    use iced_x86::{Decoder as X86Decoder, DecoderOptions, Mnemonic, OpKind, Register};

    #[test]
    fn elf_is_a_static_x86_64_executable() {
        let exe = executable().unwrap();
        let info = elf::check_x86_64_exec(&exe).unwrap();
        assert!(info.entry_in_load_segment());
        assert_eq!(info.entry, BASE + CODE_OFF as u64);
        // No interpreter, no dynamic section: one PT_LOAD only.
        assert_eq!(info.load_segments.len(), 1);
        assert!(exe.len() < 4096);
    }

    fn code() -> Vec<iced_x86::Instruction> {
        let exe = executable().unwrap();
        let code = &exe[CODE_OFF..];
        X86Decoder::with_ip(64, code, BASE + CODE_OFF as u64, DecoderOptions::NONE)
            .iter()
            .collect()
    }

    #[test]
    fn code_decodes_and_touches_only_its_ports() {
        let ins = code();
        assert!(ins.iter().all(|i| !i.is_invalid()));
        assert!(ins.iter().any(|i| i.mnemonic() == Mnemonic::Rdtsc));
        let mut ports = 0;
        for i in &ins {
            match i.mnemonic() {
                Mnemonic::In => {
                    assert_eq!(i.op1_register(), Register::DX);
                    assert_eq!(i.op0_register(), Register::EAX);
                    ports += 1;
                }
                Mnemonic::Out => {
                    assert_eq!(i.op0_register(), Register::DX);
                    assert_eq!(i.op1_register(), Register::EAX);
                    ports += 1;
                }
                Mnemonic::Hlt | Mnemonic::Cli | Mnemonic::Sti | Mnemonic::Int3 => {
                    panic!("{i} has no place in a CPL3 probe")
                }
                _ => {}
            }
        }
        assert!(ports > 20);
        // Every port number loaded into edx is one of the probe's.
        for i in ins.iter().filter(|i| {
            i.mnemonic() == Mnemonic::Mov
                && i.op0_register() == Register::EDX
                && i.op1_kind() == OpKind::Immediate32
        }) {
            let p = i.immediate32();
            assert!(
                [u32::from(PORT_DATA), u32::from(PORT_STALL), 3].contains(&p),
                "{i}"
            );
        }
    }

    #[test]
    fn syscalls_are_iopl_mmap_mlock_exit() {
        let ins = code();
        let mut nrs = Vec::new();
        for (k, i) in ins.iter().enumerate() {
            if i.mnemonic() != Mnemonic::Syscall {
                continue;
            }
            // The last `mov eax, imm` before it.
            let nr = ins[..k]
                .iter()
                .rev()
                .find(|p| p.mnemonic() == Mnemonic::Mov && p.op0_register() == Register::EAX)
                .map(|p| p.immediate32())
                .unwrap();
            nrs.push(nr);
        }
        for n in [SYS_IOPL, SYS_MMAP, SYS_MLOCK, SYS_EXIT] {
            assert!(nrs.contains(&n.cast_unsigned()), "{nrs:?}");
        }
    }

    /// The ELF runs natively as a normal process: without the privilege
    /// for `iopl(3)` it must exit with [`FAIL_IOPL`] before any port
    /// access (as `nobody`, through `setpriv`; skipped without it or
    /// without root to drop from).
    #[test]
    fn runs_natively_and_exits_without_iopl() {
        use std::os::unix::fs::PermissionsExt;
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 || !std::path::Path::new("/usr/bin/setpriv").exists() {
            eprintln!("skipped: needs root and setpriv");
            return;
        }
        let dir = std::env::temp_dir().join(format!("hvmm-probe-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let exe = dir.join("hvmm-probe");
        std::fs::write(&exe, executable().unwrap()).unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let st = std::process::Command::new("/usr/bin/setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
            .arg(&exe)
            .status()
            .unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(st.code(), Some(FAIL_IOPL.cast_signed()), "{st:?}");
    }

    fn feed(d: &mut Decoder, words: &[u32]) -> Vec<ProbeMessage> {
        words.iter().filter_map(|&w| d.push(w).unwrap()).collect()
    }

    #[test]
    fn decoder_reassembles_messages() {
        let mut d = Decoder::default();
        let m = feed(&mut d, &[TAG_HELLO, 0x1000, 0x7f, 64, VERSION]);
        assert_eq!(
            m,
            [ProbeMessage::Hello {
                ws_base: 0x7f_0000_1000,
                ws_mib: 64,
                version: VERSION
            }]
        );
        let mut w = vec![TAG_WINDOW];
        for v in [3u64, 10, 20, 2, 100, 1, 1 << 40, 0, 7] {
            w.push(u32::try_from(v & 0xffff_ffff).unwrap());
            w.push(u32::try_from(v >> 32).unwrap());
        }
        let m = feed(&mut d, &w);
        let ProbeMessage::Window(win) = m[0] else {
            panic!("{m:?}")
        };
        assert_eq!(
            (win.ack_epoch, win.max_gap_tsc, win.stall_count),
            (3, 10, 2)
        );
        assert_eq!((win.tsc, win.passes_total, win.done), (1 << 40, 7, false));
        assert_eq!(
            feed(&mut d, &[TAG_FAIL, FAIL_MMAP, 12]),
            [ProbeMessage::Fail {
                step: FAIL_MMAP,
                ret: 12
            }]
        );
        assert_eq!(d.push(0xdead), Err(BadTag(0xdead)));
    }
}
