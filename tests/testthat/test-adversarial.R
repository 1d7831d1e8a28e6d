# Adversarial inputs for every exported function, run in child R processes
# (see helper-adversarial.R). Every case must: not crash R; fail (no silent
# acceptance) unless listed as a valid edge input; fail with a class
# "fedagg_error" plus a specific fedagg_error_* one; and, where the case is
# about one argument, name it. Failed rounds must leave a server unchanged.

skip_on_cran()
skip_if_not_installed("callr")

# The table's vocabulary (defined here, not in the helper, to keep the short
# names out of the other test files): E() must fail, OK() is a valid edge
# input that must succeed, EITHER() may fail but must not return a wrong
# value, S() sweeps bad values (names of `.bad`) over one argument.
# Must fail.
E <- function(label, expr, arg = NULL, ...) adv_case(label, substitute(expr), "error", arg = arg, ...)

# Valid edge input: must succeed (and pass `check`, evaluated with `.value`).
OK <- function(label, expr, check = NULL, why) {
  adv_case(label, substitute(expr), "ok", check = substitute(check), why = why)
}

# May fail (with `class` when given), but must not return a wrong value.
EITHER <- function(label, expr, check = NULL, class = NULL, ...) {
  adv_case(label, substitute(expr), "either", check = substitute(check), class = class, ...)
}

# Every value of `.bad` named in `values` put in place of the symbol `X` in
# the call `template` (the argument `arg`): one case each, all expected to
# fail naming `arg`.
S <- function(template, arg, values, re = adv_arg_regex(arg), ...) {
  template <- substitute(template)
  stopifnot(all(values %in% adv_bad_names))
  lapply(values, function(v) {
    call <- do.call(substitute, list(template, list(X = bquote(.bad[[.(v)]]))))
    adv_case(sprintf("%s = <%s>", arg, v), call, "error", arg = arg, re = re, ...)
  })
}

# --- Aggregation, clipping, norms ---------------------------------------------

adv_cases_aggregate <- c(
  adv_group("weighted_aggregate",
    S(weighted_aggregate(X), "updates", c("NULL", "chr", "df")),
    E("empty list", weighted_aggregate(list()), "updates"),
    E("an atomic vector, not a list", weighted_aggregate(1:3), "updates"),
    E("clients of different lengths", weighted_aggregate(list(1:3, 1:2)), "updates", class = "fedagg_error_client"),
    E("named vectors with different names", weighted_aggregate(list(c(a = 1, b = 2), c(a = 1, c = 2))), "updates",
      class = "fedagg_error_client"),
    E("named and unnamed clients", weighted_aggregate(list(c(a = 1, b = 2), c(1, 2))), "updates"),
    E("duplicated coordinate names", weighted_aggregate(list(c(a = 1, a = 2), c(a = 3, a = 4))), "updates"),
    E("NaN in a client", weighted_aggregate(list(c(1, 2), c(NaN, 1))), "updates", class = "fedagg_error_client",
      client = 2L),
    E("NA in a client", weighted_aggregate(list(c(1, 2), c(1, NA_real_))), "updates", client = 2L),
    E("Inf in a client", weighted_aggregate(list(c(1, 2), c(1, Inf))), "updates", client = 2L),
    E("-Inf in a client", weighted_aggregate(list(c(1, 2), c(-Inf, 1), c(0, 0))), "updates", client = 2L),
    E("a character client", weighted_aggregate(list(c(1, 2), c("a", "b"))), "updates", client = 2L),
    E("a NULL client", weighted_aggregate(list(c(1, 2), NULL)), "updates", client = 2L),
    E("a factor client", weighted_aggregate(list(factor("a"), factor("b"))), "updates"),
    E("vectors mixed with layer lists", weighted_aggregate(list(1, list(1))), "updates"),
    E("layers with different names", weighted_aggregate(list(list(W = diag(2)), list(V = diag(2)))), "updates"),
    E("layers with different dims", weighted_aggregate(list(list(W = diag(2)), list(W = diag(3)))), "updates"),
    E("a layer with NA", weighted_aggregate(list(list(W = diag(2), b = 1), list(W = diag(2), b = NA))),
      "updates"),
    E("clients without layers", weighted_aggregate(list(list(), list())), "updates"),
    E("a layer that is a list", weighted_aggregate(list(list(W = list(1)), list(W = list(2)))), "updates"),
    E("a character matrix", weighted_aggregate(matrix("a", 2, 2)), "updates"),
    E("a matrix with no columns", weighted_aggregate(matrix(numeric(0), 3, 0)), "updates"),
    E("a matrix with NaN", weighted_aggregate(cbind(c(1, NaN), c(1, 2))), "updates"),
    E("zero-length updates", weighted_aggregate(list(numeric(0), numeric(0))), "updates",
      note = "judgment: an update with no coordinates is almost surely a mistake upstream"),
    S(weighted_aggregate(u3, weights = X), "weights", c("chr", "len2", "NaN")),
    E("negative weight", weighted_aggregate(u3, weights = c(1, -1, 1)), "weights", client = 2L),
    E("NA weight", weighted_aggregate(u3, weights = c(1, NA, 1)), "weights"),
    E("Inf weight", weighted_aggregate(u3, weights = c(1, Inf, 1)), "weights"),
    E("all-zero weights", weighted_aggregate(u3, weights = c(0, 0, 0)), "weights"),
    EITHER("weights whose sum overflows", weighted_aggregate(u3, weights = c(1e308, 1e308, 1e308)),
           check = isTRUE(all.equal(.value, c(2, 3, 4)))),
    OK("weights named in another order than the clients are matched by name",
       weighted_aggregate(list(a = c(1, 2), b = c(3, 4)), weights = c(b = 1, a = 3)),
       check = isTRUE(all.equal(.value, (3 * c(1, 2) + c(3, 4)) / 4)),
       why = "names are matched for coordinates, layers and weights alike"),
    E("weights named unlike the clients",
      weighted_aggregate(list(a = c(1, 2), b = c(3, 4)), weights = c(b = 1, c = 3)), "weights"),
    S(weighted_aggregate(u3, threads = X), "threads", c("0", "1.5", "NA")),
    E("threads = .Machine$integer.max", weighted_aggregate(u3, threads = .Machine$integer.max), "threads",
      class = "fedagg_error_input"),
    E("option fedagg.threads = \"a\"",
      local({ op <- options(fedagg.threads = "a"); on.exit(options(op)); weighted_aggregate(u3) }),
      re = "fedagg\\.threads")
  ),
  adv_group("robust_aggregate",
    S(robust_aggregate(u5, method = X), "method", adv_bad_choice),
    S(robust_aggregate(u5, "trimmed_mean", trim = X), "trim", c("0.5", "-1", "NA")),
    S(robust_aggregate(u5, "krum", f = X), "f", c("-1", "1.5", "2")),
    S(robust_aggregate(u5, "multi_krum", f = 1, m = X), "m", c("0", "1.5", "1e12")),
    E("m above K - f", robust_aggregate(u5, "multi_krum", f = 1, m = 5), "m"),
    S(robust_aggregate(u5, "geometric_median", tol = X), "tol", c("0", "NaN", "Inf")),
    S(robust_aggregate(u5, "geometric_median", max_iter = X), "max_iter", c("0", "1.5", "1e12")),
    E("krum with 2 clients", robust_aggregate(u3[1:2], "krum"), re = "3 clients|K"),
    E("median of non-finite updates", robust_aggregate(list(c(1, Inf), c(1, 2), c(0, 0)), "median"), "updates",
      class = "fedagg_error_client", client = 1L),
    E("geometric median with a negative weight", robust_aggregate(u5, "geometric_median", weights = c(1, 1, 1, 1, -1)),
      "weights"),
    E("multi_krum weights of the wrong length", robust_aggregate(u5, "multi_krum", weights = 1:2), "weights"),
    E("clients of different lengths", robust_aggregate(list(1:3, 1:2, 1:3), "median"), "updates"),
    E("empty updates", robust_aggregate(list(), "median"), "updates"),
    E("threads = .Machine$integer.max", robust_aggregate(u5, threads = .Machine$integer.max), "threads",
      class = "fedagg_error_input"),
    EITHER("krum with K = 3000 clients", robust_aggregate(replicate(3000, rnorm(5), simplify = FALSE), "krum"),
           check = length(.value) == 5 && all(is.finite(.value)), class = "fedagg_error_memory"),
    if (identical(Sys.getenv("FEDAGG_ADV_HEAVY"), "true")) {
      EITHER("krum with K = 15000 clients (about 1 GB)",
             robust_aggregate(as.list(rnorm(15000)), "krum"), check = length(.value) == 1,
             class = "fedagg_error_memory", solo = TRUE, timeout = 300)
    }
  ),
  adv_group("clip_update",
    S(clip_update(X, 1), "update", c("NULL", "chr", "NA")),
    E("a data frame", clip_update(data.frame(a = 3, b = 4), 1), "update",
      note = "judgment: weighted_aggregate() refuses data frames; here one is taken as a list of layers"),
    E("NaN in the update", clip_update(c(1, NaN), 1), "update"),
    E("Inf in the update", clip_update(c(1, Inf), 1), "update"),
    E("NA in a layer", clip_update(list(W = diag(2), b = c(1, NA)), 1), "update"),
    S(clip_update(c(3, 4), X), "max_norm", c("0", "NA", "Inf")),
    S(clip_update(c(3, 4), 1, per_layer = X), "per_layer", adv_bad_flag),
    E("threads = .Machine$integer.max", clip_update(c(3, 4), 1, threads = .Machine$integer.max), "threads",
      class = "fedagg_error_input"),
    E("threads = -1", clip_update(c(3, 4), 1, threads = -1), "threads"),
    OK("an update whose squared norm overflows", clip_update(c(1e200, 1e200), 1),
       check = isTRUE(all.equal(as.vector(.value), rep(sqrt(0.5), 2), tolerance = 1e-6)),
       why = "finite update; its norm 1.4e200 is representable (target of the hardening issue)"),
    OK("an update whose squared norm underflows", clip_update(c(3e-200, 4e-200), 1e-200),
       check = isTRUE(all.equal(as.vector(.value), c(6e-201, 8e-201))),
       why = "finite update of norm 5e-200 above max_norm 1e-200: it must be clipped")
  ),
  adv_group("update_norms",
    S(update_norms(X), "updates", c("NULL", "chr", "num0")),
    E("NaN in a client", update_norms(list(1, NaN)), "updates", client = 2L),
    E("threads = .Machine$integer.max", update_norms(u3, threads = .Machine$integer.max), "threads",
      class = "fedagg_error_input"),
    E("threads = \"2\"", update_norms(u3, threads = "2"), "threads"),
    OK("norm of an update whose squared norm overflows", update_norms(list(c(1e200, 1e200))),
       check = isTRUE(all.equal(.value$norm, sqrt(2) * 1e200)),
       why = "finite update; its norm 1.4e200 is representable")
  )
)

