//! Server optimizers: how the global parameters move along the round's
//! pseudo-gradient D (Reddi et al. 2021, "Adaptive Federated Optimization",
//! Algorithm 2, without bias correction).
//!
//! D points from the global parameters towards the clients (it is the mean
//! client update), so every rule adds to x. Server SGD with rate 1 and no
//! momentum is FedAvg: x + D.

use crate::alloc::{try_copy, try_zeroed};
use crate::error::{invalid, CoreError, CoreResult};

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum ServerOptimizer {
    /// `v <- momentum v + D; x <- x + lr v` (FedAvgM when momentum > 0).
    Sgd { lr: f64, momentum: f64 },
    /// FedAdagrad: `v <- v + D^2`.
    Adagrad { lr: f64, beta1: f64, tau: f64 },
    /// FedAdam: `v <- beta2 v + (1 - beta2) D^2`.
    Adam { lr: f64, beta1: f64, beta2: f64, tau: f64 },
    /// FedYogi: `v <- v - (1 - beta2) D^2 sign(v - D^2)`.
    Yogi { lr: f64, beta1: f64, beta2: f64, tau: f64 },
}

/// The optimizer state carried from round to round; `None` where the
/// optimizer keeps no such state (returned to R as NULL).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ServerState {
    /// First moment of the adaptive optimizers.
    pub m: Option<Vec<f64>>,
    /// SGD's velocity, or the adaptive optimizers' second moment.
    pub v: Option<Vec<f64>>,
}

fn in_unit_interval(x: f64) -> bool {
    x.is_finite() && (0.0..1.0).contains(&x)
}

/// R's `sign`: 0 at 0, so Yogi leaves v alone where it equals D^2.
fn sign(x: f64) -> f64 {
    if x > 0.0 {
        1.0
    } else if x < 0.0 {
        -1.0
    } else {
        x
    }
}

impl ServerOptimizer {
    pub fn check(&self) -> CoreResult<()> {
        let (lr, momentum, beta1, beta2, tau) = match *self {
            ServerOptimizer::Sgd { lr, momentum } => (lr, momentum, 0.0, 0.0, 1.0),
            ServerOptimizer::Adagrad { lr, beta1, tau } => (lr, 0.0, beta1, 0.0, tau),
            ServerOptimizer::Adam { lr, beta1, beta2, tau } | ServerOptimizer::Yogi { lr, beta1, beta2, tau } => {
                (lr, 0.0, beta1, beta2, tau)
            }
        };
        if !(lr.is_finite() && lr > 0.0) {
            return invalid("server lr", "must be a positive number");
        }
        if !in_unit_interval(momentum) {
            return invalid("server momentum", "must be in [0, 1)");
        }
        if !in_unit_interval(beta1) || !in_unit_interval(beta2) {
            return invalid("server beta1, beta2", "must be in [0, 1)");
        }
        // tau keeps the step finite where v is still 0.
        if !(tau.is_finite() && tau > 0.0) {
            return invalid("server tau", "must be a positive number");
        }
        Ok(())
    }

