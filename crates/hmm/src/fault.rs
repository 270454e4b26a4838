//! The fault service: one named thread per `Hmm` instance that reads the
//! userfaultfd and keeps the page records true.
//!
//! # What it serves
//!
//! - **A CPU touch of a device page**: the device's `migrate_to_ram` brings
//!   the faulting page back first (the thread is woken then), then the rest of
//!   the fault-around window (never crossing the managed range). A fault right
//!   at the end of the previous window is a sequential stream: its window
//!   doubles, up to 512 pages, and runs ahead of the fault, as readahead does.
//!   With fault-around off (`fault_around_pages` 1) only the faulting page
//!   comes back, stream or not. In a huge range the window is the 2 MiB block.
//! - **A first touch of a never-populated page**: the zero page is mapped over
//!   a window of never-populated pages around it (a write then takes an
//!   ordinary kernel copy-on-write fault). In a range made with
//!   [`Hmm::alloc_huge`](crate::Hmm::alloc_huge) whose 2 MiB block around the
//!   touch is entirely unpopulated, a zeroed transparent huge page is moved in
//!   instead (populated in the service's own staging page, then one PMD move),
//!   so the range holds huge pages from the start.
//! - **A touch of a page mid-migration**: nothing; the migration wakes the
//!   thread when it finalizes, and the thread retries.
//! - **A touch of a poisoned page**: the poison marker is (re)installed, and the
//!   thread gets SIGBUS.
//! - **Discards and unmaps** (`REMOVE`, `UNMAP` events): the pages become
//!   `None` (or `Unmapped`) and their device pages are freed.
//! - **`mremap`** (`REMAP` event): the data of the moved part that the page
//!   tables do not carry (device pages, pages mid-migration) is forwarded to
//!   the new address, which is then left unmanaged (see `remap`); a touch of
//!   the new address waits until it has arrived.
//!
//! # When system memory cannot be had
//!
//! A fault-back whose copy fails for lack of memory is never zero-filled and
//! never poisoned: the page stays on the device, the faulting thread stays
//! blocked, and the fault is retried with a growing delay (1 ms doubling to
//! 100 ms) until memory is found (see `Service::retry_later`: a retry wakes
//! the page, and the thread's fault after that is served). The retries are counted
//! ([`Hmm::fault_stats`](crate::Hmm::fault_stats)). This is the kernel
//! refusing to charge the installed page; the service's own memory (its
//! stack, its heap) is touched like any thread's, so at the limit a page
//! fault of its own waits in the kernel (or calls the OOM killer), and every
//! fault-back waits with it.
//!
//! # Ordering hazards
//!
//! - `EAGAIN` with nothing done from a fill means an address-space change is
//!   queued as an event: the fault goes back on the retry list, and the
//!   events are read first.
//! - `EEXIST` means the page is already there: success.
//! - The service never touches a managed address itself (it reaches pages
//!   only through ioctls), so it cannot fault on itself.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::addr::{HUGE_PAGE_SIZE, PAGE_SIZE, PageRange, VirtAddr};
use crate::devmem::FaultBack;
use crate::dma::DmaEngine;
use crate::migrate::{Migration, OneFault, PageStatus, Selection, SkipReason, fault_back_one};
use crate::mirror::InvalidationEvent;
use crate::os::mm::{Advise, Mapping, Protection};
use crate::os::uffd::{FillErrorKind, UffdEvent};
use crate::page::{DeviceId, DevicePage, PageEntry, PageTable, Residency};
use crate::state::{
    HANDOVER_ROOM, Handover, HmmConfig, Inner, OwnChange, Range, mark_service_thread, runs_where,
};

pub use crate::devmem::{CpuFault, FaultBackError};

/// The fault being served: what the device's `migrate_to_ram` sees through
/// a [`CpuFault`].
struct PendingFault<'a> {
    inner: &'a Arc<Inner>,
    range: Arc<Range>,
    addr: VirtAddr,
    page: DevicePage,
    window: PageRange,
    write: bool,
    /// Whether the fault-back is counted already: it is counted as soon as
    /// the faulting page has its bytes, before the thread is woken.
    counted: bool,
}

impl FaultBack for PendingFault<'_> {
    fn addr(&self) -> VirtAddr {
        self.addr
    }

    fn device_page(&self) -> DevicePage {
        self.page
    }

    fn window(&self) -> PageRange {
        self.window
    }

    fn is_write(&self) -> bool {
        self.write
    }

    fn migrate(&mut self, engine: &dyn DmaEngine) -> Result<(), FaultBackError> {
        let page = PageRange::from_pages(self.addr.page_down(), 1).expect("one page");
        let whole = self.window.len() == HUGE_PAGE_SIZE
            && self.window.start().is_aligned_to(HUGE_PAGE_SIZE);
        let first_part = if whole { self.window } else { page };
        let sel = Selection::Device(self.page.dev);
        let mut m =
            Migration::setup_in(self.inner, self.range.clone(), first_part, sel, sel.owner())
                .map_err(|e| FaultBackError::Other(e.to_string()))?;
        m.copy(engine);
        let at = (page.start().get() - first_part.start().get()) / PAGE_SIZE;
        let statuses = m.statuses();
        if statuses.get(at) == Some(&PageStatus::Migrated) {
            // Counted before `finalize` wakes the thread: a thread whose touch
            // came back reads a count that includes its fault.
            self.count();
        }
        let report = m.finalize();
        let first = match statuses.get(at) {
            Some(PageStatus::Migrated) => Ok(()),
            Some(PageStatus::Skipped(SkipReason::CopyFailed(crate::dma::DmaError::NoMemory))) => {
                return Err(FaultBackError::NoMemory);
            }
            Some(PageStatus::Skipped(SkipReason::CopyFailed(
                crate::dma::DmaError::DeviceFailed,
            ))) => {
                return Err(FaultBackError::DeviceFailed);
            }
            _ if report.migrated == 0 => Err(FaultBackError::Busy),
            _ => Ok(()),
        };
        migrate_around(self.inner, &self.range, self.window, first_part, sel, engine);
        first
    }
}

