//! Mappings: `mmap`, `munmap`, `mremap`, `mprotect`, `madvise`, memfd and
//! `fallocate(PUNCH_HOLE)`.
//!
//! # Ownership model
//!
//! A [`Mapping`] owns a range of the address space from `mmap` until drop. Its
//! memory is never lent out as a Rust reference: bytes go in and out through
//! copies ([`Mapping::read`], [`Mapping::write`]) made with relaxed atomic
//! accesses, so threads may read and write the same bytes at once without a
//! data race (they see some interleaving of whole words or bytes). That is
//! what makes it sound to let the kernel change the memory underneath at any time
//! (`MADV_DONTNEED`, `UFFDIO_MOVE`, a poisoned page, another thread's write): no
//! Rust reference can observe the change. Every operation that can drop, move or
//! replace pages is therefore a method on `Mapping` (or takes a `&Mapping`), and
//! checks that the range it is given lies inside it.

use std::ffi::CStr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::ptr;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use rustix::fs::{FallocateFlags, MemfdFlags};
use rustix::mm::{Advice, MapFlags, MprotectFlags, MremapFlags, ProtFlags};

use super::bytes;
use crate::addr::{PAGE_SIZE, PageRange, RangeError, VirtAddr};

/// Failure of a memory-management system call.
#[derive(Debug, thiserror::Error)]
pub enum MmError {
    /// The range given was malformed or outside the mapping.
    #[error(transparent)]
    Range(#[from] RangeError),
    /// An alignment that is not a power of two of at least a page.
    #[error("alignment {0:#x} must be a power of two of at least {PAGE_SIZE} bytes")]
    Alignment(usize),
    /// `mmap` failed.
    #[error("mmap of {len:#x} bytes failed: {errno}")]
    Map {
        /// Length asked for.
        len: usize,
        /// The kernel's error.
        #[source]
        errno: rustix::io::Errno,
    },
    /// `mremap` failed.
    #[error("mremap of {range} failed: {errno}")]
    Remap {
        /// Range being remapped.
        range: PageRange,
        /// The kernel's error.
        #[source]
        errno: rustix::io::Errno,
    },
    /// `mprotect` failed.
    #[error("mprotect({range}, {prot:?}) failed: {errno}")]
    Protect {
        /// Range.
        range: PageRange,
        /// Protection asked for.
        prot: Protection,
        /// The kernel's error.
        #[source]
        errno: rustix::io::Errno,
    },
    /// `madvise` failed.
    #[error("madvise({range}, {advice:?}) failed: {errno}{}", advice_hint(*.advice, *.errno))]
    Advise {
        /// Range.
        range: PageRange,
        /// Advice given.
        advice: Advise,
        /// The kernel's error.
        #[source]
        errno: rustix::io::Errno,
    },
    /// `munmap` failed.
    #[error("munmap of {range} failed: {errno}")]
    Unmap {
        /// Range.
        range: PageRange,
        /// The kernel's error.
        #[source]
        errno: rustix::io::Errno,
    },
    /// [`Mapping::punch`] on a mapping that was not made guarded.
    #[error("{0} cannot have parts unmapped while shared: make it with `Mapping::guarded`")]
    NotGuarded(PageRange),
    /// [`Mapping::into_anonymous`] of a mapping that is not a private file mapping.
    #[error("{0} is not a private file mapping")]
    NotPrivateFile(PageRange),
    /// `memfd_create`, `ftruncate` or `fallocate` failed.
    #[error("{what} failed: {errno}")]
    File {
        /// Which call.
        what: &'static str,
        /// The kernel's error.
        #[source]
        errno: rustix::io::Errno,
    },
}

/// Maps a C library call's byte count (negative: `errno`) to a result.
fn byte_count(n: isize, what: &'static str) -> Result<usize, MmError> {
    usize::try_from(n).map_err(|_| MmError::File {
        what,
        errno: rustix::io::Errno::from_io_error(&std::io::Error::last_os_error())
            .unwrap_or(rustix::io::Errno::IO),
    })
}

fn advice_hint(advice: Advise, errno: rustix::io::Errno) -> &'static str {
    match (advice, errno) {
        (Advise::PopulateRead | Advise::PopulateWrite, rustix::io::Errno::INVAL) => {
            " (MADV_POPULATE_* needs Linux 5.14 or later)"
        }
        (Advise::PopulateRead | Advise::PopulateWrite, rustix::io::Errno::FAULT) => {
            " (a page could not be populated: it is poisoned or its fault failed)"
        }
        (Advise::Remove, rustix::io::Errno::INVAL) => {
            " (MADV_REMOVE works only on shared or file-backed mappings)"
        }
        _ => "",
    }
}

/// Page protection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protection {
    /// No access: every touch is SIGSEGV.
    None,
    /// Read only.
    Read,
    /// Read and write.
    ReadWrite,
}

impl Protection {
    fn prot_flags(self) -> ProtFlags {
        match self {
            Protection::None => ProtFlags::empty(),
            Protection::Read => ProtFlags::READ,
            Protection::ReadWrite => ProtFlags::READ | ProtFlags::WRITE,
        }
    }

    fn mprotect_flags(self) -> MprotectFlags {
        match self {
            Protection::None => MprotectFlags::empty(),
            Protection::Read => MprotectFlags::READ,
            Protection::ReadWrite => MprotectFlags::READ | MprotectFlags::WRITE,
        }
    }
}

/// The `madvise` advice hmm uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Advise {
    /// `MADV_DONTNEED`: drop the pages; private anonymous memory reads back as zero
    /// (or faults to userfaultfd, if registered MISSING).
    DontNeed,
    /// `MADV_FREE`: the kernel may drop the pages lazily, unless written again.
    Free,
    /// `MADV_REMOVE`: free the backing store of a shared or file mapping (punch a hole).
    Remove,
    /// `MADV_POPULATE_READ`: fault the pages in readable, as a CPU read would.
    PopulateRead,
    /// `MADV_POPULATE_WRITE`: fault the pages in writable, as a CPU write would.
    PopulateWrite,
    /// `MADV_HUGEPAGE`: allow transparent huge pages.
    HugePage,
    /// `MADV_NOHUGEPAGE`: forbid transparent huge pages.
    NoHugePage,
    /// `MADV_DONTFORK`: the range is not inherited by a child after fork.
    DontFork,
    /// `MADV_PAGEOUT`: reclaim the pages now (private anonymous memory goes
    /// to swap, if there is any).
    PageOut,
}

