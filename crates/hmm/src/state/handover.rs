//! What a thread that served its own fault (`FaultMode::InThread`, see
//! `crate::inthread`) leaves to the fault service: the fault-backs it could
//! not finish alone, and the fault-around windows to bring back after it.
//!
//! A `SIGBUS` handler may not allocate: room is reserved when the instance
//! is made, a handler reserves its place before it takes a page
//! ([`Handovers::reserve`]), and the service swaps the whole list for an
//! empty one of the same room ([`Handovers::take`]).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::Range;
use crate::addr::VirtAddr;
use crate::page::{DeviceId, DevicePage};

/// Fault-backs left to the service at once, at most.
pub(crate) const HANDOVER_ROOM: usize = 1024;
/// Fault-around windows waiting for the service, at most (more are dropped:
/// they are only a prefetch).
const AROUND_ROOM: usize = 64;

/// A fault-back a thread began in its handler, which the service finishes as
/// the migration of one page ([`crate::migrate::Migration`]).
pub(crate) struct Handover {
    pub(crate) range: Arc<Range>,
    pub(crate) addr: VirtAddr,
    /// The device page the record held when the thread took it.
    pub(crate) page: DevicePage,
    /// Whether the thread installed the page's bytes at `addr`: the service
    /// commits it; otherwise it gives the page back to its device.
    pub(crate) installed: bool,
}

/// The hand-over list (see the module docs).
pub(crate) struct Handovers {
    items: Mutex<Vec<Handover>>,
    reserved: AtomicUsize,
    /// Addresses whose fault-around window the service brings back (0: free).
    around: Box<[AtomicUsize]>,
    /// Set by the service while it works on what it took.
    working: std::sync::atomic::AtomicBool,
}

impl Default for Handovers {
    fn default() -> Self {
        Self {
            items: Mutex::new(Vec::with_capacity(HANDOVER_ROOM)),
            reserved: AtomicUsize::new(0),
            around: (0..AROUND_ROOM).map(|_| AtomicUsize::new(0)).collect(),
            working: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

impl Handovers {
    /// Reserves the place of one hand-over; false when the room is full.
    pub(crate) fn reserve(&self) -> bool {
        if self.reserved.fetch_add(1, Ordering::AcqRel) >= HANDOVER_ROOM {
            self.reserved.fetch_sub(1, Ordering::AcqRel);
            return false;
        }
        true
    }

    /// Gives a reserved place back unused.
    pub(crate) fn unreserve(&self) {
        self.reserved.fetch_sub(1, Ordering::AcqRel);
    }

    /// Adds a hand-over into the place reserved for it: allocates nothing.
    pub(crate) fn push(&self, h: Handover) {
        let mut items = self.items.lock().unwrap_or_else(|e| e.into_inner());
        debug_assert!(items.len() < items.capacity(), "a hand-over without a reserved place");
        items.push(h);
    }

    /// Swaps the hand-overs into `into` (empty, with [`HANDOVER_ROOM`] of
    /// room, which the list keeps), freeing their places.
    pub(crate) fn take(&self, into: &mut Vec<Handover>) {
        debug_assert!(into.is_empty());
        {
            let mut items = self.items.lock().unwrap_or_else(|e| e.into_inner());
            if items.is_empty() {
                return;
            }
            std::mem::swap(&mut *items, into);
        }
        self.reserved.fetch_sub(into.len(), Ordering::AcqRel);
    }

    /// Asks for the fault-around window of `addr` (a page the thread brought
    /// back from `dev`); returns whether the list was empty before (the
    /// service is then told to look).
    pub(crate) fn ask_around(&self, addr: VirtAddr, dev: DeviceId) -> bool {
        // The device in the page offset's bits (a device id has 12).
        const _: () = assert!(DeviceId::MAX <= crate::addr::PAGE_SIZE);
        let word = addr.page_down().get() | dev.index();
        let was_empty = self.around.iter().all(|a| a.load(Ordering::Relaxed) == 0);
        for a in self.around.iter() {
            if a.compare_exchange(0, word, Ordering::AcqRel, Ordering::Relaxed).is_ok() {
                return was_empty;
            }
        }
        false
    }

    /// The windows asked for, with the device each page came from.
    pub(crate) fn take_around(&self, into: &mut Vec<(VirtAddr, DeviceId)>) {
        let offset = crate::addr::PAGE_SIZE - 1;
        for a in self.around.iter() {
            let v = a.swap(0, Ordering::AcqRel);
            if v != 0 {
                into.push((VirtAddr::new(v & !offset), DeviceId((v & offset) as u16)));
            }
        }
    }

    /// Whether nothing waits for the service, nor is being worked on.
    pub(crate) fn is_empty(&self) -> bool {
        !self.working.load(Ordering::SeqCst)
            && self.reserved.load(Ordering::SeqCst) == 0
            && self.around.iter().all(|a| a.load(Ordering::SeqCst) == 0)
    }

    /// The service is working on what it took (or is done).
    pub(crate) fn set_working(&self, on: bool) {
        self.working.store(on, Ordering::SeqCst);
    }
}
