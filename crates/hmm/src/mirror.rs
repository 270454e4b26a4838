//! The mirror: interval notifiers and `range_fault` (SEMANTICS.md part 1).
//!
//! A device keeps its own page table, filled from the CPU's. Two things keep it
//! true:
//!
//! - **Interval notifiers** ([`Hmm::insert_notifier`]): a callback over a range
//!   of the address space (any range, managed by hmm or not). Every change hmm
//!   makes or learns of ([`InvalidationEvent`]) calls the callbacks of the
//!   notifiers it overlaps, each with the part of the range it covers, the
//!   event and a new sequence number.
//! - **The retry protocol**, as the kernel's `mmu_interval_read_begin` /
//!   `mmu_interval_read_retry`: a device fills its page table as
//!
//!   ```text
//!   loop {
//!       seq = notifier.read_begin()       // waits out invalidations in progress
//!       info = hmm.range_fault(...)       // no device lock held
//!       lock(device page table)
//!       if notifier.read_retry(seq) { unlock; continue }   // changed meanwhile
//!       install(info); unlock; break
//!   }
//!   ```
//!
//!   and its callback takes the same lock to clear entries. An invalidation
//!   bumps the sequence *before* calling the callback, so a fill either sees
//!   the new sequence (and retries) or installs before the callback runs (and
//!   the callback clears it): no device ever keeps a translation of a page
//!   after the callback for that page returned.
//!
//! # When callbacks run relative to the change
//!
//! For the changes hmm makes (migration, [`ManagedRange::protect`],
//! [`ManagedRange::unmap`], release), callbacks run *before* the change, as in
//! the kernel. For what the application does directly, hmm learns from
//! userfaultfd events: `MADV_DONTNEED`/`MADV_REMOVE` (`REMOVE`) and `munmap` /
//! `mremap` (`UNMAP`, `REMAP`) of managed memory. The kernel lets the
//! application's call return once the event is read, so callbacks run moments
//! after the call returns. A device that reaches system pages through the
//! kernel (as the software device does, see [`crate::os::vm`]) sees the
//! current mapping meanwhile (zeros, or `EFAULT`), never freed memory.
//!
//! # Locks
//!
//! A callback must not call back into hmm's migrations or `range_fault`, and a
//! device must not hold the lock its callback takes across `range_fault` or
//! any access that can fault into hmm's fault service: the service calls
//! callbacks, so it would wait on the device that waits on it.
//!
//! [`ManagedRange::protect`]: crate::ManagedRange::protect
//! [`ManagedRange::unmap`]: crate::ManagedRange::unmap
//! [`Hmm::insert_notifier`]: crate::Hmm::insert_notifier

use std::time::{Duration, Instant};

use crate::addr::{HUGE_PAGE_SIZE, PAGE_SIZE, PageRange, VirtAddr};
use crate::interval::{IntervalKey, IntervalTree};
use crate::os::pagemap::{Categories, ScanRequest};
use crate::os::vm::VmaInfo;
use crate::page::{DeviceId, DevicePage, Residency};
use crate::space::Inner;
use crate::sync::{Arc, AtomicU64, Condvar, Mutex, Ordering, RwLock};

/// What changed, as the kernel's `mmu_notifier_event`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvalidationEvent {
    /// The range was unmapped (`munmap`, `mremap` away, a range dropped).
    Unmap,
    /// The pages were discarded (`MADV_DONTNEED`, `MADV_REMOVE`) or lost
    /// (poisoned with their device); the range stays mapped.
    Clear,
    /// The protection changed (`mprotect` through hmm).
    Protection,
    /// The pages are being migrated, for `owner` (the device whose memory is
    /// the destination, or the device whose pages come back). A device may
    /// ignore its own migrations only if it updates its table itself.
    Migrate {
        /// The device the migration is for.
        owner: Option<DeviceId>,
    },
    /// The address space is going away (the `Hmm` instance shuts down).
    Release,
    /// A device takes exclusive access to the pages.
    Exclusive {
        /// The device taking them.
        owner: DeviceId,
    },
    /// The process forked: pages became copy-on-write.
    Fork,
}

