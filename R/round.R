# One round, start to commit: selection, local work, the hooks, the checks,
# evaluation, then the commit of everything the round changed (server and
# nodes), and the round_end hook. Nothing changes before the commit, so a
# failed round leaves the server and its nodes as they were.

round_body <- function(self, private, r, last_round) {
  started <- proc.time()[["elapsed"]]
  core_started <- core_clock$seconds
  # A networked server first hears what its nodes said (their sizes count
  # in the sampling rate) and which are reachable.
  if (!is.null(private$.net)) {
    if (!isTRUE(call_rust(rs_net_running(private$.net$handle)))) {
      fedagg_abort(c("This server no longer listens (was it saved while listening and read back?).",
                     i = "Call {.code $listen()} or {.code $serve()} again."), class = "network")
    }
    private$.net$reachable <- net_sync(private)
  }
  dp <- private$.privacy
  if (!is.null(dp)) check_dp_cohort(private)
  # This round's sampling rate, kept per round: the accountant composes the
  # rounds with the rates they actually had.
  q_log <- c(private$.state$q_log, private$.sampling_rate())
  if (!is.null(dp) && is.finite(dp$max_epsilon)) {
    next_epsilon <- epsilon_after(dp, q_log)
    if (next_epsilon > dp$max_epsilon) {
      budget_exhausted(sprintf("round %d would spend epsilon %.3f > max_epsilon %s (delta %s)", r, next_epsilon,
                               format(dp$max_epsilon), format(dp$delta)))
    }
  }
  lr <- scheduled_lr(private$.lr_schedule, private$.local$lr, r, last_round)
  config <- private$.local
  config$lr <- lr
  config$seed <- derive_seed(private$.seed, r, 2L)
  config$control <- private$.state$control
  config$server_key <- private$.key
  old <- private$.state$flat
  async_state <- NULL
  if (!is.null(private$.async)) {
    step <- async_round(private, r, config, function(ids) round_start_hook(self, private, r, ids))
    picked <- list(log = step$picked, available = rep(TRUE, length(private$.nodes)))
    system <- step$system
    work <- list(ids = step$result$info$client)
    result <- step$result
    async_state <- step$state
  } else if (identical(private$.topology$kind, "hierarchical")) {
    picked <- private$.select_round(r)
    work <- private$.local_work(picked$index, r)
    round_start_hook(self, private, r, work$ids)
    step <- if (length(work$ids)) hier_round(private, r, config, work)
    result <- step$result %||% empty_round(old, private$.state$server_state, private$.state$control)
    system <- step$system %||% list(log = NULL, round_time = NA_real_, bytes_down = 0, bytes_up = 0)
  } else {
    picked <- private$.select_round(r)
    work <- private$.local_work(picked$index, r)
    # Simulated time: who reports back, with how much work.
    system <- system_round(private, work, r, self$clients_per_round)
    work <- system$work
    round_start_hook(self, private, r, work$ids)
    result <- if (length(work$ids)) {
      private$.train_selected(work$index, config, work$epochs, r, work$max_steps)
    } else {
      if (length(picked$index)) {
        fedagg_warn("Round {r}: none of the {length(picked$index)} selected client{?s} reported (dropouts or the deadline); the model is unchanged.",
                    class = "empty_round")
      }
      empty_round(old, private$.state$server_state, private$.state$control)
    }
  }
  if (length(result$dropped) && !is.null(system$log)) {
    # Networked dropouts: selected, never answered in time.
    gone <- system$log$client %in% result$dropped
    system$log$status[gone] <- "dropout"
    system$log$work[gone] <- 0
  }
  proposed <- result$params
  if (!is.null(private$.hooks$server_update)) {
    proposed <- call_user(private$.hooks$server_update, list(old = old, proposed = proposed, round = r, lr = lr),
                          "The {.code server_update} hook", round = r)
    if (!is.numeric(proposed) || length(proposed) != length(old)) {
      fedagg_abort("The {.code server_update} hook must return {length(old)} numbers, not {obj_desc(proposed)} (round {r}).",
                   class = "user_code", round = r)
    }
  }
  if (!all(is.finite(proposed))) {
    fedagg_abort(c("Round {r} produced non-finite global parameters; the model is unchanged.",
                   i = "Try a smaller {.arg lr}."), class = "diverged", round = r)
  }
  evaluated <- r %% private$.eval_every == 0L || r == last_round
  metrics <- if (evaluated) private$.evaluate_all(proposed, r) else list()
  info <- result$info
  # Clients whose updates came in (a networked dropout was selected, never heard from).
  record <- c(list(round = r, clients = length(work$ids) - length(result$dropped), lr = lr,
                   train_loss = if (length(work$ids)) stats::weighted.mean(info$train_loss, info$weight) else NA_real_,
                   loss_spread = if (length(work$ids) > 1L) stats::sd(info$train_loss) else NA_real_),
              private$.metric_slots(metrics), result$diagnostics,
              list(epsilon = if (identical(dp$kind, "local")) local_epsilon(private, result$info, dp)
                             else as.double(epsilon_after(dp, q_log))))
  next_clip <- adapt_clip(private, result$info, r)
  drift <- monitor_round(private, r, result$info)
  record$drift_alerts <- if (is.null(private$.monitor)) NA_real_ else length(drift$alerts)
  record$clip <- if (!is.null(dp)) private$.state$dp_clip %||% dp$clip else NA_real_
  record$round_time <- system$round_time
  record$sim_time <- if (is.na(system$round_time)) NA_real_ else private$.state$sim_time + system$round_time
  record$bytes_down <- system$bytes_down
  record$bytes_up <- system$bytes_up
  # Commit: nothing above changed the server or a node. Every new value is
  # computed first; then the state is taken out of `private` while the
  # assignments below run, so that the logs grow in place (with a second
  # reference R copies a log to append to it, a cost that grows with every
  # round kept), and is put back in one assignment.
  client_rows <- c(list(round = r), info)
  reach <- private$.state$reach + picked$available
  drift_log <- c(private$.state$drift_log, drift$alerts)
  flat <- as.double(proposed)
  state <- private$.state
  private$.state <- NULL
  state$flat <- flat
  state$round <- r
  state$records[[length(state$records) + 1L]] <- record
  state$client_log[[length(state$client_log) + 1L]] <- client_rows
  state$selection_log[[length(state$selection_log) + 1L]] <- picked$log
  if (!is.null(system$log)) state$system_log[[length(state$system_log) + 1L]] <- system$log
  if (!is.na(record$sim_time)) state$sim_time <- record$sim_time
  if (!is.null(async_state)) state$async_state <- async_state
  state$reach <- reach
  if (!is.null(picked$chains)) state$chains <- picked$chains
  state$server_state <- result$server_state
  state$q_log <- q_log
  if (!is.null(next_clip)) state$dp_clip <- next_clip
  state$drift_log <- drift_log
  state$seen_versions <- drift$seen
  state$control <- result$control
  if (!is.null(result$aggregate)) state$last_delta <- result$aggregate
  if (length(result$node_states)) state$node_rounds[names(result$node_states)] <- r
  private$.state <- state
  for (k in seq_along(result$node_states)) {
    # The round is kept with the state, so a clone of this server can tell
    # whether the state is still that of its own last round.
    state <- result$node_states[[k]]
    state$round <- r
    private$.nodes[[names(result$node_states)[k]]]$commit_state(state)
  }
  private$.seconds[r] <- proc.time()[["elapsed"]] - started
  private$.core_seconds[r] <- core_clock$seconds - core_started
  publish_status(self, private)
  if (!is.null(private$.hooks$round_end)) {
    # A hook may save the server (a checkpoint): without the data handles,
    # whose copies saveRDS() would write beside the nodes' own.
    private$.views <- NULL
    call_user(private$.hooks$round_end, list(server = self, round = r, record = record),
              sprintf("The `round_end` hook (round %d is kept)", r), round = r)
  }
  invisible(record)
}

# The round_start hook, with the clients that will train (or, in an
# asynchronous round, that arrived).
round_start_hook <- function(self, private, r, clients) {
  if (!is.null(private$.hooks$round_start)) {
    call_user(private$.hooks$round_start, list(server = self, round = r, clients = clients),
              "The {.code round_start} hook", round = r)
  }
}
