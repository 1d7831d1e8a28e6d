# Built-in models against plain-R references: losses, gradients (also
# against finite differences), local SGD, predictions.

model_cases <- function() {
  list(
    linear = list(model = model_linear(4), output = "linear", y = function(d) d$x[, 1] - 2 * d$x[, 2] + 0.5),
    logistic = list(model = model_logistic(4), output = "logistic", y = function(d) as.integer(d$y > 0)),
    softmax = list(model = model_softmax(4, 3), output = "softmax", y = function(d) d$y),
    mlp = list(model = model_mlp(4, hidden = c(5, 3), n_classes = 3), output = "softmax", y = function(d) d$y),
    mlp_logistic = list(model = model_mlp(4, hidden = 6, output = "logistic"), output = "logistic",
                        y = function(d) as.integer(d$y > 0)),
    mlp_linear = list(model = model_mlp(4, hidden = 6, output = "linear"), output = "linear",
                      y = function(d) d$x[, 3])
  )
}

test_that("losses match plain R and gradients match finite differences", {
  d <- toy_classes(25, seed = 4)
  for (case in model_cases()) {
    y <- case$y(d)
    params <- random_params(case$model, seed = 7)
    out <- loss_grad(case$model, params, d$x, y)
    expect_equal(out$loss, ref_loss(params, d$x, y, case$output), tolerance = 1e-12)
    expect_equal(unlist(out$grad, use.names = FALSE),
                 unlist(ref_grad(params, d$x, y, case$output), use.names = FALSE), tolerance = 1e-12)
    expect_equal(unlist(out$grad, use.names = FALSE), ref_numeric_grad(params, d$x, y, case$output),
                 tolerance = 1e-6)
    expect_identical(lapply(out$grad, dim), lapply(params, dim))
  }
})

test_that("full-batch and minibatch local training match plain-R SGD to 1e-10", {
  d <- toy_classes(23, seed = 5)
  for (case in model_cases()) {
    y <- case$y(d)
    params <- random_params(case$model, seed = 3)
    node <- fed_node(d$x, y, id = "a")
    full <- node$train(params, train_config(case$model, epochs = 4, batch_size = Inf, lr = 0.05))
    expect_equal(full$params, ref_sgd(params, d$x, y, case$output, 4, Inf, 0.05), tolerance = 1e-10)
    mini <- node$train(params, train_config(case$model, epochs = 2, batch_size = 5, lr = 0.03,
                                            weight_decay = 0.01, momentum = 0.7, shuffle = FALSE))
    expect_equal(mini$params, ref_sgd(params, d$x, y, case$output, 2, 5, 0.03, 0.01, 0.7), tolerance = 1e-10)
    expect_equal(mini$n_samples, 23)
    delta <- node$train(params, train_config(case$model, epochs = 2, batch_size = 5, lr = 0.03,
                                             weight_decay = 0.01, momentum = 0.7, shuffle = FALSE), return = "delta")
    expect_equal(unlist(delta$delta), unlist(mini$params) - unlist(params), tolerance = 1e-12)
  }
})

test_that("the reported training loss is the mean loss before each step", {
  d <- toy_classes(12, seed = 8)
  m <- model_softmax(4, 3)
  p <- random_params(m, 2)
  out <- fed_node(d$x, d$y)$train(p, train_config(m, epochs = 1, batch_size = 4, lr = 0.1, shuffle = FALSE))
  losses <- numeric(3)
  cur <- p
  for (b in 1:3) {
    rows <- (4 * b - 3):(4 * b)
    losses[b] <- ref_loss(cur, d$x[rows, ], d$y[rows], "softmax")
    cur <- ref_sgd(cur, d$x[rows, ], d$y[rows], "softmax", 1, 4, 0.1)
  }
  expect_equal(out$train_loss, mean(losses), tolerance = 1e-12)
})

test_that("shuffled training is seeded: same seed same result, other seed differs", {
  d <- toy_classes(40, seed = 9)
  m <- model_softmax(4, 3)
  node <- fed_node(d$x, d$y)
  cfg <- function(seed) train_config(m, batch_size = 5, lr = 0.1, seed = seed)
  a <- node$train(init_params(m), cfg(1))
  expect_identical(a, node$train(init_params(m), cfg(1)))
  expect_false(identical(a$params, node$train(init_params(m), cfg(2))$params))
})

