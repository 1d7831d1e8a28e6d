# fed_diagnose(): a fast subset of bench/diagnose.R's scenarios (smaller
# data, fewer rounds), each check's measurement recomputed here in plain R
# from the run's logs, and the methods and bad input.

diag_data <- function(seed = 1, n = 2400, p = 30, classes = 6) {
  withr::with_seed(seed, {
    means <- matrix(rnorm(classes * p, sd = 0.4), classes)
    y <- sample.int(classes, n, replace = TRUE)
    x <- means[y, ] + matrix(rnorm(n * p), n)
  })
  list(x = x, y = factor(y))
}

diag_server <- function(n_clients = 12, alpha = NULL, rounds = 15, seed = 1, ...) {
  data <- diag_data(seed)
  parts <- if (is.null(alpha)) partition_iid(length(data$y), n_clients, seed = seed)
  else partition_dirichlet(data$y, n_clients = n_clients, alpha = alpha, min_size = 20, seed = seed)
  nodes <- fed_nodes(data$x, data$y, parts, validation = 0.2, seed = seed)
  levers <- utils::modifyList(list(fraction = 0.5, epochs = 1, batch_size = 10, lr = 0.1), list(...))
  srv <- do.call(fed_server, c(list(model_softmax(ncol(data$x), nlevels(data$y)), nodes, seed = seed), levers))
  suppressWarnings(srv$fit(rounds))
  srv
}

first_cause <- function(d) {
  above <- d[d$severity > "info", , drop = FALSE]
  if (nrow(above)) above$cause[1] else "(none)"
}

test_that("healthy runs get nothing above info", {
  for (srv in list(diag_server(), diag_server(alpha = 10, epochs = 2))) {
    d <- fed_diagnose(srv)
    expect_s3_class(d, "fed_diagnosis")
    expect_true(all(d$severity == "info"), info = paste(d$cause, d$severity, collapse = "; "))
    expect_match(format(d)[1], "no cause of slow convergence above")
  }
})

test_that("client drift is found and its measure is the loss gap recomputed from the logs", {
  srv <- diag_server(alpha = 0.1, epochs = 30)
  d <- fed_diagnose(srv)
  expect_identical(first_cause(d), "client_drift")
  # Plain R: per round, the global model's validation loss over the
  # sample-weighted mean of the clients' training losses; the median.
  h <- as.data.frame(srv$history)
  cl <- srv$client_log
  local <- sapply(split(cl, cl$round), function(r) weighted.mean(r$train_loss, r$n_samples))
  ratio <- h$val_loss / local[as.character(h$round)]
  expect_equal(d$measure[d$cause == "client_drift"], signif(median(ratio), 4))
  expect_gt(median(ratio), 2)
  expect_match(d$levers[1], "fedprox(mu = 0.1)", fixed = TRUE)
  expect_match(d$levers[1], "epochs = 6", fixed = TRUE)
})

test_that("a learning rate 20 times too high is found; its measure is the rise from the best loss", {
  srv <- diag_server(lr = 2, rounds = 20)
  d <- fed_diagnose(srv)
  expect_identical(first_cause(d), "lr_too_high")
  # Plain R: the rise of the running median of 3 from its lowest point to
  # its end; the ends by Tukey's end-point rule (the median of the end
  # value, its smoothed neighbour and the line through the next two).
  v <- srv$history$val_loss
  n <- length(v)
  inner <- sapply(2:(n - 1), function(i) median(v[(i - 1):(i + 1)]))
  s <- c(median(c(v[1], inner[1], 3 * inner[1] - 2 * inner[2])), inner,
         median(c(v[n], inner[n - 2], 3 * inner[n - 2] - 2 * inner[n - 3])))
  expect_equal(d$measure[d$cause == "lr_too_high"], signif((s[n] - min(s)) / min(s), 4))
  expect_match(d$levers[1], "lr = 0.4", fixed = TRUE)
})

test_that("a learning rate 50 times too low is found; its measure is the late pace over the early pace", {
  srv <- diag_server(lr = 0.002, rounds = 18)
  d <- fed_diagnose(srv)
  expect_identical(first_cause(d), "lr_too_low")
  # Plain R: the drop between the means of the middle and last thirds over
  # the drop between the first and middle thirds.
  thirds <- tapply(srv$history$val_loss, rep(1:3, each = 6), mean)
  expect_equal(d$measure[d$cause == "lr_too_low"], signif((thirds[[2]] - thirds[[3]]) / (thirds[[1]] - thirds[[2]]), 4))
})

