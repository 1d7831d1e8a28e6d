use super::convert::{core_err, threads, LayerObjects};
use extendr_api::prelude::*;
use extendr_api::Result;
use fedagg_core::alloc;
use fedagg_core::parallel::{available_threads, sum_all, with_threads};

/// Number of cores Rust sees.
/// @noRd
#[extendr]
fn rs_available_threads() -> i32 {
    available_threads() as i32
}

/// Sums a list of double vectors in parallel: the read-bandwidth probe of
/// bench/aggregate.R.
/// @noRd
#[extendr]
fn rs_stream_sum(vectors: List, n_threads: i32) -> Result<f64> {
    let objs = LayerObjects::new(&List::from_values([vectors.clone()]), vectors.len())?;
    let set = objs.update_set()?;
    Ok(with_threads(threads(n_threads), || sum_all(set.layer(0))))
}

/// Checks that `bytes` (a double: R sizes can exceed 2^31) fit in the memory
/// available now, for buffers R itself will allocate from user input.
/// @noRd
#[extendr]
fn rs_check_memory(bytes: f64, what: &str) -> Result<()> {
    if !(bytes >= 0.0) || bytes >= usize::MAX as f64 {
        return Err(core_err(fedagg_core::CoreError::Memory(format!(
            "cannot allocate {what}: {bytes} bytes exceed the address space"
        ))));
    }
    alloc::check_bytes(bytes as usize, what).map_err(core_err)
}

extendr_module! {
    mod threads;
    fn rs_available_threads;
    fn rs_stream_sum;
    fn rs_check_memory;
}
