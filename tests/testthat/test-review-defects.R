# Regression tests for the defects a review of the round found (issue "One
# round, two halves"). Each failed on the code before its fix.

flat_params <- function(srv) unlist(srv$params, use.names = FALSE)

timed_data <- function(n_clients = 7, seed = 6) synthetic_fedprox(0.5, 0.5, n_clients = n_clients, seed = seed)

timed_nodes <- function(n_clients = 7, seed = 6) {
  d <- timed_data(n_clients, seed)
  nodes <- fed_nodes(d)
  set_system(nodes, system_profile(speed = lognormal(400, 20), download = lognormal(1e5, 5), seed = 2))
  nodes
}

hier_setup <- function() {
  set.seed(7)
  x <- matrix(rnorm(80 * 3), 80)
  y <- as.integer(x[, 1] - x[, 2] > 0)
  parts <- list(a = 1:10, b = 11:25, c = 26:45, d = 46:60, e = 61:80)
  list(nodes = fed_nodes(x, y, parts), groups = list(left = c("a", "b"), right = c("c", "d", "e")))
}

test_that("a shallow clone continues exactly, and never corrupts the original's SCAFFOLD controls", {
  data <- synthetic_fedprox(1, 1, n_clients = 8, max_size = 80, seed = 3)
  make <- function() {
    fed_server(model_softmax(60, 10), fed_nodes(data), algorithm = scaffold(), fraction = 0.5, lr = 0.05,
               seed = 1)
  }
  reference <- make()
  reference$fit(4, verbose = FALSE)

  a <- make()
  a$fit(2, verbose = FALSE)
  b <- a$clone()
  b$fit(2, verbose = FALSE)
  expect_identical(flat_params(b), flat_params(reference))
  a$fit(2, verbose = FALSE)   # the original, after its copy trained the shared nodes
  expect_identical(flat_params(a), flat_params(reference))
  expect_identical(a$client_log, reference$client_log)

  # A copy whose original has moved the shared state on cannot continue
  # exactly: it says so instead of training from the wrong controls.
  late <- make()
  late$fit(2, verbose = FALSE)
  copy <- late$clone()
  late$fit(1, verbose = FALSE)
  expect_error(copy$fit(1, verbose = FALSE), class = "fedagg_error_clone")
  expect_identical(copy$rounds_done, 2L)

  # A deep clone has nodes of its own: both orders work.
  deep_a <- make()
  deep_a$fit(2, verbose = FALSE)
  deep_b <- deep_a$clone(deep = TRUE)
  deep_a$fit(2, verbose = FALSE)
  deep_b$fit(2, verbose = FALSE)
  expect_identical(flat_params(deep_a), flat_params(reference))
  expect_identical(flat_params(deep_b), flat_params(reference))
})

test_that("a server restored from saveRDS is not taken for a clone", {
  data <- synthetic_fedprox(1, 1, n_clients = 6, max_size = 60, seed = 3)
  srv <- fed_server(model_softmax(60, 10), fed_nodes(data), algorithm = scaffold(), fraction = 0.5, lr = 0.05, seed = 1)
  srv$fit(1, verbose = FALSE)
  f <- withr::local_tempfile(fileext = ".rds")
  saveRDS(srv, f)
  restored <- readRDS(f)
  key <- restored$.__enclos_env__$private$.key
  restored$fit(1, verbose = FALSE)
  expect_identical(restored$.__enclos_env__$private$.key, key)
})

# A custom server optimizer that is plain SGD with lr 1 (x + D) must give
# the built-in server_sgd()'s parameters, and be called once per round.
counting_sgd <- function(env) {
  server_optimizer("counting SGD", step = function(params, delta, state, round) {
    env$calls <- env$calls + 1L
    list(params = params + delta, state = state)
  })
}

