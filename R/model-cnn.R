# Convolutional networks: a layer specification checked here, shape by
# shape, so that a network that cannot work is refused when it is made
# (naming the layer), and trained by the Rust core like the dense models.

#' A convolutional network
#'
#' @description
#' A small CNN for image classification, trained in Rust like the other
#' built-in [models]: every client algorithm, optimizer, DP, compression and
#' robust rule, minibatches, `precision = "float32"`, and the same results on
#' any number of threads.
#'
#' `layers` is a list of [cnn_layers]: convolutions, ReLU and pooling, then
#' optionally `flatten()`, then dense layers, each hidden one followed by
#' `relu()`. The output layer (`n_classes` units, softmax) is added after
#' the last one.
#'
#' Images are the rows of the data matrix, each of `prod(input)` values in
#' reading order with the channels fastest: value `(h, w, c)` of an image
#' is column `(h - 1) * W * C + (w - 1) * C + c` (row by row, as
#' [load_fashion_mnist()] gives them). [images_to_matrix()] turns an `n x
#' H x W x C` array into that matrix.
#'
#' Parameters: each convolution has a weight matrix `conv<k>_W` of `size^2 *
#' C_in` rows (the window's values, channels fastest) and `filters` columns,
#' and a bias `conv<k>_b`; then the dense layers `W1`, `b1`, ... as in
#' [model_mlp()]. `init = "kaiming"` (the default) draws every weight and
#' bias from U(-1/sqrt(fan_in), 1/sqrt(fan_in)), PyTorch's default for
#' `Conv2d` and `Linear` (`kaiming_uniform_` with `a = sqrt(5)`), with
#' fedagg's own random numbers.
#'
#' @param input The images' `c(height, width, channels)` (or `c(height,
#'   width)` for one channel).
#' @param layers A list of layers: [conv()], [relu()], [max_pool()],
#'   [avg_pool()], [dropout()], [flatten()], [dense()].
#' @param n_classes Number of classes.
#' @param init `"kaiming"` (PyTorch's default initialisation) or
#'   `"glorot"`.
#' @param classes,precision As in [models].
#' @return A `fed_model`.
#' @seealso [cnn_layers], the vignette section "Images: a CNN on
#'   Fashion-MNIST".
#' @examples
#' lenet <- model_cnn(input = c(28, 28, 1),
#'                    layers = list(conv(6, 5), relu(), max_pool(2), conv(16, 5), relu(), max_pool(2),
#'                                  dense(120), relu(), dense(84), relu()),
#'                    n_classes = 10)
#' lenet
#' lengths(init_params(lenet))
#' @export
model_cnn <- function(input, layers, n_classes = length(classes), classes = NULL, init = c("kaiming", "glorot"),
                      precision = c("float64", "float32")) {
  check_required_args()
  if (!is.numeric(input) || !length(input) %in% 2:3 || anyNA(input) || any(input < 1) || any(input != round(input))) {
    fedagg_abort("{.arg input} must be {.code c(height, width, channels)} in whole numbers >= 1, not {obj_desc(input)}.")
  }
  if (length(input) == 2L) input <- c(input, 1)
  n_classes <- assert_count(n_classes, min = 2L)
  classes <- assert_classes(classes, n_classes)
  init <- assert_choice(init, c("kaiming", "glorot"))
  precision <- assert_choice(precision, c("float64", "float32"))
  if (!is.list(layers) || inherits(layers, "fed_layer") || !length(layers)) {
    fedagg_abort("{.arg layers} must be a list of layers ({.fn conv}, {.fn relu}, {.fn max_pool}, ...), not {obj_desc(layers)}.")
  }
  plan <- plan_cnn(as.integer(input), layers)
  sizes <- c(plan$flat, plan$hidden, n_classes)
  params <- c(plan$params, dense_layers(sizes))
  n_par <- sum(vapply(params, function(d) prod(as.double(d)), numeric(1)))
  if (n_par > max_params) {
    fedagg_abort("This network would have {format(n_par, big.mark = ',')} parameters; at most {format(max_params, big.mark = ',')} are supported.",
                 class = "memory")
  }
  structure(list(
    type = "cnn",
    task = "classification",
    n_features = as.integer(prod(input)),
    n_classes = n_classes,
    classes = classes,
    output = "softmax",
    sizes = as.double(sizes),
    input = as.double(input),
    front = as.double(unlist(plan$codes)),
    spec = plan$labels,
    head = head_codes[["softmax"]],
    layers = params,
    init = init,
    precision = precision
  ), class = c("fed_model_cnn", "fed_model_builtin", "fed_model"))
}

