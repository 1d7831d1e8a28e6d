# Federated rounds against plain-R FedSGD / FedAvg, centralised fits, and
# the server's guarantees (thread invariance, atomic rounds, clear errors).

split_nodes <- function(d, k, seed = 1, validation = 0) {
  fed_nodes(d$x, d$y, partition_iid(nrow(d$x), k, seed = seed), validation = validation, seed = seed)
}

node_data <- function(d, part) lapply(part, function(idx) list(x = d$x[idx, , drop = FALSE], y = d$y[idx]))

test_that("FedSGD matches a plain-R implementation to 1e-10", {
  d <- toy_classes(90, seed = 21)
  part <- partition_quantity(90, 4, seed = 2)
  nodes <- fed_nodes(d$x, d$y, part)
  m <- model_mlp(4, hidden = 5, n_classes = 3)
  p0 <- random_params(m, 4)
  srv <- fed_server(m, nodes, algorithm = "fedsgd", fraction = 1, lr = 0.2, params = p0, seed = 1)
  srv$fit(3, verbose = FALSE)
  flat <- unlist(p0, use.names = FALSE)
  parts <- node_data(d, part)
  n <- vapply(parts, function(p) length(p$y), numeric(1))
  for (r in 1:3) {
    grads <- vapply(parts, function(p) unlist(ref_grad(relist_params(flat, p0), p$x, p$y, "softmax"), use.names = FALSE),
                    numeric(length(flat)))
    flat <- flat - 0.2 * drop(grads %*% n) / sum(n)
  }
  expect_equal(unlist(srv$params, use.names = FALSE), flat, tolerance = 1e-10)
  expect_equal(srv$history$lr, rep(0.2, 3))
})

test_that("FedAvg matches plain-R local SGD and sample-weighted averaging to 1e-10", {
  d <- toy_classes(70, seed = 22)
  part <- partition_quantity(70, 3, seed = 5)
  nodes <- fed_nodes(d$x, d$y, part)
  m <- model_softmax(4, 3)
  p0 <- random_params(m, 2)
  srv <- fed_server(m, nodes, fraction = 1, epochs = 2, batch_size = 6, lr = 0.05, momentum = 0.3,
                    weight_decay = 0.001, shuffle = FALSE, params = p0, lr_schedule = lr_step(0.5, 1), seed = 1)
  srv$fit(2, verbose = FALSE)
  parts <- node_data(d, part)
  n <- vapply(parts, function(p) length(p$y), numeric(1))
  cur <- p0
  for (r in 1:2) {
    lr <- 0.05 * 0.5^(r - 1)
    locals <- lapply(parts, function(p) unlist(ref_sgd(cur, p$x, p$y, "softmax", 2, 6, lr, 0.001, 0.3), use.names = FALSE))
    cur <- relist_params(drop(do.call(cbind, locals) %*% n) / sum(n), p0)
  }
  expect_equal(srv$params, cur, tolerance = 1e-10)
})

test_that("FedAvg with one client and C = 1 is centralised training", {
  d <- toy_classes(50, seed = 23)
  m <- model_logistic(4)
  y <- as.integer(d$y > 0)
  srv <- fed_server(m, fed_node(d$x, y), fraction = 1, epochs = 1, batch_size = 8, lr = 0.1,
                    shuffle = FALSE, seed = 3)
  srv$fit(5, verbose = FALSE)
  expect_equal(srv$params, ref_sgd(init_params(m), d$x, y, "logistic", 5, 8, 0.1), tolerance = 1e-10)
})

