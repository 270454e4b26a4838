//! Interval notifiers: who hears of a change to the address space, and the
//! sequence numbers of the retry protocol (see the [module docs](super)).

use super::request::address_space;
use crate::addr::PageRange;
use crate::interval::{IntervalKey, IntervalTree};
use crate::page::DeviceId;
use crate::sync::{Arc, AtomicU64, Condvar, Mutex, Ordering, RwLock};

/// What changed, as the kernel's `mmu_notifier_event`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InvalidationEvent {
    /// The range was unmapped (`munmap`, `mremap` away, a range dropped).
    Unmap,
    /// The pages were discarded (`MADV_DONTNEED`, `MADV_REMOVE`) or lost
    /// (poisoned with their device); the range stays mapped.
    Clear,
    /// The protection changed (`mprotect` through hmm).
    Protection,
    /// The pages are being migrated, for `owner` (the device whose memory is
    /// the destination, or the device whose pages come back). A device may
    /// ignore its own migrations only if it updates its table itself.
    Migrate {
        /// The device the migration is for.
        owner: Option<DeviceId>,
    },
    /// The address space is going away (the `Hmm` instance shuts down).
    Release,
    /// A device takes exclusive access to the pages.
    Exclusive {
        /// The device taking them.
        owner: DeviceId,
    },
    /// The process forked: pages became copy-on-write.
    Fork,
}

/// One invalidation, as a callback receives it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Invalidation {
    /// The part of the changed range this notifier covers.
    pub range: PageRange,
    /// What changed.
    pub event: InvalidationEvent,
    /// The notifier's new sequence number.
    pub seq: u64,
}

pub(crate) type Callback = Box<dyn Fn(&Invalidation) + Send + Sync>;

/// One notifier's state, shared between its handle and the registry.
pub(crate) struct NotifierState {
    range: PageRange,
    /// Set to a new value when an invalidation starts.
    seq: AtomicU64,
    /// Invalidations in progress, and fills waiting for them to end.
    busy: Mutex<Busy>,
    idle: Condvar,
    callback: Callback,
    /// The callback keeps the rules of a `SIGBUS` handler (see
    /// [`Notifiers::invalidate_in_thread`]).
    in_thread: bool,
}

/// A notifier's invalidations in progress and the threads waiting for them
/// to end. The waiters count themselves here, under the lock, so that the
/// end of an invalidation wakes (a system call) only when someone waits:
/// almost never, while every migration and fault-back ends one.
#[derive(Default)]
struct Busy {
    running: u32,
    waiting: u32,
}

impl NotifierState {
    fn end(&self) {
        let mut b = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        b.running -= 1;
        if b.running == 0 && b.waiting > 0 {
            self.idle.notify_all();
        }
    }

    /// Waits until no invalidation is in progress; returns the lock.
    fn lock_idle(&self) -> crate::sync::MutexGuard<'_, Busy> {
        let mut b = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        if b.running > 0 {
            b.waiting += 1;
            while b.running > 0 {
                b = self.idle.wait(b).unwrap_or_else(|e| e.into_inner());
            }
            b.waiting -= 1;
        }
        b
    }

    fn wait_idle(&self) {
        drop(self.lock_idle());
    }

    /// [`IntervalNotifier::read_begin`]. The sequence is read under the
    /// `busy` lock, under which `Notifiers::start` moves it, once no
    /// invalidation is in progress: read after waiting without the lock, it
    /// could be the sequence of an invalidation that started in between and
    /// is still running, which `read_retry` would then let pass.
    pub(crate) fn read_begin(&self) -> u64 {
        let _idle = self.lock_idle();
        self.seq.load(Ordering::Acquire)
    }

    /// [`IntervalNotifier::read_retry`].
    pub(crate) fn read_retry(&self, seq: u64) -> bool {
        self.seq.load(Ordering::Acquire) != seq
    }
}

/// The registry of an instance's notifiers.
pub(crate) struct Notifiers {
    tree: RwLock<IntervalTree<Arc<NotifierState>>>,
    /// The last sequence number handed out (always even; 0 before any).
    seq: AtomicU64,
}

