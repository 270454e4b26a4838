//! The public API with arbitrary arguments (see `hmm_fuzz::Api`): a panic,
//! a hang, a crash or a broken property is a crash. One instance serves
//! every input of the process.

#![no_main]

use std::sync::OnceLock;

use hmm_fuzz::Api;
use libfuzzer_sys::fuzz_target;

/// The instance, or `None` where hmm cannot run (every input then passes).
static API: OnceLock<Option<Api>> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    let Some(api) = API.get_or_init(|| Api::new().ok()) else { return };
    if let Err(violation) = api.run(data) {
        panic!("{violation}");
    }
});
