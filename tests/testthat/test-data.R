write_idx <- function(path, values, dims, type = 0x08, gz = FALSE) {
  con <- if (gz) gzfile(path, "wb") else file(path, "wb")
  on.exit(close(con))
  writeBin(as.raw(c(0, 0, type, length(dims))), con)
  writeBin(as.integer(dims), con, size = 4, endian = "big")
  switch(as.character(type),
    "8" = writeBin(as.raw(values), con),
    "11" = writeBin(as.integer(values), con, size = 2, endian = "big"),
    "12" = writeBin(as.integer(values), con, size = 4, endian = "big"),
    "13" = writeBin(as.double(values), con, size = 4, endian = "big"),
    "14" = writeBin(as.double(values), con, size = 8, endian = "big"))
}

test_that("read_idx reads every type, row-major, plain or gzipped", {
  f <- withr::local_tempfile()
  write_idx(f, 1:6, c(2, 3))
  expect_identical(read_idx(f), matrix(1:6, 2, 3, byrow = TRUE))
  write_idx(f, 0:23, c(2, 3, 4), gz = TRUE)
  a <- read_idx(f)
  expect_identical(dim(a), c(2L, 3L, 4L))
  expect_identical(a[2, 3, 4], 23L)
  expect_identical(a[1, 2, 1], 4L)
  write_idx(f, c(-3, 1000, 7), 3, type = 0x0B)
  expect_identical(read_idx(f), c(-3L, 1000L, 7L))
  write_idx(f, c(-70000, 5), 2, type = 0x0C)
  expect_identical(read_idx(f), c(-70000L, 5L))
  write_idx(f, c(0.5, -2.25), 2, type = 0x0D)
  expect_identical(read_idx(f), c(0.5, -2.25))
  write_idx(f, c(pi, 1e-300), c(1, 2), type = 0x0E)
  expect_identical(read_idx(f), matrix(c(pi, 1e-300), 1))
})

test_that("read_idx rejects files that are not IDX or are truncated", {
  f <- withr::local_tempfile()
  writeLines("hello", f)
  expect_error(read_idx(f), class = "fedagg_error_input")
  write_idx(f, 1:5, 6)
  expect_error(read_idx(f), "truncated")
  expect_error(read_idx(file.path(tempdir(), "nope")), class = "fedagg_error_input")
})

test_that("load_fashion_mnist assembles images row by row with class names", {
  dir <- withr::local_tempdir()
  img <- array(0L, c(3, 28, 28))
  img[1, 1, 2] <- 255L  # image 1: row 1, column 2 -> pixel 2
  img[2, 2, 1] <- 51L   # image 2: row 2, column 1 -> pixel 29
  values <- as.vector(aperm(img, 3:1)) # row-major
  write_idx(file.path(dir, "train-images-idx3-ubyte.gz"), values, c(3, 28, 28), gz = TRUE)
  write_idx(file.path(dir, "train-labels-idx1-ubyte"), c(9, 0, 3), 3)
  write_idx(file.path(dir, "t10k-images-idx3-ubyte"), values[1:784], c(1, 28, 28))
  write_idx(file.path(dir, "t10k-labels-idx1-ubyte"), 5, 1)
  fm <- load_fashion_mnist(dir)
  expect_identical(dim(fm$train$x), c(3L, 784L))
  expect_identical(which(fm$train$x[1, ] > 0), 2L)
  expect_identical(which(fm$train$x[2, ] > 0), 29L)
  expect_equal(fm$train$x[2, 29], 0.2)
  expect_identical(as.character(fm$train$y), c("Ankle boot", "T-shirt/top", "Dress"))
  expect_identical(as.character(fm$test$y), "Sandal")
  expect_error(load_fashion_mnist(withr::local_tempdir()), "dataset-fashion-mnist")
})

test_that("synthetic_fedprox follows the FedProx generator", {
  d <- synthetic_fedprox(1, 1, n_clients = 6, seed = 3)
  expect_s3_class(d, "fed_data")
  expect_identical(d, synthetic_fedprox(1, 1, n_clients = 6, seed = 3))
  # sizes: floor(lognormal(4, 2)) + 50, drawn first from the seed
  sizes <- withr::with_seed(3, floor(rlnorm(6, 4, 2)) + 50)
  got <- vapply(d$clients, function(cl) length(cl$y) + length(cl$y_test), numeric(1))
  expect_equal(unname(got), sizes)
  expect_true(all(vapply(d$clients, function(cl) length(cl$y) == floor(0.9 * (length(cl$y) + length(cl$y_test))), logical(1))))
  expect_true(all(unlist(lapply(d$clients, `[[`, "y")) %in% 0:9))
  # Features: variance j^-1.2 around a client-specific mean.
  big <- synthetic_fedprox(0, 0, n_clients = 40, iid = TRUE, seed = 2)
  pooled <- pool_clients(big, "train")
  expect_equal(apply(pooled$x, 2, var)[c(1, 10, 60)], c(1, 10, 60)^-1.2, tolerance = 0.1)
  expect_lt(max(abs(colMeans(pooled$x))), 0.05)
  # IID: one shared labelling rule; non-IID: client means differ.
  sd_means <- function(data) stats::sd(vapply(data$clients, function(cl) mean(cl$x[, 1]), numeric(1)))
  expect_gt(sd_means(synthetic_fedprox(1, 1, n_clients = 20, seed = 4)), 5 * sd_means(big))
  expect_identical(nrow(summary(d)), 6L)
  expect_snapshot(print(d))
})

test_that("fed_nodes builds nodes from a fed_data or from a partition", {
  d <- synthetic_fedprox(1, 1, n_clients = 4, seed = 5)
  nodes <- fed_nodes(d)
  expect_named(nodes, names(d$clients))
  expect_identical(nodes[[2]]$n_samples, length(d$clients[[2]]$y))
  expect_true(all(vapply(nodes, function(n) n$has_validation, logical(1))))
  x <- matrix(rnorm(100), 50)
  part <- partition_iid(50, 5, seed = 1)
  split <- fed_nodes(x, rep(0:1, 25), part, validation = 0.2, seed = 1)
  expect_identical(sum(vapply(split, function(n) n$n_samples, numeric(1))), 40)
})
