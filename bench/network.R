# Round overhead of a networked federation on loopback, in one run:
#
#   fedagg, simulated     fed_server(...)$fit(): the nodes in this process
#   fedagg, networked     the server in its own R process ($serve()), each
#                         node in its own R process (fed_join()), plain HTTP
#                         on 127.0.0.1; also 2 processes x 5 nodes
#   Flower deployment     flower-superlink + 10 flower-supernode processes
#                         (--insecure, 127.0.0.1), `flwr run` of the numpy
#                         app in bench/flower_network/
#
# Same data, model and local work everywhere: softmax regression, 10 nodes
# with the same number of samples each, all nodes every round, FedAvg, one
# epoch of plain minibatch SGD (B = 10, lr = 0.05), no evaluation. Per-round
# time is the median gap between consecutive round ends after warm-up
# rounds. Also measured at d = 1e6: the upload throughput of a node (one
# node alone, and ten at once) against a raw loopback copy of the same
# bytes, and the networked server process's peak memory (VmHWM) against
# the updates it buffers (8 * d * 10 bytes).
#
# Usage: Rscript bench/network.R
#   FLWR_VENV   a Python venv with flwr and numpy (default /work/bench-net-venv;
#               without one the Flower rows are NA)
#   BENCH_NET_FLOWER=0   skip Flower
#   BENCH_NET_CASES=610,1e6   only these model sizes
#   BENCH_NET_KEEP=1     keep the logs (Flower's too) and data in the temporary folder
# Every process it starts listens on 127.0.0.1 only and is killed when the
# script ends, on error too.

suppressPackageStartupMessages(library(fedagg))
for (pkg in c("callr", "processx")) {
  if (!requireNamespace(pkg, quietly = TRUE)) stop("bench/network.R needs the package ", pkg, call. = FALSE)
}

`%||%` <- function(x, y) if (is.null(x)) y else x
now <- function() as.numeric(Sys.time())

bench_dir <- local({
  file <- sub("^--file=", "", grep("^--file=", commandArgs(FALSE), value = TRUE))
  if (length(file)) dirname(normalizePath(file[1])) else normalizePath("bench")
})
flower_app <- file.path(bench_dir, "flower_network")
venv <- Sys.getenv("FLWR_VENV", "/work/bench-net-venv")
use_flower <- Sys.getenv("BENCH_NET_FLOWER", "1") != "0"

K <- 10L          # nodes
C <- 10L          # classes
LR <- 0.05
B <- 10L
cases <- data.frame(
  label = c("610", "1e5", "1e6"),
  p = c(60L, 9999L, 99999L),        # d = (p + 1) * 10
  n = c(60L, 20L, 10L),             # samples per node
  warm = c(2L, 2L, 2L),             # fedagg warm-up rounds
  rounds = c(20L, 10L, 6L),         # fedagg timed rounds
  flower_rounds = c(3L, 3L, 2L),    # Flower timed rounds (after 1 warm-up round)
  stringsAsFactors = FALSE
)
cases$d <- (cases$p + 1L) * C
only <- Sys.getenv("BENCH_NET_CASES", "")
if (nzchar(only)) cases <- cases[cases$label %in% strsplit(only, ",")[[1]], , drop = FALSE]

# Every process started here, killed (with its children) on the way out.
procs <- new.env()
procs$all <- list()
keep <- function(p) {
  procs$all[[length(procs$all) + 1L]] <- p
  p
}
kill_all <- function() {
  for (p in procs$all) try(if (p$is_alive()) p$kill_tree(), silent = TRUE)
  # processx's kill_tree also finds the children that left their parent
  # (Flower's SuperExec processes).
  for (p in procs$all) try(p$kill_tree(), silent = TRUE)
  alive <- function() any(vapply(procs$all, function(p) isTRUE(tryCatch(p$is_alive(), error = function(e) FALSE)), logical(1)))
  deadline <- now() + 5
  while (alive() && now() < deadline) Sys.sleep(0.05)
  procs$all <- list()
}

