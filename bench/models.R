# Benchmark: ms per FedAvg round for three model widths, fedagg against the
# same loop in numpy and in PyTorch, all measured in this run.
#
#   R_LIBS=<library with fedagg> Rscript bench/models.R [rounds] [models]
#
# `rounds` (default 20) is the number of timed rounds for the two narrow
# models; the 784-512-10 MLP runs max(1, rounds %/% 5). `models` (or the
# environment variable FEDAGG_BENCH_MODELS) is a comma-separated subset of
# softmax, mlp256, mlp784, e.g. `Rscript bench/models.R 5 softmax,mlp256`.
#
# Workload of the issue: 10 clients x 600 samples, every client trains every
# round (fraction = 1), E = 1 local epoch, minibatches of B = 32, plain SGD
# with lr = 0.05, FedAvg (sample-weighted mean of the client models), float64
# and float32. Models: softmax regression 60-10, MLP 60-256-10 and MLP
# 784-512-10 (ReLU hidden layer, softmax cross-entropy head). Data: Gaussian
# features, labels from a random linear teacher (argmax), seeded; written to
# raw binary files so that the Python peers train on exactly the same data,
# from the same initial model (init_params(model, seed = 1)).
#
# Implementations: fedagg (fed_server(...)$fit()); a plain numpy loop
# (bench/peers/fedavg_numpy.py, BLAS threads set through OPENBLAS/OMP/MKL
# _NUM_THREADS in its environment); PyTorch nn.Linear + optim.SGD
# (bench/peers/fedavg_torch.py, torch.set_num_threads). Python is
# $FEDAGG_BENCH_PYTHON, else /tmp/pyvenv/bin/python if it exists, else
# python3; rows of a missing peer (or of numpy/torch) are skipped with a note.
# fedagg's float32 rows need the `precision` argument of the model
# constructors and are skipped without it.
#
# Timing: each implementation does a warm-up round, then `reps` times runs
# `rounds` rounds from the initial model; ms_per_round is the median of the
# repetitions' elapsed / rounds. Server construction and data loading are not
# timed; evaluation is off inside the timed rounds.
#
# GFLOP/s counts the multiply-adds of the dense layers only (no bias,
# activation, softmax or optimizer step):
#   FLOP per round = clients x samples x epochs x
#                    sum over layers l (in_l x out_l) of
#                    2 in_l out_l (forward) + 2 in_l out_l (weight gradient)
#                    + 2 in_l out_l (input gradient, all layers but the first)
# vs_numpy = numpy ms / this row's ms (same model, threads and precision);
# vs_torch_f64 = torch float64 ms / this row's ms (same model and threads);
# above 1 means this row is faster.
suppressPackageStartupMessages(library(fedagg))

args <- commandArgs(trailingOnly = TRUE)
rounds <- if (length(args) >= 1) as.integer(args[1]) else 20L
if (is.na(rounds) || rounds < 1L) stop("`rounds` must be a whole number >= 1, not ", args[1])
wanted <- strsplit(if (length(args) >= 2) args[2] else Sys.getenv("FEDAGG_BENCH_MODELS", "softmax,mlp256,mlp784"),
                   ",", fixed = TRUE)[[1]]
n_clients <- 10L; n_samples <- 600L; n_classes <- 10L; epochs <- 1L; batch <- 32L; lr <- 0.05
reps <- 3L; thread_counts <- c(1L, 2L)

all_models <- list(
  softmax = list(label = "softmax 60-10", sizes = c(60, 10), rounds = rounds,
                 make = function(...) model_softmax(60, n_classes, ...)),
  mlp256 = list(label = "MLP 60-256-10", sizes = c(60, 256, 10), rounds = rounds,
                make = function(...) model_mlp(60, hidden = 256, n_classes = n_classes, ...)),
  mlp784 = list(label = "MLP 784-512-10", sizes = c(784, 512, 10), rounds = max(1L, rounds %/% 5L),
                make = function(...) model_mlp(784, hidden = 512, n_classes = n_classes, ...))
)
unknown <- setdiff(wanted, names(all_models))
if (length(unknown)) stop("Unknown model(s): ", paste(unknown, collapse = ", "),
                          "; choose from ", paste(names(all_models), collapse = ", "))
models <- all_models[wanted]

flops_per_round <- function(sizes) {
  fan_in <- sizes[-length(sizes)]; fan_out <- sizes[-1]
  per_sample <- sum(4 * fan_in * fan_out) + sum(2 * fan_in[-1] * fan_out[-1])
  n_clients * n_samples * epochs * per_sample
}

