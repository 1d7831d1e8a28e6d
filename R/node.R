#' A federated client holding its own data
#'
#' @description
#' A `Node` keeps its training data and optional held-out (validation) data
#' private: other objects only see what [Node]`$train()` and `$evaluate()`
#' return. For built-in models the Rust core reads the node's feature matrix
#' where R keeps it (no second copy), gathering each minibatch's rows as it
#' trains, so a node saved with `saveRDS()` or sent to another R process
#' needs nothing rebuilt.
#'
#' Use [fed_node()] to create one and [fed_nodes()] to create many from a
#' partition or a simulated data set.
#'
#' @details
#' A node's `train()` needs only what a server sends (the parameters and a
#' [train_config()]) and returns only what it would send back, so a node can
#' later live in another process. Labels stay as given (factor, character,
#' logical or codes); a [Server] tells every node the federation's classes
#' through its model, so one class has one code everywhere.
#'
#' @examples
#' m <- model_logistic(2)
#' x <- matrix(rnorm(40), 20)
#' node <- fed_node(x, y = as.integer(x[, 1] > 0), id = "site-A")
#' node
#' out <- node$train(init_params(m), train_config(m, epochs = 2, lr = 0.5))
#' out$train_loss
#' node$evaluate(out$params, m, data = "train")
#' @export
Node <- R6::R6Class("Node",
  cloneable = TRUE,
  public = list(
    #' @description Create a node (see [fed_node()] for the arguments).
    #' @param x,y,id,x_val,y_val,availability See [fed_node()].
    initialize = function(x, y, id, x_val = NULL, y_val = NULL, availability = 1) {
      if (!is.character(id) || length(id) != 1L || is.na(id) || !nzchar(id)) {
        fedagg_abort("{.arg id} must be a single non-empty string, not {obj_desc(id)}.")
      }
      private$.id <- id
      private$.availability <- assert_availability(availability)
      private$.x <- as_feature_matrix(x, "x", client = id)
      private$.y <- check_raw_labels(y, nrow(private$.x), "y", "x", id)
      if (!is.null(x_val) || !is.null(y_val)) {
        if (is.null(x_val) || is.null(y_val)) {
          abort_data("{.arg x_val} and {.arg y_val} must be given together.", id)
        }
        private$.x_val <- as_feature_matrix(x_val, "x_val", client = id)
        if (ncol(private$.x_val) != ncol(private$.x)) {
          abort_data("{.arg x_val} has {ncol(private$.x_val)} columns, {.arg x} has {ncol(private$.x)}.", id)
        }
        private$.y_val <- check_raw_labels(y_val, nrow(private$.x_val), "y_val", "x_val", id)
      }
      invisible(self)
    },

    #' @description Local training from the given parameters: what a
    #'   client does in a round, from what the server sends (the parameters
    #'   and a [train_config()], whose `control` carries SCAFFOLD's server
    #'   variate) to what it sends back. The node's own state (SCAFFOLD's
    #'   `c_i`) is read but not changed: the new state is returned, and a
    #'   server keeps it only when its round commits.
    #' @param params Global parameters (named list of layers).
    #' @param config A [train_config()].
    #' @param return `"params"` (the new parameters) or `"delta"` (new minus
    #'   given).
    #' @param epochs Local epochs for this run (default: `config$epochs`).
    #' @return A list: `params` or `delta`, `n_samples`, `train_loss`,
    #'   `steps` (local steps taken) and `state` (the node's new state).
    train = function(params, config, return = c("params", "delta"), epochs = config$epochs) {
      return <- assert_choice(return, c("params", "delta"))
      assert_train_config(config)
      epochs <- assert_count(epochs, min = 1L)
      model <- config$model
      private$.check_width(model)
      flat <- flatten_params(model, params)
      # A server's round reads only the state it left on this node.
      own <- self$state_for(config$server_key)
      c_i <- own$control
      result <- if (is_builtin(model)) {
        round_cfg <- list(control = config$control, client_controls = list(c_i))
        out <- call_rust(rs_train_round(model_arch(model), model$head, model_bits(model), flat, list(self$data_for(model)),
                                        list(NULL), as.double(config$stream %||% 1),
                                        rust_config(config, "collect", epochs, round_cfg), 1L))
        if (!isTRUE(out$ok)) abort_client_failure(private$.id, out$message, kind = out$kind)
        list(vector = flat + out$collected[[1]], n_samples = out$n_samples, train_loss = out$train_loss,
             steps = out$steps, control = out$client_controls[[1]])
      } else {
        tryCatch(custom_local_train(model, params, private$.x, node_labels(private, model, "train"), config, epochs, c_i),
                 fedagg_local_failure = function(e) {
                   abort_client_failure(private$.id, e$message, kind = e$kind, parent = e$parent)
                 })
      }
      new <- unflatten_params(model, result$vector, params)
      value <- if (return == "params") new else unflatten_params(model, result$vector - flat, params)
      state <- own
      if (config$algorithm$kind == "scaffold") state$control <- result$control
      stats::setNames(list(value, result$n_samples, result$train_loss, result$steps, state),
                      c(return, "n_samples", "train_loss", "steps", "state"))
    },

    #' @description Replace the node's training data between rounds (a
    #'   node whose data change over time). The features must keep their
    #'   number of columns; the previous features are kept for
    #'   [monitor_drift()], and `data_version` counts the changes.
    #' @param x,y The new training data (as in [fed_node()]).
    set_data = function(x, y) {
      x <- as_feature_matrix(x, "x", client = private$.id)
      if (ncol(x) != ncol(private$.x)) {
        abort_data("{.arg x} has {ncol(x)} column{?s}; the node's data have {ncol(private$.x)}.", private$.id)
      }
      y <- check_raw_labels(y, nrow(x), "y", "x", private$.id)
      private$.x_previous <- private$.x
      private$.x <- x
      private$.y <- y
      private$.data_version <- private$.data_version + 1L
      private$.coded <- list()
      note_node_change()
      invisible(self)
    },

    #' @description Drift of this node's features across its last
    #'   `set_data()`: the node runs the tests ([ks_drift()]) and only their
    #'   results leave it, as they would from another process.
    #' @param alpha,adjust,threads See [ks_drift()].
    #' @return A `fedagg_drift` data frame, or `NULL` when the data never
    #'   changed.
    data_drift = function(alpha = 0.05, adjust = "none", threads = NULL) {
      if (is.null(private$.x_previous)) return(NULL)
      ks_drift(private$.x_previous, private$.x, alpha = alpha, adjust = adjust, threads = threads)
    },

    #' @description Internal: keep the state a committed round produced
    #'   (called by a [Server]). A node keeps one state per server that
    #'   trained it (named by the server's key in `state$server`), so servers
    #'   sharing nodes neither read nor erase each other's state.
    #' @param state A named list (SCAFFOLD's `control`, the node's
    #'   `last_update`, a custom algorithm's state).
    #' @param latest Whether this server becomes the one `$state` shows
    #'   (`FALSE` when a copied server takes over state it did not train).
    commit_state = function(state, latest = TRUE) {
      if (!is.list(state)) fedagg_abort("{.arg state} must be a list, not {obj_desc(state)}.")
      key <- state$server %||% ""
      private$.states[[key]] <- state
      if (isTRUE(latest)) private$.last_server <- key
      invisible(self)
    },

    #' @description Internal: the state a server left on this node (an
    #'   empty list if it left none).
    #' @param key The server's key.
    state_for = function(key) {
      private$.states[[key %||% private$.last_server]] %||% list()
    },

    #' @description Loss and accuracy (classification) or RMSE (regression)
    #'   of the given parameters on this node's data.
    #' @param params Parameters (named list of layers).
    #' @param model The [model][models] they belong to.
    #' @param data `"validation"` (held-out data) or `"train"`.
    #' @return A one-row data frame: `client`, `n`, `loss`, and `accuracy`
    #'   or `rmse`.
    evaluate = function(params, model, data = c("validation", "train")) {
      data <- assert_choice(data, c("validation", "train"))
      private$.check_width(model)
      if (data == "validation" && !self$has_validation) {
        abort_data("has no validation data; create it with {.arg x_val} and {.arg y_val}.", private$.id)
      }
      ev <- if (is_builtin(model)) {
        out <- call_rust(rs_evaluate(model_arch(model), model$head, model_bits(model), flatten_params(model, params),
                                     list(self$data_for(model, data)), 1L))
        if (!isTRUE(out$ok)) abort_client_failure(private$.id, out$message, kind = out$kind)
        out
      } else {
        x <- if (data == "train") private$.x else private$.x_val
        evaluate_custom(model, params, x, node_labels(private, model, data), client = private$.id)
      }
      metric_frame(private$.id, ev$n, ev$loss, ev$metric, model)
    },

    #' @description Check that this node's data fit a model (width, labels);
    #'   raises a classed error naming the node if not.
    #' @param model A [model][models].
    check_model = function(model) {
      private$.check_width(model)
      node_labels(private, model, "train")
      if (self$has_validation) node_labels(private, model, "validation")
      invisible(self)
    },

    #' @description Internal: this node's data as the Rust core borrows
    #'   them for a built-in model, `list(x, y)`: the feature matrix itself
    #'   and the labels coded for the model (coded once per model, then kept).
    #' @param model A built-in [model][models].
    #' @param split `"train"` or `"validation"`.
    data_for = function(model, split = "train") node_data_for(private, model, split),

    #' @description A one-line description.
    #' @param ... Unused.
    format = function(...) {
      val <- if (self$has_validation) sprintf(", %d held out", nrow(private$.x_val)) else ""
      sprintf("<Node> %s: %d samples x %d features%s", private$.id, nrow(private$.x), ncol(private$.x), val)
    },

    #' @description Print the node.
    #' @param ... Unused.
    print = function(...) {
      cat(self$format(), "\n", sep = "")
      invisible(self)
    }
  ),
  active = list(
    #' @field id The node's identifier (read-only).
    id = function(value) {
      if (!missing(value)) fedagg_abort("{.field id} is read-only.")
      private$.id
    },
    #' @field n_samples Number of training samples (read-only).
    n_samples = function(value) {
      if (!missing(value)) fedagg_abort("{.field n_samples} is read-only.")
      nrow(private$.x)
    },
    #' @field n_features Number of features (read-only).
    n_features = function(value) {
      if (!missing(value)) fedagg_abort("{.field n_features} is read-only.")
      ncol(private$.x)
    },
    #' @field availability Probability that the node is reachable in a
    #'   round, in (0, 1], or an [availability_markov()] chain (validated
    #'   when set).
    availability = function(value) {
      if (missing(value)) return(private$.availability)
      private$.availability <- assert_availability(value)
      note_node_change()
    },
    #' @field system `NULL`, or the node's device and network profile: a
    #'   list of `speed`, `download`, `upload`, `latency` and `dropout`
    #'   (validated when set; see [set_system()]).
    system = function(value) {
      if (missing(value)) return(private$.system)
      private$.system <- assert_node_system(value, private$.id)
      note_node_change()
    },
    #' @field attack `NULL`, or the [attack][attacks] this node simulates
    #'   (validated when set; see [set_attack()]).
    attack = function(value) {
      if (missing(value)) return(private$.attack)
      if (!is.null(value) && !inherits(value, "fed_attack")) {
        fedagg_abort("{.field attack} must be an attack such as {.fn attack_sign_flip}, or NULL, not {obj_desc(value)}.")
      }
      private$.attack <- value
      # Training labels may change with the attack: code them again.
      private$.coded <- list()
      note_node_change()
    },
    #' @field state What the node keeps between rounds for the server that
    #'   trained it last (read-only): a list with SCAFFOLD's `control`
    #'   variate, its `last_update`, an error-feedback `residual`, or a custom
    #'   client algorithm's state (each server's own: see `state_for()`).
    state = function(value) {
      if (!missing(value)) fedagg_abort("{.field state} is read-only; a server sets it when a round commits.")
      self$state_for(NULL)
    },
    #' @field data_version How many times `set_data()` replaced the data
    #'   (read-only).
    data_version = function(value) {
      if (!missing(value)) fedagg_abort("{.field data_version} is read-only.")
      private$.data_version
    },

    #' @field has_validation Whether the node holds validation data.
    has_validation = function(value) {
      if (!missing(value)) fedagg_abort("{.field has_validation} is read-only.")
      !is.null(private$.x_val)
    },
    #' @field label_counts Table of training labels: a summary that leaves
    #'   the node, as a real client would report it.
    label_counts = function(value) {
      if (!missing(value)) fedagg_abort("{.field label_counts} is read-only.")
      table(private$.y)
    },
    #' @field label_levels The names of this node's classes, if its labels
    #'   are a factor (`kind = "factor"`, its levels) or character (`kind =
    #'   "character"`, the sorted distinct values); `NULL` for numeric or
    #'   logical labels. A server codes the whole federation from these.
    label_levels = function(value) {
      if (!missing(value)) fedagg_abort("{.field label_levels} is read-only.")
      label_levels(private$.y, private$.y_val)
    }
  ),
  private = list(
    .id = NULL,
    .x = NULL,
    .y = NULL,
    .x_val = NULL,
    .y_val = NULL,
    .availability = 1,
    .attack = NULL,
    .x_previous = NULL,
    .data_version = 0L,
    .states = list(),
    .last_server = "",
    .coded = list(),
    .system = NULL,

    .check_width = function(model, call = rlang::caller_env()) {
      assert_model(model, call = call)
      if (ncol(private$.x) != model$n_features) {
        abort_data("{.arg x} has {ncol(private$.x)} column{?s}, the model expects {model$n_features}.",
                   private$.id, call)
      }
    }
  )
)

