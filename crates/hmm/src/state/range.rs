//! One managed range: its mapping, its page records and counters, and the
//! figures read off them.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use crate::addr::{HUGE_PAGE_SIZE, PAGE_SIZE, PageRange, VirtAddr};
use crate::os::mm::Mapping;
use crate::page::{DeviceId, PageEntry, PageTable, Residency, Segment};

impl RangeStats {
    /// Counts where each of `pages` lives (a page mid-migration counts as
    /// migrating and where its data is).
    pub(crate) fn count_pages(&mut self, t: &PageTable, pages: std::ops::Range<usize>) {
        for_each_run(t, pages, |e, n| {
            let n = n as u64;
            if e.is_migrating() {
                self.pages_migrating += n;
            }
            match e.residency() {
                Residency::None | Residency::Unmapped => self.pages_none += n,
                Residency::System => self.pages_system += n,
                Residency::Device(p) => *self.pages_on_device.entry(p.dev.0).or_default() += n,
                Residency::Poisoned => self.pages_poisoned += n,
            }
        });
    }

    /// Adds the counters of a range.
    pub(crate) fn add_counters(&mut self, c: &RangeCounters) {
        self.migrated_to_device += c.migrated_to_device.load(Ordering::Relaxed);
        self.migrated_to_system += c.migrated_to_system.load(Ordering::Relaxed);
        self.cpu_faults += c.cpu_faults.load(Ordering::Relaxed);
        self.zero_fills += c.zero_fills.load(Ordering::Relaxed);
    }
}

/// Counters of one managed range.
#[derive(Debug, Default)]
pub(crate) struct RangeCounters {
    pub(crate) migrated_to_device: AtomicU64,
    pub(crate) migrated_to_system: AtomicU64,
    pub(crate) cpu_faults: AtomicU64,
    pub(crate) zero_fills: AtomicU64,
    pub(crate) pages_poisoned: AtomicU64,
}

/// Where the pages of a managed range live, and what happened to them.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct RangeStats {
    /// Pages never populated.
    pub pages_none: u64,
    /// Pages in system memory.
    pub pages_system: u64,
    /// Pages resident on each device, by device id.
    pub pages_on_device: BTreeMap<u16, u64>,
    /// Pages poisoned.
    pub pages_poisoned: u64,
    /// Pages being migrated now.
    pub pages_migrating: u64,
    /// Pages migrated to a device.
    pub migrated_to_device: u64,
    /// Pages migrated back to system memory.
    pub migrated_to_system: u64,
    /// CPU faults on device pages served. A fault is counted before the
    /// faulting thread is woken (by drivers that bring the page back with
    /// [`CpuFault::migrate`](crate::CpuFault::migrate), as every driver in
    /// this crate does), so once a touch of a device page has returned, its
    /// fault is in the count. The rest of its fault-around window comes back
    /// after the wake: the page counts above may still be changing then.
    pub cpu_faults: u64,
    /// Pages of never-populated memory filled on a first touch (the touched
    /// page and the window around it), counted before the touching thread is
    /// woken.
    pub zero_fills: u64,
}

/// Where the bytes of managed memory live now (see
/// [`ManagedRange::residence`](crate::ManagedRange::residence), [`Hmm::residence`](crate::Hmm::residence)). Every page is counted
/// once, where its data is (a page mid-migration where its source is), so the
/// parts sum to the memory's size ([`total`](Self::total)).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Residence {
    /// Bytes in system memory.
    pub system: u64,
    /// Bytes in each device's memory, by device.
    pub devices: BTreeMap<DeviceId, u64>,
    /// Bytes never populated (or discarded): they read as zeros and use no memory.
    pub unpopulated: u64,
    /// Bytes lost with a failed device (a touch gets SIGBUS).
    pub poisoned: u64,
    /// Bytes the application unmapped.
    pub unmapped: u64,
}

impl Residence {
    /// The sum of every part: the size of the memory counted.
    pub fn total(&self) -> u64 {
        self.system
            + self.devices.values().sum::<u64>()
            + self.unpopulated
            + self.poisoned
            + self.unmapped
    }

