# Systems simulation against plain-R references: the simulated clock of a
# synchronous star round (profiles, deadlines, partial work, over-selection,
# dropouts), the bytes on the wire, and the compressors (top-k with error
# feedback, random-k, QSGD, float16).

# --- Compressors -----------------------------------------------------------------

# Plain-R references written from the definitions; random ones replay the
# Rust stream's draws (rs_compress_draws) for the same seed.
ref_topk <- function(v, fraction, residual = NULL) {
  if (!is.null(residual)) v <- v + residual
  d <- length(v)
  k <- min(d, max(1, ceiling(fraction * d)))
  keep <- order(-abs(v), seq_len(d))[seq_len(k)]
  decoded <- numeric(d)
  decoded[keep] <- v[keep]
  list(decoded = decoded, residual = v - decoded, bytes = 12 * k)
}

ref_random_k <- function(v, fraction, seed) {
  d <- length(v)
  k <- min(d, max(1, ceiling(fraction * d)))
  draws <- fedagg:::rs_compress_draws(seed, 0, as.double(d - seq_len(k) + 1))
  perm <- seq_len(d)
  for (i in seq_len(k)) {
    j <- i + draws[i]
    tmp <- perm[i]; perm[i] <- perm[j]; perm[j] <- tmp
  }
  decoded <- numeric(d)
  decoded[perm[seq_len(k)]] <- v[perm[seq_len(k)]] * d / k
  list(decoded = decoded, bytes = 12 * k)
}

ref_qsgd <- function(v, bits, stochastic, seed) {
  s <- 2^bits - 1
  norm <- sqrt(sum(v^2))
  r <- if (norm > 0) abs(v) / norm * s else numeric(length(v))
  l <- floor(r)
  level <- if (stochastic) l + (fedagg:::rs_compress_draws(seed, length(v), NULL) < r - l) else l + (r - l >= 0.5)
  list(decoded = sign(v) * norm * level / s, bytes = 8 + ceiling(length(v) * (bits + 1) / 8))
}

test_that("top-k with error feedback matches plain R over rounds, and sends everything eventually", {
  set.seed(1)
  updates <- lapply(1:6, function(i) rnorm(37))
  residual <- NULL
  ref_residual <- NULL
  sent <- 0
  for (u in updates) {
    out <- compress_update(u, compress_topk(0.1), residual = residual)
    ref <- ref_topk(u, 0.1, ref_residual)
    expect_identical(out$decoded, ref$decoded)
    expect_equal(out$residual, ref$residual, tolerance = 1e-15)
    expect_identical(out$bytes, ref$bytes)
    residual <- out$residual
    ref_residual <- ref$residual
    sent <- sent + out$decoded
  }
  # Error feedback loses nothing: what was sent plus what is left is all.
  expect_equal(sent + residual, Reduce(`+`, updates), tolerance = 1e-12)
  # Without error feedback there is no residual and nothing is added.
  plain <- compress_update(updates[[1]], compress_topk(0.1, error_feedback = FALSE), residual = rnorm(37))
  expect_null(plain$residual)
  expect_identical(plain$decoded, ref_topk(updates[[1]], 0.1)$decoded)
})

test_that("random-k and stochastic quantisation match plain R draw for draw, and are unbiased", {
  set.seed(2)
  v <- rnorm(50) * 3
  for (seed in c(1, 7, 123)) {
    out <- compress_update(v, compress_random_k(0.2), seed = seed)
    ref <- ref_random_k(v, 0.2, seed)
    expect_equal(out$decoded, ref$decoded, tolerance = 1e-15)
    expect_identical(out$bytes, ref$bytes)
    expect_identical(sum(out$decoded != 0), 10L)
    for (bits in c(1, 2, 8)) {
      q <- compress_update(v, compress_quantize(bits), seed = seed)
      qr <- ref_qsgd(v, bits, TRUE, seed)
      expect_equal(q$decoded, qr$decoded, tolerance = 1e-12)
      expect_identical(q$bytes, qr$bytes)
    }
  }
  nearest <- compress_update(v, compress_quantize(4, stochastic = FALSE))
  expect_equal(nearest$decoded, ref_qsgd(v, 4, FALSE, 1)$decoded, tolerance = 1e-12)
  # Unbiased: the mean of many decodings approaches the update, within five
  # standard errors computed from each coordinate's own spread.
  for (comp in list(compress_random_k(0.2), compress_quantize(2))) {
    draws <- vapply(1:3000, function(s) compress_update(v, comp, seed = s)$decoded, numeric(50))
    se <- apply(draws, 1, stats::sd) / sqrt(ncol(draws))
    expect_true(all(abs(rowMeans(draws) - v) <= 5 * se + 1e-12))
  }
  # Top-k is biased, and the mean shows it.
  expect_false(isTRUE(all.equal(compress_update(v, compress_topk(0.2))$decoded, v)))
})

