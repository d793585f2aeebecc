# Everything runs inside .venv/, created on first use.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast venv clean protos lint format typecheck

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/edittuner demo --output demo-out

# One pytest worker per core, a test file's tests on one worker (module fixtures are built once).
test: $(STAMP)
	$(BIN)/python -m pytest -q -n auto --dist loadfile

# The unit tests: everything but the tests marked slow (services, workers, torchrun, end-to-end pipelines).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n auto --dist loadfile -m "not slow"

# ruff: the lint rules and the format (pyproject.toml), checked; `make format` rewrites.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# mypy, strict on shared/ (pyproject.toml).
typecheck: $(STAMP)
	$(BIN)/mypy

# Regenerate the gRPC stubs in shared/rpc/ from protos/ (commit the result; tests fail on stale stubs).
protos: $(STAMP)
	$(BIN)/python -m shared.rpc.generate

clean:
	rm -rf $(VENV) demo-out
