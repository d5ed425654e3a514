# Switchboard: the verbs. `make run` starts everything locally, `make test` passes the suite.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
UV_VERSION := 0.13.8
UV := .cache/uv-venv/bin/uv
VENV := .venv
# The TypeScript client SDK, built with its pinned TypeScript (the demo page serves it).
JS := clients/js
# npm clients in the end-to-end tests: `openai` (test_sse_npm.py), `@openai/agents` (test_voice_agents_npm.py).
NPM_TESTS := tests/npm
export UV_PYTHON_DOWNLOADS := never

# (bench-load and bench-upstream: docs/performance.md)
.PHONY: run test fuzz lint format proto dashboards panels bench bench-load bench-upstream bench-moderation bench-memory image smoke-deploy setup clean

run: setup ## start Redis, the simulator (without OPENAI_API_KEY) and the four services
	$(VENV)/bin/python -m tools.stack

test: setup ## the whole suite: unit, integration (real Redis, gRPC) and end-to-end
	$(VENV)/bin/python -m pytest

fuzz: setup ## the whole stack fuzzed as an attacker would: ~20,000 hostile frames, handshakes, requests
	$(VENV)/bin/python -m tools.fuzz $(FUZZ_ARGS)

lint: setup ## ruff, mypy (strict on services/ and clients/python), tsc on clients/js
	$(VENV)/bin/ruff check services tools tests clients/python
	$(VENV)/bin/ruff format --check services tools tests clients/python
	$(VENV)/bin/mypy
	cd $(JS) && npm run --silent lint

format: setup
	$(VENV)/bin/ruff check --fix services tools tests clients/python
	$(VENV)/bin/ruff format services tools tests clients/python

proto: setup ## regenerate services/switchboard/v1 from proto/switchboard/v1
	$(VENV)/bin/python tools/genproto.py

dashboards: setup ## regenerate deploy/grafana/dashboards from tools/dashboards
	$(VENV)/bin/python -m tools.dashboards

panels: setup ## draw the key dashboard panels of a demo run to docs/images/panels.png
	$(VENV)/bin/python -m tools.render_panels --demo 150

bench: setup ## time to first token and tokens/s: gateway vs the simulator directly
	$(VENV)/bin/python -m tools.bench_ttft

bench-load: setup ## many paced streams, a burst, idle connections: the stack on one core vs direct (docs/performance.md)
	$(VENV)/bin/python -m tools.bench_load $(BENCH_ARGS)

bench-upstream: setup ## the broker's CPU per token with its aiohttp upstream client vs the openai SDK's
	$(VENV)/bin/python -m tools.bench_upstream $(BENCH_ARGS)

bench-moderation: setup ## what output moderation costs by hold-back, vs none, in one run
	$(VENV)/bin/python -m tools.bench_moderation

bench-memory: setup ## gateway memory per connection and stream, and its stream ceiling here
	$(VENV)/bin/python -m tools.bench_memory

image: setup ## build the container image localhost/switchboard:VERSION (podman or buildah)
	$(VENV)/bin/python -m tools.image

smoke-deploy: setup ## build the image, run the chart's minimal install with podman kube play, talk to it
	$(VENV)/bin/python -m tools.smoke_deploy $(SMOKE_ARGS)

setup: $(VENV)/.synced $(JS)/dist/index.js $(NPM_TESTS)/node_modules/.package-lock.json

$(UV):
	$(PYTHON) -m venv .cache/uv-venv
	.cache/uv-venv/bin/pip install --quiet uv==$(UV_VERSION)

$(VENV)/.synced: pyproject.toml uv.lock | $(UV)
	$(UV) sync --frozen --python $(PYTHON)
	touch $@

$(JS)/node_modules/.package-lock.json: $(JS)/package.json $(JS)/package-lock.json
	cd $(JS) && npm ci --no-audit --no-fund --loglevel=error

$(NPM_TESTS)/node_modules/.package-lock.json: $(NPM_TESTS)/package.json $(NPM_TESTS)/package-lock.json
	cd $(NPM_TESTS) && npm ci --no-audit --no-fund --loglevel=error

$(JS)/dist/index.js: $(JS)/node_modules/.package-lock.json $(JS)/tsconfig.json $(wildcard $(JS)/src/*.ts)
	cd $(JS) && npm run --silent build

clean:
	rm -rf $(VENV) .cache .run .pytest_cache .mypy_cache .ruff_cache $(JS)/node_modules $(JS)/dist $(NPM_TESTS)/node_modules
