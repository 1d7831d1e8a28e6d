# The round pipeline against plain-R implementations of the papers' formulas
# (helper-pipeline-reference.R): client algorithms, local and server
# optimizers, diagnostics, selection; and the server's guarantees with them.

pipeline_data <- function(seed = 40) {
  d <- toy_classes(90, seed = seed)
  part <- partition_quantity(90, 4, seed = 3, min_size = 8)
  list(d = d, part = part, clients = lapply(part, function(idx) list(x = d$x[idx, , drop = FALSE], y = d$y[idx])))
}

schedule3 <- list(c(1, 2, 4), c(2, 3), c(1, 3, 4))

run_pipeline <- function(model, p0, pd, rounds = 3, ...) {
  srv <- fed_server(model, fed_nodes(pd$d$x, pd$d$y, pd$part), schedule = schedule3[seq_len(rounds)], shuffle = FALSE,
                    params = p0, seed = 1, ...)
  srv$fit(rounds, verbose = FALSE)
  srv
}

flat_of <- function(p) unlist(p, use.names = FALSE)

cases <- list(
  fedavg = list(server = list(), ref = list()),
  fedavg_momentum_wd = list(server = list(momentum = 0.5, weight_decay = 0.01),
                            ref = list(momentum = 0.5, weight_decay = 0.01)),
  fedprox = list(server = list(algorithm = fedprox(0.3)), ref = list(algorithm = "fedprox", mu = 0.3)),
  scaffold = list(server = list(algorithm = scaffold()), ref = list(algorithm = "scaffold")),
  fednova = list(server = list(algorithm = fednova(), epochs = c(1, 2, 3, 1)),
                 ref = list(algorithm = "fednova", epochs = c(1, 2, 3, 1))),
  fedsgd = list(server = list(algorithm = fedsgd(), weight_decay = 0.01),
                ref = list(algorithm = "fedsgd", weight_decay = 0.01)),
  local_adam = list(server = list(local_optimizer = local_adam(weight_decay = 0.01), lr = 0.01),
                    ref = list(optimizer = "adam", weight_decay = 0.01, lr = 0.01)),
  local_rmsprop = list(server = list(local_optimizer = local_rmsprop(alpha = 0.9), lr = 0.01),
                       ref = list(optimizer = "rmsprop", alpha = 0.9, lr = 0.01)),
  local_adagrad = list(server = list(local_optimizer = local_adagrad(), lr = 0.05),
                       ref = list(optimizer = "adagrad", eps = 1e-10, lr = 0.05)),
  fedavgm = list(server = list(server_optimizer = server_sgd(0.8, momentum = 0.9)),
                 ref = list(server = list(kind = "sgd", lr = 0.8, momentum = 0.9))),
  fedadagrad = list(server = list(server_optimizer = server_adagrad(0.1, tau = 1e-2, beta1 = 0.5)),
                    ref = list(server = list(kind = "adagrad", lr = 0.1, tau = 1e-2, beta1 = 0.5))),
  fedadam = list(server = list(server_optimizer = server_adam(0.05)),
                 ref = list(server = list(kind = "adam", lr = 0.05, beta1 = 0.9, beta2 = 0.99, tau = 1e-3))),
  fedyogi = list(server = list(server_optimizer = server_yogi(0.05)),
                 ref = list(server = list(kind = "yogi", lr = 0.05, beta1 = 0.9, beta2 = 0.99, tau = 1e-3))),
  # Composed levers.
  fedprox_fedadam = list(server = list(algorithm = fedprox(0.1), server_optimizer = server_adam(0.05)),
                         ref = list(algorithm = "fedprox", mu = 0.1,
                                    server = list(kind = "adam", lr = 0.05, beta1 = 0.9, beta2 = 0.99, tau = 1e-3))),
  scaffold_momentum = list(server = list(algorithm = scaffold(), momentum = 0.7),
                           ref = list(algorithm = "scaffold", momentum = 0.7)),
  scaffold_step_momentum = list(server = list(algorithm = scaffold(correction = "step"), momentum = 0.9),
                                ref = list(algorithm = "scaffold", momentum = 0.9, scaffold_after_step = TRUE)),
  fednova_momentum = list(server = list(algorithm = fednova(), momentum = 0.9, epochs = c(2, 1, 3, 2)),
                          ref = list(algorithm = "fednova", momentum = 0.9, epochs = c(2, 1, 3, 2)))
)

