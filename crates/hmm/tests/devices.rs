//! Several devices in one process: device-to-device moves, oversubscription
//! with least-recently-used eviction, and the accounting of where bytes live.

mod common;

use hmm::{
    Hmm, HmmError, PAGE_SIZE, PageRange, Place, RangeFault, RangeFaultError, Residency, SkipReason,
    VirtAddr,
};
use hmm_swdev::{SnapshotAccess, SoftwareDevice, SoftwareDeviceConfig};

use common::{check_salted as check, cpu_bytes, fill_salted as fill};
use std::time::Duration;

fn on(dev: &SoftwareDevice) -> impl Fn(&Residency) -> bool + '_ {
    move |x| matches!(x, Residency::Device(p) if p.dev == dev.memory().id())
}

fn engines() -> [(&'static str, SoftwareDeviceConfig); 2] {
    [
        ("zero-copy", SoftwareDeviceConfig::new("d", 1 << 20)),
        ("copy", SoftwareDeviceConfig::new("d", 1 << 20).with_copy_engine(2)),
    ]
}

/// A device-to-device move lands every byte on the destination, invalidates
/// the source's mirror and frees its pages, and never stops in system memory
/// when both devices take part in peer-to-peer copies.
#[test]
fn device_to_device_moves_pages_directly() {
    if common::skip_without_uffd() {
        return;
    }
    let _fork = common::fork_lock();
    for (name_a, a_cfg) in engines() {
        for (name_b, b_cfg) in engines() {
            let who = format!("{name_a} -> {name_b}");
            let hmm = Hmm::new().unwrap();
            let a = SoftwareDevice::new(&hmm, a_cfg.clone()).unwrap();
            let b = SoftwareDevice::new(&hmm, b_cfg).unwrap();
            let r = hmm.alloc(256 * PAGE_SIZE).unwrap();
            fill(&r, 7);
            assert_eq!(a.migrate_to_device(r.range()).unwrap().migrated, 256, "{who}");
            // Device A maps every page (its own memory).
            check(&a.read(r.range()).unwrap().0, 0, 7, &who);
            assert!(a.mirror_stats().entries >= 256, "{who}");
            let rep = b.migrate_from(r.range(), &a).unwrap();
            assert_eq!(rep.migrated, 256, "{who}: {:?}", rep.skipped.first());
            assert!(r.residencies().iter().all(on(&b)), "{who}: every page on B");
            let (sa, sb) = (a.stats(), b.stats());
            assert_eq!(sa.pages_resident, 0, "{who}: A's pages are freed");
            assert_eq!(sa.migrated_to_peer, 256, "{who}");
            assert_eq!(sa.migrated_to_system, 0, "{who}: no stop in system memory");
            assert_eq!(r.stats().migrated_to_system, 0, "{who}");
            assert_eq!(sb.pages_resident, 256, "{who}");
            assert_eq!(a.mirror_stats().entries, 0, "{who}: A's mirror was invalidated");
            // B reads its own memory, then the CPU faults every page back.
            let (bytes, c) = b.read(r.range()).unwrap();
            check(&bytes, 0, 7, &who);
            assert!(b.entry(r.addr()).unwrap().page.is_some(), "{who}: B maps its own page");
            assert_eq!(c.faults, 1, "{who}");
            check(&cpu_bytes(&r), 0, 7, &who);
            // The last window may be installed (and read) before it is
            // recorded and B's pages freed.
            hmm.settle(Duration::from_secs(10)).unwrap();
            assert_eq!(b.stats().pages_resident, 0, "{who}");
        }
    }
}

/// Without peer-to-peer access the same move goes through system memory:
/// back with A's engine, out with B's; the data is the same.
#[test]
fn device_to_device_without_peer_access_goes_through_system_memory() {
    if common::skip_without_uffd() {
        return;
    }
    let _fork = common::fork_lock();
    let hmm = Hmm::new().unwrap();
    let a =
        SoftwareDevice::new(&hmm, SoftwareDeviceConfig::new("a", 1 << 20).without_peer_to_peer())
            .unwrap();
    let b = SoftwareDevice::new(&hmm, SoftwareDeviceConfig::new("b", 1 << 20)).unwrap();
    let r = hmm.alloc(128 * PAGE_SIZE).unwrap();
    fill(&r, 3);
    assert_eq!(a.migrate_to_device(r.range()).unwrap().migrated, 128);
    // A device write on A first: the move must carry it.
    a.write(r.addr(), &[0xEE; 8]).unwrap();
    let rep = b.migrate_from(r.range(), &a).unwrap();
    assert_eq!(rep.migrated, 128, "{:?}", rep.skipped.first());
    assert!(r.residencies().iter().all(on(&b)));
    assert_eq!(a.stats().migrated_to_system, 128, "through system memory");
    assert_eq!(a.stats().migrated_to_peer, 0);
    assert_eq!(a.stats().pages_resident, 0);
    let bytes = cpu_bytes(&r);
    assert_eq!(&bytes[..8], &[0xEE; 8]);
    check(&bytes[PAGE_SIZE..], 1, 3, "through system");
}

/// `migrate_here` gathers a range from everywhere: system memory, never
/// populated pages, and two other devices.
#[test]
fn migrate_here_gathers_pages_from_everywhere() {
    if common::skip_without_uffd() {
        return;
    }
    let _fork = common::fork_lock();
    let hmm = Hmm::new().unwrap();
    let devs: Vec<SoftwareDevice> = (0..3)
        .map(|i| {
            SoftwareDevice::new(&hmm, SoftwareDeviceConfig::new(format!("d{i}"), 1 << 20)).unwrap()
        })
        .collect();
    let r = hmm.alloc(64 * PAGE_SIZE).unwrap();
    fill(&r, 11);
    // Pages 0-15 on d0, 16-31 on d1, 32-47 in system memory, 48-63 discarded.
    assert_eq!(devs[0].migrate_to_device(r.pages_range(0, 16).unwrap()).unwrap().migrated, 16);
    assert_eq!(devs[1].migrate_to_device(r.pages_range(16, 16).unwrap()).unwrap().migrated, 16);
    r.advise(r.pages_range(48, 16).unwrap(), hmm::os::mm::Advise::DontNeed).unwrap();
    hmm.settle(Duration::from_secs(10)).unwrap();
    assert!((48..64).all(|p| r.residency(p) == Residency::None), "the discard is recorded");
    let rep = devs[2].migrate_here(r.range()).unwrap();
    assert_eq!(rep.migrated, 64, "{:?}", rep.skipped);
    assert!(r.residencies().iter().all(on(&devs[2])));
    assert_eq!(devs[0].stats().pages_resident + devs[1].stats().pages_resident, 0);
    let bytes = devs[2].read(r.range()).unwrap().0;
    check(&bytes[..48 * PAGE_SIZE], 0, 11, "gathered");
    assert!(bytes[48 * PAGE_SIZE..].iter().all(|b| *b == 0), "discarded pages read as zeros");
}

/// A full device that refuses pressure skips the pages with the reason.
#[test]
fn a_full_device_refuses_by_default() {
    if common::skip_without_uffd() {
        return;
    }
    let _fork = common::fork_lock();
    let hmm = Hmm::new().unwrap();
    let d = SoftwareDevice::new(&hmm, SoftwareDeviceConfig::new("d", 16 * PAGE_SIZE)).unwrap();
    let r = hmm.alloc(32 * PAGE_SIZE).unwrap();
    fill(&r, 0);
    let rep = d.migrate_to_device(r.range()).unwrap();
    assert_eq!(rep.migrated, 16);
    assert_eq!(rep.count(&SkipReason::NoDeviceMemory), 16);
    assert_eq!(d.stats().pages_evicted, 0);
    check(&cpu_bytes(&r), 0, 0, "refused");
}

/// Eviction under pressure takes the least recently used pages, by what hmm
/// saw (migrations, device accesses), not by allocation order.
#[test]
fn pressure_evicts_the_least_recently_used_pages() {
    if common::skip_without_uffd() {
        return;
    }
    let _fork = common::fork_lock();
    let hmm = Hmm::new().unwrap();
    let d = SoftwareDevice::new(&hmm, SoftwareDeviceConfig::new("d", 64 * PAGE_SIZE).evicting())
        .unwrap();
    let x = hmm.alloc(64 * PAGE_SIZE).unwrap();
    let y = hmm.alloc(32 * PAGE_SIZE).unwrap();
    fill(&x, 100);
    fill(&y, 200);
    assert_eq!(d.migrate_to_device(x.range()).unwrap().migrated, 64);
    // The device uses the first half of x: the second half is now the coldest,
    // although its pages were allocated last.
    check(&d.read(x.pages_range(0, 32).unwrap()).unwrap().0, 0, 100, "device read");
    let rep = d.migrate_to_device(y.range()).unwrap();
    assert_eq!(rep.migrated, 32, "{:?}", rep.skipped.first());
    let res = x.residencies();
    assert!(res[..32].iter().all(on(&d)), "the used half stays: {:?}", &res[..32]);
    assert!(
        res[32..].iter().all(|r| *r == Residency::System),
        "the cold half went: {:?}",
        &res[32..]
    );
    assert!(y.residencies().iter().all(on(&d)));
    assert_eq!(d.stats().pages_evicted, 32);
    assert_eq!(rep.evicted, 32, "the report says what made room");
    check(&cpu_bytes(&x), 0, 100, "x");
    check(&cpu_bytes(&y), 0, 200, "y");
}

/// With `EvictOldest` the pages that came in first go first, however much
/// the device used them since (the order NVIDIA's driver evicts in).
#[test]
fn fifo_pressure_evicts_in_arrival_order() {
    if common::skip_without_uffd() {
        return;
    }
    let _fork = common::fork_lock();
    let hmm = Hmm::new().unwrap();
    let config = SoftwareDeviceConfig::new("d", 64 * PAGE_SIZE).evicting_oldest();
    let d = SoftwareDevice::new(&hmm, config).unwrap();
    let x = hmm.alloc(64 * PAGE_SIZE).unwrap();
    let y = hmm.alloc(32 * PAGE_SIZE).unwrap();
    fill(&x, 100);
    fill(&y, 200);
    assert_eq!(d.migrate_to_device(x.pages_range(0, 32).unwrap()).unwrap().migrated, 32);
    assert_eq!(d.migrate_to_device(x.pages_range(32, 32).unwrap()).unwrap().migrated, 32);
    // The device uses the first half: under recency it would stay.
    check(&d.read(x.pages_range(0, 32).unwrap()).unwrap().0, 0, 100, "device read");
    let rep = d.migrate_to_device(y.range()).unwrap();
    assert_eq!(rep.migrated, 32, "{:?}", rep.skipped.first());
    let res = x.residencies();
    assert!(res[..32].iter().all(|r| *r == Residency::System), "the first in went: {res:?}");
    assert!(res[32..].iter().all(on(&d)), "the last in stayed: {res:?}");
    assert_eq!(rep.evicted, 32);
    check(&cpu_bytes(&x), 0, 100, "x");
    check(&cpu_bytes(&y), 0, 200, "y");
}

/// A migration into a full device evicts other pages, never those of the
/// range it is gathering there: here the range's pages already on the device
/// are the coldest, yet the room is made from the other range's.
#[test]
fn a_migration_does_not_evict_the_pages_it_gathers() {
    if common::skip_without_uffd() {
        return;
    }
    let _fork = common::fork_lock();
    let hmm = Hmm::new().unwrap();
    let d = SoftwareDevice::new(&hmm, SoftwareDeviceConfig::new("d", 64 * PAGE_SIZE).evicting())
        .unwrap();
    let x = hmm.alloc(48 * PAGE_SIZE).unwrap();
    let y = hmm.alloc(32 * PAGE_SIZE).unwrap();
    fill(&x, 100);
    fill(&y, 200);
    assert_eq!(d.migrate_to_device(x.pages_range(0, 32).unwrap()).unwrap().migrated, 32);
    assert_eq!(d.migrate_to_device(y.range()).unwrap().migrated, 32);
    // Full; x's 32 pages are the coldest. Gathering all of x needs 16 more.
    let rep = d.migrate_to_device(x.range()).unwrap();
    assert_eq!(rep.migrated, 16, "{:?}", rep.skipped.first());
    assert!(x.residencies().iter().all(on(&d)), "{:?}", x.residencies());
    let left = y.residencies().iter().filter(|r| **r == Residency::System).count();
    assert_eq!((left, d.stats().pages_evicted, rep.evicted), (16, 16, 16));
    check(&cpu_bytes(&x), 0, 100, "x");
    check(&cpu_bytes(&y), 0, 200, "y");
}

/// A migration of more than the device holds, in one call: it fills the
/// device (evicting other memory, and saying how much) and skips the rest
/// as finding no device memory. It never evicts what its own earlier
/// batches moved there, which would report every page migrated while most
/// had gone back.
#[test]
fn a_migration_larger_than_the_device_fills_it_once_and_says_so() {
    if common::skip_without_uffd() {
        return;
    }
    let _fork = common::fork_lock();
    let hmm = Hmm::new().unwrap();
    const CAP: usize = 4096; // 16 MiB: one batch of a migration
    let d = SoftwareDevice::new(&hmm, SoftwareDeviceConfig::new("d", CAP * PAGE_SIZE).evicting())
        .unwrap();
    let other = hmm.alloc(1024 * PAGE_SIZE).unwrap();
    fill(&other, 300);
    assert_eq!(d.migrate_to_device(other.range()).unwrap().migrated, 1024);
    let big = hmm.alloc(3 * CAP * PAGE_SIZE).unwrap();
    fill(&big, 400);
    let rep = d.migrate_to_device(big.range()).unwrap();
    assert_eq!(rep.migrated, CAP, "the device is filled once");
    assert_eq!(rep.evicted, 1024, "the other range made room");
    assert_eq!(rep.count(&SkipReason::NoDeviceMemory), 2 * CAP, "the rest found no room");
    assert!(!rep.all_migrated());
    let on_device = big.residencies().iter().filter(|r| on(&d)(r)).count();
    assert_eq!(on_device, rep.migrated, "every page reported migrated is on the device");
    assert_eq!(d.stats().pages_resident as usize, CAP);
    check(&cpu_bytes(&big), 0, 400, "big");
    check(&cpu_bytes(&other), 0, 300, "other");
}

/// The word page `i` of the model holds.
fn word(model: &[u64], i: usize) -> Vec<u8> {
    std::iter::repeat_n(model[i].to_ne_bytes(), PAGE_SIZE / 8).flatten().collect()
}

/// Two devices, each oversubscribed four times over, with random migrations
/// (to either device, between them, back to system memory), CPU and device
/// reads and writes: every byte read matches a model, and the accounting
/// matches what each device holds after every step. A migration from one
/// full device to the other evicts on the destination as any migration does.
#[test]
fn four_times_oversubscribed_with_random_access_keeps_every_byte() {
    if common::skip_without_uffd() {
        return;
    }
    let _fork = common::fork_lock();
    const CAP: usize = 256;
    let hmm = Hmm::new().unwrap();
    let d = SoftwareDevice::new(&hmm, SoftwareDeviceConfig::new("d", CAP * PAGE_SIZE).evicting())
        .unwrap();
    let e = SoftwareDevice::new(&hmm, SoftwareDeviceConfig::new("e", CAP * PAGE_SIZE).evicting())
        .unwrap();
    let r = hmm.alloc(4 * CAP * PAGE_SIZE).unwrap();
    let seed = 0x5eed_0005_u64;
    eprintln!("seed {seed:#x}");
    let mut rng = common::Rng(seed);
    let mut model: Vec<u64> = (0..r.pages() as u64).map(|i| i * 3 + 1).collect();
    for i in 0..r.pages() {
        r.write(i * PAGE_SIZE, &word(&model, i)).unwrap();
    }
    let devs = [&d, &e];
    let page_addr = |i: usize| VirtAddr::new(r.addr().get() + i * PAGE_SIZE);
    for step in 0..1500 {
        let i = rng.below(r.pages());
        let (x, y) = if rng.below(2) == 0 { (&d, &e) } else { (&e, &d) };
        let n = 1 + rng.below(96).min(r.pages() - i - 1);
        match rng.below(7) {
            0 => {
                let rep = x.migrate_to_device(r.pages_range(i, n).unwrap()).unwrap();
                assert!(
                    rep.skipped.iter().all(|(_, why)| matches!(why, SkipReason::NotSelected(_))),
                    "step {step}: {:?}",
                    rep.skipped.first()
                );
            }
            5 => {
                let rep = x.migrate_from(r.pages_range(i, n).unwrap(), y).unwrap();
                assert!(
                    rep.skipped.iter().all(|(_, why)| matches!(why, SkipReason::NotSelected(_))),
                    "step {step}: {:?}",
                    rep.skipped.first()
                );
            }
            6 => {
                x.migrate_to_system(r.pages_range(i, n).unwrap()).unwrap();
            }
            1 => {
                model[i] = rng.next();
                r.write(i * PAGE_SIZE, &word(&model, i)).unwrap();
            }
            2 => {
                let mut b = vec![0u8; PAGE_SIZE];
                r.read(i * PAGE_SIZE, &mut b).unwrap();
                assert!(b == word(&model, i), "step {step}: CPU read of page {i}");
            }
            3 => {
                model[i] = rng.next();
                x.write(page_addr(i), &word(&model, i)).unwrap();
            }
            _ => {
                let (b, _) = x.read(r.pages_range(i, 1).unwrap()).unwrap();
                assert!(b == word(&model, i), "step {step}: device read of page {i}");
            }
        }
        let res = r.residence();
        assert_eq!(res.total(), r.len() as u64, "step {step}: the parts sum to the range");
        for dev in devs {
            let charged = dev.stats().pages_resident;
            assert!(charged <= CAP as u64, "step {step}: {charged} pages on a {CAP}-page device");
        }
        // The rest of a fault-around window comes back after the faulting
        // thread resumes: the charges match the records once it is in (and
        // the next step's migration finds no page of it still held).
        hmm.settle(Duration::from_secs(10)).unwrap();
        let res = r.residence();
        for dev in devs {
            assert_eq!(
                res.on_device(dev.memory().id()),
                dev.stats().pages_resident * PAGE_SIZE as u64,
                "step {step}: {}'s charge matches the range's records",
                dev.memory().name()
            );
        }
        assert_eq!(hmm.residence(), res, "step {step}");
    }
    for dev in devs {
        assert!(dev.stats().pages_evicted > 0, "{} was oversubscribed", dev.memory().name());
        assert!(dev.stats().migrated_to_peer > 0, "{} gave pages to its peer", dev.memory().name());
    }
    for i in 0..r.pages() {
        let mut b = vec![0u8; PAGE_SIZE];
        r.read(i * PAGE_SIZE, &mut b).unwrap();
        assert!(b == word(&model, i), "final read of page {i}");
    }
}

/// The accounting of a range follows its pages to every place they can be.
#[test]
fn residence_follows_pages_and_sums_to_the_range() {
    if common::skip_without_uffd() {
        return;
    }
    let _fork = common::fork_lock();
    let hmm = Hmm::new().unwrap();
    let a = SoftwareDevice::new(&hmm, SoftwareDeviceConfig::new("a", 1 << 20)).unwrap();
    let b = SoftwareDevice::new(&hmm, SoftwareDeviceConfig::new("b", 1 << 20)).unwrap();
    let r = hmm.alloc(40 * PAGE_SIZE).unwrap();
    fill(&r, 1);
    let p = PAGE_SIZE as u64;
    let res = r.residence();
    assert_eq!((res.system, res.total()), (40 * p, 40 * p));
    a.migrate_to_device(r.pages_range(0, 10).unwrap()).unwrap();
    b.migrate_to_device(r.pages_range(10, 10).unwrap()).unwrap();
    r.advise(r.pages_range(20, 5).unwrap(), hmm::os::mm::Advise::DontNeed).unwrap();
    r.unmap(r.pages_range(25, 5).unwrap()).unwrap();
    // The discard and the unmap are handled by the fault service after the
    // calls return (and a discarded page may be looked at again).
    hmm.settle(Duration::from_secs(10)).unwrap();
    let res = r.residence();
    assert_eq!(res.on_device(a.memory().id()), 10 * p);
    assert_eq!(res.on_device(b.memory().id()), 10 * p);
    assert_eq!((res.unpopulated, res.unmapped, res.system), (5 * p, 5 * p, 10 * p));
    assert_eq!(res.total(), r.len() as u64);
    // Charges follow the pages from a to b.
    b.migrate_from(r.pages_range(0, 10).unwrap(), &a).unwrap();
    let res = r.residence();
    assert_eq!((res.on_device(a.memory().id()), res.on_device(b.memory().id())), (0, 20 * p));
    assert_eq!(b.stats().pages_resident * p, 20 * p);
    // A failed device's pages are counted as lost.
    assert_eq!(b.fail(), 20);
    let res = r.residence();
    assert_eq!((res.poisoned, res.on_device(b.memory().id())), (20 * p, 0));
    assert_eq!(res.total(), r.len() as u64);
}

/// The residency map of any range: pages of two devices, system memory,
/// unpopulated pages, and pages hmm does not manage, with the counters of
/// the ranges it covers; the drawing shows the place most pages of each
/// character are in.
#[test]
fn residency_map_shows_every_page_and_the_counters() {
    if common::skip_without_uffd() {
        return;
    }
    let _fork = common::fork_lock();
    let hmm = Hmm::new().unwrap();
    let a = SoftwareDevice::new(&hmm, SoftwareDeviceConfig::new("gpu-a", 1 << 20)).unwrap();
    let b = SoftwareDevice::new(&hmm, SoftwareDeviceConfig::new("gpu-b", 1 << 20)).unwrap();
    let r = hmm.alloc(64 * PAGE_SIZE).unwrap();
    r.fill(0, 48 * PAGE_SIZE, 1).unwrap();
    a.migrate_to_device(r.pages_range(0, 16).unwrap()).unwrap();
    b.migrate_to_device(r.pages_range(16, 16).unwrap()).unwrap();
    // The range and 64 pages after it that hmm does not manage (the map
    // only looks at addresses).
    let wider = hmm::PageRange::new(r.addr(), 128 * PAGE_SIZE).unwrap();
    let map = hmm.residency_map(wider);
    let (ia, ib) = (a.memory().id(), b.memory().id());
    let p = map.places();
    assert!(p[..16].iter().all(|x| *x == Place::Device(ia)), "{:?}", &p[..16]);
    assert!(p[16..32].iter().all(|x| *x == Place::Device(ib)));
    assert!(p[32..48].iter().all(|x| *x == Place::System));
    assert!(p[64..].iter().all(|x| *x == Place::Unmanaged));
    assert_eq!(map.stats().migrated_to_device, 32);
    assert_eq!(map.stats().pages_on_device.values().sum::<u64>(), 32);
    assert_eq!(map.devices().get(&ia).map(String::as_str), Some("gpu-a"));
    let runs = map.runs();
    assert_eq!(runs[0], (r.pages_range(0, 16).unwrap(), Place::Device(ia)));
    assert_eq!(runs.last().unwrap().1, Place::Unmanaged);
    let line = map.render(8);
    assert_eq!(line.len(), 8);
    assert_eq!(
        &line[..2],
        &format!("{}{}", Place::Device(ia).symbol(), Place::Device(ib).symbol())
    );
    assert_eq!(&line[4..], "    ", "the unmanaged half");
    assert!(map.legend().contains("gpu-a (64.0 KiB)"), "{}", map.legend());
    // A CPU touch faults a page back, and the map says so at once, with
    // the fault counted (before the touching thread was woken).
    r.touch_read(0).unwrap();
    let map = r.residency_map();
    assert_eq!(map.places()[0], Place::System);
    assert_eq!(map.stats().cpu_faults, 1);
}

/// A device read, snapshot or fault of more pages than one request may cover
/// ([`RangeFault::MAX_PAGES`]) is refused with `TooLarge`, naming the range
/// and the fix, before any buffer or per-page entry is made: 64 TiB from
/// address 0, 4 TiB from a managed range, and one page over the bound. Up to
/// the bound, reads, snapshots and faults work as they always did.
#[test]
fn device_accesses_to_huge_ranges_are_refused_before_anything_is_allocated() {
    if common::skip_without_uffd() {
        return;
    }
    let hmm = Hmm::new().unwrap();
    let dev = SoftwareDevice::new(&hmm, SoftwareDeviceConfig::new("gpu", 1 << 20)).unwrap();
    let r = hmm.alloc(8 * PAGE_SIZE).unwrap();
    r.fill(0, r.len(), 7).unwrap();
    let too_large = |e: &HmmError, range: PageRange| matches!(e, HmmError::Fault(RangeFaultError::TooLarge { range: got }) if *got == range);
    for range in [
        PageRange::new(VirtAddr::new(0), 1 << 46).unwrap(),
        PageRange::new(r.addr(), 4 << 40).unwrap(),
        PageRange::from_pages(r.addr(), RangeFault::MAX_PAGES + 1).unwrap(),
    ] {
        let e = dev.read(range).unwrap_err();
        assert!(too_large(&e, range), "{e:?}");
        let text = e.to_string();
        assert!(text.contains(&range.to_string()) && text.contains("split it"), "{text}");
        let e = dev.snapshot(range).unwrap_err();
        assert!(too_large(&e, range), "{e:?}");
        let owner = Some(dev.memory().id());
        for req in [RangeFault::snapshot(range, owner), RangeFault::fault(range, true, owner)] {
            assert_eq!(hmm.range_fault(&req).unwrap_err(), RangeFaultError::TooLarge { range });
        }
    }
    // Up to the bound, as ever.
    let (bytes, c) = dev.read(r.range()).unwrap();
    assert!(bytes.iter().all(|b| *b == 7));
    assert_eq!(c.cpages, 8);
    let snap = dev.snapshot(r.range()).unwrap();
    assert!(snap.len() == 8 && snap.iter().all(|s| s.access == SnapshotAccess::Write));
    let bound = PageRange::from_pages(r.addr(), RangeFault::MAX_PAGES).unwrap();
    let info = hmm.range_fault(&RangeFault::snapshot(bound, None)).unwrap();
    assert_eq!(info.len(), RangeFault::MAX_PAGES);
    assert!(info[..8].iter().all(|p| p.valid && p.write));
}

/// Whether a device still holds pages exclusively is read from the entries
/// it has: asking it of a range of the whole lower address space answers at
/// once, with the pages it holds.
#[test]
fn check_exclusive_of_a_huge_range_reads_only_the_devices_entries() {
    if common::skip_without_uffd() {
        return;
    }
    let _fork = common::fork_lock();
    let hmm = Hmm::new().unwrap();
    let dev = SoftwareDevice::new(&hmm, SoftwareDeviceConfig::new("gpu", 1 << 20)).unwrap();
    let r = hmm.alloc(8 * PAGE_SIZE).unwrap();
    r.fill(0, r.len(), 7).unwrap();
    dev.make_exclusive(r.pages_range(2, 2).unwrap()).unwrap();
    let below = PageRange::new(VirtAddr::new(0), r.addr().get()).unwrap();
    let through = PageRange::new(VirtAddr::new(0), r.range().end().get()).unwrap();
    let e = dev.check_exclusive(through).unwrap_err();
    assert!(
        matches!(e, HmmError::StillExclusive { pages: 2, addr } if addr == r.pages_range(2, 1).unwrap().start()),
        "{e:?}"
    );
    assert_eq!(dev.check_exclusive(below).unwrap().cpages, below.pages() as u64);
}

/// A recording of a migration, a CPU fault back, a device fault and an
/// invalidation holds one event of each kind, and the Chrome-trace JSON of
/// it parses with the fields a timeline viewer needs.
#[test]
fn trace_records_migrations_faults_and_invalidations() {
    if common::skip_without_uffd() {
        return;
    }
    let _fork = common::fork_lock();
    let hmm = Hmm::new().unwrap();
    let gpu = SoftwareDevice::new(&hmm, SoftwareDeviceConfig::new("gpu0", 1 << 20)).unwrap();
    let r = hmm.alloc(16 * PAGE_SIZE).unwrap();
    r.fill(0, r.len(), 7).unwrap();
    hmm::trace::start();
    let (_, c) = gpu.read(r.pages_range(0, 4).unwrap()).unwrap();
    assert!(c.faults > 0, "the device faulted its page table in");
    gpu.migrate_to_device(r.range()).unwrap();
    r.touch_read(0).unwrap();
    // The fault's span ends after the touching thread is woken, when the
    // rest of its window is back: the service has ended it once settled.
    hmm.settle(Duration::from_secs(10)).unwrap();
    let trace = hmm::trace::stop();
    let counts = trace.counts();
    for cat in ["migrate", "cpu-fault", "device-fault", "invalidate"] {
        assert!(counts.get(cat).copied().unwrap_or(0) > 0, "no {cat} event: {counts:?}");
    }
    let m = trace.events().iter().find(|e| e.name == "migrate to device").unwrap();
    assert!(m.args.contains(&("pages", 16)) && m.args.contains(&("migrated", 16)), "{m:?}");
    let mut json = Vec::new();
    trace.write_chrome_json(&mut json).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&json).unwrap();
    let events = v["traceEvents"].as_array().unwrap();
    let x: Vec<_> = events.iter().filter(|e| e["ph"] == "X").collect();
    assert_eq!(x.len(), trace.events().len());
    for e in &x {
        assert!(e["ts"].as_f64().is_some() && e["dur"].as_f64().unwrap() >= 0.0, "{e}");
        assert!(e["tid"].as_u64().is_some() && e["pid"].as_u64().is_some(), "{e}");
    }
    assert!(
        events.iter().any(|e| e["ph"] == "M" && e["args"]["name"] == "hmm-fault"),
        "threads named"
    );
}

/// Misuse gets an error that says what was wrong: a device of no memory,
/// and a device used after the `Hmm` it belongs to was dropped (which
/// released it), rather than "unknown device 0" or "the range is empty".
#[test]
fn misused_devices_get_errors_that_say_what_is_wrong() {
    if common::skip_without_uffd() {
        return;
    }
    let hmm = Hmm::new().unwrap();
    let e = SoftwareDevice::new(&hmm, SoftwareDeviceConfig::new("empty", 0)).unwrap_err();
    assert!(e.to_string().contains("at least one page"), "{e}");
    let dev = SoftwareDevice::new(&hmm, SoftwareDeviceConfig::new("d", 16 * PAGE_SIZE)).unwrap();
    let r = hmm.alloc(4 * PAGE_SIZE).unwrap();
    r.fill(0, r.len(), 1).unwrap();
    drop(hmm);
    let e = dev.migrate_to_device(r.range()).unwrap_err();
    assert!(matches!(e, HmmError::ShutDown), "{e:?}");
    assert!(e.to_string().contains("dropped"), "{e}");
}
