# The check of the Kubernetes manifests: that the coordinator's pod runs
# the entry script as it expects (its variables, mounts, ports, probes and
# resources) and that the objects name each other correctly.

#' Check the Kubernetes manifests of a deployment
#'
#' @description
#' Reads the manifests of a fedagg deployment (those shipped in
#' `system.file("deploy", "k8s", package = "fedagg")`, or your edited copy)
#' and checks what Kubernetes itself cannot know:
#' * the coordinator is one replica, a Deployment with `strategy: Recreate`
#'   or a StatefulSet, without service links;
#' * its environment holds only variables [fed_serve_env()] reads;
#' * the liveness and startup probes ask `/healthz`, the readiness probe
#'   `/ready`, on the port the server listens on (`FEDAGG_PORT`), over
#'   HTTPS unless `FEDAGG_TLS` is `off`;
#' * CPU and memory requests and limits are set, a limit at least its
#'   request;
#' * the configuration file, the secrets directory and the checkpoint
#'   directory are mounted from the ConfigMap, the Secret and the
#'   PersistentVolumeClaim of the same directory (ReadWriteOnce);
#' * the Secret's keys are the files the entry script reads, and the
#'   ConfigMap's configuration is a valid [fed_config()];
#' * every Service selects the coordinator and targets its port.
#'
#' @param dir The directory of the manifests (one object per `.yaml` file).
#' @return A data frame of the objects read (`file`, `kind`, `name`),
#'   invisibly. A failed check is an error of class
#'   `fedagg_error_manifest` naming the file and the field.
#' @examples
#' fed_deploy_check(system.file("deploy", "k8s", package = "fedagg"))
#' @export
fed_deploy_check <- function(dir) {
  check_required_args()
  rlang::check_installed("yaml", "to read the manifests")
  if (!is.character(dir) || length(dir) != 1L || !dir.exists(dir)) {
    fedagg_abort("{.arg dir} must be a directory of manifests, not {obj_desc(dir)}.", class = "missing_file")
  }
  files <- sort(list.files(dir, pattern = "\\.ya?ml$", full.names = TRUE))
  docs <- lapply(files, function(f) {
    tryCatch(yaml::read_yaml(f), error = function(e) manifest_abort(f, "is not valid YAML.", parent = e))
  })
  kinds <- vapply(docs, function(d) as.character(d$kind %||% NA_character_), character(1))
  names <- vapply(docs, function(d) as.character(d$metadata$name %||% NA_character_), character(1))
  one <- function(kind, what) {
    at <- which(kinds %in% kind)
    if (length(at) != 1L) fedagg_abort("{.file {dir}} must hold one {what}, not {length(at)}.", class = "manifest")
    list(doc = docs[[at]], file = files[[at]])
  }
  coord <- one(c("Deployment", "StatefulSet"), "Deployment or StatefulSet of the coordinator")
  secret <- one("Secret", "Secret")
  config_map <- one("ConfigMap", "ConfigMap")
  pvc <- one("PersistentVolumeClaim", "PersistentVolumeClaim")
  check_coordinator(coord, secret, config_map, pvc)
  for (at in which(kinds == "Service")) check_service(list(doc = docs[[at]], file = files[[at]]), coord)
  invisible(data.frame(file = basename(files), kind = kinds, name = names, stringsAsFactors = FALSE))
}

manifest_abort <- function(file, message, ..., parent = NULL, .envir = parent.frame()) {
  where <- cli::format_inline("{.file {basename(file)}}")
  fedagg_abort(paste0(gsub("([{}])", "\\1\\1", where), ": ", message), class = "manifest", parent = parent, call = NULL,
               .envir = .envir)
}

