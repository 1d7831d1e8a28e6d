# Plain-R reference implementations of the federated pipeline (local training,
# FedProx, SCAFFOLD, FedNova, FedSGD, server optimizers, round diagnostics and
# client selection). They are written from the papers' formulas only: slow,
# obvious R with loops and no calls into fedagg. They build on helper-models.R
# (ref_grad, ref_loss, relist_params).
#
# Parameters are named lists list(W1 = <in x out>, b1 = <out>, ...); "flat"
# means unlist(params, use.names = FALSE). Labels y are 0-based class codes.

pref_flat <- function(p) {
  if (is.null(p)) return(NULL)
  if (is.list(p)) unlist(lapply(p, as.vector), use.names = FALSE) else as.vector(p)
}

# Element i of a setting given either as a scalar or as a per-client vector.
pref_per_client <- function(v, i) if (length(v) == 1L) v else v[[i]]

# One client's local training.
# Gradient at each step, in this order:
#   g = mean minibatch gradient + weight_decay * y              (L2 as in torch.optim)
#     + mu * (y - global)                                       (FedProx, Li et al. 2020, eq. 2)
#     - c_i + c                                                 (SCAFFOLD, Karimireddy et al. 2020, Alg. 1 line 10)
# then one torch.optim step (with scaffold_after_step, SCAFFOLD's correction
# is applied after it instead, y <- y - lr (c - c_i), as NIID-Bench's
# ScaffoldOptimizer.step_custom does) (sgd with heavy-ball momentum, adam, rmsprop,
# adagrad), with the optimizer state reset at the start of the run.
# SCAFFOLD control variate, option II (Alg. 1 line 12):
#   c_i+ = c_i - c + (x - y_i) / (K * eta_l).
ref_local_run <- function(params, global = params, x, y, output, epochs, batch, lr,
                          optimizer = "sgd", momentum = 0, weight_decay = 0,
                          beta1 = 0.9, beta2 = 0.999, eps = 1e-8, alpha = 0.99,
                          mu = 0, c = NULL, c_i = NULL, order = NULL, scaffold_after_step = FALSE) {
  optimizer <- match.arg(optimizer, c("sgd", "adam", "rmsprop", "adagrad"))
  w <- pref_flat(params)
  x_global <- pref_flat(global)
  d <- length(w)
  scaffold <- !is.null(c)
  if (scaffold) {
    c <- pref_flat(c)
    c_i <- if (is.null(c_i)) numeric(d) else pref_flat(c_i)
  }
  n <- nrow(x)
  bs <- if (is.infinite(batch)) n else min(batch, n)

  # optimizer state
  buf <- numeric(d)   # sgd momentum buffer
  m <- numeric(d)     # adam first moment
  v <- numeric(d)     # adam / rmsprop second moment
  s <- numeric(d)     # adagrad accumulator
  t <- 0
  loss_sum <- 0
  seen <- 0

  for (e in seq_len(epochs)) {
    rows_all <- if (is.null(order)) seq_len(n) else order[[e]]
    starts <- seq(1, length(rows_all), by = bs)
    for (st in starts) {
      rows <- rows_all[st:min(st + bs - 1, length(rows_all))]
      xb <- x[rows, , drop = FALSE]
      yb <- y[rows]
      cur <- relist_params(w, params)
      loss_sum <- loss_sum + ref_loss(cur, xb, yb, output) * length(rows)
      seen <- seen + length(rows)

      g <- unlist(ref_grad(cur, xb, yb, output), use.names = FALSE)
      g <- g + weight_decay * w
      g <- g + mu * (w - x_global)
      if (scaffold && !scaffold_after_step) g <- g - c_i + c

      t <- t + 1
      if (optimizer == "sgd") {
        if (momentum > 0) {
          buf <- momentum * buf + g
          w <- w - lr * buf
        } else {
          w <- w - lr * g
        }
      } else if (optimizer == "adam") {
        m <- beta1 * m + (1 - beta1) * g
        v <- beta2 * v + (1 - beta2) * g^2
        m_hat <- m / (1 - beta1^t)
        v_hat <- v / (1 - beta2^t)
        w <- w - lr * m_hat / (sqrt(v_hat) + eps)
      } else if (optimizer == "rmsprop") {
        v <- alpha * v + (1 - alpha) * g^2
        w <- w - lr * g / (sqrt(v) + eps)
      } else if (optimizer == "adagrad") {
        s <- s + g^2
        w <- w - lr * g / (sqrt(s) + eps)
      }
      if (scaffold && scaffold_after_step) w <- w - lr * (c - c_i)
    }
  }

  out <- list(params = relist_params(w, params), steps = t,
              loss = if (seen > 0) loss_sum / seen else NA_real_)
  if (scaffold) out$c_i_new <- c_i - c + (x_global - w) / (t * lr)
  out
}

