# Benchmark: the privacy-utility curve of federated training. Test accuracy
# against the epsilon spent (delta = 1e-5), for central DP-FedAvg with a fixed
# clipping bound, with adaptive clipping (Andrew et al. 2021), and for local
# DP. Not a test: a table and a plot.
#
#   Rscript bench/privacy.R [rounds] [output.png]
#
# Data: the IID variant of the FedProx paper's Synthetic data over 500 clients (sizes
# capped at 200), softmax regression, 50 clients per round (q = 0.1), E = 1,
# B = 10, client lr 0.05. Central DP accounts with the RDP accountant of the
# Poisson-subsampled Gaussian (the usual approximation for fixed-size
# sampling); local DP by basic composition over a client's participations.
suppressPackageStartupMessages(library(fedagg))
args <- commandArgs(trailingOnly = TRUE)
rounds <- if (length(args) >= 1) as.integer(args[1]) else 50L
out_png <- if (length(args) >= 2) args[2] else "bench/privacy.png"
cat(sprintf("fedagg %s | R %s | %d cores | %s\n\n", packageVersion("fedagg"), getRversion(),
            fedagg_threads()$cores, format(Sys.time(), "%Y-%m-%d")))

data <- synthetic_fedprox(0, 0, n_clients = 500, max_size = 200, iid = TRUE, seed = 11)
nodes <- fed_nodes(data)
test <- pool_clients(data, "test")
run <- function(privacy) {
  srv <- fed_server(model_softmax(60, 10), nodes, fraction = 0.1, epochs = 1, batch_size = 10, lr = 0.05,
                    test_data = test, eval_every = 5, seed = 1, privacy = privacy)
  h <- srv$fit(rounds, verbose = FALSE)
  acc <- h$test_accuracy[!is.na(h$test_accuracy)]
  c(epsilon = utils::tail(h$epsilon, 1) %||% NA_real_, accuracy = mean(utils::tail(acc, 2)))
}
`%||%` <- function(a, b) if (is.null(a) || !length(a)) b else a

baseline <- run(NULL)
cat(sprintf("No privacy: test accuracy %.3f after %d rounds\n\n", baseline[["accuracy"]], rounds))

central <- do.call(rbind, lapply(c(0.5, 1, 2, 5, 10, 20, 50), function(z) {
  fixed <- run(dp_central(z, clip = 0.3))
  # The count of unclipped updates needs noise above z / 2 to share the
  # budget: m / 20 = 2.5 by default, more for large z.
  adaptive <- run(dp_central(z, clip = clip_adaptive(initial = 0.1, quantile = 0.5, count_noise = max(2.5, z))))
  data.frame(noise_multiplier = z, epsilon = round(fixed[["epsilon"]], 2),
             fixed_clip_accuracy = round(fixed[["accuracy"]], 3),
             adaptive_clip_accuracy = round(adaptive[["accuracy"]], 3),
             adaptive_epsilon = round(adaptive[["epsilon"]], 2))
}))
cat(sprintf("Central DP-FedAvg, q = 0.1, %d rounds, delta = 1e-5 (fixed clip 0.3; adaptive from 0.1 to the median norm)\n", rounds))
print(central, row.names = FALSE)

local <- do.call(rbind, lapply(c(1, 8, 64, 512), function(eps) {
  r <- run(dp_local(epsilon = eps, delta = 1e-5, clip = 0.3))
  data.frame(epsilon_per_round = eps, total_epsilon = round(r[["epsilon"]], 1), accuracy = round(r[["accuracy"]], 3))
}))
cat(sprintf("\nLocal DP (each update clipped to 0.3 and noised on the client), %d rounds\n", rounds))
print(local, row.names = FALSE)

grDevices::png(out_png, width = 900, height = 500, res = 110)
eps <- c(central$epsilon, central$adaptive_epsilon, local$total_epsilon)
plot(range(eps[eps > 0]), c(0, 1), log = "x", type = "n", xlab = "epsilon spent (delta = 1e-5, log scale)",
     ylab = "Test accuracy", main = sprintf("Privacy and accuracy, %d rounds", rounds))
graphics::abline(h = baseline[["accuracy"]], lty = 2, col = "grey40")
graphics::lines(central$epsilon, central$fixed_clip_accuracy, type = "b", pch = 19, col = "#1b9e77", lwd = 2)
graphics::lines(central$adaptive_epsilon, central$adaptive_clip_accuracy, type = "b", pch = 17, col = "#d95f02", lwd = 2)
graphics::lines(local$total_epsilon, local$accuracy, type = "b", pch = 15, col = "#7570b3", lwd = 2)
graphics::legend("bottomright", legend = c("no privacy", "central DP, fixed clip", "central DP, adaptive clip",
                                           "local DP (basic composition)"),
                 col = c("grey40", "#1b9e77", "#d95f02", "#7570b3"), lty = c(2, 1, 1, 1), pch = c(NA, 19, 17, 15),
                 lwd = 2, bty = "n", cex = 0.85)
invisible(grDevices::dev.off())
cat(sprintf("\nWrote %s\n", out_png))
