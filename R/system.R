#' Devices and networks of a simulated federation
#'
#' A system profile gives every node a device and a network link: its
#' compute `speed` (training samples per second), `download` and `upload`
#' bandwidth (bytes per second), `latency` (seconds added to every message)
#' and the probability that it drops out of a round it was selected for
#' (`dropout`). A [Server] whose nodes have profiles keeps a simulated
#' clock: a client's round time is download + compute + upload, from its
#' profile and the actual sizes of the messages, and a synchronous round
#' ends when the last client it keeps has sent its update (see `deadline`
#' and `over_select` in [fed_server()]).
#'
#' Each setting is one number (every node), one value per node (in node
#' order, or named by node id), or a seeded draw: `lognormal(median,
#' spread)` draws log-normal values with the given median, `spread` being
#' the ratio of the 90th to the 10th percentile (a 10x spread: the fastest
#' tenth of the devices are ten times as fast as the slowest tenth). A data
#' frame with a `node` column and any of the settings as columns (read from
#' a device trace, say) gives per-node values directly; settings it lacks
#' keep `system_profile()`'s defaults.
#'
#' @param speed Training samples processed per second (> 0).
#' @param download,upload Bandwidth in bytes per second (> 0).
#' @param latency Seconds added to each message (>= 0).
#' @param dropout Probability of dropping out of a round once selected, in
#'   \[0, 1).
#' @param seed Seed of the draws.
#' @return `system_profile()`: a `fed_system` object; `lognormal()`: a draw
#'   specification; `set_system()`: the nodes, invisibly (their `system`
#'   field is set); `system_table()`: a data frame with one row per node.
#' @seealso [fed_server()] (`deadline`, `over_select`), [compression]
#' @examples
#' nodes <- fed_nodes(matrix(rnorm(400), 100), rep(0:1, 50), partition_iid(100, 5, seed = 1))
#' profile <- system_profile(speed = lognormal(2000, spread = 10), upload = lognormal(1e5, 10),
#'                           dropout = 0.1, seed = 1)
#' profile
#' set_system(nodes, profile)
#' system_table(nodes)
#' @name system_profile
NULL

#' @rdname system_profile
#' @export
system_profile <- function(speed = 1000, download = 1e6, upload = 1e6, latency = 0.05, dropout = 0, seed = NULL) {
  settings <- list(speed = speed, download = download, upload = upload, latency = latency, dropout = dropout)
  for (name in names(settings)) check_system_setting(settings[[name]], name)
  if (!is.null(seed)) seed <- assert_count(seed)
  structure(list(settings = settings, seed = seed), class = "fed_system")
}

#' @rdname system_profile
#' @param median Median of the log-normal draws (> 0).
#' @param spread Ratio of the 90th to the 10th percentile (>= 1).
#' @export
lognormal <- function(median, spread = 10) {
  check_required_args()
  median <- assert_number(median, 0, lower_open = TRUE)
  spread <- assert_number(spread, 1)
  structure(list(median = median, spread = spread, sdlog = log(spread) / (2 * stats::qnorm(0.9))),
            class = "fed_draw")
}

#' @export
format.fed_draw <- function(x, ...) sprintf("lognormal(median %s, %sx spread)", format(x$median), format(x$spread))

#' @export
print.fed_draw <- function(x, ...) {
  cat(format(x), "\n", sep = "")
  invisible(x)
}

#' @export
format.fed_system <- function(x, ...) {
  show <- function(v) {
    if (inherits(v, "fed_draw")) format(v)
    else if (length(v) == 1L) format(v)
    else sprintf("per node (%s to %s)", format(min(v)), format(max(v)))
  }
  c("<fed_system> device and network profile",
    sprintf("  %-9s %s", c("speed", "download", "upload", "latency", "dropout"),
            c(paste(show(x$settings$speed), "samples/s"), paste(show(x$settings$download), "bytes/s"),
              paste(show(x$settings$upload), "bytes/s"), paste(show(x$settings$latency), "s"),
              show(x$settings$dropout))))
}

#' @export
print.fed_system <- function(x, ...) {
  cat(format(x), sep = "\n")
  invisible(x)
}

