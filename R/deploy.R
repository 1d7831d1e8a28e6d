# Deployment: one configuration for the simulation and the real federation
# (a YAML file), and the server configured by that file and environment
# variables, as the container's entry script runs it (inst/deploy/server.R).

# The environment variables of the entry script, with their defaults (the
# paths of the container image and its Kubernetes manifests).
deploy_env_defaults <- c(
  FEDAGG_CONFIG = "/etc/fedagg/config/config.yaml",
  FEDAGG_SECRETS_DIR = "/etc/fedagg/secrets",
  FEDAGG_HOST = "0.0.0.0",
  FEDAGG_PORT = "8443",
  FEDAGG_CHECKPOINT_DIR = "/var/lib/fedagg/checkpoint",
  FEDAGG_TLS = "on",
  FEDAGG_ROUNDS = "",
  FEDAGG_LOG_FILE = "",
  FEDAGG_HTTP_THREADS = "2",
  FEDAGG_VERBOSE = "true"
)

# FEDAGG_ variables that belong to the build and the benchmarks, not to a
# server: a server started where they are set ignores them.
deploy_env_ignored <- c("FEDAGG_CARGO_TARGET_DIR", "FEDAGG_BENCH_PYTHON", "FEDAGG_BENCH_MODELS")

# The files of the secrets directory (the Kubernetes Secret's keys).
deploy_secret_files <- c(server_key = "server.key", authorized_keys = "authorized_keys.csv",
                         tls_cert = "tls.crt", tls_key = "tls.key")
# Optional ones: the dashboards' keys (see fed_dashboard()).
deploy_optional_secret_files <- c(viewers = "viewers.csv")

# Constructors a configuration may name as `type:` (a lever is written as a
# mapping, `{type: fedprox, mu: 0.01}`), by their prefixes.
config_constructors <- "^(fedavg|fedsgd|fedprox|scaffold|fednova|server_(sgd|adam|yogi|adagrad)|agg_[a-z_]+|select_[a-z_]+|dp_(central|local)|clip_(norm|adaptive)|filter_norm|compress_[a-z0-9_]+|lr_[a-z]+|local_[a-z]+|early_stopping)$"

config_models <- c(linear = "model_linear", logistic = "model_logistic", softmax = "model_softmax", mlp = "model_mlp",
                   cnn = "model_cnn")
# A CNN's layers in a configuration: `{type: conv, filters: 6, size: 5}`.
config_layers <- c("conv", "relu", "max_pool", "avg_pool", "dropout", "flatten", "dense")