test_that("aggregation, clipping and norms reject bad inputs with classed errors and never crash", {
  adv_expect_all(adv_cases_aggregate, adv_run(adv_cases_aggregate))
})

# --- Privacy, threads, drift -------------------------------------------------

adv_cases_privacy <- c(
  adv_group("gaussian_noise_sd",
    S(gaussian_noise_sd(X, 1, 1e-5), "sensitivity", c("0", "-1", "NaN")),
    S(gaussian_noise_sd(1, X, 1e-5), "epsilon", c("0", "-1", "Inf")),
    S(gaussian_noise_sd(1, 1, X), "delta", c("0", "1", "NaN")),
    S(gaussian_noise_sd(1, 1, 1e-5, method = X), "method", c("bogus", "NA_chr", "1")),
    OK("epsilon = 1e-30", gaussian_noise_sd(1, 1e-30, 1e-5),
       check = is.finite(.value) && .value > 3e4 && .value < 5e4,
       why = "tiny but valid epsilon: sigma tends to 1 / (delta * sqrt(2 * pi)), about 4e4"),
    OK("sensitivity 1e300, epsilon 1e-300", gaussian_noise_sd(1e300, 1e-300, 1e-5),
       check = is.finite(.value) && .value > 1e304,
       why = "valid; sigma is about 4e304, representable (a zero sd would release the data unprotected)"),
    OK("epsilon = 1e300", gaussian_noise_sd(1, 1e300, 1e-5), check = is.finite(.value) && .value > 0,
       why = "valid; sigma about 7e-151 must stay > 0"),
    OK("delta = 1e-300", gaussian_noise_sd(1, 1, 1e-300), check = is.finite(.value) && .value > 0,
       why = "valid tiny delta")
  ),
  adv_group("add_gaussian_noise",
    S(add_gaussian_noise(X, 1, 1, 1e-5, seed = 1), "x", c("NULL", "chr", "fun")),
    E("a data frame", add_gaussian_noise(data.frame(a = 3, b = 4), sd = 1, seed = 1), "x",
      note = "judgment: weighted_aggregate() refuses data frames; here one is taken as a list of layers"),
    E("NA in x", add_gaussian_noise(c(1, NA), 1, 1, 1e-5, seed = 1), "x"),
    E("Inf in x", add_gaussian_noise(c(1, Inf), 1, 1, 1e-5, seed = 1), "x"),
    S(add_gaussian_noise(1:3, 1, 1, 1e-5, seed = X), "seed", c("-1", "1.5", "NA")),
    E("seed = 2^53", add_gaussian_noise(1:3, 1, 1, 1e-5, seed = 2^53), "seed"),
    S(add_gaussian_noise(1:3, seed = 1, sd = X), "sd", c("-1", "NA", "Inf")),
    E("negative sensitivity", add_gaussian_noise(1:3, -1, 1, 1e-5, seed = 1), "sensitivity"),
    E("bad method", add_gaussian_noise(1:3, 1, 1, 1e-5, seed = 1, method = "laplace"), "method"),
    E("threads = .Machine$integer.max", add_gaussian_noise(1:3, sd = 1, seed = 1, threads = .Machine$integer.max),
      "threads", class = "fedagg_error_input"),
    OK("seed = 2^53 - 1", add_gaussian_noise(1:3, 1, 1, 1e-5, seed = 2^53 - 1), check = all(is.finite(.value)),
       why = "the largest documented seed"),
    EITHER("noise overflowing the update", add_gaussian_noise(c(1e308, 1e308), sd = 1e308, seed = 1),
           check = all(is.finite(.value)))
  ),
  adv_group("fedagg_threads",
    lapply(c("bogus", "0", "intmax", "len2"), function(v) {
      stopifnot(v %in% adv_bad_names)
      adv_case(sprintf("option fedagg.threads = <%s>", v),
               bquote(local({ op <- options(fedagg.threads = .bad[[.(v)]]); on.exit(options(op)); fedagg_threads() })),
               re = "fedagg\\.threads", class = if (v == "intmax") "fedagg_error_input")
    }),
    OK("option fedagg.threads = 1024", local({ op <- options(fedagg.threads = 1024); on.exit(options(op));
                                              fedagg_threads() }),
       check = .value$threads >= 1 && .value$threads <= .value$cores,
       why = "the largest accepted value; runs on the cores there are")
  ),
  adv_group("ks_test",
    S(ks_test(X, 1:5), "x", c("NULL", "chr", "num0")),
    S(ks_test(1:5, X), "y", c("NULL", "num0")),
    S(ks_test(1:5, 2:6, alternative = X), "alternative", c("bogus", "NA_chr", "1")),
    S(ks_test(1:5, 2:6, exact = X), "exact", c("NA", "chr", "lgl2")),
    E("threads = .Machine$integer.max", ks_test(1:5, 2:6, threads = .Machine$integer.max), "threads",
      class = "fedagg_error_input"),
    E("exact p-value for 1e6 x 1e6 samples (1e12 lattice cells)",
      ks_test(seq_len(1e6), seq_len(1e6) + 0.5, exact = TRUE), re = "exact", solo = TRUE, timeout = 10,
      note = "judgment: a computation that cannot finish should be refused, not hang")
  ),
  adv_group("ks_drift",
    S(ks_drift(X, 1:5), "reference", c("NULL", "chr")),
    S(ks_drift(1:5, X), "current", c("chr")),
    E("different features", ks_drift(data.frame(a = 1:3), data.frame(b = 1:3)), "reference"),
    E("a character column", ks_drift(data.frame(a = 1:3, b = "x"), data.frame(a = 1:3, b = "y")), "reference"),
    E("a matrix against a vector", ks_drift(cbind(a = 1:5, b = 1:5), 1:5), "reference"),
    E("no features", ks_drift(data.frame(), data.frame()), "reference",
      note = "judgment: a drift check of nothing returns an empty table silently"),
    S(ks_drift(1:5, 2:6, alpha = X), "alpha", c("0", "1", "NA")),
    S(ks_drift(1:5, 2:6, adjust = X), "adjust", c("bogus", "NA_chr", "1")),
    E("threads = .Machine$integer.max", ks_drift(1:5, 2:6, threads = .Machine$integer.max), "threads",
      class = "fedagg_error_input")
  )
)

test_that("privacy, threads and drift functions reject bad inputs with classed errors and never crash", {
  adv_expect_all(adv_cases_privacy, adv_run(adv_cases_privacy))
})

# --- Partitions ----------------------------------------------------------------

adv_cases_partition <- c(
  adv_group("partition_iid",
    S(partition_iid(X, 2), "n", c("0", "NA", "1e12")),
    S(partition_iid(10, X), "n_clients", c("0", "1.5", "1e12")),
    E("more clients than samples", partition_iid(10, 11), "n_clients"),
    S(partition_iid(10, 2, seed = X), "seed", c("-1", "1.5", "Inf")),
    E("n = .Machine$integer.max (an 8 GB permutation)", partition_iid(.Machine$integer.max, 2),
      class = "fedagg_error_memory",
      note = "relies on the child's R_MAX_VSIZE cap; without it R would try to allocate ~17 GB")
  ),
  adv_group("partition_dirichlet",
    S(partition_dirichlet(X, 2, 1), "y", c("NULL", "list", "num0")),
    E("labels with NA", partition_dirichlet(c(1, 2, NA, 1), 2, 1, min_size = 0), "y"),
    E("n_clients = 0", partition_dirichlet(yy, 0, 1), "n_clients"),
    E("n_clients = 1e12", partition_dirichlet(yy, 1e12, 1), "n_clients"),
    E("more clients than samples", partition_dirichlet(yy, 31, 1), "n_clients"),
    S(partition_dirichlet(yy, 2, X), "alpha", c("0", "-1", "Inf")),
    S(partition_dirichlet(yy, 2, 1, min_size = X), "min_size", c("-1", "1.5")),
    E("min_size impossible", partition_dirichlet(yy, 3, 1, min_size = 11), "min_size"),
    S(partition_dirichlet(yy, 2, 1, max_tries = X), "max_tries", c("0", "NA")),
    E("no draw satisfies min_size", partition_dirichlet(rep(1:2, c(29, 1)), 2, 0.01, min_size = 14, max_tries = 3,
                                                        seed = 1), "min_size")
  ),
  adv_group("partition_shards",
    S(partition_shards(X, 2), "y", c("NULL", "list")),
    S(partition_shards(yy, 2, shards_per_client = X), "shards_per_client", c("0", "1.5", "NA")),
    E("more shards than samples", partition_shards(yy, 20, shards_per_client = 2), re = "shards"),
    E("n_clients = 0", partition_shards(yy, 0), "n_clients")
  ),
  adv_group("partition_quantity",
    E("n = 0", partition_quantity(0, 2), "n"),
    E("n_clients = 0", partition_quantity(10, 0), "n_clients"),
    E("more clients than samples", partition_quantity(10, 11), "n_clients"),
    S(partition_quantity(100, 5, distribution = X), "distribution", c("bogus", "NA_chr")),
    S(partition_quantity(100, 5, sdlog = X), "sdlog", c("-1", "Inf")),
    S(partition_quantity(100, 5, "powerlaw", shape = X), "shape", c("0", "Inf")),
    E("min_size impossible", partition_quantity(100, 5, min_size = 21), "min_size"),
    E("min_size = -1", partition_quantity(100, 5, min_size = -1), "min_size"),
    EITHER("powerlaw shape = 5e-324", partition_quantity(100, 5, "powerlaw", shape = 5e-324, seed = 1),
           check = valid_partition(.value, 100, 5)),
    EITHER("lognormal sdlog = 1e308", partition_quantity(100, 5, sdlog = 1e308, seed = 1),
           check = valid_partition(.value, 100, 5))
  )
)

