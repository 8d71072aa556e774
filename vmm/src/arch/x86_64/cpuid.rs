//! The CPUID a guest sees: `KVM_GET_SUPPORTED_CPUID`, filtered to what this
//! host can run at emulated guest CPL0 (the PVM host's instruction emulator
//! fails on cmpxchg16b, xsave/xrstor and the AVX family: README, Booting
//! Linux).

use kvm_bindings::CpuId;

/// Highest basic CPUID leaf exposed: below 0xd, so Linux sees no XSAVE
/// state leaf and uses FXSAVE (the host emulator cannot run xsave/xrstor).
pub const MAX_BASIC_LEAF: u32 = 0xb;

/// Leaf 1 ECX bits hidden: CX16 (13), XSAVE (26), OSXSAVE (27), AVX (28),
/// F16C (29), RDRAND (30).
const LEAF1_ECX_OFF: u32 = (1 << 13) | (1 << 26) | (1 << 27) | (1 << 28) | (1 << 29) | (1 << 30);
/// Leaf 1 ECX: the hypervisor bit.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 7 EBX bits hidden: AVX2 (5), INVPCID (10), AVX512F/DQ (16, 17),
/// RDSEED (18), AVX512IFMA (21), AVX512PF/ER/CD (26-28), SHA (29),
/// AVX512BW/VL (30, 31).
const LEAF7_EBX_OFF: u32 = (1 << 5)
    | (1 << 10)
    | (1 << 16)
    | (1 << 17)
    | (1 << 18)
    | (1 << 21)
    | (1 << 26)
    | (1 << 27)
    | (1 << 28)
    | (1 << 29)
    | (1 << 30)
    | (1 << 31);

/// Filter the supported CPUID in place: see the module docs.
pub fn filter(cpuid: &mut CpuId) {
    for e in cpuid.as_mut_slice().iter_mut() {
        match e.function {
            0 => e.eax = e.eax.min(MAX_BASIC_LEAF),
            1 => {
                e.ecx &= !LEAF1_ECX_OFF;
                e.ecx |= LEAF1_ECX_HYPERVISOR;
                e.ebx &= 0x00ff_ffff; // APIC id 0
            }
            7 if e.index == 0 => {
                e.ebx &= !LEAF7_EBX_OFF;
                e.ecx = 0;
                e.edx = 0;
            }
            0xb => e.edx = 0, // x2APIC id
            _ => {}
        }
    }
}

/// Whether the CPUID offers SVM (leaf 0x8000_0001 ECX bit 2) with nested
/// paging (leaf 0x8000_000a EDX bit 0): what a guest hypervisor that uses
/// NPT needs. `KVM_GET_SUPPORTED_CPUID` reports both on `kvm_amd` with
/// `nested=1` (`svm_set_cpu_caps()`), and [`filter`] leaves them alone.
pub fn svm_with_npt(cpuid: &CpuId) -> bool {
    let leaf = |f: u32| cpuid.as_slice().iter().find(|e| e.function == f);
    let svm = leaf(0x8000_0001).is_some_and(|e| e.ecx & (1 << 2) != 0);
    let npt = leaf(0x8000_000a).is_some_and(|e| e.edx & 1 != 0);
    svm && npt
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn hides_what_the_host_cannot_run() {
        let entries = [
            kvm_cpuid_entry2 {
                function: 0,
                eax: 0x1f,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 1,
                ecx: u32::MAX,
                ebx: 0x0500_0000,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 7,
                ebx: u32::MAX,
                ecx: 1,
                ..Default::default()
            },
        ];
        let mut c = CpuId::from_entries(&entries).unwrap();
        filter(&mut c);
        let e = c.as_slice();
        assert_eq!(e[0].eax, MAX_BASIC_LEAF);
        assert_eq!(e[1].ecx & (1 << 13), 0);
        assert_eq!(e[1].ecx & (1 << 31), 1 << 31);
        assert_eq!(e[1].ebx, 0);
        assert_eq!(e[2].ebx & (1 << 5), 0);
        assert_eq!(e[2].ecx, 0);
    }

    #[test]
    fn svm_passes_the_filter_and_needs_npt_too() {
        let leaf = |function, ecx, edx| kvm_cpuid_entry2 {
            function,
            ecx,
            edx,
            ..Default::default()
        };
        let mut both =
            CpuId::from_entries(&[leaf(0x8000_0001, 4, 0), leaf(0x8000_000a, 0, 1)]).unwrap();
        filter(&mut both);
        assert!(svm_with_npt(&both));
        let no_npt =
            CpuId::from_entries(&[leaf(0x8000_0001, 4, 0), leaf(0x8000_000a, 0, 0)]).unwrap();
        assert!(!svm_with_npt(&no_npt));
        let none = CpuId::from_entries(&[leaf(1, 0, 0)]).unwrap();
        assert!(!svm_with_npt(&none));
    }
}
