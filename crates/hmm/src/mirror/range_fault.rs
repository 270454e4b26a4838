//! `range_fault`: a device's fault on the CPU page table, served from hmm's
//! records and the kernel's, with the pages it needs faulted in or brought
//! back (see the [module docs](super)).

use std::time::{Duration, Instant};

use super::request::{FaultFlags, PageInfo, RangeFault, RangeFaultError, check_size};
use crate::addr::{HUGE_PAGE_SIZE, PAGE_SIZE, PageRange, VirtAddr};
use crate::os::pagemap::{Categories, ScanRequest};
use crate::os::vm::VmaInfo;
use crate::page::{DevicePage, Residency};
use crate::state::Inner;
use crate::sync::Arc;

/// What one pass found that needs doing before the answer is final.
#[derive(Default)]
struct Pending {
    /// Pages mid-migration.
    busy: bool,
    /// Runs to populate, and whether for write.
    populate: Vec<(PageRange, bool)>,
    /// Pages of other devices to bring back.
    bring_back: Vec<(VirtAddr, DevicePage)>,
    /// Runs of managed pages reported read-only in a writable area (the zero
    /// page): CPU writes to them are tracked once the answer is final.
    read_only: Vec<PageRange>,
}

impl Inner {
    /// The kernel's `hmm_range_fault` (see [`Hmm::range_fault`](crate::Hmm::range_fault)).
    pub(crate) fn range_fault(
        self: &Arc<Self>,
        req: &RangeFault<'_>,
    ) -> Result<Vec<PageInfo>, RangeFaultError> {
        // Before anything: a pass allocates several entries per page.
        check_size(req.range)?;
        if !req.per_page.is_empty() && req.per_page.len() != req.range.pages() {
            return Err(RangeFaultError::BadRequest(format!(
                "{} per-page flags for {} pages",
                req.per_page.len(),
                req.range.pages()
            )));
        }
        let mut span = crate::trace::span("device fault", crate::trace::Category::DeviceFault);
        if let Some(s) = &mut span {
            s.arg("addr", req.range.start().get() as u64);
            s.arg("pages", req.range.pages() as u64);
        }
        self.sync_device_access();
        let deadline = Instant::now() + req.timeout;
        let mut delay = Duration::from_micros(50);
        loop {
            let (info, pending) = self.range_fault_pass(req)?;
            if !pending.busy && pending.populate.is_empty() && pending.bring_back.is_empty() {
                self.track_writes(&pending.read_only);
                return Ok(info);
            }
            self.resolve(&pending)?;
            if pending.busy {
                if Instant::now() >= deadline {
                    return Err(RangeFaultError::Busy { range: req.range, timeout: req.timeout });
                }
                std::thread::sleep(delay);
                delay = (delay * 2).min(Duration::from_millis(5));
            } else if Instant::now() >= deadline {
                return Err(RangeFaultError::Busy { range: req.range, timeout: req.timeout });
            }
        }
    }