/// One invalidation, as a callback receives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Invalidation {
    /// The part of the changed range this notifier covers.
    pub range: PageRange,
    /// What changed.
    pub event: InvalidationEvent,
    /// The notifier's new sequence number.
    pub seq: u64,
}

pub(crate) type Callback = Box<dyn Fn(&Invalidation) + Send + Sync>;

/// One notifier's state, shared between its handle and the registry.
pub(crate) struct NotifierState {
    range: PageRange,
    /// Set to a new value when an invalidation starts.
    seq: AtomicU64,
    /// Invalidations whose callback is running.
    busy: Mutex<u32>,
    idle: Condvar,
    callback: Callback,
}

impl NotifierState {
    fn end(&self) {
        let mut b = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        *b -= 1;
        if *b == 0 {
            self.idle.notify_all();
        }
    }

    fn wait_idle(&self) {
        let mut b = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        while *b > 0 {
            b = self.idle.wait(b).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// [`IntervalNotifier::read_begin`]. The sequence is read under the
    /// `busy` lock, under which `Notifiers::start` moves it, once no
    /// invalidation is in progress: read after waiting without the lock, it
    /// could be the sequence of an invalidation that started in between and
    /// is still running, which `read_retry` would then let pass.
    pub(crate) fn read_begin(&self) -> u64 {
        let mut b = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        while *b > 0 {
            b = self.idle.wait(b).unwrap_or_else(|e| e.into_inner());
        }
        self.seq.load(Ordering::Acquire)
    }

    /// [`IntervalNotifier::read_retry`].
    pub(crate) fn read_retry(&self, seq: u64) -> bool {
        self.seq.load(Ordering::Acquire) != seq
    }
}

/// The registry of an instance's notifiers.
pub(crate) struct Notifiers {
    tree: RwLock<IntervalTree<Arc<NotifierState>>>,
    /// The last sequence number handed out (always even; 0 before any).
    seq: AtomicU64,
}

impl std::fmt::Debug for Notifiers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifiers").field("seq", &self.seq.load(Ordering::Relaxed)).finish()
    }
}

impl Notifiers {
    pub(crate) fn new() -> Self {
        Self { tree: RwLock::new(IntervalTree::new()), seq: AtomicU64::new(0) }
    }

    /// Calls every notifier overlapping `range` with `event`, and keeps them
    /// *invalidating* until the returned guard is dropped: the caller makes
    /// its change to the page tables meanwhile, and no device can start a
    /// fill ([`IntervalNotifier::read_begin`] waits) until it is done (the
    /// kernel's `invalidate_range_start` / `_end`). The callbacks run on the
    /// calling thread, one after another, and have all returned when this does.
    pub(crate) fn start(&self, range: PageRange, event: InvalidationEvent) -> Invalidating {
        // Every notifier is marked busy and its sequence moved before any
        // callback runs, so a fill of any of them that checks after this point
        // retries. Both under the notifier's `busy` lock, under which
        // `read_begin` reads the sequence: it gets the new one only once the
        // invalidation has ended. And before the tree's lock is let go, so that
        // a removal (which takes it to write, then waits until the notifier is
        // not busy) cannot return before this invalidation's callback runs.
        let mut seq = 0;
        let hits: Vec<Arc<NotifierState>> = {
            let tree = self.tree.read().unwrap_or_else(|e| e.into_inner());
            let mut v = Vec::new();
            tree.for_each_overlapping(range.start().get(), range.end().get(), |_, _, _, n| {
                if seq == 0 {
                    seq = self.seq.fetch_add(2, Ordering::AcqRel) + 2;
                }
                let mut busy = n.busy.lock().unwrap_or_else(|e| e.into_inner());
                *busy += 1;
                n.seq.store(seq, Ordering::Release);
                drop(busy);
                v.push(n.clone())
            });
            v
        };
        if hits.is_empty() {
            return Invalidating(hits, None);
        }
        let mut span = crate::trace::span("invalidate", crate::trace::Category::Invalidate);
        if let Some(s) = &mut span {
            s.arg("addr", range.start().get() as u64);
            s.arg("pages", range.pages() as u64);
            s.arg("notifiers", hits.len() as u64);
        }
        for n in &hits {
            let start = range.start().max(n.range.start());
            let end = range.end().min(n.range.end());
            let part = PageRange::new(start, end.get() - start.get()).expect("overlap");
            (n.callback)(&Invalidation { range: part, event, seq });
        }
        Invalidating(hits, span)
    }

