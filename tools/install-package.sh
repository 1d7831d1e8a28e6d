#!/usr/bin/env bash
# Installs fedagg from this checkout into the first writable library, making
# the user library when there is none (as R's install.packages() offers to).
set -euo pipefail
R=${R:-R}
lib=$(Rscript -e 'w <- .libPaths()[file.access(.libPaths(), 2) == 0]; cat(if (length(w)) w[1] else "")')
if [ -z "$lib" ]; then
  lib=$(Rscript -e 'cat(path.expand(Sys.getenv("R_LIBS_USER")))')
  mkdir -p "$lib"
  echo "Installing into the user library $lib"
fi
"$R" CMD INSTALL --no-multiarch --library="$lib" .
