# Two commands on a fresh machine:
#   make run    set up .venv and run the daemon on config.yaml (state under ./var)
#   make test   set up .venv (with test tools) and run the test suite
# Re-running either on an installed checkout skips the install (stamp file).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TORCH  := torch==2.13.0

.PHONY: run test test-full bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: the CPU wheel on this machine; nothing later may replace it.
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')"
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/triage serve --config config.yaml

test: $(STAMP)
	$(BIN)/pytest -q

test-full: $(STAMP)
	TRIAGE_FULL_SCALE=1 $(BIN)/pytest -q

bench: $(STAMP)
	$(BIN)/python bench/ingest.py

clean:
	rm -rf $(VENV) var .pytest_cache
