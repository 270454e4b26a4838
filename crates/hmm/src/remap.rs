//! `mremap` of managed memory: the data of device-resident pages, and of pages
//! a migration holds, follows the move to the new address.
//!
//! # What the kernel does, and what is left to hmm
//!
//! `mremap` moves the page tables: pages in system memory go with them, and
//! so do the pages of a migration that the kernel still maps. What it cannot
//! move is what hmm keeps outside the page tables: device pages, pages a
//! migration has staged, and copies in flight. The kernel reports the move
//! with a `REMAP` event (old address, new address, length) and, when the old
//! range goes away, an `UNMAP` event of the old range after it
//! (`MREMAP_DONTUNMAP` leaves it mapped, empty and still registered).
//!
//! # Forwarding
//!
//! On `REMAP` the fault service (`Forward::start`):
//! - drops every mirror's translations of the old range (an `Unmap`
//!   invalidation);
//! - records the old pages as empty (`None`: a following `UNMAP` makes them
//!   `Unmapped`; after `MREMAP_DONTUNMAP` they read as zeros, as the kernel
//!   says they must);
//! - takes each device page of the old range as a migration would take it
//!   (the entry becomes migrating), and marks it and every page a migration
//!   already holds `moved`;
//! - records a forward: old range, new address, pages still to arrive.
//!
//! The data is then handed on, never dropped:
//! - a device page the service took is copied by its device's DMA engine to
//!   the new address by the forward's own thread (`hmm-remap`): the copy
//!   cannot run on the service thread, because the kernel refuses fills with
//!   `EAGAIN` until the service has read the `UNMAP` that follows;
//! - a migration that ends with a `moved` page hands whichever side holds the
//!   data (its staged source, its device source or destination, or the page
//!   it installed at the old address) to the forward (`hand_over`) instead of
//!   freeing it; so does a fork copy that held the page.
//!
//! Until every page has arrived a CPU touch of the new range waits (the
//! fault service leaves such faults to the forward, `Forwards::awaits`).
//! Once the last page is in place the forward wakes the waiting threads: the
//! new range is then ordinary memory that hmm does not manage.
//!
//! # The new range stays registered
//!
//! The kernel carries the registration with hmm's userfaultfd over to the
//! new range, and hmm leaves it so: the fault service serves a touch of an
//! absent page there as plain memory (the zero page). hmm never unregisters
//! an address range the application may unmap: from the moment the
//! application's `munmap` has taken the memory away (before hmm even hears
//! of it) the kernel may place other memory there, such as the new home of
//! another `mremap` of managed memory, which carries the registration too;
//! an unregister of the old addresses would silently take it from that
//! memory, whose device pages would then never arrive and read as zeros.
//!
//! A coherent device page that the CPU maps moves with the page tables as a
//! file mapping: the forward swaps empty registered memory over the old
//! address (still mapped only after `MREMAP_DONTUNMAP`) and the new one
//! before copying it ([`Source::Mapped`]), so no address keeps reaching a
//! device page that is freed.
//!
//! A range moved again before its pages have arrived is not followed: its
//! pages would be delivered at the address of the first move. The old range
//! of a `MREMAP_DONTUNMAP` moved again at once is: its pages are empty, and
//! the second move carries nothing (the pages the first forward still holds
//! are its own to give back, not the second's to wait for).

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::addr::{PageRange, VirtAddr};
use crate::dma::{DmaError, ToSystem};
use crate::mirror::InvalidationEvent;
use crate::page::Residency;
use crate::state::{Forward, Inner, Item, Range, Source};