# The layers' shapes, their parameters, and the codes the Rust core reads
# (kind, then sizes: conv 1 filters size stride padding, relu 2, max pool 3
# size stride, average pool 4 size stride).
plan_cnn <- function(input, layers, call = rlang::caller_env()) {
  shape <- input
  codes <- list()
  params <- list()
  labels <- character()
  hidden <- integer()
  flat <- NULL
  n_conv <- 0L
  at <- function(i) sprintf("layer %d (%s)", i, format(layers[[i]]))
  for (i in seq_along(layers)) {
    l <- layers[[i]]
    if (!inherits(l, "fed_layer")) {
      fedagg_abort("Layer {i} of {.arg layers} must be made by {.fn conv}, {.fn relu}, {.fn max_pool}, {.fn avg_pool}, {.fn dropout}, {.fn flatten} or {.fn dense}, not {obj_desc(l)}.",
                   call = call)
    }
    labels <- c(labels, format(l))
    after_flat <- !is.null(flat)
    if (l$kind %in% c("conv", "max_pool", "avg_pool") && after_flat) {
      fedagg_abort("{at(i)} comes after the image was flattened; convolutions and pooling come before {.fn flatten} and {.fn dense}.", call = call)
    }
    out_len <- function(n, size, stride, pad) {
      if (size > n + 2 * pad) {
        fedagg_abort(c("{at(i)} has a {size}x{size} window, larger than its {shape[1]}x{shape[2]} input{if (pad > 0) sprintf(' (padded to %dx%d)', shape[1] + 2 * pad, shape[2] + 2 * pad) else ''}.",
                       i = "Use a smaller window, padding, or fewer pooling layers before it."), call = call)
      }
      (n + 2 * pad - size) %/% stride + 1L
    }
    switch(l$kind,
      conv = {
        n_conv <- n_conv + 1L
        if (as.double(l$size)^2 * shape[3] * l$filters > max_params) {
          fedagg_abort("{at(i)} would have more than {format(max_params, big.mark = ',')} weights.", class = "memory", call = call)
        }
        out <- c(out_len(shape[1], l$size, l$stride, l$padding), out_len(shape[2], l$size, l$stride, l$padding), l$filters)
        if (as.double(out[1]) * out[2] * max(out[3], l$size^2 * shape[3]) > .Machine$integer.max) {
          fedagg_abort("{at(i)} would give more than {format(.Machine$integer.max, big.mark = ',')} values an image.", class = "memory", call = call)
        }
        params[[paste0("conv", n_conv, "_W")]] <- c(l$size^2 * shape[3], l$filters)
        params[[paste0("conv", n_conv, "_b")]] <- l$filters
        codes[[length(codes) + 1L]] <- c(1, l$filters, l$size, l$stride, l$padding)
        shape <- out
      },
      max_pool = ,
      avg_pool = {
        shape <- c(out_len(shape[1], l$size, l$stride, 0), out_len(shape[2], l$size, l$stride, 0), shape[3])
        codes[[length(codes) + 1L]] <- c(if (l$kind == "max_pool") 3 else 4, l$size, l$stride, 0, 0)
      },
      dropout = {
        ppm <- round(l$rate * 1e6)
        if (!after_flat) {
          codes[[length(codes) + 1L]] <- c(5, ppm, 0, 0, 0)
        } else if (!identical(layers[[i - 1L]]$kind, "relu") || !identical(layers[[i - 2L]]$kind, "dense")) {
          fedagg_abort("{at(i)} must follow a {.fn dense} layer's {.fn relu} once the image is flattened.", call = call)
        } else {
          codes[[length(codes) + 1L]] <- c(6, length(hidden) - 1, ppm, 0, 0)
        }
      },
      relu = {
        if (!after_flat) {
          codes[[length(codes) + 1L]] <- c(2, 0, 0, 0, 0)
        } else if (!identical(layers[[i - 1L]]$kind, "dense")) {
          fedagg_abort("{at(i)} must follow a {.fn dense} layer once the image is flattened (each hidden dense layer is followed by one {.fn relu}).", call = call)
        }
      },
      flatten = {
        if (after_flat) fedagg_abort("{at(i)}: the image is already flattened.", call = call)
        flat <- prod(shape)
      },
      dense = {
        if (!after_flat) flat <- prod(shape)
        nxt <- if (i < length(layers)) layers[[i + 1L]] else NULL
        if (!inherits(nxt, "fed_layer") || nxt$kind != "relu") {
          fedagg_abort(c("{at(i)} must be followed by {.fn relu}.",
                         i = "fedagg's dense hidden layers are ReLU layers; the output layer ({.arg n_classes} units) is added after the last one."),
                       call = call)
        }
        hidden <- c(hidden, l$units)
      }
    )
  }
  if (is.null(flat)) flat <- prod(shape)
  if (prod(as.double(input)) > .Machine$integer.max || flat > .Machine$integer.max) {
    fedagg_abort("The images or the layers' outputs would have more than {format(.Machine$integer.max, big.mark = ',')} values each.",
                 class = "memory", call = call)
  }
  list(codes = codes, params = params, hidden = as.integer(hidden), flat = as.integer(flat), labels = labels)
}

