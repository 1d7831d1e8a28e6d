#' Split a data set among federated clients
#'
#' Reproducible ways to deal `n` samples out to `n_clients` clients, from
#' identically distributed to strongly non-IID. Non-IID data is the main
#' reason federated models converge slowly; these let you dial it in.
#'
#' * `partition_iid()`: a random permutation cut into (near) equal parts.
#' * `partition_dirichlet()`: label skew. For every class, the share of each
#'   client is drawn from Dirichlet(`alpha`); a client that already holds
#'   `n / n_clients` samples gets no more. Redrawn until every client has at
#'   least `min_size` samples. Small `alpha` (0.1) gives clients few classes;
#'   large `alpha` (100) is close to IID.
#' * `partition_shards()`: pathological label skew (McMahan et al. 2017): sort
#'   by label, cut into `n_clients * shards_per_client` equal shards, give each
#'   client `shards_per_client` random shards.
#' * `partition_quantity()`: quantity skew. Client sizes follow a log-normal
#'   (`sdlog`) or Pareto (`shape`) distribution, samples are assigned at random.
#'
#' @param n Number of samples.
#' @param y Labels (vector or factor), one per sample.
#' @param n_clients Number of clients, at least 1.
#' @param alpha Dirichlet concentration, > 0.
#' @param min_size Minimum number of samples per client.
#' @param max_tries For `partition_dirichlet()`: how many draws to try before
#'   giving up on `min_size`.
#' @param shards_per_client Shards per client.
#' @param distribution For `partition_quantity()`: `"lognormal"` or `"powerlaw"`.
#' @param sdlog Log-normal standard deviation of client sizes (log scale).
#' @param shape Pareto shape of client sizes (smaller is more skewed).
#' @param seed `NULL` to use R's random number generator as it is, or a
#'   number: the partition is then the same on every call, and the global
#'   random state is left untouched.
#' @return A `fed_partition`: a list of integer index vectors, one per client,
#'   holding every index in `seq_len(n)` exactly once. It has `print()`,
#'   `summary()` (per-client size and label counts) and `plot()` methods.
#' @family partitions
#' @export
#' @examples
#' y <- rep(1:10, each = 60)
#' p <- partition_dirichlet(y, n_clients = 8, alpha = 0.3, seed = 1)
#' p
#' summary(p)
#' plot(p)
#'
#' partition_iid(600, 8, seed = 1)
#' summary(partition_shards(y, 10, shards_per_client = 2, seed = 1))
#' partition_quantity(600, 8, sdlog = 1.5, seed = 1)
partition_iid <- function(n, n_clients, seed = NULL) {
  check_required_args()
  n <- assert_count(n, min = 1L)
  check_memory(16 * n, sprintf("a partition of %d samples", n))
  n_clients <- assert_n_clients(n_clients, n)
  idx <- with_seed(seed, sample.int(n))
  parts <- split(idx, cut_equal(n, n_clients))
  new_fed_partition(parts, y = NULL, method = "iid", params = list())
}

#' @rdname partition_iid
#' @export
partition_dirichlet <- function(y, n_clients, alpha, min_size = 10, seed = NULL, max_tries = 1000) {
  check_required_args()
  y <- assert_labels(y)
  n <- length(y)
  n_clients <- assert_n_clients(n_clients, n)
  alpha <- assert_number(alpha, 0, lower_open = TRUE)
  min_size <- assert_count(min_size, min = 0L)
  max_tries <- assert_count(max_tries, min = 1L)
  if (min_size * n_clients > n) {
    fedagg_abort("{.arg min_size} = {min_size} for {n_clients} clients needs {min_size * n_clients} samples; there are {n}.")
  }
  by_class <- split(seq_len(n), y)
  cap <- n / n_clients
  best_min <- 0L
  parts <- with_seed(seed, {
    result <- NULL
    for (try in seq_len(max_tries)) {
      parts <- rep(list(integer(0)), n_clients)
      for (idx in by_class) {
        idx <- idx[sample.int(length(idx))]
        p <- stats::rgamma(n_clients, shape = alpha)
        p <- p * (lengths(parts) < cap)      # full clients get no more
        if (sum(p) <= 0) p <- as.double(lengths(parts) < cap)
        if (sum(p) <= 0) p <- rep(1, n_clients)
        cuts <- floor(cumsum(p / sum(p)) * length(idx))
        cuts[n_clients] <- length(idx)
        from <- c(0, cuts[-n_clients])
        for (k in seq_len(n_clients)) {
          if (cuts[k] > from[k]) parts[[k]] <- c(parts[[k]], idx[(from[k] + 1):cuts[k]])
        }
      }
      best_min <- max(best_min, min(lengths(parts)))
      if (min(lengths(parts)) >= min_size) {
        result <- parts
        break
      }
    }
    result
  })
  if (is.null(parts)) {
    n_classes <- length(by_class)
    fedagg_abort(c("Could not give every client {.arg min_size} = {min_size} samples in {max_tries} draws.",
                   x = "With {n_classes} class{?es} and {.arg alpha} = {alpha}, the best draw gave its smallest client {best_min} sample{?s}.",
                   i = if (best_min > 0) "Use a larger {.arg alpha} (e.g. {format(alpha * 5)}), a smaller {.arg min_size} (e.g. {best_min}), or fewer than {n_clients} clients."
                       else "Use a larger {.arg alpha} (e.g. {format(alpha * 5)}) or fewer than {n_clients} clients."))
  }
  new_fed_partition(lapply(parts, sort), y = y, method = "dirichlet", params = list(alpha = alpha))
}