    /// [`start`](Self::start) for a change already made visible to fills
    /// (pages marked migrating first): the invalidation ends at once.
    /// Returns how many notifiers were called.
    pub(crate) fn invalidate(&self, range: PageRange, event: InvalidationEvent) -> usize {
        self.start(range, event).0.len()
    }

    /// Invalidates everything (shut-down).
    pub(crate) fn invalidate_all(&self, event: InvalidationEvent) -> usize {
        self.invalidate(address_space(), event)
    }

    pub(crate) fn len(&self) -> usize {
        self.tree.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Adds a notifier over `range` ([`IntervalNotifier::insert`] wraps it
    /// with the instance; the model tests use it bare).
    pub(crate) fn register(
        &self,
        range: PageRange,
        callback: Callback,
    ) -> (IntervalKey, Arc<NotifierState>) {
        let state = Arc::new(NotifierState {
            range,
            seq: AtomicU64::new(self.seq.load(Ordering::Acquire)),
            busy: Mutex::new(0),
            idle: Condvar::new(),
            callback,
        });
        let key = self.tree.write().unwrap_or_else(|e| e.into_inner()).insert(
            range.start().get(),
            range.end().get(),
            state.clone(),
        );
        (key, state)
    }

    /// Removes the notifier [`register`](Self::register) returned, after
    /// waiting for an invalidation of it in progress to end.
    pub(crate) fn unregister(&self, key: IntervalKey, state: &NotifierState) {
        self.tree.write().unwrap_or_else(|e| e.into_inner()).remove(key);
        state.wait_idle();
    }
}

/// An invalidation in progress (see [`Notifiers::start`]): fills of the
/// notifiers it called wait until it is dropped.
#[must_use = "the invalidation ends when this is dropped: hold it across the change"]
/// The span recorded for the trace, if on, ends when the guard drops.
pub(crate) struct Invalidating(Vec<Arc<NotifierState>>, Option<crate::trace::Span>);

impl Drop for Invalidating {
    fn drop(&mut self) {
        for n in &self.0 {
            n.end();
        }
        drop(self.1.take());
    }
}

/// An interval notifier: a callback over a range, and the sequence number of
/// the retry protocol (see the [module docs](self)). Dropping it removes it,
/// after waiting for a callback in progress to return.
pub struct IntervalNotifier {
    inner: Arc<Inner>,
    key: IntervalKey,
    state: Arc<NotifierState>,
}

impl std::fmt::Debug for IntervalNotifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IntervalNotifier")
            .field("range", &self.state.range)
            .field("seq", &self.state.seq.load(Ordering::Relaxed))
            .finish()
    }
}

impl IntervalNotifier {
    pub(crate) fn insert(
        inner: &Arc<Inner>,
        range: PageRange,
        callback: Callback,
    ) -> IntervalNotifier {
        let (key, state) = inner.notifiers.register(range, callback);
        IntervalNotifier { inner: inner.clone(), key, state }
    }

    /// The range it covers.
    pub fn range(&self) -> PageRange {
        self.state.range
    }

    /// Starts a read of the CPU page table for this range: waits until no
    /// invalidation is in progress, and returns the sequence to check with
    /// [`read_retry`](Self::read_retry). Must not be called with the lock the
    /// callback takes held.
    pub fn read_begin(&self) -> u64 {
        self.state.read_begin()
    }

    /// Whether an invalidation started since [`read_begin`](Self::read_begin)
    /// returned `seq`: if so, what was read may be stale and must be read again.
    /// Call it under the lock the callback takes, just before installing.
    pub fn read_retry(&self, seq: u64) -> bool {
        self.state.read_retry(seq)
    }
}