test_that("float16 rounds to nearest even, and bytes follow the formulas", {
  x <- c(1, 65504, 2^-24, 2^-25, 1 + 2^-11, 1 + 3 * 2^-11, -0.1, 0)
  out <- compress_update(x, compress_float16())
  expect_identical(out$decoded, c(1, 65504, 2^-24, 0, 1, 1 + 2^-9, -0.0999755859375, 0))
  expect_identical(out$bytes, 2 * length(x))
  for (d in c(1, 10, 1000, 123457)) {
    expect_identical(compress_topk(0.01)$bytes(d), 12 * min(d, max(1, ceiling(0.01 * d))))
    expect_identical(compress_quantize(8)$bytes(d), 8 + ceiling(d * 9 / 8))
    expect_identical(compress_float16()$bytes(d), 2 * d)
    # The R formulas are the Rust encoder's.
    for (comp in list(compress_topk(0.01), compress_random_k(0.3), compress_quantize(3), compress_float16())) {
      expect_identical(comp$bytes(d), fedagg:::rs_compress_bytes(fedagg:::rust_compressor(comp, 1), d))
    }
  }
})

# --- The simulated clock -----------------------------------------------------------

sys_nodes <- function(n_nodes = 8, seed = 1, ...) {
  d <- synthetic_fedprox(0.5, 0.5, n_clients = n_nodes, seed = seed)
  nodes <- fed_nodes(d)
  set_system(nodes, system_profile(speed = lognormal(300, 10), download = lognormal(2e4, 10),
                                   upload = lognormal(5e3, 10), latency = 0.02, seed = seed, ...))
  nodes
}

# The round's clock recomputed in plain R from the profiles, the selection
# log, and the server's dropout draws.
ref_clock <- function(srv, nodes, r, deadline = Inf, target = Inf, partial = FALSE, batch = 10, epochs = 1,
                      up_bytes = NULL) {
  prof <- system_table(nodes)
  sel <- srv$selection_log
  ids <- sel$client[sel$round == r & sel$picked]
  p <- prof[match(ids, prof$node), ]
  n <- vapply(nodes[ids], function(nd) nd$n_samples, numeric(1))
  d <- length(unlist(srv$params))
  up <- up_bytes %||% (8 * d)
  t_down <- p$latency + 8 * d / p$download
  t_up <- p$latency + up / p$upload
  compute <- epochs * n / p$speed
  finish <- t_down + compute + t_up
  u <- fedagg:::with_seed(fedagg:::derive_seed(srv$settings$seed, r, 9L), stats::runif(length(ids)))
  status <- ifelse(u < p$dropout, "dropout", "kept")
  b <- pmin(batch, n)
  steps <- floor(pmax(0, deadline - t_down - t_up) * p$speed / b)
  late <- status == "kept" & finish > deadline
  if (partial) {
    status[late & steps >= 1] <- "partial"
    finish[late & steps >= 1] <- (t_down + steps * b / p$speed + t_up)[late & steps >= 1]
    status[late & steps < 1] <- "deadline"
  } else {
    status[late] <- "deadline"
  }
  ok <- which(status %in% c("kept", "partial"))
  if (length(ok) > target) status[ok[order(finish[ok])][-seq_len(target)]] <- "late"
  reported <- status %in% c("kept", "partial")
  # A missed deadline is known only at the deadline, unless over-selection
  # closed the round first.
  waits <- any(status == "deadline") && !any(status == "late")
  list(ids = ids, status = status, download = t_down, finish = ifelse(reported, finish, NA_real_),
       round_time = if (waits) deadline else if (any(reported)) max(finish[reported])
                    else if (is.finite(deadline)) deadline else 0,
       bytes_down = length(ids) * 8 * d, bytes_up = sum(reported) * up,
       steps = ifelse(status == "partial", steps, NA))
}

