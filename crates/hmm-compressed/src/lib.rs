//! A compressed-memory tier for hmm: a device whose private memory is
//! system memory holding pages compressed, the far-memory tier that zswap
//! and zram give the kernel, on hmm's public driver API.
//!
//! A page migrated to the device is compressed (lz4 by default, zstd as an
//! option) by the device's DMA engine, on worker threads, in batches:
//! - a page of zeros is a flag, not a stored page;
//! - a page that compresses to more than the threshold (2990 of 4096 bytes
//!   by default, where keeping it compressed saves too little) is declined:
//!   it stays in system memory, reported
//!   [`SkipReason::Declined`](hmm::SkipReason::Declined);
//! - the rest are packed by size class into slabs (`store`), so the
//!   device's capacity is counted in the bytes it really holds, compressed
//!   bytes plus the allocator's waste ([`CompressedStats::footprint_bytes`]);
//!   a page that finds no room is left where it was
//!   ([`SkipReason::NoDeviceMemory`](hmm::SkipReason::NoDeviceMemory)).
//!
//! A CPU touch of a compressed page is served by decompressing the
//! faulting page first, before the rest of the fault-around window: with
//! lz4, in the faulting thread's own `SIGBUS` handler when the instance
//! runs in `FaultMode::InThread` (one lock of the store, a copy of the
//! compressed bytes, a decompression into a buffer of the thread's own, one
//! `UFFDIO_COPY`: nothing allocated), on the fault service otherwise.
//!
//! ```no_run
//! use hmm::Hmm;
//! use hmm_compressed::{CompressedConfig, CompressedDevice};
//!
//! let hmm = Hmm::new()?;
//! let tier = CompressedDevice::new(&hmm, CompressedConfig::new("cold", 64 << 20))?;
//! let r = hmm.alloc(16 << 20)?;
//! r.fill(0, r.len(), 7)?;
//! let report = tier.migrate_to_device(r.range())?;
//! println!("{} pages compressed, {:?}", report.migrated, tier.stats());
//! assert_eq!(r.touch_read(4096)?, 7); // decompressed on touch
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod store;

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use hmm::dma::{
    DmaEngine, DmaError, DmaFence, DmaJob, JobPart, SystemSink, ToDevice, ToSystem, Workers,
};
use hmm::migrate::MigrationReport;
use hmm::space::{Hmm, HmmError};
use hmm::{
    DeviceMemory, DeviceMemoryConfig, DevicePage, DevicePagemapOps, HmmHandle, InThreadFill,
};
use hmm::{PAGE_SIZE, PageRange};

use store::{PutError, Record, Store};

/// The default threshold: a page whose compressed form is longer is declined.
/// (Google's far memory declines pages that compress worse than 2990 of 4096
/// bytes: the saving would not pay for the cost of decompressing.)
pub const DEFAULT_THRESHOLD: usize = 2990;

/// How pages are compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// lz4 (block format): fast both ways; decompressed in the faulting
    /// thread's handler in `FaultMode::InThread`.
    Lz4,
    /// zstd at `level` (1 to 22; 3 is zstd's default): smaller, slower.
    /// Decompressed on the fault service (its context is not kept per thread).
    Zstd {
        /// The compression level.
        level: i32,
    },
}

impl std::fmt::Display for Algorithm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Algorithm::Lz4 => f.write_str("lz4"),
            Algorithm::Zstd { level } => write!(f, "zstd-{level}"),
        }
    }
}

/// How to build a compressed device.
#[derive(Debug, Clone)]
pub struct CompressedConfig {
    /// Name for reports.
    pub name: String,
    /// The memory the device may hold, in bytes of slabs (compressed bytes
    /// plus the allocator's waste); rounded up to whole pages.
    pub capacity: usize,
    /// How many pages the device can hold at most (its device pages, whose
    /// descriptors hmm makes as they are first used; the device keeps 12
    /// bytes a page for them, and 40 bytes a page of `capacity` for its
    /// slabs, all made at creation: about 3% of the capacity). `None`: eight times the pages `capacity`
    /// would hold uncompressed, room for a compression ratio of 8.
    pub max_pages: Option<usize>,
    /// The compression.
    pub algorithm: Algorithm,
    /// Pages compressing to more bytes than this are declined (64 to 4096).
    pub threshold: usize,
    /// Worker threads that compress and decompress (at least 1).
    pub workers: usize,
}

