# Machinery of test-adversarial.R: bad inputs run in child R processes
# (callr), many cases per child, so that a crash (segfault, abort, OOM kill,
# hang) is caught and named instead of taking the test run down with it.
#
# A case is a quoted call evaluated in the child, in an environment holding
# the fixtures of `adv_fixtures` (small data, models, nodes, servers, and
# `.bad`, a list of bad values). The child reports "ok" or the error's
# classes, message and `client` / `round` fields; the parent asserts.

`%adv||%` <- function(a, b) if (is.null(a)) b else a

# --- Building cases ---------------------------------------------------------

# expect: "error" (must fail with a fedagg_error_* class), "ok" (a valid edge
# input that must succeed; `why` says why it is valid) or "either" (may fail
# with `class`, but if it returns, `check` must hold).
# re: a regex the error message must match (default: the argument's name).
# class: a class the error must have, on top of the generic checks.
# generic: FALSE for the rare documented non-fedagg_error condition.
# client: the `client` field the error must carry.
# solo/timeout: run alone in its own child with this timeout (seconds).
adv_case <- function(label, expr, expect = "error", arg = NULL, re = NULL, class = NULL, check = NULL,
                     why = NULL, note = NULL, generic = TRUE, client = NULL, solo = FALSE, timeout = NULL) {
  if (is.null(re) && !is.null(arg)) re <- adv_arg_regex(arg)
  list(label = label, expr = expr, expect = expect, arg = arg, re = re, class = class, check = check,
       why = why, note = note, generic = generic, client = client, solo = solo, timeout = timeout)
}

adv_arg_regex <- function(arg) paste0("(^|[^A-Za-z0-9_.])", gsub(".", "\\.", arg, fixed = TRUE), "($|[^A-Za-z0-9_])")

# A group: the cases of one exported function (nested lists flattened).
adv_group <- function(fn, ...) {
  cases <- adv_flatten(list(...))
  lapply(cases, function(cs) c(list(fn = fn), cs))
}

adv_flatten <- function(x) {
  out <- list()
  for (el in x) {
    if (is.null(el)) next
    if (!is.null(el$label) && !is.null(el$expect)) out[[length(out) + 1L]] <- el
    else out <- c(out, adv_flatten(el))
  }
  out
}

# The names of `.bad` in `adv_fixtures` (a typo would silently give NULL).
adv_bad_names <- c("NULL", "NA", "NA_real", "NA_chr", "NaN", "Inf", "-Inf", "chr", "bogus", "empty_str", "chr2",
                   "list", "df", "fun", "env", "num0", "len2", "TRUE", "lgl2", "lgl0", "complex", "factor", "0",
                   "1", "2", "-1", "0.5", "1.5", "1e12", "intmax", "1e308")

# Families of bad values (names of `.bad`).
adv_bad_flag <- c("NA", "chr", "1", "lgl2")
adv_bad_choice <- c("bogus", "NA_chr", "chr2", "1")

# --- Fixtures of the child --------------------------------------------------

