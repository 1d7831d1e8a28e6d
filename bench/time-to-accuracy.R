# Benchmark: simulated time (and bytes) to a target accuracy of the systems
# levers -- deadline, over-selection, partial work, update compression -- on
# a heterogeneous device population. Not a test: a table and a plot.
#
#   Rscript bench/time-to-accuracy.R [rounds] [output.png]
#
# Workload: Synthetic(1,1) of the FedProx paper (synthetic_fedprox(1, 1,
# n_clients = 100, seed = 2026); 45 to 6,190 training samples a client),
# softmax regression 60 -> 10 (610 parameters: 4,880 bytes as float64),
# tested on the pooled test split of every client. 10 clients per round,
# E = 5, B = 10, lr = 0.01 (0.05 plateaus about 10 points lower on this
# data), server seed 1 in every run.
# Devices: system_profile(speed = lognormal(1000, 10), download =
# lognormal(2e4, 10), upload = lognormal(3e3, 10), latency = 0.05,
# dropout = 0.2, seed = 1): a median device trains 1,000 samples/s and has
# a 20 kB/s down, 3 kB/s up link (narrowband: the model is tiny, so slow
# links are what make its bytes matter), the fastest tenth 10x the slowest
# tenth on each axis, independently; 20% of the selected clients drop out.
# These medians put the median client's time at about 0.4 s of compute and
# 2 s of communication, while the slowest kept client of a round -- who
# sets its length -- is compute-bound in about 40% of the rounds (printed
# below from the first run's server$system_log). Profiles draw from a
# stream of their own (derived from their seed), so a profile seed equal to
# the data's does not tie device speed to data size.
#
# Runs: FedAvg without deadline (the reference: its `rounds` rounds set the
# simulated-time budget of every other run, which runs until it has used
# the same budget), FedAvg with a deadline (the reference's median round
# time: late clients are dropped), FedAvg with over-selection 1.3 (13
# selected, the first 10 to report kept), FedProx (mu = 0.01) without and
# with the same deadline (late clients send the local steps done by then),
# FedAvg + top-k 1% with error feedback, FedAvg + 8-bit QSGD, and FedBuff
# (asynchronous: 10 clients always training, a server step every 5
# arrivals, staleness weight 1 / sqrt(1 + staleness); one step is one row).
# Measured: simulated hours (and MB on the wire, both directions) until the
# mean test accuracy of the last 5 rounds first reaches the target, 90% of
# the best final accuracy (final = mean of the last 10 rounds); final
# accuracy; MB up and down over the whole budget; mean simulated round
# time; and the share of selected clients that dropped out, missed the
# deadline, were left over by over-selection (late) or sent partial work.
# One seed: differences of a few hundredths of an hour between runs that
# both reach the target are within noise. About a minute on 2 cores.
suppressPackageStartupMessages(library(fedagg))
options(width = 160)
args <- commandArgs(trailingOnly = TRUE)
rounds <- if (length(args) >= 1) as.integer(args[1]) else 300L
out_png <- if (length(args) >= 2) args[2] else "bench/time-to-accuracy.png"
cat(sprintf("fedagg %s | R %s | %d cores | %s\n\n", packageVersion("fedagg"), getRversion(),
            fedagg_threads()$cores, format(Sys.time(), "%Y-%m-%d")))
started <- Sys.time()

data <- synthetic_fedprox(1, 1, n_clients = 100, seed = 2026)
test <- pool_clients(data, "test")
model <- model_softmax(60, 10)
profile <- system_profile(speed = lognormal(1000, spread = 10), download = lognormal(2e4, 10),
                          upload = lognormal(3e3, 10), latency = 0.05, dropout = 0.2, seed = 1)
settings <- list(fraction = 0.1, epochs = 5, batch_size = 10, lr = 0.01, seed = 1)

# Fresh nodes for every run: a node keeps per-node state (the top-k
# residual, SCAFFOLD's control variate) between servers that share it.
run <- function(..., budget = NULL) {
  nodes <- fed_nodes(data, system = profile)
  srv <- do.call(fed_server, c(list(model, nodes, test_data = test), settings, list(...)))
  stop_rule <- if (!is.null(budget)) function(h) utils::tail(h$sim_time, 1) >= budget
  seconds <- system.time(srv$fit(if (is.null(budget)) rounds else 5L * rounds, verbose = FALSE,
                                 stop_when = stop_rule))[["elapsed"]]
  list(history = srv$history, log = srv$system_log, seconds = seconds)
}

cat(sprintf("Synthetic(1,1), 100 clients (%s training samples), softmax regression, 10 clients per round, E = 5, B = 10, lr = 0.01\n",
            format(sum(vapply(data$clients, function(k) length(k$y), numeric(1))), big.mark = ",")))
print(profile)
cat("\n")

runs <- list()
runs[["FedAvg"]] <- run()
budget <- utils::tail(runs$FedAvg$history$sim_time, 1)
deadline <- round(stats::median(runs$FedAvg$history$round_time), 1)

# Where the time goes, in the reference run.
log <- runs$FedAvg$log
kept <- log[log$status == "kept", ]
slowest <- do.call(rbind, lapply(split(kept, kept$round), function(d) d[which.max(d$finish), ]))
comm <- function(d) d$download + d$upload
cat(sprintf("FedAvg, %d rounds = %.2f simulated hours (the budget of every run)\n", rounds, budget / 3600))
cat(sprintf("  every kept client: median %.2f s compute, %.2f s download + upload; compute is %.0f%% of their time\n",
            stats::median(kept$compute), stats::median(comm(kept)), 100 * sum(kept$compute) / sum(kept$finish)))
