# The live dashboard: its status document against the server's own logs,
# the app in a real browser (Debian's headless Chromium) while rounds
# commit, a remote server read with a viewer's key over TLS, and the ways
# it refuses.

dashboard_sim <- function(system = NULL, ...) {
  data <- synthetic_fedprox(0.5, 0.5, n_clients = 10, seed = 3)
  fed_server(model_softmax(60, 10), fed_nodes(data, system = system), fraction = 0.5,
             test_data = pool_clients(data, "test"), seed = 1, ...)
}

# The cells of a Shiny table output's body rows, from the page's source.
table_rows <- function(dom, output) {
  part <- regmatches(dom, regexpr(sprintf("(?s)id=\"%s\".*?</table>", output), dom, perl = TRUE))
  if (!length(part)) return(list())
  rows <- regmatches(part, gregexpr("(?s)<tr>.*?</tr>", part, perl = TRUE))[[1]]
  cells <- lapply(rows, function(r) trimws(gsub("<[^>]+>", "", regmatches(r, gregexpr("(?s)<td[^>]*>.*?</td>", r, perl = TRUE))[[1]])))
  Filter(length, cells)
}

has_plot <- function(dom, id) grepl(sprintf("id=\"%s\"[^>]*>\\s*<img[^>]* src=\"data:image/png;base64,", id), dom)

test_that("the status document is the server's own history and logs", {
  skip_if_not_installed("jsonlite")
  srv <- dashboard_sim(filter = filter_norm(3),
                       system = system_profile(dropout = 0.3, seed = 4))
  priv <- srv$.__enclos_env__$private
  priv$.dashboard <- list(file = withr::local_tempfile(fileext = ".json"), clients_rounds = 3L)
  srv$fit(6, verbose = FALSE)
  doc <- read_status(list(file = priv$.dashboard$file))
  expect_null(doc$server)
  p <- doc$published
  expect_identical(as.integer(p$round), 6L)
  expect_identical(as.integer(p$planned), 6L)
  h <- srv$history
  # JSON numbers are written to round-trip exactly.
  for (col in intersect(names(p$history), names(h))) {
    expect_identical(as.double(p$history[[col]]), as.double(h[[col]]), info = col)
  }
  cl <- as.data.frame(p$clients)
  sys <- srv$system_log
  sys <- sys[sys$round >= 4, ]
  log <- srv$client_log
  expect_setequal(paste(cl$round, cl$client), paste(sys$round, sys$client))
  key <- function(d) paste(d$round, d$client)
  dropped <- sys[sys$status %in% c("dropout", "deadline"), ]
  expect_gt(nrow(dropped), 0)
  expect_true(all(cl$status[match(key(dropped), key(cl))] == "dropped"))
  refused <- log[log$round >= 4 & !log$passed_filter, ]
  expect_gt(nrow(refused), 0)
  expect_true(all(cl$status[match(key(refused), key(cl))] == "filtered"))
  kept <- setdiff(key(sys[sys$status == "kept", ]), key(refused))
  expect_true(all(cl$status[match(kept, key(cl))] == "kept"))
  # A copy of the server does not feed the original's dashboard.
  expect_null(srv$clone(deep = TRUE)$.__enclos_env__$private$.dashboard)
})

