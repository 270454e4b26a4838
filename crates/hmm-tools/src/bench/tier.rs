//! The tiers' figures: the compressed tier (`hmm-compressed`) on real data
//! and on the zram anchor's data, measured after the migration figures in
//! the same run.
//!
//! | key | what |
//! | --- | --- |
//! | `compressed_ratio`, `compressed_effective_ratio` | files shipped by the machine's packages (`/usr/bin`, `/usr/share`: binaries and text nobody here wrote), 64 MiB (16 MiB when quick), compressed with lz4: uncompressed over compressed bytes, and over the memory the tier takes (the allocator's waste included; pages declined as incompressible stay out of both) |
//! | `compressed_declined_share` | the share of those pages declined as incompressible |
//! | `compressed_program_ratio`, `_effective_ratio`, `_declined_share` | the same on a real program's memory image: the heap and anonymous memory of CPython holding a table of 120,000 records (30,000 when quick), read through `/proc/<pid>/mem` (root; `null` without `python3` or the rights) |
//! | `migrate_to_compressed_gbps` | migrating those files' pages into the tier (two workers), GB/s |
//! | `compressed_fault_back_us_p50`, `_p99` | a random CPU touch of a page of the zram anchor's data on the tier, `FaultMode::Service`, no fault-around |
//! | `compressed_fault_back_in_thread_us_p50`, `_p99` | the same in `FaultMode::InThread` (decompressed in the faulting thread) |
//! | `compressed_fault_back_seq_gbps` | the same data touched in order, default fault-around, `FaultMode::Service`, GB/s |
//! | `redis_get_us_p50` | a bare `GET` of one page from a `redis-server` the run starts on a unix socket, median (the anchor of the Redis tier's fault-back) |
//! | `redis_set_pipelined_gbps` | a bare loop of pipelined `SET`s (256 pages a pipeline) of 64 MiB (16 MiB when quick), GB/s (the anchor of its migration) |
//! | `redis_fault_back_us_p50`, `_p99` | a random CPU touch of a page on the Redis tier, `FaultMode::Service`, no fault-around |
//! | `migrate_to_redis_gbps` | the same bytes migrated to the Redis tier, GB/s |
//!
//! The Redis figures need `redis-server` on `PATH`; without it they are
//! `null` (and the run says why).

use std::path::{Path, PathBuf};
use std::time::Instant;

use hmm::PAGE_SIZE;
use hmm::space::{FaultMode, Hmm, HmmConfig};
use hmm_compressed::{CompressedConfig, CompressedDevice};
use serde::Serialize;

use super::{BenchError, BenchOptions, Row, gbps, hmm_err, shuffled, touch_latency_us};

/// The tiers' figures (see the module docs); `None` where not measured.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Default)]
pub struct TierFigures {
    /// Real data: uncompressed over compressed bytes.
    pub compressed_ratio: Option<f64>,
    /// Real data: uncompressed over the memory the tier takes.
    pub compressed_effective_ratio: Option<f64>,
    /// Real data: the share of pages declined as incompressible.
    pub compressed_declined_share: Option<f64>,
    /// Real data migrated into the tier, GB/s.
    pub migrate_to_compressed_gbps: Option<f64>,
    /// A real program's memory image: uncompressed over compressed bytes.
    pub compressed_program_ratio: Option<f64>,
    /// The same over the tier's memory.
    pub compressed_program_effective_ratio: Option<f64>,
    /// The share of its pages declined.
    pub compressed_program_declined_share: Option<f64>,
    /// Random fault-back from the tier, service mode, median, microseconds.
    pub compressed_fault_back_us_p50: Option<f64>,
    /// The same, 99th percentile.
    pub compressed_fault_back_us_p99: Option<f64>,
    /// Random fault-back from the tier, in-thread mode, median, microseconds.
    pub compressed_fault_back_in_thread_us_p50: Option<f64>,
    /// The same, 99th percentile.
    pub compressed_fault_back_in_thread_us_p99: Option<f64>,
    /// Sequential fault-back from the tier, GB/s.
    pub compressed_fault_back_seq_gbps: Option<f64>,
    /// A bare one-page `GET`, median, microseconds.
    pub redis_get_us_p50: Option<f64>,
    /// A bare loop of pipelined `SET`s, GB/s.
    pub redis_set_pipelined_gbps: Option<f64>,
    /// Random fault-back from the Redis tier, median, microseconds.
    pub redis_fault_back_us_p50: Option<f64>,
    /// The same, 99th percentile.
    pub redis_fault_back_us_p99: Option<f64>,
    /// Migration to the Redis tier, GB/s.
    pub migrate_to_redis_gbps: Option<f64>,
}

