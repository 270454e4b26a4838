//! # hmm-swdev: hmm's software device
//!
//! A complete device driver built on hmm's public driver API alone (see
//! `hmm::driver`): device-private (or coherent) memory backed by an
//! anonymous mapping the driver owns, a device page table that mirrors the
//! process's through an interval notifier and `range_fault`, device jobs,
//! exclusive access, eviction, failure, and one of two DMA engines.
//!
//! - [`EngineKind::Copy`]: a pool of worker threads copies pages. Device memory
//!   is a plain mapping (populated up front with `prefault`, like real VRAM);
//!   pages come back with `UFFDIO_COPY`.
//! - [`EngineKind::ZeroCopy`]: pages move with `UFFDIO_MOVE` (no copy) between
//!   staging, device memory and their address, falling back to copying where
//!   the kernel refuses a move (a read-only range, a page shared with a forked
//!   child). Device memory is registered with the device's own userfaultfd,
//!   with `UFFD_FEATURE_SIGBUS`: an empty device page is never touched by
//!   mistake without a loud SIGBUS.

#![warn(missing_docs)]

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};

use hmm::addr::{HUGE_PAGE_SIZE, PAGE_SIZE, PageRange, VirtAddr};
use hmm::devmem::{
    DeviceMemory, DeviceMemoryConfig, DevicePagemapOps, DeviceStats, InThreadFill, MemoryKind,
    Pressure,
};
use hmm::dma::{DmaEngine, DmaError, DmaFence, DmaJob, JobPart, ToDevice, ToSystem, Workers};
use hmm::driver::HmmHandle;
use hmm::migrate::{MigrationReport, SkipReason};
use hmm::mirror::{IntervalNotifier, PageInfo, RangeFault, RangeFaultError};
use hmm::os::mm::{Advise, Mapping, Protection};
use hmm::os::uffd::{Features, FillErrorKind, RegisterMode, Uffd, UffdOptions};
use hmm::page::{DeviceId, DevicePage};
use hmm::policy::Placement;
use hmm::space::{Hmm, HmmError};

/// Which DMA engine a software device uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    /// Worker threads copy the pages; a job of at most 16 pages (a fault-back
    /// of one page, say) is copied on the thread that submits it.
    Copy {
        /// Number of worker threads (at least 1).
        workers: usize,
    },
    /// Pages move with `UFFDIO_MOVE`, copied only where a move is refused.
    ZeroCopy,
}

/// How to build a software device.
#[derive(Debug, Clone)]
pub struct SoftwareDeviceConfig {
    /// Name for reports.
    pub name: String,
    /// Device memory in bytes.
    pub capacity: usize,
    /// The DMA engine.
    pub engine: EngineKind,
    /// Populate the device memory up front (copy engine only): copies then
    /// never wait for the kernel to allocate a page.
    pub prefault: bool,
    /// Whether the device's memory and engine take part in device-to-device
    /// copies (peer-to-peer DMA). Without it, pages move between this device
    /// and others through system memory.
    pub peer_to_peer: bool,
    /// What a migration to the full device does: refuse, or evict the least
    /// recently used pages to system memory.
    pub pressure: Pressure,
    /// Private memory (an anonymous mapping the CPU never maps at managed
    /// addresses) or coherent memory (a memfd whose pages hmm maps where the
    /// CPU reads and writes them).
    pub kind: MemoryKind,
    /// Pages of the duplicate cache: copies of read-mostly system pages the
    /// device keeps when a placement decides so (read duplication), apart
    /// from its memory. Reserved, not populated, until used.
    pub duplicate_pages: usize,
}

impl SoftwareDeviceConfig {
    /// A device of `capacity` bytes with the zero-copy engine.
    pub fn new(name: impl Into<String>, capacity: usize) -> Self {
        Self {
            name: name.into(),
            capacity,
            engine: EngineKind::ZeroCopy,
            prefault: false,
            peer_to_peer: true,
            pressure: Pressure::Refuse,
            kind: MemoryKind::Private,
            duplicate_pages: 1024,
        }
    }

    /// A device of `capacity` bytes of coherent memory: a memfd, whose pages
    /// the CPU maps directly once migrated (see [`hmm::coherent`]). Its
    /// engine copies (with two workers): `UFFDIO_MOVE` cannot move file pages.
    pub fn coherent(name: impl Into<String>, capacity: usize) -> Self {
        Self { kind: MemoryKind::Coherent, ..Self::new(name, capacity).with_copy_engine(2) }
    }

    /// The same, evicting least recently used pages when the device is full.
    pub fn evicting(mut self) -> Self {
        self.pressure = Pressure::Evict;
        self
    }

    /// The same, evicting the pages that came in first when the device is
    /// full, whatever the device did with them since (first in, first out).
    pub fn evicting_oldest(mut self) -> Self {
        self.pressure = Pressure::EvictOldest;
        self
    }

    /// The same, with a duplicate cache of `pages` pages (see
    /// [`duplicate_pages`](Self::duplicate_pages)).
    pub fn with_duplicate_pages(mut self, pages: usize) -> Self {
        self.duplicate_pages = pages;
        self
    }

    /// The same, without peer-to-peer copies.
    pub fn without_peer_to_peer(mut self) -> Self {
        self.peer_to_peer = false;
        self
    }

    /// The same with the copying engine and `workers` threads.
    pub fn with_copy_engine(mut self, workers: usize) -> Self {
        self.engine = EngineKind::Copy { workers };
        self
    }
}

/// Counters of a device operation (as the kernel's test driver reports them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct OpCounters {
    /// Pages the operation handled.
    pub cpages: u64,
    /// Device faults it took.
    pub faults: u64,
}

/// The driver side of the device's memory: its callbacks.
struct Core {
    engine: Box<dyn DmaEngine>,
    /// Coherent memory: the file the pool maps, which hmm maps for the CPU.
    file: Option<hmm::os::mm::Memfd>,
    /// The device's memory, offered to peers' engines when `peer` is set.
    pool: Arc<Mapping>,
    peer: bool,
    /// The engine's fault injection, which an in-thread copy honours too.
    faults: Arc<Injector>,
    /// The zero-copy engine's record of the pool's populated slots: an
    /// in-thread fault-back moves the page out of its slot, as the engine's
    /// own move back does.
    moves: Option<Arc<Populated>>,
}

impl DevicePagemapOps for Core {
    /// The page's slot in the pool, moved to the faulting address by the
    /// zero-copy engine in the faulting thread's handler (its slot is then
    /// empty), copied otherwise: from the fault service a move's TLB
    /// shootdown costs more than the copy (see [`InThreadFill::in_handler`]),
    /// as for the engine's short runs ([`MIN_MOVE_RUN`]). One system call;
    /// nothing allocated, no lock taken (an injected failure or a stalled
    /// engine sends the fault to the fault service, where the engine meets
    /// it).
    fn copy_to_ram_in_thread(&self, page: DevicePage, to: &mut InThreadFill<'_>) -> bool {
        if self.file.is_some() || self.faults.armed() {
            return false;
        }
        let Ok(slot) = self.pool.subrange(page.index as usize * PAGE_SIZE, PAGE_SIZE) else {
            return false;
        };
        if let Some(populated) = &self.moves
            && to.in_handler()
            && to.move_from(&self.pool, slot)
        {
            populated.set(page.index, false);
            return true;
        }
        to.copy_from(&self.pool, slot)
    }

    fn page_free(&self, _page: DevicePage) {
        // Nothing to do now. The zero-copy engine empties a freed page that
        // still holds one (it came back by copy) when the page is next filled:
        // emptying costs a TLB shootdown, which has no place on the path of a
        // CPU fault.
    }