test_that("the synchronous round's clock matches plain R: profiles, dropouts, deadlines, over-selection", {
  nodes <- sys_nodes(dropout = 0.25)
  # A deadline some clients miss: below the slower clients' finish times.
  probe <- fed_server(model_softmax(60, 10), nodes, fraction = 1, lr = 0.05, seed = 3)
  probe$round()
  deadline <- unname(stats::quantile(probe$system_log$finish, 0.6, na.rm = TRUE))
  cases <- list(
    list(args = list(), deadline = Inf, target = Inf),
    list(args = list(deadline = deadline), deadline = deadline, target = Inf),
    list(args = list(over_select = 1.5), deadline = Inf, target = 4),
    list(args = list(deadline = deadline, over_select = 1.5), deadline = deadline, target = 4)
  )
  seen <- character()
  for (cs in cases) {
    srv <- do.call(fed_server, c(list(model_softmax(60, 10), nodes, fraction = 0.5, lr = 0.05, seed = 3), cs$args))
    # A round where nobody reports warns; that is part of what is tested.
    h <- withCallingHandlers(srv$fit(6, verbose = FALSE),
                             fedagg_warning_empty_round = function(w) invokeRestart("muffleWarning"))
    sim <- 0
    for (r in 1:6) {
      ref <- ref_clock(srv, nodes, r, cs$deadline, cs$target)
      log <- srv$system_log[srv$system_log$round == r, ]
      expect_identical(log$client, ref$ids)
      expect_identical(log$status, ref$status)
      expect_equal(log$download, ref$download, tolerance = 1e-12)
      expect_equal(log$finish, ref$finish, tolerance = 1e-12)
      expect_equal(h$round_time[r], ref$round_time, tolerance = 1e-12)
      expect_identical(h$bytes_down[r], ref$bytes_down)
      expect_identical(h$bytes_up[r], ref$bytes_up)
      expect_identical(h$clients[r], sum(ref$status == "kept"))
      sim <- sim + ref$round_time
      expect_equal(h$sim_time[r], sim, tolerance = 1e-12)
      seen <- union(seen, ref$status)
    }
  }
  # Every rule fired somewhere, so each comparison above could have failed.
  expect_setequal(seen, c("kept", "dropout", "deadline", "late"))
})

test_that("FedProx clients cut by the deadline send exactly the steps they finished", {
  set.seed(4)
  x <- matrix(rnorm(60 * 3), 60)
  y <- as.integer(x[, 1] > 0)
  nodes <- fed_nodes(x, y, list(a = 1:30, b = 31:60))
  # Node a is slow: it finishes 3 of its 6 minibatches by the deadline.
  set_system(nodes, data.frame(node = c("a", "b"), speed = c(10, 1e6), download = 1e9, upload = 1e9, latency = 0))
  m <- model_logistic(3)
  srv <- fed_server(m, nodes, algorithm = fedprox(0), fraction = 1, epochs = 1, batch_size = 5, lr = 0.1,
                    shuffle = FALSE, deadline = 1.55, seed = 1)
  srv$round()
  log <- srv$system_log
  expect_identical(log$status, c("partial", "kept"))
  expect_equal(log$work, c(0.5, 1))
  start <- init_params(m, srv$settings$seed)
  a <- ref_sgd(start, x[1:15, ], y[1:15], "logistic", 1, 5, 0.1)
  b <- ref_sgd(start, x[31:60, ], y[31:60], "logistic", 1, 5, 0.1)
  expected <- Map(function(s, pa, pb) s + (30 * (pa - s) + 30 * (pb - s)) / 60, start, a, b)
  expect_equal(srv$params, expected, tolerance = 1e-10)
  # FedAvg drops the same client instead.
  avg <- fed_server(m, nodes, fraction = 1, epochs = 1, batch_size = 5, lr = 0.1, shuffle = FALSE, deadline = 1.55,
                    seed = 1)
  avg$round()
  expect_identical(avg$system_log$status, c("deadline", "kept"))
  expect_equal(avg$params, b, tolerance = 1e-10)
})

test_that("compressed rounds fold the decoded updates and keep each node's residual", {
  nodes <- sys_nodes(n_nodes = 6, seed = 2)
  srv <- fed_server(model_softmax(60, 10), nodes, fraction = 1, lr = 0.05, seed = 2, compress = compress_topk(0.05))
  h <- srv$fit(2, verbose = FALSE)
  d <- 610
  expect_identical(h$bytes_up, rep(6 * 12 * ceiling(0.05 * d), 2))
  expect_identical(h$bytes_down, rep(6 * 8 * d, 2))
  expect_true(all(vapply(nodes, function(n) length(n$state$residual) == d, logical(1))))
  # One client by hand: its decoded update is what the server averaged.
  one <- fed_server(model_softmax(60, 10), nodes[1], fraction = 1, lr = 0.05, seed = 9,
                    compress = compress_topk(0.05, error_feedback = FALSE))
  start <- unlist(one$params)
  delta <- unlist(nodes[[1]]$train(one$params, train_config(model_softmax(60, 10), lr = 0.05, batch_size = 10,
                                                             seed = fedagg:::derive_seed(9, 1L, 2L)),
                                   return = "delta")$delta)
  one$round()
  expect_equal(unname(unlist(one$params) - start), ref_topk(delta, 0.05)$decoded, tolerance = 1e-12)
  expect_identical(sum(unlist(one$params) != start), as.integer(ceiling(0.05 * d)))
})

