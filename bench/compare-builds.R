# Per-round cost of two builds of fedagg on the same workload, run in
# separate R processes, alternately, in one session (so the CPU is the same).
#
#   Rscript bench/compare-builds.R OLD_LIB [NEW_LIB] [repeats]
#
# OLD_LIB / NEW_LIB: library folders holding an installed fedagg ("" = the
# default library). To make OLD_LIB from an earlier commit:
#   git archive <commit> | tar -x -C /tmp/old
#   R CMD INSTALL --library=/tmp/oldlib /tmp/old
# Workload: that of bench/simulation.R (100 clients x 600 samples, 60
# features, 10 classes, C = 0.1, E = 1, B = 10, 50 rounds), median of 7 fits.
args <- commandArgs(trailingOnly = TRUE)
if (!length(args)) stop("usage: Rscript bench/compare-builds.R OLD_LIB [NEW_LIB] [repeats]")
libs <- c(before = args[1], after = if (length(args) >= 2) args[2] else "")
repeats <- if (length(args) >= 3) as.integer(args[3]) else 2L

one_build <- function(lib) {
  suppressPackageStartupMessages(library(fedagg, lib.loc = if (nzchar(lib)) lib else NULL))
  set.seed(7)
  n_clients <- 100; n <- 600; dim <- 60
  x <- matrix(rnorm(n_clients * n * dim), ncol = dim)
  y <- sample(0:9, n_clients * n, TRUE)
  nodes <- fed_nodes(x, y, split(seq_len(n_clients * n), rep(seq_len(n_clients), each = n)))
  make <- function(threads) {
    fed_server(model_softmax(dim, 10), nodes, fraction = 0.1, epochs = 1, batch_size = 10, lr = 0.01,
               seed = 1, threads = threads, eval_every = 10^6)
  }
  invisible(make(1)$fit(1, verbose = FALSE)) # builds the nodes' Rust copies
  vapply(1:2, function(threads) {
    stats::median(replicate(7, {
      srv <- make(threads)
      system.time(srv$fit(50, verbose = FALSE))[["elapsed"]]
    })) / 50 * 1000
  }, numeric(1))
}

rows <- list()
for (r in seq_len(repeats)) {
  for (build in names(libs)) {
    ms <- callr::r(one_build, list(libs[[build]]))
    rows[[length(rows) + 1L]] <- data.frame(build = build, repeat_no = r, ms_1_thread = ms[1], ms_2_threads = ms[2])
  }
}
out <- do.call(rbind, rows)
print(out, row.names = FALSE, digits = 3)
# Medians over the repeats: the VM's speed drifts within a run, and one
# slow stretch must not decide a ratio.
ratio <- function(col) stats::median(out[[col]][out$build == "after"]) / stats::median(out[[col]][out$build == "before"])
cat(sprintf("\nafter / before (medians): 1 thread %.3f, 2 threads %.3f\n", ratio("ms_1_thread"), ratio("ms_2_threads")))
