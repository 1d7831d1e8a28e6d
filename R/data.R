#' Synthetic(alpha, beta) federated data of the FedProx paper
#'
#' The generator of Li et al. (2020), "Federated Optimization in
#' Heterogeneous Networks", section 5.1. For each client k:
#' `u_k ~ N(0, alpha^2)`, `B_k ~ N(0, beta^2)`; `W_k` (`dim x n_classes`)
#' and `b_k` have entries `~ N(u_k, 1)`; `v_k` has entries `~ N(B_k, 1)`;
#' `x ~ N(v_k, Sigma)` with diagonal `Sigma_jj = j^-1.2`; and
#' `y = argmax(softmax(x W_k + b_k))`. `alpha` controls how much the local
#' models differ, `beta` how much the local data differ. Client sizes are
#' `floor(lognormal(4, 2)) + 50`, as in the paper's code, which also gives
#' the IID variant (`iid = TRUE`): one `W`, `b` with `N(0, 1)` entries shared
#' by all clients and `x ~ N(0, Sigma)`.
#'
#' @param alpha,beta Standard deviations of the model and data
#'   heterogeneity (ignored when `iid = TRUE`).
#' @param n_clients Number of clients.
#' @param dim Number of features.
#' @param n_classes Number of classes.
#' @param iid Generate the IID variant?
#' @param train_fraction Share of each client's samples in its training
#'   split (the paper's code uses 0.9); the rest is its test split.
#' @param max_size Cap on a client's size (log-normal sizes have a heavy
#'   tail; `Inf` for none).
#' @param seed Seed (the global RNG is left untouched).
#' @return A `fed_data` object: `clients`, a named list with `x`, `y` (class
#'   codes 0..n_classes-1), `x_test`, `y_test` per client, plus the settings.
#'   Use [fed_nodes()] to turn it into nodes and [pool_clients()] to pool it.
#' @references Li, T., Sahu, A. K., Zaheer, M., Sanjabi, M., Talwalkar, A.,
#'   & Smith, V. (2020). Federated optimization in heterogeneous networks.
#'   MLSys 2020.
#' @examples
#' d <- synthetic_fedprox(1, 1, n_clients = 5, seed = 1)
#' d
#' summary(d)
#' @export
synthetic_fedprox <- function(alpha, beta, n_clients = 30, dim = 60, n_classes = 10, iid = FALSE,
                              train_fraction = 0.9, max_size = Inf, seed = NULL) {
  check_required_args()
  alpha <- assert_number(alpha, 0)
  beta <- assert_number(beta, 0)
  n_clients <- assert_count(n_clients, min = 1L)
  dim <- assert_count(dim, min = 1L)
  n_classes <- assert_count(n_classes, min = 2L)
  iid <- assert_flag(iid)
  train_fraction <- assert_number(train_fraction, 0, 1, lower_open = TRUE)
  if (!identical(max_size, Inf)) max_size <- assert_count(max_size, min = 2L)
  check_memory(8 * 4 * as.double(n_clients), sprintf("the sizes of %d clients", n_clients))
  sd_x <- sqrt(seq_len(dim)^-1.2)
  clients <- with_seed(seed, {
    sizes <- pmin(floor(stats::rlnorm(n_clients, 4, 2)) + 50, max_size)
    u <- stats::rnorm(n_clients, 0, alpha)
    B <- stats::rnorm(n_clients, 0, beta)
    if (iid) {
      W_global <- matrix(stats::rnorm(dim * n_classes), dim, n_classes)
      b_global <- stats::rnorm(n_classes)
    }
    lapply(seq_len(n_clients), function(k) {
      v <- if (iid) numeric(dim) else stats::rnorm(dim, B[k], 1)
      W <- if (iid) W_global else matrix(stats::rnorm(dim * n_classes, u[k], 1), dim, n_classes)
      b <- if (iid) b_global else stats::rnorm(n_classes, u[k], 1)
      n <- sizes[k]
      if (k == 1L) check_memory(8 * 3 * sum(sizes) * (dim + 1), sprintf("%s samples of %d features", format(sum(sizes)), dim))
      x <- matrix(stats::rnorm(n * dim), n, dim) * rep(sd_x, each = n) + rep(v, each = n)
      # argmax of softmax(x W + b) is the argmax of the logits.
      y <- max.col(sweep(x %*% W, 2, b, `+`), ties.method = "first") - 1L
      n_train <- max(1L, min(n - 1L, as.integer(floor(train_fraction * n))))
      train <- seq_len(n_train)
      list(x = x[train, , drop = FALSE], y = y[train],
           x_test = x[-train, , drop = FALSE], y_test = y[-train])
    })
  })
  names(clients) <- sprintf(paste0("client%0", nchar(n_clients), "d"), seq_len(n_clients))
  structure(list(clients = clients, alpha = alpha, beta = beta, iid = iid, dim = dim,
                 n_classes = n_classes),
            class = "fed_data")
}

