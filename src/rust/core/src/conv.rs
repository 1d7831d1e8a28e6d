//! The convolutional front of a network: 2-D convolutions, ReLU, and max
//! and average pooling, run before the dense layers (whose input is the
//! front's output, flattened).
//!
//! Layout. A sample's activations are stored position-major with the
//! channel fastest ("HWC": value `(h, w, c)` at `(h W + w) C + c`), so an
//! input image is one row of the data matrix in that order, and a
//! convolution's output for a block of samples is one matrix product whose
//! rows are the (sample, position) pairs and whose columns are the output
//! channels: already the next stage's layout, with nothing transposed.
//!
//! Convolution as im2col and one product per block (`matrixmultiply`),
//! the block being the minibatch (at most `BLOCK_ROWS` images). The
//! unfolded patches of a block are kept from the forward pass for the
//! weight gradient, and their buffer takes the input gradient's patches on
//! the way back. A direct convolution loop was not written to compare: the
//! products run at the kernels' speed and the unfold is a copy of `k`
//! contiguous runs of `C` values per row; bench/README.md ("CNNs against
//! PyTorch") has the speed this gives and where the time goes.
//!
//! A kernel's weights are a `(k k C_in) x C_out` column-major matrix whose
//! row `(kh k + kw) C_in + c` multiplies input channel `c` at offset
//! `(kh, kw)` of the window; its bias follows it.

use crate::alloc::try_filled;
use crate::error::{invalid, CoreError, CoreResult};
use crate::model::Real;

/// One operation of the front, as the R side describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FrontOp {
    Conv { out: usize, k: usize, stride: usize, pad: usize },
    Relu,
    MaxPool { k: usize, stride: usize },
    AvgPool { k: usize, stride: usize },
    /// Inverted dropout of `ppm` parts per million while training.
    Dropout { ppm: usize },
}

/// A dropout rate given in parts per million.
pub fn dropout_rate(ppm: usize) -> f64 {
    ppm as f64 / 1e6
}

/// The dropout mask of one block of a training step: each value kept with
/// probability `1 - rate` and then scaled by `1 / (1 - rate)`, or dropped
/// (0). Drawn from the step's `key`, the block's index and the layer's
/// `site`, in order: the same on any number of threads.
pub fn dropout_mask<T: Real>(key: u64, block: usize, site: usize, rate: f64, mask: &mut [T]) {
    let mut rng = crate::rng::Rng::new(key ^ (block as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15), 0xD70 + site as u64);
    let keep = T::of(1.0 / (1.0 - rate));
    for v in mask.iter_mut() {
        *v = if rng.uniform() < rate { T::ZERO } else { keep };
    }
}

impl FrontOp {
    /// From R's five numbers: kind (1 conv, 2 relu, 3 max pool, 4 average
    /// pool) and its sizes.
    pub fn from_code(v: [usize; 5]) -> CoreResult<FrontOp> {
        match v[0] {
            1 => Ok(FrontOp::Conv { out: v[1], k: v[2], stride: v[3], pad: v[4] }),
            2 => Ok(FrontOp::Relu),
            3 => Ok(FrontOp::MaxPool { k: v[1], stride: v[2] }),
            4 => Ok(FrontOp::AvgPool { k: v[1], stride: v[2] }),
            5 if v[1] < 1_000_000 => Ok(FrontOp::Dropout { ppm: v[1] }),
            5 => invalid("layers", "a dropout rate must be below 1"),
            k => invalid("layers", format!("unknown layer code {k}")),
        }
    }

    pub fn code(&self) -> [usize; 5] {
        match *self {
            FrontOp::Conv { out, k, stride, pad } => [1, out, k, stride, pad],
            FrontOp::Relu => [2, 0, 0, 0, 0],
            FrontOp::MaxPool { k, stride } => [3, k, stride, 0, 0],
            FrontOp::AvgPool { k, stride } => [4, k, stride, 0, 0],
            FrontOp::Dropout { ppm } => [5, ppm, 0, 0, 0],
        }
    }
}

/// Height, width, channels.
pub type Hwc = (usize, usize, usize);

fn size(s: Hwc) -> usize {
    s.0 * s.1 * s.2
}

/// One planned stage: its shapes and, for a convolution, where its weights
/// and bias sit in the flat parameters.
#[derive(Clone, Copy, Debug)]
pub struct Stage {
    pub op: FrontOp,
    pub input: Hwc,
    pub output: Hwc,
    pub w: usize,
    pub b: usize,
}

#[derive(Clone, Debug)]
pub struct Front {
    pub input: Hwc,
    pub stages: Vec<Stage>,
    pub n_params: usize,
}

