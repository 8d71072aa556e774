//! The built-in "L1 hypervisor" guest: a CPL3 program (iced-x86's code
//! assembler, no guest kernel) that builds, in its own RAM, 4-level EPT
//! tables mapping an L2 guest-physical space onto its own gpas, hands the
//! EPTP to the VMM ("vmlaunch"), and then edits those tables on request.
//!
//! It runs from the same system page as [`crate::builtin`] (GDT, TSS,
//! identity page tables with U/S, params page, MMIO doorbells:
//! [`builtin::system_image_with`]); only the program and its params differ.
//!
//! What it does:
//! 1. **Build.** For every L2 page `i` (of [`L1hvConfig::page`]: 4 KiB,
//!    2 MiB or 1 GiB) selected by the density hash ([`L1hvParams::mapped0`]),
//!    it walks its EPT from the root (at [`L1hvParams::table_base`]),
//!    allocating missing tables from a bump pool, and writes the leaf:
//!    R|W|X, memtype WB, PS for large pages, target
//!    `data_base + perm(i) * page` (an odd-multiplier permutation of the
//!    data region: no two L2 pages share an L1 page).
//! 2. **vmlaunch.** An 8-byte store of the EPTP (root | WB | 4-level, no
//!    A/D) to [`EPTP_MMIO`]. There is no VMX here: the VMM answers by
//!    shadowing the tables and simulating L2's accesses itself.
//! 3. **Edit rounds.** After the doorbell returns it reads the control word
//!    at [`CTRL_GPA`] (the VMM wrote it during the exit): 0 = stop (done
//!    doorbell, spin); `g > 0` = generation `g`: rewrite the leaf of every
//!    originally mapped page in the edit window: unmapped if `(i + g) % 4 ==
//!    0`, else remapped to the target of window page `i + g` (rotated within
//!    the window, so targets stay distinct); then vmlaunch again.
//!
//! **Write tracking.** KVM write-protects the gfns of shadowed guest tables
//! and learns of each write from the write fault. The program needs no help
//! for that: its tables live in their own huge pages (the pool, from
//! [`L1hvParams::table_base`]), which the VMM can write-protect in the host
//! so each store traps (the VMM's `nested_run --write-track trap`). It can
//! also *announce* each EPT-entry store with an 8-byte store of the entry's
//! gpa to [`EPT_WRITE_MMIO`] ([`L1hvParams::announce`]), for a VMM that
//! does not trap; and a VMM that trusts neither compares the tracked gfns'
//! contents at each vmlaunch.
//!
//! [`L1hvParams`] has the same computation in Rust ([`L1hvParams::entry`],
//! [`L1hvParams::l1_gpa`]), so the VMM can check what the guest built.

use crate::builtin::{self, BuiltinError, LAYOUT, MAX_MEM, MMIO_BASE, SYSTEM_SIZE};
use iced_x86::code_asm::*;
use mmu::guest_walk::ept;
use notifier::convert::f64_to_u64_saturating;
use notifier::PageSize;
use thiserror::Error;

/// "vmlaunch": 8-byte store of the EPTP.
pub const EPTP_MMIO: u64 = MMIO_BASE + 0x10;
/// Announce of an EPT-entry store: 8-byte store of the entry's gpa.
pub const EPT_WRITE_MMIO: u64 = MMIO_BASE + 0x18;
/// The table pool ran out (4-byte store of 1): a bug in the params.
pub const ERROR_MMIO: u64 = MMIO_BASE + 0x20;
/// The control word: next generation to edit to, 0 = stop. The VMM writes
/// it while the guest is stopped in a vmlaunch exit.
pub const CTRL_GPA: u64 = LAYOUT.result;
/// Where the guest leaves the number of EPT table pages it allocated.
pub const TABLES_USED_GPA: u64 = LAYOUT.result + 8;