impl TierFigures {
    /// One row per figure.
    pub fn rows(&self) -> Vec<Row> {
        let row = |key, value, unit, what| Row { key, value, unit, what };
        vec![
            row(
                "compressed_ratio",
                self.compressed_ratio,
                "x",
                "lz4 on package files: bytes over compressed bytes",
            ),
            row(
                "compressed_effective_ratio",
                self.compressed_effective_ratio,
                "x",
                "the same over the tier's memory, waste included",
            ),
            row(
                "compressed_declined_share",
                self.compressed_declined_share,
                "",
                "package-file pages declined (incompressible)",
            ),
            row(
                "migrate_to_compressed_gbps",
                self.migrate_to_compressed_gbps,
                "GB/s",
                "package files into the compressed tier",
            ),
            row(
                "compressed_fault_back_us_p50",
                self.compressed_fault_back_us_p50,
                "us",
                "random fault-back from the tier, median",
            ),
            row(
                "compressed_fault_back_us_p99",
                self.compressed_fault_back_us_p99,
                "us",
                "random fault-back from the tier, 99th percentile",
            ),
            row(
                "compressed_fault_back_in_thread_us_p50",
                self.compressed_fault_back_in_thread_us_p50,
                "us",
                "the same in FaultMode::InThread, median",
            ),
            row(
                "compressed_fault_back_in_thread_us_p99",
                self.compressed_fault_back_in_thread_us_p99,
                "us",
                "the same in FaultMode::InThread, 99th percentile",
            ),
            row(
                "compressed_fault_back_seq_gbps",
                self.compressed_fault_back_seq_gbps,
                "GB/s",
                "the tier's pages touched in order",
            ),
            row(
                "compressed_program_ratio",
                self.compressed_program_ratio,
                "x",
                "lz4 on a CPython heap image: bytes over compressed bytes",
            ),
            row(
                "compressed_program_effective_ratio",
                self.compressed_program_effective_ratio,
                "x",
                "the same over the tier's memory, waste included",
            ),
            row(
                "compressed_program_declined_share",
                self.compressed_program_declined_share,
                "",
                "CPython heap pages declined (incompressible)",
            ),
            row(
                "redis_get_us_p50",
                self.redis_get_us_p50,
                "us",
                "bare GET of one page from redis-server, median",
            ),
            row(
                "redis_set_pipelined_gbps",
                self.redis_set_pipelined_gbps,
                "GB/s",
                "bare pipelined SETs of pages",
            ),
            row(
                "redis_fault_back_us_p50",
                self.redis_fault_back_us_p50,
                "us",
                "random fault-back from the Redis tier, median",
            ),
            row(
                "redis_fault_back_us_p99",
                self.redis_fault_back_us_p99,
                "us",
                "random fault-back from the Redis tier, 99th percentile",
            ),
            row(
                "migrate_to_redis_gbps",
                self.migrate_to_redis_gbps,
                "GB/s",
                "the same bytes into the Redis tier",
            ),
        ]
    }
}

/// Up to `bytes` of the regular files under `roots`, read in path order
/// (deterministic on one machine), padded with zeros to whole pages;
/// with the number of files read.
fn package_files(roots: &[&str], bytes: usize) -> (Vec<u8>, usize) {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>, limit: usize) {
        let Ok(rd) = std::fs::read_dir(dir) else { return };
        let mut entries: Vec<_> = rd.flatten().map(|e| e.path()).collect();
        entries.sort();
        for p in entries {
            if out.len() >= limit {
                return;
            }
            let Ok(meta) = std::fs::symlink_metadata(&p) else { continue };
            if meta.is_dir() {
                walk(&p, out, limit);
            } else if meta.is_file() && meta.len() > 0 {
                out.push(p);
            }
        }
    }
    let mut files = Vec::new();
    for r in roots {
        walk(Path::new(r), &mut files, 100_000);
    }
    let mut data = Vec::with_capacity(bytes);
    let mut read = 0;
    for f in files {
        if data.len() >= bytes {
            break;
        }
        let Ok(b) = std::fs::read(&f) else { continue };
        let take = b.len().min(bytes - data.len());
        data.extend_from_slice(&b[..take]);
        read += 1;
    }
    data.resize(data.len().div_ceil(PAGE_SIZE) * PAGE_SIZE, 0);
    (data, read)
}

