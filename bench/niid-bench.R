# The NIID-Bench setting (Li, Diao, Chen and He, "Federated Learning on
# Non-IID Data Silos: An Experimental Study", ICDE 2022, arXiv 2102.02079)
# on Fashion-MNIST, against the accuracies published with Flower's
# reproduction (flower/baselines/niid_bench/README.md, "Expected Results",
# FMNIST, Dirichlet (0.5)): FedAvg 88.4, SCAFFOLD 88.4, FedProx 88.6,
# FedNova 88.1 (%, test accuracy after 50 rounds).
#
#   Rscript bench/niid-bench.R [algorithms] [rounds] [epochs] [threads]
#
# algorithms: comma-separated subset of fedavg,fedprox,scaffold,fednova
# (default all); rounds 50, epochs 10, threads 2 by default (the smoke
# version in tests/testthat/test-cnn.R runs 2 rounds of 1 epoch on a
# subset).
#
# Setting, as in the paper (Section V) and Flower's baseline:
# * Fashion-MNIST (Debian's dataset-fashion-mnist), pixels scaled to [0, 1];
#   the 60,000 training images split over 10 parties by label with
#   Dirichlet(0.5) proportions (partition_dirichlet(), at least 10 images a
#   party; NIID-Bench's own draw differs, so the parties are not theirs);
# * the paper's simple CNN: conv 6@5x5, ReLU, max pool 2, conv 16@5x5,
#   ReLU, max pool 2, dense 120, ReLU, dense 84, ReLU, dense 10 (softmax);
#   PyTorch's default initialisation (init = "kaiming");
# * 50 rounds, every party every round, E = 10 local epochs, B = 64, SGD with
#   lr 0.01 and momentum 0.9; FedProx mu = 0.01 (Flower's default); SCAFFOLD
#   with its correction applied after each momentum step (Flower's
#   ScaffoldOptimizer.step_custom; scaffold(correction = "step"));
# * test accuracy on the 10,000 test images after the last round.
# Where fedagg differs: the random numbers (partition, initial weights,
# minibatch order) are fedagg's; the momentum buffer starts from zero every
# round, as a new torch optimizer does in the paper's code.
#
# Writes bench/niid-bench.rds (the histories) and bench/niid-bench.png.
suppressPackageStartupMessages(library(fedagg))
args <- commandArgs(trailingOnly = TRUE)
algorithms <- strsplit(if (length(args) >= 1) args[1] else "fedavg,fedprox,scaffold,fednova", ",")[[1]]
# "table": no runs, the table and the plot of the runs saved so far.
if (identical(algorithms, "table")) algorithms <- character()
unknown <- setdiff(algorithms, c("fedavg", "fedprox", "scaffold", "fednova"))
if (length(unknown)) stop("Unknown algorithm(s): ", paste(unknown, collapse = ", "))
rounds <- if (length(args) >= 2) as.integer(args[2]) else 50L
epochs <- if (length(args) >= 3) as.integer(args[3]) else 10L
threads <- if (length(args) >= 4) as.integer(args[4]) else 2L
published <- c(fedavg = 88.4, scaffold = 88.4, fedprox = 88.6, fednova = 88.1)

fm <- load_fashion_mnist()
parts <- partition_dirichlet(fm$train$y, 10, alpha = 0.5, seed = 2022)
cat(sprintf("Parties' sizes: %s\n", paste(lengths(parts), collapse = " ")))
nodes <- fed_nodes(fm$train$x, fm$train$y, parts)
lenet <- model_cnn(c(28, 28, 1),
                   list(conv(6, 5), relu(), max_pool(2), conv(16, 5), relu(), max_pool(2),
                        dense(120), relu(), dense(84), relu()),
                   n_classes = 10, classes = levels(fm$train$y))
# SCAFFOLD's correction after the momentum step, as NIID-Bench's and
# Flower's ScaffoldOptimizer apply it.
algorithm_of <- list(fedavg = fedavg(), fedprox = fedprox(0.01), scaffold = scaffold(correction = "step"),
                     fednova = fednova())

out_file <- "bench/niid-bench.rds"
results <- if (file.exists(out_file)) readRDS(out_file) else list()
for (alg in algorithms) {
  srv <- fed_server(lenet, nodes, algorithm = algorithm_of[[alg]], fraction = 1, epochs = epochs, batch_size = 64,
                    lr = 0.01, momentum = 0.9, seed = 1, threads = threads, test_data = fm$test)
  started <- proc.time()[["elapsed"]]
  for (r in seq_len(rounds)) {
    srv$fit(1, verbose = FALSE)
    h <- srv$history
    cat(sprintf("%s round %d: test accuracy %.4f, %.0f s so far\n", alg, r, h$test_accuracy[r],
                proc.time()[["elapsed"]] - started))
  }
  results[[alg]] <- list(history = as.data.frame(srv$history), seconds = proc.time()[["elapsed"]] - started,
                         rounds = rounds, epochs = epochs, threads = threads, when = format(Sys.time()))
  saveRDS(results, out_file)
}

tab <- do.call(rbind, lapply(names(results), function(alg) {
  res <- results[[alg]]
  acc <- 100 * utils::tail(res$history$test_accuracy, 1)
  data.frame(algorithm = alg, rounds = res$rounds, epochs = res$epochs, accuracy = round(acc, 2),
             published = published[[alg]], gap = round(acc - published[[alg]], 2),
             within_1.5 = abs(acc - published[[alg]]) <= 1.5, minutes = round(res$seconds / 60, 1))
}))
print(tab, row.names = FALSE)

grDevices::png("bench/niid-bench.png", width = 800, height = 500)
cols <- c(fedavg = 1, fedprox = 2, scaffold = 3, fednova = 4)
plot(NULL, xlim = c(1, max(vapply(results, `[[`, 1, "rounds"))), ylim = c(0.6, 0.95), xlab = "round",
     ylab = "test accuracy", main = "NIID-Bench: Fashion-MNIST, 10 parties, Dirichlet(0.5), simple CNN")
for (alg in names(results)) {
  lines(results[[alg]]$history$round, results[[alg]]$history$test_accuracy, col = cols[[alg]], lwd = 2)
  abline(h = published[[alg]] / 100, col = cols[[alg]], lty = 3)
}
legend("bottomright", c(names(results), "published (dotted)"), col = c(cols[names(results)], "grey40"),
       lwd = c(rep(2, length(results)), 1), lty = c(rep(1, length(results)), 3), bty = "n")
invisible(grDevices::dev.off())