test_that("FedAvg on IID clients gets within 2 points of nnet::multinom and glm", {
  skip_if_not_installed("nnet")
  train <- toy_classes(3000, p = 5, k = 4, seed = 31)
  test <- toy_classes(2000, p = 5, k = 4, seed = 32)
  # toy_classes draws its centres from the seed: give the test set the same ones
  test <- withr::with_seed(31, {
    y <- sample.int(4, 3000, replace = TRUE) - 1L
    centers <- matrix(rnorm(4 * 5, sd = 1.5), 4, 5)
    withr::with_seed(99, {
      yt <- sample.int(4, 2000, replace = TRUE) - 1L
      list(x = centers[yt + 1, ] + matrix(rnorm(2000 * 5), 2000, 5), y = yt)
    })
  })
  nodes <- split_nodes(train, 10, seed = 3)
  srv <- fed_server(model_softmax(5, 4), nodes, fraction = 1, epochs = 2, batch_size = 20, lr = 0.05,
                    test_data = test, seed = 4)
  hist <- srv$fit(20, verbose = FALSE)
  fit <- nnet::multinom(y ~ ., data = data.frame(y = factor(train$y), train$x), trace = FALSE)
  central <- mean(as.integer(as.character(predict(fit, data.frame(test$x)))) == test$y)
  expect_lt(abs(utils::tail(hist$test_accuracy, 1) - central), 0.02)

  yb <- as.integer(train$y %in% c(0, 1))
  ytb <- as.integer(test$y %in% c(0, 1))
  nodes_b <- fed_nodes(train$x, yb, partition_iid(3000, 10, seed = 3))
  srv_b <- fed_server(model_logistic(5), nodes_b, fraction = 1, epochs = 2, batch_size = 20, lr = 0.05,
                      test_data = list(x = test$x, y = ytb), seed = 4)
  hist_b <- srv_b$fit(20, verbose = FALSE)
  g <- stats::glm(yb ~ ., family = stats::binomial(), data = data.frame(yb = yb, train$x))
  central_b <- mean((stats::predict(g, data.frame(test$x)) > 0) == ytb)
  expect_lt(abs(utils::tail(hist_b$test_accuracy, 1) - central_b), 0.02)
})

test_that("results are identical on 1 and 2 threads", {
  d <- synthetic_fedprox(1, 1, n_clients = 12, max_size = 300, seed = 5)
  run <- function(threads) {
    srv <- fed_server(model_mlp(60, hidden = 8, n_classes = 10), fed_nodes(d), fraction = 0.5,
                      weights = "accuracy", lr = 0.02, test_data = pool_clients(d, "test"),
                      threads = threads, seed = 9)
    srv$fit(3, verbose = FALSE)
    list(params = srv$params, history = srv$history[names(srv$history) != "elapsed"], log = srv$client_log)
  }
  expect_identical(run(1), run(2))
})

test_that("selection is seeded per round, sized max(min_clients, floor(C K)), or replayed from a schedule", {
  d <- toy_classes(200, seed = 24)
  nodes <- split_nodes(d, 20)
  srv <- fed_server(model_softmax(4, 3), nodes, fraction = 0.1, min_clients = 3, seed = 7)
  expect_length(srv$select(1), 3)
  expect_identical(srv$select(4), srv$select(4))
  expect_false(identical(srv$select(1), srv$select(2)))
  srv$fraction <- 0.25
  expect_length(srv$select(1), 5)
  plan <- list(c("client3", "client1"), c(5, 6, 7))
  rep <- fed_server(model_softmax(4, 3), nodes, schedule = plan, seed = 1)
  rep$fit(2, verbose = FALSE)
  # A schedule's picks train in node order, whatever order they are listed in.
  expect_identical(rep$client_log$client, c("client1", "client3", "client5", "client6", "client7"))
  expect_error(rep$round(), class = "fedagg_error_schedule")
  picker <- function(round, n, clients) clients$id[order(-clients$n_samples)][seq_len(n)]
  big <- fed_server(model_softmax(4, 3), nodes, fraction = 0.1, selection = picker, seed = 1)
  sizes <- vapply(nodes, function(x) x$n_samples, numeric(1))
  expect_setequal(big$select(1), names(sort(-sizes))[1:2])
})

test_that("aggregation weights: equal, accuracy and functions match plain R", {
  d <- toy_classes(120, seed = 25)
  nodes <- split_nodes(d, 4, validation = 0.25)
  m <- model_softmax(4, 3)
  p0 <- random_params(m, 5)
  local <- lapply(nodes, function(n) n$train(p0, train_config(m, batch_size = 5, lr = 0.1, seed = 0, shuffle = FALSE)))
  flat <- vapply(local, function(o) unlist(o$params, use.names = FALSE), numeric(15))
  check <- function(weights, expected_w) {
    srv <- fed_server(m, nodes, fraction = 1, batch_size = 5, lr = 0.1, shuffle = FALSE, weights = weights, params = p0)
    srv$round()
    expect_equal(unlist(srv$params, use.names = FALSE), drop(flat %*% expected_w) / sum(expected_w), tolerance = 1e-12)
    srv
  }
  check("equal", rep(1, 4))
  acc <- vapply(seq_along(nodes), function(k) nodes[[k]]$evaluate(local[[k]]$params, m)$accuracy, numeric(1))
  srv <- check("accuracy", acc)
  expect_equal(srv$client_log$weight, acc)
  check(function(info) info$n_samples^2, vapply(nodes, function(n) n$n_samples^2, numeric(1)))
})

