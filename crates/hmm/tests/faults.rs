//! Fault injection: what the application sees when the device's DMA engine
//! fails a copy, hangs, or the whole device fails while pages are on their
//! way to or from it, and when system memory runs out during a fault-back.
//! In every case no page that did not live on a failed device is lost.

mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use hmm::os::process::{ChildOutcome, run_in_child};
use hmm::{DmaError, Hmm, ManagedRange, PAGE_SIZE, Residency, Selection, SkipReason};
use hmm_swdev::{SoftwareDevice, SoftwareDeviceConfig};

const SIGBUS: i32 = 7;

fn engines() -> [(&'static str, SoftwareDeviceConfig); 2] {
    [
        ("zero-copy", SoftwareDeviceConfig::new("dev", 4 << 20)),
        ("copy", SoftwareDeviceConfig::new("dev", 4 << 20).with_copy_engine(2)),
    ]
}

/// Every page of `r` is lost (poisoned): hmm's accessors refuse them, and a
/// raw CPU touch of page `touch` ends in SIGBUS (in a child).
fn assert_all_lost(r: &ManagedRange, touch: usize, engine: &str) {
    assert!(r.residencies().iter().all(|x| *x == Residency::Poisoned), "{engine}");
    assert_eq!(
        r.touch_read(touch * PAGE_SIZE),
        Err(hmm::RangeError::Poisoned(r.range())),
        "{engine}: the checked accessor refuses a lost page"
    );
    let out = run_in_child(common::CHILD_LIMIT, || {
        let _ = r.mapping().touch_read(touch * PAGE_SIZE);
        0
    })
    .unwrap();
    assert_eq!(out, ChildOutcome::Signaled(SIGBUS), "{engine}: a touch of page {touch}");
}

fn on_device(r: &ManagedRange) -> usize {
    r.residencies().iter().filter(|x| matches!(x, Residency::Device(_))).count()
}

/// A DMA error in the middle of a batch: the pages it hit stay in system
/// memory with their bytes (reported `CopyFailed`), the rest of the batch
/// moves, and a second try moves the pages left behind.
#[test]
fn a_dma_error_mid_batch_leaves_only_those_pages_behind() {
    if common::skip_without_uffd() {
        return;
    }
    let _fork = common::fork_lock();
    for (engine, config) in engines() {
        let hmm = Hmm::new().unwrap();
        let dev = SoftwareDevice::new(&hmm, config).unwrap();
        let r = hmm.alloc(64 * PAGE_SIZE).unwrap();
        common::fill_salted(&r, 7);
        dev.fail_copies_to_device(20, 5);
        let rep = dev.migrate_to_device(r.range()).unwrap();
        let failed: Vec<_> = rep
            .skipped
            .iter()
            .filter(|(_, why)| matches!(why, SkipReason::CopyFailed(DmaError::Failed(_))))
            .collect();
        assert_eq!((rep.migrated, failed.len()), (59, 5), "{engine}: {:?}", rep.skipped);
        for (addr, _) in failed {
            let i = (addr.get() - r.addr().get()) / PAGE_SIZE;
            assert_eq!(r.residency(i), Residency::System, "{engine}: page {i} stays behind");
        }
        assert_eq!(on_device(&r), 59, "{engine}");
        // The armed failures are spent: the pages left behind move now.
        let again = dev.migrate_to_device(r.range()).unwrap();
        assert_eq!(again.migrated, 5, "{engine}: {:?}", again.skipped);
        let (bytes, _) = dev.read(r.range()).unwrap();
        common::check_salted(&bytes, 0, 7, engine);
        common::check_salted(&common::cpu_bytes(&r), 0, 7, engine);
    }
}

/// A device that fails after the copies into it are done but before the
/// migration commits. With an engine that copies, the pages never left
/// system memory: none is lost, each reads its bytes. With an engine that
/// moves pages (the zero-copy one), their only copy is on the failed device:
/// they are lost as its other pages are (poisoned, a touch is SIGBUS). Either
/// way each is reported `DeviceFailed`.
#[test]
fn a_device_failing_before_the_commit_loses_only_what_reached_it() {
    if common::skip_without("poison") {
        return;
    }
    let _fork = common::fork_lock();
    for (engine, config) in engines() {
        let hmm = Hmm::new().unwrap();
        let dev = SoftwareDevice::new(&hmm, config).unwrap();
        let r = hmm.alloc(32 * PAGE_SIZE).unwrap();
        common::fill_salted(&r, 3);
        let mut m = hmm.migrate(r.range(), Selection::System).unwrap();
        m.allocate_on(dev.memory());
        m.copy(dev.memory().ops().dma());
        assert_eq!(m.statuses().iter().filter(|s| **s == hmm::PageStatus::Migrated).count(), 32);
        assert_eq!(dev.fail(), 0, "{engine}: nothing lived on the device yet");
        let rep = m.finalize();
        assert_eq!(rep.migrated, 0, "{engine}");
        assert_eq!(rep.count(&SkipReason::DeviceFailed), 32, "{engine}: {:?}", rep.skipped);
        assert_eq!(dev.stats().pages_resident, 0, "{engine}: every device page was freed");
        if dev.memory().ops().dma().keeps_sources() {
            assert!(r.residencies().iter().all(|x| *x == Residency::System), "{engine}");
            common::check_salted(&common::cpu_bytes(&r), 0, 3, engine);
        } else {
            assert_all_lost(&r, 31, engine);
        }
    }
}

/// A device that fails while its engine hangs with a migration's copies:
/// pages on their way to it stay in system memory; pages on their way back
/// from it are lost (poisoned as the migration ends: a touch is SIGBUS),
/// and pages of another range in system memory are untouched.
#[test]
fn a_device_failing_with_migrations_under_way() {
    if common::skip_without("poison") {
        return;
    }
    let _fork = common::fork_lock();
    for (engine, config) in engines() {
        let hmm = Hmm::new().unwrap();
        let dev = SoftwareDevice::new(&hmm, config).unwrap();
        let to = hmm.alloc(32 * PAGE_SIZE).unwrap();
        let back = hmm.alloc(32 * PAGE_SIZE).unwrap();
        common::fill_salted(&to, 1);
        common::fill_salted(&back, 100);
        assert_eq!(dev.migrate_to_device(back.range()).unwrap().migrated, 32);
        let stall = dev.stall_engine();
        let (rep_to, rep_back) = std::thread::scope(|s| {
            let t1 = s.spawn(|| dev.migrate_to_device(to.range()).unwrap());
            let t2 = s.spawn(|| dev.migrate_to_system(back.range()).unwrap());
            common::eventually("both migrations wait on the engine", || stall.held() >= 2);
            // Both ranges are held by their migrations: nothing to poison now.
            assert_eq!(dev.fail(), 0, "{engine}");
            drop(stall);
            (t1.join().unwrap(), t2.join().unwrap())
        });
        assert_eq!(rep_to.migrated, 0, "{engine}: {:?}", rep_to.skipped);
        assert!(to.residencies().iter().all(|x| *x == Residency::System), "{engine}");
        common::check_salted(&common::cpu_bytes(&to), 0, 1, engine);
        assert_eq!(rep_back.migrated, 0, "{engine}: {:?}", rep_back.skipped);
        assert_eq!(back.residence().poisoned, back.len() as u64, "{engine}");
        assert_all_lost(&back, 5, engine);
    }
}

/// A hung engine stalls the fault-back of its pages, and no more: the
/// touching thread waits (it is not given zeros, nor SIGBUS), pages in
/// system memory stay readable meanwhile, and once the engine runs again the
/// touch completes with the right bytes.
#[test]
fn a_stalled_engine_holds_a_fault_back_until_it_runs_again() {
    if common::skip_without_uffd() {
        return;
    }
    let _fork = common::fork_lock();
    for (engine, config) in engines() {
        let hmm = Hmm::new().unwrap();
        let dev = SoftwareDevice::new(&hmm, config).unwrap();
        let r = hmm.alloc(16 * PAGE_SIZE).unwrap();
        common::fill_salted(&r, 9);
        assert_eq!(dev.migrate_to_device(r.pages_range(0, 8).unwrap()).unwrap().migrated, 8);
        let stall = dev.stall_engine();
        std::thread::scope(|s| {
            let toucher = s.spawn(|| r.touch_read(3 * PAGE_SIZE).unwrap());
            common::eventually("the fault-back waits on the engine", || stall.held() >= 1);
            // Served by the kernel alone: not held up.
            assert_eq!(r.touch_read(12 * PAGE_SIZE).unwrap(), (12 + 9u64).to_ne_bytes()[0]);
            assert!(!toucher.is_finished(), "{engine}: a touch completed on a stalled engine");
            drop(stall);
            assert_eq!(toucher.join().unwrap(), (3 + 9u64).to_ne_bytes()[0], "{engine}");
        });
        common::check_salted(&common::cpu_bytes(&r), 0, 9, engine);
    }
}

/// The fault service stalled in the middle of a fault, after it read the
/// page's record: a first touch of a never-populated page, which the service
/// reads as empty. Meanwhile the page goes to the device (a migration that
/// began before the fault was read goes on while the service works; the
/// stall lets one go on in the same way) and the device writes it. When the
/// service goes on, it must not map the zero page at the address, which
/// would hide the device's bytes from the CPU for good: the touch reads
/// them, brought back by what the page's record says now.
#[test]
fn a_stalled_fault_service_acts_on_the_page_as_it_is_now() {
    if common::skip_without_uffd() {
        return;
    }
    let _fork = common::fork_lock();
    for (engine, config) in engines() {
        let hmm = Hmm::new().unwrap();
        let dev = SoftwareDevice::new(&hmm, config).unwrap();
        let r = hmm.alloc(8 * PAGE_SIZE).unwrap();
        let page = r.pages_range(2, 1).unwrap();
        let stall = hmm.stall_next_fault();
        std::thread::scope(|s| {
            let toucher = s.spawn(|| r.touch_read(2 * PAGE_SIZE).unwrap());
            let at = stall.wait_stalled(std::time::Duration::from_secs(5));
            assert_eq!(at, Some(page.start()), "{engine}: the service stops at the touch");
            assert_eq!(r.residency(2), Residency::None, "{engine}");
            assert_eq!(dev.migrate_to_device(page).unwrap().migrated, 1, "{engine}");
            dev.write(page.start(), &[0x5a; PAGE_SIZE]).unwrap();
            assert!(!toucher.is_finished(), "{engine}: the touch waits for the service");
            drop(stall);
            assert_eq!(
                toucher.join().unwrap(),
                0x5a,
                "{engine}: the touch reads the device's byte"
            );
        });
        let mut b = vec![0u8; PAGE_SIZE];
        r.read(2 * PAGE_SIZE, &mut b).unwrap();
        assert!(b.iter().all(|x| *x == 0x5a), "{engine}: the page keeps the device's bytes");
        assert_eq!(r.residency(2), Residency::System, "{engine}");
    }
}

/// A fault-back starved of system memory several times in a row waits out
/// its backoff (1 ms, doubling): the migration that fails wakes the
/// touching thread, whose new fault joins the retry pending instead of
/// trying again at once, so a starved service does not spin. The touch
/// then completes with the page's bytes, each failure counted once.
#[test]
fn a_starved_fault_back_waits_out_its_backoff() {
    if common::skip_without_uffd() {
        return;
    }
    let _fork = common::fork_lock();
    for (engine, config) in engines() {
        let hmm = Hmm::new().unwrap();
        let dev = SoftwareDevice::new(&hmm, config).unwrap();
        let r = hmm.alloc(8 * PAGE_SIZE).unwrap();
        common::fill_salted(&r, 17);
        assert_eq!(dev.migrate_to_device(r.pages_range(3, 1).unwrap()).unwrap().migrated, 1);
        let before = hmm.fault_stats().1;
        dev.fail_next_copies_to_system(6);
        let start = std::time::Instant::now();
        let got = r.touch_read(3 * PAGE_SIZE).unwrap();
        let waited = start.elapsed();
        assert_eq!(got, (3 + 17u64).to_ne_bytes()[0], "{engine}");
        assert_eq!(hmm.fault_stats().1 - before, 6, "{engine}: each failure retried once");
        // 1 + 2 + 4 + 8 + 16 ms between the six attempts, at the least.
        assert!(
            waited >= std::time::Duration::from_millis(31),
            "{engine}: the retries came {waited:?} apart in all"
        );
        common::check_salted(&common::cpu_bytes(&r), 0, 17, engine);
    }
}

/// A memory cgroup made for one test (cgroup v2 where its memory controller
/// is, else v1), removed when dropped.
struct MemCgroup {
    dir: std::path::PathBuf,
    v2: bool,
}

impl MemCgroup {
    fn create() -> Result<Self, String> {
        use std::path::Path;
        const PREFIX: &str = "hmm-test-";
        let name = format!("{PREFIX}{}", std::process::id());
        let unified = Path::new("/sys/fs/cgroup");
        let controllers = std::fs::read_to_string(unified.join("cgroup.controllers"));
        let (dir, v2) = if controllers.is_ok_and(|c| c.split_whitespace().any(|w| w == "memory")) {
            let _ = std::fs::write(unified.join("cgroup.subtree_control"), "+memory");
            (unified.join(name), true)
        } else if Path::new("/sys/fs/cgroup/memory/memory.limit_in_bytes").exists() {
            (Path::new("/sys/fs/cgroup/memory").join(name), false)
        } else {
            return Err("no memory cgroup controller is mounted".into());
        };
        // Those of test processes that were killed (a run past its bound
        // kills the test before its drop runs), empty now that they are gone.
        if let Ok(entries) = std::fs::read_dir(dir.parent().expect("under a hierarchy")) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let Some(pid) = name.strip_prefix(PREFIX) else { continue };
                if !Path::new("/proc").join(pid).exists() {
                    let _ = std::fs::remove_dir(e.path());
                }
            }
        }
        std::fs::create_dir(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let cg = MemCgroup { dir, v2 };
        if !cg.file(if v2 { "memory.max" } else { "memory.limit_in_bytes" }).exists() {
            return Err("the new cgroup has no memory limit file".into());
        }
        if v2 {
            // No swap to escape to (absent where the kernel has no swap accounting).
            let _ = std::fs::write(cg.file("memory.swap.max"), "0");
        }
        Ok(cg)
    }

    fn file(&self, name: &str) -> std::path::PathBuf {
        self.dir.join(name)
    }

    fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.file(name)).unwrap_or_default()
    }

    fn write(&self, name: &str, value: &str) {
        std::fs::write(self.file(name), value)
            .unwrap_or_else(|e| panic!("writing {value} to {}: {e}", self.file(name).display()));
    }

    fn add(&self, pid: i32) {
        self.write("cgroup.procs", &pid.to_string());
    }

    /// Sets the limit (`None`: none).
    fn limit(&self, bytes: Option<u64>) {
        match (self.v2, bytes) {
            (true, Some(b)) => self.write("memory.max", &b.to_string()),
            (true, None) => self.write("memory.max", "max"),
            (false, Some(b)) => self.write("memory.limit_in_bytes", &b.to_string()),
            (false, None) => self.write("memory.limit_in_bytes", "-1"),
        }
    }

    /// Bytes charged now.
    fn usage(&self) -> u64 {
        let f = if self.v2 { "memory.current" } else { "memory.usage_in_bytes" };
        self.read(f).trim().parse().unwrap_or(0)
    }

    /// How often a charge has hit the limit.
    fn failures(&self) -> u64 {
        if self.v2 {
            let events = self.read("memory.events");
            events
                .lines()
                .find_map(|l| l.strip_prefix("max "))
                .and_then(|n| n.trim().parse().ok())
                .unwrap_or(0)
        } else {
            self.read("memory.failcnt").trim().parse().unwrap_or(0)
        }
    }
}

