# The client log: one row per client per round. Every schedule (synchronous,
# FedBuff, hierarchical, an empty round) builds its rows with
# client_log_rows(), so the schema is written once, here.
#
# Columns (documented for users in Server's `client_log` field):
#   round, client       the round and the node id
#   n_samples, epochs, steps, train_loss
#                       what the client reported of its local work
#   val_loss, val_metric
#                       the trained model on the client's validation data
#                       (NA when not computed)
#   weight              its aggregation weight
#   update_norm, cosine ||Delta_i|| as the server received it, and its cosine
#                       with the round's aggregate (NA when not computed)
#   malicious           the node simulates an attack
#   passed_filter       its update passed the norm filter (TRUE without one)
#   filter_reason       why the filter dropped it ("" when it passed)
#   clipped             its norm exceeded the clipping bound (NA: no clipping,
#                       or dropped by the filter)
#   krum_kept           picked by a Krum-type rule (Krum, Multi-Krum, Bulyan;
#                       NA for other aggregators)
client_log_columns <- c("round", "client", "n_samples", "epochs", "steps", "train_loss", "val_loss", "val_metric",
                        "weight", "update_norm", "cosine", "malicious", "passed_filter", "filter_reason", "clipped",
                        "krum_kept")

# One round's rows, without the round (added at the commit). Columns not
# given take their "not computed" value.
client_log_rows <- function(client, n_samples = NA_real_, epochs = NA_real_, steps = NA_real_, train_loss = NA_real_,
                            val_loss = NA_real_, val_metric = NA_real_, weight = NA_real_, update_norm = NA_real_,
                            cosine = NA_real_, malicious = FALSE, passed_filter = TRUE, filter_reason = "",
                            clipped = NA, krum_kept = NA) {
  k <- length(client)
  num <- function(x) rep_len(as.double(x), k)
  flag <- function(x) rep_len(as.logical(x), k)
  list(client = as.character(client), n_samples = num(n_samples), train_loss = num(train_loss),
       val_loss = num(val_loss), val_metric = num(val_metric), weight = num(weight), epochs = num(epochs),
       steps = num(steps), update_norm = num(update_norm), cosine = num(cosine), malicious = flag(malicious),
       passed_filter = flag(passed_filter), filter_reason = rep_len(as.character(filter_reason), k),
       clipped = flag(clipped), krum_kept = flag(krum_kept))
}

# The committed rounds' rows as a data frame.
client_log_frame <- function(entries) {
  if (!length(entries)) entries <- list(c(list(round = integer()), client_log_rows(character())))
  # Rounds kept by servers saved before the columns were renamed.
  legacy <- c(passed_filter = "kept", krum_kept = "selected")
  out <- lapply(stats::setNames(client_log_columns, client_log_columns), function(col) {
    unlist(lapply(entries, function(entry) {
      value <- entry[[col]]
      if (is.null(value) && col %in% names(legacy)) value <- entry[[legacy[[col]]]]
      rep_len(value %||% NA, length(entry$client))
    }))
  })
  # The closures above keep this frame: without its reference to the
  # server's log, the next round appends in place (see round_body()).
  rm(entries)
  out$round <- as.integer(out$round)
  out$client <- as.character(out$client)
  as.data.frame(out, stringsAsFactors = FALSE)
}

# The system log's entries (one per round) as a data frame. A function of
# its own so that no closure keeps the log: the next round appends to it in
# place.
system_log_frame <- function(rows) {
  if (!length(rows)) {
    return(new_frame(round = integer(), client = character(), status = character(), download = numeric(),
                     compute = numeric(), upload = numeric(), finish = numeric(), work = numeric(),
                     staleness = numeric()))
  }
  do.call(new_frame, lapply(stats::setNames(names(rows[[1]]), names(rows[[1]])),
                            function(col) unlist(lapply(rows, `[[`, col), use.names = FALSE)))
}
