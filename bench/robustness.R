# Benchmark: final test accuracy of FedAvg, the robust aggregators and the
# norm filter when 20% of the clients attack, on IID and label-skewed
# Fashion-MNIST. Not a test: tables, a verdict on the literature's
# predictions, and a plot.
#
#   Rscript bench/robustness.R [rounds] [output.png] [n_train]
#
# Fashion-MNIST (Debian's dataset-fashion-mnist; all 60,000 training images
# unless n_train is given, then a seeded subset), softmax regression 784 ->
# 10, over 50 clients split IID (partition_iid) or by label skew
# (partition_dirichlet, alpha = 0.5). Every round has all 50 clients
# (fraction = 1, so Bulyan's K >= 4f + 3 holds with f = 10), E = 1,
# B = 32, lr = 0.05, seed 1, evaluated every 5 rounds on the 10,000 test
# images; 30 rounds by default (about 6 minutes on 2 cores).
# Ten clients (a seeded 20%) attack in every round:
#   * sign flip: send -s * Delta. s = 1 is tried first with FedAvg only;
#     if FedAvg loses less than 3 points to it on either split, the tables
#     use s = 4 (at s = 1 the honest 80% simply outvote the flipped 20%);
#   * scaling: send 10 * Delta (model replacement).
# Methods: FedAvg (agg_weighted), coordinate-wise median, trimmed mean
# (trim 0.2), Krum (f = 10), Multi-Krum (f = 10, m = K - f = 40), geometric
# median, Bulyan (f = 10), and FedAvg behind filter_norm(mad = 3). Each is
# also run without attack. Final accuracy = mean of the last 2 evaluations;
# "drop" is against FedAvg without attack on the same split, in accuracy
# points; "held" means a drop of at most 3 points.
suppressPackageStartupMessages(library(fedagg))
options(width = 160)
args <- commandArgs(trailingOnly = TRUE)
rounds <- if (length(args) >= 1) as.integer(args[1]) else 30L
out_png <- if (length(args) >= 2) args[2] else "bench/robustness.png"
n_train <- if (length(args) >= 3) as.integer(args[3]) else NA_integer_
cat(sprintf("fedagg %s | R %s | %d cores | %s\n\n", packageVersion("fedagg"), getRversion(),
            fedagg_threads()$cores, format(Sys.time(), "%Y-%m-%d")))
if (!dir.exists("/usr/share/datasets/fashion-mnist")) {
  cat("Fashion-MNIST: not installed (apt-get install dataset-fashion-mnist); nothing to do.\n")
  quit(save = "no")
}
started <- Sys.time()

n_clients <- 50L
f <- 10L # attackers, and the f of the Krum-type rules
tolerance <- 0.03 # "held": within 3 accuracy points of clean FedAvg

fm <- load_fashion_mnist()
if (!is.na(n_train) && n_train < nrow(fm$train$x)) {
  set.seed(1)
  keep <- sort(sample.int(nrow(fm$train$x), n_train))
  fm$train <- list(x = fm$train$x[keep, ], y = fm$train$y[keep])
}
n <- nrow(fm$train$x)
model <- model_softmax(784, classes = levels(fm$train$y))
splits <- list(
  IID = partition_iid(n, n_clients, seed = 1),
  "Dirichlet(0.5)" = partition_dirichlet(fm$train$y, n_clients, alpha = 0.5, seed = 1)
)
set.seed(2026)
attackers <- sort(sample.int(n_clients, f))
settings <- list(fraction = 1, epochs = 1, batch_size = 32, lr = 0.05, seed = 1, eval_every = 5)
cat(sprintf("Fashion-MNIST, %d training images over %d clients, softmax regression, all %d clients per round, E = 1, B = 32, lr = 0.05, %d rounds\n",
            n, n_clients, n_clients, rounds))
cat(sprintf("Attackers: clients %s; their share of the training samples: %s\n\n", paste(attackers, collapse = ", "),
            paste(sprintf("%s %.1f%%", names(splits),
                          vapply(splits, function(p) 100 * sum(lengths(p)[attackers]) / n, numeric(1))), collapse = ", ")))

