//! The placement layer (`hmm::policy`): range attributes and their query,
//! device faults decided by attribute and policy, density prefetch,
//! asynchronous prefetch with progress and cancel, thrashing mitigation,
//! and a policy of one's own.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use hmm::policy::{
    Advice, BudgetConfig, Decision, DemandOnly, FaultContext, Location, Placement, PlacementConfig,
    Policy, PolicyError, ThrashConfig,
};
use hmm::{Hmm, PAGE_SIZE, Place, SkipReason};
use hmm_swdev::{SoftwareDevice, SoftwareDeviceConfig};

fn device(hmm: &Hmm, name: &str, pages: usize) -> SoftwareDevice {
    SoftwareDevice::new(hmm, SoftwareDeviceConfig::new(name, pages * PAGE_SIZE)).expect("device")
}

/// A compressed-memory tier of 4 MiB, the budgets' destination.
fn compressed_tier(hmm: &Hmm) -> hmm_compressed::CompressedDevice {
    hmm_compressed::CompressedDevice::new(hmm, hmm_compressed::CompressedConfig::new("z", 4 << 20))
        .expect("compressed tier")
}

/// Page `i` holds the word `seed + i`, repeated.
fn pattern(pages: usize, seed: u64) -> Vec<u8> {
    (0..pages as u64).flat_map(|i| (seed + i).to_ne_bytes().repeat(PAGE_SIZE / 8)).collect()
}

const WAIT: Duration = Duration::from_secs(60);

#[test]
fn advice_is_kept_by_run_and_reported_with_where_pages_live() {
    if common::skip_without_uffd() {
        return;
    }
    let hmm = Hmm::new().unwrap();
    let d = device(&hmm, "d", 64);
    let p = Placement::new(&hmm).unwrap();
    let r = hmm.alloc(64 * PAGE_SIZE).unwrap();
    r.write(0, &pattern(64, 1)).unwrap();
    d.migrate_to_device(r.pages_range(0, 16).unwrap()).unwrap();
    let dev = Location::Device(d.memory().id());
    p.advise(r.pages_range(0, 32).unwrap(), Advice::PreferredLocation(dev)).unwrap();
    p.advise(r.pages_range(16, 32).unwrap(), Advice::ReadMostly).unwrap();
    p.advise(r.pages_range(40, 8).unwrap(), Advice::AccessedBy(d.memory().id())).unwrap();
    p.advise(r.pages_range(40, 8).unwrap(), Advice::Granularity(64 << 10)).unwrap();
    let got = p.attributes(r.range());
    let runs: Vec<(usize, usize)> = got
        .iter()
        .map(|a| ((a.range.start().get() - r.range().start().get()) / PAGE_SIZE, a.range.pages()))
        .collect();
    assert_eq!(runs, vec![(0, 16), (16, 16), (32, 8), (40, 8), (48, 16)]);
    assert_eq!(got[0].attributes.preferred, Some(dev));
    assert!(!got[0].attributes.read_mostly);
    assert_eq!(got[0].residency.get(&Place::Device(d.memory().id())), Some(&16));
    assert!(got[1].attributes.read_mostly && got[1].attributes.preferred == Some(dev));
    assert_eq!(got[1].residency.get(&Place::System), Some(&16));
    assert!(got[2].attributes.read_mostly && got[2].attributes.preferred.is_none());
    assert_eq!(got[3].attributes.accessed_by, vec![d.memory().id()]);
    assert_eq!(got[3].attributes.granularity, 64 << 10);
    assert_eq!(got[4].attributes, hmm::policy::Attributes::default());
    // Undone, the advice leaves one default run.
    p.advise(r.pages_range(0, 32).unwrap(), Advice::UnsetPreferredLocation).unwrap();
    p.advise(r.pages_range(16, 32).unwrap(), Advice::UnsetReadMostly).unwrap();
    p.advise(r.pages_range(40, 8).unwrap(), Advice::UnsetAccessedBy(d.memory().id())).unwrap();
    p.advise(r.pages_range(40, 8).unwrap(), Advice::Granularity(hmm::HUGE_PAGE_SIZE)).unwrap();
    assert_eq!(p.attributes(r.range()).len(), 1);
}

