#' Local training settings
#'
#' What a server sends to each client with the global parameters: the model
#' and the settings of local minibatch SGD. Each step uses the mean gradient
#' of a minibatch plus `weight_decay * params`; with momentum `mu` the step is
#' `v <- mu * v + g; params <- params - lr * v` (the velocity starts at zero
#' on every call). The training loss reported is the mean over all samples
#' seen, each scored just before its step.
#'
#' Conventions a reference implementation needs to match fedagg exactly:
#' * Each epoch visits every row once, in minibatches of `batch_size` rows;
#'   when `batch_size` does not divide the rows, the short last minibatch is
#'   kept and its gradient is the mean over its own rows.
#' * With `shuffle = TRUE` the order is a seeded permutation drawn anew each
#'   epoch; with `shuffle = FALSE` rows are used in their stored order.
#' * FedSGD (`algorithm = "fedsgd"`): the client's gradient is the full-batch
#'   mean gradient at the global parameters plus `weight_decay * params`
#'   (weight decay enters FedSGD's gradient too); the training loss reported
#'   is the full-batch loss at the global parameters, without the penalty.
#' * A local run fails (class `fedagg_error_diverged`) as soon as its loss or
#'   parameters are not finite.
#'
#' @param model A [model][models].
#' @param algorithm A [client algorithm][client_algorithms] or its name:
#'   `"fedavg"` (local training), `"fedsgd"` (one full-batch gradient),
#'   `"fedprox"`, `"scaffold"`, `"fednova"`.
#' @param epochs Local epochs E.
#' @param batch_size Minibatch size B; `Inf` for full batch.
#' @param lr Learning rate.
#' @param weight_decay,momentum Shorthands for `optimizer = local_sgd(momentum,
#'   weight_decay)`, used when `optimizer` is `NULL`.
#' @param optimizer A [local optimizer][local_optimizers] (`NULL`:
#'   [local_sgd()] with `momentum` and `weight_decay`).
#' @param shuffle Shuffle the samples every epoch (seeded by `seed`)?
#' @param seed Seed of the sample order.
#' @param stream The client's own random stream (servers pass the client's
#'   position), so its order does not depend on which others train.
#' @return A `fed_train_config` list.
#' @examples
#' train_config(model_softmax(60, 10), epochs = 1, batch_size = 10, lr = 0.01)
#' @export
train_config <- function(model, algorithm = c("fedavg", "fedsgd"), epochs = 1, batch_size = 10, lr = 0.01,
                         weight_decay = 0, momentum = 0, shuffle = TRUE, seed = 1, stream = 1, optimizer = NULL) {
  check_required_args()
  assert_model(model)
  algorithm <- as_algorithm(algorithm)
  if (!identical(batch_size, Inf)) batch_size <- assert_count(batch_size, min = 1L)
  optimizer <- if (is.null(optimizer)) local_sgd(momentum, weight_decay) else assert_local_optimizer(optimizer)
  if (algorithm$kind == "fednova" && optimizer$kind != "sgd") {
    fedagg_abort("{.fn fednova} normalises plain or momentum SGD steps: its local optimizer must be {.fn local_sgd}, not {optimizer$label}.")
  }
  structure(list(
    model = model,
    algorithm = algorithm,
    optimizer = optimizer,
    epochs = assert_count(epochs, min = 1L),
    batch_size = as.double(batch_size),
    lr = assert_number(lr, 0, lower_open = TRUE),
    shuffle = assert_flag(shuffle),
    seed = assert_count(seed),
    stream = assert_count(stream),
    control = NULL
  ), class = "fed_train_config")
}

is_fedsgd <- function(config) config$algorithm$kind == "fedsgd"

#' @export
format.fed_train_config <- function(x, ...) {
  what <- if (is_fedsgd(x)) "FedSGD: one full-batch gradient" else
    sprintf("%s: E = %d, B = %s, %s", x$algorithm$label, x$epochs, format(x$batch_size),
            if (x$shuffle) "shuffled" else "in order")
  sprintf("<fed_train_config> %s; lr = %s, local optimizer %s", what, format(x$lr), x$optimizer$label)
}

