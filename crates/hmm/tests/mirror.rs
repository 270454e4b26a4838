//! The mirror: interval notifiers, the retry protocol under stress, device
//! jobs that follow pointers, and fork.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use hmm::os::mm::{Advise, Mapping, Protection};
use hmm::{Hmm, InvalidationEvent, PAGE_SIZE, Residency, VirtAddr};
use hmm_swdev::{SoftwareDevice, SoftwareDeviceConfig};

fn device(hmm: &Hmm, name: &str, bytes: usize) -> SoftwareDevice {
    SoftwareDevice::new(hmm, SoftwareDeviceConfig::new(name, bytes)).unwrap()
}

#[test]
fn notifiers_see_the_events_of_their_range_only() {
    if common::skip_without_uffd() {
        return;
    }
    let hmm = Hmm::new().unwrap();
    let dev = device(&hmm, "d", 1 << 20);
    let r = hmm.alloc(64 * PAGE_SIZE).unwrap();
    r.fill(0, r.len(), 1).unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let l = log.clone();
    let n = hmm.insert_notifier(r.pages_range(16, 16).unwrap(), move |inv| {
        l.lock().unwrap().push((inv.range, inv.event, inv.seq))
    });
    let seq = n.read_begin();
    assert!(!n.read_retry(seq));
    // Outside its range: nothing.
    dev.migrate_to_device(r.pages_range(0, 8).unwrap()).unwrap();
    assert!(log.lock().unwrap().is_empty());
    assert!(!n.read_retry(seq));
    // A migration over it: the part it covers, with the owner.
    dev.migrate_to_device(r.range()).unwrap();
    {
        let l = log.lock().unwrap();
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].0, r.pages_range(16, 16).unwrap(), "clipped to the notifier");
        assert_eq!(l[0].1, InvalidationEvent::Migrate { owner: Some(dev.memory().id()) });
        assert!(n.read_retry(seq));
    }
    // The application's own discard, learnt from the REMOVE event.
    r.advise(r.pages_range(20, 2).unwrap(), Advise::DontNeed).unwrap();
    common::eventually("the discard reported", || log.lock().unwrap().len() == 2);
    let (range, event, s2) = log.lock().unwrap()[1];
    assert_eq!((range, event), (r.pages_range(20, 2).unwrap(), InvalidationEvent::Clear));
    assert!(s2 > log.lock().unwrap()[0].2, "sequences grow");
    // munmap through hmm: invalidated before the unmap.
    r.unmap(r.pages_range(30, 4).unwrap()).unwrap();
    assert_eq!(log.lock().unwrap()[2].1, InvalidationEvent::Unmap);
    drop(n);
    assert_eq!(hmm.notifier_count(), 1, "only the device's own notifier is left");
}

#[test]
fn thousands_of_notifiers_are_found_by_range() {
    if common::skip_without_uffd() {
        return;
    }
    let hmm = Hmm::new().unwrap();
    let n = 5000;
    // Notifier i covers pages 4i and 4i + 1 of a managed range.
    let r = hmm.alloc(4 * n * PAGE_SIZE).unwrap();
    let hits = Arc::new(Mutex::new(Vec::new()));
    let notifiers: Vec<_> = (0..n)
        .map(|i| {
            let h = hits.clone();
            hmm.insert_notifier(r.pages_range(4 * i, 2).unwrap(), move |_| {
                h.lock().unwrap().push(i)
            })
        })
        .collect();
    assert_eq!(hmm.notifier_count(), n);
    let seqs: Vec<u64> = notifiers.iter().map(|x| x.read_begin()).collect();
    // Pages 401..441 overlap notifiers 100 (its page 401) to 110 (page 440).
    r.protect(r.pages_range(401, 40).unwrap(), hmm::os::mm::Protection::Read).unwrap();
    let mut got = hits.lock().unwrap().clone();
    got.sort_unstable();
    assert_eq!(got, (100..=110).collect::<Vec<_>>());
    let changed: Vec<usize> = (0..n).filter(|&i| notifiers[i].read_retry(seqs[i])).collect();
    assert_eq!(changed, got, "exactly those sequences moved");
    drop(notifiers);
    assert_eq!(hmm.notifier_count(), 0);
}

