# A live, read-only view of a running federation. The server publishes a
# status document (JSON) after every committed round: to a file for a
# dashboard on this machine, and to its coordinator, where viewers with a
# key of their own read it at `GET /v1/status`. The Shiny app runs in a
# process of its own and only ever reads that document, so nothing on it
# can change the federation, and a round never waits for a browser.

#' A live dashboard of a federation
#'
#' @description
#' Starts a Shiny app, in a background R process, that follows a running
#' federation: the round counter, test and validation metrics by round, the
#' update diagnostics (norms, cosine with the aggregate, gradient
#' diversity), the clients of the last rounds with their status (kept,
#' dropped, filtered, late), the privacy spent, the simulated and the wall
#' time, and, for a networked server, the nodes connected and the requests
#' refused by reason.
#'
#' Give either `server`, a [Server] in this session (a simulation, or a
#' networked server started with `$listen()`), or the `url` of a remote
#' server with the credentials of a *viewer*: a key pair whose public key
#' the server was given in `viewers` (see [Server]`$serve()`). A viewer's
#' key can read the status and nothing else; a node's key cannot read it.
#'
#' The dashboard is read-only: it has no control that acts on the
#' federation, and its process holds no reference to the server.
#'
#' @param server A [Server] of this session, or `NULL` with `url`.
#' @param url A remote server's address (its `$url`).
#' @param key The viewer's private key file (from [fed_keygen()]).
#' @param server_key The server's public key, or a file holding it.
#' @param ca For `https` with a private CA: the CA certificate file.
#' @param viewer The viewer's id, as listed in the server's `viewers`.
#' @param port Port of the app; `0` picks a free one.
#' @param host Address the app listens on (loopback by default).
#' @param refresh Seconds between updates.
#' @param open Open the app in a browser.
#' @param clients_rounds How many of the last rounds the client table shows.
#' @return A `Dashboard` (R6) handle: `$url`, `$running`, `$stop()`.
#' @seealso [fed_dashboard_app()] to run the app yourself (for example on a
#'   Shiny server).
#' @examples
#' if (requireNamespace("shiny", quietly = TRUE) && requireNamespace("callr", quietly = TRUE)) {
#'   data <- synthetic_fedprox(0.5, 0.5, n_clients = 10, seed = 3)
#'   srv <- fed_server(model_softmax(60, 10), fed_nodes(data), fraction = 0.5,
#'                     test_data = pool_clients(data, "test"), seed = 1)
#'   dash <- fed_dashboard(srv, open = FALSE)
#'   srv$fit(5, verbose = FALSE)
#'   dash
#'   dash$stop()
#' }
#' @export
fed_dashboard <- function(server = NULL, url = NULL, key = NULL, server_key = NULL, ca = NULL, viewer = "dashboard",
                          port = 0, host = "127.0.0.1", refresh = 1, open = interactive(), clients_rounds = 5) {
  rlang::check_installed(c("shiny", "callr"), "to run the dashboard")
  refresh <- assert_number(refresh, 0.1, 3600)
  clients_rounds <- assert_count(clients_rounds, min = 1L)
  open <- assert_flag(open)
  port <- assert_count(port, min = 0L)
  if (port > 65535L) fedagg_abort("{.arg port} must be from 0 to 65535, not {port}.")
  if (!is.character(host) || length(host) != 1L || is.na(host)) fedagg_abort("{.arg host} must be one IP address.")
  if (!is.null(server) && !is.null(url)) fedagg_abort("Give {.arg server} or {.arg url}, not both.")
  if (!is.null(server)) {
    if (!inherits(server, "Server")) fedagg_abort("{.arg server} must be a {.cls Server}, not {obj_desc(server)}.")
    private <- server$.__enclos_env__$private
    file <- private$.dashboard$file %||% tempfile("fedagg-status-", fileext = ".json")
    private$.dashboard <- list(file = file, clients_rounds = clients_rounds)
    publish_status(server, private)
    source <- list(file = file)
    title <- "this session's server"
    # Stopping the dashboard stops the writing.
    on_stop <- function() if (identical(private$.dashboard$file, file)) private$.dashboard <- NULL
  } else {
    if (is.null(url)) fedagg_abort("Give {.arg server} (a {.cls Server} of this session) or the {.arg url} of a remote server.")
    source <- viewer_source(url, key, server_key, ca, viewer)
    # Checked here, where the error can be read, not in the app's process.
    read_status(source)
    title <- url
    on_stop <- function() NULL
  }
  if (port == 0L) port <- free_port(host) else check_port_free(port)
  proc <- callr::r_bg(function(source, port, host, refresh) {
    app <- fedagg::fed_dashboard_app(source, refresh = refresh)
    shiny::runApp(app, port = port, host = host, launch.browser = FALSE, quiet = TRUE)
  }, args = list(source = source, port = port, host = host, refresh = refresh), supervise = TRUE)
  shown <- if (grepl(":", host, fixed = TRUE)) sprintf("[%s]", host) else host
  dash <- Dashboard$new(proc, sprintf("http://%s:%d", shown, port), title, on_stop)
  dash$wait_started()
  if (open) utils::browseURL(dash$url)
  dash
}

