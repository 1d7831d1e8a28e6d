# Balle and Wang (2018), Theorem 8: the exact delta of the Gaussian mechanism
# with noise sd `sigma`, written with R's own pnorm.
exact_delta <- function(sigma, sensitivity, epsilon) {
  a <- sensitivity / (2 * sigma)
  b <- epsilon * sigma / sensitivity
  pnorm(a - b) - exp(epsilon) * pnorm(-a - b)
}

test_that("classic calibration is the closed form", {
  expect_equal(gaussian_noise_sd(2, 0.5, 1e-5, method = "classic"),
               2 * sqrt(2 * log(1.25 / 1e-5)) / 0.5, tolerance = 1e-14)
})

test_that("classic calibration warns outside epsilon < 1", {
  expect_warning(gaussian_noise_sd(1, 1, 1e-5, method = "classic"), class = "fedagg_warning_classic_epsilon")
  expect_no_warning(gaussian_noise_sd(1, 0.99, 1e-5, method = "classic"))
  expect_no_warning(gaussian_noise_sd(1, 5, 1e-5))
})

test_that("analytic sigma attains exactly the target delta (Balle and Wang, Thm 8)", {
  grid <- expand.grid(epsilon = c(0.01, 0.1, 0.5, 1, 2, 8, 20), delta = c(1e-3, 1e-5, 1e-9),
                      sensitivity = c(0.1, 1, 3))
  for (i in seq_len(nrow(grid))) {
    g <- grid[i, ]
    s <- gaussian_noise_sd(g$sensitivity, g$epsilon, g$delta)
    expect_equal(exact_delta(s, g$sensitivity, g$epsilon), g$delta, tolerance = 1e-6,
                 label = paste("eps", g$epsilon, "delta", g$delta))
    # Less noise would break the guarantee.
    expect_gt(exact_delta(s * 0.999, g$sensitivity, g$epsilon), g$delta)
  }
})

test_that("analytic sigma matches an R root-finder on the exact delta", {
  for (eps in c(0.2, 1, 5)) {
    ref <- uniroot(function(s) exact_delta(s, 1, eps) - 1e-5, c(1e-3, 1e3), tol = 1e-14)$root
    expect_equal(gaussian_noise_sd(1, eps, 1e-5), ref, tolerance = 1e-8)
  }
})

test_that("analytic noise is smaller than classic where classic is valid", {
  for (eps in c(0.05, 0.5, 0.95)) {
    expect_lt(gaussian_noise_sd(1, eps, 1e-5), gaussian_noise_sd(1, eps, 1e-5, method = "classic"))
  }
})

test_that("added noise is N(0, sd^2), seeded, and thread-invariant", {
  x <- numeric(50000)
  noisy <- add_gaussian_noise(x, 1, 1, 1e-5, seed = 123)
  sd <- gaussian_noise_sd(1, 1, 1e-5)
  expect_equal(attr(noisy, "sd"), sd)
  z <- as.vector(noisy) / sd
  expect_gt(stats::ks.test(z, "pnorm")$p.value, 1e-4)
  expect_lt(abs(mean(z)), 5 / sqrt(length(z)))

  expect_identical(add_gaussian_noise(x, 1, 1, 1e-5, seed = 123, threads = 1),
                   add_gaussian_noise(x, 1, 1, 1e-5, seed = 123, threads = 2))
  expect_false(identical(noisy, add_gaussian_noise(x, 1, 1, 1e-5, seed = 124)))
  set.seed(7); a <- add_gaussian_noise(x, 1, 1, 1e-5)
  set.seed(7); b <- add_gaussian_noise(x, 1, 1, 1e-5)
  expect_identical(a, b)
})

test_that("noise keeps the shape and leaves the input alone", {
  u <- list(W = matrix(1, 2, 3), b = c(a = 0, b = 0))
  noisy <- add_gaussian_noise(u, sd = 0.5, seed = 1)
  expect_identical(dim(noisy$W), c(2L, 3L))
  expect_identical(names(noisy$b), c("a", "b"))
  expect_identical(u$W, matrix(1, 2, 3))
  expect_identical(add_gaussian_noise(c(1, 2), sd = 0, seed = 1)[1:2], c(1, 2))
})
