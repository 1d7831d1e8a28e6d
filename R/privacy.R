#' Noise scale of the Gaussian mechanism
#'
#' The standard deviation of Gaussian noise that makes a query with L2
#' sensitivity `sensitivity` (epsilon, delta)-differentially private.
#'
#' * `"analytic"` (default): the analytic Gaussian mechanism of Balle and
#'   Wang (2018, Algorithm 1), the smallest sigma for which the privacy
#'   guarantee holds exactly. Valid for every `epsilon > 0`.
#' * `"classic"`: `sensitivity * sqrt(2 * log(1.25 / delta)) / epsilon`
#'   (Dwork and Roth 2014, Theorem A.1). Its proof holds only for
#'   `epsilon < 1`; for larger `epsilon` it warns, as the value then carries
#'   no guarantee.
#'
#' @param sensitivity L2 sensitivity of the released quantity (for clipped
#'   updates, the clipping norm divided by the number of clients when the
#'   mean is released).
#' @param epsilon Privacy loss, a finite number > 0.
#' @param delta Failure probability, in (0, 1).
#' @param method `"analytic"` or `"classic"`.
#' @return The noise standard deviation, a single number.
#' @references Balle, B. and Wang, Y.-X. (2018). Improving the Gaussian
#'   mechanism for differential privacy: analytical calibration and optimal
#'   denoising. ICML.
#' @family privacy
#' @export
#' @examples
#' gaussian_noise_sd(1, epsilon = 0.5, delta = 1e-5)
#' gaussian_noise_sd(1, epsilon = 0.5, delta = 1e-5, method = "classic")
#' # Valid for large epsilon too:
#' gaussian_noise_sd(1, epsilon = 8, delta = 1e-5)
gaussian_noise_sd <- function(sensitivity, epsilon, delta, method = c("analytic", "classic")) {
  check_required_args()
  method <- assert_choice(method, c("analytic", "classic"))
  check_dp_params(sensitivity, epsilon, delta)
  if (method == "classic" && epsilon >= 1) {
    fedagg_warn(c("The classic Gaussian mechanism is only proven for {.arg epsilon} < 1 (here {epsilon}).",
                  i = "Use {.code method = \"analytic\"} for a valid guarantee."),
                class = "classic_epsilon")
  }
  call_rust(rs_gaussian_sigma(as.double(sensitivity), as.double(epsilon), as.double(delta), method))
}

check_dp_params <- function(sensitivity, epsilon, delta, call = rlang::caller_env()) {
  assert_number(sensitivity, 0, lower_open = TRUE, call = call)
  assert_number(epsilon, 0, lower_open = TRUE, call = call)
  assert_number(delta, 0, 1, lower_open = TRUE, upper_open = TRUE, call = call)
  invisible()
}

#' Add calibrated Gaussian noise to an update
#'
#' Adds independent N(0, sigma^2) noise to every coordinate, with sigma from
#' [gaussian_noise_sd()]. The noise comes from a seeded generator in Rust
#' (xoshiro256++), drawn in fixed blocks, so a seed gives the same noise on
#' any number of threads. The input is not modified.
#'
#' @param x An update: a numeric vector or array, or a named list of arrays.
#' @inheritParams gaussian_noise_sd
#' @param seed A whole number in `[0, 2^53)`, or `NULL` to draw one from R's
#'   random number generator (so [set.seed()] makes the call reproducible).
#' @param sd Optional: the noise standard deviation to use instead of
#'   calibrating it from `sensitivity`, `epsilon` and `delta`.
#' @inheritParams weighted_aggregate
#' @return `x` plus noise, same shape, with attributes `sd` (the standard
#'   deviation used) and `seed`.
#' @family privacy
#' @export
#' @examples
#' update <- clip_update(rnorm(10), max_norm = 1)
#' noisy <- add_gaussian_noise(update, sensitivity = 1, epsilon = 1, delta = 1e-5, seed = 42)
#' attr(noisy, "sd")
#' identical(noisy, add_gaussian_noise(update, 1, 1, 1e-5, seed = 42))
add_gaussian_noise <- function(x, sensitivity, epsilon, delta, seed = NULL,
                               method = c("analytic", "classic"), sd = NULL, threads = NULL) {
  # sensitivity, epsilon and delta may be replaced by sd.
  check_required_args("x")
  single <- as_single_update(x, arg = "x")
  threads <- resolve_threads(threads)
  loc <- call_rust(rs_find_non_finite(single$layers, 1L, threads))
  if (!is.null(loc)) {
    fedagg_abort("{.arg x} must be finite (no NA, NaN or Inf); position {loc[3]} is not.")
  }
  if (is.null(sd)) {
    sd <- gaussian_noise_sd(sensitivity, epsilon, delta, method = method)
  } else {
    sd <- assert_number(sd, 0)
  }
  if (is.null(seed)) {
    seed <- sample.int(.Machine$integer.max, 1L)
  } else if (!is.numeric(seed) || length(seed) != 1L || is.na(seed) || seed < 0 || seed >= 2^53 ||
             seed != round(seed)) {
    fedagg_abort("{.arg seed} must be a whole number in [0, 2^53), not {obj_desc(seed)}.")
  }
  noisy <- call_rust(rs_add_gaussian_noise(single$layers, sd, as.double(seed), threads))
  if (!all(vapply(noisy, function(v) all(is.finite(v)), logical(1)))) {
    fedagg_abort(c("Adding noise with sd = {format(sd)} overflowed: the result is not finite.",
                   i = "Scale {.arg x} down, or use a smaller noise."))
  }
  out <- restore_shape(noisy, single$template)
  attr(out, "sd") <- sd
  attr(out, "seed") <- seed
  out
}
