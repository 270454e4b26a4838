//! userfaultfd against the real kernel: faults, fills, MOVE, POISON, events,
//! and the typed errors of bad input. Each test skips, saying why, where the
//! machine has no usable userfaultfd.

mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::Duration;

use common::{fork_lock, skip_without, skip_without_uffd, with_reader};
use hmm::os::mm::{Advise, Mapping, Memfd, Protection};
use hmm::os::pagemap::Pagemap;
use hmm::os::process::{ChildOutcome, run_in_child, thread_id};
use hmm::os::uffd::{
    Features, FillErrorKind, RegisterMode, Uffd, UffdError, UffdEvent, UffdOptions,
};
use hmm::{PAGE_SIZE, PageRange, RangeError, VirtAddr};

const SIGBUS: i32 = 7;

fn open(features: Features) -> Uffd {
    Uffd::open(UffdOptions { required: features, ..UffdOptions::default() })
        .expect("open userfaultfd")
}

fn anon(pages: usize) -> Mapping {
    let m = Mapping::anonymous(pages * PAGE_SIZE, Protection::ReadWrite).unwrap();
    m.advise(m.range(), Advise::NoHugePage).unwrap();
    m
}

fn page_of(m: &Mapping, i: usize) -> PageRange {
    m.range().page(i).unwrap()
}

fn present(m: &Mapping, i: usize) -> bool {
    Pagemap::open().unwrap().entries(page_of(m, i)).unwrap()[0].present()
}

#[test]
fn missing_fault_is_delivered_with_address_and_thread_and_served_by_copy() {
    if skip_without_uffd() {
        return;
    }
    let uffd = open(Features::THREAD_ID);
    let m = anon(4);
    uffd.register(&m, m.range(), RegisterMode::MISSING).unwrap();
    let data = vec![0xC3u8; PAGE_SIZE];
    let target = page_of(&m, 2);
    let (toucher, events) = with_reader(
        &uffd,
        1,
        |ev| {
            if let UffdEvent::PageFault { addr, .. } = ev {
                uffd.copy(PageRange::new(*addr, PAGE_SIZE).unwrap(), &data, false, false).unwrap();
            }
        },
        || {
            thread::scope(|s| {
                s.spawn(|| (thread_id(), m.touch_read(2 * PAGE_SIZE + 123).unwrap()))
                    .join()
                    .unwrap()
            })
        },
    );
    let (tid, value) = toucher;
    assert_eq!(value, 0xC3, "the touch sees the bytes UFFDIO_COPY installed");
    assert_eq!(events.len(), 1);
    match &events[0] {
        UffdEvent::PageFault { addr, flags, thread } => {
            assert_eq!(*addr, target.start(), "page-aligned address of the touched page");
            assert!(!flags.write && !flags.wp && !flags.minor, "a read fault: {flags:?}");
            assert_eq!(*thread, Some(tid), "the faulting thread's id");
        }
        other => panic!("expected a page fault, got {other:?}"),
    }
}

