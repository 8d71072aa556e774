//! Model plane: a nested-TDP setup at scales the machine cannot back with
//! RAM. An L1 of up to 4 TiB (one memslot) holds EPT tables for its L2 in
//! sparse guest memory; a fraction `density` of L1's 4 KiB pages is mapped
//! into L2 in 2 MiB regions, with a table shape; every L2 page is then
//! faulted through the real nested MMU, so the shadow pages, rmaps and
//! populated summaries are the ones a real L2 would build. Only the MMU's
//! own memory is used (plus the EPT tables' pages).
//!
//! Shapes ([`TableShape`]):
//! - `linear`: 4 KiB EPT leaves, L2 page j of a region -> L1 page j;
//! - `shuffled`: 4 KiB leaves, a permutation within each 2 MiB region;
//! - `huge`: 2 MiB EPT leaves (shadowed by direct pages, or by 2 MiB SPTEs
//!   if the host backing allows);
//! - `aliased:K`: K L2 regions map each L1 region (rmap chains of K).

use crate::context::MmuContext;
use crate::guest_walk::{ept, AccessKind, EptPaging, SparseGuestMem, PAGE_SHIFT};
use crate::memslot::{Memslot, MemslotError, Memslots};
use crate::nested::NestedMmu;
use crate::shadow::FaultError;
use crate::RemoteTlb;
use notifier::convert::{duration_ns, u64_to_usize};
use notifier::PageSize;
use std::sync::Arc;
use std::time::Instant;

/// 4 KiB pages per 2 MiB region.
pub const REGION_PAGES: u64 = 512;
/// Largest L1 the model accepts (4 TiB).
pub const MAX_L1_BYTES: u64 = 4 << 40;
/// Host address the model puts L1 at.
pub const MODEL_L1_HVA: u64 = 0x7f00_0000_0000 & !((1 << 30) - 1);

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum TableShape {
    Linear,
    Shuffled,
    Huge,
    Aliased(u32),
}

impl std::str::FromStr for TableShape {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "linear" => Ok(TableShape::Linear),
            "shuffled" => Ok(TableShape::Shuffled),
            "huge" => Ok(TableShape::Huge),
            _ => match s
                .strip_prefix("aliased:")
                .and_then(|k| k.parse::<u32>().ok())
            {
                Some(k) if (1..=64).contains(&k) => Ok(TableShape::Aliased(k)),
                _ => Err(ModelError::BadShape(s.to_string())),
            },
        }
    }
}

impl TableShape {
    fn alias(self) -> u64 {
        match self {
            TableShape::Aliased(k) => k as u64,
            _ => 1,
        }
    }
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ModelError {
    #[error(
        "L1 size {bytes} bytes: must be a multiple of 2 MiB, at least 4 MiB and at most 4 TiB"
    )]
    BadL1 { bytes: u64 },
    #[error("density {0} must be within 0..=1")]
    BadDensity(f64),
    #[error("bad table shape {0:?}: expected linear, shuffled, huge or aliased:K (K in 1..=64)")]
    BadShape(String),
    #[error("the model would need about {estimate} bytes of MMU memory, over the budget of {budget}: lower the density")]
    TooBig { estimate: u64, budget: u64 },
    #[error("model fault at L2 gpa {gpa:#x}: {err}")]
    Fault { gpa: u64, err: FaultError },
    #[error("memslot: {0}")]
    Slot(#[from] MemslotError),
}

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct NestedModelConfig {
    pub l1_bytes: u64,
    /// Fraction of L1 4 KiB pages mapped into L2.
    pub density: f64,
    pub shape: TableShape,
    pub seed: u64,
    /// Host backing's largest level for L1 (1 = 4 KiB, 2 = 2 MiB hugetlb).
    pub host_max_level: u8,
    /// Refuse models whose MMU memory estimate is above this.
    pub memory_budget: u64,
}

