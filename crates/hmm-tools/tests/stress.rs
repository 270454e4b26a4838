//! The model-based stress test, bounded: random operations (accesses,
//! migrations, exclusive access, discard, protect, pin, munmap, mremap, fork,
//! device failure, injected DMA errors and starved fault-backs), every byte
//! and the accounting compared with the model after every step. One worker
//! alone over many seeds, then two and three workers sharing the devices.
//! About 700,000 operations, two to three minutes in a debug build on an
//! idle machine; each sweep stops starting seeds after its time budget
//! (`HMM_STRESS_BUDGET_S`, 100 s; it says how many it ran), so that a
//! machine whose cores are busy runs fewer. `HMM_STRESS_SCALE=N` runs N
//! times as many seeds. `hmm stress` runs the
//! same thing from the command line for as long as asked.

#[path = "../../hmm/tests/common/mod.rs"]
mod common;

use hmm_tools::stress::{ALONE_ONLY, KINDS, StressConfig, StressReport, run};

/// How many times the default number of seeds to run (`HMM_STRESS_SCALE`).
fn scale() -> u64 {
    std::env::var("HMM_STRESS_SCALE").ok().and_then(|s| s.parse().ok()).unwrap_or(1).max(1)
}

/// How long a sweep may go on starting new seeds (`HMM_STRESS_BUDGET_S`,
/// 100 s by default): on an idle machine every seed runs well within it; on
/// one whose cores are all busy with other work, where each hand-over
/// between a faulting thread and the fault service waits for the
/// scheduler, the sweep stops starting seeds at the budget (after its
/// first few), says how many it ran, and the test stays within its bound.
fn budget() -> std::time::Duration {
    let s = std::env::var("HMM_STRESS_BUDGET_S").ok().and_then(|s| s.parse().ok()).unwrap_or(100);
    std::time::Duration::from_secs(s)
}

/// Runs `seeds` in order (at least `min_seeds` of them, then as long as the
/// budget lasts) and checks each report: no divergence, every planned
/// operation run or skipped, few skipped, and every kind of operation in
/// `kinds` run at least once over the seeds run. Returns the operations run
/// and the seeds run.
fn sweep(
    seeds: std::ops::RangeInclusive<u64>,
    min_seeds: usize,
    base: StressConfig,
    kinds: &[&str],
) -> (u64, usize) {
    let start = std::time::Instant::now();
    let mut ran = std::collections::BTreeMap::new();
    let mut total = 0;
    let mut count = 0;
    for seed in seeds {
        if count >= min_seeds && start.elapsed() > budget() {
            break;
        }
        count += 1;
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
    (total, count)
}

#[test]
fn random_operations_match_the_model() {
    if common::skip_without_uffd() {
        return;
    }
    let _fork = common::fork_lock();
    let base = StressConfig { seed: 0, ops: 5_000, threads: 1, pages: 128, device_failures: true };
    let seeds = 60 * scale();
    let (ops, ran) = sweep(1..=seeds, 6, base, &KINDS);
    eprintln!("one worker: {ran} of {seeds} seeds, {ops} operations, no divergence");
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
    let (two_seeds, three_seeds) = (30 * scale(), 15 * scale());
    let (two, two_ran) = sweep(1..=two_seeds, 4, base, &shared);
    let base = StressConfig { threads: 3, pages: 96, ..base };
    let (three, three_ran) = sweep(101..=100 + three_seeds, 2, base, &shared);
    eprintln!(
        "two workers: {two_ran} of {two_seeds} seeds, {two} operations; three: {three_ran} of \
         {three_seeds} seeds, {three} operations; no divergence"
    );
}
