//! The driver side of hmm: what a device driver keeps of the instance it
//! serves ([`HmmHandle`]) and calls on it, in the kernel's vocabulary.
//!
//! A driver has two halves, as in the kernel:
//!
//! - **What it implements**: [`DevicePagemapOps`](crate::DevicePagemapOps)
//!   for its memory (`page_free`, `migrate_to_ram`, its DMA engine), and
//!   the callback of each [`IntervalNotifier`] it inserts to mirror the
//!   process's page table. Each trait method states its contract: what it
//!   may block on, which locks are held, what it must never touch.
//! - **What it calls**, on an [`HmmHandle`]: registering its memory
//!   ([`Hmm::register_device_memory`](crate::Hmm::register_device_memory)),
//!   the migrations (`migrate_vma_*` and the whole-range helpers),
//!   [`range_fault`](HmmHandle::range_fault) under the notifier retry
//!   protocol, exclusive access, eviction, marking its memory failed, and
//!   writes to system memory on the device's behalf.
//!
//! A driver keeps an `HmmHandle`, not the [`Hmm`]: dropping the `Hmm` shuts
//! the instance down (its devices are released, its ranges let go), and a
//! handle does not keep it alive; every call on a handle of an instance shut
//! down fails with [`HmmError::ShutDown`] or does nothing.
//!
//! The software device (the `hmm-swdev` crate) is a complete driver built on
//! this surface alone, and the worked example of `docs/DRIVERS.md`.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::addr::{PageRange, VirtAddr};
use crate::devmem::{DeviceMemory, MemoryKind};
use crate::dma::DmaEngine;
use crate::migrate::{MigrationReport, SkipReason};
use crate::os::mm::Mapping;
use crate::os::vm::CheckedWriteError;
use crate::page::Residency;
use crate::space::{Hmm, HmmError};
use crate::state::{Inner, Range};

use crate::mirror::{
    IntervalNotifier, Invalidation, InvalidationEvent, PageInfo, RangeFault, RangeFaultError,
};

/// What a device driver keeps of the hmm instance it serves: cheap to clone,
/// `Send + Sync`, and not an owner (dropping it shuts nothing down).
#[derive(Clone)]
pub struct HmmHandle {
    inner: Arc<Inner>,
}

impl fmt::Debug for HmmHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HmmHandle").field("shut_down", &self.is_shut_down()).finish()
    }
}

impl Hmm {
    /// A handle for a device driver (see [`HmmHandle`]).
    pub fn handle(&self) -> HmmHandle {
        HmmHandle { inner: self.inner().clone() }
    }
}

impl HmmHandle {
    /// Whether the instance has been shut down (its [`Hmm`] dropped): its
    /// devices are released, and a driver has nothing left to unregister.
    pub fn is_shut_down(&self) -> bool {
        self.inner.shut_down.load(Ordering::Acquire)
    }

    /// Brings every page of `mem` back to system memory, then unregisters it
    /// (as [`Hmm::unregister_device_memory`]). A driver calls it as it goes
    /// away; after a shut-down there is nothing to do and it returns `Ok`.
    pub fn unregister_device_memory(&self, mem: &DeviceMemory) -> Result<(), HmmError> {
        if self.is_shut_down() {
            return Ok(());
        }
        self.inner.release_device(mem.id())
    }

    /// Migrates `range` into `mem` with `engine`: the three phases, in
    /// batches (as [`Hmm::migrate_to_device`]).
    pub fn migrate_to_device(
        &self,
        range: PageRange,
        mem: &Arc<DeviceMemory>,
        engine: &dyn DmaEngine,
    ) -> Result<MigrationReport, HmmError> {
        self.inner.migrate_to_device(range, mem, engine)
    }

    /// Migrates the pages of `range` that live on `mem` back to system memory
    /// (as [`Hmm::migrate_to_system`]).
    pub fn migrate_to_system(
        &self,
        range: PageRange,
        mem: &Arc<DeviceMemory>,
        engine: &dyn DmaEngine,
    ) -> Result<MigrationReport, HmmError> {
        self.inner.migrate_to_system(range, mem, engine)
    }

    /// Migrates the pages of `range` that live on `from` into `to` (as
    /// [`Hmm::migrate_device_to_device`]).
    pub fn migrate_device_to_device(
        &self,
        range: PageRange,
        from: &Arc<DeviceMemory>,
        to: &Arc<DeviceMemory>,
    ) -> Result<MigrationReport, HmmError> {
        self.inner.migrate_device_to_device(range, from, to)
    }

    /// Migrates every page of `range` into `to`, wherever it lives now (as
    /// [`Hmm::migrate_here`]).
    pub fn migrate_here(
        &self,
        range: PageRange,
        to: &Arc<DeviceMemory>,
    ) -> Result<MigrationReport, HmmError> {
        self.inner.migrate_here(range, to)
    }

