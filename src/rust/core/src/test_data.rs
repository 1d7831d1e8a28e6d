//! Data shared by the unit tests of several modules.

use crate::model::{Dataset, Head, Network, OwnedData};
use crate::rng::Rng;

/// Three Gaussian blobs in three features, one per class, shifted by `shift`.
pub fn blobs(n: usize, seed: u64, shift: f64) -> OwnedData {
    let mut rng = Rng::new(seed, 0);
    let p = 3;
    let mut x = vec![0.0; n * p];
    let mut y = vec![0.0; n];
    for i in 0..n {
        let class = rng.below(3) as usize;
        y[i] = class as f64;
        for j in 0..p {
            x[j * n + i] = rng.normal() + if j == class { 2.0 + shift } else { 0.0 };
        }
    }
    OwnedData::from_col_major(&x, n, p, &y).unwrap()
}

/// Mean loss and gradient over `rows`, one sample at a time with plain loops
/// written from the definitions (dense layers, ReLU, the three heads): the
/// reference the blocked matrix kernels of `model` are tested against.
pub fn reference_loss_grad(net: &Network, params: &[f64], data: &Dataset<'_>, rows: &[usize]) -> (f64, Vec<f64>) {
    let last = net.layers.len() - 1;
    let mut grad = vec![0.0; net.n_params()];
    let mut total = 0.0;
    for &i in rows {
        let mut acts = vec![(0..data.p).map(|j| data.x[j * data.n + i]).collect::<Vec<f64>>()];
        for (l, layer) in net.layers.iter().enumerate() {
            let input = &acts[l];
            let out: Vec<f64> = (0..layer.outputs)
                .map(|j| {
                    let z = params[layer.b + j] + (0..layer.inputs).map(|k| input[k] * params[layer.w + k + j * layer.inputs]).sum::<f64>();
                    if l < last { z.max(0.0) } else { z }
                })
                .collect();
            acts.push(out);
        }
        let z = &acts[last + 1];
        let y = data.y[i];
        let (loss, mut delta) = match net.head {
            Head::Identity => ((z[0] - y).powi(2), vec![2.0 * (z[0] - y)]),
            Head::Sigmoid => {
                let prob = 1.0 / (1.0 + (-z[0]).exp());
                (-(y * prob.ln() + (1.0 - y) * (1.0 - prob).ln()), vec![prob - y])
            }
            Head::Softmax => {
                let max = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = z.iter().map(|v| (v - max).exp()).sum();
                let prob: Vec<f64> = z.iter().map(|v| (v - max).exp() / sum).collect();
                let class = y as usize;
                let delta = prob.iter().enumerate().map(|(k, p)| p - (k == class) as u8 as f64).collect();
                (-prob[class].ln(), delta)
            }
        };
        total += loss;
        for l in (0..=last).rev() {
            let layer = net.layers[l];
            let input = &acts[l];
            for j in 0..layer.outputs {
                grad[layer.b + j] += delta[j];
                for k in 0..layer.inputs {
                    grad[layer.w + k + j * layer.inputs] += input[k] * delta[j];
                }
            }
            if l > 0 {
                delta = (0..layer.inputs)
                    .map(|k| {
                        let back: f64 = (0..layer.outputs).map(|j| params[layer.w + k + j * layer.inputs] * delta[j]).sum();
                        if input[k] > 0.0 { back } else { 0.0 }
                    })
                    .collect();
            }
        }
    }
    let scale = 1.0 / rows.len() as f64;
    (total * scale, grad.iter().map(|g| g * scale).collect())
}

/// Random data that fits `net`: normal features, labels of its head.
pub fn random_data(net: &Network, n: usize, seed: u64) -> OwnedData {
    let mut rng = Rng::new(seed, 8);
    let p = net.n_inputs();
    let x: Vec<f64> = (0..n * p).map(|_| rng.normal()).collect();
    let y: Vec<f64> = (0..n)
        .map(|_| match net.head {
            Head::Identity => rng.normal(),
            Head::Sigmoid => rng.below(2) as f64,
            Head::Softmax => rng.below(net.n_outputs() as u64) as f64,
        })
        .collect();
    OwnedData::from_col_major(&x, n, p, &y).unwrap()
}

/// Largest absolute difference, relative to the largest entry of `reference`.
pub fn relative_gap(a: &[f64], reference: &[f64]) -> f64 {
    assert_eq!(a.len(), reference.len());
    let scale = reference.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(f64::MIN_POSITIVE);
    a.iter().zip(reference).fold(0.0f64, |m, (x, y)| m.max((x - y).abs())) / scale
}
