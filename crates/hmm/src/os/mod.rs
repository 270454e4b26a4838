//! The operating-system layer: the only module of hmm that contains `unsafe`.
//!
//! Every system call and ioctl hmm makes goes through here, as a typed, safe
//! call. What the layer guarantees to the rest of the crate:
//!
//! - **Checked ABI.** Every ioctl number and structure layout is checked at
//!   compile time against the kernel's definitions (the private `sys` module).
//! - **Checked ranges.** Ranges are [`PageRange`](crate::addr::PageRange)s, so
//!   unaligned, empty and overflowing ranges are refused before any system call.
//! - **No aliasing surprises.** Calls that can drop, move or replace the pages of
//!   a range (`madvise`, `mremap`, `munmap`, `UFFDIO_MOVE`'s source) only act on a
//!   [`Mapping`](mm::Mapping) the caller owns, whose memory is never lent out as a
//!   Rust reference. The userfaultfd fill ioctls that only populate missing pages
//!   (`COPY`, `ZEROPAGE`, `CONTINUE`, `POISON`) take plain ranges: they cannot
//!   change bytes that anyone has observed.
//! - **Exact results.** Partial results and signed result fields are decoded as
//!   the kernel writes them ([`uffd`]), errors keep the raw errno, and each
//!   message says what to do.
//!
//! Porting hmm to another kernel interface means editing this module alone.

#![allow(unsafe_code)]

pub mod arena;
pub(crate) mod bytes;
pub mod event;
pub mod maps;
pub mod mm;
pub mod pagemap;
pub mod process;
pub mod sigbus;
pub(crate) mod sys;
pub mod uffd;
pub mod vm;
