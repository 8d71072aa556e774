//! The built-in test guest: a CPL3 program assembled here with iced-x86's
//! code assembler, no download, no guest kernel.
//!
//! The VMM writes the [`system_image`] (GDT, TSS, identity page tables with
//! U/S set, the program, the params page) into the first 2 MiB of guest RAM
//! and starts the vCPU directly at CPL3 (see
//! [`Layout`]). For `passes` passes the program visits `size / stride`
//! 8-byte slots of the working set, sequentially or in an LCG order, and per
//! slot: reads the old value (folds it into the checksum), writes
//! `addr ^ passmix(pass)`, reads it back (folds it too). After each pass it
//! stores the passes done to the progress doorbell; at the end it writes the
//! result page and stores to the done doorbell, then spins.
//!
//! Doorbells are MMIO stores, not port I/O: on this host (PVM) guest CPL3
//! runs as real host user code, `out` raises #GP whatever the guest's
//! IOPL or I/O bitmap say (and KVM_SET_REGS loses IOPL). A store to a gpa
//! outside every memslot exits with KVM_EXIT_MMIO everywhere.
//!
//! [`expected`] is the same computation in Rust, given which working-set
//! ranges were zeroed (discarded) before which pass, so the VMM can say
//! whether any guest data was lost or corrupted.

use iced_x86::code_asm::*;
use notifier::convert::u64_to_usize;
use thiserror::Error;

/// Where the built-in guest's pieces live (guest-physical addresses) and
/// which doorbells it rings. Everything but the working set is in the first
/// 2 MiB ("system page").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub gdt: u64,
    pub tss: u64,
    pub params: u64,
    pub result: u64,
    pub pml4: u64,
    pub code: u64,
    /// Initial RSP (the program uses no stack; set for sanity).
    pub stack_top: u64,
    /// The working set must start at or above this gpa.
    pub ws_min: u64,
    /// MMIO doorbells (outside RAM; a 4-byte store exits to the VMM with
    /// the value): passes done so far, and the final "done".
    pub progress_mmio: u64,
    pub done_mmio: u64,
}

/// The one layout the program is assembled for.
pub const LAYOUT: Layout = Layout {
    gdt: 0x1000,
    tss: 0x2000,
    params: 0x5000,
    result: 0x6000,
    pml4: 0x10000,
    code: 0x10_0000,
    stack_top: 0x1f_f000,
    ws_min: SYSTEM_SIZE,
    progress_mmio: MMIO_BASE,
    done_mmio: MMIO_BASE + 8,
};

/// Where the doorbells live: 3 GiB, above the most RAM the VMM lays out
/// below the 32-bit gap. The page tables always map the first 4 GiB.
pub const MMIO_BASE: u64 = 0xc000_0000;

/// The TSS is the bare 0x68 bytes (no I/O bitmap: the guest does no port I/O).
pub const TSS_LIMIT: u64 = 0x67;

/// Size of the system image (one 2 MiB page).
pub const SYSTEM_SIZE: u64 = 2 << 20;
/// Most guest RAM: below the doorbells.
pub const MAX_MEM: u64 = MMIO_BASE;
/// Largest working set (in slots) [`expected`] models.
pub const MAX_SLOTS: u64 = 1 << 27;

pub const PARAMS_MAGIC: u64 = 0x5041_5241_4d53_2121; // "PARAMS!!"
pub const DONE_MAGIC: u64 = 0x444f_4e45_444f_4e45; // "DONEDONE"
const LCG_A: u64 = 6364136223846793005;
const LCG_C: u64 = 1442695040888963407;
const PASS_K: u64 = 0x9e37_79b9_7f4a_7c15;

/// GDT selectors (index * 8 | RPL).
pub const SEL_KERNEL_CS: u16 = 0x08;
pub const SEL_KERNEL_DS: u16 = 0x10;
pub const SEL_USER_DS: u16 = 0x18 | 3;
pub const SEL_USER_CS: u16 = 0x20 | 3;
pub const SEL_TSS: u16 = 0x28;