pub const L1HV_MAGIC: u64 = 0x4d52_4150_5648_314c; // "L1HVPARM"
/// Density hash: L2 page `i` is mapped iff `(i * MIX) >> 40 < density_q24`.
pub const MIX: u64 = 0x9e37_79b9_7f4a_7c15;
/// Target of L2 page `j`: data page `(j * PERM_A) & data_mask` (odd:
/// a permutation of the data region's pages).
pub const PERM_A: u64 = 0x5851_f42d_4c95_7f2d;
/// Most L2 pages a configuration may have (the VMM simulates every one).
pub const MAX_L2_PAGES: u64 = 1 << 20;

/// EPT entry bits the guest writes: the format `mmu::guest_walk` walks.
pub const EPT_RWX: u64 = ept::RWX;
/// [`EPT_RWX`] (7) as an address displacement.
const EPT_RWX_DISP: i32 = 7;
const _: () = assert!(EPT_RWX == 7 && EPT_RWX_DISP == 7);
pub const EPT_MT_WB: u64 = (ept::MT_WB as u64) << ept::MT_SHIFT;
pub const EPT_PS: u64 = ept::PS;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// Params page word indices.
mod w {
    pub const MAGIC: usize = 0;
    pub const NPAGES: usize = 1;
    pub const SHIFT: usize = 2;
    pub const THRESH: usize = 3;
    pub const DATA_BASE: usize = 4;
    pub const DATA_MASK: usize = 5;
    pub const TABLE_BASE: usize = 6;
    pub const TABLE_END: usize = 7;
    pub const LEAF_LEVEL: usize = 8;
    pub const LEAF_FLAGS: usize = 9;
    pub const W_LO: usize = 10;
    pub const W_HI: usize = 11;
    pub const ANNOUNCE: usize = 12;
    pub const N: usize = 13;
}

/// The shape of L2 as the VMM asks for it.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct L1hvConfig {
    /// L1 guest RAM (bytes).
    pub mem: u64,
    /// L2 guest-physical size (bytes, a multiple of `page`).
    pub l2_size: u64,
    pub page: PageSize,
    /// Fraction of L2 pages mapped, in (0, 1].
    pub density: f64,
    /// Fraction of L2 pages in the edit window (starting at a quarter of L2).
    pub edit_fraction: f64,
    /// Announce every EPT-entry store through [`EPT_WRITE_MMIO`].
    pub announce: bool,
}

#[derive(Debug, Clone, PartialEq, Error)]
pub enum L1hvError {
    #[error(transparent)]
    Builtin(#[from] BuiltinError),
    #[error("L2 size {l2_size:#x} must be a non-zero multiple of the {page} L2 page with at most {MAX_L2_PAGES} pages")]
    L2Size { l2_size: u64, page: PageSize },
    #[error("density {0} must be in (0, 1]")]
    Density(f64),
    #[error("edit fraction {0} must be in [0, 1]")]
    EditFraction(f64),
    #[error("L1 RAM {mem:#x} too small: tables end at {tables_end:#x}, the data region needs {need} {page} pages from {data_base:#x}")]
    TooSmall {
        mem: u64,
        tables_end: u64,
        data_base: u64,
        need: u64,
        page: PageSize,
    },
}

/// Everything the program reads from its params page, derived from an
/// [`L1hvConfig`], plus the Rust model of the tables it builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct L1hvParams {
    pub page: PageSize,
    /// L2 pages (of `page`).
    pub npages: u64,
    pub density_q24: u64,
    /// L1 gpa of the data region L2 maps onto, and its page count - 1
    /// (a power of two minus one).
    pub data_base: u64,
    pub data_mask: u64,
    /// The EPT table pool: root at `table_base`, bump-allocated after it.
    pub table_base: u64,
    pub table_end: u64,
    /// Edit window `[w_lo, w_hi)` in L2 pages.
    pub w_lo: u64,
    pub w_hi: u64,
    pub announce: bool,
}

fn align_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