#[test]
fn write_fault_has_the_write_flag_and_zeropage_serves_reads() {
    if skip_without_uffd() {
        return;
    }
    let uffd = open(Features::NONE);
    let m = anon(2);
    uffd.register(&m, m.range(), RegisterMode::MISSING).unwrap();
    let page = vec![0u8; PAGE_SIZE];
    let (_, events) = with_reader(
        &uffd,
        2,
        |ev| {
            if let UffdEvent::PageFault { addr, flags, .. } = ev {
                let dst = PageRange::new(*addr, PAGE_SIZE).unwrap();
                if flags.write {
                    uffd.copy(dst, &page, false, false).unwrap();
                } else {
                    uffd.zeropage(dst, false).unwrap();
                }
            }
        },
        || {
            thread::scope(|s| {
                s.spawn(|| {
                    m.touch_write(PAGE_SIZE, 9).unwrap();
                    assert_eq!(m.touch_read(0).unwrap(), 0);
                });
            })
        },
    );
    let flags: Vec<bool> = events
        .iter()
        .map(|e| match e {
            UffdEvent::PageFault { flags, .. } => flags.write,
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(flags, vec![true, false]);
    assert_eq!(m.touch_read(PAGE_SIZE).unwrap(), 9);
}

#[test]
fn copy_dontwake_leaves_the_thread_waiting_until_wake() {
    if skip_without_uffd() {
        return;
    }
    let uffd = open(Features::NONE);
    let m = anon(1);
    uffd.register(&m, m.range(), RegisterMode::MISSING).unwrap();
    let done = AtomicBool::new(false);
    thread::scope(|s| {
        let t = s.spawn(|| {
            let v = m.touch_read(0).unwrap();
            done.store(true, Ordering::SeqCst);
            v
        });
        assert!(uffd.poll(Some(Duration::from_secs(10))).unwrap(), "fault arrives");
        let mut evs = Vec::new();
        uffd.read_events(&mut evs, 4).unwrap();
        uffd.copy(m.range(), &[0x44; PAGE_SIZE], true, false).unwrap();
        thread::sleep(Duration::from_millis(100));
        assert!(!done.load(Ordering::SeqCst), "DONTWAKE must not wake the faulting thread");
        uffd.wake(m.range()).unwrap();
        assert_eq!(t.join().unwrap(), 0x44);
    });
}

#[test]
fn copy_into_a_populated_page_reports_exists() {
    if skip_without_uffd() {
        return;
    }
    let uffd = open(Features::NONE);
    let m = anon(2);
    uffd.register(&m, m.range(), RegisterMode::MISSING).unwrap();
    uffd.copy(page_of(&m, 0), &[1; PAGE_SIZE], false, false).unwrap();
    let e = uffd.copy(m.range(), &[2; 2 * PAGE_SIZE], false, false).unwrap_err();
    assert_eq!((e.kind, e.done), (FillErrorKind::Exists, 0));
    assert_eq!(m.touch_read(0).unwrap(), 1, "the existing page is untouched");
}

#[test]
fn move_moves_bytes_and_leaves_the_source_missing() {
    if skip_without("move") {
        return;
    }
    let uffd = open(Features::MOVE);
    let src = anon(4);
    for i in 0..4 {
        src.fill(i * PAGE_SIZE, PAGE_SIZE, 0x10 + i as u8).unwrap();
    }
    let dst = anon(4);
    uffd.register(&dst, dst.range(), RegisterMode::MISSING).unwrap();
    let moved = uffd.move_pages(dst.range(), &src, src.range(), false, false).unwrap();
    assert_eq!(moved.bytes, 4 * PAGE_SIZE);
    for i in 0..4 {
        assert!(!present(&src, i), "source page {i} is missing after the move");
        let mut buf = vec![0u8; PAGE_SIZE];
        dst.read(i * PAGE_SIZE, &mut buf).unwrap();
        assert!(buf.iter().all(|&b| b == 0x10 + i as u8), "destination page {i} holds the bytes");
    }
    assert_eq!(src.touch_read(0).unwrap(), 0, "an unregistered source now reads zero");
}

#[test]
fn move_into_a_populated_page_reports_exists() {
    if skip_without("move") {
        return;
    }
    let uffd = open(Features::MOVE);
    let src = anon(1);
    src.fill(0, PAGE_SIZE, 5).unwrap();
    let dst = anon(1);
    uffd.register(&dst, dst.range(), RegisterMode::MISSING).unwrap();
    uffd.copy(dst.range(), &[7; PAGE_SIZE], false, false).unwrap();
    let e = uffd.move_pages(dst.range(), &src, src.range(), false, false).unwrap_err();
    assert_eq!((e.kind, e.done), (FillErrorKind::Exists, 0));
    assert_eq!(dst.touch_read(0).unwrap(), 7);
    assert_eq!(src.touch_read(0).unwrap(), 5, "a refused move leaves the source in place");
}

#[test]
fn move_from_a_hole_is_reported_unless_holes_are_allowed() {
    if skip_without("move") {
        return;
    }
    let uffd = open(Features::MOVE);
    let src = anon(3);
    src.fill(0, PAGE_SIZE, 1).unwrap();
    src.fill(2 * PAGE_SIZE, PAGE_SIZE, 3).unwrap(); // page 1 is a hole
    let dst = anon(3);
    uffd.register(&dst, dst.range(), RegisterMode::MISSING).unwrap();

    // A hole at the start: nothing moves.
    let hole = page_of(&src, 1);
    let e = uffd.move_pages(page_of(&dst, 1), &src, hole, false, false).unwrap_err();
    assert_eq!((e.kind, e.done), (FillErrorKind::SourceHole, 0));

    // A hole in the middle: a short move (EAGAIN with the bytes done), then the hole.
    let e = uffd.move_pages(dst.range(), &src, src.range(), false, false).unwrap_err();
    assert_eq!((e.kind, e.done), (FillErrorKind::Again, PAGE_SIZE), "partial result decoded");
    let rest_dst = dst.range().subrange(PAGE_SIZE, 2 * PAGE_SIZE).unwrap();
    let rest_src = src.range().subrange(PAGE_SIZE, 2 * PAGE_SIZE).unwrap();
    let e = uffd.move_pages_all(rest_dst, &src, rest_src, false, false).unwrap_err();
    assert_eq!((e.kind, e.done), (FillErrorKind::SourceHole, 0));

    // With holes allowed, the hole is skipped and counts as moved.
    let ok = uffd.move_pages(rest_dst, &src, rest_src, false, true).unwrap();
    assert_eq!(ok.bytes, 2 * PAGE_SIZE);
    assert!(!present(&dst, 1), "the hole stays a hole at the destination");
    assert_eq!(dst.touch_read(0).unwrap(), 1);
    assert_eq!(dst.touch_read(2 * PAGE_SIZE).unwrap(), 3);
}

#[test]
fn poison_makes_a_touch_end_in_sigbus() {
    if skip_without("poison") {
        return;
    }
    let _g = fork_lock();
    // The child sets up, poisons page 0 and touches it: it must die of SIGBUS.
    let touch_poisoned = run_in_child(common::CHILD_LIMIT, || {
        let uffd = open(Features::POISON);
        let m = anon(2);
        uffd.register(&m, m.range(), RegisterMode::MISSING).unwrap();
        uffd.poison(page_of(&m, 0), false).unwrap();
        i32::from(m.touch_read(0).unwrap()) + 10
    })
    .unwrap();
    assert_eq!(touch_poisoned, ChildOutcome::Signaled(SIGBUS));
    // The same, touching only the page beside it: exactly the poisoned page faults.
    let touch_neighbour = run_in_child(common::CHILD_LIMIT, || {
        let uffd = open(Features::POISON);
        let m = anon(2);
        uffd.register(&m, m.range(), RegisterMode::MISSING).unwrap();
        uffd.poison(page_of(&m, 0), false).unwrap();
        uffd.copy(page_of(&m, 1), &[42; PAGE_SIZE], false, false).unwrap();
        i32::from(m.touch_read(PAGE_SIZE).unwrap())
    })
    .unwrap();
    assert_eq!(touch_neighbour, ChildOutcome::Exited(42));
}

#[test]
fn fork_event_hands_over_a_descriptor_that_serves_the_child() {
    if skip_without("event-fork") {
        return;
    }
    let _g = fork_lock();
    let uffd = open(Features::EVENT_FORK);
    let m = anon(2);
    uffd.register(&m, m.range(), RegisterMode::MISSING).unwrap();
    let served = std::sync::Mutex::new(None);
    let (outcome, events) = with_reader(
        &uffd,
        1,
        |ev| {
            if let UffdEvent::Fork { child } = ev {
                // Serve the child's first fault through its own descriptor.
                assert!(child.poll(Some(Duration::from_secs(10))).unwrap(), "child faults");
                let mut evs = Vec::new();
                child.read_events(&mut evs, 4).unwrap();
                if let Some(UffdEvent::PageFault { addr, .. }) = evs.first() {
                    child
                        .copy(
                            PageRange::new(*addr, PAGE_SIZE).unwrap(),
                            &[77; PAGE_SIZE],
                            false,
                            false,
                        )
                        .unwrap();
                    *served.lock().unwrap() = Some(*addr);
                }
            }
        },
        || {
            run_in_child(common::CHILD_LIMIT, || i32::from(m.touch_read(PAGE_SIZE).unwrap()))
                .unwrap()
        },
    );
    assert_eq!(events.len(), 1);
    assert!(matches!(events[0], UffdEvent::Fork { .. }), "got {:?}", events[0]);
    assert_eq!(*served.lock().unwrap(), Some(page_of(&m, 1).start()), "the child's fault address");
    assert_eq!(outcome, ChildOutcome::Exited(77), "the child read what its descriptor installed");
}

#[test]
fn unmap_event_names_the_unmapped_range() {
    if skip_without_uffd() {
        return;
    }
    let uffd = open(Features::EVENT_UNMAP);
    let m = anon(4);
    uffd.register(&m, m.range(), RegisterMode::MISSING).unwrap();
    let hole = page_of(&m, 1).start();
    let hole_range = m.range().subrange(PAGE_SIZE, 2 * PAGE_SIZE).unwrap();
    let (rest, events) =
        with_reader(&uffd, 1, |_| {}, || m.unmap_part(hole_range).map_err(|(_, e)| e).unwrap());
    // Unmapping the rest would raise more UNMAP events, each waiting to be read:
    // close the descriptor first, which ends its registrations.
    uffd.close();
    drop(rest);
    assert_eq!(events.len(), 1);
    match events[0] {
        UffdEvent::Unmap { start, end } => {
            assert_eq!(start, hole);
            assert_eq!(end, hole_range.end());
        }
        ref other => panic!("expected UNMAP, got {other:?}"),
    }
}

/// An unmap whose event nobody has read yet is a pending change; once the
/// event is read and the unmapping thread has gone on, it is not.
#[test]
fn an_unread_unmap_event_is_a_pending_change() {
    if skip_without_uffd() {
        return;
    }
    let uffd = open(Features::EVENT_UNMAP);
    let m = anon(4);
    uffd.register(&m, m.range(), RegisterMode::MISSING).unwrap();
    assert!(!uffd.changes_pending().unwrap(), "nothing has changed yet");
    let part = m.range().subrange(PAGE_SIZE, PAGE_SIZE).unwrap();
    thread::scope(|s| {
        let unmapper = s.spawn(|| m.unmap_part(part).map_err(|(_, e)| e).unwrap());
        // The unmapper waits in the kernel until its event is read.
        let mut pending = false;
        for _ in 0..2000 {
            if uffd.changes_pending().unwrap() {
                pending = true;
                break;
            }
            thread::sleep(Duration::from_millis(1));
        }
        assert!(pending, "the unread unmap event is reported pending");
        assert!(!unmapper.is_finished(), "munmap waits for its event to be read");
        let mut events = Vec::new();
        while events.is_empty() {
            uffd.poll(Some(Duration::from_secs(5))).unwrap();
            uffd.read_events(&mut events, 8).unwrap();
        }
        assert!(matches!(events[0], UffdEvent::Unmap { .. }), "{events:?}");
        let rest = unmapper.join().unwrap();
        assert!(!uffd.changes_pending().unwrap(), "the change is over once munmap returned");
        uffd.close();
        drop(rest);
    });
}

#[test]
fn remap_event_names_old_and_new_addresses() {
    if skip_without_uffd() {
        return;
    }
    let uffd = open(Features::EVENT_REMAP);
    let m = anon(4);
    m.fill(0, 4 * PAGE_SIZE, 6).unwrap();
    uffd.register(&m, m.range(), RegisterMode::MISSING).unwrap();
    let target = anon(4);
    let (from, to) = (m.addr(), target.addr());
    let (moved, events) =
        with_reader(&uffd, 1, |_| {}, || m.move_onto(target).map_err(|(_, e)| e).unwrap());
    assert_eq!(moved.addr(), to);
    assert_eq!(moved.touch_read(3 * PAGE_SIZE).unwrap(), 6, "data follows the move");
    assert_eq!(events.len(), 1);
    match events[0] {
        UffdEvent::Remap { from: f, to: t, len } => {
            assert_eq!((f, t, len), (from, to, 4 * PAGE_SIZE))
        }
        ref other => panic!("expected REMAP, got {other:?}"),
    }
}

/// What hmm's remap handling rests on: a moving `mremap` reports `REMAP`
/// and then `UNMAP` of the old range, while `MREMAP_DONTUNMAP` reports only
/// `REMAP`: its old range stays mapped, empty and registered, so a touch
/// there is a missing fault.
#[test]
fn a_moving_remap_unmaps_the_old_range_and_dontunmap_keeps_it_registered() {
    if skip_without_uffd() {
        return;
    }
    let uffd = open(Features::EVENT_REMAP | Features::EVENT_UNMAP);
    let m = anon(4);
    m.fill(0, 4 * PAGE_SIZE, 6).unwrap();
    uffd.register(&m, m.range(), RegisterMode::MISSING).unwrap();
    let from = m.range();
    let target = anon(4);
    let (moved, events) =
        with_reader(&uffd, 2, |_| {}, || m.move_onto(target).map_err(|(_, e)| e).unwrap());
    assert_eq!(events.len(), 2, "{events:?}");
    assert!(matches!(events[0], UffdEvent::Remap { from: f, .. } if f == from.start()));
    match events[1] {
        UffdEvent::Unmap { start, end } => assert_eq!((start, end), (from.start(), from.end())),
        ref other => panic!("expected UNMAP of the old range, got {other:?}"),
    }
    assert_eq!(moved.touch_read(0).unwrap(), 6);

    let (kept, events) = with_reader(&uffd, 1, |_| {}, || moved.remap_dontunmap().unwrap());
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(matches!(events[0], UffdEvent::Remap { .. }), "{events:?}");
    assert_eq!(kept.touch_read(0).unwrap(), 6);
    let zero = vec![0u8; PAGE_SIZE];
    let (v, faults) = with_reader(
        &uffd,
        1,
        |ev| {
            if let UffdEvent::PageFault { addr, .. } = ev {
                let page = PageRange::from_pages(addr.page_down(), 1).unwrap();
                uffd.copy(page, &zero, false, false).unwrap();
            }
        },
        || moved.touch_read(PAGE_SIZE).unwrap(),
    );
    assert_eq!(v, 0);
    assert!(
        matches!(faults[..], [UffdEvent::PageFault { .. }]),
        "the old range is still registered: {faults:?}"
    );
    // Closed before the mappings go: their unmap events would wait for a reader.
    uffd.close();
}

#[test]
fn remove_event_names_the_dropped_range() {
    if skip_without_uffd() {
        return;
    }
    let uffd = open(Features::EVENT_REMOVE);
    let m = anon(4);
    m.fill(0, 4 * PAGE_SIZE, 6).unwrap();
    uffd.register(&m, m.range(), RegisterMode::MISSING).unwrap();
    let dropped = m.range().subrange(2 * PAGE_SIZE, 2 * PAGE_SIZE).unwrap();
    let ((), events) =
        with_reader(&uffd, 1, |_| {}, || m.advise(dropped, Advise::DontNeed).unwrap());
    assert_eq!(events.len(), 1);
    match events[0] {
        UffdEvent::Remove { start, end } => {
            assert_eq!((start, end), (dropped.start(), dropped.end()))
        }
        ref other => panic!("expected REMOVE, got {other:?}"),
    }
    assert!(!present(&m, 2) && present(&m, 1));
}

#[test]
fn minor_fault_is_served_by_continue() {
    if skip_without("minor-shmem") {
        return;
    }
    let uffd = open(Features::MINOR_SHMEM);
    let f = Memfd::create(c"hmm-minor", 2 * PAGE_SIZE as u64, false).unwrap();
    let view = f.map(0, 2 * PAGE_SIZE, Protection::ReadWrite, true).unwrap();
    let managed = f.map(0, 2 * PAGE_SIZE, Protection::ReadWrite, true).unwrap();
    view.fill(PAGE_SIZE, PAGE_SIZE, 0x66).unwrap(); // in the page cache, not mapped in `managed`
    uffd.register(&managed, managed.range(), RegisterMode::MINOR).unwrap();
    let (value, events) = with_reader(
        &uffd,
        1,
        |ev| {
            if let UffdEvent::PageFault { addr, .. } = ev {
                uffd.continue_(PageRange::new(*addr, PAGE_SIZE).unwrap(), false, false).unwrap();
            }
        },
        || thread::scope(|s| s.spawn(|| managed.touch_read(PAGE_SIZE).unwrap()).join().unwrap()),
    );
    assert_eq!(value, 0x66);
    assert!(matches!(events[0], UffdEvent::PageFault { flags, .. } if flags.minor));
}

#[test]
fn write_protect_fault_has_the_wp_flag_and_unprotect_releases_it() {
    if skip_without("write-protect") {
        return;
    }
    let uffd = open(Features::PAGEFAULT_FLAG_WP);
    let m = anon(1);
    uffd.register(&m, m.range(), RegisterMode::MISSING | RegisterMode::WP).unwrap();
    uffd.copy(m.range(), &[1; PAGE_SIZE], false, true).unwrap(); // installed write-protected
    assert_eq!(m.touch_read(0).unwrap(), 1, "reads do not fault");
    let ((), events) = with_reader(
        &uffd,
        1,
        |ev| {
            if let UffdEvent::PageFault { addr, .. } = ev {
                uffd.write_unprotect(PageRange::new(*addr, PAGE_SIZE).unwrap(), false).unwrap();
            }
        },
        || thread::scope(|s| s.spawn(|| m.touch_write(0, 2).unwrap()).join().unwrap()),
    );
    assert!(matches!(events[0], UffdEvent::PageFault { flags, .. } if flags.wp && flags.write));
    assert_eq!(m.touch_read(0).unwrap(), 2);
}

#[test]
fn bad_input_gives_typed_errors() {
    if skip_without_uffd() {
        return;
    }
    let uffd = open(Features::NONE);
    let m = anon(2);

    // Malformed ranges never reach the kernel.
    assert_eq!(
        PageRange::new(VirtAddr::new(m.addr().get() + 1), PAGE_SIZE),
        Err(RangeError::UnalignedStart(VirtAddr::new(m.addr().get() + 1)))
    );
    assert_eq!(PageRange::new(m.addr(), 0), Err(RangeError::Empty));
    assert_eq!(
        PageRange::new(m.addr(), PAGE_SIZE + 1),
        Err(RangeError::UnalignedLength(PAGE_SIZE + 1))
    );

    // A range that is not registered.
    let e = uffd.copy(page_of(&m, 0), &[0; PAGE_SIZE], false, false).unwrap_err();
    assert_eq!(e.kind, FillErrorKind::NotRegistered, "{e}");
    let e = uffd.zeropage(page_of(&m, 0), false).unwrap_err();
    assert_eq!(e.kind, FillErrorKind::NotRegistered, "{e}");

    // Only a mapping's own pages can be registered, checked before the kernel is asked.
    let outside = PageRange::new(m.range().end(), PAGE_SIZE).unwrap();
    assert!(matches!(
        uffd.register(&m, outside, RegisterMode::MISSING),
        Err(UffdError::Range(RangeError::OutOfBounds { .. }))
    ));
    // A mode the kernel refuses for this kind of memory: MINOR needs shmem or hugetlbfs.
    match uffd.register(&m, m.range(), RegisterMode::MINOR) {
        Err(UffdError::Register { errno, .. }) => assert_eq!(errno, rustix::io::Errno::INVAL),
        other => panic!("MINOR on private anonymous memory must be refused: {other:?}"),
    }

    // A source buffer whose length differs from the destination's.
    uffd.register(&m, m.range(), RegisterMode::MISSING).unwrap();
    let e = uffd.copy(m.range(), &[0; PAGE_SIZE], false, false).unwrap_err();
    assert_eq!((e.kind, e.done), (FillErrorKind::Invalid, 0));
    // A MOVE source range outside the mapping it names.
    let other = anon(1);
    let e = uffd.move_pages(page_of(&m, 0), &other, page_of(&m, 1), false, false).unwrap_err();
    assert_eq!(e.kind, FillErrorKind::Invalid);

    // A closed descriptor.
    uffd.close();
    assert!(uffd.is_closed());
    assert!(matches!(uffd.register(&m, m.range(), RegisterMode::MISSING), Err(UffdError::Closed)));
    assert!(matches!(uffd.poll(Some(Duration::ZERO)), Err(UffdError::Closed)));
    assert!(matches!(uffd.read_events(&mut Vec::new(), 1), Err(UffdError::Closed)));
    assert_eq!(
        uffd.copy(page_of(&m, 0), &[0; PAGE_SIZE], false, false).unwrap_err().kind,
        FillErrorKind::Closed
    );
    // Closing ended the registration: the page now faults in normally.
    assert_eq!(m.touch_read(0).unwrap(), 0);
}

#[test]
fn missing_required_features_are_named() {
    if skip_without_uffd() {
        return;
    }
    let absent = Features::from_bits(1 << 40);
    match Uffd::open(UffdOptions { required: absent, ..UffdOptions::default() }) {
        Err(UffdError::MissingFeatures(f)) => assert_eq!(f, absent),
        other => panic!("expected MissingFeatures, got {other:?}"),
    }
}