    /// Evicts the given pages of `mem` to system memory without knowing their
    /// addresses (as [`Hmm::evict`]). Returns how many moved.
    pub fn evict(
        &self,
        mem: &DeviceMemory,
        pages: &[crate::page::DevicePage],
    ) -> Result<usize, HmmError> {
        self.inner.evict(mem.id(), pages)
    }

    /// Evicts every page of `mem` to system memory (the kernel's
    /// `migrate_device_range` over the whole region), waiting for pages
    /// other migrations hold.
    pub fn evict_all(&self, mem: &DeviceMemory) -> Result<(), HmmError> {
        self.inner.evict_all(mem.id())
    }

    /// Write-protects the CPU's pages of `range` (managed memory in system
    /// memory; other pages are left alone): the next write to one, by the
    /// CPU or by the kernel on anyone's behalf, first invalidates every
    /// mirror over it (`InvalidationEvent::Clear`), then goes on. What a
    /// device that keeps a copy of a system page (read duplication) calls
    /// before it copies: a write after the call drops the copy.
    pub fn track_writes(&self, range: PageRange) {
        self.inner.track_writes(&[range]);
    }

    /// The device memory registered as `id`, if it still is.
    pub fn device_memory(&self, id: crate::page::DeviceId) -> Option<Arc<DeviceMemory>> {
        self.inner.device(id)
    }

    /// Where each page of `range` lives now (as [`Hmm::residency_map`]).
    pub fn residency_map(&self, range: PageRange) -> crate::observe::ResidencyMap {
        crate::observe::residency_map(&self.inner, range)
    }

    /// Marks `mem` failed (as [`Hmm::device_failed`]): its pages are lost,
    /// and a CPU touch of one gets `SIGBUS`. Returns how many were lost.
    pub fn device_failed(&self, mem: &DeviceMemory) -> usize {
        self.inner.poison_device(mem.id())
    }

    /// The kernel's `hmm_range_fault` (as [`Hmm::range_fault`]): call it
    /// under the retry protocol of an [`IntervalNotifier`].
    pub fn range_fault(&self, req: &RangeFault<'_>) -> Result<Vec<PageInfo>, RangeFaultError> {
        self.inner.range_fault(req)
    }

    /// Inserts an interval notifier over `range` (as
    /// [`Hmm::insert_notifier`]); [`RangeFault::address_space`] covers
    /// every address, for a device page table that mirrors them all.
    pub fn insert_notifier(
        &self,
        range: PageRange,
        callback: impl Fn(&Invalidation) + Send + Sync + 'static,
    ) -> IntervalNotifier {
        IntervalNotifier::insert(&self.inner.notifiers, range, Box::new(callback), false)
    }

    /// Inserts an interval notifier whose callback may run in a `SIGBUS`
    /// handler (as [`Hmm::insert_notifier_in_thread`], whose rules it keeps).
    pub fn insert_notifier_in_thread(
        &self,
        range: PageRange,
        callback: impl Fn(&Invalidation) + Send + Sync + 'static,
    ) -> IntervalNotifier {
        IntervalNotifier::insert(&self.inner.notifiers, range, Box::new(callback), true)
    }

    /// Before a device access that does not begin with a
    /// [`range_fault`](Self::range_fault) (which does this itself): waits
    /// until hmm has handled every address-space change the application made
    /// before the call (its `munmap` or `madvise` has returned; hmm hears of
    /// it from an event handled a moment later), so the access sees it. Does
    /// nothing on hmm's fault service thread (in a driver callback), which
    /// cannot wait for itself. Must not be called under a lock a notifier
    /// callback takes.
    pub fn sync_device_access(&self) {
        self.inner.sync_device_access();
    }

    /// The kernel's `make_device_exclusive`: every page of `range` (which
    /// hmm must manage) moves into `mem`, and stays off the CPU's page table
    /// even for coherent memory, so that any CPU access faults (bringing the
    /// page back, which revokes the device's access). Mirrors are
    /// invalidated first (`Exclusive`, with `mem` as the owner). The driver
    /// then maps the pages (a [`range_fault`](Self::range_fault) reports
    /// them as `mem`'s own) and marks its entries atomic.
    ///
    /// Fails with [`HmmError::NeedsManaged`] for memory hmm does not manage,
    /// and with [`HmmError::NotMoved`] naming the first page that did not end
    /// up on `mem`, and why.
    pub fn make_device_exclusive(
        &self,
        range: PageRange,
        mem: &Arc<DeviceMemory>,
    ) -> Result<MigrationReport, HmmError> {
        let inner = &self.inner;
        if inner.find_containing(range).is_err() {
            return Err(HmmError::NeedsManaged { op: "make_exclusive", range });
        }
        inner.notifiers.invalidate(range, InvalidationEvent::Exclusive { owner: mem.id() });
        // Pages of other devices come back first; then everything moves here.
        // Coherent memory is held exclusively off the CPU's page table, so
        // that a CPU touch faults (and revokes): pages already here and
        // mapped for the CPU come back first too.
        for part in crate::mirror::parts(range) {
            inner.range_fault(&RangeFault::fault(part, false, Some(mem.id())))?;
        }
        let coherent = mem.kind() == MemoryKind::Coherent;
        if coherent {
            inner.migrate_to_system(range, mem, mem.ops().dma())?;
        }
        let rep = inner.migrate_to_device_with(range, mem, mem.ops().dma(), !coherent)?;
        if let Some(addr) = first_not_on(inner, range, mem) {
            // Why that page is not there: what the migration said of it, or,
            // when it was already there or elsewhere as the migration looked
            // and has moved since (evicted, or taken by another migration),
            // busy.
            let reason = rep
                .skipped
                .iter()
                .find(|(a, _)| *a == addr)
                .map(|(_, why)| why.clone())
                .filter(|why| !matches!(why, SkipReason::NotSelected(_)))
                .unwrap_or(SkipReason::Busy);
            return Err(HmmError::NotMoved { op: "make_exclusive", addr, reason });
        }
        Ok(rep)
    }

