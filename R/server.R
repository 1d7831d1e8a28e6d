#' A federated server: selection, aggregation, rounds
#'
#' A `Server` holds the global model and the [Node]s, and runs rounds: it
#' selects clients, sends them the global parameters and a [train_config()],
#' aggregates what they return, and evaluates. With a built-in model, all the
#' clients selected in a round train in ONE call into Rust, in parallel, and
#' their results are folded into a running weighted sum as they finish (no
#' clients x parameters matrix is ever built). Custom R models train in R,
#' through `future.apply` when a `future::plan()` other than sequential is
#' set.
#'
#' Create one with [fed_server()]; see there for the levers.
#'
#' A round either completes or changes nothing: if any client fails (bad
#' data, divergence, an error in a custom model), the server's parameters,
#' history and client log stay as they were, and a `fedagg_error_client`
#' condition names the client and round.
#'
#' Hooks (`hooks = list(...)`) are where later strategies plug in:
#' * `round_start(server, round, clients)` before training;
#' * `server_update(old, proposed, round, lr)` returns the new global
#'   parameters as one flat vector (server optimisers, momentum);
#' * `round_end(server, round, record)` after the round is committed
#'   (logging, early stopping by raising a condition, custom metrics).
#'
#' @examples
#' data <- synthetic_fedprox(1, 1, n_clients = 10, seed = 1)
#' srv <- fed_server(model_softmax(60, 10), fed_nodes(data), fraction = 0.5,
#'                   batch_size = 10, lr = 0.05, test_data = pool_clients(data, "test"),
#'                   seed = 1)
#' srv$fit(3, verbose = FALSE)
#' srv
#' @export
Server <- R6::R6Class("Server",
  cloneable = FALSE,
  public = list(
    #' @description Create a server (see [fed_server()] for the arguments).
    #' @param model,nodes,algorithm,fraction,min_clients,selection,schedule,weights,epochs,batch_size,lr,lr_schedule,weight_decay,momentum,shuffle,test_data,eval_every,seed,threads,hooks,params
    #'   See [fed_server()].
    initialize = function(model, nodes, algorithm = c("fedavg", "fedsgd"), fraction = 0.1, min_clients = 1,
                          selection = "uniform", schedule = NULL, weights = "samples", epochs = 1,
                          batch_size = 10, lr = 0.01, lr_schedule = lr_constant(), weight_decay = 0,
                          momentum = 0, shuffle = TRUE, test_data = NULL, eval_every = 1, seed = NULL,
                          threads = NULL, hooks = list(), params = NULL) {
      private$.model <- assert_model(model)
      private$.nodes <- assert_nodes(nodes, model)
      private$.algorithm <- match.arg(algorithm)
      private$.fraction <- assert_number(fraction, 0, 1, lower_open = TRUE)
      private$.min_clients <- assert_count(min_clients, min = 1L)
      if (private$.min_clients > length(private$.nodes)) {
        fedagg_abort("{.arg min_clients} = {private$.min_clients} is more than the {length(private$.nodes)} nodes.")
      }
      private$.selection <- assert_selection(selection)
      private$.schedule <- assert_schedule(schedule, names(private$.nodes))
      private$.weights <- assert_weight_rule(weights, model, private$.nodes)
      # Validated now so a bad setting fails here, not in round 1.
      private$.local <- train_config(model, private$.algorithm, epochs, batch_size, lr, weight_decay,
                                     momentum, shuffle)
      private$.lr_schedule <- as_lr_schedule(lr_schedule)
      private$.test <- if (!is.null(test_data)) assert_test_data(test_data, model)
      private$.eval_every <- assert_count(eval_every, min = 1L)
      private$.seed <- if (is.null(seed)) sample.int(.Machine$integer.max, 1L) else assert_count(seed)
      private$.threads <- threads
      resolve_threads(threads)
      private$.hooks <- assert_hooks(hooks)
      private$.template <- params %||% init_params(model, private$.seed)
      private$.flat <- flatten_params(model, private$.template)
      invisible(self)
    },

    #' @description The clients of a round: a uniform sample without
    #'   replacement of `max(min_clients, floor(fraction * n))` nodes, seeded
    #'   by the server's seed and the round; or the schedule's entry; or what
    #'   the `selection` function returns.
    #' @param round Round number (default: the next one).
    #' @return Node ids.
    select = function(round = private$.round + 1L) {
      round <- assert_count(round, min = 1L)
      ids <- names(private$.nodes)
      if (!is.null(private$.schedule)) {
        if (round > length(private$.schedule)) {
          fedagg_abort("The {.arg schedule} has {length(private$.schedule)} rounds; round {round} is not in it.",
                       class = "schedule")
        }
        return(private$.schedule[[round]])
      }
      m <- self$clients_per_round
      if (is.function(private$.selection)) {
        clients <- data.frame(id = ids, n_samples = vapply(private$.nodes, function(n) n$n_samples, numeric(1)),
                              stringsAsFactors = FALSE)
        chosen <- private$.selection(round = round, n = m, clients = clients)
        return(check_ids(chosen, ids, "the `selection` function"))
      }
      ids[with_seed(derive_seed(private$.seed, round, 1L), sort(sample.int(length(ids), m)))]
    },

    #' @description Weighted mean of client parameter lists (the FedAvg
    #'   aggregation, via [weighted_aggregate()]).
    #' @param updates List of parameter lists (or flat vectors).
    #' @param weights Non-negative weights, one per update (`NULL`: equal).
    aggregate = function(updates, weights = NULL) {
      weighted_aggregate(updates, weights = weights, threads = private$.threads)
    },

    #' @description Run one round.
    #' @return The round's history row, invisibly.
    round = function() {
      r <- private$.round + 1L
      private$.run_round(r, last_round = r)
      invisible(utils::tail(self$history, 1L))
    },

    #' @description Run `rounds` rounds.
    #' @param rounds Number of rounds.
    #' @param verbose Show a progress bar (default: in interactive sessions;
    #'   option `fedagg.verbose`).
    #' @return The [fed_history] of all rounds so far.
    fit = function(rounds, verbose = getOption("fedagg.verbose", interactive())) {
      rounds <- assert_count(rounds, min = 1L)
      verbose <- assert_flag(verbose)
      first <- private$.round + 1L
      last <- private$.round + rounds
      status <- ""
      if (verbose) {
        cli::cli_progress_bar("Federated training", total = rounds, clear = FALSE,
                              format = "Round {cli::pb_current}/{cli::pb_total} {cli::pb_bar} {status} | ETA {cli::pb_eta}")
      }
      for (r in first:last) {
        private$.run_round(r, last_round = last)
        if (verbose) {
          row <- private$.records[[length(private$.records)]]
          status <- progress_status(row)
          cli::cli_progress_update()
        }
      }
      if (verbose) cli::cli_progress_done()
      self$history
    },

    #' @description Evaluate the current global model on the test data and on
    #'   every node's validation data.
    #' @return A data frame: `client` ("(test)" for the test set), `n`,
    #'   `loss`, and `accuracy` or `rmse`.
    evaluate = function() {
      rows <- list()
      if (!is.null(private$.test)) {
        ev <- private$.evaluate_test(private$.flat)
        rows[[1]] <- metric_frame("(test)", ev$n, ev$loss, ev$metric, private$.model)
      }
      per_client <- private$.evaluate_clients(private$.flat)
      if (!is.null(per_client)) rows[[length(rows) + 1L]] <- per_client
      if (!length(rows)) fedagg_abort("There is nothing to evaluate on: give {.arg test_data} or nodes with validation data.")
      out <- do.call(rbind, rows)
      rownames(out) <- NULL
      out
    },

    #' @description Predictions of the global model.
    #' @param x Features.
    #' @param type See [predict.fed_model()].
    predict = function(x, type = c("response", "class")) {
      stats::predict(private$.model, self$params, x, type = match.arg(type))
    },

    #' @description A short description.
    #' @param ... Unused.
    format = function(...) {
      loc <- private$.local
      m <- self$clients_per_round
      how <- if (!is.null(private$.schedule)) "from a schedule"
             else if (is.function(private$.selection)) "by a custom selection"
             else sprintf("uniform, fraction %s", format(private$.fraction))
      local <- if (private$.algorithm == "fedsgd") "full-batch gradient" else
        sprintf("E = %d, B = %s", loc$epochs, format(loc$batch_size))
      weights <- if (is.function(private$.weights)) "custom function" else private$.weights
      out <- c(
        sprintf("<Server> %s, %s", algorithm_label(private$.algorithm), model_description(private$.model)),
        sprintf("  clients: %d (%d per round, %s); weights: %s", length(private$.nodes), m, how, weights),
        sprintf("  local:   %s, lr = %s, %s", local, format(loc$lr), attr(private$.lr_schedule, "label")),
        sprintf("  rounds:  %d done, seed %d", private$.round, private$.seed)
      )
      if (private$.round > 0L) {
        last <- private$.records[[private$.round]]
        metric <- main_metric(last)
        out <- c(out, sprintf("  latest:  %s = %.4f, train loss %.4f", metric, last[[metric]], last$train_loss))
      }
      out
    },

    #' @description Print the server.
    #' @param ... Unused.
    print = function(...) {
      cat(self$format(), sep = "\n")
      invisible(self)
    }
  ),
  active = list(
    #' @field params The global parameters (a named list of layers). Can be
    #'   set (validated) to warm-start.
    params = function(value) {
      if (missing(value)) return(unflatten_params(private$.model, private$.flat, private$.template))
      private$.flat <- flatten_params(private$.model, value, arg = "params")
      invisible(self)
    },
    #' @field history The [fed_history] of the rounds run (read-only).
    history = function(value) {
      if (!missing(value)) fedagg_abort("{.field history} is read-only.")
      new_fed_history(private$.records, private$.model, self$settings)
    },
    #' @field client_log Per round and client: samples, training loss and
    #'   aggregation weight (read-only data frame).
    client_log = function(value) {
      if (!missing(value)) fedagg_abort("{.field client_log} is read-only.")
      if (!length(private$.client_log)) {
        return(data.frame(round = integer(), client = character(), n_samples = numeric(),
                          train_loss = numeric(), val_loss = numeric(), val_metric = numeric(),
                          weight = numeric()))
      }
      columns <- c("round", "client", "n_samples", "train_loss", "val_loss", "val_metric", "weight")
      out <- lapply(stats::setNames(columns, columns), function(col) {
        unlist(lapply(private$.client_log, function(entry) rep_len(entry[[col]], length(entry$client))))
      })
      out$round <- as.integer(out$round)
      as.data.frame(out, stringsAsFactors = FALSE)
    },
    #' @field rounds_done Number of rounds run (read-only).
    rounds_done = function(value) {
      if (!missing(value)) fedagg_abort("{.field rounds_done} is read-only.")
      private$.round
    },
    #' @field nodes The nodes (read-only).
    nodes = function(value) {
      if (!missing(value)) fedagg_abort("{.field nodes} is read-only.")
      private$.nodes
    },
    #' @field model The model (read-only).
    model = function(value) {
      if (!missing(value)) fedagg_abort("{.field model} is read-only.")
      private$.model
    },
    #' @field fraction Client fraction C in (0, 1] (validated when set).
    fraction = function(value) {
      if (missing(value)) return(private$.fraction)
      private$.fraction <- assert_number(value, 0, 1, lower_open = TRUE, arg = "fraction")
    },
    #' @field lr The initial learning rate (validated when set).
    lr = function(value) {
      if (missing(value)) return(private$.local$lr)
      private$.local$lr <- assert_number(value, 0, lower_open = TRUE, arg = "lr")
    },
    #' @field clients_per_round Clients selected per round (read-only).
    clients_per_round = function(value) {
      if (!missing(value)) fedagg_abort("{.field clients_per_round} is read-only.")
      k <- length(private$.nodes)
      min(k, max(private$.min_clients, floor(private$.fraction * k + 1e-9)))
    },
    #' @field settings The levers, as a list (read-only).
    settings = function(value) {
      if (!missing(value)) fedagg_abort("{.field settings} is read-only.")
      loc <- private$.local
      list(algorithm = private$.algorithm, model = model_description(private$.model),
           n_clients = length(private$.nodes), fraction = private$.fraction,
           clients_per_round = self$clients_per_round,
           weights = if (is.function(private$.weights)) "custom" else private$.weights,
           epochs = loc$epochs, batch_size = loc$batch_size, lr = loc$lr,
           lr_schedule = attr(private$.lr_schedule, "label"), weight_decay = loc$weight_decay,
           momentum = loc$momentum, seed = private$.seed)
    }
  ),
  private = list(
    .model = NULL, .nodes = NULL, .algorithm = NULL, .fraction = NULL, .min_clients = NULL,
    .selection = NULL, .schedule = NULL, .weights = NULL, .local = NULL, .lr_schedule = NULL,
    .test = NULL, .eval_every = NULL, .seed = NULL, .threads = NULL, .hooks = NULL,
    .flat = NULL, .template = NULL, .round = 0L, .records = list(), .client_log = list(),

    .run_round = function(r, last_round) {
      started <- proc.time()[["elapsed"]]
      ids <- self$select(r)
      lr <- private$.lr_schedule(private$.local$lr, r, last_round)
      call_hook(private$.hooks$round_start, server = self, round = r, clients = ids)
      config <- private$.local
      config$lr <- lr
      config$seed <- derive_seed(private$.seed, r, 2L)
      result <- private$.train_selected(match(ids, names(private$.nodes)), config, r)
      old <- private$.flat
      proposed <- if (private$.algorithm == "fedsgd") old - lr * result$aggregate else result$aggregate
      if (!is.null(private$.hooks$server_update)) {
        proposed <- private$.hooks$server_update(old = old, proposed = proposed, round = r, lr = lr)
        if (!is.numeric(proposed) || length(proposed) != length(old)) {
          fedagg_abort("The {.code server_update} hook must return {length(old)} numbers.", class = "hook")
        }
      }
      if (!all(is.finite(proposed))) {
        fedagg_abort(c("Round {r} produced non-finite global parameters; the model is unchanged.",
                       i = "Try a smaller {.arg lr}."), class = "diverged")
      }
      evaluated <- r %% private$.eval_every == 0L || r == last_round
      metrics <- if (evaluated) private$.evaluate_all(proposed) else list()
      info <- result$info
      record <- c(list(round = r, clients = length(ids), lr = lr,
                       train_loss = stats::weighted.mean(info$train_loss, info$weight),
                       loss_spread = if (length(ids) > 1L) stats::sd(info$train_loss) else NA_real_),
                  private$.metric_slots(metrics),
                  list(elapsed = proc.time()[["elapsed"]] - started))
      # Commit: nothing above changed the server.
      private$.flat <- as.double(proposed)
      private$.round <- r
      private$.records[[length(private$.records) + 1L]] <- record
      private$.client_log[[length(private$.client_log) + 1L]] <- c(list(round = r), info)
      call_hook(private$.hooks$round_end, server = self, round = r, record = record)
      invisible(record)
    },

    .metric_slots = function(metrics) {
      m <- metric_name(private$.model)
      slots <- c("test_loss", paste0("test_", m), "val_loss", paste0("val_", m))
      out <- stats::setNames(rep(list(NA_real_), length(slots)), slots)
      out[names(metrics)] <- metrics
      out
    },

    .train_selected = function(idx, config, round) {
      model <- private$.model
      nodes <- private$.nodes[idx]
      ids <- names(nodes)
      rule <- if (is.function(private$.weights)) "collect" else private$.weights
      if (is_builtin(model)) {
        train <- lapply(nodes, function(n) n$data_handle(model, "train"))
        val <- if (rule %in% c("accuracy", "collect")) lapply(nodes, function(n) n$data_handle(model, "validation"))
               else rep(list(NULL), length(nodes))
        out <- call_rust(rs_train_round(model$sizes, model$head, private$.flat, unname(train), unname(val),
                                        as.double(idx), rust_config(config, rule),
                                        resolve_threads(private$.threads)))
        if (!isTRUE(out$ok)) abort_client_failure(ids[out$client], out$message, round)
        # A plain list: a data frame per round costs more than a small round.
        info <- list(client = ids, n_samples = out$n_samples, train_loss = out$train_loss,
                     val_loss = nan_to_na(out$val_loss), val_metric = nan_to_na(out$val_metric),
                     weight = out$weight)
        if (rule != "collect") return(list(aggregate = out$aggregate, info = info))
        vectors <- out$collected
      } else {
        res <- custom_round(nodes, model, private$.flat, private$.template, config, idx, rule)
        failed <- which(!vapply(res, function(x) isTRUE(x$ok), logical(1)))
        if (length(failed)) abort_client_failure(ids[failed[1]], res[[failed[1]]]$message, round)
        vectors <- lapply(res, `[[`, "vector")
        info <- list(client = ids, n_samples = vapply(res, `[[`, numeric(1), "n_samples"),
                     train_loss = vapply(res, `[[`, numeric(1), "train_loss"),
                     val_loss = vapply(res, `[[`, numeric(1), "val_loss"),
                     val_metric = vapply(res, `[[`, numeric(1), "val_metric"))
        info$weight <- switch(if (rule == "collect") "function" else rule,
          samples = info$n_samples, equal = rep(1, length(ids)),
          accuracy = if (model$task == "classification") info$val_metric else 1 / (1 + info$val_metric),
          `function` = NA_real_)
      }
      if (rule == "collect") info$weight <- call_weight_function(private$.weights, info, round)
      if (sum(info$weight) <= 0) {
        fedagg_abort("Round {round}: the clients' aggregation weights sum to zero.", class = "weights")
      }
      list(aggregate = weighted_aggregate(vectors, weights = info$weight, threads = private$.threads),
           info = info)
    },

    .evaluate_all = function(flat) {
      out <- list()
      m <- metric_name(private$.model)
      if (!is.null(private$.test)) {
        ev <- private$.evaluate_test(flat)
        out$test_loss <- ev$loss
        out[[paste0("test_", m)]] <- ev$metric
      }
      per_client <- private$.evaluate_clients(flat)
      if (!is.null(per_client)) {
        w <- per_client$n
        out$val_loss <- sum(w * per_client$loss) / sum(w)
        out[[paste0("val_", m)]] <- if (m == "rmse") sqrt(sum(w * per_client$rmse^2) / sum(w))
                                    else sum(w * per_client[[m]]) / sum(w)
      }
      out
    },

    .evaluate_test = function(flat) {
      model <- private$.model
      test <- private$.test
      if (is_builtin(model)) {
        if (is.null(test$handle) || !rs_dataset_valid(test$handle)) {
          test$handle <- rs_dataset(as.double(test$x), nrow(test$x), ncol(test$x), test$y)
          private$.test <- test
        }
        out <- call_rust(rs_evaluate(model$sizes, model$head, flat, list(test$handle), resolve_threads(private$.threads)))
        return(list(n = out$n, loss = out$loss, metric = out$metric))
      }
      evaluate_custom(model, relist_like(flat, private$.template), test$x, test$y)
    },

    .evaluate_clients = function(flat) {
      model <- private$.model
      nodes <- Filter(function(n) n$has_validation, private$.nodes)
      if (!length(nodes)) return(NULL)
      if (is_builtin(model)) {
        handles <- lapply(nodes, function(n) n$data_handle(model, "validation"))
        out <- call_rust(rs_evaluate(model$sizes, model$head, flat, unname(handles), resolve_threads(private$.threads)))
        if (!isTRUE(out$ok)) abort_client_failure(names(nodes)[out$client], out$message)
        return(metric_frame(names(nodes), out$n, out$loss, out$metric, model))
      }
      params <- relist_like(flat, private$.template)
      do.call(rbind, lapply(nodes, function(n) n$evaluate(params, model)))
    }
  )
)

