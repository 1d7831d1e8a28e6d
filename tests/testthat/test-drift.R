compare_with_stats <- function(x, y, ...) {
  ours <- suppressWarnings(ks_test(x, y, ...))
  ref <- suppressWarnings(stats::ks.test(x, y, ...))
  expect_equal(unname(ours$statistic), unname(ref$statistic), tolerance = 1e-12)
  expect_identical(names(ours$statistic), names(ref$statistic))
  # Both compute 1 - P(D < d): tiny p-values carry the same ~1e-13 absolute
  # rounding in either implementation, so compare absolutely.
  expect_lt(abs(ours$p.value - ref$p.value), 1e-12)
  expect_identical(ours$method, ref$method)
  expect_identical(ours$alternative, ref$alternative)
}

test_that("ks_test matches stats::ks.test: exact, no ties", {
  set.seed(1)
  for (i in 1:10) {
    nx <- sample(3:60, 1); ny <- sample(3:60, 1)
    x <- rnorm(nx); y <- rnorm(ny, mean = runif(1, 0, 1))
    for (alt in c("two.sided", "less", "greater")) compare_with_stats(x, y, alternative = alt)
  }
})

test_that("ks_test matches stats::ks.test: exact with ties", {
  set.seed(2)
  for (i in 1:10) {
    x <- sample(1:8, sample(5:40, 1), replace = TRUE)
    y <- sample(2:9, sample(5:40, 1), replace = TRUE)
    for (alt in c("two.sided", "less", "greater")) compare_with_stats(x, y, alternative = alt)
  }
})

test_that("ks_test matches stats::ks.test: asymptotic", {
  set.seed(3)
  for (i in 1:5) {
    x <- rnorm(sample(150:400, 1)); y <- rt(sample(150:400, 1), df = 3)
    for (alt in c("two.sided", "less", "greater")) compare_with_stats(x, y, alternative = alt)
    compare_with_stats(x[1:30], y[1:40], exact = FALSE)
    compare_with_stats(x, y, exact = TRUE)
  }
})

test_that("ks_test handles missing values and extreme samples like stats", {
  compare_with_stats(c(1, NA, 3, 2), c(5, 6, NA, 7))
  compare_with_stats(1:5, 1:5)
  compare_with_stats(c(1, 2), 10)
})

test_that("ks_test warns about ties with an asymptotic p-value", {
  expect_warning(ks_test(rep(1:10, 20), rep(1:10, 30)), class = "fedagg_warning_ks_ties")
})

test_that("ks_test is identical on 1 and 2 threads for large samples", {
  set.seed(4)
  x <- rnorm(1e5); y <- rnorm(1e5, 0.01)
  expect_identical(ks_test(x, y, threads = 1), ks_test(x, y, threads = 2))
})

test_that("ks_drift flags the drifted features", {
  set.seed(5)
  ref <- data.frame(a = rnorm(400), b = rnorm(400), c = runif(400))
  cur <- data.frame(a = rnorm(300, 1), b = rnorm(300), c = runif(300))
  d <- ks_drift(ref, cur)
  expect_s3_class(d, "fedagg_drift")
  expect_identical(d$feature, c("a", "b", "c"))
  expect_identical(d$drift, c(TRUE, FALSE, FALSE))
  expect_equal(d$p_value[1], stats::ks.test(ref$a, cur$a)$p.value)
  adj <- ks_drift(ref, cur, adjust = "bonferroni")
  expect_equal(adj$p_value, pmin(1, 3 * d$p_value))
  expect_identical(ks_drift(ref$a, cur$a)$feature, "value")
  expect_output(print(d), "1 of 3 features drifted")
  expect_identical(ks_drift(as.matrix(ref), as.matrix(cur))$drift, d$drift)
})
