#' Asynchronous rounds: FedBuff
#'
#' With `asynchronous = fedbuff()`, [fed_server()] stops waiting for its
#' slowest clients. It keeps `concurrency` clients training at all times,
#' each on the model version it downloaded; whenever a client's update
#' arrives (by the simulated clock of the nodes' [system
#' profiles][system_profile]) the server puts it in a buffer and sends that
#' client's slot to another node, drawn uniformly from those not training.
#' When `buffer_size` updates have arrived the server steps (Nguyen et al.
#' 2022, FedBuff):
#'
#' \deqn{x \leftarrow x + \eta_g \frac{1}{K} \sum_{i=1}^{K} s(\tau_i) \Delta_i}
#'
#' where \eqn{\tau_i} is the staleness of update \eqn{i} (how many server
#' steps happened since its client downloaded the model) and `s` the
#' staleness function, through the server's optimizer (\eqn{\eta_g} is its
#' learning rate). One step is one round of the history; `sim_time` is the
#' time of the step. Events are ordered by arrival time, then by dispatch
#' order, so a seed gives one sequence of events on any number of threads.
#'
#' Staleness functions: `"sqrt"`, \eqn{1 / \sqrt{1 + \tau}} (the default);
#' `"constant"`, 1; `"polynomial"`, \eqn{(1 + \tau)^{-a}} with `a = power`;
#' or a function of the staleness vector returning non-negative weights.
#'
#' A client that drops out (its profile's `dropout`) is lost once it has
#' downloaded the model, and its slot goes to another node at that moment.
#' This first version simulates FedAvg or FedProx clients of built-in models
#' with float64 updates; deadlines, compression, privacy, clipping, filters
#' and robust aggregators are refused with it.
#'
#' @param buffer_size Updates per server step, K.
#' @param concurrency Clients training at any time.
#' @param staleness `"sqrt"`, `"constant"`, `"polynomial"` or a function.
#' @param power Exponent `a` of the polynomial staleness function.
#' @return A `fed_async` object for [fed_server()]'s `asynchronous`.
#' @seealso [system_profile()]
#' @examples
#' d <- synthetic_fedprox(0.5, 0.5, n_clients = 12, seed = 1)
#' nodes <- fed_nodes(d, system = system_profile(speed = lognormal(500, 10), seed = 1))
#' srv <- fed_server(model_softmax(60, 10), nodes, lr = 0.05, seed = 1,
#'                   asynchronous = fedbuff(buffer_size = 3, concurrency = 6))
#' h <- srv$fit(4, verbose = FALSE)
#' h[, c("round", "clients", "sim_time", "train_loss")]
#' head(srv$system_log)
#' @export
fedbuff <- function(buffer_size = 10, concurrency = 2 * buffer_size, staleness = "sqrt", power = 0.5) {
  buffer_size <- assert_count(buffer_size, min = 1L)
  concurrency <- assert_count(concurrency, min = 1L)
  power <- assert_number(power, 0)
  weight <- if (is.function(staleness)) {
    staleness
  } else {
    kind <- assert_choice(staleness, c("sqrt", "constant", "polynomial"))
    switch(kind,
      sqrt = function(tau) 1 / sqrt(1 + tau),
      constant = function(tau) rep(1, length(tau)),
      polynomial = function(tau) (1 + tau)^-power)
  }
  label <- sprintf("FedBuff (K = %d, %d concurrent, staleness %s)", buffer_size, concurrency,
                   if (is.function(staleness)) "custom" else if (identical(staleness, "polynomial"))
                     sprintf("(1 + tau)^-%s", format(power)) else staleness)
  structure(list(kind = "fedbuff", label = label, buffer_size = buffer_size, concurrency = concurrency,
                 weight = weight),
            class = c("fed_async", "fed_part"))
}

assert_async <- function(x, private, call = rlang::caller_env()) {
  if (is.null(x)) return(NULL)
  if (!inherits(x, "fed_async")) {
    fedagg_abort("{.arg asynchronous} must be NULL or {.fn fedbuff}, not {obj_desc(x)}.", call = call)
  }
  roster <- node_roster(private)
  refuse <- function(what) {
    fedagg_abort("{.fn fedbuff} does not simulate {what} yet; leave it out of an asynchronous server.", call = call)
  }
  if (!all(roster$has_system)) {
    fedagg_abort(c("{.fn fedbuff} runs on simulated time, which needs device profiles.",
                   i = "Give the nodes profiles with {.fn set_system}."), call = call)
  }
  if (!is_builtin(private$.model)) refuse("custom R models")
  # The parts it cannot run: a lookup in the registry of parts.
  part <- unsupported_part(private, "fedbuff")
  if (!is.null(part)) refuse(part)
  if (any(roster$availability < 1)) refuse("nodes with availability below 1")
  if (is.finite(private$.deadline) || private$.over_select > 1) refuse("deadlines or over-selection")
  if (!is.null(private$.schedule) || private$.stragglers > 0) refuse("schedules or stragglers")
  if (is.function(private$.weights) || !identical(private$.weights, "samples")) {
    refuse("aggregation weights (it weights updates by staleness)")
  }
  if (private$.min_clients > 1) refuse("min_clients (buffer_size is its cohort)")
  if (x$concurrency > length(private$.nodes)) {
    fedagg_abort("{.arg concurrency} = {x$concurrency} is more than the {length(private$.nodes)} nodes.", call = call)
  }
  x
}
