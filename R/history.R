#' Training history of a federated run
#'
#' `Server$fit()` returns a `fed_history`: a data frame with one row per
#' round and columns
#' * `round`, `clients` (selected), `lr` (this round's learning rate);
#' * `train_loss`: the aggregation-weighted mean of the clients' local
#'   training losses; `loss_spread`: their standard deviation, a quick gauge
#'   of client heterogeneity (large and persistent spread is the usual sign
#'   of non-IID drift);
#' * `test_loss`, `test_accuracy` (or `test_rmse`): on the server's test set;
#' * `val_loss`, `val_accuracy` (or `val_rmse`): on all nodes' held-out
#'   data, weighted by its size;
#' * diagnostics of the round's updates (see [fed_server()]): `update_norm`,
#'   `client_norm_mean`, `client_norm_sd`, `cosine_mean`,
#'   `gradient_diversity`;
#' * `epsilon`: with [dp_central()], the privacy spent so far (at its
#'   `delta`); `clip`: the clipping bound of the round;
#' * `drift_alerts`: with [monitor_drift()], the round's alerts (see
#'   `server$drift_log`); `plot()` marks these rounds;
#' * `round_time` and `sim_time`: with [system profiles][system_profile],
#'   the simulated seconds of the round and since the start (`NA`
#'   without); `bytes_down` and `bytes_up`: the bytes the round sent to its
#'   clients and received from them (float64 parameters, or the
#'   [compression]'s exact encoding).
#'
#' Metrics are `NA` in rounds that were not evaluated (`eval_every`). The
#' history holds no wall-clock times, so runs with the same seed give
#' `identical()` histories; times per round are in `server$timings`.
#'
#' Note that `train_loss` is measured on each client's own data while it
#' trains: on non-IID clients it can be low even when the global model is
#' poor (each client fits its own skewed labels), so judge a run by
#' `test_loss` or `val_loss`. `plot()` draws the losses and the accuracy (or
#' RMSE) with base graphics; `autoplot()` does it with ggplot2 when
#' installed. [fed_compare()] overlays several runs.
#'
#' @param x,object A `fed_history`.
#' @param metric For `plot()` and `autoplot()`: the columns to draw (default:
#'   the losses, then accuracy or RMSE, in two panels), or `"diagnostics"`
#'   for the update diagnostics in four panels.
#' @param along For `plot()`: the x axis, `"round"`, `"time"` (simulated
#'   hours, `sim_time`) or `"bytes"` (megabytes sent and received so far).
#' @param ... Passed on to `plot()` for base graphics; unused otherwise.
#' @return `summary()` a `summary.fed_history` list; `plot()` `x`,
#'   invisibly; `autoplot()` a ggplot.
#' @examples
#' data <- synthetic_fedprox(0.5, 0.5, n_clients = 10, seed = 3)
#' srv <- fed_server(model_softmax(60, 10), fed_nodes(data), fraction = 0.5,
#'                   lr = 0.05, test_data = pool_clients(data, "test"), seed = 1)
#' h <- srv$fit(5, verbose = FALSE)
#' h
#' summary(h)
#' plot(h)
#' @name fed_history
NULL

diagnostic_columns <- c("update_norm", "client_norm_mean", "client_norm_sd", "cosine_mean", "gradient_diversity")

new_fed_history <- function(records, model, settings) {
  m <- metric_name(model)
  columns <- c("round", "clients", "lr", "train_loss", "loss_spread", "test_loss", paste0("test_", m),
               "val_loss", paste0("val_", m), diagnostic_columns, "epsilon", "clip", "drift_alerts",
               "round_time", "sim_time", "bytes_down", "bytes_up")
  # A column at a time, each in one unlist() where every round has its
  # single value: the history is built at the end of every fit(), and one
  # R call per cell cost about 1 ms per 20 rounds. No closure here sees
  # `records`: one would keep a second reference to the server's log after
  # this returns, and the next round would copy the log to append to it.
  cols <- stats::setNames(vector("list", length(columns)), columns)
  for (col in columns) {
    values <- lapply(records, `[[`, col)
    cols[[col]] <- if (all(lengths(values) == 1L)) as.double(unlist(values, use.names = FALSE))
                   else vapply(values, history_cell, numeric(1))
  }
  cols$round <- as.integer(cols$round)
  cols$clients <- as.integer(cols$clients)
  structure(cols, class = c("fed_history", "data.frame"), row.names = .set_row_names(length(records)),
            settings = settings, task = model$task)
}

