#' Aggregation of client updates in a round
#'
#' @description
#' The aggregator of a [Server]'s round combines the clients' updates
#' `Delta_i` into the pseudo-gradient `D` that the server optimizer applies.
#' All run in Rust, in the same call as the round's training.
#'
#' * `agg_weighted()`: the weighted mean with the weights of `fed_server(
#'   weights = )` (FedAvg).
#' * `agg_median()`: coordinate-wise median (Yin et al. 2018).
#' * `agg_trimmed_mean(trim)`: coordinate-wise mean without the
#'   `floor(K * trim)` largest and smallest values.
#' * `agg_krum(f)`, `agg_multi_krum(f, m)`: the update (or the weighted mean of
#'   the `m` updates) with the best Krum score, tolerating `f` Byzantine
#'   clients (Blanchard et al. 2017).
#' * `agg_geometric_median(tol, max_iter)`: the weighted geometric median by
#'   smoothed Weiszfeld (Pillutla et al. 2022).
#' * `agg_bulyan(f)`: Bulyan (El Mhamdi et al. 2018): `K - 2f` updates picked
#'   by repeated Krum, then per coordinate the mean of the `K - 4f` values
#'   closest to their median; needs `K >= 4f + 3`.
#'
#' They match [robust_aggregate()] on the same updates. The client log marks
#' the clients a Krum-type rule picked (`selected`).
#'
#' `filter_norm()` drops anomalous updates before aggregation: those whose
#' L2 norm (per layer with `per_layer = TRUE`) exceeds `max_norm`, or the
#' round's median plus `mad` times the median absolute deviation of the
#' norms. Dropped clients are logged with the reason (`kept`,
#' `filter_reason` in the client log) and the round goes on with the rest;
#' it fails only when fewer than `min_clients` remain.
#'
#' @param trim Fraction cut from each end, in `[0, 0.5)`.
#' @param f Number of Byzantine clients to tolerate (`NULL`: the largest the
#'   round's number of clients allows).
#' @param m For `agg_multi_krum()`: how many updates to average (`NULL`:
#'   `K - f`).
#' @param tol,max_iter Stopping rule of the geometric median.
#' @param max_norm For `filter_norm()`: a fixed bound on the norm (`NULL`:
#'   none).
#' @param mad For `filter_norm()`: how many median absolute deviations above
#'   the median a norm may be (`NULL`: no such rule).
#' @param per_layer For `filter_norm()`: judge every layer's norm on its
#'   own.
#' @return A `fed_aggregator` or a `fed_filter`.
#' @references Blanchard et al. (2017), Machine learning with adversaries:
#'   Byzantine tolerant gradient descent. NeurIPS. El Mhamdi, Guerraoui and
#'   Rouault (2018), The hidden vulnerability of distributed learning in
#'   Byzantium. ICML.
#' @examples
#' agg_bulyan(f = 1)
#' data <- synthetic_fedprox(1, 1, n_clients = 12, seed = 1)
#' srv <- fed_server(model_softmax(60, 10), fed_nodes(data), fraction = 1, lr = 0.05,
#'                   aggregator = agg_trimmed_mean(0.2), filter = filter_norm(mad = 3), seed = 1)
#' srv$fit(2, verbose = FALSE)
#' @name aggregators
NULL

new_aggregator <- function(kind, label, ...) {
  structure(list(kind = kind, label = label, settings = list(...)), class = c("fed_aggregator", "fed_part"))
}

#' @rdname aggregators
#' @export
agg_weighted <- function() new_aggregator("weighted", "weighted mean")

#' @rdname aggregators
#' @export
agg_median <- function() new_aggregator("median", "coordinate-wise median")

#' @rdname aggregators
#' @export
agg_trimmed_mean <- function(trim = 0.1) {
  trim <- assert_number(trim, 0, 0.5, upper_open = TRUE)
  new_aggregator("trimmed_mean", sprintf("trimmed mean (trim %s)", format(trim)), trim = trim)
}

#' @rdname aggregators
#' @export
agg_krum <- function(f = NULL) {
  f <- assert_count(f, min = 0L, allow_null = TRUE)
  new_aggregator("krum", sprintf("Krum (f = %s)", f %||% "auto"), f = f)
}

#' @rdname aggregators
#' @export
agg_multi_krum <- function(f = NULL, m = NULL) {
  f <- assert_count(f, min = 0L, allow_null = TRUE)
  m <- assert_count(m, min = 1L, allow_null = TRUE)
  new_aggregator("multi_krum", sprintf("Multi-Krum (f = %s, m = %s)", f %||% "auto", m %||% "K - f"), f = f, m = m)
}

#' @rdname aggregators
#' @export
agg_geometric_median <- function(tol = 1e-8, max_iter = 100) {
  tol <- assert_number(tol, 0, lower_open = TRUE)
  max_iter <- assert_count(max_iter, min = 1L)
  new_aggregator("geometric_median", "geometric median", tol = tol, max_iter = max_iter)
}

#' @rdname aggregators
#' @export
agg_bulyan <- function(f = 1) {
  f <- assert_count(f, min = 0L)
  new_aggregator("bulyan", sprintf("Bulyan (f = %d)", f), f = f)
}

#' @rdname aggregators
#' @export
filter_norm <- function(max_norm = NULL, mad = 3, per_layer = TRUE) {
  if (!is.null(max_norm)) max_norm <- assert_number(max_norm, 0, lower_open = TRUE)
  if (!is.null(mad)) mad <- assert_number(mad, 0, lower_open = TRUE)
  if (is.null(max_norm) && is.null(mad)) fedagg_abort("{.fn filter_norm} needs {.arg max_norm}, {.arg mad} or both.")
  per_layer <- assert_flag(per_layer)
  rules <- c(if (!is.null(max_norm)) sprintf("norm > %s", format(max_norm)),
             if (!is.null(mad)) sprintf("norm > median + %s MAD", format(mad)))
  structure(list(max_norm = max_norm, mad = mad, per_layer = per_layer,
                 label = paste0("drop ", paste(rules, collapse = " or "), if (per_layer) " (per layer)" else "")),
            class = c("fed_filter", "fed_part"))
}

assert_aggregator <- function(x, call = rlang::caller_env()) {
  if (inherits(x, "fed_aggregator")) return(x)
  fedagg_abort("{.arg aggregator} must come from {.fn agg_weighted}, {.fn agg_median}, ..., not {obj_desc(x)}.",
               call = call)
}

assert_filter <- function(x, call = rlang::caller_env()) {
  if (is.null(x) || inherits(x, "fed_filter")) return(x)
  fedagg_abort("{.arg filter} must come from {.fn filter_norm}, not {obj_desc(x)}.", call = call)
}

# Lengths of the model's layers, in the order of the flat parameters.
layer_sizes <- function(model, template) {
  as.double(if (is_builtin(model)) vapply(model$layers, prod, numeric(1)) else lengths(template))
}

rust_aggregator <- function(agg) {
  s <- agg$settings
  list(kind = agg$kind, trim = s$trim %||% 0, f = s$f, m = s$m, tol = s$tol %||% 1e-8,
       max_iter = as.double(s$max_iter %||% 100))
}

rust_filter <- function(filter, sizes) {
  if (is.null(filter)) return(NULL)
  list(max_norm = filter$max_norm, mad = filter$mad, per_layer = filter$per_layer, layer_sizes = sizes)
}
