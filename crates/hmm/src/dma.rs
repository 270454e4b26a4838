//! DMA engines: asynchronous batched copies between system and device memory.
//!
//! A migration hands its engine one [`DmaJob`] per phase and waits on the
//! [`DmaFence`] it gets back; each copy of the job completes with its own
//! result, so a failure costs only the pages it touched.
//!
//! The system side of a copy is never a managed address the engine could
//! fault on:
//! - towards a device, the source is a page that setup moved out of the
//!   managed range into hmm's own staging memory ([`SystemSource::Staged`]),
//!   or nothing at all for a page that was never populated ([`SystemSource::Zero`]);
//! - towards system memory, the engine installs the data at the managed
//!   address through the kernel ([`SystemSink`]: `UFFDIO_COPY` or
//!   `UFFDIO_MOVE` into the absent page), so it never touches the address itself.

use std::fmt;
use std::sync::{Arc, Mutex};

use crate::addr::{PAGE_SIZE, PageRange, VirtAddr};
use crate::os::mm::Mapping;
use rustix::io::Errno;

use crate::os::uffd::{FillError, FillErrorKind, FillOp, Uffd};
use crate::page::DevicePage;

/// Where the data for a device page comes from.
#[derive(Debug, Clone)]
pub enum SystemSource {
    /// The page was never populated: the device page must read as zeros.
    Zero,
    /// The page's data, isolated in staging memory at `offset`.
    Staged {
        /// hmm's staging mapping (private anonymous, never managed).
        staging: Arc<Mapping>,
        /// Byte offset of the page in it.
        offset: usize,
    },
    /// The page's data in another device's memory, as that device offers it
    /// to peers ([`DevicePagemapOps::peer_memory`]): a device-to-device copy,
    /// with no stop in system memory. Only sent to engines that
    /// [`reads_peers`](DmaEngine::reads_peers).
    ///
    /// [`DevicePagemapOps::peer_memory`]: crate::devmem::DevicePagemapOps::peer_memory
    Peer {
        /// The other device's memory.
        memory: Arc<Mapping>,
        /// Byte offset of the page in it.
        offset: usize,
        /// The other device's page (its reference stays with the migration).
        page: DevicePage,
    },
}

impl SystemSource {
    /// The mapping and offset holding the data, unless it is zeros.
    pub fn bytes(&self) -> Option<(&Arc<Mapping>, usize)> {
        match self {
            SystemSource::Zero => None,
            SystemSource::Staged { staging, offset } => Some((staging, *offset)),
            SystemSource::Peer { memory, offset, .. } => Some((memory, *offset)),
        }
    }
}

/// One page towards a device.
#[derive(Debug, Clone)]
pub struct ToDevice {
    /// The data.
    pub src: SystemSource,
    /// The device page to fill (allocated, referenced by the migration).
    pub dst: DevicePage,
}

/// One page towards system memory.
#[derive(Debug, Clone, Copy)]
pub struct ToSystem {
    /// The device page holding the data.
    pub src: DevicePage,
    /// The managed address to install it at (absent while the migration runs).
    pub dst: VirtAddr,
}

/// A batch of copies in one direction.
#[derive(Debug)]
pub enum DmaJob {
    /// System (or zero) to device.
    ToDevice(Vec<ToDevice>),
    /// Device to system, installed through `sink`.
    ToSystem {
        /// The copies.
        copies: Vec<ToSystem>,
        /// Installs pages at managed addresses.
        sink: Arc<SystemSink>,
    },
}

impl DmaJob {
    /// Number of copies.
    pub fn len(&self) -> usize {
        match self {
            DmaJob::ToDevice(v) => v.len(),
            DmaJob::ToSystem { copies, .. } => copies.len(),
        }
    }

