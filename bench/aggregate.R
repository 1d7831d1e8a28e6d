# Benchmark: weighted_aggregate() against the usual R ways of averaging
# client updates, with the machine's read bandwidth measured in the same run.
#
#   Rscript bench/aggregate.R            (or: make bench)
#
# Updates are a list of K numeric vectors of length d, as a server receives
# them. Effective bandwidth = K * d * 8 bytes / time: the rate at which the
# method reads the updates. The probe sums the same vectors in parallel in
# Rust, an upper bound for any method that must read them all.
suppressPackageStartupMessages(library(fedagg))

# Median seconds per call; short calls are repeated to get above timer noise.
time_call <- function(f, min_total = 1, reps = 7) {
  f()  # warm up (page faults, JIT)
  per_call <- numeric(reps)
  for (r in seq_len(reps)) {
    n <- 0L
    start <- Sys.time()
    repeat {
      f()
      n <- n + 1L
      elapsed <- as.double(Sys.time() - start, units = "secs")
      if (elapsed >= min_total / reps) break
    }
    per_call[r] <- elapsed / n
  }
  stats::median(per_call)
}

seed_loop <- function(updates, w) {
  # The R loop fedagg started from.
  out <- numeric(length(updates[[1]]))
  for (k in seq_along(updates)) out <- out + w[k] * updates[[k]]
  out
}

cores <- fedagg_threads()$cores
cat(sprintf("fedagg %s | R %s | %d cores | %s\n\n", packageVersion("fedagg"),
            getRversion(), cores, format(Sys.time(), "%Y-%m-%d")))

rows <- list()
for (k in c(10L, 100L)) {
  for (d in c(1e4, 1e6)) {
    set.seed(1)
    updates <- replicate(k, stats::rnorm(d), simplify = FALSE)
    weights <- stats::runif(k, 50, 500)
    w <- weights / sum(weights)
    m <- do.call(cbind, updates)  # pre-built: its construction is not timed
    bytes <- k * d * 8

    reference <- seed_loop(updates, w)
    stopifnot(isTRUE(all.equal(weighted_aggregate(updates, weights), reference, tolerance = 1e-12)))

    probe <- time_call(function() fedagg:::rs_stream_sum(updates, 0L))
    methods <- list(
      "R loop (seed)" = function() seed_loop(updates, w),
      "Reduce(+, Map(*))" = function() Reduce(`+`, Map(`*`, updates, w)),
      "drop(M %*% w), M pre-built" = function() drop(m %*% w),
      "fedagg, 1 thread" = function() weighted_aggregate(updates, weights, threads = 1),
      "fedagg, all threads" = function() weighted_aggregate(updates, weights)
    )
    times <- vapply(methods, time_call, numeric(1))
    base <- times[["R loop (seed)"]]
    rows[[length(rows) + 1]] <- data.frame(
      K = k, d = format(d, scientific = TRUE), method = names(methods),
      ms = 1000 * times, GB_s = bytes / times / 1e9,
      vs_seed_loop = base / times, of_probe = sprintf("%.0f%%", 100 * probe / times),
      check.names = FALSE
    )
    cat(sprintf("K = %d, d = %s: read-bandwidth probe %.1f GB/s\n", k, format(d, scientific = TRUE),
                bytes / probe / 1e9))
    rm(updates, m)
    invisible(gc())
  }
}
results <- do.call(rbind, rows)
cat("\n")
print(format(results, digits = 3), row.names = FALSE)
cat("\nvs_seed_loop: speed-up over the seed's R loop; of_probe: share of the measured read bandwidth.\n")