/// The fault service's handling of `REMAP`: `[from, from + len)` moved to
/// `to` (see the module docs).
pub(crate) fn start(inner: &Arc<Inner>, from: usize, to: usize, len: usize) {
    let (Ok(old), Ok(_)) =
        (PageRange::new(VirtAddr::new(from), len), PageRange::new(VirtAddr::new(to), len))
    else {
        return;
    };
    let mut waiting = 0;
    // Pages whose data the page tables do not carry: the counter's.
    let mut forwarded = 0u64;
    let mut held = Vec::new();
    let mut awaited = Vec::new();
    // Held from before the first page is marked moved until the forward is
    // listed: a migration that ends meanwhile with a page marked here hands
    // it over then, and must find this forward.
    let mut list;
    {
        // Held until the records are updated: a device fill in between would
        // map a page about to leave.
        let _inv = inner.notifiers.start(old, InvalidationEvent::Unmap);
        list = inner.forwards.lock();
        for (r, s, e) in inner.overlapping(from, from + len) {
            let (a, b) = r.clip(s, e);
            let mut t = r.lock();
            for i in a..b {
                if t[i].is_blank() {
                    // Nothing there: nothing to hand on, and nothing to record.
                    continue;
                }
                let e = &mut t[i];
                let src = match e.residency() {
                    // Held by the forward of an earlier move of this address
                    // (which `MREMAP_DONTUNMAP` left mapped): its data is on
                    // its way to that move's new address, and this address
                    // holds nothing of it. That forward gives the record
                    // back; this one must not wait for it.
                    _ if e.is_migrating() && e.is_moved() => continue,
                    _ if e.is_migrating() => None,
                    Residency::Device(p) if e.is_cpu_mapped() => {
                        let _ = e.set_cpu_mapped(false);
                        Some(Source::Mapped(p))
                    }
                    Residency::Device(p) => Some(Source::Device(p)),
                    Residency::System => Some(Source::OldAddress),
                    _ => {
                        // Nothing there, or (poisoned) its marker went with
                        // the page tables.
                        let _ = e.invalidate(false);
                        continue;
                    }
                };
                // Held by a migration (which hands it over), or taken here.
                forwarded += u64::from(!matches!(src, Some(Source::OldAddress)));
                match src {
                    Some(src) => {
                        e.begin_migration().expect("a page not migrating can be taken");
                        held.push(Item { src, range: r.clone(), index: i });
                    }
                    None => awaited.push(r.page_addr(i)),
                }
                e.mark_moved().expect("migrating");
                waiting += 1;
            }
        }
    }
    if waiting == 0 {
        // Nothing to wait for: the new range is plain memory at once (and
        // stays registered, see the module docs).
        return;
    }
    list.push(Forward { from: old, to: VirtAddr::new(to), waiting, ready: held, awaited });
    drop(list);
    inner.counters.remaps_forwarded.fetch_add(forwarded, Ordering::Relaxed);
    let me = inner.clone();
    let spawned =
        std::thread::Builder::new().name("hmm-remap".into()).spawn(move || deliver_all(&me, old));
    if let Err(e) = spawned {
        // No thread: deliver here. The copies then wait for the service to
        // read the events that follow, which it cannot do meanwhile; they
        // give up after their bounded retries, and what could not be
        // delivered is poisoned rather than silently lost.
        tracing::error!(error = %e, "cannot start the remap thread; delivering on the fault service");
        deliver_all(inner, old);
    }
}

/// The forward's thread: delivers what is handed over until every page of
/// the forward of `old` has arrived, then wakes the threads waiting there.
fn deliver_all(inner: &Arc<Inner>, old: PageRange) {
    loop {
        let (items, done, new) = {
            let mut list = inner.forwards.lock();
            let Some(k) = list.iter().position(|f| f.from == old) else { return };
            if list[k].waiting == 0 {
                let f = list.remove(k);
                (Vec::new(), true, f.new_range())
            } else if list[k].ready.is_empty() {
                // Wait for migrations still holding pages to hand them over.
                let _w = inner
                    .forwards
                    .changed
                    .wait_timeout(list, Duration::from_millis(100))
                    .unwrap_or_else(|e| e.into_inner());
                continue;
            } else {
                let f = &mut list[k];
                (std::mem::take(&mut f.ready), false, f.new_range())
            }
        };
        if done {
            inner.forwards.changed.notify_all();
            // A fault service asked to park for a fork waits for this.
            if inner.fork_gate.asked.load(Ordering::SeqCst) {
                inner.notifier.notify();
            }
            // Touches of the new range waited for this (`Forwards::awaits`):
            // they fault again and find their pages. (Should the application
            // have unmapped the range and the addresses hold other memory by
            // now, a thread waiting there just faults again.)
            let _ = inner.uffd.wake(new);
            return;
        }
        let n = items.len();
        // Fills fail with EAGAIN while an address-space change (the UNMAP that
        // follows a moving remap) is unread: let the service read and handle
        // it first, which also says whether the old range is gone.
        inner.settle_events_off_service();
        for item in items {
            let at = item.range.page_addr(item.index);
            let dst = VirtAddr::new(new.start().get() + (at.get() - old.start().get()));
            deliver(inner, &item.range, item.index, dst, item.src);
            // The data has arrived: the old address is empty (or unmapped, if
            // the UNMAP that follows a moving remap came meanwhile).
            let kept = item.range.lock()[item.index].abort().expect("a held page aborts");
            debug_assert!(!kept, "a moved page never stays");
            item.range.settled.notify_all();
            let _ = inner.uffd.wake(PageRange::from_pages(at, 1).expect("one page"));
        }
        let mut list = inner.forwards.lock();
        if let Some(f) = list.iter_mut().find(|f| f.from == old) {
            f.waiting = f.waiting.saturating_sub(n);
        }
    }
}