#' @export
format.fed_data <- function(x, ...) {
  n <- vapply(x$clients, function(cl) length(cl$y) + length(cl$y_test), numeric(1))
  kind <- if (x$iid) "IID synthetic" else sprintf("Synthetic(%s, %s)", format(x$alpha), format(x$beta))
  c(sprintf("<fed_data> %s: %d clients, %d features, %d classes", kind, length(x$clients), x$dim, x$n_classes),
    sprintf("samples per client: min %d, median %s, max %d (total %d)", min(n), format(stats::median(n)), max(n), sum(n)))
}

#' @export
print.fed_data <- function(x, ...) {
  cat(format(x), sep = "\n")
  invisible(x)
}

#' @export
summary.fed_data <- function(object, ...) {
  levels <- seq_len(object$n_classes) - 1L
  rows <- lapply(names(object$clients), function(id) {
    cl <- object$clients[[id]]
    counts <- as.vector(table(factor(cl$y, levels = levels)))
    data.frame(client = id, n_train = length(cl$y), n_test = length(cl$y_test),
               n_labels = sum(counts > 0), top_label_share = max(counts) / sum(counts))
  })
  do.call(rbind, rows)
}

#' Pool the clients of a federated data set
#'
#' @param data A `fed_data` object, e.g. from [synthetic_fedprox()].
#' @param split `"train"` or `"test"`.
#' @return `list(x = , y = )`: all clients' rows of that split, in client
#'   order; usable as a server's `test_data` or for centralised training.
#' @examples
#' d <- synthetic_fedprox(1, 1, n_clients = 5, seed = 1)
#' test <- pool_clients(d, "test")
#' dim(test$x)
#' @export
pool_clients <- function(data, split = c("train", "test")) {
  check_required_args()
  if (!inherits(data, "fed_data")) fedagg_abort("{.arg data} must be a {.cls fed_data}, not {obj_desc(data)}.")
  split <- assert_choice(split, c("train", "test"))
  xs <- if (split == "train") "x" else "x_test"
  ys <- if (split == "train") "y" else "y_test"
  list(x = do.call(rbind, lapply(data$clients, `[[`, xs)),
       y = unlist(lapply(data$clients, `[[`, ys), use.names = FALSE))
}