    fn dma(&self) -> &dyn DmaEngine {
        self.engine.as_ref()
    }

    fn peer_memory(&self) -> Option<Arc<Mapping>> {
        self.peer.then(|| self.pool.clone())
    }

    fn coherent_file(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        self.file.as_ref().map(std::os::fd::AsFd::as_fd)
    }
}

/// One bit per device page.
struct Populated(Vec<std::sync::atomic::AtomicU64>);

impl Populated {
    fn new(pages: usize) -> Self {
        Self((0..pages.div_ceil(64)).map(|_| std::sync::atomic::AtomicU64::new(0)).collect())
    }
    fn set(&self, index: u32, on: bool) {
        let (w, b) = (index as usize / 64, 1u64 << (index % 64));
        if on {
            self.0[w].fetch_or(b, Ordering::AcqRel);
        } else {
            self.0[w].fetch_and(!b, Ordering::AcqRel);
        }
    }
    /// Clears the bit; returns whether it was set.
    fn take(&self, index: u32) -> bool {
        let (w, b) = (index as usize / 64, 1u64 << (index % 64));
        self.0[w].fetch_and(!b, Ordering::AcqRel) & b != 0
    }
}

fn slot_range(pool: &Mapping, page: DevicePage) -> PageRange {
    pool.subrange(page.index as usize * PAGE_SIZE, PAGE_SIZE).expect("device page inside the pool")
}

/// A software device with private memory, registered with an [`Hmm`] instance.
///
/// Dropping it brings every page it holds back to system memory.
///
/// ```
/// # fn main() -> Result<(), hmm::HmmError> {
/// use hmm::{Hmm, PAGE_SIZE};
/// use hmm_swdev::{SoftwareDevice, SoftwareDeviceConfig};
/// let hmm = Hmm::new()?;
/// let gpu = SoftwareDevice::new(&hmm, SoftwareDeviceConfig::new("gpu0", 1 << 20))?;
/// let r = hmm.alloc(2 * PAGE_SIZE)?;
/// r.fill(0, r.len(), 9)?;
/// gpu.migrate_to_device(r.range())?;
/// let (bytes, _) = gpu.read(r.range())?; // through the device's page table
/// assert!(bytes.iter().all(|b| *b == 9));
/// gpu.migrate_to_system(r.range())?;
/// assert_eq!(gpu.stats().pages_resident, 0);
/// # Ok(()) }
/// ```
pub struct SoftwareDevice {
    hmm: HmmHandle,
    mem: Arc<DeviceMemory>,
    core: Arc<CoreHandle>,
    mirror: Arc<DeviceMirror>,
}

/// The `Arc`-shared pieces the engines point into.
struct CoreHandle {
    faults: Arc<Injector>,
}

impl std::fmt::Debug for SoftwareDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoftwareDevice").field("mem", &self.mem).finish_non_exhaustive()
    }
}

impl SoftwareDevice {
    /// Creates a device and registers its memory with `hmm`.
    pub fn new(hmm: &Hmm, config: SoftwareDeviceConfig) -> Result<Self, HmmError> {
        if config.capacity == 0 {
            return Err(HmmError::Config(format!(
                "software device {:?} has a capacity of 0 bytes: give it at least one page \
                 ({PAGE_SIZE} bytes) of memory",
                config.name
            )));
        }
        let (pool, file) = match config.kind {
            // Aligned to 2 MiB, so that device pages allocated in aligned runs
            // of 512 can hold a transparent huge page whole (moved in and out
            // as one PMD by the zero-copy engine).
            MemoryKind::Private => (
                Mapping::anonymous_aligned(config.capacity, HUGE_PAGE_SIZE, Protection::ReadWrite)?,
                None,
            ),
            MemoryKind::Coherent => {
                if config.engine == EngineKind::ZeroCopy {
                    return Err(HmmError::Config(
                        "coherent memory is a memfd, whose pages UFFDIO_MOVE cannot move: use \
                         the copy engine (SoftwareDeviceConfig::coherent does)"
                            .into(),
                    ));
                }
                let name = std::ffi::CString::new(format!("hmm-coherent-{}", config.name))
                    .unwrap_or_else(|_| c"hmm-coherent".into());
                let f = hmm::os::mm::Memfd::create(&name, config.capacity as u64, false)?;
                (f.map(0, config.capacity, Protection::ReadWrite, true)?, Some(f))
            }
        };
        // Device memory is the parent's alone, as a real device's is: a fork
        // neither copies the pool's page table nor leaves its pages shared
        // (which would turn the engine's moves out of it into copies until
        // the child exits). Coherent memory is left to `hmm::coherent`.
        if config.kind == MemoryKind::Private {
            pool.advise(pool.range(), Advise::DontFork)?;
        }
        let pool = Arc::new(pool);
        let faults = Arc::new(Injector::default());
        let mut moves = None;
        let engine: Box<dyn DmaEngine> = match config.engine {
            EngineKind::Copy { workers } => {
                if config.prefault {
                    // Huge pages where the kernel has them: fewer TLB misses
                    // on the copy path.
                    pool.advise(pool.range(), Advise::HugePage)?;
                    pool.advise(pool.range(), Advise::PopulateWrite)?;
                }
                let e = CopyEngine::new(pool.clone(), workers.max(1), faults.clone())
                    .map_err(HmmError::Thread)?;
                Box::new(e)
            }
            EngineKind::ZeroCopy => {
                let populated = Arc::new(Populated::new(config.capacity / PAGE_SIZE));
                moves = Some(populated.clone());
                let uffd = Uffd::open(UffdOptions {
                    wanted: Features::SIGBUS,
                    required: Features::MOVE,
                    nonblocking: true,
                    allow_user_mode_only: false,
                })?;
                uffd.register(&pool, pool.range(), RegisterMode::MISSING)?;
                Box::new(MoveEngine {
                    pool: pool.clone(),
                    uffd: Arc::new(uffd),
                    faults: faults.clone(),
                    populated,
                })
            }
        };
        let core = Arc::new(Core {
            engine,
            file,
            pool: pool.clone(),
            peer: config.peer_to_peer,
            faults: faults.clone(),
            moves,
        });
        let mut mc = DeviceMemoryConfig::private(config.name, config.capacity);
        mc.kind = config.kind;
        mc.chunk_pages = 512;
        mc.pressure = config.pressure;
        let table = PageTable::new(config.duplicate_pages)?;
        let mem = hmm.register_device_memory(mc, core)?;
        let mirror = DeviceMirror::new(hmm, mem.clone(), pool, table);
        Ok(Self { hmm: hmm.handle(), mem, core: Arc::new(CoreHandle { faults }), mirror })
    }

    /// The device's memory region.
    pub fn memory(&self) -> &Arc<DeviceMemory> {
        &self.mem
    }

    /// The engine's name.
    pub fn engine_name(&self) -> &str {
        self.mem.ops().dma().name()
    }

    /// Migrates `range` into this device's memory.
    pub fn migrate_to_device(&self, range: PageRange) -> Result<MigrationReport, HmmError> {
        self.hmm.migrate_to_device(range, &self.mem, self.mem.ops().dma())
    }

    /// Migrates every page of `range` into this device, wherever it lives:
    /// system memory, or another device's memory (directly, device to
    /// device, when both take part in peer-to-peer copies; through system
    /// memory otherwise). Unlike [`migrate_to_device`](Self::migrate_to_device),
    /// which takes only pages in system memory, as the kernel's test driver does.
    pub fn migrate_here(&self, range: PageRange) -> Result<MigrationReport, HmmError> {
        self.hmm.migrate_here(range, &self.mem)
    }