impl Front {
    /// Plans the stages from the input shape; parameters start at offset 0.
    pub fn new(input: Hwc, ops: &[FrontOp]) -> CoreResult<Front> {
        if input.0 == 0 || input.1 == 0 || input.2 == 0 {
            return invalid("input", "needs a height, a width and channels of at least 1");
        }
        if input.0.checked_mul(input.1).and_then(|v| v.checked_mul(input.2)).and_then(|v| v.checked_mul(8)).is_none() {
            return Err(CoreError::Memory("the input images have more values than can be addressed".into()));
        }
        let too_big = || CoreError::Memory("the convolutional layers have more values than can be addressed".into());
        let mut shape = input;
        let mut stages = Vec::with_capacity(ops.len());
        let mut offset = 0usize;
        for (i, &op) in ops.iter().enumerate() {
            let layer = i + 1;
            let out_len = |n: usize, k: usize, s: usize, p: usize, what: &str| -> CoreResult<usize> {
                if k == 0 || s == 0 {
                    return invalid("layers", format!("layer {layer} ({what}) needs a kernel and a stride of at least 1"));
                }
                let padded = p.checked_mul(2).and_then(|p2| n.checked_add(p2)).ok_or_else(too_big)?;
                if k > padded {
                    return invalid(
                        "layers",
                        format!("layer {layer} ({what}) has a kernel of {k} but its input is {n} wide{}", if p > 0 { format!(" ({padded} padded)") } else { String::new() }),
                    );
                }
                Ok((padded - k) / s + 1)
            };
            let (output, w, b) = match op {
                FrontOp::Conv { out, k, stride, pad } => {
                    if out == 0 {
                        return invalid("layers", format!("layer {layer} (conv) needs at least one filter"));
                    }
                    let h = out_len(shape.0, k, stride, pad, "conv")?;
                    let wd = out_len(shape.1, k, stride, pad, "conv")?;
                    let weights = k.checked_mul(k).and_then(|v| v.checked_mul(shape.2)).and_then(|v| v.checked_mul(out)).ok_or_else(too_big)?;
                    let b = offset.checked_add(weights).ok_or_else(too_big)?;
                    let w = offset;
                    offset = b.checked_add(out).ok_or_else(too_big)?;
                    ((h, wd, out), w, b)
                }
                FrontOp::Relu | FrontOp::Dropout { .. } => (shape, 0, 0),
                FrontOp::MaxPool { k, stride } | FrontOp::AvgPool { k, stride } => {
                    let what = if matches!(op, FrontOp::MaxPool { .. }) { "max_pool" } else { "avg_pool" };
                    ((out_len(shape.0, k, stride, 0, what)?, out_len(shape.1, k, stride, 0, what)?, shape.2), 0, 0)
                }
            };
            // Every size used later is checked here once, with the
            // unfolded patches of a convolution: nothing after this can wrap.
            let values = output.0.checked_mul(output.1).and_then(|v| v.checked_mul(output.2)).ok_or_else(too_big)?;
            values.checked_mul(8).ok_or_else(too_big)?;
            if let FrontOp::Conv { k, .. } = op {
                output.0
                    .checked_mul(output.1)
                    .and_then(|v| v.checked_mul(k))
                    .and_then(|v| v.checked_mul(k))
                    .and_then(|v| v.checked_mul(shape.2))
                    .and_then(|v| v.checked_mul(8))
                    .ok_or_else(too_big)?;
            }
            stages.push(Stage { op, input: shape, output, w, b });
            shape = output;
        }
        Ok(Front { input, stages, n_params: offset })
    }

    pub fn n_inputs(&self) -> usize {
        size(self.input)
    }

    pub fn n_outputs(&self) -> usize {
        self.stages.last().map_or(size(self.input), |s| size(s.output))
    }

    /// Values per row of a block's buffers: every stage's output, the
    /// unfolded patches of every convolution, the widest delta twice.
    pub fn values_per_row(&self) -> Option<usize> {
        let mut total = 0usize;
        let mut widest = self.n_inputs();
        for s in &self.stages {
            total = total.checked_add(size(s.output))?;
            widest = widest.max(size(s.output));
            if let FrontOp::Conv { k, .. } = s.op {
                total = total.checked_add(s.output.0 * s.output.1 * k * k * s.input.2)?;
            }
            if let FrontOp::Dropout { .. } | FrontOp::MaxPool { .. } = s.op {
                total = total.checked_add(size(s.output))?;
            }
        }
        total.checked_add(widest.checked_mul(2)?)
    }

    pub fn block<T: Real>(&self, rows: usize) -> CoreResult<FrontBlock<T>> {
        let what = "the workspace of the convolutional layers";
        let sized = |width: usize| -> CoreResult<Vec<T>> {
            let len = rows.checked_mul(width).ok_or_else(|| CoreError::Memory(format!("{what} exceed the address space")))?;
            try_filled(len, T::ZERO, what)
        };
        let mut acts = Vec::with_capacity(self.stages.len());
        let mut cols = Vec::with_capacity(self.stages.len());
        let mut argmax = Vec::with_capacity(self.stages.len());
        let mut masks = Vec::with_capacity(self.stages.len());
        let mut widest = self.n_inputs();
        for s in &self.stages {
            acts.push(sized(size(s.output))?);
            widest = widest.max(size(s.output));
            cols.push(match s.op {
                FrontOp::Conv { k, .. } => sized(s.output.0 * s.output.1 * k * k * s.input.2)?,
                _ => Vec::new(),
            });
            argmax.push(match s.op {
                FrontOp::MaxPool { .. } => try_filled(rows * size(s.output), 0u32, what)?,
                _ => Vec::new(),
            });
            masks.push(match s.op {
                FrontOp::Dropout { .. } => sized(size(s.output))?,
                _ => Vec::new(),
            });
        }
        let filters = self.stages.iter().map(|s| if let FrontOp::Conv { out, .. } = s.op { out } else { 0 }).max().unwrap_or(0);
        Ok(FrontBlock {
            acts,
            cols,
            argmax,
            masks,
            delta: sized(widest)?,
            delta_prev: sized(widest)?,
            bias_sums: try_filled(filters, T::ZERO, what)?,
        })
    }

