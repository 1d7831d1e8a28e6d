#' Threads used by fedagg's kernels
#'
#' Every kernel takes a `threads` argument. When it is `NULL` (the default),
#' the option `fedagg.threads` is used, and when that is unset, all cores.
#' Results never depend on the number of threads: work is split into blocks
#' fixed by the data, and partial results are combined in a fixed order.
#'
#' `threads` must be a whole number from 1 to `max` (1024). A request for
#' more threads than cores runs on as many threads as there are cores. Thread
#' pools are reused between calls; at most two are kept alive, so switching
#' between many values does not accumulate threads.
#'
#' @return A list with `threads`, the number a call with `threads = NULL`
#'   uses now, `cores`, the number of cores available, and `max`, the
#'   largest value accepted.
#' @export
#' @examples
#' fedagg_threads()
#' old <- options(fedagg.threads = 1)
#' fedagg_threads()$threads
#' options(old)
fedagg_threads <- function() {
  cores <- rs_available_threads()
  n <- resolve_threads(NULL)
  list(threads = if (n == 0L) cores else min(n, cores), cores = cores, max = max_threads)
}