    /// Migrates the pages of `range` that live on `from` into this device
    /// (see [`Hmm::migrate_device_to_device`]).
    pub fn migrate_from(
        &self,
        range: PageRange,
        from: &SoftwareDevice,
    ) -> Result<MigrationReport, HmmError> {
        self.hmm.migrate_device_to_device(range, &from.mem, &self.mem)
    }

    /// Migrates this device's pages in `range` back to system memory.
    pub fn migrate_to_system(&self, range: PageRange) -> Result<MigrationReport, HmmError> {
        self.hmm.migrate_to_system(range, &self.mem, self.mem.ops().dma())
    }

    /// Reads `range` through the device's page table into a buffer: missing
    /// entries are filled by one batched device fault (`range_fault` under the
    /// retry protocol), pages of other devices are brought back, the device's
    /// own pages are read from its memory. Works on any readable memory of the
    /// process. A read covers at most [`RangeFault::MAX_PAGES`] pages (4 GiB):
    /// a longer range fails with [`RangeFaultError::TooLarge`] before its
    /// buffer is allocated.
    pub fn read(&self, range: PageRange) -> Result<(Vec<u8>, OpCounters), HmmError> {
        RangeFault::check_size(range)?;
        self.hmm.sync_device_access();
        let mut out = vec![0u8; range.len()];
        let mut c = OpCounters::default();
        self.mirror.read_at(range.start(), &mut out, &mut c)?;
        c.cpages = range.pages() as u64;
        Ok((out, c))
    }

    /// Writes `data` at `addr` (page aligned) through the device's page table,
    /// faulting for write where entries are missing or read-only. The memory
    /// must be managed by hmm or handed to [`Hmm::mirror`].
    pub fn write(&self, addr: VirtAddr, data: &[u8]) -> Result<OpCounters, HmmError> {
        let range = PageRange::try_containing(addr.get(), data.len().max(1))?;
        self.hmm.sync_device_access();
        let mut c = OpCounters::default();
        self.mirror.write_at(addr, data, &mut c)?;
        c.cpages = range.pages() as u64;
        Ok(c)
    }

    /// What the device's page table would map for each page of `range`, without
    /// faulting anything (the test driver's snapshot). A snapshot covers at
    /// most [`RangeFault::MAX_PAGES`] pages: a longer range fails with
    /// [`RangeFaultError::TooLarge`].
    pub fn snapshot(&self, range: PageRange) -> Result<Vec<PageSnapshot>, HmmError> {
        let info = self.hmm.range_fault(&RangeFault::snapshot(range, Some(self.mem.id())))?;
        Ok(info.into_iter().map(|p| PageSnapshot::from_info(p, self.mem.id())).collect())
    }

    /// Gives the device exclusive (atomic) access to `range`, which hmm must
    /// manage: the pages move into the device's memory and its entries are
    /// marked atomic. Any CPU access (read or write) then faults, which brings
    /// the page back and revokes the device's access, and proceeds.
    pub fn make_exclusive(&self, range: PageRange) -> Result<OpCounters, HmmError> {
        let mut c = OpCounters::default();
        self.hmm.make_device_exclusive(range, &self.mem)?;
        self.mirror.ensure(range, true, &mut c)?;
        let mut pt = self.mirror.table.write();
        for vpn in vpns(range) {
            match pt.get_mut(&vpn) {
                Some(e) if e.page.is_some() => e.atomic = true,
                _ => {
                    return Err(HmmError::NotMoved {
                        op: "make_exclusive",
                        addr: VirtAddr::new(vpn * PAGE_SIZE),
                        reason: SkipReason::Busy,
                    });
                }
            }
        }
        c.cpages = range.pages() as u64;
        Ok(c)
    }

    /// Fails if the device still holds any page of `range` exclusively.
    pub fn check_exclusive(&self, range: PageRange) -> Result<OpCounters, HmmError> {
        let pt = self.mirror.table.read();
        // The table's entries in the range, not every page of it: a huge
        // range costs no more than the entries the device holds.
        let v = vpns(range);
        let mut held: Vec<usize> =
            pt.iter().filter(|(k, e)| e.atomic && v.contains(k)).map(|(k, _)| *k).collect();
        held.sort_unstable();
        match held.first() {
            Some(v) => Err(HmmError::StillExclusive {
                pages: held.len(),
                addr: VirtAddr::new(v * PAGE_SIZE),
            }),
            None => Ok(OpCounters { cpages: range.pages() as u64, faults: 0 }),
        }
    }

    /// Has `placement` decide this device's faults from now on (`None`: no
    /// placement, pages are mapped where they are). With one, a device
    /// access that misses migrates, maps or prefetches as its policy says
    /// ([`Placement::device_fault`]).
    pub fn set_placement(&self, placement: Option<Arc<Placement>>) {
        *self.mirror.placement.write().unwrap_or_else(|e| e.into_inner()) = placement;
    }

    /// The device's page-table entry for the page holding `addr`, if any.
    pub fn entry(&self, addr: VirtAddr) -> Option<DeviceEntry> {
        self.mirror.table.read().get(&(addr.get() / PAGE_SIZE)).copied()
    }

    /// Device faults taken and invalidations received since the device was made.
    pub fn mirror_stats(&self) -> MirrorStats {
        MirrorStats {
            faults: self.mirror.faults.load(Ordering::Relaxed),
            invalidations: self.mirror.table.invalidations.load(Ordering::Relaxed),
            entries: self.mirror.table.read().len(),
            duplicates: self.mirror.table.dups.in_use(),
        }
    }