/// The raw GDT: null, kernel code64, kernel data, user data (DPL3), user
/// code64 (DPL3), 16-byte 64-bit TSS descriptor (busy, limit covering the
/// I/O permission bitmap).
pub fn gdt() -> [u64; 7] {
    let tss = LAYOUT.tss;
    let tss_lo = TSS_LIMIT | ((tss & 0xff_ffff) << 16) | (0x8b << 40) | ((tss >> 24 & 0xff) << 56);
    [
        0,
        0x00af_9b00_0000_ffff,
        0x00cf_9300_0000_ffff,
        0x00cf_f300_0000_ffff,
        0x00af_fb00_0000_ffff,
        tss_lo,
        tss >> 32,
    ]
}

/// Guest RAM the system image supports: a non-zero multiple of 2 MiB, at
/// most [`MAX_MEM`].
pub fn check_mem(mem: u64) -> Result<(), BuiltinError> {
    if mem == 0 || !mem.is_multiple_of(SYSTEM_SIZE) {
        return Err(BuiltinError::MemNotWhole(mem));
    }
    if mem > MAX_MEM {
        return Err(BuiltinError::Mem(mem));
    }
    Ok(())
}

/// Order in which a pass visits the slots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Pattern {
    Sequential,
    /// `x = x * A + C` (Knuth's MMIX LCG) from `seed`, slot = high 64 bits
    /// of `x * nslots`; the state carries over between passes.
    Lcg,
}

impl std::str::FromStr for Pattern {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "seq" | "sequential" => Ok(Pattern::Sequential),
            "lcg" | "random" => Ok(Pattern::Lcg),
            _ => Err(format!("unknown pattern {s:?}: expected seq or lcg")),
        }
    }
}

/// What the guest does (the params page).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Params {
    pub ws_base: u64,
    pub ws_size: u64,
    pub stride: u64,
    pub passes: u64,
    pub pattern: Pattern,
    pub seed: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum BuiltinError {
    #[error("stride {0} must be a non-zero multiple of 8")]
    Stride(u64),
    #[error("working set [{base:#x}, +{size:#x}) must lie in [{min:#x}, {mem:#x}) of guest RAM")]
    WorkingSet {
        base: u64,
        size: u64,
        min: u64,
        mem: u64,
    },
    #[error("working set has {0} slots; 1..={MAX_SLOTS} supported")]
    Slots(u64),
    #[error("guest RAM of {0:#x} bytes is above the {MAX_MEM:#x} bytes the built-in guest's page tables cover")]
    Mem(u64),
    #[error("guest RAM of {0:#x} bytes is not a non-zero multiple of 2 MiB (the built-in guest maps it in 2 MiB pages)")]
    MemNotWhole(u64),
    #[error("passes must be at least 1")]
    Passes,
    #[error("assembler: {0}")]
    Asm(String),
}

impl Params {
    /// Number of 8-byte slots a pass visits.
    pub fn nslots(&self) -> u64 {
        self.ws_size / self.stride.max(1)
    }

    /// Check against guest RAM of `mem` bytes.
    pub fn validate(&self, mem: u64) -> Result<(), BuiltinError> {
        check_mem(mem)?;
        if self.stride == 0 || !self.stride.is_multiple_of(8) {
            return Err(BuiltinError::Stride(self.stride));
        }
        let end = self.ws_base.checked_add(self.ws_size);
        if self.ws_base < LAYOUT.ws_min || end.is_none_or(|e| e > mem) {
            return Err(BuiltinError::WorkingSet {
                base: self.ws_base,
                size: self.ws_size,
                min: LAYOUT.ws_min,
                mem,
            });
        }
        let n = self.nslots();
        if n == 0 || n > MAX_SLOTS {
            return Err(BuiltinError::Slots(n));
        }
        if self.passes == 0 {
            return Err(BuiltinError::Passes);
        }
        Ok(())
    }

