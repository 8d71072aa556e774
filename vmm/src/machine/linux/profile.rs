//! The guest profiler of a Linux boot (`vmm boot --profile-ms`): the vCPU
//! is kicked every few milliseconds and its RIP (and the kernel-text
//! addresses on its stack, approximate callers) sampled, then symbolised
//! with the kernel's `System.map`. A live view goes to stderr every 40
//! samples.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use vm_memory::GuestMemoryMmap;

use crate::arch::x86_64::emulate::{AssistCounts, CpuState};
use crate::arch::x86_64::gva;
use crate::vstate::Vcpu;

/// Profiling state of the vCPU thread.
pub struct Profiler {
    syms: Arc<Symbols>,
    /// Samples per RIP.
    pub samples: BTreeMap<u64, u64>,
    recent: BTreeMap<u64, u64>,
    /// Kernel-text addresses found on the guest stack: approximate callers.
    callers: BTreeMap<String, u64>,
}

impl Profiler {
    pub fn new(syms: Arc<Symbols>) -> Self {
        Profiler {
            syms,
            samples: BTreeMap::new(),
            recent: BTreeMap::new(),
            callers: BTreeMap::new(),
        }
    }

    /// One sample: RIP, and the kernel-text addresses on the guest stack.
    pub fn sample(&mut self, vcpu: &Vcpu, mem: &GuestMemoryMmap, assists: &AssistCounts) {
        let (Ok(r), Ok(sregs)) = (vcpu.regs(), vcpu.sregs()) else {
            return;
        };
        *self.samples.entry(r.rip).or_default() += 1;
        *self.recent.entry(r.rip).or_default() += 1;
        let mut stack = [0u8; 1024];
        if gva::read(mem, &gva::paging(&sregs), r.rsp & !7, &mut stack).is_ok() {
            let mut seen = Vec::new();
            for w in stack.chunks_exact(8) {
                let a = u64::from_le_bytes(w.try_into().unwrap_or([0; 8]));
                if (0xffff_ffff_8100_0000..0xffff_ffff_c000_0000).contains(&a) {
                    let n = self.syms.name(a);
                    if !seen.contains(&n) {
                        seen.push(n);
                    }
                    if seen.len() == 4 {
                        break;
                    }
                }
            }
            for n in seen {
                *self.callers.entry(n).or_default() += 1;
            }
        }
        // Live view for long boots: every 40 samples, what the last 40 were.
        if self.recent.values().sum::<u64>() >= 40 {
            let mut top: Vec<_> = self.callers.iter().collect();
            top.sort_by(|a, b| b.1.cmp(a.1));
            let top: Vec<_> = top
                .iter()
                .take(8)
                .map(|(n, c)| format!("{n}:{c}"))
                .collect();
            eprint!(
                "{}on stack: {}\nassists so far: {:?}\n",
                self.syms.report(&self.recent, 6),
                top.join(" "),
                assists.0
            );
            self.recent.clear();
            self.callers.clear();
        }
    }
}

/// Kernel text symbols from a System.map, sorted by address.
#[derive(Default)]
pub struct Symbols(Vec<(u64, String)>);

impl Symbols {
    /// Parse a System.map (missing or unreadable: no symbols).
    pub fn load(system_map: Option<&Path>) -> Symbols {
        let mut v: Vec<(u64, String)> = system_map
            .and_then(|p| std::fs::read_to_string(p).ok())
            .map(|s| {
                s.lines()
                    .filter_map(|l| {
                        let mut it = l.split_whitespace();
                        let a = u64::from_str_radix(it.next()?, 16).ok()?;
                        let t = it.next()?;
                        let n = it.next()?;
                        matches!(t, "t" | "T" | "W" | "w").then(|| (a, n.to_string()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        Symbols(v)
    }

    /// The function containing `rip`.
    pub fn name(&self, rip: u64) -> String {
        match self.0.partition_point(|(a, _)| *a <= rip) {
            0 => format!("{rip:#x}"),
            i => self.0[i - 1].1.clone(),
        }
    }

    /// Top functions by sample count.
    pub fn report(&self, samples: &BTreeMap<u64, u64>, top: usize) -> String {
        let mut by: BTreeMap<String, u64> = BTreeMap::new();
        let total: u64 = samples.values().sum();
        for (&rip, &n) in samples {
            *by.entry(self.name(rip)).or_default() += n;
        }
        let mut v: Vec<_> = by.into_iter().collect();
        v.sort_by_key(|e| std::cmp::Reverse(e.1));
        let mut s = format!("--- guest profile: {total} samples ---\n");
        for (name, n) in v.iter().take(top) {
            s += &format!(
                "{:6.2}% {n:6} {name}\n",
                *n as f64 * 100.0 / total.max(1) as f64
            );
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_symbolises() {
        let dir = std::env::temp_dir().join(format!("vmm-prof-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let map = dir.join("System.map");
        std::fs::write(
            &map,
            "ffffffff81000000 T _text\nffffffff81001000 T foo\nffffffff81002000 t bar\n",
        )
        .unwrap();
        let mut s = BTreeMap::new();
        s.insert(0xffff_ffff_8100_1010, 3);
        s.insert(0xffff_ffff_8100_2fff, 1);
        let r = Symbols::load(Some(&map)).report(&s, 10);
        assert!(r.contains("foo") && r.contains("bar"), "{r}");
        let _ = std::fs::remove_dir_all(dir);
    }
}
