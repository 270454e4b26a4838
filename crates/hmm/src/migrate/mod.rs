//! Three-phase migration over a range (the kernel's `migrate_vma_*`).
//!
//! A [`Migration`] is a value that goes through its phases:
//!
//! 1. **setup** ([`Hmm::migrate`](crate::Hmm::migrate)): collect the pages that
//!    match the selection and make each unreachable, so no CPU write can be
//!    lost during the copy. A system page is moved (`UFFDIO_MOVE`, no copy) out
//!    of the managed range into hmm's staging memory; its address is then empty
//!    and a CPU touch waits in the fault service until the migration ends. A
//!    device page is already unreachable. A page never populated has no source
//!    at all.
//! 2. **allocate and copy** ([`allocate_on`](Migration::allocate_on),
//!    [`copy`](Migration::copy)): destinations are allocated (device pages, or
//!    for the way back the page's own address), and the DMA engine copies.
//! 3. **finalize** ([`finalize`](Migration::finalize)): each copied page is
//!    committed; every other page gets its source back (a staged page is moved
//!    back into place). Threads waiting on the range are woken.
//!
//! Each page ends with a [`PageStatus`]; a page that did not move says why.
//! Dropping a migration before `finalize` restores every source.

mod device;
mod one;
mod range;

pub(crate) use one::{OneFault, fault_back_one};

use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::addr::{HUGE_PAGE_SIZE, PAGE_SIZE, PageRange, VirtAddr};
use crate::devmem::{DeviceMemory, Pressure};
use crate::dma::{DmaEngine, DmaError, DmaFence, DmaJob, SystemSource, ToDevice, ToSystem};
use crate::error::HmmError;
use crate::mirror::InvalidationEvent;
use crate::os::mm::{Mapping, Protection};
use crate::os::uffd::{FillErrorKind, RegisterMode};
use crate::page::{DeviceId, DevicePage, Residency};
use crate::state::{Inner, Range, Source};

pub use crate::error::SkipReason;

/// How long [`Migration::setup`] waits for pages held by another migration
/// before reporting them busy.
const SETTLE_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Which pages a migration collects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Selection {
    /// Pages in system memory, and pages never populated (they get a zeroed
    /// destination without any system page being allocated).
    System,
    /// Pages in the memory of this device, towards system memory.
    Device(DeviceId),
    /// Pages in the memory of this device, towards another device's memory
    /// (a device-to-device copy: the destination's engine reads this
    /// device's memory directly, see [`SystemSource::Peer`]).
    Peer(DeviceId),
}

impl Selection {
    /// The device a migration of this selection is for, when the selection
    /// says (pages coming back from a device are that device's).
    pub fn owner(self) -> Option<DeviceId> {
        match self {
            Selection::System | Selection::Peer(_) => None,
            Selection::Device(d) => Some(d),
        }
    }
}

/// The outcome for one page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PageStatus {
    /// Collected, not yet finished.
    Pending,
    /// Moved.
    Migrated,
    /// Not moved, and why.
    Skipped(SkipReason),
}

/// The pages of one or more migrations that did not move, and how many did.
#[derive(Debug, Clone, Default)]
pub struct MigrationReport {
    /// Pages moved.
    pub migrated: usize,
    /// Pages not moved, with the reason.
    pub skipped: Vec<(VirtAddr, SkipReason)>,
    /// Pages of other memory the destination device evicted to system
    /// memory to make room for this migration. A migration never evicts
    /// pages it moved there itself: once the device holds nothing else it
    /// can give up, the rest is skipped as
    /// [`NoDeviceMemory`](SkipReason::NoDeviceMemory).
    pub evicted: usize,
}

impl MigrationReport {
    /// Whether every page moved.
    pub fn all_migrated(&self) -> bool {
        self.skipped.is_empty()
    }

    /// Adds another report's pages.
    pub fn append(&mut self, other: MigrationReport) {
        self.migrated += other.migrated;
        self.skipped.extend(other.skipped);
        self.evicted += other.evicted;
    }

    /// Pages skipped for `reason`.
    pub fn count(&self, reason: &SkipReason) -> usize {
        self.skipped.iter().filter(|(_, r)| r == reason).count()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Src {
    /// Not collected: nothing to do (the status says why).
    None,
    /// Never populated: the destination gets zeros.
    Zero,
    /// To be moved into staging (between setup's collection and isolation).
    Isolating,
    /// In staging at the page's own offset.
    Staged,
    /// A device page (the page-table entry's reference).
    Device(DevicePage),
}

/// One page of the migration.
///
/// `held` is the migration's claim on the page: set when setup marked the
/// entry migrating, cleared when the migration gives the entry back (abort or
/// commit). Only a held slot may touch the entry's migrating state: a page
/// skipped as busy at collection is marked migrating too, by the migration
/// that owns it.
#[derive(Debug)]
struct Slot {
    src: Src,
    dst: Option<DevicePage>,
    status: PageStatus,
    held: bool,
    /// A coherent source page that setup took off the CPU's page table
    /// (see `crate::coherent`): it goes back there if the page stays.
    cpu_unmapped: bool,
    /// A coherent page (destination, or source put back) this migration
    /// mapped for the CPU in `finish`.
    cpu_mapped: bool,
}

/// A migration between setup and finalize (see the [module docs](self)).
///
/// The three phases by hand, as a driver with its own allocator and engine
/// would run them ([`Hmm::migrate_to_device`](crate::Hmm::migrate_to_device)
/// does the same in one call):
///
/// ```
/// # fn main() -> Result<(), hmm::HmmError> {
/// use hmm::{Hmm, PAGE_SIZE, Selection};
/// use hmm_swdev::{SoftwareDevice, SoftwareDeviceConfig};
/// let hmm = Hmm::new()?;
/// let gpu = SoftwareDevice::new(&hmm, SoftwareDeviceConfig::new("gpu0", 1 << 20))?;
/// let r = hmm.alloc(8 * PAGE_SIZE)?;
/// r.fill(0, r.len(), 1)?;
/// let mut m = hmm.migrate(r.range(), Selection::System)?; // setup: pages unmapped
/// assert_eq!(m.collected(), 8);
/// m.allocate_on(gpu.memory()); // destination pages
/// m.copy(gpu.memory().ops().dma()); // the device's DMA engine
/// let report = m.finalize(); // commit, wake waiters
/// assert_eq!(report.migrated, 8);
/// # Ok(()) }
/// ```
pub struct Migration {
    inner: Arc<Inner>,
    rec: Arc<Range>,
    range: PageRange,
    first: usize,
    select: Selection,
    slots: Vec<Slot>,
    staging: Option<Arc<Mapping>>,
    /// Copies submitted and not yet waited for, with the slot of each.
    in_flight: Option<(DmaFence, Vec<usize>)>,
    /// Whether the engine of the last copies left their sources as they were
    /// ([`DmaEngine::keeps_sources`]).
    sources_kept: bool,
    finalized: bool,
    /// Whether pages that end on a coherent device are mapped for the CPU
    /// (not for exclusive access, whose pages a CPU touch must fault back).
    map_for_cpu: bool,
    /// The span recorded for the trace, when recording is on.
    trace: Option<crate::trace::Span>,
    /// Addresses whose device pages eviction leaves alone: this migration's
    /// own range, or the whole of the call it is one batch of.
    keep: PageRange,
    /// Pages evicted to make room for this migration.
    evicted: usize,
}

impl std::fmt::Debug for Migration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Migration")
            .field("range", &self.range)
            .field("select", &self.select)
            .field("collected", &self.collected())
            .finish_non_exhaustive()
    }
}