    /// Runs the front on the first `m` rows of `x` (`m x n_inputs`),
    /// leaving every stage's output in `blk`. `dropout`: the training
    /// step's key and the block's index (`None` when evaluating: dropout
    /// passes its input on).
    pub fn forward<T: Real>(&self, params: &[T], x: &[T], m: usize, blk: &mut FrontBlock<T>, dropout: Option<(u64, usize)>) {
        for (i, s) in self.stages.iter().enumerate() {
            let (before, after) = blk.acts.split_at_mut(i);
            let input: &[T] = if i == 0 { &x[..m * size(s.input)] } else { &before[i - 1][..m * size(s.input)] };
            let out = &mut after[0][..m * size(s.output)];
            match s.op {
                FrontOp::Conv { out: co, k, stride, pad } => {
                    let kk = k * k * s.input.2;
                    let positions = m * s.output.0 * s.output.1;
                    let col = &mut blk.cols[i][..positions * kk];
                    unfold(input, m, s.input, s.output, k, stride, pad, col);
                    crate::model::gemm_rm(T::ONE, col, positions, kk, &params[s.w..s.b], co, T::ZERO, out);
                    let bias = &params[s.b..s.b + co];
                    for row in out.chunks_exact_mut(co) {
                        for (z, b) in row.iter_mut().zip(bias) {
                            *z += *b;
                        }
                    }
                }
                FrontOp::Relu => {
                    for (o, v) in out.iter_mut().zip(input) {
                        *o = if *v > T::ZERO { *v } else { T::ZERO };
                    }
                }
                FrontOp::MaxPool { k, stride } => {
                    let am = &mut blk.argmax[i][..m * size(s.output)];
                    pool_max(input, m, s.input, s.output, k, stride, out, am);
                }
                FrontOp::AvgPool { k, stride } => pool_avg(input, m, s.input, s.output, k, stride, out),
                FrontOp::Dropout { ppm } => match dropout {
                    Some((key, block)) if ppm > 0 => {
                        let mask = &mut blk.masks[i][..out.len()];
                        dropout_mask(key, block, i, dropout_rate(ppm), mask);
                        for ((o, v), k) in out.iter_mut().zip(input).zip(mask.iter()) {
                            *o = *v * *k;
                        }
                    }
                    _ => out.copy_from_slice(input),
                },
            }
        }
    }

    /// The output of the last stage (the dense layers' input).
    pub fn output<'b, T: Real>(&self, x: &'b [T], m: usize, blk: &'b FrontBlock<T>) -> &'b [T] {
        match self.stages.len() {
            0 => &x[..m * self.n_inputs()],
            n => &blk.acts[n - 1][..m * self.n_outputs()],
        }
    }

    /// Back through the stages from `d_out`, the loss's gradient with
    /// respect to the front's output (`m x n_outputs`, already scaled as
    /// the dense layers scale theirs): writes (`first`) or adds the
    /// convolutions' gradients, `scale` times their block sums.
    #[allow(clippy::too_many_arguments)]
    pub fn backward<T: Real>(&self, params: &[T], x: &[T], m: usize, d_out: &[T], scale: T, first: bool, dropout_on: bool, grad: &mut [T], blk: &mut FrontBlock<T>) {
        let n = self.stages.len();
        if n == 0 {
            return;
        }
        blk.delta[..m * self.n_outputs()].copy_from_slice(&d_out[..m * self.n_outputs()]);
        for i in (0..n).rev() {
            let s = self.stages[i];
            let (in_len, out_len) = (m * size(s.input), m * size(s.output));
            let input: &[T] = if i == 0 { &x[..in_len] } else { &blk.acts[i - 1][..in_len] };
            let need_input_grad = i > 0;
            let delta = &blk.delta[..out_len];
            let prev = &mut blk.delta_prev[..in_len];
            match s.op {
                FrontOp::Conv { out: co, k, stride, pad } => {
                    let kk = k * k * s.input.2;
                    let positions = m * s.output.0 * s.output.1;
                    let col = &blk.cols[i][..positions * kk];
                    let beta = if first { T::ZERO } else { T::ONE };
                    // Weights: col' delta, (kk x positions)(positions x co), column-major.
                    crate::model::gemm_tn_cm(scale, col, positions, kk, delta, co, beta, &mut grad[s.w..s.b]);
                    let gb = &mut grad[s.b..s.b + co];
                    // Per block, in a buffer of the workspace (not allocated here).
                    let sums = &mut blk.bias_sums[..co];
                    sums.iter_mut().for_each(|v| *v = T::ZERO);
                    for row in delta.chunks_exact(co) {
                        for (acc, d) in sums.iter_mut().zip(row) {
                            *acc += *d;
                        }
                    }
                    for (g, v) in gb.iter_mut().zip(sums.iter()) {
                        *g = if first { scale * *v } else { *g + scale * *v };
                    }
                    if need_input_grad {
                        let dcol = &mut blk.cols[i][..positions * kk];
                        // The patches are no longer needed: their buffer takes delta W'.
                        crate::model::gemm_nt_rm(T::ONE, delta, positions, co, &params[s.w..s.b], kk, dcol);
                        prev.iter_mut().for_each(|v| *v = T::ZERO);
                        fold(dcol, m, s.input, s.output, k, stride, pad, prev);
                    }
                }
                FrontOp::Relu => {
                    if need_input_grad {
                        for ((p, d), v) in prev.iter_mut().zip(delta).zip(input) {
                            *p = if *v > T::ZERO { *d } else { T::ZERO };
                        }
                    }
                }
                FrontOp::MaxPool { .. } => {
                    if need_input_grad {
                        prev.iter_mut().for_each(|v| *v = T::ZERO);
                        let per_in = size(s.input);
                        let per_out = size(s.output);
                        let am = &blk.argmax[i][..out_len];
                        for smp in 0..m {
                            let base = smp * per_in;
                            for j in 0..per_out {
                                let o = smp * per_out + j;
                                prev[base + am[o] as usize] += delta[o];
                            }
                        }
                    }
                }
                FrontOp::AvgPool { k, stride } => {
                    if need_input_grad {
                        prev.iter_mut().for_each(|v| *v = T::ZERO);
                        unpool_avg(delta, m, s.input, s.output, k, stride, prev);
                    }
                }
                FrontOp::Dropout { ppm } => {
                    // Backward runs in training only, where the forward drew the mask.
                    if need_input_grad {
                        if ppm > 0 && dropout_on {
                            for ((p, d), k) in prev.iter_mut().zip(delta).zip(&blk.masks[i][..out_len]) {
                                *p = *d * *k;
                            }
                        } else {
                            prev.copy_from_slice(delta);
                        }
                    }
                }
            }
            if need_input_grad {
                std::mem::swap(&mut blk.delta, &mut blk.delta_prev);
            }
        }
    }
}