test_that("FedBuff and hierarchical rounds step through a custom server optimizer", {
  env <- new.env()
  env$calls <- 0L
  nodes <- timed_nodes()
  builtin <- fed_server(model_softmax(60, 10), nodes, lr = 0.05, seed = 4, asynchronous = fedbuff(2, 4))
  custom <- fed_server(model_softmax(60, 10), nodes, lr = 0.05, seed = 4, asynchronous = fedbuff(2, 4),
                       server_optimizer = counting_sgd(env))
  builtin$fit(3, verbose = FALSE)
  custom$fit(3, verbose = FALSE)
  expect_identical(env$calls, 3L)
  expect_equal(flat_params(custom), flat_params(builtin), tolerance = 1e-14)

  env$calls <- 0L
  h <- hier_setup()
  builtin <- fed_server(model_logistic(3), h$nodes, fraction = 1, lr = 0.2, seed = 1,
                        topology = topology_hierarchical(h$groups, edge_rounds = 2))
  custom <- fed_server(model_logistic(3), h$nodes, fraction = 1, lr = 0.2, seed = 1,
                       topology = topology_hierarchical(h$groups, edge_rounds = 2), server_optimizer = counting_sgd(env))
  builtin$fit(2, verbose = FALSE)
  custom$fit(2, verbose = FALSE)
  expect_identical(env$calls, 2L)
  expect_equal(flat_params(custom), flat_params(builtin), tolerance = 1e-14)
})

test_that("FedBuff and hierarchical rounds apply update attacks and log the attackers", {
  # Round 1: every client starts from x0, so a sign flip on every client
  # negates the aggregate exactly (server SGD with lr 1).
  nodes <- timed_nodes()
  clean <- fed_server(model_softmax(60, 10), nodes, lr = 0.05, seed = 4, asynchronous = fedbuff(2, 4))
  x0 <- flat_params(clean)
  clean$round()
  attacked_nodes <- timed_nodes()
  set_attack(attacked_nodes, names(attacked_nodes), attack_sign_flip(scale = 1))
  attacked <- fed_server(model_softmax(60, 10), attacked_nodes, lr = 0.05, seed = 4, asynchronous = fedbuff(2, 4))
  attacked$round()
  expect_equal(flat_params(attacked) - x0, -(flat_params(clean) - x0), tolerance = 1e-12)
  expect_true(all(attacked$client_log$malicious))
  expect_false(any(clean$client_log$malicious))

  h <- hier_setup()
  top <- topology_hierarchical(h$groups, edge_rounds = 1)
  clean <- fed_server(model_logistic(3), h$nodes, fraction = 1, lr = 0.2, seed = 1, topology = top)
  x0 <- flat_params(clean)
  clean$round()
  h2 <- hier_setup()
  set_attack(h2$nodes, c("a", "c"), attack_scale(10))
  attacked <- fed_server(model_logistic(3), h2$nodes, fraction = 1, lr = 0.2, seed = 1, topology = top)
  attacked$round()
  expect_identical(attacked$client_log$malicious, attacked$client_log$client %in% c("a", "c"))
  expect_false(isTRUE(all.equal(flat_params(attacked), flat_params(clean))))
})

test_that("hierarchical attacks match a plain-R reference of scaled client updates", {
  h <- hier_setup()
  top <- topology_hierarchical(h$groups, edge_rounds = 1)
  clean <- fed_server(model_logistic(3), h$nodes, fraction = 1, lr = 0.2, seed = 1, topology = top,
                      diagnostics = FALSE)
  x0 <- flat_params(clean)
  h2 <- hier_setup()
  set_attack(h2$nodes, c("a", "c"), attack_scale(10))
  attacked <- fed_server(model_logistic(3), h2$nodes, fraction = 1, lr = 0.2, seed = 1, topology = top,
                         diagnostics = FALSE)
  attacked$round()
  # With one edge round the cloud's aggregate is a fixed weighted sum of the
  # clients' updates, so it is linear in an attacker's scale factor:
  # D(factor) = D(1) + (factor - 1) * (the attackers' weighted updates),
  # whatever the weights. A run at factor 2 gives that contribution.
  run_with <- function(who, factor) {
    hh <- hier_setup()
    if (length(who)) set_attack(hh$nodes, who, attack_scale(factor))
    s <- fed_server(model_logistic(3), hh$nodes, fraction = 1, lr = 0.2, seed = 1, topology = top, diagnostics = FALSE)
    s$round()
    flat_params(s) - x0
  }
  base <- run_with(character(), 1)
  # Linear in the factor: D(factor) = base + (factor - 1) * contribution.
  contribution <- (run_with(c("a", "c"), 2) - base)
  expect_equal(flat_params(attacked) - x0, base + 9 * contribution, tolerance = 1e-10)
})