check_coordinator <- function(coord, secret, config_map, pvc) {
  f <- coord$file
  d <- coord$doc
  spec <- d$spec
  if (!identical(as.numeric(spec$replicas %||% 1), 1)) {
    manifest_abort(f, "{.field spec.replicas} must be 1: the coordinator's state is the model (restart it, do not scale it).")
  }
  if (d$kind == "Deployment" && !identical(spec$strategy$type, "Recreate")) {
    manifest_abort(f, "{.field spec.strategy.type} must be {.val Recreate}: one writer on a ReadWriteOnce checkpoint.")
  }
  pod <- spec$template$spec
  if (!isFALSE(pod$enableServiceLinks)) {
    manifest_abort(f, "{.field enableServiceLinks} must be {.code false}: service links add FEDAGG_ variables the entry script refuses.")
  }
  container <- pod$containers[[1]]
  if (is.null(container)) manifest_abort(f, "has no container.")
  env <- vapply(container$env %||% list(), function(e) as.character(e$value %||% ""), character(1))
  names(env) <- vapply(container$env %||% list(), function(e) as.character(e$name), character(1))
  settings <- tryCatch(deploy_settings(env), fedagg_error_config = function(e) manifest_abort(f, "its environment is not the entry script's.", parent = e))
  port <- suppressWarnings(as.integer(settings$FEDAGG_PORT))
  if (!port %in% container_ports(container)) manifest_abort(f, "no {.field containerPort} is {.envvar FEDAGG_PORT} = {port}.")
  scheme <- if (identical(tolower(settings$FEDAGG_TLS), "off")) "HTTP" else "HTTPS"
  probes <- list(livenessProbe = "/healthz", readinessProbe = "/ready", startupProbe = "/healthz")
  for (probe in names(probes)) {
    p <- container[[probe]]
    if (is.null(p$httpGet)) manifest_abort(f, "{.field {probe}} must be an {.field httpGet} probe of {.val {probes[[probe]]}}.")
    if (!identical(p$httpGet$path, probes[[probe]])) {
      manifest_abort(f, "{.field {probe}.httpGet.path} must be {.val {probes[[probe]]}}, not {.val {p$httpGet$path %||% 'none'}}.")
    }
    if (!identical(container_port(container, p$httpGet$port), port)) manifest_abort(f, "{.field {probe}.httpGet.port} must be the server's port {port}.")
    if (!identical(toupper(p$httpGet$scheme %||% "HTTP"), scheme)) manifest_abort(f, "{.field {probe}.httpGet.scheme} must be {.val {scheme}}.")
  }
  res <- container$resources
  for (part in c("requests", "limits")) {
    for (what in c("cpu", "memory")) {
      v <- res[[part]][[what]]
      if (is.null(v) || is.na(k8s_quantity(v))) manifest_abort(f, "{.field resources.{part}.{what}} must be set to a quantity, not {.val {v %||% 'nothing'}}.")
    }
  }
  for (what in c("cpu", "memory")) {
    if (k8s_quantity(res$limits[[what]]) < k8s_quantity(res$requests[[what]])) {
      manifest_abort(f, "{.field resources.limits.{what}} is below its request.")
    }
  }
  mounts <- container$volumeMounts %||% list()
  volumes <- pod$volumes %||% list()
  mounted <- function(path, source, name) {
    for (m in mounts) {
      inside <- identical(path, m$mountPath) || startsWith(path, paste0(sub("/$", "", m$mountPath), "/"))
      if (!inside) next
      v <- Filter(function(v) identical(v$name, m$name), volumes)
      if (length(v) && identical(v[[1]][[source]][[switch(source, secret = "secretName", configMap = "name", persistentVolumeClaim = "claimName")]], name)) return(TRUE)
    }
    FALSE
  }
  if (!mounted(settings$FEDAGG_SECRETS_DIR, "secret", secret$doc$metadata$name)) {
    manifest_abort(f, "{.envvar FEDAGG_SECRETS_DIR} ({settings$FEDAGG_SECRETS_DIR}) is not mounted from the Secret {.val {secret$doc$metadata$name}}.")
  }
  if (!mounted(dirname(settings$FEDAGG_CONFIG), "configMap", config_map$doc$metadata$name)) {
    manifest_abort(f, "{.envvar FEDAGG_CONFIG}'s directory is not mounted from the ConfigMap {.val {config_map$doc$metadata$name}}.")
  }
  if (!mounted(settings$FEDAGG_CHECKPOINT_DIR, "persistentVolumeClaim", pvc$doc$metadata$name)) {
    manifest_abort(f, "{.envvar FEDAGG_CHECKPOINT_DIR} is not on the PersistentVolumeClaim {.val {pvc$doc$metadata$name}}.")
  }
  if (!identical(unlist(pvc$doc$spec$accessModes), "ReadWriteOnce")) {
    manifest_abort(pvc$file, "{.field spec.accessModes} must be {.val ReadWriteOnce}: the checkpoint has one writer.")
  }
  keys <- names(c(secret$doc$data, secret$doc$stringData))
  if (!all(deploy_secret_files %in% keys) || length(setdiff(keys, c(deploy_secret_files, deploy_optional_secret_files)))) {
    manifest_abort(secret$file, "its keys must be the files the entry script reads, {.file {deploy_secret_files}} (and optionally {.file {deploy_optional_secret_files}}), not {.val {keys}}.")
  }
  config_name <- basename(settings$FEDAGG_CONFIG)
  text <- config_map$doc$data[[config_name]]
  if (is.null(text)) manifest_abort(config_map$file, "has no {.field data.{config_name}} ({.envvar FEDAGG_CONFIG}).")
  tryCatch(fed_config(yaml::yaml.load(text)), fedagg_error = function(e) {
    manifest_abort(config_map$file, "{.field data.{config_name}} is not a valid configuration.", parent = e)
  })
  invisible(TRUE)
}

