//! Model tests: the interval notifiers' sequence logic and the page-state
//! machine under [shuttle]'s randomized schedulers.
//!
//! Each test builds a small world out of the crate's real types
//! ([`Notifiers`], [`NotifierState`], [`PageEntry`]) and a few threads, and
//! shuttle runs it many times, each under a different interleaving of the
//! threads' synchronization operations (locks, condition variables, atomics:
//! those of [`crate::sync`] and shuttle's own). Every test states the
//! invariant it checks; a violation panics, and shuttle prints the schedule
//! that led to it (and how to replay it).
//!
//! Run with `cargo test -p hmm --features shuttle --lib model::`. The
//! iterations of each test can be changed with `HMM_SHUTTLE_ITERATIONS` (for a
//! longer search, say 100000).
//!
//! [shuttle]: https://docs.rs/shuttle

use shuttle::scheduler::{PctScheduler, RandomScheduler, Scheduler};
use shuttle::sync::atomic::AtomicBool;
use shuttle::thread;

use crate::addr::{PAGE_SIZE, PageRange, VirtAddr};
use crate::mirror::{Invalidation, InvalidationEvent, NotifierState, Notifiers};
use crate::page::{DeviceId, DevicePage, PageEntry, Residency};
use crate::sync::{Arc, AtomicU64, Condvar, Mutex, Ordering};

