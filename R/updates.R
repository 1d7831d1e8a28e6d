# Client updates arrive in three shapes (see ?fedagg). `as_update_set()` turns
# any of them into what the Rust core borrows without copying:
#   layers    list, one element per layer: a list of one double vector per
#             client, or a double matrix with one column per client
#   n_clients number of clients
#   template  how to give a result the shape of one client's update
#   names     client names (or NULL)

as_update_set <- function(updates, arg = rlang::caller_arg(updates), call = rlang::caller_env()) {
  if (is.matrix(updates)) return(update_set_from_matrix(updates, arg, call))
  if (!is.list(updates) || is.data.frame(updates)) {
    fedagg_abort(c("{.arg {arg}} must be a list of client updates or a matrix with one column per client.",
                   x = "It is {obj_desc(updates)}."), call = call)
  }
  if (length(updates) == 0L) {
    fedagg_abort("{.arg {arg}} must contain at least one client update; it is empty.", call = call)
  }
  set <- if (is.list(updates[[1]]) && !is.data.frame(updates[[1]])) update_set_from_layers(updates, arg, call)
         else update_set_from_vectors(updates, arg, call)
  if (sum(vapply(set$layers, function(l) if (is.list(l)) length(l[[1]]) else length(l), numeric(1))) == 0) {
    fedagg_abort("Client updates in {.arg {arg}} must have at least one value; they are empty.", call = call)
  }
  set
}

update_set_from_matrix <- function(m, arg, call) {
  if (!is.numeric(m)) {
    fedagg_abort("{.arg {arg}} must be a numeric matrix, not a {typeof(m)} one.", call = call)
  }
  if (ncol(m) == 0L) {
    fedagg_abort("{.arg {arg}} must have at least one column (client); it has none.", call = call)
  }
  if (nrow(m) == 0L) {
    fedagg_abort("{.arg {arg}} must have at least one row (value); it has none.", call = call)
  }
  if (!is.double(m)) storage.mode(m) <- "double"
  template <- list(kind = "vector", attrs = if (!is.null(rownames(m))) list(names = rownames(m)))
  list(layers = list(m), n_clients = ncol(m), template = template, names = colnames(m))
}

# Coerces one client's array to double, or explains why it cannot be.
client_array <- function(x, k, what, arg, call) {
  # A missing value typed as logical NA is still a missing number.
  if (is.logical(x) && length(x) > 0L && all(is.na(x))) storage.mode(x) <- "double"
  if (!is.numeric(x)) {
    fedagg_abort(c("Every client update in {.arg {arg}} must be numeric.",
                   x = "Client {k}{what} is {obj_desc(x)}."),
                 class = "client", client = k, call = call)
  }
  if (!is.double(x)) storage.mode(x) <- "double"
  x
}

check_same_shape <- function(x, first, k, what, arg, call) {
  if (length(x) != length(first) || !identical(dim(x), dim(first))) {
    shape <- function(a) if (is.null(dim(a))) paste("length", length(a)) else paste("dim", paste(dim(a), collapse = " x "))
    fedagg_abort(c("Client updates in {.arg {arg}} must all have the same shape.",
                   x = "Client {k}{what} has {shape(x)}, client 1 has {shape(first)}."),
                 class = "client", client = k, call = call)
  }
}

shape_attrs <- function(x) {
  a <- attributes(x)[c("dim", "dimnames", "names")]
  a[!vapply(a, is.null, logical(1))]
}

# Named coordinates are matched by name, not position: c(a = 1, b = 2) and
# c(b = 3, a = 4) average to c(a = 2.5, b = 2.5). Clients whose names differ
# from client 1's (other names, some missing, duplicates) are an error.
align_names <- function(x, first, k, what, arg, call) {
  ref <- names(first)
  if (is.null(ref) && is.null(names(x))) return(x)
  if (!is.null(dim(first)) || !is.null(dim(x))) return(x)
  if (!is.null(ref) && anyDuplicated(ref)) {
    fedagg_abort("Client 1{what} in {.arg {arg}} has duplicated names ({.val {ref[duplicated(ref)][1]}}).",
                 class = "client", client = 1L, call = call)
  }
  if (identical(names(x), ref)) return(x)
  if (is.null(ref) || is.null(names(x)) || anyDuplicated(names(x)) || !setequal(names(x), ref)) {
    show <- function(v) if (is.null(v)) "no names" else cli::format_inline("names {.val {utils::head(v, 5)}}")
    fedagg_abort(c("Client updates in {.arg {arg}} must have the same names.",
                   x = "Client {k}{what} has {show(names(x))}; client 1 has {show(ref)}."),
                 class = "client", client = k, call = call)
  }
  x[ref]
}

