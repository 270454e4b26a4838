//! Throughput against migration size: the series `hmm bench --csv` writes
//! and `hmm bench plot` draws.
//!
//! - The size sweep, 4 KiB to 64 MiB of 4 KiB-page memory: memcpy of the
//!   same size (the reference line), migration to a device with the copy
//!   engine and with the zero-copy engine, and fault-back (the CPU touching
//!   every page of a device-resident range in order).
//! - The migration benchmark of the kernel's HMM self-tests
//!   (`tools/testing/selftests/mm/hmm-tests.c`), restated: 512 KiB to
//!   256 MiB, to the device and back to system memory, with and without
//!   transparent huge pages.
//!
//! Each point is the median of several runs on fresh or restored memory;
//! every migration is checked to have moved every page.

use std::time::Instant;

use serde::Serialize;

use super::{BenchError, BenchOptions, Step, gbps, hmm_err, median};
use hmm::addr::PAGE_SIZE;
use hmm::os::mm::MmError;
use hmm::space::{Hmm, ManagedRange};
use hmm_swdev::{SoftwareDevice, SoftwareDeviceConfig};

/// One series: a value per size.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Series {
    /// What is measured ("zero-copy engine, to device", ...).
    pub name: String,
    /// Which figure it belongs to: `sweep` or `selftest`.
    pub group: &'static str,
    /// The unit of the values.
    pub unit: &'static str,
    /// `(bytes, value)`, by increasing size.
    pub points: Vec<(usize, f64)>,
}

/// Sizes of the sweep: 4 KiB to 64 MiB, by factors of 4.
pub fn sweep_sizes() -> Vec<usize> {
    (0..8).map(|k| PAGE_SIZE << (2 * k)).collect()
}

/// Sizes of the self-test benchmark: 512 KiB to 256 MiB, by factors of 2.
pub fn selftest_sizes() -> Vec<usize> {
    (0..10).map(|k| (512 << 10) << k).collect()
}

/// Steps [`run_series`] reports.
pub const SERIES_STEPS: usize = 7;

fn reps_for(opts: BenchOptions, size: usize) -> usize {
    let base = if opts.quick { 3 } else { 7 };
    if size <= 1 << 20 { base * 3 } else { base }
}

fn fresh(hmm: &Hmm, size: usize, huge: bool) -> Result<ManagedRange, BenchError> {
    let r = super::managed_range(hmm, size, huge)?;
    r.fill(0, size, 0x6B).map_err(MmError::from)?;
    Ok(r)
}

fn all_moved(what: &str, size: usize, migrated: usize) -> Result<(), BenchError> {
    if migrated * PAGE_SIZE == size {
        Ok(())
    } else {
        Err(BenchError::Server(format!("{what}: {migrated} of {} pages moved", size / PAGE_SIZE)))
    }
}

/// Median GB/s of `to device` over `size` bytes (and, with `back`, of the
/// way back), each run on memory brought back first.
fn migrations(
    hmm: &Hmm,
    dev: &SoftwareDevice,
    size: usize,
    huge: bool,
    reps: usize,
) -> Result<(f64, f64), BenchError> {
    let r = fresh(hmm, size, huge)?;
    let (mut to, mut back) = (Vec::with_capacity(reps), Vec::with_capacity(reps));
    for _ in 0..reps {
        let t = Instant::now();
        let rep = dev.migrate_to_device(r.range()).map_err(hmm_err)?;
        to.push(gbps(size, t.elapsed()));
        all_moved("to the device", size, rep.migrated)?;
        let t = Instant::now();
        let rep = dev.migrate_to_system(r.range()).map_err(hmm_err)?;
        back.push(gbps(size, t.elapsed()));
        all_moved("back to system memory", size, rep.migrated)?;
    }
    if r.touch_read(size - 1).map_err(MmError::from)? != 0x6B {
        return Err(BenchError::Server("a migrated range came back with the wrong bytes".into()));
    }
    Ok((median(&mut to), median(&mut back)))
}

/// Median GB/s of the CPU touching, in order, every page of `size` bytes
/// that live on the device.
fn fault_back(
    hmm: &Hmm,
    dev: &SoftwareDevice,
    size: usize,
    reps: usize,
) -> Result<f64, BenchError> {
    let r = fresh(hmm, size, false)?;
    let mut runs = Vec::with_capacity(reps);
    for _ in 0..reps {
        all_moved(
            "to the device",
            size,
            dev.migrate_to_device(r.range()).map_err(hmm_err)?.migrated,
        )?;
        let (rate, sum) = super::touch_every_page(&r)?;
        runs.push(rate);
        if sum != 0x6B * (size / PAGE_SIZE) as u64 {
            return Err(BenchError::Server("fault-back read the wrong bytes".into()));
        }
    }
    Ok(median(&mut runs))
}

