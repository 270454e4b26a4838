//! Address and size types.
//!
//! A CPU virtual address, a length in bytes and a page-aligned range are
//! different things; keeping them apart in the type system stops a device page
//! index or a byte count from being passed where an address is expected.
//! All arithmetic is checked: an overflow is a [`RangeError`], never a wrap.

#![forbid(unsafe_code)]

use std::fmt;

/// The base page size hmm works in. hmm supports x86-64 and arm64 kernels
/// configured with 4 KiB pages; the capability probe refuses other sizes.
pub const PAGE_SIZE: usize = 4096;

/// log2 of [`PAGE_SIZE`].
pub const PAGE_SHIFT: u32 = 12;

/// The size of a PMD-level transparent huge page on x86-64 (2 MiB).
pub const HUGE_PAGE_SIZE: usize = 2 << 20;

const _: () = assert!(1 << PAGE_SHIFT == PAGE_SIZE);
// hmm runs on 64-bit Linux only: kernel `__u64` addresses and lengths convert to
// `usize` without loss, which the casts in the OS layer rely on.
const _: () = assert!(usize::BITS == 64, "hmm needs a 64-bit target");

/// Why a range was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    /// The range has no bytes.
    #[error("the range is empty: give a length of at least one page ({PAGE_SIZE} bytes)")]
    Empty,
    /// The start address is not a multiple of the page size.
    #[error("address {0} is not page aligned: round it down to a multiple of {PAGE_SIZE}")]
    UnalignedStart(VirtAddr),
    /// The length is not a multiple of the page size.
    #[error("length {0:#x} is not a multiple of the page size ({PAGE_SIZE}): round it up")]
    UnalignedLength(usize),
    /// `start + len` does not fit the address space.
    #[error("range at {start} of {len:#x} bytes runs past the end of the address space")]
    Overflow {
        /// Start of the refused range.
        start: VirtAddr,
        /// Length of the refused range.
        len: usize,
    },
    /// The memory is lent to an arena: its bytes are reached through the arena's
    /// references only.
    #[error("{0} is lent to an arena: reach its bytes through the references the arena gave out")]
    Claimed(PageRange),
    /// The part was unmapped.
    #[error("{0} was unmapped")]
    Unmapped(PageRange),
    /// The part lived on a device that failed: its data is lost. A raw CPU
    /// touch of it gets `SIGBUS`; discarding or unmapping it makes the
    /// addresses usable again.
    #[error(
        "{0} lived on a device that failed: its data is lost (discard or unmap it to use the \
         addresses again)"
    )]
    Poisoned(PageRange),
    /// A sub-range does not lie inside the range it was cut from.
    #[error("offset {offset:#x} + length {len:#x} lies outside a range of {outer:#x} bytes")]
    OutOfBounds {
        /// Offset asked for.
        offset: usize,
        /// Length asked for.
        len: usize,
        /// Length of the outer range.
        outer: usize,
    },
}

/// A virtual address in this process.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct VirtAddr(usize);

impl VirtAddr {
    /// An address from its numeric value.
    pub const fn new(addr: usize) -> Self {
        Self(addr)
    }

    /// The numeric value.
    pub const fn get(self) -> usize {
        self.0
    }

    /// The value as the kernel's `__u64`.
    pub const fn as_u64(self) -> u64 {
        self.0 as u64
    }

    /// Whether the address is a multiple of [`PAGE_SIZE`].
    pub const fn is_page_aligned(self) -> bool {
        self.0.is_multiple_of(PAGE_SIZE)
    }

    /// Whether the address is a multiple of `align` (false unless `align` is a
    /// power of two).
    pub const fn is_aligned_to(self, align: usize) -> bool {
        align.is_power_of_two() && self.0 & (align - 1) == 0
    }

    /// The page that contains this address.
    pub const fn page_down(self) -> Self {
        Self(self.0 & !(PAGE_SIZE - 1))
    }

    /// `self + bytes`, or `None` on overflow.
    pub const fn checked_add(self, bytes: usize) -> Option<Self> {
        match self.0.checked_add(bytes) {
            Some(v) => Some(Self(v)),
            None => None,
        }
    }

    /// Bytes from `base` up to `self`, or `None` if `self` lies below `base`.
    pub const fn offset_from(self, base: VirtAddr) -> Option<usize> {
        self.0.checked_sub(base.0)
    }
}

impl fmt::Debug for VirtAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "VirtAddr({:#x})", self.0)
    }
}

impl fmt::Display for VirtAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}", self.0)
    }
}

/// A non-empty, page-aligned range of virtual addresses `[start, start + len)`.
///
/// Every kernel call that takes a range goes through this type, so alignment,
/// emptiness and overflow are refused before any system call is made.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PageRange {
    start: VirtAddr,
    len: usize,
}

impl PageRange {
    /// A range, checked: page-aligned start and length, at least one page, no overflow.
    pub const fn new(start: VirtAddr, len: usize) -> Result<Self, RangeError> {
        if len == 0 {
            return Err(RangeError::Empty);
        }
        if !start.is_page_aligned() {
            return Err(RangeError::UnalignedStart(start));
        }
        if !len.is_multiple_of(PAGE_SIZE) {
            return Err(RangeError::UnalignedLength(len));
        }
        if start.checked_add(len).is_none() {
            return Err(RangeError::Overflow { start, len });
        }
        Ok(Self { start, len })
    }