/// Puts the data of page `index` of `range` (held by the forward) at `dst`,
/// its new address. A page whose data cannot be delivered is poisoned there,
/// so the CPU sees SIGBUS rather than wrong bytes.
fn deliver(inner: &Inner, range: &Range, index: usize, dst: VirtAddr, src: Source) {
    let page = PageRange::from_pages(dst, 1).expect("one page");
    let result = match src {
        Source::Nothing => Ok(()),
        Source::Device(p) => {
            let r = match inner.device(p.dev) {
                Some(mem) => {
                    // A copy short of memory is tried again until memory can
                    // be had, as a fault-back is, and one that met the address
                    // space changing (another thread's unmap, say) once the
                    // fault service has read the change: a touch of the new
                    // address waits meanwhile, and giving up would lose the page.
                    let copies = [ToSystem { src: p, dst }];
                    let results = crate::dma::copy_to_system_retrying(
                        mem.ops().dma(),
                        &inner.sink,
                        &copies,
                        |_| {
                            inner.settle_events_off_service();
                            !inner.stopping.load(Ordering::Acquire) && !mem.is_failed()
                        },
                    );
                    match results.into_iter().next() {
                        Some(Err(e)) if e != DmaError::Exists => Err(e.to_string()),
                        _ => Ok(()),
                    }
                }
                None => Err(format!("its device {} is gone", p.dev)),
            };
            inner.put_page(p);
            r
        }
        Source::Mapped(p) => {
            // After MREMAP_DONTUNMAP the old address still maps the page (a
            // moving remap's UNMAP, handled before any delivery, would have
            // recorded it unmapped): the old address is emptied first, then
            // the new one, and the page is copied as any device page. A touch
            // of either waits meanwhile (the old page is held, the new one
            // is the forward's), so no write can land in the page after the
            // copy.
            let old = PageRange::from_pages(range.page_addr(index), 1).expect("one page");
            if !range.lock()[index].is_unmapped()
                && let Err(e) = inner.coherent_unmap(range, old)
            {
                tracing::error!(%old, error = %e, "the old address of a remapped coherent page stays mapped; its device page is kept");
                return;
            }
            if let Err(e) = inner.coherent_unmap_moved(range, page) {
                tracing::error!(%dst, error = %e, "a remapped coherent page stays mapped at its new address; its device page is kept");
                return;
            }
            return deliver(inner, range, index, dst, Source::Device(p));
        }
        Source::Staged(staging, at) => inner.put_back(page, &staging, at),
        Source::OldAddress => {
            // A page at the old address after the move was put there by hmm
            // (a migration or fault-back acting before it heard of the move;
            // the page has been held since, so nothing else took it): the
            // application's own touches of the emptied old range wait behind
            // the REMAP event. If the old range is gone, so is any such page
            // (and the kernel moved every earlier one).
            if range.lock()[index].is_unmapped() {
                return;
            }
            // Where the kernel refuses to move it, the page is copied, which
            // reads the old address: empty there (the move took the page, or
            // there never was one), that read faults on memory hmm manages
            // and holds, and the fault service serves it with the zero page
            // rather than leave this thread waiting on its own hold.
            let at = PageRange::from_pages(range.page_addr(index), 1).expect("one page");
            if !inner.holds_page(at) {
                // Most often: the kernel moved it with the page tables.
                return;
            }
            let put = inner.read_held(at.start(), || inner.put_back(page, range.mapping(), at));
            if let Err(e) = put {
                tracing::debug!(old = %at, error = %e, "nothing to carry from the old address");
            }
            Ok(())
        }
    };
    if let Err(e) = result {
        tracing::error!(%dst, error = %e, "cannot deliver a remapped page; poisoning it");
        poison_new(inner, page);
    }
}

/// Poisons `page` of a new range whose data cannot be delivered, so that a
/// touch gets SIGBUS. The new range is not managed: a touch of an absent page
/// there is served as plain memory (zeros), so the marker must go in.
/// Retried while the address space is changing, until the fault service has
/// read the change; any other refusal (the application unmapped the range
/// meanwhile) leaves nothing there to protect.
fn poison_new(inner: &Inner, page: PageRange) {
    for _ in 0..1000 {
        match inner.uffd.poison(page, false) {
            Err(e) if e.kind == crate::os::uffd::FillErrorKind::Again => {
                inner.settle_events_off_service()
            }
            Err(e) => {
                tracing::error!(%page, error = %e, "cannot poison an undeliverable remapped page");
                return;
            }
            Ok(_) => return,
        }
        if inner.stopping.load(Ordering::Acquire) {
            return;
        }
    }
    tracing::error!(%page, "the address space kept changing; an undeliverable remapped page is not poisoned");
}
