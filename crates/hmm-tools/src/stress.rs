//! Model-based random testing: random operations applied both to hmm and to
//! a reference model (a plain byte array per range), with the observable
//! state compared after every step.
//!
//! Each worker thread owns one managed range and its model; the devices are
//! shared by every worker and evict under pressure, so one worker's
//! migrations move other workers' pages while they run. What is compared:
//! - every byte the CPU or a device reads, against the model;
//! - after every step, the range's accounting sums to its size, and a page
//!   the operation just pinned did not move;
//! - at the end (threads joined), every byte of every range, and each
//!   device's charge against the pages the ranges record on it.
//!
//! Operations are generated from the seed before they run ([`plan`]), so a
//! failing run replays exactly with the same seed (one thread: exactly; more
//! threads: the same operations, in an interleaving the scheduler picks).
//! A divergence is shrunk ([`shrink`]) by running ever shorter prefixes and
//! subsets of the failing worker's operations alone, keeping any that
//! still diverges.

use std::fmt;
use std::io::Write;
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hmm::addr::{PAGE_SIZE, PageRange, RangeError, VirtAddr};
use hmm::migrate::SkipReason;
use hmm::os::mm::{Advise, Protection};
use hmm::os::process::{ChildOutcome, run_in_child};
use hmm::page::Residency;
use hmm::space::{Hmm, HmmError, ManagedRange};
use hmm_swdev::{SoftwareDevice, SoftwareDeviceConfig};

/// What a stress run does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StressConfig {
    /// Seed of every random choice.
    pub seed: u64,
    /// Operations in all (split among the threads).
    pub ops: u64,
    /// Worker threads, each with its own range.
    pub threads: usize,
    /// Pages of each worker's range.
    pub pages: usize,
    /// Whether a worker that runs alone also fails devices ([`Op::Fail`]).
    pub device_failures: bool,
}

impl Default for StressConfig {
    fn default() -> Self {
        Self { seed: 1, ops: 10_000, threads: 1, pages: 256, device_failures: true }
    }
}

/// One operation of a worker on its range. Byte offsets (`at`, `len`) and
/// page numbers (`first`, `count`) are relative to the range; `dev` indexes
/// the run's devices; `fill` seeds the bytes written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// The CPU writes bytes.
    CpuWrite {
        /// First byte.
        at: usize,
        /// Bytes.
        len: usize,
        /// Seed of the bytes.
        fill: u64,
    },
    /// The CPU reads bytes.
    CpuRead {
        /// First byte.
        at: usize,
        /// Bytes.
        len: usize,
    },
    /// A device writes through its page table.
    DevWrite {
        /// The device.
        dev: usize,
        /// First byte.
        at: usize,
        /// Bytes.
        len: usize,
        /// Seed of the bytes.
        fill: u64,
    },
    /// A device reads through its page table.
    DevRead {
        /// The device.
        dev: usize,
        /// First byte.
        at: usize,
        /// Bytes.
        len: usize,
    },
    /// Pages to a device.
    ToDevice {
        /// The device.
        dev: usize,
        /// First page.
        first: usize,
        /// Pages.
        count: usize,
    },
    /// Pages to a device from the other device.
    FromPeer {
        /// The destination device.
        dev: usize,
        /// First page.
        first: usize,
        /// Pages.
        count: usize,
    },
    /// Pages of a device back to system memory.
    ToSystem {
        /// The device.
        dev: usize,
        /// First page.
        first: usize,
        /// Pages.
        count: usize,
    },
    /// A device takes exclusive access; a CPU read then revokes it.
    Exclusive {
        /// The device.
        dev: usize,
        /// First page.
        first: usize,
        /// Pages.
        count: usize,
    },
    /// `MADV_DONTNEED`: the pages read as zeros afterwards.
    Discard {
        /// First page.
        first: usize,
        /// Pages.
        count: usize,
    },
    /// Read-only (a device reads the first page), then writable again.
    Protect {
        /// First page.
        first: usize,
        /// Pages.
        count: usize,
    },
    /// Pin the pages, try to migrate them (nothing pinned may move), unpin.
    Pin {
        /// The device the migration tries.
        dev: usize,
        /// First page.
        first: usize,
        /// Pages.
        count: usize,
    },
    /// The application's own `munmap` of part of the range: the pages are
    /// gone for good, and every later access to them must be refused.
    Unmap {
        /// First page.
        first: usize,
        /// Pages.
        count: usize,
    },
    /// The application's own `mremap` of part of the range to a new address,
    /// where the bytes must all be; the old part is then unmapped, or (with
    /// `keep`, `MREMAP_DONTUNMAP`) mapped and empty.
    Remap {
        /// First page.
        first: usize,
        /// Pages.
        count: usize,
        /// `MREMAP_DONTUNMAP`.
        keep: bool,
    },
    /// `fork()`: the child reads the fork-time bytes of every page, runs its
    /// own random writes and reads them back, and reports by its exit status;
    /// the parent's bytes stay its own.
    Fork {
        /// Seed of the child's writes.
        fill: u64,
    },
    /// Pages to a device whose engine fails `fail` copies after letting
    /// `after` through (fault injection): the pages it failed stay in system
    /// memory, reported as a failed copy, and no byte changes. Planned only
    /// for one worker, since another's migration could meet the failures.
    DmaError {
        /// The device.
        dev: usize,
        /// First page.
        first: usize,
        /// Pages.
        count: usize,
        /// Copies that succeed first.
        after: u32,
        /// Copies that fail then.
        fail: u32,
    },
    /// The CPU reads bytes while the devices' copies back to system memory
    /// fail for lack of memory `fail` times (fault injection): the fault
    /// service retries, and the read gets the right bytes. Planned only for
    /// one worker, as `DmaError` is.
    Starved {
        /// First byte.
        at: usize,
        /// Bytes.
        len: usize,
        /// Copies back that fail.
        fail: u32,
    },
    /// The device fails: the pages that lived on it are lost (a CPU touch
    /// gets `SIGBUS`, checked in a child), every other page keeps its bytes,
    /// and a new device takes its place. Planned only for one worker, since
    /// what another worker had on the device at that moment is not known.
    Fail {
        /// The device.
        dev: usize,
    },
}

