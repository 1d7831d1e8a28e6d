# The checks of fed_diagnose(): one per cause of slow convergence. A check
# reads the evidence of a run (diagnosis_evidence()) and returns NULL (the
# cause does not apply, or the run lacks what it needs) or a finding made by
# diagnosis_finding(). A new cause is one function and one row of
# `diagnosis_checks` below.
#
# Each check turns its main measurement into a score with
# diagnosis_score(metric, threshold): below the threshold the score is
# metric / threshold (< 1, "info"), above it 1 + log2(metric / threshold),
# so each doubling past the threshold adds one: 1-2 "low", 2-3 "medium",
# >= 3 "high". Findings are ranked by score.
#
# The thresholds come from bench/diagnose.R: 19 seeded runs per seed (12
# with one injected cause, 7 healthy), seeds 1-3. The comments give the
# largest value a healthy run showed and the range over the runs where the
# cause was injected; each threshold sits between, with room on both sides.
diagnosis_thresholds <- list(
  # The global model's loss over the clients' own training loss (median
  # over rounds). Healthy: up to 1.72 (5 epochs on 24 samples per client);
  # E = 50 on Dirichlet(0.1): 20.7-21.4.
  drift_gap = 3,
  # Rise of the loss from its best round to the end, relative to the best.
  # Healthy: up to 0.026; lr x 20: 0.171-0.362 (both on a running median of 3).
  lr_rise = 0.05,
  # Loss decrease from the middle to the last third of the run over that
  # from the first to the middle third, for a loss that falls in most
  # rounds. Healthy: up to 0.158; lr / 50: 0.818-0.827.
  lr_late_ratio = 0.25,
  lr_monotone = 0.8,
  # max(10 % of the nodes / clients per round, 3 / clients per round): the
  # mission's 10-30 % rule, and at least a few clients (2 of 10 passes).
  # Healthy: up to 0.5; 1 client per round of 100: 10.
  few_clients = 2,
  # Norm of the DP noise on the mean update over the norm of the clipped
  # signal. Healthy (z = 0.5, 100 clients per round): up to 0.132; z = 20
  # with 6 clients per round: 75.3.
  dp_noise = 1,
  # Median client update norm over the clipping norm. Healthy: up to 0.92;
  # clip 0.001: 1,690-1,710.
  clip_ratio = 3,
  # Share of each round's clients lost to dropouts, deadlines or dropped
  # stragglers, plus the share of work cut short. Healthy: 0; 90 %
  # stragglers dropped, or a tight deadline: 0.533-0.833.
  lost_share = 0.25,
  # 1 % of the values kept over the fraction kept (top-k; twice that for
  # random-k), or 2^(4 - bits) for a quantizer. Healthy (top-k 10 %): 0.1;
  # top-k 0.1 %: 10.
  compression = 1,
  # Mean staleness of buffered updates, in server versions. Healthy (buffer
  # 5, concurrency 10): up to 1.75; buffer 3, concurrency 50: 10.9-11.1.
  staleness = 3,
  # Share of honest updates a robust rule or filter left out. Healthy (norm
  # filter, IID): up to 0.122; Krum on Dirichlet(0.1): 0.833.
  robust_discards = 0.2,
  # Nodes whose features drifted, plus rounds with norm or loss alerts in
  # which the loss rose by more than 5 %. Healthy run with the monitor: 0
  # (its norm and loss alerts came as the loss fell, or rose by less);
  # features shifted on 10 nodes: 10.
  drift_nodes = 1
)

# Scores stop at 10 (a thousand times the threshold): past that the
# ranking has nothing left to say.
diagnosis_score <- function(metric, threshold) {
  if (length(metric) != 1L || is.na(metric)) return(NA_real_)
  if (metric < threshold) return(max(0, metric / threshold))
  min(10, 1 + log2(metric / threshold))
}

# A finding, as one row's worth of fields. `signals` are the check's
# supporting observations (TRUE: this one agrees); the confidence is the
# share that agree, times how much of a run there is to judge (10 rounds
# or more: all of it).
diagnosis_finding <- function(ev, cause, score, symptom, evidence, likely_cause, levers, rounds, signals = TRUE,
                              measure = NA_real_) {
  sufficiency <- min(1, ev$n_rounds / 10)
  list(cause = cause, score = score, measure = measure, symptom = symptom, evidence = evidence, likely_cause = likely_cause,
       levers = levers, rounds = as.integer(sort(unique(rounds))),
       confidence = round(mean(signals, na.rm = TRUE) * sufficiency, 2))
}

