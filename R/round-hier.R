# A hierarchical round (HierFAVG, Liu et al. 2020): each edge runs its edge
# rounds from the cloud model with its selected clients, then the cloud folds
# the edge models. Each edge round is one Rust round call (local training and
# the edge's sample-weighted mean); the cloud's fold and server step are
# another. With device profiles it also returns the round's clock and bytes.
# Pure: nothing is kept until the round commits.

hier_round <- function(private, r, config, work) {
  top <- private$.topology
  index <- work$index
  ids <- names(private$.nodes)[index]
  edges <- unname(top$edge_of[ids])
  roster <- check_profiles(private, r)
  if (length(ids) < private$.min_clients) {
    fedagg_abort(c("Round {r}: {length(ids)} client{?s} took part; the round needs {.arg min_clients} = {private$.min_clients}.",
                   i = "Unreachable nodes can leave fewer clients than that."), class = "cohort", round = r)
  }
  model <- private$.model
  d <- length(private$.state$flat)
  timed <- any(roster$has_system)
  edge_sgd <- rust_server_config(server_sgd(), list())
  k <- length(ids)
  train_loss <- steps <- n_samples <- rep(NA_real_, k)
  t_down <- t_compute <- t_up <- rep(NA_real_, k)
  edge_models <- list()
  edge_weights <- numeric()
  group_time <- numeric()
  bytes_down <- bytes_up <- 0
  for (g in intersect(top$edges, edges)) {
    members <- which(edges == g)
    nodes <- private$.nodes[index[members]]
    data <- lapply(unname(nodes), function(n) n$data_for(model, "train"))
    attacks <- unname(lapply(nodes, function(n) n$attack))
    y <- private$.state$flat
    for (it in seq_len(top$edge_rounds)) {
      cfg <- config
      cfg$seed <- derive_seed(derive_seed(private$.seed, r, 13L), it, match(g, top$edges))
      # A simulated attacker sends its distorted update to its edge in every
      # edge round, each with its own noise.
      fold_cfg <- c(list(algorithm = rust_config(cfg, "samples")$algorithm, server = edge_sgd, diagnostics = FALSE,
                         control = NULL, client_controls = NULL, n_nodes = length(private$.nodes)),
                    attack_config(attacks, derive_seed(cfg$seed, 1L, 6L)))
      out <- core_call(rs_train_round(model_arch(model), model$head, model_bits(model), y, data,
                                      vector("list", length(members)), as.double(index[members]),
                                      rust_config(cfg, "samples", work$epochs[members], fold_cfg),
                                      resolve_threads(private$.threads)))
      if (!isTRUE(out$ok)) abort_client_failure(ids[members][out$client], out$message, r, kind = out$kind)
      y <- out$params
    }
    train_loss[members] <- out$train_loss
    steps[members] <- out$steps * top$edge_rounds
    n_samples[members] <- out$n_samples
    edge_models[[g]] <- y - private$.state$flat
    edge_weights[[g]] <- sum(out$n_samples)
    if (timed) {
      # A client's messages go to its edge over its own link.
      times <- client_times(private, roster, index[members], work$epochs[members] * roster$n_samples[index[members]],
                            8 * d, 8 * d)
      t_down[members] <- times$download
      t_compute[members] <- times$compute
      t_up[members] <- times$upload
      cloud_trip <- 2 * (top$latency + 8 * d / top$bandwidth)
      group_time[[g]] <- top$edge_rounds * max(times$download + times$compute + times$upload) + cloud_trip
    }
    bytes_down <- bytes_down + 8 * d * (1 + top$edge_rounds * length(members))
    bytes_up <- bytes_up + 8 * d * (1 + top$edge_rounds * length(members))
  }
  fold_cfg <- list(algorithm = "fedavg", server = rust_server_config(private$.server_opt, private$.state$server_state),
                   diagnostics = private$.diagnostics, control = NULL, n_nodes = length(private$.nodes))
  cloud <- core_call(rs_fold_round(private$.state$flat, unname(edge_models), unname(edge_weights), NULL, fold_cfg,
                                   resolve_threads(private$.threads)))
  if (!isTRUE(cloud$ok)) fedagg_abort("Round {r}: the cloud could not fold the edge models: {cloud$message}", round = r)
  stepped <- server_step(private, cloud, r)
  malicious <- !vapply(private$.nodes[index], function(n) is.null(n$attack), logical(1), USE.NAMES = FALSE)
  info <- client_log_rows(ids, n_samples = n_samples, train_loss = train_loss, weight = n_samples,
                          epochs = work$epochs, steps = steps, malicious = malicious)
  log <- list(round = rep(as.integer(r), k), client = ids, status = rep("kept", k), download = t_down,
              compute = t_compute, upload = t_up, finish = rep(NA_real_, k), work = rep(1, k),
              staleness = rep(NA_real_, k))
  list(result = list(params = stepped$params, aggregate = cloud$aggregate,
                     server_state = stepped$server_state, control = NULL, info = info,
                     diagnostics = lapply(stepped$diagnostics, nan_to_na), node_states = list()),
       system = list(log = log, round_time = if (timed) max(group_time) else NA_real_, bytes_down = bytes_down,
                     bytes_up = bytes_up))
}
