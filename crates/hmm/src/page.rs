//! Where each managed page's data lives: one 8-byte record per 4 KiB page.
//!
//! This module is pure logic (no system calls) so the state machine can be
//! tested on its own. The legal transitions, and who makes them:
//!
//! ```text
//!            fault service (zero fill)
//!   None ─────────────────────────────▶ System
//!    │  ▲                                 │
//!    │  └── REMOVE / UNMAP event ◀────────┤
//!    │                                    │ migration setup
//!    └─────────────▶ [migrating] ◀────────┘
//!                      │      │
//!      commit (copied) │      │ abort (restore the source)
//!                      ▼      ▼
//!   Device(dev, page) ◀─┘     └─▶ back to None / System / Device
//!    │   ▲
//!    │   └── migration to device (setup marks [migrating] again)
//!    ├──▶ [migrating] ──commit──▶ System   (fault-back, eviction, release)
//!    └──▶ Poisoned                          (its device failed)
//! ```
//!
//! `migrating` is a flag over the source state: while it is set, the page has
//! no CPU mapping (a CPU touch waits), the source is kept until the migration
//! commits or aborts, and no other migration may take the page. An
//! invalidation (the application discarded or unmapped the page) that arrives
//! during a migration sets `invalidated`: the migration then discards both
//! source and destination instead of installing either. An `mremap` that
//! arrives during a migration sets `invalidated` and `moved`: the page's data
//! now belongs at another address, and the migration hands whichever side
//! holds it to the remap forwarding (`crate::remap`) instead of dropping it.
//!
//! Every transition is made under the owning range's table lock.

#![forbid(unsafe_code)]

use std::fmt;

/// Identifies a device's memory region within one `Hmm` instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct DeviceId(pub(crate) u16);

impl DeviceId {
    /// The largest number of device regions an `Hmm` instance can hold.
    pub const MAX: usize = 1 << DEV_BITS;

    /// The identifier as a number (for display and indexing).
    pub fn index(self) -> usize {
        usize::from(self.0)
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "dev{}", self.0)
    }
}

/// One page of a device's memory: which device, which page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DevicePage {
    /// The device region.
    pub dev: DeviceId,
    /// The page's index within the region.
    pub index: u32,
}

impl fmt::Display for DevicePage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.dev, self.index)
    }
}

/// Where a managed page's data lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Residency {
    /// Never populated (or discarded): reads as zeros; no memory is used.
    None,
    /// In system memory, mapped for the CPU.
    System,
    /// In a device page; the CPU mapping is absent and a touch faults it back.
    Device(DevicePage),
    /// Lost with its device: a CPU touch gets SIGBUS.
    Poisoned,
    /// No longer mapped: the application unmapped it.
    Unmapped,
}

const KIND_BITS: u32 = 3;
const KIND_MASK: u64 = (1 << KIND_BITS) - 1;
const MIGRATING: u64 = 1 << 3;
const INVALIDATED: u64 = 1 << 4;
/// With `INVALIDATED`: the invalidation was an unmap.
const GONE: u64 = 1 << 5;
/// With `INVALIDATED`: the application moved the page elsewhere (`mremap`).
const MOVED: u64 = 1 << 6;
/// With `K_DEVICE`: the device page is coherent memory mapped for the CPU at
/// the page's address (the CPU reaches it without faulting).
const CPU_MAPPED: u64 = 1 << 7;
const DEV_SHIFT: u32 = 8;
const DEV_BITS: u32 = 12;
const INDEX_SHIFT: u32 = 20;

const K_NONE: u64 = 0;
const K_SYSTEM: u64 = 1;
const K_DEVICE: u64 = 2;
const K_POISONED: u64 = 3;
const K_UNMAPPED: u64 = 4;

/// The per-page record: residency plus the migration flags, packed in 8 bytes.
///
/// Layout: bits 0-2 kind, bit 3 migrating, bit 4 invalidated, bit 5 unmapped
/// (with bit 4), bit 6 moved (with bit 4), bit 7 mapped for the CPU (a
/// coherent device page), bits 8-19 device, bits 20-51 device page index.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
#[repr(transparent)]
pub struct PageEntry(u64);

const _: () = assert!(std::mem::size_of::<PageEntry>() == 8);
const _: () = assert!(INDEX_SHIFT + 32 <= 64 && DEV_SHIFT + DEV_BITS <= INDEX_SHIFT);

