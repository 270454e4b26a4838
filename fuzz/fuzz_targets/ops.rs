//! Random operations against the model: the bytes decode to operations
//! (`hmm_tools::stress::decode`) that run on a fresh instance beside a model of
//! the bytes (`hmm_tools::stress::replay`). A divergence is a crash.

#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Err(divergence) = hmm_fuzz::ops(data) {
        panic!("divergence: {divergence}");
    }
});
