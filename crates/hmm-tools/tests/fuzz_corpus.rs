//! The fuzz corpus, replayed on the stable toolchain: every input checked in
//! under `fuzz/corpus/{ops,api}`, and every saved failure under
//! `fuzz/regressions/{ops,api}`, goes through the drivers the fuzz targets
//! run (`fuzz/drivers.rs`, included here as a module) and must pass: no
//! divergence from the model, no panic, no broken property. The corpus must
//! also reach every kind of operation and of API call, so that a corpus gone
//! missing or shrunk fails here instead of passing with nothing to replay.
//! `fuzz/run.sh ops|api` (nightly, cargo-fuzz) grows the corpus.

#[path = "../../hmm/tests/common/mod.rs"]
mod common;

#[path = "../../../fuzz/drivers.rs"]
mod drivers;

use std::any::Any;
use std::collections::BTreeSet;
use std::io::Write;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::time::Duration;

use hmm_tools::stress::decode;

/// The `fuzz/` folder of the repository.
fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz")
}

/// The files of `dir`, by name, with their bytes; none if it does not exist.
fn files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut paths: Vec<PathBuf> =
        entries.map(|e| e.expect("a corpus entry").path()).filter(|p| p.is_file()).collect();
    paths.sort();
    paths
        .into_iter()
        .map(|p| {
            let data = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (p, data)
        })
        .collect()
}

/// The corpus of `target`, which must not be empty.
fn corpus(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = fuzz_dir().join("corpus").join(target);
    let inputs = files(&dir);
    assert!(!inputs.is_empty(), "the corpus {} is missing or empty", dir.display());
    inputs
}

/// The corpus of `target`, then its saved failures (if any).
fn replayed(target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let mut inputs = corpus(target);
    inputs.extend(files(&fuzz_dir().join("regressions").join(target)));
    inputs
}

/// What a panic said.
fn message(payload: &(dyn Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "(no message)".into())
}

/// How long one input may run: longer is a hang, which ends the process
/// (naming the input) rather than stalling the suite.
const HANG: Duration = Duration::from_secs(60);

/// Watches the inputs `replay` runs, each announced as it starts (`None`
/// when all are done), and aborts the process when one runs past [`HANG`].
fn watchdog(announced: Receiver<Option<PathBuf>>) {
    let mut current = None;
    loop {
        match announced.recv_timeout(HANG) {
            Ok(Some(path)) => current = Some(path),
            Ok(None) | Err(RecvTimeoutError::Disconnected) => return,
            Err(RecvTimeoutError::Timeout) => {
                if let Some(path) = &current {
                    // Straight to the stream: the test's captured output is
                    // lost when the process aborts.
                    let _ = writeln!(
                        std::io::stderr(),
                        "{}: still running after {HANG:?}: it hangs",
                        path.display()
                    );
                    std::process::abort();
                }
            }
        }
    }
}

/// Runs `check` on every input, and fails naming each input that failed
/// (or ends the process naming the one that hangs).
fn replay(
    target: &str,
    inputs: &[(PathBuf, Vec<u8>)],
    describe: impl Fn(&[u8]) -> String,
    check: impl Fn(&[u8]) -> Result<(), String>,
) {
    let (announce, announced) = mpsc::channel();
    let watching = std::thread::spawn(move || watchdog(announced));
    let mut failed = Vec::new();
    for (path, data) in inputs {
        announce.send(Some(path.clone())).expect("the watchdog runs");
        let why = match catch_unwind(AssertUnwindSafe(|| check(data))) {
            Ok(Ok(())) => continue,
            Ok(Err(violation)) => violation,
            Err(payload) => format!("panicked: {}", message(&*payload)),
        };
        failed.push(format!("{}: {why}\n    decoded: {}", path.display(), describe(data)));
    }
    announce.send(None).expect("the watchdog runs");
    watching.join().expect("the watchdog");
    assert!(
        failed.is_empty(),
        "{} of {} {target} inputs failed:\n{}",
        failed.len(),
        inputs.len(),
        failed.join("\n")
    );
}

#[test]
fn the_corpus_reaches_every_operation_and_call() {
    let every_op: BTreeSet<&str> =
        (0..=u8::MAX).flat_map(|k| decode(&[k], drivers::OPS_PAGES)).map(|op| op.kind()).collect();
    let reached: BTreeSet<&str> = corpus("ops")
        .iter()
        .flat_map(|(_, data)| decode(data, drivers::OPS_PAGES))
        .map(|op| op.kind())
        .collect();
    let missing: Vec<_> = every_op.difference(&reached).collect();
    assert!(missing.is_empty(), "no ops input has {missing:?}");

    let reached: BTreeSet<&str> = corpus("api")
        .iter()
        .flat_map(|(_, data)| drivers::decode_api(data))
        .map(|call| call.kind())
        .collect();
    let missing: Vec<_> = drivers::API_KINDS.iter().filter(|k| !reached.contains(*k)).collect();
    assert!(missing.is_empty(), "no api input has {missing:?}");
}

#[test]
fn the_ops_corpus_replays_without_a_divergence() {
    if common::skip_without_uffd() {
        return;
    }
    // The operations fork.
    let _fork = common::fork_lock();
    let describe = |data: &[u8]| format!("{:?}", decode(data, drivers::OPS_PAGES));
    replay("ops", &replayed("ops"), describe, |data| match drivers::ops(data)? {
        Some(_skipped) => Ok(()),
        None => Err("no instance could be made, though userfaultfd is usable".into()),
    });
}

#[test]
fn the_api_corpus_replays_without_a_broken_property() {
    if common::skip_without_uffd() {
        return;
    }
    // The instance enables EVENT_FORK: no other test may fork meanwhile.
    let _fork = common::fork_lock();
    let api = drivers::Api::new().expect("an instance, where userfaultfd is usable");
    let describe = |data: &[u8]| format!("{:?}", drivers::decode_api(data));
    replay("api", &replayed("api"), describe, |data| api.run(data));
}