#' Read an IDX file (the MNIST format)
#'
#' Reads the binary IDX format of MNIST and Fashion-MNIST, plain or
#' gzip-compressed: a magic number (two zero bytes, a type code and the
#' number of dimensions), the big-endian 32-bit dimensions, then the values
#' in row-major order.
#'
#' @param path Path to the file (`.gz` or not).
#' @return A vector (1 dimension), a matrix (2) or an array (3 or more) with
#'   the file's dimensions; images come out as `n x rows x cols`.
#' @examples
#' # A 2 x 3 unsigned-byte matrix written by hand
#' f <- tempfile()
#' con <- file(f, "wb")
#' writeBin(as.raw(c(0, 0, 0x08, 2)), con)
#' writeBin(c(2L, 3L), con, size = 4, endian = "big")
#' writeBin(as.raw(1:6), con)
#' close(con)
#' read_idx(f)
#' @export
read_idx <- function(path) {
  check_required_args()
  if (!is.character(path) || length(path) != 1L || is.na(path) || !file.exists(path) || dir.exists(path)) {
    fedagg_abort("{.arg path} must be an existing file, not {obj_desc(path)}.")
  }
  con <- gzfile(path, "rb") # reads plain files too
  on.exit(close(con))
  # Every read goes through `read`: a corrupt or truncated gzip stream makes
  # the connection warn ("invalid or incomplete compressed data") or fail
  # ("error reading from the connection"); both become one classed error.
  here <- environment()
  read <- function(what, n, ...) {
    failed <- function(cnd) idx_unreadable(path, cnd, here)
    # The last handler is the outer one: the error `failed` raises for a
    # warning is not caught again as an error.
    tryCatch(readBin(con, what, n, ...), error = failed, warning = failed)
  }
  magic <- read("raw", 4L)
  if (length(magic) < 4L || magic[1] != as.raw(0) || magic[2] != as.raw(0)) {
    fedagg_abort("{.path {path}} is not an IDX file (bad magic number).")
  }
  type <- as.integer(magic[3])
  n_dims <- as.integer(magic[4])
  dims <- if (n_dims) read("integer", n_dims, size = 4L, endian = "big") else integer()
  if (length(dims) != n_dims || anyNA(dims) || any(dims < 0)) fedagg_abort("{.path {path}} has a truncated or invalid header.")
  spec <- idx_types[[as.character(type)]]
  if (is.null(spec)) fedagg_abort("{.path {path}} has unknown IDX type code {type}.")
  n <- prod(as.double(dims))
  if (n > 2^31 - 1) {
    fedagg_abort("{.path {path}} claims {format(n, big.mark = ',')} values; at most 2^31 - 1 can be read into R.")
  }
  # The header is not trusted with memory: a plain file is checked against
  # its size, and a compressed one is read in chunks, so a short file never
  # reserves what its header claims.
  check_memory((if (spec$what == "double") 8 else 4) * n, sprintf("the %s values of an IDX file", format(n, scientific = FALSE)))
  expected_bytes <- 4 + 4 * n_dims + n * spec$size
  size <- file.size(path)
  if (!is_gzip(path) && size != expected_bytes) {
    what <- if (size < expected_bytes) "is truncated" else "has data beyond what its header describes"
    fedagg_abort("{.path {path}} {what}: {size} bytes, where its header describes {format(expected_bytes, scientific = FALSE)}.")
  }
  values <- read_idx_values(read, spec, n)
  if (length(values) != n) {
    fedagg_abort("{.path {path}} is truncated: {length(values)} of {format(n, scientific = FALSE)} values.")
  }
  if (length(read("raw", 1L))) {
    fedagg_abort("{.path {path}} has data beyond the {format(n, scientific = FALSE)} values its header describes.")
  }
  if (n_dims <= 1L) return(values)
  # IDX is row-major: fill the reversed dimensions, then turn them around.
  arr <- array(values, dim = rev(dims))
  arr <- aperm(arr, rev(seq_len(n_dims)))
  if (n_dims == 2L) arr <- matrix(arr, dims[1], dims[2])
  arr
}

idx_types <- list(
  "8" = list(what = "integer", size = 1L, signed = FALSE),
  "9" = list(what = "integer", size = 1L, signed = TRUE),
  "11" = list(what = "integer", size = 2L, signed = TRUE),
  "12" = list(what = "integer", size = 4L, signed = TRUE),
  "13" = list(what = "double", size = 4L, signed = TRUE),
  "14" = list(what = "double", size = 8L, signed = TRUE)
)

is_gzip <- function(path) {
  con <- file(path, "rb")
  on.exit(close(con))
  identical(readBin(con, "raw", 2L), as.raw(c(0x1f, 0x8b)))
}

