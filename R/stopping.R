#' Stop federated training early
#'
#' `early_stopping()` is a rule for `server$fit(rounds, stop_when = )`: after
#' each round, `fit()` stops when `metric` has not improved by more than
#' `min_delta` on its best value from before the last `patience` evaluated
#' rounds. Rounds without an evaluation (see `eval_every`) do not count. The
#' rounds done are kept; `server$stopped` tells when and why it stopped.
#'
#' `stop_training()` ends `fit()` from a hook: call it in `round_end` (the
#' round is kept) or `round_start` (that round does not run). Outside
#' `fit()` it is an error of class `fedagg_stop_training`.
#'
#' @param metric A column of the [fed_history] (default: the main metric,
#'   test then validation accuracy or RMSE, then loss).
#' @param patience Evaluated rounds without improvement before stopping.
#' @param min_delta Smallest change that counts as an improvement.
#' @param mode `"auto"` (accuracy is maximised, everything else minimised),
#'   `"min"` or `"max"`.
#' @param reason Text saying why training stopped.
#' @return `early_stopping()`: a `fed_early_stopping` rule.
#'   `stop_training()` does not return.
#' @examples
#' data <- synthetic_fedprox(0.5, 0.5, n_clients = 10, seed = 3)
#' srv <- fed_server(model_softmax(60, 10), fed_nodes(data), fraction = 0.5, lr = 0.05,
#'                   test_data = pool_clients(data, "test"), seed = 1)
#' h <- srv$fit(100, verbose = FALSE, stop_when = early_stopping("test_loss", patience = 3))
#' nrow(h)
#' srv$stopped
#'
#' # The same from a hook, with a rule of one's own
#' stop_at_80 <- function(server, round, record) {
#'   if (record$test_accuracy > 0.8) stop_training("test accuracy above 0.8")
#' }
#' srv2 <- fed_server(model_softmax(60, 10), fed_nodes(data), fraction = 0.5, lr = 0.05,
#'                    test_data = pool_clients(data, "test"), seed = 1,
#'                    hooks = list(round_end = stop_at_80))
#' srv2$fit(50, verbose = FALSE)
#' srv2$stopped
#' @export
early_stopping <- function(metric = NULL, patience = 5, min_delta = 0, mode = c("auto", "min", "max")) {
  if (!is.null(metric) && (!is.character(metric) || length(metric) != 1L || is.na(metric))) {
    fedagg_abort("{.arg metric} must be a column name of the history, not {obj_desc(metric)}.")
  }
  structure(list(metric = metric, patience = assert_count(patience, min = 1L),
                 min_delta = assert_number(min_delta, 0), mode = assert_choice(mode, c("auto", "min", "max"))),
            class = "fed_early_stopping")
}

#' @export
format.fed_early_stopping <- function(x, ...) {
  sprintf("<fed_early_stopping> %s: no improvement > %s in %d evaluated rounds (%s)",
          x$metric %||% "main metric", format(x$min_delta), x$patience, x$mode)
}

#' @export
print.fed_early_stopping <- function(x, ...) {
  cat(format(x), "\n", sep = "")
  invisible(x)
}

#' @rdname early_stopping
#' @export
stop_training <- function(reason = "stop_training() was called") {
  if (!is.character(reason) || length(reason) != 1L || is.na(reason)) {
    fedagg_abort("{.arg reason} must be a single string, not {obj_desc(reason)}.")
  }
  cnd <- structure(class = c("fedagg_stop_training", "error", "condition"),
                   list(message = paste("Training stopped:", reason), reason = reason, call = NULL))
  stop(cnd)
}

# The privacy budget would be exceeded: ends fit() like stop_training().
budget_exhausted <- function(reason) {
  cnd <- structure(class = c("fedagg_budget_exhausted", "fedagg_stop_training", "error", "condition"),
                   list(message = paste("Privacy budget exhausted:", reason), reason = reason, call = NULL))
  stop(cnd)
}

assert_stop_rule <- function(rule, call = rlang::caller_env()) {
  if (is.null(rule) || is.function(rule) || inherits(rule, "fed_early_stopping")) return(rule)
  fedagg_abort("{.arg stop_when} must be {.code NULL}, {.fn early_stopping} or a function of the history, not {obj_desc(rule)}.",
               call = call)
}

# NULL to go on, or the reason to stop.
stop_reason <- function(rule, history, call = rlang::caller_env()) {
  if (is.function(rule)) {
    stop <- call_user(rule, list(history), "The {.arg stop_when} function", round = max(history$round), call = call)
    if (!is.logical(stop) || length(stop) != 1L || is.na(stop)) {
      fedagg_abort("The {.arg stop_when} function must return TRUE or FALSE, not {obj_desc(stop)}.",
                   class = "user_code", call = call)
    }
    return(if (stop) "the stop_when function returned TRUE")
  }
  metric <- rule$metric %||% main_metric(history)
  if (!metric %in% names(history)) {
    fedagg_abort(c("{.fn early_stopping} watches {.val {metric}}, which is not a column of the history.",
                   i = "Columns: {.val {names(history)}}."), call = call)
  }
  values <- history[[metric]][!is.na(history[[metric]])]
  if (length(values) <= rule$patience) return(NULL)
  maximise <- if (rule$mode == "auto") metric_maximised(metric) else rule$mode == "max"
  before <- values[seq_len(length(values) - rule$patience)]
  recent <- utils::tail(values, rule$patience)
  improved <- if (maximise) any(recent > max(before) + rule$min_delta) else any(recent < min(before) - rule$min_delta)
  if (improved) return(NULL)
  sprintf("%s did not improve by more than %s in %d evaluated rounds", metric, format(rule$min_delta), rule$patience)
}
