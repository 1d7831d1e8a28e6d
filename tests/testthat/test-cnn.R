# Convolutional networks: the Rust core's loss and gradients against a
# plain-R reference written from the definitions (nested loops over the
# windows, no unfolding), differentiated by the complex step (Squire and
# Trapp 1998: Im f(p + ih e_j) / h, exact to rounding, with no backward
# pass written twice); then training through every path of the server.

# One image's loss, from the definitions, in complex arithmetic. `p` is the
# flat parameter vector (complex), `x` one image row, `y` its class code.
cnn_reference_loss <- function(p, model, x, y) {
  H <- model$input[1]; W <- model$input[2]; C <- model$input[3]
  a <- as.complex(x)
  at <- function(h, w, c, W, C) (h * W + w) * C + c + 1  # 0-based position
  off <- 0
  codes <- matrix(model$front, 5)
  for (j in seq_len(ncol(codes))) {
    op <- codes[, j]
    if (op[1] == 1) {
      co <- op[2]; k <- op[3]; s <- op[4]; pad <- op[5]
      nw <- k * k * C * co
      wt <- p[off + seq_len(nw)]
      b <- p[off + nw + seq_len(co)]
      off <- off + nw + co
      Ho <- (H + 2 * pad - k) %/% s + 1; Wo <- (W + 2 * pad - k) %/% s + 1
      out <- complex(Ho * Wo * co)
      for (oh in 0:(Ho - 1)) for (ow in 0:(Wo - 1)) for (o in 0:(co - 1)) {
        z <- b[o + 1]
        for (kh in 0:(k - 1)) for (kw in 0:(k - 1)) {
          ih <- oh * s + kh - pad; iw <- ow * s + kw - pad
          if (ih < 0 || iw < 0 || ih >= H || iw >= W) next
          for (c in 0:(C - 1)) z <- z + wt[o * k * k * C + (kh * k + kw) * C + c + 1] * a[at(ih, iw, c, W, C)]
        }
        out[at(oh, ow, o, Wo, co)] <- z
      }
      a <- out; H <- Ho; W <- Wo; C <- co
    } else if (op[1] == 2) {
      a <- ifelse(Re(a) > 0, a, 0)
    } else if (op[1] %in% c(5, 6)) {
      # Dropout: off outside a training step (loss_grad() and evaluation).
    } else {
      k <- op[2]; s <- op[3]
      Ho <- (H - k) %/% s + 1; Wo <- (W - k) %/% s + 1
      out <- complex(Ho * Wo * C)
      for (oh in 0:(Ho - 1)) for (ow in 0:(Wo - 1)) for (c in 0:(C - 1)) {
        win <- a[vapply(0:(k * k - 1), function(i) at(oh * s + i %/% k, ow * s + i %% k, c, W, C), 1)]
        out[at(oh, ow, c, Wo, C)] <- if (op[1] == 3) win[which.max(Re(win))] else mean(win)
      }
      a <- out; H <- Ho; W <- Wo
    }
  }
  sizes <- model$sizes
  for (l in seq_len(length(sizes) - 1L)) {
    n_in <- sizes[l]; n_out <- sizes[l + 1L]
    wm <- matrix(p[off + seq_len(n_in * n_out)], n_in)
    b <- p[off + n_in * n_out + seq_len(n_out)]
    off <- off + n_in * n_out + n_out
    z <- b + colSums(wm * a)
    a <- if (l < length(sizes) - 1L) ifelse(Re(z) > 0, z, 0) else z
  }
  m <- max(Re(a))
  log(sum(exp(a - m))) + m - a[y + 1]
}

cnn_reference <- function(model, flat, x, y, rows) {
  h <- 1e-30
  grad <- numeric(length(flat))
  loss <- 0
  for (r in rows) {
    p <- as.complex(flat)
    loss <- loss + Re(cnn_reference_loss(p, model, x[r, ], y[r]))
    for (j in seq_along(flat)) {
      p[j] <- complex(real = flat[j], imaginary = h)
      grad[j] <- grad[j] + Im(cnn_reference_loss(p, model, x[r, ], y[r])) / h
      p[j] <- flat[j]
    }
  }
  list(loss = loss / length(rows), grad = grad / length(rows))
}

