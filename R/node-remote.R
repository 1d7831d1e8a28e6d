#' Nodes of a networked federation, as the server sees them
#'
#' @description
#' A server that serves a real federation ([Server]`$serve()`) holds no
#' data: its nodes are `RemoteNode`s, one per entry of the allow-list,
#' each with the node's id and public key. A remote node joins from its own
#' R session with [fed_join()] and tells the server how many samples it
#' holds; until then it is never selected. Its data, its training and its
#' own state stay on its side.
#'
#' @param authorized_keys The allow-list: a CSV file or a data frame with
#'   columns `node` and `public_key` (see [read_authorized_keys()]).
#' @return `fed_remote_nodes()`: a named list of `RemoteNode`s, for
#'   [fed_server()]'s `nodes`.
#' @details
#' Classification models served over the network name their classes
#' (`classes =` in [model_softmax()] and the like) unless every node's
#' labels are class codes: the server cannot see the nodes' labels to make
#' the union of their levels.
#' @examples
#' dir <- tempfile("keys")
#' dir.create(dir)
#' keys <- data.frame(node = "site-a", public_key = fed_keygen(file.path(dir, "a.key")))
#' nodes <- fed_remote_nodes(keys)
#' nodes[[1]]
#' @export
fed_remote_nodes <- function(authorized_keys) {
  check_required_args()
  keys <- if (is.character(authorized_keys)) read_authorized_keys(authorized_keys) else check_authorized_keys(authorized_keys)
  nodes <- Map(function(id, key) RemoteNode$new(id, key), keys$node, keys$public_key)
  stats::setNames(unname(nodes), keys$node)
}

#' @rdname fed_remote_nodes
#' @export
RemoteNode <- R6::R6Class("RemoteNode",
  inherit = Node,
  cloneable = TRUE,
  public = list(
    #' @description A node known by its id and public key.
    #' @param id The node's id.
    #' @param public_key Its Ed25519 public key (`"ed25519:..."`).
    initialize = function(id, public_key) {
      if (!is.character(id) || length(id) != 1L || is.na(id) || !grepl("^[A-Za-z0-9_.:@-]{1,128}$", id)) {
        fedagg_abort("{.arg id} must be 1-128 letters, digits or {.code -_.:@}, not {obj_desc(id)}.")
      }
      private$.id <- id
      private$.public_key <- read_public(public_key)
      invisible(self)
    },
    #' @description Not here: a remote node trains in its own process.
    #' @param ... Unused.
    train = function(...) remote_only(private$.id, "trains"),
    #' @description Not here: a remote node evaluates in its own process.
    #' @param ... Unused.
    evaluate = function(...) remote_only(private$.id, "evaluates"),
    #' @description Not here: a remote node's data stay on its side.
    #' @param ... Unused.
    set_data = function(...) remote_only(private$.id, "holds its data"),
    #' @description Not here: drift is measured where the data are.
    #' @param ... Unused.
    data_drift = function(...) remote_only(private$.id, "measures its drift"),
    #' @description Nothing to check before the node joins: it checks the
    #'   model against its own data.
    #' @param model Unused.
    check_model = function(model) invisible(self),
    #' @description Not here: a remote node's data stay on its side.
    #' @param model,split Unused.
    data_for = function(model, split = "train") remote_only(private$.id, "holds its data"),
    #' @description Internal: what the node said when it joined.
    #' @param info A list with `n_samples`, `has_validation`,
    #'   `label_levels`, `data_version`.
    joined = function(info) {
      if (!identical(private$.info, info)) {
        private$.info <- info
        note_node_change()
      }
      invisible(self)
    },
    #' @description A one-line description.
    #' @param ... Unused.
    format = function(...) {
      what <- if (is.null(private$.info)) "not joined" else sprintf("joined with %s samples", format(private$.info$n_samples))
      sprintf("<RemoteNode> %s: %s", private$.id, what)
    }
  ),
  active = list(
    #' @field n_samples Training samples the node reported (`NA` before it
    #'   joined).
    n_samples = function(value) {
      if (!missing(value)) fedagg_abort("{.field n_samples} is read-only.")
      private$.info$n_samples %||% NA_real_
    },
    #' @field n_features Unknown to the server (`NA`).
    n_features = function(value) {
      if (!missing(value)) fedagg_abort("{.field n_features} is read-only.")
      NA_integer_
    },
    #' @field has_validation Whether the node reported validation data.
    has_validation = function(value) {
      if (!missing(value)) fedagg_abort("{.field has_validation} is read-only.")
      isTRUE(private$.info$has_validation)
    },
    #' @field label_levels `NULL`: the server does not see the nodes'
    #'   labels (name the classes in the model).
    label_levels = function(value) {
      if (!missing(value)) fedagg_abort("{.field label_levels} is read-only.")
      NULL
    },
    #' @field label_counts Not known to the server (`NULL`).
    label_counts = function(value) {
      if (!missing(value)) fedagg_abort("{.field label_counts} is read-only.")
      NULL
    },
    #' @field data_version The data version the node reported.
    data_version = function(value) {
      if (!missing(value)) fedagg_abort("{.field data_version} is read-only.")
      as.integer(private$.info$data_version %||% 0L)
    },
    #' @field attack Always `NULL`: a real node's behaviour is its own.
    attack = function(value) {
      if (missing(value)) return(NULL)
      fedagg_abort("Node {.val {private$.id}} is remote: an attack is simulated on a {.cls Node} holding data, not set from the server.",
                   class = "remote_node", client = private$.id)
    },
    #' @field public_key The node's public key.
    public_key = function(value) {
      if (!missing(value)) fedagg_abort("{.field public_key} is read-only.")
      private$.public_key
    },
    #' @field info What the node said when it joined (`NULL` before).
    info = function(value) {
      if (!missing(value)) fedagg_abort("{.field info} is read-only.")
      private$.info
    }
  ),
  private = list(
    .public_key = NULL,
    .info = NULL
  )
)

remote_only <- function(id, what) {
  fedagg_abort(c("Node {.val {id}} is remote: it {what} in its own process.", i = "See {.fn fed_join}."),
               class = "remote_node", client = id)
}

is_remote_node <- function(n) inherits(n, "RemoteNode")
