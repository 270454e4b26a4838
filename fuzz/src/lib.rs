//! The drivers of hmm's fuzz targets (see `fuzz/drivers.rs`, which the
//! stable test `crates/hmm/tests/fuzz_corpus.rs` shares with the targets).

#[path = "../drivers.rs"]
mod drivers;

pub use drivers::*;
