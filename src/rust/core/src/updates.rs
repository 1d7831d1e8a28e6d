//! A set of client updates: borrowed slices, layer-major.

use crate::alloc::try_zeroed;
use crate::error::{invalid, CoreError, CoreResult};
use crate::parallel::min_len;
use rayon::prelude::*;

/// `layers[l][k]` is layer `l` of client `k`. Every client has the same layers
/// and every layer has one length across clients. Nothing is copied: the
/// slices borrow the caller's memory (R vectors, in the package).
#[derive(Debug, Clone)]
pub struct UpdateSet<'a> {
    layers: Vec<Vec<&'a [f64]>>,
    n_clients: usize,
}

/// Where a non-finite value sits: 0-based client, layer and position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub client: usize,
    pub layer: usize,
    pub index: usize,
}

impl<'a> UpdateSet<'a> {
    pub fn new(layers: Vec<Vec<&'a [f64]>>) -> CoreResult<Self> {
        let Some(first) = layers.first() else {
            return invalid("updates", "has no layers");
        };
        let n_clients = first.len();
        if n_clients == 0 {
            return invalid("updates", "has no clients");
        }
        for (l, layer) in layers.iter().enumerate() {
            if layer.len() != n_clients {
                return invalid(
                    "updates",
                    format!("layer {} has {} clients, not {n_clients}", l + 1, layer.len()),
                );
            }
            let len = layer[0].len();
            if let Some(k) = layer.iter().position(|x| x.len() != len) {
                return Err(CoreError::Client(
                    k,
                    format!("layer {} has length {}, not {len}", l + 1, layer[k].len()),
                ));
            }
        }
        Ok(Self { layers, n_clients })
    }

    /// A single-layer set from one slice per client.
    pub fn from_vectors(clients: Vec<&'a [f64]>) -> CoreResult<Self> {
        Self::new(vec![clients])
    }

    pub fn n_clients(&self) -> usize {
        self.n_clients
    }

    pub fn n_layers(&self) -> usize {
        self.layers.len()
    }

    pub fn layer(&self, l: usize) -> &[&'a [f64]] {
        &self.layers[l]
    }

    pub fn layer_len(&self, l: usize) -> usize {
        self.layers[l][0].len()
    }

    pub fn layer_lens(&self) -> Vec<usize> {
        (0..self.n_layers()).map(|l| self.layer_len(l)).collect()
    }

    /// Total number of parameters of one client.
    pub fn dim(&self) -> usize {
        self.layer_lens().iter().sum()
    }

    /// The first non-finite value, searching clients in order (deterministic).
    pub fn first_non_finite(&self) -> Option<Position> {
        (0..self.n_clients)
            .into_par_iter()
            .with_min_len(min_len())
            .filter_map(|k| {
                self.layers.iter().enumerate().find_map(|(l, layer)| {
                    layer[k]
                        .iter()
                        .position(|v| !v.is_finite())
                        .map(|index| Position { client: k, layer: l, index })
                })
            })
            .min_by_key(|p| p.client)
    }

    /// Errors with the first non-finite value, if any.
    pub fn require_finite(&self) -> CoreResult<()> {
        match self.first_non_finite() {
            None => Ok(()),
            Some(p) => Err(CoreError::Client(
                p.client,
                format!("layer {} has a non-finite value at position {}", p.layer + 1, p.index + 1),
            )),
        }
    }

    /// Allocates one zeroed output buffer per layer.
    pub fn zeroed_like(&self, what: &str) -> CoreResult<Vec<Vec<f64>>> {
        self.layer_lens().into_iter().map(|n| try_zeroed(n, what)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_ragged_layers_and_names_the_client() {
        let a = [1.0, 2.0];
        let b = [1.0];
        let err = UpdateSet::from_vectors(vec![&a, &b]).unwrap_err();
        assert_eq!(err, CoreError::Client(1, "layer 1 has length 1, not 2".into()));
        assert!(UpdateSet::new(vec![]).is_err());
        assert!(UpdateSet::from_vectors(vec![]).is_err());
    }

    #[test]
    fn finds_first_non_finite_by_client() {
        let a = [1.0, 2.0];
        let b = [1.0, f64::NAN];
        let c = [f64::INFINITY, 0.0];
        let set = UpdateSet::from_vectors(vec![&a, &b, &c]).unwrap();
        assert_eq!(set.first_non_finite(), Some(Position { client: 1, layer: 0, index: 1 }));
        assert!(set.require_finite().is_err());
    }
}