    /// Whether the job is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Why one copy failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DmaError {
    /// System memory could not be had for the destination.
    #[error("out of system memory")]
    NoMemory,
    /// The device failed: its memory cannot be read or written.
    #[error("device failed")]
    DeviceFailed,
    /// The destination address was populated behind the migration.
    #[error("destination already populated")]
    Exists,
    /// The address space was changing (an unmap, discard, remap or fork
    /// whose event the fault service had not read yet) for as long as the
    /// install was tried: nothing was installed, and a later try may succeed.
    #[error("the address space was changing")]
    Changing,
    /// The device declined the page (a compressed tier's page that would
    /// not compress enough, say): it stays where it was, reported
    /// [`SkipReason::Declined`](crate::SkipReason::Declined) with the reason.
    #[error("declined by the device: {0}")]
    Declined(String),
    /// The device had no room left for the page (a page was allocated for it,
    /// but what the device stores it in ran out: a compressed tier's
    /// compressed bytes, say): it stays where it was, reported
    /// [`SkipReason::NoDeviceMemory`](crate::SkipReason::NoDeviceMemory).
    #[error("the device is full")]
    DeviceFull,
    /// Anything else, with what the engine knows.
    #[error("{0}")]
    Failed(String),
}

impl From<FillError> for DmaError {
    fn from(e: FillError) -> Self {
        match e.kind {
            FillErrorKind::NoMemory => DmaError::NoMemory,
            FillErrorKind::Exists => DmaError::Exists,
            FillErrorKind::Again => DmaError::Changing,
            _ => DmaError::Failed(e.to_string()),
        }
    }
}

/// A DMA engine.
pub trait DmaEngine: Send + Sync {
    /// A short name for reports ("copy", "zero-copy").
    fn name(&self) -> &str;

    /// Starts `job`; returns at once (or after copying synchronously) with a
    /// fence that completes when every copy has a result, in the job's
    /// order. May run on the fault service (a fault-back) and on any
    /// application thread: it keeps the rules of
    /// [`DevicePagemapOps`](crate::DevicePagemapOps) (never waits for the
    /// fault service, never touches managed addresses with the CPU: pages
    /// reach system memory only through the job's [`SystemSink`]). A copy
    /// that fails reports why ([`DmaError`]): `NoMemory` and `Changing`
    /// (the sink met an address-space change being reported) are tried
    /// again by hmm; any other error is final for that page, and the
    /// migration leaves the page where it was.
    fn submit(&self, job: DmaJob) -> DmaFence;

    /// Whether the engine can copy straight from another device's memory
    /// ([`SystemSource::Peer`]). Without it (the default), pages move between
    /// devices through system memory.
    fn reads_peers(&self) -> bool {
        false
    }

    /// Whether a copy into device memory leaves its source as it was (a
    /// DMA engine copies; the default). An engine that moves pages out of
    /// the source says `false`: a page it filled has its only copy on the
    /// device, so a device that fails before the migration commits loses it
    /// (see [`Migration::finalize`](crate::Migration::finalize)).
    fn keeps_sources(&self) -> bool {
        true
    }
}

/// Copies `copies` to system memory with `engine`, submitting again those
/// that found no memory for their page (`DmaError::NoMemory`: a memory
/// cgroup at its limit, say) or the address space changing
/// (`DmaError::Changing`), after a pause that doubles from 2 ms up to
/// 100 ms, for as long as `again(round)` says (round 1 is the first retry;
/// it may also let the fault service catch up). Other results are final.
/// Returns one result per copy, in order.
pub(crate) fn copy_to_system_retrying(
    engine: &dyn DmaEngine,
    sink: &Arc<SystemSink>,
    copies: &[ToSystem],
    mut again: impl FnMut(u32) -> bool,
) -> Vec<Result<(), DmaError>> {
    let mut results: Vec<Result<(), DmaError>> = vec![Err(DmaError::NoMemory); copies.len()];
    let mut pause = std::time::Duration::from_millis(2);
    let retry =
        |r: &Result<(), DmaError>| matches!(r, Err(DmaError::NoMemory) | Err(DmaError::Changing));
    for round in 0u32.. {
        let todo: Vec<usize> = (0..copies.len()).filter(|k| retry(&results[*k])).collect();
        if todo.is_empty() || (round > 0 && !again(round)) {
            break;
        }
        if round > 0 {
            std::thread::sleep(pause);
            pause = (pause * 2).min(std::time::Duration::from_millis(100));
        }
        let job = DmaJob::ToSystem {
            copies: todo.iter().map(|k| copies[*k]).collect(),
            sink: sink.clone(),
        };
        for (k, r) in todo.into_iter().zip(engine.submit(job).wait()) {
            results[k] = r;
        }
    }
    results
}