impl CompressedConfig {
    /// A device of `capacity` bytes, lz4, the default threshold, two workers.
    pub fn new(name: impl Into<String>, capacity: usize) -> Self {
        Self {
            name: name.into(),
            capacity,
            max_pages: None,
            algorithm: Algorithm::Lz4,
            threshold: DEFAULT_THRESHOLD,
            workers: 2,
        }
    }

    /// The same with zstd at `level`.
    pub fn with_zstd(mut self, level: i32) -> Self {
        self.algorithm = Algorithm::Zstd { level };
        self
    }

    /// The same with `threshold`.
    pub fn with_threshold(mut self, threshold: usize) -> Self {
        self.threshold = threshold;
        self
    }

    fn check(&self) -> Result<(), HmmError> {
        let bad = |what: String| {
            Err(HmmError::Config(format!("compressed device {:?}: {what}", self.name)))
        };
        if self.name.contains('\0') {
            return bad("a name with a NUL byte: give a name without one".into());
        }
        if self.capacity < store::SLAB_PAGES_MAX * PAGE_SIZE {
            return bad(format!(
                "a capacity of {} bytes: give it at least {} bytes (a slab of the largest class)",
                self.capacity,
                store::SLAB_PAGES_MAX * PAGE_SIZE
            ));
        }
        if !(64..=PAGE_SIZE).contains(&self.threshold) {
            return bad(format!(
                "a threshold of {} bytes: give one from 64 to {PAGE_SIZE} (the default is {DEFAULT_THRESHOLD})",
                self.threshold
            ));
        }
        if self.workers == 0 {
            return bad("no worker threads: give it at least 1".into());
        }
        if self.max_pages == Some(0) {
            return bad("room for 0 pages: give max_pages at least 1, or None".into());
        }
        if let Algorithm::Zstd { level } = self.algorithm {
            let levels = zstd::compression_level_range();
            if !levels.contains(&level) || level < 1 {
                return bad(format!(
                    "zstd level {level}: give one from 1 to {} (3 is zstd's default)",
                    levels.end()
                ));
            }
        }
        Ok(())
    }
}

/// What a compressed device holds, and what it declined.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct CompressedStats {
    /// Pages held compressed.
    pub stored_pages: u64,
    /// Pages held as the zero flag (no memory).
    pub zero_pages: u64,
    /// The compressed bytes of the stored pages.
    pub compressed_bytes: u64,
    /// The memory the stored pages take: the slabs in use, compressed bytes
    /// plus the allocator's waste (rounding up to a size class, free slots).
    pub footprint_bytes: u64,
    /// The memory the device holds: the footprint, and empty slabs kept for
    /// reuse.
    pub held_bytes: u64,
    /// The capacity, in bytes of slabs.
    pub capacity_bytes: u64,
    /// Pages declined since creation: they compressed to more than the
    /// threshold.
    pub declined_pages: u64,
    /// Pages refused since creation for lack of room.
    pub full_pages: u64,
}

impl CompressedStats {
    /// Uncompressed bytes of the pages held (stored and zero).
    pub fn logical_bytes(&self) -> u64 {
        (self.stored_pages + self.zero_pages) * PAGE_SIZE as u64
    }

    /// Uncompressed bytes of the stored pages over their compressed bytes
    /// (`None` when nothing is stored).
    pub fn compression_ratio(&self) -> Option<f64> {
        (self.compressed_bytes > 0)
            .then(|| (self.stored_pages * PAGE_SIZE as u64) as f64 / self.compressed_bytes as f64)
    }

