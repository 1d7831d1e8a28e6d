#' Tune a federation's levers: successive halving over configurations
#'
#' `fed_tune()` searches the levers of a federation for the configuration
#' that reaches a target on the validation data in the fewest rounds (or,
#' without a target, that ends best). Every configuration is a trial: a
#' server built by `make_server()` from the configuration's values. With
#' successive halving (Jamieson and Talwalkar 2016; Li et al. 2018 for
#' Hyperband) every trial first runs a few rounds; the best third go on to
#' three times as many rounds, and so on up to `rounds`, so hopeless trials
#' stop early and the budget goes to the promising ones. A trial that goes
#' on continues its own server (a server continues exactly where it
#' stopped), so no round is run twice.
#'
#' **Parallel.** The trials of each rung run with `future.apply`, under any
#' `future` plan (`future::plan(multisession, workers = 4)` on one machine,
#' a cluster or a scheduler with the future backends). Each trial is
#' reproducible from its own seed (`seed` + its number, given to
#' `make_server()` as `seed`), so the results are identical under every plan.
#'
#' **Validation, not test.** By default the trials are ranked on the
#' validation metric (`val_accuracy`, or `val_loss` for a model without
#' accuracy): each node's held-out split (`fed_nodes(..., validation = )`).
#' Ranking on the test set would make the winner's test score an optimistic
#' estimate: the test set has then been used to choose. A test metric can be
#' named explicitly, with a warning.
#'
#' **From a diagnosis.** With `from` (a [fed_diagnose()] result, or a server
#' to diagnose), the levers of its findings above "info" become the first
#' configurations tried: the baseline (the first value of each lever in
#' `space`) with that finding's levers applied, for each lever `make_server()`
#' takes.
#'
#' @param make_server A function that returns a new [Server] (not yet
#'   trained) from the levers in `space`, given as named arguments, and
#'   `seed` if it takes one (or `...`).
#' @param space A named list of the values to try for each lever: vectors
#'   (`lr = c(0.01, 0.05, 0.1)`) or lists of objects (`algorithm =
#'   list(fedavg(), fedprox(0.1))`). Every name must be an argument of
#'   `make_server()`. The configurations are all the combinations (or a
#'   seeded sample of `n_configs` of them); the first value of each lever is
#'   the baseline.
#' @param rounds Rounds of a full trial (the most any trial runs).
#' @param budget Total rounds all trials may run together; at least
#'   `rounds` (one full trial). The default is 20 full trials' worth.
#' @param metric A history column to rank by (default `val_accuracy`, or
#'   `val_loss`); accuracy is maximised, everything else minimised (as in [early_stopping()]).
#' @param target A value of `metric` to reach: trials are then ranked by the
#'   rounds they took to reach it (`rounds_to_target`: the first round at
#'   which the mean of the last 3 rounds reaches it, so that a trial
#'   swinging around the target does not count as there; `NA` unless the
#'   trial still holds the target at its end), then by their final value. `NULL`: by their final value (the mean of their last 3
#'   rounds).
#' @param method `"successive_halving"` or `"grid"` (every configuration
#'   runs `rounds`, within the budget).
#' @param eta The halving factor: a third (`eta = 3`) of the trials go on
#'   from each rung.
#' @param min_rounds Rounds of the first rung (default: `rounds / eta^s`,
#'   at least 2, for the `s` rungs the configurations call for).
#' @param n_configs Try a seeded sample of this many configurations
#'   (default: all combinations, or as many as the budget allows).
#' @param from `NULL`, a [fed_diagnose()] result, or a [Server] to diagnose:
#'   its suggested levers are tried first.
#' @param seconds Wall-clock limit: once passed, no trial is promoted to
#'   another rung.
#' @param seed Seed of the sample of configurations and of the trials.
#' @return A `fed_tuning`: a list with `results` (a data frame with one row
#'   per trial, best first: `rank`, `trial`, one column per lever, `rounds`
#'   run, `rounds_to_target`, `final` and `best` values of the metric,
#'   `status` ("done", "stopped at round N", "failed: ..."), `seconds` and
#'   `seed`), `best_config` (a named list of lever values), `best_server`
#'   (the best trial's server, ready to `fit()` further), and the settings.
#'   `print()`, `summary()`, `plot()` and `as.data.frame()` have methods.
#' @references Jamieson, K. and Talwalkar, A. (2016). Non-stochastic best
#'   arm identification and hyperparameter optimization. AISTATS.
#'
#'   Li, L. et al. (2018). Hyperband: a novel bandit-based approach to
#'   hyperparameter optimization. JMLR 18.
#' @seealso [fed_diagnose()], `vignette("convergence", package = "fedagg")`.
#' @examples
#' set.seed(1)
#' x <- matrix(rnorm(2000), 400)
#' y <- factor(max.col(x[, 1:3]))
#' nodes <- fed_nodes(x, y, partition_dirichlet(y, n_clients = 8, alpha = 0.5, min_size = 10, seed = 1),
#'                    validation = 0.25, seed = 1)
#' make <- function(lr, epochs, seed) {
#'   fed_server(model_softmax(5, 3), nodes, fraction = 0.5, lr = lr, epochs = epochs, seed = seed)
#' }
#' tuned <- fed_tune(make, list(lr = c(0.01, 0.1), epochs = c(1, 5)), rounds = 9, budget = 30)
#' tuned
#' tuned$best_config
#' tuned$best_server$fit(3)
#' @export
fed_tune <- function(make_server, space, rounds, budget = 20 * rounds, metric = NULL, target = NULL,
                     method = c("successive_halving", "grid"), eta = 3, min_rounds = NULL, n_configs = NULL,
                     from = NULL, seconds = Inf, seed = 1L) {
  check_required_args()
  if (!is.function(make_server)) {
    fedagg_abort("{.arg make_server} must be a function that returns a {.cls Server}, not {obj_desc(make_server)}.")
  }
  rounds <- assert_count(rounds, min = 1L)
  budget <- assert_number(budget, 0)
  method <- assert_choice(method, c("successive_halving", "grid"))
  eta <- assert_number(eta, 2)
  min_rounds <- assert_count(min_rounds, min = 1L, allow_null = TRUE)
  n_configs <- assert_count(n_configs, min = 1L, allow_null = TRUE)
  if (!identical(seconds, Inf)) seconds <- assert_number(seconds, 0, lower_open = TRUE)
  seed <- assert_count(seed)
  if (!is.null(target)) target <- assert_number(target)
  if (budget < rounds) {
    fedagg_abort(c("{.arg budget} ({budget} round{?s}) is below one full trial ({.arg rounds} = {rounds}).",
                   i = "Give a budget of at least {rounds} rounds, or fewer {.arg rounds}."))
  }
  space <- check_tune_space(space, make_server)
  configs <- tune_configs(space, n_configs, seed)
  if (!is.null(from)) configs <- c(diagnosis_configs(from, space, make_server), configs)
  configs <- unique(configs)
  plan <- tune_plan(length(configs), rounds, budget, method, eta, min_rounds)
  configs <- configs[seq_len(plan$n)]
  takes_seed <- any(c("seed", "...") %in% names(formals(make_server)))

  # The first trial's server is built here, so that a make_server() that
  # fails or returns no server is an error at once, not n failed trials.
  probe <- build_trial_server(make_server, configs[[1]], if (takes_seed) seed + 1L, call = rlang::current_env())
  metric <- tune_metric(metric, probe)

  trials <- lapply(seq_along(configs), function(i) {
    list(id = i, config = configs[[i]], seed = seed + i, server = NULL, rounds = 0L, status = "pending",
         curve = numeric(), seconds = 0)
  })
  trials[[1]]$server <- probe
  started <- Sys.time()
  alive <- seq_along(trials)
  for (rung in seq_along(plan$rungs)) {
    to <- plan$rungs[rung]
    if (rung > 1 && as.numeric(Sys.time() - started, units = "secs") > seconds) {
      for (i in alive) trials[[i]]$status <- sprintf("stopped at round %d (time)", trials[[i]]$rounds)
      break
    }
    results <- run_trials(trials[alive], to, make_server, takes_seed, metric$column, stream_seed = seed + 1000L * rung)
    trials[alive] <- results
    ok <- alive[vapply(trials[alive], function(t) !startsWith(t$status, "failed"), logical(1))]
    if (rung == length(plan$rungs) || !length(ok)) break
    keep <- max(1L, floor(length(ok) / eta))
    ranked <- ok[order_trials(trials[ok], metric, target)]
    for (i in setdiff(alive, ranked[seq_len(keep)])) {
      if (!startsWith(trials[[i]]$status, "failed")) trials[[i]]$status <- sprintf("stopped at round %d", trials[[i]]$rounds)
    }
    alive <- ranked[seq_len(keep)]
  }
  new_fed_tuning(trials, space, metric, target, method, plan, budget)
}

