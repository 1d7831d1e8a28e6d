# Plain-R reference implementations of the built-in models and of local SGD,
# written independently of the Rust core (matrix algebra, no loops over rows).

ref_forward <- function(params, x, output) {
  n_layers <- length(params) / 2
  a <- x
  acts <- list(x)
  for (l in seq_len(n_layers)) {
    z <- sweep(a %*% params[[paste0("W", l)]], 2, params[[paste0("b", l)]], `+`)
    a <- if (l < n_layers) pmax(z, 0) else z
    acts[[l + 1]] <- a
  }
  list(out = a, acts = acts)
}

ref_loss <- function(params, x, y, output) {
  z <- ref_forward(params, x, output)$out
  switch(output,
    linear = mean((z[, 1] - y)^2),
    logistic = mean(log1p(exp(-abs(z[, 1]))) + pmax(z[, 1], 0) - y * z[, 1]),
    softmax = {
      m <- apply(z, 1, max)
      lse <- m + log(rowSums(exp(z - m)))
      mean(lse - z[cbind(seq_along(y), y + 1)])
    })
}

# Backpropagation with matrices.
ref_grad <- function(params, x, y, output) {
  n_layers <- length(params) / 2
  fw <- ref_forward(params, x, output)
  z <- fw$out
  n <- nrow(x)
  delta <- switch(output,
    linear = matrix(2 * (z[, 1] - y), n),
    logistic = matrix(1 / (1 + exp(-z[, 1])) - y, n),
    softmax = {
      p <- exp(z - apply(z, 1, max))
      p <- p / rowSums(p)
      p[cbind(seq_len(n), y + 1)] <- p[cbind(seq_len(n), y + 1)] - 1
      p
    }) / n
  grad <- params
  for (l in n_layers:1) {
    a_prev <- fw$acts[[l]]
    grad[[paste0("W", l)]] <- crossprod(a_prev, delta)
    grad[[paste0("b", l)]] <- colSums(delta)
    if (l > 1) delta <- (delta %*% t(params[[paste0("W", l)]])) * (a_prev > 0)
  }
  grad
}

ref_numeric_grad <- function(params, x, y, output, h = 1e-6) {
  flat <- unlist(params)
  g <- vapply(seq_along(flat), function(k) {
    up <- flat; up[k] <- up[k] + h
    dn <- flat; dn[k] <- dn[k] - h
    (ref_loss(relist_params(up, params), x, y, output) - ref_loss(relist_params(dn, params), x, y, output)) / (2 * h)
  }, numeric(1))
  g
}

relist_params <- function(flat, template) {
  at <- 0
  out <- lapply(template, function(l) {
    v <- flat[at + seq_along(l)]
    at <<- at + length(l)
    if (!is.null(dim(l))) dim(v) <- dim(l)
    v
  })
  names(out) <- names(template)
  out
}

# Minibatch SGD in sample order (no shuffling), with weight decay and momentum.
ref_sgd <- function(params, x, y, output, epochs, batch, lr, weight_decay = 0, momentum = 0) {
  flat <- unlist(params, use.names = FALSE)
  v <- numeric(length(flat))
  n <- nrow(x)
  batch <- min(batch, n)
  for (e in seq_len(epochs)) {
    for (start in seq(1, n, by = batch)) {
      rows <- start:min(start + batch - 1, n)
      g <- unlist(ref_grad(relist_params(flat, params), x[rows, , drop = FALSE], y[rows], output),
                  use.names = FALSE) + weight_decay * flat
      v <- momentum * v + g
      flat <- flat - lr * v
    }
  }
  relist_params(flat, params)
}

# A small classification problem with a clear signal.
toy_classes <- function(n, p = 4, k = 3, seed = 1) {
  withr::with_seed(seed, {
    y <- sample.int(k, n, replace = TRUE) - 1L
    centers <- matrix(rnorm(k * p, sd = 1.5), k, p)
    x <- centers[y + 1, , drop = FALSE] + matrix(rnorm(n * p), n, p)
    list(x = x, y = y)
  })
}

random_params <- function(model, seed) {
  p <- init_params(model, seed)
  withr::with_seed(seed, lapply(p, function(l) l + 0.3 * rnorm(length(l))))
}

`%||%` <- function(a, b) if (is.null(a)) b else a
