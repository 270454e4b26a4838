//! The synchronization primitives of the interval notifiers: `std::sync`'s,
//! or shuttle's with the `shuttle` feature.
//!
//! The notifiers' sequence logic ([`crate::mirror`]: `Notifiers::start`, the
//! `Invalidating` guard, `read_begin` / `read_retry`) is checked by the model
//! tests in `crate::model`, which run it under [shuttle]'s scheduler: shuttle
//! explores thread interleavings only at operations on its own primitives, so
//! the code under test takes its locks, condition variables and atomics from
//! here. Without the feature these are plain re-exports of `std::sync`: the
//! same types, no cost.
//!
//! With the feature, the notifiers only work inside a shuttle test (shuttle's
//! primitives panic outside its scheduler), and the rest of the crate's tests
//! do real system calls outside shuttle: run only the model tests with it on,
//! `cargo test -p hmm --features shuttle --lib model::`.
//!
//! `Arc` is `std`'s either way: shuttle does not model reference counts
//! (`shuttle::sync::Arc` *is* `std::sync::Arc`), and `crate::mirror` shares
//! the instance's `Arc<Inner>`, which the rest of the crate makes with `std`'s.
//!
//! [shuttle]: https://docs.rs/shuttle

pub(crate) use std::sync::Arc;

#[cfg(not(feature = "shuttle"))]
pub(crate) use std::sync::{
    Condvar, Mutex, RwLock,
    atomic::{AtomicU64, Ordering},
};

#[cfg(feature = "shuttle")]
pub(crate) use shuttle::sync::{
    Condvar, Mutex, RwLock,
    atomic::{AtomicU64, Ordering},
};