# --- Peers: which Python, with which modules -------------------------------
script_dir <- local({
  file_arg <- grep("^--file=", commandArgs(FALSE), value = TRUE)
  if (length(file_arg)) dirname(sub("^--file=", "", file_arg[1])) else "bench"
})
python <- Sys.getenv("FEDAGG_BENCH_PYTHON",
                     if (file.exists("/tmp/pyvenv/bin/python")) "/tmp/pyvenv/bin/python" else "python3")
# A missing interpreter makes system2() warn and return 127: the peer is absent, not an error.
has_module <- function(module) {
  status <- suppressWarnings(tryCatch(
    system2(python, c("-c", shQuote(paste("import", module))), stdout = FALSE, stderr = FALSE),
    error = function(e) 127L))
  identical(as.integer(status), 0L)
}
peer_version <- function(module) {
  suppressWarnings(system2(python, c("-c", shQuote(sprintf("import %s; print(%s.__version__)", module, module))),
                           stdout = TRUE, stderr = FALSE))[1]
}
peers <- c(numpy = "fedavg_numpy.py", torch = "fedavg_torch.py")
available <- vapply(names(peers), function(m) has_module(m) && (m == "numpy" || has_module("numpy")), logical(1))
notes <- character()
for (m in names(peers)[!available]) {
  notes <- c(notes, sprintf("%s rows skipped: `%s` cannot import %s (set FEDAGG_BENCH_PYTHON).", m, python, m))
}
fedagg_f32 <- "precision" %in% names(formals(fedagg::model_mlp)) &&
  "precision" %in% names(formals(fedagg::model_softmax))
if (!fedagg_f32) notes <- c(notes, "fedagg float32 rows skipped: this fedagg has no `precision` argument on its model constructors.")

# Runs a peer script in a child process with its thread count in the environment;
# returns c(ms, accuracy), NA (with a note) if the peer fails.
run_peer <- function(peer, files, sizes, rounds, threads, precision) {
  err <- tempfile()
  on.exit(unlink(err))
  out <- suppressWarnings(system2(
    python,
    c(shQuote(file.path(script_dir, "peers", peers[[peer]])), "--x", shQuote(files$x), "--y", shQuote(files$y),
      "--init", shQuote(files$init), "--sizes", paste(sizes, collapse = ","), "--clients", n_clients,
      "--rounds", rounds, "--reps", reps, "--batch", batch, "--lr", lr, "--threads", threads,
      "--dtype", precision),
    stdout = TRUE, stderr = err,
    env = sprintf("%s=%d", c("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"), threads)))
  ms <- suppressWarnings(as.numeric(out[1]))
  if (!is.null(attr(out, "status")) || !length(out) || is.na(ms)) {
    notes <<- c(notes, sprintf("%s %s, %d thread(s) failed: %s", peer, precision, threads,
                               paste(utils::tail(readLines(err), 3), collapse = " | ")))
    return(c(ms = NA, accuracy = NA))
  }
  acc_line <- grep("^accuracy ", readLines(err), value = TRUE)
  c(ms = ms, accuracy = if (length(acc_line)) as.numeric(sub("^accuracy ", "", acc_line[1])) else NA)
}

# fedagg: a fresh server per repetition (so each starts from the initial
# model), built outside the timed part; only fit() is timed.
run_fedagg <- function(model, nodes, x, y, rounds, threads) {
  make_server <- function() fed_server(model, nodes, fraction = 1, epochs = epochs, batch_size = batch, lr = lr,
                                       seed = 1, threads = threads, eval_every = 10^6)
  make_server()$fit(1, verbose = FALSE) # warm-up (also builds the nodes' Rust copies once)
  times <- numeric(reps)
  for (i in seq_len(reps)) {
    srv <- make_server()
    times[i] <- system.time(srv$fit(rounds, verbose = FALSE))[["elapsed"]]
  }
  c(ms = 1000 * stats::median(times) / rounds, accuracy = mean(srv$predict(x, "class") == y))
}

# --- Data: one seeded set per input width, shared by every implementation ---
make_data <- function(n_features, seed = 42) {
  set.seed(seed)
  n <- n_clients * n_samples
  x <- matrix(rnorm(n * n_features), n, n_features)
  teacher <- matrix(rnorm(n_features * n_classes), n_features, n_classes)
  list(x = x, y = max.col(x %*% teacher, "first") - 1L)
}
write_files <- function(data, model) {
  files <- list(x = tempfile(fileext = ".f64"), y = tempfile(fileext = ".i32"), init = tempfile(fileext = ".f64"))
  writeBin(as.double(data$x), files$x)                         # column-major, as R stores it
  writeBin(as.integer(data$y), files$y, size = 4L)
  writeBin(as.double(unlist(init_params(model, seed = 1))), files$init) # W1 (in x out), b1, W2, b2, ...
  files
}

