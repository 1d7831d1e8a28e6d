# One round, two halves: the clients' work as FitIns/FitRes messages gives
# the simulated round's results exactly, with each node's half in this
# process or in its own R process holding its data and state.

grid_data <- function() synthetic_fedprox(1, 1, n_clients = 6, max_size = 60, seed = 3)

grid_cases <- list(
  fedavg = list(),
  fedprox_adam = list(algorithm = fedprox(0.1), server_optimizer = server_adam(lr = 0.03)),
  scaffold = list(algorithm = scaffold()),
  fednova_momentum = list(algorithm = fednova(), momentum = 0.5),
  dp_adaptive = list(privacy = dp_central(0.5, clip = clip_adaptive(initial = 0.5, count_noise = 1))),
  topk_feedback = list(compress = compress_topk(0.1)),
  filter_attack = list(filter = filter_norm(mad = 3)),
  accuracy_weights = list(weights = "accuracy"),
  power_of_choice = list(selection = select_power_of_choice(4)),
  score = list(selection = select_score()),
  fedsgd = list(algorithm = fedsgd())
)

make_grid_server <- function(case, data = grid_data(), rounds_seed = 1, async = FALSE) {
  nodes <- if (identical(case, "accuracy_weights")) fed_nodes(data, validation = 0.3, seed = 1) else fed_nodes(data)
  if (case %in% c("filter_attack", "fedbuff")) set_attack(nodes, names(nodes)[1:2], attack_gaussian(1))
  if (async) {
    set_system(nodes, system_profile(speed = lognormal(400, 20), download = lognormal(1e5, 5), seed = 2))
    return(fed_server(model_softmax(60, 10), nodes, lr = 0.05, seed = rounds_seed, asynchronous = fedbuff(2, 3),
                      test_data = pool_clients(data, "test")))
  }
  do.call(fed_server, c(list(model_softmax(60, 10), nodes, fraction = 0.5, lr = 0.05, seed = rounds_seed,
                             test_data = pool_clients(data, "test")), grid_cases[[case]]))
}

same_run <- function(a, b, info) {
  expect_identical(a$params, b$params, info = info)
  expect_identical(a$history, b$history, info = info)
  expect_identical(a$client_log, b$client_log, info = info)
  expect_identical(a$server_state, b$server_state, info = info)
}

test_that("a round through FitIns/FitRes messages equals the simulated round, lever by lever", {
  for (case in names(grid_cases)) {
    simulated <- make_grid_server(case)
    messages <- make_grid_server(case)
    fedagg:::set_grid(messages, fedagg:::grid_in_process())
    simulated$fit(3, verbose = FALSE)
    messages$fit(3, verbose = FALSE)
    same_run(simulated, messages, case)
  }
  simulated <- make_grid_server("fedbuff", async = TRUE)
  messages <- make_grid_server("fedbuff", async = TRUE)
  fedagg:::set_grid(messages, fedagg:::grid_in_process())
  simulated$fit(4, verbose = FALSE)
  messages$fit(4, verbose = FALSE)
  same_run(simulated, messages, "fedbuff")
  expect_identical(simulated$system_log, messages$system_log)
})

