//! What a device asks of `range_fault`, and what it gets back: the request,
//! its flags, the page information and the errors. Plain types, below the
//! address space that serves them.

use std::time::Duration;

use crate::addr::{PAGE_SIZE, PageRange, VirtAddr};
use crate::page::{DeviceId, DevicePage};

// ---- range_fault ---------------------------------------------------------------------

/// What a device asks of a page (the kernel's `HMM_PFN_REQ_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FaultFlags(u8);

impl FaultFlags {
    /// Only report.
    pub const NONE: FaultFlags = FaultFlags(0);
    /// Fault the page in if it is not valid.
    pub const FAULT: FaultFlags = FaultFlags(1);
    /// Fault it in writable (implies `FAULT`).
    pub const WRITE: FaultFlags = FaultFlags(3);

    /// Whether every bit of `other` is set.
    pub const fn contains(self, other: FaultFlags) -> bool {
        self.0 & other.0 == other.0
    }
}

impl std::ops::BitOr for FaultFlags {
    type Output = FaultFlags;
    fn bitor(self, rhs: FaultFlags) -> FaultFlags {
        FaultFlags(self.0 | rhs.0)
    }
}

impl std::ops::BitAnd for FaultFlags {
    type Output = FaultFlags;
    fn bitand(self, rhs: FaultFlags) -> FaultFlags {
        FaultFlags(self.0 & rhs.0)
    }
}

/// A `range_fault` request.
#[derive(Debug, Clone)]
pub struct RangeFault<'a> {
    /// The pages.
    pub range: PageRange,
    /// Flags every page gets.
    pub default_flags: FaultFlags,
    /// Which bits of `per_page` count.
    pub flags_mask: FaultFlags,
    /// One entry per page of `range` (or empty): each page asks for
    /// `(per_page[i] & flags_mask) | default_flags`.
    pub per_page: &'a [FaultFlags],
    /// The asking device: its own private pages are reported, never faulted.
    pub owner: Option<DeviceId>,
    /// How long to retry pages that are busy (mid-migration, or changing).
    pub timeout: Duration,
}

impl<'a> RangeFault<'a> {
    /// Reports `range` without faulting anything (a snapshot).
    pub fn snapshot(range: PageRange, owner: Option<DeviceId>) -> Self {
        Self {
            range,
            default_flags: FaultFlags::NONE,
            flags_mask: FaultFlags::NONE,
            per_page: &[],
            owner,
            timeout: Self::DEFAULT_TIMEOUT,
        }
    }

    /// Faults every page of `range` in (writable when `write`).
    pub fn fault(range: PageRange, write: bool, owner: Option<DeviceId>) -> Self {
        Self {
            default_flags: if write { FaultFlags::WRITE } else { FaultFlags::FAULT },
            ..Self::snapshot(range, owner)
        }
    }

    /// The retry bound the kernel uses (`HMM_RANGE_DEFAULT_TIMEOUT`).
    pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);

    /// The most pages one request may cover: 2^20 pages, 4 GiB of address
    /// space. A request keeps about a hundred bytes of bookkeeping per page
    /// while it runs and returns a [`PageInfo`] per page (and
    /// `hmm_swdev::SoftwareDevice::read`, held to the same
    /// bound, a buffer of the range's bytes), so a longer one is refused with
    /// [`RangeFaultError::TooLarge`] before anything is allocated, rather than
    /// ending the process for want of memory. A device faults what it is
    /// about to touch, a few pages or megabytes at a time; 4 GiB is four
    /// times the largest snapshot the benchmarks take. Split a longer range
    /// into parts of at most this many pages.
    pub const MAX_PAGES: usize = 1 << 20;

    pub(crate) fn wanted(&self, i: usize) -> FaultFlags {
        let p = self.per_page.get(i).copied().unwrap_or_default();
        (p & self.flags_mask) | self.default_flags
    }
}

/// What `range_fault` found for one page (the kernel's `HMM_PFN_*` output).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PageInfo {
    /// The page can be mapped by the device (readable).
    pub valid: bool,
    /// It can be mapped writable.
    pub write: bool,
    /// No mapping, no access, or poisoned: the device must not map it.
    pub error: bool,
    /// The shared zero page (read-only).
    pub zero: bool,
    /// Mapping order: 0 for 4 KiB, 9 for a 2 MiB huge page, 18 for 1 GiB.
    pub order: u8,
    /// A device page: of the asking device when `valid` (reported, never
    /// faulted), of another device otherwise (valid only when coherent).
    pub device: Option<DevicePage>,
    /// The device page is coherent memory the CPU maps: any device may map
    /// it (another device reaches it as the CPU does), and nothing is faulted.
    pub coherent: bool,
}

