//! The conformance scenarios of `SCENARIOS.md` that concern migration and
//! fault-back, against the built-in software device with private memory.

mod common;

use hmm::{Hmm, PAGE_SIZE, Residency, SkipReason, SoftwareDevice, SoftwareDeviceConfig};

const NPAGES: usize = 1024;

fn device(hmm: &Hmm, pages: usize) -> SoftwareDevice {
    SoftwareDevice::new(hmm, SoftwareDeviceConfig::new("sw0", pages * PAGE_SIZE)).expect("device")
}

/// Page `i` holds the word `i` repeated.
fn fill_index(r: &hmm::ManagedRange) {
    for i in 0..r.pages() {
        let word = (i as u64).to_ne_bytes();
        let page: Vec<u8> = word.iter().copied().cycle().take(PAGE_SIZE).collect();
        r.write(i * PAGE_SIZE, &page).unwrap();
    }
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
    let (_hmm, dev, r) = indexed_range();
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
    assert!(r.residencies().iter().all(|x| *x == Residency::System));
}

#[test]
fn migrate_fault() {
    if common::skip_without_uffd() {
        return;
    }
    let (_hmm, dev, r) = indexed_range();
    assert_eq!(dev.migrate_to_device(r.range()).unwrap().migrated, NPAGES);
    // The CPU reads the first half: it faults back.
    let mut half = vec![0u8; r.len() / 2];
    r.read(0, &mut half).unwrap();
    check_index(&half, 0);
    assert!(r.residencies()[..NPAGES / 2].iter().all(|x| *x == Residency::System));
    assert!(r.stats().cpu_faults > 0);
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
