//! Device memory: the kernel's ZONE_DEVICE, hot-plugged by a driver.
//!
//! A device registers a region of some capacity and kind with a set of
//! callbacks ([`DevicePagemapOps`]). Each page of the region has a 24-byte
//! descriptor: a reference count, the virtual address it backs, and a word of
//! driver data; its owner is the region. Descriptors are created a chunk at a
//! time as the region fills, and allocation past the capacity fails.
//!
//! # Reference counting
//!
//! A page's count is zero while it is free. Allocation sets it to one, held by
//! the migration that allocated it; when that migration commits, the reference
//! passes to the managed page that now lives there. Whoever drops the last
//! reference frees the page: the driver's `page_free` runs, the page returns to
//! the free list and the capacity is returned.
//!
//! # Recency and pressure
//!
//! Each descriptor carries a stamp from the region's clock, set whenever hmm
//! sees the page used: a migration committing data into it, a device access
//! through the device's page table ([`DeviceMemory::touch`]). Allocation order
//! plays no part. When a migration finds the region full and the region's
//! [`Pressure`] is [`Pressure::Evict`] (with [`Pressure::EvictOldest`],
//! device accesses leave the stamps alone: first in, first out), the pages with the oldest stamps that
//! back an address and that no migration holds are evicted to system memory to
//! make room ([`DeviceMemory::coldest`]); a page in the middle of a migration
//! (its own or another's) is never a victim, since eviction is itself a
//! migration and skips pages another one holds.

#![forbid(unsafe_code)]

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use crate::addr::{PAGE_SIZE, PageRange, VirtAddr};
use crate::dma::DmaEngine;
use crate::os::mm::Mapping;
use crate::page::{DeviceId, DevicePage};

/// The kind of a device memory region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemoryKind {
    /// The CPU cannot address it: a CPU touch faults and migrates the page back.
    Private,
    /// The CPU maps it directly (memory on a coherent bus: CXL, CCIX, CAPI):
    /// a page migrated here stays mapped at its address, and CPU reads and
    /// writes reach device memory without faulting (see [`crate::coherent`]).
    /// Pages leave it only by an explicit migration or eviction.
    Coherent,
}

/// What a migration to a full region does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Pressure {
    /// Pages that find no free device page are skipped with "no device memory".
    #[default]
    Refuse,
    /// The region's least recently used pages are evicted to system memory to
    /// make room (see the [module docs](self)).
    Evict,
    /// The pages that came into the region first are evicted first, whatever
    /// the device did with them since (first in, first out: the order NVIDIA's
    /// driver evicts in; for comparison with [`Evict`](Self::Evict)).
    EvictOldest,
}

/// Why a fault-back did not bring the faulting page back.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FaultBackError {
    /// System memory could not be had: the fault is retried later.
    #[error("out of system memory")]
    NoMemory,
    /// The device failed: the page is poisoned.
    #[error("the device failed")]
    DeviceFailed,
    /// The page was not where the fault said (another migration took it):
    /// the thread is woken and faults again if needed.
    #[error("the page is busy")]
    Busy,
    /// Anything else: the page is poisoned.
    #[error("{0}")]
    Other(String),
}

/// A CPU fault on a device-private page, handed to the device's
/// [`migrate_to_ram`](DevicePagemapOps::migrate_to_ram).
///
/// It stands for the fault hmm's fault service is serving (see
/// [`crate::fault`]): what was touched, the fault-around window, and the way
/// to bring the pages back.
pub struct CpuFault<'a> {
    fault: &'a mut dyn FaultBack,
}

/// What the fault service hands a driver as a [`CpuFault`]: defined here,
/// below the service, so that device memory does not depend on it.
pub(crate) trait FaultBack {
    fn addr(&self) -> VirtAddr;
    fn device_page(&self) -> DevicePage;
    fn window(&self) -> PageRange;
    fn is_write(&self) -> bool;
    fn migrate(&mut self, engine: &dyn DmaEngine) -> Result<(), FaultBackError>;
}

impl std::fmt::Debug for CpuFault<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuFault")
            .field("addr", &self.addr())
            .field("page", &self.device_page())
            .field("window", &self.window())
            .field("write", &self.is_write())
            .finish()
    }
}

impl<'a> CpuFault<'a> {
    pub(crate) fn new(fault: &'a mut dyn FaultBack) -> Self {
        Self { fault }
    }

    /// The faulting address.
    pub fn addr(&self) -> VirtAddr {
        self.fault.addr()
    }

    /// The device page holding it.
    pub fn device_page(&self) -> DevicePage {
        self.fault.device_page()
    }

    /// The fault-around window (inside the managed range, containing the address).
    pub fn window(&self) -> PageRange {
        self.fault.window()
    }