#' The dashboard's Shiny app
#'
#' @description
#' The app [fed_dashboard()] runs, for running it yourself (on a Shiny
#' server, or in this session with `shiny::runApp()`, which blocks it).
#'
#' @param source Where the status is read: a status file (what a server
#'   writes for [fed_dashboard()]), or a list of `url`, `key`, `server_key`,
#'   `ca` and `viewer` for a remote server.
#' @param refresh Seconds between updates.
#' @return A `shiny.appobj`.
#' @examples
#' if (requireNamespace("shiny", quietly = TRUE)) {
#'   status <- tempfile(fileext = ".json")
#'   writeLines("null", status)
#'   app <- fed_dashboard_app(status)
#'   class(app)
#' }
#' @export
fed_dashboard_app <- function(source, refresh = 1) {
  check_required_args()
  rlang::check_installed(c("shiny", "jsonlite"), "to run the dashboard")
  refresh <- assert_number(refresh, 0.1, 3600)
  if (is.character(source)) source <- list(file = assert_path(source, "source"))
  if (!is.list(source) || (is.null(source$file) && is.null(source$url))) {
    fedagg_abort("{.arg source} must be a status file or a list with {.field url}, {.field key} and {.field server_key}, not {obj_desc(source)}.")
  }
  if (!is.null(source$url)) source <- viewer_source(source$url, source$key, source$server_key, source$ca, source$viewer %||% "dashboard")
  shiny::shinyApp(dashboard_ui(), dashboard_server(source, refresh))
}

# ---- the status document ------------------------------------------------

# What the dashboard shows, as the server knows it after a commit. Only
# built when a dashboard or a viewer asks for it.
status_document <- function(server, private, clients_rounds = 5L, history_rounds = 1000L) {
  h <- server$history
  h <- as.data.frame(h)[seq.int(max(1L, nrow(h) - history_rounds + 1L), length.out = min(nrow(h), history_rounds)), , drop = FALSE]
  shown <- intersect(c("round", "clients", "train_loss", "test_loss", "test_accuracy", "test_rmse", "val_loss",
                       "val_accuracy", "val_rmse", diagnostic_columns, "epsilon", "sim_time"), names(h))
  round <- private$.state$round
  list(
    title = sprintf("%s, %s", private$.algorithm$label, model_description(private$.model)),
    round = round,
    planned = private$.planned %||% NA_integer_,
    nodes = length(private$.nodes),
    updated = format(Sys.time(), "%Y-%m-%d %H:%M:%S %Z"),
    wall_seconds = sum(private$.seconds),
    history = as.list(h[shown]),
    clients = as.list(client_statuses(private, max(0L, round - clients_rounds + 1L), clients_rounds))
  )
}

