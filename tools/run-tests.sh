#!/usr/bin/env bash
# Runs every test: cargo test (Rust core), testthat (R, against the installed
# package), then R CMD build and R CMD check --no-manual on the tarball.
# Ends with one line "N passed, N failed" (cargo tests + testthat expectations).
set -uo pipefail
export PATH="$PATH:$HOME/.cargo/bin"
root=$(pwd)
work="$root/check"
mkdir -p "$work"
passed=0
failed=0
status=0

echo "== cargo test (fedagg-core, fedagg-net)"
cargo test --manifest-path src/rust/Cargo.toml -p fedagg-core -p fedagg-net -j 2 2>&1 | tee "$work/cargo.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
while read -r p f; do
  passed=$((passed + p)); failed=$((failed + f))
done < <(sed -n 's/^test result: .*\. \([0-9]*\) passed; \([0-9]*\) failed.*/\1 \2/p' "$work/cargo.log")

echo "== testthat"
Rscript -e '
  res <- testthat::test_local(".", load_package = "installed", stop_on_failure = FALSE,
                              reporter = testthat::ProgressReporter$new(show_praise = FALSE))
  df <- as.data.frame(res)
  failed <- sum(df$failed) + sum(df$error)
  cat(sum(df$nb) - failed, failed, "\n", file = "check/testthat.counts")
' || status=1
if [ -s "$work/testthat.counts" ]; then
  read -r p f < "$work/testthat.counts"
  passed=$((passed + p)); failed=$((failed + f))
  [ "$f" -eq 0 ] || status=1
else
  echo "testthat did not report its counts" >&2
  failed=$((failed + 1)); status=1
fi
rm -f "$work/testthat.counts"

echo "== R CMD build + check"
# Builds reuse compiled dependencies from one target directory.
export FEDAGG_CARGO_TARGET_DIR="$work/cargo-target"
export _R_CHECK_SYSTEM_CLOCK_=0
(
  cd "$work" && rm -rf fedagg.Rcheck fedagg_*.tar.gz &&
  R CMD build "$root" &&
  R CMD check --no-manual fedagg_*.tar.gz
) > "$work/check.log" 2>&1
check_rc=$?
tail -n 40 "$work/check.log"
if grep -q "^Status: OK" "$work/check.log" || grep -Eq "^Status: [0-9]+ NOTEs?$" "$work/check.log"; then
  grep -A8 "NOTE$" "$work/fedagg.Rcheck/00check.log" || true
else
  echo "R CMD check did not pass (errors or warnings, exit $check_rc); see check/check.log" >&2
  status=1
fi

echo "$passed passed, $failed failed"
exit $status