/// Buffers of the front for one block of rows.
pub struct FrontBlock<T> {
    acts: Vec<Vec<T>>,
    cols: Vec<Vec<T>>,
    argmax: Vec<Vec<u32>>,
    masks: Vec<Vec<T>>,
    delta: Vec<T>,
    delta_prev: Vec<T>,
    /// A convolution's bias gradient for the block (the widest's size).
    bias_sums: Vec<T>,
}

/// im2col: row `(s, oh, ow)` of `col` holds the window of that output
/// position, `(kh, kw, c)` with the channel fastest; zeros in the padding.
#[allow(clippy::too_many_arguments)]
fn unfold<T: Real>(x: &[T], m: usize, inp: Hwc, out: Hwc, k: usize, stride: usize, pad: usize, col: &mut [T]) {
    let (h, w, c) = inp;
    let kk = k * k * c;
    let mut r = 0;
    for s in 0..m {
        let img = &x[s * h * w * c..(s + 1) * h * w * c];
        for oh in 0..out.0 {
            for ow in 0..out.1 {
                let row = &mut col[r * kk..(r + 1) * kk];
                for kh in 0..k {
                    let ih = (oh * stride + kh) as isize - pad as isize;
                    for kw in 0..k {
                        let iw = (ow * stride + kw) as isize - pad as isize;
                        let dst = &mut row[(kh * k + kw) * c..(kh * k + kw + 1) * c];
                        if ih < 0 || iw < 0 || ih as usize >= h || iw as usize >= w {
                            dst.iter_mut().for_each(|v| *v = T::ZERO);
                        } else {
                            let at = (ih as usize * w + iw as usize) * c;
                            dst.copy_from_slice(&img[at..at + c]);
                        }
                    }
                }
                r += 1;
            }
        }
    }
}

/// col2im: adds every window's gradient back onto the input positions it
/// was read from (the padding's is dropped).
#[allow(clippy::too_many_arguments)]
fn fold<T: Real>(dcol: &[T], m: usize, inp: Hwc, out: Hwc, k: usize, stride: usize, pad: usize, dx: &mut [T]) {
    let (h, w, c) = inp;
    let kk = k * k * c;
    let mut r = 0;
    for s in 0..m {
        let img = &mut dx[s * h * w * c..(s + 1) * h * w * c];
        for oh in 0..out.0 {
            for ow in 0..out.1 {
                let row = &dcol[r * kk..(r + 1) * kk];
                for kh in 0..k {
                    let ih = (oh * stride + kh) as isize - pad as isize;
                    if ih < 0 || ih as usize >= h {
                        continue;
                    }
                    for kw in 0..k {
                        let iw = (ow * stride + kw) as isize - pad as isize;
                        if iw < 0 || iw as usize >= w {
                            continue;
                        }
                        let at = (ih as usize * w + iw as usize) * c;
                        for (d, v) in img[at..at + c].iter_mut().zip(&row[(kh * k + kw) * c..(kh * k + kw + 1) * c]) {
                            *d += *v;
                        }
                    }
                }
                r += 1;
            }
        }
    }
}

