# Privacy and robustness in the round: central DP, accounting, robust
# aggregators, the norm filter, attacks and the minimum cohort, against
# plain-R references and the standalone kernels.

trust_data <- function(k = 8, seed = 50) {
  d <- toy_classes(24 * k, seed = seed)
  part <- partition_iid(24 * k, k, seed = 2)
  list(d = d, part = part, clients = lapply(part, function(idx) list(x = d$x[idx, , drop = FALSE], y = d$y[idx])))
}

one_round <- function(td, p0, ..., nodes = fed_nodes(td$d$x, td$d$y, td$part)) {
  srv <- fed_server(model_softmax(4, 3), nodes, fraction = 1, epochs = 1, batch_size = 6, lr = 0.2, shuffle = FALSE,
                    params = p0, seed = 3, ...)
  srv$round()
  srv
}

# Each client's update of one round from p0, in plain R.
ref_deltas <- function(td, p0, clients = seq_along(td$clients)) {
  lapply(td$clients[clients], function(cl) {
    unlist(ref_local_run(p0, p0, cl$x, cl$y, "softmax", epochs = 1, batch = 6, lr = 0.2)$params, use.names = FALSE) -
      unlist(p0, use.names = FALSE)
  })
}

clip_ref <- function(v, C) v * min(1, C / sqrt(sum(v^2)))

test_that("DP-FedAvg without noise is the mean of the clipped updates", {
  td <- trust_data()
  p0 <- random_params(model_softmax(4, 3), 1)
  x0 <- unlist(p0, use.names = FALSE)
  deltas <- ref_deltas(td, p0)
  # A huge clip: equal-weight FedAvg.
  huge <- one_round(td, p0, privacy = dp_central(0, clip = 1e6))
  equal <- one_round(td, p0, weights = "equal")
  expect_equal(unlist(huge$params, use.names = FALSE), unlist(equal$params, use.names = FALSE), tolerance = 1e-13)
  # A small clip: the clipped updates' mean.
  C <- stats::median(vapply(deltas, function(v) sqrt(sum(v^2)), numeric(1)))
  clipped <- one_round(td, p0, privacy = dp_central(0, clip = C))
  expect_equal(unlist(clipped$params, use.names = FALSE), x0 + Reduce(`+`, lapply(deltas, clip_ref, C)) / length(deltas),
               tolerance = 1e-12)
  expect_identical(clipped$client_log$clipped, unname(vapply(deltas, function(v) sqrt(sum(v^2)) > C, logical(1))))
})

test_that("DP noise has sd noise_multiplier * clip / expected clients, seeded and thread-invariant", {
  td <- trust_data()
  p0 <- random_params(model_mlp(4, hidden = 40, n_classes = 3), 1)
  make <- function(z, threads = NULL) {
    srv <- fed_server(model_mlp(4, hidden = 40, n_classes = 3), fed_nodes(td$d$x, td$d$y, td$part), fraction = 0.5,
                      lr = 0.2, params = p0, seed = 3, threads = threads, privacy = dp_central(z, clip = 0.5))
    srv$round()
    unlist(srv$params, use.names = FALSE)
  }
  noise <- make(2) - make(0)
  expect_equal(stats::sd(noise), 2 * 0.5 / 4, tolerance = 0.1)
  expect_identical(make(2, threads = 1), make(2, threads = 2))
})