wait_until <- function(what, timeout, cond, every = 0.1) {
  started <- now()
  repeat {
    if (isTRUE(cond())) return(invisible(TRUE))
    if (now() - started > timeout) stop(sprintf("%s: not within %g s", what, timeout), call. = FALSE)
    Sys.sleep(every)
  }
}

# Per-round seconds: gaps between consecutive round ends after `warm`.
per_round <- function(ends, warm) {
  gaps <- diff(ends)
  gaps <- gaps[seq_along(gaps) >= warm]
  c(median = stats::median(gaps), mean = mean(gaps), n = length(gaps))
}

free_ports <- function(n) {
  out <- integer()
  tries <- 0
  while (length(out) < n && tries < 200) {
    tries <- tries + 1
    port <- sample(20000:45000, 1)
    if (port %in% out) next
    ok <- tryCatch({
      s <- serverSocket(port)
      close(s)
      TRUE
    }, error = function(e) FALSE, warning = function(w) FALSE)
    if (ok) out <- c(out, port)
  }
  if (length(out) < n) stop("no free ports")
  out
}

# Data: features N(0, 1), labels from a random softmax model with noise,
# class codes 0-9, `n` rows per node. Written twice: as fedagg Nodes (one
# RDS per node) and as raw files for the Flower app (part<k>_x.f64 row
# major, part<k>_y.i32).
make_data <- function(case, dir) {
  set.seed(20261207 + case$p)
  N <- K * case$n
  x <- matrix(stats::rnorm(N * case$p), N, case$p)
  W <- matrix(stats::rnorm(case$p * C), case$p, C) / sqrt(case$p)
  y <- max.col(x %*% W + matrix(stats::rnorm(N * C, sd = 0.5), N, C)) - 1L
  part <- split(seq_len(N), rep(seq_len(K), each = case$n))
  ids <- sprintf("node%02d", seq_len(K))
  nodes <- fed_nodes(x, y, part, ids = ids)
  dir.create(dir, recursive = TRUE, showWarnings = FALSE)
  for (k in seq_len(K)) {
    saveRDS(nodes[[k]], file.path(dir, paste0(ids[k], ".rds")))
    rows <- part[[k]]
    con <- file(file.path(dir, sprintf("part%02d_x.f64", k - 1L)), "wb")
    writeBin(as.vector(t(x[rows, , drop = FALSE])), con, size = 8, endian = "little")
    close(con)
    con <- file(file.path(dir, sprintf("part%02d_y.i32", k - 1L)), "wb")
    writeBin(as.integer(y[rows]), con, size = 4, endian = "little")
    close(con)
  }
  nodes
}

make_server <- function(p, nodes, hooks) {
  fed_server(model_softmax(p, C), nodes, fraction = 1, epochs = 1, batch_size = B, lr = LR, seed = 1,
             hooks = hooks)
}

run_simulated <- function(case, nodes) {
  ends <- numeric()
  srv <- make_server(case$p, nodes, list(round_end = function(...) ends[list(...)$round] <<- now()))
  srv$fit(case$warm + case$rounds, verbose = FALSE)
  list(per_round = per_round(ends, case$warm), loss = srv$history$train_loss)
}