    /// New global parameters from `global` and the pseudo-gradient `delta`,
    /// with the state `m`, `v` of the previous round (absent = zeros).
    /// A non-finite result is `Diverged`: nothing of it may reach the model.
    pub fn step(&self, global: &[f64], delta: &[f64], m: Option<&[f64]>, v: Option<&[f64]>) -> CoreResult<(Vec<f64>, ServerState)> {
        self.check()?;
        let d = global.len();
        if delta.len() != d {
            return invalid("aggregate", format!("has {} values, the parameters {d}", delta.len()));
        }
        for (name, state) in [("server m", m), ("server v", v)] {
            if let Some(s) = state.filter(|s| s.len() != d) {
                return invalid(name, format!("has {} values, the parameters {d}", s.len()));
            }
        }
        let carried = |state: Option<&[f64]>, what: &str| match state {
            Some(s) => try_copy(s, what),
            None => try_zeroed(d, what),
        };
        let mut params = try_copy(global, "the new global parameters")?;
        let state = match *self {
            ServerOptimizer::Sgd { lr, momentum } => {
                if momentum == 0.0 {
                    for (x, g) in params.iter_mut().zip(delta) {
                        *x += lr * g;
                    }
                    return finite(params, ServerState::default());
                }
                let mut velocity = carried(v, "the server's momentum")?;
                for ((x, b), g) in params.iter_mut().zip(velocity.iter_mut()).zip(delta) {
                    *b = momentum * *b + g;
                    *x += lr * *b;
                }
                ServerState { m: None, v: Some(velocity) }
            }
            ServerOptimizer::Adagrad { lr, beta1, tau }
            | ServerOptimizer::Adam { lr, beta1, tau, .. }
            | ServerOptimizer::Yogi { lr, beta1, tau, .. } => {
                let mut first = carried(m, "the server's first moment")?;
                let mut second = carried(v, "the server's second moment")?;
                for (((x, m), v), g) in params.iter_mut().zip(first.iter_mut()).zip(second.iter_mut()).zip(delta) {
                    let g2 = g * g;
                    *m = beta1 * *m + (1.0 - beta1) * g;
                    *v = match *self {
                        ServerOptimizer::Adam { beta2, .. } => beta2 * *v + (1.0 - beta2) * g2,
                        ServerOptimizer::Yogi { beta2, .. } => *v - (1.0 - beta2) * g2 * sign(*v - g2),
                        _ => *v + g2,
                    };
                    *x += lr * *m / (v.sqrt() + tau);
                }
                ServerState { m: Some(first), v: Some(second) }
            }
        };
        finite(params, state)
    }
}

/// The step's result, unless a parameter is not finite: nothing of a
/// diverged step may reach the model.
fn finite(params: Vec<f64>, state: ServerState) -> CoreResult<(Vec<f64>, ServerState)> {
    if let Some(i) = params.iter().position(|x| !x.is_finite()) {
        return Err(CoreError::Diverged(format!(
            "the server step made parameter {} {}; the server learning rate is probably too large",
            i + 1,
            params[i]
        )));
    }
    Ok((params, state))
}

#[cfg(test)]
mod tests {
    use super::*;

    const X0: [f64; 3] = [0.5, -1.0, 2.0];
    const DELTAS: [[f64; 3]; 3] = [[0.1, -0.2, 0.0], [0.3, 0.1, -0.05], [-0.2, 0.4, 0.01]];

    /// Three server steps with the state carried between them, as R would.
    fn three_steps(opt: ServerOptimizer) -> Vec<(Vec<f64>, ServerState)> {
        let mut x = X0.to_vec();
        let mut state = ServerState::default();
        let mut out = Vec::new();
        for d in DELTAS {
            let (next, s) = opt.step(&x, &d, state.m.as_deref(), state.v.as_deref()).unwrap();
            x = next.clone();
            state = s.clone();
            out.push((next, s));
        }
        out
    }

    fn close(a: &[f64], b: &[f64]) -> bool {
        a.iter().zip(b).all(|(x, y)| (x - y).abs() <= 1e-14 * (1.0 + y.abs()))
    }

    #[test]
    fn sgd_with_rate_one_and_no_momentum_is_x_plus_d() {
        let (x, state) = ServerOptimizer::Sgd { lr: 1.0, momentum: 0.0 }.step(&X0, &DELTAS[0], None, None).unwrap();
        let expected: Vec<f64> = X0.iter().zip(&DELTAS[0]).map(|(a, b)| a + b).collect();
        assert_eq!(x, expected);
        assert_eq!(state, ServerState::default());
    }

