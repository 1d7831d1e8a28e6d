# The simulated clock and the bytes of a round: which selected clients
# drop out, miss the deadline (or send partial work), or are left over by
# over-selection; each client's download, compute and upload times; the
# round's length. Called by round_body() between the selection and the local
# work, so that clients who never report back do not train. Pure: the server
# keeps nothing until the round commits.

# `work`: the round's clients (`index`, `ids`, `epochs`, from local_work()).
# Returns `work` restricted to the clients that report (with `max_steps`,
# NA for a full run), the rows of the system log, the round's time and its
# bytes down and up.
system_round <- function(private, work, r, cohort) {
  roster <- check_profiles(private, r)
  index <- work$index
  k <- length(index)
  d <- length(private$.state$flat)
  down_bytes <- message_bytes(private$.compress_down, d)
  up_bytes <- message_bytes(private$.compress, d)
  timed <- any(roster$has_system)
  if (!timed && (is.finite(private$.deadline) || private$.over_select > 1)) {
    fedagg_abort("{.arg deadline} and {.arg over_select} need device profiles, and the nodes have none now.",
                 round = r)
  }
  # SCAFFOLD sends its control variate with the model, both ways, as
  # float64 (compression applies to the update only).
  if (private$.algorithm$kind == "scaffold") {
    down_bytes <- down_bytes + 8 * d
    up_bytes <- up_bytes + 8 * d
  }
  n <- roster$n_samples[index]
  batch <- private$.local$batch_size
  batch_len <- if (is.finite(batch)) pmin(batch, n) else n
  full_steps <- if (private$.algorithm$kind == "fedsgd") rep(1, k) else work$epochs * ceiling(n / batch_len)
  samples <- if (private$.algorithm$kind == "fedsgd") n else work$epochs * n
  status <- rep("kept", k)
  max_steps <- rep(NA_real_, k)
  if (timed) {
    speed <- roster$speed[index]
    times <- client_times(private, roster, index, samples, down_bytes, up_bytes)
    t_down <- times$download
    t_compute <- times$compute
    t_up <- times$upload
    finish <- t_down + t_compute + t_up
    dropout <- roster$dropout[index]
    if (k && any(dropout > 0)) {
      u <- with_seed(derive_seed(private$.seed, r, 9L), stats::runif(k))
      status[u < dropout] <- "dropout"
    }
    deadline <- private$.deadline
    late <- status == "kept" & finish > deadline
    if (any(late)) {
      if (accepts_partial_work(private$.algorithm) && is_builtin(private$.model)) {
        # Work done by the deadline, in whole local steps of `batch_len` samples.
        steps_done <- floor(pmax(0, deadline - t_down - t_up) * speed / batch_len)
        partial <- late & steps_done >= 1
        status[partial] <- "partial"
        max_steps[partial] <- steps_done[partial]
        t_compute[partial] <- steps_done[partial] * batch_len[partial] / speed[partial]
        finish[partial] <- t_down[partial] + t_compute[partial] + t_up[partial]
        status[late & !partial] <- "deadline"
      } else {
        status[late] <- "deadline"
      }
    }
    # Over-selection: the first `clients_per_round` to report are kept.
    reporting <- which(status %in% c("kept", "partial"))
    target <- if (private$.over_select > 1) cohort else Inf
    if (length(reporting) > target) {
      order_in <- reporting[order(finish[reporting], index[reporting])]
      status[order_in[-seq_len(target)]] <- "late"
    }
    reported <- status %in% c("kept", "partial")
    # A server learns that a client missed the deadline only at the
    # deadline, unless over-selection already closed the round.
    closed_early <- any(status == "late")
    round_time <- if (any(status == "deadline") && !closed_early) deadline
                  else if (any(reported)) max(finish[reported])
                  else if (is.finite(deadline)) deadline else 0
    # Over-selected clients still running when the round closes are cut off.
    cut <- status == "late"
    t_up[cut] <- NA_real_
    finish[cut] <- NA_real_
    t_up[status %in% c("dropout", "deadline")] <- NA_real_
    t_compute[status == "dropout"] <- NA_real_
    finish[status %in% c("dropout", "deadline")] <- NA_real_
  } else {
    t_down <- t_compute <- t_up <- finish <- rep(NA_real_, k)
    round_time <- NA_real_
  }
  reported <- status %in% c("kept", "partial")
  # The share of its local work each client did (ifelse() costs more than
  # the rest of this step in a small round).
  work_done <- as.double(reported)
  partial <- status == "partial"
  work_done[partial] <- (max_steps / full_steps)[partial]
  log <- list(round = rep(as.integer(r), k), client = work$ids, status = status,
              download = t_down, compute = t_compute, upload = t_up, finish = finish,
              work = work_done,
              staleness = rep(NA_real_, k))
  kept <- list(ids = work$ids[reported], index = index[reported], epochs = work$epochs[reported],
               straggler = work$straggler[reported], max_steps = max_steps[reported])
  list(work = kept, log = log, round_time = round_time,
       bytes_down = k * down_bytes, bytes_up = sum(reported) * up_bytes)
}

