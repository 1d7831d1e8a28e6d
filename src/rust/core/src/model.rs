//! Built-in models: a dense network whose last layer feeds one of three
//! heads. Linear regression, logistic regression and softmax regression are
//! networks without hidden layers; an MLP adds ReLU hidden layers.
//!
//! Parameters live in one flat buffer, layer after layer: `W_l` (an
//! `inputs x outputs` matrix stored column-major, as R stores it) then `b_l`.
//! Flattening R's named list `list(W1, b1, W2, b2, ...)` with `unlist()` gives
//! exactly this buffer, so nothing is reordered crossing the boundary.

use crate::alloc::{byte_size, try_copy, try_filled, try_zeroed};
use crate::conv::{Front, FrontBlock, FrontOp, Hwc};
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

/// A dense network with ReLU hidden layers, after an optional
/// convolutional front (see `conv`).
#[derive(Clone, Debug)]
pub struct Network {
    pub front: Option<Front>,
    pub layers: Vec<Layer>,
    /// Dropout after each dense layer's ReLU while training, in parts per
    /// million (0: none; always 0 for the output layer).
    pub dropout: Vec<usize>,
    pub head: Head,
    pub precision: Precision,
    n_params: usize,
    widest: usize,
}

/// The arithmetic a model computes in. Parameters, optimizer state and the
/// loss always stay float64; `F32` runs the forward and backward products in
/// float32 (about twice the throughput) on a float32 copy of the parameters
/// made at every step, and hands back a float64 gradient.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Precision {
    F64,
    F32,
}

impl Precision {
    pub fn from_code(code: i32) -> CoreResult<Precision> {
        match code {
            64 => Ok(Precision::F64),
            32 => Ok(Precision::F32),
            _ => invalid("precision", format!("unknown precision code {code}")),
        }
    }
}

/// Rows processed by one matrix product. A minibatch up to this size is one
/// block; larger batches (full-batch FedSGD, evaluation) are cut into blocks
/// of this many rows, so the workspace stays bounded whatever `n` is. The
/// cut depends on the row count alone, never on threads.
pub const BLOCK_ROWS: usize = 256;

/// A client's data as R holds it: an `n x p` column-major feature matrix and
/// `n` labels, borrowed, never copied whole. Training gathers the rows of
/// each minibatch into a small row-major block.
#[derive(Clone, Copy, Debug)]
pub struct Dataset<'a> {
    pub x: &'a [f64],
    pub y: &'a [f64],
    pub n: usize,
    pub p: usize,
}

impl<'a> Dataset<'a> {
    /// Borrows an R `n x p` matrix (column-major) and its labels.
    pub fn new(x: &'a [f64], n: usize, p: usize, y: &'a [f64]) -> CoreResult<Dataset<'a>> {
        if n.checked_mul(p) != Some(x.len()) {
            return invalid("x", format!("has {} values, expected {n} x {p}", x.len()));
        }
        if y.len() != n {
            return invalid("y", format!("has {} values for {n} rows of `x`", y.len()));
        }
        Ok(Dataset { x, y, n, p })
    }

    /// Copies the rows `rows` into `out`, row-major (`rows.len() x p`).
    #[inline]
    fn gather<T: Real>(&self, rows: &[usize], out: &mut [T], labels: &mut [f64]) {
        let (n, p) = (self.n, self.p);
        for (b, &i) in rows.iter().enumerate() {
            let dst = &mut out[b * p..(b + 1) * p];
            for (j, v) in dst.iter_mut().enumerate() {
                *v = T::of(self.x[j * n + i]);
            }
            labels[b] = self.y[i];
        }
    }

    /// Copies the `m` consecutive rows from `start` into `out`, reading each
    /// column in order.
    #[inline]
    fn gather_range<T: Real>(&self, start: usize, m: usize, out: &mut [T], labels: &mut [f64]) {
        let (n, p) = (self.n, self.p);
        for j in 0..p {
            let col = &self.x[j * n + start..j * n + start + m];
            for (b, v) in col.iter().enumerate() {
                out[b * p + j] = T::of(*v);
            }
        }
        labels[..m].copy_from_slice(&self.y[start..start + m]);
    }
}

/// Owned data, for tests and callers that build data in Rust.
#[derive(Clone, Debug)]
pub struct OwnedData {
    pub x: Vec<f64>,
    pub y: Vec<f64>,
    pub n: usize,
    pub p: usize,
}

impl OwnedData {
    pub fn from_col_major(x: &[f64], n: usize, p: usize, y: &[f64]) -> CoreResult<OwnedData> {
        Dataset::new(x, n, p, y)?;
        Ok(OwnedData { x: try_copy(x, "a client's data")?, y: try_copy(y, "a client's labels")?, n, p })
    }

    pub fn view(&self) -> Dataset<'_> {
        Dataset { x: &self.x, y: &self.y, n: self.n, p: self.p }
    }
}