# The 2-thread rows need an idle second core: other work on the machine shows in the load average.
load <- if (file.exists("/proc/loadavg")) paste(strsplit(readLines("/proc/loadavg"), " ")[[1]][1:3], collapse = " ") else "?"
cat(sprintf("fedagg %s | R %s | %d cores | load average %s | %s\n", packageVersion("fedagg"), getRversion(),
            fedagg_threads()$cores, load, format(Sys.time(), "%Y-%m-%d %H:%M")))
cat(sprintf("Python: %s%s%s\n", python,
            if (available[["numpy"]]) paste(" | numpy", peer_version("numpy")) else "",
            if (available[["torch"]]) paste(" | torch", peer_version("torch")) else ""))
cat(sprintf("FedAvg, %d clients x %d samples, fraction = 1, E = %d, B = %d, SGD lr = %s, %d repetitions\n\n",
            n_clients, n_samples, epochs, batch, format(lr), reps))

rows <- list()
data_cache <- list()
for (key in names(models)) {
  spec <- models[[key]]
  width <- as.character(spec$sizes[1])
  if (is.null(data_cache[[width]])) data_cache[[width]] <- make_data(spec$sizes[1])
  data <- data_cache[[width]]
  files <- write_files(data, spec$make())
  nodes <- fed_nodes(data$x, data$y, split(seq_len(nrow(data$x)), rep(seq_len(n_clients), each = n_samples)))
  for (threads in thread_counts) {
    for (precision in c("float64", "float32")) {
      add <- function(impl, res) {
        rows[[length(rows) + 1L]] <<- data.frame(model = spec$label, implementation = impl, threads = threads,
                                                 precision = precision, ms_per_round = res[["ms"]],
                                                 accuracy = res[["accuracy"]])
      }
      if (precision == "float64" || fedagg_f32) {
        model <- if (precision == "float64") spec$make() else spec$make(precision = "float32")
        add("fedagg", run_fedagg(model, nodes, data$x, data$y, spec$rounds, threads))
      }
      for (peer in names(peers)[available]) {
        add(peer, run_peer(peer, files, spec$sizes, spec$rounds, threads, precision))
      }
      cat(".")
    }
  }
  unlink(unlist(files))
}
cat("\n\n")

results <- do.call(rbind, rows)
results$GFLOP_s <- NA_real_
for (key in names(models)) {
  in_model <- results$model == models[[key]]$label
  results$GFLOP_s[in_model] <- flops_per_round(models[[key]]$sizes) / (results$ms_per_round[in_model] / 1000) / 1e9
}
lookup <- function(impl, same_precision) {
  vapply(seq_len(nrow(results)), function(i) {
    hit <- results$model == results$model[i] & results$implementation == impl & results$threads == results$threads[i] &
      results$precision == if (same_precision) results$precision[i] else "float64"
    if (any(hit)) results$ms_per_round[hit][1] else NA_real_
  }, numeric(1))
}
results$vs_numpy <- lookup("numpy", TRUE) / results$ms_per_round
results$vs_torch_f64 <- lookup("torch", FALSE) / results$ms_per_round

for (key in names(models)) {
  spec <- models[[key]]
  cat(sprintf("%-15s %s FLOP per sample, %.3f GFLOP per round, %d timed rounds\n", spec$label,
              format(flops_per_round(spec$sizes) / (n_clients * n_samples * epochs), big.mark = ","),
              flops_per_round(spec$sizes) / 1e9, spec$rounds))
}
cat("\n")
shown <- results[, c("model", "implementation", "threads", "precision", "ms_per_round", "GFLOP_s",
                     "vs_numpy", "vs_torch_f64")]
options(width = 150)
print(format(shown, digits = 3), row.names = FALSE)

# Same algorithm, data and initial model: the training accuracies should agree
# (they differ only by the minibatch orders, and by rounding in float32).
cat("\nSanity check, training accuracy after the timed rounds (1 thread):\n")
for (key in names(models)) {
  one <- results[results$model == models[[key]]$label & results$threads == 1L, ]
  cat(sprintf("  %-15s %s\n", models[[key]]$label,
              paste(sprintf("%s %s %.3f", one$implementation, sub("loat", "", one$precision), one$accuracy),
                    collapse = ", ")))
}
if (file.exists("/proc/loadavg")) {
  notes <- c(notes, sprintf("Load average at the end: %s (above ~1 plus this run, other work competed for the cores).",
                            paste(strsplit(readLines("/proc/loadavg"), " ")[[1]][1:3], collapse = " ")))
}
cat("\nNotes:\n", paste0("  ", notes, "\n"), sep = "")
