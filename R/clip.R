#' Clip an update to a maximum L2 norm
#'
#' Scales an update down so that its Euclidean norm is at most `max_norm`
#' (updates already within the bound are returned unchanged). This bounds each
#' client's influence, the first step of differentially private aggregation
#' (DP-FedAvg, McMahan et al. 2018).
#'
#' @param update One client's update: a numeric vector or array, or a named
#'   list of arrays (layers).
#' @param max_norm The bound, a finite number > 0.
#' @param per_layer If `TRUE`, clip every layer to `max_norm` on its own;
#'   if `FALSE` (default), clip the whole update.
#' @inheritParams weighted_aggregate
#' @return The clipped update, with the shape of `update` and an attribute
#'   `norm`: the L2 norm before clipping (a named vector of per-layer norms
#'   when `per_layer = TRUE`).
#' @family privacy
#' @seealso [update_norms()] to monitor norms across clients.
#' @export
#' @examples
#' clip_update(c(3, 4), max_norm = 1)
#' clip_update(c(0.3, 0.4), max_norm = 1) # unchanged
#'
#' layers <- list(W = matrix(1:4, 2), b = c(10, 0))
#' clipped <- clip_update(layers, max_norm = 5, per_layer = TRUE)
#' attr(clipped, "norm")
clip_update <- function(update, max_norm, per_layer = FALSE, threads = NULL) {
  check_required_args()
  single <- as_single_update(update)
  max_norm <- assert_number(max_norm, 0, lower_open = TRUE)
  per_layer <- assert_flag(per_layer)
  threads <- resolve_threads(threads)
  loc <- call_rust(rs_find_non_finite(single$layers, 1L, threads))
  if (!is.null(loc)) {
    fedagg_abort("{.arg update} must be finite (no NA, NaN or Inf); position {loc[3]} is not.")
  }
  res <- call_rust(rs_clip_update(single$layers, max_norm, per_layer, threads))
  out <- restore_shape(res$layers, single$template)
  norm <- res$norms
  if (per_layer && single$template$kind == "layers") {
    names(norm) <- single$template$names %||% paste0("layer", seq_along(norm))
  }
  attr(out, "norm") <- norm
  out
}

#' L2 norms of client updates
#'
#' Computes the Euclidean norm of every client's update, in total and per
#' layer: the quantity clipping bounds, and a first signal of anomalous
#' clients (an update far larger than the others).
#'
#' @inheritParams weighted_aggregate
#' @return A data frame with one row per client: `client` (the names of
#'   `updates`, else 1, 2, ...), one column per layer for layered updates, and
#'   `norm`, the norm of the whole update.
#' @family privacy
#' @export
#' @examples
#' updates <- list(a = c(3, 4), b = c(1, 0), c = c(0, 30))
#' update_norms(updates)
#'
#' layered <- list(
#'   list(W = diag(2), b = c(0, 1)),
#'   list(W = 3 * diag(2), b = c(0, 0))
#' )
#' update_norms(layered)
update_norms <- function(updates, threads = NULL) {
  check_required_args()
  set <- as_update_set(updates)
  threads <- resolve_threads(threads)
  assert_finite_updates(set, threads, "updates", rlang::current_env())
  n_layers <- length(set$layers)
  flat <- call_rust(rs_layer_norms(set$layers, set$n_clients, threads))
  per_layer <- matrix(flat, nrow = set$n_clients, ncol = n_layers, byrow = TRUE)
  client <- set$names %||% seq_len(set$n_clients)
  out <- data.frame(client = client, stringsAsFactors = FALSE)
  labels <- layer_labels(set)
  if (!is.null(labels)) {
    for (l in seq_len(n_layers)) out[[labels[l]]] <- per_layer[, l]
  }
  # Scaled by each row's largest layer norm, so huge norms do not overflow.
  scale <- apply(per_layer, 1, max)
  scale[scale == 0] <- 1
  out$norm <- scale * sqrt(rowSums((per_layer / scale)^2))
  out
}