test_that("systems runs are the same on 1 and 2 threads, and a saved server resumes exactly", {
  run <- function(threads, split = FALSE) {
    nodes <- sys_nodes(dropout = 0.2, seed = 5)
    srv <- fed_server(model_softmax(60, 10), nodes, algorithm = fednova(), fraction = 0.5, lr = 0.05, seed = 5,
                      deadline = 5, over_select = 1.5, compress = compress_quantize(4), threads = threads)
    if (split) {
      srv$fit(2, verbose = FALSE)
      f <- tempfile(fileext = ".rds")
      saveRDS(srv, f)
      srv <- readRDS(f)
      srv$fit(2, verbose = FALSE)
    } else {
      srv$fit(4, verbose = FALSE)
    }
    list(h = srv$history, log = srv$system_log, params = srv$params)
  }
  one <- run(1)
  expect_identical(one, run(2))
  expect_identical(one, run(1, split = TRUE))
})

test_that("plots along simulated time and bytes", {
  nodes <- sys_nodes()
  h <- fed_server(model_softmax(60, 10), nodes, fraction = 0.5, lr = 0.05, seed = 1)$fit(3, verbose = FALSE)
  f <- tempfile(fileext = ".png")
  grDevices::png(f)
  on.exit(grDevices::dev.off())
  expect_invisible(plot(h, along = "time"))
  expect_invisible(plot(h, along = "bytes"))
  expect_invisible(plot(fed_compare(a = h, b = h), along = "time"))
  plain <- fed_server(model_softmax(60, 10), fed_nodes(synthetic_fedprox(0, 0, n_clients = 4, seed = 1)),
                      fraction = 1, lr = 0.05, seed = 1)$fit(2, verbose = FALSE)
  expect_true(all(is.na(plain$sim_time)))
  expect_error(plot(plain, along = "time"), class = "fedagg_error")
  expect_error(plot(h, along = "hours"), class = "fedagg_error")
})

# --- Asynchronous rounds (FedBuff) -------------------------------------------------

# FedBuff's event loop written in plain R: dispatches, arrivals in time order
# (ties by dispatch), staleness, and the server step x + mean(s(tau) Delta).
ref_fedbuff <- function(nodes, model, lr, seed, K, C, steps, weight) {
  prof <- system_table(nodes)
  n <- vapply(nodes, function(nd) nd$n_samples, numeric(1))
  x <- unlist(init_params(model, seed))
  d <- length(x)
  versions <- list(x)
  flight <- data.frame(node = integer(), seq = integer(), version = integer(), finish = numeric())
  deltas <- list()
  t <- 0; v <- 0; seq <- 0
  dispatch <- function(time, version) {
    free <- setdiff(seq_along(nodes), flight$node)
    seq <<- seq + 1
    node <- free[fedagg:::with_seed(fedagg:::derive_seed(seed, seq, 11L), sample.int(length(free), 1L))]
    p <- prof[node, ]
    total <- 2 * p$latency + 8 * d / p$download + n[node] / p$speed + 8 * d / p$upload
    flight <<- rbind(flight, data.frame(node = node, seq = seq, version = version, finish = time + total))
    cfg <- train_config(model, lr = lr, batch_size = 10, seed = fedagg:::derive_seed(seed, 0L, 12L), stream = seq)
    start <- relist(versions[[version + 1]], init_params(model, seed))
    deltas[[as.character(seq)]] <<- unlist(nodes[[node]]$train(start, cfg, return = "delta")$delta)
  }
  log <- NULL
  times <- numeric()
  for (step in seq_len(steps)) {
    while (nrow(flight) < C) dispatch(t, v)
    arrived <- list()
    for (k in seq_len(K)) {
      j <- order(flight$finish, flight$seq)[1]
      a <- flight[j, ]
      flight <- flight[-j, ]
      t <- a$finish
      arrived[[k]] <- list(node = a$node, tau = v - a$version, delta = deltas[[as.character(a$seq)]])
      log <- rbind(log, data.frame(round = step, client = names(nodes)[a$node], staleness = v - a$version))
      if (k < K) dispatch(t, v)
    }
    tau <- vapply(arrived, `[[`, numeric(1), "tau")
    w <- weight(tau)
    x <- x + Reduce(`+`, Map(function(a, wi) wi * a$delta, arrived, w)) / K
    v <- v + 1
    versions[[v + 1]] <- x
    times[step] <- t
    dispatch(t, v)
  }
  list(params = x, log = log, sim_time = times)
}