cnn_cases <- function() list(
  small_lenet = model_cnn(c(8, 8, 1), list(conv(3, 3), relu(), max_pool(2), conv(2, 2, padding = 1), relu(),
                                          avg_pool(2, 1), dense(5), relu()), n_classes = 3),
  strided = model_cnn(c(7, 6, 2), list(conv(3, 3, stride = 2, padding = 1), relu(), max_pool(2, stride = 1), flatten(),
                                      dense(4), relu()), n_classes = 4),
  pool_first = model_cnn(c(5, 5, 3), list(avg_pool(2, 1), conv(2, 3, padding = 2), relu()), n_classes = 2),
  dropouts = model_cnn(c(6, 6, 1), list(conv(2, 3), relu(), dropout(0.3), max_pool(2), dense(4), relu(), dropout(0.5)),
                       n_classes = 3)
)

test_that("CNN losses and gradients equal the plain-R reference (float64 1e-10, float32 1e-4)", {
  for (name in names(cnn_cases())) {
    model <- cnn_cases()[[name]]
    set.seed(nchar(name))
    n <- 5
    x <- matrix(rnorm(n * model$n_features), n)
    y <- sample(0:(model$n_classes - 1), n, TRUE)
    params <- init_params(model, seed = 4)
    flat <- unlist(params, use.names = FALSE)
    for (rows in list(2L, 1:n)) {
      ref <- cnn_reference(model, flat, x, y, rows)
      for (precision in c("float64", "float32")) {
        m <- model
        m$precision <- precision
        got <- loss_grad(m, params, x[rows, , drop = FALSE], y[rows])
        tol <- if (precision == "float64") 1e-10 else 1e-4
        g <- unlist(got$grad, use.names = FALSE)
        expect_lt(abs(got$loss - ref$loss), tol * abs(ref$loss))
        expect_lt(max(abs(g - ref$grad)), tol * max(abs(ref$grad)), label = sprintf("%s, %d rows, %s", name, length(rows), precision))
      }
    }
  }
})

test_that("a finite difference agrees with the gradient on a few parameters", {
  model <- cnn_cases()$small_lenet
  set.seed(2)
  x <- matrix(rnorm(4 * 64), 4)
  y <- c(0, 2, 1, 1)
  params <- init_params(model, seed = 1)
  g <- unlist(loss_grad(model, params, x, y)$grad, use.names = FALSE)
  flat <- unlist(params, use.names = FALSE)
  loss_at <- function(f) loss_grad(model, relist(f, params), x, y)$loss
  for (j in c(1, 20, 40, 100, length(flat))) {
    e <- replace(numeric(length(flat)), j, 1e-6)
    expect_lt(abs((loss_at(flat + e) - loss_at(flat - e)) / 2e-6 - g[j]), 1e-6 * (1 + abs(g[j])))
  }
})

test_that("a CNN trains through the server with the same results on any number of threads, and resumes exactly", {
  model <- cnn_cases()$small_lenet
  set.seed(3)
  n <- 90
  x <- matrix(rnorm(n * 64), n)
  y <- sample(0:2, n, TRUE)
  nodes <- fed_nodes(x, y, partition_iid(n, 3, seed = 1), validation = 0.2, seed = 1)
  make <- function(threads, ...) {
    fed_server(model, nodes, fraction = 1, lr = 0.05, seed = 3, batch_size = 8, epochs = 2, threads = threads, ...)
  }
  for (setup in list(list(), list(algorithm = scaffold(), server_optimizer = server_adam(lr = 0.01)),
                     list(algorithm = fedprox(0.1), momentum = 0.9), list(algorithm = fednova()))) {
    one <- do.call(make, c(list(threads = 1), setup))
    two <- do.call(make, c(list(threads = 2), setup))
    one$fit(3, verbose = FALSE)
    two$fit(3, verbose = FALSE)
    expect_identical(one$params, two$params)
    expect_true(all(is.finite(unlist(one$params))))
  }
  # saveRDS mid-run, then the rest: the run without a break.
  a <- make(2)
  a$fit(4, verbose = FALSE)
  b <- make(2)
  b$fit(2, verbose = FALSE)
  f <- withr::local_tempfile(fileext = ".rds")
  saveRDS(b, f)
  b <- readRDS(f)
  b$fit(2, verbose = FALSE)
  expect_identical(a$params, b$params)
  # predict() and evaluate(): class probabilities that sum to one.
  p <- a$predict(x[1:5, ])
  expect_equal(rowSums(p), rep(1, 5), tolerance = 1e-12)
  expect_identical(nrow(a$evaluate()), 3L)
  # float32, DP, compression and a robust rule run too.
  m32 <- model
  m32$precision <- "float32"
  for (levers in list(list(privacy = dp_central(0.5, clip = 1)), list(compress = compress_topk(0.5), aggregator = agg_median()))) {
    c32 <- do.call(fed_server, c(list(m32, nodes, fraction = 1, lr = 0.05, seed = 3, batch_size = 8), levers))
    c32$fit(2, verbose = FALSE)
    expect_true(all(is.finite(unlist(c32$params))))
  }
})

