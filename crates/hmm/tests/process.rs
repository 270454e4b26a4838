//! A process's whole life with hmm: fork, remap, partial unmap, concurrent
//! teardown, pins, files. Each test checks the data byte for byte and that no
//! device page is left behind.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;

use hmm::os::process::{ChildOutcome, run_in_child, spawn_child};
use hmm::{Hmm, PAGE_SIZE, Residency};
use hmm_swdev::{SoftwareDevice, SoftwareDeviceConfig};

fn device(hmm: &Hmm, name: &str, pages: usize) -> SoftwareDevice {
    SoftwareDevice::new(hmm, SoftwareDeviceConfig::new(name, pages * PAGE_SIZE)).expect("device")
}

/// Page `i` holds the word `seed + i`, repeated.
fn pattern(pages: usize, seed: u64) -> Vec<u8> {
    (0..pages as u64).flat_map(|i| (seed + i).to_ne_bytes().repeat(PAGE_SIZE / 8)).collect()
}

/// Fork with pages on a device, in system memory and never touched: the
/// child reads the fork-time data everywhere; what the parent's device and
/// CPU write after the fork stays the parent's, what the child writes stays
/// the child's; the parent's device pages are all accounted for.
#[test]
fn fork_gives_the_child_the_fork_time_data_and_isolates_both_sides() {
    if common::skip_without("event-fork") {
        return;
    }
    let _fork = common::fork_lock();
    let hmm = Hmm::new().unwrap();
    let dev = device(&hmm, "d", 256);
    let pages = 64;
    let r = hmm.alloc(pages * PAGE_SIZE).unwrap();
    let data = pattern(48, 1000);
    r.write(0, &data).unwrap();
    assert_eq!(dev.migrate_to_device(r.pages_range(0, 32).unwrap()).unwrap().migrated, 32);
    let mut want = data.clone();
    want.resize(pages * PAGE_SIZE, 0);
    let (mut parent_end, mut child_end) = UnixStream::pair().unwrap();
    let child = spawn_child(|| {
        // Wait until the parent has written after the fork.
        let mut b = [0u8; 1];
        if child_end.read_exact(&mut b).is_err() {
            return 2;
        }
        let mut got = vec![0u8; pages * PAGE_SIZE];
        if r.mapping().read(0, &mut got).is_err() {
            return 3;
        }
        if let Some(p) = common::first_wrong_page(&got, &want) {
            return 10 + p as i32;
        }
        // The child's own writes.
        if r.mapping().fill(0, r.len(), 0x5A).is_err() {
            return 4;
        }
        0
    })
    .unwrap();
    assert_eq!(hmm.forks(), (1, 32), "the child got its copy before fork returned");
    // After the fork: the parent's device writes pages 0..8 (on the device),
    // its CPU writes pages 32..40 (system) and 50 (never touched).
    dev.write(r.addr(), &[0xEE; 8 * PAGE_SIZE]).unwrap();
    r.fill(32 * PAGE_SIZE, 8 * PAGE_SIZE, 0xCC).unwrap();
    r.fill(50 * PAGE_SIZE, PAGE_SIZE, 0xDD).unwrap();
    parent_end.write_all(&[1]).unwrap();
    assert_eq!(
        child.wait_within(common::CHILD_LIMIT).unwrap(),
        ChildOutcome::Exited(0),
        "10 + page: the child read it wrong"
    );
    let mut mine = want.clone();
    mine[..8 * PAGE_SIZE].fill(0xEE);
    mine[32 * PAGE_SIZE..40 * PAGE_SIZE].fill(0xCC);
    mine[50 * PAGE_SIZE..51 * PAGE_SIZE].fill(0xDD);
    let (through_device, _) = dev.read(r.range()).unwrap();
    assert_eq!(
        common::first_wrong_page(&through_device, &mine),
        None,
        "the parent's data, seen by its device"
    );
    let mut got = vec![0u8; r.len()];
    r.read(0, &mut got).unwrap();
    assert_eq!(common::first_wrong_page(&got, &mine), None, "the parent's data, seen by its CPU");
    drop(r);
    assert_eq!(dev.stats().pages_resident, 0, "no device page left behind");
}

/// A fork with more device pages than one copying thread takes (the copy is
/// split between threads, one a CPU): the child finds every page at its own
/// place, and zeros where nothing was ever written, which it may touch as
/// soon as it runs (its descriptor may still be closing then).
#[test]
fn a_large_fork_copy_puts_every_page_in_place() {
    if common::skip_without("event-fork") {
        return;
    }
    let _fork = common::fork_lock();
    let hmm = Hmm::new().unwrap();
    // Three threads' worth and a remainder, then pages never touched.
    let on_device = 3 * 4096 + 5;
    let pages = on_device + 64;
    let dev = device(&hmm, "d", on_device);
    let r = hmm.alloc(pages * PAGE_SIZE).unwrap();
    let data = pattern(on_device, 7);
    r.write(0, &data).unwrap();
    let moved = dev.migrate_to_device(r.pages_range(0, on_device).unwrap()).unwrap();
    assert_eq!(moved.migrated, on_device, "{moved:?}");
    let mut want = data;
    want.resize(pages * PAGE_SIZE, 0);
    let child = spawn_child(|| {
        // The never-touched tail first: the descriptor may be closing.
        let mut tail = vec![1u8; 64 * PAGE_SIZE];
        if r.mapping().read(on_device * PAGE_SIZE, &mut tail).is_err() {
            return 3;
        }
        if tail.iter().any(|b| *b != 0) {
            return 4;
        }
        let mut got = vec![0u8; pages * PAGE_SIZE];
        if r.mapping().read(0, &mut got).is_err() {
            return 5;
        }
        match common::first_wrong_page(&got, &want) {
            Some(p) => 10 + p as i32,
            None => 0,
        }
    })
    .unwrap();
    assert_eq!(hmm.forks(), (1, on_device as u64), "the child got every page before fork returned");
    assert_eq!(
        child.wait_within(common::CHILD_LIMIT).unwrap(),
        ChildOutcome::Exited(0),
        "3, 4: the untouched tail was not zeros; 10 + page: the child read that page wrong"
    );
    // The parent's pages are where they were, and read the same.
    assert!(r.residencies()[..on_device].iter().all(|x| matches!(x, Residency::Device(_))));
    let mut got = vec![0u8; r.len()];
    r.read(0, &mut got).unwrap();
    assert_eq!(common::first_wrong_page(&got, &want), None, "the parent's data");
}

