# The checks of fed_diagnose(): one per cause of slow convergence, in
# diagnose-training.R (drift, learning rate, clients per round) and
# diagnose-systems.R (privacy, systems, robustness, data drift); this file
# holds what they share. A check reads the evidence of a run
# (diagnosis_evidence()) and returns NULL (the cause does not apply, or the
# run lacks what it needs) or a finding made by diagnosis_finding(). A new
# cause is one function and one row of `diagnosis_checks` (diagnose.R).
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