impl L1hvConfig {
    /// Lay out L1 RAM: system page, table pool, data region.
    pub fn params(&self) -> Result<L1hvParams, L1hvError> {
        builtin::check_mem(self.mem)?;
        let page = self.page;
        let ps = page.bytes();
        let npages = self.l2_size / ps;
        if self.l2_size == 0 || !self.l2_size.is_multiple_of(ps) || npages > MAX_L2_PAGES {
            return Err(L1hvError::L2Size {
                l2_size: self.l2_size,
                page,
            });
        }
        if !(self.density > 0.0 && self.density <= 1.0) {
            return Err(L1hvError::Density(self.density));
        }
        if !(0.0..=1.0).contains(&self.edit_fraction) {
            return Err(L1hvError::EditFraction(self.edit_fraction));
        }
        // Worst-case table pages: root, PDPTs, PDs (below 1G leaves), PTs
        // (below 2M leaves).
        let l2 = self.l2_size;
        let mut tables = 1 + l2.div_ceil(1 << 39);
        if page.level() < 3 {
            tables += l2.div_ceil(1 << 30);
        }
        if page.level() < 2 {
            tables += l2.div_ceil(1 << 21);
        }
        let table_base = SYSTEM_SIZE;
        let table_end = table_base + tables * 4096;
        let data_base = align_up(table_end, ps.max(SYSTEM_SIZE));
        let avail = self.mem.saturating_sub(data_base) / ps;
        if avail < npages {
            return Err(L1hvError::TooSmall {
                mem: self.mem,
                tables_end: table_end,
                data_base,
                need: npages,
                page,
            });
        }
        // Largest power of two of pages that fits (>= npages >= 1).
        let data_pages = 1u64 << (63 - avail.leading_zeros());
        // density is in (0, 1] and edit_fraction in [0, 1] (checked
        // above), so both products are in range: nothing saturates.
        let density_q24 =
            f64_to_u64_saturating((self.density * (1u64 << 24) as f64).ceil()).min(1 << 24);
        let w_lo = npages / 4;
        let w_len = f64_to_u64_saturating((npages as f64 * self.edit_fraction).ceil());
        let w_hi = (w_lo + w_len).min(npages);
        Ok(L1hvParams {
            page,
            npages,
            density_q24,
            data_base,
            data_mask: data_pages - 1,
            table_base,
            table_end,
            w_lo,
            w_hi,
            announce: self.announce,
        })
    }
}

impl L1hvParams {
    /// The params page.
    pub fn to_page(&self) -> [u64; w::N] {
        let mut p = [0u64; w::N];
        p[w::MAGIC] = L1HV_MAGIC;
        p[w::NPAGES] = self.npages;
        p[w::SHIFT] = self.page.shift() as u64;
        p[w::THRESH] = self.density_q24;
        p[w::DATA_BASE] = self.data_base;
        p[w::DATA_MASK] = self.data_mask;
        p[w::TABLE_BASE] = self.table_base;
        p[w::TABLE_END] = self.table_end;
        p[w::LEAF_LEVEL] = self.page.level() as u64;
        p[w::LEAF_FLAGS] = self.leaf_flags();
        p[w::W_LO] = self.w_lo;
        p[w::W_HI] = self.w_hi;
        p[w::ANNOUNCE] = self.announce as u64;
        p
    }

    pub fn leaf_flags(&self) -> u64 {
        EPT_RWX | EPT_MT_WB | if self.page.level() > 1 { EPT_PS } else { 0 }
    }

    /// The EPTP the guest rings with.
    pub fn eptp(&self) -> u64 {
        self.table_base | 6 | (3 << 3)
    }

    /// Is L2 page `i` mapped by the initial build?
    pub fn mapped0(&self, i: u64) -> bool {
        i < self.npages && (i.wrapping_mul(MIX) >> 40) < self.density_q24
    }

    pub fn in_window(&self, i: u64) -> bool {
        (self.w_lo..self.w_hi).contains(&i)
    }