#[test]
fn bad_advice_is_refused_with_what_to_do() {
    if common::skip_without_uffd() {
        return;
    }
    let hmm = Hmm::new().unwrap();
    let p = Placement::new(&hmm).unwrap();
    let r = hmm.alloc(16 * PAGE_SIZE).unwrap();
    let e = p.advise(r.range(), Advice::Granularity(3 * PAGE_SIZE)).unwrap_err();
    assert!(
        matches!(e, PolicyError::BadAdvice(_)) && e.to_string().contains("power of two"),
        "{e}"
    );
    // A device of another instance: this one has none.
    let other = Hmm::new().unwrap();
    let ghost = device(&other, "elsewhere", 4).memory().id();
    let e = p.advise(r.range(), Advice::AccessedBy(ghost)).unwrap_err();
    assert!(matches!(e, PolicyError::UnknownDevice(d) if d == ghost), "{e}");
    let e = p.prefetch(r.range(), Location::Device(ghost)).unwrap_err();
    assert!(e.to_string().contains("not registered"), "{e}");
    let bad = PlacementConfig { prefetch_chunk_pages: 0, ..Default::default() };
    let e = Placement::with_config(&hmm, bad).unwrap_err();
    assert!(e.to_string().contains("at least 1 page"), "{e}");
}

/// A device reading a 2 MiB block a page at a time, in order: with the
/// density rule, each fault brings the rest of a subregion that is mostly
/// there already, so a handful of faults bring the whole block; demand
/// faults alone take one migration per page. The bytes are right either way.
#[test]
fn density_prefetch_brings_a_stream_in_a_few_faults() {
    if common::skip_without_uffd() {
        return;
    }
    let pages = 512;
    for (name, policy) in
        [("density", None), ("demand", Some(Arc::new(DemandOnly) as Arc<dyn Policy>))]
    {
        let hmm = Hmm::new().unwrap();
        let d = device(&hmm, "d", pages);
        let config = match policy {
            Some(policy) => PlacementConfig { policy, ..Default::default() },
            None => PlacementConfig::default(),
        };
        let p = Arc::new(Placement::with_config(&hmm, config).unwrap());
        d.set_placement(Some(p.clone()));
        let r = hmm.alloc_huge(pages * PAGE_SIZE).unwrap();
        let data = pattern(pages, 7);
        r.write(0, &data).unwrap();
        for k in 0..pages {
            let (bytes, _) = d.read(r.pages_range(k, 1).unwrap()).unwrap();
            assert!(bytes[..] == data[k * PAGE_SIZE..(k + 1) * PAGE_SIZE], "{name}: page {k}");
        }
        let on_device = r.residency_map().counts().get(&Place::Device(d.memory().id())).copied();
        assert_eq!(on_device, Some(pages), "{name}: the device touched every page");
        let s = p.stats();
        assert_eq!(s.fault_pages_migrated + s.pages_prefetched, pages as u64, "{name}: {s:?}");
        match name {
            "density" => {
                assert!(s.fault_pages_migrated <= 20, "{name}: {s:?}");
                assert!(s.pages_prefetched >= 490, "{name}: {s:?}");
            }
            _ => assert_eq!(s.pages_prefetched, 0, "{name}: {s:?}"),
        }
        d.set_placement(None);
    }
}

/// Accessed-by and a preferred location elsewhere make the device map
/// pages where they are; with neither, its first touch migrates them.
#[test]
fn attributes_decide_between_migrating_and_mapping() {
    if common::skip_without_uffd() {
        return;
    }
    let hmm = Hmm::new().unwrap();
    let d = device(&hmm, "d", 64);
    let p = Arc::new(Placement::new(&hmm).unwrap());
    d.set_placement(Some(p.clone()));
    let id = d.memory().id();
    let r = hmm.alloc(48 * PAGE_SIZE).unwrap();
    let data = pattern(48, 3);
    r.write(0, &data).unwrap();
    p.advise(r.pages_range(0, 16).unwrap(), Advice::AccessedBy(id)).unwrap();
    p.advise(r.pages_range(16, 16).unwrap(), Advice::PreferredLocation(Location::System)).unwrap();
    // Small blocks: no prefetch across the parts.
    p.advise(r.range(), Advice::Granularity(16 * PAGE_SIZE)).unwrap();
    let (bytes, _) = d.read(r.range()).unwrap();
    assert!(bytes == data);
    let map = r.residency_map();
    let places = map.places();
    assert!(places[..32].iter().all(|x| *x == Place::System), "{:?}", &places[..32]);
    assert!(places[32..].iter().all(|x| *x == Place::Device(id)), "{:?}", &places[32..]);
    let s = p.stats();
    assert_eq!((s.fault_pages_mapped, s.fault_pages_migrated), (32, 16), "{s:?}");
}

