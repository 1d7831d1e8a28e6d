# The deployment: the configuration file shared by simulation and network,
# the container's entry script, the Kubernetes manifests and the Dockerfile
# (no Docker daemon here: its shell is checked, not run).

deploy_dir <- function() system.file("deploy", package = "fedagg")

manifest <- function(name) yaml::read_yaml(file.path(deploy_dir(), "k8s", name))

# A copy of the manifests with `edit(doc)` applied to one of them.
edited_manifests <- function(file, edit) {
  dir <- withr::local_tempdir(.local_envir = parent.frame())
  file.copy(list.files(file.path(deploy_dir(), "k8s"), full.names = TRUE), dir)
  doc <- yaml::read_yaml(file.path(dir, file))
  yaml::write_yaml(edit(doc), file.path(dir, file))
  dir
}

env_of <- function(doc) {
  env <- doc$spec$template$spec$containers[[1]]$env
  stats::setNames(vapply(env, function(e) as.character(e$value), ""), vapply(env, function(e) e$name, ""))
}

https_get <- function(url, ca) {
  out <- suppressWarnings(system2("curl", c("-s", "-o", "-", "-w", "'\\n%{http_code}'", "--max-time", "5", "--cacert", shQuote(ca), url),
                                  stdout = TRUE, stderr = FALSE))
  status <- suppressWarnings(as.integer(utils::tail(out, 1)))
  list(status = if (length(status) && !is.na(status)) status else 0L, body = paste(utils::head(out, -1), collapse = "\n"))
}

# The files of the Secret, written for a federation of `ids` (keys made
# now, never committed), and the configuration of the ConfigMap.
deploy_files <- function(dir, ids, config_text = manifest("configmap.yaml")$data[["config.yaml"]]) {
  secrets <- file.path(dir, "secrets")
  dir.create(secrets, recursive = TRUE)
  dir.create(file.path(dir, "nodes"))
  pubs <- vapply(ids, function(id) suppressMessages(fed_keygen(file.path(dir, "nodes", paste0(id, ".key")))), "")
  write_authorized_keys(data.frame(node = ids, public_key = unname(pubs)), file.path(secrets, "authorized_keys.csv"))
  server_pub <- suppressMessages(fed_keygen(file.path(secrets, "server.key")))
  tls <- fed_tls_selfsigned(file.path(dir, "tls"))
  file.copy(tls$cert, file.path(secrets, "tls.crt"))
  file.copy(tls$key, file.path(secrets, "tls.key"))
  dir.create(file.path(dir, "config"))
  writeLines(config_text, file.path(dir, "config", "config.yaml"))
  list(secrets = secrets, ca = tls$ca, server_pub = server_pub, config = file.path(dir, "config", "config.yaml"),
       node_keys = file.path(dir, "nodes", paste0(ids, ".key")))
}

test_that("the shipped manifests pass the check, with the probes and resources asked for", {
  skip_if_not_installed("yaml")
  read <- fed_deploy_check(file.path(deploy_dir(), "k8s"))
  expect_setequal(read$kind, c("ConfigMap", "Deployment", "Job", "PersistentVolumeClaim", "Secret", "Service", "Service"))
  coord <- manifest("coordinator.yaml")
  expect_identical(coord$spec$replicas, 1L)
  expect_identical(coord$spec$strategy$type, "Recreate")
  c1 <- coord$spec$template$spec$containers[[1]]
  expect_identical(c1$livenessProbe$httpGet$path, "/healthz")
  expect_identical(c1$livenessProbe$initialDelaySeconds, 30L)
  expect_identical(c1$livenessProbe$periodSeconds, 10L)
  expect_identical(c1$readinessProbe$httpGet$path, "/ready")
  expect_identical(c1$readinessProbe$initialDelaySeconds, 10L)
  expect_identical(c1$readinessProbe$periodSeconds, 5L)
  expect_identical(c1$startupProbe$httpGet$path, "/healthz")
  expect_gte(c1$startupProbe$periodSeconds * c1$startupProbe$failureThreshold, 120)
  expect_identical(unlist(c1$resources), c(requests.cpu = "100m", requests.memory = "128Mi", limits.cpu = "500m", limits.memory = "512Mi"))
  expect_setequal(names(manifest("secret.yaml")$stringData), fedagg:::deploy_secret_files)
  expect_s3_class(fed_config(yaml::yaml.load(manifest("configmap.yaml")$data[["config.yaml"]])), "fed_config")
  expect_identical(fedagg:::k8s_quantity("128Mi"), 128 * 2^20)
  expect_identical(fedagg:::k8s_quantity("100m"), 0.1)
  expect_true(is.na(fedagg:::k8s_quantity("lots")))
})

