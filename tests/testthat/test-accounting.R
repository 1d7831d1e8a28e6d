# TF Privacy's compute_dp_sgd_privacy orders.
tf_orders <- c(1.25, 1.5, 1.75, 2, 2.25, 2.5, 3, 3.5, 4, 4.5, 5:63, 128, 256, 512)

# log(A_alpha) at an integer order, written independently of the Rust core:
# A = E[exp((K^2 - K) / (2 sigma^2))] for K ~ Binomial(alpha, q), summed in
# log space with lchoose (Mironov, Talwar and Zhang 2019, Section 3.3).
r_log_a_int <- function(q, sigma, alpha) {
  k <- 0:alpha
  terms <- lchoose(alpha, k) + k * log(q) + (alpha - k) * log1p(-q) + (k * k - k) / (2 * sigma^2)
  m <- max(terms)
  m + log(sum(exp(terms - m)))
}

# log(A_alpha) at any order by numerical integration of its definition,
# A = E_{z ~ N(0, sigma^2)} [((1 - q) + q exp((2z - 1) / (2 sigma^2)))^alpha],
# the integrand taken through logs so that neither factor overflows alone.
r_log_a_integral <- function(q, sigma, alpha) {
  f <- function(z) {
    a <- log1p(-q)
    b <- log(q) + (2 * z - 1) / (2 * sigma^2)
    log_mix <- pmax(a, b) + log1p(exp(-abs(a - b)))
    exp(dnorm(z, sd = sigma, log = TRUE) + alpha * log_mix)
  }
  log(stats::integrate(f, -40 * sigma, alpha + 40 * sigma, rel.tol = 1e-13, subdivisions = 2000L)$value)
}

rdp_at <- function(q, sigma, orders, steps = 1) rdp_sampled_gaussian(q, sigma, steps, orders)$rdp

test_that("epsilon matches TF Privacy's compute_dp_sgd_privacy", {
  # tensorflow/privacy, tensorflow_privacy/privacy/analysis/compute_dp_sgd_privacy_test.py,
  # test_compute_dp_sgd_privacy as of commit 93376c9 (assertAlmostEqual, 7 places):
  # (n, batch_size, noise_multiplier, epochs, delta) -> (epsilon, order), with
  # q = batch_size / n and steps = ceiling(epochs * n / batch_size).
  cases <- list(
    list(n = 60000, batch = 150, noise = 1.3, epochs = 15, delta = 1e-5, eps = 0.7242234026109595, order = 19),
    list(n = 1e5, batch = 100, noise = 1.0, epochs = 30, delta = 1e-7, eps = 1.4154988495444845, order = 13),
    list(n = 1e8, batch = 1024, noise = 0.1, epochs = 10, delta = 1e-7, eps = 5907982.31138195, order = 1.25)
  )
  for (k in cases) {
    eps <- rdp_epsilon(k$batch / k$n, k$noise, ceiling(k$epochs * k$n / k$batch), k$delta, orders = tf_orders)
    expect_equal(as.double(eps), k$eps, tolerance = 1e-9)
    expect_identical(attr(eps, "order"), k$order)
  }
})

test_that("epsilon matches Opacus' RDP accountant", {
  # pytorch/opacus, opacus/tests/accountants_test.py, test_rdp_accountant:
  # q = 0.04, noise multiplier 1.5, int(90 / 0.04) = 2250 steps, delta 1e-5,
  # Opacus' default orders: 7.32911117143 (assertAlmostEqual, 7 places).
  eps <- rdp_epsilon(0.04, 1.5, 2250, 1e-5)
  expect_lt(abs(eps - 7.32911117143), 5e-8)
  expect_identical(attr(eps, "order"), 3.9)
  # Opacus' DEFAULT_ALPHAS alone give the same: the larger orders only help
  # at small losses.
  opacus_orders <- c(1 + (1:99) / 10, 12:63)
  expect_equal(rdp_epsilon(0.04, 1.5, 2250, 1e-5, orders = opacus_orders), eps)
})

test_that("RDP matches TF Privacy's and dp_accounting's published values", {
  # tensorflow/privacy, tensorflow_privacy/privacy/analysis/rdp_accountant_test.py,
  # test_compute_rdp_scalar: compute_rdp(0.1, 2, 10, 5) = 0.07737 (5 places).
  expect_lt(abs(rdp_at(0.1, 2, 5, steps = 10) - 0.07737), 5e-6)
  # Same file, test_compute_rdp_sequence: compute_rdp(0.01, 2.5, 50, ...)
  # within 1e-5.
  orders <- c(1.5, 2.5, 5, 50, 100)
  rdp <- rdp_at(0.01, 2.5, orders, steps = 50)
  expect_true(all(abs(rdp - c(0.00065, 0.001085, 0.00218075, 0.023846, 167.416307)) < 1e-5))
  # google/differential-privacy, python/dp_accounting/dp_accounting/rdp/rdp_privacy_accountant_test.py,
  # test_compute_rdp_poisson_sampled_gaussian, before commit 0b109e9 (rtol 1e-4) ...
  expect_equal(rdp, c(6.5007e-04, 1.0854e-03, 2.1808e-03, 2.3846e-02, 1.6742e+02), tolerance = 1e-4)
  # ... and at its current version (9 digits): equal at the integer orders; at
  # the fractional ones it now sums absolute values, a larger bound.
  expect_equal(rdp[3:5], c(2.18075656e-03, 2.38460375e-02, 1.67416308e02), tolerance = 5e-9)
  expect_true(all(rdp[1:2] < c(6.70579741e-04, 1.08548710e-03)))
  # tensorflow/privacy rdp_accountant_test.py, test_compute_rdp_no_data and
  # test_compute_rdp_no_sampling: 0 for q = 0, 0.1 for q = 1, sigma 10, order 20.
  expect_identical(rdp_at(0, 10, 20), 0)
  expect_equal(rdp_at(1, 10, 20), 0.1, tolerance = 1e-15)
})

