//! `PAGEMAP_SCAN` and pagemap entries against the real kernel.

mod common;

use common::{skip_without, skip_without_uffd};
use hmm::os::mm::{Advise, Mapping, Protection};
use hmm::os::pagemap::{Categories, Pagemap, ScanRequest};
use hmm::os::uffd::{Features, RegisterMode, Uffd, UffdOptions};
use hmm::{HUGE_PAGE_SIZE, PAGE_SIZE};

fn anon(pages: usize) -> Mapping {
    let m = Mapping::anonymous(pages * PAGE_SIZE, Protection::ReadWrite).unwrap();
    m.advise(m.range(), Advise::NoHugePage).unwrap();
    m
}

/// Categories of page `i` of `m`, from a scan of the whole mapping (a page
/// without a region has no category).
fn categories_of(regions: &[hmm::os::pagemap::PageRegion], m: &Mapping, i: usize) -> Categories {
    let addr = m.range().page(i).unwrap().start();
    regions.iter().find(|r| r.range.contains(addr)).map_or(Categories::NONE, |r| r.categories)
}

#[test]
fn scan_reports_holes_zero_pages_and_present_pages() {
    if skip_without("pagemap-scan") {
        return;
    }
    let pm = Pagemap::open().unwrap();
    let m = anon(4);
    // Page 0: never touched. Page 1: read only (the shared zero page). Pages 2-3: written.
    assert_eq!(m.touch_read(PAGE_SIZE).unwrap(), 0);
    m.fill(2 * PAGE_SIZE, 2 * PAGE_SIZE, 1).unwrap();
    let regions = pm.scan(m.range(), &ScanRequest::default()).unwrap();
    let c0 = categories_of(&regions, &m, 0);
    let c1 = categories_of(&regions, &m, 1);
    let c2 = categories_of(&regions, &m, 2);
    assert!(!c0.contains(Categories::PRESENT), "hole: {c0:?}");
    assert!(c1.contains(Categories::PRESENT | Categories::PFNZERO), "zero page: {c1:?}");
    assert!(
        c2.contains(Categories::PRESENT) && !c2.contains(Categories::PFNZERO),
        "written page: {c2:?}"
    );
    assert!(!c2.contains(Categories::HUGE) && !c2.contains(Categories::FILE));
    assert_eq!(c2, categories_of(&regions, &m, 3));

    // Filtering: only present pages.
    let req = ScanRequest { category_mask: Categories::PRESENT, ..ScanRequest::default() };
    let present = pm.scan(m.range(), &req).unwrap();
    let pages: usize = present.iter().map(|r| r.range.pages()).sum();
    assert_eq!(pages, 3);

    // Plain entries agree.
    let e = pm.entries(m.range()).unwrap();
    assert_eq!(e.iter().map(|e| e.present()).collect::<Vec<_>>(), vec![false, true, true, true]);
    assert!(e[2].exclusive(), "a written anonymous page is mapped by this process alone");
}

#[test]
fn scan_reports_written_pages_under_async_write_protection() {
    if skip_without("wp-async") || skip_without("pagemap-scan") {
        return;
    }
    let uffd = Uffd::open(UffdOptions {
        required: Features::PAGEFAULT_FLAG_WP | Features::WP_ASYNC | Features::WP_UNPOPULATED,
        ..UffdOptions::default()
    })
    .unwrap();
    let pm = Pagemap::open().unwrap();
    let m = anon(8);
    m.fill(0, 8 * PAGE_SIZE, 1).unwrap();
    uffd.register(&m, m.range(), RegisterMode::WP).unwrap();
    uffd.write_protect(m.range()).unwrap();
    // Writes resolve without a fault message (async mode) and mark the page written.
    m.touch_write(3 * PAGE_SIZE, 2).unwrap();
    m.touch_write(5 * PAGE_SIZE, 2).unwrap();
    let regions = pm.scan(m.range(), &ScanRequest::default()).unwrap();
    for i in 0..8 {
        let c = categories_of(&regions, &m, i);
        assert!(c.contains(Categories::PRESENT | Categories::WPALLOWED), "page {i}: {c:?}");
        assert_eq!(c.contains(Categories::WRITTEN), i == 3 || i == 5, "page {i}: {c:?}");
    }
    // Scan-and-protect again: the written pages are reported and re-protected.
    let req = ScanRequest {
        category_mask: Categories::WRITTEN,
        wp_matching: true,
        ..ScanRequest::default()
    };
    let dirty = pm.scan(m.range(), &req).unwrap();
    assert_eq!(dirty.iter().map(|r| r.range.pages()).sum::<usize>(), 2);
    let again = pm.scan(m.range(), &req).unwrap();
    assert!(again.is_empty(), "no page was written since: {again:?}");
    uffd.unregister(m.range()).unwrap();
}

