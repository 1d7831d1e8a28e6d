# Benchmark: ms per FedAvg round of the NIID-Bench CNN, fedagg against
# PyTorch's CPU build, same data and same initial model, in this run.
#
#   Rscript bench/cnn.R [rounds] [reps]
#
# Workload: 10 clients x 600 Fashion-MNIST training images, every client
# every round, E = 1, minibatches of B = 64 in row order, plain SGD with
# lr = 0.01, FedAvg. The network of bench/niid-bench.R (conv 6@5x5, ReLU, max
# pool 2, conv 16@5x5, ReLU, max pool 2, dense 120, ReLU, dense 84, ReLU,
# dense 10). float64 and float32, 1 and 2 threads (fedagg: clients in
# parallel; torch: intra-op threads, clients in turn).
#
# Timing: a warm-up round, then `reps` (default 3) repetitions of `rounds`
# (default 2) rounds from the initial model; ms_per_round is the median.
# vs_torch = torch ms / fedagg ms at the same precision and threads (above 1:
# fedagg faster). Goals (issue 19): float64 >= 1, float32 >= 0.8.
#
# Cross-check: after the timed rounds in float64, the largest difference
# between fedagg's and torch's parameters (same arithmetic up to the order
# of sums; shown as max_param_gap).
#
# Python: $FEDAGG_BENCH_PYTHON, else /tmp/torchenv/bin/python, else python3.
suppressPackageStartupMessages(library(fedagg))
args <- commandArgs(trailingOnly = TRUE)
rounds <- if (length(args) >= 1) as.integer(args[1]) else 2L
reps <- if (length(args) >= 2) as.integer(args[2]) else 3L
n_clients <- 10L; per <- 600L; batch <- 64L; lr <- 0.01
python <- Sys.getenv("FEDAGG_BENCH_PYTHON", if (file.exists("/tmp/torchenv/bin/python")) "/tmp/torchenv/bin/python" else "python3")
script_dir <- local({
  file_arg <- grep("^--file=", commandArgs(FALSE), value = TRUE)
  if (length(file_arg)) dirname(sub("^--file=", "", file_arg[1])) else "bench"
})

fm <- load_fashion_mnist()
n <- n_clients * per
x <- fm$train$x[seq_len(n), ]
y <- as.integer(fm$train$y[seq_len(n)]) - 1L
nodes <- fed_nodes(x, y, split(seq_len(n), rep(seq_len(n_clients), each = per)))
lenet <- function(precision) {
  model_cnn(c(28, 28, 1), list(conv(6, 5), relu(), max_pool(2), conv(16, 5), relu(), max_pool(2), dense(120), relu(),
                               dense(84), relu()), n_classes = 10, precision = precision)
}
init <- unlist(init_params(lenet("float64"), seed = 1), use.names = FALSE)
files <- list(x = tempfile(), y = tempfile(), init = tempfile())
writeBin(as.double(t(x)), files$x)
writeBin(as.double(y), files$y)
writeBin(init, files$init)

run_fedagg <- function(precision, threads) {
  make <- function() fed_server(lenet(precision), nodes, fraction = 1, epochs = 1, batch_size = batch, lr = lr,
                                shuffle = FALSE, seed = 1, threads = threads, eval_every = 10^6,
                                params = relist(init, init_params(lenet(precision), seed = 1)))
  make()$fit(1, verbose = FALSE)
  times <- numeric(reps)
  for (i in seq_len(reps)) {
    srv <- make()
    times[i] <- system.time(srv$fit(rounds, verbose = FALSE))[["elapsed"]]
  }
  list(ms = 1000 * stats::median(times) / rounds, params = unlist(srv$params, use.names = FALSE))
}

run_torch <- function(precision, threads) {
  out <- tempfile()
  res <- suppressWarnings(system2(python, c(shQuote(file.path(script_dir, "peers", "cnn_torch.py")),
    "--x", files$x, "--y", files$y, "--init", files$init, "--clients", n_clients, "--rounds", rounds,
    "--reps", reps, "--batch", batch, "--lr", lr, "--dtype", precision, "--threads", threads, "--out", out),
    stdout = TRUE, stderr = FALSE, env = sprintf("%s=%d", c("OMP_NUM_THREADS", "MKL_NUM_THREADS"), threads)))
  ms <- suppressWarnings(as.numeric(res[1]))
  list(ms = ms, params = if (file.exists(out)) readBin(out, "double", length(init)) else NULL)
}

rows <- list()
for (precision in c("float64", "float32")) for (threads in 1:2) {
  f <- run_fedagg(precision, threads)
  tr <- run_torch(precision, threads)
  gap <- if (precision == "float64" && !is.null(tr$params)) max(abs(f$params - tr$params)) else NA
  rows[[length(rows) + 1L]] <- data.frame(precision = precision, threads = threads, fedagg_ms = round(f$ms, 1),
                                          torch_ms = round(tr$ms, 1), vs_torch = round(tr$ms / f$ms, 2),
                                          max_param_gap = signif(gap, 2))
}
tab <- do.call(rbind, rows)
cat(sprintf("CNN FedAvg round: %d clients x %d images, E = 1, B = %d; torch %s; %d rounds x %d reps\n",
            n_clients, per, batch, suppressWarnings(system2(python, c("-c", shQuote("import torch; print(torch.__version__)")), stdout = TRUE))[1],
            rounds, reps))
print(tab, row.names = FALSE)