# The clients of rounds from `first` on, each with what became of its
# update: kept (also when cut short by a deadline, "partial"), dropped
# (dropout or deadline), late (over-selected, not needed), or filtered (by
# the norm filter, or not picked by Krum-type aggregators).
client_statuses <- function(private, first, rounds) {
  # Only the last rounds' entries (one per round) are read: the cost does
  # not grow with the rounds kept.
  sys <- system_log_frame(utils::tail(private$.state$system_log, rounds))
  sys <- sys[sys$round >= first, c("round", "client", "status"), drop = FALSE]
  log <- client_log_frame(utils::tail(private$.state$client_log, rounds))
  log <- log[log$round >= first, , drop = FALSE]
  filtered <- log[(!log$passed_filter) | (!is.na(log$krum_kept) & !log$krum_kept), c("round", "client"), drop = FALSE]
  if (!nrow(sys)) sys <- data.frame(round = log$round, client = log$client, status = rep("kept", nrow(log)))
  status <- unname(c(kept = "kept", partial = "kept (partial)", dropout = "dropped", deadline = "dropped",
                     late = "late")[sys$status])
  status[is.na(status)] <- sys$status[is.na(status)]
  status[paste(sys$round, sys$client) %in% paste(filtered$round, filtered$client)] <- "filtered"
  m <- match(paste(sys$round, sys$client), paste(log$round, log$client))
  out <- data.frame(round = sys$round, client = sys$client, status = status,
                    train_loss = log$train_loss[m], update_norm = log$update_norm[m], stringsAsFactors = FALSE)
  out[order(-out$round, out$client), , drop = FALSE]
}

# After a commit (and when a dashboard starts): the document to the
# dashboard's file and to the coordinator's viewers. A dashboard that
# cannot be fed warns; the round stays committed.
publish_status <- function(server, private) {
  to_file <- private$.dashboard$file
  to_net <- !is.null(private$.net) && isTRUE(private$.net$viewers)
  if (is.null(to_file) && !to_net) return(invisible())
  tryCatch({
    doc <- call_rust(rs_to_json(status_document(server, private, private$.dashboard$clients_rounds %||% 5L)))
    if (to_net) call_rust(rs_net_set_status(private$.net$handle, doc))
    if (!is.null(to_file)) {
      live <- if (!is.null(private$.net)) call_rust(rs_net_live(private$.net$handle)) else "null"
      write_atomic(to_file, charToRaw(sprintf("{\"server\":%s,\"published\":%s}\n", live, doc)))
    }
  }, error = function(e) {
    fedagg_warn(c("The dashboard's status was not updated after round {private$.state$round}.",
                  x = conditionMessage(e)), class = "dashboard")
  })
  invisible()
}

# ---- reading it -----------------------------------------------------------

viewer_source <- function(url, key, server_key, ca, viewer, call = rlang::caller_env()) {
  if (!is.character(url) || length(url) != 1L || is.na(url) || !grepl("^https?://", url)) {
    fedagg_abort("{.arg url} must be a server's address ({.val https://host:port}), not {obj_desc(url)}.", call = call)
  }
  if (is.null(key)) fedagg_abort("{.arg key} is missing: the viewer's private key file.", class = "missing_file", call = call)
  if (is.null(server_key)) fedagg_abort("{.arg server_key} is missing: the server's public key.", call = call)
  if (!is.character(viewer) || length(viewer) != 1L || is.na(viewer) || !grepl("^[A-Za-z0-9_.:@-]{1,128}$", viewer)) {
    fedagg_abort("{.arg viewer} must be an id of 1-128 letters, digits or {.code -_.:@}, not {obj_desc(viewer)}.", call = call)
  }
  if (is.character(key) && length(key) == 1L && !is.na(key) && !grepl("-----BEGIN", key, fixed = TRUE) && !file.exists(key)) {
    fedagg_abort("{.arg key}: {.file {key}} does not exist.", class = "missing_file", call = call)
  }
  list(url = url, key = read_pem(key, "private key", call = call), server_key = read_public(server_key, call = call),
       ca = if (!is.null(ca)) read_pem(ca, "CA certificate", call = call), viewer = viewer)
}