#' @rdname system_profile
#' @param nodes A list of [Node]s (as from [fed_nodes()]).
#' @param profile A `fed_system` from `system_profile()`, or a data frame
#'   with a `node` column and per-node settings.
#' @export
set_system <- function(nodes, profile) {
  check_required_args()
  nodes <- assert_node_list(nodes)
  ids <- vapply(nodes, function(n) n$id, character(1), USE.NAMES = FALSE)
  table <- resolve_system(profile, ids)
  for (k in seq_along(nodes)) nodes[[k]]$system <- as.list(table[k, -1L])
  invisible(nodes)
}

#' @rdname system_profile
#' @export
system_table <- function(nodes) {
  check_required_args()
  nodes <- assert_node_list(nodes)
  rows <- lapply(nodes, function(n) {
    s <- n$system
    if (is.null(s)) s <- list(speed = NA_real_, download = NA_real_, upload = NA_real_, latency = NA_real_,
                              dropout = NA_real_)
    new_frame(node = n$id, speed = s$speed, download = s$download, upload = s$upload, latency = s$latency,
              dropout = s$dropout)
  })
  do.call(rbind, unname(rows))
}

system_settings <- c("speed", "download", "upload", "latency", "dropout")

assert_node_list <- function(nodes, arg = rlang::caller_arg(nodes), call = rlang::caller_env()) {
  if (inherits(nodes, "Node")) nodes <- list(nodes)
  if (!is.list(nodes) || !length(nodes) || !all(vapply(nodes, inherits, logical(1), "Node"))) {
    fedagg_abort("{.arg {arg}} must be a list of nodes from {.fn fed_nodes}, not {obj_desc(nodes)}.", call = call)
  }
  nodes
}

# The checks of one setting, for a number, a vector or a draw.
check_system_setting <- function(value, name, call = rlang::caller_env()) {
  if (inherits(value, "fed_draw")) {
    if (name == "dropout") fedagg_abort("{.arg dropout} is a probability; give numbers, not a draw.", call = call)
    return(invisible())
  }
  ok <- is.numeric(value) && length(value) >= 1L && !anyNA(value) && all(is.finite(value)) && all(ok_value(value, name))
  if (!ok) {
    need <- switch(name, speed = , download = , upload = "positive finite numbers", latency = "finite numbers >= 0",
                   dropout = "probabilities in [0, 1)")
    fedagg_abort("{.arg {name}} must be {need} (or a {.fn lognormal} draw), not {obj_desc(value)}.", call = call)
  }
  invisible()
}

# One row per node (in `ids` order): `node` and the five settings.
resolve_system <- function(profile, ids, call = rlang::caller_env()) {
  if (is.data.frame(profile)) return(system_from_frame(profile, ids, call))
  if (!inherits(profile, "fed_system")) {
    fedagg_abort("{.arg profile} must be a {.fn system_profile} or a data frame with a {.field node} column, not {obj_desc(profile)}.",
                 call = call)
  }
  # A stream of its own: the same seed as a data generator's must not tie
  # the devices to the data (speed rising with data size, say).
  seed <- if (!is.null(profile$seed)) derive_seed(profile$seed, 0L, 14L)
  values <- with_seed(seed, lapply(system_settings, function(name) {
    v <- profile$settings[[name]]
    if (inherits(v, "fed_draw")) v$median * exp(v$sdlog * stats::rnorm(length(ids)))
    else per_node(v, ids, name, call = call)
  }))
  do.call(new_frame, c(list(node = ids), stats::setNames(values, system_settings)))
}

