#' Two-sample Kolmogorov-Smirnov test
#'
#' Tests whether `x` and `y` come from the same continuous distribution, with
#' the statistic and p-value computed in Rust. Results agree with
#' [stats::ks.test()] for two samples: the exact p-value (by counting lattice
#' paths, correct with ties) when `nx * ny < 10000`, the asymptotic
#' Kolmogorov distribution otherwise. Large samples are sorted in parallel.
#'
#' @param x,y Numeric samples; missing values are removed.
#' @param alternative `"two.sided"`, `"less"` or `"greater"` (H1: the CDF of
#'   `x` lies below / above that of `y`), as in [stats::ks.test()].
#' @param exact `NULL` to choose as above, `TRUE` for the exact p-value,
#'   `FALSE` for the asymptotic one.
#' @inheritParams weighted_aggregate
#' @return An object of class `htest` (it prints like [stats::ks.test()]),
#'   with `statistic`, `p.value`, `alternative`, `method`, `data.name` and
#'   `exact`.
#' @family drift
#' @export
#' @examples
#' set.seed(1)
#' ks_test(rnorm(50), rnorm(40))
#' ks_test(rnorm(50), rnorm(40, mean = 1))
#' ks_test(rnorm(5000), runif(5000), alternative = "greater")
ks_test <- function(x, y, alternative = c("two.sided", "less", "greater"), exact = NULL, threads = NULL) {
  check_required_args()
  data_name <- paste(deparse1(substitute(x)), "and", deparse1(substitute(y)))
  alternative <- assert_choice(alternative, c("two.sided", "less", "greater"))
  x <- ks_sample(x)
  y <- ks_sample(y)
  if (!is.null(exact)) exact <- assert_flag(exact)
  # The exact p-value walks an nx x ny lattice: beyond this it takes minutes.
  if (isTRUE(exact) && as.double(length(x)) * length(y) > max_exact_cells) {
    fedagg_abort(c("The exact p-value for {length(x)} x {length(y)} samples would take too long.",
                   i = "Use {.code exact = FALSE} (the asymptotic p-value) when {.code nx * ny} exceeds {format(max_exact_cells)}."),
                 call = rlang::current_env())
  }
  threads <- resolve_threads(threads)
  res <- call_rust(rs_ks_test(x, y, alternative, if (is.null(exact)) NA else exact, threads))
  if (res$ties && !res$exact) {
    fedagg_warn("p-value will be approximate in the presence of ties.", class = "ks_ties")
  }
  statistic <- stats::setNames(res$statistic, switch(alternative, two.sided = "D", greater = "D^+", less = "D^-"))
  structure(
    list(
      statistic = statistic,
      p.value = res$p_value,
      alternative = switch(alternative,
        two.sided = "two-sided",
        less = "the CDF of x lies below that of y",
        greater = "the CDF of x lies above that of y"
      ),
      method = paste(if (res$exact) "Exact" else "Asymptotic", "two-sample Kolmogorov-Smirnov test"),
      data.name = data_name,
      exact = res$exact
    ),
    class = "htest"
  )
}

max_exact_cells <- 1e8

ks_sample <- function(x, arg = rlang::caller_arg(x), call = rlang::caller_env()) {
  force(arg)
  if (!is.numeric(x)) {
    fedagg_abort("{.arg {arg}} must be a numeric vector, not {obj_desc(x)}.", call = call)
  }
  x <- as.double(x)
  x <- x[!is.na(x)]
  if (length(x) == 0L) {
    fedagg_abort("{.arg {arg}} must have at least one non-missing value.", call = call)
  }
  x
}

#' Detect distribution drift with Kolmogorov-Smirnov tests
#'
#' Compares current data with reference data, feature by feature, with the
#' two-sample KS test ([ks_test()]), and flags the features whose p-value is
#' below `alpha` (after an optional multiple-testing adjustment). Typical
#' uses: a client's data against the federation's, or this round's against
#' the first round's.
#'
#' @param reference,current Numeric vectors (one feature), or matrices or data
#'   frames with the same numeric columns (one test per column).
#' @param alpha Significance level, in (0, 1).
#' @param adjust Multiple-testing adjustment of the p-values, one of
#'   [stats::p.adjust.methods] (default `"none"`).
#' @inheritParams weighted_aggregate
#' @return A data frame of class `fedagg_drift` with one row per feature:
#'   `feature`, `statistic` (D), `p_value` and `drift` (`p_value < alpha`).
#' @family drift
#' @export
#' @examples
#' set.seed(2)
#' ref <- data.frame(age = rnorm(300, 50, 10), dose = rexp(300))
#' cur <- data.frame(age = rnorm(200, 58, 10), dose = rexp(200))
#' ks_drift(ref, cur)
#' ks_drift(ref$dose, cur$dose)
ks_drift <- function(reference, current, alpha = 0.05, adjust = "none", threads = NULL) {
  check_required_args()
  alpha <- assert_number(alpha, 0, 1, lower_open = TRUE, upper_open = TRUE)
  adjust <- assert_choice(adjust, stats::p.adjust.methods)
  ref <- drift_columns(reference)
  cur <- drift_columns(current)
  if (!length(ref)) fedagg_abort("{.arg reference} must have at least one feature (column).")
  if (!identical(names(ref), names(cur))) {
    fedagg_abort(c("{.arg reference} and {.arg current} must have the same features.",
                   x = "{.arg reference} has {.val {names(ref)}}; {.arg current} has {.val {names(cur)}}."))
  }
  tests <- lapply(names(ref), function(feature) {
    withCallingHandlers(
      ks_test(ref[[feature]], cur[[feature]], threads = threads),
      fedagg_warning_ks_ties = function(w) invokeRestart("muffleWarning")
    )
  })
  p <- stats::p.adjust(vapply(tests, `[[`, numeric(1), "p.value"), method = adjust)
  out <- data.frame(
    feature = names(ref),
    statistic = vapply(tests, function(t) unname(t$statistic), numeric(1)),
    p_value = p,
    drift = p < alpha,
    stringsAsFactors = FALSE
  )
  structure(out, class = c("fedagg_drift", "data.frame"), alpha = alpha, adjust = adjust)
}

drift_columns <- function(x, arg = rlang::caller_arg(x), call = rlang::caller_env()) {
  if (is.data.frame(x) || is.matrix(x)) {
    cols <- if (is.data.frame(x)) as.list(x) else lapply(seq_len(ncol(x)), function(j) x[, j])
    names(cols) <- colnames(x) %||% paste0("V", seq_along(cols))
  } else {
    cols <- list(value = x)
  }
  for (nm in names(cols)) {
    if (!is.numeric(cols[[nm]])) {
      fedagg_abort("Feature {.val {nm}} of {.arg {arg}} must be numeric, not {obj_desc(cols[[nm]])}.", call = call)
    }
  }
  cols
}

#' @export
format.fedagg_drift <- function(x, ...) {
  n_drift <- sum(x$drift)
  adj <- attr(x, "adjust")
  c(sprintf("KS drift check: %d of %d feature%s drifted (alpha = %s%s)",
            n_drift, nrow(x), if (nrow(x) == 1) "" else "s", format(attr(x, "alpha")),
            if (identical(adj, "none")) "" else paste0(", ", adj, "-adjusted")))
}

#' @export
print.fedagg_drift <- function(x, ...) {
  cat(format(x), "\n", sep = "")
  df <- as.data.frame(unclass(x), stringsAsFactors = FALSE)
  df$p_value <- format.pval(df$p_value, digits = 3)
  print(df, row.names = FALSE, ...)
  invisible(x)
}