test_that("partitions reject bad inputs with classed errors and never crash", {
  adv_expect_all(adv_cases_partition, adv_run(adv_cases_partition))
})

# --- Models, training settings, schedules, stopping ------------------------------

adv_cases_model <- c(
  adv_group("model_linear",
    S(model_linear(X), "n_features", c("0", "NA", "1e12")),
    S(model_linear(4, init = X), "init", c("bogus", "NA_chr"))
  ),
  adv_group("model_logistic",
    S(model_logistic(4, classes = X), "classes", c("bogus", "NA_chr", "1")),
    E("duplicated classes", model_logistic(4, classes = c("a", "a")), "classes"),
    E("three classes", model_logistic(4, classes = c("a", "b", "c")), "classes"),
    E("numeric classes", model_logistic(4, classes = c(0, 1)), "classes")
  ),
  adv_group("model_softmax",
    S(model_softmax(4, X), "n_classes", c("1", "1.5", "NA")),
    E("neither n_classes nor classes", model_softmax(4), "n_classes"),
    E("classes disagree with n_classes", model_softmax(4, 3, classes = c("a", "b")), "classes"),
    E("n_classes = .Machine$integer.max", model_softmax(4, .Machine$integer.max), class = "fedagg_error_memory"),
    E("n_features = .Machine$integer.max", model_softmax(.Machine$integer.max, 3), class = "fedagg_error_memory")
  ),
  adv_group("model_mlp",
    S(model_mlp(4, hidden = X, n_classes = 3), "hidden", c("0", "1.5", "NA")),
    E("hidden = Inf", model_mlp(4, hidden = Inf, n_classes = 3), "hidden"),
    E("hidden = .Machine$integer.max", model_mlp(4, hidden = .Machine$integer.max, n_classes = 3),
      class = "fedagg_error_memory"),
    E("hidden = c(1e5, 1e5) (1e10 parameters)", model_mlp(4, hidden = c(1e5, 1e5), n_classes = 3),
      class = "fedagg_error_memory"),
    S(model_mlp(4, n_classes = 3, output = X), "output", c("bogus", "NA_chr")),
    E("softmax without n_classes", model_mlp(4), "n_classes"),
    E("n_classes = 1", model_mlp(4, n_classes = 1), "n_classes"),
    E("classes for a linear output", model_mlp(4, output = "linear", classes = c("a", "b")), "classes"),
    E("bad init", model_mlp(4, n_classes = 3, init = "he"), "init")
  ),
  adv_group("model_cnn",
    S(model_cnn(X, list(relu()), n_classes = 3), "input", c("0", "-1", "NA", "chr", "num0")),
    S(model_cnn(c(8, 8), list(relu()), n_classes = X), "n_classes", c("1", "1.5", "NA")),
    E("layers that are not a list", model_cnn(c(8, 8), relu(), n_classes = 3), "layers"),
    E("a kernel larger than its input", model_cnn(c(4, 4), list(conv(2, 5)), n_classes = 3), re = "layer 1"),
    E("a hidden dense layer without relu()", model_cnn(c(4, 4), list(dense(3)), n_classes = 3), re = "layer 1"),
    E("a width that would not fit", model_cnn(c(4, 4), list(dense(1e9), relu()), n_classes = 3), class = "fedagg_error_memory"),
    E("bad init", model_cnn(c(4, 4), list(relu()), n_classes = 3, init = "he"), "init")
  ),
  adv_group("conv",
    S(conv(X, 3), "filters", c("0", "-1", "1.5", "NA", "chr")),
    S(conv(2, X), "size", c("0", "1.5", "NA")),
    S(conv(2, 3, stride = X), "stride", c("0", "-1", "Inf")),
    S(conv(2, 3, padding = X), "padding", c("-1", "1.5"))
  ),
  adv_group("max_pool", S(max_pool(X), "size", c("0", "-1", "NA"))),
  adv_group("avg_pool", S(avg_pool(2, stride = X), "stride", c("0", "1.5"))),
  adv_group("dense", S(dense(X), "units", c("0", "-1", "NA", "chr"))),
  adv_group("dropout",
    S(dropout(X), "rate", c("1", "-1", "1.5", "NA", "chr", "Inf")),
    E("dropout() after a dense layer without its relu()", model_cnn(c(4, 4), list(dense(3), dropout(0.5), relu()), n_classes = 3), re = "layer 1")
  ),
  adv_group("relu", E("relu() in a dense part without dense()", model_cnn(c(4, 4), list(flatten(), relu()), n_classes = 3), re = "layer 2")),
  adv_group("flatten", E("flatten() twice", model_cnn(c(4, 4), list(flatten(), flatten()), n_classes = 3), re = "layer 2")),
  adv_group("images_to_matrix",
    E("a matrix", images_to_matrix(matrix(0, 2, 2)), "x"),
    E("characters", images_to_matrix(array("a", c(2, 2, 2))), "x")
  ),
  adv_group("model_custom",
    E("init is not a function", custom(init = 1), "init"),
    E("loss_grad is a string", model_custom(function(s) 1, "f", function(p, x) 1, n_features = 4), "loss_grad"),
    E("predict is NULL", model_custom(function(s) 1, function(p, x, y) 1, NULL, n_features = 4), "predict"),
    E("bad task", custom(task = "ranking"), "task"),
    E("n_features = 0", model_custom(function(s) 1, function(p, x, y) 1, function(p, x) 1, n_features = 0),
      "n_features"),
    E("n_features = NA", model_custom(function(s) 1, function(p, x, y) 1, function(p, x) 1, n_features = NA),
      "n_features"),
    E("name = NA", model_custom(function(s) 1, function(p, x, y) 1, function(p, x) 1, n_features = 2,
                                name = NA_character_), "name"),
    E("name = 1", model_custom(function(s) 1, function(p, x, y) 1, function(p, x) 1, n_features = 2, name = 1),
      "name"),
    E("n_classes = 1", model_custom(function(s) 1, function(p, x, y) 1, function(p, x) 1, n_features = 2,
                                    n_classes = 1), "n_classes"),
    E("classes for regression", model_custom(function(s) 1, function(p, x, y) 1, function(p, x) 1,
                                             task = "regression", n_features = 2, classes = c("a", "b")),
      "classes")
  ),
  adv_group("init_params",
    S(init_params(X), "model", c("NULL", "list", "chr")),
    S(init_params(m_soft, X), "seed", c("-1", "1.5", "1e12")),
    OK("seed = .Machine$integer.max", init_params(m_soft, .Machine$integer.max), check = length(.value) == 2,
       why = "a huge but valid seed"),
    E("custom init returns NaN", init_params(custom(init = function(seed) list(w = NaN))),
      class = "fedagg_error_user_code"),
    E("custom init throws", init_params(custom(init = function(seed) stop("no init"))),
      class = "fedagg_error_user_code"),
    E("custom init returns a string", init_params(custom(init = function(seed) "a")),
      class = "fedagg_error_user_code"),
    E("custom init returns NULL", init_params(custom(init = function(seed) NULL)), class = "fedagg_error_user_code"),
    E("custom init returns list()", init_params(custom(init = function(seed) list())),
      class = "fedagg_error_user_code")
  ),
  adv_group("loss_grad",
    E("model NULL", loss_grad(NULL, p_soft, d$x, d$y), "model"),
    E("params NULL", loss_grad(m_soft, NULL, d$x, d$y), "params"),
    E("params of the wrong lengths", loss_grad(m_soft, list(W1 = 1, b1 = 1), d$x, d$y), "params"),
    E("params with other names", loss_grad(m_soft, list(a = p_soft$W1, b = p_soft$b1), d$x, d$y), "params"),
    E("params with NaN", loss_grad(m_soft, list(W1 = p_soft$W1 + NaN, b1 = p_soft$b1), d$x, d$y), "params"),
    E("params with a character layer", loss_grad(m_soft, list(W1 = rep("a", 12), b1 = p_soft$b1), d$x, d$y),
      "params"),
    E("x of the wrong width", loss_grad(m_soft, p_soft, d$x[, 1:3], d$y), "x"),
    E("x with NA", loss_grad(m_soft, p_soft, replace(d$x, 1, NA), d$y), "x"),
    E("x a character matrix", loss_grad(m_soft, p_soft, matrix("a", 30, 4), d$y), "x"),
    E("x with no rows", loss_grad(m_soft, p_soft, d$x[0, ], d$y[0]), "x"),
    E("x NULL", loss_grad(m_soft, p_soft, NULL, d$y), "x"),
    E("y of the wrong length", loss_grad(m_soft, p_soft, d$x, d$y[-1]), "y"),
    E("y beyond the classes", loss_grad(m_soft, p_soft, d$x, d$y + 1), "y"),
    E("y negative", loss_grad(m_soft, p_soft, d$x, d$y - 1), "y"),
    E("y fractional", loss_grad(m_soft, p_soft, d$x, d$y + 0.5), "y"),
    E("y with NA", loss_grad(m_soft, p_soft, d$x, replace(d$y, 1, NA)), "y"),
    E("y a list", loss_grad(m_soft, p_soft, d$x, as.list(d$y)), "y"),
    E("custom loss_grad throws", loss_grad(custom(loss_grad = function(params, x, y) stop("boom")), p_cus,
                                           d$x, d$x[, 1]), class = "fedagg_error_user_code"),
    E("custom loss_grad returns a string", loss_grad(custom(loss_grad = function(params, x, y) "garbage"), p_cus,
                                                     d$x, d$x[, 1]), class = "fedagg_error_user_code",
      note = "judgment: loss_grad() passes a custom model's malformed result through unchecked")
  ),
  adv_group("predict.fed_model",
    E("params NULL", predict(m_soft, NULL, d$x), "params"),
    E("params of another model", predict(m_soft, p_lin, d$x), "params"),
    S(predict(m_soft, p_soft, X), "newdata", c("NULL", "chr", "NA")),
    E("newdata of the wrong width", predict(m_soft, p_soft, d$x[, 1:2]), "newdata"),
    E("newdata with NaN", predict(m_soft, p_soft, replace(d$x, 3, NaN)), "newdata"),
    S(predict(m_soft, p_soft, d$x, type = X), "type", c("bogus", "NA_chr")),
    E("type = \"class\" for regression", predict(m_lin, p_lin, d$x, type = "class"), "type"),
    E("custom predict returns the wrong length", predict(custom(predict = function(params, x) 1:2), p_cus, d$x),
      class = "fedagg_error_user_code"),
    E("custom predict returns NaN", predict(custom(predict = function(params, x) rep(NaN, nrow(x))), p_cus, d$x),
      class = "fedagg_error_user_code"),
    E("custom predict throws", predict(custom(predict = function(params, x) stop("boom")), p_cus, d$x),
      class = "fedagg_error_user_code"),
    E("custom predict returns a string", predict(custom(predict = function(params, x) rep("a", nrow(x))), p_cus,
                                                 d$x), class = "fedagg_error_user_code")
  ),
  adv_group("train_config",
    E("model NULL", train_config(NULL), "model"),
    S(train_config(m_soft, algorithm = X), "algorithm", c("bogus", "NA_chr")),
    S(train_config(m_soft, epochs = X), "epochs", c("0", "1.5", "1e12")),
    S(train_config(m_soft, batch_size = X), "batch_size", c("0", "1.5", "-Inf")),
    S(train_config(m_soft, lr = X), "lr", c("0", "-1", "Inf")),
    S(train_config(m_soft, weight_decay = X), "weight_decay", c("-1", "Inf")),
    S(train_config(m_soft, momentum = X), "momentum", c("1", "-1")),
    S(train_config(m_soft, shuffle = X), "shuffle", c("NA", "chr")),
    S(train_config(m_soft, seed = X), "seed", c("-1", "1e12")),
    S(train_config(m_soft, stream = X), "stream", c("-1", "1.5"))
  ),
  adv_group("lr_step", S(lr_step(gamma = X), "gamma", c("0", "2", "NA")),
            S(lr_step(every = X), "every", c("0", "1.5"))),
  adv_group("lr_exponential", S(lr_exponential(gamma = X), "gamma", c("0", "2"))),
  adv_group("lr_cosine",
    S(lr_cosine(period = X), "period", c("0", "1.5", "NA")),
    S(lr_cosine(min_lr = X), "min_lr", c("-1", "Inf")),
    E("min_lr above the base rate when called", lr_cosine(min_lr = 0.5)(0.1, 1), "min_lr")
  ),
  adv_group("early_stopping",
    S(early_stopping(metric = X), "metric", c("1", "NA_chr", "chr2")),
    S(early_stopping(patience = X), "patience", c("0", "1.5")),
    S(early_stopping(min_delta = X), "min_delta", c("-1", "NA")),
    S(early_stopping(mode = X), "mode", c("bogus"))
  ),
  adv_group("stop_training",
    S(stop_training(X), "reason", c("1", "NA_chr")),
    E("called outside fit()", stop_training("done"), class = "fedagg_stop_training", generic = FALSE,
      note = "documented: outside fit() it is an error of class fedagg_stop_training")
  )
)

