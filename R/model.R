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
#' @param precision Arithmetic of training and prediction: `"float64"` (the
#'   default) or `"float32"`, which runs the matrix products of the forward
#'   and backward passes in single precision (faster on wide models; see
#'   `bench/README.md`). Parameters, optimizer states, losses and the
#'   aggregation stay in double precision either way; float32 gradients
#'   agree with float64 to about 1e-6 relative, and runs are as
#'   reproducible (same seed, same results on any number of threads).
#'
#'   Built-in models train on minibatches with blocked matrix products, each
#'   client on one thread. The products' kernels are picked at run time for
#'   the CPU (AVX-512, AVX2 with FMA, SSE2), so machines with different
#'   vector units may differ in the last bits; on one machine results are
#'   bit-for-bit reproducible.
#' @param classes Optional class labels, in the order of the model's outputs
#'   (for logistic regression: the negative class, then the positive one).
#'   When `NULL`, a [Server] takes them from its nodes' labels: the union of
#'   their factor levels, or the sorted union of their character labels, so
#'   that one class has one code on every node. Numeric labels are class
#'   codes `0, ..., n_classes - 1` and need no `classes`.
#' @return A `fed_model` object.
#' @seealso [model_cnn()] for convolutional networks; [init_params()],
#'   [loss_grad()], [fed_server()]
#' @examples
#' m <- model_softmax(n_features = 4, n_classes = 3)
#' m
#' str(init_params(m))
#' model_mlp(n_features = 784, hidden = c(128, 64), n_classes = 10)
#' @name models
NULL

#' @rdname models
#' @export
model_linear <- function(n_features, init = c("zeros", "glorot"), precision = c("float64", "float32")) {
  check_required_args()
  new_builtin_model("linear", n_features, integer(), 1L, "linear", assert_choice(init, c("zeros", "glorot")),
                    precision = precision)
}

#' @rdname models
#' @export
model_logistic <- function(n_features, init = c("zeros", "glorot"), classes = NULL,
                           precision = c("float64", "float32")) {
  check_required_args()
  classes <- assert_classes(classes, 2L)
  new_builtin_model("logistic", n_features, integer(), 1L, "logistic", assert_choice(init, c("zeros", "glorot")),
                    classes, precision)
}

#' @rdname models
#' @export
model_softmax <- function(n_features, n_classes = length(classes), init = c("zeros", "glorot"), classes = NULL,
                          precision = c("float64", "float32")) {
  n_classes <- assert_count(n_classes, min = 2L)
  classes <- assert_classes(classes, n_classes)
  new_builtin_model("softmax", n_features, integer(), n_classes, "softmax", assert_choice(init, c("zeros", "glorot")),
                    classes, precision)
}

#' @rdname models
#' @export
model_mlp <- function(n_features, hidden = 32, n_classes = NULL,
                      output = c("softmax", "logistic", "linear"), init = c("glorot", "zeros"),
                      classes = NULL, precision = c("float64", "float32")) {
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
                    classes, precision)
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
  check_required_args()
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
                              precision = "float64", call = rlang::caller_env()) {
  n_features <- assert_count(n_features, min = 1L, call = call)
  precision <- assert_choice(precision, c("float64", "float32"), arg = "precision", call = call)
  sizes <- c(n_features, hidden, n_out)
  size_d <- as.double(sizes)
  n_par <- sum(size_d[-length(size_d)] * size_d[-1L] + size_d[-1L])
  if (n_par > max_params) {
    fedagg_abort(c("This model would have {format(n_par, big.mark = ',')} parameters ({format_bytes(8 * n_par)} a copy).",
                   i = "At most {format(max_params, big.mark = ',')} are supported; check {.arg n_features} and {.arg hidden}."),
                 class = "memory", call = call)
  }
  layers <- dense_layers(sizes)
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
    init = init,
    precision = precision
  ), class = c(paste0("fed_model_", type), "fed_model_builtin", "fed_model"))
}

# The dense layers' parameter shapes of a network with layer `sizes`:
# `W1` (inputs x outputs), `b1`, `W2`, ... in the core's flat order.
dense_layers <- function(sizes) {
  unlist(lapply(seq_len(length(sizes) - 1L), function(l) {
    stats::setNames(list(c(sizes[l], sizes[l + 1L]), sizes[l + 1L]), paste0(c("W", "b"), l))
  }), recursive = FALSE)
}

# Precision bits as the Rust core reads them (models saved before the
# precision option are float64).
model_bits <- function(model) if (identical(model$precision, "float32")) 32L else 64L

is_builtin <- function(model) inherits(model, "fed_model_builtin")

#' @export
format.fed_model <- function(x, ...) paste("<fed_model>", model_description(x))

model_description <- function(x) {
  what <- switch(x$type,
    linear = "linear regression",
    logistic = "logistic regression",
    softmax = "softmax regression",
    mlp = sprintf("MLP (%s hidden, %s output)", paste(x$sizes[-c(1, length(x$sizes))], collapse = "-"), x$output),
    cnn = sprintf("CNN (%s input; %s)", paste(x$input, collapse = "x"), paste(x$spec, collapse = ", ")),
    custom = sprintf("custom R model '%s' (%s)", x$name, x$task)
  )
  detail <- sprintf("%d features", x$n_features)
  if (!is.null(x$n_classes)) detail <- paste0(detail, sprintf(", %d classes", x$n_classes))
  if (is_builtin(x)) detail <- paste0(detail, sprintf(", %d parameters", n_params(x)))
  if (identical(x$precision, "float32")) detail <- paste0(detail, ", float32")
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
  check_required_args()
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
  flat <- call_rust(rs_model_init(model_arch(model), model$head, init_code(model$init), as.double(seed)))
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