/// A transition the state machine does not allow: a bug in the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("illegal page transition {op} from {from:?}")]
pub struct IllegalTransition {
    /// The transition tried.
    pub op: &'static str,
    /// The entry it was tried on.
    pub from: PageEntry,
}

impl PageEntry {
    /// A never-populated page.
    pub const NONE: PageEntry = PageEntry(K_NONE);
    /// A page in system memory.
    pub const SYSTEM: PageEntry = PageEntry(K_SYSTEM);

    /// The entry for `residency`, not migrating.
    pub fn new(residency: Residency) -> Self {
        match residency {
            Residency::None => Self(K_NONE),
            Residency::System => Self(K_SYSTEM),
            Residency::Device(p) => Self(
                K_DEVICE | (u64::from(p.dev.0) << DEV_SHIFT) | (u64::from(p.index) << INDEX_SHIFT),
            ),
            Residency::Poisoned => Self(K_POISONED),
            Residency::Unmapped => Self(K_UNMAPPED),
        }
    }

    /// Where the data lives (for a migrating page: the source, still authoritative).
    pub fn residency(self) -> Residency {
        match self.0 & KIND_MASK {
            K_NONE => Residency::None,
            K_SYSTEM => Residency::System,
            K_DEVICE => Residency::Device(DevicePage {
                dev: DeviceId(((self.0 >> DEV_SHIFT) & ((1 << DEV_BITS) - 1)) as u16),
                index: (self.0 >> INDEX_SHIFT) as u32,
            }),
            K_POISONED => Residency::Poisoned,
            _ => Residency::Unmapped,
        }
    }

    /// A migration owns the page.
    pub fn is_migrating(self) -> bool {
        self.0 & MIGRATING != 0
    }

    /// The application discarded or unmapped the page during its migration.
    pub fn is_invalidated(self) -> bool {
        self.0 & INVALIDATED != 0
    }

    /// The device page holding the data, when the page lives on a device.
    pub fn device_page(self) -> Option<DevicePage> {
        match self.residency() {
            Residency::Device(p) => Some(p),
            _ => None,
        }
    }

    /// Setup: a migration takes the page. Allowed from `None`, `System` and
    /// `Device` when no other migration holds it.
    pub fn begin_migration(&mut self) -> Result<(), IllegalTransition> {
        match self.residency() {
            Residency::None | Residency::System | Residency::Device(_) if !self.is_migrating() => {
                self.0 = (self.0 & !(INVALIDATED | GONE | MOVED)) | MIGRATING;
                Ok(())
            }
            _ => Err(IllegalTransition { op: "begin_migration", from: *self }),
        }
    }

    /// Commit: the copy reached `to`. Returns `false` when the page was
    /// invalidated meanwhile, and the caller frees a device `to`. The page is
    /// then `Unmapped` after an unmap; after a discard it is `None`, except
    /// when `to` is `System`: the copy was installed at the address, perhaps
    /// after the kernel emptied it, so a page may be there. It must then not
    /// read as `None` ("certainly empty"), or a later migration would take it
    /// for an empty page and move zeros instead of what the CPU wrote to it.
    pub fn commit(&mut self, to: Residency) -> Result<bool, IllegalTransition> {
        if !self.is_migrating() || !matches!(to, Residency::System | Residency::Device(_)) {
            return Err(IllegalTransition { op: "commit", from: *self });
        }
        if self.is_invalidated() {
            *self = match (self.0 & GONE != 0, to) {
                (true, _) => Self(K_UNMAPPED),
                (false, Residency::System) => Self::SYSTEM,
                (false, _) => Self::NONE,
            };
            return Ok(false);
        }
        *self = Self::new(to);
        Ok(true)
    }

    /// Abort: the source stays where it was. Returns `false` when the page was
    /// invalidated meanwhile: it is then `None` (`Unmapped` after an unmap)
    /// and the caller drops the source.
    pub fn abort(&mut self) -> Result<bool, IllegalTransition> {
        if !self.is_migrating() {
            return Err(IllegalTransition { op: "abort", from: *self });
        }
        if self.is_invalidated() {
            *self = if self.0 & GONE != 0 { Self(K_UNMAPPED) } else { Self::NONE };
            return Ok(false);
        }
        self.0 &= !MIGRATING;
        Ok(true)
    }

