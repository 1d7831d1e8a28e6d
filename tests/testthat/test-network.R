# A real federation on loopback: the server in this process, its nodes in
# their own R processes, over signed HTTP. Results must be those of the
# simulation with the same seed and data.

net_data <- function() synthetic_fedprox(1, 1, n_clients = 6, max_size = 60, seed = 3)

net_cases <- list(
  fedavg = list(),
  fedprox_adam = list(algorithm = fedprox(0.1), server_optimizer = server_adam(lr = 0.03)),
  scaffold = list(algorithm = scaffold()),
  dp_adaptive = list(privacy = dp_central(0.5, clip = clip_adaptive(initial = 0.5, count_noise = 1))),
  topk_feedback = list(compress = compress_topk(0.1)),
  robust = list(aggregator = agg_trimmed_mean(0.2), filter = filter_norm(mad = 3)),
  weights_fn = list(weights = function(info) sqrt(info$n_samples) * (1 + info$train_loss)),
  # The candidates' losses on their training data are asked of them.
  power_of_choice = list(selection = select_power_of_choice(4)),
  accuracy_weights = list(weights = "accuracy"),
  score = list(selection = select_score(), algorithm = fedprox(0.05))
)

test_that("keys: private files only their owner reads, public keys checked, allow-lists read and written", {
  dir <- withr::local_tempdir()
  key <- file.path(dir, "a.key")
  pub <- suppressMessages(fed_keygen(key))
  expect_match(pub, "^ed25519:[A-Za-z0-9+/]{43}=$")
  expect_identical(fed_public_key(key), pub)
  expect_identical(file.info(key)$mode, as.octmode("600"))
  expect_error(fed_keygen(key), class = "fedagg_error_input")
  expect_message(fed_keygen(key, overwrite = TRUE), "Public key")
  expect_false(identical(fed_public_key(key), pub))
  keys <- data.frame(node = c("a", "b"), public_key = c(pub, fed_public_key(key)))
  write_authorized_keys(keys, file.path(dir, "nodes.csv"))
  expect_identical(read_authorized_keys(file.path(dir, "nodes.csv")), keys)
  bad <- keys
  bad$public_key[2] <- "ed25519:AAAA"
  expect_error(fed_remote_nodes(bad), class = "fedagg_error_key")
  bad <- keys
  bad$node[2] <- "a"
  expect_error(fed_remote_nodes(bad), "twice", class = "fedagg_error_input")
  bad$node[2] <- "has space"
  expect_error(fed_remote_nodes(bad), class = "fedagg_error_input")
  expect_error(fed_public_key(file.path(dir, "nope")), class = "fedagg_error_input")
  writeLines("not a key", file.path(dir, "junk.key"))
  expect_error(fed_public_key(file.path(dir, "junk.key")), class = "fedagg_error_key")
})

test_that("keys made by OpenSSL work, and fedagg's signatures verify with OpenSSL (Ed25519, RFC 8032)", {
  skip_if_not_installed("openssl")
  dir <- withr::local_tempdir()
  # OpenSSL's own key, in its own PKCS#8 PEM.
  k <- openssl::ed25519_keygen()
  openssl::write_pem(k, file.path(dir, "ossl.key"))
  # The raw key is the last 32 bytes of its SubjectPublicKeyInfo (RFC 8410).
  pub <- paste0("ed25519:", openssl::base64_encode(utils::tail(as.raw(openssl::write_der(k$pubkey)), 32L)))
  expect_identical(fed_public_key(file.path(dir, "ossl.key")), pub)
})