check_service <- function(service, coord) {
  f <- service$file
  labels <- coord$doc$spec$template$metadata$labels
  selector <- service$doc$spec$selector
  if (!length(selector) || !all(vapply(names(selector), function(k) identical(labels[[k]], selector[[k]]), logical(1)))) {
    manifest_abort(f, "{.field spec.selector} does not select the coordinator's pods.")
  }
  container <- coord$doc$spec$template$spec$containers[[1]]
  for (p in service$doc$spec$ports) {
    target <- p$targetPort %||% p$port
    if (is.na(container_port(container, target))) manifest_abort(f, "{.field targetPort} {.val {target}} is not a port of the coordinator.")
  }
}

# A container's ports, named by their names ("" for unnamed ones), and the
# number a probe's or Service's port (a number or a name) refers to (NA:
# none of them).
container_ports <- function(container) {
  ports <- container$ports %||% list()
  stats::setNames(vapply(ports, function(p) as.integer(p$containerPort %||% NA), integer(1)),
                  vapply(ports, function(p) as.character(p$name %||% ""), character(1)))
}

container_port <- function(container, port) {
  ports <- container_ports(container)
  at <- if (is.character(port)) match(port, names(ports)) else match(as.integer(port), ports)
  unname(ports[at])
}

# A Kubernetes quantity ("100m", "0.5", "128Mi", "1G") as a number (NA if
# it is not one).
k8s_quantity <- function(x) {
  x <- as.character(x)
  if (length(x) != 1L || is.na(x)) return(NA_real_)
  m <- regmatches(x, regexec("^([0-9]+(\\.[0-9]+)?)(m|k|M|G|T|Ki|Mi|Gi|Ti)?$", x))[[1]]
  if (!length(m)) return(NA_real_)
  unit <- c(m = 1e-3, k = 1e3, M = 1e6, G = 1e9, T = 1e12, Ki = 2^10, Mi = 2^20, Gi = 2^30, Ti = 2^40)
  as.numeric(m[2]) * if (nzchar(m[4])) unit[[m[4]]] else 1
}
