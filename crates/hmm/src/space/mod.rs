//! The address space hmm manages, as applications see it: an [`Hmm`]
//! instance, its life (start, manage, unmanage, shut down), and the
//! operations on it. The state it works on is `crate::state`; the managed
//! ranges' handles are in [`range`](self::ManagedRange).

mod range;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::addr::{HUGE_PAGE_SIZE, PageRange, VirtAddr};
use crate::devmem::{DeviceMemory, DeviceMemoryConfig, DevicePagemapOps};
use crate::migrate::{Migration, MigrationReport, Selection};
use crate::mirror::{
    IntervalNotifier, Invalidation, InvalidationEvent, PageInfo, RangeFault, RangeFaultError,
};
use crate::os::maps;
use crate::os::mm::{Advise, Backing, Mapping, Protection};
use crate::os::uffd::Features;
use crate::page::{DeviceId, DevicePage, Residency};
use crate::state::{Inner, Range, devices_of, for_each_run, mapped_runs};

pub use self::range::{FaultStall, ManagedRange, MirroredRange, Pin};
pub use crate::error::{AdoptRefusal, HmmError, Unsettled};
pub use crate::state::{FaultMode, HmmConfig, RangeStats, Residence};

/// How long shutdown waits for the fault service to stop.
const SERVICE_STOP: Duration = Duration::from_secs(30);

/// An arena in memory hmm manages (see [`Hmm::arena`]); its owner is the
/// managed range, whose [`stats`](ManagedRange::stats) it shares.
pub type Arena = crate::os::arena::Arena<ManagedRange>;

/// An hmm instance: one userfaultfd, one fault service thread, the ranges it
/// manages and the device memory registered with it.
///
/// Dropping it brings every device-resident page back to system memory, stops
/// the fault service and leaves the ranges as plain memory.
///
/// ```
/// # fn main() -> Result<(), hmm::HmmError> {
/// use hmm::{Hmm, PAGE_SIZE, Residency};
/// use hmm_swdev::{SoftwareDevice, SoftwareDeviceConfig};
/// let hmm = Hmm::new()?; // says what the kernel lacks when it cannot start
/// let gpu = SoftwareDevice::new(&hmm, SoftwareDeviceConfig::new("gpu0", 1 << 20))?;
/// let r = hmm.alloc(4 * PAGE_SIZE)?;
/// r.write(0, b"hello")?;
/// assert_eq!(gpu.migrate_to_device(r.range())?.migrated, 4);
/// assert!(matches!(r.residency(0), Residency::Device(_)));
/// let mut b = [0u8; 5];
/// r.read(0, &mut b)?; // faults the page back
/// assert_eq!(&b, b"hello");
/// assert_eq!(hmm.residence().total(), 4 * PAGE_SIZE as u64);
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Hmm {
    inner: Arc<Inner>,
}

impl Hmm {
    /// Starts an instance with the default configuration.
    pub fn new() -> Result<Self, HmmError> {
        Self::with_config(HmmConfig::default())
    }