/// Measures every series (see the module docs).
pub fn run_series(
    opts: BenchOptions,
    progress: &mut dyn FnMut(Step),
) -> Result<Vec<Series>, BenchError> {
    let step = |progress: &mut dyn FnMut(Step), index, name| {
        progress(Step { name, index, total: SERIES_STEPS })
    };
    let series =
        |name: &str, group, points| Series { name: name.to_string(), group, unit: "GB/s", points };
    let hmm = Hmm::new().map_err(hmm_err)?;
    let cap = 256 << 20;
    let mut copy_cfg = SoftwareDeviceConfig::new("bench-sweep-copy", cap).with_copy_engine(2);
    copy_cfg.prefault = true;
    let copy = SoftwareDevice::new(&hmm, copy_cfg).map_err(hmm_err)?;
    let zc = SoftwareDevice::new(&hmm, SoftwareDeviceConfig::new("bench-sweep-zc", cap))
        .map_err(hmm_err)?;
    let mut out = Vec::new();

    let sizes = sweep_sizes();
    step(progress, 0, "sweep: memcpy");
    let mut pts = Vec::new();
    for &s in &sizes {
        pts.push((s, super::memcpy_of(s, reps_for(opts, s))?));
    }
    out.push(series("memcpy", "sweep", pts));
    step(progress, 1, "sweep: copy engine");
    let mut pts = Vec::new();
    for &s in &sizes {
        pts.push((s, migrations(&hmm, &copy, s, false, reps_for(opts, s))?.0));
    }
    out.push(series("copy engine, to device", "sweep", pts));
    step(progress, 2, "sweep: zero-copy engine");
    let mut pts = Vec::new();
    for &s in &sizes {
        pts.push((s, migrations(&hmm, &zc, s, false, reps_for(opts, s))?.0));
    }
    out.push(series("zero-copy engine, to device", "sweep", pts));
    step(progress, 3, "sweep: fault-back");
    let mut pts = Vec::new();
    for &s in &sizes {
        pts.push((s, fault_back(&hmm, &zc, s, reps_for(opts, s))?));
    }
    out.push(series("fault-back (CPU touch)", "sweep", pts));

    let names = [
        ("self-test: to device, THP", "self-test: to system, THP", true, 4),
        ("self-test: to device, no THP", "self-test: to system, no THP", false, 5),
    ];
    for (to_name, back_name, huge, index) in names {
        step(
            progress,
            index,
            if huge { "self-test benchmark, THP" } else { "self-test benchmark, no THP" },
        );
        let (mut to, mut back) = (Vec::new(), Vec::new());
        for s in selftest_sizes() {
            let (t, b) = migrations(&hmm, &zc, s, huge, reps_for(opts, s))?;
            to.push((s, t));
            back.push((s, b));
        }
        out.push(series(to_name, "selftest", to));
        out.push(series(back_name, "selftest", back));
    }
    step(progress, SERIES_STEPS - 1, "done");
    Ok(out)
}

/// The series as CSV: `group,series,size_bytes,value,unit`, one row per point.
pub fn to_csv(series: &[Series]) -> String {
    let mut s = String::from("group,series,size_bytes,value,unit\n");
    for x in series {
        for (size, v) in &x.points {
            s.push_str(&format!("{},\"{}\",{size},{v:.4},{}\n", x.group, x.name, x.unit));
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_span_what_the_figures_promise() {
        let s = sweep_sizes();
        assert_eq!((s[0], *s.last().unwrap()), (4 << 10, 64 << 20));
        let t = selftest_sizes();
        assert_eq!((t[0], *t.last().unwrap()), (512 << 10, 256 << 20));
    }

    #[test]
    fn csv_has_one_row_per_point() {
        let s = [Series {
            name: "a, b".into(),
            group: "sweep",
            unit: "GB/s",
            points: vec![(4096, 1.5), (8192, 2.25)],
        }];
        let csv = to_csv(&s);
        assert_eq!(
            csv,
            "group,series,size_bytes,value,unit\nsweep,\"a, b\",4096,1.5000,GB/s\nsweep,\"a, b\",8192,2.2500,GB/s\n"
        );
    }
}