test_that("layer specifications that cannot work are refused when the model is made, naming the layer", {
  expect_error(model_cnn(c(8, 8, 1), list(conv(3, 3), relu(), max_pool(2), conv(16, 5)), n_classes = 3),
               class = "fedagg_error_input", regexp = "layer 4 \\(conv\\(16, 5\\)\\)")
  expect_error(conv(3, 3, stride = -1), class = "fedagg_error_input", regexp = "stride")
  expect_error(conv(3, 3, stride = 0), class = "fedagg_error_input", regexp = "stride")
  expect_error(model_cnn(c(8, 8, 1), list(conv(3, 3), dense(4)), n_classes = 3), class = "fedagg_error_input",
               regexp = "layer 2 \\(dense\\(4\\)\\)")
  expect_error(model_cnn(c(8, 8, 1), list(dense(4), relu(), conv(2, 2)), n_classes = 3), class = "fedagg_error_input",
               regexp = "layer 3")
  expect_error(model_cnn(c(8, 8, 1), list(flatten(), relu()), n_classes = 3), class = "fedagg_error_input", regexp = "layer 2")
  expect_error(model_cnn(c(8, 8, 1), list(max_pool(9)), n_classes = 3), class = "fedagg_error_input", regexp = "layer 1")
  expect_error(model_cnn(c(8, 0, 1), list(relu()), n_classes = 3), class = "fedagg_error_input", regexp = "input")
  expect_error(model_cnn(c(8, 8), list(relu(), "conv"), n_classes = 3), class = "fedagg_error_input", regexp = "Layer 2")
  expect_error(model_cnn(c(8, 8), list(), n_classes = 3), class = "fedagg_error_input", regexp = "layers")
  # Sizes past what can be addressed: memory errors, never a wrapped size.
  expect_error(model_cnn(c(28, 28, 1), list(conv(3e6, 1)), n_classes = 10), class = "fedagg_error_memory")
  expect_error(model_cnn(c(2, 2, 1), list(conv(1, 1, padding = 2147483647), max_pool(2147483647)), n_classes = 10),
               class = "fedagg_error_memory")
  expect_error(dropout(0.9999996), class = "fedagg_error_input")
  # init = "glorot" initialises the convolutions too (a zero front never trains).
  g <- init_params(model_cnn(c(8, 8, 1), list(conv(3, 3), relu()), n_classes = 3, init = "glorot"), seed = 1)
  expect_true(all(g$conv1_W != 0))
  # A node whose images have another shape: refused at fed_server(), naming it.
  model <- cnn_cases()$small_lenet
  bad <- fed_nodes(matrix(rnorm(60 * 49), 60), rep(0:2, 20), partition_iid(60, 2, seed = 1))
  err <- expect_error(fed_server(model, bad), class = "fedagg_error_client")
  expect_match(conditionMessage(err), "client1", fixed = TRUE)
  expect_match(conditionMessage(err), "64", fixed = TRUE)
})

test_that("images_to_matrix() lays pixels out in reading order, channels fastest", {
  imgs <- array(seq_len(2 * 3 * 4 * 2), c(2, 3, 4, 2))
  m <- images_to_matrix(imgs)
  for (h in 1:3) for (w in 1:4) for (c in 1:2) {
    expect_identical(m[2, (h - 1) * 4 * 2 + (w - 1) * 2 + c], as.double(imgs[2, h, w, c]))
  }
  expect_identical(dim(images_to_matrix(array(0, c(5, 6, 7)))), c(5L, 42L))
  expect_error(images_to_matrix(matrix(0, 2, 2)), class = "fedagg_error_input")
})

test_that("a networked CNN federation gives the simulation's results", {
  skip_on_cran()
  skip_if_not_installed("callr")
  model <- cnn_cases()$strided
  set.seed(8)
  n <- 60
  x <- matrix(rnorm(n * model$n_features), n)
  y <- sample(0:3, n, TRUE)
  nodes <- fed_nodes(x, y, partition_iid(n, 4, seed = 2))
  make <- function(nodes) fed_server(model, nodes, fraction = 0.5, lr = 0.05, seed = 5, batch_size = 8,
                                     algorithm = scaffold())
  simulated <- make(nodes)
  simulated$fit(3, verbose = FALSE)
  networked <- run_networked(make, nodes, rounds = 3, n_procs = 2)
  expect_identical(attr(networked, "node_exit"), rep(0L, 2))
  expect_identical(networked$params, simulated$params)
})

