# onnx-micronet: the commands a fresh machine needs.
#   make demo   run the main job on a bundled fixture
#   make test   run every test (creates the conformance venv in .venv and installs
#               Debian's chromium for the HTML report's render test on first use)
#   make bench  time and memory against a plain protobuf read/write and the Python tools
#   make fixtures / make fixtures-extra   regenerate the fixtures (installs PyTorch in .venv-fixtures)
#   make wheel  a Python wheel that ships the binary (pip install it), checked in a fresh venv

SHELL := /bin/bash
CARGO ?= cargo
PYTHON ?= python3
VENV := $(CURDIR)/.venv
VENV_STAMP := $(VENV)/.installed-$(shell cksum < tests/conformance/requirements.txt | cut -d' ' -f1)
BIN := target/release/onnx-micronet
DEMO_MODEL := fixtures/mobilenetv2_cifar_bn.onnx
DEMO_MNIST := fixtures/mnist_ccexam.onnx

.PHONY: demo test test-build bench fixtures fixtures-extra lint venv release clean-venv wheel browser

release:
	$(CARGO) build --release --locked

demo: release
	@echo "== inspect $(DEMO_MODEL)"
	$(BIN) inspect $(DEMO_MODEL)
	@echo "== convert (lossless round trip)"
	mkdir -p target/demo
	$(BIN) convert $(DEMO_MODEL) -o target/demo/roundtrip.onnx
	cmp $(DEMO_MODEL) target/demo/roundtrip.onnx && echo "byte-identical round trip"
	@echo "== optimize: fold BN, prune 70%, 4-bit linear weights, 8-bit activations (calibrated on"
	@echo "   the 20 foolbox MNIST digits), packed storage; accuracy on 1,000 other real digits"
	$(BIN) optimize $(DEMO_MNIST) -o target/demo/mnist_small.onnx \
	  --prune magnitude:0.7 --quantize linear:4 --act-bits 8 --act-range mse \
	  --calib fixtures/data/foolbox/mnist --data fixtures/data/mnist-digits-1000 \
	  --report target/demo/optimize.json --html target/demo/optimize.html
	@echo "== score of the written model (MicroNet, CIFAR-100 track)"
	$(BIN) score target/demo/mnist_small.onnx --markdown target/demo/score.md --json target/demo/score.json
	@echo "== the HTML report (plots: score per layer, bits, weight histograms with grids, activation"
	@echo "   ranges, per-layer errors, accuracy): target/demo/optimize.html"
	ls -l $(DEMO_MNIST) target/demo/mnist_small.onnx

$(VENV_STAMP): tests/conformance/requirements.txt
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r tests/conformance/requirements.txt
	touch $@

venv: $(VENV_STAMP)

CHROMIUM ?= /usr/bin/chromium

# Debian's Chromium for the HTML report's render test (tests/suite/html_report.rs).
browser:
	@test -x $(CHROMIUM) || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; }
	@test -x $(CHROMIUM) && $(CHROMIUM) --version 2>/dev/null

# The tests use the venv (onnx's test models, the checker, onnxruntime, Playwright)
# and Chromium, and fail, rather than skip, when either is missing.
# The test binaries compile while the venv and the browser install (both mostly
# downloads): three jobs side by side, then the tests run.
# Without incremental compilation (CARGO_INCREMENTAL=0, here only): a clean clone
# gains nothing from it, and our crate's three builds (lib, its unit tests, the
# suite) end the critical path of the cold build. `cargo test` by hand keeps it.
test:
	$(MAKE) -j3 --no-print-directory venv browser test-build
	CARGO_INCREMENTAL=0 ONNX_MICRONET_VENV=$(VENV) ONNX_MICRONET_REQUIRE_VENV=1 ONNX_MICRONET_CHROMIUM=$(CHROMIUM) $(CARGO) test --locked --all-targets

test-build:
	CARGO_INCREMENTAL=0 $(CARGO) test --locked --all-targets --no-run

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets --locked -- -D warnings

bench: release $(VENV_STAMP)
	ONNX_MICRONET_VENV=$(VENV) tests/bench/run.sh

fixtures:
	fixtures/scripts/make_fixtures.sh

fixtures-extra:
	fixtures/scripts/make_fixtures_extra.sh

clean-venv:
	rm -rf $(VENV)

# `pip install target/wheels/onnx_micronet-*.whl` puts the `onnx-micronet` binary on
# the venv's PATH (maturin's binary bindings, as ruff and uv ship). The wheel is built
# with maturin from its own venv, then installed into a fresh venv that runs
# --version and the demo's optimize.
MATURIN_VERSION := 1.16.0
WHEEL_TOOLS := $(CURDIR)/target/wheel-tools
WHEEL_CHECK := $(CURDIR)/target/wheel-check
wheel:
	test -x $(WHEEL_TOOLS)/bin/maturin || ( $(PYTHON) -m venv $(WHEEL_TOOLS) && \
	  $(WHEEL_TOOLS)/bin/pip install --quiet --disable-pip-version-check maturin==$(MATURIN_VERSION) )
	rm -rf target/wheels
	$(WHEEL_TOOLS)/bin/maturin build --release --strip --bindings bin -m Cargo.toml -o target/wheels
	rm -rf $(WHEEL_CHECK)
	$(PYTHON) -m venv $(WHEEL_CHECK)
	$(WHEEL_CHECK)/bin/pip install --quiet --disable-pip-version-check target/wheels/onnx_micronet-*.whl
	$(WHEEL_CHECK)/bin/onnx-micronet --version
	$(WHEEL_CHECK)/bin/onnx-micronet optimize $(DEMO_MNIST) -o target/wheels/demo.onnx \
	  --prune magnitude:0.7 --quantize linear:4 --act-bits 8 --act-range mse \
	  --calib fixtures/data/foolbox/mnist --data fixtures/data/mnist-digits-1000
	ls -l target/wheels/*.whl