test_that("a broken manifest is a classed error naming its file and field", {
  skip_if_not_installed("yaml")
  pod <- function(doc, f) {
    doc$spec$template$spec <- f(doc$spec$template$spec)
    doc
  }
  container <- function(doc, f) pod(doc, function(s) {
    s$containers[[1]] <- f(s$containers[[1]])
    s
  })
  cases <- list(
    list("coordinator.yaml", function(d) { d$spec$replicas <- 2L; d }, "replicas"),
    list("coordinator.yaml", function(d) { d$spec$strategy$type <- "RollingUpdate"; d }, "Recreate"),
    list("coordinator.yaml", function(d) container(d, function(c) { c$livenessProbe$httpGet$path <- "/health"; c }), "livenessProbe"),
    list("coordinator.yaml", function(d) container(d, function(c) { c$readinessProbe$httpGet$port <- 9999L; c }), "readinessProbe"),
    list("coordinator.yaml", function(d) container(d, function(c) { c$startupProbe$httpGet$scheme <- "HTTP"; c }), "scheme"),
    list("coordinator.yaml", function(d) container(d, function(c) { c$resources$limits$memory <- NULL; c }), "limits.memory"),
    list("coordinator.yaml", function(d) container(d, function(c) { c$resources$limits$cpu <- "50m"; c }), "below its request"),
    list("coordinator.yaml", function(d) container(d, function(c) { c$resources$requests$cpu <- "a lot"; c }), "requests.cpu"),
    list("coordinator.yaml", function(d) container(d, function(c) { c$env[[length(c$env) + 1]] <- list(name = "FEDAGG_PROT", value = "1"); c }), "environment"),
    list("coordinator.yaml", function(d) container(d, function(c) { c$ports[[1]]$containerPort <- 9443L; c }), "containerPort"),
    list("coordinator.yaml", function(d) container(d, function(c) { c$volumeMounts[[3]]$mountPath <- "/data"; c }), "FEDAGG_CHECKPOINT_DIR"),
    list("coordinator.yaml", function(d) pod(d, function(s) { s$enableServiceLinks <- NULL; s }), "enableServiceLinks"),
    list("secret.yaml", function(d) { names(d$stringData)[1] <- "server.pem"; d }, "keys"),
    list("secret.yaml", function(d) { d$stringData$viewer.csv <- "x"; d }, "keys"),
    list("configmap.yaml", function(d) { d$data[["config.yaml"]] <- "model: {type: transformer}"; d }, "configuration"),
    list("pvc.yaml", function(d) { d$spec$accessModes <- list("ReadWriteMany"); d }, "ReadWriteOnce"),
    list("service.yaml", function(d) { d$spec$selector$`app.kubernetes.io/component` <- "node"; d }, "selector"),
    list("service.yaml", function(d) { d$spec$ports[[1]]$targetPort <- "http"; d }, "targetPort")
  )
  for (case in cases) {
    dir <- edited_manifests(case[[1]], case[[2]])
    err <- expect_error(fed_deploy_check(dir), class = "fedagg_error_manifest", info = case[[3]])
    expect_match(conditionMessage(err), case[[1]], fixed = TRUE, info = case[[3]])
    expect_match(paste(conditionMessage(err), collapse = " "), case[[3]], fixed = TRUE, info = case[[3]])
  }
  expect_error(fed_deploy_check(tempfile()), class = "fedagg_error_missing_file")
  # The dashboards' keys are an optional key of the Secret.
  expect_no_error(fed_deploy_check(edited_manifests("secret.yaml", function(d) { d$stringData$viewers.csv <- "x"; d })))
})