/// A float type the matrix kernels run in.
pub trait Real: Copy + Default + PartialOrd + Send + Sync + std::ops::Add<Output = Self> + std::ops::Mul<Output = Self> + std::ops::AddAssign + 'static {
    const ZERO: Self;
    const ONE: Self;
    fn of(v: f64) -> Self;
    fn f64(self) -> f64;
    /// `C = alpha A B + beta C` for an `m x k` A, a `k x n` B and an `m x n`
    /// C with the given (row, column) strides.
    ///
    /// # Safety
    /// The strides must keep every index inside the pointers' buffers.
    #[allow(clippy::too_many_arguments)]
    unsafe fn gemm_raw(m: usize, k: usize, n: usize, alpha: Self, a: *const Self, rsa: isize, csa: isize, b: *const Self, rsb: isize, csb: isize, beta: Self, c: *mut Self, rsc: isize, csc: isize);
}

// The products come from `matrixmultiply` (blocked, packed, with AVX2/FMA
// kernels chosen at run time). Measured on this project's 2-core VM for the
// MLP 784-512-10 minibatch shapes (32 x 784 x 512): 45 GFLOP/s float64 and
// 73 float32 per core, level with the `gemm` crate (44 / 69) at a third of
// its code size, and 6x the per-sample matrix-vector loop it replaces
// (about 7.5 GFLOP/s). Each product runs on one thread: clients run in
// parallel, so the summation order of a client's run never depends on the
// number of threads.
impl Real for f64 {
    const ZERO: f64 = 0.0;
    const ONE: f64 = 1.0;
    #[inline(always)]
    fn of(v: f64) -> f64 {
        v
    }
    #[inline(always)]
    fn f64(self) -> f64 {
        self
    }
    unsafe fn gemm_raw(m: usize, k: usize, n: usize, alpha: f64, a: *const f64, rsa: isize, csa: isize, b: *const f64, rsb: isize, csb: isize, beta: f64, c: *mut f64, rsc: isize, csc: isize) {
        matrixmultiply::dgemm(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc)
    }
}

impl Real for f32 {
    const ZERO: f32 = 0.0;
    const ONE: f32 = 1.0;
    #[inline(always)]
    fn of(v: f64) -> f32 {
        v as f32
    }
    #[inline(always)]
    fn f64(self) -> f64 {
        self as f64
    }
    unsafe fn gemm_raw(m: usize, k: usize, n: usize, alpha: f32, a: *const f32, rsa: isize, csa: isize, b: *const f32, rsb: isize, csb: isize, beta: f32, c: *mut f32, rsc: isize, csc: isize) {
        matrixmultiply::sgemm(m, k, n, alpha, a, rsa, csa, b, rsb, csb, beta, c, rsc, csc)
    }
}

