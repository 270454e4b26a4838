//! userfaultfd: creation, the API handshake, registration, the fill ioctls and
//! the message stream.
//!
//! # Creation
//!
//! [`Uffd::open`] tries, in order: the `userfaultfd(2)` system call; the
//! `/dev/userfaultfd` device node (`USERFAULTFD_IOC_NEW`), which is how an
//! unprivileged process gets full userfaultfd when `vm.unprivileged_userfaultfd`
//! is 0 and the node's permissions allow it; and finally the system call with
//! `UFFD_USER_MODE_ONLY`, which the kernel always grants but which only reports
//! faults taken in user mode (a system call that touches a missing page gets
//! `EFAULT` instead of waiting for the handler). [`UffdOrigin`] says which one
//! was used.
//!
//! # The handshake
//!
//! `UFFDIO_API` may be issued once per descriptor. hmm first opens a descriptor
//! and asks for no feature, which reports every feature the kernel offers; it
//! then opens a fresh descriptor and asks for the wanted subset. A feature the
//! kernel has but refuses to this process (`UFFD_FEATURE_EVENT_FORK` needs
//! `CAP_SYS_PTRACE`) fails the second call with `EPERM`.
//!
//! # Results of the fill ioctls
//!
//! `UFFDIO_COPY`, `ZEROPAGE`, `CONTINUE`, `POISON` and `MOVE` write a signed
//! result field (`copy`, `zeropage`, `mapped`, `updated`, `move`):
//! - the ioctl succeeds: the whole range was done;
//! - the ioctl fails with `EAGAIN` and the field is positive: that many bytes were
//!   done before the kernel stopped (a partial result: retry the rest);
//! - the field is a negative errno: nothing more was done, for that reason;
//! - the field is untouched (hmm sets it to 0 first) and the ioctl fails: the
//!   kernel refused before starting, for example with `EAGAIN` while the address
//!   space is changing (a FORK, REMAP, REMOVE or UNMAP event is pending: read the
//!   events, then retry), or `EINVAL` for a malformed request.
//!
//! [`Uffd::copy`] and friends issue exactly one ioctl and decode it into
//! [`Filled`] or [`FillError`]; the `*_all` variants retry partial results while
//! the kernel makes progress.
//!
//! # The fork hazard
//!
//! With `UFFD_FEATURE_EVENT_FORK`, `fork(2)` in any thread of the process does
//! not return until the FORK event has been read. glibc's `fork()` holds every
//! malloc arena lock across that system call. A thread that reads events and
//! calls `malloc` meanwhile therefore deadlocks with the forking thread: it
//! waits for the lock, and the lock's holder waits for it to read the event.
//! The thread that reads events must not allocate between reads:
//! [`Uffd::read_events`] allocates nothing when its output vector already has
//! room for `max` more events.
//!
//! # Closing
//!
//! [`Uffd::close`] waits for operations in flight on other threads and makes
//! every later call fail with [`UffdError::Closed`]. [`Uffd::poll`] waits in
//! slices of at most 100 ms, so a waiting thread delays a close by no more than
//! that. A thread blocked in [`Uffd::read_events`] on a *blocking* descriptor
//! holds it until a message arrives: close such a descriptor only after its
//! reader has stopped.

use std::fmt;
use std::os::fd::{AsFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{RwLock, RwLockReadGuard};
use std::time::Duration;

use linux_raw_sys::general as g;
use rustix::io::Errno;
use rustix::ioctl::{Ioctl, IoctlOutput, Opcode};
use rustix::mm::UserfaultfdFlags;

use super::mm::Mapping;
use super::sys;
use crate::addr::{PageRange, RangeError, VirtAddr};

// ---- features ------------------------------------------------------------------

/// A set of `UFFD_FEATURE_*` bits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Features(u64);

macro_rules! features {
    ($($name:ident = $bit:expr, $text:literal;)*) => {
        impl Features {
            $(#[doc = concat!("`UFFD_FEATURE_", stringify!($name), "`")]
            pub const $name: Features = Features($bit as u64);)*
            /// Every feature bit this build knows, with its kernel name.
            pub const ALL: &'static [(Features, &'static str)] = &[$((Features($bit as u64), $text),)*];
        }
    };
}

features! {
    PAGEFAULT_FLAG_WP = g::UFFD_FEATURE_PAGEFAULT_FLAG_WP, "PAGEFAULT_FLAG_WP";
    EVENT_FORK = g::UFFD_FEATURE_EVENT_FORK, "EVENT_FORK";
    EVENT_REMAP = g::UFFD_FEATURE_EVENT_REMAP, "EVENT_REMAP";
    EVENT_REMOVE = g::UFFD_FEATURE_EVENT_REMOVE, "EVENT_REMOVE";
    MISSING_HUGETLBFS = g::UFFD_FEATURE_MISSING_HUGETLBFS, "MISSING_HUGETLBFS";
    MISSING_SHMEM = g::UFFD_FEATURE_MISSING_SHMEM, "MISSING_SHMEM";
    EVENT_UNMAP = g::UFFD_FEATURE_EVENT_UNMAP, "EVENT_UNMAP";
    SIGBUS = g::UFFD_FEATURE_SIGBUS, "SIGBUS";
    THREAD_ID = g::UFFD_FEATURE_THREAD_ID, "THREAD_ID";
    MINOR_HUGETLBFS = g::UFFD_FEATURE_MINOR_HUGETLBFS, "MINOR_HUGETLBFS";
    MINOR_SHMEM = g::UFFD_FEATURE_MINOR_SHMEM, "MINOR_SHMEM";
    EXACT_ADDRESS = g::UFFD_FEATURE_EXACT_ADDRESS, "EXACT_ADDRESS";
    WP_HUGETLBFS_SHMEM = g::UFFD_FEATURE_WP_HUGETLBFS_SHMEM, "WP_HUGETLBFS_SHMEM";
    WP_UNPOPULATED = g::UFFD_FEATURE_WP_UNPOPULATED, "WP_UNPOPULATED";
    POISON = g::UFFD_FEATURE_POISON, "POISON";
    WP_ASYNC = g::UFFD_FEATURE_WP_ASYNC, "WP_ASYNC";
    MOVE = g::UFFD_FEATURE_MOVE, "MOVE";
}

impl Features {
    /// No feature.
    pub const NONE: Features = Features(0);
    /// The four non-cooperative events: what an mmu notifier would be told.
    pub const EVENTS: Features = Features(
        Self::EVENT_FORK.0 | Self::EVENT_REMAP.0 | Self::EVENT_REMOVE.0 | Self::EVENT_UNMAP.0,
    );

    /// From the raw bits.
    pub const fn from_bits(bits: u64) -> Self {
        Self(bits)
    }
    /// The raw bits.
    pub const fn bits(self) -> u64 {
        self.0
    }
    /// Whether every bit of `other` is set.
    pub const fn contains(self, other: Features) -> bool {
        self.0 & other.0 == other.0
    }
    /// Bits of `self` missing from `other`.
    pub const fn difference(self, other: Features) -> Features {
        Features(self.0 & !other.0)
    }
    /// Bits in both.
    pub const fn intersection(self, other: Features) -> Features {
        Features(self.0 & other.0)
    }
    /// Whether no bit is set.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }
    /// Kernel names of the bits set (unknown bits as hex).
    pub fn names(self) -> Vec<String> {
        let mut out = Vec::new();
        let mut rest = self.0;
        for (f, name) in Self::ALL {
            if self.contains(*f) {
                out.push((*name).to_string());
                rest &= !f.0;
            }
        }
        if rest != 0 {
            out.push(format!("{rest:#x}"));
        }
        out
    }
}

impl std::ops::BitOr for Features {
    type Output = Features;
    fn bitor(self, rhs: Features) -> Features {
        Features(self.0 | rhs.0)
    }
}

impl fmt::Debug for Features {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Features({})", self.names().join(" | "))
    }
}

/// The ioctls the kernel allows: on the descriptor (`UFFDIO_API` result) or on a
/// registered range (`UFFDIO_REGISTER` result). Bits are `1 << _UFFDIO_*`.
#[derive(Clone, Copy, PartialEq, Eq, Default)]
pub struct Ioctls(u64);

