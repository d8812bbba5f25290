# Two commands do all set-up on a fresh machine:
#   make demo   reference agent + proxy + Envoy on the default ports
#   make test   everything CI runs: `make lint`, then the whole pytest suite
#   make lint   buf lint + buf breaking, ruff (check, format), mypy, import-linter contracts
#   make unit   the unit tests only (seconds; no processes, no Envoy)
#   make docs   regenerate docs/configuration.md's reference and config.example.yaml
# Each target creates .venv, installs the package and its tools, and generates the stubs.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
BUF    := build/tools/node_modules/.bin/buf

.PHONY: demo test unit lint lint-proto lint-py typecheck lint-imports gen docs install system-deps node-deps \
	clean bench bench-quick bench-deps

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

# Two passes. First everything but the load-sensitive tests, on PYTEST_WORKERS processes
# (pytest-xdist; every server binds port 0 and every file is per test, so tests do not
# share anything). Then the chaos tests and the ones marked `serial` (they measure
# processes under load, so they run alone). Exit 5 (nothing selected, e.g. PYTEST_ARGS
# names a file with no chaos test) is not a failure of that pass.
PYTEST_WORKERS ?= 2
test: lint system-deps node-deps
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) -m "not chaos and not serial" $(PYTEST_ARGS) \
	  || [ $$? -eq 5 ]
	$(BIN)/python -m pytest -m "chaos or serial" $(PYTEST_ARGS) || [ $$? -eq 5 ]

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