test_that("predictions match plain R", {
  d <- toy_classes(10, seed = 2)
  m <- model_mlp(4, hidden = 3, n_classes = 3)
  p <- random_params(m, 1)
  z <- ref_forward(p, d$x, "softmax")$out
  probs <- exp(z) / rowSums(exp(z))
  expect_equal(unname(predict(m, p, d$x)), probs, tolerance = 1e-12)
  expect_identical(colnames(predict(m, p, d$x)), c("0", "1", "2"))
  expect_identical(predict(m, p, d$x, type = "class"), max.col(z, "first") - 1L)
  lm <- model_logistic(4)
  lp <- random_params(lm, 3)
  expect_equal(predict(lm, lp, d$x), drop(plogis(d$x %*% lp$W1 + lp$b1)), tolerance = 1e-12)
})

test_that("initialisation is seeded, shaped, and zeros for convex models", {
  m <- model_mlp(5, hidden = c(4, 3), n_classes = 2)
  a <- init_params(m, seed = 1)
  expect_named(a, c("W1", "b1", "W2", "b2", "W3", "b3"))
  expect_identical(dim(a$W2), c(4L, 3L))
  expect_identical(a, init_params(m, seed = 1))
  expect_false(identical(a, init_params(m, seed = 2)))
  expect_true(all(a$b1 == 0) && all(abs(a$W1) <= sqrt(2) * sqrt(6 / 9)))
  expect_true(all(unlist(init_params(model_softmax(3, 4))) == 0))
})

test_that("labels are coded from factors, logicals and 0-based integers", {
  d <- toy_classes(15, seed = 3)
  m <- model_softmax(4, 3)
  p <- random_params(m, 1)
  f <- factor(c("a", "b", "c")[d$y + 1])
  expect_equal(loss_grad(m, p, d$x, f)$loss, loss_grad(m, p, d$x, d$y)$loss)
  lm <- model_logistic(4)
  expect_equal(loss_grad(lm, init_params(lm), d$x, d$y > 0)$loss, log(2))
})

test_that("model and data errors are clear", {
  d <- toy_classes(6, seed = 1)
  m <- model_softmax(4, 3)
  expect_snapshot(error = TRUE, {
    loss_grad(m, init_params(m), d$x[, 1:3], d$y)
    loss_grad(m, init_params(m), d$x, d$y + 1)
    loss_grad(m, init_params(m), d$x, d$y[-1])
    loss_grad(m, list(W1 = 1), d$x, d$y)
    fed_node(d$x, c(NA, d$y[-1]), id = "site-3")
    fed_node(d$x[0, ], integer(), id = "empty")
    fed_node(replace(d$x, 7, NaN), d$y, id = "site-9")
    model_softmax(4, 1)
    model_mlp(4, hidden = 0, n_classes = 3)
    train_config(m, momentum = 1)
    train_config(m, batch_size = 0)
  })
})

test_that("custom R models train like the built-in ones", {
  softmax_r <- model_custom(
    init = function(seed) list(W1 = matrix(0, 4, 3), b1 = numeric(3)),
    loss_grad = function(params, x, y) {
      list(loss = ref_loss(params, x, y, "softmax"), grad = ref_grad(params, x, y, "softmax"))
    },
    predict = function(params, x) ref_forward(params, x, "softmax")$out,
    n_features = 4, n_classes = 3, name = "softmax in R"
  )
  d <- toy_classes(30, seed = 11)
  node <- fed_node(d$x, d$y, x_val = d$x[1:10, ], y_val = d$y[1:10])
  p <- random_params(model_softmax(4, 3), 1)
  cfg <- function(m) train_config(m, epochs = 2, batch_size = 7, lr = 0.1, momentum = 0.5, shuffle = FALSE)
  expect_equal(node$train(p, cfg(softmax_r))$params, node$train(p, cfg(model_softmax(4, 3)))$params,
               tolerance = 1e-10)
  expect_equal(node$evaluate(p, softmax_r), node$evaluate(p, model_softmax(4, 3)), tolerance = 1e-10)
  expect_snapshot(print(softmax_r))
})

