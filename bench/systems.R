# Benchmark: what the simulated clock and its bookkeeping cost a round.
#
#   Rscript bench/systems.R [rounds]
#
# Workload of issue 10: 10,000 nodes of 200 samples (60 features, 10
# classes), softmax regression, E = 1, B = 32, 1,000 clients per round, on 2
# threads. The same rounds run without device profiles, with profiles (the
# clock: per-client download, compute and upload times, 20 % dropouts, a
# deadline and 1.3x over-selection), and with profiles and top-k 1 %
# compression; the table gives ms per round and the ratio to the plain
# rounds. The clock's own share is the time of system_round() (R) measured
# in the same rounds. Memory: resident growth of a run with profiles against
# one without, over the same rounds (the logs grow with selected clients).
suppressPackageStartupMessages(library(fedagg))

args <- commandArgs(trailingOnly = TRUE)
rounds <- if (length(args)) as.integer(args[1]) else 20L
n_nodes <- 10000L; n_samples <- 200L; dim <- 60L; n_classes <- 10L; per_round <- 1000L

rss_mb <- function() {
  as.numeric(gsub("[^0-9]", "", grep("^VmRSS", readLines("/proc/self/status"), value = TRUE))) / 1024
}

cat(sprintf("fedagg %s | R %s | %d cores | %s\n\n", packageVersion("fedagg"), getRversion(),
            fedagg_threads()$cores, format(Sys.time(), "%Y-%m-%d")))
set.seed(1)
teacher <- matrix(rnorm(dim * n_classes), dim)
make_nodes <- function() {
  set.seed(2)
  lapply(seq_len(n_nodes), function(i) {
    x <- matrix(rnorm(n_samples * dim), n_samples)
    fed_node(x, max.col(x %*% teacher, "first") - 1L, id = sprintf("node%05d", i))
  })
}
plain_nodes <- make_nodes()
timed_nodes <- make_nodes()
set_system(timed_nodes, system_profile(speed = lognormal(2000, 10), download = lognormal(1e6, 10),
                                       upload = lognormal(2e5, 10), dropout = 0.2, seed = 1))
invisible(gc())

# Time spent in the clock itself: system_round() wrapped to add up its time.
clock <- new.env()
clock$seconds <- 0
ns <- asNamespace("fedagg")
original <- get("system_round", ns)
unlockBinding("system_round", ns)
assign("system_round", function(...) {
  t <- proc.time()[["elapsed"]]
  on.exit(clock$seconds <- clock$seconds + proc.time()[["elapsed"]] - t)
  original(...)
}, envir = ns)

run <- function(nodes, ...) {
  srv <- fed_server(model_softmax(dim, n_classes), nodes, fraction = per_round / n_nodes, epochs = 1,
                    batch_size = 32, lr = 0.05, seed = 1, threads = 2, eval_every = 10^6, ...)
  srv$fit(2, verbose = FALSE)
  clock$seconds <- 0
  before <- rss_mb()
  srv$fit(rounds, verbose = FALSE)
  t <- utils::tail(srv$timings, rounds)
  c(ms = 1000 * mean(t$seconds), clock_ms = 1000 * clock$seconds / rounds, mb = rss_mb() - before)
}
deadline <- 1.5
rows <- list(
  "no profiles" = run(plain_nodes),
  "profiles, clock" = run(timed_nodes),
  "clock, deadline, over-selection" = run(timed_nodes, deadline = deadline, over_select = 1.3),
  "clock + top-k 1 %" = run(timed_nodes, compress = compress_topk(0.01))
)
base <- rows[[1]][["ms"]]
out <- data.frame(run = names(rows), ms_per_round = vapply(rows, `[[`, numeric(1), "ms"),
                  vs_plain = vapply(rows, function(r) r[["ms"]] / base, numeric(1)),
                  clock_ms = vapply(rows, `[[`, numeric(1), "clock_ms"),
                  clock_share = sprintf("%.1f%%", 100 * vapply(rows, function(r) r[["clock_ms"]] / r[["ms"]], numeric(1))),
                  rss_growth_mb = vapply(rows, `[[`, numeric(1), "mb"))
cat(sprintf("%d nodes x %d samples, %d clients per round (1.3x selected with over-selection), 2 threads, %d rounds\n",
            n_nodes, n_samples, per_round, rounds))
print(out, row.names = FALSE, digits = 3)