for (case in names(cases)) {
  test_that(paste("the pipeline matches plain R to 1e-10:", case), {
    pd <- pipeline_data()
    for (model in list(model_softmax(4, 3), model_mlp(4, hidden = 5, n_classes = 3))) {
      p0 <- random_params(model, 7)
      args <- utils::modifyList(list(epochs = 2, batch_size = 7, lr = 0.1), cases[[case]]$server)
      srv <- do.call(run_pipeline, c(list(model, p0, pd), args))
      ref_args <- utils::modifyList(list(epochs = 2, batch = 7, lr = 0.1), cases[[case]]$ref)
      ref <- do.call(ref_federated, c(list(p0, pd$clients, 3, schedule3, "softmax"), ref_args))
      expect_equal(flat_of(srv$params), flat_of(ref$params), tolerance = 1e-10)
      if (case %in% c("scaffold", "scaffold_step_momentum")) {
        expect_equal(srv$server_state$control, ref$c, tolerance = 1e-10)
        expect_equal(srv$nodes[[3]]$state$control, ref$c_i[[3]], tolerance = 1e-10)
      }
    }
  })
}

test_that("diagnostics match their definitions", {
  pd <- pipeline_data()
  m <- model_softmax(4, 3)
  p0 <- random_params(m, 7)
  srv <- run_pipeline(m, p0, pd, rounds = 1, epochs = 2, batch_size = 7, lr = 0.1,
                      server_optimizer = server_sgd(0.5, momentum = 0.3))
  deltas <- lapply(pd$clients[schedule3[[1]]], function(cl) {
    flat_of(ref_local_run(p0, p0, cl$x, cl$y, "softmax", epochs = 2, batch = 7, lr = 0.1)$params) - flat_of(p0)
  })
  n <- vapply(pd$clients[schedule3[[1]]], function(cl) length(cl$y), numeric(1))
  ref <- ref_diagnostics(deltas, n / sum(n), flat_of(p0), flat_of(srv$params))
  h <- srv$history
  for (col in c("update_norm", "client_norm_mean", "client_norm_sd", "cosine_mean", "gradient_diversity")) {
    expect_equal(h[[col]], ref[[col]], tolerance = 1e-10, label = col)
  }
  expect_equal(srv$client_log$update_norm, ref$client_norms, tolerance = 1e-10)
  expect_equal(srv$client_log$cosine, ref$cosines, tolerance = 1e-10)
})

test_that("identities: fedprox(0) is fedavg, server_sgd(1, 0) is plain averaging, one-client SCAFFOLD", {
  pd <- pipeline_data()
  m <- model_mlp(4, hidden = 5, n_classes = 3)
  p0 <- random_params(m, 8)
  a <- run_pipeline(m, p0, pd, epochs = 2, lr = 0.1)
  b <- run_pipeline(m, p0, pd, epochs = 2, lr = 0.1, algorithm = fedprox(0))
  expect_identical(a$params, b$params)
  # Plain FedAvg: the sample-weighted mean of the clients' models.
  x <- p0
  for (r in 1:3) {
    S <- schedule3[[r]]
    models <- lapply(pd$clients[S], function(cl) flat_of(ref_sgd(x, cl$x, cl$y, "softmax", 1, 10, 0.1)))
    n <- vapply(pd$clients[S], function(cl) length(cl$y), numeric(1))
    x <- relist_params(Reduce(`+`, Map(`*`, models, n / sum(n))), p0)
  }
  plain <- run_pipeline(m, p0, pd, epochs = 1, batch_size = 10, lr = 0.1)
  expect_equal(flat_of(plain$params), flat_of(x), tolerance = 1e-12)
  # SCAFFOLD with one node selected every round: c becomes c_1 / N = c_1.
  one <- fed_server(model_softmax(4, 3), fed_node(pd$clients[[1]]$x, pd$clients[[1]]$y, "only"), algorithm = scaffold(),
                    fraction = 1, epochs = 2, batch_size = 5, lr = 0.1, shuffle = FALSE, params = p0 <- random_params(model_softmax(4, 3), 2),
                    seed = 1)
  one$fit(3, verbose = FALSE)
  ref <- ref_federated(p0, pd$clients[1], 3, list(1, 1, 1), "softmax", algorithm = "scaffold", epochs = 2, batch = 5,
                       lr = 0.1)
  expect_equal(flat_of(one$params), flat_of(ref$params), tolerance = 1e-10)
  expect_equal(one$server_state$control, one$nodes[[1]]$state$control, tolerance = 1e-12)
})