/// A matrix inside a buffer: `rows x cols`, element (i, j) at `i rs + j cs`.
#[derive(Clone, Copy)]
struct Shape {
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl Shape {
    fn row_major(rows: usize, cols: usize) -> Shape {
        Shape { rows, cols, rs: cols, cs: 1 }
    }
    fn col_major(rows: usize, cols: usize) -> Shape {
        Shape { rows, cols, rs: 1, cs: rows }
    }
    fn t(self) -> Shape {
        Shape { rows: self.cols, cols: self.rows, rs: self.cs, cs: self.rs }
    }
    fn fits(self, len: usize) -> bool {
        self.rows == 0 || self.cols == 0 || (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < len
    }
}

/// `c = alpha a b + beta c`, bounds-checked.
#[inline]
#[allow(clippy::too_many_arguments)]
fn gemm<T: Real>(alpha: T, a: &[T], sa: Shape, b: &[T], sb: Shape, beta: T, c: &mut [T], sc: Shape) {
    assert!(sa.cols == sb.rows && sc.rows == sa.rows && sc.cols == sb.cols, "gemm: shapes do not chain");
    assert!(sa.fits(a.len()) && sb.fits(b.len()) && sc.fits(c.len()), "gemm: a matrix runs past its buffer");
    if sc.rows == 0 || sc.cols == 0 {
        return;
    }
    // SAFETY: the shapes chain and every index stays inside its slice, checked above.
    unsafe {
        T::gemm_raw(
            sa.rows, sa.cols, sb.cols, alpha,
            a.as_ptr(), sa.rs as isize, sa.cs as isize,
            b.as_ptr(), sb.rs as isize, sb.cs as isize,
            beta, c.as_mut_ptr(), sc.rs as isize, sc.cs as isize,
        )
    }
}

/// `c = alpha a w + beta c`: `a` is `rows x k` row-major, `w` is `k x n`
/// column-major (a layer's weights), `c` is `rows x n` row-major.
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_rm<T: Real>(alpha: T, a: &[T], rows: usize, k: usize, w: &[T], n: usize, beta: T, c: &mut [T]) {
    gemm(alpha, a, Shape::row_major(rows, k), w, Shape::col_major(k, n), beta, c, Shape::row_major(rows, n));
}

/// `c = alpha a' d + beta c`: `a` is `rows x k` and `d` is `rows x n`, both
/// row-major; `c` is `k x n` column-major (a weight gradient).
#[allow(clippy::too_many_arguments)]
pub(crate) fn gemm_tn_cm<T: Real>(alpha: T, a: &[T], rows: usize, k: usize, d: &[T], n: usize, beta: T, c: &mut [T]) {
    gemm(alpha, a, Shape::row_major(rows, k).t(), d, Shape::row_major(rows, n), beta, c, Shape::col_major(k, n));
}

/// `c = alpha d w'`: `d` is `rows x n` row-major, `w` is `k x n`
/// column-major; `c` is `rows x k` row-major (overwritten).
pub(crate) fn gemm_nt_rm<T: Real>(alpha: T, d: &[T], rows: usize, n: usize, w: &[T], k: usize, c: &mut [T]) {
    gemm(alpha, d, Shape::row_major(rows, n), w, Shape::col_major(k, n).t(), T::ZERO, c, Shape::row_major(rows, k));
}

/// Buffers for one block of rows in one precision.
struct Block<T> {
    rows: usize,
    /// The gathered rows, row-major.
    x: Vec<T>,
    labels: Vec<f64>,
    /// Output of every layer for the block (after ReLU for hidden layers,
    /// pre-activation for the last), row-major.
    acts: Vec<Vec<T>>,
    delta: Vec<T>,
    delta_prev: Vec<T>,
    /// One output row in float64, for the head.
    head_z: Vec<f64>,
    head_d: Vec<f64>,
    /// Column sums of a layer's deltas (its bias gradient).
    bias_sums: Vec<T>,
    front: Option<FrontBlock<T>>,
    /// The dense layers' dropout masks of the block (empty without dropout).
    masks: Vec<Vec<T>>,
}

enum Buffers {
    F64(Block<f64>),
    /// `fresh`: `params` already holds the current parameters (written by
    /// `sgd_step_f32`), so the next step need not convert them again.
    F32 { block: Block<f32>, params: Vec<f32>, grad: Vec<f32>, fresh: bool },
}

/// Buffers of a training or evaluation run, allocated once per run and
/// sized by the block, not by the data set.
pub struct Workspace {
    buffers: Buffers,
    /// The training step's key for dropout masks; `None` (the default, and
    /// what evaluation uses) turns dropout off.
    pub dropout_key: Option<u64>,
}

impl Workspace {
    /// Plain SGD on the float32 gradient of the last `loss_grad_f32`:
    /// `p -= lr g` in float64, the float32 copy written in the same pass
    /// (so the next step does not convert the parameters again). Exactly
    /// the arithmetic of `loss_grad` followed by a float64 SGD step.
    pub fn sgd_step_f32(&mut self, params: &mut [f64], lr: f64) {
        if let Buffers::F32 { params: p32, grad: g32, fresh, .. } = &mut self.buffers {
            for ((p, q), g) in params.iter_mut().zip(p32.iter_mut()).zip(g32.iter()) {
                *p -= lr * (*g as f64);
                *q = *p as f32;
            }
            *fresh = true;
        }
    }
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
        let dropout = vec![0; layers.len()];
        Ok(Network { front: None, layers, dropout, head, precision: Precision::F64, n_params: offset, widest })
    }

    /// A dense network (`input` and `front` empty) or a convolutional one
    /// (`input` = height, width, channels; `front` = the layers' codes).
    pub fn from_parts(sizes: &[usize], head: Head, precision: Precision, input: &[usize], front: &[[usize; 5]]) -> CoreResult<Network> {
        let net = if input.is_empty() && front.is_empty() {
            Network::new(sizes, head)?
        } else {
            let &[h, w, c] = input else { return invalid("input", "must be a height, a width and a number of channels") };
            // Code 6 is a dropout after a dense hidden layer: [6, layer, ppm].
            let ops = front.iter().filter(|c| c[0] != 6).map(|&code| FrontOp::from_code(code)).collect::<CoreResult<Vec<_>>>()?;
            let mut net = Network::with_front((h, w, c), &ops, sizes, head)?;
            for code in front.iter().filter(|c| c[0] == 6) {
                let (layer, ppm) = (code[1], code[2]);
                if layer >= net.layers.len() - 1 {
                    return invalid("layers", format!("a dropout after dense layer {} of {} hidden layers", layer.saturating_add(1), net.layers.len() - 1));
                }
                if ppm >= 1_000_000 {
                    return invalid("layers", "a dropout rate must be below 1");
                }
                net.dropout[layer] = ppm;
            }
            net
        };
        Ok(net.with_precision(precision))
    }

    /// A convolutional network: the front's stages on `input` images, then
    /// dense layers `sizes` (whose first size is the front's flattened
    /// output). The front's parameters come first in the flat buffer.
    pub fn with_front(input: Hwc, ops: &[FrontOp], sizes: &[usize], head: Head) -> CoreResult<Network> {
        let front = Front::new(input, ops)?;
        if sizes.first() != Some(&front.n_outputs()) {
            return invalid(
                "sizes",
                format!("the dense layers take {} inputs, but the convolutional layers give {}", sizes.first().copied().unwrap_or(0), front.n_outputs()),
            );
        }
        let mut net = Network::new(sizes, head)?;
        let shift = front.n_params;
        for l in &mut net.layers {
            l.w += shift;
            l.b += shift;
        }
        net.n_params = net
            .n_params
            .checked_add(shift)
            .ok_or_else(|| CoreError::Memory("a network with more parameters than can be addressed".into()))?;
        byte_size::<f64>(net.n_params, "the model parameters")?;
        net.front = Some(front);
        Ok(net)
    }

    /// The same network computing in `precision`.
    pub fn with_precision(mut self, precision: Precision) -> Network {
        self.precision = precision;
        self
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
        match &self.front {
            Some(f) => f.n_inputs(),
            None => self.layers[0].inputs,
        }
    }

    pub fn n_outputs(&self) -> usize {
        self.layers.last().unwrap().outputs
    }

    fn block<T: Real>(&self, rows: usize) -> CoreResult<Block<T>> {
        let what = "the workspace of the model's matrix products";
        let sized = |width: usize| -> CoreResult<Vec<T>> {
            let len = rows.checked_mul(width).ok_or_else(|| CoreError::Memory(format!("{what} exceed the address space")))?;
            try_filled(len, T::ZERO, what)
        };
        let mut acts = Vec::with_capacity(self.layers.len());
        for layer in &self.layers {
            acts.push(sized(layer.outputs)?);
        }
        Ok(Block {
            rows,
            x: sized(self.n_inputs())?,
            labels: try_zeroed(rows, what)?,
            acts,
            delta: sized(self.widest)?,
            delta_prev: sized(self.widest)?,
            head_z: try_zeroed(self.n_outputs(), what)?,
            head_d: try_zeroed(self.n_outputs(), what)?,
            bias_sums: try_filled(self.widest, T::ZERO, what)?,
            front: match &self.front {
                Some(f) => Some(f.block(rows)?),
                None => None,
            },
            masks: self
                .layers
                .iter()
                .zip(&self.dropout)
                .map(|(l, &ppm)| if ppm > 0 { sized(l.outputs) } else { Ok(Vec::new()) })
                .collect::<CoreResult<Vec<_>>>()?,
        })
    }

    /// Buffers for runs whose minibatches have at most `max_rows` rows.
    pub fn workspace(&self, max_rows: usize) -> CoreResult<Workspace> {
        let rows = max_rows.clamp(1, BLOCK_ROWS);
        // Checked once as a whole: each buffer below is allocated on its
        // own, and many too small to be checked against free memory one by
        // one can still add up to more than there is (a model described by
        // a message from elsewhere can be as wide as it likes).
        let front = match &self.front {
            Some(f) => f.values_per_row(),
            None => Some(0),
        };
        // Dense layers with dropout keep a mask as wide as their output.
        let dense = self.layers.iter().zip(&self.dropout).try_fold(self.n_inputs(), |acc, (l, &ppm)| {
            acc.checked_add(if ppm > 0 { 2 * l.outputs } else { l.outputs })
        });
        let widths = dense.zip(front).and_then(|(a, b)| a.checked_add(b));
        let bytes = widths
            .and_then(|w| w.checked_add(2 * self.widest))
            .and_then(|w| w.checked_mul(rows))
            .and_then(|n| n.checked_mul(std::mem::size_of::<f64>()));
        let Some(bytes) = bytes else {
            return Err(CoreError::Memory("the workspace of the model's matrix products exceeds the address space".into()));
        };
        crate::alloc::check_bytes(bytes, "the workspace of the model's matrix products")?;
        let buffers = match self.precision {
            Precision::F64 => Buffers::F64(self.block(rows)?),
            Precision::F32 => Buffers::F32 {
                block: self.block(rows)?,
                params: try_filled(self.n_params, 0.0f32, "the float32 copy of the parameters")?,
                grad: try_filled(self.n_params, 0.0f32, "the float32 gradient")?,
                fresh: false,
            },
        };
        Ok(Workspace { buffers, dropout_key: None })
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
                // Convolutions: Glorot-uniform over the window's fans, He
                // scaling (each feeds a ReLU in fedagg's CNNs), zero biases.
                if let Some(front) = &self.front {
                    for s in &front.stages {
                        if let FrontOp::Conv { out, k, .. } = s.op {
                            let fan = (k * k * (s.input.2 + out)) as f64;
                            let limit = 2.0f64.sqrt() * (6.0 / fan).sqrt();
                            for w in &mut params[s.w..s.b] {
                                *w = limit * (2.0 * rng.uniform() - 1.0);
                            }
                        }
                    }
                }
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
            2 => {
                // PyTorch's defaults for Conv2d and Linear: weights by
                // kaiming_uniform_(a = sqrt(5)) and biases alike, both
                // U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
                let mut rng = Rng::new(seed, 0x1217);
                let mut fill = |range: std::ops::Range<usize>, fan_in: usize, rng: &mut Rng| {
                    let bound = 1.0 / (fan_in as f64).sqrt();
                    for v in &mut params[range] {
                        *v = bound * (2.0 * rng.uniform() - 1.0);
                    }
                };
                if let Some(front) = &self.front {
                    for s in &front.stages {
                        if let FrontOp::Conv { out, k, .. } = s.op {
                            let fan_in = k * k * s.input.2;
                            fill(s.w..s.b, fan_in, &mut rng);
                            fill(s.b..s.b + out, fan_in, &mut rng);
                        }
                    }
                }
                for layer in &self.layers {
                    fill(layer.w..layer.b, layer.inputs, &mut rng);
                    fill(layer.b..layer.b + layer.outputs, layer.inputs, &mut rng);
                }
            }
            _ => return invalid("init", format!("unknown initialisation scheme {scheme}")),
        }
        Ok(params)
    }

