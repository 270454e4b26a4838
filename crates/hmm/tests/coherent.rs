//! Coherent device memory: pages the CPU maps directly once migrated.

mod common;

use hmm::{Hmm, ManagedRange, PAGE_SIZE, Residency};
use hmm_swdev::{SoftwareDevice, SoftwareDeviceConfig};

fn coherent(hmm: &Hmm, pages: usize) -> SoftwareDevice {
    SoftwareDevice::new(hmm, SoftwareDeviceConfig::coherent("cxl0", pages * PAGE_SIZE)).unwrap()
}

use common::fill_salted as fill;

/// Asserts the CPU reads what [`fill`] wrote into `r`.
fn check(r: &ManagedRange, salt: u64, who: &str) {
    common::check_salted(&common::cpu_bytes(r), 0, salt, who);
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

/// Fork keeps copy-on-write isolation with coherent pages: they go back to
/// system memory before the fork, the child sees the data of fork time, and
/// neither side's writes reach the other.
#[test]
fn fork_with_coherent_pages_isolates_parent_and_child() {
    if common::skip_without_uffd() {
        return;
    }
    let _fork = common::fork_lock();
    let hmm = Hmm::new().unwrap();
    let dev = coherent(&hmm, 64);
    let r = hmm.alloc(32 * PAGE_SIZE).unwrap();
    fill(&r, 40);
    assert_eq!(dev.migrate_to_device(r.range()).unwrap().migrated, 32);
    let out = hmm::os::process::run_in_child(common::CHILD_LIMIT, || {
        // The child's view: the data at fork time, in memory of its own.
        let mut b = vec![0u8; r.len()];
        if r.mapping().read(0, &mut b).is_err() {
            return 2;
        }
        for (k, page) in b.chunks(PAGE_SIZE).enumerate() {
            if page[..8] != (k as u64 + 40).to_ne_bytes() {
                return 3;
            }
        }
        if r.mapping().write(0, &[0xEE; 64]).is_err() {
            return 4;
        }
        0
    })
    .unwrap();
    assert_eq!(out, hmm::os::process::ChildOutcome::Exited(0));
    // The parent's pages went back to system memory before the fork, and the
    // child's write stayed in the child.
    assert_eq!(on(&r, &dev), 0);
    check(&r, 40, "the parent after the child wrote");
    // The parent may use coherent memory again afterwards, once its pages
    // are its own again: a page shared with a child at fork stays
    // copy-on-write until written, and the kernel will not move it.
    fill(&r, 40);
    let rep = dev.migrate_to_device(r.range()).unwrap();
    assert_eq!(rep.migrated, 32, "{:?}", rep.skipped.first());
    r.write(0, &[1u8; 8]).unwrap();
    let (bytes, _) = dev.read(r.pages_range(0, 1).unwrap()).unwrap();
    assert_eq!(&bytes[..8], &[1u8; 8]);
}

/// A coherent device that fails loses exactly its pages: a CPU touch of one
/// is SIGBUS, and pages on another device or in system memory are intact.
#[test]
fn a_failed_coherent_device_poisons_exactly_its_pages() {
    if common::skip_without_uffd() {
        return;
    }
    let _fork = common::fork_lock();
    let out = hmm::os::process::run_in_child(common::CHILD_LIMIT, || {
        let Ok(hmm) = Hmm::new() else { return 2 };
        let cxl = coherent(&hmm, 16);
        let Ok(other) = SoftwareDevice::new(&hmm, SoftwareDeviceConfig::new("p", 16 * PAGE_SIZE))
        else {
            return 3;
        };
        let Ok(r) = hmm.alloc(8 * PAGE_SIZE) else { return 4 };
        fill(&r, 9);
        if cxl.migrate_to_device(r.pages_range(0, 4).unwrap()).map(|x| x.migrated).ok() != Some(4)
            || other.migrate_to_device(r.pages_range(4, 2).unwrap()).map(|x| x.migrated).ok()
                != Some(2)
        {
            return 5;
        }
        if cxl.fail() != 4 {
            return 6;
        }
        if r.residencies()[..4].iter().any(|x| *x != Residency::Poisoned) {
            return 7;
        }
        // Pages 4-7 (another device, system memory) are intact.
        let mut b = vec![0u8; 4 * PAGE_SIZE];
        if r.read(4 * PAGE_SIZE, &mut b).is_err() {
            return 8;
        }
        for (k, page) in b.chunks(PAGE_SIZE).enumerate() {
            if page[..8] != (k as u64 + 4 + 9).to_ne_bytes() {
                return 9;
            }
        }
        // hmm's accessor refuses a lost page; a raw CPU touch of it is
        // SIGBUS: this never returns.
        if !matches!(r.touch_read(PAGE_SIZE), Err(hmm::RangeError::Poisoned(_))) {
            return 11;
        }
        let _ = r.mapping().touch_read(PAGE_SIZE);
        10
    })
    .unwrap();
    assert_eq!(out, hmm::os::process::ChildOutcome::Signaled(7), "SIGBUS on the lost page");
}

/// Shared memory is refused for coherent memory as for private memory, and a
/// coherent region without a file for the CPU to map is refused at
/// registration, each with the reason.
#[test]
fn bad_coherent_requests_are_refused_with_the_reason() {
    if common::skip_without_uffd() {
        return;
    }
    let hmm = Hmm::new().unwrap();
    let zero_copy = SoftwareDeviceConfig {
        engine: hmm_swdev::EngineKind::ZeroCopy,
        ..SoftwareDeviceConfig::coherent("c", PAGE_SIZE)
    };
    let e = SoftwareDevice::new(&hmm, zero_copy).unwrap_err();
    assert!(e.to_string().contains("copy engine"), "{e}");
    struct NoFile;
    impl hmm::DevicePagemapOps for NoFile {
        fn page_free(&self, _: hmm::DevicePage) {}
        fn dma(&self) -> &dyn hmm::DmaEngine {
            unreachable!("never asked: registration fails first")
        }
    }
    let e = hmm
        .register_device_memory(
            hmm::DeviceMemoryConfig::coherent("c", PAGE_SIZE),
            std::sync::Arc::new(NoFile),
        )
        .unwrap_err();
    assert!(e.to_string().contains("coherent_file"), "{e}");
    let shared =
        hmm::os::mm::Mapping::shared_anonymous(PAGE_SIZE, hmm::os::mm::Protection::ReadWrite)
            .unwrap();
    let e = hmm.adopt(shared).unwrap_err();
    assert!(e.to_string().contains("shared memory"), "{e}");
}

/// The application's own `mremap` of coherent pages that the CPU maps, the
/// whole mapped area or part of it, moving or with `MREMAP_DONTUNMAP`: the
/// bytes are at the new address, which is then ordinary memory (writes there
/// reach no device page), the device pages are freed, the old part reads as
/// the kind of `mremap` says, and the rest of the range keeps its bytes. An
/// `mremap` across a mapped area's edge is refused by the kernel (`EFAULT`:
/// it spans two areas) and changes nothing.
#[test]
fn mremap_of_mapped_coherent_pages_moves_their_bytes() {
    if common::skip_without("event-remap") {
        return;
    }
    let _fork = common::fork_lock();
    let pages = 64;
    for dontunmap in [false, true] {
        for (first, count) in [(0, 48), (20, 12)] {
            let case = format!("dontunmap={dontunmap}, pages {first}..{}", first + count);
            let hmm = Hmm::new().unwrap();
            let dev = coherent(&hmm, 128);
            let r = hmm.alloc(pages * PAGE_SIZE).unwrap();
            fill(&r, 3);
            assert_eq!(dev.migrate_to_device(r.pages_range(0, 48).unwrap()).unwrap().migrated, 48);
            let part = r.pages_range(first, count).unwrap();
            let moved = if dontunmap {
                r.mapping().remap_part_dontunmap(part).unwrap()
            } else {
                r.mapping().move_part(part).unwrap()
            };
            let mut got = vec![0u8; part.len()];
            moved.read(0, &mut got).unwrap();
            common::check_salted(&got, first, 3, &case);
            common::eventually("the moved device pages freed", || {
                dev.stats().pages_resident == (48 - count) as u64
            });
            // The new address is ordinary memory: a write there reaches no
            // device page, which the pages of the range taking the freed
            // device pages would show.
            moved.fill(0, moved.len(), 0xEE).unwrap();
            let rest: Vec<usize> =
                (0..pages).filter(|p| !(first..first + count).contains(p)).collect();
            for &p in &rest {
                let range = r.pages_range(p, 1).unwrap();
                dev.migrate_to_system(range).unwrap();
                dev.migrate_to_device(range).unwrap();
            }
            for &p in &rest {
                let mut b = vec![0u8; PAGE_SIZE];
                r.read(p * PAGE_SIZE, &mut b).unwrap();
                common::check_salted(&b, p, 3, &format!("{case}: page {p}"));
            }
            moved.read(0, &mut got).unwrap();
            assert!(got.iter().all(|b| *b == 0xEE), "{case}: the new address kept its writes");
            if dontunmap {
                let mut old = vec![1u8; part.len()];
                r.read(first * PAGE_SIZE, &mut old).unwrap();
                assert!(old.iter().all(|b| *b == 0), "{case}: the old part reads as zeros");
            } else {
                common::eventually("the old part recorded unmapped", || {
                    (first..first + count).all(|p| r.residency(p) == Residency::Unmapped)
                });
            }
            drop(moved);
            drop(r);
            common::eventually("every device page freed", || dev.stats().pages_resident == 0);
        }
    }
    // Across the edge of the mapped area: refused, nothing changes.
    let hmm = Hmm::new().unwrap();
    let dev = coherent(&hmm, 128);
    let r = hmm.alloc(pages * PAGE_SIZE).unwrap();
    fill(&r, 4);
    assert_eq!(dev.migrate_to_device(r.pages_range(0, 48).unwrap()).unwrap().migrated, 48);
    let e = r.mapping().move_part(r.pages_range(40, 16).unwrap()).unwrap_err();
    assert!(e.to_string().contains("Bad address"), "{e}");
    assert_eq!(on(&r, &dev), 48);
    check(&r, 4, "after a refused mremap");
}
