use extendr_api::prelude::*;

/// Number of cores Rust sees.
/// @noRd
#[extendr]
fn rs_available_threads() -> i32 {
    fedagg_core::parallel::available_threads() as i32
}

extendr_module! {
    mod threads;
    fn rs_available_threads;
}
