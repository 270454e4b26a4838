//! Coherent device memory: device pages the CPU maps directly.
//!
//! A coherent region's memory is a file (for the software device, a memfd)
//! whose page `i` is device page `i`. When a migration commits pages to such
//! a region, hmm maps the file's pages over the pages' addresses
//! (`Inner::coherent_map`): CPU reads and writes then reach device memory
//! without faulting, and the device sees them. The record says so
//! ([`PageEntry::is_cpu_mapped`](crate::page::PageEntry::is_cpu_mapped)).
//! Before a migration takes such a page away (back to system memory, to
//! another device, on eviction or device failure), hmm puts an empty piece
//! of anonymous memory, registered with its userfaultfd like the rest of the
//! range, in the file's place with one `mremap` (`Inner::coherent_unmap`):
//! from then on a CPU touch waits in the fault service, as for any page in
//! migration, and no write can land in the device page after it was copied.
//!
//! A coherent page that is *not* mapped for the CPU (exclusive access, or a
//! map that failed) behaves as a private page: a CPU touch faults it back.
//! So a failure to map never loses data; it only costs the coherence.
//!
//! # The kernel's view, and hmm's own events
//!
//! The mapped pieces are shared file areas inside the managed range. They are
//! registered with hmm's userfaultfd (missing mode: their pages are always
//! present, so nothing faults), so an application's `munmap` or `mremap` of
//! them is reported like any other. hmm's own changes report events too: the
//! `mmap` over a registered piece an `UNMAP`; the `mremap` an `UNMAP` of the
//! piece it replaces, a `REMAP` of the donor and an `UNMAP` of the donor's old
//! range. Each is recorded before the call (`OwnChange`) and the fault
//! service drops the event that matches it; after the call (which returns once
//! its events are read) hmm waits until they are handled and forgets any
//! record no event took. These calls block until the fault service reads their
//! events, so they are never made on the fault service itself.
//!
//! # Fork
//!
//! A shared file area would be shared with a forked child, against
//! copy-on-write. So the fork handlers' `prepare` moves every coherent page
//! that is mapped for the CPU back to system memory before the process forks,
//! and no page is mapped for the CPU until the fork is over (migrations
//! meanwhile leave their coherent pages unmapped, which is always safe). The
//! mapped pieces are also `MADV_DONTFORK`: a fork made without the C library's
//! handlers (a raw `clone`) gives the child no mapping there, never a shared one.

use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::addr::{PAGE_SIZE, PageRange};
use crate::devmem::DeviceMemory;
use crate::os::mm::{Advise, Mapping, Protection};
use crate::os::uffd::RegisterMode;
use crate::state::{Inner, OwnChange, Range};

/// The protection of an area, as `PROCMAP_QUERY` reports it.
fn protection(read: bool, write: bool) -> Protection {
    match (read, write) {
        (_, true) => Protection::ReadWrite,
        (true, false) => Protection::Read,
        (false, false) => Protection::None,
    }
}

impl Inner {
    /// After the calls that made `changes` returned (their events are read):
    /// waits until the service has handled them, then forgets any no event took.
    fn settle_own(&self, changes: &[OwnChange]) {
        if !self.batches.wait_handled(Duration::from_secs(2)) {
            tracing::warn!("the fault service did not handle hmm's own events within 2 s");
        }
        for c in changes {
            self.take_own_change(*c);
        }
    }

    /// The areas of `run` with their protection, in order; an error when part
    /// of it is not mapped.
    fn pieces(&self, run: PageRange) -> Result<Vec<(PageRange, Protection)>, String> {
        let q = self.vma_query().map_err(|e| format!("cannot read the areas: {e}"))?;
        let vmas = q.overlapping(run).map_err(|e| format!("cannot read the areas: {e}"))?;
        if crate::os::vm::first_uncovered(run, &vmas, |_| true).is_some() {
            return Err(format!("part of {run} is not mapped"));
        }
        Ok(vmas
            .iter()
            .filter_map(|v| {
                let s = v.range.start().max(run.start());
                let e = v.range.end().min(run.end());
                let part = PageRange::new(s, e.get().checked_sub(s.get())?).ok()?;
                Some((part, protection(v.read, v.write)))
            })
            .collect())
    }

    /// Whether coherent pages may be mapped for the CPU now (not while the
    /// process forks). On `true` the caller holds a map-in until
    /// [`end_coherent_map`](Self::end_coherent_map).
    pub(crate) fn begin_coherent_map(&self) -> bool {
        self.coherent_maps.fetch_add(1, Ordering::SeqCst);
        if self.coherent_forking.load(Ordering::SeqCst) {
            self.coherent_maps.fetch_sub(1, Ordering::SeqCst);
            return false;
        }
        true
    }

