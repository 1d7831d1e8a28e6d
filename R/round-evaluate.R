# Evaluation of a candidate global model on the test set and on every
# node's held-out data. Called by Server's private methods.

evaluate_all <- function(private, flat, round = NULL) {
  out <- list()
  m <- metric_name(private$.model)
  if (!is.null(private$.test)) {
    ev <- private$.evaluate_test(flat, round)
    out$test_loss <- ev$loss
    out[[paste0("test_", m)]] <- ev$metric
  }
  per_client <- private$.evaluate_clients(flat, round)
  if (!is.null(per_client)) {
    w <- per_client$n
    out$val_loss <- sum(w * per_client$loss) / sum(w)
    out[[paste0("val_", m)]] <- if (m == "rmse") sqrt(sum(w * per_client$rmse^2) / sum(w))
                                else sum(w * per_client[[m]]) / sum(w)
  }
  out
}

evaluate_test <- function(private, flat, round = NULL) {
  model <- private$.model
  test <- private$.test
  if (is_builtin(model)) {
    out <- core_call(rs_evaluate(model_arch(model), model$head, model_bits(model), flat, list(list(test$x, as.double(test$y))),
                                 resolve_threads(private$.threads)))
    return(list(n = out$n, loss = out$loss, metric = out$metric))
  }
  evaluate_custom(model, relist_like(flat, private$.template), test$x, test$y, round = round)
}

evaluate_clients <- function(private, flat, round = NULL) {
  model <- private$.model
  nodes <- private$.nodes[node_roster(private)$has_validation]
  if (!length(nodes)) return(NULL)
  if (!is.null(private$.net)) return(net_evaluate(private, flat, names(nodes), round %||% private$.state$round))
  if (is_builtin(model)) {
    # Unnamed before the data are gathered: dropping the names of a list
    # that holds them would copy every matrix.
    data <- lapply(unname(nodes), function(n) n$data_for(model, "validation"))
    out <- core_call(rs_evaluate(model_arch(model), model$head, model_bits(model), flat, data,
                                 resolve_threads(private$.threads)))
    if (!isTRUE(out$ok)) abort_client_failure(names(nodes)[out$client], out$message, round, kind = out$kind)
    return(metric_frame(names(nodes), out$n, out$loss, out$metric, model))
  }
  params <- relist_like(flat, private$.template)
  do.call(rbind, lapply(nodes, function(n) n$evaluate(params, model)))
}
