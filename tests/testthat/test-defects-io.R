# Regression tests for four input/output defects: the shortest paths of a
# link table, memory refusals under a process limit (ulimit -v), corrupt
# gzip IDX files, and absurd drift-monitor windows.

# ---- 1. topology_links(): shortest paths --------------------------------

# The O(V^2) Dijkstra topology_links() used to run, kept as the reference:
# the open place with the least latency settles next, fewest hops on ties,
# then the first by name (order() on the names); a link relaxes only on a
# strict improvement, links taken in table order.
reference_link_paths <- function(links, root) {
  from <- as.character(links$from)
  to <- as.character(links$to)
  lat <- links$latency
  bw <- links$bandwidth
  places <- unique(c(from, to))
  dist <- stats::setNames(rep(Inf, length(places)), places)
  hops <- stats::setNames(rep(Inf, length(places)), places)
  inv_bw <- stats::setNames(rep(Inf, length(places)), places)
  dist[root] <- 0; hops[root] <- 0; inv_bw[root] <- 0
  done <- stats::setNames(rep(FALSE, length(places)), places)
  repeat {
    open <- places[!done & is.finite(dist)]
    if (!length(open)) break
    here <- open[order(dist[open], hops[open], open)[1]]
    done[here] <- TRUE
    for (i in which(from == here | to == here)) {
      there <- if (from[i] == here) to[i] else from[i]
      d <- dist[here] + lat[i]
      h <- hops[here] + 1
      if (!done[there] && (d < dist[there] || (d == dist[there] && h < hops[there]))) {
        dist[there] <- d; hops[there] <- h; inv_bw[there] <- inv_bw[here] + 1 / bw[i]
      }
    }
  }
  list(latency = dist, inverse_bandwidth = inv_bw)
}

test_that("topology_links() finds the same paths as the O(V^2) reference, ties included", {
  set.seed(42)
  # Mixed case and digits, so the name order (the last tie-break) matters.
  pool <- c("server", "a", "B", "b", "A", "r1", "R2", "r10", "n_1", "n-2", "z", "Zed", "m", "M")
  for (trial in 1:300) {
    n_places <- sample(2:length(pool), 1)
    places <- c("server", sample(pool[-1], n_places - 1))
    n_links <- sample(1:(3 * n_places), 1)
    ends <- t(replicate(n_links, sample(places, 2)))
    # Few distinct latencies and bandwidths: many equal-latency paths, equal
    # hop counts, parallel links, and inverse bandwidths that tell them apart.
    lat <- sample(c(0, 0.1, 0.2, 0.3, 1, 1), n_links, replace = TRUE)
    if (trial %% 50 == 0) lat[1] <- 1e308 # sums that overflow to Inf
    links <- data.frame(from = ends[, 1], to = ends[, 2], latency = lat,
                        bandwidth = sample(c(1, 2, 3, 10, 1e6), n_links, replace = TRUE))
    if (!"server" %in% c(links$from, links$to)) links$to[1] <- "server"
    links <- links[links$from != links$to, , drop = FALSE]
    if (!nrow(links)) next
    ours <- topology_links(links)
    ref <- reference_link_paths(links, "server")
    expect_identical(ours$latency, ref$latency, info = paste("trial", trial))
    expect_identical(ours$inverse_bandwidth, ref$inverse_bandwidth, info = paste("trial", trial))
  }
  # Another root, and factors for the ends.
  links <- data.frame(from = factor(c("x", "y", "x", "w")), to = factor(c("y", "z", "z", "z")),
                      latency = c(1, 1, 2, 0), bandwidth = c(1, 2, 4, 8))
  expect_identical(topology_links(links, root = "z")[c("latency", "inverse_bandwidth")],
                   reference_link_paths(links, "z"))
})

