#' Client selection: who trains in a round
#'
#' @description
#' Each round a server first finds which nodes are reachable (a node
#' created with `availability = p` is reachable with probability `p`, drawn
#' from the server's seed and the round), then asks its selection rule for
#' the round's clients among them. `m = max(min_clients, floor(fraction *
#' n_nodes))` is the number wanted; fewer are picked when fewer are
#' reachable.
#'
#' * `select_uniform()`: `m` reachable nodes uniformly without replacement
#'   (McMahan et al. 2017).
#' * `select_by_size()`: `m` nodes without replacement, with probability
#'   proportional to their number of training samples.
#' * `select_poisson(q)`: every reachable node independently with
#'   probability `q` (the sampling that privacy accounting assumes); the
#'   number of clients varies, and a round that samples nobody leaves the
#'   model unchanged.
#' * `select_power_of_choice(d)`: Power-of-choice (Cho et al. 2022): `d`
#'   candidates drawn without replacement with probability proportional to
#'   their size, then the `m` with the highest local loss at the current
#'   global model.
#' * `select_score(similarity, volume, availability, explore)`: a
#'   contribution score per reachable node, `similarity * cos(last update of
#'   the node, last global update) + volume * n / max(n) + availability *
#'   (share of rounds the node was reachable)` (a node that never trained
#'   counts its cosine as 0); the `m - e` best are picked, and `e =
#'   round(explore * m)` more uniformly among the rest, so new nodes get a
#'   score.
#'
#' `server$selection_log` records, per round, the candidates with their
#' scores (the loss for power-of-choice) and which were picked.
#'
#' @section Writing your own:
#' A `function(round, n, clients)` is a selection rule: `clients` is a data
#' frame of `id`, `n_samples`, `available` (reachable this round) and
#' `reach_share`; it returns the ids (or positions) of the round's clients,
#' all of them reachable.
#'
#' @param q Sampling probability of each node, in (0, 1].
#' @param d Number of candidates, at least the clients per round.
#' @param similarity,volume,availability Weights of the three parts of the
#'   score, `>= 0`.
#' @param explore Share of picks drawn uniformly among the nodes not picked
#'   by score, in `[0, 1]`.
#' @return A `fed_selection`.
#' @references Cho, Y. J., Wang, J., & Joshi, G. (2022). Towards
#'   understanding biased client selection in federated learning. AISTATS.
#' @examples
#' select_power_of_choice(d = 10)
#' data <- synthetic_fedprox(1, 1, n_clients = 20, seed = 1)
#' srv <- fed_server(model_softmax(60, 10), fed_nodes(data), fraction = 0.2,
#'                   selection = select_power_of_choice(d = 8), lr = 0.05, seed = 1)
#' srv$fit(2, verbose = FALSE)
#' head(srv$selection_log)
#' @name selection
NULL

new_selection <- function(kind, label, select, needs = character(), settings = list()) {
  structure(list(kind = kind, label = label, select = select, needs = needs, settings = settings),
            class = c("fed_selection", "fed_part"))
}

#' @rdname selection
#' @export
select_uniform <- function() {
  new_selection("uniform", "uniform", function(ctx) {
    avail <- which(ctx$clients$available)
    m <- min(ctx$n, length(avail))
    picked <- if (length(avail) == length(ctx$clients$id)) {
      # The draw of fedagg 0.1, kept so that runs with every node reachable replay.
      sorted_positions(with_seed(ctx$seed, sample.int(length(avail), m)), length(avail))
    } else {
      sorted_positions(with_seed(ctx$seed, avail[sample.int(length(avail), m)]), length(ctx$clients$id))
    }
    ctx$clients$id[picked]
  })
}

#' @rdname selection
#' @export
select_by_size <- function() {
  new_selection("by_size", "proportional to size", function(ctx) {
    avail <- which(ctx$clients$available)
    m <- min(ctx$n, length(avail))
    picked <- with_seed(ctx$seed, draw_weighted(avail, ctx$clients$n_samples[avail], m))
    ctx$clients$id[sort(picked)]
  })
}