impl Op {
    /// A short name, for counts.
    pub fn kind(&self) -> &'static str {
        KINDS[kind_index(self)]
    }

    /// The same operation made to fit a range of `pages` pages (at least
    /// one) and the run's devices: positions wrap into the range, lengths
    /// and counts are cut at its end and kept at least one.
    pub fn clamped(&self, pages: usize) -> Op {
        let pages = pages.max(1);
        let len = pages * PAGE_SIZE;
        let dev = |d: usize| d % DEVICES;
        let page = |first: usize, count: usize| {
            let first = first % pages;
            (first, count.clamp(1, pages - first))
        };
        let bytes = |at: usize, n: usize| {
            let at = at % len;
            (at, n.clamp(1, len - at))
        };
        match *self {
            Op::CpuWrite { at, len, fill } => {
                let (at, len) = bytes(at, len);
                Op::CpuWrite { at, len, fill }
            }
            Op::CpuRead { at, len } => {
                let (at, len) = bytes(at, len);
                Op::CpuRead { at, len }
            }
            Op::Starved { at, len, fail } => {
                let (at, len) = bytes(at, len);
                Op::Starved { at, len, fail }
            }
            Op::DevWrite { dev: d, at, len, fill } => {
                let (at, len) = bytes(at, len);
                Op::DevWrite { dev: dev(d), at, len, fill }
            }
            Op::DevRead { dev: d, at, len } => {
                let (at, len) = bytes(at, len);
                Op::DevRead { dev: dev(d), at, len }
            }
            Op::ToDevice { dev: d, first, count } => {
                let (first, count) = page(first, count);
                Op::ToDevice { dev: dev(d), first, count }
            }
            Op::FromPeer { dev: d, first, count } => {
                let (first, count) = page(first, count);
                Op::FromPeer { dev: dev(d), first, count }
            }
            Op::ToSystem { dev: d, first, count } => {
                let (first, count) = page(first, count);
                Op::ToSystem { dev: dev(d), first, count }
            }
            Op::Exclusive { dev: d, first, count } => {
                let (first, count) = page(first, count);
                Op::Exclusive { dev: dev(d), first, count }
            }
            Op::Pin { dev: d, first, count } => {
                let (first, count) = page(first, count);
                Op::Pin { dev: dev(d), first, count }
            }
            Op::DmaError { dev: d, first, count, after, fail } => {
                let (first, count) = page(first, count);
                Op::DmaError { dev: dev(d), first, count, after, fail }
            }
            Op::Discard { first, count } => {
                let (first, count) = page(first, count);
                Op::Discard { first, count }
            }
            Op::Protect { first, count } => {
                let (first, count) = page(first, count);
                Op::Protect { first, count }
            }
            Op::Unmap { first, count } => {
                let (first, count) = page(first, count.min(4));
                Op::Unmap { first, count }
            }
            Op::Remap { first, count, keep } => {
                let (first, count) = page(first, count.min(4));
                Op::Remap { first, count, keep }
            }
            Op::Fork { fill } => Op::Fork { fill },
            Op::Fail { dev: d } => Op::Fail { dev: dev(d) },
        }
    }
}

/// A difference between hmm and the model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Divergence {
    /// The worker.
    pub thread: usize,
    /// Index of the operation in the worker's plan.
    pub step: usize,
    /// The operation.
    pub op: Op,
    /// What differed.
    pub what: String,
}

impl fmt::Display for Divergence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "thread {} step {}: {:?}: {}", self.thread, self.step, self.op, self.what)
    }
}

/// What a run found.
#[derive(Debug, Clone, Default)]
pub struct StressReport {
    /// Operations run.
    pub ops: u64,
    /// Divergences found (each worker stops at its first).
    pub divergences: Vec<Divergence>,
    /// The shortest failing sequence found for the first divergence, if any.
    pub shrunk: Option<Vec<Op>>,
    /// Operations run of each kind.
    pub by_kind: std::collections::BTreeMap<&'static str, u64>,
    /// Operations planned but skipped: unmaps past the budget (a quarter of
    /// each range), and what this kernel cannot do.
    pub skipped: u64,
    /// What the run left out or checked another way on this machine, and
    /// why (a kernel feature or a privilege it lacks): a run judges only
    /// what hmm promises where it runs.
    pub left_out: Vec<String>,
}

/// Number of devices a run shares among its workers.
pub const DEVICES: usize = 2;

/// A small xorshift generator: the same seed, the same operations.
#[derive(Debug, Clone)]
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Self(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    pub(crate) fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// The operations of worker `thread`: `n` of them over `pages` pages. A
/// worker that runs `alone` also injects engine faults ([`Op::DmaError`],
/// [`Op::Starved`]), and fails devices ([`Op::Fail`]) when `device_failures`.
pub fn plan(
    seed: u64,
    thread: usize,
    n: usize,
    pages: usize,
    alone: bool,
    device_failures: bool,
) -> Vec<Op> {
    let mut rng = Rng::new(seed ^ (thread as u64).wrapping_mul(0xD1B5_4A32_D192_ED03));
    let len = pages * PAGE_SIZE;
    // Weights out of about 100: mostly accesses and migrations; the
    // operations that take pages away for good (unmap, a moving remap),
    // fork, and the injected faults are rare.
    let total = 99 + if alone { 4 } else { 0 } + usize::from(alone && device_failures);
    (0..n)
        .map(|_| {
            let dev = rng.below(DEVICES);
            let first = rng.below(pages);
            let count = 1 + rng.below(32.min(pages - first));
            let few = 1 + rng.below(4.min(pages - first));
            let at = rng.below(len);
            let bytes = 1 + rng.below(512.min(len - at));
            match rng.below(total) {
                0..=17 => Op::CpuWrite { at, len: bytes, fill: rng.next() },
                18..=31 => Op::CpuRead { at, len: bytes },
                32..=40 => Op::DevWrite { dev, at, len: bytes, fill: rng.next() },
                41..=49 => Op::DevRead { dev, at, len: bytes },
                50..=59 => Op::ToDevice { dev, first, count },
                60..=64 => Op::FromPeer { dev, first, count },
                65..=73 => Op::ToSystem { dev, first, count },
                74..=78 => Op::Exclusive { dev, first, count },
                79..=83 => Op::Discard { first, count },
                84..=87 => Op::Protect { first, count },
                88..=92 => Op::Pin { dev, first, count },
                93..=94 => Op::Unmap { first, count: few },
                95..=97 => Op::Remap { first, count: few, keep: rng.below(2) == 0 },
                98 => Op::Fork { fill: rng.next() },
                99..=100 => Op::DmaError {
                    dev,
                    first,
                    count,
                    after: rng.below(count) as u32,
                    fail: 1 + rng.below(4) as u32,
                },
                101..=102 => Op::Starved { at, len: bytes, fail: 1 + rng.below(3) as u32 },
                _ => Op::Fail { dev },
            }
        })
        .collect()
}

fn bytes_of(fill: u64, len: usize) -> Vec<u8> {
    let mut r = Rng::new(fill);
    (0..len).map(|_| r.next() as u8).collect()
}

/// Device `index` of a run: the first moves pages (the zero-copy engine),
/// the second copies them (two worker threads), so that both engines meet
/// every operation and each other in device-to-device copies.
fn device(
    hmm: &Hmm,
    index: usize,
    name: String,
    threads: usize,
    pages: usize,
) -> Result<SoftwareDevice, HmmError> {
    // Each device holds about half of all the pages: migrations evict.
    let cap = (threads * pages / 2).max(64) * PAGE_SIZE;
    let config = SoftwareDeviceConfig::new(name, cap).evicting();
    let config = if index % 2 == 1 { config.with_copy_engine(2) } else { config };
    SoftwareDevice::new(hmm, config)
}

/// The devices of a run. A failed device is replaced by a new one (with the
/// write lock, taken only by a worker that runs alone).
type Devices = RwLock<Vec<SoftwareDevice>>;

fn devices(hmm: &Hmm, threads: usize, pages: usize) -> Result<Devices, HmmError> {
    let devs = (0..DEVICES).map(|d| device(hmm, d, format!("stress{d}"), threads, pages));
    Ok(RwLock::new(devs.collect::<Result<_, _>>()?))
}

/// What the model knows of each page, beside its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Page {
    /// Mapped: reads give the model's bytes.
    Mapped,
    /// Unmapped by the application: the addresses are no longer the
    /// range's. Accesses through the handle and migrations are refused; no
    /// device access is made there at all, since it would reach whatever the
    /// kernel has put at those addresses since (this process's own memory,
    /// perhaps), as a device access of any other unmanaged memory does.
    Unmapped,
    /// Lost with a failed device: a CPU touch gets `SIGBUS`, a device access
    /// is refused, a discard makes it an empty mapped page again.
    Lost,
}