test_that("the configuration is checked setting by setting, and builds the same server for simulation and network", {
  skip_if_not_installed("yaml")
  good <- list(rounds = 3, model = list(type = "softmax", n_features = 4, n_classes = 3),
               server = list(fraction = 0.5, lr = 0.1, seed = 2, algorithm = list(type = "fedprox", mu = 0.01),
                             server_optimizer = list(type = "server_adam", lr = 0.01)),
               serve = list(min_nodes = 2, limits = list(rate = 50)))
  config <- fed_config(good)
  expect_s3_class(config$server$algorithm, "fed_algorithm")
  expect_identical(config$serve$limits$rate, 50)
  expect_match(format(config)[1], "softmax")
  # A CNN, written as YAML, is the model_cnn() of the same layers.
  cnn_yaml <- "model:\n  type: cnn\n  input: [8, 8, 1]\n  n_classes: 3\n  layers:\n    - {type: conv, filters: 2, size: 3}\n    - {type: relu}\n    - {type: max_pool, size: 2}\n    - {type: dense, units: 4}\n    - {type: relu}\n    - {type: dropout, rate: 0.5}\n"
  cnn <- fed_config(yaml::yaml.load(cnn_yaml))$model
  expect_identical(cnn, model_cnn(c(8, 8, 1), list(conv(2, 3), relu(), max_pool(2), dense(4), relu(), dropout(0.5)), n_classes = 3))
  expect_error(fed_config(yaml::yaml.load(sub("type: relu}", "type: sigmoid}", cnn_yaml, fixed = TRUE))),
               class = "fedagg_error_config", regexp = "model.layers\\[2\\]")
  expect_error(fed_config(yaml::yaml.load(sub("size: 3", "size: 30", cnn_yaml, fixed = TRUE))), class = "fedagg_error_config")
  bad <- list(
    list(modifyList(good, list(model = list(type = "transformer"))), "model.type"),
    list(modifyList(good, list(model = list(n_classes = -1))), "model"),
    list(modifyList(good, list(rounds = 0)), "rounds"),
    list(modifyList(good, list(server = list(fractoin = 0.5))), "server.fractoin"),
    list(modifyList(good, list(server = list(algorithm = list(type = "system")))), "server.algorithm.type"),
    list(modifyList(good, list(server = list(algorithm = list(type = "fedprox", nu = 1)))), "server.algorithm.nu"),
    list(modifyList(good, list(server = list(fraction = 2))), "fraction"),
    list(modifyList(good, list(serve = list(port = 80))), "serve.port"),
    list(c(good, list(extra = 1)), "extra")
  )
  for (case in bad) {
    err <- expect_error(fed_config_server(case[[1]], fed_nodes(matrix(rnorm(80), 20), rep(0:2, length.out = 20), list(1:10, 11:20))),
                        class = "fedagg_error", info = case[[2]])
    expect_match(paste(conditionMessage(err), collapse = " "), case[[2]], fixed = TRUE, info = case[[2]])
  }
  expect_error(fed_config(tempfile(fileext = ".yaml")), class = "fedagg_error_missing_file")
  f <- withr::local_tempfile(fileext = ".yaml")
  writeLines("model: [unclosed", f)
  expect_error(fed_config(f), class = "fedagg_error_config")
  # The same file builds the simulation's server: the same rounds as fed_server() with those arguments.
  set.seed(5)
  x <- matrix(rnorm(400), 100, 4)
  y <- sample(0:2, 100, TRUE)
  nodes <- fed_nodes(x, y, partition_iid(100, 4, seed = 1))
  a <- fed_config_server(config, nodes)
  a$fit(3, verbose = FALSE)
  b <- fed_server(model_softmax(4, 3), nodes, fraction = 0.5, lr = 0.1, seed = 2, algorithm = fedprox(0.01),
                  server_optimizer = server_adam(lr = 0.01))
  b$fit(3, verbose = FALSE)
  expect_identical(a$params, b$params)
})

