# Networked federations on loopback for the tests: keys made at test time,
# the server in this process (or in its own), nodes in their own R
# processes, every process killed when the test ends, pass or fail.

net_keys <- function(dir, ids) {
  pubs <- vapply(ids, function(id) suppressMessages(fed_keygen(file.path(dir, paste0(id, ".key")))), character(1))
  server <- suppressMessages(fed_keygen(file.path(dir, "server.key")))
  list(nodes = data.frame(node = ids, public_key = unname(pubs)), server = server,
       server_key = file.path(dir, "server.key"))
}

# Starts one R process per group of nodes, each running fed_join() until
# the federation ends. `nodes`: the Node objects (they travel by file).
start_node_processes <- function(dir, nodes, groups, url, server_pub, model, state = TRUE, extra = list(),
                                 env = parent.frame()) {
  file <- file.path(dir, "nodes.rds")
  saveRDS(nodes, file)
  procs <- lapply(seq_along(groups), function(g) {
    callr::r_bg(function(file, ids, dir, url, pub, model, state, extra) {
      library(fedagg)
      nodes <- readRDS(file)[ids]
      do.call(fed_join, c(list(nodes, url, model, key = file.path(dir, paste0(ids, ".key")), server_key = pub,
                               state_dir = if (state) file.path(dir, "state"), poll = 1, timeout = 30,
                               backoff = c(0.1, 1), verbose = TRUE), extra))
    }, args = list(file = file, ids = groups[[g]], dir = dir, url = url, pub = server_pub, model = model,
                   state = state, extra = extra),
    stdout = file.path(dir, sprintf("node-%d.out", g)), stderr = "2>&1", supervise = TRUE)
  })
  withr::defer(for (p in procs) if (p$is_alive()) p$kill(), envir = env)
  procs
}

# A server made by `make(nodes)` run over the network with its nodes in
# `length(groups)` processes; returns the server after `rounds` rounds.
run_networked <- function(make, nodes, rounds, n_procs = 3, tls = FALSE, ...) {
  dir <- withr::local_tempdir(.local_envir = parent.frame())
  ids <- names(nodes)
  keys <- net_keys(dir, ids)
  srv <- make(fed_remote_nodes(keys$nodes))
  certs <- if (tls) fed_tls_selfsigned(file.path(dir, "tls"))
  srv$listen(keys$server_key, port = 0, round_timeout = 60, tls = certs)
  withr::defer(srv$stop(0), envir = parent.frame())
  groups <- split(ids, rep_len(seq_len(n_procs), length(ids)))
  procs <- start_node_processes(dir, nodes, groups, srv$url, keys$server, srv$model, env = parent.frame(),
                                extra = if (tls) list(ca = certs$ca) else list(), ...)
  srv$serve(rounds, wait_timeout = 60, verbose = FALSE, linger = 1.5)
  for (p in procs) p$wait(20000)
  outs <- vapply(seq_along(groups), function(g) paste(readLines(file.path(dir, sprintf("node-%d.out", g))), collapse = "\n"), "")
  attr(srv, "node_output") <- outs
  attr(srv, "node_exit") <- vapply(procs, function(p) p$get_exit_status() %||% NA_integer_, integer(1))
  srv
}

`%||%` <- function(x, y) if (is.null(x)) y else x

# A raw HTTP/1.1 exchange on loopback, written by hand.
raw_http <- function(port, method, path, headers = character(), body = raw(), timeout = 10) {
  con <- socketConnection("127.0.0.1", port, blocking = TRUE, open = "r+b", timeout = timeout)
  on.exit(close(con))
  head <- c(sprintf("%s %s HTTP/1.1", method, path), "host: 127.0.0.1", "connection: close",
            if (length(headers)) paste0(names(headers), ": ", headers))
  writeBin(c(charToRaw(paste0(paste(head, collapse = "\r\n"), "\r\n\r\n")), body), con)
  out <- raw()
  repeat {
    chunk <- tryCatch(readBin(con, "raw", 65536), error = function(e) raw())
    if (!length(chunk)) break
    out <- c(out, chunk)
  }
  text <- rawToChar(out[out != as.raw(0)])
  list(status = as.integer(substr(text, 10, 12)), text = text)
}

# A port nobody listens on now (for a server that must come back on the
# same port after a restart).
free_port <- function() {
  for (i in 1:50) {
    port <- sample(20000:60000, 1)
    s <- tryCatch(serverSocket(port), error = function(e) NULL)
    if (!is.null(s)) {
      close(s)
      return(port)
    }
  }
  stop("no free port")
}

wait_for <- function(condition, timeout = 60, what = "a condition") {
  started <- Sys.time()
  while (!condition()) {
    if (as.numeric(Sys.time() - started, units = "secs") > timeout) stop("timed out waiting for ", what)
    Sys.sleep(0.05)
  }
  invisible(TRUE)
}

# A softmax regression written in plain R as a custom model, its functions
# self-contained (base R only), so that a node's process holds its own copy
# of the code as a real site would.
custom_softmax <- function(p, k, name = "softmax_in_r") {
  env <- new.env(parent = baseenv())
  local(envir = env, {
    scores <- function(params, x) sweep(x %*% params$W, 2, params$b, `+`)
    loss_grad <- function(params, x, y) {
      z <- scores(params, x)
      z <- z - apply(z, 1, max)
      p <- exp(z) / rowSums(exp(z))
      n <- nrow(x)
      rows <- cbind(seq_len(n), y + 1)
      loss <- -mean(log(p[rows]))
      p[rows] <- p[rows] - 1
      p <- p / n
      list(loss = loss, grad = list(W = crossprod(x, p), b = colSums(p)))
    }
  })
  init <- function(seed) list(W = matrix(0, p, k), b = numeric(k))
  environment(init) <- env
  env$p <- p
  env$k <- k
  model_custom(init = init, loss_grad = env$loss_grad, predict = env$scores, n_features = p, n_classes = k, name = name)
}