/// At most this share of a range may be unmapped (by [`Op::Unmap`] and moving
/// [`Op::Remap`]); past it those operations are skipped, so that the rest of
/// a long run still has pages to work on.
const UNMAP_BUDGET_DIV: usize = 4;

/// The signal that ends a child touching a lost page.
const SIGBUS: i32 = 7;

/// How long a checking child may run before it is killed and the check
/// fails: it reads one range, which takes milliseconds.
const CHILD_LIMIT: Duration = Duration::from_secs(60);

/// What a run may use of the kernel.
#[derive(Debug, Clone, Copy)]
struct Support {
    remap: bool,
    fork: bool,
    poison: bool,
}

impl Support {
    fn probe() -> Self {
        let p = hmm::probe::probe();
        Self {
            remap: p.has("event-remap") && p.has("mremap-dontunmap"),
            fork: p.has("event-fork"),
            poison: p.has("poison"),
        }
    }

    /// What a run leaves out, or checks another way, without each feature.
    fn left_out(self) -> Vec<String> {
        let mut out = Vec::new();
        if !self.remap {
            out.push(
                "mremap operations: this kernel lacks the REMAP event or MREMAP_DONTUNMAP".into(),
            );
        }
        if !self.fork {
            out.push(
                "fork operations, and the check of every page after a device failure is made \
                 in this process instead of a forked child: without the FORK event (it needs \
                 CAP_SYS_PTRACE) a child reads zeros where its parent's pages live on a device"
                    .into(),
            );
        }
        if !self.poison {
            out.push("device failures: this kernel lacks UFFDIO_POISON".into());
        }
        out
    }
}

/// One worker: its range, and the model of it.
struct Worker<'a> {
    hmm: &'a Hmm,
    r: &'a ManagedRange,
    devs: &'a Devices,
    threads: usize,
    support: Support,
    model: Vec<u8>,
    pages: Vec<Page>,
    /// Operations skipped (over the unmap budget, or unsupported here).
    skipped: u64,
}

impl<'a> Worker<'a> {
    fn new(
        hmm: &'a Hmm,
        r: &'a ManagedRange,
        devs: &'a Devices,
        threads: usize,
        support: Support,
    ) -> Self {
        let (model, pages) = (vec![0u8; r.len()], vec![Page::Mapped; r.pages()]);
        Self { hmm, r, devs, threads, support, model, pages, skipped: 0 }
    }

    fn pr(&self, first: usize, count: usize) -> PageRange {
        self.r.pages_range(first, count).expect("inside the range")
    }

    fn addr(&self, at: usize) -> VirtAddr {
        VirtAddr::new(self.r.addr().get() + at)
    }

    /// Whether any page of `first..first + count` is in state `p`.
    fn any(&self, first: usize, count: usize, p: Page) -> bool {
        self.pages[first..first + count].contains(&p)
    }

    /// Whether every page of `first..first + count` is mapped (none
    /// unmapped or lost).
    fn all_mapped(&self, first: usize, count: usize) -> bool {
        self.pages[first..first + count].iter().all(|p| *p == Page::Mapped)
    }

    /// The pages that bytes `at..at + len` touch.
    fn span(at: usize, len: usize) -> (usize, usize) {
        let first = at / PAGE_SIZE;
        (first, (at + len - 1) / PAGE_SIZE - first + 1)
    }

