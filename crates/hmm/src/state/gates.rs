//! What hmm's threads wait on to know another's work is done: the fault
//! service's batches of messages, the fault-injection stall, fork's copies,
//! installs and parking, and which thread is the fault service.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::addr::VirtAddr;

thread_local! {
    static ON_SERVICE: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether this thread is a fault service, which must never wait for its own
/// events (see `crate::coherent`).
pub(crate) fn on_service_thread() -> bool {
    ON_SERVICE.with(|c| c.get())
}

/// Marks this thread as a fault service (see [`on_service_thread`]).
pub(crate) fn mark_service_thread() {
    ON_SERVICE.with(|c| c.set(true));
}

/// Waits until `done()` holds or `deadline` passes; returns whether it
/// held. For states other threads change in microseconds, which no signal
/// announces: a few yields first, then sleeps growing from 20 us to 1 ms,
/// so that a thread the scheduler put aside is not competed with for the
/// CPU.
pub(crate) fn poll_until(deadline: Instant, mut done: impl FnMut() -> bool) -> bool {
    let mut spins = 0u32;
    let mut pause = Duration::from_micros(20);
    while !done() {
        if Instant::now() >= deadline {
            return false;
        }
        if spins < 64 {
            spins += 1;
            std::thread::yield_now();
        } else {
            std::thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(1));
        }
    }
    true
}

/// The batches of messages the service reads, numbered, so that a thread can
/// wait until every message read so far has been handled.
///
/// Why: the kernel lets `munmap` (or `madvise`, `mremap`) return once its
/// event has been *read*, not handled. Until the service handles it, the
/// address may be mapped again and managed anew, and the late event would
/// then unmap the new range's records. [`Inner::settle_events`] closes that
/// window before a range is managed.
///
/// [`Inner::settle_events`]: crate::state::Inner::settle_events
#[derive(Debug, Default)]
pub(crate) struct Batches {
    /// Number of the last batch whose read has begun.
    begun: AtomicU64,
    /// Number of the last batch whose messages have been read and looked
    /// through for unmaps (see [`Inner::pending_unmap`]): moments after its
    /// read, never behind a fault the batch is still serving.
    ///
    /// [`Inner::pending_unmap`]: crate::state::Inner::pending_unmap
    scanned: AtomicU64,
    /// Number of the last batch handled, with its signal.
    done: Mutex<u64>,
    handled: crate::sync::Signal,
    /// `done`, readable without the lock (see [`is_idle`](Self::is_idle)).
    done_seen: AtomicU64,
}

impl Batches {
    /// A batch begins: numbered before the read, so a message read by it
    /// belongs to a number a waiter already sees.
    pub(crate) fn begin(&self) -> u64 {
        self.begun.fetch_add(1, Ordering::SeqCst) + 1
    }

    /// The messages of batch `n` are read and looked through.
    pub(crate) fn scanned(&self, n: u64) {
        self.scanned.fetch_max(n, Ordering::SeqCst);
    }

    /// Waits (up to `limit`, yielding) until every batch begun so far is
    /// read and looked through. Returns whether it was.
    pub(crate) fn wait_scanned(&self, limit: Duration) -> bool {
        let target = self.begun.load(Ordering::SeqCst);
        poll_until(Instant::now() + limit, || self.scanned.load(Ordering::SeqCst) >= target)
    }

    /// Batch `n` is handled.
    pub(crate) fn end(&self, n: u64) {
        let mut d = self.done.lock().unwrap_or_else(|e| e.into_inner());
        *d = (*d).max(n);
        self.done_seen.fetch_max(n, Ordering::SeqCst);
        self.handled.notify_all();
    }

    /// Whether every batch begun so far is handled: no message read is
    /// waiting to be acted on.
    pub(crate) fn is_idle(&self) -> bool {
        let target = self.begun.load(Ordering::SeqCst);
        self.done_seen.load(Ordering::SeqCst) >= target
    }

    /// Waits (up to `limit`) until every batch begun so far is handled.
    /// Returns whether they were.
    pub(crate) fn wait_handled(&self, limit: Duration) -> bool {
        let target = self.begun.load(Ordering::SeqCst);
        let d = self.done.lock().unwrap_or_else(|e| e.into_inner());
        let (_d, timed_out) = self.handled.wait_timeout_while(d, limit, |d| *d < target);
        !timed_out
    }
}

/// Fault injection: stops the fault service in the middle of a fault, after
/// it has read the page's record and before it acts on it
/// ([`Hmm::stall_next_fault`](crate::Hmm::stall_next_fault)), so that tests
/// can change the page meanwhile, as another thread may at any time.
#[derive(Debug, Default)]
pub(crate) struct StallGate {
    armed: AtomicBool,
    state: Mutex<Stall>,
    changed: Condvar,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Stall {
    #[default]
    Off,
    Armed,
    /// The service waits, at the fault of this address.
    Stalled(VirtAddr),
}

impl StallGate {
    fn lock(&self) -> std::sync::MutexGuard<'_, Stall> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the next fault is to stall (a thread serving its own fault
    /// then hands it to the service, where the stall is).
    pub(crate) fn is_armed(&self) -> bool {
        self.armed.load(Ordering::SeqCst)
    }

    pub(crate) fn arm(&self) {
        *self.lock() = Stall::Armed;
        self.armed.store(true, Ordering::Release);
    }

