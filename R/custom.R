# Rounds of custom R models: trained in R, one node after another or through
# future.apply.

# Trains custom-model clients in R: in parallel with future.apply when the
# user has set a non-sequential plan, else one after the other.
custom_round <- function(nodes, model, flat, template, config, idx, rule, round) {
  params <- relist_like(flat, template)
  want_val <- rule %in% c("accuracy", "collect")
  work <- function(j) {
    node <- nodes[[j]]
    cfg <- config
    cfg$stream <- idx[j]
    tryCatch({
      out <- node$train(params, cfg)
      val <- if (want_val && node$has_validation) node$evaluate(out$params, model) else NULL
      list(ok = TRUE, vector = flatten_any(out$params, "params", NULL), n_samples = out$n_samples,
           train_loss = out$train_loss, val_loss = if (is.null(val)) NA_real_ else val$loss,
           val_metric = if (is.null(val)) NA_real_ else val[[metric_name(model)]])
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

use_future <- function() {
  requireNamespace("future.apply", quietly = TRUE) && requireNamespace("future", quietly = TRUE) &&
    !inherits(future::plan(), "sequential")
}

