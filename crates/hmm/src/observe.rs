//! Where every page lives, while the program runs: the residency map.
//!
//! [`Hmm::residency_map`] takes any page range of the process, managed by
//! hmm or not, and reads each page's record under its range's lock, one range
//! at a time: a consistent view of each range at the moment it is read,
//! never a torn record. The counters of the managed ranges it overlaps come
//! with it. [`ResidencyMap::render`] draws it as one line of text, which is
//! what `hmm demo` prints between its phases.
//!
//! ```
//! # fn main() -> Result<(), hmm::HmmError> {
//! use hmm::{Hmm, PAGE_SIZE, Place};
//! use hmm_swdev::{SoftwareDevice, SoftwareDeviceConfig};
//! let hmm = Hmm::new()?;
//! let gpu = SoftwareDevice::new(&hmm, SoftwareDeviceConfig::new("gpu0", 1 << 20))?;
//! let r = hmm.alloc(256 * PAGE_SIZE)?;
//! r.fill(0, 4 * PAGE_SIZE, 1)?;
//! gpu.migrate_to_device(r.pages_range(0, 2)?)?;
//! let map = hmm.residency_map(r.range());
//! assert_eq!(map.places()[0], Place::Device(gpu.memory().id()));
//! assert_eq!(map.places()[2], Place::System);
//! assert_eq!(map.places()[255], Place::Unpopulated);
//! let line = map.render(256);
//! assert!(line.starts_with("00SS") && line.ends_with("...."), "{line}");
//! # Ok(()) }
//! ```

use std::collections::BTreeMap;
use std::fmt;
use std::sync::OnceLock;

use crate::addr::{PAGE_SIZE, PageRange, VirtAddr};
use crate::page::{DeviceId, PageEntry, Residency, Segment};
use crate::space::{Hmm, ManagedRange, RangeStats};
use crate::state::Inner;

pub use crate::addr::human_bytes;

/// Where one page is, as the residency map shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum Place {
    /// Not managed by hmm.
    Unmanaged,
    /// Managed, never populated (or discarded): reads as zeros.
    Unpopulated,
    /// In system memory.
    System,
    /// In a device's memory.
    Device(DeviceId),
    /// Held by a migration (or a fault-back) right now.
    Migrating,
    /// Lost with its device: a CPU touch gets SIGBUS.
    Poisoned,
    /// Unmapped by the application.
    Unmapped,
}

impl Place {
    /// The character [`ResidencyMap::render`] draws for this place: a digit
    /// (then a letter) per device, by device id.
    pub fn symbol(self) -> char {
        match self {
            Place::Unmanaged => ' ',
            Place::Unpopulated => '.',
            Place::System => 'S',
            Place::Device(d) => {
                const DIGITS: &[u8] = b"0123456789abcdefghijklmnopqrstuvwxyz";
                char::from(DIGITS[d.index() % DIGITS.len()])
            }
            Place::Migrating => '~',
            Place::Poisoned => 'X',
            Place::Unmapped => '-',
        }
    }
}

/// The place of every page of a range at the time it was read (see the
/// module docs), kept as runs of pages in one place: a map of any range, the
/// whole address space included, costs only as much as the managed memory it
/// overlaps.
#[derive(Debug, Clone)]
pub struct ResidencyMap {
    range: PageRange,
    /// Runs of pages in one place, in address order, covering the range.
    runs: Vec<(PageRange, Place)>,
    /// One place per page (at most [`MAX_PLACES`](Self::MAX_PLACES)), made
    /// from the runs when first asked for.
    places: OnceLock<Vec<Place>>,
    devices: BTreeMap<DeviceId, String>,
    stats: RangeStats,
}

impl ResidencyMap {
    /// The most pages [`places`](Self::places) lists one by one: 2^24 pages,
    /// 64 GiB of address space (a few bytes a page).
    pub const MAX_PLACES: usize = 1 << 24;

    /// A map of `range` from its runs (in address order, covering it).
    fn from_runs(
        range: PageRange,
        runs: Vec<(PageRange, Place)>,
        devices: BTreeMap<DeviceId, String>,
        stats: RangeStats,
    ) -> Self {
        Self { range, runs, places: OnceLock::new(), devices, stats }
    }

    /// The range the map covers.
    pub fn range(&self) -> PageRange {
        self.range
    }

