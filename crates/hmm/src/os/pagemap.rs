//! Page-table snapshots: the `PAGEMAP_SCAN` ioctl and plain `/proc/self/pagemap` reads.
//!
//! `PAGEMAP_SCAN` (Linux 6.7) walks the page tables of a range and reports runs
//! of pages that share the same categories (present, written, zero page, huge,
//! ...). One call fills at most the vector it is given (or `max_pages` pages) and
//! reports in `walk_end` where it stopped; [`Pagemap::scan`] loops from there
//! until the whole range is walked, and joins a run that a call boundary split in
//! two, so the result is the same whatever the buffer size.
//!
//! `walk_end` cannot be trusted on its own. The kernel walks in chunks through an
//! internal buffer and records `walk_end` only when that buffer fills; when the
//! walk then completes within the same call, `walk_end` keeps the address of the
//! last internal flush, behind regions already returned (seen on 6.18: 4096
//! regions returned up to `end`, `walk_end` 2 MiB short of it). Continuing from
//! there would report those pages twice. So: a call that did not fill the vector
//! (and did not reach `max_pages`) walked the whole range; otherwise the walk
//! resumes at the later of `walk_end` and the end of the last region returned.

use std::fmt;
use std::os::fd::OwnedFd;

use linux_raw_sys::general as g;
use rustix::io::Errno;

use super::sys;
use super::uffd::ioctl_ptr;
use crate::addr::{PAGE_SIZE, PageRange, RangeError, VirtAddr};

/// A set of `PAGE_IS_*` categories.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Categories(u64);

macro_rules! categories {
    ($($name:ident = $bit:expr;)*) => {
        impl Categories {
            $(#[doc = concat!("`PAGE_IS_", stringify!($name), "`")]
            pub const $name: Categories = Categories($bit as u64);)*
            /// Every category of Linux 6.18, with its name.
            pub const NAMED: &'static [(Categories, &'static str)] = &[$((Categories($bit as u64), stringify!($name)),)*];
            /// Every category of Linux 6.18.
            pub const ALL: Categories = Categories(0 $(| $bit as u64)*);
        }
    };
}

categories! {
    WPALLOWED = g::PAGE_IS_WPALLOWED;
    WRITTEN = g::PAGE_IS_WRITTEN;
    FILE = g::PAGE_IS_FILE;
    PRESENT = g::PAGE_IS_PRESENT;
    SWAPPED = g::PAGE_IS_SWAPPED;
    PFNZERO = g::PAGE_IS_PFNZERO;
    HUGE = g::PAGE_IS_HUGE;
    SOFT_DIRTY = g::PAGE_IS_SOFT_DIRTY;
    GUARD = g::PAGE_IS_GUARD;
}

impl Categories {
    /// No category.
    pub const NONE: Categories = Categories(0);
    /// From raw bits.
    pub const fn from_bits(bits: u64) -> Self {
        Self(bits)
    }
    /// Raw bits.
    pub const fn bits(self) -> u64 {
        self.0
    }
    /// Whether every bit of `other` is set.
    pub const fn contains(self, other: Categories) -> bool {
        self.0 & other.0 == other.0
    }
    /// Whether no bit is set.
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }
}

impl std::ops::BitOr for Categories {
    type Output = Categories;
    fn bitor(self, rhs: Categories) -> Categories {
        Categories(self.0 | rhs.0)
    }
}

impl fmt::Debug for Categories {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> =
            Self::NAMED.iter().filter(|(c, _)| self.contains(*c)).map(|(_, n)| *n).collect();
        write!(f, "Categories({})", names.join(" | "))
    }
}

/// A run of pages with the same categories.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRegion {
    /// The pages.
    pub range: PageRange,
    /// Their categories, limited to the request's `return_mask`.
    pub categories: Categories,
}

/// What to scan for: the kernel's `pm_scan_arg` filters.
///
/// A page is reported when it has every category in `category_mask` (compared
/// after flipping those in `category_inverted`) and, if `category_anyof_mask` is
/// not empty, at least one of those.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScanRequest {
    /// Categories whose value counts as set when it is 0.
    pub category_inverted: Categories,
    /// Categories every reported page must have.
    pub category_mask: Categories,
    /// Categories of which a reported page must have one.
    pub category_anyof_mask: Categories,
    /// Categories to report.
    pub return_mask: Categories,
    /// Stop after this many pages (0: no limit).
    pub max_pages: u64,
    /// `PM_SCAN_WP_MATCHING`: write-protect the matched pages (userfaultfd WP_ASYNC).
    pub wp_matching: bool,
    /// `PM_SCAN_CHECK_WPASYNC`: fail if a page lacks async write protection.
    pub check_wpasync: bool,
}