    /// The application discarded (`unmapped` false) or unmapped the page.
    /// Returns the device page to free, if the page lived on a device and no
    /// migration holds it (a migration frees what it holds when it ends).
    pub fn invalidate(&mut self, unmapped: bool) -> Option<DevicePage> {
        if self.is_migrating() {
            self.0 |= INVALIDATED | if unmapped { GONE } else { 0 };
            return None;
        }
        let freed = self.device_page();
        if self.residency() != Residency::Unmapped {
            *self = if unmapped { Self(K_UNMAPPED) } else { Self::NONE };
        }
        freed
    }

    /// Whether the page lives in coherent device memory that the CPU maps at
    /// its address (so a CPU touch reaches the device page without faulting).
    pub fn is_cpu_mapped(self) -> bool {
        self.0 & CPU_MAPPED != 0
    }

    /// Records that the page's coherent device page is (or is no longer)
    /// mapped for the CPU. Only for a page that lives on a device.
    pub fn set_cpu_mapped(&mut self, mapped: bool) -> Result<(), IllegalTransition> {
        if self.device_page().is_none() {
            return Err(IllegalTransition { op: "set_cpu_mapped", from: *self });
        }
        if mapped {
            self.0 |= CPU_MAPPED;
        } else {
            self.0 &= !CPU_MAPPED;
        }
        Ok(())
    }

    /// The application moved the page (`mremap`) while a migration holds it:
    /// the page is invalidated at this address, and whoever holds it hands its
    /// data on to the new one. Only for a migrating page.
    pub fn mark_moved(&mut self) -> Result<(), IllegalTransition> {
        if !self.is_migrating() {
            return Err(IllegalTransition { op: "mark_moved", from: *self });
        }
        self.0 |= INVALIDATED | MOVED;
        Ok(())
    }

    /// Whether the application unmapped the page: recorded `Unmapped`, or
    /// unmapped while a migration holds it.
    pub fn is_unmapped(self) -> bool {
        self.residency() == Residency::Unmapped
            || self.0 & (INVALIDATED | GONE) == INVALIDATED | GONE
    }

    /// Whether an `mremap` moved the page while a migration held it.
    pub fn is_moved(self) -> bool {
        self.0 & MOVED != 0
    }

    /// The fault service filled a never-populated page (`None` → `System`).
    pub fn populate(&mut self) -> Result<(), IllegalTransition> {
        match self.residency() {
            Residency::None | Residency::System if !self.is_migrating() => {
                *self = Self::SYSTEM;
                Ok(())
            }
            _ => Err(IllegalTransition { op: "populate", from: *self }),
        }
    }

    /// The page's device failed: returns the device page, now lost.
    pub fn poison(&mut self) -> Result<DevicePage, IllegalTransition> {
        match self.device_page() {
            Some(p) if !self.is_migrating() => {
                *self = Self(K_POISONED);
                Ok(p)
            }
            _ => Err(IllegalTransition { op: "poison", from: *self }),
        }
    }
}

impl fmt::Debug for PageEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.residency())?;
        if self.is_migrating() {
            f.write_str("+migrating")?;
        }
        if self.is_moved() {
            f.write_str("+moved")?;
        }
        if self.is_cpu_mapped() {
            f.write_str("+cpu-mapped")?;
        }
        if self.is_invalidated() {
            f.write_str("+invalidated")?;
        }
        Ok(())
    }
}

// ---- the per-range table of records --------------------------------------------

/// Pages recorded by one leaf: a 2 MiB block, as one page-table page maps.
const LEAF_SHIFT: u32 = 9;
const LEAF_PAGES: usize = 1 << LEAF_SHIFT;
/// Pages recorded by one middle node: 1 GiB.
const MID_SHIFT: u32 = 2 * LEAF_SHIFT;
const MID_PAGES: usize = 1 << MID_SHIFT;

/// A leaf: one record per page, or one record standing for every page of it.
enum Leaf {
    Same(PageEntry),
    Pages(Box<[PageEntry]>),
}

/// A middle node: its leaves, or one record standing for every page of it.
enum Mid {
    Same(PageEntry),
    Leaves(Box<[Leaf]>),
}