test_that("the dashboard follows a simulation in a real browser", {
  skip_on_cran()
  skip_if_not_installed("shiny")
  skip_if_not_installed("png")
  b <- browser_session()
  srv <- dashboard_sim(privacy = dp_central(noise_multiplier = 1, clip = 1))
  dash <- fed_dashboard(srv, open = FALSE, refresh = 0.2)
  withr::defer(dash$stop())
  expect_true(dash$running)
  expect_match(format(dash), "running", fixed = TRUE)
  b$open(dash$url)
  expect_identical(b$wait_text("#round_counter", "^Round 0$"), "Round 0")
  expect_identical(b$text("#dashboard_title"), "fedagg dashboard")
  # The counter advances as rounds commit, without reloading the page.
  srv$fit(3, verbose = FALSE)
  expect_identical(b$wait_text("#round_counter", "^Round 3 of 3$"), "Round 3 of 3")
  srv$fit(2, verbose = FALSE)
  expect_identical(b$wait_text("#round_counter", "^Round 5 of 5$"), "Round 5 of 5")
  # The privacy spent is the history's.
  expect_identical(b$wait_text("#epsilon", "[0-9]"), format(signif(utils::tail(srv$history$epsilon, 1), 3)))
  b$wait_text("#clients_table", "client")
  expect_true(b$wait_present("#metrics_plot img") && b$wait_present("#diagnostics_plot img"))
  dom <- b$source()
  # Both plots are rendered as images.
  expect_true(has_plot(dom, "metrics_plot"))
  expect_true(has_plot(dom, "diagnostics_plot"))
  # The client table: the last 5 rounds' clients, each with its status.
  rows <- table_rows(dom, "clients_table")
  log <- srv$system_log
  expect_length(rows, nrow(log))
  expect_identical(paste(vapply(rows, `[`, "", 1), vapply(rows, `[`, "", 2)),
                   paste(log$round, log$client)[order(-log$round, log$client)])
  expect_true(all(vapply(rows, `[`, "", 3) == "kept"))
  # A screenshot that is not blank: the plots' lines and the tables.
  img <- png::readPNG(b$screenshot(withr::local_tempfile(fileext = ".png")))
  expect_gt(min(dim(img)[1:2]), 500)
  rgb <- round(255 * (img[, , 1] * 65536 + img[, , 2] * 256 + img[, , 3]))
  expect_gt(mean(rgb != max(rgb)), 0.03)
  expect_gt(length(unique(as.vector(rgb))), 20)
  dash$stop()
  expect_false(dash$running)
  # A stopped dashboard is no longer written to.
  expect_null(srv$.__enclos_env__$private$.dashboard)
})

test_that("a remote server is followed over TLS with a viewer's key, and only with it", {
  skip_on_cran()
  skip_if_not_installed("shiny")
  skip_if_not_installed("callr")
  b <- browser_session()
  dir <- withr::local_tempdir()
  data <- synthetic_fedprox(0.5, 0.5, n_clients = 4, seed = 3)
  nodes <- fed_nodes(data)
  keys <- net_keys(dir, names(nodes))
  viewer_pub <- suppressMessages(fed_keygen(file.path(dir, "viewer.key")))
  certs <- fed_tls_selfsigned(file.path(dir, "tls"))
  seen <- list()
  dash <- NULL
  srv <- fed_server(model_softmax(60, 10), fed_remote_nodes(keys$nodes), fraction = 1, seed = 1,
                    hooks = list(round_end = function(server, round, record) {
                      if (round == 2) {
                        # Two refusals the dashboard must count: a node's key
                        # cannot read the status, nor can an unsigned request.
                        node <- fedagg:::rs_net_client(server$url, names(nodes)[1], paste(readLines(file.path(dir, paste0(names(nodes)[1], ".key"))), collapse = "\n"),
                                                       keys$server, paste(readLines(certs$ca), collapse = "\n"), FALSE, 0)
                        seen$node_status <<- fedagg:::rs_net_request(node, "GET", "/v1/status", 0, "", raw(0), 10)$status
                      }
                      if (round %in% c(2, 4)) {
                        seen[[paste0("counter", round)]] <<- b$wait_text("#round_counter", sprintf("^Round %d of 4$", round))
                        b$wait_text("#rejected_table", "unknown_node")
                        b$wait_present("#metrics_plot img")
                        seen[[paste0("round", round)]] <<- b$source()
                        seen[[paste0("nodes", round)]] <<- b$wait_text("#nodes_connected", "of")
                        seen[[paste0("phase", round)]] <<- b$wait_text("#phase", "[a-z]")
                      }
                    }))
  viewers <- data.frame(node = "dashboard", public_key = viewer_pub)
  srv$listen(keys$server_key, port = 0, round_timeout = 60, tls = certs, viewers = viewers)
  withr::defer(srv$stop(0))
  expect_match(srv$url, "^https://")
  dash <- fed_dashboard(url = srv$url, key = file.path(dir, "viewer.key"), server_key = keys$server,
                        ca = certs$ca, open = FALSE, refresh = 0.2)
  withr::defer(dash$stop())
  b$open(dash$url)
  procs <- start_node_processes(dir, nodes, list(names(nodes)), srv$url, keys$server, srv$model,
                                extra = list(ca = certs$ca))
  srv$serve(4, wait_timeout = 60, verbose = FALSE, linger = 0.5)
  expect_identical(seen$node_status, 401L)
  expect_identical(seen$counter2, "Round 2 of 4")
  expect_identical(seen$counter4, "Round 4 of 4")
  expect_identical(seen$nodes4, "4 of 4")
  expect_identical(seen$phase4, "running")
  rejected <- table_rows(seen$round4, "rejected_table")
  reasons <- setNames(as.integer(vapply(rejected, `[`, "", 2)), vapply(rejected, `[`, "", 1))
  expect_identical(reasons[["unknown_node"]], 1L)
  expect_true(has_plot(seen$round4, "metrics_plot"))
  rows <- table_rows(seen$round4, "clients_table")
  expect_length(rows, 4 * 4)
  expect_true(all(vapply(rows, `[`, "", 3) == "kept"))
})

