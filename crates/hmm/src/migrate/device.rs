//! A device's pages as a whole: eviction, release, and poisoning when the
//! device fails.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::addr::{PAGE_SIZE, PageRange, VirtAddr};
use crate::error::HmmError;
use crate::mirror::InvalidationEvent;
use crate::os::uffd::Features;
use crate::page::{DeviceId, DevicePage};
use crate::state::{Inner, Range, runs_of};

impl Inner {
    /// Evicts `pages` of device `dev`, grouped into runs of adjacent addresses.
    pub(crate) fn evict(
        self: &Arc<Self>,
        dev: DeviceId,
        pages: &[DevicePage],
    ) -> Result<usize, HmmError> {
        let mem = self.device(dev).ok_or_else(|| self.unknown_device(dev))?;
        let addrs: Vec<VirtAddr> = pages.iter().filter_map(|p| mem.backs(*p)).collect();
        let mut moved = 0;
        for run in runs_of(&addrs) {
            // A run may span ranges only if they are adjacent: split at range ends.
            let mut at = run.start();
            while at < run.end() {
                let Some(r) = self.find(at) else {
                    at = VirtAddr::new(at.get() + PAGE_SIZE);
                    continue;
                };
                let end = r.range().end().min(run.end());
                let part = PageRange::new(at, end.get() - at.get())?;
                moved += self.bring_back(r, part, &mem)?.migrated;
                at = end;
            }
        }
        Ok(moved)
    }

    /// Evicts every page of `dev`, retrying pages caught mid-migration for up to
    /// about a second.
    pub(crate) fn evict_all(self: &Arc<Self>, dev: DeviceId) -> Result<(), HmmError> {
        let mem = self.device(dev).ok_or_else(|| self.unknown_device(dev))?;
        if mem.is_failed() {
            // Nothing can be read off it: its pages were poisoned as it
            // failed, and those a migration held are as the migration ends.
            return Ok(());
        }
        for attempt in 0.. {
            let pages: Vec<DevicePage> = mem.resident_pages().into_iter().map(|(p, _)| p).collect();
            if pages.is_empty() {
                return Ok(());
            }
            self.evict(dev, &pages)?;
            if attempt > 1000 {
                return Err(HmmError::PagesLeft { device: dev, pages: pages.len() });
            }
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        unreachable!("the loop returns")
    }

    /// Evicts every page of `dev` (retrying pages caught mid-migration), then
    /// unregisters it.
    pub(crate) fn release_device(self: &Arc<Self>, dev: DeviceId) -> Result<(), HmmError> {
        if let Err(e) = self.evict_all(dev) {
            tracing::error!(device = %dev, error = %e, "releasing the device anyway");
        }
        // A region that still holds pages (held by a migration or a fork's
        // copy as eviction looked, say) stays in its slot, released: what
        // ends their hold (a poison, a free) must reach it, and its id is
        // given again only once it holds none. One that holds none goes (and
        // its engine with it).
        let mut devs = self.devices.write().unwrap_or_else(|e| e.into_inner());
        if let Some(slot) = devs.get_mut(dev.index())
            && let Some(mem) = slot.take()
        {
            mem.set_released();
            if mem.allocated_pages() > 0 {
                tracing::debug!(device = %dev, pages = mem.allocated_pages(), "a released device still holds pages");
                *slot = Some(mem);
            }
        }
        Ok(())
    }

    /// Poisons every page living on `dev`; returns how many.
    pub(crate) fn poison_device(&self, dev: DeviceId) -> usize {
        let Some(mem) = self.device(dev) else { return 0 };
        mem.set_failed();
        // Coherent pages the CPU maps come off its page table first (held as
        // a migration holds them meanwhile), so that the poison can go in.
        for (page, addr) in mem.resident_pages() {
            let Some(r) = self.find(addr) else { continue };
            let i = r.index(addr);
            {
                let mut t = r.lock();
                if t[i].device_page() != Some(page) || !t[i].is_cpu_mapped() {
                    continue;
                }
                if t[i].begin_migration().is_err() {
                    continue;
                }
            }
            let one = PageRange::from_pages(addr, 1).expect("one page");
            let off = self.coherent_unmap(&r, one);
            let mut t = r.lock();
            if let Err(e) = &off {
                tracing::error!(%addr, error = %e, "a failed device's coherent page stays mapped");
            } else {
                let _ = t[i].set_cpu_mapped(false);
            }
            let kept = t[i].abort().unwrap_or(true);
            drop(t);
            if !kept {
                // Discarded or unmapped meanwhile: nothing left to poison.
                mem.put(page);
            }
            // A touch that waited meanwhile faults again: on a failed device's
            // page, that is SIGBUS.
            let _ = self.uffd.wake(one);
        }
        // Pages mid-migration are skipped here: a migration that ends with
        // one still on this device poisons it then (see `Migration::finish`).
        let mut poisoned = 0;
        for (page, addr) in mem.resident_pages() {
            if let Some(r) = self.find(addr)
                && self.poison_resident(&r, addr, page)
            {
                poisoned += 1;
            }
        }
        poisoned
    }

    /// Poisons the page at `addr` of `r` if it still lives in `page` (of a
    /// failed device) and no migration holds it: the marker goes in its place
    /// (the address is empty while the page lives on the device), so the
    /// next touch gets SIGBUS, and the device page is freed. Returns whether
    /// it did.
    pub(crate) fn poison_resident(&self, r: &Arc<Range>, addr: VirtAddr, page: DevicePage) -> bool {
        let i = r.index(addr);
        let one = PageRange::from_pages(addr, 1).expect("one page");
        // Mirrors first: the page's contents are about to be lost.
        let _inv = self.notifiers.start(one, InvalidationEvent::Clear);
        let mem = self.device(page.dev);
        let mut t = r.lock();
        if t[i].device_page() != Some(page) || t[i].is_migrating() {
            return false;
        }
        let res = self.uffd.poison(one, false);
        if res.is_err() && !self.uffd.features().contains(Features::POISON) {
            tracing::error!(%addr, "UFFDIO_POISON unavailable: the page stays lost on a failed device");
            return false;
        }
        // Counted before the record says so: whoever sees the page poisoned
        // sees it counted.
        r.counters.pages_poisoned.fetch_add(1, Ordering::Relaxed);
        if let Some(mem) = &mem {
            mem.counters.pages_poisoned.fetch_add(1, Ordering::Relaxed);
        }
        t[i].poison().expect("device page, not migrating");
        drop(t);
        self.put_page(page);
        true
    }
}
