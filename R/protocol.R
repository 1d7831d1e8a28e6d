# The round's messages between a server and its nodes (the wire format and
# the fields are defined once, in src/rust/core/src/protocol.rs):
#
#   FitIns   server -> node: global parameters, round, the settings of the
#            client algorithm and local optimizer, the node's random streams,
#            its encoding (local DP, attack, compression), and the round the
#            server last committed
#   FitRes   node -> server: the update as sent, samples, steps, losses, and
#            the node's new state (SCAFFOLD control, residual)
#   EvalIns / EvalRes, NodeInfo: defined in Rust; not used by R yet
#
# A server with a `grid` sends its clients' work as FitIns messages and folds
# the FitRes it gets back, exactly as the simulated round would; the grid
# decides where each node's half runs (this process, callr sessions, and
# later the network). Messages are raw vectors.

# One FitIns per client of a round, named by node id. `streams`: each
# client's random stream, for its training and its encoding (its node's
# number; FedBuff: its dispatch).
# Each carries the round whose state of its node the server committed last,
# so a node keeps a pending state only if it was committed.
fit_instructions <- function(private, ids, streams, epochs, max_steps, round_cfg, round, validation) {
  whole_messages(fit_batch(private, ids, streams, epochs, max_steps, round_cfg, round, validation))
}

# The same as a batch: list(headers = <each client's frame and header, named
# by node id>, payload = <the vectors they share>). A networked grid sends
# each header followed by the one payload, so the model is held once.
fit_batch <- function(private, ids, streams, epochs, max_steps, round_cfg, round, validation) {
  model <- private$.model
  max_steps <- if (is.null(max_steps)) rep(NA_real_, length(ids)) else as.double(max_steps)
  node_rounds <- private$.state$node_rounds[ids] %||% rep(0, length(ids))
  node_rounds[is.na(node_rounds)] <- 0
  out <- core_call(rs_fit_instructions(model_arch(model), model$head %||% 0L, model_bits(model), private$.state$flat, round_cfg,
                                       as.character(ids), as.double(streams),
                                       rep_len(as.double(epochs), length(ids)), max_steps, as.double(node_rounds),
                                       isTRUE(validation), as.double(round), as.double(private$.state$round),
                                       custom_model_name(model)))
  names(out$headers) <- ids
  out
}

# A batch's messages, each whole (its header followed by the payload).
whole_messages <- function(batch) lapply(batch$headers, function(h) c(h, batch$payload))

# What a message names a custom model by (NULL: a built-in model, which
# the message describes in full).
custom_model_name <- function(model) if (!is_builtin(model)) model$name

# A node's half of a round, from a FitIns message: its own data and its own
# state (list(control =, residual =)). Returns the FitRes message.
client_fit <- function(ins, train, validation = NULL, state = list(), client = NULL, round = NULL) {
  client_fit_state(ins, train, validation, state, client, round)$res
}

# client_fit() with the state the node keeps if the round commits:
# list(res = <FitRes>, control =, residual =).
client_fit_state <- function(ins, train, validation = NULL, state = list(), client = NULL, round = NULL) {
  out <- call_rust(rs_client_fit(ins, list(train), list(validation), state$control, state$residual))
  if (!isTRUE(out$ok)) abort_client_failure(client %||% "?", out$message, round, kind = out$kind)
  out
}

# A custom model's half of a round on its node, from a FitIns: the node
# trains in R with its own copy of the model (the message names the model
# and carries numbers only: no code travels, and none is ever unserialized
# from the server), then encodes its update in Rust as the task asks. The
# same computation as the simulation's custom round (custom_round(), then
# encode_updates() for that client), number for number. `node` is the Node
# holding the data; `template` the layout of the model's parameters.
# Returns list(res = <FitRes>, control =, residual =, train_loss =).
client_fit_custom <- function(ins, node, model, template, state = list(), round = NULL) {
  asked <- call_rust(rs_fit_ins_read(ins, TRUE))
  id <- node$id
  round <- round %||% asked$round
  d <- length(unlist(template, use.names = FALSE))
  if (!identical(asked$model$custom, model$name) || asked$model$n_params != d) {
    what <- if (nzchar(asked$model$custom)) sprintf("the custom model \"%s\" of %d parameters", asked$model$custom, asked$model$n_params)
            else "a built-in model"
    fedagg_abort(c("Node {.val {id}} was asked to train {what}; it holds the custom model {.val {model$name}} of {d} parameters.",
                   i = "Give the node the server's model (the same {.fn model_custom} code and {.arg name})."),
                 class = "protocol", client = id, round = round)
  }
  # The node's Node trains exactly as in the simulation, reading its SCAFFOLD
  # control from the state this runtime keeps (under a key of its own).
  key <- ".fed_join"
  node$commit_state(list(control = state$control, server = key), latest = FALSE)
  config <- fit_ins_train_config(asked, model, key)
  out <- node$train(unflatten_params(model, asked$params, template), config, return = "delta", epochs = asked$epochs)
  delta <- unlist(out$delta, use.names = FALSE)
  val <- if (asked$validation && node$has_validation) {
    node$evaluate(unflatten_params(model, asked$params + delta, template), model)
  }
  enc <- call_rust(rs_client_encode(ins, delta, state$residual))
  if (!isTRUE(enc$ok)) abort_client_failure(id, enc$message, round, kind = enc$kind)
  fednova <- asked$local$algorithm == "fednova" && asked$local$work == "sgd"
  report <- list(n_samples = as.double(out$n_samples), train_loss = as.double(out$train_loss), steps = as.double(out$steps),
                 effective_steps = as.double(if (fednova) fednova_a(out$steps, asked$local$momentum) else out$steps),
                 weight = 1, val_loss = if (is.null(val)) NaN else val$loss,
                 val_metric = if (is.null(val)) NaN else val[[metric_name(model)]])
  control <- if (config$algorithm$kind == "scaffold") out$state$control
  list(res = call_rust(rs_fit_res_make(ins, report, enc$update, control, enc$residual)), control = control,
       residual = enc$residual, train_loss = report$train_loss)
}

