//! The address space hmm manages: an [`Hmm`] instance, its managed ranges and
//! device memory, and the fault service that keeps them consistent.
//!
//! # Locks
//!
//! - `ranges` (read-write): the registry of managed ranges and of the
//!   addresses each still holds (`Registry`). Held only to look a range up,
//!   to add or remove one, or to take an unmapped part from one, never across
//!   a system call.
//! - a range's `table` (mutex): its page records. Held only for state
//!   transitions, never across an ioctl that could wait for the fault service
//!   (`UFFDIO_MOVE` and `UFFDIO_COPY` return `EAGAIN` rather than wait, but a
//!   migration that retried them while holding the table would starve the
//!   service, which needs the table to record the event that caused the
//!   `EAGAIN`).
//! - `devices` (read-write): the registered device regions.
//!
//! Order: `ranges` before `table`; `devices` is never held with either.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::addr::{HUGE_PAGE_SIZE, PAGE_SIZE, PageRange, RangeError, VirtAddr};
use crate::devmem::{DeviceMemory, DeviceMemoryConfig, DeviceMemoryError, DevicePagemapOps};
use crate::dma::SystemSink;
use crate::migrate::{Migration, MigrationReport, Selection, SkipReason};
use crate::mirror::{
    IntervalNotifier, Invalidation, InvalidationEvent, Notifiers, PageInfo, RangeFault,
    RangeFaultError,
};
use crate::os::arena::ArenaError;
use crate::os::event::Notifier;
use crate::os::maps;
use crate::os::mm::{Advise, Backing, Mapping, MmError, Protection};
use crate::os::pagemap::{Pagemap, PagemapError};
use crate::os::uffd::{Features, FillErrorKind, RegisterMode, Uffd, UffdError, UffdOptions};
use crate::os::vm::VmaQuery;
use crate::page::{DeviceId, DevicePage, PageEntry, PageTable, Residency, Segment};

/// Tunables of an [`Hmm`] instance.
#[derive(Debug, Clone, Copy)]
pub struct HmmConfig {
    /// Pages brought back around a faulting page (0: the faulting page only).
    pub fault_around_pages: usize,
    /// Never-populated pages zero-filled around a first touch.
    pub zero_fill_around_pages: usize,
}

impl Default for HmmConfig {
    fn default() -> Self {
        Self { fault_around_pages: 128, zero_fill_around_pages: 64 }
    }
}

impl HmmConfig {
    /// The largest fault-around window accepted (2 MiB).
    pub const MAX_FAULT_AROUND: usize = 512;
}

/// What [`Hmm::settle`] found still under way when its time ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Unsettled {
    /// An address-space change whose event the kernel has not handed over:
    /// the fault service is not reading (stalled, or a fork holds it parked).
    #[error("address-space changes are still pending (is the fault service stalled?)")]
    Changes,
    /// Messages read but not yet handled: the fault service is busy (a
    /// fault-back waiting for memory, a slow device) or stalled.
    #[error("the fault service has not handled the messages it read")]
    Messages,
    /// Pages of an `mremap` still on their way to the new address.
    #[error("remapped pages are still on their way to their new address")]
    Forwards,
    /// Device pages still being copied into a forked child.
    #[error("device pages are still being copied into a forked child")]
    ForkCopies,
    /// Discarded pages whose page-table entries the service is still
    /// looking at (for at most 100 ms after the discard).
    #[error("discarded pages are still being looked at")]
    Discards,
}

/// Errors of the address-space operations.
#[derive(Debug, thiserror::Error)]
pub enum HmmError {
    /// userfaultfd could not be opened with what hmm needs.
    #[error("cannot start hmm: {0} (run `hmm check` to see what this kernel lacks)")]
    Uffd(#[from] UffdError),
    /// A mapping operation failed.
    #[error(transparent)]
    Mm(#[from] MmError),
    /// A malformed range.
    #[error(transparent)]
    Range(#[from] RangeError),
    /// The fault service thread could not start.
    #[error("cannot start the fault service thread: {0}")]
    Thread(std::io::Error),
    /// The eventfd for the fault service could not be made.
    #[error("cannot create the fault service's wake-up eventfd: {0}")]
    Notifier(rustix::io::Errno),
    /// A configuration value out of bounds.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The range is not entirely inside one managed range.
    #[error("{0} is not managed by this hmm instance (allocate it with Hmm::alloc or adopt it)")]
    NotManaged(PageRange),
    /// Memory that cannot be adopted, with the reason.
    #[error("cannot adopt {range}: {reason}")]
    Adopt {
        /// The range offered.
        range: PageRange,
        /// Why it was refused, and what to do.
        reason: AdoptRefusal,
    },
    /// Device memory registration failed.
    #[error(transparent)]
    Device(#[from] DeviceMemoryError),
    /// The device is not registered with this instance.
    #[error("device {0} is not registered with this hmm instance")]
    UnknownDevice(DeviceId),

    /// `/proc/self/maps` or the page table could not be read.
    #[error("cannot inspect {range}: {error}")]
    Inspect {
        /// The range being inspected.
        range: PageRange,
        /// What failed.
        error: String,
    },
    /// [`Hmm::settle`] ran out of time.
    #[error("hmm did not settle within {limit:?}: {what}")]
    Unsettled {
        /// What was still under way.
        what: Unsettled,
        /// The time it was given.
        limit: Duration,
    },
    /// Pages stayed on a device through repeated eviction (each was caught in
    /// another migration every time).
    #[error("{pages} pages stayed on device {device} through eviction")]
    PagesLeft {
        /// The device.
        device: DeviceId,
        /// Pages still there.
        pages: usize,
    },
    /// An arena could not be made or could not allocate.
    #[error(transparent)]
    Arena(#[from] ArenaError),
    /// A device fault (`range_fault`) failed.
    #[error(transparent)]
    Fault(#[from] RangeFaultError),
    /// A device write to memory hmm neither manages nor mirrors.
    #[error(
        "a device cannot write {0}: hmm neither manages nor mirrors it (allocate it with \
         Hmm::alloc, adopt it, or hand it to Hmm::mirror)"
    )]
    NotWritable(PageRange),
    /// A device operation that needs memory hmm manages.
    #[error("{op} needs memory hmm manages, and {range} is not")]
    NeedsManaged {
        /// The operation.
        op: &'static str,
        /// The range given.
        range: PageRange,
    },
    /// Part of the range cannot be accessed at all: nothing is mapped there,
    /// or its protection allows no access (the kernel's `EINVAL` for such a
    /// migration).
    #[error("{op}: {range} is not an accessible range: {reason} (map it, or make it readable)")]
    InvalidRange {
        /// The operation.
        op: &'static str,
        /// The range asked for.
        range: PageRange,
        /// What is wrong, and where.
        reason: String,
    },
    /// Pages did not move where an operation needed them.
    #[error("{op}: the page at {addr} did not move: {reason}")]
    NotMoved {
        /// The operation.
        op: &'static str,
        /// The first page that did not move.
        addr: VirtAddr,
        /// Why.
        reason: crate::migrate::SkipReason,
    },
    /// Pages still held exclusively by a device.
    #[error("{pages} pages are still held exclusively by the device, the first at {addr}")]
    StillExclusive {
        /// How many.
        pages: usize,
        /// The first.
        addr: VirtAddr,
    },
    /// A device job failed.
    #[error("device job: {0}")]
    Job(String),
    /// The instance was shut down (its `Hmm` dropped): its devices were
    /// released and its ranges are no longer managed.
    #[error(
        "this hmm instance has been shut down (its Hmm was dropped, which released its \
         devices): keep the Hmm alive for as long as its devices and ranges are used"
    )]
    ShutDown,
    /// hmm could not allocate memory for its own records of `range`.
    #[error(
        "cannot manage {range}: no memory for hmm's records of it ({error}); manage less at once"
    )]
    NoMemory {
        /// The range.
        range: PageRange,
        /// What the allocator said.
        error: String,
    },
}

/// An arena in memory hmm manages (see [`Hmm::arena`]); its owner is the
/// managed range, whose [`stats`](ManagedRange::stats) it shares.
pub type Arena = crate::os::arena::Arena<ManagedRange>;