# The networked server's process: listens, writes its address, serves the
# rounds; returns the round ends and its memory (kB) before and after.
server_main <- function(lib, dir, keys_dir, p, C, ids, warm, rounds, lr, B) {
  .libPaths(lib)
  suppressPackageStartupMessages(library(fedagg))
  mem <- function() {
    s <- readLines("/proc/self/status")
    kb <- function(f) as.numeric(sub("^\\S+:\\s*(\\d+).*$", "\\1", grep(paste0("^", f, ":"), s, value = TRUE)))
    c(rss = kb("VmRSS"), hwm = kb("VmHWM"))
  }
  keys <- utils::read.csv(file.path(keys_dir, "nodes.csv"), colClasses = "character")
  keys <- keys[keys$node %in% ids, ]
  ends <- numeric()
  srv <- fed_server(model_softmax(p, C), fed_remote_nodes(keys), fraction = 1, epochs = 1, batch_size = B, lr = lr,
                    seed = 1, hooks = list(round_end = function(...) ends[list(...)$round] <<- as.numeric(Sys.time())))
  invisible(gc())
  before <- mem()
  srv$listen(file.path(keys_dir, "server.key"), port = 0, round_timeout = 120)
  writeLines(srv$url, file.path(dir, "url.tmp"))
  file.rename(file.path(dir, "url.tmp"), file.path(dir, "url"))
  srv$serve(warm + rounds, wait_timeout = 120, verbose = FALSE, linger = 1.5)
  after <- mem()
  list(ends = ends, timings = srv$timings, before = before, after = after, loss = srv$history$train_loss,
       clients = srv$history$clients)
}

# The simulated server in a process of its own, for its memory: the same
# rounds with no network (its nodes' data are loaded before the baseline).
sim_memory_main <- function(lib, dir, p, C, ids, rounds, lr, B) {
  .libPaths(lib)
  suppressPackageStartupMessages(library(fedagg))
  mem <- function() {
    s <- readLines("/proc/self/status")
    kb <- function(f) as.numeric(sub("^\\S+:\\s*(\\d+).*$", "\\1", grep(paste0("^", f, ":"), s, value = TRUE)))
    c(rss = kb("VmRSS"), hwm = kb("VmHWM"))
  }
  nodes <- stats::setNames(lapply(ids, function(id) readRDS(file.path(dir, paste0(id, ".rds")))), ids)
  srv <- fed_server(model_softmax(p, C), nodes, fraction = 1, epochs = 1, batch_size = B, lr = lr, seed = 1)
  invisible(gc())
  before <- mem()
  srv$fit(rounds, verbose = FALSE)
  list(before = before, after = mem())
}

# A node process: fed_join() for its nodes, with each upload (POST
# /v1/update) timed around the call that makes it (signing, sending, the
# server's checks and its signed answer).
node_main <- function(lib, dir, keys_dir, ids, url, server_pub, p, C, out) {
  .libPaths(lib)
  suppressPackageStartupMessages(library(fedagg))
  nodes <- lapply(ids, function(id) readRDS(file.path(dir, paste0(id, ".rds"))))
  ns <- asNamespace("fedagg")
  request <- get("rs_net_request", envir = ns)
  ups <- new.env()
  ups$rows <- list()
  timed <- function(client, method, path, round, task, body, timeout) {
    t0 <- as.numeric(Sys.time())
    r <- request(client, method, path, round, task, body, timeout)
    if (identical(path, "/v1/update")) {
      ups$rows[[length(ups$rows) + 1L]] <- c(round = round, start = t0, seconds = as.numeric(Sys.time()) - t0,
                                             bytes = length(body))
    }
    r
  }
  unlockBinding("rs_net_request", ns)
  assign("rs_net_request", timed, envir = ns)
  lockBinding("rs_net_request", ns)
  log <- fed_join(nodes, url, model_softmax(p, C), key = file.path(keys_dir, paste0(ids, ".key")),
                  server_key = server_pub, poll = 1, timeout = 120, verbose = FALSE)
  saveRDS(list(log = log, uploads = do.call(rbind, ups$rows)), out)
  invisible(NULL)
}