# The train_config() a FitIns describes, for a node that trains in R.
fit_ins_train_config <- function(asked, model, key) {
  l <- asked$local
  structure(list(model = model, server_key = key, epochs = asked$epochs, stream = asked$stream, seed = l$seed, lr = l$lr,
                 batch_size = if (l$batch_size == 0) Inf else l$batch_size, shuffle = l$shuffle,
                 optimizer = list(kind = l$optimizer, momentum = l$momentum, beta1 = l$beta1, beta2 = l$beta2, eps = l$eps,
                                  alpha = l$alpha, weight_decay = l$weight_decay),
                 algorithm = list(kind = if (l$work == "gradient") "fedsgd" else sub("_step$", "", l$algorithm),
                                  settings = list(mu = l$mu, correction = if (identical(l$algorithm, "scaffold_step")) "step")),
                 control = asked$server_control),
            class = "fed_train_config")
}

# A node's answer to an EvalIns for a custom model: evaluated in R by the
# node's Node, as the simulation evaluates it.
client_evaluate_custom <- function(asked, node, model, template) {
  ev <- node$evaluate(unflatten_params(model, asked$params, template), model, data = asked$split)
  call_rust(rs_eval_res_make(asked$round, asked$node, as.double(ev$n), as.double(ev$loss),
                             as.double(ev[[metric_name(model)]])))
}

# A FitRes message read and checked (`res` raw, or already read by the
# coordinator, which checked it as it arrived).
read_fit_result <- function(res, node, round) {
  if (is.list(res) && identical(res$kind, "FitRes")) return(check_fit_origin(res, node, round))
  if (!is.raw(res)) {
    fedagg_abort("Node {.val {node}} answered round {round} with {obj_desc(res)}, not a FitRes message.",
                 class = "client", client = node, round = round)
  }
  out <- tryCatch(call_rust(rs_fit_res_read(res)), fedagg_error = function(e) {
    fedagg_abort("Node {.val {node}} sent a malformed FitRes in round {round}.", class = "client", client = node,
                 round = round, parent = e)
  })
  check_fit_origin(out, node, round)
}

check_fit_origin <- function(out, node, round) {
  if (!identical(out$node, node) || out$round != round) {
    fedagg_abort("A FitRes from node {.val {out$node}} for round {out$round} came where node {.val {node}}'s for round {round} was due.",
                 class = "client", client = node, round = round)
  }
  out
}

# The FitRes messages of a round (in the order of the FitIns), in the shape
# of the Rust round's collected output (what train_selected() folds).
collect_fit_results <- function(results, ids, round) {
  res <- Map(read_fit_result, results, ids, MoreArgs = list(round = round))
  field <- function(name) vapply(res, function(r) as.double(r[[name]]), numeric(1), USE.NAMES = FALSE)
  controls <- lapply(res, `[[`, "control")
  residuals <- lapply(res, `[[`, "residual")
  list(ok = TRUE, n_samples = field("n_samples"), train_loss = field("train_loss"), steps = field("steps"),
       val_loss = field("val_loss"), val_metric = field("val_metric"), weight = field("weight"),
       a = field("effective_steps"), collected = unname(lapply(res, `[[`, "update")),
       client_controls = if (any(!vapply(controls, is.null, logical(1)))) unname(controls),
       residuals = if (any(!vapply(residuals, is.null, logical(1)))) unname(residuals))
}

