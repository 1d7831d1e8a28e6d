#' Differentially private federated averaging
#'
#' @description
#' `dp_central(noise_multiplier, clip)` makes a [Server]'s rounds centrally
#' differentially private, as DP-FedAvg (McMahan et al. 2018): every selected
#' client's update is clipped to L2 norm `clip` (or every layer to `clip /
#' sqrt(n_layers)` with `per_layer = TRUE`, an equal split of the budget),
#' the server adds `N(0, (noise_multiplier * clip)^2)` noise to the sum of
#' the clipped updates and divides by the *expected* number of clients
#' (`q * n_nodes`). Updates are weighted equally: weighting by samples would
#' raise the sensitivity, so a server with `dp_central()` uses equal weights
#' (and says so if you asked for others).
#'
#' Privacy is accounted for with an RDP accountant for the Poisson-subsampled
#' Gaussian mechanism ([rdp_epsilon()]), with sampling rate `q =` clients per
#' round / nodes. That is exact for [select_poisson()] and the usual
#' approximation for fixed-size sampling. The history's `epsilon` column is
#' the privacy spent after each round at `delta`; [privacy_spent()] reports
#' it for a server. With `max_epsilon`, `fit()` stops before a round would
#' exceed that budget, keeping the rounds done: it warns (class `fedagg_warning_budget_exhausted`), and `server$stopped`, `print(server)` and `print(history)` say why.
#'
#' **Adaptive clipping** (Andrew et al. 2021): with `clip =
#' clip_adaptive(initial, quantile, lr, count_noise)` the bound follows a
#' quantile of the clients' update norms. Each round, `b` is the noised
#' share of the round's updates whose norm is at most the bound `C` (the
#' unclipped share: a count plus `N(0, count_noise^2)`, divided by the
#' expected number of clients), and `C <- C * exp(-lr * (b - quantile))`:
#' too many unclipped updates shrink the bound, too few grow it. The count is
#' private too: its noise (by default `m / 20` for `m` expected clients) and
#' the updates' noise share the requested `noise_multiplier` `z`, the updates
#' getting `z_delta = (z^-2 - (2 * count_noise)^-2)^(-1/2)`; when that is
#' impossible (too little count noise for `z`), the server says so. The
#' history's `clip` column is the bound used in each round.
#'
#' **Local DP**: with `dp_local(epsilon, delta, clip)` every client clips its
#' own update to `clip` and adds Gaussian noise calibrated by the analytic
#' Gaussian mechanism ([gaussian_noise_sd()]) for L2 sensitivity `2 * clip`
#' (the clipped update of a client can become any other point of the ball)
#' before sending it, so the server, its filters and its aggregator only see
#' noised updates. Each round a client takes part in is `(epsilon, delta)`-DP
#' for that client; the history's `epsilon` is the largest total over the
#' clients by basic composition (participations times `epsilon`), a simple
#' upper bound.
#'
#' `clip_norm(max_norm, per_layer)` clips updates without noise (a transform
#' on its own, e.g. against a few very large updates).
#'
#' @param noise_multiplier Noise standard deviation relative to `clip`,
#'   `>= 0`.
#' @param clip,max_norm Clipping bound on each update's L2 norm, `> 0`; for
#'   `dp_central()` also [clip_adaptive()].
#' @param epsilon For `dp_local()`: the privacy of one round's update, `> 0`.
#' @param initial Initial bound of adaptive clipping.
#' @param quantile Target share of unclipped updates, in (0, 1).
#' @param lr Learning rate of the bound's geometric update, `> 0`.
#' @param count_noise Standard deviation of the noise on the count of
#'   unclipped updates (`NULL`: the expected number of clients / 20).
#' @param per_layer Clip every layer on its own (to `clip /
#'   sqrt(n_layers)`).
#' @param delta The delta at which epsilon is reported, in (0, 1).
#' @param max_epsilon Stop before the privacy spent would exceed this
#'   (`Inf`: never).
#' @return A `fed_privacy` or a `fed_clip`.
#' @references McMahan, H. B., Ramage, D., Talwar, K., & Zhang, L. (2018).
#'   Learning differentially private recurrent language models. ICLR.
#'
#'   Andrew, G., Thakkar, O., McMahan, H. B., & Ramaswamy, S. (2021).
#'   Differentially private learning with adaptive clipping. NeurIPS.
#' @examples
#' dp_central(noise_multiplier = 1, clip = 0.5)
#' dp_central(noise_multiplier = 1, clip = clip_adaptive(initial = 0.1, quantile = 0.5))
#' dp_local(epsilon = 4, delta = 1e-5, clip = 0.1)
#' data <- synthetic_fedprox(1, 1, n_clients = 20, seed = 1)
#' srv <- fed_server(model_softmax(60, 10), fed_nodes(data), fraction = 0.5, lr = 0.05,
#'                   privacy = dp_central(noise_multiplier = 1, clip = 0.5, max_epsilon = 5),
#'                   test_data = pool_clients(data, "test"), seed = 1)
#' h <- srv$fit(10, verbose = FALSE)
#' h$epsilon
#' privacy_spent(srv)
#' @name differential_privacy
NULL