/// The records of one managed range, indexed by page.
///
/// Laid out as a page table is: a middle node per 1 GiB and a leaf per 2 MiB,
/// each made only when a page of it gets a record of its own. A node that was
/// never made, or whose pages all went back to the same blank record (see
/// [`PageEntry::is_blank`]: never populated, or unmapped), holds that one
/// record for all of them. So the table costs memory for the blocks in use,
/// not for the range's size: a terabyte range that is never touched costs a
/// few kilobytes, and unmapping or discarding a block gives its leaf back.
///
/// Reading an entry (`t[i]`) makes nothing; writing one (`&mut t[i]`) makes
/// the nodes above it. Range updates that may blank many pages at once (an
/// unmap, a discard) go through [`update`](Self::update), which never makes a
/// node for pages that are blank already.
pub(crate) struct PageTable {
    len: usize,
    top: Vec<Mid>,
}

/// A run of entries of a [`PageTable`], as [`PageTable::segments`] yields them.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Segment<'a> {
    /// `n` pages all recorded `entry` (a node that holds one record for all).
    Same(PageEntry, usize),
    /// Pages recorded one by one.
    Pages(&'a [PageEntry]),
}

impl Segment<'_> {
    /// The number of pages the run covers.
    pub(crate) fn pages(&self) -> usize {
        match self {
            Segment::Same(_, n) => *n,
            Segment::Pages(p) => p.len(),
        }
    }
}

impl PageEntry {
    /// Whether one record may stand for many pages in a range's table of records: a
    /// page never populated (`None`) or unmapped, with no flag set. Such a
    /// record holds nothing page-specific (no device page, no migration).
    pub fn is_blank(self) -> bool {
        self == Self::NONE || self == Self(K_UNMAPPED)
    }
}

impl PageTable {
    /// The records of `len` pages, all `None`. Fails only when the top level
    /// (24 bytes per 1 GiB of range) cannot be allocated.
    pub(crate) fn new(len: usize) -> Result<Self, std::collections::TryReserveError> {
        let mids = len.div_ceil(MID_PAGES);
        let mut top = Vec::new();
        top.try_reserve_exact(mids)?;
        top.extend((0..mids).map(|_| Mid::Same(PageEntry::NONE)));
        Ok(Self { len, top })
    }

    /// The number of pages recorded.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The pages node `first..` of `per` pages covers, clipped to the table.
    fn node_end(&self, first: usize, per: usize) -> usize {
        (first + per).min(self.len)
    }