#[test]
fn a_prefetch_reports_its_progress_and_refusals() {
    if common::skip_without_uffd() {
        return;
    }
    let hmm = Hmm::new().unwrap();
    let d = device(&hmm, "d", 256);
    let p = Placement::with_config(
        &hmm,
        PlacementConfig { prefetch_chunk_pages: 64, ..Default::default() },
    )
    .unwrap();
    let r = hmm.alloc(1024 * PAGE_SIZE).unwrap();
    let data = pattern(1024, 11);
    r.write(0, &data).unwrap();
    let part = r.pages_range(0, 200).unwrap();
    let to_dev = p.prefetch(part, Location::Device(d.memory().id())).unwrap();
    let done = to_dev.wait(WAIT);
    assert!(done.finished && !done.cancelled && done.error.is_none(), "{done:?}");
    assert_eq!((done.pages_done, done.pages_moved, done.pages_refused()), (200, 200, 0));
    // The device holds 256 pages: of the whole range, 56 more fit.
    let all = p.prefetch(r.range(), Location::Device(d.memory().id())).unwrap().wait(WAIT);
    assert!(all.finished, "{all:?}");
    assert_eq!(all.pages_done, 1024);
    assert_eq!(all.pages_moved, 56);
    assert_eq!(all.refused, vec![(SkipReason::NoDeviceMemory, 768)], "{all:?}");
    // And back: everything on the device comes home, bytes intact.
    let back = p.prefetch(r.range(), Location::System).unwrap().wait(WAIT);
    assert_eq!(
        (back.pages_done, back.pages_moved, back.pages_refused()),
        (1024, 256, 0),
        "{back:?}"
    );
    assert_eq!(d.stats().pages_resident, 0);
    assert!(common::cpu_bytes(&r) == data);
    assert_eq!(p.stats().prefetches, 3);
    assert_eq!(p.stats().prefetch_pages_moved, 512);
}

/// Cancelled while its first chunk waits in a stalled engine: the chunk
/// finishes, nothing after it starts. Dropping the placement ends the
/// prefetches still queued.
#[test]
fn a_prefetch_can_be_cancelled_and_a_dropped_placement_ends_the_rest() {
    if common::skip_without_uffd() {
        return;
    }
    let hmm = Hmm::new().unwrap();
    let d = device(&hmm, "d", 1024);
    let p = Placement::with_config(
        &hmm,
        PlacementConfig { prefetch_chunk_pages: 16, ..Default::default() },
    )
    .unwrap();
    let r = hmm.alloc(512 * PAGE_SIZE).unwrap();
    r.write(0, &pattern(512, 5)).unwrap();
    let to = Location::Device(d.memory().id());
    let stall = d.stall_engine();
    let first = p.prefetch(r.pages_range(0, 256).unwrap(), to).unwrap();
    let second = p.prefetch(r.pages_range(256, 256).unwrap(), to).unwrap();
    common::eventually("the first chunk in the engine", || stall.held() > 0);
    assert!(!first.is_finished());
    first.cancel();
    drop(stall);
    let got = first.wait(WAIT);
    assert!(got.finished && got.cancelled, "{got:?}");
    assert_eq!(got.pages_done, 16, "only the chunk in flight: {got:?}");
    drop(p);
    let rest = second.progress();
    assert!(rest.finished, "{rest:?}");
    assert!(rest.cancelled || rest.pages_done == 256, "{rest:?}");
}