#' One configuration for a simulation and a real federation
#'
#' @description
#' `fed_config()` reads a federation's settings from a YAML file (or a
#' list of the same shape): the model, the arguments of [fed_server()] and
#' of [Server]`$serve()`, and the number of rounds. `fed_config_server()`
#' builds the server of a configuration for any nodes: the nodes of a
#' simulation ([fed_nodes()]) on a laptop, or remote nodes
#' ([fed_remote_nodes()]) for the same federation over the network, where
#' the container's entry script (see [fed_serve_env()]) builds it the same
#' way.
#'
#' The file's shape:
#'
#' ```yaml
#' rounds: 50
#' model:                 # model_<type>() and its arguments
#'   type: softmax
#'   n_features: 60
#'   n_classes: 10
#'   # or a CNN:
#'   # type: cnn
#'   # input: [28, 28, 1]
#'   # layers: [{type: conv, filters: 6, size: 5}, {type: relu}, {type: max_pool, size: 2},
#'   #          {type: dense, units: 84}, {type: relu}]
#'   # n_classes: 10
#' server:                # arguments of fed_server()
#'   fraction: 0.5
#'   lr: 0.05
#'   seed: 1
#'   algorithm: {type: fedprox, mu: 0.01}
#'   server_optimizer: {type: server_adam, lr: 0.01}
#' serve:                 # arguments of $serve()
#'   min_nodes: 2
#'   round_timeout: 300
#' ```
#'
#' A lever is a mapping whose `type` names its constructor (`fedprox`,
#' `server_adam`, `agg_trimmed_mean`, `select_power_of_choice`,
#' `dp_central`, `compress_topk`, `lr_cosine`, `local_adam`, ...) and whose
#' other entries are that constructor's arguments. Functions (hooks, custom
#' rules) cannot be written in a file: use [fed_server()] in R for those.
#'
#' @param x A YAML file, or a list of the same shape.
#' @return `fed_config()`: a `fed_config` object (its `model` is the model
#'   object). `fed_config_server()`: a [Server].
#' @examples
#' file <- tempfile(fileext = ".yaml")
#' writeLines(c("rounds: 3", "model: {type: softmax, n_features: 4, n_classes: 3}",
#'              "server: {fraction: 0.5, lr: 0.1, seed: 1, algorithm: {type: fedprox, mu: 0.01}}"), file)
#' config <- fed_config(file)
#' config
#' set.seed(1)
#' x <- matrix(rnorm(400), 100, 4)
#' y <- sample(0:2, 100, TRUE)
#' server <- fed_config_server(config, fed_nodes(x, y, partition_iid(100, 4, seed = 1)))
#' server$fit(config$rounds, verbose = FALSE)
#' @export
fed_config <- function(x) {
  check_required_args()
  source <- if (is.character(x)) x else "the configuration"
  if (is.character(x)) {
    if (length(x) != 1L || is.na(x)) fedagg_abort("{.arg x} must be one file name or a list, not {obj_desc(x)}.", class = "config")
    if (!file.exists(x)) fedagg_abort("The configuration file {.file {x}} does not exist.", class = "missing_file")
    rlang::check_installed("yaml", "to read a configuration file")
    x <- tryCatch(yaml::read_yaml(x), error = function(e) {
      fedagg_abort("The configuration file {.file {source}} is not valid YAML.", class = "config", parent = e)
    })
  }
  if (!is.list(x) || (length(x) && is.null(names(x)))) fedagg_abort("{.arg x} must be a mapping (a named list), not {obj_desc(x)}.", class = "config")
  unknown <- setdiff(names(x), c("rounds", "model", "server", "serve"))
  if (length(unknown)) {
    config_abort("{.field {unknown[1]}} is not a setting; a configuration has {.field rounds}, {.field model}, {.field server} and {.field serve}.", source)
  }
  rounds <- if (!is.null(x[["rounds"]])) config_value(x[["rounds"]], function(v) assert_count(v, min = 1L, arg = "rounds"), "rounds", source)
  if (!is.list(x[["model"]]) || is.null(x[["model"]][["type"]])) {
    config_abort("{.field model} must be a mapping with a {.field type} ({.or {names(config_models)}}).", source)
  }
  model_type <- x[["model"]][["type"]]
  if (!is.character(model_type) || length(model_type) != 1L || !model_type %in% names(config_models)) {
    config_abort("{.field model.type} must be one of {.or {.val {names(config_models)}}}, not {obj_desc(model_type)}.", source)
  }
  model_args <- x[["model"]][names(x[["model"]]) != "type"]
  if (model_type == "cnn") {
    layers <- model_args[["layers"]]
    if (!is.list(layers) || !length(layers)) config_abort("{.field model.layers} must be a list of layers, such as {.code {{type: conv, filters: 6, size: 5}}}.", source)
    model_args$layers <- lapply(seq_along(layers), function(i) {
      l <- layers[[i]]
      name <- sprintf("model.layers[%d]", i)
      if (!is.list(l) || !is.character(l[["type"]]) || length(l[["type"]]) != 1L || !l[["type"]] %in% config_layers) {
        config_abort("{.field {name}} must be a mapping whose {.field type} is one of {.or {.val {config_layers}}}.", source)
      }
      config_call(l[["type"]], l[names(l) != "type"], name, source)
    })
    if (!is.null(model_args$input)) model_args$input <- unlist(model_args$input)
  }
  model <- config_call(config_models[[model_type]], model_args, "model", source)
  server <- x[["server"]] %||% list()
  if (!is.list(server) || (length(server) && is.null(names(server)))) config_abort("{.field server} must be a mapping of {.fn fed_server} arguments.", source)
  allowed <- setdiff(names(formals(fed_server)), c("model", "nodes"))
  bad <- setdiff(names(server), allowed)
  if (length(bad)) config_abort("{.field server.{bad[1]}} is not an argument of {.fn fed_server}.", source)
  server <- Map(function(value, name) config_lever(value, paste0("server.", name), source), server, names(server))
  serve <- x[["serve"]] %||% list()
  serve_allowed <- c("min_nodes", "round_timeout", "wait_timeout", "linger", "limits")
  bad <- setdiff(names(serve), serve_allowed)
  if (length(bad)) config_abort("{.field serve.{bad[1]}} is not a setting of {.code $serve()}; use {.or {.field {serve_allowed}}}.", source)
  if (!is.null(serve[["limits"]])) serve[["limits"]] <- config_call("net_limits", serve[["limits"]], "serve.limits", source)
  structure(list(rounds = rounds, model = model, model_spec = x[["model"]], server = server, serve = serve, source = source),
            class = "fed_config")
}

