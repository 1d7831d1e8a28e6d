every_index_once <- function(p, n) {
  expect_s3_class(p, "fed_partition")
  expect_identical(sort(unlist(p, use.names = FALSE)), seq_len(n))
}

test_that("every partition holds every index exactly once", {
  y <- sample(rep(1:7, c(50, 80, 10, 40, 120, 33, 67)))
  n <- length(y)
  every_index_once(partition_iid(n, 9, seed = 1), n)
  every_index_once(partition_dirichlet(y, 9, alpha = 0.2, min_size = 5, seed = 1), n)
  every_index_once(partition_dirichlet(y, 9, alpha = 50, seed = 2), n)
  every_index_once(partition_shards(y, 9, shards_per_client = 3, seed = 1), n)
  every_index_once(partition_quantity(n, 9, sdlog = 2, seed = 1), n)
  every_index_once(partition_quantity(n, 9, distribution = "powerlaw", seed = 1), n)
})

test_that("IID parts differ in size by at most one", {
  sizes <- lengths(partition_iid(103, 10, seed = 4))
  expect_lte(max(sizes) - min(sizes), 1)
})

test_that("shards give each client at most shards_per_client labels", {
  y <- rep(1:10, each = 60)          # 20 shards of 30: each shard holds one label
  s <- summary(partition_shards(y, 10, shards_per_client = 2, seed = 3))
  expect_true(all(s$n_labels <= 2))
  expect_true(all(s$n == 60))
})

test_that("Dirichlet with large alpha is near IID, with small alpha is skewed", {
  y <- rep(1:10, each = 500)
  near_iid <- summary(partition_dirichlet(y, 10, alpha = 1000, seed = 5))
  props <- as.matrix(near_iid[grep("^label_", names(near_iid))]) / near_iid$n
  expect_lt(max(abs(props - 0.1)), 0.05)

  skewed <- summary(partition_dirichlet(y, 10, alpha = 0.05, min_size = 1, seed = 5))
  props <- as.matrix(skewed[grep("^label_", names(skewed))]) / skewed$n
  # Most of each client's data comes from its largest class.
  expect_gt(stats::median(apply(props, 1, max)), 0.5)
  expect_true(all(skewed$n >= 1))
})

test_that("Dirichlet respects min_size", {
  y <- rep(1:5, each = 100)
  p <- partition_dirichlet(y, 10, alpha = 0.5, min_size = 20, seed = 6)
  expect_true(all(lengths(p) >= 20))
})

test_that("quantity skew follows sdlog", {
  equal <- lengths(partition_quantity(1000, 10, sdlog = 0, seed = 1))
  expect_lte(max(equal) - min(equal), 1)
  skewed <- lengths(partition_quantity(10000, 50, sdlog = 2, min_size = 2, seed = 1))
  expect_gt(max(skewed) / stats::median(skewed), 5)
  expect_true(all(skewed >= 2))
})

test_that("a seed makes partitions reproducible and leaves the global RNG alone", {
  y <- rep(1:4, 25)
  expect_identical(partition_dirichlet(y, 4, 0.5, min_size = 1, seed = 9),
                   partition_dirichlet(y, 4, 0.5, min_size = 1, seed = 9))
  set.seed(1); a <- runif(1)
  set.seed(1); invisible(partition_shards(y, 4, seed = 3)); b <- runif(1)
  expect_identical(a, b)
  set.seed(2); p1 <- partition_iid(50, 5)
  set.seed(2); p2 <- partition_iid(50, 5)
  expect_identical(p1, p2)
})

test_that("summary counts labels per client as table() does", {
  y <- factor(sample(c("a", "b", "c"), 90, replace = TRUE))
  p <- partition_iid(90, 3, seed = 1)
  attr(p, "labels") <- y
  s <- summary(p)
  for (k in 1:3) {
    expect_equal(unname(unlist(s[k, c("label_a", "label_b", "label_c")])), as.vector(table(y[p[[k]]])))
  }
  expect_output(print(p), "90 samples over 3 clients")
  grDevices::pdf(NULL)
  on.exit(grDevices::dev.off())
  expect_invisible(plot(partition_dirichlet(as.integer(y), 3, 1, min_size = 1, seed = 1)))
  expect_invisible(plot(p))
})

test_that("bad partition arguments get clear errors", {
  expect_snapshot(error = TRUE, {
    partition_iid(5, 10)
    partition_iid(10, 0)
    partition_dirichlet(c(1, NA, 2), 2, alpha = 1)
    partition_dirichlet(1:10, 2, alpha = 0)
    partition_dirichlet(1:10, 5, alpha = 1, min_size = 3)
    partition_dirichlet(rep(1:2, 50), 10, alpha = 0.001, min_size = 9, max_tries = 2, seed = 1)
    partition_shards(1:10, 4, shards_per_client = 3)
    partition_quantity(100, 5, distribution = "zipf")
    partition_iid(10, 2, seed = -1)
  })
})
