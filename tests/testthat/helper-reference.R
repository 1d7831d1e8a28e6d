# Plain-R reference implementations: slow, obvious, and independent of the
# Rust code they check.

as_client_matrix <- function(updates) {
  if (is.matrix(updates)) return(updates)
  if (is.list(updates[[1]])) {
    return(sapply(updates, function(u) unlist(lapply(u, as.vector), use.names = FALSE)))
  }
  sapply(updates, as.vector)
}

ref_weighted_mean <- function(updates, weights = NULL) {
  m <- as_client_matrix(updates)
  w <- if (is.null(weights)) rep(1, ncol(m)) else weights
  w <- w / sum(w)
  out <- numeric(nrow(m))
  for (k in seq_len(ncol(m))) out <- out + w[k] * m[, k]
  out
}

ref_median <- function(updates) apply(as_client_matrix(updates), 1, stats::median)

ref_trimmed_mean <- function(updates, trim) apply(as_client_matrix(updates), 1, mean, trim = trim)

ref_krum_scores <- function(updates, f) {
  m <- as_client_matrix(updates)
  k <- ncol(m)
  d2 <- as.matrix(stats::dist(t(m)))^2
  vapply(seq_len(k), function(i) sum(sort(d2[i, -i])[seq_len(k - f - 2)]), numeric(1))
}

ref_multi_krum <- function(updates, f, m_keep, weights = NULL) {
  scores <- ref_krum_scores(updates, f)
  keep <- order(scores, seq_along(scores))[seq_len(m_keep)]
  w <- if (is.null(weights)) rep(1, length(scores)) else weights
  list(value = ref_weighted_mean(as_client_matrix(updates)[, keep, drop = FALSE], w[keep]),
       selected = keep, scores = scores)
}

ref_geometric_median <- function(updates, weights = NULL, tol = 1e-10, max_iter = 1000) {
  m <- as_client_matrix(updates)
  w <- if (is.null(weights)) rep(1, ncol(m)) else weights
  w <- w / sum(w)
  z <- drop(m %*% w)
  dist <- sqrt(colSums((m - z)^2))
  obj <- sum(w * dist)
  for (i in seq_len(max_iter)) {
    beta <- w / pmax(dist, 1e-10)
    z <- drop(m %*% (beta / sum(beta)))
    dist <- sqrt(colSums((m - z)^2))
    new <- sum(w * dist)
    done <- abs(obj - new) <= tol * new
    obj <- new
    if (done) break
  }
  z
}

# Random client updates in the three accepted shapes, from one set of numbers.
random_updates <- function(k, seed, shape = c("list", "matrix", "layers")) {
  shape <- match.arg(shape)
  set.seed(seed)
  layers <- function() list(W = matrix(rnorm(12), 3, 4), b = rnorm(4), scale = rnorm(1))
  switch(shape,
    list = replicate(k, rnorm(37), simplify = FALSE),
    matrix = matrix(rnorm(37 * k), 37, k),
    layers = replicate(k, layers(), simplify = FALSE)
  )
}

flatten_update <- function(u) if (is.list(u)) unlist(lapply(u, as.vector), use.names = FALSE) else as.vector(u)
