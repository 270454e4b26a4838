//! `FaultMode::InThread`: CPU faults served in the faulting thread's own
//! `SIGBUS` handler. The bytes a touch finds, the records after it, the
//! faults the handler hands to the fault service, and what the mode gives up
//! (kernel accesses to pages not in system memory fail with `EFAULT`).

mod common;

use std::time::Duration;

use hmm::os::process::{ChildOutcome, run_in_child};
use hmm::{FaultMode, Hmm, HmmConfig, PAGE_SIZE, Residency};
use hmm_swdev::{SoftwareDevice, SoftwareDeviceConfig};

const SIGBUS: i32 = 7;

fn in_thread(fault_around_pages: usize) -> Hmm {
    Hmm::with_config(HmmConfig {
        fault_mode: FaultMode::InThread,
        fault_around_pages,
        ..HmmConfig::default()
    })
    .expect("an instance in FaultMode::InThread")
}

fn engines() -> [(&'static str, SoftwareDeviceConfig); 2] {
    [
        ("zero-copy", SoftwareDeviceConfig::new("dev", 8 << 20)),
        ("copy", SoftwareDeviceConfig::new("dev", 8 << 20).with_copy_engine(2)),
    ]
}

fn skip() -> bool {
    common::skip_without_uffd() || common::skip_without("sigbus-mode")
}

fn on_device(r: &hmm::ManagedRange) -> usize {
    r.residencies().iter().filter(|x| matches!(x, Residency::Device(_))).count()
}

/// Two threads touch every page of a range that lives on the device, in
/// random orders: every byte is right, the touches were served in the
/// threads themselves, and every record says system memory afterwards. With
/// fault-around on and off, with both engines.
#[test]
fn a_touch_brings_the_page_back_in_the_thread_with_its_bytes() {
    if skip() {
        return;
    }
    let _fork = common::fork_lock();
    for around in [1, 16] {
        for (engine, config) in engines() {
            let hmm = in_thread(around);
            let dev = SoftwareDevice::new(&hmm, config).unwrap();
            let pages = 1024;
            let r = hmm.alloc(pages * PAGE_SIZE).unwrap();
            common::fill_salted(&r, 11);
            assert_eq!(dev.migrate_to_device(r.range()).unwrap().migrated, pages);
            std::thread::scope(|s| {
                for t in 0..2u64 {
                    let r = &r;
                    s.spawn(move || {
                        let mut order: Vec<usize> = (0..pages).collect();
                        let mut rng = common::Rng(t + 3);
                        for i in (1..pages).rev() {
                            order.swap(i, rng.below(i + 1));
                        }
                        let mut buf = vec![0u8; PAGE_SIZE];
                        for i in order {
                            // A raw read of the mapping: the CPU's own touch.
                            r.mapping().read(i * PAGE_SIZE, &mut buf).unwrap();
                            common::check_salted(&buf, i, 11, engine);
                        }
                    });
                }
            });
            let (served, _) = hmm.in_thread_faults();
            assert!(
                served > 0,
                "{engine}, around {around}: no fault served in the thread ({:?})",
                hmm.in_thread_faults()
            );
            // Fault-around windows are brought back by the service after
            // the touch: wait for them, with a deadline.
            common::eventually("every page back in system memory", || on_device(&r) == 0);
            let stats = r.stats();
            assert_eq!(stats.migrated_to_system, pages as u64, "{engine}, around {around}");
            assert_eq!(dev.memory().allocated_pages(), 0, "{engine}: every device page freed");
            common::check_salted(&common::cpu_bytes(&r), 0, 11, engine);
        }
    }
}

/// What the mode gives up: a kernel access (`read(2)` into a buffer, here)
/// to a page that lives on a device fails with `EFAULT` instead of waiting
/// for the page; after `ManagedRange::populate` it succeeds, with the bytes.
/// A CPU touch, by contrast, is served.
#[test]
fn a_kernel_access_to_a_device_page_fails_until_populated() {
    if skip() {
        return;
    }
    use std::io::Write;
    let hmm = in_thread(1);
    let dev = SoftwareDevice::new(&hmm, SoftwareDeviceConfig::new("dev", 1 << 20)).unwrap();
    let r = hmm.alloc(4 * PAGE_SIZE).unwrap();
    common::fill_salted(&r, 5);
    dev.migrate_to_device(r.range()).unwrap();
    let (rd, mut wr) = std::io::pipe().unwrap();
    wr.write_all(&[0xAB; 100]).unwrap();
    let err = r.mapping().read_from(PAGE_SIZE + 8, 100, &rd).unwrap_err();
    assert!(err.to_string().contains("Bad address"), "read(2) into a device page: {err}");
    assert!(matches!(r.residency(1), Residency::Device(_)), "the failed read moved nothing");
    r.populate(r.range()).unwrap();
    assert_eq!(on_device(&r), 0, "populate brought every page back");
    assert_eq!(r.mapping().read_from(PAGE_SIZE + 8, 100, &rd).unwrap(), 100);
    let mut page = vec![0u8; PAGE_SIZE];
    r.read(PAGE_SIZE, &mut page).unwrap();
    assert_eq!(page[8..108], [0xAB; 100], "the read landed");
    common::check_salted(&page[..8], 1, 5, "the bytes before it");
    common::check_salted(&page[112..], 1, 5, "the bytes after it");
}

/// A touch the handler cannot serve alone goes to the fault service and
/// waits there, as in the normal mode: a never-populated page (zero-filled),
/// a page mid-migration (the touch waits for the migration), a device page
/// whose driver does not copy in the thread (an engine with an injected
/// failure pending), and a write to a page a device maps read-only (the
/// write is tracked). Every one reads right, and is counted handed over.
#[test]
fn what_the_handler_cannot_serve_goes_to_the_service() {
    if skip() {
        return;
    }
    let hmm = in_thread(1);
    let dev = SoftwareDevice::new(&hmm, SoftwareDeviceConfig::new("dev", 1 << 20)).unwrap();
    let r = hmm.alloc(16 * PAGE_SIZE).unwrap();
    // A never-populated page reads zeros.
    assert_eq!(r.mapping().touch_read(3 * PAGE_SIZE).unwrap(), 0);
    let (_, handed) = hmm.in_thread_faults();
    assert!(handed >= 1, "the first touch went to the service");
    // A stalled engine holds a migration's copies; a touch of its pages
    // waits for the migration, then reads the bytes.
    common::fill_salted(&r, 21);
    let stall = dev.stall_engine();
    std::thread::scope(|s| {
        let m = s.spawn(|| dev.migrate_to_device(r.pages_range(8, 8).unwrap()).unwrap());
        common::eventually("the migration's copies held", || stall.held() > 0);
        let toucher = s.spawn(|| {
            let mut b = vec![0u8; PAGE_SIZE];
            r.mapping().read(9 * PAGE_SIZE, &mut b).unwrap();
            b
        });
        std::thread::sleep(Duration::from_millis(20));
        drop(stall);
        common::check_salted(&toucher.join().unwrap(), 9, 21, "a page mid-migration");
        m.join().unwrap();
    });
    // A pending injected failure sends the fault-back through the engine.
    dev.migrate_to_device(r.range()).unwrap();
    let before = hmm.in_thread_faults();
    dev.fail_next_copies_to_system(1);
    let mut b = vec![0u8; PAGE_SIZE];
    r.mapping().read(2 * PAGE_SIZE, &mut b).unwrap();
    common::check_salted(&b, 2, 21, "a page its engine failed once");
    assert!(hmm.in_thread_faults().1 > before.1, "handed to the service");
    // A write to the zero page a device maps read-only is tracked (a
    // write-protect fault, handed to the service), then lands.
    let z = hmm.alloc(PAGE_SIZE).unwrap();
    if z.tracks_writes() {
        assert_eq!(z.mapping().touch_read(0).unwrap(), 0);
        dev.read(z.range()).unwrap();
        let writes = hmm.tracked_writes();
        z.mapping().write(0, &[7u8; 8]).unwrap();
        assert_eq!(hmm.tracked_writes(), writes + 1, "the write to the device's zero page");
        let (bytes, _) = dev.read(z.range()).unwrap();
        assert_eq!(bytes[..9], [7, 7, 7, 7, 7, 7, 7, 7, 0], "the device sees the write");
    }
}

/// A device that fails loses exactly its pages in this mode too: a raw
/// touch of one ends in SIGBUS (in a child), the rest read right.
#[test]
fn a_lost_page_is_sigbus_in_the_thread() {
    if skip() || common::skip_without("poison") {
        return;
    }
    let _fork = common::fork_lock();
    let out = run_in_child(common::CHILD_LIMIT, || {
        let hmm = in_thread(1);
        let Ok(dev) = SoftwareDevice::new(&hmm, SoftwareDeviceConfig::new("dev", 1 << 20)) else {
            return 2;
        };
        let Ok(r) = hmm.alloc(8 * PAGE_SIZE) else { return 3 };
        common::fill_salted(&r, 4);
        if dev.migrate_to_device(r.pages_range(0, 4).unwrap()).map(|x| x.migrated).ok() != Some(4) {
            return 4;
        }
        if dev.fail() != 4 {
            return 5;
        }
        let mut b = vec![0u8; 4 * PAGE_SIZE];
        if r.mapping().read(4 * PAGE_SIZE, &mut b).is_err() {
            return 6;
        }
        for (k, page) in b.chunks(PAGE_SIZE).enumerate() {
            if page[..8] != (k as u64 + 4 + 4).to_ne_bytes() {
                // `fill_salted` writes page + salt first.
                return 7;
            }
        }
        let _ = r.mapping().touch_read(PAGE_SIZE);
        8
    })
    .unwrap();
    assert_eq!(out, ChildOutcome::Signaled(SIGBUS), "SIGBUS on the lost page");
}

/// A `SIGBUS` that is not hmm's (a touch past the end of a file mapping)
/// reaches the default action: the process dies of it, it does not hang.
#[test]
fn a_foreign_sigbus_is_not_swallowed() {
    if skip() {
        return;
    }
    let _fork = common::fork_lock();
    let out = run_in_child(common::CHILD_LIMIT, || {
        let _hmm = in_thread(1);
        let Ok(f) = hmm::os::mm::Memfd::create(c"short", PAGE_SIZE as u64, false) else {
            return 2;
        };
        let Ok(m) = f.map(0, 4 * PAGE_SIZE, hmm::os::mm::Protection::ReadWrite, true) else {
            return 3;
        };
        // Page 2 lies past the file's end.
        let _ = m.touch_read(2 * PAGE_SIZE);
        4
    })
    .unwrap();
    assert_eq!(out, ChildOutcome::Signaled(SIGBUS));
}

/// `fork` and `mremap` with pages on the device: the child reads them, and
/// so does the new address of a move, while the threads of the parent serve
/// their own faults.
#[test]
fn fork_and_mremap_keep_device_pages() {
    if skip() {
        return;
    }
    let _fork = common::fork_lock();
    let hmm = in_thread(1);
    let dev = SoftwareDevice::new(&hmm, SoftwareDeviceConfig::new("dev", 1 << 20)).unwrap();
    let r = hmm.alloc(32 * PAGE_SIZE).unwrap();
    common::fill_salted(&r, 8);
    dev.migrate_to_device(r.range()).unwrap();
    let out = run_in_child(common::CHILD_LIMIT, || {
        let bytes = common::cpu_bytes(&r);
        for (i, page) in bytes.chunks(PAGE_SIZE).enumerate() {
            if page[..8] != (i as u64 + 8).to_ne_bytes() {
                return 10 + i as i32;
            }
        }
        0
    })
    .unwrap();
    assert_eq!(out, ChildOutcome::Exited(0), "the child reads every page");
    // The parent's pages are where they were; a touch brings one back.
    common::check_salted(&common::cpu_bytes(&r), 0, 8, "the parent after the fork");
    dev.migrate_to_device(r.range()).unwrap();
    let moved = r.mapping().remap_part_dontunmap(r.pages_range(0, 16).unwrap()).unwrap();
    hmm.settle(Duration::from_secs(10)).unwrap();
    let mut b = vec![0u8; 16 * PAGE_SIZE];
    moved.read(0, &mut b).unwrap();
    common::check_salted(&b, 0, 8, "the new address of the move");
    let mut z = vec![1u8; PAGE_SIZE];
    r.read(0, &mut z).unwrap();
    assert!(z.iter().all(|&x| x == 0), "the old address reads zeros after MREMAP_DONTUNMAP");
}
