#' Models for federated training
#'
#' Built-in models are trained in Rust: linear regression (squared error),
#' logistic regression (binary cross-entropy), multinomial (softmax)
#' regression (cross-entropy) and a multilayer perceptron with ReLU hidden
#' layers. Their parameters are a named list of layers, `W1` (an `inputs x
#' outputs` matrix), `b1`, `W2`, `b2`, ..., exactly what [init_params()]
#' returns and what [Server] keeps as its global model.
#'
#' `model_custom()` wraps a model written in plain R: it is trained by the
#' same minibatch SGD, in R, through the same [Node] and [Server] API (in
#' parallel through `future.apply` when a `future::plan()` is set).
#'
#' Labels: a factor, a logical (logistic regression), or whole numbers
#' `0, ..., n_classes - 1`. Custom models receive them as those 0-based codes.
#'
#' @param n_features Number of input columns.
#' @param n_classes Number of classes (softmax output).
#' @param hidden Sizes of the hidden layers of an MLP.
#' @param output Output head of an MLP: `"softmax"` (classification),
#'   `"logistic"` (binary) or `"linear"` (regression).
#' @param init Initial parameters: `"zeros"` (the default for the convex
#'   models) or `"glorot"` (Glorot-uniform weights, He-scaled before ReLU;
#'   the default, and needed, for an MLP).
#' @param classes Optional class labels, in the order of the model's outputs
#'   (for logistic regression: the negative class, then the positive one).
#'   When `NULL`, a [Server] takes them from its nodes' labels: the union of
#'   their factor levels, or the sorted union of their character labels, so
#'   that one class has one code on every node. Numeric labels are class
#'   codes `0, ..., n_classes - 1` and need no `classes`.
#' @return A `fed_model` object.
#' @seealso [init_params()], [loss_grad()], [fed_server()]
#' @examples
#' m <- model_softmax(n_features = 4, n_classes = 3)
#' m
#' str(init_params(m))
#' model_mlp(n_features = 784, hidden = c(128, 64), n_classes = 10)
#' @name models
NULL

#' @rdname models
#' @export
model_linear <- function(n_features, init = c("zeros", "glorot")) {
  new_builtin_model("linear", n_features, integer(), 1L, "linear", assert_choice(init, c("zeros", "glorot")))
}

#' @rdname models
#' @export
model_logistic <- function(n_features, init = c("zeros", "glorot"), classes = NULL) {
  classes <- assert_classes(classes, 2L)
  new_builtin_model("logistic", n_features, integer(), 1L, "logistic", assert_choice(init, c("zeros", "glorot")),
                    classes)
}

#' @rdname models
#' @export
model_softmax <- function(n_features, n_classes = length(classes), init = c("zeros", "glorot"), classes = NULL) {
  n_classes <- assert_count(n_classes, min = 2L)
  classes <- assert_classes(classes, n_classes)
  new_builtin_model("softmax", n_features, integer(), n_classes, "softmax", assert_choice(init, c("zeros", "glorot")),
                    classes)
}

#' @rdname models
#' @export
model_mlp <- function(n_features, hidden = 32, n_classes = NULL,
                      output = c("softmax", "logistic", "linear"), init = c("glorot", "zeros"),
                      classes = NULL) {
  output <- assert_choice(output, c("softmax", "logistic", "linear"))
  if (!is.numeric(hidden) || length(hidden) < 1L || anyNA(hidden) || any(hidden < 1) ||
      any(hidden != round(hidden))) {
    fedagg_abort("{.arg hidden} must be one or more whole numbers >= 1, not {obj_desc(hidden)}.")
  }
  n_out <- if (output == "softmax") {
    n_classes <- n_classes %||% if (!is.null(classes)) length(classes)
    if (is.null(n_classes)) fedagg_abort("{.arg n_classes} (or {.arg classes}) is needed for a softmax output.")
    assert_count(n_classes, min = 2L)
  } else 1L
  classes <- switch(output, softmax = assert_classes(classes, n_out), logistic = assert_classes(classes, 2L),
                    linear = if (!is.null(classes)) fedagg_abort("{.arg classes} is only for classification outputs."))
  if (any(hidden > .Machine$integer.max)) fedagg_abort("{.arg hidden} sizes must be below 2^31.")
  new_builtin_model("mlp", n_features, as.integer(hidden), n_out, output, assert_choice(init, c("glorot", "zeros")),
                    classes)
}