check_tune_space <- function(space, make_server, call = rlang::caller_env()) {
  if (!is.list(space) || !length(space) || is.null(names(space)) || any(!nzchar(names(space))) || anyDuplicated(names(space))) {
    fedagg_abort(c("{.arg space} must be a named list of the values to try for each lever, not {obj_desc(space)}.",
                   i = "For example {.code list(lr = c(0.01, 0.1), epochs = c(1, 5))}."), call = call)
  }
  args <- names(formals(make_server))
  unknown <- setdiff(names(space), args)
  if (length(unknown) && !"..." %in% args) {
    fedagg_abort(c("{.arg space} has {cli::qty(length(unknown))}lever{?s} {.val {unknown}} that {.arg make_server} does not take.",
                   i = "{.arg make_server} takes {.val {args}}."), call = call)
  }
  empty <- names(space)[lengths(space) == 0L]
  if (length(empty)) {
    fedagg_abort("{.arg space} gives no value to try for {.val {empty}}.", call = call)
  }
  lapply(space, function(values) if (is.list(values) && !is.object(values)) values else as.list(values))
}

# All combinations, in order (the first is the baseline), or a seeded
# sample of n that keeps the baseline first.
tune_configs <- function(space, n_configs, seed) {
  sizes <- lengths(space)
  total <- prod(sizes)
  index <- if (is.null(n_configs) || n_configs >= total) {
    seq_len(total)
  } else {
    with_seed(seed, c(1L, 1L + sample.int(total - 1L, n_configs - 1L)))
  }
  lapply(index, function(k) {
    pos <- arrayInd(k, sizes)
    stats::setNames(lapply(seq_along(space), function(j) space[[j]][[pos[j]]]), names(space))
  })
}