impl Advise {
    fn raw(self) -> Advice {
        match self {
            Advise::DontNeed => Advice::LinuxDontNeed,
            Advise::Free => Advice::LinuxFree,
            Advise::Remove => Advice::LinuxRemove,
            Advise::PopulateRead => Advice::LinuxPopulateRead,
            Advise::PopulateWrite => Advice::LinuxPopulateWrite,
            Advise::HugePage => Advice::LinuxHugepage,
            Advise::NoHugePage => Advice::LinuxNoHugepage,
            Advise::DontFork => Advice::LinuxDontFork,
            Advise::PageOut => Advice::LinuxPageOut,
        }
    }
}

/// What backs a mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backing {
    /// `MAP_PRIVATE | MAP_ANONYMOUS`.
    PrivateAnon,
    /// `MAP_SHARED | MAP_ANONYMOUS` (shmem).
    SharedAnon,
    /// `MAP_SHARED` of a file or memfd.
    SharedFile,
    /// `MAP_PRIVATE` of a file or memfd.
    PrivateFile,
}

/// An owned mapping of the address space; unmapped on drop.
///
/// See the [module documentation](self) for why its memory is only reached
/// through copies.
#[derive(Debug)]
pub struct Mapping {
    range: PageRange,
    backing: Backing,
    /// Whether drop unmaps the range (false for a range lent by its owner, see
    /// [`Mapping::from_raw`]).
    owned: bool,
    /// For a [`guarded`](Mapping::guarded) mapping: its holes and whether it is
    /// lent. Every access to the bytes holds the read lock across its check and
    /// its touch; [`punch`](Mapping::punch) and lending to an arena take the
    /// write lock, so no access can land on an address being given back to the
    /// kernel, nor overlap the arena's references.
    guard: Option<Box<RwLock<GuardState>>>,
}

#[derive(Debug, Default)]
struct GuardState {
    /// Parts unmapped with [`Mapping::punch`].
    holes: Vec<PageRange>,
    /// Lent to an [`Arena`](super::arena::Arena): the bytes are reached through
    /// Rust references, so every method here that reaches or changes them refuses.
    claimed: bool,
}

/// Why a mapping cannot be lent to an arena.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ClaimRefused {
    /// It was not made with [`Mapping::guarded`].
    NotGuarded,
    /// It is lent already.
    Claimed,
    /// Parts of it were unmapped.
    Holes,
}

/// An access to a mapping's bytes in progress: holds off [`Mapping::punch`]
/// and arenas.
pub(super) struct Access<'a> {
    pub(super) ptr: *mut u8,
    _guard: Option<RwLockReadGuard<'a, GuardState>>,
}

// SAFETY: a `Mapping` is an address range plus metadata. Its memory is reached
// only through the copies below, which are valid from any thread.
unsafe impl Send for Mapping {}
// SAFETY: shared access only reads or writes the memory with atomic accesses
// (`touch_*`) or through `bytes` (`read`, `write`, `fill`, `copy_shared_from`),
// both sound under concurrent access; the one plain copy, `copy_from`, needs
// `&mut` on both mappings, so no other thread can access them meanwhile.
unsafe impl Sync for Mapping {}

impl Mapping {
    fn raw(range: PageRange, backing: Backing, owned: bool) -> Self {
        Self { range, backing, owned, guard: None }
    }

    /// A new private anonymous mapping of `len` bytes (a non-zero multiple of the page size).
    pub fn anonymous(len: usize, prot: Protection) -> Result<Self, MmError> {
        Self::map_anon(len, prot, MapFlags::PRIVATE, Backing::PrivateAnon)
    }

    /// A new private anonymous mapping at exactly `range`, which must be free:
    /// `MAP_FIXED_NOREPLACE` never replaces an existing mapping, so an
    /// occupied range is refused (`EEXIST`). For code that maps memory again
    /// where it unmapped some, as applications do.
    pub fn anonymous_at(range: PageRange, prot: Protection) -> Result<Self, MmError> {
        let len = range.len();
        check_len(len)?;
        // SAFETY: MAP_FIXED_NOREPLACE maps only where nothing is mapped, so no
        // existing Rust object can be aliased; a kernel that ignores the flag
        // treats the address as a hint and maps elsewhere, also fresh memory.
        let ptr = unsafe {
            rustix::mm::mmap_anonymous(
                range.start().get() as *mut _,
                len,
                prot.prot_flags(),
                MapFlags::PRIVATE | MapFlags::NORESERVE | MapFlags::FIXED_NOREPLACE,
            )
        }
        .map_err(|errno| MmError::Map { len, errno })?;
        let got = Self::raw(
            PageRange::new(VirtAddr::new(ptr as usize), len)?,
            Backing::PrivateAnon,
            true,
        );
        if got.range != range {
            // A kernel without MAP_FIXED_NOREPLACE: dropping `got` unmaps it.
            return Err(MmError::Map { len, errno: rustix::io::Errno::EXIST });
        }
        Ok(got)
    }

    /// A new shared anonymous (shmem) mapping.
    pub fn shared_anonymous(len: usize, prot: Protection) -> Result<Self, MmError> {
        Self::map_anon(len, prot, MapFlags::SHARED, Backing::SharedAnon)
    }

    /// A private anonymous mapping whose start is a multiple of `align` (a power
    /// of two, at least a page): for transparent huge pages.
    pub fn anonymous_aligned(len: usize, align: usize, prot: Protection) -> Result<Self, MmError> {
        if !align.is_power_of_two() || align < PAGE_SIZE {
            return Err(MmError::Alignment(align));
        }
        check_len(len)?;
        let total =
            len.checked_add(align).ok_or(RangeError::Overflow { start: VirtAddr::new(0), len })?;
        let outer = Self::map_anon(total, prot, MapFlags::PRIVATE, Backing::PrivateAnon)?;
        let base = outer.range.start().get();
        let start = (base + align - 1) & !(align - 1);
        let head = start - base;
        let tail = total - head - len;
        let inner = PageRange::new(VirtAddr::new(start), len)?;
        // Hand the range over from `outer` to the new `Mapping` before trimming.
        std::mem::forget(outer);
        if head > 0 {
            raw_munmap(PageRange::new(VirtAddr::new(base), head)?);
        }
        if tail > 0 {
            raw_munmap(PageRange::new(inner.end(), tail)?);
        }
        Ok(Self::raw(inner, Backing::PrivateAnon, true))
    }

