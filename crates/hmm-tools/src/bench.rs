//! The benchmark's baselines: what every later figure is compared to.
//!
//! Each figure is measured in the same run as the baselines, so reports can give
//! ratios that hold on a noisy shared machine. Baselines:
//!
//! | key | what |
//! | --- | --- |
//! | `memcpy_gbps` | one core copying 256 MiB between populated buffers (median of runs) |
//! | `kernel_first_touch_us` | a first write to a never-touched anonymous 4 KiB page (mean over a range) |
//! | `uffd_roundtrip_us_p50`, `_p99` | a bare MISSING fault served by a thread blocked in `read(2)` with `UFFDIO_COPY`, as the faulting thread sees it |
//! | `uffd_move_gbps` | 256 MiB of populated 4 KiB pages in one `UFFDIO_MOVE` |
//! | `pagemap_scan_mpages_s` | `PAGEMAP_SCAN` over 256 MiB in which every other page is present (one region per page, the worst case) |
//! | `checked_read_gbps` | 256 MiB of populated memory read 64 KiB at a time with the checked copy devices use (`hmm::os::vm::read_memory`: a copy whose faults are fixed up, or `process_vm_readv`) and summed as u64 words: the software device's job of `device_access_gbps` without the device, the floor of its reads of system memory |
//! | `sigbus_roundtrip_us_p50`, `_p99` | a bare MISSING fault in SIGBUS mode, served in the faulting thread's own handler by one `UFFDIO_MOVE` of a populated page: the floor of `FaultMode::InThread` |
//! | `zram_swapin_us_p50`, `_p99` | a random swap-in of a compressible page that `MADV_PAGEOUT` put on a zram (lz4) device of the run's own; only with `--zram`, as root ([`zram`]) |
//! | `zram_swapin_seq_gbps` | the same pages paged out again and touched in order |
//!
//! A figure this kernel cannot measure (no `UFFDIO_MOVE`, say) is `null`.

use std::thread;
use std::time::{Duration, Instant};

use serde::Serialize;

pub mod series;
pub mod tier;
pub mod workloads;
pub mod zram;

use hmm::addr::{PAGE_SIZE, PageRange};
use hmm::os::mm::{Advise, Mapping, MmError, Protection};
use hmm::os::pagemap::{Pagemap, PagemapError, ScanRequest};
use hmm::os::uffd::{Features, FillError, RegisterMode, Uffd, UffdError, UffdEvent, UffdOptions};

/// How long to measure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct BenchOptions {
    /// Fewer repetitions: finishes in a few seconds.
    pub quick: bool,
    /// Also measure the zram swap-in anchor ([`zram`]): changes the
    /// machine's swap configuration for the run, so only when asked.
    pub zram: bool,
}

/// A step of the run, for progress display.
#[derive(Debug, Clone, Copy)]
pub struct Step {
    /// What is being measured.
    pub name: &'static str,
    /// Index of this step (from 0).
    pub index: usize,
    /// Number of steps.
    pub total: usize,
}

