//! The errors and refusals every part of hmm shares: what an operation on
//! the address space reports ([`HmmError`]), why a page did not move
//! ([`SkipReason`]), why memory cannot be adopted, and what `settle` found
//! still under way. They sit below the parts that return them.

use std::time::Duration;

use crate::addr::{PageRange, RangeError, VirtAddr};
use crate::devmem::DeviceMemoryError;
use crate::dma::DmaError;
use crate::mirror::RangeFaultError;
use crate::os::arena::ArenaError;
use crate::os::mm::MmError;
use crate::os::uffd::UffdError;
use crate::page::DeviceId;

/// What [`Hmm::settle`](crate::Hmm::settle) found still under way when its time ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Unsettled {
    /// An address-space change whose event the kernel has not handed over:
    /// the fault service is not reading (stalled, or a fork holds it parked).
    #[error("address-space changes are still pending (is the fault service stalled?)")]
    Changes,
    /// Messages read but not yet handled: the fault service is busy (a
    /// fault-back waiting for memory, a slow device) or stalled.
    #[error("the fault service has not handled the messages it read")]
    Messages,
    /// Pages of an `mremap` still on their way to the new address.
    #[error("remapped pages are still on their way to their new address")]
    Forwards,
    /// Device pages still being copied into a forked child.
    #[error("device pages are still being copied into a forked child")]
    ForkCopies,
    /// Discarded pages whose page-table entries the service is still
    /// looking at (for at most 100 ms after the discard).
    #[error("discarded pages are still being looked at")]
    Discards,
    /// Fault-backs threads began in their own handlers (`FaultMode::InThread`)
    /// and fault-around windows they asked for, still with the service.
    #[error("fault-backs begun in faulting threads are still being finished")]
    Handovers,
}

/// Errors of the address-space operations.
#[derive(Debug, thiserror::Error)]
pub enum HmmError {
    /// userfaultfd could not be opened with what hmm needs.
    #[error("cannot start hmm: {0} (run `hmm check` to see what this kernel lacks)")]
    Uffd(#[from] UffdError),
    /// A mapping operation failed.
    #[error(transparent)]
    Mm(#[from] MmError),
    /// A malformed range.
    #[error(transparent)]
    Range(#[from] RangeError),
    /// The fault service thread could not start.
    #[error("cannot start the fault service thread: {0}")]
    Thread(std::io::Error),
    /// The eventfd for the fault service could not be made.
    #[error("cannot create the fault service's wake-up eventfd: {0}")]
    Notifier(rustix::io::Errno),
    /// A configuration value out of bounds.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The range is not entirely inside one managed range.
    #[error("{0} is not managed by this hmm instance (allocate it with Hmm::alloc or adopt it)")]
    NotManaged(PageRange),
    /// Memory that cannot be adopted, with the reason.
    #[error("cannot adopt {range}: {reason}")]
    Adopt {
        /// The range offered.
        range: PageRange,
        /// Why it was refused, and what to do.
        reason: AdoptRefusal,
    },
    /// Device memory registration failed.
    #[error(transparent)]
    Device(#[from] DeviceMemoryError),
    /// The device is not registered with this instance.
    #[error("device {0} is not registered with this hmm instance")]
    UnknownDevice(DeviceId),

    /// `/proc/self/maps` or the page table could not be read.
    #[error("cannot inspect {range}: {error}")]
    Inspect {
        /// The range being inspected.
        range: PageRange,
        /// What failed.
        error: String,
    },
    /// [`Hmm::settle`](crate::Hmm::settle) ran out of time.
    #[error("hmm did not settle within {limit:?}: {what}")]
    Unsettled {
        /// What was still under way.
        what: Unsettled,
        /// The time it was given.
        limit: Duration,
    },
    /// Pages stayed on a device through repeated eviction (each was caught in
    /// another migration every time).
    #[error("{pages} pages stayed on device {device} through eviction")]
    PagesLeft {
        /// The device.
        device: DeviceId,
        /// Pages still there.
        pages: usize,
    },
    /// An arena could not be made or could not allocate.
    #[error(transparent)]
    Arena(#[from] ArenaError),
    /// A device fault (`range_fault`) failed.
    #[error(transparent)]
    Fault(#[from] RangeFaultError),
    /// A device write to memory hmm neither manages nor mirrors.
    #[error(
        "a device cannot write {0}: hmm neither manages nor mirrors it (allocate it with \
         Hmm::alloc, adopt it, or hand it to Hmm::mirror)"
    )]
    NotWritable(PageRange),
    /// A device operation that needs memory hmm manages.
    #[error("{op} needs memory hmm manages, and {range} is not")]
    NeedsManaged {
        /// The operation.
        op: &'static str,
        /// The range given.
        range: PageRange,
    },
    /// Part of the range cannot be accessed at all: nothing is mapped there,
    /// or its protection allows no access (the kernel's `EINVAL` for such a
    /// migration).
    #[error("{op}: {range} is not an accessible range: {reason} (map it, or make it readable)")]
    InvalidRange {
        /// The operation.
        op: &'static str,
        /// The range asked for.
        range: PageRange,
        /// What is wrong, and where.
        reason: String,
    },
    /// Pages did not move where an operation needed them.
    #[error("{op}: the page at {addr} did not move: {reason}")]
    NotMoved {
        /// The operation.
        op: &'static str,
        /// The first page that did not move.
        addr: VirtAddr,
        /// Why.
        reason: SkipReason,
    },
    /// Pages still held exclusively by a device.
    #[error("{pages} pages are still held exclusively by the device, the first at {addr}")]
    StillExclusive {
        /// How many.
        pages: usize,
        /// The first.
        addr: VirtAddr,
    },
    /// A device job failed.
    #[error("device job: {0}")]
    Job(String),
    /// The instance was shut down (its `Hmm` dropped): its devices were
    /// released and its ranges are no longer managed.
    #[error(
        "this hmm instance has been shut down (its Hmm was dropped, which released its \
         devices): keep the Hmm alive for as long as its devices and ranges are used"
    )]
    ShutDown,
    /// hmm could not allocate memory for its own records of `range`.
    #[error(
        "cannot manage {range}: no memory for hmm's records of it ({error}); manage less at once"
    )]
    NoMemory {
        /// The range.
        range: PageRange,
        /// What the allocator said.
        error: String,
    },
}

