#' A federated server: selection, aggregation, rounds
#'
#' @description
#' A `Server` holds the global model and the [Node]s, and runs rounds: it
#' selects clients, sends them the global parameters and a [train_config()],
#' aggregates what they return, and evaluates. Create one with
#' [fed_server()], which documents every lever.
#'
#' @details
#' With a built-in model, all the clients selected in a round train in ONE
#' call into Rust, in parallel, and their results are folded into a running
#' weighted sum as they finish (no clients x parameters matrix is ever
#' built). Custom R models train in R, through `future.apply` when a
#' `future::plan()` other than sequential is set.
#'
#' **Rounds are atomic.** If any part of a round fails (a client's data, a
#' diverging client, an error in a custom model, a selection rule or a hook
#' before the commit), the server's parameters, history and client log stay
#' as they were, and the error names the round and the client. A round cannot
#' be started from inside another (for example from a hook).
#'
#' **Hooks** (`hooks = list(...)`) are where later strategies plug in:
#' * `round_start(server, round, clients)` before training;
#' * `server_update(old, proposed, round, lr)` returns the new global
#'   parameters as one flat vector (server optimisers, momentum);
#' * `round_end(server, round, record)` after the round is committed
#'   (logging, custom metrics). Calling [stop_training()] there ends `fit()`
#'   cleanly, keeping every round done; `fit(stop_when = early_stopping())`
#'   does this for the usual rule.
#'
#' **Reproducibility.** The same seed gives `identical()` histories,
#' parameters and client logs, whatever the number of threads; wall-clock
#' times are kept apart, in `$timings`.
#'
#' **Saving and resuming.** A server is an ordinary R object: `saveRDS(srv,
#' f)` then `srv <- readRDS(f); srv$fit(more)` continues exactly as an
#' uninterrupted run would (the nodes' Rust copies of their data are rebuilt
#' on first use). `srv$clone(deep = TRUE)` makes an independent copy to
#' branch a run, for example to try two learning rates from the same round.
#' A shallow `srv$clone()` shares the nodes: the copy takes its own key for
#' the state it leaves on them and continues exactly, unless the original
#' has trained a shared node since the copy was made (then the copy's next
#' round is a `fedagg_error_clone`).
#'
#' @examples
#' data <- synthetic_fedprox(1, 1, n_clients = 10, seed = 1)
#' srv <- fed_server(model_softmax(60, 10), fed_nodes(data), fraction = 0.5,
#'                   batch_size = 10, lr = 0.05, test_data = pool_clients(data, "test"),
#'                   seed = 1)
#' srv$fit(3, verbose = FALSE)
#' srv
#'
#' # Save mid-run and continue where it stopped
#' f <- tempfile(fileext = ".rds")
#' saveRDS(srv, f)
#' resumed <- readRDS(f)
#' resumed$fit(2, verbose = FALSE)
#' @export
Server <- R6::R6Class("Server",
  cloneable = TRUE,
  public = list(
    #' @description Create a server (see [fed_server()] for the arguments).
    #' @param model,nodes,algorithm,fraction,min_clients,selection,schedule,weights,epochs,batch_size,lr,lr_schedule,weight_decay,momentum,shuffle,test_data,eval_every,seed,threads,hooks,params,local_optimizer,server_optimizer,aggregator,stragglers,drop_stragglers,diagnostics,privacy,clip,filter,min_samples,monitor,compress,deadline,over_select,asynchronous,topology
    #'   See [fed_server()].
    initialize = function(model, nodes, algorithm = fedavg(), fraction = 0.1, min_clients = 1,
                          selection = select_uniform(), schedule = NULL, weights = NULL, epochs = 1,
                          batch_size = 10, lr = 0.01, lr_schedule = lr_constant(), weight_decay = 0,
                          momentum = 0, shuffle = TRUE, test_data = NULL, eval_every = 1, seed = NULL,
                          threads = NULL, hooks = list(), params = NULL, local_optimizer = NULL,
                          server_optimizer = server_sgd(), aggregator = agg_weighted(), stragglers = 0,
                          drop_stragglers = FALSE, diagnostics = TRUE, privacy = NULL, clip = NULL, filter = NULL,
                          min_samples = 0, monitor = NULL, compress = NULL, deadline = Inf, over_select = 1,
                          asynchronous = NULL, topology = NULL) {
      assert_model(model)
      private$.state <- new_server_state()
      node_list <- as_node_list(nodes)
      # One class coding for the whole federation, before any label is coded.
      private$.model <- federation_model(model, node_list, test_data)
      model <- private$.model
      private$.nodes <- assert_nodes(node_list, model)
      private$.algorithm <- as_algorithm(algorithm)
      private$.fraction <- assert_number(fraction, 0, 1, lower_open = TRUE)
      private$.min_clients <- assert_count(min_clients, min = 1L)
      if (private$.min_clients > length(private$.nodes)) {
        fedagg_abort("{.arg min_clients} = {private$.min_clients} is more than the {length(private$.nodes)} nodes.")
      }
      private$.selection <- as_selection(selection)
      private$.schedule <- assert_schedule(schedule, names(private$.nodes))
      private$.privacy <- assert_privacy(privacy)
      if (!is.null(private$.privacy$adaptive)) private$.state$dp_clip <- private$.privacy$clip
      private$.clip <- assert_clip(clip)
      private$.filter <- assert_filter(filter)
      private$.min_samples <- assert_count(min_samples, min = 0L)
      private$.monitor <- assert_monitor(monitor)
      # The monitor compares data changed after the server was made.
      private$.state$seen_versions <- lapply(stats::setNames(node_list, vapply(node_list, function(n) n$id, character(1))),
                                       function(n) n$data_version)
      if (identical(private$.privacy$kind, "central")) {
        if (!is.null(weights) && !identical(weights, "equal")) {
          fedagg_warn(c("Differential privacy weights every update equally; {.arg weights} is ignored.",
                        i = "Weighting by samples would raise the sensitivity of the sum."), class = "dp_weights")
        }
        weights <- "equal"
      }
      if (!is.null(private$.privacy) && !is.null(private$.clip)) {
        fedagg_abort("{.arg privacy} clips the updates itself; give {.arg clip} or {.arg privacy}, not both.")
      }
      private$.weights <- assert_weight_rule(weights %||% "samples", model, private$.nodes)
      private$.epochs <- assert_node_epochs(epochs, names(private$.nodes))
      if (!is.null(local_optimizer) && (!identical(momentum, 0) || !identical(weight_decay, 0))) {
        fedagg_abort("Give {.arg momentum} and {.arg weight_decay} to {.arg local_optimizer}, not to {.fn fed_server}, when you give both.")
      }
      if (!is.null(local_optimizer)) assert_local_optimizer(local_optimizer)
      # Validated now so a bad setting fails here, not in round 1.
      private$.local <- train_config(model, private$.algorithm, max(private$.epochs), batch_size, lr, weight_decay,
                                     momentum, shuffle, optimizer = local_optimizer)
      private$.server_opt <- assert_server_optimizer(server_optimizer)
      private$.aggregator <- assert_aggregator(aggregator)
      if (!is.null(private$.privacy) && private$.algorithm$kind == "scaffold") {
        fedagg_abort("{.fn scaffold}'s control variates are computed from the clients' raw updates, which differential privacy does not cover; use another {.arg algorithm} with {.arg privacy}.")
      }
      if (!is.null(private$.filter) && private$.algorithm$kind == "scaffold") {
        fedagg_abort("{.fn scaffold} cannot leave filtered clients out of its control variates yet; use {.arg filter} with another {.arg algorithm}.")
      }
      if (identical(private$.privacy$kind, "central")) {
        if (!is.null(private$.schedule) || !private$.selection$kind %in% c("uniform", "poisson")) {
          fedagg_abort(c("{.fn dp_central}'s accounting needs {.fn select_uniform} or {.fn select_poisson}.",
                         x = "This server selects {if (!is.null(private$.schedule)) 'from a schedule' else private$.selection$label}, which the accountant cannot describe."))
        }
        if (private$.algorithm$kind == "fednova") {
          fedagg_abort("{.fn dp_central} adds its noise to a mean of clipped updates; it cannot be used with {.fn fednova}.")
        }
        check_dp_cohort(private)
      }
      if (identical(private$.privacy$kind, "central") && private$.aggregator$kind != "weighted") {
        fedagg_abort("{.fn dp_central} adds its noise to a sum of clipped updates; use {.code aggregator = agg_weighted()}, not {private$.aggregator$label}.")
      }
      if (private$.algorithm$kind == "fednova" && private$.aggregator$kind != "weighted") {
        fedagg_abort("{.fn fednova} normalises a weighted mean; use {.code aggregator = agg_weighted()} with it.")
      }
      private$.compress <- assert_compressor(compress)
      assert_system_settings(private, deadline, over_select)
      check_dp_cohort(private)
      private$.stragglers <- assert_number(stragglers, 0, 1)
      private$.drop_stragglers <- assert_flag(drop_stragglers)
      private$.diagnostics <- assert_flag(diagnostics)
      private$.state$reach <- stats::setNames(integer(length(private$.nodes)), names(private$.nodes))
      private$.lr_schedule <- as_lr_schedule(lr_schedule)
      private$.key <- new_server_key()
      private$.home <- self
      private$.async <- assert_async(asynchronous, private)
      private$.topology <- assert_topology(topology, private)
      private$.test <- if (!is.null(test_data)) assert_test_data(test_data, model)
      private$.eval_every <- assert_count(eval_every, min = 1L)
      private$.seed <- if (is.null(seed)) sample.int(.Machine$integer.max, 1L) else assert_count(seed)
      resolve_threads(threads)
      private$.threads <- threads
      private$.hooks <- assert_hooks(hooks)
      private$.template <- init_params(model, private$.seed)
      if (!is.null(params)) {
        if (!is_builtin(model)) assert_same_layout(params, private$.template)
        private$.template <- params
      }
      private$.state$flat <- flatten_params(model, private$.template)
      if (!is.null(private$.privacy$adaptive)) {
        adaptive_noise(private$.privacy, private$.sampling_rate() * private$.eligible())
      }
      if (private$.min_samples > 0L && private$.eligible() < private$.min_clients) {
        n_min <- format(private$.min_samples)
        largest <- format(max(node_roster(private)$n_samples))
        fedagg_abort(c("{.arg min_samples} = {n_min} leaves {private$.eligible()} of {length(private$.nodes)} node{?s} eligible; a round needs {.arg min_clients} = {private$.min_clients}.",
                       i = "The largest node has {largest} sample{?s}."), class = "cohort")
      }
      if (!is.null(private$.schedule) && private$.min_samples > 0L) {
        small <- names(private$.nodes)[vapply(private$.nodes, function(n) n$n_samples < private$.min_samples, logical(1))]
        scheduled <- intersect(small, unlist(private$.schedule))
        if (length(scheduled)) {
          n_min <- format(private$.min_samples)
          fedagg_abort(c("The {.arg schedule} picks {cli::qty(length(scheduled))}node{?s} {.val {scheduled}}.",
                         x = "{.arg min_samples} = {n_min} keeps {cli::qty(length(scheduled))}{?it/them} out."),
                       class = "schedule")
        }
      }
      invisible(self)
    },

    #' @description The clients of a round: a uniform sample without
    #'   replacement of `max(min_clients, floor(fraction * n))` nodes, seeded
    #'   by the server's seed and the round; or the schedule's entry; or what
    #'   the `selection` function returns.
    #' @param round Round number (default: the next one).
    #' @return Node ids.
    select = function(round = private$.state$round + 1L) {
      round <- assert_count(round, min = 1L)
      private$.select_round(round)$ids
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
      r <- private$.state$round + 1L
      on.exit(private$.views <- NULL, add = TRUE)
      private$.run_round(r, last_round = r)
      invisible(utils::tail(self$history, 1L))
    },

    #' @description Serve a real federation: listen for nodes (see
    #'   [fed_join()]), wait until `min_nodes` joined, run `rounds` rounds
    #'   with them over the network (the same pipeline, levers and results
    #'   as the simulation), tell the nodes the federation is over, and stop.
    #'   The server's nodes are [fed_remote_nodes()]. A round that too few
    #'   nodes answer in `round_timeout` seconds fails and changes nothing;
    #'   it is run again when nodes are back. With `checkpoint`, the server
    #'   writes its state after every committed round, atomically, and a
    #'   server started again with the same directory resumes from it.
    #'   Interrupting R (Ctrl-C) stops the server cleanly.
    #' @param rounds Rounds to run in all (a resumed server runs the rest).
    #' @param key The server's private key file (see [fed_keygen()]);
    #'   not needed if the server already listens (`$listen()`), whose
    #'   settings then hold.
    #' @param port Port to listen on (0: one the system picks; see `$url`).
    #' @param host IP address to listen on (`"0.0.0.0"` or `"::"` for all).
    #' @param tls `NULL` (plain HTTP, loopback only) or [fed_tls()] /
    #'   [fed_tls_selfsigned()].
    #' @param min_nodes Nodes that must have joined before a round starts
    #'   (default: all).
    #' @param round_timeout Seconds a round waits for its clients' updates;
    #'   the late ones are dropouts (`system_log`).
    #' @param wait_timeout Seconds to wait for `min_nodes` nodes.
    #' @param checkpoint `NULL` or a directory for checkpoints.
    #' @param limits [net_limits()].
    #' @param log_file `NULL` or a file for JSON log lines of every request.
    #' @param viewers `NULL`, or the read-only clients allowed to read the
    #'   federation's status at `GET /v1/status` (a remote [fed_dashboard()]):
    #'   a CSV file or data frame like the nodes' authorized keys (columns
    #'   `node`, the viewer's id, and `public_key`). Their keys do nothing
    #'   else, and the nodes' keys cannot read the status.
    #' @param insecure Allow plain HTTP on an address that is not loopback.
    #' @param threads Threads of the HTTP server.
    #' @param verbose Print progress.
    #' @param linger Seconds to keep answering after the last round, so that
    #'   polling nodes hear the federation is over.
    #' @return The [fed_history], invisibly.
    serve = function(rounds, key = NULL, port = 0, host = "127.0.0.1", tls = NULL, min_nodes = NULL, round_timeout = 300,
                     wait_timeout = Inf, checkpoint = NULL, limits = net_limits(), log_file = NULL, insecure = FALSE,
                     threads = 2, verbose = getOption("fedagg.verbose", interactive()), linger = 2, viewers = NULL) {
      check_required_args()
      verbose <- assert_flag(verbose)
      # A server already listening (see `$listen()`) serves as it listens.
      if (is.null(private$.net)) {
        if (is.null(key)) fedagg_abort("{.arg key} is missing: the server's private key file (see {.fn fed_keygen}).")
        net_listen(self, private, port, host, key, tls, limits, log_file, insecure, round_timeout, threads, viewers)
      }
      net_serve(self, private, rounds, min_nodes, wait_timeout, checkpoint, verbose,
                assert_number(linger, 0, 600))
    },

    #' @description Start listening for nodes without running rounds (the
    #'   rounds then run with `$round()` or `$fit()`, through the network);
    #'   `$serve()` does this and more.
    #' @param key,port,host,tls,round_timeout,limits,log_file,insecure,threads,viewers See `$serve()`.
    listen = function(key, port = 0, host = "127.0.0.1", tls = NULL, round_timeout = 300, limits = net_limits(),
                      log_file = NULL, insecure = FALSE, threads = 2, viewers = NULL) {
      check_required_args()
      net_listen(self, private, port, host, key, tls, limits, log_file, insecure, round_timeout, threads, viewers)
      call_rust(rs_net_set_phase(private$.net$handle, "running"))
      invisible(self)
    },

    #' @description Stop listening: refuse new requests, let those in flight
    #'   finish within `grace` seconds.
    #' @param grace Seconds.
    stop = function(grace = 5) {
      net_stop(private, assert_number(grace, 0, 600))
      invisible(self)
    },

    #' @description Run `rounds` rounds.
    #' @param rounds Number of rounds.
    #' @param verbose Show a progress bar (default: in interactive sessions;
    #'   option `fedagg.verbose`).
    #' @param stop_when `NULL`, an [early_stopping()] rule, or
    #'   `function(history)` returning `TRUE` to stop after the current
    #'   round. A hook can also call [stop_training()].
    #' @return The [fed_history] of all rounds so far.
    fit = function(rounds, verbose = getOption("fedagg.verbose", interactive()), stop_when = NULL) {
      rounds <- assert_count(rounds, min = 1L)
      verbose <- assert_flag(verbose)
      stop_when <- assert_stop_rule(stop_when)
      if (private$.busy) abort_reentrant()
      # The nodes' data handles are kept while this call runs, not after.
      on.exit(private$.views <- NULL, add = TRUE)
      first <- private$.state$round + 1L
      last <- private$.state$round + rounds
      private$.planned <- last
      private$.stopped <- NULL
      status <- ""
      if (verbose) {
        cli::cli_progress_bar("Federated training", total = rounds, clear = FALSE,
                              format = "Round {cli::pb_current}/{cli::pb_total} {cli::pb_bar} {status} | ETA {cli::pb_eta}")
      }
      for (r in first:last) {
        stop_cnd <- NULL
        reason <- tryCatch({
          private$.run_round(r, last_round = last)
          if (!is.null(stop_when)) stop_reason(stop_when, self$history)
        }, fedagg_stop_training = function(cnd) {
          stop_cnd <<- cnd
          cnd$reason
        })
        if (verbose) {
          row <- private$.state$records[[length(private$.state$records)]]
          if (!is.null(row)) status <- progress_status(row)
          cli::cli_progress_update()
        }
        if (!is.null(reason)) {
          private$.stopped <- list(round = private$.state$round, reason = reason)
          if (verbose) cli::cli_inform(c(i = "Stopped after round {private$.state$round}: {reason}"))
          if (inherits(stop_cnd, "fedagg_budget_exhausted")) {
            # Fewer rounds than asked for is a result the caller must be able
            # to see without verbose output.
            if (verbose) cli::cli_progress_done()
            fedagg_warn(c("{.fn fit} stopped after round {private$.state$round} of {last}: the privacy budget is spent.",
                          i = "{reason}."), class = "budget_exhausted")
            return(self$history)
          }
          break
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
        ev <- private$.evaluate_test(private$.state$flat)
        rows[[1]] <- metric_frame("(test)", ev$n, ev$loss, ev$metric, private$.model)
      }
      per_client <- private$.evaluate_clients(private$.state$flat)
      if (!is.null(per_client)) rows[[length(rows) + 1L]] <- per_client
      if (!length(rows)) fedagg_abort("There is nothing to evaluate on: give {.arg test_data} or nodes with validation data.")
      out <- do.call(rbind, rows)
      rownames(out) <- NULL
      out
    },

    #' @description Predictions of the global model.
    #' @param x Features.
    #' @param type See [predict.fed_model()]: `"class"` gives the labels
    #'   the nodes were given (a factor when they were factors or strings).
    predict = function(x, type = c("response", "class")) {
      model_predict(private$.model, self$params, x, assert_choice(type, c("response", "class")), arg = "x")
    },

    #' @description A short description.
    #' @param ... Unused.
    format = function(...) {
      loc <- private$.local
      m <- self$clients_per_round
      if (private$.selection$kind == "poisson") {
        m <- sprintf("%s expected", format(signif(private$.sampling_rate() * private$.eligible(), 3)))
      }
      if (!is.null(private$.async)) m <- sprintf("%d updates per step", private$.async$buffer_size)
      how <- if (!is.null(private$.async)) sprintf("%d training at a time", private$.async$concurrency)
             else if (!is.null(private$.schedule)) "from a schedule"
             else if (private$.selection$kind == "uniform") sprintf("uniform, fraction %s", format(private$.fraction))
             else private$.selection$label
      local <- if (private$.algorithm$kind == "fedsgd") "one full-batch gradient per client" else
        sprintf("E = %s, B = %s, %s", epochs_label(private$.epochs), format(loc$batch_size), loc$optimizer$label)
      weights <- if (is.function(private$.weights)) "custom function" else private$.weights
      slow <- if (private$.stragglers > 0) {
        sprintf("; %s%% stragglers (%s)", format(100 * private$.stragglers),
                if (private$.drop_stragglers) "dropped" else "fewer epochs")
      } else ""
      out <- c(
        sprintf("<Server> %s, %s", private$.algorithm$label, model_description(private$.model)),
        if (!is.null(private$.async)) {
          sprintf("  clients: %d nodes, %d training at a time, a server step every %d updates (weights: staleness)",
                  length(private$.nodes), private$.async$concurrency, private$.async$buffer_size)
        } else {
          sprintf("  clients: %d nodes, %s per round (%s); weights: %s%s", length(private$.nodes), format(m), how, weights, slow)
        },
        sprintf("  local:   %s, lr = %s, %s", local, format(loc$lr), attr(private$.lr_schedule, "label")),
        sprintf("  server:  %s, %s", private$.server_opt$label, private$.aggregator$label),
        if (!is.null(private$.filter) || !is.null(private$.clip) || !is.null(private$.privacy) || !is.null(private$.monitor)) {
          sprintf("  trust:   %s", paste(c(private$.filter$label, private$.clip$label, private$.privacy$label,
                                           private$.monitor$label), collapse = "; "))
        },
        system_line(private),
        sprintf("  rounds:  %d done, seed %d", private$.state$round, private$.seed)
      )
      if (private$.state$round > 0L) {
        last <- private$.state$records[[private$.state$round]]
        metric <- main_metric(last)
        out <- c(out, sprintf("  latest:  %s = %.4f, train loss %.4f", metric, last[[metric]], last$train_loss))
      }
      if (!is.null(private$.stopped)) {
        out <- c(out, sprintf("  stopped: after round %d (%s)", private$.stopped$round, private$.stopped$reason))
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
      if (missing(value)) return(unflatten_params(private$.model, private$.state$flat, private$.template))
      if (private$.busy) abort_reentrant()
      if (!is_builtin(private$.model)) assert_same_layout(value, private$.template)
      flat <- flatten_params(private$.model, value, arg = "params")
      private$.state$flat <- flat
      invisible(self)
    },
    #' @field history The [fed_history] of the rounds run (read-only).
    history = function(value) {
      if (!missing(value)) fedagg_abort("{.field history} is read-only.")
      new_fed_history(private$.state$records, private$.model, self$settings)
    },
    #' @field timings Wall-clock seconds per round, evaluation included
    #'   (`seconds`), and the part of them spent in the Rust core's local
    #'   training, aggregation and evaluation (`core_seconds`); the rest is
    #'   R's bookkeeping and any R code of custom parts. A read-only data
    #'   frame, kept out of the history so that same-seed histories are
    #'   `identical()`.
    timings = function(value) {
      if (!missing(value)) fedagg_abort("{.field timings} is read-only.")
      n <- length(private$.seconds)
      core <- as.double(private$.core_seconds)
      data.frame(round = seq_len(n), seconds = as.double(private$.seconds),
                 core_seconds = c(core, rep(NA_real_, n - length(core)))[seq_len(n)])
    },
    #' @field system_log One row per client selected in a round (read-only
    #'   data frame): `round`, `client`, `status` (`"kept"`, `"partial"`
    #'   (work cut by the deadline), `"dropout"`, `"deadline"` (dropped for
    #'   missing it) or `"late"` (over-selected, not needed)), its simulated
    #'   `download`, `compute` and `upload` seconds, `finish` (seconds into
    #'   the round when its update arrived; `NA` when it never did) and
    #'   `work` (the share of its local steps done), and with [fedbuff()]
    #'   the `staleness` of its update (`NA` in synchronous rounds). Times are
    #'   `NA` without [system profiles][system_profile].
    system_log = function(value) {
      if (!missing(value)) fedagg_abort("{.field system_log} is read-only.")
      system_log_frame(private$.state$system_log)
    },
    #' @field stopped `NULL`, or how the last `fit()` ended early: a list of
    #'   `round` and `reason` (read-only).
    stopped = function(value) {
      if (!missing(value)) fedagg_abort("{.field stopped} is read-only.")
      private$.stopped
    },
    #' @field client_log Per round and client (read-only data frame):
    #'   `round`, `client`; what it reported: `n_samples`, `epochs`,
    #'   `steps`, `train_loss`, `val_loss` and `val_metric` (its trained
    #'   model on its validation data; `NA` when not computed); its
    #'   aggregation `weight`; `update_norm` and `cosine` (its update as the
    #'   server received it, and its cosine with the round's aggregate);
    #'   `malicious` (the node simulates an attack); `passed_filter` and
    #'   `filter_reason` (the norm filter's verdict; `TRUE` and `""` without
    #'   a filter); `clipped` (its norm exceeded the clipping bound; `NA`
    #'   without clipping); `krum_kept` (picked by Krum, Multi-Krum or
    #'   Bulyan; `NA` for other aggregators).
    client_log = function(value) {
      if (!missing(value)) fedagg_abort("{.field client_log} is read-only.")
      client_log_frame(private$.state$client_log)
    },
    #' @field selection_log Per round, the candidates of the selection rule
    #'   with their `score` (the local loss for power-of-choice, the
    #'   contribution score for [select_score()], `NA` for random rules,
    #'   which log only their picks) and whether each was `picked`
    #'   (read-only data frame).
    selection_log = function(value) {
      if (!missing(value)) fedagg_abort("{.field selection_log} is read-only.")
      cols <- c("round", "client", "score", "picked")
      out <- lapply(stats::setNames(cols, cols), function(col) unlist(lapply(private$.state$selection_log, `[[`, col)))
      if (!length(private$.state$selection_log)) {
        out <- list(round = integer(), client = character(), score = numeric(), picked = logical())
      }
      as.data.frame(out, stringsAsFactors = FALSE)
    },
    #' @field drift_log The alerts of [monitor_drift()]: one row per test
    #'   below its `alpha` (read-only data frame).
    drift_log = function(value) {
      if (!missing(value)) fedagg_abort("{.field drift_log} is read-only.")
      if (!length(private$.state$drift_log)) {
        return(data.frame(round = integer(), signal = character(), client = character(), statistic = numeric(),
                          p_value = numeric()))
      }
      out <- lapply(stats::setNames(drift_log_columns, drift_log_columns), function(col) {
        unlist(lapply(private$.state$drift_log, `[[`, col))
      })
      out$round <- as.integer(out$round)
      as.data.frame(out, stringsAsFactors = FALSE)
    },
    #' @field server_state The server optimizer's state (`m`, `v`) and
    #'   SCAFFOLD's server `control` variate (read-only).
    server_state = function(value) {
      if (!missing(value)) fedagg_abort("{.field server_state} is read-only.")
      c(private$.state$server_state, list(control = private$.state$control))
    },
    #' @field rounds_done Number of rounds run (read-only).
    rounds_done = function(value) {
      if (!missing(value)) fedagg_abort("{.field rounds_done} is read-only.")
      private$.state$round
    },
    #' @field nodes The nodes (read-only).
    nodes = function(value) {
      if (!missing(value)) fedagg_abort("{.field nodes} is read-only.")
      private$.nodes
    },
    #' @field url Where the server listens (`NULL` when it does not).
    url = function(value) {
      if (!missing(value)) fedagg_abort("{.field url} is read-only.")
      private$.net$url
    },
    #' @field network `NULL` when the server does not listen; otherwise its
    #'   nodes as the coordinator sees them: a data frame of `node`,
    #'   `joined`, `n_samples`, `has_validation` and `seconds_since_seen`.
    network = function(value) {
      if (!missing(value)) fedagg_abort("{.field network} is read-only.")
      net_status(private)
    },
    #' @field model The model, with the federation's `classes` (read-only).
    model = function(value) {
      if (!missing(value)) fedagg_abort("{.field model} is read-only.")
      private$.model
    },
    #' @field fraction Client fraction C in (0, 1] (validated when set).
    fraction = function(value) {
      if (missing(value)) return(private$.fraction)
      if (private$.busy) abort_reentrant()
      private$.fraction <- assert_number(value, 0, 1, lower_open = TRUE, arg = "fraction")
    },
    #' @field lr The initial learning rate (validated when set).
    lr = function(value) {
      if (missing(value)) return(private$.local$lr)
      if (private$.busy) abort_reentrant()
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
      list(algorithm = private$.algorithm$kind, algorithm_label = private$.algorithm$label,
           model = model_description(private$.model),
           n_clients = length(private$.nodes), fraction = private$.fraction,
           clients_per_round = self$clients_per_round,
           selection = if (!is.null(private$.schedule)) "schedule" else private$.selection$label,
           selection_kind = if (!is.null(private$.schedule)) "schedule" else private$.selection$kind,
           expected_clients = private$.sampling_rate() * private$.eligible(),
           weights = if (is.function(private$.weights)) "custom" else private$.weights,
           epochs = epochs_label(private$.epochs), batch_size = loc$batch_size, lr = loc$lr,
           lr_schedule = attr(private$.lr_schedule, "label"), local_optimizer = loc$optimizer$label,
           weight_decay = loc$optimizer$weight_decay, momentum = loc$optimizer$momentum,
           server_optimizer = private$.server_opt$label, aggregator = private$.aggregator$label,
           stragglers = private$.stragglers, drop_stragglers = private$.drop_stragglers,
           privacy = private$.privacy$label, privacy_object = private$.privacy, sampling_rate = private$.sampling_rate(),
           sampling_rates = private$.state$q_log,
           clip = private$.clip$label, clip_object = private$.clip, filter = private$.filter$label,
           filter_object = private$.filter,
           min_samples = private$.min_samples, seed = private$.seed, stopped = private$.stopped,
           # What fed_diagnose() reads: the levers of the system axis and the
           # model's size.
           n_params = length(private$.state$flat), epochs_max = max(private$.epochs),
           compress = private$.compress$label, compress_object = private$.compress,
           asynchronous = private$.async$label, asynchronous_object = private$.async,
           deadline = private$.deadline, over_select = private$.over_select,
           monitor = private$.monitor$label, algorithm_settings = private$.algorithm$settings,
           server_optimizer_kind = private$.server_opt$kind, server_momentum = private$.server_opt$momentum)
    }
  ),
  private = list(
    .model = NULL, .nodes = NULL, .algorithm = NULL, .fraction = NULL, .min_clients = NULL,
    .selection = NULL, .schedule = NULL, .weights = NULL, .local = NULL, .lr_schedule = NULL,
    .test = NULL, .eval_every = NULL, .seed = NULL, .threads = NULL, .hooks = NULL,
    .template = NULL,
    # Everything a committed round changes, as one value: replaced whole at
    # the commit (see new_server_state()).
    .state = NULL,
    .seconds = numeric(), .core_seconds = numeric(), .stopped = NULL, .busy = FALSE,
    .epochs = NULL, .server_opt = NULL, .aggregator = NULL,
    .stragglers = 0, .drop_stragglers = FALSE, .diagnostics = TRUE,
    .privacy = NULL, .clip = NULL, .filter = NULL, .min_samples = 0L,
    .monitor = NULL, .roster = NULL, .views = NULL,
    .compress = NULL, .compress_down = NULL, .deadline = Inf, .over_select = 1,
    .async = NULL, .topology = NULL, .key = NULL, .home = NULL, .grid = NULL, .net = NULL,
    .dashboard = NULL, .planned = NULL,

    # Nodes that can ever be selected (the minimum cohort excludes the rest).
    .eligible = function() {
      sum(node_roster(private)$n_samples >= private$.min_samples)
    },

    # Expected clients per round / eligible nodes: the sampling rate of the
    # accountant (each eligible node's chance to take part in a round).
    .sampling_rate = function() {
      if (private$.selection$kind == "poisson") return(private$.selection$settings$q)
      min(1, self$clients_per_round / max(1, private$.eligible()))
    },

    # A deep clone gets its own nodes, so later per-node state cannot leak
    # between the copies.
    deep_clone = function(name, value) {
      if (name == ".nodes") return(lapply(value, function(n) n$clone(deep = TRUE)))
      # Not the original: the copy's nodes are its own (see .rehome()).
      if (name == ".home") return(NULL)
      # A copy does not serve: the coordinator belongs to the original.
      if (name == ".net") return(NULL)
      # Nor does it feed the original's dashboard.
      if (name == ".dashboard") return(NULL)
      if (name == ".grid" && !is.null(private$.net)) return(NULL)
      value
    },

    .run_round = function(r, last_round) {
      if (private$.busy) abort_reentrant()
      private$.rehome()
      private$.busy <- TRUE
      on.exit(private$.busy <- FALSE, add = TRUE)
      # Every fedagg error raised during a round names the round.
      tryCatch(private$.round_body(r, last_round), fedagg_error = function(e) {
        if (is.null(e$round)) e$round <- r
        stop(e)
      })
    },

    # A copy made by `$clone()` still has the original's key, and a shallow
    # copy shares its nodes: both would read and write the same per-node
    # state. The copy takes a key of its own and the state as of its own
    # last round; if the original has since moved a node's state on, the
    # copy cannot continue exactly, and says so.
    .rehome = function() {
      if (identical(private$.home, self)) return(invisible())
      # A deep copy (its nodes are its own) or a server saved before servers
      # knew their home: nothing is shared with a live server.
      if (is.null(private$.home)) {
        private$.home <- self
        return(invisible())
      }
      old <- private$.key
      new <- new_server_key()
      moved <- character()
      states <- list()
      for (id in names(private$.nodes)) {
        st <- private$.nodes[[id]]$state_for(old)
        if (!length(st)) next
        # A state that does not say its round cannot be shown to be this
        # copy's: refused as moved.
        if (is.null(st$round) || st$round > private$.state$round) moved <- c(moved, id)
        st$server <- new
        states[[id]] <- st
      }
      if (length(moved)) {
        fedagg_abort(c("This server is a copy made by {.code $clone()} after round {private$.state$round}, and the server it was copied from has trained {length(moved)} of their shared node{?s} since.",
                       x = "Their state (SCAFFOLD controls, error-feedback residuals, a custom algorithm's state) is no longer that of round {private$.state$round}.",
                       i = "Use {.code $clone(deep = TRUE)} to branch a run: the copy then has nodes of its own."),
                     class = "clone")
      }
      for (id in names(states)) private$.nodes[[id]]$commit_state(states[[id]], latest = FALSE)
      private$.key <- new
      private$.home <- self
      invisible()
    },

    .round_body = function(r, last_round) round_body(self, private, r, last_round),

    .select_round = function(r) select_round(self, private, r),

    .local_work = function(index, r) local_work(private, index, r),

    .local_losses = function(chosen, r) local_losses(private, chosen, r),

    .last_cosines = function() last_cosines(private),

    .metric_slots = function(metrics) {
      m <- metric_name(private$.model)
      slots <- c("test_loss", paste0("test_", m), "val_loss", paste0("val_", m))
      out <- stats::setNames(rep(list(NA_real_), length(slots)), slots)
      out[names(metrics)] <- metrics
      out
    },

    .train_selected = function(idx, config, epochs, round, max_steps = NULL) {
      train_selected(private, idx, config, epochs, round, max_steps)
    },

    .evaluate_all = function(flat, round = NULL) evaluate_all(private, flat, round),

    .evaluate_test = function(flat, round = NULL) evaluate_test(private, flat, round),

    .evaluate_clients = function(flat, round = NULL) evaluate_clients(private, flat, round)
  )
)

# The committed state of a server: everything a round changes, replaced in
# one assignment when a round commits, so a failed round changes nothing.
#   flat           the global parameters (one vector)
#   round          rounds committed
#   records, client_log, selection_log, system_log, drift_log
#                  one entry per round (history rows, logs)
#   server_state   the server optimizer's moments (m, v) or a custom state
#   control        SCAFFOLD's server control c
#   last_delta     the last aggregate D (contribution scores)
#   dp_clip        the adaptive clipping bound; q_log: each round's sampling
#                  rate (the accountant)
#   reach          per node, rounds it was reachable; chains: Markov
#                  availability; seen_versions: node data versions the drift
#                  monitor has seen
#   sim_time, async_state
#                  the simulated clock and FedBuff's clients in flight
#   node_rounds    per node, the last round whose state of it was committed
new_server_state <- function() {
  list(flat = NULL, round = 0L, records = list(), client_log = list(), selection_log = list(), system_log = list(),
       drift_log = list(), server_state = list(), control = NULL, last_delta = NULL, dp_clip = NULL,
       q_log = numeric(), reach = NULL, chains = NULL, seen_versions = list(), sim_time = 0, async_state = NULL,
       node_rounds = NULL)
}

abort_reentrant <- function(call = rlang::caller_env()) {
  fedagg_abort(c("A round is already running on this server.",
                 i = "Hooks and selection functions must not call {.code $round()}, {.code $fit()} or set {.field params}."),
               class = "reentrant", call = call)
}

# The learning rate of a round, checked: a schedule never makes a round
# train with a rate that is zero, negative, non-finite or above the base rate.
scheduled_lr <- function(schedule, base, round, last_round, call = rlang::caller_env()) {
  lr <- schedule(base, round, last_round)
  if (!is.numeric(lr) || length(lr) != 1L || !is.finite(lr) || lr <= 0) {
    fedagg_abort(c("The learning-rate schedule gave lr = {format(lr)} for round {round}.",
                   i = "A round needs a positive learning rate; use a slower decay or fewer rounds."),
                 class = "input", round = round, call = call)
  }
  if (lr > base * (1 + 1e-12)) {
    fedagg_abort("The learning-rate schedule raised lr above the base rate {base} in round {round} (to {lr}).",
                 class = "input", round = round, call = call)
  }
  lr
}

epochs_label <- function(epochs) {
  if (length(unique(epochs)) == 1L) format(epochs[1]) else sprintf("%d-%d (per node)", min(epochs), max(epochs))
}

progress_status <- function(record) {
  out <- sprintf("loss %.4f", record$train_loss)
  metric <- main_metric(record)
  if (metric != "train_loss") out <- paste0(out, sprintf(" | %s %.4f", sub("_", " ", metric), record[[metric]]))
  out
}

nan_to_na <- function(x) {
  x[is.nan(x)] <- NA_real_
  x
}
