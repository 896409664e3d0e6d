# Developer and CI entry points. `make test` is what CI runs (through .ci/run).
SHELL := /bin/bash
.DEFAULT_GOAL := test

ROOT := $(abspath $(dir $(lastword $(MAKEFILE_LIST))))
VENV := $(ROOT)/.venv
PY := $(VENV)/bin/python
# helm/kubectl unpacked by bootstrap, then the venv's tools (hadolint, ruff), for every recipe
# and every test subprocess.
export PATH := $(ROOT)/.tools/bin:$(VENV)/bin:$(PATH)

LINT_PATHS := $(wildcard operator proxy tests scripts bench)
DOCKERFILES := $(wildcard Dockerfile.operator Dockerfile.proxy)
CRD_FILE := crds/gpuproxy.aiserve.farm_gpuproxyclusters.yaml
EXAMPLE := examples/gpuproxycluster-minimal.yaml
# Extra pytest arguments, e.g. `make test PYTEST_ARGS="-k services -x"`.
PYTEST_ARGS ?=

.PHONY: bootstrap bootstrap-python lint typecheck pytest test demo render crd

bootstrap:
	bash scripts/bootstrap.sh

bootstrap-python:
	bash scripts/bootstrap.sh python

# Both linters always run, so one report shows Python and Dockerfile findings together.
lint:
	@status=0; \
	echo "$(VENV)/bin/ruff check $(LINT_PATHS)"; \
	$(VENV)/bin/ruff check $(LINT_PATHS) || status=1; \
	if [ -n "$(DOCKERFILES)" ]; then \
		echo "$(VENV)/bin/hadolint $(DOCKERFILES)"; \
		$(VENV)/bin/hadolint $(DOCKERFILES) && echo "hadolint: clean" || status=1; \
	fi; \
	exit $$status

typecheck:
	$(VENV)/bin/mypy

pytest:
	$(PY) -m pytest -q -ra --durations=15 $(PYTEST_ARGS)

# Runs every stage even if an earlier one fails, so one run shows all problems; fails at the end.
# On success pytest's summary stays the last line of output (CI reads it).
test: bootstrap
	@failed=""; \
	for stage in lint typecheck pytest; do \
		echo "=== make $$stage"; \
		$(MAKE) --no-print-directory $$stage || failed="$$failed $$stage"; \
	done; \
	if [ -n "$$failed" ]; then echo "=== make test FAILED in:$$failed"; exit 1; fi

demo: bootstrap-python
	$(VENV)/bin/gpuproxy-proxy --demo --self-test

render: bootstrap-python
	$(VENV)/bin/gpuproxy-operator render -f $(EXAMPLE)

# Written through a temp file so a failing generator never leaves a truncated CRD behind;
# then copied into the chart (templates/crd.yaml and values.schema.json).
crd: bootstrap-python
	$(VENV)/bin/gpuproxy-operator crd > $(CRD_FILE).tmp
	mv $(CRD_FILE).tmp $(CRD_FILE)
	$(PY) scripts/sync-chart-crd.py
