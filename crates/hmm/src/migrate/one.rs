//! One device page brought back to system memory with no allocation and no
//! thread hand-off: what a thread serving its own fault does in its `SIGBUS`
//! handler (`FaultMode::InThread`, see `crate::inthread`), and what the
//! fault service does first for the faulting page of a fault-back.
//!
//! For a page recorded `Device(p)`, not migrating, on a device neither failed
//! nor released, whose driver brings pages back this way
//! ([`DevicePagemapOps::copy_to_ram_in_thread`](crate::DevicePagemapOps::copy_to_ram_in_thread)),
//! with every notifier over the page inserted to run in a handler, and no
//! fork asked nor stall armed: take the page as a migration does
//! (`begin_migration`, with a place reserved in the hand-over list),
//! invalidate the mirrors (a one-page `Migrate`), have the driver fill the
//! page ([`InThreadFill`]), commit, free the device page. A step that cannot
//! go on gives the page back (an abort, here when nothing happened to it
//! meanwhile) or hands it over to the fault service ([`Handover`]), which
//! finishes it as a one-page [`Migration`](super::Migration) by every
//! migration's rules. Allocates and frees nothing, takes only hmm's locks
//! and the driver's (see `crate::inthread` for why that is enough in a
//! handler).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::addr::{PageRange, VirtAddr};
use crate::devmem::{DeviceMemory, InThreadFill};
use crate::page::{DevicePage, Residency};
use crate::state::{Handover, Inner, Range};

/// What [`fault_back_one`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum OneFault {
    /// The page is in place.
    Served,
    /// The page was lost with its device (a touch gets SIGBUS).
    Lost,
    /// Not done this way: the page is as it was (or handed over).
    No,
}

/// Brings the device page of `r` at `page` back (see the module docs).
/// `in_thread`: called from a `SIGBUS` handler rather than by the fault
/// service (which acts in the order of its messages, and brings the
/// fault-around window back itself).
pub(crate) fn fault_back_one(
    inner: &Arc<Inner>,
    r: &Arc<Range>,
    page: VirtAddr,
    in_thread: bool,
) -> OneFault {
    // A batch of messages the service has read and not acted on (an unmap, a
    // discard, a move): a thread in its handler does not overtake it. (The
    // service itself acts in the order of its messages.)
    let idle = || !in_thread || inner.batches.is_idle();
    if inner.fork_gate.asked.load(Ordering::SeqCst) || inner.fault_stall.is_armed() {
        return OneFault::No;
    }
    if r.huge {
        return OneFault::No;
    }
    let i = r.index(page);
    let p = {
        let mut t = r.lock();
        let e = t[i];
        if e.residency() == Residency::Poisoned && !e.is_migrating() {
            // Lost with its device: the signal is the page's contents
            // (see `OneFault::Lost`).
            return OneFault::Lost;
        }
        let Residency::Device(p) = e.residency() else { return OneFault::No };
        if e.is_migrating() || e.is_cpu_mapped() || !inner.handovers.reserve() {
            return OneFault::No;
        }
        t[i].begin_migration().expect("checked: a device page no migration holds");
        p
    };
    let one = PageRange::from_pages(page, 1).expect("one page");
    let devices = inner.devices.read().unwrap_or_else(|e| e.into_inner());
    let mem = devices.get(p.dev.index()).and_then(Option::as_ref);
    // Mirrors drop their translations before the page leaves (as in
    // `Migration::setup_in`), with the page taken: a mirror inserted after
    // this finds it migrating.
    let event = crate::mirror::InvalidationEvent::Migrate { owner: Some(p.dev) };
    let installed = match mem {
        Some(mem)
            if !mem.is_failed()
                && !mem.is_released()
                && inner.notifiers.invalidate_in_thread(one, event)
                && idle() =>
        {
            copy_in(inner, mem, p, one, in_thread)
        }
        _ => false,
    };
    if !installed {
        give_back(inner, r, i, page, p, in_thread);
        return OneFault::No;
    }
    let mem = mem.expect("installed from it");
    // Counted before the commit, as the service counts before its wake.
    r.counters.cpu_faults.fetch_add(1, Ordering::Relaxed);
    mem.counters.cpu_faults.fetch_add(1, Ordering::Relaxed);
    if in_thread {
        inner.counters.faults_in_thread.fetch_add(1, Ordering::Relaxed);
    }
    // A fork under way notes the pages committed to system memory, and an
    // invalidation or a move that came meanwhile has its own rules: the
    // service finishes those (the thread has its page either way).
    // So is a batch of messages the service began reading meanwhile (an
    // unmap, a discard or a move it has not acted on yet).
    let committed = !inner.fork_installs.is_open() && idle() && {
        let mut t = r.lock();
        let e = &mut t[i];
        !e.is_invalidated() && e.commit(Residency::System).expect("taken above")
    };
    if !committed {
        hand_over(inner, r, page, p, true);
        return OneFault::Served;
    }
    inner.handovers.unreserve();
    r.settled.notify_all();
    mem.put_one(p);
    r.counters.migrated_to_system.fetch_add(1, Ordering::Relaxed);
    mem.counters.migrated_to_system.fetch_add(1, Ordering::Relaxed);
    // Threads that touched the page meanwhile wait for the service's wake.
    let _ = inner.uffd.wake(one);
    if in_thread && inner.config.fault_around_pages > 1 && inner.handovers.ask_around(page, p.dev) {
        inner.notifier.notify();
    }
    OneFault::Served
}

/// Has the driver install device page `p` at `one` (`in_handler`: from the
/// faulting thread's handler). Returns whether it did.
fn copy_in(
    inner: &Inner,
    mem: &DeviceMemory,
    p: DevicePage,
    one: PageRange,
    in_handler: bool,
) -> bool {
    let mut fill = InThreadFill::new(&inner.uffd, one, in_handler);
    // What is in place decides, whatever the driver returned.
    let _ = mem.ops().copy_to_ram_in_thread(p, &mut fill);
    fill.filled()
}

/// Gives back the page taken at `page` (index `i` of `r`), not installed:
/// here when nothing happened to it meanwhile (the thread then hands its
/// fault to the service, which must not find the page still taken by it),
/// else through the service (see [`Handover`]). The fault service, which
/// goes on at once to bring the page back as a migration (whose end wakes
/// the page), wakes no one here: a wake now would only have the faulting
/// thread fault again.
fn give_back(
    inner: &Inner,
    r: &Arc<Range>,
    i: usize,
    page: VirtAddr,
    p: DevicePage,
    in_thread: bool,
) {
    let kept = {
        let mut t = r.lock();
        let e = &mut t[i];
        !e.is_invalidated() && e.abort().expect("taken above")
    };
    if !kept {
        hand_over(inner, r, page, p, false);
        return;
    }
    inner.handovers.unreserve();
    r.settled.notify_all();
    if in_thread {
        // Threads that touched the page meanwhile wait for the service's wake.
        let _ = inner.uffd.wake(PageRange::from_pages(page, 1).expect("one page"));
    }
}

/// Leaves the page taken at `page` to the service (see [`Handover`]).
fn hand_over(inner: &Inner, r: &Arc<Range>, page: VirtAddr, p: DevicePage, installed: bool) {
    inner.handovers.push(Handover { range: r.clone(), addr: page, page: p, installed });
    inner.notifier.notify();
}
