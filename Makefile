# Two commands: `make demo` and `make test`. Both create or refresh .venv from constraints.txt first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test venv bench lint clean

venv: $(STAMP)

$(STAMP): constraints.txt setup.cfg pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade "pip==26.3"
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $@

# A short run on the embedded corpus, then its summary. (The local swarm replaces it when `swarm-peer demo` lands.)
demo: $(STAMP)
	$(BIN)/swarm-peer baseline --preset llama-14m --max-steps 100 --warmup-steps 10 --lr 2e-3 \
		--eval-interval 50 --log-interval 10

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/baseline_overhead.py

clean:
	rm -rf $(VENV) runs .pytest_cache
