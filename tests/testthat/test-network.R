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
  robust = list(aggregator = agg_trimmed_mean(0.2), filter = filter_norm(mad = 3))
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
  remote <- fed_server(model_logistic(2), nodes, selection = select_power_of_choice(2))
  expect_error(remote$listen(keys$server_key), class = "fedagg_error_network_unsupported")
  remote <- fed_server(model_logistic(2), nodes, monitor = monitor_drift())
  expect_error(remote$listen(keys$server_key), class = "fedagg_error_network_unsupported")
  remote <- fed_server(model_logistic(2), nodes, weights = function(info) info$n_samples)
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
  expect_identical(raw_http(port, "GET", "/nowhere")$status, 404L)
  expect_identical(srv$network$joined, c(FALSE, FALSE))
  expect_error(srv$listen(keys$server_key), "already listening", class = "fedagg_error_network")
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
    simulated <- make(fed_nodes(data))
    simulated$fit(3, verbose = FALSE)
    networked <- run_networked(make, fed_nodes(data), rounds = 3)
    info <- paste(case, paste(attr(networked, "node_output"), collapse = "\n"))
    expect_identical(attr(networked, "node_exit"), c(0L, 0L, 0L), info = info)
    expect_identical(networked$params, simulated$params, info = info)
    expect_identical(networked$history, simulated$history, info = info)
    expect_identical(networked$client_log, simulated$client_log, info = info)
    expect_identical(networked$server_state, simulated$server_state, info = info)
    expect_identical(networked$system_log$status, simulated$system_log$status, info = info)
  }
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
  tasks <- fedagg:::call_rust(fedagg:::rs_net_post_tasks(handle, 1, 610, ids[1], list(ins)))

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
  expect_identical(kept$body[[1]], good)
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
})
