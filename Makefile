# amrg developer commands. `make help` lists them.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch and torchvision are installed first and then pinned: timm and grad-cam need a
# matching torchvision, and pip would otherwise try other builds. Override for other machines,
# e.g. make setup TORCH_SPEC="torch==2.5.1 torchvision==0.20.1".
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?=

.PHONY: help setup test test-full lint format clean demo

help:  ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-12s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip freeze | grep -iE '^(torch|torchvision)==' > $(VENV)/torch-constraint.txt
	$(BIN)/pip install --quiet -c $(VENV)/torch-constraint.txt -e '.[dev,notebook,serve,demo]'
	touch $@

setup: $(VENV)/.installed  ## create .venv and install amrg with its dev tools, notebook and web-demo extras

lint: setup  ## ruff check
	$(BIN)/ruff check amrg tests benchmarks

format: setup  ## ruff format + fix imports
	$(BIN)/ruff check --fix amrg tests benchmarks
	$(BIN)/ruff format amrg tests benchmarks

test: setup lint  ## lint, then the whole CPU test suite (what CI runs)
	$(BIN)/pytest -q $(PYTEST_ARGS)

test-full: setup  ## the suite plus GPU tests (needs a CUDA device)
	$(BIN)/pytest -q --run-gpu $(PYTEST_ARGS)

demo: setup  ## the whole pipeline offline on synthetic data
	$(BIN)/amrg demo

clean:  ## remove the virtual environment and caches
	rm -rf $(VENV) .pytest_cache .ruff_cache