/// Pages a device held exclusively are handed back at fork: the device's
/// exclusive access ends, and both sides read the data.
#[test]
fn fork_hands_back_exclusive_pages() {
    if common::skip_without("event-fork") {
        return;
    }
    let _fork = common::fork_lock();
    let hmm = Hmm::new().unwrap();
    let dev = device(&hmm, "d", 64);
    let r = hmm.alloc(8 * PAGE_SIZE).unwrap();
    let data = pattern(8, 7);
    r.write(0, &data).unwrap();
    dev.make_exclusive(r.range()).unwrap();
    assert!(dev.check_exclusive(r.range()).is_err(), "held before the fork");
    let out = run_in_child(common::CHILD_LIMIT, || {
        let mut got = vec![0u8; 8 * PAGE_SIZE];
        r.mapping().read(0, &mut got).map(|_| i32::from(got != data)).unwrap_or(2)
    })
    .unwrap();
    assert_eq!(out, ChildOutcome::Exited(0), "the child reads the data");
    dev.check_exclusive(r.range()).expect("exclusive access ended at the fork");
    let mut got = vec![0u8; r.len()];
    r.read(0, &mut got).unwrap();
    assert_eq!(got, data);
}

/// The child uses hmm itself: its own instance and device, on memory it
/// inherited (taken over with `MREMAP_DONTUNMAP`) and on memory of its own;
/// the parent's pages stay where they were.
#[test]
fn the_child_uses_hmm_itself() {
    if common::skip_without("event-fork") {
        return;
    }
    let _fork = common::fork_lock();
    let hmm = Hmm::new().unwrap();
    let dev = device(&hmm, "d", 64);
    let r = hmm.alloc(16 * PAGE_SIZE).unwrap();
    let data = pattern(16, 3);
    r.write(0, &data).unwrap();
    dev.migrate_to_device(r.range()).unwrap();
    let out = run_in_child(common::CHILD_LIMIT, || {
        let Ok(h) = Hmm::new() else { return 2 };
        let d = device(&h, "child", 64);
        let Ok(inherited) = r.mapping().remap_dontunmap() else { return 3 };
        let Ok(mine) = h.adopt(inherited) else { return 4 };
        if d.migrate_to_device(mine.range()).map(|rep| rep.migrated).ok() != Some(16) {
            return 5;
        }
        let mut got = vec![0u8; mine.len()];
        if mine.read(0, &mut got).is_err() || got != data {
            return 6;
        }
        i32::from(d.stats().pages_resident != 0) * 7
    })
    .unwrap();
    assert_eq!(out, ChildOutcome::Exited(0));
    assert!(r.residencies().iter().all(|x| matches!(x, Residency::Device(_))));
    let mut got = vec![0u8; r.len()];
    r.read(0, &mut got).unwrap();
    assert_eq!(got, data);
}

