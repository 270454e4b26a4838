//! Coherent device memory: pages the CPU maps directly once migrated.

mod common;

use hmm::{Hmm, ManagedRange, PAGE_SIZE, Residency, SoftwareDevice, SoftwareDeviceConfig};

fn coherent(hmm: &Hmm, pages: usize) -> SoftwareDevice {
    SoftwareDevice::new(hmm, SoftwareDeviceConfig::coherent("cxl0", pages * PAGE_SIZE)).unwrap()
}

fn fill(r: &ManagedRange, salt: u64) {
    let bytes: Vec<u8> = (0..r.pages() as u64)
        .flat_map(|i| std::iter::repeat_n((i + salt).to_ne_bytes(), PAGE_SIZE / 8).flatten())
        .collect();
    r.write(0, &bytes).unwrap();
}

fn check(r: &ManagedRange, salt: u64, who: &str) {
    let mut b = vec![0u8; r.len()];
    r.read(0, &mut b).unwrap();
    for (k, page) in b.chunks(PAGE_SIZE).enumerate() {
        let want = (k as u64 + salt).to_ne_bytes();
        assert!(page.chunks(8).all(|w| w == want), "{who}: page {k} holds the wrong data");
    }
}

/// Pages of `r` that live in `dev`'s memory.
fn on(r: &ManagedRange, dev: &SoftwareDevice) -> usize {
    r.residencies()
        .iter()
        .filter(|x| matches!(x, Residency::Device(p) if p.dev == dev.memory().id()))
        .count()
}

/// Migrated pages stay mapped for the CPU: reads and writes reach device
/// memory without a fault, and the device sees the CPU's writes (and the CPU
/// the device's). Only an explicit migration brings them back.
#[test]
fn cpu_reads_and_writes_coherent_memory_without_faulting() {
    if common::skip_without_uffd() {
        return;
    }
    let _fork = common::fork_lock();
    let hmm = Hmm::new().unwrap();
    let dev = coherent(&hmm, 256);
    let r = hmm.alloc(128 * PAGE_SIZE).unwrap();
    fill(&r, 5);
    let rep = dev.migrate_to_device(r.range()).unwrap();
    assert_eq!(rep.migrated, 128, "{:?}", rep.skipped.first());
    assert_eq!(on(&r, &dev), 128);
    let faults = hmm.fault_stats().0;
    check(&r, 5, "CPU reads device memory");
    r.write(3 * PAGE_SIZE, &[0xAB; 16]).unwrap();
    assert_eq!(hmm.fault_stats().0, faults, "no CPU access faulted");
    assert_eq!(on(&r, &dev), 128, "the CPU's touches brought nothing back");
    let (bytes, _) = dev.read(r.pages_range(3, 1).unwrap()).unwrap();
    assert_eq!(&bytes[..16], &[0xAB; 16], "the device sees the CPU's write");
    dev.write(r.pages_range(4, 1).unwrap().start(), &[0xCD; 8]).unwrap();
    let mut b = [0u8; 8];
    r.read(4 * PAGE_SIZE, &mut b).unwrap();
    assert_eq!(b, [0xCD; 8], "the CPU sees the device's write");
    assert_eq!(hmm.fault_stats().0, faults);
    // Back to system memory, explicitly.
    r.write(3 * PAGE_SIZE, &3u64.wrapping_add(5).to_ne_bytes().repeat(2)).unwrap();
    r.write(4 * PAGE_SIZE, &9u64.to_ne_bytes()).unwrap();
    let rep = dev.migrate_to_system(r.range()).unwrap();
    assert_eq!(rep.migrated, 128, "{:?}", rep.skipped.first());
    assert_eq!(on(&r, &dev), 0);
    assert_eq!(dev.stats().pages_resident, 0);
    let mut b = [0u8; 8];
    r.read(4 * PAGE_SIZE, &mut b).unwrap();
    assert_eq!(u64::from_ne_bytes(b), 9);
    r.write(4 * PAGE_SIZE, &(4u64 + 5).to_ne_bytes()).unwrap();
    check(&r, 5, "back in system memory");
}

/// Ten rounds of migrate, write, verify and migrate back.
#[test]
fn coherent_round_trips_keep_every_byte() {
    if common::skip_without_uffd() {
        return;
    }
    let _fork = common::fork_lock();
    let hmm = Hmm::new().unwrap();
    let dev = coherent(&hmm, 1024);
    let r = hmm.alloc(1024 * PAGE_SIZE).unwrap();
    for round in 0..10u64 {
        fill(&r, round * 1000);
        assert_eq!(dev.migrate_to_device(r.range()).unwrap().migrated, 1024, "round {round}");
        check(&r, round * 1000, "on the device");
        let (bytes, _) = dev.read(r.pages_range(0, 2).unwrap()).unwrap();
        assert_eq!(&bytes[..8], &(round * 1000).to_ne_bytes());
        assert_eq!(dev.migrate_to_system(r.range()).unwrap().migrated, 1024, "round {round}");
        check(&r, round * 1000, "back");
    }
    assert_eq!(dev.stats().pages_resident, 0);
}

/// Read-only coherent pages come back too (the area keeps its protection).
#[test]
fn read_only_coherent_pages_come_back() {
    if common::skip_without_uffd() {
        return;
    }
    let _fork = common::fork_lock();
    let hmm = Hmm::new().unwrap();
    let dev = coherent(&hmm, 16);
    let r = hmm.alloc(4 * PAGE_SIZE).unwrap();
    fill(&r, 1);
    r.protect(r.pages_range(0, 2).unwrap(), hmm::os::mm::Protection::Read).unwrap();
    assert_eq!(dev.migrate_to_device(r.range()).unwrap().migrated, 4);
    let rep = dev.migrate_to_system(r.range()).unwrap();
    assert_eq!(rep.migrated, 4, "{:?}", rep.skipped);
    check(&r, 1, "read-only pages back");
}
