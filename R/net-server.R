# The server's side of a networked federation: the coordinator (Rust, on
# background threads) serves tasks to the nodes while R runs the same round
# pipeline as the simulation, its clients' work travelling as FitIns and
# FitRes messages through a network grid.

#' Limits of a networked server
#'
#' @description
#' What a server accepts from its nodes, passed as `limits` to
#' [Server]`$serve()`. Requests outside them are refused with a 4xx status
#' and a logged reason (see `inst/protocol.md`).
#'
#' @param clock_window Seconds a node's clock may differ from the server's
#'   (a request's timestamp outside it is refused, and a nonce is
#'   remembered this long).
#' @param rate,burst Requests per second a node may send, sustained, and
#'   in a burst (a fast simulation's rounds take milliseconds, and a node
#'   sends about four requests a round).
#' @param header_timeout,body_timeout Seconds a client may take to send its
#'   headers, and its body; a client that stops reading the server's answer
#'   is cut off after `header_timeout` too.
#' @param max_poll Longest a node's `GET /v1/task` waits for a task.
#' @param max_connections Connections served at once.
#' @param max_per_peer Connections one IP address may hold at once.
#' @param liveness A node counts as connected if heard from within this
#'   many seconds.
#' @return A `fed_net_limits` list.
#' @examples
#' net_limits(rate = 20)
#' @export
net_limits <- function(clock_window = 300, rate = 1000, burst = 2000, header_timeout = 10, body_timeout = 120,
                       max_poll = 10, max_connections = 512, max_per_peer = 256, liveness = 30) {
  args <- list(clock_window = clock_window, rate = rate, burst = burst, header_timeout = header_timeout,
               body_timeout = body_timeout, max_poll = max_poll, max_connections = max_connections,
               max_per_peer = max_per_peer, liveness = liveness)
  for (name in names(args)) {
    x <- args[[name]]
    if (!is.numeric(x) || length(x) != 1L || is.na(x) || !is.finite(x) || x <= 0) {
      fedagg_abort("{.arg {name}} must be one positive number, not {obj_desc(x)}.")
    }
    args[[name]] <- as.double(x)
  }
  for (name in c("max_connections", "max_per_peer", "burst")) {
    if (args[[name]] < 1 || args[[name]] != round(args[[name]])) {
      fedagg_abort("{.arg {name}} must be a whole number >= 1, not {args[[name]]}.")
    }
  }
  structure(args, class = "fed_net_limits")
}

#' @export
print.fed_net_limits <- function(x, ...) {
  cat("<fed_net_limits>\n")
  for (n in names(x)) cat(sprintf("  %-16s %s\n", n, format(x[[n]])))
  invisible(x)
}