test_that("learning-rate schedules follow their closed forms", {
  expect_equal(lr_step(0.9, 3)(0.1, 1:7), 0.1 * 0.9^c(0, 0, 0, 1, 1, 1, 2))
  expect_equal(lr_exponential(0.5)(1, 1:4), c(1, 0.5, 0.25, 0.125))
  # PyTorch's CosineAnnealingLR: eta_min + (eta_max - eta_min) * (1 + cos(pi * t / T)) / 2, t = r - 1.
  cosine_ref <- function(r, T, lr, min_lr) min_lr + (lr - min_lr) * (1 + cos(pi * (r - 1) / T)) / 2
  expect_equal(lr_cosine(min_lr = 0.01)(0.1, 1:5, rounds = 5), cosine_ref(1:5, 5, 0.1, 0.01))
  expect_equal(lr_cosine(4)(0.1, 1:6), c(cosine_ref(1:5, 4, 0.1, 0), 0))
  expect_true(all(lr_cosine()(0.1, 1:30, rounds = 30) > 0))
  expect_equal(lr_constant()(0.3, 1:3), rep(0.3, 3))
  d <- toy_classes(60, seed = 26)
  srv <- fed_server(model_softmax(4, 3), split_nodes(d, 3), fraction = 1, lr = 0.2, lr_schedule = "step", seed = 1)
  expect_equal(srv$fit(4, verbose = FALSE)$lr, 0.2 * 0.9^c(0, 0, 0, 1))
})

test_that("a failed round leaves the server as it was and names the client", {
  d <- toy_classes(60, seed = 27)
  nodes <- split_nodes(d, 3)
  srv <- fed_server(model_linear(4), c(nodes, fed_node(d$x[1:5, ] * 1e100, d$x[1:5, 1] * 1e100, id = "huge")),
                    fraction = 1, lr = 0.01, epochs = 3, batch_size = 1, seed = 1)
  expect_error(srv$round(), class = "fedagg_error_client")
  err <- tryCatch(srv$round(), error = identity)
  expect_identical(err$client, "huge")
  expect_identical(err$round, 1L)
  expect_identical(srv$rounds_done, 0L)
  expect_identical(srv$params, init_params(model_linear(4)))
  expect_identical(nrow(srv$history), 0L)

  # After good rounds, a failing one changes nothing either.
  flaky <- model_custom(
    init = function(seed) list(W1 = matrix(0, 4, 3), b1 = numeric(3)),
    loss_grad = function(params, x, y) {
      if (nrow(x) == 7) stop("sensor offline")
      list(loss = ref_loss(params, x, y, "softmax"), grad = ref_grad(params, x, y, "softmax"))
    },
    predict = function(params, x) ref_forward(params, x, "softmax")$out, n_features = 4, n_classes = 3)
  srv2 <- fed_server(flaky, nodes, fraction = 1, batch_size = Inf, lr = 0.1, seed = 2)
  srv2$fit(2, verbose = FALSE)
  before <- list(srv2$params, srv2$history, srv2$client_log)
  # A failing fourth node joins a new server started from srv2's parameters.
  bad <- fed_server(flaky, c(nodes, fed_node(d$x[1:7, ], d$y[1:7], id = "site-7")), fraction = 1,
                    batch_size = Inf, lr = 0.1, seed = 2, params = srv2$params)
  expect_snapshot(bad$round(), error = TRUE)
  expect_identical(bad$params, srv2$params)
  expect_identical(list(srv2$params, srv2$history, srv2$client_log), before)
})

test_that("bad inputs are clear errors", {
  d <- toy_classes(40, seed = 28)
  nodes <- split_nodes(d, 4)
  m <- model_softmax(4, 3)
  expect_snapshot(error = TRUE, {
    fed_server(m, nodes, fraction = 0)
    fed_server(m, nodes, fraction = 1.5)
    fed_server(m, nodes, min_clients = 9)
    fed_server(model_softmax(5, 3), nodes)
    fed_server(model_softmax(4, 2), nodes)
    fed_server(m, list(nodes[[1]], nodes[[1]]))
    fed_server(m, list(nodes[[1]], "client"))
    fed_server(m, nodes, weights = "accuracy")
    fed_server(m, nodes, weights = "loss")
    fed_server(m, nodes, schedule = list("client9"))
    fed_server(m, nodes, hooks = list(on_start = identity))
    fed_server(m, nodes, test_data = list(x = d$x, y = d$y + 5))
    fed_server(m, nodes, lr_schedule = "linear")
    fed_nodes(d$x, d$y, list(1:20, integer()))
  })
})

