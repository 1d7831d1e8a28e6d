# The user's constructor of a Server, and the checks of its arguments.

#' Build a federated simulation
#'
#' `fed_server()` creates a [Server] from a model and nodes, with every lever
#' of a round, then `$fit(rounds)` runs it and returns a [fed_history]. A
#' round is a pipeline of replaceable parts:
#'
#' **selection** (who trains) -> **client algorithm** (what they do, with a
#' **local optimizer**) -> **aggregator** (weighted mean of their updates)
#' -> **server optimizer** (how the global model moves) -> commit.
#'
#' Each part is an object made by a short constructor ([select_uniform()],
#' [fedprox()], [local_adam()], [agg_weighted()], [server_adam()], ...),
#' shown by `print(server)` and listed in `server$settings`. Each can be
#' written in R (see the "Writing your own" sections of their help pages).
#' With a built-in model and built-in parts, all the numeric work of a round
#' (every client's local training, the aggregation, the diagnostics and the
#' server step) is ONE call into Rust, parallel over clients and
#' thread-invariant. Update transforms (clipping, compression, privacy noise)
#' will plug in between the client algorithm and the aggregator.
#'
#' **Trust.** Between the clients and the aggregator, a round applies the
#' nodes' simulated [attacks], a norm [filter][filter_norm()], clipping
#' ([clip_norm()] or [dp_central()]), then a robust [aggregator][aggregators]
#' or the weighted mean, and central DP noise; all in the same Rust call.
#'
#' **Why is it slow?** Every round records diagnostics in the history:
#' `update_norm` (the global update), `client_norm_mean` and
#' `client_norm_sd` (how far the clients moved), `cosine_mean` (the mean
#' cosine between each client's update and their aggregate: low values mean
#' client drift) and `gradient_diversity` (`sum ||Delta_i||^2 / ||sum
#' Delta_i||^2`, Yin et al. 2018: near `1 / K` when the clients agree, large
#' when they pull apart). `plot(history, "diagnostics")` draws them, and
#' [fed_diagnose()] reads them (with the logs) and names the causes and the
#' levers for the run.
#'
#' @param model A [model][models].
#' @param nodes A list of [Node]s (see [fed_nodes()]), or one node.
#' @param algorithm A [client algorithm][client_algorithms] ([fedavg()],
#'   [fedsgd()], [fedprox()], [scaffold()], [fednova()], or
#'   [fed_algorithm()]) or its name.
#' @param fraction Client fraction C in (0, 1]: `max(min_clients,
#'   floor(C * n_nodes))` clients per round.
#' @param min_clients Minimum clients per round.
#' @param selection A [selection rule][selection] ([select_uniform()],
#'   [select_by_size()], [select_poisson()], [select_power_of_choice()],
#'   [select_score()]), its name (`"uniform"`, `"by_size"`), or
#'   `function(round, n, clients)` returning node ids.
#' @param schedule Optional list with the node ids (or positions) of every
#'   round, to replay another tool's run; overrides `fraction` and
#'   `selection`.
#' @param weights Aggregation weights: `NULL` (`"samples"`, or `"equal"`
#'   under [dp_central()]), `"samples"` (FedAvg's),
#'   `"equal"`, `"accuracy"` (each trained model's accuracy on its node's
#'   validation data; every node needs validation data), or
#'   `function(info)` returning one non-negative weight per row of `info`
#'   (a data frame of `client`, `n_samples`, `train_loss`, `val_loss`,
#'   `val_metric`). An error in the function becomes a
#'   `fedagg_error_user_code` naming the round.
#' @param epochs Local epochs: one number, or one per node (heterogeneous
#'   local work, as in the FedProx paper's experiments).
#' @param batch_size,shuffle Local minibatches (see [train_config()]);
#'   `batch_size = Inf` is full batch.
#' @param lr Initial client learning rate.
#' @param lr_schedule A [learning-rate schedule][lr_schedules] or its name.
#' @param weight_decay,momentum Shorthands for `local_optimizer =
#'   local_sgd(momentum, weight_decay)`.
#' @param local_optimizer A [local optimizer][local_optimizers] (`NULL`:
#'   [local_sgd()] with `momentum` and `weight_decay`).
#' @param server_optimizer A [server optimizer][server_optimizers]:
#'   [server_sgd()] (the default, plain FedAvg), [server_adam()],
#'   [server_yogi()], [server_adagrad()], or [server_optimizer()].
#' @param aggregator How client updates are combined: [agg_weighted()], or a
#'   robust rule ([agg_median()], [agg_trimmed_mean()], [agg_krum()],
#'   [agg_multi_krum()], [agg_geometric_median()], [agg_bulyan()]).
#' @param privacy `NULL`, or [dp_central()]: clipping, noise and accounting.
#' @param clip `NULL`, or [clip_norm()]: clipping without noise.
#' @param filter `NULL`, or [filter_norm()]: drop anomalous updates before
#'   aggregation.
#' @param monitor `NULL`, or [monitor_drift()]: drift alerts per round.
#' @param min_samples Minimum cohort: nodes with fewer training samples never
#'   send an update (a disclosure control in the spirit of DataSHIELD's
#'   `nfilter.subset`).
#' @param stragglers Share of each round's clients that are stragglers, in
#'   `[0, 1]`: a seeded `round(stragglers * clients)` of them run a random
#'   `1 .. E - 1` epochs (as in the FedProx paper).
#' @param drop_stragglers If `TRUE`, stragglers are dropped from the round
#'   instead (FedAvg as in the FedProx paper).
#' @param compress `NULL` (float64 updates), or a [compressor][compression]
#'   every client applies to its update before sending it.
#' @param deadline Seconds of simulated time a synchronous round waits for
#'   its clients (needs [system profiles][system_profile] on the nodes).
#'   Clients that would finish later are dropped, except under [fedprox()]
#'   and [fednova()], whose clients send the local steps they completed by
#'   the deadline (partial work).
#' @param over_select Over-selection factor, >= 1: the round selects
#'   `ceiling(over_select * m)` clients and keeps the first `m` to report
#'   (Bonawitz et al. 2019), with `m` the clients per round.
#' @param asynchronous `NULL` (synchronous rounds), or [fedbuff()]:
#'   asynchronous buffered aggregation on the simulated clock.
#' @param topology `NULL` (a star: every client talks to the server over its
#'   own link), [topology_hierarchical()] (clients, edge aggregators and the
#'   cloud) or [topology_links()] (messages routed over a table of links).
#' @param diagnostics Compute the per-round diagnostics (needs the round's
#'   client updates in memory, `clients x parameters` doubles; `FALSE`
#'   aggregates them as they arrive).
#' @param test_data Optional global test set, `list(x = , y = )`.
#' @param eval_every Evaluate every this many rounds (and at the last round
#'   of each `fit()`).
#' @param seed Seed of selection, availability, stragglers, shuffling and
#'   initialisation (`NULL`: drawn from R's RNG, so `set.seed()` applies).
#' @param threads Threads for Rust (`NULL`: option `fedagg.threads`, else all
#'   cores; see [fedagg_threads()] for the limits). Results do not depend on
#'   it.
#' @param hooks Named list of functions: `round_start`, `server_update`,
#'   `round_end` (see [Server]). An error in one becomes a
#'   `fedagg_error_user_code` naming the hook and the round.
#' @param params Optional starting parameters (default: [init_params()]).
#' @return A [Server]. Labels: when the nodes hold factor or character
#'   labels and the model declares no `classes`, the server codes every
#'   node's labels from their union (see [models]); `server$model` carries
#'   those classes and `server$predict(x, "class")` returns them.
#' @examples
#' data <- synthetic_fedprox(1, 1, n_clients = 20, seed = 42)
#' srv <- fed_server(model_softmax(60, 10), fed_nodes(data), fraction = 0.25,
#'                   epochs = 1, batch_size = 10, lr = 0.05,
#'                   test_data = pool_clients(data, "test"), seed = 1)
#' hist <- srv$fit(10, verbose = FALSE)
#' hist
#' summary(hist)
#' plot(hist)
#' srv$timings[1:3, ]
#'
#' # The levers: FedProx clients taking momentum steps, an adaptive server
#' # (FedAdam), and half of each round's clients straggling.
#' srv2 <- fed_server(model_softmax(60, 10), fed_nodes(data), algorithm = fedprox(0.01),
#'                    local_optimizer = local_sgd(momentum = 0.5), server_optimizer = server_adam(0.01),
#'                    epochs = 5, stragglers = 0.5, fraction = 0.25, lr = 0.01,
#'                    test_data = pool_clients(data, "test"), seed = 1)
#' srv2
#' plot(srv2$fit(10, verbose = FALSE), "diagnostics")
#' @export
fed_server <- function(model, nodes, algorithm = fedavg(), fraction = 0.1, min_clients = 1,
                       selection = select_uniform(), schedule = NULL, weights = NULL, epochs = 1,
                       batch_size = 10, lr = 0.01, lr_schedule = lr_constant(), weight_decay = 0,
                       momentum = 0, shuffle = TRUE, test_data = NULL, eval_every = 1, seed = NULL,
                       threads = NULL, hooks = list(), params = NULL, local_optimizer = NULL,
                       server_optimizer = server_sgd(), aggregator = agg_weighted(), stragglers = 0,
                       drop_stragglers = FALSE, diagnostics = TRUE, privacy = NULL, clip = NULL, filter = NULL,
                       min_samples = 0, monitor = NULL, compress = NULL, deadline = Inf, over_select = 1,
                       asynchronous = NULL, topology = NULL) {
  check_required_args()
  Server$new(model = model, nodes = nodes, algorithm = algorithm, fraction = fraction,
             min_clients = min_clients, selection = selection, schedule = schedule, weights = weights,
             epochs = epochs, batch_size = batch_size, lr = lr, lr_schedule = lr_schedule,
             weight_decay = weight_decay, momentum = momentum, shuffle = shuffle, test_data = test_data,
             eval_every = eval_every, seed = seed, threads = threads, hooks = hooks, params = params,
             local_optimizer = local_optimizer, server_optimizer = server_optimizer, aggregator = aggregator,
             stragglers = stragglers, drop_stragglers = drop_stragglers, diagnostics = diagnostics,
             privacy = privacy, clip = clip, filter = filter, min_samples = min_samples, monitor = monitor,
             compress = compress, deadline = deadline, over_select = over_select, asynchronous = asynchronous,
             topology = topology)
}