#' @rdname partition_iid
#' @export
partition_shards <- function(y, n_clients, shards_per_client = 2, seed = NULL) {
  check_required_args()
  y <- assert_labels(y)
  n <- length(y)
  shards_per_client <- assert_count(shards_per_client, min = 1L)
  n_clients <- assert_n_clients(n_clients, n)
  n_shards <- n_clients * shards_per_client
  if (n_shards > n) {
    fedagg_abort("{n_clients} clients x {shards_per_client} shards = {n_shards} shards, more than the {n} samples.")
  }
  parts <- with_seed(seed, {
    sorted <- order(y, stats::runif(n))         # by label, random within a label
    shards <- split(sorted, cut_equal(n, n_shards))
    owner <- rep(seq_len(n_clients), each = shards_per_client)[sample.int(n_shards)]
    lapply(seq_len(n_clients), function(k) sort(unlist(shards[owner == k], use.names = FALSE)))
  })
  new_fed_partition(parts, y = y, method = "shards", params = list(shards_per_client = shards_per_client))
}

#' @rdname partition_iid
#' @export
partition_quantity <- function(n, n_clients, distribution = c("lognormal", "powerlaw"), sdlog = 1,
                               shape = 1.5, min_size = 1, seed = NULL) {
  check_required_args()
  n <- assert_count(n, min = 1L)
  check_memory(16 * n, sprintf("a partition of %d samples", n))
  n_clients <- assert_n_clients(n_clients, n)
  distribution <- assert_choice(distribution, c("lognormal", "powerlaw"))
  sdlog <- assert_number(sdlog, 0)
  shape <- assert_number(shape, 0, lower_open = TRUE)
  min_size <- assert_count(min_size, min = 0L)
  if (min_size * n_clients > n) {
    fedagg_abort("{.arg min_size} = {min_size} for {n_clients} clients needs {min_size * n_clients} samples; there are {n}.")
  }
  parts <- with_seed(seed, {
    # Log-scale weights, shifted before exp(): extreme sdlog or shape
    # would overflow rlnorm() or u^(-1 / shape) to Inf.
    log_w <- switch(distribution,
      lognormal = stats::rnorm(n_clients, 0, sdlog),
      powerlaw = -log(stats::runif(n_clients)) / shape
    )
    # With a vanishing Pareto shape the largest draw takes everything.
    w <- if (all(is.finite(log_w))) exp(log_w - max(log_w)) else as.double(log_w == max(log_w))
    spare <- n - min_size * n_clients
    sizes <- min_size + floor(w / sum(w) * spare)
    left <- n - sum(sizes)
    # Hand out what rounding left over to the largest clients first.
    if (left > 0) {
      top <- order(-w)[seq_len(left) %% n_clients + 1L]
      sizes <- sizes + tabulate(top, n_clients)
    }
    split(sample.int(n), rep(seq_len(n_clients), sizes))
  })
  parts <- lapply(seq_len(n_clients), function(k) sort(parts[[as.character(k)]] %||% integer(0)))
  new_fed_partition(parts, y = NULL, method = "quantity", params = list(distribution = distribution))
}

# Groups 1..n into `k` consecutive runs whose sizes differ by at most one.
cut_equal <- function(n, k) rep(seq_len(k), diff(floor(seq(0, n, length.out = k + 1))))

