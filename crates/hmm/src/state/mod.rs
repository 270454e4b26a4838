//! The shared state of one hmm instance ([`Inner`]): its managed ranges and
//! their page records, its devices, its userfaultfd, and what its threads
//! wait on. Every part above (coherent memory, migration, the mirror's
//! device faults, `mremap` forwarding, fork, the fault service, the public
//! `Hmm`) works on this state; nothing here calls up into them.
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

mod forwards;
mod gates;
mod handover;
mod range;
mod registry;

use std::collections::BTreeMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::addr::{PAGE_SIZE, PageRange, VirtAddr};
use crate::devmem::{DeviceMemory, DeviceMemoryConfig, DeviceMemoryError, DevicePagemapOps};
use crate::dma::SystemSink;
use crate::error::{AdoptRefusal, HmmError, Unsettled};
use crate::mirror::{InvalidationEvent, Notifiers};
use crate::os::event::Notifier;
use crate::os::mm::{Advise, Mapping, MmError, Protection};
use crate::os::pagemap::{Pagemap, PagemapError};
use crate::os::uffd::{Features, FillErrorKind, RegisterMode, Uffd, UffdError, UffdOptions};
use crate::os::vm::VmaQuery;
use crate::page::{DeviceId, DevicePage, PageEntry, PageTable, Residency};

pub(crate) use forwards::{Forward, Forwards, Item, Source};
pub(crate) use gates::{
    Batches, Copies, FORK_WAIT, ForkGate, Installs, StallGate, mark_service_thread,
    on_service_thread, poll_until,
};
pub(crate) use handover::{HANDOVER_ROOM, Handover, Handovers};
pub(crate) use range::{
    OwnChange, Range, RangeCounters, devices_of, for_each_run, mapped_runs, runs_of, runs_where,
};
pub use range::{RangeStats, Residence};
pub(crate) use registry::{Registry, changes as registry_changes};

/// Tunables of an [`Hmm`](crate::Hmm) instance.
#[derive(Debug, Clone, Copy)]
pub struct HmmConfig {
    /// Pages brought back around a faulting page (0: the faulting page only).
    pub fault_around_pages: usize,
    /// Never-populated pages zero-filled around a first touch.
    pub zero_fill_around_pages: usize,
    /// Who serves a CPU touch of a page hmm keeps elsewhere.
    pub fault_mode: FaultMode,
}

impl Default for HmmConfig {
    /// 128 pages of fault-around, 64 of zero-fill-around, and the fault mode
    /// the environment names (`HMM_FAULT_MODE=in-thread`, else
    /// [`FaultMode::Service`]): a program, or a whole test suite, can be run
    /// in the other mode without a change.
    fn default() -> Self {
        let fault_mode = match std::env::var("HMM_FAULT_MODE").as_deref() {
            Ok("in-thread") => FaultMode::InThread,
            _ => FaultMode::Service,
        };
        Self { fault_around_pages: 128, zero_fill_around_pages: 64, fault_mode }
    }
}

/// Who serves a CPU touch of a page hmm keeps elsewhere (see DESIGN.md,
/// "Fault modes").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FaultMode {
    /// The kernel queues the fault and puts the thread to sleep; hmm's fault
    /// service thread reads it, brings the page back and wakes the thread
    /// (userfaultfd's normal mode). Kernel accesses (`read(2)` into managed
    /// memory, say) wait for the page like the thread's own touches.
    #[default]
    Service,
    /// The touching thread brings a device page back itself, in a `SIGBUS`
    /// handler (userfaultfd's SIGBUS mode): no second thread is woken, so a
    /// fault-back costs about what the kernel's own swap-in does. Gives up:
    /// a kernel access to a page that is not in system memory fails with
    /// `EFAULT` instead of waiting (bring such buffers back first, with
    /// [`ManagedRange::populate`](crate::ManagedRange::populate));
    /// the process's `SIGBUS` handler is hmm's (it hands other signals on to
    /// the one installed before it: install yours before the instance is
    /// made, never after). Needs x86-64 and a kernel with
    /// `UFFD_FEATURE_SIGBUS`; what the handler cannot do alone it hands to
    /// the fault service, as in [`Service`](Self::Service).
    InThread,
}