# The rungs (rounds each rung ends at) and how many configurations fit the
# budget: rung k keeps n / eta^k trials and runs them to rounds / eta^(s-k).
tune_plan <- function(n, rounds, budget, method, eta, min_rounds, call = rlang::caller_env()) {
  cost <- function(n, rungs) {
    kept <- vapply(seq_along(rungs) - 1L, function(k) max(1, floor(n / eta^k)), numeric(1))
    sum(kept * diff(c(0, rungs)))
  }
  rungs_for <- function(n) {
    if (method == "grid") return(rounds)
    first <- min_rounds %||% max(2L, floor(rounds / eta^floor(log(max(n, 1)) / log(eta))))
    first <- min(first, rounds)
    r <- first
    while (utils::tail(r, 1) < rounds) r <- c(r, min(rounds, ceiling(utils::tail(r, 1) * eta)))
    unique(r)
  }
  while (n > 1 && cost(n, rungs_for(n)) > budget) n <- n - 1L
  rungs <- rungs_for(n)
  list(n = n, rungs = rungs, cost = cost(n, rungs))
}

tune_metric <- function(metric, server, call = rlang::caller_env()) {
  columns <- names(as.data.frame(server$history))
  if (is.null(metric)) {
    metric <- intersect(c("val_accuracy", "val_loss", "val_rmse"), columns)[1]
    if (is.na(metric) || !any(vapply(server$nodes, function(n) isTRUE(n$has_validation), logical(1)))) {
      fedagg_abort(c("The nodes have no validation split to tune on.",
                     i = "Give them one: {.code fed_nodes(..., validation = 0.2)}. Tuning on the test set would make the winner's test score optimistic.",
                     i = "Or name a {.arg metric} explicitly."), call = call)
    }
  }
  if (!is.character(metric) || length(metric) != 1L || !metric %in% columns || metric %in% c("round", "clients")) {
    fedagg_abort("{.arg metric} must be one of the history's columns ({.val {setdiff(columns, c('round', 'clients'))}}), not {obj_desc(metric)}.",
                 call = call)
  }
  if (startsWith(metric, "test_")) {
    cli::cli_warn(c("Tuning on {.val {metric}}: the test set then chooses the configuration, and its test score is optimistic.",
                    i = "Rank on a validation split ({.code fed_nodes(..., validation = 0.2)}) and keep the test set for the end."),
                  class = "fedagg_warning_test_tuning")
  }
  list(column = metric, minimise = !metric_maximised(metric))
}

