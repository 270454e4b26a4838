//! Range attributes: what the application says about its memory
//! (`cudaMemAdvise`, AMD SVM's attributes), kept per run of pages.

use std::collections::BTreeMap;

use crate::addr::{HUGE_PAGE_SIZE, PAGE_SIZE, PageRange, VirtAddr};
use crate::page::DeviceId;

/// Where a page may live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Location {
    /// System memory.
    System,
    /// A device's memory.
    Device(DeviceId),
}

impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::System => write!(f, "system memory"),
            Location::Device(d) => write!(f, "device {d}"),
        }
    }
}

/// One piece of advice over a range (see [`Placement::advise`](super::Placement::advise)).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Advice {
    /// The pages should live here: a device fault from elsewhere maps them
    /// where they are instead of migrating them, and prefetch and eviction
    /// keep them here where they can.
    PreferredLocation(Location),
    /// No preferred location.
    UnsetPreferredLocation,
    /// This device maps the pages where they are (no migration on its
    /// faults), wherever they live.
    AccessedBy(DeviceId),
    /// The device no longer asks to map the pages where they are.
    UnsetAccessedBy(DeviceId),
    /// The pages are read far more than written: readers may keep copies.
    ReadMostly,
    /// Not read-mostly.
    UnsetReadMostly,
    /// Pages move in blocks of this many bytes at most: the unit a device
    /// fault's prefetch grows within (a power of two from 4 KiB to 2 MiB).
    Granularity(usize),
}

/// The attributes of a run of pages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attributes {
    /// Where the pages should live, if anywhere in particular.
    pub preferred: Option<Location>,
    /// Devices that map the pages where they are, in id order.
    pub accessed_by: Vec<DeviceId>,
    /// Whether the pages are read-mostly.
    pub read_mostly: bool,
    /// The migration block, in bytes.
    pub granularity: usize,
}

impl Default for Attributes {
    fn default() -> Self {
        Self {
            preferred: None,
            accessed_by: Vec::new(),
            read_mostly: false,
            granularity: HUGE_PAGE_SIZE,
        }
    }
}

impl Attributes {
    /// Whether the advice keeps the pages where they are for `dev`: they
    /// prefer another location, or `dev` is to access them in place.
    pub fn keeps_away_from(&self, dev: DeviceId) -> bool {
        self.preferred.is_some_and(|l| l != Location::Device(dev))
            || self.accessed_by.contains(&dev)
    }

    fn apply(&mut self, advice: Advice) {
        match advice {
            Advice::PreferredLocation(l) => self.preferred = Some(l),
            Advice::UnsetPreferredLocation => self.preferred = None,
            Advice::AccessedBy(d) => {
                if let Err(k) = self.accessed_by.binary_search(&d) {
                    self.accessed_by.insert(k, d);
                }
            }
            Advice::UnsetAccessedBy(d) => self.accessed_by.retain(|x| *x != d),
            Advice::ReadMostly => self.read_mostly = true,
            Advice::UnsetReadMostly => self.read_mostly = false,
            Advice::Granularity(g) => self.granularity = g,
        }
    }
}

/// Checks `advice` before it is kept.
pub(crate) fn check(advice: Advice) -> Result<(), String> {
    match advice {
        Advice::Granularity(g)
            if !g.is_power_of_two() || !(PAGE_SIZE..=HUGE_PAGE_SIZE).contains(&g) =>
        {
            Err(format!(
                "a granularity of {g} bytes: give a power of two from {PAGE_SIZE} to {HUGE_PAGE_SIZE}"
            ))
        }
        _ => Ok(()),
    }
}

/// Attributes by address: runs that never overlap, each different from a
/// run it touches; addresses in no run have the default attributes.
#[derive(Debug, Default)]
pub(crate) struct AttributeMap {
    /// Start: (end, attributes).
    runs: BTreeMap<usize, (usize, Attributes)>,
}

impl AttributeMap {
    /// Applies `advice` over `range`.
    pub(crate) fn apply(&mut self, range: PageRange, advice: Advice) {
        let (start, end) = (range.start().get(), range.end().get());
        // Every run of the range with its attributes, gaps included.
        let pieces = self.get(range);
        self.cut(start, end);
        for (part, mut a) in pieces {
            a.apply(advice);
            if a != Attributes::default() {
                self.runs.insert(part.start().get(), (part.end().get(), a));
            }
        }
        self.merge_around(start, end);
    }

    /// The runs of `range` with their attributes, covering it in order.
    pub(crate) fn get(&self, range: PageRange) -> Vec<(PageRange, Attributes)> {
        let (start, end) = (range.start().get(), range.end().get());
        let mut out = Vec::new();
        let mut at = start;
        let below = self.runs.range(..start).next_back().filter(|(_, (e, _))| *e > start);
        for (s, (e, a)) in below.into_iter().chain(self.runs.range(start..end)) {
            let (s, e) = ((*s).max(start), (*e).min(end));
            if s > at {
                out.push((piece(at, s), Attributes::default()));
            }
            out.push((piece(s, e), a.clone()));
            at = e;
        }
        if at < end {
            out.push((piece(at, end), Attributes::default()));
        }
        out
    }

