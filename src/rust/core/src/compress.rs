//! Compression of client updates, to simulate the bytes a federated round
//! puts on the wire.
//!
//! A client compresses its update (a flat vector of length d) before sending
//! it; the server decodes it. `Compressed::decoded` is what the server sees,
//! `Compressed::bytes` the exact size of the encoding. The size depends on the
//! compressor and on d only, never on the values, so `Compressor::bytes(d)`
//! tells it before anything is compressed.
//!
//! # Encodings
//!
//! * `None`: every value as a float64: `8 d` bytes.
//! * `TopK`, `RandomK`: k pairs of (u32 index, 0-based; float64 value):
//!   `12 k` bytes, with `k = max(1, ceil(fraction d))`, at most d. The
//!   product `fraction d` is a double, as R's `ceiling(fraction * d)`: with
//!   fraction 0.07 and d = 100 it is 7.000000000000001, so k = 8.
//! * `Quantize`: the L2 norm as a float64, then per coordinate one sign bit
//!   and `bits` bits of level, packed: `8 + ceil(d (bits + 1) / 8)` bytes.
//! * `Float16`: every value as an IEEE 754 binary16: `2 d` bytes.
//!
//! # Random numbers
//!
//! The order of the draws from the `Rng` is part of the contract: the R
//! tests replay them with plain-R references.
//!
//! * `None`, `TopK`, `Float16`, nearest `Quantize`: no draws.
//! * `RandomK`: k draws, a partial Fisher-Yates shuffle of `0..d`:
//!   `for i in 0..k { j = i + rng.below(d - i); swap(perm[i], perm[j]) }`,
//!   the kept coordinates being `perm[0..k]` (a draw is made also when
//!   `d - i` is 1).
//! * Stochastic `Quantize`: d draws of `rng.uniform()`, one per coordinate in
//!   index order, whatever the values: also when the level is exact and when
//!   the update is all zeros. The state of the generator afterwards then
//!   depends on d only.
//!
//! # Errors
//!
//! Settings out of their domain (`check`), an empty update, a non-finite
//! value, a residual whose length is not d, and an update the encoding cannot
//! carry (a float16 value that would round to infinity, a norm beyond the
//! largest double, more than 2^32 coordinates for the u32 indices) are
//! errors, never silently infinite or wrapped values. Positions in messages
//! are 1-based, as the R user counts them.

use crate::alloc::{try_copy, try_with_capacity, try_zeroed};
use crate::error::{invalid, CoreResult};
use crate::norms::l2_norm;
use crate::rng::Rng;

/// How a client encodes its update before sending it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Compressor {
    /// float64, uncompressed: 8 d bytes.
    None,
    /// Keep the k = max(1, ceil(fraction d)) largest |v_i|; with error
    /// feedback the client adds its residual first and keeps what was not
    /// sent (Stich et al. 2018; Seide et al. 2014).
    TopK { fraction: f64, error_feedback: bool },
    /// Keep k = max(1, ceil(fraction d)) coordinates drawn uniformly without
    /// replacement, scaled by d / k so the decoded update is unbiased.
    RandomK { fraction: f64 },
    /// QSGD (Alistarh et al. 2017): s = 2^bits - 1 levels of
    /// |v_i| / ||v||_2, stochastic (unbiased) or nearest rounding.
    Quantize { bits: u32, stochastic: bool },
    /// IEEE 754 binary16, round to nearest even.
    Float16,
}

/// A compressed update, as the server decodes it.
#[derive(Clone, Debug, PartialEq)]
pub struct Compressed {
    /// The update the server reconstructs, length d.
    pub decoded: Vec<f64>,
    /// Exact size of the encoding in bytes: `Compressor::bytes(d)`.
    pub bytes: u64,
    /// Top-k with error feedback only: what was not sent, `v - decoded`, for
    /// the client to add to its next update. `None` otherwise.
    pub residual: Option<Vec<f64>>,
}

/// Largest finite binary16 value, 0x7BFF.
pub const F16_MAX: f64 = 65504.0;

impl Compressor {
    /// Errors when a setting is out of its domain: `fraction` must be in
    /// (0, 1] (NaN is not), `bits` in 1..=16 (levels of up to 16 bits).
    pub fn check(&self) -> CoreResult<()> {
        match *self {
            Compressor::TopK { fraction, .. } | Compressor::RandomK { fraction } => {
                // Written so that NaN fails too.
                if !(fraction > 0.0 && fraction <= 1.0) {
                    return invalid(
                        "compression",
                        format!("`fraction` = {fraction} is not a number in (0, 1]"),
                    );
                }
            }
            Compressor::Quantize { bits, .. } => {
                if !(1..=16).contains(&bits) {
                    return invalid("compression", format!("`bits` = {bits} is not an integer in 1..=16"));
                }
            }
            Compressor::None | Compressor::Float16 => {}
        }
        Ok(())
    }