methods <- list(
  FedAvg = list(aggregator = agg_weighted()),
  Median = list(aggregator = agg_median()),
  "Trimmed mean 0.2" = list(aggregator = agg_trimmed_mean(0.2)),
  Krum = list(aggregator = agg_krum(f)),
  "Multi-Krum" = list(aggregator = agg_multi_krum(f, n_clients - f)),
  "Geometric median" = list(aggregator = agg_geometric_median()),
  Bulyan = list(aggregator = agg_bulyan(f)),
  "FedAvg + norm filter" = list(aggregator = agg_weighted(), filter = filter_norm(mad = 3))
)

final_accuracy <- function(h) mean(utils::tail(h$test_accuracy[!is.na(h$test_accuracy)], 2))

# Share of the attackers' updates that reached the aggregate: those the
# filter kept, or those a Krum-type rule picked. NA for rules that use every
# update (median, trimmed mean, geometric median: they down-weight instead).
attacker_share_used <- function(log, extra) {
  bad <- log[log$malicious, ]
  if (!nrow(bad)) return(NA_real_)
  if (!is.null(extra$filter)) return(mean(bad$passed_filter))
  if (extra$aggregator$kind %in% c("krum", "multi_krum", "bulyan")) return(mean(bad$krum_kept %in% TRUE))
  NA_real_
}

run <- function(nodes, extra) {
  srv <- do.call(fed_server, c(list(model, nodes, test_data = fm$test), settings, extra))
  diverged <- FALSE
  seconds <- system.time(h <- tryCatch(srv$fit(rounds, verbose = FALSE),
                                       fedagg_error_diverged = function(e) NULL))[["elapsed"]]
  if (is.null(h)) {
    h <- srv$history
    diverged <- TRUE
  }
  list(history = h, seconds = seconds, diverged = diverged,
       accuracy = if (diverged) NA_real_ else final_accuracy(h),
       attackers_used = attacker_share_used(srv$client_log, extra))
}

nodes <- lapply(splits, function(p) fed_nodes(fm$train$x, fm$train$y, p))

# Pilot: is sign flip x1 strong enough to hurt FedAvg? ------------------------
clean_fedavg <- lapply(nodes, function(nd) run(nd, methods$FedAvg))
pilot <- lapply(nodes, function(nd) {
  set_attack(nd, attackers, attack_sign_flip(1))
  on.exit(set_attack(nd, attackers, NULL))
  run(nd, methods$FedAvg)
})
pilot_table <- data.frame(split = names(splits),
                          clean_FedAvg = round(vapply(clean_fedavg, `[[`, numeric(1), "accuracy"), 4),
                          sign_flip_x1_FedAvg = round(vapply(pilot, `[[`, numeric(1), "accuracy"), 4))
pilot_table$drop_points <- round(100 * (pilot_table$clean_FedAvg - pilot_table$sign_flip_x1_FedAvg), 1)
flip_scale <- if (all(pilot_table$drop_points >= 100 * tolerance)) 1 else 4
cat("Pilot: FedAvg under sign flip x1\n")
print(pilot_table, row.names = FALSE)
cat(sprintf("-> sign flip x%d is used below%s\n\n", flip_scale,
            if (flip_scale > 1) " (x1 costs FedAvg less than 3 points on at least one split)" else ""))

scenarios <- list("no attack" = NULL, attack_sign_flip(flip_scale), "scale x10" = attack_scale(10))
names(scenarios)[2] <- sprintf("sign flip x%d", flip_scale)

# Every split x scenario x method ----------------------------------------------
results <- list()
histories <- list()
for (split in names(splits)) {
  nd <- nodes[[split]]
  for (scenario in names(scenarios)) {
    set_attack(nd, attackers, scenarios[[scenario]])
    runs <- lapply(names(methods), function(m) {
      if (m == "FedAvg" && scenario == "no attack") clean_fedavg[[split]] else run(nd, methods[[m]])
    })
    names(runs) <- names(methods)
    set_attack(nd, attackers, NULL)
    histories[[split]][[scenario]] <- lapply(runs, `[[`, "history")
    results[[length(results) + 1L]] <- data.frame(
      split = split, scenario = scenario, method = names(methods),
      accuracy = vapply(runs, `[[`, numeric(1), "accuracy"),
      diverged = vapply(runs, `[[`, logical(1), "diverged"),
      attackers_used = vapply(runs, `[[`, numeric(1), "attackers_used"),
      seconds = vapply(runs, `[[`, numeric(1), "seconds"), stringsAsFactors = FALSE)
  }
}
results <- do.call(rbind, results)
rownames(results) <- NULL
reference <- results$accuracy[results$method == "FedAvg" & results$scenario == "no attack"]
names(reference) <- results$split[results$method == "FedAvg" & results$scenario == "no attack"]
results$drop_points <- 100 * (reference[results$split] - results$accuracy)
results$held <- !is.na(results$drop_points) & results$drop_points <= 100 * tolerance