test_that("the history's epsilon is the RDP accountant's, and max_epsilon stops fit() in time", {
  td <- trust_data()
  make <- function(...) fed_server(model_softmax(4, 3), fed_nodes(td$d$x, td$d$y, td$part), fraction = 0.25,
                                   lr = 0.1, seed = 2, ...)
  srv <- make(privacy = dp_central(1.2, clip = 1, delta = 1e-5))
  h <- srv$fit(4, verbose = FALSE)
  expect_equal(h$epsilon, vapply(1:4, function(r) as.double(rdp_epsilon(0.25, 1.2, r, 1e-5)), numeric(1)))
  expect_equal(privacy_spent(srv)$epsilon, h$epsilon[4])
  budget <- as.double(rdp_epsilon(0.25, 1.2, 6, 1e-5)) + 1e-9
  capped <- make(privacy = dp_central(1.2, clip = 1, max_epsilon = budget))
  expect_warning(h <- capped$fit(20, verbose = FALSE), class = "fedagg_warning_budget_exhausted")
  expect_identical(nrow(h), 6L)
  expect_lte(max(h$epsilon), budget)
  expect_match(capped$stopped$reason, "max_epsilon")
  expect_warning(make(privacy = dp_central(1, clip = 1), weights = "samples"), class = "fedagg_warning_dp_weights")
})

test_that("every aggregator in the loop equals the standalone kernel on the same updates", {
  td <- trust_data(k = 8)
  p0 <- random_params(model_softmax(4, 3), 4)
  x0 <- unlist(p0, use.names = FALSE)
  deltas <- ref_deltas(td, p0)
  n <- vapply(td$clients, function(cl) length(cl$y), numeric(1))
  cases <- list(
    list(agg_median(), function() robust_aggregate(deltas, "median")),
    list(agg_trimmed_mean(0.2), function() robust_aggregate(deltas, "trimmed_mean", trim = 0.2)),
    list(agg_krum(f = 2), function() robust_aggregate(deltas, "krum", f = 2)),
    list(agg_multi_krum(f = 2, m = 4), function() robust_aggregate(deltas, "multi_krum", f = 2, m = 4, weights = n)),
    list(agg_geometric_median(), function() robust_aggregate(deltas, "geometric_median", weights = n))
  )
  for (case in cases) {
    srv <- one_round(td, p0, aggregator = case[[1]])
    expect_equal(unlist(srv$params, use.names = FALSE), x0 + as.vector(case[[2]]()), tolerance = 1e-10,
                 label = case[[1]]$label)
  }
  # Bulyan from its definition: theta = K - 2f picks by repeated Krum, then per
  # coordinate the mean of the beta = theta - 2f values closest to the median.
  f <- 1
  left <- seq_along(deltas)
  picked <- integer()
  while (length(picked) < length(deltas) - 2 * f) {
    k <- left[attr(robust_aggregate(deltas[left], "krum", f = min(f, (length(left) - 3) %/% 2)), "selected")]
    picked <- c(picked, k)
    left <- setdiff(left, k)
  }
  m <- sapply(deltas[picked], identity)
  beta <- length(picked) - 2 * f
  bulyan <- apply(m, 1, function(v) mean(v[order(abs(v - stats::median(v)))][seq_len(beta)]))
  srv <- one_round(td, p0, aggregator = agg_bulyan(f = 1))
  expect_equal(unlist(srv$params, use.names = FALSE), x0 + bulyan, tolerance = 1e-10)
})

