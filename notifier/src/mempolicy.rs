//! A VMA's memory policy as the switch for NUMA balancing over it.
//!
//! `task_numa_work()` (kernel/sched/fair.c) skips a VMA whose policy lacks
//! `MPOL_F_MOF` ("migrate on fault"): `vma_policy_mof()` (mm/mempolicy.c)
//! answers from the VMA's own policy - for shmem, the file's shared policy -
//! and only the default policies (`preferred_node_policy[]`) and
//! `MPOL_F_NUMA_BALANCING` set the flag. So `mbind(MPOL_LOCAL)` over guest
//! RAM is a per-range opt-out of NUMA hinting on every kernel (6.1, 6.12,
//! 6.18 alike), where the per-process `prctl(PR_SET_NUMA_BALANCING)` asked
//! for by VMM users was never merged (no such prctl in the uapi
//! `linux/prctl.h` of any of them). `MPOL_LOCAL` changes no placement on a
//! one-node host and keeps allocation local on others.

use crate::convert::u64_to_usize;
use crate::error::{Error, Result};
use crate::subscriber::HvaRange;

/// `MPOL_DEFAULT` (include/uapi/linux/mempolicy.h).
const MPOL_DEFAULT: libc::c_long = 0;
/// `MPOL_LOCAL`.
const MPOL_LOCAL: libc::c_long = 4;

fn mbind(r: HvaRange, mode: libc::c_long, op: &'static str) -> Result<()> {
    // SAFETY: mbind only changes the memory policy of the VMAs in `r`
    // (no nodemask: NULL with maxnode 0, valid for MPOL_LOCAL and
    // MPOL_DEFAULT); it reads no user memory and moves no page (flags 0).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mbind,
            r.start,
            u64_to_usize(r.len()),
            mode,
            std::ptr::null::<libc::c_ulong>(),
            0usize,
            0u32,
        )
    };
    if rc != 0 {
        return Err(Error::last_os(op));
    }
    Ok(())
}

/// Take `r` out of NUMA balancing: `mbind(MPOL_LOCAL)`.
pub fn opt_out_of_numa_balancing(r: HvaRange) -> Result<()> {
    mbind(r, MPOL_LOCAL, "mbind(MPOL_LOCAL)")
}

/// Give `r` its default policy back (NUMA balancing scans it again).
pub fn default_policy(r: HvaRange) -> Result<()> {
    mbind(r, MPOL_DEFAULT, "mbind(MPOL_DEFAULT)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_then_default_on_anonymous_memory() {
        let m = crate::Mmap::anon(1 << 21, libc::PROT_READ | libc::PROT_WRITE, 0).unwrap();
        let r = HvaRange::new(m.addr(), m.addr() + (1 << 21));
        opt_out_of_numa_balancing(r).unwrap();
        let maps = std::fs::read_to_string("/proc/self/numa_maps").unwrap_or_default();
        if !maps.is_empty() {
            let line = format!("{:x} local", m.addr());
            assert!(maps.lines().any(|l| l.starts_with(&line)), "{maps}");
        }
        default_policy(r).unwrap();
    }
}
