# Regression tests for the hardening issue: each case gave a crash, a
# silently wrong result or an unclear error before it was fixed.

skewed_letters <- function(seed = 1) {
  withr::with_seed(seed, {
    x <- matrix(rnorm(240), 120)
    y <- c("a", "b", "c")[max.col(cbind(x[, 1], x[, 2], -x[, 1] - x[, 2]), "first")]
    list(x = x, y = y)
  })
}

test_that("character labels get one code for the whole federation, whatever each node holds", {
  d <- skewed_letters()
  # Label skew: node 1 has no "a", node 2 no "c", so coding per node would
  # give "b" code 0 on node 1 and code 1 on node 2.
  keep1 <- which(d$y != "a")[1:30]
  keep2 <- which(d$y != "c")[1:30]
  named <- list(fed_node(d$x[keep1, ], d$y[keep1], "n1"), fed_node(d$x[keep2, ], d$y[keep2], "n2"))
  codes <- function(y) match(y, c("a", "b", "c")) - 1L
  coded <- list(fed_node(d$x[keep1, ], codes(d$y[keep1]), "n1"), fed_node(d$x[keep2, ], codes(d$y[keep2]), "n2"))
  run <- function(nodes) {
    srv <- fed_server(model_softmax(2, 3), nodes, fraction = 1, epochs = 2, lr = 0.1, seed = 4)
    srv$fit(3, verbose = FALSE)
    srv
  }
  a <- run(named)
  b <- run(coded)
  expect_identical(a$model$classes, c("a", "b", "c"))
  expect_identical(a$params, b$params)
  # Predictions come back as the labels given, with named probability columns.
  cls <- a$predict(d$x, type = "class")
  expect_s3_class(cls, "factor")
  expect_identical(levels(cls), c("a", "b", "c"))
  expect_identical(as.integer(cls) - 1L, b$predict(d$x, type = "class"))
  expect_identical(colnames(a$predict(d$x)), c("a", "b", "c"))
})

test_that("factor labels are coded by the union of the nodes' levels, or by declared classes", {
  d <- skewed_letters(2)
  f1 <- factor(d$y[1:60], levels = c("a", "b"))          # "c" becomes NA: drop those rows
  ok1 <- !is.na(f1)
  f2 <- factor(d$y[61:120], levels = c("b", "c"))
  ok2 <- !is.na(f2)
  nodes <- list(fed_node(d$x[1:60, ][ok1, ], f1[ok1], "n1"), fed_node(d$x[61:120, ][ok2, ], f2[ok2], "n2"))
  srv <- fed_server(model_softmax(2, 3), nodes, fraction = 1, seed = 1)
  expect_identical(srv$model$classes, c("a", "b", "c"))
  declared <- fed_server(model_softmax(2, classes = c("c", "b", "a")), nodes, fraction = 1, seed = 1)
  expect_identical(declared$model$classes, c("c", "b", "a"))
  expect_snapshot(error = TRUE, {
    fed_server(model_softmax(2, 2), nodes, fraction = 1)
    fed_server(model_softmax(2, classes = c("a", "b", "x")), nodes, fraction = 1)
    fed_server(model_softmax(2, 3), list(nodes[[1]], fed_node(d$x[1:5, ], c(0, 1, 2, 0, 1), "codes")))
    model_softmax(2, 3, classes = c("a", "a", "b"))
  })
  lg <- model_logistic(2, classes = c("no", "yes"))
  expect_identical(predict(lg, init_params(lg), d$x[1:3, ], type = "class"), factor(rep("no", 3), c("no", "yes")))
})

test_that("bad partitions and ids are errors naming the partition, not the data", {
  x <- matrix(rnorm(40), 20)
  y <- rep(0:1, 10)
  expect_snapshot(error = TRUE, {
    fed_nodes(x, y, list(c(1, -2), 3:10))
    fed_nodes(x, y, list(c(1.5, 2), 3:10))
    fed_nodes(x, y, list(c(NA, 2), 3:10))
    fed_nodes(x, y, list(c(1, 21), 3:10))
    fed_nodes(x, y, list(c(1, 1, 2), 3:10))
    fed_nodes(x, y, list(1:5, 6:10, 11:20), ids = c("a", "b"))
    fed_nodes(x, y, list("a", 3:10))
    fed_nodes(synthetic_fedprox(1, 1, n_clients = 3, dim = 2, seed = 1), ids = c("a", "b"))
  })
  expect_error(fed_nodes(x, y, list(c(NA, 2), 3:10)), class = "fedagg_error_client")
})

