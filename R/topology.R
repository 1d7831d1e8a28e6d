#' Hierarchical federations: clients, edge aggregators, cloud
#'
#' With `topology = topology_hierarchical(groups)`, [fed_server()] runs
#' HierFAVG (Liu et al. 2020): the nodes are split into groups, each behind
#' an edge aggregator. In a round (one cloud aggregation), every group starts
#' from the cloud model and does `edge_rounds` edge rounds: its selected
#' clients train `epochs` local epochs from the edge model, and the edge
#' averages their models (weighted by samples). The cloud then averages the
#' edge models, weighted by the samples of the clients each one aggregated,
#' through the server optimizer. With one edge round this is FedAvg.
#'
#' With [system profiles][system_profile], a client's messages go to its edge
#' (its own link), and each edge talks to the cloud over `edge_link`: a
#' group's time is its edge rounds (each as long as its slowest client) plus
#' the model's trip from and back to the cloud, and the round ends with the
#' slowest group.
#'
#' Only FedAvg and FedProx clients of built-in models, weighted aggregation
#' and float64 updates are simulated hierarchically for now.
#'
#' @param groups The edge of every node: a list of node-id vectors named by
#'   edge, or a named vector giving each node id its edge (names are node
#'   ids).
#' @param edge_rounds Edge aggregations per cloud aggregation (k2).
#' @param edge_link Link between each edge and the cloud: `list(latency = ,
#'   bandwidth = )` in seconds and bytes per second.
#' @return A `fed_topology` object for [fed_server()]'s `topology`.
#' @examples
#' d <- synthetic_fedprox(0.5, 0.5, n_clients = 8, seed = 1)
#' groups <- list(north = sprintf("client%02d", 1:4), south = sprintf("client%02d", 5:8))
#' nodes <- fed_nodes(d, ids = sprintf("client%02d", 1:8))
#' srv <- fed_server(model_softmax(60, 10), nodes, fraction = 1, lr = 0.05, seed = 1,
#'                   topology = topology_hierarchical(groups, edge_rounds = 2))
#' srv$fit(3, verbose = FALSE)
#' @export
topology_hierarchical <- function(groups, edge_rounds = 2, edge_link = list(latency = 0.01, bandwidth = 1e8)) {
  edge_rounds <- assert_count(edge_rounds, min = 1L)
  if (is.list(groups) && !is.data.frame(groups)) {
    if (is.null(names(groups)) || any(!nzchar(names(groups))) || anyDuplicated(names(groups))) {
      fedagg_abort("{.arg groups} must be a list named by edge, with the node ids of each edge.")
    }
    ok <- vapply(groups, function(g) is.character(g) && length(g) && !anyNA(g), logical(1))
    if (!all(ok)) fedagg_abort("{.arg groups} must give each edge a vector of node ids; edge {.val {names(groups)[!ok][1]}} does not.")
    edge_of <- stats::setNames(rep(names(groups), lengths(groups)), unlist(groups, use.names = FALSE))
  } else if (is.atomic(groups) && !is.null(names(groups)) && !anyNA(groups)) {
    edge_of <- stats::setNames(as.character(groups), names(groups))
  } else {
    fedagg_abort("{.arg groups} must be a list of node ids per edge, or a vector of edges named by node id, not {obj_desc(groups)}.")
  }
  if (anyDuplicated(names(edge_of))) {
    fedagg_abort("{.arg groups} puts node {.val {names(edge_of)[anyDuplicated(names(edge_of))]}} under two edges.")
  }
  if (!is.list(edge_link) || !all(c("latency", "bandwidth") %in% names(edge_link))) {
    fedagg_abort("{.arg edge_link} must be {.code list(latency = , bandwidth = )}, not {obj_desc(edge_link)}.")
  }
  latency <- assert_number(edge_link$latency, 0, arg = "edge_link$latency")
  bandwidth <- assert_number(edge_link$bandwidth, 0, lower_open = TRUE, arg = "edge_link$bandwidth")
  structure(list(kind = "hierarchical", edge_of = edge_of, edges = unique(unname(edge_of)), edge_rounds = edge_rounds,
                 latency = latency, bandwidth = bandwidth,
                 label = sprintf("hierarchical: %d edges, %d edge rounds per cloud round", length(unique(edge_of)),
                                 edge_rounds)),
            class = c("fed_topology", "fed_part"))
}

assert_topology <- function(x, private, call = rlang::caller_env()) {
  if (is.null(x)) return(NULL)
  if (!inherits(x, "fed_topology")) {
    fedagg_abort("{.arg topology} must be NULL or {.fn topology_hierarchical}, not {obj_desc(x)}.", call = call)
  }
  ids <- names(private$.nodes)
  unknown <- setdiff(names(x$edge_of), ids)
  if (length(unknown)) {
    fedagg_abort("{.arg topology} names unknown node{?s} {.val {unknown}}.", class = "client", client = unknown[1],
                 call = call)
  }
  missing <- setdiff(ids, names(x$edge_of))
  if (length(missing)) {
    fedagg_abort("{.arg topology} puts no edge over node{?s} {.val {missing}}.", class = "client", client = missing[1],
                 call = call)
  }
  refuse <- function(what) {
    fedagg_abort("A hierarchical topology cannot be combined with {what} yet.", call = call)
  }
  if (!is_builtin(private$.model)) refuse("custom R models")
  if (!private$.algorithm$kind %in% c("fedavg", "fedprox")) refuse(private$.algorithm$label)
  if (!is.null(private$.async)) refuse("asynchronous rounds")
  if (!is.null(private$.compress) || is.finite(private$.deadline) || private$.over_select > 1) {
    refuse("compression, deadlines or over-selection")
  }
  if (!is.null(private$.privacy) || !is.null(private$.clip) || !is.null(private$.filter) ||
      private$.aggregator$kind != "weighted" || is.function(private$.weights) || !identical(private$.weights, "samples")) {
    refuse("privacy, clipping, filters, robust aggregators or weights other than samples")
  }
  if (any(node_roster(private)$dropout > 0, na.rm = TRUE)) refuse("dropouts")
  x
}