test_that("topology_links() handles 10,001-link chains and stars", {
  set.seed(7)
  n <- 10001L
  # A chain server - p1 - p2 - ... - p10001 with names in shuffled order:
  # each place's path is the chain before it, so its latency is a cumulative
  # sum and its hop count (with unit latencies) its position.
  names <- sprintf("p%05d", sample(n))
  lat <- runif(n)
  bw <- runif(n, 1, 100)
  chain <- data.frame(from = c("server", names[-n]), to = names, latency = lat, bandwidth = bw)
  chain <- chain[sample(n), ] # table order must not matter
  top <- topology_links(chain)
  expect_equal(unname(top$latency[names]), cumsum(lat), tolerance = 1e-12)
  expect_equal(unname(top$inverse_bandwidth[names]), cumsum(1 / bw), tolerance = 1e-12)
  expect_identical(unname(top$latency["server"]), 0)
  unit <- transform(chain, latency = 1)
  expect_identical(unname(topology_links(unit)$latency[names]), as.double(seq_len(n)))

  # A star: every leaf has its own link to the root, plus a second path
  # through a hub that ties on latency but takes more hops (so it loses).
  leaves <- sprintf("leaf%05d", seq_len(n - 1L))
  star <- data.frame(from = c(leaves, "hub"), to = c(rep("server", n - 1L), "server"),
                     latency = c(rep(2, n - 1L), 1), bandwidth = c(rep(10, n - 1L), 1))
  star <- rbind(star, data.frame(from = leaves[1:100], to = "hub", latency = 1, bandwidth = 1000))
  top <- topology_links(star)
  expect_identical(unname(top$latency[leaves]), rep(2, n - 1L))
  expect_identical(unname(top$inverse_bandwidth[leaves]), rep(0.1, n - 1L))
  expect_identical(unname(top$inverse_bandwidth["hub"]), 1)
})

# ---- 2. memory refusals under the process's own limit --------------------

test_that("memory refusals count the process's address-space limit (ulimit -v)", {
  skip_on_cran()
  skip_on_os(c("windows", "mac", "solaris"))
  bash <- Sys.which("bash")
  skip_if(!nzchar(bash), "needs bash for ulimit")
  limit_kib <- 2000000L # about 1.9 GiB
  probe <- suppressWarnings(system2(bash, c("-c", shQuote(sprintf("ulimit -v %d && ulimit -v", limit_kib))),
                                    stdout = TRUE, stderr = TRUE))
  skip_if(!is.null(attr(probe, "status")) || !identical(trimws(probe), sprintf("%d", limit_kib)),
          "ulimit -v cannot be set here")
  script <- tempfile(fileext = ".R")
  out <- tempfile(fileext = ".rds")
  # synthetic_fedprox() checks 32 bytes per client before allocating: 1e8
  # clients ask for 3.2 GB, more than the limit allows.
  writeLines(c(
    "library(fedagg)",
    "e <- tryCatch({ synthetic_fedprox(1, 1, n_clients = 1e8); NULL }, error = identity)",
    sprintf("saveRDS(list(class = class(e), message = if (!is.null(e)) conditionMessage(e)), %s)", deparse(out))
  ), script)
  rscript <- file.path(R.home("bin"), "Rscript")
  command <- sprintf("ulimit -v %d && exec %s --vanilla %s", limit_kib, shQuote(rscript), shQuote(script))
  libs <- paste(.libPaths(), collapse = .Platform$path.sep)
  log <- suppressWarnings(system2(bash, c("-c", shQuote(command)), stdout = TRUE, stderr = TRUE,
                                  env = paste0("R_LIBS=", shQuote(libs))))
  skip_if(!file.exists(out), paste(c("R did not run under the limit:", log), collapse = "\n"))
  res <- readRDS(out)
  expect_true("fedagg_error_memory" %in% res$class, info = paste(res$class, res$message))
  # "... needs 3.0 GiB (3200000000 bytes) but only 1.8 GiB (N bytes) are available"
  counts <- as.numeric(regmatches(res$message, gregexpr("[0-9]+(?=\\s+bytes\\))", res$message, perl = TRUE))[[1]])
  expect_length(counts, 2L)
  expect_identical(counts[1], 3.2e9)
  expect_lte(counts[2], limit_kib * 1024)
  expect_match(res$message, "available")
})

# ---- 3. read_idx() on corrupt or truncated files -------------------------

write_idx_bytes <- function(path, values, dims, gz = FALSE) {
  con <- if (gz) gzfile(path, "wb") else file(path, "wb")
  on.exit(close(con))
  writeBin(as.raw(c(0, 0, 0x08, length(dims))), con)
  writeBin(as.integer(dims), con, size = 4, endian = "big")
  writeBin(as.raw(values), con)
}

