//! Thrashing detection and mitigation, after NVIDIA UVM's
//! (`uvm_perf_thrashing.c`): a page that moves again and again within a
//! short lapse is thrashing; the side that would move it again first waits a
//! nap (throttling), and a page throttled often enough is pinned where every
//! side can reach it (the devices map it remotely) for a while. A page left
//! alone for an epoch starts over.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The thresholds. The defaults are UVM's rule with its numbers scaled to
/// hmm's costs (see [`uvm`](Self::uvm) for UVM's own): a device fault that
/// migrates a page costs tens of microseconds here, a CPU fault-back as much,
/// so a ping-pong over a few pages moves each page every few hundred
/// microseconds to milliseconds, and UVM's 500 us lapse misses most of it;
/// and a page held back ten naps of 1 ms before its pin costs more than the
/// moves it saves (`hmm bench workloads`, ping-pong: with UVM's numbers no
/// fewer migrations and slower; with these, far fewer and faster).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ThrashConfig {
    /// Moves, each within `lapse` of the one before, that make a page
    /// thrashing.
    pub threshold: u32,
    /// The most time between two moves that still counts them together.
    pub lapse: Duration,
    /// How long the side about to move a thrashing page waits first.
    pub nap: Duration,
    /// Throttles after which the page is pinned.
    pub pin_threshold: u32,
    /// How long a pinned page stays where it is.
    pub pin: Duration,
    /// A page not moved for this long forgets its history.
    pub epoch: Duration,
}

impl Default for ThrashConfig {
    fn default() -> Self {
        Self {
            threshold: 3,
            lapse: Duration::from_millis(20),
            nap: Duration::from_micros(100),
            pin_threshold: 3,
            pin: Duration::from_millis(150),
            epoch: Duration::from_secs(2),
        }
    }
}

impl ThrashConfig {
    /// NVIDIA UVM's thresholds (`uvm_perf_thrashing.c`: three moves within
    /// 500 us, a 1 ms nap, a pin after ten throttles), with the pin at about
    /// 150 ms.
    pub fn uvm() -> Self {
        Self {
            threshold: 3,
            lapse: Duration::from_micros(500),
            nap: Duration::from_millis(1),
            pin_threshold: 10,
            pin: Duration::from_millis(150),
            epoch: Duration::from_secs(2),
        }
    }
}

/// What to do about a move of a page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThrashVerdict {
    /// Not thrashing: move it.
    Move,
    /// Thrashing: wait this long, then move it.
    Throttle(Duration),
    /// Pinned: do not move it; map it where it is.
    Pinned,
}

#[derive(Debug, Clone, Copy)]
struct History {
    last: Instant,
    moves: u32,
    throttles: u32,
    pinned_until: Option<Instant>,
}

/// The pages' histories, by page address.
#[derive(Debug, Default)]
pub(crate) struct Thrash {
    config: ThrashConfig,
    pages: Mutex<HashMap<usize, History>>,
}

/// What [`Thrash::on_move`] saw happen, for the counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(crate) struct ThrashEvents {
    pub(crate) detected: bool,
    pub(crate) throttled: bool,
    pub(crate) pinned: bool,
}

impl Thrash {
    pub(crate) fn new(config: ThrashConfig) -> Self {
        Self { config, pages: Mutex::default() }
    }

