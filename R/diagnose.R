#' Why does a federated model converge slowly? A diagnosis of a run
#'
#' `fed_diagnose()` reads a run's history and logs and answers the question
#' for this run: which causes of slow convergence it shows, the numbers from
#' the run that show them (with their rounds), and the levers that address
#' each one, as code to paste into [fed_server()]. Everything it reads is
#' already on the server: losses, the clients' update norms and cosines, the
#' client, system, selection and drift logs and the levers' settings; no
#' node's data is needed.
#'
#' The causes it checks:
#' * `client_drift`: the clients' own training loss far below the global
#'   model's loss (non-IID data, many local epochs);
#' * `lr_too_high`: the loss rises after its best round, or diverges;
#' * `lr_too_low`: the loss still falls at the end as fast as at the start;
#' * `too_few_clients`: few clients per round for the federation's size;
#' * `dp_noise` and `clipping_bias`: privacy noise larger than the clipped
#'   signal; updates clipped by a large factor;
#' * `stragglers`: clients lost to dropouts, deadlines or dropped
#'   stragglers, and work cut short;
#' * `compression`: a compressor that drops most of each update;
#' * `staleness`: stale updates under [fedbuff()];
#' * `robust_discards`: a robust rule or filter that drops honest updates;
#' * `concept_drift`: alerts from [monitor_drift()];
#' * `plateau` (always "info"): no improvement for a third of the run;
#' * `no_held_out_loss` ("info"): the run has no validation or test loss, so
#'   client drift cannot be checked.
#'
#' A check whose symptom another cause explains stays "info": a loss that
#' rises under DP noise that swamps the update, or under client drift (but
#' not a loss that ends above where it started: that is divergence).
#'
#' The levers are code: `name = value` arguments of [fed_server()] (the
#' form [fed_tune()] reads with `from =`), or, for advice that is not a
#' server argument, a whole call (`srv$fit(rounds, stop_when = ...)`,
#' `nodes <- fed_nodes(x, y, partition, validation = 0.2)`).
#'
#' Each check turns its measurement into a score: below its threshold the
#' finding is "info", and each doubling past it raises it one step ("low",
#' "medium", "high"). The thresholds were set from seeded runs with one
#' injected cause each and from healthy runs (`bench/diagnose.R`): healthy
#' runs give nothing above "info". The confidence (0-1) is the share of a
#' check's supporting signals that agree, lowered for runs shorter than 10
#' rounds.
#'
#' The loss it follows is the validation loss when the nodes have a
#' validation split (see [fed_nodes()]), else the test loss, else the
#' clients' training loss; the drift check needs one of the first two.
#'
#' @param x A [Server] that has run at least 3 rounds, or its history (a
#'   `fed_history`); with a history, pass the logs it should read too.
#' @param client_log,system_log,selection_log,drift_log With a history: the
#'   server's logs of that run (`srv$client_log` and so on), or `NULL`. With
#'   a server they are read from it.
#' @return A `fed_diagnosis`: a data frame with one row per finding, the
#'   highest score first, with columns `cause`, `title`, `severity` (an
#'   ordered factor: info < low < medium < high), `score`, `measure` (what
#'   the check compares with its threshold: for `client_drift` the median
#'   ratio of the global loss to the clients' training loss, for
#'   `lr_too_high` the rise of the loss from its best (on a running median
#'   of 3 rounds), for `lr_too_low` the late over the early pace of the loss,
#'   lowered when the loss does not fall in most rounds or clipping holds the
#'   updates; see `diagnosis_thresholds` in R/diagnose-checks.R and
#'   `bench/README.md`), `confidence`,
#'   `symptom`, `evidence`, `likely_cause`, `levers` (code, separated by
#'   `"; "`), `rounds` (where the evidence comes from), `first_round` and
#'   `last_round`. `print()`, `format()`, `summary()` and `plot()` (the loss
#'   with each finding's rounds marked) have methods.
#' @seealso [fed_history] for the diagnostics it reads,
#'   `vignette("convergence", package = "fedagg")`.
#' @examples
#' set.seed(1)
#' x <- matrix(rnorm(3000), 600)
#' y <- factor(max.col(x[, 1:3]))
#' parts <- partition_dirichlet(y, n_clients = 10, alpha = 0.1, min_size = 10, seed = 1)
#' nodes <- fed_nodes(x, y, parts, validation = 0.2, seed = 1)
#' srv <- fed_server(model_softmax(5, 3), nodes, fraction = 0.5, epochs = 50, lr = 0.1, seed = 1)
#' srv$fit(12)
#' d <- fed_diagnose(srv)
#' d
#' summary(d)
#' plot(d)
#' @export
fed_diagnose <- function(x, client_log = NULL, system_log = NULL, selection_log = NULL, drift_log = NULL) {
  check_required_args()
  ev <- diagnosis_evidence(x, client_log, system_log, selection_log, drift_log)
  findings <- run_diagnosis_checks(ev)
  # Checks far below their threshold are left out; the plateau is always
  # said when it holds.
  findings <- Filter(function(f) f$score >= 0.5 || f$cause == "plateau", findings)
  if (!ev$held_out) {
    findings$no_held_out_loss <- c(diagnosis_finding(
      ev, "no_held_out_loss", 0,
      symptom = "No validation or test loss: the run cannot be checked for client drift.",
      evidence = "the history has no val_loss or test_loss",
      likely_cause = "The nodes have no validation split and the server no test data.",
      levers = "nodes <- fed_nodes(x, y, partition, validation = 0.2)",
      rounds = integer(), measure = NA_real_), title = "No held-out loss")
    findings$no_held_out_loss$confidence <- NA_real_
  }
  new_fed_diagnosis(findings, ev)
}