    /// The attributes of the page at `addr`.
    #[cfg(test)]
    fn at(&self, addr: VirtAddr) -> Attributes {
        let a = addr.get();
        self.runs
            .range(..=a)
            .next_back()
            .filter(|(_, (e, _))| *e > a)
            .map(|(_, (_, x))| x.clone())
            .unwrap_or_default()
    }

    /// Forgets `[start, end)`.
    fn cut(&mut self, start: usize, end: usize) {
        let hit: Vec<usize> = self
            .runs
            .range(..end)
            .filter(|(s, (e, _))| **s < end && *e > start)
            .map(|(s, _)| *s)
            .collect();
        for s in hit {
            let (e, a) = self.runs.remove(&s).expect("listed");
            if s < start {
                self.runs.insert(s, (start, a.clone()));
            }
            if e > end {
                self.runs.insert(end, (e, a));
            }
        }
    }

    /// Joins touching runs with equal attributes from just before `start`
    /// to just after `end`.
    fn merge_around(&mut self, start: usize, end: usize) {
        let from = self.runs.range(..start).next_back().map_or(start, |(s, _)| *s);
        let keys: Vec<usize> = self.runs.range(from..=end).map(|(s, _)| *s).collect();
        let mut keep: Option<usize> = None;
        for s in keys {
            let Some(k) = keep else {
                keep = Some(s);
                continue;
            };
            let (ke, ka) = &self.runs[&k];
            let (se, sa) = &self.runs[&s];
            if *ke == s && ka == sa {
                let e = *se;
                self.runs.remove(&s);
                self.runs.get_mut(&k).expect("kept").0 = e;
            } else {
                keep = Some(s);
            }
        }
    }

    /// The runs kept (for tests).
    #[cfg(test)]
    fn len(&self) -> usize {
        self.runs.len()
    }
}

fn piece(start: usize, end: usize) -> PageRange {
    PageRange::new(VirtAddr::new(start), end - start).expect("page-aligned, inside a range")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pages(first: usize, n: usize) -> PageRange {
        PageRange::from_pages(VirtAddr::new(0x1000_0000 + first * PAGE_SIZE), n).unwrap()
    }

    #[test]
    fn advice_splits_runs_and_the_query_covers_the_range() {
        let mut m = AttributeMap::default();
        m.apply(pages(10, 10), Advice::ReadMostly);
        m.apply(pages(15, 10), Advice::PreferredLocation(Location::System));
        let got = m.get(pages(0, 30));
        let bounds: Vec<(usize, usize)> = got
            .iter()
            .map(|(r, _)| ((r.start().get() - 0x1000_0000) / PAGE_SIZE, r.pages()))
            .collect();
        assert_eq!(bounds, vec![(0, 10), (10, 5), (15, 5), (20, 5), (25, 5)]);
        assert_eq!(got[0].1, Attributes::default());
        assert!(got[1].1.read_mostly && got[1].1.preferred.is_none());
        assert!(got[2].1.read_mostly && got[2].1.preferred == Some(Location::System));
        assert!(!got[3].1.read_mostly && got[3].1.preferred == Some(Location::System));
        assert_eq!(got[4].1, Attributes::default());
        assert_eq!(m.at(pages(17, 1).start()), got[2].1);
    }

    #[test]
    fn undoing_advice_merges_back_to_nothing() {
        let mut m = AttributeMap::default();
        m.apply(pages(0, 8), Advice::AccessedBy(DeviceId(2)));
        m.apply(pages(4, 8), Advice::AccessedBy(DeviceId(1)));
        assert_eq!(m.at(pages(5, 1).start()).accessed_by, vec![DeviceId(1), DeviceId(2)]);
        assert_eq!(m.len(), 3);
        m.apply(pages(4, 8), Advice::UnsetAccessedBy(DeviceId(1)));
        assert_eq!(m.len(), 1, "equal neighbours join");
        m.apply(pages(0, 8), Advice::UnsetAccessedBy(DeviceId(2)));
        assert_eq!(m.len(), 0, "default attributes are not kept");
        assert_eq!(m.get(pages(0, 12)), vec![(pages(0, 12), Attributes::default())]);
    }

    #[test]
    fn a_granularity_must_be_a_power_of_two_within_a_huge_page() {
        assert!(check(Advice::Granularity(PAGE_SIZE)).is_ok());
        assert!(check(Advice::Granularity(HUGE_PAGE_SIZE)).is_ok());
        for bad in [0, 3 * PAGE_SIZE, 2 * HUGE_PAGE_SIZE, 512] {
            let e = check(Advice::Granularity(bad)).unwrap_err();
            assert!(e.contains("power of two"), "{e}");
        }
    }
}