struct FenceState {
    remaining: usize,
    results: Vec<Result<(), DmaError>>,
}

struct FenceInner {
    state: Mutex<FenceState>,
    done: crate::sync::Signal,
}

/// Completion of a submitted job.
pub struct DmaFence(Arc<FenceInner>);

/// The engine's side of a fence: reports each copy's result once.
#[derive(Clone)]
pub struct FenceCompleter(Arc<FenceInner>);

impl fmt::Debug for FenceCompleter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("FenceCompleter")
    }
}

impl fmt::Debug for DmaFence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = self.0.state.lock().unwrap_or_else(|e| e.into_inner());
        f.debug_struct("DmaFence").field("remaining", &s.remaining).finish()
    }
}

impl DmaFence {
    /// A fence for `n` copies, and the completer the engine reports through.
    pub fn new(n: usize) -> (DmaFence, FenceCompleter) {
        let inner = Arc::new(FenceInner {
            state: Mutex::new(FenceState {
                remaining: n,
                // Every slot is overwritten before `wait` returns.
                results: vec![Ok(()); n],
            }),
            done: crate::sync::Signal::new(),
        });
        (DmaFence(inner.clone()), FenceCompleter(inner))
    }

    /// Waits for every copy; returns their results in job order.
    pub fn wait(self) -> Vec<Result<(), DmaError>> {
        let s = self.0.state.lock().unwrap_or_else(|e| e.into_inner());
        let mut s = self.0.done.wait_while(s, |s| s.remaining > 0);
        std::mem::take(&mut s.results)
    }
}

impl FenceCompleter {
    /// Reports the results of copies `first..first + results.len()`.
    pub fn complete(&self, first: usize, results: Vec<Result<(), DmaError>>) {
        let mut s = self.0.state.lock().unwrap_or_else(|e| e.into_inner());
        let n = results.len();
        for (slot, r) in s.results[first..first + n].iter_mut().zip(results) {
            *slot = r;
        }
        s.remaining -= n;
        if s.remaining == 0 {
            self.0.done.notify_all();
        }
    }
}

/// Installs pages at managed addresses through the kernel, without waking
/// waiters: the migration wakes them once its pages are committed.
#[derive(Debug)]
pub struct SystemSink {
    uffd: Arc<Uffd>,
    /// Whether pages may be moved in. Not into a forked child: `UFFDIO_MOVE`
    /// works within one address space, and the device page must stay.
    moves: bool,
    /// Whether an install waits out an address-space change being reported
    /// (the kernel refuses fills with `EAGAIN` until the fault service has
    /// read the change's event). Not for copies the fault service itself
    /// waits on: the event waits for the service, which would wait for the
    /// copy, which would wait for the event.
    waits: bool,
}

impl SystemSink {
    pub(crate) fn new(uffd: Arc<Uffd>) -> Self {
        Self { uffd, moves: true, waits: true }
    }

    /// The sink of the fault service's own migrations (fault-backs): an
    /// install that meets an address-space change being reported fails at
    /// once with [`DmaError::Changing`], whichever thread runs it, so the
    /// service never waits on a copy that waits on the service. The
    /// fault-back then wakes its thread, which faults again once the
    /// service has read the event.
    pub(crate) fn for_service(uffd: Arc<Uffd>) -> Self {
        Self { uffd, moves: true, waits: false }
    }

