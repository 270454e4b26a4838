//! The built-in software device: device-private memory backed by an anonymous
//! mapping hmm owns, with one of two DMA engines.
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

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::addr::{HUGE_PAGE_SIZE, PAGE_SIZE, PageRange};
use crate::devmem::{DeviceMemory, DeviceMemoryConfig, DevicePagemapOps, DeviceStats};
use crate::dma::{
    DmaEngine, DmaError, DmaFence, DmaJob, FenceCompleter, SystemSource, ToDevice, ToSystem,
};
use crate::migrate::MigrationReport;
use crate::os::mm::{Advise, Mapping, Protection};
use crate::os::uffd::{Features, FillErrorKind, RegisterMode, Uffd, UffdOptions};
use crate::page::{DevicePage, Residency};
use crate::space::{Hmm, HmmError, Inner};

/// Which DMA engine a software device uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EngineKind {
    /// Worker threads copy the pages.
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
}

impl SoftwareDeviceConfig {
    /// A device of `capacity` bytes with the zero-copy engine.
    pub fn new(name: impl Into<String>, capacity: usize) -> Self {
        Self { name: name.into(), capacity, engine: EngineKind::ZeroCopy, prefault: false }
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
}

impl DevicePagemapOps for Core {
    fn page_free(&self, _page: DevicePage) {
        // Nothing to do now. The zero-copy engine empties a freed page that
        // still holds one (it came back by copy) when the page is next filled:
        // emptying costs a TLB shootdown, which has no place on the path of a
        // CPU fault.
    }

    fn dma(&self) -> &dyn DmaEngine {
        self.engine.as_ref()
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
pub struct SoftwareDevice {
    hmm: Arc<Inner>,
    mem: Arc<DeviceMemory>,
    core: Arc<CoreHandle>,
}

/// The `Arc`-shared pieces the engines point into.
struct CoreHandle {
    pool: Arc<Mapping>,
    fail_to_system: Arc<AtomicU32>,
}

impl std::fmt::Debug for SoftwareDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SoftwareDevice").field("mem", &self.mem).finish_non_exhaustive()
    }
}

impl SoftwareDevice {
    /// Creates a device and registers its memory with `hmm`.
    pub fn new(hmm: &Hmm, config: SoftwareDeviceConfig) -> Result<Self, HmmError> {
        // Aligned to 2 MiB, so that device pages allocated in aligned runs of
        // 512 can hold a transparent huge page whole (moved in and out as one
        // PMD by the zero-copy engine).
        let pool = Arc::new(Mapping::anonymous_aligned(
            config.capacity,
            HUGE_PAGE_SIZE,
            Protection::ReadWrite,
        )?);
        let fail_to_system = Arc::new(AtomicU32::new(0));
        let engine: Box<dyn DmaEngine> = match config.engine {
            EngineKind::Copy { workers } => {
                if config.prefault {
                    // Huge pages where the kernel has them: fewer TLB misses
                    // on the copy path.
                    pool.advise(pool.range(), Advise::HugePage)?;
                    pool.advise(pool.range(), Advise::PopulateWrite)?;
                }
                let e = CopyEngine::new(pool.clone(), workers.max(1), fail_to_system.clone())
                    .map_err(HmmError::Thread)?;
                Box::new(e)
            }
            EngineKind::ZeroCopy => {
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
                    fail_to_system: fail_to_system.clone(),
                    populated: Arc::new(Populated::new(config.capacity / PAGE_SIZE)),
                })
            }
        };
        let core = Arc::new(Core { engine });
        let mut mc = DeviceMemoryConfig::private(config.name, config.capacity);
        mc.chunk_pages = 512;
        let mem = hmm.register_device_memory(mc, core)?;
        Ok(Self {
            hmm: hmm.inner().clone(),
            mem,
            core: Arc::new(CoreHandle { pool, fail_to_system }),
        })
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

    /// Migrates this device's pages in `range` back to system memory.
    pub fn migrate_to_system(&self, range: PageRange) -> Result<MigrationReport, HmmError> {
        self.hmm.migrate_to_system(range, &self.mem, self.mem.ops().dma())
    }