    /// Lets the service go on (or disarms a stall not yet met).
    pub(crate) fn release(&self) {
        self.armed.store(false, Ordering::Release);
        *self.lock() = Stall::Off;
        self.changed.notify_all();
    }

    /// Waits up to `limit` for the service to stop; the fault's address.
    pub(crate) fn wait_stalled(&self, limit: Duration) -> Option<VirtAddr> {
        let st = self.lock();
        let (st, _) = self
            .changed
            .wait_timeout_while(st, limit, |s| !matches!(s, Stall::Stalled(_)))
            .unwrap_or_else(|e| e.into_inner());
        match *st {
            Stall::Stalled(a) => Some(a),
            _ => None,
        }
    }

    /// On the service, at a fault of `addr` read in `batch` (if any): waits
    /// while a stall is armed. The batch counts as handled meanwhile, so a
    /// migration that begins now goes on as one begun before the fault was
    /// read would, instead of waiting for the service.
    pub(crate) fn pause(&self, addr: VirtAddr, batch: Option<(&Batches, u64)>) {
        if !self.armed.load(Ordering::Acquire) {
            return;
        }
        let mut st = self.lock();
        if *st != Stall::Armed {
            return;
        }
        if let Some((batches, n)) = batch {
            batches.end(n);
        }
        *st = Stall::Stalled(addr);
        self.changed.notify_all();
        let _st = self
            .changed
            .wait_while(st, |s| matches!(s, Stall::Stalled(_)))
            .unwrap_or_else(|e| e.into_inner());
    }
}

/// How long fork handlers wait on the fault service or a copy before giving
/// up (with a log line): a stalled service must not hang every fork.
pub(crate) const FORK_WAIT: Duration = Duration::from_secs(30);

/// Copies to forked children in progress, for the fork handlers to wait on.
#[derive(Debug, Default)]
pub(crate) struct Copies {
    pending: Mutex<usize>,
    idle: Condvar,
}

impl Copies {
    pub(crate) fn begin(&self) {
        *self.pending.lock().unwrap_or_else(|e| e.into_inner()) += 1;
    }

    pub(crate) fn end(&self) {
        let mut p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        *p = p.saturating_sub(1);
        self.idle.notify_all();
    }

    /// Waits (up to `limit`) until no copy is in progress.
    pub(crate) fn wait_idle(&self, limit: Duration) -> bool {
        let p = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        let (_p, r) =
            self.idle.wait_timeout_while(p, limit, |p| *p > 0).unwrap_or_else(|e| e.into_inner());
        !r.timed_out()
    }
}

/// Pages put back into this process's page table while a fork is under way.
///
/// The copy to the child takes a page recorded in system memory (and not
/// held by a migration) to be in the child already, by copy-on-write. That
/// holds for a page in the page table at the instant of the fork, but not for
/// one a migration put back after it and committed before the copier looked:
/// the fault service runs again once the fork is read, and a fault-back or a
/// restored source may end in between. So from `prepare` until the copier has
/// looked, every migration notes the pages it may commit to system memory
/// before it commits them (after its last install), and the copier copies
/// those from this process too. A migration that finds no fork open has put
/// its pages back before the fork began.
#[derive(Debug, Default)]
pub(crate) struct Installs {
    open: std::sync::atomic::AtomicBool,
    pages: Mutex<Vec<VirtAddr>>,
}

impl Installs {
    /// Whether a fork is under way (pages committed now must be noted).
    pub(crate) fn is_open(&self) -> bool {
        self.open.load(Ordering::SeqCst)
    }

    pub(crate) fn open(&self) {
        self.pages.lock().unwrap_or_else(|e| e.into_inner()).clear();
        self.open.store(true, Ordering::SeqCst);
    }

    /// Notes `pages`, about to be committed to system memory, if a fork is
    /// under way.
    pub(crate) fn note(&self, pages: impl Iterator<Item = VirtAddr>) {
        if self.open.load(Ordering::SeqCst) {
            self.pages.lock().unwrap_or_else(|e| e.into_inner()).extend(pages);
        }
    }

    /// Ends the noting; returns what was noted.
    pub(crate) fn close(&self) -> Vec<VirtAddr> {
        self.open.store(false, Ordering::SeqCst);
        std::mem::take(&mut *self.pages.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

/// The fault service's side of a fork: parked (reading, not handling)
/// between the fork handlers' `prepare` and `parent`.
#[derive(Debug, Default)]
pub(crate) struct ForkGate {
    /// Asked by `prepare`, lifted by `parent`.
    pub(crate) asked: std::sync::atomic::AtomicBool,
    parked: Mutex<bool>,
    changed: Condvar,
}

impl ForkGate {
    /// The service says whether it is parked.
    pub(crate) fn set_parked(&self, parked: bool) {
        *self.parked.lock().unwrap_or_else(|e| e.into_inner()) = parked;
        self.changed.notify_all();
    }

    pub(crate) fn wait_parked(&self, limit: Duration) -> bool {
        let p = self.parked.lock().unwrap_or_else(|e| e.into_inner());
        let (_p, r) =
            self.changed.wait_timeout_while(p, limit, |p| !*p).unwrap_or_else(|e| e.into_inner());
        !r.timed_out()
    }
}