# The registry of checks: id, a short title, and the check (defined in
# diagnose-training.R and diagnose-systems.R, which R loads before this file).
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

# Every check that applies to the run, whatever its score (bench/diagnose.R
# reads the healthy runs' measures from here).
run_diagnosis_checks <- function(ev) {
  findings <- list()
  for (id in names(diagnosis_checks)) {
    f <- diagnosis_checks[[id]]$check(ev)
    if (!is.null(f) && !is.na(f$score)) {
      f$title <- diagnosis_checks[[id]]$title
      findings[[id]] <- f
    }
  }
  findings
}

diagnosis_measures <- function(x) {
  ev <- diagnosis_evidence(x, NULL, NULL, NULL, NULL)
  findings <- run_diagnosis_checks(ev)
  data.frame(cause = names(findings), measure = vapply(findings, function(f) f$measure, numeric(1)),
             score = vapply(findings, function(f) f$score, numeric(1)), row.names = NULL)
}

new_fed_diagnosis <- function(findings, ev) {
  scores <- vapply(findings, function(f) f$score, numeric(1))
  findings <- findings[order(-scores)]
  field <- function(name, type) unname(vapply(findings, function(f) f[[name]], type))
  rounds <- lapply(findings, function(f) f$rounds)
  levers <- lapply(findings, function(f) f$levers)
  score <- field("score", numeric(1))
  df <- data.frame(
    cause = field("cause", character(1)), title = field("title", character(1)),
    severity = cut(score, c(-Inf, 1, 2, 3, Inf), right = FALSE, labels = c("info", "low", "medium", "high"),
                   ordered_result = TRUE),
    score = round(score, 2), measure = signif(field("measure", numeric(1)), 4), confidence = field("confidence", numeric(1)),
    symptom = field("symptom", character(1)), evidence = field("evidence", character(1)),
    likely_cause = field("likely_cause", character(1)),
    levers = unname(vapply(levers, paste, character(1), collapse = "; ")),
    rounds = unname(vapply(rounds, round_range, character(1))),
    first_round = unname(vapply(rounds, function(r) if (length(r)) min(r) else NA_integer_, integer(1))),
    last_round = unname(vapply(rounds, function(r) if (length(r)) max(r) else NA_integer_, integer(1))),
    stringsAsFactors = FALSE)
  # The rounds and levers of each finding, by cause: they follow the rows
  # through any subset.
  structure(df, class = c("fed_diagnosis", "data.frame"), round_sets = rounds, lever_sets = levers,
            loss = ev$loss, loss_col = ev$loss_col, n_rounds = ev$n_rounds, run = ev$run_label)
}