test_that("FedBuff matches a plain-R event loop: same arrivals, staleness, weights and parameters", {
  d <- synthetic_fedprox(0.5, 0.5, n_clients = 7, seed = 6)
  nodes <- fed_nodes(d)
  set_system(nodes, system_profile(speed = lognormal(400, 20), download = lognormal(1e5, 5), seed = 2))
  for (staleness in list("sqrt", "constant", function(tau) exp(-tau))) {
    spec <- fedbuff(buffer_size = 2, concurrency = 4, staleness = staleness)
    srv <- fed_server(model_softmax(60, 10), nodes, lr = 0.05, seed = 4, asynchronous = spec)
    h <- srv$fit(6, verbose = FALSE)
    ref <- ref_fedbuff(nodes, model_softmax(60, 10), 0.05, 4, 2, 4, 6, spec$weight)
    log <- srv$system_log
    expect_identical(log$client, ref$log$client)
    expect_identical(log$staleness, as.double(ref$log$staleness))
    expect_equal(h$sim_time, ref$sim_time, tolerance = 1e-12)
    expect_equal(unname(unlist(srv$params)), unname(ref$params), tolerance = 1e-10)
    expect_true(any(ref$log$staleness > 0))
  }
  expect_equal(fedbuff(staleness = "polynomial", power = 2)$weight(c(0, 1, 3)), c(1, 1 / 4, 1 / 16))
})

test_that("FedBuff is reproducible on 1 and 2 threads and after save and reload; it refuses what it cannot simulate", {
  d <- synthetic_fedprox(0.5, 0.5, n_clients = 8, seed = 3)
  make <- function(threads) {
    nodes <- fed_nodes(d, system = system_profile(speed = lognormal(400, 10), seed = 1))
    fed_server(model_softmax(60, 10), nodes, lr = 0.05, seed = 2, threads = threads,
               asynchronous = fedbuff(buffer_size = 3, concurrency = 5))
  }
  a <- make(1); a$fit(4, verbose = FALSE)
  b <- make(2); b$fit(2, verbose = FALSE)
  f <- tempfile(fileext = ".rds")
  saveRDS(b, f)
  b <- readRDS(f)
  b$fit(2, verbose = FALSE)
  expect_identical(a$history, b$history)
  expect_identical(a$system_log, b$system_log)
  # Dropouts lose a client after its download; the buffer still fills with K updates.
  drops <- fed_nodes(d, system = system_profile(speed = lognormal(400, 10), dropout = 0.3, seed = 1))
  srv <- fed_server(model_softmax(60, 10), drops, lr = 0.05, seed = 2, asynchronous = fedbuff(3, 5))
  srv$fit(5, verbose = FALSE)
  log <- srv$system_log
  expect_true(any(log$status == "dropout"))
  expect_identical(as.vector(table(log$round[log$status == "kept"])), rep(3L, 5))
  plain <- fed_nodes(d)
  expect_error(fed_server(model_softmax(60, 10), plain, asynchronous = fedbuff(2, 4)), class = "fedagg_error")
  timed <- fed_nodes(d, system = system_profile())
  expect_error(fed_server(model_softmax(60, 10), timed, algorithm = scaffold(), asynchronous = fedbuff(2, 4)),
               class = "fedagg_error")
  expect_error(fed_server(model_softmax(60, 10), timed, asynchronous = fedbuff(2, 40)), class = "fedagg_error")
  expect_error(fed_server(model_softmax(60, 10), timed, asynchronous = fedbuff(2, 4, staleness = "none")),
               class = "fedagg_error")
  bad <- fed_server(model_softmax(60, 10), timed, asynchronous = fedbuff(2, 4, staleness = function(tau) -1))
  expect_error(bad$round(), class = "fedagg_error_user_code")
  expect_identical(bad$rounds_done, 0L)
})

