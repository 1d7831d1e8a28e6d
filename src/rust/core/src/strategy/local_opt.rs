//! Local optimizers: what a client does with a step's gradient.
//!
//! Each follows the definition of its PyTorch `torch.optim` namesake with
//! dampening 0 and no Nesterov term, so that published hyperparameters mean
//! the same here. The state starts at zero at the beginning of every local
//! run: a client keeps nothing between rounds.

use crate::alloc::try_zeroed;
use crate::error::{invalid, CoreResult};

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LocalOptimizer {
    /// `b <- momentum b + g; y <- y - lr b`; plain SGD when momentum is 0.
    Sgd { momentum: f64 },
    /// Bias-corrected first and second moments (Kingma & Ba 2015).
    Adam { beta1: f64, beta2: f64, eps: f64 },
    /// Gradient scaled by the root of a moving mean of its squares.
    RmsProp { alpha: f64, eps: f64 },
    /// Gradient scaled by the root of the sum of all its squares so far.
    Adagrad { eps: f64 },
}

fn in_unit_interval(x: f64) -> bool {
    x.is_finite() && (0.0..1.0).contains(&x)
}

fn positive(x: f64) -> bool {
    x.is_finite() && x > 0.0
}

impl LocalOptimizer {
    pub fn check(&self) -> CoreResult<()> {
        match *self {
            LocalOptimizer::Sgd { momentum } if !in_unit_interval(momentum) => invalid("momentum", "must be in [0, 1)"),
            LocalOptimizer::Adam { beta1, .. } if !in_unit_interval(beta1) => invalid("beta1", "must be in [0, 1)"),
            LocalOptimizer::Adam { beta2, .. } if !in_unit_interval(beta2) => invalid("beta2", "must be in [0, 1)"),
            LocalOptimizer::RmsProp { alpha, .. } if !in_unit_interval(alpha) => invalid("alpha", "must be in [0, 1)"),
            // eps = 0 would divide 0 by 0 wherever a gradient stays zero.
            LocalOptimizer::Adam { eps, .. } | LocalOptimizer::RmsProp { eps, .. } | LocalOptimizer::Adagrad { eps }
                if !positive(eps) =>
            {
                invalid("eps", "must be a positive number")
            }
            _ => Ok(()),
        }
    }

    /// The heavy-ball momentum of SGD (0 for the adaptive optimizers): what
    /// FedNova's normalisation depends on.
    pub fn sgd_momentum(&self) -> Option<f64> {
        match *self {
            LocalOptimizer::Sgd { momentum } => Some(momentum),
            _ => None,
        }
    }
}

/// An optimizer with its state for one local run.
pub struct LocalOptState {
    optimizer: LocalOptimizer,
    /// SGD's velocity, Adam's first moment; empty when unused.
    first: Vec<f64>,
    /// Adam's and RMSprop's moving mean of squared gradients, Adagrad's sum
    /// of them; empty when unused.
    second: Vec<f64>,
    /// Steps taken so far (Adam's bias correction counts from 1).
    steps: i32,
}

impl LocalOptState {
    /// Zero state for `n_params` parameters; only the buffers the optimizer
    /// reads are allocated, so plain SGD costs no memory at all.
    pub fn new(optimizer: LocalOptimizer, n_params: usize) -> CoreResult<Self> {
        optimizer.check()?;
        let (needs_first, needs_second) = match optimizer {
            LocalOptimizer::Sgd { momentum } => (momentum > 0.0, false),
            LocalOptimizer::Adam { .. } => (true, true),
            LocalOptimizer::RmsProp { .. } | LocalOptimizer::Adagrad { .. } => (false, true),
        };
        let buffer = |needed: bool, what: &str| if needed { try_zeroed(n_params, what) } else { Ok(Vec::new()) };
        Ok(LocalOptState {
            optimizer,
            first: buffer(needs_first, "the local optimizer's first moment")?,
            second: buffer(needs_second, "the local optimizer's second moment")?,
            steps: 0,
        })
    }

