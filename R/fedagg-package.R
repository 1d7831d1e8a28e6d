#' fedagg: federated learning with a Rust core
#'
#' fedagg simulates federated learning with a Rust core, and aggregates,
#' clips, privatises and monitors client updates.
#'
#' * Data: [partition_iid()], [partition_dirichlet()], [partition_shards()],
#'   [partition_quantity()], [synthetic_fedprox()], [read_idx()],
#'   [load_fashion_mnist()].
#' * Simulation: [model_softmax()] and the other [models], [fed_nodes()],
#'   [fed_server()] ([Node], [Server]), [fed_history] and [fed_compare()].
#'
#' The numeric building blocks are:
#'
#' * [weighted_aggregate()] and [robust_aggregate()] combine client updates;
#' * [clip_update()] and [update_norms()] bound and monitor update sizes;
#' * [gaussian_noise_sd()] and [add_gaussian_noise()] calibrate and add
#'   differential-privacy noise;
#' * [ks_test()] and [ks_drift()] detect distribution drift between clients
#'   or rounds.
#'
#' @section Client updates:
#' Every kernel takes client updates in one of three shapes: a list of numeric
#' vectors or arrays (one per client), a numeric matrix with one column per
#' client, or a list of per-client named lists of arrays (the layers of a
#' model, such as `list(W1 = <matrix>, b1 = <vector>)`). Results have the
#' shape of one client's update.
#'
#' @section Threads:
#' Kernels run on `threads` threads: the argument of each call, else the
#' option `fedagg.threads`, else all cores. Results are identical whatever
#' the number of threads. See [fedagg_threads()].
#'
#' @keywords internal
#' @useDynLib fedagg, .registration = TRUE
#' @importFrom rlang .data
#' @importFrom R6 R6Class
#' @importFrom utils tail
"_PACKAGE"