    /// Whether the touch was a write.
    pub fn is_write(&self) -> bool {
        self.fault.is_write()
    }

    /// Brings the faulting page back with `engine`, then the rest of the
    /// window. A window that is one whole 2 MiB block comes back in one
    /// migration, so an engine can move it as a huge page. The fault is
    /// counted before the faulting thread is woken.
    pub fn migrate(&mut self, engine: &dyn DmaEngine) -> Result<(), FaultBackError> {
        self.fault.migrate(engine)
    }
}

/// The driver's callbacks (the kernel's `dev_pagemap_ops`).
///
/// Rules every callback keeps (each method adds its own):
/// - **Which thread.** Callbacks run on whichever thread does the work: an
///   application thread (its migration, its `munmap`), hmm's fault service
///   (a CPU fault-back, an event it handles), or one of hmm's helper threads
///   (a fork copy, an `mremap` forward). So a callback never waits for the
///   fault service: not [`HmmHandle::sync_device_access`], not
///   [`Hmm::settle`](crate::Hmm::settle), not a migration or
///   [`range_fault`](crate::HmmHandle::range_fault), nor a lock that a
///   thread holds while it waits for one of those. hmm holds none of its own
///   locks (page records, registry) while it calls a callback.
/// - **Managed addresses.** A callback never touches memory hmm manages
///   with the CPU (a load, a store, a `memcpy` from it): such a touch may
///   fault to the fault service, which may be the very thread running the
///   callback. Data moves only through the [`DmaEngine`]
///   and the sink hmm hands it.
/// - **Errors** are reported, never panicked: a panic on the fault service
///   aborts the process (every faulting thread would otherwise wait forever).
///
/// [`HmmHandle::sync_device_access`]: crate::HmmHandle::sync_device_access
pub trait DevicePagemapOps: Send + Sync {
    /// The last reference to `page` is gone: the driver may reuse it (and
    /// drop what it kept for it). Called once per allocation of the page,
    /// possibly on the fault service; it must not block beyond a short lock
    /// of the driver's own. A driver that serves faults in the faulting
    /// thread ([`copy_to_ram_in_thread`](Self::copy_to_ram_in_thread)) keeps
    /// that method's rules here too.
    fn page_free(&self, page: DevicePage);

    /// The engine hmm copies with when it moves this device's pages itself
    /// (eviction, release, fault-back by default). Called often: return a
    /// reference, do no work. The engine's [`submit`](crate::DmaEngine::submit)
    /// keeps the rules above too.
    fn dma(&self) -> &dyn DmaEngine;

    /// The device's memory as other devices' DMA engines reach it (a PCIe
    /// BAR, say): page `i` at offset `i * PAGE_SIZE`. `None` (the default)
    /// when peers cannot reach it; pages then move to another device through
    /// system memory.
    fn peer_memory(&self) -> Option<Arc<crate::os::mm::Mapping>> {
        None
    }

    /// For a [`MemoryKind::Coherent`] region: the file whose page `i` is
    /// device page `i`, which hmm maps at the addresses the pages back.
    fn coherent_file(&self) -> Option<std::os::fd::BorrowedFd<'_>> {
        None
    }

    /// A CPU touched a page that lives in this device's private memory (the
    /// kernel's `migrate_to_ram`). Runs on the fault service while the
    /// faulting thread waits, so every other fault waits too: bring the
    /// page back ([`CpuFault::migrate`]), do nothing slow besides. The
    /// driver must bring at least the faulting page back; it cannot refuse:
    /// [`FaultBackError::NoMemory`] has the fault retried later, with a
    /// backoff; [`FaultBackError::Busy`] has the thread fault again at once;
    /// any other error poisons the page (a CPU touch then gets `SIGBUS`).
    /// The default brings back the fault-around window with
    /// [`dma`](Self::dma).
    fn migrate_to_ram(&self, fault: &mut CpuFault<'_>) -> Result<(), FaultBackError> {
        fault.migrate(self.dma())
    }

    /// Installs the bytes of `page` at the faulting address through `to`
    /// (one of its three ways) and returns true, or returns false to have the
    /// fault served through [`migrate_to_ram`](Self::migrate_to_ram). The
    /// default returns false. hmm calls it for the faulting page of a
    /// fault-back before anything else: in the faulting thread's own handler
    /// with [`FaultMode::InThread`](crate::FaultMode::InThread), on the fault
    /// service otherwise (the rest of the fault-around window then comes back
    /// through [`dma`](Self::dma), after the faulting thread is woken).
    ///
    /// May run in a `SIGBUS` handler, on whatever thread touched the page, in
    /// the middle of whatever it was doing: it must not allocate or free,
    /// must not take a lock that code touching managed memory could hold,
    /// must not block for long, and must not touch managed memory. A move or
    /// a copy out of the device's own memory, a decompression into a buffer
    /// on the stack, a bounded wait on the device through atomics qualify.
    /// So does [`page_free`](Self::page_free), which may run there too in
    /// that mode.
    fn copy_to_ram_in_thread(&self, page: DevicePage, to: &mut InThreadFill<'_>) -> bool {
        let _ = (page, to);
        false
    }
}