# Numbers in evidence (R chooses scientific notation for the extreme ones).
diag_num <- function(x, digits = 3) format(signif(x, digits), big.mark = ",", trim = TRUE)

# Numbers in levers: code, so no thousands separators.
lever_num <- function(x, digits = 2) format(signif(x, digits), scientific = FALSE, trim = TRUE, drop0trailing = TRUE)

round_range <- function(rounds) {
  rounds <- sort(unique(rounds))
  if (length(rounds) == 0L) return("no rounds")
  if (length(rounds) == 1L) return(sprintf("round %d", rounds))
  sprintf("rounds %d-%d", min(rounds), max(rounds))
}

# --- 1. Client drift --------------------------------------------------------

check_client_drift <- function(ev) {
  if (ev$asynchronous || is.null(ev$gap) || ev$diverging) return(NULL)
  gap <- ev$gap
  if (sum(is.finite(gap$ratio)) < 3) return(NULL)
  ratio <- stats::median(gap$ratio, na.rm = TRUE)
  # The excess over 1 (no gap) is what is scored.
  score <- diagnosis_score(ratio - 1, diagnosis_thresholds$drift_gap - 1)
  epochs <- ev$settings$epochs_max %||% NA_real_
  coherence <- stats::median(utils::head(ev$coherence[is.finite(ev$coherence)], max(3, ev$n_rounds %/% 3)))
  cos_trend <- ev$trend("cosine_mean")
  rounds <- gap$round[is.finite(gap$ratio) & gap$ratio >= diagnosis_thresholds$drift_gap]
  levers <- c(if (is.finite(epochs) && epochs > 1) sprintf("epochs = %d", max(1L, as.integer(epochs %/% 5))),
              drift_algorithms(ev$settings))
  diagnosis_finding(
    ev, "client_drift", score, measure = ratio,
    symptom = "The clients' own training loss is far below the global model's loss.",
    evidence = paste0(
      sprintf("the global model's %s is %sx the clients' training loss (median over %s: %s vs %s)", ev$loss_col,
              diag_num(ratio), round_range(gap$round), diag_num(stats::median(gap$global)), diag_num(stats::median(gap$local))),
      if (is.finite(coherence)) sprintf("; update coherence %s in the first rounds (1: the clients agree, 0: unrelated)", diag_num(coherence, 2)),
      if (is.finite(epochs)) sprintf("; %s local epoch%s", diag_num(epochs), if (epochs == 1) "" else "s")),
    likely_cause = paste("Client drift: with heterogeneous (non-IID) data each client moves toward its own optimum,",
                         "more so with more local epochs, and the average of their models is a poor step for all."),
    levers = levers, rounds = if (length(rounds)) rounds else gap$round,
    signals = c(ratio >= diagnosis_thresholds$drift_gap, is.finite(coherence) && coherence < 0.2,
                is.finite(epochs) && epochs > 1, is.finite(cos_trend) && cos_trend < 0))
}

# The client algorithms that act on drift, from where the run stands: a
# stronger proximal term for FedProx, SCAFFOLD's correction otherwise.
drift_algorithms <- function(settings) {
  algorithm <- settings$algorithm %||% "fedavg"
  mu <- settings$algorithm_settings$mu
  c(if (identical(algorithm, "fedprox") && !is.null(mu)) sprintf("algorithm = fedprox(mu = %s)", lever_num(10 * mu))
    else if (!identical(algorithm, "scaffold")) "algorithm = fedprox(mu = 0.1)",
    if (!identical(algorithm, "scaffold")) "algorithm = scaffold()",
    if (identical(algorithm, "scaffold")) server_momentum_lever(settings))
}

# FedAvgM, unless the run already has server momentum.
server_momentum_lever <- function(settings) {
  if (identical(settings$server_optimizer_kind, "sgd") && isTRUE((settings$server_momentum %||% 0) > 0)) return(NULL)
  "server_optimizer = server_sgd(lr = 1, momentum = 0.9)"
}

# --- 2. Learning rate too high ---------------------------------------------