    /// Where a device writes `range` of system memory on its own behalf:
    /// memory hmm manages, or memory handed to [`Hmm::mirror`]. `None` for
    /// any other memory, which a device may read but not write.
    pub fn write_target(&self, range: PageRange) -> Option<WriteTarget> {
        if let Ok(r) = self.inner.find_containing(range) {
            return Some(WriteTarget(Target::Managed(r)));
        }
        self.inner.mirrored_containing(range).map(|m| WriteTarget(Target::Mirrored(m)))
    }

    /// Whether the process's mappings allow writing all of `range` now: a
    /// device re-validates permission with it before writing into its own
    /// memory on the CPU's behalf, where no kernel check runs (an `mprotect`
    /// hmm did not see must not let the device write).
    pub fn allows_write(&self, range: PageRange) -> bool {
        let Ok(q) = self.inner.vma_query() else { return false };
        let Ok(vmas) = q.overlapping(range) else { return false };
        crate::os::vm::first_uncovered(range, &vmas, |v| v.write).is_none()
    }
}

/// The first page of `range` that does not live in `mem`.
fn first_not_on(inner: &Inner, range: PageRange, mem: &DeviceMemory) -> Option<VirtAddr> {
    let Ok(r) = inner.find_containing(range) else { return Some(range.start()) };
    let first = r.index(range.start());
    let t = r.lock();
    t.position(
        first..first + range.pages(),
        |e| !matches!(e.residency(), Residency::Device(p) if p.dev == mem.id()),
    )
    .map(|i| r.page_addr(i))
}

/// System memory a device may write on its own behalf (see
/// [`HmmHandle::write_target`]).
pub struct WriteTarget(Target);

enum Target {
    Managed(Arc<Range>),
    Mirrored(Arc<Mapping>),
}

impl fmt::Debug for WriteTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (what, range) = match &self.0 {
            Target::Managed(r) => ("managed", r.range()),
            Target::Mirrored(m) => ("mirrored", m.range()),
        };
        f.debug_struct("WriteTarget").field("memory", &what).field("range", &range).finish()
    }
}

impl WriteTarget {
    fn mapping(&self) -> &Mapping {
        match &self.0 {
            Target::Managed(r) => r.mapping(),
            Target::Mirrored(m) => m,
        }
    }

    /// All of the memory the target belongs to: the managed range or the
    /// mirrored mapping, whose changes hmm learns of (a device may keep
    /// entries there that only an invalidation takes away).
    pub fn range(&self) -> PageRange {
        match &self.0 {
            Target::Managed(r) => r.range(),
            Target::Mirrored(m) => m.range(),
        }
    }

    /// Writes `data` at `addr` through the kernel, as a device's DMA into
    /// system memory would: a page that is not mapped writable now (the
    /// application unmapped or protected it meanwhile) ends the write with
    /// [`CheckedWriteError::Refused`], saying how many bytes went in first.
    pub fn write_checked(&self, addr: VirtAddr, data: &[u8]) -> Result<(), CheckedWriteError> {
        let m = self.mapping();
        let off = addr.get().checked_sub(m.addr().get()).ok_or(CheckedWriteError::Range(
            crate::addr::RangeError::OutOfBounds { offset: 0, len: data.len(), outer: m.len() },
        ))?;
        m.write_checked(off, data)
    }
}

impl RangeFault<'_> {
    /// The whole user address space, for a notifier (or a device page
    /// table) that mirrors every address of the process.
    pub fn address_space() -> PageRange {
        crate::mirror::address_space()
    }

    /// Refuses a range longer than [`RangeFault::MAX_PAGES`] before a driver
    /// allocates anything for it (a buffer, entries), with the error a
    /// request for it would get.
    pub fn check_size(range: PageRange) -> Result<(), RangeFaultError> {
        crate::mirror::check_size(range)
    }
}
