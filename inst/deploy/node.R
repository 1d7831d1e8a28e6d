# A node's entry point (a site's machine or a container): joins the
# federation with this site's data. Configured by environment variables:
#   FEDAGG_NODE_ID           the node's id (as in the server's authorized keys)
#   FEDAGG_NODE_DATA         an .rds file of list(x = <matrix>, y = <labels>)
#   FEDAGG_NODE_KEY          the node's private key file (fed_keygen())
#   FEDAGG_SERVER_URL        https://host:port of the coordinator
#   FEDAGG_SERVER_PUBLIC_KEY the server's public key ("ed25519:...") or a file holding it
#   FEDAGG_CA                the CA certificate that signed the server's certificate
#   FEDAGG_CONFIG            the federation's configuration file (for its model)
#   FEDAGG_NODE_STATE_DIR    where the node keeps its state across restarts
#
#   Rscript node.R
suppressPackageStartupMessages(library(fedagg))
env <- function(name, default = NULL) {
  value <- Sys.getenv(name, "")
  if (nzchar(value)) return(value)
  if (is.null(default)) stop(sprintf("the environment variable %s is not set", name), call. = FALSE)
  default
}
data <- readRDS(env("FEDAGG_NODE_DATA"))
node <- fed_node(data$x, data$y, id = env("FEDAGG_NODE_ID"))
config <- fed_config(env("FEDAGG_CONFIG", "/etc/fedagg/config/config.yaml"))
ca <- env("FEDAGG_CA", "")
fed_join(node, env("FEDAGG_SERVER_URL"), config$model, key = env("FEDAGG_NODE_KEY"),
         server_key = env("FEDAGG_SERVER_PUBLIC_KEY"), ca = if (nzchar(ca)) ca,
         state_dir = env("FEDAGG_NODE_STATE_DIR", "fedagg-state"), verbose = TRUE)