    /// Applies `op` (one [`skips`](Self::skips) does not skip).
    fn step(&mut self, op: &Op) -> Result<(), String> {
        let err = |e: &dyn fmt::Display| format!("failed: {e}");
        let must_fail = |what: &str| format!("succeeded, but {what}");
        // Which page that is, and what hmm records of it.
        let not_mapped = |first: usize, count: usize| {
            let p =
                (first..first + count).find(|p| self.pages[*p] != Page::Mapped).unwrap_or(first);
            must_fail(&format!(
                "page {p} is {:?} (recorded {:?})",
                self.pages[p],
                self.r.residency(p)
            ))
        };
        let devs = self.devs.read().unwrap_or_else(|e| e.into_inner());
        match *op {
            Op::CpuWrite { at, len, fill } => {
                let (first, count) = Self::span(at, len);
                let b = bytes_of(fill, len);
                if self.any(first, count, Page::Unmapped) {
                    self.r.write(at, &b).err().ok_or_else(|| must_fail("a page is unmapped"))?;
                } else if self.any(first, count, Page::Lost) {
                    self.expect_lost(self.r.write(at, &b), at, len)?;
                } else {
                    self.r.write(at, &b).map_err(|e| err(&e))?;
                    self.model[at..at + len].copy_from_slice(&b);
                }
            }
            Op::CpuRead { at, len } => self.cpu_read(at, len)?,
            Op::Starved { at, len, fail } => {
                devs.iter().for_each(|d| d.fail_next_copies_to_system(fail));
                let res = self.cpu_read(at, len);
                devs.iter().for_each(|d| d.fail_next_copies_to_system(0));
                res?;
            }
            Op::DmaError { dev, first, count, after, fail } => {
                devs[dev].fail_copies_to_device(after, fail);
                let res = devs[dev].migrate_to_device(self.pr(first, count));
                devs[dev].fail_copies_to_device(0, 0);
                if self.any(first, count, Page::Unmapped) {
                    res.err().ok_or_else(|| must_fail("a page is unmapped"))?;
                } else {
                    let rep = res.map_err(|e| err(&e))?;
                    let failed: Vec<usize> = rep
                        .skipped
                        .iter()
                        .filter(|(_, why)| matches!(why, SkipReason::CopyFailed(_)))
                        .map(|(a, _)| (a.get() - self.r.addr().get()) / PAGE_SIZE)
                        .collect();
                    if failed.len() > fail as usize {
                        return Err(format!("{} copies failed, {fail} were armed", failed.len()));
                    }
                    for i in failed {
                        let now = self.r.residency(i);
                        if !matches!(now, Residency::System | Residency::None) {
                            return Err(format!("page {i}'s copy failed, yet it is {now:?}"));
                        }
                    }
                }
            }
            Op::DevWrite { dev, at, len, fill } => {
                let (first, count) = Self::span(at, len);
                if self.any(first, count, Page::Unmapped) {
                    // Not the range's memory any more: see `Page::Unmapped`.
                    return Ok(());
                }
                let b = bytes_of(fill, len);
                let res = retry_busy(|| devs[dev].write(self.addr(at), &b));
                if !self.all_mapped(first, count) {
                    res.err().ok_or_else(|| not_mapped(first, count))?;
                } else if self.threads > 1 && stayed_busy(&res) {
                    // Refused, nothing written: see `stayed_busy`.
                } else {
                    res.map_err(|e| err(&e))?;
                    self.model[at..at + len].copy_from_slice(&b);
                }
            }
            Op::DevRead { dev, at, len } => {
                let (first, count) = Self::span(at, len);
                if self.any(first, count, Page::Unmapped) {
                    // Not the range's memory any more: see `Page::Unmapped`.
                    return Ok(());
                }
                let res = retry_busy(|| devs[dev].read(self.pr(first, count)));
                if !self.all_mapped(first, count) {
                    res.err().ok_or_else(|| not_mapped(first, count))?;
                } else if self.threads > 1 && stayed_busy(&res) {
                    // Refused: see `stayed_busy`.
                } else {
                    let (b, _) = res.map_err(|e| err(&e))?;
                    let off = at - first * PAGE_SIZE;
                    compare(&b[off..off + len], &self.model[at..at + len], at, "device")?;
                }
            }
            Op::ToDevice { dev, first, count }
            | Op::FromPeer { dev, first, count }
            | Op::ToSystem { dev, first, count } => {
                let range = self.pr(first, count);
                let res = match op {
                    Op::ToDevice { .. } => devs[dev].migrate_to_device(range),
                    Op::FromPeer { .. } => {
                        devs[dev].migrate_from(range, &devs[(dev + 1) % DEVICES])
                    }
                    _ => devs[dev].migrate_to_system(range),
                };
                // Lost pages are skipped; a hole makes the whole range invalid.
                if self.any(first, count, Page::Unmapped) {
                    res.err().ok_or_else(|| must_fail("a page is unmapped"))?;
                } else {
                    res.map_err(|e| err(&e))?;
                }
            }
            Op::Exclusive { dev, first, count } => {
                // A busy refusal is what the kernel's make_device_exclusive may
                // answer too (EBUSY): pages the fault service is still
                // bringing back around an earlier touch. Retried, as a caller
                // would, after a moment.
                let exclusive = || retry_busy(|| devs[dev].make_exclusive(self.pr(first, count)));
                let mut res = exclusive();
                for _ in 0..5 {
                    match res {
                        Err(HmmError::NotMoved { reason: SkipReason::Busy, .. }) => {
                            std::thread::sleep(Duration::from_millis(2));
                            res = exclusive();
                        }
                        _ => break,
                    }
                }
                let refused = match &res {
                    Err(HmmError::NotMoved { reason, .. }) => {
                        matches!(reason, SkipReason::Busy | SkipReason::NoDeviceMemory)
                    }
                    Err(HmmError::Fault(hmm::RangeFaultError::Busy { .. })) => true,
                    _ => false,
                };
                if !self.all_mapped(first, count) {
                    res.err().ok_or_else(|| not_mapped(first, count))?;
                } else if self.threads > 1 && refused {
                    // Another worker's migration held one of the pages (its
                    // eviction, on a loaded machine, for longer than a device
                    // fault waits), or evicted it to make room: refused, as
                    // the kernel's make_device_exclusive may be (EBUSY).
                    // Nothing changed.
                } else {
                    res.map_err(|e| err(&e))?;
                    // A CPU read revokes it and sees the bytes.
                    let at = first * PAGE_SIZE;
                    let mut b = vec![0u8; PAGE_SIZE];
                    self.r.read(at, &mut b).map_err(|e| err(&e))?;
                    compare(&b, &self.model[at..at + PAGE_SIZE], at, "CPU after exclusive")?;
                }
            }
            Op::Discard { first, count } => {
                let res = self.r.advise(self.pr(first, count), Advise::DontNeed);
                if self.any(first, count, Page::Unmapped) {
                    res.err().ok_or_else(|| must_fail("a page is unmapped"))?;
                } else {
                    res.map_err(|e| err(&e))?;
                    self.model[first * PAGE_SIZE..(first + count) * PAGE_SIZE].fill(0);
                    self.pages[first..first + count].fill(Page::Mapped);
                }
            }
            Op::Protect { first, count } => {
                let range = self.pr(first, count);
                let res = self.r.protect(range, Protection::Read);
                if self.any(first, count, Page::Unmapped) {
                    res.err().ok_or_else(|| must_fail("a page is unmapped"))?;
                    return Ok(());
                }
                res.map_err(|e| err(&e))?;
                let seen = retry_busy(|| devs[0].read(self.pr(first, 1)));
                if self.pages[first] == Page::Lost {
                    seen.err().ok_or_else(|| must_fail("the page is lost"))?;
                } else {
                    let (b, _) = seen.map_err(|e| err(&e))?;
                    let at = first * PAGE_SIZE;
                    compare(&b, &self.model[at..at + PAGE_SIZE], at, "device, read-only")?;
                }
                self.r.protect(range, Protection::ReadWrite).map_err(|e| err(&e))?;
            }
            Op::Pin { dev, first, count } => {
                let range = self.pr(first, count);
                let pin = self.r.pin(range);
                if !self.all_mapped(first, count) {
                    pin.err().ok_or_else(|| not_mapped(first, count))?;
                    return Ok(());
                }
                let pin = pin.map_err(|e| err(&e))?;
                devs[dev].migrate_to_device(range).map_err(|e| err(&e))?;
                let r = self.r;
                if let Some(p) =
                    (first..first + count).find(|p| !matches!(r.residency(*p), Residency::System))
                {
                    return Err(format!("pinned page {p} is {:?}", r.residency(p)));
                }
                drop(pin);
            }
            Op::Unmap { first, count } => {
                let res = self.r.unmap(self.pr(first, count));
                if self.any(first, count, Page::Unmapped) {
                    res.err().ok_or_else(|| must_fail("a page was unmapped already"))?;
                } else {
                    res.map_err(|e| err(&e))?;
                    self.pages[first..first + count].fill(Page::Unmapped);
                }
            }
            Op::Remap { first, count, keep } => {
                drop(devs);
                return self.remap(first, count, keep);
            }
            Op::Fork { fill } => {
                drop(devs);
                return self.fork(fill);
            }
            Op::Fail { dev } => {
                drop(devs);
                return self.fail(dev);
            }
        }
        Ok(())
    }

    /// Whether unmapping `count` more pages would pass the budget.
    fn over_budget(&self, count: usize) -> bool {
        let gone = self.pages.iter().filter(|p| **p == Page::Unmapped).count();
        gone + count > self.pages.len() / UNMAP_BUDGET_DIV
    }

    /// Whether `op` is skipped rather than run: unsupported here, or an
    /// unmap past the budget.
    fn skips(&self, op: &Op) -> bool {
        match *op {
            Op::Unmap { first, count } => {
                !self.any(first, count, Page::Unmapped) && self.over_budget(count)
            }
            Op::Remap { first, count, keep } => {
                !self.support.remap
                    || self.any(first, count, Page::Lost)
                    || (!keep && !self.any(first, count, Page::Unmapped) && self.over_budget(count))
            }
            Op::Fork { .. } => !self.support.fork,
            Op::Fail { .. } => !self.support.poison || self.threads > 1,
            _ => false,
        }
    }

    /// A CPU read, checked against the model.
    fn cpu_read(&self, at: usize, len: usize) -> Result<(), String> {
        let (first, count) = Self::span(at, len);
        let mut b = vec![0u8; len];
        if self.any(first, count, Page::Unmapped) {
            match self.r.read(at, &mut b) {
                Ok(()) => Err("succeeded, but a page is unmapped".into()),
                Err(_) => Ok(()),
            }
        } else if self.any(first, count, Page::Lost) {
            self.expect_lost(self.r.read(at, &mut b), at, len)
        } else {
            self.r.read(at, &mut b).map_err(|e| format!("failed: {e}"))?;
            compare(&b, &self.model[at..at + len], at, "CPU")
        }
    }