impl PendingFault<'_> {
    /// Counts the fault-back served, once, on the range and on the device.
    fn count(&mut self) {
        if std::mem::replace(&mut self.counted, true) {
            return;
        }
        self.range.counters.cpu_faults.fetch_add(1, Ordering::Relaxed);
        if let Some(mem) = self.inner.device(self.page.dev) {
            mem.counters.cpu_faults.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Brings back, with `engine`, what `sel` selects of the parts of `window`
/// before and after `page` (which lies inside it, and is back already).
fn migrate_around(
    inner: &Arc<Inner>,
    r: &Arc<Range>,
    window: PageRange,
    page: PageRange,
    sel: Selection,
    engine: &dyn DmaEngine,
) {
    for part in outside(window, page) {
        if let Ok(mut m) = Migration::setup_in(inner, r.clone(), part, sel, sel.owner()) {
            if m.collected() > 0 {
                m.copy(engine);
            }
            m.finalize();
        }
    }
}

/// The parts of `window` before and after `page` (which lies inside it), if not empty.
fn outside(window: PageRange, page: PageRange) -> impl Iterator<Item = PageRange> {
    [
        PageRange::new(window.start(), page.start().get() - window.start().get()),
        PageRange::new(page.end(), window.end().get() - page.end().get()),
    ]
    .into_iter()
    .flatten()
}

/// Starts the service thread.
pub(crate) fn start(inner: Arc<Inner>) -> std::io::Result<JoinHandle<()>> {
    let (tx, rx) = std::sync::mpsc::channel();
    let h = std::thread::Builder::new().name("hmm-fault".into()).spawn(move || {
        // Record this thread's stack: adoption refuses it.
        let marker = 0u8;
        let here = VirtAddr::new(&marker as *const u8 as usize);
        if let Ok(Some(vma)) = crate::os::maps::vma_containing(here) {
            let _ = inner.service_stack.set(vma.range);
        }
        mark_service_thread();
        let _ = tx.send(());
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            Service::new(inner).run();
        }));
        if let Err(e) = run {
            // Every thread waiting on a fault would wait for ever, and
            // closing the descriptor instead would hand them zero pages
            // where their data lives on a device: stop the process, loudly.
            let what = e
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| e.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            tracing::error!(panic = %what, "the fault service panicked; aborting");
            eprintln!(
                "hmm: the fault service panicked ({what}); aborting: threads waiting on \
                 faults could never be served"
            );
            std::process::abort();
        }
    })?;
    let _ = rx.recv();
    Ok(h)
}

/// A fault to be served again: at `due` the page is woken, and a thread still
/// waiting there faults again; that fault is served with `delay` as the wait
/// it follows (see [`Service::retry_later`]).
struct Retry {
    page: VirtAddr,
    due: Instant,
    delay: Duration,
}

/// How long a woken retry's delay waits for the page's next fault, which
/// continues its backoff.
const BACKOFF_MEMORY: Duration = Duration::from_secs(1);

/// Messages the service can hold while parked for a fork (each thread has at
/// most one waiting).
const PARKED_ROOM: usize = 4096;
/// Room for retries reserved when the service starts (one per thread waiting
/// for memory; more are allocated as needed).
const RETRY_ROOM: usize = 64;
/// How often a parked service looks whether the fork is over (and one asked
/// to park, whether the forwards in progress are).
const PARKED_POLL: Duration = Duration::from_millis(5);
/// How long the service, asked to park for a fork, serves on while remap
/// forwards are in progress (see `Service::may_park`): less than the fork
/// handlers wait for the park (30 s), so the fork never goes on unparked.
const PARK_DEFER: Duration = Duration::from_secs(20);

/// How soon the service looks again at discarded pages the page table
/// still had (see `Service::recheck_discarded`).
const RECHECK_POLL: Duration = Duration::from_millis(1);

/// How long the service looks again at discarded pages the page table still
/// had when it handled the discard (see `Service::recheck_discarded`).
const DISCARD_RECHECK: Duration = Duration::from_millis(100);