# --- The round pipeline's parts ------------------------------------------------

adv_cases_pipeline <- c(
  adv_group("client algorithms",
    OK("the parts without settings", list(fedavg(), fedsgd(), scaffold(), fednova(), agg_weighted(), select_uniform(),
                                          select_by_size()),
       why = "constructors without arguments have no bad input of their own"),
    S(fedprox(X), "mu", c("-1", "NA", "Inf", "chr", "len2")),
    S(scaffold(correction = X), "correction", c("bogus", "NA_chr", "1")),
    E("fed_algorithm without a function", fed_algorithm("x", 1), "local"),
    E("fed_algorithm with a bad name", fed_algorithm(NA, function(...) NULL), "name"),
    S(mk_srv(algorithm = X), "algorithm", c("bogus", "NA_chr", "1", "fun", "list")),
    E("fednova with Adam", mk_srv(algorithm = fednova(), local_optimizer = local_adam()), "local_sgd"),
    S(mk_srv(aggregator = X), "aggregator", c("bogus", "fun", "NULL"))
  ),
  adv_group("local optimizers",
    S(local_sgd(momentum = X), "momentum", c("1", "-1", "NA")),
    S(local_sgd(weight_decay = X), "weight_decay", c("-1", "Inf", "chr")),
    S(local_adam(beta1 = X), "beta1", c("1", "-1", "NaN")),
    S(local_adam(beta2 = X), "beta2", c("1", "chr")),
    S(local_adam(eps = X), "eps", c("0", "-1", "Inf")),
    S(local_rmsprop(alpha = X), "alpha", c("1", "-1", "NA")),
    S(local_adagrad(eps = X), "eps", c("0", "NaN")),
    S(mk_srv(local_optimizer = X), "local_optimizer", c("bogus", "fun", "list"))
  ),
  adv_group("server optimizers",
    S(server_sgd(lr = X), "lr", c("0", "-1", "Inf", "NA")),
    S(server_sgd(momentum = X), "momentum", c("1", "-1")),
    S(server_adagrad(tau = X), "tau", c("0", "-1")),
    S(server_adam(beta1 = X), "beta1", c("1", "NA")),
    S(server_yogi(beta2 = X), "beta2", c("1", "-1")),
    E("server_optimizer without a function", server_optimizer("x", 1), "step"),
    S(mk_srv(server_optimizer = X), "server_optimizer", c("bogus", "fun", "NULL"))
  ),
  adv_group("selection rules",
    S(select_poisson(X), "q", c("0", "-1", "2", "NA")),
    S(select_power_of_choice(X), "d", c("0", "1.5", "NA", "chr")),
    S(select_score(similarity = X), "similarity", c("-1", "NA")),
    S(select_score(explore = X), "explore", c("2", "-1")),
    S(mk_srv(selection = X), "selection", c("bogus", "NA_chr", "1", "list")),
    E("power of choice with d below the clients per round",
      mk_srv(selection = select_power_of_choice(1))$round(), "d")
  ),
  adv_group("heterogeneous work and availability",
    S(mk_srv(epochs = X), "epochs", c("0", "1.5", "NA", "len2", "chr")),
    S(mk_srv(stragglers = X), "stragglers", c("-1", "2", "NA")),
    S(mk_srv(drop_stragglers = X), "drop_stragglers", adv_bad_flag),
    S(mk_srv(diagnostics = X), "diagnostics", adv_bad_flag),
    S(fed_nodes(d$x, d$y, partition_iid(30, 3, seed = 1), availability = X), "availability",
      c("0", "-1", "2", "NA", "len2", "chr")),
    S(fed_node(d$x, d$y, availability = X), "availability", c("0", "NA", "chr")),
    E("momentum given twice", mk_srv(local_optimizer = local_sgd(), momentum = 0.5), "momentum")
  )
)

test_that("the round pipeline's parts reject bad inputs with classed errors", {
  adv_expect_all(adv_cases_pipeline, adv_run(adv_cases_pipeline))
})

# --- Privacy and robustness in the round ---------------------------------------

adv_cases_trust <- c(
  adv_group("robust aggregators and the filter",
    OK("the median without settings", agg_median(), why = "no settings to get wrong"),
    S(agg_trimmed_mean(X), "trim", c("0.5", "-1", "NA", "chr")),
    S(agg_krum(X), "f", c("-1", "1.5", "chr")),
    S(agg_multi_krum(m = X), "m", c("0", "1.5", "chr")),
    S(agg_geometric_median(tol = X), "tol", c("0", "-1", "NaN")),
    S(agg_geometric_median(max_iter = X), "max_iter", c("0", "1.5")),
    S(agg_bulyan(X), "f", c("-1", "NA", "chr")),
    E("Bulyan with too few clients", mk_srv(aggregator = agg_bulyan(2))$round(), NULL),
    S(filter_norm(max_norm = X), "max_norm", c("0", "-1", "chr")),
    S(filter_norm(mad = X), "mad", c("0", "-1", "chr")),
    E("a filter without a rule", filter_norm(max_norm = NULL, mad = NULL), "max_norm"),
    S(mk_srv(filter = X), "filter", c("bogus", "fun", "list"))
  ),
  adv_group("attacks",
    S(attack_sign_flip(X), "scale", c("0", "-1", "NA")),
    S(attack_scale(X), "factor", c("NA", "chr", "Inf")),
    S(attack_gaussian(X), "sd", c("0", "-1", "NaN")),
    S(attack_same_value(X), "value", c("NA", "chr")),
    S(attack_label_flip(X), "mapping", c("NULL", "chr", "len2", "NA")),
    E("set_attack on an unknown node", set_attack(nodes, "nobody", attack_scale(2)), "ids"),
    E("set_attack with a string", set_attack(nodes, 1, "flip"), "attack"),
    E("set_attack on a non-list", set_attack(1, 1, attack_scale(2)), "nodes")
  ),
  adv_group("differential privacy",
    S(dp_central(X, clip = 1), "noise_multiplier", c("-1", "NA", "chr")),
    S(dp_central(1, clip = X), "clip", c("0", "-1", "Inf")),
    S(dp_central(1, clip = 1, delta = X), "delta", c("0", "1", "NA")),
    S(dp_central(1, clip = 1, max_epsilon = X), "max_epsilon", c("0", "-1", "chr")),
    S(clip_norm(X), "max_norm", c("0", "-1", "NA")),
    S(dp_local(X, clip = 1), "epsilon", c("0", "-1", "NA")),
    S(dp_local(1, delta = X, clip = 1), "delta", c("0", "1")),
    S(dp_local(1, clip = X), "clip", c("0", "-1", "chr")),
    S(clip_adaptive(initial = X), "initial", c("0", "-1", "chr")),
    S(clip_adaptive(quantile = X), "quantile", c("0", "1", "NA")),
    S(clip_adaptive(lr = X), "lr", c("0", "-1")),
    S(clip_adaptive(count_noise = X), "count_noise", c("-1", "chr")),
    E("adaptive clipping with too little count noise",
      mk_srv(privacy = dp_central(1, clip = clip_adaptive(count_noise = 0.01))), "count_noise"),
    S(mk_srv(privacy = X), "privacy", c("bogus", "list", "fun")),
    S(mk_srv(clip = X), "clip", c("bogus", "1")),
    S(mk_srv(min_samples = X), "min_samples", c("-1", "1.5", "chr")),
    E("DP with a robust aggregator", mk_srv(privacy = dp_central(1, 1), aggregator = agg_median()), "agg_weighted"),
    E("privacy_spent without privacy", privacy_spent(srv), "privacy"),
    E("privacy_spent of a non-server", privacy_spent(1), "server"),
    S(rdp_epsilon(X, 1, 10, 1e-5), "q", c("-1", "2", "NA")),
    S(rdp_epsilon(0.1, X, 10, 1e-5), "noise_multiplier", c("-1", "chr")),
    S(rdp_epsilon(0.1, 1, X, 1e-5), "steps", c("-1", "1.5", "NA")),
    S(rdp_epsilon(0.1, 1, 10, X), "delta", c("0", "1")),
    S(rdp_noise_multiplier(X, 1e-5, 0.1, 10), "epsilon", c("0", "-1", "NA")),
    S(rdp_sampled_gaussian(0.1, 1, orders = X), "orders", c("1", "-1", "chr"))
  ),
  adv_group("drift monitoring",
    S(monitor_drift(window = X), "window", c("1", "1.5", "NA")),
    S(monitor_drift(alpha = X), "alpha", c("0", "1", "chr")),
    S(monitor_drift(features = X), "features", adv_bad_flag),
    S(monitor_drift(window = 3, start = X), "start", c("0", "1.5", "chr", "2")),
    S(mk_srv(monitor = X), "monitor", c("bogus", "fun")),
    E("set_data with another width", node$set_data(matrix(1, 2, 2), 0:1), "x"),
    E("set_data with missing labels", node$set_data(d$x[1:3, ], c(0, NA, 1)), "y")
  )
)

