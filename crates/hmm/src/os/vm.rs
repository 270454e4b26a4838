//! Reaching the address space the way a device driver does in the kernel:
//! through the kernel, which checks every access against the mapping as it is
//! now.
//!
//! - [`VmaQuery`]: what a virtual memory area allows (`PROCMAP_QUERY` on
//!   `/proc/self/maps`, Linux 6.11; parsing the file on older kernels). One
//!   ioctl per area, no page fault, cheap enough to re-validate a permission
//!   before every device write.
//! - [`populate`]: `MADV_POPULATE_READ` / `_WRITE`, the kernel's own fault path
//!   run on a device's behalf (the `handle_mm_fault` step of `hmm_range_fault`).
//! - [`read_memory`] and [`Mapping::write_checked`]: copies checked against
//!   the page table at the moment of the copy. Each page is resolved as a CPU
//!   touch would resolve it (so userfaultfd serves its faults), and what the
//!   mapping does not allow *now* (unmapped, `PROT_NONE`, read-only for a
//!   write) stops the copy where a plain access would raise a signal. This is
//!   how a device never writes through a page the application has made
//!   read-only behind hmm's back. On x86-64 the copy is a direct one whose
//!   faults are fixed up (`os::bytes::copy_fallible`), at `memcpy`'s
//!   speed; elsewhere it is `process_vm_readv` / `process_vm_writev` on the
//!   process itself, where the kernel makes the same checks.

use std::os::fd::{AsFd, OwnedFd};

use rustix::io::Errno;

use super::mm::{Mapping, MmError};
use super::sys;
use super::uffd::ioctl_ptr;
use crate::addr::{HUGE_PAGE_SIZE, PAGE_SIZE, PageRange, RangeError, VirtAddr};

/// What a virtual memory area is and allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmaInfo {
    /// The area.
    pub range: PageRange,
    /// Readable.
    pub read: bool,
    /// Writable.
    pub write: bool,
    /// `MAP_SHARED`.
    pub shared: bool,
    /// Backed by a file (or memfd, or hugetlbfs) rather than anonymous memory.
    pub file: bool,
    /// The size of the pages that map it: 4 KiB, or the hugetlb page size.
    pub page_size: usize,
}

impl VmaInfo {
    /// The mapping order of its pages (0 for 4 KiB, 9 for 2 MiB, 18 for 1 GiB).
    pub fn order(&self) -> u8 {
        (self.page_size.max(PAGE_SIZE) / PAGE_SIZE).trailing_zeros() as u8
    }
}

/// The first address of `range` that no area of `vmas` (in address order,
/// as [`VmaQuery::overlapping`] gives them) satisfying `covers` maps; `None`
/// when they cover it all.
pub fn first_uncovered(
    range: PageRange,
    vmas: &[VmaInfo],
    covers: impl Fn(&VmaInfo) -> bool,
) -> Option<VirtAddr> {
    let mut at = range.start();
    for v in vmas {
        if at >= range.end() {
            break;
        }
        if v.range.end() <= at {
            continue;
        }
        if v.range.start() > at || !covers(v) {
            return Some(at);
        }
        at = v.range.end();
    }
    (at < range.end()).then_some(at)
}

/// Queries of `/proc/self/maps`, kept open.
#[derive(Debug)]
pub struct VmaQuery {
    fd: OwnedFd,
    /// Whether this kernel has `PROCMAP_QUERY` (else the file is parsed).
    ioctl: bool,
}

const PROCMAP_QUERY_VMA_READABLE: u64 = 1;
const PROCMAP_QUERY_VMA_WRITABLE: u64 = 2;
const PROCMAP_QUERY_VMA_SHARED: u64 = 8;
const PROCMAP_QUERY_COVERING_OR_NEXT_VMA: u64 = 0x10;

impl VmaQuery {
    /// Opens `/proc/self/maps` and checks whether the kernel answers `PROCMAP_QUERY`.
    pub fn open() -> std::io::Result<Self> {
        let fd = rustix::fs::open(
            "/proc/self/maps",
            rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
            rustix::fs::Mode::empty(),
        )?;
        let mut me = Self { fd, ioctl: true };
        // Any address works for the check: ENOENT (nothing there) also proves
        // the ioctl exists; ENOTTY or EINVAL means a kernel before 6.11.
        me.ioctl = !matches!(me.query(VirtAddr::new(PAGE_SIZE)), Err(Errno::NOTTY | Errno::INVAL));
        Ok(me)
    }

    /// Whether queries use the `PROCMAP_QUERY` ioctl.
    pub fn uses_ioctl(&self) -> bool {
        self.ioctl
    }