fn residency_name(r: Residency) -> String {
    match r {
        Residency::None => "nowhere (never populated)".into(),
        Residency::System => "system memory".into(),
        Residency::Device(p) => format!("device {}", p.dev),
        Residency::Poisoned => "poisoned memory".into(),
        Residency::Unmapped => "unmapped memory".into(),
    }
}

impl Migration {
    /// Setup over `range`, which must lie inside one managed range.
    pub(crate) fn setup(
        inner: Arc<Inner>,
        range: PageRange,
        select: Selection,
    ) -> Result<Self, HmmError> {
        Self::setup_for(inner, range, select, select.owner())
    }

    /// [`setup`](Self::setup) for `owner`, the device the migration is for
    /// (named in the `Migrate` invalidation mirrors receive).
    pub(crate) fn setup_for(
        inner: Arc<Inner>,
        range: PageRange,
        select: Selection,
        owner: Option<DeviceId>,
    ) -> Result<Self, HmmError> {
        if inner.shut_down.load(Ordering::Acquire) {
            return Err(HmmError::ShutDown);
        }
        let rec = inner.find_containing(range)?;
        // Fault-around windows asked for by threads that served their own
        // faults (`FaultMode::InThread`) are brought back first: a window
        // asked for before this migration must not take its pages back after.
        crate::state::poll_until(std::time::Instant::now() + SETTLE_WAIT, || {
            inner.handovers.is_empty()
        });
        // Pages another migration holds (most often a fault-around window the
        // fault service is bringing back) are waited for, briefly, rather than
        // skipped: an application's migration should not lose to hmm's own.
        // Only application threads come through here, never the fault
        // service, so the wait cannot block the migration it waits on.
        let first = rec.index(range.start());
        rec.wait_settled(first..first + range.pages(), SETTLE_WAIT);
        Self::setup_in(&inner, rec, range, select, owner)
    }

    /// Setup without waiting for pages other migrations hold (the fault
    /// service's way: it must never wait on a migration).
    pub(crate) fn setup_in(
        inner: &Arc<Inner>,
        rec: Arc<Range>,
        range: PageRange,
        select: Selection,
        owner: Option<DeviceId>,
    ) -> Result<Self, HmmError> {
        let first = rec.index(range.start());
        let mut slots = Vec::with_capacity(range.pages());
        {
            let mut t = rec.lock();
            let pins = rec.lock_pins();
            for k in 0..range.pages() {
                let e = &mut t[first + k];
                let r = e.residency();
                let (src, status) = if e.is_migrating() {
                    (Src::None, PageStatus::Skipped(SkipReason::Busy))
                } else if Range::is_pinned(&pins, first + k)
                    && !matches!(select, Selection::Device(_))
                {
                    // A pinned page goes to no device; it may come back to
                    // system memory (that is what its pin does first).
                    (Src::None, PageStatus::Skipped(SkipReason::Pinned))
                } else {
                    match (select, r) {
                        (Selection::System, Residency::None) => (Src::Zero, PageStatus::Pending),
                        (Selection::System, Residency::System) => {
                            (Src::Isolating, PageStatus::Pending)
                        }
                        (Selection::Device(d) | Selection::Peer(d), Residency::Device(p))
                            if p.dev == d =>
                        {
                            (Src::Device(p), PageStatus::Pending)
                        }
                        (_, Residency::Poisoned) => {
                            (Src::None, PageStatus::Skipped(SkipReason::Poisoned))
                        }
                        (_, Residency::Unmapped) => {
                            (Src::None, PageStatus::Skipped(SkipReason::Unmapped))
                        }
                        (_, r) => (
                            Src::None,
                            PageStatus::Skipped(SkipReason::NotSelected(residency_name(r))),
                        ),
                    }
                };
                // Coherent memory mapped for the CPU comes off its page table
                // first, which the fault service cannot do (the `mremap`
                // waits for it): there it is left alone.
                let (src, status) = if status == PageStatus::Pending
                    && e.is_cpu_mapped()
                    && crate::state::on_service_thread()
                {
                    (Src::None, PageStatus::Skipped(SkipReason::Busy))
                } else {
                    (src, status)
                };
                let held = status == PageStatus::Pending;
                if held {
                    e.begin_migration().expect("checked: not migrating, movable state");
                }
                let cpu_unmapped = held && e.is_cpu_mapped();
                slots.push(Slot { src, dst: None, status, held, cpu_unmapped, cpu_mapped: false });
            }
        }
        let mut trace = crate::trace::span(
            match select {
                Selection::System => "migrate to device",
                Selection::Device(_) => "migrate to system",
                Selection::Peer(_) => "migrate device to device",
            },
            crate::trace::Category::Migrate,
        );
        if let Some(t) = &mut trace {
            t.arg("addr", range.start().get() as u64);
            t.arg("pages", range.pages() as u64);
        }
        let mut me = Migration {
            inner: inner.clone(),
            rec,
            range,
            first,
            select,
            slots,
            staging: None,
            in_flight: None,
            sources_kept: true,
            finalized: false,
            map_for_cpu: true,
            trace,
            keep: range,
            evicted: 0,
        };
        // Mirrors drop their translations before any page leaves its place
        // (the kernel's MMU_NOTIFY_MIGRATE), outside the table lock.
        if me.collected() > 0 {
            inner.notifiers.invalidate(range, InvalidationEvent::Migrate { owner });
        }
        me.unmap_coherent();
        me.isolate()?;
        Ok(me)
    }