test_that("messages are checked: a wrong kind, a tampered frame, another node's answer", {
  srv <- make_grid_server("fedavg")
  priv <- srv$.__enclos_env__$private
  ins <- fedagg:::fit_instructions(priv, c("client1", "client2"), c(0, 1), c(1, 1), NULL,
                                   fedagg:::rust_config(priv$.local, "collect", 1), 1L, FALSE)
  expect_identical(fedagg:::rs_message_kind(ins[[1]]), "FitIns")
  asked <- fedagg:::rs_fit_ins_read(ins[[1]], TRUE)
  expect_identical(asked$node, "client1")
  expect_identical(asked$params, unlist(srv$params, use.names = FALSE))
  node <- srv$nodes[["client1"]]
  res <- fedagg:::client_fit(ins[[1]], node$data_for(srv$model), NULL, list(), client = "client1")
  expect_identical(fedagg:::rs_message_kind(res), "FitRes")
  # A FitIns where a FitRes is due; a truncated message; another node's answer.
  expect_error(fedagg:::read_fit_result(ins[[1]], "client1", 1L), class = "fedagg_error_client")
  expect_error(fedagg:::read_fit_result(res[-length(res)], "client1", 1L), class = "fedagg_error_client")
  expect_error(fedagg:::read_fit_result(res, "client2", 1L), class = "fedagg_error_client")
  expect_error(fedagg:::read_fit_result(res, "client1", 2L), class = "fedagg_error_client")
  expect_error(fedagg:::read_fit_result("not raw", "client1", 1L), class = "fedagg_error_client")
  tampered <- ins[[1]]
  tampered[7] <- as.raw(9)
  expect_error(fedagg:::client_fit(tampered, node$data_for(srv$model)), class = "fedagg_error_input")
  # A node refuses another node's instructions.
  rt <- fedagg:::node_runtime("client2", node$data_for(srv$model))
  expect_error(rt$fit(ins[[1]]), class = "fedagg_error_client")
  # A grid that answers nothing, or not for every client, fails the round.
  fedagg:::set_grid(srv, function(messages, nodes, model, states, round) list())
  expect_error(srv$round(), class = "fedagg_error_user_code")
  expect_identical(srv$rounds_done, 0L)
})

test_that("a node keeps the state of a round only once the server committed it", {
  srv <- make_grid_server("scaffold")
  data <- srv$nodes[["client1"]]$data_for(srv$model)
  rt <- fedagg:::node_runtime("client1", data)
  priv <- srv$.__enclos_env__$private
  cfg <- fedagg:::rust_config(c(priv$.local, list(algorithm = scaffold())), "collect", 1)
  cfg$algorithm <- "scaffold"
  saved <- priv$.state
  withr::defer(priv$.state <- saved)
  # `node_round`: the round whose state of this node the server committed.
  ask <- function(round, committed, node_round) {
    priv$.state$round <- committed
    priv$.state$node_rounds <- c(client1 = node_round)
    fedagg:::fit_instructions(priv, "client1", 0, 1, NULL, cfg, round, FALSE)[[1]]
  }
  first <- fedagg:::rs_fit_res_read(rt$fit(ask(1L, 0L, 0L)))
  expect_length(rt$state(), 0L)                       # round 1 not committed yet
  expect_identical(rt$pending()$state$control, first$control)
  again <- fedagg:::rs_fit_res_read(rt$fit(ask(1L, 0L, 0L)))  # round 1 failed and runs again
  expect_length(rt$state(), 0L)
  rt$fit(ask(2L, 1L, 1L))                             # round 1 committed with this node
  expect_identical(rt$state()$control, again$control)
  # A round the node answered but the server threw away (round 3 failed;
  # its retry ran without this node): its state is never kept.
  rt2 <- fedagg:::node_runtime("client1", data)
  thrown <- fedagg:::rs_fit_res_read(rt2$fit(ask(3L, 2L, 0L)))
  rt2$fit(ask(5L, 4L, 0L))
  expect_length(rt2$state(), 0L)
})

test_that("FedBuff through messages stays exact when a node trains twice in one batch", {
  # 6 nodes, 3 training at a time, 3 updates per step: a node that arrives
  # is free again and can be dispatched before the batch trains.
  for (seed in 1:4) {
    d <- grid_data()
    make <- function() {
      nodes <- fed_nodes(d)
      set_system(nodes, system_profile(speed = lognormal(400, 20), download = lognormal(1e5, 5), seed = 2))
      fed_server(model_softmax(60, 10), nodes, lr = 0.05, seed = seed, asynchronous = fedbuff(3, 3))
    }
    seen <- character()
    simulated <- make()
    messages <- make()
    grid <- fedagg:::grid_in_process()
    fedagg:::set_grid(messages, function(messages, nodes, model, states, round) {
      if (anyDuplicated(names(messages))) seen <<- c(seen, "duplicate")
      grid(messages, nodes, model, states, round)
    })
    simulated$fit(4, verbose = FALSE)
    messages$fit(4, verbose = FALSE)
    expect_identical(messages$params, simulated$params, info = seed)
  }
  expect_true("duplicate" %in% seen)
})