update_set_from_vectors <- function(updates, arg, call) {
  first <- client_array(updates[[1]], 1L, "", arg, call)
  align_names(first, first, 1L, "", arg, call)
  clients <- vector("list", length(updates))
  for (k in seq_along(updates)) {
    if (is.list(updates[[k]])) {
      fedagg_abort(c("Client updates in {.arg {arg}} must all be vectors or all be lists of layers.",
                     x = "Client {k} is a list, client 1 is not."),
                   class = "client", client = k, call = call)
    }
    x <- client_array(updates[[k]], k, "", arg, call)
    check_same_shape(x, first, k, "", arg, call)
    clients[[k]] <- align_names(x, first, k, "", arg, call)
  }
  list(layers = list(clients), n_clients = length(updates),
       template = list(kind = "vector", attrs = shape_attrs(first)), names = names(updates))
}

update_set_from_layers <- function(updates, arg, call) {
  first <- updates[[1]]
  layer_names <- names(first)
  if (length(first) == 0L) {
    fedagg_abort("Client 1 in {.arg {arg}} has no layers.", class = "client", client = 1L, call = call)
  }
  n_layers <- length(first)
  if (!is.null(layer_names) && (anyNA(layer_names) || anyDuplicated(layer_names))) {
    fedagg_abort("Client 1 in {.arg {arg}} has duplicated or missing layer names.", class = "client", client = 1L,
                 call = call)
  }
  layers <- rep(list(vector("list", length(updates))), n_layers)
  for (k in seq_along(updates)) {
    u <- updates[[k]]
    if (!is.list(u)) {
      fedagg_abort(c("Client updates in {.arg {arg}} must all be vectors or all be lists of layers.",
                     x = "Client {k} is {obj_desc(u)}, client 1 is a list."),
                   class = "client", client = k, call = call)
    }
    # Layers, too, are matched by name.
    if (!is.null(layer_names) && length(u) == n_layers && !anyDuplicated(names(u)) &&
        setequal(names(u), layer_names)) {
      u <- u[layer_names]
    }
    if (length(u) != n_layers || !identical(names(u), layer_names)) {
      describe <- function(v) if (is.null(names(v))) paste(length(v), "unnamed layers")
                              else paste(names(v), collapse = ", ")
      fedagg_abort(c("Client updates in {.arg {arg}} must all have the same layers.",
                     x = "Client {k} has {describe(u)}; client 1 has {describe(first)}."),
                   class = "client", client = k, call = call)
    }
    for (l in seq_len(n_layers)) {
      what <- paste0(", layer ", if (is.null(layer_names)) l else encodeString(layer_names[l], quote = "\""))
      x <- client_array(u[[l]], k, what, arg, call)
      first_l <- client_array(first[[l]], 1L, what, arg, call)
      check_same_shape(x, first_l, k, what, arg, call)
      layers[[l]][[k]] <- align_names(x, first_l, k, what, arg, call)
    }
  }
  template <- list(kind = "layers", names = layer_names,
                   attrs = lapply(first, shape_attrs))
  list(layers = layers, n_clients = length(updates), template = template, names = names(updates))
}

# Gives per-layer result vectors the shape of one client's update.
restore_shape <- function(values, template) {
  if (template$kind == "vector") {
    out <- values[[1]]
    attributes(out) <- template$attrs
    return(out)
  }
  out <- Map(function(v, a) { attributes(v) <- a; v }, values, template$attrs)
  names(out) <- template$names
  out
}

# Shape template of a single update (one client), with its layers for Rust.
as_single_update <- function(update, arg = rlang::caller_arg(update), call = rlang::caller_env()) {
  force(arg)
  if (is.data.frame(update) || (!is.numeric(update) && !is.logical(update) && !is.list(update))) {
    fedagg_abort("{.arg {arg}} must be a numeric vector or array, or a list of numeric layers, not {obj_desc(update)}.",
                 call = call)
  }
  set <- as_update_set(list(update), arg = arg, call = call)
  layers <- lapply(set$layers, function(l) l[[1]])
  list(layers = layers, template = set$template)
}

layer_labels <- function(set) {
  n <- length(set$layers)
  if (set$template$kind == "vector") return(NULL)
  if (is.null(set$template$names)) paste0("layer", seq_len(n)) else set$template$names
}

# Raises a client error if any update holds NA, NaN or Inf.
assert_finite_updates <- function(set, threads, arg, call) {
  loc <- call_rust(rs_find_non_finite(set$layers, set$n_clients, threads), call = call)
  if (!is.null(loc)) abort_non_finite(set, loc, arg, call)
}

abort_non_finite <- function(set, loc, arg, call) {
  k <- loc[1]
  labels <- layer_labels(set)
  where <- if (is.null(labels)) "" else paste0(", layer \"", labels[loc[2]], "\"")
  fedagg_abort(c("Client updates in {.arg {arg}} must be finite (no NA, NaN or Inf).",
                 x = "Client {k}{where} has a non-finite value at position {loc[3]}."),
               class = "client", client = k, call = call)
}