#' @rdname fed_config
#' @param config A `fed_config` (or what [fed_config()] accepts).
#' @param nodes The federation's nodes: from [fed_nodes()] for a
#'   simulation, from [fed_remote_nodes()] for a real federation.
#' @export
fed_config_server <- function(config, nodes) {
  check_required_args()
  if (!inherits(config, "fed_config")) config <- fed_config(config)
  do.call(fed_server, c(list(model = config$model, nodes = nodes), config$server))
}

#' @export
format.fed_config <- function(x, ...) {
  lever <- function(v) {
    if (inherits(v, "fed_part") || is.list(v) && !is.null(v$label)) return(v$label %||% class(v)[1])
    if (is.list(v)) return(class(v)[1])
    paste(format(v), collapse = ", ")
  }
  c(sprintf("<fed_config> %s%s", model_description(x$model), if (!is.null(x[["rounds"]])) sprintf(", %d rounds", x[["rounds"]]) else ""),
    if (length(x$server)) sprintf("  server: %s", paste(sprintf("%s = %s", names(x$server), vapply(x$server, lever, "")), collapse = "; ")),
    if (length(x$serve)) sprintf("  serve: %s", paste(sprintf("%s = %s", names(x$serve), vapply(x$serve, lever, "")), collapse = "; ")))
}

#' @export
print.fed_config <- function(x, ...) {
  cat(format(x), sep = "\n")
  invisible(x)
}

config_abort <- function(message, source, ..., parent = NULL, call = rlang::caller_env()) {
  fedagg_abort(c(message, i = "In {source}."), class = "config", parent = parent, call = call, .envir = parent.frame())
}

# A value checked by `check`; its error names the setting.
config_value <- function(value, check, name, source) {
  tryCatch(check(value), fedagg_error = function(e) config_abort("{.field {name}} is not valid.", source, parent = e))
}

# A call of fedagg's `fun` with the settings `args` (a mapping), its error
# naming the setting.
config_call <- function(fun, args, name, source) {
  if (!is.list(args) || (length(args) && is.null(names(args)))) {
    config_abort("{.field {name}} must be a mapping of the arguments of {.fn {fun}}.", source)
  }
  f <- get(fun, envir = asNamespace("fedagg"))
  bad <- setdiff(names(args), names(formals(f)))
  if (length(bad) && !"..." %in% names(formals(f))) config_abort("{.field {name}.{bad[1]}} is not an argument of {.fn {fun}}.", source)
  tryCatch(do.call(f, args), error = function(e) config_abort("{.field {name}}: {.fn {fun}} refused these settings.", source, parent = e))
}

# A setting as written (a number, a string, a list of numbers) or a lever
# (a mapping with a `type`, made by its constructor).
config_lever <- function(value, name, source) {
  if (!is.list(value) || is.null(value[["type"]])) return(value)
  type <- value[["type"]]
  if (!is.character(type) || length(type) != 1L || !grepl(config_constructors, type) ||
      !exists(type, envir = asNamespace("fedagg"), inherits = FALSE) || !type %in% getNamespaceExports("fedagg")) {
    config_abort("{.field {name}.type} must name one of fedagg's lever constructors (such as {.val fedprox} or {.val server_adam}), not {obj_desc(type)}.",
                 source)
  }
  config_call(type, value[names(value) != "type"], name, source)
}

