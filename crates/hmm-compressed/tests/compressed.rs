//! The compressed tier on a real hmm instance: pages compressed, declined,
//! refused for room, brought back by CPU touches in both fault modes, across
//! munmap, mremap and fork; every byte checked.

#[path = "../../hmm/tests/common/mod.rs"]
mod common;

use std::time::Duration;

use hmm::os::process::{ChildOutcome, spawn_child};
use hmm::{FaultMode, Hmm, HmmError, ManagedRange, PAGE_SIZE, Residency, SkipReason};
use hmm_compressed::{Algorithm, CompressedConfig, CompressedDevice, DEFAULT_THRESHOLD};

/// What page `i` of a test range holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Text that compresses well, different on every page.
    Text,
    /// Zeros.
    Zero,
    /// Random bytes: compresses to more than the page.
    Random,
}

fn kind(i: usize) -> Kind {
    match i % 8 {
        3 => Kind::Zero,
        6 => Kind::Random,
        _ => Kind::Text,
    }
}

fn page(i: usize) -> Vec<u8> {
    match kind(i) {
        Kind::Zero => vec![0; PAGE_SIZE],
        Kind::Text => {
            let mut s = String::new();
            let mut k = 0;
            while s.len() < PAGE_SIZE {
                s.push_str(&format!("page {i} line {k}: the device keeps this page compressed\n"));
                k += 1;
            }
            s.into_bytes()[..PAGE_SIZE].to_vec()
        }
        Kind::Random => {
            let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (i as u64).wrapping_mul(0x2545_f491_4f6c_dd1d);
            (0..PAGE_SIZE / 8)
                .flat_map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x.to_ne_bytes()
                })
                .collect()
        }
    }
}

fn data(pages: usize) -> Vec<u8> {
    (0..pages).flat_map(page).collect()
}

fn filled(hmm: &Hmm, pages: usize) -> (ManagedRange, Vec<u8>) {
    let r = hmm.alloc(pages * PAGE_SIZE).unwrap();
    let want = data(pages);
    r.write(0, &want).unwrap();
    (r, want)
}

fn nothing_held(dev: &CompressedDevice) {
    common::eventually("the device holds no page", || {
        let s = dev.stats();
        s.stored_pages == 0 && s.zero_pages == 0 && s.footprint_bytes == 0
    });
}

/// Text pages are compressed, zero pages flagged, random pages declined with
/// a reason of their own and left in system memory; every page reads back
/// right, with both algorithms, in both fault modes.
#[test]
fn pages_are_compressed_flagged_or_declined_and_read_back_right() {
    if common::skip_without_uffd() {
        return;
    }
    for mode in common::fault_modes() {
        for cfg in
            [CompressedConfig::new("z", 4 << 20), CompressedConfig::new("z", 4 << 20).with_zstd(3)]
        {
            let who = format!("{mode:?}, {}", cfg.algorithm);
            let hmm = common::instance(mode);
            let dev = CompressedDevice::new(&hmm, cfg).unwrap();
            let pages = 256;
            let (r, want) = filled(&hmm, pages);
            let rep = dev.migrate_to_device(r.range()).unwrap();
            let count = |k: Kind| (0..pages).filter(|i| kind(*i) == k).count();
            assert_eq!(
                rep.migrated,
                count(Kind::Text) + count(Kind::Zero),
                "{who}: first skipped {:?}",
                rep.skipped.first()
            );
            assert_eq!(rep.skipped.len(), count(Kind::Random), "{who}");
            for (addr, why) in &rep.skipped {
                let i = (addr.get() - r.addr().get()) / PAGE_SIZE;
                assert_eq!(kind(i), Kind::Random, "{who}: page {i} skipped: {why}");
                assert!(
                    matches!(why, SkipReason::Declined(m) if m.contains(&DEFAULT_THRESHOLD.to_string())),
                    "{who}: {why}"
                );
            }
            hmm.settle(Duration::from_secs(10)).unwrap();
            let res = r.residencies();
            for (i, x) in res.iter().enumerate() {
                let on_device = matches!(x, Residency::Device(p) if p.dev == dev.memory().id());
                assert_eq!(on_device, kind(i) != Kind::Random, "{who}: page {i} is {x:?}");
            }
            let s = dev.stats();
            assert_eq!(s.stored_pages, count(Kind::Text) as u64, "{who}: {s:?}");
            assert_eq!(s.zero_pages, count(Kind::Zero) as u64, "{who}: {s:?}");
            assert_eq!(s.declined_pages, count(Kind::Random) as u64, "{who}: {s:?}");
            assert!(s.compression_ratio().unwrap() > 4.0, "{who}: text compresses: {s:?}");
            assert!(s.footprint_bytes >= s.compressed_bytes, "{who}: {s:?}");
            assert!(s.footprint_bytes < (count(Kind::Text) * PAGE_SIZE) as u64, "{who}: {s:?}");
            let (served, handed) = hmm.in_thread_faults();
            let got = common::cpu_bytes(&r);
            assert_eq!(common::first_wrong_page(&got, &want), None, "{who}");
            let (served_now, handed_now) = hmm.in_thread_faults();
            if mode == FaultMode::InThread && dev.algorithm() == Algorithm::Lz4 {
                assert!(served_now > served, "{who}: lz4 pages come back in the handler");
            }
            if mode == FaultMode::InThread && dev.algorithm() != Algorithm::Lz4 {
                assert_eq!(served_now, served, "{who}: zstd pages are not served in the handler");
                assert!(handed_now > handed, "{who}: zstd pages go to the service");
            }
            hmm.settle(Duration::from_secs(10)).unwrap();
            nothing_held(&dev);
        }
    }
}