test_that("remote nodes hold no data and refuse what only a node can do", {
  dir <- withr::local_tempdir()
  keys <- net_keys(dir, c("a", "b"))
  nodes <- fed_remote_nodes(keys$nodes)
  expect_s3_class(nodes$a, "RemoteNode")
  expect_match(format(nodes$a), "not joined")
  expect_error(nodes$a$train(list(), list()), class = "fedagg_error_remote_node")
  expect_error(nodes$a$data_for(model_logistic(2)), class = "fedagg_error_remote_node")
  expect_error(nodes$a$attack <- attack_sign_flip(), class = "fedagg_error_remote_node")
  expect_identical(nodes$a$public_key, keys$nodes$public_key[1])
  # A server of local nodes does not serve; levers messages do not carry
  # are refused, not ignored.
  local <- fed_server(model_logistic(2), fed_nodes(matrix(rnorm(40), 20), rbinom(20, 1, 0.5), partition_iid(20, 2, seed = 1)))
  expect_error(local$listen(keys$server_key), class = "fedagg_error_network")
  # The registry says which parts a networked server runs.
  reg <- fedagg:::lever_registry
  expect_setequal(paste(reg$type, reg$kind)[!reg$networked], "algorithm custom")
  mine <- fed_algorithm("mine", local = function(node, params, config, state) NULL)
  err <- expect_error(fed_server(model_logistic(2), nodes, algorithm = mine)$listen(keys$server_key),
                      class = "fedagg_error_network_unsupported")
  expect_match(conditionMessage(err), "mine", fixed = TRUE)
  remote <- fed_server(model_logistic(2), nodes, monitor = monitor_drift())
  expect_error(remote$listen(keys$server_key), class = "fedagg_error_network_unsupported")
  remote <- fed_server(model_logistic(2), nodes)
  expect_error(remote$listen(keys$server_key, host = "0.0.0.0"), "loopback", class = "fedagg_error_network")
  expect_error(remote$listen(keys$server_key, port = 70000), class = "fedagg_error_input")
  expect_error(remote$listen(file.path(dir, "a.key"), limits = list()), class = "fedagg_error_input")
  expect_error(net_limits(rate = -1), class = "fedagg_error_input")
})

test_that("health, readiness and metrics answer on loopback; the server stops cleanly", {
  dir <- withr::local_tempdir()
  keys <- net_keys(dir, c("a", "b"))
  srv <- fed_server(model_logistic(2), fed_remote_nodes(keys$nodes))
  srv$listen(keys$server_key, port = 0)
  withr::defer(srv$stop(0))
  port <- as.integer(sub(".*:", "", srv$url))
  expect_identical(raw_http(port, "GET", "/healthz")$status, 200L)
  expect_identical(raw_http(port, "GET", "/ready")$status, 200L)
  m <- raw_http(port, "GET", "/metrics")
  expect_identical(m$status, 200L)
  expect_match(m$text, "fedagg_nodes_registered 0")
  expect_match(m$text, "fedagg_round_duration_seconds_bucket\\{le=\"\\+Inf\"\\} 0")
  expect_identical(raw_http(port, "POST", "/healthz")$status, 405L)
  # While it resumes from a checkpoint (or shuts down) it is alive but not
  # ready.
  handle <- srv$.__enclos_env__$private$.net$handle
  fedagg:::call_rust(fedagg:::rs_net_set_phase(handle, "starting"))
  expect_identical(raw_http(port, "GET", "/ready")$status, 503L)
  expect_identical(raw_http(port, "GET", "/healthz")$status, 200L)
  fedagg:::call_rust(fedagg:::rs_net_set_phase(handle, "running"))
  expect_identical(raw_http(port, "GET", "/ready")$status, 200L)
  expect_identical(raw_http(port, "GET", "/nowhere")$status, 404L)
  expect_identical(srv$network$joined, c(FALSE, FALSE))
  expect_error(srv$listen(keys$server_key), "already listening", class = "fedagg_error_network")
  # Saved while listening and read back: the copy does not listen, says so,
  # and can listen again.
  file <- withr::local_tempfile(fileext = ".rds")
  saveRDS(srv, file)
  copy <- readRDS(file)
  expect_null(copy$network)
  expect_error(copy$round(), "no longer listens", class = "fedagg_error_network")
  copy$listen(keys$server_key, port = 0)
  expect_false(identical(copy$url, srv$url))
  copy$stop(0)
  srv$stop(0)
  expect_null(srv$url)
  expect_error(suppressWarnings(raw_http(port, "GET", "/healthz")))
})

