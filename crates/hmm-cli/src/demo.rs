//! `hmm demo`: the workload the HMM postings describe, end to end on a
//! software device.
//!
//! 1. The CPU builds a data set in memory hmm manages: a binary search tree
//!    of plain Rust nodes (linked by `&Node` references) in hmm's arena, and
//!    a large array of words.
//! 2. The program gives placement hints: the tree and most of the array go
//!    to the device, the head of the array stays in system memory (the
//!    device reads it where it is), and the output array goes to the device.
//! 3. A device job computes over the array (writing the output array) and
//!    walks the tree by following the pointers the CPU stored, through the
//!    shared address space: nothing is copied or translated for it.
//!    Meanwhile the CPU computes the same results on its own.
//! 4. The CPU reads the results: the output array, and the tree through its
//!    own `&Node` references, which fault the pages back as they are touched.
//! 5. Everything is checked against the CPU's own computation.
//!
//! It prints what happened: time per phase, pages and bytes moved each way,
//! faults on each side, and the residency map of each range after each
//! phase.

use std::cell::Cell;
use std::time::{Duration, Instant};

use hmm::observe::human_bytes;
use hmm::trace::Category;
use hmm::{Hmm, HmmError, ManagedRange, PAGE_SIZE, Place, VirtAddr};
use hmm_swdev::{DeviceContext, SoftwareDevice, SoftwareDeviceConfig};

/// How big the demo is.
#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// Nodes in the search tree the CPU builds.
    #[arg(long, default_value_t = 300_000, value_parser = clap::value_parser!(u64).range(1..=50_000_000))]
    pub nodes: u64,
    /// Size of the array, in MiB.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=16_384))]
    pub array_mib: u64,
    /// Device worker threads.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=64))]
    pub workers: u64,
    /// Seed of the data set.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Where the data goes: `software` (a device that computes on it),
    /// `compressed` (a compressed-memory tier that keeps the cold part), or
    /// `redis` (a remote tier on a Redis server: `redis=URL` for one of
    /// yours, or a redis-server the demo starts on a unix socket).
    #[arg(long, default_value = "software", value_parser = parse_device)]
    pub device: DemoDevice,
}

/// The device of `hmm demo`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DemoDevice {
    /// The software device: a device job computes on the data set.
    Software,
    /// The compressed tier: the cold part of the data set is compressed
    /// away, and CPU touches bring it back.
    Compressed,
    /// The Redis tier: the cold part goes to a Redis server (this URL, or
    /// one the demo starts).
    Redis(Option<String>),
}

fn parse_device(s: &str) -> Result<DemoDevice, String> {
    match s {
        "software" => Ok(DemoDevice::Software),
        "compressed" => Ok(DemoDevice::Compressed),
        "redis" => Ok(DemoDevice::Redis(None)),
        _ => match s.strip_prefix("redis=") {
            Some(url) if !url.is_empty() => Ok(DemoDevice::Redis(Some(url.to_string()))),
            _ => Err(format!(
                "{s:?} is no device: give software, compressed, redis, or redis=URL (redis://host:port, unix:///path)"
            )),
        },
    }
}

/// The tier of a tier demo.
enum Tier {
    Compressed(hmm_compressed::CompressedDevice),
    /// The device, and the server the demo started (if it did), which
    /// outlives it (fields drop in order).
    Redis {
        device: hmm_redis::RedisDevice,
        _server: Option<hmm_redis::LocalServer>,
    },
}

impl Tier {
    fn migrate(&self, r: hmm::PageRange) -> Result<hmm::MigrationReport, HmmError> {
        match self {
            Tier::Compressed(d) => d.migrate_to_device(r),
            Tier::Redis { device: d, .. } => d.migrate_to_device(r),
        }
    }

    fn id(&self) -> hmm::DeviceId {
        match self {
            Tier::Compressed(d) => d.memory().id(),
            Tier::Redis { device: d, .. } => d.memory().id(),
        }
    }