    /// Exact size in bytes of the encoding of a d-length update (see the
    /// module doc); it does not depend on the values. Saturates at
    /// `u64::MAX`, far beyond any update that fits in memory.
    pub fn bytes(&self, d: usize) -> u64 {
        let d = d as u128;
        let bytes: u128 = match *self {
            Compressor::None => 8 * d,
            Compressor::TopK { fraction, .. } | Compressor::RandomK { fraction } => {
                12 * kept(fraction, d as usize) as u128
            }
            Compressor::Quantize { bits, .. } => 8 + (d * (bits as u128 + 1)).div_ceil(8),
            Compressor::Float16 => 2 * d,
        };
        u64::try_from(bytes).unwrap_or(u64::MAX)
    }

    /// Whether the expected decoded update equals the update: true for the
    /// lossless `None`, `RandomK` and stochastic `Quantize`. Top-k, nearest
    /// rounding and float16 rounding are deterministic, hence biased.
    pub fn is_unbiased(&self) -> bool {
        match *self {
            Compressor::None | Compressor::RandomK { .. } => true,
            Compressor::Quantize { stochastic, .. } => stochastic,
            Compressor::TopK { .. } | Compressor::Float16 => false,
        }
    }

    /// Compresses `update` and decodes it as the server would.
    ///
    /// `residual` is used by `TopK` with error feedback only (absent means
    /// zeros) and ignored otherwise, but its length is checked whenever it is
    /// given: a residual of another length is a bug of the caller. `rng` is
    /// drawn from as the module doc says.
    pub fn compress(&self, update: &[f64], residual: Option<&[f64]>, rng: &mut Rng) -> CoreResult<Compressed> {
        self.check()?;
        let d = update.len();
        if d == 0 {
            return invalid("update", "is empty: there is nothing to compress");
        }
        check_finite(update, "update")?;
        if let Some(r) = residual {
            if r.len() != d {
                return invalid("residual", format!("has length {}, the update has length {d}", r.len()));
            }
        }
        let (decoded, residual) = match *self {
            Compressor::None => (try_copy(update, "the decoded update")?, None),
            Compressor::TopK {
                fraction,
                error_feedback,
            } => {
                let residual = if error_feedback { residual } else { None };
                let (decoded, rest) = top_k(update, residual, kept(fraction, d))?;
                (decoded, if error_feedback { Some(rest) } else { None })
            }
            Compressor::RandomK { fraction } => (random_k(update, kept(fraction, d), rng)?, None),
            Compressor::Quantize { bits, stochastic } => (quantize(update, bits, stochastic, rng)?, None),
            Compressor::Float16 => (float16(update)?, None),
        };
        Ok(Compressed {
            decoded,
            bytes: self.bytes(d),
            residual,
        })
    }
}

/// Coordinates kept by top-k and random-k: `max(1, ceil(fraction d))` with
/// `fraction d` a double (as in R), at most d.
fn kept(fraction: f64, d: usize) -> usize {
    // `as usize` saturates (and takes NaN to 0), so this cannot wrap.
    ((fraction * d as f64).ceil() as usize).max(1).min(d)
}

/// Errors at the first non-finite value of `x`, naming its position.
fn check_finite(x: &[f64], arg: &'static str) -> CoreResult<()> {
    match x.iter().position(|v| !v.is_finite()) {
        Some(i) => invalid(arg, format!("element {} is {}: values must be finite", i + 1, x[i])),
        None => Ok(()),
    }
}

/// The encodings of top-k and random-k index coordinates with a u32.
fn check_u32_indices(d: usize) -> CoreResult<()> {
    if d - 1 > u32::MAX as usize {
        return invalid(
            "update",
            format!("has {d} values, but the u32 indices of the encoding reach 2^32 values only"),
        );
    }
    Ok(())
}

/// The indices `0..d` as u32 (d <= 2^32), in a size-checked buffer.
fn indices(d: usize, what: &str) -> CoreResult<Vec<u32>> {
    let mut idx = try_with_capacity(d, what)?;
    idx.extend((0..d).map(|i| i as u32));
    Ok(idx)
}