#' Layers of a convolutional network
#'
#' @description
#' The layers [model_cnn()] is made of.
#' * `conv(filters, size, stride, padding)`: a 2-D convolution with
#'   `filters` square `size x size` kernels, zero padding of `padding`
#'   pixels on every side, and a bias per filter.
#' * `relu()`: max(0, x).
#' * `max_pool(size, stride)`, `avg_pool(size, stride)`: the largest or the
#'   mean value of each `size x size` window, per channel, without padding
#'   (a window that would pass the edge is dropped, as in PyTorch).
#' * `flatten()`: the image as one vector (implied by the first `dense()`).
#' * `dense(units)`: a fully connected hidden layer, followed by `relu()`.
#' * `dropout(rate)`: while training, each value is set to 0 with
#'   probability `rate` and the others are scaled by `1 / (1 - rate)`
#'   (inverted dropout); evaluation and prediction pass values on. Its masks
#'   come from the run's seed, the client and the step, so runs stay
#'   reproducible on any number of threads. After the image is flattened,
#'   it follows a dense layer's `relu()`. (FedSGD's full-batch gradients are
#'   computed without it.) The rate is kept to six decimals.
#'
#' @param filters Number of output channels.
#' @param size Side of the square window.
#' @param stride Step between windows (pooling: `size` by default).
#' @param padding Zero padding on each side.
#' @param units Number of units.
#' @param rate Probability of dropping a value, from 0 to below 1.
#' @return A `fed_layer`.
#' @examples
#' list(conv(6, 5), relu(), max_pool(2), dense(120), relu())
#' @name cnn_layers
NULL

new_layer <- function(kind, ...) structure(list(kind = kind, ...), class = "fed_layer")

#' @rdname cnn_layers
#' @export
conv <- function(filters, size, stride = 1, padding = 0) {
  check_required_args()
  new_layer("conv", filters = assert_count(filters, min = 1L), size = assert_count(size, min = 1L),
            stride = assert_count(stride, min = 1L), padding = assert_count(padding, min = 0L))
}

#' @rdname cnn_layers
#' @export
relu <- function() new_layer("relu")

#' @rdname cnn_layers
#' @export
max_pool <- function(size = 2, stride = size) {
  new_layer("max_pool", size = assert_count(size, min = 1L), stride = assert_count(stride, min = 1L))
}

#' @rdname cnn_layers
#' @export
avg_pool <- function(size = 2, stride = size) {
  new_layer("avg_pool", size = assert_count(size, min = 1L), stride = assert_count(stride, min = 1L))
}

#' @rdname cnn_layers
#' @export
flatten <- function() new_layer("flatten")

#' @rdname cnn_layers
#' @export
dropout <- function(rate) {
  check_required_args()
  rate <- assert_number(rate, 0, 1, upper_open = TRUE)
  # Kept to six decimals (the core's parts per million): 0.9999996 is 1.
  if (round(rate * 1e6) >= 1e6) fedagg_abort("{.arg rate} must be below 1, not {format(rate, digits = 10)} (kept to six decimals).")
  new_layer("dropout", rate = rate)
}

#' @rdname cnn_layers
#' @export
dense <- function(units) {
  check_required_args()
  new_layer("dense", units = assert_count(units, min = 1L))
}

#' @export
format.fed_layer <- function(x, ...) {
  switch(x$kind,
    conv = sprintf("conv(%d, %d%s%s)", x$filters, x$size, if (x$stride != 1) sprintf(", stride = %d", x$stride) else "",
                   if (x$padding != 0) sprintf(", padding = %d", x$padding) else ""),
    max_pool = , avg_pool = sprintf("%s(%d%s)", x$kind, x$size, if (x$stride != x$size) sprintf(", stride = %d", x$stride) else ""),
    dense = sprintf("dense(%d)", x$units),
    dropout = sprintf("dropout(%s)", format(x$rate)),
    sprintf("%s()", x$kind)
  )
}

#' @export
print.fed_layer <- function(x, ...) {
  cat("<fed_layer> ", format(x), "\n", sep = "")
  invisible(x)
}

#' Images as the rows of a matrix
#'
#' @description
#' Turns an `n x height x width x channels` array (or `n x height x width`)
#' into the `n x (height * width * channels)` matrix [model_cnn()] reads:
#' each row an image in reading order, channels fastest.
#'
#' @param x A numeric array.
#' @return A numeric matrix.
#' @examples
#' imgs <- array(runif(2 * 4 * 4 * 3), c(2, 4, 4, 3))
#' m <- images_to_matrix(imgs)
#' dim(m)
#' # Pixel (h = 2, w = 3), channel 1 of image 1:
#' m[1, (2 - 1) * 4 * 3 + (3 - 1) * 3 + 1] == imgs[1, 2, 3, 1]
#' @export
images_to_matrix <- function(x) {
  check_required_args()
  d <- dim(x)
  if (!is.numeric(x) || !length(d) %in% 3:4) fedagg_abort("{.arg x} must be an n x height x width (x channels) numeric array, not {obj_desc(x)}.")
  if (length(d) == 3L) d <- c(d, 1L)
  # R stores the array with n fastest; the rows want channels, then
  # width, then height fastest.
  m <- matrix(aperm(array(x, d), c(1, 4, 3, 2)), d[1])
  storage.mode(m) <- "double"
  m
}

# What the Rust core is given as a model's architecture.
model_arch <- function(model) {
  if (identical(model$type, "cnn")) list(sizes = model$sizes, input = model$input, front = model$front) else model$sizes
}

init_code <- function(init) switch(init, zeros = 0L, glorot = 1L, kaiming = 2L)
