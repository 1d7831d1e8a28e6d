# The registry of parts: one row per kind of every lever, with what the
# round needs to know of it:
#   type, kind   the lever and its kind (the `kind` of the part's object)
#   side         "client" (runs where the node is: it changes what a client
#                computes or sends) or "server"
#   sync, fedbuff, hierarchical
#                the schedules it works in (a schedule refuses the others,
#                by name, instead of ignoring them)
#   all_updates  the server must keep every update of a round (a filter or a
#                robust rule needs them all; the others fold as they come)
#   rust         the name of its Rust spec (NA: computed in R)
#
# A new lever kind adds a row here; the schedules' compatibility checks and
# the Rust names are lookups in this table, and a kind it does not list is
# an error wherever it is looked up.
lever_registry <- local({
  row <- function(type, kind, side, sync = TRUE, fedbuff = FALSE, hierarchical = FALSE, all_updates = FALSE,
                  rust = kind, networked = TRUE) {
    data.frame(type = type, kind = kind, side = side, sync = sync, fedbuff = fedbuff, hierarchical = hierarchical,
               all_updates = all_updates, rust = rust, networked = networked, stringsAsFactors = FALSE)
  }
  rbind(
    row("algorithm", "fedavg", "client", fedbuff = TRUE, hierarchical = TRUE),
    row("algorithm", "fedsgd", "client", rust = "fedavg"),
    row("algorithm", "fedprox", "client", fedbuff = TRUE, hierarchical = TRUE),
    row("algorithm", "scaffold", "client"),
    row("algorithm", "fednova", "client"),
    row("algorithm", "custom", "client", rust = "fedavg", networked = FALSE),
    row("aggregator", "weighted", "server", fedbuff = TRUE, hierarchical = TRUE),
    row("aggregator", "median", "server", all_updates = TRUE),
    row("aggregator", "trimmed_mean", "server", all_updates = TRUE),
    row("aggregator", "krum", "server", all_updates = TRUE),
    row("aggregator", "multi_krum", "server", all_updates = TRUE),
    row("aggregator", "geometric_median", "server", all_updates = TRUE),
    row("aggregator", "bulyan", "server", all_updates = TRUE),
    row("selection", "uniform", "server", fedbuff = TRUE, hierarchical = TRUE, rust = NA),
    row("selection", "by_size", "server", hierarchical = TRUE, rust = NA),
    row("selection", "poisson", "server", hierarchical = TRUE, rust = NA),
    row("selection", "power_of_choice", "server", hierarchical = TRUE, rust = NA),
    row("selection", "score", "server", hierarchical = TRUE, rust = NA),
    row("selection", "custom", "server", hierarchical = TRUE, rust = NA),
    row("server_optimizer", "sgd", "server", fedbuff = TRUE, hierarchical = TRUE),
    row("server_optimizer", "adagrad", "server", fedbuff = TRUE, hierarchical = TRUE),
    row("server_optimizer", "adam", "server", fedbuff = TRUE, hierarchical = TRUE),
    row("server_optimizer", "yogi", "server", fedbuff = TRUE, hierarchical = TRUE),
    row("server_optimizer", "custom", "server", fedbuff = TRUE, hierarchical = TRUE, rust = NA),
    row("compressor", "topk", "client"),
    row("compressor", "random_k", "client"),
    row("compressor", "quantize", "client"),
    row("compressor", "float16", "client"),
    row("privacy", "central", "server"),
    row("privacy", "local", "client", rust = "local_dp"),
    row("filter", "norm", "server", all_updates = TRUE),
    row("clip", "norm", "server"),
    row("attack", "sign_flip", "client", fedbuff = TRUE, hierarchical = TRUE),
    row("attack", "scale", "client", fedbuff = TRUE, hierarchical = TRUE),
    row("attack", "gaussian", "client", fedbuff = TRUE, hierarchical = TRUE),
    row("attack", "same_value", "client", fedbuff = TRUE, hierarchical = TRUE),
    row("attack", "label_flip", "client", fedbuff = TRUE, hierarchical = TRUE, rust = NA)
  )
})

# The registry's rows as lists keyed "type/kind": a lookup in a round costs
# a hash, not a data frame subset.
lever_index <- local({
  rows <- lapply(seq_len(nrow(lever_registry)), function(i) as.list(lever_registry[i, ]))
  stats::setNames(rows, paste(lever_registry$type, lever_registry$kind, sep = "/"))
})

# The registry's row of a part (a list); an unknown kind is an error, never
# a default.
lever_part <- function(type, kind, call = rlang::caller_env()) {
  row <- lever_index[[paste(type, kind, sep = "/")]]
  if (is.null(row)) {
    fedagg_abort("The {type} {.val {kind}} is not in fedagg's registry of parts.", class = "input", call = call)
  }
  row
}

# The parts a server is made of, as (type, kind, label) rows.
server_parts <- function(private) {
  parts <- list(
    list("algorithm", private$.algorithm$kind, private$.algorithm$label),
    list("aggregator", private$.aggregator$kind, private$.aggregator$label),
    list("selection", private$.selection$kind, private$.selection$label),
    list("server_optimizer", private$.server_opt$kind, private$.server_opt$label),
    if (!is.null(private$.compress)) list("compressor", private$.compress$kind, private$.compress$label),
    if (!is.null(private$.privacy)) list("privacy", private$.privacy$kind, private$.privacy$label),
    if (!is.null(private$.filter)) list("filter", "norm", private$.filter$label),
    if (!is.null(private$.clip)) list("clip", "norm", private$.clip$label)
  )
  parts <- Filter(Negate(is.null), parts)
  data.frame(type = vapply(parts, `[[`, "", 1), kind = vapply(parts, `[[`, "", 2),
             label = vapply(parts, `[[`, "", 3), stringsAsFactors = FALSE)
}

# The first of a server's parts that `schedule` ("fedbuff", "hierarchical",
# "networked") does not support: its label, or NULL.
unsupported_part <- function(private, schedule) {
  parts <- server_parts(private)
  for (i in seq_len(nrow(parts))) {
    if (!isTRUE(lever_part(parts$type[i], parts$kind[i])[[schedule]])) return(parts$label[i])
  }
  NULL
}
