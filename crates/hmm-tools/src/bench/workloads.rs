//! The workload benchmark (`hmm bench workloads`): access patterns run by a
//! software device through its page table, with the placement policy off
//! (demand faults: a page migrates when the device first touches it, nothing
//! more) and on (`hmm::policy`'s defaults: density prefetch, thrashing
//! mitigation), at device-memory oversubscription factors (working set /
//! device memory; a full device evicts its least recently used pages), each
//! against the same pattern run with every page already on the device.
//!
//! Patterns, over a working set of `W` pages, one 8-byte device read per
//! access:
//! - `stream`: two passes in address order;
//! - `random`: `16W` pages drawn uniformly;
//! - `zipf`: `16W` pages drawn from a Zipf law (s = 0.99) over the pages in a
//!   fixed shuffled order, so that popularity is not address order;
//! - `ping-pong`: 16 pages the device and the CPU write in turn (the device
//!   all 16, then the CPU all 16), 100 rounds; its baseline is the device
//!   mapping the pages where they are (accessed-by), with no migration;
//! - `bfs`: a breadth-first search by a device job over a Graph500
//!   Kronecker graph (scale 14, or 12 quick; 16 edges a vertex; a, b, c =
//!   0.57, 0.19, 0.19) held as CSR arrays in managed memory, at each
//!   factor, policy off and on, against the graph fully resident; the levels
//!   are checked against the CPU's own search;
//! - `read-mostly`: a 256-page table read by two devices and the CPU in
//!   turn, with demand faults and advised read-mostly (duplicated), against
//!   the devices mapping it where it is;
//! - `budget`: the CPU reading the working set in the Zipf order (repeated),
//!   with the set kept within 25%, 50% and 75% of its size in system memory
//!   on a compressed tier (`Placement::set_budget`), against the same reads
//!   with no budget; each budgeted run starts once the set fits.
//!
//! Every run checks the bytes the device read.

use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use super::{BenchError, BenchOptions, Step, hmm_err, shuffled};
use hmm::addr::{PAGE_SIZE, VirtAddr};
use hmm::policy::{
    Advice, BudgetConfig, DemandOnly, Placement, PlacementConfig, PlacementStats, ThrashConfig,
};
use hmm::space::{Hmm, HmmError, ManagedRange};
use hmm_swdev::{DeviceContext, SoftwareDevice, SoftwareDeviceConfig};

/// One run of a pattern.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WorkloadRow {
    /// The pattern.
    pub pattern: &'static str,
    /// Working set / device memory (0 for ping-pong, whose pages all fit).
    pub factor: f64,
    /// `demand`, `policy`, or a named variant.
    pub policy: String,
    /// Device accesses made.
    pub accesses: usize,
    /// Wall time, milliseconds.
    pub ms: f64,
    /// Pages migrated either way (evictions included).
    pub migrations: u64,
    /// Of those, pages evicted to make room (by the device's pressure or by
    /// the placement's policy).
    pub evicted: u64,
    /// What the placement decided meanwhile.
    pub decisions: PlacementStats,
    /// The same pattern fully resident (or, for ping-pong, mapped where it
    /// is): milliseconds.
    pub resident_ms: f64,
}

/// A goal of the issue of record, and whether this run met it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Goal {
    /// What is asked.
    pub goal: &'static str,
    /// Met, not met, or not measured (`None`).
    pub met: Option<bool>,
    /// The figures, or why it is not measured.
    pub detail: String,
}

/// What `hmm bench workloads` measured.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WorkloadReport {
    /// Pages of the working set.
    pub working_set_pages: usize,
    /// Every run.
    pub rows: Vec<WorkloadRow>,
    /// The goals, each met or not.
    pub goals: Vec<Goal>,
}

/// Oversubscription factors measured.
pub const FACTORS: [f64; 5] = [0.5, 1.0, 1.5, 2.0, 3.0];
const PATTERNS: [&str; 3] = ["stream", "random", "zipf"];
const PING_PONG_PAGES: usize = 16;

/// Budgets measured, as shares of the working set.
pub const BUDGETS: [f64; 3] = [0.25, 0.5, 0.75];

/// Steps [`run_workloads`] reports.
pub const WORKLOAD_STEPS: usize = PATTERNS.len() + 4;