/// A parent that exits at once after `fork()` leaves a complete child: the
/// child's pages were all copied before `fork()` returned.
#[test]
fn a_parent_exiting_first_leaves_the_child_whole() {
    if common::skip_without("event-fork") {
        return;
    }
    let _fork = common::fork_lock();
    let (mut report, mut grandchild_end) = UnixStream::pair().unwrap();
    let out = run_in_child(common::CHILD_LIMIT, || {
        let Ok(hmm) = Hmm::new() else { return 2 };
        let dev = device(&hmm, "d", 64);
        let Ok(r) = hmm.alloc(32 * PAGE_SIZE) else { return 3 };
        let data = pattern(32, 77);
        if r.write(0, &data).is_err() || dev.migrate_to_device(r.range()).is_err() {
            return 4;
        }
        let me = rustix::process::getpid();
        let grandchild = spawn_child(|| {
            // Until its parent (this child) is gone, which it is at once.
            let deadline = std::time::Instant::now() + common::CHILD_LIMIT;
            while rustix::process::getppid() == Some(me) {
                if std::time::Instant::now() > deadline {
                    return 1;
                }
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            let mut got = vec![0u8; 32 * PAGE_SIZE];
            let ok = r.mapping().read(0, &mut got).is_ok() && got == data;
            let _ = grandchild_end.write_all(&[u8::from(ok)]);
            0
        });
        // Exit at once, without waiting for the grandchild.
        std::mem::forget(grandchild);
        0
    })
    .unwrap();
    assert_eq!(out, ChildOutcome::Exited(0));
    // Only the grandchild holds its end now: it reports, or its end closes.
    drop(grandchild_end);
    let mut b = [0u8; 1];
    report.set_read_timeout(Some(common::CHILD_LIMIT)).unwrap();
    report.read_exact(&mut b).expect("the grandchild reports within the child limit");
    assert_eq!(b[0], 1, "the orphaned child read every page");
}

/// System calls on device-resident buffers (`read(2)`, `write(2)`,
/// `process_vm_readv`, `O_DIRECT` reads and writes): the kernel's own access
/// faults each page back, and the bytes are right both ways; pins nest.
#[test]
fn system_calls_and_pins_on_device_resident_buffers() {
    if common::skip_without_uffd() {
        return;
    }
    let _fork = common::fork_lock();
    // The kernel's accesses wait for a fault in this mode only (see
    // tests/inthread.rs for `FaultMode::InThread`).
    let hmm = Hmm::with_config(hmm::HmmConfig {
        fault_mode: hmm::FaultMode::Service,
        ..hmm::HmmConfig::default()
    })
    .unwrap();
    let dev = device(&hmm, "d", 64);
    let r = hmm.alloc(8 * PAGE_SIZE).unwrap();
    let data = pattern(8, 40);
    r.write(0, &data).unwrap();
    dev.migrate_to_device(r.range()).unwrap();
    let (rd, mut wr) = std::io::pipe().unwrap();
    wr.write_all(&[0xAB; 100]).unwrap();
    assert_eq!(r.mapping().read_from(PAGE_SIZE + 8, 100, &rd).unwrap(), 100);
    let mut want = data.clone();
    want[PAGE_SIZE + 8..PAGE_SIZE + 108].fill(0xAB);
    let mut got = vec![0u8; r.len()];
    r.read(0, &mut got).unwrap();
    assert_eq!(common::first_wrong_page(&got, &want), None);
    // write(2) from a device-resident buffer, and process_vm_readv of one.
    dev.migrate_to_device(r.range()).unwrap();
    let (mut rd, wr) = std::io::pipe().unwrap();
    assert_eq!(r.mapping().write_to(2 * PAGE_SIZE, 64, &wr).unwrap(), 64);
    let mut piped = [0u8; 64];
    rd.read_exact(&mut piped).unwrap();
    assert_eq!(piped[..], want[2 * PAGE_SIZE..2 * PAGE_SIZE + 64]);
    let mut peeked = vec![0u8; PAGE_SIZE];
    let at = r.pages_range(5, 1).unwrap().start();
    assert_eq!(hmm::os::vm::read_memory(at, &mut peeked), Ok(PAGE_SIZE));
    assert!(peeked[..] == want[5 * PAGE_SIZE..6 * PAGE_SIZE], "process_vm_readv sees the data");
    // O_DIRECT I/O both ways, where the file system allows it: the device
    // DMA of the disk (here the kernel's copy) reaches the right pages.
    o_direct_round_trip(&r, &dev, &mut want);
    // Two pins over page 3: it stays until both are gone.
    dev.migrate_to_device(r.range()).unwrap();
    let a = r.pin(r.pages_range(2, 2).unwrap()).unwrap();
    let b = r.pin(r.pages_range(3, 2).unwrap()).unwrap();
    assert_eq!(a.range(), r.pages_range(2, 2).unwrap());
    drop(a);
    let rep = dev.migrate_to_device(r.range()).unwrap();
    assert_eq!(rep.count(&hmm::SkipReason::Pinned), 2, "pages 3 and 4 stay: {:?}", rep.skipped);
    drop(b);
    assert_eq!(dev.migrate_to_device(r.range()).unwrap().migrated, 2);
    r.read(0, &mut got).unwrap();
    assert_eq!(common::first_wrong_page(&got, &want), None);
    // A pin of an unmapped part is refused, naming it.
    r.unmap(r.pages_range(7, 1).unwrap()).unwrap();
    common::eventually("the unmap is seen", || r.residency(7) == Residency::Unmapped);
    assert!(r.pin(r.pages_range(6, 2).unwrap()).is_err());
    drop(r);
    assert_eq!(dev.stats().pages_resident, 0);
}

/// Writes pages 0..2 of `r` (device-resident) to a file opened with
/// `O_DIRECT`, reads them back with `O_DIRECT` into pages 6..8 (also
/// device-resident), and checks both.
fn o_direct_round_trip(r: &hmm::ManagedRange, dev: &SoftwareDevice, want: &mut [u8]) {
    use std::os::unix::fs::OpenOptionsExt;
    /// `O_DIRECT` on the machines hmm supports (x86-64 and arm64 differ; the
    /// test runs where the value is known).
    #[cfg(target_arch = "x86_64")]
    const O_DIRECT: i32 = 0o40000;
    #[cfg(target_arch = "aarch64")]
    const O_DIRECT: i32 = 0o200000;
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("hmm-odirect-{}", std::process::id()));
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(O_DIRECT)
        .open(&path);
    let _ = std::fs::remove_file(&path);
    let file = match file {
        Ok(f) => f,
        Err(e) => {
            eprintln!("skipping the O_DIRECT part: {e}");
            return;
        }
    };
    dev.migrate_to_device(r.range()).unwrap();
    match r.mapping().write_to(0, 2 * PAGE_SIZE, &file) {
        Ok(n) => assert_eq!(n, 2 * PAGE_SIZE),
        Err(e) => {
            eprintln!("skipping the O_DIRECT part: the file system refused the write: {e}");
            return;
        }
    }
    use std::io::Seek;
    (&file).seek(std::io::SeekFrom::Start(0)).unwrap();
    dev.migrate_to_device(r.range()).unwrap();
    assert_eq!(r.mapping().read_from(6 * PAGE_SIZE, 2 * PAGE_SIZE, &file).unwrap(), 2 * PAGE_SIZE);
    want.copy_within(0..2 * PAGE_SIZE, 6 * PAGE_SIZE);
    let mut got = vec![0u8; r.len()];
    r.read(0, &mut got).unwrap();
    assert_eq!(common::first_wrong_page(&got, want), None, "O_DIRECT moved the right bytes");
}

