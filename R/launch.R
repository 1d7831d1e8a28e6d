# Scale-out: the nodes of a networked federation hosted by worker
# processes that the `future` package starts (on this machine, on a
# cluster's machines, or as a scheduler's jobs), each running fed_join() for
# its shard of the nodes.

#' Run a federation's nodes in worker processes
#'
#' @description
#' Starts the nodes of a networked federation in worker processes, through
#' the [future][future::future] package: `plan(multisession)` on this
#' machine, `plan(cluster, workers = c("host1", "host2"))` on other
#' machines, or a scheduler's plan such as `future.batchtools`. The nodes
#' are split into `workers` shards, and each worker runs [fed_join()] for
#' its shard until the server says the federation is over. The call
#' returns at once. Serve the federation with [Server]`$serve()` while the
#' workers run; the results are those of the simulation.
#'
#' For a federation whose data do not fit one R session, give `nodes` as a
#' function of `(shard, n_shards)` that makes (or reads) that shard's
#' nodes: it runs in the worker, so the data are only ever there.
#'
#' @param nodes A list of [Node]s (from [fed_nodes()]), or
#'   `function(shard, n_shards)` returning the nodes of one shard.
#' @param url The server's address (its `$url`).
#' @param model The federation's model (as the server's).
#' @param key The nodes' private key files: a directory holding
#'   `<node id>.key` for every node, or one file per node (in order or
#'   named by id, with a list of nodes).
#' @param server_key The server's public key, or a file holding it.
#' @param workers Number of shards (worker processes). Default: the plan's
#'   number of workers.
#' @param ... Further arguments of [fed_join()] (`ca`, `state_dir`, `poll`,
#'   `timeout`, `backoff`, `heartbeat`, ...).
#' @return A `fed_launch` object (an R6 [Launch]): `$status()`, `$wait()`,
#'   `$stop()`.
#' @seealso The vignette "A real federation", section "Scale-out".
#' @examples
#' \dontrun{
#' future::plan(future::multisession, workers = 4)
#' launch <- fed_launch(nodes, server$url, model, key = "keys/", server_key = "server.pub")
#' server$serve(50)
#' launch$wait()
#' }
#' @export
fed_launch <- function(nodes, url, model, key, server_key, workers = NULL, ...) {
  check_required_args()
  rlang::check_installed("future", "to start worker processes")
  plan <- future::plan("next")
  if (inherits(plan, "uniprocess")) {
    fedagg_abort(c("{.fn fed_launch} needs a {.pkg future} plan that runs futures in other processes, not {.code {class(plan)[1]}}.",
                   i = "For example {.code future::plan(future::multisession, workers = 2)}; the server serves in this session meanwhile."),
                 class = "launch")
  }
  # multisession with one worker evaluates in this process (future's rule).
  if (inherits(plan, "multisession") && future::nbrOfWorkers() < 2) {
    fedagg_abort(c("{.fn fed_launch} needs worker processes, and {.code multisession} with one worker runs futures in this session.",
                   i = "Use {.code future::plan(future::cluster, workers = 1)} for one worker process, or more workers."),
                 class = "launch")
  }
  if (inherits(plan, "multicore")) {
    fedagg_abort(c("{.fn fed_launch} cannot use forked ({.code multicore}) workers: a fork copies this session's running server threads half-way.",
                   i = "Use {.code future::multisession} (or {.code cluster}) instead."), class = "launch")
  }
  assert_model(model)
  if (!is.character(url) || length(url) != 1L || is.na(url)) fedagg_abort("{.arg url} must be one address, not {obj_desc(url)}.", class = "launch")
  workers <- if (is.null(workers)) future::nbrOfWorkers() else assert_count(workers, min = 1L)
  if (!is.finite(workers)) workers <- 1L
  maker <- is.function(nodes)
  if (!maker) {
    nodes <- as_node_list(nodes)
    ids <- vapply(nodes, function(n) n$id, character(1), USE.NAMES = FALSE)
    if (anyDuplicated(ids)) fedagg_abort("{.arg nodes} must have distinct ids; {.val {ids[duplicated(ids)][1]}} appears twice.", class = "launch")
    workers <- min(workers, length(nodes))
  }
  key_dir <- is.character(key) && length(key) == 1L && !is.na(key) && dir.exists(key)
  if (maker && !key_dir) {
    fedagg_abort("With {.arg nodes} as a function, {.arg key} must be a directory of {.file <node id>.key} files.", class = "launch")
  }
  # With a list of nodes, every key file is known (and checked) here.
  key_files <- if (!maker) {
    if (key_dir) file.path(key, paste0(ids, ".key")) else unlist(per_node_paths(key, ids), use.names = FALSE)
  }
  missing_keys <- if (!maker) ids[!file.exists(key_files)]
  if (length(missing_keys)) fedagg_abort("No private key for node{?s} {.val {missing_keys}}.", class = "missing_file")
  server_pub <- read_public(server_key)
  control <- tempfile("fedagg-launch-")
  dir.create(control)
  # Contiguous shards of (nearly) equal size.
  shard_of <- if (maker) NULL else split(seq_along(nodes), ceiling(seq_along(nodes) * workers / length(nodes)))
  join_args <- list(...)
  futures <- lapply(seq_len(workers), function(k) {
    if (maker) return(launch_shard(k, workers, nodes, url, model, key, server_pub, join_args, control))
    launch_shard(k, workers, nodes[shard_of[[k]]], url, model, key_files[shard_of[[k]]], server_pub, join_args, control)
  })
  Launch$new(futures, control, if (maker) NULL else lapply(shard_of, function(i) ids[i]), url)
}