impl Ioctls {
    /// `UFFDIO_REGISTER`
    pub const REGISTER: Ioctls = Ioctls(1 << g::_UFFDIO_REGISTER);
    /// `UFFDIO_UNREGISTER`
    pub const UNREGISTER: Ioctls = Ioctls(1 << g::_UFFDIO_UNREGISTER);
    /// `UFFDIO_API`
    pub const API: Ioctls = Ioctls(1 << g::_UFFDIO_API);
    /// `UFFDIO_WAKE`
    pub const WAKE: Ioctls = Ioctls(1 << g::_UFFDIO_WAKE);
    /// `UFFDIO_COPY`
    pub const COPY: Ioctls = Ioctls(1 << g::_UFFDIO_COPY);
    /// `UFFDIO_ZEROPAGE`
    pub const ZEROPAGE: Ioctls = Ioctls(1 << g::_UFFDIO_ZEROPAGE);
    /// `UFFDIO_MOVE`
    pub const MOVE: Ioctls = Ioctls(1 << g::_UFFDIO_MOVE);
    /// `UFFDIO_WRITEPROTECT`
    pub const WRITEPROTECT: Ioctls = Ioctls(1 << g::_UFFDIO_WRITEPROTECT);
    /// `UFFDIO_CONTINUE`
    pub const CONTINUE: Ioctls = Ioctls(1 << g::_UFFDIO_CONTINUE);
    /// `UFFDIO_POISON`
    pub const POISON: Ioctls = Ioctls(1 << g::_UFFDIO_POISON);

    /// The raw bits.
    pub const fn bits(self) -> u64 {
        self.0
    }
    /// Whether every bit of `other` is set.
    pub const fn contains(self, other: Ioctls) -> bool {
        self.0 & other.0 == other.0
    }
}

impl std::ops::BitOr for Ioctls {
    type Output = Ioctls;
    fn bitor(self, rhs: Ioctls) -> Ioctls {
        Ioctls(self.0 | rhs.0)
    }
}

impl fmt::Debug for Ioctls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const NAMES: [(Ioctls, &str); 10] = [
            (Ioctls::REGISTER, "REGISTER"),
            (Ioctls::UNREGISTER, "UNREGISTER"),
            (Ioctls::API, "API"),
            (Ioctls::WAKE, "WAKE"),
            (Ioctls::COPY, "COPY"),
            (Ioctls::ZEROPAGE, "ZEROPAGE"),
            (Ioctls::MOVE, "MOVE"),
            (Ioctls::WRITEPROTECT, "WRITEPROTECT"),
            (Ioctls::CONTINUE, "CONTINUE"),
            (Ioctls::POISON, "POISON"),
        ];
        let names: Vec<&str> =
            NAMES.iter().filter(|(b, _)| self.contains(*b)).map(|(_, n)| *n).collect();
        write!(f, "Ioctls({})", names.join(" | "))
    }
}

/// Registration modes (`UFFDIO_REGISTER_MODE_*`), combinable with `|`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct RegisterMode(u64);

impl RegisterMode {
    /// Faults on pages with no entry (anonymous holes, shmem/hugetlb pages not in the page cache).
    pub const MISSING: RegisterMode = RegisterMode(g::UFFDIO_REGISTER_MODE_MISSING as u64);
    /// Write faults on write-protected pages.
    pub const WP: RegisterMode = RegisterMode(g::UFFDIO_REGISTER_MODE_WP as u64);
    /// Faults on shmem/hugetlb pages present in the page cache but not mapped.
    pub const MINOR: RegisterMode = RegisterMode(g::UFFDIO_REGISTER_MODE_MINOR as u64);
}

impl std::ops::BitOr for RegisterMode {
    type Output = RegisterMode;
    fn bitor(self, rhs: RegisterMode) -> RegisterMode {
        RegisterMode(self.0 | rhs.0)
    }
}

/// How the descriptor was obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UffdOrigin {
    /// The `userfaultfd(2)` system call, with kernel-mode faults.
    Syscall,
    /// `/dev/userfaultfd` with `USERFAULTFD_IOC_NEW`.
    DevNode,
    /// The system call with `UFFD_USER_MODE_ONLY`: faults taken inside system
    /// calls are not delivered (the system call fails with `EFAULT`).
    UserModeOnly,
}

impl UffdOrigin {
    /// Whether faults the kernel takes on the process's behalf (inside `read(2)`,
    /// `process_vm_readv`, ...) reach the handler.
    pub fn handles_kernel_faults(self) -> bool {
        !matches!(self, UffdOrigin::UserModeOnly)
    }
}

// ---- errors -------------------------------------------------------------------------

/// What went wrong creating a descriptor, per path tried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreateAttempts {
    /// `userfaultfd(2)` without flags beyond `O_CLOEXEC`/`O_NONBLOCK`.
    pub syscall: Errno,
    /// `/dev/userfaultfd` (open or `USERFAULTFD_IOC_NEW`).
    pub dev_node: Errno,
    /// `userfaultfd(UFFD_USER_MODE_ONLY)`, if it was tried.
    pub user_mode_only: Option<Errno>,
}

/// Errors of userfaultfd operations other than the fill ioctls.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    /// No descriptor could be created at all.
    #[error("userfaultfd is not available: {}", explain_create(.0))]
    Unavailable(CreateAttempts),
    /// The kernel lacks features hmm was asked to require.
    #[error("this kernel's userfaultfd lacks {}: a newer kernel (6.8 or later) is needed", .0.names().join(", "))]
    MissingFeatures(Features),
    /// `UFFDIO_API` refused the feature set.
    #[error("UFFDIO_API refused features {}: {errno}{}", .features.names().join(", "),
        if *.errno == Errno::PERM { " (EVENT_FORK needs CAP_SYS_PTRACE: run as root or drop the feature)" } else { "" })]
    Api {
        /// Features asked for.
        features: Features,
        /// The kernel's error.
        #[source]
        errno: Errno,
    },
    /// The descriptor was closed.
    #[error("the userfaultfd descriptor is closed")]
    Closed,
    /// The range was malformed.
    #[error(transparent)]
    Range(#[from] RangeError),
    /// `UFFDIO_REGISTER` refused the range.
    #[error("cannot register {range} in mode {mode:?}: {errno}{}", register_hint(*.errno))]
    Register {
        /// Range.
        range: PageRange,
        /// Mode asked for.
        mode: RegisterMode,
        /// The kernel's error.
        #[source]
        errno: Errno,
    },
    /// `UFFDIO_UNREGISTER` failed.
    #[error("cannot unregister {range}: {errno}")]
    Unregister {
        /// Range.
        range: PageRange,
        /// The kernel's error.
        #[source]
        errno: Errno,
    },
    /// `UFFDIO_WAKE` or `UFFDIO_WRITEPROTECT` failed.
    #[error("UFFDIO_{op} on {range} failed: {errno}{}", if *.errno == Errno::NOENT { " (range not registered with this descriptor)" } else { "" })]
    Control {
        /// Which ioctl.
        op: &'static str,
        /// Range.
        range: PageRange,
        /// The kernel's error.
        #[source]
        errno: Errno,
    },
    /// Asking whether an address-space change is pending failed.
    #[error("cannot ask userfaultfd whether a change is pending: {0}")]
    Probe(#[source] Errno),
    /// Reading or polling the descriptor failed.
    #[error("reading userfaultfd messages failed: {0}")]
    Read(#[source] Errno),
    /// The kernel sent a message this build does not know.
    #[error("unknown userfaultfd event {0:#x}")]
    UnknownEvent(u8),
}

fn register_hint(errno: Errno) -> &'static str {
    match errno {
        Errno::BUSY => " (already registered with another userfaultfd)",
        Errno::INVAL => {
            " (the range must be mapped and page aligned; MINOR needs shmem or hugetlbfs; WP needs a kernel with that mode)"
        }
        Errno::NOMEM => " (the range is not fully mapped)",
        Errno::PERM => " (the range has a mapping type userfaultfd does not support)",
        _ => "",
    }
}

fn explain_create(a: &CreateAttempts) -> String {
    let mut s = format!("userfaultfd(2) failed with {}", a.syscall);
    if a.syscall == Errno::NOSYS {
        s.push_str(" (the kernel lacks CONFIG_USERFAULTFD, or a seccomp filter forbids it)");
    } else if a.syscall == Errno::PERM {
        s.push_str(" (vm.unprivileged_userfaultfd is 0 and the process lacks CAP_SYS_PTRACE, or a seccomp filter forbids it)");
    }
    s.push_str(&format!("; /dev/userfaultfd failed with {}", a.dev_node));
    if a.dev_node == Errno::NOENT {
        s.push_str(" (no such node: Linux 6.1 or later creates it)");
    } else if a.dev_node == Errno::ACCESS {
        s.push_str(" (no permission: grant this user read-write access to /dev/userfaultfd)");
    }
    if let Some(e) = a.user_mode_only {
        s.push_str(&format!("; user-mode-only userfaultfd failed with {e}"));
    }
    s
}

/// Which fill ioctl.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FillOp {
    /// `UFFDIO_COPY`
    Copy,
    /// `UFFDIO_ZEROPAGE`
    ZeroPage,
    /// `UFFDIO_CONTINUE`
    Continue,
    /// `UFFDIO_POISON`
    Poison,
    /// `UFFDIO_MOVE`
    Move,
}