    /// What the tier holds, in a line.
    fn holds(&self) -> String {
        match self {
            Tier::Compressed(d) => {
                let s = d.stats();
                format!(
                    "  the tier holds {} of data in {} ({} compressed): {:.2}x, {:.2}x counting the allocator's waste\n",
                    human_bytes(s.logical_bytes()),
                    human_bytes(s.footprint_bytes),
                    human_bytes(s.compressed_bytes),
                    s.compression_ratio().unwrap_or(0.0),
                    s.effective_ratio().unwrap_or(0.0),
                )
            }
            Tier::Redis { device: d, .. } => {
                let s = d.stats();
                format!(
                    "  Redis holds {} pages under {}*, {} zero pages are flags here\n",
                    s.stored_pages,
                    d.key_prefix(),
                    s.zero_pages
                )
            }
        }
    }
}

/// One node of the search tree. `repr(C)`, so the device knows where each
/// field is; a link is a plain reference, which is a pointer (null for
/// `None`): the device follows it as the CPU does.
#[repr(C)]
struct Node<'a> {
    key: u64,
    value: u64,
    left: Cell<Option<&'a Node<'a>>>,
    right: Cell<Option<&'a Node<'a>>>,
}

const KEY: usize = std::mem::offset_of!(Node<'static>, key);
const VALUE: usize = std::mem::offset_of!(Node<'static>, value);
const LEFT: usize = std::mem::offset_of!(Node<'static>, left);
const RIGHT: usize = std::mem::offset_of!(Node<'static>, right);

/// A phase of the demo being timed, and traced when recording is on.
struct Phase {
    name: &'static str,
    start: Instant,
    span: Option<hmm::trace::Span>,
}

/// A run with at least this many nodes takes long enough (seconds to
/// minutes) that its progress is shown on stderr.
const LONG_RUN: u64 = 1_000_000;

impl Phase {
    /// Starts a phase; `long` says so on stderr, where a long run shows its
    /// progress.
    fn start(name: &'static str, long: bool) -> Self {
        if long {
            eprintln!("hmm demo: {name}...");
        }
        Self { name, start: Instant::now(), span: hmm::trace::span(name, Category::Phase) }
    }

    /// Ends the phase: its name, how long it took, and `what` happened.
    fn end(self, what: String) -> (&'static str, Duration, String) {
        let took = self.start.elapsed();
        drop(self.span);
        (self.name, took, what)
    }
}

/// A duration in milliseconds, or seconds from 10 s on: at most 10
/// characters for any run (a table column stays aligned).
fn human_duration(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1e3;
    if ms < 10_000.0 { format!("{ms:.1} ms") } else { format!("{:.1} s", ms / 1e3) }
}

/// Progress through a long loop on stderr: a bar on a terminal, a line at
/// each tenth elsewhere; nothing for a short run.
struct Steps {
    bar: indicatif::ProgressBar,
    what: &'static str,
    total: u64,
    done: u64,
    /// Where the next line is printed (not on a terminal).
    next_line: Option<u64>,
}

impl Steps {
    fn new(what: &'static str, total: u64, long: bool) -> Self {
        use std::io::IsTerminal;
        let tty = long && std::io::stderr().is_terminal();
        let bar = if tty {
            let b = indicatif::ProgressBar::new(total);
            if let Ok(style) = indicatif::ProgressStyle::with_template(
                "  [{elapsed_precise}] {bar:30} {pos}/{len} {msg}",
            ) {
                b.set_style(style);
            }
            b.set_message(what);
            b
        } else {
            indicatif::ProgressBar::hidden()
        };
        let next_line = (long && !tty).then_some(total / 10);
        Self { bar, what, total, done: 0, next_line }
    }

    /// One more done.
    fn one(&mut self) {
        self.done += 1;
        if self.done.is_multiple_of(1 << 16) {
            self.bar.set_position(self.done);
        }
        if let Some(at) = self.next_line
            && self.done >= at.max(1)
        {
            eprintln!(
                "  {}: {} of {} ({}%)",
                self.what,
                self.done,
                self.total,
                self.done * 100 / self.total.max(1)
            );
            self.next_line = Some(at + (self.total / 10).max(1));
        }
    }
}

impl Drop for Steps {
    fn drop(&mut self) {
        self.bar.finish_and_clear();
    }
}

/// What the device and the CPU each compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
struct Results {
    /// Sum of the values of the tree's nodes, wrapping.
    tree_sum: u64,
    /// Nodes visited.
    tree_nodes: u64,
    /// Sum of the output array, wrapping.
    out_sum: u64,
}

/// A fast mixing function: the array's contents and the node values.
fn mix(seed: u64, i: u64) -> u64 {
    let mut x = seed ^ i.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    x ^= x >> 30;
    x = x.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// What the job computes for each word of the array.
fn transform(x: u64) -> u64 {
    x.rotate_left(17).wrapping_mul(3) ^ (x >> 11)
}

/// The keys in insertion order: a permutation of `0..n` (so the tree is
/// about balanced), from `seed`.
fn keys(n: u64, seed: u64) -> Vec<u64> {
    let mut k: Vec<u64> = (0..n).collect();
    for i in (1..k.len()).rev() {
        let j = (mix(seed ^ 0xA5A5, i as u64) % (i as u64 + 1)) as usize;
        k.swap(i, j);
    }
    k
}

fn value_of(seed: u64, key: u64) -> u64 {
    mix(seed ^ 0x7777, key) >> 8
}

/// Runs the demo, printing as it goes; an error says what went wrong.
pub fn run(args: &DemoArgs, out: &mut dyn FnMut(&str)) -> Result<(), String> {
    match args.device {
        DemoDevice::Software => run_software(args, out),
        _ => run_tier(args, out),
    }
}

/// One line of the tier demo's log: text of the kind a server keeps, about
/// 3:1 compressible.
fn log_line(seed: u64, i: u64) -> String {
    let x = mix(seed ^ 0x1095, i);
    let verb = ["GET", "GET", "GET", "PUT", "POST", "DELETE"][(x % 6) as usize];
    let status = [200, 200, 200, 200, 304, 404, 500][((x >> 8) % 7) as usize];
    format!(
        "{i:010} user{:05} {verb} /items/{:06}?v={} {status} {}\n",
        (x >> 16) % 50_000,
        (x >> 32) % 1_000_000,
        (x >> 52) % 10,
        (x >> 20) % 65_536,
    )
}

/// FNV-1a over `bytes`.
fn fnv(bytes: &[u8]) -> u64 {
    bytes
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3))
}

/// The demo on a tier (compressed, or Redis): the CPU builds the search
/// tree and a log of text records; the cold part (the tree, and the log
/// but for its last quarter) goes to the tier; the CPU then walks the tree
/// and reads the whole log, its touches bringing pages back; everything is
/// checked against what was built.
fn run_tier(args: &DemoArgs, out: &mut dyn FnMut(&str)) -> Result<(), String> {
    use hmm_compressed::{CompressedConfig, CompressedDevice};
    let e = |what: &str| {
        let what = what.to_string();
        move |err: HmmError| format!("{what}: {err}")
    };
    let n = args.nodes;
    let log_len = ((args.array_mib as usize) << 20).next_multiple_of(PAGE_SIZE);
    let seed = args.seed;
    let node_bytes = std::mem::size_of::<Node<'static>>();
    let arena_len = (n as usize * node_bytes).next_multiple_of(PAGE_SIZE) + PAGE_SIZE;
    let capacity = (log_len + arena_len).next_multiple_of(1 << 20);
    let long = n >= LONG_RUN;

    let hmm = Hmm::new().map_err(e("cannot start hmm"))?;
    let (tier, what) = match &args.device {
        DemoDevice::Redis(url) => {
            let (server, url) = match url {
                Some(u) => (None, u.clone()),
                None => {
                    let s = hmm_redis::LocalServer::start().map_err(|why| {
                        format!("no Redis server to use: {why} (or give --device redis=URL)")
                    })?;
                    let u = s.url().to_string();
                    (Some(s), u)
                }
            };
            let d = hmm_redis::RedisDevice::new(
                &hmm,
                hmm_redis::RedisConfig::new("cold0", &url, capacity),
            )
            .map_err(e("cannot make the Redis tier"))?;
            let whose =
                if server.is_some() { "a redis-server of the demo's own" } else { "your server" };
            let what = format!(
                "Redis tier cold0 at {url} ({whose}), up to {}",
                human_bytes(capacity as u64)
            );
            (Tier::Redis { device: d, _server: server }, what)
        }
        _ => {
            let d = CompressedDevice::new(&hmm, CompressedConfig::new("cold0", capacity))
                .map_err(e("cannot make the compressed tier"))?;
            let what = format!(
                "compressed tier cold0, up to {} of memory, {}, pages over {} bytes declined",
                human_bytes(capacity as u64),
                d.algorithm(),
                hmm_compressed::DEFAULT_THRESHOLD
            );
            (Tier::Compressed(d), what)
        }
    };
    out(&format!(
        "hmm demo: a search tree of {n} nodes ({}) in hmm's arena and a log of {} of text\n\
         device: {what}\n\n",
        human_bytes((n as usize * node_bytes) as u64),
        human_bytes(log_len as u64),
    ));
    let mut phases: Vec<(&str, Duration, String)> = Vec::new();

    // 1. Build.
    let phase = Phase::start("build (CPU)", long);
    let arena = hmm.arena(arena_len).map_err(e("cannot make the arena"))?;
    let log = hmm.alloc(log_len).map_err(e("cannot allocate the log"))?;
    let root = build_tree(&arena, n, seed, long)?;
    let mut text = Vec::with_capacity(log_len);
    let mut lines = 0u64;
    while text.len() < log_len {
        text.extend_from_slice(log_line(seed, lines).as_bytes());
        lines += 1;
    }
    text.truncate(log_len);
    log.write(0, &text).map_err(|err| format!("cannot write the log: {err}"))?;
    let want_log = fnv(&text);
    drop(text);
    let (want_tree, want_nodes) = walk(root);
    phases.push(phase.end(format!("{n} nodes linked, {lines} log lines written")));
    let tree_range = arena.range();
    let ranges: [(&str, hmm::PageRange); 2] = [("tree", tree_range), ("log", log.range())];
    let show_maps = |out: &mut dyn FnMut(&str), when: &str| show_maps(&hmm, &ranges, out, when);

    // 2. The cold part goes to the tier.
    let phase = Phase::start("move the cold part to cold0", long);
    let hot = (log_len / 4).next_multiple_of(PAGE_SIZE).min(log_len);
    let cold: Vec<(&str, hmm::PageRange)> = [
        ("tree", Some(tree_range)),
        ("log (all but its last quarter)", hmm::PageRange::new(log.addr(), log_len - hot).ok()),
    ]
    .into_iter()
    .filter_map(|(w, r)| r.map(|r| (w, r)))
    .collect();
    let mut moved = 0;
    let mut declined = 0;
    for (what, r) in &cold {
        let rep = tier.migrate(*r).map_err(e("moving to the tier failed"))?;
        let d =
            rep.skipped.iter().filter(|(_, w)| matches!(w, hmm::SkipReason::Declined(_))).count();
        declined += d;
        if let Some((addr, why)) =
            rep.skipped.iter().find(|(_, w)| !matches!(w, hmm::SkipReason::Declined(_)))
        {
            out(&format!("  note: pages of the {what} stayed put ({addr}: {why})\n"));
        }
        moved += rep.migrated;
    }
    phases.push(
        phase.end(format!("{moved} pages on the tier, {declined} declined (incompressible)")),
    );
    out(&tier.holds());
    show_maps(out, "after the move to the tier");

    // 3. The CPU uses all of it: touches bring pages back.
    let phase = Phase::start("use (CPU)", long);
    let faults_before = hmm.fault_stats().0;
    let (tree_sum, tree_nodes) = walk(root);
    let mut back = vec![0u8; log_len];
    log.read(0, &mut back).map_err(|err| format!("cannot read the log: {err}"))?;
    let log_sum = fnv(&back);
    let faults = hmm.fault_stats().0 - faults_before;
    phases.push(phase.end(format!("{faults} CPU faults brought pages back as they were touched")));
    show_maps(out, "after the CPU used the data");

    print_phases(out, &phases);
    print_legend(out, "cold0", tier.id());
    let checks = [
        ("tree sum walked by the CPU", tree_sum, want_tree),
        ("tree nodes walked by the CPU", tree_nodes, want_nodes),
        ("log checksum read back by the CPU", log_sum, want_log),
    ];
    let failed = print_checks(out, &checks);
    if failed.is_empty() {
        out("\nevery byte came back as it was built\n");
        Ok(())
    } else {
        Err(format!("data differ from what was built: {}", failed.join("; ")))
    }
}

/// The demo on the software device (see the module docs).
fn run_software(args: &DemoArgs, out: &mut dyn FnMut(&str)) -> Result<(), String> {
    let e = |what: &str| {
        let what = what.to_string();
        move |err: HmmError| format!("{what}: {err}")
    };
    let n = args.nodes;
    let array_len = (args.array_mib as usize) << 20;
    let words = array_len / 8;
    let workers = args.workers as usize;
    let seed = args.seed;
    let node_bytes = std::mem::size_of::<Node<'static>>();
    let arena_len = (n as usize * node_bytes).next_multiple_of(PAGE_SIZE) + PAGE_SIZE;
    let capacity = (2 * array_len + arena_len).next_multiple_of(1 << 20);

    let hmm = Hmm::new().map_err(e("cannot start hmm"))?;
    let gpu = SoftwareDevice::new(&hmm, SoftwareDeviceConfig::new("gpu0", capacity))
        .map_err(e("cannot make the software device"))?;
    out(&format!(
        "hmm demo: a search tree of {n} nodes ({}) in hmm's arena and an array of {}\n\
         device: software device gpu0, {} of memory, {} engine, {workers} worker(s)\n\n",
        human_bytes((n as usize * node_bytes) as u64),
        human_bytes(array_len as u64),
        human_bytes(capacity as u64),
        gpu.engine_name(),
    ));
    let mut phases: Vec<(&str, Duration, String)> = Vec::new();
    let long = n >= LONG_RUN;

    // 1. Build.
    let phase = Phase::start("build (CPU)", long);
    let arena = hmm.arena(arena_len).map_err(e("cannot make the arena"))?;
    let array = hmm.alloc(array_len).map_err(e("cannot allocate the array"))?;
    let output = hmm.alloc(array_len).map_err(e("cannot allocate the output"))?;
    let root = build_tree(&arena, n, seed, long)?;
    write_array(&array, seed).map_err(|err| format!("cannot write the array: {err}"))?;
    phases.push(phase.end(format!("{n} nodes linked, {words} words written")));
    let tree_range = arena.range();
    let ranges: [(&str, hmm::PageRange); 3] =
        [("tree", tree_range), ("array", array.range()), ("output", output.range())];
    let show_maps = |out: &mut dyn FnMut(&str), when: &str| show_maps(&hmm, &ranges, out, when);
    show_maps(out, "after build");

    // 2. Placement hints.
    let phase = Phase::start("place (hints to gpu0)", long);
    let head = (array_len / 4).next_multiple_of(PAGE_SIZE).min(array_len);
    let hints: Vec<(&str, hmm::PageRange)> = [
        ("tree", Some(tree_range)),
        (
            "array (all but its first quarter)",
            hmm::PageRange::new(VirtAddr::new(array.addr().get() + head), array_len - head).ok(),
        ),
        ("output", Some(output.range())),
    ]
    .into_iter()
    .filter_map(|(w, r)| r.map(|r| (w, r)))
    .collect();
    let mut moved = 0;
    for (what, r) in &hints {
        let rep = gpu.migrate_to_device(*r).map_err(e("placement failed"))?;
        if let Some((addr, why)) = rep.skipped.first() {
            out(&format!(
                "  note: {} pages of the {what} stayed put ({addr}: {why})\n",
                rep.skipped.len()
            ));
        }
        moved += rep.migrated;
    }
    phases.push(
        phase.end(format!(
            "{moved} pages migrated; the array's first quarter stays in system memory"
        )),
    );
    show_maps(out, "after placement");

    // 3. The device job, and the CPU's own computation meanwhile.
    let phase = Phase::start("device job (+ CPU meanwhile)", long);
    let faults_before = hmm.fault_stats().0;
    let job_args = JobArgs {
        root: VirtAddr::new(std::ptr::from_ref(root).addr()),
        keys: n,
        array: array.addr(),
        output: output.addr(),
        words,
    };
    let (device, cpu, cpu_time) = std::thread::scope(|s| {
        let job = s.spawn(|| gpu.run(workers, job_args.root, |ctx| device_job(ctx, &job_args)));
        let c = Instant::now();
        let cpu = reference(n, seed, words);
        let cpu_time = c.elapsed();
        let dev = job.join().map_err(|_| "the device job panicked".to_string());
        (dev, cpu, cpu_time)
    });
    let (parts, counters) = device?.map_err(e("the device job failed"))?;
    let mut device_results = Results::default();
    for p in &parts {
        device_results.tree_sum = device_results.tree_sum.wrapping_add(p.tree_sum);
        device_results.tree_nodes += p.tree_nodes;
        device_results.out_sum = device_results.out_sum.wrapping_add(p.out_sum);
    }
    phases.push(phase.end(format!(
            "device: {} tree nodes summed (each worker walking from the root), {} words; {} device faults; CPU reference took {} ms",
            device_results.tree_nodes,
            words,
            counters.faults,
            cpu_time.as_millis()
        )));
    let cpu_faults_during_job = hmm.fault_stats().0 - faults_before;
    show_maps(out, "after the device job");

    // 4. The CPU reads the results: they fault back.
    let phase = Phase::start("read back (CPU)", long);
    let faults_before = hmm.fault_stats().0;
    let out_sum = sum_output(&output).map_err(|err| format!("cannot read the output: {err}"))?;
    let (tree_sum, tree_nodes) = walk(root);
    let cpu_faults = hmm.fault_stats().0 - faults_before;
    phases.push(
        phase.end(format!("{cpu_faults} CPU faults brought the pages back as they were touched")),
    );
    show_maps(out, "after the CPU read the results");

    // 5. Check.
    let checks = [
        ("tree sum, device vs CPU", device_results.tree_sum, cpu.tree_sum),
        ("tree nodes, device vs CPU", device_results.tree_nodes, cpu.tree_nodes),
        ("output sum, device vs CPU", device_results.out_sum, cpu.out_sum),
        ("output sum read back by the CPU", out_sum, cpu.out_sum),
        ("tree sum walked by the CPU", tree_sum, cpu.tree_sum),
        ("tree nodes walked by the CPU", tree_nodes, cpu.tree_nodes),
    ];

    print_phases(out, &phases);
    let s = gpu.stats();
    out(&format!(
        "\n  pages migrated: {} to the device ({}), {} back to system memory ({})\n\
         \x20 faults: {} on the CPU side ({} during the job), {} on the device side\n",
        s.migrated_to_device,
        human_bytes(s.bytes_to_device),
        s.migrated_to_system,
        human_bytes(s.bytes_to_system),
        cpu_faults + cpu_faults_during_job,
        cpu_faults_during_job,
        counters.faults,
    ));
    print_legend(out, "gpu0", gpu.memory().id());
    let failed = print_checks(out, &checks);
    if failed.is_empty() {
        out("\nevery result matches the CPU-only computation\n");
        Ok(())
    } else {
        Err(format!("results differ from the CPU-only computation: {}", failed.join("; ")))
    }
}

/// Builds the search tree of `n` nodes (keys from `seed`) in `arena`,
/// showing progress on a long run; returns its root.
fn build_tree(arena: &hmm::Arena, n: u64, seed: u64, long: bool) -> Result<&Node<'_>, String> {
    let mut root: Option<&Node<'_>> = None;
    let mut built = Steps::new("nodes linked", n, long);
    for &k in &keys(n, seed) {
        built.one();
        let node: &Node<'_> = arena
            .alloc(Node {
                key: k,
                value: value_of(seed, k),
                left: Cell::new(None),
                right: Cell::new(None),
            })
            .map_err(|err| format!("cannot place a node: {err}"))?;
        insert(&mut root, node);
    }
    root.ok_or_else(|| "the tree is empty".into())
}

/// The residency map of each of `ranges`, `when`. The last fault-around
/// windows of a phase may still be coming back: the map shows where pages
/// are once they have arrived.
fn show_maps(hmm: &Hmm, ranges: &[(&str, hmm::PageRange)], out: &mut dyn FnMut(&str), when: &str) {
    if let Err(e) = hmm.settle(std::time::Duration::from_secs(10)) {
        out(&format!("  note: {e}\n"));
    }
    out(&format!("  residency {when}:\n"));
    for (name, r) in ranges {
        let m = hmm.residency_map(*r);
        out(&format!("    {name:<6} [{}]\n", m.render(64)));
    }
}

/// The table of phases: name, time, what happened.
fn print_phases(out: &mut dyn FnMut(&str), phases: &[(&str, Duration, String)]) {
    let w = phases.iter().map(|(name, ..)| name.len()).max().unwrap_or(0).max("phase".len());
    out(&format!("\n  {:<w$} {:>10}  what happened\n", "phase", "time"));
    for (name, d, what) in phases {
        out(&format!("  {name:<w$} {:>10}  {what}\n", human_duration(*d)));
    }
}

/// What the residency maps' symbols mean, `device` being the demo's device.
fn print_legend(out: &mut dyn FnMut(&str), device: &str, id: hmm::DeviceId) {
    out(&format!(
        "  residency legend: {} system memory, {} {device}, {} never touched, {} migrating\n\n",
        Place::System.symbol(),
        Place::Device(id).symbol(),
        Place::Unpopulated.symbol(),
        Place::Migrating.symbol(),
    ));
}

/// Prints each check (`what`, got, want) as ok or FAIL; returns the failed
/// ones, described.
fn print_checks(out: &mut dyn FnMut(&str), checks: &[(&str, u64, u64)]) -> Vec<String> {
    let mut failed = Vec::new();
    for &(what, got, want) in checks {
        let ok = got == want;
        let mark = if ok { "ok  " } else { "FAIL" };
        if what.contains("nodes") {
            out(&format!("  {mark} {what}: {got}\n"));
        } else {
            out(&format!("  {mark} {what}: {got:#018x}\n"));
        }
        if !ok {
            failed.push(format!("{what}: got {got:#x}, want {want:#x}"));
        }
    }
    failed
}

/// Inserts `node` into the tree at `root` (plain Rust: the CPU's side).
fn insert<'a>(root: &mut Option<&'a Node<'a>>, node: &'a Node<'a>) {
    let Some(mut at) = *root else {
        *root = Some(node);
        return;
    };
    loop {
        let link = if node.key < at.key { &at.left } else { &at.right };
        match link.get() {
            Some(next) => at = next,
            None => {
                link.set(Some(node));
                return;
            }
        }
    }
}

/// The CPU walks the tree through its references (pages on the device
/// fault back as they are touched): sum of values and node count.
fn walk(root: &Node<'_>) -> (u64, u64) {
    let mut stack = vec![root];
    let (mut sum, mut count) = (0u64, 0u64);
    while let Some(n) = stack.pop() {
        sum = sum.wrapping_add(n.value);
        count += 1;
        stack.extend(n.left.get());
        stack.extend(n.right.get());
    }
    (sum, count)
}

fn write_array(array: &ManagedRange, seed: u64) -> Result<(), hmm::RangeError> {
    const CHUNK: usize = 1 << 16;
    let mut buf = vec![0u8; CHUNK];
    for off in (0..array.len()).step_by(CHUNK) {
        let n = CHUNK.min(array.len() - off);
        for (k, w) in buf[..n].chunks_exact_mut(8).enumerate() {
            w.copy_from_slice(&mix(seed, ((off / 8) + k) as u64).to_ne_bytes());
        }
        array.write(off, &buf[..n])?;
    }
    Ok(())
}

fn sum_output(output: &ManagedRange) -> Result<u64, hmm::RangeError> {
    const CHUNK: usize = 1 << 16;
    let mut buf = vec![0u8; CHUNK];
    let mut sum = 0u64;
    for off in (0..output.len()).step_by(CHUNK) {
        let n = CHUNK.min(output.len() - off);
        output.read(off, &mut buf[..n])?;
        for w in buf[..n].chunks_exact(8) {
            sum = sum.wrapping_add(u64::from_ne_bytes(w.try_into().expect("8 bytes")));
        }
    }
    Ok(sum)
}

/// The CPU-only computation, from the seed alone.
fn reference(n: u64, seed: u64, words: usize) -> Results {
    let mut r = Results { tree_nodes: n, ..Results::default() };
    for k in 0..n {
        r.tree_sum = r.tree_sum.wrapping_add(value_of(seed, k));
    }
    for i in 0..words as u64 {
        r.out_sum = r.out_sum.wrapping_add(transform(mix(seed, i)));
    }
    r
}

/// Where the device job finds its data.
struct JobArgs {
    root: VirtAddr,
    keys: u64,
    array: VirtAddr,
    output: VirtAddr,
    words: usize,
}

/// One device worker: its share of the array (read, transformed, written to
/// the output) and its share of the keys (the tree walked by following the
/// links the CPU stored, pruned to the worker's keys).
fn device_job(ctx: &mut DeviceContext<'_>, a: &JobArgs) -> Result<Results, HmmError> {
    let (w, ws) = (ctx.worker() as u64, ctx.workers() as u64);
    let mut r = Results::default();
    // The array, in blocks.
    const BLOCK: usize = 1 << 16;
    let first = a.words as u64 * w / ws;
    let last = a.words as u64 * (w + 1) / ws;
    let mut buf = vec![0u8; BLOCK];
    let mut word = first;
    while word < last {
        let n = (BLOCK as u64 / 8).min(last - word) as usize;
        let off = word as usize * 8;
        ctx.read(VirtAddr::new(a.array.get() + off), &mut buf[..n * 8])?;
        for x in buf[..n * 8].chunks_exact_mut(8) {
            let y = transform(u64::from_ne_bytes((&*x).try_into().expect("8 bytes")));
            r.out_sum = r.out_sum.wrapping_add(y);
            x.copy_from_slice(&y.to_ne_bytes());
        }
        ctx.write(VirtAddr::new(a.output.get() + off), &buf[..n * 8])?;
        word += n as u64;
    }
    // The tree: keys in [lo, hi).
    let (lo, hi) = (a.keys * w / ws, a.keys * (w + 1) / ws);
    let mut stack = vec![a.root.get() as u64];
    while let Some(at) = stack.pop() {
        let node = at as usize;
        let key = ctx.read_u64(VirtAddr::new(node + KEY))?;
        if (lo..hi).contains(&key) {
            r.tree_sum = r.tree_sum.wrapping_add(ctx.read_u64(VirtAddr::new(node + VALUE))?);
            r.tree_nodes += 1;
        }
        if lo < key {
            let left = ctx.read_u64(VirtAddr::new(node + LEFT))?;
            if left != 0 {
                stack.push(left);
            }
        }
        if key + 1 < hi {
            let right = ctx.read_u64(VirtAddr::new(node + RIGHT))?;
            if right != 0 {
                stack.push(right);
            }
        }
    }
    Ok(r)
}