/// Top-k of `v = update + residual`: (decoded, v - decoded).
///
/// The k largest |v_i| are found with a selection, O(d) on average, under
/// the total order "larger |v_i| first, then lower index", so ties go to the
/// lower index whatever the selection algorithm does.
fn top_k(update: &[f64], residual: Option<&[f64]>, k: usize) -> CoreResult<(Vec<f64>, Vec<f64>)> {
    let d = update.len();
    check_u32_indices(d)?;
    // v, which becomes the residual as the kept values are moved out of it.
    let mut v = try_copy(update, "the update plus residual")?;
    if let Some(r) = residual {
        check_finite(r, "residual")?;
        for (x, r) in v.iter_mut().zip(r) {
            *x += r;
        }
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            return invalid(
                "residual",
                format!(
                    "element {}: update + residual = {} + {} is not finite",
                    i + 1,
                    update[i],
                    r[i]
                ),
            );
        }
    }
    let mut idx = indices(d, "the coordinate indices")?;
    if k < d {
        let rank = |a: &u32, b: &u32| v[*b as usize].abs().total_cmp(&v[*a as usize].abs()).then(a.cmp(b));
        idx.select_nth_unstable_by(k - 1, rank);
        idx.truncate(k);
    }
    let mut decoded = try_zeroed(d, "the decoded update")?;
    for &i in &idx {
        let i = i as usize;
        decoded[i] = v[i];
        // v_i - v_i: exactly zero.
        v[i] = 0.0;
    }
    Ok((decoded, v))
}

/// Random-k: k coordinates by a partial Fisher-Yates shuffle, scaled by
/// d / k, computed as `(update_i * d) / k` like R's `update[i] * d / k`.
fn random_k(update: &[f64], k: usize, rng: &mut Rng) -> CoreResult<Vec<f64>> {
    let d = update.len();
    check_u32_indices(d)?;
    let mut perm = indices(d, "the permutation of the coordinates")?;
    for i in 0..k {
        let j = i + rng.below((d - i) as u64) as usize;
        perm.swap(i, j);
    }
    let (df, kf) = (d as f64, k as f64);
    let mut decoded = try_zeroed(d, "the decoded update")?;
    for &i in &perm[..k] {
        let i = i as usize;
        let x = update[i] * df / kf;
        if !x.is_finite() {
            return invalid(
                "update",
                format!(
                    "element {}: {} scaled by d / k = {d} / {k} is not finite",
                    i + 1,
                    update[i]
                ),
            );
        }
        decoded[i] = x;
    }
    Ok(decoded)
}

/// QSGD quantization with s = 2^bits - 1 levels of |v_i| / ||v||_2.
///
/// Per coordinate, in index order: r = |v_i| / norm * s, l = floor(r); the
/// level is l + 1 when `u < r - l` for a fresh uniform u (stochastic:
/// E[level] = r) or when `r - l >= 0.5` (nearest, halves up), else l; the
/// decoded value is `sign(v_i) * norm * level / s`.
fn quantize(update: &[f64], bits: u32, stochastic: bool, rng: &mut Rng) -> CoreResult<Vec<f64>> {
    let d = update.len();
    let s = ((1u32 << bits) - 1) as f64;
    // Scaled where needed: infinite only when the norm is.
    let norm = l2_norm(update);
    if !norm.is_finite() {
        return invalid(
            "update",
            format!(
                "its L2 norm exceeds the largest double ({:e}), which the float64 norm of the encoding cannot carry",
                f64::MAX
            ),
        );
    }
    let mut decoded = try_zeroed(d, "the decoded update")?;
    if norm == 0.0 {
        // Every level is 0; the draws still happen (see the module doc).
        if stochastic {
            for _ in 0..d {
                rng.uniform();
            }
        }
        return Ok(decoded);
    }
    for (out, &v) in decoded.iter_mut().zip(update) {
        let r = v.abs() / norm * s;
        let l = r.floor();
        let up = if stochastic {
            rng.uniform() < r - l
        } else {
            r - l >= 0.5
        };
        // |v_i| <= norm, so r <= s and the cap never acts; it is a guard
        // against a level the s levels could not encode.
        let level = if up { l + 1.0 } else { l }.min(s);
        let mut magnitude = norm * level / s;
        if !magnitude.is_finite() {
            // norm * level overflowed although the result is at most norm.
            magnitude = norm * (level / s);
        }
        *out = if v < 0.0 { -magnitude } else { magnitude };
    }
    Ok(decoded)
}

/// Every value rounded to binary16 and back.
fn float16(update: &[f64]) -> CoreResult<Vec<f64>> {
    let mut decoded = try_with_capacity(update.len(), "the decoded update")?;
    for (i, &v) in update.iter().enumerate() {
        match f64_to_f16(v) {
            Some(h) => decoded.push(f16_to_f64(h)),
            None => {
                return invalid(
                    "update",
                    format!("element {} is {v}, which rounds to infinity in float16 (largest finite value {F16_MAX}; from 65520 on values round to infinity)", i + 1),
                )
            }
        }
    }
    Ok(decoded)
}

/// 2^k for k in the normal exponent range, exactly.
fn pow2(k: i32) -> f64 {
    debug_assert!((-1022..=1023).contains(&k));
    f64::from_bits(((1023 + k) as u64) << 52)
}