    /// Forward pass of the first `m` gathered rows of `blk`: every layer is
    /// one product `A W` (W is `inputs x outputs`, column-major) plus bias.
    fn forward_block<T: Real>(&self, params: &[T], m: usize, blk: &mut Block<T>, dropout: Option<(u64, usize)>) {
        if let (Some(front), Some(fb)) = (&self.front, blk.front.as_mut()) {
            front.forward(params, &blk.x, m, fb, dropout);
        }
        let last = self.layers.len() - 1;
        for (l, layer) in self.layers.iter().enumerate() {
            let (inputs, outputs) = (layer.inputs, layer.outputs);
            let (before, after) = blk.acts.split_at_mut(l);
            let input: &[T] = match (l, &self.front, &blk.front) {
                (0, Some(front), Some(fb)) => front.output(&blk.x, m, fb),
                (0, _, _) => &blk.x[..m * inputs],
                _ => &before[l - 1][..m * inputs],
            };
            let out = &mut after[0][..m * outputs];
            let w = &params[layer.w..layer.b];
            gemm(T::ONE, input, Shape::row_major(m, inputs), w, Shape::col_major(inputs, outputs), T::ZERO, out, Shape::row_major(m, outputs));
            let bias = &params[layer.b..layer.b + outputs];
            for row in out.chunks_exact_mut(outputs) {
                for (z, b) in row.iter_mut().zip(bias) {
                    let v = *b + *z;
                    *z = if l < last && v < T::ZERO { T::ZERO } else { v };
                }
            }
            if let (Some((key, block)), true) = (dropout, self.dropout[l] > 0) {
                let mask = &mut blk.masks[l][..m * outputs];
                crate::conv::dropout_mask(key, block, 1000 + l, crate::conv::dropout_rate(self.dropout[l]), mask);
                for (z, k) in out.iter_mut().zip(mask.iter()) {
                    *z = *z * *k;
                }
            }
        }
    }