impl Drop for IntervalNotifier {
    fn drop(&mut self) {
        self.inner.notifiers.unregister(self.key, &self.state);
    }
}

// ---- range_fault ---------------------------------------------------------------------

/// What a device asks of a page (the kernel's `HMM_PFN_REQ_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FaultFlags(u8);

impl FaultFlags {
    /// Only report.
    pub const NONE: FaultFlags = FaultFlags(0);
    /// Fault the page in if it is not valid.
    pub const FAULT: FaultFlags = FaultFlags(1);
    /// Fault it in writable (implies `FAULT`).
    pub const WRITE: FaultFlags = FaultFlags(3);

    /// Whether every bit of `other` is set.
    pub const fn contains(self, other: FaultFlags) -> bool {
        self.0 & other.0 == other.0
    }
}

impl std::ops::BitOr for FaultFlags {
    type Output = FaultFlags;
    fn bitor(self, rhs: FaultFlags) -> FaultFlags {
        FaultFlags(self.0 | rhs.0)
    }
}

impl std::ops::BitAnd for FaultFlags {
    type Output = FaultFlags;
    fn bitand(self, rhs: FaultFlags) -> FaultFlags {
        FaultFlags(self.0 & rhs.0)
    }
}

/// A `range_fault` request.
#[derive(Debug, Clone)]
pub struct RangeFault<'a> {
    /// The pages.
    pub range: PageRange,
    /// Flags every page gets.
    pub default_flags: FaultFlags,
    /// Which bits of `per_page` count.
    pub flags_mask: FaultFlags,
    /// One entry per page of `range` (or empty): each page asks for
    /// `(per_page[i] & flags_mask) | default_flags`.
    pub per_page: &'a [FaultFlags],
    /// The asking device: its own private pages are reported, never faulted.
    pub owner: Option<DeviceId>,
    /// How long to retry pages that are busy (mid-migration, or changing).
    pub timeout: Duration,
}

impl<'a> RangeFault<'a> {
    /// Reports `range` without faulting anything (a snapshot).
    pub fn snapshot(range: PageRange, owner: Option<DeviceId>) -> Self {
        Self {
            range,
            default_flags: FaultFlags::NONE,
            flags_mask: FaultFlags::NONE,
            per_page: &[],
            owner,
            timeout: Self::DEFAULT_TIMEOUT,
        }
    }

    /// Faults every page of `range` in (writable when `write`).
    pub fn fault(range: PageRange, write: bool, owner: Option<DeviceId>) -> Self {
        Self {
            default_flags: if write { FaultFlags::WRITE } else { FaultFlags::FAULT },
            ..Self::snapshot(range, owner)
        }
    }

    /// The retry bound the kernel uses (`HMM_RANGE_DEFAULT_TIMEOUT`).
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);

    /// The most pages one request may cover: 2^20 pages, 4 GiB of address
    /// space. A request keeps about a hundred bytes of bookkeeping per page
    /// while it runs and returns a [`PageInfo`] per page (and
    /// `hmm_swdev::SoftwareDevice::read`, held to the same
    /// bound, a buffer of the range's bytes), so a longer one is refused with
    /// [`RangeFaultError::TooLarge`] before anything is allocated, rather than
    /// ending the process for want of memory. A device faults what it is
    /// about to touch, a few pages or megabytes at a time; 4 GiB is four
    /// times the largest snapshot the benchmarks take. Split a longer range
    /// into parts of at most this many pages.
    pub const MAX_PAGES: usize = 1 << 20;

    fn wanted(&self, i: usize) -> FaultFlags {
        let p = self.per_page.get(i).copied().unwrap_or_default();
        (p & self.flags_mask) | self.default_flags
    }
}

/// What `range_fault` found for one page (the kernel's `HMM_PFN_*` output).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PageInfo {
    /// The page can be mapped by the device (readable).
    pub valid: bool,
    /// It can be mapped writable.
    pub write: bool,
    /// No mapping, no access, or poisoned: the device must not map it.
    pub error: bool,
    /// The shared zero page (read-only).
    pub zero: bool,
    /// Mapping order: 0 for 4 KiB, 9 for a 2 MiB huge page, 18 for 1 GiB.
    pub order: u8,
    /// A device page: of the asking device when `valid` (reported, never
    /// faulted), of another device otherwise (valid only when coherent).
    pub device: Option<DevicePage>,
    /// The device page is coherent memory the CPU maps: any device may map
    /// it (another device reaches it as the CPU does), and nothing is faulted.
    pub coherent: bool,
}