for (split in names(splits)) {
  for (scenario in names(scenarios)) {
    r <- results[results$split == split & results$scenario == scenario, ]
    cat(sprintf("%s, %s (clean FedAvg: %.4f)\n", split, scenario, reference[[split]]))
    print(data.frame(method = r$method,
                     final_accuracy = ifelse(r$diverged, "diverged", sprintf("%.4f", r$accuracy)),
                     drop_points = sprintf("%.1f", r$drop_points),
                     within_3 = ifelse(r$held, "yes", "no"),
                     attacker_updates_used = ifelse(is.na(r$attackers_used) | scenario == "no attack", "-",
                                                    sprintf("%.0f%%", 100 * r$attackers_used)),
                     seconds = round(r$seconds, 1)), row.names = FALSE)
    cat("\n")
  }
}

wide <- data.frame(method = names(methods))
for (split in names(splits)) {
  for (scenario in names(scenarios)) {
    r <- results[results$split == split & results$scenario == scenario, ]
    wide[[paste(split, scenario, sep = ": ")]] <- round(r$accuracy[match(wide$method, r$method)], 3)
  }
}
cat("Final test accuracy (mean of the last 2 evaluations), all runs\n")
print(wide, row.names = FALSE)
cat("\n")

# The literature's predictions ------------------------------------------------
robust <- setdiff(names(methods), "FedAvg")
get_row <- function(split, scenario, method) {
  results[results$split == split & results$scenario == scenario & results$method == method, ]
}
verdict <- function(ok) if (ok) "HOLDS" else "DOES NOT HOLD"
cat("Predictions\n")
for (scenario in names(scenarios)[-1]) {
  fa <- get_row("IID", scenario, "FedAvg")
  cat(sprintf("0. (sanity) The attack hurts FedAvg on IID data, %s: drop %.1f points -> %s\n", scenario,
              fa$drop_points, verdict(fa$drop_points > 100 * tolerance)))
}
for (scenario in names(scenarios)[-1]) {
  r <- results[results$split == "IID" & results$scenario == scenario & results$method %in% robust, ]
  cat(sprintf("1. Robust rules stay within 3 points of clean FedAvg on IID data, %s: %d of %d -> %s\n",
              scenario, sum(r$held), nrow(r), verdict(all(r$held))))
  if (any(!r$held)) {
    cat(sprintf("   not held: %s\n", paste(sprintf("%s (drop %.1f)", r$method[!r$held], r$drop_points[!r$held]),
                                           collapse = ", ")))
  }
}
k_iid <- get_row("IID", "no attack", "Krum")
k_skew <- get_row("Dirichlet(0.5)", "no attack", "Krum")
cat(sprintf("2. Krum loses accuracy under label skew without attack: drop %.1f points on Dirichlet(0.5) (%.1f on IID) -> %s\n",
            k_skew$drop_points, k_iid$drop_points,
            verdict(k_skew$drop_points > 100 * tolerance && k_skew$drop_points > k_iid$drop_points)))
for (scenario in names(scenarios)[-1]) {
  r <- results[results$split == "Dirichlet(0.5)" & results$scenario == scenario & results$method %in% robust, ]
  cat(sprintf("   (not predicted) under label skew, %s, within 3 points: %s\n", scenario,
              if (any(r$held)) paste(r$method[r$held], collapse = ", ") else "none"))
}

# Plot ------------------------------------------------------------------------
grDevices::png(out_png, width = 1650, height = 1050, res = 110)
graphics::par(mfrow = c(length(splits), length(scenarios)))
for (split in names(splits)) {
  for (scenario in names(scenarios)) {
    plot(fed_compare(histories[[split]][[scenario]]), metric = "test_accuracy", main = paste0(split, ", ", scenario))
  }
}
invisible(grDevices::dev.off())
cat(sprintf("\nWrote %s\n", out_png))
cat(sprintf("Total run time: %.1f minutes\n", as.numeric(difftime(Sys.time(), started, units = "mins"))))