test_that("custom R models run the same pipeline as the Rust core", {
  pd <- pipeline_data()
  softmax_r <- model_custom(
    init = function(seed) list(W1 = matrix(0, 4, 3), b1 = numeric(3)),
    loss_grad = function(params, x, y) {
      list(loss = ref_loss(params, x, y, "softmax"), grad = ref_grad(params, x, y, "softmax"))
    },
    predict = function(params, x) ref_forward(params, x, "softmax")$out,
    n_features = 4, n_classes = 3)
  p0 <- random_params(model_softmax(4, 3), 5)
  levers <- list(algorithm = scaffold(), local_optimizer = local_adam(), server_optimizer = server_yogi(0.05),
                 epochs = c(1, 2, 2, 1), lr = 0.01, batch_size = 7)
  builtin <- do.call(run_pipeline, c(list(model_softmax(4, 3), p0, pd), levers))
  custom <- do.call(run_pipeline, c(list(softmax_r, p0, pd), levers))
  expect_equal(flat_of(custom$params), flat_of(builtin$params), tolerance = 1e-10)
  expect_equal(custom$history$cosine_mean, builtin$history$cosine_mean, tolerance = 1e-10)
})

test_that("a server optimizer written in R replaces the built-in one", {
  pd <- pipeline_data()
  m <- model_softmax(4, 3)
  p0 <- random_params(m, 9)
  momentum_r <- server_optimizer("momentum in R", function(params, delta, state, round) {
    v <- 0.9 * (state %||% 0) + delta
    list(params = params + 0.8 * v, state = v)
  })
  a <- run_pipeline(m, p0, pd, server_optimizer = momentum_r)
  b <- run_pipeline(m, p0, pd, server_optimizer = server_sgd(0.8, momentum = 0.9))
  expect_equal(flat_of(a$params), flat_of(b$params), tolerance = 1e-12)
})

test_that("a client algorithm written in R gets the node, the parameters and its state", {
  pd <- pipeline_data()
  m <- model_softmax(4, 3)
  seen <- 0
  halved <- fed_algorithm("half steps", function(node, params, config, state) {
    out <- node$train(params, config, return = "delta")
    list(delta = lapply(out$delta, `*`, 0.5), n_samples = out$n_samples, train_loss = out$train_loss,
         state = (state %||% 0) + 1)
  })
  srv <- run_pipeline(m, random_params(m, 3), pd, algorithm = halved, epochs = 1, lr = 0.1)
  ref <- run_pipeline(m, random_params(m, 3), pd, epochs = 1, lr = 0.1, server_optimizer = server_sgd(0.5))
  expect_equal(flat_of(srv$params), flat_of(ref$params), tolerance = 1e-12)
  expect_identical(vapply(srv$nodes, function(n) n$state$custom, numeric(1)), c(client1 = 2, client2 = 2, client3 = 2, client4 = 2))
})