test_that("attacks change what a malicious client sends, and the filter drops it", {
  td <- trust_data()
  p0 <- random_params(model_softmax(4, 3), 5)
  x0 <- unlist(p0, use.names = FALSE)
  deltas <- ref_deltas(td, p0)
  n <- vapply(td$clients, function(cl) length(cl$y), numeric(1))
  nodes <- fed_nodes(td$d$x, td$d$y, td$part)
  set_attack(nodes, "client3", attack_sign_flip(2))
  flipped <- one_round(td, p0, nodes = nodes)
  sent <- deltas
  sent[[3]] <- -2 * sent[[3]]
  expect_equal(unlist(flipped$params, use.names = FALSE), x0 + Reduce(`+`, Map(`*`, sent, n / sum(n))), tolerance = 1e-12)
  expect_identical(flipped$client_log$malicious, names(nodes) == "client3")
  set_attack(nodes, "client3", attack_scale(100))
  filtered <- one_round(td, p0, nodes = nodes, filter = filter_norm(mad = 3, per_layer = FALSE))
  log <- filtered$client_log
  expect_identical(log$passed_filter, names(nodes) != "client3")
  expect_match(log$filter_reason[3], "MAD")
  keep <- setdiff(seq_along(deltas), 3)
  expect_equal(unlist(filtered$params, use.names = FALSE),
               x0 + Reduce(`+`, Map(`*`, deltas[keep], n[keep] / sum(n[keep]))), tolerance = 1e-12)
  # Label flipping trains honestly on poisoned labels.
  set_attack(nodes, "client3", attack_label_flip(c("0" = "1", "1" = "0")))
  poisoned <- one_round(td, p0, nodes = nodes)
  y3 <- td$clients[[3]]$y
  y3 <- ifelse(y3 == 0, 1, ifelse(y3 == 1, 0, y3))
  sent <- deltas
  sent[[3]] <- unlist(ref_local_run(p0, p0, td$clients[[3]]$x, y3, "softmax", epochs = 1, batch = 6, lr = 0.2)$params,
                      use.names = FALSE) - x0
  expect_equal(unlist(poisoned$params, use.names = FALSE), x0 + Reduce(`+`, Map(`*`, sent, n / sum(n))), tolerance = 1e-12)
})

test_that("a round needs min_clients updates after the filter; small nodes never take part", {
  td <- trust_data()
  nodes <- fed_nodes(td$d$x, td$d$y, td$part)
  set_attack(nodes, c("client1", "client2", "client3"), attack_scale(1000))
  srv <- fed_server(model_softmax(4, 3), nodes, fraction = 1, min_clients = 6, lr = 0.1, seed = 1,
                    filter = filter_norm(max_norm = 50, mad = NULL, per_layer = FALSE))
  before <- srv$params
  expect_error(srv$round(), class = "fedagg_error_filter")
  expect_identical(srv$params, before)
  expect_identical(srv$rounds_done, 0L)
  x <- matrix(rnorm(200), 100)
  small <- fed_nodes(x, as.integer(x[, 1] > 0), list(1:5, 6:40, 41:100))
  srv <- fed_server(model_logistic(2), small, fraction = 1, min_samples = 10, lr = 0.1, seed = 1)
  srv$fit(3, verbose = FALSE)
  expect_false("client1" %in% srv$client_log$client)
})

test_that("the trust settings print, and bad ones are classed errors naming the argument", {
  td <- trust_data()
  nodes <- fed_nodes(td$d$x, td$d$y, td$part)
  m <- model_softmax(4, 3)
  expect_snapshot({
    dp_central(1.1, clip = 0.5, max_epsilon = 8)
    clip_norm(2, per_layer = TRUE)
    filter_norm(max_norm = 10)
    agg_bulyan(2)
    attack_sign_flip()
    fed_server(m, nodes, privacy = dp_central(1, 1), filter = filter_norm(), seed = 1)
  })
  expect_snapshot(error = TRUE, {
    dp_central(-1, clip = 1)
    dp_central(1, clip = 0)
    dp_central(1, clip = 1, delta = 1)
    filter_norm(max_norm = NULL, mad = NULL)
    agg_trimmed_mean(0.5)
    attack_label_flip(c(1, 2))
    set_attack(nodes, "nobody", attack_scale(2))
    set_attack(nodes, "client1", "flip")
    fed_server(m, nodes, privacy = dp_central(1, 1), aggregator = agg_median())
    fed_server(m, nodes, privacy = dp_central(1, 1), clip = clip_norm(1))
    fed_server(m, nodes, privacy = "dp")
    fed_server(m, nodes, min_samples = -1)
    privacy_spent(fed_server(m, nodes))
  })
})