    /// Reads `range` as the device sees it: its own pages from device memory,
    /// the rest through the CPU mapping (bringing back pages of other devices).
    pub fn read(&self, range: PageRange) -> Result<(Vec<u8>, OpCounters), HmmError> {
        let r = self.hmm.find_containing(range)?;
        let mut out = vec![0u8; range.len()];
        let mut c = OpCounters::default();
        let first = r.index(range.start());
        for k in 0..range.pages() {
            let buf = &mut out[k * PAGE_SIZE..(k + 1) * PAGE_SIZE];
            let local = {
                let t = r.lock();
                match t[first + k].residency() {
                    Residency::Device(p)
                        if p.dev == self.mem.id() && !t[first + k].is_migrating() =>
                    {
                        // The entry cannot change while the table is locked, so
                        // the device page stays allocated and populated.
                        self.core.pool.read(p.index as usize * PAGE_SIZE, buf)?;
                        true
                    }
                    _ => false,
                }
            };
            if !local {
                r.mapping().read((first + k) * PAGE_SIZE, buf)?;
            }
            c.cpages += 1;
        }
        Ok((out, c))
    }

    /// Evicts every page of this device back to system memory.
    pub fn release(&self) -> Result<(), HmmError> {
        self.hmm.evict_all(self.mem.id())
    }

    /// Makes the next device-memory allocation fail once.
    pub fn fail_next_alloc(&self) {
        self.mem.fail_next_allocs(1);
    }

    /// Makes the next `n` page copies towards system memory fail for lack of
    /// memory (the fault service then retries).
    pub fn fail_next_copies_to_system(&self, n: u32) {
        self.core.fail_to_system.store(n, Ordering::Release);
    }

    /// Marks the device failed: its pages are poisoned. Returns how many.
    pub fn fail(&self) -> usize {
        self.hmm.poison_device(self.mem.id())
    }

    /// Counters of the device's memory.
    pub fn stats(&self) -> DeviceStats {
        self.mem.stats()
    }
}

impl Drop for SoftwareDevice {
    fn drop(&mut self) {
        if !self.hmm.shut_down.load(Ordering::Acquire)
            && let Err(e) = self.hmm.release_device(self.mem.id())
        {
            tracing::error!(error = %e, "releasing a software device");
        }
    }
}

/// Takes one injected failure, if any is pending.
fn take_injected(counter: &AtomicU32) -> bool {
    counter.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| v.checked_sub(1)).is_ok()
}

// ---- the copying engine ----------------------------------------------------------------

type Work = Box<dyn FnOnce() + Send>;

/// Worker threads that copy pages between staging, device memory and their
/// addresses.
pub(crate) struct CopyEngine {
    pool: Arc<Mapping>,
    queue: Option<Sender<Work>>,
    workers: Vec<JoinHandle<()>>,
    fail_to_system: Arc<AtomicU32>,
}

impl CopyEngine {
    fn new(
        pool: Arc<Mapping>,
        workers: usize,
        fail_to_system: Arc<AtomicU32>,
    ) -> std::io::Result<Self> {
        let (tx, rx) = channel::<Work>();
        let rx = Arc::new(Mutex::new(rx));
        let mut handles = Vec::with_capacity(workers);
        for n in 0..workers {
            let rx: Arc<Mutex<Receiver<Work>>> = rx.clone();
            handles.push(std::thread::Builder::new().name(format!("hmm-dma-{n}")).spawn(
                move || {
                    loop {
                        let job = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                        match job {
                            Ok(job) => job(),
                            Err(_) => return,
                        }
                    }
                },
            )?);
        }
        Ok(Self { pool, queue: Some(tx), workers: handles, fail_to_system })
    }
}

impl Drop for CopyEngine {
    fn drop(&mut self) {
        self.queue = None;
        for h in self.workers.drain(..) {
            let _ = h.join();
        }
    }
}

