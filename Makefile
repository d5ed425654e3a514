# Switchboard: the verbs. `make run` starts everything locally, `make test` passes the suite.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
UV_VERSION := 0.13.8
UV := .cache/uv-venv/bin/uv
VENV := .venv
# The TypeScript client SDK, built with its pinned TypeScript (the demo page serves it).
JS := clients/js
export UV_PYTHON_DOWNLOADS := never

.PHONY: run test fuzz lint format proto dashboards panels bench bench-moderation bench-memory image smoke-deploy setup clean

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

bench-moderation: setup ## what output moderation costs by hold-back, vs none, in one run
	$(VENV)/bin/python -m tools.bench_moderation

bench-memory: setup ## gateway memory per connection and stream, and its stream ceiling here
	$(VENV)/bin/python -m tools.bench_memory

image: setup ## build the container image localhost/switchboard:VERSION (podman or buildah)
	$(VENV)/bin/python -m tools.image

smoke-deploy: setup ## build the image, run the chart's minimal install with podman kube play, talk to it
	$(VENV)/bin/python -m tools.smoke_deploy $(SMOKE_ARGS)

setup: $(VENV)/.synced $(JS)/dist/index.js

$(UV):
	$(PYTHON) -m venv .cache/uv-venv
	.cache/uv-venv/bin/pip install --quiet uv==$(UV_VERSION)

$(VENV)/.synced: pyproject.toml uv.lock | $(UV)
	$(UV) sync --frozen --python $(PYTHON)
	touch $@

$(JS)/node_modules/.package-lock.json: $(JS)/package.json $(JS)/package-lock.json
	cd $(JS) && npm ci --no-audit --no-fund --loglevel=error

$(JS)/dist/index.js: $(JS)/node_modules/.package-lock.json $(JS)/tsconfig.json $(wildcard $(JS)/src/*.ts)
	cd $(JS) && npm run --silent build

clean:
	rm -rf $(VENV) .cache .run .pytest_cache .mypy_cache .ruff_cache $(JS)/node_modules $(JS)/dist