/// Device jobs follow pointers through the shared address space: an arena
/// list built by ordinary code, summed on the device (the pages live there),
/// while a large array is summed by four workers.
#[test]
fn device_job_follows_pointers_and_sums_an_array() {
    if common::skip_without_uffd() {
        return;
    }
    #[repr(C)]
    struct Node<'a> {
        next: Option<&'a Node<'a>>,
        value: u64,
    }
    let hmm = Hmm::new().unwrap();
    let dev = device(&hmm, "d", 64 << 20);
    let arena = hmm.arena(8 << 20).unwrap();
    let mut head: Option<&Node<'_>> = None;
    for value in 0..200_000u64 {
        head = Some(arena.alloc(Node { next: head, value }).unwrap());
    }
    let head_addr = head.map_or(0, |n| n as *const Node<'_> as usize);
    let array = hmm.alloc(16 << 20).unwrap();
    let words: Vec<u8> = (0..(16 << 20) / 8u64).flat_map(|i| (i * 7).to_ne_bytes()).collect();
    array.write(0, &words).unwrap();
    let cpu_sum: u64 = (0..(16 << 20) / 8u64).map(|i| i * 7).sum();
    // Placement: the list on the device, the array stays in system memory.
    assert!(dev.migrate_to_device(arena.range()).unwrap().migrated > 0);
    let (sums, c) = dev
        .run(1, VirtAddr::new(head_addr), |ctx| {
            let (mut at, mut sum, mut n) = (ctx.start_addr(), 0u64, 0u64);
            while at != 0 {
                sum += ctx.read_u64(VirtAddr::new(at as usize + 8))?;
                at = ctx.read_u64(VirtAddr::new(at as usize))?;
                n += 1;
            }
            Ok((n, sum))
        })
        .unwrap();
    assert_eq!(sums, [(200_000, 199_999 * 200_000 / 2)]);
    assert!(c.faults >= 1);
    assert_eq!(arena.owner().stats().cpu_faults, 0, "the device read its own pages: no fault-back");
    let base = array.addr();
    let (parts, _) = dev
        .run(4, base, |ctx| {
            let chunk = (16 << 20) / ctx.workers();
            let mut buf = vec![0u8; 1 << 20];
            let mut sum = 0u64;
            let start = ctx.start_addr() as usize + ctx.worker() * chunk;
            for off in (0..chunk).step_by(buf.len()) {
                ctx.read(VirtAddr::new(start + off), &mut buf)?;
                sum += buf
                    .chunks_exact(8)
                    .map(|w| u64::from_ne_bytes(w.try_into().unwrap()))
                    .sum::<u64>();
            }
            Ok(sum)
        })
        .unwrap();
    assert_eq!(parts.iter().sum::<u64>(), cpu_sum);
    // The device writes results; the CPU reads them (faulting nothing back).
    let out = hmm.alloc(PAGE_SIZE).unwrap();
    dev.run(1, out.addr(), |ctx| ctx.write_u64(VirtAddr::new(ctx.start_addr() as usize), 42))
        .unwrap();
    let mut w = [0u8; 8];
    out.read(0, &mut w).unwrap();
    assert_eq!(u64::from_ne_bytes(w), 42);
    // The CPU walks the list too: it faults back and agrees.
    let (mut n, mut at) = (0u64, head);
    while let Some(node) = at {
        n += 1;
        at = node.next;
    }
    assert_eq!(n, 200_000);
}

/// Checks every `step`-th word of `bytes`, read while the memory held
/// generations `lo..=hi` (each page all one generation's number): each must be
/// one of them, or 0 (a page discarded or freshly mapped, before its
/// generation is written) while a new generation is under way (`hi > lo`).
fn check_generations(bytes: &[u8], lo: u64, hi: u64, step: usize) {
    for (i, w) in bytes.chunks_exact(8).enumerate().step_by(step) {
        let v = u64::from_ne_bytes(w.try_into().unwrap());
        let ok = (lo..=hi).contains(&v) || (v == 0 && hi > lo);
        assert!(ok, "word {i} read {v}, memory held {lo}..={hi} meanwhile");
    }
}