test_that("named updates are averaged by name, and different names are an error", {
  expect_identical(weighted_aggregate(list(c(a = 1, b = 2), c(b = 3, a = 4))), c(a = 2.5, b = 2.5))
  layered <- list(list(W = c(x = 1, y = 2), b = 1), list(b = 3, W = c(y = 4, x = 6)))
  expect_identical(weighted_aggregate(layered), list(W = c(x = 3.5, y = 3), b = 2))
  expect_identical(robust_aggregate(list(c(a = 1, b = 2), c(b = 3, a = 4), c(a = 0, b = 9)), "median"),
                   c(a = 1, b = 3))
  expect_snapshot(error = TRUE, {
    weighted_aggregate(list(c(a = 1, b = 2), c(c = 3, a = 4)))
    weighted_aggregate(list(c(a = 1, b = 2), c(3, 4)))
    weighted_aggregate(list(c(a = 1, a = 2), c(a = 3, a = 4)))
  })
})

test_that("noise refuses missing values like every other kernel", {
  expect_error(add_gaussian_noise(c(1, NA), 1, 1, 1e-5, seed = 1), class = "fedagg_error_input")
  expect_error(add_gaussian_noise(list(W = c(1, Inf)), sd = 1, seed = 1), class = "fedagg_error_input")
})

test_that("learning-rate schedules never give a zero rate or one above the base", {
  expect_identical(format(lr_cosine(20)), "<fed_lr_schedule> cosine (to 0 over 20 rounds)")
  d <- toy_classes(60, seed = 30)
  nodes <- fed_nodes(d$x, d$y, partition_iid(60, 3, seed = 1))
  srv <- fed_server(model_softmax(4, 3), nodes, fraction = 1, lr = 0.1, lr_schedule = "cosine", seed = 1)
  h <- srv$fit(5, verbose = FALSE)
  expect_true(all(h$lr > 0 & h$lr <= 0.1))
  high <- fed_server(model_softmax(4, 3), nodes, fraction = 1, lr = 0.01, lr_schedule = lr_cosine(min_lr = 0.05), seed = 1)
  expect_snapshot(error = TRUE, high$round())
  decay <- fed_server(model_softmax(4, 3), nodes, fraction = 1, lr = 0.1, lr_schedule = lr_exponential(1e-200), seed = 1)
  expect_snapshot(error = TRUE, decay$fit(3, verbose = FALSE))
  expect_identical(decay$rounds_done, 2L)
  expect_identical(nrow(decay$history), 2L)
})

test_that("errors raised by user code are wrapped with the round, and fedagg conditions name the node", {
  d <- toy_classes(60, seed = 31)
  nodes <- fed_nodes(d$x, d$y, partition_iid(60, 3, seed = 1))
  make <- function(...) fed_server(model_softmax(4, 3), nodes, fraction = 1, seed = 1, ...)
  bad_select <- make(selection = function(round, n, clients) stop("no {luck} today"))
  expect_snapshot(error = TRUE, bad_select$round())
  err <- tryCatch(bad_select$round(), error = identity)
  expect_s3_class(err, "fedagg_error_user_code")
  expect_identical(err$round, 1L)
  expect_identical(conditionMessage(err$parent), "no {luck} today")
  bad_hook <- make(hooks = list(round_start = function(server, round, clients) stop("hook broke")))
  expect_error(bad_hook$round(), class = "fedagg_error_user_code")
  expect_identical(bad_hook$rounds_done, 0L)
  bad_weights <- make(weights = function(info) c(1, -1, 1))
  err <- tryCatch(bad_weights$round(), error = identity)
  expect_s3_class(err, "fedagg_error_client")
  expect_identical(err$client, "client2")
  expect_identical(err$round, 1L)
  # Foreign text with braces is shown as it is, never read as a template.
  err <- tryCatch(fedagg:::call_rust(stop("bad {value} in core")), error = identity)
  expect_s3_class(err, "fedagg_error_rust")
  expect_match(conditionMessage(err), "bad {value} in core", fixed = TRUE)
  err <- tryCatch(fedagg:::call_rust(stop("[memory] cannot have {x}")), error = identity)
  expect_s3_class(err, "fedagg_error_memory")
})