# Starts the coordinator and routes the server's rounds through it.
net_listen <- function(self, private, port, host, key, tls, limits, log_file, insecure, round_timeout, threads, viewers = NULL) {
  if (!is.null(private$.net) && isTRUE(call_rust(rs_net_running(private$.net$handle)))) {
    fedagg_abort("This server is already listening on {.url {private$.net$url}}; call {.code $stop()} first.", class = "network")
  }
  nodes <- private$.nodes
  if (!all(vapply(nodes, is_remote_node, logical(1)))) {
    fedagg_abort(c("A server serves only remote nodes.",
                   i = "Make them with {.code fed_remote_nodes(authorized_keys)}; nodes holding data join with {.fn fed_join}."),
                 class = "network")
  }
  net_refuse_unsupported(private)
  port <- assert_count(port, min = 0L)
  if (port > 65535L) fedagg_abort("{.arg port} must be from 0 to 65535, not {port}.")
  if (!is.character(host) || length(host) != 1L || is.na(host)) fedagg_abort("{.arg host} must be one IP address.")
  loopback <- host %in% c("127.0.0.1", "::1") || startsWith(host, "127.")
  if (is.null(tls) && !loopback && !isTRUE(insecure)) {
    fedagg_abort(c("Plain HTTP is served on loopback addresses only, not on {.val {host}}.",
                   i = "Give {.arg tls} (see {.fn fed_tls_selfsigned}), or insist with {.code insecure = TRUE}."),
                 class = "network")
  }
  if (!is.null(tls) && !inherits(tls, "fed_tls")) fedagg_abort("{.arg tls} must come from {.fn fed_tls} or {.fn fed_tls_selfsigned}, not {obj_desc(tls)}.")
  if (!inherits(limits, "fed_net_limits")) fedagg_abort("{.arg limits} must come from {.fn net_limits}, not {obj_desc(limits)}.")
  round_timeout <- assert_limit(round_timeout)
  key_pem <- read_pem(key, "private key")
  keys <- vapply(nodes, function(n) n$public_key, character(1))
  if (!is.null(viewers)) {
    viewers <- if (is.character(viewers) && length(viewers) == 1L) read_authorized_keys(viewers) else check_authorized_keys(viewers, "{.arg viewers}")
    both <- intersect(viewers$node, names(nodes))
    if (length(both)) fedagg_abort("{.val {both[1]}} is both a node and a viewer: a viewer needs an id of its own.", arg = "viewers")
  }
  started <- tryCatch(
    call_rust(rs_net_serve(host, port, if (!is.null(tls)) read_pem(tls$cert, "certificate"),
                           if (!is.null(tls)) read_pem(tls$key, "private key"), key_pem,
                           names(nodes), unname(keys), as.character(viewers$node), as.character(viewers$public_key),
                           "fedagg", unclass(limits),
                           if (!is.null(log_file)) assert_path(log_file, "log_file"),
                           as.integer(threads %||% 2L), isTRUE(insecure))),
    fedagg_error_port_in_use = function(e) {
      fedagg_abort(c("Port {port} on {host} is in use by another process.",
                     i = "Stop that process, choose another {.arg port}, or give {.code port = 0} for a free one."),
                   class = c("port_in_use", "network"), parent = e)
    })
  shown <- if (grepl(":", host, fixed = TRUE)) sprintf("[%s]", host) else host
  private$.net <- list(handle = started$handle, port = started$port, host = host,
                       url = sprintf("%s://%s:%d", if (is.null(tls)) "http" else "https", shown, started$port),
                       round_timeout = round_timeout, liveness = limits$liveness, public_key = call_rust(rs_net_public_key(key_pem)),
                       viewers = !is.null(viewers))
  private$.grid <- grid_network(private)
  publish_status(self, private)
  invisible(self)
}

# What the message path does not carry over the network yet: refused, not
# ignored.
net_refuse_unsupported <- function(private) {
  refuse <- function(what) {
    fedagg_abort(c("A networked federation does not carry {what} yet.", i = "Run it as a simulation."),
                 class = "network_unsupported")
  }
  part <- unsupported_part(private, "networked")
  if (!is.null(part)) refuse(part)
  if (identical(private$.topology$kind, "hierarchical")) refuse("hierarchical topologies")
  if (!is.null(private$.async)) refuse("asynchronous (FedBuff) rounds")
  if (!is.null(private$.monitor)) refuse("drift monitoring (the nodes' data stay on their side)")
  roster <- node_roster(private)
  if (any(roster$has_system)) refuse("simulated system profiles (real time is measured)")
}

# The nodes' news: what the joined ones said, and which are reachable now
# (joined and heard from within the liveness window).
net_sync <- function(private) {
  status <- call_rust(rs_net_nodes(private$.net$handle))
  nodes <- private$.nodes
  for (i in which(status$joined)) {
    node <- nodes[[status$node[i]]]
    if (is.null(node)) next
    if (length(status$label_levels[[i]]) && private$.model$task == "classification" && is.null(private$.model$classes)) {
      fedagg_abort(c("Node {.val {status$node[i]}} has named labels, and the model does not name its classes.",
                     i = "Give {.arg classes} to the model, the same on the server and on every node."),
                   class = "network_unsupported", client = status$node[i])
    }
    node$joined(list(n_samples = status$n_samples[i], has_validation = status$has_validation[i],
                     label_levels = status$label_levels[[i]], data_version = status$data_version[i]))
    if (identical(private$.weights, "accuracy") && !status$has_validation[i]) {
      fedagg_abort(c("{.code weights = \"accuracy\"} needs validation data on every node.",
                     x = "Node {.val {status$node[i]}} joined without any; give it {.arg validation} in {.fn fed_nodes}."),
                   class = "client", client = status$node[i])
    }
  }
  reachable <- status$joined & !is.na(status$seconds_since_seen) & status$seconds_since_seen <= private$.net$liveness
  stats::setNames(reachable[match(names(nodes), status$node)], names(nodes))
}