struct Service {
    inner: Arc<Inner>,
    events: Vec<UffdEvent>,
    /// Room for the messages read while parked for a fork, reserved up front.
    parked: Vec<UffdEvent>,
    retries: Vec<Retry>,
    /// Retries woken, whose delay the page's next fault takes up (until the
    /// instant given).
    woken: Vec<(Retry, Instant)>,
    /// The batch of messages being handled, if any (see [`Batches`]).
    batch: Option<u64>,
    /// Where zeroed huge pages are made before they move into a huge range:
    /// hmm's own memory, never managed. Made on first use.
    thp_src: Option<Mapping>,
    /// The end of the last fault-back window and its size in pages: a fault
    /// right there is a sequential stream, whose window doubles (up to
    /// [`HmmConfig::MAX_FAULT_AROUND`](crate::HmmConfig::MAX_FAULT_AROUND))
    /// and runs ahead of the fault, as readahead does.
    stream: (usize, usize),
    /// Discarded pages the page table still had, looked at again until the
    /// instant given (see [`Service::recheck_discarded`]).
    discarded: Vec<(PageRange, Instant)>,
    /// When the service first saw the fork it is asked to park for, while
    /// forwards kept it from parking (see [`Service::may_park`]).
    fork_asked_at: Option<Instant>,
    /// Room for what threads serving their own faults hand over (see
    /// [`Service::finish_handovers`]), reserved up front.
    handed: Vec<Handover>,
    around: Vec<(VirtAddr, DeviceId)>,
}

impl Service {
    fn new(inner: Arc<Inner>) -> Self {
        Self {
            inner,
            events: Vec::with_capacity(64),
            parked: Vec::with_capacity(PARKED_ROOM),
            // Reserved up front: a retry is made when memory is short, and
            // the service's own allocation would then wait for memory too.
            retries: Vec::with_capacity(RETRY_ROOM),
            woken: Vec::with_capacity(RETRY_ROOM),
            batch: None,
            thp_src: None,
            stream: (0, 0),
            discarded: Vec::new(),
            fork_asked_at: None,
            handed: Vec::with_capacity(HANDOVER_ROOM),
            around: Vec::with_capacity(64),
        }
    }

    fn run(&mut self) {
        loop {
            if self.inner.stopping.load(Ordering::Acquire) {
                return;
            }
            let fork_asked = self.inner.fork_gate.asked.load(Ordering::SeqCst);
            if !fork_asked {
                self.fork_asked_at = None;
            } else if self.may_park() && !self.park_for_fork() {
                return;
            }
            let timeout = self
                .retries
                .iter()
                .map(|r| r.due)
                .min()
                .map(|d| d.saturating_duration_since(Instant::now()));
            // A fork waits for the forwards in progress: look again soon
            // whether they are over (each also notifies as it ends).
            let timeout = match fork_asked {
                true => Some(timeout.map_or(PARKED_POLL, |t| t.min(PARKED_POLL))),
                false => timeout,
            };
            // Discarded pages still in the page table: look again soon even
            // if no message comes.
            let timeout = match !self.discarded.is_empty() {
                true => Some(timeout.map_or(RECHECK_POLL, |t| t.min(RECHECK_POLL))),
                false => timeout,
            };
            // Work a thread left while the service was awake (it tells the
            // service only when the list was empty): no sleep before it.
            let timeout = match self.inner.handovers.is_empty() {
                true => timeout,
                false => Some(Duration::ZERO),
            };
            match self.inner.uffd.poll_with(&self.inner.notifier, timeout) {
                Ok(_) => {}
                Err(e) => {
                    if !self.inner.stopping.load(Ordering::Acquire) {
                        tracing::error!(error = %e, "fault service cannot poll; stopping");
                    }
                    return;
                }
            }
            loop {
                self.finish_handovers();
                let batch = self.inner.batches.begin();
                let got = match self.inner.uffd.read_events(&mut self.events, 64) {
                    Ok(n) => n,
                    Err(e) => {
                        if !self.inner.stopping.load(Ordering::Acquire) {
                            tracing::error!(error = %e, "fault service cannot read events; stopping");
                        }
                        self.inner.batches.scanned(batch);
                        self.inner.batches.end(batch);
                        return;
                    }
                };
                self.inner.note_unmaps(&self.events);
                self.inner.batches.scanned(batch);
                let mut events = std::mem::take(&mut self.events);
                self.batch = Some(batch);
                for ev in events.drain(..) {
                    self.handle(ev);
                }
                self.batch = None;
                self.events = events;
                self.inner.batches.end(batch);
                if got < 64 {
                    // The queue was drained: `poll` says when more arrive (a
                    // second read would cost a system call per fault).
                    break;
                }
            }
            self.run_retries();
            self.recheck_discarded();
        }
    }

    /// Whether the service may park for the fork it is asked for: only once
    /// no forward is in progress. A forward waits for the service to handle
    /// the messages it has read (the `UNMAP` that follows a moving remap, see
    /// `remap::deliver_all`), which a parked service does not do until the
    /// fork is over, while the fork waits for the forward: so the service
    /// serves on until the forwards are over. Only the service starts
    /// forwards (on `REMAP`), so none starts once it is parked, and the fork
    /// never has remapped data in flight. Bounded, in case a forward cannot
    /// end (its copies short of memory): the service parks after
    /// [`PARK_DEFER`] all the same, and the fork says it has data in flight.
    fn may_park(&mut self) -> bool {
        let asked_at = *self.fork_asked_at.get_or_insert_with(Instant::now);
        if self.inner.forwards.is_idle() {
            return true;
        }
        if asked_at.elapsed() < PARK_DEFER {
            return false;
        }
        tracing::error!(
            "remapped pages are still on their way after {PARK_DEFER:?}; parking for the fork anyway"
        );
        true
    }