/// A device fill racing invalidations never installs a stale entry: while one
/// thread keeps changing the pages (migrating them to one device or another,
/// writing them from the CPU, discarding and rewriting them), one thread reads
/// them through each device, so that each brings the other's pages back, and
/// every word read must be one the memory held during the read.
#[test]
fn fills_racing_invalidations_never_install_a_stale_entry() {
    if common::skip_without_uffd() {
        return;
    }
    let pages = 64;
    let hmm = Hmm::new().unwrap();
    let d0 = device(&hmm, "d0", pages * PAGE_SIZE);
    let d1 = device(&hmm, "d1", pages * PAGE_SIZE);
    let r = hmm.alloc(pages * PAGE_SIZE).unwrap();
    // `started`: the generation being written; `done`: the last one complete.
    let started = AtomicU64::new(1);
    let done = AtomicU64::new(1);
    let stop = AtomicBool::new(false);
    let write_gen = |g: u64| {
        let data: Vec<u8> = g.to_ne_bytes().repeat(pages * PAGE_SIZE / 8);
        r.write(0, &data).unwrap();
    };
    write_gen(1);
    let reads = AtomicU64::new(0);
    std::thread::scope(|s| {
        s.spawn(|| {
            // The readers stop however this thread ends.
            let _stop = common::StopOnDrop(&stop);
            for g in 2..300u64 {
                started.store(g, Ordering::SeqCst);
                match g % 4 {
                    0 => {
                        d0.migrate_to_device(r.range()).unwrap();
                        write_gen(g);
                    }
                    1 => {
                        r.advise(r.range(), Advise::DontNeed).unwrap();
                        write_gen(g);
                    }
                    2 => {
                        write_gen(g);
                        d1.migrate_to_device(r.range()).unwrap();
                    }
                    _ => {
                        write_gen(g);
                        d0.migrate_to_device(r.pages_range(0, pages / 2).unwrap()).unwrap();
                    }
                }
                done.store(g, Ordering::SeqCst);
            }
            common::wait_for_count("the readers' reads", &reads, 11);
        });
        for dev in [&d0, &d1] {
            let (started, done, stop, reads, r) = (&started, &done, &stop, &reads, &r);
            s.spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let lo = done.load(Ordering::SeqCst);
                    let (bytes, _) = dev.read(r.range()).unwrap();
                    let hi = started.load(Ordering::SeqCst);
                    check_generations(&bytes, lo, hi, 97);
                    reads.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
    assert!(reads.load(Ordering::Relaxed) > 10, "the readers ran");
    assert!(d0.mirror_stats().invalidations > 0 && d1.mirror_stats().invalidations > 0);
}

/// After fork, the child's memory is its own: the parent's device does not
/// mirror it, and the parent's device keeps working on the parent's memory.
#[test]
fn fork_child_is_not_mirrored_by_the_parents_device() {
    if common::skip_without_uffd() {
        return;
    }
    let _fork = common::fork_lock();
    let hmm = Hmm::new().unwrap();
    let dev = device(&hmm, "d", 1 << 20);
    let r = hmm.alloc(16 * PAGE_SIZE).unwrap();
    r.fill(0, r.len(), 0x11).unwrap();
    let (bytes, _) = dev.read(r.range()).unwrap();
    assert!(bytes.iter().all(|b| *b == 0x11), "the device maps the parent's pages");
    let out = hmm::os::process::run_in_child(common::CHILD_LIMIT, || {
        // The child writes its copy; reads its own bytes back.
        r.fill(0, r.len(), 0x22).unwrap();
        let mut b = vec![0u8; r.len()];
        r.read(0, &mut b).unwrap();
        i32::from(!b.iter().all(|x| *x == 0x22))
    })
    .unwrap();
    assert_eq!(out, hmm::os::process::ChildOutcome::Exited(0));
    let (bytes, _) = dev.read(r.range()).unwrap();
    assert!(bytes.iter().all(|b| *b == 0x11), "the child's writes are not the parent's");
    dev.write(r.addr(), &vec![0x33; r.len()]).unwrap();
    let mut b = vec![0u8; r.len()];
    r.read(0, &mut b).unwrap();
    assert!(b.iter().all(|x| *x == 0x33), "the parent's device keeps working");
    assert!(r.residencies().iter().all(|x| *x == Residency::System));
}

/// The notifier protocol across munmap and mmap: one thread keeps unmapping
/// the range (dropping it) and mapping fresh memory at the same address
/// (writing a new generation into it, migrating parts to either device), while
/// one thread reads the address through each device. A read either fails
/// (nothing mapped for a moment) or returns only words the memory held during
/// the read: a translation kept from the old mapping would show an old
/// generation, or another page's bytes.
#[test]
fn munmap_and_remap_while_devices_read_never_show_stale_data() {
    if common::skip_without_uffd() {
        return;
    }
    // Small enough that the readers' buffers come from the heap, not from
    // mmap (which could take the address while it is free).
    let pages = 16;
    let hmm = Hmm::new().unwrap();
    let d0 = device(&hmm, "d0", pages * PAGE_SIZE);
    let d1 = device(&hmm, "d1", pages * PAGE_SIZE);
    // Held until the threads have started (each maps its signal stack
    // somewhere free, which must not be here).
    let first = hmm.alloc(pages * PAGE_SIZE).unwrap();
    let at = first.range();
    let first = Mutex::new(Some(first));
    let all_started = std::sync::Barrier::new(3);
    let started = AtomicU64::new(1);
    let done = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let (reads, failed) = (AtomicU64::new(0), AtomicU64::new(0));
    std::thread::scope(|s| {
        s.spawn(|| {
            // The readers stop however this thread ends.
            let _stop = common::StopOnDrop(&stop);
            let mut r: Option<hmm::ManagedRange> = first.lock().unwrap().take();
            all_started.wait();
            for g in 1..150u64 {
                started.store(g, Ordering::SeqCst);
                drop(r.take());
                let m = (0..1000)
                    .find_map(|_| {
                        let m = Mapping::anonymous_at(at, Protection::ReadWrite).ok();
                        if m.is_none() {
                            std::thread::sleep(std::time::Duration::from_millis(1));
                        }
                        m
                    })
                    .expect("the address is free again");
                let range = hmm.adopt(m).unwrap();
                range.write(0, &g.to_ne_bytes().repeat(range.len() / 8)).unwrap();
                let rep = match g % 3 {
                    0 => d0.migrate_to_device(at).unwrap(),
                    1 => d1.migrate_to_device(range.pages_range(0, pages / 2).unwrap()).unwrap(),
                    _ => Default::default(),
                };
                // A page a reader's kernel copy holds at that moment is busy
                // (pinned), as in the kernel; nothing else may stop a page.
                let busy = rep.count(&hmm::SkipReason::Busy);
                assert_eq!(busy, rep.skipped.len(), "generation {g}: {:?}", rep.skipped);
                if g % 5 == 0 {
                    // Part of it goes before the rest.
                    range.unmap(range.pages_range(4, 4).unwrap()).unwrap();
                }
                done.store(g, Ordering::SeqCst);
                r = Some(range);
            }
            common::wait_for_count("the readers' reads", &reads, 11);
            drop(r);
        });
        for dev in [&d0, &d1] {
            let (started, done, stop, reads, failed) = (&started, &done, &stop, &reads, &failed);
            let all_started = &all_started;
            s.spawn(move || {
                all_started.wait();
                while !stop.load(Ordering::SeqCst) {
                    let lo = done.load(Ordering::SeqCst);
                    let Ok((bytes, _)) = dev.read(at) else {
                        failed.fetch_add(1, Ordering::Relaxed);
                        continue;
                    };
                    let hi = started.load(Ordering::SeqCst);
                    check_generations(&bytes, lo, hi, 31);
                    reads.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    });
    assert!(reads.load(Ordering::Relaxed) > 10, "the readers read");
    eprintln!(
        "reads {} (failed while unmapped: {})",
        reads.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed)
    );
    common::eventually("every device page freed", || {
        d0.stats().pages_resident == 0 && d1.stats().pages_resident == 0
    });
}

/// A CPU write to a page a device maps read-only (here the zero page of a
/// page the CPU only read): the device's entry is gone before the write is
/// visible, and the device's next read sees the new value.
#[test]
fn cpu_write_to_a_page_a_device_maps_read_only_invalidates_first() {
    if common::skip_without_uffd() {
        return;
    }
    let hmm = Hmm::new().unwrap();
    let dev = device(&hmm, "d", 16 * PAGE_SIZE);
    let r = hmm.alloc(4 * PAGE_SIZE).unwrap();
    if !r.tracks_writes() {
        eprintln!("SKIP: this kernel has no userfaultfd write-protect mode for anonymous memory");
        return;
    }
    assert_eq!(r.touch_read(0).unwrap(), 0, "the zero page backs page 0");
    let page = r.pages_range(0, 1).unwrap();
    let (bytes, _) = dev.read(page).unwrap();
    assert!(bytes.iter().all(|b| *b == 0));
    let e = dev.entry(r.addr()).expect("the device maps the page");
    assert!(!e.write, "the zero page is mapped read-only");
    // When the invalidation comes, the write must not be visible yet, and the
    // device's entry must already be gone once it has been delivered.
    let seen: Arc<Mutex<Vec<(InvalidationEvent, u8)>>> = Arc::default();
    let s = seen.clone();
    let at = r.addr();
    let _n = hmm.insert_notifier(page, move |inv| {
        let mut b = [0u8; 1];
        assert_eq!(hmm::os::vm::read_memory(at, &mut b), Ok(1));
        s.lock().unwrap().push((inv.event, b[0]));
    });
    r.write(0, &[0xab; 8]).unwrap();
    assert_eq!(*seen.lock().unwrap(), [(InvalidationEvent::Clear, 0)], "invalidated, then written");
    assert!(dev.entry(r.addr()).is_none(), "the device's entry went with the invalidation");
    assert_eq!(hmm.tracked_writes(), 1);
    let (bytes, _) = dev.read(page).unwrap();
    assert_eq!(&bytes[..9], &[0xab, 0xab, 0xab, 0xab, 0xab, 0xab, 0xab, 0xab, 0]);
    // The page is an ordinary writable page now: further writes are not caught.
    assert!(dev.entry(r.addr()).expect("mapped again").write);
    r.write(8, &[1]).unwrap();
    assert_eq!(hmm.tracked_writes(), 1);
}

/// A device access that begins after the application's `madvise(DONTNEED)`
/// returned sees the discard, although hmm learns of it from an event its
/// fault service handles a moment later: the device's entry for a page it
/// held, and its data, are gone, and the page reads as zeros. Repeated, since
/// the window between the call's return and the event's handling is short.
#[test]
fn a_device_access_after_a_discard_returns_sees_zeros() {
    if common::skip_without_uffd() {
        return;
    }
    let _fork = common::fork_lock();
    let hmm = Hmm::new().unwrap();
    let dev = device(&hmm, "dev", 1 << 20);
    let r = hmm.alloc(4 * PAGE_SIZE).unwrap();
    let page = r.pages_range(1, 1).unwrap();
    for round in 0..1000u32 {
        r.fill(PAGE_SIZE, PAGE_SIZE, 0x5a).unwrap();
        assert_eq!(dev.migrate_to_device(page).unwrap().migrated, 1);
        let (b, _) = dev.read(page).unwrap();
        assert!(b.iter().all(|x| *x == 0x5a), "round {round}: the device reads its page");
        r.advise(page, Advise::DontNeed).unwrap();
        let (b, _) = dev.read(page).unwrap();
        assert!(b.iter().all(|x| *x == 0), "round {round}: the device read discarded bytes");
    }
}

/// A device write that reaches a page it may not write fails whole: the
/// bytes before that page are not written either, even where the device
/// already has an entry for them (here the first page lives on the device,
/// and the second is unmapped, or read-only).
#[test]
fn a_device_write_that_cannot_complete_writes_nothing() {
    if common::skip_without_uffd() {
        return;
    }
    let _fork = common::fork_lock();
    let hmm = Hmm::new().unwrap();
    let dev = device(&hmm, "dev", 1 << 20);
    let r = hmm.alloc(4 * PAGE_SIZE).unwrap();
    r.fill(0, 4 * PAGE_SIZE, 0x11).unwrap();
    assert_eq!(dev.migrate_to_device(r.pages_range(0, 1).unwrap()).unwrap().migrated, 1);
    dev.write(r.addr(), &[0x22; 8]).unwrap();
    // Page 1 read-only: a write across pages 0 and 1 is refused.
    r.protect(r.pages_range(1, 1).unwrap(), Protection::Read).unwrap();
    let across = VirtAddr::new(r.addr().get() + PAGE_SIZE - 16);
    assert!(dev.write(across, &[0x33; 32]).is_err());
    // Page 1 unmapped: the same write is refused.
    r.unmap(r.pages_range(1, 1).unwrap()).unwrap();
    assert!(dev.write(across, &[0x44; 32]).is_err());
    let (b, _) = dev.read(r.pages_range(0, 1).unwrap()).unwrap();
    assert_eq!(&b[..8], &[0x22; 8]);
    assert!(b[8..].iter().all(|x| *x == 0x11), "page 0 kept its bytes");
    let mut cpu = vec![0u8; PAGE_SIZE];
    r.read(0, &mut cpu).unwrap();
    assert!(cpu[8..].iter().all(|x| *x == 0x11), "the CPU reads them too");
}

/// Device fault-around: a read fault maps what the rest of the faulting
/// page's 2 MiB block already holds, so reads there take no further fault;
/// a page absent there, or on another device, still takes its own fault
/// when read (and reads right).
#[test]
fn a_device_read_fault_maps_what_the_rest_of_its_block_holds() {
    if common::skip_without_uffd() {
        return;
    }
    let hmm = Hmm::new().unwrap();
    let dev = device(&hmm, "d", 1 << 20);
    let other = device(&hmm, "other", 1 << 20);
    let r = hmm.alloc(2 * hmm::HUGE_PAGE_SIZE).unwrap();
    r.advise(r.range(), Advise::NoHugePage).unwrap();
    r.fill(0, r.len(), 0x42).unwrap();
    // The first page of a whole block inside the range.
    let a = (r.addr().get() + hmm::HUGE_PAGE_SIZE - 1) & !(hmm::HUGE_PAGE_SIZE - 1);
    let page = |k: usize| hmm::PageRange::from_pages(VirtAddr::new(a + k * PAGE_SIZE), 1).unwrap();
    r.advise(page(20), Advise::DontNeed).unwrap();
    assert_eq!(other.migrate_to_device(page(30)).unwrap().migrated, 1);
    let (b, c) = dev.read(page(0)).unwrap();
    assert!(b.iter().all(|x| *x == 0x42));
    assert_eq!(c.faults, 1, "the first read faults");
    for k in [1, 10, 511] {
        let (b, c) = dev.read(page(k)).unwrap();
        assert!(b.iter().all(|x| *x == 0x42), "page {k}");
        assert_eq!(c.faults, 0, "page {k} was mapped by the fault of page 0");
    }
    let (b, c) = dev.read(page(20)).unwrap();
    assert!(b.iter().all(|x| *x == 0), "the absent page reads as zeros");
    assert_eq!(c.faults, 1, "an absent page takes its own fault");
    let (b, c) = dev.read(page(30)).unwrap();
    assert!(b.iter().all(|x| *x == 0x42), "the other device's page reads right");
    assert_eq!(c.faults, 1, "another device's page takes its own fault");
}