    /// Runs a job "on the device": `workers` threads of the device each call
    /// `job` with a [`DeviceContext`], through which alone they reach the
    /// address space, by way of the device's page table (faulting entries in as
    /// needed, one batched fault per miss). A job may follow pointers stored in
    /// memory: read a word, then read at the address it holds. `arg` is handed to
    /// every worker ([`DeviceContext::start_addr`]). Returns each
    /// worker's result, in worker order, and the counters of all the accesses.
    ///
    /// ```
    /// # fn main() -> Result<(), hmm::HmmError> {
    /// use hmm::{Hmm, PAGE_SIZE, VirtAddr};
    /// use hmm_swdev::{SoftwareDevice, SoftwareDeviceConfig};
    /// let hmm = Hmm::new()?;
    /// let dev = SoftwareDevice::new(&hmm, SoftwareDeviceConfig::new("gpu0", 1 << 20))?;
    /// let r = hmm.alloc(4 * PAGE_SIZE)?;
    /// // A two-node list: node 0 at offset 0 points to node 1 at offset 64.
    /// let node1 = r.addr().get() as u64 + 64;
    /// r.write(0, &[node1.to_ne_bytes(), 5u64.to_ne_bytes()].concat())?;
    /// r.write(64, &[0u64.to_ne_bytes(), 7u64.to_ne_bytes()].concat())?;
    /// dev.migrate_to_device(r.range())?;
    /// let (sums, counters) = dev.run(1, r.addr(), |ctx| {
    ///     let (mut at, mut sum) = (ctx.start_addr(), 0);
    ///     while at != 0 {
    ///         sum += ctx.read_u64(VirtAddr::new(at as usize + 8))?;
    ///         at = ctx.read_u64(VirtAddr::new(at as usize))?;
    ///     }
    ///     Ok(sum)
    /// })?;
    /// assert_eq!(sums, [12]);
    /// assert_eq!(counters.faults, 1, "one device fault mapped the page");
    /// # Ok(()) }
    /// ```
    pub fn run<T: Send>(
        &self,
        workers: usize,
        arg: VirtAddr,
        job: impl Fn(&mut DeviceContext<'_>) -> Result<T, HmmError> + Sync,
    ) -> Result<(Vec<T>, OpCounters), HmmError> {
        let workers = workers.max(1);
        self.hmm.sync_device_access();
        let job = &job;
        let mirror = &*self.mirror;
        let results: Vec<(Result<T, HmmError>, OpCounters)> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..workers)
                .map(|w| {
                    std::thread::Builder::new()
                        .name(format!("hmm-{}-job{w}", self.mem.id()))
                        .spawn_scoped(s, move || {
                            let mut ctx = DeviceContext {
                                mirror,
                                worker: w,
                                workers,
                                arg,
                                counters: OpCounters::default(),
                            };
                            let r = job(&mut ctx);
                            (r, ctx.counters)
                        })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| match h {
                    Ok(h) => h.join().unwrap_or_else(|_| {
                        (
                            Err(HmmError::Job("a device worker panicked".into())),
                            OpCounters::default(),
                        )
                    }),
                    Err(e) => (Err(HmmError::Thread(e)), OpCounters::default()),
                })
                .collect()
        });
        let mut total = OpCounters::default();
        let mut out = Vec::with_capacity(workers);
        for (r, c) in results {
            total.cpages += c.cpages;
            total.faults += c.faults;
            out.push(r?);
        }
        Ok((out, total))
    }

    /// Evicts every page of this device back to system memory.
    pub fn release(&self) -> Result<(), HmmError> {
        self.hmm.evict_all(&self.mem)
    }

    // ---- fault injection ----------------------------------------------------------

    /// Makes the next device-memory allocation fail once.
    pub fn fail_next_alloc(&self) {
        self.mem.fail_next_allocs(1);
    }

    /// Makes the next `n` page copies towards system memory fail for lack of
    /// memory (the fault service then retries).
    pub fn fail_next_copies_to_system(&self, n: u32) {
        self.core.faults.to_system.store(n, Ordering::Release);
    }

    /// Makes copies into this device's memory fail with a DMA error: after
    /// `after` more succeed, the next `n` fail. A migration that meets them
    /// leaves those pages where they were, reported
    /// [`SkipReason::CopyFailed`], and moves the rest. With the copy
    /// engine's several workers, which pages of a batch fail is not fixed;
    /// how many is.
    pub fn fail_copies_to_device(&self, after: u32, n: u32) {
        let f = &self.core.faults;
        let mut g = f.to_device.lock().unwrap_or_else(|e| e.into_inner());
        *g = (after, n);
        f.to_device_armed.store(n > 0, Ordering::Release);
    }

    /// Holds every submission to this device's engine back until the
    /// returned guard is dropped, as a hung DMA engine would: migrations to
    /// and from the device wait in the engine, and so does the fault service
    /// when a CPU touch needs one of its pages back (see [`hmm::fault`]).
    pub fn stall_engine(&self) -> EngineStall {
        self.core.faults.set_stalled(true);
        EngineStall { faults: self.core.faults.clone() }
    }

    /// Marks the device failed: its pages are poisoned, and its engine fails
    /// every later copy (copies of a migration under way included: the pages
    /// of a migration towards the device stay in system memory). Returns how
    /// many pages were poisoned.
    pub fn fail(&self) -> usize {
        self.core.faults.dead.store(true, Ordering::Release);
        self.hmm.device_failed(&self.mem)
    }

    /// Counters of the device's memory.
    pub fn stats(&self) -> DeviceStats {
        self.mem.stats()
    }
}

impl Drop for SoftwareDevice {
    fn drop(&mut self) {
        if let Err(e) = self.hmm.unregister_device_memory(&self.mem) {
            tracing::error!(error = %e, "releasing a software device");
        }
    }
}

/// Takes one injected failure, if any is pending.
fn take_injected(counter: &AtomicU32) -> bool {
    counter.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| v.checked_sub(1)).is_ok()
}

/// The failures armed on a software device's engine (fault injection), which
/// both engines consult before each copy.
#[derive(Default)]
struct Injector {
    /// Copies towards system memory still to fail for lack of memory.
    to_system: AtomicU32,
    /// Copies into device memory to let through, then to fail.
    to_device: Mutex<(u32, u32)>,
    /// Whether `to_device` holds failures to come: copies look at this
    /// first, so that an engine with none armed takes no lock per page.
    to_device_armed: AtomicBool,
    /// The device failed: every copy fails.
    dead: AtomicBool,
    /// While set, the engine holds copies back.
    stalled: Mutex<bool>,
    unstalled: Condvar,
    /// Submissions held back now.
    held: AtomicU32,
}

impl Injector {
    /// What the next copy into device memory meets: `Some` error to fail it with.
    fn to_device_error(&self) -> Option<DmaError> {
        if self.is_dead() {
            return Some(DmaError::DeviceFailed);
        }
        if !self.to_device_armed.load(Ordering::Acquire) {
            return None;
        }
        let mut g = self.to_device.lock().unwrap_or_else(|e| e.into_inner());
        match *g {
            (0, 0) => None,
            (0, n) => {
                g.1 = n - 1;
                if n == 1 {
                    self.to_device_armed.store(false, Ordering::Release);
                }
                Some(DmaError::Failed("injected DMA error".into()))
            }
            (after, n) => {
                *g = (after - 1, n);
                None
            }
        }
    }

    fn is_dead(&self) -> bool {
        self.dead.load(Ordering::Acquire)
    }

    /// Whether a failure is injected or the engine is stalled: a copy must
    /// then go through the engine. Takes no lock a waiter could hold (a
    /// stall's lock that is busy counts as a stall).
    fn armed(&self) -> bool {
        self.is_dead()
            || self.to_system.load(Ordering::Acquire) > 0
            || self.stalled.try_lock().map_or(true, |g| *g)
    }

    fn set_stalled(&self, on: bool) {
        *self.stalled.lock().unwrap_or_else(|e| e.into_inner()) = on;
        if !on {
            self.unstalled.notify_all();
        }
    }

    /// Waits while the engine is stalled.
    fn pass(&self) {
        let g = self.stalled.lock().unwrap_or_else(|e| e.into_inner());
        if !*g {
            return;
        }
        self.held.fetch_add(1, Ordering::AcqRel);
        drop(self.unstalled.wait_while(g, |s| *s).unwrap_or_else(|e| e.into_inner()));
        self.held.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Holds a software device's engine stalled while it lives
/// ([`SoftwareDevice::stall_engine`]).
#[must_use = "the engine runs again as soon as the guard is dropped"]
pub struct EngineStall {
    faults: Arc<Injector>,
}

impl EngineStall {
    /// How many submissions (each a migration's copies) the stall holds
    /// back now.
    pub fn held(&self) -> u32 {
        self.faults.held.load(Ordering::Acquire)
    }
}

impl std::fmt::Debug for EngineStall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineStall").finish_non_exhaustive()
    }
}

impl Drop for EngineStall {
    fn drop(&mut self) {
        self.faults.set_stalled(false);
    }
}

// ---- the device's page table ----------------------------------------------------------

/// One entry of a software device's page table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeviceEntry {
    /// The device's own page, or `None` for the system page at this address
    /// (reached through the kernel, see [`hmm::os::vm`]).
    pub page: Option<DevicePage>,
    /// The device may write.
    pub write: bool,
    /// The device holds the page exclusively (any CPU access revokes it).
    pub atomic: bool,
    /// A copy of the system page the device keeps (read duplication): the
    /// slot of its duplicate cache. The entry is read-only; any write to the
    /// page drops it first.
    pub dup: Option<u32>,
}