test_that("privacy and robustness settings reject bad inputs with classed errors", {
  adv_expect_all(adv_cases_trust, adv_run(adv_cases_trust))
})

test_that("models, settings, schedules and stopping rules reject bad inputs with classed errors", {
  adv_expect_all(adv_cases_model, adv_run(adv_cases_model))
})

# --- Data: simulation, pooling, files, comparisons ---------------------------------

adv_cases_data <- c(
  adv_group("synthetic_fedprox",
    S(synthetic_fedprox(X, 1, n_clients = 2), "alpha", c("-1", "NA", "Inf")),
    S(synthetic_fedprox(1, X, n_clients = 2), "beta", c("-1")),
    S(synthetic_fedprox(1, 1, n_clients = X), "n_clients", c("0", "1.5", "1e12")),
    S(synthetic_fedprox(1, 1, n_clients = 2, dim = X), "dim", c("0", "1e12")),
    S(synthetic_fedprox(1, 1, n_clients = 2, n_classes = X), "n_classes", c("1")),
    S(synthetic_fedprox(1, 1, n_clients = 2, iid = X), "iid", c("NA", "chr")),
    S(synthetic_fedprox(1, 1, n_clients = 2, train_fraction = X), "train_fraction", c("0", "2")),
    S(synthetic_fedprox(1, 1, n_clients = 2, max_size = X), "max_size", c("1", "1.5", "-Inf")),
    S(synthetic_fedprox(1, 1, n_clients = 2, seed = X), "seed", c("-1")),
    E("n_clients = .Machine$integer.max", synthetic_fedprox(1, 1, n_clients = .Machine$integer.max),
      class = "fedagg_error_memory",
      note = "relies on the child's R_MAX_VSIZE cap; without it R would try to allocate ~17 GB per draw")
  ),
  adv_group("pool_clients",
    S(pool_clients(X), "data", c("NULL", "list", "df")),
    S(pool_clients(fd, X), "split", c("bogus", "NA_chr"))
  ),
  adv_group("read_idx",
    S(read_idx(X), "path", c("NULL", "NA_chr", "chr2")),
    E("a file that does not exist", read_idx(tempfile()), "path"),
    E("a directory", read_idx(tempdir()), "path"),
    E("an empty file", read_idx(idx_file(raw())), re = "IDX|magic"),
    E("a bad magic number", read_idx(idx_file(c(1, 2, 8, 1), 1L, 1)), re = "magic"),
    E("a truncated header", read_idx(idx_file(c(0, 0, 8, 2), 3L)), re = "header|truncated"),
    E("an unknown type code", read_idx(idx_file(c(0, 0, 7, 1), 1L, 1)), re = "type"),
    E("a negative dimension", read_idx(idx_file(c(0, 0, 8, 1), -1L)), re = "header|invalid"),
    E("a header claiming 2.5e9 values", read_idx(idx_file(c(0, 0, 8, 2), c(50000L, 50000L))), re = "2\\^31|claims"),
    E("a plain file claiming 1e9 values", read_idx(idx_file(c(0, 0, 8, 1), 1e9L, 1:10)), re = "truncated|bytes"),
    E("a gzip file claiming 1e8 values", read_idx(idx_file(c(0, 0, 8, 1), 1e8L, 1:10, gz = TRUE)),
      re = "truncated"),
    E("data beyond the header's values", read_idx(idx_file(c(0, 0, 8, 1), 2L, 1:5)), re = "beyond"),
    E("gzip data beyond the header's values", read_idx(idx_file(c(0, 0, 8, 1), 2L, 1:5, gz = TRUE)),
      re = "beyond"),
    E("a 4-byte float file with a short payload", read_idx(idx_file(c(0, 0, 13, 1), 3L, 1:6)), re = "truncated")
  ),
  adv_group("load_fashion_mnist",
    S(load_fashion_mnist(dir = X), "dir", c("NULL", "1", "NA_chr")),
    E("a directory without the files", load_fashion_mnist(dir = tempdir()), re = "Cannot find"),
    S(load_fashion_mnist(dir = tempdir(), normalize = X), "normalize", c("NA", "chr")),
    E("more labels than images", load_fashion_mnist(fm_dir(2L, c(0L, 1L, 2L))), re = "labels"),
    E("a label outside 0..9", load_fashion_mnist(fm_dir(2L, c(0L, 12L))), re = "label")
  ),
  adv_group("fed_compare",
    E("no runs", fed_compare()),
    E("a number", fed_compare(3)),
    E("a string", fed_compare(a = h1, b = "a")),
    E("a data frame", fed_compare(data.frame(a = 1))),
    E("an empty list", fed_compare(list())),
    E("duplicated names", fed_compare(a = h1, a = h1)),
    E("a list holding a non-history", fed_compare(list(h1, 3)))
  ),
  adv_group("plot/autoplot methods",
    E("plot(history, metric = \"nope\")", plot(h1, metric = "nope"), "metric"),
    E("plot(history, metric = 1)", plot(h1, metric = 1), "metric"),
    E("plot of an empty history", plot(h0)),
    E("plot(comparison, metric = \"nope\")", plot(cmp, metric = "nope"), "metric"),
    E("plot(comparison, metric = two columns)", plot(cmp, metric = c("lr", "round")), "metric"),
    E("autoplot(history, metric = \"nope\")", ggplot2::autoplot(h1, metric = "nope"), "metric")
  )
)

test_that("data helpers, file readers and comparisons reject bad inputs with classed errors", {
  adv_expect_all(adv_cases_data, adv_run(adv_cases_data))
})

# --- Nodes -----------------------------------------------------------------------