test_that("minibatch matrix kernels match plain-R SGD for B = 1, B > n and a batch across blocks", {
  d <- toy_classes(23, seed = 6)
  for (case in model_cases()) {
    y <- case$y(d)
    params <- random_params(case$model, seed = 4)
    node <- fed_node(d$x, y, id = "a")
    for (b in c(1, 40)) {
      out <- node$train(params, train_config(case$model, epochs = 2, batch_size = b, lr = 0.02, shuffle = FALSE))
      expect_equal(out$params, ref_sgd(params, d$x, y, case$output, 2, b, 0.02), tolerance = 1e-10)
    }
  }
  # 300 rows: a full batch is two blocks of the kernels (256 + 44 rows).
  big <- toy_classes(300, seed = 2)
  m <- model_mlp(4, hidden = 5, n_classes = 3)
  params <- random_params(m, seed = 1)
  out <- fed_node(big$x, big$y)$train(params, train_config(m, epochs = 2, batch_size = 280, lr = 0.1, shuffle = FALSE))
  expect_equal(out$params, ref_sgd(params, big$x, big$y, "softmax", 2, 280, 0.1), tolerance = 1e-10)
})

test_that("float32 models compute in single precision and agree with float64 to its accuracy", {
  d <- toy_classes(60, seed = 3)
  m64 <- model_mlp(4, hidden = 8, n_classes = 3)
  m32 <- model_mlp(4, hidden = 8, n_classes = 3, precision = "float32")
  expect_match(format(m32), "float32")
  expect_no_match(format(m64), "float32")
  p <- random_params(m64, seed = 2)
  g64 <- loss_grad(m64, p, d$x, d$y)
  g32 <- loss_grad(m32, p, d$x, d$y)
  expect_equal(g32$loss, g64$loss, tolerance = 1e-6)
  expect_equal(unlist(g32$grad), unlist(g64$grad), tolerance = 1e-5)
  # Single precision really is used: the results differ beyond float64 rounding.
  expect_gt(max(abs(unlist(g32$grad) - unlist(g64$grad))), 1e-12)
  expect_equal(predict(m32, p, d$x), predict(m64, p, d$x), tolerance = 1e-6)
  # A float32 federation is reproducible on any number of threads.
  nodes <- fed_nodes(d$x, d$y, partition_iid(60, 4, seed = 1))
  fit <- function(model, threads) {
    fed_server(model, nodes, fraction = 1, epochs = 2, batch_size = 8, lr = 0.1, seed = 5, threads = threads)$fit(3, verbose = FALSE)
  }
  h1 <- fit(m32, 1)
  expect_identical(h1, fit(m32, 2))
  expect_equal(h1$train_loss, fit(m64, 1)$train_loss, tolerance = 1e-4)
  expect_error(model_softmax(4, 3, precision = "float16"), class = "fedagg_error")
})

test_that("rounds, evaluation and predictions read the nodes' data in place, never a copy", {
  skip_if_not(capabilities("profmem"), "R without memory profiling (tracemem)")
  set.seed(1)
  x <- matrix(rnorm(400), 100)
  # A shared double matrix behind an ALTREP wrapper, as storage.mode<- and
  # other attribute setters return: a writable pointer into it would copy it.
  wrapped <- x
  storage.mode(wrapped) <- "double"
  y <- as.integer(x[, 1] > 0)
  nodes <- list(a = fed_node(wrapped, y, id = "a", x_val = x[1:20, ], y_val = y[1:20]),
                b = fed_node(x, y, id = "b", x_val = x[21:40, ], y_val = y[21:40]))
  m <- model_logistic(4)
  copies <- character()
  tracemem(x)
  copies <- c(copies, capture.output({
    srv <- fed_server(m, nodes, fraction = 1, seed = 1, weights = "accuracy", lr = 0.1)
    srv$fit(2, verbose = FALSE)
    srv$evaluate()
    loss_grad(m, srv$params, x, y)
    predict(m, srv$params, x)
  }))
  untracemem(x)
  expect_false(any(grepl("tracemem", copies)), info = paste(copies, collapse = "\n"))
})
