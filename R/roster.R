# What a server reads from every node in a round (training size,
# availability, held-out data, data version), kept as plain vectors so that
# a round costs O(selected clients) in R, not one R6 call per node.
#
# A node says when these change (`set_data()`, `availability<-`) by bumping
# a counter shared by the session; a server rebuilds its roster when the
# counter moved. The key also carries a session token, so that a server
# saved with `saveRDS()` rebuilds its roster in the next session.

node_changes <- new.env(parent = emptyenv())
node_changes$count <- 0
node_changes$servers <- 0

# A key naming one server for the state it leaves on its nodes, so that
# servers sharing nodes never read each other's state (SCAFFOLD controls,
# error-feedback residuals, a custom algorithm's state).
new_server_key <- function() {
  node_changes$servers <- node_changes$servers + 1
  paste("server", roster_key(), node_changes$servers)
}

note_node_change <- function() {
  node_changes$count <- node_changes$count + 1
  invisible()
}

roster_key <- function() {
  # Not from R's RNG: a session token must not move the user's seed.
  if (is.null(node_changes$session)) {
    node_changes$session <- paste(Sys.getpid(), format(Sys.time(), "%Y%m%d%H%M%OS6"), sep = "-")
  }
  paste(node_changes$session, node_changes$count)
}

node_roster <- function(private) {
  key <- roster_key()
  roster <- private$.roster
  if (is.null(roster) || !identical(roster$key, key)) {
    nodes <- private$.nodes
    field <- function(f, type) vapply(nodes, f, type, USE.NAMES = FALSE)
    roster <- list(key = key,
                   n_samples = field(function(n) as.double(n$n_samples), numeric(1)),
                   availability = field(function(n) availability_share(n$availability), numeric(1)),
                   mean_on = field(function(n) chain_setting(n$availability, "mean_on"), numeric(1)),
                   mean_off = field(function(n) chain_setting(n$availability, "mean_off"), numeric(1)),
                   has_validation = field(function(n) n$has_validation, logical(1)),
                   data_version = field(function(n) n$data_version, integer(1)))
    # Device profiles, as one column per setting (NA without a profile).
    systems <- lapply(nodes, function(n) n$system)
    roster$has_system <- !vapply(systems, is.null, logical(1), USE.NAMES = FALSE)
    roster$attack <- lapply(unname(nodes), function(n) n$attack)
    for (name in system_settings) {
      roster[[name]] <- vapply(systems, function(s) s[[name]] %||% NA_real_, numeric(1), USE.NAMES = FALSE)
    }
    private$.roster <- roster
  }
  roster
}

# What a round reads from its selected nodes (`idx`): their training data
# (and validation data) for `model` (NULL: none wanted), and their attacks.
# The data handles (a node's matrix and coded labels, never copies) are
# asked of a node once and kept while a fit() or round() call runs
# (`private$.views`, cleared when it ends): kept longer, saveRDS() would
# write every node's data twice, since R shares no vectors between the
# copies it writes. Unnamed: dropping the names of a list that holds the
# nodes' matrices would copy every one of them.
roster_views <- function(private, idx, model, validation = FALSE) {
  roster <- node_roster(private)
  out <- list(attack = roster$attack[idx], train = vector("list", length(idx)), validation = vector("list", length(idx)))
  if (is.null(model)) return(out)
  views <- private$.views
  if (is.null(views) || !identical(views$key, roster$key)) {
    n <- length(private$.nodes)
    views <- list(key = roster$key, train = vector("list", n), validation = vector("list", n))
  }
  changed <- FALSE
  for (split in c("train", if (validation) "validation")) {
    wanted <- if (split == "train") idx else idx[roster$has_validation[idx]]
    missing <- wanted[vapply(views[[split]][wanted], is.null, logical(1))]
    for (i in missing) views[[split]][[i]] <- node_data_for(private$.nodes[[i]]$.__enclos_env__$private, model, split)
    changed <- changed || length(missing) > 0L
    out[[split]] <- views[[split]][idx]
  }
  if (changed) private$.views <- views
  out
}

# A data frame from equal-length columns, without data.frame()'s checks (a
# round builds one over every node).
new_frame <- function(...) {
  cols <- list(...)
  structure(cols, class = "data.frame", row.names = c(NA_integer_, -length(cols[[1]])))
}

# Seconds spent in the Rust core's round work (local training, aggregation,
# evaluation), summed over the session: a round reads it before and after,
# so that `server$timings` can split a round into core and R time without
# changing the server before the round commits.
core_clock <- new.env(parent = emptyenv())
core_clock$seconds <- 0

core_call <- function(expr) {
  started <- proc.time()[["elapsed"]]
  on.exit(core_clock$seconds <- core_clock$seconds + (proc.time()[["elapsed"]] - started))
  call_rust(expr)
}

# A node's chance to be reachable in a round: its probability, or a Markov
# chain's stationary share.
availability_share <- function(a) if (inherits(a, "fed_availability")) a$share else a

chain_setting <- function(a, name) if (inherits(a, "fed_availability")) a[[name]] else NA_real_
