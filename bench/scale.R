# Benchmark: the cost of a round as the federation grows, and where it goes.
#
#   Rscript bench/scale.R [rounds] [memory_samples]
#
# Workload of issue 11: 10,000 nodes of 200 samples (60 features, 10
# classes; Gaussian features, labels from a random linear teacher), softmax
# regression, E = 1, B = 32, plain SGD, FedAvg; 10, 100 and 1,000 clients
# per round on 1 and 2 threads, no evaluation inside the timed rounds.
# For each: ms per round, the share of the round spent in R (everything
# outside the Rust core's round call, from `server$timings`), the share
# spent in R's garbage collector (`gc.time()`, which can fall inside the
# core's call too), and the speed-up of 2 threads over 1.
# Then memory: resident memory of 10,000 nodes of `memory_samples` (default
# 600) x 60 features against the raw size of their features (8 bytes a
# value), from the process's VmRSS: after making the data, after building
# the nodes on them, and after a round in which every node trains.
suppressPackageStartupMessages(library(fedagg))

args <- commandArgs(trailingOnly = TRUE)
rounds <- if (length(args) >= 1) as.integer(args[1]) else 30L
memory_samples <- if (length(args) >= 2) as.integer(args[2]) else 600L
n_nodes <- 10000L; n_samples <- 200L; dim <- 60L; n_classes <- 10L

rss_mb <- function() {
  status <- readLines("/proc/self/status")
  as.numeric(gsub("[^0-9]", "", grep("^VmRSS", status, value = TRUE))) / 1024
}

make_nodes <- function(k, n, seed) {
  set.seed(seed)
  teacher <- matrix(rnorm(dim * n_classes), dim)
  lapply(seq_len(k), function(i) {
    x <- matrix(rnorm(n * dim), n)
    fed_node(x, max.col(x %*% teacher, "first") - 1L, id = sprintf("node%05d", i))
  })
}

cat(sprintf("fedagg %s | R %s | %d cores | %s\n\n", packageVersion("fedagg"), getRversion(),
            fedagg_threads()$cores, format(Sys.time(), "%Y-%m-%d")))

# Memory first, from a fresh R heap: freed memory that R keeps would hide growth.
# The data are made first (as a user's would be), then the nodes from them,
# so that fedagg's own cost shows apart from how the data were made.
before <- rss_mb()
set.seed(2)
teacher <- matrix(rnorm(dim * n_classes), dim)
raw <- lapply(seq_len(n_nodes), function(i) {
  x <- rnorm(memory_samples * dim)
  dim(x) <- c(memory_samples, dim)
  list(x = x, y = max.col(x %*% teacher, "first") - 1L)
})
invisible(gc())
with_data <- rss_mb()
nodes <- lapply(seq_along(raw), function(i) fed_node(raw[[i]]$x, raw[[i]]$y, id = sprintf("node%05d", i)))
rm(raw)
invisible(gc())
built <- rss_mb()
# One round in which every node trains: the Rust core reads the nodes'
# matrices in place, so this must not add a second copy.
invisible(fed_server(model_softmax(dim, n_classes), nodes, fraction = 1, epochs = 1, batch_size = 32, lr = 0.05,
                     seed = 1, threads = 2, eval_every = 10^6)$fit(1, verbose = FALSE))
invisible(gc())
after <- rss_mb()
raw_mb <- n_nodes * memory_samples * dim * 8 / 1024^2
cat(sprintf("\nmemory: %d nodes x %d x %d: raw features %.0f MB\n", n_nodes, memory_samples, dim, raw_mb))
cat(sprintf("  the data as made in R (matrices and integer labels): %.0f MB = %.3fx\n", with_data - before,
            (with_data - before) / raw_mb))
cat(sprintf("  + nodes built on them: %+.0f MB (%.1f KB a node) -> %.3fx the raw size in total\n", built - with_data,
            1024 * (built - with_data) / n_nodes, (built - before) / raw_mb))
cat(sprintf("  after a round training every node: %.0f MB = %.3fx\n", after - before, (after - before) / raw_mb))
rm(nodes); invisible(gc())

nodes <- make_nodes(n_nodes, n_samples, seed = 1)
invisible(gc())

time_rounds <- function(per_round, threads) {
  srv <- fed_server(model_softmax(dim, n_classes), nodes, fraction = per_round / n_nodes, epochs = 1,
                    batch_size = 32, lr = 0.05, seed = 1, threads = threads, eval_every = 10^6)
  srv$fit(2, verbose = FALSE) # warm-up: labels coded once per node
  reps <- max(3L, rounds * 100L %/% per_round)
  reps <- min(reps, rounds)
  gc_before <- gc.time()[[1]]
  srv$fit(reps, verbose = FALSE)
  gc_seconds <- gc.time()[[1]] - gc_before
  t <- utils::tail(srv$timings, reps)
  c(ms = 1000 * sum(t$seconds) / reps, r_share = 1 - sum(t$core_seconds) / sum(t$seconds),
    gc_share = gc_seconds / sum(t$seconds))
}
invisible(gc.time(TRUE))

rows <- list()
for (per_round in c(10L, 100L, 1000L)) {
  one <- time_rounds(per_round, 1L)
  two <- time_rounds(per_round, 2L)
  rows[[length(rows) + 1L]] <- data.frame(
    per_round = per_round, ms_1t = one[["ms"]], ms_2t = two[["ms"]], speedup_2t = one[["ms"]] / two[["ms"]],
    r_share_1t = sprintf("%.0f%%", 100 * one[["r_share"]]), r_share_2t = sprintf("%.0f%%", 100 * two[["r_share"]]),
    gc_share_1t = sprintf("%.0f%%", 100 * one[["gc_share"]]), gc_share_2t = sprintf("%.0f%%", 100 * two[["gc_share"]]))
}
cat(sprintf("%d nodes x %d samples x %d features, softmax; ms per round over the timed rounds\n",
            n_nodes, n_samples, dim))
print(do.call(rbind, rows), row.names = FALSE, digits = 3)