#' @rdname selection
#' @export
select_poisson <- function(q) {
  check_required_args()
  q <- assert_number(q, 0, 1, lower_open = TRUE)
  new_selection("poisson", sprintf("Poisson (q = %s)", format(q)), settings = list(q = q), function(ctx) {
    draws <- with_seed(ctx$seed, stats::runif(length(ctx$clients$id)))
    ctx$clients$id[ctx$clients$available & draws < q]
  })
}

#' @rdname selection
#' @export
select_power_of_choice <- function(d) {
  check_required_args()
  d <- assert_count(d, min = 1L)
  new_selection("power_of_choice", sprintf("power of choice (d = %d)", d), needs = "losses", function(ctx) {
    avail <- which(ctx$clients$available)
    m <- min(ctx$n, length(avail))
    if (d < m) {
      fedagg_abort("{.fn select_power_of_choice} needs {.arg d} >= the {m} clients per round, not {d}.")
    }
    candidates <- with_seed(ctx$seed, draw_weighted(avail, ctx$clients$n_samples[avail], min(d, length(avail))))
    ids <- ctx$clients$id[candidates]
    loss <- ctx$loss(ids)
    # Highest loss first; ties go to the earlier candidate.
    picked <- ids[order(-loss, seq_along(ids))[seq_len(m)]]
    data.frame(client = ids, score = loss, picked = ids %in% picked, stringsAsFactors = FALSE)
  })
}

#' @rdname selection
#' @export
select_score <- function(similarity = 0.5, volume = 0.3, availability = 0.2, explore = 0.1) {
  similarity <- assert_number(similarity, 0)
  volume <- assert_number(volume, 0)
  availability <- assert_number(availability, 0)
  explore <- assert_number(explore, 0, 1)
  label <- sprintf("contribution score (%s similarity, %s volume, %s availability, %s explore)",
                   format(similarity), format(volume), format(availability), format(explore))
  new_selection("score", label, needs = "last_update", function(ctx) {
    cl <- ctx$clients
    avail <- which(cl$available)
    m <- min(ctx$n, length(avail))
    cosine <- ifelse(is.na(cl$last_cosine), 0, cl$last_cosine)
    score <- similarity * cosine + volume * cl$n_samples / max(cl$n_samples) + availability * cl$reach_share
    n_explore <- min(round(explore * m), m)
    by_score <- avail[order(-score[avail], avail)][seq_len(m - n_explore)]
    rest <- setdiff(avail, by_score)
    explored <- if (n_explore > 0 && length(rest)) with_seed(ctx$seed, rest[sample.int(length(rest), min(n_explore, length(rest)))])
    picked <- c(by_score, explored)
    data.frame(client = cl$id[avail], score = score[avail], picked = avail %in% picked, stringsAsFactors = FALSE)
  })
}

# Weighted draw without replacement (probability proportional to weights).
draw_weighted <- function(idx, weights, k) {
  if (k >= length(idx)) return(idx)
  idx[sample.int(length(idx), k, prob = weights)]
}

as_selection <- function(x, call = rlang::caller_env()) {
  if (inherits(x, "fed_selection")) return(x)
  if (is.function(x)) {
    fun <- x
    return(new_selection("custom", "by a custom selection", function(ctx) {
      cl <- ctx$clients[c("id", "n_samples", "available", "reach_share")]
      chosen <- call_user(fun, list(round = ctx$round, n = ctx$n, clients = cl), "The {.arg selection} function",
                          round = ctx$round)
      chosen <- check_ids(chosen, cl$id, sprintf("The `selection` function (round %d)", ctx$round), call = call)
      unreachable <- setdiff(chosen, cl$id[cl$available])
      if (length(unreachable)) {
        fedagg_abort("The {.arg selection} function (round {ctx$round}) picked unreachable node{?s} {.val {unreachable}}.",
                     class = "schedule", call = call)
      }
      chosen
    }))
  }
  name <- assert_choice(x, c("uniform", "by_size"), arg = "selection", call = call)
  switch(name, uniform = select_uniform(), by_size = select_by_size())
}