/// Runs every pattern (see the module docs).
pub fn run_workloads(
    opts: BenchOptions,
    progress: &mut dyn FnMut(Step),
) -> Result<WorkloadReport, BenchError> {
    let pages = if opts.quick { 1024 } else { 4096 };
    let mut rows = Vec::new();
    for (k, pattern) in PATTERNS.into_iter().enumerate() {
        progress(Step { name: pattern, index: k, total: WORKLOAD_STEPS });
        let order = accesses(pattern, pages);
        let resident_ms = run_pattern(pages, &order, None, Mode::Resident)?.ms;
        for factor in FACTORS {
            // Eviction order matters only where pages are evicted and used again.
            let fifo = pattern == "zipf" && factor > 1.0;
            let modes: &[Mode] = match fifo {
                true => &[Mode::Demand, Mode::Policy, Mode::PolicyFifo],
                false => &[Mode::Demand, Mode::Policy],
            };
            for &mode in modes {
                let run = run_pattern(pages, &order, Some(factor), mode)?;
                rows.push(WorkloadRow {
                    pattern,
                    factor,
                    policy: mode.name().into(),
                    accesses: order.len(),
                    ms: run.ms,
                    migrations: run.migrations,
                    evicted: run.evicted,
                    decisions: run.decisions,
                    resident_ms,
                });
            }
        }
    }
    progress(Step { name: "bfs", index: PATTERNS.len(), total: WORKLOAD_STEPS });
    rows.extend(bfs_rows(if opts.quick { 12 } else { 14 })?);
    progress(Step { name: "ping-pong", index: PATTERNS.len() + 1, total: WORKLOAD_STEPS });
    let rounds = if opts.quick { 40 } else { 100 };
    rows.extend(ping_pong(rounds)?);
    progress(Step { name: "read-mostly", index: PATTERNS.len() + 2, total: WORKLOAD_STEPS });
    rows.extend(read_mostly(if opts.quick { 10 } else { 30 })?);
    progress(Step { name: "budget", index: PATTERNS.len() + 3, total: WORKLOAD_STEPS });
    rows.extend(budgets(pages, opts.quick)?);
    let goals = goals(&rows);
    Ok(WorkloadReport { working_set_pages: pages, rows, goals })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Every page on the device before the pattern starts.
    Resident,
    /// First touch migrates the page, nothing more.
    Demand,
    /// `hmm::policy`'s defaults.
    Policy,
    /// The same, on a device that evicts first in, first out.
    PolicyFifo,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Resident => "resident",
            Mode::Demand => "demand",
            Mode::Policy => "policy",
            Mode::PolicyFifo => "policy, FIFO eviction",
        }
    }
}