/// Where a driver installs a page it brings back in the faulting thread
/// ([`DevicePagemapOps::copy_to_ram_in_thread`]): the faulting page, missing
/// until one of these fills it. Each allocates nothing and is one system
/// call; each returns whether the page is in place.
pub struct InThreadFill<'a> {
    uffd: &'a crate::os::uffd::Uffd,
    dst: PageRange,
    filled: bool,
    in_handler: bool,
}

impl<'a> InThreadFill<'a> {
    pub(crate) fn new(uffd: &'a crate::os::uffd::Uffd, dst: PageRange, in_handler: bool) -> Self {
        Self { uffd, dst, filled: false, in_handler }
    }

    /// The page to fill.
    pub fn page(&self) -> PageRange {
        self.dst
    }

    /// Whether the fill runs in the faulting thread's own `SIGBUS` handler
    /// (`FaultMode::InThread`), rather than on the fault service while the
    /// faulting thread sleeps. It decides between a move and a copy: a move
    /// clears the device page's entry, and that costs a TLB shootdown, an
    /// inter-processor interrupt to the CPUs that may hold the translation,
    /// which is dear in a virtual machine. From the fault service it is paid
    /// (a random fault-back measured about 25% slower by move than by copy
    /// here); in the faulting thread's handler it was not (the move measured
    /// about 10% faster than a copy, which allocates and fills a page).
    pub fn in_handler(&self) -> bool {
        self.in_handler
    }

    /// Whether a fill succeeded.
    pub(crate) fn filled(&self) -> bool {
        self.filled
    }

    /// Moves the page at `at` (one page inside `src`, device memory the CPU
    /// can address, such as a software device's pool) to the faulting
    /// address without copying (`UFFDIO_MOVE`): `at` is empty afterwards.
    /// Fails where the kernel will not move the page (shared, pinned, no
    /// `UFFDIO_MOVE`): copy it then.
    pub fn move_from(&mut self, src: &Mapping, at: PageRange) -> bool {
        self.filled = self.uffd.move_pages(self.dst, src, at, true, false).is_ok();
        self.filled
    }

    /// Copies the page at `at` (one page inside `src`) to the faulting
    /// address (`UFFDIO_COPY`).
    pub fn copy_from(&mut self, src: &Mapping, at: PageRange) -> bool {
        self.filled = self.uffd.copy_from(self.dst, src, at, true).is_ok();
        self.filled
    }

    /// Copies `bytes` (one page, a buffer of the driver's: a page it
    /// decompressed, say) to the faulting address (`UFFDIO_COPY`).
    pub fn write(&mut self, bytes: &[u8]) -> bool {
        self.filled = self.uffd.copy(self.dst, bytes, true, false).is_ok();
        self.filled
    }
}

impl std::fmt::Debug for InThreadFill<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InThreadFill")
            .field("page", &self.dst)
            .field("filled", &self.filled)
            .finish()
    }
}

/// How to register a region.
#[derive(Debug, Clone)]
pub struct DeviceMemoryConfig {
    /// A name for messages and reports.
    pub name: String,
    /// Private or coherent.
    pub kind: MemoryKind,
    /// Capacity in bytes (a multiple of the page size).
    pub capacity: usize,
    /// Descriptors are created this many pages at a time.
    pub chunk_pages: u32,
    /// What a migration to the region does when it is full.
    pub pressure: Pressure,
}

impl DeviceMemoryConfig {
    /// A coherent region of `capacity` bytes (see [`MemoryKind::Coherent`]).
    pub fn coherent(name: impl Into<String>, capacity: usize) -> Self {
        Self { kind: MemoryKind::Coherent, ..Self::private(name, capacity) }
    }

    /// A private region of `capacity` bytes, descriptors made 512 pages (2 MiB) at a time.
    pub fn private(name: impl Into<String>, capacity: usize) -> Self {
        Self {
            name: name.into(),
            kind: MemoryKind::Private,
            capacity,
            chunk_pages: 512,
            pressure: Pressure::Refuse,
        }
    }
}