as_node_list <- function(nodes, call = rlang::caller_env()) {
  if (inherits(nodes, "Node")) nodes <- list(nodes)
  if (!is.list(nodes) || is.object(nodes) || !length(nodes)) {
    fedagg_abort("{.arg nodes} must be a non-empty list of nodes from {.fn fed_nodes}, not {obj_desc(nodes)}.", call = call)
  }
  not_node <- which(!vapply(nodes, inherits, logical(1), "Node"))
  if (length(not_node)) {
    fedagg_abort("{.arg nodes} element {not_node[1]} is {obj_desc(nodes[[not_node[1]]])}, not a {.cls Node}.", call = call)
  }
  nodes
}

# The model with the classes of the whole federation: factor levels (their
# union, in order) or sorted character labels, so that every node codes a
# class the same way. Numeric labels are codes already.
federation_model <- function(model, nodes, test_data, call = rlang::caller_env()) {
  if (model$task != "classification" || !is.null(model$classes)) return(model)
  infos <- lapply(nodes, function(n) n$label_levels)
  ids <- vapply(nodes, function(n) n$id, character(1))
  if (is.list(test_data) && !is.null(test_data$y) && is.atomic(test_data$y)) {
    infos <- c(infos, list(label_levels(test_data$y)))
    ids <- c(ids, "test_data")
  }
  named <- !vapply(infos, is.null, logical(1))
  if (!any(named)) return(model)
  if (!all(named)) {
    fedagg_abort(c("Labels must be names (factor or character) everywhere or class codes everywhere.",
                   x = "{.val {ids[named][1]}} has named labels, {.val {ids[!named][1]}} has numeric or logical ones."),
                 call = call)
  }
  all_factor <- all(vapply(infos, function(i) i$kind == "factor", logical(1)))
  levels <- unique(unlist(lapply(infos, `[[`, "levels")))
  if (!all_factor) levels <- sort(levels)
  if (length(levels) > model$n_classes) {
    fedagg_abort(c("The nodes' labels name {length(levels)} classes; the model has {model$n_classes}.",
                   i = "Classes: {.val {levels}}."), call = call)
  }
  model$classes <- levels
  model
}

