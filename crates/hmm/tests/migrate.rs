//! Migration and fault-back beyond the scenarios: integrity under concurrent
//! touches, device failure, capacity, discards, bad input, both engines.

mod common;

use std::process::Command;
use std::time::Duration;

use hmm::os::mm::{Advise, Mapping, Memfd, Protection};
use hmm::{
    AdoptRefusal, Hmm, HmmConfig, HmmError, PAGE_SIZE, PageRange, PageStatus, Residency, Selection,
    SkipReason, VirtAddr,
};
use hmm_swdev::{SoftwareDevice, SoftwareDeviceConfig};

fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut r = common::Rng(seed);
    (0..len / 8).flat_map(|_| r.next().to_ne_bytes()).collect()
}

fn integrity_with(config: SoftwareDeviceConfig) {
    let hmm = Hmm::new().unwrap();
    let pages = 2048;
    let dev = SoftwareDevice::new(&hmm, config).unwrap();
    let r = hmm.alloc(pages * PAGE_SIZE).unwrap();
    let data = random_bytes(r.len(), 0x9e37_79b9_7f4a_7c15);
    r.write(0, &data).unwrap();
    let rep = dev.migrate_to_device(r.range()).unwrap();
    assert_eq!(rep.migrated, pages);
    // Two threads touch every page in random orders, checking every byte.
    std::thread::scope(|s| {
        for t in 0..2u64 {
            let (r, data) = (&r, &data);
            s.spawn(move || {
                let mut order: Vec<usize> = (0..pages).collect();
                let mut rng = common::Rng(t + 7);
                for i in (1..pages).rev() {
                    order.swap(i, rng.next() as usize % (i + 1));
                }
                let mut buf = vec![0u8; PAGE_SIZE];
                for p in order {
                    r.read(p * PAGE_SIZE, &mut buf).unwrap();
                    assert_eq!(buf, data[p * PAGE_SIZE..(p + 1) * PAGE_SIZE], "page {p}");
                }
            });
        }
    });
    // The last fault-around windows may still be coming back: a reader can
    // read their pages as soon as they are installed, before they are
    // recorded.
    hmm.settle(Duration::from_secs(10)).unwrap();
    assert!(r.residencies().iter().all(|x| *x == Residency::System));
    assert_eq!(dev.stats().pages_resident, 0);
    assert_eq!(dev.stats().migrated_to_system, pages as u64);
}

#[test]
fn integrity_under_concurrent_fault_back_zero_copy() {
    if common::skip_without_uffd() {
        return;
    }
    integrity_with(SoftwareDeviceConfig::new("zc", 4096 * PAGE_SIZE));
}

#[test]
fn integrity_under_concurrent_fault_back_copy_engine() {
    if common::skip_without_uffd() {
        return;
    }
    integrity_with(SoftwareDeviceConfig::new("copy", 4096 * PAGE_SIZE).with_copy_engine(2));
}