#[test]
fn scan_reports_transparent_huge_pages() {
    if skip_without("pagemap-scan") || skip_without("transparent-hugepages") {
        return;
    }
    let pm = Pagemap::open().unwrap();
    let m = Mapping::anonymous_aligned(2 * HUGE_PAGE_SIZE, HUGE_PAGE_SIZE, Protection::ReadWrite)
        .unwrap();
    m.advise(m.range(), Advise::HugePage).unwrap();
    m.touch_write(0, 1).unwrap();
    m.touch_write(HUGE_PAGE_SIZE, 1).unwrap();
    let regions = pm.scan(m.range(), &ScanRequest::default()).unwrap();
    let huge: usize = regions
        .iter()
        .filter(|r| r.categories.contains(Categories::HUGE | Categories::PRESENT))
        .map(|r| r.range.len())
        .sum();
    if huge == 0 {
        eprintln!(
            "SKIP: the kernel gave no transparent huge page (memory too fragmented?): {regions:?}"
        );
        return;
    }
    assert_eq!(huge % HUGE_PAGE_SIZE, 0, "huge pages are reported whole: {regions:?}");
    // Every 4 KiB entry of a huge page is present, though only one byte was written.
    for r in regions.iter().filter(|r| r.categories.contains(Categories::HUGE)) {
        assert!(pm.entries(r.range).unwrap().iter().all(|e| e.present()), "{r:?}");
    }
}

#[test]
fn scan_continues_across_walk_end() {
    if skip_without("pagemap-scan") {
        return;
    }
    let pm = Pagemap::open().unwrap();
    // 4096 pages, every other one present: 4096 alternating regions.
    let pages = 4096;
    let m = anon(pages);
    for p in (0..pages).step_by(2) {
        m.touch_write(p * PAGE_SIZE, 1).unwrap();
    }
    let whole = pm.scan_with_buffer(m.range(), &ScanRequest::default(), 8192).unwrap();
    let small = pm.scan_with_buffer(m.range(), &ScanRequest::default(), 64).unwrap();
    assert_eq!(whole.calls, 1, "a vector with room for every region needs one call");
    assert!(
        small.calls >= pages / 64,
        "a small buffer needs walk_end continuations: {} calls",
        small.calls
    );
    assert_eq!(small.regions, whole.regions, "the result does not depend on the buffer size");
    assert_eq!(whole.regions.len(), pages);
    for (i, r) in whole.regions.iter().enumerate() {
        assert_eq!(r.range.pages(), 1);
        assert_eq!(r.categories.contains(Categories::PRESENT), i % 2 == 0, "region {i}: {r:?}");
    }

    // A run cut by max_pages and continued joins back into one region.
    let run = anon(100);
    run.fill(0, 100 * PAGE_SIZE, 1).unwrap();
    let one = pm.scan_with_buffer(run.range(), &ScanRequest::default(), 1).unwrap();
    assert_eq!(one.regions.len(), 1);
    assert_eq!(one.regions[0].range, run.range());
    let limited =
        pm.scan(run.range(), &ScanRequest { max_pages: 10, ..ScanRequest::default() }).unwrap();
    assert_eq!(limited.iter().map(|r| r.range.pages()).sum::<usize>(), 10, "max_pages is honoured");
}

#[test]
fn scan_of_a_range_outside_user_space_is_an_error() {
    if skip_without_uffd() || skip_without("pagemap-scan") {
        return;
    }
    let pm = Pagemap::open().unwrap();
    let kernel = hmm::PageRange::new(hmm::VirtAddr::new(0xffff_8000_0000_0000), PAGE_SIZE).unwrap();
    assert!(matches!(
        pm.scan(kernel, &ScanRequest::default()),
        Err(hmm::os::pagemap::PagemapError::Scan { .. })
    ));
}