test_that("adaptive clipping converges to the requested quantile of the update norms, from below and above", {
  # 40 nodes whose updates have fixed, known norms: the median norm is 1.
  norms <- exp(stats::qnorm((seq_len(40) - 0.5) / 40))
  x <- matrix(rnorm(80), 40)
  nodes <- fed_nodes(x, as.integer(x[, 1] > 0), as.list(seq_len(40)), ids = sprintf("n%02d", 1:40))
  known_norm <- fed_algorithm("known norms", function(node, params, config, state) {
    r <- norms[as.integer(sub("n", "", node$id))]
    d <- length(unlist(params))
    list(delta = rep(r / sqrt(d), d), n_samples = 1, train_loss = 0, state = NULL)
  })
  # From far above, the bound shrinks at most by exp(-lr * (1 - quantile)) a
  # round: lr = 0.5 gets from 50 to the 0.8 quantile well within 80 rounds.
  run <- function(initial, quantile, lr = 0.5) {
    srv <- fed_server(model_logistic(2), nodes, algorithm = known_norm, fraction = 1, seed = 1,
                      privacy = dp_central(0, clip = clip_adaptive(initial, quantile = quantile, lr = lr, count_noise = 0)))
    srv$fit(80, verbose = FALSE)$clip
  }
  for (quantile in c(0.5, 0.8)) {
    target <- exp(stats::qnorm(quantile))
    for (initial in c(0.01, 50)) {
      clip <- run(initial, quantile)
      expect_equal(mean(utils::tail(clip, 20)), target, tolerance = 0.1, label = sprintf("from %s to q %s", initial, quantile))
    }
  }
  # The geometric step, by hand: C <- C * exp(-lr * (unclipped share - quantile)).
  clip <- run(0.5, 0.5, lr = 0.2)
  share <- mean(norms <= 0.5)
  expect_equal(clip[2], 0.5 * exp(-0.2 * (share - 0.5)))
  expect_snapshot(error = TRUE, fed_server(model_logistic(2), nodes, fraction = 1,
                                           privacy = dp_central(1, clip = clip_adaptive(count_noise = 0.1))))
})

test_that("drift monitoring matches stats::ks.test and flags a covariate shift", {
  data <- synthetic_fedprox(0.5, 0.5, n_clients = 9, dim = 5, n_classes = 3, max_size = 80, seed = 8)
  nodes <- fed_nodes(data)
  shifted <- names(nodes)[1:3]
  shift <- function(server, round, record) {
    if (round == 6) for (id in shifted) server$nodes[[id]]$set_data(data$clients[[id]]$x + 3, data$clients[[id]]$y)
  }
  srv <- fed_server(model_softmax(5, 3), nodes, fraction = 1, lr = 0.1, seed = 1,
                    monitor = monitor_drift(window = 3, alpha = 0.01), hooks = list(round_end = shift))
  h <- srv$fit(12, verbose = FALSE)
  log <- srv$drift_log
  features <- log[grepl("^feature", log$signal), ]
  # The shifted nodes' features are flagged once, in the round after the change.
  expect_setequal(unique(features$client), shifted)
  expect_true(all(features$round == 7))
  expect_identical(h$drift_alerts, as.numeric(tabulate(log$round, 12)))
  # Every window test is stats::ks.test on the client log's values.
  cl <- srv$client_log
  for (r in 6:12) {
    for (signal in c("update_norm", "train_loss")) {
      before <- cl[[signal]][cl$round %in% (r - 5):(r - 3)]
      now <- cl[[signal]][cl$round %in% (r - 2):r]
      p <- suppressWarnings(stats::ks.test(before, now)$p.value)
      alerted <- any(log$round == r & log$signal == signal)
      expect_identical(alerted, p < 0.01, label = sprintf("%s in round %d", signal, r))
    }
  }
  expect_error(nodes[[1]]$set_data(matrix(1, 2, 2), 0:1), class = "fedagg_error_client")
})