    /// Uncompressed bytes of every page held (zero pages included) over the
    /// memory they take, the allocator's waste included (`None` when the
    /// device takes no memory).
    pub fn effective_ratio(&self) -> Option<f64> {
        (self.footprint_bytes > 0)
            .then(|| self.logical_bytes() as f64 / self.footprint_bytes as f64)
    }
}

/// What the device's callbacks and its engine share.
struct Shared {
    store: Mutex<Store>,
    algorithm: Algorithm,
    threshold: usize,
    capacity: u64,
    declined: AtomicU64,
    full: AtomicU64,
    /// Set when the device goes: the housekeeping thread ends.
    stop: Mutex<bool>,
    stop_cv: std::sync::Condvar,
}

impl Shared {
    fn store(&self) -> MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Compresses the page `page` holds into device page `dst`.
    fn put(&self, dst: DevicePage, page: &[u8], packed: &mut [u8]) -> Result<(), DmaError> {
        if is_zero(page) {
            self.store().put_zero(dst.index);
            return Ok(());
        }
        let Some(len) = compress(self.algorithm, page, packed).filter(|n| *n <= self.threshold)
        else {
            self.declined.fetch_add(1, Ordering::Relaxed);
            return Err(DmaError::Declined(format!(
                "it compresses ({}) to more than {} of {PAGE_SIZE} bytes",
                self.algorithm, self.threshold
            )));
        };
        match self.store().put(dst.index, &packed[..len]) {
            Ok(()) => Ok(()),
            Err(PutError::Full) => {
                self.full.fetch_add(1, Ordering::Relaxed);
                Err(DmaError::DeviceFull)
            }
            Err(e) => Err(DmaError::Failed(format!("device page {}: {e:?}", dst.index))),
        }
    }

    /// Decompresses device page `src` into `out` (one page). Allocates
    /// nothing, error or not: it runs in a signal handler too.
    fn get(&self, src: DevicePage, packed: &mut [u8], out: &mut [u8]) -> Result<(), GetError> {
        let rec = self.store().read(src.index, packed);
        match rec {
            Record::Zero => {
                out.fill(0);
                Ok(())
            }
            Record::Stored { len, .. } => decompress(self.algorithm, &packed[..len as usize], out)
                .then_some(())
                .ok_or(GetError::Corrupt),
            Record::Empty => Err(GetError::Empty),
        }
    }
}

/// Why a page could not be decompressed (a plain value: the handler's path
/// builds no message).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GetError {
    /// The device page holds nothing.
    Empty,
    /// Its bytes do not decompress to a page.
    Corrupt,
}

impl GetError {
    fn into_dma(self, page: DevicePage) -> DmaError {
        DmaError::Failed(match self {
            GetError::Empty => format!("device page {} holds nothing", page.index),
            GetError::Corrupt => format!("device page {} does not decompress", page.index),
        })
    }
}

fn is_zero(page: &[u8]) -> bool {
    page.chunks_exact(16).all(|c| u128::from_ne_bytes(c.try_into().expect("16 bytes")) == 0)
}

thread_local! {
    /// A zstd context per thread that compresses or decompresses, made on
    /// first use (never in a signal handler: zstd pages are not served there).
    static ZSTD: RefCell<Option<(i32, zstd::bulk::Compressor<'static>, zstd::bulk::Decompressor<'static>)>> =
        const { RefCell::new(None) };
}

fn with_zstd<T>(
    level: i32,
    f: impl FnOnce(
        &mut zstd::bulk::Compressor<'static>,
        &mut zstd::bulk::Decompressor<'static>,
    ) -> Option<T>,
) -> Option<T> {
    ZSTD.with(|z| {
        let mut z = z.try_borrow_mut().ok()?;
        if z.as_ref().is_none_or(|(l, _, _)| *l != level) {
            let c = zstd::bulk::Compressor::new(level).ok()?;
            let d = zstd::bulk::Decompressor::new().ok()?;
            *z = Some((level, c, d));
        }
        let (_, c, d) = z.as_mut()?;
        f(c, d)
    })
}