    /// A sink that only copies, into the address space behind `uffd` (a
    /// forked child's descriptor): the device pages keep their data.
    pub(crate) fn copy_only(uffd: Arc<Uffd>) -> Self {
        Self { uffd, moves: false, waits: true }
    }

    /// Whether [`install_move`](Self::install_move) may move pages; engines
    /// copy when it may not.
    pub fn moves(&self) -> bool {
        self.moves
    }

    /// Copies `pages` pages from `src` at `src_offset` into the absent pages at `dst`
    /// (`UFFDIO_COPY`). Returns one result per page.
    pub fn install_copy(
        &self,
        dst: VirtAddr,
        src: &Mapping,
        src_offset: usize,
        pages: usize,
    ) -> Vec<Result<(), DmaError>> {
        self.install(FillOp::Copy, dst, src, src_offset, pages)
    }

    /// Moves `pages` pages of `src` at `src_offset` into the absent pages at `dst`
    /// (`UFFDIO_MOVE`, zero-copy). The source must be private anonymous and
    /// writable like the destination; refusals come back per page for the caller
    /// to copy instead (every page, when the sink does not [`moves`](Self::moves)).
    pub fn install_move(
        &self,
        dst: VirtAddr,
        src: &Mapping,
        src_offset: usize,
        pages: usize,
    ) -> Vec<Result<(), DmaError>> {
        if !self.moves {
            return vec![Err(DmaError::Failed("this sink only copies".into())); pages];
        }
        self.install(FillOp::Move, dst, src, src_offset, pages)
    }

    /// `install_copy` or `install_move`, by `op`.
    fn install(
        &self,
        op: FillOp,
        dst: VirtAddr,
        src: &Mapping,
        src_offset: usize,
        pages: usize,
    ) -> Vec<Result<(), DmaError>> {
        per_page(dst, pages, self.waits, |d, done| {
            let s = src
                .subrange(src_offset + done, d.len())
                .map_err(|_| FillError::refused(op, d.len(), Errno::INVAL))?;
            match op {
                FillOp::Move => self.uffd.move_pages(d, src, s, true, false),
                _ => self.uffd.copy_from(d, src, s, true),
            }
            .map(drop)
        })
    }

    /// Copies `bytes` (whole pages, a buffer of the engine's: pages it
    /// decompressed or received, say) into the absent pages at `dst`
    /// (`UFFDIO_COPY`). Returns one result per page.
    pub fn install_bytes(&self, dst: VirtAddr, bytes: &[u8]) -> Vec<Result<(), DmaError>> {
        let pages = bytes.len() / PAGE_SIZE;
        if !bytes.len().is_multiple_of(PAGE_SIZE) {
            return vec![Err(DmaError::Failed("not whole pages".into())); pages.max(1)];
        }
        per_page(dst, pages, self.waits, |d, done| {
            self.uffd.copy(d, &bytes[done..done + d.len()], true, false).map(drop)
        })
    }

    /// Maps the zero page at the absent pages at `dst` (`UFFDIO_ZEROPAGE`).
    pub fn install_zero(&self, dst: VirtAddr, pages: usize) -> Vec<Result<(), DmaError>> {
        per_page(dst, pages, self.waits, |d, _| self.uffd.zeropage(d, true).map(drop))
    }
}

