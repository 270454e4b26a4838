//! The conformance scenarios of `SCENARIOS.md` that concern migration and
//! fault-back, against the built-in software device with private memory.

mod common;

use hmm::{
    Hmm, PAGE_SIZE, Residency, SkipReason, SoftwareDevice, SoftwareDeviceConfig,
};

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
    let hmm = Hmm::new().unwrap();
    let dev = device(&hmm, NPAGES);
    let r = hmm.alloc(NPAGES * PAGE_SIZE).unwrap();
    fill_index(&r);
    let rep = dev.migrate_to_device(r.range()).unwrap();
    assert_eq!(rep.migrated, NPAGES, "cpages: {:?}", rep.skipped.first());
    assert!(r.residencies().iter().all(|x| matches!(x, Residency::Device(p) if p.dev == dev.memory().id())));
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
