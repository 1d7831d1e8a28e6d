# A round's numeric work: the selected clients' local training, the
# aggregation, the diagnostics and the server step. Called by Server's
# private methods with the server's private environment.

# Local work of the selected clients, aggregation and the server step.
train_selected <- function(private, idx, config, epochs, round, max_steps = NULL) {
  model <- private$.model
  nodes <- private$.nodes[idx]
  ids <- names(nodes)
  alg <- private$.algorithm
  keep_updates <- "last_update" %in% private$.selection$needs
  rule <- if (is.function(private$.weights) || keep_updates) "collect" else private$.weights
  builtin <- is_builtin(model) && alg$kind != "custom"
  # Through a grid a custom model trains on its node too, in R there.
  messages <- !is.null(private$.grid) && alg$kind != "custom"
  dropped <- character()
  # The nodes' data handles and attacks come from the roster (asked of each
  # node once, until a node changes); their state only when the round's
  # parts keep one.
  wants_validation <- (builtin || messages) && (rule == "collect" || private$.weights %in% "accuracy")
  # A grid's nodes read their own data (in this process or elsewhere).
  views <- roster_views(private, idx, if (builtin && is.null(private$.grid)) model, validation = wants_validation)
  needs_state <- alg$kind %in% c("scaffold", "custom") || keep_updates || isTRUE(private$.compress$error_feedback)
  states <- if (needs_state) lapply(unname(nodes), function(n) n$state_for(private$.key)) else rep(list(list()), length(idx))
  attacks <- views$attack
  fold_cfg <- c(list(algorithm = rust_algorithm(config$algorithm),
                     server = rust_server_config(private$.server_opt, private$.state$server_state),
                     diagnostics = private$.diagnostics, control = private$.state$control,
                     client_controls = lapply(states, `[[`, "control"), n_nodes = length(private$.nodes)),
                trust_config(private, attacks, round),
                compression_config(private, states, round))
  if (builtin || messages) {
    train <- views$train
    val <- views$validation
    if (!is.null(private$.grid)) {
      # The message path: every client's half from its FitIns, wherever the
      # grid runs it; the server folds what comes back.
      rule <- "collect"
      round_cfg <- rust_config(config, rule, epochs, fold_cfg)
      out <- grid_fit(private, nodes, lapply(states, function(st) list(control = st$control, residual = st$residual)), idx,
                      epochs, max_steps, round_cfg, round,
                      validation = wants_validation && any(node_roster(private)$has_validation[idx]))
      if (!all(out$reported)) {
        # Nodes that did not answer in time (a networked round) leave the
        # round: it goes on with the others, as with simulated dropouts.
        keep <- out$reported
        dropped <- ids[!keep]
        nodes <- nodes[keep]
        ids <- ids[keep]
        idx <- idx[keep]
        epochs <- rep_len(epochs, length(keep))[keep]
        states <- states[keep]
        attacks <- attacks[keep]
        fold_cfg$client_controls <- fold_cfg$client_controls[keep]
      }
    } else {
      round_cfg <- rust_config(config, rule, epochs, fold_cfg)
      if (!is.null(max_steps) && any(!is.na(max_steps))) round_cfg$max_steps <- as.double(max_steps)
      out <- core_call(rs_train_round(model_arch(model), model$head, model_bits(model), private$.state$flat, train, val,
                                      as.double(idx), round_cfg, resolve_threads(private$.threads)))
      if (!isTRUE(out$ok)) abort_client_failure(ids[out$client], out$message, round, kind = out$kind)
    }
    info <- list(client = ids, n_samples = out$n_samples, train_loss = out$train_loss,
                 val_loss = nan_to_na(out$val_loss), val_metric = nan_to_na(out$val_metric),
                 weight = out$weight, epochs = as.double(epochs), steps = out$steps)
    if (identical(private$.privacy$kind, "central")) info$weight <- rep(1, length(ids))
    deltas <- out$collected
    residuals <- out$residuals
    a <- out$a
    new_controls <- out$client_controls
    custom_states <- NULL
  } else {
    res <- custom_round(nodes, model, private$.state$flat, private$.template, config, idx, rule, round, epochs, alg)
    failed <- which(!vapply(res, function(x) isTRUE(x$ok), logical(1)))
    if (length(failed)) {
      f <- res[[failed[1]]]
      abort_client_failure(ids[failed[1]], f$message, round, kind = f$kind, parent = f$parent)
    }
    field <- function(name) vapply(res, function(x) as.double(x[[name]] %||% NA_real_), numeric(1))
    info <- list(client = ids, n_samples = field("n_samples"), train_loss = field("train_loss"),
                 val_loss = field("val_loss"), val_metric = field("val_metric"), weight = NA_real_,
                 epochs = as.double(epochs), steps = field("steps"))
    # Each client's own half of the round: what it sends.
    sent <- encode_updates(lapply(res, `[[`, "delta"), fold_cfg, ids, round, private$.threads, streams = idx)
    deltas <- sent$updates
    residuals <- sent$residuals
    a <- if (alg$kind == "fednova") fednova_a(info$steps, config$optimizer$momentum)
    new_controls <- if (alg$kind == "scaffold") lapply(res, function(x) x$state$control)
    custom_states <- if (alg$kind == "custom") lapply(res, `[[`, "state")
    out <- NULL
  }
  if (is.null(out) || rule == "collect") {
    info$weight <- if (is.function(private$.weights)) call_weight_function(private$.weights, info, round)
                   else rule_weights(private$.weights, info, model)
    if (anyNA(info$weight)) {
      k <- which(is.na(info$weight))[1]
      abort_client_failure(ids[k], "has no validation data for accuracy weights", round, kind = "client")
    }
    if (sum(info$weight) <= 0) {
      fedagg_abort("Round {round}: the clients' aggregation weights sum to zero.", class = "weights", round = round)
    }
    fold_cfg$client_controls_new <- new_controls
    out_fold <- core_call(rs_fold_round(private$.state$flat, unname(deltas), info$weight, a, server_half(fold_cfg),
                                        resolve_threads(private$.threads)))
    if (!isTRUE(out_fold$ok)) abort_client_failure(ids[out_fold$client], out_fold$message, round, kind = out_fold$kind)
  } else {
    out_fold <- out
  }
  stepped <- server_step(private, out_fold, round)
  params <- stepped$params
  server_state <- stepped$server_state
  diagnostics <- stepped$diagnostics
  info$update_norm <- out_fold$client_norms
  info$cosine <- nan_to_na(out_fold$cosines)
  k <- length(ids)
  info$malicious <- !vapply(attacks, is.null, logical(1), USE.NAMES = FALSE)
  info$passed_filter <- out_fold$kept %||% rep(TRUE, k)
  info$filter_reason <- out_fold$filter_reason %||% rep("", k)
  info$clipped <- out_fold$clipped %||% rep(NA, k)
  info$krum_kept <- out_fold$selected %||% rep(NA, k)
  info <- do.call(client_log_rows, info)
  if (sum(info$passed_filter) < private$.min_clients) {
    if (any(!info$passed_filter)) {
      fedagg_abort(c("Round {round}: {sum(info$passed_filter)} update{?s} passed the filter; the round needs {.arg min_clients} = {private$.min_clients}.",
                     i = "Dropped: {paste(ids[!info$passed_filter], collapse = ', ')}."),
                   class = "filter", round = round)
    }
    fedagg_abort(c("Round {round}: {k} client{?s} took part; the round needs {.arg min_clients} = {private$.min_clients}.",
                   i = "Poisson sampling, unreachable nodes, dropped stragglers, dropouts or a deadline can leave fewer clients than that."),
                 class = "cohort", round = round)
  }
  # Only states that change are committed (FedAvg's nodes keep none).
  node_states <- if (alg$kind %in% c("scaffold", "custom") || keep_updates || !is.null(residuals)) {
    stats::setNames(lapply(seq_along(nodes), function(k) {
      state <- states[[k]]
      if (alg$kind == "scaffold") state$control <- new_controls[[k]]
      if (keep_updates) state$last_update <- deltas[[k]]
      if (!is.null(custom_states)) state$custom <- custom_states[[k]]
      if (!is.null(residuals)) state$residual <- residuals[[k]]
      state$server <- private$.key
      state
    }), ids)
  } else list()
  list(params = params, aggregate = out_fold$aggregate, server_state = server_state, control = out_fold$control,
       info = info, diagnostics = lapply(diagnostics, nan_to_na), node_states = node_states, dropped = dropped)
}