# Everything the checks read, computed once.
diagnosis_evidence <- function(x, client_log, system_log, selection_log, drift_log, call = rlang::caller_env()) {
  residuals <- NULL
  if (inherits(x, "Server")) {
    history <- x$history
    client_log <- x$client_log
    system_log <- x$system_log
    selection_log <- x$selection_log
    drift_log <- x$drift_log
    residuals <- node_residual_norms(x)
  } else if (inherits(x, "fed_history")) {
    history <- x
    client_log <- check_diagnosis_log(client_log, c("round", "client", "n_samples", "train_loss"), "client_log", call)
    system_log <- check_diagnosis_log(system_log, c("round", "client", "status"), "system_log", call)
    selection_log <- check_diagnosis_log(selection_log, c("round", "client", "picked"), "selection_log", call)
    drift_log <- check_diagnosis_log(drift_log, c("round", "signal", "client"), "drift_log", call)
  } else {
    fedagg_abort("{.arg x} must be a {.cls Server} or a {.cls fed_history}, not {obj_desc(x)}.", call = call)
  }
  h <- as.data.frame(history)
  settings <- attr(history, "settings")
  if (nrow(h) < 3) {
    fedagg_abort(c("{.fn fed_diagnose} needs a run of at least 3 rounds; this one has {nrow(h)}.",
                   i = "Run {.code srv$fit(rounds)} first."), call = call)
  }
  if (is.null(settings$clients_per_round) || is.null(settings$n_clients)) {
    fedagg_abort("{.arg x} has no settings (a history made by a {.cls Server} carries them).", call = call)
  }
  has <- function(col) col %in% names(h) && any(is.finite(h[[col]]))
  loss_col <- if (has("val_loss")) "val_loss" else if (has("test_loss")) "test_loss" else "train_loss"
  keep <- is.finite(h[[loss_col]])
  loss <- data.frame(round = h$round[keep], value = h[[loss_col]][keep])
  # An environment, not a list: `ev$clip` must never match `ev$clipped_share`.
  ev <- list2env(list(history = h, settings = settings, loss_col = loss_col, loss = loss, n_rounds = nrow(h),
                      held_out = loss_col != "train_loss", client_log = client_log, system_log = system_log,
                      drift_log = drift_log, asynchronous = !is.null(settings$asynchronous_object),
                      run_label = sprintf("%d rounds of %s", nrow(h), settings$algorithm_label %||% "a federation")),
                 envir = new.env(parent = emptyenv()))
  ev$gap <- if (ev$held_out) loss_gap(h, loss_col, client_log) else NULL
  # Clients per round as the accountant counts them (Poisson selection: q
  # times the eligible nodes).
  ev$expected_clients <- settings$expected_clients %||% settings$clients_per_round
  ev$trajectory <- loss_trajectory(loss, h[[loss_col]])
  ev$diverging <- ev$trajectory$diverging
  ev$rising <- isTRUE(ev$trajectory$rise >= diagnosis_thresholds$lr_rise)
  ev$gap_ratio <- if (!is.null(ev$gap) && !ev$asynchronous) stats::median(ev$gap$ratio, na.rm = TRUE) else NA_real_
  ev$has_profiles <- !is.null(system_log) && "compute" %in% names(system_log) && any(is.finite(system_log$compute))
  ev$per_layer_clip <- isTRUE(settings$clip_object$per_layer) || isTRUE(settings$privacy_object$per_layer)
  k <- h$clients
  ev$coherence <- ifelse(k >= 2, (1 / h$gradient_diversity - 1) / (k - 1), NA_real_)
  ev$trend <- function(col) {
    v <- h[[col]]
    ok <- is.finite(v)
    if (sum(ok) < 4 || stats::sd(v[ok]) == 0) return(NA_real_)
    stats::cor(h$round[ok], v[ok], method = "spearman")
  }
  norms <- h$client_norm_mean[is.finite(h$client_norm_mean)]
  ev$update_trend_flat <- length(norms) >= 4 && utils::tail(norms, 1) / norms[1] > 0.7
  ev$clip <- clip_evidence(h, settings, client_log)
  ev$clipped_share <- if (!is.null(ev$clip)) mean(ev$clip$clipped, na.rm = TRUE) else 0
  ev$dp_noise <- dp_noise_evidence(h, settings, ev$expected_clients)
  ev$dp_noise_ratio <- if (is.null(ev$dp_noise)) NA_real_ else ev$dp_noise$noise / ev$dp_noise$signal
  ev$reach <- if (!is.null(selection_log) && nrow(selection_log)) {
    list(never = 1 - length(unique(selection_log$client[selection_log$picked %in% TRUE])) / settings$n_clients)
  }
  ev$residual_ratio <- if (length(residuals) && length(norms)) stats::median(residuals) / stats::median(norms) else NA_real_
  ev
}