    /// The entries of `r`, in order.
    pub(crate) fn iter(&self, r: std::ops::Range<usize>) -> impl Iterator<Item = PageEntry> + '_ {
        assert!(r.end <= self.len, "entries {r:?} of a table of {}", self.len);
        r.map(move |i| self[i])
    }

    /// The entries of `r` as runs: one per node that holds a single record,
    /// one per stretch of a leaf that holds records page by page. Reading a
    /// huge, mostly blank range this way costs a step per node, not per page.
    pub(crate) fn segments(&self, r: std::ops::Range<usize>) -> impl Iterator<Item = Segment<'_>> {
        assert!(r.end <= self.len, "entries {r:?} of a table of {}", self.len);
        let mut i = r.start;
        std::iter::from_fn(move || {
            if i >= r.end {
                return None;
            }
            let seg = match &self.top[i >> MID_SHIFT] {
                Mid::Same(e) => {
                    let end = self.node_end(i & !(MID_PAGES - 1), MID_PAGES).min(r.end);
                    Segment::Same(*e, end - i)
                }
                Mid::Leaves(leaves) => {
                    let first = i & !(LEAF_PAGES - 1);
                    let end = self.node_end(first, LEAF_PAGES).min(r.end);
                    match &leaves[(i >> LEAF_SHIFT) & (LEAF_PAGES - 1)] {
                        Leaf::Same(e) => Segment::Same(*e, end - i),
                        Leaf::Pages(p) => Segment::Pages(&p[i - first..end - first]),
                    }
                }
            };
            i += seg.pages();
            Some(seg)
        })
    }

    /// Whether any entry of `r` satisfies `pred` (asked once per run of one record).
    pub(crate) fn any(&self, r: std::ops::Range<usize>, pred: impl Fn(PageEntry) -> bool) -> bool {
        self.segments(r).any(|s| match s {
            Segment::Same(e, _) => pred(e),
            Segment::Pages(p) => p.iter().any(|e| pred(*e)),
        })
    }

    /// The first index of `r` whose entry satisfies `pred`.
    pub(crate) fn position(
        &self,
        r: std::ops::Range<usize>,
        pred: impl Fn(PageEntry) -> bool,
    ) -> Option<usize> {
        let mut at = r.start;
        for s in self.segments(r) {
            let found = match s {
                Segment::Same(e, _) => pred(e).then_some(0),
                Segment::Pages(p) => p.iter().position(|e| pred(*e)),
            };
            if let Some(k) = found {
                return Some(at + k);
            }
            at += s.pages();
        }
        None
    }

    /// Applies `page` to every entry of `r`, making the nodes they need.
    pub(crate) fn for_each_mut(
        &mut self,
        r: std::ops::Range<usize>,
        mut page: impl FnMut(usize, &mut PageEntry),
    ) {
        assert!(r.end <= self.len, "entries {r:?} of a table of {}", self.len);
        for i in r {
            page(i, &mut self[i]);
        }
    }

    /// Applies an update to every entry of `r`: `same` to a node that holds
    /// one blank record for all its pages (once, for all of them; it must
    /// depend on the record alone), `page` to each page recorded on its own.
    /// A node whose pages all end up with the same blank record becomes one
    /// record again, and its memory is given back.
    ///
    /// Where `same` returns a record that is not blank, the node is made
    /// after all and `page` is applied to each of its pages instead.
    pub(crate) fn update(
        &mut self,
        r: std::ops::Range<usize>,
        same: impl Fn(PageEntry) -> PageEntry,
        mut page: impl FnMut(usize, &mut PageEntry),
    ) {
        assert!(r.end <= self.len, "entries {r:?} of a table of {}", self.len);
        let mut i = r.start;
        while i < r.end {
            let m = i >> MID_SHIFT;
            let mid_first = m << MID_SHIFT;
            let mid_end = self.node_end(mid_first, MID_PAGES);
            if let Mid::Same(e) = self.top[m] {
                let after = same(e);
                if i == mid_first && r.end >= mid_end && after.is_blank() {
                    self.top[m] = Mid::Same(after);
                    i = mid_end;
                    continue;
                }
                self.make_leaves(m);
            }
            let leaf_first = i & !(LEAF_PAGES - 1);
            let leaf_end = self.node_end(leaf_first, LEAF_PAGES);
            let stop = leaf_end.min(r.end);
            let Mid::Leaves(leaves) = &mut self.top[m] else { unreachable!("made above") };
            let leaf = &mut leaves[(i >> LEAF_SHIFT) & (LEAF_PAGES - 1)];
            if let Leaf::Same(e) = *leaf {
                let after = same(e);
                if i == leaf_first && stop == leaf_end && after.is_blank() {
                    *leaf = Leaf::Same(after);
                } else {
                    *leaf = Leaf::Pages(vec![e; leaf_end - leaf_first].into_boxed_slice());
                }
            }
            if let Leaf::Pages(p) = leaf {
                for k in i..stop {
                    page(k, &mut p[k - leaf_first]);
                }
                let first = p[0];
                if i == leaf_first
                    && stop == leaf_end
                    && first.is_blank()
                    && p.iter().all(|e| *e == first)
                {
                    *leaf = Leaf::Same(first);
                }
            }
            i = stop;
            if i == mid_end || i == r.end {
                self.collapse(m);
            }
        }
    }

    /// Gives middle node `m` leaves of its own (each holding its one record).
    fn make_leaves(&mut self, m: usize) {
        if let Mid::Same(e) = self.top[m] {
            let first = m << MID_SHIFT;
            let n = (self.node_end(first, MID_PAGES) - first).div_ceil(LEAF_PAGES);
            self.top[m] = Mid::Leaves((0..n).map(|_| Leaf::Same(e)).collect());
        }
    }

    /// Makes middle node `m` one record again if all its leaves hold the same one.
    fn collapse(&mut self, m: usize) {
        if let Mid::Leaves(leaves) = &self.top[m]
            && let Some(Leaf::Same(e)) = leaves.first()
            && leaves.iter().all(|l| matches!(l, Leaf::Same(x) if x == e))
        {
            self.top[m] = Mid::Same(*e);
        }
    }

    /// Bytes of memory the table uses.
    pub(crate) fn bytes(&self) -> usize {
        let mut n = std::mem::size_of::<Self>() + self.top.capacity() * std::mem::size_of::<Mid>();
        for mid in &self.top {
            if let Mid::Leaves(leaves) = mid {
                n += leaves.len() * std::mem::size_of::<Leaf>();
                for l in leaves.iter() {
                    if let Leaf::Pages(p) = l {
                        n += p.len() * std::mem::size_of::<PageEntry>();
                    }
                }
            }
        }
        n
    }
}