#' @export
print.fed_train_config <- function(x, ...) {
  cat(format(x), "\n", sep = "")
  invisible(x)
}

assert_train_config <- function(config, call = rlang::caller_env()) {
  if (!inherits(config, "fed_train_config")) {
    fedagg_abort("{.arg config} must come from {.fn train_config}, not {obj_desc(config)}.", call = call)
  }
  config
}

# The name of a client algorithm in the Rust core. FedSGD trains as FedAvg's
# "gradient" work; an algorithm Rust does not know must never run silently
# as another one.
rust_algorithm <- function(alg, call = rlang::caller_env()) {
  if (identical(alg$kind, "scaffold") && identical(alg$settings$correction, "step")) return("scaffold_step")
  lever_part("algorithm", alg$kind %||% "fedavg", call = call)$rust
}

# The Rust core's round settings. `epochs` may be one per client; `round`
# carries the server's part (controls, server optimizer, diagnostics), and
# round_defaults what it leaves out.
rust_config <- function(config, weights, epochs = config$epochs, round = list()) {
  opt <- config$optimizer
  alg <- config$algorithm
  server <- round$server
  if (!is.null(server) && !all(names(round_defaults$server) %in% names(server))) {
    round$server <- merge_settings(round_defaults$server, server)
  }
  # Built in one c() rather than merged entry by entry: a round builds it
  # once per call into Rust, and merging cost 50 us of a 4 ms round.
  c(list(work = if (is_fedsgd(config)) "gradient" else "sgd", weights = weights,
         epochs = as.double(epochs), batch_size = config$batch_size, lr = config$lr,
         weight_decay = opt$weight_decay, momentum = opt$momentum, shuffle = config$shuffle,
         seed = as.double(config$seed),
         algorithm = round$algorithm %||% rust_algorithm(alg),
         mu = alg$settings$mu %||% 0, optimizer = opt$kind, beta1 = opt$beta1, beta2 = opt$beta2, eps = opt$eps,
         alpha = opt$alpha),
    round_defaults[!(names(round_defaults) %in% names(round))],
    round[names(round) != "algorithm"])
}

round_defaults <- list(control = NULL, client_controls = NULL, n_nodes = 1, diagnostics = TRUE,
                       server = list(kind = "sgd", lr = 1, momentum = 0, beta1 = 0, beta2 = 0, tau = 1e-3,
                                     m = NULL, v = NULL))

# `defaults` with the entries of `given` put in (NULL ones kept as NULL
# entries), a list entry of both merged one level down: what
# utils::modifyList(keep.null = TRUE) does for these flat settings, at a
# fraction of its cost (it runs several times a round).
merge_settings <- function(defaults, given) {
  for (name in names(given)) {
    value <- given[[name]]
    if (is.list(value) && is.list(defaults[[name]]) && !is.data.frame(value)) {
      merged <- defaults[[name]]
      for (inner in names(value)) merged[inner] <- list(value[[inner]])
      value <- merged
    }
    defaults[name] <- list(value)
  }
  defaults
}

# FedNova's normaliser a_i of tau local steps with momentum rho.
fednova_a <- function(tau, rho) if (rho > 0) (tau - rho * (1 - rho^tau) / (1 - rho)) / (1 - rho) else tau

