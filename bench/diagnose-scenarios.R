# The scenarios of bench/diagnose.R: seeded federations with one injected
# cause of slow convergence each, and healthy ones. Sourced by the bench
# (and usable alone: `source("bench/diagnose-scenarios.R"); s <-
# diag_scenarios(); srv <- diag_run(s[[1]])`).
#
# Data: a Gaussian mixture of 10 classes in 50 dimensions (class means drawn
# once with sd 0.35, unit noise: heavily overlapping classes), dealt out IID or with Dirichlet label skew. Every
# scenario but one starts from the same "base" recipe and changes one lever.

diag_mixture <- function(n = 6000, p = 50, classes = 10, separation = 0.35, seed = 1) {
  withr::with_seed(seed, {
    means <- matrix(rnorm(classes * p, sd = separation), classes)
    y <- sample.int(classes, n, replace = TRUE)
    x <- means[y, ] + matrix(rnorm(n * p), n)
  })
  list(x = x, y = factor(y, levels = seq_len(classes)))
}

diag_nodes <- function(data, n_clients = 20, alpha = NULL, seed = 1) {
  parts <- if (is.null(alpha)) partition_iid(length(data$y), n_clients, seed = seed)
  else partition_dirichlet(data$y, n_clients = n_clients, alpha = alpha, min_size = 20, seed = seed)
  nodes <- fed_nodes(data$x, data$y, parts, validation = 0.2, seed = seed)
  attr(nodes, "parts") <- parts
  nodes
}

# One scenario: a name, the cause the diagnosis should rank first (NA for a
# healthy run), and how to build and run it.
diag_scenario <- function(name, cause, rounds = 30, n_clients = 20, alpha = NULL, ..., prepare = NULL, between = NULL) {
  list(name = name, cause = cause, rounds = rounds, n_clients = n_clients, alpha = alpha,
       levers = list(...), prepare = prepare, between = between)
}

diag_scenarios <- function() {
  slow_devices <- function(nodes) {
    set_system(nodes, system_profile(speed = lognormal(2000, spread = 30), dropout = 0, seed = 1))
  }
  shift <- function(srv, data, parts) {
    # Concept drift: half the nodes see their features shifted mid-run.
    for (i in seq(1, length(srv$nodes), by = 2)) {
      rows <- parts[[i]]
      srv$nodes[[i]]$set_data(data$x[rows, ] + 1, data$y[rows])
    }
  }
  list(
    diag_scenario("healthy: IID, FedAvg", NA),
    diag_scenario("healthy: Dirichlet(1), 2 epochs", NA, alpha = 1, epochs = 2),
    diag_scenario("healthy: IID, server momentum, lr decay, drift monitor", NA,
                  server_optimizer = server_sgd(lr = 1, momentum = 0.5), lr_schedule = lr_step(0.9, every = 3),
                  monitor = monitor_drift(window = 3)),
    diag_scenario("healthy: Dirichlet(10), half the clients, top-k 10 %", NA, alpha = 10, fraction = 0.5,
                  compress = compress_topk(0.1)),
    # The levers whose checks the four above cannot see, used well.
    # 24 training samples per client: 5 epochs, so the run converges in 30 rounds.
    diag_scenario("healthy: IID, 200 clients, DP z = 0.5", NA, n_clients = 200, fraction = 0.5, epochs = 5,
                  privacy = dp_central(noise_multiplier = 0.5, clip = 1)),
    # A FedBuff round folds 5 updates: 60 of them to converge.
    diag_scenario("healthy: FedBuff, concurrency 10", NA, n_clients = 60, rounds = 60,
                  asynchronous = fedbuff(buffer_size = 5, concurrency = 10), prepare = slow_devices),
    diag_scenario("healthy: IID, norm filter", NA, filter = filter_norm(mad = 3)),
    diag_scenario("E = 50 on Dirichlet(0.1)", "client_drift", alpha = 0.1, epochs = 50),
    diag_scenario("lr x 20", "lr_too_high", lr = 0.1 * 20),
    diag_scenario("lr / 50", "lr_too_low", lr = 0.1 / 50),
    diag_scenario("1 client per round of 100", "too_few_clients", n_clients = 100, alpha = 0.5, fraction = 0.01),
    diag_scenario("noise multiplier 20", "dp_noise", privacy = dp_central(noise_multiplier = 20, clip = 1)),
    diag_scenario("clip 0.001", "clipping_bias", clip = clip_norm(0.001)),
    diag_scenario("90 % stragglers dropped", "stragglers", stragglers = 0.9, drop_stragglers = TRUE, epochs = 2),
    diag_scenario("slow devices, tight deadline", "stragglers", prepare = slow_devices, deadline = 0.25, over_select = 1),
    diag_scenario("top-k 0.1 %", "compression", compress = compress_topk(0.001)),
    diag_scenario("FedBuff, concurrency 50", "staleness", n_clients = 60,
                  asynchronous = fedbuff(buffer_size = 3, concurrency = 50), prepare = slow_devices),
    diag_scenario("Krum on Dirichlet(0.1)", "robust_discards", alpha = 0.1, aggregator = agg_krum()),
    diag_scenario("features shifted at round 15", "concept_drift", monitor = monitor_drift(window = 3), between = shift)
  )
}