/// Why memory could not be adopted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdoptRefusal {
    /// Part of the range is not mapped.
    #[error("part of it is not mapped")]
    NotMapped,
    /// Shared memory: other mappings of it could not follow a migration.
    #[error("it is shared memory; only private anonymous memory can move to device-private memory")]
    Shared,
    /// hugetlbfs memory.
    #[error("it is hugetlbfs memory, which hmm cannot migrate; use transparent huge pages")]
    Hugetlb,
    /// File-backed memory.
    #[error("it is a file mapping ({0}); only private anonymous memory can be managed")]
    FileBacked(String),
    /// Not readable and writable.
    #[error("it is not readable and writable (make it PROT_READ|PROT_WRITE first)")]
    Protection,
    /// The process heap or a stack, which hmm's own threads use.
    #[error("it is {0}, which hmm's own threads use; allocate a managed range or use hmm::Arena")]
    Reserved(String),
    /// Already managed.
    #[error("it overlaps a range this hmm instance already manages ({0})")]
    Overlaps(PageRange),
    /// Registered with another userfaultfd.
    #[error("it is registered with another userfaultfd")]
    OtherUffd,
}

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
/// [`ManagedRange::residence`], [`Hmm::residence`]). Every page is counted
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
    fn count(&mut self, t: &PageTable) {
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
fn for_each_run(t: &PageTable, r: std::ops::Range<usize>, mut f: impl FnMut(PageEntry, usize)) {
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
    serial: u64,
    /// Always `Some` until drop.
    mapping: Option<Mapping>,
    pub(crate) table: Mutex<PageTable>,
    /// Signalled (with `table`) whenever a migration of pages of this range
    /// finishes, for migrations waiting on pages another one holds.
    pub(crate) settled: Condvar,
    pub(crate) counters: RangeCounters,
    /// Memory hmm created (freed with the range) rather than adopted.
    pub(crate) created: bool,
    /// Made with [`Hmm::alloc_huge`]: first touches and fault-backs work in
    /// whole 2 MiB blocks, so pages stay transparent huge pages end to end.
    pub(crate) huge: bool,
    /// Registered in write-protect mode too: a CPU write to a page a device
    /// maps read-only can be caught (see `Inner::track_writes`).
    pub(crate) wp: bool,
    /// Pin counts by page index ([`ManagedRange::pin`]): a pinned page stays
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
        let (_t, r) = self
            .settled
            .wait_timeout_while(t, limit, |t| t.any(pages.clone(), |e| e.is_migrating()))
            .unwrap_or_else(|e| e.into_inner());
        !r.timed_out()
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

/// Instance-wide counters.
#[derive(Debug, Default)]
pub(crate) struct HmmCounters {
    pub(crate) faults_read: AtomicU64,
    pub(crate) fault_retries_no_memory: AtomicU64,
    pub(crate) tracked_writes: AtomicU64,
    pub(crate) forks: AtomicU64,
    pub(crate) fork_pages: AtomicU64,
    pub(crate) remaps_forwarded: AtomicU64,
}

/// The state shared by an [`Hmm`] handle, its ranges, devices and fault service.
pub(crate) struct Inner {
    pub(crate) uffd: Arc<Uffd>,
    /// Registers hmm's staging memory, the destination of setup's moves. It
    /// reports no events, and with `UFFD_FEATURE_SIGBUS` a stray touch of an
    /// empty staging page is a SIGBUS, never a hang.
    pub(crate) staging_uffd: Uffd,
    pub(crate) ranges: RwLock<Registry>,
    /// Memory devices may write through their page tables that hmm does not
    /// manage ([`Hmm::mirror`]), by start address.
    pub(crate) mirrored: RwLock<BTreeMap<usize, Arc<Mapping>>>,
    pub(crate) devices: RwLock<Vec<Option<Arc<DeviceMemory>>>>,
    pub(crate) config: HmmConfig,
    pub(crate) sink: Arc<SystemSink>,
    /// The sink of the fault service's own migrations (see
    /// [`SystemSink::for_service`]).
    pub(crate) service_sink: Arc<SystemSink>,
    pub(crate) notifier: Notifier,
    pub(crate) stopping: AtomicBool,
    pub(crate) shut_down: AtomicBool,
    pub(crate) service_stack: OnceLock<PageRange>,
    pub(crate) counters: HmmCounters,
    /// The interval notifiers of devices mirroring this address space.
    pub(crate) notifiers: Notifiers,
    /// Pages hmm reads while it holds them (see `read_held`): a migration
    /// copying out of a read-only mapping (`Migration::copy_out`), a forward
    /// carrying a page on from the old address of an `mremap`. A fault there
    /// means the page is absent (discarded meanwhile, or never there): it is
    /// served with the zero page, so the reader cannot wait on its own hold.
    pub(crate) copying_out: Mutex<Vec<VirtAddr>>,
    /// Changes hmm makes to managed memory itself, whose events are its own,
    /// not the application's: discards after a copy out, the unmaps and
    /// remaps of coherent memory (see `coherent`).
    pub(crate) own_changes: Mutex<Vec<OwnChange>>,
    /// Set while the process forks: coherent pages are not mapped for the CPU.
    pub(crate) coherent_forking: AtomicBool,
    /// Coherent map-ins in progress.
    pub(crate) coherent_maps: std::sync::atomic::AtomicUsize,
    /// The fault service's batches of messages (see [`Inner::settle_events`]).
    pub(crate) batches: crate::fault::Batches,
    /// Fault injection: a stall of the fault service mid-fault.
    pub(crate) fault_stall: Arc<crate::fault::StallGate>,
    /// Copies of device pages to forked children in progress.
    pub(crate) fork_copies: crate::fork::Copies,
    /// Where the fault service parks while the process forks.
    pub(crate) fork_gate: crate::fork::ForkGate,
    /// Pages put back into the page table while a fork is under way.
    pub(crate) fork_installs: crate::fork::Installs,
    /// Pages moved by the application's `mremap` on their way to the new
    /// address.
    pub(crate) forwards: crate::remap::Forwards,
    /// Discards the fault service is still looking at again (see
    /// `fault::Service::recheck_discarded`): only the service writes it.
    pub(crate) discards_pending: std::sync::atomic::AtomicUsize,
    /// Unmaps whose events the fault service has read but not yet handled
    /// (see [`pending_unmap`](Self::pending_unmap)). Room for
    /// [`UNMAPPING_ROOM`] is reserved: the service fills it while parked for
    /// a fork, when it must not allocate.
    unmapping: Mutex<Vec<PageRange>>,
    /// The process this instance runs in: a forked child has a copy of it,
    /// but none of its threads, and must never wait for them.
    pid: u32,
    vma_query: OnceLock<VmaQuery>,
    pagemap: OnceLock<Pagemap>,
    service: Mutex<Option<JoinHandle<()>>>,
}

/// How long shutdown waits for the fault service to stop.
const SERVICE_STOP: Duration = Duration::from_secs(30);

/// Unmaps read and not yet handled that hmm keeps track of (far more than a
/// batch of messages holds).
const UNMAPPING_ROOM: usize = 1024;

impl fmt::Debug for Inner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Hmm")
            .field("ranges", &self.ranges.read().map(|r| r.len()).unwrap_or(0))
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

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

/// A range of memory managed by an [`Hmm`] instance.
///
/// The CPU reaches its bytes through [`read`](Self::read) and
/// [`write`](Self::write) (or through raw pointers, see
/// [`as_ptr`](Self::as_ptr)); a touch of a page that lives on a device brings
/// it back first. Dropping the handle frees memory hmm created, and hands
/// adopted memory back in system memory.
pub struct ManagedRange {
    inner: Arc<Inner>,
    range: Arc<Range>,
}

impl fmt::Debug for ManagedRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ManagedRange").field("range", &self.range.range()).finish()
    }
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
        let uffd = Uffd::open(UffdOptions {
            wanted: Features::EVENT_UNMAP
                | Features::EVENT_FORK
                | Features::EVENT_REMOVE
                | Features::EVENT_REMAP
                | Features::POISON
                | Features::THREAD_ID,
            required: Features::MOVE,
            nonblocking: true,
            allow_user_mode_only: false,
        })?;
        let staging_uffd = Uffd::open(UffdOptions {
            wanted: Features::SIGBUS,
            required: Features::MOVE,
            nonblocking: true,
            allow_user_mode_only: false,
        })?;
        let uffd = Arc::new(uffd);
        let inner = Arc::new(Inner {
            sink: Arc::new(SystemSink::new(uffd.clone())),
            service_sink: Arc::new(SystemSink::for_service(uffd.clone())),
            uffd,
            staging_uffd,
            ranges: RwLock::new(Registry::default()),
            mirrored: RwLock::new(BTreeMap::new()),
            devices: RwLock::new(Vec::new()),
            config,
            notifier: Notifier::new().map_err(HmmError::Notifier)?,
            stopping: AtomicBool::new(false),
            shut_down: AtomicBool::new(false),
            service_stack: OnceLock::new(),
            counters: HmmCounters::default(),
            notifiers: Notifiers::new(),
            copying_out: Mutex::new(Vec::new()),
            own_changes: Mutex::new(Vec::new()),
            coherent_forking: AtomicBool::new(false),
            coherent_maps: Default::default(),
            batches: Default::default(),
            fault_stall: Default::default(),
            fork_copies: Default::default(),
            forwards: Default::default(),
            fork_gate: Default::default(),
            fork_installs: Default::default(),
            vma_query: OnceLock::new(),
            pagemap: OnceLock::new(),
            discards_pending: std::sync::atomic::AtomicUsize::new(0),
            unmapping: Mutex::new(Vec::with_capacity(UNMAPPING_ROOM)),
            pid: std::process::id(),
            service: Mutex::new(None),
        });
        let handle = crate::fault::start(inner.clone()).map_err(HmmError::Thread)?;
        *inner.service.lock().unwrap_or_else(|e| e.into_inner()) = Some(handle);
        if inner.uffd.features().contains(Features::EVENT_FORK) {
            crate::fork::register(&inner);
        }
        Ok(Self { inner })
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
        let inner = &self.inner;
        if inner.shut_down.load(Ordering::Acquire) {
            return Err(HmmError::ShutDown);
        }
        let range = mapping.range();
        // An unmap of earlier memory at these addresses may not be handled
        // yet: it must not land on the new records. Nor may a forward to
        // earlier memory here still be delivering: its pages would land in
        // the new range.
        inner.settle_events();
        if !inner.forwards.wait_idle(Duration::from_secs(10)) {
            tracing::warn!("remapped pages still on their way after 10 s");
        }
        let mut table = PageTable::new(range.pages())
            .map_err(|e| HmmError::NoMemory { range, error: e.to_string() })?;
        if scan {
            // Adopted memory may already hold data: every page the kernel maps
            // (or has swapped out) is system memory.
            let inspect = |e| HmmError::Inspect { range, error: format!("page table: {e}") };
            let pm = crate::os::pagemap::Pagemap::open().map_err(inspect)?;
            for (i, e) in pm.entries(range).map_err(inspect)?.into_iter().enumerate() {
                if e.present() || e.swapped() {
                    table[i] = PageEntry::SYSTEM;
                }
            }
        }
        {
            let mut ranges = inner.ranges.write().unwrap_or_else(|e| e.into_inner());
            // Only the parts earlier ranges still hold count: an address the
            // application unmapped is no longer theirs, and the kernel may
            // have given it to this memory.
            let existing = ranges
                .live(range.start().get(), range.end().get())
                .next()
                .map(|(r, _, _)| r.range());
            if let Some(existing) = existing {
                drop(ranges);
                return Err(HmmError::Adopt { range, reason: AdoptRefusal::Overlaps(existing) });
            }
            // Write-protect mode where the kernel has it (for anonymous
            // memory since 5.7); without it, writes to pages devices map
            // read-only are not caught (device reads stay correct: they go
            // through the kernel).
            let wp = inner
                .uffd
                .register(&mapping, range, RegisterMode::MISSING | RegisterMode::WP)
                .is_ok();
            if !wp && let Err(e) = inner.uffd.register(&mapping, range, RegisterMode::MISSING) {
                drop(ranges);
                if let UffdError::Register { errno: rustix::io::Errno::BUSY, .. } = e {
                    return Err(HmmError::Adopt { range, reason: AdoptRefusal::OtherUffd });
                }
                return Err(e.into());
            }
            let r = Arc::new(Range {
                serial: ranges.next_serial(),
                // Guarded: parts can be unmapped (`ManagedRange::unmap`) or lent to
                // an arena while the fault service and devices share the range.
                mapping: Some(mapping.guarded()),
                table: Mutex::new(table),
                settled: Condvar::new(),
                counters: RangeCounters::default(),
                created,
                huge,
                wp,
                pins: Mutex::new(BTreeMap::new()),
            });
            ranges.insert(r.clone());
            Ok(ManagedRange { inner: inner.clone(), range: r })
        }
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
        let mut devs = self.inner.devices.write().unwrap_or_else(|e| e.into_inner());
        // A released region's id is given again only once none of its pages
        // is held any more (it then leaves its slot, here or as it is
        // released): a record, a migration or a copy still naming one must
        // reach that region (failed, say), never a new one under its id.
        for d in devs.iter_mut() {
            if d.as_ref().is_some_and(|m| m.is_released() && m.allocated_pages() == 0) {
                *d = None;
            }
        }
        let slot = devs.iter().position(Option::is_none).unwrap_or(devs.len());
        if slot >= DeviceId::MAX {
            return Err(DeviceMemoryError::TooMany.into());
        }
        let id = DeviceId(slot as u16);
        let mem = Arc::new(DeviceMemory::new(id, config, ops)?);
        if slot == devs.len() {
            devs.push(Some(mem.clone()));
        } else {
            devs[slot] = Some(mem.clone());
        }
        Ok(mem)
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
        IntervalNotifier::insert(&self.inner, range, Box::new(callback))
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

/// The value of `cell`, made by `open` the first time it is asked for (an
/// error leaves the cell empty, to be tried again).
fn open_once<T, E>(cell: &OnceLock<T>, open: impl FnOnce() -> Result<T, E>) -> Result<&T, E> {
    if let Some(v) = cell.get() {
        return Ok(v);
    }
    let v = open()?;
    Ok(cell.get_or_init(|| v))
}

/// The runs of pages of `r` not recorded `Unmapped`.
fn mapped_runs(r: &Range) -> Vec<PageRange> {
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
fn devices_of(t: &PageTable, pages: std::ops::Range<usize>) -> Vec<DeviceId> {
    let mut d: Vec<DeviceId> = Vec::new();
    for_each_run(t, pages, |e, _| d.extend(e.device_page().map(|p| p.dev)));
    d.sort();
    d.dedup();
    d
}

/// The page addresses `addrs` (in any order, repeats allowed) as runs of
/// adjacent pages, lowest first.
fn runs_of(addrs: &[VirtAddr]) -> Vec<PageRange> {
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
#[derive(Default)]
pub(crate) struct Registry {
    /// Every range, by start and serial.
    all: BTreeMap<(usize, u64), Arc<Range>>,
    /// Live spans by start: end, and the range they belong to.
    live: BTreeMap<usize, (usize, Arc<Range>)>,
    /// The serial of the next range.
    serial: u64,
}

impl Registry {
    /// Every managed range, by address (earlier ranges first at one address).
    pub(crate) fn values(&self) -> impl Iterator<Item = &Arc<Range>> {
        self.all.values()
    }

    fn len(&self) -> usize {
        self.all.len()
    }

    fn next_serial(&mut self) -> u64 {
        self.serial += 1;
        self.serial
    }

    /// Adds `r`, whose whole range is free of live spans.
    fn insert(&mut self, r: Arc<Range>) {
        let range = r.range();
        self.live.insert(range.start().get(), (range.end().get(), r.clone()));
        self.all.insert((range.start().get(), r.serial), r);
    }

    /// Takes `r` out, with whatever it still holds.
    fn remove(&mut self, r: &Arc<Range>) {
        self.all.remove(&(r.range().start().get(), r.serial));
        self.live.retain(|_, (_, x)| !Arc::ptr_eq(x, r));
    }

    fn clear(&mut self) {
        self.all.clear();
        self.live.clear();
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
    fn find(&self, addr: usize) -> Option<&Arc<Range>> {
        self.live.range(..=addr).next_back().filter(|(_, (e, _))| *e > addr).map(|(_, (_, r))| r)
    }

    /// The latest range whose range covers all of `[start, end)`, whether or
    /// not it still holds it (for messages about memory the application
    /// unmapped).
    fn covering(&self, start: usize, end: usize) -> Option<&Arc<Range>> {
        self.all
            .range(..(start + 1, 0))
            .map(|(_, r)| r)
            .filter(|r| r.range().start().get() <= start && r.range().end().get() >= end)
            .max_by_key(|r| r.serial)
    }

    /// The application unmapped `[start, end)`: no range holds it any more.
    pub(crate) fn cut(&mut self, start: usize, end: usize) {
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

impl Inner {
    /// Fails with [`HmmError::InvalidRange`] unless every page of `range` is
    /// mapped and readable. (Without a way to read the areas, the check is
    /// left to the migration, which skips such pages with the reason.)
    ///
    /// Pages of a managed range that the application unmapped are refused by
    /// what hmm knows of them (the range's holes, and pages recorded
    /// unmapped), not by what the kernel maps there now: the address may since
    /// hold some other mapping, which is not the range's memory.
    fn check_accessible(&self, range: PageRange, op: &'static str) -> Result<(), HmmError> {
        let rec = self.find_containing(range).ok().or_else(|| {
            let ranges = self.ranges.read().unwrap_or_else(|e| e.into_inner());
            ranges.covering(range.start().get(), range.end().get()).cloned()
        });
        if let Some(rec) = rec {
            let first = rec.index(range.start());
            let unmapped = rec
                .lock()
                .position(first..first + range.pages(), |e| e.residency() == Residency::Unmapped)
                .map(|i| rec.page_addr(i));
            if let Some(at) = rec
                .mapping()
                .holes()
                .iter()
                .find(|h| h.overlaps(range))
                .map(|h| h.start())
                .or(unmapped)
            {
                let reason = format!(
                    "the application unmapped the range's pages at {at} (whatever is mapped \
                     there now is not this range's memory)"
                );
                return Err(HmmError::InvalidRange { op, range, reason });
            }
        }
        let Some(vmas) = self.vma_query().ok().and_then(|q| q.overlapping(range).ok()) else {
            return Ok(());
        };
        let Some(at) = crate::os::vm::first_uncovered(range, &vmas, |v| v.read) else {
            return Ok(());
        };
        let reason = match vmas.iter().find(|v| v.range.contains(at)) {
            Some(v) => format!("{} allows no access", v.range),
            None => format!("nothing is mapped at {at}"),
        };
        Err(HmmError::InvalidRange { op, range, reason })
    }

    /// Returns once every address-space change of registered memory begun
    /// before the call has been handled by the fault service.
    ///
    /// The kernel raises `mmap_changing` (under the mmap lock, before the
    /// change) and lowers it after the change's event is read; the service
    /// numbers its reads ([`Batches`](crate::fault::Batches)). So: wait until
    /// no change is pending, then until every batch read so far is handled.
    /// An unmap that another thread begins later applies to what is mapped
    /// then, and is handled in order as usual. Bounded: a stalled service
    /// (or a process that never stops unmapping) is logged, not waited on.
    pub(crate) fn settle_events(&self) {
        const LIMIT: Duration = Duration::from_secs(2);
        match self.settle_events_within(LIMIT) {
            Ok(()) => {}
            Err(Unsettled::Changes) => {
                tracing::warn!("address-space changes stayed pending for {LIMIT:?}")
            }
            Err(_) => {
                tracing::warn!("the fault service did not handle its messages within {LIMIT:?}")
            }
        }
    }

    /// [`settle_events`](Self::settle_events), within `limit`: says what
    /// was still under way when it ran out.
    pub(crate) fn settle_events_within(&self, limit: Duration) -> Result<(), Unsettled> {
        let deadline = std::time::Instant::now() + limit;
        if !crate::fault::poll_until(deadline, || !self.uffd.changes_pending().unwrap_or(false)) {
            return Err(Unsettled::Changes);
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if !self.batches.wait_handled(left) {
            return Err(Unsettled::Messages);
        }
        Ok(())
    }

    /// Whether this is the process the instance was made in, not a forked
    /// child of it (which has none of its threads to wait for).
    pub(crate) fn in_own_process(&self) -> bool {
        crate::os::process::pid() == self.pid
    }

    /// On the fault service, as it reads messages: notes each unmap before
    /// any message of the batch is handled (a fault before it may take
    /// long), so that [`pending_unmap`](Self::pending_unmap) knows of it as
    /// soon as the `munmap` returns. Allocates nothing past the room
    /// reserved: the service may be parked for a fork.
    pub(crate) fn note_unmaps(&self, events: &[crate::os::uffd::UffdEvent]) {
        let mut u = self.unmapping.lock().unwrap_or_else(|e| e.into_inner());
        for ev in events {
            if let crate::os::uffd::UffdEvent::Unmap { start, end } = *ev
                && let Ok(part) = PageRange::new(start, end.get() - start.get())
                && u.len() < u.capacity()
            {
                u.push(part);
            }
        }
    }

    /// On the fault service: the unmap of `[start, end)` is handled (its
    /// pages are recorded `Unmapped`).
    pub(crate) fn unmap_handled(&self, start: VirtAddr, end: VirtAddr) {
        let Ok(part) = PageRange::new(start, end.get() - start.get()) else { return };
        let mut u = self.unmapping.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(k) = u.iter().position(|x| *x == part) {
            u.swap_remove(k);
        }
    }

    /// An unmap overlapping `part` that the application has made but whose
    /// event the fault service has not handled yet, if any. The kernel lets
    /// `munmap` return once its event is read; this waits (briefly: never
    /// behind a fault being served) until every message read so far has
    /// been looked through, so an unmap that returned before the call is
    /// seen, whether or not its pages are recorded `Unmapped` yet.
    pub(crate) fn pending_unmap(&self, part: PageRange) -> Option<PageRange> {
        if !crate::fault::on_service_thread() {
            self.batches.wait_scanned(Duration::from_secs(1));
        }
        let u = self.unmapping.lock().unwrap_or_else(|e| e.into_inner());
        u.iter().find(|x| x.overlaps(part)).copied()
    }

    /// Everything the fault service and hmm's other threads do on the
    /// application's behalf, done (see [`Hmm::settle`]).
    pub(crate) fn settle_within(&self, limit: Duration) -> Result<(), Unsettled> {
        if crate::fault::on_service_thread() || !self.in_own_process() {
            return Ok(());
        }
        let deadline = std::time::Instant::now() + limit;
        let left = || deadline.saturating_duration_since(std::time::Instant::now());
        self.settle_events_within(left())?;
        if !self.forwards.wait_idle(left()) {
            return Err(Unsettled::Forwards);
        }
        if !self.fork_copies.wait_idle(left()) {
            return Err(Unsettled::ForkCopies);
        }
        // Discarded pages the page table still held when their event was
        // handled: looked at again until they are gone, or for 100 ms.
        if !crate::fault::poll_until(deadline, || {
            self.discards_pending.load(Ordering::Acquire) == 0
        }) {
            return Err(Unsettled::Discards);
        }
        Ok(())
    }

    /// Called as a device access begins (a device fault, a software device's
    /// read, write or job; see also `settle_before_migrating`): the records
    /// then reflect every address-space change the application has made, so
    /// that an access that begins after its `munmap` or `madvise` returned
    /// sees it. The kernel has finished such a change by the time the call
    /// returns, but hmm learns of it from an event its fault service handles
    /// a moment later; until then a page discarded from a failed device, say,
    /// would still read as lost.
    /// (A mirror entry made before the change is dropped by the invalidation
    /// the service starts when it handles the event, which this also waits
    /// for.) Nothing to wait for on the fault service's own thread.
    pub(crate) fn sync_device_access(&self) {
        self.settle_events_off_service();
    }

    /// [`settle_events`](Self::settle_events), unless called on the fault
    /// service's own thread, which cannot wait for itself.
    pub(crate) fn settle_events_off_service(&self) {
        if !crate::fault::on_service_thread() && self.in_own_process() {
            self.settle_events();
        }
    }

    /// Called as an application's migration begins, before it holds any
    /// page: a discard or unmap the application made before the call is
    /// handled first. Its event, read but not yet handled, would otherwise
    /// reach pages the migration holds and drop what they hold now (a page
    /// written after `MADV_FREE`, say). Never within a migration (a later
    /// batch, an eviction): waiting there would hold pages meanwhile, for as
    /// long as other threads keep changing the address space.
    pub(crate) fn settle_before_migrating(&self) {
        self.sync_device_access();
    }

    /// Puts the page at `src` (of `src_map`) at the absent page `dst`, which is
    /// registered with hmm's descriptor: moved where the kernel allows it,
    /// copied otherwise. An already-populated `dst`, or an empty `src`
    /// (nothing to put), is success. Retries while the kernel says the address
    /// space is changing (`EAGAIN`), for up to about ten seconds.
    pub(crate) fn put_back(
        &self,
        dst: PageRange,
        src_map: &Mapping,
        src: PageRange,
    ) -> Result<(), String> {
        for attempt in 0..100_000u32 {
            let r = match self.uffd.move_pages(dst, src_map, src, true, false) {
                Err(e) if e.kind == FillErrorKind::Invalid || e.kind == FillErrorKind::Busy => {
                    self.uffd.copy_from(dst, src_map, src, true)
                }
                r => r,
            };
            match r {
                Ok(_) => return Ok(()),
                Err(e) if matches!(e.kind, FillErrorKind::Exists | FillErrorKind::SourceHole) => {
                    return Ok(());
                }
                Err(e) if e.kind == FillErrorKind::Again => {
                    if attempt > 10 {
                        std::thread::sleep(Duration::from_micros(100));
                    } else {
                        std::thread::yield_now();
                    }
                }
                Err(e) => return Err(e.to_string()),
            }
        }
        Err("the address space kept changing".into())
    }

    /// Write-protects `pages` of managed memory that a device is about to map
    /// read-only although the area is writable (the zero page): a CPU write
    /// then faults to the fault service, which invalidates the mirrors before
    /// letting the write through (the kernel's copy-on-write break, which
    /// notifies mirrors). Pages of ranges without write-protect mode are left.
    pub(crate) fn track_writes(&self, pages: &[PageRange]) {
        for run in pages {
            let Some(r) = self.find(run.start()) else { continue };
            if !r.wp {
                continue;
            }
            let end = run.end().min(r.range().end());
            let Ok(part) = PageRange::new(run.start(), end.get() - run.start().get()) else {
                continue;
            };
            if let Err(e) = self.uffd.write_protect(part) {
                tracing::debug!(%part, error = %e, "cannot write-protect pages a device maps read-only");
            }
        }
    }

    /// For each page of `range`, whether the page table holds it (present,
    /// or swapped out); `None` when the page table cannot be read.
    pub(crate) fn held_pages(&self, range: PageRange) -> Option<Vec<bool>> {
        match self.pagemap().map(|pm| pm.entries(range)) {
            Ok(Ok(e)) => Some(e.iter().map(|p| p.present() || p.swapped()).collect()),
            Ok(Err(e)) => {
                tracing::debug!(%range, error = %e, "cannot read the page table");
                None
            }
            Err(e) => {
                tracing::debug!(%range, error = %e, "cannot open the page table");
                None
            }
        }
    }

    /// Whether the page table holds a page at `page`; true when it cannot
    /// be read, the answer that reads it.
    pub(crate) fn holds_page(&self, page: PageRange) -> bool {
        self.held_pages(page).is_none_or(|h| h.contains(&true))
    }

    /// Runs `read`, which reads `page` of managed memory that its caller
    /// holds (migrating), with `page` listed in `copying_out`: should the
    /// page be absent, the fault service serves the read with the zero page
    /// instead of waiting for the hold to end, which would wait forever.
    pub(crate) fn read_held<T>(&self, page: VirtAddr, read: impl FnOnce() -> T) -> T {
        self.copying_out.lock().unwrap_or_else(|e| e.into_inner()).push(page);
        let out = read();
        let mut list = self.copying_out.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(k) = list.iter().position(|a| *a == page) {
            list.swap_remove(k);
        }
        out
    }

    /// Whether hmm is reading `page` under its own hold (see `read_held`).
    pub(crate) fn is_copying_out(&self, page: VirtAddr) -> bool {
        self.copying_out.lock().unwrap_or_else(|e| e.into_inner()).contains(&page)
    }

    /// Discards `page` for hmm's own purposes: the remove event it causes is
    /// recognised by the fault service and not taken for the application's.
    pub(crate) fn discard_own(&self, mapping: &Mapping, page: PageRange) -> Result<(), MmError> {
        self.expect_own(&[OwnChange::Remove(page)]);
        let r = mapping.advise(page, Advise::DontNeed);
        if r.is_err() {
            self.take_own_change(OwnChange::Remove(page));
        }
        r
    }

    /// Records `changes` as hmm's own, before the calls that make them.
    pub(crate) fn expect_own(&self, changes: &[OwnChange]) {
        self.own_changes.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(changes);
    }

    /// Whether the event of `change` is one of hmm's own (then forgotten).
    pub(crate) fn take_own_change(&self, change: OwnChange) -> bool {
        let mut v = self.own_changes.lock().unwrap_or_else(|e| e.into_inner());
        match v.iter().position(|c| *c == change) {
            Some(i) => {
                v.swap_remove(i);
                true
            }
            None => false,
        }
    }

    /// The mirrored mapping (see [`Hmm::mirror`]) wholly containing `range`.
    pub(crate) fn mirrored_containing(&self, range: PageRange) -> Option<Arc<Mapping>> {
        let m = self.mirrored.read().unwrap_or_else(|e| e.into_inner());
        m.range(..=range.start().get())
            .next_back()
            .map(|(_, x)| x)
            .filter(|x| x.check(range).is_ok())
            .cloned()
    }

    /// `/proc/self/maps`, opened once.
    pub(crate) fn vma_query(&self) -> std::io::Result<&VmaQuery> {
        open_once(&self.vma_query, VmaQuery::open)
    }

    /// `/proc/self/pagemap`, opened once.
    pub(crate) fn pagemap(&self) -> Result<&Pagemap, PagemapError> {
        open_once(&self.pagemap, Pagemap::open)
    }

    /// `mprotect` of `part` of `mapping` that mirrors see: invalidated
    /// (`Protection`) until the protection has changed.
    fn protect(&self, mapping: &Mapping, part: PageRange, prot: Protection) -> Result<(), MmError> {
        mapping.check(part)?;
        let _inv = self.notifiers.start(part, InvalidationEvent::Protection);
        mapping.protect(part, prot)
    }

    /// The managed ranges holding memory in `[start, end)`, by address,
    /// each with the part of `[start, end)` it holds (a range appears once
    /// per part: it may hold pieces on both sides of memory it no longer
    /// holds).
    pub(crate) fn overlapping(&self, start: usize, end: usize) -> Vec<(Arc<Range>, usize, usize)> {
        let ranges = self.ranges.read().unwrap_or_else(|e| e.into_inner());
        ranges.live(start, end).map(|(r, s, e)| (r.clone(), s, e)).collect()
    }

    /// Brings the pages of `part` (inside `r`) that live on `mem` back to system
    /// memory with the device's own engine.
    pub(crate) fn bring_back(
        self: &Arc<Self>,
        r: Arc<Range>,
        part: PageRange,
        mem: &DeviceMemory,
    ) -> Result<MigrationReport, HmmError> {
        let sel = Selection::Device(mem.id());
        let mut m = Migration::setup_in(self, r, part, sel, sel.owner())?;
        m.copy(mem.ops().dma());
        Ok(m.finalize())
    }

    /// The error for a device this instance does not know: one it released
    /// as it shut down, or one never registered with it.
    pub(crate) fn unknown_device(&self, dev: DeviceId) -> HmmError {
        if self.shut_down.load(Ordering::Acquire) {
            HmmError::ShutDown
        } else {
            HmmError::UnknownDevice(dev)
        }
    }

    /// The managed range holding `addr`.
    pub(crate) fn find(&self, addr: VirtAddr) -> Option<Arc<Range>> {
        let ranges = self.ranges.read().unwrap_or_else(|e| e.into_inner());
        ranges.find(addr.get()).cloned()
    }

    /// [`find_containing`](Self::find_containing) for an operation `op` of
    /// the application's: memory a range held until the application
    /// unmapped it is refused with that reason (whatever is mapped there
    /// now), memory never managed with [`HmmError::NotManaged`].
    fn find_managed(&self, range: PageRange, op: &'static str) -> Result<Arc<Range>, HmmError> {
        self.find_containing(range).or_else(|e| {
            let gone = {
                let ranges = self.ranges.read().unwrap_or_else(|e| e.into_inner());
                ranges.covering(range.start().get(), range.end().get()).is_some()
            };
            if gone {
                self.check_accessible(range, op)?;
            }
            Err(e)
        })
    }

    /// The managed range wholly containing `range`.
    pub(crate) fn find_containing(&self, range: PageRange) -> Result<Arc<Range>, HmmError> {
        match self.find(range.start()) {
            Some(r) if range.end() <= r.range().end() => Ok(r),
            _ => Err(HmmError::NotManaged(range)),
        }
    }

    pub(crate) fn device(&self, id: DeviceId) -> Option<Arc<DeviceMemory>> {
        let devs = self.devices.read().unwrap_or_else(|e| e.into_inner());
        devs.get(id.index()).and_then(Clone::clone)
    }

    /// Drops a reference to a device page (freeing it when last).
    pub(crate) fn put_page(&self, page: DevicePage) {
        self.put_pages(&[page]);
    }

    /// Drops a reference to each of `pages`, a device at a time.
    pub(crate) fn put_pages(&self, pages: &[DevicePage]) {
        let mut rest = pages;
        while let Some(first) = rest.first() {
            let n = rest.iter().take_while(|p| p.dev == first.dev).count();
            if let Some(d) = self.device(first.dev) {
                d.put_all(&rest[..n]);
            }
            rest = &rest[n..];
        }
    }

    pub(crate) fn migrate_to_device(
        self: &Arc<Self>,
        range: PageRange,
        mem: &Arc<DeviceMemory>,
        engine: &dyn crate::dma::DmaEngine,
    ) -> Result<MigrationReport, HmmError> {
        self.migrate_to_device_with(range, mem, engine, true)
    }

    /// [`migrate_to_device`](Self::migrate_to_device); `map_for_cpu` false
    /// leaves pages that land in coherent memory unmapped for the CPU, so a
    /// CPU touch faults them back (exclusive access).
    pub(crate) fn migrate_to_device_with(
        self: &Arc<Self>,
        range: PageRange,
        mem: &Arc<DeviceMemory>,
        engine: &dyn crate::dma::DmaEngine,
        map_for_cpu: bool,
    ) -> Result<MigrationReport, HmmError> {
        if mem.is_released() {
            return Err(self.unknown_device(mem.id()));
        }
        let rec = self.find_managed(range, "migrate to a device")?;
        self.check_accessible(range, "migrate to a device")?;
        let mut report = self.migrate_to_device_once(range, mem, engine, map_for_cpu)?;
        // A page the kernel would not move because this process does not
        // hold it alone (shared copy-on-write since a fork, even after the
        // child exited: the kernel marks an anonymous page exclusive again
        // only at a write fault) is unshared by `MADV_POPULATE_WRITE`, a write
        // fault that changes no byte, and tried once more, as the kernel's own
        // migration would move it. (Pages busy for other reasons, held by
        // another migration or pinned, are tried again to no harm.)
        let busy: Vec<VirtAddr> = report
            .skipped
            .iter()
            .filter(|(_, r)| *r == SkipReason::Busy)
            .map(|(a, _)| *a)
            .collect();
        if busy.is_empty() {
            return Ok(report);
        }
        report.skipped.retain(|(_, r)| *r != SkipReason::Busy);
        for run in runs_of(&busy) {
            if rec.mapping().advise(run, Advise::PopulateWrite).is_ok() {
                report.append(self.migrate_to_device_once(run, mem, engine, map_for_cpu)?);
            } else {
                let page = |i| VirtAddr::new(run.start().get() + i * PAGE_SIZE);
                report.skipped.extend((0..run.pages()).map(|i| (page(i), SkipReason::Busy)));
            }
        }
        Ok(report)
    }

    /// One try of [`migrate_to_device_with`](Self::migrate_to_device_with).
    fn migrate_to_device_once(
        self: &Arc<Self>,
        range: PageRange,
        mem: &Arc<DeviceMemory>,
        engine: &dyn crate::dma::DmaEngine,
        map_for_cpu: bool,
    ) -> Result<MigrationReport, HmmError> {
        // Pipelined: while the engine copies one batch, the next is set up and
        // given its device pages, and the one before is finalized.
        let mut in_flight: Option<Migration> = None;
        let mut report = self.migrate_batches(range, |r| {
            let mut m = Migration::setup_for(self.clone(), r, Selection::System, Some(mem.id()))?;
            m.keep_on_device(range);
            if !map_for_cpu {
                m.keep_off_cpu();
            }
            m.allocate_on(mem);
            m.start_copy(engine);
            Ok(in_flight.replace(m).map(Migration::finalize).unwrap_or_default())
        })?;
        if let Some(m) = in_flight {
            report.append(m.finalize());
        }
        Ok(report)
    }

    pub(crate) fn migrate_to_system(
        self: &Arc<Self>,
        range: PageRange,
        mem: &Arc<DeviceMemory>,
        engine: &dyn crate::dma::DmaEngine,
    ) -> Result<MigrationReport, HmmError> {
        self.check_accessible(range, "migrate to system memory")?;
        self.migrate_batches(range, |r| {
            let mut m = Migration::setup(self.clone(), r, Selection::Device(mem.id()))?;
            m.copy(engine);
            Ok(m.finalize())
        })
    }

    /// Migrates the pages of `range` that live on `from` into `to`: directly
    /// when both take part in peer-to-peer copies (the destination's engine
    /// reads `from`'s memory), through system memory otherwise (back with
    /// `from`'s engine, then out with `to`'s). `from`'s mirrors are
    /// invalidated and its pages freed as each page lands.
    pub(crate) fn migrate_device_to_device(
        self: &Arc<Self>,
        range: PageRange,
        from: &Arc<DeviceMemory>,
        to: &Arc<DeviceMemory>,
    ) -> Result<MigrationReport, HmmError> {
        self.check_accessible(range, "migrate between devices")?;
        if to.is_released() {
            return Err(self.unknown_device(to.id()));
        }
        if from.id() == to.id() {
            return Ok(MigrationReport::default());
        }
        self.find_containing(range)?;
        let direct = from.ops().peer_memory().is_some()
            && to.ops().peer_memory().is_some()
            && to.ops().dma().reads_peers();
        self.migrate_batches(range, |r| {
            if direct {
                let mut m = Migration::setup_for(
                    self.clone(),
                    r,
                    Selection::Peer(from.id()),
                    Some(to.id()),
                )?;
                m.keep_on_device(range);
                m.allocate_on(to);
                m.copy(to.ops().dma());
                return Ok(m.finalize());
            }
            // Through system memory: only the pages that came back move on.
            let mut m = Migration::setup(self.clone(), r, Selection::Device(from.id()))?;
            m.copy(from.ops().dma());
            let back = m.finalize();
            let mut stayed = vec![false; r.pages()];
            for (a, _) in &back.skipped {
                stayed[(a.get() - r.start().get()) / PAGE_SIZE] = true;
            }
            let mut report =
                MigrationReport { migrated: 0, skipped: back.skipped, evicted: back.evicted };
            let mut k = 0;
            while k < stayed.len() {
                let n = stayed[k..].iter().take_while(|s| !**s).count();
                if n > 0 {
                    let part = r.subrange(k * PAGE_SIZE, n * PAGE_SIZE)?;
                    let mut m =
                        Migration::setup_for(self.clone(), part, Selection::System, Some(to.id()))?;
                    m.keep_on_device(range);
                    m.allocate_on(to);
                    m.copy(to.ops().dma());
                    report.append(m.finalize());
                }
                k += n + 1;
            }
            Ok(report)
        })
    }

    /// Migrates every page of `range` into `to`, wherever it lives: system
    /// memory (and never-populated pages), or any other device
    /// ([`migrate_device_to_device`](Self::migrate_device_to_device)).
    pub(crate) fn migrate_here(
        self: &Arc<Self>,
        range: PageRange,
        to: &Arc<DeviceMemory>,
    ) -> Result<MigrationReport, HmmError> {
        let rec = self.find_managed(range, "migrate to a device")?;
        self.check_accessible(range, "migrate to a device")?;
        let first = rec.index(range.start());
        let others: Vec<DeviceId> = devices_of(&rec.lock(), first..first + range.pages())
            .into_iter()
            .filter(|d| *d != to.id())
            .collect();
        let mut report = MigrationReport::default();
        for d in others {
            if let Some(from) = self.device(d) {
                let mut r = self.migrate_device_to_device(range, &from, to)?;
                // Pages of other kinds are the other passes' business.
                r.skipped.retain(|(_, why)| !matches!(why, SkipReason::NotSelected(_)));
                report.append(r);
            }
        }
        let mut r = self.migrate_to_device(range, to, to.ops().dma())?;
        r.skipped.retain(|(_, why)| !matches!(why, SkipReason::NotSelected(_)));
        report.append(r);
        Ok(report)
    }

    fn migrate_batches(
        &self,
        range: PageRange,
        mut batch: impl FnMut(PageRange) -> Result<MigrationReport, HmmError>,
    ) -> Result<MigrationReport, HmmError> {
        const BATCH: usize = 16 << 20;
        self.find_containing(range)?;
        self.settle_before_migrating();
        let mut report = MigrationReport::default();
        let mut off = 0;
        while off < range.len() {
            let len = BATCH.min(range.len() - off);
            report.append(batch(range.subrange(off, len)?)?);
            off += len;
        }
        Ok(report)
    }

    /// Evicts `pages` of device `dev`, grouped into runs of adjacent addresses.
    pub(crate) fn evict(
        self: &Arc<Self>,
        dev: DeviceId,
        pages: &[DevicePage],
    ) -> Result<usize, HmmError> {
        let mem = self.device(dev).ok_or_else(|| self.unknown_device(dev))?;
        let addrs: Vec<VirtAddr> = pages.iter().filter_map(|p| mem.backs(*p)).collect();
        let mut moved = 0;
        for run in runs_of(&addrs) {
            // A run may span ranges only if they are adjacent: split at range ends.
            let mut at = run.start();
            while at < run.end() {
                let Some(r) = self.find(at) else {
                    at = VirtAddr::new(at.get() + PAGE_SIZE);
                    continue;
                };
                let end = r.range().end().min(run.end());
                let part = PageRange::new(at, end.get() - at.get())?;
                moved += self.bring_back(r, part, &mem)?.migrated;
                at = end;
            }
        }
        Ok(moved)
    }

    /// Evicts every page of `dev`, retrying pages caught mid-migration for up to
    /// about a second.
    pub(crate) fn evict_all(self: &Arc<Self>, dev: DeviceId) -> Result<(), HmmError> {
        let mem = self.device(dev).ok_or_else(|| self.unknown_device(dev))?;
        if mem.is_failed() {
            // Nothing can be read off it: its pages were poisoned as it
            // failed, and those a migration held are as the migration ends.
            return Ok(());
        }
        for attempt in 0.. {
            let pages: Vec<DevicePage> = mem.resident_pages().into_iter().map(|(p, _)| p).collect();
            if pages.is_empty() {
                return Ok(());
            }
            self.evict(dev, &pages)?;
            if attempt > 1000 {
                return Err(HmmError::PagesLeft { device: dev, pages: pages.len() });
            }
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        unreachable!("the loop returns")
    }

    /// Evicts every page of `dev` (retrying pages caught mid-migration), then
    /// unregisters it.
    pub(crate) fn release_device(self: &Arc<Self>, dev: DeviceId) -> Result<(), HmmError> {
        if let Err(e) = self.evict_all(dev) {
            tracing::error!(device = %dev, error = %e, "releasing the device anyway");
        }
        // A region that still holds pages (held by a migration or a fork's
        // copy as eviction looked, say) stays in its slot, released: what
        // ends their hold (a poison, a free) must reach it, and its id is
        // given again only once it holds none. One that holds none goes (and
        // its engine with it).
        let mut devs = self.devices.write().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = devs.get_mut(dev.index())
            && let Some(mem) = slot.take()
        {
            mem.set_released();
            if mem.allocated_pages() > 0 {
                tracing::debug!(device = %dev, pages = mem.allocated_pages(), "a released device still holds pages");
                *slot = Some(mem);
            }
        }
        Ok(())
    }

    /// Poisons every page living on `dev`; returns how many.
    pub(crate) fn poison_device(&self, dev: DeviceId) -> usize {
        let Some(mem) = self.device(dev) else { return 0 };
        mem.set_failed();
        // Coherent pages the CPU maps come off its page table first (held as
        // a migration holds them meanwhile), so that the poison can go in.
        for (page, addr) in mem.resident_pages() {
            let Some(r) = self.find(addr) else { continue };
            let i = r.index(addr);
            {
                let mut t = r.lock();
                if t[i].device_page() != Some(page) || !t[i].is_cpu_mapped() {
                    continue;
                }
                if t[i].begin_migration().is_err() {
                    continue;
                }
            }
            let one = PageRange::from_pages(addr, 1).expect("one page");
            let off = self.coherent_unmap(&r, one);
            let mut t = r.lock();
            if let Err(e) = &off {
                tracing::error!(%addr, error = %e, "a failed device's coherent page stays mapped");
            } else {
                let _ = t[i].set_cpu_mapped(false);
            }
            let kept = t[i].abort().unwrap_or(true);
            drop(t);
            if !kept {
                // Discarded or unmapped meanwhile: nothing left to poison.
                mem.put(page);
            }
            // A touch that waited meanwhile faults again: on a failed device's
            // page, that is SIGBUS.
            let _ = self.uffd.wake(one);
        }
        // Pages mid-migration are skipped here: a migration that ends with
        // one still on this device poisons it then (see `Migration::finish`).
        let mut poisoned = 0;
        for (page, addr) in mem.resident_pages() {
            if let Some(r) = self.find(addr)
                && self.poison_resident(&r, addr, page)
            {
                poisoned += 1;
            }
        }
        poisoned
    }

    /// Poisons the page at `addr` of `r` if it still lives in `page` (of a
    /// failed device) and no migration holds it: the marker goes in its place
    /// (the address is empty while the page lives on the device), so the
    /// next touch gets SIGBUS, and the device page is freed. Returns whether
    /// it did.
    pub(crate) fn poison_resident(&self, r: &Arc<Range>, addr: VirtAddr, page: DevicePage) -> bool {
        let i = r.index(addr);
        let one = PageRange::from_pages(addr, 1).expect("one page");
        // Mirrors first: the page's contents are about to be lost.
        let _inv = self.notifiers.start(one, InvalidationEvent::Clear);
        let mem = self.device(page.dev);
        let mut t = r.lock();
        if t[i].device_page() != Some(page) || t[i].is_migrating() {
            return false;
        }
        let res = self.uffd.poison(one, false);
        if res.is_err() && !self.uffd.features().contains(Features::POISON) {
            tracing::error!(%addr, "UFFDIO_POISON unavailable: the page stays lost on a failed device");
            return false;
        }
        // Counted before the record says so: whoever sees the page poisoned
        // sees it counted.
        r.counters.pages_poisoned.fetch_add(1, Ordering::Relaxed);
        if let Some(mem) = &mem {
            mem.counters.pages_poisoned.fetch_add(1, Ordering::Relaxed);
        }
        t[i].poison().expect("device page, not migrating");
        drop(t);
        self.put_page(page);
        true
    }

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
            if crate::fault::poll_until(deadline, || h.is_finished()) {
                let _ = h.join();
            } else {
                tracing::error!(
                    "the fault service did not stop within {SERVICE_STOP:?}; leaving it"
                );
            }
        }
        self.ranges.write().unwrap_or_else(|e| e.into_inner()).clear();
        self.uffd.close();
        self.staging_uffd.close();
    }
}

impl ManagedRange {
    /// The whole range.
    pub fn range(&self) -> PageRange {
        self.range.range()
    }

    /// First address.
    pub fn addr(&self) -> VirtAddr {
        self.range().start()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.range().len()
    }

    /// Always false: a range holds at least one page.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Number of pages.
    pub fn pages(&self) -> usize {
        self.range().pages()
    }

    /// The range of pages `first..first + count`.
    pub fn pages_range(&self, first: usize, count: usize) -> Result<PageRange, RangeError> {
        let bytes = |n: usize| n.saturating_mul(PAGE_SIZE);
        self.range().subrange(bytes(first), bytes(count))
    }

    /// The first byte's address, for handing to code that takes raw pointers.
    pub fn as_ptr(&self) -> *mut u8 {
        self.addr().get() as *mut u8
    }

    /// Before a CPU access of `len` bytes at `offset` through this handle:
    /// no page of it may be gone or lost. A part the application unmapped
    /// itself (`munmap`, as opposed to [`unmap`](Self::unmap), which the
    /// handle knows of at once) is refused as soon as the `munmap` has
    /// returned, though hmm may not have handled its event yet: the
    /// addresses may hold another mapping by now, whose bytes are not this
    /// range's. A page lost with a failed device is refused too (a raw touch
    /// of it gets `SIGBUS`). Bounds are left to the mapping's own check.
    ///
    /// In a forked child nothing is looked at: the child has a copy of
    /// hmm's records, frozen at the fork, and of its locks, which another
    /// thread of the parent may have held then and which nothing in the
    /// child would ever release. There the accessors act as raw accesses.
    fn check_cpu_access(&self, offset: usize, len: usize) -> Result<(), RangeError> {
        if !self.inner.in_own_process() {
            return Ok(());
        }
        let Some(end) = offset.checked_add(len.max(1)).filter(|e| *e <= self.len()) else {
            return Ok(());
        };
        let (first, last) = (offset / PAGE_SIZE, (end - 1) / PAGE_SIZE);
        let part = self.pages_range(first, last - first + 1)?;
        if let Some(gone) = self.inner.pending_unmap(part) {
            return Err(RangeError::Unmapped(gone));
        }
        let bad =
            |e: &PageEntry| matches!(e.residency(), Residency::Unmapped | Residency::Poisoned);
        let mut t = self.range.lock();
        if (first..=last).any(|k| t[k].residency() == Residency::Poisoned) {
            // A lost page is usable again once the application discards it
            // (`MADV_DONTNEED`), which hmm hears of after the call returns:
            // the record is looked at again once the events are handled.
            drop(t);
            self.inner.settle_events_off_service();
            t = self.range.lock();
        }
        let Some(k) = (first..=last).find(|k| bad(&t[*k])) else { return Ok(()) };
        // The whole run of pages gone (or lost) that the access meets.
        let what = t[k].residency();
        let run = runs_where(&t, 0..t.len(), |e| e.residency() == what)
            .into_iter()
            .find(|run| run.contains(&k))
            .expect("page k is in a run of its kind");
        drop(t);
        let pages = self.pages_range(run.start, run.len())?;
        Err(match what {
            Residency::Poisoned => RangeError::Poisoned(pages),
            _ => RangeError::Unmapped(pages),
        })
    }

    /// Copies bytes out, as the CPU would read them: device pages fault back.
    /// A part unmapped (by this handle or by the application's own
    /// `munmap`) is refused with [`RangeError::Unmapped`], a part lost with
    /// a failed device with [`RangeError::Poisoned`].
    pub fn read(&self, offset: usize, buf: &mut [u8]) -> Result<(), RangeError> {
        self.check_cpu_access(offset, buf.len())?;
        self.range.mapping().read(offset, buf)
    }

    /// Copies `data` in, as the CPU would write it (refused as [`read`](Self::read)
    /// refuses).
    pub fn write(&self, offset: usize, data: &[u8]) -> Result<(), RangeError> {
        self.check_cpu_access(offset, data.len())?;
        self.range.mapping().write(offset, data)
    }

    /// Sets `len` bytes at `offset` to `byte` (refused as [`read`](Self::read)
    /// refuses).
    pub fn fill(&self, offset: usize, len: usize, byte: u8) -> Result<(), RangeError> {
        self.check_cpu_access(offset, len)?;
        self.range.mapping().fill(offset, len, byte)
    }

    /// One CPU read of the byte at `offset` (refused as [`read`](Self::read)
    /// refuses).
    pub fn touch_read(&self, offset: usize) -> Result<u8, RangeError> {
        self.check_cpu_access(offset, 1)?;
        self.range.mapping().touch_read(offset)
    }

    /// One CPU write of the byte at `offset` (refused as [`read`](Self::read)
    /// refuses).
    pub fn touch_write(&self, offset: usize, value: u8) -> Result<(), RangeError> {
        self.check_cpu_access(offset, 1)?;
        self.range.mapping().touch_write(offset, value)
    }

    /// `madvise` over part of the range, made directly as the application would
    /// (hmm learns of discards from the kernel's events, like any other).
    pub fn advise(&self, part: PageRange, advice: Advise) -> Result<(), MmError> {
        self.range.mapping().advise(part, advice)
    }

    /// Unmaps `part` as the application's own `munmap` would. hmm learns of it
    /// the way it learns of any `munmap`, from the kernel's unmap event: once
    /// the fault service has read it (moments later), the device pages that
    /// held `part` are freed and its pages read as
    /// [`Residency::Unmapped`]. The rest of the range keeps working; accesses to
    /// `part` through this handle then fail with [`RangeError::Unmapped`].
    pub fn unmap(&self, part: PageRange) -> Result<(), MmError> {
        self.range.mapping().check(part)?;
        let _inv = self.inner.notifiers.start(part, InvalidationEvent::Unmap);
        self.range.mapping().punch(part)
    }

    /// `mprotect` over part of the range, through hmm: mirrors are invalidated
    /// first (`Protection`), so a device fills its entries again with the new
    /// permission. (An `mprotect` hmm does not see, such as
    /// `self.mapping().protect(..)`, cannot invalidate anything; devices must
    /// re-validate permission when they write, as the software device does.)
    pub fn protect(&self, part: PageRange, prot: Protection) -> Result<(), MmError> {
        self.inner.protect(self.range.mapping(), part, prot)
    }

    /// Pins `part` in system memory, for DMA by another driver or `O_DIRECT`
    /// I/O (the kernel's long-term pin): its device pages come back first,
    /// never-populated pages are populated, and until the [`Pin`] is dropped
    /// migrations skip its pages with [`SkipReason::Pinned`]. Pins nest.
    ///
    /// hmm's promise is not to move the pages; the driver that does the DMA
    /// takes its own kernel reference, as it would on any memory.
    ///
    /// [`SkipReason::Pinned`]: crate::SkipReason::Pinned
    pub fn pin(&self, part: PageRange) -> Result<Pin, HmmError> {
        self.range.mapping().check(part).map_err(MmError::from)?;
        let first = self.range.index(part.start());
        let idx = first..first + part.pages();
        for _ in 0..100 {
            let devs = devices_of(&self.range.lock(), idx.clone());
            for dev in devs {
                if let Some(mem) = self.inner.device(dev) {
                    self.inner.migrate_to_system(part, &mem, mem.ops().dma())?;
                }
            }
            self.range.mapping().advise(part, Advise::PopulateWrite)?;
            let t = self.range.lock();
            let settled = !t.any(idx.clone(), |e| {
                e.is_migrating() || !matches!(e.residency(), Residency::System | Residency::None)
            });
            if settled {
                let mut pins = self.range.lock_pins();
                for i in idx.clone() {
                    *pins.entry(i).or_default() += 1;
                }
                return Ok(Pin { range: self.range.clone(), pages: idx });
            }
            let lost =
                |e: PageEntry| matches!(e.residency(), Residency::Poisoned | Residency::Unmapped);
            if let Some(i) = t.position(idx.clone(), lost) {
                let (k, e) = (i - idx.start, t[i]);
                let reason = if e.residency() == Residency::Poisoned {
                    crate::migrate::SkipReason::Poisoned
                } else {
                    crate::migrate::SkipReason::Unmapped
                };
                return Err(HmmError::NotMoved {
                    op: "pin",
                    addr: self.range.page_addr(first + k),
                    reason,
                });
            }
            drop(t);
            std::thread::sleep(Duration::from_millis(1));
        }
        Err(HmmError::NotMoved {
            op: "pin",
            addr: part.start(),
            reason: crate::migrate::SkipReason::Busy,
        })
    }

    /// Whether CPU writes to pages a device maps read-only are caught (the
    /// range is registered in write-protect mode; a kernel without it for
    /// anonymous memory leaves them uncaught, and device reads still see
    /// every write, since they go through the kernel).
    pub fn tracks_writes(&self) -> bool {
        self.range.wp
    }

    /// Where page `index` lives.
    pub fn residency(&self, index: usize) -> Residency {
        self.range.lock()[index].residency()
    }

    /// Where every page lives, in order.
    pub fn residencies(&self) -> Vec<Residency> {
        let t = self.range.lock();
        t.iter(0..t.len()).map(|e| e.residency()).collect()
    }

    /// Where the range's bytes live now: system memory, each device, never
    /// populated, lost, unmapped; the parts sum to [`len`](Self::len).
    pub fn residence(&self) -> Residence {
        let mut r = Residence::default();
        r.count(&self.range.lock());
        r
    }

    /// Where each page of this range lives now, with its counters (see
    /// [`Hmm::residency_map`]).
    pub fn residency_map(&self) -> crate::observe::ResidencyMap {
        crate::observe::residency_map(&self.inner, self.range())
    }

    /// Where the pages live and what happened to them.
    pub fn stats(&self) -> RangeStats {
        let mut s = RangeStats::default();
        let t = self.range.lock();
        s.count_pages(&t, 0..t.len());
        drop(t);
        s.add_counters(&self.range.counters);
        s
    }

    /// The underlying mapping.
    pub fn mapping(&self) -> &Mapping {
        self.range.mapping()
    }
}

impl Drop for ManagedRange {
    fn drop(&mut self) {
        if !self.inner.shut_down.load(Ordering::Acquire) {
            self.inner.unmanage(&self.range);
        }
    }
}

/// Pages of a managed range pinned in system memory ([`ManagedRange::pin`]);
/// dropping it unpins them.
pub struct Pin {
    range: Arc<Range>,
    pages: std::ops::Range<usize>,
}

impl fmt::Debug for Pin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pin").field("range", &self.range()).finish()
    }
}

impl Pin {
    /// The pinned pages.
    pub fn range(&self) -> PageRange {
        PageRange::from_pages(self.range.page_addr(self.pages.start), self.pages.len())
            .expect("inside the range")
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        let mut pins = self.range.lock_pins();
        for i in self.pages.clone() {
            if let Some(n) = pins.get_mut(&i) {
                *n -= 1;
                if *n == 0 {
                    pins.remove(&i);
                }
            }
        }
    }
}

/// Holds the fault service stopped mid-fault while it lives
/// ([`Hmm::stall_next_fault`]).
#[must_use = "the fault service goes on as soon as the guard is dropped"]
#[derive(Debug)]
pub struct FaultStall {
    gate: Arc<crate::fault::StallGate>,
}

impl FaultStall {
    /// Waits up to `limit` for the service to stop at a fault; the address
    /// of the fault, or `None` if it has not stopped.
    pub fn wait_stalled(&self, limit: Duration) -> Option<VirtAddr> {
        self.gate.wait_stalled(limit)
    }
}

impl Drop for FaultStall {
    fn drop(&mut self) {
        self.gate.release();
    }
}

/// Memory handed to [`Hmm::mirror`]: devices may read and write it through
/// their page tables; hmm never migrates it.
#[derive(Debug)]
pub struct MirroredRange {
    inner: Arc<Inner>,
    mapping: Arc<Mapping>,
}

impl MirroredRange {
    /// The range.
    pub fn range(&self) -> PageRange {
        self.mapping.range()
    }

    /// The mapping, for the CPU's accesses.
    pub fn mapping(&self) -> &Mapping {
        &self.mapping
    }

    /// `mprotect` through hmm: mirrors are invalidated first.
    pub fn protect(&self, part: PageRange, prot: Protection) -> Result<(), MmError> {
        self.inner.protect(&self.mapping, part, prot)
    }
}

impl Drop for MirroredRange {
    fn drop(&mut self) {
        let _inv = self.inner.notifiers.start(self.range(), InvalidationEvent::Unmap);
        let mut m = self.inner.mirrored.write().unwrap_or_else(|e| e.into_inner());
        m.remove(&self.range().start().get());
        // A device write in progress holds its own reference: the mapping is
        // unmapped when the last one goes.
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