/// A page that a device and the CPU take from each other: the third move
/// within the lapse is throttled, the next pins it in system memory, where
/// the device maps it from then on. Without mitigation, every device touch
/// migrates it.
#[test]
fn ping_pong_is_throttled_then_pinned() {
    if common::skip_without_uffd() {
        return;
    }
    // Lapse and epoch long enough that a slow machine still counts every
    // move together.
    let thrash = ThrashConfig {
        threshold: 3,
        lapse: Duration::from_secs(30),
        nap: Duration::from_millis(1),
        pin_threshold: 2,
        pin: Duration::from_secs(600),
        epoch: Duration::from_secs(600),
    };
    for mitigate in [true, false] {
        let hmm = Hmm::new().unwrap();
        let d = device(&hmm, "d", 16);
        let config = PlacementConfig { thrash: mitigate.then_some(thrash), ..Default::default() };
        let p = Arc::new(Placement::with_config(&hmm, config).unwrap());
        d.set_placement(Some(p.clone()));
        let r = hmm.alloc(PAGE_SIZE).unwrap();
        r.write(0, &[1u8; 8]).unwrap();
        let id = d.memory().id();
        let mut on_device = Vec::new();
        for round in 0..6u8 {
            d.write(r.range().start(), &[round; 8]).unwrap();
            on_device.push(r.residency_map().places()[0] == Place::Device(id));
            let mut b = [0u8; 8];
            r.read(0, &mut b).unwrap();
            assert_eq!(b, [round; 8], "round {round}: the CPU reads what the device wrote");
        }
        let s = p.stats();
        if mitigate {
            assert_eq!(on_device, [true, true, true, false, false, false], "{s:?}");
            assert_eq!((s.throttles, s.pins, s.pinned_maps), (1, 1, 1), "{s:?}");
            assert_eq!(s.thrash_detected, 2, "{s:?}");
            // Mapped where it is, the page faults the device no more.
            assert_eq!(s.device_faults, 4, "{s:?}");
        } else {
            assert!(on_device.iter().all(|x| *x), "{on_device:?}");
            assert_eq!(s.fault_pages_migrated, 6, "{s:?}");
            assert_eq!(s.thrash_detected, 0);
        }
        d.set_placement(None);
    }
}

/// A policy of one's own decides every faulted page.
#[test]
fn a_policy_of_ones_own_decides_device_faults() {
    if common::skip_without_uffd() {
        return;
    }
    struct MapEven(AtomicUsize);
    impl Policy for MapEven {
        fn name(&self) -> &str {
            "map-even"
        }
        fn on_device_fault(&self, f: &FaultContext<'_>) -> Decision {
            self.0.fetch_add(1, Ordering::Relaxed);
            match (f.page.get() / PAGE_SIZE) % 2 {
                0 => Decision::Map,
                _ => Decision::Migrate,
            }
        }
        fn prefetch(&self, block: &hmm::policy::BlockContext<'_>) -> Vec<bool> {
            (0..block.pages.pages()).map(|i| block.pages.is_faulted(i)).collect()
        }
    }
    let hmm = Hmm::new().unwrap();
    let d = device(&hmm, "d", 64);
    let policy = Arc::new(MapEven(AtomicUsize::new(0)));
    let config = PlacementConfig { policy: policy.clone(), ..Default::default() };
    let p = Arc::new(Placement::with_config(&hmm, config).unwrap());
    assert_eq!(p.policy().name(), "map-even");
    d.set_placement(Some(p.clone()));
    let r = hmm.alloc(32 * PAGE_SIZE).unwrap();
    let data = pattern(32, 9);
    r.write(0, &data).unwrap();
    let (bytes, _) = d.read(r.range()).unwrap();
    assert!(bytes == data);
    assert_eq!(policy.0.load(Ordering::Relaxed), 32, "asked once per page");
    let places = r.residency_map().places().to_vec();
    for (k, x) in places.iter().enumerate() {
        let page = (r.range().start().get() / PAGE_SIZE) + k;
        let want =
            if page.is_multiple_of(2) { Place::System } else { Place::Device(d.memory().id()) };
        assert_eq!(*x, want, "page {k}");
    }
    assert_eq!((p.stats().fault_pages_mapped, p.stats().fault_pages_migrated), (16, 16));
}