    /// The leaf entry of L2 page `i` after edit generation `gen`
    /// (0 = as built).
    pub fn entry(&self, i: u64, gen: u64) -> u64 {
        if !self.mapped0(i) {
            return 0;
        }
        let mut j = i;
        if gen > 0 && self.in_window(i) {
            if (i + gen) & 3 == 0 {
                return 0;
            }
            j = self.w_lo + (i - self.w_lo + gen) % (self.w_hi - self.w_lo);
        }
        let idx = j.wrapping_mul(PERM_A) & self.data_mask;
        (self.data_base + (idx << self.page.shift())) | self.leaf_flags()
    }

    /// The L1 gpa the L2 gpa maps to after generation `gen`, if mapped.
    pub fn l1_gpa(&self, l2_gpa: u64, gen: u64) -> Option<u64> {
        let shift = self.page.shift();
        let e = self.entry(l2_gpa >> shift, gen);
        (e != 0).then(|| (e & ADDR_MASK) + (l2_gpa & (self.page.bytes() - 1)))
    }

    /// L2 pages mapped after generation `gen`.
    pub fn mapped_pages(&self, gen: u64) -> u64 {
        (0..self.npages)
            .filter(|&i| self.entry(i, gen) != 0)
            .count() as u64
    }

    /// The L1 gpa range the data region spans.
    pub fn data_range(&self) -> (u64, u64) {
        (
            self.data_base,
            self.data_base + ((self.data_mask + 1) << self.page.shift()),
        )
    }
}

/// The system page for `params` on `mem` bytes of L1 RAM.
pub fn system_image(params: &L1hvParams, mem: u64) -> Result<Vec<u8>, L1hvError> {
    if mem > MAX_MEM {
        return Err(BuiltinError::Mem(mem).into());
    }
    Ok(builtin::system_image_with(
        &params.to_page(),
        &program()?,
        mem,
    )?)
}

/// Assemble the program for [`LAYOUT`] (position: `LAYOUT.code`).
pub fn program() -> Result<Vec<u8>, BuiltinError> {
    assemble().map_err(|e| BuiltinError::Asm(e.to_string()))
}

/// Params word `i` as a memory operand (base register `rsi` = params).
fn pw(i: usize) -> AsmMemoryOperand {
    qword_ptr(rsi + word_disp(i))
}

/// Byte offset of params word `i` as a displacement.
fn word_disp(i: usize) -> i32 {
    // i < w::N (13): at most 96.
    i32::try_from(i * 8).expect("a params word index is below w::N")
}

/// `jae skip` unless L2 page `rbx` is in the initial build (clobbers rax).
fn skip_unless_mapped0(a: &mut CodeAssembler, skip: CodeLabel) -> Result<(), IcedError> {
    a.mov(rax, MIX)?;
    a.imul_2(rax, rbx)?;
    a.shr(rax, 40)?;
    a.cmp(rax, r10)?;
    a.jae(skip)
}

/// Write the leaf of L2 page `rbx` (rdi = its entry's gpa afterwards).
fn write_leaf(
    a: &mut CodeAssembler,
    leaf_slot: CodeLabel,
    leaf_value: CodeLabel,
) -> Result<(), IcedError> {
    a.mov(rdi, rbx)?;
    a.mov(rcx, r9)?;
    a.shl(rdi, cl)?;
    a.call(leaf_slot)?;
    a.mov(rdi, rax)?;
    a.call(leaf_value)?;
    a.mov(qword_ptr(rdi), rax)
}