    /// The one-page fault-back a thread began in its `SIGBUS` handler and
    /// handed over (see `crate::inthread`): the record of `addr` is held
    /// (migrating) from device page `page`, whose bytes the thread installed
    /// at `addr` if `installed`. Finalizing it commits or aborts the page by
    /// the rules of every migration.
    pub(crate) fn handed_over(
        inner: &Arc<Inner>,
        rec: Arc<Range>,
        addr: VirtAddr,
        page: DevicePage,
        installed: bool,
    ) -> Self {
        let range = PageRange::from_pages(addr, 1).expect("one page");
        let first = rec.index(addr);
        let status = match installed {
            true => PageStatus::Migrated,
            false => PageStatus::Skipped(SkipReason::Busy),
        };
        let slot = Slot {
            src: Src::Device(page),
            dst: None,
            status,
            held: true,
            cpu_unmapped: false,
            cpu_mapped: false,
        };
        Migration {
            inner: inner.clone(),
            rec,
            range,
            first,
            select: Selection::Device(page.dev),
            slots: vec![slot],
            staging: None,
            in_flight: None,
            sources_kept: true,
            finalized: false,
            map_for_cpu: true,
            trace: None,
            keep: range,
            evicted: 0,
        }
    }

    /// Takes the collected coherent pages that the CPU maps off its page
    /// table (`Inner::coherent_unmap`), a run at a time, page by page where a
    /// run fails; a page that cannot be taken off stays where it is, mapped,
    /// and is skipped.
    fn unmap_coherent(&mut self) {
        let mut k = 0;
        while k < self.slots.len() {
            let n = self.slots[k..].iter().take_while(|s| s.cpu_unmapped).count();
            if n == 0 {
                k += 1;
                continue;
            }
            let (inner, rec) = (self.inner.clone(), self.rec.clone());
            let ok = self.run_or_pages(k, n, "coherent page stays mapped", |part, _| {
                inner.coherent_unmap(&rec, part)
            });
            {
                let mut t = self.rec.lock();
                for (i, ok) in ok.iter().enumerate() {
                    if *ok {
                        let _ = t[self.first + k + i].set_cpu_mapped(false);
                    }
                }
            }
            for (i, ok) in ok.into_iter().enumerate() {
                if !ok {
                    let reason = SkipReason::NotMovable("coherent memory stays mapped".into());
                    self.slots[k + i].cpu_unmapped = false;
                    self.skip(k + i, reason);
                }
            }
            k += n;
        }
        self.release_skipped();
    }

    /// Runs `op` over the `n` pages from slot `k` at once, then, if that
    /// fails, page by page (`op` gets each part and its first page's offset
    /// in the run); says which pages succeeded, and logs `what` with the
    /// reason for each that did not.
    fn run_or_pages(
        &self,
        k: usize,
        n: usize,
        what: &str,
        mut op: impl FnMut(PageRange, usize) -> Result<(), String>,
    ) -> Vec<bool> {
        let run = self.range.subrange(k * PAGE_SIZE, n * PAGE_SIZE).expect("inside");
        if op(run, 0).is_ok() {
            return vec![true; n];
        }
        (0..n)
            .map(|i| {
                let one = PageRange::from_pages(self.addr(k + i), 1).expect("page");
                op(one, i).map_err(|e| tracing::warn!(page = %one, error = %e, "{what}")).is_ok()
            })
            .collect()
    }

    /// Maps the coherent pages that end this migration on a coherent device
    /// for the CPU, before they are committed (a CPU touch meanwhile waits
    /// and then finds them): destinations of pages that moved, and coherent
    /// sources setup took off the page table whose move failed. Pages the
    /// application discarded or unmapped meanwhile are left; a page that
    /// cannot be mapped stays unmapped, where it behaves as private memory
    /// (a touch faults it back). Not while the process forks.
    fn map_coherent(&mut self) {
        if !self.map_for_cpu {
            return;
        }
        let mut want: Vec<(usize, DevicePage)> = Vec::new();
        {
            let t = self.rec.lock();
            for (k, s) in self.slots.iter().enumerate() {
                if !s.held || t[self.first + k].is_invalidated() {
                    continue;
                }
                let page = match (s.status == PageStatus::Migrated, self.select, s.dst, s.src) {
                    (true, Selection::System | Selection::Peer(_), Some(d), _) => d,
                    (false, _, _, Src::Device(p)) if s.cpu_unmapped => p,
                    _ => continue,
                };
                want.push((k, page));
            }
        }
        // The kind of each device met, looked up once (a migration's pages
        // are on one or two devices, and there may be a million of them).
        let mut kinds: Vec<(crate::page::DeviceId, bool)> = Vec::new();
        want.retain(|(_, p)| match kinds.iter().find(|(d, _)| *d == p.dev) {
            Some(&(_, coherent)) => coherent,
            None => {
                let coherent = self
                    .inner
                    .device(p.dev)
                    .is_some_and(|m| m.kind() == crate::devmem::MemoryKind::Coherent);
                kinds.push((p.dev, coherent));
                coherent
            }
        });
        if want.is_empty() || !self.inner.begin_coherent_map() {
            return;
        }
        let mut i = 0;
        while i < want.len() {
            let (k0, p0) = want[i];
            let mut j = i + 1;
            while j < want.len()
                && want[j].0 == k0 + (j - i)
                && want[j].1.dev == p0.dev
                && want[j].1.index == p0.index + (j - i) as u32
            {
                j += 1;
            }
            let Some(mem) = self.inner.device(p0.dev) else {
                i = j;
                continue;
            };
            let (inner, rec) = (self.inner.clone(), self.rec.clone());
            let what = "coherent page left unmapped: the CPU faults it back";
            let ok = self.run_or_pages(k0, j - i, what, |part, off| {
                inner.coherent_map(&rec, part, &mem, p0.index + off as u32)
            });
            for (n, ok) in ok.into_iter().enumerate() {
                self.slots[k0 + n].cpu_mapped = ok;
            }
            i = j;
        }
        self.inner.end_coherent_map();
    }

