# The checks of what the round does to the updates and who sends them:
# privacy, stragglers, compression, staleness, robust rules, data drift
# (see diagnose-checks.R).

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