test_that("FedBuff's round_start hook fires before its clients train", {
  # The hook changes the data of the first arriving node: that is seen by
  # the round only if the hook runs before training.
  run <- function(with_hook) {
    nodes <- timed_nodes()
    hooks <- if (with_hook) {
      list(round_start = function(server, round, clients) {
        own <- timed_data()$clients[[clients[1]]]
        if (round == 1) server$nodes[[clients[1]]]$set_data(own$x * 2, own$y)
      })
    } else list()
    srv <- fed_server(model_softmax(60, 10), nodes, lr = 0.05, seed = 4, asynchronous = fedbuff(2, 4), hooks = hooks)
    srv$round()
    flat_params(srv)
  }
  expect_false(identical(run(TRUE), run(FALSE)))
})

test_that("the lr setter refuses to change a running round", {
  data <- synthetic_fedprox(1, 1, n_clients = 6, max_size = 60, seed = 1)
  srv <- fed_server(model_softmax(60, 10), fed_nodes(data), fraction = 0.5, seed = 1, lr = 0.01,
                    hooks = list(round_start = function(server, round, clients) server$lr <- 5))
  expect_error(srv$fit(1, verbose = FALSE), class = "fedagg_error_reentrant")
  expect_identical(srv$lr, 0.01)
  expect_identical(srv$rounds_done, 0L)
})

test_that("a client algorithm unknown to the Rust core is an error, never FedAvg", {
  expect_identical(fedagg:::rust_algorithm(fedprox(0.1)), "fedprox")
  expect_identical(fedagg:::rust_algorithm(fedsgd()), "fedavg")
  expect_error(fedagg:::rust_algorithm(list(kind = "fedfancy")), class = "fedagg_error_input")
})

test_that("robust_aggregate() has Bulyan, equal to a plain-R Bulyan from the paper's definition", {
  set.seed(11)
  updates <- c(replicate(9, rnorm(6, 1, 0.2), simplify = FALSE), list(rep(50, 6), rep(-40, 6)))
  f <- 2
  # Bulyan (El Mhamdi et al. 2018): theta = K - 2f picks by repeated Krum,
  # then per coordinate the mean of the beta = theta - 2f values closest to
  # the median of the picked ones.
  ref_krum_pick <- function(ups, f) {
    k <- length(ups)
    m <- sapply(ups, identity)
    d2 <- as.matrix(stats::dist(t(m)))^2
    scores <- vapply(seq_len(k), function(i) sum(sort(d2[i, -i])[seq_len(k - f - 2)]), numeric(1))
    which.min(scores)
  }
  left <- seq_along(updates)
  picked <- integer()
  while (length(picked) < length(updates) - 2 * f) {
    j <- left[ref_krum_pick(updates[left], min(f, (length(left) - 3) %/% 2))]
    picked <- c(picked, j)
    left <- setdiff(left, j)
  }
  m <- sapply(updates[picked], identity)
  beta <- length(picked) - 2 * f
  ref <- apply(m, 1, function(v) mean(v[order(abs(v - stats::median(v)))][seq_len(beta)]))
  got <- robust_aggregate(updates, "bulyan", f = f)
  expect_equal(as.vector(got), ref, tolerance = 1e-12)
  expect_setequal(attr(got, "selected"), picked)
  expect_false(any(c(10L, 11L) %in% attr(got, "selected")))
  expect_error(robust_aggregate(updates, "bulyan", f = 3), class = "fedagg_error_input")
  expect_error(robust_aggregate(updates[1:2], "bulyan"), class = "fedagg_error_input")
})

test_that("a spent privacy budget ends fit() with a classed warning, and the print-outs say why", {
  data <- synthetic_fedprox(1, 1, n_clients = 10, max_size = 60, seed = 1)
  srv <- fed_server(model_softmax(60, 10), fed_nodes(data), fraction = 0.3, seed = 1,
                    privacy = dp_central(1, clip = 1, max_epsilon = 8))
  expect_warning(h <- srv$fit(50, verbose = FALSE), class = "fedagg_warning_budget_exhausted")
  expect_lt(srv$rounds_done, 50L)
  expect_gt(srv$rounds_done, 0L)
  expect_true(any(grepl("stopped early after round", format(h))))
  expect_true(any(grepl("stopped:", format(srv))))
  # Other early stops stay silent.
  srv2 <- fed_server(model_softmax(60, 10), fed_nodes(data), fraction = 0.3, seed = 1,
                     hooks = list(round_end = function(server, round, record) if (round == 2) stop_training("enough")))
  expect_no_warning(h2 <- srv2$fit(5, verbose = FALSE))
  expect_true(any(grepl("stopped early after round 2: enough", format(h2))))
})