    /// Takes the coherent pages [`map_coherent`](Self::map_coherent) mapped
    /// that the application discarded since (`MADV_DONTNEED`: they are
    /// dropped at commit) off the CPU's page table again, while the pages are
    /// still held, so that nothing written after the discard lands in a
    /// device page about to be freed. (An unmap took the mapping with it.)
    fn unmap_dropped(&mut self) {
        let dropped: Vec<usize> = {
            let t = self.rec.lock();
            (0..self.slots.len())
                .filter(|&k| {
                    let e = t[self.first + k];
                    self.slots[k].cpu_mapped
                        && e.is_invalidated()
                        && !e.is_unmapped()
                        && !e.is_moved()
                })
                .collect()
        };
        for k in dropped {
            let one = PageRange::from_pages(self.addr(k), 1).expect("page");
            match self.inner.coherent_unmap(&self.rec, one) {
                Ok(()) => self.slots[k].cpu_mapped = false,
                Err(e) => {
                    tracing::warn!(page = %one, error = %e, "cannot unmap a discarded coherent page")
                }
            }
        }
    }

    /// Moves every collected system page into fresh staging memory.
    fn isolate(&mut self) -> Result<(), HmmError> {
        if !self.slots.iter().any(|s| s.src == Src::Isolating) {
            return Ok(());
        }
        let staging =
            Mapping::anonymous_aligned(self.range.len(), HUGE_PAGE_SIZE, Protection::ReadWrite)?;
        if let Err(e) =
            self.inner.staging_uffd.register(&staging, staging.range(), RegisterMode::MISSING)
        {
            self.fail_isolating(SkipReason::NotMovable(format!("no staging memory: {e}")));
            return Ok(());
        }
        let rec = self.rec.clone();
        let mapping = rec.mapping();
        let mut i = 0;
        let mut again = 0u32;
        while i < self.slots.len() {
            if self.slots[i].src != Src::Isolating {
                i += 1;
                continue;
            }
            let mut j = i;
            while j < self.slots.len() && self.slots[j].src == Src::Isolating {
                j += 1;
            }
            let len = (j - i) * PAGE_SIZE;
            let src = self.range.subrange(i * PAGE_SIZE, len).expect("inside");
            let dst = staging.subrange(i * PAGE_SIZE, len).expect("inside");
            match self.inner.staging_uffd.move_pages(dst, mapping, src, true, false) {
                Ok(_) => {
                    self.slots[i..j].iter_mut().for_each(|s| s.src = Src::Staged);
                    i = j;
                }
                Err(e) => {
                    let done = e.done / PAGE_SIZE;
                    self.slots[i..i + done].iter_mut().for_each(|s| s.src = Src::Staged);
                    let k = i + done;
                    match e.kind {
                        FillErrorKind::Again if done > 0 => {}
                        FillErrorKind::Again => {
                            // An event is being reported: let the fault service read it.
                            again += 1;
                            if again > 10_000 {
                                self.skip(k, SkipReason::Busy);
                            } else {
                                std::thread::yield_now();
                            }
                        }
                        // The page is absent after all (discarded, or reclaimed after
                        // MADV_FREE): it reads as zeros, so it moves as a zero page.
                        FillErrorKind::SourceHole => self.slots[k].src = Src::Zero,
                        FillErrorKind::Busy => self.skip(k, SkipReason::Busy),
                        // The kernel moves only between writable areas (and one
                        // area at a time): take the rest of the run page by page.
                        FillErrorKind::Invalid => {
                            for s in k..j {
                                match self.isolate_page(s, &staging) {
                                    Ok(src) => self.slots[s].src = src,
                                    Err(reason) => self.skip(s, reason),
                                }
                            }
                        }
                        _ => self.skip(k, SkipReason::NotMovable(e.to_string())),
                    }
                    i = k.max(i + done);
                }
            }
        }
        self.staging = Some(Arc::new(staging));
        self.release_skipped();
        Ok(())
    }

    /// Isolates page `k` alone: by a move where its area allows one, by a
    /// copy where the area is read-only.
    fn isolate_page(&mut self, k: usize, staging: &Mapping) -> Result<Src, SkipReason> {
        let page = PageRange::from_pages(self.addr(k), 1).expect("one page");
        let vma = self.inner.vma_query().ok().and_then(|q| q.overlapping(page).ok());
        let Some(v) = vma.and_then(|v| v.into_iter().next()).filter(|v| v.read) else {
            return Err(SkipReason::NotMovable(
                "the mapping changed or does not allow access".into(),
            ));
        };
        let dst = staging.subrange(k * PAGE_SIZE, PAGE_SIZE).expect("inside");
        if !v.write {
            return self.copy_out(page, dst);
        }
        let mapping = self.rec.mapping();
        match self.inner.staging_uffd.move_pages(dst, mapping, page, true, false) {
            Ok(_) => Ok(Src::Staged),
            Err(e) if e.kind == FillErrorKind::SourceHole => Ok(Src::Zero),
            Err(e) if e.kind == FillErrorKind::Busy => Err(SkipReason::Busy),
            Err(e) => Err(SkipReason::NotMovable(e.to_string())),
        }
    }

    /// Isolates a page of a read-only area, which `UFFDIO_MOVE` refuses: its
    /// bytes are read into staging, then the page is discarded so that its
    /// address is empty like any isolated page's. The CPU cannot write it
    /// meanwhile (the area is read-only). If the application discards it
    /// during the read, the fault service maps the zero page for the read
    /// (see `Inner::copying_out`): the page moves as zeros, which is what it
    /// then holds. The discard here is hmm's own, and the fault service
    /// knows it is not the application's.
    fn copy_out(&mut self, page: PageRange, dst: PageRange) -> Result<Src, SkipReason> {
        let mut buf = vec![0u8; PAGE_SIZE];
        let at = page.start();
        let read = self.inner.read_held(at, || crate::os::vm::read_memory(at, &mut buf));
        if read != Ok(PAGE_SIZE) {
            return Err(SkipReason::NotMovable(format!("cannot read it: {read:?}")));
        }
        self.inner
            .staging_uffd
            .copy(dst, &buf, true, false)
            .map_err(|e| SkipReason::NotMovable(format!("no staging memory: {e}")))?;
        self.inner
            .discard_own(self.rec.mapping(), page)
            .map_err(|e| SkipReason::NotMovable(e.to_string()))?;
        Ok(Src::Staged)
    }