fn system_pages(r: &hmm::ManagedRange) -> usize {
    r.residency_map().counts().get(&Place::System).copied().unwrap_or(0)
}

/// Whether at most `limit` pages of `r` are in system memory and none is on
/// its way anywhere.
fn within(r: &hmm::ManagedRange, limit: usize) -> bool {
    let counts = r.residency_map().counts();
    !counts.contains_key(&Place::Migrating)
        && counts.get(&Place::System).copied().unwrap_or(0) <= limit
}

/// A budget of 64 pages over 256: the coldest go to a compressed tier until
/// the set fits, every byte reads back, and what a touch brings back counts
/// as promoted.
#[test]
fn a_budget_keeps_the_set_within_its_limit_and_loses_nothing() {
    if common::skip_without_uffd() {
        return;
    }
    let hmm = Hmm::new().unwrap();
    let tier = compressed_tier(&hmm);
    let p = Placement::new(&hmm).unwrap();
    let r = hmm.alloc(256 * PAGE_SIZE).unwrap();
    let data = pattern(256, 21);
    r.write(0, &data).unwrap();
    let b = p.set_budget(&[r.range()], tier.memory(), BudgetConfig::new(64 * PAGE_SIZE)).unwrap();
    common::eventually("the set within its budget", || within(&r, 64));
    let s = b.next_scan(WAIT).expect("a scan");
    assert!(s.resident <= 64 * PAGE_SIZE && s.demoted >= 192, "{s:?}");
    assert_eq!(s.limit, 64 * PAGE_SIZE);
    let on_tier = r.residency_map().counts().get(&Place::Device(tier.memory().id())).copied();
    assert_eq!(on_tier, Some(256 - system_pages(&r)));
    // Every byte back, through the CPU's faults.
    assert!(common::cpu_bytes(&r) == data);
    let s = b.next_scan(WAIT).expect("a scan");
    assert!(s.promoted > 0, "the reads' fault-backs are promotions: {s:?}");
    common::eventually("the set within its budget again", || within(&r, 64));
    drop(b);
    assert!(common::cpu_bytes(&r) == data);
}

/// Pages a touch brought back from the tier are hot: the budget makes room
/// from pages never seen hot first, so touching the hot pages again faults
/// nothing more.
#[test]
fn pages_seen_hot_stay_in_system_memory() {
    if common::skip_without_uffd() {
        return;
    }
    // No fault-around: a touch brings back its own page only.
    let config = hmm::HmmConfig { fault_around_pages: 0, ..Default::default() };
    let hmm = Hmm::with_config(config).unwrap();
    let tier = compressed_tier(&hmm);
    let p = Placement::new(&hmm).unwrap();
    let r = hmm.alloc(256 * PAGE_SIZE).unwrap();
    r.write(0, &pattern(256, 5)).unwrap();
    let b = p.set_budget(&[r.range()], tier.memory(), BudgetConfig::new(64 * PAGE_SIZE)).unwrap();
    common::eventually("the set within its budget", || within(&r, 64));
    // The lowest addresses went first: pages 16..24 are on the tier.
    let hot = 16..24;
    let places = r.residency_map().places().to_vec();
    assert!(hot.clone().all(|k| places[k] == Place::Device(tier.memory().id())), "{places:?}");
    let touch = || {
        for k in hot.clone() {
            r.touch_read(k * PAGE_SIZE).unwrap();
        }
    };
    touch();
    let before = b.next_scan(WAIT).expect("a scan").promoted;
    assert!(before >= 8, "the touches were promotions");
    for round in 0..3 {
        touch();
        let s = b.next_scan(WAIT).expect("a scan");
        assert_eq!(s.promoted, before, "round {round}: a hot page was demoted again: {s:?}");
        assert!(s.resident <= 64 * PAGE_SIZE, "{s:?}");
    }
    let places = r.residency_map().places().to_vec();
    assert!(hot.clone().all(|k| places[k] == Place::System), "{places:?}");
}