fn to_device_copy(pool: &Mapping, op: &ToDevice) -> Result<(), DmaError> {
    let off = op.dst.index as usize * PAGE_SIZE;
    let r = match &op.src {
        SystemSource::Zero => pool.fill(off, PAGE_SIZE, 0),
        SystemSource::Staged { staging, offset } => {
            pool.copy_words_from(off, staging, *offset, PAGE_SIZE)
        }
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
    sink: &crate::dma::SystemSink,
    copies: &[ToSystem],
    fail: &AtomicU32,
    zero_copy: bool,
) -> (Vec<Result<(), DmaError>>, Vec<bool>) {
    let mut out = Vec::with_capacity(copies.len());
    let mut moved = Vec::with_capacity(copies.len());
    for (i, n) in runs(copies) {
        let injected = (0..n).filter(|_| take_injected(fail)).count();
        if injected > 0 {
            out.extend((0..n).map(|_| Err(DmaError::NoMemory)));
            moved.extend((0..n).map(|_| false));
            continue;
        }
        let off = copies[i].src.index as usize * PAGE_SIZE;
        if !(zero_copy && n >= MIN_MOVE_RUN) {
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

    fn submit(&self, job: DmaJob) -> DmaFence {
        let n = job.len();
        let (fence, done) = DmaFence::new(n);
        let workers = self.workers.len().max(1);
        // Split into one slice per worker, at least 16 pages each.
        let per = n.div_ceil(workers).max(16);
        let send = |work: Work, done: &FenceCompleter, first: usize, len: usize| {
            if let Some(q) = &self.queue
                && q.send(work).is_ok()
            {
                return;
            }
            done.complete(first, vec![Err(DmaError::Failed("engine stopped".into())); len]);
        };
        match job {
            DmaJob::ToDevice(ops) => {
                let ops = Arc::new(ops);
                for first in (0..n).step_by(per) {
                    let len = per.min(n - first);
                    let (ops, pool, d) = (ops.clone(), self.pool.clone(), done.clone());
                    let work: Work = Box::new(move || {
                        let res = ops[first..first + len]
                            .iter()
                            .map(|op| to_device_copy(&pool, op))
                            .collect();
                        d.complete(first, res);
                    });
                    send(work, &done, first, len);
                }
            }
            DmaJob::ToSystem { copies, sink } => {
                let copies = Arc::new(copies);
                for first in (0..n).step_by(per) {
                    let len = per.min(n - first);
                    let (c, pool, d, s, f) = (
                        copies.clone(),
                        self.pool.clone(),
                        done.clone(),
                        sink.clone(),
                        self.fail_to_system.clone(),
                    );
                    let work: Work = Box::new(move || {
                        let (res, _) =
                            to_system_copies(&pool, &s, &c[first..first + len], &f, false);
                        d.complete(first, res);
                    });
                    send(work, &done, first, len);
                }
            }
        }
        fence
    }
}

// ---- the zero-copy engine --------------------------------------------------------------

/// Moves pages with `UFFDIO_MOVE`; copies only what the kernel will not move.
pub(crate) struct MoveEngine {
    pool: Arc<Mapping>,
    uffd: Arc<Uffd>,
    fail_to_system: Arc<AtomicU32>,
    populated: Arc<Populated>,
}

impl MoveEngine {
    /// Moves staged pages into device memory, one ioctl per run of pages whose
    /// staging offsets and device pages both follow on; zero pages get the
    /// zero page; a run the kernel will not move is copied page by page.
    fn to_device(&self, ops: &[ToDevice]) -> Vec<Result<(), DmaError>> {
        let mut out = Vec::with_capacity(ops.len());
        let mut i = 0;
        while i < ops.len() {
            let SystemSource::Staged { staging, offset } = &ops[i].src else {
                let slot = slot_range(&self.pool, ops[i].dst);
                out.push(self.uffd.zeropage(slot, true).map(drop).map_err(DmaError::from));
                i += 1;
                continue;
            };
            let mut j = i + 1;
            while j < ops.len()
                && ops[j].dst.index == ops[j - 1].dst.index + 1
                && matches!(&ops[j].src, SystemSource::Staged { staging: s, offset: o }
                    if Arc::ptr_eq(s, staging) && *o == offset + (j - i) * PAGE_SIZE)
            {
                j += 1;
            }
            let n = j - i;
            let slots = self
                .pool
                .subrange(ops[i].dst.index as usize * PAGE_SIZE, n * PAGE_SIZE)
                .expect("device pages inside the pool");
            let src = staging.subrange(*offset, n * PAGE_SIZE).expect("inside staging");
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

    fn submit(&self, job: DmaJob) -> DmaFence {
        let (fence, done) = DmaFence::new(job.len());
        let res = match job {
            DmaJob::ToDevice(ops) => {
                // Marked before filling: a failed fill leaves at worst an empty
                // page that `page_free` empties again.
                self.empty_slots(&ops);
                ops.iter().for_each(|op| self.populated.set(op.dst.index, true));
                self.to_device(&ops)
            }
            DmaJob::ToSystem { copies, sink } => {
                let (res, moved) =
                    to_system_copies(&self.pool, &sink, &copies, &self.fail_to_system, true);
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
