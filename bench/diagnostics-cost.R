# What the per-round diagnostics (update norms, cosines with the aggregate,
# gradient diversity) cost on issue 20's small round: fits of 50 rounds with
# diagnostics on and off, in random order in one process (medians of 6).
#
#   Rscript bench/diagnostics-cost.R
suppressPackageStartupMessages(library(fedagg))
set.seed(7)
n_clients <- 100; n <- 600; dim <- 60
x <- matrix(rnorm(n_clients * n * dim), ncol = dim)
y <- sample(0:9, n_clients * n, TRUE)
nodes <- fed_nodes(x, y, split(seq_len(n_clients * n), rep(seq_len(n_clients), each = n)))
make <- function(threads, diag) fed_server(model_softmax(dim, 10), nodes, fraction = 0.1, epochs = 1, batch_size = 10, lr = 0.01, seed = 1, threads = threads, eval_every = 10^6, diagnostics = diag)
invisible(make(1, TRUE)$fit(1, verbose = FALSE))
res <- expand.grid(rep = 1:6, diag = c(TRUE, FALSE), threads = 1:2)
res$ms <- NA
for (i in sample(nrow(res))) { s <- make(res$threads[i], res$diag[i]); res$ms[i] <- system.time(s$fit(50, verbose = FALSE))[[3]] / 50 * 1000 }
print(aggregate(ms ~ diag + threads, res, median))