/// Why `range_fault` failed (the kernel's `-EBUSY`, `-EPERM`, `-EFAULT`, `-ENOMEM`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RangeFaultError {
    /// Pages stayed busy (mid-migration) until the timeout: retry later.
    #[error("{range} stayed busy for {timeout:?} (pages mid-migration): retry")]
    Busy {
        /// The range asked for.
        range: PageRange,
        /// The timeout that ran out.
        timeout: Duration,
    },
    /// A write was asked of a page the mapping does not allow writing.
    #[error("write to read-only memory at {addr}: the mapping does not allow writing")]
    PermissionDenied {
        /// The first such page.
        addr: VirtAddr,
    },
    /// A fault was asked of a page that has no mapping, no access, or is lost.
    #[error("cannot fault in {addr}: {reason}")]
    Fault {
        /// The first such page.
        addr: VirtAddr,
        /// Why.
        reason: String,
    },
    /// The kernel could not allocate memory for the page.
    #[error("out of memory faulting in {addr}")]
    OutOfMemory {
        /// The first page that failed.
        addr: VirtAddr,
    },
    /// The request is malformed.
    #[error("bad range_fault request: {0}")]
    BadRequest(String),
    /// The range holds more pages than one request may cover
    /// ([`RangeFault::MAX_PAGES`]): split it.
    #[error(
        "{range} is {pages} pages, more than one device fault, snapshot or read may cover \
         ({max_pages} pages, {max_bytes}): split it into parts of at most that many pages",
        pages = range.pages(),
        max_pages = RangeFault::MAX_PAGES,
        max_bytes = crate::observe::human_bytes((RangeFault::MAX_PAGES * PAGE_SIZE) as u64)
    )]
    TooLarge {
        /// The range asked for.
        range: PageRange,
    },
    /// The page tables could not be read.
    #[error("cannot read the page tables of {range}: {error}")]
    Inspect {
        /// The range.
        range: PageRange,
        /// What failed.
        error: String,
    },
}

/// What one pass found that needs doing before the answer is final.
#[derive(Default)]
struct Pending {
    /// Pages mid-migration.
    busy: bool,
    /// Runs to populate, and whether for write.
    populate: Vec<(PageRange, bool)>,
    /// Pages of other devices to bring back.
    bring_back: Vec<(VirtAddr, DevicePage)>,
    /// Runs of managed pages reported read-only in a writable area (the zero
    /// page): CPU writes to them are tracked once the answer is final.
    read_only: Vec<PageRange>,
}

