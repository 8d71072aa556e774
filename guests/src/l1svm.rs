//! The built-in populating guest of `vmm soft-lockup --plane kernel`: it
//! writes one 8-byte word in each of `pages` 4 KiB pages spread evenly over
//! a huge L1 RAM region (from [`DATA_GPA`]), so that the host KVM holds
//! real SPTEs and rmaps there before the host invalidates it. Two modes:
//!
//! - [`Mode::Direct`]: the L1 program touches the pages itself, at CPL3
//!   (the built-in guests' [`builtin::system_image_with`] system page),
//!   through a window of 4 KiB mappings at [`DIRECT_WINDOW`] (PML4 slot 1
//!   of its page tables). The host KVM maps them in its own MMU for the L1
//!   (shadow on this machine's PVM host, the TDP MMU on the emulated SVM
//!   host).
//! - [`Mode::Nested`]: a guest hypervisor. The L1 program runs at CPL0,
//!   sets `EFER.SVME`, points `VM_HSAVE_PA` at a page of its own and
//!   `VMRUN`s an L2 described by a VMCB with nested paging on: the L2 (32-bit
//!   protected mode, paging off, flat segments) writes the pages through
//!   its window at [`L2_WINDOW`], which the L1's NPT maps 4 KiB page by
//!   4 KiB page onto the spread-out L1 pages, then `VMMCALL`s. The host KVM
//!   then shadows the L1's NPT (nested TDP: shadow pages with rmaps by L1
//!   gfn, `kvm_init_shadow_npt_mmu()`), the case of the seed thread.
//!
//! Either way the program stores [`EXIT_VMMCALL`] to [`ROUND_MMIO`] after
//! each round over all pages (nested: the #VMEXIT code, whatever it is - a
//! fault in L2 arrives there as `0x40 + vector`, a bad VMCB as
//! [`EXIT_INVALID`]) and starts the next round when the VMM runs it again.
//!
//! The L1's tables and VMCB are written by the VMM into the system slot
//! ([`Touch::image`]) before the vCPU starts: who writes them does not
//! matter to the host KVM, which shadows whatever NPT is in L1 memory.
//! The VMCB layout is `struct vmcb` of Linux's `arch/x86/include/asm/svm.h`
//! (control area, then the save area at 0x400); the checks it must pass are
//! `nested_vmcb_check_controls()` and `nested_vmcb_check_save()` in
//! `arch/x86/kvm/svm/nested.c` (VMRUN intercepted, ASID non-zero, EFER.SVME
//! set in the L2's EFER, valid bitmap addresses, a valid G_PAT).

use crate::builtin::{self, BuiltinError, LAYOUT, MMIO_BASE, SYSTEM_SIZE};
use iced_x86::code_asm::*;
use notifier::convert::u64_to_usize;
use thiserror::Error;

/// Size of the system slot (gpa 0): the system page, then the VMCB and
/// friends, then the page-table pool.
pub const SYS_SLOT: u64 = 8 << 20;
/// Where the L1's big RAM starts: above the doorbells and the 32-bit gap.
pub const DATA_GPA: u64 = 4 << 30;
/// Most pages a configuration touches (the pool holds their tables).
pub const MAX_PAGES: u64 = 1 << 18;
/// End of round: an 8-byte store of the #VMEXIT code (direct mode stores
/// [`EXIT_VMMCALL`]).
pub const ROUND_MMIO: u64 = MMIO_BASE + 0x28;
/// #VMEXIT codes (`SVM_EXIT_*`, arch/x86/include/uapi/asm/svm.h).
pub const EXIT_VMMCALL: u64 = 0x81;
pub const EXIT_INVALID: u64 = u64::MAX;
/// Direct mode's window: PML4 slot 1 (512 GiB).
pub const DIRECT_WINDOW: u64 = 512 << 30;
/// The L2's window (L2 physical, below 4 GiB: the L2 runs without paging).
pub const L2_WINDOW: u64 = 1 << 30;
/// The L2's code (L2 physical).
pub const L2_CODE: u64 = 0x1000;