# The server step of a fold's output: the Rust optimizer's (already taken
# in the fold), or a custom server_optimizer()'s step in R. Every schedule
# (synchronous, FedBuff, the cloud of a hierarchy) steps through here.
server_step <- function(private, out_fold, round) {
  params <- out_fold$params
  server_state <- list(m = out_fold$server_m, v = out_fold$server_v)
  diagnostics <- out_fold$diagnostics
  if (private$.server_opt$kind == "custom") {
    stepped <- call_user(private$.server_opt$step,
                         list(params = private$.state$flat, delta = out_fold$aggregate, state = private$.state$server_state$custom,
                              round = round),
                         "The server optimizer's {.fn step}", round = round)
    if (!is.list(stepped) || !is.numeric(stepped$params) || length(stepped$params) != length(private$.state$flat)) {
      fedagg_abort("The server optimizer's {.fn step} must return {.code list(params = <{length(private$.state$flat)} numbers>, state = )}.",
                   class = "user_code", round = round)
    }
    params <- as.double(stepped$params)
    server_state <- list(custom = stepped$state)
    diagnostics$update_norm <- sqrt(sum((params - private$.state$flat)^2))
  }
  list(params = params, server_state = server_state, diagnostics = diagnostics)
}

# A round in which nobody was selected (Poisson sampling, all stragglers
# dropped): the model stays as it is.
empty_round <- function(flat, server_state, control) {
  list(params = flat, aggregate = NULL, server_state = server_state, control = control,
       info = client_log_rows(character()),
       diagnostics = list(update_norm = 0, client_norm_mean = NA_real_, client_norm_sd = NA_real_,
                          cosine_mean = NA_real_, gradient_diversity = NA_real_),
       node_states = list())
}