    /// Maps `len` bytes of `fd` at `offset`; `shared` picks `MAP_SHARED` over `MAP_PRIVATE`.
    pub fn file(
        fd: BorrowedFd<'_>,
        offset: u64,
        len: usize,
        prot: Protection,
        shared: bool,
    ) -> Result<Self, MmError> {
        check_len(len)?;
        let (flags, backing) = if shared {
            (MapFlags::SHARED, Backing::SharedFile)
        } else {
            (MapFlags::PRIVATE, Backing::PrivateFile)
        };
        // SAFETY: a fresh mapping chosen by the kernel (no MAP_FIXED): it cannot
        // alias any existing Rust object.
        let ptr =
            unsafe { rustix::mm::mmap(ptr::null_mut(), len, prot.prot_flags(), flags, fd, offset) }
                .map_err(|errno| MmError::Map { len, errno })?;
        Ok(Self::raw(PageRange::new(VirtAddr::new(ptr as usize), len)?, backing, true))
    }

    fn map_anon(
        len: usize,
        prot: Protection,
        flags: MapFlags,
        backing: Backing,
    ) -> Result<Self, MmError> {
        check_len(len)?;
        // SAFETY: a fresh anonymous mapping chosen by the kernel (no MAP_FIXED):
        // it cannot alias any existing Rust object.
        let ptr = unsafe {
            rustix::mm::mmap_anonymous(
                ptr::null_mut(),
                len,
                prot.prot_flags(),
                flags | MapFlags::NORESERVE,
            )
        }
        .map_err(|errno| MmError::Map { len, errno })?;
        Ok(Self::raw(PageRange::new(VirtAddr::new(ptr as usize), len)?, backing, true))
    }

    /// The whole range.
    pub fn range(&self) -> PageRange {
        self.range
    }

    /// First address.
    pub fn addr(&self) -> VirtAddr {
        self.range.start()
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.range.len()
    }

    /// Always false: a mapping holds at least one page.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Wraps a range its owner lends: the memory of an `mmap` made elsewhere, or a
    /// page-aligned buffer. Dropping the `Mapping` leaves the range mapped.
    ///
    /// # Safety
    ///
    /// `range` must be mapped with `backing` for as long as the `Mapping` lives, and
    /// while it lives no Rust reference may point into it: the kernel (through the
    /// calls of this module) may drop, move or replace its pages at any time, and
    /// other threads write it through atomic copies. The owner may still reach the
    /// bytes through raw pointers and atomic or volatile accesses.
    pub unsafe fn from_raw(range: PageRange, backing: Backing) -> Self {
        Self::raw(range, backing, false)
    }

    /// Whether dropping this `Mapping` unmaps its range.
    pub fn is_owned(&self) -> bool {
        self.owned
    }

    /// What backs the mapping.
    pub fn backing(&self) -> Backing {
        self.backing
    }

    /// The sub-range `[offset, offset + len)` of this mapping, checked.
    pub fn subrange(&self, offset: usize, len: usize) -> Result<PageRange, RangeError> {
        self.range.subrange(offset, len)
    }

    /// Checks that `range` lies inside this mapping.
    pub fn check(&self, range: PageRange) -> Result<PageRange, RangeError> {
        match range.start().offset_from(self.addr()) {
            Some(off) if off.checked_add(range.len()).is_some_and(|e| e <= self.len()) => Ok(range),
            _ => Err(RangeError::OutOfBounds {
                offset: range.start().get().wrapping_sub(self.addr().get()),
                len: range.len(),
                outer: self.len(),
            }),
        }
    }