impl std::fmt::Debug for Notifiers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifiers").field("seq", &self.seq.load(Ordering::Relaxed)).finish()
    }
}

impl Notifiers {
    pub(crate) fn new() -> Self {
        Self { tree: RwLock::new(IntervalTree::new()), seq: AtomicU64::new(0) }
    }

    /// Calls every notifier overlapping `range` with `event`, and keeps them
    /// *invalidating* until the returned guard is dropped: the caller makes
    /// its change to the page tables meanwhile, and no device can start a
    /// fill ([`IntervalNotifier::read_begin`] waits) until it is done (the
    /// kernel's `invalidate_range_start` / `_end`). The callbacks run on the
    /// calling thread, one after another, and have all returned when this does.
    pub(crate) fn start(&self, range: PageRange, event: InvalidationEvent) -> Invalidating {
        // Every notifier is marked busy and its sequence moved before any
        // callback runs, so a fill of any of them that checks after this point
        // retries. Both under the notifier's `busy` lock, under which
        // `read_begin` reads the sequence: it gets the new one only once the
        // invalidation has ended. And before the tree's lock is let go, so that
        // a removal (which takes it to write, then waits until the notifier is
        // not busy) cannot return before this invalidation's callback runs.
        let mut seq = 0;
        let hits: Vec<Arc<NotifierState>> = {
            let tree = self.tree.read().unwrap_or_else(|e| e.into_inner());
            let mut v = Vec::new();
            tree.for_each_overlapping(range.start().get(), range.end().get(), |_, _, _, n| {
                if seq == 0 {
                    seq = self.seq.fetch_add(2, Ordering::AcqRel) + 2;
                }
                let mut busy = n.busy.lock().unwrap_or_else(|e| e.into_inner());
                busy.running += 1;
                n.seq.store(seq, Ordering::Release);
                drop(busy);
                v.push(n.clone())
            });
            v
        };
        if hits.is_empty() {
            return Invalidating(hits, None);
        }
        let mut span = crate::trace::span("invalidate", crate::trace::Category::Invalidate);
        if let Some(s) = &mut span {
            s.arg("addr", range.start().get() as u64);
            s.arg("pages", range.pages() as u64);
            s.arg("notifiers", hits.len() as u64);
        }
        for n in &hits {
            let start = range.start().max(n.range.start());
            let end = range.end().min(n.range.end());
            let part = PageRange::new(start, end.get() - start.get()).expect("overlap");
            (n.callback)(&Invalidation { range: part, event, seq });
        }
        Invalidating(hits, span)
    }

    /// [`start`](Self::start) for a change already made visible to fills
    /// (pages marked migrating first): the invalidation ends at once.
    /// Returns how many notifiers were called.
    pub(crate) fn invalidate(&self, range: PageRange, event: InvalidationEvent) -> usize {
        self.start(range, event).0.len()
    }

    /// [`invalidate`](Self::invalidate) from a `SIGBUS` handler
    /// (`FaultMode::InThread`, see `crate::inthread`): allocates and frees
    /// nothing, and holds the tree's lock throughout (so no notifier is
    /// removed, and freed, under it). Does nothing and returns false if a
    /// notifier over `range` was not inserted for this
    /// ([`Hmm::insert_notifier_in_thread`](crate::Hmm::insert_notifier_in_thread)).
    pub(crate) fn invalidate_in_thread(&self, range: PageRange, event: InvalidationEvent) -> bool {
        let tree = self.tree.read().unwrap_or_else(|e| e.into_inner());
        let (start, end) = (range.start().get(), range.end().get());
        let (mut hits, mut all_in_thread) = (0, true);
        tree.for_each_overlapping(start, end, |_, _, _, n| {
            hits += 1;
            all_in_thread &= n.in_thread;
        });
        if hits == 0 {
            return true;
        }
        if !all_in_thread {
            return false;
        }
        let seq = self.seq.fetch_add(2, Ordering::AcqRel) + 2;
        tree.for_each_overlapping(start, end, |_, _, _, n| {
            let mut busy = n.busy.lock().unwrap_or_else(|e| e.into_inner());
            busy.running += 1;
            n.seq.store(seq, Ordering::Release);
        });
        tree.for_each_overlapping(start, end, |_, _, _, n| {
            let s = range.start().max(n.range.start());
            let e = range.end().min(n.range.end());
            let part = PageRange::new(s, e.get() - s.get()).expect("overlap");
            (n.callback)(&Invalidation { range: part, event, seq });
        });
        tree.for_each_overlapping(start, end, |_, _, _, n| n.end());
        true
    }