test_that("a custom model's bad output fails the round instead of being committed", {
  lin <- function(predict = function(p, x) drop(x %*% p$w), loss = NULL, init = function(seed) list(w = c(0, 0))) {
    model_custom(init = init,
                 loss_grad = function(p, x, y) {
                   r <- drop(x %*% p$w) - y
                   list(loss = loss %||% mean(r^2), grad = list(w = 2 * drop(crossprod(x, r)) / length(y)))
                 },
                 predict = predict, task = "regression", n_features = 2)
  }
  x <- matrix(rnorm(40), 20)
  nodes <- fed_nodes(x, x[, 1], partition_iid(20, 2, seed = 1), validation = 0.3, seed = 1)
  nan_loss <- fed_server(lin(loss = NaN), nodes, fraction = 1, seed = 1)
  expect_snapshot(error = TRUE, nan_loss$round())
  expect_identical(nan_loss$rounds_done, 0L)
  expect_error(nan_loss$round(), class = "fedagg_error_diverged")
  bad_shape <- fed_server(lin(predict = function(p, x) numeric(nrow(x) + 1)), nodes, fraction = 1, seed = 1)
  expect_snapshot(error = TRUE, bad_shape$round())
  expect_identical(nrow(bad_shape$history), 0L)
  expect_snapshot(error = TRUE, init_params(lin(init = function(seed) list(w = c(NA, 1)))))
})

test_that("a round cannot be started from inside another", {
  d <- toy_classes(60, seed = 32)
  nodes <- fed_nodes(d$x, d$y, partition_iid(60, 3, seed = 1))
  srv <- fed_server(model_softmax(4, 3), nodes, fraction = 1, seed = 1,
                    hooks = list(round_end = function(server, round, record) if (round == 1) server$round()))
  expect_snapshot(error = TRUE, srv$fit(3, verbose = FALSE))
  expect_identical(srv$history$round, 1L)
})

test_that("read_idx checks sizes against the file before allocating", {
  f <- withr::local_tempfile()
  con <- file(f, "wb")
  writeBin(as.raw(c(0, 0, 0x08, 1)), con)
  writeBin(.Machine$integer.max, con, size = 4, endian = "big")
  writeBin(as.raw(1:12), con)
  close(con)
  expect_snapshot(error = TRUE, read_idx(f), transform = function(x) gsub("'[^']*'", "<file>", x))
  gz <- withr::local_tempfile(fileext = ".gz")
  con <- gzfile(gz, "wb")
  writeBin(as.raw(c(0, 0, 0x08, 1)), con)
  writeBin(.Machine$integer.max, con, size = 4, endian = "big")
  writeBin(as.raw(1:12), con)
  close(con)
  expect_error(read_idx(gz), "truncated")
  # Fashion-MNIST labels outside 0..9 are an error, not NA classes.
  dir <- withr::local_tempdir()
  write_ubyte <- function(path, dims, values) {
    con <- file(path, "wb")
    on.exit(close(con))
    writeBin(as.raw(c(0, 0, 0x08, length(dims))), con)
    writeBin(as.integer(dims), con, size = 4, endian = "big")
    writeBin(as.raw(values), con)
  }
  for (prefix in c("train", "t10k")) {
    write_ubyte(file.path(dir, paste0(prefix, "-images-idx3-ubyte")), c(2, 2, 2), 0:7)
    write_ubyte(file.path(dir, paste0(prefix, "-labels-idx1-ubyte")), 2, c(3, if (prefix == "train") 12 else 4))
  }
  expect_snapshot(error = TRUE, load_fashion_mnist(dir))
})

test_that("partition_quantity survives extreme skew", {
  for (args in list(list(sdlog = 1000), list(distribution = "powerlaw", shape = 1e-6))) {
    p <- do.call(partition_quantity, c(list(n = 100, n_clients = 5, seed = 1), args))
    expect_identical(sort(unlist(p, use.names = FALSE)), 1:100)
    expect_true(all(lengths(p) >= 1))
  }
})