/// Max pooling; `argmax` keeps, per output value, the index in its
/// sample's input of the first largest value of the window (scanned by
/// rows of the window), where its gradient goes.
#[allow(clippy::too_many_arguments)]
fn pool_max<T: Real>(x: &[T], m: usize, inp: Hwc, out: Hwc, k: usize, stride: usize, y: &mut [T], argmax: &mut [u32]) {
    let (h, w, c) = inp;
    let per_out = size(out);
    for s in 0..m {
        let img = &x[s * h * w * c..(s + 1) * h * w * c];
        for oh in 0..out.0 {
            for ow in 0..out.1 {
                for ch in 0..c {
                    let mut best_at = ((oh * stride) * w + ow * stride) * c + ch;
                    let mut best = img[best_at];
                    for kh in 0..k {
                        for kw in 0..k {
                            let at = ((oh * stride + kh) * w + ow * stride + kw) * c + ch;
                            if img[at] > best {
                                best = img[at];
                                best_at = at;
                            }
                        }
                    }
                    let o = s * per_out + (oh * out.1 + ow) * c + ch;
                    y[o] = best;
                    argmax[o] = best_at as u32;
                }
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn pool_avg<T: Real>(x: &[T], m: usize, inp: Hwc, out: Hwc, k: usize, stride: usize, y: &mut [T]) {
    let (h, w, c) = inp;
    let per_out = size(out);
    let inv = T::of(1.0 / (k * k) as f64);
    for s in 0..m {
        let img = &x[s * h * w * c..(s + 1) * h * w * c];
        for oh in 0..out.0 {
            for ow in 0..out.1 {
                for ch in 0..c {
                    let mut sum = T::ZERO;
                    for kh in 0..k {
                        for kw in 0..k {
                            sum += img[((oh * stride + kh) * w + ow * stride + kw) * c + ch];
                        }
                    }
                    y[s * per_out + (oh * out.1 + ow) * c + ch] = sum * inv;
                }
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn unpool_avg<T: Real>(d: &[T], m: usize, inp: Hwc, out: Hwc, k: usize, stride: usize, dx: &mut [T]) {
    let (h, w, c) = inp;
    let per_out = size(out);
    let inv = T::of(1.0 / (k * k) as f64);
    for s in 0..m {
        let img = &mut dx[s * h * w * c..(s + 1) * h * w * c];
        for oh in 0..out.0 {
            for ow in 0..out.1 {
                for ch in 0..c {
                    let g = d[s * per_out + (oh * out.1 + ow) * c + ch] * inv;
                    for kh in 0..k {
                        for kw in 0..k {
                            img[((oh * stride + kh) * w + ow * stride + kw) * c + ch] += g;
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    //! The network's loss and gradient against an independent reference:
    //! each sample's loss computed straight from the definitions (nested
    //! loops, no unfolding, no products), in complex numbers, so that the
    //! derivative with respect to each parameter is the complex step
    //! `Im f(p + i h e_j) / h`, exact to rounding (Squire and Trapp, SIAM
    //! Review 1998) with no backward pass written twice.
    use super::*;
    use crate::error::CoreError;
    use crate::model::{Dataset, Head, Network, Precision, BLOCK_ROWS};
    use crate::rng::Rng;

    #[derive(Clone, Copy, Debug)]
    struct Cx {
        re: f64,
        im: f64,
    }

    impl Cx {
        fn real(re: f64) -> Cx {
            Cx { re, im: 0.0 }
        }
        fn add(self, o: Cx) -> Cx {
            Cx { re: self.re + o.re, im: self.im + o.im }
        }
        fn mul(self, o: Cx) -> Cx {
            Cx { re: self.re * o.re - self.im * o.im, im: self.re * o.im + self.im * o.re }
        }
        fn scale(self, s: f64) -> Cx {
            Cx { re: self.re * s, im: self.im * s }
        }
        fn exp(self) -> Cx {
            let e = self.re.exp();
            Cx { re: e * self.im.cos(), im: e * self.im.sin() }
        }
        fn ln(self) -> Cx {
            Cx { re: (self.re * self.re + self.im * self.im).sqrt().ln(), im: self.im.atan2(self.re) }
        }
    }

    /// One sample's loss, from the definitions. `mask(site)`: the sample's
    /// dropout mask at a layer (None: no dropout).
    fn sample_loss(p: &[Cx], front: &Front, net: &Network, x: &[f64], y: usize, mask: &dyn Fn(usize) -> Option<Vec<f64>>) -> Cx {
        let (mut h, mut w, mut c) = front.input;
        let mut a: Vec<Cx> = x.iter().map(|&v| Cx::real(v)).collect();
        let at = |h_: usize, w_: usize, c_: usize, wd: usize, cd: usize| (h_ * wd + w_) * cd + c_;
        for s in &front.stages {
            let (oh_n, ow_n, oc) = s.output;
            let mut out = vec![Cx::real(0.0); oh_n * ow_n * oc];
            match s.op {
                FrontOp::Conv { out: co, k, stride, pad } => {
                    for oh in 0..oh_n {
                        for ow in 0..ow_n {
                            for o in 0..co {
                                let mut z = p[s.b + o];
                                for kh in 0..k {
                                    for kw in 0..k {
                                        let ih = (oh * stride + kh) as isize - pad as isize;
                                        let iw = (ow * stride + kw) as isize - pad as isize;
                                        if ih < 0 || iw < 0 || ih >= h as isize || iw >= w as isize {
                                            continue;
                                        }
                                        for ci in 0..c {
                                            let wt = p[s.w + o * k * k * c + (kh * k + kw) * c + ci];
                                            z = z.add(wt.mul(a[at(ih as usize, iw as usize, ci, w, c)]));
                                        }
                                    }
                                }
                                out[at(oh, ow, o, ow_n, co)] = z;
                            }
                        }
                    }
                }
                FrontOp::Relu => {
                    for (o, v) in out.iter_mut().zip(&a) {
                        *o = if v.re > 0.0 { *v } else { Cx::real(0.0) };
                    }
                }
                FrontOp::Dropout { .. } => {
                    let site = front.stages.iter().position(|t| std::ptr::eq(t, s)).unwrap();
                    match mask(site) {
                        Some(m) => {
                            for ((o, v), k) in out.iter_mut().zip(&a).zip(&m) {
                                *o = v.scale(*k);
                            }
                        }
                        None => out.copy_from_slice(&a),
                    }
                }
                FrontOp::MaxPool { k, stride } | FrontOp::AvgPool { k, stride } => {
                    for oh in 0..oh_n {
                        for ow in 0..ow_n {
                            for ci in 0..c {
                                let window: Vec<Cx> = (0..k * k).map(|j| a[at(oh * stride + j / k, ow * stride + j % k, ci, w, c)]).collect();
                                out[at(oh, ow, ci, ow_n, c)] = if matches!(s.op, FrontOp::MaxPool { .. }) {
                                    let mut best = window[0];
                                    for v in &window[1..] {
                                        if v.re > best.re {
                                            best = *v;
                                        }
                                    }
                                    best
                                } else {
                                    window.iter().fold(Cx::real(0.0), |acc, v| acc.add(*v)).scale(1.0 / (k * k) as f64)
                                };
                            }
                        }
                    }
                }
            }
            a = out;
            (h, w, c) = (oh_n, ow_n, oc);
        }
        let last = net.layers.len() - 1;
        for (l, layer) in net.layers.iter().enumerate() {
            let mut z = vec![Cx::real(0.0); layer.outputs];
            for (j, zj) in z.iter_mut().enumerate() {
                let mut acc = p[layer.b + j];
                for (i, ai) in a.iter().enumerate() {
                    acc = acc.add(p[layer.w + j * layer.inputs + i].mul(*ai));
                }
                *zj = if l < last && acc.re <= 0.0 { Cx::real(0.0) } else { acc };
            }
            if net.dropout[l] > 0 {
                if let Some(m) = mask(1000 + l) {
                    for (zj, k) in z.iter_mut().zip(&m) {
                        *zj = zj.scale(*k);
                    }
                }
            }
            a = z;
        }
        let m = a.iter().map(|v| v.re).fold(f64::NEG_INFINITY, f64::max);
        let sum = a.iter().fold(Cx::real(0.0), |acc, v| acc.add(v.add(Cx::real(-m)).exp()));
        sum.ln().add(Cx::real(m)).add(a[y].scale(-1.0))
    }

    /// Mean loss and gradient over `rows` by the complex step.
    fn reference(net: &Network, params: &[f64], data: &Dataset<'_>, rows: &[usize]) -> (f64, Vec<f64>) {
        let front = net.front.as_ref().unwrap();
        let p_in = data.p;
        // Each distinct row once; repeated rows weigh more.
        let mut counts = std::collections::BTreeMap::new();
        for &r in rows {
            *counts.entry(r).or_insert(0usize) += 1;
        }
        let h = 1e-30;
        let mut grad = vec![0.0; params.len()];
        let mut loss = 0.0;
        for (&r, &count) in &counts {
            let x: Vec<f64> = (0..p_in).map(|j| data.x[j * data.n + r]).collect();
            let y = data.y[r] as usize;
            let mut p: Vec<Cx> = params.iter().map(|&v| Cx::real(v)).collect();
            let none = |_: usize| None;
            loss += count as f64 * sample_loss(&p, front, net, &x, y, &none).re;
            for j in 0..params.len() {
                p[j].im = h;
                grad[j] += count as f64 * sample_loss(&p, front, net, &x, y, &none).im / h;
                p[j].im = 0.0;
            }
        }
        let n = rows.len() as f64;
        (loss / n, grad.iter().map(|g| g / n).collect())
    }

    fn images(n: usize, input: Hwc, classes: usize, seed: u64) -> (Vec<f64>, Vec<f64>) {
        let mut rng = Rng::new(seed, 5);
        let p = input.0 * input.1 * input.2;
        let x = (0..n * p).map(|_| rng.normal()).collect();
        let y = (0..n).map(|_| rng.below(classes as u64) as f64).collect();
        (x, y)
    }

    fn cases() -> Vec<(Hwc, Vec<FrontOp>, Vec<usize>)> {
        use FrontOp::*;
        vec![
            // LeNet-like, small: conv, relu, max pool, conv, relu, average pool.
            ((8, 8, 1), vec![Conv { out: 3, k: 3, stride: 1, pad: 0 }, Relu, MaxPool { k: 2, stride: 2 }, Conv { out: 2, k: 2, stride: 1, pad: 0 }, Relu, AvgPool { k: 2, stride: 1 }], vec![0, 5, 3]),
            // Stride and padding, two input channels, a non-square image, overlapping pooling.
            ((7, 6, 2), vec![Conv { out: 4, k: 3, stride: 2, pad: 1 }, Relu, MaxPool { k: 2, stride: 1 }, Conv { out: 3, k: 1, stride: 1, pad: 0 }], vec![0, 4]),
            // Padding larger than needed, pooling first, no dense hidden layer.
            ((5, 5, 3), vec![AvgPool { k: 2, stride: 1 }, Conv { out: 2, k: 3, stride: 1, pad: 2 }, Relu], vec![0, 3]),
        ]
    }

    fn build(input: Hwc, ops: &[FrontOp], sizes: &[usize]) -> Network {
        let flat = Front::new(input, ops).unwrap().n_outputs();
        let mut sizes = sizes.to_vec();
        sizes[0] = flat;
        Network::with_front(input, ops, &sizes, Head::Softmax).unwrap()
    }

    #[test]
    fn gradients_equal_the_complex_step_reference() {
        for (case, (input, ops, sizes)) in cases().into_iter().enumerate() {
            let net = build(input, &ops, &sizes);
            let classes = net.n_outputs();
            let n = 9;
            let (x, y) = images(n, input, classes, 40 + case as u64);
            let data = Dataset::new(&x, n, input.0 * input.1 * input.2, &y).unwrap();
            let params = net.init(2, 7 + case as u64).unwrap();
            // Batch 1, a few rows, and 300 rows (two blocks), repeating rows.
            let batches: Vec<Vec<usize>> = vec![vec![4], vec![0, 3, 8, 1], (0..300).map(|i| (i * 7) % n).collect()];
            for rows in &batches {
                let (want_loss, want) = reference(&net, &params, &data, rows);
                for precision in [Precision::F64, Precision::F32] {
                    let net = net.clone().with_precision(precision);
                    let mut ws = net.workspace(rows.len()).unwrap();
                    let mut grad = vec![0.0; net.n_params()];
                    let loss = net.loss_grad(&params, &data, rows, &mut grad, &mut ws);
                    let tol = if precision == Precision::F64 { 1e-10 } else { 1e-4 };
                    let scale = want.iter().fold(0.0f64, |a, g| a.max(g.abs()));
                    assert!((loss - want_loss).abs() <= tol * want_loss.abs(), "case {case}, {} rows, {precision:?}: loss {loss} vs {want_loss}", rows.len());
                    for (j, (g, r)) in grad.iter().zip(&want).enumerate() {
                        assert!((g - r).abs() <= tol * scale, "case {case}, {} rows, {precision:?}: gradient {j} is {g}, reference {r}", rows.len());
                    }
                }
            }
            assert!(300 > BLOCK_ROWS, "the long batch must cross a block boundary");
        }
    }

    /// With dropout: the masks of a training step (`key`, one block), drawn
    /// by `dropout_mask` for the whole block and cut per sample.
    fn reference_dropout(net: &Network, params: &[f64], data: &Dataset<'_>, rows: &[usize], key: u64) -> (f64, Vec<f64>) {
        let front = net.front.as_ref().unwrap();
        let m = rows.len();
        assert!(m <= BLOCK_ROWS);
        let mut sites: Vec<(usize, usize, f64)> = Vec::new();
        for (i, s) in front.stages.iter().enumerate() {
            if let FrontOp::Dropout { ppm } = s.op {
                sites.push((i, s.output.0 * s.output.1 * s.output.2, dropout_rate(ppm)));
            }
        }
        for (l, layer) in net.layers.iter().enumerate() {
            if net.dropout[l] > 0 {
                sites.push((1000 + l, layer.outputs, dropout_rate(net.dropout[l])));
            }
        }
        let blocks: Vec<(usize, usize, Vec<f64>)> = sites
            .iter()
            .map(|&(site, len, rate)| {
                let mut mk = vec![0.0; m * len];
                dropout_mask(key, 0, site, rate, &mut mk);
                (site, len, mk)
            })
            .collect();
        let h = 1e-30;
        let mut grad = vec![0.0; params.len()];
        let mut loss = 0.0;
        for (b, &r) in rows.iter().enumerate() {
            let x: Vec<f64> = (0..data.p).map(|j| data.x[j * data.n + r]).collect();
            let y = data.y[r] as usize;
            let mask = |site: usize| blocks.iter().find(|t| t.0 == site).map(|(_, len, mk)| mk[b * len..(b + 1) * len].to_vec());
            let mut p: Vec<Cx> = params.iter().map(|&v| Cx::real(v)).collect();
            loss += sample_loss(&p, front, net, &x, y, &mask).re;
            for j in 0..params.len() {
                p[j].im = h;
                grad[j] += sample_loss(&p, front, net, &x, y, &mask).im / h;
                p[j].im = 0.0;
            }
        }
        (loss / m as f64, grad.iter().map(|g| g / m as f64).collect())
    }

    #[test]
    fn dropout_gradients_equal_the_reference_and_evaluation_ignores_it() {
        use FrontOp::*;
        let input = (6, 6, 2);
        let ops = [Conv { out: 3, k: 3, stride: 1, pad: 1 }, Relu, Dropout { ppm: 300_000 }, MaxPool { k: 2, stride: 2 }];
        let flat = Front::new(input, &ops).unwrap().n_outputs();
        let codes: Vec<[usize; 5]> = ops.iter().map(|o| o.code()).chain([[6, 0, 500_000, 0, 0]]).collect();
        let net = Network::from_parts(&[flat, 6, 3], Head::Softmax, Precision::F64, &[6, 6, 2], &codes).unwrap();
        assert!(net.has_dropout() && net.dropout == vec![500_000, 0]);
        let (x, y) = images(7, input, 3, 9);
        let data = Dataset::new(&x, 7, 72, &y).unwrap();
        let params = net.init(2, 3).unwrap();
        let rows: Vec<usize> = vec![6, 0, 3, 2, 5];
        let mut ws = net.workspace(rows.len()).unwrap();
        let mut grad = vec![0.0; net.n_params()];
        for key in [11u64, 12] {
            ws.dropout_key = Some(key);
            let loss = net.loss_grad(&params, &data, &rows, &mut grad, &mut ws);
            let (want_loss, want) = reference_dropout(&net, &params, &data, &rows, key);
            let scale = want.iter().fold(0.0f64, |a, g| a.max(g.abs()));
            assert!((loss - want_loss).abs() <= 1e-10 * want_loss.abs(), "key {key}: {loss} vs {want_loss}");
            for (j, (g, r)) in grad.iter().zip(&want).enumerate() {
                assert!((g - r).abs() <= 1e-10 * scale, "key {key}: gradient {j} is {g}, reference {r}");
            }
        }
        // Off (no key): the network without its dropout layers.
        ws.dropout_key = None;
        let off = net.loss_grad(&params, &data, &rows, &mut grad, &mut ws);
        let plain_ops = [ops[0], ops[1], ops[3]];
        let plain = Network::with_front(input, &plain_ops, &[flat, 6, 3], Head::Softmax).unwrap();
        let mut g2 = vec![0.0; plain.n_params()];
        let mut ws2 = plain.workspace(rows.len()).unwrap();
        assert_eq!(off, plain.loss_grad(&params, &data, &rows, &mut g2, &mut ws2));
        assert_eq!(grad, g2);
        assert_eq!(net.evaluate(&params, &data).unwrap(), plain.evaluate(&params, &data).unwrap());
        // About the rate dropped.
        let mut mk = vec![0.0f64; 100_000];
        dropout_mask(5, 0, 1, 0.3, &mut mk);
        let dropped = mk.iter().filter(|v| **v == 0.0).count() as f64 / 1e5;
        assert!((dropped - 0.3).abs() < 0.01, "{dropped}");
        assert!(mk.iter().all(|v| *v == 0.0 || (*v - 1.0 / 0.7).abs() < 1e-15));
    }

    #[test]
    fn a_finite_difference_agrees_on_a_few_parameters() {
        let (input, ops, sizes) = cases().remove(0);
        let net = build(input, &ops, &sizes);
        let (x, y) = images(6, input, net.n_outputs(), 3);
        let data = Dataset::new(&x, 6, 64, &y).unwrap();
        let params = net.init(2, 1).unwrap();
        let rows: Vec<usize> = (0..6).collect();
        let mut ws = net.workspace(6).unwrap();
        let mut grad = vec![0.0; net.n_params()];
        net.loss_grad(&params, &data, &rows, &mut grad, &mut ws);
        let mut g2 = grad.clone();
        for &j in &[0, 11, 30, net.n_params() / 2, net.n_params() - 1] {
            let eps = 1e-6;
            let mut p = params.clone();
            p[j] += eps;
            let up = net.loss_grad(&p, &data, &rows, &mut g2, &mut ws);
            p[j] -= 2.0 * eps;
            let down = net.loss_grad(&p, &data, &rows, &mut g2, &mut ws);
            let fd = (up - down) / (2.0 * eps);
            assert!((fd - grad[j]).abs() < 1e-6 * (1.0 + grad[j].abs()), "parameter {j}: {fd} vs {}", grad[j]);
        }
    }

    #[test]
    fn impossible_layers_are_refused_by_name() {
        use FrontOp::*;
        let e = Front::new((5, 5, 1), &[Conv { out: 2, k: 7, stride: 1, pad: 0 }]).unwrap_err().to_string();
        assert!(e.contains("layer 1 (conv)") && e.contains("kernel of 7"), "{e}");
        let e = Front::new((5, 5, 1), &[Relu, MaxPool { k: 2, stride: 0 }]).unwrap_err().to_string();
        assert!(e.contains("layer 2 (max_pool)"), "{e}");
        // Sizes that would wrap are refused as memory errors, never wrapped.
        let huge = Front::new((2, 2, 1), &[Conv { out: 1, k: 1, stride: 1, pad: usize::MAX / 2 }]);
        assert!(matches!(huge, Err(CoreError::Memory(_))), "{huge:?}");
        let huge = Front::new((2, 2, 1), &[Conv { out: 1, k: 1, stride: 1, pad: 1 << 31 }, MaxPool { k: 1 << 31, stride: 1 << 31 }]);
        assert!(matches!(huge, Err(CoreError::Memory(_))), "{huge:?}");
        assert!(matches!(Front::new((1 << 40, 1 << 40, 1), &[Relu]), Err(CoreError::Memory(_))));
        // A dense dropout code naming a layer that does not exist (a message from elsewhere).
        let bad = Network::from_parts(&[18, 3], Head::Softmax, Precision::F64, &[5, 5, 1], &[[1, 2, 3, 1, 0], [6, usize::MAX, 10, 0, 0]]);
        assert!(bad.is_err());
        let e = Network::with_front((5, 5, 1), &[Conv { out: 2, k: 3, stride: 1, pad: 0 }], &[10, 3], Head::Softmax).unwrap_err().to_string();
        assert!(e.contains("give 18"), "{e}");
        // The parameters: 2 x 9 weights + 2 biases, then 18 x 3 + 3.
        let net = Network::with_front((5, 5, 1), &[Conv { out: 2, k: 3, stride: 1, pad: 0 }], &[18, 3], Head::Softmax).unwrap();
        assert_eq!(net.n_params(), 20 + 57);
        assert_eq!(net.n_inputs(), 25);
    }
}