    /// Sum of the block's losses, in float64; writes d loss / d output of
    /// every row into `blk.delta`.
    fn head_block<T: Real>(&self, m: usize, blk: &mut Block<T>) -> f64 {
        let outputs = self.n_outputs();
        let out = &blk.acts[self.layers.len() - 1][..m * outputs];
        let mut total = 0.0;
        for (b, (row, d)) in out.chunks_exact(outputs).zip(blk.delta[..m * outputs].chunks_exact_mut(outputs)).enumerate() {
            for (z, v) in blk.head_z.iter_mut().zip(row) {
                *z = v.f64();
            }
            total += self.head_loss(&blk.head_z, blk.labels[b], Some(&mut blk.head_d));
            for (dk, v) in d.iter_mut().zip(&blk.head_d) {
                *dk = T::of(*v);
            }
        }
        total
    }

    /// Writes (first block) or adds (later blocks) `scale` times the block's
    /// summed gradient to `grad`: per layer, `A' D` for the weights, column
    /// sums of D for the biases, and `D W'` (masked by the ReLU) for the
    /// layer below. Scaling inside the products and writing with the first
    /// block save two passes over the parameters per step.
    #[allow(clippy::too_many_arguments)]
    fn backward_block<T: Real>(&self, params: &[T], m: usize, scale: T, first: bool, dropout_on: bool, grad: &mut [T], blk: &mut Block<T>) {
        for l in (0..self.layers.len()).rev() {
            let layer = self.layers[l];
            let (inputs, outputs) = (layer.inputs, layer.outputs);
            let input: &[T] = match (l, &self.front, &blk.front) {
                (0, Some(front), Some(fb)) => front.output(&blk.x, m, fb),
                (0, _, _) => &blk.x[..m * inputs],
                _ => &blk.acts[l - 1][..m * inputs],
            };
            let delta = &blk.delta[..m * outputs];
            let (gw, gb) = grad[layer.w..layer.b + outputs].split_at_mut(inputs * outputs);
            let beta = if first { T::ZERO } else { T::ONE };
            gemm(scale, input, Shape::row_major(m, inputs).t(), delta, Shape::row_major(m, outputs), beta, gw, Shape::col_major(inputs, outputs));
            let sums = &mut blk.bias_sums[..outputs];
            sums.iter_mut().for_each(|s| *s = T::ZERO);
            for row in delta.chunks_exact(outputs) {
                for (s, d) in sums.iter_mut().zip(row) {
                    *s += *d;
                }
            }
            for (g, s) in gb.iter_mut().zip(sums.iter()) {
                *g = if first { scale * *s } else { *g + scale * *s };
            }
            if l > 0 {
                let w = &params[layer.w..layer.b];
                let prev = &mut blk.delta_prev[..m * inputs];
                gemm(T::ONE, delta, Shape::row_major(m, outputs), w, Shape::col_major(inputs, outputs).t(), T::ZERO, prev, Shape::row_major(m, inputs));
                // ReLU: no gradient where the unit was off.
                for (p, a) in prev.iter_mut().zip(input) {
                    if *a <= T::ZERO {
                        *p = T::ZERO;
                    }
                }
                if dropout_on && self.dropout[l - 1] > 0 {
                    for (p, k) in prev.iter_mut().zip(&blk.masks[l - 1][..m * inputs]) {
                        *p = *p * *k;
                    }
                }
                std::mem::swap(&mut blk.delta, &mut blk.delta_prev);
            } else if let (Some(front), Some(fb)) = (&self.front, blk.front.as_mut()) {
                // Into the front: its own stages mask their gradients.
                let w = &params[layer.w..layer.b];
                let prev = &mut blk.delta_prev[..m * inputs];
                gemm(T::ONE, delta, Shape::row_major(m, outputs), w, Shape::col_major(inputs, outputs).t(), T::ZERO, prev, Shape::row_major(m, inputs));
                front.backward(params, &blk.x, m, prev, scale, first, dropout_on, grad, fb);
            }
        }
    }