test_that("a networked federation gives the simulation's results exactly, lever by lever", {
  skip_on_cran()
  skip_if_not_installed("callr")
  data <- net_data()
  for (case in names(net_cases)) {
    make <- function(nodes) {
      do.call(fed_server, c(list(model_softmax(60, 10), nodes, fraction = 0.5, lr = 0.05, seed = 7,
                                 test_data = pool_clients(data, "test")), net_cases[[case]]))
    }
    nodes <- function() {
      out <- if (case == "accuracy_weights") fed_nodes(data, validation = 0.3, seed = 1) else fed_nodes(data)
      # Two attackers, attacking from their own processes.
      if (case == "robust") set_attack(out, names(out)[1:2], attack_gaussian(1))
      out
    }
    simulated <- make(nodes())
    simulated$fit(3, verbose = FALSE)
    networked <- run_networked(make, nodes(), rounds = 3)
    info <- paste(case, paste(attr(networked, "node_output"), collapse = "\n"))
    expect_identical(attr(networked, "node_exit"), c(0L, 0L, 0L), info = info)
    expect_identical(networked$params, simulated$params, info = info)
    expect_identical(networked$history, simulated$history, info = info)
    # Which nodes attack is known to the simulation only.
    log_cols <- setdiff(names(simulated$client_log), "malicious")
    expect_identical(networked$client_log[log_cols], simulated$client_log[log_cols], info = info)
    expect_identical(networked$server_state, simulated$server_state, info = info)
    expect_identical(networked$system_log$status, simulated$system_log$status, info = info)
  }
})

test_that("a custom R model trains in R on its nodes' processes, to the simulation's results", {
  skip_on_cran()
  skip_if_not_installed("callr")
  data <- net_data()
  model <- custom_softmax(60, 10)
  # SCAFFOLD's control and top-k's residual stay with the nodes; the nodes'
  # validation data are evaluated there too.
  make <- function(nodes) {
    fed_server(model, nodes, fraction = 0.5, lr = 0.05, seed = 7, algorithm = scaffold(),
               compress = compress_topk(0.2), test_data = pool_clients(data, "test"))
  }
  nodes <- function() fed_nodes(data, validation = 0.3, seed = 2)
  simulated <- make(nodes())
  simulated$fit(3, verbose = FALSE)
  networked <- run_networked(make, nodes(), rounds = 3, n_procs = 2)
  info <- paste(attr(networked, "node_output"), collapse = "\n")
  expect_identical(attr(networked, "node_exit"), c(0L, 0L), info = info)
  expect_identical(networked$params, simulated$params, info = info)
  expect_identical(networked$history, simulated$history, info = info)
  expect_identical(networked$client_log[setdiff(names(simulated$client_log), "malicious")],
                   simulated$client_log[setdiff(names(simulated$client_log), "malicious")], info = info)
  expect_false(anyNA(networked$history$val_loss))
})

