//! Built-in models: a dense network whose last layer feeds one of three
//! heads. Linear regression, logistic regression and softmax regression are
//! networks without hidden layers; an MLP adds ReLU hidden layers.
//!
//! Parameters live in one flat buffer, layer after layer: `W_l` (an
//! `inputs x outputs` matrix stored column-major, as R stores it) then `b_l`.
//! Flattening R's named list `list(W1, b1, W2, b2, ...)` with `unlist()` gives
//! exactly this buffer, so nothing is reordered crossing the boundary.

use crate::alloc::{byte_size, try_copy, try_zeroed};
use crate::error::{invalid, CoreError, CoreResult};
use crate::rng::Rng;

/// What the last layer's outputs mean, and which loss they are scored by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Head {
    /// One output, squared error: linear regression.
    Identity,
    /// One output, a logit; binary cross-entropy with labels 0/1.
    Sigmoid,
    /// One output per class; cross-entropy with labels 0..classes-1.
    Softmax,
}

impl Head {
    pub fn from_code(code: i32) -> CoreResult<Head> {
        match code {
            0 => Ok(Head::Identity),
            1 => Ok(Head::Sigmoid),
            2 => Ok(Head::Softmax),
            _ => invalid("head", format!("unknown head code {code}")),
        }
    }

    pub fn is_classifier(self) -> bool {
        self != Head::Identity
    }
}

/// Where one dense layer's parameters sit in the flat buffer.
#[derive(Clone, Copy, Debug)]
pub struct Layer {
    pub inputs: usize,
    pub outputs: usize,
    pub w: usize,
    pub b: usize,
}

/// A dense network with ReLU hidden layers.
#[derive(Clone, Debug)]
pub struct Network {
    pub layers: Vec<Layer>,
    pub head: Head,
    n_params: usize,
    widest: usize,
}

/// A data set held in row-major order, so one sample is one contiguous row.
#[derive(Clone, Debug)]
pub struct Dataset {
    pub x: Vec<f64>,
    pub y: Vec<f64>,
    pub n: usize,
    pub p: usize,
}

impl Dataset {
    /// From R's column-major `n x p` matrix.
    pub fn from_col_major(x: &[f64], n: usize, p: usize, y: &[f64]) -> CoreResult<Dataset> {
        if n.checked_mul(p) != Some(x.len()) {
            return invalid("x", format!("has {} values, expected {n} x {p}", x.len()));
        }
        if y.len() != n {
            return invalid("y", format!("has {} values for {n} rows of `x`", y.len()));
        }
        let mut rows = try_zeroed(x.len(), "the row-major copy of a client's data")?;
        for j in 0..p {
            let col = &x[j * n..(j + 1) * n];
            for (i, v) in col.iter().enumerate() {
                rows[i * p + j] = *v;
            }
        }
        Ok(Dataset { x: rows, y: try_copy(y, "a client's labels")?, n, p })
    }

    #[inline]
    pub fn row(&self, i: usize) -> &[f64] {
        &self.x[i * self.p..(i + 1) * self.p]
    }
}

/// Per-sample buffers, allocated once per training run.
pub struct Workspace {
    /// Activations: `acts[0]` is unused (the input row is borrowed), then the
    /// output of every layer (pre-activation for the last one).
    acts: Vec<Vec<f64>>,
    delta: Vec<f64>,
    delta_prev: Vec<f64>,
}