    /// Starts an access to `[offset, offset + len)`: checks it lies inside the
    /// mapping, is not lent to an arena, and is not unmapped.
    pub(super) fn access(&self, offset: usize, len: usize) -> Result<Access<'_>, RangeError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len() => {}
            _ => return Err(RangeError::OutOfBounds { offset, len, outer: self.len() }),
        }
        if len == 0 {
            return Ok(Access { ptr: (self.addr().get() + offset) as *mut u8, _guard: None });
        }
        self.access_range(PageRange::containing(self.addr().get() + offset, len)).map(|mut a| {
            a.ptr = (self.addr().get() + offset) as *mut u8;
            a
        })
    }

    /// [`access`](Self::access) for whole pages.
    fn access_range(&self, range: PageRange) -> Result<Access<'_>, RangeError> {
        let range = self.check(range)?;
        let guard = self.guard.as_ref().map(|g| g.read().unwrap_or_else(|e| e.into_inner()));
        if let Some(g) = &guard {
            if g.claimed {
                return Err(RangeError::Claimed(self.range));
            }
            if let Some(h) = g.holes.iter().find(|h| h.overlaps(range)) {
                return Err(RangeError::Unmapped(*h));
            }
        }
        Ok(Access { ptr: range.start().get() as *mut u8, _guard: guard })
    }

    fn guard_mut(&self) -> Option<RwLockWriteGuard<'_, GuardState>> {
        self.guard.as_ref().map(|g| g.write().unwrap_or_else(|e| e.into_inner()))
    }

    /// Makes every access take a read lock, so that parts of the mapping can be
    /// unmapped with [`punch`](Self::punch), or the whole lent to an
    /// [`Arena`](super::arena::Arena), while it is shared. Meant for the memory
    /// hmm manages, not for device memory on the copy path.
    pub fn guarded(mut self) -> Self {
        self.guard.get_or_insert_with(Default::default);
        self
    }

    /// Takes the guard's write lock to take `part` out of the mapping (unmap or
    /// move it): refused unless the mapping is guarded, not lent to an arena,
    /// and `part` is not already a hole.
    fn vacating(&self, part: PageRange) -> Result<RwLockWriteGuard<'_, GuardState>, MmError> {
        let Some(g) = self.guard_mut() else {
            return Err(MmError::NotGuarded(self.range));
        };
        if g.claimed {
            return Err(RangeError::Claimed(self.range).into());
        }
        if let Some(hole) = g.holes.iter().find(|h| h.overlaps(part)) {
            return Err(RangeError::Unmapped(*hole).into());
        }
        Ok(g)
    }

    /// Unmaps `part` now, as the application's own `munmap` would; what remains
    /// stays mapped and usable, and any later access to `part` through this
    /// `Mapping` fails with [`RangeError::Unmapped`]. Needs a
    /// [`guarded`](Self::guarded) mapping that is not lent to an arena.
    pub fn punch(&self, part: PageRange) -> Result<(), MmError> {
        let part = self.check(part)?;
        let mut g = self.vacating(part)?;
        if self.owned {
            raw_munmap(part);
        } else {
            // SAFETY: `part` lies inside this mapping (checked), whose owner lent it
            // with the promise that no Rust reference points into it (`from_raw`);
            // the write lock keeps this mapping's own accesses out until it is
            // recorded as a hole.
            unsafe { rustix::mm::munmap(range_ptr(part), part.len()) }
                .map_err(|errno| MmError::Unmap { range: part, errno })?;
        }
        g.holes.push(part);
        Ok(())
    }

    /// The parts unmapped with [`punch`](Self::punch), in the order they went.
    pub fn holes(&self) -> Vec<PageRange> {
        self.guard
            .as_ref()
            .map(|g| g.read().unwrap_or_else(|e| e.into_inner()).holes.clone())
            .unwrap_or_default()
    }

    /// Lends the bytes to an arena: waits for accesses in progress, then refuses
    /// every later one until [`unclaim`](Self::unclaim).
    pub(super) fn claim(&self) -> Result<(), ClaimRefused> {
        let Some(mut g) = self.guard_mut() else { return Err(ClaimRefused::NotGuarded) };
        if g.claimed {
            return Err(ClaimRefused::Claimed);
        }
        if !g.holes.is_empty() {
            return Err(ClaimRefused::Holes);
        }
        g.claimed = true;
        Ok(())
    }

    /// Ends an arena's loan.
    pub(super) fn unclaim(&self) {
        if let Some(mut g) = self.guard_mut() {
            g.claimed = false;
        }
    }

    /// Whether the bytes are lent to an arena.
    pub fn is_claimed(&self) -> bool {
        self.guard.as_ref().is_some_and(|g| g.read().unwrap_or_else(|e| e.into_inner()).claimed)
    }

    /// Copies bytes out of the mapping at `offset`. A touch of a page registered
    /// with userfaultfd blocks until the fault is served; a poisoned page raises SIGBUS.
    pub fn read(&self, offset: usize, buf: &mut [u8]) -> Result<(), RangeError> {
        let a = self.access(offset, buf.len())?;
        // SAFETY: `len` bytes at `a.ptr` lie inside this live mapping (checked
        // above); `buf` is this thread's own and cannot overlap it (no Rust
        // reference into a mapping exists). Shared bytes are read through
        // `bytes`, sound under concurrent access.
        unsafe { bytes::copy(buf.as_mut_ptr(), a.ptr, buf.len()) };
        Ok(())
    }

    /// Copies `data` into the mapping at `offset`.
    pub fn write(&self, offset: usize, data: &[u8]) -> Result<(), RangeError> {
        let a = self.access(offset, data.len())?;
        // SAFETY: as in `read`, the other way round.
        unsafe { bytes::copy(a.ptr, data.as_ptr(), data.len()) };
        Ok(())
    }

    /// `write(2)` of `len` bytes of the mapping at `offset` to `fd`: the
    /// kernel reads the memory itself (a device-resident page faults back
    /// inside the system call). Returns the bytes written.
    pub fn write_to(&self, offset: usize, len: usize, fd: impl AsFd) -> Result<usize, MmError> {
        let a = self.access(offset, len)?;
        // SAFETY: the pointer and length lie inside this live mapping (checked
        // above); the kernel only reads them, and no Rust reference is made.
        let n = unsafe { libc::write(fd.as_fd().as_raw_fd(), a.ptr.cast(), len) };
        byte_count(n, "write")
    }

    /// `read(2)` of up to `len` bytes from `fd` into the mapping at `offset`:
    /// the kernel writes the memory itself (a device-resident page faults
    /// back inside the system call). Returns the bytes read.
    pub fn read_from(&self, offset: usize, len: usize, fd: impl AsFd) -> Result<usize, MmError> {
        let a = self.access(offset, len)?;
        // SAFETY: the pointer and length lie inside this live mapping (checked
        // above), whose bytes no Rust reference covers; the kernel writes them.
        let n = unsafe { libc::read(fd.as_fd().as_raw_fd(), a.ptr.cast(), len) };
        byte_count(n, "read")
    }

    /// Sets `len` bytes at `offset` to `byte`.
    pub fn fill(&self, offset: usize, len: usize, byte: u8) -> Result<(), RangeError> {
        let a = self.access(offset, len)?;
        // SAFETY: `len` bytes at `a.ptr` lie inside this live mapping (checked
        // above), written through `bytes` (see `read`).
        unsafe { bytes::fill(a.ptr, byte, len) };
        Ok(())
    }

    /// Copies `len` bytes from `src` at `src_offset` to this mapping at `offset`:
    /// a plain `memcpy` (the benchmark's baseline). Exclusive access to both
    /// mappings keeps other threads out meanwhile.
    pub fn copy_from(
        &mut self,
        offset: usize,
        src: &mut Mapping,
        src_offset: usize,
        len: usize,
    ) -> Result<(), RangeError> {
        let (a, b) = (self.access(offset, len)?, src.access(src_offset, len)?);
        let (dst, from) = (a.ptr, b.ptr);
        // SAFETY: both ranges lie inside live mappings borrowed exclusively, so no
        // other thread accesses them; two distinct `Mapping`s never overlap.
        unsafe { ptr::copy_nonoverlapping(from, dst, len) };
        Ok(())
    }

    /// Copies `len` bytes from `src` at `src_offset` to this mapping at
    /// `offset` at `memcpy`'s speed, sound while other threads touch either
    /// range (see `os::bytes` in DESIGN.md: a racing writer's bytes may show
    /// in part). What a DMA engine's copy of a page is.
    pub fn copy_shared_from(
        &self,
        offset: usize,
        src: &Mapping,
        src_offset: usize,
        len: usize,
    ) -> Result<(), RangeError> {
        let (a, b) = (self.access(offset, len)?, src.access(src_offset, len)?);
        if std::ptr::eq(self, src) && offset.abs_diff(src_offset) < len {
            return Err(RangeError::OutOfBounds { offset, len, outer: self.len() });
        }
        // SAFETY: both ranges lie inside live mappings (checked above) and do
        // not overlap (distinct mappings never do; within one, checked).
        unsafe { bytes::copy(a.ptr, b.ptr, len) };
        Ok(())
    }

    /// Reads one byte with a single load: one CPU touch of that page.
    pub fn touch_read(&self, offset: usize) -> Result<u8, RangeError> {
        let a = self.access(offset, 1)?;
        let p = a.ptr;
        // SAFETY: inside the live mapping, accessed atomically (see `read`).
        Ok(unsafe { AtomicU8::from_ptr(p) }.load(Ordering::Relaxed))
    }

    /// Writes one byte with a single store: one CPU write touch of that page.
    pub fn touch_write(&self, offset: usize, value: u8) -> Result<(), RangeError> {
        let a = self.access(offset, 1)?;
        let p = a.ptr;
        // SAFETY: inside the live mapping, accessed atomically (see `read`).
        unsafe { AtomicU8::from_ptr(p) }.store(value, Ordering::Relaxed);
        Ok(())
    }

    /// Writes one byte's own value back with one atomic read-modify-write
    /// (adding zero): a CPU write touch of that page that changes no byte,
    /// even under concurrent writers.
    ///
    /// The zero is hidden from the optimizer: an addition of a known zero is
    /// an idempotent read-modify-write, which compilers may lower to a fenced
    /// plain load (x86 does, in optimized builds), and a load is a read
    /// touch: it would not make the page writable.
    pub fn touch_keep(&self, offset: usize) -> Result<(), RangeError> {
        let a = self.access(offset, 1)?;
        let p = a.ptr;
        let zero = std::hint::black_box(0u8);
        // SAFETY: inside the live mapping, accessed atomically (see `read`).
        unsafe { AtomicU8::from_ptr(p) }.fetch_add(zero, Ordering::Relaxed);
        Ok(())
    }

    /// `madvise` over `range`, which must lie inside this mapping.
    pub fn advise(&self, range: PageRange, advice: Advise) -> Result<(), MmError> {
        let _a = self.access_range(range)?;
        // SAFETY: the range is inside this mapping, whose memory no Rust reference
        // aliases, so dropping or repopulating its pages breaks no Rust invariant.
        unsafe { rustix::mm::madvise(range_ptr(range), range.len(), advice.raw()) }
            .map_err(|errno| MmError::Advise { range, advice, errno })
    }

    /// `mprotect` over `range`, which must lie inside this mapping.
    pub fn protect(&self, range: PageRange, prot: Protection) -> Result<(), MmError> {
        let _a = self.access_range(range)?;
        // SAFETY: the range is inside this mapping, reached only through copies that
        // fault (SIGSEGV) rather than misbehave when access is removed.
        unsafe { rustix::mm::mprotect(range_ptr(range), range.len(), prot.mprotect_flags()) }
            .map_err(|errno| MmError::Protect { range, prot, errno })
    }

    /// `mremap` that lets the kernel move the mapping and resize it to `new_len`.
    pub fn remap(self, new_len: usize) -> Result<Mapping, (Mapping, MmError)> {
        if let Err(e) = check_len(new_len) {
            return Err((self, e.into()));
        }
        // SAFETY: the old range belongs to `self`, consumed here; on success the kernel
        // moves it to a range it chose, which nothing else owns.
        let res = unsafe {
            rustix::mm::mremap(range_ptr(self.range), self.len(), new_len, MremapFlags::MAYMOVE)
        };
        match res {
            Ok(p) => {
                let backing = self.backing;
                let self_owned = self.owned;
                std::mem::forget(self);
                let range =
                    PageRange::new(VirtAddr::new(p as usize), new_len).expect("kernel range");
                Ok(Mapping::raw(range, backing, self_owned))
            }
            Err(errno) => {
                let range = self.range;
                Err((self, MmError::Remap { range, errno }))
            }
        }
    }

    /// `mremap(MREMAP_MAYMOVE | MREMAP_FIXED)`: moves this mapping onto `target`'s
    /// range, which it replaces. Lengths must match.
    pub fn move_onto(self, target: Mapping) -> Result<Mapping, (Mapping, MmError)> {
        if target.len() != self.len() {
            let e = MmError::Range(RangeError::OutOfBounds {
                offset: 0,
                len: self.len(),
                outer: target.len(),
            });
            return Err((self, e));
        }
        match self.remap_onto(target, MremapFlags::empty()) {
            Ok(mut moved) => {
                moved.owned = self.owned;
                std::mem::forget(self);
                Ok(moved)
            }
            Err(e) => Err((self, e)),
        }
    }

    /// Replaces this private file mapping with private anonymous memory that
    /// holds the same bytes, at the same address, readable and writable: the
    /// file's pages and the pages the CPU wrote to alike, all as the mapping
    /// reads now. The file itself is not touched (a private mapping never
    /// writes back). The bytes are copied into a fresh anonymous mapping, which
    /// then replaces this one in one `mremap`; no other thread may write the
    /// mapping meanwhile (this `Mapping` is consumed, so no Rust code can).
    /// On failure the mapping is handed back unchanged.
    pub fn into_anonymous(mut self) -> Result<Mapping, (Mapping, MmError)> {
        if self.backing != Backing::PrivateFile {
            let range = self.range;
            return Err((self, MmError::NotPrivateFile(range)));
        }
        let mut copy = match Mapping::anonymous(self.len(), Protection::ReadWrite) {
            Ok(m) => m,
            Err(e) => return Err((self, e)),
        };
        let len = self.len();
        if let Err(e) = copy.copy_from(0, &mut self, 0, len) {
            return Err((self, e.into()));
        }
        // SAFETY: `copy`'s range and `self`'s range are both owned here and no Rust
        // reference points into either; the kernel replaces `self`'s pages with
        // `copy`'s atomically, so nothing else can be mapped there meanwhile.
        let res = unsafe {
            rustix::mm::mremap_fixed(
                range_ptr(copy.range),
                len,
                len,
                MremapFlags::MAYMOVE,
                range_ptr(self.range),
            )
        };
        match res {
            Ok(_) => {
                let (range, owned) = (self.range, self.owned);
                // Both ranges changed hands: `copy`'s is gone, `self`'s now holds
                // the anonymous pages.
                std::mem::forget(copy);
                std::mem::forget(self);
                Ok(Mapping::raw(range, Backing::PrivateAnon, owned))
            }
            Err(errno) => {
                let range = self.range;
                Err((self, MmError::Remap { range, errno }))
            }
        }
    }

    /// `mremap(MREMAP_MAYMOVE | MREMAP_DONTUNMAP)`: moves the pages to a new range
    /// and leaves this one mapped but empty (private anonymous mappings only).
    /// Returns the new mapping; `self` stays valid.
    ///
    /// The destination is reserved first and named with `MREMAP_FIXED`: the
    /// kernel reads a destination hint whenever `MREMAP_DONTUNMAP` is set, so a
    /// call without one would pass whatever the register happens to hold.
    pub fn remap_dontunmap(&self) -> Result<Mapping, MmError> {
        self.remap_part_dontunmap(self.range)
    }

    /// [`remap_dontunmap`](Self::remap_dontunmap) of `part` alone: its pages
    /// move to a new range, returned, and `part` stays mapped but empty.
    pub fn remap_part_dontunmap(&self, part: PageRange) -> Result<Mapping, MmError> {
        let _a = self.access_range(part)?;
        let target = Mapping::anonymous(part.len(), Protection::None)?;
        self.remap_part_onto(part, target, MremapFlags::DONTUNMAP)
    }

    /// Shrinks this mapping in place to its first `new_len` bytes with an
    /// `mremap` that may not move it, as the application's own would: the tail
    /// is unmapped and recorded as a hole, as [`punch`](Self::punch) does.
    /// Needs a [`guarded`](Self::guarded) mapping that is not lent to an arena.
    pub fn shrink_in_place(&self, new_len: usize) -> Result<(), MmError> {
        check_len(new_len)?;
        let tail = self.subrange(new_len, self.len().saturating_sub(new_len))?;
        let mut g = self.vacating(tail)?;
        // SAFETY: the tail lies inside this mapping (checked) and no Rust reference
        // points into it; the write lock keeps this mapping's own accesses out
        // until it is recorded as a hole. Without MREMAP_MAYMOVE nothing moves.
        unsafe {
            rustix::mm::mremap(range_ptr(self.range), self.len(), new_len, MremapFlags::empty())
        }
        .map_err(|errno| MmError::Remap { range: self.range, errno })?;
        g.holes.push(tail);
        Ok(())
    }

    /// Moves `part` of this mapping elsewhere (`mremap(MREMAP_MAYMOVE |
    /// MREMAP_FIXED)`), as the application's own `mremap` would: the pages
    /// and their data go to a new range, returned, and `part` is left unmapped
    /// and recorded as a hole, as [`punch`](Self::punch) does. Needs a
    /// [`guarded`](Self::guarded) mapping that is not lent to an arena.
    pub fn move_part(&self, part: PageRange) -> Result<Mapping, MmError> {
        let part = self.check(part)?;
        let target = Mapping::anonymous(part.len(), Protection::None)?;
        let mut g = self.vacating(part)?;
        let moved = self.remap_part_onto(part, target, MremapFlags::empty())?;
        g.holes.push(part);
        Ok(moved)
    }

    /// `mremap(MREMAP_MAYMOVE | MREMAP_FIXED | extra)` of this mapping's pages onto
    /// `target`'s range (of the same length), which they replace. On success the
    /// returned mapping owns that range; the caller decides what `self` still owns
    /// (nothing after a plain move, an empty range after `MREMAP_DONTUNMAP`).
    fn remap_onto(&self, target: Mapping, extra: MremapFlags) -> Result<Mapping, MmError> {
        self.remap_part_onto(self.range, target, extra)
    }

    /// `mremap(MREMAP_MAYMOVE | MREMAP_FIXED | extra)` of `part` (inside this
    /// mapping, checked by the caller) onto `target`'s range of the same length.
    /// The new mapping is owned: its range was reserved here ([`move_onto`]
    /// hands on the ownership `self` had instead).
    ///
    /// [`move_onto`]: Self::move_onto
    fn remap_part_onto(
        &self,
        part: PageRange,
        target: Mapping,
        extra: MremapFlags,
    ) -> Result<Mapping, MmError> {
        debug_assert_eq!(part.len(), target.len());
        let to = target.range;
        // SAFETY: the pages of `self` are not referenced by Rust, and `target`'s range
        // is owned here; the kernel replaces it atomically, so nothing else can be
        // mapped there meanwhile.
        let res = unsafe {
            rustix::mm::mremap_fixed(
                range_ptr(part),
                part.len(),
                part.len(),
                MremapFlags::MAYMOVE | extra,
                range_ptr(to),
            )
        };
        match res {
            Ok(_) => {
                // The pages now live in `target`'s range: hand it over without unmapping.
                std::mem::forget(target);
                Ok(Mapping::raw(to, self.backing, true))
            }
            Err(errno) => Err(MmError::Remap { range: part, errno }),
        }
    }

    /// Maps `part.len()` bytes of `file` at `offset` over `part` of this
    /// mapping (`MAP_SHARED | MAP_FIXED`), with `prot`: the CPU then reaches
    /// the file's pages at these addresses, and the pages `part` held before
    /// are dropped. This is how coherent device memory (a memfd) is put where
    /// the CPU reads and writes the page it holds. Refused, like any access,
    /// for a part that is a hole or lent to an arena.
    pub fn map_file_over(
        &self,
        part: PageRange,
        file: BorrowedFd<'_>,
        offset: u64,
        prot: Protection,
    ) -> Result<(), MmError> {
        let _a = self.access_range(part)?;
        // SAFETY: `part` lies inside this mapping (checked) and no Rust reference
        // points into it; its bytes are reached only through copies, so the
        // kernel replacing its pages (as it may drop or move them at any time)
        // breaks no Rust invariant. MAP_FIXED replaces exactly `part`, which
        // this mapping owns; the read lock keeps it from being unmapped meanwhile.
        unsafe {
            rustix::mm::mmap(
                range_ptr(part),
                part.len(),
                prot.prot_flags(),
                // Not populated: the kernel maps the file's pages at the
                // first touch, a fault-around's worth at a time. Populating
                // (MAP_POPULATE) marks every page accessed through the
                // get-user-pages path, dearer than those minor faults.
                MapFlags::SHARED | MapFlags::FIXED,
                file,
                offset,
            )
        }
        .map(drop)
        .map_err(|errno| MmError::Map { len: part.len(), errno })
    }

    /// A `Mapping` of `range`, the new home of pages that an application's
    /// `mremap` moved out of this mapping: not owned (dropping it unmaps
    /// nothing), with this mapping's backing. The moved pages stay under the
    /// terms this mapping holds its own under (no Rust reference points into
    /// them), which is what lets hmm replace pages there as it would here.
    pub(crate) fn moved_to(&self, range: PageRange) -> Mapping {
        Self::raw(range, self.backing, false)
    }

    /// Moves `donor` (a mapping of `part.len()` bytes, consumed) over `part`
    /// of this mapping with one `mremap(MREMAP_MAYMOVE | MREMAP_FIXED)`: the
    /// area `donor` was (its protection, its userfaultfd registration) takes
    /// `part`'s place atomically, so no access can find `part` in between.
    /// On failure `donor` is handed back.
    pub fn replace_part(&self, part: PageRange, donor: Mapping) -> Result<(), (Mapping, MmError)> {
        if donor.len() != part.len() {
            let e = RangeError::OutOfBounds { offset: 0, len: donor.len(), outer: part.len() };
            return Err((donor, e.into()));
        }
        let _a = match self.access_range(part) {
            Ok(a) => a,
            Err(e) => return Err((donor, e.into())),
        };
        // SAFETY: `part` lies inside this mapping (checked) and no Rust reference
        // points into it or into `donor`, which is consumed here; the kernel
        // replaces `part` atomically, so nothing else can be mapped there
        // meanwhile; the read lock keeps `part` from being unmapped.
        let res = unsafe {
            rustix::mm::mremap_fixed(
                range_ptr(donor.range),
                part.len(),
                part.len(),
                MremapFlags::MAYMOVE,
                range_ptr(part),
            )
        };
        match res {
            Ok(_) => {
                // Its range is gone (moved into `part`): nothing left to unmap.
                std::mem::forget(donor);
                Ok(())
            }
            Err(errno) => Err((donor, MmError::Remap { range: part, errno })),
        }
    }

    /// Unmaps `range` (inside this mapping) and returns the parts that remain
    /// mapped before and after it, each as its own `Mapping`.
    pub fn unmap_part(
        self,
        range: PageRange,
    ) -> Result<(Option<Mapping>, Option<Mapping>), (Mapping, MmError)> {
        let range = match self.check(range) {
            Ok(r) => r,
            Err(e) => return Err((self, e.into())),
        };
        let backing = self.backing;
        let owned = self.owned;
        let whole = self.range;
        std::mem::forget(self);
        raw_munmap(range);
        let head = range.start().offset_from(whole.start()).expect("inside");
        let tail = whole.end().offset_from(range.end()).expect("inside");
        let before = (head > 0).then(|| {
            Mapping::raw(PageRange::new(whole.start(), head).expect("aligned"), backing, owned)
        });
        let after = (tail > 0).then(|| {
            Mapping::raw(PageRange::new(range.end(), tail).expect("aligned"), backing, owned)
        });
        Ok((before, after))
    }
}