/// Why memory could not be adopted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AdoptRefusal {
    /// Part of the range is not mapped.
    #[error("part of it is not mapped")]
    NotMapped,
    /// Shared memory: other mappings of it could not follow a migration.
    #[error("it is shared memory; only private anonymous memory can move to device-private memory")]
    Shared,
    /// hugetlbfs memory.
    #[error("it is hugetlbfs memory, which hmm cannot migrate; use transparent huge pages")]
    Hugetlb,
    /// File-backed memory.
    #[error("it is a file mapping ({0}); only private anonymous memory can be managed")]
    FileBacked(String),
    /// Not readable and writable.
    #[error("it is not readable and writable (make it PROT_READ|PROT_WRITE first)")]
    Protection,
    /// The process heap or a stack, which hmm's own threads use.
    #[error("it is {0}, which hmm's own threads use; allocate a managed range or use hmm::Arena")]
    Reserved(String),
    /// Already managed.
    #[error("it overlaps a range this hmm instance already manages ({0})")]
    Overlaps(PageRange),
    /// Registered with another userfaultfd.
    #[error("it is registered with another userfaultfd")]
    OtherUffd,
}

/// Why a page did not move.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SkipReason {
    /// It does not match the selection (it lives elsewhere).
    #[error("not selected: it lives in {0}")]
    NotSelected(String),
    /// Another migration holds it, or the kernel would not release it now.
    #[error("busy: another migration holds it, or it is pinned or shared with a forked child")]
    Busy,
    /// The destination device has no free page.
    #[error("no device memory")]
    NoDeviceMemory,
    /// The mapping does not allow moving it (not writable, not anonymous).
    #[error("not movable: {0}")]
    NotMovable(String),
    /// The copy failed; the source stays where it was.
    #[error("copy failed: {0}")]
    CopyFailed(DmaError),
    /// The application discarded or unmapped it during the migration.
    #[error("discarded by the application during the migration")]
    Invalidated,
    /// It was lost with its device.
    #[error("poisoned: its device failed")]
    Poisoned,
    /// It is no longer mapped.
    #[error("unmapped")]
    Unmapped,
    /// The destination device failed.
    #[error("the destination device failed")]
    DeviceFailed,
    /// It is pinned in system memory ([`ManagedRange::pin`](crate::ManagedRange::pin)).
    #[error("pinned")]
    Pinned,
    /// The destination device declined it, for the reason given (a
    /// compressed tier's page that would not compress enough, say).
    #[error("declined by the device: {0}")]
    Declined(String),
}