    /// An access through hmm's checked accessors to bytes that include a
    /// lost page: refused with `RangeError::Poisoned`; a raw CPU touch of
    /// them gets `SIGBUS` (checked in a child, where a child sees the
    /// parent's pages: with the FORK event).
    fn expect_lost(
        &self,
        res: Result<(), RangeError>,
        at: usize,
        len: usize,
    ) -> Result<(), String> {
        match res {
            Err(RangeError::Poisoned(_)) => {}
            other => {
                return Err(format!(
                    "an access through hmm to a lost page ended as {other:?}, not Poisoned"
                ));
            }
        }
        if self.support.fork { self.expect_sigbus(at, len) } else { Ok(()) }
    }

    /// A CPU access to bytes that include a lost page: in a child (the
    /// touch kills it with `SIGBUS`).
    fn expect_sigbus(&self, at: usize, len: usize) -> Result<(), String> {
        let r = self.r;
        let out = run_in_child(CHILD_LIMIT, || {
            let mut b = vec![0u8; len];
            // A raw CPU read (hmm's checked accessors refuse lost pages).
            match r.mapping().read(at, &mut b) {
                Ok(()) => 0,
                Err(_) => 1,
            }
        })
        .map_err(|e| format!("fork: {e}"))?;
        if out == ChildOutcome::Signaled(SIGBUS) {
            Ok(())
        } else {
            Err(format!("a CPU touch of a lost page ended as {out:?}, not SIGBUS"))
        }
    }

    /// [`Op::Remap`].
    fn remap(&mut self, first: usize, count: usize, keep: bool) -> Result<(), String> {
        let part = self.pr(first, count);
        let m = self.r.mapping();
        let before: Vec<Residency> = (first..first + count).map(|p| self.r.residency(p)).collect();
        let res = if keep { m.remap_part_dontunmap(part) } else { m.move_part(part) };
        if self.any(first, count, Page::Unmapped) {
            res.err().ok_or("succeeded, but a page is unmapped")?;
            return Ok(());
        }
        let moved = res.map_err(|e| format!("failed: {e}"))?;
        let (at, len) = (first * PAGE_SIZE, count * PAGE_SIZE);
        let mut b = vec![0u8; len];
        moved.read(0, &mut b).map_err(|e| format!("reading the new address: {e}"))?;
        compare(&b, &self.model[at..at + len], at, "CPU at the new address").map_err(|e| {
            // Which page, what hmm recorded of it as the move began, and
            // whether it arrived as zeros.
            let k = b.iter().zip(&self.model[at..at + len]).position(|(x, y)| x != y).unwrap_or(0)
                / PAGE_SIZE;
            let zeros = b[k * PAGE_SIZE..(k + 1) * PAGE_SIZE].iter().all(|x| *x == 0);
            format!(
                "{e}; recorded {:?} as the move began; the page all zeros: {zeros}; moved from {} to {}",
                before[k],
                VirtAddr::new(self.r.addr().get() + at + k * PAGE_SIZE),
                VirtAddr::new(moved.range().start().get() + k * PAGE_SIZE)
            )
        })?;
        if keep {
            self.model[at..at + len].fill(0);
        } else {
            self.pages[first..first + count].fill(Page::Unmapped);
        }
        Ok(())
    }

    /// [`Op::Fork`].
    fn fork(&mut self, fill: u64) -> Result<(), String> {
        let (r, model, pages) = (self.r, &self.model, &self.pages);
        let mapped = |p: usize| pages[p] == Page::Mapped;
        let before = r.residencies();
        let (out, what) = run_in_child_telling(|tell| {
            let mut mine = model.clone();
            if let Some(p) = first_wrong_mapped_page(r, pages, &mine) {
                let _ = write!(tell, "{}", describe_wrong_page(r, p, &mine));
                return 10;
            }
            let mut rng = Rng::new(fill);
            for _ in 0..16 {
                let p = rng.below(pages.len());
                if !mapped(p) {
                    continue;
                }
                let at = p * PAGE_SIZE + rng.below(PAGE_SIZE - 64);
                let b = bytes_of(rng.next(), 1 + rng.below(64));
                if r.write(at, &b).is_err() {
                    return 2;
                }
                mine[at..at + b.len()].copy_from_slice(&b);
            }
            if let Some(p) = first_wrong_mapped_page(r, pages, &mine) {
                let _ = write!(tell, "{}", describe_wrong_page(r, p, &mine));
                return 3;
            }
            0
        })?;
        // What the parent recorded of that page before the fork, and now.
        let recorded = |what: &str| {
            let p: Option<usize> =
                what.strip_prefix("page ").and_then(|s| s.split(':').next()?.parse().ok());
            p.map_or(String::new(), |p| {
                format!(" (recorded {:?} before the fork, {:?} now)", before[p], r.residency(p))
            })
        };
        match out {
            ChildOutcome::Exited(0) => Ok(()),
            ChildOutcome::Exited(2) => Err("the child could not write its own pages".into()),
            ChildOutcome::Exited(3) => {
                Err(format!("the child read back other than it wrote: {what}{}", recorded(&what)))
            }
            ChildOutcome::Exited(10) => {
                Err(format!("the child read other than at the fork: {what}{}", recorded(&what)))
            }
            other => Err(format!("the child ended as {other:?}")),
        }
    }