/// The program whose memory image the compressed tier's second ratio is
/// measured on: CPython building a table of records (strings, floats,
/// lists), as a service keeps its state, then waiting for its stdin to close.
const PROGRAM: &str = r#"
import random, sys
random.seed(1)
words = "the quick brown fox jumps over a lazy dog page cache memory tier kernel process thread".split()
table = {}
for i in range(int(sys.argv[1])):
    table[f"user:{i}"] = {
        "name": " ".join(random.choice(words) for _ in range(3)),
        "score": random.random(),
        "tags": [random.randint(0, 1000) for _ in range(4)],
    }
sys.stdout.write("ready\n")
sys.stdout.flush()
sys.stdin.read()
"#;

/// Up to `bytes` of the private writable memory (heap and anonymous
/// mappings) of a real program, [`PROGRAM`] run by `python3`, read through
/// `/proc/<pid>/mem` once it has built its table. Root (or ptrace rights
/// over the child) and `python3` are needed; otherwise why not.
fn program_image(bytes: usize, records: usize) -> Result<Vec<u8>, String> {
    use std::io::{BufRead, Write};
    use std::os::unix::fs::FileExt;
    let mut child = std::process::Command::new("python3")
        .args(["-c", PROGRAM, &records.to_string()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run python3: {e}"))?;
    let result = (|| {
        let out = child.stdout.take().ok_or("no stdout")?;
        let mut line = String::new();
        std::io::BufReader::new(out).read_line(&mut line).map_err(|e| e.to_string())?;
        if line.trim() != "ready" {
            return Err(format!("python3 said {line:?}, not ready"));
        }
        let pid = child.id();
        let maps =
            std::fs::read_to_string(format!("/proc/{pid}/maps")).map_err(|e| e.to_string())?;
        let mem = std::fs::File::open(format!("/proc/{pid}/mem"))
            .map_err(|e| format!("cannot read the program's memory (root needed): {e}"))?;
        let mut image = Vec::with_capacity(bytes);
        for l in maps.lines() {
            let f: Vec<&str> = l.split_whitespace().collect();
            let anonymous = f.len() == 5 || f.get(5) == Some(&"[heap]");
            if f.len() < 5 || f[1] != "rw-p" || !anonymous {
                continue;
            }
            let Some((a, b)) = f[0].split_once('-') else { continue };
            let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) else {
                continue;
            };
            let mut at = a;
            while at < b && image.len() < bytes {
                let mut page = vec![0u8; PAGE_SIZE];
                if mem.read_at(&mut page, at).is_ok_and(|n| n == PAGE_SIZE) {
                    image.extend_from_slice(&page);
                }
                at += PAGE_SIZE as u64;
            }
        }
        Ok(image)
    })();
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(b"");
    }
    let _ = child.kill();
    let _ = child.wait();
    result
}

/// Compresses `data` on a compressed tier and checks it comes back:
/// (ratio, effective ratio, declined share, migration GB/s).
fn ratios(data: &[u8], name: &str) -> Result<(Option<f64>, Option<f64>, f64, f64), BenchError> {
    let hmm = Hmm::new().map_err(hmm_err)?;
    let r = hmm.alloc(data.len()).map_err(hmm_err)?;
    r.write(0, data).map_err(hmm::os::mm::MmError::from)?;
    let dev =
        CompressedDevice::new(&hmm, CompressedConfig::new(name, data.len())).map_err(hmm_err)?;
    let t = Instant::now();
    let rep = dev.migrate_to_device(r.range()).map_err(hmm_err)?;
    let elapsed = t.elapsed();
    let s = dev.stats();
    tracing::info!(name, bytes = data.len(), ?s, "data on the compressed tier");
    let pages = data.len() / PAGE_SIZE;
    let mut got = vec![0u8; data.len()];
    r.read(0, &mut got).map_err(hmm::os::mm::MmError::from)?;
    if got != data {
        return Err(BenchError::Server(format!(
            "the compressed tier gave back other bytes ({name})"
        )));
    }
    Ok((
        s.compression_ratio(),
        s.effective_ratio(),
        s.declined_pages as f64 / pages as f64,
        gbps(rep.migrated * PAGE_SIZE, elapsed),
    ))
}