impl std::ops::Index<usize> for PageTable {
    type Output = PageEntry;

    fn index(&self, i: usize) -> &PageEntry {
        assert!(i < self.len, "page {i} of a table of {}", self.len);
        match &self.top[i >> MID_SHIFT] {
            Mid::Same(e) => e,
            Mid::Leaves(leaves) => match &leaves[(i >> LEAF_SHIFT) & (LEAF_PAGES - 1)] {
                Leaf::Same(e) => e,
                Leaf::Pages(p) => &p[i & (LEAF_PAGES - 1)],
            },
        }
    }
}

impl std::ops::IndexMut<usize> for PageTable {
    /// The record of page `i`, made (with the nodes above it) if it had none
    /// of its own.
    fn index_mut(&mut self, i: usize) -> &mut PageEntry {
        assert!(i < self.len, "page {i} of a table of {}", self.len);
        let m = i >> MID_SHIFT;
        self.make_leaves(m);
        let leaf_first = i & !(LEAF_PAGES - 1);
        let n = self.node_end(leaf_first, LEAF_PAGES) - leaf_first;
        let Mid::Leaves(leaves) = &mut self.top[m] else { unreachable!("made above") };
        let leaf = &mut leaves[(i >> LEAF_SHIFT) & (LEAF_PAGES - 1)];
        if let Leaf::Same(e) = *leaf {
            *leaf = Leaf::Pages(vec![e; n].into_boxed_slice());
        }
        let Leaf::Pages(p) = leaf else { unreachable!("made above") };
        &mut p[i - leaf_first]
    }
}

