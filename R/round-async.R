# An asynchronous round (FedBuff): the event loop of the simulated clock
# from one server step to the next. Clients in flight are kept in the
# server's async state; each dispatch trains from the model version it
# downloaded, on its own random stream (the dispatch number), so results do
# not depend on how dispatches are grouped into training calls. Pure: the
# new state is returned and kept only when the round commits.

async_round <- function(private, r, config, before_training = function(ids) NULL) {
  spec <- private$.async
  state <- private$.state$async_state %||% list(time = 0, version = 0L, seq = 0L, flight = empty_flight(), deltas = list())
  roster <- check_profiles(private, r)
  d <- length(private$.state$flat)
  eligible <- which(roster$n_samples >= private$.min_samples)
  if (length(eligible) < spec$concurrency) {
    fedagg_abort("{.fn fedbuff} needs {spec$concurrency} eligible nodes; {length(eligible)} have {.arg min_samples}.",
                 class = "cohort", round = r)
  }
  seed <- derive_seed(private$.seed, 0L, 12L)
  bytes_down <- 0
  dispatch <- function(state, time, version) {
    free <- setdiff(eligible, state$flight$node)
    state$seq <- state$seq + 1L
    node <- free[with_seed(derive_seed(private$.seed, state$seq, 11L), sample.int(length(free), 1L))]
    times <- client_times(private, roster, node, private$.epochs[[node]] * roster$n_samples[node], 8 * d, 8 * d)
    down <- times$download
    compute <- times$compute
    up <- times$upload
    # A client that drops out is lost once it has the model; the server
    # then gives its slot to another node.
    dropped <- roster$dropout[node] > 0 &&
      with_seed(derive_seed(private$.seed, state$seq, 15L), stats::runif(1)) < roster$dropout[node]
    finish <- if (dropped) time + down else time + down + compute + up
    state$flight <- rbind_flight(state$flight, list(node = node, seq = state$seq, version = version, start = time,
                                                    download = down, compute = compute, upload = up,
                                                    finish = finish, dropped = dropped))
    bytes_down <<- bytes_down + 8 * d
    state
  }
  # Trains every client in flight without an update yet, and `arrived`
  # (clients that left the flight before training): all of them downloaded
  # the current version.
  train_pending <- function(state, arrived = list()) {
    fl <- state$flight
    in_flight <- which(!fl$dropped & !as.character(fl$seq) %in% names(state$deltas))
    stopifnot(all(fl$version[in_flight] == state$version))
    node <- c(fl$node[in_flight], vapply(arrived, `[[`, numeric(1), "node"))
    seq <- c(fl$seq[in_flight], vapply(arrived, `[[`, numeric(1), "seq"))
    if (!length(node)) return(state)
    nodes <- private$.nodes[node]
    cfg <- config
    cfg$seed <- seed
    if (!is.null(private$.grid)) {
      # Through the grid each client also encodes what it sends, on its
      # dispatch's stream.
      round_cfg <- rust_config(cfg, "collect", as.double(private$.epochs[node]),
                               c(list(client_controls = NULL), client_half(lapply(nodes, function(n) n$attack))))
      out <- grid_fit(private, nodes, rep(list(list()), length(nodes)), seq, private$.epochs[node], NULL,
                      round_cfg, r, validation = FALSE)
      out$encoded <- TRUE
    } else {
      round_cfg <- rust_config(cfg, "collect", as.double(private$.epochs[node]), list(client_controls = NULL))
      out <- core_call(rs_train_round(model_arch(private$.model), private$.model$head, model_bits(private$.model),
                                      private$.state$flat, lapply(unname(nodes), function(n) n$data_for(private$.model)),
                                      vector("list", length(nodes)), as.double(seq), round_cfg,
                                      resolve_threads(private$.threads)))
      if (!isTRUE(out$ok)) abort_client_failure(names(nodes)[out$client], out$message, r, kind = out$kind)
    }
    for (k in seq_along(node)) {
      state$deltas[[as.character(seq[k])]] <-
        list(delta = out$collected[[k]], n_samples = out$n_samples[k], train_loss = out$train_loss[k],
             steps = out$steps[k], encoded = isTRUE(out$encoded), attack = nodes[[k]]$attack)
    }
    state
  }
  # The clients' half of FedBuff: their attacks, on a seed of the run (a
  # client trains in one round and may arrive in another).
  client_half <- function(attacks) attack_config(attacks, derive_seed(private$.seed, 0L, 6L))
  started <- state$time
  while (nrow_flight(state$flight) < spec$concurrency) state <- dispatch(state, state$time, state$version)
  # The clock does not depend on what the clients compute, and every client
  # dispatched in this round trains from this version: the event loop runs
  # first, then the round_start hook sees who arrives, then they train.
  arrivals <- list()
  lost <- list()
  k <- 0L
  while (k < spec$buffer_size) {
    j <- order(state$flight$finish, state$flight$seq)[1]
    fl <- state$flight
    state$flight <- lapply(fl, function(col) col[-j])
    state$time <- fl$finish[j]
    if (fl$dropped[j]) {
      lost[[length(lost) + 1L]] <- lapply(fl, `[[`, j)
      state <- dispatch(state, state$time, state$version)
      next
    }
    k <- k + 1L
    arrivals[[k]] <- c(lapply(fl, `[[`, j), list(staleness = state$version - fl$version[j]))
    # The freed slot goes to another node, with the model of the moment:
    # this version before the buffer is full, the next one after.
    if (k < spec$buffer_size) state <- dispatch(state, state$time, state$version)
  }
  before_training(names(private$.nodes)[vapply(arrivals, `[[`, numeric(1), "node")])
  # Arrivals leave the flight before this: train them with the clients
  # still in flight on this version.
  pending_arrivals <- Filter(function(a) is.null(state$deltas[[as.character(a$seq)]]), arrivals)
  state <- train_pending(state, pending_arrivals)
  for (k in seq_along(arrivals)) {
    key <- as.character(arrivals[[k]]$seq)
    arrivals[[k]] <- c(arrivals[[k]], state$deltas[[key]])
    state$deltas[[key]] <- NULL
  }
  tau <- vapply(arrivals, `[[`, numeric(1), "staleness")
  weights <- call_user(spec$weight, list(tau), "The staleness function", round = r)
  if (!is.numeric(weights) || length(weights) != length(tau) || any(!is.finite(weights) | weights < 0)) {
    fedagg_abort("The staleness function must return {length(tau)} finite weights >= 0, not {obj_desc(weights)}.",
                 class = "user_code", round = r)
  }
  # sum_i s_i Delta_i / K, each Delta_i as its client sent it (a simulated
  # attacker's update is what the server scales).
  arrived_nodes <- vapply(arrivals, `[[`, numeric(1), "node")
  # A client's attack is the one it had when it trained.
  attacks <- lapply(arrivals, `[[`, "attack")
  fold_cfg <- list(algorithm = "fedavg", server = rust_server_config(private$.server_opt, private$.state$server_state),
                   diagnostics = private$.diagnostics, control = NULL, n_nodes = length(private$.nodes),
                   denominator = as.double(length(arrivals)))
  ids <- names(private$.nodes)[arrived_nodes]
  # Updates trained here are encoded now, each on its dispatch's stream, as
  # its client would have before sending it.
  deltas <- lapply(arrivals, `[[`, "delta")
  raw <- !vapply(arrivals, function(a) isTRUE(a$encoded), logical(1))
  sent <- list(updates = deltas)
  if (any(raw)) {
    encoded <- encode_updates(deltas[raw], client_half(attacks[raw]), ids[raw], r, private$.threads,
                              streams = vapply(arrivals[raw], `[[`, numeric(1), "seq"))
    sent$updates[raw] <- encoded$updates
  }
  out <- core_call(rs_fold_round(private$.state$flat, sent$updates, as.double(weights), NULL, server_half(fold_cfg),
                                 resolve_threads(private$.threads)))
  if (!isTRUE(out$ok)) abort_client_failure(names(private$.nodes)[arrivals[[out$client]]$node], out$message, r, kind = out$kind)
  stepped <- server_step(private, out, r)
  state$version <- state$version + 1L
  state <- dispatch(state, state$time, state$version)
  field <- function(name) vapply(arrivals, function(a) as.double(a[[name]]), numeric(1))
  k <- length(arrivals)
  info <- client_log_rows(ids, n_samples = field("n_samples"), train_loss = field("train_loss"), weight = weights,
                          epochs = private$.epochs[field("node")], steps = field("steps"),
                          update_norm = out$client_norms, cosine = nan_to_na(out$cosines),
                          malicious = !vapply(attacks, is.null, logical(1), USE.NAMES = FALSE))
  log <- list(round = rep(as.integer(r), k), client = ids, status = rep("kept", k), download = field("download"),
              compute = field("compute"), upload = field("upload"), finish = field("finish") - started,
              work = rep(1, k), staleness = tau)
  if (length(lost)) {
    lost_field <- function(name) vapply(lost, function(a) as.double(a[[name]]), numeric(1))
    m <- length(lost)
    log <- Map(c, log, list(round = rep(as.integer(r), m), client = names(private$.nodes)[lost_field("node")],
                            status = rep("dropout", m), download = lost_field("download"), compute = rep(NA_real_, m),
                            upload = rep(NA_real_, m), finish = rep(NA_real_, m), work = rep(0, m),
                            staleness = rep(NA_real_, m)))
  }
  list(result = list(params = stepped$params, aggregate = out$aggregate,
                     server_state = stepped$server_state, control = NULL, info = info,
                     diagnostics = lapply(stepped$diagnostics, nan_to_na), node_states = list()),
       system = list(log = log, round_time = state$time - started, bytes_down = bytes_down,
                     bytes_up = k * 8 * d),
       picked = selection_log_rows(r, ids, NULL),
       state = state)
}

empty_flight <- function() {
  list(node = integer(), seq = integer(), version = integer(), start = numeric(), download = numeric(),
       compute = numeric(), upload = numeric(), finish = numeric(), dropped = logical())
}

rbind_flight <- function(flight, row) Map(c, flight, row[names(flight)])

nrow_flight <- function(flight) length(flight$node)