run_networked <- function(case, data_dir, keys_dir, groups, rounds = case$rounds, warm = case$warm) {
  run_dir <- tempfile("run", tmpdir = data_dir)
  dir.create(run_dir)
  lib <- .libPaths()
  ids <- unlist(groups, use.names = FALSE)
  server <- keep(callr::r_bg(server_main, args = list(lib = lib, dir = run_dir, keys_dir = keys_dir, p = case$p, C = C,
                                                      ids = ids, warm = warm, rounds = rounds, lr = LR, B = B),
                             stdout = file.path(run_dir, "server.out"), stderr = "2>&1", supervise = TRUE))
  wait_until("the server's address", 60, function() file.exists(file.path(run_dir, "url")) || !server$is_alive())
  if (!file.exists(file.path(run_dir, "url"))) {
    stop("the server process ended before listening:\n", paste(readLines(file.path(run_dir, "server.out")), collapse = "\n"))
  }
  url <- readLines(file.path(run_dir, "url"))
  server_pub <- readLines(file.path(keys_dir, "server.pub"))
  nodes <- lapply(seq_along(groups), function(g) {
    keep(callr::r_bg(node_main, args = list(lib = lib, dir = data_dir, keys_dir = keys_dir, ids = groups[[g]], url = url,
                                            server_pub = server_pub, p = case$p, C = C,
                                            out = file.path(run_dir, sprintf("node-%d.rds", g))),
                     stdout = file.path(run_dir, sprintf("node-%d.out", g)), stderr = "2>&1", supervise = TRUE))
  })
  started <- now()
  server$wait(300 * 1000)
  if (server$is_alive()) stop("the networked run did not end within 300 s")
  res <- tryCatch(server$get_result(), error = function(e) {
    stop("the server process failed: ", conditionMessage(e), "\n",
         paste(utils::tail(readLines(file.path(run_dir, "server.out")), 20), collapse = "\n"), call. = FALSE)
  })
  for (p in nodes) p$wait(30 * 1000)
  outs <- lapply(seq_along(groups), function(g) {
    f <- file.path(run_dir, sprintf("node-%d.rds", g))
    if (!file.exists(f)) {
      warning("node process ", g, " left no result:\n", paste(utils::tail(readLines(file.path(run_dir, sprintf("node-%d.out", g))), 10), collapse = "\n"))
      return(NULL)
    }
    readRDS(f)
  })
  for (p in c(list(server), nodes)) if (p$is_alive()) p$kill_tree()
  ups <- do.call(rbind, lapply(outs, `[[`, "uploads"))
  res$per_round <- per_round(res$ends, warm)
  res$uploads <- ups
  res$wall <- now() - started
  res
}

