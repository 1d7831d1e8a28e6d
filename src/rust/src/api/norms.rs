use super::convert::{core_err, doubles_list, threads, LayerObjects};
use extendr_api::prelude::*;
use extendr_api::Result;
use fedagg_core::norms;
use fedagg_core::parallel::with_threads;

/// Per-client, per-layer L2 norms, row-major (client by layer).
/// @noRd
#[extendr]
fn rs_layer_norms(layers: List, n_clients: i32, n_threads: i32) -> Result<Vec<f64>> {
    let objs = LayerObjects::new(&layers, n_clients as usize)?;
    let set = objs.update_set()?;
    let norms = with_threads(threads(n_threads), || norms::layer_norms(&set));
    Ok(norms.into_iter().flatten().collect())
}

/// Clips one update (a list of layers); returns the clipped layers and the
/// pre-clip norm(s).
/// @noRd
#[extendr]
fn rs_clip_update(layers: List, max_norm: f64, per_layer: bool, n_threads: i32) -> Result<List> {
    let objs = LayerObjects::new(&layers, 1)?;
    let set = objs.update_set()?;
    let slices: Vec<&[f64]> = (0..set.n_layers()).map(|l| set.layer(l)[0]).collect();
    let (clipped, norms) =
        with_threads(threads(n_threads), || norms::clip_layers(&slices, max_norm, per_layer)).map_err(core_err)?;
    Ok(list!(layers = doubles_list(clipped)?, norms = norms))
}

extendr_module! {
    mod norms;
    fn rs_layer_norms;
    fn rs_clip_update;
}