test_that("power of choice picks the highest-loss candidates, logged with their losses", {
  data <- synthetic_fedprox(1, 1, n_clients = 12, dim = 5, n_classes = 3, max_size = 80, seed = 2)
  nodes <- fed_nodes(data)
  srv <- fed_server(model_softmax(5, 3), nodes, fraction = 0.25, selection = select_power_of_choice(d = 6),
                    lr = 0.05, seed = 3)
  for (r in 1:3) {
    before <- srv$params
    srv$round()
    log <- srv$selection_log[srv$selection_log$round == r, ]
    expect_identical(nrow(log), 6L)
    losses <- vapply(log$client, function(id) ref_loss(before, data$clients[[id]]$x, data$clients[[id]]$y, "softmax"),
                     numeric(1))
    expect_equal(log$score, unname(losses), tolerance = 1e-10)
    expect_setequal(log$client[log$picked], ref_power_of_choice(log$client, losses, 3))
    expect_setequal(srv$client_log$client[srv$client_log$round == r], log$client[log$picked])
  }
})

test_that("Poisson sampling picks each node with probability q, availability limits who can be picked", {
  x <- matrix(rnorm(200), 100)
  nodes <- fed_nodes(x, as.integer(x[, 1] > 0), partition_iid(100, 20, seed = 1),
                     availability = rep(c(1, 0.25), each = 10))
  srv <- fed_server(model_logistic(2), nodes, selection = select_poisson(0.4), lr = 0.1, seed = 5)
  srv$fit(150, verbose = FALSE)
  picks <- table(factor(srv$client_log$client, levels = names(nodes)))
  # Always reachable: Binomial(150, 0.4); reachable a quarter of the time: Binomial(150, 0.1).
  always <- sum(picks[1:10])
  rarely <- sum(picks[11:20])
  expect_lt(abs(always - 1500 * 0.4), 4 * sqrt(1500 * 0.4 * 0.6))
  expect_lt(abs(rarely - 1500 * 0.1), 4 * sqrt(1500 * 0.1 * 0.9))
  expect_true(any(srv$history$clients == 0) || all(srv$history$clients > 0))
})

test_that("contribution scores follow their formula, with explored picks", {
  data <- synthetic_fedprox(1, 1, n_clients = 10, dim = 5, n_classes = 3, max_size = 80, seed = 4)
  nodes <- fed_nodes(data)
  srv <- fed_server(model_softmax(5, 3), nodes, fraction = 0.4, lr = 0.05, seed = 2,
                    selection = select_score(similarity = 0.5, volume = 0.3, availability = 0.2, explore = 0.25))
  srv$round()
  n <- vapply(nodes, function(nd) nd$n_samples, numeric(1))
  log1 <- srv$selection_log
  # Round 1: no node has an update yet (cosine counts as 0), all reachable.
  expect_equal(log1$score, unname(ref_score(0.5, 0.3, 0.2, rep(NA, 10), n, rep(1, 10))), tolerance = 1e-12)
  expect_identical(sum(log1$picked), 4L)
  top <- log1$client[order(-log1$score)][1:3]
  expect_true(all(top %in% log1$client[log1$picked]))
  # Round 2: the cosine of each node's last update with round 1's aggregate.
  last <- lapply(srv$nodes, function(nd) nd$state$last_update)
  w <- srv$client_log$weight
  agg <- Reduce(`+`, Map(`*`, last[srv$client_log$client], w / sum(w)))
  cos_last <- vapply(last, function(u) if (is.null(u)) NA_real_ else sum(u * agg) / sqrt(sum(u^2) * sum(agg^2)), numeric(1))
  srv$round()
  log2 <- srv$selection_log[srv$selection_log$round == 2, ]
  expect_equal(log2$score, unname(ref_score(0.5, 0.3, 0.2, cos_last, n, rep(1, 10))), tolerance = 1e-10)
})

