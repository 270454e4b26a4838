//! The model-based stress test, bounded: random operations (accesses,
//! migrations, exclusive access, discard, protect, pin, munmap, mremap, fork,
//! device failure, injected DMA errors and starved fault-backs), every byte
//! and the accounting compared with the model after every step. One worker
//! alone over many seeds, then two and three workers sharing the devices.
//! About 700,000 operations, two to three minutes in a debug build;
//! `HMM_STRESS_SCALE=N` runs N times as many seeds. `hmm stress` runs the
//! same thing from the command line for as long as asked.

mod common;

use hmm::stress::{ALONE_ONLY, KINDS, StressConfig, StressReport, run};

/// How many times the default number of seeds to run (`HMM_STRESS_SCALE`).
fn scale() -> u64 {
    std::env::var("HMM_STRESS_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(1).max(1)
}

/// Runs `seeds` and checks each report: no divergence, every planned
/// operation run or skipped, few skipped, and every kind of operation in
/// `kinds` run at least once over all seeds.
fn sweep(seeds: std::ops::RangeInclusive<u64>, base: StressConfig, kinds: &[&str]) -> u64 {
    let mut ran = std::collections::BTreeMap::new();
    let mut total = 0;
    for seed in seeds {
        let cfg = StressConfig { seed, ..base };
        let report: StressReport = run(cfg, &|_| {}).unwrap();
        assert!(
            report.divergences.is_empty(),
            "{cfg:?}: {:?}\nshrunk: {:#?}",
            report.divergences,
            report.shrunk
        );
        assert_eq!(
            report.ops + report.skipped,
            cfg.ops,
            "{cfg:?}: every operation ran or was skipped"
        );
        assert!(
            report.skipped < cfg.ops / 10,
            "{cfg:?}: {} skipped (past the unmap budget)",
            report.skipped
        );
        for (k, n) in &report.by_kind {
            *ran.entry(*k).or_insert(0) += n;
        }
        total += report.ops;
    }
    for k in kinds {
        assert!(ran.get(k).copied().unwrap_or(0) > 0, "{k} never ran: {ran:?}");
    }
    total
}

#[test]
fn random_operations_match_the_model() {
    if common::skip_without_uffd() {
        return;
    }
    let _fork = common::fork_lock();
    let base = StressConfig { seed: 0, ops: 5_000, threads: 1, pages: 128, device_failures: true };
    let ops = sweep(1..=60 * scale(), base, &KINDS);
    eprintln!("one worker: {ops} operations, no divergence");
}

#[test]
fn concurrent_workers_match_the_model() {
    if common::skip_without_uffd() {
        return;
    }
    let _fork = common::fork_lock();
    // Workers sharing devices plan no injected faults (another worker's
    // migration could meet them): only the shared kinds must all run.
    let shared: Vec<&str> = KINDS.into_iter().filter(|k| !ALONE_ONLY.contains(k)).collect();
    let base = StressConfig { seed: 0, ops: 6_000, threads: 2, pages: 128, device_failures: true };
    let two = sweep(1..=30 * scale(), base, &shared);
    let base = StressConfig { threads: 3, pages: 96, ..base };
    let three = sweep(101..=100 + 15 * scale(), base, &shared);
    eprintln!("two workers: {two} operations, three: {three}, no divergence");
}
