# Rounds of custom R models: trained in R, one node after another or through
# future.apply.

# Trains custom-model clients in R: in parallel with future.apply when the
# user has set a non-sequential plan, else one after the other.
# Each node returns its update (flat), what it reports, and its new state;
# nothing is committed here. A client algorithm written in R runs this way
# for built-in models too.
custom_round <- function(nodes, model, flat, template, config, idx, rule, round, epochs, algorithm) {
  params <- unflatten_params(model, flat, template)
  want_val <- rule %in% c("accuracy", "collect")
  work <- function(j) {
    node <- nodes[[j]]
    cfg <- config
    cfg$stream <- idx[j]
    cfg$epochs <- epochs[[j]]
    tryCatch({
      out <- if (algorithm$kind == "custom") {
        user_local_work(algorithm, node, params, cfg, round, length(flat))
      } else {
        res <- node$train(params, cfg, return = "delta", epochs = epochs[[j]])
        list(delta = flatten_any(res$delta, "delta", NULL), n_samples = res$n_samples, train_loss = res$train_loss,
             steps = res$steps, state = res$state)
      }
      val <- if (want_val && node$has_validation) node$evaluate(unflatten_params(model, flat + out$delta, template), model)
      c(list(ok = TRUE, val_loss = if (is.null(val)) NA_real_ else val$loss,
             val_metric = if (is.null(val)) NA_real_ else val[[metric_name(model)]]), out)
    }, fedagg_error = function(e) {
      # Reported as data, so the first failing client (in node order, as
      # with built-in models) is named whatever the future plan.
      kind <- setdiff(sub("^fedagg_error_", "", grep("^fedagg_error_", class(e), value = TRUE)), "client")[1]
      # The node's error is "Client ... failed." with the reason as its body.
      list(ok = FALSE, kind = if (is.na(kind)) "client" else kind, parent = e$parent,
           message = paste(cli::ansi_strip(e$body %||% e$message), collapse = " "))
    })
  }
  if (use_future()) {
    future.apply::future_lapply(seq_along(nodes), work, future.seed = FALSE)
  } else {
    lapply(seq_along(nodes), work)
  }
}

user_local_work <- function(algorithm, node, params, config, round, d) {
  out <- call_user(algorithm$local, list(node = node, params = params, config = config,
                                         state = node$state_for(config$server_key)$custom),
                   sprintf("The client algorithm %s's `local()`", encodeString(algorithm$label, quote = '"')),
                   round = round, client = node$id)
  delta <- if (is.list(out)) unlist(out$delta, use.names = FALSE)
  ok <- is.list(out) && is.numeric(delta) && length(delta) == d && all(is.finite(delta)) &&
    is.numeric(out$n_samples) && length(out$n_samples) == 1L && is.numeric(out$train_loss) && length(out$train_loss) == 1L
  if (!ok) {
    # The explanation goes in the body: a client's failure is reported by
    # its body, which must say what local() should have returned.
    fedagg_abort(c("The client algorithm's {.fn local} returned a malformed result.",
                   i = "It must return {.code list(delta = <{d} finite numbers>, n_samples = <one number>, train_loss = <one number>, state = )}.",
                   x = "It returned {local_result_problem(out, delta, d)}."),
                 class = "user_code", round = round, client = node$id)
  }
  list(delta = as.double(delta), n_samples = out$n_samples, train_loss = out$train_loss, steps = NA_real_,
       state = out$state)
}

# What is wrong with a custom local() result, for the error message.
local_result_problem <- function(out, delta, d) {
  if (!is.list(out)) return(obj_desc(out))
  if (!is.numeric(delta)) return(sprintf("a `delta` that is %s", obj_desc(out$delta)))
  if (length(delta) != d) return(sprintf("a `delta` of %d numbers", length(delta)))
  if (!all(is.finite(delta))) return(sprintf("a `delta` with %d non-finite values", sum(!is.finite(delta))))
  if (!is.numeric(out$n_samples) || length(out$n_samples) != 1L) return(sprintf("`n_samples` as %s", obj_desc(out$n_samples)))
  sprintf("`train_loss` as %s", obj_desc(out$train_loss))
}

use_future <- function() {
  requireNamespace("future.apply", quietly = TRUE) && requireNamespace("future", quietly = TRUE) &&
    !inherits(future::plan(), "sequential")
}