/// The binary16 bits of `x` rounded to nearest, ties to even, straight from
/// the double (no double rounding through f32). `None` when `x` is not
/// finite or rounds to infinity (|x| >= 65520).
///
/// With `e = max(floor(log2 |x|), -14)` the float16 values near |x| are the
/// multiples of `q = 2^(e - 10)` (below 2^-14 the subnormals, multiples of
/// 2^-24). `n = |x| / q` is exact (a power-of-two scaling), and so is its
/// rounding to an integer, n in 0..=2048. The bits are then
/// `((e + 14) << 10) + n`: for a normal value n = 1024 + mantissa, so this is
/// `(e + 15) << 10 | mantissa`, and n = 2048 (rounded up to the next power
/// of two) carries into the exponent; for a subnormal (e = -14) they are n,
/// and n = 1024 is the smallest normal value, 0x0400.
pub fn f64_to_f16(x: f64) -> Option<u16> {
    if !x.is_finite() {
        return None;
    }
    let sign = ((x.to_bits() >> 63) as u16) << 15;
    let a = x.abs();
    // Unbiased exponent of a normal double; -1023 for zero and subnormals.
    let e = (((a.to_bits() >> 52) as i32) - 1023).max(-14);
    if e > 15 {
        return None;
    }
    let n = (a / pow2(e - 10)).round_ties_even() as u32;
    let magnitude = (((e + 14) as u32) << 10) + n;
    if magnitude >= 0x7C00 {
        return None;
    }
    Some(sign | magnitude as u16)
}

