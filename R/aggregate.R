#' Weighted average of client updates
#'
#' Averages client updates coordinate by coordinate with non-negative weights,
#' the aggregation step of FedAvg (McMahan et al. 2017). The work is done in
#' Rust: client vectors are read where R stores them (no copies), the result
#' is accumulated block by block (no K x d temporary), and coordinates are
#' spread over threads.
#'
#' @param updates Client updates: a list of numeric vectors or arrays (one per
#'   client), a numeric matrix with one column per client, or a list of
#'   per-client named lists of arrays (layers). See the "Client updates"
#'   section of [fedagg-package].
#' @param weights `NULL` for equal weights, or one non-negative number per
#'   client, usually its number of training samples. They are normalised to sum
#'   to one.
#' @param threads Number of threads, or `NULL` for the option
#'   `fedagg.threads` (default: all cores). The result does not depend on it.
#' @return The weighted mean, with the shape of one client's update (a vector
#'   or array with its names and dimensions, or a named list of layers).
#' @family aggregation
#' @export
#' @examples
#' updates <- list(c(1, 2, 3), c(3, 2, 1), c(2, 2, 2))
#' weighted_aggregate(updates)
#' weighted_aggregate(updates, weights = c(100, 50, 50))
#'
#' # One column per client
#' m <- cbind(a = c(1, 2), b = c(3, 4))
#' weighted_aggregate(m, weights = c(1, 3))
#'
#' # Layered updates of a small model
#' client <- function(s) list(W = matrix(s, 2, 2), b = c(s, -s))
#' weighted_aggregate(list(client(1), client(2), client(4)), weights = c(2, 1, 1))
weighted_aggregate <- function(updates, weights = NULL, threads = NULL) {
  check_required_args()
  set <- as_update_set(updates)
  weights <- assert_weights(weights, set$n_clients, client_names = set$names)
  threads <- resolve_threads(threads)
  values <- call_rust(rs_weighted_mean(set$layers, set$n_clients, weights, threads))
  # A non-finite mean means a non-finite input (or overflow): find the client
  # only then, so the common path reads the inputs once.
  if (!all(vapply(values, function(v) is.finite(sum(v)), logical(1)))) {
    loc <- call_rust(rs_find_non_finite(set$layers, set$n_clients, threads))
    if (!is.null(loc)) abort_non_finite(set, loc, "updates", rlang::current_env())
    fedagg_abort("The weighted mean overflowed: client updates are too large to average.")
  }
  restore_shape(values, set$template)
}