test_that("DP noise is measured as the closed form z * C * sqrt(d) / K over the clipped signal", {
  srv <- diag_server(privacy = dp_central(noise_multiplier = 20, clip = 1))
  d <- fed_diagnose(srv)
  expect_identical(first_cause(d), "dp_noise")
  k <- srv$clients_per_round
  dim <- length(unlist(srv$params))
  signal <- min(1, median(srv$history$client_norm_mean))
  expect_equal(d$measure[d$cause == "dp_noise"], signif(20 * 1 * sqrt(dim) / k / signal, 4))
  # The loss the noise makes rise is not blamed on the learning rate.
  expect_false(any(d$cause == "lr_too_high" & d$severity > "info"))
})

test_that("dropped stragglers, Krum on label skew and heavy top-k are each named first", {
  srv <- diag_server(stragglers = 0.9, drop_stragglers = TRUE, epochs = 2)
  d <- fed_diagnose(srv)
  expect_identical(first_cause(d), "stragglers")
  expect_equal(d$measure[d$cause == "stragglers"], signif(mean(1 - srv$history$clients / srv$clients_per_round), 4))

  srv <- diag_server(alpha = 0.1, aggregator = agg_krum())
  d <- fed_diagnose(srv)
  expect_identical(first_cause(d), "robust_discards")
  cl <- srv$client_log
  expect_equal(d$measure[d$cause == "robust_discards"], signif(mean(!cl$krum_kept[!cl$malicious]), 4))

  srv <- diag_server(compress = compress_topk(0.001))
  expect_identical(first_cause(fed_diagnose(srv)), "compression")
})

test_that("too few clients per round and clipping far below the updates are named first", {
  expect_identical(first_cause(fed_diagnose(diag_server(n_clients = 40, alpha = 0.5, fraction = 0.025))), "too_few_clients")
  srv <- diag_server(clip = clip_norm(0.001))
  d <- fed_diagnose(srv)
  expect_identical(first_cause(d), "clipping_bias")
  expect_equal(d$measure[d$cause == "clipping_bias"], signif(median(srv$client_log$update_norm / 0.001), 4))
})

test_that("a history with its logs gives the server's diagnosis", {
  srv <- diag_server(alpha = 0.1, epochs = 30, rounds = 8)
  from_server <- fed_diagnose(srv)
  from_history <- fed_diagnose(srv$history, client_log = srv$client_log, system_log = srv$system_log,
                               selection_log = srv$selection_log, drift_log = srv$drift_log)
  expect_identical(from_history, from_server)
  # Without the client log the drift check has nothing to compare with.
  expect_false("client_drift" %in% fed_diagnose(srv$history)$cause)
})

test_that("print, format, summary and plot work and say what they found", {
  srv <- diag_server(alpha = 0.1, epochs = 30, rounds = 8)
  d <- fed_diagnose(srv)
  expect_output(print(d), "Client drift")
  expect_output(print(d), "Try: ", fixed = TRUE)
  s <- summary(d)
  expect_s3_class(s, "summary.fed_diagnosis")
  expect_output(print(s), "Most likely: Client drift")
  f <- withr::local_tempfile(fileext = ".pdf")
  grDevices::pdf(f)
  expect_identical(plot(d), d)
  grDevices::dev.off()
  expect_true(file.size(f) > 0)
})

test_that("scores follow the documented scale", {
  t <- 0.25
  expect_equal(fedagg:::diagnosis_score(0.1, t), 0.4)
  expect_equal(fedagg:::diagnosis_score(t, t), 1)
  expect_equal(fedagg:::diagnosis_score(4 * t, t), 3)
  expect_true(is.na(fedagg:::diagnosis_score(NA_real_, t)))
})

test_that("bad input gets classed errors naming the argument", {
  expect_error(fed_diagnose(1:3), class = "fedagg_error_input")
  expect_error(fed_diagnose(list()), "must be a <Server> or a <fed_history>")
  srv <- diag_server(rounds = 2)
  expect_error(fed_diagnose(srv), "at least 3 rounds", class = "fedagg_error_input")
  srv <- diag_server(rounds = 4)
  expect_error(fed_diagnose(srv$history, client_log = "x"), "client_log", class = "fedagg_error_input")
  expect_error(fed_diagnose(srv$history, system_log = data.frame(a = 1)), "system_log", class = "fedagg_error_input")
  h <- srv$history
  attr(h, "settings") <- NULL
  expect_error(fed_diagnose(h), "no settings", class = "fedagg_error_input")
})