/// Registers: rbx = L2 page i, r8 = npages, r9 = shift, r10 = density
/// threshold, r11 = data_base, r12 = root, r13 = next free table, r14 =
/// table pool end, r15 = generation, rbp = leaf flags; rax, rcx, rdx, rsi,
/// rdi scratch.
fn assemble() -> Result<Vec<u8>, IcedError> {
    let params = LAYOUT.params;
    let mut a = CodeAssembler::new(64)?;
    let mut leaf_slot = a.create_label();
    let mut leaf_value = a.create_label();
    let mut build_loop = a.create_label();
    let mut build_next = a.create_label();
    let mut build_done = a.create_label();
    let mut launch = a.create_label();
    let mut edit_loop = a.create_label();
    let mut edit_next = a.create_label();
    let mut finish = a.create_label();
    let mut spin = a.create_label();

    a.mov(rsi, params)?;
    a.mov(r8, pw(w::NPAGES))?;
    a.mov(r9, pw(w::SHIFT))?;
    a.mov(r10, pw(w::THRESH))?;
    a.mov(r11, pw(w::DATA_BASE))?;
    a.mov(r12, pw(w::TABLE_BASE))?;
    a.mov(r14, pw(w::TABLE_END))?;
    a.mov(rbp, pw(w::LEAF_FLAGS))?;
    a.lea(r13, qword_ptr(r12 + 4096))?;
    a.xor(r15d, r15d)?;
    a.xor(ebx, ebx)?;

    // 1. Build every initially mapped leaf.
    a.set_label(&mut build_loop)?;
    a.cmp(rbx, r8)?;
    a.jae(build_done)?;
    skip_unless_mapped0(&mut a, build_next)?;
    write_leaf(&mut a, leaf_slot, leaf_value)?;
    a.set_label(&mut build_next)?;
    a.inc(rbx)?;
    a.jmp(build_loop)?;

    a.set_label(&mut build_done)?;
    a.mov(rax, r13)?;
    a.sub(rax, r12)?;
    a.shr(rax, 12)?;
    a.mov(rdx, TABLES_USED_GPA)?;
    a.mov(qword_ptr(rdx), rax)?;

    // 2. vmlaunch: the EPTP (root | WB | 4-level walk).
    a.set_label(&mut launch)?;
    a.mov(rax, r12)?;
    a.or(rax, 0x1e)?;
    a.mov(rdx, EPTP_MMIO)?;
    a.mov(qword_ptr(rdx), rax)?;
    // 3. The VMM left the next generation in the control word.
    a.mov(rdx, CTRL_GPA)?;
    a.mov(r15, qword_ptr(rdx))?;
    a.test(r15, r15)?;
    a.jz(finish)?;
    a.mov(rsi, params)?;
    a.mov(rbx, pw(w::W_LO))?;
    a.set_label(&mut edit_loop)?;
    a.mov(rsi, params)?;
    a.cmp(rbx, pw(w::W_HI))?;
    a.jae(launch)?;
    a.cmp(rbx, r8)?;
    a.jae(launch)?;
    skip_unless_mapped0(&mut a, edit_next)?;
    write_leaf(&mut a, leaf_slot, leaf_value)?;
    a.mov(rsi, params)?;
    a.cmp(pw(w::ANNOUNCE), 0)?;
    a.je(edit_next)?;
    a.mov(rdx, EPT_WRITE_MMIO)?;
    a.mov(qword_ptr(rdx), rdi)?;
    a.set_label(&mut edit_next)?;
    a.inc(rbx)?;
    a.jmp(edit_loop)?;

    a.set_label(&mut finish)?;
    a.mov(rdx, LAYOUT.done_mmio)?;
    a.mov(dword_ptr(rdx), r15d)?;
    a.set_label(&mut spin)?;
    a.pause()?;
    a.jmp(spin)?;

    // leaf_slot(rdi = L2 gpa) -> rax = gpa of its leaf entry, allocating
    // missing tables (R|W|X non-leaf entries). Clobbers rcx, rdx, rsi.
    let mut ls_loop = a.create_label();
    let mut ls_have = a.create_label();
    let mut ls_ret = a.create_label();
    let mut ls_full = a.create_label();
    a.set_label(&mut leaf_slot)?;
    a.mov(rdx, r12)?;
    a.mov(esi, 4)?;
    a.set_label(&mut ls_loop)?;
    a.lea(rcx, qword_ptr(rsi + rsi * 8 + 3))?; // 12 + 9 * (level - 1)
    a.mov(rax, rdi)?;
    a.shr(rax, cl)?;
    a.and(eax, 511)?;
    a.lea(rax, qword_ptr(rdx + rax * 8))?;
    a.mov(rcx, params)?;
    a.cmp(rsi, qword_ptr(rcx + word_disp(w::LEAF_LEVEL)))?;
    a.je(ls_ret)?;
    a.mov(rcx, qword_ptr(rax))?;
    a.test(rcx, rcx)?;
    a.jnz(ls_have)?;
    a.cmp(r13, r14)?;
    a.jae(ls_full)?;
    a.lea(rcx, qword_ptr(r13 + EPT_RWX_DISP))?;
    a.mov(qword_ptr(rax), rcx)?;
    a.add(r13, 4096)?;
    a.set_label(&mut ls_have)?;
    a.mov(rdx, ADDR_MASK)?;
    a.and(rdx, rcx)?;
    a.dec(rsi)?;
    a.jmp(ls_loop)?;
    a.set_label(&mut ls_ret)?;
    a.ret()?;
    a.set_label(&mut ls_full)?;
    a.mov(rdx, ERROR_MMIO)?;
    a.mov(dword_ptr(rdx), 1)?;
    a.jmp(spin)?;

    // leaf_value(rbx = i, r15 = gen) -> rax = the leaf entry
    // (L1hvParams::entry for a mapped0 page). Clobbers rcx, rdx, rsi.
    let mut lv_rot = a.create_label();
    let mut lv_map = a.create_label();
    a.set_label(&mut leaf_value)?;
    a.mov(rsi, params)?;
    a.mov(rax, rbx)?; // j = i
    a.test(r15, r15)?;
    a.jz(lv_map)?;
    a.cmp(rbx, pw(w::W_LO))?;
    a.jb(lv_map)?;
    a.cmp(rbx, pw(w::W_HI))?;
    a.jae(lv_map)?;
    a.lea(rax, qword_ptr(rbx + r15))?;
    a.test(al, 3)?;
    a.jnz(lv_rot)?;
    a.xor(eax, eax)?;
    a.ret()?;
    a.set_label(&mut lv_rot)?;
    // j = w_lo + (i - w_lo + gen) % (w_hi - w_lo)
    a.mov(rax, rbx)?;
    a.sub(rax, pw(w::W_LO))?;
    a.add(rax, r15)?;
    a.mov(rcx, pw(w::W_HI))?;
    a.sub(rcx, pw(w::W_LO))?;
    a.xor(edx, edx)?;
    a.div(rcx)?;
    a.mov(rax, rdx)?;
    a.add(rax, pw(w::W_LO))?;
    a.set_label(&mut lv_map)?;
    // data_base + ((j * PERM_A) & data_mask) << shift | flags
    a.mov(rdx, PERM_A)?;
    a.imul_2(rax, rdx)?;
    a.and(rax, pw(w::DATA_MASK))?;
    a.mov(rcx, r9)?;
    a.shl(rax, cl)?;
    a.add(rax, r11)?;
    a.or(rax, rbp)?;
    a.ret()?;

    a.assemble(LAYOUT.code)
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions, Mnemonic, OpKind, Register};
    use notifier::convert::u64_to_usize;

    fn cfg() -> L1hvConfig {
        L1hvConfig {
            mem: 1 << 30,
            l2_size: 256 << 20,
            page: PageSize::Size4K,
            density: 0.5,
            edit_fraction: 0.25,
            announce: true,
        }
    }

    #[test]
    fn program_decodes_with_doorbells_and_no_privileged_instructions() {
        let code = program().unwrap();
        let mut d = Decoder::with_ip(64, &code, LAYOUT.code, DecoderOptions::NONE);
        let ins: Vec<_> = d.iter().collect();
        assert!(ins.iter().all(|i| !i.is_invalid()));
        let bells: Vec<u64> = ins
            .windows(2)
            .filter(|w| {
                w[1].mnemonic() == Mnemonic::Mov
                    && w[1].op0_kind() == OpKind::Memory
                    && w[1].memory_base() == Register::RDX
                    && w[0].op0_register() == Register::RDX
                    && w[0].op1_kind() == OpKind::Immediate64
            })
            .map(|w| w[0].immediate64())
            .collect();
        for b in [EPTP_MMIO, EPT_WRITE_MMIO, ERROR_MMIO, LAYOUT.done_mmio] {
            assert!(bells.contains(&b), "doorbell {b:#x} missing: {bells:x?}");
        }
        assert!(ins.iter().all(|i| !matches!(
            i.mnemonic(),
            Mnemonic::Out | Mnemonic::In | Mnemonic::Hlt | Mnemonic::Cli | Mnemonic::Sti
        )));
    }

    #[test]
    fn layout_fits_and_model_is_a_partial_permutation() {
        let p = cfg().params().unwrap();
        assert_eq!(p.npages, 65536);
        assert!(p.table_end <= p.data_base);
        // 1 + 1 + 1 + 128 table pages at most.
        assert_eq!((p.table_end - p.table_base) / 4096, 131);
        assert!(p.data_range().1 <= 1 << 30);
        for gen in 0..4 {
            let mut seen = std::collections::HashSet::new();
            for i in 0..p.npages {
                let e = p.entry(i, gen);
                if e != 0 {
                    assert_eq!(e & 0xfff, EPT_RWX | EPT_MT_WB);
                    let t = e & ADDR_MASK;
                    assert!(t >= p.data_range().0 && t < p.data_range().1);
                    assert!(seen.insert(t), "L1 page {t:#x} mapped twice");
                }
            }
        }
        let m0 = p.mapped_pages(0) as f64 / p.npages as f64;
        assert!((m0 - 0.5).abs() < 0.02, "{m0}");
        // Generation 1 unmaps about a quarter of the window, remaps the rest.
        let changed = (0..p.npages)
            .filter(|&i| p.entry(i, 0) != p.entry(i, 1))
            .count() as u64;
        assert!(changed > 0 && changed <= p.w_hi - p.w_lo);
        assert!((0..p.npages).all(|i| p.in_window(i) || p.entry(i, 0) == p.entry(i, 3)));
    }

    #[test]
    fn large_pages_and_errors() {
        let p = L1hvConfig {
            page: PageSize::Size2M,
            ..cfg()
        }
        .params()
        .unwrap();
        assert_eq!(p.npages, 128);
        assert_eq!(p.entry(0, 0) & EPT_PS, EPT_PS);
        assert_eq!(p.data_base % (2 << 20), 0);
        assert_eq!(
            p.l1_gpa(0x1234, 0),
            Some((p.entry(0, 0) & ADDR_MASK) + 0x1234)
        );
        // 1G L2 pages need 1G-aligned data: 1 GiB of L1 is too small.
        let big = L1hvConfig {
            page: PageSize::Size1G,
            l2_size: 1 << 30,
            ..cfg()
        };
        assert!(matches!(big.params(), Err(L1hvError::TooSmall { .. })));
        let ok = L1hvConfig {
            mem: 3 << 30,
            ..big
        }
        .params()
        .unwrap();
        assert_eq!(ok.data_base, 1 << 30);
        for bad in [
            L1hvConfig {
                density: 0.0,
                ..cfg()
            },
            L1hvConfig {
                l2_size: 4095,
                ..cfg()
            },
            L1hvConfig {
                l2_size: 8 << 30,
                ..cfg()
            },
            L1hvConfig {
                mem: 3 << 20,
                ..cfg()
            },
        ] {
            assert!(bad.params().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn image_carries_params_and_program() {
        let p = cfg().params().unwrap();
        let img = system_image(&p, 1 << 30).unwrap();
        let rd = |gpa: u64| crate::linux::bytes::le64(&img, u64_to_usize(gpa)).unwrap();
        assert_eq!(rd(LAYOUT.params), L1HV_MAGIC);
        assert_eq!(rd(LAYOUT.params + 8 * w::TABLE_BASE as u64), p.table_base);
        let code = program().unwrap();
        let o = u64_to_usize(LAYOUT.code);
        assert_eq!(&img[o..o + code.len()], &code[..]);
    }
}