adv_fixtures <- quote({
  .bad <- list(
    "NULL" = NULL, "NA" = NA, "NA_real" = NA_real_, "NA_chr" = NA_character_, "NaN" = NaN, "Inf" = Inf,
    "-Inf" = -Inf, "chr" = "1", "bogus" = "bogus", "empty_str" = "", "chr2" = c("a", "b"),
    "list" = list(1), "df" = data.frame(a = 1), "fun" = function() 1, "env" = new.env(),
    "num0" = numeric(0), "len2" = c(1, 2), "TRUE" = TRUE, "lgl2" = c(TRUE, FALSE), "lgl0" = logical(0),
    "complex" = 1i, "factor" = factor("a"), "0" = 0, "1" = 1, "2" = 2, "-1" = -1, "0.5" = 0.5,
    "1.5" = 1.5, "1e12" = 1e12, "intmax" = .Machine$integer.max, "1e308" = 1e308
  )
  set.seed(1)
  u3 <- list(c(1, 2, 3), c(2, 3, 4), c(3, 4, 5))
  u5 <- lapply(1:5, function(i) rnorm(4))
  d <- list(x = matrix(rnorm(120), 30, 4), y = rep(0:2, 10))
  yy <- rep(1:3, 10)
  m_lin <- model_linear(4)
  m_soft <- model_softmax(4, 3)
  p_soft <- init_params(m_soft)
  p_lin <- init_params(m_lin)
  custom <- function(loss_grad = NULL, predict = NULL, init = NULL, task = "regression") {
    model_custom(
      init = init %||% function(seed) list(w = numeric(4), b = 0),
      loss_grad = loss_grad %||% function(params, x, y) {
        r <- drop(x %*% params$w) + params$b - y
        list(loss = mean(r^2), grad = list(w = 2 * drop(crossprod(x, r)) / length(y), b = 2 * mean(r)))
      },
      predict = predict %||% function(params, x) drop(x %*% params$w) + params$b,
      task = task, n_features = 4)
  }
  `%||%` <- function(a, b) if (is.null(a)) b else a
  m_cus <- custom()
  p_cus <- list(w = numeric(4), b = 0)
  nodes <- fed_nodes(d$x, d$y, partition_iid(30, 3, seed = 1), validation = 0.2, seed = 1)
  nodes_noval <- fed_nodes(d$x, d$y, partition_iid(30, 3, seed = 1))
  node <- nodes[[1]]
  node_noval <- nodes_noval[[1]]
  cfg <- train_config(m_soft, lr = 0.1)
  mk_srv <- function(..., nodes_ = nodes, model_ = m_soft) {
    fed_server(model_, nodes_, fraction = 1, lr = 0.1, seed = 1, ...)
  }
  srv <- mk_srv()
  mk_tune <- function(lr, seed) fed_server(m_soft, nodes, lr = lr, seed = seed)
  fd <- synthetic_fedprox(0.5, 0.5, n_clients = 3, dim = 4, n_classes = 3, max_size = 60, seed = 1)
  h1 <- mk_srv()$fit(2, verbose = FALSE)
  h0 <- mk_srv()$history
  cmp <- fed_compare(a = h1, b = h1)
  valid_partition <- function(p, n, k) {
    is.list(p) && length(p) == k && identical(sort(unlist(p, use.names = FALSE)), seq_len(n))
  }
  # An IDX file from its parts: the 4 magic bytes, the big-endian dimensions,
  # then raw payload bytes.
  idx_file <- function(magic, dims = integer(), payload = raw(), gz = FALSE) {
    f <- tempfile(fileext = if (gz) ".gz" else "")
    con <- if (gz) gzfile(f, "wb") else file(f, "wb")
    writeBin(as.raw(magic), con)
    if (length(dims)) writeBin(as.integer(dims), con, size = 4L, endian = "big")
    writeBin(as.raw(payload), con)
    close(con)
    f
  }
  # A directory with the four Fashion-MNIST files, made of the given parts.
  fm_dir <- function(n_img = 2L, labels = c(0L, 1L)) {
    dir <- tempfile()
    dir.create(dir)
    for (prefix in c("train", "t10k")) {
      file.copy(idx_file(c(0, 0, 8, 3), c(n_img, 2L, 2L), rep(1L, n_img * 4L)),
                file.path(dir, paste0(prefix, "-images-idx3-ubyte")))
      file.copy(idx_file(c(0, 0, 8, 1), length(labels), labels),
                file.path(dir, paste0(prefix, "-labels-idx1-ubyte")))
    }
    dir
  }
})

# --- Running cases in children ----------------------------------------------

# How a child loads the fedagg under test: from the library it was installed
# in, or (under pkgload::load_all) from its source directory.
adv_loader <- function() {
  path <- getNamespaceInfo(asNamespace("fedagg"), "path")
  list(installed = file.exists(file.path(path, "Meta", "package.rds")), path = path, lib = dirname(path))
}

# A vector-heap cap, so a case that asks R for a huge vector fails with an R
# error instead of the OOM killer (it does not bound Rust's allocations).
adv_child_env <- function() c(callr::rcmd_safe_env(), R_MAX_VSIZE = "3Gb")