#' @rdname differential_privacy
#' @export
dp_central <- function(noise_multiplier, clip, per_layer = FALSE, delta = 1e-5, max_epsilon = Inf) {
  check_required_args()
  noise_multiplier <- assert_number(noise_multiplier, 0)
  adaptive <- if (inherits(clip, "fed_clip_adaptive")) clip
  clip <- if (is.null(adaptive)) assert_number(clip, 0, lower_open = TRUE) else adaptive$initial
  per_layer <- assert_flag(per_layer)
  delta <- assert_number(delta, 0, 1, lower_open = TRUE, upper_open = TRUE)
  if (!identical(max_epsilon, Inf)) max_epsilon <- assert_number(max_epsilon, 0, lower_open = TRUE)
  structure(list(kind = "central", noise_multiplier = noise_multiplier, clip = clip, per_layer = per_layer,
                 delta = delta, max_epsilon = max_epsilon, adaptive = adaptive,
                 label = sprintf("central DP (noise multiplier %s, %s%s, delta %s%s)", format(noise_multiplier),
                                 if (is.null(adaptive)) paste("clip", format(clip)) else adaptive$label,
                                 if (per_layer) " per layer" else "", format(delta),
                                 if (is.finite(max_epsilon)) sprintf(", max epsilon %s", format(max_epsilon)) else "")),
            class = c("fed_privacy", "fed_part"))
}

#' @rdname differential_privacy
#' @export
dp_local <- function(epsilon, delta = 1e-5, clip) {
  check_required_args()
  epsilon <- assert_number(epsilon, 0, lower_open = TRUE)
  delta <- assert_number(delta, 0, 1, lower_open = TRUE, upper_open = TRUE)
  clip <- assert_number(clip, 0, lower_open = TRUE)
  sd <- gaussian_noise_sd(2 * clip, epsilon, delta)
  structure(list(kind = "local", epsilon = epsilon, delta = delta, clip = clip, sd = sd, per_layer = FALSE,
                 max_epsilon = Inf, noise_multiplier = sd / clip,
                 label = sprintf("local DP (epsilon %s, delta %s per round, clip %s: noise sd %s)", format(epsilon),
                                 format(delta), format(clip), format(signif(sd, 3)))),
            class = c("fed_privacy", "fed_part"))
}

#' @rdname differential_privacy
#' @export
clip_adaptive <- function(initial = 0.1, quantile = 0.5, lr = 0.2, count_noise = NULL) {
  initial <- assert_number(initial, 0, lower_open = TRUE)
  quantile <- assert_number(quantile, 0, 1, lower_open = TRUE, upper_open = TRUE)
  lr <- assert_number(lr, 0, lower_open = TRUE)
  if (!is.null(count_noise)) count_noise <- assert_number(count_noise, 0)
  structure(list(initial = initial, quantile = quantile, lr = lr, count_noise = count_noise,
                 label = sprintf("adaptive clip (from %s to the %s quantile, lr %s)", format(initial), format(quantile),
                                 format(lr))),
            class = c("fed_clip_adaptive", "fed_part"))
}

# Noise multipliers of adaptive clipping: the count's noise and the updates'
# share the requested total z (Andrew et al. 2021, Theorem 1).
adaptive_noise <- function(dp, expected_clients, call = rlang::caller_env()) {
  z <- dp$noise_multiplier
  sigma_b <- dp$adaptive$count_noise %||% (expected_clients / 20)
  if (z == 0) return(list(update = 0, count = sigma_b))
  rest <- z^-2 - (2 * sigma_b)^-2
  if (sigma_b == 0 || rest <= 0) {
    fedagg_abort(c("Adaptive clipping cannot keep the noise multiplier {z} with count noise {format(sigma_b)}.",
                   i = "The count needs noise above {format(z / 2)} (z / 2): raise {.arg count_noise} or lower {.arg noise_multiplier}."),
                 call = call)
  }
  list(update = rest^-0.5, count = sigma_b)
}

#' @rdname differential_privacy
#' @export
clip_norm <- function(max_norm, per_layer = FALSE) {
  check_required_args()
  max_norm <- assert_number(max_norm, 0, lower_open = TRUE)
  per_layer <- assert_flag(per_layer)
  structure(list(max_norm = max_norm, per_layer = per_layer,
                 label = sprintf("clip to norm %s%s", format(max_norm), if (per_layer) " per layer" else "")),
            class = c("fed_clip", "fed_part"))
}