# A grid whose nodes are other processes: this round's FitIns become the
# nodes' tasks; their FitRes come back until all are in or the round's
# deadline (real seconds) passes. A node that does not answer in time is a
# dropout (NULL).
# It takes the round's messages as a batch (see fit_batch()): the model is
# posted once and shared by every node's task; the answers come back read
# by the coordinator (numbers, not bytes).
grid_network <- function(private) {
  grid <- function(messages, nodes, model, states, round) {
    net <- private$.net
    ids <- names(messages$headers)
    if (anyDuplicated(ids)) fedagg_abort("A networked round gives each node one task.", class = "network_unsupported")
    # R collects lazily: the last round's updates, garbage now, would still
    # be held when this round's arrive. When they are large, collect first
    # (a full collection costs ~20 ms; measured at d = 1e6 with 10 nodes it
    # brought the peak from 1.6 to 1.2 d-vectors per node, bench/network.R).
    if (8 * length(private$.state$flat) * length(ids) >= 2^26) gc(verbose = FALSE)
    call_rust(rs_net_post_tasks(net$handle, round, length(private$.state$flat), ids, unname(messages$headers),
                                messages$payload))
    got <- vector("list", length(ids))
    deadline <- proc.time()[["elapsed"]] + net$round_timeout
    take <- function(wait) {
      ups <- call_rust(rs_net_wait_uploads(net$handle, wait))
      for (k in seq_along(ups$node)) {
        i <- match(ups$node[k], ids)
        if (!is.na(i) && ups$round[k] == round && is.null(got[[i]])) got[[i]] <<- ups$res[[k]]
      }
    }
    # The tasks are withdrawn however this ends (an interrupt too), so that
    # no upload is acknowledged and then dropped.
    on.exit(call_rust(rs_net_close_tasks(net$handle)), add = TRUE)
    repeat {
      left <- deadline - proc.time()[["elapsed"]]
      if (all(!vapply(got, is.null, logical(1))) || left <= 0) break
      # Short waits: R stays interruptible.
      take(min(0.2, left))
    }
    call_rust(rs_net_close_tasks(net$handle))
    # Uploads acknowledged before the tasks were withdrawn are kept.
    take(0)
    got
  }
  structure(grid, batched = TRUE)
}

# The nodes' evaluation of candidate parameters on their held-out data
# (or, for power of choice, their training data), as EvalIns tasks; a node
# that does not answer in time is left out (with a warning).
net_evaluate <- function(private, flat, ids, round, split = "validation") {
  model <- private$.model
  batch <- call_rust(rs_eval_instructions(model_arch(model), model$head %||% 0L, model_bits(model), flat, ids, split, round,
                                         custom_model_name(model)))
  names(batch$headers) <- ids
  got <- grid_network(private)(batch, NULL, model, NULL, round)
  answered <- !vapply(got, is.null, logical(1))
  if (!any(answered)) return(NULL)
  if (!all(answered)) {
    what <- if (split == "validation") "the validation metrics leave {?it/them} out" else "{?it is/they are} picked last"
    fedagg_warn(paste0("Round {round}: node{?s} {.val {ids[!answered]}} did not evaluate in time; ", what, "."),
                class = "eval_dropout")
  }
  res <- got[answered]
  field <- function(f) vapply(res, function(r) as.double(r[[f]]), numeric(1))
  metric_frame(ids[answered], field("n"), field("loss"), field("metric"), model)
}

# Stops the coordinator.
net_stop <- function(private, grace = 5) {
  net <- private$.net
  if (is.null(net)) return(invisible(FALSE))
  call_rust(rs_net_stop(net$handle, grace))
  private$.grid <- NULL
  private$.net <- NULL
  invisible(TRUE)
}

# The nodes as the coordinator sees them, as a data frame.
net_status <- function(private) {
  if (is.null(private$.net) || !isTRUE(call_rust(rs_net_running(private$.net$handle)))) return(NULL)
  s <- call_rust(rs_net_nodes(private$.net$handle))
  new_frame(node = s$node, joined = s$joined, n_samples = s$n_samples, has_validation = s$has_validation,
            seconds_since_seen = s$seconds_since_seen)
}

# Waits until `n` nodes joined (or `timeout` seconds passed).
net_wait_nodes <- function(private, n, timeout, verbose) {
  started <- proc.time()[["elapsed"]]
  shown <- -1
  repeat {
    # Nodes that joined and are heard from: a node that died does not count.
    status <- call_rust(rs_net_nodes(private$.net$handle))
    joined <- sum(status$joined & !is.na(status$seconds_since_seen) & status$seconds_since_seen <= private$.net$liveness)
    if (verbose && joined != shown) {
      cli::cli_inform(c(i = "{joined} of {length(private$.nodes)} node{?s} joined and reachable (waiting for {n})."))
      shown <- joined
    }
    if (joined >= n) return(invisible(joined))
    if (proc.time()[["elapsed"]] - started > timeout) {
      fedagg_abort("{joined} node{?s} joined within {format(timeout)} s; the federation needs {n}.", class = "network_timeout")
    }
    Sys.sleep(0.05)
  }
}