impl Default for NestedModelConfig {
    fn default() -> Self {
        Self {
            l1_bytes: 1 << 30,
            density: 0.001,
            shape: TableShape::Linear,
            seed: 1,
            host_max_level: 1,
            memory_budget: 4 << 30,
        }
    }
}

/// A built model: the nested MMU populated for an L2.
pub struct NestedModel {
    pub cfg: NestedModelConfig,
    pub mmu: Arc<NestedMmu>,
    pub mem: Arc<SparseGuestMem>,
    pub paging: EptPaging,
    /// L1 region (2 MiB index) mapped by each L1 region slot; L2 region k
    /// maps `l1_regions[k / alias]`.
    pub l1_regions: Vec<u64>,
    pub l2_regions: u64,
    pub table_pages: u64,
    pub faults: u64,
    pub build_ns: u64,
    pub estimate_bytes: u64,
}

/// splitmix64: the model's deterministic randomness.
pub fn splitmix(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

impl NestedModelConfig {
    pub fn validate(&self) -> Result<(), ModelError> {
        if !self.l1_bytes.is_multiple_of(2 << 20)
            || self.l1_bytes < (4 << 20)
            || self.l1_bytes > MAX_L1_BYTES
        {
            return Err(ModelError::BadL1 {
                bytes: self.l1_bytes,
            });
        }
        if !(0.0..=1.0).contains(&self.density) {
            return Err(ModelError::BadDensity(self.density));
        }
        Ok(())
    }

    fn regions(&self) -> u64 {
        self.l1_bytes >> 21
    }

    fn table_pages(&self, l2_regions: u64) -> u64 {
        let pts = if self.shape == TableShape::Huge {
            0
        } else {
            l2_regions
        };
        pts + l2_regions.div_ceil(512) + l2_regions.div_ceil(512 * 512) + 1
    }

    /// L1 regions mapped, and L1 regions reserved at the top for tables.
    fn layout(&self) -> (u64, u64) {
        let total = self.regions();
        // Documented saturation: a float-to-int `as` saturates (negative and
        // NaN to 0, past u64::MAX to u64::MAX) and `min` below clamps to the
        // regions there are; `validate` rejects a density outside 0..=1
        // before a model is built.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let want = (self.density * total as f64).round() as u64;
        let want = if self.density > 0.0 { want.max(1) } else { 0 };
        let reserved = self
            .table_pages(want * self.shape.alias())
            .div_ceil(REGION_PAGES)
            + 1;
        (want.min(total.saturating_sub(reserved)), reserved)
    }

    /// Rough MMU memory the model will use.
    pub fn estimate_bytes(&self) -> u64 {
        let (n, _) = self.layout();
        let alias = self.shape.alias();
        let heads = self.l1_bytes >> PAGE_SHIFT;
        let fixed = heads / 512 * 8 + heads / 64 / 64 * 8 + heads / 4096 * 8;
        let per_region = 4096
            + 512
            + alias * 8400
            + if alias > 1 {
                512 * 128 * alias.div_ceil(14)
            } else {
                0
            };
        fixed + n * per_region
    }

    /// The L1 gfn an L2 gpa maps to (the reference for checks).
    pub fn l1_gfn(&self, l1_regions: &[u64], l2_gpa: u64) -> Option<u64> {
        let k = l2_gpa >> 21;
        let region = *l1_regions.get((k / self.shape.alias()) as usize)?;
        let j = (l2_gpa >> PAGE_SHIFT) & (REGION_PAGES - 1);
        let j = if self.shape == TableShape::Shuffled {
            shuffle(j, region)
        } else {
            j
        };
        Some(region * REGION_PAGES + j)
    }
}

/// A bijection of 0..512 (odd multiplier), different per region.
fn shuffle(j: u64, region: u64) -> u64 {
    (j * 167 + region * 31) & (REGION_PAGES - 1)
}

/// Build the model: EPT tables in L1 memory, then fault every L2 page. The
/// nested MMU gets a fresh [`MmuContext`] (flushing through `tlb`) holding
/// L1's one memslot at [`MODEL_L1_HVA`]; reach it through
/// `model.mmu.context()`.
pub fn build_nested(cfg: NestedModelConfig, tlb: RemoteTlb) -> Result<NestedModel, ModelError> {
    cfg.validate()?;
    let estimate = cfg.estimate_bytes();
    if estimate > cfg.memory_budget {
        return Err(ModelError::TooBig {
            estimate,
            budget: cfg.memory_budget,
        });
    }
    let t0 = Instant::now();
    let (nregions, reserved) = cfg.layout();
    let avail = cfg.regions() - reserved;
    // Distinct, spread L1 regions: k -> (a*k + b) mod avail, gcd(a, avail) = 1.
    let mut rng = cfg.seed;
    let mut a = (splitmix(&mut rng) % avail.max(1)) | 1;
    while gcd(a, avail) != 1 {
        a += 2;
    }
    let b = splitmix(&mut rng) % avail.max(1);
    let l1_regions: Vec<u64> = (0..nregions)
        .map(|k| {
            let r = (a as u128 * k as u128 + b as u128) % avail as u128;
            u64::try_from(r).expect("a residue mod a u64 fits in u64")
        })
        .collect();

    let mem = Arc::new(SparseGuestMem::new(cfg.l1_bytes));
    let npages = cfg.l1_bytes >> PAGE_SHIFT;
    let mut next_table = npages;
    let mut alloc_table = || {
        next_table -= 1;
        next_table << PAGE_SHIFT
    };
    let nonleaf = ept::RWX;
    let leaf = ept::RWX | ((ept::MT_WB as u64) << ept::MT_SHIFT);
    let root = alloc_table();
    let paging = EptPaging::new(root, false);
    let alias = cfg.shape.alias();
    let l2_regions = nregions * alias;
    let write = |gpa: u64, v: u64| {
        mem.write_u64(gpa, v).map_err(|e| ModelError::Fault {
            gpa,
            err: FaultError::Guest(e.into()),
        })
    };
    let (mut pdpt, mut pd) = (0u64, 0u64);
    let mut table_pages = 1;
    for k in 0..l2_regions {
        let l2 = k << 21;
        if k % (512 * 512) == 0 {
            pdpt = alloc_table();
            table_pages += 1;
            write(root + ((l2 >> 39) & 511) * 8, pdpt | nonleaf)?;
        }
        if k % 512 == 0 {
            pd = alloc_table();
            table_pages += 1;
            write(pdpt + ((l2 >> 30) & 511) * 8, pd | nonleaf)?;
        }
        let region = l1_regions[u64_to_usize(k / alias)];
        let pde = pd + ((l2 >> 21) & 511) * 8;
        if cfg.shape == TableShape::Huge {
            write(pde, (region << 21) | ept::PS | leaf)?;
            continue;
        }
        let pt = alloc_table();
        table_pages += 1;
        write(pde, pt | nonleaf)?;
        for j in 0..REGION_PAGES {
            let target = if cfg.shape == TableShape::Shuffled {
                shuffle(j, region)
            } else {
                j
            };
            write(
                pt + j * 8,
                ((region * REGION_PAGES + target) << PAGE_SHIFT) | leaf,
            )?;
        }
    }

    let backing = if cfg.host_max_level >= 2 {
        PageSize::Size2M
    } else {
        PageSize::Size4K
    };
    let slots = Memslots::new(vec![Memslot::new(0, 0, npages, MODEL_L1_HVA, backing)?], 0)?;
    let ctx = MmuContext::new(slots, tlb);
    let mmu = Arc::new(NestedMmu::new(ctx, mem.clone()));
    let mut faults = 0;
    for k in 0..l2_regions {
        let step = if cfg.shape == TableShape::Huge && cfg.host_max_level >= 2 {
            REGION_PAGES
        } else {
            1
        };
        for j in (0..REGION_PAGES).step_by(u64_to_usize(step)) {
            let gpa = (k << 21) | (j << PAGE_SHIFT);
            mmu.page_fault(&paging, gpa, AccessKind::WRITE)
                .map_err(|err| ModelError::Fault { gpa, err })?;
            faults += 1;
        }
    }
    Ok(NestedModel {
        cfg,
        mmu,
        mem,
        paging,
        l1_regions,
        l2_regions,
        table_pages,
        faults,
        build_ns: duration_ns(t0.elapsed()),
        estimate_bytes: estimate,
    })
}

impl NestedModel {
    /// The L1 gfn the L2 gpa maps to, per the generator.
    pub fn l1_gfn(&self, l2_gpa: u64) -> Option<u64> {
        self.cfg.l1_gfn(&self.l1_regions, l2_gpa)
    }

    /// L2 pages mapped.
    pub fn l2_pages(&self) -> u64 {
        self.l2_regions * REGION_PAGES
    }

    /// L1 gfns of the EPT tables (top of L1).
    pub fn table_gfn_range(&self) -> (u64, u64) {
        let n = self.cfg.l1_bytes >> PAGE_SHIFT;
        (n - self.table_pages, n)
    }

    /// Check against the generator: every present shadow translation of a
    /// sampled L2 page maps the L1 gfn the tables say and is outside
    /// `zapped` (gfn range). Returns the first violation.
    pub fn check_no_stale(
        &self,
        zapped: (u64, u64),
        samples: u64,
        seed: u64,
    ) -> Result<u64, String> {
        let mut rng = seed;
        let total = self.l2_pages();
        let mut present = 0;
        for n in 0..samples.min(total.max(1)) {
            let page = if samples >= total {
                n
            } else {
                splitmix(&mut rng) % total.max(1)
            };
            let gpa = page << PAGE_SHIFT;
            let Some(m) = self.mmu.translate(&self.paging, gpa) else {
                continue;
            };
            present += 1;
            let want = self.l1_gfn(gpa);
            if Some(m.gfn) != want {
                return Err(format!(
                    "L2 gpa {gpa:#x}: shadow maps L1 gfn {:#x}, tables say {want:?}",
                    m.gfn
                ));
            }
            if m.gfn >= zapped.0 && m.gfn < zapped.1 {
                return Err(format!(
                    "L2 gpa {gpa:#x}: stale translation to zapped L1 gfn {:#x}",
                    m.gfn
                ));
            }
        }
        Ok(present)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes_and_sizes_fail_clearly() {
        assert!("aliased:4".parse::<TableShape>().is_ok());
        assert!("aliased:0".parse::<TableShape>().is_err());
        let cfg = NestedModelConfig {
            l1_bytes: 3 << 20,
            ..Default::default()
        };
        assert!(matches!(cfg.validate(), Err(ModelError::BadL1 { .. })));
    }

    #[test]
    fn every_shape_builds_and_translates() {
        for shape in [
            TableShape::Linear,
            TableShape::Shuffled,
            TableShape::Huge,
            TableShape::Aliased(3),
        ] {
            for host in [1, 2] {
                let cfg = NestedModelConfig {
                    l1_bytes: 256 << 20,
                    density: 0.05,
                    shape,
                    seed: 7,
                    host_max_level: host,
                    ..Default::default()
                };
                let m = build_nested(cfg, RemoteTlb::default()).unwrap();
                assert!(m.l2_regions > 0);
                assert_eq!(
                    m.check_no_stale((0, 0), u64::MAX, 1).unwrap(),
                    m.l2_pages(),
                    "{shape:?} host {host}"
                );
                let s = m.mmu.stats().snapshot();
                if shape == TableShape::Huge && host == 2 {
                    assert_eq!(s.pages_2m, m.l2_regions);
                } else {
                    assert_eq!(s.pages_4k, m.l2_pages());
                }
                if let TableShape::Aliased(k) = shape {
                    assert!(s.max_mmu_rmap_size >= k as u64);
                }
                assert!(m.mmu.roles().iter().all(|(_, r)| r.guest_mode));
            }
        }
    }
}