diag_base <- list(fraction = 0.3, epochs = 1, batch_size = 10, lr = 0.1)

diag_run <- function(scenario, data = diag_mixture(), seed = 1) {
  nodes <- diag_nodes(data, scenario$n_clients, scenario$alpha, seed = seed)
  if (!is.null(scenario$prepare)) scenario$prepare(nodes)
  levers <- utils::modifyList(diag_base, scenario$levers)
  srv <- do.call(fed_server, c(list(model_softmax(ncol(data$x), nlevels(data$y)), nodes, seed = seed), levers))
  if (is.null(scenario$between)) {
    srv$fit(scenario$rounds)
  } else {
    srv$fit(scenario$rounds %/% 2)
    scenario$between(srv, data, attr(nodes, "parts"))
    srv$fit(scenario$rounds - scenario$rounds %/% 2)
  }
  srv
}

# Each cause at three doses, mild to strong (bench/diagnose.R prints the
# severity the diagnosis gives each): where detection starts, and that it
# grows with the dose.
diag_doses <- function() {
  slow_devices <- function(nodes) {
    set_system(nodes, system_profile(speed = lognormal(2000, spread = 30), dropout = 0, seed = 1))
  }
  dose <- function(cause, label, ...) c(diag_scenario(label, cause, ...), list(dose = label))
  list(
    dose("client_drift", "E = 5", alpha = 0.1, epochs = 5),
    dose("client_drift", "E = 20", alpha = 0.1, epochs = 20),
    dose("client_drift", "E = 50", alpha = 0.1, epochs = 50),
    dose("lr_too_high", "lr x 2", lr = 0.2),
    dose("lr_too_high", "lr x 5", lr = 0.5),
    dose("lr_too_high", "lr x 20", lr = 2),
    dose("lr_too_low", "lr / 5", lr = 0.02),
    dose("lr_too_low", "lr / 20", lr = 0.005),
    dose("lr_too_low", "lr / 50", lr = 0.002),
    dose("too_few_clients", "10 of 100", n_clients = 100, alpha = 0.5, fraction = 0.1),
    dose("too_few_clients", "3 of 100", n_clients = 100, alpha = 0.5, fraction = 0.03),
    dose("too_few_clients", "1 of 100", n_clients = 100, alpha = 0.5, fraction = 0.01),
    dose("dp_noise", "z = 1", privacy = dp_central(noise_multiplier = 1, clip = 1)),
    dose("dp_noise", "z = 5", privacy = dp_central(noise_multiplier = 5, clip = 1)),
    dose("dp_noise", "z = 20", privacy = dp_central(noise_multiplier = 20, clip = 1)),
    dose("clipping_bias", "clip 0.3", clip = clip_norm(0.3)),
    dose("clipping_bias", "clip 0.05", clip = clip_norm(0.05)),
    dose("clipping_bias", "clip 0.001", clip = clip_norm(0.001)),
    dose("stragglers", "30 % dropped", stragglers = 0.3, drop_stragglers = TRUE, epochs = 2),
    dose("stragglers", "60 % dropped", stragglers = 0.6, drop_stragglers = TRUE, epochs = 2),
    dose("stragglers", "90 % dropped", stragglers = 0.9, drop_stragglers = TRUE, epochs = 2),
    dose("compression", "top-k 10 %", compress = compress_topk(0.1)),
    dose("compression", "top-k 1 %", compress = compress_topk(0.01)),
    dose("compression", "top-k 0.1 %", compress = compress_topk(0.001)),
    dose("staleness", "concurrency 10", n_clients = 60, asynchronous = fedbuff(buffer_size = 3, concurrency = 10), prepare = slow_devices),
    dose("staleness", "concurrency 25", n_clients = 60, asynchronous = fedbuff(buffer_size = 3, concurrency = 25), prepare = slow_devices),
    dose("staleness", "concurrency 50", n_clients = 60, asynchronous = fedbuff(buffer_size = 3, concurrency = 50), prepare = slow_devices)
  )
}
