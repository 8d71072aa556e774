//! Populated-gfn summary (beyond KVM): per memslot and level, a
//! hierarchical bitmap of the rmap heads that are non-empty, so a zap can
//! jump over empty gfn runs instead of reading every head.
//!
//! Level 0 has one bit per rmap head, stored in lazily allocated chunks of
//! [`LEAF_CHUNK_WORDS`] words (4096 heads); level k >= 1 has one bit per
//! word of level k-1 ("that word is non-zero"), fully allocated (1/64 of the
//! level below: 2 MiB for the 2^30 heads of a 4 TiB slot). Finding the next
//! populated head from any position costs O(levels) word reads, so an empty
//! 1 GiB range (262,144 + 512 + 1 heads) is skipped in a few dozen reads.

use notifier::convert::u64_to_usize;

/// Words per lazily allocated level-0 chunk (64 words = 4096 heads).
pub const LEAF_CHUNK_WORDS: usize = 64;

#[derive(Debug, Default)]
pub struct PopulatedMap {
    len: u64,
    leaf: Vec<Option<Box<[u64; LEAF_CHUNK_WORDS]>>>,
    /// `summary[k]`: one bit per word of the level below (k = 0: below is
    /// the leaf level). The last level has at most one word.
    summary: Vec<Vec<u64>>,
    count: u64,
}