impl Drop for MemCgroup {
    fn drop(&mut self) {
        // The child has exited; its charges go to the parent cgroup.
        for _ in 0..100 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        eprintln!("cannot remove the test cgroup {}", self.dir.display());
    }
}

/// System memory runs out while device pages come back: in a memory cgroup
/// whose limit leaves room for a few pages only, a CPU touch of pages on the
/// device is neither given zeros nor SIGBUS. The fault service retries the
/// fault-back (counted in `fault_stats`) and the touching thread waits until
/// memory can be had; then every page reads its bytes.
///
/// The cgroup has the OOM killer off (cgroup v1's `oom_kill_disable`; under
/// v2 the process runs with `oom_score_adj` -1000), so that the kernel
/// refuses the charge of an installed page (`ENOMEM`) rather than kill a
/// task: where the OOM killer may act, it does what it does for any process
/// out of memory. But a page fault of the limited process's own memory (a
/// stack growing, a heap page touched for the first time) then waits in the
/// kernel until memory is freed or the limit lifted, and only the parent
/// lifts it. So the child is sound by construction: everything it needs
/// under the limit exists, and has been touched, before the limit is set.
/// - Its threads: the reader (the child's main thread) and the watcher that
///   tells the parent the fault-back starved. The watcher is spawned, and
///   runs its loop once, before the limit; a thread spawned under the limit
///   allocates its stack and bookkeeping there, and waits for ever.
/// - The fault service's stack and heap and the copy engine's: one round trip
///   of every page before the limit grows them to what this work needs.
/// - The buffers and pipes: made, and the pipes written once, before.
///
/// The parent waits for every message with a deadline and lifts the limit
/// before it judges anything, so a child stuck at the limit fails the test
/// with what it did not say, and is killed, instead of hanging it.
#[test]
fn system_memory_running_out_during_a_fault_back_waits_for_memory() {
    if common::skip_without_uffd() {
        return;
    }
    if !hmm::os::process::is_root() {
        eprintln!("SKIP: memory cgroups need root");
        return;
    }
    let cg = match MemCgroup::create() {
        Ok(cg) => cg,
        Err(why) => {
            eprintln!("SKIP: {why}");
            return;
        }
    };
    let _fork = common::fork_lock();
    const PAGES: usize = 512;
    /// How long the watcher waits for a fault-back to starve.
    const STARVE_WITHIN: Duration = Duration::from_secs(20);
    // Charges over the limit fail rather than call the OOM killer: cgroup v1
    // says so per cgroup; v2 cannot, and the child asks for it for itself.
    let v2 = cg.v2;
    if !v2 {
        cg.write("memory.oom_control", "1");
    }
    // The child says when it is set up ('r'), then, limited, when its
    // fault-back starves ('s', or 'n' if it never does): the limit is lifted
    // then. The parent says "go" once to each of the child's two threads.
    let (from_child, to_parent) = std::io::pipe().unwrap();
    let (go_r, mut go_w) = std::io::pipe().unwrap();
    let child = hmm::os::process::spawn_child(move || {
        use std::io::{Read, Write};
        let setup = || -> Result<_, hmm::HmmError> {
            // The service's retries are what this test watches.
            let hmm = Hmm::with_config(hmm::HmmConfig {
                fault_mode: hmm::FaultMode::Service,
                ..hmm::HmmConfig::default()
            })?;
            let mut config = SoftwareDeviceConfig::new("dev", 4 << 20).with_copy_engine(1);
            config.prefault = true;
            let dev = SoftwareDevice::new(&hmm, config)?;
            let r = hmm.alloc(PAGES * PAGE_SIZE)?;
            common::fill_salted(&r, 5);
            // One round trip first, so that the fault service's own memory
            // (its stack, its heap) is already as large as this work needs.
            dev.migrate_to_device(r.range())?;
            let mut all = vec![0u8; r.len()];
            r.read(0, &mut all)?;
            common::check_salted(&all, 0, 5, "warm-up");
            let moved = dev.migrate_to_device(r.range())?.migrated;
            Ok((hmm, dev, r, moved))
        };
        let Ok((hmm, _dev, r, PAGES)) = setup() else { return 3 };
        if v2 && std::fs::write("/proc/self/oom_score_adj", "-1000").is_err() {
            return 4;
        }
        let mut page = vec![0u8; PAGE_SIZE];
        let watch = |wait_for_go: bool| -> u8 {
            let mut byte = [0u8];
            if wait_for_go && (&go_r).read_exact(&mut byte).is_err() {
                return b'x';
            }
            let deadline = Instant::now() + STARVE_WITHIN;
            while hmm.fault_stats().1 == 0 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(1));
                if !wait_for_go {
                    break;
                }
            }
            if hmm.fault_stats().1 > 0 { b's' } else { b'n' }
        };
        std::thread::scope(|s| {
            let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel::<()>(1);
            let to_parent = &to_parent;
            s.spawn(move || {
                // Its loop once, unlimited: the stack it needs is touched now.
                let _ = watch(false);
                let _ = ready_tx.send(());
                let said = watch(true);
                let _ = { to_parent }.write_all(&[said]);
            });
            let mut byte = [0u8];
            if ready_rx.recv_timeout(Duration::from_secs(30)).is_err()
                || { to_parent }.write_all(b"r").is_err()
                || (&go_r).read_exact(&mut byte).is_err()
            {
                return 5;
            }
            // Limited from here on: nothing below allocates.
            for i in 0..PAGES {
                if r.read(i * PAGE_SIZE, &mut page).is_err() {
                    return 6;
                }
                let want = (i as u64 + 5).to_ne_bytes();
                if !page.chunks(8).all(|w| w == want) {
                    return 1;
                }
            }
            0
        })
    })
    .unwrap();
    // The child's ends went with the closure.
    let said = common::PipeBytes::new(from_child);
    match said.next_within(Duration::from_secs(60)) {
        Ok(b'r') => {}
        Err(common::PipeEnd::Closed) => match child.wait_within(Duration::from_secs(10)) {
            Ok(ChildOutcome::Exited(4)) => {
                eprintln!("SKIP: cgroup v2 needs oom_score_adj -1000 (CAP_SYS_RESOURCE)");
                return;
            }
            out => panic!("the child ended before its set-up was done: {out:?}"),
        },
        other => panic!("the child did not say it was set up within 60 s: {other:?}"),
    }
    cg.add(child.pid());
    // Room for a quarter of the pages beyond what is charged now.
    cg.limit(Some(cg.usage() + (PAGES / 4 * PAGE_SIZE) as u64));
    go_w.write_all(b"gg").unwrap();
    let starved = said.next_within(STARVE_WITHIN + Duration::from_secs(30));
    let hit = cg.failures();
    // Lifted before anything is judged: a child waiting at the limit goes on.
    cg.limit(None);
    let out = child.wait_within(Duration::from_secs(60)).unwrap();
    assert_eq!(out, ChildOutcome::Exited(0), "1: wrong bytes, 3-6: set-up failed");
    assert!(hit > 0, "the limit was never reached");
    assert_eq!(
        starved,
        Ok(b's'),
        "no fault-back starved and was retried within {STARVE_WITHIN:?} ('n'), or the \
         watcher said nothing (did a thread of the child wait on a page fault of its own?)"
    );
}