# Flower: one SuperLink and K SuperNodes for all cases, one `flwr run` per
# case. Returns per-round seconds per case (NA where it failed) and notes.
run_flower <- function(cases, dirs, work) {
  bin <- file.path(venv, "bin")
  out <- list(per_round = rep(NA_real_, nrow(cases)), peak_kib = rep(NA_real_, nrow(cases)), notes = character(),
              version = NA_character_, numpy = NA_character_)
  if (!file.exists(file.path(bin, "flower-superlink"))) {
    out$notes <- sprintf("no Flower: %s not found (set FLWR_VENV)", file.path(bin, "flower-superlink"))
    return(out)
  }
  home <- file.path(work, "flwr-home")
  dir.create(home, showWarnings = FALSE)
  # R puts its own library path (with the system's libpython) in
  # LD_LIBRARY_PATH; a venv of another Python build would load the wrong
  # libpython (`undefined symbol: _PyModule_Add` in _ssl).
  env <- c("current", PATH = paste(bin, Sys.getenv("PATH"), sep = ":"), LD_LIBRARY_PATH = "", FLWR_HOME = home,
           FLWR_TELEMETRY_ENABLED = "0", FLWR_DISABLE_UPDATE_CHECK = "1", PYTHONUNBUFFERED = "1")
  out$version <- trimws(processx::run(file.path(bin, "flwr"), "--version", env = env, timeout = 60)$stdout)
  out$numpy <- trimws(processx::run(file.path(bin, "python"), c("-c", "import numpy; print(numpy.__version__)"),
                                    env = env, timeout = 60)$stdout)
  ports <- free_ports(K + 1L)
  log_of <- function(name) file.path(work, paste0(name, ".log"))
  started <- now()
  link <- keep(processx::process$new(file.path(bin, "flower-superlink"),
                                     c("--insecure", "--disable-runtime-dependency-installation",
                                       "--host", "127.0.0.1", "--port", ports[1]),
                                     env = env, stdout = log_of("superlink"), stderr = "2>&1", cleanup_tree = TRUE,
                                     supervise = TRUE))
  wait_until("flower-superlink", 90, function() {
    any(grepl("Uvicorn running", readLines(log_of("superlink"), warn = FALSE))) || !link$is_alive()
  }, every = 0.2)
  if (!link$is_alive()) stop("flower-superlink ended:\n", paste(readLines(log_of("superlink")), collapse = "\n"))
  for (k in seq_len(K)) {
    keep(processx::process$new(file.path(bin, "flower-supernode"),
                               c("--insecure", "--superlink", paste0("127.0.0.1:", ports[1]), "--host", "127.0.0.1",
                                 "--port", ports[k + 1L], "--node-config", sprintf("partition-id=%d", k - 1L)),
                               env = env, stdout = log_of(sprintf("supernode%02d", k)), stderr = "2>&1",
                               cleanup_tree = TRUE, supervise = TRUE))
  }
  wait_until("10 flower-supernodes registered", 120, function() {
    all(vapply(seq_len(K), function(k) any(grepl("SuperNode ID", readLines(log_of(sprintf("supernode%02d", k)), warn = FALSE))),
               logical(1)))
  }, every = 0.5)
  out$notes <- c(out$notes, sprintf("Flower start-up (SuperLink + %d SuperNodes registered): %.1f s", K, now() - started))
  writeLines(c("[superlink]", 'default = "bench"', "", "[superlink.bench]",
               sprintf('address = "127.0.0.1:%d"', ports[1]), "insecure = true"), file.path(home, "config.toml"))
  for (i in seq_len(nrow(cases))) {
    case <- cases[i, ]
    result <- file.path(work, sprintf("flower-%s.txt", case$label))
    total <- 1L + case$flower_rounds
    cfg <- sprintf('num-server-rounds=%d num-nodes=%d n-features=%d n-classes=%d lr=%g batch-size=%d data-dir="%s" out-file="%s"',
                   total, K, case$p, C, LR, B, dirs[i], result)
    t0 <- now()
    run <- processx::run(file.path(bin, "flwr"), c("run", flower_app, "bench", "--stream", "-c", cfg), env = env,
                         timeout = 600, error_on_status = FALSE, stdout = log_of(sprintf("flwr-run-%s", case$label)),
                         stderr = "2>&1")
    lines <- if (file.exists(result)) readLines(result) else character()
    st <- do.call(rbind, lapply(strsplit(grep("^stamp ", lines, value = TRUE), " "), function(f) as.numeric(f[2:3])))
    if (!"done" %in% lines || is.null(st) || nrow(st) < total + 1L) {
      out$notes <- c(out$notes, sprintf("d = %s: `flwr run` did not finish (status %s, %.0f s); see %s", case$label,
                                        format(run$status), now() - t0, log_of(sprintf("flwr-run-%s", case$label))))
      next
    }
    # Stamps at rounds 0..total; round 1 (FAB install, first ClientApps) is
    # the warm-up.
    out$per_round[i] <- stats::median(diff(st[, 2])[-1])
    out$peak_kib[i] <- as.numeric(sub("peak_kib ", "", grep("^peak_kib", lines, value = TRUE)))
    out$notes <- c(out$notes, sprintf("d = %s: `flwr run` took %.1f s for %d rounds; rounds 2-%d: %s s", case$label,
                                      now() - t0, total, total, paste(sprintf("%.2f", diff(st[, 2])[-1]), collapse = ", ")))
  }
  out
}