impl fmt::Display for FillOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FillOp::Copy => "UFFDIO_COPY",
            FillOp::ZeroPage => "UFFDIO_ZEROPAGE",
            FillOp::Continue => "UFFDIO_CONTINUE",
            FillOp::Poison => "UFFDIO_POISON",
            FillOp::Move => "UFFDIO_MOVE",
        })
    }
}

/// Why a fill ioctl stopped short.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FillErrorKind {
    /// `EAGAIN`: either a partial result (`done` > 0; retry the rest) or the
    /// address space is changing (an event is pending: read events, then retry).
    Again,
    /// `EEXIST`: a destination page is already populated (for a fault service,
    /// another thread already resolved the fault: treat as success).
    Exists,
    /// `ENOENT` from COPY/ZEROPAGE/CONTINUE/POISON: the destination is not
    /// registered with this descriptor, or (CONTINUE) no page is in the page cache.
    NotRegistered,
    /// `ENOENT` from MOVE: a source page is a hole and holes were not allowed
    /// (or a range is not mapped at all).
    SourceHole,
    /// `EBUSY` from MOVE: a source page is pinned, shared with another process
    /// (after fork), or a KSM page; it cannot move and must be copied.
    Busy,
    /// `EFAULT`: the source buffer could not be read.
    Fault,
    /// `ENOMEM`: no memory for the destination page.
    NoMemory,
    /// `EINVAL`: the request is malformed for this range (wrong mode, mapping type,
    /// or a feature not enabled on the descriptor).
    Invalid,
    /// `ESRCH`: the process owning the address space is exiting.
    ProcessExiting,
    /// The descriptor was closed.
    Closed,
    /// Any other errno.
    Other,
}

/// A fill ioctl that stopped short: how far it got and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{op} stopped after {done:#x} of {len:#x} bytes: {kind:?} ({errno})")]
pub struct FillError {
    /// Which ioctl.
    pub op: FillOp,
    /// Bytes completed before the error (the range's first `done` bytes).
    pub done: usize,
    /// Bytes asked for.
    pub len: usize,
    /// Classification of the error.
    pub kind: FillErrorKind,
    /// The raw errno (for a partial result, `EAGAIN`).
    pub errno: Errno,
}

impl FillError {
    /// A request refused before any page was done, classified by its errno
    /// (`EINVAL` for a malformed request, `EBADF` for a closed descriptor).
    pub fn refused(op: FillOp, len: usize, errno: Errno) -> Self {
        FillError { op, done: 0, len, kind: classify(op, errno), errno }
    }
}

/// A fill ioctl that did the whole range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Filled {
    /// Bytes done (the whole range).
    pub bytes: usize,
}

fn classify(op: FillOp, errno: Errno) -> FillErrorKind {
    match errno {
        Errno::AGAIN => FillErrorKind::Again,
        Errno::EXIST => FillErrorKind::Exists,
        Errno::NOENT if op == FillOp::Move => FillErrorKind::SourceHole,
        Errno::NOENT => FillErrorKind::NotRegistered,
        Errno::BUSY => FillErrorKind::Busy,
        Errno::FAULT => FillErrorKind::Fault,
        Errno::NOMEM => FillErrorKind::NoMemory,
        Errno::INVAL => FillErrorKind::Invalid,
        Errno::SRCH => FillErrorKind::ProcessExiting,
        Errno::BADF => FillErrorKind::Closed,
        _ => FillErrorKind::Other,
    }
}

/// Decodes one fill ioctl exactly as the kernel reports it (see the module docs).
///
/// `res` is the ioctl's own result, `field` the signed result field after the
/// call (hmm sets it to 0 before), `len` the bytes asked for.
pub(crate) fn decode_fill(
    op: FillOp,
    res: Result<(), Errno>,
    field: i64,
    len: usize,
) -> Result<Filled, FillError> {
    match res {
        Ok(()) => Ok(Filled { bytes: len }),
        Err(errno) => {
            let (done, errno) = if field > 0 {
                // Partial: `field` bytes done, the ioctl says EAGAIN.
                (usize::try_from(field).unwrap_or(len).min(len), errno)
            } else if field < 0 {
                // The kernel's reason, as a negative errno.
                let raw = i32::try_from(field.unsigned_abs()).unwrap_or(i32::MAX);
                (0, Errno::from_raw_os_error(raw))
            } else {
                (0, errno)
            };
            Err(FillError { op, done, len, kind: classify(op, errno), errno })
        }
    }
}

// ---- messages ----------------------------------------------------------------------

/// Flags of a page-fault message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FaultFlags {
    /// A write access.
    pub write: bool,
    /// A write to a write-protected page (WP mode).
    pub wp: bool,
    /// A minor fault (MINOR mode): the page is in the page cache.
    pub minor: bool,
}

/// One message read from the descriptor.
#[derive(Debug)]
pub enum UffdEvent {
    /// A thread touched a registered page and waits until it is resolved.
    PageFault {
        /// The faulting address: page aligned unless `EXACT_ADDRESS` is enabled.
        addr: VirtAddr,
        /// Access flags.
        flags: FaultFlags,
        /// The faulting thread's id, if `THREAD_ID` is enabled.
        thread: Option<u32>,
    },
    /// The process forked; the child's copy of the registrations is served
    /// through this new descriptor (already past the API handshake).
    Fork {
        /// The child's descriptor.
        child: Uffd,
    },
    /// A registered range moved (`mremap`).
    Remap {
        /// Old start.
        from: VirtAddr,
        /// New start.
        to: VirtAddr,
        /// Length.
        len: usize,
    },
    /// Pages were dropped (`MADV_DONTNEED`, `MADV_REMOVE`) from a registered range.
    Remove {
        /// Start.
        start: VirtAddr,
        /// End (exclusive).
        end: VirtAddr,
    },
    /// A registered range was unmapped (`munmap`, or `mremap` shrinking it).
    Unmap {
        /// Start.
        start: VirtAddr,
        /// End (exclusive).
        end: VirtAddr,
    },
}

const MSG_SIZE: usize = core::mem::size_of::<sys::uffd_msg>();

fn u64_at(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_ne_bytes(a)
}

fn u32_at(b: &[u8], off: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[off..off + 4]);
    u32::from_ne_bytes(a)
}

fn addr_at(b: &[u8], off: usize) -> VirtAddr {
    VirtAddr::new(u64_at(b, off) as usize)
}

/// A message, decoded from its 32 bytes; a FORK's descriptor is returned raw so
/// that the caller takes ownership of it.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum RawEvent {
    PageFault { addr: VirtAddr, flags: FaultFlags, thread: Option<u32> },
    Fork { fd: RawFd },
    Remap { from: VirtAddr, to: VirtAddr, len: usize },
    Remove { start: VirtAddr, end: VirtAddr },
    Unmap { start: VirtAddr, end: VirtAddr },
}

/// Decodes one `struct uffd_msg` (layout checked in `sys`): the event byte at 0,
/// the payload at 8.
pub(crate) fn decode_msg(b: &[u8; MSG_SIZE], thread_id: bool) -> Result<RawEvent, UffdError> {
    let event = u32::from(b[0]);
    Ok(match event {
        g::UFFD_EVENT_PAGEFAULT => {
            let f = u64_at(b, 8);
            RawEvent::PageFault {
                addr: addr_at(b, 16),
                flags: FaultFlags {
                    write: f & u64::from(g::UFFD_PAGEFAULT_FLAG_WRITE) != 0,
                    wp: f & u64::from(g::UFFD_PAGEFAULT_FLAG_WP) != 0,
                    minor: f & u64::from(g::UFFD_PAGEFAULT_FLAG_MINOR) != 0,
                },
                thread: thread_id.then(|| u32_at(b, 24)),
            }
        }
        g::UFFD_EVENT_FORK => RawEvent::Fork { fd: u32_at(b, 8) as RawFd },
        g::UFFD_EVENT_REMAP => {
            RawEvent::Remap { from: addr_at(b, 8), to: addr_at(b, 16), len: u64_at(b, 24) as usize }
        }
        g::UFFD_EVENT_REMOVE => RawEvent::Remove { start: addr_at(b, 8), end: addr_at(b, 16) },
        g::UFFD_EVENT_UNMAP => RawEvent::Unmap { start: addr_at(b, 8), end: addr_at(b, 16) },
        _ => return Err(UffdError::UnknownEvent(b[0])),
    })
}