/// The pages a pattern reads, in order.
fn accesses(pattern: &str, pages: usize) -> Vec<usize> {
    match pattern {
        "stream" => (0..2 * pages).map(|i| i % pages).collect(),
        "random" => {
            let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
            (0..16 * pages).map(|_| (rng.next() % pages as u64) as usize).collect()
        }
        _ => {
            // Zipf (s = 0.99) over ranks, the ranks over a fixed shuffle.
            let s = 0.99;
            let mut cdf = Vec::with_capacity(pages);
            let mut sum = 0.0;
            for k in 1..=pages {
                sum += 1.0 / (k as f64).powf(s);
                cdf.push(sum);
            }
            let perm = shuffled((0..pages).collect(), 0xD1B5_4A32_D192_ED03);
            let mut rng = Rng(0x2545_F491_4F6C_DD1D);
            (0..16 * pages)
                .map(|_| {
                    let u = (rng.next() >> 11) as f64 / (1u64 << 53) as f64 * sum;
                    perm[cdf.partition_point(|c| *c < u).min(pages - 1)]
                })
                .collect()
        }
    }
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// The word page `i` holds.
fn word(i: usize) -> u64 {
    0x5157_0000_0000 + i as u64
}

/// `pages` pages, page `i` holding [`word`]`(i)` repeated.
fn words(pages: usize) -> Vec<u8> {
    (0..pages).flat_map(|i| word(i).to_ne_bytes().repeat(PAGE_SIZE / 8)).collect()
}

/// A managed range holding `bytes` (whole pages or not).
fn holding(hmm: &Hmm, bytes: &[u8]) -> Result<ManagedRange, BenchError> {
    let r = super::managed_range(hmm, bytes.len().div_ceil(PAGE_SIZE) * PAGE_SIZE, false)?;
    r.write(0, bytes).map_err(|e| BenchError::Server(e.to_string()))?;
    Ok(r)
}

fn working_set(hmm: &Hmm, pages: usize) -> Result<ManagedRange, BenchError> {
    holding(hmm, &words(pages))
}

/// Pages a device moved either way between two of its counts (evictions
/// are migrations to system memory, counted there).
fn migrated(before: &hmm::DeviceStats, after: &hmm::DeviceStats) -> u64 {
    (after.migrated_to_device - before.migrated_to_device)
        + (after.migrated_to_system - before.migrated_to_system)
}

/// What one run of a device job cost.
struct Run {
    ms: f64,
    migrations: u64,
    /// Evicted by the device's pressure, or by the placement making room.
    evicted: u64,
    decisions: PlacementStats,
}

/// Runs `job` (given the start address of `bytes`) as a device job over a
/// managed range holding `bytes`, on a device of `pages / factor` pages
/// (or, `Resident`, one holding every page before the start) with the
/// placement `mode` names: the job's result and what the run cost.
fn device_run<T: Send>(
    bytes: &[u8],
    factor: Option<f64>,
    mode: Mode,
    job: impl Fn(&mut DeviceContext<'_>, usize) -> Result<T, HmmError> + Sync,
) -> Result<(T, Run), BenchError> {
    let hmm = Hmm::new().map_err(hmm_err)?;
    let pages = bytes.len().div_ceil(PAGE_SIZE);
    let capacity = match factor {
        Some(f) => ((pages as f64 / f).ceil() as usize).max(1),
        None => pages,
    };
    let config = SoftwareDeviceConfig::new("workload", capacity * PAGE_SIZE);
    let config = match mode {
        Mode::PolicyFifo => config.evicting_oldest(),
        _ => config.evicting(),
    };
    let dev = SoftwareDevice::new(&hmm, config).map_err(hmm_err)?;
    let r = holding(&hmm, bytes)?;
    let p = placement(&hmm, mode)?;
    if mode == Mode::Resident {
        let moved = dev.migrate_to_device(r.range()).map_err(hmm_err)?.migrated;
        if moved != pages {
            return Err(BenchError::Server(format!("{moved} of {pages} pages on the device")));
        }
    }
    dev.set_placement(Some(p.clone()));
    let before = dev.stats();
    let base = r.range().start().get();
    let t = Instant::now();
    let (mut out, _) = dev.run(1, r.range().start(), |ctx| job(ctx, base)).map_err(hmm_err)?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    dev.set_placement(None);
    let after = dev.stats();
    let decisions = p.stats();
    let evicted = after.pages_evicted - before.pages_evicted + decisions.pages_evicted;
    let run = Run { ms, migrations: migrated(&before, &after), evicted, decisions };
    Ok((out.remove(0), run))
}

fn placement(hmm: &Hmm, mode: Mode) -> Result<Arc<Placement>, BenchError> {
    let config = match mode {
        Mode::Demand => {
            PlacementConfig { policy: Arc::new(DemandOnly), thrash: None, ..Default::default() }
        }
        Mode::Resident | Mode::Policy | Mode::PolicyFifo => PlacementConfig::default(),
    };
    Placement::with_config(hmm, config).map(Arc::new).map_err(|e| BenchError::Server(e.to_string()))
}

/// Runs `order` on a device of `pages / factor` pages (or, `Resident`, one
/// holding every page before the start), checking every word read.
fn run_pattern(
    pages: usize,
    order: &[usize],
    factor: Option<f64>,
    mode: Mode,
) -> Result<Run, BenchError> {
    let (bad, run) = device_run(&words(pages), factor, mode, |ctx, base| {
        let mut bad = 0usize;
        for &i in order {
            let v = ctx.read_u64(VirtAddr::new(base + i * PAGE_SIZE))?;
            bad += usize::from(v != word(i));
        }
        Ok(bad)
    })?;
    if bad != 0 {
        return Err(BenchError::Server(format!("the device read {bad} wrong words")));
    }
    Ok(run)
}

/// CPU and device writing the same pages in turn: without mitigation, with
/// UVM's thresholds, with hmm's (`ThrashConfig::default`), and the device
/// mapping the pages where they are (the baseline).
fn ping_pong(rounds: usize) -> Result<Vec<WorkloadRow>, BenchError> {
    let variants: [(&str, Option<ThrashConfig>); 3] = [
        ("no mitigation", None),
        ("UVM thresholds", Some(ThrashConfig::uvm())),
        ("policy", Some(ThrashConfig::default())),
    ];
    let baseline = ping_pong_run(rounds, None, true)?.0;
    let mut rows = Vec::new();
    for (name, thrash) in variants {
        let (ms, migrations, decisions) = ping_pong_run(rounds, Some(thrash), false)?;
        rows.push(WorkloadRow {
            pattern: "ping-pong",
            factor: 0.0,
            policy: name.into(),
            accesses: 2 * rounds * PING_PONG_PAGES,
            ms,
            migrations,
            evicted: 0,
            decisions,
            resident_ms: baseline,
        });
    }
    Ok(rows)
}

fn ping_pong_run(
    rounds: usize,
    thrash: Option<Option<ThrashConfig>>,
    mapped: bool,
) -> Result<(f64, u64, PlacementStats), BenchError> {
    let hmm = Hmm::new().map_err(hmm_err)?;
    let dev = SoftwareDevice::new(&hmm, SoftwareDeviceConfig::new("ping-pong", 64 * PAGE_SIZE))
        .map_err(hmm_err)?;
    let r = working_set(&hmm, PING_PONG_PAGES)?;
    let config = PlacementConfig { thrash: thrash.flatten(), ..Default::default() };
    let p = Arc::new(
        Placement::with_config(&hmm, config).map_err(|e| BenchError::Server(e.to_string()))?,
    );
    if mapped {
        p.advise(r.range(), Advice::AccessedBy(dev.memory().id()))
            .map_err(|e| BenchError::Server(e.to_string()))?;
    }
    dev.set_placement(Some(p.clone()));
    let before = dev.stats();
    let t = Instant::now();
    for round in 0..rounds as u64 {
        for k in 0..PING_PONG_PAGES {
            let at = VirtAddr::new(r.range().start().get() + k * PAGE_SIZE);
            dev.write(at, &(2 * round).to_ne_bytes()).map_err(hmm_err)?;
        }
        for k in 0..PING_PONG_PAGES {
            let mut b = [0u8; 8];
            r.read(k * PAGE_SIZE, &mut b).map_err(|e| BenchError::Server(e.to_string()))?;
            if u64::from_ne_bytes(b) != 2 * round {
                return Err(BenchError::Server(
                    "the CPU read what the device did not write".into(),
                ));
            }
            r.write(k * PAGE_SIZE, &(2 * round + 1).to_ne_bytes())
                .map_err(|e| BenchError::Server(e.to_string()))?;
        }
    }
    let ms = t.elapsed().as_secs_f64() * 1e3;
    dev.set_placement(None);
    Ok((ms, migrated(&before, &dev.stats()), p.stats()))
}

/// A graph from the Graph500 Kronecker (R-MAT) generator: `2^scale`
/// vertices, 16 edges a vertex, initiator probabilities a = 0.57, b = 0.19,
/// c = 0.19 (d = 0.05), edges made undirected, self-loops dropped, vertex
/// numbers scrambled by a fixed permutation. As CSR: `offsets` (one more
/// than the vertices) and `targets`, both `u64`.
fn rmat_csr(scale: u32) -> (Vec<u64>, Vec<u64>) {
    let n = 1usize << scale;
    let mut rng = Rng(0x1234_5678_9ABC_DEF1);
    let mut unit = || (rng.next() >> 11) as f64 / (1u64 << 53) as f64;
    let perm = shuffled((0..n).collect(), 0x0000_DDBA_11C0_FFEE);
    let mut edges: Vec<(usize, usize)> = Vec::with_capacity(2 * 16 * n);
    for _ in 0..16 * n {
        let (mut u, mut v) = (0usize, 0usize);
        for bit in (0..scale).rev() {
            let x = unit();
            let (du, dv) = if x < 0.57 {
                (0, 0)
            } else if x < 0.76 {
                (0, 1)
            } else if x < 0.95 {
                (1, 0)
            } else {
                (1, 1)
            };
            u |= du << bit;
            v |= dv << bit;
        }
        if u != v {
            edges.push((perm[u], perm[v]));
            edges.push((perm[v], perm[u]));
        }
    }
    edges.sort_unstable();
    edges.dedup();
    let mut offsets = vec![0u64; n + 1];
    for &(u, _) in &edges {
        offsets[u + 1] += 1;
    }
    for i in 0..n {
        offsets[i + 1] += offsets[i];
    }
    (offsets, edges.into_iter().map(|(_, v)| v as u64).collect())
}

/// Breadth-first search levels from `root` (`u64::MAX`: unreached).
fn bfs_levels(offsets: &[u64], targets: &[u64], root: usize) -> Vec<u64> {
    let mut level = vec![u64::MAX; offsets.len() - 1];
    let mut frontier = vec![root];
    level[root] = 0;
    let mut depth = 0;
    while !frontier.is_empty() {
        depth += 1;
        let mut next = Vec::new();
        for u in frontier {
            for &v in &targets[offsets[u] as usize..offsets[u + 1] as usize] {
                if level[v as usize] == u64::MAX {
                    level[v as usize] = depth;
                    next.push(v as usize);
                }
            }
        }
        frontier = next;
    }
    level
}

/// A BFS run by a device job over a Graph500 graph in managed memory (the
/// CSR arrays), at each oversubscription factor, with the policy off and
/// on, against the graph fully resident; the levels are checked against
/// the CPU's own BFS.
fn bfs_rows(scale: u32) -> Result<Vec<WorkloadRow>, BenchError> {
    let (offsets, targets) = rmat_csr(scale);
    // The root: the vertex with the most edges (it is in the big component).
    let root = (0..offsets.len() - 1).max_by_key(|&u| offsets[u + 1] - offsets[u]).unwrap_or(0);
    let want = bfs_levels(&offsets, &targets, root);
    let bytes: Vec<u8> =
        offsets.iter().chain(targets.iter()).flat_map(|x| x.to_ne_bytes()).collect();
    let n = offsets.len() - 1;
    let run = |factor: Option<f64>, mode: Mode| -> Result<Run, BenchError> {
        let (levels, run) = device_run(&bytes, factor, mode, |ctx, base| {
            let at = |i: usize| VirtAddr::new(base + 8 * i);
            let mut level = vec![u64::MAX; n];
            let mut frontier = vec![root];
            level[root] = 0;
            let mut depth = 0;
            while !frontier.is_empty() {
                depth += 1;
                let mut next = Vec::new();
                for u in frontier {
                    let (s, e) = (ctx.read_u64(at(u))?, ctx.read_u64(at(u + 1))?);
                    for k in s..e {
                        let v = ctx.read_u64(at(n + 1 + k as usize))? as usize;
                        if level[v] == u64::MAX {
                            level[v] = depth;
                            next.push(v);
                        }
                    }
                }
                frontier = next;
            }
            Ok(level)
        })?;
        if levels != want {
            return Err(BenchError::Server("the device's BFS levels differ from the CPU's".into()));
        }
        Ok(run)
    };
    let resident_ms = run(None, Mode::Resident)?.ms;
    let mut rows = Vec::new();
    for factor in FACTORS {
        for mode in [Mode::Demand, Mode::Policy] {
            let r = run(Some(factor), mode)?;
            rows.push(WorkloadRow {
                pattern: "bfs",
                factor,
                policy: mode.name().into(),
                accesses: targets.len() + 2 * n,
                ms: r.ms,
                migrations: r.migrations,
                evicted: r.evicted,
                decisions: r.decisions,
                resident_ms,
            });
        }
    }
    Ok(rows)
}

/// Pages of the read-mostly table.
const TABLE_PAGES: usize = 256;

/// A table two devices and the CPU read in turn, `rounds` times: with demand
/// faults (each device takes the pages it reads, so they go round), and
/// with the table advised read-mostly (each device keeps copies). Its
/// baseline is the devices mapping the table where it is.
fn read_mostly(rounds: usize) -> Result<Vec<WorkloadRow>, BenchError> {
    let baseline = read_mostly_run(rounds, Mode::Resident)?.0;
    let mut rows = Vec::new();
    for mode in [Mode::Demand, Mode::Policy] {
        let (ms, migrations, decisions) = read_mostly_run(rounds, mode)?;
        rows.push(WorkloadRow {
            pattern: "read-mostly",
            factor: 0.0,
            policy: mode.name().into(),
            accesses: 3 * rounds * TABLE_PAGES,
            ms,
            migrations,
            evicted: 0,
            decisions,
            resident_ms: baseline,
        });
    }
    Ok(rows)
}

/// `Resident` here: the devices map the table where it is (accessed-by).
fn read_mostly_run(rounds: usize, mode: Mode) -> Result<(f64, u64, PlacementStats), BenchError> {
    let hmm = Hmm::new().map_err(hmm_err)?;
    let devs = [
        SoftwareDevice::new(&hmm, SoftwareDeviceConfig::new("a", TABLE_PAGES * PAGE_SIZE)),
        SoftwareDevice::new(&hmm, SoftwareDeviceConfig::new("b", TABLE_PAGES * PAGE_SIZE)),
    ];
    let devs: Vec<SoftwareDevice> = devs.into_iter().collect::<Result<_, _>>().map_err(hmm_err)?;
    let r = working_set(&hmm, TABLE_PAGES)?;
    let p = placement(&hmm, mode)?;
    let advise = |a: Advice| p.advise(r.range(), a).map_err(|e| BenchError::Server(e.to_string()));
    match mode {
        Mode::Resident => {
            for d in &devs {
                advise(Advice::AccessedBy(d.memory().id()))?;
            }
        }
        Mode::Policy => advise(Advice::ReadMostly)?,
        _ => {}
    }
    for d in &devs {
        d.set_placement(Some(p.clone()));
    }
    let base = r.range().start().get();
    let t = Instant::now();
    let mut bad = 0usize;
    for _ in 0..rounds {
        for d in &devs {
            let (got, _) = d
                .run(1, r.range().start(), |ctx| {
                    let mut bad = 0usize;
                    for i in 0..TABLE_PAGES {
                        let v = ctx.read_u64(VirtAddr::new(base + i * PAGE_SIZE))?;
                        bad += usize::from(v != word(i));
                    }
                    Ok(bad)
                })
                .map_err(hmm_err)?;
            bad += got[0];
        }
        for i in 0..TABLE_PAGES {
            let mut b = [0u8; 8];
            r.read(i * PAGE_SIZE, &mut b).map_err(|e| BenchError::Server(e.to_string()))?;
            bad += usize::from(u64::from_ne_bytes(b) != word(i));
        }
    }
    let ms = t.elapsed().as_secs_f64() * 1e3;
    if bad != 0 {
        return Err(BenchError::Server(format!("the read-mostly table read {bad} wrong words")));
    }
    let migrations = devs
        .iter()
        .map(|d| {
            let s = d.stats();
            s.migrated_to_device + s.migrated_to_system + s.migrated_to_peer
        })
        .sum();
    for d in &devs {
        d.set_placement(None);
    }
    Ok((ms, migrations, p.stats()))
}

/// The CPU reading pages in a Zipf order (a byte per access), with the set
/// unlimited and then kept within each budget on a compressed tier; each
/// budgeted run starts once the set fits. `factor` holds the budget's share.
fn budgets(pages: usize, quick: bool) -> Result<Vec<WorkloadRow>, BenchError> {
    let reps = if quick { 4 } else { 16 };
    let base = accesses("zipf", pages);
    let order: Vec<usize> = (0..reps).flat_map(|_| base.iter().copied()).collect();
    let (unlimited, ..) = budget_run(pages, &order, None)?;
    let mut rows = Vec::new();
    for share in BUDGETS {
        let (ms, stats) = budget_run(pages, &order, Some(share))?;
        let stats = stats.expect("a budgeted run");
        rows.push(WorkloadRow {
            pattern: "budget",
            factor: share,
            policy: format!("zipf, {} promoted, {:.0}/s", stats.promoted, stats.promotion_rate),
            accesses: order.len(),
            ms,
            migrations: stats.demoted + stats.promoted,
            evicted: stats.demoted,
            decisions: PlacementStats::default(),
            resident_ms: unlimited,
        });
    }
    Ok(rows)
}

fn budget_run(
    pages: usize,
    order: &[usize],
    share: Option<f64>,
) -> Result<(f64, Option<hmm::policy::BudgetStats>), BenchError> {
    let hmm = Hmm::new().map_err(hmm_err)?;
    let tier = hmm_compressed::CompressedDevice::new(
        &hmm,
        hmm_compressed::CompressedConfig::new("tier", pages * PAGE_SIZE),
    )
    .map_err(hmm_err)?;
    let r = working_set(&hmm, pages)?;
    let p = Placement::new(&hmm).map_err(|e| BenchError::Server(e.to_string()))?;
    let limit = share.map(|f| (pages as f64 * f) as usize);
    let budget = match limit {
        Some(l) => Some(
            p.set_budget(&[r.range()], tier.memory(), BudgetConfig::new(l * PAGE_SIZE))
                .map_err(|e| BenchError::Server(e.to_string()))?,
        ),
        None => None,
    };
    if let Some(l) = limit {
        let deadline = Instant::now() + std::time::Duration::from_secs(30);
        while r.residency_map().counts().get(&hmm::Place::System).copied().unwrap_or(0) > l {
            if Instant::now() > deadline {
                return Err(BenchError::Server("the budget did not fit the set in 30 s".into()));
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }
    let t = Instant::now();
    let mut bad = 0usize;
    for &i in order {
        let b = r.touch_read(i * PAGE_SIZE).map_err(|e| BenchError::Server(e.to_string()))?;
        bad += usize::from(b != word(i).to_ne_bytes()[0]);
    }
    let ms = t.elapsed().as_secs_f64() * 1e3;
    if bad != 0 {
        return Err(BenchError::Server(format!("the CPU read {bad} wrong bytes under a budget")));
    }
    let stats = match &budget {
        Some(b) => b.next_scan(std::time::Duration::from_secs(10)),
        None => None,
    };
    Ok((ms, stats))
}

fn find<'a>(
    rows: &'a [WorkloadRow],
    pattern: &str,
    factor: f64,
    policy: &str,
) -> Option<&'a WorkloadRow> {
    rows.iter().find(|r| r.pattern == pattern && r.factor == factor && r.policy == policy)
}

/// The goals, each against this run's rows.
fn goals(rows: &[WorkloadRow]) -> Vec<Goal> {
    let mut out = Vec::new();
    if let (Some(d), Some(p)) =
        (find(rows, "stream", 0.5, "demand"), find(rows, "stream", 0.5, "policy"))
    {
        let x = d.ms / p.ms;
        out.push(Goal {
            goal: "prefetch at least 2x faster than demand faulting on the stream",
            met: Some(x >= 2.0),
            detail: format!(
                "{x:.2}x ({:.1} ms against {:.1} ms; {} and {} migrations)",
                p.ms, d.ms, p.migrations, d.migrations
            ),
        });
    }
    let demand = rows.iter().find(|r| r.pattern == "ping-pong" && r.policy == "no mitigation");
    let best = rows
        .iter()
        .filter(|r| r.pattern == "ping-pong" && r.policy != "no mitigation")
        .min_by_key(|r| r.migrations);
    if let (Some(d), Some(b)) = (demand, best) {
        let fewer = d.migrations as f64 / (b.migrations.max(1)) as f64;
        out.push(Goal {
            goal: "ping-pong with mitigation: at least 5x fewer migrations, and faster",
            met: Some(fewer >= 5.0 && b.ms < d.ms),
            detail: format!(
                "{fewer:.1}x fewer ({} against {}) with \"{}\", {:.1} ms against {:.1} ms",
                b.migrations, d.migrations, b.policy, b.ms, d.ms
            ),
        });
    }
    if let Some(z) = find(rows, "zipf", 1.5, "policy") {
        let x = z.ms / z.resident_ms;
        out.push(Goal {
            goal: "Zipf at 1.5x oversubscription within 1.5x of the fully resident time",
            met: Some(x <= 1.5),
            detail: format!("{x:.2}x ({:.1} ms against {:.1} ms resident)", z.ms, z.resident_ms),
        });
    }
    if let (Some(lru), Some(fifo)) =
        (find(rows, "zipf", 1.5, "policy"), find(rows, "zipf", 1.5, "policy, FIFO eviction"))
    {
        let x = fifo.migrations as f64 / lru.migrations.max(1) as f64;
        out.push(Goal {
            goal: "recency eviction at least 1.5x fewer migrations than FIFO on Zipf",
            met: Some(x >= 1.5),
            detail: format!(
                "{x:.2}x fewer at 1.5x oversubscription ({} against {})",
                lru.migrations, fifo.migrations
            ),
        });
    }
    if let Some(b) = rows.iter().find(|r| r.pattern == "budget" && r.factor == 0.5) {
        let x = b.ms / b.resident_ms;
        out.push(Goal {
            goal: "with the budget at 50%, Zipf within 1.3x of unlimited time on the compressed tier",
            met: Some(x <= 1.3),
            detail: format!(
                "{x:.2}x ({:.1} ms against {:.1} ms unlimited; {})",
                b.ms, b.resident_ms, b.policy
            ),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_read_what_they_say() {
        let stream = accesses("stream", 64);
        assert_eq!(stream.len(), 128);
        assert!(stream.iter().enumerate().all(|(i, p)| *p == i % 64));
        let random = accesses("random", 64);
        assert_eq!(random.len(), 16 * 64);
        assert!(random.iter().all(|p| *p < 64));
        // Zipf (s = 0.99) over 1024 pages: the most popular page takes
        // about 1/H(1024) ≈ 13% of the draws, and the top 1% of pages
        // well over a third; a uniform draw would give them 0.1% and 1%.
        let zipf = accesses("zipf", 1024);
        let mut counts = vec![0usize; 1024];
        zipf.iter().for_each(|p| counts[*p] += 1);
        counts.sort_unstable_by(|a, b| b.cmp(a));
        let share = |n: usize| counts[..n].iter().sum::<usize>() as f64 / zipf.len() as f64;
        assert!((0.09..0.18).contains(&share(1)), "top page: {}", share(1));
        assert!(share(10) > 0.35, "top 10 pages: {}", share(10));
        // Popularity is not address order.
        let hottest = (0..1024).max_by_key(|p| zipf.iter().filter(|x| *x == p).count()).unwrap();
        assert_ne!(hottest, 0);
    }

    #[test]
    fn the_graph_is_a_well_formed_undirected_csr_and_the_search_reaches_its_root_component() {
        let (offsets, targets) = rmat_csr(8);
        let n = offsets.len() - 1;
        assert_eq!(n, 256);
        assert_eq!(*offsets.last().unwrap() as usize, targets.len());
        assert!(offsets.windows(2).all(|w| w[0] <= w[1]));
        let has = |u: usize, v: u64| {
            targets[offsets[u] as usize..offsets[u + 1] as usize].binary_search(&v).is_ok()
        };
        for u in 0..n {
            for &v in &targets[offsets[u] as usize..offsets[u + 1] as usize] {
                assert_ne!(v as usize, u, "no self-loops");
                assert!(has(v as usize, u as u64), "edge {u}-{v} both ways");
            }
        }
        // Skewed degrees, as R-MAT makes them.
        let max = (0..n).map(|u| offsets[u + 1] - offsets[u]).max().unwrap();
        assert!(max as f64 > 4.0 * targets.len() as f64 / n as f64, "max degree {max}");
        let root = (0..n).max_by_key(|&u| offsets[u + 1] - offsets[u]).unwrap();
        let level = bfs_levels(&offsets, &targets, root);
        assert_eq!(level[root], 0);
        // Every reached vertex but the root has a neighbour one level up.
        for v in (0..n).filter(|&v| v != root && level[v] != u64::MAX) {
            let up = targets[offsets[v] as usize..offsets[v + 1] as usize]
                .iter()
                .any(|&u| level[u as usize] + 1 == level[v]);
            assert!(up, "vertex {v} at level {}", level[v]);
        }
        assert!(level.iter().filter(|l| **l != u64::MAX).count() > n / 2);
    }

    fn row(
        pattern: &'static str,
        factor: f64,
        policy: &str,
        ms: f64,
        migrations: u64,
    ) -> WorkloadRow {
        WorkloadRow {
            pattern,
            factor,
            policy: policy.into(),
            accesses: 1,
            ms,
            migrations,
            evicted: 0,
            decisions: PlacementStats::default(),
            resident_ms: 10.0,
        }
    }

    #[test]
    fn goals_are_judged_on_the_rows() {
        let rows = vec![
            row("stream", 0.5, "demand", 100.0, 10),
            row("stream", 0.5, "policy", 40.0, 10),
            row("ping-pong", 0.0, "no mitigation", 50.0, 1000),
            row("ping-pong", 0.0, "policy", 60.0, 100),
            row("zipf", 1.5, "policy", 14.0, 10),
            row("zipf", 1.5, "policy, FIFO eviction", 20.0, 12),
            row("budget", 0.5, "zipf", 20.0, 12),
        ];
        let g = goals(&rows);
        let met: Vec<Option<bool>> = g.iter().map(|g| g.met).collect();
        // 2.5x faster; 10x fewer but slower; 1.4x resident; FIFO only 1.2x
        // more; the budget 2x unlimited.
        assert_eq!(
            met,
            vec![Some(true), Some(false), Some(true), Some(false), Some(false)],
            "{g:?}"
        );
    }
}
