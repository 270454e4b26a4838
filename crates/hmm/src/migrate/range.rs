//! The whole-range helpers a device calls (the kernel's drivers each write
//! these around `migrate_vma_*`): migrate a range to a device, back to
//! system memory, between devices, or to where the caller runs, in batches.

use std::sync::Arc;

use super::{Migration, MigrationReport, Selection};
use crate::addr::{PAGE_SIZE, PageRange, VirtAddr};
use crate::devmem::DeviceMemory;
use crate::error::{HmmError, SkipReason};
use crate::page::DeviceId;
use crate::state::{Inner, Range, devices_of, runs_of};

impl Inner {
    /// Brings the pages of `part` (inside `r`) that live on `mem` back to system
    /// memory with the device's own engine.
    pub(crate) fn bring_back(
        self: &Arc<Self>,
        r: Arc<Range>,
        part: PageRange,
        mem: &DeviceMemory,
    ) -> Result<MigrationReport, HmmError> {
        let sel = Selection::Device(mem.id());
        let mut m = Migration::setup_in(self, r, part, sel, sel.owner())?;
        m.copy(mem.ops().dma());
        Ok(m.finalize())
    }

    pub(crate) fn migrate_to_device(
        self: &Arc<Self>,
        range: PageRange,
        mem: &Arc<DeviceMemory>,
        engine: &dyn crate::dma::DmaEngine,
    ) -> Result<MigrationReport, HmmError> {
        self.migrate_to_device_with(range, mem, engine, true)
    }

    /// [`migrate_to_device`](Self::migrate_to_device); `map_for_cpu` false
    /// leaves pages that land in coherent memory unmapped for the CPU, so a
    /// CPU touch faults them back (exclusive access).
    pub(crate) fn migrate_to_device_with(
        self: &Arc<Self>,
        range: PageRange,
        mem: &Arc<DeviceMemory>,
        engine: &dyn crate::dma::DmaEngine,
        map_for_cpu: bool,
    ) -> Result<MigrationReport, HmmError> {
        if mem.is_released() {
            return Err(self.unknown_device(mem.id()));
        }
        self.find_managed(range, "migrate to a device")?;
        self.check_accessible(range, "migrate to a device")?;
        let mut report = self.migrate_to_device_once(range, mem, engine, map_for_cpu)?;
        // A page the kernel would not move because this process does not
        // hold it alone (shared copy-on-write since a fork, even after the
        // child exited: the kernel marks an anonymous page exclusive again
        // only at a write fault) is unshared by `MADV_POPULATE_WRITE`, a write
        // fault that changes no byte, and tried once more, as the kernel's own
        // migration would move it. (Pages busy for other reasons, held by
        // another migration or pinned, are tried again to no harm.)
        let busy: Vec<VirtAddr> = report
            .skipped
            .iter()
            .filter(|(_, r)| *r == SkipReason::Busy)
            .map(|(a, _)| *a)
            .collect();
        if busy.is_empty() {
            return Ok(report);
        }
        report.skipped.retain(|(_, r)| *r != SkipReason::Busy);
        for run in runs_of(&busy) {
            if self.populate(run, true).is_ok() {
                report.append(self.migrate_to_device_once(run, mem, engine, map_for_cpu)?);
            } else {
                let page = |i| VirtAddr::new(run.start().get() + i * PAGE_SIZE);
                report.skipped.extend((0..run.pages()).map(|i| (page(i), SkipReason::Busy)));
            }
        }
        Ok(report)
    }

    /// One try of [`migrate_to_device_with`](Self::migrate_to_device_with).
    fn migrate_to_device_once(
        self: &Arc<Self>,
        range: PageRange,
        mem: &Arc<DeviceMemory>,
        engine: &dyn crate::dma::DmaEngine,
        map_for_cpu: bool,
    ) -> Result<MigrationReport, HmmError> {
        // Pipelined: while the engine copies one batch, the next is set up and
        // given its device pages, and the one before is finalized.
        let mut in_flight: Option<Migration> = None;
        let mut report = self.migrate_batches(range, |r| {
            let mut m = Migration::setup_for(self.clone(), r, Selection::System, Some(mem.id()))?;
            m.keep_on_device(range);
            if !map_for_cpu {
                m.keep_off_cpu();
            }
            m.allocate_on(mem);
            m.start_copy(engine);
            Ok(in_flight.replace(m).map(Migration::finalize).unwrap_or_default())
        })?;
        if let Some(m) = in_flight {
            report.append(m.finalize());
        }
        Ok(report)
    }

