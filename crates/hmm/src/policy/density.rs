//! Density prefetch: NVIDIA UVM's rule for growing a fault into a prefetch.
//!
//! Within one block (the range's granularity, 2 MiB by default), the pages
//! already at the destination and the pages faulted in this batch are
//! marked. A faulted page grows to the largest naturally aligned
//! power-of-two subregion of the block around it in which the marked pages
//! are more than `threshold` percent of the subregion (UVM's default: 51).
//! A stream that faults pages in order then takes a fault for page 0, 1, 2,
//! 4, 8, …: about log2 of the block's pages instead of one per page, and a
//! scattered pattern (few marked pages in any subregion) prefetches nothing.

/// UVM's default density threshold, in percent.
pub const DEFAULT_THRESHOLD: u8 = 51;

/// The pages of one block: which are already at the destination, which
/// faulted now.
#[derive(Debug, Clone)]
pub struct Block {
    resident: Vec<bool>,
    faulted: Vec<bool>,
}

impl Block {
    /// A block of `pages` pages (a power of two, at least 1), none marked.
    pub fn new(pages: usize) -> Self {
        debug_assert!(pages.is_power_of_two());
        Self { resident: vec![false; pages], faulted: vec![false; pages] }
    }

    /// The block's size in pages.
    pub fn pages(&self) -> usize {
        self.resident.len()
    }

    /// Page `i` is already at the destination.
    pub fn set_resident(&mut self, i: usize) {
        self.resident[i] = true;
    }

    /// Page `i` faulted in this batch.
    pub fn set_faulted(&mut self, i: usize) {
        self.faulted[i] = true;
    }

    /// Whether page `i` faulted in this batch.
    pub fn is_faulted(&self, i: usize) -> bool {
        self.faulted[i]
    }

    /// Whether page `i` is already at the destination.
    pub fn is_resident(&self, i: usize) -> bool {
        self.resident[i]
    }

    fn marked(&self, i: usize) -> bool {
        self.resident[i] || self.faulted[i]
    }

    /// The pages to bring to the destination for this batch, as a mask over
    /// the block: each faulted page's region (see the module docs), less
    /// what is already there. Faulted pages are always in it.
    pub fn expand(&self, threshold: u8) -> Vec<bool> {
        let n = self.pages();
        // Marked pages in every aligned subregion, level by level: counts[0]
        // per page, counts[k] per 2^k pages.
        let mut counts: Vec<Vec<u32>> = vec![(0..n).map(|i| u32::from(self.marked(i))).collect()];
        while counts.last().is_some_and(|c| c.len() > 1) {
            let below = counts.last().expect("a level");
            counts.push(below.chunks(2).map(|c| c.iter().sum()).collect());
        }
        let mut take = vec![false; n];
        for i in (0..n).filter(|&i| self.faulted[i]) {
            // The largest level whose subregion around `i` is dense enough.
            let mut level = 0;
            for (k, c) in counts.iter().enumerate() {
                let size = 1u64 << k;
                if u64::from(c[i >> k]) * 100 > size * u64::from(threshold) {
                    level = k;
                }
            }
            let start = (i >> level) << level;
            for t in &mut take[start..start + (1 << level)] {
                *t = true;
            }
        }
        for (t, r) in take.iter_mut().zip(&self.resident) {
            *t &= !*r;
        }
        take
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn taken(mask: &[bool]) -> Vec<usize> {
        mask.iter().enumerate().filter(|(_, t)| **t).map(|(i, _)| i).collect()
    }

    #[test]
    fn a_lone_fault_takes_only_its_page() {
        let mut b = Block::new(512);
        b.set_faulted(300);
        assert_eq!(taken(&b.expand(DEFAULT_THRESHOLD)), vec![300]);
    }

    #[test]
    fn a_stream_doubles_what_each_fault_brings() {
        // Pages 0..k at the destination, page k faults: the region grows to
        // the aligned power of two that the marked pages fill past 51%.
        // At 64, 65 of 128 is not enough: the next region starts small.
        let cases = [(1, 1..2), (2, 2..4), (4, 4..8), (8, 8..16), (32, 32..64), (64, 64..65)];
        for (k, want) in cases {
            let mut b = Block::new(512);
            (0..k).for_each(|i| b.set_resident(i));
            b.set_faulted(k);
            assert_eq!(taken(&b.expand(DEFAULT_THRESHOLD)), want.collect::<Vec<_>>(), "at {k}");
        }
    }

    #[test]
    fn exactly_half_is_not_dense_enough() {
        // Two of four marked: 50% is not above 51%.
        let mut b = Block::new(4);
        b.set_resident(0);
        b.set_faulted(1);
        assert_eq!(taken(&b.expand(DEFAULT_THRESHOLD)), vec![1]);
        // Three of four: the whole subregion.
        b.set_faulted(2);
        assert_eq!(taken(&b.expand(DEFAULT_THRESHOLD)), vec![1, 2, 3]);
    }

    #[test]
    fn the_threshold_sets_how_eager_prefetch_is() {
        let mut b = Block::new(16);
        b.set_resident(0);
        b.set_faulted(1);
        // 2 of 4 marked: above 40%, not above 51%; 2 of 16 never above 40%.
        assert_eq!(taken(&b.expand(40)), vec![1, 2, 3]);
        assert_eq!(taken(&b.expand(51)), vec![1]);
        // A threshold of 100 never grows a fault; of 0, always to the block.
        assert_eq!(taken(&b.expand(100)), vec![1]);
        assert_eq!(taken(&b.expand(0)), (1..16).collect::<Vec<_>>());
    }

    #[test]
    fn scattered_faults_prefetch_nothing() {
        let mut b = Block::new(512);
        for i in (0..512).step_by(37) {
            b.set_faulted(i);
        }
        let want: Vec<usize> = (0..512).step_by(37).collect();
        assert_eq!(taken(&b.expand(DEFAULT_THRESHOLD)), want);
    }

    #[test]
    fn pages_already_there_are_not_taken_again() {
        let mut b = Block::new(8);
        (0..6).for_each(|i| b.set_resident(i));
        b.set_faulted(6);
        assert_eq!(taken(&b.expand(DEFAULT_THRESHOLD)), vec![6, 7]);
    }
}
