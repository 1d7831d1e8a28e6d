# fedagg demo: one aggregation round of a realistic federation.
#
# 40 hospitals fit a softmax regression (60 features, 10 classes). Each sends
# its model update (layers W and b). Sites hold very different amounts of data
# (log-normal sizes) and data that is not identically distributed, so honest
# updates scatter around the true direction; 3 sites are faulty and send
# scaled, sign-flipped updates. We compare aggregation rules by how close they
# land to the true update, then show clipping, DP noise and a drift check.
#
# Run: Rscript inst/scripts/aggregation-demo.R [output.png]
# (without a path, the plot goes to a temporary file, not the working tree)
suppressPackageStartupMessages(library(fedagg))

args <- commandArgs(trailingOnly = TRUE)
out_png <- if (length(args)) args[1] else file.path(tempdir(), "fedagg-aggregation.png")
set.seed(2026)

n_clients <- 40
n_features <- 60
n_classes <- 10
byzantine <- c(7, 19, 33)

step <- function(fmt, ...) cat(sprintf(paste0("[%s] ", fmt, "\n"), format(Sys.time(), "%H:%M:%S"), ...))

step("Simulating %d client updates (%d parameters in 2 layers)...",
     n_clients, n_features * n_classes + n_classes)
true_update <- list(W = matrix(rnorm(n_features * n_classes, sd = 0.05), n_features, n_classes),
                    b = rnorm(n_classes, sd = 0.05))
samples <- round(exp(rnorm(n_clients, 5, 1))) + 20
client_shift <- lapply(seq_len(n_clients), function(k) rnorm(1, sd = 0.02)) # non-IID bias
updates <- lapply(seq_len(n_clients), function(k) {
  noise_sd <- 0.6 / sqrt(samples[k])                                 # less data, noisier update
  u <- lapply(true_update, function(l) l + client_shift[[k]] + rnorm(length(l), sd = noise_sd))
  u$W <- matrix(u$W, n_features, n_classes)
  if (k %in% byzantine) u <- lapply(u, function(l) -20 * l)          # faulty or malicious site
  u
})

norms <- update_norms(updates)$norm
step("Update norms: median %.3f, max %.3f (clients %s stand out)",
     median(norms), max(norms), paste(head(order(-norms), 3), collapse = ", "))

flat <- function(u) c(as.vector(u$W), u$b)
truth <- flat(true_update)
evaluate <- function(label, expr) {
  time <- system.time(agg <- expr)[["elapsed"]]
  v <- flat(agg)
  data.frame(rule = label,
             error = sqrt(sum((v - truth)^2)) / sqrt(sum(truth^2)),
             cosine = sum(v * truth) / sqrt(sum(v^2) * sum(truth^2)),
             ms = 1000 * time)
}

step("Aggregating with 7 rules...")
results <- rbind(
  evaluate("mean (equal weights)", weighted_aggregate(updates)),
  evaluate("FedAvg (sample weights)", weighted_aggregate(updates, weights = samples)),
  evaluate("coordinate median", robust_aggregate(updates, "median")),
  evaluate("trimmed mean (10%)", robust_aggregate(updates, "trimmed_mean", trim = 0.1)),
  evaluate("Krum (f = 3)", robust_aggregate(updates, "krum", f = 3)),
  evaluate("Multi-Krum (f = 3)", robust_aggregate(updates, "multi_krum", f = 3, weights = samples)),
  evaluate("geometric median", robust_aggregate(updates, "geometric_median", weights = samples))
)
results <- results[order(results$error), ]
cat("\nDistance of each aggregate from the true update (relative L2 error; lower is better)\n\n")
print(format(results, digits = 3), row.names = FALSE)

kept <- attr(robust_aggregate(updates, "multi_krum", f = 3), "selected")
cat(sprintf("\nMulti-Krum left out clients %s (faulty: %s)\n",
            paste(sort(setdiff(seq_len(n_clients), kept)), collapse = ", "), paste(byzantine, collapse = ", ")))

step("Differentially private FedAvg: clip to norm 1, add Gaussian noise to the mean")
clipped <- lapply(updates, clip_update, max_norm = 1)
dp_mean <- weighted_aggregate(clipped)
sensitivity <- 1 / n_clients
privacy <- do.call(rbind, lapply(c(0.5, 1, 4), function(eps) {
  data.frame(epsilon = eps, delta = 1e-5,
             sd_analytic = gaussian_noise_sd(sensitivity, eps, 1e-5),
             sd_classic = suppressWarnings(gaussian_noise_sd(sensitivity, eps, 1e-5, method = "classic")))
}))
privacy$noise_saved <- sprintf("%.0f%%", 100 * (1 - privacy$sd_analytic / privacy$sd_classic))
print(format(privacy, digits = 3), row.names = FALSE)
noisy <- add_gaussian_noise(dp_mean, sensitivity, epsilon = 1, delta = 1e-5, seed = 1)
cat(sprintf("(epsilon = 1: noise sd %.4f added to each of %d coordinates)\n", attr(noisy, "sd"), length(truth)))

step("Drift check: does site 12's feature distribution match the pooled reference?")
reference <- data.frame(age = rnorm(2000, 55, 12), bmi = rnorm(2000, 27, 4))
site <- data.frame(age = rnorm(300, 63, 12), bmi = rnorm(300, 27, 4))
print(ks_drift(reference, site))

step("Writing %s", out_png)
grDevices::png(out_png, width = 960, height = 520, res = 110)
op <- graphics::par(mar = c(4.5, 13.5, 3, 1))
graphics::barplot(rev(results$error), names.arg = rev(results$rule), horiz = TRUE, las = 1,
                  col = ifelse(rev(results$error) < 0.5, "#2c7fb8", "#de2d26"),
                  xlab = "relative L2 error to the true update",
                  main = sprintf("Aggregation rules, %d clients, %d faulty", n_clients, length(byzantine)))
graphics::par(op)
invisible(grDevices::dev.off())
step("Done.")