impl HmmConfig {
    /// The largest fault-around window accepted (2 MiB).
    pub const MAX_FAULT_AROUND: usize = 512;
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
    /// Fault-backs a thread served in its own handler (`FaultMode::InThread`).
    pub(crate) faults_in_thread: AtomicU64,
    /// Faults a thread handed to the service from its handler.
    pub(crate) faults_handed_over: AtomicU64,
}

/// The state shared by an [`Hmm`](crate::Hmm) handle, its ranges, devices and fault service.
pub(crate) struct Inner {
    pub(crate) uffd: Arc<Uffd>,
    /// Registers hmm's staging memory, the destination of setup's moves. It
    /// reports no events, and with `UFFD_FEATURE_SIGBUS` a stray touch of an
    /// empty staging page is a SIGBUS, never a hang.
    pub(crate) staging_uffd: Uffd,
    pub(crate) ranges: RwLock<Registry>,
    /// Memory devices may write through their page tables that hmm does not
    /// manage ([`Hmm::mirror`](crate::Hmm::mirror)), by start address.
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
    pub(crate) notifiers: Arc<Notifiers>,
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
    pub(crate) batches: crate::state::Batches,
    /// Fault injection: a stall of the fault service mid-fault.
    pub(crate) fault_stall: Arc<crate::state::StallGate>,
    /// Copies of device pages to forked children in progress.
    pub(crate) fork_copies: crate::state::Copies,
    /// Copies to forked children whose pages are not all there yet (see
    /// `fork::start_copy`).
    pub(crate) fork_copying: crate::state::Copies,
    /// Where the fault service parks while the process forks.
    pub(crate) fork_gate: crate::state::ForkGate,
    /// Pages put back into the page table while a fork is under way.
    pub(crate) fork_installs: crate::state::Installs,
    /// Pages moved by the application's `mremap` on their way to the new
    /// address.
    pub(crate) forwards: crate::state::Forwards,
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
    pub(crate) pid: u32,
    vma_query: OnceLock<VmaQuery>,
    pagemap: OnceLock<Pagemap>,
    pub(crate) service: Mutex<Option<JoinHandle<()>>>,
    /// What threads serving their own faults leave to the service
    /// (`FaultMode::InThread`).
    pub(crate) handovers: Handovers,
}

/// The instances in `FaultMode::InThread`, which the process's `SIGBUS`
/// handler asks in turn (`crate::inthread`). Written by `inthread::enable`
/// and `disable` (a new list swapped in, so nothing is allocated or freed
/// under the lock), and held to write by the fork handlers across `fork()`
/// (`crate::fork`), so no thread's read lock is inherited by the child.
pub(crate) static IN_THREAD: RwLock<Vec<Arc<Inner>>> = RwLock::new(Vec::new());

/// Handlers holding an instance they took from [`IN_THREAD`] while they wait
/// for its fault service, counted by the instance's slot
/// ([`in_thread_slot`]): an instance shut down waits for its slot's count,
/// so that its last reference is never dropped (and it freed) in a signal
/// handler. Instances sharing a slot only wait longer.
pub(crate) static IN_THREAD_HELD: [std::sync::atomic::AtomicUsize; 64] =
    [const { std::sync::atomic::AtomicUsize::new(0) }; 64];

/// `inner`'s counter in [`IN_THREAD_HELD`].
pub(crate) fn in_thread_slot(inner: &Inner) -> usize {
    (inner as *const Inner as usize >> 6) % IN_THREAD_HELD.len()
}