# FedProx and FedNova use partial local work by design (Li et al. 2020,
# Wang et al. 2020); other algorithms, and custom R models (trained by whole
# epochs), drop a client that misses the deadline.
accepts_partial_work <- function(algorithm) algorithm$kind %in% c("fedprox", "fednova")

# Bytes of one message of `d` parameters under a compressor (NULL: float64).
message_bytes <- function(compressor, d) {
  if (is.null(compressor)) return(8 * d)
  compressor$bytes(d)
}

# The deadline and over-selection of a server, checked against its nodes
# and selection rule (called by Server$new()).
assert_system_settings <- function(private, deadline, over_select, call = rlang::caller_env()) {
  private$.deadline <- if (identical(deadline, Inf)) Inf
                       else assert_number(deadline, 0, lower_open = TRUE, arg = "deadline", call = call)
  private$.over_select <- assert_number(over_select, 1, 100, arg = "over_select", call = call)
  roster <- node_roster(private)
  if (any(roster$has_system) && !all(roster$has_system)) {
    missing <- names(private$.nodes)[!roster$has_system]
    fedagg_abort(c("Some nodes have a system profile and some do not.",
                   x = "No profile: {.val {utils::head(missing, 5)}}{if (length(missing) > 5) ', ...' else ''}.",
                   i = "Give every node one with {.fn set_system}."), class = "client", client = missing[1], call = call)
  }
  if (!any(roster$has_system) && (is.finite(private$.deadline) || private$.over_select > 1)) {
    fedagg_abort(c("{.arg deadline} and {.arg over_select} act on simulated time, which needs device profiles.",
                   i = "Give the nodes profiles with {.fn set_system} or {.code fed_nodes(..., system = )}."),
                 call = call)
  }
  if (private$.over_select > 1 && (!is.null(private$.schedule) || private$.selection$kind == "poisson")) {
    fedagg_abort("{.arg over_select} needs a selection of a fixed number of clients, not a schedule or Poisson sampling.",
                 call = call)
  }
  invisible()
}

# Clients to select in a round: the cohort, or more with over-selection.
selection_size <- function(private, m) {
  min(length(private$.nodes), ceiling(private$.over_select * m - 1e-9))
}

# The server's systems settings in one line of its print-out (NULL: none).
system_line <- function(private) {
  roster <- node_roster(private)
  parts <- c(if (any(roster$has_system)) "simulated clock",
             if (is.finite(private$.deadline)) sprintf("deadline %ss", format(private$.deadline)),
             if (private$.over_select > 1) sprintf("over-selection x%s", format(private$.over_select)),
             if (!is.null(private$.compress)) private$.compress$label,
             if (!is.null(private$.async)) private$.async$label,
             if (!is.null(private$.topology)) private$.topology$label)
  if (length(parts)) sprintf("  system:  %s", paste(parts, collapse = "; "))
}

# The roster, checked at the start of a round: profiles on every node or on
# none (a profile removed mid-run), and the settings an asynchronous server
# or a topology refused at construction, in case nodes changed since.
check_profiles <- function(private, r) {
  roster <- node_roster(private)
  if (any(roster$has_system) && !all(roster$has_system)) {
    missing <- names(private$.nodes)[!roster$has_system]
    fedagg_abort(c("Some nodes have a system profile and some do not.",
                   x = "No profile: {.val {utils::head(missing, 5)}}{if (length(missing) > 5) ', ...' else ''}."),
                 class = "client", client = missing[1], round = r)
  }
  if (!is.null(private$.async)) assert_async(private$.async, private)
  if (!is.null(private$.topology)) assert_topology(private$.topology, private)
  roster
}

# The listed nodes' download, compute and upload seconds for messages of
# `down_bytes` and `up_bytes` and `samples` processed: over each node's own
# link, or its path in a link table. The one formula of every clock.
client_times <- function(private, roster, index, samples, down_bytes, up_bytes) {
  top <- private$.topology
  if (identical(top$kind, "links")) {
    ids <- names(private$.nodes)[index]
    latency <- unname(top$latency[ids])
    per_byte <- unname(top$inverse_bandwidth[ids])
    down <- latency + down_bytes * per_byte
    up <- latency + up_bytes * per_byte
  } else {
    latency <- roster$latency[index]
    down <- latency + down_bytes / roster$download[index]
    up <- latency + up_bytes / roster$upload[index]
  }
  list(download = down, compute = samples / roster$speed[index], upload = up)
}
