# fedagg developer and user entry points. Quick start (fresh Debian 12 with Rust):
#   make demo   set up, install, run the demo
#   make test   set up, install, cargo test + testthat + R CMD build/check
SHELL := /bin/bash
R ?= R
RSCRIPT ?= Rscript

# Every R dependency comes from Debian (CRAN is not needed).
APT_PACKAGES := r-base-dev r-cran-r6 r-cran-cli r-cran-rlang \
	r-cran-testthat r-cran-withr r-cran-roxygen2 r-cran-knitr r-cran-rmarkdown \
	r-cran-ggplot2 r-cran-future r-cran-future.apply r-cran-nnet r-cran-callr r-cran-openssl r-cran-processx r-cran-yaml \
	r-cran-shiny r-cran-png r-cran-curl chromium chromium-driver \
	dataset-fashion-mnist \
	pandoc qpdf

.PHONY: deps install demo test cargo-test wrappers document bench check-env

deps:
	@bash tools/install-deps.sh $(APT_PACKAGES)

install: deps
	@bash tools/install-package.sh

demo: install
	$(RSCRIPT) inst/scripts/demo.R

test: install
	@bash tools/run-tests.sh

cargo-test:
	cargo test --manifest-path src/rust/Cargo.toml -p fedagg-core -p fedagg-net

# After changing an #[extendr] signature.
wrappers: deps
	$(RSCRIPT) tools/make-wrappers.R

# After changing roxygen comments.
# (R6 documentation needs the source references kept at install time.)
document: deps
	R_KEEP_PKG_SOURCE=yes bash tools/install-package.sh
	$(RSCRIPT) -e 'roxygen2::roxygenise(load_code = "installed")'

bench: install
	$(RSCRIPT) bench/aggregate.R
	$(RSCRIPT) bench/simulation.R
	$(RSCRIPT) bench/convergence.R