test_that("the divergence message prints the learning rate in a few digits", {
  set.seed(1)
  x <- matrix(rnorm(200), 100)
  y <- x[, 1] * 3 + rnorm(100)
  srv <- fed_server(model_linear(2), fed_nodes(x, y, partition_iid(100, 2, seed = 1)), fraction = 1,
                    lr = 1e200, seed = 1)
  err <- expect_error(srv$round(), class = "fedagg_error_diverged")
  text <- paste(conditionMessage(err), collapse = " ")
  expect_match(text, "1.000e200", fixed = TRUE)
  expect_false(grepl("0000000000", text))
})

test_that("min_samples that leaves too few nodes is an error, at construction and mid-run", {
  data <- synthetic_fedprox(1, 1, n_clients = 6, max_size = 60, seed = 1)
  nodes <- fed_nodes(data)
  expect_error(fed_server(model_softmax(60, 10), nodes, min_samples = 1e6), class = "fedagg_error_cohort")
  expect_error(fed_server(model_softmax(60, 10), nodes, min_samples = 10, min_clients = 7), class = "fedagg_error")
  srv <- fed_server(model_softmax(60, 10), nodes, min_samples = 20, min_clients = 2, seed = 1)
  srv$round()
  # Data changed after construction: every node now holds 5 samples.
  for (id in names(nodes)) {
    own <- data$clients[[id]]
    nodes[[id]]$set_data(own$x[1:5, , drop = FALSE], own$y[1:5])
  }
  expect_error(srv$round(), class = "fedagg_error_cohort")
  expect_identical(srv$rounds_done, 1L)
})

test_that("a schedule that picks nodes min_samples keeps out is a classed error", {
  data <- synthetic_fedprox(1, 1, n_clients = 6, max_size = 60, seed = 1)
  nodes <- fed_nodes(data)
  sizes <- vapply(nodes, function(n) n$n_samples, numeric(1))
  for (picked in list(names(nodes)[1], names(nodes)[1:2])) {
    expect_error(fed_server(model_softmax(60, 10), nodes, min_samples = max(sizes) + 1, min_clients = 1,
                            schedule = list(picked)),
                 class = "fedagg_error")
  }
  # Only one node too small: the schedule's own error.
  cut <- sort(sizes)[1] + 1
  small <- names(sizes)[sizes < cut]
  if (length(small) && length(small) < length(sizes)) {
    expect_error(fed_server(model_softmax(60, 10), nodes, min_samples = cut, schedule = list(small)),
                 class = "fedagg_error_schedule")
  }
})

test_that("a custom local() with a malformed result says what it must return", {
  data <- synthetic_fedprox(1, 1, n_clients = 4, max_size = 40, seed = 1)
  bad_results <- list(
    null = function(node, params, config, state) NULL,
    chr_samples = function(node, params, config, state) list(delta = rep(0, 610), n_samples = "a", train_loss = 1),
    nan_delta = function(node, params, config, state) list(delta = c(NaN, rep(0, 609)), n_samples = 1, train_loss = 1),
    short_delta = function(node, params, config, state) list(delta = rep(0, 3), n_samples = 1, train_loss = 1)
  )
  for (name in names(bad_results)) {
    alg <- fed_algorithm(name, local = bad_results[[name]])
    srv <- fed_server(model_softmax(60, 10), fed_nodes(data), algorithm = alg, fraction = 0.5, seed = 1)
    err <- expect_error(srv$round(), class = "fedagg_error")
    text <- paste(cli::ansi_strip(conditionMessage(err)), collapse = " ")
    expect_match(text, "must return", info = name)
    expect_match(text, "delta", info = name)
  }
})