    /// Starts an instance.
    pub fn with_config(config: HmmConfig) -> Result<Self, HmmError> {
        if config.fault_around_pages > HmmConfig::MAX_FAULT_AROUND {
            return Err(HmmError::Config(format!(
                "fault_around_pages {} exceeds {}",
                config.fault_around_pages,
                HmmConfig::MAX_FAULT_AROUND
            )));
        }
        let inner = Inner::new(config)?;
        let handle = crate::fault::start(inner.clone()).map_err(HmmError::Thread)?;
        *inner.service.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle);
        if inner.uffd.features().contains(Features::EVENT_FORK) {
            crate::fork::register(&inner);
        }
        let me = Self { inner };
        if me.inner.config.fault_mode == FaultMode::InThread {
            // On error the instance is dropped, and shut down, here.
            crate::inthread::enable(&me.inner)?;
        }
        Ok(me)
    }

    /// The configuration.
    pub fn config(&self) -> HmmConfig {
        self.inner.config
    }

    /// A new managed range of `len` bytes (private anonymous, read-write, never populated).
    pub fn alloc(&self, len: usize) -> Result<ManagedRange, HmmError> {
        let m = Mapping::anonymous(len, Protection::ReadWrite)?;
        self.manage(m, true, false, false)
    }

    /// A new managed range aligned to 2 MiB with transparent huge pages enabled.
    ///
    /// The range works in whole 2 MiB blocks where it can: a first touch fills
    /// the block around it with a zeroed huge page (moved in with one
    /// `UFFDIO_MOVE`), migrations move huge pages whole when the device's pages
    /// for the block are contiguous, and a CPU touch of a device page brings
    /// its whole block back. A block that is partly populated, or whose huge
    /// page the kernel cannot allocate, works page by page.
    pub fn alloc_huge(&self, len: usize) -> Result<ManagedRange, HmmError> {
        let m = Mapping::anonymous_aligned(len, HUGE_PAGE_SIZE, Protection::ReadWrite)?;
        m.advise(m.range(), Advise::HugePage)?;
        self.manage(m, true, false, true)
    }

    /// A new managed range of `len` bytes holding an [`Arena`]: ordinary Rust
    /// values placed in memory hmm manages, which migrations move like any
    /// other page (a CPU touch of a value on a device faults it back).
    ///
    /// ```
    /// # fn main() -> Result<(), hmm::HmmError> {
    /// let hmm = hmm::Hmm::new()?;
    /// let arena = hmm.arena(1 << 20)?;
    /// let node = arena.alloc([7u64; 4])?;
    /// node[1] = 9;
    /// assert_eq!(hmm.residency(arena.range().start()), Some(hmm::Residency::System));
    /// # Ok(()) }
    /// ```
    pub fn arena(&self, len: usize) -> Result<Arena, HmmError> {
        let r = Arc::new(self.alloc(len)?);
        Ok(Arena::new(r, |r| r.range.mapping())?)
    }

    /// Adopts memory the application already has: a [`Mapping`] it made, or one
    /// lent with [`Mapping::from_raw`] (an `mmap` of its own, a page-aligned
    /// buffer). The memory must be private, readable and writable, and not the
    /// heap or a stack; its contents stay as they are. A private file mapping
    /// is first turned into anonymous memory with the same contents
    /// ([`Mapping::into_anonymous`]): the file is never written, as a private
    /// mapping never writes back. Shared memory is refused with the reason.
    pub fn adopt(&self, mapping: Mapping) -> Result<ManagedRange, HmmError> {
        let range = mapping.range();
        let refuse = |reason| Err(HmmError::Adopt { range, reason });
        let mapping = match mapping.backing() {
            Backing::PrivateAnon => mapping,
            Backing::SharedAnon => return refuse(AdoptRefusal::Shared),
            Backing::SharedFile => return refuse(AdoptRefusal::FileBacked("a shared file".into())),
            Backing::PrivateFile => self.privatize(mapping)?,
        };
        let vmas = maps::vmas_overlapping(range)
            .map_err(|e| HmmError::Inspect { range, error: format!("/proc/self/maps: {e}") })?;
        let mut at = range.start();
        for v in &vmas {
            if v.range.start() > at {
                return refuse(AdoptRefusal::NotMapped);
            }
            at = v.range.end();
            if v.is_hugetlb() {
                return refuse(AdoptRefusal::Hugetlb);
            }
            if v.shared {
                return refuse(AdoptRefusal::Shared);
            }
            if v.path == "[heap]" || v.path.starts_with("[stack") {
                return refuse(AdoptRefusal::Reserved(v.path.clone()));
            }
            if !v.is_private_anonymous() {
                return refuse(AdoptRefusal::FileBacked(v.path.clone()));
            }
            if !(v.read && v.write) {
                return refuse(AdoptRefusal::Protection);
            }
            if let Some(stack) = self.inner.service_stack.get()
                && stack.start() < range.end()
                && range.start() < stack.end()
            {
                return refuse(AdoptRefusal::Reserved("the fault service's stack".into()));
            }
        }
        if at < range.end() {
            return refuse(AdoptRefusal::NotMapped);
        }
        self.manage(mapping, false, true, false)
    }

    /// A private file mapping becomes private anonymous memory with the same
    /// contents before it is managed (see DESIGN.md, "Private file
    /// mappings"): its pages can then move like any anonymous page. Only a
    /// mapping the CPU may read and write is turned, as `adopt` asks of any.
    fn privatize(&self, mapping: Mapping) -> Result<Mapping, HmmError> {
        let range = mapping.range();
        let vmas = maps::vmas_overlapping(range)
            .map_err(|e| HmmError::Inspect { range, error: format!("/proc/self/maps: {e}") })?;
        if let Some(v) = vmas.iter().find(|v| v.shared || !(v.read && v.write)) {
            let reason = if v.shared { AdoptRefusal::Shared } else { AdoptRefusal::Protection };
            return Err(HmmError::Adopt { range, reason });
        }
        mapping.into_anonymous().map_err(|(_, e)| HmmError::Mm(e))
    }

    fn manage(
        &self,
        mapping: Mapping,
        created: bool,
        scan: bool,
        huge: bool,
    ) -> Result<ManagedRange, HmmError> {
        let range = self.inner.manage(mapping, created, scan, huge)?;
        Ok(ManagedRange { inner: self.inner.clone(), range })
    }

    /// Hands hmm a mapping that devices may read and write through their page
    /// tables but that hmm does not migrate: a shared or private file mapping,
    /// shared anonymous memory, hugetlb memory, memory the application serves
    /// with its own userfaultfd. Device writes land in it through the kernel
    /// (so a shared file mapping's page cache sees them). Dropping the handle
    /// invalidates mirrors (`Unmap`) and unmaps it.
    ///
    /// Devices may *read* any memory of the process; they may write only memory
    /// hmm manages or mirrors, whose bytes no Rust reference aliases.
    pub fn mirror(&self, mapping: Mapping) -> Result<MirroredRange, HmmError> {
        let range = mapping.range();
        let mut m = self.inner.mirrored.write().unwrap_or_else(|e| e.into_inner());
        let clash = m.range(..range.end().get()).next_back().map(|(_, x)| x.range());
        if let Some(other) = clash.filter(|o| o.end() > range.start()) {
            return Err(HmmError::Adopt { range, reason: AdoptRefusal::Overlaps(other) });
        }
        if let Some((r, _, _)) =
            self.inner.overlapping(range.start().get(), range.end().get()).first()
        {
            return Err(HmmError::Adopt { range, reason: AdoptRefusal::Overlaps(r.range()) });
        }
        let mapping = Arc::new(mapping);
        m.insert(range.start().get(), mapping.clone());
        Ok(MirroredRange { inner: self.inner.clone(), mapping })
    }

    /// Registers a region of device memory with its driver callbacks.
    pub fn register_device_memory(
        &self,
        config: DeviceMemoryConfig,
        ops: Arc<dyn DevicePagemapOps>,
    ) -> Result<Arc<DeviceMemory>, HmmError> {
        self.inner.register_device(config, ops)
    }

    /// Brings every page of `mem` back to system memory, then unregisters it.
    pub fn unregister_device_memory(&self, mem: &DeviceMemory) -> Result<(), HmmError> {
        self.inner.release_device(mem.id())
    }

    /// Starts a three-phase migration of `range` (setup): see [`Migration`].
    pub fn migrate(&self, range: PageRange, select: Selection) -> Result<Migration, HmmError> {
        self.inner.settle_before_migrating();
        Migration::setup(self.inner.clone(), range, select)
    }

    /// Migrates `range` into `mem`: setup, copy with `engine`, finalize, in
    /// batches of at most 16 MiB. Every page gets a status in the report.
    pub fn migrate_to_device(
        &self,
        range: PageRange,
        mem: &Arc<DeviceMemory>,
        engine: &dyn crate::dma::DmaEngine,
    ) -> Result<MigrationReport, HmmError> {
        self.inner.migrate_to_device(range, mem, engine)
    }

    /// Migrates the pages of `range` that live on `mem` back to system memory.
    /// As [`migrate_to_device`](Self::migrate_to_device), fails with
    /// [`HmmError::InvalidRange`] unless every page of `range` is mapped and
    /// readable (the kernel's `migrate_vma_setup` wants one readable area).
    pub fn migrate_to_system(
        &self,
        range: PageRange,
        mem: &Arc<DeviceMemory>,
        engine: &dyn crate::dma::DmaEngine,
    ) -> Result<MigrationReport, HmmError> {
        self.inner.migrate_to_system(range, mem, engine)
    }

    /// Migrates the pages of `range` that live on `from` into `to`: directly
    /// from device to device when both offer their memory to peers
    /// ([`DevicePagemapOps::peer_memory`]) and `to`'s engine reads peers;
    /// through system memory otherwise. `from`'s mirrors are invalidated and
    /// its pages freed. Fails with [`HmmError::InvalidRange`] unless every
    /// page of `range` is mapped and readable.
    pub fn migrate_device_to_device(
        &self,
        range: PageRange,
        from: &Arc<DeviceMemory>,
        to: &Arc<DeviceMemory>,
    ) -> Result<MigrationReport, HmmError> {
        self.inner.migrate_device_to_device(range, from, to)
    }

    /// Migrates every page of `range` into `to`, wherever it lives now:
    /// system memory, never populated, or another device (see
    /// [`migrate_device_to_device`](Self::migrate_device_to_device)). Pages
    /// already on `to` stay; the report lists what did not move and why.
    pub fn migrate_here(
        &self,
        range: PageRange,
        to: &Arc<DeviceMemory>,
    ) -> Result<MigrationReport, HmmError> {
        self.inner.migrate_here(range, to)
    }

    /// Evicts the given pages of `mem` to system memory without knowing their
    /// addresses (the kernel's `migrate_device_range`). Returns how many moved.
    pub fn evict(&self, mem: &DeviceMemory, pages: &[DevicePage]) -> Result<usize, HmmError> {
        self.inner.evict(mem.id(), pages)
    }

    /// Marks `mem` failed: every page that lives on it is poisoned (a CPU touch
    /// gets SIGBUS) and freed. Pages on other devices are untouched.
    pub fn device_failed(&self, mem: &DeviceMemory) -> usize {
        self.inner.poison_device(mem.id())
    }

    /// Where the page holding `addr` lives, if hmm manages it.
    pub fn residency(&self, addr: VirtAddr) -> Option<Residency> {
        let r = self.inner.find(addr)?;
        let i = r.index(addr);
        Some(r.lock()[i].residency())
    }

    /// Where the bytes of every managed range live now, summed over the
    /// ranges. A device's part is what it is charged for the pages that back
    /// managed addresses: with no migration in flight it equals the device's
    /// [`pages_resident`](crate::DeviceStats::pages_resident) times the page size.
    pub fn residence(&self) -> Residence {
        let ranges: Vec<Arc<Range>> = {
            let r = self.inner.ranges.read().unwrap_or_else(|e| e.into_inner());
            r.values().cloned().collect()
        };
        let mut total = Residence::default();
        for r in ranges {
            total.count(&r.lock());
        }
        total
    }

    /// Bytes of per-page metadata hmm keeps for its managed ranges, and the
    /// number of pages in use it describes (populated, on a device, or lost
    /// with one). Records are kept as a page table keeps entries, per 2 MiB
    /// block in use, so a range's size costs next to nothing until it is
    /// used (24 bytes per GiB of range, plus up to 4 KiB of records per 2 MiB
    /// block in use).
    pub fn metadata(&self) -> (usize, usize) {
        let ranges = self.inner.ranges.read().unwrap_or_else(|e| e.into_inner());
        let mut bytes = 0;
        let mut pages = 0;
        for r in ranges.values() {
            let t = r.lock();
            bytes += t.bytes() + std::mem::size_of::<Range>();
            for_each_run(&t, 0..t.len(), |e, n| {
                if !e.is_blank() {
                    pages += n;
                }
            });
        }
        (bytes, pages)
    }

    /// Fault injection: the fault service stops at the next CPU fault it
    /// serves, after it has read the page's record and before it acts on it,
    /// until the returned guard is dropped. Whatever changes the page
    /// meanwhile (a migration, a discard) must not be undone by the fault.
    ///
    /// A stall met while the service handles messages it has just read holds
    /// up what settles the event stream first (migrations, device accesses:
    /// they go on after two seconds, with a warning); one met while it
    /// retries a fault does not.
    pub fn stall_next_fault(&self) -> FaultStall {
        self.inner.fault_stall.arm();
        FaultStall { gate: self.inner.fault_stall.clone() }
    }

    /// Whether a forked child gets the pages that live on devices: the
    /// kernel's `EVENT_FORK`, which needs `CAP_SYS_PTRACE`. Without it a
    /// child reads zeros where its parent's pages live on a device (pages in
    /// system memory are copied by the kernel as ever).
    pub fn follows_forks(&self) -> bool {
        self.inner.uffd.features().contains(Features::EVENT_FORK)
    }

    /// Waits, up to `limit`, until hmm has finished everything it does on its
    /// own threads for what happened before the call: every address-space
    /// change of managed memory (`munmap`, `mremap`, `madvise`, fork) handled
    /// by the fault service, every CPU fault it read served with its whole
    /// fault-around window, every page of an `mremap` delivered to its new
    /// address, every copy into a forked child done, every discarded page's
    /// record final.
    ///
    /// A touch of a device page returns once the page itself is back, while
    /// the rest of its window is still coming back; `munmap` returns once
    /// its event is read, before hmm has freed the device pages. So what
    /// [`ManagedRange::residency`], the stats and the residency map say right
    /// after such a call may still change. After `settle` returns `Ok`, they
    /// describe everything that happened before it (pages other threads
    /// move meanwhile move as usual).
    ///
    /// Returns at once on hmm's fault service thread (a driver callback),
    /// which cannot wait for itself. [`HmmError::Unsettled`] says what was
    /// still under way when `limit` ran out.
    pub fn settle(&self, limit: Duration) -> Result<(), HmmError> {
        self.inner.settle_within(limit).map_err(|what| HmmError::Unsettled { what, limit })
    }

    /// CPU faults the fault service read, and fault-backs retried because system
    /// memory could not be had.
    pub fn fault_stats(&self) -> (u64, u64) {
        let c = &self.inner.counters;
        (c.faults_read.load(Ordering::Relaxed), c.fault_retries_no_memory.load(Ordering::Relaxed))
    }

    /// With [`FaultMode::InThread`]: the fault-backs threads served in their
    /// own `SIGBUS` handlers, and the faults they handed to the fault
    /// service instead (never-populated pages, pages mid-migration, pages a
    /// mirror covers, drivers without an in-thread copy; see DESIGN.md,
    /// "Fault modes"). Both 0 in [`FaultMode::Service`].
    pub fn in_thread_faults(&self) -> (u64, u64) {
        let c = &self.inner.counters;
        (c.faults_in_thread.load(Ordering::Relaxed), c.faults_handed_over.load(Ordering::Relaxed))
    }

    /// CPU writes caught on pages a device mapped read-only (each invalidated
    /// the mirrors before it landed).
    pub fn tracked_writes(&self) -> u64 {
        self.inner.counters.tracked_writes.load(Ordering::Relaxed)
    }

    /// Forked children given their copy of the device-resident pages, and
    /// the pages copied to them (see DESIGN.md, "Fork").
    pub fn forks(&self) -> (u64, u64) {
        let c = &self.inner.counters;
        (c.forks.load(Ordering::Relaxed), c.fork_pages.load(Ordering::Relaxed))
    }

    /// Pages whose data hmm carried to a new address after the application
    /// moved them with `mremap` (device pages, and pages a migration held);
    /// pages in system memory move with the page tables and are not counted.
    pub fn remapped_pages(&self) -> u64 {
        self.inner.counters.remaps_forwarded.load(Ordering::Relaxed)
    }

    /// Inserts an interval notifier over `range` (any memory of the process,
    /// managed by hmm or not): `callback` runs for every invalidation hmm makes
    /// or learns of that overlaps it, with the overlapping part (see
    /// [`mirror`](crate::mirror) for the retry protocol and its locking rules).
    /// Dropping the notifier removes it.
    ///
    /// ```
    /// # fn main() -> Result<(), hmm::HmmError> {
    /// use std::sync::{Arc, Mutex};
    /// let hmm = hmm::Hmm::new()?;
    /// let r = hmm.alloc(4 * hmm::PAGE_SIZE)?;
    /// let seen = Arc::new(Mutex::new(Vec::new()));
    /// let log = seen.clone();
    /// let n = hmm.insert_notifier(r.range(), move |inv| log.lock().unwrap().push(inv.event));
    /// let seq = n.read_begin();
    /// r.protect(r.pages_range(0, 1)?, hmm::os::mm::Protection::Read)?;
    /// assert!(n.read_retry(seq), "the protection change moved the sequence");
    /// assert_eq!(*seen.lock().unwrap(), [hmm::InvalidationEvent::Protection]);
    /// # Ok(()) }
    /// ```
    pub fn insert_notifier(
        &self,
        range: PageRange,
        callback: impl Fn(&Invalidation) + Send + Sync + 'static,
    ) -> IntervalNotifier {
        IntervalNotifier::insert(&self.inner.notifiers, range, Box::new(callback), false)
    }

    /// [`insert_notifier`](Self::insert_notifier) with a callback that may
    /// run in a `SIGBUS` handler: in [`FaultMode::InThread`] a thread that
    /// brings a device page back itself invalidates the page's mirrors from
    /// its handler (a one-page [`InvalidationEvent::Migrate`]), which it can
    /// do only if every notifier over the page was inserted this way (a page
    /// under any other goes to the fault service). The callback then keeps
    /// a handler's rules: it neither allocates nor frees, takes no lock that
    /// code touching managed memory could hold (a device page table's own
    /// lock qualifies when no access under it touches managed memory
    /// directly), and does not insert or drop notifiers.
    pub fn insert_notifier_in_thread(
        &self,
        range: PageRange,
        callback: impl Fn(&Invalidation) + Send + Sync + 'static,
    ) -> IntervalNotifier {
        IntervalNotifier::insert(&self.inner.notifiers, range, Box::new(callback), true)
    }

    /// Notifiers inserted and not yet dropped: the application's and its
    /// drivers' alike, since a driver mirrors memory with the same notifiers
    /// (each `hmm_swdev::SoftwareDevice` keeps one over the
    /// whole address space for its page table, for as long as it lives).
    pub fn notifier_count(&self) -> usize {
        self.inner.notifiers.len()
    }

    /// The kernel's `hmm_range_fault`: reports, per page of `req.range`, what a
    /// device may map (valid, writable, zero page, order, device page), after
    /// faulting in the pages the request asks for (`MADV_POPULATE_READ/WRITE`,
    /// or bringing back pages of other devices). A device's own private pages
    /// are reported, never faulted. Works on any memory of the process; call it
    /// under the retry protocol of an [`IntervalNotifier`]. A request covers
    /// at most [`RangeFault::MAX_PAGES`] pages (4 GiB): a longer one fails
    /// with [`RangeFaultError::TooLarge`] before anything is done.
    ///
    /// ```
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// use hmm::{Hmm, PAGE_SIZE, RangeFault};
    /// let hmm = Hmm::new()?;
    /// let r = hmm.alloc(4 * PAGE_SIZE)?;
    /// let n = hmm.insert_notifier(r.range(), |_| {});
    /// let pages = loop {
    ///     let seq = n.read_begin();
    ///     let pages = hmm.range_fault(&RangeFault::fault(r.range(), true, None))?;
    ///     if !n.read_retry(seq) {
    ///         break pages; // (a driver would check under its own lock)
    ///     }
    /// };
    /// assert!(pages.iter().all(|p| p.valid && p.write), "faulted in, writable");
    /// # Ok(()) }
    /// ```
    pub fn range_fault(&self, req: &RangeFault<'_>) -> Result<Vec<PageInfo>, RangeFaultError> {
        self.inner.range_fault(req)
    }

    pub(crate) fn inner(&self) -> &Arc<Inner> {
        &self.inner
    }
}