    /// Bytes on device `dev`.
    pub fn on_device(&self, dev: DeviceId) -> u64 {
        self.devices.get(&dev).copied().unwrap_or(0)
    }

    /// Adds the pages of `entries`.
    pub(crate) fn count(&mut self, t: &PageTable) {
        for_each_run(t, 0..t.len(), |e, n| {
            let bytes = (n * PAGE_SIZE) as u64;
            match e.residency() {
                Residency::None => self.unpopulated += bytes,
                Residency::System => self.system += bytes,
                Residency::Device(p) => *self.devices.entry(p.dev).or_default() += bytes,
                Residency::Poisoned => self.poisoned += bytes,
                Residency::Unmapped => self.unmapped += bytes,
            }
        });
    }
}

/// Calls `f` with each entry of `r` and the number of pages it stands for:
/// once per node that holds one record for all its pages, once per page
/// recorded on its own.
pub(crate) fn for_each_run(
    t: &PageTable,
    r: std::ops::Range<usize>,
    mut f: impl FnMut(PageEntry, usize),
) {
    for s in t.segments(r) {
        match s {
            Segment::Same(e, n) => f(e, n),
            Segment::Pages(p) => p.iter().for_each(|e| f(*e, 1)),
        }
    }
}

/// A change of the address space hmm makes itself, whose event the fault
/// service must not take for the application's (see `Inner::own_changes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OwnChange {
    /// A `REMOVE` of exactly this range.
    Remove(PageRange),
    /// An `UNMAP` of exactly this range.
    Unmap(PageRange),
    /// A `REMAP` from, to, length.
    Remap(VirtAddr, VirtAddr, usize),
}

/// One managed range: its memory and its page records.
pub(crate) struct Range {
    /// Unique within the instance: two ranges may start at one address
    /// (the second where the application unmapped the first).
    pub(super) serial: u64,
    /// Always `Some` until drop.
    pub(super) mapping: Option<Mapping>,
    pub(crate) table: Mutex<PageTable>,
    /// Signalled (with `table`) whenever a migration of pages of this range
    /// finishes, for migrations waiting on pages another one holds.
    pub(crate) settled: crate::sync::Signal,
    pub(crate) counters: RangeCounters,
    /// Memory hmm created (freed with the range) rather than adopted.
    pub(crate) created: bool,
    /// Made with [`Hmm::alloc_huge`](crate::Hmm::alloc_huge): first touches and fault-backs work in
    /// whole 2 MiB blocks, so pages stay transparent huge pages end to end.
    pub(crate) huge: bool,
    /// Registered in write-protect mode too: a CPU write to a page a device
    /// maps read-only can be caught (see `Inner::track_writes`).
    pub(crate) wp: bool,
    /// Pin counts by page index ([`ManagedRange::pin`](crate::ManagedRange::pin)): a pinned page stays
    /// in system memory. Lock order: `table`, then `pins`.
    pub(crate) pins: Mutex<BTreeMap<usize, u32>>,
}

impl Range {
    /// Whether page `index` is pinned.
    pub(crate) fn is_pinned(pins: &BTreeMap<usize, u32>, index: usize) -> bool {
        pins.get(&index).is_some_and(|n| *n > 0)
    }