/// Runs `op` over `pages` pages from `dst`: one ioctl for the whole run while it
/// succeeds, continuing after a page that fails; `op` gets the remaining range
/// and the bytes already done. Returns one result per page.
///
/// The kernel reports how many bytes an ioctl completed before failing; the
/// page at that point failed with the reported reason. `EAGAIN` with progress
/// just continues; `EAGAIN` with none means an address-space change is being
/// reported to the fault service, so the call is retried (a bounded number of
/// times) once it has had a chance to read it. Unless `wait_out_changes` is
/// false (a copy the fault service waits on, see [`SystemSink::for_service`]):
/// then the rest fails at once with [`DmaError::Changing`].
fn per_page(
    dst: VirtAddr,
    pages: usize,
    wait_out_changes: bool,
    mut op: impl FnMut(PageRange, usize) -> Result<(), FillError>,
) -> Vec<Result<(), DmaError>> {
    const MAX_AGAIN: u32 = 10_000;
    let mut out: Vec<Result<(), DmaError>> = Vec::with_capacity(pages);
    let mut again = 0;
    // One page at a time after the kernel found no registered area for the
    // whole rest: a fill cannot cross from one area into the next.
    let mut single = false;
    while out.len() < pages {
        let done = out.len() * PAGE_SIZE;
        let n = if single { 1 } else { pages - out.len() };
        let Ok(rest) = PageRange::from_pages(VirtAddr::new(dst.get() + done), n) else {
            out.resize(pages, Err(DmaError::Failed("range overflow".into())));
            break;
        };
        match op(rest, done) {
            Ok(()) if single => {
                out.push(Ok(()));
                single = false;
            }
            Ok(()) => out.resize(pages, Ok(())),
            Err(e) if e.kind == FillErrorKind::NotRegistered && !single && rest.pages() > 1 => {
                let ok_pages = (e.done / PAGE_SIZE).min(rest.pages());
                out.extend((0..ok_pages).map(|_| Ok(())));
                single = true;
            }
            Err(e) => {
                single = false;
                let ok_pages = (e.done / PAGE_SIZE).min(rest.pages());
                out.extend((0..ok_pages).map(|_| Ok(())));
                if e.kind == FillErrorKind::Again {
                    if ok_pages == 0 && !wait_out_changes {
                        out.resize(pages, Err(DmaError::Changing));
                        break;
                    }
                    if ok_pages == 0 {
                        again += 1;
                        if again > MAX_AGAIN {
                            out.push(Err(DmaError::Changing));
                        } else {
                            std::thread::yield_now();
                        }
                    }
                    continue;
                }
                if out.len() < pages {
                    out.push(Err(e.into()));
                }
            }
        }
    }
    out
}

/// One part of a job a [`Workers`] pool hands to its copy function.
#[derive(Debug, Clone, Copy)]
pub enum JobPart<'a> {
    /// Copies towards the device.
    ToDevice(&'a [ToDevice]),
    /// Copies towards system memory, installed through `sink`.
    ToSystem {
        /// The copies.
        copies: &'a [ToSystem],
        /// The job's sink.
        sink: &'a Arc<SystemSink>,
    },
}

type Work = Box<dyn FnOnce() + Send>;
type CopyFn = dyn Fn(JobPart<'_>) -> Vec<Result<(), DmaError>> + Send + Sync;

/// Worker threads that an engine splits its jobs between: a job of at most
/// [`INLINE_PAGES`](Self::INLINE_PAGES) copies runs on the submitting
/// thread (a slice for a worker is never smaller, so a hand-off would buy
/// no parallelism, only two thread wake-ups: a fault-back of one page then
/// wakes no thread but the faulting one); a larger one is split into one
/// part per worker, each completing its share of the fence. The engine's
/// copy function does the copies of a part, in order.
pub struct Workers {
    copy: Arc<CopyFn>,
    queue: Mutex<Option<std::sync::mpsc::Sender<Work>>>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    count: usize,
}

impl fmt::Debug for Workers {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Workers").field("count", &self.count).finish()
    }
}

impl Workers {
    /// Jobs of at most this many copies run on the submitting thread.
    pub const INLINE_PAGES: usize = 16;