# The body of a child: loads fedagg, builds the fixtures, runs the cases.
# Self-contained (callr sends it to a fresh process).
adv_child <- function(loader, fixtures, cases) {
  if (loader$installed) {
    suppressPackageStartupMessages(library(fedagg, lib.loc = loader$lib))
  } else {
    pkgload::load_all(loader$path, quiet = TRUE, helpers = FALSE, export_all = FALSE)
  }
  options(cli.num_colors = 1L, cli.unicode = FALSE, fedagg.verbose = FALSE, warn = 1L)
  grDevices::pdf(NULL)
  env <- new.env(parent = globalenv())
  eval(fixtures, env)
  run <- function(cs) {
    started <- proc.time()[["elapsed"]]
    warnings <- character()
    value <- NULL
    out <- tryCatch({
      value <- withCallingHandlers(
        eval(cs$expr, new.env(parent = env)),
        warning = function(w) {
          warnings <<- c(warnings, conditionMessage(w))
          invokeRestart("muffleWarning")
        },
        message = function(m) invokeRestart("muffleMessage"))
      list(status = "ok", class = character(), message = NA_character_)
    }, error = function(e) {
      msg <- tryCatch(conditionMessage(e), error = function(e2) paste("<conditionMessage failed>", e2$message))
      list(status = "error", class = class(e), message = cli::ansi_strip(paste(msg, collapse = "\n")),
           client = e$client, round = e$round)
    })
    out$check <- NA
    if (out$status == "ok" && !is.null(cs$check)) {
      out$check <- tryCatch(isTRUE(eval(cs$check, list(.value = value), env)), error = function(e) FALSE)
    }
    if (out$status == "ok") {
      out$value <- paste(utils::capture.output(utils::str(value, max.level = 1, vec.len = 2, give.attr = FALSE)),
                         collapse = " ")
      out$value <- substr(out$value, 1, 200)
    }
    out$warnings <- warnings
    out$seconds <- proc.time()[["elapsed"]] - started
    out
  }
  lapply(cases, run)
}

# Runs `cases` in one child; NULL-free: a dead or hung child gives a string.
adv_batch <- function(cases, timeout) {
  tryCatch(
    callr::r(adv_child, list(adv_loader(), adv_fixtures, cases), error = "error", timeout = timeout,
             env = adv_child_env()),
    error = function(e) {
      what <- if (inherits(e, "callr_timeout_error")) "timeout" else "crash"
      structure(list(status = what, message = paste(conditionMessage(e), collapse = " ")), class = "adv_dead")
    })
}

adv_dead_result <- function(dead) {
  list(status = dead$status, class = character(), message = dead$message, check = NA, warnings = character())
}

# Runs every case, batched; a batch whose child dies is re-run one case per
# child, so the case that kills R is named.
adv_run <- function(cases, timeout = 60) {
  solo <- vapply(cases, function(cs) isTRUE(cs$solo), logical(1))
  results <- vector("list", length(cases))
  batch <- which(!solo)
  if (length(batch)) {
    res <- adv_batch(cases[batch], timeout)
    if (inherits(res, "adv_dead")) {
      for (i in batch) {
        one <- adv_batch(cases[i], timeout)
        results[[i]] <- if (inherits(one, "adv_dead")) adv_dead_result(one) else one[[1]]
      }
    } else {
      results[batch] <- res
    }
  }
  for (i in which(solo)) {
    one <- adv_batch(cases[i], cases[[i]]$timeout %adv||% timeout)
    results[[i]] <- if (inherits(one, "adv_dead")) adv_dead_result(one) else one[[1]]
  }
  results
}

# --- Judging a result -------------------------------------------------------

