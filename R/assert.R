# Small validators. Each returns the (possibly coerced) value or raises a
# classed error naming the argument as the user wrote it.

assert_number <- function(x, lower = -Inf, upper = Inf, lower_open = FALSE, upper_open = FALSE,
                          arg = rlang::caller_arg(x), call = rlang::caller_env()) {
  if (!is.numeric(x) || length(x) != 1L || is.na(x) || !is.finite(x)) {
    fedagg_abort("{.arg {arg}} must be a single finite number, not {obj_desc(x)}.", call = call)
  }
  too_low <- if (lower_open) x <= lower else x < lower
  too_high <- if (upper_open) x >= upper else x > upper
  if (too_low || too_high) {
    range <- if (is.infinite(upper)) paste(if (lower_open) ">" else ">=", lower)
             else paste0("in ", if (lower_open) "(" else "[", lower, ", ", upper, if (upper_open) ")" else "]")
    fedagg_abort("{.arg {arg}} must be {range}, not {x}.", call = call)
  }
  as.double(x)
}

assert_count <- function(x, min = 0L, allow_null = FALSE,
                         arg = rlang::caller_arg(x), call = rlang::caller_env()) {
  if (allow_null && is.null(x)) return(NULL)
  ok <- is.numeric(x) && length(x) == 1L && !is.na(x) && is.finite(x) && x == round(x) && x >= min &&
    x <= .Machine$integer.max
  if (!ok) {
    fedagg_abort("{.arg {arg}} must be a whole number >= {min}, not {obj_desc(x)}.", call = call)
  }
  as.integer(x)
}

assert_flag <- function(x, arg = rlang::caller_arg(x), call = rlang::caller_env()) {
  if (!is.logical(x) || length(x) != 1L || is.na(x)) {
    fedagg_abort("{.arg {arg}} must be TRUE or FALSE, not {obj_desc(x)}.", call = call)
  }
  x
}

# Non-negative weights, one per client, not all zero. Returns doubles.
# Named weights are matched to named clients by name.
assert_weights <- function(weights, n_clients, arg = rlang::caller_arg(weights),
                           call = rlang::caller_env(), client_names = NULL) {
  force(arg)
  if (is.null(weights)) return(NULL)
  if (!is.numeric(weights)) {
    fedagg_abort("{.arg {arg}} must be numeric, not {obj_desc(weights)}.", call = call)
  }
  if (!is.null(names(weights)) && !is.null(client_names) && !identical(names(weights), client_names)) {
    if (anyDuplicated(names(weights)) || !setequal(names(weights), client_names) || length(weights) != n_clients) {
      fedagg_abort(c("{.arg {arg}} must be named like the clients.",
                     x = "Its names are {.val {utils::head(names(weights), 5)}}; the clients are {.val {utils::head(client_names, 5)}}."),
                   call = call)
    }
    weights <- weights[client_names]
  }
  if (length(weights) != n_clients) {
    fedagg_abort(c("{.arg {arg}} must have one value per client.",
                   x = "It has length {length(weights)}, there are {n_clients} client{?s}."),
                 call = call)
  }
  bad <- which(is.na(weights) | !is.finite(weights) | weights < 0)
  if (length(bad)) {
    k <- bad[1]
    fedagg_abort(c("{.arg {arg}} must be finite and >= 0.",
                   x = "Client {k} has weight {weights[k]}."),
                 class = "client", client = k, call = call)
  }
  if (sum(weights) <= 0) {
    fedagg_abort("{.arg {arg}} must not all be zero.", call = call)
  }
  as.double(weights)
}

# Requests above this are mistakes, not machines; the Rust core also never
# runs more threads than there are cores (results do not depend on it).
max_threads <- 1024L

# NULL (option `fedagg.threads`, else all cores) or a whole number in
# 1..max_threads. Returns an integer for Rust, where 0 means all cores.
resolve_threads <- function(threads, arg = rlang::caller_arg(threads), call = rlang::caller_env()) {
  from_option <- is.null(threads)
  if (from_option) {
    threads <- getOption("fedagg.threads")
    if (is.null(threads)) return(0L)
  }
  ok <- is.numeric(threads) && length(threads) == 1L && !is.na(threads) && threads == round(threads) &&
    threads >= 1 && threads <= max_threads
  if (!ok) {
    # Formatted only here: this check runs on every kernel call.
    what <- if (from_option) cli::format_inline("The option {.code fedagg.threads}") else cli::format_inline("{.arg {arg}}")
    fedagg_abort("{what} must be a whole number from 1 to {max_threads}, not {obj_desc(threads)}.", call = call)
  }
  as.integer(threads)
}

# Refuses a buffer R is about to allocate from user input when it cannot fit
# in the memory available now (the same rule as the Rust core's buffers):
# a classed error instead of "vector memory exhausted" or the OOM killer.
check_memory <- function(bytes, what, call = rlang::caller_env()) {
  call_rust(rs_check_memory(as.double(bytes), what), call = call)
  invisible()
}

obj_desc <- function(x) {
  if (is.null(x)) return("NULL")
  if (is.function(x)) return("a function")
  if (is.atomic(x) && length(x) == 1L && !is.object(x)) {
    if (is.na(x)) return("NA")
    return(switch(typeof(x),
      character = paste("the string", encodeString(x, quote = "\"")),
      logical = format(x),
      paste("the number", format(x))
    ))
  }
  what <- if (is.object(x)) paste("a", class(x)[1]) else {
    type <- switch(typeof(x), double = "double", integer = "integer", typeof(x))
    noun <- if (is.list(x)) "list" else paste(type, "vector")
    if (is.list(x)) "a list" else paste(if (grepl("^[aeiou]", type)) "an" else "a", noun)
  }
  paste0(what, " of length ", length(x))
}

# Every argument without a default of the calling function must be given:
# the error names them, classed, instead of base R's "argument is missing"
# from deep inside the function.
check_required_args <- function(required = NULL, env = parent.frame()) {
  if (is.null(required)) {
    fmls <- formals(sys.function(sys.parent()))
    required <- names(fmls)[vapply(fmls, function(f) is.symbol(f) && !nzchar(as.character(f)), logical(1))]
    required <- setdiff(required, "...")
  }
  absent <- required[vapply(required, function(a) eval(call("missing", as.name(a)), env), logical(1))]
  if (length(absent)) {
    fedagg_abort("{.arg {absent}} {?is/are} missing, with no default.", call = env)
  }
  invisible()
}

# A positive amount that may be Inf (a timeout, a count of attempts).
assert_limit <- function(x, arg = rlang::caller_arg(x), call = rlang::caller_env()) {
  if (!is.numeric(x) || length(x) != 1L || is.na(x) || x <= 0) {
    fedagg_abort("{.arg {arg}} must be one positive number (or Inf), not {obj_desc(x)}.", call = call)
  }
  as.double(x)
}