    /// While the process forks (between the fork handlers' `prepare` and
    /// `parent`, see [`crate::fork`]): reads messages into room reserved
    /// beforehand, allocating nothing, so the FORK event is read even though
    /// the forking thread holds the allocator's locks; handles them after.
    /// Returns false if the service must stop.
    fn park_for_fork(&mut self) -> bool {
        let mut batch = self.inner.batches.begin();
        let mut held = std::mem::take(&mut self.parked);
        self.inner.fork_gate.set_parked(true);
        let mut ok = true;
        while self.inner.fork_gate.asked.load(Ordering::SeqCst) {
            if self.inner.stopping.load(Ordering::Acquire) {
                ok = false;
                break;
            }
            let room = (held.capacity() - held.len()).min(64);
            if room == 0 {
                // Full (more messages than threads should make): wait for
                // the fork to end rather than allocate.
                std::thread::sleep(PARKED_POLL);
                continue;
            }
            if self.inner.uffd.poll_with(&self.inner.notifier, Some(PARKED_POLL)).is_err() {
                ok = false;
                break;
            }
            // Each read a batch of its own, looked through for unmaps at once
            // (a thread whose `munmap` returned after this read waits for it).
            batch = self.inner.batches.begin();
            let before = held.len();
            let read = self.inner.uffd.read_events(&mut held, room);
            self.inner.note_unmaps(&held[before..]);
            self.inner.batches.scanned(batch);
            if read.is_err() {
                ok = false;
                break;
            }
        }
        self.inner.batches.scanned(batch);
        self.inner.fork_gate.set_parked(false);
        self.batch = Some(batch);
        for ev in held.drain(..) {
            self.handle(ev);
        }
        self.batch = None;
        self.parked = held;
        self.inner.batches.end(batch);
        ok
    }

    /// Finishes the fault-backs threads began in their `SIGBUS` handlers and
    /// handed over (`FaultMode::InThread`, see `crate::inthread`), each as a
    /// one-page migration, then brings back the fault-around windows they
    /// asked for.
    fn finish_handovers(&mut self) {
        if self.inner.handovers.is_empty() {
            return;
        }
        self.inner.handovers.set_working(true);
        let mut list = std::mem::take(&mut self.handed);
        self.inner.handovers.take(&mut list);
        for h in list.drain(..) {
            Migration::handed_over(&self.inner, h.range, h.addr, h.page, h.installed).finalize();
        }
        self.handed = list;
        let mut around = std::mem::take(&mut self.around);
        self.inner.handovers.take_around(&mut around);
        for (addr, dev) in around.drain(..) {
            if let Some(r) = self.inner.find(addr) {
                self.bring_around(&r, addr, dev);
            }
        }
        self.around = around;
        self.inner.handovers.set_working(false);
    }

    /// Brings back what a fault-around window holds of `dev`'s pages around
    /// `addr`, a page a thread brought back itself.
    fn bring_around(&mut self, r: &Arc<Range>, addr: VirtAddr, dev: DeviceId) {
        let (Some(mem), false) = (self.inner.device(dev), r.huge) else { return };
        let window = self.window(r, addr);
        let page = PageRange::from_pages(addr, 1).expect("one page");
        migrate_around(&self.inner, r, window, page, Selection::Device(dev), mem.ops().dma());
    }

    /// Wakes the retries that are due. Allocates nothing (within the room
    /// reserved): it runs while memory is short.
    fn run_retries(&mut self) {
        let now = Instant::now();
        self.woken.retain(|(_, until)| *until > now);
        let mut k = 0;
        while k < self.retries.len() {
            if self.retries[k].due > now {
                k += 1;
                continue;
            }
            let r = self.retries.swap_remove(k);
            let _ = self.inner.uffd.wake(PageRange::from_pages(r.page, 1).expect("one page"));
            self.woken.push((r, now + BACKOFF_MEMORY));
        }
    }