/// How a test moves part of a managed range with the application's own
/// `mremap`.
#[derive(Debug, Clone, Copy)]
enum Remap {
    /// `MREMAP_MAYMOVE | MREMAP_FIXED`: the old part is unmapped.
    Move,
    /// `MREMAP_DONTUNMAP`: the old part stays mapped, empty.
    DontUnmap,
}

fn remap(r: &hmm::ManagedRange, part: hmm::PageRange, how: Remap) -> hmm::os::mm::Mapping {
    match how {
        Remap::Move => r.mapping().move_part(part).unwrap(),
        Remap::DontUnmap => r.mapping().remap_part_dontunmap(part).unwrap(),
    }
}

/// `mremap` of a range with device-resident pages, whole or in part, moving
/// or with `MREMAP_DONTUNMAP`: the moved bytes are all at the new address
/// (device pages come back there), the device no longer maps the old
/// address, the old part reads as the kind of `mremap` says, the rest of the
/// range keeps its device pages and its bytes, and no device page is left
/// behind.
#[test]
fn mremap_brings_device_pages_to_the_new_address() {
    if common::skip_without("event-remap") {
        return;
    }
    let _fork = common::fork_lock();
    let pages = 64;
    for how in [Remap::Move, Remap::DontUnmap] {
        for (first, count) in [(0, pages), (0, 8), (20, 12), (56, 8)] {
            let case = format!("{how:?} of pages {first}..{}", first + count);
            let hmm = Hmm::new().unwrap();
            let dev = device(&hmm, "d", 256);
            let r = hmm.alloc(pages * PAGE_SIZE).unwrap();
            let data = pattern(pages, 7);
            r.write(0, &data).unwrap();
            // Pages 0..48 on the device, 48..64 in system memory.
            assert_eq!(dev.migrate_to_device(r.pages_range(0, 48).unwrap()).unwrap().migrated, 48);
            // The device maps the whole range, so the remap must invalidate it.
            let (seen, _) = dev.read(r.range()).unwrap();
            assert_eq!(seen, data);
            let part = r.pages_range(first, count).unwrap();
            let on_device_moved = (first..first + count).filter(|p| *p < 48).count() as u64;
            let invalidations = dev.mirror_stats().invalidations;
            let moved = remap(&r, part, how);
            let mut got = vec![0u8; part.len()];
            moved.read(0, &mut got).unwrap();
            let want = &data[first * PAGE_SIZE..(first + count) * PAGE_SIZE];

            assert_eq!(
                common::first_wrong_page(&got, want),
                None,
                "{case}: the new address has the data"
            );
            common::eventually("the moved device pages freed", || {
                dev.stats().pages_resident == 48 - on_device_moved
            });
            match how {
                Remap::Move => {
                    common::eventually("the old part recorded unmapped", || {
                        (first..first + count).all(|p| r.residency(p) == Residency::Unmapped)
                    });
                    // The old part is no longer the range's: a device reads
                    // whatever the kernel has mapped there since (or is
                    // refused); the handle refuses it.
                    if let Ok((old, _)) = dev.read(part) {
                        assert_ne!(old, want, "{case}: the old part still holds the data");
                    }
                    let mut b = [0u8; 1];
                    assert!(
                        matches!(
                            r.read(first * PAGE_SIZE, &mut b),
                            Err(hmm::RangeError::Unmapped(_))
                        ),
                        "{case}: the handle refuses the old part"
                    );
                }
                Remap::DontUnmap => {
                    let (old, _) = dev.read(part).unwrap();
                    assert!(
                        old.iter().all(|b| *b == 0),
                        "{case}: the device sees the old part empty"
                    );
                    let mut cpu = vec![1u8; part.len()];
                    r.read(first * PAGE_SIZE, &mut cpu).unwrap();
                    assert!(cpu.iter().all(|b| *b == 0), "{case}: the CPU sees the old part empty");
                }
            }
            // The device read above began after `mremap` returned: the mirror
            // had been invalidated by then (the service handles the REMAP
            // event after the call returns, and a device access waits for it).
            assert!(dev.mirror_stats().invalidations > invalidations, "{case}: mirror invalidated");
            // The rest of the range is untouched, wherever it lives.
            for p in (0..pages).filter(|p| !(first..first + count).contains(p)) {
                let mut page = vec![0u8; PAGE_SIZE];
                r.read(p * PAGE_SIZE, &mut page).unwrap();
                assert!(page[..] == data[p * PAGE_SIZE..(p + 1) * PAGE_SIZE], "{case}: page {p}");
            }
            drop(moved);
            drop(r);
            common::eventually("every device page freed", || dev.stats().pages_resident == 0);
        }
    }
}

