# Scale-out on `future`: the nodes of a networked federation in worker
# processes, on loopback, against the simulation of the same federation.

launch_data <- function(n_nodes = 6, n = 40, p = 5, seed = 31) {
  set.seed(seed)
  x <- matrix(rnorm(n_nodes * n * p), ncol = p)
  y <- sample(0:2, n_nodes * n, TRUE)
  fed_nodes(x, y, split(seq_len(n_nodes * n), rep(seq_len(n_nodes), each = n)))
}

launch_server <- function(nodes, ...) {
  fed_server(model_softmax(5, 3), nodes, fraction = 0.5, lr = 0.2, seed = 12, algorithm = scaffold(),
             server_optimizer = server_adam(lr = 0.05), ...)
}

# A networked run whose nodes are hosted by `workers` future workers.
launched_run <- function(nodes, rounds, workers, dir) {
  keys <- net_keys(dir, names(nodes))
  srv <- launch_server(fed_remote_nodes(keys$nodes))
  srv$listen(keys$server_key, port = 0, round_timeout = 60)
  withr::defer(srv$stop(0), envir = parent.frame())
  launch <- fed_launch(nodes, srv$url, srv$model, key = dir, server_key = keys$server, workers = workers,
                       poll = 1, timeout = 30, backoff = c(0.1, 1))
  withr::defer(try(launch$stop(which(launch$status()$state %in% c("running"))), silent = TRUE), envir = parent.frame())
  srv$serve(rounds, wait_timeout = 120, verbose = FALSE, linger = 1.5)
  list(server = srv, launch = launch)
}

test_that("nodes launched on 2 and 4 multisession workers give the simulation's results", {
  skip_on_cran()
  skip_if_not_installed("future")
  future::plan(future::multisession, workers = 4)
  withr::defer(future::plan(future::sequential))
  nodes <- launch_data()
  sim <- launch_server(nodes)
  sim$fit(3, verbose = FALSE)
  for (workers in c(2, 4)) {
    dir <- withr::local_tempdir()
    run <- launched_run(nodes, 3, workers, dir)
    srv <- run$server
    launch <- run$launch
    tasks <- launch$wait(60)
    status <- launch$status()
    expect_identical(nrow(status), as.integer(workers))
    expect_true(all(status$state == "done"))
    expect_identical(sum(status$nodes), length(nodes))
    expect_true(all(!is.na(status$pid)) && !Sys.getpid() %in% status$pid)
    expect_setequal(unique(tasks$node), unique(sim$client_log$client))
    expect_identical(srv$params, sim$params, info = sprintf("%d workers", workers))
    expect_identical(srv$history$train_loss, sim$history$train_loss)
    expect_match(format(launch)[1], sprintf("%d shards", workers), fixed = TRUE)
  }
})

test_that("a worker stopped mid-run is a dropout, and the federation goes on", {
  skip_on_cran()
  skip_if_not_installed("future")
  future::plan(future::multisession, workers = 2)
  withr::defer(future::plan(future::sequential))
  nodes <- launch_data(n_nodes = 4)
  dir <- withr::local_tempdir()
  # Every node each round, so that the stopped shard's nodes are asked.
  keys <- net_keys(dir, names(nodes))
  srv <- fed_server(model_softmax(5, 3), fed_remote_nodes(keys$nodes), fraction = 1, lr = 0.2, seed = 12,
                    hooks = list(round_end = function(server, round, record) if (round == 2) launch$stop(2)))
  srv$listen(keys$server_key, port = 0, round_timeout = 3)
  withr::defer(srv$stop(0))
  launch <- fed_launch(nodes, srv$url, srv$model, key = dir, server_key = keys$server, workers = 2,
                       poll = 1, timeout = 30, backoff = c(0.1, 1))
  withr::defer(try(launch$stop(), silent = TRUE))
  srv$serve(4, wait_timeout = 120, verbose = FALSE, linger = 1.5)
  expect_identical(srv$rounds_done, 4L)
  expect_identical(launch$status()$state, c("done", "stopped"))
  log <- srv$system_log
  gone <- names(nodes)[3:4]
  expect_true(all(log$status[log$round <= 2] == "kept"))
  expect_true(all(log$status[log$round > 2 & log$client %in% gone] == "dropout"))
  expect_true(all(log$status[log$round > 2 & !log$client %in% gone] == "kept"))
  expect_identical(srv$history$clients, c(4L, 4L, 2L, 2L))
  tasks <- launch$wait(30)
  expect_setequal(unique(tasks$shard), 1L)
})

test_that("fed_launch() refuses what cannot work, before starting anything", {
  skip_if_not_installed("future")
  nodes <- launch_data(n_nodes = 2)
  dir <- withr::local_tempdir()
  keys <- net_keys(dir, names(nodes))
  model <- model_softmax(5, 3)
  future::plan(future::sequential)
  expect_error(fed_launch(nodes, "http://127.0.0.1:1", model, key = dir, server_key = keys$server), class = "fedagg_error_launch")
  future::plan(future::multisession, workers = 1)
  expect_error(fed_launch(nodes, "http://127.0.0.1:1", model, key = dir, server_key = keys$server), class = "fedagg_error_launch")
  future::plan(future::multisession, workers = 2)
  withr::defer(future::plan(future::sequential))
  expect_error(fed_launch(nodes, "http://127.0.0.1:1", model, key = file.path(dir, "none"), server_key = keys$server),
               class = "fedagg_error")
  file.remove(file.path(dir, paste0(names(nodes)[2], ".key")))
  err <- expect_error(fed_launch(nodes, "http://127.0.0.1:1", model, key = dir, server_key = keys$server),
                      class = "fedagg_error_missing_file")
  expect_match(conditionMessage(err), names(nodes)[2], fixed = TRUE)
  expect_error(fed_launch(function(k, n) nodes, "http://127.0.0.1:1", model, key = "a.key", server_key = keys$server),
               class = "fedagg_error_launch")
  expect_error(fed_launch(nodes, 42, model, key = dir, server_key = keys$server), class = "fedagg_error_launch")
  expect_error(fed_launch(nodes, "http://127.0.0.1:1", model, key = dir, server_key = keys$server, workers = 0),
               class = "fedagg_error")
})