check_lr_too_high <- function(ev) {
  loss <- ev$loss
  if (nrow(loss) < 4) return(NULL)
  # On a running median of 3 rounds: a loss that zigzags down to its best
  # in the last round has not risen.
  smooth <- if (nrow(loss) >= 5) as.numeric(stats::runmed(loss$value, 3, endrule = "median")) else loss$value
  best <- which.min(smooth)
  last <- utils::tail(smooth, 1)
  all_losses <- ev$history[[ev$loss_col]]
  diverged <- any(is.infinite(all_losses) | is.nan(all_losses))
  rise <- if (diverged) Inf else (last - smooth[best]) / max(abs(smooth[best]), 1e-12)
  # A loss that ends above where it started is diverging.
  diverging <- diverged || last > smooth[1]
  score <- if (diverged) 10 else diagnosis_score(rise, diagnosis_thresholds$lr_rise)
  # Privacy noise that swamps the update makes the loss rise too, and so
  # does client drift: each client's own training converges (its loss far
  # below the global model's) while their average jumps from round to round
  # with the clients selected. Those checks name the cause; here it stays
  # "info".
  noise <- isTRUE(ev$dp_noise_ratio >= diagnosis_thresholds$dp_noise)
  gap <- if (!is.null(ev$gap) && !ev$asynchronous) stats::median(ev$gap$ratio, na.rm = TRUE) else NA_real_
  drift <- isTRUE(gap >= diagnosis_thresholds$drift_gap)
  # Noise that swamps the update makes the loss random-walk upward, so it
  # explains even a loss that ends above its start; drift does not.
  drift <- drift && !diverging
  if ((noise && !diverged) || drift) score <- min(score, 0.9)
  spikes <- sum(diff(loss$value) / utils::head(abs(loss$value), -1) > 0.1)
  gap_below_one <- isTRUE(gap < 1)
  lr <- ev$settings$lr
  diagnosis_finding(
    ev, "lr_too_high", score, measure = rise,
    symptom = if (diverged) "The loss diverged (non-finite values)." else "The loss rose after its best round and did not come back.",
    evidence = paste0(
      if (diverged) sprintf("%s became non-finite; its best was %s at round %d", ev$loss_col, diag_num(smooth[best]), loss$round[best])
      else sprintf("%s (running median of 3 rounds) best %s at round %d, %s at the end (%s%% higher)", ev$loss_col,
                   diag_num(smooth[best]), loss$round[best], diag_num(last), diag_num(100 * rise, 2)),
      sprintf("; %d round%s where the loss jumped by more than 10%%", spikes, if (spikes == 1) "" else "s"),
      if (gap_below_one) "; the clients' own training loss is above the global model's (their local steps overshoot)",
      if (noise && !diverged) "; the privacy noise explains the rise (see dp_noise), so this stays \"info\"",
      if (drift && !noise) "; client drift explains the rise (see client_drift), so this stays \"info\""),
    likely_cause = sprintf("The learning rate (%s) is too high for this model and data: steps overshoot the minimum%s.", diag_num(lr),
                           if (isTRUE((ev$settings$server_momentum %||% 0) >= 0.9)) ", and server momentum multiplies them" else ""),
    levers = c(if (isTRUE((ev$settings$server_momentum %||% 0) >= 0.9)) "server_optimizer = server_sgd(lr = 1, momentum = 0.5)",
               sprintf("lr = %s", lever_num(lr / 5)),
               if (identical(ev$settings$lr_schedule, "constant")) "lr_schedule = lr_step(0.9, every = 3)"),
    rounds = loss$round[seq(best, nrow(loss))],
    signals = c(rise >= diagnosis_thresholds$lr_rise, spikes >= 2, gap_below_one))
}

# --- 3. Learning rate too low, or a plateau -----------------------------------

