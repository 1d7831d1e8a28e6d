#' Local optimizers: how a client takes its steps
#'
#' The update rule of a client's local training, as defined by PyTorch's
#' `torch.optim` (no dampening, no Nesterov; state reset to zero at the start
#' of every local run; `t` counts steps from 1). Every step first adds
#' `weight_decay * y` to the minibatch gradient `g` (L2 penalty, as torch's
#' `weight_decay`), then FedProx's and SCAFFOLD's terms when those
#' [client algorithms][client_algorithms] are used.
#'
#' * `local_sgd(momentum, weight_decay)`: `b <- momentum * b + g; y <- y -
#'   lr * b`.
#' * `local_adam(beta1, beta2, eps, weight_decay)`: `m <- beta1 m + (1 -
#'   beta1) g; v <- beta2 v + (1 - beta2) g^2; y <- y - lr (m / (1 -
#'   beta1^t)) / (sqrt(v / (1 - beta2^t)) + eps)`.
#' * `local_rmsprop(alpha, eps, weight_decay)`: `v <- alpha v + (1 - alpha)
#'   g^2; y <- y - lr g / (sqrt(v) + eps)`.
#' * `local_adagrad(eps, weight_decay)`: `s <- s + g^2; y <- y - lr g /
#'   (sqrt(s) + eps)`.
#'
#' @param momentum Momentum in `[0, 1)`.
#' @param weight_decay L2 penalty, `>= 0`.
#' @param beta1,beta2 Decay rates of the first and second moments, in `[0, 1)`.
#' @param eps Term added to the denominator, `> 0`.
#' @param alpha Decay rate of RMSprop's squared-gradient average, in `[0, 1)`.
#' @return A `fed_local_optimizer`.
#' @examples
#' local_adam()
#' data <- synthetic_fedprox(1, 1, n_clients = 10, seed = 1)
#' srv <- fed_server(model_softmax(60, 10), fed_nodes(data), local_optimizer = local_adam(),
#'                   lr = 0.001, fraction = 0.5, seed = 1)
#' srv$fit(2, verbose = FALSE)
#' @name local_optimizers
NULL

new_local_optimizer <- function(kind, label, momentum = 0, weight_decay = 0, beta1 = 0.9, beta2 = 0.999,
                                eps = 1e-8, alpha = 0.99) {
  structure(list(kind = kind, label = label, momentum = momentum, weight_decay = weight_decay, beta1 = beta1,
                 beta2 = beta2, eps = eps, alpha = alpha),
            class = c("fed_local_optimizer", "fed_part"))
}

with_decay <- function(label, weight_decay) {
  if (weight_decay > 0) sprintf("%s, weight decay %s", label, format(weight_decay)) else label
}

#' @rdname local_optimizers
#' @export
local_sgd <- function(momentum = 0, weight_decay = 0) {
  momentum <- assert_number(momentum, 0, 1, upper_open = TRUE)
  weight_decay <- assert_number(weight_decay, 0)
  label <- if (momentum > 0) sprintf("SGD (momentum %s)", format(momentum)) else "SGD"
  new_local_optimizer("sgd", with_decay(label, weight_decay), momentum = momentum, weight_decay = weight_decay)
}

#' @rdname local_optimizers
#' @export
local_adam <- function(beta1 = 0.9, beta2 = 0.999, eps = 1e-8, weight_decay = 0) {
  beta1 <- assert_number(beta1, 0, 1, upper_open = TRUE)
  beta2 <- assert_number(beta2, 0, 1, upper_open = TRUE)
  eps <- assert_number(eps, 0, lower_open = TRUE)
  weight_decay <- assert_number(weight_decay, 0)
  new_local_optimizer("adam", with_decay(sprintf("Adam (betas %s, %s)", format(beta1), format(beta2)), weight_decay),
                      weight_decay = weight_decay, beta1 = beta1, beta2 = beta2, eps = eps)
}