# Local training of a custom R model: the same client algorithms and local
# optimizers as the Rust solver. Returns the client's new parameters, its
# steps and, for SCAFFOLD, its new control variate.
custom_local_train <- function(model, params, x, y, config, epochs = config$epochs, c_i = NULL) {
  template <- params
  theta <- flatten_any(params, "params", NULL)
  global <- theta
  n <- nrow(x)
  opt <- config$optimizer
  alg <- config$algorithm
  mu <- alg$settings$mu %||% 0
  scaffold <- alg$kind == "scaffold"
  after_step <- identical(alg$settings$correction, "step")
  c_server <- if (scaffold) config$control %||% numeric(length(theta))
  c_i <- if (scaffold) c_i %||% numeric(length(theta))
  loss_grad_at <- function(theta, rows) {
    out <- tryCatch(model$loss_grad(relist_like(theta, template), x[rows, , drop = FALSE], y[rows]),
                    error = function(e) local_failure("the custom model's loss_grad() failed", "user_code", e))
    grad <- if (is.list(out)) unlist(out$grad, use.names = FALSE)
    if (!is.numeric(grad) || length(grad) != length(theta) || !is.numeric(out$loss) || length(out$loss) != 1L) {
      local_failure("the custom loss_grad() must return list(loss = <number>, grad = <shaped like params>)",
                    "user_code")
    }
    if (!is.finite(out$loss) || !all(is.finite(grad))) {
      local_failure(sprintf("training diverged: loss_grad() returned a non-finite %s (try a smaller learning rate)",
                            if (!is.finite(out$loss)) sprintf("loss (%s)", format(out$loss)) else "gradient"),
                    "diverged")
    }
    list(loss = out$loss, grad = grad + opt$weight_decay * theta)
  }
  if (is_fedsgd(config)) {
    out <- loss_grad_at(theta, seq_len(n))
    return(list(vector = theta - config$lr * out$grad, n_samples = n, train_loss = out$loss, steps = 1))
  }
  batch <- if (is.finite(config$batch_size)) min(config$batch_size, n) else n
  first <- numeric(length(theta))
  second <- numeric(length(theta))
  order <- seq_len(n)
  loss_sum <- 0
  t <- 0
  for (epoch in seq_len(epochs)) {
    if (config$shuffle) {
      order <- with_seed(derive_seed(config$seed, config$stream, epoch), order[sample.int(n)])
    }
    for (start in seq(1L, n, by = batch)) {
      rows <- order[start:min(start + batch - 1L, n)]
      out <- loss_grad_at(theta, rows)
      loss_sum <- loss_sum + out$loss * length(rows)
      g <- out$grad
      if (mu > 0) g <- g + mu * (theta - global)
      if (scaffold && !after_step) g <- g - c_i + c_server
      t <- t + 1
      switch(opt$kind,
        sgd = if (opt$momentum > 0) {
          first <- opt$momentum * first + g
          theta <- theta - config$lr * first
        } else {
          theta <- theta - config$lr * g
        },
        adam = {
          first <- opt$beta1 * first + (1 - opt$beta1) * g
          second <- opt$beta2 * second + (1 - opt$beta2) * g^2
          theta <- theta - config$lr * (first / (1 - opt$beta1^t)) / (sqrt(second / (1 - opt$beta2^t)) + opt$eps)
        },
        rmsprop = {
          second <- opt$alpha * second + (1 - opt$alpha) * g^2
          theta <- theta - config$lr * g / (sqrt(second) + opt$eps)
        },
        adagrad = {
          second <- second + g^2
          theta <- theta - config$lr * g / (sqrt(second) + opt$eps)
        })
      if (scaffold && after_step) theta <- theta - config$lr * c_server + config$lr * c_i
    }
    if (!all(is.finite(theta))) {
      local_failure("training diverged: the parameters became non-finite (try a smaller learning rate)", "diverged")
    }
  }
  list(vector = theta, n_samples = n, train_loss = loss_sum / (n * epochs), steps = t,
       control = if (scaffold) c_i - c_server + (global - theta) / (t * config$lr))
}

# A failure inside one client's local work; callers add the client and round.
# `kind` is the class the caller raises: "client", "diverged" or "user_code".
local_failure <- function(message, kind = "client", parent = NULL) {
  rlang::abort(message, class = "fedagg_local_failure", kind = kind, parent = parent)
}

# A seed for (seed, a, b) that stays a valid integer seed.
derive_seed <- function(seed, a, b = 0) {
  as.integer((as.double(seed) * 1000003 + as.double(a) * 7919 + b) %% 2147483647)
}