#' Byzantine-robust aggregation of client updates
#'
#' Combines client updates with a rule that tolerates a minority of faulty or
#' malicious clients:
#'
#' * `"median"`: coordinate-wise median (Yin et al. 2018).
#' * `"trimmed_mean"`: coordinate-wise mean after dropping the
#'   `floor(K * trim)` largest and smallest values, as `mean(x, trim = trim)`.
#' * `"krum"`: the update of the client whose `K - f - 2` nearest neighbours
#'   are closest (Blanchard et al. 2017).
#' * `"multi_krum"`: the weighted mean of the `m` updates with the best Krum
#'   scores.
#' * `"bulyan"`: Bulyan (El Mhamdi et al. 2018): `K - 2f` updates picked
#'   one at a time by Krum, then every coordinate is the mean of the
#'   `K - 4f` picked values closest to their median. Needs `K >= 4f + 3`;
#'   ignores weights. The same rule as [agg_bulyan()] in a round.
#' * `"geometric_median"`: the (weighted) point minimising the sum of
#'   Euclidean distances to the updates, by the smoothed Weiszfeld algorithm
#'   started at the weighted mean (as in RFA, Pillutla et al. 2022).
#'
#' Distances are taken over the whole update (all layers together);
#' coordinate-wise rules treat every coordinate on its own.
#'
#' @inheritParams weighted_aggregate
#' @param method The aggregation rule, one of those above.
#' @param weights `NULL` or one non-negative weight per client. Used by
#'   `"multi_krum"` (to average the selected updates) and
#'   `"geometric_median"`; the coordinate-wise rules and `"krum"` ignore them
#'   with a warning.
#' @param trim For `"trimmed_mean"`: fraction cut from each end, in `[0, 0.5)`.
#' @param f For `"krum"`, `"multi_krum"` and `"bulyan"`: the number of
#'   Byzantine clients to tolerate; needs `2 * f + 2 < K` (Krum) or
#'   `4 * f + 3 <= K` (Bulyan). `NULL` takes the largest such value.
#' @param m For `"multi_krum"`: how many clients to average, from 1 to
#'   `K - f`. `NULL` takes `K - f`.
#' @param tol,max_iter For `"geometric_median"`: stop when the objective
#'   changes by less than `tol` (relative), or after `max_iter` iterations.
#' @return The aggregate, with the shape of one client's update, and
#'   attributes describing the run: `selected` (client indices kept) and
#'   `scores` for the Krum rules, `selected` for Bulyan; `iterations`, `converged` and `objective`
#'   for the geometric median.
#' @family aggregation
#' @export
#' @examples
#' set.seed(1)
#' honest <- replicate(8, rnorm(5, mean = 1, sd = 0.1), simplify = FALSE)
#' attackers <- list(rep(100, 5), rep(-100, 5))
#' updates <- c(honest, attackers)
#'
#' weighted_aggregate(updates)             # pulled far from 1
#' robust_aggregate(updates, "median")
#' robust_aggregate(updates, "trimmed_mean", trim = 0.2)
#' k <- robust_aggregate(updates, "multi_krum", f = 2)
#' attr(k, "selected")
#' robust_aggregate(updates, "geometric_median")
robust_aggregate <- function(updates,
                             method = c("median", "trimmed_mean", "krum", "multi_krum", "geometric_median", "bulyan"),
                             weights = NULL, trim = 0.1, f = NULL, m = NULL,
                             tol = 1e-8, max_iter = 100L, threads = NULL) {
  check_required_args()
  method <- assert_choice(method, c("median", "trimmed_mean", "krum", "multi_krum", "geometric_median", "bulyan"))
  set <- as_update_set(updates)
  k <- set$n_clients
  weights <- assert_weights(weights, k, client_names = set$names)
  threads <- resolve_threads(threads)
  if (!is.null(weights) && method %in% c("median", "trimmed_mean", "krum", "bulyan")) {
    fedagg_warn("{.arg weights} are ignored by method {.val {method}}.", class = "ignored_weights")
  }
  assert_finite_updates(set, threads, "updates", rlang::current_env())

  extra <- list()
  values <- switch(method,
    median = call_rust(rs_coordinate_median(set$layers, k, threads)),
    trimmed_mean = {
      trim <- assert_number(trim, 0, 0.5, upper_open = TRUE)
      call_rust(rs_trimmed_mean(set$layers, k, trim, threads))
    },
    krum = ,
    multi_krum = {
      f <- resolve_krum_f(f, k)
      m <- if (method == "krum") 1L else assert_count(m %||% (k - f), min = 1L, arg = "m")
      if (m > k - f) {
        fedagg_abort("{.arg m} must be at most K - f = {k - f}, not {m}.")
      }
      res <- call_rust(rs_multi_krum(set$layers, k, f, m, if (method == "krum") NULL else weights, threads))
      extra <- list(selected = res$selected, scores = res$scores)
      res$aggregate
    },
    bulyan = {
      f <- resolve_bulyan_f(f, k)
      res <- call_rust(rs_bulyan(set$layers, k, f, threads))
      extra <- list(selected = res$selected)
      res$aggregate
    },
    geometric_median = {
      tol <- assert_number(tol, 0, lower_open = TRUE)
      max_iter <- assert_count(max_iter, min = 1L)
      res <- call_rust(rs_geometric_median(set$layers, k, weights, tol, max_iter, threads))
      extra <- res[c("iterations", "converged", "objective")]
      res$aggregate
    }
  )
  out <- restore_shape(values, set$template)
  for (name in names(extra)) attr(out, name) <- extra[[name]]
  out
}

# The number f of Byzantine clients a rule tolerates among k: the given one,
# checked, or the largest the rule allows (Krum: 2f + 2 < K, so
# (K - 3) %/% 2; Bulyan: K >= 4f + 3, so (K - 3) %/% 4).
resolve_byzantine_f <- function(f, k, rule, call) {
  spec <- switch(rule, Krum = list(per_f = 2L, bound = "2f + 2 < K"), Bulyan = list(per_f = 4L, bound = "K >= 4f + 3"))
  if (k < 3L) {
    fedagg_abort("{rule} needs at least 3 clients ({spec$bound}); there {cli::qty(k)}{?is/are} {k}.", call = call)
  }
  max_f <- (k - 3L) %/% spec$per_f
  if (is.null(f)) return(as.integer(max_f))
  f <- assert_count(f, min = 0L, call = call)
  if (f > max_f) {
    fedagg_abort(c("{.arg f} is too large for {k} clients: {rule} needs {spec$bound}.",
                   i = "With {k} clients, {.arg f} can be at most {max_f}."),
                 call = call)
  }
  f
}

resolve_krum_f <- function(f, k, call = rlang::caller_env()) resolve_byzantine_f(f, k, "Krum", call)

resolve_bulyan_f <- function(f, k, call = rlang::caller_env()) resolve_byzantine_f(f, k, "Bulyan", call)
