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
# DICOM senders against the receiver), orthanc (a PACS peer) and postgresql (a private
# server per test process for the store's PostgreSQL backend, run as the package's
# `postgres` user). Installed when missing and apt-get is usable (root); otherwise
# those tests skip and say why.

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
	ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing="$$missing postgresql"; \
	if [ -n "$$missing" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing Debian packages:$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	elif [ -n "$$missing" ]; then echo "not installed:$$missing (tests that need them will skip)"; fi

# Two pytest workers (one test file each at a time, so module fixtures are built once;
# the slowest files first, tests/conftest.py `SLOWEST_FILES`),
# then the tests marked `serial`, which measure the daemon under a load of their own, alone.
PYTEST_PARALLEL := $(BIN)/pytest -q -p no:cacheprovider -n 2 --dist loadfile --no-loadscope-reorder \
	-m "not serial"
PYTEST_SERIAL   := $(BIN)/pytest -q -p no:cacheprovider -m serial

# Then the store- and daemon-level tests again on PostgreSQL (TRIAGE_TEST_STORE: each
# test's store is a database on a private server, tests/pg_server.py); `make test-full`
# runs the wider list.
PG_BASE := tests/test_store_postgres.py tests/test_review_api.py \
	tests/test_dicomweb.py tests/test_ops_status.py tests/test_model_registry.py \
	tests/test_ingestor_recovery.py tests/test_ended_associations.py tests/test_backpressure.py \
	tests/gate/test_worker_faults.py tests/gate/test_degraded_serving.py \
	tests/dicomnet/test_receiver_inprocess.py tests/gate/test_replicas.py tests/test_received_store.py
PG_TESTS := $(PG_BASE) \
	tests/gate/test_scorer.py::test_batched_studies_wait_in_the_store_and_each_gets_one_decision_with_its_batch \
	tests/gate/test_scorer.py::test_a_buffer_left_by_batching_is_scored_again_under_a_configuration_without_it
PG_TESTS_FULL := $(PG_BASE) tests/training/test_worker_scheduler.py tests/training/test_splits.py \
	tests/training/test_sampling_queries.py tests/gate/test_scorer.py tests/test_ingest_daemon.py tests/test_studies.py tests/test_operating_point.py \
	tests/test_learning_loop.py tests/test_study_view_cache.py tests/test_image_order.py \
	tests/test_scope.py tests/training/test_cli_end_to_end.py tests/training/test_pipeline.py \
	tests/dicomnet/test_receiver_pynetdicom.py
PYTEST_POSTGRES := TRIAGE_TEST_STORE=postgresql $(PYTEST_PARALLEL)

test: $(STAMP) system-deps
	$(PYTEST_PARALLEL)
	$(PYTEST_SERIAL)
	$(PYTEST_POSTGRES) $(PG_TESTS)

test-full: $(STAMP) system-deps
	TRIAGE_FULL_SCALE=1 $(PYTEST_PARALLEL)
	TRIAGE_FULL_SCALE=1 $(PYTEST_SERIAL)
	TRIAGE_FULL_SCALE=1 $(PYTEST_POSTGRES) $(PG_TESTS_FULL)

bench: $(STAMP)
	$(BIN)/python bench/ingest.py

clean:
	rm -rf $(VENV) var .pytest_cache