    /// One place per page, in address order.
    ///
    /// Listed from the runs the first time it is asked for. A map of more than
    /// [`MAX_PLACES`](Self::MAX_PLACES) pages lists its first `MAX_PLACES`
    /// pages only, so that a map of a huge range never ends the process for
    /// want of memory: [`runs`](Self::runs), [`counts`](Self::counts) and
    /// [`render`](Self::render) cover all of it, at any size.
    pub fn places(&self) -> &[Place] {
        self.places.get_or_init(|| {
            let n = self.range.pages().min(Self::MAX_PLACES);
            let mut out = Vec::with_capacity(n);
            for (r, p) in &self.runs {
                let k = r.pages().min(n - out.len());
                out.extend(std::iter::repeat_n(*p, k));
                if out.len() == n {
                    break;
                }
            }
            out
        })
    }

    /// The map as runs of pages in the same place, in address order.
    pub fn runs(&self) -> Vec<(PageRange, Place)> {
        self.runs.clone()
    }

    /// Pages in each place.
    pub fn counts(&self) -> BTreeMap<Place, usize> {
        let mut m = BTreeMap::new();
        for (r, p) in &self.runs {
            *m.entry(*p).or_default() += r.pages();
        }
        m
    }

    /// The name of each device whose memory holds a page of the map.
    pub fn devices(&self) -> &BTreeMap<DeviceId, String> {
        &self.devices
    }

    /// The pages of the map counted as [`ManagedRange::stats`] counts them,
    /// and the counters of the managed ranges the map overlaps, summed (pages
    /// migrated each way, CPU faults, first touches: counted per managed
    /// range, so a map of part of a range shows the whole range's counters).
    ///
    /// [`ManagedRange::stats`]: crate::ManagedRange::stats
    pub fn stats(&self) -> &RangeStats {
        &self.stats
    }

    /// The map drawn in `width` characters (at least one, at most
    /// [`MAX_PLACES`](Self::MAX_PLACES)): each character covers an equal
    /// share of the pages and shows the place most of them are in
    /// ([`Place::symbol`]); a map of fewer pages than `width` draws one
    /// character per page.
    pub fn render(&self, width: usize) -> String {
        let n = self.range.pages();
        let width = width.clamp(1, n.min(Self::MAX_PLACES));
        // The first page of column `c` (in 128 bits: `c * n` may not fit a word).
        let share = |c: usize| (c as u128 * n as u128 / width as u128) as usize;
        let first_page = self.range.start().get() / PAGE_SIZE;
        // The pages of run `i`, relative to the map's first page.
        let pages_of = |i: usize| {
            let r = self.runs[i].0;
            let a = r.start().get() / PAGE_SIZE - first_page;
            (a, a + r.pages())
        };
        let mut first_run = 0;
        (0..width)
            .map(|c| {
                let (a, b) = (share(c), share(c + 1).max(share(c) + 1).min(n));
                while first_run + 1 < self.runs.len() && pages_of(first_run).1 <= a {
                    first_run += 1;
                }
                if pages_of(first_run).1 >= b {
                    // The column lies in one run.
                    return self.runs[first_run].1.symbol();
                }
                let mut count: BTreeMap<Place, usize> = BTreeMap::new();
                for i in first_run..self.runs.len() {
                    let (x, y) = pages_of(i);
                    if x >= b {
                        break;
                    }
                    *count.entry(self.runs[i].1).or_default() += y.min(b) - x.max(a);
                }
                count.into_iter().max_by_key(|(p, k)| (*k, *p)).map_or(' ', |(p, _)| p.symbol())
            })
            .collect()
    }

    /// What each symbol of [`render`](Self::render) means, for the places
    /// this map holds.
    pub fn legend(&self) -> String {
        let counts = self.counts();
        counts
            .iter()
            .map(|(p, k)| {
                let what = match p {
                    Place::Unmanaged => "not managed".to_string(),
                    Place::Unpopulated => "never touched".to_string(),
                    Place::System => "system memory".to_string(),
                    Place::Device(d) => {
                        self.devices.get(d).cloned().unwrap_or_else(|| format!("device {d}"))
                    }
                    Place::Migrating => "migrating".to_string(),
                    Place::Poisoned => "lost (SIGBUS)".to_string(),
                    Place::Unmapped => "unmapped".to_string(),
                };
                let sym = match p.symbol() {
                    ' ' => "' '".to_string(),
                    c => c.to_string(),
                };
                format!("{sym} {what} ({})", human_bytes((*k * PAGE_SIZE) as u64))
            })
            .collect::<Vec<_>>()
            .join("   ")
    }
}