/// `pages` pages of the zram anchor's data.
fn anchor_data(pages: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut out = vec![0u8; pages * PAGE_SIZE];
    for p in out.chunks_exact_mut(PAGE_SIZE) {
        super::zram::anchor_page(&mut x, p);
    }
    out
}

/// Random touches of `pages` pages of the anchor's data on a compressed
/// tier, with `mode` and no fault-around: (median, 99th percentile).
fn random_fault_back(mode: FaultMode, pages: usize) -> Result<(f64, f64), BenchError> {
    let config = HmmConfig { fault_mode: mode, fault_around_pages: 1, ..HmmConfig::default() };
    let hmm = Hmm::with_config(config).map_err(hmm_err)?;
    let r = hmm.alloc(pages * PAGE_SIZE).map_err(hmm_err)?;
    r.write(0, &anchor_data(pages)).map_err(hmm::os::mm::MmError::from)?;
    let dev = CompressedDevice::new(&hmm, CompressedConfig::new("bench-z", pages * PAGE_SIZE))
        .map_err(hmm_err)?;
    let rep = dev.migrate_to_device(r.range()).map_err(hmm_err)?;
    if rep.migrated != pages {
        return Err(BenchError::Server(format!(
            "the compressed tier took {} of {pages} pages: {:?}",
            rep.migrated,
            rep.skipped.first()
        )));
    }
    let order = shuffled((0..pages).collect(), 0x2545_f491_4f6c_dd1d);
    let lat = touch_latency_us(r.mapping(), &order, |p| {
        matches!(r.residency(p), hmm::Residency::Device(_))
    })
    .map_err(hmm::os::mm::MmError::from)?;
    drop((r, dev, hmm));
    Ok(lat)
}

/// The Redis figures (see the module docs), on a server of the run's own.
fn redis_figures(f: &mut TierFigures, size: usize, pages: usize) -> Result<(), BenchError> {
    let server = match hmm_redis::LocalServer::start() {
        Ok(s) => s,
        Err(why) => {
            tracing::warn!("the Redis figures are skipped: {why}");
            return Ok(());
        }
    };
    let rerr = |e: redis::RedisError| BenchError::Server(format!("redis: {e}"));
    let mut c = redis::Client::open(server.url()).and_then(|c| c.get_connection()).map_err(rerr)?;
    // The anchors: one GET at a time, and pipelined SETs.
    let page = vec![0x5Au8; PAGE_SIZE];
    let _: () = redis::cmd("SET").arg("bench:page").arg(&page).query(&mut c).map_err(rerr)?;
    let mut lat = Vec::with_capacity(pages);
    for _ in 0..pages {
        let t = Instant::now();
        let v: Vec<u8> = redis::cmd("GET").arg("bench:page").query(&mut c).map_err(rerr)?;
        lat.push(t.elapsed().as_secs_f64() * 1e6);
        std::hint::black_box(v);
    }
    lat.sort_by(f64::total_cmp);
    f.redis_get_us_p50 = Some(super::quantile(&lat, 0.5));
    let data = anchor_data(size / PAGE_SIZE);
    let t = Instant::now();
    for (b, chunk) in data.chunks(256 * PAGE_SIZE).enumerate() {
        let mut p = redis::pipe();
        for (k, pg) in chunk.chunks(PAGE_SIZE).enumerate() {
            p.set(format!("bench:{b}:{k}"), pg).ignore();
        }
        p.query::<()>(&mut c).map_err(rerr)?;
    }
    f.redis_set_pipelined_gbps = Some(gbps(size, t.elapsed()));
    let _: () = redis::cmd("FLUSHALL").query(&mut c).map_err(rerr)?;

    // The tier: migration, then random fault-back.
    let config =
        HmmConfig { fault_mode: FaultMode::Service, fault_around_pages: 1, ..HmmConfig::default() };
    let hmm = Hmm::with_config(config).map_err(hmm_err)?;
    let r = hmm.alloc(size).map_err(hmm_err)?;
    r.write(0, &data).map_err(hmm::os::mm::MmError::from)?;
    let dev = hmm_redis::RedisDevice::new(
        &hmm,
        hmm_redis::RedisConfig::new("bench-redis", server.url(), size),
    )
    .map_err(hmm_err)?;
    let t = Instant::now();
    let rep = dev.migrate_to_device(r.range()).map_err(hmm_err)?;
    let elapsed = t.elapsed();
    if rep.migrated * PAGE_SIZE != size {
        return Err(BenchError::Server(format!(
            "the Redis tier took {} of {} pages",
            rep.migrated,
            size / PAGE_SIZE
        )));
    }
    f.migrate_to_redis_gbps = Some(gbps(size, elapsed));
    let order = shuffled((0..size / PAGE_SIZE).collect(), 0x2545_f491_4f6c_dd1d);
    let order = &order[..pages.min(order.len())];
    let (p50, p99) = touch_latency_us(r.mapping(), order, |p| {
        matches!(r.residency(p), hmm::Residency::Device(_))
    })
    .map_err(hmm::os::mm::MmError::from)?;
    f.redis_fault_back_us_p50 = Some(p50);
    f.redis_fault_back_us_p99 = Some(p99);
    let mut got = vec![0u8; PAGE_SIZE];
    r.read(order[0] * PAGE_SIZE, &mut got).map_err(hmm::os::mm::MmError::from)?;
    if got[..] != data[order[0] * PAGE_SIZE..(order[0] + 1) * PAGE_SIZE] {
        return Err(BenchError::Server("the Redis tier gave back other bytes".into()));
    }
    drop((r, dev, hmm));
    Ok(())
}