thread_local! {
    /// Set on the thread running the fork handlers while it holds
    /// [`IN_THREAD`] to write (see `in_thread_list`). A flag with nothing to
    /// drop: reading it in a signal handler allocates nothing.
    pub(crate) static FORKING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

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

/// The value of `cell`, made by `open` the first time it is asked for (an
/// error leaves the cell empty, to be tried again).
fn open_once<T, E>(cell: &OnceLock<T>, open: impl FnOnce() -> Result<T, E>) -> Result<&T, E> {
    if let Some(v) = cell.get() {
        return Ok(v);
    }
    let v = open()?;
    Ok(cell.get_or_init(|| v))
}

impl Inner {
    /// Whether CPU faults are served in the faulting thread
    /// (`FaultMode::InThread`: the descriptor is in SIGBUS mode).
    pub(crate) fn sigbus_mode(&self) -> bool {
        self.config.fault_mode == FaultMode::InThread
    }

    /// The state of a new instance, with no thread started: the fault
    /// service ([`crate::fault`]) and the fork handlers ([`crate::fork`]) are
    /// started on it by [`Hmm::with_config`](crate::Hmm::with_config). Without
    /// them, what needs no event read (registering device memory, managing
    /// memory that is populated already, migrating it) works; a CPU touch of
    /// a page hmm holds elsewhere would wait for a service.
    pub(crate) fn new(config: HmmConfig) -> Result<Arc<Self>, HmmError> {
        let in_thread = config.fault_mode == FaultMode::InThread;
        if in_thread && !crate::os::sigbus::reports_access() {
            return Err(HmmError::Config(
                "FaultMode::InThread needs the fault's access type, which only x86-64 reports \
                 to a SIGBUS handler: use FaultMode::Service here"
                    .into(),
            ));
        }
        let required = match in_thread {
            true => Features::MOVE | Features::SIGBUS,
            false => Features::MOVE,
        };
        let uffd = Uffd::open(UffdOptions {
            wanted: Features::EVENT_UNMAP
                | Features::EVENT_FORK
                | Features::EVENT_REMOVE
                | Features::EVENT_REMAP
                | Features::POISON
                | Features::THREAD_ID,
            required,
            nonblocking: true,
            allow_user_mode_only: false,
        })?;
        let uffd = if in_thread { uffd.with_waiters()? } else { uffd };
        let staging_uffd = Uffd::open(UffdOptions {
            wanted: Features::SIGBUS,
            required: Features::MOVE,
            nonblocking: true,
            allow_user_mode_only: false,
        })?;
        let uffd = Arc::new(uffd);
        Ok(Arc::new(Inner {
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
            notifiers: Arc::new(Notifiers::new()),
            copying_out: Mutex::new(Vec::new()),
            own_changes: Mutex::new(Vec::new()),
            coherent_forking: AtomicBool::new(false),
            coherent_maps: Default::default(),
            batches: Default::default(),
            fault_stall: Default::default(),
            fork_copies: Default::default(),
            fork_copying: Default::default(),
            forwards: Default::default(),
            fork_gate: Default::default(),
            fork_installs: Default::default(),
            vma_query: OnceLock::new(),
            pagemap: OnceLock::new(),
            discards_pending: std::sync::atomic::AtomicUsize::new(0),
            unmapping: Mutex::new(Vec::with_capacity(UNMAPPING_ROOM)),
            pid: std::process::id(),
            service: Mutex::new(None),
            handovers: Handovers::default(),
        }))
    }

    /// Registers device memory: a free id (one released and no longer
    /// referenced is given again), and the region.
    pub(crate) fn register_device(
        &self,
        config: DeviceMemoryConfig,
        ops: Arc<dyn DevicePagemapOps>,
    ) -> Result<Arc<DeviceMemory>, HmmError> {
        let mut devs = self.devices.write().unwrap_or_else(|e| e.into_inner());
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

    /// Manages `mapping`: settles what earlier memory at its addresses left
    /// pending, records its pages (`scan`: those the kernel maps are system
    /// memory, else none is populated), registers it with the userfaultfd
    /// and adds it to the registry. `created`: hmm made the memory and frees
    /// it with the range; `huge`: it works in 2 MiB blocks.
    pub(crate) fn manage(
        self: &Arc<Self>,
        mapping: Mapping,
        created: bool,
        scan: bool,
        huge: bool,
    ) -> Result<Arc<Range>, HmmError> {
        let inner = self;
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
                settled: crate::sync::Signal::new(),
                counters: RangeCounters::default(),
                created,
                huge,
                wp,
                pins: Mutex::new(BTreeMap::new()),
            });
            ranges.insert(r.clone());
            Ok(r)
        }
    }

    /// Fails with [`HmmError::InvalidRange`] unless every page of `range` is
    /// mapped and readable. (Without a way to read the areas, the check is
    /// left to the migration, which skips such pages with the reason.)
    ///
    /// Pages of a managed range that the application unmapped are refused by
    /// what hmm knows of them (the range's holes, and pages recorded
    /// unmapped), not by what the kernel maps there now: the address may since
    /// hold some other mapping, which is not the range's memory.
    pub(crate) fn check_accessible(
        &self,
        range: PageRange,
        op: &'static str,
    ) -> Result<(), HmmError> {
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
    /// numbers its reads ([`Batches`](crate::state::Batches)). So: wait until
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
        if !crate::state::poll_until(deadline, || !self.uffd.changes_pending().unwrap_or(false)) {
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
        if !crate::state::on_service_thread() {
            self.batches.wait_scanned(Duration::from_secs(1));
        }
        let u = self.unmapping.lock().unwrap_or_else(|e| e.into_inner());
        u.iter().find(|x| x.overlaps(part)).copied()
    }

    /// Everything the fault service and hmm's other threads do on the
    /// application's behalf, done (see [`Hmm::settle`](crate::Hmm::settle)).
    pub(crate) fn settle_within(&self, limit: Duration) -> Result<(), Unsettled> {
        if crate::state::on_service_thread() || !self.in_own_process() {
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
        if !crate::state::poll_until(deadline, || {
            self.discards_pending.load(Ordering::Acquire) == 0
        }) {
            return Err(Unsettled::Discards);
        }
        if !crate::state::poll_until(deadline, || self.handovers.is_empty()) {
            return Err(Unsettled::Handovers);
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
        if !crate::state::on_service_thread() && self.in_own_process() {
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

    /// The mirrored mapping (see [`Hmm::mirror`](crate::Hmm::mirror)) wholly containing `range`.
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
    pub(crate) fn protect(
        &self,
        mapping: &Mapping,
        part: PageRange,
        prot: Protection,
    ) -> Result<(), MmError> {
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
    pub(crate) fn find_managed(
        &self,
        range: PageRange,
        op: &'static str,
    ) -> Result<Arc<Range>, HmmError> {
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

    /// Faults in `run` (`MADV_POPULATE_READ`, or `_WRITE`), as the kernel
    /// does for a device's fault or a pin. In SIGBUS mode
    /// (`FaultMode::InThread`) the kernel's fault-in of a page userfaultfd
    /// reports fails with `EFAULT` instead of waiting: the pages hmm records
    /// empty, in system memory or mid-migration are then touched from this
    /// thread (a read, or a write that changes no byte), whose `SIGBUS`
    /// handler has each served as the kernel would have, and the run is
    /// populated again. Pages on a device or poisoned are not touched (the
    /// callers bring the first back and report the second).
    pub(crate) fn populate(&self, run: PageRange, write: bool) -> Result<(), MmError> {
        let res = crate::os::vm::populate(run, write);
        match res {
            Err(MmError::Advise { errno: rustix::io::Errno::FAULT, .. })
                if self.uffd.waits_in_thread() => {}
            _ => return res,
        }
        for k in 0..run.pages() {
            let addr = VirtAddr::new(run.start().get() + k * PAGE_SIZE);
            let Some(r) = self.find(addr) else { continue };
            let e = r.lock()[r.index(addr)];
            if !e.is_migrating() && !matches!(e.residency(), Residency::None | Residency::System) {
                continue;
            }
            let offset = addr.get() - r.mapping().addr().get();
            let _ = match write {
                true => r.mapping().touch_keep(offset),
                false => r.mapping().touch_read(offset).map(drop),
            };
        }
        crate::os::vm::populate(run, write)
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
}