// ---- the descriptor ---------------------------------------------------------------------

/// What to ask of a new descriptor.
#[derive(Debug, Clone, Copy)]
pub struct UffdOptions {
    /// Features to enable where the kernel has them.
    pub wanted: Features,
    /// Features without which opening fails with [`UffdError::MissingFeatures`].
    pub required: Features,
    /// `O_NONBLOCK`: [`Uffd::read_events`] returns at once when no message waits.
    pub nonblocking: bool,
    /// Accept a user-mode-only descriptor when nothing better is allowed.
    pub allow_user_mode_only: bool,
}

impl Default for UffdOptions {
    fn default() -> Self {
        Self {
            wanted: Features::NONE,
            required: Features::NONE,
            nonblocking: true,
            allow_user_mode_only: true,
        }
    }
}

/// What `UFFDIO_API` reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiInfo {
    /// Every feature the kernel offers.
    pub features: Features,
    /// The ioctls the descriptor accepts.
    pub ioctls: Ioctls,
    /// How the descriptor was obtained.
    pub origin: UffdOrigin,
    /// Why the better paths failed, when the descriptor came from a fallback:
    /// the system call's error, then `/dev/userfaultfd`'s.
    pub refused: Option<(Errno, Errno)>,
}

/// A userfaultfd descriptor after the API handshake.
#[derive(Debug)]
pub struct Uffd {
    fd: RwLock<Option<OwnedFd>>,
    features: Features,
    origin: UffdOrigin,
    /// In SIGBUS mode, the threads waiting in their handlers (see
    /// [`Uffd::with_waiters`]).
    waiters: Option<Box<Waiters>>,
}

/// An ioctl with a pointer argument whose integer result is returned.
struct PtrIoctl<'a, T> {
    op: Opcode,
    arg: &'a mut T,
}

// SAFETY: each `PtrIoctl` is built (in `Uffd::ioctl_ptr` and the pagemap module)
// with an opcode whose argument type is `T`, as the compile-time checks in `sys`
// verify; the kernel reads and writes only within `*arg`.
unsafe impl<T> Ioctl for PtrIoctl<'_, T> {
    type Output = IoctlOutput;
    const IS_MUTATING: bool = true;
    fn opcode(&self) -> Opcode {
        self.op
    }
    fn as_ptr(&mut self) -> *mut core::ffi::c_void {
        (self.arg as *mut T).cast()
    }
    unsafe fn output_from_ptr(
        out: IoctlOutput,
        _: *mut core::ffi::c_void,
    ) -> rustix::io::Result<IoctlOutput> {
        Ok(out)
    }
}

/// Issues `op` with argument `arg`.
///
/// # Safety
///
/// `op` must be an ioctl whose argument is a `T` and whose kernel handler only
/// reads and writes `*arg` and the memory its fields describe, and that memory
/// must be valid for what the ioctl does to it.
pub(crate) unsafe fn ioctl_ptr<T>(
    fd: impl AsFd,
    op: Opcode,
    arg: &mut T,
) -> Result<IoctlOutput, Errno> {
    // SAFETY: delegated to the caller (see `# Safety`).
    unsafe { rustix::ioctl::ioctl(fd, PtrIoctl { op, arg }) }
}

/// `USERFAULTFD_IOC_NEW`: an integer argument, a new descriptor as result.
struct NewIoctl(u32);

// SAFETY: `USERFAULTFD_IOC_NEW` takes its flags as the integer argument and
// returns a new descriptor; it touches no memory of ours.
unsafe impl Ioctl for NewIoctl {
    type Output = IoctlOutput;
    const IS_MUTATING: bool = false;
    fn opcode(&self) -> Opcode {
        sys::USERFAULTFD_IOC_NEW
    }
    fn as_ptr(&mut self) -> *mut core::ffi::c_void {
        self.0 as usize as *mut core::ffi::c_void
    }
    unsafe fn output_from_ptr(
        out: IoctlOutput,
        _: *mut core::ffi::c_void,
    ) -> rustix::io::Result<IoctlOutput> {
        Ok(out)
    }
}

fn syscall_uffd(flags: u32) -> Result<OwnedFd, Errno> {
    // SAFETY: creating the descriptor has no effect on memory; what it can do
    // later goes through this module's checked calls.
    unsafe { rustix::mm::userfaultfd(UserfaultfdFlags::from_bits_retain(flags)) }
}