/// The value of binary16 bits `h`, exactly (every binary16 value is a double).
pub fn f16_to_f64(h: u16) -> f64 {
    let sign = if h & 0x8000 != 0 { -1.0 } else { 1.0 };
    let exponent = ((h >> 10) & 0x1F) as i32;
    let mantissa = (h & 0x3FF) as f64;
    let magnitude = match exponent {
        0 => mantissa * pow2(-24),
        31 if mantissa == 0.0 => f64::INFINITY,
        31 => f64::NAN,
        _ => (1024.0 + mantissa) * pow2(exponent - 25),
    };
    sign * magnitude
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::CoreError;

    fn normals(d: usize, seed: u64) -> Vec<f64> {
        let mut rng = Rng::new(seed, 5);
        (0..d).map(|_| rng.normal()).collect()
    }

    /// Whether `r` failed on argument `arg` with a message containing `text`.
    fn fails_with<T: std::fmt::Debug>(r: CoreResult<T>, arg: &str, text: &str) -> bool {
        match r {
            Err(CoreError::InvalidArgument(a, m)) => {
                let ok = a == arg && m.contains(text);
                if !ok {
                    eprintln!("got `{a}`: {m}");
                }
                ok
            }
            other => {
                eprintln!("got {other:?}");
                false
            }
        }
    }

    fn topk(fraction: f64, error_feedback: bool) -> Compressor {
        Compressor::TopK {
            fraction,
            error_feedback,
        }
    }

    fn all_settings() -> Vec<Compressor> {
        vec![
            Compressor::None,
            topk(0.1, false),
            topk(0.37, true),
            topk(1.0, true),
            Compressor::RandomK { fraction: 0.05 },
            Compressor::RandomK { fraction: 0.5 },
            Compressor::RandomK { fraction: 1.0 },
            Compressor::Quantize {
                bits: 1,
                stochastic: true,
            },
            Compressor::Quantize {
                bits: 4,
                stochastic: false,
            },
            Compressor::Quantize {
                bits: 8,
                stochastic: true,
            },
            Compressor::Quantize {
                bits: 16,
                stochastic: false,
            },
            Compressor::Float16,
        ]
    }

    #[test]
    fn bytes_follow_the_formulas() {
        for d in [1usize, 2, 7, 8, 9, 10, 100, 1001, 10_000_000] {
            assert_eq!(Compressor::None.bytes(d), 8 * d as u64);
            assert_eq!(Compressor::Float16.bytes(d), 2 * d as u64);
            for bits in [1u32, 3, 7, 8, 16] {
                let c = Compressor::Quantize { bits, stochastic: true };
                let packed_bits = d as u64 * (bits as u64 + 1);
                let expected = 8 + packed_bits / 8 + u64::from(!packed_bits.is_multiple_of(8));
                assert_eq!(c.bytes(d), expected, "d {d} bits {bits}");
            }
        }
        // Worked by hand.
        let q = |bits| Compressor::Quantize {
            bits,
            stochastic: false,
        };
        assert_eq!(q(4).bytes(7), 8 + 5); // 35 bits
        assert_eq!(q(1).bytes(8), 8 + 2); // 16 bits
        assert_eq!(q(16).bytes(1), 8 + 3); // 17 bits
        assert_eq!(q(3).bytes(2), 8 + 1); // 8 bits
        let rk = |fraction| Compressor::RandomK { fraction };
        assert_eq!(topk(0.1, true).bytes(100), 12 * 10);
        assert_eq!(topk(0.1, false).bytes(101), 12 * 11);
        assert_eq!(rk(0.001).bytes(10), 12); // at least one
        assert_eq!(rk(1.0).bytes(7), 12 * 7);
        assert_eq!(rk(0.25).bytes(10), 12 * 3);
        // fraction * d is a double, as in R: 0.07 * 100 = 7.000000000000001.
        assert_eq!(rk(0.07).bytes(100), 12 * 8);
        // Saturates instead of wrapping.
        assert_eq!(Compressor::None.bytes(usize::MAX), u64::MAX);
    }

    #[test]
    fn compressed_bytes_equal_bytes_of_d() {
        for d in [1usize, 3, 8, 17, 250] {
            let update = normals(d, d as u64);
            for c in all_settings() {
                let mut rng = Rng::new(1, 0);
                let out = c.compress(&update, None, &mut rng).unwrap();
                assert_eq!(out.bytes, c.bytes(d), "{c:?} d {d}");
                assert_eq!(out.decoded.len(), d);
            }
        }
    }

    /// Top-k by a stable sort on decreasing |v_i|: ties stay in index order.
    fn top_k_by_sorting(v: &[f64], k: usize) -> Vec<f64> {
        let mut order: Vec<usize> = (0..v.len()).collect();
        order.sort_by(|&a, &b| v[b].abs().partial_cmp(&v[a].abs()).unwrap());
        let mut out = vec![0.0; v.len()];
        for &i in &order[..k] {
            out[i] = v[i];
        }
        out
    }

    #[test]
    fn top_k_matches_a_full_sort_with_ties_to_the_lower_index() {
        let mut rng = Rng::new(11, 0);
        for d in [1usize, 2, 5, 40, 333, 5000] {
            // Few distinct values, both signs: many ties in |v_i|.
            let update: Vec<f64> = (0..d).map(|_| rng.below(7) as f64 - 3.0).collect();
            let residual: Vec<f64> = (0..d).map(|_| 0.5 * (rng.below(3) as f64 - 1.0)).collect();
            for fraction in [0.01, 0.1, 0.5, 0.99, 1.0] {
                let k = kept(fraction, d);
                let plain = topk(fraction, false).compress(&update, None, &mut rng).unwrap();
                assert_eq!(plain.decoded, top_k_by_sorting(&update, k), "d {d} fraction {fraction}");
                assert_eq!(plain.residual, None);

                let ef = topk(fraction, true)
                    .compress(&update, Some(&residual), &mut rng)
                    .unwrap();
                let v: Vec<f64> = update.iter().zip(&residual).map(|(u, r)| u + r).collect();
                let expected = top_k_by_sorting(&v, k);
                assert_eq!(ef.decoded, expected);
                let rest: Vec<f64> = v.iter().zip(&expected).map(|(v, x)| v - x).collect();
                assert_eq!(ef.residual.as_deref(), Some(rest.as_slice()));
            }
        }
        // Ties by hand: |v| = 2 three times, the two lowest indices win.
        let out = topk(0.5, false)
            .compress(&[1.0, -2.0, 2.0, 0.5, -2.0, 1.5], None, &mut rng)
            .unwrap();
        assert_eq!(out.decoded, vec![0.0, -2.0, 2.0, 0.0, -2.0, 0.0]);
    }

    #[test]
    fn top_k_ignores_the_residual_without_error_feedback() {
        let update = normals(30, 1);
        let residual = normals(30, 2);
        let mut rng = Rng::new(0, 0);
        let with = topk(0.2, false).compress(&update, Some(&residual), &mut rng).unwrap();
        let without = topk(0.2, false).compress(&update, None, &mut rng).unwrap();
        assert_eq!(with, without);
        assert_eq!(with.residual, None);
        // With error feedback and no residual: residual starts at zero.
        let ef = topk(0.2, true).compress(&update, None, &mut rng).unwrap();
        assert_eq!(ef.decoded, without.decoded);
        let rest: Vec<f64> = update.iter().zip(&ef.decoded).map(|(u, x)| u - x).collect();
        assert_eq!(ef.residual, Some(rest));
    }

    #[test]
    fn error_feedback_sends_everything_eventually() {
        let (d, rounds) = (50, 20);
        let mut rng = Rng::new(0, 0);
        let mut sent = vec![0.0; d];
        let mut total = vec![0.0; d];
        let mut residual: Option<Vec<f64>> = None;
        for t in 0..rounds {
            let update = normals(d, 100 + t);
            let out = topk(0.1, true)
                .compress(&update, residual.as_deref(), &mut rng)
                .unwrap();
            assert_eq!(out.decoded.iter().filter(|x| **x != 0.0).count(), 5);
            for i in 0..d {
                sent[i] += out.decoded[i];
                total[i] += update[i];
            }
            residual = out.residual;
        }
        let residual = residual.unwrap();
        for i in 0..d {
            assert!((sent[i] + residual[i] - total[i]).abs() < 1e-12, "coordinate {i}");
        }
        // Without the residual the sums would differ: the check can fail.
        assert!((0..d).any(|i| (sent[i] - total[i]).abs() > 1e-3));
    }

    #[test]
    fn deterministic_compressors_draw_no_random_numbers() {
        let update = normals(20, 3);
        for c in [
            Compressor::None,
            topk(0.3, true),
            Compressor::Quantize {
                bits: 3,
                stochastic: false,
            },
            Compressor::Float16,
        ] {
            let mut rng = Rng::new(9, 1);
            c.compress(&update, None, &mut rng).unwrap();
            assert_eq!(rng.next_u64(), Rng::new(9, 1).next_u64(), "{c:?}");
        }
        let out = Compressor::None.compress(&update, None, &mut Rng::new(0, 0)).unwrap();
        assert_eq!(out.decoded, update);
    }

    #[test]
    fn random_k_replays_the_partial_fisher_yates_shuffle() {
        for (d, fraction, seed) in [(1usize, 0.5, 1u64), (10, 0.25, 2), (97, 0.1, 3), (40, 1.0, 4)] {
            let update: Vec<f64> = (1..=d).map(|i| i as f64 * 0.5).collect();
            let mut rng = Rng::new(seed, 7);
            let out = Compressor::RandomK { fraction }
                .compress(&update, None, &mut rng)
                .unwrap();

            let k = kept(fraction, d);
            let mut reference = Rng::new(seed, 7);
            let mut perm: Vec<usize> = (0..d).collect();
            for i in 0..k {
                let j = i + reference.below((d - i) as u64) as usize;
                perm.swap(i, j);
            }
            let mut expected = vec![0.0; d];
            for &i in &perm[..k] {
                expected[i] = update[i] * d as f64 / k as f64;
            }
            assert_eq!(out.decoded, expected, "d {d}");
            assert_eq!(out.decoded.iter().filter(|x| **x != 0.0).count(), k);
            assert_eq!(out.residual, None);
            // k draws exactly: both generators are at the same place.
            assert_eq!(rng.next_u64(), reference.next_u64());
        }
    }

    #[test]
    fn random_k_is_unbiased() {
        let (d, fraction, trials) = (10usize, 0.25, 20_000u64);
        let k = kept(fraction, d);
        assert_eq!(k, 3);
        let update = normals(d, 8);
        let mut mean = vec![0.0; d];
        for seed in 0..trials {
            let out = Compressor::RandomK { fraction }
                .compress(&update, None, &mut Rng::new(seed, 0))
                .unwrap();
            assert_eq!(out.decoded.iter().filter(|x| **x != 0.0).count(), k);
            for (m, x) in mean.iter_mut().zip(&out.decoded) {
                *m += x / trials as f64;
            }
        }
        for i in 0..d {
            // Var = u^2 (d/k)^2 p (1 - p) with p = k/d, = u^2 (d/k - 1).
            let var = update[i] * update[i] * (d as f64 / k as f64 - 1.0);
            let se = (var / trials as f64).sqrt();
            assert!(
                (mean[i] - update[i]).abs() < 5.0 * se,
                "coordinate {i}: mean {} vs {}",
                mean[i],
                update[i]
            );
        }
    }

    #[test]
    fn quantized_values_lie_on_the_grid() {
        let update = normals(200, 4);
        let norm = l2_norm(&update);
        for bits in [1u32, 2, 4, 8, 16] {
            let s = ((1u32 << bits) - 1) as f64;
            for stochastic in [true, false] {
                let c = Compressor::Quantize { bits, stochastic };
                let out = c.compress(&update, None, &mut Rng::new(bits as u64, 0)).unwrap();
                for (x, v) in out.decoded.iter().zip(&update) {
                    let level = (x.abs() * s / norm).round();
                    assert!((0.0..=s).contains(&level));
                    assert_eq!(x.abs(), norm * level / s, "bits {bits}");
                    assert!(*x == 0.0 || x.signum() == v.signum());
                    if !stochastic {
                        assert!(
                            (x - v).abs() <= norm / (2.0 * s) * (1.0 + 1e-12),
                            "bits {bits}: {x} for {v}"
                        );
                    }
                }
            }
        }
        // By hand: norm 5, s = 3, r = 1.8 and 2.4, both to level 2.
        let out = Compressor::Quantize {
            bits: 2,
            stochastic: false,
        }
        .compress(&[3.0, -4.0, 0.0], None, &mut Rng::new(0, 0))
        .unwrap();
        assert_eq!(out.decoded, vec![10.0 / 3.0, -10.0 / 3.0, 0.0]);
        // Halves round up: r = 0.5 exactly (s = 1, |v| / norm = 0.5).
        let out = Compressor::Quantize {
            bits: 1,
            stochastic: false,
        }
        .compress(&[1.0, 1.0, 1.0, 1.0], None, &mut Rng::new(0, 0))
        .unwrap();
        assert_eq!(out.decoded, vec![2.0; 4]);
        // Far beyond 1e154 the norm is still right (squares would overflow).
        let out = Compressor::Quantize {
            bits: 4,
            stochastic: false,
        }
        .compress(&[3e300, -4e300], None, &mut Rng::new(0, 0))
        .unwrap();
        let expected = [5e300 * 9.0 / 15.0, -(5e300 * 12.0 / 15.0)];
        for (x, e) in out.decoded.iter().zip(expected) {
            assert!((x - e).abs() <= 1e-15 * e.abs(), "{x} vs {e}");
        }
    }

    #[test]
    fn stochastic_quantization_is_unbiased() {
        let (bits, trials) = (2u32, 20_000u64);
        let s = ((1u32 << bits) - 1) as f64;
        let mut update = normals(8, 6);
        update[3] = 0.0;
        let norm = l2_norm(&update);
        let c = Compressor::Quantize { bits, stochastic: true };
        let mut mean = vec![0.0; update.len()];
        for seed in 0..trials {
            let out = c.compress(&update, None, &mut Rng::new(seed, 3)).unwrap();
            for (m, x) in mean.iter_mut().zip(&out.decoded) {
                *m += x / trials as f64;
            }
        }
        for (i, v) in update.iter().enumerate() {
            let r = v.abs() / norm * s;
            let p = r - r.floor();
            let se = (norm / s) * (p * (1.0 - p) / trials as f64).sqrt();
            assert!(
                (mean[i] - v).abs() <= 5.0 * se + 1e-12,
                "coordinate {i}: mean {} vs {v}",
                mean[i]
            );
        }
        // Nearest rounding is biased on the same update.
        let nearest = Compressor::Quantize {
            bits,
            stochastic: false,
        }
        .compress(&update, None, &mut Rng::new(0, 0))
        .unwrap();
        assert_ne!(nearest.decoded, update);
    }

    #[test]
    fn stochastic_quantization_draws_one_uniform_per_coordinate() {
        let d = 37;
        let mut exact = vec![0.0; d];
        exact[4] = -2.0; // r = s exactly, every other r = 0: no fraction anywhere
        for update in [normals(d, 2), exact, vec![0.0; d]] {
            for bits in [1u32, 5] {
                let mut rng = Rng::new(21, 4);
                Compressor::Quantize { bits, stochastic: true }
                    .compress(&update, None, &mut rng)
                    .unwrap();
                let mut fresh = Rng::new(21, 4);
                for _ in 0..d {
                    fresh.uniform();
                }
                assert_eq!(rng.next_u64(), fresh.next_u64(), "bits {bits}");
            }
        }
    }

    #[test]
    fn float16_known_bit_patterns() {
        let cases: [(f64, u16); 18] = [
            (0.0, 0x0000),
            (-0.0, 0x8000),
            (1.0, 0x3C00),
            (-2.0, 0xC000),
            (0.5, 0x3800),
            (F16_MAX, 0x7BFF),
            (-F16_MAX, 0xFBFF),
            (65519.99, 0x7BFF),                              // below the halfway point to 2^16
            (2f64.powi(-24), 0x0001),                        // smallest subnormal
            (2f64.powi(-25), 0x0000),                        // tie between 0 and 2^-24: to even, 0
            (3.0 * 2f64.powi(-25), 0x0002),                  // tie between 1 and 2 quanta: to even, 2
            (2f64.powi(-14), 0x0400),                        // smallest normal
            (1023.5 * 2f64.powi(-24), 0x0400),               // tie, largest subnormal vs smallest normal: to even
            (1.0 + 2f64.powi(-11), 0x3C00),                  // tie: to even, 1
            (1.0 + 3.0 * 2f64.powi(-11), 0x3C02),            // tie: to even, up
            (1.0 + 2f64.powi(-11) + 2f64.powi(-40), 0x3C01), // just above the tie
            (5e-324, 0x0000),                                // smallest double
            (-1e-300, 0x8000),
        ];
        for (x, bits) in cases {
            assert_eq!(f64_to_f16(x), Some(bits), "{x:e}: got {:#06x?}", f64_to_f16(x));
        }
        assert_eq!(f16_to_f64(0x3555), 0.333251953125);
        assert_eq!(f16_to_f64(0x0001), 2f64.powi(-24));
        assert_eq!(f16_to_f64(0x7BFF), F16_MAX);
        assert_eq!(f16_to_f64(0x7C00), f64::INFINITY);
        assert!(f16_to_f64(0x7E00).is_nan());
        for x in [65520.0, -65520.0, 65536.0, 1e10, f64::MAX, f64::INFINITY, f64::NAN] {
            assert_eq!(f64_to_f16(x), None, "{x}");
        }
        // Through `compress`: the decoded values are the rounded ones.
        let out = Compressor::Float16
            .compress(
                &[1.0 + 2f64.powi(-11), 2f64.powi(-25), 65519.0],
                None,
                &mut Rng::new(0, 0),
            )
            .unwrap();
        assert_eq!(out.decoded, vec![1.0, 0.0, F16_MAX]);
    }

    #[test]
    fn float16_round_trips_every_finite_value() {
        let mut count = 0;
        for h in 0..=u16::MAX {
            if (h >> 10) & 0x1F == 0x1F {
                continue;
            }
            count += 1;
            let x = f16_to_f64(h);
            assert_eq!(f64_to_f16(x), Some(h), "{h:#06x} = {x:e}");
            // The point halfway to the next value up (in magnitude) rounds to
            // whichever of the two has an even mantissa.
            if h & 0x7FFF < 0x7BFF {
                let next = f16_to_f64(h + 1);
                let halfway = (x + next) / 2.0;
                let even = if h & 1 == 0 { h } else { h + 1 };
                assert_eq!(f64_to_f16(halfway), Some(even), "halfway above {h:#06x}");
            }
        }
        assert_eq!(count, 63_488);
    }

    #[test]
    fn unbiasedness_is_reported() {
        assert!(Compressor::None.is_unbiased());
        assert!(Compressor::RandomK { fraction: 0.1 }.is_unbiased());
        assert!(Compressor::Quantize {
            bits: 2,
            stochastic: true
        }
        .is_unbiased());
        assert!(!Compressor::Quantize {
            bits: 2,
            stochastic: false
        }
        .is_unbiased());
        assert!(!topk(0.1, true).is_unbiased());
        assert!(!Compressor::Float16.is_unbiased());
    }

    #[test]
    fn bad_settings_are_errors() {
        let mut rng = Rng::new(0, 0);
        for fraction in [0.0, -0.1, 1.5, f64::NAN, f64::INFINITY] {
            assert!(
                fails_with(topk(fraction, true).check(), "compression", "`fraction`"),
                "{fraction}"
            );
            assert!(fails_with(
                Compressor::RandomK { fraction }.check(),
                "compression",
                "`fraction`"
            ));
            assert!(fails_with(
                Compressor::RandomK { fraction }.compress(&[1.0], None, &mut rng),
                "compression",
                "(0, 1]"
            ));
        }
        for bits in [0u32, 17, 64] {
            let c = Compressor::Quantize { bits, stochastic: true };
            assert!(fails_with(c.check(), "compression", "`bits`"), "{bits}");
            assert!(fails_with(c.compress(&[1.0], None, &mut rng), "compression", "1..=16"));
        }
        for c in all_settings() {
            assert!(c.check().is_ok(), "{c:?}");
        }
    }

    #[test]
    fn bad_inputs_are_errors() {
        let mut rng = Rng::new(0, 0);
        for c in all_settings() {
            assert!(fails_with(c.compress(&[], None, &mut rng), "update", "empty"), "{c:?}");
            assert!(fails_with(
                c.compress(&[1.0, 2.0, f64::NAN], None, &mut rng),
                "update",
                "element 3 is NaN"
            ));
            assert!(fails_with(
                c.compress(&[f64::NEG_INFINITY], None, &mut rng),
                "update",
                "element 1 is -inf"
            ));
            assert!(fails_with(
                c.compress(&[1.0, 2.0], Some(&[0.0]), &mut rng),
                "residual",
                "length 1"
            ));
        }
        let ef = topk(0.5, true);
        assert!(fails_with(
            ef.compress(&[1.0, 2.0], Some(&[0.0, f64::INFINITY]), &mut rng),
            "residual",
            "element 2 is inf"
        ));
        assert!(fails_with(
            ef.compress(&[1.0, f64::MAX], Some(&[0.0, f64::MAX]), &mut rng),
            "residual",
            "element 2: update + residual"
        ));
        let q = Compressor::Quantize {
            bits: 8,
            stochastic: true,
        };
        assert!(fails_with(
            q.compress(&[f64::MAX, f64::MAX], None, &mut rng),
            "update",
            "L2 norm"
        ));
        assert!(fails_with(
            Compressor::Float16.compress(&[1.0, -65520.0], None, &mut rng),
            "update",
            "element 2 is -65520"
        ));
        assert!(fails_with(
            Compressor::Float16.compress(&[7e4], None, &mut rng),
            "update",
            "element 1 is 70000"
        ));
        // The float16 error is about infinity, not about 65504 itself.
        assert!(Compressor::Float16.compress(&[65510.0], None, &mut rng).is_ok());
    }
}
