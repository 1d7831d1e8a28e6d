# Creating many nodes: from a partitioned data set or a simulated federated
# data set, with the checks of partitions and per-node settings.

#' Create federated clients
#'
#' `fed_node()` creates one [Node]. `fed_nodes()` creates many: from a data
#' set split by a [partition][partition_iid] (optionally holding out a share
#' of each client's rows for validation), or from a simulated federated data
#' set such as [synthetic_fedprox()] (whose per-client test splits become the
#' nodes' validation data).
#'
#' @param x Numeric matrix or data frame of features, one row per sample; or,
#'   for `fed_nodes()`, a `fed_data` object.
#' @param y Labels (factor, logical, or class codes from 0) or responses.
#' @param id Identifier of the node.
#' @param x_val,y_val Optional held-out data of the node.
#' @param availability Probability that a node is reachable in a round, in
#'   (0, 1]: one for all nodes, or one per node (see [selection]); or an
#'   [availability_markov()] chain for all nodes.
#' @param system For `fed_nodes()`: `NULL`, or a device and network profile
#'   for the nodes ([system_profile()] or a data frame; see [set_system()]).
#' @return `fed_node()`: a [Node]. `fed_nodes()`: a named list of nodes.
#' @examples
#' x <- matrix(rnorm(200), 100)
#' y <- as.integer(x[, 1] + x[, 2] > 0)
#' nodes <- fed_nodes(x, y, partition_iid(100, 4, seed = 1), validation = 0.2, seed = 1)
#' nodes[[1]]
#' @export
fed_node <- function(x, y, id = "client", x_val = NULL, y_val = NULL, availability = 1) {
  check_required_args()
  Node$new(x = x, y = y, id = id, x_val = x_val, y_val = y_val, availability = availability)
}

#' @rdname fed_node
#' @param partition A `fed_partition` or a list of row-index vectors.
#' @param validation Share of each client's rows held out for validation
#'   (0 for none).
#' @param seed Seed of the validation split.
#' @param ids Node identifiers (default `client01`, `client02`, ...).
#' @export
fed_nodes <- function(x, y = NULL, partition = NULL, validation = 0, seed = NULL, ids = NULL, availability = 1,
                      system = NULL) {
  check_required_args()
  nodes <- build_nodes(x, y, partition, validation, seed, ids, availability)
  if (!is.null(system)) set_system(nodes, system)
  nodes
}

build_nodes <- function(x, y, partition, validation, seed, ids, availability, call = rlang::caller_env()) {
  if (inherits(x, "fed_data")) {
    clients <- x$clients
    ids <- assert_node_ids(ids %||% names(clients), length(clients), call = call)
    avail <- per_node_availability(availability, ids, call = call)
    nodes <- Map(function(cl, id, p) {
      Node$new(cl$x, cl$y, id = id, x_val = cl$x_test, y_val = cl$y_test, availability = p)
    }, clients, ids, avail)
    return(stats::setNames(nodes, ids))
  }
  if (is.null(partition)) fedagg_abort("{.arg partition} is needed unless {.arg x} is a {.cls fed_data}.", call = call)
  validation <- assert_number(validation, 0, 1, upper_open = TRUE, call = call)
  x <- as_feature_matrix(x, "x", call = call)
  if (is.null(y) || length(y) != nrow(x)) {
    fedagg_abort("{.arg y} has {length(y)} value{?s} for {nrow(x)} row{?s} of {.arg x}.", call = call)
  }
  parts <- assert_partition(partition, nrow(x), call = call)
  ids <- assert_node_ids(ids %||% names(parts) %||% paste0("client", seq_along(parts)), length(parts), call = call)
  avail <- per_node_availability(availability, ids, call = call)
  splits <- with_seed(seed, lapply(parts, function(idx) {
    n_val <- floor(validation * length(idx))
    if (n_val > 0) {
      held <- idx[sample.int(length(idx), n_val)]
      list(train = setdiff(idx, held), val = held)
    } else list(train = idx, val = NULL)
  }))
  nodes <- Map(function(s, id, p) {
    if (!length(s$train)) {
      fedagg_abort("Client {.val {id}} has no training rows in {.arg partition}.", class = "client", client = id,
                   call = call)
    }
    if (is.null(s$val)) Node$new(x[s$train, , drop = FALSE], y[s$train], id = id, availability = p)
    else Node$new(x[s$train, , drop = FALSE], y[s$train], id = id,
                  x_val = x[s$val, , drop = FALSE], y_val = y[s$val], availability = p)
  }, splits, ids, avail)
  stats::setNames(nodes, ids)
}

# A partition: a non-empty list of whole-number row indices within 1..n, no
# row given twice to one client (a row given to two clients is allowed: the
# data are then duplicated, as some experiments want).
assert_partition <- function(partition, n, arg = "partition", call = rlang::caller_env()) {
  if (!is.list(partition) || !length(partition)) {
    fedagg_abort("{.arg {arg}} must be a non-empty list of row-index vectors, not {obj_desc(partition)}.", call = call)
  }
  parts <- lapply(unclass(partition), identity)
  labels <- names(parts) %||% paste0("client ", seq_along(parts))
  for (k in seq_along(parts)) {
    idx <- parts[[k]]
    where <- sprintf("%s (element %d)", labels[k], k)
    if (!is.numeric(idx) || is.object(idx)) {
      fedagg_abort("{.arg {arg}} {where} must be row indices, not {obj_desc(idx)}.", class = "client",
                   client = labels[k], call = call)
    }
    bad <- which(is.na(idx) | idx < 1 | idx > n | idx != round(idx))
    if (length(bad)) {
      fedagg_abort(c("{.arg {arg}} {where} has invalid row indices.",
                     x = "Index {format(idx[bad[1]])} (position {bad[1]}) is not a whole number in 1..{n}."),
                   class = "client", client = labels[k], call = call)
    }
    if (anyDuplicated(idx)) {
      fedagg_abort("{.arg {arg}} {where} lists row {idx[anyDuplicated(idx)]} twice.", class = "client",
                   client = labels[k], call = call)
    }
    parts[[k]] <- as.integer(idx)
  }
  parts
}

# One value for every node, or one per node (in node order, or named by id).
per_node <- function(value, ids, arg, call = rlang::caller_env()) {
  if (!is.numeric(value) || !(length(value) %in% c(1L, length(ids)))) {
    fedagg_abort("{.arg {arg}} must be one number or one per node ({length(ids)}), not {obj_desc(value)}.", call = call)
  }
  if (!is.null(names(value)) && length(value) == length(ids)) {
    if (!setequal(names(value), ids)) fedagg_abort("{.arg {arg}} is named, but not by the node ids.", call = call)
    value <- value[ids]
  }
  rep_len(unname(value), length(ids))
}

assert_node_ids <- function(ids, n, arg = "ids", call = rlang::caller_env()) {
  if (!is.character(ids) || length(ids) != n || anyNA(ids) || !all(nzchar(ids)) || anyDuplicated(ids)) {
    fedagg_abort("{.arg {arg}} must be {n} distinct non-empty strings, not {obj_desc(ids)}.", call = call)
  }
  ids
}


per_node_availability <- function(availability, ids, call = rlang::caller_env()) {
  if (inherits(availability, "fed_availability")) return(rep(list(availability), length(ids)))
  per_node(availability, ids, "availability", call = call)
}
