test_that("clip_update scales to max_norm and reports the pre-clip norm", {
  set.seed(1)
  x <- rnorm(1000)
  n <- sqrt(sum(x^2))
  got <- clip_update(x, max_norm = n / 4)
  expect_equal(attr(got, "norm"), n, tolerance = 1e-14)
  expect_equal(as.vector(got), x * (n / 4) / n, tolerance = 1e-14)
  expect_equal(sqrt(sum(got^2)), n / 4, tolerance = 1e-12)
  # Already within bounds: unchanged.
  expect_equal(as.vector(clip_update(x, max_norm = 2 * n)), x)
})

test_that("clipping layers jointly or one by one matches R", {
  u <- random_updates(1, seed = 3, shape = "layers")[[1]]
  norms <- vapply(u, function(l) sqrt(sum(l^2)), numeric(1))
  total <- sqrt(sum(norms^2))

  joint <- clip_update(u, max_norm = 1)
  expect_equal(attr(joint, "norm"), total, tolerance = 1e-14)
  expect_equal(flatten_update(joint[names(u)]), flatten_update(u) / total, tolerance = 1e-14)
  expect_identical(dim(joint$W), dim(u$W))

  per <- clip_update(u, max_norm = 1, per_layer = TRUE)
  expect_equal(attr(per, "norm"), norms, tolerance = 1e-14)
  for (l in names(u)) {
    expect_equal(per[[l]], u[[l]] * min(1, 1 / norms[[l]]), tolerance = 1e-14)
  }
})

test_that("update_norms matches per-client, per-layer norms in R", {
  u <- random_updates(4, seed = 8, shape = "layers")
  got <- update_norms(u)
  expect_s3_class(got, "data.frame")
  expect_named(got, c("client", "W", "b", "scale", "norm"))
  for (k in 1:4) {
    for (l in c("W", "b", "scale")) expect_equal(got[[l]][k], sqrt(sum(u[[k]][[l]]^2)), tolerance = 1e-14)
    expect_equal(got$norm[k], sqrt(sum(flatten_update(u[[k]])^2)), tolerance = 1e-14)
  }
  m <- random_updates(5, seed = 8, shape = "matrix")
  expect_equal(update_norms(m)$norm, sqrt(colSums(m^2)), tolerance = 1e-14)
  expect_identical(update_norms(list(a = 1, b = 2))$client, c("a", "b"))
})

test_that("norms are identical on 1 and 2 threads", {
  set.seed(2)
  u <- replicate(5, rnorm(300007), simplify = FALSE)
  expect_identical(update_norms(u, threads = 1), update_norms(u, threads = 2))
  expect_identical(clip_update(u[[1]], 1, threads = 1), clip_update(u[[1]], 1, threads = 2))
})