/// `mremap` of device pages whose copy to the new address meets another
/// change of the address space (an unmap elsewhere) that the fault service
/// has not read yet, for longer than an install keeps trying: the forward
/// waits for the service and tries again, rather than give the page up,
/// and the new address reads the page's bytes.
///
/// Arranged with two stalls: the copy engine's, so that the copy runs only
/// once the unmap is under way, and the fault service's (stopped at a touch
/// of another range), so that the unmap's event stays unread meanwhile.
#[test]
fn a_remap_whose_copy_meets_an_unread_change_still_delivers() {
    if common::skip_without("event-remap") {
        return;
    }
    let _fork = common::fork_lock();
    let pages = 4;
    let hmm = Hmm::new().unwrap();
    let config = SoftwareDeviceConfig::new("copy", 64 * PAGE_SIZE).with_copy_engine(1);
    let dev = SoftwareDevice::new(&hmm, config).unwrap();
    let r = hmm.alloc(pages * PAGE_SIZE).unwrap();
    let data = pattern(pages, 11);
    r.write(0, &data).unwrap();
    assert_eq!(dev.migrate_to_device(r.range()).unwrap().migrated, pages);
    let untouched = hmm.alloc(4 * PAGE_SIZE).unwrap();
    let doomed = hmm.alloc(4 * PAGE_SIZE).unwrap();
    let engine = dev.stall_engine();
    let moved = remap(&r, r.range(), Remap::DontUnmap);
    common::eventually("the forward's copy waits on the engine", || engine.held() >= 1);
    let service = hmm.stall_next_fault();
    std::thread::scope(|s| {
        let toucher = s.spawn(|| untouched.touch_read(0).unwrap());
        let at = service.wait_stalled(std::time::Duration::from_secs(5));
        assert_eq!(at, Some(untouched.range().start()), "the service stops at the touch");
        // Waits in the kernel until the service reads its UNMAP; the address
        // space is changing until then.
        let unmapper = s.spawn(|| doomed.unmap(doomed.pages_range(0, 1).unwrap()).unwrap());
        std::thread::sleep(std::time::Duration::from_millis(100));
        drop(engine);
        // Longer than an install keeps trying while the address space changes.
        std::thread::sleep(std::time::Duration::from_millis(300));
        drop(service);
        assert_eq!(toucher.join().unwrap(), 0);
        unmapper.join().unwrap();
    });
    let mut got = vec![0u8; r.len()];
    moved.read(0, &mut got).unwrap();
    assert_eq!(common::first_wrong_page(&got, &data), None, "the new address has the data");
}

/// `mremap` of device pages whose copies to the new address first find no
/// system memory (as in a memory cgroup at its limit): the forward tries them
/// again until they go, rather than poison the new address. Both kinds of
/// `mremap`, both engines.
#[test]
fn a_remap_whose_copies_find_no_memory_at_first_still_delivers() {
    if common::skip_without("event-remap") {
        return;
    }
    let _fork = common::fork_lock();
    let pages = 16;
    let engines = [
        SoftwareDeviceConfig::new("zc", 64 * PAGE_SIZE),
        SoftwareDeviceConfig::new("copy", 64 * PAGE_SIZE).with_copy_engine(2),
    ];
    for config in engines {
        for how in [Remap::Move, Remap::DontUnmap] {
            let case = format!("{how:?}, {} engine", config.name);
            let hmm = Hmm::new().unwrap();
            let dev = SoftwareDevice::new(&hmm, config.clone()).unwrap();
            let r = hmm.alloc(pages * PAGE_SIZE).unwrap();
            let data = pattern(pages, 3);
            r.write(0, &data).unwrap();
            assert_eq!(dev.migrate_to_device(r.range()).unwrap().migrated, pages, "{case}");
            dev.fail_next_copies_to_system(5);
            let moved = remap(&r, r.range(), how);
            let mut got = vec![0u8; r.len()];
            moved.read(0, &mut got).unwrap_or_else(|e| panic!("{case}: {e}"));
            dev.fail_next_copies_to_system(0);
            assert_eq!(
                common::first_wrong_page(&got, &data),
                None,
                "{case}: the new address has the data"
            );
            common::eventually("the moved device pages freed", || dev.stats().pages_resident == 0);
        }
    }
}

/// An `mremap` that shrinks a range in place (it may not move): the kernel
/// unmaps the tail, the tail's device pages are freed, and the rest keeps its
/// device pages and bytes.
#[test]
fn mremap_shrinking_in_place_frees_the_tail() {
    if common::skip_without_uffd() {
        return;
    }
    let _fork = common::fork_lock();
    let hmm = Hmm::new().unwrap();
    let dev = device(&hmm, "d", 64);
    let r = hmm.alloc(32 * PAGE_SIZE).unwrap();
    let data = pattern(32, 99);
    r.write(0, &data).unwrap();
    assert_eq!(dev.migrate_to_device(r.range()).unwrap().migrated, 32);
    let at = r.addr();
    r.mapping().shrink_in_place(20 * PAGE_SIZE).unwrap();
    assert_eq!(r.addr(), at);
    common::eventually("the tail's device pages freed", || dev.stats().pages_resident == 20);
    let res = r.residencies();
    assert!(res[20..].iter().all(|x| *x == Residency::Unmapped), "{res:?}");
    assert!(res[..20].iter().all(|x| matches!(x, Residency::Device(_))), "{res:?}");
    let mut got = vec![0u8; 20 * PAGE_SIZE];
    r.read(0, &mut got).unwrap();
    assert_eq!(common::first_wrong_page(&got, &data[..20 * PAGE_SIZE]), None);
    drop(r);
    assert_eq!(dev.stats().pages_resident, 0);
}

