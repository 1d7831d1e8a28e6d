# The R share of a round, before and after a change: two builds of fedagg
# in separate R processes, alternately, in one session (same CPU).
#
#   Rscript bench/r-share.R OLD_LIB [NEW_LIB] [repeats]
#
# OLD_LIB / NEW_LIB: library folders holding an installed fedagg ("" = the
# default library); see bench/compare-builds.R for making OLD_LIB.
# Workloads (softmax 60 x 10, E = 1, B = 32, plain SGD, FedAvg, 1 thread,
# no evaluation in the timed rounds):
#   steady     1,000 nodes x 200 samples, 100 per round, 30 timed rounds
#              after 20 warm-up rounds (the nodes have all trained before)
#   first      10,000 nodes x 200 samples, 100 per round, 30 timed rounds
#              after 2 warm-up rounds (most clients train for the first time)
# For each: ms per round and the share of it spent outside the Rust core's
# round call (`server$timings`).
args <- commandArgs(trailingOnly = TRUE)
if (!length(args)) stop("usage: Rscript bench/r-share.R OLD_LIB [NEW_LIB] [repeats]")
libs <- c(before = args[1], after = if (length(args) >= 2) args[2] else "")
repeats <- if (length(args) >= 3) as.integer(args[3]) else 2L

one_build <- function(lib, n_nodes, warm) {
  suppressPackageStartupMessages(library(fedagg, lib.loc = if (nzchar(lib)) lib else NULL))
  set.seed(1)
  dim <- 60L
  teacher <- matrix(rnorm(dim * 10), dim)
  nodes <- lapply(seq_len(n_nodes), function(i) {
    x <- matrix(rnorm(200 * dim), 200)
    fed_node(x, max.col(x %*% teacher, "first") - 1L, id = sprintf("node%05d", i))
  })
  srv <- fed_server(model_softmax(dim, 10), nodes, fraction = 100 / n_nodes, epochs = 1, batch_size = 32, lr = 0.05,
                    seed = 1, threads = 1, eval_every = 10^6)
  srv$fit(warm, verbose = FALSE)
  srv$fit(30, verbose = FALSE)
  t <- utils::tail(srv$timings, 30)
  c(ms = 1000 * mean(t$seconds), r_share = 1 - sum(t$core_seconds) / sum(t$seconds))
}

rows <- list()
for (workload in c("steady", "first")) {
  for (r in seq_len(repeats)) {
    for (build in names(libs)) {
      out <- callr::r(one_build, list(libs[[build]], if (workload == "steady") 1000L else 10000L,
                                      if (workload == "steady") 20L else 2L))
      rows[[length(rows) + 1L]] <- data.frame(workload = workload, build = build, repeat_no = r,
                                              ms_per_round = out[["ms"]], r_share = out[["r_share"]])
    }
  }
}
out <- do.call(rbind, rows)
print(transform(out, r_share = sprintf("%.0f%%", 100 * r_share)), row.names = FALSE, digits = 3)
cat("\n")
for (workload in unique(out$workload)) {
  w <- out[out$workload == workload, ]
  cat(sprintf("%-6s after / before, ms per round: %.3f; R share %.0f%% -> %.0f%%\n", workload,
              mean(w$ms_per_round[w$build == "after"]) / mean(w$ms_per_round[w$build == "before"]),
              100 * mean(w$r_share[w$build == "before"]), 100 * mean(w$r_share[w$build == "after"])))
}
