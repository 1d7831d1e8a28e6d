# Benchmark: rounds to a target accuracy, and final accuracy, of every lever
# of the round pipeline, on the settings of the FedProx paper (Li et al.
# 2020) and on label-skewed Fashion-MNIST. Not a test: a table and a plot.
#
#   Rscript bench/convergence.R [rounds] [output.png] [all|cost]
#
# 1. Synthetic(1,1): 30 clients, 10 per round, E = 20, B = 10, lr = 0.01,
#    with 0% and 90% stragglers. FedAvg drops its stragglers (as in the
#    paper); every other method lets them do partial work (1..E-1 epochs).
# 2. Fashion-MNIST (Debian's dataset-fashion-mnist), split Dirichlet(0.1)
#    over 100 clients, softmax regression, 10 per round, E = 1, B = 32.
# 3. Per-round cost of each algorithm relative to FedAvg on the workload of
#    bench/simulation.R (100 x 600, C = 0.1, E = 1, B = 10).
# Server learning rates of the adaptive optimizers were picked from a small
# grid on Synthetic(1,1) without stragglers (printed below).
suppressPackageStartupMessages(library(fedagg))
args <- commandArgs(trailingOnly = TRUE)
rounds <- if (length(args) >= 1) as.integer(args[1]) else 100L
out_png <- if (length(args) >= 2) args[2] else "bench/convergence.png"
only_cost <- length(args) >= 3 && args[3] == "cost"
cat(sprintf("fedagg %s | R %s | %d cores | %s\n\n", packageVersion("fedagg"), getRversion(),
            fedagg_threads()$cores, format(Sys.time(), "%Y-%m-%d")))

levers <- function(server_lr) list(
  FedAvg = list(),
  FedAvgM = list(server_optimizer = server_sgd(1, momentum = 0.5)),
  FedAdagrad = list(server_optimizer = server_adagrad(server_lr[["adagrad"]])),
  FedAdam = list(server_optimizer = server_adam(server_lr[["adam"]])),
  FedYogi = list(server_optimizer = server_yogi(server_lr[["yogi"]])),
  FedProx = list(algorithm = fedprox(1)),
  SCAFFOLD = list(algorithm = scaffold()),
  FedNova = list(algorithm = fednova())
)

rounds_to <- function(h, target) {
  hit <- which(h$test_accuracy >= target)
  if (length(hit)) h$round[hit[1]] else NA_integer_
}

run <- function(model, nodes, test, settings, extra, n_rounds) {
  args <- c(list(model, nodes, test_data = test, seed = 1, eval_every = 1), settings, extra)
  srv <- do.call(fed_server, args)
  elapsed <- system.time(h <- tryCatch(srv$fit(n_rounds, verbose = FALSE), fedagg_error_diverged = function(e) NULL))
  if (is.null(h)) h <- srv$history
  list(history = h, seconds = elapsed[["elapsed"]])
}

table_of <- function(runs, target) {
  do.call(rbind, lapply(names(runs), function(name) {
    h <- runs[[name]]$history
    data.frame(method = name, rounds_run = nrow(h), final_accuracy = round(utils::tail(h$test_accuracy, 1), 4),
               last10_mean = round(mean(utils::tail(h$test_accuracy, 10)), 4),
               best_accuracy = round(max(h$test_accuracy, na.rm = TRUE), 4),
               rounds_to_target = rounds_to(h, target), mean_cosine = round(mean(h$cosine_mean, na.rm = TRUE), 3),
               seconds = round(runs[[name]]$seconds, 1))
  }))
}

# 1. Synthetic(1,1) -----------------------------------------------------------
synthetic <- synthetic_fedprox(1, 1, n_clients = 30, max_size = 2000, seed = 2026)
syn_nodes <- fed_nodes(synthetic)
syn_test <- pool_clients(synthetic, "test")
syn_model <- model_softmax(60, 10)
syn_settings <- list(fraction = 1 / 3, epochs = 20, batch_size = 10, lr = 0.01)

grid <- c(0.01, 0.03, 0.1, 0.3, 1)
server_lr <- c(adagrad = 1, adam = 0.1, yogi = 0.1) # the grid's choice in the recorded run
for (kind in if (only_cost) character() else c("adagrad", "adam", "yogi")) {
  make <- get(paste0("server_", kind))
  acc <- vapply(grid, function(g) {
    h <- run(syn_model, syn_nodes, syn_test, syn_settings, list(server_optimizer = make(g)), 30)$history
    max(h$test_accuracy, na.rm = TRUE)
  }, numeric(1))
  server_lr[[kind]] <- grid[which.max(acc)]
  cat(sprintf("server lr grid for %s (best test accuracy in 30 rounds): %s -> %s\n", kind,
              paste(sprintf("%s: %.3f", grid, acc), collapse = ", "), format(server_lr[[kind]])))
}
cat("\n")