/// Measures the tiers' figures.
pub fn run(opts: BenchOptions) -> Result<TierFigures, BenchError> {
    let mut f = TierFigures::default();
    let size = if opts.quick { 16 << 20 } else { 64 << 20 };

    // Real data: files of the machine's packages.
    let (data, files) = package_files(&["/usr/bin", "/usr/share"], size);
    if data.len() >= size / 4 {
        tracing::info!(files, "package files read");
        let (ratio, effective, declined, gbps) = ratios(&data, "bench-files")?;
        f.compressed_ratio = ratio;
        f.compressed_effective_ratio = effective;
        f.compressed_declined_share = Some(declined);
        f.migrate_to_compressed_gbps = Some(gbps);
    } else {
        tracing::warn!(bytes = data.len(), "too few package files for the compressed tier's ratio");
    }
    // A real program's memory image.
    match program_image(size, if opts.quick { 30_000 } else { 120_000 }) {
        Ok(image) if image.len() >= size / 8 => {
            let (ratio, effective, declined, _) = ratios(&image, "bench-program")?;
            f.compressed_program_ratio = ratio;
            f.compressed_program_effective_ratio = effective;
            f.compressed_program_declined_share = Some(declined);
        }
        Ok(image) => {
            tracing::warn!(bytes = image.len(), "the program's image is too small to measure")
        }
        Err(why) => tracing::warn!("the program-image ratio is skipped: {why}"),
    }

    // The zram anchor's data: random and sequential fault-back.
    let pages = if opts.quick { 2_000 } else { 20_000 };
    let (p50, p99) = random_fault_back(FaultMode::Service, pages)?;
    f.compressed_fault_back_us_p50 = Some(p50);
    f.compressed_fault_back_us_p99 = Some(p99);
    if hmm::probe::probe().has("sigbus-mode") {
        let (p50, p99) = random_fault_back(FaultMode::InThread, pages)?;
        f.compressed_fault_back_in_thread_us_p50 = Some(p50);
        f.compressed_fault_back_in_thread_us_p99 = Some(p99);
    }
    {
        let config = HmmConfig { fault_mode: FaultMode::Service, ..HmmConfig::default() };
        let hmm = Hmm::with_config(config).map_err(hmm_err)?;
        let r = hmm.alloc(pages * PAGE_SIZE).map_err(hmm_err)?;
        let want = anchor_data(pages);
        r.write(0, &want).map_err(hmm::os::mm::MmError::from)?;
        let dev = CompressedDevice::new(&hmm, CompressedConfig::new("bench-zs", r.len()))
            .map_err(hmm_err)?;
        dev.migrate_to_device(r.range()).map_err(hmm_err)?;
        let t = Instant::now();
        let mut sum = 0u64;
        for p in 0..pages {
            sum += u64::from(
                r.mapping().touch_read(p * PAGE_SIZE).map_err(hmm::os::mm::MmError::from)?,
            );
        }
        f.compressed_fault_back_seq_gbps = Some(gbps(r.len(), t.elapsed()));
        let want_sum: u64 = (0..pages).map(|p| u64::from(want[p * PAGE_SIZE])).sum();
        if sum != want_sum {
            return Err(BenchError::Server("sequential fault-back read other bytes".into()));
        }
    }
    redis_figures(&mut f, size, pages.min(5_000))?;
    Ok(f)
}
