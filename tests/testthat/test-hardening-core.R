# Regression tests for the hardening issue's numeric defects in the Rust core,
# checked against closed forms and plain-R references.

test_that("norms neither overflow nor underflow", {
  clipped <- clip_update(c(1e200, 1e200), 1)
  expect_equal(as.vector(clipped), rep(1 / sqrt(2), 2), tolerance = 1e-15)
  expect_equal(attr(clipped, "norm"), sqrt(2) * 1e200, tolerance = 1e-15)
  expect_equal(attr(clip_update(c(3e-200, 4e-200), 1), "norm"), 5e-200, tolerance = 1e-15)
  layered <- clip_update(list(W = c(1e300, 1e300), b = 1e300), 1, per_layer = TRUE)
  expect_equal(attr(layered, "norm"), c(W = sqrt(2) * 1e300, b = 1e300), tolerance = 1e-15)
  norms <- update_norms(list(c(1e200, 1e200), c(3, 4)))
  expect_equal(norms$norm, c(sqrt(2) * 1e200, 5), tolerance = 1e-15)
})

test_that("the analytic Gaussian sigma grows as epsilon shrinks and attains delta exactly", {
  # Balle and Wang (2018), Theorem 8: the exact delta of the Gaussian
  # mechanism with noise sigma, written with R's pnorm.
  exact_delta <- function(sigma, eps, sens = 1) {
    a <- sens / (2 * sigma)
    b <- eps * sigma / sens
    pnorm(a - b) - exp(eps) * pnorm(-a - b)
  }
  for (delta in c(1e-5, 1e-8, 0.4)) {
    eps <- 10^seq(-30, 1, by = 1)
    sigma <- vapply(eps, function(e) gaussian_noise_sd(1, e, delta), numeric(1))
    expect_true(all(is.finite(sigma) & sigma > 0))
    # Strictly decreasing while the change per decade is above one ulp; below
    # epsilon ~ 1e-16 sigma sits on its limit, and must not rise.
    resolvable <- eps[-1] >= 1e-12
    expect_true(all(diff(sigma)[resolvable] < 0))
    expect_true(all(diff(sigma) <= 4 * .Machine$double.eps * sigma[-1]))
    attained <- mapply(exact_delta, sigma, eps)
    expect_equal(attained, rep(delta, length(eps)), tolerance = 1e-6)
  }
  # As epsilon -> 0 the guarantee becomes total variation: delta = 2 pnorm(1 / (2 sigma)) - 1.
  tv_sigma <- 1 / (2 * qnorm((1 + 1e-5) / 2))
  expect_equal(gaussian_noise_sd(1, 1e-30, 1e-5), tv_sigma, tolerance = 1e-6)
})

test_that("Krum matches brute force and needs one distance matrix at most", {
  set.seed(5)
  updates <- lapply(1:60, function(k) rnorm(7, mean = if (k > 55) 10 else 0))
  k <- robust_aggregate(updates, "krum", f = 5)
  m <- sapply(updates, identity)
  d2 <- as.matrix(stats::dist(t(m)))^2
  scores <- vapply(1:60, function(i) sum(sort(d2[i, -i])[seq_len(60 - 5 - 2)]), numeric(1))
  expect_equal(attr(k, "scores"), scores, tolerance = 1e-12)
  expect_identical(attr(k, "selected"), which.min(scores))
  skip_on_cran()
  skip_if_not_installed("callr")
  # 15,000 updates once needed three K x K buffers (> 5 GB) and killed R; now
  # one packed triangle (0.9 GB), and sizes beyond memory are a classed error.
  out <- callr::r(function() {
    big <- tryCatch({
      r <- fedagg::robust_aggregate(as.list(as.double(1:15000)), "krum")
      list(ok = TRUE, value = as.vector(r), scores = attr(r, "scores")[c(1, 3750, 3751, 11250, 11251)])
    }, fedagg_error_memory = function(e) list(ok = FALSE, class = class(e)[1]))
    huge <- tryCatch(fedagg::robust_aggregate(as.list(numeric(100000)), "krum"), error = function(e) class(e))
    list(big = big, huge = huge)
  })
  if (isTRUE(out$big$ok)) {
    # Points 1..15000 on a line, f = 7498, so each score sums the 7500
    # smallest squared gaps. Clients 3751..11250 have 3750 neighbours on each
    # side and the least score, 2 * sum((1:3750)^2); ties go to the lowest.
    best <- 2 * sum((1:3750)^2)
    expect_identical(out$big$value, 3751)
    expect_identical(out$big$scores[3:4], c(best, best))
    expect_true(all(out$big$scores[c(1, 2, 5)] > best))
  } else {
    expect_identical(out$big$class, "fedagg_error_memory")
  }
  expect_true("fedagg_error_memory" %in% out$huge)
})

test_that("a diverging round fails atomically, naming the round and the client", {
  set.seed(6)
  x <- matrix(rnorm(200, sd = 10), 100)
  y <- drop(x %*% c(1, -1))
  nodes <- fed_nodes(x, y, partition_iid(100, 2, seed = 1))
  srv <- fed_server(model_linear(2), nodes, fraction = 1, lr = 1e3, seed = 1)
  err <- NULL
  for (r in 1:40) {
    before <- list(srv$params, srv$history, srv$client_log)
    err <- tryCatch({
      srv$round()
      NULL
    }, error = identity)
    if (!is.null(err)) break
    expect_true(all(is.finite(srv$history$train_loss)))
  }
  expect_s3_class(err, "fedagg_error_diverged")
  expect_identical(err$round, r)
  expect_true(err$client %in% names(nodes))
  expect_identical(list(srv$params, srv$history, srv$client_log), before)
})

test_that("thread pools are capped and reused", {
  skip_if_not(file.exists("/proc/self/status"), "counts OS threads through /proc")
  os_threads <- function() as.integer(sub("Threads:\\s*", "", grep("^Threads:", readLines("/proc/self/status"), value = TRUE)))
  u <- list(c(1, 2), c(3, 4))
  weighted_aggregate(u, threads = 1)
  start <- os_threads()
  for (t in 1:40) weighted_aggregate(u, threads = t)
  # At most two pools of at most `cores` threads stay alive.
  expect_lte(os_threads() - start, 2L * fedagg_threads()$cores)
  expect_identical(weighted_aggregate(u, threads = 1000), weighted_aggregate(u, threads = 1))
})

test_that("sizes that cannot fit are memory errors, not crashes", {
  expect_error(init_params(model_mlp(60, hidden = .Machine$integer.max, 10)), class = "fedagg_error_memory")
  expect_error(model_mlp(1e5, hidden = c(1e5, 1e5), n_classes = 2), class = "fedagg_error_memory")
})