test_that("the dashboard refuses what it cannot use, with classed errors", {
  skip_if_not_installed("shiny")
  skip_if_not_installed("callr")
  dir <- withr::local_tempdir()
  srv <- dashboard_sim()
  expect_error(fed_dashboard(srv, refresh = -1), class = "fedagg_error_input")
  expect_error(fed_dashboard(srv, port = 70000), class = "fedagg_error_input")
  expect_error(fed_dashboard(list()), class = "fedagg_error_input")
  expect_error(fed_dashboard(srv, url = "http://127.0.0.1:1"), class = "fedagg_error_input")
  expect_error(fed_dashboard(), class = "fedagg_error_input")
  expect_error(fed_dashboard(url = "ftp://x"), class = "fedagg_error_input")
  expect_error(fed_dashboard(url = "http://127.0.0.1:1", server_key = "ed25519:x"), class = "fedagg_error_missing_file")
  expect_error(fed_dashboard(url = "http://127.0.0.1:1", key = file.path(dir, "none.key"), server_key = "ed25519:x"),
               class = "fedagg_error_missing_file")
  expect_error(fed_dashboard_app(42), class = "fedagg_error_input")

  # A served federation: a wrong viewer key, a node's id as a viewer's.
  data <- synthetic_fedprox(0.5, 0.5, n_clients = 2, seed = 3)
  keys <- net_keys(dir, names(fed_nodes(data)))
  viewer_pub <- suppressMessages(fed_keygen(file.path(dir, "viewer.key")))
  other_pub <- suppressMessages(fed_keygen(file.path(dir, "other.key")))
  net <- fed_server(model_softmax(60, 10), fed_remote_nodes(keys$nodes), seed = 1)
  expect_error(net$listen(keys$server_key, viewers = data.frame(node = keys$nodes$node[1], public_key = viewer_pub)),
               class = "fedagg_error_input")
  expect_error(net$listen(keys$server_key, viewers = data.frame(node = "v", public_key = "nonsense")),
               class = "fedagg_error_key")
  net$listen(keys$server_key, viewers = data.frame(node = "dashboard", public_key = viewer_pub))
  withr::defer(net$stop(0))
  err <- expect_error(fed_dashboard(url = net$url, key = file.path(dir, "other.key"), server_key = keys$server),
                      class = "fedagg_error_network")
  expect_match(conditionMessage(err), "bad_signature", fixed = TRUE)
  err <- expect_error(fed_dashboard(url = net$url, key = file.path(dir, "viewer.key"), viewer = "someone", server_key = keys$server),
                      class = "fedagg_error_network")
  expect_match(conditionMessage(err), "unknown_node", fixed = TRUE)
  # The server's key is checked: an answer signed by another key is refused.
  expect_error(fed_dashboard(url = net$url, key = file.path(dir, "viewer.key"), server_key = other_pub),
               class = "fedagg_error_forged")
  # A port in use: the served federation's.
  port <- as.integer(sub(".*:", "", net$url))
  expect_error(fed_dashboard(srv, port = port, open = FALSE), class = "fedagg_error_port_in_use")
})