history_cell <- function(value) as.double(value %||% NA_real_)

history_label <- function(x) {
  s <- attr(x, "settings")
  if (is.null(s)) return("run")
  sprintf("%s, %s", s$algorithm_label %||% s$algorithm, s$model)
}

#' @rdname fed_history
#' @export
format.fed_history <- function(x, ...) {
  s <- attr(x, "settings")
  local <- if (is.null(s)) NULL else if (identical(s$algorithm, "fedsgd")) "full-batch gradients"
           else sprintf("E = %s, B = %s", format(s$epochs), format(s$batch_size))
  c(sprintf("<fed_history> %s: %d round%s", history_label(x), nrow(x), if (nrow(x) == 1L) "" else "s"),
    if (!is.null(s)) sprintf("%d of %d clients per round, %s, lr = %s (%s), weights: %s",
                             s$clients_per_round, s$n_clients, local, format(s$lr), s$lr_schedule, s$weights),
    if (!is.null(s$stopped)) sprintf("stopped early after round %d: %s", s$stopped$round, s$stopped$reason))
}

#' @rdname fed_history
#' @export
print.fed_history <- function(x, ...) {
  cat(format(x), sep = "\n")
  if (!nrow(x)) return(invisible(x))
  # The diagnostics are many columns: plot(x, "diagnostics") shows them.
  shown <- as.data.frame(x)[setdiff(names(x), setdiff(diagnostic_columns, "cosine_mean"))]
  shown <- shown[, vapply(shown, function(col) !all(is.na(col)), logical(1)), drop = FALSE]
  if (nrow(shown) > 10L) shown <- shown[c(1:5, (nrow(shown) - 4L):nrow(shown)), ]
  print(format(shown, digits = 4), row.names = FALSE)
  if (nrow(x) > 10L) cat(sprintf("(%d of %d rounds shown)\n", 10L, nrow(x)))
  invisible(x)
}

#' @rdname fed_history
#' @export
summary.fed_history <- function(object, ...) {
  metric <- main_metric(object)
  higher_better <- metric_maximised(metric %||% "")
  values <- if (!is.null(metric)) object[[metric]] else numeric()
  ok <- which(!is.na(values))
  best <- if (length(ok)) ok[if (higher_better) which.max(values[ok]) else which.min(values[ok])]
  structure(list(
    label = history_label(object),
    rounds = nrow(object),
    metric = metric,
    final = if (length(ok)) values[max(ok)] else NA_real_,
    best = if (length(best)) values[best] else NA_real_,
    best_round = if (length(best)) object$round[best] else NA_integer_,
    final_train_loss = if (nrow(object)) object$train_loss[nrow(object)] else NA_real_,
    mean_loss_spread = if (any(!is.na(object$loss_spread))) mean(object$loss_spread, na.rm = TRUE) else NA_real_
  ), class = "summary.fed_history")
}

#' @export
print.summary.fed_history <- function(x, ...) {
  cat(sprintf("%s: %d round%s\n", x$label, x$rounds, if (x$rounds == 1L) "" else "s"))
  if (!is.null(x$metric) && !is.na(x$best_round)) {
    cat(sprintf("  %s: final %.4f, best %.4f (round %d)\n", x$metric, x$final, x$best, x$best_round))
  }
  cat(sprintf("  train loss: final %.4f; mean spread across clients %.4f\n", x$final_train_loss,
              x$mean_loss_spread))
  invisible(x)
}

# Which way a metric improves: accuracy up, everything else (losses, RMSE)
# down. Shared by summaries, early stopping and fed_tune().
metric_maximised <- function(metric) grepl("accuracy", metric)

main_metric <- function(x) {
  candidates <- c("test_accuracy", "val_accuracy", "test_rmse", "val_rmse", "test_loss", "val_loss", "train_loss")
  present <- candidates[candidates %in% names(x)]
  present <- present[vapply(present, function(col) any(!is.na(x[[col]])), logical(1))]
  if (length(present)) present[1] else NULL
}

metric_panels <- function(x, metric = NULL) {
  if (identical(metric, "diagnostics")) {
    return(list("update_norm", c("client_norm_mean", "client_norm_sd"), "cosine_mean", "gradient_diversity"))
  }
  if (!is.null(metric)) {
    if (!is.character(metric) || !length(metric) || anyNA(metric)) {
      fedagg_abort("{.arg metric} must be column names, not {obj_desc(metric)}.")
    }
    unknown <- setdiff(metric, names(x))
    if (length(unknown)) fedagg_abort("{.arg metric} {.val {unknown}} is not a column of the history.")
    return(list(metric))
  }
  has <- function(col) col %in% names(x) && any(!is.na(x[[col]]))
  losses <- Filter(has, c("train_loss", "test_loss", "val_loss"))
  scores <- Filter(has, c("test_accuracy", "val_accuracy", "test_rmse", "val_rmse"))
  Filter(length, list(losses, scores))
}