/// Pages of the system slot after the system page.
pub const VMCB: u64 = SYSTEM_SIZE;
pub const HSAVE: u64 = SYSTEM_SIZE + 0x1000;
/// The I/O permission map (3 pages) and the MSR permission map (2 pages):
/// zero (nothing intercepted through them); KVM checks their addresses.
pub const IOPM: u64 = SYSTEM_SIZE + 0x2000;
pub const MSRPM: u64 = SYSTEM_SIZE + 0x5000;
/// The L2 program's page (L1 physical).
pub const L2_CODE_PAGE: u64 = SYSTEM_SIZE + 0x7000;
/// The page-table pool.
pub const POOL: u64 = SYSTEM_SIZE + 0x8000;

/// VMCB offsets (`struct vmcb_control_area`, `struct vmcb_save_area` at
/// 0x400).
pub mod vmcb {
    pub const INTERCEPT_EXCEPTIONS: usize = 0x08;
    /// Intercept word 3: INTR 0 ... HLT 24 ... SHUTDOWN 31.
    pub const INTERCEPT_3: usize = 0x0c;
    /// Intercept word 4: VMRUN 0, VMMCALL 1.
    pub const INTERCEPT_4: usize = 0x10;
    pub const IOPM_BASE_PA: usize = 0x40;
    pub const MSRPM_BASE_PA: usize = 0x48;
    pub const ASID: usize = 0x58;
    pub const EXIT_CODE: usize = 0x70;
    pub const EXIT_INFO_1: usize = 0x78;
    pub const EXIT_INFO_2: usize = 0x80;
    pub const NESTED_CTL: usize = 0x90;
    pub const NESTED_CR3: usize = 0xb0;
    pub const SAVE: usize = 0x400;
    /// Segments in the save area, 16 bytes each: selector u16, attrib
    /// u16, limit u32, base u64.
    pub const ES: usize = SAVE;
    pub const CS: usize = SAVE + 0x10;
    pub const SS: usize = SAVE + 0x20;
    pub const DS: usize = SAVE + 0x30;
    pub const FS: usize = SAVE + 0x40;
    pub const GS: usize = SAVE + 0x50;
    pub const TR: usize = SAVE + 0x90;
    pub const EFER: usize = SAVE + 0xd0;
    pub const CR4: usize = SAVE + 0x148;
    pub const CR3: usize = SAVE + 0x150;
    pub const CR0: usize = SAVE + 0x158;
    pub const DR7: usize = SAVE + 0x160;
    pub const DR6: usize = SAVE + 0x168;
    pub const RFLAGS: usize = SAVE + 0x170;
    pub const RIP: usize = SAVE + 0x178;
    pub const RSP: usize = SAVE + 0x1d8;
    pub const G_PAT: usize = SAVE + 0x268;
}

const MSR_EFER: u32 = 0xc000_0080;
const MSR_VM_HSAVE_PA: u32 = 0xc001_0117;
const EFER_SVME: u64 = 1 << 12;
/// Page-table entries at every level: present, writable, user (NPT walks
/// are user accesses; direct mode runs at CPL3).
const P_RW_US: u64 = 0x7;
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// Who touches the pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Direct,
    Nested,
}

#[derive(Debug, Clone, PartialEq, Error)]
pub enum L1svmError {
    #[error("--density {density} of {pages} L1 pages touches {want} pages: 1..={MAX_PAGES} supported (1 to 1 GiB of written guest memory)")]
    Pages { density: f64, pages: u64, want: u64 },
    #[error("the page-table pool is full (a bug in the layout)")]
    Pool,
    #[error(transparent)]
    Builtin(#[from] BuiltinError),
    #[error("assembler: {0}")]
    Asm(String),
}

impl From<IcedError> for L1svmError {
    fn from(e: IcedError) -> Self {
        L1svmError::Asm(e.to_string())
    }
}

/// What the guest touches: page `i` of `pages` is L1 gpa
/// `DATA_GPA + i * stride`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Touch {
    pub mode: Mode,
    pub data_len: u64,
    pub pages: u64,
    pub stride: u64,
}