# The status document, parsed: list(server = NULL or the coordinator's
# counts, published = NULL or what status_document() made).
read_status <- function(source, client = NULL) {
  text <- if (!is.null(source$file)) {
    if (!file.exists(source$file)) return(list())
    paste(readLines(source$file, warn = FALSE), collapse = "\n")
  } else {
    client <- client %||% call_rust(rs_net_client(source$url, source$viewer, source$key, source$server_key,
                                                  source$ca, FALSE, 0))
    reply <- call_rust(rs_net_request(client, "GET", "/v1/status", 0, "", raw(0), 10))
    if (reply$status != 200L) {
      why <- tryCatch(jsonlite::fromJSON(rawToChar(reply$body))$error, error = function(e) NULL) %||% "no reason given"
      fedagg_abort(c("The server refused the dashboard's request ({reply$status}: {why}).",
                     i = if (reply$status == 401L) "Is {.val {source$viewer}} in the server's {.arg viewers}, with this key?"),
                   class = "network")
    }
    if (!isTRUE(reply$verified)) fedagg_abort("The server's answer is not signed by {.arg server_key}.", class = "forged")
    rawToChar(reply$body)
  }
  doc <- jsonlite::fromJSON(text, simplifyVector = TRUE)
  if (is.null(doc)) list() else doc
}

frame_of <- function(columns) {
  if (!length(columns) || !length(columns[[1]])) return(NULL)
  as.data.frame(lapply(columns, function(x) if (is.list(x)) rep(NA, length(x)) else x), stringsAsFactors = FALSE)
}

# ---- the app -----------------------------------------------------------

dashboard_ui <- function() {
  shiny::fluidPage(
    title = "fedagg dashboard",
    shiny::tags$head(shiny::tags$style(shiny::HTML(
      ".fedagg-counter{display:inline-block;margin:0 2em 0.5em 0}.fedagg-counter b{font-size:1.6em;display:block}"
    ))),
    shiny::h2("fedagg dashboard", id = "dashboard_title"),
    shiny::div(shiny::textOutput("subtitle", inline = TRUE), style = "color:#555;margin-bottom:1em"),
    shiny::uiOutput("counters"),
    shiny::fluidRow(
      shiny::column(6, shiny::h4("Metrics by round"), shiny::plotOutput("metrics_plot", height = "320px")),
      shiny::column(6, shiny::h4("Update diagnostics"), shiny::plotOutput("diagnostics_plot", height = "320px"))
    ),
    shiny::fluidRow(
      shiny::column(8, shiny::h4("Clients of the last rounds"), shiny::tableOutput("clients_table")),
      shiny::column(4, shiny::h4("Requests refused, by reason"), shiny::tableOutput("rejected_table"))
    ),
    shiny::div(shiny::textOutput("updated", inline = TRUE), style = "color:#777;font-size:0.9em")
  )
}