test_that("Markov availability follows its chain: a plain-R chain from the same draws", {
  d <- synthetic_fedprox(0.5, 0.5, n_clients = 12, seed = 2)
  chain <- availability_markov(mean_on = 3, mean_off = 2)
  nodes <- fed_nodes(d, availability = chain)
  expect_s3_class(nodes[[1]]$availability, "fed_availability")
  expect_equal(chain$share, 0.6)
  srv <- fed_server(model_softmax(60, 10), nodes, fraction = 0.5, lr = 0.05, seed = 8)
  R <- 40
  srv$fit(R, verbose = FALSE)
  sel <- srv$selection_log
  on <- NULL
  seen_on <- 0
  for (r in seq_len(R)) {
    u <- fedagg:::with_seed(fedagg:::derive_seed(8, r, 3L), stats::runif(12))
    on <- if (is.null(on)) u < 0.6 else ifelse(on, u >= 1 / 3, u < 1 / 2)
    picked <- sel$client[sel$round == r & sel$picked]
    expect_true(all(picked %in% names(nodes)[on]))
    expect_identical(length(picked), as.integer(min(6, sum(on))))
    seen_on <- seen_on + sum(on)
  }
  # The chain persists: successive rounds agree more than independent draws would.
  expect_gt(seen_on / (12 * R), 0.4)
  expect_error(availability_markov(0.5, 2), class = "fedagg_error")
  expect_error(fed_server(model_softmax(60, 10), nodes, privacy = dp_central(1, 1)), class = "fedagg_error")
})

test_that("hierarchical rounds match a plain-R HierFAVG, with the edges' clock", {
  set.seed(7)
  x <- matrix(rnorm(80 * 3), 80)
  y <- as.integer(x[, 1] - x[, 2] > 0)
  parts <- list(a = 1:10, b = 11:25, c = 26:45, d = 46:60, e = 61:80)
  nodes <- fed_nodes(x, y, parts)
  groups <- list(left = c("a", "b"), right = c("c", "d", "e"))
  set_system(nodes, system_profile(speed = c(50, 80, 40, 100, 60), download = 1e4, upload = 5e3, latency = 0.1))
  top <- topology_hierarchical(groups, edge_rounds = 2, edge_link = list(latency = 0.5, bandwidth = 1e3))
  m <- model_logistic(3)
  srv <- fed_server(m, nodes, fraction = 1, epochs = 1, batch_size = 5, lr = 0.2, shuffle = FALSE, seed = 1,
                    topology = top)
  h <- srv$fit(2, verbose = FALSE)
  avg <- function(models, w) Reduce(function(a, b) Map(`+`, a, b), Map(function(p, wi) lapply(p, `*`, wi / sum(w)), models, w))
  cloud <- init_params(m, 1)
  n <- lengths(parts)
  for (r in 1:2) {
    edges <- lapply(groups, function(g) {
      edge <- cloud
      for (it in 1:2) {
        local <- lapply(g, function(id) ref_sgd(edge, x[parts[[id]], ], y[parts[[id]]], "logistic", 1, 5, 0.2))
        edge <- avg(local, n[g])
      }
      edge
    })
    cloud <- avg(edges, vapply(groups, function(g) sum(n[g]), numeric(1)))
  }
  expect_equal(srv$params, cloud, tolerance = 1e-10)
  # Clock: per edge, two edge rounds as long as the slowest member, plus the
  # model's trip from and back to the cloud; the slowest edge ends the round.
  d <- 4
  trip <- function(id, speed) 2 * 0.1 + 8 * d / 1e4 + n[[id]] / speed + 8 * d / 5e3
  speeds <- c(a = 50, b = 80, c = 40, d = 100, e = 60)
  edge_time <- vapply(groups, function(g) 2 * max(vapply(g, function(id) trip(id, speeds[[id]]), numeric(1))) +
                        2 * (0.5 + 8 * d / 1e3), numeric(1))
  expect_equal(h$round_time, rep(max(edge_time), 2), tolerance = 1e-12)
  expect_identical(h$bytes_up, rep(8 * d * (2 + 2 * 5), 2))
  # One edge round is FedAvg.
  flat <- fed_server(m, nodes, fraction = 1, epochs = 1, batch_size = 5, lr = 0.2, shuffle = FALSE, seed = 1,
                     topology = topology_hierarchical(groups, edge_rounds = 1))
  fedavg_srv <- fed_server(m, nodes, fraction = 1, epochs = 1, batch_size = 5, lr = 0.2, shuffle = FALSE, seed = 1)
  flat$fit(2, verbose = FALSE)
  fedavg_srv$fit(2, verbose = FALSE)
  expect_equal(flat$params, fedavg_srv$params, tolerance = 1e-12)
  expect_error(topology_hierarchical(list(left = "a", right = "a")), class = "fedagg_error")
  expect_error(fed_server(m, nodes, topology = topology_hierarchical(list(left = c("a", "b")))),
               class = "fedagg_error_client")
  expect_error(fed_server(m, nodes, topology = top, compress = compress_float16()), class = "fedagg_error")
})

