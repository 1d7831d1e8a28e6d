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
  check_required_args()
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
  if (x$kind == "links") return(assert_link_topology(x, private, ids, call))
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
  # The parts it cannot run: a lookup in the registry of parts.
  part <- unsupported_part(private, "hierarchical")
  if (!is.null(part)) refuse(part)
  if (!is.null(private$.async)) refuse("asynchronous rounds")
  if (is.finite(private$.deadline) || private$.over_select > 1) refuse("deadlines or over-selection")
  if (is.function(private$.weights) || !identical(private$.weights, "samples")) refuse("weights other than samples")
  if (any(node_roster(private)$dropout > 0, na.rm = TRUE)) refuse("dropouts")
  x
}

#' A network given as a table of links
#'
#' `topology_links(links)` routes every message between a node and the
#' server over a user-given network: a table of links (`from`, `to`,
#' `latency` in seconds, `bandwidth` in bytes per second), undirected, whose
#' ends are node ids, intermediate hops of your naming (routers, edges) and
#' `root` (the server). Each node's messages take its shortest path to the
#' root by latency (ties: fewest hops), and cost the sum of the links'
#' latencies plus the message's bytes over each link's bandwidth (store and
#' forward). The nodes' [system profiles][system_profile] still give their
#' compute speed and dropout; their own `download`, `upload` and `latency`
#' are replaced by the path.
#'
#' @param links A data frame with columns `from`, `to`, `latency` (>= 0)
#'   and `bandwidth` (> 0).
#' @param root The name of the server in the table.
#' @return A `fed_topology` object for [fed_server()]'s `topology`.
#' @examples
#' links <- data.frame(from = c("client1", "client2", "client3", "router"),
#'                     to = c("router", "router", "server", "server"),
#'                     latency = c(0.01, 0.01, 0.2, 0.05), bandwidth = c(1e6, 1e6, 1e5, 1e7))
#' topology_links(links)
#' @export
topology_links <- function(links, root = "server") {
  check_required_args()
  if (!is.data.frame(links) || !all(c("from", "to", "latency", "bandwidth") %in% names(links)) || !nrow(links)) {
    fedagg_abort("{.arg links} must be a data frame with columns {.field from}, {.field to}, {.field latency} and {.field bandwidth}, not {obj_desc(links)}.")
  }
  if (!is.character(root) || length(root) != 1L || is.na(root)) fedagg_abort("{.arg root} must be one name, not {obj_desc(root)}.")
  from <- as.character(links$from)
  to <- as.character(links$to)
  if (anyNA(from) || anyNA(to) || any(from == to)) fedagg_abort("{.arg links} has a link without two distinct ends.")
  lat <- links$latency
  bw <- links$bandwidth
  if (!is.numeric(lat) || anyNA(lat) || any(!is.finite(lat) | lat < 0)) {
    fedagg_abort("{.arg links} column {.field latency} must be finite numbers >= 0.")
  }
  if (!is.numeric(bw) || anyNA(bw) || any(!is.finite(bw) | bw <= 0)) {
    fedagg_abort("{.arg links} column {.field bandwidth} must be finite numbers > 0.")
  }
  if (!root %in% c(from, to)) fedagg_abort("{.arg links} never reaches the root {.val {root}}.")
  paths <- link_shortest_paths(from, to, lat, bw, root)
  structure(list(kind = "links", root = root, latency = paths$latency, inverse_bandwidth = paths$inverse_bandwidth,
                 links = links, label = sprintf("link table: %d links to %s", nrow(links), root)),
            class = c("fed_topology", "fed_part"))
}