# The problems of one case (character(0) when it passed).
adv_problems <- function(cs, r) {
  if (r$status %in% c("crash", "timeout")) {
    return(sprintf("the child R process %s: %s", if (r$status == "crash") "died" else "hung (timeout)", r$message))
  }
  problems <- character()
  if (r$status == "ok") {
    if (cs$expect == "error") {
      problems <- c(problems, sprintf("silently accepted: returned %s", r$value %adv||% "a value"))
    }
    if (cs$expect %in% c("ok", "either") && !is.null(cs$check) && !isTRUE(r$check)) {
      problems <- c(problems, sprintf("returned a wrong value (check `%s` failed): %s",
                                      paste(deparse(cs$check), collapse = " "), r$value))
    }
    return(problems)
  }
  # An error.
  msg <- gsub("\\s+", " ", r$message)
  got <- sprintf("[%s] %s", paste(r$class, collapse = "/"), msg)
  if (cs$expect == "ok") {
    return(sprintf("a valid input (%s) failed: %s", cs$why, got))
  }
  if (isTRUE(cs$generic)) {
    if (!"fedagg_error" %in% r$class) problems <- c(problems, "the error does not inherit \"fedagg_error\"")
    if (!any(grepl("^fedagg_error_", r$class))) problems <- c(problems, "the error has no fedagg_error_* class")
  }
  if (!is.null(cs$class) && !any(cs$class %in% r$class)) {
    problems <- c(problems, sprintf("expected class %s", paste(cs$class, collapse = " or ")))
  }
  if (!is.null(cs$re) && !grepl(cs$re, r$message, perl = TRUE)) {
    problems <- c(problems, sprintf("the message does not name `%s`", cs$arg %adv||% cs$re))
  }
  client <- r[["client", exact = TRUE]]
  if (!is.null(cs$client) && !identical(client, cs$client)) {
    problems <- c(problems, sprintf("expected field client = %s, got %s", deparse(cs$client),
                                    paste(deparse(client), collapse = " ")))
  }
  if (length(problems)) problems <- c(problems, paste("got:", got))
  problems
}

adv_expect_all <- function(cases, results) {
  for (i in seq_along(cases)) {
    cs <- cases[[i]]
    problems <- adv_problems(cs, results[[i]])
    testthat::expect(
      length(problems) == 0L,
      sprintf("%s: %s\n  input: %s\n  %s", cs$fn, cs$label, paste(deparse(cs$expr), collapse = " "),
              paste(problems, collapse = "\n  "))
    )
  }
  invisible(results)
}

# --- Atomic rounds ----------------------------------------------------------

