# Two commands: `make serve` (embedded default on CPU, port 8000) and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.atelier-installed
TINY_MODELS := models/tiny
TORCH_VERSION ?= 2.13.0
PYTEST_ARGS ?=
# llm-cpu is vLLM's CPU build. On a GPU host: make EXTRAS=test,bench,gpu LOCK=constraints/lock-gpu.txt OVERRIDES=
EXTRAS ?= test,bench,llm-cpu
# Every version comes from the lock (`make lock` writes it from pyproject.toml), so every machine
# gets the same ones.
LOCK ?= constraints/lock-cpu.txt
OVERRIDES ?= constraints/cpu-overrides.txt

.PHONY: serve test test-cluster lint venv models browser bench clean lock web redis

# The CPU torch wheel goes in first with pip (it honours pip's configured find-links and
# PIP_INDEX_URL/PIP_EXTRA_INDEX_URL, e.g. PyTorch's CPU index); uv then keeps it and installs
# the rest fast, with CUDA-only torchvision/torchaudio/torchcodec overridden away.
$(STAMP): pyproject.toml $(LOCK) $(OVERRIDES)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check uv "torch==$(TORCH_VERSION)"
	$(VENV)/bin/uv pip install -q --python $(PY) $(if $(OVERRIDES),--overrides $(OVERRIDES)) -c $(LOCK) -e '.[$(EXTRAS)]'
	@touch $(STAMP)

# Re-resolve both locks from pyproject.toml (the CPU torch wheel through pip's find-links, if set).
lock: $(STAMP)
	$(VENV)/bin/uv pip compile -q pyproject.toml --extra test --extra bench --extra llm-cpu \
		--overrides constraints/cpu-overrides.txt --python-version 3.11 --no-header \
		$${PIP_FIND_LINKS:+--find-links "$$PIP_FIND_LINKS"} -o constraints/lock-cpu.txt
	$(VENV)/bin/uv pip compile -q pyproject.toml --extra test --extra bench --extra gpu --python-version 3.11 \
		--python-platform x86_64-manylinux_2_28 --no-header -o constraints/lock-gpu.txt

venv: $(STAMP)

models: venv
	$(PY) -m local.tiny_models --out $(TINY_MODELS)

# At least 4 logical CPUs (as local/runner.py): the replicas mostly idle, and fine-tuning
# needs room beside them.
LOCAL_CPUS := $(shell $(PYTHON) -c "import os; print(max(4, os.cpu_count() or 1))")
# The web UI's npm libraries (React Flow for the workflow editor, Chart.js for the Monitor page): `npm ci`
# installs the versions package-lock.json pins, and esbuild (from the same lock) bundles each into one
# ES module (React Flow also its stylesheet) in web/vendor/, served with the UI. No CDN: the UI works
# offline once built.
WEB_VENDOR := web/vendor/xyflow.js web/vendor/xyflow.css web/vendor/charts.js
web: $(WEB_VENDOR)
$(WEB_VENDOR) &: package.json package-lock.json web/vendor/xyflow.entry.js web/vendor/charts.entry.js
	npm ci --no-audit --no-fund --loglevel=error
	npm run --silent build
	@touch $(WEB_VENDOR)

# A sample dataset (storage/sample_dataset.py: 32 captioned shapes made in code; adding it again adds
# nothing), so a new user can train a LoRA from the UI without bringing images.
serve: models web
	$(PY) -m storage.sample_dataset --root var/storage >/dev/null
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" RAY_USAGE_STATS_ENABLED=0 RAY_OVERRIDE_RESOURCES='{"CPU": $(LOCAL_CPUS)}' \
		$(VENV)/bin/dotenv -f configs/ray.env run --no-override -- $(VENV)/bin/serve run configs/local.yaml

# Debian's chromium for the web UI tests (Playwright drives it; it never downloads a browser).
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
browser:
	@command -v chromium >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null; } || \
		echo "could not install chromium: the web UI tests will skip (and fail under CI=true)"

# Debian's redis-server for the two-node cluster tests (tests/cluster: the Celery broker); they skip
# without it, and fail under CI=true.
redis:
	@command -v redis-server >/dev/null 2>&1 || { $(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends redis-server >/dev/null; } || \
		echo "could not install redis-server: the cluster tests will skip (and fail under CI=true)"

# The import-linter contracts in pyproject.toml (layers point one way; the model packages are
# independent); first, so a broken layer fails before the models are built.
lint: venv
	$(VENV)/bin/lint-imports

test: lint models browser web redis
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" RAY_USAGE_STATS_ENABLED=0 $(PY) -m pytest $(PYTEST_ARGS)

# The whole two-node Ray cluster suite (tests/cluster), its long parts too (autoscaling, `ray job
# submit`): about 13 minutes here. `make test` runs its core (tests/conftest.py).
test-cluster: lint models redis
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" RAY_USAGE_STATS_ENABLED=0 ATELIER_CLUSTER_TESTS=all $(PY) -m pytest tests/cluster $(PYTEST_ARGS)

bench: models
	$(PY) benchmarks/bench_images.py

# Every GPU figure in one command (benchmarks/gpu_check.py): full-size random-weight models on the
# GPU, one table, artifacts/gpu-check.json, within 8 minutes. Without CUDA it says so and exits 0;
# GPU_CHECK_ARGS=--tiny runs the same script on CPU (tests/unit/test_gpu_check.py does, in make test).
.PHONY: gpu-check
GPU_CHECK_ARGS ?=
gpu-check: venv
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" RAY_USAGE_STATS_ENABLED=0 $(PY) benchmarks/gpu_check.py $(GPU_CHECK_ARGS)

clean:
	rm -rf var .pytest_cache