/// Why device memory could not be registered.
#[derive(Debug, thiserror::Error)]
pub enum DeviceMemoryError {
    /// Zero or unaligned capacity, or too large to index.
    #[error(
        "device memory capacity {0:#x} must be a non-zero multiple of {PAGE_SIZE} bytes and at most 2^32 pages"
    )]
    Capacity(usize),
    /// A chunk size of zero.
    #[error("chunk_pages must be at least 1")]
    Chunk,
    /// A coherent region whose driver offers no file for the CPU to map.
    #[error("a coherent region needs DevicePagemapOps::coherent_file (the memory the CPU maps)")]
    NoCoherentFile,
    /// Every device id is taken.
    #[error("too many device memory regions (at most {})", DeviceId::MAX)]
    TooMany,
}

/// A page's descriptor (the kernel's `struct page` for device memory).
#[derive(Debug, Default)]
struct Descriptor {
    refcount: AtomicU32,
    driver_data: AtomicU32,
    /// The virtual address the page backs (0: none).
    backs: AtomicU64,
    /// The region's clock when hmm last saw the page used.
    stamp: AtomicU64,
}

const _: () = assert!(std::mem::size_of::<Descriptor>() == 24);

/// Counters of one device region (all monotonic except `pages_resident`).
#[derive(Debug, Default)]
pub struct DeviceCounters {
    pub(crate) migrated_to_device: AtomicU64,
    pub(crate) migrated_to_system: AtomicU64,
    pub(crate) cpu_faults: AtomicU64,
    pub(crate) pages_poisoned: AtomicU64,
    pub(crate) pages_freed: AtomicU64,
    pub(crate) migrated_to_peer: AtomicU64,
    pub(crate) pages_evicted: AtomicU64,
    pub(crate) eviction_ns: AtomicU64,
}

/// A snapshot of a region's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub struct DeviceStats {
    /// Pages allocated now (each backs a managed page or an in-flight migration).
    pub pages_resident: u64,
    /// Capacity in pages.
    pub capacity_pages: u64,
    /// Pages migrated into this device.
    pub migrated_to_device: u64,
    /// Pages migrated from this device to system memory.
    pub migrated_to_system: u64,
    /// Bytes moved into the device.
    pub bytes_to_device: u64,
    /// Bytes moved out of the device.
    pub bytes_to_system: u64,
    /// CPU faults on this device's pages served, counted before the faulting
    /// thread is woken (see [`RangeStats::cpu_faults`](crate::RangeStats::cpu_faults)).
    pub cpu_faults: u64,
    /// Pages lost because the device failed.
    pub pages_poisoned: u64,
    /// Pages whose last reference went away (`page_free` calls).
    pub pages_freed: u64,
    /// Pages that moved from this device straight to another device.
    pub migrated_to_peer: u64,
    /// Pages evicted to system memory to make room for a migration.
    pub pages_evicted: u64,
    /// Time spent evicting them, in nanoseconds.
    pub eviction_ns: u64,
}

/// Free pages, one bit each (set = free), over the chunks made so far.
/// Allocation takes the lowest free pages first, so the pages of a migration
/// are mostly contiguous and engines move them in runs (whole huge pages when
/// a run is 512 pages on a 512-page boundary).
struct FreeList {
    bits: Vec<u64>,
    /// No word below this one has a free bit.
    hint: usize,
    /// Free pages.
    count: u32,
    /// Chunks whose descriptors exist.
    chunks: u32,
}

impl FreeList {
    fn new(capacity_pages: u32) -> Self {
        Self { bits: vec![0; capacity_pages.div_ceil(64) as usize], hint: 0, count: 0, chunks: 0 }
    }

    fn insert(&mut self, index: u32) {
        let w = index as usize / 64;
        let b = 1u64 << (index % 64);
        debug_assert_eq!(self.bits[w] & b, 0, "page {index} freed twice");
        self.bits[w] |= b;
        self.hint = self.hint.min(w);
        self.count += 1;
    }

    fn pop_lowest(&mut self) -> Option<u32> {
        if self.count == 0 {
            return None;
        }
        while self.bits[self.hint] == 0 {
            self.hint += 1;
        }
        let w = self.hint;
        let bit = self.bits[w].trailing_zeros();
        self.bits[w] &= !(1u64 << bit);
        self.count -= 1;
        Some((w * 64) as u32 + bit)
    }
}

/// A region of device memory registered with an `Hmm` instance.
pub struct DeviceMemory {
    id: DeviceId,
    name: String,
    kind: MemoryKind,
    capacity_pages: u32,
    chunk_pages: u32,
    chunks: Box<[OnceLock<Box<[Descriptor]>>]>,
    free: Mutex<FreeList>,
    allocated: AtomicU64,
    fail_next_alloc: AtomicU32,
    failed: AtomicBool,
    /// Unregistered: no new work comes here, but the records, migrations and
    /// copies that still name its pages reach it until they let them go.
    released: AtomicBool,
    pressure: Pressure,
    /// The recency clock (see the module docs).
    clock: AtomicU64,
    ops: Arc<dyn DevicePagemapOps>,
    pub(crate) counters: DeviceCounters,
}

