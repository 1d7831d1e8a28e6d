# Identities of a networked federation: Ed25519 key pairs for the server
# and every node, the allow-list of nodes, and TLS certificates.

#' Make a key pair for a node or a server
#'
#' @description
#' Every node of a networked federation, and its server, has its own
#' Ed25519 key pair. `fed_keygen()` writes the private key to `path`
#' (PKCS#8 PEM, readable only by its owner: mode 0600) and returns the
#' public key, a one-line text such as `"ed25519:3q2+7w..."` to give to the
#' other side: a node's goes into the server's allow-list (see
#' [fed_remote_nodes()]), the server's to every node ([fed_join()]'s
#' `server_key`). The private key never leaves its machine.
#'
#' `fed_public_key()` reads the public key back from a private key file.
#'
#' @param path File for the private key.
#' @param overwrite Replace an existing file? (`FALSE`: an error, so that
#'   a key in use is never lost by accident.)
#' @return `fed_keygen()`: the public key, invisibly (and printed);
#'   `fed_public_key()`: the public key.
#' @examples
#' dir <- tempfile("keys")
#' dir.create(dir)
#' pub <- fed_keygen(file.path(dir, "site-a.key"))
#' identical(fed_public_key(file.path(dir, "site-a.key")), pub)
#' @export
fed_keygen <- function(path, overwrite = FALSE) {
  check_required_args()
  path <- assert_path(path)
  assert_flag(overwrite)
  if (!dir.exists(dirname(path))) {
    fedagg_abort("Cannot write {.file {path}}: its directory {.file {dirname(path)}} does not exist.", class = "missing_file")
  }
  if (file.exists(path) && !overwrite) {
    fedagg_abort(c("{.file {path}} exists; a key in use is never replaced by accident.",
                   i = "Use {.code overwrite = TRUE} to replace it."))
  }
  pair <- call_rust(rs_net_keygen())
  write_atomic(path, charToRaw(pair$private), private = TRUE)
  cli::cli_inform(c(v = "Wrote the private key {.file {path}} (mode 0600).", i = "Public key: {.val {pair$public}}"))
  invisible(pair$public)
}

#' @rdname fed_keygen
#' @export
fed_public_key <- function(path) {
  check_required_args()
  call_rust(rs_net_public_key(read_pem(path, "private key")))
}

#' Make a teaching CA and a server certificate
#'
#' @description
#' Writes, in `dir`, a certificate authority (`ca.pem`) and a server
#' certificate (`server.pem`) with its key (`server-key.pem`, mode 0600)
#' for the given host names and addresses. The server serves with
#' `tls = fed_tls_selfsigned(dir)` (or the two file paths), and nodes trust
#' it with `ca = "ca.pem"`. Meant for teaching and tests: a real
#' federation uses certificates from its institutions.
#'
#' @param dir Directory for the three files (created if needed).
#' @param hosts Names and IP addresses the server is reached by.
#' @return A `fed_tls` list of the paths `cert`, `key` and `ca`,
#'   invisibly.
#' @examples
#' tls <- fed_tls_selfsigned(tempfile("tls"))
#' tls
#' @export
fed_tls_selfsigned <- function(dir, hosts = c("localhost", "127.0.0.1", "::1")) {
  check_required_args()
  dir <- assert_path(dir, "dir")
  if (!is.character(hosts) || !length(hosts) || anyNA(hosts) || any(!nzchar(hosts))) {
    fedagg_abort("{.arg hosts} must be host names or IP addresses, not {obj_desc(hosts)}.")
  }
  dir.create(dir, recursive = TRUE, showWarnings = FALSE)
  made <- call_rust(rs_net_tls_selfsigned(hosts))
  out <- fed_tls(file.path(dir, "server.pem"), file.path(dir, "server-key.pem"), file.path(dir, "ca.pem"), check = FALSE)
  write_atomic(out$ca, charToRaw(made$ca))
  write_atomic(out$cert, charToRaw(made$cert))
  write_atomic(out$key, charToRaw(made$key), private = TRUE)
  invisible(out)
}

#' TLS settings of a server
#'
#' @param cert,key PEM files of the server's certificate chain and its
#'   private key.
#' @param ca The CA certificate nodes trust (optional; kept for reference).
#' @param check Check that the files exist.
#' @return A `fed_tls` object for `tls` in [Server]`$serve()`.
#' @examples
#' tls <- fed_tls_selfsigned(tempfile("tls"))
#' fed_tls(tls$cert, tls$key)
#' @export
fed_tls <- function(cert, key, ca = NULL, check = TRUE) {
  check_required_args()
  cert <- assert_path(cert, "cert")
  key <- assert_path(key, "key")
  if (!is.null(ca)) ca <- assert_path(ca, "ca")
  if (isTRUE(check)) for (f in c(cert, key)) if (!file.exists(f)) fedagg_abort("{.file {f}} does not exist.")
  structure(list(cert = cert, key = key, ca = ca), class = "fed_tls")
}

#' @export
format.fed_tls <- function(x, ...) {
  sprintf("<fed_tls> certificate %s, key %s%s", x$cert, x$key, if (is.null(x$ca)) "" else paste0(", CA ", x$ca))
}

