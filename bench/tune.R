# Does fed_tune() pay? On Synthetic(1,1) with 30 clients and the FedProx
# paper's settings (10 clients per round, E = 20, B = 10, lr = 0.01), the
# default FedAvg configuration against the configuration fed_tune() picks
# within a budget of 20 full runs' worth of rounds.
#
#   Rscript bench/tune.R          # about two minutes (Fashion-MNIST: apt-get install dataset-fashion-mnist)
#
# Goal (issue 18): the tuned configuration reaches the target accuracy in
# at most half the rounds of the default, the tuning itself within 20 full
# runs' worth of rounds; reproducible, and identical under
# plan(sequential) and plan(multisession, workers = 2).
#
# The trials are ranked on each node's validation split (20 % of its
# training data); the test set (the clients' own test samples, pooled) is
# only used for the final comparison.
suppressMessages(library(fedagg))
options(fedagg.verbose = FALSE)

rounds <- 100L
budget <- 20L * rounds
target <- 0.72

data <- synthetic_fedprox(1, 1, n_clients = 30, seed = 1)
test <- pool_clients(data, "test")
nodes <- local({
  set.seed(11)
  lapply(names(data$clients), function(id) {
    cl <- data$clients[[id]]
    v <- sample.int(nrow(cl$x), floor(0.2 * nrow(cl$x)))
    fed_node(cl$x[-v, , drop = FALSE], cl$y[-v], id = id, x_val = cl$x[v, , drop = FALSE], y_val = cl$y[v])
  })
})

make <- function(lr = 0.01, epochs = 20, algorithm = fedavg(), server_optimizer = server_sgd(), fraction = 1 / 3, seed = 1) {
  fed_server(model_softmax(60, 10), nodes, fraction = fraction, epochs = epochs, batch_size = 10, lr = lr,
             algorithm = algorithm, server_optimizer = server_optimizer, test_data = test, seed = seed)
}
space <- list(lr = c(0.01, 0.03, 0.1), epochs = c(20, 5, 1), algorithm = list(fedavg(), fedprox(mu = 1)),
              server_optimizer = list(server_sgd(), server_sgd(lr = 1, momentum = 0.9)), fraction = c(1 / 3, 0.2))

future::plan(future::sequential)
t0 <- Sys.time()
tuned <- fed_tune(make, space, rounds = rounds, budget = budget, target = target, seed = 1)
seq_seconds <- as.numeric(Sys.time() - t0, units = "secs")
future::plan(future::multisession, workers = 2)
t0 <- Sys.time()
tuned2 <- fed_tune(make, space, rounds = rounds, budget = budget, target = target, seed = 1)
par_seconds <- as.numeric(Sys.time() - t0, units = "secs")
future::plan(future::sequential)
same <- identical(tuned$results[setdiff(names(tuned$results), "seconds")], tuned2$results[setdiff(names(tuned2$results), "seconds")]) &&
  identical(tuned$best_server$params, tuned2$best_server$params)

options(width = 160)
cat("1. Synthetic(1,1), 30 clients\n")
cat(sprintf("fed_tune: %d configurations, successive halving (rungs at %s rounds), %d of %d rounds of budget\n",
            nrow(tuned$results), paste(tuned$rungs, collapse = ", "), tuned$rounds_used, budget))
cat(sprintf("plan(sequential) %.1f s, plan(multisession, workers = 2) %.1f s (ratio %.2f); identical results: %s\n\n",
            seq_seconds, par_seconds, seq_seconds / par_seconds, same))
print(utils::head(tuned$results[setdiff(names(tuned$results), c("seed"))], 8), row.names = FALSE)

