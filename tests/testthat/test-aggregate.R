test_that("weighted_aggregate matches a plain R loop for every input shape", {
  for (shape in c("list", "matrix", "layers")) {
    for (k in c(1, 2, 5, 11)) {
      updates <- random_updates(k, seed = k, shape = shape)
      w <- runif(k, 1, 100)
      expect_equal(flatten_update(weighted_aggregate(updates, w)), ref_weighted_mean(updates, w),
                   tolerance = 1e-13)
      expect_equal(flatten_update(weighted_aggregate(updates)), ref_weighted_mean(updates),
                   tolerance = 1e-13)
    }
  }
})

test_that("weighted_aggregate matches M %*% w on a large input", {
  set.seed(3)
  m <- matrix(rnorm(50000 * 7), ncol = 7)
  w <- c(10, 1, 5, 0, 3, 3, 8)
  expect_equal(weighted_aggregate(m, w), drop(m %*% (w / sum(w))), tolerance = 1e-13)
})

test_that("the result has the shape of one client's update", {
  a <- matrix(1:6, 2, dimnames = list(c("r1", "r2"), NULL))
  out <- weighted_aggregate(list(a, a * 3))
  expect_identical(dim(out), c(2L, 3L))
  expect_identical(dimnames(out), dimnames(a))
  expect_equal(out, a * 2)

  named <- weighted_aggregate(list(c(x = 1, y = 2), c(x = 3, y = 4)))
  expect_identical(names(named), c("x", "y"))

  m <- matrix(1:4, 2, dimnames = list(c("p", "q"), c("c1", "c2")))
  expect_identical(names(weighted_aggregate(m)), c("p", "q"))

  layered <- weighted_aggregate(random_updates(3, 1, "layers"))
  expect_named(layered, c("W", "b", "scale"))
  expect_identical(dim(layered$W), c(3L, 4L))
})

test_that("weights are normalised and zero weights drop a client", {
  u <- list(c(1, 1), c(3, 5), c(100, 100))
  expect_equal(weighted_aggregate(u, c(1, 1, 0)), c(2, 3))
  expect_equal(weighted_aggregate(u, c(2, 2, 0)), c(2, 3))
  expect_equal(weighted_aggregate(u[1]), c(1, 1))
})

test_that("integer input is accepted", {
  expect_equal(weighted_aggregate(list(1:3, 3:1)), c(2, 2, 2))
  expect_equal(weighted_aggregate(matrix(1:4, 2)), c(2, 3))
})

test_that("inputs are not modified", {
  u <- list(c(1, 2), c(3, 4))
  copy <- lapply(u, function(x) x + 0)
  weighted_aggregate(u, c(1, 2))
  expect_identical(u, copy)
})

test_that("results are identical on 1 and 2 threads", {
  set.seed(9)
  u <- replicate(13, rnorm(100003), simplify = FALSE)
  w <- runif(13)
  expect_identical(weighted_aggregate(u, w, threads = 1), weighted_aggregate(u, w, threads = 2))
  withr::with_options(list(fedagg.threads = 1), one <- weighted_aggregate(u, w))
  expect_identical(one, weighted_aggregate(u, w, threads = 2))
})