# Labels are checked here only for presence and length; coding against a
# model happens when a model is known.
check_raw_labels <- function(y, n, arg, x_arg, client) {
  if (is.null(y) || !is.atomic(y) || is.matrix(y)) {
    abort_data("{.arg {arg}} must be a vector or factor, not {obj_desc(y)}.", client)
  }
  if (length(y) != n) {
    abort_data("{.arg {arg}} has {length(y)} value{?s} for {n} row{?s} of {.arg {x_arg}}.", client)
  }
  if (anyNA(y)) abort_data("{.arg {arg}} has {sum(is.na(y))} missing value{?s}.", client)
  if (!is.numeric(y) && !is.logical(y) && !is.character(y) && !is.factor(y)) {
    abort_data("{.arg {arg}} must be numeric, logical, character or a factor, not {obj_desc(y)}.", client)
  }
  # Integer class codes are kept as doubles: the labels the Rust core reads
  # are then these very values, not a coded copy.
  if (is.integer(y) && !is.factor(y)) y <- as.double(y)
  y
}

label_levels <- function(...) {
  ys <- Filter(Negate(is.null), list(...))
  if (any(vapply(ys, is.factor, logical(1)))) {
    levels <- unique(unlist(lapply(ys, function(y) if (is.factor(y)) levels(y) else sort(unique(as.character(y))))))
    return(list(kind = "factor", levels = levels))
  }
  if (any(vapply(ys, is.character, logical(1)))) {
    return(list(kind = "character", levels = sort(unique(unlist(lapply(ys, as.character))))))
  }
  NULL
}