fn dev_node_uffd(flags: u32) -> Result<OwnedFd, Errno> {
    let dev = rustix::fs::open(
        "/dev/userfaultfd",
        rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )?;
    // SAFETY: `NewIoctl` passes only an integer; the result is a new descriptor.
    let raw = unsafe { rustix::ioctl::ioctl(&dev, NewIoctl(flags)) }?;
    // SAFETY: on success USERFAULTFD_IOC_NEW returns a fresh descriptor that
    // nothing else in this process owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// A new descriptor, how it was obtained, and why better paths failed.
type Created = (OwnedFd, UffdOrigin, Option<(Errno, Errno)>);

/// Creates a raw descriptor (before `UFFDIO_API`), trying the paths in order.
fn create(nonblocking: bool, allow_user_mode_only: bool) -> Result<Created, UffdError> {
    let mut flags = g::O_CLOEXEC;
    if nonblocking {
        flags |= g::O_NONBLOCK;
    }
    let syscall = match syscall_uffd(flags) {
        Ok(fd) => return Ok((fd, UffdOrigin::Syscall, None)),
        Err(e) => e,
    };
    let dev_node = match dev_node_uffd(flags) {
        Ok(fd) => return Ok((fd, UffdOrigin::DevNode, None)),
        Err(e) => e,
    };
    let user_mode_only = if allow_user_mode_only {
        match syscall_uffd(flags | g::UFFD_USER_MODE_ONLY) {
            Ok(fd) => return Ok((fd, UffdOrigin::UserModeOnly, Some((syscall, dev_node)))),
            Err(e) => Some(e),
        }
    } else {
        None
    };
    Err(UffdError::Unavailable(CreateAttempts { syscall, dev_node, user_mode_only }))
}

fn api(fd: &OwnedFd, features: Features) -> Result<(Features, Ioctls), Errno> {
    let mut arg = sys::uffdio_api { api: sys::UFFD_API, features: features.bits(), ioctls: 0 };
    // SAFETY: UFFDIO_API takes a `uffdio_api`, which it reads and writes.
    unsafe { ioctl_ptr(fd, sys::UFFDIO_API, &mut arg) }?;
    Ok((Features(arg.features), Ioctls(arg.ioctls)))
}

/// Asks the kernel which features and ioctls it offers, on a throw-away descriptor.
pub fn probe_api(allow_user_mode_only: bool) -> Result<ApiInfo, UffdError> {
    let (fd, origin, refused) = create(true, allow_user_mode_only)?;
    let (features, ioctls) = api(&fd, Features::NONE)
        .map_err(|errno| UffdError::Api { features: Features::NONE, errno })?;
    Ok(ApiInfo { features, ioctls, origin, refused })
}

impl Uffd {
    /// Opens a descriptor with the wanted features (see the module docs).
    pub fn open(opts: UffdOptions) -> Result<Uffd, UffdError> {
        let info = probe_api(opts.allow_user_mode_only)?;
        let missing = opts.required.difference(info.features);
        if !missing.is_empty() {
            return Err(UffdError::MissingFeatures(missing));
        }
        let mut features = (opts.wanted | opts.required).intersection(info.features);
        loop {
            let (fd, origin, _) = create(opts.nonblocking, opts.allow_user_mode_only)?;
            match api(&fd, features) {
                Ok(_) => {
                    return Ok(Uffd { fd: RwLock::new(Some(fd)), features, origin, waiters: None });
                }
                // EVENT_FORK needs CAP_SYS_PTRACE; merely wanted, it is dropped
                // (on a fresh descriptor: the handshake is made once).
                Err(Errno::PERM)
                    if features.contains(Features::EVENT_FORK)
                        && !opts.required.contains(Features::EVENT_FORK) =>
                {
                    features = features.difference(Features::EVENT_FORK);
                }
                Err(errno) => return Err(UffdError::Api { features, errno }),
            }
        }
    }

    /// The features enabled on this descriptor.
    pub fn features(&self) -> Features {
        self.features
    }

    /// How the descriptor was obtained.
    pub fn origin(&self) -> UffdOrigin {
        self.origin
    }

    /// Closes the descriptor (see the module docs); later calls fail with `Closed`.
    /// Registrations of this descriptor end once no other copy of it (a forked
    /// child's) remains.
    pub fn close(&self) {
        let fd = self.fd.write().unwrap_or_else(|e| e.into_inner()).take();
        drop(fd);
        if let Some(w) = &self.waiters {
            w.release_all();
        }
    }

    /// Whether [`close`](Self::close) was called.
    pub fn is_closed(&self) -> bool {
        self.guard().is_none()
    }

    fn guard(&self) -> RwLockReadGuard<'_, Option<OwnedFd>> {
        self.fd.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers `range`, which must lie inside `mapping`, in `mode`; returns the
    /// ioctls the range allows.
    ///
    /// Only a [`Mapping`]'s memory can be registered: the fill ioctls write only
    /// into registered ranges, and a `Mapping`'s bytes are never borrowed by Rust,
    /// so no Rust-owned memory (a `Vec`'s untouched pages, say) can be filled
    /// behind its owner's back.
    pub fn register(
        &self,
        mapping: &Mapping,
        range: PageRange,
        mode: RegisterMode,
    ) -> Result<Ioctls, UffdError> {
        let range = mapping.check(range)?;
        let g = self.guard();
        let fd = g.as_ref().ok_or(UffdError::Closed)?;
        let mut arg = sys::uffdio_register { range: raw_range(range), mode: mode.0, ioctls: 0 };
        // SAFETY: UFFDIO_REGISTER takes a `uffdio_register`; registering changes how
        // faults on the range are resolved, never the bytes it holds.
        unsafe { ioctl_ptr(fd, sys::UFFDIO_REGISTER, &mut arg) }
            .map_err(|errno| UffdError::Register { range, mode, errno })?;
        Ok(Ioctls(arg.ioctls))
    }

    /// Unregisters `range`, waking threads waiting on faults in it.
    pub fn unregister(&self, range: PageRange) -> Result<(), UffdError> {
        let g = self.guard();
        let fd = g.as_ref().ok_or(UffdError::Closed)?;
        let mut arg = raw_range(range);
        // SAFETY: UFFDIO_UNREGISTER reads a `uffdio_range`.
        let res = unsafe { ioctl_ptr(fd, sys::UFFDIO_UNREGISTER, &mut arg) }
            .map_err(|errno| UffdError::Unregister { range, errno });
        // As the kernel wakes its waiters on the range.
        self.woke(range, false);
        res.map(drop)
    }

    /// Wakes threads waiting on faults in `range` (after `DONTWAKE` fills).
    /// In SIGBUS mode no thread waits in the kernel: this releases the
    /// threads waiting in their handlers instead (see `Waiters`).
    pub fn wake(&self, range: PageRange) -> Result<(), UffdError> {
        if let Some(w) = &self.waiters {
            w.release(range);
            return Ok(());
        }
        let g = self.guard();
        let fd = g.as_ref().ok_or(UffdError::Closed)?;
        let mut arg = raw_range(range);
        // SAFETY: UFFDIO_WAKE reads a `uffdio_range`.
        unsafe { ioctl_ptr(fd, sys::UFFDIO_WAKE, &mut arg) }
            .map_err(|errno| UffdError::Control { op: "WAKE", range, errno })?;
        Ok(())
    }

    /// Write-protects `range` (WP mode): writes fault, or with `WP_ASYNC` are
    /// recorded, until [`write_unprotect`](Self::write_unprotect).
    pub fn write_protect(&self, range: PageRange) -> Result<(), UffdError> {
        self.writeprotect(range, sys::UFFDIO_WRITEPROTECT_MODE_WP)
    }

    /// Removes write protection from `range`, waking blocked writers unless
    /// `dont_wake`.
    pub fn write_unprotect(&self, range: PageRange, dont_wake: bool) -> Result<(), UffdError> {
        let res =
            self.writeprotect(range, mode(&[(dont_wake, sys::UFFDIO_WRITEPROTECT_MODE_DONTWAKE)]));
        self.woke(range, dont_wake);
        res
    }

    // The kernel refuses WP together with DONTWAKE (protecting wakes no one), which
    // the two public calls above make impossible to ask for.
    fn writeprotect(&self, range: PageRange, mode: u64) -> Result<(), UffdError> {
        let g = self.guard();
        let fd = g.as_ref().ok_or(UffdError::Closed)?;
        let mut arg = sys::uffdio_writeprotect { range: raw_range(range), mode };
        // SAFETY: UFFDIO_WRITEPROTECT takes a `uffdio_writeprotect`; it changes
        // page protection only.
        unsafe { ioctl_ptr(fd, sys::UFFDIO_WRITEPROTECT, &mut arg) }
            .map_err(|errno| UffdError::Control { op: "WRITEPROTECT", range, errno })?;
        Ok(())
    }

    /// Runs one fill ioctl: `arg` is its argument, `field` picks its result field.
    fn fill<T>(
        &self,
        op: FillOp,
        opcode: Opcode,
        len: usize,
        arg: &mut T,
        field: fn(&T) -> i64,
    ) -> Result<Filled, FillError> {
        let g = self.guard();
        let Some(fd) = g.as_ref() else {
            return Err(FillError::refused(op, len, Errno::BADF));
        };
        // SAFETY: each caller pairs `opcode` with its argument type `T`. The kernel
        // fills only ranges registered with this descriptor, which `register` allows
        // only inside a `Mapping` (or that a forked child inherited from one), and
        // MOVE takes its source from a `Mapping` too: no memory a Rust reference can
        // observe changes.
        let res = unsafe { ioctl_ptr(fd, opcode, arg) }.map(drop);
        decode_fill(op, res, field(arg), len)
    }

    /// `UFFDIO_COPY`: fills the missing pages of `dst` with `src` (of equal length)
    /// and wakes waiters unless `dont_wake`; `write_protect` installs them
    /// write-protected (WP mode).
    pub fn copy(
        &self,
        dst: PageRange,
        src: &[u8],
        dont_wake: bool,
        write_protect: bool,
    ) -> Result<Filled, FillError> {
        if src.len() != dst.len() {
            return Err(FillError::refused(FillOp::Copy, dst.len(), Errno::INVAL));
        }
        self.copy_raw(dst, src.as_ptr() as usize, dont_wake, write_protect)
    }

    /// `UFFDIO_COPY` from `src_range` of the mapping `src`.
    pub fn copy_from(
        &self,
        dst: PageRange,
        src: &Mapping,
        src_range: PageRange,
        dont_wake: bool,
    ) -> Result<Filled, FillError> {
        if src.check(src_range).is_err() || src_range.len() != dst.len() {
            return Err(FillError::refused(FillOp::Copy, dst.len(), Errno::INVAL));
        }
        self.copy_raw(dst, src_range.start().get(), dont_wake, false)
    }

    fn copy_raw(
        &self,
        dst: PageRange,
        src: usize,
        dont_wake: bool,
        write_protect: bool,
    ) -> Result<Filled, FillError> {
        let mode = mode(&[
            (dont_wake, sys::UFFDIO_COPY_MODE_DONTWAKE),
            (write_protect, sys::UFFDIO_COPY_MODE_WP),
        ]);
        let mut arg = sys::uffdio_copy {
            dst: dst.start().as_u64(),
            src: src as u64,
            len: dst.len() as u64,
            mode,
            copy: 0,
        };
        let res = self.fill(FillOp::Copy, sys::UFFDIO_COPY, dst.len(), &mut arg, |a| a.copy);
        self.woke(dst, dont_wake);
        res
    }

    /// `UFFDIO_ZEROPAGE`: maps the zero page at the missing pages of `dst`.
    pub fn zeropage(&self, dst: PageRange, dont_wake: bool) -> Result<Filled, FillError> {
        let mode = mode(&[(dont_wake, sys::UFFDIO_ZEROPAGE_MODE_DONTWAKE)]);
        let mut arg = sys::uffdio_zeropage { range: raw_range(dst), mode, zeropage: 0 };
        let res =
            self.fill(FillOp::ZeroPage, sys::UFFDIO_ZEROPAGE, dst.len(), &mut arg, |a| a.zeropage);
        self.woke(dst, dont_wake);
        res
    }

    /// Whether an address-space change (unmap, discard, remap, fork) of
    /// memory registered here has begun and its event has not yet been read:
    /// the kernel's `mmap_changing`, which it raises before the change and
    /// lowers once the event is read (the changing thread lowers it when it
    /// wakes, so it may stay raised a moment after the read).
    ///
    /// Asked with a `UFFDIO_ZEROPAGE` of no length: the kernel checks
    /// `mmap_changing` first (`EAGAIN`), and only then refuses the empty range
    /// (`EINVAL`). Nothing is ever filled.
    pub fn changes_pending(&self) -> Result<bool, UffdError> {
        let g = self.guard();
        let fd = g.as_ref().ok_or(UffdError::Closed)?;
        let mut arg = sys::uffdio_zeropage {
            range: sys::uffdio_range { start: 0, len: 0 },
            mode: 0,
            zeropage: 0,
        };
        // SAFETY: UFFDIO_ZEROPAGE takes a `uffdio_zeropage`; a zero length is
        // refused before any page is looked at, so it only reads `arg` and
        // writes its result field.
        match unsafe { ioctl_ptr(fd, sys::UFFDIO_ZEROPAGE, &mut arg) } {
            Err(Errno::AGAIN) => Ok(true),
            Err(Errno::INVAL) => Ok(false),
            Ok(_) => Ok(false),
            Err(errno) => Err(UffdError::Probe(errno)),
        }
    }

    /// Whether an address-space change is on its way to the reader: one the
    /// kernel has raised and not delivered ([`changes_pending`](Self::changes_pending)),
    /// or a message that waits to be read. Allocates nothing, never blocks.
    pub fn unread(&self) -> bool {
        self.changes_pending().unwrap_or(false) || self.poll_once(Duration::ZERO).unwrap_or(false)
    }

    /// `UFFDIO_CONTINUE`: maps the page-cache pages behind `dst` (MINOR mode).
    pub fn continue_(
        &self,
        dst: PageRange,
        dont_wake: bool,
        write_protect: bool,
    ) -> Result<Filled, FillError> {
        let mode = mode(&[
            (dont_wake, sys::UFFDIO_CONTINUE_MODE_DONTWAKE),
            (write_protect, sys::UFFDIO_CONTINUE_MODE_WP),
        ]);
        let mut arg = sys::uffdio_continue { range: raw_range(dst), mode, mapped: 0 };
        let res =
            self.fill(FillOp::Continue, sys::UFFDIO_CONTINUE, dst.len(), &mut arg, |a| a.mapped);
        self.woke(dst, dont_wake);
        res
    }

    /// `UFFDIO_POISON`: marks the missing pages of `dst` poisoned; a touch gets SIGBUS.
    pub fn poison(&self, dst: PageRange, dont_wake: bool) -> Result<Filled, FillError> {
        let mode = mode(&[(dont_wake, sys::UFFDIO_POISON_MODE_DONTWAKE)]);
        let mut arg = sys::uffdio_poison { range: raw_range(dst), mode, updated: 0 };
        let res = self.fill(FillOp::Poison, sys::UFFDIO_POISON, dst.len(), &mut arg, |a| a.updated);
        self.woke(dst, dont_wake);
        res
    }

    /// `UFFDIO_MOVE`: moves the pages of `src_range` (inside the mapping `src`) to
    /// `dst` (registered with this descriptor, missing), without copying.
    /// With `allow_src_holes`, holes in the source are skipped (and count as moved).
    pub fn move_pages(
        &self,
        dst: PageRange,
        src: &Mapping,
        src_range: PageRange,
        dont_wake: bool,
        allow_src_holes: bool,
    ) -> Result<Filled, FillError> {
        if src.check(src_range).is_err() || src_range.len() != dst.len() {
            return Err(FillError::refused(FillOp::Move, dst.len(), Errno::INVAL));
        }
        let mode = mode(&[
            (dont_wake, sys::UFFDIO_MOVE_MODE_DONTWAKE),
            (allow_src_holes, sys::UFFDIO_MOVE_MODE_ALLOW_SRC_HOLES),
        ]);
        let mut arg = sys::uffdio_move {
            dst: dst.start().as_u64(),
            src: src_range.start().as_u64(),
            len: dst.len() as u64,
            mode,
            move_: 0,
        };
        let res = self.fill(FillOp::Move, sys::UFFDIO_MOVE, dst.len(), &mut arg, |a| a.move_);
        self.woke(dst, dont_wake);
        res
    }

    /// Like [`move_pages`](Self::move_pages), retrying partial results while the
    /// kernel makes progress. The error's `done` counts every byte moved.
    pub fn move_pages_all(
        &self,
        dst: PageRange,
        src: &Mapping,
        src_range: PageRange,
        dont_wake: bool,
        allow_src_holes: bool,
    ) -> Result<Filled, FillError> {
        let len = dst.len();
        retry_partial(len, |done| {
            let d = dst.subrange(done, len - done).expect("inside");
            let s = src_range.subrange(done, len - done).expect("inside");
            self.move_pages(d, src, s, dont_wake, allow_src_holes)
        })
    }

    /// Like [`copy`](Self::copy), retrying partial results while the kernel makes progress.
    pub fn copy_all(
        &self,
        dst: PageRange,
        src: &[u8],
        dont_wake: bool,
    ) -> Result<Filled, FillError> {
        let len = dst.len();
        if src.len() != len {
            return self.copy(dst, src, dont_wake, false);
        }
        retry_partial(len, |done| {
            let d = dst.subrange(done, len - done).expect("inside");
            self.copy(d, &src[done..], dont_wake, false)
        })
    }

    /// Waits until a message can be read, for at most `timeout` (`None`: until
    /// one can, or the descriptor is closed). Returns whether one can.
    ///
    /// The wait is made in slices of at most 100 ms, each holding the descriptor
    /// only for its length, so that [`close`](Self::close) never waits long.
    pub fn poll(&self, timeout: Option<Duration>) -> Result<bool, UffdError> {
        const SLICE: Duration = Duration::from_millis(100);
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        loop {
            let wait = match deadline {
                Some(d) => d.saturating_duration_since(std::time::Instant::now()).min(SLICE),
                None => SLICE,
            };
            if self.poll_once(wait)? {
                return Ok(true);
            }
            if deadline.is_some_and(|d| std::time::Instant::now() >= d) {
                return Ok(false);
            }
        }
    }

    /// Waits until a message can be read or `notifier` is signalled, for at most
    /// `timeout`. Holds the descriptor for the whole wait: a thread that needs
    /// [`close`](Self::close) to proceed must signal the notifier first.
    pub fn poll_with(
        &self,
        notifier: &super::event::Notifier,
        timeout: Option<Duration>,
    ) -> Result<super::event::Ready, UffdError> {
        let g = self.guard();
        let fd = g.as_ref().ok_or(UffdError::Closed)?;
        notifier.poll_with(fd.as_fd(), timeout).map_err(UffdError::Read)
    }

    fn poll_once(&self, wait: Duration) -> Result<bool, UffdError> {
        let g = self.guard();
        let fd = g.as_ref().ok_or(UffdError::Closed)?;
        let ts = rustix::time::Timespec {
            tv_sec: wait.as_secs().try_into().unwrap_or(i64::MAX),
            tv_nsec: wait.subsec_nanos().into(),
        };
        let mut fds = [rustix::event::PollFd::new(fd, rustix::event::PollFlags::IN)];
        loop {
            match rustix::event::poll(&mut fds, Some(&ts)) {
                Ok(n) => return Ok(n > 0),
                Err(Errno::INTR) => continue,
                Err(e) => return Err(UffdError::Read(e)),
            }
        }
    }

    /// Reads up to `max` (at most 64) messages into `out`; returns how many were
    /// read. On a non-blocking descriptor, returns 0 when none waits.
    ///
    /// Allocates nothing when `out` has room for `max` more events (see the fork
    /// hazard in the module docs).
    ///
    /// In SIGBUS mode the faults that threads handed over from their handlers
    /// ([`wait_in_thread`](Self::wait_in_thread)) come first, as `PageFault`
    /// messages.
    pub fn read_events(&self, out: &mut Vec<UffdEvent>, max: usize) -> Result<usize, UffdError> {
        let max = max.clamp(1, 64);
        let handed = match &self.waiters {
            Some(w) => w.take_ready(out, max),
            None => 0,
        };
        let room = max - handed;
        if room == 0 {
            return Ok(handed);
        }
        let mut buf = [0u8; MSG_SIZE * 64];
        let n = {
            let g = self.guard();
            let fd = g.as_ref().ok_or(UffdError::Closed)?;
            loop {
                match rustix::io::read(fd, &mut buf[..room * MSG_SIZE]) {
                    Ok(n) => break n,
                    Err(Errno::AGAIN) => return Ok(handed),
                    Err(Errno::INTR) => continue,
                    Err(e) => return Err(UffdError::Read(e)),
                }
            }
        };
        let thread_id = self.features.contains(Features::THREAD_ID);
        let mut count = 0;
        for chunk in buf[..n].chunks_exact(MSG_SIZE) {
            let msg: &[u8; MSG_SIZE] = chunk.try_into().expect("exact chunk");
            // Decode every message before failing, so that no FORK descriptor leaks.
            let ev = match decode_msg(msg, thread_id) {
                Ok(RawEvent::PageFault { addr, flags, thread }) => {
                    UffdEvent::PageFault { addr, flags, thread }
                }
                Ok(RawEvent::Fork { fd }) => {
                    // SAFETY: the kernel installed this descriptor in our table while
                    // we read the FORK message; nothing else knows it, so we own it.
                    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                    UffdEvent::Fork {
                        child: Uffd {
                            fd: RwLock::new(Some(fd)),
                            features: self.features,
                            origin: self.origin,
                            waiters: None,
                        },
                    }
                }
                Ok(RawEvent::Remap { from, to, len }) => UffdEvent::Remap { from, to, len },
                Ok(RawEvent::Remove { start, end }) => UffdEvent::Remove { start, end },
                Ok(RawEvent::Unmap { start, end }) => UffdEvent::Unmap { start, end },
                Err(e) => {
                    tracing::error!(error = %e, "dropping an unknown userfaultfd message");
                    continue;
                }
            };
            out.push(ev);
            count += 1;
        }
        Ok(handed + count)
    }

    /// Turns on SIGBUS mode's waiting room: a descriptor opened with
    /// `UFFD_FEATURE_SIGBUS` whose faults threads hand over from their
    /// `SIGBUS` handlers ([`wait_in_thread`](Self::wait_in_thread)) to the
    /// thread that reads its messages.
    pub fn with_waiters(mut self) -> Result<Self, UffdError> {
        if !self.features.contains(Features::SIGBUS) {
            return Err(UffdError::MissingFeatures(Features::SIGBUS));
        }
        self.waiters = Some(Box::new(Waiters::new()));
        Ok(self)
    }

    /// Whether threads wait in their handlers (SIGBUS mode) rather than in
    /// the kernel.
    pub fn waits_in_thread(&self) -> bool {
        self.waiters.is_some()
    }

    /// SIGBUS mode: hands the fault at `addr` to the thread that reads this
    /// descriptor's messages (it reads it as a `PageFault` message, after
    /// `notify` tells it to look) and waits until a wake or fill covers the
    /// page, as the kernel would have kept the thread. Returns false, at
    /// once, if every seat of the waiting room is taken (the caller lets the
    /// instruction fault again) or the descriptor has no waiting room.
    ///
    /// Async-signal-safe: atomics, `notify`, and futex waits of at most
    /// [`WAITER_NAP`] each, rechecking that the descriptor is open.
    pub fn wait_in_thread(&self, addr: VirtAddr, flags: FaultFlags, notify: impl Fn()) -> Waited {
        let Some(w) = &self.waiters else { return Waited::NoSeat };
        let Some(seat) = w.claim(addr.page_down(), flags) else { return Waited::NoSeat };
        notify();
        let waited = loop {
            let state = seat.state.load(Ordering::Acquire);
            match code(state) {
                SEAT_DONE => break Waited::Woken,
                SEAT_REFUSED => break Waited::Refused,
                _ if w.closed.load(Ordering::Acquire) != 0 => break Waited::Woken,
                _ => super::sigbus::futex_wait(&seat.state, state, Some(WAITER_NAP)),
            }
        };
        let state = seat.state.load(Ordering::Acquire);
        seat.state.store(with_code(state, SEAT_FREE), Ordering::Release);
        w.taken.fetch_sub(1, Ordering::SeqCst);
        waited
    }

    /// SIGBUS mode: the reader cannot serve the faults on `range` (no fill
    /// reaches the address: it is not, or no longer, registered memory, such
    /// as a device's file mapping hmm put there): the threads waiting on it
    /// let their signal go on, as the kernel would have raised it without
    /// userfaultfd. Without a waiting room, a wake.
    pub fn refuse(&self, range: PageRange) {
        match &self.waiters {
            Some(w) => w.finish(range, SEAT_REFUSED),
            None => {
                let _ = self.wake(range);
            }
        }
    }

    /// Releases the threads waiting in their handlers on `range`, unless the
    /// fill asked not to wake.
    fn woke(&self, range: PageRange, dont_wake: bool) {
        if !dont_wake && let Some(w) = &self.waiters {
            w.release(range);
        }
    }
}

/// How long a thread waiting in its handler sleeps before it looks again
/// whether its descriptor was closed.
pub const WAITER_NAP: Duration = Duration::from_millis(100);

/// Seats in SIGBUS mode's waiting room: threads waiting at once. A thread
/// that finds none free lets its instruction fault again.
const SEATS: usize = 256;

/// A seat's state word: the state in the low byte, and in the rest a
/// generation, moved on each claim, so that a wake that read a seat's
/// address cannot end the wait of a thread that took the seat since.
const SEAT_FREE: u32 = 0;
/// Taken; the address is being written.
const SEAT_CLAIMED: u32 = 1;
/// Waiting to be read as a message.
const SEAT_READY: u32 = 2;
/// Read as a message; waiting for its wake.
const SEAT_READ: u32 = 3;
/// Woken: the thread leaves its handler and frees the seat.
const SEAT_DONE: u32 = 4;
/// Refused: the thread lets its signal go on, and frees the seat.
const SEAT_REFUSED: u32 = 5;

fn code(state: u32) -> u32 {
    state & 0xff
}

fn with_code(state: u32, code: u32) -> u32 {
    (state & !0xff) | code
}

/// How a wait in the waiting room ended ([`Uffd::wait_in_thread`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waited {
    /// A wake or fill covered the page (or the descriptor closed): the
    /// instruction runs again.
    Woken,
    /// The reader could not serve the fault ([`Uffd::refuse`]).
    Refused,
    /// No seat was free (or there is no waiting room): nothing was handed over.
    NoSeat,
}