# The child of the atomic-round scenarios: each builds a small server, runs
# `good` rounds, arms its failure, and reports the error, the state before
# and after the failed round, and whether the server works afterwards.
adv_atomic_child <- function(loader, which = NULL) {
  if (loader$installed) {
    suppressPackageStartupMessages(library(fedagg, lib.loc = loader$lib))
  } else {
    pkgload::load_all(loader$path, quiet = TRUE, helpers = FALSE, export_all = FALSE)
  }
  options(cli.num_colors = 1L, fedagg.verbose = FALSE)
  set.seed(1)
  x <- matrix(rnorm(120), 30, 4)
  yreg <- drop(x %*% c(1, -1, 0.5, 2)) + rnorm(30, sd = 0.1)
  ycls <- rep(0:2, 10)
  part <- partition_iid(30, 3, seed = 1)
  reg_nodes <- fed_nodes(x, yreg, part)
  cls_nodes <- fed_nodes(x, ycls, part, validation = 0.3, seed = 1)
  big <- fed_node(x[1:10, ] * 1e6, yreg[1:10] * 1e6, id = "big")
  flag <- new.env()
  flag$on <- FALSE

  # Custom models whose parts fail while `flag$on`.
  lin_lg <- function(params, x, y) {
    r <- drop(x %*% params$w) + params$b - y
    list(loss = mean(r^2), grad = list(w = 2 * drop(crossprod(x, r)) / length(y), b = 2 * mean(r)))
  }
  custom_reg <- function(fail = "none") {
    model_custom(
      init = function(seed) list(w = numeric(4), b = 0),
      loss_grad = function(params, x, y) {
        out <- lin_lg(params, x, y)
        if (flag$on) {
          if (fail == "nan") out$loss <- NaN
          if (fail == "nan_grad") out$grad$w[1] <- NaN
          if (fail == "throw") stop("sensor offline")
          if (fail == "short_grad") out$grad <- list(w = out$grad$w)
          if (fail == "garbage") out <- "garbage"
        }
        out
      },
      predict = function(params, x) drop(x %*% params$w) + params$b,
      task = "regression", n_features = 4)
  }
  soft_lg <- function(params, x, y) {
    z <- sweep(x %*% params$W, 2, params$b, `+`)
    p <- exp(z - apply(z, 1, max))
    p <- p / rowSums(p)
    loss <- mean(-log(p[cbind(seq_along(y), y + 1)]))
    p[cbind(seq_along(y), y + 1)] <- p[cbind(seq_along(y), y + 1)] - 1
    list(loss = loss, grad = list(W = crossprod(x, p) / length(y), b = colMeans(p)))
  }
  custom_cls <- function(fail = "none") {
    model_custom(
      init = function(seed) list(W = matrix(0, 4, 3), b = numeric(3)),
      loss_grad = soft_lg,
      predict = function(params, x) {
        z <- sweep(x %*% params$W, 2, params$b, `+`)
        if (flag$on) {
          if (fail == "shape") z <- z[, 1:2]
          if (fail == "nan") z[1, 1] <- NaN
          if (fail == "throw") stop("predictor offline")
          if (fail == "rows") z <- z[-1, , drop = FALSE]
        }
        z
      },
      n_features = 4, n_classes = 3)
  }
  srv_cls <- function(...) fed_server(model_softmax(4, 3), cls_nodes, fraction = 1, lr = 0.1, seed = 1, ...)
  srv_reg <- function(...) fed_server(model_linear(4), reg_nodes, fraction = 1, lr = 0.01, seed = 1, ...)
  ids3 <- names(reg_nodes)
  sel <- function(bad) function(round, n, clients) if (flag$on) bad else clients$id
  wfun <- function(bad) function(info) if (flag$on) bad(info) else rep(1, nrow(info))
  hook_start <- function(bad) list(round_start = function(server, round, clients) if (flag$on) bad(server))
  hook_update <- function(bad) {
    list(server_update = function(old, proposed, round, lr) if (flag$on) bad(proposed) else proposed)
  }

  # make: the server; good: rounds run first; tries: rounds to attempt until
  # one fails (for divergence); class: expected class; client: expected
  # `client` (TRUE: any selected node id); round: FALSE when the error need
  # not name the round; recover: turn the flag off and check that a round
  # then runs; kept: the failure comes after the commit (round kept).
  # A custom model that fails from round 2 on, on client1.
  custom_case <- function(name, model, nodes, lr, class) {
    force(model)
    list(name = name, make = function() fed_server(model, nodes, fraction = 1, lr = lr, seed = 1),
         good = 1, class = class, client = "client1", recover = TRUE)
  }
  scenarios <- list(
    # A loss that is huge but finite is reported, not refused: the round
    # fails once the loss or the parameters stop being finite.
    list(name = "diverging linear model (lr = 1e3, large features), run until the loss overflows",
         make = function() fed_server(model_linear(4), fed_nodes(x * 100, yreg * 100, part), fraction = 1,
                                      lr = 1e3, batch_size = 5, seed = 1),
         good = 0, tries = 40, class = "fedagg_error_diverged", client = TRUE),
    list(name = "a node with huge features diverges in round 3 (schedule)",
         make = function() fed_server(model_linear(4), c(reg_nodes, list(big = big)), lr = 0.01, epochs = 3,
                                      batch_size = 1, seed = 1,
                                      schedule = list(ids3, ids3, c(ids3, "big"))),
         good = 2, class = "fedagg_error_diverged", client = "big"),
    list(name = "diverging after setting srv$lr <- 1e3 between rounds",
         make = function() fed_server(model_linear(4), fed_nodes(x * 100, yreg * 100, part), fraction = 1,
                                      lr = 1e-6, batch_size = 5, seed = 1),
         good = 2, prepare = function(s) s$lr <- 1e3, tries = 40, class = "fedagg_error_diverged", client = TRUE),
    list(name = "FedSGD server step overflows (lr = 1e10, features 1e150)",
         make = function() fed_server(model_linear(4), fed_nodes(x * 1e150, yreg * 1e150, part),
                                      algorithm = "fedsgd", fraction = 1, lr = 1e10, seed = 1),
         good = 0, class = "fedagg_error_diverged"),
    list(name = "selection function throws", make = function() srv_reg(selection = function(round, n, clients) {
           if (flag$on) stop("selector down") else clients$id
         }), good = 1, class = "fedagg_error_user_code", recover = TRUE),
    list(name = "selection returns an unknown id", make = function() srv_reg(selection = sel(c("client1", "ghost"))),
         good = 1, recover = TRUE),
    list(name = "selection returns NA", make = function() srv_reg(selection = sel(NA_character_)),
         good = 1, recover = TRUE),
    list(name = "selection returns a node twice", make = function() srv_reg(selection = sel(c("client1", "client1"))),
         good = 1, recover = TRUE),
    list(name = "selection returns no node", make = function() srv_reg(selection = sel(character())),
         good = 1, recover = TRUE),
    list(name = "selection returns position 99", make = function() srv_reg(selection = sel(99)),
         good = 1, recover = TRUE),
    list(name = "weights function returns a negative weight",
         make = function() srv_reg(weights = wfun(function(info) c(-1, rep(1, nrow(info) - 1)))),
         good = 1, client = "client1", recover = TRUE),
    list(name = "weights function returns NA",
         make = function() srv_reg(weights = wfun(function(info) c(1, NA, rep(1, nrow(info) - 2)))),
         good = 1, client = "client2", recover = TRUE),
    list(name = "weights function returns the wrong length",
         make = function() srv_reg(weights = wfun(function(info) 1)), good = 1, recover = TRUE),
    list(name = "weights function returns all zeros",
         make = function() srv_reg(weights = wfun(function(info) rep(0, nrow(info)))), good = 1, recover = TRUE),
    list(name = "weights function returns strings",
         make = function() srv_reg(weights = wfun(function(info) rep("1", nrow(info)))), good = 1, recover = TRUE),
    list(name = "weights function throws",
         make = function() srv_reg(weights = wfun(function(info) stop("no weights today"))), good = 1,
         class = "fedagg_error_user_code", recover = TRUE),
    list(name = "round_start hook throws",
         make = function() srv_reg(hooks = hook_start(function(server) stop("hook down"))), good = 1,
         class = "fedagg_error_user_code", recover = TRUE),
    list(name = "round_start hook calls server$round() (re-entrance)",
         make = function() srv_reg(hooks = hook_start(function(server) server$round())), good = 1,
         class = "fedagg_error_reentrant", round = FALSE, recover = TRUE),
    list(name = "round_start hook calls server$fit() (re-entrance)",
         make = function() srv_reg(hooks = hook_start(function(server) server$fit(1))), good = 1,
         class = "fedagg_error_reentrant", round = FALSE, recover = TRUE),
    list(name = "round_start hook sets server$params (re-entrance)",
         make = function() srv_reg(hooks = hook_start(function(server) server$params <- server$params)), good = 1,
         class = "fedagg_error_reentrant", round = FALSE, recover = TRUE),
    list(name = "server_update hook returns the wrong length",
         make = function() srv_reg(hooks = hook_update(function(p) p[-1])), good = 1,
         class = "fedagg_error_user_code", recover = TRUE),
    list(name = "server_update hook returns NaN",
         make = function() srv_reg(hooks = hook_update(function(p) replace(p, 1, NaN))), good = 1,
         class = "fedagg_error_diverged", recover = TRUE),
    list(name = "server_update hook returns NULL",
         make = function() srv_reg(hooks = hook_update(function(p) NULL)), good = 1,
         class = "fedagg_error_user_code", recover = TRUE),
    list(name = "server_update hook returns strings",
         make = function() srv_reg(hooks = hook_update(function(p) as.character(p))), good = 1,
         class = "fedagg_error_user_code", recover = TRUE),
    list(name = "server_update hook throws",
         make = function() srv_reg(hooks = hook_update(function(p) stop("optimiser down"))), good = 1,
         class = "fedagg_error_user_code", recover = TRUE),
    list(name = "learning-rate schedule underflows to 0 in round 3",
         make = function() srv_reg(lr_schedule = lr_exponential(1e-200)), good = 2, class = "fedagg_error_input"),
    custom_case("custom model: loss_grad returns a NaN loss", custom_reg("nan"), reg_nodes, 0.01, "fedagg_error_diverged"),
    custom_case("custom model: loss_grad returns a NaN gradient", custom_reg("nan_grad"), reg_nodes, 0.01,
                "fedagg_error_diverged"),
    custom_case("custom model: loss_grad throws", custom_reg("throw"), reg_nodes, 0.01, "fedagg_error_user_code"),
    custom_case("custom model: loss_grad returns a gradient missing a layer", custom_reg("short_grad"), reg_nodes, 0.01,
                "fedagg_error_user_code"),
    custom_case("custom model: loss_grad returns a string", custom_reg("garbage"), reg_nodes, 0.01,
                "fedagg_error_user_code"),
    custom_case("custom model: predict returns the wrong shape (validation)", custom_cls("shape"), cls_nodes, 0.1,
                "fedagg_error_user_code"),
    custom_case("custom model: predict drops a row (validation)", custom_cls("rows"), cls_nodes, 0.1,
                "fedagg_error_user_code"),
    custom_case("custom model: predict returns NaN (validation)", custom_cls("nan"), cls_nodes, 0.1,
                "fedagg_error_user_code"),
    list(name = "custom model: predict throws (test data)",
         make = function() fed_server(custom_cls("throw"), fed_nodes(x, ycls, part), fraction = 1, lr = 0.1,
                                      seed = 1, test_data = list(x = x, y = ycls)),
         good = 1, class = "fedagg_error_user_code", recover = TRUE),
    list(name = "round_end hook calls server$round() (round kept)",
         make = function() srv_reg(hooks = list(round_end = function(server, round, record) {
           if (flag$on) server$round()
         })), good = 1, class = "fedagg_error_reentrant", round = FALSE, kept = TRUE, recover = TRUE)
  )

  snap <- function(s) list(params = s$params, history = s$history, client_log = s$client_log,
                           rounds_done = s$rounds_done)
  run <- function(sc) {
    flag$on <- FALSE
    out <- list(name = sc$name)
    s <- tryCatch({
      s <- sc$make()
      for (i in seq_len(sc$good)) s$round()
      if (!is.null(sc$prepare)) sc$prepare(s)
      s
    }, error = function(e) e)
    if (inherits(s, "error")) {
      out$setup_error <- paste(class(s)[1], cli::ansi_strip(conditionMessage(s)))
      return(out)
    }
    out$node_ids <- names(s$nodes)
    flag$on <- TRUE
    err <- NULL
    for (i in seq_len(sc$tries %||% 1)) {
      before <- snap(s)
      err <- tryCatch({
        s$round()
        NULL
      }, error = function(e) e)
      if (!is.null(err)) break
    }
    flag$on <- FALSE
    after <- snap(s)
    out$expected_round <- before$rounds_done + 1L
    out$same <- vapply(names(before), function(n) identical(before[[n]], after[[n]]), logical(1))
    out$rounds_after <- after$rounds_done
    if (is.null(err)) {
      out$status <- "ok"
      out$last_train_loss <- utils::tail(s$history$train_loss, 1)
    } else {
      out$status <- "error"
      out$class <- class(err)
      out$message <- cli::ansi_strip(paste(conditionMessage(err), collapse = "\n"))
      # `[` keeps NULL fields as NULL (`$<-` would drop them, and `$` would
      # then partially match `rounds_after`).
      out["client"] <- list(err$client)
      out["round"] <- list(err$round)
    }
    if (isTRUE(sc$recover)) {
      out$recovered <- tryCatch({
        n <- s$rounds_done
        s$round()
        if (s$rounds_done == n + 1L) "ok" else "rounds_done did not advance"
      }, error = function(e) paste(class(e)[1], cli::ansi_strip(conditionMessage(e))))
    }
    out
  }
  `%||%` <- function(a, b) if (is.null(a)) b else a
  todo <- if (is.null(which)) seq_along(scenarios) else which
  list(n = length(scenarios), spec = lapply(scenarios, function(sc) sc[setdiff(names(sc), c("make", "prepare"))]),
       results = lapply(scenarios[todo], run), which = todo)
}