/// How a page looks from a device (the test driver's snapshot states).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageSnapshot {
    /// What the device may do.
    pub access: SnapshotAccess,
    /// The shared zero page.
    pub zero: bool,
    /// Mapping order (0: 4 KiB, 9: 2 MiB, 18: 1 GiB).
    pub order: u8,
    /// The asking device's own page.
    pub device_local: bool,
    /// A page of coherent device memory (the asking device's when
    /// `device_local`, another device's otherwise).
    pub coherent: bool,
}

/// The access part of a [`PageSnapshot`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotAccess {
    /// Not mapped, no access, or lost.
    Error,
    /// Mapped for the CPU but absent (never touched, swapped, or on another device).
    None,
    /// Readable.
    Read,
    /// Readable and writable.
    Write,
}

impl PageSnapshot {
    fn from_info(p: PageInfo, owner: DeviceId) -> Self {
        let access = if p.error {
            SnapshotAccess::Error
        } else if !p.valid {
            SnapshotAccess::None
        } else if p.write {
            SnapshotAccess::Write
        } else {
            SnapshotAccess::Read
        };
        let device_local = p.valid && p.device.is_some_and(|d| d.dev == owner);
        Self { access, zero: p.zero, order: p.order, device_local, coherent: p.coherent }
    }
}

/// Counters of a device's mirror.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MirrorStats {
    /// Device faults taken (`range_fault` calls that filled entries).
    pub faults: u64,
    /// Invalidation callbacks received. An `munmap`, `mremap` or `madvise`
    /// of mirrored memory reaches the mirror through an event the fault
    /// service handles after the call has returned: its invalidation is
    /// counted by the time a device access (a read, write, job or device
    /// fault) that begins after the call has begun, not necessarily when the
    /// call returns.
    pub invalidations: u64,
    /// Entries in the page table now.
    pub entries: usize,
    /// Copies of system pages the device keeps now (read duplication).
    pub duplicates: usize,
}

/// The virtual page numbers of `range`.
fn vpns(range: PageRange) -> std::ops::Range<usize> {
    range.start().get() / PAGE_SIZE..range.end().get() / PAGE_SIZE
}

/// A device page table: virtual page number to entry.
///
/// The lock is the one the invalidation callback takes: it is never held
/// across `range_fault` or an access that can fault into the fault service
/// (see [`hmm::mirror`]); only copies to and from the device's own memory,
/// which cannot fault, run under it.
///
/// A hash map, whose removals never free memory: the invalidation callback
/// may run in a `SIGBUS` handler (`FaultMode::InThread`), where it must not.
/// An entry dropped gives its duplicate's slot back to a free list with
/// room for every slot, which never allocates either.
struct PageTable {
    map: std::sync::RwLock<std::collections::HashMap<usize, DeviceEntry>>,
    invalidations: std::sync::atomic::AtomicU64,
    dups: Dups,
}

/// The device's duplicate cache: slots of a page each, for copies of
/// read-mostly system pages (a real device would keep them in its memory;
/// the software device keeps them apart from the region hmm allocates from).
struct Dups {
    pool: Mapping,
    free: std::sync::Mutex<Vec<u32>>,
}

impl Dups {
    fn new(slots: usize) -> Result<Self, HmmError> {
        let pool = Mapping::anonymous(slots.max(1) * PAGE_SIZE, Protection::ReadWrite)?;
        let mut free = Vec::with_capacity(slots);
        free.extend((0..slots as u32).rev());
        Ok(Self { pool, free: std::sync::Mutex::new(free) })
    }

    fn take(&self) -> Option<u32> {
        self.free.lock().unwrap_or_else(|e| e.into_inner()).pop()
    }

    /// Gives a slot back; allocates nothing (the list has room for all).
    fn give_back(&self, slot: u32) {
        self.free.lock().unwrap_or_else(|e| e.into_inner()).push(slot);
    }

    fn in_use(&self) -> usize {
        let free = self.free.lock().unwrap_or_else(|e| e.into_inner());
        free.capacity() - free.len()
    }
}

type PtRead<'a> = std::sync::RwLockReadGuard<'a, std::collections::HashMap<usize, DeviceEntry>>;
type PtWrite<'a> = std::sync::RwLockWriteGuard<'a, std::collections::HashMap<usize, DeviceEntry>>;

impl PageTable {
    fn new(dup_slots: usize) -> Result<Self, HmmError> {
        Ok(Self {
            map: Default::default(),
            invalidations: Default::default(),
            dups: Dups::new(dup_slots)?,
        })
    }

    /// Gives back what a dropped (or replaced) entry held.
    fn release(&self, e: &DeviceEntry) {
        if let Some(slot) = e.dup {
            self.dups.give_back(slot);
        }
    }

    fn read(&self) -> PtRead<'_> {
        self.map.read().unwrap_or_else(|e| e.into_inner())
    }
    fn write(&self) -> PtWrite<'_> {
        self.map.write().unwrap_or_else(|e| e.into_inner())
    }
    /// Drops the entries of `range`, allocating and freeing nothing.
    fn clear(&self, range: PageRange) {
        let mut pt = self.write();
        let v = vpns(range);
        if v.len() > pt.len() {
            pt.retain(|k, e| {
                let gone = v.contains(k);
                if gone {
                    self.release(e);
                }
                !gone
            });
        } else {
            v.for_each(|k| {
                if let Some(e) = pt.remove(&k) {
                    self.release(&e);
                }
            });
        }
        self.invalidations.fetch_add(1, Ordering::Relaxed);
    }
}

/// The bytes from `at` (at most `left`) that a run of entries mapping system
/// pages covers (writable ones, for a write), starting with the entry of `at`.
fn system_run(pt: &PtRead<'_>, at: usize, left: usize, write: bool) -> usize {
    let mut len = (PAGE_SIZE - at % PAGE_SIZE).min(left);
    let mut next = at / PAGE_SIZE + 1;
    while len < left
        && pt.get(&next).is_some_and(|e| e.page.is_none() && e.dup.is_none() && (e.write || !write))
    {
        len += PAGE_SIZE.min(left - len);
        next += 1;
    }
    len
}

/// The error of an access whose entries keep going stale under it.
fn keeps_changing(at: usize) -> RangeFaultError {
    RangeFaultError::Fault {
        addr: VirtAddr::new(at),
        reason: "the page keeps changing under the device".into(),
    }
}

/// How many times an access re-faults entries invalidated under it before
/// giving up (each round is a full device fault; only a storm of concurrent
/// invalidations gets this far).
const MAX_REFAULTS: usize = 1000;

/// The mirror side of a software device: its page table, the notifier that
/// keeps it true, and the accesses through it.
pub(crate) struct DeviceMirror {
    hmm: HmmHandle,
    id: DeviceId,
    /// The device's memory: accesses to its pages stamp them (recency).
    mem: Arc<DeviceMemory>,
    pool: Arc<Mapping>,
    table: Arc<PageTable>,
    notifier: IntervalNotifier,
    faults: std::sync::atomic::AtomicU64,
    /// The placement that decides this device's faults, if any.
    placement: std::sync::RwLock<Option<Arc<Placement>>>,
}

impl DeviceMirror {
    fn new(hmm: &Hmm, mem: Arc<DeviceMemory>, pool: Arc<Mapping>, table: PageTable) -> Arc<Self> {
        let id = mem.id();
        let table = Arc::new(table);
        let t = table.clone();
        // One notifier over the whole address space, as the kernel's test
        // driver has: every invalidation reaches the page table. Its callback
        // keeps a `SIGBUS` handler's rules (see `PageTable`).
        let notifier = hmm
            .insert_notifier_in_thread(RangeFault::address_space(), move |inv| t.clear(inv.range));
        Arc::new(Self {
            hmm: hmm.handle(),
            id,
            mem,
            pool,
            table,
            notifier,
            faults: Default::default(),
            placement: Default::default(),
        })
    }