test_that("nodes survive serialisation (their Rust copy is rebuilt)", {
  d <- toy_classes(30, seed = 29)
  node <- fed_node(d$x, d$y, id = "far")
  m <- model_softmax(4, 3)
  cfg <- train_config(m, lr = 0.1, batch_size = 4)
  before <- node$train(init_params(m), cfg)
  moved <- unserialize(serialize(node, NULL))
  expect_identical(moved$train(init_params(m), cfg), before)
})

test_that("custom models train in parallel through future.apply with the same result", {
  skip_if_not_installed("future.apply")
  skip_on_cran()
  d <- toy_classes(80, seed = 30)
  nodes <- split_nodes(d, 4, validation = 0.2)
  soft <- model_custom(
    init = function(seed) list(W1 = matrix(0, 4, 3), b1 = numeric(3)),
    loss_grad = function(params, x, y) {
      z <- sweep(x %*% params$W1, 2, params$b1, `+`)
      p <- exp(z - apply(z, 1, max)); p <- p / rowSums(p)
      loss <- mean(-log(p[cbind(seq_along(y), y + 1)]))
      p[cbind(seq_along(y), y + 1)] <- p[cbind(seq_along(y), y + 1)] - 1
      list(loss = loss, grad = list(W1 = crossprod(x, p) / length(y), b1 = colMeans(p)))
    },
    predict = function(params, x) sweep(x %*% params$W1, 2, params$b1, `+`),
    n_features = 4, n_classes = 3)
  run <- function() {
    srv <- fed_server(soft, nodes, fraction = 0.5, batch_size = 5, lr = 0.1, seed = 3)
    srv$fit(3, verbose = FALSE)
    list(srv$params, srv$client_log)
  }
  sequential <- run()
  future::plan(future::multisession, workers = 2)
  withr::defer(future::plan(future::sequential))
  expect_equal(run(), sequential, tolerance = 1e-12)
})

test_that("history, comparison and plots", {
  d <- synthetic_fedprox(0.5, 0.5, n_clients = 8, max_size = 200, seed = 6)
  make <- function(lr) fed_server(model_softmax(60, 10), fed_nodes(d), fraction = 0.5, lr = lr,
                                  test_data = pool_clients(d, "test"), eval_every = 2, seed = 1)
  h1 <- make(0.05)$fit(4, verbose = FALSE)
  h2 <- make(0.01)$fit(4, verbose = FALSE)
  expect_s3_class(h1, "fed_history")
  expect_identical(h1$round, 1:4)
  expect_true(all(is.na(h1$test_accuracy[c(1, 3)])) && all(!is.na(h1$test_accuracy[c(2, 4)])))
  s <- summary(h1)
  expect_equal(s$final, h1$test_accuracy[4])
  expect_equal(s$best, max(h1$test_accuracy, na.rm = TRUE))
  cmp <- fed_compare(fast = h1, slow = h2)
  expect_identical(levels(cmp$run), c("fast", "slow"))
  expect_identical(nrow(cmp), 8L)
  expect_identical(summary(cmp)$final, c(h1$test_accuracy[4], h2$test_accuracy[4]))
  pdf(NULL)
  withr::defer(dev.off())
  expect_invisible(plot(h1))
  expect_invisible(plot(cmp))
  expect_output(print(h1), "fed_history")
  expect_output(print(cmp), "fast")
  skip_if_not_installed("ggplot2")
  expect_s3_class(ggplot2::autoplot(h1), "ggplot")
  expect_s3_class(ggplot2::autoplot(cmp), "ggplot")
  expect_error(fed_compare(h1, 3), class = "fedagg_error_input")
})

test_that("hooks run, and server_update replaces the aggregate", {
  d <- toy_classes(60, seed = 33)
  seen <- integer()
  srv <- fed_server(model_softmax(4, 3), split_nodes(d, 3), fraction = 1, lr = 0.1, seed = 1,
                    hooks = list(round_end = function(server, round, record) seen <<- c(seen, round),
                                 server_update = function(old, proposed, round, lr) old))
  p0 <- srv$params
  srv$fit(2, verbose = FALSE)
  expect_identical(seen, 1:2)
  expect_identical(srv$params, p0)
})