impl Default for ScanRequest {
    /// Report every page that has an entry, with all categories.
    fn default() -> Self {
        Self {
            category_inverted: Categories::NONE,
            category_mask: Categories::NONE,
            category_anyof_mask: Categories::NONE,
            return_mask: Categories::ALL,
            max_pages: 0,
            wp_matching: false,
            check_wpasync: false,
        }
    }
}

/// Errors of page-table snapshots.
#[derive(Debug, thiserror::Error)]
pub enum PagemapError {
    /// `/proc/self/pagemap` could not be opened.
    #[error("cannot open /proc/self/pagemap: {0} (is /proc mounted?)")]
    Open(#[source] Errno),
    /// The kernel has no `PAGEMAP_SCAN`.
    #[error("PAGEMAP_SCAN is not supported by this kernel (Linux 6.7 or later is needed)")]
    Unsupported,
    /// The range was malformed.
    #[error(transparent)]
    Range(#[from] RangeError),
    /// The ioctl failed.
    #[error("PAGEMAP_SCAN of {range} failed: {errno}{}", if *.errno == Errno::FAULT { " (range outside the user address space)" } else { "" })]
    Scan {
        /// Range scanned.
        range: PageRange,
        /// The kernel's error.
        #[source]
        errno: Errno,
    },
    /// The kernel reported a region outside the range or stopped making progress.
    #[error("PAGEMAP_SCAN returned an inconsistent result at {0}")]
    Inconsistent(VirtAddr),
    /// Reading pagemap entries failed.
    #[error("reading /proc/self/pagemap failed: {0}")]
    Read(#[source] Errno),
}

/// One 64-bit `/proc/self/pagemap` entry.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PagemapEntry(pub u64);

impl PagemapEntry {
    /// Bit 63: the page is present in RAM.
    pub fn present(self) -> bool {
        self.0 >> 63 & 1 == 1
    }
    /// Bit 62: the page is swapped out (or a migration/device entry).
    pub fn swapped(self) -> bool {
        self.0 >> 62 & 1 == 1
    }
    /// Bit 61: a file page or shared anonymous page.
    pub fn file_or_shared(self) -> bool {
        self.0 >> 61 & 1 == 1
    }
    /// Bit 57: write-protected by userfaultfd.
    pub fn uffd_wp(self) -> bool {
        self.0 >> 57 & 1 == 1
    }
    /// Bit 56: mapped by this process only.
    pub fn exclusive(self) -> bool {
        self.0 >> 56 & 1 == 1
    }
    /// Bit 55: soft-dirty.
    pub fn soft_dirty(self) -> bool {
        self.0 >> 55 & 1 == 1
    }
    /// Bits 0-54: the page frame number, when present and visible (root only).
    pub fn pfn(self) -> Option<u64> {
        let pfn = self.0 & ((1 << 55) - 1);
        (self.present() && pfn != 0).then_some(pfn)
    }
}

impl fmt::Debug for PagemapEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PagemapEntry")
            .field("present", &self.present())
            .field("swapped", &self.swapped())
            .field("file_or_shared", &self.file_or_shared())
            .field("uffd_wp", &self.uffd_wp())
            .field("exclusive", &self.exclusive())
            .field("pfn", &self.pfn())
            .finish()
    }
}

/// Regions and the number of ioctl calls they took.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScanOutput {
    /// Runs of pages with equal categories, in address order, adjacent equal runs joined.
    pub regions: Vec<PageRegion>,
    /// `PAGEMAP_SCAN` calls made (more than one when the walk was continued).
    pub calls: usize,
}

/// An open `/proc/self/pagemap`.
#[derive(Debug)]
pub struct Pagemap {
    fd: OwnedFd,
    /// Categories this kernel can report (`PAGE_IS_GUARD` arrived in 6.15).
    reportable: Categories,
}

/// Regions per `PAGEMAP_SCAN` call by default.
pub const DEFAULT_SCAN_BUFFER: usize = 512;