/// The room a compressed page may need (lz4's bound for a page, which
/// covers zstd's).
pub const PACKED_BYTES: usize = 2 * PAGE_SIZE;

/// One page's compression, for other tiers that keep pages compressed (the
/// Redis tier compresses its values with it).
pub mod codec {
    use super::{Algorithm, PACKED_BYTES, PAGE_SIZE};

    /// Compresses `page` (one page) into `out` (at least [`PACKED_BYTES`]
    /// long): the compressed length, or `None` when it does not fit.
    pub fn compress(algorithm: Algorithm, page: &[u8], out: &mut [u8]) -> Option<usize> {
        if page.len() != PAGE_SIZE || out.len() < PACKED_BYTES {
            return None;
        }
        super::compress(algorithm, page, out)
    }

    /// Decompresses `packed` into `out` (one page): whether it gave exactly
    /// one page.
    pub fn decompress(algorithm: Algorithm, packed: &[u8], out: &mut [u8]) -> bool {
        out.len() == PAGE_SIZE && super::decompress(algorithm, packed, out)
    }
}

/// Compresses `page` into `out` ([`PACKED_BYTES`] long); `None` when it
/// does not fit.
fn compress(algorithm: Algorithm, page: &[u8], out: &mut [u8]) -> Option<usize> {
    match algorithm {
        Algorithm::Lz4 => lz4_flex::block::compress_into(page, out).ok(),
        Algorithm::Zstd { level } => with_zstd(level, |c, _| c.compress_to_buffer(page, out).ok()),
    }
}

/// Decompresses `packed` into `out` (one page); whether it gave one page.
fn decompress(algorithm: Algorithm, packed: &[u8], out: &mut [u8]) -> bool {
    let n = match algorithm {
        Algorithm::Lz4 => lz4_flex::block::decompress_into(packed, out).ok(),
        Algorithm::Zstd { level } => {
            with_zstd(level, |_, d| d.decompress_to_buffer(packed, out).ok())
        }
    };
    n == Some(PAGE_SIZE)
}

/// The scratch a thread serving its own fault decompresses in: in
/// thread-local storage with a constant initializer and nothing to drop,
/// so a signal handler reaches it without allocating.
struct Scratch {
    packed: [u8; PAGE_SIZE],
    page: [u8; PAGE_SIZE],
}

thread_local! {
    static HANDLER_SCRATCH: RefCell<Scratch> =
        const { RefCell::new(Scratch { packed: [0; PAGE_SIZE], page: [0; PAGE_SIZE] }) };
}

/// The driver side of the device's memory.
struct Core {
    shared: Arc<Shared>,
    engine: Engine,
}

impl DevicePagemapOps for Core {
    fn page_free(&self, page: DevicePage) {
        // Frees nothing but a slot: may run in a signal handler.
        self.shared.store().free(page.index);
    }

    fn dma(&self) -> &dyn DmaEngine {
        &self.engine
    }

    /// The faulting page, decompressed first (lz4 only; zstd pages go to the
    /// engine). One lock of the store, held for a copy of at most a page;
    /// nothing allocated (see `Scratch`).
    fn copy_to_ram_in_thread(&self, page: DevicePage, to: &mut InThreadFill<'_>) -> bool {
        if self.shared.algorithm != Algorithm::Lz4 {
            return false;
        }
        HANDLER_SCRATCH.with(|s| {
            let Ok(mut s) = s.try_borrow_mut() else { return false };
            let Scratch { packed, page: out } = &mut *s;
            match self.shared.get(page, packed, out) {
                Ok(()) => to.write(out),
                Err(_) => false,
            }
        })
    }
}

// ---- the engine ----------------------------------------------------------------------

/// Empty slabs kept for reuse; the housekeeping thread gives the rest back.
const KEEP_EMPTY_SLABS: usize = 16;