# The pace of the last third against the first: the drop between the means
# of the first and middle thirds of the run, and between the middle and
# last. Near 0 for a run that has converged, near 1 for one still falling
# as fast as it started (means of thirds, not single rounds, so that an
# oscillating loss does not look like progress).
loss_pace <- function(loss) {
  n <- nrow(loss)
  if (n < 6) return(NULL)
  w <- n %/% 3L
  v <- loss$value
  parts <- list(seq_len(w), seq(w + 1, n - w), seq(n - w + 1, n))
  thirds <- vapply(parts, function(i) mean(v[i]), numeric(1))
  # Per round, also when the loss is evaluated every few rounds.
  centres <- vapply(parts, function(i) mean(loss$round[i]), numeric(1))
  early <- thirds[1] - thirds[2]
  late <- thirds[2] - thirds[3]
  list(early = early / (centres[2] - centres[1]), late = late / (centres[3] - centres[2]),
       ratio = if (early > 0) late / early else NA_real_, monotone = mean(diff(v) < 0), window = w)
}

check_lr_too_low <- function(ev) {
  pace <- loss_pace(ev$loss)
  if (is.null(pace) || !is.finite(pace$ratio)) return(NULL)
  # A loss that falls in most rounds: from 0 at 60 % of the rounds to 1 at
  # the threshold (80 %).
  steady <- min(1, max(0, (pace$monotone - 0.6) / (diagnosis_thresholds$lr_monotone - 0.6)))
  # Updates held small by clipping or swamped by noise are those checks'
  # findings, not the learning rate's.
  held <- (1 - ev$clipped_share) / (1 + max(0, ev$dp_noise_ratio, na.rm = TRUE))
  # A late pace above the early one (capped) is a slow start, not more.
  metric <- min(max(0, pace$ratio), 1.5) * steady * held
  score <- diagnosis_score(metric, diagnosis_thresholds$lr_late_ratio)
  lr <- ev$settings$lr
  n <- nrow(ev$loss)
  diagnosis_finding(
    ev, "lr_too_low", score, measure = metric,
    symptom = "The loss falls steadily but slowly, and is still falling at the end.",
    evidence = sprintf("%s fell %s per round over the last two thirds of the run and %s per round over the first two (ratio %s); it fell in %s%% of the evaluations",
                       ev$loss_col, diag_num(pace$late), diag_num(pace$early), diag_num(pace$ratio, 2),
                       diag_num(100 * pace$monotone, 2)),
    likely_cause = sprintf("The learning rate (%s) is too low, or the run too short: the model is far from converged.", diag_num(lr)),
    levers = c(sprintf("lr = %s", lever_num(lr * 5)), server_momentum_lever(ev$settings),
               if (!identical(ev$settings$server_optimizer_kind, "adam")) "server_optimizer = server_adam(lr = 0.01)"),
    rounds = ev$loss$round[seq(n - pace$window, n)],
    signals = c(pace$ratio >= diagnosis_thresholds$lr_late_ratio, pace$monotone >= diagnosis_thresholds$lr_monotone,
                ev$update_trend_flat))
}

check_plateau <- function(ev) {
  pace <- loss_pace(ev$loss)
  if (is.null(pace)) return(NULL)
  loss <- ev$loss
  best <- which.min(loss$value)
  since <- loss$round[nrow(loss)] - loss$round[best]
  # A loss well above its best at the end is rising, not on a plateau.
  if (sum(loss$round > loss$round[best]) < pace$window || ev$rising) return(NULL)
  diagnosis_finding(
    ev, "plateau", 0, measure = since,
    symptom = "The loss has not improved for a while.",
    evidence = sprintf("best %s %s at round %d; no better in the %d rounds since", ev$loss_col, diag_num(loss$value[best]),
                       loss$round[best], since),
    likely_cause = "The model has converged for these levers (or is on a plateau); more rounds will not help.",
    levers = sprintf("srv$fit(%d, stop_when = early_stopping(\"%s\", patience = %d))", ev$n_rounds, ev$loss_col,
                     max(3L, pace$window %/% 2L)),
    rounds = loss$round[seq(best, nrow(loss))])
}

# --- 4. Too few clients per round -------------------------------------------