test_that("the NIID-Bench setting runs (2-round smoke version of bench/niid-bench.R)", {
  skip_on_cran()
  fm <- tryCatch(load_fashion_mnist(), fedagg_error = function(e) NULL)
  if (is.null(fm)) skip("Fashion-MNIST is not installed (Debian's dataset-fashion-mnist; make test installs it)")
  keep <- seq_len(3000)
  parts <- partition_dirichlet(fm$train$y[keep], 10, alpha = 0.5, seed = 2022)
  nodes <- fed_nodes(fm$train$x[keep, ], fm$train$y[keep], parts)
  lenet <- model_cnn(c(28, 28, 1), list(conv(6, 5), relu(), max_pool(2), conv(16, 5), relu(), max_pool(2),
                                        dense(120), relu(), dense(84), relu()),
                     n_classes = 10, classes = levels(fm$train$y))
  test <- list(x = fm$test$x[1:1000, ], y = fm$test$y[1:1000])
  for (alg in list(fedavg(), fedprox(0.01), fednova(), scaffold())) {
    srv <- fed_server(lenet, nodes, algorithm = alg, fraction = 1, epochs = 3, batch_size = 64, lr = 0.05,
                      momentum = 0.9, seed = 1, test_data = test)
    h <- srv$fit(2, verbose = FALSE)
    expect_identical(nrow(h), 2L)
    expect_true(all(is.finite(unlist(srv$params))))
    expect_true(all(is.finite(h$test_loss)))
    # Above chance (10 %) after two rounds of three epochs; SCAFFOLD's
    # control variates are zero in its first round, and it starts slower.
    if (!inherits(alg, "fed_algorithm") || alg$kind != "scaffold") expect_gt(h$test_accuracy[2], 0.2)
  }
})

test_that("dropout trains reproducibly and is off when evaluating", {
  with_drop <- model_cnn(c(8, 8, 1), list(conv(3, 3), relu(), dropout(0.25), max_pool(2), dense(6), relu(), dropout(0.5)),
                         n_classes = 3)
  without <- model_cnn(c(8, 8, 1), list(conv(3, 3), relu(), max_pool(2), dense(6), relu()), n_classes = 3)
  zero <- model_cnn(c(8, 8, 1), list(conv(3, 3), relu(), dropout(0), max_pool(2), dense(6), relu(), dropout(0)),
                    n_classes = 3)
  expect_identical(names(init_params(with_drop)), names(init_params(without)))
  set.seed(4)
  n <- 90
  x <- matrix(rnorm(n * 64), n)
  y <- sample(0:2, n, TRUE)
  nodes <- fed_nodes(x, y, partition_iid(n, 3, seed = 1))
  run <- function(model, threads) {
    srv <- fed_server(model, nodes, fraction = 1, lr = 0.05, seed = 3, batch_size = 8, epochs = 2, threads = threads,
                      params = init_params(without, seed = 2))
    srv$fit(3, verbose = FALSE)
    srv
  }
  a <- run(with_drop, 1)
  b <- run(with_drop, 2)
  expect_identical(a$params, b$params)
  plain <- run(without, 2)
  expect_false(identical(a$params, plain$params))
  # A rate of 0 is no dropout at all.
  expect_identical(run(zero, 2)$params, plain$params)
  # Evaluation and prediction pass values on: the network without dropout.
  ev <- function(model, params) {
    s <- fed_server(model, nodes, params = params, seed = 1, test_data = list(x = x, y = y))
    s$evaluate()
  }
  expect_identical(ev(with_drop, a$params), ev(without, a$params))
  expect_identical(fed_server(with_drop, nodes, params = a$params)$predict(x[1:4, ]),
                   fed_server(without, nodes, params = a$params)$predict(x[1:4, ]))
  expect_error(dropout(1), class = "fedagg_error_input", regexp = "rate")
  expect_error(dropout(-0.1), class = "fedagg_error_input", regexp = "rate")
  expect_error(model_cnn(c(8, 8), list(dense(3), dropout(0.5), relu()), n_classes = 3), class = "fedagg_error_input")
})
