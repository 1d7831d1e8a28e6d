#' fedagg: federated learning with a Rust core
#'
#' fedagg aggregates, clips, privatises and monitors client updates with
#' kernels written in Rust, and (in later versions) simulates whole
#' federations. The numeric building blocks are:
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
"_PACKAGE"