/// `mremap` while migrations move the same pages both ways: whatever a
/// migration held at the moment of the move (a staged page, a device page, a
/// copy in flight) reaches the new address; nothing is lost, nothing hangs,
/// and no device page is left behind.
#[test]
fn mremap_during_migrations_loses_nothing() {
    if common::skip_without("event-remap") {
        return;
    }
    let _fork = common::fork_lock();
    let pages = 64;
    let hmm = Hmm::new().unwrap();
    let dev = device(&hmm, "d", 256);
    for round in 0..40u64 {
        let how = if round % 2 == 0 { Remap::Move } else { Remap::DontUnmap };
        let r = hmm.alloc(pages * PAGE_SIZE).unwrap();
        let data = pattern(pages, round << 16);
        r.write(0, &data).unwrap();
        assert_eq!(dev.migrate_to_device(r.pages_range(0, 32).unwrap()).unwrap().migrated, 32);
        let (first, count) = (8 + (round as usize % 5) * 4, 40);
        let part = r.pages_range(first, count).unwrap();
        let moved = std::thread::scope(|s| {
            let mover = s.spawn(|| {
                for _ in 0..3 {
                    let _ = dev.migrate_to_device(r.range());
                    let _ = dev.migrate_to_system(r.range());
                }
            });
            // Let the migrations start, by a different amount each round.
            std::thread::sleep(std::time::Duration::from_micros(50 * (round % 8)));
            let moved = remap(&r, part, how);
            mover.join().unwrap();
            moved
        });
        let mut got = vec![0u8; part.len()];
        moved.read(0, &mut got).unwrap();
        let want = &data[first * PAGE_SIZE..(first + count) * PAGE_SIZE];
        assert_eq!(
            common::first_wrong_page(&got, want),
            None,
            "round {round} ({how:?}): moved data"
        );
        for p in (0..pages).filter(|p| !(first..first + count).contains(p)) {
            let mut page = vec![0u8; PAGE_SIZE];
            r.read(p * PAGE_SIZE, &mut page).unwrap();
            assert!(
                page[..] == data[p * PAGE_SIZE..(p + 1) * PAGE_SIZE],
                "round {round}: page {p}"
            );
        }
        drop(moved);
        drop(r);
        common::eventually("every device page freed", || dev.stats().pages_resident == 0);
    }
    assert!(hmm.remapped_pages() > 0, "some rounds caught device pages or migrations");
}

/// A partial `munmap` of a migrated range at the start, in the middle, at the
/// end, and inside a 2 MiB huge page: exactly the unmapped part's device
/// pages are freed, the rest of the range keeps its bytes wherever it lives
/// and keeps working (it migrates and faults back), and nothing is left on
/// the device once the range goes.
#[test]
fn partial_munmap_at_any_offset_frees_exactly_that_part() {
    if common::skip_without_uffd() {
        return;
    }
    let _fork = common::fork_lock();
    let hmm = Hmm::new().unwrap();
    let dev = device(&hmm, "d", 2048);
    // (huge range, pages, the part unmapped)
    let cases = [
        (false, 64, 0..8),
        (false, 64, 30..31),
        (false, 64, 40..64),
        (true, 1024, 200..203),
        (true, 1024, 511..513),
    ];
    for (huge, pages, gone) in cases {
        let case = format!("{} pages, unmapping {gone:?}", if huge { "huge" } else { "small" });
        let r = if huge {
            hmm.alloc_huge(pages * PAGE_SIZE).unwrap()
        } else {
            hmm.alloc(pages * PAGE_SIZE).unwrap()
        };
        let data = pattern(pages, 1 << 20);
        r.write(0, &data).unwrap();
        assert_eq!(dev.migrate_to_device(r.range()).unwrap().migrated, pages, "{case}");
        let freed = dev.stats().pages_freed;
        let part = r.pages_range(gone.start, gone.len()).unwrap();
        r.unmap(part).unwrap();
        common::eventually("the unmapped part's device pages freed", || {
            dev.stats().pages_resident == (pages - gone.len()) as u64
        });
        assert_eq!(dev.stats().pages_freed - freed, gone.len() as u64, "{case}: exactly those");
        let res = r.residencies();
        for (p, x) in res.iter().enumerate() {
            let want_unmapped = gone.contains(&p);
            assert_eq!(*x == Residency::Unmapped, want_unmapped, "{case}: page {p} is {x:?}");
        }
        // The rest: half comes back by CPU touch, then all of it migrates
        // again and comes back by migration; the bytes are the same each time.
        let rest: Vec<usize> = (0..pages).filter(|p| !gone.contains(p)).collect();
        for &p in rest.iter().step_by(2) {
            let mut page = vec![0u8; PAGE_SIZE];
            r.read(p * PAGE_SIZE, &mut page).unwrap();
            assert!(page[..] == data[p * PAGE_SIZE..(p + 1) * PAGE_SIZE], "{case}: page {p}");
        }
        for run in [0..gone.start, gone.end..pages].into_iter().filter(|r| !r.is_empty()) {
            let part = r.pages_range(run.start, run.len()).unwrap();
            // Pages of a fault-around window the reads above began may still
            // be on their way back (busy): migrate until all are on the device.
            common::eventually("the rest on the device again", || {
                dev.migrate_to_device(part).unwrap();
                r.residencies()[run.clone()].iter().all(|x| matches!(x, Residency::Device(_)))
            });
            dev.migrate_to_system(part).unwrap();
        }
        for &p in &rest {
            let mut page = vec![0u8; PAGE_SIZE];
            r.read(p * PAGE_SIZE, &mut page).unwrap();
            assert!(page[..] == data[p * PAGE_SIZE..(p + 1) * PAGE_SIZE], "{case}: page {p} again");
        }
        assert_eq!(dev.stats().pages_resident, 0, "{case}");
        drop(r);
        assert_eq!(dev.stats().pages_resident, 0, "{case}");
    }
}