    /// The area containing `addr`, or the next one above it.
    fn query(&self, addr: VirtAddr) -> Result<Option<VmaInfo>, Errno> {
        let mut q = sys::procmap_query {
            size: core::mem::size_of::<sys::procmap_query>() as u64,
            query_flags: PROCMAP_QUERY_COVERING_OR_NEXT_VMA,
            query_addr: addr.as_u64(),
            vma_start: 0,
            vma_end: 0,
            vma_flags: 0,
            vma_page_size: 0,
            vma_offset: 0,
            inode: 0,
            dev_major: 0,
            dev_minor: 0,
            vma_name_size: 0,
            build_id_size: 0,
            vma_name_addr: 0,
            build_id_addr: 0,
        };
        // SAFETY: `q` is a valid `procmap_query` of the size it declares; with no
        // name or build-id buffer asked for, the kernel writes only into `q`.
        match unsafe { ioctl_ptr(self.fd.as_fd(), sys::PROCMAP_QUERY, &mut q) } {
            Ok(_) => {}
            Err(Errno::NOENT) => return Ok(None),
            Err(e) => return Err(e),
        }
        let len = (q.vma_end - q.vma_start) as usize;
        let Ok(range) = PageRange::new(VirtAddr::new(q.vma_start as usize), len) else {
            return Ok(None);
        };
        Ok(Some(VmaInfo {
            range,
            read: q.vma_flags & PROCMAP_QUERY_VMA_READABLE != 0,
            write: q.vma_flags & PROCMAP_QUERY_VMA_WRITABLE != 0,
            shared: q.vma_flags & PROCMAP_QUERY_VMA_SHARED != 0,
            file: q.inode != 0,
            page_size: (q.vma_page_size as usize).max(PAGE_SIZE),
        }))
    }

    /// The areas overlapping `range`, in address order, read fresh.
    pub fn overlapping(&self, range: PageRange) -> std::io::Result<Vec<VmaInfo>> {
        if !self.ioctl {
            return Ok(super::maps::vmas_overlapping(range)?
                .into_iter()
                .map(|v| VmaInfo {
                    range: v.range,
                    read: v.read,
                    write: v.write,
                    shared: v.shared,
                    file: v.inode != 0,
                    page_size: if v.is_hugetlb() { HUGE_PAGE_SIZE } else { PAGE_SIZE },
                })
                .collect());
        }
        let mut out = Vec::new();
        let mut at = range.start();
        while at < range.end() {
            match self.query(at)? {
                Some(v) if v.range.start() < range.end() => {
                    at = v.range.end();
                    out.push(v);
                }
                _ => break,
            }
        }
        Ok(out)
    }
}

/// Faults `range` in as a CPU read (or write) would: `MADV_POPULATE_READ` /
/// `MADV_POPULATE_WRITE`. Pages registered with userfaultfd fault to their
/// handler, which must be another thread. The bytes do not change (a write
/// population only breaks copy-on-write sharing).
pub fn populate(range: PageRange, write: bool) -> Result<(), MmError> {
    let (advice, name) = if write {
        (rustix::mm::Advice::LinuxPopulateWrite, super::mm::Advise::PopulateWrite)
    } else {
        (rustix::mm::Advice::LinuxPopulateRead, super::mm::Advise::PopulateRead)
    };
    // SAFETY: populating only maps pages with the contents they already have
    // (or zeros where none existed, which is what any read would see); no byte
    // any Rust reference can observe changes.
    unsafe { rustix::mm::madvise(range.start().get() as *mut _, range.len(), advice) }
        .map_err(|errno| MmError::Advise { range, advice: name, errno })
}

/// Copies `buf.len()` bytes at `addr` of this process into `buf`, checked
/// (see the module docs). Returns the bytes copied, which is less than asked
/// when a page could not be read (unmapped, not readable, its fault failed);
/// `Err` only when nothing could be.
pub fn read_memory(addr: VirtAddr, buf: &mut [u8]) -> Result<usize, Errno> {
    if buf.is_empty() {
        return Ok(0);
    }
    let src = addr.get() as *const u8;
    // SAFETY: `buf` is the caller's own and cannot overlap memory no Rust
    // reference covers; the source is only read, and a fault there stops the
    // copy instead of raising a signal.
    if let Some(n) = unsafe { super::bytes::copy_fallible(buf.as_mut_ptr(), src, buf.len()) } {
        return if n == 0 { Err(Errno::FAULT) } else { Ok(n) };
    }
    let local = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
    let remote = libc::iovec { iov_base: addr.get() as *mut _, iov_len: buf.len() };
    // SAFETY: the kernel writes only into `local`, which is `buf`; `remote` is
    // only read, through the page table, with every access checked by the kernel.
    let n = unsafe { libc::process_vm_readv(own_pid(), &local, 1, &remote, 1, 0) };
    if n < 0 { Err(last_errno()) } else { Ok(n as usize) }
}

