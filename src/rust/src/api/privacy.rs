use super::convert::{core_err, input_err, new_doubles, threads};
use extendr_api::prelude::*;
use extendr_api::Result;
use fedagg_core::parallel::with_threads;
use fedagg_core::privacy;
use fedagg_core::privacy::rdp;

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

/// A step count from R's double: a whole number below 2^53, where doubles
/// still count one by one.
fn steps_from(steps: f64) -> Result<u64> {
    if steps >= 0.0 && steps < 9007199254740992.0 && steps.fract() == 0.0 {
        Ok(steps as u64)
    } else {
        Err(input_err(format!("`steps`: must be a whole number in [0, 2^53), not {steps}")))
    }
}

/// RDP orders from R: NULL for the default list, else a double vector.
fn orders_from(orders: &Robj) -> Result<Vec<f64>> {
    if orders.is_null() {
        return Ok(rdp::default_orders());
    }
    orders.as_real_slice().map(<[f64]>::to_vec).ok_or_else(|| input_err("`orders`: must be NULL or a double vector"))
}

/// RDP of `steps` steps of the Poisson-subsampled Gaussian mechanism, one
/// value per order (`orders` NULL: the default orders).
/// @noRd
#[extendr]
fn rs_rdp_sampled_gaussian(q: f64, noise_multiplier: f64, steps: f64, orders: Robj) -> Result<Vec<f64>> {
    let orders = orders_from(&orders)?;
    rdp::compute_rdp(q, noise_multiplier, steps_from(steps)?, &orders).map_err(core_err)
}

/// list(epsilon, order): the (epsilon, delta) guarantee of that mechanism and
/// the order that gives it (NA when epsilon is infinite).
/// @noRd
#[extendr]
fn rs_rdp_epsilon(q: f64, noise_multiplier: f64, steps: f64, delta: f64, orders: Robj) -> Result<List> {
    let orders = orders_from(&orders)?;
    let spent = rdp::epsilon(q, noise_multiplier, steps_from(steps)?, delta, &orders).map_err(core_err)?;
    Ok(list!(epsilon = spent.epsilon, order = &spent.order))
}

/// (epsilon, delta) after rounds with sampling rates `qs`, one per round.
/// @noRd
#[extendr]
fn rs_rdp_epsilon_rounds(qs: &[f64], noise_multiplier: f64, delta: f64, orders: Robj) -> Result<List> {
    let orders = orders_from(&orders)?;
    let spent = rdp::epsilon_of_rounds(qs, noise_multiplier, delta, &orders).map_err(core_err)?;
    Ok(list!(epsilon = spent.epsilon, order = &spent.order))
}

/// The smallest noise multiplier reaching (epsilon, delta) after `steps` steps.
/// @noRd
#[extendr]
fn rs_rdp_noise_multiplier(epsilon: f64, delta: f64, q: f64, steps: f64, orders: Robj) -> Result<f64> {
    let orders = orders_from(&orders)?;
    rdp::noise_multiplier(epsilon, delta, q, steps_from(steps)?, &orders).map_err(core_err)
}

/// The default RDP orders, for the R documentation and attributes.
/// @noRd
#[extendr]
fn rs_rdp_default_orders() -> Vec<f64> {
    rdp::default_orders()
}

extendr_module! {
    mod privacy;
    fn rs_gaussian_sigma;
    fn rs_add_gaussian_noise;
    fn rs_rdp_sampled_gaussian;
    fn rs_rdp_epsilon;
    fn rs_rdp_epsilon_rounds;
    fn rs_rdp_noise_multiplier;
    fn rs_rdp_default_orders;
}