impl Mapping {
    /// Ends this `Mapping`, unmapping (when owned) every part of its range except
    /// `gone`: parts already unmapped by someone else, which may since have been
    /// reused by other mappings.
    pub fn unmap_except(self, gone: &[PageRange]) {
        let owned = self.owned;
        let whole = self.range;
        let mut gone: Vec<PageRange> = gone.to_vec();
        gone.extend(self.holes());
        // Not `forget`: the hole list is freed with the rest of `self` below.
        let mut me = std::mem::ManuallyDrop::new(self);
        drop(me.guard.take());
        if !owned {
            return;
        }
        gone.sort_by_key(|r| r.start());
        let mut at = whole.start();
        let unmap_to = |stop: VirtAddr, at: VirtAddr| {
            if stop > at {
                raw_munmap(PageRange::new(at, stop.get() - at.get()).expect("inside"));
            }
        };
        for g in &gone {
            unmap_to(g.start().max(at).min(whole.end()), at);
            at = at.max(g.end().min(whole.end()));
        }
        unmap_to(whole.end(), at);
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        if self.guard.is_none() {
            raw_munmap(self.range);
        } else {
            // `unmap_except` skips the holes.
            let me = std::mem::replace(self, Mapping::raw(self.range, self.backing, false));
            me.unmap_except(&[]);
        }
    }
}