cat(sprintf("  slowest kept client of each round: compute-bound in %.0f%% of the rounds; mean %.1f s compute, %.1f s communication\n",
            100 * mean(slowest$compute > comm(slowest)), mean(slowest$compute), mean(comm(slowest))))
cat(sprintf("  round time: %s\n", paste(sprintf("%s %.1f s", c("min", "q25", "median", "q75", "max"),
                                               stats::quantile(runs$FedAvg$history$round_time)), collapse = ", ")))
n_train <- vapply(data$clients, function(k) length(k$y), numeric(1))
full_time <- tapply(kept$finish, kept$client, max) # fixed by the client's profile and data size
slow <- names(full_time)[full_time > deadline]
cat(sprintf("  deadline for the runs below: %.1f s (the median round time); %d of the %d clients that reported are slower, holding %.0f%% of the training samples\n\n",
            deadline, length(slow), length(full_time), 100 * sum(n_train[slow]) / sum(n_train)))

# (In this order, runs that are compared get colours far apart in the plot.)
runs[[sprintf("FedAvg, deadline %gs", deadline)]] <- run(deadline = deadline, budget = budget)
runs[[sprintf("FedProx 0.01, deadline %gs", deadline)]] <- run(algorithm = fedprox(0.01), deadline = deadline,
                                                               budget = budget)
runs[["FedAvg, over-select 1.3"]] <- run(over_select = 1.3, budget = budget)
runs[["FedAvg + top-k 1% (EF)"]] <- run(compress = compress_topk(0.01), budget = budget)
runs[["FedAvg + 8-bit QSGD"]] <- run(compress = compress_quantize(8), budget = budget)
runs[["FedProx 0.01"]] <- run(algorithm = fedprox(0.01), budget = budget)
runs[["FedBuff K = 5, 10 concurrent"]] <- run(asynchronous = fedbuff(buffer_size = 5, concurrency = 10), budget = budget)

smooth <- function(a) as.numeric(stats::filter(a, rep(1 / 5, 5), sides = 1))
final_of <- function(h) mean(utils::tail(h$test_accuracy, 10))
target <- 0.9 * max(vapply(runs, function(r) final_of(r$history), numeric(1)))
to_target <- function(h, along) {
  hit <- which(smooth(h$test_accuracy) >= target)
  if (!length(hit)) return(NA_real_)
  along[hit[1]]
}
share <- function(log, status) round(100 * mean(log$status == status), 1)
table <- do.call(rbind, lapply(names(runs), function(name) {
  h <- runs[[name]]$history
  log <- runs[[name]]$log
  mb <- cumsum(h$bytes_down + h$bytes_up) / 1e6
  data.frame(run = name, rounds = nrow(h), to_target_h = round(to_target(h, h$sim_time / 3600), 3),
             to_target_MB = round(to_target(h, mb), 2), final_acc = round(final_of(h), 4),
             MB_up = round(sum(h$bytes_up) / 1e6, 2), MB_down = round(sum(h$bytes_down) / 1e6, 2),
             round_s = round(mean(h$round_time), 2), "dropout%" = share(log, "dropout"),
             "deadline%" = share(log, "deadline"), "late%" = share(log, "late"), "partial%" = share(log, "partial"),
             partial_work = if (any(log$status == "partial")) round(mean(log$work[log$status == "partial"]), 2) else NA,
             wall_s = round(runs[[name]]$seconds, 1), check.names = FALSE)
}))
cat(sprintf("Target: test accuracy %.4f (90%% of the best final accuracy; reached when the mean of the last 5 rounds first gets there)\n",
            target))
cat(sprintf("Simulated-time budget: %.2f hours. to_target_*: simulated hours and MB (up + down) to the target; round_s: mean simulated\nround time; *%%: shares of the selected clients; partial_work: mean share of its local steps a partial client did; wall_s: wall-clock seconds\n",
            budget / 3600))
print(table, row.names = FALSE)

# Plot ------------------------------------------------------------------------
cmp <- fed_compare(lapply(runs, `[[`, "history"))
grDevices::png(out_png, width = 1500, height = 620, res = 110)
graphics::par(mfrow = c(1, 2), oma = c(0, 0, 1.5, 0))
plot(cmp, metric = "test_accuracy", along = "time", main = "Test accuracy by simulated time")
graphics::abline(h = target, lty = 3, col = "grey40")
plot(cmp, metric = "test_accuracy", along = "bytes", main = "Test accuracy by data sent and received", log = "x",
     xaxt = "n")
ticks <- c(0.1, 0.3, 1, 3, 10, 30, 100)
graphics::axis(1, at = ticks, labels = format(ticks, drop0trailing = TRUE))
graphics::abline(h = target, lty = 3, col = "grey40")
graphics::mtext(sprintf("Synthetic(1,1), 100 heterogeneous devices, 10 per round, E = 5; dotted: target %.3f", target),
                side = 3, line = -1.5, outer = TRUE, cex = 0.9)
invisible(grDevices::dev.off())
cat(sprintf("\nWrote %s\nTotal %.0f s\n", out_png, as.numeric(difftime(Sys.time(), started, units = "secs"))))