check_too_few_clients <- function(ev) {
  k <- ev$expected_clients
  n <- ev$settings$n_clients
  if (is.null(n) || !is.finite(k) || ev$asynchronous || k >= n) return(NULL)
  metric <- max(0.1 * n / k, 3 / k)
  score <- diagnosis_score(metric, diagnosis_thresholds$few_clients)
  reach <- ev$reach
  pace <- loss_pace(ev$loss)
  rough <- !is.null(pace) && sum(abs(diff(ev$loss$value))) > 1.5 * abs(ev$loss$value[1] - utils::tail(ev$loss$value, 1))
  target <- min(n, max(ceiling(0.1 * n), 10L))
  diagnosis_finding(
    ev, "too_few_clients", score, measure = metric,
    symptom = "Each round hears from a small, changing sample of the federation.",
    evidence = paste0(sprintf("%s client%s per round of %d nodes (%s%%)", diag_num(k), if (k == 1) "" else "s", n, diag_num(100 * k / n, 2)),
                      if (!is.null(reach)) sprintf("; %s%% of the nodes were never selected in %d rounds", diag_num(100 * reach$never, 2), ev$n_rounds)),
    likely_cause = "Too few clients per round for how much the nodes differ: each aggregate follows the few clients it saw.",
    levers = c(if (identical(ev$settings$selection_kind, "poisson")) sprintf("selection = select_poisson(q = %s)", lever_num(target / n))
               else sprintf("fraction = %s", lever_num(target / n)),
               server_momentum_lever(ev$settings)),
    rounds = ev$history$round,
    signals = c(metric >= diagnosis_thresholds$few_clients, !is.null(reach) && reach$never > 0.1, rough))
}

# --- 5. DP noise and clipping bias ------------------------------------------

check_dp_noise <- function(ev) {
  ratio <- ev$dp_noise_ratio
  if (!is.finite(ratio)) return(NULL)
  p <- ev$settings$privacy_object
  score <- diagnosis_score(ratio, diagnosis_thresholds$dp_noise)
  k <- ev$expected_clients
  observed <- stats::median(ev$history$update_norm / ev$history$client_norm_mean, na.rm = TRUE)
  more <- min(1, 4 * k / ev$settings$n_clients)
  levers <- c(if (identical(ev$settings$selection_kind, "poisson")) sprintf("selection = select_poisson(q = %s)", lever_num(more))
              else sprintf("fraction = %s", lever_num(more)),
              if (p$kind == "central") sprintf("privacy = dp_central(noise_multiplier = %s, clip = %s%s)", lever_num(p$noise_multiplier / 2),
                                               if (!is.null(p$adaptive)) sprintf("clip_adaptive(count_noise = %s)", lever_num(max(p$noise_multiplier / 2, k / 20)))
                                               else lever_num(p$clip),
                                               if (isTRUE(p$per_layer)) ", per_layer = TRUE" else ""))
  diagnosis_finding(
    ev, "dp_noise", score, measure = ratio,
    symptom = "The privacy noise on the aggregate is as large as the update itself, or larger.",
    evidence = paste0(sprintf("noise norm on the mean update %s against a clipped signal of at most %s (ratio %s)",
                              diag_num(ev$dp_noise$noise), diag_num(ev$dp_noise$signal), diag_num(ratio)),
                      if (is.finite(observed)) sprintf("; the aggregate's norm is %sx the clients' mean norm", diag_num(observed, 2))),
    likely_cause = sprintf("%s: with %s clients per round and %s parameters the noise drowns the signal.",
                           p$label, diag_num(k), diag_num(ev$settings$n_params)),
    levers = levers, rounds = ev$history$round,
    signals = c(ratio >= diagnosis_thresholds$dp_noise, is.finite(observed) && observed > 2))
}

