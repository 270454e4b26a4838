//! `/proc/self/maps`: what the kernel says a range of the address space is.
//!
//! hmm reads it when memory is adopted, to refuse what it must not manage
//! (shared, file-backed or hugetlb memory, the heap, stacks) with the reason.

use crate::addr::{PageRange, VirtAddr};

/// One line of `/proc/self/maps`: a virtual memory area.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Vma {
    /// The area.
    pub range: PageRange,
    /// Readable.
    pub read: bool,
    /// Writable.
    pub write: bool,
    /// Executable.
    pub exec: bool,
    /// `MAP_SHARED` (`s`) rather than private (`p`).
    pub shared: bool,
    /// Inode of the backing file (0 for anonymous memory).
    pub inode: u64,
    /// The path or pseudo-name (`[heap]`, `[stack]`, `[anon:name]`), empty when none.
    pub path: String,
}

impl Vma {
    /// Private anonymous memory, named or not (not the heap or a stack).
    pub fn is_private_anonymous(&self) -> bool {
        !self.shared && self.inode == 0 && (self.path.is_empty() || self.path.starts_with("[anon:"))
    }

    /// hugetlbfs-backed memory (`MAP_HUGETLB` shows as a deleted `anon_hugepage`).
    pub fn is_hugetlb(&self) -> bool {
        self.path.starts_with("/anon_hugepage") || self.path.contains("/hugepages")
    }
}

/// Parses one line of `/proc/self/maps`.
fn parse_line(line: &str) -> Option<Vma> {
    let mut it = line.splitn(6, ' ');
    let (lo, hi) = it.next()?.split_once('-')?;
    let perms = it.next()?.as_bytes();
    let _offset = it.next()?;
    let _dev = it.next()?;
    let inode = it.next()?.parse().ok()?;
    let path = it.next().unwrap_or("").trim().to_owned();
    let lo = usize::from_str_radix(lo, 16).ok()?;
    let hi = usize::from_str_radix(hi, 16).ok()?;
    if perms.len() < 4 {
        return None;
    }
    Some(Vma {
        range: PageRange::new(VirtAddr::new(lo), hi.checked_sub(lo)?).ok()?,
        read: perms[0] == b'r',
        write: perms[1] == b'w',
        exec: perms[2] == b'x',
        shared: perms[3] == b's',
        inode,
        path,
    })
}

/// The areas overlapping `range`, in address order (read fresh from the kernel).
pub fn vmas_overlapping(range: PageRange) -> std::io::Result<Vec<Vma>> {
    let text = std::fs::read_to_string("/proc/self/maps")?;
    Ok(text.lines().filter_map(parse_line).filter(|v| v.range.overlaps(range)).collect())
}

/// The area containing `addr`, if any.
pub fn vma_containing(addr: VirtAddr) -> std::io::Result<Option<Vma>> {
    let page = PageRange::new(addr.page_down(), crate::addr::PAGE_SIZE).expect("one page");
    Ok(vmas_overlapping(page)?.into_iter().next())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_anonymous_file_and_named_lines() {
        let v = parse_line("7f0000000000-7f0000002000 rw-p 00000000 00:00 0 ").unwrap();
        assert!(v.is_private_anonymous() && v.read && v.write && !v.exec);
        assert_eq!(v.range.len(), 0x2000);
        let v = parse_line("55d000-56d000 r-xp 00001000 fd:01 1234   /usr/bin/cat").unwrap();
        assert!(!v.is_private_anonymous());
        assert_eq!(v.path, "/usr/bin/cat");
        let v = parse_line("7f0000-8f0000 rw-s 00000000 00:01 77 /dev/zero (deleted)").unwrap();
        assert!(v.shared && !v.is_private_anonymous());
        let v = parse_line("5000-6000 rw-p 00000000 00:00 0  [heap]").unwrap();
        assert!(!v.is_private_anonymous(), "the heap is refused by name");
        let v = parse_line("5000-6000 rw-p 00000000 00:00 0  [anon:arena]").unwrap();
        assert!(v.is_private_anonymous());
        let v = parse_line("5000-6000 rw-p 00000000 00:0f 9 /anon_hugepage (deleted)").unwrap();
        assert!(v.is_hugetlb());
        assert!(parse_line("garbage").is_none());
    }

    #[test]
    fn finds_the_area_of_a_local_variable() {
        let x = 5u64;
        let v = vma_containing(VirtAddr::new(&x as *const u64 as usize)).unwrap().unwrap();
        assert!(v.read && v.write && !v.shared);
    }
}