# A node's data for a model, coded once and cached on the node: a function
# of the package, called with the node's private environment, rather than a
# method. Every R6 object has its own copy of each method, which R compiles
# the first time it runs: tens of microseconds a node, the larger part of a
# round's R time when most of its clients train for the first time.
node_data_for <- function(private, model, split = "train") {
  train <- identical(split, "train")
  if (!train && !identical(split, "validation")) {
    fedagg_abort("{.arg split} must be \"train\" or \"validation\", not {obj_desc(split)}.")
  }
  if (!train && is.null(private$.x_val)) return(NULL)
  cached <- private$.coded[[split]]
  bits <- model_bits(model)
  if (is.null(cached) || !identical(cached$task, model$task) || !identical(cached$n_classes, model$n_classes) ||
      !identical(cached$classes, model$classes) || !identical(cached$bits, bits)) {
    x <- if (train) private$.x else private$.x_val
    if (bits == 32L && max(abs(x)) > 3.4e38) {
      abort_data("{.arg {if (train) 'x' else 'x_val'}} has values beyond float32's range; use {.code precision = \"float64\"}.",
                 private$.id)
    }
    cached <- list(task = model$task, n_classes = model$n_classes, classes = model$classes, bits = bits,
                   y = as.double(node_labels(private, model, if (train) "train" else "validation")))
    private$.coded[[split]] <- cached
  }
  list(if (train) private$.x else private$.x_val, cached$y)
}