# A hostile client: raw HTTP written here, signed with OpenSSL (not with
# fedagg's client), sends every request the server must refuse.
test_that("hostile requests get their documented 4xx, change nothing, and the server stays up", {
  skip_on_cran()
  skip_if_not_installed("openssl")
  dir <- withr::local_tempdir()
  data <- synthetic_fedprox(1, 1, n_clients = 2, max_size = 40, seed = 5)
  local <- fed_nodes(data)
  ids <- names(local)
  # The hostile node's key is OpenSSL's own.
  k <- openssl::ed25519_keygen()
  pub <- function(key) paste0("ed25519:", openssl::base64_encode(utils::tail(as.raw(openssl::write_der(key$pubkey)), 32L)))
  other <- openssl::ed25519_keygen()
  keys <- net_keys(dir, ids)
  keys$nodes$public_key[1] <- pub(k)
  model <- model_softmax(60, 10)
  srv <- fed_server(model, fed_remote_nodes(keys$nodes), fraction = 1, lr = 0.05, seed = 1)
  srv$listen(keys$server_key, port = 0, limits = net_limits(rate = 1000, burst = 1000, header_timeout = 1))
  withr::defer(srv$stop(0))
  port <- as.integer(sub(".*:", "", srv$url))
  handle <- srv$.__enclos_env__$private$.net$handle
  # The FitIns the server would send this round, captured from the same
  # server simulated.
  twin <- fed_server(model, fed_nodes(data), fraction = 1, lr = 0.05, seed = 1)
  captured <- NULL
  fedagg:::set_grid(twin, function(messages, ...) {
    captured <<- messages
    stop("captured")
  })
  try(twin$round(), silent = TRUE)
  ins <- captured[[ids[1]]]
  node <- local[[ids[1]]]
  good <- fedagg:::client_fit(ins, node$data_for(model))
  tasks <- fedagg:::call_rust(fedagg:::rs_net_post_tasks(handle, 1, 610, ids[1], list(ins), raw()))

  hex_sha <- function(b) paste(as.character(openssl::sha256(b)), collapse = "")
  request <- function(method, path, body = raw(), node = ids[1], key = k, round = 0, task = "",
                      ts = as.integer(Sys.time()), nonce = paste(as.character(openssl::rand_bytes(16)), collapse = ""),
                      digest = hex_sha(body), headers = list(), sign = TRUE) {
    text <- paste0("fedagg-request-v1\n", method, "\n", path, "\n", node, "\n", ts, "\n", nonce, "\n", digest, "\n",
                   format(round, scientific = FALSE), "\n", task, "\n")
    sig <- if (sign) openssl::base64_encode(openssl::ed25519_sign(charToRaw(text), key)) else "AAAA"
    h <- c(`x-fedagg-node` = node, `x-fedagg-timestamp` = ts, `x-fedagg-nonce` = nonce,
           `x-fedagg-content-sha256` = digest, `x-fedagg-round` = format(round, scientific = FALSE),
           `x-fedagg-task` = task, `x-fedagg-signature` = sig, `content-length` = length(body))
    for (n in names(headers)) {
      if (is.null(headers[[n]])) h <- h[names(h) != n] else h[[n]] <- headers[[n]]
    }
    raw_http(port, method, path, h, body)
  }
  info <- fedagg:::call_rust(fedagg:::rs_node_info(ids[1], 40, FALSE, character(), 0))
  expect_identical(request("POST", "/v1/join", info)$status, 200L)
  task <- request("GET", "/v1/task")
  expect_identical(task$status, 200L)
  up <- function(body = good, task = tasks, ...) request("POST", "/v1/update", body, round = 1, task = task, ...)$status
  nan <- good
  nan[length(nan) - 7:0] <- writeBin(NaN, raw(), size = 8, endian = "little")
  wide <- fedagg:::client_fit(captured[[ids[2]]], local[[ids[2]]]$data_for(model))
  refused <- c(
    unknown_node = request("POST", "/v1/heartbeat", node = "mallory")$status,
    bad_signature = request("POST", "/v1/heartbeat", sign = FALSE)$status,
    other_key = request("POST", "/v1/heartbeat", key = other)$status,
    stale_timestamp = request("POST", "/v1/heartbeat", ts = as.integer(Sys.time()) - 3600L)$status,
    malformed_headers = request("POST", "/v1/heartbeat", headers = list(`x-fedagg-nonce` = "zz"))$status,
    digest_mismatch = up(digest = hex_sha(charToRaw("other"))),
    not_assigned = up(task = "0123456789abcdef01234567"),
    other_round = request("POST", "/v1/update", good, round = 2, task = tasks)$status,
    other_node = up(body = wide),
    non_finite = up(body = nan),
    malformed_body = up(body = charToRaw("garbage")),
    too_large = up(headers = list(`content-length` = "1000000000")),
    length_required = up(headers = list(`content-length` = NULL))
  )
  expected <- c(unknown_node = 401L, bad_signature = 401L, other_key = 401L, stale_timestamp = 401L,
                malformed_headers = 400L, digest_mismatch = 400L, not_assigned = 403L, other_round = 409L,
                other_node = 403L, non_finite = 422L, malformed_body = 422L, too_large = 413L, length_required = 411L)
  expect_identical(refused, expected)
  # A replayed request (same nonce) is refused; a resend with a new nonce
  # is answered the same and counted once.
  nonce <- paste(as.character(openssl::rand_bytes(16)), collapse = "")
  expect_identical(up(nonce = nonce), 200L)
  expect_identical(up(nonce = nonce), 409L)
  expect_identical(up(), 200L)
  kept <- fedagg:::call_rust(fedagg:::rs_net_wait_uploads(handle, 0.5))
  expect_identical(kept$node, ids[1])
  expect_identical(kept$res[[1]], fedagg:::rs_fit_res_read(good))
  # A slow sender is cut off after the header time-out; the server stays up.
  con <- socketConnection("127.0.0.1", port, blocking = TRUE, open = "r+b", timeout = 10)
  writeBin(charToRaw("POST /v1/update HTTP/1.1\r\nhost: x\r\n"), con)
  started <- Sys.time()
  got <- tryCatch(readBin(con, "raw", 1000), error = function(e) raw())
  close(con)
  expect_lt(as.numeric(Sys.time() - started, units = "secs"), 8)
  expect_identical(raw_http(port, "GET", "/healthz")$status, 200L)
  m <- raw_http(port, "GET", "/metrics")$text
  for (reason in c("unknown_node", "bad_signature", "digest_mismatch", "too_large", "replayed_nonce", "non_finite")) {
    expect_match(m, sprintf('fedagg_rejected_total\\{reason="%s"\\} [1-9]', reason), info = reason)
  }
  expect_match(m, "fedagg_updates_received_total 1\n")
  # Nothing reached the server's rounds.
  expect_identical(srv$rounds_done, 0L)
  # A node that joins without validation data cannot take part in a
  # federation weighted by accuracy: said when it joins, naming it.
  priv <- srv$.__enclos_env__$private
  priv$.weights <- "accuracy"
  err <- expect_error(fedagg:::net_sync(priv), class = "fedagg_error_client")
  expect_identical(err$client, ids[1])
  priv$.weights <- "samples"
})