# Readable names of history columns, for axes and legends.
metric_labels <- c(
  round = "Round", clients = "Clients per round", lr = "Learning rate",
  train_loss = "Training loss (clients' own data)", loss_spread = "Spread of clients' training losses",
  test_loss = "Test loss", test_accuracy = "Test accuracy", test_rmse = "Test RMSE",
  val_loss = "Validation loss", val_accuracy = "Validation accuracy", val_rmse = "Validation RMSE",
  epsilon = "Privacy spent (epsilon)", update_norm = "Norm of the global update", client_norm_mean = "Mean norm of client updates",
  client_norm_sd = "Spread (sd) of client update norms", cosine_mean = "Mean cosine, client vs aggregate",
  gradient_diversity = "Gradient diversity"
)

metric_label <- function(col) unname(ifelse(col %in% names(metric_labels), metric_labels[col], col))

# In a panel of one kind of value, the legend names only the data split.
split_label <- function(cols) {
  known <- c(train = "Training (clients' own data)", test = "Test", val = "Validation")
  prefix <- sub("_.*$", "", cols)
  unname(ifelse(prefix %in% names(known), known[prefix], metric_label(cols)))
}

panel_title <- function(cols) {
  if (any(cols %in% diagnostic_columns)) return(if (length(cols) == 1L) metric_label(cols) else "Client update norms")
  kind <- unique(sub("^[a-z]+_", "", cols))
  if (length(kind) != 1L) return(paste(metric_label(cols), collapse = ", "))
  titles <- c(loss = "Loss", accuracy = "Accuracy", rmse = "RMSE")
  if (kind %in% names(titles)) titles[[kind]] else metric_label(cols[1])
}

# The x axis of a history plot: rounds, simulated hours or megabytes.
history_axis <- function(x, along, call = rlang::caller_env()) {
  switch(along,
    round = list(at = x$round, label = "Round"),
    time = {
      if (all(is.na(x$sim_time))) {
        fedagg_abort(c("This run has no simulated time.", i = "Give the nodes device profiles with {.fn set_system}."),
                     call = call)
      }
      list(at = x$sim_time / 3600, label = "Simulated time (hours)")
    },
    bytes = list(at = cumsum(x$bytes_down + x$bytes_up) / 1e6, label = "Data sent and received (MB)"))
}

#' @rdname fed_history
#' @export
plot.fed_history <- function(x, metric = NULL, along = c("round", "time", "bytes"), ...) {
  along <- assert_choice(along, c("round", "time", "bytes"))
  panels <- metric_panels(x, metric)
  if (!length(panels) || !nrow(x)) fedagg_abort("There is nothing to plot: the history has no rounds or no values.")
  axis <- history_axis(x, along)
  layout <- if (length(panels) > 3L) c(2, ceiling(length(panels) / 2)) else c(1, length(panels))
  old <- graphics::par(mfrow = layout, mar = c(4, 4, 3, 1), oma = c(0, 0, 1.5, 0))
  on.exit(graphics::par(old))
  cols <- c("#1b9e77", "#d95f02", "#7570b3", "#e7298a")
  for (cols_here in panels) {
    values <- unlist(x[cols_here])
    y <- range(values[!is.na(values)])
    ylab <- if (length(cols_here) == 1L) metric_label(cols_here) else panel_title(cols_here)
    # Room above the curves for the legend, so it never hides them.
    ylim <- if (length(cols_here) > 1L) c(y[1], y[2] + 0.12 * length(cols_here) * diff(y) + 1e-12) else y
    plot(range(axis$at), ylim, type = "n", xlab = axis$label, ylab = ylab, main = panel_title(cols_here), ...)
    for (i in seq_along(cols_here)) {
      keep <- !is.na(x[[cols_here[i]]])
      # Later curves are dashed so that equal curves (a test set that is the
      # nodes' validation data) stay visible.
      graphics::lines(axis$at[keep], x[[cols_here[i]]][keep], col = cols[i], lwd = 2, lty = i,
                      type = if (sum(keep) < 2) "p" else "l")
    }
    alerts <- axis$at[!is.na(x$drift_alerts) & x$drift_alerts > 0]
    if (length(alerts)) graphics::abline(v = alerts, lty = 3, col = "grey50")
    if (length(cols_here) > 1L) {
      graphics::legend("topright", legend = split_label(cols_here), col = cols[seq_along(cols_here)], lwd = 2,
                       lty = seq_along(cols_here), bty = "n", cex = 0.8)
    }
  }
  graphics::mtext(history_label(x), side = 3, line = 0.2, outer = TRUE, cex = 0.85)
  invisible(x)
}