impl Network {
    /// `sizes` = inputs, hidden..., outputs.
    pub fn new(sizes: &[usize], head: Head) -> CoreResult<Network> {
        if sizes.len() < 2 {
            return invalid("sizes", "needs at least an input and an output size");
        }
        if sizes.contains(&0) {
            return invalid("sizes", "every layer needs at least one unit");
        }
        let outputs = *sizes.last().unwrap();
        match head {
            Head::Identity | Head::Sigmoid if outputs != 1 => {
                return invalid("sizes", "linear and logistic heads have one output")
            }
            Head::Softmax if outputs < 2 => return invalid("sizes", "a softmax head needs at least 2 classes"),
            _ => {}
        }
        let too_many = || {
            CoreError::Memory(format!("a network with layer sizes {sizes:?} has more parameters than can be addressed"))
        };
        let mut layers = Vec::with_capacity(sizes.len() - 1);
        let mut offset: usize = 0;
        for pair in sizes.windows(2) {
            let (inputs, outputs) = (pair[0], pair[1]);
            let b = inputs.checked_mul(outputs).and_then(|n| n.checked_add(offset)).ok_or_else(too_many)?;
            layers.push(Layer { inputs, outputs, w: offset, b });
            offset = b.checked_add(outputs).ok_or_else(too_many)?;
        }
        // Every later buffer indexes parameters in bytes, so they must fit too.
        byte_size::<f64>(offset, "the model parameters").map_err(|_| too_many())?;
        let widest = *sizes.iter().max().unwrap();
        Ok(Network { layers, head, n_params: offset, widest })
    }

    pub fn n_params(&self) -> usize {
        self.n_params
    }

    /// A zeroed buffer of one value per parameter (parameters, gradients,
    /// velocities): `what` names it in the error when memory runs short.
    pub fn zeroed_params(&self, what: &str) -> CoreResult<Vec<f64>> {
        try_zeroed(self.n_params, what)
    }

    pub fn n_inputs(&self) -> usize {
        self.layers[0].inputs
    }

    pub fn n_outputs(&self) -> usize {
        self.layers.last().unwrap().outputs
    }

    pub fn workspace(&self) -> CoreResult<Workspace> {
        let what = "the per-sample workspace of the model";
        let mut acts = vec![Vec::new()];
        for layer in &self.layers {
            acts.push(try_zeroed(layer.outputs, what)?);
        }
        Ok(Workspace { acts, delta: try_zeroed(self.widest, what)?, delta_prev: try_zeroed(self.widest, what)? })
    }

    /// Seeded initial parameters. `scheme` 0: all zeros (the usual start for
    /// convex models); 1: Glorot-uniform weights and zero biases, with He
    /// scaling for layers that feed a ReLU.
    pub fn init(&self, scheme: i32, seed: u64) -> CoreResult<Vec<f64>> {
        let mut params = self.zeroed_params("the model parameters")?;
        match scheme {
            0 => {}
            1 => {
                let mut rng = Rng::new(seed, 0x1217);
                let last = self.layers.len() - 1;
                for (l, layer) in self.layers.iter().enumerate() {
                    let fan = (layer.inputs + layer.outputs) as f64;
                    let gain = if l < last { 2.0f64.sqrt() } else { 1.0 };
                    let limit = gain * (6.0 / fan).sqrt();
                    for w in &mut params[layer.w..layer.b] {
                        *w = limit * (2.0 * rng.uniform() - 1.0);
                    }
                }
            }
            _ => return invalid("init", format!("unknown initialisation scheme {scheme}")),
        }
        Ok(params)
    }

    /// Forward pass of one row; the last layer's pre-activations end up in
    /// `ws.acts[last]`.
    #[inline(always)]
    fn forward(&self, params: &[f64], row: &[f64], ws: &mut Workspace) {
        let last = self.layers.len() - 1;
        for (l, layer) in self.layers.iter().enumerate() {
            let (before, after) = ws.acts.split_at_mut(l + 1);
            let input: &[f64] = if l == 0 { row } else { &before[l] };
            let out = &mut after[0];
            let w = &params[layer.w..layer.b];
            let b = &params[layer.b..layer.b + layer.outputs];
            for j in 0..layer.outputs {
                let col = &w[j * layer.inputs..(j + 1) * layer.inputs];
                let z = b[j] + dot(input, col);
                out[j] = if l < last && z < 0.0 { 0.0 } else { z };
            }
        }
    }