    /// Fills the entries of `range` that are missing (or read-only, for a
    /// write) with one batched device fault, under the retry protocol: one per
    /// [`RangeFault::MAX_PAGES`] pages, for an access longer than a fault may
    /// cover.
    fn ensure(&self, range: PageRange, write: bool, c: &mut OpCounters) -> Result<(), HmmError> {
        for _ in 0..MAX_REFAULTS {
            let first_missing = {
                let pt = self.table.read();
                vpns(range).find(|v| pt.get(v).is_none_or(|e| write && !e.write))
            };
            let Some(first) = first_missing else { return Ok(()) };
            let part = PageRange::new(
                VirtAddr::new(first * PAGE_SIZE),
                (range.end().get() - first * PAGE_SIZE).min(RangeFault::MAX_PAGES * PAGE_SIZE),
            )?;
            // The placement first: pages it migrates here are then mapped
            // as this device's own.
            let placement = self.placement.read().unwrap_or_else(|e| e.into_inner()).clone();
            let placed = placement.is_some();
            let duplicate = match placement {
                Some(p) => p.device_fault(&self.mem, part, write).duplicate,
                None => Vec::new(),
            };
            let seq = self.notifier.read_begin();
            let info = self.hmm.range_fault(&RangeFault::fault(part, write, Some(self.id)))?;
            let around = match write {
                false => self.look_around(part),
                true => None,
            };
            // Copies of the pages to duplicate that are system pages now,
            // each made after its page is write-protected: a write after
            // that invalidates, and the retry below catches it.
            let dups: Vec<(usize, u32)> = vpns(part)
                .zip(info.iter())
                .filter(|(v, p)| {
                    p.valid
                        && p.device.is_none()
                        && duplicate.binary_search(&VirtAddr::new(v * PAGE_SIZE)).is_ok()
                })
                .filter_map(|(v, _)| self.duplicate(v).map(|slot| (v, slot)))
                .collect();
            let mut pt = self.table.write();
            if self.notifier.read_retry(seq) {
                for (_, slot) in dups {
                    self.table.dups.give_back(slot);
                }
                continue;
            }
            let entry = |p: PageInfo| {
                let page = p.device.filter(|d| d.dev == self.id);
                p.valid.then_some(DeviceEntry { page, write: p.write, atomic: false, dup: None })
            };
            for (vpn, p) in vpns(part).zip(info) {
                if let Some(mut e) = entry(p) {
                    if let Ok(k) = dups.binary_search_by_key(&vpn, |(v, _)| *v) {
                        e.dup = Some(dups[k].1);
                        e.write = false;
                    }
                    if let Some(old) = pt.insert(vpn, e) {
                        self.table.release(&old);
                    }
                }
            }
            // Entries already there (written since, say) stay as they are.
            // With a placement, only the device's own pages: a page mapped
            // where it is would never fault, and the placement never decide.
            if let Some((r, info)) = &around {
                for (vpn, p) in vpns(*r).zip(info.iter().copied()) {
                    if placed && p.device.is_none_or(|d| d.dev != self.id) {
                        continue;
                    }
                    if let Some(e) = entry(p) {
                        pt.entry(vpn).or_insert(e);
                    }
                }
            }
            drop(pt);
            self.faults.fetch_add(1, Ordering::Relaxed);
            c.faults += 1;
        }
        Err(RangeFaultError::Busy { range, timeout: RangeFault::DEFAULT_TIMEOUT }.into())
    }

    /// Copies the system page `vpn` into a slot of the duplicate cache, after
    /// write-protecting it; `None` (the page is then mapped where it is) when
    /// no slot is free or the page cannot be read.
    fn duplicate(&self, vpn: usize) -> Option<u32> {
        let slot = self.table.dups.take()?;
        let page = PageRange::from_pages(VirtAddr::new(vpn * PAGE_SIZE), 1).ok()?;
        self.hmm.track_writes(page);
        let mut buf = vec![0u8; PAGE_SIZE];
        let copied = hmm::os::vm::read_memory(page.start(), &mut buf).unwrap_or(0) == PAGE_SIZE
            && self.table.dups.pool.write(slot as usize * PAGE_SIZE, &buf).is_ok();
        if !copied {
            self.table.dups.give_back(slot);
            return None;
        }
        Some(slot)
    }

    /// Device fault-around for a read fault of `part`: what the rest of its
    /// 2 MiB block holds, as a snapshot (nothing faulted, nothing waited
    /// for: a page mid-migration, or any error, leaves the block out), for
    /// the device to map what is already there. A stream then takes one
    /// device fault a block instead of one a read. Only inside memory hmm
    /// manages or mirrors: elsewhere hmm sees no unmap that would take the
    /// entries away again.
    fn look_around(&self, part: PageRange) -> Option<(PageRange, Vec<PageInfo>)> {
        let end = part.end().get();
        let tracked = self.hmm.write_target(part)?.range();
        let block_end =
            ((end + HUGE_PAGE_SIZE - 1) & !(HUGE_PAGE_SIZE - 1)).min(tracked.end().get());
        let rest = PageRange::new(part.end(), block_end.checked_sub(end)?)
            .ok()
            .filter(|r| r.pages() > 0)?;
        let look = RangeFault {
            timeout: std::time::Duration::ZERO,
            ..RangeFault::snapshot(rest, Some(self.id))
        };
        self.hmm.range_fault(&look).ok().map(|info| (rest, info))
    }

    /// Drops the entry of the page holding `at`, found stale by an access, so
    /// that the next look takes a device fault; gives up with `give_up` after
    /// [`MAX_REFAULTS`] of them in one access.
    fn refault(
        &self,
        refaults: &mut usize,
        at: usize,
        give_up: impl FnOnce() -> RangeFaultError,
    ) -> Result<(), HmmError> {
        if let Some(e) = self.table.write().remove(&(at / PAGE_SIZE)) {
            self.table.release(&e);
        }
        *refaults += 1;
        if *refaults > MAX_REFAULTS {
            return Err(give_up().into());
        }
        Ok(())
    }

    /// Copies `buf.len()` bytes at `addr` (any alignment) into `buf`.
    pub(crate) fn read_at(
        &self,
        addr: VirtAddr,
        buf: &mut [u8],
        c: &mut OpCounters,
    ) -> Result<(), HmmError> {
        if buf.is_empty() {
            return Ok(());
        }
        // Checked once: every span below lies inside this one.
        PageRange::try_containing(addr.get(), buf.len())?;
        let mut done = 0;
        let mut refaults = 0;
        while done < buf.len() {
            let at = addr.get() + done;
            let vpn = at / PAGE_SIZE;
            let in_page = (PAGE_SIZE - at % PAGE_SIZE).min(buf.len() - done);
            let pt = self.table.read();
            let Some(e) = pt.get(&vpn).copied() else {
                drop(pt);
                self.ensure(PageRange::try_containing(at, buf.len() - done)?, false, c)?;
                continue;
            };
            if let Some(slot) = e.dup {
                // The device's copy: read under the table lock, so the slot
                // is not given back meanwhile.
                let off = slot as usize * PAGE_SIZE + at % PAGE_SIZE;
                self.table.dups.pool.read(off, &mut buf[done..done + in_page])?;
                done += in_page;
                continue;
            }
            if let Some(p) = e.page {
                // The device's own memory: read under the table lock, so the
                // page cannot be freed meanwhile.
                let off = p.index as usize * PAGE_SIZE + at % PAGE_SIZE;
                self.pool.read(off, &mut buf[done..done + in_page])?;
                self.mem.touch(p);
                done += in_page;
                continue;
            }
            // A run of system entries, read through the kernel without the lock.
            let len = system_run(&pt, at, buf.len() - done, false);
            drop(pt);
            let n = hmm::os::vm::read_memory(VirtAddr::new(at), &mut buf[done..done + len])
                .unwrap_or(0);
            done += n;
            if n < len {
                // The page changed under the entry (unmapped, protected): its
                // entry is stale. Fault again; the fault reports the error.
                let at = addr.get() + done;
                self.refault(&mut refaults, at, || keeps_changing(at))?;
            }
        }
        Ok(())
    }