impl fmt::Debug for PageTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PageTable").field("pages", &self.len).field("bytes", &self.bytes()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dp(dev: u16, index: u32) -> DevicePage {
        DevicePage { dev: DeviceId(dev), index }
    }

    #[test]
    fn packs_every_residency_losslessly() {
        let max_dev = (DeviceId::MAX - 1) as u16;
        for r in [
            Residency::None,
            Residency::System,
            Residency::Device(dp(0, 0)),
            Residency::Device(dp(max_dev, u32::MAX)),
            Residency::Device(dp(7, 123_456)),
            Residency::Poisoned,
            Residency::Unmapped,
        ] {
            let e = PageEntry::new(r);
            assert_eq!(e.residency(), r);
            assert!(!e.is_migrating() && !e.is_invalidated());
        }
    }

    #[test]
    fn migration_to_device_commits_or_restores() {
        let mut e = PageEntry::SYSTEM;
        e.begin_migration().unwrap();
        assert!(e.is_migrating());
        assert_eq!(e.residency(), Residency::System, "the source stays authoritative");
        assert!(e.begin_migration().is_err(), "a second migration cannot take it");
        assert!(e.commit(Residency::Device(dp(1, 9))).unwrap());
        assert_eq!(e.device_page(), Some(dp(1, 9)));

        let mut e = PageEntry::NONE;
        e.begin_migration().unwrap();
        assert!(e.abort().unwrap());
        assert_eq!(e, PageEntry::NONE);
    }

    #[test]
    fn a_move_during_migration_is_an_invalidation_that_remembers_the_move() {
        let mut e = PageEntry::SYSTEM;
        assert!(e.mark_moved().is_err(), "only a held page can be moved on");
        let mut e = PageEntry::new(Residency::Device(dp(0, 3)));
        e.begin_migration().unwrap();
        e.mark_moved().unwrap();
        assert!(e.is_moved() && e.is_invalidated());
        assert!(!e.is_unmapped());
        assert_eq!(e.invalidate(true), None, "a later unmap of the old address frees nothing");
        assert!(e.is_unmapped());
        assert!(!e.abort().unwrap());
        assert!(e.is_unmapped());
        assert_eq!(e.residency(), Residency::Unmapped);
        assert!(!e.is_moved(), "the mark ends with the migration");

        let mut e = PageEntry::SYSTEM;
        e.begin_migration().unwrap();
        e.mark_moved().unwrap();
        assert!(!e.abort().unwrap());
        assert_eq!(e, PageEntry::NONE, "MREMAP_DONTUNMAP leaves the old address empty");
        e.begin_migration().unwrap();
        assert!(!e.is_moved(), "a new migration starts unmarked");
    }

    #[test]
    fn invalidation_during_migration_discards_both_sides() {
        let mut e = PageEntry::new(Residency::Device(dp(0, 3)));
        e.begin_migration().unwrap();
        assert_eq!(e.invalidate(false), None, "the migration frees what it holds");
        assert!(e.is_invalidated());
        assert!(!e.commit(Residency::System).unwrap());
        assert_eq!(e, PageEntry::SYSTEM, "the copy may have landed after the discard");

        let mut e = PageEntry::SYSTEM;
        e.begin_migration().unwrap();
        e.invalidate(false);
        assert!(!e.commit(Residency::Device(dp(0, 4))).unwrap());
        assert_eq!(e, PageEntry::NONE, "the staged source went with the discard");

        let mut e = PageEntry::SYSTEM;
        e.begin_migration().unwrap();
        e.invalidate(true);
        assert!(!e.abort().unwrap());
        assert_eq!(e.residency(), Residency::Unmapped);

        let mut e = PageEntry::new(Residency::Device(dp(0, 3)));
        e.begin_migration().unwrap();
        e.invalidate(true);
        assert!(!e.commit(Residency::System).unwrap());
        assert_eq!(e.residency(), Residency::Unmapped);
    }

    #[test]
    fn invalidation_frees_device_pages_and_marks_unmapped() {
        let mut e = PageEntry::new(Residency::Device(dp(2, 5)));
        assert_eq!(e.invalidate(false), Some(dp(2, 5)));
        assert_eq!(e, PageEntry::NONE);
        let mut e = PageEntry::new(Residency::Device(dp(2, 6)));
        assert_eq!(e.invalidate(true), Some(dp(2, 6)));
        assert_eq!(e.residency(), Residency::Unmapped);
        assert_eq!(e.invalidate(false), None);
        assert_eq!(e.residency(), Residency::Unmapped, "unmapped stays unmapped");
        assert!(e.begin_migration().is_err(), "an unmapped page cannot migrate");
    }

    #[test]
    fn only_device_pages_are_mapped_for_the_cpu_and_the_mark_goes_with_them() {
        assert!(PageEntry::SYSTEM.clone().set_cpu_mapped(true).is_err());
        let mut e = PageEntry::new(Residency::Device(dp(1, 2)));
        e.set_cpu_mapped(true).unwrap();
        assert!(e.is_cpu_mapped());
        assert_eq!(e.device_page(), Some(dp(1, 2)));
        e.begin_migration().unwrap();
        assert!(e.is_cpu_mapped(), "setup unmaps it, and says so");
        e.set_cpu_mapped(false).unwrap();
        assert!(e.abort().unwrap());
        assert!(!e.is_cpu_mapped());
        e.set_cpu_mapped(true).unwrap();
        assert_eq!(e.invalidate(true), Some(dp(1, 2)));
        assert!(!e.is_cpu_mapped(), "an unmapped page maps nothing");
        let mut e = PageEntry::new(Residency::Device(dp(1, 3)));
        e.set_cpu_mapped(true).unwrap();
        e.begin_migration().unwrap();
        assert!(e.commit(Residency::System).unwrap());
        assert!(!e.is_cpu_mapped());
    }

    #[test]
    fn illegal_transitions_are_refused() {
        let mut e = PageEntry::new(Residency::Poisoned);
        assert!(e.begin_migration().is_err());
        assert!(e.populate().is_err());
        assert!(PageEntry::SYSTEM.clone().commit(Residency::System).is_err());
        assert!(PageEntry::SYSTEM.clone().abort().is_err());
        let mut m = PageEntry::SYSTEM;
        m.begin_migration().unwrap();
        assert!(m.commit(Residency::Poisoned).is_err());
        assert!(m.populate().is_err());
        assert!(PageEntry::SYSTEM.clone().poison().is_err());
        let mut d = PageEntry::new(Residency::Device(dp(0, 1)));
        assert_eq!(d.poison().unwrap(), dp(0, 1));
        assert_eq!(d.residency(), Residency::Poisoned);
    }

    fn table_of(t: &PageTable) -> Vec<PageEntry> {
        t.iter(0..t.len()).collect()
    }

    #[test]
    fn a_table_costs_memory_for_the_blocks_in_use_not_the_range() {
        let pages = 1usize << 32; // 16 TiB
        let mut t = PageTable::new(pages).unwrap();
        let empty = t.bytes();
        assert!(empty < 512 << 10, "an untouched 16 TiB range costs {empty} bytes");
        assert_eq!(t[pages - 1], PageEntry::NONE);
        t[pages - 1].populate().unwrap();
        t[7].populate().unwrap();
        let two = t.bytes() - empty;
        assert!(two <= 2 * (LEAF_PAGES * 8 + LEAF_PAGES * 24), "two pages in use cost {two} bytes");
        assert_eq!(t[pages - 1], PageEntry::SYSTEM);
        assert_eq!(t[pages - 2], PageEntry::NONE);
        assert_eq!(t.position(0..pages, |e| e == PageEntry::SYSTEM), Some(7));
        assert!(t.any(pages - 10..pages, |e| e == PageEntry::SYSTEM));
        assert!(!t.any(8..pages - 1, |e| e == PageEntry::SYSTEM));
        let segs: usize = t.segments(0..pages).map(|s| s.pages()).sum();
        assert_eq!(segs, pages, "the runs cover every page once");
        assert!(t.segments(0..pages).count() < 20_000, "one step per untouched node");
    }

    #[test]
    fn unmapping_everything_gives_the_leaves_back_and_records_every_page() {
        let pages = 3 * MID_PAGES + 1000; // ends in a part node
        let mut t = PageTable::new(pages).unwrap();
        let empty = t.bytes();
        for i in [0, 5, LEAF_PAGES + 3, MID_PAGES + 9, pages - 1] {
            t[i].populate().unwrap();
        }
        t[MID_PAGES + 10] = PageEntry::new(Residency::Device(dp(1, 4)));
        assert!(t.bytes() > empty);
        let mut freed = Vec::new();
        t.update(
            0..pages,
            |mut e| {
                assert_eq!(e.invalidate(true), None);
                e
            },
            |_, e| freed.extend(e.invalidate(true)),
        );
        assert_eq!(freed, [dp(1, 4)]);
        assert_eq!(t.bytes(), empty, "every node went back to one record");
        assert!(t.iter(0..pages).all(|e| e.residency() == Residency::Unmapped));
    }

    #[test]
    fn a_partial_update_touches_only_its_pages() {
        let pages = 2 * LEAF_PAGES + 17;
        let mut t = PageTable::new(pages).unwrap();
        for i in 0..pages {
            t[i].populate().unwrap();
        }
        let mut model = table_of(&t);
        let r = 100..LEAF_PAGES + 300;
        t.update(
            r.clone(),
            |e| e,
            |_, e| {
                e.invalidate(false);
            },
        );
        for e in &mut model[r.clone()] {
            e.invalidate(false);
        }
        assert_eq!(table_of(&t), model);
        // Blank pages of a blank leaf in the middle of a range: unmapped in place.
        let mut t = PageTable::new(pages).unwrap();
        t.update(
            3..pages - 3,
            |mut e| {
                e.invalidate(true);
                e
            },
            |_, e| {
                e.invalidate(true);
            },
        );
        let got = table_of(&t);
        assert!(got[..3].iter().chain(&got[pages - 3..]).all(|e| *e == PageEntry::NONE));
        assert!(got[3..pages - 3].iter().all(|e| e.residency() == Residency::Unmapped));
    }

    #[test]
    fn a_migrating_page_keeps_its_leaf() {
        let mut t = PageTable::new(LEAF_PAGES).unwrap();
        t[4].begin_migration().unwrap();
        t.update(
            0..LEAF_PAGES,
            |e| e,
            |_, e| {
                e.invalidate(true);
            },
        );
        assert!(t[4].is_migrating() && t[4].is_invalidated());
        assert_eq!(t[5].residency(), Residency::Unmapped);
        assert!(t.bytes() > std::mem::size_of::<PageTable>() + LEAF_PAGES * 8);
    }
}
