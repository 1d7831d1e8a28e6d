# Every error fedagg raises has class "fedagg_error" and a more specific one:
#   fedagg_error_input   an argument is malformed or out of range
#   fedagg_error_client  one client's update is malformed (field `client`)
fedagg_abort <- function(message, class = "input", ..., call = rlang::caller_env(),
                         .envir = parent.frame()) {
  cli::cli_abort(
    message,
    class = c(paste0("fedagg_error_", class), "fedagg_error"),
    ...,
    call = call,
    .envir = .envir
  )
}

fedagg_warn <- function(message, class, .envir = parent.frame()) {
  cli::cli_warn(message, class = c(paste0("fedagg_warning_", class), "fedagg_warning"), .envir = .envir)
}

# Rust-side errors arrive as plain R errors; keep the message, add our classes.
call_rust <- function(expr, call = rlang::caller_env()) {
  tryCatch(expr, error = function(e) {
    if (inherits(e, "fedagg_error")) stop(e)
    fedagg_abort(c("Computation failed in fedagg's Rust core.", x = conditionMessage(e)),
                 class = "rust", call = call)
  })
}
