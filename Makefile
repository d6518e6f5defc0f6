# Two commands do all set-up on a fresh machine:
#   make run    install (with the embedded model) and make a dataset on the bundled defaults
#   make test   install (with test tools) and run every test, the real embedded model included
#   make test-trainers   add torch (CPU) and train TRL's DPO and reward trainers two steps on an export
#   make test-ray   add caiforge[ray] and check --engine ray against the local engine on a local Ray instance
#   make test-browser   add Debian's chromium and chromium-driver and drive `caiforge view` in headless Chromium
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | sha256sum | cut -c1-12)
# llama-cpp-python compiles from source (about 6 minutes on 2 cores); pip caches the wheel afterwards.
export CMAKE_BUILD_PARALLEL_LEVEL ?= 2

.PHONY: run test test-trainers test-ray test-browser lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[local,dev]'
	$(BIN)/pip install --quiet --no-deps 'trl>=0.20'  # its data utilities need no torch; a plain install pulls GBs
	rm -f $(VENV)/.installed-* && touch $@

run: $(STAMP)
	$(BIN)/caiforge run $(ARGS)

test: $(STAMP)
	$(BIN)/ruff check src tests bench
	$(BIN)/mypy src
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# A real consumer end to end: TRL's DPOTrainer and RewardTrainer train two steps on CPU on an export.
# torch 2.13.0 resolves to a CPU wheel here (about 30 s); it is a test dependency only, never a runtime one.
test-trainers: $(STAMP)
	$(BIN)/pip install --quiet torch==2.13.0 'accelerate>=1.0'
	$(BIN)/python -m pytest -q tests/trainers $(PYTEST_ARGS)

# --engine ray gives the local engine's files byte for byte, on a local Ray instance started once (about 10 s, 1 GB).
# ray[data] 2.60 installs in about 20 s; the default `make test` never collects tests/ray_engine.
test-ray: $(STAMP)
	$(BIN)/pip install --quiet -e '.[local,dev,ray]'
	$(BIN)/python -m pytest -q tests/ray_engine $(PYTEST_ARGS)

# caiforge view in a real headless Chromium through selenium (given Debian's chromedriver: no driver download).
# The browser is a system package (about 290 MB, a minute); it is installed only when chromedriver is missing.
test-browser: $(STAMP)
	command -v chromedriver >/dev/null || { apt-get update -q && DEBIAN_FRONTEND=noninteractive \
		apt-get install -y -q --no-install-recommends chromium chromium-driver; }
	$(BIN)/python -m pytest -q tests/browser $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python bench/http_clients.py
	$(BIN)/python bench/pipeline_throughput.py

clean:
	rm -rf $(VENV) caiforge-out .pytest_cache .ruff_cache
