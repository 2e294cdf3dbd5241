# Two entry points: `make run` (install + default pipeline) and `make test` (install + tests).
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
CORES ?= all
# pytest-xdist workers for the unit tests (a test file stays on one worker: its fixtures are made once)
XDIST = $(if $(filter all,$(CORES)),auto,$(CORES)) --dist loadfile

.PHONY: install run test test-fast lint ui clean

$(BIN)/snakemake: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# pyproject.toml pins the direct dependencies; requirements.lock pins everything beneath them
	$(BIN)/python -m pip install --quiet -c requirements.lock -e ".[test]"
	touch $@

install: $(BIN)/snakemake

# the demo: config/demo.yaml replaces (not extends) config/config.yaml, which is yours
run: install
	$(BIN)/snakemake --cores $(CORES) --configfile config/demo.yaml --replace-workflow-config

# every test in one pass, spread over one worker more than the cores: a workflow run's jobs wait on
# each other and leave a core idle (benchmarks/RESULTS.md), which another unit of work fills. A unit is a test file, or the tests of the session's shared workflow run (tests/conftest.py);
# the longest start first.
TEST_WORKERS ?= $(shell echo $$(( $$(nproc) + 1 )))
test: install
	$(BIN)/python -m pytest -v -n $(TEST_WORKERS) --dist loadgroup --no-loadscope-reorder

# the unit tests, spread over the cores: no workflow run, server, cluster or real data (about 3 minutes;
# for development). `make test` runs them all.
test-fast: install
	$(BIN)/python -m pytest -m "not workflow and not server and not shared_data" -n $(XDIST) -q

# the MLflow UI over results/ on 127.0.0.1:5000, with a link per saved view
ui: install
	$(BIN)/cellatlas-ui

lint: install
	$(BIN)/snakemake --lint

clean:
	rm -rf results .snakemake