test_that("the conversion to (epsilon, delta) matches TF Privacy's", {
  # tensorflow/privacy rdp_accountant_test.py, test_get_privacy_spent_check_target_delta
  # (also dp_accounting's test_compute_epsilon_delta_gaussian): no sampling,
  # noise 4.530877117 is (1, 1e-6)-DP on a fine grid of orders (7 places).
  eps <- rdp_epsilon(1, 4.530877117, 1, 1e-6, orders = 0.001 * (1001:99999))
  expect_lt(abs(eps - 1), 5e-8)
})

test_that("without sampling, RDP is alpha / (2 sigma^2) per step, exactly", {
  orders <- c(1.1, 1.5, 2, 2.5, 7, 32.25, 512)
  for (sigma in c(0.3, 1, 7.5)) {
    expect_identical(rdp_at(1, sigma, orders, steps = 3), orders / (2 * sigma * sigma) * 3)
  }
  # The Gaussian mechanism's epsilon at the best order of the default list.
  orders <- rdp_sampled_gaussian(1, 2)$order
  by_hand <- 10 * orders / 8 - (log(1e-5) + log(orders)) / (orders - 1) + log((orders - 1) / orders)
  eps <- rdp_epsilon(1, 2, 10, 1e-5)
  expect_equal(as.double(eps), min(by_hand), tolerance = 1e-14)
  expect_identical(attr(eps, "order"), orders[which.min(by_hand)])
})

test_that("integer orders agree with a plain R closed form", {
  grid <- expand.grid(q = c(0.05, 0.2, 0.5, 0.9, 0.99), sigma = c(0.5, 1, 2, 5),
                      alpha = c(2, 3, 5, 10, 32, 63, 128, 256, 512))
  rust <- mapply(function(q, sigma, alpha) rdp_at(q, sigma, alpha), grid$q, grid$sigma, grid$alpha)
  r <- mapply(r_log_a_int, grid$q, grid$sigma, grid$alpha) / (grid$alpha - 1)
  for (i in seq_len(nrow(grid))) {
    expect_equal(rust[i], r[i], tolerance = 1e-10,
                 label = sprintf("q %g, sigma %g, order %g", grid$q[i], grid$sigma[i], grid$alpha[i]))
  }
})

test_that("small sampling rates keep their digits at integer orders", {
  # Order 2: A - 1 = q^2 (exp(1 / sigma^2) - 1) exactly. Summing A itself, as
  # the plain closed form does, would leave about 1e-16 / q^2 relative
  # precision: nothing at q = 1e-8.
  for (q in c(1e-12, 1e-8, 1e-4)) {
    for (sigma in c(0.7, 1, 4)) {
      expect_equal(rdp_at(q, sigma, 2), log1p(q^2 * expm1(1 / sigma^2)), tolerance = 1e-13)
    }
  }
})

test_that("fractional orders agree with numerical integration", {
  grid <- expand.grid(q = c(0.01, 0.1, 0.5), sigma = c(0.8, 1.5, 4), alpha = c(1.25, 1.5, 2.7, 6.5, 10.9))
  for (i in seq_len(nrow(grid))) {
    g <- grid[i, ]
    expect_equal(rdp_at(g$q, g$sigma, g$alpha) * (g$alpha - 1), r_log_a_integral(g$q, g$sigma, g$alpha),
                 tolerance = 1e-8, label = sprintf("q %g, sigma %g, order %g", g$q, g$sigma, g$alpha))
  }
})

test_that("very small and very large noise give finite, monotone epsilons", {
  sigmas <- c(1e-3, 0.05, 0.3, 0.7, 1, 2, 5, 20, 1e3, 1e6)
  for (q in c(1e-4, 0.01, 0.2, 1)) {
    eps <- vapply(sigmas, function(s) as.double(rdp_epsilon(q, s, 100, 1e-5)), numeric(1))
    expect_true(all(is.finite(eps) & eps >= 0), label = paste("q", q))
    expect_true(all(diff(eps) <= 0), label = paste("q", q))
    expect_gt(eps[1], eps[length(eps)])
    by_steps <- vapply(c(1, 10, 100, 1000, 1e5), function(t) as.double(rdp_epsilon(q, 1, t, 1e-5)), numeric(1))
    expect_true(all(diff(by_steps) > 0), label = paste("q", q))
  }
  # Huge noise: the Kullback-Leibler bound already gives delta, epsilon 0.
  expect_identical(as.double(rdp_epsilon(0.01, 1e6, 10, 1e-5)), 0)
})