selection_log_rows <- function(round, clients, score, picked = rep(TRUE, length(clients))) {
  list(round = rep(as.integer(round), length(clients)), client = as.character(clients),
       score = if (is.null(score)) rep(NA_real_, length(clients)) else as.double(score), picked = picked)
}

# The round's attacks, filter, clipping, robust aggregator and privacy noise,
# as the Rust fold applies them (in that order).
trust_config <- function(private, attacks, round) {
  dp <- private$.privacy
  local <- identical(dp$kind, "local")
  if (local) dp <- NULL
  clip <- if (!is.null(dp)) list(max_norm = private$.state$dp_clip %||% dp$clip, per_layer = dp$per_layer)
          else if (!is.null(private$.clip)) private$.clip[c("max_norm", "per_layer")]
  sizes <- if (!is.null(clip) || !is.null(private$.filter)) layer_sizes(private$.model, private$.template)
  n_eligible <- if (!is.null(dp)) private$.eligible()
  z <- if (!is.null(dp$adaptive)) adaptive_noise(dp, private$.sampling_rate() * n_eligible)$update
       else dp$noise_multiplier
  c(list(local_dp = if (local) {
         list(clip = private$.privacy$clip, sd = private$.privacy$sd, seed = as.double(derive_seed(private$.seed, round, 8L)))
       }),
    attack_config(attacks, derive_seed(private$.seed, round, 6L)),
    list(filter = rust_filter(private$.filter, sizes),
       clip = if (!is.null(clip)) c(clip, list(layer_sizes = sizes)),
       aggregator = rust_aggregator(private$.aggregator),
       noise = if (!is.null(dp)) {
         list(sd = z * clip$max_norm, seed = as.double(derive_seed(private$.seed, round, 5L)),
              denominator = private$.sampling_rate() * n_eligible)
       }))
}

# The clients' simulated attacks (their `attack` parts, NULL for honest
# ones) as the Rust round reads them, drawing from `seed`.
attack_config <- function(attacks, seed) {
  # Converted only when some client attacks (a round of honest clients
  # skips the per-client calls); a label flip has no Rust part.
  if (!all(vapply(attacks, is.null, logical(1), USE.NAMES = FALSE))) attacks <- lapply(unname(attacks), rust_attack)
  list(attacks = if (any(!vapply(attacks, is.null, logical(1)))) attacks, attack_seed = as.double(seed))
}

# The settings of a round's clients' half: what each client does to its
# update before sending it (local DP, a simulated attack, compression with
# its residual). The server's half is the rest of a fold configuration.
client_half_fields <- c("local_dp", "attacks", "attack_seed", "compression", "residuals")

server_half <- function(fold_cfg) fold_cfg[setdiff(names(fold_cfg), client_half_fields)]

# The clients' half for updates computed outside the Rust round (custom
# models, FedBuff's arrivals): update k through client k's encoding, drawing
# from its stream `streams[k]`, the stream of its training (its node's
# number; FedBuff: its dispatch).
# Returns the updates as sent and the new residuals (NULL without error
# feedback).
encode_updates <- function(deltas, fold_cfg, ids, round, threads, streams) {
  client <- fold_cfg[intersect(names(fold_cfg), client_half_fields)]
  if (!length(deltas) || is.null(client$local_dp) && is.null(client$attacks) && is.null(client$compression)) {
    return(list(updates = deltas, residuals = NULL))
  }
  out <- core_call(rs_encode_updates(unname(deltas), client, as.double(streams), resolve_threads(threads)))
  if (!isTRUE(out$ok)) abort_client_failure(ids[out$client], out$message, round, kind = out$kind)
  out
}

# The round's compression of the clients' updates, with each node's
# error-feedback residual.
compression_config <- function(private, states, round) {
  comp <- private$.compress
  if (is.null(comp)) return(list())
  list(compression = rust_compressor(comp, derive_seed(private$.seed, round, 10L)),
       residuals = if (isTRUE(comp$error_feedback)) unname(lapply(states, `[[`, "residual")))
}

# Aggregation weights of a rule, from what the clients reported.
rule_weights <- function(rule, info, model) {
  switch(rule,
    samples = info$n_samples,
    equal = rep(1, length(info$client)),
    accuracy = if (model$task == "classification") info$val_metric else 1 / (1 + info$val_metric))
}