# The comparison: the default and the tuned configuration from scratch, on
# the tuning seed and on three others (selection, shuffling and init), for
# rounds-to-target on validation and on test (the first round at which
# the mean of the last 3 rounds reaches the target).
compare <- function(make, best, rounds, target, seeds = 1:4) {
  # As fed_tune() counts it: the mean of the last 3 rounds at the target.
  first_reach <- function(v) fedagg:::rounds_to_target(v, target)
  rows <- list()
  for (seed in seeds) {
    for (which in c("default FedAvg", "tuned")) {
      srv <- if (which == "tuned") do.call(make, c(best, list(seed = seed))) else make(seed = seed)
      srv$fit(rounds)
      h <- srv$history
      rows[[length(rows) + 1]] <- data.frame(seed = seed, config = which, val_rounds = first_reach(h$val_accuracy),
                                             test_rounds = first_reach(h$test_accuracy),
                                             final_test = round(mean(utils::tail(h$test_accuracy, 5)), 3))
    }
  }
  cmp <- do.call(rbind, rows)
  print(cmp, row.names = FALSE)
  med <- function(config, col) stats::median(cmp[cmp$config == config, col])
  cat(sprintf("\nMedian rounds to %.2f accuracy: validation %s (default) vs %s (tuned), ratio %.2f; test %s vs %s, ratio %.2f\n",
              target, med("default FedAvg", "val_rounds"), med("tuned", "val_rounds"),
              med("tuned", "val_rounds") / med("default FedAvg", "val_rounds"),
              med("default FedAvg", "test_rounds"), med("tuned", "test_rounds"),
              med("tuned", "test_rounds") / med("default FedAvg", "test_rounds")))
}
describe <- function(best) paste(names(best), vapply(best, fedagg:::lever_label, character(1)), sep = " = ", collapse = "; ")

best <- tuned$best_config
cat("\nBest configuration:", describe(best), "\n\n")
compare(make, best, rounds, target)
cat(sprintf("Goal: ratio <= 0.5 within %d rounds of tuning (%d used).\n", budget, tuned$rounds_used))

# 2. Fashion-MNIST, Dirichlet(0.1) over 100 clients -------------------------
# The settings of bench/convergence.R's Fashion-MNIST run: softmax
# regression, 10 clients per round, E = 1, B = 32, lr = 0.05; 20 % of each
# client's images for validation; 100 rounds, target 70 % (as there).
# Sequential only: a trial's server holds
# the 100 nodes' images, which a multisession worker would copy each rung.
if (!dir.exists("/usr/share/datasets/fashion-mnist")) {
  cat("\nFashion-MNIST: not installed (apt-get install dataset-fashion-mnist); skipped.\n")
} else {
  fm <- load_fashion_mnist()
  parts <- partition_dirichlet(fm$train$y, n_clients = 100, alpha = 0.1, min_size = 20, seed = 1)
  fm_nodes <- fed_nodes(fm$train$x, fm$train$y, parts, validation = 0.2, seed = 1)
  fm_model <- model_softmax(784, classes = levels(fm$train$y))
  fm_make <- function(lr = 0.05, epochs = 1, algorithm = fedavg(), server_optimizer = server_sgd(), seed = 1) {
    fed_server(fm_model, fm_nodes, fraction = 0.1, epochs = epochs, batch_size = 32, lr = lr, algorithm = algorithm,
               server_optimizer = server_optimizer, test_data = fm$test, seed = seed)
  }
  fm_space <- list(lr = c(0.05, 0.1, 0.2), epochs = c(1, 2, 5), algorithm = list(fedavg(), fedprox(mu = 1), scaffold()),
                   server_optimizer = list(server_sgd(), server_sgd(lr = 1, momentum = 0.9)))
  fm_rounds <- 100L
  fm_target <- 0.70
  t0 <- Sys.time()
  fm_tuned <- fed_tune(fm_make, fm_space, rounds = fm_rounds, budget = 20L * fm_rounds, target = fm_target, seed = 1)
  cat(sprintf("\nFashion-MNIST, Dirichlet(0.1) over 100 clients: %d configurations, rungs at %s rounds, %d of %d rounds of budget, %.0f s\n\n",
              nrow(fm_tuned$results), paste(fm_tuned$rungs, collapse = ", "), fm_tuned$rounds_used, 20L * fm_rounds,
              as.numeric(Sys.time() - t0, units = "secs")))
  print(utils::head(fm_tuned$results[setdiff(names(fm_tuned$results), "seed")], 6), row.names = FALSE)
  cat("\nBest configuration:", describe(fm_tuned$best_config), "\n\n")
  compare(fm_make, fm_tuned$best_config, fm_rounds, fm_target)
  cat(sprintf("Goal: ratio <= 0.5 within %d rounds of tuning (%d used).\n", 20L * fm_rounds, fm_tuned$rounds_used))
}