test_that("degenerate mechanisms", {
  # No noise: no privacy.
  eps <- rdp_epsilon(0.1, 0, 10, 1e-5)
  expect_identical(as.double(eps), Inf)
  expect_identical(attr(eps, "order"), NA_real_)
  expect_true(all(rdp_sampled_gaussian(0.1, 0)$rdp == Inf))
  # Nobody sampled, or no steps: nothing revealed.
  expect_identical(as.double(rdp_epsilon(0, 0, 10, 1e-5)), 0)
  expect_identical(as.double(rdp_epsilon(0.5, 1, 0, 1e-5)), 0)
  expect_identical(rdp_noise_multiplier(1, 1e-5, 0, 100), 0)
  expect_identical(rdp_noise_multiplier(1, 1e-5, 0.5, 0), 0)
})

test_that("calibration round-trips", {
  cases <- list(c(eps = 8, delta = 1e-5, q = 0.04, steps = 2250), c(1, 1e-5, 0.01, 1000),
                c(0.5, 1e-6, 1, 1), c(3, 1e-8, 0.001, 1e5), c(20, 1e-5, 0.1, 200))
  for (k in cases) {
    sigma <- rdp_noise_multiplier(k[[1]], k[[2]], k[[3]], k[[4]])
    eps <- as.double(rdp_epsilon(k[[3]], sigma, k[[4]], k[[2]]))
    expect_lte(eps, k[[1]])
    expect_gt(eps, 0.99 * k[[1]])
    # The smallest such noise, to the documented 1e-10 relative tolerance.
    expect_gt(as.double(rdp_epsilon(k[[3]], sigma * (1 - 1e-9), k[[4]], k[[2]])), k[[1]])
  }
})

test_that("calibration agrees with Opacus' get_noise_multiplier", {
  # pytorch/opacus, opacus/tests/accountants_test.py, test_get_noise_multiplier_rdp_epochs
  # and _steps: 1.416 and 1.3562 (4 places) for epsilon 8, delta 1e-5, q 0.04,
  # 2250 and 2000 steps. Opacus stops once epsilon is within 0.01 below the
  # target, so its noise is at least the smallest one and its epsilon close.
  for (k in list(c(2250, 1.416), c(2000, 1.3562))) {
    sigma <- rdp_noise_multiplier(8, 1e-5, 0.04, k[1])
    expect_lte(sigma, k[2] + 5e-5)
    expect_gt(sigma, k[2] - 0.01)
    expect_lt(abs(rdp_epsilon(0.04, k[2], k[1], 1e-5) - 8), 0.011)
  }
})

test_that("bad inputs raise classed errors naming the argument", {
  expect_input_error <- function(expr, arg) {
    err <- expect_error(expr, class = "fedagg_error_input")
    expect_match(conditionMessage(err), arg, fixed = TRUE)
  }
  expect_input_error(rdp_epsilon(1.5, 1, 10, 1e-5), "`q`")
  expect_input_error(rdp_epsilon(-0.1, 1, 10, 1e-5), "`q`")
  expect_input_error(rdp_epsilon(NA, 1, 10, 1e-5), "`q`")
  expect_input_error(rdp_epsilon(0.1, -1, 10, 1e-5), "`noise_multiplier`")
  expect_input_error(rdp_epsilon(0.1, 1, 2.5, 1e-5), "`steps`")
  expect_input_error(rdp_epsilon(0.1, 1, -1, 1e-5), "`steps`")
  expect_input_error(rdp_epsilon(0.1, 1, 10, 0), "`delta`")
  expect_input_error(rdp_epsilon(0.1, 1, 10, 1), "`delta`")
  expect_input_error(rdp_epsilon(0.1, 1, 10, 1e-5, orders = c(2, 1)), "`orders`")
  expect_input_error(rdp_epsilon(0.1, 1, 10, 1e-5, orders = numeric()), "`orders`")
  expect_input_error(rdp_epsilon(0.1, 1, 10, 1e-5, orders = c(2, NA)), "`orders`")
  expect_input_error(rdp_noise_multiplier(0, 1e-5, 0.1, 10), "`epsilon`")
  expect_input_error(rdp_noise_multiplier(-1, 1e-5, 0.1, 10), "`epsilon`")
  expect_input_error(rdp_noise_multiplier(1, 1e-5, 0.1, 1.5), "`steps`")
  expect_input_error(rdp_noise_multiplier(1, 2, 0.1, 10), "`delta`")
  expect_input_error(rdp_noise_multiplier(1, 1e-5, 2, 10), "`q`")
  expect_input_error(rdp_sampled_gaussian(0.1, 1, orders = 1e6), "`orders`")
})