#' Privacy spent by a server
#'
#' The (epsilon, delta) guarantee of the rounds a [Server] with
#' [dp_central()] has run so far, from the RDP accountant
#' ([rdp_epsilon()]).
#'
#' @param server A [Server].
#' @param delta Delta (default: the one given to [dp_central()]).
#' @return A list: `epsilon`, `delta`, `order` (the optimal RDP order),
#'   `rounds`, `q` (sampling rate) and `noise_multiplier`. With [dp_local()]:
#'   the largest total over the clients by basic composition, with
#'   `epsilon_per_round` and `participations`.
#' @examples
#' data <- synthetic_fedprox(1, 1, n_clients = 10, seed = 1)
#' srv <- fed_server(model_softmax(60, 10), fed_nodes(data), fraction = 0.5, lr = 0.05,
#'                   privacy = dp_central(1.1, clip = 1), seed = 1)
#' srv$fit(3, verbose = FALSE)
#' privacy_spent(srv)
#' privacy_spent(srv, delta = 1e-6)$epsilon
#' @export
privacy_spent <- function(server, delta = NULL) {
  check_required_args()
  if (!inherits(server, "Server")) fedagg_abort("{.arg server} must be a {.cls Server}, not {obj_desc(server)}.")
  dp <- server$settings$privacy_object
  if (is.null(dp)) fedagg_abort("This server has no differential privacy; give {.arg privacy} = {.fn dp_central}.")
  if (dp$kind == "local") {
    if (!is.null(delta)) fedagg_abort("Local DP is accounted at its own {.arg delta}; {.fn privacy_spent} takes none.")
    per_client <- table(server$client_log$client)
    most <- if (length(per_client)) max(per_client) else 0L
    return(list(epsilon = most * dp$epsilon, delta = most * dp$delta, order = NA_real_,
                rounds = server$rounds_done, q = server$settings$sampling_rate, noise_multiplier = dp$noise_multiplier,
                epsilon_per_round = dp$epsilon, participations = most))
  }
  delta <- if (is.null(delta)) dp$delta else assert_number(delta, 0, 1, lower_open = TRUE, upper_open = TRUE)
  q_log <- server$settings$sampling_rates
  rounds <- server$rounds_done
  dp$delta <- delta
  eps <- if (rounds == 0L) 0 else epsilon_after(dp, q_log)
  list(epsilon = as.double(eps), delta = delta, order = attr(eps, "order") %||% NA_real_,
       rounds = rounds, q = if (length(unique(q_log)) == 1L) q_log[1] else q_log,
       noise_multiplier = dp$noise_multiplier)
}

assert_privacy <- function(x, call = rlang::caller_env()) {
  if (is.null(x) || inherits(x, "fed_privacy")) return(x)
  fedagg_abort("{.arg privacy} must come from {.fn dp_central}, not {obj_desc(x)}.", call = call)
}

assert_clip <- function(x, call = rlang::caller_env()) {
  if (is.null(x) || inherits(x, "fed_clip")) return(x)
  fedagg_abort("{.arg clip} must come from {.fn clip_norm}, not {obj_desc(x)}.", call = call)
}

# The privacy spent by rounds with sampling rates `q_log` (central DP): the
# Rust accountant composes every round with its own rate. With one rate it is
# rdp_epsilon() itself. Returns epsilon with attribute `order`.
epsilon_after <- function(dp, q_log) {
  if (is.null(dp) || dp$kind != "central" || !length(q_log)) return(NA_real_)
  out <- call_rust(rs_rdp_epsilon_rounds(as.double(q_log), dp$noise_multiplier, dp$delta, NULL))
  structure(out$epsilon, order = out$order)
}

# Central DP's accounting assumes every eligible node has the same chance to
# take part in a round: uniform or Poisson sampling, all nodes reachable.
check_dp_cohort <- function(private, call = rlang::caller_env()) {
  if (!identical(private$.privacy$kind, "central")) return(invisible())
  roster <- node_roster(private)
  if (any(roster$dropout > 0, na.rm = TRUE) || is.finite(private$.deadline %||% Inf) ||
      (private$.over_select %||% 1) > 1) {
    fedagg_abort(c("{.fn dp_central}'s accounting assumes every node is equally likely to take part.",
                   x = "Dropouts, a deadline or over-selection favour some nodes over others."), call = call)
  }
  avail <- stats::setNames(roster$availability, names(private$.nodes))
  if (any(avail < 1)) {
    fedagg_abort(c("{.fn dp_central}'s accounting assumes every node is equally likely to take part.",
                   x = "Node{?s} {.val {names(avail)[avail < 1]}} ha{?s/ve} {.field availability} below 1."),
                 call = call)
  }
  invisible()
}

# The next bound of adaptive clipping (NULL when the bound is fixed): a
# geometric step towards the quantile, from the noised unclipped share.
adapt_clip <- function(private, info, round) {
  dp <- private$.privacy
  if (is.null(dp$adaptive) || !length(info$client)) return(NULL)
  expected <- private$.sampling_rate() * private$.eligible()
  noise <- adaptive_noise(dp, expected)
  unclipped <- sum(info$passed_filter & !info$clipped, na.rm = TRUE)
  count_noise <- if (noise$count > 0) with_seed(derive_seed(private$.seed, round, 7L), stats::rnorm(1, 0, noise$count)) else 0
  share <- (unclipped + count_noise) / expected
  private$.state$dp_clip * exp(-dp$adaptive$lr * (share - dp$adaptive$quantile))
}

# Local DP: the largest epsilon any client has spent, by basic composition
# over the rounds it took part in (this one included).
local_epsilon <- function(private, info, dp) {
  clients <- c(unlist(lapply(private$.state$client_log, `[[`, "client")), info$client)
  if (!length(clients)) return(0)
  max(table(clients)) * dp$epsilon
}
