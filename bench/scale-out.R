# Scale-out on `future`: a federation's nodes hosted by 1, 2 and 4
# multisession workers on this machine (fed_launch()), against the same
# federation simulated in one process.
#
#   Rscript bench/scale-out.R [n_nodes] [rounds]
#
# Workload: softmax 60 x 10, n_nodes nodes of 600 samples, a quarter of
# them per round, E = 1, B = 10, plain HTTP on loopback. Reported: rounds
# per second, resident memory of the server and of each worker (read from
# /proc while the federation runs), and ratios against 1 worker measured in
# the same run.
suppressPackageStartupMessages(library(fedagg))
args <- commandArgs(trailingOnly = TRUE)
n_nodes <- if (length(args) >= 1) as.integer(args[1]) else 40L
rounds <- if (length(args) >= 2) as.integer(args[2]) else 10L
dim <- 60L
n <- 600L

rss_mb <- function(pid) {
  status <- tryCatch(readLines(sprintf("/proc/%d/status", pid)), error = function(e) character())
  line <- grep("^VmRSS:", status, value = TRUE)
  if (!length(line)) return(NA_real_)
  as.numeric(gsub("[^0-9]", "", line)) / 1024
}

set.seed(1)
x <- matrix(rnorm(n_nodes * n * dim), ncol = dim)
y <- sample(0:9, n_nodes * n, TRUE)
nodes <- fed_nodes(x, y, split(seq_len(n_nodes * n), rep(seq_len(n_nodes), each = n)))
make <- function(nodes, ...) {
  fed_server(model_softmax(dim, 10), nodes, fraction = 0.25, epochs = 1, batch_size = 10, lr = 0.01, seed = 1, ...)
}

sim <- make(nodes)
t_sim <- system.time(sim$fit(rounds, verbose = FALSE))[["elapsed"]]
rows <- list(data.frame(setup = "simulation, 1 process", workers = 0L, rounds_per_s = rounds / t_sim,
                        server_mb = rss_mb(Sys.getpid()), worker_mb = NA_real_, same_params = TRUE))

for (workers in c(1L, 2L, 4L)) {
  # (multisession with one worker would run in this process: one shard on a
  # plan of two workers is one worker process.)
  future::plan(future::multisession, workers = max(2L, workers))
  dir <- tempfile("scale-out-")
  dir.create(dir)
  pubs <- vapply(names(nodes), function(id) suppressMessages(fed_keygen(file.path(dir, paste0(id, ".key")))), "")
  server_pub <- suppressMessages(fed_keygen(file.path(dir, "server.key")))
  worker_mb <- numeric()
  launch <- NULL
  srv <- make(fed_remote_nodes(data.frame(node = names(nodes), public_key = unname(pubs))),
              hooks = list(round_end = function(server, round, record) {
                if (round == rounds + 1L) worker_mb <<- vapply(launch$status()$pid, rss_mb, numeric(1))
              }))
  srv$listen(file.path(dir, "server.key"), port = 0, round_timeout = 120)
  launch <- fed_launch(nodes, srv$url, srv$model, key = dir, server_key = server_pub, workers = workers,
                       poll = 1, timeout = 60, backoff = c(0.1, 1))
  # Rounds start once every node has joined; the first is not timed (the
  # workers' start-up, R's first calls).
  srv$serve(rounds + 1L, wait_timeout = 300, verbose = FALSE, linger = 1.5)
  elapsed <- sum(srv$timings$seconds[-1])
  server_mb <- rss_mb(Sys.getpid())
  launch$wait(120)
  srv$stop(0)
  # The simulation of as many rounds, for the check of identical results.
  check <- make(nodes)
  check$fit(rounds + 1L, verbose = FALSE)
  rows[[length(rows) + 1L]] <- data.frame(setup = sprintf("fed_launch(), %d worker%s", workers, if (workers > 1) "s" else ""),
                                          workers = workers, rounds_per_s = rounds / elapsed, server_mb = server_mb,
                                          worker_mb = mean(worker_mb), same_params = identical(srv$params, check$params))
  future::plan(future::sequential)
  unlink(dir, recursive = TRUE)
}
out <- do.call(rbind, rows)
base <- out$rounds_per_s[out$workers == 1L]
out$vs_1_worker <- out$rounds_per_s / base
cat(sprintf("fedagg %s | R %s | %d cores | %s\n", utils::packageVersion("fedagg"), getRversion(),
            parallel::detectCores(), format(Sys.time(), "%Y-%m-%d %H:%M")))
cat(sprintf("%d nodes x %d samples, softmax %d x 10, a quarter per round, E = 1, B = 10, %d timed rounds\n\n",
            n_nodes, n, dim, rounds))
print(format(out, digits = 3), row.names = FALSE)