test_that("the entry script's environment is checked before anything starts", {
  skip_if_not_installed("yaml")
  dir <- withr::local_tempdir()
  files <- deploy_files(dir, c("site-a", "site-b"))
  env <- c(FEDAGG_CONFIG = files$config, FEDAGG_SECRETS_DIR = files$secrets, FEDAGG_HOST = "127.0.0.1",
           FEDAGG_PORT = "0", FEDAGG_CHECKPOINT_DIR = file.path(dir, "checkpoint"))
  plan <- fed_serve_env(env, dry_run = TRUE)
  expect_identical(plan$serve$rounds, 100L)
  expect_identical(plan$serve$min_nodes, 2L)
  expect_s3_class(plan$serve$tls, "fed_tls")
  expect_identical(fed_serve_env(c(env, FEDAGG_ROUNDS = "7"), dry_run = TRUE)$serve$rounds, 7L)
  # Dashboards' keys are optional: read when the Secret has them.
  expect_null(plan$serve$viewers)
  viewers <- file.path(files$secrets, "viewers.csv")
  write_authorized_keys(data.frame(node = "teacher", public_key = suppressMessages(fed_keygen(file.path(dir, "v.key")))), viewers)
  expect_identical(fed_serve_env(env, dry_run = TRUE)$serve$viewers, viewers)
  unlink(viewers)
  # Build variables are ignored; others are refused, with the nearest name.
  expect_silent(fed_serve_env(c(env, FEDAGG_CARGO_TARGET_DIR = "/tmp/x"), dry_run = TRUE))
  err <- expect_error(fed_serve_env(c(env, FEDAGG_PROT = "8443"), dry_run = TRUE), class = "fedagg_error_config")
  expect_match(conditionMessage(err), "FEDAGG_PORT", fixed = TRUE)
  expect_error(fed_serve_env(c(env, FEDAGG_PORT = "http"), dry_run = TRUE), class = "fedagg_error_config")
  expect_error(fed_serve_env(c(env, FEDAGG_TLS = "maybe"), dry_run = TRUE), class = "fedagg_error_config")
  expect_error(fed_serve_env(c(env, FEDAGG_ROUNDS = "-1"), dry_run = TRUE), class = "fedagg_error_config")
  expect_error(fed_serve_env(c(env, FEDAGG_HTTP_THREADS = "0"), dry_run = TRUE), class = "fedagg_error_config")
  expect_error(fed_serve_env(c(env, FEDAGG_CONFIG = file.path(dir, "none.yaml")), dry_run = TRUE), class = "fedagg_error_missing_file")
  # Each file of the Secret is needed (the TLS pair only with TLS on).
  for (f in fedagg:::deploy_secret_files) {
    moved <- file.path(dir, "moved")
    file.rename(file.path(files$secrets, f), moved)
    err <- expect_error(fed_serve_env(env, dry_run = TRUE), class = "fedagg_error_missing_file", info = f)
    expect_match(paste(conditionMessage(err), collapse = " "), f, fixed = TRUE)
    if (f %in% c("tls.crt", "tls.key")) expect_no_error(fed_serve_env(c(env, FEDAGG_TLS = "off"), dry_run = TRUE))
    file.rename(moved, file.path(files$secrets, f))
  }
  # A port in use: refused at once, by name.
  port <- free_port()
  holder <- serverSocket(port)
  withr::defer(close(holder))
  # (Were the port free, the server would give up waiting for nodes after 2 s.)
  writeLines(c(readLines(files$config), "  wait_timeout: 2"), files$config)
  err <- expect_error(fed_serve_env(c(env, FEDAGG_PORT = as.character(port), FEDAGG_VERBOSE = "false")),
                      class = "fedagg_error_port_in_use")
  expect_match(conditionMessage(err), as.character(port), fixed = TRUE)
})