fn check_len(len: usize) -> Result<(), RangeError> {
    if len == 0 {
        Err(RangeError::Empty)
    } else if !len.is_multiple_of(PAGE_SIZE) {
        Err(RangeError::UnalignedLength(len))
    } else {
        Ok(())
    }
}

fn range_ptr(range: PageRange) -> *mut core::ffi::c_void {
    range.start().get() as *mut core::ffi::c_void
}

/// For tests: unmaps `range` behind the back of the [`Mapping`] that holds
/// it, as C code of the application would (`munmap` of memory hmm manages).
/// The mapping's own accessors then fault; hmm's checked accessors refuse the
/// range, and its drop leaves alone what hmm recorded unmapped.
#[cfg(test)]
pub(crate) fn munmap_behind(range: PageRange) {
    raw_munmap(range);
}

fn raw_munmap(range: PageRange) {
    // SAFETY: called only on ranges a `Mapping` owned and gives up here; no Rust
    // reference points into them.
    let res = unsafe { rustix::mm::munmap(range_ptr(range), range.len()) };
    if let Err(errno) = res {
        // munmap of a page-aligned range this process mapped cannot fail except on
        // kernel resource exhaustion when splitting a VMA; leaking is the safe outcome.
        tracing::warn!(%range, %errno, "munmap failed; the range stays mapped");
    }
}