impl Touch {
    /// `density` of the `data_len` bytes' 4 KiB pages, evenly spread.
    pub fn new(mode: Mode, data_len: u64, density: f64) -> Result<Touch, L1svmError> {
        let total = data_len / 4096;
        let want = notifier::convert::f64_to_u64_saturating((total as f64 * density).round());
        if !(density > 0.0 && density <= 1.0) || want == 0 || want > MAX_PAGES.min(total) {
            return Err(L1svmError::Pages {
                density,
                pages: total,
                want,
            });
        }
        let stride = (data_len / want) & !0xfff;
        Ok(Touch {
            mode,
            data_len,
            pages: want,
            stride,
        })
    }

    /// The L1 gpa of page `i`.
    pub fn target(&self, i: u64) -> u64 {
        DATA_GPA + i * self.stride
    }

    /// The window address (L1 virtual or L2 physical) of page `i`.
    pub fn window(&self, i: u64) -> u64 {
        match self.mode {
            Mode::Direct => DIRECT_WINDOW + i * 4096,
            Mode::Nested => L2_WINDOW + i * 4096,
        }
    }

    /// The system slot's contents ([`SYS_SLOT`] bytes at gpa 0).
    pub fn image(&self) -> Result<Vec<u8>, L1svmError> {
        let code = match self.mode {
            Mode::Direct => direct_program(self.pages)?,
            Mode::Nested => l1_program()?,
        };
        let mut img = builtin::system_image_with(&[], &code, SYS_SLOT)?;
        img.resize(u64_to_usize(SYS_SLOT), 0);
        let mut pool = Pool {
            img: &mut img,
            next: POOL,
        };
        let root = match self.mode {
            Mode::Direct => LAYOUT.pml4,
            Mode::Nested => {
                let root = pool.alloc()?;
                pool.map_4k(root, L2_CODE, L2_CODE_PAGE)?;
                root
            }
        };
        for i in 0..self.pages {
            pool.map_4k(root, self.window(i), self.target(i))?;
        }
        if self.mode == Mode::Nested {
            let l2 = l2_program(self.pages)?;
            let o = u64_to_usize(L2_CODE_PAGE);
            img.get_mut(o..o + l2.len())
                .ok_or(L1svmError::Pool)?
                .copy_from_slice(&l2);
            write_vmcb(&mut img, root);
        }
        Ok(img)
    }
}

/// Bump allocator of zeroed table pages in the system slot.
struct Pool<'a> {
    img: &'a mut Vec<u8>,
    next: u64,
}

impl Pool<'_> {
    fn alloc(&mut self) -> Result<u64, L1svmError> {
        let page = self.next;
        if page + 0x1000 > SYS_SLOT {
            return Err(L1svmError::Pool);
        }
        self.next += 0x1000;
        Ok(page)
    }

    fn entry(&self, gpa: u64) -> u64 {
        let o = u64_to_usize(gpa);
        let mut w = [0u8; 8];
        w.copy_from_slice(&self.img[o..o + 8]);
        u64::from_le_bytes(w)
    }

    fn set(&mut self, gpa: u64, v: u64) {
        let o = u64_to_usize(gpa);
        self.img[o..o + 8].copy_from_slice(&v.to_le_bytes());
    }

    /// Map 4 KiB page `va` to `pa` under the 4-level table at `root`
    /// (x86-64 format, which AMD's NPT shares), allocating tables.
    fn map_4k(&mut self, root: u64, va: u64, pa: u64) -> Result<(), L1svmError> {
        let mut table = root;
        for shift in [39u32, 30, 21] {
            let slot = table + ((va >> shift) & 0x1ff) * 8;
            let e = self.entry(slot);
            table = if e & 1 != 0 {
                e & ADDR_MASK
            } else {
                let t = self.alloc()?;
                self.set(slot, t | P_RW_US);
                t
            };
        }
        self.set(table + ((va >> 12) & 0x1ff) * 8, pa | P_RW_US);
        Ok(())
    }
}

