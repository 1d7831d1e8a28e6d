# Every error fedagg raises has class "fedagg_error" and a more specific one:
#   fedagg_error_input     an argument is malformed or out of range
#   fedagg_error_client    one client's data or update is malformed (fields
#                          `client`, and `round` during a round)
#   fedagg_error_diverged  training produced a non-finite loss or parameters
#   fedagg_error_memory    a size would not fit in memory
#   fedagg_error_user_code a function the user supplied failed (field `round`)
#   fedagg_error_filter    the norm filter left too few updates
#   fedagg_error_rust      anything else the Rust core reported
#
# `message` is a cli template written in this package. Text from elsewhere (a
# Rust message, a user's error) must never be part of the template: pass it
# as `foreign`, which is shown as it is, braces and all.
fedagg_abort <- function(message, class = "input", ..., foreign = NULL, call = rlang::caller_env(),
                         .envir = parent.frame()) {
  formatted <- vapply(message, cli::format_inline, character(1), .envir = .envir, USE.NAMES = FALSE)
  names(formatted) <- names(message)
  message <- c(formatted, foreign)
  # Already formatted: keep cli from reading braces in the result a second time.
  message <- gsub("\\{", "{{", gsub("\\}", "}}", message))
  cli::cli_abort(
    message,
    class = c(paste0("fedagg_error_", class), "fedagg_error"),
    ...,
    call = call
  )
}

fedagg_warn <- function(message, class, .envir = parent.frame()) {
  cli::cli_warn(message, class = c(paste0("fedagg_warning_", class), "fedagg_warning"), .envir = .envir)
}

# The Rust core tags its messages "[kind] text"; the kind becomes the class.
# The networked federation adds: network (no answer, a refused connection),
# timeout, key (a key or certificate that cannot be read), forged (an answer
# not signed by the server), crypto, protocol and port_in_use.
rust_error_kinds <- c("input", "memory", "client", "diverged", "filter", "network", "timeout", "key", "forged",
                      "crypto", "protocol", "port_in_use")

call_rust <- function(expr, call = rlang::caller_env()) {
  tryCatch(expr, error = function(e) {
    if (inherits(e, "fedagg_error")) stop(e)
    parsed <- parse_rust_message(conditionMessage(e))
    headline <- switch(parsed$kind,
      memory = "Not enough memory for this computation.",
      diverged = "Training diverged.",
      filter = "The filter dropped every update.",
      input = "fedagg's Rust core cannot use this input.",
      network = "The network failed.",
      timeout = "No answer in time.",
      key = "A key or certificate cannot be used.",
      forged = "An answer was not signed by the server's key; it was refused.",
      "Computation failed in fedagg's Rust core."
    )
    fedagg_abort(headline, class = parsed$kind, foreign = c(x = parsed$text), call = call)
  })
}

parse_rust_message <- function(text) {
  kind <- sub("^\\[(\\w+)\\] .*$", "\\1", text)
  if (identical(kind, text) || !kind %in% rust_error_kinds) return(list(kind = "rust", text = text))
  list(kind = kind, text = sub("^\\[\\w+\\] ", "", text))
}

# Runs a function the user supplied (a selection rule, a hook, a weights
# function, a custom model's parts). Its errors become fedagg_error_user_code
# naming what failed, the round and the node, with the original as parent.
# Conditions meant to steer fedagg (stop_training()) pass through.
call_user <- function(fun, args, what, round = NULL, client = NULL, call = rlang::caller_env()) {
  withCallingHandlers(
    do.call(fun, args),
    error = function(e) {
      if (inherits(e, "fedagg_stop_training") || inherits(e, "fedagg_error")) return()
      # Formatted only on failure: this wrapper runs on every hook call.
      what <- cli::format_inline(what)
      where <- c(if (!is.null(round)) sprintf("round %d", round),
                 if (!is.null(client)) sprintf("client \"%s\"", client))
      where <- if (length(where)) paste0(" (", paste(where, collapse = ", "), ")") else ""
      # The user's own message is shown once, as the parent ("Caused by").
      fedagg_abort("{what} failed{where}.", class = "user_code", round = round, client = client, parent = e,
                   call = call)
    }
  )
}

# One check for every argument that takes one of a few strings. The default
# (the whole vector of choices, as in match.arg) gives the first; a unique
# prefix is accepted as match.arg does.
assert_choice <- function(x, choices, arg = rlang::caller_arg(x), call = rlang::caller_env()) {
  if (identical(x, choices)) return(choices[1])
  if (is.character(x) && length(x) == 1L && !is.na(x) && nzchar(x)) {
    hit <- pmatch(x, choices)
    if (!is.na(hit)) return(choices[hit])
  }
  fedagg_abort("{.arg {arg}} must be one of {.or {.val {choices}}}, not {obj_desc(x)}.", call = call)
}