test_that("a custom R model trains on its node through messages, to the simulated run, lever by lever", {
  data <- grid_data()
  cases <- list(fedavg = list(), scaffold = list(algorithm = scaffold()),
                fednova = list(algorithm = fednova(), momentum = 0.5, batch_size = 10),
                dp_topk = list(privacy = dp_central(0.5, clip = 1), compress = compress_topk(0.1)),
                local_dp_attack = list(privacy = dp_local(epsilon = 5, clip = 1)), fedsgd = list(algorithm = fedsgd()),
                weights_function = list(weights = function(info) info$n_samples))
  for (case in names(cases)) {
    make <- function() {
      nodes <- fed_nodes(data, validation = 0.3, seed = 1)
      if (case == "local_dp_attack") set_attack(nodes, names(nodes)[1], attack_scale(5))
      do.call(fed_server, c(list(custom_softmax(60, 10), nodes, fraction = 0.5, lr = 0.05, seed = 2,
                                 test_data = pool_clients(data, "test")), cases[[case]]))
    }
    simulated <- make()
    messages <- make()
    fedagg:::set_grid(messages, fedagg:::grid_in_process())
    simulated$fit(3, verbose = FALSE)
    messages$fit(3, verbose = FALSE)
    same_run(simulated, messages, case)
  }
})

test_that("a node refuses a task for a custom model it does not hold", {
  data <- grid_data()
  srv <- fed_server(custom_softmax(60, 10), fed_nodes(data), seed = 1)
  priv <- srv$.__enclos_env__$private
  ins <- fedagg:::fit_instructions(priv, "client1", 0, 1, NULL, fedagg:::rust_config(priv$.local, "collect", 1), 1L, FALSE)
  node <- srv$nodes[["client1"]]
  other <- custom_softmax(60, 10, name = "another")
  expect_error(fedagg:::client_fit_custom(ins[[1]], node, other, init_params(other)), "another",
               class = "fedagg_error_protocol")
  # A built-in model's task is not a custom model's, and the other way round.
  builtin <- fed_server(model_softmax(60, 10), fed_nodes(data), seed = 1)
  bpriv <- builtin$.__enclos_env__$private
  bins <- fedagg:::fit_instructions(bpriv, "client1", 0, 1, NULL, fedagg:::rust_config(bpriv$.local, "collect", 1), 1L, FALSE)
  expect_error(fedagg:::client_fit_custom(bins[[1]], node, srv$model, init_params(srv$model)), "built-in",
               class = "fedagg_error_protocol")
  expect_error(fedagg:::client_fit(ins[[1]], node$data_for(srv$model)), "trains in R", class = "fedagg_error_input")
  # A dimension that does not match the one announced cannot even be sent.
  expect_identical(fedagg:::rs_fit_ins_read(ins[[1]], FALSE)$model$n_params, 610)
})

test_that("what the message path cannot carry yet is refused, not ignored", {
  data <- grid_data()
  custom <- fed_server(model_softmax(60, 10), fed_nodes(data), seed = 1,
                       algorithm = fed_algorithm("mine", local = function(node, params, config, state) NULL))
  expect_error(fedagg:::set_grid(custom, fedagg:::grid_in_process()), class = "fedagg_error_input")
  nodes <- fed_nodes(data)
  hier <- fed_server(model_softmax(60, 10), nodes, fraction = 1, seed = 1,
                     topology = topology_hierarchical(list(a = names(nodes)[1:3], b = names(nodes)[4:6])))
  expect_error(fedagg:::set_grid(hier, fedagg:::grid_in_process()), class = "fedagg_error_input")
})

