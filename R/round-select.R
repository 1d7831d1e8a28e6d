# A round's first steps: reachable nodes, the selection rule, and each
# selected client's local work (stragglers). Called by Server's private
# methods with the server's private environment.

# Reachable nodes, then the selection rule among them (or the schedule).
# Pure: nothing is kept until the round commits.
select_round <- function(self, private, r) {
  ids <- names(private$.nodes)
  roster <- node_roster(private)
  p <- roster$availability
  markov <- !is.na(roster$mean_on)
  chains <- NULL
  available <- if (all(p == 1)) rep(TRUE, length(ids)) else {
    u <- with_seed(derive_seed(private$.seed, r, 3L), stats::runif(length(ids)))
    on <- u < p
    if (any(markov)) {
      # Markov nodes: from the last round's state (the stationary share in
      # the first round), stay on with 1 - 1/mean_on, come back with 1/mean_off.
      before <- private$.state$chains
      if (!is.null(before)) {
        on[markov] <- ifelse(before[markov], u[markov] >= 1 / roster$mean_on[markov], u[markov] < 1 / roster$mean_off[markov])
      }
      chains <- on
    }
    on
  }
  # A networked server selects among the nodes that joined and are heard from.
  if (!is.null(private$.net)) available <- available & private$.net$reachable
  # Minimum cohort: nodes too small to disclose an update never take part.
  if (private$.min_samples > 0L) {
    eligible <- roster$n_samples >= private$.min_samples
    # Data changed since the server was made can leave too few nodes: a round
    # of no clients, forever, is not a result.
    if (sum(eligible) < private$.min_clients) {
      n_min <- format(private$.min_samples)
      fedagg_abort("Round {r}: {.arg min_samples} = {n_min} leaves {sum(eligible)} eligible node{?s}; a round needs {.arg min_clients} = {private$.min_clients}.",
                   class = "cohort", round = r)
    }
    available <- available & eligible
  }
  names(available) <- ids
  if (!is.null(private$.schedule)) {
    if (r > length(private$.schedule)) {
      fedagg_abort("The {.arg schedule} has {length(private$.schedule)} rounds; round {r} is not in it.",
                   class = "schedule")
    }
    # Node order, as for the selection rules: the listing order must not
    # change a round.
    index <- node_positions(ids, private$.schedule[[r]])
    return(list(ids = ids[index], index = index, available = available, chains = chains,
                log = selection_log_rows(r, ids[index], NULL)))
  }
  sel <- private$.selection
  clients <- new_frame(id = ids, n_samples = roster$n_samples, available = unname(available),
                       reach_share = unname((private$.state$reach + available) / r))
  if ("last_update" %in% sel$needs) clients$last_cosine <- private$.last_cosines()
  ctx <- list(round = r, n = selection_size(private, self$clients_per_round), clients = clients, seed = derive_seed(private$.seed, r, 1L),
              loss = function(chosen) private$.local_losses(chosen, r))
  out <- sel$select(ctx)
  if (is.data.frame(out)) {
    chosen <- out$client[out$picked]
    log <- selection_log_rows(r, out$client, out$score, out$picked)
  } else {
    chosen <- out
    log <- selection_log_rows(r, chosen, NULL)
  }
  # Node order, so that a round does not depend on how a rule lists its picks.
  index <- node_positions(ids, chosen)
  list(ids = ids[index], index = index, available = available, chains = chains, log = log)
}

# The positions of `chosen` among the nodes `ids`, in node order, each once:
# what which(ids %in% chosen) gives, at the cost of the chosen few rather
# than of every node.
node_positions <- function(ids, chosen) {
  sorted_positions(match(chosen, ids), length(ids))
}

# Epochs of each selected client (`index`: their positions among the
# nodes): its own, or fewer for a straggler (which is dropped instead with
# drop_stragglers = TRUE).
local_work <- function(private, index, r) {
  ids <- names(private$.nodes)[index]
  epochs <- private$.epochs[index]
  straggler <- rep(FALSE, length(ids))
  n_slow <- round(private$.stragglers * length(ids))
  if (n_slow > 0) {
    with_seed(derive_seed(private$.seed, r, 4L), {
      slow <- sorted_positions(sample.int(length(ids), n_slow), length(ids))
      straggler[slow] <- TRUE
      epochs[slow] <- vapply(epochs[slow], function(e) if (e > 1L) sample.int(e - 1L, 1L) else 1L, integer(1))
    })
  }
  if (private$.drop_stragglers) {
    keep <- !straggler
    return(list(ids = ids[keep], index = index[keep], epochs = epochs[keep], straggler = straggler[keep]))
  }
  list(ids = ids, index = index, epochs = epochs, straggler = straggler)
}

# Local loss of the current global model on each node's training data
# (power-of-choice selection).
local_losses <- function(private, chosen, r) {
  model <- private$.model
  if (!is.null(private$.net)) {
    # Asked of the nodes, on their training data; one that does not answer
    # in time has no loss (NA), and is picked last.
    got <- net_evaluate(private, private$.state$flat, chosen, r, split = "train")
    return(if (is.null(got)) rep(NA_real_, length(chosen)) else got$loss[match(chosen, got$client)])
  }
  nodes <- private$.nodes[chosen]
  if (is_builtin(model)) {
    data <- lapply(unname(nodes), function(n) n$data_for(model, "train"))
    out <- core_call(rs_evaluate(model_arch(model), model$head, model_bits(model), private$.state$flat, data,
                                 resolve_threads(private$.threads)))
    if (!isTRUE(out$ok)) abort_client_failure(chosen[out$client], out$message, r, kind = out$kind)
    return(out$loss)
  }
  params <- relist_like(private$.state$flat, private$.template)
  vapply(nodes, function(n) n$evaluate(params, model, data = "train")$loss, numeric(1))
}

last_cosines <- function(private) {
  d <- private$.state$last_delta
  vapply(private$.nodes, function(n) {
    u <- n$state_for(private$.key)$last_update
    if (is.null(u) || is.null(d)) return(NA_real_)
    denom <- sqrt(sum(u^2)) * sqrt(sum(d^2))
    if (denom > 0) sum(u * d) / denom else NA_real_
  }, numeric(1))
}