dashboard_server <- function(source, refresh) {
  function(input, output, session) {
    client <- NULL
    # Outputs are redrawn when the status changes, not at every poll.
    status <- shiny::reactiveVal(list(doc = list(), error = NULL))
    shiny::observe({
      shiny::invalidateLater(refresh * 1000)
      last <- shiny::isolate(status())
      got <- tryCatch({
        if (!is.null(source$url) && is.null(client)) {
          client <<- call_rust(rs_net_client(source$url, source$viewer, source$key, source$server_key, source$ca, FALSE, 0))
        }
        list(doc = read_status(source, client), error = NULL)
      }, error = function(e) {
        client <<- NULL
        list(doc = last$doc, error = conditionMessage(e))
      })
      status(got)
    })
    published <- shiny::reactive(status()$doc$published)
    history <- shiny::reactive(frame_of(published()$history))

    output$subtitle <- shiny::renderText({
      p <- published()
      if (is.null(p)) "Waiting for the server's first status." else sprintf("%s; %d nodes", p$title, as.integer(p$nodes))
    })
    output$counters <- shiny::renderUI({
      p <- published()
      s <- status()$doc$server
      h <- history()
      counter <- function(id, label, value) {
        shiny::div(class = "fedagg-counter", shiny::tags$b(id = id, value), label)
      }
      round <- if (is.null(p)) "Round 0" else if (is.na(p$planned %||% NA)) sprintf("Round %d", as.integer(p$round)) else
        sprintf("Round %d of %d", as.integer(p$round), as.integer(p$planned))
      eps <- if (!is.null(h$epsilon) && any(!is.na(h$epsilon))) format(signif(utils::tail(stats::na.omit(h$epsilon), 1), 3)) else "-"
      sim <- if (!is.null(h$sim_time) && any(!is.na(h$sim_time))) format_seconds(utils::tail(stats::na.omit(h$sim_time), 1)) else "-"
      shiny::tagList(
        counter("round_counter", "committed", round),
        counter("epsilon", "epsilon spent", eps),
        counter("sim_time", "simulated time", sim),
        counter("wall_time", "wall time of the rounds", if (is.null(p)) "-" else format_seconds(p$wall_seconds)),
        if (!is.null(s)) counter("nodes_connected", "nodes connected", sprintf("%d of %d", as.integer(s$nodes_connected), as.integer(p$nodes %||% s$nodes_registered))),
        if (!is.null(s)) counter("phase", "server phase", s$phase)
      )
    })
    output$metrics_plot <- shiny::renderPlot(dashboard_metrics_plot(history()))
    output$diagnostics_plot <- shiny::renderPlot(dashboard_diagnostics_plot(history()))
    output$clients_table <- shiny::renderTable({
      cl <- frame_of(published()$clients)
      if (is.null(cl)) data.frame(message = "No rounds yet") else {
        cl$round <- as.integer(cl$round)
        cl[intersect(c("round", "client", "status", "train_loss", "update_norm"), names(cl))]
      }
    }, digits = 4, na = "")
    output$rejected_table <- shiny::renderTable({
      s <- status()$doc$server
      r <- unlist(s$rejected)
      if (is.null(s)) data.frame(message = "A simulation: no requests") else if (!length(r)) data.frame(reason = "(none)", requests = 0L) else
        data.frame(reason = names(r), requests = as.integer(r))
    })
    output$updated <- shiny::renderText({
      st <- status()
      p <- st$doc$published
      paste0(if (!is.null(p)) paste("Status of", p$updated) else "No status yet",
             if (!is.null(st$error)) paste(" | cannot read the status:", st$error) else "")
    })
  }
}

format_seconds <- function(s) {
  if (is.null(s) || is.na(s)) return("-")
  if (s < 120) sprintf("%.1f s", s) else if (s < 7200) sprintf("%.1f min", s / 60) else sprintf("%.1f h", s / 3600)
}

dashboard_empty_plot <- function(title) {
  graphics::plot.new()
  graphics::title(title)
  graphics::text(0.5, 0.5, "No rounds yet", col = "grey40")
}

dashboard_metrics_plot <- function(h) {
  if (is.null(h) || !nrow(h)) return(dashboard_empty_plot("Metrics by round"))
  losses <- intersect(c("train_loss", "test_loss", "val_loss"), names(h))
  metric <- intersect(c("test_accuracy", "val_accuracy", "test_rmse", "val_rmse"), names(h))
  graphics::par(mfrow = c(1, if (length(metric)) 2 else 1), mar = c(4, 4, 2.5, 1))
  draw_lines(h$round, h[losses], "Loss")
  if (length(metric)) draw_lines(h$round, h[metric], if (any(grepl("accuracy", metric))) "Accuracy" else "RMSE")
}

dashboard_diagnostics_plot <- function(h) {
  cols <- intersect(c("cosine_mean", "update_norm", "client_norm_mean", "gradient_diversity"), names(h))
  if (is.null(h) || !nrow(h) || !length(cols) || all(is.na(unlist(h[cols])))) {
    return(dashboard_empty_plot("Update diagnostics"))
  }
  graphics::par(mfrow = c(1, 3), mar = c(4, 4, 2.5, 1))
  draw_lines(h$round, h[intersect("cosine_mean", cols)], "Cosine with the aggregate")
  draw_lines(h$round, h[intersect(c("update_norm", "client_norm_mean"), cols)], "Update norms")
  draw_lines(h$round, h[intersect("gradient_diversity", cols)], "Gradient diversity")
}