test_that("the entry script serves the manifest's probes on loopback and runs the federation as the simulation does", {
  skip_if_not_installed("yaml")
  skip_if_not_installed("processx")
  skip_if(!nzchar(Sys.which("curl")), "no curl to ask the HTTPS probes")
  skip_on_cran()
  dir <- withr::local_tempdir()
  ids <- c("site-a", "site-b", "site-c")
  config_text <- c("rounds: 3", "model: {type: softmax, n_features: 5, n_classes: 3}",
                   "server: {fraction: 0.7, lr: 0.2, seed: 9, algorithm: {type: scaffold}}",
                   "serve: {min_nodes: 3, round_timeout: 60}")
  files <- deploy_files(dir, ids, config_text)
  coord <- manifest("coordinator.yaml")
  port <- free_port()
  # The manifest's own environment, with the paths and address of this test.
  env <- env_of(coord)
  env[c("FEDAGG_CONFIG", "FEDAGG_SECRETS_DIR", "FEDAGG_CHECKPOINT_DIR", "FEDAGG_HOST", "FEDAGG_PORT")] <-
    c(files$config, files$secrets, file.path(dir, "checkpoint"), "127.0.0.1", as.character(port))
  script <- file.path(deploy_dir(), "server.R")
  server <- processx::process$new(file.path(R.home("bin"), "Rscript"), script, env = c("current", env),
                                  stdout = file.path(dir, "server.out"), stderr = "2>&1", supervise = TRUE)
  withr::defer(if (server$is_alive()) server$kill())
  url <- sprintf("https://127.0.0.1:%d", port)
  wait_for(function() https_get(paste0(url, "/healthz"), files$ca)$status == 200L || !server$is_alive(), 60, "the server's /healthz")
  expect_true(server$is_alive(), info = paste(readLines(file.path(dir, "server.out")), collapse = "\n"))
  c1 <- coord$spec$template$spec$containers[[1]]
  for (probe in c("livenessProbe", "readinessProbe", "startupProbe")) {
    expect_identical(c1[[probe]]$httpGet$port, as.integer(coord$spec$template$spec$containers[[1]]$ports[[1]]$containerPort))
    got <- https_get(paste0(url, c1[[probe]]$httpGet$path), files$ca)
    expect_identical(got$status, 200L, info = probe)
  }
  metrics <- https_get(paste0(url, "/metrics"), files$ca)
  expect_identical(metrics$status, 200L)
  expect_match(metrics$body, "fedagg_", fixed = TRUE)
  # Three sites join; the federation runs its three rounds and ends.
  set.seed(21)
  x <- matrix(rnorm(300 * 5), 300, 5)
  y <- sample(0:2, 300, TRUE)
  nodes <- stats::setNames(lapply(seq_along(ids), function(k) {
    rows <- (k - 1) * 100 + 1:100
    fed_node(x[rows, ], y[rows], id = ids[k])
  }), ids)
  config <- fed_config(files$config)
  procs <- lapply(seq_along(ids), function(k) {
    callr::r_bg(function(node, url, model, key, pub, ca) {
      library(fedagg)
      fed_join(node, url, model, key = key, server_key = pub, ca = ca, poll = 1, timeout = 30, backoff = c(0.1, 1))
    }, args = list(node = nodes[[k]], url = url, model = config$model, key = files$node_keys[k], pub = files$server_pub,
                   ca = files$ca), supervise = TRUE)
  })
  withr::defer(for (p in procs) if (p$is_alive()) p$kill())
  server$wait(120000)
  expect_identical(server$get_exit_status(), 0L, info = paste(readLines(file.path(dir, "server.out")), collapse = "\n"))
  # Its checkpoint holds the run: identical to the simulation of the same file.
  file <- file.path(dir, "checkpoint", "server.rds")
  payload <- unserialize(readBin(file, "raw", file.size(file)))
  sim <- fed_config_server(config, nodes)
  sim$fit(3, verbose = FALSE)
  expect_identical(payload$state$round, 3L)
  expect_identical(payload$state$flat, sim$.__enclos_env__$private$.state$flat)
})

test_that("the Dockerfile's shell parses and its image carries what the package imports", {
  lines <- readLines(file.path(deploy_dir(), "Dockerfile"))
  lines <- lines[!grepl("^\\s*#", lines)]
  # Instructions, with their continuation lines joined.
  joined <- character()
  buffer <- ""
  for (line in lines) {
    buffer <- paste(buffer, sub("\\\\\\s*$", "", line))
    if (!grepl("\\\\\\s*$", line)) {
      joined <- c(joined, trimws(buffer))
      buffer <- ""
    }
  }
  runs <- sub("^RUN\\s+", "", joined[startsWith(joined, "RUN ")])
  expect_gte(length(runs), 4L)
  for (cmd in runs) {
    status <- system2("sh", c("-n", "-c", shQuote(cmd)), stdout = FALSE, stderr = FALSE)
    expect_identical(status, 0L, info = cmd)
  }
  expect_identical(system2("sh", c("-n", "-c", shQuote("if then")), stdout = FALSE, stderr = FALSE) == 0L, FALSE)
  # The runtime stage installs every non-base import from Debian.
  stages <- split(joined, cumsum(startsWith(joined, "FROM ")))
  runtime <- paste(stages[[length(stages)]], collapse = "\n")
  imports <- trimws(strsplit(utils::packageDescription("fedagg")$Imports, ",")[[1]])
  imports <- setdiff(sub("\\s*\\(.*", "", imports), rownames(utils::installed.packages(priority = "base")))
  for (pkg in c(imports, "yaml")) expect_match(runtime, paste0("r-cran-", tolower(pkg)), fixed = TRUE, info = pkg)
  expect_match(runtime, "USER 10001", fixed = TRUE)
  entry <- regmatches(runtime, regexpr("/usr/local/lib/R/site-library/fedagg/deploy/server.R", runtime, fixed = TRUE))
  expect_length(entry, 1L)
  expect_true(file.exists(file.path(deploy_dir(), "server.R")))
  expect_match(runtime, sprintf("EXPOSE %s", fedagg:::deploy_env_defaults[["FEDAGG_PORT"]]), fixed = TRUE)
  expect_match(runtime, 'VOLUME ["/var/lib/fedagg"]', fixed = TRUE)
})