/// One thread waiting in its handler.
struct Seat {
    state: AtomicU32,
    addr: AtomicUsize,
    /// Bit 0: write; bit 1: write-protect fault.
    flags: AtomicU32,
}

/// SIGBUS mode's stand-in for the kernel's fault wait queue: threads whose
/// fault their handler cannot serve itself wait here, as they would in the
/// kernel in the normal mode, and every wake or waking fill of their page
/// releases them, as it would have woken them there.
///
/// The same ordering holds as in the kernel: a seat is ready before the
/// reader is told to look, so a wake that comes after the fault was read
/// finds it; a wake that comes before the seat was taken finds nothing, and
/// the reader then serves a page that is already there (`EEXIST`: success),
/// waking the seat itself.
struct Waiters {
    seats: Box<[Seat]>,
    /// Where the next claim starts looking (spreads threads over the seats).
    next: AtomicUsize,
    /// Seats taken: a wake with none taken looks at none.
    taken: AtomicUsize,
    closed: AtomicU32,
}

impl fmt::Debug for Waiters {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let waiting = self
            .seats
            .iter()
            .filter(|s| code(s.state.load(Ordering::Relaxed)) != SEAT_FREE)
            .count();
        f.debug_struct("Waiters").field("waiting", &waiting).finish()
    }
}