impl Inner {
    /// The kernel's `hmm_range_fault` (see [`Hmm::range_fault`](crate::Hmm::range_fault)).
    pub(crate) fn range_fault(
        self: &Arc<Self>,
        req: &RangeFault<'_>,
    ) -> Result<Vec<PageInfo>, RangeFaultError> {
        // Before anything: a pass allocates several entries per page.
        check_size(req.range)?;
        if !req.per_page.is_empty() && req.per_page.len() != req.range.pages() {
            return Err(RangeFaultError::BadRequest(format!(
                "{} per-page flags for {} pages",
                req.per_page.len(),
                req.range.pages()
            )));
        }
        let mut span = crate::trace::span("device fault", crate::trace::Category::DeviceFault);
        if let Some(s) = &mut span {
            s.arg("addr", req.range.start().get() as u64);
            s.arg("pages", req.range.pages() as u64);
        }
        self.sync_device_access();
        let deadline = Instant::now() + req.timeout;
        let mut delay = Duration::from_micros(50);
        loop {
            let (info, pending) = self.range_fault_pass(req)?;
            if !pending.busy && pending.populate.is_empty() && pending.bring_back.is_empty() {
                self.track_writes(&pending.read_only);
                return Ok(info);
            }
            self.resolve(&pending)?;
            if pending.busy {
                if Instant::now() >= deadline {
                    return Err(RangeFaultError::Busy { range: req.range, timeout: req.timeout });
                }
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_millis(5));
            } else if Instant::now() >= deadline {
                return Err(RangeFaultError::Busy { range: req.range, timeout: req.timeout });
            }
        }
    }

    /// One look at the page tables: the answer, and what must be done first.
    /// Allocates several entries per page: `range_fault` has checked the
    /// size ([`check_size`]).
    fn range_fault_pass(
        &self,
        req: &RangeFault<'_>,
    ) -> Result<(Vec<PageInfo>, Pending), RangeFaultError> {
        let range = req.range;
        let inspect = |error: String| RangeFaultError::Inspect { range, error };
        let n = range.pages();
        let base = range.start().get();
        let page_addr = |i: usize| VirtAddr::new(base + i * PAGE_SIZE);
        let mut info = vec![PageInfo::default(); n];
        // Areas: which pages are mapped, and what they allow.
        let vmas = self.vma_query().map_err(|e| inspect(e.to_string()))?;
        let vmas = vmas.overlapping(range).map_err(|e| inspect(format!("/proc/self/maps: {e}")))?;
        let mut vma_of: Vec<Option<VmaInfo>> = vec![None; n];
        for v in &vmas {
            let (a, b) = clip(range, v.range);
            vma_of[a..b].iter_mut().for_each(|x| *x = Some(*v));
        }
        // The CPU page table.
        let pm = self.pagemap().map_err(|e| inspect(e.to_string()))?;
        let req_scan = ScanRequest {
            return_mask: Categories::PRESENT
                | Categories::PFNZERO
                | Categories::HUGE
                | Categories::FILE
                | Categories::SWAPPED,
            ..ScanRequest::default()
        };
        let mut cats = vec![Categories::NONE; n];
        for region in pm.scan(range, &req_scan).map_err(|e| inspect(e.to_string()))? {
            let (a, b) = clip(range, region.range);
            cats[a..b].iter_mut().for_each(|c| *c = region.categories);
        }
        // hmm's own records, for managed memory.
        let mut residency: Vec<Option<(Residency, bool)>> = vec![None; n];
        let mut cpu_mapped = vec![false; n];
        // Pages of a 2 MiB block that lives whole in one huge device page.
        let mut device_huge = vec![false; n];
        for (r, s, e) in self.overlapping(range.start().get(), range.end().get()) {
            let held = PageRange::new(VirtAddr::new(s), e - s).expect("a part of the range");
            let (a, b) = clip(range, held);
            let first = r.index(page_addr(a));
            let t = r.lock();
            for (k, e) in t.iter(first..first + (b - a)).enumerate() {
                residency[a + k] = Some((e.residency(), e.is_migrating()));
                cpu_mapped[a + k] = e.is_cpu_mapped();
            }
            let mut block = page_addr(a).get() & !(HUGE_PAGE_SIZE - 1);
            while block < base + b * PAGE_SIZE {
                if let Some(whole) = r.huge_block(VirtAddr::new(block)) {
                    let i = r.index(whole.start());
                    if is_device_huge_page(&t, i..i + HUGE_PAGE_SIZE / PAGE_SIZE) {
                        let (x, y) = clip(range, whole);
                        device_huge[x..y].iter_mut().for_each(|h| *h = true);
                    }
                }
                block += HUGE_PAGE_SIZE;
            }
        }
        let mut pending = Pending::default();
        let push_populate = |i: usize, write: bool, pending: &mut Pending| {
            let addr = page_addr(i);
            match pending.populate.last_mut() {
                Some((run, w)) if *w == write && run.end() == addr => {
                    *run = PageRange::new(run.start(), run.len() + PAGE_SIZE).expect("run");
                }
                _ => pending.populate.push((PageRange::from_pages(addr, 1).expect("page"), write)),
            }
        };
        for i in 0..n {
            let want = req.wanted(i);
            let fault = want.contains(FaultFlags::FAULT);
            let write = want.contains(FaultFlags::WRITE);
            let addr = page_addr(i);
            let p = &mut info[i];
            // A page the device must not map: an error, fatal if a fault was asked.
            let unusable = |p: &mut PageInfo, reason: &str| {
                p.error = true;
                match fault {
                    true => Err(RangeFaultError::Fault { addr, reason: reason.into() }),
                    false => Ok(()),
                }
            };
            let Some(v) = vma_of[i].filter(|v| v.read) else {
                let reason =
                    if vma_of[i].is_some() { "no access to it" } else { "nothing is mapped there" };
                unusable(p, reason)?;
                continue;
            };
            if write && !v.write {
                return Err(RangeFaultError::PermissionDenied { addr });
            }
            p.order = v.order();
            match residency[i] {
                Some((_, true)) => {
                    pending.busy = true;
                    continue;
                }
                Some((Residency::Device(d), false)) => {
                    p.device = Some(d);
                    p.coherent = cpu_mapped[i];
                    if Some(d.dev) == req.owner || cpu_mapped[i] {
                        p.valid = true;
                        p.write = v.write;
                        p.order = if device_huge[i] { 9 } else { 0 };
                    } else if fault {
                        pending.bring_back.push((addr, d));
                    }
                    continue;
                }
                Some((Residency::Poisoned, false)) => {
                    unusable(p, "its device failed (the page is poisoned)")?;
                    continue;
                }
                Some((Residency::Unmapped, false)) => {
                    unusable(p, "nothing is mapped there")?;
                    continue;
                }
                _ => {}
            }
            let c = cats[i];
            if c.contains(Categories::PRESENT) {
                p.valid = true;
                p.zero = c.contains(Categories::PFNZERO);
                // A private file page not yet written is shared with the page
                // cache (copy-on-write): not writable until faulted for write.
                p.write = v.write && !p.zero && (!c.contains(Categories::FILE) || v.shared);
                if c.contains(Categories::HUGE) && p.order == 0 {
                    p.order = 9;
                }
            }
            if (fault && !p.valid) || (write && !p.write) {
                push_populate(i, write, &mut pending);
            } else if p.valid && !p.write && v.write && residency[i].is_some() {
                match pending.read_only.last_mut() {
                    Some(run) if run.end() == addr => {
                        *run = PageRange::new(run.start(), run.len() + PAGE_SIZE).expect("run");
                    }
                    _ => pending.read_only.push(PageRange::from_pages(addr, 1).expect("page")),
                }
            }
        }
        Ok((info, pending))
    }

    /// Does what a pass found pending: brings pages back, populates.
    fn resolve(self: &Arc<Self>, pending: &Pending) -> Result<(), RangeFaultError> {
        // Runs of adjacent pages of one device come back in one migration.
        let mut i = 0;
        let bb = &pending.bring_back;
        while i < bb.len() {
            let (addr, d) = bb[i];
            let mut j = i + 1;
            while j < bb.len()
                && bb[j].1.dev == d.dev
                && bb[j].0.get() == addr.get() + (j - i) * PAGE_SIZE
            {
                j += 1;
            }
            let pages = j - i;
            i = j;
            let (Some(r), Some(mem)) = (self.find(addr), self.device(d.dev)) else { continue };
            // A run never leaves the range that holds its first page.
            let end = (addr.get() + pages * PAGE_SIZE).min(r.range().end().get());
            let run = PageRange::new(addr, end - addr.get()).expect("run");
            if let Err(e) = self.bring_back(r, run, &mem) {
                return Err(RangeFaultError::Fault {
                    addr,
                    reason: format!("cannot bring it back from {}: {e}", d.dev),
                });
            }
        }
        for (run, write) in &pending.populate {
            if let Err(e) = crate::os::vm::populate(*run, *write) {
                let errno = match &e {
                    crate::os::mm::MmError::Advise { errno, .. } => *errno,
                    _ => rustix::io::Errno::FAULT,
                };
                return Err(match errno {
                    // The area went away since the pass looked (ENOMEM is also
                    // "not mapped"): the next pass reports it.
                    rustix::io::Errno::NOMEM if !self.still_mapped(*run) => continue,
                    rustix::io::Errno::NOMEM => RangeFaultError::OutOfMemory { addr: run.start() },
                    rustix::io::Errno::INTR | rustix::io::Errno::AGAIN => continue,
                    rustix::io::Errno::INVAL => RangeFaultError::Fault {
                        addr: run.start(),
                        reason: "the mapping cannot be faulted in (changed protection, or an I/O mapping)"
                            .into(),
                    },
                    _ => RangeFaultError::Fault { addr: run.start(), reason: e.to_string() },
                });
            }
        }
        Ok(())
    }

    fn still_mapped(&self, run: PageRange) -> bool {
        self.vma_query()
            .ok()
            .and_then(|q| q.overlapping(run).ok())
            .is_some_and(|v| crate::os::vm::first_uncovered(run, &v, |_| true).is_none())
    }
}