    /// Invalidates everything (shut-down).
    pub(crate) fn invalidate_all(&self, event: InvalidationEvent) -> usize {
        self.invalidate(address_space(), event)
    }

    pub(crate) fn len(&self) -> usize {
        self.tree.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Adds a notifier over `range` ([`IntervalNotifier::insert`] wraps it
    /// with the instance; the model tests use it bare).
    pub(crate) fn register(
        &self,
        range: PageRange,
        callback: Callback,
        in_thread: bool,
    ) -> (IntervalKey, Arc<NotifierState>) {
        let state = Arc::new(NotifierState {
            range,
            seq: AtomicU64::new(self.seq.load(Ordering::Acquire)),
            busy: Mutex::new(Busy::default()),
            idle: Condvar::new(),
            callback,
            in_thread,
        });
        let key = self.tree.write().unwrap_or_else(|e| e.into_inner()).insert(
            range.start().get(),
            range.end().get(),
            state.clone(),
        );
        (key, state)
    }

    /// Removes the notifier [`register`](Self::register) returned, after
    /// waiting for an invalidation of it in progress to end.
    pub(crate) fn unregister(&self, key: IntervalKey, state: &NotifierState) {
        self.tree.write().unwrap_or_else(|e| e.into_inner()).remove(key);
        state.wait_idle();
    }
}

/// An invalidation in progress (see [`Notifiers::start`]): fills of the
/// notifiers it called wait until it is dropped.
#[must_use = "the invalidation ends when this is dropped: hold it across the change"]
/// The span recorded for the trace, if on, ends when the guard drops.
pub(crate) struct Invalidating(Vec<Arc<NotifierState>>, Option<crate::trace::Span>);

impl Drop for Invalidating {
    fn drop(&mut self) {
        for n in &self.0 {
            n.end();
        }
        drop(self.1.take());
    }
}

/// An interval notifier: a callback over a range, and the sequence number of
/// the retry protocol (see the [module docs](crate::mirror)). Dropping it removes it,
/// after waiting for a callback in progress to return.
pub struct IntervalNotifier {
    notifiers: Arc<Notifiers>,
    key: IntervalKey,
    state: Arc<NotifierState>,
}

impl std::fmt::Debug for IntervalNotifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IntervalNotifier")
            .field("range", &self.state.range)
            .field("seq", &self.state.seq.load(Ordering::Relaxed))
            .finish()
    }
}

impl IntervalNotifier {
    pub(crate) fn insert(
        notifiers: &Arc<Notifiers>,
        range: PageRange,
        callback: Callback,
        in_thread: bool,
    ) -> IntervalNotifier {
        let (key, state) = notifiers.register(range, callback, in_thread);
        IntervalNotifier { notifiers: notifiers.clone(), key, state }
    }

    /// The range it covers.
    pub fn range(&self) -> PageRange {
        self.state.range
    }

    /// Starts a read of the CPU page table for this range: waits until no
    /// invalidation is in progress, and returns the sequence to check with
    /// [`read_retry`](Self::read_retry). Must not be called with the lock the
    /// callback takes held.
    pub fn read_begin(&self) -> u64 {
        self.state.read_begin()
    }

    /// Whether an invalidation started since [`read_begin`](Self::read_begin)
    /// returned `seq`: if so, what was read may be stale and must be read again.
    /// Call it under the lock the callback takes, just before installing.
    pub fn read_retry(&self, seq: u64) -> bool {
        self.state.read_retry(seq)
    }
}

impl Drop for IntervalNotifier {
    fn drop(&mut self) {
        self.notifiers.unregister(self.key, &self.state);
    }
}