test_that("local DP: each client sends its clipped update plus calibrated noise", {
  x <- matrix(rnorm(80), 40)
  nodes <- fed_nodes(x, as.integer(x[, 1] > 0), partition_iid(40, 8, seed = 1))
  silent <- fed_algorithm("zero updates", function(node, params, config, state) {
    list(delta = rep(0, length(unlist(params))), n_samples = 1, train_loss = 0, state = NULL)
  })
  m <- model_mlp(2, hidden = 200, n_classes = 2)
  dp <- dp_local(epsilon = 2, delta = 1e-5, clip = 0.5)
  expect_equal(dp$sd, gaussian_noise_sd(2 * 0.5, 2, 1e-5))
  srv <- fed_server(m, nodes, algorithm = silent, fraction = 0.5, weights = "equal", seed = 1, privacy = dp)
  before <- unlist(srv$params, use.names = FALSE)
  srv$round()
  noise <- unlist(srv$params, use.names = FALSE) - before
  # The mean of 4 independent N(0, sd^2) vectors: sd / 2 per coordinate.
  expect_equal(stats::sd(noise), dp$sd / 2, tolerance = 0.05)
  h <- srv$fit(5, verbose = FALSE)
  expect_equal(h$epsilon, vapply(seq_len(nrow(h)), function(r) {
    max(table(srv$client_log$client[srv$client_log$round <= r])) * 2
  }, numeric(1)))
  expect_identical(privacy_spent(srv)$participations, as.integer(max(table(srv$client_log$client))))
  # Local DP works with any aggregator.
  expect_no_error(fed_server(m, nodes, privacy = dp, aggregator = agg_median(), seed = 1)$round())
})

test_that("accounting samples from the eligible nodes only, and epsilon can be plotted", {
  x <- matrix(rnorm(400), 200)
  # 10 nodes of 20 rows, 2 of 4 rows: min_samples = 10 leaves 10 eligible.
  parts <- c(split(1:200 , rep(1:10, each = 20)), list(201:204, 205:208))
  x <- rbind(x, matrix(rnorm(16), 8))
  nodes <- fed_nodes(x, as.integer(x[, 1] > 0), unname(parts))
  srv <- fed_server(model_logistic(2), nodes, fraction = 5 / 12, min_samples = 10, lr = 0.1, seed = 1,
                    privacy = dp_central(1, clip = 1))
  h <- srv$fit(3, verbose = FALSE)
  # 5 clients per round among 10 eligible nodes: q = 0.5, not 5 / 12.
  expect_equal(srv$settings$sampling_rate, 0.5)
  expect_equal(h$epsilon, vapply(1:3, function(r) as.double(rdp_epsilon(0.5, 1, r, 1e-5)), numeric(1)))
  grDevices::pdf(NULL)
  on.exit(grDevices::dev.off())
  expect_no_error(plot(h, metric = "epsilon"))
  expect_no_error(plot(h, metric = c("lr", "clients")))
})

test_that("the drift monitor's window tests wait for their start round", {
  data <- synthetic_fedprox(0.5, 0.5, n_clients = 6, dim = 5, n_classes = 3, max_size = 60, seed = 9)
  srv <- fed_server(model_softmax(5, 3), fed_nodes(data), fraction = 1, lr = 0.5, seed = 1,
                    monitor = monitor_drift(window = 2, alpha = 0.9, start = 8))
  srv$fit(10, verbose = FALSE)
  # alpha = 0.9 alerts on almost any test: none before round 8, some after.
  expect_true(all(srv$drift_log$round >= 8))
  expect_gt(nrow(srv$drift_log), 0)
  expect_error(monitor_drift(window = 5, start = 6), class = "fedagg_error_input")
})

# Balle et al. (2020)'s conversion from RDP to (epsilon, delta), with
# dp_accounting's guards (orders up to 1.01 skipped, never below 0), in
# plain R: the reference for composed rounds.
ref_rdp_to_epsilon <- function(orders, rdp, delta) {
  keep <- orders > 1.01
  a <- orders[keep]
  r <- rdp[keep]
  eps <- r + log1p(-1 / a) - (log(delta) + log(a)) / (a - 1)
  eps[delta^2 + expm1(-r) > 0] <- 0
  max(0, min(eps, na.rm = TRUE))
}