    pub(crate) fn migrate_to_system(
        self: &Arc<Self>,
        range: PageRange,
        mem: &Arc<DeviceMemory>,
        engine: &dyn crate::dma::DmaEngine,
    ) -> Result<MigrationReport, HmmError> {
        self.check_accessible(range, "migrate to system memory")?;
        self.migrate_batches(range, |r| {
            let mut m = Migration::setup(self.clone(), r, Selection::Device(mem.id()))?;
            m.copy(engine);
            Ok(m.finalize())
        })
    }

    /// Migrates the pages of `range` that live on `from` into `to`: directly
    /// when both take part in peer-to-peer copies (the destination's engine
    /// reads `from`'s memory), through system memory otherwise (back with
    /// `from`'s engine, then out with `to`'s). `from`'s mirrors are
    /// invalidated and its pages freed as each page lands.
    pub(crate) fn migrate_device_to_device(
        self: &Arc<Self>,
        range: PageRange,
        from: &Arc<DeviceMemory>,
        to: &Arc<DeviceMemory>,
    ) -> Result<MigrationReport, HmmError> {
        self.check_accessible(range, "migrate between devices")?;
        if to.is_released() {
            return Err(self.unknown_device(to.id()));
        }
        if from.id() == to.id() {
            return Ok(MigrationReport::default());
        }
        self.find_containing(range)?;
        let direct = from.ops().peer_memory().is_some()
            && to.ops().peer_memory().is_some()
            && to.ops().dma().reads_peers();
        self.migrate_batches(range, |r| {
            if direct {
                let mut m = Migration::setup_for(
                    self.clone(),
                    r,
                    Selection::Peer(from.id()),
                    Some(to.id()),
                )?;
                m.keep_on_device(range);
                m.allocate_on(to);
                m.copy(to.ops().dma());
                return Ok(m.finalize());
            }
            // Through system memory: only the pages that came back move on.
            let mut m = Migration::setup(self.clone(), r, Selection::Device(from.id()))?;
            m.copy(from.ops().dma());
            let back = m.finalize();
            let mut stayed = vec![false; r.pages()];
            for (a, _) in &back.skipped {
                stayed[(a.get() - r.start().get()) / PAGE_SIZE] = true;
            }
            let mut report =
                MigrationReport { migrated: 0, skipped: back.skipped, evicted: back.evicted };
            let mut k = 0;
            while k < stayed.len() {
                let n = stayed[k..].iter().take_while(|s| !**s).count();
                if n > 0 {
                    let part = r.subrange(k * PAGE_SIZE, n * PAGE_SIZE)?;
                    let mut m =
                        Migration::setup_for(self.clone(), part, Selection::System, Some(to.id()))?;
                    m.keep_on_device(range);
                    m.allocate_on(to);
                    m.copy(to.ops().dma());
                    report.append(m.finalize());
                }
                k += n + 1;
            }
            Ok(report)
        })
    }

    /// Migrates every page of `range` into `to`, wherever it lives: system
    /// memory (and never-populated pages), or any other device
    /// ([`migrate_device_to_device`](Self::migrate_device_to_device)).
    pub(crate) fn migrate_here(
        self: &Arc<Self>,
        range: PageRange,
        to: &Arc<DeviceMemory>,
    ) -> Result<MigrationReport, HmmError> {
        let rec = self.find_managed(range, "migrate to a device")?;
        self.check_accessible(range, "migrate to a device")?;
        let first = rec.index(range.start());
        let others: Vec<DeviceId> = devices_of(&rec.lock(), first..first + range.pages())
            .into_iter()
            .filter(|d| *d != to.id())
            .collect();
        let mut report = MigrationReport::default();
        for d in others {
            if let Some(from) = self.device(d) {
                let mut r = self.migrate_device_to_device(range, &from, to)?;
                // Pages of other kinds are the other passes' business.
                r.skipped.retain(|(_, why)| !matches!(why, SkipReason::NotSelected(_)));
                report.append(r);
            }
        }
        let mut r = self.migrate_to_device(range, to, to.ops().dma())?;
        r.skipped.retain(|(_, why)| !matches!(why, SkipReason::NotSelected(_)));
        report.append(r);
        Ok(report)
    }

    fn migrate_batches(
        &self,
        range: PageRange,
        mut batch: impl FnMut(PageRange) -> Result<MigrationReport, HmmError>,
    ) -> Result<MigrationReport, HmmError> {
        const BATCH: usize = 16 << 20;
        self.find_containing(range)?;
        self.settle_before_migrating();
        let mut report = MigrationReport::default();
        let mut off = 0;
        while off < range.len() {
            let len = BATCH.min(range.len() - off);
            report.append(batch(range.subrange(off, len)?)?);
            off += len;
        }
        Ok(report)
    }
}
