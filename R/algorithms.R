#' Client algorithms: what a selected client does with the global model
#'
#' @description
#' The client part of a round: a local objective and update rule, run with a
#' [local optimizer][local_optimizers] for `epochs` epochs of minibatches,
#' returning the client's update `Delta_i = y_i - x` (its local parameters
#' minus the global ones). The server then aggregates the updates into a
#' pseudo-gradient `D` and a [server optimizer][server_optimizers] applies
#' it.
#'
#' * `fedavg()`: local minibatch training (McMahan et al. 2017); `D = sum_i
#'   p_i Delta_i` with the normalised aggregation weights `p_i`.
#' * `fedsgd()`: one full-batch gradient at the global parameters per
#'   client, `Delta_i = -lr * g_i`.
#' * `fedprox(mu)`: FedAvg whose local gradient gets `mu * (y - x)`, a pull
#'   towards the global model (Li et al. 2020). `fedprox(0)` is `fedavg()`.
#' * `scaffold()`: SCAFFOLD, option II (Karimireddy et al. 2020). Each local
#'   step uses `g(y) - c_i + c`; after its `K` steps a client sets `c_i <-
#'   c_i - c + (x - y) / (K * lr)`, and the server `c <- c + sum_{i in S}
#'   (c_i_new - c_i) / N` over all `N` nodes. The control variates start at
#'   zero; `c_i` lives with its node and `c` with the server, and both survive
#'   `saveRDS()`. With `correction = "step"` the correction is applied to the
#'   parameters after each optimizer step, `y <- y - lr (c - c_i)`, instead
#'   of entering the gradient: with momentum SGD it then stays outside the
#'   momentum, as in NIID-Bench's and Flower's SCAFFOLD (with plain SGD both
#'   are the same).
#' * `fednova()`: FedNova (Wang et al. 2020) normalises each client's update
#'   by its local work: `a_i = tau_i` local steps with plain SGD, `a_i =
#'   (tau_i - rho (1 - rho^tau_i) / (1 - rho)) / (1 - rho)` with local
#'   momentum `rho`; `D = (sum_i p_i a_i) sum_i p_i Delta_i / a_i`. Needs
#'   [local_sgd()].
#'
#' Strings are accepted as shorthands: `"fedavg"`, `"fedsgd"`, `"fedprox"`,
#' `"scaffold"`, `"fednova"`.
#'
#' @section Writing your own:
#' `fed_algorithm(name, local)` makes a client algorithm from an R function
#' `local(node, params, config, state)` that runs on one node, from what a
#' server sends (the global `params` as a named list of layers, the round's
#' [train_config()] and the node's own `state` from its previous rounds,
#' `NULL` at first) and returns what the node would send back:
#' `list(delta = <params-shaped list or flat vector>, n_samples = , train_loss
#' = , state = <kept on the node>)`. It may call `node$train()`. Such rounds
#' run in R, one node after another (or through `future.apply`), and are
#' then aggregated and stepped in Rust.
#'
#' @param mu Proximal weight, `>= 0`.
#' @param correction For `scaffold()`: `"gradient"` (the correction enters
#'   each step's gradient) or `"step"` (it is applied after the step).
#' @param name A label.
#' @param local `function(node, params, config, state)`, see above.
#' @return A `fed_algorithm`.
#' @references
#' McMahan et al. (2017), Communication-efficient learning of deep networks
#' from decentralized data. AISTATS.
#'
#' Li et al. (2020), Federated optimization in heterogeneous networks. MLSys.
#'
#' Karimireddy et al. (2020), SCAFFOLD: stochastic controlled averaging for
#' federated learning. ICML.
#'
#' Wang et al. (2020), Tackling the objective inconsistency problem in
#' heterogeneous federated optimization. NeurIPS.
#' @examples
#' fedprox(mu = 0.01)
#' scaffold()
#' data <- synthetic_fedprox(1, 1, n_clients = 10, seed = 1)
#' srv <- fed_server(model_softmax(60, 10), fed_nodes(data), algorithm = scaffold(),
#'                   fraction = 0.5, lr = 0.05, seed = 1)
#' srv$fit(3, verbose = FALSE)
#'
#' # A client algorithm written in R: FedAvg with an update clipped to norm 1
#' clipped_fedavg <- fed_algorithm("clipped FedAvg", function(node, params, config, state) {
#'   out <- node$train(params, config, return = "delta")
#'   list(delta = clip_update(out$delta, 1), n_samples = out$n_samples,
#'        train_loss = out$train_loss, state = NULL)
#' })
#' srv2 <- fed_server(model_softmax(60, 10), fed_nodes(data), algorithm = clipped_fedavg,
#'                    fraction = 0.5, lr = 0.05, seed = 1)
#' srv2$fit(2, verbose = FALSE)
#' @name client_algorithms
NULL

new_algorithm <- function(kind, label, ..., local = NULL) {
  structure(list(kind = kind, label = label, settings = list(...), local = local), class = c("fed_algorithm", "fed_part"))
}

#' @rdname client_algorithms
#' @export
fedavg <- function() new_algorithm("fedavg", "FedAvg")

#' @rdname client_algorithms
#' @export
fedsgd <- function() new_algorithm("fedsgd", "FedSGD")

#' @rdname client_algorithms
#' @export
fedprox <- function(mu = 0.01) {
  mu <- assert_number(mu, 0)
  new_algorithm("fedprox", sprintf("FedProx (mu = %s)", format(mu)), mu = mu)
}

#' @rdname client_algorithms
#' @export
scaffold <- function(correction = c("gradient", "step")) {
  correction <- assert_choice(correction, c("gradient", "step"))
  new_algorithm("scaffold", if (correction == "step") "SCAFFOLD (correction after the step)" else "SCAFFOLD",
                correction = correction)
}

#' @rdname client_algorithms
#' @export
fednova <- function() new_algorithm("fednova", "FedNova")

#' @rdname client_algorithms
#' @export
fed_algorithm <- function(name, local) {
  check_required_args()
  if (!is.character(name) || length(name) != 1L || is.na(name)) {
    fedagg_abort("{.arg name} must be a single string, not {obj_desc(name)}.")
  }
  if (!is.function(local)) fedagg_abort("{.arg local} must be a function, not {obj_desc(local)}.")
  new_algorithm("custom", name, local = local)
}

as_algorithm <- function(x, arg = rlang::caller_arg(x), call = rlang::caller_env()) {
  force(arg)
  if (inherits(x, "fed_algorithm")) return(x)
  if (is.character(x) && !identical(x, c("fedavg", "fedsgd"))) {
    name <- assert_choice(x, c("fedavg", "fedsgd", "fedprox", "scaffold", "fednova"), arg = arg, call = call)
    return(switch(name, fedavg = fedavg(), fedsgd = fedsgd(), fedprox = fedprox(), scaffold = scaffold(),
                  fednova = fednova()))
  }
  if (identical(x, c("fedavg", "fedsgd"))) return(fedavg())
  fedagg_abort("{.arg {arg}} must be a client algorithm such as {.fn fedavg} or {.fn fedprox}, not {obj_desc(x)}.",
               call = call)
}

# Every part of a round (algorithms, optimizers, selection rules, aggregators,
# filters, attacks, privacy, monitors) is a list with a `label`, and prints as
# "<its class> its label".

#' @export
format.fed_part <- function(x, ...) paste0("<", class(x)[1], "> ", x$label)

#' @export
print.fed_part <- function(x, ...) {
  cat(format(x), "\n", sep = "")
  invisible(x)
}