/// The iterations of a test: `default`, or `HMM_SHUTTLE_ITERATIONS`.
fn iterations(default: usize) -> usize {
    std::env::var("HMM_SHUTTLE_ITERATIONS").ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

fn run(scheduler: impl Scheduler + 'static, test: impl Fn() + Send + Sync + 'static) {
    let mut config = shuttle::Config::new();
    // The notifiers use acquire/release atomics, which shuttle runs as
    // sequentially consistent (and says so, once per test): the protocol
    // does not rest on their ordering beyond what the locks give.
    config.silence_warnings = true;
    shuttle::Runner::new(scheduler, config).run(test);
}

/// Runs `test` under shuttle's random scheduler.
fn check_random(default_iterations: usize, test: impl Fn() + Send + Sync + 'static) {
    run(RandomScheduler::new(iterations(default_iterations)), test);
}

/// Runs `test` under shuttle's PCT scheduler (probabilistic concurrency
/// testing: good at bugs that need a few specific preemptions).
fn check_pct(default_iterations: usize, depth: usize, test: impl Fn() + Send + Sync + 'static) {
    run(PctScheduler::new(depth, iterations(default_iterations)), test);
}

/// `n` pages starting `first` pages into a made-up address space (the
/// notifiers never touch the memory).
fn pages(first: usize, n: usize) -> PageRange {
    PageRange::from_pages(VirtAddr::new(0x7f00_0000_0000 + first * PAGE_SIZE), n).expect("valid")
}

// ---- interval notifiers --------------------------------------------------------------

/// A device page table of one entry, filled with the retry protocol.
struct Mirror {
    notifiers: Notifiers,
    notifier: Arc<NotifierState>,
    /// The version of the CPU's translation (a change makes a new one).
    cpu: AtomicU64,
    /// The device's entry: the CPU version it was filled from.
    table: Arc<Mutex<Option<u64>>>,
}

impl Mirror {
    /// A mirror of pages 0..4, plus a notifier of pages 8..10 that no
    /// invalidation here may call.
    fn new() -> Arc<Self> {
        let notifiers = Notifiers::new();
        let table = Arc::new(Mutex::new(None));
        let t = table.clone();
        let (_, notifier) = notifiers.register(
            pages(0, 4),
            Box::new(move |_: &Invalidation| *t.lock().unwrap() = None),
            false,
        );
        let (_, _elsewhere) = notifiers.register(
            pages(8, 2),
            Box::new(|i: &Invalidation| panic!("{i:?} called a notifier it does not overlap")),
            false,
        );
        Arc::new(Mirror { notifiers, notifier, cpu: AtomicU64::new(1), table })
    }

    /// The device's fill, as the module docs of `crate::mirror` prescribe.
    fn fill(&self) {
        loop {
            let seq = self.notifier.read_begin();
            let v = self.cpu.load(Ordering::SeqCst); // `range_fault`, no device lock held
            let mut t = self.table.lock().unwrap();
            if self.notifier.read_retry(seq) {
                continue;
            }
            *t = Some(v);
            return;
        }
    }

    /// The invariant: the device holds nothing, or the current translation.
    fn assert_fresh(&self, when: &str) {
        let t = *self.table.lock().unwrap();
        let cpu = self.cpu.load(Ordering::SeqCst);
        assert!(
            t.is_none_or(|v| v == cpu),
            "{when}: the device holds translation {t:?}, the CPU's is {cpu}"
        );
    }
}

/// **The retry protocol keeps no stale translation.** A device fills its
/// one-entry table with `read_begin`, a read of the CPU's translation, and
/// `read_retry` under the table lock (the lock its callback takes to clear
/// the entry), twice; meanwhile the CPU's translation changes twice, once as
/// hmm changes it (`Notifiers::start`, the change, the guard dropped) and
/// once as the application does (the change, then `start`, whose guard drops
/// at once).
///
/// Invariant: once an invalidation's guard is dropped, the device's entry is
/// empty or holds the current translation; so it does after both threads
/// are done. (A fill that read the old translation either installed it
/// before the callback, which cleared it, or sees the new sequence and
/// retries.) And an invalidation calls only the notifiers it overlaps.
#[test]
fn the_retry_protocol_keeps_no_stale_translation() {
    let test = || {
        let m = Mirror::new();
        let filler = thread::spawn({
            let m = m.clone();
            move || {
                m.fill();
                m.fill();
            }
        });
        // hmm's own change: callbacks first, the change under the guard.
        let g = m.notifiers.start(pages(1, 2), InvalidationEvent::Protection);
        m.cpu.store(2, Ordering::SeqCst);
        drop(g);
        m.assert_fresh("after hmm's change");
        // The application's change: made first, callbacks after.
        m.cpu.store(3, Ordering::SeqCst);
        assert_eq!(m.notifiers.invalidate(pages(3, 1), InvalidationEvent::Clear), 1);
        m.assert_fresh("after the application's change");
        filler.join().unwrap();
        m.assert_fresh("at the end");
    };
    check_random(10_000, test);
    check_pct(10_000, 3, test);
}

/// **`read_begin` waits out an invalidation in progress.** One thread
/// starts an invalidation whose callback blocks until a third thread opens a
/// gate, holds the guard a while (as hmm does across its change), and drops
/// it; a reader calls `read_begin` meanwhile.
///
/// Invariant: `read_begin` returns the invalidation's (new) sequence only
/// once the guard is being dropped, never while the callback or the change
/// under the guard may still run; and once a callback has started, a
/// sequence `read_begin` returned earlier fails `read_retry`.
#[test]
fn read_begin_waits_out_an_invalidation_in_progress() {
    let test = || {
        let notifiers = Arc::new(Notifiers::new());
        let gate = Arc::new((Mutex::new(false), Condvar::new()));
        let called = Arc::new(AtomicU64::new(0));
        let ending = Arc::new(AtomicBool::new(false));
        let (_, n) = notifiers.register(
            pages(0, 1),
            {
                let (gate, called) = (gate.clone(), called.clone());
                Box::new(move |i: &Invalidation| {
                    called.store(i.seq, Ordering::SeqCst);
                    let (open, cv) = &*gate;
                    let mut o = open.lock().unwrap();
                    while !*o {
                        o = cv.wait(o).unwrap();
                    }
                })
            },
            false,
        );
        let invalidator = thread::spawn({
            let (notifiers, ending) = (notifiers.clone(), ending.clone());
            move || {
                let g = notifiers.start(pages(0, 1), InvalidationEvent::Clear);
                thread::yield_now(); // the change
                ending.store(true, Ordering::SeqCst);
                drop(g);
            }
        });
        let opener = thread::spawn({
            let gate = gate.clone();
            move || {
                *gate.0.lock().unwrap() = true;
                gate.1.notify_all();
            }
        });
        let seq = n.read_begin();
        let was_ending = ending.load(Ordering::SeqCst);
        let new = called.load(Ordering::SeqCst);
        if new != 0 {
            assert!(
                seq == new || n.read_retry(seq),
                "a callback ran, and sequence {seq} from before it still passes read_retry"
            );
        }
        invalidator.join().unwrap();
        opener.join().unwrap();
        let new = called.load(Ordering::SeqCst);
        assert_ne!(new, 0, "the callback ran");
        assert!(
            seq != new || was_ending,
            "read_begin returned the new sequence {seq} while its invalidation was in progress"
        );
    };
    check_random(10_000, test);
    check_pct(10_000, 3, test);
}

/// **Removing a notifier waits out its callbacks.** One thread invalidates
/// a notifier's range while another removes the notifier (what dropping an
/// `IntervalNotifier` does).
///
/// Invariant: no callback of the notifier runs after its removal returned
/// (the device may tear down what its callback touches once it is gone).
#[test]
fn a_removed_notifier_is_called_no_more() {
    let test = || {
        let notifiers = Arc::new(Notifiers::new());
        let removed = Arc::new(AtomicBool::new(false));
        let (key, n) = notifiers.register(
            pages(0, 2),
            {
                let removed = removed.clone();
                Box::new(move |_: &Invalidation| {
                    assert!(
                        !removed.load(Ordering::SeqCst),
                        "a callback ran after its notifier was removed"
                    );
                    thread::yield_now();
                    assert!(
                        !removed.load(Ordering::SeqCst),
                        "a notifier's removal returned while its callback ran"
                    );
                })
            },
            false,
        );
        let invalidator = thread::spawn({
            let notifiers = notifiers.clone();
            move || {
                let _ = notifiers.invalidate(pages(1, 1), InvalidationEvent::Unmap);
            }
        });
        notifiers.unregister(key, &n);
        removed.store(true, Ordering::SeqCst);
        assert_eq!(notifiers.len(), 0);
        invalidator.join().unwrap();
    };
    check_random(10_000, test);
    check_pct(10_000, 3, test);
}

// ---- the page-state machine ----------------------------------------------------------

/// Pages in the model.
const PAGES: usize = 3;
/// Device pages in the model (enough for every page twice: a page's old
/// device page and its new one can both be allocated for a moment).
const DEVICE_PAGES: usize = 2 * PAGES;
const DEV: DeviceId = DeviceId(0);

/// One managed range: its page records, under the table lock, and where
/// their data is.
struct Range {
    table: Mutex<Table>,
    /// Signalled when a migration ends (`Range::settled` in `crate::space`).
    settled: Condvar,
    /// The data. Locked after `table` when both are held.
    mem: Mutex<Memory>,
}

/// The page records, and the history of the application's operations on the
/// pages, stamped under the same lock.
struct Table {
    entries: Vec<PageEntry>,
    /// A clock for the operations below.
    clock: u64,
    /// Per page: when the last CPU write happened (0: the initial contents)
    /// and the value it wrote.
    written: Vec<(u64, u64)>,
    /// Per page: when the last discard happened (0: none).
    discarded: Vec<u64>,
}

/// A page's data is one number; an empty page reads as 0.
struct Memory {
    /// What each page's address holds in system memory (`None`: nothing
    /// mapped). For a page mid-migration from system memory, its source
    /// (isolated in the real thing: the CPU cannot reach it).
    system: Vec<Option<u64>>,
    /// The device's pages: `Some` while allocated.
    device: Vec<Option<u64>>,
}

impl Memory {
    fn alloc(&mut self, v: u64) -> DevicePage {
        let index = self.device.iter().position(Option::is_none).expect("device memory left");
        self.device[index] = Some(v);
        DevicePage { dev: DEV, index: index as u32 }
    }

    fn put(&mut self, p: DevicePage) {
        assert!(self.device[p.index as usize].take().is_some(), "{p} freed twice");
    }

    fn read_device(&self, p: DevicePage) -> u64 {
        self.device[p.index as usize].unwrap_or_else(|| panic!("{p} is recorded but free"))
    }
}

impl Range {
    /// Page 0 in system memory holding 10, page 1 on the device holding 20,
    /// page 2 never populated.
    fn new() -> Arc<Self> {
        let mut mem =
            Memory { system: vec![Some(10), None, None], device: vec![None; DEVICE_PAGES] };
        let p = mem.alloc(20);
        Arc::new(Range {
            table: Mutex::new(Table {
                entries: vec![
                    PageEntry::SYSTEM,
                    PageEntry::new(Residency::Device(p)),
                    PageEntry::NONE,
                ],
                clock: 0,
                written: vec![(0, 10), (0, 20), (0, 0)],
                discarded: vec![0; PAGES],
            }),
            settled: Condvar::new(),
            mem: Mutex::new(mem),
        })
    }

    /// A migration of the pages `pages` that it can take, in hmm's three
    /// phases (see `crate::migrate`): towards the device (from `None` and
    /// `System`) or back to system memory (from `Device`). The copy of the
    /// pages in `failing` fails: they are aborted.
    fn migrate(&self, pages: &[usize], to_device: bool, failing: &[usize]) {
        // 1. Setup, under the table lock: take the pages no migration holds.
        let held: Vec<(usize, Residency)> = {
            let mut t = self.table.lock().unwrap();
            let mut held = Vec::new();
            for &i in pages {
                let e = &mut t.entries[i];
                let src = e.residency();
                let movable = match src {
                    Residency::None | Residency::System => to_device,
                    Residency::Device(_) => !to_device,
                    _ => false,
                };
                if movable && !e.is_migrating() {
                    e.begin_migration().expect("setup takes a page no migration holds");
                    held.push((i, src));
                }
            }
            held
        };
        // 2. The copies, without the table lock (the CPU waits on held pages).
        let mut copied = Vec::new();
        for (i, src) in held {
            let mut mem = self.mem.lock().unwrap();
            let v = match src {
                Residency::None => 0,
                Residency::System => mem.system[i].expect("a held page keeps its source"),
                Residency::Device(p) => mem.read_device(p),
                r => unreachable!("{r:?} is never taken"),
            };
            let dst = to_device.then(|| mem.alloc(v));
            copied.push((i, src, v, dst));
        }
        // 3. Finalize, under the table lock: commit, or abort what failed.
        let mut t = self.table.lock().unwrap();
        let mut mem = self.mem.lock().unwrap();
        for (i, src, v, dst) in copied {
            let e = &mut t.entries[i];
            let drop_source = |mem: &mut Memory| match src {
                Residency::System => mem.system[i] = None,
                Residency::Device(p) => mem.put(p),
                _ => {}
            };
            if failing.contains(&i) {
                let kept = e.abort().expect("a held page aborts");
                if let Some(d) = dst {
                    mem.put(d);
                }
                if !kept {
                    // Discarded meanwhile: the source goes too.
                    drop_source(&mut mem);
                }
                continue;
            }
            let to = dst.map_or(Residency::System, Residency::Device);
            let committed = e.commit(to).expect("a held page commits");
            drop_source(&mut mem);
            match (committed, dst) {
                (true, Some(_)) => {}
                (true, None) => mem.system[i] = Some(v),
                // Discarded meanwhile: the destination goes too.
                (false, Some(d)) => mem.put(d),
                // Discarded meanwhile, and the copy was placed at the address
                // (before the kernel emptied it, in this model): the record
                // says `System` and the page reads as zeros.
                (false, None) => mem.system[i] = Some(0),
            }
        }
        audit(&t, &mem);
        drop(mem);
        drop(t);
        self.settled.notify_all();
    }

    /// A CPU write of `v` to page `i`: waits while a migration holds the
    /// page, fills a never-populated page, and faults a device page back
    /// first (a migration of the page alone, as the fault service's).
    fn write(&self, i: usize, v: u64) {
        loop {
            let mut t = self.table.lock().unwrap();
            while t.entries[i].is_migrating() {
                t = self.settled.wait(t).unwrap();
            }
            match t.entries[i].residency() {
                Residency::None | Residency::System => {
                    t.entries[i].populate().expect("a page no migration holds populates");
                    let mut mem = self.mem.lock().unwrap();
                    mem.system[i] = Some(v);
                    t.clock += 1;
                    t.written[i] = (t.clock, v);
                    audit(&t, &mem);
                    return;
                }
                Residency::Device(_) => {
                    drop(t);
                    self.migrate(&[i], false, &[]);
                }
                r => panic!("a CPU write met {r:?}"),
            }
        }
    }

    /// The application discarded page `i` (`MADV_DONTNEED`; hmm learns of
    /// it by a `REMOVE` event): the kernel empties the address, the record
    /// is invalidated, and a device page it held is freed.
    fn discard(&self, i: usize) {
        let mut t = self.table.lock().unwrap();
        let mut mem = self.mem.lock().unwrap();
        let e = &mut t.entries[i];
        if !e.is_migrating() {
            // (A migrating page's source is isolated: out of the kernel's reach.)
            mem.system[i] = None;
        }
        if let Some(p) = e.invalidate(false) {
            mem.put(p);
        }
        t.clock += 1;
        t.discarded[i] = t.clock;
        audit(&t, &mem);
    }

    /// What page `i` reads as.
    fn read(t: &Table, mem: &Memory, i: usize) -> u64 {
        match t.entries[i].residency() {
            Residency::None => 0,
            Residency::System => mem.system[i].expect("audited"),
            Residency::Device(p) => mem.read_device(p),
            r => panic!("page {i} is {r:?}"),
        }
    }
}

/// Checks that every page's data is where its record says, and only there.
fn audit(t: &Table, mem: &Memory) {
    let mut owner = [None; DEVICE_PAGES];
    for (i, e) in t.entries.iter().enumerate() {
        match e.residency() {
            Residency::None => {
                assert_eq!(mem.system[i], None, "page {i} is {e:?} but has a system page")
            }
            Residency::System => {
                assert!(mem.system[i].is_some(), "page {i} is {e:?} but has no system page")
            }
            Residency::Device(p) => {
                assert_eq!(mem.system[i], None, "page {i} is {e:?} but also in system memory");
                assert!(mem.device[p.index as usize].is_some(), "page {i} is {e:?}, a free page");
                if let Some(j) = owner[p.index as usize].replace(i) {
                    panic!("pages {j} and {i} both live on {p}");
                }
            }
            r => panic!("page {i} is {r:?}"),
        }
    }
}

/// **Migrations are invisible to the application.** Three pages (one in
/// system memory, one on the device, one never populated) under concurrent
/// threads, every transition made with the real [`PageEntry`] under the
/// table lock: a migration of all of them to the device (the copy of page 0
/// fails: it aborts) and then another; an eviction of all of them back to
/// system memory (the copy of page 1 fails); a CPU writer (writes wait while the page migrates; a
/// device page is faulted back first, a never-populated one filled); and
/// the application discarding pages (`REMOVE`: `invalidate(false)`, which a
/// migration in progress must honour at commit or abort).
///
/// Invariants: no thread attempts an illegal transition (each would return
/// `IllegalTransition`, and the test unwraps them); after every step, every
/// page's data is where its record says and only there, and no two pages
/// share a device page; at the end, every page reads what a sequential
/// execution of the writes and discards in the order they happened gives
/// (its last write's value, or zeros if a discard came after it), and every
/// allocated device page belongs to a page (nothing leaked).
#[test]
fn migrations_are_invisible_to_the_application() {
    let test = || {
        let r = Range::new();
        let all = [0, 1, 2];
        let threads = [
            thread::spawn({
                let r = r.clone();
                move || {
                    r.migrate(&all, true, &[0]);
                    r.migrate(&all, true, &[]);
                }
            }),
            thread::spawn({
                let r = r.clone();
                move || r.migrate(&all, false, &[1])
            }),
            thread::spawn({
                let r = r.clone();
                move || {
                    r.write(1, 101);
                    r.write(0, 100);
                    r.write(2, 102);
                }
            }),
            thread::spawn({
                let r = r.clone();
                move || {
                    r.discard(0);
                    r.discard(1);
                }
            }),
        ];
        for t in threads {
            t.join().unwrap();
        }
        let t = r.table.lock().unwrap();
        let mem = r.mem.lock().unwrap();
        audit(&t, &mem);
        for i in 0..PAGES {
            assert!(!t.entries[i].is_migrating(), "page {i} is still held");
            let (at, v) = t.written[i];
            let want = if t.discarded[i] > at { 0 } else { v };
            assert_eq!(Range::read(&t, &mem, i), want, "page {i} ({:?})", t.entries[i]);
        }
        let recorded = t.entries.iter().filter(|e| e.device_page().is_some()).count();
        let allocated = mem.device.iter().filter(|p| p.is_some()).count();
        assert_eq!(allocated, recorded, "device pages leaked");
    };
    check_random(10_000, test);
    check_pct(10_000, 3, test);
}