#' @rdname models
#' @param loss_grad For `model_custom()`: `function(params, x, y)` returning
#'   `list(loss = <mean loss>, grad = <list shaped like params>)`.
#' @param predict For `model_custom()`: `function(params, x)` returning fitted
#'   values (regression), probabilities of class 1 (binary), or an `n x
#'   n_classes` matrix of class scores.
#' @param task For `model_custom()`: `"classification"` or `"regression"`.
#' @param name For `model_custom()`: a label for printing.
#' @export
#' @examples
#' # Linear regression written in R, trained by fedagg's SGD
#' lin <- model_custom(
#'   init = function(seed) list(w = c(0, 0), b = 0),
#'   loss_grad = function(params, x, y) {
#'     r <- drop(x %*% params$w) + params$b - y
#'     list(loss = mean(r^2), grad = list(w = 2 * drop(crossprod(x, r)) / length(y), b = 2 * mean(r)))
#'   },
#'   predict = function(params, x) drop(x %*% params$w) + params$b,
#'   task = "regression", n_features = 2
#' )
#' lin
model_custom <- function(init, loss_grad, predict, task = c("classification", "regression"),
                         n_features, n_classes = if (task == "classification") max(2L, length(classes)) else NULL,
                         name = "custom", classes = NULL) {
  task <- assert_choice(task, c("classification", "regression"))
  for (arg in c("init", "loss_grad", "predict")) {
    f <- get(arg)
    if (!is.function(f)) fedagg_abort("{.arg {arg}} must be a function, not {obj_desc(f)}.")
  }
  n_features <- assert_count(n_features, min = 1L)
  if (!is.character(name) || length(name) != 1L || is.na(name)) {
    fedagg_abort("{.arg name} must be a single string, not {obj_desc(name)}.")
  }
  if (task == "classification") {
    n_classes <- assert_count(n_classes, min = 2L)
    classes <- assert_classes(classes, n_classes)
  } else if (!is.null(classes)) {
    fedagg_abort("{.arg classes} is only for classification models.")
  }
  structure(list(type = "custom", name = name, task = task, n_features = n_features,
                 n_classes = n_classes, classes = classes, init = init, loss_grad = loss_grad, predict = predict),
            class = c("fed_model_custom", "fed_model"))
}

# Output heads as the Rust core numbers them.
head_codes <- c(linear = 0L, logistic = 1L, softmax = 2L)

# Largest parameter count of a built-in model: R's standard vector length, and
# 16 GB a copy; a wider network is a typo or out of reach on one machine.
max_params <- .Machine$integer.max

new_builtin_model <- function(type, n_features, hidden, n_out, output, init, classes = NULL,
                              call = rlang::caller_env()) {
  n_features <- assert_count(n_features, min = 1L, call = call)
  sizes <- c(n_features, hidden, n_out)
  size_d <- as.double(sizes)
  n_par <- sum(size_d[-length(size_d)] * size_d[-1L] + size_d[-1L])
  if (n_par > max_params) {
    fedagg_abort(c("This model would have {format(n_par, big.mark = ',')} parameters ({format_bytes(8 * n_par)} a copy).",
                   i = "At most {format(max_params, big.mark = ',')} are supported; check {.arg n_features} and {.arg hidden}."),
                 class = "memory", call = call)
  }
  n_layers <- length(sizes) - 1L
  shapes <- lapply(seq_len(n_layers), function(l) c(sizes[l], sizes[l + 1L]))
  layers <- unlist(lapply(seq_len(n_layers), function(l) {
    stats::setNames(list(shapes[[l]], shapes[[l]][2]), paste0(c("W", "b"), l))
  }), recursive = FALSE)
  if (type == "mlp" && init == "zeros") {
    fedagg_warn("An MLP initialised with zeros cannot break symmetry; use {.code init = \"glorot\"}.",
                class = "init")
  }
  structure(list(
    type = type,
    task = if (output == "linear") "regression" else "classification",
    n_features = n_features,
    n_classes = if (output == "softmax") n_out else if (output == "logistic") 2L else NULL,
    classes = classes,
    output = output,
    sizes = as.double(sizes),
    head = head_codes[[output]],
    layers = layers,
    init = init
  ), class = c(paste0("fed_model_", type), "fed_model_builtin", "fed_model"))
}