check_clipping_bias <- function(ev) {
  clip <- ev$clip
  # Per-layer clipping bounds each layer, and the log has whole-update norms:
  # the two do not compare.
  if (is.null(clip) || nrow(clip) < 3 || ev$per_layer_clip) return(NULL)
  ratio <- stats::median(clip$norm / clip$clip, na.rm = TRUE)
  share <- mean(clip$clipped, na.rm = TRUE)
  score <- diagnosis_score(ratio, diagnosis_thresholds$clip_ratio)
  suggested <- lever_num(stats::median(clip$norm, na.rm = TRUE))
  p <- ev$settings$privacy_object
  central <- identical(p$kind, "central")
  diagnosis_finding(
    ev, "clipping_bias", score, measure = ratio,
    symptom = "Almost every update is clipped, by a large factor.",
    evidence = sprintf("%s%% of the updates were clipped; the median norm of all updates is %sx the clipping norm (%s)", diag_num(100 * share, 2),
                       diag_num(ratio), diag_num(stats::median(clip$clip))),
    likely_cause = "The clipping norm is far below the updates' norms: every update is shrunk to a tiny step, biased toward the clients whose directions agree.",
    levers = if (central && !is.null(p$adaptive)) {
      sprintf("privacy = dp_central(noise_multiplier = %s, clip = clip_adaptive(quantile = %s))", lever_num(p$noise_multiplier),
              lever_num(min(0.9, (p$adaptive$quantile %||% 0.5) + 0.2)))
    } else if (central) {
      # The count noise clip_adaptive() needs: above z / 2.
      c(sprintf("privacy = dp_central(noise_multiplier = %s, clip = clip_adaptive(count_noise = %s))", lever_num(p$noise_multiplier),
                lever_num(max(p$noise_multiplier, ev$expected_clients / 20))),
        sprintf("privacy = dp_central(noise_multiplier = %s, clip = %s)", lever_num(p$noise_multiplier), suggested))
    } else {
      c(sprintf("clip = clip_norm(%s)", suggested), "clip = NULL")
    },
    rounds = unique(clip$round[clip$clipped %in% TRUE]),
    signals = c(ratio >= diagnosis_thresholds$clip_ratio, share > 0.9))
}

# --- 6. Stragglers and deadlines --------------------------------------------

check_stragglers <- function(ev) {
  if (ev$asynchronous) return(NULL)
  h <- ev$history
  s <- ev$settings
  sl <- ev$system_log
  # Lost from the system log: selected clients that dropped out or missed
  # the deadline (over-selected clients cut as "late" are by design).
  sys_lost <- 0
  lost_rounds <- integer()
  partial <- 0
  statuses <- NULL
  if (!is.null(sl) && nrow(sl)) {
    lost <- sl$status %in% c("dropout", "deadline")
    per_round <- tapply(lost, sl$round, mean)
    sys_lost <- mean(per_round)
    lost_rounds <- as.integer(names(per_round)[per_round > 0])
    statuses <- table(sl$status)
    kept <- sl$status %in% c("kept", "partial")
    if (any(kept) && "work" %in% names(sl)) partial <- mean(1 - sl$work[kept], na.rm = TRUE)
  }
  # Dropped stragglers never reach the system log: the share the setting
  # drops (with a fixed number of clients per round, what the history shows).
  dropped <- 0
  if (isTRUE(s$drop_stragglers) && isTRUE(s$stragglers > 0)) {
    m <- s$clients_per_round
    dropped <- if (identical(s$selection_kind, "poisson")) s$stragglers else mean(pmax(0, 1 - h$clients / m))
    lost_rounds <- sort(unique(c(lost_rounds, h$round[h$clients < m])))
  }
  metric <- sys_lost + dropped + partial
  score <- diagnosis_score(metric, diagnosis_thresholds$lost_share)
  profiles <- ev$has_profiles
  levers <- c(if (is.finite(s$deadline %||% Inf)) sprintf("deadline = %s", lever_num(2 * s$deadline)),
              if (profiles && (s$over_select %||% 1) <= 1) "over_select = 1.3",
              if (isTRUE(s$drop_stragglers)) "drop_stragglers = FALSE, algorithm = fedprox(mu = 0.01)",
              if (!isTRUE(s$drop_stragglers) && s$algorithm %in% "fedavg" && partial > 0) "algorithm = fednova()",
              if (profiles) "asynchronous = fedbuff()")
  diagnosis_finding(
    ev, "stragglers", score, measure = metric,
    symptom = "Rounds lose many of their clients, or their work.",
    evidence = paste0(sprintf("on average %s%% of each round's clients were lost", diag_num(100 * (sys_lost + dropped), 2)),
                      if (partial > 0) sprintf("; %s%% of the kept clients' work was cut short", diag_num(100 * partial, 2)),
                      if (length(statuses)) paste0(" (system log: ", paste(names(statuses), statuses, collapse = ", "), ")"),
                      if (dropped > 0) sprintf("; stragglers (%s%%) are dropped", diag_num(100 * s$stragglers, 2))),
    likely_cause = "Slow or unreliable clients: dropouts, stragglers and the round's deadline leave few updates per round.",
    levers = levers, rounds = lost_rounds,
    signals = c(metric >= diagnosis_thresholds$lost_share, any(h$clients == 0)))
}

# --- 7. Compression error ----------------------------------------------------