adv_cases_node <- c(
  adv_group("fed_node",
    S(fed_node(X, 1:3), "x", c("NULL", "chr", "list")),
    E("x with NA", fed_node(replace(diag(3), 2, NA), 1:3), "x", client = "client"),
    E("x with Inf", fed_node(replace(diag(3), 2, Inf), 1:3), "x"),
    E("x with no rows", fed_node(matrix(numeric(0), 0, 2), numeric(0)), "x"),
    E("x a data frame with a character column", fed_node(data.frame(a = 1:3, b = "u"), 1:3), "x"),
    E("x a complex matrix", fed_node(matrix(1i, 3, 2), 1:3), "x"),
    S(fed_node(diag(3), X), "y", c("NULL", "list", "NA")),
    E("y a matrix", fed_node(diag(3), matrix(1:3, 3)), "y"),
    S(fed_node(diag(3), 1:3, id = X), "id", c("NULL", "NA_chr", "empty_str")),
    E("x_val without y_val", fed_node(diag(3), 1:3, x_val = diag(3)), "y_val"),
    E("x_val of another width", fed_node(diag(3), 1:3, x_val = diag(2), y_val = 1:2), "x_val"),
    E("y_val of the wrong length", fed_node(diag(3), 1:3, x_val = diag(3), y_val = 1:2), "y_val"),
    E("x_val with NA", fed_node(diag(3), 1:3, x_val = replace(diag(3), 1, NA), y_val = 1:3), "x_val"),
    E("Node$new with id NA", Node$new(diag(3), 1:3, id = NA_character_), "id")
  ),
  adv_group("fed_nodes",
    E("no partition", fed_nodes(d$x, d$y), "partition"),
    E("a partition that is a vector", fed_nodes(d$x, d$y, 1:30), "partition"),
    E("row 0", fed_nodes(d$x, d$y, list(0:3)), "partition"),
    E("a row past the end", fed_nodes(d$x, d$y, list(c(1, 31))), "partition"),
    E("an NA row", fed_nodes(d$x, d$y, list(c(1, NA))), "partition"),
    E("a fractional row", fed_nodes(d$x, d$y, list(1.5)), "partition"),
    E("a row twice in a client", fed_nodes(d$x, d$y, list(c(1, 1))), "partition"),
    E("an empty client", fed_nodes(d$x, d$y, list(1:20, integer())), "partition"),
    E("character rows", fed_nodes(d$x, d$y, list(c("1", "2"))), "partition"),
    S(fed_nodes(d$x, d$y, list(1:30), validation = X), "validation", c("1", "-1", "NA")),
    E("ids of the wrong length", fed_nodes(d$x, d$y, list(1:10, 11:30), ids = "a"), "ids"),
    E("duplicated ids", fed_nodes(d$x, d$y, list(1:10, 11:30), ids = c("a", "a")), "ids"),
    E("NA ids", fed_nodes(d$x, d$y, list(1:10, 11:30), ids = c("a", NA)), "ids"),
    E("y of the wrong length", fed_nodes(d$x, d$y[-1], list(1:30)), "y"),
    E("seed = -1", fed_nodes(d$x, d$y, list(1:30), validation = 0.2, seed = -1), "seed"),
    E("fed_data with duplicated ids", fed_nodes(fd, ids = c("a", "a", "b")), "ids"),
    E("x NULL", fed_nodes(NULL, d$y, list(1:30)), "x")
  ),
  adv_group("Node$train",
    E("params NULL", node$train(NULL, cfg), "params"),
    E("params of another model", node$train(p_lin, cfg), "params"),
    E("params with NaN", node$train(list(W1 = p_soft$W1 + NaN, b1 = p_soft$b1), cfg), "params"),
    E("config a string", node$train(p_soft, "x"), "config"),
    E("config NULL", node$train(p_soft, NULL), "config"),
    E("config of a model of another width", node$train(init_params(model_softmax(5, 3)),
                                                       train_config(model_softmax(5, 3))), client = "client1"),
    E("labels beyond the model's classes", fed_node(d$x, d$y, id = "all")$train(init_params(model_softmax(4, 2)),
                                                                              train_config(model_softmax(4, 2))),
      "y", client = "all"),
    S(node$train(p_soft, cfg, return = X), "return", c("bogus", "NA_chr")),
    E("diverging local training (lr = 1e3, features 1e6)",
      fed_node(d$x * 1e6, d$x[, 1] * 1e6, id = "far")$train(p_lin, train_config(m_lin, lr = 1e3, epochs = 5)),
      class = "fedagg_error_diverged", client = "far"),
    E("custom model whose loss_grad throws", node_noval$train(p_cus, train_config(custom(
      loss_grad = function(params, x, y) stop("boom")))), class = "fedagg_error_user_code", client = "client1")
  ),
  adv_group("Node$evaluate",
    E("model NULL", node$evaluate(p_soft, NULL), "model"),
    E("params of another model", node$evaluate(p_lin, m_soft), "params"),
    S(node$evaluate(p_soft, m_soft, data = X), "data", c("bogus", "NA_chr")),
    E("validation on a node without it", node_noval$evaluate(p_soft, m_soft), re = "validation",
      client = "client1"),
    E("custom predict of the wrong shape", node$evaluate(p_cus, custom(predict = function(params, x) 1)),
      class = "fedagg_error_user_code")
  ),
  adv_group("Node methods and bindings",
    E("check_model of another width", node$check_model(model_softmax(5, 3)), "x", client = "client1"),
    E("check_model NULL", node$check_model(NULL), "model"),
    E("data_for with a bad split", node$data_for(m_soft, "test"), "split"),
    E("set id", node$id <- "x", re = "id"),
    E("set n_samples", node$n_samples <- 1, re = "n_samples"),
    E("set n_features", node$n_features <- 1, re = "n_features"),
    E("set has_validation", node$has_validation <- FALSE, re = "has_validation"),
    E("set label_counts", node$label_counts <- 1, re = "label_counts"),
    E("set label_levels", node$label_levels <- 1, re = "label_levels")
  )
)

test_that("nodes reject bad inputs with classed errors naming the node", {
  adv_expect_all(adv_cases_node, adv_run(adv_cases_node))
})

# --- Servers ---------------------------------------------------------------------

adv_cases_server <- c(
  adv_group("fed_server",
    S(fed_server(X, nodes), "model", c("NULL", "chr")),
    S(fed_server(m_soft, X), "nodes", c("NULL", "list", "chr")),
    E("no nodes", fed_server(m_soft, list()), "nodes"),
    E("duplicated node ids", fed_server(m_soft, list(node, node)), "nodes"),
    E("nodes of another width", fed_server(model_softmax(5, 3), nodes), "x"),
    E("labels beyond the model's classes", fed_server(model_softmax(4, 2), nodes), re = "`y(_val)?`"),
    S(mk_srv(algorithm = X), "algorithm", c("bogus")),
    S(fed_server(m_soft, nodes, fraction = X), "fraction", c("0", "2", "NA")),
    S(fed_server(m_soft, nodes, min_clients = X), "min_clients", c("0")),
    E("min_clients above the nodes", fed_server(m_soft, nodes, min_clients = 9), "min_clients"),
    S(mk_srv(selection = X), "selection", c("bogus", "NULL")),
    E("schedule list()", mk_srv(schedule = list()), "schedule"),
    E("schedule with an unknown node", mk_srv(schedule = list("nope")), re = "schedule"),
    E("schedule position 0", mk_srv(schedule = list(0)), re = "schedule"),
    E("schedule selecting a node twice", mk_srv(schedule = list(c(1, 1))), re = "schedule"),
    E("schedule with NA", mk_srv(schedule = list(NA)), re = "schedule"),
    E("schedule a string", mk_srv(schedule = "a"), "schedule"),
    S(mk_srv(weights = X), "weights", c("bogus", "1")),
    E("weights = \"accuracy\" without validation data", mk_srv(nodes_ = nodes_noval, weights = "accuracy"),
      "weights"),
    E("epochs = 0", mk_srv(epochs = 0), "epochs"),
    E("batch_size = 0", mk_srv(batch_size = 0), "batch_size"),
    E("batch_size = -Inf", mk_srv(batch_size = -Inf), "batch_size"),
    S(fed_server(m_soft, nodes, lr = X), "lr", c("0", "Inf", "NA")),
    E("lr_schedule \"linear\"", mk_srv(lr_schedule = "linear"), "lr_schedule"),
    E("lr_schedule 1", mk_srv(lr_schedule = 1), "lr_schedule"),
    E("weight_decay = -1", mk_srv(weight_decay = -1), "weight_decay"),
    E("momentum = 1", mk_srv(momentum = 1), "momentum"),
    E("shuffle = NA", mk_srv(shuffle = NA), "shuffle"),
    E("test_data without y", mk_srv(test_data = list(x = d$x)), "test_data"),
    E("test_data a data frame", mk_srv(test_data = data.frame(x = 1, y = 1)), "test_data"),
    E("test_data of another width", mk_srv(test_data = list(x = d$x[, 1:3], y = d$y)), "test_data"),
    E("test_data labels beyond the classes", mk_srv(test_data = list(x = d$x, y = d$y + 5)), "test_data"),
    E("eval_every = 0", mk_srv(eval_every = 0), "eval_every"),
    S(fed_server(m_soft, nodes, seed = X), "seed", c("-1", "1.5", "1e12")),
    E("threads = .Machine$integer.max", mk_srv(threads = .Machine$integer.max), "threads",
      class = "fedagg_error_input"),
    E("threads = 0", mk_srv(threads = 0), "threads"),
    E("threads = \"a\"", mk_srv(threads = "a"), "threads"),
    E("an unknown hook", mk_srv(hooks = list(on_start = identity)), "hooks"),
    E("an unnamed hook", mk_srv(hooks = list(identity)), "hooks"),
    E("a hook that is not a function", mk_srv(hooks = list(round_start = 1)), re = "round_start"),
    E("hooks a string", mk_srv(hooks = "a"), "hooks"),
    E("params of the wrong shape", mk_srv(params = list(W1 = 1)), "params"),
    E("params with NaN", mk_srv(params = list(W1 = p_soft$W1 + NaN, b1 = p_soft$b1)), "params"),
    E("params a string", mk_srv(params = "a"), "params"),
    E("custom model params of the wrong length", mk_srv(model_ = m_cus, nodes_ = fed_nodes(d$x, d$x[, 1], list(1:30)),
                                                        params = list(w = 1)), "params")
  ),
  adv_group("Server$fit",
    S(mk_srv()$fit(X), "rounds", c("0", "1.5", "NA")),
    S(mk_srv()$fit(1, verbose = X), "verbose", c("NA")),
    S(mk_srv()$fit(1, stop_when = X), "stop_when", c("chr", "list")),
    E("stop_when returns NA", mk_srv()$fit(2, stop_when = function(h) NA), "stop_when"),
    E("stop_when throws", mk_srv()$fit(2, stop_when = function(h) stop("no")), class = "fedagg_error_user_code"),
    E("early_stopping on an unknown column", mk_srv()$fit(3, stop_when = early_stopping("nope", patience = 1)),
      re = "nope")
  ),
  adv_group("Server$select",
    S(srv$select(X), "round", c("0", "1.5", "NA")),
    E("a round past the schedule", mk_srv(schedule = list(1, 2))$select(3), re = "schedule")
  ),
  adv_group("Server$evaluate/predict/aggregate",
    E("evaluate with nothing to evaluate on", mk_srv(nodes_ = nodes_noval)$evaluate(), re = "test_data"),
    S(srv$predict(X), "x", c("NULL", "chr")),
    E("predict with the wrong width", srv$predict(d$x[, 1:3]), "x"),
    E("predict with a bad type", srv$predict(d$x, type = "prob"), "type"),
    E("aggregate mismatched updates", srv$aggregate(list(1:2, 1:3)), "updates"),
    E("aggregate negative weights", srv$aggregate(list(1:2, 1:2), weights = c(1, -1)), "weights")
  ),
  adv_group("Server bindings",
    E("set params NULL", local({ s <- mk_srv(); s$params <- NULL }), "params"),
    E("set params to a string", local({ s <- mk_srv(); s$params <- "a" }), "params"),
    E("set params of the wrong shape", local({ s <- mk_srv(); s$params <- list(W1 = 1, b1 = 1) }), "params"),
    E("set params with NaN", local({ s <- mk_srv(); s$params <- list(W1 = p_soft$W1 + NaN, b1 = p_soft$b1) }),
      "params"),
    E("set history", local({ s <- mk_srv(); s$history <- 1 }), re = "history"),
    E("set timings", local({ s <- mk_srv(); s$timings <- 1 }), re = "timings"),
    E("set stopped", local({ s <- mk_srv(); s$stopped <- 1 }), re = "stopped"),
    E("set client_log", local({ s <- mk_srv(); s$client_log <- 1 }), re = "client_log"),
    E("set rounds_done", local({ s <- mk_srv(); s$rounds_done <- 5 }), re = "rounds_done"),
    E("set nodes", local({ s <- mk_srv(); s$nodes <- list() }), re = "nodes"),
    E("set model", local({ s <- mk_srv(); s$model <- m_lin }), re = "model"),
    E("set clients_per_round", local({ s <- mk_srv(); s$clients_per_round <- 3 }), re = "clients_per_round"),
    E("set settings", local({ s <- mk_srv(); s$settings <- 1 }), re = "settings"),
    lapply(c("0", "NA"), function(v) {
      adv_case(sprintf("set fraction = <%s>", v), bquote(local({ s <- mk_srv(); s$fraction <- .bad[[.(v)]] })),
               arg = "fraction")
    }),
    lapply(c("-1", "Inf"), function(v) {
      adv_case(sprintf("set lr = <%s>", v), bquote(local({ s <- mk_srv(); s$lr <- .bad[[.(v)]] })), arg = "lr")
    })
  ),
  adv_group("fed_diagnose",
    S(fed_diagnose(X), "x", c("NULL", "chr", "df", "1", "list")),
    E("a server that has not run", fed_diagnose(mk_srv()), re = "at least 3 rounds"),
    E("a history of 2 rounds", fed_diagnose(h1), re = "at least 3 rounds"),
    S(local({ s <- mk_srv(); s$fit(3, verbose = FALSE); fed_diagnose(s$history, client_log = X) }), "client_log",
      c("chr", "df", "1")),
    S(local({ s <- mk_srv(); s$fit(3, verbose = FALSE); fed_diagnose(s$history, system_log = X) }), "system_log",
      c("chr", "df")),
    E("a history without its settings", local({
      s <- mk_srv()
      s$fit(3, verbose = FALSE)
      h <- s$history
      attr(h, "settings") <- NULL
      fed_diagnose(h)
    }), re = "settings")
  ),
  adv_group("fed_tune",
    S(fed_tune(X, list(lr = 0.1), rounds = 2), "make_server", c("NULL", "chr", "1")),
    S(fed_tune(mk_tune, X, rounds = 2), "space", c("NULL", "list", "chr", "1")),
    E("a lever make_server does not take", fed_tune(mk_tune, list(momentum = 1), rounds = 2), "space"),
    E("a lever with no value", fed_tune(mk_tune, list(lr = numeric()), rounds = 2), "space"),
    E("a budget below one trial", fed_tune(mk_tune, list(lr = 0.1), rounds = 4, budget = 3), "budget"),
    E("make_server returns no server", fed_tune(function(lr) 1, list(lr = 0.1), rounds = 2), "make_server"),
    E("make_server fails", fed_tune(function(lr) stop("boom"), list(lr = 0.1), rounds = 2), "make_server",
      class = "fedagg_error_user_code"),
    S(fed_tune(mk_tune, list(lr = 0.1), rounds = X), "rounds", c("0", "-1", "1.5", "chr")),
    # Each other argument with its bad values, on one valid call.
    local({
      bad <- list(budget = c("chr", "NA", "-1"), method = c("bogus", "1"), eta = c("1", "chr", "NA"),
                  metric = c("bogus", "1"), target = c("chr", "NA"), seconds = c("0", "-1", "chr"),
                  n_configs = c("0", "1.5"), from = c("chr", "1"))
      lapply(names(bad), function(arg) lapply(bad[[arg]], function(v) {
        call <- as.call(c(list(quote(fed_tune), quote(mk_tune), quote(list(lr = 0.1)), rounds = 2),
                          stats::setNames(list(bquote(.bad[[.(v)]])), arg)))
        adv_case(sprintf("%s = <%s>", arg, v), call, "error", arg = arg)
      }))
    })
  )
)