test_that("messages name the argument the user wrote", {
  expect_snapshot(error = TRUE, {
    partition_iid(5, 6L)
    partition_dirichlet(rep(0:1, 500), n_clients = 20, alpha = 0.1, seed = 1)
    withr::with_options(list(fedagg.threads = "two"), weighted_aggregate(list(1, 2)))
    weighted_aggregate(list(1, 2), threads = .Machine$integer.max)
    fed_server(model_softmax(4, 3), fed_node(matrix(1:8, 2), 0:1), algorithm = "fedmax")
  })
})

test_that("every choice argument gives a classed error", {
  m <- model_softmax(2, 2)
  bad <- list(
    function() model_linear(2, init = "ones"),
    function() model_mlp(2, output = "tanh", n_classes = 2),
    function() model_custom(identity, identity, identity, task = "ranking", n_features = 1),
    function() robust_aggregate(list(1, 2, 3), "mode"),
    function() gaussian_noise_sd(1, 1, 1e-5, method = "laplace"),
    function() ks_test(1:3, 1:3, alternative = "both"),
    function() ks_drift(1:3, 1:3, adjust = "magic"),
    function() partition_quantity(10, 2, distribution = "zipf"),
    function() train_config(m, algorithm = "fedmax"),
    function() predict(m, init_params(m), matrix(1:2, 1), type = "link"),
    function() pool_clients(synthetic_fedprox(1, 1, n_clients = 2, seed = 1), "validation"),
    function() fed_node(matrix(1:4, 2), 0:1)$evaluate(init_params(m), m, data = "test"),
    function() fed_server(m, fed_node(matrix(1:4, 2), 0:1), selection = "random"),
    function() early_stopping(mode = "up")
  )
  for (f in bad) expect_error(f(), class = "fedagg_error_input")
})

test_that("fed_compare labels unnamed runs and takes a list", {
  d <- toy_classes(60, seed = 33)
  nodes <- fed_nodes(d$x, d$y, partition_iid(60, 3, seed = 1))
  run <- function(lr) fed_server(model_softmax(4, 3), nodes, fraction = 1, lr = lr, seed = 1)$fit(2, verbose = FALSE)
  h1 <- run(0.1)
  h2 <- run(0.2)
  cmp <- fed_compare(h1, h2)
  expect_identical(levels(cmp$run), c("run1", "run2"))
  expect_identical(nrow(summary(cmp)), 2L)
  expect_identical(levels(fed_compare(list(slow = h1, fast = h2))$run), c("slow", "fast"))
  expect_identical(nrow(summary(fed_compare(list(h1, h2)))), 2L)
})

test_that("same-seed runs give identical() histories; times are kept apart", {
  d <- toy_classes(60, seed = 34)
  nodes <- fed_nodes(d$x, d$y, partition_iid(60, 4, seed = 1))
  run <- function() {
    srv <- fed_server(model_softmax(4, 3), nodes, fraction = 0.5, test_data = d, seed = 9)
    srv$fit(4, verbose = FALSE)
    srv
  }
  a <- run()
  b <- run()
  expect_identical(a$history, b$history)
  expect_identical(a$client_log, b$client_log)
  expect_false("elapsed" %in% names(a$history))
  expect_identical(names(a$timings), c("round", "seconds", "core_seconds"))
  expect_identical(nrow(a$timings), 4L)
  expect_true(all(a$timings$core_seconds >= 0 & a$timings$core_seconds <= a$timings$seconds))
})

test_that("early stopping stops where a plain-R check of the full history says", {
  data <- synthetic_fedprox(0.5, 0.5, n_clients = 8, seed = 3)
  make <- function() fed_server(model_softmax(60, 10), fed_nodes(data), fraction = 0.5, lr = 0.05,
                                test_data = pool_clients(data, "test"), seed = 1)
  full <- make()$fit(40, verbose = FALSE)
  # Independent rule: the first round r at which the best test loss of the
  # last `patience` rounds is not below the best before them by min_delta.
  patience <- 3
  min_delta <- 0.002
  loss <- full$test_loss
  expected <- NA_integer_
  for (r in seq_along(loss)) {
    if (r <= patience) next
    if (min(loss[(r - patience + 1):r]) >= min(loss[1:(r - patience)]) - min_delta) {
      expected <- r
      break
    }
  }
  skip_if(is.na(expected), "the run improved in every window")
  srv <- make()
  h <- srv$fit(40, verbose = FALSE, stop_when = early_stopping("test_loss", patience = patience, min_delta = min_delta))
  expect_identical(nrow(h), expected)
  expect_identical(srv$stopped$round, expected)
  expect_identical(as.data.frame(h), as.data.frame(full[seq_len(expected), ]), ignore_attr = TRUE)
})