# FedNova (Wang et al. 2020, "Tackling the Objective Inconsistency Problem"):
# a_i = ||a_i||_1 for local SGD with momentum rho (Sec. 5 / App.):
#   rho = 0: a_i = tau_i;  else a_i = [tau_i - rho (1 - rho^tau_i) / (1 - rho)] / (1 - rho).
ref_fednova_a <- function(tau, rho = 0) {
  if (rho == 0) return(tau)
  (tau - rho * (1 - rho^tau) / (1 - rho)) / (1 - rho)
}

# FedNova eq. (6)-(7): normalised direction d_i = Delta_i / a_i, effective
# steps tau_eff = sum_i p_i a_i, global update D = tau_eff * sum_i p_i d_i.
ref_fednova_direction <- function(deltas, a, p) {
  p <- p / sum(p)
  tau_eff <- 0
  for (i in seq_along(a)) tau_eff <- tau_eff + p[i] * a[i]
  dir <- numeric(length(pref_flat(deltas[[1]])))
  for (i in seq_along(deltas)) dir <- dir + p[i] * pref_flat(deltas[[i]]) / a[i]
  tau_eff * dir
}

# Server optimizers (Reddi et al. 2021, "Adaptive Federated Optimization",
# Algorithm 2: FedAdagrad / FedAdam / FedYogi, no bias correction, states at
# zero) plus FedAvgM (Hsu et al. 2019) for kind = "sgd". D is the pseudo-
# gradient (average client update, y_i - x), so the step is x + lr * (...).
ref_server_step <- function(x, D, state = NULL, kind = "sgd", lr = 1, momentum = 0,
                            beta1 = 0.9, beta2 = 0.99, tau = 1e-3) {
  x <- pref_flat(x)
  D <- pref_flat(D)
  m <- if (is.null(state$m)) numeric(length(x)) else state$m
  v <- if (is.null(state$v)) numeric(length(x)) else state$v
  if (kind == "sgd") {
    v <- momentum * v + D
    x <- x + lr * v
  } else if (kind == "adagrad") {
    m <- beta1 * m + (1 - beta1) * D
    v <- v + D^2
    x <- x + lr * m / (sqrt(v) + tau)
  } else if (kind == "adam") {
    m <- beta1 * m + (1 - beta1) * D
    v <- beta2 * v + (1 - beta2) * D^2
    x <- x + lr * m / (sqrt(v) + tau)
  } else if (kind == "yogi") {
    m <- beta1 * m + (1 - beta1) * D
    v <- v - (1 - beta2) * D^2 * sign(v - D^2)
    x <- x + lr * m / (sqrt(v) + tau)
  } else {
    stop("unknown server kind: ", kind)
  }
  list(x = x, state = list(m = m, v = v))
}

# Round diagnostics on the client updates Delta_i = y_i - x:
# norms, mean cosine to the weighted mean update, and gradient diversity
# sum ||Delta_i||^2 / ||sum Delta_i||^2 (Yin et al. 2018, Def. 1).
ref_diagnostics <- function(deltas, p, x_old, x_new) {
  deltas <- lapply(deltas, pref_flat)
  p <- p / sum(p)
  k <- length(deltas)
  norms <- numeric(k)
  for (i in seq_len(k)) norms[i] <- sqrt(sum(deltas[[i]]^2))
  mean_update <- numeric(length(deltas[[1]]))
  total <- numeric(length(deltas[[1]]))
  for (i in seq_len(k)) {
    mean_update <- mean_update + p[i] * deltas[[i]]
    total <- total + deltas[[i]]
  }
  mean_norm <- sqrt(sum(mean_update^2))
  cosines <- numeric(k)
  for (i in seq_len(k)) cosines[i] <- sum(deltas[[i]] * mean_update) / (norms[i] * mean_norm)
  list(update_norm = sqrt(sum((pref_flat(x_new) - pref_flat(x_old))^2)),
       client_norms = norms,
       client_norm_mean = mean(norms),
       client_norm_sd = stats::sd(norms),
       cosines = cosines,
       cosine_mean = mean(cosines),
       gradient_diversity = sum(norms^2) / sum(total^2))
}