    /// One step of `params` along `grad` (the full step gradient, penalties
    /// and corrections included). Inlined into the caller so it is compiled
    /// with the caller's instruction set.
    #[inline(always)]
    pub fn step(&mut self, params: &mut [f64], grad: &[f64], lr: f64) {
        self.steps = self.steps.saturating_add(1);
        match self.optimizer {
            LocalOptimizer::Sgd { momentum } if momentum > 0.0 => {
                for ((p, b), g) in params.iter_mut().zip(self.first.iter_mut()).zip(grad) {
                    *b = momentum * *b + g;
                    *p -= lr * *b;
                }
            }
            LocalOptimizer::Sgd { .. } => {
                for (p, g) in params.iter_mut().zip(grad) {
                    *p -= lr * g;
                }
            }
            LocalOptimizer::Adam { beta1, beta2, eps } => {
                let first_correction = 1.0 - beta1.powi(self.steps);
                let second_correction = 1.0 - beta2.powi(self.steps);
                for (((p, m), v), g) in params.iter_mut().zip(self.first.iter_mut()).zip(self.second.iter_mut()).zip(grad) {
                    *m = beta1 * *m + (1.0 - beta1) * g;
                    *v = beta2 * *v + (1.0 - beta2) * g * g;
                    *p -= lr * (*m / first_correction) / ((*v / second_correction).sqrt() + eps);
                }
            }
            LocalOptimizer::RmsProp { alpha, eps } => {
                for ((p, v), g) in params.iter_mut().zip(self.second.iter_mut()).zip(grad) {
                    *v = alpha * *v + (1.0 - alpha) * g * g;
                    *p -= lr * g / (v.sqrt() + eps);
                }
            }
            LocalOptimizer::Adagrad { eps } => {
                for ((p, s), g) in params.iter_mut().zip(self.second.iter_mut()).zip(grad) {
                    *s += g * g;
                    *p -= lr * g / (s.sqrt() + eps);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Gradients of f(y) = sum_j (j + 1) / 2 (y_j - 1)^2, a quadratic with
    /// different curvature per coordinate.
    fn quadratic_grad(y: &[f64]) -> Vec<f64> {
        y.iter().enumerate().map(|(j, v)| (j as f64 + 1.0) * (v - 1.0)).collect()
    }

    fn run(optimizer: LocalOptimizer, steps: usize, lr: f64) -> Vec<Vec<f64>> {
        let mut y = vec![0.3, -2.0, 5.0];
        let mut state = LocalOptState::new(optimizer, y.len()).unwrap();
        let mut path = Vec::new();
        for _ in 0..steps {
            let g = quadratic_grad(&y);
            state.step(&mut y, &g, lr);
            path.push(y.clone());
        }
        path
    }

    fn close(a: &[f64], b: &[f64], tol: f64) -> bool {
        a.iter().zip(b).all(|(x, y)| (x - y).abs() <= tol * (1.0 + y.abs()))
    }

    #[test]
    fn sgd_with_and_without_momentum_matches_its_definition() {
        for momentum in [0.0, 0.9] {
            let (lr, mut y, mut b) = (0.05, vec![0.3, -2.0, 5.0], vec![0.0; 3]);
            for (t, got) in run(LocalOptimizer::Sgd { momentum }, 4, lr).iter().enumerate() {
                let g = quadratic_grad(&y);
                for j in 0..3 {
                    // torch: b = g at the first step, then momentum b + g.
                    b[j] = if t == 0 { g[j] } else { momentum * b[j] + g[j] };
                    y[j] -= lr * b[j];
                }
                assert!(close(got, &y, 1e-15), "momentum {momentum}, step {}: {got:?} vs {y:?}", t + 1);
            }
        }
    }

    #[test]
    fn adam_matches_its_definition_with_bias_correction() {
        let (beta1, beta2, eps, lr) = (0.9, 0.999, 1e-8, 0.1);
        let path = run(LocalOptimizer::Adam { beta1, beta2, eps }, 3, lr);
        let (mut y, mut m, mut v) = (vec![0.3, -2.0, 5.0], vec![0.0; 3], vec![0.0; 3]);
        for (t, got) in path.iter().enumerate() {
            let g = quadratic_grad(&y);
            let t1 = (t + 1) as f64;
            for j in 0..3 {
                m[j] = beta1 * m[j] + (1.0 - beta1) * g[j];
                v[j] = beta2 * v[j] + (1.0 - beta2) * g[j] * g[j];
                let m_hat = m[j] / (1.0 - beta1.powf(t1));
                let v_hat = v[j] / (1.0 - beta2.powf(t1));
                y[j] -= lr * m_hat / (v_hat.sqrt() + eps);
            }
            assert!(close(got, &y, 1e-13), "step {}: {got:?} vs {y:?}", t + 1);
        }
        // Bias correction makes the first step lr * sign(g) (up to eps): without
        // it the step would be lr * 0.1 / sqrt(0.001), about 3.2 lr.
        let y0 = [0.3, -2.0, 5.0];
        let first_steps: Vec<f64> = path[0].iter().zip(&y0).map(|(a, b)| (a - b).abs()).collect();
        assert!(close(&first_steps, &[lr; 3], 1e-6), "{first_steps:?}");
        // At t = 2 the correction factors are 1 - 0.9^2 and 1 - 0.999^2, not
        // the t = 1 ones: the second step differs from an uncorrected one.
        let g1 = quadratic_grad(&path[0]);
        let g0 = quadratic_grad(&y0);
        let m2 = beta1 * (1.0 - beta1) * g0[0] + (1.0 - beta1) * g1[0];
        let v2 = beta2 * (1.0 - beta2) * g0[0] * g0[0] + (1.0 - beta2) * g1[0] * g1[0];
        let corrected = path[0][0] - lr * (m2 / 0.19) / ((v2 / (1.0 - 0.999f64 * 0.999)).sqrt() + eps);
        let uncorrected = path[0][0] - lr * m2 / (v2.sqrt() + eps);
        assert!((path[1][0] - corrected).abs() < 1e-13 && (path[1][0] - uncorrected).abs() > 1e-3);
    }

    #[test]
    fn rmsprop_and_adagrad_match_their_definitions() {
        let (alpha, eps, lr) = (0.99, 1e-8, 0.01);
        let (mut y, mut v) = (vec![0.3, -2.0, 5.0], vec![0.0; 3]);
        for (t, got) in run(LocalOptimizer::RmsProp { alpha, eps }, 4, lr).iter().enumerate() {
            let g = quadratic_grad(&y);
            for j in 0..3 {
                v[j] = alpha * v[j] + (1.0 - alpha) * g[j] * g[j];
                y[j] -= lr * g[j] / (v[j].sqrt() + eps);
            }
            assert!(close(got, &y, 1e-14), "rmsprop step {}", t + 1);
        }
        let (mut y, mut s) = (vec![0.3, -2.0, 5.0], vec![0.0; 3]);
        for (t, got) in run(LocalOptimizer::Adagrad { eps }, 4, 0.5).iter().enumerate() {
            let g = quadratic_grad(&y);
            for j in 0..3 {
                s[j] += g[j] * g[j];
                y[j] -= 0.5 * g[j] / (s[j].sqrt() + eps);
            }
            assert!(close(got, &y, 1e-14), "adagrad step {}", t + 1);
        }
    }

    #[test]
    fn settings_are_checked_and_plain_sgd_allocates_nothing() {
        assert!(LocalOptimizer::Sgd { momentum: 1.0 }.check().is_err());
        assert!(LocalOptimizer::Adam { beta1: 0.9, beta2: 1.0, eps: 1e-8 }.check().is_err());
        assert!(LocalOptimizer::Adagrad { eps: 0.0 }.check().is_err());
        assert!(LocalOptimizer::RmsProp { alpha: f64::NAN, eps: 1e-8 }.check().is_err());
        let state = LocalOptState::new(LocalOptimizer::Sgd { momentum: 0.0 }, 1000).unwrap();
        assert!(state.first.is_empty() && state.second.is_empty());
    }
}