#[test]
fn device_failure_poisons_only_its_pages() {
    if common::skip_without_uffd() || common::skip_without("UFFDIO_POISON") {
        return;
    }
    if std::env::var("HMM_TEST_CHILD").as_deref() == Ok("device-failure") {
        let hmm = Hmm::new().unwrap();
        let a = SoftwareDevice::new(&hmm, SoftwareDeviceConfig::new("a", 64 * PAGE_SIZE)).unwrap();
        let b = SoftwareDevice::new(&hmm, SoftwareDeviceConfig::new("b", 64 * PAGE_SIZE)).unwrap();
        let r = hmm.alloc(8 * PAGE_SIZE).unwrap();
        r.fill(0, r.len(), 0x42).unwrap();
        assert_eq!(a.migrate_to_device(r.pages_range(0, 4).unwrap()).unwrap().migrated, 4);
        assert_eq!(b.migrate_to_device(r.pages_range(4, 4).unwrap()).unwrap().migrated, 4);
        assert_eq!(a.fail(), 4);
        assert_eq!(r.residency(0), Residency::Poisoned);
        for p in 4..8 {
            assert_eq!(r.touch_read(p * PAGE_SIZE).unwrap(), 0x42);
        }
        println!("healthy-device-pages-ok");
        let v = r.touch_read(0);
        println!("unreachable: read {v:?} from a poisoned page");
        std::process::exit(0);
    }
    let _g = common::fork_lock();
    let out = common::output_within(
        Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "device_failure_poisons_only_its_pages",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("HMM_TEST_CHILD", "device-failure"),
        common::CHILD_LIMIT,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        out.status.signal(),
        Some(7),
        "SIGBUS expected; stdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("healthy-device-pages-ok"), "{stdout}");
    assert!(!stdout.contains("unreachable"), "{stdout}");
}

#[test]
fn capacity_moves_what_fits_and_loses_nothing() {
    if common::skip_without_uffd() {
        return;
    }
    let hmm = Hmm::new().unwrap();
    let dev =
        SoftwareDevice::new(&hmm, SoftwareDeviceConfig::new("small", 64 * PAGE_SIZE)).unwrap();
    let r = hmm.alloc(100 * PAGE_SIZE).unwrap();
    let data = random_bytes(r.len(), 3);
    r.write(0, &data).unwrap();
    let rep = dev.migrate_to_device(r.range()).unwrap();
    assert_eq!(rep.migrated, 64);
    assert_eq!(rep.count(&SkipReason::NoDeviceMemory), 36);
    assert!(rep.skipped.iter().all(|(_, why)| why.to_string() == "no device memory"));
    assert_eq!(dev.stats().pages_resident, 64);
    let mut back = vec![0u8; r.len()];
    r.read(0, &mut back).unwrap();
    assert!(back == data, "every byte survives");
}

#[test]
fn direct_discard_returns_device_pages() {
    if common::skip_without_uffd() {
        return;
    }
    let hmm = Hmm::new().unwrap();
    let dev = SoftwareDevice::new(&hmm, SoftwareDeviceConfig::new("d", 256 * PAGE_SIZE)).unwrap();
    let r = hmm.alloc(128 * PAGE_SIZE).unwrap();
    r.fill(0, r.len(), 0x77).unwrap();
    assert_eq!(dev.migrate_to_device(r.range()).unwrap().migrated, 128);
    // The application discards the middle half itself.
    r.advise(r.pages_range(32, 64).unwrap(), Advise::DontNeed).unwrap();
    common::eventually("device pages of the discarded part freed", || {
        dev.stats().pages_resident == 64
    });
    assert_eq!(dev.stats().pages_freed, 64);
    let mut page = vec![0u8; PAGE_SIZE];
    r.read(40 * PAGE_SIZE, &mut page).unwrap();
    assert!(page.iter().all(|b| *b == 0), "a discarded page reads as zeros");
    r.read(10 * PAGE_SIZE, &mut page).unwrap();
    assert!(page.iter().all(|b| *b == 0x77), "the rest keeps its data");
    // Dropping the range frees what is left on the device (a fault-around
    // window still in flight frees its pages when it finishes).
    drop(r);
    common::eventually("every device page freed", || dev.stats().pages_resident == 0);
}

#[test]
fn a_lazily_freed_page_written_again_keeps_its_bytes_through_migration() {
    if common::skip_without_uffd() {
        return;
    }
    let hmm = Hmm::new().unwrap();
    let dev = SoftwareDevice::new(&hmm, SoftwareDeviceConfig::new("d", 64 * PAGE_SIZE)).unwrap();
    let r = hmm.alloc(16 * PAGE_SIZE).unwrap();
    r.fill(0, r.len(), 0x11).unwrap();
    // MADV_FREE reaches hmm as a discard, but the kernel keeps the pages
    // until it needs the memory, and a write after it keeps them for good.
    r.advise(r.range(), Advise::Free).unwrap();
    r.fill(0, r.len(), 0x22).unwrap();
    assert_eq!(dev.migrate_to_device(r.range()).unwrap().migrated, 16);
    let (bytes, _) = dev.read(r.range()).unwrap();
    assert!(bytes.iter().all(|b| *b == 0x22), "the device has the bytes written after MADV_FREE");
    assert!(common::cpu_bytes(&r).iter().all(|b| *b == 0x22), "and so does the CPU");
    // A page the kernel did drop (MADV_DONTNEED) is recorded empty.
    r.advise(r.pages_range(0, 4).unwrap(), Advise::DontNeed).unwrap();
    common::eventually("the discard event", || {
        r.residencies()[..4].iter().all(|x| *x == Residency::None)
    });
}

#[test]
fn direct_munmap_returns_every_device_page() {
    if common::skip_without_uffd() {
        return;
    }
    let hmm = Hmm::new().unwrap();
    let dev = SoftwareDevice::new(&hmm, SoftwareDeviceConfig::new("d", 256 * PAGE_SIZE)).unwrap();
    let r = hmm.alloc(128 * PAGE_SIZE).unwrap();
    let data = random_bytes(r.len(), 5);
    r.write(0, &data).unwrap();
    assert_eq!(dev.migrate_to_device(r.range()).unwrap().migrated, 128);
    // The application unmaps the head and a part of the middle itself: hmm
    // hears of it only through the kernel's unmap event.
    let (head, middle) = (r.pages_range(0, 16).unwrap(), r.pages_range(50, 30).unwrap());
    r.unmap(head).unwrap();
    r.unmap(middle).unwrap();
    common::eventually("device pages of the unmapped parts freed", || {
        dev.stats().pages_resident == 82
    });
    assert_eq!(dev.stats().pages_freed, 46);
    let res = r.residencies();
    assert!(res[..16].iter().chain(&res[50..80]).all(|x| *x == Residency::Unmapped), "{res:?}");
    // The unmapped parts are refused, not read.
    let mut page = vec![0u8; PAGE_SIZE];
    assert_eq!(r.read(60 * PAGE_SIZE, &mut page), Err(hmm::RangeError::Unmapped(middle)));
    assert!(r.unmap(r.pages_range(70, 20).unwrap()).is_err(), "overlaps an unmapped part");
    // The rest faults back with its bytes.
    for p in (16..50).chain(80..128) {
        r.read(p * PAGE_SIZE, &mut page).unwrap();
        assert!(page[..] == data[p * PAGE_SIZE..(p + 1) * PAGE_SIZE], "page {p}");
    }
    // A migration over the whole range is refused, naming the first hole;
    // the mapped parts migrate.
    let e = dev.migrate_to_device(r.range()).unwrap_err();
    assert!(matches!(e, HmmError::InvalidRange { .. }), "{e}");
    assert!(
        e.to_string().contains(&format!("unmapped the range's pages at {}", head.start())),
        "{e}"
    );
    let parts = [r.pages_range(16, 34).unwrap(), r.pages_range(80, 48).unwrap()];
    assert_eq!(
        parts.iter().map(|p| dev.migrate_to_device(*p).unwrap().migrated).sum::<usize>(),
        82
    );
    // Unmapping the rest piece by piece returns every device page.
    r.unmap(r.pages_range(16, 34).unwrap()).unwrap();
    r.unmap(r.pages_range(80, 48).unwrap()).unwrap();
    common::eventually("every device page freed", || dev.stats().pages_resident == 0);
    assert_eq!(dev.stats().pages_freed, 46 + 82 + 82);
    drop(r);
    assert_eq!(dev.stats().pages_resident, 0);
}

/// The kernel lets `munmap` return once its event is read, before hmm has
/// handled it. Memory mapped and managed again at the same address meanwhile
/// must not receive the old unmap. The fault service is slowed here (a
/// notifier that sleeps when the service delivers an unmap), so the old
/// event is certainly still unhandled when the new range is adopted.
#[test]
fn a_late_unmap_event_never_lands_on_memory_managed_again_at_its_address() {
    if common::skip_without_uffd() {
        return;
    }
    let hmm = Hmm::new().unwrap();
    let pages = 8;
    let first = Mapping::anonymous(pages * PAGE_SIZE, Protection::ReadWrite).unwrap();
    let at = first.range();
    let _slow = hmm.insert_notifier(at, |inv| {
        let service = std::thread::current().name() == Some("hmm-fault");
        if service && inv.event == hmm::InvalidationEvent::Unmap {
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    let mut m = first;
    for round in 0..3u8 {
        let r = hmm.adopt(m).unwrap();
        // A first touch is served by the fault service after everything it
        // read before: had the old unmap been taken for this range, the
        // records would show it now.
        assert_eq!(r.touch_read((pages - 1) * PAGE_SIZE).unwrap(), 0);
        let res = r.residencies();
        assert!(
            res.iter().all(|x| matches!(x, Residency::None | Residency::System)),
            "round {round}: a fresh range has no unmapped pages: {res:?}"
        );
        let data = vec![round + 1; r.len()];
        r.write(0, &data).unwrap();
        let mut back = vec![0u8; r.len()];
        r.read(0, &mut back).unwrap();
        assert!(back == data, "round {round}: the range reads what was written");
        // The application unmaps a part, then the rest goes, and the address
        // is mapped again at once.
        r.unmap(r.pages_range(2, 3).unwrap()).unwrap();
        drop(r);
        m = (0..1000)
            .find_map(|_| {
                let m = Mapping::anonymous_at(at, Protection::ReadWrite).ok();
                if m.is_none() {
                    std::thread::sleep(Duration::from_millis(1));
                }
                m
            })
            .expect("the address is free again");
    }
}

#[test]
fn arena_values_migrate_and_fault_back() {
    if common::skip_without_uffd() {
        return;
    }
    struct Node<'a> {
        value: u64,
        next: Option<&'a Node<'a>>,
    }
    let hmm = Hmm::new().unwrap();
    let dev = SoftwareDevice::new(&hmm, SoftwareDeviceConfig::new("d", 4 << 20)).unwrap();
    let arena = hmm.arena(4 << 20).unwrap();
    // An ordinary linked list, built by ordinary code, in managed memory.
    let mut head: Option<&Node<'_>> = None;
    for value in 0..100_000u64 {
        head = Some(arena.alloc(Node { value: value * 3, next: head }).unwrap());
    }
    let used = arena.used().div_ceil(PAGE_SIZE);
    let rep = dev.migrate_to_device(arena.range()).unwrap();
    assert_eq!(rep.migrated, arena.range().pages(), "{:?}", rep.skipped.first());
    assert_eq!(dev.stats().pages_resident as usize, arena.range().pages());
    // Following the pointers faults every page back, with the right bytes.
    let (mut n, mut sum, mut at) = (0u64, 0u64, head);
    while let Some(node) = at {
        sum += node.value;
        n += 1;
        at = node.next;
    }
    assert_eq!((n, sum), (100_000, 3 * (99_999 * 100_000 / 2)));
    assert!(arena.owner().stats().cpu_faults > 0, "the walk faulted pages back");
    common::eventually("every used page back in system memory", || {
        arena.owner().residencies()[..used].iter().all(|r| *r == Residency::System)
    });
    // Nothing but the arena reaches its bytes.
    assert!(matches!(arena.owner().touch_read(0), Err(hmm::RangeError::Claimed(_))));
    assert!(arena.owner().unmap(arena.range()).is_err());
    // Full is an error, not a panic.
    assert!(matches!(arena.alloc_slice_with(8 << 20, |_| 0u8), Err(hmm::ArenaError::Full { .. })));
}

/// Pages of `range` mapped as part of a transparent huge page.
fn huge_pages(range: hmm::PageRange) -> usize {
    use hmm::os::pagemap::{Categories, Pagemap, ScanRequest};
    let req = ScanRequest {
        category_mask: Categories::HUGE,
        return_mask: Categories::HUGE,
        ..ScanRequest::default()
    };
    Pagemap::open().unwrap().scan(range, &req).unwrap().iter().map(|r| r.range.pages()).sum()
}

#[test]
fn huge_range_keeps_huge_pages_through_migration_and_fault_back() {
    if common::skip_without_uffd() {
        return;
    }
    huge_range_round_trip(SoftwareDeviceConfig::new("d", 8 << 20), true);
}

#[test]
fn huge_range_round_trip_on_the_copy_engine() {
    if common::skip_without_uffd() {
        return;
    }
    // Pages come back by copy (small pages); the bytes must not care.
    huge_range_round_trip(SoftwareDeviceConfig::new("d", 8 << 20).with_copy_engine(2), false);
}

fn huge_range_round_trip(config: SoftwareDeviceConfig, stays_huge: bool) {
    let hmm = Hmm::new().unwrap();
    let dev = SoftwareDevice::new(&hmm, config).unwrap();
    let r = hmm.alloc_huge(8 << 20).unwrap();
    // The first touch fills the whole 2 MiB block around it.
    r.touch_write(5 * PAGE_SIZE, 1).unwrap();
    let block = r.pages_range(0, 512).unwrap();
    assert_eq!(r.stats().zero_fills, 512, "one block filled by one fault");
    assert!(r.residencies()[..512].iter().all(|x| *x == Residency::System));
    assert!(r.residencies()[512..].iter().all(|x| *x == Residency::None));
    let data = random_bytes(r.len(), 21);
    r.write(0, &data).unwrap();
    let thp = huge_pages(block) == 512;
    if !thp {
        eprintln!("skipping the huge-page checks: the kernel gave no transparent huge page");
    }
    assert_eq!(dev.migrate_to_device(r.range()).unwrap().migrated, 2048);
    // A touch brings back its whole block, and only it.
    let faults = r.stats().cpu_faults;
    assert_eq!(r.touch_read(1024 * PAGE_SIZE + 77).unwrap(), data[1024 * PAGE_SIZE + 77]);
    // The block comes back in one migration, committed before the wake, and
    // the fault is counted before it too.
    assert!(r.residencies()[1024..1536].iter().all(|x| *x == Residency::System));
    assert_eq!(r.stats().cpu_faults, faults + 1);
    let res = r.residencies();
    assert!(res[..1024].iter().chain(&res[1536..]).all(|x| matches!(x, Residency::Device(_))));
    let mut back = vec![0u8; r.len()];
    r.read(0, &mut back).unwrap();
    assert!(back == data, "every byte back");
    if thp && stays_huge {
        assert_eq!(huge_pages(block), 512, "the block went and came back as one huge page");
    }
}

#[test]
fn dropping_hmm_brings_every_page_back() {
    if common::skip_without_uffd() {
        return;
    }
    let hmm = Hmm::new().unwrap();
    let dev = SoftwareDevice::new(&hmm, SoftwareDeviceConfig::new("d", 64 * PAGE_SIZE)).unwrap();
    let m = Mapping::anonymous(32 * PAGE_SIZE, Protection::ReadWrite).unwrap();
    let data = random_bytes(m.len(), 11);
    m.write(0, &data).unwrap();
    let r = hmm.adopt(m).unwrap();
    assert!(r.residencies().iter().all(|x| *x == Residency::System), "adopted data is seen");
    assert_eq!(dev.migrate_to_device(r.range()).unwrap().migrated, 32);
    drop(hmm);
    assert_eq!(dev.stats().pages_resident, 0);
    let mut back = vec![0u8; r.len()];
    r.read(0, &mut back).unwrap();
    assert!(back == data);
    drop(dev);
}

#[test]
fn bad_input_gets_typed_errors_and_leaves_data_alone() {
    if common::skip_without_uffd() {
        return;
    }
    let hmm = Hmm::new().unwrap();
    assert!(matches!(hmm.alloc(0), Err(HmmError::Mm(_))));
    assert!(matches!(hmm.alloc(100), Err(HmmError::Mm(_))));
    assert!(matches!(
        Hmm::with_config(HmmConfig { fault_around_pages: 4096, ..Default::default() }),
        Err(HmmError::Config(_))
    ));
    let dev = SoftwareDevice::new(&hmm, SoftwareDeviceConfig::new("d", 16 * PAGE_SIZE)).unwrap();
    let r = hmm.alloc(8 * PAGE_SIZE).unwrap();
    r.fill(0, r.len(), 9).unwrap();
    // A range that is not (wholly) managed.
    let outside = hmm::PageRange::new(r.range().start(), 16 * PAGE_SIZE).unwrap();
    let e = dev.migrate_to_device(outside).unwrap_err();
    assert!(matches!(e, HmmError::NotManaged(x) if x == outside), "{e}");
    // Unaligned addresses cannot even be expressed as a range.
    assert!(hmm::PageRange::new(hmm::VirtAddr::new(r.addr().get() + 1), PAGE_SIZE).is_err());
    // Adopting what is already managed.
    let other = Mapping::anonymous(PAGE_SIZE, Protection::ReadWrite).unwrap();
    let first = hmm.adopt(other).unwrap();
    drop(first);
    // Shared file-backed memory (a private file mapping is turned anonymous
    // and adopted: scenario `migrate_file_private`).
    let fd = Memfd::create(c"hmm-test", 4 * PAGE_SIZE as u64, false).unwrap();
    let file = fd.map(0, 4 * PAGE_SIZE, Protection::ReadWrite, true).unwrap();
    let e = hmm.adopt(file).unwrap_err();
    assert!(matches!(e, HmmError::Adopt { reason: AdoptRefusal::FileBacked(_), .. }), "{e}");
    // hugetlb memory, where the machine has huge pages reserved.
    match Memfd::create(c"hmm-huge", hmm::HUGE_PAGE_SIZE as u64, true)
        .and_then(|fd| fd.map(0, hmm::HUGE_PAGE_SIZE, Protection::ReadWrite, false))
    {
        Ok(huge) => {
            let e = hmm.adopt(huge).unwrap_err();
            assert!(matches!(e, HmmError::Adopt { .. }), "{e}");
        }
        Err(e) => eprintln!("SKIP hugetlb part: {e}"),
    }
    // Read-only memory cannot be adopted.
    let ro = Mapping::anonymous(PAGE_SIZE, Protection::Read).unwrap();
    let e = hmm.adopt(ro).unwrap_err();
    assert!(matches!(e, HmmError::Adopt { reason: AdoptRefusal::Protection, .. }), "{e}");
    // Nothing above touched the managed data.
    let mut back = vec![0u8; r.len()];
    r.read(0, &mut back).unwrap();
    assert!(back.iter().all(|b| *b == 9));
}

#[test]
fn fault_around_window_is_configurable_and_bounded_by_the_range() {
    if common::skip_without_uffd() {
        return;
    }
    let hmm = Hmm::with_config(HmmConfig { fault_around_pages: 8, ..Default::default() }).unwrap();
    let dev = SoftwareDevice::new(&hmm, SoftwareDeviceConfig::new("d", 64 * PAGE_SIZE)).unwrap();
    let r = hmm.alloc(32 * PAGE_SIZE).unwrap();
    r.fill(0, r.len(), 1).unwrap();
    assert_eq!(dev.migrate_to_device(r.range()).unwrap().migrated, 32);
    assert_eq!(r.touch_read(16 * PAGE_SIZE).unwrap(), 1);
    // The faulting page comes first and its thread resumes at once; the rest of
    // the window follows.
    let system = || r.residencies().iter().filter(|x| **x == Residency::System).count();
    common::eventually("the fault-around window is back", || system() == 8);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(system(), 8, "one fault brought back exactly its window of 8 pages");
    assert!(r.residencies()[12..20].iter().all(|x| *x == Residency::System));
    assert_eq!(r.touch_read(0).unwrap(), 1);
    let back2 = r.residencies().iter().filter(|x| **x == Residency::System).count();
    assert!(back2 <= 8 + 8, "the window at the range start does not cross it");
    assert_eq!(r.residency(0), Residency::System);
}

#[test]
fn sequential_faults_grow_the_window_ahead_and_random_ones_do_not() {
    if common::skip_without_uffd() {
        return;
    }
    let hmm = Hmm::with_config(HmmConfig { fault_around_pages: 64, ..Default::default() }).unwrap();
    let dev = SoftwareDevice::new(&hmm, SoftwareDeviceConfig::new("d", 4096 * PAGE_SIZE)).unwrap();
    let r = hmm.alloc(4096 * PAGE_SIZE).unwrap();
    r.fill(0, r.len(), 3).unwrap();
    assert_eq!(dev.migrate_to_device(r.range()).unwrap().migrated, 4096);
    let system = |a: usize, b: usize| r.residencies()[a..b].iter().all(|x| *x == Residency::System);
    let on_device = |i: usize| matches!(r.residency(i), Residency::Device(_));
    // A first fault: the configured window, centred (clipped at the range start).
    assert_eq!(r.touch_read(0).unwrap(), 3);
    common::eventually("the first window", || system(0, 64));
    assert!(on_device(64));
    // Faults at the end of the last window double it, ahead of the fault.
    let mut at = 64;
    for pages in [128, 256, 512, 512] {
        assert_eq!(r.touch_read(at * PAGE_SIZE).unwrap(), 3);
        common::eventually("the next window", || system(at, at + pages));
        assert!(on_device(at + pages), "a window of {pages} pages from page {at}, no more");
        at += pages;
    }
    assert_eq!(r.stats().cpu_faults, 5);
    // A fault elsewhere starts over with the configured window.
    assert_eq!(r.touch_read(3000 * PAGE_SIZE).unwrap(), 3);
    common::eventually("a fresh window", || system(3000 - 32, 3000 + 32));
    assert!(on_device(3000 - 33) && on_device(3000 + 32));
}

/// A migration that finds a page already held by another skips it as busy and
/// leaves it alone: the page stays held by its own migration until that one
/// ends, whatever the second does with the rest of its pages meanwhile.
#[test]
fn a_migration_never_releases_a_page_another_migration_holds() {
    if common::skip_without_uffd() {
        return;
    }
    let hmm = Hmm::new().unwrap();
    let r = hmm.alloc(4 * PAGE_SIZE).unwrap();
    let data = random_bytes(r.len(), 7);
    r.write(0, &data).unwrap();
    let first = hmm.migrate(r.pages_range(0, 1).unwrap(), Selection::System).unwrap();
    assert_eq!(first.collected(), 1);
    assert_eq!(r.stats().pages_migrating, 1);
    // The second collects pages 1..4 (staging them) and finds page 0 busy.
    let second = hmm.migrate(r.range(), Selection::System).unwrap();
    assert_eq!(second.collected(), 3);
    assert_eq!(second.statuses()[0], PageStatus::Skipped(SkipReason::Busy));
    assert_eq!(r.stats().pages_migrating, 4, "page 0 is still held by the first migration");
    drop(second);
    assert_eq!(r.stats().pages_migrating, 1, "ending the second gives back only its own pages");
    drop(first);
    assert_eq!(r.stats().pages_migrating, 0);
    let mut back = vec![0u8; r.len()];
    r.read(0, &mut back).unwrap();
    assert!(back == data, "every page is back in place with its data");
}

/// `Hmm::settle` waits for what hmm's threads do after a call has returned:
/// a touch of a device page returns once that page is back, while the rest
/// of its fault-around window is still on its way, and `munmap` returns once
/// its event is read, before the device pages are freed. After `settle`,
/// the records and counters describe all of it.
#[test]
fn settle_waits_for_the_fault_around_window_and_the_unmap_to_be_handled() {
    if common::skip_without_uffd() {
        return;
    }
    let hmm =
        Hmm::with_config(HmmConfig { fault_around_pages: 256, ..Default::default() }).unwrap();
    let dev = SoftwareDevice::new(&hmm, SoftwareDeviceConfig::new("d", 1024 * PAGE_SIZE)).unwrap();
    let r = hmm.alloc(1024 * PAGE_SIZE).unwrap();
    r.fill(0, r.len(), 9).unwrap();
    assert_eq!(dev.migrate_to_device(r.range()).unwrap().migrated, 1024);
    for round in 0..20 {
        let at = round * 50 + 10;
        if r.residency(at) != Residency::System {
            assert_eq!(r.touch_read(at * PAGE_SIZE).unwrap(), 9);
        }
    }
    hmm.settle(Duration::from_secs(10)).unwrap();
    let stats = r.stats();
    assert_eq!(stats.pages_migrating, 0, "no window is still coming back");
    assert_eq!(
        stats.migrated_to_system as usize,
        r.residencies().iter().filter(|x| **x == Residency::System).count(),
        "every page recorded in system memory is counted as migrated back"
    );
    assert_eq!(
        dev.stats().pages_resident as usize,
        1024 - stats.migrated_to_system as usize,
        "every page that came back has its device page freed"
    );
    // The application's own munmap of the second half: once settled, the
    // records say so and its device pages are free.
    let on_device_second_half =
        (512..1024).filter(|p| matches!(r.residency(*p), Residency::Device(_))).count();
    r.unmap(r.pages_range(512, 512).unwrap()).unwrap();
    hmm.settle(Duration::from_secs(10)).unwrap();
    assert!((512..1024).all(|p| r.residency(p) == Residency::Unmapped));
    assert_eq!(
        dev.stats().pages_resident as usize,
        1024 - stats.migrated_to_system as usize - on_device_second_half
    );
}

/// `Hmm::settle` has a deadline: while the fault service waits on a hung
/// DMA engine to bring a page back, it says what is under way instead of
/// waiting for ever, and succeeds once the engine runs again.
#[test]
fn settle_says_what_is_still_under_way_when_its_time_runs_out() {
    if common::skip_without_uffd() {
        return;
    }
    let hmm = Hmm::new().unwrap();
    let dev = SoftwareDevice::new(&hmm, SoftwareDeviceConfig::new("d", 64 * PAGE_SIZE)).unwrap();
    let r = hmm.alloc(16 * PAGE_SIZE).unwrap();
    r.fill(0, r.len(), 4).unwrap();
    assert_eq!(dev.migrate_to_device(r.range()).unwrap().migrated, 16);
    let stall = dev.stall_engine();
    std::thread::scope(|s| {
        let toucher = s.spawn(|| r.touch_read(3 * PAGE_SIZE).unwrap());
        common::eventually("the fault-back to reach the stalled engine", || stall.held() > 0);
        match hmm.settle(Duration::from_millis(100)) {
            Err(HmmError::Unsettled { what: hmm::Unsettled::Messages, .. }) => {}
            other => panic!("settle while the service waits on the engine: {other:?}"),
        }
        drop(stall);
        hmm.settle(Duration::from_secs(10)).unwrap();
        assert_eq!(toucher.join().unwrap(), 4);
    });
}

#[test]
fn a_16_tib_range_costs_records_for_the_pages_in_use_only() {
    if common::skip_without_uffd() {
        return;
    }
    let hmm = Hmm::new().unwrap();
    let len = 1usize << 44;
    let r = match hmm.alloc(len) {
        Ok(r) => r,
        Err(HmmError::Mm(e)) => {
            println!("skipped: the kernel will not map 16 TiB here ({e})");
            return;
        }
        Err(e) => panic!("a 16 TiB range: {e}"),
    };
    let (bytes, in_use) = hmm.metadata();
    assert_eq!(in_use, 0);
    assert!(bytes < 1 << 20, "an untouched 16 TiB range costs {bytes} bytes of records");
    let dev =
        SoftwareDevice::new(&hmm, SoftwareDeviceConfig::new("far-end", 64 * PAGE_SIZE)).unwrap();
    // A page at each end, and 16 on the device at the far end.
    r.write(0, &[1]).unwrap();
    r.write(len - 1, &[2]).unwrap();
    let far =
        PageRange::from_pages(VirtAddr::new(r.range().end().get() - 32 * PAGE_SIZE), 16).unwrap();
    r.write(len - 32 * PAGE_SIZE, &[3]).unwrap();
    let rep = dev.migrate_to_device(far).unwrap();
    assert_eq!(rep.migrated, 16);
    hmm.settle(Duration::from_secs(10)).unwrap();
    let (bytes, in_use) = hmm.metadata();
    assert!(in_use >= 18, "pages in use: {in_use}");
    assert!(bytes < 1 << 20, "a few pages in use cost {bytes} bytes of records");
    let home = r.residence();
    assert_eq!(home.total(), len as u64, "every byte counted once");
    assert_eq!(home.on_device(dev.memory().id()), 16 * PAGE_SIZE as u64);
    assert_eq!(r.stats().pages_on_device.values().sum::<u64>(), 16);
    let map = hmm.residency_map(r.range());
    assert!(map.runs().len() <= 8, "a map of the range is its runs: {:?}", map.runs());
    assert_eq!(map.stats().pages_on_device.values().sum::<u64>(), 16);
    let mut b = [0u8];
    r.read(len - 32 * PAGE_SIZE, &mut b).unwrap();
    assert_eq!(b, [3], "the device page faults back with its byte");
    r.read(len - 1, &mut b).unwrap();
    assert_eq!(b, [2]);
    // Unmapping all but the last 2 MiB gives back the records it held.
    let before = hmm.metadata().0;
    let keep = 2 << 20;
    r.unmap(PageRange::new(r.range().start(), len - keep).unwrap()).unwrap();
    hmm.settle(Duration::from_secs(10)).unwrap();
    assert_eq!(r.residence().unmapped, (len - keep) as u64);
    assert!(hmm.metadata().0 < before, "unmapping a block in use gives its records back");
    assert!(
        matches!(r.read(0, &mut b), Err(hmm::RangeError::Unmapped(_))),
        "the unmapped part reads as unmapped"
    );
}

#[test]
fn a_range_larger_than_the_address_space_is_a_typed_error() {
    if common::skip_without_uffd() {
        return;
    }
    let hmm = Hmm::new().unwrap();
    for len in [1usize << 50, usize::MAX & !(PAGE_SIZE - 1)] {
        match hmm.alloc(len) {
            Err(HmmError::Mm(e)) => assert!(!e.to_string().is_empty()),
            Err(e) => panic!("alloc({len:#x}): unexpected error {e}"),
            Ok(r) => panic!("alloc({len:#x}) gave {}", r.range()),
        }
    }
}

/// A pin is counted before its pages come back, so threads that keep
/// migrating the same pages to a device cannot starve it: the pin succeeds,
/// and from then on their migrations leave the pinned pages in system
/// memory (and move the rest).
#[test]
fn a_pin_wins_against_a_thread_migrating_the_same_pages() {
    if common::skip_without_uffd() {
        return;
    }
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let hmm = Hmm::new().unwrap();
    let pages = 64;
    let dev =
        SoftwareDevice::new(&hmm, SoftwareDeviceConfig::new("pin", pages * PAGE_SIZE)).unwrap();
    let r = hmm.alloc(pages * PAGE_SIZE).unwrap();
    let data = random_bytes(r.len(), 0x51);
    r.write(0, &data).unwrap();
    let (stop, rounds) = (AtomicBool::new(false), AtomicU64::new(0));
    let pinned = r.pages_range(16, 16).unwrap();
    std::thread::scope(|s| {
        let _stop = common::StopOnDrop(&stop);
        let (dev, r, stop, rounds) = (&dev, &r, &stop, &rounds);
        // Two threads: one takes the whole range to the device, one keeps
        // taking the part to be pinned there, as fast as it can.
        for part in [r.range(), pinned] {
            s.spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    // Busy pages (held by the pin's own migration) are
                    // skipped, not an error.
                    dev.migrate_to_device(part).unwrap();
                    rounds.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
        common::wait_for_count("migrations by the other threads", rounds, 3);
        let pin = r.pin(pinned).expect("a pin is not starved by another thread's migrations");
        let after = rounds.load(Ordering::Relaxed);
        common::wait_for_count("migrations after the pin", rounds, after + 3);
        for p in 16..32 {
            assert_eq!(
                r.residency(p),
                Residency::System,
                "pinned page {p} stayed in system memory"
            );
        }
        common::eventually("the pages not pinned to move to the device", || {
            (0..pages)
                .filter(|p| !(16..32).contains(p))
                .all(|p| matches!(r.residency(p), Residency::Device(_)))
        });
        drop(pin);
    });
    assert_eq!(common::cpu_bytes(&r), data, "every byte survived the contest");
}