/// Errors that stop the benchmark.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A mapping could not be made or advised.
    #[error(transparent)]
    Mm(#[from] MmError),
    /// userfaultfd failed.
    #[error(transparent)]
    Uffd(#[from] UffdError),
    /// A fill ioctl failed.
    #[error(transparent)]
    Fill(#[from] FillError),
    /// A page-table scan failed.
    #[error(transparent)]
    Pagemap(#[from] PagemapError),
    /// The fault-serving thread failed.
    #[error("the fault-serving thread failed: {0}")]
    Server(String),
    /// The fork measurement failed.
    #[error("fork with device pages: {0}")]
    Fork(String),
}

/// The baseline figures (JSON keys are the field names).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Baselines {
    /// One-core memcpy of 256 MiB, GB/s (10^9 bytes per second).
    pub memcpy_gbps: f64,
    /// Kernel anonymous first-touch fault, microseconds per 4 KiB page.
    pub kernel_first_touch_us: f64,
    /// userfaultfd MISSING round trip served with `UFFDIO_COPY`, median, microseconds.
    pub uffd_roundtrip_us_p50: Option<f64>,
    /// The same, 99th percentile.
    pub uffd_roundtrip_us_p99: Option<f64>,
    /// userfaultfd MISSING fault in SIGBUS mode served in the faulting
    /// thread's handler with one `UFFDIO_MOVE`, median, microseconds.
    pub sigbus_roundtrip_us_p50: Option<f64>,
    /// The same, 99th percentile.
    pub sigbus_roundtrip_us_p99: Option<f64>,
    /// `UFFDIO_MOVE` of 256 MiB in one call, GB/s.
    pub uffd_move_gbps: Option<f64>,
    /// `PAGEMAP_SCAN`, millions of pages per second.
    pub pagemap_scan_mpages_s: Option<f64>,
    /// Populated memory read with the checked copy 64 KiB at a time and
    /// summed (the floor of a software device's reads of system memory), GB/s.
    pub checked_read_gbps: f64,
    /// A random swap-in of an lz4-compressed page from a zram device of the
    /// run's own, median, microseconds (only with `--zram`, as root).
    pub zram_swapin_us_p50: Option<f64>,
    /// The same, 99th percentile.
    pub zram_swapin_us_p99: Option<f64>,
    /// The same pages swapped in in order, GB/s.
    pub zram_swapin_seq_gbps: Option<f64>,
}

/// A row of the human-readable table.
#[derive(Debug, Clone, Copy)]
pub struct Row {
    /// JSON key.
    pub key: &'static str,
    /// Value, if measured.
    pub value: Option<f64>,
    /// Unit.
    pub unit: &'static str,
    /// What was measured.
    pub what: &'static str,
}

impl Baselines {
    /// The figures as table rows, in key order.
    pub fn rows(&self) -> Vec<Row> {
        vec![
            Row {
                key: "memcpy_gbps",
                value: Some(self.memcpy_gbps),
                unit: "GB/s",
                what: "memcpy, one core, 256 MiB",
            },
            Row {
                key: "kernel_first_touch_us",
                value: Some(self.kernel_first_touch_us),
                unit: "us/page",
                what: "kernel anonymous first-touch fault",
            },
            Row {
                key: "uffd_roundtrip_us_p50",
                value: self.uffd_roundtrip_us_p50,
                unit: "us",
                what: "userfaultfd MISSING fault + UFFDIO_COPY, median",
            },
            Row {
                key: "uffd_roundtrip_us_p99",
                value: self.uffd_roundtrip_us_p99,
                unit: "us",
                what: "userfaultfd MISSING fault + UFFDIO_COPY, 99th percentile",
            },
            Row {
                key: "sigbus_roundtrip_us_p50",
                value: self.sigbus_roundtrip_us_p50,
                unit: "us",
                what: "SIGBUS-mode fault + UFFDIO_MOVE in the handler, median",
            },
            Row {
                key: "sigbus_roundtrip_us_p99",
                value: self.sigbus_roundtrip_us_p99,
                unit: "us",
                what: "SIGBUS-mode fault + UFFDIO_MOVE in the handler, 99th percentile",
            },
            Row {
                key: "uffd_move_gbps",
                value: self.uffd_move_gbps,
                unit: "GB/s",
                what: "UFFDIO_MOVE, 256 MiB in one call",
            },
            Row {
                key: "pagemap_scan_mpages_s",
                value: self.pagemap_scan_mpages_s,
                unit: "Mpages/s",
                what: "PAGEMAP_SCAN, every other page present",
            },
            Row {
                key: "checked_read_gbps",
                value: Some(self.checked_read_gbps),
                unit: "GB/s",
                what: "checked reads, 64 KiB at a time, summed",
            },
            Row {
                key: "zram_swapin_us_p50",
                value: self.zram_swapin_us_p50,
                unit: "us",
                what: "random swap-in from zram (--zram), median",
            },
            Row {
                key: "zram_swapin_us_p99",
                value: self.zram_swapin_us_p99,
                unit: "us",
                what: "random swap-in from zram (--zram), 99th percentile",
            },
            Row {
                key: "zram_swapin_seq_gbps",
                value: self.zram_swapin_seq_gbps,
                unit: "GB/s",
                what: "the same pages swapped in in order (--zram)",
            },
        ]
    }
}

const BIG: usize = 256 << 20;

struct Plan {
    memcpy_reps: usize,
    touch_pages: usize,
    touch_reps: usize,
    faults: usize,
    move_reps: usize,
    scan_reps: usize,
}

impl Plan {
    fn new(o: BenchOptions) -> Self {
        if o.quick {
            Plan {
                memcpy_reps: 5,
                touch_pages: 16 << 10,
                touch_reps: 3,
                faults: 2_000,
                move_reps: 2,
                scan_reps: 5,
            }
        } else {
            Plan {
                memcpy_reps: 20,
                touch_pages: 64 << 10,
                touch_reps: 5,
                faults: 20_000,
                move_reps: 6,
                scan_reps: 20,
            }
        }
    }
}

/// Measures every baseline; `progress` is told each step as it starts.
pub fn run_baselines(
    opts: BenchOptions,
    progress: &mut dyn FnMut(Step),
) -> Result<Baselines, BenchError> {
    let plan = Plan::new(opts);
    let total = 5;
    let mut step = |index, name| progress(Step { name, index, total });

    step(0, "memcpy");
    let memcpy_gbps = memcpy_gbps(plan.memcpy_reps)?;
    step(1, "kernel first touch");
    let kernel_first_touch_us = first_touch_us(plan.touch_pages, plan.touch_reps)?;
    step(2, "userfaultfd round trip");
    let rt = uffd_roundtrip_us(plan.faults)?;
    let sigbus = sigbus_roundtrip_us(plan.faults)?;
    step(3, "UFFDIO_MOVE");
    let uffd_move_gbps = uffd_move_gbps(plan.move_reps)?;
    step(4, "PAGEMAP_SCAN");
    let pagemap_scan_mpages_s = pagemap_scan_mpages_s(plan.scan_reps)?;
    let checked_read_gbps = checked_read_gbps(plan.scan_reps)?;
    let zram = if opts.zram {
        step(4, "zram swap-in");
        match zram::swapin(if opts.quick { 2_000 } else { 20_000 }) {
            Ok(a) => {
                tracing::info!(algorithm = %a.algorithm, "zram anchor measured");
                Some(a)
            }
            Err(why) => {
                tracing::warn!("the zram anchor is skipped: {why}");
                None
            }
        }
    } else {
        None
    };
    Ok(Baselines {
        memcpy_gbps,
        kernel_first_touch_us,
        uffd_roundtrip_us_p50: rt.map(|(p50, _)| p50),
        uffd_roundtrip_us_p99: rt.map(|(_, p99)| p99),
        sigbus_roundtrip_us_p50: sigbus.map(|(p50, _)| p50),
        sigbus_roundtrip_us_p99: sigbus.map(|(_, p99)| p99),
        uffd_move_gbps,
        pagemap_scan_mpages_s,
        checked_read_gbps,
        zram_swapin_us_p50: zram.as_ref().map(|a| a.p50),
        zram_swapin_us_p99: zram.as_ref().map(|a| a.p99),
        zram_swapin_seq_gbps: zram.as_ref().map(|a| a.sequential_gbps),
    })
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The `q`-quantile (0..=1) of sorted samples, nearest rank.
/// `items` in a pseudo-random order (xorshift from `seed`), the same every run.
fn shuffled(mut items: Vec<usize>, seed: u64) -> Vec<usize> {
    let mut x = seed;
    for i in (1..items.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        items.swap(i, (x % (i as u64 + 1)) as usize);
    }
    items
}

/// Times a one-byte read of each page of `m` in `order` that `keep` takes,
/// each touch alone: (median, 99th percentile), microseconds.
fn touch_latency_us(
    m: &Mapping,
    order: &[usize],
    mut keep: impl FnMut(usize) -> bool,
) -> Result<(f64, f64), hmm::RangeError> {
    let mut lat = Vec::with_capacity(order.len());
    for &p in order {
        if !keep(p) {
            continue;
        }
        let t = Instant::now();
        std::hint::black_box(m.touch_read(p * PAGE_SIZE)?);
        lat.push(t.elapsed().as_secs_f64() * 1e6);
    }
    lat.sort_by(f64::total_cmp);
    Ok((quantile(&lat, 0.5), quantile(&lat, 0.99)))
}

pub(crate) fn quantile(sorted: &[f64], q: f64) -> f64 {
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

fn gbps(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

fn populated(len: usize) -> Result<Mapping, BenchError> {
    let m = Mapping::anonymous(len, Protection::ReadWrite)?;
    m.advise(m.range(), Advise::NoHugePage)?;
    m.advise(m.range(), Advise::PopulateWrite)?;
    Ok(m)
}

fn memcpy_gbps(reps: usize) -> Result<f64, BenchError> {
    memcpy_of(BIG, reps)
}

/// Median GB/s of a one-core memcpy of `size` bytes between populated
/// 4 KiB-page mappings.
fn memcpy_of(size: usize, reps: usize) -> Result<f64, BenchError> {
    let mut src = populated(size)?;
    let mut dst = populated(size)?;
    src.fill(0, size, 0x5a).expect("inside");
    let mut runs = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        dst.copy_from(0, &mut src, 0, size).expect("inside");
        runs.push(gbps(size, t.elapsed()));
    }
    Ok(median(&mut runs))
}

fn first_touch_us(pages: usize, reps: usize) -> Result<f64, BenchError> {
    let mut runs = Vec::with_capacity(reps);
    for _ in 0..reps {
        let m = Mapping::anonymous(pages * PAGE_SIZE, Protection::ReadWrite)?;
        m.advise(m.range(), Advise::NoHugePage)?;
        let t = Instant::now();
        for p in 0..pages {
            m.touch_write(p * PAGE_SIZE, 1).expect("inside");
        }
        runs.push(t.elapsed().as_secs_f64() * 1e6 / pages as f64);
    }
    Ok(median(&mut runs))
}

/// Round trips of `faults` MISSING faults, each served by a thread blocked in
/// `read(2)` on a blocking descriptor. `None` if userfaultfd is unavailable.
fn uffd_roundtrip_us(faults: usize) -> Result<Option<(f64, f64)>, BenchError> {
    const WARMUP: usize = 32;
    let uffd = match Uffd::open(UffdOptions { nonblocking: false, ..UffdOptions::default() }) {
        Ok(u) => u,
        Err(e) => {
            tracing::warn!(error = %e, "no userfaultfd: round-trip figures are null");
            return Ok(None);
        }
    };
    let n = faults + WARMUP;
    let area = Mapping::anonymous(n * PAGE_SIZE, Protection::ReadWrite)?;
    area.advise(area.range(), Advise::NoHugePage)?;
    uffd.register(&area, area.range(), RegisterMode::MISSING)?;
    let page = vec![0x3cu8; PAGE_SIZE];
    let samples = thread::scope(|s| -> Result<Vec<f64>, BenchError> {
        let server = s.spawn(|| -> Result<(), String> {
            let mut events = Vec::with_capacity(8);
            let mut served = 0;
            let res = (|| {
                while served < n {
                    events.clear();
                    uffd.read_events(&mut events, 8).map_err(|e| e.to_string())?;
                    for ev in events.drain(..) {
                        if let UffdEvent::PageFault { addr, .. } = ev {
                            let dst = PageRange::new(addr.page_down(), PAGE_SIZE)
                                .map_err(|e| e.to_string())?;
                            uffd.copy(dst, &page, false, false).map_err(|e| e.to_string())?;
                            served += 1;
                        }
                    }
                }
                Ok(())
            })();
            if res.is_err() {
                // Unregistering wakes the toucher, whose fault then completes normally.
                let _ = uffd.unregister(area.range());
            }
            res
        });
        let mut samples = Vec::with_capacity(faults);
        for p in 0..n {
            let t = Instant::now();
            let v = area.touch_read(p * PAGE_SIZE).expect("inside");
            let dt = t.elapsed();
            std::hint::black_box(v);
            if p >= WARMUP {
                samples.push(dt.as_secs_f64() * 1e6);
            }
        }
        server
            .join()
            .map_err(|_| BenchError::Server("panicked".into()))?
            .map_err(BenchError::Server)?;
        Ok(samples)
    })?;
    let mut sorted = samples;
    sorted.sort_by(f64::total_cmp);
    Ok(Some((quantile(&sorted, 0.5), quantile(&sorted, 0.99))))
}

/// What [`sigbus_hook`] serves: the registered area's range, and a pool of
/// populated pages, page `i` of the pool moving to page `i` of the area.
struct SigbusAnchor {
    uffd: Uffd,
    area: PageRange,
    pool: Mapping,
}

static SIGBUS_ANCHOR: std::sync::Mutex<Option<SigbusAnchor>> = std::sync::Mutex::new(None);

/// The anchor's `SIGBUS` hook: one `UFFDIO_MOVE`, nothing allocated (the
/// measuring thread never holds the anchor's lock while it touches).
fn sigbus_hook(f: &hmm::os::sigbus::BusFault) -> hmm::os::sigbus::Verdict {
    use hmm::os::sigbus::Verdict;
    let Ok(g) = SIGBUS_ANCHOR.try_lock() else { return Verdict::NotMine };
    let Some(a) = g.as_ref() else { return Verdict::NotMine };
    let page = f.addr.page_down();
    if !a.area.contains(page) {
        return Verdict::NotMine;
    }
    let dst = PageRange::new(page, PAGE_SIZE).expect("one page");
    let Ok(src) = a.pool.subrange(page.get() - a.area.start().get(), PAGE_SIZE) else {
        return Verdict::NotMine;
    };
    match a.uffd.move_pages(dst, &a.pool, src, true, false) {
        Ok(_) => Verdict::Retry,
        Err(_) => Verdict::NotMine,
    }
}

/// The floor of a fault served in the faulting thread: `faults` touches, in
/// random order, of a SIGBUS-mode area, each served by [`sigbus_hook`]:
/// (median, 99th percentile) in microseconds. `None` without SIGBUS mode or
/// `UFFDIO_MOVE`. Run before any instance in `FaultMode::InThread` (the
/// process has one `SIGBUS` hook; such an instance installs its own).
fn sigbus_roundtrip_us(faults: usize) -> Result<Option<(f64, f64)>, BenchError> {
    if !hmm::os::sigbus::reports_access() {
        return Ok(None);
    }
    let opts =
        UffdOptions { required: Features::SIGBUS | Features::MOVE, ..UffdOptions::default() };
    let uffd = match Uffd::open(opts) {
        Ok(u) => u,
        Err(e) => {
            tracing::warn!(error = %e, "no SIGBUS mode: its round-trip figures are null");
            return Ok(None);
        }
    };
    let area = Mapping::anonymous(faults * PAGE_SIZE, Protection::ReadWrite)?;
    area.advise(area.range(), Advise::NoHugePage)?;
    uffd.register(&area, area.range(), RegisterMode::MISSING)?;
    let pool = populated(faults * PAGE_SIZE)?;
    let anchor = SigbusAnchor { uffd, area: area.range(), pool };
    *SIGBUS_ANCHOR.lock().unwrap_or_else(|e| e.into_inner()) = Some(anchor);
    let lat = match hmm::os::sigbus::install(sigbus_hook) {
        Ok(()) => {
            let order = shuffled((0..faults).collect(), 0x9e37_79b9_7f4a_7c15);
            Some(touch_latency_us(&area, &order, |_| true).map_err(MmError::from)?)
        }
        Err(e) => {
            tracing::warn!(error = %e, "no SIGBUS handler: its round-trip figures are null");
            None
        }
    };
    SIGBUS_ANCHOR.lock().unwrap_or_else(|e| e.into_inner()).take();
    Ok(lat)
}

fn uffd_move_gbps(reps: usize) -> Result<Option<f64>, BenchError> {
    let uffd = match Uffd::open(UffdOptions { required: Features::MOVE, ..UffdOptions::default() })
    {
        Ok(u) => u,
        Err(e) => {
            tracing::warn!(error = %e, "no UFFDIO_MOVE: uffd_move_gbps is null");
            return Ok(None);
        }
    };
    let a = populated(BIG)?;
    a.fill(0, BIG, 0x11).expect("inside");
    let b = Mapping::anonymous(BIG, Protection::ReadWrite)?;
    b.advise(b.range(), Advise::NoHugePage)?;
    uffd.register(&a, a.range(), RegisterMode::MISSING)?;
    uffd.register(&b, b.range(), RegisterMode::MISSING)?;
    let mut runs = Vec::with_capacity(reps);
    for i in 0..reps.max(1) {
        let (src, dst) = if i % 2 == 0 { (&a, &b) } else { (&b, &a) };
        let t = Instant::now();
        uffd.move_pages_all(dst.range(), src, src.range(), true, false)?;
        runs.push(gbps(BIG, t.elapsed()));
    }
    Ok(Some(median(&mut runs)))
}

fn pagemap_scan_mpages_s(reps: usize) -> Result<Option<f64>, BenchError> {
    let pm = Pagemap::open()?;
    let m = Mapping::anonymous(BIG, Protection::ReadWrite)?;
    m.advise(m.range(), Advise::NoHugePage)?;
    let pages = BIG / PAGE_SIZE;
    for p in (0..pages).step_by(2) {
        m.touch_write(p * PAGE_SIZE, 1).expect("inside");
    }
    let req = ScanRequest::default();
    let mut runs = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        match pm.scan(m.range(), &req) {
            Ok(regions) => std::hint::black_box(regions),
            Err(PagemapError::Unsupported) => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        runs.push(pages as f64 / t.elapsed().as_secs_f64() / 1e6);
    }
    Ok(Some(median(&mut runs)))
}

/// Median GB/s of reading `BIG` bytes of populated memory 64 KiB at a time
/// with the checked copy, summing each piece as u64 words, as the device job
/// of `device_access_gbps` reads and sums system memory.
fn checked_read_gbps(reps: usize) -> Result<f64, BenchError> {
    let m = populated(BIG)?;
    m.fill(0, BIG, 1).expect("inside");
    let mut buf = vec![0u8; 64 << 10];
    let mut runs = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        let mut sum = 0u64;
        for off in (0..BIG).step_by(buf.len()) {
            let at = hmm::addr::VirtAddr::new(m.addr().get() + off);
            let n = hmm::os::vm::read_memory(at, &mut buf)
                .map_err(|e| BenchError::Server(format!("checked read: {e}")))?;
            if n != buf.len() {
                return Err(BenchError::Server(format!("checked read: {n} bytes")));
            }
            for w in buf.chunks_exact(8) {
                sum = sum.wrapping_add(u64::from_ne_bytes(w.try_into().expect("8 bytes")));
            }
        }
        runs.push(gbps(BIG, t.elapsed()));
        std::hint::black_box(sum);
    }
    Ok(median(&mut runs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_use_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&v, 0.5), 50.0);
        assert_eq!(quantile(&v, 0.99), 99.0);
        assert_eq!(quantile(&v, 1.0), 100.0);
        assert_eq!(quantile(&[7.0], 0.99), 7.0);
        assert_eq!(median(&mut [3.0, 1.0, 2.0]), 2.0);
    }

    #[test]
    fn keys_are_the_documented_names() {
        let b = Baselines {
            memcpy_gbps: 1.0,
            kernel_first_touch_us: 1.0,
            uffd_roundtrip_us_p50: None,
            uffd_roundtrip_us_p99: None,
            sigbus_roundtrip_us_p50: None,
            sigbus_roundtrip_us_p99: None,
            uffd_move_gbps: None,
            pagemap_scan_mpages_s: None,
            checked_read_gbps: 1.0,
            zram_swapin_us_p50: None,
            zram_swapin_us_p99: None,
            zram_swapin_seq_gbps: None,
        };
        let v = serde_json::to_value(b).unwrap();
        let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        let mut rows: Vec<&str> = b.rows().iter().map(|r| r.key).collect();
        rows.sort_unstable();
        assert_eq!(keys, rows);
        assert_eq!(keys.len(), 12);
    }
}

/// The migration figures (issue keys), measured after the baselines in the same run.
///
/// The memory migrated is populated private anonymous memory, as an
/// application has it: the main keys use a range made with
/// [`Hmm::alloc_huge`](hmm::Hmm::alloc_huge), so the kernel backs it with
/// transparent huge pages where it can (the usual case for large buffers); the
/// `_4k` keys repeat the measurement on memory advised `MADV_NOHUGEPAGE`, which
/// moves 4 KiB page by page.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Default)]
pub struct MigrationFigures {
    /// Populated anonymous memory to a software device, copying engine (2 workers), GB/s.
    pub migrate_to_device_gbps: Option<f64>,
    /// The same with the zero-copy (`UFFDIO_MOVE`) engine, GB/s.
    pub migrate_to_device_zero_copy_gbps: Option<f64>,
    /// Device back to system memory (`migrate_to_system`, zero-copy engine), GB/s.
    pub migrate_to_system_gbps: Option<f64>,
    /// One thread reading one byte per page, in order, of device-resident memory, GB/s.
    pub fault_back_sequential_gbps: Option<f64>,
    /// `migrate_to_device_gbps` on 4 KiB pages.
    pub migrate_to_device_4k_gbps: Option<f64>,
    /// `migrate_to_device_zero_copy_gbps` on 4 KiB pages.
    pub migrate_to_device_zero_copy_4k_gbps: Option<f64>,
    /// `migrate_to_system_gbps` on 4 KiB pages.
    pub migrate_to_system_4k_gbps: Option<f64>,
    /// `fault_back_sequential_gbps` on 4 KiB pages (default fault-around window).
    pub fault_back_sequential_4k_gbps: Option<f64>,
    /// A single-page fault-back at a random address (fault-around off), median, microseconds.
    pub fault_back_random_us_p50: Option<f64>,
    /// The same, 99th percentile.
    pub fault_back_random_us_p99: Option<f64>,
    /// `fault_back_random_us_p50` with the copying engine (two workers).
    pub fault_back_random_copy_us_p50: Option<f64>,
    /// A faulting touch at a random address with the default fault-around
    /// window (the window's pages come back after the touch's page), median,
    /// microseconds.
    pub fault_back_random_around_us_p50: Option<f64>,
    /// `fault_back_random_us_p50` in `FaultMode::InThread` (the touching
    /// thread brings the page back in its `SIGBUS` handler); `None` where
    /// the kernel or the architecture has no SIGBUS mode.
    pub fault_back_in_thread_us_p50: Option<f64>,
    /// The same, 99th percentile.
    pub fault_back_in_thread_us_p99: Option<f64>,
    /// Bytes of hmm metadata per 4 KiB page of managed memory.
    pub metadata_bytes_per_page: Option<f64>,
    /// Bytes of device page descriptors per 4 KiB page of device memory in use.
    pub device_descriptor_bytes_per_page: Option<f64>,
    /// A one-worker device job summing 256 MiB of populated system memory
    /// through the device's page table (faults included), GB/s.
    pub device_access_gbps: Option<f64>,
    /// `range_fault` snapshot of populated memory (1 GiB; 256 MiB when quick),
    /// millions of pages per second.
    pub range_fault_snapshot_mpages_s: Option<f64>,
    /// From an application `munmap` of one managed page to the device's
    /// invalidation callback, median, microseconds.
    pub invalidate_us_p50: Option<f64>,
    /// `fork()` of a process with 1 GiB (256 MiB when quick) resident on a
    /// device, until it returns with the child holding its copy, milliseconds.
    /// `None` where the process may not have `EVENT_FORK`.
    pub fork_with_device_pages_ms: Option<f64>,
    /// 256 MiB moved from one software device (zero-copy engine) straight
    /// into another (peer-to-peer), GB/s.
    pub migrate_device_to_device_gbps: Option<f64>,
    /// The CPU's first read of 256 MiB just migrated into coherent device
    /// memory (mapped at its addresses: no fault hmm serves; the kernel maps
    /// the file's pages at the first touch, a minor fault per 16 pages),
    /// GB/s; compare with `memcpy_gbps`.
    pub coherent_cpu_read_gbps: Option<f64>,
    /// 256 MiB migrated from system memory into coherent device memory and
    /// mapped there for the CPU (not populated: see `coherent_cpu_read_gbps`;
    /// copy engine; the device memory populated up front, as for
    /// `migrate_to_device_gbps`), GB/s.
    pub migrate_to_coherent_gbps: Option<f64>,
    /// Pressure eviction: 256 MiB evicted to system memory to make room on a
    /// full device for a migration, bytes evicted over the time spent
    /// evicting, GB/s.
    pub evict_gbps: Option<f64>,
}

impl MigrationFigures {
    /// The figures as table rows.
    pub fn rows(&self) -> Vec<Row> {
        let row = |key, value, unit, what| Row { key, value, unit, what };
        vec![
            row(
                "migrate_to_device_gbps",
                self.migrate_to_device_gbps,
                "GB/s",
                "migrate to device, copying engine",
            ),
            row(
                "migrate_to_device_zero_copy_gbps",
                self.migrate_to_device_zero_copy_gbps,
                "GB/s",
                "migrate to device, zero-copy engine",
            ),
            row(
                "migrate_to_system_gbps",
                self.migrate_to_system_gbps,
                "GB/s",
                "migrate back to system memory",
            ),
            row(
                "fault_back_sequential_gbps",
                self.fault_back_sequential_gbps,
                "GB/s",
                "CPU reads device memory in order (fault-back)",
            ),
            row(
                "migrate_to_device_4k_gbps",
                self.migrate_to_device_4k_gbps,
                "GB/s",
                "the same four on 4 KiB pages: copying engine",
            ),
            row(
                "migrate_to_device_zero_copy_4k_gbps",
                self.migrate_to_device_zero_copy_4k_gbps,
                "GB/s",
                "4 KiB pages: zero-copy engine",
            ),
            row(
                "migrate_to_system_4k_gbps",
                self.migrate_to_system_4k_gbps,
                "GB/s",
                "4 KiB pages: back to system memory",
            ),
            row(
                "fault_back_sequential_4k_gbps",
                self.fault_back_sequential_4k_gbps,
                "GB/s",
                "4 KiB pages: sequential fault-back",
            ),
            row(
                "fault_back_random_us_p50",
                self.fault_back_random_us_p50,
                "us",
                "random single-page fault-back, median",
            ),
            row(
                "fault_back_random_us_p99",
                self.fault_back_random_us_p99,
                "us",
                "random single-page fault-back, p99",
            ),
            row(
                "fault_back_random_copy_us_p50",
                self.fault_back_random_copy_us_p50,
                "us",
                "random fault-back, copying engine, median",
            ),
            row(
                "fault_back_random_around_us_p50",
                self.fault_back_random_around_us_p50,
                "us",
                "random touch with fault-around, median",
            ),
            row(
                "fault_back_in_thread_us_p50",
                self.fault_back_in_thread_us_p50,
                "us",
                "random fault-back served in the faulting thread, median",
            ),
            row(
                "fault_back_in_thread_us_p99",
                self.fault_back_in_thread_us_p99,
                "us",
                "random fault-back served in the faulting thread, p99",
            ),
            row(
                "metadata_bytes_per_page",
                self.metadata_bytes_per_page,
                "B/page",
                "hmm metadata per managed page",
            ),
            row(
                "device_descriptor_bytes_per_page",
                self.device_descriptor_bytes_per_page,
                "B/page",
                "device page descriptors per device page",
            ),
            row(
                "device_access_gbps",
                self.device_access_gbps,
                "GB/s",
                "device job summing 256 MiB through its page table",
            ),
            row(
                "range_fault_snapshot_mpages_s",
                self.range_fault_snapshot_mpages_s,
                "Mpages/s",
                "range_fault snapshot of populated memory",
            ),
            row(
                "invalidate_us_p50",
                self.invalidate_us_p50,
                "us",
                "application munmap to device callback, median",
            ),
            row(
                "fork_with_device_pages_ms",
                self.fork_with_device_pages_ms,
                "ms",
                "fork() with the device-resident size above copied to the child",
            ),
            row(
                "migrate_device_to_device_gbps",
                self.migrate_device_to_device_gbps,
                "GB/s",
                "256 MiB from one device straight to another",
            ),
            row(
                "coherent_cpu_read_gbps",
                self.coherent_cpu_read_gbps,
                "GB/s",
                "CPU's first read of 256 MiB just moved into coherent device memory",
            ),
            row(
                "migrate_to_coherent_gbps",
                self.migrate_to_coherent_gbps,
                "GB/s",
                "256 MiB into coherent device memory, mapped for the CPU",
            ),
            row(
                "evict_gbps",
                self.evict_gbps,
                "GB/s",
                "pressure eviction of 256 MiB from a full device",
            ),
        ]
    }
}

/// Everything `hmm bench` reports: the baselines and the figures compared to them.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct BenchReport {
    /// The baselines.
    #[serde(flatten)]
    pub baselines: Baselines,
    /// The migration figures.
    #[serde(flatten)]
    pub migration: MigrationFigures,
    /// The tiers' figures.
    #[serde(flatten)]
    pub tiers: tier::TierFigures,
}

impl BenchReport {
    /// Every row, baselines first.
    pub fn rows(&self) -> Vec<Row> {
        let mut r = self.baselines.rows();
        r.extend(self.migration.rows());
        r.extend(self.tiers.rows());
        r
    }
}

/// Number of steps [`run_all`] reports.
pub const ALL_STEPS: usize = 13;

/// Measures the baselines, then the migration figures.
pub fn run_all(
    opts: BenchOptions,
    progress: &mut dyn FnMut(Step),
) -> Result<BenchReport, BenchError> {
    let mut relabel = |s: Step| progress(Step { total: ALL_STEPS, ..s });
    let baselines = run_baselines(opts, &mut relabel)?;
    let usable = hmm::probe::probe().usable().is_ok();
    let migration = if usable {
        run_migration(opts, &mut |s| progress(Step { index: s.index + 5, total: ALL_STEPS, ..s }))?
    } else {
        MigrationFigures::default()
    };
    let tiers = if usable {
        progress(Step { name: "the compressed tier", index: 12, total: ALL_STEPS });
        tier::run(opts)?
    } else {
        tier::TierFigures::default()
    };
    Ok(BenchReport { baselines, migration, tiers })
}

fn hmm_err(e: hmm::space::HmmError) -> BenchError {
    BenchError::Server(e.to_string())
}

/// Four figures of one kind of memory.
struct Pass {
    copy: Option<f64>,
    zero_copy: Option<f64>,
    to_system: Option<f64>,
    sequential: Option<f64>,
}

/// Migrates `size` bytes of populated memory (huge pages or 4 KiB pages) to a
/// copying device, then to a zero-copy device and back, then faults it back
/// in order. Each engine gets fresh memory, so none sees what another left.
/// A managed range of `size` bytes: huge-page memory where `huge`, 4 KiB
/// pages (`MADV_NOHUGEPAGE`) otherwise.
fn managed_range(
    hmm: &hmm::space::Hmm,
    size: usize,
    huge: bool,
) -> Result<hmm::space::ManagedRange, BenchError> {
    let r = if huge { hmm.alloc_huge(size) } else { hmm.alloc(size) }.map_err(hmm_err)?;
    if !huge {
        r.advise(r.range(), Advise::NoHugePage)?;
    }
    Ok(r)
}

/// The CPU reads the first byte of every page of `r`, in order: GB/s over
/// the range, and the sum of the bytes read.
fn touch_every_page(r: &hmm::space::ManagedRange) -> Result<(f64, u64), BenchError> {
    let t = Instant::now();
    let mut sum = 0u64;
    for p in 0..r.pages() {
        // A raw CPU touch, as the application's own load would be (hmm's
        // checked accessor adds its look at the records).
        sum += u64::from(r.mapping().touch_read(p * PAGE_SIZE).map_err(MmError::from)?);
    }
    Ok((gbps(r.len(), t.elapsed()), sum))
}

fn migration_pass(hmm: &hmm::space::Hmm, size: usize, huge: bool) -> Result<Pass, BenchError> {
    use hmm_swdev::{SoftwareDevice, SoftwareDeviceConfig};
    let populated = || -> Result<hmm::space::ManagedRange, BenchError> {
        let r = managed_range(hmm, size, huge)?;
        r.populate(r.range()).map_err(hmm_err)?;
        Ok(r)
    };
    let whole = |rep: hmm::migrate::MigrationReport, t: Instant| {
        (rep.migrated * PAGE_SIZE == size).then(|| gbps(size, t.elapsed()))
    };
    let copy = {
        let r = populated()?;
        let mut cfg = SoftwareDeviceConfig::new("bench-copy", size).with_copy_engine(2);
        cfg.prefault = true;
        let dev = SoftwareDevice::new(hmm, cfg).map_err(hmm_err)?;
        let t = Instant::now();
        whole(dev.migrate_to_device(r.range()).map_err(hmm_err)?, t)
    };
    let r = populated()?;
    let dev =
        SoftwareDevice::new(hmm, SoftwareDeviceConfig::new("bench-zc", size)).map_err(hmm_err)?;
    let t = Instant::now();
    let zero_copy = whole(dev.migrate_to_device(r.range()).map_err(hmm_err)?, t);
    let t = Instant::now();
    let to_system = whole(dev.migrate_to_system(r.range()).map_err(hmm_err)?, t);
    dev.migrate_to_device(r.range()).map_err(hmm_err)?;
    let (gbps, sum) = touch_every_page(&r)?;
    let sequential = Some(gbps);
    std::hint::black_box(sum);
    Ok(Pass { copy, zero_copy, to_system, sequential })
}

/// The latency of CPU touches of `pages` device-resident pages in random
/// order, one byte each, with hmm configured by `config` and the device by
/// `device`: (median, 99th percentile), microseconds, of the touches that
/// fault (with fault-around, a touch's neighbours come back with it, and
/// later touches of them do not fault).
fn random_fault_back(
    config: hmm::space::HmmConfig,
    device: impl FnOnce(hmm_swdev::SoftwareDeviceConfig) -> hmm_swdev::SoftwareDeviceConfig,
    pages: usize,
) -> Result<(f64, f64), BenchError> {
    use hmm::space::Hmm;
    use hmm_swdev::{SoftwareDevice, SoftwareDeviceConfig};
    let hmm = Hmm::with_config(config).map_err(hmm_err)?;
    let r = hmm.alloc(pages * PAGE_SIZE).map_err(hmm_err)?;
    r.fill(0, r.len(), 1).map_err(MmError::from)?;
    let dev = SoftwareDevice::new(&hmm, device(SoftwareDeviceConfig::new("bench-rand", r.len())))
        .map_err(hmm_err)?;
    dev.migrate_to_device(r.range()).map_err(hmm_err)?;
    let order = shuffled((0..pages).collect(), 0x2545_f491_4f6c_dd1d);
    // Only touches that fault: with fault-around, most pages are back
    // before they are touched.
    let lat = touch_latency_us(r.mapping(), &order, |p| {
        matches!(r.residency(p), hmm::Residency::Device(_))
    })
    .map_err(MmError::from)?;
    drop((r, dev, hmm));
    Ok(lat)
}

/// Measures the migration figures on software devices.
pub fn run_migration(
    opts: BenchOptions,
    progress: &mut dyn FnMut(Step),
) -> Result<MigrationFigures, BenchError> {
    use hmm::space::{Hmm, HmmConfig};
    use hmm_swdev::{SoftwareDevice, SoftwareDeviceConfig};
    let size = if opts.quick { 256 << 20 } else { 1 << 30 };
    let mut f = MigrationFigures::default();
    let step =
        |progress: &mut dyn FnMut(Step), index, name| progress(Step { name, index, total: 7 });

    step(progress, 0, "migrations of huge-page memory");
    let hmm = Hmm::new().map_err(hmm_err)?;
    let p = migration_pass(&hmm, size, true)?;
    f.migrate_to_device_gbps = p.copy;
    f.migrate_to_device_zero_copy_gbps = p.zero_copy;
    f.migrate_to_system_gbps = p.to_system;
    f.fault_back_sequential_gbps = p.sequential;

    step(progress, 1, "migrations of 4 KiB-page memory");
    let p = migration_pass(&hmm, size, false)?;
    f.migrate_to_device_4k_gbps = p.copy;
    f.migrate_to_device_zero_copy_4k_gbps = p.zero_copy;
    f.migrate_to_system_4k_gbps = p.to_system;
    f.fault_back_sequential_4k_gbps = p.sequential;

    step(progress, 2, "metadata");
    {
        let r = hmm.alloc(size).map_err(hmm_err)?;
        let dev = SoftwareDevice::new(&hmm, SoftwareDeviceConfig::new("bench-meta", size))
            .map_err(hmm_err)?;
        dev.migrate_to_device(r.range()).map_err(hmm_err)?;
        let (bytes, pages) = hmm.metadata();
        f.metadata_bytes_per_page = Some(bytes as f64 / pages as f64);
        f.device_descriptor_bytes_per_page = Some(
            dev.memory().descriptor_bytes() as f64 / dev.memory().allocated_pages().max(1) as f64,
        );
    }
    drop(hmm);

    step(progress, 3, "random fault-back");
    let pages = if opts.quick { 2_000 } else { 20_000 };
    let service = HmmConfig { fault_mode: hmm::FaultMode::Service, ..HmmConfig::default() };
    let single = HmmConfig { fault_around_pages: 1, ..service };
    let (p50, p99) = random_fault_back(single, |c| c, pages)?;
    f.fault_back_random_us_p50 = Some(p50);
    f.fault_back_random_us_p99 = Some(p99);
    let (p50, _) = random_fault_back(single, |c| c.with_copy_engine(2), pages)?;
    f.fault_back_random_copy_us_p50 = Some(p50);
    let (p50, _) = random_fault_back(service, |c| c, pages)?;
    f.fault_back_random_around_us_p50 = Some(p50);
    if hmm::probe::probe().has("sigbus-mode") {
        let in_thread = HmmConfig { fault_mode: hmm::FaultMode::InThread, ..single };
        let (p50, p99) = random_fault_back(in_thread, |c| c, pages)?;
        f.fault_back_in_thread_us_p50 = Some(p50);
        f.fault_back_in_thread_us_p99 = Some(p99);
    }

    step(progress, 4, "the mirror");
    let hmm = Hmm::new().map_err(hmm_err)?;
    f.device_access_gbps = Some(device_access_gbps(&hmm, BIG)?);
    f.range_fault_snapshot_mpages_s = Some(snapshot_mpages_s(&hmm, size)?);
    f.invalidate_us_p50 = Some(invalidate_us_p50(&hmm, if opts.quick { 200 } else { 2_000 })?);
    drop(hmm);

    step(progress, 5, "fork with device pages");
    f.fork_with_device_pages_ms = fork_ms(size)?;

    step(progress, 6, "several devices, coherent memory, eviction");
    devices_figures(BIG, &mut f)?;
    Ok(f)
}

/// `migrate_device_to_device_gbps`, `coherent_cpu_read_gbps`,
/// `migrate_to_coherent_gbps` and `evict_gbps`, each over `size` bytes of populated memory, each checked.
fn devices_figures(size: usize, f: &mut MigrationFigures) -> Result<(), BenchError> {
    use hmm::space::Hmm;
    use hmm_swdev::{SoftwareDevice, SoftwareDeviceConfig};
    let hmm = Hmm::new().map_err(hmm_err)?;
    let moved = |what: &str, got: usize| {
        if got == size / PAGE_SIZE {
            Ok(())
        } else {
            Err(BenchError::Server(format!("{what} moved {got} of {} pages", size / PAGE_SIZE)))
        }
    };
    {
        let r = hmm.alloc_huge(size).map_err(hmm_err)?;
        r.fill(0, size, 0x3C).map_err(MmError::from)?;
        let a = SoftwareDevice::new(&hmm, SoftwareDeviceConfig::new("bench-a", size))
            .map_err(hmm_err)?;
        let b = SoftwareDevice::new(&hmm, SoftwareDeviceConfig::new("bench-b", size))
            .map_err(hmm_err)?;
        moved("to device A", a.migrate_to_device(r.range()).map_err(hmm_err)?.migrated)?;
        let t = Instant::now();
        moved("A to B", b.migrate_from(r.range(), &a).map_err(hmm_err)?.migrated)?;
        f.migrate_device_to_device_gbps = Some(gbps(size, t.elapsed()));
        if r.touch_read(size - 1).map_err(MmError::from)? != 0x3C {
            return Err(BenchError::Server("device B holds the wrong bytes".into()));
        }
    }
    {
        let r = hmm.alloc(size).map_err(hmm_err)?;
        r.fill(0, size, 0x5A).map_err(MmError::from)?;
        // Device memory populated up front, as for the copying engine's
        // figure (and as real device memory is): the copy then never waits
        // for the kernel to allocate and zero a page of the pool.
        let mut cfg = SoftwareDeviceConfig::coherent("bench-cxl", size);
        cfg.prefault = true;
        let c = SoftwareDevice::new(&hmm, cfg).map_err(hmm_err)?;
        let t = Instant::now();
        moved("to coherent memory", c.migrate_to_device(r.range()).map_err(hmm_err)?.migrated)?;
        f.migrate_to_coherent_gbps = Some(gbps(size, t.elapsed()));
        let faults = hmm.fault_stats().0;
        // Written once first, so the timed read does not count the faults
        // that populate the destination (as memcpy's destination is).
        let mut buf = vec![0xFFu8; size];
        let t = Instant::now();
        r.read(0, &mut buf).map_err(MmError::from)?;
        let elapsed = t.elapsed();
        if hmm.fault_stats().0 != faults || buf.iter().any(|b| *b != 0x5A) {
            return Err(BenchError::Server("the coherent read faulted or read wrong bytes".into()));
        }
        f.coherent_cpu_read_gbps = Some(gbps(size, elapsed));
        c.migrate_to_system(r.range()).map_err(hmm_err)?;
    }
    {
        let x = hmm.alloc_huge(size).map_err(hmm_err)?;
        let y = hmm.alloc_huge(size).map_err(hmm_err)?;
        x.fill(0, size, 1).map_err(MmError::from)?;
        y.fill(0, size, 2).map_err(MmError::from)?;
        let d =
            SoftwareDevice::new(&hmm, SoftwareDeviceConfig::new("bench-evict", size).evicting())
                .map_err(hmm_err)?;
        moved("x to device", d.migrate_to_device(x.range()).map_err(hmm_err)?.migrated)?;
        moved("y to device", d.migrate_to_device(y.range()).map_err(hmm_err)?.migrated)?;
        let s = d.stats();
        if s.pages_evicted != (size / PAGE_SIZE) as u64
            || x.touch_read(size - 1).map_err(MmError::from)? != 1
        {
            return Err(BenchError::Server(format!("evicted {} pages", s.pages_evicted)));
        }
        f.evict_gbps =
            Some(s.pages_evicted as f64 * PAGE_SIZE as f64 / s.eviction_ns.max(1) as f64);
    }
    Ok(())
}

/// `fork()` with `size` bytes resident on a software device: the time the
/// call takes in the parent (which returns once the child has its copy of
/// every device page; the child then exits). `None` without `EVENT_FORK`.
fn fork_ms(size: usize) -> Result<Option<f64>, BenchError> {
    use hmm::space::Hmm;
    use hmm_swdev::{SoftwareDevice, SoftwareDeviceConfig};
    let hmm = Hmm::new().map_err(hmm_err)?;
    if !hmm.follows_forks() {
        return Ok(None);
    }
    let r = hmm.alloc(size).map_err(hmm_err)?;
    r.fill(0, size, 0x5C).map_err(MmError::from)?;
    let dev = SoftwareDevice::new(&hmm, SoftwareDeviceConfig::new("bench-fork", size))
        .map_err(hmm_err)?;
    dev.migrate_to_device(r.range()).map_err(hmm_err)?;
    let before = hmm.forks().1;
    let t = Instant::now();
    let child = hmm::os::process::spawn_child(|| 0).map_err(|e| BenchError::Fork(e.to_string()))?;
    let ms = t.elapsed().as_secs_f64() * 1e3;
    match child.wait_within(Duration::from_secs(60)) {
        Ok(hmm::os::process::ChildOutcome::Exited(0)) => {}
        Ok(out) => return Err(BenchError::Fork(format!("the forked child ended as {out:?}"))),
        Err(e) => return Err(BenchError::Fork(format!("waiting for the child: {e}"))),
    }
    let copied = hmm.forks().1 - before;
    if copied != (size / PAGE_SIZE) as u64 {
        return Err(BenchError::Fork(format!(
            "fork copied {copied} device pages to the child, not {}",
            size / PAGE_SIZE
        )));
    }
    Ok(Some(ms))
}

/// A one-worker job on a software device sums `size` bytes of populated
/// memory as u64 words, reading 64 KiB at a time through the device's page
/// table; the first reads take the device faults. Checked against the sum the
/// memory must give.
fn device_access_gbps(hmm: &hmm::space::Hmm, size: usize) -> Result<f64, BenchError> {
    use hmm::addr::VirtAddr;
    use hmm_swdev::{SoftwareDevice, SoftwareDeviceConfig};
    let r = hmm.alloc(size).map_err(hmm_err)?;
    r.populate(r.range()).map_err(hmm_err)?;
    r.fill(0, size, 1).map_err(MmError::from)?;
    let dev = SoftwareDevice::new(hmm, SoftwareDeviceConfig::new("bench-access", 16 * PAGE_SIZE))
        .map_err(hmm_err)?;
    let base = r.addr();
    let t = Instant::now();
    let (sums, _) = dev
        .run(1, base, |ctx| {
            let mut buf = vec![0u8; 64 << 10];
            let mut sum = 0u64;
            for off in (0..size).step_by(buf.len()) {
                ctx.read(VirtAddr::new(ctx.start_addr() as usize + off), &mut buf)?;
                for w in buf.chunks_exact(8) {
                    sum = sum.wrapping_add(u64::from_ne_bytes(w.try_into().expect("8 bytes")));
                }
            }
            Ok(sum)
        })
        .map_err(hmm_err)?;
    let elapsed = t.elapsed();
    let want = (size as u64 / 8).wrapping_mul(0x0101_0101_0101_0101);
    if sums[0] != want {
        return Err(BenchError::Server(format!(
            "the device job summed {:#x}, the memory holds {want:#x}",
            sums[0]
        )));
    }
    Ok(gbps(size, elapsed))
}

/// `range_fault` snapshots of `size` bytes of populated memory (median of 5).
fn snapshot_mpages_s(hmm: &hmm::space::Hmm, size: usize) -> Result<f64, BenchError> {
    use hmm::mirror::RangeFault;
    let r = hmm.alloc(size).map_err(hmm_err)?;
    r.advise(r.range(), Advise::NoHugePage)?;
    r.populate(r.range()).map_err(hmm_err)?;
    let mut runs = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let info = hmm
            .range_fault(&RangeFault::snapshot(r.range(), None))
            .map_err(|e| BenchError::Server(e.to_string()))?;
        runs.push(info.len() as f64 / t.elapsed().as_secs_f64() / 1e6);
        if !info.iter().all(|p| p.valid && p.write) {
            return Err(BenchError::Server("the snapshot missed populated pages".into()));
        }
    }
    Ok(median(&mut runs))
}