impl Waiters {
    fn new() -> Self {
        let seats = (0..SEATS)
            .map(|_| Seat {
                state: AtomicU32::new(SEAT_FREE),
                addr: AtomicUsize::new(0),
                flags: AtomicU32::new(0),
            })
            .collect();
        Self {
            seats,
            next: AtomicUsize::new(0),
            taken: AtomicUsize::new(0),
            closed: AtomicU32::new(0),
        }
    }

    fn claim(&self, page: VirtAddr, flags: FaultFlags) -> Option<&Seat> {
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        for k in 0..SEATS {
            let seat = &self.seats[(start + k) % SEATS];
            let s = seat.state.load(Ordering::Relaxed);
            if code(s) != SEAT_FREE {
                continue;
            }
            let claimed = (s & !0xff).wrapping_add(0x100) | SEAT_CLAIMED;
            if seat.state.compare_exchange(s, claimed, Ordering::Acquire, Ordering::Relaxed).is_ok()
            {
                self.taken.fetch_add(1, Ordering::SeqCst);
                seat.addr.store(page.get(), Ordering::Relaxed);
                let bits = u32::from(flags.write) | u32::from(flags.wp) << 1;
                seat.flags.store(bits, Ordering::Relaxed);
                seat.state.store(with_code(claimed, SEAT_READY), Ordering::SeqCst);
                return Some(seat);
            }
        }
        None
    }