is_builtin <- function(model) inherits(model, "fed_model_builtin")

#' @export
format.fed_model <- function(x, ...) paste("<fed_model>", model_description(x))

model_description <- function(x) {
  what <- switch(x$type,
    linear = "linear regression",
    logistic = "logistic regression",
    softmax = "softmax regression",
    mlp = sprintf("MLP (%s hidden, %s output)", paste(x$sizes[-c(1, length(x$sizes))], collapse = "-"), x$output),
    custom = sprintf("custom R model '%s' (%s)", x$name, x$task)
  )
  detail <- sprintf("%d features", x$n_features)
  if (!is.null(x$n_classes)) detail <- paste0(detail, sprintf(", %d classes", x$n_classes))
  if (is_builtin(x)) detail <- paste0(detail, sprintf(", %d parameters", n_params(x)))
  sprintf("%s: %s", what, detail)
}

#' @export
print.fed_model <- function(x, ...) {
  cat(format(x), "\n", sep = "")
  invisible(x)
}

n_params <- function(model) {
  sum(vapply(model$layers, prod, numeric(1)))
}

assert_classes <- function(classes, n_classes, arg = rlang::caller_arg(classes), call = rlang::caller_env()) {
  force(arg)
  if (is.null(classes)) return(NULL)
  if (is.factor(classes)) classes <- as.character(classes)
  if (!is.character(classes) || anyNA(classes) || anyDuplicated(classes) || length(classes) != n_classes) {
    fedagg_abort("{.arg {arg}} must be {n_classes} distinct labels, not {obj_desc(classes)}.", call = call)
  }
  classes
}

format_bytes <- function(bytes) {
  units <- c("B", "KB", "MB", "GB", "TB", "PB")
  i <- max(1L, min(length(units), floor(log(max(bytes, 1), 1024)) + 1L))
  sprintf("%.3g %s", bytes / 1024^(i - 1L), units[i])
}

assert_model <- function(model, arg = rlang::caller_arg(model), call = rlang::caller_env()) {
  if (!inherits(model, "fed_model")) {
    fedagg_abort(c("{.arg {arg}} must be a model from {.fn model_softmax}, {.fn model_mlp}, ...",
                   x = "It is {obj_desc(model)}."), call = call)
  }
  model
}

#' Initial parameters of a model
#'
#' @param model A [model][models].
#' @param seed Seed of the random initialisation (ignored by `init =
#'   "zeros"`).
#' @return A named list of layers (`W1`, `b1`, ...).
#' @examples
#' p <- init_params(model_mlp(4, hidden = 3, n_classes = 2), seed = 1)
#' lengths(p)
#' @export
init_params <- function(model, seed = 1) {
  assert_model(model)
  seed <- assert_count(seed)
  if (!is_builtin(model)) {
    params <- call_user(model$init, list(seed), "The custom model's {.fn init}")
    flat <- if (is.list(params) || is.numeric(params)) unlist(params, use.names = FALSE)
    if (!is.numeric(flat) || !length(flat) || !all(is.finite(flat))) {
      fedagg_abort(c("The custom model's {.fn init} must return finite numbers (a list of numeric layers).",
                     x = "It returned {obj_desc(params)}{if (is.numeric(flat) && length(flat)) ' with NA, NaN or Inf values' else ''}."),
                   class = "user_code")
    }
    return(params)
  }
  flat <- call_rust(rs_model_init(model$sizes, model$head, if (model$init == "zeros") 0L else 1L, as.double(seed)))
  unflatten_params(model, flat)
}

# A custom model's parameters must have the layers of its init(): same
# names, same lengths (a wrong-length vector would be relisted silently).
assert_same_layout <- function(params, template, arg = "params", call = rlang::caller_env()) {
  same <- is.list(params) == is.list(template) && identical(names(params), names(template)) &&
    identical(lengths(params), lengths(template))
  if (!same) {
    fedagg_abort(c("{.arg {arg}} must have the layers of the model's {.fn init}.",
                   x = "{.fn init} gives {paste(names(template) %||% '', lengths(template), sep = ':', collapse = ', ')}; {.arg {arg}} has {paste(names(params) %||% '', lengths(params), sep = ':', collapse = ', ')}."),
                 call = call)
  }
}