    /// A side is about to move the page at `page` at `now`: the verdict, and
    /// what it newly found.
    pub(crate) fn on_move(&self, page: usize, now: Instant) -> (ThrashVerdict, ThrashEvents) {
        let c = self.config;
        let mut pages = self.pages.lock().unwrap_or_else(|e| e.into_inner());
        if pages.len() > 1 << 20 {
            // Bounded: histories older than an epoch go first.
            pages.retain(|_, h| now.saturating_duration_since(h.last) < c.epoch);
        }
        let h = pages.entry(page).or_insert(History {
            last: now,
            moves: 0,
            throttles: 0,
            pinned_until: None,
        });
        let mut ev = ThrashEvents::default();
        if h.pinned_until.is_some_and(|u| now < u) {
            return (ThrashVerdict::Pinned, ev);
        }
        h.pinned_until = None;
        let since = now.saturating_duration_since(h.last);
        if since > c.epoch {
            h.throttles = 0;
        }
        h.moves = if since <= c.lapse { h.moves + 1 } else { 1 };
        h.last = now;
        if h.moves < c.threshold {
            return (ThrashVerdict::Move, ev);
        }
        ev.detected = true;
        h.throttles += 1;
        if h.throttles >= c.pin_threshold {
            h.throttles = 0;
            h.moves = 0;
            h.pinned_until = Some(now + c.pin);
            ev.pinned = true;
            return (ThrashVerdict::Pinned, ev);
        }
        ev.throttled = true;
        (ThrashVerdict::Throttle(c.nap), ev)
    }

    /// Whether the page at `page` is pinned at `now`.
    pub(crate) fn is_pinned(&self, page: usize, now: Instant) -> bool {
        let pages = self.pages.lock().unwrap_or_else(|e| e.into_inner());
        pages.get(&page).and_then(|h| h.pinned_until).is_some_and(|u| now < u)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ThrashConfig {
        ThrashConfig {
            threshold: 3,
            lapse: Duration::from_millis(10),
            nap: Duration::from_millis(1),
            pin_threshold: 2,
            pin: Duration::from_millis(100),
            epoch: Duration::from_secs(1),
        }
    }

    #[test]
    fn moves_within_the_lapse_throttle_then_pin_then_release() {
        let t = Thrash::new(config());
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        assert_eq!(t.on_move(0x1000, ms(0)).0, ThrashVerdict::Move);
        assert_eq!(t.on_move(0x1000, ms(5)).0, ThrashVerdict::Move);
        let (v, ev) = t.on_move(0x1000, ms(10));
        assert_eq!(v, ThrashVerdict::Throttle(Duration::from_millis(1)), "third move in the lapse");
        assert!(ev.detected && ev.throttled && !ev.pinned);
        let (v, ev) = t.on_move(0x1000, ms(15));
        assert_eq!(v, ThrashVerdict::Pinned, "second throttle pins");
        assert!(ev.pinned);
        assert!(t.is_pinned(0x1000, ms(50)));
        assert_eq!(t.on_move(0x1000, ms(60)).0, ThrashVerdict::Pinned, "still pinned");
        assert!(!t.is_pinned(0x1000, ms(116)));
        assert_eq!(t.on_move(0x1000, ms(116)).0, ThrashVerdict::Move, "the pin ran out");
        assert!(!t.is_pinned(0x2000, ms(0)), "other pages are not touched");
    }

    #[test]
    fn moves_further_apart_than_the_lapse_never_thrash() {
        let t = Thrash::new(config());
        let t0 = Instant::now();
        for k in 0..20 {
            let (v, ev) = t.on_move(0x1000, t0 + Duration::from_millis(11 * k));
            assert_eq!(v, ThrashVerdict::Move, "move {k}");
            assert_eq!(ev, ThrashEvents::default());
        }
    }

    #[test]
    fn an_idle_epoch_forgets_the_throttles() {
        let t = Thrash::new(config());
        let t0 = Instant::now();
        let ms = |n: u64| t0 + Duration::from_millis(n);
        for n in [0, 1, 2] {
            t.on_move(0x1000, ms(n));
        }
        // One throttle so far; after an idle epoch, three more moves throttle
        // again instead of pinning.
        for n in [2000, 2001] {
            assert_eq!(t.on_move(0x1000, ms(n)).0, ThrashVerdict::Move);
        }
        assert!(matches!(t.on_move(0x1000, ms(2002)).0, ThrashVerdict::Throttle(_)));
    }
}