#' @export
print.fed_tls <- function(x, ...) {
  cat(format(x), "\n", sep = "")
  invisible(x)
}

#' The allow-list of a networked federation
#'
#' @description
#' The nodes a server accepts, each with its public key: a data frame with
#' columns `node` and `public_key`. `read_authorized_keys()` reads it from
#' a CSV file with those two columns; `write_authorized_keys()` writes one.
#'
#' @param file A CSV file.
#' @param x A data frame with columns `node` and `public_key`.
#' @return `read_authorized_keys()`: the data frame; `write_authorized_keys()`:
#'   `file`, invisibly.
#' @examples
#' dir <- tempfile("keys")
#' dir.create(dir)
#' keys <- data.frame(node = c("a", "b"),
#'                    public_key = c(fed_keygen(file.path(dir, "a.key")),
#'                                   fed_keygen(file.path(dir, "b.key"))))
#' write_authorized_keys(keys, file.path(dir, "nodes.csv"))
#' read_authorized_keys(file.path(dir, "nodes.csv"))
#' @export
read_authorized_keys <- function(file) {
  check_required_args()
  file <- assert_path(file, "file")
  if (!file.exists(file)) fedagg_abort("{.file {file}} does not exist.")
  x <- tryCatch(utils::read.csv(file, colClasses = "character", strip.white = TRUE),
                error = function(e) fedagg_abort("{.file {file}} is not a CSV file.", foreign = c(x = conditionMessage(e))))
  check_authorized_keys(x, sprintf("`%s`", file))
}

#' @rdname read_authorized_keys
#' @export
write_authorized_keys <- function(x, file) {
  check_required_args()
  x <- check_authorized_keys(x, "{.arg x}")
  utils::write.csv(x, assert_path(file, "file"), row.names = FALSE)
  invisible(file)
}

check_authorized_keys <- function(x, what = "{.arg authorized_keys}", call = rlang::caller_env()) {
  if (!is.data.frame(x) || !all(c("node", "public_key") %in% names(x))) {
    fedagg_abort(paste(what, "must have the columns {.field node} and {.field public_key}."), call = call)
  }
  x <- data.frame(node = as.character(x$node), public_key = as.character(x$public_key), stringsAsFactors = FALSE)
  if (!nrow(x)) fedagg_abort(paste(what, "lists no node."), call = call)
  bad <- which(is.na(x$node) | !grepl("^[A-Za-z0-9_.:@-]{1,128}$", x$node))
  if (length(bad)) {
    fedagg_abort(c(paste(what, "has a node id fedagg cannot use in a header: {.val {x$node[bad[1]]}}."),
                   i = "Node ids are 1-128 letters, digits or {.code -_.:@}."), call = call)
  }
  dup <- x$node[duplicated(x$node)]
  if (length(dup)) fedagg_abort(paste(what, "lists node {.val {dup[1]}} twice."), call = call)
  for (i in seq_len(nrow(x))) {
    x$public_key[i] <- tryCatch(call_rust(rs_net_check_public(x$public_key[i])), fedagg_error = function(e) {
      fedagg_abort(paste(what, "has an unusable key for node {.val {x$node[i]}}."), class = "key", client = x$node[i],
                   foreign = c(x = conditionMessage(e)), call = call)
    })
  }
  x
}

# A key given as a file or as the key's text.
read_pem <- function(x, what, arg = rlang::caller_arg(x), call = rlang::caller_env()) {
  if (!is.character(x) || length(x) != 1L || is.na(x)) {
    fedagg_abort("{.arg {arg}} must be the path of a {what} file, not {obj_desc(x)}.", call = call)
  }
  if (grepl("-----BEGIN", x, fixed = TRUE)) return(x)
  if (!file.exists(x)) fedagg_abort("{.arg {arg}}: {.file {x}} does not exist.", call = call)
  paste(readLines(x, warn = FALSE), collapse = "\n")
}

# A public key given as its text ("ed25519:...") or a file holding it.
read_public <- function(x, arg = rlang::caller_arg(x), call = rlang::caller_env()) {
  if (!is.character(x) || length(x) != 1L || is.na(x)) {
    fedagg_abort("{.arg {arg}} must be a public key ({.val ed25519:...}) or a file holding one, not {obj_desc(x)}.", call = call)
  }
  text <- if (startsWith(x, "ed25519:")) x else if (file.exists(x)) trimws(readLines(x, n = 1L, warn = FALSE)) else {
    fedagg_abort("{.arg {arg}} is neither a public key ({.val ed25519:...}) nor a file.", call = call)
  }
  tryCatch(call_rust(rs_net_check_public(text)), fedagg_error = function(e) {
    fedagg_abort("{.arg {arg}} is not a usable public key.", class = "key", foreign = c(x = conditionMessage(e)), call = call)
  })
}

assert_path <- function(x, arg = rlang::caller_arg(x), call = rlang::caller_env()) {
  if (!is.character(x) || length(x) != 1L || is.na(x) || !nzchar(x)) {
    fedagg_abort("{.arg {arg}} must be a file path, not {obj_desc(x)}.", call = call)
  }
  path.expand(x)
}

# A whole file or nothing: temporary file, fsync, rename.
write_atomic <- function(path, bytes, private = FALSE) {
  call_rust(rs_net_write_atomic(path, bytes, private))
}