/// One thread unmaps a range piece by piece while another migrates it both
/// ways and a device reads and writes it: each operation either fails with
/// an error or does its work correctly (a device read sees, for every page
/// still mapped, the bytes written there; a page unmapped before the read
/// is no longer the range's, and the device reads whatever the kernel has
/// put at its address since, or nothing); nothing crashes or hangs, and at
/// the end no device page is left.
#[test]
fn concurrent_teardown_gives_errors_or_right_answers_and_leaks_nothing() {
    if common::skip_without_uffd() {
        return;
    }
    let _fork = common::fork_lock();
    let hmm = Hmm::new().unwrap();
    let dev = device(&hmm, "d", 512);
    let reader = device(&hmm, "reader", 16);
    let pages = 128;
    for round in 0..12u64 {
        let r = hmm.alloc(pages * PAGE_SIZE).unwrap();
        let data = pattern(pages, round << 20);
        r.write(0, &data).unwrap();
        dev.migrate_to_device(r.pages_range(0, pages / 2).unwrap()).unwrap();
        let stop = std::sync::atomic::AtomicBool::new(false);
        let (errors, right) = std::thread::scope(|s| {
            let migrator = s.spawn(|| {
                let mut errors = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    errors += dev.migrate_to_device(r.range()).is_err() as u32;
                    errors += dev.migrate_to_system(r.range()).is_err() as u32;
                }
                errors
            });
            let device_reader = s.spawn(|| {
                let (mut errors, mut right) = (0, 0);
                // At least one pass, however late this thread gets its turn.
                let mut first_pass = true;
                while std::mem::take(&mut first_pass)
                    || !stop.load(std::sync::atomic::Ordering::Relaxed)
                {
                    // Read a page at a time: each page read is refused, or
                    // exact, or of a page unmapped by then.
                    for p in (0..pages).step_by(7) {
                        match reader.read(r.pages_range(p, 1).unwrap()) {
                            Ok((bytes, _)) => {
                                if bytes[..] == data[p * PAGE_SIZE..(p + 1) * PAGE_SIZE] {
                                    right += 1;
                                } else {
                                    // `unmap` records the hole before it
                                    // returns, so the page reads as gone.
                                    assert!(
                                        matches!(
                                            r.touch_read(p * PAGE_SIZE),
                                            Err(hmm::RangeError::Unmapped(_))
                                        ),
                                        "round {round}: the device read page {p} wrong"
                                    );
                                    errors += 1;
                                }
                            }
                            Err(_) => errors += 1,
                        }
                    }
                }
                (errors, right)
            });
            for chunk in 0..8 {
                std::thread::sleep(std::time::Duration::from_micros(300));
                let first = (chunk * 5 + round as usize) % (pages - 16);
                // Parts may overlap ones already gone: that is refused.
                let _ = r.unmap(r.pages_range(first, 16).unwrap());
            }
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            let e = migrator.join().unwrap();
            let (re, right) = device_reader.join().unwrap();
            (e + re, right)
        });
        // The last unmaps are handled after they returned.
        hmm.settle(std::time::Duration::from_secs(10)).unwrap();
        // Whatever is still mapped holds its bytes.
        let res = r.residencies();
        for p in (0..pages).filter(|p| res[*p] != Residency::Unmapped) {
            let mut page = vec![0u8; PAGE_SIZE];
            r.read(p * PAGE_SIZE, &mut page).unwrap();
            assert!(
                page[..] == data[p * PAGE_SIZE..(p + 1) * PAGE_SIZE],
                "round {round}: page {p}"
            );
        }
        // The reads above faulted pages back: the rest of each fault-around
        // window comes back after the read returned (DESIGN.md, "What is
        // exact when a call returns"), its device pages freed then.
        hmm.settle(std::time::Duration::from_secs(10)).unwrap();
        let on_device =
            r.residencies().iter().filter(|x| matches!(x, Residency::Device(_))).count();
        assert_eq!(dev.stats().pages_resident as usize, on_device, "round {round}: accounting");
        drop(r);
        common::eventually("no device page left", || {
            dev.stats().pages_resident == 0 && reader.stats().pages_resident == 0
        });
        assert!(right > 0 || errors > 0, "round {round}: the reader ran");
    }
}

/// After a fork, the parent's pages are shared copy-on-write, and stay
/// marked so after the child exits until the parent writes them: the kernel
/// will not move such a page (`UFFDIO_MOVE` wants it exclusive). hmm unshares
/// them (a write fault that changes no byte) and moves them, as the kernel's
/// own migration would: every page migrates, exclusive access works, and the
/// bytes are intact.
#[test]
fn pages_unwritten_since_a_fork_still_migrate() {
    if common::skip_without("event-fork") {
        return;
    }
    let _fork = common::fork_lock();
    let hmm = Hmm::new().unwrap();
    let dev = device(&hmm, "d", 64);
    let r = hmm.alloc(16 * PAGE_SIZE).unwrap();
    let data = pattern(16, 5);
    r.write(0, &data).unwrap();
    assert_eq!(run_in_child(common::CHILD_LIMIT, || 0).unwrap(), ChildOutcome::Exited(0));
    let rep = dev.migrate_to_device(r.pages_range(0, 8).unwrap()).unwrap();
    assert_eq!(rep.migrated, 8, "{:?}", rep.skipped);
    dev.make_exclusive(r.pages_range(8, 8).unwrap()).expect("exclusive after a fork");
    let mut got = vec![0u8; r.len()];
    r.read(0, &mut got).unwrap();
    assert_eq!(common::first_wrong_page(&got, &data), None);
}

