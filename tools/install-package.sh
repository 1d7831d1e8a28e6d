#!/usr/bin/env bash
# Installs fedagg from this checkout into the first writable library, making
# the user library when there is none (as R's install.packages() offers to).
# It builds the source tarball first, so the vignettes are installed too
# (vignette("simulation", package = "fedagg")).
set -euo pipefail
R=${R:-R}
lib=$(Rscript -e 'w <- .libPaths()[file.access(.libPaths(), 2) == 0]; cat(if (length(w)) w[1] else "")')
if [ -z "$lib" ]; then
  lib=$(Rscript -e 'cat(path.expand(Sys.getenv("R_LIBS_USER")))')
  mkdir -p "$lib"
  echo "Installing into the user library $lib"
fi
root=$(pwd)
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
# One cargo target directory for the build's own install and the final one.
export FEDAGG_CARGO_TARGET_DIR="${FEDAGG_CARGO_TARGET_DIR:-$root/check/cargo-target}"
mkdir -p "$FEDAGG_CARGO_TARGET_DIR"
(cd "$build" && "$R" CMD build --no-manual "$root")
"$R" CMD INSTALL --no-multiarch --library="$lib" "$build"/fedagg_*.tar.gz