    /// One look at the page tables: the answer, and what must be done first.
    /// Allocates several entries per page: `range_fault` has checked the
    /// size ([`check_size`]).
    fn range_fault_pass(
        &self,
        req: &RangeFault<'_>,
    ) -> Result<(Vec<PageInfo>, Pending), RangeFaultError> {
        let range = req.range;
        let inspect = |error: String| RangeFaultError::Inspect { range, error };
        let n = range.pages();
        let base = range.start().get();
        let page_addr = |i: usize| VirtAddr::new(base + i * PAGE_SIZE);
        let mut info = vec![PageInfo::default(); n];
        // Areas: which pages are mapped, and what they allow.
        let vmas = self.vma_query().map_err(|e| inspect(e.to_string()))?;
        let vmas = vmas.overlapping(range).map_err(|e| inspect(format!("/proc/self/maps: {e}")))?;
        let mut vma_of: Vec<Option<VmaInfo>> = vec![None; n];
        for v in &vmas {
            let (a, b) = clip(range, v.range);
            vma_of[a..b].iter_mut().for_each(|x| *x = Some(*v));
        }
        // The CPU page table.
        let pm = self.pagemap().map_err(|e| inspect(e.to_string()))?;
        let req_scan = ScanRequest {
            return_mask: Categories::PRESENT
                | Categories::PFNZERO
                | Categories::HUGE
                | Categories::FILE
                | Categories::SWAPPED,
            ..ScanRequest::default()
        };
        let mut cats = vec![Categories::NONE; n];
        for region in pm.scan(range, &req_scan).map_err(|e| inspect(e.to_string()))? {
            let (a, b) = clip(range, region.range);
            cats[a..b].iter_mut().for_each(|c| *c = region.categories);
        }
        // hmm's own records, for managed memory.
        let mut residency: Vec<Option<(Residency, bool)>> = vec![None; n];
        let mut cpu_mapped = vec![false; n];
        // Pages of a 2 MiB block that lives whole in one huge device page.
        let mut device_huge = vec![false; n];
        for (r, s, e) in self.overlapping(range.start().get(), range.end().get()) {
            let held = PageRange::new(VirtAddr::new(s), e - s).expect("a part of the range");
            let (a, b) = clip(range, held);
            let first = r.index(page_addr(a));
            let t = r.lock();
            for (k, e) in t.iter(first..first + (b - a)).enumerate() {
                residency[a + k] = Some((e.residency(), e.is_migrating()));
                cpu_mapped[a + k] = e.is_cpu_mapped();
            }
            let mut block = page_addr(a).get() & !(HUGE_PAGE_SIZE - 1);
            while block < base + b * PAGE_SIZE {
                if let Some(whole) = r.huge_block(VirtAddr::new(block)) {
                    let i = r.index(whole.start());
                    if is_device_huge_page(&t, i..i + HUGE_PAGE_SIZE / PAGE_SIZE) {
                        let (x, y) = clip(range, whole);
                        device_huge[x..y].iter_mut().for_each(|h| *h = true);
                    }
                }
                block += HUGE_PAGE_SIZE;
            }
        }
        let mut pending = Pending::default();
        let push_populate = |i: usize, write: bool, pending: &mut Pending| {
            let addr = page_addr(i);
            match pending.populate.last_mut() {
                Some((run, w)) if *w == write && run.end() == addr => {
                    *run = PageRange::new(run.start(), run.len() + PAGE_SIZE).expect("run");
                }
                _ => pending.populate.push((PageRange::from_pages(addr, 1).expect("page"), write)),
            }
        };
        for i in 0..n {
            let want = req.wanted(i);
            let fault = want.contains(FaultFlags::FAULT);
            let write = want.contains(FaultFlags::WRITE);
            let addr = page_addr(i);
            let p = &mut info[i];
            // A page the device must not map: an error, fatal if a fault was asked.
            let unusable = |p: &mut PageInfo, reason: &str| {
                p.error = true;
                match fault {
                    true => Err(RangeFaultError::Fault { addr, reason: reason.into() }),
                    false => Ok(()),
                }
            };
            let Some(v) = vma_of[i].filter(|v| v.read) else {
                let reason =
                    if vma_of[i].is_some() { "no access to it" } else { "nothing is mapped there" };
                unusable(p, reason)?;
                continue;
            };
            if write && !v.write {
                return Err(RangeFaultError::PermissionDenied { addr });
            }
            p.order = v.order();
            match residency[i] {
                Some((_, true)) => {
                    pending.busy = true;
                    continue;
                }
                Some((Residency::Device(d), false)) => {
                    p.device = Some(d);
                    p.coherent = cpu_mapped[i];
                    if Some(d.dev) == req.owner || cpu_mapped[i] {
                        p.valid = true;
                        p.write = v.write;
                        p.order = if device_huge[i] { 9 } else { 0 };
                    } else if fault {
                        pending.bring_back.push((addr, d));
                    }
                    continue;
                }
                Some((Residency::Poisoned, false)) => {
                    unusable(p, "its device failed (the page is poisoned)")?;
                    continue;
                }
                Some((Residency::Unmapped, false)) => {
                    unusable(p, "nothing is mapped there")?;
                    continue;
                }
                _ => {}
            }
            let c = cats[i];
            if c.contains(Categories::PRESENT) {
                p.valid = true;
                p.zero = c.contains(Categories::PFNZERO);
                // A private file page not yet written is shared with the page
                // cache (copy-on-write): not writable until faulted for write.
                p.write = v.write && !p.zero && (!c.contains(Categories::FILE) || v.shared);
                if c.contains(Categories::HUGE) && p.order == 0 {
                    p.order = 9;
                }
            }
            if (fault && !p.valid) || (write && !p.write) {
                push_populate(i, write, &mut pending);
            } else if p.valid && !p.write && v.write && residency[i].is_some() {
                match pending.read_only.last_mut() {
                    Some(run) if run.end() == addr => {
                        *run = PageRange::new(run.start(), run.len() + PAGE_SIZE).expect("run");
                    }
                    _ => pending.read_only.push(PageRange::from_pages(addr, 1).expect("page")),
                }
            }
        }
        Ok((info, pending))
    }