#' @rdname local_optimizers
#' @export
local_rmsprop <- function(alpha = 0.99, eps = 1e-8, weight_decay = 0) {
  alpha <- assert_number(alpha, 0, 1, upper_open = TRUE)
  eps <- assert_number(eps, 0, lower_open = TRUE)
  weight_decay <- assert_number(weight_decay, 0)
  new_local_optimizer("rmsprop", with_decay(sprintf("RMSprop (alpha %s)", format(alpha)), weight_decay),
                      weight_decay = weight_decay, eps = eps, alpha = alpha)
}

#' @rdname local_optimizers
#' @export
local_adagrad <- function(eps = 1e-10, weight_decay = 0) {
  eps <- assert_number(eps, 0, lower_open = TRUE)
  weight_decay <- assert_number(weight_decay, 0)
  new_local_optimizer("adagrad", with_decay("Adagrad", weight_decay), weight_decay = weight_decay, eps = eps)
}

assert_local_optimizer <- function(x, arg = rlang::caller_arg(x), call = rlang::caller_env()) {
  if (inherits(x, "fed_local_optimizer")) return(x)
  fedagg_abort("{.arg {arg}} must be a local optimizer such as {.fn local_sgd} or {.fn local_adam}, not {obj_desc(x)}.",
               call = call)
}

#' Server optimizers: how the server applies the clients' aggregate
#'
#' @description
#' The server's step from the round's pseudo-gradient `D` (the aggregated
#' client update: `D = sum_i p_i (y_i - x)`, or `-lr * mean gradient` for
#' FedSGD) to new global parameters, as in Reddi et al. (2021, Algorithm 2):
#' moments start at zero and there is no bias correction.
#'
#' * `server_sgd(lr, momentum)`: `v <- momentum * v + D; x <- x + lr * v`.
#'   `server_sgd(1, 0)` is plain FedAvg; a momentum gives FedAvgM (Hsu et
#'   al. 2019).
#' * `server_adagrad(lr, tau, beta1)`: `m <- beta1 m + (1 - beta1) D; v <- v
#'   + D^2` (FedAdagrad).
#' * `server_adam(lr, beta1, beta2, tau)`: `v <- beta2 v + (1 - beta2) D^2`
#'   (FedAdam).
#' * `server_yogi(lr, beta1, beta2, tau)`: `v <- v - (1 - beta2) D^2 sign(v
#'   - D^2)` (FedYogi).
#'
#' The three adaptive ones then take `x <- x + lr * m / (sqrt(v) + tau)`.
#' Their state lives with the server and survives `saveRDS()`.
#'
#' @section Writing your own:
#' `server_optimizer(name, step)` makes one from `step(params, delta,
#' state, round)`, which gets the flat global parameters, the round's
#' pseudo-gradient `D`, its own `state` (`NULL` at first) and the round, and
#' returns `list(params = <new flat parameters>, state = <kept for the next
#' round>)`.
#'
#' @param lr Server learning rate, `> 0`.
#' @param momentum Server momentum in `[0, 1)`.
#' @param beta1,beta2 Decay rates of the moments, in `[0, 1)`.
#' @param tau Adaptivity: the term added to `sqrt(v)`, `> 0`.
#' @param name A label.
#' @param step `function(params, delta, state, round)`, see above.
#' @return A `fed_server_optimizer`.
#' @references Reddi, S., Charles, Z., Zaheer, M., et al. (2021). Adaptive
#'   federated optimization. ICLR.
#' @examples
#' server_adam(lr = 0.01)
#' data <- synthetic_fedprox(1, 1, n_clients = 10, seed = 1)
#' srv <- fed_server(model_softmax(60, 10), fed_nodes(data), server_optimizer = server_sgd(1, momentum = 0.9),
#'                   fraction = 0.5, lr = 0.05, seed = 1)
#' srv$fit(3, verbose = FALSE)
#'
#' # A server optimizer written in R: a step capped at norm 1
#' capped <- server_optimizer("capped", function(params, delta, state, round) {
#'   list(params = params + clip_update(delta, 1), state = NULL)
#' })
#' capped
#' @name server_optimizers
NULL