test_that("a node killed mid-federation is a dropout of its round, and rejoins with its saved state", {
  skip_on_cran()
  skip_if_not_installed("callr")
  dir <- withr::local_tempdir()
  data <- synthetic_fedprox(1, 1, n_clients = 3, max_size = 50, seed = 4)
  nodes <- fed_nodes(data)
  ids <- names(nodes)
  keys <- net_keys(dir, ids)
  model <- model_softmax(60, 10)
  procs <- list()
  here <- environment()
  start <- function(g) start_node_processes(dir, nodes, list(ids[g]), url, keys$server, model, env = here)[[1]]
  hooks <- list(
    round_start = function(server, round, clients) if (round == 2) procs[[3]]$kill(),
    round_end = function(server, round, record) if (round == 2) procs[[3]] <<- start(3)
  )
  srv <- fed_server(model, fed_remote_nodes(keys$nodes), fraction = 1, lr = 0.05, seed = 2, algorithm = scaffold(),
                    hooks = hooks)
  srv$listen(keys$server_key, port = 0, round_timeout = 8)
  withr::defer(srv$stop(0))
  url <- srv$url
  procs <- lapply(1:3, start)
  withr::defer(for (p in procs) if (p$is_alive()) p$kill())
  expect_warning(srv$serve(4, wait_timeout = 60, verbose = FALSE, linger = 1.5), class = "fedagg_warning_eval_dropout")
  log <- srv$system_log
  expect_identical(log$status[log$round == 2 & log$client == ids[3]], "dropout")
  expect_identical(as.integer(table(srv$client_log$round)), c(3L, 2L, 3L, 3L))
  for (p in procs) p$wait(10000)
  expect_identical(vapply(procs, function(p) p$get_exit_status(), integer(1)), c(0L, 0L, 0L))
  # The restarted node went on from the state it saved.
  expect_true(file.exists(file.path(dir, "state", paste0(ids[3], ".rds"))))
})

