use super::convert::{core_err, input_err, new_doubles, threads};
use extendr_api::prelude::*;
use extendr_api::Result;
use fedagg_core::parallel::with_threads;
use fedagg_core::privacy;

/// Noise standard deviation of the Gaussian mechanism.
/// @noRd
#[extendr]
fn rs_gaussian_sigma(sensitivity: f64, epsilon: f64, delta: f64, method: &str) -> Result<f64> {
    match method {
        "analytic" => privacy::analytic_sigma(sensitivity, epsilon, delta),
        "classic" => privacy::classic_sigma(sensitivity, epsilon, delta),
        other => return Err(input_err(format!("unknown method `{other}`"))),
    }
    .map_err(core_err)
}

/// Copies of the layers with N(0, sigma^2) noise added; `seed` is a whole
/// number below 2^53 chosen on the R side.
/// @noRd
#[extendr]
fn rs_add_gaussian_noise(layers: List, sigma: f64, seed: f64, n_threads: i32) -> Result<List> {
    let seed = seed as u64;
    let mut out = Vec::with_capacity(layers.len());
    for (l, layer) in layers.values().enumerate() {
        let x = layer.as_real_slice().ok_or_else(|| input_err(format!("layer {} is not double", l + 1)))?;
        let mut failure = None;
        let noisy = new_doubles(x.len(), |o| {
            o.copy_from_slice(x);
            if let Err(e) = with_threads(threads(n_threads), || privacy::add_noise_in_place(o, sigma, seed, l as u64)) {
                failure = Some(e);
            }
        })?;
        if let Some(e) = failure {
            return Err(core_err(e));
        }
        out.push(noisy);
    }
    Ok(List::from_values(out))
}

extendr_module! {
    mod privacy;
    fn rs_gaussian_sigma;
    fn rs_add_gaussian_noise;
}