test_that("review findings stay fixed: fold failures, shared nodes, profiles removed, DP, deadline clocks", {
  set.seed(1)
  x <- matrix(rnorm(400), 100)
  nodes <- fed_nodes(x, 1e6 * x[, 1], partition_iid(100, 4, seed = 1))
  # A failure in the fold of collected updates names the client; nothing is kept.
  s <- fed_server(model_linear(4), nodes, fraction = 1, seed = 1, lr = 0.1, compress = compress_float16(),
                  selection = select_score())
  err <- tryCatch(s$fit(1, verbose = FALSE), fedagg_error = function(e) e)
  expect_s3_class(err, "fedagg_error_client")
  expect_identical(s$rounds_done, 0L)
  # Servers sharing nodes never read each other's state.
  shared <- fed_nodes(x, as.integer(x[, 1] > 0), partition_iid(100, 4, seed = 1))
  fresh <- fed_nodes(x, as.integer(x[, 1] > 0), partition_iid(100, 4, seed = 1))
  fed_server(model_logistic(4), shared, fraction = 1, seed = 1, compress = compress_topk(0.2))$fit(2, verbose = FALSE)
  run <- function(nodes) {
    fed_server(model_logistic(4), nodes, fraction = 1, seed = 2, compress = compress_topk(0.2))$fit(2, verbose = FALSE)
  }
  expect_identical(run(shared), run(fresh))
  expect_no_error(fed_server(model_mlp(4, 3, n_classes = 2), shared, fraction = 1, seed = 1,
                             compress = compress_topk(0.2))$fit(1, verbose = FALSE))
  # A profile removed after the server was made is a classed error, not a crash.
  timed <- fed_nodes(x, as.integer(x[, 1] > 0), partition_iid(100, 4, seed = 1), system = system_profile())
  t_srv <- fed_server(model_logistic(4), timed, fraction = 1, seed = 1, deadline = 10)
  timed[[2]]$system <- NULL
  expect_error(t_srv$round(), class = "fedagg_error_client")
  # Central DP refuses what breaks its uniform sampling.
  timed[[2]]$system <- timed[[1]]$system
  expect_error(fed_server(model_logistic(4), timed, fraction = 0.5, privacy = dp_central(1, 1), deadline = 5),
               class = "fedagg_error")
  # A client that misses the deadline keeps the server waiting until the deadline.
  set_system(timed, system_profile(speed = c(10, 1000, 1000, 1000), latency = 0))
  d_srv <- fed_server(model_logistic(4), timed, fraction = 1, seed = 1, deadline = 0.5)
  h <- d_srv$fit(1, verbose = FALSE)
  expect_identical(d_srv$system_log$status[1], "deadline")
  expect_identical(h$round_time, 0.5)
  # SCAFFOLD sends its control variate too.
  sc <- fed_server(model_logistic(4), timed, algorithm = scaffold(), fraction = 1, seed = 1)$fit(1, verbose = FALSE)
  avg <- fed_server(model_logistic(4), timed, fraction = 1, seed = 1)$fit(1, verbose = FALSE)
  expect_identical(sc$bytes_up, 2 * avg$bytes_up)
  # float32 models refuse features beyond float32's range.
  big <- fed_nodes(cbind(x[, 1:3], 1e39), as.integer(x[, 1] > 0), partition_iid(100, 2, seed = 1))
  f32 <- fed_server(model_logistic(4, precision = "float32"), big, fraction = 1, seed = 1)
  expect_error(f32$round(), class = "fedagg_error_client")
})