    /// Moves the ready seats (at most `max`) into `out` as messages.
    fn take_ready(&self, out: &mut Vec<UffdEvent>, max: usize) -> usize {
        let mut n = 0;
        for seat in self.seats.iter() {
            if n == max {
                break;
            }
            let s = seat.state.load(Ordering::SeqCst);
            if code(s) == SEAT_READY
                && seat
                    .state
                    .compare_exchange(
                        s,
                        with_code(s, SEAT_READ),
                        Ordering::SeqCst,
                        Ordering::Relaxed,
                    )
                    .is_ok()
            {
                let bits = seat.flags.load(Ordering::Relaxed);
                out.push(UffdEvent::PageFault {
                    addr: VirtAddr::new(seat.addr.load(Ordering::Relaxed)),
                    flags: FaultFlags { write: bits & 1 != 0, wp: bits & 2 != 0, minor: false },
                    thread: None,
                });
                n += 1;
            }
        }
        n
    }

    /// Wakes the seats whose page lies in `range`.
    fn release(&self, range: PageRange) {
        self.finish(range, SEAT_DONE);
    }

    /// Ends the waits on `range` with `end` (done or refused).
    fn finish(&self, range: PageRange, end: u32) {
        // A seat is counted before it is ready: one a wake must see is.
        if self.taken.load(Ordering::SeqCst) == 0 {
            return;
        }
        let (lo, hi) = (range.start().get(), range.end().get());
        for seat in self.seats.iter() {
            let s = seat.state.load(Ordering::SeqCst);
            if code(s) != SEAT_READY && code(s) != SEAT_READ {
                continue;
            }
            let a = seat.addr.load(Ordering::Relaxed);
            if a < lo || a >= hi {
                continue;
            }
            // The generation in `s` makes this fail if the seat was freed
            // and taken again since its address was read.
            let ended = with_code(s, end);
            if seat.state.compare_exchange(s, ended, Ordering::SeqCst, Ordering::Relaxed).is_ok() {
                super::sigbus::futex_wake(&seat.state);
            }
        }
    }

    /// Releases every seat, for good (the descriptor is closing).
    fn release_all(&self) {
        self.closed.store(1, Ordering::SeqCst);
        for seat in self.seats.iter() {
            super::sigbus::futex_wake(&seat.state);
        }
    }
}

/// The OR of the mode bits whose condition holds.
fn mode(bits: &[(bool, u64)]) -> u64 {
    bits.iter().filter(|(on, _)| *on).fold(0, |m, (_, bit)| m | bit)
}

fn raw_range(r: PageRange) -> sys::uffdio_range {
    sys::uffdio_range { start: r.start().as_u64(), len: r.len() as u64 }
}

/// Runs `step(done)` until the whole `len` is done, an error other than a
/// partial result occurs, or a step makes no progress. Errors report the total done.
fn retry_partial(
    len: usize,
    mut step: impl FnMut(usize) -> Result<Filled, FillError>,
) -> Result<Filled, FillError> {
    let mut done = 0;
    loop {
        match step(done) {
            Ok(_) => return Ok(Filled { bytes: len }),
            Err(e) if e.kind == FillErrorKind::Again && e.done > 0 => done += e.done,
            Err(e) => return Err(FillError { done: done + e.done, len, ..e }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_fill_follows_the_kernel() {
        // Whole range.
        assert_eq!(decode_fill(FillOp::Copy, Ok(()), 8192, 8192), Ok(Filled { bytes: 8192 }));
        // Partial: positive field, EAGAIN from the ioctl.
        let e = decode_fill(FillOp::Move, Err(Errno::AGAIN), 4096, 8192).unwrap_err();
        assert_eq!((e.done, e.kind, e.errno), (4096, FillErrorKind::Again, Errno::AGAIN));
        // Negative field: the kernel's reason.
        let e = decode_fill(
            FillOp::Copy,
            Err(Errno::EXIST),
            -i64::from(Errno::EXIST.raw_os_error()),
            4096,
        )
        .unwrap_err();
        assert_eq!((e.done, e.kind), (0, FillErrorKind::Exists));
        // Field untouched: refused before starting (address space changing).
        let e = decode_fill(FillOp::ZeroPage, Err(Errno::AGAIN), 0, 4096).unwrap_err();
        assert_eq!((e.done, e.kind), (0, FillErrorKind::Again));
        // ENOENT means different things for MOVE and the others.
        let enoent = -i64::from(Errno::NOENT.raw_os_error());
        assert_eq!(
            decode_fill(FillOp::Move, Err(Errno::NOENT), enoent, 4096).unwrap_err().kind,
            FillErrorKind::SourceHole
        );
        assert_eq!(
            decode_fill(FillOp::Copy, Err(Errno::NOENT), enoent, 4096).unwrap_err().kind,
            FillErrorKind::NotRegistered
        );
        // A field larger than asked cannot make `done` exceed `len`.
        assert_eq!(
            decode_fill(FillOp::Move, Err(Errno::AGAIN), 1 << 40, 4096).unwrap_err().done,
            4096
        );
    }

    #[test]
    fn retry_partial_accumulates() {
        let mut calls = vec![
            Err(FillError {
                op: FillOp::Move,
                done: 4096,
                len: 12288,
                kind: FillErrorKind::Again,
                errno: Errno::AGAIN,
            }),
            Err(FillError {
                op: FillOp::Move,
                done: 0,
                len: 8192,
                kind: FillErrorKind::SourceHole,
                errno: Errno::NOENT,
            }),
        ]
        .into_iter();
        let e = retry_partial(12288, |_| calls.next().unwrap()).unwrap_err();
        assert_eq!((e.done, e.len, e.kind), (4096, 12288, FillErrorKind::SourceHole));
        let mut n = 0;
        let ok = retry_partial(8192, |done| {
            n += 1;
            if done == 0 {
                Err(FillError {
                    op: FillOp::Copy,
                    done: 4096,
                    len: 8192,
                    kind: FillErrorKind::Again,
                    errno: Errno::AGAIN,
                })
            } else {
                Ok(Filled { bytes: 4096 })
            }
        });
        assert_eq!((ok, n), (Ok(Filled { bytes: 8192 }), 2));
    }

    fn msg(event: u32, words: [u64; 3]) -> [u8; MSG_SIZE] {
        let mut b = [0u8; MSG_SIZE];
        b[0] = event as u8;
        for (i, w) in words.iter().enumerate() {
            b[8 + 8 * i..16 + 8 * i].copy_from_slice(&w.to_ne_bytes());
        }
        b
    }

    #[test]
    fn decode_msg_reads_every_event() {
        let pf =
            msg(g::UFFD_EVENT_PAGEFAULT, [u64::from(g::UFFD_PAGEFAULT_FLAG_WRITE), 0x7000, 4242]);
        assert_eq!(
            decode_msg(&pf, true).unwrap(),
            RawEvent::PageFault {
                addr: VirtAddr::new(0x7000),
                flags: FaultFlags { write: true, wp: false, minor: false },
                thread: Some(4242)
            }
        );
        assert!(matches!(
            decode_msg(&pf, false).unwrap(),
            RawEvent::PageFault { thread: None, .. }
        ));
        assert_eq!(
            decode_msg(&msg(g::UFFD_EVENT_FORK, [17, 0, 0]), false).unwrap(),
            RawEvent::Fork { fd: 17 }
        );
        assert_eq!(
            decode_msg(&msg(g::UFFD_EVENT_REMAP, [0x1000, 0x9000, 0x2000]), false).unwrap(),
            RawEvent::Remap { from: VirtAddr::new(0x1000), to: VirtAddr::new(0x9000), len: 0x2000 }
        );
        assert_eq!(
            decode_msg(&msg(g::UFFD_EVENT_REMOVE, [0x1000, 0x3000, 0]), false).unwrap(),
            RawEvent::Remove { start: VirtAddr::new(0x1000), end: VirtAddr::new(0x3000) }
        );
        assert_eq!(
            decode_msg(&msg(g::UFFD_EVENT_UNMAP, [0x1000, 0x3000, 0]), false).unwrap(),
            RawEvent::Unmap { start: VirtAddr::new(0x1000), end: VirtAddr::new(0x3000) }
        );
        assert!(matches!(
            decode_msg(&msg(0x99, [0; 3]), false),
            Err(UffdError::UnknownEvent(0x99))
        ));
    }

    #[test]
    fn feature_names() {
        let f = Features::MOVE | Features::POISON | Features::from_bits(1 << 40);
        assert_eq!(f.names(), vec!["POISON", "MOVE", "0x10000000000"]);
        assert!(Features::EVENTS.contains(Features::EVENT_FORK));
    }
}