    /// Does what a pass found pending: brings pages back, populates.
    fn resolve(self: &Arc<Self>, pending: &Pending) -> Result<(), RangeFaultError> {
        // Runs of adjacent pages of one device come back in one migration.
        let mut i = 0;
        let bb = &pending.bring_back;
        while i < bb.len() {
            let (addr, d) = bb[i];
            let mut j = i + 1;
            while j < bb.len()
                && bb[j].1.dev == d.dev
                && bb[j].0.get() == addr.get() + (j - i) * PAGE_SIZE
            {
                j += 1;
            }
            let pages = j - i;
            i = j;
            let (Some(r), Some(mem)) = (self.find(addr), self.device(d.dev)) else { continue };
            // A run never leaves the range that holds its first page.
            let end = (addr.get() + pages * PAGE_SIZE).min(r.range().end().get());
            let run = PageRange::new(addr, end - addr.get()).expect("run");
            if let Err(e) = self.bring_back(r, run, &mem) {
                return Err(RangeFaultError::Fault {
                    addr,
                    reason: format!("cannot bring it back from {}: {e}", d.dev),
                });
            }
        }
        for (run, write) in &pending.populate {
            if let Err(e) = self.populate(*run, *write) {
                let errno = match &e {
                    crate::os::mm::MmError::Advise { errno, .. } => *errno,
                    _ => rustix::io::Errno::FAULT,
                };
                return Err(match errno {
                    // The area went away since the pass looked (ENOMEM is also
                    // "not mapped"): the next pass reports it.
                    rustix::io::Errno::NOMEM if !self.still_mapped(*run) => continue,
                    rustix::io::Errno::NOMEM => RangeFaultError::OutOfMemory { addr: run.start() },
                    rustix::io::Errno::INTR | rustix::io::Errno::AGAIN => continue,
                    // In SIGBUS mode, after `populate` touched the run's
                    // empty pages itself: a page emptied again since (a
                    // discard) or gone to a device meanwhile. The next pass
                    // looks again (a lost page it reports; the timeout
                    // bounds the rest).
                    rustix::io::Errno::FAULT if self.uffd.waits_in_thread() => continue,
                    rustix::io::Errno::INVAL => RangeFaultError::Fault {
                        addr: run.start(),
                        reason: "the mapping cannot be faulted in (changed protection, or an I/O mapping)"
                            .into(),
                    },
                    _ => RangeFaultError::Fault { addr: run.start(), reason: e.to_string() },
                });
            }
        }
        Ok(())
    }

    fn still_mapped(&self, run: PageRange) -> bool {
        self.vma_query()
            .ok()
            .and_then(|q| q.overlapping(run).ok())
            .is_some_and(|v| crate::os::vm::first_uncovered(run, &v, |_| true).is_none())
    }
}

/// Whether the entries of a 2 MiB block live in one huge device page: one
/// device's pages, a run aligned to 512 in the block's order, none migrating
/// (the device can map the block with one entry, as a 2 MiB device page).
fn is_device_huge_page(t: &crate::page::PageTable, block: std::ops::Range<usize>) -> bool {
    let Some(first) = t[block.start].device_page() else { return false };
    (first.index as usize).is_multiple_of(block.len())
        && t.iter(block).enumerate().all(|(k, e)| {
            !e.is_migrating()
                && e.device_page()
                    == Some(DevicePage { dev: first.dev, index: first.index + k as u32 })
        })
}

/// The page indices of `part` (clipped) within `range`.
fn clip(range: PageRange, part: PageRange) -> (usize, usize) {
    let s = range.start().get().max(part.start().get());
    let e = range.end().get().min(part.end().get());
    if s >= e {
        return (0, 0);
    }
    ((s - range.start().get()) / PAGE_SIZE, (e - range.start().get()) / PAGE_SIZE)
}