    /// The params page contents (little-endian u64s).
    pub fn to_page(&self) -> [u64; 7] {
        [
            PARAMS_MAGIC,
            self.ws_base,
            self.ws_size,
            self.stride,
            self.passes,
            match self.pattern {
                Pattern::Sequential => 0,
                Pattern::Lcg => 1,
            },
            self.seed,
        ]
    }
}

/// The result page as the guest leaves it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct GuestResult {
    pub checksum: u64,
    pub touches: u64,
    pub passes_done: u64,
    pub done: bool,
}

impl GuestResult {
    /// Decode the first 4 u64s of the result page.
    pub fn from_words(w: [u64; 4]) -> Self {
        GuestResult {
            checksum: w[0],
            touches: w[1],
            passes_done: w[2],
            done: w[3] == DONE_MAGIC,
        }
    }
}

/// A working-set range `[start, end)` (gpa) that reads as zero from pass
/// `before_pass` on (discarded or hole-punched before that pass).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Zeroed {
    pub before_pass: u64,
    pub start: u64,
    pub end: u64,
}

/// What the guest computes, in Rust: checksum and touch count.
/// The index of the first slot whose address (`ws_base + i * stride`) is
/// at or after `addr`.
fn slot_at_or_after(p: &Params, addr: u64) -> u64 {
    match addr.checked_sub(p.ws_base) {
        None | Some(0) => 0,
        Some(off) => off.div_ceil(p.stride.max(1)),
    }
}

pub fn expected(p: &Params, zeroed: &[Zeroed]) -> Result<(u64, u64), BuiltinError> {
    let n = p.nslots();
    if n == 0 || n > MAX_SLOTS {
        return Err(BuiltinError::Slots(n));
    }
    let mut slots = vec![0u64; u64_to_usize(n)];
    let mut sum = 0u64;
    let mut x = p.seed;
    let mut touches = 0u64;
    for pass in 0..p.passes {
        for z in zeroed.iter().filter(|z| z.before_pass == pass) {
            // The slots whose address is in [start, end): indices, not a
            // scan of every slot per range (the ranges come from the run).
            let first = slot_at_or_after(p, z.start).min(n);
            let end = slot_at_or_after(p, z.end).min(n);
            if let Some(s) = slots.get_mut(u64_to_usize(first)..u64_to_usize(end.max(first))) {
                s.fill(0);
            }
        }
        let mix = (pass + 1).wrapping_mul(PASS_K);
        for i in 0..n {
            let idx = match p.pattern {
                Pattern::Sequential => i,
                Pattern::Lcg => {
                    x = x.wrapping_mul(LCG_A).wrapping_add(LCG_C);
                    ((x as u128 * n as u128) >> 64) as u64
                }
            };
            let addr = p.ws_base + idx * p.stride;
            let old = slots[u64_to_usize(idx)];
            sum = sum.rotate_left(7) ^ old;
            let new = addr ^ mix;
            slots[u64_to_usize(idx)] = new;
            sum = sum.wrapping_add(new);
            touches += 1;
        }
    }
    Ok((sum, touches))
}

/// Assemble the program for [`LAYOUT`] (position: `LAYOUT.code`).
pub fn program() -> Result<Vec<u8>, BuiltinError> {
    assemble().map_err(|e| BuiltinError::Asm(e.to_string()))
}