build_trial_server <- function(make_server, config, seed, call) {
  args <- c(config, if (!is.null(seed)) list(seed = seed))
  srv <- call_user(make_server, args, "{.arg make_server}", call = call)
  if (!inherits(srv, "Server")) {
    fedagg_abort("{.arg make_server} must return a {.cls Server}, not {obj_desc(srv)}.", call = call)
  }
  srv
}

# One rung: each trial (a new server, or its own from the last rung) runs
# to `to` rounds. A failure is the trial's status, not an error.
run_trials <- function(trials, to, make_server, takes_seed, column, stream_seed) {
  work <- function(t) {
    old <- options(fedagg.verbose = FALSE)
    on.exit(options(old))
    t0 <- Sys.time()
    t <- tryCatch({
      if (is.null(t$server)) t$server <- build_trial_server(make_server, t$config, if (takes_seed) t$seed, call = NULL)
      t$server$fit(to - t$rounds)
      t$rounds <- t$server$rounds_done
      t$curve <- t$server$history[[column]]
      t$status <- "done"
      t
    }, error = function(e) {
      t$status <- paste("failed:", paste(cli::ansi_strip(conditionMessage(e)), collapse = " "))
      if (!is.null(t$server)) t$rounds <- t$server$rounds_done
      t
    })
    t$seconds <- t$seconds + as.numeric(Sys.time() - t0, units = "secs")
    t
  }
  # Through future.apply whenever it is installed, under any plan (the
  # sequential one too), so that a make_server() that draws random numbers
  # gets the same streams whatever the plan.
  if (requireNamespace("future.apply", quietly = TRUE)) {
    future.apply::future_lapply(trials, work, future.seed = stream_seed)
  } else {
    lapply(trials, work)
  }
}

trial_summary <- function(t, metric, target) {
  v <- t$curve
  ok <- is.finite(v)
  final <- if (any(ok)) mean(utils::tail(v[ok], 3)) else NA_real_
  best <- if (any(ok)) (if (metric$minimise) min(v[ok]) else max(v[ok])) else NA_real_
  # Reached, and held at the end: a trial that touched the target and fell
  # back is not ranked as having reached it.
  reached <- rounds_to_target(v, target, metric$minimise)
  held <- !is.null(target) && is.finite(final) && (if (metric$minimise) final <= target else final >= target)
  list(final = final, best = best, rounds_to_target = if (held) reached else NA_integer_)
}

# The first round at which the mean of the last 3 rounds reaches the target
# (of the rounds so far, in the first two): a trial that touches the target
# once while swinging around it has not reached it.
rounds_to_target <- function(v, target, minimise = FALSE) {
  if (is.null(target) || !length(v)) return(NA_integer_)
  smooth <- vapply(seq_along(v), function(i) mean(v[max(1L, i - 2L):i]), numeric(1))
  hit <- which(is.finite(smooth) & (if (minimise) smooth <= target else smooth >= target))
  if (length(hit)) hit[1] else NA_integer_
}