    fn handle(&mut self, ev: UffdEvent) {
        match ev {
            UffdEvent::PageFault { addr, flags, .. } if flags.wp => self.tracked_write(addr),
            UffdEvent::PageFault { addr, flags, .. } => {
                self.inner.counters.faults_read.fetch_add(1, Ordering::Relaxed);
                let page = addr.page_down();
                if self.retries.iter().any(|r| r.page == page) {
                    // Joins the retry pending, whose wake brings it back.
                    return;
                }
                // A fault after a retry's wake goes on with its backoff.
                let delay = match self.woken.iter().position(|(r, _)| r.page == page) {
                    Some(k) => self.woken.swap_remove(k).0.delay,
                    None => Duration::ZERO,
                };
                self.fault(addr, flags.write, delay);
            }
            UffdEvent::Remove { start, end } => {
                let own = PageRange::new(start, end.get() - start.get())
                    .is_ok_and(|r| self.inner.take_own_change(OwnChange::Remove(r)));
                if !own {
                    self.invalidate(start.get(), end.get(), false);
                }
            }
            UffdEvent::Unmap { start, end } => {
                let own = PageRange::new(start, end.get() - start.get())
                    .is_ok_and(|r| self.inner.take_own_change(OwnChange::Unmap(r)));
                if !own {
                    self.invalidate(start.get(), end.get(), true);
                    // The pages are recorded gone: the addresses are no
                    // longer the ranges', and may be anyone's from now on.
                    self.inner
                        .ranges
                        .write()
                        .unwrap_or_else(|e| e.into_inner())
                        .cut(start.get(), end.get());
                }
                self.inner.unmap_handled(start, end);
            }
            UffdEvent::Remap { from, to, len } => {
                if !self.inner.take_own_change(OwnChange::Remap(from, to, len)) {
                    self.inner
                        .ranges
                        .write()
                        .unwrap_or_else(|e| e.into_inner())
                        .add_home(to.get(), to.get() + len);
                    crate::remap::start(&self.inner, from.get(), to.get(), len)
                }
            }
            UffdEvent::Fork { child } => crate::fork::start_copy(&self.inner, child),
        }
    }

    /// A CPU write to a page hmm write-protected because a device maps it
    /// read-only (`Inner::track_writes`): the mirrors drop their entries
    /// first (`Clear`, as for the kernel's copy-on-write break), then the
    /// protection goes and the writer is woken, so no device entry outlives
    /// the write becoming visible.
    fn tracked_write(&mut self, addr: VirtAddr) {
        let page = PageRange::from_pages(addr.page_down(), 1).expect("one page");
        self.inner.counters.tracked_writes.fetch_add(1, Ordering::Relaxed);
        let _inv = self.inner.notifiers.start(page, InvalidationEvent::Clear);
        match self.inner.uffd.write_unprotect(page, false) {
            Ok(()) => {}
            // The address space is changing (an event is queued): the woken
            // writer faults again, and that fault, read after the event, is
            // served then. Expected under concurrent unmaps, not a fault.
            Err(crate::os::uffd::UffdError::Control {
                errno: rustix::io::Errno::AGAIN, ..
            }) => {
                tracing::debug!(%page, "write protection not lifted yet: the address space is changing");
                let _ = self.inner.uffd.wake(page);
            }
            Err(e) => {
                tracing::error!(%page, error = %e, "cannot lift write protection");
                let _ = self.inner.uffd.wake(page);
            }
        }
    }

    /// Has the fault at `addr`, whose message is read and whose thread still
    /// waits, served again after `delay`: the page is woken then, and the
    /// thread, if it still waits, faults again and is served by what the
    /// page is by then. One retry per page: a fault of the page meanwhile
    /// joins it (so a thread woken early by a failed migration does not cut
    /// the backoff short). Waking rather than serving on the old message's
    /// behalf means a retry outlived by its fault (the page was brought back
    /// and the thread woken by a migration meanwhile) does nothing: it never
    /// brings a page back that no thread is waiting for.
    fn retry_later(&mut self, addr: VirtAddr, delay: Duration) {
        let page = addr.page_down();
        if self.retries.iter().any(|r| r.page == page) {
            return;
        }
        self.retries.push(Retry { page, due: Instant::now() + delay, delay });
    }