impl PopulatedMap {
    pub fn new(len: u64) -> Self {
        let words = len.div_ceil(64);
        let leaf = (0..words.div_ceil(LEAF_CHUNK_WORDS as u64))
            .map(|_| None)
            .collect();
        let mut summary = Vec::new();
        let mut below = words;
        while below > 1 {
            let w = below.div_ceil(64);
            summary.push(vec![0u64; u64_to_usize(w)]);
            below = w;
        }
        Self {
            len,
            leaf,
            summary,
            count: 0,
        }
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Populated heads.
    pub fn count(&self) -> u64 {
        self.count
    }

    #[inline]
    fn leaf_word(&self, w: u64) -> u64 {
        let w = u64_to_usize(w);
        match self.leaf.get(w / LEAF_CHUNK_WORDS) {
            Some(Some(c)) => c[w % LEAF_CHUNK_WORDS],
            _ => 0,
        }
    }

    /// Word `w` of level `lvl` (0 = leaf).
    #[inline]
    fn word(&self, lvl: usize, w: u64) -> u64 {
        if lvl == 0 {
            self.leaf_word(w)
        } else {
            self.summary[lvl - 1]
                .get(u64_to_usize(w))
                .copied()
                .unwrap_or(0)
        }
    }

    pub fn get(&self, i: u64) -> bool {
        self.leaf_word(i / 64) & (1 << (i % 64)) != 0
    }

    /// Mark head `i` populated. Out of range: ignored.
    pub fn set(&mut self, i: u64) {
        if i >= self.len {
            return;
        }
        let w = i / 64;
        let c = self.leaf[w as usize / LEAF_CHUNK_WORDS]
            .get_or_insert_with(|| Box::new([0; LEAF_CHUNK_WORDS]));
        let word = &mut c[w as usize % LEAF_CHUNK_WORDS];
        if *word & (1 << (i % 64)) != 0 {
            return;
        }
        let was_zero = *word == 0;
        *word |= 1 << (i % 64);
        self.count += 1;
        let mut bit = w;
        let mut propagate = was_zero;
        for s in &mut self.summary {
            if !propagate {
                break;
            }
            let sw = &mut s[(bit / 64) as usize];
            propagate = *sw == 0;
            *sw |= 1 << (bit % 64);
            bit /= 64;
        }
    }

    /// Mark head `i` empty. Leaf chunks are kept once allocated.
    pub fn clear(&mut self, i: u64) {
        if i >= self.len {
            return;
        }
        let w = i / 64;
        let Some(Some(c)) = self.leaf.get_mut(w as usize / LEAF_CHUNK_WORDS) else {
            return;
        };
        let word = &mut c[w as usize % LEAF_CHUNK_WORDS];
        if *word & (1 << (i % 64)) == 0 {
            return;
        }
        *word &= !(1 << (i % 64));
        self.count -= 1;
        let mut propagate = *word == 0;
        let mut bit = w;
        for s in &mut self.summary {
            if !propagate {
                break;
            }
            let sw = &mut s[(bit / 64) as usize];
            *sw &= !(1 << (bit % 64));
            propagate = *sw == 0;
            bit /= 64;
        }
    }

    /// First populated head in `from..end`.
    pub fn next_set(&self, from: u64, end: u64) -> Option<u64> {
        let end = end.min(self.len);
        if from >= end {
            return None;
        }
        // In the word holding `from`?
        let w = self.leaf_word(from / 64) & (u64::MAX << (from % 64));
        if w != 0 {
            return Some((from & !63) + w.trailing_zeros() as u64).filter(|&r| r < end);
        }
        // Climb: find the next non-zero word after from/64 at some level.
        let mut lvl = 1;
        let mut bit = from / 64 + 1;
        loop {
            // Bit `bit` of level `lvl` covers heads from bit * 64^lvl.
            if lvl > self.summary.len() || ((bit as u128) << (6 * lvl)) >= end as u128 {
                return None;
            }
            let words = self.summary[lvl - 1].len() as u64;
            if bit / 64 >= words {
                return None;
            }
            let w = self.word(lvl, bit / 64) & (u64::MAX << (bit % 64));
            if w != 0 {
                bit = (bit & !63) + w.trailing_zeros() as u64;
                break;
            }
            bit = bit / 64 + 1;
            lvl += 1;
        }
        // Descend: `bit` names a non-zero word of level lvl-1.
        while lvl > 0 {
            lvl -= 1;
            let w = self.word(lvl, bit);
            debug_assert!(w != 0, "summary bit without a populated word");
            bit = bit * 64 + w.trailing_zeros() as u64;
        }
        Some(bit).filter(|&r| r < end)
    }

    /// Bytes allocated.
    pub fn bytes(&self) -> u64 {
        let leaves =
            self.leaf.iter().filter(|c| c.is_some()).count() as u64 * LEAF_CHUNK_WORDS as u64 * 8;
        leaves
            + self.leaf.len() as u64 * 8
            + self.summary.iter().map(|s| s.len() as u64 * 8).sum::<u64>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    proptest! {
        #[test]
        fn next_set_matches_a_set(len in 1u64..300_000, ops in prop::collection::vec((any::<bool>(), any::<u64>()), 0..200),
                                  queries in prop::collection::vec((any::<u64>(), any::<u64>()), 1..50)) {
            let mut m = PopulatedMap::new(len);
            let mut s = BTreeSet::new();
            for (set, i) in ops {
                // Cluster half the indices so words and summaries share bits.
                let i = if i % 2 == 0 { i % len } else { (i % 200).min(len - 1) };
                if set { m.set(i); s.insert(i); } else { m.clear(i); s.remove(&i); }
            }
            prop_assert_eq!(m.count(), s.len() as u64);
            for (a, b) in queries {
                let (a, b) = (a % (len + 10), b % (len + 10));
                let want = s.range(a..b.max(a)).next().copied();
                prop_assert_eq!(m.next_set(a, b), want, "from {} to {}", a, b);
            }
            // Full enumeration.
            let mut got = Vec::new();
            let mut p = 0;
            while let Some(i) = m.next_set(p, len) { got.push(i); p = i + 1; }
            prop_assert_eq!(got, s.into_iter().collect::<Vec<_>>());
        }
    }

    #[test]
    fn huge_and_empty() {
        let mut m = PopulatedMap::new(1 << 30);
        assert_eq!(m.next_set(0, 1 << 30), None);
        m.set((1 << 30) - 1);
        m.set(5);
        assert_eq!(m.next_set(0, 1 << 30), Some(5));
        assert_eq!(m.next_set(6, 1 << 30), Some((1 << 30) - 1));
        assert_eq!(m.next_set(6, (1 << 30) - 1), None);
        m.clear(5);
        assert_eq!(m.next_set(0, 100), None);
        assert!(m.bytes() < 5 << 20, "{}", m.bytes());
    }
}