impl Pagemap {
    /// Opens `/proc/self/pagemap`.
    pub fn open() -> Result<Self, PagemapError> {
        let fd = rustix::fs::open(
            "/proc/self/pagemap",
            rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )
        .map_err(PagemapError::Open)?;
        let reportable = if probe_scan(&fd, Categories::ALL) {
            Categories::ALL
        } else {
            Categories(Categories::ALL.0 & !Categories::GUARD.0)
        };
        Ok(Self { fd, reportable })
    }

    /// The categories this kernel reports; a request's `return_mask` is limited
    /// to them, so [`ScanRequest::default`] works on every kernel with the ioctl.
    pub fn reportable(&self) -> Categories {
        self.reportable
    }

    /// Scans `range`, continuing from `walk_end` until the whole range is walked.
    pub fn scan(
        &self,
        range: PageRange,
        req: &ScanRequest,
    ) -> Result<Vec<PageRegion>, PagemapError> {
        Ok(self.scan_with_buffer(range, req, DEFAULT_SCAN_BUFFER)?.regions)
    }

    /// [`scan`](Self::scan) with `buffer` regions per call (at least 1).
    pub fn scan_with_buffer(
        &self,
        range: PageRange,
        req: &ScanRequest,
        buffer: usize,
    ) -> Result<ScanOutput, PagemapError> {
        let zero = sys::page_region { start: 0, end: 0, categories: 0 };
        let mut vec = vec![zero; buffer.max(1)];
        let mut out: Vec<PageRegion> = Vec::new();
        let mut calls = 0;
        let mut at = range.start().as_u64();
        let end = range.end().as_u64();
        let mut remaining = req.max_pages;
        let mut flags = 0u64;
        if req.wp_matching {
            flags |= u64::from(g::PM_SCAN_WP_MATCHING);
        }
        if req.check_wpasync {
            flags |= u64::from(g::PM_SCAN_CHECK_WPASYNC);
        }
        while at < end {
            let mut arg = sys::pm_scan_arg {
                size: core::mem::size_of::<sys::pm_scan_arg>() as u64,
                flags,
                start: at,
                end,
                walk_end: 0,
                vec: vec.as_mut_ptr() as u64,
                vec_len: vec.len() as u64,
                max_pages: remaining,
                category_inverted: req.category_inverted.0,
                category_mask: req.category_mask.0,
                category_anyof_mask: req.category_anyof_mask.0,
                return_mask: req.return_mask.0 & self.reportable.0,
            };
            // SAFETY: PAGEMAP_SCAN takes a `pm_scan_arg`; the kernel writes at most
            // `vec_len` `page_region`s to `vec`, which points to that many elements.
            // With `wp_matching` it write-protects pages, which changes no bytes.
            let res = unsafe { ioctl_ptr(&self.fd, sys::PAGEMAP_SCAN, &mut arg) };
            calls += 1;
            let n = match res {
                Ok(n) => usize::try_from(n)
                    .map_err(|_| PagemapError::Inconsistent(VirtAddr::new(at as usize)))?,
                Err(Errno::NOTTY) => return Err(PagemapError::Unsupported),
                Err(Errno::INVAL) if calls == 1 && !probe_scan(&self.fd, Categories::PRESENT) => {
                    return Err(PagemapError::Unsupported);
                }
                Err(errno) => return Err(PagemapError::Scan { range, errno }),
            };
            let n = n.min(vec.len());
            let mut pages_reported = 0u64;
            let mut last_end = at;
            for r in &vec[..n] {
                if r.start < at || r.end > end || r.start >= r.end {
                    return Err(PagemapError::Inconsistent(VirtAddr::new(r.start as usize)));
                }
                let len = (r.end - r.start) as usize;
                pages_reported += (len / PAGE_SIZE) as u64;
                last_end = r.end;
                let region = PageRegion {
                    range: PageRange::new(VirtAddr::new(r.start as usize), len)?,
                    categories: Categories(r.categories),
                };
                push_joined(&mut out, region);
            }
            if req.max_pages != 0 {
                remaining = remaining.saturating_sub(pages_reported);
                if remaining == 0 {
                    break;
                }
            }
            if n < vec.len() || arg.walk_end >= end {
                // The kernel stops early only when the vector is full.
                break;
            }
            let next = arg.walk_end.max(last_end);
            if next <= at {
                return Err(PagemapError::Inconsistent(VirtAddr::new(at as usize)));
            }
            at = next;
        }
        Ok(ScanOutput { regions: out, calls })
    }