    /// Serves one fault at `addr`. `delay` is the wait before this attempt (for
    /// the backoff of memory-starved retries).
    ///
    /// The page's record is read, then acted on: a migration that began
    /// before this fault was read (it settled the event stream then) may take
    /// the page in between, so the zero fill checks the record again under
    /// its lock, and a changed record has the fault served anew by what it
    /// says now. (The fault-back needs no such check: its migration takes
    /// only pages still on that device.)
    fn fault(&mut self, addr: VirtAddr, write: bool, delay: Duration) {
        let page = PageRange::from_pages(addr.page_down(), 1).expect("one page");
        loop {
            if self.inner.forwards.awaits(page.start()) {
                // The new home of remapped pages still on their way: the forward
                // wakes the thread when they have all arrived (see `remap`).
                return;
            }
            let Some(r) = self.inner.find(page.start()) else {
                // Not managed (any more) but registered: the new home of a
                // remapped range, which keeps the registration (see `remap`).
                // It is plain anonymous memory: an absent page reads as zeros.
                self.zero_unmanaged(page, delay);
                return;
            };
            let i = r.index(page.start());
            let e = r.lock()[i];
            let batch = self.batch.map(|n| (&self.inner.batches, n));
            self.inner.fault_stall.pause(page.start(), batch);
            if e.is_cpu_mapped() && !e.is_migrating() {
                // Coherent memory mapped for the CPU: the touch raced the map
                // going in, and finds it when it retries.
                let _ = self.inner.uffd.wake(page);
                return;
            }
            if e.is_migrating() {
                if self.inner.is_copying_out(page.start()) {
                    // Absent while hmm reads it under its own hold (see
                    // `Inner::read_held`): it reads as zeros, and the reader is
                    // the holder, which must not wait on itself.
                    if let Err(e) = self.inner.uffd.zeropage(page, false)
                        && e.kind == FillErrorKind::Again
                    {
                        self.retry_later(page.start(), delay);
                    }
                }
                return; // the migration wakes the thread when it ends
            }
            match e.residency() {
                Residency::None | Residency::System => {
                    if self.zero(page, &r, delay) {
                        return;
                    }
                }
                Residency::Device(p) => return self.fault_back(&r, page.start(), p, write, delay),
                Residency::Poisoned => {
                    match self.inner.uffd.poison(page, false) {
                        // The marker is there already, or the memory is not
                        // registered (a failed coherent device's file
                        // mapping, say): the kernel raises the signal there
                        // itself, which a thread waiting in its handler
                        // (SIGBUS mode) lets go on.
                        Err(e)
                            if matches!(
                                e.kind,
                                FillErrorKind::Exists | FillErrorKind::NotRegistered
                            ) =>
                        {
                            self.inner.uffd.refuse(page)
                        }
                        _ => {
                            let _ = self.inner.uffd.wake(page);
                        }
                    }
                    return;
                }
                // Normally a retry of a fault the unmap overtook: the address is
                // gone, the fill fails, and the woken thread meets the unmap
                // itself. But the address may be mapped again by now, by memory
                // that is not this range's and that the kernel has registered
                // here: the new home of an `mremap` the kernel placed in the
                // hole, which stays registered (see `remap`). That is plain
                // memory, served as such; the record stays `Unmapped`, since
                // the range's own page is gone for good.
                Residency::Unmapped => return self.zero_unmanaged(page, delay),
            }
        }
    }

    /// Maps the zero page at a fault on registered memory that no managed
    /// range holds.
    fn zero_unmanaged(&mut self, page: PageRange, delay: Duration) {
        match self.inner.uffd.zeropage(page, false) {
            Err(e) if e.kind == FillErrorKind::Again => self.retry_later(page.start(), delay),
            _ => {
                let _ = self.inner.uffd.wake(page);
            }
        }
    }

    /// Maps the zero page at the fault (and around it, over never-populated
    /// pages of the same range), a page recorded empty (`None`) or in system
    /// memory (absent all the same: its bytes were dropped). Returns false,
    /// filling nothing, if the record no longer says so: a migration took
    /// the page after the fault read its record, and a zero page mapped now
    /// would hide the page's data from the CPU for good.
    fn zero(&mut self, page: PageRange, r: &Arc<Range>, delay: Duration) -> bool {
        if r.huge && self.zero_huge(page, r) {
            return true;
        }
        let around = self.inner.config.zero_fill_around_pages.max(1);
        let mut t = r.lock();
        let i = r.index(page.start());
        if t[i].is_migrating() || !matches!(t[i].residency(), Residency::None | Residency::System) {
            return false;
        }
        let movable = |e: &crate::page::PageEntry| {
            !e.is_migrating() && matches!(e.residency(), Residency::None)
        };
        let (mut a, mut b) = (i, i + 1);
        if movable(&t[i]) {
            while a > 0 && i - (a - 1) < around / 2 && movable(&t[a - 1]) {
                a -= 1;
            }
            while b < t.len() && b - a < around && movable(&t[b]) {
                b += 1;
            }
        }
        let window = PageRange::from_pages(r.page_addr(a), b - a).expect("inside");
        // The faulting page first (it may be a `System` page whose contents the
        // kernel dropped, e.g. after MADV_FREE), then the rest without waking.
        let res = self.inner.uffd.zeropage(page, true);
        match res {
            Ok(_) => {}
            Err(e) if e.kind == FillErrorKind::Exists => {}
            Err(e) if e.kind == FillErrorKind::Again => {
                drop(t);
                self.retry_later(page.start(), delay);
                return true;
            }
            Err(e) => {
                tracing::warn!(addr = %page.start(), error = %e, "cannot map the zero page");
            }
        }
        let _ = t[i].populate();
        let mut filled = 1;
        for part in outside(window, page) {
            let done = match self.inner.uffd.zeropage(part, true) {
                Ok(_) => part.pages(),
                Err(e) => e.done / PAGE_SIZE,
            };
            let first = r.index(part.start());
            t.for_each_mut(first..first + done, |_, e| {
                let _ = e.populate();
            });
            filled += done;
        }
        drop(t);
        r.counters.zero_fills.fetch_add(filled as u64, Ordering::Relaxed);
        let _ = self.inner.uffd.wake(window);
        true
    }

