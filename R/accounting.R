#' Privacy spent by the subsampled Gaussian mechanism (RDP accountant)
#'
#' @description
#' The (epsilon, delta) differential privacy of `steps` releases of the
#' Poisson-subsampled Gaussian mechanism, from its Rényi differential
#' privacy (RDP), as the RDP accountants of Opacus and TensorFlow Privacy
#' compute it. This is the accounting of DP-SGD and DP-FedAvg: each step
#' samples every record (or client) independently with probability `q`,
#' clips each contribution to L2 norm `C`, and adds
#' `N(0, (noise_multiplier * C)^2)` noise to their sum.
#'
#' @details
#' The RDP of one step at order `alpha` is `log(A_alpha) / (alpha - 1)`
#' (Mironov, Talwar and Zhang 2019): `alpha / (2 noise_multiplier^2)` when
#' `q = 1`, a closed-form binomial sum at integer orders and two series of
#' Gaussian tail masses at fractional ones; it is 0 when `q = 0` and `Inf`
#' when `noise_multiplier = 0`. Steps compose by adding their RDP.
#'
#' The (epsilon, delta) guarantee is the conversion of Balle et al. (2020,
#' Theorem 21), `rdp - (log(delta) + log(alpha)) / (alpha - 1) +
#' log((alpha - 1) / alpha)`, minimised over `orders`. As in Google's
#' `dp_accounting`, orders up to 1.01 are left out of the minimum, and an
#' order whose RDP is below `-log(1 - delta^2)` gives epsilon 0 (the
#' Kullback-Leibler bound on the total variation).
#'
#' The default orders are those of Opacus (`1.1, 1.2, ..., 10.9` and `12,
#' ..., 63`) and 128, 256 and 512 as in TensorFlow Privacy, for small losses
#' at tiny delta. If the best order is the first or last one, more orders
#' may give a smaller epsilon.
#'
#' The results agree with Opacus and TensorFlow Privacy to about 1e-10.
#' Since 2024 Google's `dp_accounting` sums the absolute values of the
#' fractional-order series, an upper bound: its RDP at fractional orders is
#' slightly larger than this one (at integer orders they agree).
#'
#' The guarantee is for Poisson sampling; for a fixed number of records per
#' step it is the usual approximation.
#'
#' @param q Sampling rate: the probability that a record (client) takes
#'   part in a step, in `[0, 1]` (`1`: every step uses everyone).
#' @param noise_multiplier Standard deviation of the noise divided by the L2
#'   sensitivity (the clipping norm), `>= 0`.
#' @param steps Number of steps (rounds), a whole number `>= 0`.
#' @param delta Target delta, in (0, 1).
#' @param orders RDP orders to minimise over, numbers in `(1, 1e5]`; `NULL`
#'   for the default list.
#' @return Epsilon, a single number (`Inf` when `noise_multiplier = 0` and
#'   `q > 0`), with attribute `order`: the RDP order that gives it (`NA`
#'   when epsilon is infinite).
#' @references Mironov, I., Talwar, K. and Zhang, L. (2019). Rényi
#'   differential privacy of the sampled Gaussian mechanism.
#'   arXiv:1908.10530.
#'
#'   Balle, B., Barthe, G., Gaboardi, M., Hsu, J. and Sato, T. (2020).
#'   Hypothesis testing interpretations and Rényi differential privacy.
#'   AISTATS.
#' @family privacy
#' @export
#' @examples
#' # DP-SGD on 60000 examples in batches of 256 for 30 epochs:
#' q <- 256 / 60000
#' eps <- rdp_epsilon(q, noise_multiplier = 1.1, steps = ceiling(30 / q), delta = 1e-5)
#' eps
#' attr(eps, "order")
#'
#' # More noise, less privacy loss; more steps, more:
#' rdp_epsilon(0.01, 2, steps = 1000, delta = 1e-5)
#' rdp_epsilon(0.01, 2, steps = 5000, delta = 1e-5)
#'
#' # Without subsampling, on a finer grid of orders:
#' rdp_epsilon(1, 5, steps = 1, delta = 1e-6, orders = seq(1.5, 100, by = 0.5))
rdp_epsilon <- function(q, noise_multiplier, steps, delta, orders = NULL) {
  check_required_args()
  q <- assert_number(q, 0, 1)
  noise_multiplier <- assert_number(noise_multiplier, 0)
  steps <- assert_count(steps)
  delta <- assert_number(delta, 0, 1, lower_open = TRUE, upper_open = TRUE)
  orders <- assert_orders(orders)
  spent <- call_rust(rs_rdp_epsilon(q, noise_multiplier, as.double(steps), delta, orders))
  structure(spent$epsilon, order = spent$order)
}