raw_copy <- function(bytes) {
  py <- if (file.exists(file.path(venv, "bin", "python"))) file.path(venv, "bin", "python") else Sys.which("python3")
  r <- processx::run(py, c(file.path(flower_app, "raw_copy.py"), "--bytes", format(bytes, scientific = FALSE),
                           "--reps", "30"), env = c("current", LD_LIBRARY_PATH = ""), timeout = 120)
  as.numeric(sub('.*"median_s": ([0-9.eE+-]+).*', "\\1", r$stdout))
}

loadavg <- function() tryCatch(paste(strsplit(readLines("/proc/loadavg"), " ")[[1]][1:3], collapse = " "), error = function(e) "?")

fmt_ms <- function(s) ifelse(is.na(s), "NA", sprintf("%.1f", 1000 * s))
fmt_x <- function(x) ifelse(is.na(x), "NA", sprintf("%.2f", x))

main <- function() {
  on.exit(kill_all(), add = TRUE)
  # Outside R's session folder, which R removes on exit (BENCH_NET_KEEP).
  work <- tempfile("bench-net-", tmpdir = dirname(tempdir()))
  dir.create(work)
  if (Sys.getenv("BENCH_NET_KEEP") == "1") {
    on.exit(cat("Logs and data kept in", work, "\n"), add = TRUE)
  } else {
    on.exit(unlink(work, recursive = TRUE), add = TRUE)
  }
  t_start <- now()
  cat(sprintf("fedagg %s, %s, %s; %d cores; load average %s\n", format(packageVersion("fedagg")), R.version.string,
              tryCatch(system2("rustc", "--version", stdout = TRUE), error = function(e) "rustc ?"),
              parallel::detectCores(), loadavg()))

  # Keys: the server's and one per node, shared by all runs.
  keys_dir <- file.path(work, "keys")
  dir.create(keys_dir)
  ids <- sprintf("node%02d", seq_len(K))
  pubs <- vapply(ids, function(id) suppressMessages(fed_keygen(file.path(keys_dir, paste0(id, ".key")))), "")
  writeLines(suppressMessages(fed_keygen(file.path(keys_dir, "server.key"))), file.path(keys_dir, "server.pub"))
  utils::write.csv(data.frame(node = ids, public_key = unname(pubs)), file.path(keys_dir, "nodes.csv"), row.names = FALSE)

  rows <- list()
  dirs <- character()
  extra <- list()
  for (i in seq_len(nrow(cases))) {
    case <- cases[i, ]
    dir <- file.path(work, paste0("d", case$label))
    dirs[i] <- dir
    nodes <- make_data(case, dir)
    sim <- run_simulated(case, nodes)
    rm(nodes)
    invisible(gc())
    cat(sprintf("d = %s: simulated %s ms/round\n", case$label, fmt_ms(sim$per_round[["median"]])))
    net <- tryCatch(run_networked(case, dir, keys_dir, as.list(ids)), error = function(e) {
      message("d = ", case$label, ", networked 10 x 1 failed: ", conditionMessage(e))
      NULL
    })
    kill_all()
    cat(sprintf("d = %s: networked 10 x 1 %s ms/round\n", case$label, fmt_ms(net$per_round[["median"]] %||% NA)))
    net2 <- tryCatch(run_networked(case, dir, keys_dir, split(ids, rep(1:2, each = K / 2))), error = function(e) {
      message("d = ", case$label, ", networked 2 x 5 failed: ", conditionMessage(e))
      NULL
    })
    kill_all()
    cat(sprintf("d = %s: networked 2 x 5 %s ms/round\n", case$label, fmt_ms(net2$per_round[["median"]] %||% NA)))
    rows[[i]] <- list(case = case, sim = sim, net = net, net2 = net2)
    if (case$label == "1e6") {
      # One node alone: uploads without nine others competing for 2 cores.
      one <- tryCatch(run_networked(case, dir, keys_dir, list(ids[1]), rounds = 5L, warm = 1L), error = function(e) {
        message("d = 1e6, single-node run failed: ", conditionMessage(e))
        NULL
      })
      kill_all()
      extra$one <- one
      extra$sim_mem <- tryCatch({
        p <- keep(callr::r_bg(sim_memory_main, args = list(lib = .libPaths(), dir = dir, p = case$p, C = C, ids = ids,
                                                           rounds = case$warm + case$rounds, lr = LR, B = B),
                              supervise = TRUE))
        p$wait(120 * 1000)
        p$get_result()
      }, error = function(e) {
        message("d = 1e6, simulated memory run failed: ", conditionMessage(e))
        NULL
      })
      kill_all()
    }
  }

  flower <- if (use_flower) {
    tryCatch(run_flower(cases, dirs, work), error = function(e) {
      list(per_round = rep(NA_real_, nrow(cases)), notes = paste("Flower failed:", conditionMessage(e)),
           version = NA_character_, numpy = NA_character_)
    })
  } else {
    list(per_round = rep(NA_real_, nrow(cases)), notes = "Flower skipped (BENCH_NET_FLOWER=0)", version = NA, numpy = NA)
  }
  kill_all()

  raw_s <- tryCatch(raw_copy(8e6), error = function(e) NA_real_)

  # The table.
  tab <- do.call(rbind, lapply(seq_along(rows), function(i) {
    r <- rows[[i]]
    sim <- r$sim$per_round[["median"]]
    net <- r$net$per_round[["median"]] %||% NA_real_
    net2 <- r$net2$per_round[["median"]] %||% NA_real_
    fl <- flower$per_round[i]
    data.frame(d = format(r$case$d, big.mark = ","), n_node = r$case$n,
               rounds = sprintf("%d+%d/%d+%d", r$case$warm, r$case$rounds, 1L, r$case$flower_rounds),
               sim_ms = fmt_ms(sim), net10x1_ms = fmt_ms(net), net2x5_ms = fmt_ms(net2), flower_ms = fmt_ms(fl),
               flower_over_net = fmt_x(fl / net), net_over_sim = fmt_x(net / sim), net2x5_over_sim = fmt_x(net2 / sim),
               # The networked rounds must give the simulation's losses exactly.
               same_losses = identical(r$net$loss, r$sim$loss) && identical(r$net2$loss, r$sim$loss),
               stringsAsFactors = FALSE)
  }))
  cat("\nPer-round wall time, median over the timed rounds (rounds: fedagg warm-up+timed / Flower warm-up+timed)\n")
  cat("Flower:", flower$version %||% "NA", " numpy:", flower$numpy %||% "NA", "\n\n")
  print(tab, row.names = FALSE)
  cat("\n")
  for (n in flower$notes) cat("Flower:", n, "\n")

  # (a) uploads at d = 1e6.
  cat("\nUploads at d = 1e6 (FitRes of", format(8e6, big.mark = ","), "+ header bytes; POST /v1/update as the node times it)\n")
  up_rate <- function(u) if (is.null(u) || !nrow(u)) NA_real_ else stats::median(u[, "bytes"] / u[, "seconds"])
  one <- extra$one
  big <- if (any(cases$label == "1e6")) rows[[which(cases$label == "1e6")]]$net
  raw_rate <- 8e6 / raw_s
  one_rate <- up_rate(one$uploads)
  ten_rate <- up_rate(big$uploads)
  # All ten nodes' uploads of a round, from the first start to the last end.
  agg <- if (!is.null(big$uploads)) {
    u <- big$uploads
    stats::median(tapply(seq_len(nrow(u)), u[, "round"], function(k) {
      sum(u[k, "bytes"]) / (max(u[k, "start"] + u[k, "seconds"]) - min(u[k, "start"]))
    }))
  } else NA_real_
  cat(sprintf("  raw loopback copy (Python sockets, 8e6 bytes, median of 30): %.0f MB/s (%.2f ms)\n", raw_rate / 1e6, 1000 * raw_s))
  cat(sprintf("  fedagg, one node alone: %.0f MB/s per upload (median of %d), %.0f%% of raw\n", one_rate / 1e6,
              NROW(one$uploads), 100 * one_rate / raw_rate))
  cat(sprintf("  fedagg, 10 nodes at once: %.0f MB/s per upload (median of %d), %.0f MB/s all together\n",
              ten_rate / 1e6, NROW(big$uploads), agg / 1e6))

  # (b) memory of the networked server process at d = 1e6.
  cat("\nServer process memory at d = 1e6 (VmHWM, the networked server's own R process)\n")
  mem_line <- function(res, k, what) {
    if (is.null(res)) return(cat("  ", what, ": NA\n"))
    d <- 1e6
    buffered <- 8 * d * k / 1024
    peak <- res$after[["hwm"]] - res$before[["rss"]]
    cat(sprintf("  %s: RSS before listening %.0f MB, peak %.0f MB: +%.0f MB = %.1f x 8d; buffered updates 8*d*%d = %.0f MB; excess %.1f x 8d\n",
                what, res$before[["rss"]] / 1024, res$after[["hwm"]] / 1024, peak / 1024, peak / (8 * d / 1024), k,
                buffered / 1024, (peak - buffered) / (8 * d / 1024)))
  }
  mem_line(big, K, "networked, 10 nodes")
  mem_line(one, 1L, "networked, 1 node")
  sm <- extra$sim_mem
  if (!is.null(sm)) {
    peak <- sm$after[["hwm"]] - sm$before[["rss"]]
    cat(sprintf("  simulated, 10 nodes (their data loaded before the baseline): RSS before fit %.0f MB, peak %.0f MB: +%.0f MB = %.1f x 8d\n",
                sm$before[["rss"]] / 1024, sm$after[["hwm"]] / 1024, peak / 1024, peak / (8 * 1e6 / 1024)))
  }
  if (!all(is.na(flower$peak_kib))) {
    cat(sprintf("  (Flower ServerApp process VmHWM: %s MB at d = %s)\n",
                paste(sprintf("%.0f", flower$peak_kib / 1024), collapse = " / "), paste(cases$label, collapse = " / ")))
  }

  # Goals.
  g1 <- if (any(cases$label == "610")) flower$per_round[cases$label == "610"] / (rows[[which(cases$label == "610")]]$net$per_round[["median"]] %||% NA_real_) else NA_real_
  cat("\nGoals\n")
  cat(sprintf("  fedagg networked >= 5x Flower per round at d = 610: %s (%sx)\n",
              if (is.na(g1)) "not measured" else if (g1 >= 5) "met" else "missed", fmt_x(g1)))
  cat(sprintf("  uploads >= 50%% of a raw loopback copy at d = 1e6: %s (%.0f%% alone, %.0f%% with 10 nodes at once)\n",
              if (is.na(one_rate)) "not measured" else if (one_rate >= 0.5 * raw_rate) "met" else "missed",
              100 * one_rate / raw_rate, 100 * ten_rate / raw_rate))
  # Peak above the baseline, in d-vectors (8d bytes), with 1 and 10 updates
  # buffered: buffered + O(d) means 10 more d-vectors for 9 more nodes.
  vec <- function(res) if (is.null(res)) NA_real_ else (res$after[["hwm"]] - res$before[["rss"]]) / (8 * 1e6 / 1024)
  m10 <- vec(big)
  m1 <- vec(one)
  per_node <- (m10 - m1) / (K - 1L)
  cat(sprintf("  server memory at most the buffered updates + O(d) at d = 1e6: %s (peak +%.1f d-vectors with 10 updates buffered, +%.1f with 1: %.1f more per node, where buffering alone costs 1)\n",
              if (is.na(per_node)) "not measured" else if (per_node <= 1.5) "met" else "missed", m10, m1, per_node))
  cat(sprintf("Total %.0f s; load average at the end %s\n", now() - t_start, loadavg()))
  invisible(list(table = tab, rows = rows, flower = flower, one = one))
}

invisible(main())