/// A memory file (`memfd_create`): shmem or hugetlbfs backing for shared and
/// device-coherent memory.
#[derive(Debug)]
pub struct Memfd {
    fd: OwnedFd,
}

impl Memfd {
    /// Creates a memfd named `name` (shown in `/proc/self/maps`) of `len` bytes.
    /// `hugetlb` asks for 2 MiB hugetlbfs pages.
    pub fn create(name: &CStr, len: u64, hugetlb: bool) -> Result<Self, MmError> {
        let mut flags = MemfdFlags::CLOEXEC;
        if hugetlb {
            flags |= MemfdFlags::HUGETLB | MemfdFlags::HUGE_2MB;
        }
        let fd = rustix::fs::memfd_create(name, flags)
            .map_err(|errno| MmError::File { what: "memfd_create", errno })?;
        rustix::fs::ftruncate(&fd, len)
            .map_err(|errno| MmError::File { what: "ftruncate", errno })?;
        Ok(Self { fd })
    }

    /// Frees the backing pages of `[offset, offset + len)`; mappings of them read
    /// zeros (or fault to userfaultfd MINOR/MISSING handlers) afterwards.
    pub fn punch_hole(&self, offset: u64, len: u64) -> Result<(), MmError> {
        rustix::fs::fallocate(
            &self.fd,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            offset,
            len,
        )
        .map_err(|errno| MmError::File { what: "fallocate(PUNCH_HOLE)", errno })
    }

    /// Maps `[offset, offset + len)` of the file.
    pub fn map(
        &self,
        offset: u64,
        len: usize,
        prot: Protection,
        shared: bool,
    ) -> Result<Mapping, MmError> {
        Mapping::file(self.fd.as_fd(), offset, len, prot, shared)
    }
}

