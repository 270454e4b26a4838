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
use std::sync::atomic::{AtomicU64, Ordering};

use crate::addr::{PAGE_SIZE, VirtAddr};
use crate::os::mm::{Advise, Protection};
use crate::page::Residency;
use crate::space::{Hmm, HmmError, ManagedRange};
use crate::swdev::{SoftwareDevice, SoftwareDeviceConfig};

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
}

impl Default for StressConfig {
    fn default() -> Self {
        Self { seed: 1, ops: 10_000, threads: 1, pages: 256 }
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
}

impl Op {
    /// A short name, for counts.
    pub fn kind(&self) -> &'static str {
        KINDS[kind_index(self)]
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

/// The operations of worker `thread`: `n` of them over `pages` pages.
pub fn plan(seed: u64, thread: usize, n: usize, pages: usize) -> Vec<Op> {
    let mut rng = Rng::new(seed ^ (thread as u64).wrapping_mul(0xD1B5_4A32_D192_ED03));
    let len = pages * PAGE_SIZE;
    (0..n)
        .map(|_| {
            let dev = rng.below(DEVICES);
            let first = rng.below(pages);
            let count = 1 + rng.below(32.min(pages - first));
            let at = rng.below(len);
            let bytes = 1 + rng.below(512.min(len - at));
            match rng.below(20) {
                0..=3 => Op::CpuWrite { at, len: bytes, fill: rng.next() },
                4..=6 => Op::CpuRead { at, len: bytes },
                7..=8 => Op::DevWrite { dev, at, len: bytes, fill: rng.next() },
                9..=10 => Op::DevRead { dev, at, len: bytes },
                11..=12 => Op::ToDevice { dev, first, count },
                13 => Op::FromPeer { dev, first, count },
                14..=15 => Op::ToSystem { dev, first, count },
                16 => Op::Exclusive { dev, first, count },
                17 => Op::Discard { first, count },
                18 => Op::Protect { first, count },
                _ => Op::Pin { dev, first, count },
            }
        })
        .collect()
}

fn bytes_of(fill: u64, len: usize) -> Vec<u8> {
    let mut r = Rng::new(fill);
    (0..len).map(|_| r.next() as u8).collect()
}

/// The devices of a run.
fn devices(hmm: &Hmm, threads: usize, pages: usize) -> Result<Vec<SoftwareDevice>, HmmError> {
    // Each device holds about half of all the pages: migrations evict.
    let cap = (threads * pages / 2).max(64) * PAGE_SIZE;
    (0..DEVICES)
        .map(|d| {
            SoftwareDevice::new(
                hmm,
                SoftwareDeviceConfig::new(format!("stress{d}"), cap).evicting(),
            )
        })
        .collect()
}

/// Runs `ops` on `r` and its model; stops at the first divergence.
fn execute(
    r: &ManagedRange,
    devs: &[SoftwareDevice],
    ops: &[Op],
    thread: usize,
    counts: &Counts,
    tick: &(dyn Fn() + Sync),
) -> Result<(), Divergence> {
    let mut model = vec![0u8; r.len()];
    let pr = |first: usize, count: usize| r.pages_range(first, count).expect("inside the range");
    let addr = |at: usize| VirtAddr::new(r.addr().get() + at);
    for (step, op) in ops.iter().enumerate() {
        let fail = |what: String| Divergence { thread, step, op: op.clone(), what };
        let err = |e: &dyn fmt::Display| fail(format!("failed: {e}"));
        counts[kind_index(op)].fetch_add(1, Ordering::Relaxed);
        tick();
        match *op {
            Op::CpuWrite { at, len, fill } => {
                let b = bytes_of(fill, len);
                r.write(at, &b).map_err(|e| err(&e))?;
                model[at..at + len].copy_from_slice(&b);
            }
            Op::CpuRead { at, len } => {
                let mut b = vec![0u8; len];
                r.read(at, &mut b).map_err(|e| err(&e))?;
                compare(&b, &model[at..at + len], at, "CPU").map_err(fail)?;
            }
            Op::DevWrite { dev, at, len, fill } => {
                let b = bytes_of(fill, len);
                devs[dev].write(addr(at), &b).map_err(|e| err(&e))?;
                model[at..at + len].copy_from_slice(&b);
            }
            Op::DevRead { dev, at, len } => {
                let first = at / PAGE_SIZE;
                let last = (at + len - 1) / PAGE_SIZE;
                let (b, _) = devs[dev].read(pr(first, last - first + 1)).map_err(|e| err(&e))?;
                let off = at - first * PAGE_SIZE;
                compare(&b[off..off + len], &model[at..at + len], at, "device").map_err(fail)?;
            }
            Op::ToDevice { dev, first, count } => {
                devs[dev].migrate_to_device(pr(first, count)).map_err(|e| err(&e))?;
            }
            Op::FromPeer { dev, first, count } => {
                let other = &devs[(dev + 1) % DEVICES];
                devs[dev].migrate_from(pr(first, count), other).map_err(|e| err(&e))?;
            }
            Op::ToSystem { dev, first, count } => {
                devs[dev].migrate_to_system(pr(first, count)).map_err(|e| err(&e))?;
            }
            Op::Exclusive { dev, first, count } => {
                devs[dev].make_exclusive(pr(first, count)).map_err(|e| err(&e))?;
                // A CPU read revokes it and sees the bytes.
                let at = first * PAGE_SIZE;
                let mut b = vec![0u8; PAGE_SIZE];
                r.read(at, &mut b).map_err(|e| err(&e))?;
                compare(&b, &model[at..at + PAGE_SIZE], at, "CPU after exclusive").map_err(fail)?;
            }
            Op::Discard { first, count } => {
                r.advise(pr(first, count), Advise::DontNeed).map_err(|e| err(&e))?;
                model[first * PAGE_SIZE..(first + count) * PAGE_SIZE].fill(0);
            }
            Op::Protect { first, count } => {
                r.protect(pr(first, count), Protection::Read).map_err(|e| err(&e))?;
                let (b, _) = devs[0].read(pr(first, 1)).map_err(|e| err(&e))?;
                let at = first * PAGE_SIZE;
                compare(&b, &model[at..at + PAGE_SIZE], at, "device, read-only").map_err(fail)?;
                r.protect(pr(first, count), Protection::ReadWrite).map_err(|e| err(&e))?;
            }
            Op::Pin { dev, first, count } => {
                let pin = r.pin(pr(first, count)).map_err(|e| err(&e))?;
                devs[dev].migrate_to_device(pr(first, count)).map_err(|e| err(&e))?;
                if let Some(p) =
                    (first..first + count).find(|p| !matches!(r.residency(*p), Residency::System))
                {
                    return Err(fail(format!("pinned page {p} is {:?}", r.residency(p))));
                }
                drop(pin);
            }
        }
        let res = r.residence();
        if res.total() != r.len() as u64 {
            return Err(fail(format!("accounting sums to {} of {} bytes", res.total(), r.len())));
        }
    }
    // Every byte, at the end, as one more read.
    let fail = |what| Divergence {
        thread,
        step: ops.len(),
        op: Op::CpuRead { at: 0, len: r.len() },
        what,
    };
    let mut all = vec![0u8; r.len()];
    r.read(0, &mut all).map_err(|e| fail(format!("failed: {e}")))?;
    compare(&all, &model, 0, "final CPU").map_err(fail)
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
    }
}

/// The name of each kind of operation, by [`kind_index`].
const KINDS: [&str; 11] = [
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
];

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
    // Worker `t` runs its share of the operations; the shares sum to `ops`.
    let plans: Vec<Vec<Op>> = (0..threads)
        .map(|t| plan(cfg.seed, t, ops * (t + 1) / threads - ops * t / threads, pages))
        .collect();
    let ranges: Vec<ManagedRange> =
        (0..threads).map(|_| hmm.alloc(pages * PAGE_SIZE)).collect::<Result<_, _>>()?;
    let counts: Counts = Default::default();
    let done = AtomicU64::new(0);
    let results: Vec<Result<(), Divergence>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (r, ops, devs, counts, done) = (&ranges[t], &plans[t], &devs, &counts, &done);
                s.spawn(move || {
                    let tick = || {
                        let n = done.fetch_add(1, Ordering::Relaxed) + 1;
                        if n % 256 == 0 {
                            progress(n);
                        }
                    };
                    execute(r, devs, ops, t, counts, &tick)
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
        ..StressReport::default()
    };
    for (k, c) in KINDS.iter().zip(&counts) {
        report.by_kind.insert(k, c.load(Ordering::Relaxed));
    }
    report.divergences = results.into_iter().filter_map(Result::err).collect();
    // Each device's charge matches the pages the ranges record on it.
    if report.divergences.is_empty() {
        for (d, dev) in devs.iter().enumerate() {
            let id = dev.memory().id();
            let on: u64 = ranges.iter().map(|r| r.residence().on_device(id)).sum();
            let charged = dev.stats().pages_resident * PAGE_SIZE as u64;
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
    let hmm = Hmm::new()?;
    let devs = devices(&hmm, threads, pages)?;
    let r = hmm.alloc(pages * PAGE_SIZE)?;
    let counts: Counts = Default::default();
    Ok(execute(&r, &devs, ops, thread, &counts, &|| {}).is_err())
}

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
        let a = plan(7, 0, 2000, 64);
        assert_eq!(a, plan(7, 0, 2000, 64), "the same seed, the same operations");
        assert_ne!(a, plan(7, 1, 2000, 64), "each worker its own");
        let len = 64 * PAGE_SIZE;
        for op in &a {
            match *op {
                Op::CpuWrite { at, len: n, .. }
                | Op::CpuRead { at, len: n }
                | Op::DevWrite { at, len: n, .. }
                | Op::DevRead { at, len: n, .. } => assert!(n >= 1 && at + n <= len, "{op:?}"),
                Op::ToDevice { first, count, dev }
                | Op::FromPeer { first, count, dev }
                | Op::ToSystem { first, count, dev }
                | Op::Exclusive { first, count, dev }
                | Op::Pin { first, count, dev } => {
                    assert!(count >= 1 && first + count <= 64 && dev < DEVICES, "{op:?}")
                }
                Op::Discard { first, count } | Op::Protect { first, count } => {
                    assert!(count >= 1 && first + count <= 64, "{op:?}")
                }
            }
        }
        let kinds: std::collections::BTreeSet<_> = a.iter().map(Op::kind).collect();
        assert_eq!(kinds.len(), KINDS.len(), "every kind of operation is planned");
    }

    /// Bytes that differ from the model are reported, with where: here the
    /// range holds bytes the model (all zeros at the start) never saw.
    #[test]
    fn a_byte_the_model_did_not_write_is_a_divergence() {
        if crate::probe::probe().usable().is_err() {
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
        let d = execute(&r, &devs, &ops, 0, &counts, &|| {}).unwrap_err();
        assert_eq!(d.step, 1);
        assert!(d.what.contains("byte 4099 (page 1)"), "{d}");
        let ok = [Op::CpuWrite { at: 0, len: 8, fill: 1 }, Op::DevRead { dev: 1, at: 0, len: 8 }];
        let r2 = hmm.alloc(16 * PAGE_SIZE).unwrap();
        execute(&r2, &devs, &ok, 0, &counts, &|| {}).unwrap();
    }
}