impl fmt::Debug for DeviceMemory {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceMemory")
            .field("id", &self.id)
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("capacity_pages", &self.capacity_pages)
            .field("allocated", &self.allocated.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl DeviceMemory {
    pub(crate) fn new(
        id: DeviceId,
        config: DeviceMemoryConfig,
        ops: Arc<dyn DevicePagemapOps>,
    ) -> Result<Self, DeviceMemoryError> {
        let pages = config.capacity / PAGE_SIZE;
        if config.capacity == 0
            || !config.capacity.is_multiple_of(PAGE_SIZE)
            || pages > u32::MAX as usize
        {
            return Err(DeviceMemoryError::Capacity(config.capacity));
        }
        if config.chunk_pages == 0 {
            return Err(DeviceMemoryError::Chunk);
        }
        if config.kind == MemoryKind::Coherent && ops.coherent_file().is_none() {
            return Err(DeviceMemoryError::NoCoherentFile);
        }
        let capacity_pages = pages as u32;
        let chunk_pages = config.chunk_pages.min(capacity_pages);
        let nchunks = capacity_pages.div_ceil(chunk_pages) as usize;
        Ok(Self {
            id,
            name: config.name,
            kind: config.kind,
            capacity_pages,
            chunk_pages,
            chunks: (0..nchunks).map(|_| OnceLock::new()).collect(),
            free: Mutex::new(FreeList::new(capacity_pages)),
            allocated: AtomicU64::new(0),
            fail_next_alloc: AtomicU32::new(0),
            failed: AtomicBool::new(false),
            released: AtomicBool::new(false),
            pressure: config.pressure,
            clock: AtomicU64::new(1),
            ops,
            counters: DeviceCounters::default(),
        })
    }

    /// The region's identity (its owner).
    pub fn id(&self) -> DeviceId {
        self.id
    }

    /// The name given at registration.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Private or coherent.
    pub fn kind(&self) -> MemoryKind {
        self.kind
    }

    /// Capacity in pages.
    pub fn capacity_pages(&self) -> u32 {
        self.capacity_pages
    }

    /// Pages allocated now.
    pub fn allocated_pages(&self) -> u64 {
        self.allocated.load(Ordering::Acquire)
    }

    /// Pages free now.
    pub fn free_pages(&self) -> u64 {
        u64::from(self.capacity_pages).saturating_sub(self.allocated_pages())
    }

    /// What a migration to the full region does.
    pub fn pressure(&self) -> Pressure {
        self.pressure
    }

    /// Records that `page` was just used (a device access through the
    /// device's page table; hmm stamps migrations itself). Recency decides
    /// which pages [`Pressure::Evict`] evicts first.
    pub fn touch(&self, page: DevicePage) {
        if page.dev != self.id
            || page.index >= self.capacity_pages
            || self.pressure == Pressure::EvictOldest
        {
            return;
        }
        if let Some(chunk) = self.chunks[(page.index / self.chunk_pages) as usize].get() {
            let now = self.clock.fetch_add(1, Ordering::Relaxed);
            chunk[(page.index % self.chunk_pages) as usize].stamp.store(now, Ordering::Relaxed);
        }
    }

    /// Up to `n` pages that back an address, least recently used first.
    pub fn coldest(&self, n: usize) -> Vec<DevicePage> {
        self.coldest_outside(n, None)
    }

    /// The same, leaving out the pages that back addresses in `keep`: a
    /// migration into the device does not evict the pages it is gathering
    /// there.
    pub fn coldest_outside(&self, n: usize, keep: Option<PageRange>) -> Vec<DevicePage> {
        let mut all: Vec<(u64, DevicePage)> = Vec::new();
        self.for_each_backing(|page, addr, d| {
            if !keep.is_some_and(|k| k.contains(addr)) {
                all.push((d.stamp.load(Ordering::Relaxed), page));
            }
        });
        if n < all.len() {
            all.select_nth_unstable_by_key(n, |x| x.0);
            all.truncate(n);
        }
        all.sort_unstable_by_key(|x| x.0);
        all.into_iter().map(|x| x.1).collect()
    }

    /// Calls `f` for every allocated page that backs an address.
    fn for_each_backing(&self, mut f: impl FnMut(DevicePage, VirtAddr, &Descriptor)) {
        for (c, chunk) in self.chunks.iter().enumerate() {
            let Some(chunk) = chunk.get() else { break };
            for (i, d) in chunk.iter().enumerate() {
                let a = d.backs.load(Ordering::Acquire);
                if a != 0 && d.refcount.load(Ordering::Acquire) > 0 {
                    let index = c as u32 * self.chunk_pages + i as u32;
                    f(DevicePage { dev: self.id, index }, VirtAddr::new(a as usize), d);
                }
            }
        }
    }

    /// Whether the device was marked failed.
    pub fn is_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Marks the region failed. The fence pairs with the one in
    /// [`claim_backing`](Self::claim_backing): a `resident_pages` after this
    /// sees every page claimed before the failure was seen.
    pub(crate) fn set_failed(&self) {
        self.failed.store(true, Ordering::Release);
        std::sync::atomic::fence(Ordering::SeqCst);
    }

    /// Whether the region was unregistered (see [`Hmm::unregister_device_memory`]).
    ///
    /// [`Hmm::unregister_device_memory`]: crate::Hmm::unregister_device_memory
    pub fn is_released(&self) -> bool {
        self.released.load(Ordering::Acquire)
    }

    pub(crate) fn set_released(&self) {
        self.released.store(true, Ordering::Release);
    }

    /// Makes the next `n` allocations fail (fault injection for tests).
    pub fn fail_next_allocs(&self, n: u32) {
        self.fail_next_alloc.store(n, Ordering::Release);
    }

    /// The driver callbacks the region was registered with (its DMA engine
    /// among them).
    pub fn ops(&self) -> &Arc<dyn DevicePagemapOps> {
        &self.ops
    }

    fn descriptor(&self, index: u32) -> &Descriptor {
        let chunk = self.chunks[(index / self.chunk_pages) as usize]
            .get()
            .expect("descriptor of an allocated page exists");
        &chunk[(index % self.chunk_pages) as usize]
    }

    /// Allocates up to `n` pages, each with a reference held by the caller.
    /// Returns fewer (possibly none) when the region is full or an injected
    /// failure is pending.
    pub(crate) fn alloc(&self, n: usize) -> Vec<DevicePage> {
        if self
            .fail_next_alloc
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| v.checked_sub(1))
            .is_ok()
        {
            return Vec::new();
        }
        let mut out = Vec::with_capacity(n);
        let mut fl = self.free.lock().unwrap_or_else(|e| e.into_inner());
        while out.len() < n {
            if fl.count == 0 && !self.grow(&mut fl) {
                break;
            }
            let index = fl.pop_lowest().expect("grown");
            let d = self.descriptor(index);
            let was = d.refcount.swap(1, Ordering::AcqRel);
            debug_assert_eq!(was, 0, "a free page has no references");
            d.backs.store(0, Ordering::Relaxed);
            d.driver_data.store(0, Ordering::Relaxed);
            out.push(DevicePage { dev: self.id, index });
        }
        drop(fl);
        self.allocated.fetch_add(out.len() as u64, Ordering::AcqRel);
        out
    }

    /// Creates the descriptors of the next chunk; false when the region is full.
    fn grow(&self, fl: &mut FreeList) -> bool {
        if fl.chunks as usize >= self.chunks.len() {
            return false;
        }
        let first = fl.chunks * self.chunk_pages;
        let count = self.chunk_pages.min(self.capacity_pages - first);
        self.chunks[fl.chunks as usize]
            .get_or_init(|| (0..count).map(|_| Descriptor::default()).collect());
        fl.chunks += 1;
        (first..first + count).for_each(|i| fl.insert(i));
        true
    }

    /// Drops a reference to `page`; the last one frees it (`page_free`).
    pub(crate) fn put(&self, page: DevicePage) {
        self.put_all(std::slice::from_ref(&page));
    }

    /// Drops a reference to each of `pages` (all of this region); the last
    /// reference of a page frees it. The free list is locked once.
    pub(crate) fn put_all(&self, pages: &[DevicePage]) {
        let mut freed = Vec::new();
        for &page in pages {
            debug_assert_eq!(page.dev, self.id);
            let d = self.descriptor(page.index);
            let was = d.refcount.fetch_sub(1, Ordering::AcqRel);
            assert!(was > 0, "device page {page} released more often than taken");
            if was == 1 {
                d.backs.store(0, Ordering::Relaxed);
                self.ops.page_free(page);
                freed.push(page.index);
            }
        }
        if freed.is_empty() {
            return;
        }
        let n = freed.len() as u64;
        let mut fl = self.free.lock().unwrap_or_else(|e| e.into_inner());
        freed.into_iter().for_each(|i| fl.insert(i));
        drop(fl);
        self.counters.pages_freed.fetch_add(n, Ordering::Relaxed);
        self.allocated.fetch_sub(n, Ordering::AcqRel);
    }

    /// Drops one reference to `page`, as [`put_all`](Self::put_all) does,
    /// allocating nothing (a `SIGBUS` handler's way, see `crate::inthread`).
    pub(crate) fn put_one(&self, page: DevicePage) {
        debug_assert_eq!(page.dev, self.id);
        let d = self.descriptor(page.index);
        let was = d.refcount.fetch_sub(1, Ordering::AcqRel);
        debug_assert!(was > 0, "device page {page} released more often than taken");
        if was != 1 {
            return;
        }
        d.backs.store(0, Ordering::Relaxed);
        self.ops.page_free(page);
        self.free.lock().unwrap_or_else(|e| e.into_inner()).insert(page.index);
        self.counters.pages_freed.fetch_add(1, Ordering::Relaxed);
        self.allocated.fetch_sub(1, Ordering::AcqRel);
    }

    /// Records the address `page` backs (a migration committed data into it:
    /// a use, for recency).
    pub(crate) fn set_backs(&self, page: DevicePage, addr: VirtAddr) {
        let d = self.descriptor(page.index);
        d.stamp.store(self.clock.fetch_add(1, Ordering::Relaxed), Ordering::Relaxed);
        d.backs.store(addr.as_u64(), Ordering::Release);
    }

    /// Records that `page` backs `addr`, as [`set_backs`](Self::set_backs),
    /// unless the region has failed: then it records nothing and returns
    /// false. With [`set_failed`](Self::set_failed) this is a store-then-load
    /// handshake with a full fence on both sides: a page claimed as the
    /// device fails is either refused here or listed by the
    /// [`resident_pages`](Self::resident_pages) that follows the failure
    /// (and poisoned there), never neither.
    pub(crate) fn claim_backing(&self, page: DevicePage, addr: VirtAddr) -> bool {
        self.set_backs(page, addr);
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.is_failed() {
            self.descriptor(page.index).backs.store(0, Ordering::Release);
            return false;
        }
        true
    }

    /// The virtual address `page` backs, if it backs one.
    pub fn backs(&self, page: DevicePage) -> Option<VirtAddr> {
        if page.dev != self.id || page.index >= self.capacity_pages {
            return None;
        }
        let chunk = self.chunks[(page.index / self.chunk_pages) as usize].get()?;
        let a = chunk[(page.index % self.chunk_pages) as usize].backs.load(Ordering::Acquire);
        (a != 0).then(|| VirtAddr::new(a as usize))
    }

    /// The reference count of `page` (0 when free).
    pub fn refcount(&self, page: DevicePage) -> u32 {
        if page.dev != self.id || page.index >= self.capacity_pages {
            return 0;
        }
        self.chunks[(page.index / self.chunk_pages) as usize].get().map_or(0, |c| {
            c[(page.index % self.chunk_pages) as usize].refcount.load(Ordering::Acquire)
        })
    }

    /// The driver's word for `page`.
    pub fn driver_data(&self, page: DevicePage) -> u32 {
        self.descriptor(page.index).driver_data.load(Ordering::Acquire)
    }

    /// Sets the driver's word for an allocated `page`.
    pub fn set_driver_data(&self, page: DevicePage, value: u32) {
        self.descriptor(page.index).driver_data.store(value, Ordering::Release);
    }

    /// Every allocated page that backs an address, with that address.
    pub(crate) fn resident_pages(&self) -> Vec<(DevicePage, VirtAddr)> {
        let mut out = Vec::new();
        self.for_each_backing(|page, addr, _| out.push((page, addr)));
        out
    }

    /// Bytes of descriptors created so far.
    pub fn descriptor_bytes(&self) -> usize {
        let chunks = self.free.lock().unwrap_or_else(|e| e.into_inner()).chunks as usize;
        chunks * self.chunk_pages as usize * std::mem::size_of::<Descriptor>()
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> DeviceStats {
        let c = &self.counters;
        let to_dev = c.migrated_to_device.load(Ordering::Relaxed);
        let to_sys = c.migrated_to_system.load(Ordering::Relaxed);
        DeviceStats {
            pages_resident: self.allocated_pages(),
            capacity_pages: u64::from(self.capacity_pages),
            migrated_to_device: to_dev,
            migrated_to_system: to_sys,
            bytes_to_device: to_dev * PAGE_SIZE as u64,
            bytes_to_system: to_sys * PAGE_SIZE as u64,
            cpu_faults: c.cpu_faults.load(Ordering::Relaxed),
            pages_poisoned: c.pages_poisoned.load(Ordering::Relaxed),
            pages_freed: c.pages_freed.load(Ordering::Relaxed),
            migrated_to_peer: c.migrated_to_peer.load(Ordering::Relaxed),
            pages_evicted: c.pages_evicted.load(Ordering::Relaxed),
            eviction_ns: c.eviction_ns.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex as StdMutex;

    #[test]
    fn free_list_hands_out_the_lowest_free_pages() {
        let mut fl = FreeList::new(200);
        (0..200).for_each(|i| fl.insert(i));
        let got: Vec<u32> = (0..130).map(|_| fl.pop_lowest().unwrap()).collect();
        assert_eq!(got, (0..130).collect::<Vec<_>>());
        for i in [129, 3, 64, 70] {
            fl.insert(i);
        }
        assert_eq!(fl.count, 74);
        let got: Vec<u32> = (0..6).map(|_| fl.pop_lowest().unwrap()).collect();
        assert_eq!(got, vec![3, 64, 70, 129, 130, 131]);
        while fl.pop_lowest().is_some() {}
        assert_eq!(fl.count, 0);
        fl.insert(199);
        assert_eq!(fl.pop_lowest(), Some(199));
        assert_eq!(fl.pop_lowest(), None);
    }

    #[derive(Default)]
    struct Recorder(StdMutex<Vec<DevicePage>>);

    impl DevicePagemapOps for Recorder {
        fn page_free(&self, page: DevicePage) {
            self.0.lock().unwrap().push(page);
        }
        fn dma(&self) -> &dyn crate::dma::DmaEngine {
            unreachable!("no copies in unit tests")
        }
    }

    fn region(pages: usize, chunk: u32) -> (DeviceMemory, Arc<Recorder>) {
        let rec = Arc::new(Recorder::default());
        let mut cfg = DeviceMemoryConfig::private("t", pages * PAGE_SIZE);
        cfg.chunk_pages = chunk;
        (DeviceMemory::new(DeviceId(3), cfg, rec.clone()).unwrap(), rec)
    }

    #[test]
    fn capacity_is_enforced_and_returned_on_free() {
        let (m, rec) = region(10, 4);
        let a = m.alloc(7);
        assert_eq!(a.len(), 7);
        assert_eq!(a[0], DevicePage { dev: DeviceId(3), index: 0 }, "ascending order");
        let b = m.alloc(7);
        assert_eq!(b.len(), 3, "only what fits");
        assert!(m.alloc(1).is_empty());
        assert_eq!(m.allocated_pages(), 10);
        m.put(a[2]);
        assert_eq!(*rec.0.lock().unwrap(), vec![a[2]], "page_free on the last reference");
        assert_eq!(m.allocated_pages(), 9);
        assert_eq!(m.alloc(5), vec![a[2]], "a freed page is reused");
        assert_eq!(m.descriptor_bytes(), 3 * 4 * 24, "three chunks of four descriptors");
    }

    #[test]
    fn references_keep_a_page_alive() {
        let (m, rec) = region(4, 512);
        let p = m.alloc(1)[0];
        m.descriptor(p.index).refcount.fetch_add(1, Ordering::AcqRel);
        m.set_backs(p, VirtAddr::new(0x7000));
        m.set_driver_data(p, 42);
        assert_eq!(m.refcount(p), 2);
        m.put(p);
        assert!(rec.0.lock().unwrap().is_empty());
        assert_eq!(m.backs(p), Some(VirtAddr::new(0x7000)));
        assert_eq!(m.driver_data(p), 42);
        assert_eq!(m.resident_pages(), vec![(p, VirtAddr::new(0x7000))]);
        m.put(p);
        assert_eq!(rec.0.lock().unwrap().len(), 1);
        assert_eq!(m.backs(p), None);
        assert_eq!(m.refcount(p), 0);
    }

    #[test]
    fn injected_failures_fail_whole_allocations() {
        let (m, _) = region(8, 8);
        m.fail_next_allocs(1);
        assert!(m.alloc(4).is_empty());
        assert_eq!(m.alloc(4).len(), 4);
    }

    #[test]
    fn bad_configurations_are_refused() {
        let rec: Arc<dyn DevicePagemapOps> = Arc::new(Recorder::default());
        for cap in [0, 100, PAGE_SIZE + 1] {
            let r =
                DeviceMemory::new(DeviceId(0), DeviceMemoryConfig::private("x", cap), rec.clone());
            assert!(matches!(r, Err(DeviceMemoryError::Capacity(c)) if c == cap));
        }
        let mut cfg = DeviceMemoryConfig::private("x", PAGE_SIZE);
        cfg.chunk_pages = 0;
        assert!(matches!(DeviceMemory::new(DeviceId(0), cfg, rec), Err(DeviceMemoryError::Chunk)));
    }
}
