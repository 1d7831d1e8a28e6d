# fed_tune(): successive halving checked against its definition (which
# trials go on, how many rounds each runs), continuation against a fresh
# run, reproducibility across future plans, diagnosis starting points and
# bad input.

tune_nodes <- function() {
  withr::with_seed(1, {
    x <- matrix(rnorm(2000), 400)
    y <- factor(max.col(x[, 1:3]))
  })
  fed_nodes(x, y, partition_dirichlet(y, n_clients = 8, alpha = 0.5, min_size = 10, seed = 1),
            validation = 0.25, seed = 1)
}

make_tune_server <- function(nodes) {
  force(nodes)
  function(lr, epochs, seed) {
    fed_server(model_softmax(5, 3), nodes, fraction = 0.5, lr = lr, epochs = epochs, seed = seed)
  }
}

space9 <- list(lr = c(0.01, 0.1, 1), epochs = c(1, 5, 10))

test_that("successive halving keeps the best third of each rung, ranked by the mean of their last 3 rounds", {
  make <- make_tune_server(tune_nodes())
  tuned <- fed_tune(make, space9, rounds = 27, budget = 200)
  r <- tuned$results
  expect_identical(tuned$rungs, c(3, 9, 27))
  # 9 trials to round 3, 3 of them to round 9, 1 to round 27.
  expect_identical(sort(r$rounds), c(rep(3L, 6), rep(9L, 2), 27L))
  expect_identical(tuned$rounds_used, 9L * 3L + 3L * 6L + 18L)
  # Plain R: each trial's validation accuracy over its first 3 rounds, from
  # a fresh server with the trial's seed; the 3 best by the mean of those
  # rounds are the trials that went past round 3.
  configs <- expand.grid(lr = space9$lr, epochs = space9$epochs)
  first3 <- sapply(seq_len(nrow(configs)), function(i) {
    srv <- make(configs$lr[i], configs$epochs[i], seed = 1L + i)
    srv$fit(3)
    mean(srv$history$val_accuracy)
  })
  went_on <- sort(r$trial[r$rounds > 3])
  expect_identical(went_on, sort(order(-first3)[1:3]))
  # The winner continued its own server: the same as one run of 27 rounds.
  best <- r$trial[1]
  fresh <- make(configs$lr[best], configs$epochs[best], seed = 1L + best)
  fresh$fit(27)
  expect_identical(tuned$best_server$params, fresh$params)
  expect_identical(tuned$best_config, list(lr = configs$lr[best], epochs = configs$epochs[best]))
  expect_equal(r$final[1], mean(tail(fresh$history$val_accuracy, 3)))
})

test_that("with a target, trials are ranked by the rounds they took to reach it", {
  make <- make_tune_server(tune_nodes())
  tuned <- fed_tune(make, space9, rounds = 9, budget = 100, target = 0.85, method = "grid")
  r <- tuned$results
  expect_true(all(r$rounds == 9L))
  reached <- r$rounds_to_target
  expect_false(is.unsorted(ifelse(is.na(reached), Inf, reached)))
  # Plain R: the first round at which the mean of the last 3 rounds (of the
  # rounds so far, at first) is at or above the target.
  for (i in seq_len(nrow(r))) {
    curve <- tuned$curves[[i]]
    smooth <- stats::filter(curve, rep(1 / 3, 3), sides = 1)
    smooth[1:2] <- cumsum(curve[1:2]) / 1:2
    hit <- which(smooth >= 0.85)
    held <- mean(tail(curve, 3)) >= 0.85
    expect_identical(r$rounds_to_target[i], if (length(hit) && held) hit[1] else NA_integer_)
  }
})

test_that("the same seed gives the same tuning under plan(sequential) and plan(multisession)", {
  skip_on_cran()
  skip_if_not_installed("future.apply")
  make <- make_tune_server(tune_nodes())
  space <- list(lr = c(0.05, 0.3), epochs = c(1, 3))
  withr::local_options(future.rng.onMisuse = "error")
  future::plan(future::sequential)
  a <- fed_tune(make, space, rounds = 6, budget = 40, seed = 7)
  oplan <- future::plan(future::multisession, workers = 2)
  withr::defer(future::plan(oplan))
  b <- fed_tune(make, space, rounds = 6, budget = 40, seed = 7)
  drop <- function(x) x$results[setdiff(names(x$results), "seconds")]
  expect_identical(drop(a), drop(b))
  expect_identical(a$curves, b$curves)
  expect_identical(a$best_server$params, b$best_server$params)
  # Another seed, other trials.
  future::plan(future::sequential)
  c2 <- fed_tune(make, space, rounds = 6, budget = 40, seed = 8)
  expect_false(identical(a$curves, c2$curves))
})