check_compression <- function(ev) {
  comp <- ev$settings$compress_object
  if (is.null(comp)) return(NULL)
  metric <- switch(comp$kind,
                   topk = , random_k = 0.01 / comp$fraction * if (comp$kind == "random_k") 2 else 1,
                   quantize = 2^(4 - comp$bits),
                   0)
  score <- diagnosis_score(metric, diagnosis_thresholds$compression)
  h <- ev$history
  ratio <- stats::median(h$bytes_up / h$bytes_down, na.rm = TRUE)
  residual <- ev$residual_ratio
  diagnosis_finding(
    ev, "compression", score, measure = metric,
    symptom = "Compressed updates carry little of what the clients learned.",
    evidence = paste0(sprintf("%s", comp$label),
                      if (is.finite(ratio)) sprintf("; uploads are %s%% of downloads", diag_num(100 * ratio, 2)),
                      if (is.finite(residual)) sprintf("; the error-feedback residuals' norm is %sx the clients' update norm", diag_num(residual, 2))),
    likely_cause = "The compressor drops most of each update; with error feedback the rest arrives rounds late.",
    levers = c(switch(comp$kind, quantize = "compress = compress_quantize(bits = 8)", "compress = compress_topk(0.05)"),
               "compress = NULL"),
    rounds = h$round,
    signals = c(metric >= diagnosis_thresholds$compression, is.finite(residual) && residual > 1))
}

# --- 8. Staleness in FedBuff --------------------------------------------------

check_staleness <- function(ev) {
  if (!ev$asynchronous) return(NULL)
  sl <- ev$system_log
  if (is.null(sl) || !nrow(sl) || all(is.na(sl$staleness))) return(NULL)
  mean_stale <- mean(sl$staleness, na.rm = TRUE)
  score <- diagnosis_score(mean_stale, diagnosis_thresholds$staleness)
  a <- ev$settings$asynchronous_object
  diagnosis_finding(
    ev, "staleness", score, measure = mean_stale,
    symptom = "Updates arrive computed on old versions of the model.",
    evidence = sprintf("mean staleness %s server versions (max %s) with %s", diag_num(mean_stale, 2),
                       diag_num(max(sl$staleness, na.rm = TRUE)), a$label),
    likely_cause = "Too many clients train at once for the buffer: by the time an update arrives the model has moved on.",
    levers = c(sprintf("asynchronous = fedbuff(buffer_size = %d, concurrency = %d)", a$buffer_size, max(a$buffer_size, a$concurrency %/% 4L)),
               sprintf("asynchronous = fedbuff(buffer_size = %d, concurrency = %d, staleness = \"polynomial\", power = 1)",
                       a$buffer_size, a$concurrency)),
    rounds = unique(sl$round[sl$staleness > diagnosis_thresholds$staleness]),
    signals = c(mean_stale >= diagnosis_thresholds$staleness))
}

# --- 9. Robust aggregation discarding honest updates -------------------------

check_robust_discards <- function(ev) {
  cl <- ev$client_log
  if (is.null(cl) || !nrow(cl)) return(NULL)
  honest <- !(cl$malicious %in% TRUE)
  kept <- rep(TRUE, nrow(cl))
  if ("krum_kept" %in% names(cl)) kept <- kept & !(cl$krum_kept %in% FALSE)
  if ("passed_filter" %in% names(cl)) kept <- kept & !(cl$passed_filter %in% FALSE)
  flagged <- ("krum_kept" %in% names(cl) && any(!is.na(cl$krum_kept))) || !is.null(ev$settings$filter)
  if (!flagged || !any(honest)) return(NULL)
  discarded <- mean(!kept[honest])
  score <- diagnosis_score(discarded, diagnosis_thresholds$robust_discards)
  attacked <- any(cl$malicious %in% TRUE)
  rule <- paste(c(ev$settings$aggregator, ev$settings$filter), collapse = " and ")
  diagnosis_finding(
    ev, "robust_discards", score, measure = discarded,
    symptom = "The robust rule leaves out many honest updates.",
    evidence = sprintf("%s left out %s%% of the honest updates (%d of %d)%s", rule, diag_num(100 * discarded, 2),
                       sum(!kept[honest]), sum(honest), if (attacked) "" else "; no client attacked"),
    likely_cause = "Under non-IID data honest updates differ a lot, and a rule built for outliers takes them for attacks.",
    levers = robust_levers(ev$settings, attacked),
    rounds = unique(cl$round[honest & !kept]),
    signals = c(discarded >= diagnosis_thresholds$robust_discards, !attacked))
}