adv_atomic_run <- function(timeout = 60) {
  res <- tryCatch(callr::r(adv_atomic_child, list(adv_loader()), error = "error", timeout = timeout,
                           env = adv_child_env()),
                  error = function(e) e)
  if (!inherits(res, "error")) return(res)
  # The child died: re-run one scenario per child to name the culprit.
  spec <- tryCatch(callr::r(adv_atomic_child, list(adv_loader(), integer()), error = "error", timeout = timeout,
                            env = adv_child_env()),
                   error = function(e) NULL)
  if (is.null(spec)) return(list(dead = paste("the child R process died:", conditionMessage(res))))
  results <- lapply(seq_len(spec$n), function(i) {
    one <- tryCatch(callr::r(adv_atomic_child, list(adv_loader(), i), error = "error", timeout = timeout,
                             env = adv_child_env()),
                    error = function(e) e)
    if (inherits(one, "error")) {
      list(name = spec$spec[[i]]$name, status = "crash", message = conditionMessage(one))
    } else one$results[[1]]
  })
  list(n = spec$n, spec = spec$spec, results = results, which = seq_len(spec$n))
}

adv_atomic_problems <- function(sc, r) {
  if (!is.null(r$setup_error)) return(paste("the scenario could not be set up:", r$setup_error))
  if (identical(r$status, "crash")) return(paste("the child R process died:", r$message))
  if (identical(r$status, "ok")) {
    return(sprintf("the round did not fail (silent acceptance); rounds done %d, last train_loss %s",
                   r$rounds_after, format(r$last_train_loss)))
  }
  problems <- character()
  got <- sprintf("[%s] %s", paste(r$class, collapse = "/"), gsub("\\s+", " ", r$message))
  if (!"fedagg_error" %in% r$class || !any(grepl("^fedagg_error_", r$class))) {
    problems <- c(problems, "the error has no fedagg_error_* class")
  }
  if (!is.null(sc$class) && !sc$class %in% r$class) problems <- c(problems, paste("expected class", sc$class))
  if (isTRUE(sc$kept)) {
    if (r$rounds_after != r$expected_round) problems <- c(problems, "the committed round was not kept")
  } else if (!all(r$same)) {
    problems <- c(problems, sprintf("the failed round changed the server: %s",
                                    paste(names(r$same)[!r$same], collapse = ", ")))
  }
  round <- r[["round", exact = TRUE]]
  client <- r[["client", exact = TRUE]]
  if (!isFALSE(sc$round) && !identical(round, r$expected_round)) {
    problems <- c(problems, sprintf("expected field round = %dL, got %s", r$expected_round,
                                    paste(deparse(round), collapse = " ")))
  }
  if (isTRUE(sc$client)) {
    if (!(is.character(client) && length(client) == 1L && client %in% r$node_ids)) {
      problems <- c(problems, sprintf("expected field client = a node id (string), got %s",
                                      paste(deparse(client), collapse = " ")))
    }
  } else if (is.character(sc$client) && !identical(client, sc$client)) {
    problems <- c(problems, sprintf("expected field client = \"%s\", got %s", sc$client,
                                    paste(deparse(client), collapse = " ")))
  }
  if (isTRUE(sc$recover) && !identical(r$recovered, "ok")) {
    problems <- c(problems, paste("the server does not run a round after the failure:", r$recovered))
  }
  if (length(problems)) problems <- c(problems, paste("got:", got))
  problems
}
