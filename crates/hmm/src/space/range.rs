//! Handles of managed memory: [`ManagedRange`], its pins, mirrored ranges,
//! and the fault-injection stall.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::addr::{PAGE_SIZE, PageRange, RangeError, VirtAddr};
use crate::error::HmmError;
use crate::mirror::InvalidationEvent;
use crate::os::mm::{Advise, Mapping, MmError, Protection};
use crate::page::{PageEntry, Residency};
use crate::state::{Inner, Range, RangeStats, Residence, devices_of, runs_where};

/// A range of memory managed by an [`Hmm`](crate::Hmm) instance.
///
/// The CPU reaches its bytes through [`read`](Self::read) and
/// [`write`](Self::write) (or through raw pointers, see
/// [`as_ptr`](Self::as_ptr)); a touch of a page that lives on a device brings
/// it back first. Dropping the handle frees memory hmm created, and hands
/// adopted memory back in system memory.
pub struct ManagedRange {
    pub(crate) inner: Arc<Inner>,
    pub(super) range: Arc<Range>,
}

impl fmt::Debug for ManagedRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ManagedRange").field("range", &self.range.range()).finish()
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

    /// Makes every page of `part` present in system memory, for write: its
    /// device pages come back and the rest is faulted in. What a kernel
    /// access to the memory (`read(2)` into it, `write(2)` from it) needs in
    /// [`FaultMode::InThread`](crate::FaultMode::InThread), where the kernel
    /// cannot wait for a fault and fails with `EFAULT` instead. A migration
    /// may take the pages again afterwards: [`pin`](Self::pin) keeps them.
    pub fn populate(&self, part: PageRange) -> Result<(), HmmError> {
        self.range.mapping().check(part).map_err(MmError::from)?;
        self.bring_home(part, "populate")
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
        // Counted first: from now on no migration takes these pages to a
        // device, so bringing them back converges however busy other threads
        // are with migrations of their own. Given back (the `Pin` dropped) if
        // they cannot be had.
        {
            let mut pins = self.range.lock_pins();
            for i in idx.clone() {
                *pins.entry(i).or_default() += 1;
            }
        }
        let pin = Pin { range: self.range.clone(), pages: idx };
        self.bring_home(part, "pin")?;
        Ok(pin)
    }

    /// Brings `part` (checked to lie in this range) back from its devices
    /// and faults it in for write, again until every page is settled in
    /// system memory with nothing mid-migration, within a bound.
    ///
    /// A round can fall short when another thread's migration holds some
    /// pages (an eviction to make room on a shared device, the rest of a
    /// fault-around window): the migration back skips them as busy, and in
    /// [`FaultMode::InThread`](crate::FaultMode::InThread) the kernel's
    /// fault-in fails with `EFAULT` on a page still on a device rather than
    /// waiting for it. Neither is final: the next round, a moment later,
    /// finds those pages home or brings them. A lost page (poisoned,
    /// unmapped) is final and reported at once; after the last round, the
    /// fault-in's error, or [`SkipReason::Busy`](crate::migrate::SkipReason::Busy)
    /// if it succeeded while pages were still moving.
    fn bring_home(&self, part: PageRange, op: &'static str) -> Result<(), HmmError> {
        let first = self.range.index(part.start());
        let idx = first..first + part.pages();
        let mut last = None;
        for _ in 0..100 {
            let devs = devices_of(&self.range.lock(), idx.clone());
            for dev in devs {
                if let Some(mem) = self.inner.device(dev) {
                    self.inner.migrate_to_system(part, &mem, mem.ops().dma())?;
                }
            }
            let populated = self.inner.populate(part, true);
            let t = self.range.lock();
            let settled = !t.any(idx.clone(), |e| {
                e.is_migrating() || !matches!(e.residency(), Residency::System | Residency::None)
            });
            if settled && populated.is_ok() {
                return Ok(());
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
                    op,
                    addr: self.range.page_addr(first + k),
                    reason,
                });
            }
            last = populated.err();
            drop(t);
            std::thread::sleep(Duration::from_millis(1));
        }
        Err(match last {
            Some(e) => e.into(),
            None => HmmError::NotMoved {
                op,
                addr: part.start(),
                reason: crate::migrate::SkipReason::Busy,
            },
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

/// Pages of a managed range pinned in system memory ([`ManagedRange::pin`](crate::ManagedRange::pin));
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
/// ([`Hmm::stall_next_fault`](crate::Hmm::stall_next_fault)).
#[must_use = "the fault service goes on as soon as the guard is dropped"]
#[derive(Debug)]
pub struct FaultStall {
    pub(super) gate: Arc<crate::state::StallGate>,
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

/// Memory handed to [`Hmm::mirror`](crate::Hmm::mirror): devices may read and write it through
/// their page tables; hmm never migrates it.
#[derive(Debug)]
pub struct MirroredRange {
    pub(super) inner: Arc<Inner>,
    pub(super) mapping: Arc<Mapping>,
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