/// Migrating back (more pages than a job done inline) brings every page
/// back with both algorithms, and the device gives its memory back: what
/// stays is at most the empty slabs it keeps for reuse.
#[test]
fn migrating_back_brings_every_page_and_gives_the_memory_back() {
    if common::skip_without_uffd() {
        return;
    }
    for cfg in
        [CompressedConfig::new("z", 8 << 20), CompressedConfig::new("z", 8 << 20).with_zstd(3)]
    {
        let who = cfg.algorithm.to_string();
        let hmm = Hmm::new().unwrap();
        let dev = CompressedDevice::new(&hmm, cfg).unwrap();
        let (r, want) = filled(&hmm, 1024);
        let rep = dev.migrate_to_device(r.range()).unwrap();
        assert!(rep.migrated > 800, "{who}: {}", rep.migrated);
        assert!(dev.stats().held_bytes > 0, "{who}");
        let back = dev.migrate_to_system(r.range()).unwrap();
        assert_eq!(back.migrated, rep.migrated, "{who}: {:?}", back.skipped.first());
        assert!(r.residencies().iter().all(|x| *x == Residency::System), "{who}");
        let got = common::cpu_bytes(&r);
        assert_eq!(common::first_wrong_page(&got, &want), None, "{who}");
        nothing_held(&dev);
        // Sixteen empty slabs of at most four pages are kept.
        common::eventually("the memory of the other empty slabs given back", || {
            dev.stats().held_bytes <= 16 * 4 * PAGE_SIZE as u64
        });
    }
}

/// A device with room for one slab takes the pages that fit it; the rest
/// are refused as "no device memory" and stay, intact, in system memory.
#[test]
fn a_full_device_refuses_pages_and_keeps_them_where_they_were() {
    if common::skip_without_uffd() {
        return;
    }
    let hmm = Hmm::new().unwrap();
    let pages = 512;
    // Device pages for all of them: the compressed bytes run out first.
    let cfg =
        CompressedConfig { max_pages: Some(pages), ..CompressedConfig::new("small", 64 << 10) };
    let dev = CompressedDevice::new(&hmm, cfg).unwrap();
    let r = hmm.alloc(pages * PAGE_SIZE).unwrap();
    let want: Vec<u8> =
        (0..pages).flat_map(|i| if kind(i) == Kind::Text { page(i) } else { page(0) }).collect();
    r.write(0, &want).unwrap();
    let rep = dev.migrate_to_device(r.range()).unwrap();
    assert!(rep.migrated > 0 && rep.migrated < pages, "{} migrated", rep.migrated);
    let other = rep.skipped.iter().find(|(_, why)| *why != SkipReason::NoDeviceMemory);
    assert_eq!(other, None, "every page skipped for room");
    let s = dev.stats();
    assert_eq!(s.full_pages as usize, pages - rep.migrated, "{s:?}");
    // Full: what is left is less than the longest slab.
    assert!(s.held_bytes <= s.capacity_bytes, "{s:?}");
    assert!(s.footprint_bytes + 3 * PAGE_SIZE as u64 >= s.capacity_bytes, "{s:?}");
    let got = common::cpu_bytes(&r);
    assert_eq!(common::first_wrong_page(&got, &want), None);
}