    fn fail_isolating(&mut self, reason: SkipReason) {
        for k in 0..self.slots.len() {
            if self.slots[k].src == Src::Isolating {
                self.skip(k, reason.clone());
            }
        }
        self.release_skipped();
    }

    /// Marks slot `k` not moved; its page still has its source in place.
    fn skip(&mut self, k: usize, reason: SkipReason) {
        let s = &mut self.slots[k];
        s.src = Src::None;
        s.status = PageStatus::Skipped(reason);
        s.dst = None;
    }

    /// Gives back the pages skipped after collection (their source never
    /// moved). Pages skipped at collection were never held and are left alone:
    /// their migrating mark belongs to another migration.
    ///
    /// A page the application moved meanwhile (`mremap`) took its data with it
    /// in the page tables: its forward is told there is nothing more to wait for.
    fn release_skipped(&mut self) {
        let mut moved = Vec::new();
        {
            let mut t = self.rec.lock();
            for (k, s) in self.slots.iter_mut().enumerate() {
                if s.held && s.src == Src::None {
                    let e = &mut t[self.first + k];
                    if e.is_moved() {
                        moved.push(self.first + k);
                    } else {
                        let _ = e.abort();
                    }
                    s.held = false;
                }
            }
        }
        for index in moved {
            self.inner.forwards.hand_over(&self.inner, &self.rec, index, Source::Nothing);
        }
    }

    /// Leaves pages that end on a coherent device unmapped for the CPU, so
    /// that a CPU touch faults them back (exclusive access).
    pub(crate) fn keep_off_cpu(&mut self) {
        self.map_for_cpu = false;
    }

    /// Eviction for this migration leaves the device pages of `range` alone
    /// (it holds this migration's range): a call that migrates a range in
    /// batches does not evict what its earlier batches moved.
    pub(crate) fn keep_on_device(&mut self, range: PageRange) {
        self.keep = range;
    }

    /// Pages collected and still pending.
    pub fn collected(&self) -> usize {
        self.slots.iter().filter(|s| s.status == PageStatus::Pending).count()
    }

    /// The range.
    pub fn range(&self) -> PageRange {
        self.range
    }

    /// The status of every page, in order.
    pub fn statuses(&self) -> Vec<PageStatus> {
        self.slots.iter().map(|s| s.status.clone()).collect()
    }

    /// Allocates a destination page of `mem` for every collected page (towards a
    /// device). Pages that find none are skipped with "no device memory".
    pub fn allocate_on(&mut self, mem: &DeviceMemory) {
        let want: Vec<usize> = (0..self.slots.len())
            .filter(|&k| self.slots[k].status == PageStatus::Pending && self.slots[k].dst.is_none())
            .collect();
        if want.is_empty() {
            return;
        }
        if mem.is_failed() {
            for k in want {
                self.slots[k].status = PageStatus::Skipped(SkipReason::DeviceFailed);
            }
            return;
        }
        let mut got = mem.alloc(want.len());
        if got.len() < want.len() && mem.pressure() != Pressure::Refuse {
            self.evict_for(mem, want.len(), &mut got);
        }
        for (n, k) in want.into_iter().enumerate() {
            match got.get(n) {
                Some(p) => self.slots[k].dst = Some(*p),
                None => self.slots[k].status = PageStatus::Skipped(SkipReason::NoDeviceMemory),
            }
        }
    }

    /// Makes room on the full region `mem` by evicting its least recently used
    /// pages to system memory, until `got` holds `want` pages or nothing more
    /// can be evicted. Victims back an address (a destination still being
    /// filled does not), and eviction skips pages any migration holds: no page
    /// is evicted in the middle of its own migration.
    fn evict_for(&mut self, mem: &DeviceMemory, want: usize, got: &mut Vec<DevicePage>) {
        for _ in 0..4 {
            let short = want - got.len();
            // Free pages an injected failure refused: not a lack of room.
            let short_of_room = short.saturating_sub(mem.free_pages() as usize);
            let victims = mem.coldest_outside(short_of_room, Some(self.keep));
            if !victims.is_empty() {
                let t0 = std::time::Instant::now();
                match self.inner.evict(mem.id(), &victims) {
                    Ok(n) => {
                        self.evicted += n;
                        mem.counters.pages_evicted.fetch_add(n as u64, Ordering::Relaxed);
                        let ns = t0.elapsed().as_nanos() as u64;
                        mem.counters.eviction_ns.fetch_add(ns, Ordering::Relaxed);
                    }
                    Err(e) => tracing::warn!(device = %mem.id(), error = %e, "eviction failed"),
                }
            }
            got.extend(mem.alloc(short));
            if got.len() >= want || victims.is_empty() {
                break;
            }
        }
    }

    /// Copies every collected page that has a destination with `engine`, and
    /// waits for the copies.
    pub fn copy(&mut self, engine: &dyn DmaEngine) {
        self.start_copy(engine);
        self.wait_copy();
    }

