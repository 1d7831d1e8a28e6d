#' Monitor drift during training
#'
#' @description
#' `monitor_drift(window, alpha)` watches a [Server]'s rounds for
#' distribution shifts. After each round it runs two-sample
#' Kolmogorov-Smirnov tests ([ks_test()], in Rust) comparing the last
#' `window` rounds with the `window` rounds before them, on
#' * the clients' update norms and
#' * their training losses (from the client log);
#'
#' and, for every node whose data changed since the monitor last saw it
#' (see `node$set_data()`), its features before and after the change, one
#' test per feature ([ks_drift()]). Tests with a p-value below `alpha` are
#' alerts: they go into `server$drift_log` (round, signal, client,
#' statistic, p-value), the history counts them (`drift_alerts`) and
#' `plot(history)` marks their rounds. Windows slide by one round, so a
#' lasting shift raises alerts for several rounds.
#'
#' @param window Rounds in each window, at least 2 and at most 5e8 (half of
#'   `start`'s bound).
#' @param alpha Significance level, in (0, 1).
#' @param features Also test the features of nodes whose data changed?
#' @param start First round of the window tests (`NULL`: `2 * window`, the
#'   first round with two full windows), at most 1e9. A later start skips the
#'   rounds in which a model is still settling, when norms and losses change
#'   anyway.
#' @param adjust Multiple-testing adjustment of a changed node's per-feature
#'   p-values, one of [stats::p.adjust.methods] (e.g. `"holm"`; default
#'   `"none"`).
#'
#' @section Caveats:
#' The window tests treat every client's value as an independent sample;
#' they are not (the same clients recur, and training itself changes norms
#' and losses), so they alert more often than `alpha` while a model is still
#' settling: start them after a warm-up (`start`), or lower `alpha`. A node with
#' many features gets one test per feature: use `adjust`.
#' @return A `fed_monitor`.
#' @examples
#' data <- synthetic_fedprox(1, 1, n_clients = 12, seed = 1)
#' nodes <- fed_nodes(data)
#' # A covariate shift on a third of the nodes at round 8.
#' shift <- function(server, round, record) {
#'   if (round == 8) {
#'     for (n in server$nodes[1:4]) {
#'       d <- data$clients[[n$id]]
#'       n$set_data(d$x + 2, d$y)
#'     }
#'   }
#' }
#' srv <- fed_server(model_softmax(60, 10), nodes, fraction = 0.5, lr = 0.05, seed = 1,
#'                   monitor = monitor_drift(window = 3), hooks = list(round_end = shift))
#' h <- srv$fit(14, verbose = FALSE)
#' head(srv$drift_log)
#' plot(h)
#' @export
monitor_drift <- function(window = 5, alpha = 0.05, features = TRUE, adjust = "none", start = NULL) {
  window <- assert_count(window, min = 2L)
  start <- assert_count(start, min = 1L, allow_null = TRUE)
  # Round numbers are integers: the bounds keep 2 * window (and the window
  # arithmetic of every round) within R's integers.
  if (window > max_monitor_round %/% 2L) {
    fedagg_abort("{.arg window} must be at most {max_monitor_round %/% 2L} rounds, not {window}.")
  }
  if (!is.null(start) && start > max_monitor_round) {
    fedagg_abort("{.arg start} must be at most round {max_monitor_round}, not {start}.")
  }
  if (!is.null(start) && start < 2L * window) {
    fedagg_abort("{.arg start} must be at least 2 * {.arg window} = {2L * window} (two full windows), not {start}.")
  }
  alpha <- assert_number(alpha, 0, 1, lower_open = TRUE, upper_open = TRUE)
  features <- assert_flag(features)
  adjust <- assert_choice(adjust, stats::p.adjust.methods)
  structure(list(window = window, alpha = alpha, features = features, adjust = adjust, start = start %||% (2L * window),
                 label = sprintf("KS drift tests (window %d, alpha %s%s)", window, format(alpha),
                                 if (features) ", features of changed nodes" else "")),
            class = c("fed_monitor", "fed_part"))
}

# The latest round monitor_drift() accepts as `start` (and as 2 * window).
max_monitor_round <- 1000000000L

assert_monitor <- function(x, call = rlang::caller_env()) {
  if (is.null(x) || inherits(x, "fed_monitor")) return(x)
  fedagg_abort("{.arg monitor} must come from {.fn monitor_drift}, not {obj_desc(x)}.", call = call)
}

drift_log_columns <- c("round", "signal", "client", "statistic", "p_value")

# The alerts of round r: rows of the drift log, and the data versions seen.
# Pure: the server keeps both only if the round commits.
monitor_round <- function(private, r, info) {
  mon <- private$.monitor
  seen <- private$.state$seen_versions
  if (is.null(mon)) return(list(alerts = NULL, seen = seen))
  alerts <- list()
  w <- mon$window
  if (r >= mon$start) {
    # Only the rounds of the two windows, not the whole log.
    logs <- c(utils::tail(private$.state$client_log, 2L * w - 1L), list(c(list(round = r), info)))
    rounds <- vapply(logs, function(e) as.integer(e$round), integer(1))
    values <- function(field, from, to) {
      v <- unlist(lapply(logs[rounds >= from & rounds <= to], `[[`, field))
      v[is.finite(v)]
    }
    for (signal in c("update_norm", "train_loss")) {
      before <- values(signal, r - 2L * w + 1L, r - w)
      now <- values(signal, r - w + 1L, r)
      if (length(before) && length(now)) {
        test <- withCallingHandlers(ks_test(before, now, threads = private$.threads),
                                    fedagg_warning_ks_ties = function(cnd) invokeRestart("muffleWarning"))
        if (test$p.value < mon$alpha) {
          alerts[[length(alerts) + 1L]] <- list(round = r, signal = signal, client = NA_character_,
                                                statistic = unname(test$statistic), p_value = test$p.value)
        }
      }
    }
  }
  if (mon$features) {
    # Only nodes whose data changed since they were last tested.
    versions <- node_roster(private)$data_version
    changed <- which(versions > 0L)
    changed <- changed[versions[changed] > vapply(names(private$.nodes)[changed], function(id) seen[[id]] %||% 0L,
                                                   integer(1))]
    for (node in private$.nodes[changed]) {
      version <- node$data_version
      if (version > (seen[[node$id]] %||% 0L)) {
        drift <- node$data_drift(alpha = mon$alpha, adjust = mon$adjust, threads = private$.threads)
        for (k in which(drift$drift)) {
          alerts[[length(alerts) + 1L]] <- list(round = r, signal = paste("feature", drift$feature[k]),
                                                client = node$id, statistic = drift$statistic[k],
                                                p_value = drift$p_value[k])
        }
        seen[[node$id]] <- version
      }
    }
  }
  list(alerts = alerts, seen = seen)
}