fn assemble() -> Result<Vec<u8>, IcedError> {
    let l = LAYOUT;
    let mut a = CodeAssembler::new(64)?;
    let mut pass_loop = a.create_label();
    let mut slot_loop = a.create_label();
    let mut seq = a.create_label();
    let mut have_idx = a.create_label();
    let mut pass_end = a.create_label();
    let mut done = a.create_label();
    let mut spin = a.create_label();

    a.mov(rsi, l.params)?;
    a.mov(r8, qword_ptr(rsi + 8))?; // ws_base
    a.mov(r9, qword_ptr(rsi + 16))?; // ws_size
    a.mov(r10, qword_ptr(rsi + 24))?; // stride
    a.mov(r11, qword_ptr(rsi + 32))?; // passes
    a.mov(r12, qword_ptr(rsi + 40))?; // pattern
    a.mov(rbx, qword_ptr(rsi + 48))?; // lcg state = seed
    a.xor(r13, r13)?; // checksum
    a.xor(r14, r14)?; // pass
    a.xor(rbp, rbp)?; // touches
    a.mov(rax, r9)?;
    a.xor(edx, edx)?;
    a.div(r10)?;
    a.mov(r15, rax)?; // nslots

    a.set_label(&mut pass_loop)?;
    a.cmp(r14, r11)?;
    a.jae(done)?;
    a.lea(rax, qword_ptr(r14 + 1))?;
    a.mov(rsi, PASS_K)?;
    a.imul_2(rsi, rax)?; // passmix
    a.xor(ecx, ecx)?; // i

    a.set_label(&mut slot_loop)?;
    a.cmp(rcx, r15)?;
    a.jae(pass_end)?;
    a.test(r12, r12)?;
    a.jz(seq)?;
    a.mov(rdi, LCG_A)?;
    a.imul_2(rbx, rdi)?;
    a.mov(rdi, LCG_C)?;
    a.add(rbx, rdi)?;
    a.mov(rax, rbx)?;
    a.mul(r15)?; // rdx = (x * n) >> 64
    a.jmp(have_idx)?;
    a.set_label(&mut seq)?;
    a.mov(rdx, rcx)?;
    a.set_label(&mut have_idx)?;
    a.mov(rax, rdx)?;
    a.mul(r10)?; // rax = idx * stride
    a.lea(rdi, qword_ptr(rax + r8))?; // addr
    a.mov(rax, qword_ptr(rdi))?; // old
    a.rol(r13, 7)?;
    a.xor(r13, rax)?;
    a.mov(rax, rdi)?;
    a.xor(rax, rsi)?;
    a.mov(qword_ptr(rdi), rax)?;
    a.mov(rax, qword_ptr(rdi))?; // read back
    a.add(r13, rax)?;
    a.inc(rbp)?;
    a.inc(rcx)?;
    a.jmp(slot_loop)?;

    a.set_label(&mut pass_end)?;
    a.inc(r14)?;
    a.mov(rdi, l.result)?;
    a.mov(qword_ptr(rdi), r13)?;
    a.mov(qword_ptr(rdi + 8), rbp)?;
    a.mov(qword_ptr(rdi + 16), r14)?;
    a.mov(rdx, l.progress_mmio)?;
    a.mov(dword_ptr(rdx), r14d)?;
    a.jmp(pass_loop)?;

    a.set_label(&mut done)?;
    a.mov(rdi, l.result)?;
    a.mov(rax, DONE_MAGIC)?;
    a.mov(qword_ptr(rdi + 24), rax)?;
    a.mov(rdx, l.done_mmio)?;
    a.mov(dword_ptr(rdx), r14d)?;
    a.set_label(&mut spin)?;
    a.pause()?;
    a.jmp(spin)?;

    a.assemble(l.code)
}

/// The first 2 MiB of guest RAM for `mem` bytes of RAM running `params`:
/// GDT, TSS, params page, identity page tables (2 MiB leaves, P|RW|U/S),
/// the program.
pub fn system_image(params: &Params, mem: u64) -> Result<Vec<u8>, BuiltinError> {
    params.validate(mem)?;
    system_image_with(&params.to_page(), &program()?, mem)
}