#' Serve a federation configured by environment variables
#'
#' @description
#' The container's entry point (`inst/deploy/server.R` runs it): reads the
#' configuration file and the secrets directory named by environment
#' variables, builds the server with [fed_config_server()] over the nodes
#' of `authorized_keys.csv`, and serves it with a checkpoint, so that a
#' restarted container resumes where it stopped. `GET /healthz` answers as
#' soon as the server listens, `GET /ready` once the checkpoint is loaded
#' and rounds can run, `GET /metrics` in Prometheus' text format (see
#' `inst/deploy/README.md`).
#'
#' The variables, with their defaults:
#' * `FEDAGG_CONFIG` (`/etc/fedagg/config/config.yaml`): the [fed_config()] file.
#' * `FEDAGG_SECRETS_DIR` (`/etc/fedagg/secrets`): `server.key` (from
#'   [fed_keygen()]), `authorized_keys.csv` (see [write_authorized_keys()]),
#'   and the TLS pair `tls.crt` and `tls.key`; optionally `viewers.csv`,
#'   the keys of remote [fed_dashboard()]s (the `viewers` of `$serve()`).
#' * `FEDAGG_HOST` (`0.0.0.0`), `FEDAGG_PORT` (`8443`).
#' * `FEDAGG_CHECKPOINT_DIR` (`/var/lib/fedagg/checkpoint`).
#' * `FEDAGG_TLS` (`on`): `off` serves plain HTTP, on a loopback address only.
#' * `FEDAGG_ROUNDS`: overrides the file's `rounds`.
#' * `FEDAGG_LOG_FILE`: JSON lines of every request (none by default).
#' * `FEDAGG_HTTP_THREADS` (`2`), `FEDAGG_VERBOSE` (`true`).
#'
#' Any other `FEDAGG_` variable is an error (a misspelt one would otherwise
#' be ignored), as are missing files and a port already in use.
#'
#' @param env The variables, as a named character vector (default: this
#'   process's environment).
#' @param dry_run `TRUE` to check everything and build the server without
#'   serving.
#' @return The [fed_history] of the run, invisibly; with `dry_run`, the
#'   server and its settings.
#' @examples
#' dir <- tempfile("fedagg-deploy")
#' dir.create(file.path(dir, "secrets"), recursive = TRUE)
#' keys <- vapply(c("site-a", "site-b"), function(id) {
#'   fed_keygen(file.path(dir, paste0(id, ".key")))
#' }, character(1))
#' write_authorized_keys(data.frame(node = names(keys), public_key = keys),
#'                       file.path(dir, "secrets", "authorized_keys.csv"))
#' fed_keygen(file.path(dir, "secrets", "server.key"))
#' writeLines(c("rounds: 5", "model: {type: softmax, n_features: 4, n_classes: 3}"),
#'            file.path(dir, "config.yaml"))
#' plan <- fed_serve_env(c(FEDAGG_CONFIG = file.path(dir, "config.yaml"),
#'                         FEDAGG_SECRETS_DIR = file.path(dir, "secrets"),
#'                         FEDAGG_HOST = "127.0.0.1", FEDAGG_TLS = "off",
#'                         FEDAGG_CHECKPOINT_DIR = file.path(dir, "checkpoint")),
#'                       dry_run = TRUE)
#' plan$settings
#' @export
fed_serve_env <- function(env = Sys.getenv(), dry_run = FALSE) {
  settings <- deploy_settings(env)
  config <- fed_config(settings$FEDAGG_CONFIG)
  rounds <- if (nzchar(settings$FEDAGG_ROUNDS)) {
    config_value(suppressWarnings(as.numeric(settings$FEDAGG_ROUNDS)), function(v) assert_count(v, min = 1L, arg = "FEDAGG_ROUNDS"),
                 "FEDAGG_ROUNDS", "the environment")
  } else config$rounds
  if (is.null(rounds)) {
    fedagg_abort("The number of rounds is missing: give {.field rounds} in {.file {settings$FEDAGG_CONFIG}} or {.envvar FEDAGG_ROUNDS}.",
                 class = "config")
  }
  port <- suppressWarnings(as.numeric(settings$FEDAGG_PORT))
  if (is.na(port) || port != round(port) || port < 0 || port > 65535) {
    fedagg_abort("{.envvar FEDAGG_PORT} must be a port number from 0 to 65535, not {.val {settings$FEDAGG_PORT}}.", class = "config")
  }
  tls_on <- deploy_flag(settings, "FEDAGG_TLS", c("on", "off"))
  verbose <- deploy_flag(settings, "FEDAGG_VERBOSE", c("true", "false"))
  threads <- suppressWarnings(as.numeric(settings$FEDAGG_HTTP_THREADS))
  if (is.na(threads) || threads < 1 || threads > 64 || threads != round(threads)) {
    fedagg_abort("{.envvar FEDAGG_HTTP_THREADS} must be a whole number from 1 to 64, not {.val {settings$FEDAGG_HTTP_THREADS}}.", class = "config")
  }
  files <- file.path(settings$FEDAGG_SECRETS_DIR, deploy_secret_files)
  names(files) <- names(deploy_secret_files)
  needed <- if (tls_on) files else files[c("server_key", "authorized_keys")]
  missing <- needed[!file.exists(needed)]
  if (length(missing)) {
    fedagg_abort(c("The secrets directory {.file {settings$FEDAGG_SECRETS_DIR}} lacks {.file {basename(missing)}}.",
                   i = "It must hold {.file {basename(needed)}} (the Secret's keys; see {.file inst/deploy/README.md})."),
                 class = "missing_file")
  }
  nodes <- fed_remote_nodes(files[["authorized_keys"]])
  server <- fed_config_server(config, nodes)
  tls <- if (tls_on) fed_tls(files[["tls_cert"]], files[["tls_key"]])
  serve_args <- c(list(rounds = rounds, key = files[["server_key"]], port = as.integer(port), host = settings$FEDAGG_HOST,
                       tls = tls, checkpoint = settings$FEDAGG_CHECKPOINT_DIR,
                       log_file = if (nzchar(settings$FEDAGG_LOG_FILE)) settings$FEDAGG_LOG_FILE,
                       threads = as.integer(threads), verbose = verbose),
                  config$serve)
  viewers <- file.path(settings$FEDAGG_SECRETS_DIR, deploy_optional_secret_files[["viewers"]])
  if (file.exists(viewers)) serve_args$viewers <- viewers
  if (isTRUE(dry_run)) return(list(server = server, serve = serve_args, settings = settings))
  history <- do.call(server$serve, serve_args)
  invisible(history)
}