    /// [`Op::Fail`].
    fn fail(&mut self, dev: usize) -> Result<(), String> {
        // The records first take in what the kernel reported of earlier
        // operations (a discard's REMOVE is handled moments after the call
        // returns): they say which pages the device holds.
        if let Err(e) = self.hmm.settle(Duration::from_secs(10)) {
            tracing::debug!(error = %e, "not settled before the device failure");
        }
        let mut devs = self.devs.write().unwrap_or_else(|e| e.into_inner());
        let id = devs[dev].memory().id();
        let on: Vec<usize> = (0..self.pages.len())
            .filter(|p| matches!(self.r.residency(*p), Residency::Device(d) if d.dev == id))
            .collect();
        let lost = devs[dev].fail();
        // A page the device held is lost, unless a migration had copied it
        // off the device before the failure (the fault service brings pages
        // around a touched one back after the touch goes on): that one
        // arrives with its bytes. No other page is lost. `fail` counts the
        // pages it poisoned; a page a migration held then is poisoned as the
        // migration ends, and the device's counter has them all.
        let r = self.r;
        let deadline = Instant::now() + Duration::from_secs(2);
        let settled =
            |p: &usize| matches!(r.residency(*p), Residency::Poisoned | Residency::System);
        while !on.iter().all(settled) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        let res = r.residencies();
        if let Some(p) = on.iter().find(|p| !settled(p)) {
            return Err(format!("page {p} of the failed device stays {:?}", res[*p]));
        }
        let stray = (0..res.len()).find(|p| {
            res[*p] == Residency::Poisoned && !on.contains(p) && self.pages[*p] != Page::Lost
        });
        if let Some(p) = stray {
            return Err(format!("page {p} was lost, but it did not live on the failed device"));
        }
        let gone: Vec<usize> = on.into_iter().filter(|p| res[*p] == Residency::Poisoned).collect();
        let counted = devs[dev].stats().pages_poisoned as usize;
        if lost > gone.len() || counted != gone.len() {
            return Err(format!(
                "{lost} pages reported lost by the failure, {counted} counted by the device, \
                 {} recorded lost",
                gone.len()
            ));
        }
        for p in &gone {
            self.pages[*p] = Page::Lost;
        }
        let name = format!("stress{dev}-{}", id.index());
        devs[dev] = device(self.hmm, dev, name, self.threads, self.pages.len())
            .map_err(|e| format!("a new device: {e}"))?;
        // The new device holds nothing yet: no record may name it (one left
        // naming the failed device, under an id given again, would read the
        // new device's memory).
        let new = devs[dev].memory().id();
        if let Some(p) = (0..self.pages.len())
            .find(|p| matches!(self.r.residency(*p), Residency::Device(d) if d.dev == new))
        {
            return Err(format!(
                "page {p} is recorded {:?} on the new device {new}, which holds nothing",
                self.r.residency(p)
            ));
        }
        drop(devs);
        // Exactly those pages are lost: a touch of one gets SIGBUS, and every
        // other page keeps its bytes.
        if let Some(p) = gone.first() {
            self.expect_sigbus(p * PAGE_SIZE, 1)?;
        }
        let (r, model, pages) = (self.r, &self.model, &self.pages);
        if !self.support.fork {
            // A child would read zeros where pages live on a device (no FORK
            // event): read here, which brings those pages back, as any CPU
            // read does; the lost pages are not touched.
            return match first_wrong_mapped_page(r, pages, model) {
                None => Ok(()),
                Some(p) => Err(format!(
                    "a page not on the failed device read wrong: {}",
                    describe_wrong_page(r, p, model)
                )),
            };
        }
        let (out, what) = run_in_child_telling(|tell| {
            let Some(p) = first_wrong_mapped_page(r, pages, model) else { return 0 };
            let _ = write!(tell, "{}", describe_wrong_page(r, p, model));
            1
        })?;
        match out {
            ChildOutcome::Exited(0) => Ok(()),
            ChildOutcome::Exited(1) => {
                Err(format!("a page not on the failed device read wrong: {what}"))
            }
            other => Err(format!("the checking child ended as {other:?}")),
        }
    }
}

/// The first page the model calls mapped whose bytes `r` does not hold as
/// `model` says (or cannot read). For children, which report by exit status.
fn first_wrong_mapped_page(r: &ManagedRange, pages: &[Page], model: &[u8]) -> Option<usize> {
    let mut b = vec![0u8; PAGE_SIZE];
    (0..pages.len()).filter(|p| pages[*p] == Page::Mapped).find(|p| {
        r.read(p * PAGE_SIZE, &mut b).is_err() || b[..] != model[p * PAGE_SIZE..(p + 1) * PAGE_SIZE]
    })
}

/// Runs `f` in a forked child, which may say what it found on the pipe `f`
/// gets; returns how the child ended and what it said.
fn run_in_child_telling(
    f: impl FnOnce(&mut dyn Write) -> i32,
) -> Result<(ChildOutcome, String), String> {
    let (mut said, tell) = std::io::pipe().map_err(|e| format!("a pipe: {e}"))?;
    let out = run_in_child(CHILD_LIMIT, || {
        let mut tell = &tell;
        f(&mut tell)
    })
    .map_err(|e| format!("fork: {e}"))?;
    drop(tell);
    let mut what = String::new();
    let _ = std::io::Read::read_to_string(&mut said, &mut what);
    Ok((out, what))
}

/// What is wrong with page `p` of `r` against `model`: the read's error, or
/// how many bytes differ, the first of them, and whether the page read as
/// zeros.
fn describe_wrong_page(r: &ManagedRange, p: usize, model: &[u8]) -> String {
    let mut b = vec![0u8; PAGE_SIZE];
    let want = &model[p * PAGE_SIZE..(p + 1) * PAGE_SIZE];
    match r.read(p * PAGE_SIZE, &mut b) {
        Err(e) => format!("page {p}: the read failed: {e}"),
        Ok(()) => {
            let differ = b.iter().zip(want).filter(|(x, y)| x != y).count();
            let first = b.iter().zip(want).position(|(x, y)| x != y).unwrap_or(0);
            format!(
                "page {p}: {differ} bytes differ, the first at {first} ({:#04x}, not {:#04x}); \
                 all zeros: {}",
                b[first],
                want[first],
                b.iter().all(|x| *x == 0)
            )
        }
    }
}

/// Runs `ops` on `r` and its model; stops at the first divergence. Returns
/// the operations skipped.
fn execute(
    w: &mut Worker<'_>,
    ops: &[Op],
    thread: usize,
    counts: &Counts,
    tick: &(dyn Fn() + Sync),
) -> Result<u64, Divergence> {
    for (step, op) in ops.iter().enumerate() {
        let fail = |what: String| Divergence { thread, step, op: op.clone(), what };
        tick();
        if w.skips(op) {
            w.skipped += 1;
            continue;
        }
        counts[kind_index(op)].fetch_add(1, Ordering::Relaxed);
        tracing::trace!(thread, step, ?op, "stress step");
        w.step(op).map_err(fail)?;
        let res = w.r.residence();
        if res.total() != w.r.len() as u64 {
            return Err(fail(format!("accounting sums to {} of {} bytes", res.total(), w.r.len())));
        }
        // A lost page stays lost until the application discards or unmaps it.
        let now = w.r.residencies();
        if let Some(p) =
            (0..w.pages.len()).find(|p| w.pages[*p] == Page::Lost && now[*p] != Residency::Poisoned)
        {
            return Err(fail(format!("lost page {p} is {:?} now", now[p])));
        }
    }
    // Every mapped byte, at the end, as one more read of each mapped page.
    let mut b = vec![0u8; PAGE_SIZE];
    for p in (0..w.pages.len()).filter(|p| w.pages[*p] == Page::Mapped) {
        let at = p * PAGE_SIZE;
        let fail = |what| Divergence {
            thread,
            step: ops.len(),
            op: Op::CpuRead { at, len: PAGE_SIZE },
            what,
        };
        w.r.read(at, &mut b).map_err(|e| fail(format!("failed: {e}")))?;
        compare(&b, &w.model[at..at + PAGE_SIZE], at, "final CPU").map_err(fail)?;
    }
    Ok(w.skipped)
}

/// Runs a device access again, a few times, while it fails with
/// [`RangeFaultError::Busy`](hmm::RangeFaultError::Busy): pages held by a
/// migration longer than the fault's timeout (another worker's eviction on
/// a loaded machine), which the caller is told to retry.
fn retry_busy<T>(mut access: impl FnMut() -> Result<T, HmmError>) -> Result<T, HmmError> {
    let mut tries = 0;
    loop {
        match access() {
            Err(HmmError::Fault(hmm::RangeFaultError::Busy { .. })) if tries < 5 => tries += 1,
            r => return r,
        }
    }
}

/// Whether a device access was refused because its pages stayed held by
/// migrations through every retry (`RangeFaultError::Busy`, which tells the
/// caller to retry). With several workers on a machine whose cores are all
/// busy, another worker's fork copy or eviction can hold a page for a long
/// time: a refusal the API allows, after which nothing has changed. (Holds
/// of several seconds had a cause of their own: the fault service waiting
/// on a fault-back's copy that waited for the service to read an event,
/// see DESIGN.md, "userfaultfd hazards"; fixed.)
fn stayed_busy<T>(res: &Result<T, HmmError>) -> bool {
    matches!(res, Err(HmmError::Fault(hmm::RangeFaultError::Busy { .. })))
}

