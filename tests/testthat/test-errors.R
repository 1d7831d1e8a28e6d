test_that("bad updates get clear, classed errors naming the client", {
  expect_snapshot(error = TRUE, {
    weighted_aggregate(list())
    weighted_aggregate(1:3)
    weighted_aggregate(data.frame(a = 1))
    weighted_aggregate(list(1:3, 1:2))
    weighted_aggregate(list(1:4, matrix(1:4, 2)))
    weighted_aggregate(list(c(1, 2), c("a", "b")))
    weighted_aggregate(list(c(1, 2), c(1, NA)))
    weighted_aggregate(list(c(1, 2), c(NaN, 1)))
    weighted_aggregate(list(c(1, 2), c(1, Inf), c(-Inf, 1)))
    weighted_aggregate(list(list(W = diag(2)), list(V = diag(2))))
    weighted_aggregate(list(list(W = diag(2)), list(W = diag(3))))
    weighted_aggregate(list(list(W = diag(2), b = 1), list(W = diag(2), b = NA)))
    weighted_aggregate(list(list(W = 1), 2))
    weighted_aggregate(matrix(character(0), 0, 0))
  })
  expect_error(weighted_aggregate(list(1:3, 1:2)), class = "fedagg_error_client")
  err <- tryCatch(weighted_aggregate(list(1, 2, NA)), error = identity)
  expect_identical(err$client, 3L)
})

test_that("bad weights get clear errors", {
  u <- list(c(1, 2), c(3, 4))
  expect_snapshot(error = TRUE, {
    weighted_aggregate(u, weights = "a")
    weighted_aggregate(u, weights = 1)
    weighted_aggregate(u, weights = c(1, -1))
    weighted_aggregate(u, weights = c(1, NA))
    weighted_aggregate(u, weights = c(0, 0))
  })
  expect_error(weighted_aggregate(u, weights = c(1, -1)), class = "fedagg_error_client")
})

test_that("bad robust parameters get clear errors", {
  u <- random_updates(5, 1)
  expect_snapshot(error = TRUE, {
    robust_aggregate(u, "mode")
    robust_aggregate(u, "trimmed_mean", trim = 0.5)
    robust_aggregate(u, "krum", f = 2)
    robust_aggregate(u[1:2], "krum")
    robust_aggregate(u, "multi_krum", f = 1, m = 5)
    robust_aggregate(u, "geometric_median", tol = 0)
    robust_aggregate(u, "geometric_median", max_iter = 0)
    robust_aggregate(list(c(1, Inf), c(1, 2), c(0, 0)), "median")
  })
})

test_that("bad clipping, privacy and drift arguments get clear errors", {
  expect_snapshot(error = TRUE, {
    clip_update(1:3, max_norm = 0)
    clip_update(1:3, max_norm = -1)
    clip_update(1:3, max_norm = NA)
    clip_update(c(1, NA), max_norm = 1)
    clip_update(1:3, max_norm = 1, per_layer = NA)
    gaussian_noise_sd(0, 1, 1e-5)
    gaussian_noise_sd(1, 0, 1e-5)
    gaussian_noise_sd(1, Inf, 1e-5)
    gaussian_noise_sd(1, 1, 0)
    gaussian_noise_sd(1, 1, 1)
    gaussian_noise_sd(1, 1, 1e-5, method = "laplace")
    add_gaussian_noise(1:3, 1, 1, 1e-5, seed = -1)
    add_gaussian_noise(1:3, 1, 1, 1e-5, seed = 1.5)
    ks_test(numeric(0), 1:3)
    ks_test(c(NA, NA), 1:3)
    ks_test("a", 1:3)
    ks_drift(data.frame(a = 1:3), data.frame(b = 1:3))
    ks_drift(1:3, 1:3, alpha = 1)
  })
})

test_that("bad thread counts get clear errors", {
  expect_snapshot(error = TRUE, {
    weighted_aggregate(list(1, 2), threads = 0)
    weighted_aggregate(list(1, 2), threads = 1.5)
  })
})

test_that("a Rust panic or error becomes an R error and the session goes on", {
  # Bypass the R validation to reach the Rust defences directly.
  expect_error(fedagg:::rs_weighted_mean(list(list(c(1, 2), c(1))), 2L, NULL, 1L), "client 2")
  expect_error(fedagg:::rs_weighted_mean(list(list("a")), 1L, NULL, 1L), "not double")
  expect_error(fedagg:::rs_gaussian_sigma(1, 1, 1e-5, "nope"), "unknown method")
  expect_equal(weighted_aggregate(list(1, 3)), 2)
})