test_that("a server killed with SIGKILL mid-round resumes from its checkpoint to the uninterrupted run's model", {
  skip_on_cran()
  skip_if_not_installed("callr")
  dir <- withr::local_tempdir()
  data <- synthetic_fedprox(1, 1, n_clients = 4, max_size = 50, seed = 6)
  nodes <- fed_nodes(data)
  ids <- names(nodes)
  keys <- net_keys(dir, ids)
  saveRDS(list(keys = keys$nodes, test = pool_clients(data, "test")), file.path(dir, "setup.rds"))
  make <- function(nodes, hooks = list()) {
    fed_server(model_softmax(60, 10), nodes, fraction = 0.75, lr = 0.05, seed = 3, algorithm = scaffold(),
               compress = compress_topk(0.2), test_data = readRDS(file.path(dir, "setup.rds"))$test, hooks = hooks)
  }
  port <- free_port()
  url <- sprintf("http://127.0.0.1:%d", port)
  serve <- function() {
    callr::r_bg(function(dir, port, make) {
      library(fedagg)
      # Round 3 is where the test kills this process: it says so, then
      # waits long enough for that.
      hooks <- list(round_start = function(server, round, clients) {
        writeLines(as.character(round), file.path(dir, "round-started"))
        if (round == 3 && !file.exists(file.path(dir, "killed-once"))) Sys.sleep(30)
      })
      srv <- make(fed_remote_nodes(readRDS(file.path(dir, "setup.rds"))$keys), hooks)
      srv$serve(5, key = file.path(dir, "server.key"), port = port, checkpoint = file.path(dir, "ckpt"),
                round_timeout = 30, verbose = TRUE, linger = 2)
      saveRDS(list(params = srv$params, history = srv$history, client_log = srv$client_log),
              file.path(dir, "final.rds"))
    }, args = list(dir = dir, port = port, make = make), stdout = file.path(dir, "server.out"), stderr = "2>&1",
    supervise = TRUE)
  }
  first <- serve()
  withr::defer(if (first$is_alive()) first$kill())
  procs <- start_node_processes(dir, nodes, list(ids[1:2], ids[3:4]), url, keys$server, model_softmax(60, 10))
  wait_for(function() file.exists(file.path(dir, "round-started")) &&
             identical(readLines(file.path(dir, "round-started")), "3"), 90, "round 3")
  Sys.sleep(0.3)
  first$kill()
  expect_false(first$is_alive())
  writeLines("yes", file.path(dir, "killed-once"))
  expect_true(file.exists(file.path(dir, "ckpt", "server.rds")))
  second <- serve()
  withr::defer(if (second$is_alive()) second$kill())
  second$wait(120000)
  out <- paste(readLines(file.path(dir, "server.out")), collapse = "\n")
  expect_identical(second$get_exit_status(), 0L, info = out)
  expect_match(out, "Resumed from")
  for (p in procs) p$wait(20000)
  final <- readRDS(file.path(dir, "final.rds"))
  uninterrupted <- make(nodes)
  uninterrupted$fit(5, verbose = FALSE)
  expect_identical(final$params, uninterrupted$params)
  expect_identical(final$history, uninterrupted$history)
  expect_identical(final$client_log, uninterrupted$client_log)
})