# The work of a round's clients through a grid: FitIns out, FitRes back.
# A grid is function(messages, nodes, model, states, round) returning the
# FitRes messages in the order of `messages` (a list of FitIns named by node
# id: a node may appear twice, as in FedBuff); `nodes` the Node objects in
# the same order, `states` what the server knows of their state
# (list(control, residual) each; a grid whose nodes keep their own ignores
# it).
grid_fit <- function(private, nodes, states, streams, epochs, max_steps, round_cfg, round, validation) {
  ids <- names(nodes)
  batch <- fit_batch(private, ids, streams, epochs, max_steps, round_cfg, round, validation)
  # A grid that says it takes batches (the network's) gets the headers and
  # the shared payload; any other gets whole messages.
  messages <- if (isTRUE(attr(private$.grid, "batched"))) batch else whole_messages(batch)
  results <- call_user(private$.grid, list(messages = messages, nodes = unname(nodes), model = private$.model,
                                           states = unname(states), round = round),
                       "The round's grid", round = round)
  if (!is.list(results) || length(results) != length(ids)) {
    fedagg_abort("The round's grid must return a list of {length(ids)} FitRes message{?s}, one per FitIns in order, not {obj_desc(results)}.",
                 class = "user_code", round = round)
  }
  # NULL: a node that did not answer (a dropout of a networked round).
  reported <- !vapply(results, is.null, logical(1), USE.NAMES = FALSE)
  if (!any(reported)) {
    fedagg_abort(c("Round {round}: none of the {length(ids)} selected node{?s} answered in time.",
                   i = "Dropped: {paste(ids, collapse = ', ')}."), class = "cohort", round = round)
  }
  out <- collect_fit_results(unname(results[reported]), ids[reported], round)
  out$reported <- reported
  out
}

# The grid that runs every node's half in this process, from the messages,
# with the nodes' data and the state the server gives: the message path of
# a round without leaving R, which must equal the simulated round.
grid_in_process <- function() {
  function(messages, nodes, model, states, round) {
    template <- if (!is_builtin(model)) init_params(model)
    lapply(seq_along(messages), function(i) {
      node <- nodes[[i]]
      if (!is_builtin(model)) {
        return(client_fit_custom(messages[[i]], node, model, template, states[[i]], round = round)$res)
      }
      client_fit(messages[[i]], node$data_for(model), node$data_for(model, "validation"),
                 states[[i]][c("control", "residual")], client = node$id, round = round)
    })
  }
}

# Internal until the networked federation gives it a public form: a server
# whose clients' work goes through `grid` (NULL: the simulated round).
# Refused, not ignored: what the message path does not carry yet (client
# algorithms written in R, and a hierarchy's edges).
set_grid <- function(server, grid) {
  if (!inherits(server, "Server")) fedagg_abort("{.arg server} must be a {.cls Server}, not {obj_desc(server)}.")
  if (!is.null(grid) && !is.function(grid)) fedagg_abort("{.arg grid} must be a function or NULL, not {obj_desc(grid)}.")
  private <- server$.__enclos_env__$private
  if (!is.null(grid)) {
    refuse <- function(what) fedagg_abort("Rounds through messages do not carry {what} yet.")
    if (private$.algorithm$kind == "custom") refuse("client algorithms written in R")
    if (!is_builtin(private$.model) && !is.null(private$.async)) refuse("custom models in asynchronous rounds")
    if (identical(private$.topology$kind, "hierarchical")) refuse("hierarchical topologies")
  }
  private$.grid <- grid
  invisible(server)
}

# A node's side of the protocol, for a node that keeps its own data and
# state (in another process, or later on another machine): it answers each
# FitIns from its data and its committed state. The state a round produces
# stays pending until a later FitIns says the server committed this node's
# state of that round; an attempt the server threw away (a failed round,
# or a retried one without this node) leaves the node as it was.
# `state` and `pending` restore what a node saved (see fed_join()); `custom`
# is list(node, model, template) for a custom model, which trains in R.
node_runtime <- function(id, train, validation = NULL, state = list(), pending = NULL, custom = NULL) {
  force(state)
  force(pending)
  force(custom)
  fit <- function(ins) {
    asked <- call_rust(rs_fit_ins_read(ins, FALSE))
    if (!identical(asked$node, id)) {
      fedagg_abort("Node {.val {id}} was sent the instructions of node {.val {asked$node}}.", class = "client", client = id)
    }
    # Kept only if the server committed this node's state of that very
    # round; an attempt the server threw away is dropped.
    if (!is.null(pending) && pending$round == asked$node_round) state <<- pending$state
    pending <<- NULL
    # A custom model trains in R with the node's own copy of the model.
    out <- if (is.null(custom)) client_fit_state(ins, train, validation, state, client = id, round = asked$round)
           else client_fit_custom(ins, custom$node, custom$model, custom$template, state, round = asked$round)
    pending <<- list(round = asked$round,
                     state = list(control = out$control %||% state$control, residual = out$residual %||% state$residual))
    loss <<- out$train_loss
    out$res
  }
  loss <- NA_real_
  list(fit = fit, state = function() state, pending = function() pending, loss = function() loss)
}