# A failure of the connection (`cnd`, kept as the parent) ends the reading.
idx_unreadable <- function(path, cnd, call) {
  fedagg_abort("{.path {path}} is corrupt or truncated: its data cannot be read.", parent = cnd, call = call)
}

# `read_bin(what, n, ...)` reads from the file's connection.
read_idx_values <- function(read_bin, spec, n, chunk = 2^24) {
  read <- function(k) read_bin(spec$what, k, size = spec$size, signed = spec$signed, endian = "big")
  if (n <= chunk) return(read(n))
  pieces <- list()
  left <- n
  while (left > 0) {
    piece <- read(min(chunk, left))
    pieces[[length(pieces) + 1L]] <- piece
    left <- left - length(piece)
    if (length(piece) < min(chunk, left + length(piece))) break
  }
  unlist(pieces, use.names = FALSE)
}

#' Load Fashion-MNIST from IDX files
#'
#' Reads the four standard files (`train-images-idx3-ubyte`,
#' `train-labels-idx1-ubyte`, `t10k-images-idx3-ubyte`,
#' `t10k-labels-idx1-ubyte`, each optionally `.gz`). Debian's
#' `dataset-fashion-mnist` package installs them in
#' `/usr/share/datasets/fashion-mnist`. Nothing is downloaded. Works for the
#' original MNIST files too.
#'
#' @param dir Directory holding the files.
#' @param normalize Scale pixels to `[0, 1]`?
#' @return `list(train = list(x, y), test = list(x, y))` with `x` an `n x
#'   784` matrix (rows are images, pixels row by row) and `y` a factor of
#'   the 10 class names.
#' @examples
#' if (dir.exists("/usr/share/datasets/fashion-mnist")) {
#'   fm <- load_fashion_mnist()
#'   dim(fm$train$x)
#' }
#' @export
load_fashion_mnist <- function(dir = "/usr/share/datasets/fashion-mnist", normalize = TRUE) {
  if (!is.character(dir) || length(dir) != 1L || is.na(dir) || !nzchar(dir)) {
    fedagg_abort("{.arg dir} must be a single directory path, not {obj_desc(dir)}.")
  }
  if (!dir.exists(dir)) {
    fedagg_abort(c("{.arg dir} ({.path {dir}}) is not a directory.",
                   i = "On Debian: {.code apt-get install dataset-fashion-mnist}."))
  }
  normalize <- assert_flag(normalize)
  find <- function(stem) {
    candidates <- file.path(dir, paste0(stem, c("", ".gz")))
    hit <- candidates[file.exists(candidates)]
    if (!length(hit)) {
      fedagg_abort(c("Cannot find {.file {stem}} (or {.file {stem}.gz}) in {.path {dir}}.",
                     i = "On Debian: {.code apt-get install dataset-fashion-mnist}."))
    }
    hit[1]
  }
  classes <- c("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
               "Bag", "Ankle boot")
  split <- function(prefix) {
    images <- read_idx(find(paste0(prefix, "-images-idx3-ubyte")))
    labels <- read_idx(find(paste0(prefix, "-labels-idx1-ubyte")))
    n <- dim(images)[1]
    if (length(dim(images)) != 3L) fedagg_abort("{prefix}: the images file must hold n x rows x cols values.")
    if (length(labels) != n) fedagg_abort("{prefix}: {n} images but {length(labels)} labels.")
    bad <- which(is.na(labels) | labels < 0 | labels > 9)
    if (length(bad)) {
      fedagg_abort("{prefix}: label {labels[bad[1]]} of image {bad[1]} is not a class code 0..9.")
    }
    # Row i = image i with pixels in reading order (row by row).
    x <- matrix(aperm(images, c(1, 3, 2)), n)
    storage.mode(x) <- "double"
    if (normalize) x <- x / 255
    list(x = x, y = factor(classes[labels + 1L], levels = classes))
  }
  list(train = split("train"), test = split("t10k"))
}