/// Why a checked write into a mapping stopped.
#[derive(Debug, thiserror::Error)]
pub enum CheckedWriteError {
    /// The range is not inside the mapping, is lent to an arena, or was unmapped.
    #[error(transparent)]
    Range(#[from] RangeError),
    /// The kernel refused after `done` bytes (`EFAULT`: not mapped writable now).
    #[error("the kernel refused the write after {done} bytes: {errno}")]
    Refused {
        /// Bytes written before the refusal.
        done: usize,
        /// The kernel's error.
        errno: Errno,
    },
}

impl Mapping {
    /// Writes `data` at `offset`, checked against the page table at the moment
    /// of the copy (see the module docs): a part the application made
    /// read-only (or unmapped) is refused with `EFAULT` where a store would
    /// raise a signal. Pages on a device fault back first, as for any write.
    pub fn write_checked(&self, offset: usize, data: &[u8]) -> Result<(), CheckedWriteError> {
        let a = self.access(offset, data.len())?;
        let dst = a.ptr;
        // SAFETY: the destination lies inside this live mapping (checked by
        // `access`, whose guard holds off unmapping), whose bytes no Rust
        // reference aliases; `data` is only read; a fault on the destination
        // (not writable now) stops the copy instead of raising a signal.
        if let Some(n) = unsafe { super::bytes::copy_fallible(dst, data.as_ptr(), data.len()) } {
            return match n == data.len() {
                true => Ok(()),
                false => Err(CheckedWriteError::Refused { done: n, errno: Errno::FAULT }),
            };
        }
        let mut done = 0;
        while done < data.len() {
            let rest = &data[done..];
            let local = libc::iovec { iov_base: rest.as_ptr() as *mut _, iov_len: rest.len() };
            let remote =
                libc::iovec { iov_base: a.ptr.wrapping_add(done).cast(), iov_len: rest.len() };
            // SAFETY: `remote` lies inside this live mapping (checked by `access`,
            // whose guard holds off unmapping), whose bytes no Rust reference
            // aliases; the kernel checks the page table before every byte it
            // stores, and reads only `data`.
            let n = unsafe { libc::process_vm_writev(own_pid(), &local, 1, &remote, 1, 0) };
            if n <= 0 {
                let errno = if n == 0 { Errno::FAULT } else { last_errno() };
                return Err(CheckedWriteError::Refused { done, errno });
            }
            done += n as usize;
        }
        Ok(())
    }
}

/// The calling thread's `errno` after a libc call that failed.
fn last_errno() -> Errno {
    Errno::from_io_error(&std::io::Error::last_os_error()).unwrap_or(Errno::FAULT)
}

fn own_pid() -> libc::pid_t {
    rustix::process::getpid().as_raw_nonzero().get()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vma(first: usize, pages: usize, write: bool) -> VmaInfo {
        VmaInfo {
            range: PageRange::from_pages(VirtAddr::new(first * PAGE_SIZE), pages).unwrap(),
            read: true,
            write,
            shared: false,
            file: false,
            page_size: PAGE_SIZE,
        }
    }

    #[test]
    fn first_uncovered_finds_holes_and_areas_that_do_not_count() {
        let at = |page: usize| VirtAddr::new(page * PAGE_SIZE);
        let range = PageRange::from_pages(at(10), 10).unwrap();
        let any = |_: &VmaInfo| true;
        // Areas reaching past both ends cover it.
        assert_eq!(first_uncovered(range, &[vma(5, 8, true), vma(13, 20, true)], any), None);
        // A hole at the start, in the middle, at the end.
        assert_eq!(first_uncovered(range, &[vma(11, 20, true)], any), Some(at(10)));
        assert_eq!(
            first_uncovered(range, &[vma(10, 3, true), vma(14, 9, true)], any),
            Some(at(13))
        );
        assert_eq!(first_uncovered(range, &[vma(8, 10, true)], any), Some(at(18)));
        assert_eq!(first_uncovered(range, &[], any), Some(at(10)));
        // An area that does not satisfy the test counts as a hole.
        let areas = [vma(10, 4, true), vma(14, 6, false)];
        assert_eq!(first_uncovered(range, &areas, |v| v.write), Some(at(14)));
        assert_eq!(first_uncovered(range, &areas, any), None);
    }
}