test_that("servers, their methods and bindings reject bad inputs with classed errors", {
  adv_expect_all(adv_cases_server, adv_run(adv_cases_server))
})

# --- Systems: device profiles, simulated time, compression ---------------------

adv_cases_systems <- c(
  adv_group("system profiles",
    S(system_profile(speed = X), "speed", c("0", "-1", "NA", "Inf", "chr")),
    S(system_profile(download = X), "download", c("0", "-1", "NaN")),
    S(system_profile(upload = X), "upload", c("0", "Inf")),
    S(system_profile(latency = X), "latency", c("-1", "NA")),
    S(system_profile(dropout = X), "dropout", c("-1", "1", "1.5", "chr")),
    E("a draw for a probability", system_profile(dropout = lognormal(0.1)), "dropout"),
    S(lognormal(X), "median", c("0", "-1", "NA")),
    S(lognormal(1, spread = X), "spread", c("0.5", "NA")),
    E("profiles for something that is not nodes", set_system(1:3, system_profile()), "nodes"),
    E("a profile that is not one", set_system(nodes, list(speed = 1)), "profile"),
    E("per-node values of the wrong length", set_system(nodes, system_profile(speed = c(1, 2))), "speed"),
    E("a data frame naming an unknown node", set_system(nodes, data.frame(node = c(names(nodes), "ghost"), speed = 1)),
      NULL, class = "fedagg_error_client"),
    E("a data frame missing a node", set_system(nodes, data.frame(node = names(nodes)[-1], speed = 1)), NULL,
      class = "fedagg_error_client"),
    E("a data frame with a negative speed",
      set_system(nodes, data.frame(node = names(nodes), speed = c(1, -1, 1))), "speed", class = "fedagg_error_client"),
    E("a data frame with an unknown column", set_system(nodes, data.frame(node = names(nodes), sped = 1)), "sped"),
    E("a node's profile set by hand, badly", local(nodes[[1]]$system <- list(speed = -1)), "system",
      class = "fedagg_error_client"),
    E("system_table of something else", system_table("a"), "nodes"),
    E("a deadline without profiles", mk_srv(deadline = 10), "deadline"),
    S(mk_srv(deadline = X), "deadline", c("0", "-1", "chr", "NA")),
    S(mk_srv(over_select = X), "over_select", c("0.5", "NA", "chr")),
    E("profiles on some nodes only",
      local({ n2 <- lapply(nodes, function(n) n$clone()); n2[[1]]$system <- as.list(system_table(nodes[1])[1, -1] * 0 + 1); mk_srv(nodes_ = n2) }),
      NULL, class = "fedagg_error_client")
  ),
  adv_group("compression",
    S(compress_topk(X), "fraction", c("0", "-1", "1.5", "NA", "chr")),
    S(compress_topk(0.1, error_feedback = X), "error_feedback", c("NA", "chr")),
    S(compress_random_k(X), "fraction", c("0", "Inf")),
    S(compress_quantize(X), "bits", c("0", "1.5", "NA", "chr")),
    E("too many bits", compress_quantize(17), "bits"),
    OK("float16 has no settings", compress_float16(), why = "no settings to get wrong"),
    S(compress_update(X, compress_topk(0.5)), "update", c("NULL", "chr", "num0")),
    E("a non-finite update", compress_update(c(1, NaN), compress_topk(0.5)), "update"),
    E("a compressor that is not one", compress_update(1:3, "topk"), "compressor"),
    E("a residual of the wrong length", compress_update(1:3, compress_topk(0.5), residual = 1:2), "residual"),
    E("a float16 overflow", compress_update(c(1, 1e6), compress_float16()), "update"),
    S(mk_srv(compress = X), "compress", c("bogus", "fun", "list"))
  ),
  adv_group("asynchronous rounds",
    S(fedbuff(X), "buffer_size", c("0", "-1", "1.5", "NA", "chr")),
    S(fedbuff(2, concurrency = X), "concurrency", c("0", "NA")),
    S(fedbuff(2, staleness = X), "staleness", c("bogus", "NA_chr", "1")),
    S(fedbuff(2, power = X), "power", c("-1", "NA")),
    S(mk_srv(asynchronous = X), "asynchronous", c("bogus", "list")),
    E("FedBuff without profiles", mk_srv(asynchronous = fedbuff(1, 2)), NULL)
  ),
  adv_group("hierarchical topologies",
    S(topology_hierarchical(X), "groups", c("NULL", "num0", "fun")),
    E("groups without edge names", topology_hierarchical(list(names(nodes))), "groups"),
    E("a node under two edges", topology_hierarchical(list(a = names(nodes)[1:2], b = names(nodes)[2:3])), "groups"),
    S(topology_hierarchical(list(a = names(nodes)), edge_rounds = X), "edge_rounds", c("0", "1.5", "NA")),
    E("an edge link without bandwidth", topology_hierarchical(list(a = names(nodes)), edge_link = list(latency = 1)),
      "edge_link"),
    E("an edge link with zero bandwidth",
      topology_hierarchical(list(a = names(nodes)), edge_link = list(latency = 1, bandwidth = 0)), "bandwidth"),
    E("a topology naming an unknown node", mk_srv(topology = topology_hierarchical(list(a = c(names(nodes), "ghost")))),
      NULL, class = "fedagg_error_client"),
    S(mk_srv(topology = X), "topology", c("bogus", "list")),
    S(topology_links(X), "links", c("NULL", "df", "list")),
    E("a link with a negative latency",
      topology_links(data.frame(from = "a", to = "server", latency = -1, bandwidth = 1)), "latency"),
    E("a link with zero bandwidth", topology_links(data.frame(from = "a", to = "server", latency = 1, bandwidth = 0)),
      "bandwidth"),
    E("a table that never reaches the server",
      topology_links(data.frame(from = "a", to = "b", latency = 1, bandwidth = 1)), "root")
  ),
  adv_group("availability chains",
    S(availability_markov(X, 2), "mean_on", c("0", "0.5", "NA", "chr")),
    S(availability_markov(2, X), "mean_off", c("-1", "Inf")),
    E("a chain that is not one", local(nodes[[1]]$availability <- list(mean_on = 2)), "availability")
  )
)

test_that("system profiles, simulated rounds and compressors reject bad inputs with classed errors", {
  adv_expect_all(adv_cases_systems, adv_run(adv_cases_systems))
})

# --- The networked federation ----------------------------------------------------