    /// Loss of one sample from the output pre-activations, writing d loss /
    /// d output into `delta` when given.
    #[inline(always)]
    fn head_loss(&self, out: &[f64], y: f64, delta: Option<&mut [f64]>) -> f64 {
        match self.head {
            Head::Identity => {
                let r = out[0] - y;
                if let Some(d) = delta {
                    d[0] = 2.0 * r;
                }
                r * r
            }
            Head::Sigmoid => {
                let z = out[0];
                // log(1 + e^z) - y z, written so it never overflows.
                let softplus = z.max(0.0) + (-z.abs()).exp().ln_1p();
                if let Some(d) = delta {
                    d[0] = sigmoid(z) - y;
                }
                softplus - y * z
            }
            Head::Softmax => {
                let class = y as usize;
                let max = out.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                match delta {
                    Some(d) => {
                        // One exp per class, shared by the loss and the gradient.
                        let mut sum = 0.0;
                        for (dk, z) in d.iter_mut().zip(out) {
                            *dk = (z - max).exp();
                            sum += *dk;
                        }
                        let inv = 1.0 / sum;
                        d.iter_mut().for_each(|dk| *dk *= inv);
                        d[class] -= 1.0;
                        max + sum.ln() - out[class]
                    }
                    None => {
                        let sum: f64 = out.iter().map(|z| (z - max).exp()).sum();
                        max + sum.ln() - out[class]
                    }
                }
            }
        }
    }

    /// Adds the gradient of one sample's loss to `grad` and returns the loss.
    #[inline(always)]
    fn accumulate(&self, params: &[f64], row: &[f64], y: f64, grad: &mut [f64], ws: &mut Workspace) -> f64 {
        self.forward(params, row, ws);
        let last = self.layers.len() - 1;
        let outputs = self.layers[last].outputs;
        let loss = {
            let (acts, delta) = (&ws.acts[last + 1], &mut ws.delta[..outputs]);
            self.head_loss(acts, y, Some(delta))
        };
        for l in (0..=last).rev() {
            let layer = self.layers[l];
            let input: &[f64] = if l == 0 { row } else { &ws.acts[l] };
            let delta = &ws.delta[..layer.outputs];
            let (gw, gb) = grad[layer.w..layer.b + layer.outputs].split_at_mut(layer.inputs * layer.outputs);
            for j in 0..layer.outputs {
                let dj = delta[j];
                gb[j] += dj;
                if dj != 0.0 {
                    let col = &mut gw[j * layer.inputs..(j + 1) * layer.inputs];
                    for (g, a) in col.iter_mut().zip(input) {
                        *g += a * dj;
                    }
                }
            }
            if l > 0 {
                let w = &params[layer.w..layer.b];
                let prev = &mut ws.delta_prev[..layer.inputs];
                prev.iter_mut().for_each(|v| *v = 0.0);
                for j in 0..layer.outputs {
                    let dj = delta[j];
                    if dj != 0.0 {
                        let col = &w[j * layer.inputs..(j + 1) * layer.inputs];
                        for (p, c) in prev.iter_mut().zip(col) {
                            *p += c * dj;
                        }
                    }
                }
                // ReLU: no gradient where the unit was off.
                for (p, a) in prev.iter_mut().zip(&ws.acts[l]) {
                    if *a <= 0.0 {
                        *p = 0.0;
                    }
                }
                std::mem::swap(&mut ws.delta, &mut ws.delta_prev);
            }
        }
        loss
    }

    /// Mean loss and gradient over the rows in `rows` (gradient written, not added).
    #[inline(always)]
    pub fn loss_grad(&self, params: &[f64], data: &Dataset, rows: &[usize], grad: &mut [f64], ws: &mut Workspace) -> f64 {
        grad.iter_mut().for_each(|g| *g = 0.0);
        let mut total = 0.0;
        for &i in rows {
            total += self.accumulate(params, data.row(i), data.y[i], grad, ws);
        }
        let scale = 1.0 / rows.len() as f64;
        grad.iter_mut().for_each(|g| *g *= scale);
        total * scale
    }

