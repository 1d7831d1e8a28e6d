#' Compression of client updates
#'
#' What a client sends can be compressed to save upload bytes, at a cost in
#' accuracy the server sees as noise or bias. Give one to [fed_server()]'s
#' `compress`: every client compresses its update (after local differential
#' privacy and any simulated attack) and the server folds the decoded
#' updates; the history counts the exact bytes of each encoding.
#'
#' * `compress_topk(fraction)` keeps the `k = ceiling(fraction * d)` largest
#'   coordinates of an update of `d` values. With `error_feedback = TRUE`
#'   (Seide et al. 2014; Stich et al. 2018) each node adds what it did not
#'   send last time (its residual, kept in `node$state$residual`) before
#'   choosing, so nothing is lost for good. Sends `k` pairs of a 4-byte index
#'   and an 8-byte value: `12 k` bytes.
#' * `compress_random_k(fraction)` keeps `k` coordinates drawn at random,
#'   scaled by `d / k` so that the decoded update is unbiased; `12 k` bytes.
#' * `compress_quantize(bits, stochastic)` is QSGD (Alistarh et al. 2017):
#'   each coordinate becomes `sign(v_i) * norm * l / s` with `s = 2^bits - 1`
#'   levels of `|v_i| / ||v||`, rounded at random so that the decoded update
#'   is unbiased (`stochastic = TRUE`) or to the nearest level. Sends the
#'   norm (8 bytes) and, per coordinate, a sign bit and `bits` bits of level:
#'   `8 + ceiling(d * (bits + 1) / 8)` bytes.
#' * `compress_float16()` sends each value as an IEEE half-precision number
#'   (round to nearest even): `2 d` bytes. Values beyond the float16 range
#'   (65504) are an error, not silently infinite.
#'
#' Uncompressed updates are float64: `8 d` bytes.
#'
#' @param fraction Share of the coordinates kept, in (0, 1].
#' @param error_feedback Keep each node's residual and add it to its next
#'   update.
#' @param bits Bits per level, 1 to 16.
#' @param stochastic Unbiased random rounding (`TRUE`) or rounding to the
#'   nearest level.
#' @return A `fed_compressor` object: `kind`, `label`, its settings, and
#'   `bytes(d)`, the exact size of an encoded update of `d` values.
#' @seealso [compress_update()] to apply one to a vector; [system_profile()]
#'   for the time those bytes take.
#' @examples
#' compress_topk(0.01)
#' compress_quantize(8)$bytes(1e6) / (8 * 1e6)   # share of float64's bytes
#' @name compression
NULL

#' @rdname compression
#' @export
compress_topk <- function(fraction, error_feedback = TRUE) {
  check_required_args()
  fraction <- assert_number(fraction, 0, 1, lower_open = TRUE)
  error_feedback <- assert_flag(error_feedback)
  new_compressor("topk", sprintf("top-k %s%s", format_share(fraction), if (error_feedback) " with error feedback" else ""),
                 list(fraction = fraction, error_feedback = error_feedback),
                 function(d) 12 * min(d, max(1, ceiling(fraction * d))))
}

#' @rdname compression
#' @export
compress_random_k <- function(fraction) {
  check_required_args()
  fraction <- assert_number(fraction, 0, 1, lower_open = TRUE)
  new_compressor("random_k", sprintf("random-k %s", format_share(fraction)), list(fraction = fraction),
                 function(d) 12 * min(d, max(1, ceiling(fraction * d))))
}

#' @rdname compression
#' @export
compress_quantize <- function(bits = 8, stochastic = TRUE) {
  bits <- assert_count(bits, min = 1L)
  if (bits > 16L) fedagg_abort("{.arg bits} must be 1 to 16, not {bits}.")
  stochastic <- assert_flag(stochastic)
  new_compressor("quantize", sprintf("%d-bit QSGD%s", bits, if (stochastic) "" else " (nearest)"),
                 list(bits = bits, stochastic = stochastic), function(d) 8 + ceiling(d * (bits + 1) / 8))
}

