//! `FaultMode::InThread`: a CPU touch of a device page served by the touching
//! thread itself, in a `SIGBUS` handler (userfaultfd's SIGBUS mode, see
//! [`crate::os::sigbus`]).
//!
//! # The fast path
//!
//! For a page whose record says `Device(p)`, not migrating, on a device that
//! is neither failed nor released, with no mirror over the page, and whose
//! driver copies in the thread
//! ([`DevicePagemapOps::copy_to_ram_in_thread`]), the handler:
//!
//! 1. takes the page as a migration does (`begin_migration`, under the
//!    range's table lock), after reserving a place in the hand-over list;
//! 2. has the driver install the page's bytes with one fill
//!    ([`InThreadFill`](crate::InThreadFill): a move out of device memory the
//!    CPU can address, or a copy);
//! 3. commits the record to `System` under the table lock, frees the device
//!    page, counts, and releases any thread that waits for the page in the
//!    service's waiting room;
//! 4. asks the service for the fault-around window, which it brings back
//!    while the thread goes on.
//!
//! A step that cannot go on (no driver copy, `EAGAIN` from the fill while the
//! address space changes, an invalidation or a fork that came meanwhile)
//! hands the page over to the fault service ([`Handover`]), which finishes
//! it as a one-page migration (`Migration::finish`: the same commit or abort
//! rules, the same remap forwarding and fork noting), and the thread waits in
//! the waiting room ([`Uffd::wait_in_thread`](crate::os::uffd::Uffd::wait_in_thread))
//! if it still needs the page.
//!
//! # The slow path
//!
//! Every other fault (a never-populated page, a page mid-migration, a
//! write-protect fault, a poisoned page, an address awaiting a remap's data)
//! is handed to the fault service, which reads it as a `PageFault` message
//! and serves it as in `FaultMode::Service`; the thread waits in its handler
//! for the wake the service would have given it in the kernel.
//!
//! # What the handler may do
//!
//! It neither allocates nor frees (the interrupted code may be the
//! allocator's), and it takes only hmm's own locks: the list of instances,
//! an instance's registry, device list, notifier tree and a range's table,
//! a device's free list. hmm never touches managed memory while it holds any
//! of them (the fault service takes the same ones to serve a touch in
//! `FaultMode::Service`, so a touch under one would hang there too). Nothing
//! it holds is dropped in the handler: the range and the device are borrowed
//! under their lists' read locks, and what goes on to the service (an
//! `Arc<Range>` in a hand-over) is moved into room reserved beforehand.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::addr::VirtAddr;
use crate::error::HmmError;
use crate::migrate::{OneFault, fault_back_one};
use crate::os::sigbus::{self, BusFault, Verdict};
use crate::os::uffd::{FaultFlags, Waited};
use crate::state::{FORKING, IN_THREAD, IN_THREAD_HELD, Inner, in_thread_slot, registry_changes};

/// How long a thread whose fault found no seat in the waiting room, or
/// whose fill met an address-space change, sleeps before its instruction
/// faults again.
const NAP: Duration = Duration::from_micros(200);

/// How long a shut-down instance waits for handlers that hold it.
const HELD_WAIT: Duration = Duration::from_secs(10);

/// Serializes the writers of `IN_THREAD` (each swaps in a new list).
static LIST_WRITERS: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Replaces the list of in-thread instances with `change` applied to a copy
/// of it: the new list is made, and the old one freed, outside the list's
/// lock, since the allocator may be what a faulting thread interrupted.
fn change_list(change: impl FnOnce(&mut Vec<Arc<Inner>>)) {
    let _w = LIST_WRITERS.lock().unwrap_or_else(|e| e.into_inner());
    let mut list = IN_THREAD.read().unwrap_or_else(|e| e.into_inner()).clone();
    change(&mut list);
    let old = std::mem::replace(&mut *IN_THREAD.write().unwrap_or_else(|e| e.into_inner()), list);
    drop(old);
}

/// Serves `inner`'s faults in the faulting threads from now on.
pub(crate) fn enable(inner: &Arc<Inner>) -> Result<(), HmmError> {
    sigbus::install(hook).map_err(|e| {
        HmmError::Config(format!(
            "FaultMode::InThread cannot install its SIGBUS handler ({e}): use FaultMode::Service"
        ))
    })?;
    // The fork handlers hold the list across `fork()`.
    crate::fork::install_handlers();
    change_list(|l| l.push(inner.clone()));
    Ok(())
}

/// Stops serving `inner`'s faults (its descriptor is closed: no more come),
/// then waits for the handlers that still hold it. Should one not let go in
/// time, the instance is leaked rather than freed in its handler.
pub(crate) fn disable(inner: &Arc<Inner>) {
    change_list(|l| l.retain(|i| !Arc::ptr_eq(i, inner)));
    let deadline = std::time::Instant::now() + HELD_WAIT;
    let held = &IN_THREAD_HELD[in_thread_slot(inner)];
    if !crate::state::poll_until(deadline, || held.load(Ordering::SeqCst) == 0) {
        tracing::error!("a thread still waits in its SIGBUS handler; leaking the instance");
        std::mem::forget(inner.clone());
    }
}