/// Worker threads that compress pages into the store and decompress them
/// into their addresses.
struct Engine {
    workers: Workers,
}

impl Engine {
    fn new(shared: Arc<Shared>, workers: usize, name: &str) -> std::io::Result<Self> {
        let workers = Workers::new(workers, &format!("hmm-z-{name}"), move |part| match part {
            JobPart::ToDevice(ops) => to_device(&shared, ops),
            JobPart::ToSystem { copies, sink } => to_system(&shared, sink, copies),
        })?;
        Ok(Self { workers })
    }
}

/// Compresses each of `ops` into its device page.
fn to_device(shared: &Shared, ops: &[ToDevice]) -> Vec<Result<(), DmaError>> {
    let mut page = vec![0u8; PAGE_SIZE];
    let mut packed = vec![0u8; PACKED_BYTES];
    ops.iter()
        .map(|op| match op.src.bytes() {
            None => {
                shared.store().put_zero(op.dst.index);
                Ok(())
            }
            Some((m, offset)) => match m.read(offset, &mut page) {
                Ok(()) => shared.put(op.dst, &page, &mut packed),
                Err(e) => Err(DmaError::Failed(format!("reading the source: {e}"))),
            },
        })
        .collect()
}

/// Decompresses each of `copies` into its address: each run of consecutive
/// addresses in one `UFFDIO_COPY`.
fn to_system(shared: &Shared, sink: &SystemSink, copies: &[ToSystem]) -> Vec<Result<(), DmaError>> {
    let mut out = Vec::with_capacity(copies.len());
    let mut packed = vec![0u8; PAGE_SIZE];
    let mut i = 0;
    while i < copies.len() {
        let mut j = i + 1;
        while j < copies.len() && copies[j].dst.get() == copies[j - 1].dst.get() + PAGE_SIZE {
            j += 1;
        }
        let mut run = vec![0u8; (j - i) * PAGE_SIZE];
        let got: Vec<Result<(), DmaError>> = copies[i..j]
            .iter()
            .zip(run.chunks_exact_mut(PAGE_SIZE))
            .map(|(c, page)| shared.get(c.src, &mut packed, page).map_err(|e| e.into_dma(c.src)))
            .collect();
        // Runs of pages that decompressed, each installed whole.
        let mut k = 0;
        while k < got.len() {
            if let Err(e) = &got[k] {
                out.push(Err(e.clone()));
                k += 1;
                continue;
            }
            let mut l = k + 1;
            while l < got.len() && got[l].is_ok() {
                l += 1;
            }
            out.extend(sink.install_bytes(copies[i + k].dst, &run[k * PAGE_SIZE..l * PAGE_SIZE]));
            k = l;
        }
        i = j;
    }
    out
}

/// The housekeeping thread: gives back the memory of empty slabs beyond
/// [`KEEP_EMPTY_SLABS`], every 50 ms while there are more (pages are freed
/// by `page_free`, which may run in a signal handler and frees no memory).
fn housekeeping(shared: Arc<Shared>) {
    let mut stop = shared.stop.lock().unwrap_or_else(|e| e.into_inner());
    while !*stop {
        stop = shared
            .stop_cv
            .wait_timeout(stop, std::time::Duration::from_millis(50))
            .unwrap_or_else(|e| e.into_inner())
            .0;
        let mut store = shared.store();
        if store.empty_slabs() > KEEP_EMPTY_SLABS {
            store.trim(KEEP_EMPTY_SLABS);
        }
    }
}

impl DmaEngine for Engine {
    fn name(&self) -> &str {
        "compress"
    }

    fn submit(&self, job: DmaJob) -> DmaFence {
        self.workers.submit(job)
    }
}

// ---- the device ----------------------------------------------------------------------

/// A compressed-memory tier (see the crate docs).
pub struct CompressedDevice {
    hmm: HmmHandle,
    mem: Arc<DeviceMemory>,
    core: Arc<Core>,
    keeper: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for CompressedDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CompressedDevice")
            .field("name", &self.mem.name())
            .field("algorithm", &self.core.shared.algorithm)
            .field("stats", &self.stats())
            .finish()
    }
}