assert_nodes <- function(nodes, model, call = rlang::caller_env()) {
  nodes <- as_node_list(nodes, call = call)
  ids <- vapply(nodes, function(n) n$id, character(1))
  dup <- ids[duplicated(ids)]
  if (length(dup)) fedagg_abort("{.arg nodes} must have distinct ids; {.val {dup[1]}} appears twice.", call = call)
  for (n in nodes) n$check_model(model)
  stats::setNames(nodes, ids)
}

# Local epochs: one count for all nodes, or one per node (named by id, or in
# node order).
assert_node_epochs <- function(epochs, ids, call = rlang::caller_env()) {
  if (!is.numeric(epochs) || !(length(epochs) %in% c(1L, length(ids))) || anyNA(epochs) ||
      any(!is.finite(epochs) | epochs < 1 | epochs != round(epochs) | epochs > .Machine$integer.max)) {
    fedagg_abort("{.arg epochs} must be one whole number >= 1, or one per node ({length(ids)}), not {obj_desc(epochs)}.",
                 call = call)
  }
  out <- as.integer(per_node(epochs, ids, "epochs", call = call))
  stats::setNames(out, ids)
}

assert_schedule <- function(schedule, ids, call = rlang::caller_env()) {
  if (is.null(schedule)) return(NULL)
  if (!is.list(schedule) || !length(schedule)) {
    fedagg_abort("{.arg schedule} must be a list with the node ids of each round, not {obj_desc(schedule)}.", call = call)
  }
  lapply(seq_along(schedule), function(r) {
    check_ids(schedule[[r]], ids, sprintf("`schedule` round %d", r), call = call)
  })
}