# Best first: the fewest rounds to the target (none reached: last), then
# the final value; failed trials last.
order_trials <- function(trials, metric, target) {
  s <- lapply(trials, trial_summary, metric = metric, target = target)
  to_target <- vapply(s, function(x) as.numeric(x$rounds_to_target), numeric(1))
  final <- vapply(s, function(x) x$final, numeric(1))
  failed <- vapply(trials, function(t) startsWith(t$status, "failed"), logical(1))
  order(failed, if (is.null(target)) rep(0, length(trials)) else ifelse(is.na(to_target), Inf, to_target),
        if (metric$minimise) final else -final, seq_along(trials), na.last = TRUE)
}

lever_label <- function(value) {
  if (is.list(value) && !is.null(value$label)) return(value$label)
  if (is.function(value)) return("<function>")
  paste(format(value), collapse = ", ")
}

new_fed_tuning <- function(trials, space, metric, target, method, plan, budget) {
  ranked <- order_trials(trials, metric, target)
  trials <- trials[ranked]
  s <- lapply(trials, trial_summary, metric = metric, target = target)
  # A diagnosis may suggest levers the space does not vary: "-" where a
  # trial leaves them to make_server()'s default.
  names_all <- unique(c(names(space), unlist(lapply(trials, function(t) names(t$config)))))
  levers <- as.data.frame(lapply(stats::setNames(names_all, names_all), function(lever) {
    vapply(trials, function(t) if (lever %in% names(t$config)) lever_label(t$config[[lever]]) else "-", character(1))
  }), stringsAsFactors = FALSE, check.names = FALSE)
  results <- data.frame(rank = seq_along(trials), trial = vapply(trials, function(t) t$id, integer(1)), levers,
                        rounds = vapply(trials, function(t) as.integer(t$rounds), integer(1)),
                        rounds_to_target = vapply(s, function(x) as.integer(x$rounds_to_target), integer(1)),
                        final = vapply(s, function(x) x$final, numeric(1)),
                        best = vapply(s, function(x) x$best, numeric(1)),
                        status = vapply(trials, function(t) t$status, character(1)),
                        seconds = round(vapply(trials, function(t) t$seconds, numeric(1)), 2),
                        seed = vapply(trials, function(t) as.integer(t$seed), integer(1)),
                        stringsAsFactors = FALSE, check.names = FALSE)
  best <- if (!startsWith(trials[[1]]$status, "failed")) trials[[1]] else NULL
  structure(list(results = results, best_config = best$config, best_server = best$server,
                 curves = lapply(trials, function(t) t$curve), metric = metric$column, minimise = metric$minimise,
                 target = target, method = method, rungs = plan$rungs, budget = budget,
                 rounds_used = sum(results$rounds)),
            class = "fed_tuning")
}

# The configurations a diagnosis suggests: the baseline with each finding's
# levers (above "info") applied, for the levers make_server() takes.
diagnosis_configs <- function(from, space, make_server, call = rlang::caller_env()) {
  if (inherits(from, "Server")) from <- fed_diagnose(from)
  if (!inherits(from, "fed_diagnosis")) {
    fedagg_abort("{.arg from} must be a {.cls fed_diagnosis} or a {.cls Server}, not {obj_desc(from)}.", call = call)
  }
  args <- names(formals(make_server))
  base <- lapply(space, function(values) values[[1]])
  sets <- attr(from, "lever_sets")[from$cause[from$severity > "info"]]
  configs <- list()
  for (levers in sets) {
    for (code in levers) {
      values <- tryCatch(eval(parse(text = paste0("list(", code, ")"))[[1]], envir = asNamespace("fedagg")),
                         error = function(e) NULL)
      if (is.null(values) || is.null(names(values)) || !all(names(values) %in% args)) next
      config <- utils::modifyList(base, values)
      configs[[length(configs) + 1]] <- config[union(names(space), names(values))]
    }
  }
  configs
}