new_server_optimizer <- function(kind, label, lr, momentum = 0, beta1 = 0, beta2 = 0, tau = 1e-3, step = NULL) {
  structure(list(kind = kind, label = label, lr = lr, momentum = momentum, beta1 = beta1, beta2 = beta2,
                 tau = tau, step = step),
            class = c("fed_server_optimizer", "fed_part"))
}

#' @rdname server_optimizers
#' @export
server_sgd <- function(lr = 1, momentum = 0) {
  lr <- assert_number(lr, 0, lower_open = TRUE)
  momentum <- assert_number(momentum, 0, 1, upper_open = TRUE)
  label <- if (momentum > 0) sprintf("SGD (lr %s, momentum %s: FedAvgM)", format(lr), format(momentum))
           else sprintf("SGD (lr %s)", format(lr))
  new_server_optimizer("sgd", label, lr, momentum = momentum)
}

#' @rdname server_optimizers
#' @export
server_adagrad <- function(lr = 0.1, tau = 1e-3, beta1 = 0) {
  lr <- assert_number(lr, 0, lower_open = TRUE)
  tau <- assert_number(tau, 0, lower_open = TRUE)
  beta1 <- assert_number(beta1, 0, 1, upper_open = TRUE)
  new_server_optimizer("adagrad", sprintf("Adagrad (lr %s, tau %s: FedAdagrad)", format(lr), format(tau)), lr,
                       beta1 = beta1, tau = tau)
}

#' @rdname server_optimizers
#' @export
server_adam <- function(lr = 0.01, beta1 = 0.9, beta2 = 0.99, tau = 1e-3) {
  lr <- assert_number(lr, 0, lower_open = TRUE)
  beta1 <- assert_number(beta1, 0, 1, upper_open = TRUE)
  beta2 <- assert_number(beta2, 0, 1, upper_open = TRUE)
  tau <- assert_number(tau, 0, lower_open = TRUE)
  new_server_optimizer("adam", sprintf("Adam (lr %s, tau %s: FedAdam)", format(lr), format(tau)), lr,
                       beta1 = beta1, beta2 = beta2, tau = tau)
}

#' @rdname server_optimizers
#' @export
server_yogi <- function(lr = 0.01, beta1 = 0.9, beta2 = 0.99, tau = 1e-3) {
  lr <- assert_number(lr, 0, lower_open = TRUE)
  beta1 <- assert_number(beta1, 0, 1, upper_open = TRUE)
  beta2 <- assert_number(beta2, 0, 1, upper_open = TRUE)
  tau <- assert_number(tau, 0, lower_open = TRUE)
  new_server_optimizer("yogi", sprintf("Yogi (lr %s, tau %s: FedYogi)", format(lr), format(tau)), lr,
                       beta1 = beta1, beta2 = beta2, tau = tau)
}

#' @rdname server_optimizers
#' @export
server_optimizer <- function(name, step) {
  check_required_args()
  if (!is.character(name) || length(name) != 1L || is.na(name)) {
    fedagg_abort("{.arg name} must be a single string, not {obj_desc(name)}.")
  }
  if (!is.function(step)) fedagg_abort("{.arg step} must be a function, not {obj_desc(step)}.")
  new_server_optimizer("custom", name, lr = 1, step = step)
}

assert_server_optimizer <- function(x, arg = rlang::caller_arg(x), call = rlang::caller_env()) {
  if (inherits(x, "fed_server_optimizer")) return(x)
  fedagg_abort("{.arg {arg}} must be a server optimizer such as {.fn server_sgd} or {.fn server_adam}, not {obj_desc(x)}.",
               call = call)
}

# The server part of the Rust config. A server optimizer written in R runs
# after the Rust call, which then only aggregates (server SGD with lr 1).
rust_server_config <- function(opt, state) {
  builtin <- opt$kind != "custom"
  list(kind = if (builtin) opt$kind else "sgd", lr = if (builtin) opt$lr else 1,
       momentum = if (builtin) opt$momentum else 0, beta1 = opt$beta1, beta2 = opt$beta2, tau = opt$tau,
       m = if (builtin) state$m, v = if (builtin) state$v)
}