    /// Summed loss over `rows`; writes the mean gradient to `grad`, block by
    /// block. The rows of each block are gathered from R's column-major
    /// matrix: about 7 % of a step when the rows are shuffled; laying out
    /// each epoch's rows in order first measured no faster for one epoch,
    /// and would hold a second copy of the client's data.
    #[allow(clippy::too_many_arguments)]
    fn loss_grad_sum<T: Real>(&self, params: &[T], data: &Dataset<'_>, rows: &[usize], grad: &mut [T], blk: &mut Block<T>, key: Option<u64>) -> f64 {
        let scale = T::of(1.0 / rows.len() as f64);
        let mut total = 0.0;
        for (b, chunk) in rows.chunks(blk.rows).enumerate() {
            let m = chunk.len();
            data.gather(chunk, &mut blk.x[..m * data.p], &mut blk.labels);
            self.forward_block(params, m, blk, key.map(|k| (k, b)));
            total += self.head_block(m, blk);
            self.backward_block(params, m, scale, b == 0, key.is_some(), grad, blk);
        }
        total
    }

    /// Whether any layer drops out while training.
    pub fn has_dropout(&self) -> bool {
        self.dropout.iter().any(|&p| p > 0)
            || self.front.as_ref().map_or(false, |f| f.stages.iter().any(|s| matches!(s.op, FrontOp::Dropout { ppm } if ppm > 0)))
    }

    /// Mean loss and gradient over the rows in `rows` (gradient written, not added).
    pub fn loss_grad(&self, params: &[f64], data: &Dataset<'_>, rows: &[usize], grad: &mut [f64], ws: &mut Workspace) -> f64 {
        if rows.is_empty() {
            grad.iter_mut().for_each(|g| *g = f64::NAN);
            return f64::NAN;
        }
        let key = ws.dropout_key;
        let total = match &mut ws.buffers {
            Buffers::F64(blk) => self.loss_grad_sum(params, data, rows, grad, blk, key),
            Buffers::F32 { block, params: p32, grad: g32, fresh } => {
                if !*fresh {
                    for (q, p) in p32.iter_mut().zip(params) {
                        *q = *p as f32;
                    }
                }
                *fresh = false;
                let total = self.loss_grad_sum(p32, data, rows, g32, block, key);
                for (g, v) in grad.iter_mut().zip(g32.iter()) {
                    *g = *v as f64;
                }
                total
            }
        };
        total / rows.len() as f64
    }

    /// Float32 networks and plain SGD: `loss_grad` that leaves the gradient
    /// in the workspace, in float32, for `Workspace::sgd_step_f32`. None for
    /// a float64 network. The step then reads the gradient once and writes
    /// both parameter copies in one pass, where `loss_grad` and a separate
    /// step take three (measured: the conversions were about 20 % of a
    /// float32 step of the 784-512-10 MLP).
    pub fn loss_grad_f32(&self, params: &[f64], data: &Dataset<'_>, rows: &[usize], ws: &mut Workspace) -> Option<f64> {
        let key = ws.dropout_key;
        let Buffers::F32 { block, params: p32, grad: g32, fresh } = &mut ws.buffers else { return None };
        if rows.is_empty() {
            return Some(f64::NAN);
        }
        if !*fresh {
            for (q, p) in p32.iter_mut().zip(params) {
                *q = *p as f32;
            }
        }
        *fresh = false;
        Some(self.loss_grad_sum(p32, data, rows, g32, block, key) / rows.len() as f64)
    }