expect_corrupt_idx <- function(bytes, label) {
  f <- tempfile(fileext = ".gz")
  writeBin(bytes, f)
  # No warnings on the way either: they become the classed error.
  err <- tryCatch(read_idx(f), error = identity, warning = identity)
  expect_s3_class(err, "fedagg_error_input")
  # Raised once: a connection's condition may be the cause, not a fedagg error.
  expect_false(inherits(err$parent, "fedagg_error"))
  msg <- conditionMessage(err)
  expect_true(grepl(basename(f), msg, fixed = TRUE), info = paste(label, msg))
  expect_match(msg, "corrupt|truncated", info = label)
}

test_that("read_idx() calls a corrupt or truncated gzip file a classed input error naming it", {
  set.seed(3)
  values <- sample(0:255, 6000, replace = TRUE)
  f <- tempfile(fileext = ".gz")
  write_idx_bytes(f, values, c(60, 100), gz = TRUE)
  expect_identical(read_idx(f), matrix(values, 60, 100, byrow = TRUE))
  bytes <- readBin(f, "raw", file.size(f))
  n <- length(bytes)
  # Truncated: in the deflate data, and inside the 8-byte gzip trailer.
  for (keep in c(n %/% 2, n - 4L, n - 8L, 40L)) expect_corrupt_idx(bytes[seq_len(keep)], paste("first", keep, "bytes"))
  # Bytes flipped in the middle of the stream, and in the CRC.
  for (at in c(30L, n %/% 3, n %/% 2, n - 20L, n - 6L)) {
    bad <- bytes
    span <- at:min(at + 15L, n)
    bad[span] <- xor(bad[span], as.raw(0xff))
    expect_corrupt_idx(bad, paste("flipped at", at))
  }
})

test_that("read_idx() calls a truncated plain file a classed input error naming it", {
  f <- tempfile()
  write_idx_bytes(f, 1:200, c(10, 20))
  expect_identical(read_idx(f), matrix(1:200, 10, 20, byrow = TRUE))
  bytes <- readBin(f, "raw", file.size(f))
  for (keep in c(150L, 13L, 9L)) {
    g <- tempfile()
    writeBin(bytes[seq_len(keep)], g)
    err <- tryCatch(read_idx(g), error = identity)
    expect_s3_class(err, "fedagg_error_input")
    expect_true(grepl(basename(g), conditionMessage(err), fixed = TRUE))
    expect_match(conditionMessage(err), "corrupt|truncated")
  }
})

# ---- 4. monitor_drift() with absurd windows and starts --------------------

test_that("monitor_drift() refuses a window or start beyond its bound, naming it", {
  err <- tryCatch(monitor_drift(window = 1.5e9), error = identity, warning = identity)
  expect_s3_class(err, "fedagg_error_input")
  expect_match(conditionMessage(err), "window")
  expect_error(monitor_drift(window = 5e8 + 1), class = "fedagg_error_input", regexp = "window")
  err <- tryCatch(monitor_drift(window = 1.5e9, start = 2e9), error = identity, warning = identity)
  expect_s3_class(err, "fedagg_error_input")
  expect_match(conditionMessage(err), "window")
  expect_error(monitor_drift(window = 5, start = 1.5e9), class = "fedagg_error_input", regexp = "start")
  expect_error(monitor_drift(window = 5, start = 1e9 + 1), class = "fedagg_error_input", regexp = "start")
  # At the bounds, the monitor is built and rounds run (its tests never start).
  big <- expect_no_warning(monitor_drift(window = 5e8))
  expect_identical(big$start, 1000000000L)
  expect_identical(monitor_drift(window = 5, start = 1e9)$start, 1000000000L)
  d <- synthetic_fedprox(1, 1, n_clients = 4, seed = 1)
  srv <- fed_server(model_softmax(60, 10), fed_nodes(d), fraction = 1, lr = 0.05, seed = 1, monitor = big)
  h <- srv$fit(2, verbose = FALSE)
  expect_identical(h$drift_alerts, c(0, 0))
})