test_that("a client that fails through messages raises the error it raises in the simulated round", {
  set.seed(1)
  x <- matrix(rnorm(200), 100)
  y <- x[, 1] * 3 + rnorm(100)
  make <- function() fed_server(model_linear(2), fed_nodes(x, y, partition_iid(100, 2, seed = 1)), fraction = 1,
                                lr = 1e200, seed = 1)
  simulated <- make()
  messages <- make()
  fedagg:::set_grid(messages, fedagg:::grid_in_process())
  a <- tryCatch(simulated$round(), error = identity)
  b <- tryCatch(messages$round(), error = identity)
  expect_s3_class(a, "fedagg_error_diverged")
  expect_s3_class(a, "fedagg_error_client")
  expect_identical(class(b), class(a))
  expect_identical(b$client, a$client)
})

test_that("each node's half in its own R process, with its data and state only there, gives the simulated run", {
  skip_on_cran()
  skip_if_not_installed("callr")
  data <- grid_data()
  ids <- names(fed_nodes(data))
  sessions <- lapply(stats::setNames(ids, ids), function(id) callr::r_session$new())
  withr::defer(for (s in sessions) s$close())
  start_nodes <- function(server) {
    for (id in ids) {
      node <- server$nodes[[id]]
      sessions[[id]]$run(function(id, train, validation) {
        assign("node", fedagg:::node_runtime(id, train, validation), envir = globalenv())
        NULL
      }, list(id, node$data_for(server$model), node$data_for(server$model, "validation")))
    }
  }
  grid <- function(messages, nodes, model, states, round) {
    # `states` is what the server knows; these nodes keep their own.
    lapply(seq_along(messages), function(i) {
      sessions[[names(messages)[i]]]$run(function(ins) get("node", envir = globalenv())$fit(ins), list(messages[[i]]))
    })
  }
  for (case in c("fedavg", "fedprox_adam", "scaffold", "dp_adaptive", "topk_feedback", "fedbuff")) {
    async <- case == "fedbuff"
    simulated <- make_grid_server(case, data, async = async)
    remote <- make_grid_server(case, data, async = async)
    start_nodes(remote)
    fedagg:::set_grid(remote, grid)
    simulated$fit(3, verbose = FALSE)
    remote$fit(3, verbose = FALSE)
    same_run(simulated, remote, case)
    if (case == "scaffold") {
      # The controls the nodes hold are those the simulation keeps for them
      # (as of the last round each node's state was committed in).
      for (id in unique(simulated$client_log$client)) {
        held <- sessions[[id]]$run(function() {
          n <- get("node", envir = globalenv())
          p <- n$pending()
          if (is.null(p)) n$state()$control else p$state$control
        })
        expect_identical(held, simulated$nodes[[id]]$state$control, info = id)
      }
    }
  }
})

test_that("a client draws from one stream of its own, whoever else is in the round", {
  # Its Gaussian attack, its local DP noise and its random-k draws are the
  # same whether it is the first or the third client of a round.
  data <- grid_data()
  sent_norm <- function(schedule, ...) {
    nodes <- fed_nodes(data)
    set_attack(nodes, "client3", attack_gaussian(1))
    srv <- fed_server(model_softmax(60, 10), nodes, schedule = list(schedule), lr = 0.05, seed = 1, ...)
    srv$round()
    log <- srv$client_log
    log$update_norm[log$client == "client3"]
  }
  expect_identical(sent_norm(c("client3", "client4")), sent_norm(c("client1", "client2", "client3")))
  expect_identical(sent_norm(c("client3", "client4"), compress = compress_random_k(0.2)),
                   sent_norm(c("client1", "client2", "client3"), compress = compress_random_k(0.2)))
  local_norm <- function(schedule) {
    srv <- fed_server(model_softmax(60, 10), fed_nodes(data), schedule = list(schedule), lr = 0.05, seed = 1,
                      privacy = dp_local(1, clip = 0.5))
    srv$round()
    log <- srv$client_log
    log$update_norm[log$client == "client3"]
  }
  expect_identical(local_norm(c("client3", "client4")), local_norm(c("client1", "client2", "client3")))
})