test_that("stragglers run fewer epochs, or are dropped", {
  data <- synthetic_fedprox(1, 1, n_clients = 10, dim = 5, n_classes = 3, max_size = 60, seed = 6)
  slow <- fed_server(model_softmax(5, 3), fed_nodes(data), fraction = 1, epochs = 5, stragglers = 0.5, seed = 1)
  slow$fit(4, verbose = FALSE)
  log <- slow$client_log
  per_round <- tapply(log$epochs < 5, log$round, sum)
  expect_true(all(per_round == 5))
  expect_true(all(log$epochs >= 1 & log$epochs <= 5))
  expect_true(all(log$steps == log$epochs * ceiling(log$n_samples / 10)))
  dropped <- fed_server(model_softmax(5, 3), fed_nodes(data), fraction = 1, epochs = 5, stragglers = 0.5,
                        drop_stragglers = TRUE, seed = 1)
  expect_identical(dropped$fit(2, verbose = FALSE)$clients, c(5L, 5L))
  expect_true(all(dropped$client_log$epochs == 5))
})

test_that("every lever's state is thread-invariant and survives saveRDS", {
  data <- synthetic_fedprox(1, 1, n_clients = 8, dim = 5, n_classes = 3, max_size = 60, seed = 7)
  make <- function(threads) {
    fed_server(model_mlp(5, hidden = 4, n_classes = 3), fed_nodes(data, availability = 0.8), algorithm = scaffold(),
               local_optimizer = local_sgd(momentum = 0.5), server_optimizer = server_yogi(0.02),
               selection = select_score(), fraction = 0.5, epochs = c(1, 2, 1, 2, 1, 2, 1, 2), stragglers = 0.25,
               lr = 0.05, test_data = pool_clients(data, "test"), seed = 11, threads = threads)
  }
  one <- make(1)
  two <- make(2)
  one$fit(6, verbose = FALSE)
  two$fit(6, verbose = FALSE)
  expect_identical(one$params, two$params)
  expect_identical(one$history, two$history)
  expect_identical(one$client_log, two$client_log)
  expect_identical(one$server_state, two$server_state)
  resumed <- make(1)
  resumed$fit(3, verbose = FALSE)
  f <- withr::local_tempfile(fileext = ".rds")
  saveRDS(resumed, f)
  resumed <- readRDS(f)
  resumed$fit(3, verbose = FALSE)
  expect_identical(resumed$params, one$params)
  expect_identical(resumed$history, one$history)
  expect_identical(resumed$selection_log, one$selection_log)
  # The states are the same, apart from the key naming the server that left them.
  state_of <- function(s) lapply(s$nodes, function(n) n$state[setdiff(names(n$state), "server")])
  expect_identical(state_of(resumed), state_of(one))
})

test_that("the parts print, and bad settings are classed errors naming the argument", {
  expect_snapshot({
    fedprox(0.1)
    scaffold()
    local_adam()
    server_yogi(0.05)
    select_power_of_choice(5)
    agg_weighted()
  })
  d <- toy_classes(40, seed = 41)
  nodes <- fed_nodes(d$x, d$y, partition_iid(40, 4, seed = 1))
  m <- model_softmax(4, 3)
  expect_snapshot(error = TRUE, {
    fedprox(-1)
    local_adam(beta1 = 1)
    local_rmsprop(eps = 0)
    server_adam(lr = 0)
    server_sgd(momentum = 1)
    select_poisson(0)
    select_power_of_choice(0)
    select_score(explore = 2)
    fed_server(m, nodes, algorithm = "fedmax")
    fed_server(m, nodes, local_optimizer = "adam")
    fed_server(m, nodes, server_optimizer = server_sgd)
    fed_server(m, nodes, epochs = c(1, 2))
    fed_server(m, nodes, stragglers = 2)
    fed_server(m, nodes, drop_stragglers = NA)
    fed_server(m, nodes, algorithm = fednova(), local_optimizer = local_adam())
    fed_server(m, nodes, local_optimizer = local_sgd(), momentum = 0.9)
    fed_nodes(d$x, d$y, partition_iid(40, 4, seed = 1), availability = 0)
    fed_nodes(d$x, d$y, partition_iid(40, 4, seed = 1), availability = c(1, 0.5))
  })
})
