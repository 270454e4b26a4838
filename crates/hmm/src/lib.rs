//! # hmm: Heterogeneous Memory Management for Linux processes, in user space
//!
//! hmm gives an accelerator (or any "device": compressed memory, remote memory, a
//! software device) a shared virtual address space with a Linux process, the way
//! the kernel's HMM does for drivers that support it, but from user space on a
//! stock kernel: it mirrors the CPU page table into a device page table with
//! invalidations, migrates pages between system and device memory with the
//! device's DMA engine, and faults device-resident pages back when the CPU
//! touches them.
//!
//! This crate is built in layers:
//!
//! - [`os`]: the only module with `unsafe`: userfaultfd, `PAGEMAP_SCAN`,
//!   mappings, memfd, processes; every ioctl checked at compile time.
//! - [`probe`]: what this kernel offers, probed once and cached.
//! - [`space`]: the managed address space ([`Hmm`], [`ManagedRange`], arenas)
//!   and the fault service; [`page`] holds the per-page records.
//! - [`devmem`], [`dma`], [`migrate`], [`fault`]: device memory and its
//!   driver callbacks, DMA engines, three-phase migration, CPU fault-back.
//! - [`mirror`]: interval notifiers and `range_fault`, for device page tables.
//! - [`coherent`]: device memory the CPU maps directly.
//! - [`driver`]: what a device driver keeps and calls ([`HmmHandle`]).
//!
//! The software device is a driver of its own on that API, in the
//! `hmm-swdev` crate.
//! - [`observe`] and [`trace`]: where every page lives, and a timeline of
//!   what hmm did.
//!
//! The stress driver, its model and the benchmark are tools around the
//! library, in the `hmm-tools` crate.
//!
//! Start with [`Hmm`]: it has a short example of the whole cycle, with the
//! software device; the crate's `examples/` show a minimal program, a new
//! device driver, and mirroring with interval notifiers.
//!
//! ```
//! // What does this kernel offer hmm?
//! let probe = hmm::probe::probe();
//! println!("kernel {}: {:?}", probe.kernel_release, probe.verdict);
//! ```

#![warn(missing_docs)]

pub mod addr;
pub mod coherent;
pub mod devmem;
pub mod dma;
pub mod driver;
mod error;
pub mod fault;
pub(crate) mod fork;
pub(crate) mod interval;
pub(crate) mod inthread;
pub mod migrate;
pub mod mirror;
#[cfg(all(test, feature = "shuttle"))]
mod model;
pub mod observe;
pub mod os;
pub mod page;
pub mod policy;
pub mod probe;
pub(crate) mod remap;
pub mod space;
pub(crate) mod state;
pub(crate) mod sync;
#[cfg(test)]
mod testdev;
pub mod trace;

pub use addr::{HUGE_PAGE_SIZE, PAGE_SHIFT, PAGE_SIZE, PageRange, RangeError, VirtAddr};
pub use devmem::{CpuFault, FaultBackError, InThreadFill};
pub use devmem::{
    DeviceMemory, DeviceMemoryConfig, DevicePagemapOps, DeviceStats, MemoryKind, Pressure,
};
pub use dma::{DmaEngine, DmaError, DmaFence, DmaJob};
pub use driver::{HmmHandle, WriteTarget};
pub use migrate::{Migration, MigrationReport, PageStatus, Selection, SkipReason};
pub use mirror::{
    FaultFlags, IntervalNotifier, Invalidation, InvalidationEvent, PageInfo, RangeFault,
    RangeFaultError,
};
pub use observe::{Place, ResidencyMap};
pub use os::arena::ArenaError;
pub use page::{DeviceId, DevicePage, Residency};
pub use space::{
    AdoptRefusal, Arena, FaultMode, FaultStall, Hmm, HmmConfig, HmmError, ManagedRange,
    MirroredRange, Pin, RangeStats, Residence, Unsettled,
};

/// The README's example, compiled with the doc tests so that it stays true.
#[cfg(doctest)]
#[doc = include_str!("../../../README.md")]
pub struct ReadmeExample;