draw_lines <- function(x, ys, title) {
  ys <- ys[vapply(ys, function(y) any(is.finite(y)), logical(1))]
  if (!length(ys)) {
    dashboard_empty_plot(title)
    return(invisible())
  }
  m <- as.matrix(ys)
  graphics::matplot(x, m, type = "l", lty = 1, lwd = 2, col = seq_len(ncol(m)) + 1L, xlab = "round", ylab = "", main = title)
  if (ncol(m) > 1L) graphics::legend("topright", legend = colnames(m), col = seq_len(ncol(m)) + 1L, lty = 1, lwd = 2, bty = "n", cex = 0.8)
}

# Told here, with a classed error, rather than by the app's process dying
# with a message in the system's language.
check_port_free <- function(port) {
  sock <- tryCatch(suppressWarnings(serverSocket(port)), error = function(e) NULL)
  if (is.null(sock)) {
    fedagg_abort(c("Port {port} is in use by another process.", i = "Choose another {.arg port}, or give {.code port = 0} for a free one."),
                 class = c("port_in_use", "network"))
  }
  close(sock)
}

free_port <- function(host) {
  if (requireNamespace("httpuv", quietly = TRUE)) return(httpuv::randomPort(host = host))
  fedagg_abort("Give {.arg port}: picking a free one needs the {.pkg httpuv} package.")
}

#' The handle of a running dashboard
#'
#' @description Made by [fed_dashboard()].
#' @export
Dashboard <- R6::R6Class("Dashboard",
  public = list(
    #' @description Made by [fed_dashboard()].
    #' @param process The app's [callr::r_bg()] process.
    #' @param url The app's address.
    #' @param following What it follows.
    #' @param on_stop Called by `$stop()`.
    initialize = function(process, url, following, on_stop = function() NULL) {
      private$.process <- process
      private$.on_stop <- on_stop
      private$.url <- url
      private$.following <- following
    },
    #' @description Waits until the app answers (at most `timeout` seconds).
    #' @param timeout Seconds.
    wait_started = function(timeout = 60) {
      started <- proc.time()[["elapsed"]]
      repeat {
        if (!private$.process$is_alive()) {
          err <- tryCatch(private$.process$read_all_error(), error = function(e) "")
          fedagg_abort(c("The dashboard's process stopped before it served.", x = trimws(err)), class = "dashboard")
        }
        ok <- tryCatch({
          con <- suppressWarnings(url(private$.url, open = "r"))
          close(con)
          TRUE
        }, error = function(e) FALSE)
        if (ok) return(invisible(self))
        if (proc.time()[["elapsed"]] - started > timeout) {
          private$.process$kill()
          fedagg_abort("The dashboard did not answer within {timeout} s.", class = "dashboard")
        }
        Sys.sleep(0.1)
      }
    },
    #' @description Stops the app.
    stop = function() {
      if (private$.process$is_alive()) private$.process$kill()
      private$.on_stop()
      invisible(self)
    },
    #' @description Format the handle.
    #' @param ... Unused.
    format = function(...) {
      sprintf("<Dashboard> %s following %s (%s)", private$.url, private$.following,
              if (self$running) "running" else "stopped")
    },
    #' @description Print the handle.
    #' @param ... Unused.
    print = function(...) {
      cat(self$format(), "\n", sep = "")
      invisible(self)
    }
  ),
  active = list(
    #' @field url The app's address (read-only).
    url = function(value) {
      if (!missing(value)) fedagg_abort("{.field url} is read-only.")
      private$.url
    },
    #' @field running Whether the app's process runs (read-only).
    running = function(value) {
      if (!missing(value)) fedagg_abort("{.field running} is read-only.")
      private$.process$is_alive()
    }
  ),
  private = list(.process = NULL, .url = NULL, .following = NULL, .on_stop = NULL)
)
