//! # hmm-tools: what tests and measures hmm, apart from the library
//!
//! Applications and device drivers link `hmm` alone; the `hmm` program and
//! the test suites also use these, which stand on hmm's public API:
//!
//! - [`stress`]: model-based random testing: random operations applied both
//!   to hmm and to a reference model, every byte and the accounting compared
//!   after every step (`hmm stress`, the stress suite, the fuzz targets).
//! - [`bench`](mod@bench): the baselines (memcpy, the bare userfaultfd round
//!   trip, ...) and every figure measured beside them (`hmm bench`).

#![warn(missing_docs)]

pub mod bench;
pub mod stress;
