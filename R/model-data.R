# Models meet data: loss and gradient, predictions (built-in in Rust, custom
# in R, checked), and the checks and coding of features and labels.

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
  check_required_args()
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
  # The matrix itself: as.double() would copy it to drop its dim.
  out <- call_rust(rs_loss_grad(model_arch(model), model$head, model_bits(model), flat, data$x, nrow(data$x),
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
    out <- call_rust(rs_predict(model_arch(object), object$head, model_bits(object), flat, x, nrow(x), ncol(x)))
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
  # anyNA(), min() and max() allocate nothing; which() runs only on bad data.
  if (length(x) && (anyNA(x) || !is.finite(min(x)) || !is.finite(max(x)))) {
    bad <- which(!is.finite(x))
    row <- (bad[1] - 1L) %% nrow(x) + 1L
    col <- (bad[1] - 1L) %/% nrow(x) + 1L
    abort_data("{.arg {arg}} has {length(bad)} missing or non-finite value{?s} (first at row {row}, column {col}).",
               client, call)
  }
  # Only when needed: `storage.mode<-` on a double matrix returns an ALTREP
  # wrapper, another object for the same data.
  if (!is.double(x)) storage.mode(x) <- "double"
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
