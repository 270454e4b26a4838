//! The synchronization primitives of the interval notifiers: `std::sync`'s,
//! or shuttle's with the `shuttle` feature.
//!
//! The notifiers' sequence logic ([`crate::mirror`]: `Notifiers::start`, the
//! `Invalidating` guard, `read_begin` / `read_retry`) is checked by the model
//! tests in `crate::model`, which run it under [shuttle]'s scheduler: shuttle
//! explores thread interleavings only at operations on its own primitives, so
//! the code under test takes its locks, condition variables and atomics from
//! here. Without the feature these are plain re-exports of `std::sync`: the
//! same types, no cost.
//!
//! With the feature, the notifiers only work inside a shuttle test (shuttle's
//! primitives panic outside its scheduler), and the rest of the crate's tests
//! do real system calls outside shuttle: run only the model tests with it on,
//! `cargo test -p hmm --features shuttle --lib model::`.
//!
//! `Arc` is `std`'s either way: shuttle does not model reference counts
//! (`shuttle::sync::Arc` *is* `std::sync::Arc`), and `crate::mirror` shares
//! the instance's `Arc<Inner>`, which the rest of the crate makes with `std`'s.
//!
//! [shuttle]: https://docs.rs/shuttle

pub(crate) use std::sync::Arc;

#[cfg(not(feature = "shuttle"))]
pub(crate) use std::sync::{
    Condvar, Mutex, MutexGuard, RwLock,
    atomic::{AtomicU64, Ordering},
};

#[cfg(feature = "shuttle")]
pub(crate) use shuttle::sync::{
    Condvar, Mutex, MutexGuard, RwLock,
    atomic::{AtomicU64, Ordering},
};

/// A condition variable that makes no system call to wake nobody.
///
/// `std`'s `Condvar::notify_all` always enters the kernel (`FUTEX_WAKE`),
/// waiter or not, and on the fault path no thread waits almost every time:
/// a migration's end, a batch of messages handled, a DMA fence completed.
/// A `Signal` counts its waiters and wakes only when there are some.
///
/// The rule that makes it sound: the waiters' state is changed under the
/// mutex they wait with, and [`notify_all`](Self::notify_all) is called
/// after that change (with the mutex held or released). A waiter counts
/// itself under the mutex before it sleeps, so a notifier that took the
/// mutex after the waiter released it (in the wait) sees the count; one
/// that took it before made a change the waiter sees before it sleeps.
///
/// Always `std`'s primitives: the shuttle model tests do not cover it (the
/// notifiers, which they do cover, count their waiters under their own
/// lock).
#[derive(Debug, Default)]
pub(crate) struct Signal {
    cv: std::sync::Condvar,
    waiters: std::sync::atomic::AtomicUsize,
}

impl Signal {
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Waits on `guard`'s mutex until `cond` is false or `limit` passes;
    /// returns the guard and whether the time ran out.
    pub(crate) fn wait_timeout_while<'a, T>(
        &self,
        guard: std::sync::MutexGuard<'a, T>,
        limit: std::time::Duration,
        cond: impl FnMut(&mut T) -> bool,
    ) -> (std::sync::MutexGuard<'a, T>, bool) {
        use std::sync::atomic::Ordering::SeqCst;
        self.waiters.fetch_add(1, SeqCst);
        let (g, r) =
            self.cv.wait_timeout_while(guard, limit, cond).unwrap_or_else(|e| e.into_inner());
        self.waiters.fetch_sub(1, SeqCst);
        (g, r.timed_out())
    }

    /// Waits on `guard`'s mutex while `cond` holds, without a bound (for
    /// waits that another thread is sure to end, as a DMA engine's
    /// completion).
    pub(crate) fn wait_while<'a, T>(
        &self,
        guard: std::sync::MutexGuard<'a, T>,
        cond: impl FnMut(&mut T) -> bool,
    ) -> std::sync::MutexGuard<'a, T> {
        use std::sync::atomic::Ordering::SeqCst;
        self.waiters.fetch_add(1, SeqCst);
        let g = self.cv.wait_while(guard, cond).unwrap_or_else(|e| e.into_inner());
        self.waiters.fetch_sub(1, SeqCst);
        g
    }

    /// Wakes every waiter, if there is any (see the rule above).
    pub(crate) fn notify_all(&self) {
        if self.waiters.load(std::sync::atomic::Ordering::SeqCst) > 0 {
            self.cv.notify_all();
        }
    }
}

#[cfg(all(test, not(feature = "shuttle")))]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use super::Signal;

    /// A waiter that sleeps before the change is woken by it; one that comes
    /// after sees it without sleeping; a wait that nothing ends times out.
    #[test]
    fn a_signal_wakes_its_waiters_and_only_them() {
        let s = Arc::new((Mutex::new(false), Signal::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let s2 = s.clone();
        let waiter = std::thread::spawn(move || {
            let g = s2.0.lock().unwrap();
            let (g, timed_out) = s2.1.wait_timeout_while(g, Duration::from_secs(30), |d| !*d);
            tx.send((*g, timed_out)).unwrap();
        });
        // Once the waiter sleeps (counted under the lock), change and signal.
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while s.1.waiters.load(std::sync::atomic::Ordering::SeqCst) == 0 {
            assert!(std::time::Instant::now() < deadline, "the waiter never began to wait");
            std::thread::sleep(Duration::from_millis(1));
        }
        *s.0.lock().unwrap() = true;
        s.1.notify_all();
        let (seen, timed_out) =
            rx.recv_timeout(Duration::from_secs(30)).expect("the waiter was not woken");
        assert!(seen && !timed_out, "the waiter saw the change, woken before its limit");
        waiter.join().unwrap();
        assert_eq!(s.1.waiters.load(std::sync::atomic::Ordering::SeqCst), 0);

        // After the change: no sleep at all.
        let g = s.0.lock().unwrap();
        let (g, timed_out) = s.1.wait_timeout_while(g, Duration::from_secs(30), |d| !*d);
        assert!(*g && !timed_out);
        drop(g);

        // Nothing ends it: the limit does.
        let idle = (Mutex::new(false), Signal::new());
        let g = idle.0.lock().unwrap();
        let (_g, timed_out) = idle.1.wait_timeout_while(g, Duration::from_millis(20), |d| !*d);
        assert!(timed_out, "a wait nothing ends runs out its time");
    }
}