adv_cases_network <- c(
  adv_group("fed_keygen",
    S(fed_keygen(X), "path", c("NULL", "NA_chr", "empty_str", "chr2", "list", "num0")),
    S(fed_keygen(tempfile(), overwrite = X), "overwrite", c("NA", "chr", "lgl2")),
    E("an existing key is never replaced", local({
      k <- tempfile()
      suppressMessages(fed_keygen(k))
      fed_keygen(k)
    }), re = "overwrite"),
    E("a directory that does not exist", fed_keygen(file.path(tempfile(), "no", "k.key")), re = "(?i)cannot write")
  ),
  adv_group("fed_config",
    E("a number instead of a file or a list", fed_config(42), re = "mapping"),
    E("a file that does not exist", fed_config(file.path(tempfile(), "c.yaml")), re = "does\\s+not\\s+exist"),
    E("a setting that is not one", fed_config(list(model = list(type = "softmax", n_features = 2, n_classes = 2), modle = 1)),
      re = "modle"),
    E("a constructor that is not a lever's", fed_config(list(model = list(type = "softmax", n_features = 2, n_classes = 2),
                                                           server = list(algorithm = list(type = "Sys.time")))),
      re = "lever constructors")
  ),
  adv_group("fed_config_server",
    E("nodes that are not nodes", fed_config_server(list(model = list(type = "softmax", n_features = 2, n_classes = 2)), 1:3),
      re = "nodes")
  ),
  adv_group("fed_serve_env",
    E("env that is not a named character vector", fed_serve_env(1:3, dry_run = TRUE), re = "env"),
    E("a misspelt FEDAGG_ variable", fed_serve_env(c(FEDAGG_PROT = "1"), dry_run = TRUE), re = "FEDAGG_PORT")
  ),
  adv_group("fed_deploy_check",
    E("a directory that does not exist", fed_deploy_check(tempfile()), re = "directory")
  ),
  adv_group("fed_launch",
    E("a plan without worker processes", local({
      future::plan(future::sequential)
      fed_launch(list(), "http://127.0.0.1:1", model_softmax(2, 2), key = tempdir(), server_key = "x")
    }), re = "plan")
  ),
  adv_group("fed_dashboard",
    S(fed_dashboard(srv, refresh = X, open = FALSE), "refresh", c("0", "-1", "NA", "chr")),
    S(fed_dashboard(srv, clients_rounds = X, open = FALSE), "clients_rounds", c("0", "1.5", "chr")),
    E("a server that is not a Server", fed_dashboard(list(), open = FALSE), "server"),
    E("a url without a viewer key", fed_dashboard(url = "http://127.0.0.1:1", server_key = "ed25519:x"), class = "fedagg_error_missing_file")
  ),
  adv_group("fed_dashboard_app",
    E("a source that is neither a file nor a server", fed_dashboard_app(42), "source")
  ),
  adv_group("fed_public_key",
    S(fed_public_key(X), "path", c("NULL", "NA_chr", "chr2", "num0")),
    E("a file that is not a key", local({
      f <- tempfile()
      writeLines("junk", f)
      fed_public_key(f)
    }), class = "fedagg_error_key")
  ),
  adv_group("fed_tls_selfsigned",
    S(fed_tls_selfsigned(X), "dir", c("NULL", "NA_chr", "empty_str", "chr2")),
    S(fed_tls_selfsigned(tempfile(), hosts = X), "hosts", c("NULL", "NA_chr", "empty_str", "num0", "1"))
  ),
  adv_group("fed_tls",
    S(fed_tls(X, "k"), "cert", c("NULL", "NA_chr", "chr2")),
    S(fed_tls("c", X), "key", c("NA_chr", "chr2")),
    E("files that do not exist", fed_tls(tempfile(), tempfile()), re = "does not exist")
  ),
  adv_group("read_authorized_keys",
    S(read_authorized_keys(X), "file", c("NULL", "NA_chr", "chr2")),
    E("a file that does not exist", read_authorized_keys(tempfile()), re = "does not exist"),
    E("a CSV without the columns", local({
      f <- tempfile()
      writeLines(c("a,b", "1,2"), f)
      read_authorized_keys(f)
    }), re = "public_key")
  ),
  adv_group("write_authorized_keys",
    S(write_authorized_keys(X, tempfile()), "x", c("NULL", "list", "df", "num0")),
    E("a key that is not one", write_authorized_keys(data.frame(node = "a", public_key = "ed25519:AAAA"), tempfile()),
      class = "fedagg_error_key", client = "a")
  ),
  adv_group("fed_remote_nodes",
    S(fed_remote_nodes(X), "authorized_keys", c("NULL", "list", "num0", "df")),
    E("a node listed twice", local({
      k <- suppressMessages(fed_keygen(tempfile()))
      fed_remote_nodes(data.frame(node = c("a", "a"), public_key = k))
    }), re = "twice"),
    E("a node id that cannot go in a header", local({
      k <- suppressMessages(fed_keygen(tempfile()))
      fed_remote_nodes(data.frame(node = "a b", public_key = k))
    }), re = "node id")
  ),
  adv_group("net_limits",
    S(net_limits(rate = X), "rate", c("0", "-1", "NA", "chr", "Inf", "len2")),
    S(net_limits(max_connections = X), "max_connections", c("0.5", "1.5")),
    S(net_limits(header_timeout = X), "header_timeout", c("0", "NaN"))
  ),
  adv_group("fed_join",
    S(fed_join(fed_node(d$x, d$y, id = "a"), X, m_soft, key = "k", server_key = "ed25519:x"), "url",
      c("NULL", "NA_chr", "chr2", "1")),
    E("plain http to a host that is not loopback", local({
      k <- tempfile()
      p <- suppressMessages(fed_keygen(k))
      fed_join(fed_node(d$x, d$y, id = "a"), "http://10.0.0.1:1", m_soft, key = k, server_key = p)
    }), "url"),
    E("a server key that is not one", local({
      k <- tempfile()
      suppressMessages(fed_keygen(k))
      fed_join(fed_node(d$x, d$y, id = "a"), "http://127.0.0.1:1", m_soft, key = k, server_key = "ed25519:AAAA")
    }), "server_key"),
    E("one key for two nodes", local({
      k <- tempfile()
      p <- suppressMessages(fed_keygen(k))
      fed_join(list(fed_node(d$x, d$y, id = "a"), fed_node(d$x, d$y, id = "b")), "http://127.0.0.1:1", m_soft,
               key = k, server_key = p)
    }), "key"),
    S(fed_join(fed_node(d$x, d$y, id = "a"), "http://127.0.0.1:1", m_soft, key = "k", server_key = "p", backoff = X),
      "backoff", c("NULL", "-1", "chr", "1")),
    E("a node whose data do not fit the model", fed_join(fed_node(d$x, d$y, id = "a"), "http://127.0.0.1:1",
                                                       model_softmax(7, 3), key = "k", server_key = "p"),
      class = "fedagg_error_client", client = "a"),
    E("the server's view of a node", local({
      k <- suppressMessages(fed_keygen(tempfile()))
      fed_join(fed_remote_nodes(data.frame(node = "a", public_key = k)), "http://127.0.0.1:1", m_soft, key = "k",
               server_key = k)
    }), "nodes")
  ),
  adv_group("Server$serve",
    E("a server of local nodes", local({
      k <- tempfile()
      suppressMessages(fed_keygen(k))
      srv$listen(k)
    }), class = "fedagg_error_network"),
    S(local({
      k <- tempfile()
      p <- suppressMessages(fed_keygen(k))
      fed_server(m_soft, fed_remote_nodes(data.frame(node = "a", public_key = p)))$listen(k, port = X)
    }), "port", c("-1", "1.5", "chr", "NA")),
    E("plain HTTP on every interface", local({
      k <- tempfile()
      p <- suppressMessages(fed_keygen(k))
      fed_server(m_soft, fed_remote_nodes(data.frame(node = "a", public_key = p)))$listen(k, host = "0.0.0.0")
    }), re = "loopback"),
    E("a key that is not the server's private key", local({
      p <- suppressMessages(fed_keygen(tempfile()))
      fed_server(m_soft, fed_remote_nodes(data.frame(node = "a", public_key = p)))$serve(1, key = tempfile())
    }), "key"),
    S(local({
      k <- tempfile()
      p <- suppressMessages(fed_keygen(k))
      fed_server(m_soft, fed_remote_nodes(data.frame(node = "a", public_key = p)))$serve(X, key = k)
    }), "rounds", c("0", "-1", "1.5", "chr"))
  )
)

test_that("the networked federation's functions reject bad inputs with classed errors", {
  adv_expect_all(adv_cases_network, adv_run(adv_cases_network))
})

test_that("the adversarial table covers every export with enough cases", {
  all_cases <- c(adv_cases_aggregate, adv_cases_privacy, adv_cases_partition, adv_cases_model, adv_cases_data,
                 adv_cases_node, adv_cases_server, adv_cases_pipeline, adv_cases_trust, adv_cases_systems,
                 adv_cases_network)
  expect_gte(length(all_cases), 150L)
  called <- unique(unlist(lapply(all_cases, function(cs) all.names(cs$expr))))
  exports <- getNamespaceExports("fedagg")
  # Classes and functions reached through others: Server through fed_server(),
  # lr_constant() through lr_schedule names, predict() through its S3 method.
  # RemoteNode through fed_remote_nodes(), Launch through fed_launch(),
  # Dashboard through fed_dashboard().
  indirect <- c("Server", "lr_constant", "RemoteNode", "Launch", "Dashboard")
  expect_setequal(setdiff(exports, c(called, indirect)), character())
})

# --- Atomic rounds ---------------------------------------------------------------

test_that("a failed round leaves params, history, client log and rounds unchanged", {
  out <- adv_atomic_run()
  if (!is.null(out$dead)) fail(out$dead)
  expect_gte(length(out$results), 30L)
  for (i in seq_along(out$results)) {
    r <- out$results[[i]]
    sc <- out$spec[[out$which[i]]]
    problems <- adv_atomic_problems(sc, r)
    expect(length(problems) == 0L,
           sprintf("atomic round: %s\n  %s", r$name, paste(problems, collapse = "\n  ")))
  }
})