fn put<const N: usize>(img: &mut [u8], at: usize, v: [u8; N]) {
    img[at..at + N].copy_from_slice(&v);
}

/// A flat 4 GiB segment in the VMCB's format (attrib = descriptor bits
/// 40-47 and 52-55).
fn seg(img: &mut [u8], at: usize, selector: u16, attrib: u16, limit: u32) {
    put(img, at, selector.to_le_bytes());
    put(img, at + 2, attrib.to_le_bytes());
    put(img, at + 4, limit.to_le_bytes());
    put(img, at + 8, 0u64.to_le_bytes());
}

/// The L2's VMCB: nested paging with `npt_root`, the L2 in 32-bit
/// protected mode at [`L2_CODE`].
fn write_vmcb(img: &mut [u8], npt_root: u64) {
    let b = u64_to_usize(VMCB);
    let at = |o: usize| b + o;
    // Every exception, HLT and SHUTDOWN exit to the L1 (so any L2 fault
    // reaches the VMM as an exit code); VMRUN (KVM requires it) and VMMCALL.
    put(img, at(vmcb::INTERCEPT_EXCEPTIONS), u32::MAX.to_le_bytes());
    put(
        img,
        at(vmcb::INTERCEPT_3),
        ((1u32 << 24) | (1 << 31)).to_le_bytes(),
    );
    put(img, at(vmcb::INTERCEPT_4), 0b11u32.to_le_bytes());
    put(img, at(vmcb::IOPM_BASE_PA), IOPM.to_le_bytes());
    put(img, at(vmcb::MSRPM_BASE_PA), MSRPM.to_le_bytes());
    put(img, at(vmcb::ASID), 1u32.to_le_bytes());
    put(img, at(vmcb::NESTED_CTL), 1u64.to_le_bytes());
    put(img, at(vmcb::NESTED_CR3), npt_root.to_le_bytes());
    const CODE32: u16 = 0xc9b; // P, S, type 0xb; D/B, G
    const DATA32: u16 = 0xc93; // P, S, type 0x3; D/B, G
    for s in [vmcb::ES, vmcb::SS, vmcb::DS, vmcb::FS, vmcb::GS] {
        seg(img, at(s), 0x10, DATA32, u32::MAX);
    }
    seg(img, at(vmcb::CS), 0x08, CODE32, u32::MAX);
    seg(img, at(vmcb::TR), 0x18, 0x8b, 0x67); // busy 32-bit TSS
    put(img, at(vmcb::EFER), EFER_SVME.to_le_bytes());
    put(img, at(vmcb::CR4), 0u64.to_le_bytes());
    put(img, at(vmcb::CR3), 0u64.to_le_bytes());
    put(img, at(vmcb::CR0), 0x11u64.to_le_bytes()); // PE, ET
    put(img, at(vmcb::DR7), 0x400u64.to_le_bytes());
    put(img, at(vmcb::DR6), 0xffff_0ff0u64.to_le_bytes());
    put(img, at(vmcb::RFLAGS), 2u64.to_le_bytes());
    put(img, at(vmcb::RIP), L2_CODE.to_le_bytes());
    put(img, at(vmcb::RSP), 0u64.to_le_bytes());
    put(img, at(vmcb::G_PAT), 0x0007_0406_0007_0406u64.to_le_bytes());
}

