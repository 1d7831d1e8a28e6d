#' Simulated attacks by malicious clients
#'
#' @description
#' Mark nodes as malicious to see what an attack does to a federation and
#' whether a robust [aggregator][aggregators] or a norm filter stops it.
#' `set_attack(nodes, ids, attack)` gives the nodes `ids` an attack (and
#' `attack = NULL` takes it away); the client log marks their rounds
#' (`malicious`), and whether the filter kept them (`kept`) or a Krum-type
#' aggregator picked them (`selected`).
#'
#' * `attack_sign_flip(scale)`: sends `-scale * Delta` instead of its update
#'   `Delta`.
#' * `attack_scale(factor)`: sends `factor * Delta` (model replacement).
#' * `attack_gaussian(sd)`: sends `N(0, sd^2)` noise instead of its update.
#' * `attack_same_value(value)`: sends `value` in every coordinate.
#' * `attack_label_flip(mapping)`: trains honestly on poisoned labels:
#'   `mapping` is a named vector `c(from = "to", ...)` of labels (or class
#'   codes), or a function of the label vector.
#'
#' @param nodes A list of nodes (from [fed_nodes()]).
#' @param ids Ids (or positions) of the nodes to attack with.
#' @param attack An attack, or `NULL` to make the nodes honest again.
#' @param scale,factor Multipliers of the update.
#' @param sd Standard deviation of the noise sent.
#' @param value The value sent in every coordinate.
#' @param mapping How labels are flipped: a named vector or a function.
#' @return `set_attack()`: `nodes`, invisibly (nodes are changed in place).
#'   The others: a `fed_attack`.
#' @examples
#' data <- synthetic_fedprox(1, 1, n_clients = 10, seed = 1)
#' nodes <- fed_nodes(data)
#' set_attack(nodes, c("client01", "client02"), attack_scale(10))
#' srv <- fed_server(model_softmax(60, 10), nodes, fraction = 1, lr = 0.05,
#'                   aggregator = agg_median(), seed = 1)
#' srv$fit(2, verbose = FALSE)
#' head(srv$client_log[c("round", "client", "malicious")])
#' @name attacks
NULL

new_attack <- function(kind, label, ...) {
  structure(list(kind = kind, label = label, ...), class = c("fed_attack", "fed_part"))
}

#' @rdname attacks
#' @export
attack_sign_flip <- function(scale = 1) {
  scale <- assert_number(scale, 0, lower_open = TRUE)
  new_attack("sign_flip", sprintf("sign flip (x%s)", format(scale)), scale = scale)
}

#' @rdname attacks
#' @export
attack_scale <- function(factor = 10) {
  factor <- assert_number(factor)
  new_attack("scale", sprintf("scaled update (x%s)", format(factor)), factor = factor)
}

#' @rdname attacks
#' @export
attack_gaussian <- function(sd = 1) {
  sd <- assert_number(sd, 0, lower_open = TRUE)
  new_attack("gaussian", sprintf("Gaussian noise (sd %s)", format(sd)), sd = sd)
}

#' @rdname attacks
#' @export
attack_same_value <- function(value = 100) {
  value <- assert_number(value)
  new_attack("same_value", sprintf("same value (%s)", format(value)), value = value)
}

#' @rdname attacks
#' @export
attack_label_flip <- function(mapping) {
  check_required_args()
  if (!is.function(mapping) && (!is.atomic(mapping) || is.null(names(mapping)) || !length(mapping) ||
                                anyNA(names(mapping)) || anyNA(mapping))) {
    fedagg_abort("{.arg mapping} must be a named vector {.code c(from = \"to\")} or a function of the labels, not {obj_desc(mapping)}.")
  }
  new_attack("label_flip", "label flip", mapping = mapping)
}

#' @rdname attacks
#' @export
set_attack <- function(nodes, ids, attack) {
  check_required_args()
  nodes <- as_node_list(nodes)
  all_ids <- vapply(nodes, function(n) n$id, character(1))
  chosen <- check_ids(ids, all_ids, "`ids`")
  if (!is.null(attack) && !inherits(attack, "fed_attack")) {
    fedagg_abort("{.arg attack} must come from {.fn attack_sign_flip}, {.fn attack_scale}, ..., or be NULL, not {obj_desc(attack)}.")
  }
  for (n in nodes[match(chosen, all_ids)]) n$attack <- attack
  invisible(nodes)
}

# The labels a node trains on under a label-flipping attack.
flip_labels <- function(y, attack, client = NULL) {
  if (is.null(attack) || attack$kind != "label_flip") return(y)
  m <- attack$mapping
  if (is.function(m)) {
    out <- call_user(m, list(y), "The label-flip {.arg mapping}", client = client)
    if (!is.atomic(out) || length(out) != length(y) || anyNA(out)) {
      fedagg_abort("The label-flip {.arg mapping} must return {length(y)} labels without NA, not {obj_desc(out)}.",
                   class = "user_code", client = client)
    }
    return(out)
  }
  key <- as.character(y)
  hit <- key %in% names(m)
  out <- key
  out[hit] <- as.character(m[key[hit]])
  if (is.factor(y)) return(factor(out, levels = union(levels(y), unique(out))))
  if (is.numeric(y)) return(as.numeric(out))
  if (is.logical(y)) return(as.logical(out))
  out
}

# What the Rust core applies to a malicious client's update.
rust_attack <- function(attack) {
  if (is.null(attack) || attack$kind == "label_flip") return(NULL)
  list(kind = attack$kind, scale = attack$scale %||% 1, factor = attack$factor %||% 1, sd = attack$sd %||% 0,
       value = attack$value %||% 0)
}
