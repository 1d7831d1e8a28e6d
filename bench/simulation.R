# Benchmark: FedAvg rounds in fedagg against the same loop in plain R.
#
#   Rscript bench/simulation.R [clients_for_memory]   (or: make bench)
#
# Workload of the issue: 100 clients of 600 samples, Synthetic(1,1)-style
# data (60 features, 10 classes; per-client model and feature shifts),
# softmax regression, C = 0.1, E = 1, B = 10, lr = 0.01, 50 rounds. Both
# implementations do the same arithmetic: per client, shuffled minibatches of
# 10, a softmax-cross-entropy gradient step each, then the sample-weighted
# mean of the client models. No evaluation inside the timed rounds.
# Then: memory of a federation of 10,000 such clients (the nodes' R
# matrices, which the Rust core reads in place).
suppressPackageStartupMessages(library(fedagg))

args <- commandArgs(trailingOnly = TRUE)
memory_clients <- if (length(args)) as.integer(args[1]) else 10000L
n_clients <- 100L; n_samples <- 600L; dim <- 60L; n_classes <- 10L
rounds <- 50L; fraction <- 0.1; batch <- 10L; lr <- 0.01

make_clients <- function(k, n, seed) {
  set.seed(seed)
  sd_x <- sqrt(seq_len(dim)^-1.2)
  lapply(seq_len(k), function(i) {
    u <- rnorm(1); v <- rnorm(dim, rnorm(1), 1)
    W <- matrix(rnorm(dim * n_classes, u), dim, n_classes)
    b <- rnorm(n_classes, u)
    x <- matrix(rnorm(n * dim), n, dim) * rep(sd_x, each = n) + rep(v, each = n)
    list(x = x, y = max.col(sweep(x %*% W, 2, b, `+`), "first") - 1L)
  })
}

# The same FedAvg loop written in plain, vectorised R.
plain_r_fit <- function(clients, rounds, seed) {
  W <- matrix(0, dim, n_classes); b <- numeric(n_classes)
  m <- max(1L, floor(fraction * length(clients)))
  set.seed(seed)
  for (r in seq_len(rounds)) {
    selected <- sort(sample.int(length(clients), m))
    acc_W <- 0; acc_b <- 0; total <- 0
    for (k in selected) {
      x <- clients[[k]]$x; y <- clients[[k]]$y; n <- nrow(x)
      Wk <- W; bk <- b
      order <- sample.int(n)
      for (start in seq(1L, n, by = batch)) {
        rows <- order[start:min(start + batch - 1L, n)]
        xb <- x[rows, , drop = FALSE]
        z <- xb %*% Wk + rep(bk, each = length(rows))
        z <- exp(z - z[cbind(seq_along(rows), max.col(z, "first"))])
        p <- z / rowSums(z)
        hit <- cbind(seq_along(rows), y[rows] + 1L)
        p[hit] <- p[hit] - 1
        Wk <- Wk - lr * crossprod(xb, p) / length(rows)
        bk <- bk - lr * colMeans(p)
      }
      acc_W <- acc_W + n * Wk; acc_b <- acc_b + n * bk; total <- total + n
    }
    W <- acc_W / total; b <- acc_b / total
  }
  list(W = W, b = b)
}

fedagg_fit <- function(nodes, rounds, threads) {
  srv <- fed_server(model_softmax(dim, n_classes), nodes, fraction = fraction, epochs = 1,
                    batch_size = batch, lr = lr, seed = 1, threads = threads, eval_every = 10^6)
  srv$fit(rounds, verbose = FALSE)
  srv
}

median_time <- function(f, reps = 3) stats::median(replicate(reps, system.time(f())[["elapsed"]]))

cores <- fedagg_threads()$cores
cat(sprintf("fedagg %s | R %s | %d cores | %s\n\n", packageVersion("fedagg"), getRversion(), cores,
            format(Sys.time(), "%Y-%m-%d")))
clients <- make_clients(n_clients, n_samples, seed = 7)
nodes <- fed_nodes(do.call(rbind, lapply(clients, `[[`, "x")), unlist(lapply(clients, `[[`, "y")),
                   split(seq_len(n_clients * n_samples), rep(seq_len(n_clients), each = n_samples)))
invisible(fedagg_fit(nodes, 1, 1)) # warm up: codes each node's labels once

plain <- median_time(function() plain_r_fit(clients, rounds, 1), reps = 3) / rounds
one <- median_time(function() fedagg_fit(nodes, rounds, 1), reps = 5) / rounds
two <- median_time(function() fedagg_fit(nodes, rounds, 2), reps = 5) / rounds

# Same algorithm, so both reach similar models (sample orders differ).
pooled_x <- do.call(rbind, lapply(clients, `[[`, "x"))
pooled_y <- unlist(lapply(clients, `[[`, "y"))
acc <- function(W, b) mean(max.col(pooled_x %*% W + rep(b, each = nrow(pooled_x)), "first") - 1L == pooled_y)
srv <- fedagg_fit(nodes, rounds, NULL)
pr <- plain_r_fit(clients, rounds, 1)

results <- data.frame(
  implementation = c("plain R loop (baseline)", "fedagg, 1 thread", "fedagg, 2 threads"),
  ms_per_round = 1000 * c(plain, one, two),
  speedup_vs_R = c(1, plain / one, plain / two),
  speedup_vs_1_thread = c(NA, 1, one / two)
)
cat(sprintf("FedAvg, %d clients x %d samples, %d features, %d classes, C = %s, E = 1, B = %d, %d rounds\n\n",
            n_clients, n_samples, dim, n_classes, format(fraction), batch, rounds))
print(format(results, digits = 3), row.names = FALSE)
cat(sprintf("\nTraining accuracy over all clients after %d rounds: fedagg %.3f, plain R %.3f\n",
            rounds, acc(srv$params$W1, srv$params$b1), acc(pr$W, pr$b)))

if (memory_clients > 0) {
  rss_mb <- function() {
    line <- grep("^VmRSS", readLines("/proc/self/status"), value = TRUE)
    as.numeric(gsub("[^0-9]", "", line)) / 1024
  }
  rm(clients, nodes, srv, pooled_x); invisible(gc())
  before <- rss_mb()
  # Each node keeps the matrix it is given (no pooled copy is made).
  big <- make_clients(memory_clients, n_samples, seed = 8)
  big_nodes <- lapply(seq_along(big), function(k) fed_node(big[[k]]$x, big[[k]]$y, id = sprintf("c%05d", k)))
  rm(big); invisible(gc())
  after_nodes <- rss_mb()
  t_round <- system.time(big_srv <- fedagg_fit(big_nodes, 3, NULL))[["elapsed"]]
  after_fit <- rss_mb()
  trained <- length(unique(big_srv$client_log$client))
  per_client_mb <- n_samples * (dim + 1) * 8 / 2^20
  cat(sprintf("\nMemory, %d clients x %d samples x %d features (%.2f MB of doubles per client):\n",
              memory_clients, n_samples, dim, per_client_mb))
  cat(sprintf("  %d nodes holding their data in R:   %6.0f MB resident (data alone: %.0f MB)\n",
              memory_clients, after_nodes - before, memory_clients * per_client_mb))
  cat(sprintf("  after 3 rounds training %d clients (read in place, no copy): %+6.0f MB\n",
              trained, after_fit - after_nodes))
  cat(sprintf("  3 rounds of %d clients: %.2f s, including coding each client's labels on first use\n",
              big_srv$clients_per_round, t_round))
}
