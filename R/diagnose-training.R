# The checks of how the model trains: client drift, the learning rate,
# the clients per round (see diagnose-checks.R).

# --- 1. Client drift --------------------------------------------------------

check_client_drift <- function(ev) {
  if (ev$asynchronous || is.null(ev$gap) || ev$diverging) return(NULL)
  gap <- ev$gap
  if (sum(is.finite(gap$ratio)) < 3) return(NULL)
  ratio <- ev$gap_ratio
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
  tr <- ev$trajectory
  smooth <- tr$smooth
  best <- tr$best
  last <- tr$last
  rise <- tr$rise
  diverged <- tr$diverged
  score <- if (diverged) 10 else diagnosis_score(rise, diagnosis_thresholds$lr_rise)
  # Privacy noise that swamps the update makes the loss random-walk upward,
  # even to above where it started; client drift makes it jump from round
  # to round with the clients selected while each client's own training
  # converges, but does not make it diverge. Those checks name the cause;
  # here it stays "info".
  noise <- isTRUE(ev$dp_noise_ratio >= diagnosis_thresholds$dp_noise)
  gap <- ev$gap_ratio
  drift <- isTRUE(gap >= diagnosis_thresholds$drift_gap) && !tr$diverging
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