#' @rdname fed_history
#' @exportS3Method ggplot2::autoplot
autoplot.fed_history <- function(object, metric = NULL, ...) {
  if (!is.null(list(...)$along)) {
    fedagg_abort("{.fn autoplot} draws against rounds; use {.code plot(x, along = )} for time or bytes.")
  }
  autoplot.fed_comparison(fed_compare(run = object), metric = metric, ...)
}

#' Compare federated runs
#'
#' Puts several [fed_history] objects side by side, e.g. FedAvg on IID and
#' on Dirichlet(0.1) partitions, or two learning rates.
#'
#' @param ... `fed_history` objects, or one list of them. Names label the
#'   runs; unnamed runs are labelled by their settings (`"FedAvg, softmax
#'   regression ..."`), or `run1`, `run2`, ... when those are not unique.
#' @param x,object A `fed_comparison`.
#' @param metric Column to draw (default: accuracy if present, else loss).
#' @param main Plot title.
#' @param along The x axis: `"round"`, `"time"` (simulated hours) or
#'   `"bytes"` (megabytes sent and received), as in [plot.fed_history()].
#' @return `fed_compare()`: a `fed_comparison`, a long data frame with
#'   columns `run` and those of the histories. `summary()`: one row per run.
#' @examples
#' iid <- synthetic_fedprox(0, 0, n_clients = 10, iid = TRUE, seed = 1)
#' skew <- synthetic_fedprox(1, 1, n_clients = 10, seed = 1)
#' run <- function(data) {
#'   fed_server(model_softmax(60, 10), fed_nodes(data), fraction = 0.5, lr = 0.05,
#'              test_data = pool_clients(data, "test"), seed = 1)$fit(5, verbose = FALSE)
#' }
#' cmp <- fed_compare(IID = run(iid), "Synthetic(1,1)" = run(skew))
#' summary(cmp)
#' plot(cmp)
#' @export
fed_compare <- function(...) {
  runs <- list(...)
  if (length(runs) == 1L && is.list(runs[[1]]) && !is.data.frame(runs[[1]])) runs <- runs[[1]]
  if (!length(runs)) fedagg_abort("Give at least one {.cls fed_history}.")
  not_history <- which(!vapply(runs, inherits, logical(1), "fed_history"))
  if (length(not_history)) {
    fedagg_abort("Run {not_history[1]} is {obj_desc(runs[[not_history[1]]])}, not a {.cls fed_history}.")
  }
  labels <- names(runs) %||% rep("", length(runs))
  labels[is.na(labels)] <- ""
  unnamed <- !nzchar(labels)
  labels[unnamed] <- vapply(runs[unnamed], history_label, character(1))
  if (anyDuplicated(labels[unnamed]) || any(labels[unnamed] %in% labels[!unnamed])) {
    labels[unnamed] <- paste0("run", which(unnamed))
  }
  if (anyDuplicated(labels)) fedagg_abort("Runs must have distinct names; {.val {labels[duplicated(labels)][1]}} is used twice.")
  names(runs) <- labels
  columns <- Reduce(union, lapply(runs, names))
  rows <- Map(function(h, label) {
    h <- as.data.frame(h)
    h[setdiff(columns, names(h))] <- NA_real_
    cbind(run = label, h[columns], stringsAsFactors = FALSE)
  }, runs, labels)
  out <- do.call(rbind, rows)
  out$run <- factor(out$run, levels = labels)
  rownames(out) <- NULL
  structure(out, class = c("fed_comparison", "data.frame"), histories = runs)
}

#' @rdname fed_compare
#' @export
summary.fed_comparison <- function(object, ...) {
  out <- do.call(rbind, lapply(names(attr(object, "histories")), function(label) {
    s <- summary(attr(object, "histories")[[label]])
    data.frame(run = label, rounds = s$rounds, metric = s$metric %||% NA_character_, final = s$final,
               best = s$best, best_round = s$best_round, final_train_loss = s$final_train_loss,
               loss_spread = s$mean_loss_spread, stringsAsFactors = FALSE)
  }))
  out
}