test_that("a failing trial is reported in the table, not fatal", {
  nodes <- tune_nodes()
  make <- function(lr, seed) {
    if (lr > 1) stop("this learning rate is refused")
    fed_server(model_softmax(5, 3), nodes, fraction = 0.5, lr = lr, seed = seed)
  }
  tuned <- fed_tune(make, list(lr = c(0.1, 5)), rounds = 3, budget = 10, method = "grid")
  failed <- tuned$results[tuned$results$lr == "5", ]
  expect_match(failed$status, "^failed: .*this learning rate is refused")
  expect_identical(tuned$results$rank[tuned$results$lr == "0.1"], 1L)
  expect_output(print(tuned), "fed_tuning")
  expect_output(print(summary(tuned)), "1 failed")
})

test_that("a diagnosis's levers are the first configurations tried", {
  nodes <- tune_nodes()
  make <- function(lr, epochs, seed) fed_server(model_softmax(5, 3), nodes, fraction = 0.5, lr = lr, epochs = epochs, seed = seed)
  slow <- make(lr = 0.001, epochs = 1, seed = 1)
  slow$fit(12)
  d <- fed_diagnose(slow)
  expect_identical(d$cause[1], "lr_too_low")
  tuned <- fed_tune(make, list(lr = c(0.001, 0.01), epochs = c(1, 5)), rounds = 4, budget = 100, method = "grid",
                    from = d)
  # The finding's first lever, "lr = 0.005", applied to the baseline (the
  # first value of each lever) is trial 1.
  first <- tuned$results[tuned$results$trial == 1, ]
  expect_identical(first$lr, "0.005")
  expect_identical(first$epochs, "1")
})

test_that("tuning ranks on the validation split; the test set needs saying, with a warning", {
  nodes <- fed_nodes(matrix(rnorm(400), 100), rep(0:1, 50), partition_iid(100, 4, seed = 1))
  make <- function(lr) fed_server(model_logistic(4), nodes, lr = lr, fraction = 0.5,
                                  test_data = list(x = matrix(rnorm(40), 10), y = rep(0:1, 5)), seed = 1)
  expect_error(fed_tune(make, list(lr = c(0.1, 1)), rounds = 2), "no validation split", class = "fedagg_error_input")
  expect_warning(fed_tune(make, list(lr = c(0.1, 1)), rounds = 2, metric = "test_loss"),
                 class = "fedagg_warning_test_tuning")
})

test_that("bad input gets classed errors", {
  nodes <- tune_nodes()
  make <- make_tune_server(nodes)
  expect_error(fed_tune(make, list(), rounds = 3), "named list", class = "fedagg_error_input")
  expect_error(fed_tune(make, list(lr = numeric()), rounds = 3), "no value to try", class = "fedagg_error_input")
  expect_error(fed_tune(make, list(momentum = 0.9), rounds = 3), "does not take", class = "fedagg_error_input")
  expect_error(fed_tune(make, list(lr = 0.1), rounds = 10, budget = 5), "below one full trial",
               class = "fedagg_error_input")
  expect_error(fed_tune("make", list(lr = 0.1), rounds = 3), "must be a function", class = "fedagg_error_input")
  expect_error(fed_tune(function(lr) stop("no"), list(lr = 0.1), rounds = 3), class = "fedagg_error_user_code")
  expect_error(fed_tune(function(lr) 42, list(lr = 0.1), rounds = 3), "must return a <Server>",
               class = "fedagg_error_input")
  expect_error(fed_tune(make, list(lr = 0.1, epochs = 1), rounds = 3, metric = "nope"), "history's columns",
               class = "fedagg_error_input")
  expect_error(fed_tune(make, list(lr = 0.1, epochs = 1), rounds = 3, from = 1), "fed_diagnosis",
               class = "fedagg_error_input")
})

test_that("a server's results do not depend on the session's kind of random numbers", {
  # future.apply's streams are L'Ecuyer-CMRG; a seeded server must give the
  # same run under them as under R's default kind, and leave the kind as
  # it found it.
  make <- make_tune_server(tune_nodes())
  run <- function() {
    srv <- make(0.01, 1, seed = 2L)
    srv$fit(3)
    srv$params
  }
  default <- withr::with_seed(5, run())
  withr::local_seed(5, .rng_kind = "L'Ecuyer-CMRG")
  expect_identical(run(), default)
  expect_identical(RNGkind()[1], "L'Ecuyer-CMRG")
})