/// The guest hypervisor (64-bit, CPL0, at `LAYOUT.code`).
fn l1_program() -> Result<Vec<u8>, L1svmError> {
    let mut a = CodeAssembler::new(64)?;
    let mut top = a.create_label();
    a.mov(ecx, MSR_EFER)?;
    a.rdmsr()?;
    a.or(
        eax,
        i32::try_from(EFER_SVME).map_err(|e| L1svmError::Asm(e.to_string()))?,
    )?;
    a.wrmsr()?;
    a.mov(ecx, MSR_VM_HSAVE_PA)?;
    a.mov(
        eax,
        u32::try_from(HSAVE).map_err(|e| L1svmError::Asm(e.to_string()))?,
    )?;
    a.xor(edx, edx)?;
    a.wrmsr()?;
    a.set_label(&mut top)?;
    a.mov(rax, VMCB)?;
    a.mov(rbx, L2_CODE)?;
    a.mov(qword_ptr(rax + vmcb::RIP), rbx)?;
    a.vmrun()?;
    a.mov(rax, VMCB)?;
    a.mov(rbx, qword_ptr(rax + vmcb::EXIT_CODE))?;
    a.mov(rdx, ROUND_MMIO)?;
    a.mov(qword_ptr(rdx), rbx)?;
    a.jmp(top)?;
    Ok(a.assemble(LAYOUT.code)?)
}

fn count(pages: u64) -> Result<u32, L1svmError> {
    u32::try_from(pages).map_err(|e| L1svmError::Asm(e.to_string()))
}

/// The L2 (32-bit protected mode, paging off, at [`L2_CODE`]): one 4-byte
/// write per window page, then VMMCALL.
fn l2_program(pages: u64) -> Result<Vec<u8>, L1svmError> {
    let mut a = CodeAssembler::new(32)?;
    let mut top = a.create_label();
    let mut touch = a.create_label();
    a.set_label(&mut top)?;
    a.mov(
        esi,
        u32::try_from(L2_WINDOW).map_err(|e| L1svmError::Asm(e.to_string()))?,
    )?;
    a.mov(ecx, count(pages)?)?;
    a.set_label(&mut touch)?;
    a.mov(dword_ptr(esi), esi)?;
    a.add(esi, 4096)?;
    a.dec(ecx)?;
    a.jnz(touch)?;
    a.vmmcall()?;
    a.jmp(top)?;
    Ok(a.assemble(L2_CODE)?)
}

/// Direct mode (64-bit, CPL3, at `LAYOUT.code`): one 8-byte write per
/// window page, then the round doorbell.
fn direct_program(pages: u64) -> Result<Vec<u8>, L1svmError> {
    let mut a = CodeAssembler::new(64)?;
    let mut top = a.create_label();
    let mut touch = a.create_label();
    a.set_label(&mut top)?;
    a.mov(rsi, DIRECT_WINDOW)?;
    a.mov(ecx, count(pages)?)?;
    a.set_label(&mut touch)?;
    a.mov(qword_ptr(rsi), rsi)?;
    a.add(rsi, 4096)?;
    a.dec(rcx)?;
    a.jnz(touch)?;
    a.mov(rdx, ROUND_MMIO)?;
    a.mov(
        eax,
        u32::try_from(EXIT_VMMCALL).map_err(|e| L1svmError::Asm(e.to_string()))?,
    )?;
    a.mov(qword_ptr(rdx), rax)?;
    a.jmp(top)?;
    Ok(a.assemble(LAYOUT.code)?)
}

/// Walk the 4-level table at `root` in `img` for `va` (the tests' check,
/// and the VMM's when it reports what the guest mapped).
pub fn walk(img: &[u8], root: u64, va: u64) -> Option<u64> {
    let mut table = root;
    for shift in [39u32, 30, 21, 12] {
        let o = u64_to_usize(table + ((va >> shift) & 0x1ff) * 8);
        let mut w = [0u8; 8];
        w.copy_from_slice(img.get(o..o + 8)?);
        let e = u64::from_le_bytes(w);
        if e & P_RW_US != P_RW_US {
            return None;
        }
        table = e & ADDR_MASK;
    }
    Some(table | (va & 0xfff))
}