# The labels of a split coded for a model (0-based classes or responses).
node_labels <- function(private, model, split) {
  if (split == "train") encode_labels(flip_labels(private$.y, private$.attack, private$.id), model, "y", private$.id)
  else encode_labels(private$.y_val, model, "y_val", private$.id)
}

abort_client_failure <- function(client, message, round = NULL, kind = NULL, parent = NULL,
                                 call = rlang::caller_env()) {
  where <- if (is.null(round)) "" else sprintf(" in round %d", round)
  kind <- kind %||% "client"
  class <- if (kind == "client") "client" else c(kind, "client")
  fedagg_abort("Client {.val {client}} failed{where}.", foreign = c(x = message),
               class = class, client = client, round = round, parent = parent, call = call)
}

metric_frame <- function(client, n, loss, metric, model) {
  out <- data.frame(client = client, n = n, loss = loss, metric = metric, stringsAsFactors = FALSE)
  names(out)[4] <- metric_name(model)
  out
}

metric_name <- function(model) if (model$task == "classification") "accuracy" else "rmse"

# Loss and metric of a custom R model on one data set (labels already coded);
# built-in models are evaluated in Rust, on the node's matrix.
evaluate_custom <- function(model, params, x, y, client = NULL, round = NULL, call = rlang::caller_env()) {
  out <- call_user(model$loss_grad, list(params, x, y), "The custom model's {.fn loss_grad}", round = round,
                   client = client, call = call)
  loss <- if (is.list(out)) out$loss
  if (!is.numeric(loss) || length(loss) != 1L || !is.finite(loss)) {
    fedagg_abort("The custom model's {.fn loss_grad} must return a finite {.field loss}, not {obj_desc(loss)}.",
                 class = "user_code", round = round, client = client, call = call)
  }
  pred <- custom_predict(model, params, x, client = client, round = round, call = call)
  metric <- if (model$task == "classification") mean(scores_to_class(pred) == y)
            else sqrt(mean((as.vector(pred) - y)^2))
  list(n = nrow(x), loss = loss, metric = metric)
}