    pub(crate) fn lock_pins(&self) -> MutexGuard<'_, BTreeMap<usize, u32>> {
        self.pins.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Range {
    pub(crate) fn mapping(&self) -> &Mapping {
        self.mapping.as_ref().expect("a range has its mapping until dropped")
    }

    pub(crate) fn range(&self) -> PageRange {
        self.mapping().range()
    }

    /// The 2 MiB-aligned block holding `addr`, if it lies wholly inside the range.
    pub(crate) fn huge_block(&self, addr: VirtAddr) -> Option<PageRange> {
        let start = VirtAddr::new(addr.get() & !(HUGE_PAGE_SIZE - 1));
        let block = PageRange::new(start, HUGE_PAGE_SIZE).ok()?;
        let rr = self.range();
        (rr.start() <= block.start() && block.end() <= rr.end()).then_some(block)
    }

    /// Index of the page holding `addr`.
    pub(crate) fn index(&self, addr: VirtAddr) -> usize {
        addr.offset_from(self.range().start()).expect("inside the range") / PAGE_SIZE
    }

    /// The page indices of `[start, end)` (which overlaps the range) inside it.
    pub(crate) fn clip(&self, start: usize, end: usize) -> (usize, usize) {
        let rr = self.range();
        let a = self.index(VirtAddr::new(start.max(rr.start().get())));
        let b = self.index(VirtAddr::new(end.min(rr.end().get()) - 1)) + 1;
        (a, b)
    }

    pub(crate) fn page_addr(&self, index: usize) -> VirtAddr {
        VirtAddr::new(self.range().start().get() + index * PAGE_SIZE)
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, PageTable> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits (up to `limit`) until no page of `pages` is held by a migration.
    /// Returns whether they all settled.
    pub(crate) fn wait_settled(&self, pages: std::ops::Range<usize>, limit: Duration) -> bool {
        let t = self.lock();
        let (_t, timed_out) = self
            .settled
            .wait_timeout_while(t, limit, |t| t.any(pages.clone(), |e| e.is_migrating()));
        !timed_out
    }
}

impl Drop for Range {
    fn drop(&mut self) {
        // Parts the application unmapped may hold someone else's memory by now.
        let gone: Vec<PageRange> = {
            let t = self.table.get_mut().unwrap_or_else(|e| e.into_inner());
            let start = self.mapping.as_ref().map(|m| m.addr().get()).unwrap_or(0);
            runs_where(t, 0..t.len(), |e| e.residency() == Residency::Unmapped)
                .into_iter()
                .map(|run| {
                    let at = VirtAddr::new(start + run.start * PAGE_SIZE);
                    PageRange::from_pages(at, run.len()).expect("inside the range")
                })
                .collect()
        };
        if let Some(m) = self.mapping.take() {
            m.unmap_except(&gone);
        }
    }
}

/// The runs of pages of `r` not recorded `Unmapped`.
pub(crate) fn mapped_runs(r: &Range) -> Vec<PageRange> {
    let t = r.lock();
    runs_where(&t, 0..t.len(), |e| !e.is_unmapped())
        .into_iter()
        .map(|run| PageRange::from_pages(r.page_addr(run.start), run.len()).expect("inside"))
        .collect()
}

/// The runs of adjacent pages of `pages` of `t` whose entries satisfy
/// `pred`, lowest first.
pub(crate) fn runs_where(
    t: &PageTable,
    pages: std::ops::Range<usize>,
    pred: impl Fn(PageEntry) -> bool,
) -> Vec<std::ops::Range<usize>> {
    let mut out: Vec<std::ops::Range<usize>> = Vec::new();
    let mut at = pages.start;
    for_each_run(t, pages, |e, n| {
        if pred(e) {
            match out.last_mut() {
                Some(last) if last.end == at => last.end += n,
                _ => out.push(at..at + n),
            }
        }
        at += n;
    });
    out
}

/// The devices that hold any page of `pages` of `t`, each once.
pub(crate) fn devices_of(t: &PageTable, pages: std::ops::Range<usize>) -> Vec<DeviceId> {
    let mut d: Vec<DeviceId> = Vec::new();
    for_each_run(t, pages, |e, _| d.extend(e.device_page().map(|p| p.dev)));
    d.sort();
    d.dedup();
    d
}

/// The page addresses `addrs` (in any order, repeats allowed) as runs of
/// adjacent pages, lowest first.
pub(crate) fn runs_of(addrs: &[VirtAddr]) -> Vec<PageRange> {
    let mut a = addrs.to_vec();
    a.sort();
    a.dedup();
    let mut runs: Vec<PageRange> = Vec::new();
    for at in a {
        match runs.last_mut() {
            Some(r) if r.end() == at => {
                *r = PageRange::from_pages(r.start(), r.pages() + 1).expect("grows by a page")
            }
            _ => runs.push(PageRange::from_pages(at, 1).expect("one page")),
        }
    }
    runs
}