# One flat double vector from a named list of layers, after checking shapes.
flatten_params <- function(model, params, arg = "params", call = rlang::caller_env()) {
  if (!is_builtin(model)) return(flatten_any(params, arg, call))
  if (!is.list(params) || !identical(names(params), names(model$layers))) {
    fedagg_abort(c("{.arg {arg}} must be a list with layers {.val {names(model$layers)}}.",
                   x = "It has {if (is.list(params)) paste0('names ', paste(names(params), collapse = ', ')) else obj_desc(params)}."),
                 call = call)
  }
  for (l in names(params)) {
    expected <- prod(model$layers[[l]])
    if (!is.numeric(params[[l]]) || length(params[[l]]) != expected) {
      fedagg_abort("{.arg {arg}} layer {.val {l}} must have {expected} numbers, not {obj_desc(params[[l]])}.",
                   call = call)
    }
  }
  flat <- as.double(unlist(params, use.names = FALSE))
  if (!all(is.finite(flat))) fedagg_abort("{.arg {arg}} must be finite (it has NA, NaN or Inf).", call = call)
  flat
}

flatten_any <- function(params, arg, call, length = NULL) {
  flat <- unlist(params, use.names = FALSE)
  if (!is.numeric(flat)) fedagg_abort("{.arg {arg}} must be a list of numeric layers.", call = call)
  if (!is.null(length) && length(flat) != length) {
    fedagg_abort("{.arg {arg}} must have {length} numbers in all, not {length(flat)}.", call = call)
  }
  if (!all(is.finite(flat))) fedagg_abort("{.arg {arg}} must be finite (it has NA, NaN or Inf).", call = call)
  as.double(flat)
}

# The inverse of flatten_params, shaped like `template` (or the model's layers).
unflatten_params <- function(model, flat, template = NULL) {
  if (is_builtin(model)) {
    shapes <- model$layers
    out <- vector("list", length(shapes))
    names(out) <- names(shapes)
    at <- 0
    for (l in names(shapes)) {
      n <- prod(shapes[[l]])
      v <- flat[at + seq_len(n)]
      out[[l]] <- if (length(shapes[[l]]) == 2L) matrix(v, shapes[[l]][1], shapes[[l]][2]) else v
      at <- at + n
    }
    return(out)
  }
  relist_like(flat, template)
}

relist_like <- function(flat, template) {
  at <- 0
  out <- lapply(template, function(layer) {
    n <- length(layer)
    v <- flat[at + seq_len(n)]
    at <<- at + n
    if (!is.null(dim(layer))) dim(v) <- dim(layer)
    v
  })
  names(out) <- names(template)
  out
}

#' Loss and gradient of a model on data
#'
#' The mean loss over the rows of `x` and its gradient with respect to every
#' parameter: what one full-batch step of local training uses. Handy to check
#' a model, or to teach.
#'
#' @param model A [model][models].
#' @param params Parameters, as from [init_params()].
#' @param x Numeric matrix (or data frame) of features, one row per sample.
#' @param y Labels or responses (see [models]).
#' @return A list: `loss` (a number) and `grad` (shaped like `params`).
#' @examples
#' m <- model_logistic(2)
#' x <- matrix(c(1, 2, 3, 4, 0, 1), 3)
#' loss_grad(m, init_params(m), x, c(0, 1, 1))
#' @export
loss_grad <- function(model, params, x, y) {
  assert_model(model)
  data <- check_xy(x, y, model, "x", "y")
  if (!is_builtin(model)) {
    flat <- flatten_params(model, params)
    out <- call_user(model$loss_grad, list(params, data$x, data$y), "The custom model's {.fn loss_grad}")
    grad <- if (is.list(out) && is.list(out$grad)) unlist(out$grad, use.names = FALSE)
    if (!is.list(out) || !is.numeric(out$loss) || length(out$loss) != 1L || !is.numeric(grad) ||
        length(grad) != length(flat)) {
      fedagg_abort(c("The custom model's {.fn loss_grad} must return {.code list(loss = <number>, grad = <list shaped like params>)}.",
                     x = "It returned {obj_desc(out)}."), class = "user_code")
    }
    return(out)
  }
  flat <- flatten_params(model, params)
  out <- call_rust(rs_loss_grad(model$sizes, model$head, flat, as.double(data$x), nrow(data$x),
                                ncol(data$x), data$y))
  list(loss = out$loss, grad = unflatten_params(model, out$grad))
}

