use super::convert::{core_err, doubles_list, new_doubles, optional_slice, threads, LayerObjects};
use extendr_api::prelude::*;
use extendr_api::Result;
use fedagg_core::parallel::with_threads;
use fedagg_core::{aggregate as agg, robust};

/// Weighted mean of client updates, one result vector per layer.
/// @noRd
#[extendr]
fn rs_weighted_mean(layers: List, n_clients: i32, weights: Robj, n_threads: i32) -> Result<List> {
    let objs = LayerObjects::new(&layers, n_clients as usize)?;
    let set = objs.update_set()?;
    let w = agg::normalize_weights(optional_slice(&weights), set.n_clients()).map_err(core_err)?;
    let out = (0..set.n_layers())
        .map(|l| {
            new_doubles(set.layer_len(l), |o| {
                with_threads(threads(n_threads), || agg::weighted_sum_into(set.layer(l), &w, o))
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(List::from_values(out))
}

/// First non-finite value as c(client, layer, index) (1-based), or NULL.
/// @noRd
#[extendr]
fn rs_find_non_finite(layers: List, n_clients: i32, n_threads: i32) -> Result<Robj> {
    let objs = LayerObjects::new(&layers, n_clients as usize)?;
    let set = objs.update_set()?;
    Ok(match with_threads(threads(n_threads), || set.first_non_finite()) {
        None => ().into(),
        Some(p) => [p.client as i32 + 1, p.layer as i32 + 1, p.index as i32 + 1].into(),
    })
}

/// @noRd
#[extendr]
fn rs_coordinate_median(layers: List, n_clients: i32, n_threads: i32) -> Result<List> {
    let objs = LayerObjects::new(&layers, n_clients as usize)?;
    let set = objs.update_set()?;
    let out = with_threads(threads(n_threads), || robust::coordinate_median(&set)).map_err(core_err)?;
    doubles_list(out)
}

/// @noRd
#[extendr]
fn rs_trimmed_mean(layers: List, n_clients: i32, trim: f64, n_threads: i32) -> Result<List> {
    let objs = LayerObjects::new(&layers, n_clients as usize)?;
    let set = objs.update_set()?;
    let out = with_threads(threads(n_threads), || robust::trimmed_mean(&set, trim)).map_err(core_err)?;
    doubles_list(out)
}

/// @noRd
#[extendr]
fn rs_multi_krum(layers: List, n_clients: i32, f: i32, m: i32, weights: Robj, n_threads: i32) -> Result<List> {
    let objs = LayerObjects::new(&layers, n_clients as usize)?;
    let set = objs.update_set()?;
    let w = optional_slice(&weights);
    let r = with_threads(threads(n_threads), || robust::multi_krum(&set, f as usize, m as usize, w)).map_err(core_err)?;
    let selected: Vec<i32> = r.selected.iter().map(|&i| i as i32 + 1).collect();
    Ok(list!(aggregate = doubles_list(r.aggregate)?, selected = selected, scores = r.scores))
}

/// @noRd
#[extendr]
fn rs_bulyan(layers: List, n_clients: i32, f: i32, n_threads: i32) -> Result<List> {
    let objs = LayerObjects::new(&layers, n_clients as usize)?;
    let set = objs.update_set()?;
    let r = with_threads(threads(n_threads), || robust::bulyan(&set, f as usize)).map_err(core_err)?;
    let selected: Vec<i32> = r.selected.iter().map(|&i| i as i32 + 1).collect();
    Ok(list!(aggregate = doubles_list(r.aggregate)?, selected = selected))
}

/// @noRd
#[extendr]
fn rs_geometric_median(layers: List, n_clients: i32, weights: Robj, tol: f64, max_iter: i32, n_threads: i32) -> Result<List> {
    let objs = LayerObjects::new(&layers, n_clients as usize)?;
    let set = objs.update_set()?;
    let w = optional_slice(&weights);
    let r = with_threads(threads(n_threads), || robust::geometric_median(&set, w, tol, max_iter.max(0) as usize))
        .map_err(core_err)?;
    Ok(list!(
        aggregate = doubles_list(r.aggregate)?,
        iterations = r.iterations as i32,
        converged = r.converged,
        objective = r.objective
    ))
}

extendr_module! {
    mod aggregate;
    fn rs_weighted_mean;
    fn rs_find_non_finite;
    fn rs_coordinate_median;
    fn rs_trimmed_mean;
    fn rs_multi_krum;
    fn rs_bulyan;
    fn rs_geometric_median;
}
