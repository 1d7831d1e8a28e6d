//! Numeric core of the fedagg R package.
//!
//! Everything here is plain Rust on borrowed slices: no R types, so it can be
//! tested with `cargo test` and reused by a networked server later. Parallel
//! work is always split into blocks whose boundaries depend on the data only,
//! never on the number of threads, and partial results are combined in block
//! order: the same inputs give bitwise-identical outputs on 1 or 64 threads.

pub mod aggregate;
pub mod alloc;
pub mod client;
pub mod compress;
pub mod conv;
pub mod error;
pub mod ks;
pub mod model;
pub mod norms;
pub mod parallel;
pub mod privacy;
pub mod protocol;
pub mod rng;
pub mod strategy;
pub mod train;
#[cfg(test)]
mod test_data;
pub mod robust;
pub mod updates;

pub use error::{CoreError, CoreResult};
pub use updates::UpdateSet;