# Milder rules than the run's: the plain mean when no one attacks, a
# trimmed mean for a rule that keeps one update, a looser norm filter.
robust_levers <- function(settings, attacked) {
  weighted <- identical(settings$aggregator, "weighted mean")
  f <- settings$filter_object
  c(if (!attacked && !weighted) "aggregator = agg_weighted()",
    if (!weighted) "aggregator = agg_trimmed_mean(0.1)",
    if (!is.null(f)) sprintf("filter = filter_norm(mad = %s)", lever_num(2 * (f$mad %||% 3))),
    if (!is.null(f) && !attacked) "filter = NULL",
    if (weighted && is.null(f)) character())
}

# --- 10. Concept drift ---------------------------------------------------------

# Feature alerts are direct: a node's data changed (KS tests on its old and
# new features). Alerts on update norms and losses also fire while a model
# converges (both shrink round after round), so they count only in rounds
# where the loss rose by more than 5 %.
check_concept_drift <- function(ev) {
  dl <- ev$drift_log
  if (is.null(dl) || !nrow(dl)) return(NULL)
  feature <- grepl("^feature", dl$signal)
  nodes <- unique(stats::na.omit(dl$client[feature]))
  v <- ev$loss$value
  rose <- ev$loss$round[c(FALSE, diff(v) / utils::head(abs(v), -1) > 0.05)]
  other_rounds <- intersect(unique(dl$round[!feature]), rose)
  metric <- length(nodes) + length(other_rounds)
  score <- diagnosis_score(metric, diagnosis_thresholds$drift_nodes)
  alert_rounds <- sort(unique(c(dl$round[feature], other_rounds)))
  if (!length(alert_rounds)) alert_rounds <- sort(unique(dl$round))
  signals <- table(ifelse(feature, "features", dl$signal))
  diagnosis_finding(
    ev, "concept_drift", score, measure = metric,
    symptom = "The data or the updates changed during the run.",
    evidence = paste0(sprintf("%d drift alert%s (by signal: %s)", nrow(dl), if (nrow(dl) == 1) "" else "s",
                              paste(names(signals), signals, collapse = ", ")),
                      sprintf("; %d node%s whose features changed%s", length(nodes), if (length(nodes) == 1) "" else "s",
                              if (length(nodes)) paste0(" (", paste(utils::head(nodes, 5), collapse = ", "),
                                                        if (length(nodes) > 5) ", ...", ")") else ""),
                      sprintf("; %d round%s with norm or loss alerts where the loss rose by more than 5%%", length(other_rounds),
                              if (length(other_rounds) == 1) "" else "s")),
    likely_cause = "Concept drift: some nodes' data changed, so the model chases a moving target.",
    levers = c(if (!identical(ev$settings$lr_schedule, "constant")) "lr_schedule = lr_constant()",
               sprintf("srv$drift_log[srv$drift_log$round >= %d, ]", alert_rounds[1])),
    rounds = alert_rounds,
    signals = c(length(nodes) > 0, length(other_rounds) > 0))
}

# The registry of checks: id, a short title, and the check.
diagnosis_checks <- list(
  client_drift = list(title = "Client drift", check = check_client_drift),
  lr_too_high = list(title = "Learning rate too high", check = check_lr_too_high),
  lr_too_low = list(title = "Learning rate too low", check = check_lr_too_low),
  too_few_clients = list(title = "Too few clients per round", check = check_too_few_clients),
  dp_noise = list(title = "DP noise dominates", check = check_dp_noise),
  clipping_bias = list(title = "Clipping bias", check = check_clipping_bias),
  stragglers = list(title = "Stragglers and deadlines", check = check_stragglers),
  compression = list(title = "Compression error", check = check_compression),
  staleness = list(title = "Stale updates (FedBuff)", check = check_staleness),
  robust_discards = list(title = "Robust rule drops honest updates", check = check_robust_discards),
  concept_drift = list(title = "Concept drift", check = check_concept_drift),
  plateau = list(title = "Converged or on a plateau", check = check_plateau)
)
