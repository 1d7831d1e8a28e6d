# fedagg demo: why does federated training converge slowly on non-IID data?
#
# 30 clients hold Synthetic(1, 1) data (Li et al. 2020, the FedProx paper):
# each client has its own feature distribution and its own labelling rule.
# We train softmax regression with FedAvg (10 of 30 clients per round, one
# local epoch, batch size 10) and compare with an IID variant: the very same
# samples, dealt to the 30 clients uniformly at random. Same data, same test
# set, same global objective; only how the data are spread differs. Local
# training runs in Rust, the clients of a round in parallel.
#
# It ends with fed_diagnose() on both runs: the package's own answer to
# "why is it slow?".
#
# Run: Rscript inst/scripts/demo.R [output.png]
suppressPackageStartupMessages(library(fedagg))

args <- commandArgs(trailingOnly = TRUE)
out_png <- if (length(args)) args[1] else "fedagg-demo.png"
rounds <- 100

step <- function(fmt, ...) cat(sprintf(paste0("[%s] ", fmt, "\n"), format(Sys.time(), "%H:%M:%S"), ...))

step("Generating Synthetic(1,1) data for 30 clients...")
synthetic <- synthetic_fedprox(1, 1, n_clients = 30, max_size = 2000, seed = 2026)
print(synthetic)
pooled <- pool_clients(synthetic, "train")
test_data <- pool_clients(synthetic, "test")
iid_nodes <- fed_nodes(pooled$x, pooled$y, partition_iid(nrow(pooled$x), 30, seed = 1))
clients <- list("Synthetic(1,1)" = fed_nodes(synthetic), "IID (same samples)" = iid_nodes)
top_share <- function(nodes) mean(vapply(nodes, function(n) max(prop.table(n$label_counts)), numeric(1)))
for (name in names(clients)) {
  cat(sprintf("  %-19s a client's most common label holds %2.0f%% of its data on average\n",
              name, 100 * top_share(clients[[name]])))
}

print_progress <- function(server, round, record) {
  if (round %% 20 == 0) {
    step("  round %3d/%d  train loss %.3f (spread across clients %.3f)  test accuracy %.3f",
         round, rounds, record$train_loss, record$loss_spread, record$test_accuracy)
  }
}

histories <- list()
servers <- list()
for (name in names(clients)) {
  server <- fed_server(
    model_softmax(n_features = 60, n_classes = 10),
    clients[[name]],
    fraction = 0.3, epochs = 1, batch_size = 10, lr = 0.01,
    test_data = test_data, eval_every = 5, seed = 1,
    hooks = list(round_end = print_progress)
  )
  step("FedAvg on %s: %s", name, sub("^  clients: *", "", server$format()[2]))
  histories[[name]] <- server$fit(rounds, verbose = FALSE)
  servers[[name]] <- server
}

comparison <- do.call(fed_compare, histories)
cat("\n")
print(comparison)
cat("\nloss_spread is the standard deviation of the selected clients' training losses:",
    "\non non-IID data the clients disagree, so their averaged model improves more slowly.",
    "\n(final_train_loss is each client's loss on its own data: on skewed clients it looks low",
    "\nbecause each fits its own few labels; the test loss in the plot tells the real story.)\n\n")

step("Why is it slow? The package's own answer, fed_diagnose(server):")
for (name in names(servers)) {
  d <- fed_diagnose(servers[[name]])
  cat(sprintf("\n%s:\n", name))
  # The findings above "info", or the headline when there are none.
  if (any(d$severity > "info")) print(d[d$severity > "info", ]) else cat(format(d)[1], "\n")
}
cat("\n")

step("Writing %s", out_png)
grDevices::png(out_png, width = 1100, height = 480, res = 110)
graphics::par(mfrow = c(1, 2))
plot(comparison, metric = "test_accuracy", main = "Test accuracy (FedAvg)")
plot(comparison, metric = "test_loss", main = "Test loss (FedAvg)")
invisible(grDevices::dev.off())
step("Done.")