# The whole federation: listen, wait for the nodes, run the rounds (a round
# that fails for want of nodes is run again once they are back), write a
# checkpoint after every committed round, tell the nodes it is over, stop.
net_serve <- function(self, private, rounds, min_nodes, wait_timeout, checkpoint, verbose, linger) {
  rounds <- assert_count(rounds, min = 1L)
  min_nodes <- assert_count(min_nodes %||% length(private$.nodes), min = 1L)
  wait_timeout <- assert_limit(wait_timeout)
  if (min_nodes > length(private$.nodes)) {
    fedagg_abort("{.arg min_nodes} = {min_nodes} is more than the {length(private$.nodes)} authorized node{?s}.")
  }
  on.exit(net_stop(private), add = TRUE)
  private$.planned <- rounds
  # Not ready (GET /ready: 503) until the checkpoint is loaded.
  call_rust(rs_net_set_phase(private$.net$handle, "starting"))
  if (!is.null(checkpoint)) {
    checkpoint <- assert_path(checkpoint, "checkpoint")
    dir.create(checkpoint, recursive = TRUE, showWarnings = FALSE)
    restored <- restore_checkpoint(private, checkpoint)
    if (verbose && restored) cli::cli_inform(c(i = "Resumed from {.file {checkpoint}} after round {private$.state$round}."))
  }
  call_rust(rs_net_set_phase(private$.net$handle, "running"))
  if (verbose) cli::cli_inform(c(i = "Serving on {.url {private$.net$url}} (server key {.val {private$.net$public_key}})."))
  last <- rounds
  while (private$.state$round < last) {
    net_wait_nodes(private, min_nodes, wait_timeout, verbose)
    started <- proc.time()[["elapsed"]]
    ok <- tryCatch({
      self$round()
      TRUE
    }, fedagg_error_cohort = function(e) {
      # Too few nodes answered: nothing changed; wait for them and run the
      # round again (its seeds are the round's own).
      if (verbose) cli::cli_inform(c(`!` = "Round {private$.state$round + 1L} failed: {conditionMessage(e)}", i = "Waiting for nodes."))
      Sys.sleep(0.5)
      FALSE
    })
    if (!ok) next
    call_rust(rs_net_observe_round(private$.net$handle, proc.time()[["elapsed"]] - started))
    if (!is.null(checkpoint)) write_checkpoint(private, checkpoint)
    if (verbose) {
      row <- private$.state$records[[length(private$.state$records)]]
      cli::cli_inform(c(v = "Round {row$round}: {row$clients} client{?s}, {progress_status(row)}"))
    }
    if (!is.null(private$.stopped)) break
  }
  call_rust(rs_net_set_phase(private$.net$handle, "done"))
  # Long enough for polling nodes to hear that the federation is over.
  Sys.sleep(linger)
  invisible(self$history)
}

checkpoint_file <- function(dir) file.path(dir, "server.rds")

# The server's committed state and what it keeps of its nodes, written as
# one file or not at all (temporary file, fsync, rename).
write_checkpoint <- function(private, dir) {
  nodes <- lapply(private$.nodes, function(n) n$.__enclos_env__$private$.states)
  payload <- list(format = 1L, state = private$.state, seed = private$.seed, key = private$.key,
                  seconds = private$.seconds, core_seconds = private$.core_seconds, node_states = nodes)
  write_atomic(checkpoint_file(dir), serialize(payload, NULL, xdr = FALSE))
}

restore_checkpoint <- function(private, dir) {
  file <- checkpoint_file(dir)
  if (!file.exists(file)) return(FALSE)
  payload <- tryCatch(unserialize(readBin(file, "raw", file.size(file))), error = function(e) {
    fedagg_abort("The checkpoint {.file {file}} cannot be read.", class = "checkpoint", foreign = c(x = conditionMessage(e)))
  })
  if (!identical(payload$format, 1L) || !setequal(names(payload$node_states), names(private$.nodes))) {
    fedagg_abort("The checkpoint {.file {file}} is not of this federation (its nodes differ).", class = "checkpoint")
  }
  private$.state <- payload$state
  private$.seed <- payload$seed
  private$.key <- payload$key
  private$.seconds <- payload$seconds
  private$.core_seconds <- payload$core_seconds
  for (id in names(private$.nodes)) private$.nodes[[id]]$.__enclos_env__$private$.states <- payload$node_states[[id]]
  private$.roster <- NULL
  TRUE
}