    /// A range of `pages` pages starting at `start`.
    pub const fn from_pages(start: VirtAddr, pages: usize) -> Result<Self, RangeError> {
        match pages.checked_mul(PAGE_SIZE) {
            Some(len) => Self::new(start, len),
            None => Err(RangeError::Overflow { start, len: usize::MAX }),
        }
    }

    /// First address of the range.
    pub const fn start(self) -> VirtAddr {
        self.start
    }

    /// One past the last address of the range.
    pub const fn end(self) -> VirtAddr {
        // Cannot overflow: checked in `new`.
        VirtAddr(self.start.0 + self.len)
    }

    /// Length in bytes (a non-zero multiple of [`PAGE_SIZE`]).
    pub const fn len(self) -> usize {
        self.len
    }

    /// Always false: a `PageRange` holds at least one page. Present for API symmetry.
    pub const fn is_empty(self) -> bool {
        false
    }

    /// Number of pages.
    pub const fn pages(self) -> usize {
        self.len / PAGE_SIZE
    }

    /// Whether `addr` lies inside the range.
    pub const fn contains(self, addr: VirtAddr) -> bool {
        addr.0 >= self.start.0 && addr.0 < self.start.0 + self.len
    }

    /// Whether the two ranges share a byte.
    pub const fn overlaps(self, other: PageRange) -> bool {
        self.start.get() < other.end().get() && other.start.get() < self.end().get()
    }

    /// The smallest page range holding the `len > 0` bytes at `addr` (which must
    /// not run past the end of the address space).
    pub(crate) fn containing(addr: usize, len: usize) -> Self {
        Self::try_containing(addr, len).expect("a checked span of bytes")
    }

    /// The smallest page range holding the `len` bytes at `addr`, or an
    /// error saying that they run past the end of the address space (or
    /// that `len` is zero).
    pub fn try_containing(addr: usize, len: usize) -> Result<Self, RangeError> {
        let start = addr & !(PAGE_SIZE - 1);
        let overflow = RangeError::Overflow { start: VirtAddr::new(start), len };
        let end = addr
            .checked_add(len)
            .and_then(|e| e.checked_next_multiple_of(PAGE_SIZE))
            .ok_or(overflow)?;
        Self::new(VirtAddr::new(start), end - start)
    }

    /// The sub-range `[start + offset, start + offset + len)`, checked against this range.
    pub const fn subrange(self, offset: usize, len: usize) -> Result<Self, RangeError> {
        let fits = match offset.checked_add(len) {
            Some(e) => e <= self.len,
            None => false,
        };
        if !fits {
            return Err(RangeError::OutOfBounds { offset, len, outer: self.len });
        }
        Self::new(VirtAddr(self.start.0 + offset), len)
    }

    /// The `index`-th page of the range as a one-page range.
    pub const fn page(self, index: usize) -> Result<Self, RangeError> {
        match index.checked_mul(PAGE_SIZE) {
            Some(off) => self.subrange(off, PAGE_SIZE),
            None => {
                Err(RangeError::OutOfBounds { offset: usize::MAX, len: PAGE_SIZE, outer: self.len })
            }
        }
    }
}

impl fmt::Debug for PageRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PageRange({:#x}..{:#x})", self.start.0, self.start.0 + self.len)
    }
}

impl fmt::Display for PageRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}..{:#x} ({} pages)", self.start.0, self.start.0 + self.len, self.pages())
    }
}

/// `n` bytes in binary units, one decimal.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 { format!("{n} B") } else { format!("{v:.1} {}", UNITS[u]) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_range_refuses_bad_input() {
        let a = VirtAddr::new(0x10000);
        assert_eq!(PageRange::new(a, 0), Err(RangeError::Empty));
        assert_eq!(
            PageRange::new(VirtAddr::new(0x10001), PAGE_SIZE),
            Err(RangeError::UnalignedStart(VirtAddr::new(0x10001)))
        );
        assert_eq!(PageRange::new(a, 100), Err(RangeError::UnalignedLength(100)));
        let top = VirtAddr::new(usize::MAX - PAGE_SIZE + 1);
        assert!(matches!(PageRange::new(top, 2 * PAGE_SIZE), Err(RangeError::Overflow { .. })));
        assert!(matches!(PageRange::from_pages(a, usize::MAX), Err(RangeError::Overflow { .. })));
    }

    #[test]
    fn page_range_arithmetic() {
        let r = PageRange::from_pages(VirtAddr::new(0x10000), 4).unwrap();
        assert_eq!(r.len(), 4 * PAGE_SIZE);
        assert_eq!(r.pages(), 4);
        assert_eq!(r.end(), VirtAddr::new(0x14000));
        assert!(r.contains(VirtAddr::new(0x13fff)));
        assert!(!r.contains(VirtAddr::new(0x14000)));
        assert_eq!(r.page(3).unwrap().start(), VirtAddr::new(0x13000));
        assert!(matches!(r.page(4), Err(RangeError::OutOfBounds { .. })));
        assert!(matches!(
            r.subrange(PAGE_SIZE, 4 * PAGE_SIZE),
            Err(RangeError::OutOfBounds { .. })
        ));
        assert!(matches!(r.subrange(usize::MAX, PAGE_SIZE), Err(RangeError::OutOfBounds { .. })));
        assert_eq!(VirtAddr::new(0x13abc).page_down(), VirtAddr::new(0x13000));
        assert_eq!(VirtAddr::new(0x13000).offset_from(VirtAddr::new(0x10000)), Some(0x3000));
        assert_eq!(VirtAddr::new(0x1000).offset_from(VirtAddr::new(0x10000)), None);
    }
}