/// The process's `SIGBUS` hook (see the module docs for what it may do).
///
/// The list of instances is held only while the fault is looked at and
/// served in the thread, never while it waits for the service: a fork
/// (whose handlers take the list) must not wait for a thread that waits for
/// a parked service.
fn hook(f: &BusFault) -> Verdict {
    if crate::state::on_service_thread() {
        // The service waiting on itself would hang: let the signal kill.
        return Verdict::NotMine;
    }
    let page = f.addr.page_down();
    let pid = sigbus::current_pid();
    let look = |list: &[Arc<Inner>]| -> Result<(Arc<Inner>, FaultFlags), Verdict> {
        for inner in list {
            if inner.pid != pid {
                // A forked child's copy of its parent's instance, which
                // serves nothing here: the child's pages were copied before
                // its fork handler let it run, and what the kernel still
                // reports there gets the signal, as in `FaultMode::Service`
                // (where the kernel raises `SIGBUS` for a fault it cannot
                // queue).
                continue;
            }
            match serve(inner, page, f) {
                Served::NotMine => continue,
                Served::Done => return Err(Verdict::Retry),
                Served::Wait(flags) => return Ok((inner.clone(), flags)),
            }
        }
        Err(Verdict::NotMine)
    };
    // The thread running the fork handlers holds the list to write: a fault
    // of its own there (another library's fork handler touching managed
    // memory) is not served, and gets its signal, rather than deadlock.
    if FORKING.with(std::cell::Cell::get) {
        return Verdict::NotMine;
    }
    let seen = registry_changes();
    let found = {
        let list = IN_THREAD.read().unwrap_or_else(|e| e.into_inner());
        let found = look(&list);
        if let Ok((inner, _)) = &found {
            // Counted under the list's lock: `disable` takes the instance
            // out, then waits for this count to fall.
            IN_THREAD_HELD[in_thread_slot(inner)].fetch_add(1, Ordering::SeqCst);
        }
        found
    };
    let (inner, flags) = match found {
        Ok(x) => x,
        Err(Verdict::NotMine) => return unclaimed(page, pid, seen),
        Err(v) => return v,
    };
    let slot = in_thread_slot(&inner);
    inner.counters.faults_handed_over.fetch_add(1, Ordering::Relaxed);
    let waited = inner.uffd.wait_in_thread(page, flags, || inner.notifier.notify());
    // Never the last reference: `disable` waits for the count below.
    drop(inner);
    IN_THREAD_HELD[slot].fetch_sub(1, Ordering::SeqCst);
    match waited {
        Waited::Woken => Verdict::Retry,
        Waited::Refused => Verdict::NotMine,
        Waited::NoSeat => {
            sigbus::nap(NAP);
            Verdict::Retry
        }
    }
}

thread_local! {
    /// The last page no instance claimed on this thread, with the count of
    /// registry changes seen before it was looked up (see [`unclaimed`]).
    static UNCLAIMED: std::cell::Cell<(usize, u64)> = const { std::cell::Cell::new((0, 0)) };
}

/// No instance claims `page`: the signal is the application's, unless the
/// fault is older than what the handler saw. The kernel raises it while the
/// address is registered, and the thread may run its handler only after
/// the range left (a range is taken out of the registry, then unregistered,
/// then its home cut: a fault from before the unregistration finds nothing),
/// or before the service has read the change that brought the address in
/// (the new home of an `mremap`). So the instruction runs again once: a
/// stale fault then either succeeds or faults on what the address is now.
/// The same page refused again with no registry change in between is
/// refused for good, unless a change waits to be read (the thread naps and
/// looks again).
fn unclaimed(page: VirtAddr, pid: u32, seen: u64) -> Verdict {
    let last = UNCLAIMED.with(|c| c.replace((page.get(), seen)));
    if last != (page.get(), seen) {
        return Verdict::Retry;
    }
    let unread = {
        let list = IN_THREAD.read().unwrap_or_else(|e| e.into_inner());
        list.iter().filter(|i| i.pid == pid).any(|i| !i.batches.is_idle() || i.uffd.unread())
    };
    if unread {
        sigbus::nap(NAP);
        return Verdict::Retry;
    }
    UNCLAIMED.with(|c| c.set((0, 0)));
    Verdict::NotMine
}

/// What [`serve`] did.
enum Served {
    NotMine,
    Done,
    /// The thread waits for the service, with the fault's flags.
    Wait(FaultFlags),
}

/// Serves a fault on `page` if `inner` owns the address.
///
/// Messages the service has read but not acted on may change what the page
/// is (an unmap, a discard, a move): in the normal mode a fault queued
/// after them is served after them. So while the service is in the middle of
/// a batch the thread yields and faults again; with the batches handled, the
/// registry and the records say what the page is.
fn serve(inner: &Arc<Inner>, page: VirtAddr, f: &BusFault) -> Served {
    if !inner.batches.is_idle() {
        sigbus::yield_now();
        return Served::Done;
    }
    let wp = f.present == Some(true) && f.write == Some(true);
    // The range is borrowed under the registry's lock, never cloned: its
    // last reference is never dropped here.
    let ranges = inner.ranges.read().unwrap_or_else(|e| e.into_inner());
    match ranges.find(page.get()) {
        None if !ranges.is_home(page.get()) && !inner.forwards.awaits(page) => {
            return Served::NotMine;
        }
        Some(r) if !wp && !crate::trace::enabled() => match fault_back_one(inner, r, page, true) {
            OneFault::Served => return Served::Done,
            OneFault::Lost => return Served::NotMine,
            OneFault::No => {}
        },
        _ => {}
    }
    Served::Wait(FaultFlags { write: f.write.unwrap_or(false), wp, minor: false })
}