#' Build a federated simulation
#'
#' `fed_server()` creates a [Server] from a model and nodes, with every lever
#' of a FedAvg or FedSGD run. Then `$fit(rounds)` runs it and returns a
#' [fed_history].
#'
#' * **FedAvg** (McMahan et al. 2017): each selected client runs `epochs`
#'   epochs of minibatch SGD from the global parameters; the server takes the
#'   weighted mean of the returned models.
#' * **FedSGD**: each selected client returns its full-batch gradient at the
#'   global parameters; the server steps `params - lr * weighted mean
#'   gradient`.
#'
#' @param model A [model][models].
#' @param nodes A list of [Node]s (see [fed_nodes()]), or one node.
#' @param algorithm `"fedavg"` or `"fedsgd"`.
#' @param fraction Client fraction C in (0, 1]: `max(min_clients,
#'   floor(C * n_nodes))` clients per round, sampled uniformly without
#'   replacement with a seed derived from `seed` and the round.
#' @param min_clients Minimum clients per round.
#' @param selection `"uniform"` or `function(round, n, clients)` returning
#'   node ids (`clients` is a data frame of `id` and `n_samples`): the place
#'   for other selection strategies.
#' @param schedule Optional list with the node ids (or positions) of every
#'   round, to replay another tool's run; overrides `fraction` and
#'   `selection`.
#' @param weights Aggregation weights: `"samples"` (FedAvg's default),
#'   `"equal"`, `"accuracy"` (each trained model's accuracy on its node's
#'   validation data; every node needs validation data), or
#'   `function(info)` returning one non-negative weight per row of `info`
#'   (a data frame of `client`, `n_samples`, `train_loss`, `val_loss`,
#'   `val_metric`).
#' @param epochs,batch_size,weight_decay,momentum,shuffle Local training
#'   settings (see [train_config()]); `batch_size = Inf` is full batch.
#' @param lr Initial learning rate.
#' @param lr_schedule A [learning-rate schedule][lr_schedules] or its name.
#' @param test_data Optional global test set, `list(x = , y = )`.
#' @param eval_every Evaluate every this many rounds (and at the last round
#'   of each `fit()`).
#' @param seed Seed of selection, shuffling and initialisation (`NULL`: drawn
#'   from R's RNG, so `set.seed()` applies).
#' @param threads Threads for Rust (`NULL`: option `fedagg.threads`, else all
#'   cores). Results do not depend on it.
#' @param hooks Named list of functions: `round_start`, `server_update`,
#'   `round_end` (see [Server]).
#' @param params Optional starting parameters (default: [init_params()]).
#' @return A [Server].
#' @examples
#' data <- synthetic_fedprox(1, 1, n_clients = 20, seed = 42)
#' srv <- fed_server(model_softmax(60, 10), fed_nodes(data), fraction = 0.25,
#'                   epochs = 1, batch_size = 10, lr = 0.05,
#'                   test_data = pool_clients(data, "test"), seed = 1)
#' hist <- srv$fit(10, verbose = FALSE)
#' hist
#' summary(hist)
#' plot(hist)
#' @export
fed_server <- function(model, nodes, algorithm = c("fedavg", "fedsgd"), fraction = 0.1, min_clients = 1,
                       selection = "uniform", schedule = NULL, weights = "samples", epochs = 1,
                       batch_size = 10, lr = 0.01, lr_schedule = lr_constant(), weight_decay = 0,
                       momentum = 0, shuffle = TRUE, test_data = NULL, eval_every = 1, seed = NULL,
                       threads = NULL, hooks = list(), params = NULL) {
  Server$new(model = model, nodes = nodes, algorithm = algorithm, fraction = fraction,
             min_clients = min_clients, selection = selection, schedule = schedule, weights = weights,
             epochs = epochs, batch_size = batch_size, lr = lr, lr_schedule = lr_schedule,
             weight_decay = weight_decay, momentum = momentum, shuffle = shuffle, test_data = test_data,
             eval_every = eval_every, seed = seed, threads = threads, hooks = hooks, params = params)
}