/// Where an operation's kind is counted, and named in [`KINDS`].
fn kind_index(op: &Op) -> usize {
    match op {
        Op::CpuWrite { .. } => 0,
        Op::CpuRead { .. } => 1,
        Op::DevWrite { .. } => 2,
        Op::DevRead { .. } => 3,
        Op::ToDevice { .. } => 4,
        Op::FromPeer { .. } => 5,
        Op::ToSystem { .. } => 6,
        Op::Exclusive { .. } => 7,
        Op::Discard { .. } => 8,
        Op::Protect { .. } => 9,
        Op::Pin { .. } => 10,
        Op::Unmap { .. } => 11,
        Op::Remap { .. } => 12,
        Op::Fork { .. } => 13,
        Op::Fail { .. } => 14,
        Op::DmaError { .. } => 15,
        Op::Starved { .. } => 16,
    }
}

/// The name of each kind of operation (what [`Op::kind`] says and
/// [`StressReport::by_kind`] counts).
pub const KINDS: [&str; 17] = [
    "cpu-write",
    "cpu-read",
    "device-write",
    "device-read",
    "to-device",
    "device-to-device",
    "to-system",
    "exclusive",
    "discard",
    "protect",
    "pin",
    "munmap",
    "mremap",
    "fork",
    "device-failure",
    "dma-error",
    "starved-read",
];

/// The kinds only a worker running alone plans (see [`plan`]).
pub const ALONE_ONLY: [&str; 3] = ["device-failure", "dma-error", "starved-read"];

/// Operations run, per kind.
type Counts = [AtomicU64; KINDS.len()];

fn compare(got: &[u8], want: &[u8], at: usize, who: &str) -> Result<(), String> {
    match got.iter().zip(want).position(|(a, b)| a != b) {
        None => Ok(()),
        Some(i) => Err(format!(
            "{who} read {:#04x} at byte {} (page {}), the model has {:#04x}",
            got[i],
            at + i,
            (at + i) / PAGE_SIZE,
            want[i]
        )),
    }
}

/// Runs a stress test: `progress` gets the operations done so far.
pub fn run(cfg: StressConfig, progress: &(dyn Fn(u64) + Sync)) -> Result<StressReport, HmmError> {
    let threads = cfg.threads.max(1);
    let pages = cfg.pages.max(1);
    let hmm = Hmm::new()?;
    let devs = devices(&hmm, threads, pages)?;
    let ops = cfg.ops as usize;
    let alone = threads == 1;
    // Worker `t` runs its share of the operations; the shares sum to `ops`.
    let plans: Vec<Vec<Op>> = (0..threads)
        .map(|t| {
            let n = ops * (t + 1) / threads - ops * t / threads;
            plan(cfg.seed, t, n, pages, alone, cfg.device_failures)
        })
        .collect();
    let ranges: Vec<ManagedRange> =
        (0..threads).map(|_| hmm.alloc(pages * PAGE_SIZE)).collect::<Result<_, _>>()?;
    let counts: Counts = Default::default();
    let done = AtomicU64::new(0);
    let support = Support::probe();
    let results: Vec<Result<u64, Divergence>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (hmm, r, ops, devs, counts, done) =
                    (&hmm, &ranges[t], &plans[t], &devs, &counts, &done);
                s.spawn(move || {
                    let tick = || {
                        let n = done.fetch_add(1, Ordering::Relaxed) + 1;
                        if n % 256 == 0 {
                            progress(n);
                        }
                    };
                    let mut w = Worker::new(hmm, r, devs, threads, support);
                    execute(&mut w, ops, t, counts, &tick)
                })
            })
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(t, h)| {
                h.join().unwrap_or_else(|_| {
                    Err(Divergence {
                        thread: t,
                        step: 0,
                        op: Op::CpuRead { at: 0, len: 0 },
                        what: "the worker panicked".into(),
                    })
                })
            })
            .collect()
    });
    let mut report = StressReport {
        ops: counts.iter().map(|c| c.load(Ordering::Relaxed)).sum(),
        left_out: support.left_out(),
        ..StressReport::default()
    };
    for (k, c) in KINDS.iter().zip(&counts) {
        report.by_kind.insert(k, c.load(Ordering::Relaxed));
    }
    for res in results {
        match res {
            Ok(skipped) => report.skipped += skipped,
            Err(d) => report.divergences.push(d),
        }
    }
    // Each device's charge matches the pages the ranges record on it (once
    // the forwarding of remapped pages, which frees device pages moments
    // after the `mremap`, has settled).
    if report.divergences.is_empty() {
        let devs = devs.read().unwrap_or_else(|e| e.into_inner());
        for (d, dev) in devs.iter().enumerate() {
            let id = dev.memory().id();
            let on = || ranges.iter().map(|r| r.residence().on_device(id)).sum::<u64>();
            let charged = || dev.stats().pages_resident * PAGE_SIZE as u64;
            let deadline = Instant::now() + Duration::from_secs(2);
            while on() != charged() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            let (on, charged) = (on(), charged());
            if on != charged {
                report.divergences.push(Divergence {
                    thread: 0,
                    step: plans[0].len(),
                    op: Op::ToSystem { dev: d, first: 0, count: 0 },
                    what: format!("device {d} is charged {charged} bytes, the ranges record {on}"),
                });
            }
        }
    }
    drop(ranges);
    drop(devs);
    drop(hmm);
    if let Some(first) = report.divergences.first() {
        let ops = &plans[first.thread];
        let upto = (first.step + 1).min(ops.len());
        report.shrunk = Some(shrink(&ops[..upto], first.thread, pages, threads)?);
    }
    Ok(report)
}

/// Whether `ops` diverge when run alone by one worker on a fresh instance.
fn diverges(ops: &[Op], thread: usize, pages: usize, threads: usize) -> Result<bool, HmmError> {
    Ok(run_worker(ops, thread, pages, threads)?.is_err())
}

/// Runs `ops` as worker `thread` of `threads` (sizing the devices as that
/// run would), alone on a fresh instance with a range of `pages` pages.
fn run_worker(
    ops: &[Op],
    thread: usize,
    pages: usize,
    threads: usize,
) -> Result<Result<u64, Divergence>, HmmError> {
    let hmm = Hmm::new()?;
    let devs = devices(&hmm, threads, pages)?;
    let r = hmm.alloc(pages * PAGE_SIZE)?;
    let counts: Counts = Default::default();
    let mut w = Worker::new(&hmm, &r, &devs, threads, Support::probe());
    Ok(execute(&mut w, ops, thread, &counts, &|| {}))
}

/// Runs `ops` (over a range of `pages` pages, as one worker alone, on a fresh
/// instance) against the model: `Ok(Ok(skipped))` when nothing diverged,
/// `Ok(Err(first divergence))` otherwise. What a fuzz target and a replayed
/// failing sequence call. Operations that point outside the range are
/// clamped into it first ([`Op::clamped`]).
pub fn replay(ops: &[Op], pages: usize) -> Result<Result<u64, Divergence>, HmmError> {
    let pages = pages.max(1);
    let ops: Vec<Op> = ops.iter().map(|op| op.clamped(pages)).collect();
    run_worker(&ops, 0, pages, 1)
}