# Where the loss went, on a running median of 3 rounds (a loss that zigzags
# down to its best in the last round has not risen): its best, its end,
# the rise from one to the other, and whether it diverged (non-finite
# values) or ends above where it started.
loss_trajectory <- function(loss, all_losses) {
  smooth <- if (nrow(loss) >= 5) as.numeric(stats::runmed(loss$value, 3, endrule = "median")) else loss$value
  diverged <- any(is.infinite(all_losses) | is.nan(all_losses))
  if (!length(smooth)) return(list(smooth = smooth, best = NA_integer_, last = NA_real_, rise = NA_real_, diverged = diverged,
                                   diverging = diverged))
  best <- which.min(smooth)
  last <- utils::tail(smooth, 1)
  list(smooth = smooth, best = best, last = last, diverged = diverged, diverging = diverged || last > smooth[1],
       rise = if (diverged) Inf else (last - smooth[best]) / max(abs(smooth[best]), 1e-12))
}

check_diagnosis_log <- function(log, columns, arg, call) {
  if (is.null(log)) return(NULL)
  if (!is.data.frame(log) || !all(columns %in% names(log))) {
    fedagg_abort(c("{.arg {arg}} must be the server's {.field {arg}} (a data frame with columns {.val {columns}}), not {obj_desc(log)}.",
                   i = "Pass {.code srv${arg}}, or {.code NULL}."), call = call)
  }
  log
}

# Per round: the global model's loss after the round against the clients'
# training loss during it (weighted by samples).
loss_gap <- function(h, loss_col, client_log) {
  if (is.null(client_log) || !nrow(client_log)) return(NULL)
  ok <- is.finite(client_log$train_loss) & is.finite(client_log$n_samples) & client_log$n_samples > 0
  cl <- client_log[ok, , drop = FALSE]
  if (!nrow(cl)) return(NULL)
  local <- tapply(cl$train_loss * cl$n_samples, cl$round, sum) / tapply(cl$n_samples, cl$round, sum)
  rounds <- intersect(h$round[is.finite(h[[loss_col]])], as.integer(names(local)))
  if (!length(rounds)) return(NULL)
  global <- h[[loss_col]][match(rounds, h$round)]
  local <- unname(local[as.character(rounds)])
  data.frame(round = rounds, global = global, local = local, ratio = ifelse(local > 0, global / local, NA_real_))
}

# The clipping norm each clipped update met, with the update's norm.
clip_evidence <- function(h, settings, client_log) {
  if (is.null(client_log) || !"clipped" %in% names(client_log) || all(is.na(client_log$clipped))) return(NULL)
  p <- settings$privacy_object
  per_round <- if (!is.null(p$adaptive) || (!is.null(p) && is.null(p$clip))) {
    h$clip[match(client_log$round, h$round)]
  } else if (!is.null(p$clip)) {
    rep(p$clip, nrow(client_log))
  } else if (!is.null(settings$clip_object$max_norm)) {
    rep(settings$clip_object$max_norm, nrow(client_log))
  } else {
    h$clip[match(client_log$round, h$round)]
  }
  ok <- !is.na(client_log$clipped) & is.finite(per_round) & per_round > 0
  if (!any(ok)) return(NULL)
  data.frame(round = client_log$round[ok], norm = client_log$update_norm[ok], clipped = client_log$clipped[ok],
             clip = per_round[ok])
}

# The norm of the privacy noise on the mean update, and the largest norm
# the clipped signal can have.
dp_noise_evidence <- function(h, settings, k) {
  p <- settings$privacy_object
  d <- settings$n_params
  if (is.null(p) || is.null(d)) return(NULL)
  client_norm <- stats::median(h$client_norm_mean, na.rm = TRUE)
  if (p$kind == "central") {
    clip <- if (!is.null(p$adaptive) || is.null(p$clip)) stats::median(h$clip, na.rm = TRUE) else p$clip
    # Adaptive clipping spends part of the budget on the count: the update's
    # noise multiplier is then larger than z.
    z <- if (!is.null(p$adaptive)) tryCatch(adaptive_noise(p, k)$update, error = function(e) p$noise_multiplier)
         else p$noise_multiplier
    noise <- z * clip * sqrt(d) / k
  } else {
    clip <- p$clip
    noise <- p$sd * sqrt(d) / sqrt(k)
  }
  signal <- min(clip, client_norm, na.rm = TRUE)
  if (!is.finite(noise) || !is.finite(signal) || signal <= 0) return(NULL)
  list(noise = noise, signal = signal)
}

# Norms of the error-feedback residuals the nodes keep for this server.
node_residual_norms <- function(server) {
  norms <- vapply(server$nodes, function(node) {
    state <- tryCatch(node$state, error = function(e) NULL)
    r <- state$residual
    if (is.numeric(r) && length(r)) sqrt(sum(r^2)) else NA_real_
  }, numeric(1))
  norms[is.finite(norms)]
}
