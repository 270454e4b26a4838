//! The mirror: interval notifiers and `range_fault` (SEMANTICS.md part 1).
//!
//! A device keeps its own page table, filled from the CPU's. Two things keep it
//! true:
//!
//! - **Interval notifiers** ([`Hmm::insert_notifier`]): a callback over a range
//!   of the address space (any range, managed by hmm or not). Every change hmm
//!   makes or learns of ([`InvalidationEvent`]) calls the callbacks of the
//!   notifiers it overlaps, each with the part of the range it covers, the
//!   event and a new sequence number.
//! - **The retry protocol**, as the kernel's `mmu_interval_read_begin` /
//!   `mmu_interval_read_retry`: a device fills its page table as
//!
//!   ```text
//!   loop {
//!       seq = notifier.read_begin()       // waits out invalidations in progress
//!       info = hmm.range_fault(...)       // no device lock held
//!       lock(device page table)
//!       if notifier.read_retry(seq) { unlock; continue }   // changed meanwhile
//!       install(info); unlock; break
//!   }
//!   ```
//!
//!   and its callback takes the same lock to clear entries. An invalidation
//!   bumps the sequence *before* calling the callback, so a fill either sees
//!   the new sequence (and retries) or installs before the callback runs (and
//!   the callback clears it): no device ever keeps a translation of a page
//!   after the callback for that page returned.
//!
//! # When callbacks run relative to the change
//!
//! For the changes hmm makes (migration, [`ManagedRange::protect`],
//! [`ManagedRange::unmap`], release), callbacks run *before* the change, as in
//! the kernel. For what the application does directly, hmm learns from
//! userfaultfd events: `MADV_DONTNEED`/`MADV_REMOVE` (`REMOVE`) and `munmap` /
//! `mremap` (`UNMAP`, `REMAP`) of managed memory. The kernel lets the
//! application's call return once the event is read, so callbacks run moments
//! after the call returns. A device that reaches system pages through the
//! kernel (as the software device does, see [`crate::os::vm`]) sees the
//! current mapping meanwhile (zeros, or `EFAULT`), never freed memory.
//!
//! # Locks
//!
//! A callback must not call back into hmm's migrations or `range_fault`, and a
//! device must not hold the lock its callback takes across `range_fault` or
//! any access that can fault into hmm's fault service: the service calls
//! callbacks, so it would wait on the device that waits on it.
//!
//! [`ManagedRange::protect`]: crate::ManagedRange::protect
//! [`ManagedRange::unmap`]: crate::ManagedRange::unmap
//! [`Hmm::insert_notifier`]: crate::Hmm::insert_notifier

mod notifier;
mod range_fault;
mod request;

#[cfg(all(test, feature = "shuttle"))]
pub(crate) use notifier::NotifierState;
pub(crate) use notifier::Notifiers;
pub use notifier::{IntervalNotifier, Invalidation, InvalidationEvent};
pub use request::{FaultFlags, PageInfo, RangeFault, RangeFaultError};
pub(crate) use request::{address_space, check_size, parts};
