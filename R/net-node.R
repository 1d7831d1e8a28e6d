# A node's side of a networked federation: it joins its server, asks for
# tasks, trains on its own data, uploads signed updates, and keeps its
# state on its own disk.

#' Join a networked federation as one or more nodes
#'
#' @description
#' Runs the node side of a real federation from the node's own R session:
#' each node joins the server at `url` (it must be in the server's
#' allow-list, see [fed_remote_nodes()]), then waits for tasks. For each
#' task it checks the server's signature, trains in Rust on its own data
#' with the task's settings (client algorithm, local optimizer, epochs,
#' learning rate, seeds), applies its side's transforms (local DP,
#' compression with its residual), and uploads the signed update. Its data
#' never leave it. A custom model ([model_custom()]) trains in R, in this
#' session, with this session's copy of the model: tasks name the model,
#' and no code travels.
#'
#' Between rounds a node keeps its own state (SCAFFOLD's control variate,
#' error-feedback residuals), and with `state_dir` also on disk, written
#' atomically, so that a node restarted after a crash rejoins with it.
#' When the server cannot be reached the node retries with capped
#' exponential backoff and jitter. It returns when the server says the
#' federation is over. Interrupting R (Ctrl-C) leaves no file half-written.
#'
#' One process can host many nodes (a list), which serves tests and
#' scale-out simulations. A node given a simulated attack ([set_attack()])
#' attacks its own updates, exactly as in a simulation; the server, as in
#' reality, does not know which nodes attack.
#'
#' @param nodes A [Node] or a list of nodes (from [fed_nodes()]).
#' @param url The server's address, `"https://host:port"` (or
#'   `"http://127.0.0.1:port"` on loopback).
#' @param model The federation's model (the same as the server's, with the
#'   same `classes`; a custom model with the same `name` and parameters).
#' @param key The nodes' private key files (see [fed_keygen()]): one per
#'   node, in order or named by node id.
#' @param server_key The server's public key (`"ed25519:..."`, or a file
#'   holding it): every task and answer must be signed with it.
#' @param ca The CA certificate that signed the server's certificate (for
#'   `https://`).
#' @param state_dir `NULL`, or a directory where each node keeps its state
#'   (`<node id>.rds`) across restarts.
#' @param poll Seconds a request for a task waits on the server.
#' @param timeout Seconds to wait for one answer of the server.
#' @param backoff Initial and largest pause (seconds) between attempts
#'   when the server cannot be reached.
#' @param max_failures Consecutive failed attempts before giving up.
#' @param heartbeat Seconds between the heartbeats a node sends while it
#'   trains, so that a long local training does not look like a dead node.
#' @param insecure Allow plain `http://` to a host that is not loopback.
#' @param verbose Print progress.
#' @return A data frame of the tasks done, invisibly: `node`, `round`,
#'   `status` (`"trained"`, `"evaluated"`, or `"late"` when the round had
#'   moved on), `loss` (training or evaluation loss) and `seconds`.
#' @seealso The vignette "A real federation".
#' @examples
#' \dontrun{
#' fed_join(node, "https://fed.example.org:8443", model,
#'          key = "site-a.key", server_key = "server.pub", ca = "ca.pem",
#'          state_dir = "fedagg-state")
#' }
#' @export
fed_join <- function(nodes, url, model, key, server_key, ca = NULL, state_dir = NULL, poll = 5, timeout = 60,
                     backoff = c(0.5, 30), max_failures = Inf, heartbeat = 10, insecure = FALSE,
                     verbose = getOption("fedagg.verbose", interactive())) {
  check_required_args()
  nodes <- as_node_list(nodes)
  ids <- vapply(nodes, function(n) n$id, character(1), USE.NAMES = FALSE)
  if (anyDuplicated(ids)) fedagg_abort("{.arg nodes} must have distinct ids; {.val {ids[duplicated(ids)][1]}} appears twice.")
  if (any(vapply(nodes, is_remote_node, logical(1)))) fedagg_abort("{.arg nodes} must hold data: a {.cls RemoteNode} is the server's view of a node.")
  assert_model(model)
  for (n in nodes) n$check_model(model)
  # A custom model trains here in R with this session's copy of its code;
  # the server's tasks name it and carry numbers only.
  template <- if (!is_builtin(model)) init_params(model)
  d <- if (is.null(template)) n_params(model) else length(unlist(template, use.names = FALSE))
  if (!is.character(url) || length(url) != 1L || is.na(url)) fedagg_abort("{.arg url} must be one address, not {obj_desc(url)}.")
  poll <- assert_number(poll, 0, 3600)
  timeout <- assert_number(timeout, 0, Inf, lower_open = TRUE)
  if (!is.numeric(backoff) || length(backoff) != 2L || anyNA(backoff) || any(backoff <= 0) || backoff[1] > backoff[2]) {
    fedagg_abort("{.arg backoff} must be two positive numbers, the first pause and the largest, not {obj_desc(backoff)}.")
  }
  max_failures <- assert_limit(max_failures)
  heartbeat <- assert_number(heartbeat, 0, 86400, lower_open = TRUE)
  verbose <- assert_flag(verbose)
  insecure <- assert_flag(insecure)
  keys <- per_node_paths(key, ids)
  server_pub <- read_public(server_key)
  ca_pem <- if (!is.null(ca)) read_pem(ca, "CA certificate")
  if (!is.null(state_dir)) {
    state_dir <- assert_path(state_dir, "state_dir")
    dir.create(state_dir, recursive = TRUE, showWarnings = FALSE)
  }
  # The largest task a node accepts: the model's parameters and a SCAFFOLD
  # control, and room for the settings.
  max_task <- 16 * d + 2^20
  # Answers may be slow while the server waits: the wait comes on top.
  wait <- if (length(nodes) == 1L) poll else 0
  members <- lapply(seq_along(nodes), function(i) {
    node <- nodes[[i]]
    saved <- read_node_state(state_dir, ids[i])
    validation <- if (node$has_validation) node$data_for(model, "validation")
    list(id = ids[i], node = node,
         client = call_rust(rs_net_client(url, ids[i], read_pem(keys[[i]], "private key"), server_pub, ca_pem, insecure,
                                          max_task)),
         validation = validation,
         attack = rust_attack(node$attack),
         runtime = node_runtime(ids[i], node$data_for(model), validation, saved$state %||% list(), saved$pending,
                                custom = if (!is.null(template)) list(node = node, model = model, template = template)),
         info = call_rust(rs_node_info(ids[i], as.double(node$n_samples), node$has_validation, character(),
                                       as.double(node$data_version))))
  })
  joined <- rep(FALSE, length(nodes))
  done <- rep(FALSE, length(nodes))
  log <- list()
  failures <- 0
  delay <- backoff[1]
  request <- function(m, method, path, round = 0, task = "", body = raw()) {
    r <- call_rust(rs_net_request(m$client, method, path, round, task, body, timeout + wait))
    # A node acts only on answers its server signed; the server's "later"
    # (429 too many requests, 503 not ready) and anything unsigned are
    # tried again after a pause.
    if (!isTRUE(r$verified) || r$status %in% c(429L, 503L)) {
      fedagg_abort("The server answered {r$status}{if (!isTRUE(r$verified)) ' (unsigned)' else ''} to {method} {path}.",
                   class = "network", client = m$id)
    }
    r
  }
  refused <- function(m, reply, what) {
    reason <- tryCatch(jsonlite_field(rawToChar(reply$body), "error"), error = function(e) "")
    fedagg_abort("The server refused {what} of node {.val {m$id}} ({reply$status} {reason}).", class = "network_refused",
                 client = m$id, status = reply$status, reason = reason)
  }
  if (verbose) cli::cli_inform(c(i = "Joining {.url {url}} as {length(nodes)} node{?s}."))
  while (!all(done)) {
    busy <- FALSE
    outcome <- tryCatch({
      for (i in which(!done)) {
        m <- members[[i]]
        if (!joined[i]) {
          r <- request(m, "POST", "/v1/join", body = m$info)
          if (r$status != 200) refused(m, r, "the join")
          joined[i] <- TRUE
          if (verbose) cli::cli_inform(c(v = "Node {.val {m$id}} joined."))
        }
        r <- request(m, "GET", sprintf("/v1/task?wait=%g", wait))
        if (r$status == 410) {
          done[i] <- TRUE
          next
        }
        if (r$status == 204) next
        if (r$status == 409) {
          # The server restarted and forgot us: join again.
          joined[i] <- FALSE
          next
        }
        if (r$status != 200) refused(m, r, "a task request")
        busy <- TRUE
        started <- proc.time()[["elapsed"]]
        kind <- call_rust(rs_message_kind(r$body))
        if (identical(kind, "EvalIns")) {
          task <- "evaluated"
          asked <- call_rust(rs_eval_read(r$body))
          data <- if (asked$split == "train") m$node$data_for(model) else m$validation
          if (is.null(data)) fedagg_abort("Node {.val {m$id}} was asked to evaluate on validation data it does not hold.", class = "client", client = m$id)
          if (!identical(asked$custom, custom_model_name(model) %||% "")) {
            fedagg_abort("Node {.val {m$id}} was asked to evaluate a model it does not hold.", class = "protocol", client = m$id)
          }
          res <- if (!is.null(template)) client_evaluate_custom(asked, m$node, model, template) else {
            out <- call_rust(rs_client_evaluate(r$body, list(data)))
            if (!isTRUE(out$ok)) abort_client_failure(m$id, out$message, r$round, kind = out$kind)
            out$res
          }
          loss <- call_rust(rs_eval_read(res))$loss
        } else {
          task <- "trained"
          ins <- r$body
          # A simulated malicious node attacks its own update, as the
          # simulation would (the server cannot know).
          if (!is.null(m$attack)) ins <- call_rust(rs_fit_ins_set_attack(ins, m$attack))
          # A long local training does not look like a dead node.
          beats <- call_rust(rs_net_heartbeats(m$client, heartbeat))
          res <- tryCatch(m$runtime$fit(ins), finally = call_rust(rs_net_heartbeats_stop(beats)))
          write_node_state(state_dir, m$id, m$runtime)
          loss <- m$runtime$loss()
        }
        answer <- request(m, "POST", "/v1/update", round = r$round, task = r$task, body = res)
        status <- if (answer$status == 200) task else {
          # A late upload (the round moved on) is a dropout, not a failure.
          if (!answer$status %in% c(403, 409)) refused(m, answer, "the update")
          "late"
        }
        log[[length(log) + 1L]] <- list(node = m$id, round = r$round, status = status, loss = loss,
                                        seconds = proc.time()[["elapsed"]] - started)
        if (verbose) cli::cli_inform(c(v = "Node {.val {m$id}}: round {r$round} {status} (loss {format(signif(loss, 4))})."))
      }
      "ok"
    }, fedagg_error_network = function(e) e, fedagg_error_timeout = function(e) e)
    if (inherits(outcome, "condition")) {
      failures <- failures + 1
      if (failures > max_failures) {
        fedagg_abort(c("Gave up reaching {.url {url}} after {failures} failed attempt{?s}.", i = "Nodes still in: {.val {ids[!done]}}."),
                     class = "network", parent = outcome)
      }
      if (verbose) cli::cli_inform(c(`!` = "Cannot reach the server ({conditionMessage(outcome)}); retrying in {format(signif(delay, 2))} s."))
      # Full jitter in [delay/2, delay], so that restarted nodes do not
      # all come back at once.
      Sys.sleep(delay * stats::runif(1, 0.5, 1))
      delay <- min(backoff[2], delay * 2)
      next
    }
    failures <- 0
    delay <- backoff[1]
    if (!busy && wait == 0) Sys.sleep(0.05)
  }
  if (verbose) cli::cli_inform(c(v = "The federation is over."))
  out <- if (length(log)) do.call(rbind, lapply(log, as.data.frame, stringsAsFactors = FALSE)) else
    data.frame(node = character(), round = numeric(), status = character(), loss = numeric(), seconds = numeric())
  invisible(out)
}

