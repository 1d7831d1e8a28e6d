# The coordinator's entry point in the container (see README.md here):
# everything comes from environment variables and the configuration file
# they name; see ?fedagg::fed_serve_env.
#
#   Rscript server.R
suppressPackageStartupMessages(library(fedagg))
fedagg::fed_serve_env()