impl fmt::Display for ResidencyMap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} [{}]\n  {}", self.range, self.render(64), self.legend())
    }
}

impl ManagedRange {
    /// Where each page of this range lives now, with its counters (see
    /// [`Hmm::residency_map`]).
    pub fn residency_map(&self) -> ResidencyMap {
        residency_map(&self.inner, self.range())
    }
}

impl Hmm {
    /// Where each page of `range` lives now, with the counters of the managed
    /// ranges it overlaps (see the [module docs](crate::observe)). Pages hmm
    /// does not manage are [`Place::Unmanaged`]. The map holds runs of pages
    /// in one place, so any range may be asked for, the whole address space
    /// included; [`ResidencyMap::places`] lists at most
    /// [`ResidencyMap::MAX_PLACES`] pages one by one.
    pub fn residency_map(&self, range: PageRange) -> ResidencyMap {
        residency_map(self.inner(), range)
    }
}

/// Appends `len` bytes from `start` in `place` to `runs`, joining the last
/// run when it is in the same place (runs come in address order, touching).
fn push_run(runs: &mut Vec<(PageRange, Place)>, start: usize, len: usize, place: Place) {
    match runs.last_mut() {
        Some((r, p)) if *p == place => {
            *r = PageRange::new(r.start(), r.len() + len).expect("inside the map's range");
        }
        _ => runs.push((PageRange::new(VirtAddr::new(start), len).expect("a run"), place)),
    }
}

/// [`Hmm::residency_map`], for any holder of the instance.
pub(crate) fn residency_map(inner: &Inner, range: PageRange) -> ResidencyMap {
    let (from, to) = (range.start().get(), range.end().get());
    let mut runs = Vec::new();
    let mut stats = RangeStats::default();
    // By address: each range with the parts it holds.
    let ranges = inner.overlapping(from, to);
    // Everything before `at` has its runs.
    let mut at = from;
    for (r, s, e) in ranges {
        let (a, b) = r.clip(s, e);
        let start = r.page_addr(a).get();
        if start > at {
            push_run(&mut runs, at, start - at, Place::Unmanaged);
        }
        {
            let t = r.lock();
            stats.count_pages(&t, a..b);
            let mut at = start;
            for s in t.segments(a..b) {
                let (e, n) = match s {
                    Segment::Same(e, n) => (e, n),
                    Segment::Pages(p) => {
                        for e in p {
                            push_run(&mut runs, at, PAGE_SIZE, place_of(*e));
                            at += PAGE_SIZE;
                        }
                        continue;
                    }
                };
                push_run(&mut runs, at, n * PAGE_SIZE, place_of(e));
                at += n * PAGE_SIZE;
            }
        }
        at = r.page_addr(b).get();
        stats.add_counters(&r.counters);
    }
    if at < to {
        push_run(&mut runs, at, to - at, Place::Unmanaged);
    }
    let mut devices = BTreeMap::new();
    for (_, p) in &runs {
        if let Place::Device(d) = p {
            devices.entry(*d).or_insert_with(|| {
                inner.device(*d).map_or_else(|| format!("device {d}"), |m| m.name().into())
            });
        }
    }
    ResidencyMap::from_runs(range, runs, devices, stats)
}