test_that("constructors called without a required argument give a classed error naming it", {
  expect_error(select_poisson(), class = "fedagg_error_input", regexp = "q")
  expect_error(dp_central(1), class = "fedagg_error_input", regexp = "clip")
  expect_error(compress_topk(), class = "fedagg_error_input", regexp = "fraction")
  expect_error(fed_server(), class = "fedagg_error_input", regexp = "model")
  # Every export: no call with its required arguments left out fails with
  # base R's unclassed "argument is missing".
  ns <- asNamespace("fedagg")
  for (name in getNamespaceExports("fedagg")) {
    fn <- get(name, ns)
    if (!is.function(fn)) next
    msg <- tryCatch({
      suppressWarnings(fn())
      ""
    }, fedagg_error = function(e) "", error = function(e) conditionMessage(e))
    expect_false(grepl("is missing, with no default", msg), info = name)
  }
})

test_that("a copy taking over shared state leaves the nodes' $state to the original, and holds no reference to it", {
  data <- synthetic_fedprox(1, 1, n_clients = 8, max_size = 80, seed = 3)
  a <- fed_server(model_softmax(60, 10), fed_nodes(data), algorithm = scaffold(), fraction = 0.5, lr = 0.05, seed = 1)
  a$fit(2, verbose = FALSE)
  key_a <- a$.__enclos_env__$private$.key
  b <- a$clone()
  b$fit(1, verbose = FALSE)
  key_b <- b$.__enclos_env__$private$.key
  expect_false(identical(key_a, key_b))
  trained_by_b <- b$client_log$client[b$client_log$round == 3L]
  for (id in setdiff(unique(a$client_log$client), trained_by_b)) {
    expect_identical(b$nodes[[id]]$state$server, key_a, info = id)
  }
  deep <- a$clone(deep = TRUE)
  expect_null(deep$.__enclos_env__$private$.home)
})

test_that("client logs kept under the old column names still read", {
  legacy <- list(c(list(round = 1L), fedagg:::client_log_rows(c("a", "b"))))
  names(legacy[[1]])[names(legacy[[1]]) == "passed_filter"] <- "kept"
  names(legacy[[1]])[names(legacy[[1]]) == "krum_kept"] <- "selected"
  legacy[[1]]$kept <- c(TRUE, FALSE)
  frame <- fedagg:::client_log_frame(legacy)
  expect_identical(frame$passed_filter, c(TRUE, FALSE))
  expect_identical(frame$krum_kept, c(NA, NA))
  expect_identical(names(frame), fedagg:::client_log_columns)
})

test_that("a server's committed state is one value, replaced whole by a round and untouched by a failed one", {
  data <- synthetic_fedprox(1, 1, n_clients = 6, max_size = 60, seed = 1)
  fail <- FALSE
  srv <- fed_server(model_softmax(60, 10), fed_nodes(data), algorithm = scaffold(), fraction = 0.5, seed = 1,
                    server_optimizer = server_adam(lr = 0.03),
                    hooks = list(server_update = function(old, proposed, round, lr) if (fail) stop("no") else proposed))
  srv$fit(2, verbose = FALSE)
  private <- srv$.__enclos_env__$private
  before <- private$.state
  expect_setequal(names(before), names(fedagg:::new_server_state()))
  fail <- TRUE
  expect_error(srv$round(), class = "fedagg_error_user_code")
  expect_identical(private$.state, before)
  fail <- FALSE
  srv$round()
  after <- private$.state
  expect_identical(after$round, 3L)
  expect_false(identical(after$flat, before$flat))
  expect_identical(unlist(srv$params, use.names = FALSE), after$flat)
  expect_identical(srv$server_state, c(after$server_state, list(control = after$control)))
})

test_that("the round's settings merge as utils::modifyList(keep.null = TRUE) does", {
  d <- list(control = NULL, client_controls = NULL, n_nodes = 1, diagnostics = TRUE,
            server = list(kind = "sgd", lr = 1, momentum = 0, beta1 = 0, beta2 = 0, tau = 1e-3, m = NULL, v = NULL))
  cases <- list(list(),
                list(control = 1:3, server = list(kind = "adam", lr = 0.1, m = c(1, 2))),
                list(client_controls = list(NULL, 1), attacks = list(NULL, list(kind = "scale")), n_nodes = 5,
                     server = list(kind = "sgd", lr = 1, momentum = 0.9, m = NULL, v = NULL), diagnostics = FALSE,
                     denominator = 3, control = NULL))
  for (given in cases) {
    expect_identical(fedagg:::merge_settings(d, given), utils::modifyList(d, given, keep.null = TRUE))
  }
})