    /// Copies `data` to `addr` (any alignment) through the page table.
    pub(crate) fn write_at(
        &self,
        addr: VirtAddr,
        data: &[u8],
        c: &mut OpCounters,
    ) -> Result<(), HmmError> {
        if data.is_empty() {
            return Ok(());
        }
        let range = PageRange::try_containing(addr.get(), data.len())?;
        let Some(target) = self.hmm.write_target(range) else {
            return Err(HmmError::NotWritable(range));
        };
        // Every page is faulted in for writing before a byte is written: a
        // write that reaches a page it may not write (unmapped, lost,
        // read-only) fails whole, leaving the pages before it as they were.
        // (An address-space change while it writes can still cut it short,
        // as it would a CPU's copy.)
        self.ensure(range, true, c)?;
        let mut done = 0;
        let mut refaults = 0;
        while done < data.len() {
            let at = addr.get() + done;
            let vpn = at / PAGE_SIZE;
            let in_page = (PAGE_SIZE - at % PAGE_SIZE).min(data.len() - done);
            let pt = self.table.read();
            let Some(e) = pt.get(&vpn).copied().filter(|e| e.write) else {
                drop(pt);
                self.ensure(PageRange::try_containing(at, data.len() - done)?, true, c)?;
                continue;
            };
            if let Some(p) = e.page {
                // The device's own page: no kernel check on this path, so the
                // permission is re-validated against the mapping as it is now
                // (an mprotect hmm did not see must not let the device write).
                if !self.writable_now(PageRange::try_containing(at, in_page)?) {
                    drop(pt);
                    self.refault(&mut refaults, at, || RangeFaultError::PermissionDenied {
                        addr: VirtAddr::new(at),
                    })?;
                    continue;
                }
                let off = p.index as usize * PAGE_SIZE + at % PAGE_SIZE;
                self.pool.write(off, &data[done..done + in_page])?;
                self.mem.touch(p);
                done += in_page;
                continue;
            }
            let len = system_run(&pt, at, data.len() - done, true);
            drop(pt);
            match target.write_checked(VirtAddr::new(at), &data[done..done + len]) {
                Ok(()) => done += len,
                Err(hmm::os::vm::CheckedWriteError::Refused { done: n, .. }) => {
                    done += n;
                    let at = addr.get() + done;
                    self.refault(&mut refaults, at, || keeps_changing(at))?;
                }
                Err(hmm::os::vm::CheckedWriteError::Range(e)) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Whether the mapping allows writing all of `range` now.
    fn writable_now(&self, range: PageRange) -> bool {
        self.hmm.allows_write(range)
    }
}

// ---- jobs ------------------------------------------------------------------------------

/// What a job running on a device sees: the address space through the
/// device's page table (see [`SoftwareDevice::run`]).
pub struct DeviceContext<'a> {
    mirror: &'a DeviceMirror,
    worker: usize,
    workers: usize,
    arg: VirtAddr,
    counters: OpCounters,
}

impl std::fmt::Debug for DeviceContext<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceContext")
            .field("worker", &self.worker)
            .field("workers", &self.workers)
            .finish_non_exhaustive()
    }
}

impl DeviceContext<'_> {
    /// This worker's index, `0..workers()`.
    pub fn worker(&self) -> usize {
        self.worker
    }

    /// How many workers run the job.
    pub fn workers(&self) -> usize {
        self.workers
    }

    /// The address the job was started with, as a word (0 for none).
    pub fn start_addr(&self) -> u64 {
        self.arg.get() as u64
    }

    /// Copies `buf.len()` bytes at `addr` into `buf`.
    pub fn read(&mut self, addr: VirtAddr, buf: &mut [u8]) -> Result<(), HmmError> {
        self.mirror.read_at(addr, buf, &mut self.counters)?;
        self.counters.cpages +=
            PageRange::try_containing(addr.get(), buf.len().max(1))?.pages() as u64;
        Ok(())
    }

    /// Copies `data` to `addr` (memory hmm manages or mirrors).
    pub fn write(&mut self, addr: VirtAddr, data: &[u8]) -> Result<(), HmmError> {
        self.mirror.write_at(addr, data, &mut self.counters)?;
        self.counters.cpages +=
            PageRange::try_containing(addr.get(), data.len().max(1))?.pages() as u64;
        Ok(())
    }

    /// Reads the native-endian word at `addr` (a pointer, a count, a value).
    pub fn read_u64(&mut self, addr: VirtAddr) -> Result<u64, HmmError> {
        let mut w = [0u8; 8];
        self.read(addr, &mut w)?;
        Ok(u64::from_ne_bytes(w))
    }

    /// Writes the native-endian word `value` at `addr`.
    pub fn write_u64(&mut self, addr: VirtAddr, value: u64) -> Result<(), HmmError> {
        self.write(addr, &value.to_ne_bytes())
    }

    /// The counters of this worker's accesses so far.
    pub fn counters(&self) -> OpCounters {
        self.counters
    }
}

// ---- the copying engine ----------------------------------------------------------------

/// Worker threads that copy pages between staging, device memory and their
/// addresses ([`Workers`]: a job of a few pages is copied on the thread
/// that submits it).
pub(crate) struct CopyEngine {
    workers: Workers,
    faults: Arc<Injector>,
}

impl CopyEngine {
    fn new(pool: Arc<Mapping>, workers: usize, faults: Arc<Injector>) -> std::io::Result<Self> {
        let f = faults.clone();
        let workers = Workers::new(workers, "hmm-dma", move |part| match part {
            JobPart::ToDevice(ops) => to_device_copies(&pool, ops, &f),
            JobPart::ToSystem { copies, sink } => {
                to_system_copies(&pool, sink, copies, &f, false).0
            }
        })?;
        Ok(Self { workers, faults })
    }
}

/// Copies each of `ops` into device memory, in order.
fn to_device_copies(
    pool: &Mapping,
    ops: &[ToDevice],
    faults: &Injector,
) -> Vec<Result<(), DmaError>> {
    ops.iter().map(|op| to_device_copy(pool, op, faults)).collect()
}

fn to_device_copy(pool: &Mapping, op: &ToDevice, faults: &Injector) -> Result<(), DmaError> {
    if let Some(e) = faults.to_device_error() {
        return Err(e);
    }
    let off = op.dst.index as usize * PAGE_SIZE;
    let r = match op.src.bytes() {
        None => pool.fill(off, PAGE_SIZE, 0),
        Some((src, offset)) => pool.copy_shared_from(off, src, offset, PAGE_SIZE),
    };
    r.map_err(|e| DmaError::Failed(e.to_string()))
}

/// Runs of consecutive copies whose destinations and device pages both follow on.
fn runs(copies: &[ToSystem]) -> Vec<(usize, usize)> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < copies.len() {
        let mut j = i + 1;
        while j < copies.len()
            && copies[j].dst.get() == copies[j - 1].dst.get() + PAGE_SIZE
            && copies[j].src.index == copies[j - 1].src.index + 1
        {
            j += 1;
        }
        out.push((i, j - i));
        i = j;
    }
    out
}