#' @rdname compression
#' @export
compress_float16 <- function() {
  new_compressor("float16", "float16", list(), function(d) 2 * d)
}

new_compressor <- function(kind, label, settings, bytes) {
  structure(c(list(kind = kind, label = label), settings, list(bytes = bytes)),
            class = c(paste0("fed_compress_", kind), "fed_compressor", "fed_part"))
}

format_share <- function(x) paste0(format(100 * x), "%")

#' @export
format.fed_compressor <- function(x, ...) {
  sprintf("<fed_compressor> %s: %s of float64's bytes for 1e6 values", x$label,
          format_share(signif(x$bytes(1e6) / 8e6, 3)))
}

#' @export
print.fed_compressor <- function(x, ...) {
  cat(format(x), "\n", sep = "")
  invisible(x)
}

assert_compressor <- function(x, arg = rlang::caller_arg(x), call = rlang::caller_env()) {
  if (is.null(x)) return(NULL)
  if (!inherits(x, "fed_compressor")) {
    fedagg_abort("{.arg {arg}} must be NULL or a compressor such as {.fn compress_topk}, not {obj_desc(x)}.", call = call)
  }
  x
}

# The compressor as the Rust core reads it.
rust_compressor <- function(x, seed) {
  c(list(kind = x$kind, seed = as.double(seed)), x[setdiff(names(x), c("kind", "label", "bytes"))])
}

#' Compress one update
#'
#' Applies a [compressor][compression] to a numeric vector as a client of a
#' round would, and returns what the server decodes, the bytes sent and the
#' new error-feedback residual. Handy to see what a compressor does to an
#' update, or to teach.
#'
#' @param update An update: a numeric vector or array, or a list of numeric
#'   layers (as [clip_update()] takes); compressed as one flat vector.
#' @param compressor A [compressor][compression].
#' @param residual `NULL`, or the residual from the previous call (top-k with
#'   error feedback).
#' @param seed Seed of random sparsification and stochastic rounding.
#' @return A list: `decoded` (what the server sees, shaped like `update`),
#'   `bytes` (exact size of the encoding) and `residual` (a flat vector;
#'   `NULL` unless top-k with error feedback).
#' @examples
#' u <- c(0.5, -2, 0.1, 3, -0.2)
#' compress_update(u, compress_topk(0.4))
#' q <- compress_update(u, compress_quantize(2), seed = 1)
#' q$decoded
#' @export
compress_update <- function(update, compressor, residual = NULL, seed = 1) {
  check_required_args()
  single <- flat_update(update)
  compressor <- assert_compressor(compressor)
  if (is.null(compressor)) fedagg_abort("{.arg compressor} must be a compressor such as {.fn compress_topk}.")
  if (!is.null(residual)) {
    residual <- flat_update(residual)$values
    if (length(residual) != length(single$values)) {
      fedagg_abort("{.arg residual} has {length(residual)} values; {.arg update} has {length(single$values)}.")
    }
  }
  seed <- assert_count(seed)
  out <- call_rust(rs_compress_update(single$values, rust_compressor(compressor, seed), residual, as.double(seed)))
  out$decoded <- restore_shape(split(out$decoded, rep(seq_along(single$sizes), single$sizes)), single$template)
  out
}

# An update in any shape clip_update() takes, checked finite, as one flat
# vector with what restores its shape.
flat_update <- function(update, arg = rlang::caller_arg(update), call = rlang::caller_env()) {
  force(arg)
  single <- as_single_update(update, arg = arg, call = call)
  loc <- call_rust(rs_find_non_finite(single$layers, 1L, 1L), call = call)
  if (!is.null(loc)) fedagg_abort("{.arg {arg}} must be finite (no NA, NaN or Inf); position {loc[3]} is not.", call = call)
  values <- unlist(single$layers, use.names = FALSE)
  if (!length(values)) fedagg_abort("{.arg {arg}} has no values.", call = call)
  list(values = as.double(values), sizes = lengths(single$layers), template = single$template)
}
