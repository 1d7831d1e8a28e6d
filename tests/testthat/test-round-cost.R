# What a round costs in R must not grow with the rounds kept, and the short
# cuts taken for speed must give what the plain forms give.

small_server <- function(..., threads = 1) {
  set.seed(3)
  x <- matrix(rnorm(600), 200, 3)
  y <- sample(0:2, 200, TRUE)
  fed_server(model_softmax(3, 3), fed_nodes(x, y, split(seq_len(200), rep(1:10, 20))), fraction = 0.3,
             seed = 4, threads = threads, ...)
}

test_that("a round appends to the server's logs in place, without copying them", {
  skip_if_not(capabilities("profmem"), "R was built without memory profiling (tracemem)")
  s <- small_server(test_data = list(x = matrix(rnorm(30), 10), y = rep(0:1, 5)), eval_every = 2)
  s$fit(4, verbose = FALSE)
  # Reading the logs (as a dashboard would, between rounds) keeps no
  # reference to them either.
  invisible(list(s$history, s$client_log, s$selection_log, s$system_log, s$timings))
  state <- s$.__enclos_env__$private$.state
  logs <- c("records", "client_log", "selection_log")
  # Marked, not held: a reference kept here would itself force the copy.
  for (name in logs) tracemem(state[[name]])
  rm(state)
  copies <- capture.output(s$fit(3, verbose = FALSE), type = "output")
  state <- s$.__enclos_env__$private$.state
  for (name in logs) untracemem(state[[name]])
  expect_false(any(grepl("^tracemem\\[", copies)), info = paste(copies, collapse = "\n"))
  expect_length(state$records, 7L)
  # A server whose logs are shared (a clone) still leaves the original as it was.
  copy <- s$clone()
  copy$fit(1, verbose = FALSE)
  expect_equal(nrow(s$history), 7L)
  expect_equal(nrow(copy$history), 8L)
})

test_that("the history is the records, cell by cell", {
  s <- small_server(test_data = list(x = matrix(rnorm(30), 10), y = rep(0:1, 5)), eval_every = 2)
  s$fit(5, verbose = FALSE)
  h <- s$history
  records <- s$.__enclos_env__$private$.state$records
  # The plain form: one value per cell, NA where a round has none.
  for (col in names(h)) {
    want <- vapply(records, function(r) as.double(if (is.null(r[[col]])) NA_real_ else r[[col]]), numeric(1))
    expect_equal(as.double(h[[col]]), want, info = col)
  }
  expect_identical(h$round, 1:5)
  expect_identical(attr(h, "row.names"), 1:5)
  expect_true(anyNA(h$test_loss) && !all(is.na(h$test_loss)))
  # As data.frame() builds it.
  plain <- as.data.frame(lapply(stats::setNames(names(h), names(h)), function(col) h[[col]]))
  bare <- h
  attributes(bare) <- list(names = names(h), class = "data.frame", row.names = attr(h, "row.names"))
  expect_identical(bare, plain)
  empty <- small_server()$history
  expect_identical(nrow(empty), 0L)
  expect_identical(names(empty), names(h))
})

test_that("sorted positions are sort(unique()) of the positions in range", {
  set.seed(11)
  for (i in 1:200) {
    n <- sample(0:30, 1)
    x <- sample(c(seq_len(n), NA), sample(0:40, 1), replace = TRUE)
    expect_identical(fedagg:::sorted_positions(x, n), sort(unique(x[!is.na(x)])))
  }
  expect_identical(fedagg:::sorted_positions(integer(), 5), integer())
})

test_that("one thread and all cores give identical rounds, in either order in one session", {
  # One thread runs in the calling thread, marked so that nothing splits; all
  # cores in a pool the calling thread is part of. Neither may change a number.
  runs <- lapply(c(1, 2, 1, 2), function(threads) {
    s <- small_server(threads = threads, aggregator = agg_trimmed_mean(0.2))
    s$fit(3, verbose = FALSE)
    list(params = s$params, history = s$history)
  })
  for (k in 2:4) expect_identical(runs[[k]], runs[[1]])
})
