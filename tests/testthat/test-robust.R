test_that("median and trimmed mean match apply() in R", {
  for (shape in c("list", "matrix", "layers")) {
    for (k in c(1, 2, 5, 10)) {
      u <- random_updates(k, seed = 10 + k, shape = shape)
      expect_equal(flatten_update(robust_aggregate(u, "median")), ref_median(u), tolerance = 1e-14)
      for (trim in c(0, 0.1, 0.25, 0.49)) {
        expect_equal(flatten_update(robust_aggregate(u, "trimmed_mean", trim = trim)),
                     ref_trimmed_mean(u, trim), tolerance = 1e-13)
      }
    }
  }
})

test_that("krum and multi-krum match a plain R implementation", {
  for (shape in c("list", "matrix", "layers")) {
    u <- random_updates(9, seed = 21, shape = shape)
    for (f in 0:3) {
      ref <- ref_multi_krum(u, f, 1)
      got <- robust_aggregate(u, "krum", f = f)
      expect_equal(attr(got, "scores"), ref$scores, tolerance = 1e-12)
      expect_identical(attr(got, "selected"), ref$selected)
      # Krum returns the chosen client's update itself.
      chosen <- if (is.matrix(u)) u[, ref$selected] else u[[ref$selected]]
      expect_equal(flatten_update(got), flatten_update(chosen), tolerance = 0)

      w <- seq_len(9)
      ref <- ref_multi_krum(u, f, 9 - f - 1, w)
      got <- robust_aggregate(u, "multi_krum", f = f, m = 9 - f - 1, weights = w)
      expect_identical(attr(got, "selected"), ref$selected)
      expect_equal(flatten_update(got), ref$value, tolerance = 1e-13)
    }
  }
})

test_that("krum drops attackers that the mean follows", {
  set.seed(5)
  honest <- replicate(8, rnorm(20, 1, 0.05), simplify = FALSE)
  u <- c(honest, list(rep(50, 20), rep(-80, 20)))
  got <- robust_aggregate(u, "multi_krum", f = 2)
  expect_false(any(c(9L, 10L) %in% attr(got, "selected")))
  expect_lt(max(abs(got - 1)), 0.1)
  expect_gt(max(abs(weighted_aggregate(u) - 1)), 1)
})

test_that("geometric median matches a plain R Weiszfeld and the 1-D median", {
  for (shape in c("list", "matrix", "layers")) {
    u <- random_updates(7, seed = 31, shape = shape)
    w <- c(5, 1, 1, 2, 3, 1, 1)
    got <- robust_aggregate(u, "geometric_median", weights = w, tol = 1e-12, max_iter = 1000)
    expect_true(attr(got, "converged"))
    expect_equal(flatten_update(got), ref_geometric_median(u, w, tol = 1e-12), tolerance = 1e-8)
  }
  # In one dimension the geometric median of an odd number of points is the median.
  x <- c(3, -1, 8, 100, 2.5)
  got <- robust_aggregate(as.list(x), "geometric_median", tol = 1e-14, max_iter = 10000)
  expect_equal(as.vector(got), stats::median(x), tolerance = 1e-6)
})

test_that("geometric median reports non-convergence honestly", {
  u <- random_updates(6, seed = 2, shape = "list")
  got <- robust_aggregate(u, "geometric_median", tol = 1e-15, max_iter = 1)
  expect_identical(attr(got, "iterations"), 1L)
  expect_false(attr(got, "converged"))
})

test_that("robust rules are identical on 1 and 2 threads", {
  set.seed(4)
  u <- replicate(11, rnorm(30011), simplify = FALSE)
  for (method in c("median", "trimmed_mean", "krum", "multi_krum", "geometric_median")) {
    expect_identical(robust_aggregate(u, method, threads = 1), robust_aggregate(u, method, threads = 2),
                     label = method)
  }
})

test_that("weights ignored by a rule give a warning", {
  u <- random_updates(5, 1)
  expect_warning(robust_aggregate(u, "median", weights = 1:5), class = "fedagg_warning_ignored_weights")
})
