//! The model-based stress test, bounded: a few seeds of random operations on
//! one worker, every byte and the accounting compared with the model after
//! every step. `hmm stress` runs the same thing for longer.

mod common;

use hmm::stress::{StressConfig, run};

#[test]
fn random_operations_match_the_model() {
    if common::skip_without_uffd() {
        return;
    }
    let _fork = common::fork_lock();
    for seed in [1, 2, 3, 4] {
        let cfg = StressConfig { seed, ops: 2_500, threads: 1, pages: 128 };
        let report = run(cfg, &|_| {}).unwrap();
        assert!(
            report.divergences.is_empty(),
            "seed {seed}: {:?}\nshrunk: {:#?}",
            report.divergences,
            report.shrunk
        );
        assert_eq!(report.ops, 2_500, "seed {seed}: every operation ran");
        assert!(report.by_kind.values().all(|n| *n > 0), "seed {seed}: {:?}", report.by_kind);
    }
}