/// The VMCB word at `off` of a system slot image (the VMM reads the exit
/// info there after a round that did not end in VMMCALL).
pub fn vmcb_word(img: &[u8], off: usize) -> u64 {
    let o = u64_to_usize(VMCB) + off;
    img.get(o..o + 8)
        .map(|b| {
            let mut w = [0u8; 8];
            w.copy_from_slice(b);
            u64::from_le_bytes(w)
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions, Mnemonic};

    fn rd(img: &[u8], gpa: u64) -> u64 {
        let o = u64_to_usize(gpa);
        u64::from_le_bytes(img[o..o + 8].try_into().unwrap())
    }

    #[test]
    fn density_picks_evenly_spread_pages_and_refuses_what_does_not_fit() {
        let t = Touch::new(Mode::Direct, 64 << 30, 1.0 / 4096.0).unwrap();
        assert_eq!(t.pages, 4096);
        assert_eq!(t.stride, 16 << 20);
        assert_eq!(t.target(4095), DATA_GPA + 4095 * (16 << 20));
        for d in [0.0, -1.0, 1.5, f64::NAN, 1e-12] {
            assert!(Touch::new(Mode::Nested, 64 << 30, d).is_err(), "{d}");
        }
        // 2^18 pages at most: a dense 4 TiB is refused with the figure.
        let e = Touch::new(Mode::Nested, 4 << 40, 0.01).unwrap_err();
        assert!(e.to_string().contains("10737418 pages"), "{e}");
    }

    #[test]
    fn nested_image_maps_every_l2_page_onto_its_l1_target() {
        let t = Touch::new(Mode::Nested, 1 << 40, 1.0 / 65536.0).unwrap();
        let img = t.image().unwrap();
        assert_eq!(img.len() as u64, SYS_SLOT);
        let root = vmcb_word(&img, vmcb::NESTED_CR3);
        assert_eq!(vmcb_word(&img, vmcb::NESTED_CTL), 1);
        assert_eq!(walk(&img, root, L2_CODE), Some(L2_CODE_PAGE));
        for i in [0, 1, t.pages / 2, t.pages - 1] {
            assert_eq!(walk(&img, root, t.window(i) + 8), Some(t.target(i) + 8));
        }
        assert_eq!(walk(&img, root, t.window(t.pages)), None);
        // What nested_vmcb_check_controls/_save want.
        assert_eq!(vmcb_word(&img, vmcb::INTERCEPT_4) & 1, 1, "VMRUN");
        assert_eq!(vmcb_word(&img, vmcb::ASID) & 0xffff_ffff, 1);
        assert_ne!(vmcb_word(&img, vmcb::EFER) & EFER_SVME, 0);
        // The L2 program decodes as 32-bit code ending in VMMCALL.
        let o = u64_to_usize(L2_CODE_PAGE);
        let mut d = Decoder::with_ip(32, &img[o..o + 64], L2_CODE, DecoderOptions::NONE);
        let ins: Vec<_> = d.iter().take(7).collect();
        assert_eq!(ins[6].mnemonic(), Mnemonic::Vmmcall);
        // The L1 program: EFER, HSAVE, VMRUN, the round doorbell.
        let o = u64_to_usize(LAYOUT.code);
        let mut d = Decoder::with_ip(64, &img[o..o + 128], LAYOUT.code, DecoderOptions::NONE);
        let m: Vec<_> = d.iter().take(16).map(|i| i.mnemonic()).collect();
        assert!(
            m.contains(&Mnemonic::Vmrun) && m.contains(&Mnemonic::Wrmsr),
            "{m:?}"
        );
    }

    #[test]
    fn direct_image_maps_the_window_beside_the_identity_map() {
        let t = Touch::new(Mode::Direct, 16 << 30, 1.0 / 1024.0).unwrap();
        let img = t.image().unwrap();
        // The identity map of the system page stays (PML4 slot 0).
        assert_eq!(rd(&img, LAYOUT.pml4) & P_RW_US, P_RW_US);
        for i in [0, t.pages - 1] {
            assert_eq!(walk(&img, LAYOUT.pml4, t.window(i)), Some(t.target(i)));
        }
    }
}