algorithm_label <- function(algorithm) c(fedavg = "FedAvg", fedsgd = "FedSGD")[[algorithm]]

assert_nodes <- function(nodes, model, call = rlang::caller_env()) {
  if (inherits(nodes, "Node")) nodes <- list(nodes)
  if (!is.list(nodes) || !length(nodes)) {
    fedagg_abort("{.arg nodes} must be a non-empty list of nodes from {.fn fed_nodes}, not {obj_desc(nodes)}.", call = call)
  }
  not_node <- which(!vapply(nodes, inherits, logical(1), "Node"))
  if (length(not_node)) {
    fedagg_abort("{.arg nodes} element {not_node[1]} is {obj_desc(nodes[[not_node[1]]])}, not a {.cls Node}.", call = call)
  }
  ids <- vapply(nodes, function(n) n$id, character(1))
  dup <- ids[duplicated(ids)]
  if (length(dup)) fedagg_abort("{.arg nodes} must have distinct ids; {.val {dup[1]}} appears twice.", call = call)
  for (n in nodes) n$check_model(model)
  stats::setNames(nodes, ids)
}

assert_selection <- function(selection, call = rlang::caller_env()) {
  if (is.function(selection) || identical(selection, "uniform")) return(selection)
  fedagg_abort("{.arg selection} must be {.val uniform} or a function, not {obj_desc(selection)}.", call = call)
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
    missing_val <- names(nodes)[!vapply(nodes, function(n) n$has_validation, logical(1))]
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
  w <- tryCatch(fun(info),
                error = function(e) fedagg_abort(c("The {.arg weights} function failed in round {round}.",
                                                   x = conditionMessage(e)), class = "weights", call = call))
  assert_weights(w, nrow(info), arg = "weights", call = call)
}