test_that("over TLS the federation is the same; a node refuses answers its server did not sign", {
  skip_on_cran()
  skip_if_not_installed("callr")
  data <- synthetic_fedprox(1, 1, n_clients = 3, max_size = 40, seed = 8)
  make <- function(nodes) fed_server(model_softmax(60, 10), nodes, fraction = 1, lr = 0.05, seed = 5)
  simulated <- make(fed_nodes(data))
  simulated$fit(2, verbose = FALSE)
  networked <- run_networked(make, fed_nodes(data), rounds = 2, n_procs = 1, tls = TRUE)
  expect_match(networked$history$round[1] |> as.character(), "1")
  expect_identical(networked$params, simulated$params, info = paste(attr(networked, "node_output"), collapse = "\n"))
  expect_identical(networked$history, simulated$history)

  # A node given another server key (a forged server, or a tampered answer)
  # refuses the first answer and stops.
  dir <- withr::local_tempdir()
  nodes <- fed_nodes(data)
  keys <- net_keys(dir, names(nodes))
  srv <- make(fed_remote_nodes(keys$nodes))
  certs <- fed_tls_selfsigned(file.path(dir, "tls"))
  srv$listen(keys$server_key, port = 0, tls = certs)
  withr::defer(srv$stop(0))
  impostor <- suppressMessages(fed_keygen(file.path(dir, "impostor.key")))
  expect_error(fed_join(nodes[[1]], srv$url, srv$model, key = file.path(dir, "client1.key"), server_key = impostor,
                        ca = certs$ca, verbose = FALSE),
               class = "fedagg_error_forged")
  # Plain HTTP to a TLS server, or TLS trusting another CA, never gets in.
  other <- fed_tls_selfsigned(file.path(dir, "other"))
  expect_error(fed_join(nodes[[1]], srv$url, srv$model, key = file.path(dir, "client1.key"), server_key = keys$server,
                        ca = other$ca, max_failures = 1, backoff = c(0.01, 0.01), verbose = FALSE),
               class = "fedagg_error_network")
  expect_error(fed_join(nodes[[1]], "http://10.0.0.1:1", srv$model, key = file.path(dir, "client1.key"),
                        server_key = keys$server, verbose = FALSE), "loopback", class = "fedagg_error_input")
  # Only the first node's join reached the server (its key is good; it is
  # the node that refused the server's answer).
  expect_identical(srv$network$joined, c(TRUE, FALSE, FALSE))
  port <- as.integer(sub(".*:", "", srv$url))
  # Plain HTTP to the TLS port gets no HTTP answer at all.
  expect_true(is.na(suppressWarnings(raw_http(port, "GET", "/healthz", timeout = 2))$status))
})

test_that("200 nodes in 4 processes run 5 rounds on loopback", {
  skip_on_cran()
  skip_if_not_installed("callr")
  set.seed(11)
  n <- 200
  x <- matrix(rnorm(n * 20 * 5), ncol = 5)
  y <- as.integer(x[, 1] + x[, 2] > 0)
  nodes <- fed_nodes(x, y, partition_iid(nrow(x), n, seed = 1))
  make <- function(nodes) fed_server(model_logistic(5), nodes, fraction = 0.1, lr = 0.1, seed = 9)
  simulated <- make(nodes)
  simulated$fit(5, verbose = FALSE)
  networked <- run_networked(make, nodes, rounds = 5, n_procs = 4)
  expect_identical(attr(networked, "node_exit"), rep(0L, 4))
  expect_identical(networked$rounds_done, 5L)
  expect_identical(networked$params, simulated$params)
  expect_identical(nrow(networked$client_log), 100L)
})

test_that("the installed package stays within its size budget", {
  skip_on_cran()
  # R CMD check notes an installed size over 5 MB. The networked federation
  # (hyper, tokio, rustls, ring) took the shared library from 1.4 MB to
  # 3.5 MB and the package to 5.5 MB (bench/README.md says what each part
  # costs): this guards against further growth. The dashboard (an R file,
  # its help and a vignette section) and the CNN layers took it past 5.9 MB.
  root <- system.file(package = "fedagg")
  size <- function(dir) sum(file.size(list.files(file.path(root, dir), recursive = TRUE, full.names = TRUE)))
  expect_lt(size("libs"), 3.8 * 1024^2)
  expect_lt(sum(file.size(list.files(root, recursive = TRUE, full.names = TRUE, all.files = TRUE))), 6.2 * 1024^2)
})