# One shard's future: writes where it runs (so that it can be stopped),
# then joins its nodes. Every value it needs is passed as a global; `key`
# is the shard's key files, or (nodes made in the worker) their directory.
launch_shard <- function(k, n_shards, nodes, url, model, key, server_pub, join_args, control) {
  future::future({
    writeLines(c(as.character(Sys.getpid()), Sys.info()[["nodename"]]), file.path(control, sprintf("shard-%d.pid", k)))
    shard_nodes <- if (is.function(nodes)) nodes(k, n_shards) else nodes
    ids <- vapply(shard_nodes, function(n) n$id, character(1))
    keys <- if (is.function(nodes)) file.path(key, paste0(ids, ".key")) else key
    do.call(fedagg::fed_join, c(list(shard_nodes, url, model, key = keys, server_key = server_pub), join_args))
  }, globals = list(k = k, n_shards = n_shards, nodes = nodes, url = url, model = model, key = key,
                    server_pub = server_pub, join_args = join_args, control = control),
  packages = "fedagg", seed = NULL, lazy = FALSE)
}

#' Worker processes hosting a federation's nodes
#'
#' @description
#' What [fed_launch()] returns: one [future][future::future] per shard of
#' the nodes. `$status()` says which are running; `$wait()` waits for them
#' (they end when the server says the federation is over) and returns the
#' tasks they did; `$stop()` ends shards at once, as a crash would: their
#' nodes are dropouts of the rounds that follow, and the federation goes on
#' with the others.
#' @export
Launch <- R6::R6Class("Launch",
  public = list(
    #' @description Made by [fed_launch()].
    #' @param futures,control,shards,url Set by [fed_launch()].
    initialize = function(futures, control, shards, url) {
      private$.futures <- futures
      private$.control <- control
      private$.shards <- shards
      private$.url <- url
      private$.stopped <- rep(FALSE, length(futures))
    },
    #' @description The shards: `shard`, `nodes` (their number, `NA` when
    #'   made in the worker), `pid` and `host` of the worker once it
    #'   started, and `state` (`"starting"`, `"running"`, `"done"`,
    #'   `"failed"` or `"stopped"`).
    status = function() {
      where <- lapply(seq_along(private$.futures), private$.where)
      state <- vapply(seq_along(private$.futures), function(k) {
        if (private$.stopped[k]) return("stopped")
        f <- private$.futures[[k]]
        if (!future::resolved(f)) return(if (is.null(where[[k]])) "starting" else "running")
        ok <- tryCatch({
          future::value(f)
          TRUE
        }, error = function(e) FALSE)
        if (ok) "done" else "failed"
      }, character(1))
      data.frame(shard = seq_along(private$.futures),
                 nodes = if (is.null(private$.shards)) NA_integer_ else lengths(private$.shards),
                 pid = vapply(where, function(w) if (is.null(w)) NA_integer_ else w$pid, integer(1)),
                 host = vapply(where, function(w) if (is.null(w)) NA_character_ else w$host, character(1)),
                 state = state, stringsAsFactors = FALSE)
    },
    #' @description Wait for the shards to end.
    #' @param timeout Seconds to wait at most.
    #' @return The tasks the nodes did (see [fed_join()]), with a `shard`
    #'   column, invisibly. A shard that failed is an error of class
    #'   `fedagg_error_launch` naming it (with its error as parent).
    wait = function(timeout = Inf) {
      timeout <- assert_number(timeout, 0, Inf)
      started <- Sys.time()
      live <- which(!private$.stopped)
      while (!all(vapply(private$.futures[live], future::resolved, logical(1)))) {
        if (as.numeric(Sys.time() - started, units = "secs") > timeout) {
          fedagg_abort("The worker processes are still running after {timeout} s.", class = "timeout")
        }
        Sys.sleep(0.1)
      }
      logs <- lapply(live, function(k) {
        out <- tryCatch(future::value(private$.futures[[k]]), error = function(e) {
          fedagg_abort("Shard {k} of the launch failed.", class = "launch", parent = e)
        })
        if (nrow(out)) out$shard <- k
        out
      })
      invisible(do.call(rbind, logs))
    },
    #' @description End shards now (their worker processes are killed; on
    #'   this machine only).
    #' @param shards Which shards (default: all still running).
    stop = function(shards = NULL) {
      shards <- shards %||% which(!private$.stopped)
      for (k in shards) {
        if (!k %in% seq_along(private$.futures)) fedagg_abort("There is no shard {k}.", class = "launch")
        where <- private$.where(k)
        if (is.null(where)) fedagg_abort("Shard {k} has not started yet; it cannot be stopped.", class = "launch")
        if (!identical(where$host, Sys.info()[["nodename"]])) {
          fedagg_abort(c("Shard {k} runs on {.val {where$host}}: it can be stopped only there.",
                         i = "It ends by itself when the federation is over."), class = "launch")
        }
        tools::pskill(where$pid, tools::SIGKILL)
        private$.stopped[k] <- TRUE
      }
      invisible(self)
    },
    #' @description One line per shard.
    #' @param ... Ignored.
    format = function(...) {
      s <- self$status()
      c(sprintf("<fed_launch> %d shard%s of nodes for %s", nrow(s), if (nrow(s) == 1L) "" else "s", private$.url),
        sprintf("  shard %d: %s node%s, %s%s", s$shard, ifelse(is.na(s$nodes), "?", s$nodes), ifelse(s$nodes %in% 1L, "", "s"),
                s$state, ifelse(is.na(s$pid), "", sprintf(" (pid %d on %s)", s$pid, s$host))))
    },
    #' @description Print the shards.
    #' @param ... Ignored.
    print = function(...) {
      cat(self$format(), sep = "\n")
      invisible(self)
    }
  ),
  private = list(
    .futures = NULL, .control = NULL, .shards = NULL, .url = NULL, .stopped = NULL,
    .where = function(k) {
      file <- file.path(private$.control, sprintf("shard-%d.pid", k))
      if (!file.exists(file)) return(NULL)
      lines <- readLines(file, warn = FALSE)
      if (length(lines) < 2L) return(NULL)
      list(pid = as.integer(lines[1]), host = lines[2])
    }
  )
)