    /// Submits the copies of [`copy`](Self::copy) and returns without waiting:
    /// the caller can prepare the next migration meanwhile. `finalize` (or
    /// [`wait_copy`](Self::wait_copy)) waits for them; a migration dropped
    /// with copies in flight waits too, since the engine is still reading its
    /// staging memory.
    pub fn start_copy(&mut self, engine: &dyn DmaEngine) {
        self.wait_copy();
        let mut idx = Vec::new();
        let job = match self.select {
            Selection::System => {
                let mut v = Vec::new();
                for (k, s) in self.slots.iter().enumerate() {
                    let (PageStatus::Pending, Some(dst)) = (&s.status, s.dst) else { continue };
                    let src = match s.src {
                        Src::Zero => SystemSource::Zero,
                        Src::Staged => SystemSource::Staged {
                            staging: self.staging.clone().expect("staged pages have staging"),
                            offset: k * PAGE_SIZE,
                        },
                        _ => continue,
                    };
                    idx.push(k);
                    v.push(ToDevice { src, dst });
                }
                DmaJob::ToDevice(v)
            }
            Selection::Peer(from) => {
                let memory = self.inner.device(from).and_then(|m| m.ops().peer_memory());
                let mut v = Vec::new();
                for (k, s) in self.slots.iter_mut().enumerate() {
                    let (PageStatus::Pending, Some(dst), Src::Device(page)) =
                        (&s.status, s.dst, s.src)
                    else {
                        continue;
                    };
                    let Some(memory) = memory.clone().filter(|_| engine.reads_peers()) else {
                        s.status = PageStatus::Skipped(SkipReason::CopyFailed(DmaError::Failed(
                            format!("the engine cannot reach {from}'s memory"),
                        )));
                        continue;
                    };
                    idx.push(k);
                    let offset = page.index as usize * PAGE_SIZE;
                    v.push(ToDevice { src: SystemSource::Peer { memory, offset, page }, dst });
                }
                DmaJob::ToDevice(v)
            }
            Selection::Device(_) => {
                let mut v = Vec::new();
                for (k, s) in self.slots.iter().enumerate() {
                    let (PageStatus::Pending, Src::Device(src)) = (&s.status, s.src) else {
                        continue;
                    };
                    idx.push(k);
                    v.push(ToSystem { src, dst: self.addr(k) });
                }
                // The fault service waits for its copies: they must not wait
                // for it (see `SystemSink::for_service`).
                let sink = if crate::state::on_service_thread() {
                    self.inner.service_sink.clone()
                } else {
                    self.inner.sink.clone()
                };
                DmaJob::ToSystem { copies: v, sink }
            }
        };
        if job.is_empty() {
            return;
        }
        self.sources_kept = engine.keeps_sources();
        self.in_flight = Some((engine.submit(job), idx));
    }

    /// Waits for the copies [`start_copy`](Self::start_copy) submitted, if any,
    /// and records their results.
    pub fn wait_copy(&mut self) {
        let Some((fence, idx)) = self.in_flight.take() else { return };
        for (k, r) in idx.into_iter().zip(fence.wait()) {
            self.slots[k].status = match r {
                Ok(()) => PageStatus::Migrated,
                Err(DmaError::Declined(why)) => PageStatus::Skipped(SkipReason::Declined(why)),
                Err(DmaError::DeviceFull) => PageStatus::Skipped(SkipReason::NoDeviceMemory),
                Err(e) => PageStatus::Skipped(SkipReason::CopyFailed(e)),
            };
        }
    }

    fn addr(&self, k: usize) -> VirtAddr {
        VirtAddr::new(self.range.start().get() + k * PAGE_SIZE)
    }

    /// Commits every copied page, restores every other source, wakes waiters.
    pub fn finalize(mut self) -> MigrationReport {
        self.finish()
    }