/// Why `range_fault` failed (the kernel's `-EBUSY`, `-EPERM`, `-EFAULT`, `-ENOMEM`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RangeFaultError {
    /// Pages stayed busy (mid-migration) until the timeout: retry later.
    #[error("{range} stayed busy for {timeout:?} (pages mid-migration): retry")]
    Busy {
        /// The range asked for.
        range: PageRange,
        /// The timeout that ran out.
        timeout: Duration,
    },
    /// A write was asked of a page the mapping does not allow writing.
    #[error("write to read-only memory at {addr}: the mapping does not allow writing")]
    PermissionDenied {
        /// The first such page.
        addr: VirtAddr,
    },
    /// A fault was asked of a page that has no mapping, no access, or is lost.
    #[error("cannot fault in {addr}: {reason}")]
    Fault {
        /// The first such page.
        addr: VirtAddr,
        /// Why.
        reason: String,
    },
    /// The kernel could not allocate memory for the page.
    #[error("out of memory faulting in {addr}")]
    OutOfMemory {
        /// The first page that failed.
        addr: VirtAddr,
    },
    /// The request is malformed.
    #[error("bad range_fault request: {0}")]
    BadRequest(String),
    /// The range holds more pages than one request may cover
    /// ([`RangeFault::MAX_PAGES`]): split it.
    #[error(
        "{range} is {pages} pages, more than one device fault, snapshot or read may cover \
         ({max_pages} pages, {max_bytes}): split it into parts of at most that many pages",
        pages = range.pages(),
        max_pages = RangeFault::MAX_PAGES,
        max_bytes = crate::addr::human_bytes((RangeFault::MAX_PAGES * PAGE_SIZE) as u64)
    )]
    TooLarge {
        /// The range asked for.
        range: PageRange,
    },
    /// The page tables could not be read.
    #[error("cannot read the page tables of {range}: {error}")]
    Inspect {
        /// The range.
        range: PageRange,
        /// What failed.
        error: String,
    },
}

/// Refuses a range longer than [`RangeFault::MAX_PAGES`].
pub(crate) fn check_size(range: PageRange) -> Result<(), RangeFaultError> {
    match range.pages() > RangeFault::MAX_PAGES {
        true => Err(RangeFaultError::TooLarge { range }),
        false => Ok(()),
    }
}

/// `range` in parts of at most [`RangeFault::MAX_PAGES`] pages, in address
/// order: for hmm's own faults over a range that may be longer.
pub(crate) fn parts(range: PageRange) -> impl Iterator<Item = PageRange> {
    let step = RangeFault::MAX_PAGES * PAGE_SIZE;
    (range.start().get()..range.end().get()).step_by(step).map(move |at| {
        PageRange::new(VirtAddr::new(at), step.min(range.end().get() - at)).expect("inside range")
    })
}

/// The whole user address space (the lower half), for notifiers that mirror
/// everything.
pub(crate) fn address_space() -> PageRange {
    let top = (usize::MAX / 2) & !(PAGE_SIZE - 1);
    PageRange::new(VirtAddr::new(PAGE_SIZE), top - PAGE_SIZE).expect("the user address space")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// hmm's own faults over a long range go in parts a request may cover,
    /// end to end; a short range is one part.
    #[test]
    fn parts_split_a_long_range_at_the_bound() {
        let max = RangeFault::MAX_PAGES;
        let long = PageRange::from_pages(VirtAddr::new(1 << 30), 2 * max + 3).unwrap();
        let p: Vec<PageRange> = parts(long).collect();
        assert_eq!(p.iter().map(|r| r.pages()).collect::<Vec<_>>(), [max, max, 3]);
        assert_eq!((p[0].start(), p[2].end()), (long.start(), long.end()));
        assert!(p.windows(2).all(|w| w[0].end() == w[1].start()));
        assert!(p.iter().all(|r| check_size(*r).is_ok()));
        assert_eq!(check_size(long), Err(RangeFaultError::TooLarge { range: long }));
        let short = PageRange::from_pages(VirtAddr::new(1 << 30), 8).unwrap();
        assert_eq!(parts(short).collect::<Vec<_>>(), [short]);
    }
}