per_node_paths <- function(key, ids, call = rlang::caller_env()) {
  if (!is.character(key) || anyNA(key)) fedagg_abort("{.arg key} must be the nodes' private key files, not {obj_desc(key)}.", call = call)
  if (!is.null(names(key)) && all(ids %in% names(key))) return(as.list(key[ids]))
  if (length(key) != length(ids)) {
    fedagg_abort("{.arg key} must give one key file per node ({length(ids)}), in order or named by node id.", call = call)
  }
  as.list(key)
}

node_state_file <- function(dir, id) file.path(dir, paste0(id, ".rds"))

read_node_state <- function(dir, id) {
  if (is.null(dir) || !file.exists(node_state_file(dir, id))) return(list())
  file <- node_state_file(dir, id)
  saved <- tryCatch(unserialize(readBin(file, "raw", file.size(file))), error = function(e) {
    fedagg_abort("The state file {.file {file}} of node {.val {id}} cannot be read.", class = "checkpoint", client = id,
                 foreign = c(x = conditionMessage(e)))
  })
  if (!identical(saved$node, id)) fedagg_abort("{.file {file}} is not node {.val {id}}'s state.", class = "checkpoint", client = id)
  saved
}

write_node_state <- function(dir, id, runtime) {
  if (is.null(dir)) return(invisible())
  payload <- list(format = 1L, node = id, state = runtime$state(), pending = runtime$pending())
  write_atomic(node_state_file(dir, id), serialize(payload, NULL, xdr = FALSE), private = TRUE)
}

# One string field of a small JSON object (the server's refusals), without
# a JSON package.
jsonlite_field <- function(text, field) {
  m <- regmatches(text, regexec(sprintf('"%s"\\s*:\\s*"([^"]*)"', field), text))[[1]]
  if (length(m) < 2L) "" else m[2]
}