#' Noise multiplier for a privacy budget (RDP accountant)
#'
#' The smallest noise multiplier for which `steps` steps of the
#' Poisson-subsampled Gaussian mechanism at sampling rate `q` are
#' (`epsilon`, `delta`)-differentially private by [rdp_epsilon()]: what
#' Opacus' `get_noise_multiplier()` computes, to a tighter tolerance.
#'
#' Epsilon falls as the noise grows, so the noise is found by bisection: a
#' bracket is grown from 1 by doubling or halving, then halved until it is
#' narrower than 1e-10 times its upper end, which is returned. Its epsilon
#' is at most `epsilon`, and one part in 1e10 less noise would exceed it.
#' With `q = 0` or `steps = 0` nothing is revealed and the result is 0.
#'
#' @param epsilon Target epsilon, a finite number > 0.
#' @inheritParams rdp_epsilon
#' @return The noise multiplier, a single number.
#' @family privacy
#' @export
#' @examples
#' sigma <- rdp_noise_multiplier(epsilon = 2, delta = 1e-5, q = 0.01, steps = 1000)
#' sigma
#' rdp_epsilon(0.01, sigma, steps = 1000, delta = 1e-5)
#'
#' # A federated server sampling 10 of 100 clients for 200 rounds:
#' rdp_noise_multiplier(epsilon = 5, delta = 1e-5, q = 0.1, steps = 200)
rdp_noise_multiplier <- function(epsilon, delta, q, steps, orders = NULL) {
  check_required_args()
  epsilon <- assert_number(epsilon, 0, lower_open = TRUE)
  delta <- assert_number(delta, 0, 1, lower_open = TRUE, upper_open = TRUE)
  q <- assert_number(q, 0, 1)
  steps <- assert_count(steps)
  orders <- assert_orders(orders)
  call_rust(rs_rdp_noise_multiplier(epsilon, delta, q, as.double(steps), orders))
}

#' Rényi differential privacy of the subsampled Gaussian mechanism
#'
#' The RDP curve behind [rdp_epsilon()]: the Rényi differential privacy of
#' `steps` steps of the Poisson-subsampled Gaussian mechanism at each order.
#' RDP adds up over steps, so curves of different mechanisms can be summed
#' before converting them to (epsilon, delta).
#'
#' @inheritParams rdp_epsilon
#' @param orders RDP orders, numbers in `(1, 1e5]`; `NULL` for the default
#'   list of [rdp_epsilon()].
#' @return A data frame with columns `order` and `rdp`, one row per order.
#' @family privacy
#' @export
#' @examples
#' curve <- rdp_sampled_gaussian(q = 0.01, noise_multiplier = 1.1, steps = 1000)
#' head(curve)
#' plot(rdp ~ order, data = curve, log = "xy", type = "l")
#'
#' # Without subsampling it is the Gaussian mechanism's alpha / (2 sigma^2):
#' rdp_sampled_gaussian(1, 2, orders = c(2, 8, 32))
rdp_sampled_gaussian <- function(q, noise_multiplier, steps = 1, orders = NULL) {
  check_required_args()
  q <- assert_number(q, 0, 1)
  noise_multiplier <- assert_number(noise_multiplier, 0)
  steps <- assert_count(steps)
  orders <- assert_orders(orders)
  rdp <- call_rust(rs_rdp_sampled_gaussian(q, noise_multiplier, as.double(steps), orders))
  data.frame(order = if (is.null(orders)) rs_rdp_default_orders() else orders, rdp = rdp)
}

# NULL (the Rust core's default orders) or doubles in (1, 1e5]: the bound
# keeps the integer closed form and fractional series, whose cost grows
# with the order, to a fraction of a second.
assert_orders <- function(orders, arg = rlang::caller_arg(orders), call = rlang::caller_env()) {
  if (is.null(orders)) return(NULL)
  if (!is.numeric(orders) || length(orders) == 0L) {
    fedagg_abort("{.arg {arg}} must be a non-empty numeric vector or NULL, not {obj_desc(orders)}.", call = call)
  }
  bad <- which(is.na(orders) | !(orders > 1 & orders <= 1e5))
  if (length(bad)) {
    fedagg_abort(c("{.arg {arg}} must be numbers in (1, 1e5].",
                   x = "Element {bad[1]} is {orders[bad[1]]}."), call = call)
  }
  as.double(orders)
}
