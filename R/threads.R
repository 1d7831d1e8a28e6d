#' Threads used by fedagg's kernels
#'
#' Every kernel takes a `threads` argument. When it is `NULL` (the default),
#' the option `fedagg.threads` is used, and when that is unset, all cores.
#' Results never depend on the number of threads: work is split into blocks
#' fixed by the data, and partial results are combined in a fixed order.
#'
#' @return A list with `threads`, the number a call with `threads = NULL`
#'   uses now, and `cores`, the number of cores available.
#' @export
#' @examples
#' fedagg_threads()
#' old <- options(fedagg.threads = 1)
#' fedagg_threads()$threads
#' options(old)
fedagg_threads <- function() {
  cores <- rs_available_threads()
  n <- resolve_threads(NULL)
  list(threads = if (n == 0L) cores else n, cores = cores)
}