# Dijkstra from the root over the undirected links, with a binary heap of
# (latency, hops, name rank) keys and lazy deletion: O(E log V). The open
# place settled next has the least latency, then the fewest hops, then comes
# first in order() of the names; a link improves a place only strictly, links
# taken in table order. A place whose latency sums to Inf is updated but never
# settled. Returns latencies and inverse bandwidths named by place.
link_shortest_paths <- function(from, to, lat, bw, root) {
  places <- unique(c(from, to))
  n <- length(places)
  fi <- match(from, places)
  ti <- match(to, places)
  # The links at each place, in table order.
  ends <- c(fi, ti)
  link <- c(seq_along(fi), seq_along(ti))
  o <- order(ends, link)
  incident <- split(link[o], factor(ends[o], levels = seq_len(n)))
  name_rank <- integer(n)
  name_rank[order(places)] <- seq_len(n)
  dist <- hops <- inv_bw <- rep(Inf, n)
  done <- logical(n)
  r <- match(root, places)
  dist[r] <- 0; hops[r] <- 0; inv_bw[r] <- 0
  # Each link pushes at most once (from its first settled end).
  cap <- length(fi) + 1L
  heap_place <- integer(cap)
  heap_dist <- numeric(cap)
  heap_hops <- numeric(cap)
  size <- 1L
  heap_place[1] <- r; heap_dist[1] <- 0; heap_hops[1] <- 0
  while (size > 0L) {
    here <- heap_place[1]
    # Pop: move the last entry down from the top.
    p <- heap_place[size]; d <- heap_dist[size]; h <- heap_hops[size]; k <- name_rank[p]
    size <- size - 1L
    i <- 1L
    repeat {
      child <- 2L * i
      if (child > size) break
      if (child < size) {
        a <- child; b <- child + 1L
        if (heap_dist[b] < heap_dist[a] || (heap_dist[b] == heap_dist[a] &&
            (heap_hops[b] < heap_hops[a] || (heap_hops[b] == heap_hops[a] &&
             name_rank[heap_place[b]] < name_rank[heap_place[a]])))) child <- b
      }
      if (!(heap_dist[child] < d || (heap_dist[child] == d &&
            (heap_hops[child] < h || (heap_hops[child] == h && name_rank[heap_place[child]] < k))))) break
      heap_place[i] <- heap_place[child]; heap_dist[i] <- heap_dist[child]; heap_hops[i] <- heap_hops[child]
      i <- child
    }
    if (size > 0L) { heap_place[i] <- p; heap_dist[i] <- d; heap_hops[i] <- h }
    # A stale entry: the place settled earlier with a better key.
    if (done[here]) next
    done[here] <- TRUE
    for (l in incident[[here]]) {
      there <- if (fi[l] == here) ti[l] else fi[l]
      d <- dist[here] + lat[l]
      h <- hops[here] + 1
      if (!done[there] && (d < dist[there] || (d == dist[there] && h < hops[there]))) {
        dist[there] <- d; hops[there] <- h; inv_bw[there] <- inv_bw[here] + 1 / bw[l]
        if (is.finite(d)) {
          # Push: move the new entry up from the bottom.
          size <- size + 1L
          i <- size
          k <- name_rank[there]
          while (i > 1L) {
            up <- i %/% 2L
            if (!(d < heap_dist[up] || (d == heap_dist[up] &&
                  (h < heap_hops[up] || (h == heap_hops[up] && k < name_rank[heap_place[up]]))))) break
            heap_place[i] <- heap_place[up]; heap_dist[i] <- heap_dist[up]; heap_hops[i] <- heap_hops[up]
            i <- up
          }
          heap_place[i] <- there; heap_dist[i] <- d; heap_hops[i] <- h
        }
      }
    }
  }
  list(latency = stats::setNames(dist, places), inverse_bandwidth = stats::setNames(inv_bw, places))
}

assert_link_topology <- function(x, private, ids, call) {
  if (!all(node_roster(private)$has_system)) {
    fedagg_abort(c("A link table routes simulated messages, which needs device profiles on every node.",
                   i = "Give the nodes profiles with {.fn set_system}."), call = call)
  }
  ends <- c(as.character(x$links$from), as.character(x$links$to))
  named <- unique(ends)
  # A place that is neither a node nor the root, at the end of a single
  # link, leads nowhere: a misspelt node id.
  degree <- table(ends)
  stray <- setdiff(names(degree)[degree == 1L], c(ids, x$root))
  if (length(stray)) {
    fedagg_abort("The link table names unknown node{?s} {.val {stray}} (a leaf that is no node).", class = "client",
                 client = stray[1], call = call)
  }
  missing <- setdiff(ids, named)
  if (length(missing)) {
    fedagg_abort("The link table has no link for node{?s} {.val {missing}}.", class = "client", client = missing[1],
                 call = call)
  }
  cut_off <- ids[!is.finite(x$latency[ids])]
  if (length(cut_off)) {
    root <- x$root
    fedagg_abort(c("The link table has no path to the server {.val {root}} from some nodes.",
                   x = "Cut off: {.val {cut_off}}."), class = "client", client = cut_off[1], call = call)
  }
  if (!is.null(private$.async)) fedagg_abort("A link table cannot be combined with asynchronous rounds yet.", call = call)
  x
}