    /// Fills the 2 MiB block around `page` with a zeroed huge page, if the
    /// block lies inside the range and none of it is populated. Returns whether
    /// the faulting page was filled (and the block woken).
    fn zero_huge(&mut self, page: PageRange, r: &Arc<Range>) -> bool {
        let Some(block) = r.huge_block(page.start()) else { return false };
        let first = r.index(block.start());
        let empty = |t: &crate::page::PageTable| {
            !t.any(first..first + block.pages(), |e| {
                e.is_migrating() || !matches!(e.residency(), Residency::None)
            })
        };
        if !empty(&r.lock()) {
            return false;
        }
        if self.thp_src.is_none() {
            let made =
                Mapping::anonymous_aligned(HUGE_PAGE_SIZE, HUGE_PAGE_SIZE, Protection::ReadWrite)
                    .and_then(|m| m.advise(m.range(), Advise::HugePage).map(|_| m));
            match made {
                Ok(m) => self.thp_src = Some(m),
                Err(e) => {
                    tracing::warn!(error = %e, "no staging for huge zero-fills; filling pages");
                    return false;
                }
            }
        }
        let src = self.thp_src.as_ref().expect("made above");
        // The kernel allocates a zeroed huge page (or zeroed small pages when it
        // has none); nothing else ever writes this memory. Done without the
        // table lock: it is the slow part.
        if let Err(e) = src.advise(src.range(), Advise::PopulateWrite) {
            tracing::warn!(error = %e, "cannot populate huge zero-fill staging");
            return false;
        }
        let mut t = r.lock();
        if !empty(&t) {
            return false;
        }
        let done = match self.inner.uffd.move_pages(block, src, src.range(), true, false) {
            Ok(_) => block.pages(),
            Err(e) => e.done / PAGE_SIZE,
        };
        t.for_each_mut(first..first + done, |_, e| {
            let _ = e.populate();
        });
        drop(t);
        r.counters.zero_fills.fetch_add(done as u64, Ordering::Relaxed);
        if done == 0 {
            return false;
        }
        let filled = PageRange::from_pages(block.start(), done).expect("inside");
        let _ = self.inner.uffd.wake(filled);
        filled.contains(page.start())
    }

    fn fault_back(
        &mut self,
        r: &Arc<Range>,
        addr: VirtAddr,
        p: DevicePage,
        write: bool,
        delay: Duration,
    ) {
        let Some(mem) = self.inner.device(p.dev) else {
            tracing::error!(%addr, page = %p, "a page lives on an unregistered device");
            let _ = self.inner.uffd.wake(PageRange::from_pages(addr, 1).expect("page"));
            return;
        };
        // The faulting page the short way where the driver offers it (one
        // fill, no allocation, the thread woken at once), then the window
        // as a migration. While a trace records, the migration path, which
        // the trace shows.
        if !crate::trace::enabled()
            && fault_back_one(&self.inner, r, addr.page_down(), false) == OneFault::Served
        {
            if self.inner.config.fault_around_pages > 1 {
                self.bring_around(r, addr.page_down(), p.dev);
            }
            return;
        }
        let window = self.window(r, addr);
        let mut f = PendingFault {
            inner: &self.inner,
            range: r.clone(),
            addr,
            page: p,
            window,
            write,
            counted: false,
        };
        let mut span = crate::trace::span("CPU fault", crate::trace::Category::CpuFault);
        if let Some(s) = &mut span {
            s.arg("addr", addr.get() as u64);
            s.arg("window_pages", f.window.pages() as u64);
            s.arg("write", u64::from(write));
        }
        let res = if mem.is_failed() {
            Err(FaultBackError::DeviceFailed)
        } else {
            mem.ops().migrate_to_ram(&mut CpuFault::new(&mut f))
        };
        drop(span);
        match res {
            // A driver that brought the page back without `CpuFault::migrate`
            // (which counts before the wake) is counted here.
            Ok(()) => f.count(),
            Err(FaultBackError::Busy) => {
                let _ = self.inner.uffd.wake(PageRange::from_pages(addr, 1).expect("page"));
            }
            Err(FaultBackError::NoMemory) => {
                self.inner.counters.fault_retries_no_memory.fetch_add(1, Ordering::Relaxed);
                let next = (delay * 2).clamp(Duration::from_millis(1), Duration::from_millis(100));
                tracing::warn!(%addr, retry_in = ?next, "no system memory for a fault-back; retrying");
                self.retry_later(addr, next);
            }
            Err(e) => {
                tracing::error!(%addr, page = %p, error = %e, "fault-back failed; poisoning the page");
                self.poison_page(r, addr, p);
            }
        }
    }

    /// The fault-around window of a fault-back at `addr` (see the module
    /// docs): a huge range's 2 MiB block, a window ahead of a sequential
    /// stream, or one centred on the fault.
    fn window(&mut self, r: &Range, addr: VirtAddr) -> PageRange {
        if let Some(block) = r.huge_block(addr).filter(|_| r.huge) {
            return block;
        }
        let around = self.inner.config.fault_around_pages.max(1);
        let rr = r.range();
        let (end, last) = self.stream;
        let (lo, pages) = if around > 1 && end == addr.get() {
            // Sequential: a bigger window, ahead of the fault.
            (addr.get(), (last * 2).clamp(around, HmmConfig::MAX_FAULT_AROUND))
        } else {
            let half = (around / 2) * PAGE_SIZE;
            (addr.get().saturating_sub(half).max(rr.start().get()), around)
        };
        let hi = (lo + pages * PAGE_SIZE).min(rr.end().get()).max(addr.get() + PAGE_SIZE);
        self.stream = (hi, pages);
        PageRange::new(VirtAddr::new(lo), hi - lo).expect("inside the range")
    }