/// Where a page whose record is `e` is, for a map.
fn place_of(e: PageEntry) -> Place {
    if e.is_migrating() {
        Place::Migrating
    } else {
        match e.residency() {
            Residency::None => Place::Unpopulated,
            Residency::System => Place::System,
            Residency::Device(p) => Place::Device(p.dev),
            Residency::Poisoned => Place::Poisoned,
            Residency::Unmapped => Place::Unmapped,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A map of 2^40 pages (4 PiB) whose managed part is a few pages in the
    /// middle: counted, drawn and listed from its runs, without a place per
    /// page.
    #[test]
    fn a_huge_map_is_counted_drawn_and_listed_from_its_runs() {
        let range = PageRange::from_pages(VirtAddr::new(0), 1 << 40).unwrap();
        let mid = (1 << 39) * PAGE_SIZE;
        let page = |at: usize, n: usize| PageRange::new(VirtAddr::new(at), n * PAGE_SIZE).unwrap();
        let runs = vec![
            (page(0, 1 << 39), Place::Unmanaged),
            (page(mid, 2), Place::System),
            (page(mid + 2 * PAGE_SIZE, 3), Place::Unpopulated),
            (page(mid + 5 * PAGE_SIZE, (1 << 39) - 5), Place::Unmanaged),
        ];
        let map = ResidencyMap::from_runs(range, runs.clone(), BTreeMap::new(), Default::default());
        assert_eq!(map.runs(), runs);
        let counts = map.counts();
        assert_eq!(counts[&Place::Unmanaged], (1 << 40) - 5);
        assert_eq!((counts[&Place::System], counts[&Place::Unpopulated]), (2, 3));
        assert_eq!(map.render(4), "    ", "five pages are no column's majority");
        assert!(map.legend().contains("S system memory (8.0 KiB)"), "{}", map.legend());
        // Any width, up to the most characters a drawing has.
        assert_eq!(map.render(usize::MAX).len(), ResidencyMap::MAX_PLACES);
        // The pages listed one by one are the first MAX_PLACES.
        let places = map.places();
        assert_eq!(places.len(), ResidencyMap::MAX_PLACES);
        assert!(places.iter().all(|p| *p == Place::Unmanaged));
    }

    /// A map of a few pages lists and draws every page, as it always did.
    #[test]
    fn a_small_map_lists_and_draws_every_page() {
        let page = |i: usize, n: usize| {
            PageRange::new(VirtAddr::new((16 + i) * PAGE_SIZE), n * PAGE_SIZE).unwrap()
        };
        let runs = vec![
            (page(0, 2), Place::System),
            (page(2, 1), Place::Poisoned),
            (page(3, 5), Place::Unmanaged),
        ];
        let map = ResidencyMap::from_runs(page(0, 8), runs, BTreeMap::new(), Default::default());
        use Place::{Poisoned as X, System as S, Unmanaged as U};
        assert_eq!(map.places(), [S, S, X, U, U, U, U, U]);
        assert_eq!(map.render(64), "SSX     ");
        assert_eq!(map.render(4), "SX  ", "ties go to the greater place");
        assert_eq!(map.render(2), "S ");
    }

    /// The residency map of the whole user address space: the pages of a
    /// managed range, where they are, and everything else unmanaged, with
    /// memory for its runs only.
    #[test]
    fn a_map_of_the_whole_address_space_shows_the_managed_pages() {
        if crate::probe::probe().usable().is_err() {
            eprintln!("SKIP: hmm cannot run here");
            return;
        }
        let hmm = Hmm::new().unwrap();
        let r = hmm.alloc(256 * PAGE_SIZE).unwrap();
        // The first pages (and those the fault service populates around them).
        r.fill(0, 4 * PAGE_SIZE, 1).unwrap();
        let all = crate::mirror::address_space();
        let map = hmm.residency_map(all);
        assert_eq!(map.range(), all);
        let runs = map.runs();
        let at = runs.iter().position(|(range, _)| range.start() == r.addr()).unwrap();
        assert_eq!(runs[at - 1].1, Place::Unmanaged);
        let (system, rest) = (runs[at], runs[at + 1]);
        assert!(system.1 == Place::System && system.0.pages() >= 4, "{runs:?}");
        assert_eq!(rest.1, Place::Unpopulated);
        assert_eq!((rest.0.start(), rest.0.end()), (system.0.end(), r.range().end()));
        assert_eq!(runs[at + 2].1, Place::Unmanaged);
        assert_eq!(runs.iter().map(|(range, _)| range.pages()).sum::<usize>(), all.pages());
        let counts = map.counts();
        assert_eq!(counts[&Place::System], system.0.pages());
        assert_eq!(counts[&Place::System] + counts[&Place::Unpopulated], 256);
        assert_eq!(counts.values().sum::<usize>(), all.pages());
        assert_eq!(map.stats().pages_system, system.0.pages() as u64);
        assert_eq!(map.render(64).len(), 64);
        assert!(map.legend().contains("S system memory"), "{}", map.legend());
        // The range's own map, as before: a place per page.
        let own = r.residency_map();
        assert_eq!(own.places().len(), 256);
        assert_eq!((own.places()[0], own.places()[255]), (Place::System, Place::Unpopulated));
        let line = own.render(256);
        assert!(line.starts_with("SSSS") && line.ends_with('.'), "{line}");
    }

    #[test]
    fn human_bytes_uses_binary_units() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(4096), "4.0 KiB");
        assert_eq!(human_bytes(3 << 20), "3.0 MiB");
    }
}