#' @rdname fed_compare
#' @export
print.fed_comparison <- function(x, ...) {
  cat(sprintf("<fed_comparison> %d runs\n", nlevels(x$run)))
  print(format(summary(x), digits = 4), row.names = FALSE)
  invisible(x)
}

comparison_metric <- function(x, metric, call = rlang::caller_env()) {
  if (!is.null(metric)) {
    if (!is.character(metric) || length(metric) != 1L || is.na(metric)) {
      fedagg_abort("{.arg metric} must be one column name, not {obj_desc(metric)}.", call = call)
    }
    if (!metric %in% names(x)) fedagg_abort("{.arg metric} {.val {metric}} is not a column of the runs.", call = call)
    return(metric)
  }
  main_metric(x) %||% "train_loss"
}

#' @rdname fed_compare
#' @export
plot.fed_comparison <- function(x, metric = NULL, main = NULL, along = c("round", "time", "bytes"), ...) {
  metric <- comparison_metric(x, metric)
  along <- assert_choice(along, c("round", "time", "bytes"))
  # Each run's own axis (cumulative bytes are per run).
  x$.at <- unlist(lapply(levels(x$run), function(run) history_axis(x[x$run == run, ], along)$at))
  keep <- !is.na(x[[metric]]) & !is.na(x$.at)
  d <- x[keep, ]
  runs <- levels(x$run)
  cols <- grDevices::hcl.colors(max(3, length(runs)), "Dark 3")[seq_along(runs)]
  y <- range(d[[metric]])
  # Room above the curves for the legend (two columns for many runs), so it
  # never hides them.
  legend_cols <- if (length(runs) > 4L) 2L else 1L
  legend_rows <- ceiling(length(runs) / legend_cols)
  axis_label <- switch(along, round = "Round", time = "Simulated time (hours)", bytes = "Data sent and received (MB)")
  plot(range(d$.at), c(y[1], y[2] + 0.08 * legend_rows * diff(y) + 1e-12), type = "n", xlab = axis_label,
       ylab = metric_label(metric), main = main %||% paste(metric_label(metric), "by", tolower(sub(" \\(.*", "", axis_label))),
       ...)
  for (i in seq_along(runs)) {
    r <- d[d$run == runs[i], ]
    graphics::lines(r$.at, r[[metric]], col = cols[i], lwd = 2)
  }
  graphics::legend("top", legend = runs, col = cols, lwd = 2, bty = "n", cex = 0.85, ncol = legend_cols)
  invisible(x)
}

#' @rdname fed_compare
#' @exportS3Method ggplot2::autoplot
autoplot.fed_comparison <- function(object, metric = NULL, ...) {
  if (!is.null(list(...)$along)) {
    fedagg_abort("{.fn autoplot} draws against rounds; use {.code plot(x, along = )} for time or bytes.")
  }
  if (!requireNamespace("ggplot2", quietly = TRUE)) {
    fedagg_abort("{.fn autoplot} needs the {.pkg ggplot2} package ({.code apt-get install r-cran-ggplot2}).")
  }
  metric <- if (is.null(metric)) {
    Filter(function(col) col %in% names(object) && any(!is.na(object[[col]])),
           c("train_loss", "test_loss", "val_loss", "test_accuracy", "val_accuracy", "test_rmse", "val_rmse"))
  } else {
    if (!is.character(metric) || !length(metric) || anyNA(metric)) {
      fedagg_abort("{.arg metric} must be column names, not {obj_desc(metric)}.")
    }
    unknown <- setdiff(metric, names(object))
    if (length(unknown)) fedagg_abort("{.arg metric} {.val {unknown}} {?is/are} not a column of the runs.")
    metric
  }
  long <- do.call(rbind, lapply(metric, function(m) {
    keep <- !is.na(object[[m]])
    data.frame(run = object$run[keep], round = object$round[keep], metric = m, value = object[[m]][keep])
  }))
  long$metric <- factor(metric_label(long$metric), levels = unique(metric_label(metric)))
  ggplot2::ggplot(long, ggplot2::aes(.data$round, .data$value, colour = .data$run)) +
    ggplot2::geom_line() +
    ggplot2::facet_wrap(~metric, scales = "free_y") +
    ggplot2::labs(x = "Round", y = NULL, colour = "Run") +
    ggplot2::theme(legend.position = "bottom")
}