/// Runs shorter than this come back by copy even on the zero-copy engine: a
/// move must clear the device page's entry, which costs a TLB shootdown (an
/// inter-processor interrupt, dear in a virtual machine) that a copy into the
/// empty destination does not, and for a few pages that outweighs the copy.
const MIN_MOVE_RUN: usize = 8;

/// Installs each copy at its address: by `UFFDIO_MOVE` for runs of at least
/// [`MIN_MOVE_RUN`] pages when `zero_copy`, by `UFFDIO_COPY` otherwise (and
/// wherever the kernel refuses a move). Returns each copy's result and whether
/// the device page was moved out (left empty) rather than copied.
fn to_system_copies(
    pool: &Mapping,
    sink: &hmm::dma::SystemSink,
    copies: &[ToSystem],
    faults: &Injector,
    zero_copy: bool,
) -> (Vec<Result<(), DmaError>>, Vec<bool>) {
    let mut out = Vec::with_capacity(copies.len());
    let mut moved = Vec::with_capacity(copies.len());
    if faults.is_dead() {
        out.resize(copies.len(), Err(DmaError::DeviceFailed));
        moved.resize(copies.len(), false);
        return (out, moved);
    }
    for (i, n) in runs(copies) {
        let injected = (0..n).filter(|_| take_injected(&faults.to_system)).count();
        if injected > 0 {
            out.extend((0..n).map(|_| Err(DmaError::NoMemory)));
            moved.extend((0..n).map(|_| false));
            continue;
        }
        let off = copies[i].src.index as usize * PAGE_SIZE;
        if !(zero_copy && sink.moves() && n >= MIN_MOVE_RUN) {
            out.extend(sink.install_copy(copies[i].dst, pool, off, n));
            moved.extend((0..n).map(|_| false));
            continue;
        }
        for (k, r) in sink.install_move(copies[i].dst, pool, off, n).into_iter().enumerate() {
            // Moves the kernel refused (a read-only range, say) are copied.
            let (r, m) = match r {
                Err(DmaError::Failed(_)) => {
                    let one = sink.install_copy(copies[i + k].dst, pool, off + k * PAGE_SIZE, 1);
                    (
                        one.into_iter().next().unwrap_or(Err(DmaError::Failed("no result".into()))),
                        false,
                    )
                }
                r => {
                    let ok = r.is_ok();
                    (r, ok)
                }
            };
            out.push(r);
            moved.push(m);
        }
    }
    (out, moved)
}

impl DmaEngine for CopyEngine {
    fn name(&self) -> &str {
        "copy"
    }

    fn reads_peers(&self) -> bool {
        true
    }

    fn submit(&self, job: DmaJob) -> DmaFence {
        self.faults.pass();
        self.workers.submit(job)
    }
}

// ---- the zero-copy engine --------------------------------------------------------------

/// Moves pages with `UFFDIO_MOVE`; copies only what the kernel will not move.
pub(crate) struct MoveEngine {
    pool: Arc<Mapping>,
    uffd: Arc<Uffd>,
    faults: Arc<Injector>,
    populated: Arc<Populated>,
}

impl MoveEngine {
    /// Moves staged pages into device memory, one ioctl per run of pages whose
    /// staging offsets and device pages both follow on; zero pages get the
    /// zero page; a run the kernel will not move is copied page by page.
    fn to_device(&self, ops: &[ToDevice]) -> Vec<Result<(), DmaError>> {
        // Injected failures first: a failed copy leaves its source untouched.
        let mut failed: Vec<Option<DmaError>> =
            ops.iter().map(|_| self.faults.to_device_error()).collect();
        let mut out = Vec::with_capacity(ops.len());
        let mut i = 0;
        while i < ops.len() {
            if let Some(e) = failed[i].take() {
                out.push(Err(e));
                i += 1;
                continue;
            }
            let Some((staging, offset)) = ops[i].src.bytes() else {
                let slot = slot_range(&self.pool, ops[i].dst);
                out.push(self.uffd.zeropage(slot, true).map(drop).map_err(DmaError::from));
                i += 1;
                continue;
            };
            let mut j = i + 1;
            while j < ops.len()
                && failed[j].is_none()
                && ops[j].dst.index == ops[j - 1].dst.index + 1
                && matches!(ops[j].src.bytes(), Some((s, o))
                    if Arc::ptr_eq(s, staging) && o == offset + (j - i) * PAGE_SIZE)
            {
                j += 1;
            }
            let n = j - i;
            let slots = self
                .pool
                .subrange(ops[i].dst.index as usize * PAGE_SIZE, n * PAGE_SIZE)
                .expect("device pages inside the pool");
            let src = staging.subrange(offset, n * PAGE_SIZE).expect("inside staging");
            match self.uffd.move_pages_all(slots, staging, src, true, false) {
                Ok(_) => out.extend((0..n).map(|_| Ok(()))),
                Err(e) => {
                    let done = e.done / PAGE_SIZE;
                    out.extend((0..done).map(|_| Ok(())));
                    for (k, op) in ops.iter().enumerate().take(j).skip(i + done) {
                        let slot = slot_range(&self.pool, op.dst);
                        let one = staging
                            .subrange(offset + (k - i) * PAGE_SIZE, PAGE_SIZE)
                            .expect("inside");
                        let r = match self.uffd.move_pages(slot, staging, one, true, false) {
                            Err(e)
                                if matches!(
                                    e.kind,
                                    FillErrorKind::Invalid | FillErrorKind::Busy
                                ) =>
                            {
                                self.uffd.copy_from(slot, staging, one, true)
                            }
                            r => r,
                        };
                        out.push(r.map(drop).map_err(DmaError::from));
                    }
                }
            }
            i = j;
        }
        out
    }
}

impl MoveEngine {
    /// Empties the destination slots that still hold a page (freed after a
    /// copy back), so moves and zero pages can land there: one `madvise` per
    /// run of such slots.
    fn empty_slots(&self, ops: &[ToDevice]) {
        let mut full: Vec<u32> =
            ops.iter().map(|op| op.dst.index).filter(|&i| self.populated.take(i)).collect();
        full.sort_unstable();
        let mut i = 0;
        while i < full.len() {
            let mut j = i + 1;
            while j < full.len() && full[j] == full[j - 1] + 1 {
                j += 1;
            }
            let run = self
                .pool
                .subrange(full[i] as usize * PAGE_SIZE, (j - i) * PAGE_SIZE)
                .expect("device pages inside the pool");
            if let Err(e) = self.pool.advise(run, Advise::DontNeed) {
                tracing::error!(%run, error = %e, "cannot empty device pages for reuse");
            }
            i = j;
        }
    }
}

impl DmaEngine for MoveEngine {
    fn name(&self) -> &str {
        "zero-copy"
    }

    fn reads_peers(&self) -> bool {
        true
    }

    fn keeps_sources(&self) -> bool {
        false
    }

    fn submit(&self, job: DmaJob) -> DmaFence {
        let (fence, done) = DmaFence::new(job.len());
        self.faults.pass();
        let res = match job {
            DmaJob::ToDevice(ops) => {
                // Marked before filling: a failed fill leaves at worst an empty
                // page that `page_free` empties again.
                self.empty_slots(&ops);
                ops.iter().for_each(|op| self.populated.set(op.dst.index, true));
                self.to_device(&ops)
            }
            DmaJob::ToSystem { copies, sink } => {
                let (res, moved) = to_system_copies(&self.pool, &sink, &copies, &self.faults, true);
                // A page that came back by copy still holds its data: keep its
                // bit, so that `page_free` empties it.
                for (c, m) in copies.iter().zip(moved) {
                    if m {
                        self.populated.set(c.src.index, false);
                    }
                }
                res
            }
        };
        done.complete(0, res);
        fence
    }
}