/// Refuses a range longer than [`RangeFault::MAX_PAGES`].
pub(crate) fn check_size(range: PageRange) -> Result<(), RangeFaultError> {
    match range.pages() > RangeFault::MAX_PAGES {
        true => Err(RangeFaultError::TooLarge { range }),
        false => Ok(()),
    }
}

/// `range` in parts of at most [`RangeFault::MAX_PAGES`] pages, in address
/// order: for hmm's own faults over a range that may be longer.
pub(crate) fn parts(range: PageRange) -> impl Iterator<Item = PageRange> {
    let step = RangeFault::MAX_PAGES * PAGE_SIZE;
    (range.start().get()..range.end().get()).step_by(step).map(move |at| {
        PageRange::new(VirtAddr::new(at), step.min(range.end().get() - at)).expect("inside range")
    })
}

/// Whether the entries of a 2 MiB block live in one huge device page: one
/// device's pages, a run aligned to 512 in the block's order, none migrating
/// (the device can map the block with one entry, as a 2 MiB device page).
fn is_device_huge_page(t: &crate::page::PageTable, block: std::ops::Range<usize>) -> bool {
    let Some(first) = t[block.start].device_page() else { return false };
    (first.index as usize).is_multiple_of(block.len())
        && t.iter(block).enumerate().all(|(k, e)| {
            !e.is_migrating()
                && e.device_page()
                    == Some(DevicePage { dev: first.dev, index: first.index + k as u32 })
        })
}