    /// Starts `count` (at least 1) threads named `{name}-{n}`, which run
    /// `copy` on the parts of the jobs [`submit`](Self::submit) splits.
    pub fn new(
        count: usize,
        name: &str,
        copy: impl Fn(JobPart<'_>) -> Vec<Result<(), DmaError>> + Send + Sync + 'static,
    ) -> std::io::Result<Self> {
        let count = count.max(1);
        let (tx, rx) = std::sync::mpsc::channel::<Work>();
        let rx = Arc::new(Mutex::new(rx));
        let mut threads = Vec::with_capacity(count);
        for n in 0..count {
            let rx = rx.clone();
            threads.push(std::thread::Builder::new().name(format!("{name}-{n}")).spawn(
                move || {
                    loop {
                        let work = rx.lock().unwrap_or_else(|e| e.into_inner()).recv();
                        match work {
                            Ok(work) => work(),
                            Err(_) => return,
                        }
                    }
                },
            )?);
        }
        Ok(Self {
            copy: Arc::new(copy),
            queue: Mutex::new(Some(tx)),
            threads: Mutex::new(threads),
            count,
        })
    }

    /// Runs `job` (see the type's docs); the fence completes when every
    /// part has. After [`stop`](Self::stop), a job too large to run here
    /// fails with "the engine stopped".
    pub fn submit(&self, job: DmaJob) -> DmaFence {
        let n = job.len();
        let (fence, done) = DmaFence::new(n);
        if n <= Self::INLINE_PAGES {
            let res = match &job {
                DmaJob::ToDevice(ops) => (self.copy)(JobPart::ToDevice(ops)),
                DmaJob::ToSystem { copies, sink } => {
                    (self.copy)(JobPart::ToSystem { copies, sink })
                }
            };
            done.complete(0, res);
            return fence;
        }
        let per = n.div_ceil(self.count).max(Self::INLINE_PAGES);
        let queue = self.queue.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let job = Arc::new(job);
        for first in (0..n).step_by(per) {
            let len = per.min(n - first);
            let (job, copy, d) = (job.clone(), self.copy.clone(), done.clone());
            let work: Work = Box::new(move || {
                let part = match &*job {
                    DmaJob::ToDevice(ops) => JobPart::ToDevice(&ops[first..first + len]),
                    DmaJob::ToSystem { copies, sink } => {
                        JobPart::ToSystem { copies: &copies[first..first + len], sink }
                    }
                };
                d.complete(first, copy(part));
            });
            if queue.as_ref().is_none_or(|q| q.send(work).is_err()) {
                done.complete(first, vec![Err(DmaError::Failed("the engine stopped".into())); len]);
            }
        }
        fence
    }

    /// Stops the threads once the parts queued are done.
    pub fn stop(&self) {
        self.queue.lock().unwrap_or_else(|e| e.into_inner()).take();
        for t in self.threads.lock().unwrap_or_else(|e| e.into_inner()).drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A job of a few copies runs on the submitting thread; a larger one is
    /// split between the workers, and its results come back in job order.
    #[test]
    fn workers_run_small_jobs_here_and_split_large_ones_in_order() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let s = seen.clone();
        let w = Workers::new(2, "test-w", move |part| {
            let JobPart::ToDevice(ops) = part else { panic!("only ToDevice here") };
            let me = std::thread::current().name().unwrap_or("").to_string();
            s.lock().unwrap().push((me, ops.len()));
            ops.iter()
                .map(|op| match op.dst.index % 3 {
                    0 => Ok(()),
                    _ => Err(DmaError::Failed(format!("{}", op.dst.index))),
                })
                .collect()
        })
        .unwrap();
        let job = |n: u32| {
            DmaJob::ToDevice(
                (0..n)
                    .map(|index| ToDevice {
                        src: SystemSource::Zero,
                        dst: DevicePage { dev: crate::page::DeviceId(0), index },
                    })
                    .collect(),
            )
        };
        let want = |n: u32| -> Vec<Result<(), DmaError>> {
            (0..n)
                .map(|i| if i % 3 == 0 { Ok(()) } else { Err(DmaError::Failed(format!("{i}"))) })
                .collect()
        };
        let here = std::thread::current().name().unwrap_or("").to_string();
        assert_eq!(w.submit(job(5)).wait(), want(5));
        assert_eq!(seen.lock().unwrap().as_slice(), &[(here.clone(), 5)], "run on this thread");
        seen.lock().unwrap().clear();
        assert_eq!(w.submit(job(100)).wait(), want(100));
        let parts = seen.lock().unwrap().clone();
        assert_eq!(parts.iter().map(|(_, n)| n).sum::<usize>(), 100);
        assert!(
            parts.len() == 2 && parts.iter().all(|(t, _)| t.starts_with("test-w-")),
            "{parts:?}"
        );
        w.stop();
        let stopped = w.submit(job(40)).wait();
        assert!(
            stopped
                .iter()
                .all(|r| matches!(r, Err(DmaError::Failed(m)) if m.contains("engine stopped")))
        );
    }

    #[test]
    fn fence_collects_results_in_order_from_many_threads() {
        let (fence, done) = DmaFence::new(6);
        let hs: Vec<_> = (0..3)
            .map(|t| {
                let done = done.clone();
                std::thread::spawn(move || {
                    let r = if t == 1 { Err(DmaError::NoMemory) } else { Ok(()) };
                    done.complete(t * 2, vec![r.clone(), r]);
                })
            })
            .collect();
        // Joined first: a completer that panicked fails the test here
        // instead of leaving the fence waiting for ever.
        for h in hs {
            h.join().unwrap();
        }
        let results = fence.wait();
        assert_eq!(results.len(), 6);
        assert!(results[..2].iter().all(Result::is_ok));
        assert_eq!(results[2], Err(DmaError::NoMemory));
        assert_eq!(results[3], Err(DmaError::NoMemory));
        assert!(results[4..].iter().all(Result::is_ok));
    }

    #[test]
    fn per_page_continues_after_a_failing_page() {
        let base = VirtAddr::new(0x10_0000);
        let bad = base.get() + 2 * PAGE_SIZE;
        let mut calls = 0;
        let out = per_page(base, 5, true, |r, _| {
            calls += 1;
            if r.contains(VirtAddr::new(bad)) {
                let done = bad - r.start().get();
                Err(FillError { done, ..FillError::refused(FillOp::Copy, r.len(), Errno::EXIST) })
            } else {
                Ok(())
            }
        });
        assert_eq!(out.len(), 5);
        assert_eq!(out.iter().filter(|r| r.is_err()).count(), 1);
        assert_eq!(out[2], Err(DmaError::Exists));
        assert_eq!(calls, 2, "one call up to the failure, one for the rest");
    }

    /// An address-space change being reported (`EAGAIN`, nothing done):
    /// waited out by default, given up on at once for a copy the fault
    /// service waits on, which is the one that must read the change.
    #[test]
    fn per_page_gives_up_on_a_changing_address_space_only_when_told() {
        let base = VirtAddr::new(0x10_0000);
        let again = |r: PageRange| FillError::refused(FillOp::Copy, r.len(), Errno::AGAIN);
        let mut calls = 0;
        let out = per_page(base, 4, false, |r, done| {
            calls += 1;
            if done == 0 { Err(FillError { done: PAGE_SIZE, ..again(r) }) } else { Err(again(r)) }
        });
        assert_eq!(out[0], Ok(()), "the page done before the refusal counts");
        assert!(out[1..].iter().all(|r| *r == Err(DmaError::Changing)), "{out:?}");
        assert_eq!(calls, 2, "no retry without progress");
        let mut calls = 0;
        let out = per_page(base, 2, true, |r, _| {
            calls += 1;
            if calls < 5 { Err(again(r)) } else { Ok(()) }
        });
        assert!(out.iter().all(Result::is_ok), "waited out: {out:?}");
        assert_eq!(calls, 5);
    }
}