synthetic_runs <- list()
for (stragglers in if (only_cost) numeric() else c(0, 0.9)) {
  runs <- lapply(levers(server_lr), function(extra) {
    extra <- c(extra, list(stragglers = stragglers, drop_stragglers = FALSE))
    run(syn_model, syn_nodes, syn_test, syn_settings, extra, rounds)
  })
  if (stragglers > 0) {
    runs$FedAvg <- run(syn_model, syn_nodes, syn_test, syn_settings,
                       list(stragglers = stragglers, drop_stragglers = TRUE), rounds)
  }
  synthetic_runs[[sprintf("%d%% stragglers", 100 * stragglers)]] <- runs
  cat(sprintf("Synthetic(1,1), 30 clients, 10 per round, E = 20, B = 10, lr = 0.01, %d%% stragglers, %d rounds\n",
              100 * stragglers, rounds))
  print(table_of(runs, target = 0.75), row.names = FALSE)
  cat("\n")
}

# 2. Fashion-MNIST, Dirichlet(0.1) ---------------------------------------------
fmnist_runs <- NULL
if (only_cost) {
  cat("(cost only)\n\n")
} else if (dir.exists("/usr/share/datasets/fashion-mnist")) {
  fm <- load_fashion_mnist()
  parts <- partition_dirichlet(fm$train$y, n_clients = 100, alpha = 0.1, min_size = 20, seed = 1)
  fm_nodes <- fed_nodes(fm$train$x, fm$train$y, parts)
  fm_model <- model_softmax(784, classes = levels(fm$train$y))
  fm_settings <- list(fraction = 0.1, epochs = 1, batch_size = 32, lr = 0.05)
  fmnist_runs <- lapply(levers(server_lr), function(extra) run(fm_model, fm_nodes, fm$test, fm_settings, extra, rounds))
  cat(sprintf("Fashion-MNIST, Dirichlet(0.1) over 100 clients, softmax regression, 10 per round, E = 1, B = 32, lr = 0.05, %d rounds\n",
              rounds))
  print(table_of(fmnist_runs, target = 0.7), row.names = FALSE)
  cat("\n")
} else {
  cat("Fashion-MNIST: not installed (apt-get install dataset-fashion-mnist); skipped.\n\n")
}

# 3. Per-round cost relative to FedAvg ----------------------------------------
set.seed(7)
n_clients <- 100; n <- 600; dim <- 60
x <- matrix(rnorm(n_clients * n * dim), ncol = dim)
y <- sample(0:9, n_clients * n, TRUE)
cost_nodes <- fed_nodes(x, y, split(seq_len(n_clients * n), rep(seq_len(n_clients), each = n)))
make_cost_server <- function(extra) {
  do.call(fed_server, c(list(model_softmax(dim, 10), cost_nodes, fraction = 0.1, epochs = 1, batch_size = 10,
                             lr = 0.01, seed = 1, eval_every = 10^6), extra))
}
invisible(make_cost_server(list())$fit(1, verbose = FALSE)) # builds the nodes' Rust copies
# Methods measured in turn within each repetition, in a new random order
# each time, so that neither a slow moment of the machine nor a position in
# the sequence favours one of them.
cost_levers <- levers(server_lr)
times <- matrix(NA_real_, length(cost_levers), 9, dimnames = list(names(cost_levers), NULL))
set.seed(1)
for (r in seq_len(ncol(times))) {
  for (name in sample(names(cost_levers))) {
    srv <- make_cost_server(cost_levers[[name]])
    times[name, r] <- system.time(srv$fit(50, verbose = FALSE))[["elapsed"]] / 50 * 1000
  }
}
costs <- apply(times, 1, stats::median)
cost_table <- data.frame(method = names(costs), ms_per_round = round(costs, 2),
                         relative_to_FedAvg = round(costs / costs[["FedAvg"]], 2))
cat("Per-round cost, 100 clients x 600 samples, C = 0.1, E = 1, B = 10 (median of 9 fits of 50 rounds, in random order)\n")
print(cost_table, row.names = FALSE)

# Plot ------------------------------------------------------------------------
if (only_cost) quit(save = "no")
grDevices::png(out_png, width = 1500, height = 480, res = 110)
graphics::par(mfrow = c(1, if (is.null(fmnist_runs)) 2 else 3))
for (name in names(synthetic_runs)) {
  plot(fed_compare(lapply(synthetic_runs[[name]], `[[`, "history")), metric = "test_accuracy",
       main = paste("Synthetic(1,1),", name))
}
if (!is.null(fmnist_runs)) {
  plot(fed_compare(lapply(fmnist_runs, `[[`, "history")), metric = "test_accuracy",
       main = "Fashion-MNIST, Dirichlet(0.1)")
}
invisible(grDevices::dev.off())
cat(sprintf("\nWrote %s\n", out_png))