    /// Predictions for one row written into `out`: the fitted value, the
    /// probability of class 1, or the class probabilities.
    pub fn predict_row(&self, params: &[f64], row: &[f64], out: &mut [f64], ws: &mut Workspace) {
        self.forward(params, row, ws);
        let z = &ws.acts[self.layers.len()];
        match self.head {
            Head::Identity => out[0] = z[0],
            Head::Sigmoid => out[0] = sigmoid(z[0]),
            Head::Softmax => {
                let max = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let mut sum = 0.0;
                for (o, v) in out.iter_mut().zip(z) {
                    *o = (v - max).exp();
                    sum += *o;
                }
                out.iter_mut().for_each(|o| *o /= sum);
            }
        }
    }

    /// Mean loss and the task metric (accuracy for classifiers, RMSE for
    /// regression) on a whole data set.
    pub fn evaluate(&self, params: &[f64], data: &Dataset) -> CoreResult<Evaluation> {
        let mut ws = self.workspace()?;
        let last = self.layers.len();
        let (mut loss, mut metric) = (0.0, 0.0);
        for i in 0..data.n {
            self.forward(params, data.row(i), &mut ws);
            let out = &ws.acts[last];
            let y = data.y[i];
            loss += self.head_loss(out, y, None);
            metric += match self.head {
                Head::Identity => (out[0] - y).powi(2),
                Head::Sigmoid => ((out[0] > 0.0) as u8 as f64 == y) as u8 as f64,
                Head::Softmax => (argmax(out) as f64 == y) as u8 as f64,
            };
        }
        let n = data.n as f64;
        let metric = if self.head == Head::Identity { (metric / n).sqrt() } else { metric / n };
        Ok(Evaluation { loss: loss / n, metric, n: data.n })
    }

