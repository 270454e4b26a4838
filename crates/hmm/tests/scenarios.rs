//! The conformance scenarios of `SCENARIOS.md` that concern migration and
//! fault-back, against the built-in software device with private memory, and
//! (the `_coherent` variants) with coherent memory.
//!
//! Scenarios without a coherent variant, and why: `compound` and
//! `anon_write_hugetlbfs`, `mirror_unmanaged_memory`, `file_*` never place a
//! page in device memory (they would run the same code twice);
//! `migrate_anon_huge_fault` and `migrate_anon_huge_err` are about CPU
//! fault-back, which coherent pages never take; `migrate_anon_huge_free`
//! asks `MADV_FREE` of device-resident pages, which the kernel refuses on
//! coherent memory (file pages: `EINVAL`), see DESIGN.md.

mod common;

use hmm::{Hmm, PAGE_SIZE, Residency, SkipReason};
use hmm_swdev::{SoftwareDevice, SoftwareDeviceConfig};

const NPAGES: usize = 1024;

thread_local! {
    /// Set by a `_coherent` variant on its own thread: [`device`] makes
    /// coherent devices (a forked child, running on the forking thread, keeps it).
    static COHERENT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

fn coherent() -> bool {
    COHERENT.with(|c| c.get())
}

/// Defines `$variant` as `$scenario` run against coherent devices.
macro_rules! coherent_variant {
    ($($variant:ident => $scenario:ident),* $(,)?) => {$(
        #[test]
        fn $variant() {
            COHERENT.with(|c| c.set(true));
            $scenario();
        }
    )*};
}

coherent_variant! {
    open_close_coherent => open_close,
    anon_read_coherent => anon_read,
    anon_read_prot_coherent => anon_read_prot,
    anon_write_coherent => anon_write,
    anon_write_prot_coherent => anon_write_prot,
    anon_write_huge_coherent => anon_write_huge,
    anon_write_child_coherent => anon_write_child,
    anon_write_child_shared_coherent => anon_write_child_shared,
    anon_read_multiple_coherent => anon_read_multiple,
    migrate_coherent => migrate,
    migrate_fault_coherent => migrate_fault,
    migrate_release_coherent => migrate_release,
    migrate_shared_coherent => migrate_shared,
    migrate_multiple_coherent => migrate_multiple,
    migrate_file_private_coherent => migrate_file_private,
    migrate_anon_huge_empty_coherent => migrate_anon_huge_empty,
    migrate_anon_huge_zero_coherent => migrate_anon_huge_zero,
    migrate_mixed_coherent => migrate_mixed,
    snapshot_coherent => snapshot,
    exclusive_coherent => exclusive,
    exclusive_mprotect_coherent => exclusive_mprotect,
    gup_coherent => gup,
    foreign_uffd_read_coherent => foreign_uffd_read,
}

fn device(hmm: &Hmm, pages: usize) -> SoftwareDevice {
    let config = if coherent() {
        SoftwareDeviceConfig::coherent("cxl0", pages * PAGE_SIZE)
    } else {
        SoftwareDeviceConfig::new("sw0", pages * PAGE_SIZE)
    };
    SoftwareDevice::new(hmm, config).expect("device")
}

/// Brings `r` back from `dev` the way the scenario's memory kind does: a
/// CPU touch for private memory, an explicit migration for coherent memory
/// (which a CPU touch never moves).
fn bring_back(dev: &SoftwareDevice, r: &hmm::ManagedRange) {
    if coherent() {
        dev.migrate_to_system(r.range()).unwrap();
    }
}

/// Page `i` holds the word `i` repeated.
fn fill_index(r: &hmm::ManagedRange) {
    r.write(0, &index_bytes(r.pages(), 0)).unwrap();
}

/// An instance in `FaultMode::Service` whatever the environment asks
/// (`HMM_FAULT_MODE`), for what only that mode promises.
fn service_mode() -> Hmm {
    Hmm::with_config(hmm::HmmConfig {
        fault_mode: hmm::FaultMode::Service,
        ..hmm::HmmConfig::default()
    })
    .unwrap()
}

/// An instance, a device of `NPAGES` pages, and a range of `NPAGES` pages
/// holding [`fill_index`] data.
fn indexed_range() -> (Hmm, SoftwareDevice, hmm::ManagedRange) {
    let hmm = Hmm::new().unwrap();
    let dev = device(&hmm, NPAGES);
    let r = hmm.alloc(NPAGES * PAGE_SIZE).unwrap();
    fill_index(&r);
    (hmm, dev, r)
}

/// Waits until hmm's threads are done with what came before (the rest of a
/// fault-around window, an unmap's event).
fn settle(hmm: &Hmm) {
    hmm.settle(std::time::Duration::from_secs(10)).unwrap();
}

fn check_index(bytes: &[u8], first_page: usize) {
    for (k, page) in bytes.chunks(PAGE_SIZE).enumerate() {
        let want = ((first_page + k) as u64).to_ne_bytes();
        for w in page.chunks(8) {
            assert_eq!(w, want, "page {} holds the wrong data", first_page + k);
        }
    }
}

#[test]
fn migrate() {
    if common::skip_without_uffd() {
        return;
    }
    let (hmm, dev, r) = indexed_range();
    let rep = dev.migrate_to_device(r.range()).unwrap();
    assert_eq!(rep.migrated, NPAGES, "cpages: {:?}", rep.skipped.first());
    assert!(
        r.residencies()
            .iter()
            .all(|x| matches!(x, Residency::Device(p) if p.dev == dev.memory().id()))
    );
    let (bytes, c) = dev.read(r.range()).unwrap();
    assert_eq!(c.cpages, NPAGES as u64);
    check_index(&bytes, 0);
    // The device read its own memory: nothing came back.
    assert_eq!(dev.stats().pages_resident, NPAGES as u64);
    let mut cpu = vec![0u8; r.len()];
    r.read(0, &mut cpu).unwrap();
    check_index(&cpu, 0);
    if coherent() {
        // The CPU read device memory in place.
        assert_eq!(dev.stats().pages_resident, NPAGES as u64);
        assert_eq!(r.stats().cpu_faults, 0);
        bring_back(&dev, &r);
        check_index(&cpu_bytes(&r), 0);
    }
    // The last fault-around window comes back after the read returned.
    settle(&hmm);
    assert!(r.residencies().iter().all(|x| *x == Residency::System));
}

#[test]
fn migrate_fault() {
    if common::skip_without_uffd() {
        return;
    }
    let (hmm, dev, r) = indexed_range();
    assert_eq!(dev.migrate_to_device(r.range()).unwrap().migrated, NPAGES);
    // The CPU reads the first half: it faults back.
    let mut half = vec![0u8; r.len() / 2];
    r.read(0, &mut half).unwrap();
    check_index(&half, 0);
    if coherent() {
        // Coherent memory is read in place: nothing faults, nothing moves;
        // the first half comes back by an explicit migration instead.
        assert_eq!(r.stats().cpu_faults, 0);
        assert_eq!(dev.stats().pages_resident, NPAGES as u64);
        dev.migrate_to_system(r.pages_range(0, NPAGES / 2).unwrap()).unwrap();
    } else {
        assert!(r.stats().cpu_faults > 0);
    }
    // The rest of the last fault-around window may still be coming back:
    // counted once it is all in.
    settle(&hmm);
    assert!(r.residencies()[..NPAGES / 2].iter().all(|x| *x == Residency::System));
    // Fault-around may have brought back a few pages past the half as well.
    let back = r.residencies().iter().filter(|x| **x == Residency::System).count();
    // Migrating the whole range again moves every page (the half already there is
    // not selected twice: it stays on the device and counts as resident).
    let rep = dev.migrate_to_device(r.range()).unwrap();
    assert_eq!(rep.migrated, back);
    assert!(rep.skipped.iter().all(|(_, why)| matches!(why, SkipReason::NotSelected(_))));
    assert_eq!(dev.stats().pages_resident, NPAGES as u64, "cpages = 1024 on the device");
    let (bytes, _) = dev.read(r.range()).unwrap();
    check_index(&bytes, 0);
}

#[test]
fn migrate_release() {
    if common::skip_without_uffd() {
        return;
    }
    let (_hmm, dev, r) = indexed_range();
    assert_eq!(dev.migrate_to_device(r.range()).unwrap().migrated, NPAGES);
    dev.release().unwrap();
    assert_eq!(dev.stats().pages_resident, 0);
    assert_eq!(dev.stats().pages_freed, NPAGES as u64, "page_free for every page");
    assert!(r.residencies().iter().all(|x| *x == Residency::System));
    let mut cpu = vec![0u8; r.len()];
    r.read(0, &mut cpu).unwrap();
    check_index(&cpu, 0);
    assert_eq!(r.stats().cpu_faults, 0, "release brought every page back before the touch");
}

#[test]
fn migrate_shared() {
    if common::skip_without_uffd() {
        return;
    }
    let hmm = Hmm::new().unwrap();
    let m = hmm::os::mm::Mapping::shared_anonymous(
        NPAGES * PAGE_SIZE,
        hmm::os::mm::Protection::ReadWrite,
    )
    .unwrap();
    m.fill(0, PAGE_SIZE, 0x5a).unwrap();
    let range = m.range();
    let err = hmm.adopt(m).unwrap_err();
    assert!(
        matches!(&err, hmm::HmmError::Adopt { reason: hmm::AdoptRefusal::Shared, range: r } if *r == range),
        "{err}"
    );
    assert!(err.to_string().contains("shared memory"), "{err}");
}

#[test]
fn migrate_multiple() {
    if common::skip_without_uffd() {
        return;
    }
    let hmm = Hmm::new().unwrap();
    let dev = device(&hmm, NPAGES);
    let r = hmm.alloc(NPAGES * PAGE_SIZE).unwrap();
    for round in 0..10u64 {
        for i in 0..NPAGES {
            r.write(i * PAGE_SIZE, &(i as u64 + round * 1000).to_ne_bytes()).unwrap();
        }
        let rep = dev.migrate_to_device(r.range()).unwrap();
        assert_eq!(rep.migrated, NPAGES, "round {round}: {:?}", rep.skipped);
        let (bytes, _) = dev.read(r.range()).unwrap();
        for i in 0..NPAGES {
            let w = u64::from_ne_bytes(bytes[i * PAGE_SIZE..i * PAGE_SIZE + 8].try_into().unwrap());
            assert_eq!(w, i as u64 + round * 1000, "round {round} page {i}");
        }
        bring_back(&dev, &r);
    }
    assert_eq!(dev.stats().migrated_to_device, 10 * NPAGES as u64);
}

fn huge_region(hmm: &Hmm) -> hmm::ManagedRange {
    hmm.alloc_huge(hmm::HUGE_PAGE_SIZE).unwrap()
}

#[test]
fn migrate_anon_huge_empty() {
    if common::skip_without_uffd() {
        return;
    }
    let hmm = Hmm::new().unwrap();
    let dev = device(&hmm, 512);
    let r = huge_region(&hmm);
    r.protect(r.range(), hmm::os::mm::Protection::Read).unwrap();
    let rep = dev.migrate_to_device(r.range()).unwrap();
    assert_eq!(rep.migrated, 512, "{:?}", rep.skipped.first());
    let (bytes, _) = dev.read(r.range()).unwrap();
    assert!(bytes.iter().all(|b| *b == 0));
    let mut cpu = vec![1u8; r.len()];
    r.read(0, &mut cpu).unwrap();
    assert!(cpu.iter().all(|b| *b == 0));
}

#[test]
fn migrate_anon_huge_zero() {
    if common::skip_without_uffd() {
        return;
    }
    let hmm = Hmm::new().unwrap();
    let dev = device(&hmm, 512);
    let r = huge_region(&hmm);
    // Read every page: the zero page backs the region.
    for i in 0..512 {
        assert_eq!(r.touch_read(i * PAGE_SIZE).unwrap(), 0);
    }
    let rep = dev.migrate_to_device(r.range()).unwrap();
    assert_eq!(rep.migrated, 512, "{:?}", rep.skipped.first());
    let (bytes, _) = dev.read(r.range()).unwrap();
    assert!(bytes.iter().all(|b| *b == 0));
    let mut cpu = vec![1u8; r.len()];
    r.read(0, &mut cpu).unwrap();
    assert!(cpu.iter().all(|b| *b == 0));
    bring_back(&dev, &r);
    assert!(r.residencies().iter().all(|x| *x == Residency::System));
}

#[test]
fn migrate_anon_huge_err() {
    if common::skip_without_uffd() {
        return;
    }
    let hmm = Hmm::new().unwrap();
    let dev = device(&hmm, 512);
    let r = huge_region(&hmm);
    fill_index(&r);
    dev.fail_next_alloc();
    let rep = dev.migrate_to_device(r.range()).unwrap();
    assert_eq!(rep.migrated, 0);
    assert_eq!(rep.count(&SkipReason::NoDeviceMemory), 512);
    assert!(r.residencies().iter().all(|x| *x == Residency::System), "sources restored");
    let mut cpu = vec![0u8; r.len()];
    r.read(0, &mut cpu).unwrap();
    check_index(&cpu, 0);
    // The next try succeeds; then the way back fails once and is retried.
    assert_eq!(dev.migrate_to_device(r.range()).unwrap().migrated, 512);
    dev.fail_next_copies_to_system(1);
    r.read(0, &mut cpu).unwrap();
    check_index(&cpu, 0);
    assert!(hmm.fault_stats().1 >= 1, "the starved fault-back was retried");
}

#[test]
fn migrate_mixed() {
    if common::skip_without_uffd() {
        return;
    }
    let hmm = Hmm::new().unwrap();
    let d0 = device(&hmm, 16);
    let d1 = device(&hmm, 16);
    let r = hmm.alloc(6 * PAGE_SIZE).unwrap();
    let p = |i, n| r.pages_range(i, n).unwrap();
    let invalid = |e: HmmError| assert!(matches!(e, HmmError::InvalidRange { .. }), "{e}");
    // An inaccessible range.
    r.protect(r.range(), Protection::None).unwrap();
    invalid(d1.migrate_to_device(r.range()).unwrap_err());
    r.protect(r.range(), Protection::ReadWrite).unwrap();
    // A range with a hole.
    r.unmap(p(1, 1)).unwrap();
    invalid(d1.migrate_to_device(p(0, 3)).unwrap_err());
    // Page 2 the zero page, read-only; page 3 read-only; pages 4-5 read-write.
    assert_eq!(r.touch_read(2 * PAGE_SIZE).unwrap(), 0);
    for i in 3..6 {
        r.fill(i * PAGE_SIZE, PAGE_SIZE, i as u8).unwrap();
    }
    r.protect(p(2, 2), Protection::Read).unwrap();
    let rep = d1.migrate_to_device(p(2, 4)).unwrap();
    assert_eq!(rep.migrated, 4, "{:?}", rep.skipped);
    for i in 2..6 {
        assert!(matches!(r.residency(i), Residency::Device(x) if x.dev == d1.memory().id()));
    }
    let (bytes, _) = d1.read(p(2, 4)).unwrap();
    let want: Vec<u8> = [0u8, 3, 4, 5].iter().flat_map(|b| vec![*b; PAGE_SIZE]).collect();
    assert!(bytes == want, "device 1 holds the data");
    // Device 0 asked to migrate a page that lives on device 1: nothing moves,
    // and the report says why.
    let rep = d0.migrate_to_device(p(5, 1)).unwrap();
    assert_eq!(rep.migrated, 0);
    match &rep.skipped[..] {
        [(_, SkipReason::NotSelected(why))] => assert!(why.contains("device"), "{why}"),
        other => panic!("{other:?}"),
    }
    // The CPU reads every page back, the read-only ones included.
    let mut page = vec![9u8; PAGE_SIZE];
    for i in 2..6 {
        r.read(i * PAGE_SIZE, &mut page).unwrap();
        assert!(page.iter().all(|b| usize::from(*b) == if i == 2 { 0 } else { i }), "page {i}");
    }
    if coherent() {
        // Read in place; then back explicitly, the read-only pages included.
        // (Not over the hole at page 1: as a migration to a device, that is
        // refused.)
        invalid(d1.migrate_to_system(r.range()).unwrap_err());
        let rep = d1.migrate_to_system(p(2, 4)).unwrap();
        assert_eq!(rep.migrated, 4, "{:?}", rep.skipped);
    }
    // Pages 3-5 come back with page 2's window, after its read returned.
    settle(&hmm);
    assert_eq!(d1.stats().pages_resident, 0);
}

/// Pages of `range` the CPU page table maps (present), from `/proc/self/pagemap`.
fn present_pages(range: hmm::PageRange) -> usize {
    hmm::os::pagemap::Pagemap::open()
        .unwrap()
        .entries(range)
        .unwrap()
        .iter()
        .filter(|e| e.present())
        .count()
}

/// A huge region holding [`fill_index`] data, migrated whole to a fresh device.
fn migrated_huge_region() -> (Hmm, SoftwareDevice, hmm::ManagedRange) {
    let hmm = Hmm::new().unwrap();
    let dev = device(&hmm, 512);
    let r = huge_region(&hmm);
    fill_index(&r);
    assert_eq!(dev.migrate_to_device(r.range()).unwrap().migrated, 512);
    (hmm, dev, r)
}

#[test]
fn migrate_anon_huge_fault() {
    if common::skip_without_uffd() {
        return;
    }
    let (_hmm, dev, r) = migrated_huge_region();
    // A fresh device gives the block one aligned run of 512 pages: a huge
    // device page, reported with its order.
    let s = dev.snapshot(r.range()).unwrap();
    for (i, p) in s.iter().enumerate() {
        assert!(p.device_local && p.access == SnapshotAccess::Write, "page {i}: {p:?}");
        assert_eq!(p.order, 9, "page {i} is part of a 2 MiB device page");
    }
    assert_eq!(present_pages(r.range()), 0, "the CPU page table maps none of it");
    // The CPU touches it: it faults back with its data.
    check_index(&cpu_bytes(&r), 0);
    assert!(r.residencies().iter().all(|x| *x == Residency::System));
    assert_eq!(present_pages(r.range()), 512);
    drop(r);
    nothing_left(&dev);
}

#[test]
fn migrate_anon_huge_free() {
    if common::skip_without_uffd() {
        return;
    }
    let (_hmm, dev, r) = migrated_huge_region();
    let (bytes, _) = dev.read(r.range()).unwrap();
    check_index(&bytes, 0);
    assert_eq!(dev.stats().pages_resident, 512);
    r.advise(r.range(), hmm::os::mm::Advise::Free).unwrap();
    // MADV_FREE reaches hmm as the kernel's remove event: the device pages go.
    common::eventually("the device pages freed", || dev.stats().pages_resident == 0);
    assert!(r.residencies().iter().all(|x| *x == Residency::None));
    assert!(cpu_bytes(&r).iter().all(|b| *b == 0), "freed memory reads as zeros");
}

// ---- mirroring: device accesses through the device's page table ---------------------

use hmm::os::mm::{Mapping, Protection};
use hmm::{HmmError, RangeFaultError};
use hmm_swdev::SnapshotAccess;

/// Bytes of `pages` pages in which page `i` holds the word `i + add` repeated.
fn index_bytes(pages: usize, add: u64) -> Vec<u8> {
    (0..pages)
        .flat_map(|i| ((i as u64).wrapping_add(add)).to_ne_bytes().repeat(PAGE_SIZE / 8))
        .collect()
}

use common::cpu_bytes;

fn is_permission_denied(e: &HmmError) -> bool {
    matches!(e, HmmError::Fault(RangeFaultError::PermissionDenied { .. }))
}

/// Opening and closing a device leaves nothing behind: its notifier, and
/// the worker threads of a copying engine. Counted in a child process, where
/// no other test starts or ends threads meanwhile.
#[test]
fn open_close() {
    if common::skip_without_uffd() {
        return;
    }
    let _fork = common::fork_lock();
    let out = hmm::os::process::run_in_child(common::CHILD_LIMIT, || {
        let threads = || std::fs::read_dir("/proc/self/task").map_or(0, |d| d.count());
        let Ok(hmm) = Hmm::new() else { return 2 };
        let before = (threads(), hmm.notifier_count());
        {
            let dev = device(&hmm, NPAGES);
            if hmm.notifier_count() != before.1 + 1 {
                return 3; // the device mirrors the address space
            }
            let Ok(r) = hmm.alloc(4 * PAGE_SIZE) else { return 2 };
            if r.fill(0, r.len(), 7).is_err() {
                return 2;
            }
            match dev.read(r.range()) {
                Ok((b, _)) if b.iter().all(|x| *x == 7) => {}
                _ => return 4,
            }
        }
        if hmm.notifier_count() != before.1 {
            return 5; // the notifier left with the device
        }
        {
            let config = SoftwareDeviceConfig::new("sw-copy", NPAGES * PAGE_SIZE);
            let Ok(_dev) = SoftwareDevice::new(&hmm, config.with_copy_engine(2)) else { return 2 };
            if threads() < before.0 + 2 {
                return 6;
            }
        }
        // A joined thread leaves /proc/self/task a moment after the join
        // returns (the kernel clears its id first): give it 10 s.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while threads() != before.0 {
            if std::time::Instant::now() > deadline {
                return 7; // a copy-engine thread was left
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        0
    })
    .unwrap();
    assert_eq!(
        out,
        hmm::os::process::ChildOutcome::Exited(0),
        "2: set-up, 3/5: notifier count, 4: device read, 6/7: engine threads"
    );
}

#[test]
fn anon_read() {
    if common::skip_without_uffd() {
        return;
    }
    let hmm = Hmm::new().unwrap();
    let dev = device(&hmm, NPAGES);
    let r = hmm.alloc(NPAGES * PAGE_SIZE).unwrap();
    // Page 0 never touched, page 1 only read, the rest hold their index.
    let data = index_bytes(NPAGES, 0);
    r.write(2 * PAGE_SIZE, &data[2 * PAGE_SIZE..]).unwrap();
    assert_eq!(r.touch_read(PAGE_SIZE).unwrap(), 0);
    r.protect(r.range(), Protection::Read).unwrap();
    let (bytes, c) = dev.read(r.range()).unwrap();
    assert_eq!(c.cpages, NPAGES as u64);
    assert_eq!(c.faults, 1, "one batched device fault for the whole range");
    assert!(bytes[..2 * PAGE_SIZE].iter().all(|b| *b == 0));
    assert_eq!(&bytes[2 * PAGE_SIZE..], &data[2 * PAGE_SIZE..]);
    // The entries are read-only: the mapping is.
    assert!(dev.entry(r.addr()).is_some_and(|e| !e.write && e.page.is_none()));
}

#[test]
fn anon_read_prot() {
    if common::skip_without_uffd() {
        return;
    }
    let hmm = Hmm::new().unwrap();
    let dev = device(&hmm, NPAGES);
    let r = hmm.alloc(NPAGES * PAGE_SIZE).unwrap();
    let data = index_bytes(NPAGES, 0);
    r.write(0, &data).unwrap();
    r.protect(r.range(), Protection::None).unwrap();
    let err = dev.read(r.range()).unwrap_err();
    assert!(
        matches!(err, HmmError::Fault(RangeFaultError::Fault { addr, .. }) if addr == r.addr()),
        "{err}"
    );
    assert_eq!(dev.mirror_stats().entries, 0, "the device saw nothing");
    r.protect(r.range(), Protection::ReadWrite).unwrap();
    assert_eq!(cpu_bytes(&r), data, "CPU data intact");
}

#[test]
fn anon_write() {
    if common::skip_without_uffd() {
        return;
    }
    let hmm = Hmm::new().unwrap();
    let dev = device(&hmm, NPAGES);
    let r = hmm.alloc(NPAGES * PAGE_SIZE).unwrap();
    let data = index_bytes(NPAGES, 0);
    let c = dev.write(r.addr(), &data).unwrap();
    assert_eq!(c.cpages, NPAGES as u64);
    assert_eq!(c.faults, 1);
    assert_eq!(cpu_bytes(&r), data);
}

#[test]
fn anon_write_huge() {
    if common::skip_without_uffd() {
        return;
    }
    let hmm = Hmm::new().unwrap();
    let dev = device(&hmm, 512);
    let r = huge_region(&hmm);
    let data = index_bytes(512, 0);
    let c = dev.write(r.addr(), &data).unwrap();
    assert_eq!(c.cpages, 512);
    assert_eq!(c.faults, 1);
    assert_eq!(cpu_bytes(&r), data);
    // Where the kernel had a huge page for the block, the snapshot says so.
    let s = dev.snapshot(r.range()).unwrap();
    assert!(s.iter().all(|p| p.access == SnapshotAccess::Write && !p.device_local));
    let huge = s.iter().filter(|p| p.order == 9).count();
    assert!(huge == 0 || huge == 512, "one block, one order: {huge} pages huge");
    if huge == 0 {
        eprintln!("anon_write_huge: no transparent huge page was had for the block (order 0)");
    }
    drop(r);
    nothing_left(&dev);
}

/// Once the memory a scenario used is gone, the device holds nothing of it:
/// no device page and no page-table entry.
fn nothing_left(dev: &SoftwareDevice) {
    common::eventually("the device's pages and entries all gone", || {
        dev.stats().pages_resident == 0 && dev.mirror_stats().entries == 0
    });
}

/// A private hugetlb mapping of `len` bytes, from a hugetlb memfd.
fn hugetlb_mapping(len: usize) -> Mapping {
    let fd = hmm::os::mm::Memfd::create(c"hmm-hugetlb", len as u64, true).unwrap();
    fd.map(0, len, Protection::ReadWrite, false).unwrap()
}

#[test]
fn anon_write_hugetlbfs() {
    if common::skip_without_uffd() {
        return;
    }
    let Some(_pages) = common::reserve_hugetlb(1) else { return };
    let hmm = Hmm::new().unwrap();
    let dev = device(&hmm, 16);
    let m = hmm.mirror(hugetlb_mapping(hmm::HUGE_PAGE_SIZE)).unwrap();
    let data = index_bytes(512, 0);
    let c = dev.write(m.range().start(), &data).unwrap();
    assert_eq!((c.cpages, c.faults), (512, 1));
    let mut back = vec![0u8; data.len()];
    m.mapping().read(0, &mut back).unwrap();
    assert!(back == data, "the CPU reads what the device wrote");
    let s = dev.snapshot(m.range()).unwrap();
    assert!(s.iter().all(|p| p.order == 9 && p.access == SnapshotAccess::Write));
    drop(m);
    nothing_left(&dev);
}

#[test]
fn compound() {
    if common::skip_without_uffd() {
        return;
    }
    let Some(_pages) = common::reserve_hugetlb(1) else { return };
    let hmm = Hmm::new().unwrap();
    let dev = device(&hmm, 16);
    let m = hmm.mirror(hugetlb_mapping(hmm::HUGE_PAGE_SIZE)).unwrap();
    m.mapping().fill(0, hmm::HUGE_PAGE_SIZE, 7).unwrap();
    let s = dev.snapshot(m.range()).unwrap();
    assert!(s.iter().all(|p| p.access == SnapshotAccess::Write && p.order == 9), "{:?}", s[0]);
    m.protect(m.range(), Protection::Read).unwrap();
    let s = dev.snapshot(m.range()).unwrap();
    assert!(s.iter().all(|p| p.access == SnapshotAccess::Read && p.order == 9), "{:?}", s[0]);
    drop(m);
    nothing_left(&dev);
}

#[test]
fn anon_write_prot() {
    if common::skip_without_uffd() {
        return;
    }
    let hmm = Hmm::new().unwrap();
    let dev = device(&hmm, NPAGES);
    let r = hmm.alloc(NPAGES * PAGE_SIZE).unwrap();
    r.protect(r.range(), Protection::Read).unwrap();
    let (page, c) = dev.read(r.pages_range(0, 1).unwrap()).unwrap();
    assert_eq!((c.cpages, c.faults), (1, 1));
    assert!(page.iter().all(|b| *b == 0));
    let data = index_bytes(NPAGES, 0);
    let err = dev.write(r.addr(), &data).unwrap_err();
    assert!(is_permission_denied(&err), "{err}");
    assert!(cpu_bytes(&r).iter().all(|b| *b == 0), "memory unchanged");
    r.protect(r.range(), Protection::ReadWrite).unwrap();
    let c = dev.write(r.addr(), &data).unwrap();
    assert_eq!(c.cpages, NPAGES as u64);
    assert_eq!(cpu_bytes(&r), data);
}

#[test]
fn anon_read_multiple() {
    if common::skip_without_uffd() {
        return;
    }
    let hmm = Hmm::new().unwrap();
    let dev = device(&hmm, NPAGES);
    for round in 0..10u64 {
        let r = hmm.alloc(NPAGES * PAGE_SIZE).unwrap();
        let data = index_bytes(NPAGES, round);
        r.write(0, &data).unwrap();
        let (bytes, c) = dev.read(r.range()).unwrap();
        assert_eq!((c.cpages, c.faults), (NPAGES as u64, 1), "round {round}");
        assert_eq!(bytes, data, "round {round}");
    }
}

#[test]
fn snapshot() {
    if common::skip_without_uffd() {
        return;
    }
    let hmm = Hmm::new().unwrap();
    let dev0 = device(&hmm, 16);
    let dev1 = device(&hmm, 16);
    let r = hmm.alloc(7 * PAGE_SIZE).unwrap();
    let p = |i| r.pages_range(i, 1).unwrap();
    for i in [3, 4, 5, 6] {
        r.fill(i * PAGE_SIZE, PAGE_SIZE, i as u8).unwrap();
    }
    assert_eq!(r.touch_read(2 * PAGE_SIZE).unwrap(), 0);
    r.protect(p(0), Protection::None).unwrap();
    r.unmap(p(1)).unwrap();
    r.protect(p(2), Protection::Read).unwrap();
    r.protect(p(3), Protection::Read).unwrap();
    assert_eq!(dev0.migrate_to_device(p(5)).unwrap().migrated, 1);
    assert_eq!(dev1.migrate_to_device(p(6)).unwrap().migrated, 1);
    // The unmap is reported by an event: wait until hmm has read it.
    common::eventually("the unmap event", || r.residency(1) == Residency::Unmapped);
    let s = dev0.snapshot(r.range()).unwrap();
    let access: Vec<SnapshotAccess> = s.iter().map(|x| x.access).collect();
    use SnapshotAccess::*;
    assert!(s[2].zero && !s[3].zero, "page 2 is the zero page");
    assert!(s[5].device_local, "page 5 is device 0's own");
    if coherent() {
        // Coherent local + write, coherent remote + write.
        assert_eq!(access, [Error, Error, Read, Read, Write, Write, Write]);
        assert!(s[5].coherent && s[6].coherent && !s[6].device_local);
        assert!(!s[4].coherent);
    } else {
        assert_eq!(access, [Error, Error, Read, Read, Write, Write, None]);
        assert!(!s[6].device_local, "another device's private page is not mapped");
        assert!(s.iter().all(|x| !x.coherent));
    }
    assert!(s.iter().all(|x| x.order == 0));
    // A snapshot faults nothing: page 6 is still device 1's.
    assert!(
        matches!(r.residency(6), Residency::Device(p) if p.dev == dev1.memory().id()),
        "{:?}",
        r.residency(6)
    );
}

#[test]
fn exclusive() {
    if common::skip_without_uffd() {
        return;
    }
    let (_hmm, dev, r) = indexed_range();
    let c = dev.make_exclusive(r.range()).unwrap();
    assert_eq!(c.cpages, NPAGES as u64);
    assert!(dev.check_exclusive(r.range()).is_err(), "held exclusively now");
    let (bytes, _) = dev.read(r.range()).unwrap();
    check_index(&bytes, 0);
    // The CPU increments every integer: each touch revokes the device's access.
    let mut cpu = cpu_bytes(&r);
    for w in cpu.chunks_mut(8) {
        let v = u64::from_ne_bytes(w.try_into().unwrap()) + 1;
        w.copy_from_slice(&v.to_ne_bytes());
    }
    r.write(0, &cpu).unwrap();
    dev.check_exclusive(r.range()).unwrap();
    assert_eq!(cpu_bytes(&r), index_bytes(NPAGES, 1));
}

#[test]
fn exclusive_mprotect() {
    if common::skip_without_uffd() {
        return;
    }
    let (_hmm, dev, r) = indexed_range();
    dev.make_exclusive(r.range()).unwrap();
    r.protect(r.range(), Protection::Read).unwrap();
    let err = dev.write(r.addr(), &index_bytes(NPAGES, 5)).unwrap_err();
    assert!(is_permission_denied(&err), "{err}");
    check_index(&cpu_bytes(&r), 0);
}

/// An `mprotect` hmm never sees (made on the mapping directly) must not let the
/// device write, whether its writable entry maps one of its own pages or a
/// system page.
#[test]
fn unobserved_mprotect_blocks_device_writes() {
    if common::skip_without_uffd() {
        return;
    }
    let (_hmm, dev, r) = indexed_range();
    let half = NPAGES / 2;
    // First half: the device's own pages; second half: system pages.
    dev.make_exclusive(r.pages_range(0, half).unwrap()).unwrap();
    dev.write(r.addr(), &index_bytes(NPAGES, 0)).unwrap();
    assert!(dev.entry(r.addr()).is_some_and(|e| e.write && e.page.is_some()));
    let sys = r.pages_range(half, 1).unwrap().start();
    assert!(dev.entry(sys).is_some_and(|e| e.write && e.page.is_none()));
    let invalidations = dev.mirror_stats().invalidations;
    r.mapping().protect(r.range(), Protection::Read).unwrap();
    assert_eq!(dev.mirror_stats().invalidations, invalidations, "hmm did not see it");
    for part in [r.pages_range(0, 1).unwrap(), r.pages_range(half, 1).unwrap()] {
        let err = dev.write(part.start(), &vec![0xEE; PAGE_SIZE]).unwrap_err();
        assert!(is_permission_denied(&err), "{part}: {err}");
    }
    check_index(&cpu_bytes(&r), 0);
}

/// A device whose entry for a system page outlives the application's
/// access to it (an `mprotect` hmm never sees) gets an error from a read,
/// and the process no signal: the device's copy stops at the page.
#[test]
fn unobserved_mprotect_fails_device_reads_without_a_signal() {
    if common::skip_without_uffd() {
        return;
    }
    let (_hmm, dev, r) = indexed_range();
    let (bytes, _) = dev.read(r.range()).unwrap();
    assert_eq!(bytes, index_bytes(NPAGES, 0));
    let page = r.pages_range(1, 1).unwrap();
    assert!(dev.entry(page.start()).is_some_and(|e| e.page.is_none()), "a system entry");
    r.mapping().protect(page, Protection::None).unwrap();
    let err = dev.read(r.pages_range(0, 3).unwrap()).unwrap_err();
    assert!(
        matches!(&err, HmmError::Fault(RangeFaultError::Fault { addr, .. }) if *addr == page.start()),
        "the kernel's -EFAULT for the protected page: {err}"
    );
    r.mapping().protect(page, Protection::ReadWrite).unwrap();
    let (bytes, _) = dev.read(r.range()).unwrap();
    assert_eq!(bytes, index_bytes(NPAGES, 0), "readable again, unchanged");
}

/// A device may read any memory of the process, not only what hmm manages;
/// it may write only what hmm manages or mirrors.
#[test]
fn mirror_unmanaged_memory() {
    if common::skip_without_uffd() {
        return;
    }
    let hmm = Hmm::new().unwrap();
    let dev = device(&hmm, 16);
    let m = Mapping::anonymous(8 * PAGE_SIZE, Protection::ReadWrite).unwrap();
    m.write(0, &index_bytes(8, 3)).unwrap();
    let (bytes, c) = dev.read(m.range()).unwrap();
    assert_eq!(bytes, index_bytes(8, 3));
    assert_eq!(c.faults, 1);
    let err = dev.write(m.addr(), &[1u8; 8]).unwrap_err();
    assert!(matches!(err, HmmError::NotWritable(_)), "{err}");
    let mirrored = hmm.mirror(m).unwrap();
    dev.write(mirrored.range().start(), &index_bytes(8, 9)).unwrap();
    let mut back = vec![0u8; 8 * PAGE_SIZE];
    mirrored.mapping().read(0, &mut back).unwrap();
    assert_eq!(back, index_bytes(8, 9));
    // Dropping it invalidates the device's entries.
    let addr = mirrored.range().start();
    assert!(dev.entry(addr).is_some());
    drop(mirrored);
    assert!(dev.entry(addr).is_none());
}

fn temp_file(len: usize, fill: impl Fn(usize) -> u8) -> std::fs::File {
    use std::io::Write;
    let mut f = tempfile_in_tmp();
    let data: Vec<u8> = (0..len).map(fill).collect();
    f.write_all(&data).unwrap();
    f.flush().unwrap();
    f
}

fn tempfile_in_tmp() -> std::fs::File {
    let path = std::env::temp_dir().join(format!(
        "hmm-scenario-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    std::fs::remove_file(&path).unwrap();
    f
}

#[test]
fn file_read() {
    if common::skip_without_uffd() {
        return;
    }
    use std::os::fd::AsFd;
    let hmm = Hmm::new().unwrap();
    let dev = device(&hmm, 16);
    let len = 16 * PAGE_SIZE;
    let f = temp_file(len, |i| (i % 251) as u8);
    // Mirrored through hmm, so that its unmap reaches the device's page table.
    let m = hmm.mirror(Mapping::file(f.as_fd(), 0, len, Protection::Read, true).unwrap()).unwrap();
    let (bytes, c) = dev.read(m.range()).unwrap();
    assert_eq!((c.cpages, c.faults), (16, 1));
    assert!(bytes.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8));
    drop(m);
    nothing_left(&dev);
}

#[test]
fn file_write() {
    if common::skip_without_uffd() {
        return;
    }
    use std::os::fd::AsFd;
    use std::os::unix::fs::FileExt;
    let hmm = Hmm::new().unwrap();
    let dev = device(&hmm, 16);
    let len = 16 * PAGE_SIZE;
    let f = temp_file(len, |_| 0);
    let m =
        hmm.mirror(Mapping::file(f.as_fd(), 0, len, Protection::ReadWrite, true).unwrap()).unwrap();
    let data = index_bytes(16, 77);
    let c = dev.write(m.range().start(), &data).unwrap();
    assert_eq!((c.cpages, c.faults), (16, 1));
    let mut through_mapping = vec![0u8; len];
    m.mapping().read(0, &mut through_mapping).unwrap();
    assert_eq!(through_mapping, data);
    let mut through_pread = vec![0u8; len];
    f.read_exact_at(&mut through_pread, 0).unwrap();
    assert_eq!(through_pread, data, "the page cache has the device's writes");
    drop(m);
    nothing_left(&dev);
}

/// A private file mapping the CPU wrote to moves to the device whole: hmm
/// turns it into anonymous memory with the same contents first (the file's
/// bytes where the CPU did not write, the CPU's where it did); the file is
/// not changed.
#[test]
fn migrate_file_private() {
    if common::skip_without_uffd() {
        return;
    }
    let _fork = common::fork_lock();
    use std::os::fd::AsFd;
    use std::os::unix::fs::FileExt;
    let hmm = Hmm::new().unwrap();
    let dev = device(&hmm, 32);
    let pages = 16;
    let len = pages * PAGE_SIZE;
    let f = temp_file(len, |i| (i % 251) as u8);
    let m = Mapping::file(f.as_fd(), 0, len, Protection::ReadWrite, false).unwrap();
    let at = m.addr();
    // The CPU writes every other page; the rest still come from the file.
    let mut want: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
    for p in (0..pages).step_by(2) {
        let bytes = vec![p as u8 ^ 0x5A; PAGE_SIZE];
        m.write(p * PAGE_SIZE, &bytes).unwrap();
        want[p * PAGE_SIZE..(p + 1) * PAGE_SIZE].copy_from_slice(&bytes);
    }
    let r = hmm.adopt(m).unwrap();
    assert_eq!(r.addr(), at, "the memory stays at its address");
    let report = dev.migrate_to_device(r.range()).unwrap();
    assert_eq!(report.migrated, pages, "every page moves: {report:?}");
    assert_eq!(dev.stats().pages_resident, pages as u64);
    let (on_device, _) = dev.read(r.range()).unwrap();
    assert_eq!(on_device, want, "the device has the data");
    assert_eq!(cpu_bytes(&r), want, "the CPU reads every page back");
    let mut file = vec![0u8; len];
    f.read_exact_at(&mut file, 0).unwrap();
    assert!(file.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8), "the file is unchanged");
    drop(r);
    assert_eq!(dev.stats().pages_resident, 0);

    // A read-only private file mapping is refused with the reason, as any
    // read-only memory is.
    let ro = Mapping::file(f.as_fd(), 0, len, Protection::Read, false).unwrap();
    let e = hmm.adopt(ro).unwrap_err();
    assert!(matches!(&e, HmmError::Adopt { reason: hmm::AdoptRefusal::Protection, .. }), "{e}");
}

#[test]
fn foreign_uffd_read() {
    if common::skip_without_uffd() {
        return;
    }
    use hmm::os::uffd::{Features, RegisterMode, Uffd, UffdEvent, UffdOptions};
    let hmm = Hmm::new().unwrap();
    let dev = device(&hmm, 16);
    let pages = 8;
    let m = Mapping::anonymous(pages * PAGE_SIZE, Protection::ReadWrite).unwrap();
    let own = Uffd::open(UffdOptions {
        wanted: Features::NONE,
        required: Features::NONE,
        nonblocking: true,
        allow_user_mode_only: false,
    })
    .unwrap();
    own.register(&m, m.range(), RegisterMode::MISSING).unwrap();
    let fill = vec![0xABu8; PAGE_SIZE];
    let (res, events) = common::with_reader(
        &own,
        pages,
        |ev| {
            if let UffdEvent::PageFault { addr, .. } = ev {
                let page = hmm::PageRange::from_pages(addr.page_down(), 1).unwrap();
                // A copy that finds the page there already (a second fault of
                // it) wakes nobody: wake the faulting thread then.
                if own.copy(page, &fill, false, false).is_err() {
                    let _ = own.wake(page);
                }
            }
        },
        || dev.read(m.range()),
    );
    let (bytes, _) = res.unwrap();
    assert!(bytes.iter().all(|b| *b == 0xAB), "the application's handler served the device");
    assert!(!events.is_empty());
    let err = hmm.adopt(m).unwrap_err();
    assert!(matches!(&err, HmmError::Adopt { reason: hmm::AdoptRefusal::OtherUffd, .. }), "{err}");
}

/// Page `i` holds the word `-i`.
fn neg_index_bytes(pages: usize) -> Vec<u8> {
    (0..pages as u64)
        .flat_map(|i| 0u64.wrapping_sub(i).to_ne_bytes().repeat(PAGE_SIZE / 8))
        .collect()
}

/// In a forked child: a new instance and device of its own, which writes
/// `-index` over `m` (taken over with `MREMAP_DONTUNMAP`, so the child's
/// device may write it) and reads it back. The child's exit code says what
/// went wrong (0: nothing).
fn child_writes_neg_index(m: &Mapping, expect_index: bool) -> i32 {
    let Ok(h) = Hmm::new() else { return 2 };
    let d = device(&h, NPAGES);
    let Ok(mine) = m.remap_dontunmap() else { return 3 };
    let pages = mine.len() / PAGE_SIZE;
    let Ok(mine) = h.mirror(mine) else { return 4 };
    let mut inherited = vec![0u8; mine.range().len()];
    if mine.mapping().read(0, &mut inherited).is_err() {
        return 5;
    }
    if expect_index && inherited != index_bytes(pages, 0) {
        return 6;
    }
    let neg = neg_index_bytes(pages);
    if d.write(mine.range().start(), &neg).is_err() {
        return 7;
    }
    match d.read(mine.range()) {
        Ok((back, _)) if back == neg => {}
        _ => return 8,
    }
    let mut cpu = vec![0u8; neg.len()];
    if mine.mapping().read(0, &mut cpu).is_err() || cpu != neg {
        return 9;
    }
    0
}

fn anon_write_child_case(migrated: bool, huge: bool) {
    let _fork = common::fork_lock();
    let hmm = Hmm::new().unwrap();
    let dev = device(&hmm, NPAGES);
    let r = if huge {
        hmm.alloc_huge(NPAGES * PAGE_SIZE).unwrap()
    } else {
        hmm.alloc(NPAGES * PAGE_SIZE).unwrap()
    };
    fill_index(&r);
    if migrated {
        assert_eq!(dev.migrate_to_device(r.range()).unwrap().migrated, NPAGES);
    }
    let out = hmm::os::process::run_in_child(common::CHILD_LIMIT, || {
        child_writes_neg_index(r.mapping(), true)
    })
    .unwrap();
    assert_eq!(
        out,
        hmm::os::process::ChildOutcome::Exited(0),
        "migrated {migrated}, huge {huge}: see child_writes_neg_index for the code"
    );
    check_index(&cpu_bytes(&r), 0);
    let (bytes, _) = dev.read(r.range()).unwrap();
    check_index(&bytes, 0);
    drop(r);
    assert_eq!(dev.stats().pages_resident, 0);
}

#[test]
fn anon_write_child() {
    if common::skip_without("event-fork") {
        return;
    }
    for migrated in [false, true] {
        for huge in [false, true] {
            anon_write_child_case(migrated, huge);
        }
    }
}

#[test]
fn anon_write_child_shared() {
    if common::skip_without_uffd() {
        return;
    }
    let _fork = common::fork_lock();
    let m = Mapping::shared_anonymous(NPAGES * PAGE_SIZE, Protection::ReadWrite).unwrap();
    m.write(0, &index_bytes(NPAGES, 0)).unwrap();
    let out =
        hmm::os::process::run_in_child(common::CHILD_LIMIT, || child_writes_neg_index(&m, true))
            .unwrap();
    assert_eq!(out, hmm::os::process::ChildOutcome::Exited(0));
    let mut got = vec![0u8; m.len()];
    m.read(0, &mut got).unwrap();
    assert!(got == neg_index_bytes(NPAGES), "the parent reads what the child's device wrote");
}

/// System calls on device-resident pages work (the kernel's own access
/// faults them back), and pinning brings pages back and keeps them there.
/// In `FaultMode::Service`, the mode in which the kernel's accesses wait for
/// a fault (`FaultMode::InThread` gives that up: tests/inthread.rs).
#[test]
fn gup() {
    if common::skip_without_uffd() {
        return;
    }
    let hmm = service_mode();
    let dev = device(&hmm, NPAGES);
    let r = hmm.alloc(NPAGES * PAGE_SIZE).unwrap();
    fill_index(&r);
    let four = r.pages_range(0, 4).unwrap();
    assert_eq!(dev.migrate_to_device(four).unwrap().migrated, 4);
    // write(2) from pages 0 and 1 into a pipe.
    let (mut rd, wr) = std::io::pipe().unwrap();
    assert_eq!(r.mapping().write_to(0, 2 * PAGE_SIZE, &wr).unwrap(), 2 * PAGE_SIZE);
    let mut out = vec![0u8; 2 * PAGE_SIZE];
    std::io::Read::read_exact(&mut rd, &mut out).unwrap();
    check_index(&out, 0);
    // A long-term pin of pages 2 and 3, through the library.
    let pin = r.pin(r.pages_range(2, 2).unwrap()).unwrap();
    if coherent() {
        // The system call read coherent pages 0-1 in place; the pinned
        // pages came back.
        let on_dev =
            |x: &Residency| matches!(x, Residency::Device(p) if p.dev == dev.memory().id());
        assert!(r.residencies()[..2].iter().all(on_dev), "{:?}", &r.residencies()[..4]);
        assert!(r.residencies()[2..4].iter().all(|x| *x == Residency::System));
        bring_back(&dev, &r);
    }
    assert!(r.residencies()[..4].iter().all(|x| *x == Residency::System), "{:?}", r.residencies());
    let (bytes, _) = dev.read(four).unwrap();
    check_index(&bytes, 0);
    // Migration skips the pinned pages, saying why, until they are unpinned.
    let rep = dev.migrate_to_device(four).unwrap();
    assert_eq!(rep.migrated, 2);
    assert_eq!(rep.count(&SkipReason::Pinned), 2, "{:?}", rep.skipped);
    drop(pin);
    assert_eq!(dev.migrate_to_device(four).unwrap().migrated, 2);
    check_index(&cpu_bytes(&r)[..4 * PAGE_SIZE], 0);
    drop(r);
    assert_eq!(dev.stats().pages_resident, 0);
    drop(hmm);
}
