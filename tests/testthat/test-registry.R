# The registry of parts: every lever's kind is listed once, with the
# schedules it works in; the schedules refuse by lookup, naming the part.

test_that("every part a constructor makes is in the registry, and an unknown kind is an error", {
  made <- list(
    algorithm = list(fedavg(), fedsgd(), fedprox(0.1), scaffold(), fednova(),
                     fed_algorithm("mine", local = function(node, params, config, state) NULL)),
    aggregator = list(agg_weighted(), agg_median(), agg_trimmed_mean(0.1), agg_krum(), agg_multi_krum(),
                      agg_geometric_median(), agg_bulyan(1)),
    selection = list(select_uniform(), select_by_size(), select_poisson(0.5), select_power_of_choice(3),
                     select_score()),
    server_optimizer = list(server_sgd(), server_adagrad(), server_adam(), server_yogi(),
                            server_optimizer("mine", step = function(params, delta, state, round) NULL)),
    compressor = list(compress_topk(0.1), compress_random_k(0.1), compress_quantize(4), compress_float16()),
    privacy = list(dp_central(1, clip = 1), dp_local(1, clip = 1)),
    attack = list(attack_sign_flip(), attack_scale(2), attack_gaussian(1), attack_same_value(1),
                  attack_label_flip(c("0" = "1")))
  )
  reg <- fedagg:::lever_registry
  for (type in names(made)) {
    for (part in made[[type]]) {
      row <- fedagg:::lever_part(type, part$kind)
      expect_identical(c(row$type, row$kind), c(type, part$kind), info = paste(type, part$kind))
    }
    # No row the constructors never make.
    listed <- reg$kind[reg$type == type]
    expect_setequal(listed, union(vapply(made[[type]], `[[`, "", "kind"), if (type == "selection") "custom"))
  }
  expect_false(anyDuplicated(paste(reg$type, reg$kind)) > 0)
  expect_true(all(reg$side %in% c("client", "server")))
  expect_error(fedagg:::lever_part("algorithm", "fedfancy"), class = "fedagg_error_input")
  expect_identical(fedagg:::rust_algorithm(fedsgd()), "fedavg")
})

test_that("FedBuff and hierarchical rounds refuse, by name, the parts the registry says they cannot run", {
  d <- synthetic_fedprox(0.5, 0.5, n_clients = 6, seed = 6)
  nodes <- fed_nodes(d)
  set_system(nodes, system_profile(speed = lognormal(400, 20), download = lognormal(1e5, 5), seed = 2))
  groups <- list(a = names(nodes)[1:3], b = names(nodes)[4:6])
  reg <- fedagg:::lever_registry
  levers <- list(algorithm = list(scaffold(), fednova(), fedsgd()),
                 aggregator = list(agg_median(), agg_krum()),
                 compress = list(compress_topk(0.1)),
                 filter = list(filter_norm(mad = 3)))
  for (arg in names(levers)) {
    for (part in levers[[arg]]) {
      args <- stats::setNames(list(part), arg)
      err <- expect_error(do.call(fed_server, c(list(model_softmax(60, 10), nodes, asynchronous = fedbuff(2, 3)), args)),
                          class = "fedagg_error_input")
      expect_match(conditionMessage(err), part$label, fixed = TRUE)
      err <- expect_error(do.call(fed_server, c(list(model_softmax(60, 10), nodes, fraction = 1,
                                                     topology = topology_hierarchical(groups)), args)),
                          class = "fedagg_error_input")
      expect_match(conditionMessage(err), part$label, fixed = TRUE)
    }
  }
  # What the registry allows runs.
  for (opt in list(server_adam(lr = 0.03), server_yogi(lr = 0.03))) {
    srv <- fed_server(model_softmax(60, 10), nodes, asynchronous = fedbuff(2, 3), server_optimizer = opt, seed = 1)
    expect_s3_class(srv$fit(2, verbose = FALSE), "fed_history")
  }
})