    /// Checks that a data set fits this network: width and label range.
    pub fn check_data(&self, data: &Dataset) -> CoreResult<()> {
        if data.p != self.n_inputs() {
            return invalid("x", format!("has {} columns, the model expects {}", data.p, self.n_inputs()));
        }
        if data.n == 0 {
            return invalid("x", "has no rows");
        }
        let classes = match self.head {
            Head::Identity => None,
            Head::Sigmoid => Some(2),
            Head::Softmax => Some(self.n_outputs()),
        };
        if let Some(c) = classes {
            if let Some(bad) = data.y.iter().find(|&&y| !(y >= 0.0 && y < c as f64 && y.fract() == 0.0)) {
                return invalid("y", format!("has label {bad}, outside 0..{}", c - 1));
            }
        } else if data.y.iter().any(|y| !y.is_finite()) {
            return invalid("y", "has non-finite values");
        }
        Ok(())
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Evaluation {
    pub loss: f64,
    pub metric: f64,
    pub n: usize,
}

/// Dot product with eight independent partial sums, so the additions do not
/// wait on each other (a single running sum is latency-bound). The order is
/// fixed by the data length alone: results do not depend on threads.
#[inline(always)]
fn dot(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f64; 8];
    let chunks = n / 8;
    for c in 0..chunks {
        let (x, y) = (&a[c * 8..c * 8 + 8], &b[c * 8..c * 8 + 8]);
        for k in 0..8 {
            acc[k] += x[k] * y[k];
        }
    }
    let mut tail = 0.0;
    for k in chunks * 8..n {
        tail += a[k] * b[k];
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

#[inline]
fn sigmoid(z: f64) -> f64 {
    if z >= 0.0 {
        1.0 / (1.0 + (-z).exp())
    } else {
        let e = z.exp();
        e / (1.0 + e)
    }
}

fn argmax(v: &[f64]) -> usize {
    let mut best = 0;
    for (k, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = k;
        }
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toy(n: usize, p: usize, head: Head, classes: usize, seed: u64) -> Dataset {
        let mut rng = Rng::new(seed, 3);
        let x: Vec<f64> = (0..n * p).map(|_| rng.normal()).collect();
        let y = (0..n)
            .map(|_| match head {
                Head::Identity => rng.normal(),
                Head::Sigmoid => rng.below(2) as f64,
                Head::Softmax => rng.below(classes as u64) as f64,
            })
            .collect::<Vec<_>>();
        Dataset::from_col_major(&x, n, p, &y).unwrap()
    }

    fn finite_difference_check(sizes: &[usize], head: Head) {
        let net = Network::new(sizes, head).unwrap();
        let data = toy(7, sizes[0], head, *sizes.last().unwrap(), 11);
        let mut params = net.init(1, 5).unwrap();
        let mut rng = Rng::new(9, 1);
        params.iter_mut().for_each(|p| *p += 0.1 * rng.normal());
        let rows: Vec<usize> = (0..data.n).collect();
        let mut ws = net.workspace().unwrap();
        let mut grad = vec![0.0; net.n_params()];
        net.loss_grad(&params, &data, &rows, &mut grad, &mut ws);
        let mut scratch = vec![0.0; net.n_params()];
        let h = 1e-6;
        for k in 0..net.n_params() {
            let mut plus = params.clone();
            plus[k] += h;
            let mut minus = params.clone();
            minus[k] -= h;
            let fp = net.loss_grad(&plus, &data, &rows, &mut scratch, &mut ws);
            let fm = net.loss_grad(&minus, &data, &rows, &mut scratch, &mut ws);
            let numeric = (fp - fm) / (2.0 * h);
            assert!((numeric - grad[k]).abs() < 1e-6 * (1.0 + numeric.abs()), "{head:?} param {k}: {numeric} vs {}", grad[k]);
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        finite_difference_check(&[4, 1], Head::Identity);
        finite_difference_check(&[4, 1], Head::Sigmoid);
        finite_difference_check(&[4, 3], Head::Softmax);
        finite_difference_check(&[4, 5, 3, 3], Head::Softmax);
        finite_difference_check(&[3, 6, 1], Head::Sigmoid);
    }

    #[test]
    fn layout_matches_r_unlist() {
        let net = Network::new(&[3, 4, 2], Head::Softmax).unwrap();
        assert_eq!(net.n_params(), 3 * 4 + 4 + 4 * 2 + 2);
        assert_eq!(net.layers[1].w, 16);
        assert_eq!(net.layers[1].b, 24);
    }

    #[test]
    fn parameter_count_overflow_is_a_memory_error() {
        let err = Network::new(&[usize::MAX / 2, 3, 1], Head::Identity).unwrap_err();
        assert!(matches!(&err, CoreError::Memory(m) if m.contains("more parameters than can be addressed")), "{err}");
        // Fits in usize but not in bytes.
        assert!(matches!(Network::new(&[1 << 61, 1], Head::Identity), Err(CoreError::Memory(_))));
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_network_too_large_for_memory_fails_to_init_instead_of_aborting() {
        // model_mlp(60, hidden = .Machine$integer.max, 10): about 1.2 TiB of parameters.
        let net = Network::new(&[60, 2_147_483_647, 10], Head::Softmax).unwrap();
        assert_eq!(net.n_params(), 60 * 2_147_483_647 + 2_147_483_647 + 2_147_483_647 * 10 + 10);
        for scheme in [0, 1] {
            let err = net.init(scheme, 1).unwrap_err();
            let CoreError::Memory(msg) = &err else { panic!("{err:?}") };
            assert!(msg.contains("the model parameters") && msg.contains(&format!("{} bytes", 8 * net.n_params())), "{msg}");
        }
    }

    #[test]
    fn dataset_size_is_checked_without_overflow() {
        assert!(Dataset::from_col_major(&[0.0; 4], usize::MAX / 2, 4, &[0.0; 1]).is_err());
        let d = Dataset::from_col_major(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 2, 3, &[0.0, 1.0]).unwrap();
        assert_eq!(d.x, vec![1.0, 3.0, 5.0, 2.0, 4.0, 6.0]);
    }

    #[test]
    fn labels_out_of_range_are_rejected() {
        let net = Network::new(&[2, 3], Head::Softmax).unwrap();
        let data = Dataset::from_col_major(&[0.0; 4], 2, 2, &[0.0, 3.0]).unwrap();
        assert!(net.check_data(&data).is_err());
    }
}