    /// Reads the plain pagemap entry of every page of `range`.
    pub fn entries(&self, range: PageRange) -> Result<Vec<PagemapEntry>, PagemapError> {
        let mut raw = vec![0u8; range.pages() * 8];
        let mut off = (range.start().get() / PAGE_SIZE * 8) as u64;
        let mut filled = 0;
        while filled < raw.len() {
            match rustix::io::pread(&self.fd, &mut raw[filled..], off) {
                Ok(0) => return Err(PagemapError::Read(Errno::IO)),
                Ok(n) => {
                    filled += n;
                    off += n as u64;
                }
                Err(Errno::INTR) => continue,
                Err(e) => return Err(PagemapError::Read(e)),
            }
        }
        Ok(raw
            .chunks_exact(8)
            .map(|c| PagemapEntry(u64::from_ne_bytes(c.try_into().expect("8 bytes"))))
            .collect())
    }
}

/// Appends `r`, joining it to the last region if they touch and match.
fn push_joined(out: &mut Vec<PageRegion>, r: PageRegion) {
    if let Some(last) = out.last_mut()
        && last.range.end() == r.range.start()
        && last.categories == r.categories
    {
        last.range = PageRange::new(last.range.start(), last.range.len() + r.range.len())
            .expect("adjacent aligned ranges");
        return;
    }
    out.push(r);
}

/// Whether a well-formed scan of page 0 reporting `return_mask` succeeds: it
/// fails with `ENOTTY` where the ioctl does not exist, and with `EINVAL` where a
/// category is unknown to the kernel.
fn probe_scan(fd: &OwnedFd, return_mask: Categories) -> bool {
    let mut region = sys::page_region { start: 0, end: 0, categories: 0 };
    let mut arg = sys::pm_scan_arg {
        size: core::mem::size_of::<sys::pm_scan_arg>() as u64,
        flags: 0,
        start: 0,
        end: PAGE_SIZE as u64,
        walk_end: 0,
        vec: (&mut region as *mut sys::page_region) as u64,
        vec_len: 1,
        max_pages: 0,
        category_inverted: 0,
        category_mask: 0,
        category_anyof_mask: 0,
        return_mask: return_mask.0,
    };
    // SAFETY: as in `scan_with_buffer`: `vec` points to one `page_region`.
    unsafe { ioctl_ptr(fd, sys::PAGEMAP_SCAN, &mut arg) }.is_ok()
}

/// Whether this kernel has `PAGEMAP_SCAN`.
pub fn scan_supported() -> Result<bool, PagemapError> {
    Ok(probe_scan(&Pagemap::open()?.fd, Categories::PRESENT))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(start: usize, pages: usize, cat: Categories) -> PageRegion {
        PageRegion {
            range: PageRange::from_pages(VirtAddr::new(start), pages).unwrap(),
            categories: cat,
        }
    }

    #[test]
    fn push_joined_merges_only_adjacent_equal_runs() {
        let mut v = Vec::new();
        push_joined(&mut v, region(0x1000, 2, Categories::PRESENT));
        push_joined(&mut v, region(0x3000, 1, Categories::PRESENT));
        push_joined(&mut v, region(0x4000, 1, Categories::PRESENT | Categories::WRITTEN));
        push_joined(&mut v, region(0x6000, 1, Categories::PRESENT | Categories::WRITTEN));
        assert_eq!(v.len(), 3);
        assert_eq!(v[0].range.pages(), 3);
    }

    #[test]
    fn entry_bits() {
        let e = PagemapEntry(1 << 63 | 1 << 56 | 1 << 55 | 1234);
        assert!(e.present() && e.exclusive() && e.soft_dirty() && !e.swapped() && !e.uffd_wp());
        assert_eq!(e.pfn(), Some(1234));
        assert_eq!(PagemapEntry(1 << 63).pfn(), None);
        assert_eq!(PagemapEntry(1234).pfn(), None);
    }

    #[test]
    fn all_categories_are_the_kernels_nine() {
        assert_eq!(Categories::ALL.bits(), 0x1ff);
        assert_eq!(Categories::NAMED.len(), 9);
    }
}