# The entry script's variables: the defaults, overridden by `env`; an
# unknown FEDAGG_ variable is an error that names the nearest known one.
deploy_settings <- function(env) {
  if (!is.character(env) || (length(env) && is.null(names(env)))) {
    fedagg_abort("{.arg env} must be a named character vector, as {.fn Sys.getenv} gives, not {obj_desc(env)}.", class = "config")
  }
  ours <- names(env)[startsWith(names(env), "FEDAGG_")]
  unknown <- setdiff(ours, c(names(deploy_env_defaults), deploy_env_ignored))
  if (length(unknown)) {
    nearest <- names(deploy_env_defaults)[apply(utils::adist(unknown, names(deploy_env_defaults)), 1, which.min)]
    fedagg_abort(c("Unknown environment variable{?s} {.envvar {unknown}}.",
                   i = "Did you mean {.envvar {nearest}}? The server reads {.envvar {names(deploy_env_defaults)}}."),
                 class = "config")
  }
  settings <- as.list(deploy_env_defaults)
  given <- intersect(ours, names(deploy_env_defaults))
  # The last of repeated names wins, as when a later setting overrides one.
  last <- !duplicated(names(env), fromLast = TRUE)
  settings[given] <- as.list(unname(env[last][given]))
  settings
}

deploy_flag <- function(settings, name, values) {
  value <- tolower(settings[[name]])
  if (!value %in% values) fedagg_abort("{.envvar {name}} must be {.or {.val {values}}}, not {.val {settings[[name]]}}.", class = "config")
  value == values[1]
}
