//! The registry of an instance's managed ranges, by address.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use super::Range;

/// The managed ranges, and which of their addresses are still theirs.
///
/// A range's memory is its own until the application unmaps part of it
/// (`munmap`, [`ManagedRange::unmap`], the old place of an `mremap`): from
/// then on the kernel may give those addresses to any other mapping, even
/// to a new range of this instance, while the handle of the first range
/// lives on and its records say `Unmapped`. So the registry keeps two maps:
/// every range with a live handle, and the *live spans*, the addresses each
/// still holds. Live spans never overlap; lookups by address (faults,
/// device accesses, events, new ranges' overlap checks) go by them alone.
///
/// A span loses an unmapped part when the fault service handles the
/// kernel's `UNMAP` event for it, after recording its pages `Unmapped`.
/// Before then no other memory of this instance can be there: a new range
/// settles the event stream before it checks for overlap.
/// Changes made to any instance's registry, ever: a thread serving its own
/// fault reads it before it looks an address up (see `crate::inthread`), to
/// tell a fault that may predate a change from one that does not.
static CHANGES: AtomicU64 = AtomicU64::new(0);

/// The count of registry changes so far (see [`CHANGES`]). Allocates nothing.
pub(crate) fn changes() -> u64 {
    CHANGES.load(Ordering::SeqCst)
}

fn changed() {
    CHANGES.fetch_add(1, Ordering::SeqCst);
}

#[derive(Default)]
pub(crate) struct Registry {
    /// Every range, by start and serial.
    all: BTreeMap<(usize, u64), Arc<Range>>,
    /// Live spans by start: end, and the range they belong to.
    live: BTreeMap<usize, (usize, Arc<Range>)>,
    /// The serial of the next range.
    serial: u64,
    /// Registered memory no range holds, by start: end. The new home of an
    /// `mremap` of managed memory keeps the registration (see `remap`), and
    /// so does a range being unmanaged until it is unregistered; a thread
    /// serving its own fault there (`FaultMode::InThread`) must know the
    /// address is this instance's (a userfaultfd fill is no test of that:
    /// the kernel fills any registered memory of the process). Cut as spans
    /// are.
    homes: BTreeMap<usize, usize>,
}

impl Registry {
    /// Every managed range, by address (earlier ranges first at one address).
    pub(crate) fn values(&self) -> impl Iterator<Item = &Arc<Range>> {
        self.all.values()
    }

    pub(crate) fn len(&self) -> usize {
        self.all.len()
    }

    pub(crate) fn next_serial(&mut self) -> u64 {
        self.serial += 1;
        self.serial
    }

    /// Adds `r`, whose whole range is free of live spans.
    pub(crate) fn insert(&mut self, r: Arc<Range>) {
        changed();
        let range = r.range();
        self.live.insert(range.start().get(), (range.end().get(), r.clone()));
        self.all.insert((range.start().get(), r.serial), r);
    }

    /// Takes `r` out, with whatever it still holds.
    pub(crate) fn remove(&mut self, r: &Arc<Range>) {
        changed();
        self.all.remove(&(r.range().start().get(), r.serial));
        self.live.retain(|_, (_, x)| !Arc::ptr_eq(x, r));
    }

    pub(crate) fn clear(&mut self) {
        changed();
        self.all.clear();
        self.live.clear();
        self.homes.clear();
    }

    /// `[start, end)`, the new home of an `mremap` of managed memory (or a
    /// range being unmanaged), stays registered with this instance.
    pub(crate) fn add_home(&mut self, start: usize, end: usize) {
        changed();
        self.cut_homes(start, end);
        self.homes.insert(start, end);
    }

    /// Whether `addr` lies in such a home. Allocates nothing.
    pub(crate) fn is_home(&self, addr: usize) -> bool {
        self.homes.range(..=addr).next_back().is_some_and(|(_, e)| *e > addr)
    }

    /// `[start, end)` is no longer registered memory of this instance.
    pub(crate) fn cut_homes(&mut self, start: usize, end: usize) {
        changed();
        let hit: Vec<(usize, usize)> = self
            .homes
            .range(..end)
            .filter(|(s, e)| **s < end && **e > start)
            .map(|(s, e)| (*s, *e))
            .collect();
        for (s, e) in hit {
            self.homes.remove(&s);
            if s < start {
                self.homes.insert(s, start);
            }
            if e > end {
                self.homes.insert(end, e);
            }
        }
    }

    /// The live spans overlapping `[start, end)`, clipped to it, by address.
    pub(crate) fn live(
        &self,
        start: usize,
        end: usize,
    ) -> impl Iterator<Item = (&Arc<Range>, usize, usize)> {
        // The span that starts below `start` and may reach into it, then
        // those that start inside.
        let below = self.live.range(..start).next_back();
        let inside = self.live.range(start..end);
        below
            .into_iter()
            .chain(inside)
            .filter(move |(s, (e, _))| **s < end && *e > start)
            .map(move |(s, (e, r))| (r, (*s).max(start), (*e).min(end)))
    }

    /// The range holding `addr` now.
    pub(crate) fn find(&self, addr: usize) -> Option<&Arc<Range>> {
        self.live.range(..=addr).next_back().filter(|(_, (e, _))| *e > addr).map(|(_, (_, r))| r)
    }

    /// The latest range whose range covers all of `[start, end)`, whether or
    /// not it still holds it (for messages about memory the application
    /// unmapped).
    pub(crate) fn covering(&self, start: usize, end: usize) -> Option<&Arc<Range>> {
        self.all
            .range(..(start + 1, 0))
            .map(|(_, r)| r)
            .filter(|r| r.range().start().get() <= start && r.range().end().get() >= end)
            .max_by_key(|r| r.serial)
    }

    /// The application unmapped `[start, end)`: no range holds it any more.
    pub(crate) fn cut(&mut self, start: usize, end: usize) {
        changed();
        self.cut_homes(start, end);
        let hit: Vec<(usize, usize, Arc<Range>)> = self
            .live(start, end)
            .map(|(r, _, _)| r.clone())
            .collect::<Vec<_>>()
            .into_iter()
            .flat_map(|r| {
                let spans: Vec<(usize, usize)> = self
                    .live
                    .iter()
                    .filter(|(s, (e, x))| Arc::ptr_eq(x, &r) && **s < end && *e > start)
                    .map(|(s, (e, _))| (*s, *e))
                    .collect();
                spans.into_iter().map(move |(s, e)| (s, e, r.clone()))
            })
            .collect();
        for (s, e, r) in hit {
            self.live.remove(&s);
            if s < start {
                self.live.insert(s, (start, r.clone()));
            }
            if e > end {
                self.live.insert(end, (e, r));
            }
        }
    }
}