#[test]
fn a_budget_needs_memory_and_a_tier_of_its_instance() {
    if common::skip_without_uffd() {
        return;
    }
    let hmm = Hmm::new().unwrap();
    let p = Placement::new(&hmm).unwrap();
    let tier = device(&hmm, "t", 16);
    let e = p.set_budget(&[], tier.memory(), BudgetConfig::new(0)).unwrap_err();
    assert!(e.to_string().contains("no memory"), "{e}");
    let r = hmm.alloc(16 * PAGE_SIZE).unwrap();
    let other = Hmm::new().unwrap();
    let elsewhere = device(&other, "elsewhere", 16);
    let e = p.set_budget(&[r.range()], elsewhere.memory(), BudgetConfig::new(0)).unwrap_err();
    assert!(matches!(e, PolicyError::UnknownDevice(_)), "{e}");
    let zero = BudgetConfig { interval: Duration::ZERO, ..BudgetConfig::new(0) };
    let e = p.set_budget(&[r.range()], tier.memory(), zero).unwrap_err();
    assert!(e.to_string().contains("interval"), "{e}");
}

/// Read-mostly pages: each device that reads them keeps a copy, and the
/// pages stay in system memory; a CPU write drops every copy before it
/// lands, so the next device read sees it; a device's write collapses the
/// copies (the writer takes the page), and the other device then reads
/// what it wrote.
#[test]
fn read_mostly_pages_are_duplicated_and_a_write_collapses_the_copies() {
    if common::skip_without_uffd() {
        return;
    }
    let hmm = Hmm::new().unwrap();
    let a = device(&hmm, "a", 64);
    let b = device(&hmm, "b", 64);
    let p = Arc::new(Placement::new(&hmm).unwrap());
    a.set_placement(Some(p.clone()));
    b.set_placement(Some(p.clone()));
    let r = hmm.alloc(16 * PAGE_SIZE).unwrap();
    let mut data = pattern(16, 40);
    r.write(0, &data).unwrap();
    p.advise(r.range(), Advice::ReadMostly).unwrap();
    for d in [&a, &b] {
        let (bytes, _) = d.read(r.range()).unwrap();
        assert!(bytes == data);
        assert_eq!(d.mirror_stats().duplicates, 16, "{}: a copy of every page", d.memory().name());
    }
    assert_eq!(p.stats().fault_pages_duplicated, 32);
    assert!(r.residency_map().places().iter().all(|x| *x == Place::System), "copies, not moves");
    // The CPU writes page 3: both copies go before the write lands.
    let writes = hmm.tracked_writes();
    r.write(3 * PAGE_SIZE, &[0xEE; 8]).unwrap();
    data[3 * PAGE_SIZE..3 * PAGE_SIZE + 8].copy_from_slice(&[0xEE; 8]);
    assert!(hmm.tracked_writes() > writes, "the write was caught");
    assert_eq!(a.mirror_stats().duplicates, 15);
    assert_eq!(b.mirror_stats().duplicates, 15);
    for d in [&a, &b] {
        let (bytes, _) = d.read(r.pages_range(3, 1).unwrap()).unwrap();
        assert!(bytes[..] == data[3 * PAGE_SIZE..4 * PAGE_SIZE], "the new bytes, copied again");
    }
    // Device a writes page 5: it takes the page, b's copy goes, and b then
    // reads a's bytes.
    a.write(r.pages_range(5, 1).unwrap().start(), &[0x55; 8]).unwrap();
    data[5 * PAGE_SIZE..5 * PAGE_SIZE + 8].copy_from_slice(&[0x55; 8]);
    assert_eq!(r.residency_map().places()[5], Place::Device(a.memory().id()));
    let (bytes, _) = b.read(r.range()).unwrap();
    assert!(bytes == data, "b reads every page as it is now");
    assert!(common::cpu_bytes(&r) == data);
}