/// `MREMAP_DONTUNMAP` of the same pages twice, the second before the first
/// move's pages have all arrived: the first new address gets the bytes, the
/// second gets the emptied old pages (zeros), and neither waits forever (the
/// second move once waited for pages the first still held).
#[test]
fn the_same_pages_remapped_twice_at_once_arrive() {
    if common::skip_without("event-remap") {
        return;
    }
    let _fork = common::fork_lock();
    let hmm = Hmm::new().unwrap();
    let dev = device(&hmm, "d", 256);
    for round in 0..20u64 {
        let r = hmm.alloc(32 * PAGE_SIZE).unwrap();
        let data = pattern(32, round);
        r.write(0, &data).unwrap();
        assert_eq!(dev.migrate_to_device(r.range()).unwrap().migrated, 32);
        let part = r.pages_range(4, 16).unwrap();
        let first = r.mapping().remap_part_dontunmap(part).unwrap();
        let second = r.mapping().remap_part_dontunmap(part).unwrap();
        // Read on a thread of its own, so that a read that never returns
        // fails the test instead of hanging it.
        let (tx, rx) = std::sync::mpsc::channel();
        let len = part.len();
        std::thread::spawn(move || {
            let mut a = vec![0u8; len];
            let mut b = vec![1u8; len];
            first.read(0, &mut a).unwrap();
            second.read(0, &mut b).unwrap();
            let _ = tx.send((a, b, first, second));
        });
        let (a, b, first, second) = rx
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("the moved pages arrived (a read waited 20 s)");
        assert_eq!(common::first_wrong_page(&a, &data[4 * PAGE_SIZE..20 * PAGE_SIZE]), None);
        assert!(b.iter().all(|x| *x == 0), "round {round}: the second move got the emptied pages");
        drop((first, second, r));
        common::eventually("every device page freed", || dev.stats().pages_resident == 0);
    }
}

/// Another thread brings device pages back to system memory while the
/// process forks: a page still on the device at the instant of the fork but
/// back in system memory by the time the copy to the child looks at it must
/// still reach the child (its copy-on-write did not carry it). Checked over
/// many forks, each child reading every page.
#[test]
fn pages_brought_back_while_forking_reach_the_child() {
    if common::skip_without("event-fork") {
        return;
    }
    let _fork = common::fork_lock();
    let config = hmm::HmmConfig { fault_around_pages: 1, ..hmm::HmmConfig::default() };
    let hmm = Hmm::with_config(config).unwrap();
    let pages = 256;
    let dev = device(&hmm, "d", pages);
    let r = hmm.alloc(pages * PAGE_SIZE).unwrap();
    let want = pattern(pages, 77);
    r.write(0, &want).unwrap();
    for round in 0..20 {
        dev.migrate_to_device(r.range()).unwrap();
        assert!(
            r.residencies().iter().all(|x| matches!(x, Residency::Device(_))),
            "round {round}: every page on the device"
        );
        let stop = std::sync::atomic::AtomicBool::new(false);
        let out = std::thread::scope(|s| {
            s.spawn(|| {
                // Touches every page in turn, each a fault-back of its own.
                for p in 0..pages {
                    if stop.load(std::sync::atomic::Ordering::Relaxed) {
                        break;
                    }
                    r.touch_read(p * PAGE_SIZE).unwrap();
                }
            });
            std::thread::sleep(std::time::Duration::from_micros(200 * (round % 5)));
            let out = run_in_child(common::CHILD_LIMIT, || {
                let mut got = vec![0u8; pages * PAGE_SIZE];
                if r.mapping().read(0, &mut got).is_err() {
                    return 2;
                }
                common::first_wrong_page(&got, &want).map_or(0, |p| 10 + (p % 200) as i32)
            });
            stop.store(true, std::sync::atomic::Ordering::Relaxed);
            out
        });
        assert_eq!(out.unwrap(), ChildOutcome::Exited(0), "round {round}: 10 + page read wrong");
    }
    assert_eq!(common::first_wrong_page(&common::cpu_bytes(&r), &want), None, "the parent's data");
}

/// The same pages moved twice with `MREMAP_DONTUNMAP` while migrations hold
/// one page for each move: each page's data goes to the new address of the
/// move that found it held, never to the other one.
#[test]
fn two_moves_of_one_range_each_get_their_own_held_pages() {
    if common::skip_without("event-remap") {
        return;
    }
    let hmm = Hmm::new().unwrap();
    let r = hmm.alloc(8 * PAGE_SIZE).unwrap();
    let a = pattern(8, 500);
    r.write(0, &a).unwrap();
    // A migration holds page 5 as the first move happens.
    let held5 = hmm.migrate(r.pages_range(5, 1).unwrap(), hmm::Selection::System).unwrap();
    let first = r.mapping().remap_part_dontunmap(r.range()).unwrap();
    // The first move's other pages went with the page tables; the old
    // address of page 4 is empty, and then written again.
    common::eventually("the first move's pages settled", || r.residency(4) == Residency::None);
    let b = pattern(1, 900);
    r.write(4 * PAGE_SIZE, &b).unwrap();
    // Another migration holds page 4 as the second move happens.
    let held4 = hmm.migrate(r.pages_range(4, 1).unwrap(), hmm::Selection::System).unwrap();
    let second = r.mapping().remap_part_dontunmap(r.range()).unwrap();
    // Neither migration copies: each page's data is still its own, and goes
    // to its move's new address as the migration ends.
    held4.finalize();
    held5.finalize();
    // A touch of a page still on its way waits for it: read in a thread, so
    // that a page sent to the wrong move fails the test instead of hanging it.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut got = vec![0u8; PAGE_SIZE];
        second.read(4 * PAGE_SIZE, &mut got).unwrap();
        let _ = tx.send(got);
        second
    });
    let got = rx
        .recv_timeout(std::time::Duration::from_secs(20))
        .expect("page 4 never arrives at the second move's address");
    assert!(got == b, "page 4, written after the first move, arrives at the second");
    let mut got = vec![0u8; 8 * PAGE_SIZE];
    first.read(0, &mut got).unwrap();
    assert_eq!(
        common::first_wrong_page(&got, &a),
        None,
        "the first move has every page of its time"
    );
}