impl Drop for Hmm {
    fn drop(&mut self) {
        self.inner.shutdown();
    }
}

impl Inner {
    /// Unregisters what is still `r`'s: a part the application unmapped
    /// (recorded `Unmapped`) may hold other memory registered here by now,
    /// such as the new home of an `mremap` (see `remap`).
    fn unregister_own(&self, r: &Range) {
        for part in mapped_runs(r) {
            let _ = self.uffd.unregister(part);
        }
    }

    /// Brings every device page of `r` back (or frees them when `discard`), then
    /// unregisters it and removes it from the registry.
    pub(crate) fn unmanage(self: &Arc<Self>, r: &Arc<Range>) {
        // Unmaps the application made already are recorded, so that their
        // parts are not unregistered below.
        self.settle_events();
        // Fault-backs threads began in their own handlers, and the windows
        // they asked for, are finished first (`FaultMode::InThread`): they
        // free device pages, and bring back pages, of this range.
        crate::state::poll_until(std::time::Instant::now() + Duration::from_secs(1), || {
            self.handovers.is_empty()
        });
        // Created memory goes away with the range: mirrors stay invalidated
        // until its device pages are freed.
        let _inv = r.created.then(|| self.notifiers.start(r.range(), InvalidationEvent::Unmap));
        let devs = {
            let t = r.lock();
            devices_of(&t, 0..t.len())
        };
        if !r.created {
            for dev in devs {
                if let Some(mem) = self.device(dev)
                    && !mem.is_failed()
                {
                    let _ = self.bring_back(r.clone(), r.range(), &mem);
                }
            }
        }
        {
            let mut ranges = self.ranges.write().unwrap_or_else(|e| e.into_inner());
            ranges.remove(r);
            // Still registered until `unregister_own` below: a fault there
            // is this instance's (see `Registry::add_home`).
            ranges.add_home(r.range().start().get(), r.range().end().get());
        }
        // A fault-around window still in flight installs into the range: let it
        // finish before the range leaves the descriptor (an install into an
        // unregistered range fails, and the page would stay on the device).
        // No new window can start: the range is no longer in the registry.
        r.wait_settled(0..r.range().pages(), Duration::from_secs(1));
        // Free what remains on devices (hmm-created memory is going away).
        let freed: Vec<DevicePage> = {
            let mut t = r.lock();
            let mut freed = Vec::new();
            let all = 0..t.len();
            t.update(
                all,
                |e| e,
                |_, e| {
                    if !e.is_migrating() {
                        freed.extend(e.invalidate(false));
                    }
                },
            );
            freed
        };
        for p in freed {
            self.put_page(p);
        }
        if !self.uffd.is_closed() {
            self.unregister_own(r);
        }
        let (start, end) = (r.range().start().get(), r.range().end().get());
        self.ranges.write().unwrap_or_else(|e| e.into_inner()).cut_homes(start, end);
    }

