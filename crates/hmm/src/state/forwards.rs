//! The pages an application's `mremap` caught on their way, and the
//! forwards that carry them to the new address (see `crate::remap`, which
//! starts and delivers them).

use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use super::{Inner, Range};
use crate::addr::{PageRange, VirtAddr};
use crate::os::mm::Mapping;
use crate::page::DevicePage;

/// Where the data of a page caught by an `mremap` is now.
pub(crate) enum Source {
    /// Nowhere: the page was never populated, or its data went with the page
    /// tables. Nothing to deliver.
    Nothing,
    /// In a device page, owned by the forward from now on (freed once copied).
    Device(DevicePage),
    /// In a coherent device page that the CPU maps: the kernel moved the
    /// mapping to the new address (and after `MREMAP_DONTUNMAP` the old
    /// address still reaches the page). Both are taken off the page before
    /// it is copied and freed as a `Device` page.
    Mapped(DevicePage),
    /// In a migration's staging memory, at `page`.
    Staged(Arc<Mapping>, PageRange),
    /// Installed at the old address by a migration that ended after the move
    /// (possible only when the old range stayed mapped); the page is moved on
    /// from there, or is already at the new address if the kernel moved it.
    OldAddress,
}

/// One page on its way: where its data is, and the page's record, which stays
/// migrating (held) until the data has arrived, so no migration or fault
/// touches the old address meanwhile.
pub(crate) struct Item {
    pub(crate) src: Source,
    pub(crate) range: Arc<Range>,
    pub(crate) index: usize,
}

pub(crate) struct Forward {
    pub(crate) from: PageRange,
    pub(crate) to: VirtAddr,
    /// Pages whose data has not arrived yet.
    pub(crate) waiting: usize,
    /// Handed over, to be delivered by the forward's thread.
    pub(crate) ready: Vec<Item>,
    /// Pages a migration (or a fork's copy) held as this forward began: it
    /// hands them over as it ends (`Forwards::hand_over`). Two forwards of
    /// one old range may be under way at once (`MREMAP_DONTUNMAP` twice);
    /// each page belongs to the one that marked it moved.
    pub(crate) awaited: Vec<VirtAddr>,
}

impl Source {
    /// The device page holding the data, if any.
    pub(crate) fn device_page(&self) -> Option<DevicePage> {
        match self {
            Source::Device(p) | Source::Mapped(p) => Some(*p),
            _ => None,
        }
    }
}

impl Forward {
    pub(crate) fn new_range(&self) -> PageRange {
        PageRange::new(self.to, self.from.len()).expect("same length as the old range")
    }
}

/// The forwards in progress of one `Hmm` instance.
#[derive(Default)]
pub(crate) struct Forwards {
    list: Mutex<Vec<Forward>>,
    pub(crate) changed: Condvar,
}

impl std::fmt::Debug for Forwards {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Forwards").field("in_progress", &self.lock().len()).finish()
    }
}

impl Forwards {
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Forward>> {
        self.list.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether a CPU touch of `addr` waits for a forward: the address is the
    /// new home of pages that have not all arrived.
    pub(crate) fn awaits(&self, addr: VirtAddr) -> bool {
        self.lock().iter().any(|f| f.waiting > 0 && f.new_range().contains(addr))
    }

    /// Hands the data of page `index` of `range`, a migrating page marked
    /// `moved`, to its forward, with the hold on its record: the forward gives
    /// the record back once the data has arrived. If no forward waits for it
    /// (a bug), the record is given back here and a device page freed.
    pub(crate) fn hand_over(&self, inner: &Inner, range: &Arc<Range>, index: usize, src: Source) {
        let old = range.page_addr(index);
        let mut list = self.lock();
        if let Some(f) = list.iter_mut().find(|f| f.awaited.contains(&old)) {
            f.awaited.retain(|a| *a != old);
            f.ready.push(Item { src, range: range.clone(), index });
            drop(list);
            self.changed.notify_all();
            return;
        }
        drop(list);
        tracing::error!(addr = %old, "a page moved during its migration has no forward");
        let _ = range.lock()[index].abort();
        range.settled.notify_all();
        match src {
            Source::Device(p) => inner.put_page(p),
            // Still mapped for the CPU somewhere: kept, not handed to another
            // address's data.
            Source::Mapped(p) => tracing::error!(page = %p, "a mapped coherent page is kept"),
            _ => {}
        }
    }

    /// Whether no forward is in progress.
    pub(crate) fn is_idle(&self) -> bool {
        self.lock().is_empty()
    }

    /// Waits (up to `limit`) until no forward is in progress.
    pub(crate) fn wait_idle(&self, limit: Duration) -> bool {
        let list = self.lock();
        let (_l, r) = self
            .changed
            .wait_timeout_while(list, limit, |l| !l.is_empty())
            .unwrap_or_else(|e| e.into_inner());
        !r.timed_out()
    }
}