/// A fork whose copy of device pages into the child finds no memory for a
/// few of them at first: those copies are tried again, and the child reads
/// every page right, none lost.
#[test]
fn a_fork_copy_short_of_memory_is_retried() {
    if common::skip_without_uffd() {
        return;
    }
    let _fork = common::fork_lock();
    for (engine, config) in engines() {
        let hmm = Hmm::new().unwrap();
        let dev = SoftwareDevice::new(&hmm, config).unwrap();
        let r = hmm.alloc(32 * PAGE_SIZE).unwrap();
        common::fill_salted(&r, 11);
        assert_eq!(dev.migrate_to_device(r.range()).unwrap().migrated, 32, "{engine}");
        dev.fail_next_copies_to_system(3);
        let out = run_in_child(common::CHILD_LIMIT, || {
            let mut b = vec![0u8; r.len()];
            if r.read(0, &mut b).is_err() {
                return 2;
            }
            let salted = std::panic::catch_unwind(|| common::check_salted(&b, 0, 11, "child"));
            if salted.is_ok() { 0 } else { 1 }
        })
        .unwrap();
        dev.fail_next_copies_to_system(0);
        assert_eq!(out, ChildOutcome::Exited(0), "{engine}: 1: wrong bytes, 2: read failed");
        assert_eq!(on_device(&r), 32, "{engine}: the parent's pages stay on the device");
        common::check_salted(&common::cpu_bytes(&r), 0, 11, engine);
    }
}