#' Predictions of a model
#'
#' @param object A [model][models].
#' @param params Parameters, as from [init_params()] or `server$params`.
#' @param newdata Numeric matrix (or data frame) of features.
#' @param type `"response"`: fitted values (regression), the probability of
#'   the positive class (logistic) or a matrix of class probabilities with
#'   one column per class (softmax); `"class"`: the predicted class, as a
#'   factor with the model's `classes` as levels when it has them (set by a
#'   [Server] from factor or character labels), else as codes `0, ...,
#'   n_classes - 1`.
#' @param ... Unused.
#' @return A numeric vector or matrix, or a factor.
#' @examples
#' m <- model_softmax(2, 3)
#' predict(m, init_params(m), matrix(rnorm(4), 2))
#' @export
predict.fed_model <- function(object, params, newdata, type = c("response", "class"), ...) {
  assert_model(object, arg = "object")
  model_predict(object, params, newdata, assert_choice(type, c("response", "class")), arg = "newdata")
}

model_predict <- function(object, params, newdata, type, arg, call = rlang::caller_env()) {
  x <- check_features(newdata, object, arg, call = call)
  scores <- if (is_builtin(object)) {
    flat <- flatten_params(object, params)
    out <- call_rust(rs_predict(object$sizes, object$head, flat, as.double(x), nrow(x), ncol(x)))
    if (object$head == head_codes[["softmax"]]) matrix(out, nrow(x)) else out
  } else {
    custom_predict(object, params, x)
  }
  if (type == "class") {
    if (object$task != "classification") fedagg_abort("{.code type = \"class\"} needs a classification model.", call = call)
    return(decode_classes(scores_to_class(scores), object))
  }
  if (is.matrix(scores) && ncol(scores) > 1L) colnames(scores) <- class_names(object, ncol(scores))
  scores
}

# Column names of class scores: the model's classes, else the codes.
class_names <- function(model, k) {
  out <- as.character(seq_len(k) - 1L)
  if (!is.null(model$classes)) out[seq_along(model$classes)] <- model$classes
  out
}

decode_classes <- function(codes, model) {
  if (is.null(model$classes)) return(codes)
  factor(model$classes[codes + 1L], levels = model$classes)
}

# A custom model's predictions, checked: a length-n vector (regression,
# binary) or an n x n_classes matrix of scores.
custom_predict <- function(model, params, x, client = NULL, round = NULL, call = rlang::caller_env()) {
  pred <- call_user(model$predict, list(params, x), "The custom model's {.fn predict}", round = round,
                    client = client, call = call)
  n <- nrow(x)
  k <- model$n_classes %||% 1L
  ok_vector <- is.numeric(pred) && length(pred) == n && (is.null(dim(pred)) || identical(dim(pred), c(n, 1L)))
  ok_matrix <- model$task == "classification" && is.numeric(pred) && is.matrix(pred) && nrow(pred) == n &&
    ncol(pred) == k
  wants <- if (model$task == "regression") "{n} fitted value{?s}"
           else if (k == 2L) "{n} probabilit{?y/ies} of class 1 (or an {n} x 2 matrix of scores)"
           else "an {n} x {k} matrix of class scores"
  if (!(ok_vector && (model$task == "regression" || k == 2L)) && !ok_matrix) {
    got <- if (is.matrix(pred)) sprintf("a %d x %d %s matrix", nrow(pred), ncol(pred), typeof(pred)) else obj_desc(pred)
    fedagg_abort(c(paste("The custom model's {.fn predict} must return", wants, "for {n} row{?s}."), x = "It returned {got}."),
                 class = "user_code", round = round, client = client, call = call)
  }
  if (!all(is.finite(pred))) {
    fedagg_abort("The custom model's {.fn predict} returned NA, NaN or Inf values.", class = "user_code",
                 round = round, client = client, call = call)
  }
  pred
}

scores_to_class <- function(scores) {
  if (is.matrix(scores) && ncol(scores) > 1L) max.col(scores, ties.method = "first") - 1L
  else as.integer(as.vector(scores) > 0.5)
}

# Validates features against a model: numeric, complete, the right width.
check_features <- function(x, model, arg, client = NULL, call = rlang::caller_env()) {
  x <- as_feature_matrix(x, arg, client, call)
  if (ncol(x) != model$n_features) {
    abort_data(c("{.arg {arg}} has {ncol(x)} column{?s}, the model expects {model$n_features}."),
               client, call)
  }
  x
}