/// `samples` times: the application unmaps one page of a managed range
/// (`munmap`, which hmm learns of from the kernel's unmap event), and the time
/// until a notifier over the range is called is taken.
fn invalidate_us_p50(hmm: &hmm::space::Hmm, samples: usize) -> Result<f64, BenchError> {
    use std::sync::{Arc, Mutex};
    let r = hmm.alloc(samples * PAGE_SIZE).map_err(hmm_err)?;
    r.fill(0, r.len(), 1).map_err(MmError::from)?;
    let seen: Arc<Mutex<Option<Instant>>> = Arc::default();
    let s = seen.clone();
    let _n = hmm.insert_notifier(r.range(), move |inv| {
        if inv.event == hmm::mirror::InvalidationEvent::Unmap {
            *s.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        }
    });
    let mut lat = Vec::with_capacity(samples);
    for p in 0..samples {
        *seen.lock().unwrap_or_else(|e| e.into_inner()) = None;
        let part = r.pages_range(p, 1).map_err(MmError::from)?;
        let t = Instant::now();
        r.mapping().punch(part)?;
        let deadline = t + Duration::from_secs(5);
        let at = loop {
            if let Some(at) = *seen.lock().unwrap_or_else(|e| e.into_inner()) {
                break at;
            }
            if Instant::now() > deadline {
                return Err(BenchError::Server("no invalidation within 5 s of a munmap".into()));
            }
            std::hint::spin_loop();
        };
        lat.push(at.duration_since(t).as_secs_f64() * 1e6);
    }
    lat.sort_by(f64::total_cmp);
    Ok(quantile(&lat, 0.5))
}