    fn poison_page(&mut self, r: &Arc<Range>, addr: VirtAddr, p: DevicePage) {
        if !self.inner.poison_resident(r, addr, p) {
            let _ = self.inner.uffd.wake(PageRange::from_pages(addr, 1).expect("page"));
        }
    }

    /// Of the pages `entries` (page `first` on, of `r`) a discard event
    /// names, which ones system memory still holds: recorded `System`, no
    /// migration holding them, and present (or swapped) in the page table.
    ///
    /// The kernel reports `MADV_DONTNEED`, `MADV_REMOVE` and `MADV_FREE` alike
    /// as REMOVE, but `MADV_FREE` only lets the kernel drop the pages when it
    /// needs memory: until then they keep their bytes, and a write after the
    /// call keeps them for good. So a page the page table still has keeps its
    /// `System` record, or a later migration would treat its bytes as empty.
    /// (A page on a device has no page-table entry: a discard frees it, which
    /// `MADV_FREE` allows as well.) The kernel sends the event before it
    /// empties the page table, so a page seen here may be about to go: see
    /// [`recheck_discarded`](Self::recheck_discarded). Without a readable page
    /// table every page counts as dropped.
    fn still_held(&self, r: &Range, t: &PageTable, pages: std::ops::Range<usize>) -> Vec<usize> {
        let mut held = Vec::new();
        let system = |e: PageEntry| !e.is_migrating() && e.residency() == Residency::System;
        for run in runs_where(t, pages, system) {
            let part = PageRange::from_pages(r.page_addr(run.start), run.len()).expect("inside");
            let Some(h) = self.inner.held_pages(part) else { return Vec::new() };
            held.extend(run.zip(h).filter(|(_, h)| *h).map(|(i, _)| i));
        }
        held
    }

    /// Looks again at pages a discard named that were still in the page table
    /// when its event was handled (see [`still_held`](Self::still_held)): the
    /// kernel empties the page table after the event is read, so a page gone
    /// by now is recorded empty. A page still there after [`DISCARD_RECHECK`]
    /// is one `MADV_FREE` left in place, and stays `System`. (A `System`
    /// page the kernel dropped reads as zeros and migrates as a zero page, so
    /// the record is right either way; this keeps it exact.)
    fn recheck_discarded(&mut self) {
        if self.discarded.is_empty() {
            return;
        }
        let now = Instant::now();
        let mut pending = std::mem::take(&mut self.discarded);
        pending.retain(|(part, until)| {
            let (start, end) = (part.start().get(), part.end().get());
            let mut left = false;
            for (r, s, e) in self.inner.overlapping(start, end) {
                let (a, b) = r.clip(s, e);
                let mut t = r.lock();
                let system = |e: PageEntry| !e.is_migrating() && e.residency() == Residency::System;
                for run in runs_where(&t, a..b, system) {
                    let part =
                        PageRange::from_pages(r.page_addr(run.start), run.len()).expect("in");
                    let Some(held) = self.inner.held_pages(part) else { continue };
                    for (i, h) in run.zip(held) {
                        if h {
                            left = true;
                        } else {
                            let _ = t[i].invalidate(false);
                        }
                    }
                }
            }
            left && now < *until
        });
        self.discarded = pending;
        self.inner.discards_pending.store(self.discarded.len(), Ordering::Release);
    }

    /// The application discarded (`MADV_DONTNEED`, `MADV_FREE`,
    /// `MADV_REMOVE`) or unmapped `[start, end)`: free the device pages that
    /// held it, and record the pages gone.
    fn invalidate(&mut self, start: usize, end: usize, unmapped: bool) {
        let Ok(range) = PageRange::new(VirtAddr::new(start), end - start) else { return };
        let event = if unmapped { InvalidationEvent::Unmap } else { InvalidationEvent::Clear };
        // Held until the records say the pages are gone: a device fill in
        // between would map a device page about to be freed.
        let _inv = self.inner.notifiers.start(range, event);
        for (r, s, e) in self.inner.overlapping(start, end) {
            let (a, b) = r.clip(s, e);
            let freed: Vec<DevicePage> = {
                let mut t = r.lock();
                let held = if unmapped { Vec::new() } else { self.still_held(&r, &t, a..b) };
                if !held.is_empty() {
                    let part = PageRange::from_pages(r.page_addr(a), b - a).expect("inside");
                    self.discarded.push((part, Instant::now() + DISCARD_RECHECK));
                    self.inner.discards_pending.store(self.discarded.len(), Ordering::Release);
                }
                let mut freed = Vec::new();
                // Blank runs stay one record each: a huge range unmapped or
                // discarded whole costs a step per node, not per page.
                let blank = |mut e: PageEntry| {
                    let _ = e.invalidate(unmapped);
                    e
                };
                t.update(a..b, blank, |i, e| {
                    if held.binary_search(&i).is_err() {
                        freed.extend(e.invalidate(unmapped));
                    }
                });
                freed
            };
            for p in freed {
                self.inner.put_page(p);
            }
        }
    }
}