/// A device whose duplicate cache is full maps the rest where they are.
#[test]
fn a_full_duplicate_cache_maps_the_rest() {
    if common::skip_without_uffd() {
        return;
    }
    let hmm = Hmm::new().unwrap();
    let config = SoftwareDeviceConfig::new("d", 64 * PAGE_SIZE).with_duplicate_pages(4);
    let d = SoftwareDevice::new(&hmm, config).unwrap();
    let p = Arc::new(Placement::new(&hmm).unwrap());
    d.set_placement(Some(p.clone()));
    let r = hmm.alloc(16 * PAGE_SIZE).unwrap();
    let data = pattern(16, 2);
    r.write(0, &data).unwrap();
    p.advise(r.range(), Advice::ReadMostly).unwrap();
    let (bytes, _) = d.read(r.range()).unwrap();
    assert!(bytes == data);
    let s = d.mirror_stats();
    assert_eq!((s.duplicates, s.entries), (4, 16), "{s:?}");
    assert!(r.residency_map().places().iter().all(|x| *x == Place::System));
    // Dropping the copies gives the slots back.
    r.write(0, &data).unwrap();
    assert_eq!(d.mirror_stats().duplicates, 0);
}

/// A full device makes room for a fault with the policy's victims: the
/// default evicts the least recently used page, a policy of one's own may
/// evict the most recently used instead.
#[test]
fn a_policy_chooses_what_a_full_device_evicts() {
    if common::skip_without_uffd() {
        return;
    }
    struct Mru;
    impl Policy for Mru {
        fn prefetch(&self, block: &hmm::policy::BlockContext<'_>) -> Vec<bool> {
            (0..block.pages.pages()).map(|i| block.pages.is_faulted(i)).collect()
        }
        fn eviction_victims(
            &self,
            device: &hmm::DeviceMemory,
            want: usize,
        ) -> Vec<hmm::DevicePage> {
            let mut all = device.coldest(device.capacity_pages() as usize);
            all.reverse();
            all.truncate(want);
            all
        }
    }
    for (name, policy) in [("lru", Arc::new(DemandOnly) as Arc<dyn Policy>), ("mru", Arc::new(Mru))]
    {
        let hmm = Hmm::new().unwrap();
        let d = device(&hmm, "d", 8);
        let config = PlacementConfig { policy, ..Default::default() };
        let p = Arc::new(Placement::with_config(&hmm, config).unwrap());
        d.set_placement(Some(p.clone()));
        let r = hmm.alloc(9 * PAGE_SIZE).unwrap();
        let data = pattern(9, 77);
        r.write(0, &data).unwrap();
        // Pages 0..8 in order fill the device; page 8 needs room.
        for k in 0..9 {
            let (bytes, _) = d.read(r.pages_range(k, 1).unwrap()).unwrap();
            assert!(bytes[..] == data[k * PAGE_SIZE..(k + 1) * PAGE_SIZE], "{name}: page {k}");
        }
        let places = r.residency_map().places().to_vec();
        let gone = if name == "lru" { 0 } else { 7 };
        for (k, x) in places.iter().enumerate() {
            let want = if k == gone { Place::System } else { Place::Device(d.memory().id()) };
            assert_eq!(*x, want, "{name}: page {k} of {places:?}");
        }
        assert_eq!(p.stats().pages_evicted, 1, "{name}");
        assert!(common::cpu_bytes(&r) == data, "{name}");
    }
}

/// A budget demotes in the policy's order.
#[test]
fn a_policy_orders_what_a_budget_demotes() {
    if common::skip_without_uffd() {
        return;
    }
    struct HighestFirst;
    impl Policy for HighestFirst {
        fn demotion_order(&self, candidates: &mut [hmm::policy::Demotion]) {
            candidates.sort_by_key(|c| std::cmp::Reverse(c.addr));
        }
    }
    let hmm = Hmm::new().unwrap();
    let tier = compressed_tier(&hmm);
    let config = PlacementConfig { policy: Arc::new(HighestFirst), ..Default::default() };
    let p = Placement::with_config(&hmm, config).unwrap();
    let r = hmm.alloc(256 * PAGE_SIZE).unwrap();
    r.write(0, &pattern(256, 8)).unwrap();
    let _b = p.set_budget(&[r.range()], tier.memory(), BudgetConfig::new(192 * PAGE_SIZE)).unwrap();
    common::eventually("the set within its budget", || within(&r, 192));
    let places = r.residency_map().places().to_vec();
    assert!(places[..192].iter().all(|x| *x == Place::System), "{places:?}");
    assert!(places[192..].iter().all(|x| *x == Place::Device(tier.memory().id())), "{places:?}");
}