    #[test]
    fn sgd_with_momentum_matches_its_formula() {
        let (lr, momentum) = (0.7, 0.9);
        let steps = three_steps(ServerOptimizer::Sgd { lr, momentum });
        let (mut x, mut v) = (X0.to_vec(), vec![0.0; 3]);
        for (d, (got, state)) in DELTAS.iter().zip(&steps) {
            for j in 0..3 {
                v[j] = momentum * v[j] + d[j];
                x[j] += lr * v[j];
            }
            assert!(close(got, &x) && close(state.v.as_ref().unwrap(), &v) && state.m.is_none());
        }
    }

    fn adaptive_reference(kind: &str, lr: f64, beta1: f64, beta2: f64, tau: f64) -> Vec<(Vec<f64>, Vec<f64>, Vec<f64>)> {
        let (mut x, mut m, mut v) = (X0.to_vec(), vec![0.0; 3], vec![0.0; 3]);
        let mut out = Vec::new();
        for d in DELTAS {
            for j in 0..3 {
                m[j] = beta1 * m[j] + (1.0 - beta1) * d[j];
                let d2 = d[j] * d[j];
                v[j] = match kind {
                    "adagrad" => v[j] + d2,
                    "adam" => beta2 * v[j] + (1.0 - beta2) * d2,
                    _ => v[j] - (1.0 - beta2) * d2 * (v[j] - d2).signum() * ((v[j] - d2) != 0.0) as u8 as f64,
                };
                x[j] += lr * m[j] / (v[j].sqrt() + tau);
            }
            out.push((x.clone(), m.clone(), v.clone()));
        }
        out
    }

    #[test]
    fn adaptive_optimizers_match_their_formulas_over_three_steps() {
        let (lr, beta1, beta2, tau) = (0.1, 0.9, 0.99, 1e-3);
        let cases = [
            ("adagrad", ServerOptimizer::Adagrad { lr, beta1, tau }),
            ("adam", ServerOptimizer::Adam { lr, beta1, beta2, tau }),
            ("yogi", ServerOptimizer::Yogi { lr, beta1, beta2, tau }),
        ];
        for (kind, opt) in cases {
            let got = three_steps(opt);
            for (t, ((x, state), (ex, em, ev))) in got.iter().zip(adaptive_reference(kind, lr, beta1, beta2, tau)).enumerate() {
                assert!(close(x, &ex), "{kind} step {}: {x:?} vs {ex:?}", t + 1);
                assert!(close(state.m.as_ref().unwrap(), &em), "{kind} m, step {}", t + 1);
                assert!(close(state.v.as_ref().unwrap(), &ev), "{kind} v, step {}", t + 1);
            }
        }
        // The three differ once the state is carried.
        let adam = three_steps(cases[1].1);
        let yogi = three_steps(cases[2].1);
        assert_ne!(adam[2].0, yogi[2].0);
    }

    #[test]
    fn yogi_keeps_v_where_it_equals_d_squared() {
        let opt = ServerOptimizer::Yogi { lr: 0.1, beta1: 0.9, beta2: 0.99, tau: 1e-3 };
        let (_, state) = opt.step(&[0.0], &[0.5], None, Some(&[0.25])).unwrap();
        assert_eq!(state.v.unwrap(), vec![0.25]);
    }

    #[test]
    fn bad_settings_and_non_finite_results_are_errors() {
        assert!(ServerOptimizer::Sgd { lr: 0.0, momentum: 0.0 }.check().is_err());
        assert!(ServerOptimizer::Adam { lr: 1.0, beta1: 0.9, beta2: 1.0, tau: 1e-3 }.check().is_err());
        assert!(ServerOptimizer::Yogi { lr: 1.0, beta1: 0.9, beta2: 0.99, tau: 0.0 }.check().is_err());
        let err = ServerOptimizer::Sgd { lr: 10.0, momentum: 0.0 }.step(&[1e308], &[1e308], None, None).unwrap_err();
        assert_eq!(err.kind(), "diverged");
        let err = ServerOptimizer::Sgd { lr: 1.0, momentum: 0.5 }.step(&[0.0, 0.0], &[1.0, 1.0], None, Some(&[0.0])).unwrap_err();
        assert_eq!(err.kind(), "input");
    }
}