/// A device that fails and is dropped while a migration still holds some of
/// its pages: a device registered after it must not inherit those pages
/// under a reused id. When the migration ends, the pages it could not copy
/// off are lost with the failed device (poisoned), and the new device holds
/// nothing of them.
#[test]
fn a_failed_device_dropped_mid_migration_leaves_nothing_to_its_successor() {
    if common::skip_without("poison") {
        return;
    }
    let _fork = common::fork_lock();
    for (engine, config) in engines() {
        let hmm = Hmm::new().unwrap();
        let old = SoftwareDevice::new(&hmm, config.clone()).unwrap();
        let r = hmm.alloc(16 * PAGE_SIZE).unwrap();
        common::fill_salted(&r, 5);
        assert_eq!(old.migrate_to_device(r.range()).unwrap().migrated, 16, "{engine}");
        let (old_id, ops) = (old.memory().id(), old.memory().ops().clone());
        // A migration back holds the first 8 pages as the device fails and goes.
        let mut m = hmm.migrate(r.pages_range(0, 8).unwrap(), Selection::Device(old_id)).unwrap();
        assert_eq!(old.fail(), 8, "{engine}: the pages no migration held");
        drop(old);
        let new = SoftwareDevice::new(&hmm, config).unwrap();
        assert_ne!(new.memory().id(), old_id, "{engine}: the failed device's id is still in use");
        m.copy(ops.dma());
        let rep = m.finalize();
        assert_eq!(rep.migrated, 0, "{engine}: {:?}", rep.skipped);
        assert_all_lost(&r, 3, engine);
        assert_eq!(new.stats().pages_resident, 0, "{engine}: the new device holds nothing");
        let id = new.memory().id();
        assert!(
            !r.residencies().iter().any(|x| matches!(x, Residency::Device(p) if p.dev == id)),
            "{engine}: no page is recorded on the new device"
        );
    }
}
