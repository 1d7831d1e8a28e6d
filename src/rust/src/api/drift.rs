use super::convert::{core_err, input_err, threads};
use extendr_api::prelude::*;
use extendr_api::Result;
use fedagg_core::ks::{ks_two_sample, Alternative};
use fedagg_core::parallel::with_threads;

/// Two-sample KS test; `exact` is NA for the automatic choice.
/// @noRd
#[extendr]
fn rs_ks_test(x: &[f64], y: &[f64], alternative: &str, exact: Rbool, n_threads: i32) -> Result<List> {
    let alternative = match alternative {
        "two.sided" => Alternative::TwoSided,
        "less" => Alternative::Less,
        "greater" => Alternative::Greater,
        other => return Err(input_err(format!("unknown alternative `{other}`"))),
    };
    let exact = if exact.is_na() { None } else { Some(exact.is_true()) };
    let r = with_threads(threads(n_threads), || ks_two_sample(x, y, alternative, exact)).map_err(core_err)?;
    Ok(list!(statistic = r.statistic, p_value = r.p_value, exact = r.exact, ties = r.ties))
}

extendr_module! {
    mod drift;
    fn rs_ks_test;
}