/// The whole user address space (the lower half), for notifiers that mirror
/// everything.
pub(crate) fn address_space() -> PageRange {
    let top = (usize::MAX / 2) & !(PAGE_SIZE - 1);
    PageRange::new(VirtAddr::new(PAGE_SIZE), top - PAGE_SIZE).expect("the user address space")
}

/// The page indices of `part` (clipped) within `range`.
fn clip(range: PageRange, part: PageRange) -> (usize, usize) {
    let s = range.start().get().max(part.start().get());
    let e = range.end().get().min(part.end().get());
    if s >= e {
        return (0, 0);
    }
    ((s - range.start().get()) / PAGE_SIZE, (e - range.start().get()) / PAGE_SIZE)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// hmm's own faults over a long range go in parts a request may cover,
    /// end to end; a short range is one part.
    #[test]
    fn parts_split_a_long_range_at_the_bound() {
        let max = RangeFault::MAX_PAGES;
        let long = PageRange::from_pages(VirtAddr::new(1 << 30), 2 * max + 3).unwrap();
        let p: Vec<PageRange> = parts(long).collect();
        assert_eq!(p.iter().map(|r| r.pages()).collect::<Vec<_>>(), [max, max, 3]);
        assert_eq!((p[0].start(), p[2].end()), (long.start(), long.end()));
        assert!(p.windows(2).all(|w| w[0].end() == w[1].start()));
        assert!(p.iter().all(|r| check_size(*r).is_ok()));
        assert_eq!(check_size(long), Err(RangeFaultError::TooLarge { range: long }));
        let short = PageRange::from_pages(VirtAddr::new(1 << 30), 8).unwrap();
        assert_eq!(parts(short).collect::<Vec<_>>(), [short]);
    }
}