# A whole federated run (McMahan et al. 2017 FedAvg; FedProx, Li et al. 2020;
# SCAFFOLD option II, Karimireddy et al. 2020; FedNova, Wang et al. 2020;
# FedSGD; server optimizers of Reddi et al. 2021), with pinned client schedule
# (schedule[[r]] = selected client indices of round r) and no shuffling, so no
# RNG is involved.
#   clients: list of list(x, y)
#   epochs, batch: scalar or per-client vector (indexed by client number)
#   weights: "samples" (p_i = n_i / sum n over the selected clients), "equal",
#            or a numeric vector of per-client weights
#   mu: FedProx proximal coefficient (used by every algorithm; 0 = none)
#   orders: optional function(round, client) giving `order` for ref_local_run
# Returns list(params, history) with one history entry per round.
ref_federated <- function(params0, clients, rounds, schedule, output,
                          algorithm = "fedavg",
                          server = list(kind = "sgd", lr = 1, momentum = 0),
                          weights = "samples", epochs = 1, batch = Inf, lr = 0.1,
                          optimizer = "sgd", momentum = 0, weight_decay = 0,
                          beta1 = 0.9, beta2 = 0.999, eps = 1e-8, alpha = 0.99,
                          mu = 0, orders = NULL, scaffold_after_step = FALSE) {
  algorithm <- match.arg(algorithm, c("fedavg", "fedprox", "scaffold", "fednova", "fedsgd"))
  srv <- list(kind = "sgd", lr = 1, momentum = 0, beta1 = 0.9, beta2 = 0.99, tau = 1e-3)
  srv[names(server)] <- server

  x <- pref_flat(params0)
  d <- length(x)
  N <- length(clients)
  state <- list(m = numeric(d), v = numeric(d))
  c_srv <- numeric(d)
  c_cli <- replicate(N, numeric(d), simplify = FALSE)
  history <- vector("list", rounds)

  for (r in seq_len(rounds)) {
    S <- schedule[[r]]
    global <- relist_params(x, params0)
    deltas <- vector("list", length(S))
    steps <- numeric(length(S))
    losses <- numeric(length(S))
    n_i <- numeric(length(S))
    c_new <- vector("list", length(S))

    for (j in seq_along(S)) {
      i <- S[j]
      cl <- clients[[i]]
      n_i[j] <- nrow(cl$x)
      if (algorithm == "fedsgd") {
        g <- unlist(ref_grad(global, cl$x, cl$y, output), use.names = FALSE) + weight_decay * x
        deltas[[j]] <- -lr * g
        steps[j] <- 1
        losses[j] <- ref_loss(global, cl$x, cl$y, output)
      } else {
        run <- ref_local_run(global, global, cl$x, cl$y, output,
                             epochs = pref_per_client(epochs, i),
                             batch = pref_per_client(batch, i), lr = lr,
                             optimizer = optimizer, momentum = momentum,
                             weight_decay = weight_decay, beta1 = beta1, beta2 = beta2,
                             eps = eps, alpha = alpha, mu = mu,
                             c = if (algorithm == "scaffold") c_srv else NULL,
                             c_i = if (algorithm == "scaffold") c_cli[[i]] else NULL,
                             order = if (is.null(orders)) NULL else orders(r, i),
                             scaffold_after_step = scaffold_after_step)
        deltas[[j]] <- pref_flat(run$params) - x
        steps[j] <- run$steps
        losses[j] <- run$loss
        if (algorithm == "scaffold") c_new[[j]] <- run$c_i_new
      }
    }

    p <- if (is.numeric(weights)) {
      weights[S]
    } else if (weights == "samples") {
      n_i
    } else if (weights == "equal") {
      rep(1, length(S))
    } else stop("unknown weights: ", weights)
    p <- p / sum(p)

    a <- NULL
    if (algorithm == "fednova") {
      rho <- if (optimizer == "sgd") momentum else 0
      a <- numeric(length(S))
      for (j in seq_along(S)) a[j] <- ref_fednova_a(steps[j], rho)
      D <- ref_fednova_direction(deltas, a, p)
    } else {
      D <- numeric(d)
      for (j in seq_along(S)) D <- D + p[j] * deltas[[j]]
    }

    if (algorithm == "scaffold") {
      # Alg. 1 line 17: c <- c + (1/N) sum_{i in S} (c_i+ - c_i); then c_i <- c_i+.
      dc <- numeric(d)
      for (j in seq_along(S)) dc <- dc + (c_new[[j]] - c_cli[[S[j]]])
      c_srv <- c_srv + dc / N
      for (j in seq_along(S)) c_cli[[S[j]]] <- c_new[[j]]
    }

    x_old <- x
    st <- ref_server_step(x, D, state, kind = srv$kind, lr = srv$lr, momentum = srv$momentum,
                          beta1 = srv$beta1, beta2 = srv$beta2, tau = srv$tau)
    x <- st$x
    state <- st$state

    history[[r]] <- list(round = r, selected = S, weights = p, steps = steps, a = a,
                         losses = losses, deltas = deltas, D = D, x = x,
                         server_state = state,
                         c = if (algorithm == "scaffold") c_srv else NULL,
                         diagnostics = ref_diagnostics(deltas, p, x_old, x))
  }

  out <- list(params = relist_params(x, params0), history = history)
  if (algorithm == "scaffold") {
    out$c <- c_srv
    out$c_i <- c_cli
  }
  out
}

# Power-of-choice selection (Cho et al. 2022): of the candidate clients, the m
# with the highest local losses; ties go to the earlier candidate. Returned in
# order of decreasing loss.
ref_power_of_choice <- function(candidates, losses, m) {
  idx <- order(-losses, seq_along(losses))
  candidates[idx[seq_len(min(m, length(candidates)))]]
}

# Linear client score: similarity_w * cos(last update, global direction)
# + volume_w * n / max(n) + availability_w * availability share (NA cos = 0).
ref_score <- function(similarity_w, volume_w, availability_w, cos_last, n, avail_share) {
  cos_last[is.na(cos_last)] <- 0
  similarity_w * cos_last + volume_w * n / max(n) + availability_w * avail_share
}