test_that("stop_training() from a hook ends fit() and keeps the rounds", {
  d <- toy_classes(60, seed = 35)
  nodes <- fed_nodes(d$x, d$y, partition_iid(60, 3, seed = 1))
  srv <- fed_server(model_softmax(4, 3), nodes, fraction = 1, seed = 1,
                    hooks = list(round_end = function(server, round, record) if (round == 3) stop_training("enough")))
  h <- srv$fit(10, verbose = FALSE)
  expect_identical(h$round, 1:3)
  expect_identical(srv$stopped, list(round = 3L, reason = "enough"))
  starter <- fed_server(model_softmax(4, 3), nodes, fraction = 1, seed = 1,
                        hooks = list(round_start = function(server, round, clients) if (round == 2) stop_training()))
  expect_identical(starter$fit(5, verbose = FALSE)$round, 1L)
  expect_error(stop_training(), class = "fedagg_stop_training")
})

test_that("a server clones: deep copies branch independently", {
  d <- toy_classes(60, seed = 36)
  nodes <- fed_nodes(d$x, d$y, partition_iid(60, 3, seed = 1))
  srv <- fed_server(model_softmax(4, 3), nodes, fraction = 1, seed = 1)
  srv$fit(2, verbose = FALSE)
  before <- srv$params
  copy <- srv$clone(deep = TRUE)
  copy$fit(2, verbose = FALSE)
  expect_identical(srv$params, before)
  expect_identical(srv$rounds_done, 2L)
  srv$fit(2, verbose = FALSE)
  expect_identical(srv$params, copy$params)
  expect_false(identical(srv$nodes[[1]], copy$nodes[[1]]))
})

test_that("every R chunk of the README runs", {
  readme <- testthat::test_path("..", "..", "README.md")
  skip_if_not(file.exists(readme), "README.md is not beside the tests (R CMD check)")
  lines <- readLines(readme)
  starts <- grep("^```r\\s*$", lines)
  ends <- grep("^```\\s*$", lines)
  expect_gt(length(starts), 1)
  withr::local_options(fedagg.verbose = FALSE)
  grDevices::pdf(NULL)
  on.exit(grDevices::dev.off(), add = TRUE)
  # A chunk after the line "<!-- not run: ... -->" needs what a test cannot
  # have (two machines, a site's own data).
  not_run <- vapply(starts, function(s) {
    before <- lines[seq_len(s - 1L)]
    before <- before[nzchar(trimws(before))]
    length(before) > 0L && grepl("^<!-- not run", before[length(before)])
  }, logical(1))
  expect_lt(sum(not_run), 5L)
  for (s in starts[!not_run]) {
    e <- ends[ends > s][1]
    code <- lines[(s + 1):(e - 1)]
    env <- new.env(parent = globalenv())
    err <- tryCatch({
      utils::capture.output(eval(parse(text = code), envir = env))
      NULL
    }, error = identity)
    expect(is.null(err), sprintf("README chunk at line %d failed: %s", s, if (!is.null(err)) conditionMessage(err)))
  }
})

test_that("headers describe what each algorithm does", {
  d <- toy_classes(60, seed = 37)
  nodes <- fed_nodes(d$x, d$y, partition_iid(60, 3, seed = 1))
  sgd <- fed_server(model_softmax(4, 3), nodes, algorithm = "fedsgd", fraction = 1, seed = 1)
  h <- sgd$fit(1, verbose = FALSE)
  expect_match(format(h)[2], "full-batch gradients")
  expect_no_match(format(h)[2], "E = ")
  expect_match(sgd$format()[2], "3 nodes, 3 per round")
  expect_match(sgd$format()[3], "one full-batch gradient per client")
})