impl CompressedDevice {
    /// Creates a device and registers its memory with `hmm`. Bad
    /// configuration fails here, saying what to change.
    pub fn new(hmm: &Hmm, config: CompressedConfig) -> Result<Self, HmmError> {
        config.check()?;
        let budget = config.capacity.div_ceil(PAGE_SIZE) * PAGE_SIZE;
        let pages = config.max_pages.unwrap_or(8 * budget / PAGE_SIZE);
        let pages = u32::try_from(pages).ok().filter(|p| *p < u32::MAX).ok_or_else(|| {
            HmmError::Config(format!(
                "compressed device {:?}: room for {pages} pages, more than a device can number",
                config.name
            ))
        })?;
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::new(budget, pages as usize, config.threshold)),
            algorithm: config.algorithm,
            threshold: config.threshold,
            capacity: budget as u64,
            declined: AtomicU64::new(0),
            full: AtomicU64::new(0),
            stop: Mutex::new(false),
            stop_cv: std::sync::Condvar::new(),
        });
        let keeper = {
            let s = shared.clone();
            std::thread::Builder::new()
                .name(format!("hmm-z-{}-keep", config.name))
                .spawn(move || housekeeping(s))
                .map_err(HmmError::Thread)?
        };
        let engine =
            Engine::new(shared.clone(), config.workers, &config.name).map_err(HmmError::Thread)?;
        let core = Arc::new(Core { shared, engine });
        let mc = DeviceMemoryConfig::private(config.name, pages as usize * PAGE_SIZE);
        let mem = hmm.register_device_memory(mc, core.clone())?;
        Ok(Self { hmm: hmm.handle(), mem, core, keeper: Some(keeper) })
    }

    /// The device's memory region.
    pub fn memory(&self) -> &Arc<DeviceMemory> {
        &self.mem
    }

    /// The compression.
    pub fn algorithm(&self) -> Algorithm {
        self.core.shared.algorithm
    }

    /// Compresses the pages of `range` that are in system memory into the
    /// device. Pages declined (incompressible) or refused (no room) stay in
    /// system memory, each with its reason in the report.
    pub fn migrate_to_device(&self, range: PageRange) -> Result<MigrationReport, HmmError> {
        self.hmm.migrate_to_device(range, &self.mem, self.mem.ops().dma())
    }

    /// Brings the device's pages in `range` back to system memory.
    pub fn migrate_to_system(&self, range: PageRange) -> Result<MigrationReport, HmmError> {
        self.hmm.migrate_to_system(range, &self.mem, self.mem.ops().dma())
    }

    /// What the device holds now.
    pub fn stats(&self) -> CompressedStats {
        let s = &self.core.shared;
        let u = s.store().usage();
        CompressedStats {
            stored_pages: u.stored_pages,
            zero_pages: u.zero_pages,
            compressed_bytes: u.compressed_bytes,
            footprint_bytes: u.footprint_bytes,
            held_bytes: u.held_bytes,
            capacity_bytes: s.capacity,
            declined_pages: s.declined.load(Ordering::Relaxed),
            full_pages: s.full.load(Ordering::Relaxed),
        }
    }
}

impl Drop for CompressedDevice {
    fn drop(&mut self) {
        // The workers stop once no page is left on the device; if some
        // could not be brought back, hmm keeps the engine (and them) alive.
        match self.hmm.unregister_device_memory(&self.mem) {
            Ok(()) => self.core.engine.workers.stop(),
            Err(e) => tracing::error!(error = %e, "releasing a compressed device"),
        }
        let s = &self.core.shared;
        *s.stop.lock().unwrap_or_else(|e| e.into_inner()) = true;
        s.stop_cv.notify_all();
        if let Some(h) = self.keeper.take() {
            let _ = h.join();
        }
    }
}
