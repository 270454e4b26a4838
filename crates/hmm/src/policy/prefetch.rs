//! Asynchronous prefetch: a range moved to a location on the placement's
//! worker thread, a chunk at a time, with a handle that shows its progress
//! and can be waited on, polled or cancelled.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::Location;
use crate::addr::{PageRange, VirtAddr};
use crate::migrate::SkipReason;

/// Where a prefetch stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrefetchProgress {
    /// The range asked for.
    pub range: PageRange,
    /// Where its pages go.
    pub to: Location,
    /// Pages looked at so far (moved, already there, or refused).
    pub pages_done: usize,
    /// Of those, pages this prefetch moved.
    pub pages_moved: usize,
    /// Pages not moved, by reason, in the order first seen.
    pub refused: Vec<(SkipReason, usize)>,
    /// Whether it is over: every page looked at, cancelled, or failed.
    pub finished: bool,
    /// Whether it was cancelled before the end.
    pub cancelled: bool,
    /// Why it stopped early, when an error stopped it (the range unmapped
    /// meanwhile, say).
    pub error: Option<String>,
}

impl PrefetchProgress {
    /// Pages refused, all reasons together.
    pub fn pages_refused(&self) -> usize {
        self.refused.iter().map(|(_, n)| n).sum()
    }
}

/// Shared between a [`Prefetch`] handle and the worker.
#[derive(Debug)]
pub(crate) struct PrefetchState {
    pub(crate) range: PageRange,
    pub(crate) to: Location,
    pub(crate) done: AtomicUsize,
    pub(crate) moved: AtomicUsize,
    pub(crate) cancel: AtomicBool,
    /// The rest, and the end, under one lock the waiters sleep on.
    pub(crate) end: Mutex<Ending>,
    pub(crate) ended: Condvar,
}

#[derive(Debug, Default)]
pub(crate) struct Ending {
    pub(crate) refused: Vec<(SkipReason, usize)>,
    pub(crate) finished: bool,
    pub(crate) cancelled: bool,
    pub(crate) error: Option<String>,
}

impl PrefetchState {
    pub(crate) fn new(range: PageRange, to: Location) -> Arc<Self> {
        Arc::new(Self {
            range,
            to,
            done: AtomicUsize::new(0),
            moved: AtomicUsize::new(0),
            cancel: AtomicBool::new(false),
            end: Mutex::default(),
            ended: Condvar::new(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ending> {
        self.end.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a chunk's outcome.
    pub(crate) fn count(&self, looked: usize, moved: usize, refused: &[(VirtAddr, SkipReason)]) {
        {
            let mut e = self.lock();
            for (_, why) in refused {
                match e.refused.iter_mut().find(|(r, _)| r == why) {
                    Some((_, n)) => *n += 1,
                    None => e.refused.push((why.clone(), 1)),
                }
            }
        }
        self.moved.fetch_add(moved, Ordering::Release);
        self.done.fetch_add(looked, Ordering::Release);
    }

    /// Ends it, cancelled or not, with an error or not.
    pub(crate) fn finish(&self, error: Option<String>) {
        let mut e = self.lock();
        e.finished = true;
        e.cancelled = self.cancel.load(Ordering::Acquire)
            && self.done.load(Ordering::Acquire) < self.range.pages();
        e.error = error;
        drop(e);
        self.ended.notify_all();
    }

    fn progress(&self) -> PrefetchProgress {
        let e = self.lock();
        PrefetchProgress {
            range: self.range,
            to: self.to,
            pages_done: self.done.load(Ordering::Acquire),
            pages_moved: self.moved.load(Ordering::Acquire),
            refused: e.refused.clone(),
            finished: e.finished,
            cancelled: e.cancelled,
            error: e.error.clone(),
        }
    }
}

/// A prefetch under way (see [`Placement::prefetch`](super::Placement::prefetch)).
/// Dropping the handle lets the prefetch go on; [`cancel`](Self::cancel)
/// stops it after the chunk in flight.
#[derive(Debug, Clone)]
pub struct Prefetch {
    pub(crate) state: Arc<PrefetchState>,
}

impl Prefetch {
    /// Where it stands now.
    pub fn progress(&self) -> PrefetchProgress {
        self.state.progress()
    }

    /// Whether it is over.
    pub fn is_finished(&self) -> bool {
        self.state.lock().finished
    }

    /// Waits up to `limit` for it to end; returns where it stands, finished
    /// or not.
    pub fn wait(&self, limit: Duration) -> PrefetchProgress {
        let deadline = Instant::now() + limit;
        let mut e = self.state.lock();
        while !e.finished {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            e = self.state.ended.wait_timeout(e, left).unwrap_or_else(|x| x.into_inner()).0;
        }
        drop(e);
        self.progress()
    }

    /// Stops it after the chunk in flight (pages already moved stay moved).
    pub fn cancel(&self) {
        self.state.cancel.store(true, Ordering::Release);
    }
}