/// The system page any CPL3 built-in guest runs from: GDT, TSS, the
/// `params` words at [`Layout::params`], identity page tables (2 MiB
/// leaves, P|RW|U/S, covering `mem` and at least the first 4 GiB with the
/// doorbells), and `code` at [`Layout::code`]. `mem` must be checked by the
/// caller (a multiple of 2 MiB, at most [`MAX_MEM`]).
pub fn system_image_with(params: &[u64], code: &[u8], mem: u64) -> Result<Vec<u8>, BuiltinError> {
    check_mem(mem)?;
    let l = LAYOUT;
    if (params.len() as u64) * 8 > l.result - l.params || l.code + code.len() as u64 > l.stack_top {
        return Err(BuiltinError::Asm(
            "program or params do not fit the system page".into(),
        ));
    }
    let mut img = vec![0u8; u64_to_usize(SYSTEM_SIZE)];
    let put = |img: &mut [u8], gpa: u64, v: u64| {
        let o = u64_to_usize(gpa);
        img[o..o + 8].copy_from_slice(&v.to_le_bytes());
    };
    for (i, e) in gdt().iter().enumerate() {
        put(&mut img, l.gdt + i as u64 * 8, *e);
    }
    // TSS: rsp0; I/O map base beyond the limit (no bitmap).
    put(&mut img, l.tss + 4, l.stack_top);
    let iopb = u16::try_from(TSS_LIMIT + 1).map_err(|_| {
        BuiltinError::Asm("the TSS limit does not fit the 16-bit I/O map base".into())
    })?;
    let tss = u64_to_usize(l.tss);
    img[tss + 0x66..tss + 0x68].copy_from_slice(&iopb.to_le_bytes());
    for (i, w) in params.iter().enumerate() {
        put(&mut img, l.params + i as u64 * 8, *w);
    }
    const P_RW_US: u64 = 0x7;
    let pdpt = l.pml4 + 0x1000;
    let pd0 = pdpt + 0x1000;
    put(&mut img, l.pml4, pdpt | P_RW_US);
    let gib = mem.div_ceil(1 << 30).max(4);
    for g in 0..gib {
        put(&mut img, pdpt + g * 8, (pd0 + g * 0x1000) | P_RW_US);
    }
    for i in 0..gib * 512 {
        put(&mut img, pd0 + i * 8, (i * SYSTEM_SIZE) | P_RW_US | 0x80);
    }
    let o = u64_to_usize(l.code);
    img[o..o + code.len()].copy_from_slice(code);
    Ok(img)
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions, Mnemonic, OpKind, Register};

    /// The slots a zeroed range covers, by index, are the slots whose
    /// address is inside it (the scan the model did before, once per slot
    /// per range).
    #[test]
    fn zeroed_ranges_cover_the_slots_inside_them() {
        let p = Params {
            ws_base: 2 << 20,
            ws_size: 1 << 20,
            stride: 24,
            passes: 1,
            pattern: Pattern::Sequential,
            seed: 1,
        };
        let n = p.ws_size / p.stride;
        for (start, end) in [
            (0, 1),
            (p.ws_base, p.ws_base + 1),
            (p.ws_base + 1, p.ws_base + 24),
            (p.ws_base + 23, p.ws_base + 49),
            (p.ws_base + 4096, p.ws_base + 8192),
            (p.ws_base + p.ws_size - 5, u64::MAX),
            (5, 3),
        ] {
            let first = slot_at_or_after(&p, start).min(n);
            let last = slot_at_or_after(&p, end).min(n).max(first);
            let want: Vec<u64> = (0..n)
                .filter(|i| {
                    let a = p.ws_base + i * p.stride;
                    a >= start && a < end
                })
                .collect();
            assert_eq!(
                (first..last).collect::<Vec<_>>(),
                want,
                "[{start:#x}, {end:#x})"
            );
        }
    }

    fn params() -> Params {
        Params {
            ws_base: 2 << 20,
            ws_size: 4 << 20,
            stride: 4096,
            passes: 3,
            pattern: Pattern::Lcg,
            seed: 42,
        }
    }

    #[test]
    fn program_decodes_back_with_doorbells() {
        let code = program().unwrap();
        let mut d = Decoder::with_ip(64, &code, LAYOUT.code, DecoderOptions::NONE);
        let ins: Vec<_> = d.iter().collect();
        assert!(ins.iter().all(|i| !i.is_invalid()));
        assert_eq!(ins.len(), 61, "instruction count changed");
        // Doorbells: `mov rdx, imm64` then a 4-byte store through rdx.
        let bells: Vec<u64> = ins
            .windows(2)
            .filter(|w| {
                w[1].mnemonic() == Mnemonic::Mov
                    && w[1].op0_kind() == OpKind::Memory
                    && w[1].memory_base() == Register::RDX
            })
            .map(|w| {
                assert_eq!(w[0].op0_register(), Register::RDX);
                assert_eq!(w[0].op1_kind(), OpKind::Immediate64);
                assert_eq!(w[1].op1_register(), Register::R14D);
                w[0].immediate64()
            })
            .collect();
        assert_eq!(bells, vec![LAYOUT.progress_mmio, LAYOUT.done_mmio]);
        assert!(ins.iter().all(|i| i.mnemonic() != Mnemonic::Out));
        // No privileged instruction: it must run at CPL3.
        assert!(ins
            .iter()
            .all(|i| !matches!(i.mnemonic(), Mnemonic::Hlt | Mnemonic::Cli | Mnemonic::Sti)));
    }

    #[test]
    fn model_deterministic_and_sensitive() {
        let p = params();
        let (a, t) = expected(&p, &[]).unwrap();
        assert_eq!(t, 3 * 1024);
        assert_eq!(expected(&p, &[]).unwrap().0, a);
        let z = Zeroed {
            before_pass: 1,
            start: 2 << 20,
            end: 4 << 20,
        };
        assert_ne!(expected(&p, &[z]).unwrap().0, a);
        // Zeroing before pass 0 changes nothing: RAM starts zeroed.
        let z0 = Zeroed {
            before_pass: 0,
            ..z
        };
        assert_eq!(expected(&p, &[z0]).unwrap().0, a);
        let s = Params {
            pattern: Pattern::Sequential,
            ..p
        };
        assert_ne!(expected(&s, &[]).unwrap().0, a);
    }

    #[test]
    fn sequential_model_by_hand() {
        let p = Params {
            ws_base: 2 << 20,
            ws_size: 16,
            stride: 8,
            passes: 1,
            pattern: Pattern::Sequential,
            seed: 0,
        };
        let (v0, v1) = ((2u64 << 20) ^ PASS_K, ((2u64 << 20) + 8) ^ PASS_K);
        let sum = v0.rotate_left(7).wrapping_add(v1);
        assert_eq!(expected(&p, &[]).unwrap(), (sum, 2));
    }

    #[test]
    fn validation() {
        let mem = 64 << 20;
        assert!(params().validate(mem).is_ok());
        let bad = [
            Params {
                stride: 12,
                ..params()
            },
            Params {
                ws_base: 0,
                ..params()
            },
            Params {
                ws_size: mem,
                ..params()
            },
            Params {
                passes: 0,
                ..params()
            },
            Params {
                ws_size: 0,
                ..params()
            },
        ];
        for b in bad {
            assert!(b.validate(mem).is_err(), "{b:?}");
        }
        assert!(params().validate(3 << 20).is_err());
        assert!(params().validate(!0x1f_ffff).is_err());
    }

    #[test]
    fn image_has_user_page_tables_and_code() {
        let p = params();
        let img = system_image(&p, 1 << 30).unwrap();
        let rd = |gpa: u64| crate::linux::bytes::le64(&img, u64_to_usize(gpa)).unwrap();
        assert_eq!(rd(LAYOUT.pml4) & 7, 7);
        let pd0 = LAYOUT.pml4 + 0x2000;
        assert_eq!(rd(pd0 + 8), (2 << 20) | 0x87);
        assert_eq!(rd(pd0 + 511 * 8), (511 << 21) | 0x87);
        assert_eq!(rd(LAYOUT.params), PARAMS_MAGIC);
        assert_eq!(rd(LAYOUT.gdt + 4 * 8) >> 45 & 3, 3, "user CS DPL3");
        // The MMIO doorbells are mapped (user) too, though not RAM.
        let mmio = LAYOUT.progress_mmio;
        assert_eq!(rd(pd0 + (mmio >> 21) * 8), mmio | 0x87);
        let code = program().unwrap();
        let o = u64_to_usize(LAYOUT.code);
        assert_eq!(&img[o..o + code.len()], &code[..]);
    }
}