impl AsFd for Memfd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn punched_parts_are_refused_and_the_rest_stays_usable() {
        let plain = Mapping::anonymous(PAGE_SIZE, Protection::ReadWrite).unwrap();
        assert!(matches!(plain.punch(plain.range()), Err(MmError::NotGuarded(_))));
        let m = Mapping::anonymous(4 * PAGE_SIZE, Protection::ReadWrite).unwrap().guarded();
        m.fill(0, m.len(), 3).unwrap();
        let hole = m.subrange(PAGE_SIZE, 2 * PAGE_SIZE).unwrap();
        m.punch(hole).unwrap();
        assert_eq!(m.holes(), vec![hole]);
        assert_eq!(m.touch_read(2 * PAGE_SIZE), Err(RangeError::Unmapped(hole)));
        // A copy that merely crosses the hole is refused whole.
        let mut buf = vec![0u8; 2];
        assert_eq!(m.read(PAGE_SIZE - 1, &mut buf), Err(RangeError::Unmapped(hole)));
        assert!(m.advise(hole, Advise::DontNeed).is_err());
        assert!(m.punch(m.subrange(2 * PAGE_SIZE, 2 * PAGE_SIZE).unwrap()).is_err());
        assert_eq!(m.touch_read(3 * PAGE_SIZE + 5).unwrap(), 3);
        // (That the kernel really unmapped the hole is shown by its unmap event
        // in the `direct_munmap` integration test: checking `/proc/self/maps`
        // here would race with other tests mapping into the freed addresses.)
        drop(m);
    }

    #[test]
    fn read_write_fill_round_trip() {
        let m = Mapping::anonymous(4 * PAGE_SIZE, Protection::ReadWrite).unwrap();
        m.write(10, b"hello").unwrap();
        m.fill(PAGE_SIZE, PAGE_SIZE, 0x5a).unwrap();
        let mut buf = [0u8; 5];
        m.read(10, &mut buf).unwrap();
        assert_eq!(&buf, b"hello");
        assert_eq!(m.touch_read(PAGE_SIZE + 7).unwrap(), 0x5a);
        assert!(matches!(m.read(4 * PAGE_SIZE - 2, &mut buf), Err(RangeError::OutOfBounds { .. })));
        assert!(m.touch_write(4 * PAGE_SIZE, 1).is_err());
    }

    #[test]
    fn fill_covers_unaligned_heads_and_tails_exactly() {
        let m = Mapping::anonymous(PAGE_SIZE, Protection::ReadWrite).unwrap();
        m.fill(3, 21, 0xEE).unwrap();
        let mut buf = [0u8; 32];
        m.read(0, &mut buf).unwrap();
        let expect: Vec<u8> =
            (0..32).map(|i| if (3..24).contains(&i) { 0xEE } else { 0 }).collect();
        assert_eq!(buf.to_vec(), expect);
        m.fill(5, 2, 0x11).unwrap(); // shorter than the head
        assert_eq!(
            (m.touch_read(4).unwrap(), m.touch_read(5).unwrap(), m.touch_read(7).unwrap()),
            (0xEE, 0x11, 0xEE)
        );
        assert!(matches!(
            Mapping::anonymous_aligned(PAGE_SIZE, 3 * PAGE_SIZE, Protection::ReadWrite),
            Err(MmError::Alignment(_))
        ));
    }

    #[test]
    fn bad_lengths_are_refused() {
        assert!(matches!(
            Mapping::anonymous(0, Protection::ReadWrite),
            Err(MmError::Range(RangeError::Empty))
        ));
        assert!(matches!(
            Mapping::anonymous(100, Protection::ReadWrite),
            Err(MmError::Range(RangeError::UnalignedLength(100)))
        ));
    }

    #[test]
    fn dontneed_zeroes_private_anonymous() {
        let m = Mapping::anonymous(2 * PAGE_SIZE, Protection::ReadWrite).unwrap();
        m.fill(0, 2 * PAGE_SIZE, 7).unwrap();
        m.advise(m.subrange(0, PAGE_SIZE).unwrap(), Advise::DontNeed).unwrap();
        assert_eq!(m.touch_read(0).unwrap(), 0);
        assert_eq!(m.touch_read(PAGE_SIZE).unwrap(), 7);
        // A range outside the mapping is refused before any system call.
        let outside = PageRange::new(m.range().end(), PAGE_SIZE).unwrap();
        assert!(matches!(m.advise(outside, Advise::DontNeed), Err(MmError::Range(_))));
    }

    #[test]
    fn aligned_mapping_is_aligned() {
        let m = Mapping::anonymous_aligned(4 << 20, 2 << 20, Protection::ReadWrite).unwrap();
        assert!(m.addr().is_aligned_to(2 << 20));
        m.fill(0, m.len(), 1).unwrap();
    }

    #[test]
    fn memfd_punch_hole_and_shared_views() {
        let f = Memfd::create(c"hmm-test", 4 * PAGE_SIZE as u64, false).unwrap();
        let a = f.map(0, 4 * PAGE_SIZE, Protection::ReadWrite, true).unwrap();
        let b = f.map(0, 4 * PAGE_SIZE, Protection::Read, true).unwrap();
        a.fill(0, 4 * PAGE_SIZE, 9).unwrap();
        assert_eq!(b.touch_read(3 * PAGE_SIZE).unwrap(), 9);
        f.punch_hole(PAGE_SIZE as u64, PAGE_SIZE as u64).unwrap();
        assert_eq!(b.touch_read(PAGE_SIZE).unwrap(), 0);
        assert_eq!(b.touch_read(2 * PAGE_SIZE).unwrap(), 9);
    }

    #[test]
    fn remap_and_partial_unmap() {
        let m = Mapping::anonymous(4 * PAGE_SIZE, Protection::ReadWrite).unwrap();
        m.fill(0, 4 * PAGE_SIZE, 3).unwrap();
        let m = m.remap(8 * PAGE_SIZE).map_err(|(_, e)| e).unwrap();
        assert_eq!(m.touch_read(3 * PAGE_SIZE).unwrap(), 3);
        assert_eq!(m.touch_read(5 * PAGE_SIZE).unwrap(), 0);
        let hole = m.subrange(2 * PAGE_SIZE, PAGE_SIZE).unwrap();
        let (before, after) = m.unmap_part(hole).map_err(|(_, e)| e).unwrap();
        assert_eq!(before.unwrap().len(), 2 * PAGE_SIZE);
        assert_eq!(after.unwrap().len(), 5 * PAGE_SIZE);
    }

    #[test]
    fn dontunmap_leaves_an_empty_source() {
        let m = Mapping::anonymous(2 * PAGE_SIZE, Protection::ReadWrite).unwrap();
        m.fill(0, 2 * PAGE_SIZE, 4).unwrap();
        let moved = m.remap_dontunmap().unwrap();
        assert_eq!(moved.touch_read(PAGE_SIZE).unwrap(), 4);
        assert_eq!(m.touch_read(PAGE_SIZE).unwrap(), 0);
    }
}