assert_test_data <- function(test_data, model, call = rlang::caller_env()) {
  if (!is.list(test_data) || !all(c("x", "y") %in% names(test_data))) {
    fedagg_abort("{.arg test_data} must be {.code list(x = , y = )}, not {obj_desc(test_data)}.", call = call)
  }
  check_xy(test_data$x, test_data$y, model, "test_data$x", "test_data$y", call = call)
}

assert_hooks <- function(hooks, call = rlang::caller_env()) {
  known <- c("round_start", "server_update", "round_end")
  if (!is.list(hooks) || (length(hooks) && is.null(names(hooks)))) {
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

nan_to_na <- function(x) {
  x[is.nan(x)] <- NA_real_
  x
}

call_hook <- function(hook, ...) if (!is.null(hook)) hook(...)

# Trains custom-model clients in R: in parallel with future.apply when the
# user has set a non-sequential plan, else one after the other.
custom_round <- function(nodes, model, flat, template, config, idx, rule) {
  params <- relist_like(flat, template)
  want_val <- rule %in% c("accuracy", "collect")
  work <- function(j) {
    node <- nodes[[j]]
    cfg <- config
    cfg$stream <- idx[j]
    tryCatch({
      out <- node$train(params, cfg)
      val <- if (want_val && node$has_validation) node$evaluate(out$params, model) else NULL
      list(ok = TRUE, vector = flatten_any(out$params, "params", NULL), n_samples = out$n_samples,
           train_loss = out$train_loss, val_loss = if (is.null(val)) NA_real_ else val$loss,
           val_metric = if (is.null(val)) NA_real_ else val[[metric_name(model)]])
    }, fedagg_error_client = function(e) {
      list(ok = FALSE, message = cli::ansi_strip(paste(e$body %||% conditionMessage(e), collapse = " ")))
    })
  }
  if (use_future()) {
    future.apply::future_lapply(seq_along(nodes), work, future.seed = FALSE)
  } else {
    lapply(seq_along(nodes), work)
  }
}

use_future <- function() {
  requireNamespace("future.apply", quietly = TRUE) && requireNamespace("future", quietly = TRUE) &&
    !inherits(future::plan(), "sequential")
}

progress_status <- function(record) {
  out <- sprintf("loss %.4f", record$train_loss)
  metric <- main_metric(record)
  if (metric != "train_loss") out <- paste0(out, sprintf(" | %s %.4f", sub("_", " ", metric), record[[metric]]))
  out
}