check_ids <- function(chosen, ids, what, call = rlang::caller_env()) {
  if (is.numeric(chosen)) {
    if (any(is.na(chosen)) || any(chosen < 1 | chosen > length(ids) | chosen != round(chosen))) {
      fedagg_abort("{what} has positions outside 1..{length(ids)}.", class = "schedule", call = call)
    }
    chosen <- ids[chosen]
  }
  if (!is.character(chosen) || !length(chosen)) {
    fedagg_abort("{what} must give at least one node id, not {obj_desc(chosen)}.", class = "schedule", call = call)
  }
  if (anyNA(chosen)) fedagg_abort("{what} gives NA as a node id.", class = "schedule", call = call)
  unknown <- setdiff(chosen, ids)
  if (length(unknown)) fedagg_abort("{what} names unknown node{?s} {.val {unknown}}.", class = "schedule", call = call)
  if (anyDuplicated(chosen)) fedagg_abort("{what} selects a node twice.", class = "schedule", call = call)
  chosen
}

assert_weight_rule <- function(weights, model, nodes, call = rlang::caller_env()) {
  if (is.function(weights)) return(weights)
  rules <- c("samples", "equal", "accuracy")
  if (!is.character(weights) || length(weights) != 1L || !weights %in% rules) {
    fedagg_abort("{.arg weights} must be {.or {.val {rules}}} or a function, not {obj_desc(weights)}.", call = call)
  }
  if (weights == "accuracy") {
    # A remote node says whether it holds validation data when it joins
    # (checked then, see net_sync()).
    missing_val <- names(nodes)[!vapply(nodes, function(n) n$has_validation || is_remote_node(n), logical(1))]
    if (length(missing_val)) {
      fedagg_abort(c("{.code weights = \"accuracy\"} needs validation data on every node.",
                     x = "Node{?s} {.val {missing_val}} ha{?s/ve} none; see {.arg validation} in {.fn fed_nodes}."),
                   class = "client", client = missing_val[1], call = call)
    }
  }
  weights
}

call_weight_function <- function(fun, info, round, call = rlang::caller_env()) {
  info <- as.data.frame(info[c("client", "n_samples", "train_loss", "val_loss", "val_metric")],
                        stringsAsFactors = FALSE)
  w <- call_user(fun, list(info), "The {.arg weights} function", round = round, call = call)
  # Errors name the node, not its position in the round.
  withCallingHandlers(
    assert_weights(w, nrow(info), arg = "weights", call = call),
    fedagg_error_client = function(e) {
      k <- e$client
      fedagg_abort(c("The {.arg weights} function must return finite weights >= 0 (round {round}).",
                     x = "Node {.val {info$client[k]}} got {format(w[k])}."),
                   class = "client", client = info$client[k], round = round, call = call)
    })
}

assert_test_data <- function(test_data, model, call = rlang::caller_env()) {
  if (!is.list(test_data) || is.data.frame(test_data) || !all(c("x", "y") %in% names(test_data))) {
    fedagg_abort("{.arg test_data} must be {.code list(x = , y = )}, not {obj_desc(test_data)}.", call = call)
  }
  check_xy(test_data$x, test_data$y, model, "test_data$x", "test_data$y", call = call)
}

assert_hooks <- function(hooks, call = rlang::caller_env()) {
  known <- c("round_start", "server_update", "round_end")
  if (!is.list(hooks) || (length(hooks) && (is.null(names(hooks)) || anyNA(names(hooks)) || any(names(hooks) == "")))) {
    fedagg_abort("{.arg hooks} must be a named list of functions.", call = call)
  }
  unknown <- setdiff(names(hooks), known)
  if (length(unknown)) {
    fedagg_abort(c("{.arg hooks} has an unknown hook {.val {unknown[1]}}.", i = "Hooks are {.val {known}}."), call = call)
  }
  not_fun <- names(hooks)[!vapply(hooks, is.function, logical(1))]
  if (length(not_fun)) fedagg_abort("Hook {.val {not_fun[1]}} must be a function.", call = call)
  hooks
}