    /// Runs `visit(row, outputs)` over every row of `data` in order, with the
    /// last layer's pre-activations in float64.
    fn for_each_output(&self, params: &[f64], data: &Dataset<'_>, mut visit: impl FnMut(usize, &[f64])) -> CoreResult<()> {
        fn run<T: Real>(net: &Network, params: &[T], data: &Dataset<'_>, blk: &mut Block<T>, visit: &mut impl FnMut(usize, &[f64])) {
            let outputs = net.n_outputs();
            let last = net.layers.len() - 1;
            let mut start = 0;
            while start < data.n {
                let m = blk.rows.min(data.n - start);
                data.gather_range(start, m, &mut blk.x[..m * data.p], &mut blk.labels);
                net.forward_block(params, m, blk, None);
                for (b, row) in blk.acts[last][..m * outputs].chunks_exact(outputs).enumerate() {
                    for (z, v) in blk.head_z.iter_mut().zip(row) {
                        *z = v.f64();
                    }
                    visit(start + b, &blk.head_z);
                }
                start += m;
            }
        }
        let mut ws = self.workspace(data.n)?;
        match &mut ws.buffers {
            Buffers::F64(block) => run(self, params, data, block, &mut visit),
            Buffers::F32 { block, params: p32, fresh, .. } => {
                for (q, p) in p32.iter_mut().zip(params) {
                    *q = *p as f32;
                }
                *fresh = false;
                run(self, p32, data, block, &mut visit)
            }
        }
        Ok(())
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

    /// Predictions for every row of `data`, written column-major into `out`
    /// (`n x k`): the fitted value, the probability of class 1, or the class
    /// probabilities.
    pub fn predict(&self, params: &[f64], data: &Dataset<'_>, out: &mut [f64]) -> CoreResult<()> {
        let n = data.n;
        let head = self.head;
        self.for_each_output(params, data, |i, z| match head {
            Head::Identity => out[i] = z[0],
            Head::Sigmoid => out[i] = sigmoid(z[0]),
            Head::Softmax => {
                let max = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let sum: f64 = z.iter().map(|v| (v - max).exp()).sum();
                for (c, v) in z.iter().enumerate() {
                    out[c * n + i] = (v - max).exp() / sum;
                }
            }
        })
    }

    /// Mean loss and the task metric (accuracy for classifiers, RMSE for
    /// regression) on a whole data set.
    pub fn evaluate(&self, params: &[f64], data: &Dataset<'_>) -> CoreResult<Evaluation> {
        let (mut loss, mut metric) = (0.0, 0.0);
        self.for_each_output(params, data, |i, out| {
            let y = data.y[i];
            loss += self.head_loss(out, y, None);
            metric += match self.head {
                Head::Identity => (out[0] - y).powi(2),
                Head::Sigmoid => ((out[0] > 0.0) as u8 as f64 == y) as u8 as f64,
                Head::Softmax => (argmax(out) as f64 == y) as u8 as f64,
            };
        })?;
        let n = data.n as f64;
        let metric = if self.head == Head::Identity { (metric / n).sqrt() } else { metric / n };
        Ok(Evaluation { loss: loss / n, metric, n: data.n })
    }

    /// Checks that a data set fits this network: width and label range.
    pub fn check_data(&self, data: &Dataset<'_>) -> CoreResult<()> {
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
    use crate::test_data::{random_data, reference_loss_grad, relative_gap};

    fn toy(n: usize, p: usize, head: Head, classes: usize, seed: u64) -> OwnedData {
        let mut rng = Rng::new(seed, 3);
        let x: Vec<f64> = (0..n * p).map(|_| rng.normal()).collect();
        let y = (0..n)
            .map(|_| match head {
                Head::Identity => rng.normal(),
                Head::Sigmoid => rng.below(2) as f64,
                Head::Softmax => rng.below(classes as u64) as f64,
            })
            .collect::<Vec<_>>();
        OwnedData::from_col_major(&x, n, p, &y).unwrap()
    }

    fn finite_difference_check(sizes: &[usize], head: Head) {
        let net = Network::new(sizes, head).unwrap();
        let owned = toy(7, sizes[0], head, *sizes.last().unwrap(), 11);
        let data = owned.view();
        let mut params = net.init(1, 5).unwrap();
        let mut rng = Rng::new(9, 1);
        params.iter_mut().for_each(|p| *p += 0.1 * rng.normal());
        let rows: Vec<usize> = (0..data.n).collect();
        let mut ws = net.workspace(data.n).unwrap();
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

    /// A random network: 0-2 hidden layers of 1-40 units, any head.
    fn random_network(rng: &mut Rng, case: usize) -> Network {
        let head = [Head::Softmax, Head::Sigmoid, Head::Identity][case % 3];
        let mut sizes = vec![1 + rng.below(30) as usize];
        for _ in 0..rng.below(3) {
            sizes.push(1 + rng.below(40) as usize);
        }
        sizes.push(if head == Head::Softmax { 2 + rng.below(9) as usize } else { 1 });
        Network::new(&sizes, head).unwrap()
    }

    #[test]
    fn matrix_kernels_equal_the_per_sample_reference() {
        let mut rng = Rng::new(2026, 11);
        for case in 0..60 {
            let net = random_network(&mut rng, case);
            // Up to 1.5 blocks of rows, so some batches are cut in two.
            let n = 1 + rng.below(BLOCK_ROWS as u64 * 3 / 2) as usize;
            let owned = random_data(&net, n, case as u64);
            let data = owned.view();
            let mut params = net.init(1, case as u64).unwrap();
            params.iter_mut().for_each(|p| *p += 0.1 * rng.normal());
            let mut order: Vec<usize> = (0..n).collect();
            for i in (1..n).rev() {
                order.swap(i, rng.below(i as u64 + 1) as usize);
            }
            for m in [1, 2.min(n), 1 + rng.below(n as u64) as usize, n] {
                let rows = &order[..m];
                let mut ws = net.workspace(m).unwrap();
                let mut grad = vec![f64::NAN; net.n_params()];
                let loss = net.loss_grad(&params, &data, rows, &mut grad, &mut ws);
                let (ref_loss, ref_grad) = reference_loss_grad(&net, &params, &data, rows);
                let sizes: Vec<usize> = net.layers.iter().map(|l| l.inputs).collect();
                assert!((loss - ref_loss).abs() <= 1e-12 * ref_loss.abs().max(1e-300), "case {case} {sizes:?} m = {m}: loss {loss} vs {ref_loss}");
                let gap = relative_gap(&grad, &ref_grad);
                assert!(gap <= 1e-12, "case {case} {sizes:?} {:?} m = {m}: gradient gap {gap:e}", net.head);
                // Float32 products: the same values to float32 accuracy.
                let net32 = net.clone().with_precision(Precision::F32);
                let mut ws32 = net32.workspace(m).unwrap();
                let loss32 = net32.loss_grad(&params, &data, rows, &mut grad, &mut ws32);
                assert!((loss32 - ref_loss).abs() <= 1e-4 * (1.0 + ref_loss.abs()), "case {case} m = {m}: float32 loss {loss32} vs {ref_loss}");
                let gap32 = relative_gap(&grad, &ref_grad);
                assert!(gap32 <= 1e-4, "case {case} m = {m}: float32 gradient gap {gap32:e}");
            }
            // Evaluation and prediction read the same forward pass.
            let all: Vec<usize> = (0..n).collect();
            let (ref_loss, _) = reference_loss_grad(&net, &params, &data, &all);
            let eval = net.evaluate(&params, &data).unwrap();
            assert!((eval.loss - ref_loss).abs() <= 1e-12 * ref_loss.abs().max(1e-300), "case {case}: evaluate {} vs {ref_loss}", eval.loss);
        }
    }

    #[test]
    fn predictions_are_the_heads_of_the_forward_pass() {
        let mut rng = Rng::new(5, 5);
        for case in 0..9 {
            let net = random_network(&mut rng, case);
            let owned = random_data(&net, 300, case as u64);
            let data = owned.view();
            let params = net.init(1, 3).unwrap();
            let k = if net.head == Head::Softmax { net.n_outputs() } else { 1 };
            let mut out = vec![0.0; data.n * k];
            net.predict(&params, &data, &mut out).unwrap();
            for i in [0, 137, 299] {
                let (loss, _) = reference_loss_grad(&net, &params, &data, &[i]);
                let y = data.y[i];
                let expected_loss = match net.head {
                    Head::Identity => (out[i] - y).powi(2),
                    Head::Sigmoid => -(y * out[i].ln() + (1.0 - y) * (1.0 - out[i]).ln()),
                    Head::Softmax => -out[y as usize * data.n + i].ln(),
                };
                assert!((loss - expected_loss).abs() < 1e-10 * (1.0 + loss), "case {case} row {i}: {loss} vs {expected_loss}");
            }
        }
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
        assert!(Dataset::new(&[0.0; 4], usize::MAX / 2, 4, &[0.0; 1]).is_err());
        let d = OwnedData::from_col_major(&[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], 2, 3, &[0.0, 1.0]).unwrap();
        let mut rows = [0.0; 6];
        let mut labels = [0.0; 2];
        d.view().gather(&[1, 0], &mut rows, &mut labels);
        assert_eq!((rows, labels), ([2.0, 4.0, 6.0, 1.0, 3.0, 5.0], [1.0, 0.0]));
        d.view().gather_range(0, 2, &mut rows, &mut labels);
        assert_eq!(rows, [1.0, 3.0, 5.0, 2.0, 4.0, 6.0]);
    }

    #[test]
    fn labels_out_of_range_are_rejected() {
        let net = Network::new(&[2, 3], Head::Softmax).unwrap();
        let data = Dataset::new(&[0.0; 4], 2, 2, &[0.0, 3.0]).unwrap();
        assert!(net.check_data(&data).is_err());
    }
}