    fn finish(&mut self) -> MigrationReport {
        self.wait_copy();
        self.finalized = true;
        // Pages collected but never copied (no destination, or `copy` not called).
        for s in &mut self.slots {
            if s.status == PageStatus::Pending {
                s.status = PageStatus::Skipped(SkipReason::CopyFailed(DmaError::Failed(
                    "not copied".into(),
                )));
            }
        }
        // 0. Coherent pages that end here are mapped for the CPU first.
        self.map_coherent();
        self.unmap_dropped();
        // 1. Staged sources of pages that did not move go back into place, unless
        //    the application discarded them meanwhile. No lock is held across the
        //    ioctls (see the lock rules in `space`).
        let mut restored = vec![false; self.slots.len()];
        self.restore_sources(0..self.slots.len(), &mut restored);
        // A fork under way copies into the child what is put back into the
        // page table after it began (see `fork::Installs`): every install of
        // this migration is done by now, and these are the pages it may
        // commit to system memory.
        self.inner
            .fork_installs
            .note((0..self.slots.len()).filter(|k| self.slots[*k].held).map(|k| self.addr(k)));
        // 2. Commit or abort each collected page under the lock.
        let mut put = Vec::new();
        let mut moved = 0u64;
        let mem = match self.select {
            Selection::System | Selection::Peer(_) => {
                self.slots.iter().find_map(|s| s.dst).and_then(|p| self.inner.device(p.dev))
            }
            Selection::Device(d) => self.inner.device(d),
        };
        // Pages the application moved elsewhere (`mremap`) go to the move's
        // forward with their data and their hold: decided under the same lock
        // as the commit, so a move is either seen here or finds the page
        // already given back.
        let mut handover = Vec::new();
        let mut dropped_mapped: Vec<(usize, DevicePage)> = Vec::new();
        // A page copied to a destination device that has failed meanwhile is
        // not committed there when the engine kept its source (its data never
        // left system memory, or the source device): it goes back into place
        // in a second pass. The destination page is claimed
        // under the lock before the commit (`DeviceMemory::claim_backing`):
        // either the claim sees the failure (the page stays in system memory)
        // or `poison_device` sees the claim, waits for this lock, finds the
        // page committed and poisons it with the device's other pages. (A
        // coherent page already mapped for the CPU commits as it is: its data
        // stays readable where the CPU maps it.)
        let mut late: Vec<usize> = Vec::new();
        // Pages that stayed on their device (to be poisoned if it failed).
        let mut stayed: Vec<(usize, DevicePage)> = Vec::new();
        // Pages an engine that does not keep sources moved into a device that
        // failed before the commit: their only copy is there, so they commit
        // and are poisoned with the device's other pages.
        let mut arrived_lost: Vec<(usize, DevicePage)> = Vec::new();
        let mut pass: Vec<usize> = (0..self.slots.len()).collect();
        loop {
            {
                let mut t = self.rec.lock();
                for k in std::mem::take(&mut pass) {
                    if !self.slots[k].held {
                        continue;
                    }
                    if t[self.first + k].is_moved() {
                        let src = self.moved_source(k, restored[k]);
                        let s = &mut self.slots[k];
                        // Free the device pages that do not hold the data.
                        let handed = src.device_page();
                        let src_page = if let Src::Device(p) = s.src { Some(p) } else { None };
                        put.extend(
                            [s.dst, src_page].into_iter().flatten().filter(|p| Some(*p) != handed),
                        );
                        s.dst = None;
                        s.held = false;
                        s.status = PageStatus::Skipped(SkipReason::Invalidated);
                        handover.push((k, src));
                        continue;
                    }
                    let s = &self.slots[k];
                    let claimed = match (&s.status, self.select, s.dst, &mem) {
                        (
                            PageStatus::Migrated,
                            Selection::System | Selection::Peer(_),
                            Some(p),
                            Some(m),
                        ) if !s.cpu_mapped => m.claim_backing(p, self.addr(k)),
                        _ => true,
                    };
                    if !claimed && self.sources_kept {
                        self.slots[k].status = PageStatus::Skipped(SkipReason::DeviceFailed);
                        late.push(k);
                        continue;
                    }
                    let s = &mut self.slots[k];
                    s.held = false;
                    let e = &mut t[self.first + k];
                    debug_assert!(e.is_migrating(), "a held page stays migrating until given back");
                    // A page mapped for the CPU above that is dropped now (the
                    // application discarded or unmapped it meanwhile) comes off
                    // the CPU's page table before its device page is freed.
                    let mapped_page = if s.status == PageStatus::Migrated {
                        s.dst
                    } else {
                        match s.src {
                            Src::Device(p) => Some(p),
                            _ => None,
                        }
                    };
                    let mapped_page = mapped_page.filter(|_| s.cpu_mapped);
                    if s.status == PageStatus::Migrated {
                        let to = match (self.select, s.dst) {
                            (Selection::System | Selection::Peer(_), Some(p)) => {
                                Residency::Device(p)
                            }
                            _ => Residency::System,
                        };
                        let committed = e.commit(to).expect("migrating page commits");
                        if committed && s.cpu_mapped {
                            let _ = e.set_cpu_mapped(true);
                        } else if let Some(p) = mapped_page.filter(|_| !e.is_unmapped()) {
                            dropped_mapped.push((k, p));
                        }
                        // A peer's page: its data now lives on the destination.
                        let peer_src = match (self.select, s.src) {
                            (Selection::Peer(_), Src::Device(p)) => Some(p),
                            _ => None,
                        };
                        put.extend(peer_src);
                        match (self.select, committed) {
                            (Selection::System | Selection::Peer(_), true) => {
                                let p = s.dst.expect("device destination");
                                if let Some(m) = &mem {
                                    m.set_backs(
                                        p,
                                        VirtAddr::new(self.range.start().get() + k * PAGE_SIZE),
                                    );
                                }
                                if claimed {
                                    moved += 1;
                                } else {
                                    arrived_lost.push((k, p));
                                }
                            }
                            (Selection::System | Selection::Peer(_), false) => {
                                put.extend(s.dst);
                                s.status = PageStatus::Skipped(SkipReason::Invalidated);
                            }
                            (Selection::Device(_), c) => {
                                // The device page's reference went with the entry.
                                if let Src::Device(p) = s.src {
                                    put.push(p);
                                }
                                if c {
                                    moved += 1;
                                } else {
                                    s.status = PageStatus::Skipped(SkipReason::Invalidated);
                                }
                            }
                        }
                    } else {
                        let kept = e.abort().expect("migrating page aborts");
                        if kept && s.cpu_mapped {
                            let _ = e.set_cpu_mapped(true);
                        } else if let Some(p) = mapped_page.filter(|_| !e.is_unmapped()) {
                            dropped_mapped.push((k, p));
                        }
                        put.extend(s.dst.take());
                        if !kept {
                            if let Src::Device(p) = s.src {
                                put.push(p);
                            }
                            s.status = PageStatus::Skipped(SkipReason::Invalidated);
                        } else if let (Src::Device(p), false) = (s.src, s.cpu_mapped) {
                            stayed.push((k, p));
                        }
                    }
                }
            }
            if late.is_empty() {
                break;
            }
            self.restore_sources(late.iter().copied(), &mut restored);
            pass = std::mem::take(&mut late);
        }
        for (k, src) in handover {
            self.inner.forwards.hand_over(&self.inner, &self.rec, self.first + k, src);
        }
        // A device page still mapped for the CPU is never freed: the address
        // would read whatever the page holds next. (Only a discard racing the
        // end of the migration gets here; see `unmap_dropped`.)
        for (k, p) in dropped_mapped {
            tracing::error!(addr = %self.addr(k), page = %p, "a discarded coherent page stays mapped; its device page is kept");
            put.retain(|x| *x != p);
        }
        self.rec.settled.notify_all();
        // Pages that stayed on a device that failed meanwhile are lost, as
        // its other pages are: they are poisoned now (`poison_device` skipped
        // them while the migration held them), before the waiting threads
        // are woken to touch them. A failure that comes after this check
        // finds them in its own sweep.
        if let Some(&(_, p)) = stayed.first()
            && self.inner.device(p.dev).is_some_and(|m| m.is_failed())
        {
            for (k, p) in stayed {
                self.inner.poison_resident(&self.rec, self.addr(k), p);
            }
        }
        for (k, p) in arrived_lost {
            self.inner.poison_resident(&self.rec, self.addr(k), p);
            self.slots[k].status = PageStatus::Skipped(SkipReason::DeviceFailed);
        }
        // 3. Free the device pages (before waking: a woken thread may migrate
        //    again at once and find their capacity), then wake the threads that
        //    touched the range meanwhile and wait in the kernel (they retry and
        //    find the page, or fault again on its new home).
        self.inner.put_pages(&put);
        // The counters too, so that a woken thread reads them with its pages.
        let c = &self.rec.counters;
        if let Selection::Peer(from) = self.select
            && let Some(src) = self.inner.device(from)
        {
            src.counters.migrated_to_peer.fetch_add(moved, Ordering::Relaxed);
        }
        match self.select {
            Selection::System | Selection::Peer(_) => {
                c.migrated_to_device.fetch_add(moved, Ordering::Relaxed);
                if let Some(m) = &mem {
                    m.counters.migrated_to_device.fetch_add(moved, Ordering::Relaxed);
                }
            }
            Selection::Device(_) => {
                c.migrated_to_system.fetch_add(moved, Ordering::Relaxed);
                if let Some(m) = &mem {
                    m.counters.migrated_to_system.fetch_add(moved, Ordering::Relaxed);
                }
            }
        }
        let _ = self.inner.uffd.wake(self.range);
        let mut report = MigrationReport { evicted: self.evicted, ..Default::default() };
        for (k, s) in self.slots.iter().enumerate() {
            match &s.status {
                PageStatus::Migrated => report.migrated += 1,
                PageStatus::Skipped(r) => report.skipped.push((self.addr(k), r.clone())),
                PageStatus::Pending => unreachable!("every page was settled above"),
            }
        }
        if let Some(mut t) = self.trace.take() {
            t.arg("migrated", report.migrated as u64);
        }
        report
    }