#' Learning-rate schedules
#'
#' The learning rate clients use in round `r` (counting from 1), given the
#' initial rate `lr`:
#' * `lr_constant()`: `lr`.
#' * `lr_step(gamma, every)`: `lr * gamma^floor((r - 1) / every)` (for
#'   example 0.9 every 3 rounds).
#' * `lr_exponential(gamma)`: `lr * gamma^(r - 1)`.
#' * `lr_cosine(period, min_lr)`: cosine annealing as PyTorch's
#'   `CosineAnnealingLR`, `min_lr + (lr - min_lr) * (1 + cos(pi * min(r - 1,
#'   period) / period)) / 2`, so the last round of a period still trains
#'   (its rate is above `min_lr`); `period` defaults to the last round of
#'   the current `fit()`, counted from the first round of the server.
#'
#' No schedule raises the rate above `lr`, and a server refuses a round
#' whose rate is not a positive finite number (an exponential decay run
#' long enough underflows to 0), with an error naming the round.
#'
#' @param gamma Decay factor in (0, 1].
#' @param every Rounds between step decays.
#' @param min_lr Floor of the cosine schedule, `>= 0` and below the base
#'   rate.
#' @param period Rounds of one cosine half-period (`NULL`: up to the last
#'   round of the current `fit()` call).
#' @return A `fed_lr_schedule`: call it as `schedule(lr, round, rounds)`.
#' @examples
#' s <- lr_step(0.9, every = 3)
#' s
#' s(0.1, 1:7)
#' lr_cosine()(0.1, 1:5, rounds = 5)
#' lr_cosine(period = 20, min_lr = 0.001)
#' @name lr_schedules
NULL

#' @rdname lr_schedules
#' @export
lr_constant <- function() {
  new_lr_schedule("constant", function(lr, round, rounds = NULL) rep(lr, length(round)))
}

#' @rdname lr_schedules
#' @export
lr_step <- function(gamma = 0.9, every = 3) {
  gamma <- assert_number(gamma, 0, 1, lower_open = TRUE)
  every <- assert_count(every, min = 1L)
  new_lr_schedule(sprintf("step (x%s every %d rounds)", format(gamma), every),
                  function(lr, round, rounds = NULL) lr * gamma^floor((round - 1) / every))
}

#' @rdname lr_schedules
#' @export
lr_exponential <- function(gamma = 0.98) {
  gamma <- assert_number(gamma, 0, 1, lower_open = TRUE)
  new_lr_schedule(sprintf("exponential (x%s per round)", format(gamma)),
                  function(lr, round, rounds = NULL) lr * gamma^(round - 1))
}

#' @rdname lr_schedules
#' @export
lr_cosine <- function(period = NULL, min_lr = 0) {
  period <- assert_count(period, min = 1L, allow_null = TRUE)
  min_lr <- assert_number(min_lr, 0)
  new_lr_schedule(sprintf("cosine (to %s%s)", format(min_lr), if (is.null(period)) "" else sprintf(" over %d rounds", period)),
                  function(lr, round, rounds = NULL) {
                    if (min_lr >= lr) {
                      fedagg_abort("The cosine schedule's {.arg min_lr} ({min_lr}) must be below the base learning rate ({lr}).")
                    }
                    t <- period %||% rounds %||% max(round)
                    progress <- pmin(round - 1, t) / t
                    min_lr + (lr - min_lr) * (1 + cos(pi * progress)) / 2
                  })
}

new_lr_schedule <- function(label, fun) {
  structure(fun, label = label, class = "fed_lr_schedule")
}

#' @export
format.fed_lr_schedule <- function(x, ...) paste0("<fed_lr_schedule> ", attr(x, "label"))

#' @export
print.fed_lr_schedule <- function(x, ...) {
  cat(format(x), "\n", sep = "")
  invisible(x)
}

as_lr_schedule <- function(x, arg = rlang::caller_arg(x), call = rlang::caller_env()) {
  if (inherits(x, "fed_lr_schedule")) return(x)
  if (is.character(x) && length(x) == 1L && !is.na(x)) {
    name <- assert_choice(x, c("constant", "step", "exponential", "cosine"), arg = arg, call = call)
    return(switch(name, constant = lr_constant(), step = lr_step(), exponential = lr_exponential(),
                  cosine = lr_cosine()))
  }
  fedagg_abort("{.arg {arg}} must be a schedule such as {.code lr_step()}, not {obj_desc(x)}.", call = call)
}
