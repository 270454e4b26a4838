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
//! use hmm::{Hmm, PAGE_SIZE, Place, SoftwareDevice, SoftwareDeviceConfig};
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

use crate::addr::{PAGE_SIZE, PageRange};
use crate::page::{DeviceId, Residency};
use crate::space::{Hmm, Inner, RangeStats};

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
/// module docs).
#[derive(Debug, Clone)]
pub struct ResidencyMap {
    range: PageRange,
    places: Vec<Place>,
    devices: BTreeMap<DeviceId, String>,
    stats: RangeStats,
}

impl ResidencyMap {
    /// The range the map covers.
    pub fn range(&self) -> PageRange {
        self.range
    }

    /// One place per page, in address order.
    pub fn places(&self) -> &[Place] {
        &self.places
    }

    /// The map as runs of pages in the same place, in address order.
    pub fn runs(&self) -> Vec<(PageRange, Place)> {
        let mut out: Vec<(PageRange, Place)> = Vec::new();
        for (i, p) in self.places.iter().enumerate() {
            match out.last_mut() {
                Some((r, q)) if q == p => {
                    *r = PageRange::new(r.start(), r.len() + PAGE_SIZE).expect("inside the range");
                }
                _ => {
                    let at = self.range.start().get() + i * PAGE_SIZE;
                    out.push((
                        PageRange::new(crate::addr::VirtAddr::new(at), PAGE_SIZE).expect("a page"),
                        *p,
                    ));
                }
            }
        }
        out
    }

    /// Pages in each place.
    pub fn counts(&self) -> BTreeMap<Place, usize> {
        let mut m = BTreeMap::new();
        for p in &self.places {
            *m.entry(*p).or_default() += 1;
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

    /// The map drawn in `width` characters (at least one): each character
    /// covers an equal share of the pages and shows the place most of them
    /// are in ([`Place::symbol`]); a map of fewer pages than `width` draws
    /// one character per page.
    pub fn render(&self, width: usize) -> String {
        let n = self.places.len();
        let width = width.clamp(1, n.max(1));
        (0..width)
            .map(|c| {
                let (a, b) = (c * n / width, ((c + 1) * n / width).max(c * n / width + 1));
                let mut count: BTreeMap<Place, usize> = BTreeMap::new();
                for p in &self.places[a..b.min(n)] {
                    *count.entry(*p).or_default() += 1;
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

/// `n` bytes in binary units, one decimal.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[u]) }
}

impl Hmm {
    /// Where each page of `range` lives now, with the counters of the managed
    /// ranges it overlaps (see the [module docs](crate::observe)). Pages hmm
    /// does not manage are [`Place::Unmanaged`]. The map holds one entry per
    /// page (a byte each): ask for the ranges of interest, not the whole
    /// address space.
    pub fn residency_map(&self, range: PageRange) -> ResidencyMap {
        residency_map(self.inner(), range)
    }
}

/// [`Hmm::residency_map`], for any holder of the instance.
pub(crate) fn residency_map(inner: &Inner, range: PageRange) -> ResidencyMap {
    let (from, to) = (range.start().get(), range.end().get());
    let mut places = vec![Place::Unmanaged; range.len() / PAGE_SIZE];
    let mut devices = BTreeMap::new();
    let mut stats = RangeStats::default();
    for r in inner.overlapping(from, to) {
        let (a, b) = r.clip(from, to);
        let base = (r.page_addr(a).get() - from) / PAGE_SIZE;
        {
            let t = r.lock();
            stats.count_pages(&t[a..b]);
            for (k, e) in t[a..b].iter().enumerate() {
                places[base + k] = if e.is_migrating() {
                    Place::Migrating
                } else {
                    match e.residency() {
                        Residency::None => Place::Unpopulated,
                        Residency::System => Place::System,
                        Residency::Device(p) => Place::Device(p.dev),
                        Residency::Poisoned => Place::Poisoned,
                        Residency::Unmapped => Place::Unmapped,
                    }
                };
            }
        }
        stats.add_counters(&r.counters);
    }
    for p in &places {
        if let Place::Device(d) = p {
            devices.entry(*d).or_insert_with(|| {
                inner.device(*d).map_or_else(|| format!("device {d}"), |m| m.name().into())
            });
        }
    }
    ResidencyMap { range, places, devices, stats }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_bytes_uses_binary_units() {
        assert_eq!(human_bytes(512), "512 B");
        assert_eq!(human_bytes(4096), "4.0 KiB");
        assert_eq!(human_bytes(3 << 20), "3.0 MiB");
    }
}