    /// Brings every page back, stops the fault service, closes the descriptors.
    pub(crate) fn shutdown(self: &Arc<Self>) {
        if self.shut_down.swap(true, Ordering::AcqRel) {
            return;
        }
        // A stall left in place (`Hmm::stall_next_fault`) must not hold up
        // the service, which the work below and its stop need.
        self.fault_stall.release();
        // A copy to a forked child uses the devices: it ends first.
        self.fork_copies.wait_idle(Duration::from_secs(30));
        self.forwards.wait_idle(Duration::from_secs(30));
        self.notifiers.invalidate_all(InvalidationEvent::Release);
        let ranges: Vec<Arc<Range>> = {
            let r = self.ranges.read().unwrap_or_else(|e| e.into_inner());
            r.values().cloned().collect()
        };
        let devs: Vec<DeviceId> = {
            let d = self.devices.read().unwrap_or_else(|e| e.into_inner());
            d.iter().flatten().filter(|m| !m.is_released()).map(|m| m.id()).collect()
        };
        for dev in devs {
            let _ = self.release_device(dev);
        }
        for r in &ranges {
            self.unregister_own(r);
        }
        self.stopping.store(true, Ordering::Release);
        self.notifier.notify();
        if let Some(h) = self.service.lock().unwrap_or_else(|e| e.into_inner()).take() {
            // Bounded: a service stuck in a driver's callback is left behind
            // (logged) rather than hang the drop of `Hmm`.
            let deadline = std::time::Instant::now() + SERVICE_STOP;
            if crate::state::poll_until(deadline, || h.is_finished()) {
                let _ = h.join();
            } else {
                tracing::error!(
                    "the fault service did not stop within {SERVICE_STOP:?}; leaving it"
                );
            }
        }
        self.ranges.write().unwrap_or_else(|e| e.into_inner()).clear();
        self.uffd.close();
        crate::inthread::disable(self);
        self.staging_uffd.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::addr::{PAGE_SIZE, RangeError};
    use crate::os::mm::{Mapping, Protection, munmap_behind};
    use crate::testdev::TestDevice;

    fn usable() -> bool {
        match crate::probe::probe().usable() {
            Ok(()) => true,
            Err((reason, _)) => {
                eprintln!("SKIP: userfaultfd unusable here: {reason}");
                false
            }
        }
    }

    /// The application's own `munmap` of managed memory (not through the
    /// handle): the handle's accessors refuse the part at once, though hmm
    /// may not have handled the event yet, and keep refusing it when another
    /// mapping takes the addresses; that mapping's bytes are never read or
    /// written through the handle.
    #[test]
    fn accessors_refuse_memory_the_application_unmapped_itself() {
        if !usable() {
            return;
        }
        let hmm = Hmm::new().unwrap();
        let r = hmm.alloc(16 * PAGE_SIZE).unwrap();
        r.fill(0, r.len(), 0x11).unwrap();
        let whole = r.range();
        munmap_behind(whole);
        let mut b = [0u8; 8];
        assert_eq!(r.read(0, &mut b), Err(RangeError::Unmapped(whole)), "right after munmap");
        hmm.settle(Duration::from_secs(10)).unwrap();
        assert!(r.residencies().iter().all(|x| *x == Residency::Unmapped));
        // Another mapping lands in the hole.
        let other = Mapping::anonymous_at(whole, Protection::ReadWrite).unwrap();
        other.fill(0, other.len(), 0x77).unwrap();
        let unmapped = |e: RangeError| matches!(e, RangeError::Unmapped(_));
        assert!(r.read(10, &mut b).is_err_and(unmapped), "its bytes are not read");
        assert!(r.write(10, &[0xEE]).is_err_and(unmapped), "nor written");
        assert!(r.fill(10, 1, 0xEE).is_err_and(unmapped));
        assert!(r.touch_read(10).is_err_and(unmapped));
        assert!(r.touch_write(10, 0xEE).is_err_and(unmapped));
        assert_eq!(other.touch_read(10).unwrap(), 0x77, "the other mapping's byte is untouched");
        // A migration of the range says the application unmapped it, though
        // something is mapped there now.
        let dev = TestDevice::new(&hmm, 64);
        let e = dev.migrate_to_device(whole).unwrap_err().to_string();
        assert!(e.contains("the application unmapped the range's pages"), "{e}");
        assert!(!e.contains("nothing is mapped"), "{e}");
    }

    /// Addresses the application unmapped are no longer the range's, while
    /// its handle lives on: the kernel may give them to other memory, which
    /// hmm then manages (or leaves alone) as any other; the first range's
    /// handle keeps saying `Unmapped` and, dropped, unmaps nothing of it.
    #[test]
    fn unmapped_addresses_belong_to_whatever_the_kernel_puts_there_next() {
        if !usable() {
            return;
        }
        let hmm = Hmm::new().unwrap();
        let dev = TestDevice::new(&hmm, 64);
        // Through the handle, and by the application's own munmap.
        for own_munmap in [false, true] {
            let r = hmm.alloc(16 * PAGE_SIZE).unwrap();
            r.fill(0, r.len(), 0x11).unwrap();
            let whole = r.range();
            if own_munmap {
                munmap_behind(whole);
            } else {
                r.unmap(whole).unwrap();
            }
            // Plain memory at those addresses is not managed.
            let plain = Mapping::anonymous_at(whole, Protection::ReadWrite).unwrap();
            plain.fill(0, plain.len(), 0x22).unwrap();
            hmm.settle(Duration::from_secs(10)).unwrap();
            assert_eq!(hmm.residency(whole.start()), None, "another mapping's page is not managed");
            // Managed memory there is a range of its own, whole.
            let again = hmm.adopt(plain).unwrap();
            assert_eq!(again.range(), whole);
            assert_eq!(hmm.residency(whole.start()), Some(Residency::System));
            assert_eq!(dev.migrate_to_device(whole).unwrap().migrated, 16);
            let mut b = [0u8; 4];
            again.read(5 * PAGE_SIZE, &mut b).unwrap();
            assert_eq!(b, [0x22; 4], "the new range's bytes fault back");
            // The first handle: its pages are gone, and stay so.
            assert!(r.residencies().iter().all(|x| *x == Residency::Unmapped));
            assert!(matches!(r.read(0, &mut b), Err(RangeError::Unmapped(_))));
            drop(r);
            again.read(9 * PAGE_SIZE, &mut b).unwrap();
            assert_eq!(b, [0x22; 4], "dropping the first handle unmapped nothing of the new range");
            drop(again);
        }
        // A new allocation that the kernel places over part of a range.
        let r = hmm.alloc(32 * PAGE_SIZE).unwrap();
        let middle = r.pages_range(8, 8).unwrap();
        r.unmap(middle).unwrap();
        hmm.settle(Duration::from_secs(10)).unwrap();
        let m = hmm.adopt(Mapping::anonymous_at(middle, Protection::ReadWrite).unwrap()).unwrap();
        m.fill(0, m.len(), 0x33).unwrap();
        r.fill(0, 8 * PAGE_SIZE, 0x44).unwrap();
        r.fill(16 * PAGE_SIZE, 16 * PAGE_SIZE, 0x55).unwrap();
        // Both sides of the middle still belong to the first range.
        let e = dev.migrate_to_device(r.range()).unwrap_err().to_string();
        assert!(e.contains("the application unmapped the range's pages"), "{e}");
        assert_eq!(dev.migrate_to_device(r.pages_range(16, 16).unwrap()).unwrap().migrated, 16);
        assert_eq!(dev.migrate_to_device(middle).unwrap().migrated, 8);
        let map = hmm.residency_map(r.range());
        assert_eq!(map.stats().pages_on_device.values().sum::<u64>(), 24);
        let mut b = [0u8; 1];
        m.read(3 * PAGE_SIZE, &mut b).unwrap();
        assert_eq!(b, [0x33]);
        r.read(20 * PAGE_SIZE, &mut b).unwrap();
        assert_eq!(b, [0x55]);
        assert_eq!(hmm.residency(middle.start()), Some(Residency::System));
        assert_eq!(r.residency(8), Residency::Unmapped);
    }

    /// A page lost with a failed device: hmm's own accessors return an error
    /// (a raw CPU touch would get SIGBUS); the rest of the range works.
    #[test]
    fn accessors_refuse_pages_lost_with_a_failed_device() {
        if !usable() || !crate::probe::probe().has("poison") {
            return;
        }
        let hmm = Hmm::new().unwrap();
        let dev = TestDevice::new(&hmm, 64);
        let r = hmm.alloc(8 * PAGE_SIZE).unwrap();
        r.fill(0, r.len(), 5).unwrap();
        assert_eq!(dev.migrate_to_device(r.pages_range(2, 3).unwrap()).unwrap().migrated, 3);
        assert_eq!(dev.fail(), 3);
        let lost = r.pages_range(2, 3).unwrap();
        let mut b = vec![0u8; r.len()];
        assert_eq!(r.read(0, &mut b), Err(RangeError::Poisoned(lost)));
        assert_eq!(r.touch_read(3 * PAGE_SIZE), Err(RangeError::Poisoned(lost)));
        assert_eq!(r.write(4 * PAGE_SIZE, &[1]), Err(RangeError::Poisoned(lost)));
        assert_eq!(r.touch_read(5 * PAGE_SIZE).unwrap(), 5, "other pages read as ever");
        let e = r.touch_write(2 * PAGE_SIZE, 1).unwrap_err();
        assert!(e.to_string().contains("failed"), "{e}");
        // Discarded, the lost pages are usable again at once (hmm hears of
        // the discard after the call returns).
        r.advise(lost, crate::os::mm::Advise::DontNeed).unwrap();
        r.write(2 * PAGE_SIZE, &[9]).unwrap();
        assert_eq!(r.touch_read(2 * PAGE_SIZE).unwrap(), 9);
        assert_eq!(r.touch_read(4 * PAGE_SIZE).unwrap(), 0, "a discarded page reads zeros");
    }
}