# Runs `expr` with R's default generators seeded by `seed`, whatever kind
# the session uses (future.apply's L'Ecuyer-CMRG streams, RNGkind()): the
# same seed gives the same draws everywhere. The session's kinds and state
# are restored afterwards.
with_seed <- function(seed, expr) {
  if (is.null(seed)) return(expr)
  seed <- assert_count(seed, min = 0L, arg = "seed")
  had_seed <- exists(".Random.seed", envir = globalenv(), inherits = FALSE)
  if (had_seed) old <- get(".Random.seed", envir = globalenv())
  # .Random.seed[1] codes the three kinds; 10403 is R's defaults
  # (Mersenne-Twister, Inversion, Rejection). The common case skips
  # RNGkind(), which a round calls through here more than once.
  default_kinds <- had_seed && identical(old[1], 10403L)
  if (!default_kinds) kinds <- RNGkind()
  on.exit({
    if (!default_kinds) RNGkind(kinds[1], kinds[2], kinds[3])
    if (had_seed) assign(".Random.seed", old, envir = globalenv())
    else if (exists(".Random.seed", envir = globalenv(), inherits = FALSE)) rm(".Random.seed", envir = globalenv())
  }, add = TRUE)
  if (default_kinds) set.seed(seed) else set.seed(seed, kind = "Mersenne-Twister", normal.kind = "Inversion", sample.kind = "Rejection")
  expr
}

assert_n_clients <- function(n_clients, n, arg = rlang::caller_arg(n_clients), call = rlang::caller_env()) {
  force(arg)
  n_clients <- assert_count(n_clients, min = 1L, arg = arg, call = call)
  if (n_clients > n) {
    fedagg_abort("{.arg {arg}} = {n_clients} is more than the {n} samples: some clients would be empty.",
                 call = call)
  }
  n_clients
}

assert_labels <- function(y, arg = rlang::caller_arg(y), call = rlang::caller_env()) {
  force(arg)
  if (!(is.atomic(y) || is.factor(y)) || length(y) == 0L) {
    fedagg_abort("{.arg {arg}} must be a non-empty vector of labels, not {obj_desc(y)}.", call = call)
  }
  if (anyNA(y)) {
    fedagg_abort("{.arg {arg}} must not contain missing labels; sample {which(is.na(y))[1]} is NA.", call = call)
  }
  y
}

new_fed_partition <- function(parts, y, method, params) {
  names(parts) <- paste0("client", seq_along(parts))
  parts <- lapply(parts, as.integer)
  structure(parts, class = "fed_partition", labels = y, method = method, params = params)
}

#' @export
format.fed_partition <- function(x, ...) {
  sizes <- lengths(x)
  params <- attr(x, "params")
  detail <- if (length(params)) paste0(" (", paste(names(params), unlist(params), sep = " = ", collapse = ", "), ")") else ""
  c(sprintf("<fed_partition> %s%s: %d samples over %d clients", attr(x, "method"), detail, sum(sizes), length(x)),
    sprintf("client sizes: min %d, median %s, max %d", min(sizes), format(stats::median(sizes)), max(sizes)))
}

#' @export
print.fed_partition <- function(x, ...) {
  cat(format(x), sep = "\n")
  invisible(x)
}

#' @export
summary.fed_partition <- function(object, ...) {
  out <- data.frame(client = names(object), n = lengths(object), stringsAsFactors = FALSE)
  y <- attr(object, "labels")
  if (!is.null(y)) {
    levels <- if (is.factor(y)) levels(y) else sort(unique(y))
    counts <- t(vapply(object, function(idx) as.vector(table(factor(y[idx], levels = levels))),
                       numeric(length(levels))))
    colnames(counts) <- paste0("label_", levels)
    out$n_labels <- rowSums(counts > 0)
    out <- cbind(out, as.data.frame(counts))
  }
  rownames(out) <- NULL
  out
}

#' @export
plot.fed_partition <- function(x, ...) {
  s <- summary(x)
  label_cols <- grep("^label_", names(s), value = TRUE)
  if (length(label_cols)) {
    counts <- t(as.matrix(s[label_cols]))
    graphics::barplot(counts, names.arg = seq_len(ncol(counts)), col = grDevices::hcl.colors(nrow(counts), "Dark 3"),
                      xlab = "client", ylab = "samples", border = NA,
                      ylim = c(0, 1.3 * max(colSums(counts))), # room for the legend
                      main = paste("Label distribution per client:", attr(x, "method")),
                      legend.text = sub("^label_", "", label_cols),
                      args.legend = list(x = "topright", bty = "n", cex = 0.7, ncol = 2), ...)
  } else {
    graphics::barplot(s$n, names.arg = seq_len(nrow(s)), xlab = "client", ylab = "samples", border = NA,
                      col = "#2c7fb8", main = paste("Samples per client:", attr(x, "method")), ...)
  }
  invisible(x)
}