system_from_frame <- function(frame, ids, call) {
  if (!"node" %in% names(frame)) {
    fedagg_abort("A system data frame needs a {.field node} column with the node ids.", call = call)
  }
  node <- as.character(frame$node)
  unknown <- setdiff(node, ids)
  if (length(unknown)) {
    fedagg_abort("The system data frame names unknown node{?s} {.val {unknown}}.", class = "client",
                 client = unknown[1], call = call)
  }
  missing <- setdiff(ids, node)
  if (length(missing)) {
    fedagg_abort("The system data frame has no row for node{?s} {.val {missing}}.", class = "client",
                 client = missing[1], call = call)
  }
  if (anyDuplicated(node)) {
    fedagg_abort("The system data frame lists node {.val {node[anyDuplicated(node)]}} twice.", call = call)
  }
  extra <- setdiff(names(frame), c("node", system_settings))
  if (length(extra)) fedagg_abort("The system data frame has unknown column{?s} {.field {extra}}.", call = call)
  defaults <- formals(system_profile)
  rows <- match(ids, node)
  values <- lapply(system_settings, function(name) {
    v <- if (name %in% names(frame)) frame[[name]][rows] else eval(defaults[[name]])
    tryCatch(check_system_setting(v, name), fedagg_error = function(e) {
      bad <- if (is.numeric(v) && length(v) == length(ids)) which(!is.finite(v) | is.na(v) | !ok_value(v, name))[1]
      known <- !is.na(bad %||% NA)
      fedagg_abort(c("Column {.field {name}} of the system data frame is invalid{if (known) paste0(' for node ', ids[bad]) else ''}.",
                     x = conditionMessage(e)), class = if (known) "client" else "input",
                   client = if (known) ids[bad], call = call)
    })
    rep_len(as.double(v), length(ids))
  })
  do.call(new_frame, c(list(node = ids), stats::setNames(values, system_settings)))
}

ok_value <- function(v, name) {
  switch(name, speed = , download = , upload = v > 0, latency = v >= 0, dropout = v >= 0 & v < 1)
}

# A node's profile as it is stored: a list of the five settings, checked.
assert_node_system <- function(value, client, call = rlang::caller_env()) {
  if (is.null(value)) return(NULL)
  if (!is.list(value) || !setequal(names(value), system_settings) || anyDuplicated(names(value))) {
    fedagg_abort("{.field system} must be NULL or a list of {.field {system_settings}}, not {obj_desc(value)}.",
                 class = "client", client = client, call = call)
  }
  for (name in system_settings) {
    v <- value[[name]]
    if (!is.numeric(v) || length(v) != 1L || is.na(v) || !is.finite(v) || !ok_value(v, name)) {
      tryCatch(check_system_setting(v, name, call = call), fedagg_error = function(e) {
        fedagg_abort(c("Node {.val {client}}: invalid system setting {.field {name}}.", x = conditionMessage(e)),
                     class = "client", client = client, call = call)
      })
      fedagg_abort("Node {.val {client}}: {.field {name}} must be a single number.", class = "client", client = client,
                   call = call)
    }
  }
  lapply(value[system_settings], as.double)
}

#' Availability that persists over rounds
#'
#' A node's `availability` is by default a probability: it is reachable in
#' each round independently. `availability_markov()` makes it a two-state
#' Markov chain instead, as devices that stay on (charging, on Wi-Fi) or off
#' for a while: a reachable node stays reachable in the next round with
#' probability `1 - 1 / mean_on`, an unreachable one stays away with
#' probability `1 - 1 / mean_off`, so on and off spells last `mean_on` and
#' `mean_off` rounds on average (geometric durations). A server starts each
#' chain from its stationary share `mean_on / (mean_on + mean_off)` and
#' draws the transitions from its seed.
#'
#' @param mean_on,mean_off Mean lengths, in rounds, of on and off spells
#'   (>= 1).
#' @return A `fed_availability` object, for `fed_nodes(availability = )`,
#'   `fed_node()` or `node$availability <-`.
#' @examples
#' x <- matrix(rnorm(400), 100)
#' nodes <- fed_nodes(x, rep(0:1, 50), partition_iid(100, 5, seed = 1),
#'                    availability = availability_markov(mean_on = 4, mean_off = 2))
#' nodes[[1]]$availability
#' @export
availability_markov <- function(mean_on, mean_off) {
  check_required_args()
  mean_on <- assert_number(mean_on, 1)
  mean_off <- assert_number(mean_off, 1)
  structure(list(mean_on = mean_on, mean_off = mean_off, share = mean_on / (mean_on + mean_off)),
            class = "fed_availability")
}

#' @export
format.fed_availability <- function(x, ...) {
  sprintf("<fed_availability> Markov chain: on for %s rounds, off for %s on average (%s%% of rounds on)",
          format(x$mean_on), format(x$mean_off), format(signif(100 * x$share, 3)))
}

#' @export
print.fed_availability <- function(x, ...) {
  cat(format(x), "\n", sep = "")
  invisible(x)
}

assert_availability <- function(value, call = rlang::caller_env()) {
  if (inherits(value, "fed_availability")) return(value)
  assert_number(value, 0, 1, lower_open = TRUE, arg = "availability", call = call)
}
