# Two commands: `make demo` and `make test`. Both create or refresh .venv from constraints.txt first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test venv bench lint dist image-check clean

venv: $(STAMP)

$(STAMP): constraints.txt setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade "pip==26.3"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $@

# A local swarm (bootstrap, 2 stages x 2 peers, 1 trainer) trains llama-14m on the embedded corpus, then a summary.
demo: $(STAMP)
	$(BIN)/swarm-peer demo

test: $(STAMP) lint
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check peer dht tests benchmarks proto
	$(BIN)/python proto/generate.py --check
	$(BIN)/hadolint docker/Dockerfile  # fails on any finding, info level included; ignores need an inline reason

# An sdist and a wheel in dist/, as a release would be built (tests/test_package.py checks what they hold).
dist: $(STAMP)
	$(BIN)/python -m build --outdir dist .

# Builds docker/Dockerfile with podman on a Debian 12 base made here by debootstrap, then runs the image: a
# bootstrap, two stage peers and a trainer as containers, HEALTHCHECK and `podman stop`. Needs root, and
# `apt-get install podman runc debootstrap`; also part of `make test` (skipped there where podman cannot run).
image-check: $(STAMP)
	SWARM_REQUIRE_PODMAN=1 $(BIN)/python -m pytest -q -s -m image tests/test_image.py

bench: $(STAMP)
	$(BIN)/python benchmarks/baseline_overhead.py

clean:
	rm -rf $(VENV) runs .pytest_cache dist build