    /// Puts the staged sources of slots `ks` that did not move back into
    /// place (marking them in `restored`), unless the application discarded
    /// them meanwhile. The records are read under the lock; no lock is held
    /// across the ioctls (see the lock rules in `space`).
    fn restore_sources(&mut self, ks: impl Iterator<Item = usize>, restored: &mut [bool]) {
        let back: Vec<usize> = {
            let t = self.rec.lock();
            ks.filter(|&k| {
                self.slots[k].src == Src::Staged
                    && self.slots[k].status != PageStatus::Migrated
                    && !t[self.first + k].is_invalidated()
            })
            .collect()
        };
        for k in back {
            self.restore_staged(k);
            restored[k] = true;
        }
    }

    /// Moves staged page `k` back to its address (the page is absent there: a
    /// CPU touch waits on the migration). Falls back to copying, so the data is
    /// never left behind.
    fn restore_staged(&mut self, k: usize) {
        let staging = self.staging.clone().expect("staged pages have staging");
        let dst = PageRange::from_pages(self.addr(k), 1).expect("one page");
        let src = staging.subrange(k * PAGE_SIZE, PAGE_SIZE).expect("inside");
        if let Err(e) = self.inner.put_back(dst, &staging, src) {
            tracing::error!(addr = %self.addr(k), error = %e, "cannot put a page back after a failed migration");
        }
    }

    /// Where the data of page `k` is, now that the application has moved the
    /// page (`mremap`) during the migration; `restored` says whether its
    /// staged source was put back at its old address.
    fn moved_source(&self, k: usize, restored: bool) -> Source {
        let s = &self.slots[k];
        match (s.status == PageStatus::Migrated, self.select, s.src) {
            // Copied: the destination has the data.
            (true, Selection::System | Selection::Peer(_), _) => match s.dst {
                Some(p) if s.cpu_mapped => Source::Mapped(p),
                Some(p) => Source::Device(p),
                None => Source::Nothing,
            },
            (true, Selection::Device(_), _) => Source::OldAddress,
            // Not copied: the source has it (put back at the old address,
            // perhaps after the move, or still staged).
            (false, _, Src::Staged) if restored => Source::OldAddress,
            (false, _, Src::Staged) => {
                let staging = self.staging.clone().expect("staged pages have staging");
                let at = staging.subrange(k * PAGE_SIZE, PAGE_SIZE).expect("inside");
                Source::Staged(staging, at)
            }
            // A source put back and mapped for the CPU again moved with the
            // page tables, as a copied destination does.
            (false, _, Src::Device(p)) if s.cpu_mapped => Source::Mapped(p),
            (false, _, Src::Device(p)) => Source::Device(p),
            (false, _, _) => Source::Nothing,
        }
    }
}

impl Drop for Migration {
    fn drop(&mut self) {
        if !self.finalized {
            self.finish();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::state::HmmConfig;

    /// Migration stands on the shared state alone, as the kernel's
    /// `migrate_vma_*` needs no fault handler: with no fault service and no
    /// fork handlers started, populated memory moves to a device and back
    /// with its bytes.
    #[test]
    fn a_migration_needs_no_fault_service() {
        let inner = match crate::state::Inner::new(HmmConfig::default()) {
            Ok(i) => i,
            Err(e) => {
                eprintln!("skipped: {e}");
                return;
            }
        };
        assert!(inner.service.lock().unwrap().is_none(), "the state alone starts no fault service");
        let (config, ops) = crate::testdev::parts(16);
        let mem = inner.register_device(config, ops).unwrap();
        let m = Mapping::anonymous(16 * PAGE_SIZE, Protection::ReadWrite).unwrap();
        let pattern: Vec<u8> = (0..16 * PAGE_SIZE).map(|i| (i * 7 % 251) as u8).collect();
        m.write(0, &pattern).unwrap();
        // Populated already, so no first touch needs a service to fill it.
        let r = inner.manage(m, true, true, false).unwrap();
        let range = r.range();
        // Unregistered before anything unmaps it, pass or fail: with no
        // service to read the unmap's event, the kernel would hold the
        // `munmap` until one did.
        let _unregister = Unregister(inner.clone(), range);

        // Each step in a thread of its own, waited for with a deadline: a
        // migration that needed a service would wait for ever.
        let (tx, rx) = std::sync::mpsc::channel();
        let (i2, mem2) = (inner.clone(), mem.clone());
        let worker = std::thread::spawn(move || {
            let to = i2.migrate_to_device(range, &mem2, mem2.ops().dma());
            let on_device = to.as_ref().is_ok_and(|rep| rep.migrated == 16);
            let back = i2.migrate_to_system(range, &mem2, mem2.ops().dma());
            let _ = tx.send((to.map(|r| r.migrated), on_device, back.map(|r| r.migrated)));
        });
        let (to, on_device, back) = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("a migration without a fault service did not finish within 60 s");
        assert_eq!(to.unwrap(), 16, "every page moves to the device");
        assert!(on_device);
        assert_eq!(back.unwrap(), 16, "every page comes back");
        let t = r.lock();
        assert!(
            t.iter(0..16).all(|e| e.residency() == Residency::System),
            "the records say system memory again"
        );
        drop(t);
        let mut got = vec![0u8; pattern.len()];
        r.mapping().read(0, &mut got).unwrap();
        assert!(got == pattern, "the bytes came back as they were");
        assert_eq!(mem.allocated_pages(), 0, "the device holds no page any more");
        worker.join().expect("the migrating thread ended");
    }

    struct Unregister(Arc<Inner>, PageRange);

    impl Drop for Unregister {
        fn drop(&mut self) {
            let _ = self.0.uffd.unregister(self.1);
        }
    }
}