test_that("a link table routes each node's messages over its shortest path", {
  d <- synthetic_fedprox(0.5, 0.5, n_clients = 3, seed = 1)
  nodes <- fed_nodes(d, ids = c("a", "b", "c"), system = system_profile(speed = 1e4, latency = 0))
  links <- data.frame(from = c("a", "b", "router", "c", "a"), to = c("router", "router", "server", "server", "server"),
                      latency = c(0.01, 0.02, 0.1, 0.5, 1), bandwidth = c(1e4, 2e4, 1e5, 1e3, 1e9))
  srv <- fed_server(model_softmax(60, 10), nodes, fraction = 1, lr = 0.05, seed = 1, topology = topology_links(links))
  srv$round()
  bytes <- 8 * 610
  path <- list(a = c(0.01 + 0.1, 1 / 1e4 + 1 / 1e5), b = c(0.02 + 0.1, 1 / 2e4 + 1 / 1e5), c = c(0.5, 1 / 1e3))
  expected <- vapply(c("a", "b", "c"), function(id) path[[id]][1] + bytes * path[[id]][2], numeric(1))
  log <- srv$system_log
  expect_equal(log$download, unname(expected), tolerance = 1e-12)
  expect_equal(log$upload, unname(expected), tolerance = 1e-12)
  expect_error(fed_server(model_softmax(60, 10), nodes, topology = topology_links(links[-4:-5, ])),
               class = "fedagg_error_client")
  typo <- rbind(links, data.frame(from = "cc", to = "router", latency = 0, bandwidth = 1))
  expect_error(fed_server(model_softmax(60, 10), nodes, topology = topology_links(typo)), class = "fedagg_error_client")
})

test_that("second review's findings stay fixed", {
  d <- synthetic_fedprox(0.5, 0.5, n_clients = 6, seed = 3)
  # A node cut off from the server is a classed error naming it.
  nodes <- fed_nodes(d, ids = letters[1:6], system = system_profile())
  cut <- data.frame(from = c("a", "b", "c", "d", "e", "f", "x"), to = c("server", "server", "server", "server", "x", "x", "f"),
                    latency = 0.1, bandwidth = 1e5)
  err <- tryCatch(fed_server(model_softmax(60, 10), nodes, topology = topology_links(cut)), fedagg_error = function(e) e)
  expect_s3_class(err, "fedagg_error_client")
  expect_identical(err$client, "e")
  # A profile removed mid-run stops FedBuff and hierarchical rounds with a classed error.
  async <- fed_server(model_softmax(60, 10), nodes, lr = 0.05, seed = 1, asynchronous = fedbuff(2, 4))
  async$fit(1, verbose = FALSE)
  groups <- list(l = letters[1:3], r = letters[4:6])
  hier <- fed_server(model_softmax(60, 10), nodes, fraction = 1, lr = 0.05, seed = 1, topology = topology_hierarchical(groups))
  nodes[[2]]$system <- NULL
  expect_error(async$fit(2, verbose = FALSE), class = "fedagg_error_client")
  expect_identical(async$rounds_done, 1L)
  expect_error(hier$round(), class = "fedagg_error_client")
  # Hierarchical rounds keep min_clients.
  few <- fed_nodes(d, ids = letters[1:6], availability = 0.3)
  h_few <- fed_server(model_softmax(60, 10), few, fraction = 1, min_clients = 6, seed = 1,
                      topology = topology_hierarchical(groups))
  expect_error(h_few$fit(3, verbose = FALSE), class = "fedagg_error_cohort")
  # FedBuff refuses what it would ignore.
  timed <- fed_nodes(d, ids = letters[1:6], system = system_profile())
  for (args in list(list(selection = select_power_of_choice(3)), list(weights = "equal"), list(min_clients = 3))) {
    expect_error(do.call(fed_server, c(list(model_softmax(60, 10), timed, asynchronous = fedbuff(2, 4)), args)),
                 class = "fedagg_error")
  }
  # Servers that share nodes keep their own state, even interleaved.
  run <- function(nodes, interleave) {
    a <- fed_server(model_softmax(60, 10), nodes, algorithm = scaffold(), fraction = 0.5, lr = 0.05, seed = 1,
                    compress = NULL)
    a$fit(2, verbose = FALSE)
    if (interleave) {
      fed_server(model_softmax(60, 10), nodes, algorithm = scaffold(), fraction = 1, lr = 0.05, seed = 9)$fit(1, verbose = FALSE)
    }
    a$fit(2, verbose = FALSE)
    a$params
  }
  expect_identical(run(fed_nodes(d), TRUE), run(fed_nodes(d), FALSE))
  # SCAFFOLD's control variate travels as float64 beside a compressed update.
  sc <- fed_server(model_softmax(60, 10), timed, algorithm = scaffold(), fraction = 1, seed = 1,
                   compress = compress_float16())$fit(1, verbose = FALSE)
  expect_identical(sc$bytes_up, 6 * (2 * 610 + 8 * 610))
})
