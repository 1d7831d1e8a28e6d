# format(), print(), summary() and plot() of a fed_diagnosis.

#' @export
format.fed_diagnosis <- function(x, ...) {
  if (!all(c("title", "severity", "score", "confidence", "symptom", "evidence", "likely_cause", "levers") %in% names(x))) {
    return(NextMethod())
  }
  header <- sprintf("<fed_diagnosis> %s: %s", attr(x, "run"), diagnosis_headline(x))
  if (!nrow(x)) return(header)
  width <- max(40L, getOption("width", 80L) - 5L)
  body <- unlist(lapply(seq_len(nrow(x)), function(i) {
    wrap <- function(label, text) {
      paste0("   ", strwrap(paste0(label, text), width = width, exdent = 2))
    }
    c(sprintf("%d. [%s] %s (score %s, confidence %s)", i, x$severity[i], x$title[i], format(x$score[i]),
              format(x$confidence[i])),
      wrap("", x$symptom[i]),
      wrap("Evidence: ", x$evidence[i]),
      wrap("Likely cause: ", x$likely_cause[i]),
      wrap("Try: ", gsub("; ", "  |  ", x$levers[i], fixed = TRUE)))
  }))
  c(header, body)
}

diagnosis_headline <- function(x) {
  above <- x[x$severity > "info", , drop = FALSE]
  if (!nrow(above)) return("no cause of slow convergence above \"info\"")
  sprintf("%d finding%s above \"info\"; first: %s", nrow(above), if (nrow(above) == 1) "" else "s", above$title[1])
}

#' @export
print.fed_diagnosis <- function(x, ...) {
  # A subset of the columns prints as the data frame it is.
  if (!all(c("title", "severity", "score", "confidence", "symptom", "evidence", "likely_cause", "levers") %in% names(x))) {
    return(print(as.data.frame(unclass(x), stringsAsFactors = FALSE), ...))
  }
  cat(format(x, ...), sep = "\n")
  invisible(x)
}

#' @export
summary.fed_diagnosis <- function(object, ...) {
  counts <- table(object$severity)
  top <- if (nrow(object) && object$severity[1] > "info") object[1, c("cause", "title", "severity", "levers")] else NULL
  structure(list(run = attr(object, "run"), counts = counts, top = top,
                 first_lever = if (!is.null(top)) attr(object, "lever_sets")[[object$cause[1]]][1]),
            class = "summary.fed_diagnosis")
}

#' @export
print.summary.fed_diagnosis <- function(x, ...) {
  cat(sprintf("Diagnosis of %s\n", x$run))
  cat(sprintf("Findings: %s\n", paste(sprintf("%s %d", names(x$counts), as.integer(x$counts)), collapse = ", ")))
  if (is.null(x$top)) {
    cat("No cause of slow convergence above \"info\".\n")
  } else {
    cat(sprintf("Most likely: %s (%s). Try first: %s\n", x$top$title, x$top$severity, x$first_lever))
  }
  invisible(x)
}

#' @export
plot.fed_diagnosis <- function(x, n = 4, ...) {
  n <- assert_count(n, min = 1L)
  loss <- attr(x, "loss")
  shown <- utils::head(which(x$severity > "info" | x$cause == "plateau"), n)
  colours <- c(info = "grey60", low = "#E0A100", medium = "#E8692E", high = "#C62828")
  old <- graphics::par(no.readonly = TRUE)
  on.exit(graphics::par(old))
  graphics::layout(matrix(1:2), heights = c(3, 0.6 + 0.45 * max(1, length(shown))))
  labels <- sprintf("%d. %s [%s]", seq_along(shown), x$title[shown], x$severity[shown])
  left <- max(4.1, 0.55 * max(nchar(labels), 10) * 0.75)
  sets <- attr(x, "round_sets")[x$cause]
  xlim <- range(c(loss$round, unlist(sets[shown])), na.rm = TRUE)
  graphics::par(mar = c(1, left, 3, 1))
  graphics::plot(loss$round, loss$value, type = "l", lwd = 2, xlim = xlim, xaxt = "n", xlab = "",
                 ylab = attr(x, "loss_col"), main = sprintf("%s: %s", attr(x, "run"), diagnosis_headline(x)),
                 cex.main = 0.9, ...)
  for (j in rev(seq_along(shown))) {
    r <- sets[[shown[j]]]
    on <- loss$round %in% r
    graphics::points(loss$round[on], loss$value[on], pch = 19, cex = 0.7, col = colours[as.character(x$severity[shown[j]])])
  }
  graphics::par(mar = c(4, left, 0.5, 1))
  graphics::plot(NA, xlim = xlim, ylim = c(length(shown) + 0.5, 0.5), yaxt = "n", xlab = "Round", ylab = "", bty = "n")
  for (j in seq_along(shown)) {
    r <- sets[[shown[j]]]
    if (length(r)) {
      graphics::rect(r - 0.5, j - 0.3, r + 0.5, j + 0.3, col = colours[as.character(x$severity[shown[j]])], border = NA)
    }
  }
  if (length(shown)) graphics::axis(2, at = seq_along(shown), labels = labels, las = 1, tick = FALSE, cex.axis = 0.8)
  invisible(x)
}
