# Two commands on a fresh machine:
#   make run    set up .venv and run the daemon on config.yaml (state under ./var)
#   make test   set up .venv (with test tools) and run the test suite
# Re-running either on an installed checkout skips the install (stamp file).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TORCH  := torch==2.13.0

# Debian packages the tests drive for real: chromium (web UI test, with Python
# Playwright; no browser download), prometheus (promtool), dcmtk (storescu, echoscu:
# DICOM senders against the receiver) and orthanc (a PACS peer). Installed when missing
# and apt-get is usable (root); otherwise those tests skip and say why.

.PHONY: run test test-full bench clean system-deps

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, pinned: the CPU wheel on this machine; nothing later may replace it.
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/python -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '2.13.0')"
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/triage serve --config config.yaml

system-deps:
	@missing=""; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	command -v storescu >/dev/null || missing="$$missing dcmtk"; \
	command -v Orthanc >/dev/null || test -x /usr/sbin/Orthanc || missing="$$missing orthanc"; \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian packages:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	elif [ -n "$$missing" ]; then echo "not installed:$$missing (tests that need them will skip)"; fi

# Two pytest workers (one test file each at a time, so module fixtures are built once),
# then the tests marked `serial`, which measure the daemon under a load of their own, alone.
PYTEST_PARALLEL := $(BIN)/pytest -q -p no:cacheprovider -n 2 --dist loadfile -m "not serial"
PYTEST_SERIAL   := $(BIN)/pytest -q -p no:cacheprovider -m serial

test: $(STAMP) system-deps
	$(PYTEST_PARALLEL)
	$(PYTEST_SERIAL)

test-full: $(STAMP) system-deps
	TRIAGE_FULL_SCALE=1 $(PYTEST_PARALLEL)
	TRIAGE_FULL_SCALE=1 $(PYTEST_SERIAL)

bench: $(STAMP)
	$(BIN)/python bench/ingest.py

clean:
	rm -rf $(VENV) var .pytest_cache