as_feature_matrix <- function(x, arg, client = NULL, call = rlang::caller_env()) {
  if (is.data.frame(x)) {
    numeric_cols <- vapply(x, is.numeric, logical(1))
    if (!all(numeric_cols)) {
      abort_data("{.arg {arg}} must have numeric columns only; {.val {names(x)[!numeric_cols]}} {?is/are} not.",
                 client, call)
    }
    x <- as.matrix(x)
  }
  if (is.numeric(x) && is.null(dim(x))) x <- matrix(x, nrow = 1L)
  if (!is.numeric(x) || !is.matrix(x)) {
    abort_data("{.arg {arg}} must be a numeric matrix or data frame, not {obj_desc(x)}.", client, call)
  }
  if (nrow(x) == 0L) abort_data("{.arg {arg}} has no rows.", client, call)
  bad <- which(!is.finite(x))
  if (length(bad)) {
    row <- (bad[1] - 1L) %% nrow(x) + 1L
    col <- (bad[1] - 1L) %/% nrow(x) + 1L
    abort_data("{.arg {arg}} has {length(bad)} missing or non-finite value{?s} (first at row {row}, column {col}).",
               client, call)
  }
  storage.mode(x) <- "double"
  x
}

# Labels coded for a model: 0-based class codes, or responses. Factor and
# character labels are coded by the model's `classes` when it has them (a
# server sets them for the whole federation); a model without them codes a
# factor by its levels and characters by their sorted values.
encode_labels <- function(y, model, arg, client = NULL, call = rlang::caller_env()) {
  if (anyNA(y)) abort_data("{.arg {arg}} has {sum(is.na(y))} missing value{?s}.", client, call)
  if (model$task == "regression") {
    if (!is.numeric(y)) abort_data("{.arg {arg}} must be numeric for a regression model, not {obj_desc(y)}.", client, call)
    if (!all(is.finite(y))) abort_data("{.arg {arg}} has non-finite values.", client, call)
    return(as.double(y))
  }
  named <- is.factor(y) || is.character(y)
  if (named && !is.null(model$classes)) {
    codes <- match(as.character(y), model$classes) - 1L
    unknown <- unique(as.character(y)[is.na(codes)])
    if (length(unknown)) {
      abort_data(c("{.arg {arg}} has label{?s} {.val {unknown}} that {?is/are} not among the model's classes.",
                   i = "The classes are {.val {model$classes}}."), client, call)
    }
    return(as.double(codes))
  }
  if (is.character(y)) y <- factor(y)
  codes <- if (is.factor(y)) {
    as.integer(y) - 1L
  } else if (is.logical(y)) {
    as.integer(y)
  } else if (is.numeric(y) && all(is.finite(y)) && all(y == round(y))) {
    y
  } else {
    abort_data("{.arg {arg}} must be a factor or whole-number class codes, not {obj_desc(y)}.", client, call)
  }
  k <- model$n_classes
  bad <- which(codes < 0 | codes >= k)
  if (length(bad)) {
    shown <- if (is.factor(y)) as.character(y[bad[1]]) else format(y[bad[1]])
    abort_data(c("{.arg {arg}} has labels outside the model's {k} classes.",
                 x = "Label {.val {shown}} (codes must be 0..{k - 1}, or a factor with at most {k} levels)."),
               client, call)
  }
  as.double(codes)
}

check_xy <- function(x, y, model, x_arg, y_arg, client = NULL, call = rlang::caller_env()) {
  x <- check_features(x, model, x_arg, client, call)
  if (length(y) != nrow(x)) {
    abort_data("{.arg {y_arg}} has {length(y)} value{?s} for {nrow(x)} row{?s} of {.arg {x_arg}}.", client, call)
  }
  list(x = x, y = encode_labels(y, model, y_arg, client, call))
}

# Data errors name the client when there is one.
abort_data <- function(message, client = NULL, call = rlang::caller_env(), .envir = parent.frame()) {
  if (is.null(client)) {
    fedagg_abort(message, call = call, .envir = .envir)
  } else {
    message[1] <- paste0(cli::format_inline("Client {.val {client}}: "), message[1])
    fedagg_abort(message, class = "client", client = client, call = call, .envir = .envir)
  }
}