/// Operations decoded from arbitrary bytes (a fuzzer's input), for a range of
/// `pages` pages: each takes a kind byte and then what its fields need (a
/// missing byte reads as zero), at most [`MAX_DECODED`] of them. Every input
/// decodes to valid operations, and the same bytes to the same operations.
pub fn decode(data: &[u8], pages: usize) -> Vec<Op> {
    let pages = pages.max(1);
    let len = pages * PAGE_SIZE;
    let at = std::cell::Cell::new(0usize);
    let byte = || {
        let b = data.get(at.get()).copied().unwrap_or(0);
        at.set(at.get() + 1);
        b as usize
    };
    let mut out = Vec::new();
    while out.len() < MAX_DECODED && at.get() < data.len() {
        let kind = byte() % KINDS.len();
        let dev = byte() % DEVICES;
        let first = byte() % pages;
        let count = 1 + byte() % 32.min(pages - first);
        let few = 1 + count % 4.min(pages - first);
        let off = (byte() << 8 | byte()) * 16 % len;
        let bytes = 1 + (byte() << 8 | byte()) % 1024.min(len - off);
        let fill = (byte() as u64) << 8 | byte() as u64;
        let small = 1 + byte() as u32 % 4;
        out.push(match kind {
            0 => Op::CpuWrite { at: off, len: bytes, fill },
            1 => Op::CpuRead { at: off, len: bytes },
            2 => Op::DevWrite { dev, at: off, len: bytes, fill },
            3 => Op::DevRead { dev, at: off, len: bytes },
            4 => Op::ToDevice { dev, first, count },
            5 => Op::FromPeer { dev, first, count },
            6 => Op::ToSystem { dev, first, count },
            7 => Op::Exclusive { dev, first, count },
            8 => Op::Discard { first, count },
            9 => Op::Protect { first, count },
            10 => Op::Pin { dev, first, count },
            11 => Op::Unmap { first, count: few },
            12 => Op::Remap { first, count: few, keep: fill.is_multiple_of(2) },
            13 => Op::Fork { fill },
            14 => Op::Fail { dev },
            15 => Op::DmaError { dev, first, count, after: small - 1, fail: small },
            _ => Op::Starved { at: off, len: bytes, fail: small },
        });
    }
    out
}

/// The most operations [`decode`] makes of one input.
pub const MAX_DECODED: usize = 64;

/// The shortest sequence found that still diverges, starting from `ops`
/// (which diverged in a run): chunks are dropped while the rest still
/// diverges, halving the chunk size down to single operations, within a
/// bounded number of tries. If `ops` alone does not diverge (the failure
/// needed the other workers), it is returned as it is.
pub fn shrink(
    ops: &[Op],
    thread: usize,
    pages: usize,
    threads: usize,
) -> Result<Vec<Op>, HmmError> {
    let mut cur = ops.to_vec();
    if !diverges(&cur, thread, pages, threads)? {
        return Ok(cur);
    }
    let mut tries = 0;
    let mut chunk = cur.len().div_ceil(2).max(1);
    while chunk >= 1 && tries < 400 {
        let mut i = 0;
        let mut removed = false;
        while i < cur.len() && tries < 400 {
            let mut cand = cur.clone();
            cand.drain(i..(i + chunk).min(cand.len()));
            tries += 1;
            if !cand.is_empty() && diverges(&cand, thread, pages, threads)? {
                cur = cand;
                removed = true;
            } else {
                i += chunk;
            }
        }
        if !removed {
            if chunk == 1 {
                break;
            }
            chunk = chunk.div_ceil(2);
        }
    }
    Ok(cur)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_are_reproducible_and_stay_inside_the_range() {
        let a = plan(7, 0, 2000, 64, true, true);
        assert_eq!(a, plan(7, 0, 2000, 64, true, true), "the same seed, the same operations");
        assert_ne!(a, plan(7, 1, 2000, 64, true, true), "each worker its own");
        let alone_only = |op: &Op| ALONE_ONLY.contains(&op.kind());
        let shared = plan(7, 0, 2000, 64, false, true);
        assert!(!shared.iter().any(alone_only), "no injected fault when shared");
        let kept = plan(7, 0, 2000, 64, true, false);
        assert!(!kept.iter().any(|op| matches!(op, Op::Fail { .. })), "devices kept");
        assert!(kept.iter().any(|op| matches!(op, Op::DmaError { .. })), "engine faults still");
        let len = 64 * PAGE_SIZE;
        for op in &a {
            match *op {
                Op::CpuWrite { at, len: n, .. }
                | Op::CpuRead { at, len: n }
                | Op::Starved { at, len: n, .. }
                | Op::DevWrite { at, len: n, .. }
                | Op::DevRead { at, len: n, .. } => assert!(n >= 1 && at + n <= len, "{op:?}"),
                Op::ToDevice { first, count, dev }
                | Op::FromPeer { first, count, dev }
                | Op::ToSystem { first, count, dev }
                | Op::Exclusive { first, count, dev }
                | Op::Pin { first, count, dev }
                | Op::DmaError { first, count, dev, .. } => {
                    assert!(count >= 1 && first + count <= 64 && dev < DEVICES, "{op:?}")
                }
                Op::Discard { first, count } | Op::Protect { first, count } => {
                    assert!(count >= 1 && first + count <= 64, "{op:?}")
                }
                Op::Unmap { first, count } | Op::Remap { first, count, .. } => {
                    assert!((1..=4).contains(&count) && first + count <= 64, "{op:?}")
                }
                Op::Fork { .. } => {}
                Op::Fail { dev } => assert!(dev < DEVICES),
            }
        }
        let kinds: std::collections::BTreeSet<_> = a.iter().map(Op::kind).collect();
        assert_eq!(kinds.len(), KINDS.len(), "every kind of operation is planned");
    }

    /// Bytes that differ from the model are reported, with where: here the
    /// range holds bytes the model (all zeros at the start) never saw.
    #[test]
    fn a_byte_the_model_did_not_write_is_a_divergence() {
        if hmm::probe::probe().usable().is_err() {
            eprintln!("SKIP: hmm cannot run here");
            return;
        }
        let hmm = Hmm::new().unwrap();
        let devs = devices(&hmm, 1, 16).unwrap();
        let r = hmm.alloc(16 * PAGE_SIZE).unwrap();
        r.write(PAGE_SIZE + 3, &[7]).unwrap();
        let counts: Counts = Default::default();
        let ops = [
            Op::ToDevice { dev: 0, first: 0, count: 4 },
            Op::CpuRead { at: 0, len: 2 * PAGE_SIZE },
        ];
        let mut w = Worker::new(&hmm, &r, &devs, 1, Support::probe());
        let d = execute(&mut w, &ops, 0, &counts, &|| {}).unwrap_err();
        assert_eq!(d.step, 1);
        assert!(d.what.contains("byte 4099 (page 1)"), "{d}");
        let ok = [Op::CpuWrite { at: 0, len: 8, fill: 1 }, Op::DevRead { dev: 1, at: 0, len: 8 }];
        let r2 = hmm.alloc(16 * PAGE_SIZE).unwrap();
        let mut w = Worker::new(&hmm, &r2, &devs, 1, Support::probe());
        execute(&mut w, &ok, 0, &counts, &|| {}).unwrap();
    }
}