/// Unmapping a range frees what the device held for it; `mremap` carries
/// compressed pages to the new address.
#[test]
fn munmap_frees_and_mremap_carries_compressed_pages() {
    if common::skip_without_uffd() {
        return;
    }
    for mode in common::fault_modes() {
        let hmm = common::instance(mode);
        let dev = CompressedDevice::new(&hmm, CompressedConfig::new("z", 4 << 20)).unwrap();
        let (r, _) = filled(&hmm, 64);
        assert!(dev.migrate_to_device(r.range()).unwrap().migrated > 0);
        drop(r);
        nothing_held(&dev);

        let (r, want) = filled(&hmm, 64);
        assert!(dev.migrate_to_device(r.range()).unwrap().migrated > 0);
        let moved = r.mapping().move_part(r.range()).unwrap();
        let mut got = vec![0u8; moved.len()];
        moved.read(0, &mut got).unwrap();
        assert_eq!(
            common::first_wrong_page(&got, &want),
            None,
            "{mode:?}: the bytes at the new address"
        );
        drop(moved);
        drop(r);
        hmm.settle(Duration::from_secs(10)).unwrap();
        nothing_held(&dev);
    }
}

/// A forked child reads the fork-time data of compressed pages; what the
/// parent writes afterwards stays the parent's.
#[test]
fn a_forked_child_reads_compressed_pages() {
    if common::skip_without("event-fork") {
        return;
    }
    let _fork = common::fork_lock();
    let hmm = Hmm::new().unwrap();
    let dev = CompressedDevice::new(&hmm, CompressedConfig::new("z", 4 << 20)).unwrap();
    let (r, want) = filled(&hmm, 128);
    let moved = dev.migrate_to_device(r.range()).unwrap().migrated;
    assert!(moved > 0);
    let child = spawn_child(|| common::child_reads_back(&r, &want)).unwrap();
    r.fill(0, r.len(), 0xAB).unwrap();
    assert_eq!(
        child.wait_within(common::CHILD_LIMIT).unwrap(),
        ChildOutcome::Exited(0),
        "10 + page: the child read that page wrong"
    );
    // A page the writes found already put back by a fault-around window is
    // recorded once that window's migration ends, which may be after the
    // writes (DESIGN.md, "What is exact when a call returns").
    hmm.settle(Duration::from_secs(10)).unwrap();
    assert!(r.residencies().iter().all(|x| *x == Residency::System));
    nothing_held(&dev);
}

/// Bad configuration is refused at creation, saying what to change.
#[test]
fn bad_configuration_is_refused_with_what_to_change() {
    if common::skip_without_uffd() {
        return;
    }
    let hmm = Hmm::new().unwrap();
    let cases = [
        (CompressedConfig::new("z", 0), "capacity of 0"),
        (CompressedConfig::new("z", 1 << 20).with_threshold(10), "threshold of 10"),
        (CompressedConfig::new("z", 1 << 20).with_threshold(5000), "threshold of 5000"),
        (CompressedConfig::new("z", 1 << 20).with_zstd(99), "zstd level 99"),
        (CompressedConfig { workers: 0, ..CompressedConfig::new("z", 1 << 20) }, "no worker"),
        (CompressedConfig { max_pages: Some(0), ..CompressedConfig::new("z", 1 << 20) }, "0 pages"),
    ];
    for (cfg, what) in cases {
        match CompressedDevice::new(&hmm, cfg) {
            Err(HmmError::Config(m)) => assert!(m.contains(what), "{what}: {m}"),
            other => panic!("{what}: {other:?}"),
        }
    }
}