    pub(crate) fn end_coherent_map(&self) {
        self.coherent_maps.fetch_sub(1, Ordering::SeqCst);
    }

    /// Maps device pages `first.index..` of the coherent region `mem` over
    /// `run` (inside range `r`), one area at a time with the area's own
    /// protection, registers the new areas with hmm's userfaultfd and marks
    /// them `MADV_DONTFORK`. The caller holds the pages (migrating) and a
    /// map-in ([`begin_coherent_map`](Self::begin_coherent_map)).
    pub(crate) fn coherent_map(
        &self,
        r: &Range,
        run: PageRange,
        mem: &DeviceMemory,
        first: u32,
    ) -> Result<(), String> {
        let ops = mem.ops().clone();
        let Some(file) = ops.coherent_file() else {
            return Err(format!("{} offers no memory the CPU can map", mem.name()));
        };
        let mapping = r.mapping();
        let mut own = Vec::new();
        let mut result = Ok(());
        for (piece, prot) in self.pieces(run)? {
            let offset =
                (first as usize * PAGE_SIZE + (piece.start().get() - run.start().get())) as u64;
            let change = OwnChange::Unmap(piece);
            self.expect_own(&[change]);
            own.push(change);
            if let Err(e) = mapping.map_file_over(piece, file, offset, prot) {
                result = Err(format!("cannot map device memory at {piece}: {e}"));
                break;
            }
            if let Err(e) = self.uffd.register(mapping, piece, RegisterMode::MISSING) {
                tracing::warn!(%piece, error = %e, "coherent memory not registered: its unmap would go unseen");
            }
            if let Err(e) = mapping.advise(piece, Advise::DontFork) {
                tracing::warn!(%piece, error = %e, "coherent memory not kept from forked children");
            }
        }
        self.settle_own(&own);
        result
    }

    /// Puts empty anonymous memory, registered with hmm's userfaultfd as the
    /// range is, in place of the coherent pages mapped over `run` (inside
    /// range `r`), keeping each area's protection. The caller holds the pages
    /// (migrating): a CPU touch then waits for the migration.
    pub(crate) fn coherent_unmap(&self, r: &Range, run: PageRange) -> Result<(), String> {
        self.swap_in_empty(r, r.mapping(), run)
    }

    /// [`coherent_unmap`](Self::coherent_unmap) at `run`, where an
    /// application's `mremap` moved coherent pages of range `r` (the pages
    /// are held by the forward that carries them on, so a touch waits).
    ///
    /// The new address belongs to the application, which could unmap it
    /// and map something else there meanwhile: every area of `run` must
    /// still be a shared file mapping (what the moved device memory is), or
    /// nothing is replaced. A window remains between that check and the
    /// swap, in which only an application changing the same addresses from
    /// another thread could put something there.
    pub(crate) fn coherent_unmap_moved(&self, r: &Range, run: PageRange) -> Result<(), String> {
        let q = self.vma_query().map_err(|e| format!("cannot read the areas: {e}"))?;
        let vmas = q.overlapping(run).map_err(|e| format!("cannot read the areas: {e}"))?;
        if crate::os::vm::first_uncovered(run, &vmas, |v| v.shared && v.file).is_some() {
            return Err(format!("{run} no longer maps device memory; left as it is"));
        }
        self.swap_in_empty(r, &r.mapping().moved_to(run), run)
    }

    /// Replaces each area of `run` (inside `mapping`) by empty anonymous
    /// memory of the same protection, registered as range `r` is.
    fn swap_in_empty(&self, r: &Range, mapping: &Mapping, run: PageRange) -> Result<(), String> {
        let mode =
            if r.wp { RegisterMode::MISSING | RegisterMode::WP } else { RegisterMode::MISSING };
        let mut own = Vec::new();
        let mut result = Ok(());
        for (piece, prot) in self.pieces(run)? {
            let donor = match Mapping::anonymous(piece.len(), prot) {
                Ok(d) => d,
                Err(e) => {
                    result = Err(format!("no memory to unmap {piece}: {e}"));
                    break;
                }
            };
            if let Err(e) = self.uffd.register(&donor, donor.range(), mode) {
                result = Err(format!("cannot register the memory to unmap {piece}: {e}"));
                break;
            }
            let changes = [
                OwnChange::Unmap(piece),
                OwnChange::Remap(donor.addr(), piece.start(), piece.len()),
                OwnChange::Unmap(donor.range()),
            ];
            self.expect_own(&changes);
            own.extend_from_slice(&changes);
            if let Err((donor, e)) = mapping.replace_part(piece, donor) {
                let _ = self.uffd.unregister(donor.range());
                result = Err(format!("cannot unmap device memory at {piece}: {e}"));
                break;
            }
        }
        self.settle_own(&own);
        result
    }
}
