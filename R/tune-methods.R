# as.data.frame(), format(), print(), summary() and plot() of a fed_tuning.

#' @export
as.data.frame.fed_tuning <- function(x, ...) x$results

#' @export
format.fed_tuning <- function(x, ...) {
  r <- x$results
  c(sprintf("<fed_tuning> %d trials by %s on %s%s: %d of %d rounds of budget (rungs at %s)",
            nrow(r), gsub("_", " ", x$method), x$metric,
            if (is.null(x$target)) "" else sprintf(" (target %s)", format(x$target)), x$rounds_used, x$budget,
            paste(x$rungs, collapse = ", ")),
    utils::capture.output(print(utils::head(r[setdiff(names(r), c("seconds", "seed", if (is.null(x$target)) "rounds_to_target"))], 10),
                                row.names = FALSE)),
    if (nrow(r) > 10) sprintf("(%d more trials in $results)", nrow(r) - 10))
}

#' @export
print.fed_tuning <- function(x, ...) {
  cat(format(x, ...), sep = "\n")
  invisible(x)
}

#' @export
summary.fed_tuning <- function(object, ...) {
  r <- object$results
  structure(list(metric = object$metric, target = object$target, trials = nrow(r),
                 failed = sum(startsWith(r$status, "failed")), full = sum(r$status == "done" & r$rounds == max(object$rungs)),
                 rounds_used = object$rounds_used, budget = object$budget, best = r[1, , drop = FALSE]),
            class = "summary.fed_tuning")
}

#' @export
print.summary.fed_tuning <- function(x, ...) {
  cat(sprintf("%d trials (%d ran to the end, %d failed); %d of %d rounds of budget\n", x$trials, x$full, x$failed,
              x$rounds_used, x$budget))
  b <- x$best
  cat(sprintf("Best: trial %d, %s %s %s%s\n", b$trial, x$metric, "final", format(signif(b$final, 4)),
              if (is.null(x$target)) "" else sprintf(", %s rounds to %s", format(b$rounds_to_target), format(x$target))))
  invisible(x)
}

#' @export
plot.fed_tuning <- function(x, ...) {
  curves <- x$curves
  rounds <- max(lengths(curves), 1L)
  values <- unlist(curves)
  values <- values[is.finite(values)]
  graphics::plot(NA, xlim = c(1, rounds), ylim = if (length(values)) range(values) else c(0, 1), xlab = "Round",
                 ylab = x$metric, main = sprintf("fed_tune: %d trials, best first", length(curves)), ...)
  for (i in rev(seq_along(curves))) {
    v <- curves[[i]]
    if (length(v)) graphics::lines(seq_along(v), v, col = if (i == 1) "#C62828" else "grey60", lwd = if (i == 1) 2 else 1)
  }
  if (!is.null(x$target)) graphics::abline(h = x$target, lty = 2)
  invisible(x)
}