test_that("accounting composes every round with its own sampling rate, so epsilon never goes down", {
  # The conversion used for mixed rates agrees with rdp_epsilon() for one rate.
  for (case in list(c(0.1, 1.1, 50), c(0.5, 0.8, 7), c(1, 3, 20))) {
    rdp <- rdp_sampled_gaussian(case[1], case[2], steps = case[3])
    expect_equal(ref_rdp_to_epsilon(rdp$order, rdp$rdp, 1e-5), as.double(rdp_epsilon(case[1], case[2], case[3], 1e-5)),
                 tolerance = 1e-12)
  }
  td <- trust_data(k = 10)
  srv <- fed_server(model_softmax(4, 3), fed_nodes(td$d$x, td$d$y, td$part), fraction = 1, lr = 0.1, seed = 1,
                    privacy = dp_central(1, clip = 1))
  srv$fit(3, verbose = FALSE)
  srv$fraction <- 0.2
  h <- srv$fit(3, verbose = FALSE)
  expect_true(all(diff(h$epsilon) > 0))
  rdp <- rdp_sampled_gaussian(1, 1, steps = 3)$rdp + rdp_sampled_gaussian(0.2, 1, steps = 3)$rdp
  expect_equal(h$epsilon[6], ref_rdp_to_epsilon(rdp_sampled_gaussian(1, 1)$order, rdp, 1e-5))
  expect_equal(privacy_spent(srv)$epsilon, h$epsilon[6])
})

test_that("levers whose privacy or statistics do not hold together are refused", {
  td <- trust_data()
  nodes <- fed_nodes(td$d$x, td$d$y, td$part)
  m <- model_softmax(4, 3)
  dp <- dp_central(1, clip = 1)
  expect_snapshot(error = TRUE, {
    fed_server(m, nodes, privacy = dp, schedule = list(1:3))
    fed_server(m, nodes, privacy = dp, selection = select_by_size())
    fed_server(m, nodes, privacy = dp, algorithm = scaffold())
    fed_server(m, nodes, privacy = dp_local(1, clip = 1), algorithm = scaffold())
    fed_server(m, nodes, filter = filter_norm(), algorithm = scaffold())
    fed_server(m, nodes, privacy = dp, algorithm = fednova())
    fed_server(m, fed_nodes(td$d$x, td$d$y, td$part, availability = 0.5), privacy = dp)
  })
  # Fewer clients than min_clients without any filter: a cohort error, atomic.
  srv <- fed_server(m, nodes, selection = select_poisson(0.05), min_clients = 3, lr = 0.1, seed = 2)
  err <- tryCatch({ for (i in 1:30) srv$round(); NULL }, error = identity)
  expect_s3_class(err, "fedagg_error_cohort")
  # A schedule's listing order does not change a round.
  a <- fed_server(m, nodes, schedule = list(c("client1", "client3", "client2")), stragglers = 0.5, epochs = 3, seed = 1)
  b <- fed_server(m, nodes, schedule = list(c("client2", "client1", "client3")), stragglers = 0.5, epochs = 3, seed = 1)
  a$round()
  b$round()
  expect_identical(a$params, b$params)
})

test_that("a filter that drops every update fails the round as a filter error", {
  data <- synthetic_fedprox(1, 1, n_clients = 4, seed = 1)
  srv <- fed_server(model_softmax(60, 10), fed_nodes(data), fraction = 1, seed = 1,
                    filter = filter_norm(max_norm = 1e-9, mad = NULL, per_layer = FALSE))
  err <- tryCatch(srv$round(), error = identity)
  expect_s3_class(err, "fedagg_error_filter")
  expect_identical(err$round, 1L)
  expect_identical(srv$rounds_done, 0L)
})
