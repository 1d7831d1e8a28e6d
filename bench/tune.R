# Does fed_tune() pay? On Synthetic(1,1) with 30 clients and the FedProx
# paper's settings (10 clients per round, E = 20, B = 10, lr = 0.01), the
# default FedAvg configuration against the configuration fed_tune() picks
# within a budget of 20 full runs' worth of rounds.
#
#   Rscript bench/tune.R          # about a minute and a half
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

first_reach <- function(v) {
  hit <- which(v >= target)
  if (length(hit)) hit[1] else NA_integer_
}

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
cat(sprintf("fed_tune: %d configurations, successive halving (rungs at %s rounds), %d of %d rounds of budget\n",
            nrow(tuned$results), paste(tuned$rungs, collapse = ", "), tuned$rounds_used, budget))
cat(sprintf("plan(sequential) %.1f s, plan(multisession, workers = 2) %.1f s (ratio %.2f); identical results: %s\n\n",
            seq_seconds, par_seconds, seq_seconds / par_seconds, same))
print(utils::head(tuned$results[setdiff(names(tuned$results), c("seed"))], 8), row.names = FALSE)

# The comparison: the default and the tuned configuration from scratch, on
# the tuning seed and on three others (selection, shuffling and init), for
# rounds-to-target on validation and on test.
best <- tuned$best_config
cat("\nBest configuration:", paste(names(best), vapply(best, fedagg:::lever_label, character(1)), sep = " = ", collapse = "; "), "\n\n")
rows <- list()
for (seed in 1:4) {
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
cat(sprintf("Goal: ratio <= 0.5 within %d rounds of tuning (%d used).\n", budget, tuned$rounds_used))
