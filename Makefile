# The README's two commands (demo, test) and their friends. Each sets itself up first.
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PATH := $(CURDIR)/$(BIN):$(PATH)
export MPLBACKEND := Agg

.PHONY: help setup demo test browser check-export check-clean lint readme-check docs-check nbtest pytest \
	bench bench-quick export clean-nbs readme docs clean

help:  ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(STAMP): setup.py settings.ini pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 >/dev/null
	touch $(STAMP)

setup: $(STAMP)  ## Create .venv and install the pinned dependencies

demo: $(STAMP)  ## Run the whole pipeline on the local sandbox tournament
	$(BIN)/numerai-nb demo

test: $(STAMP) browser check-export check-clean lint readme-check docs-check nbtest pytest  ## Every check

BROWSERS := chromium chromium-browser google-chrome google-chrome-stable

browser:  ## A headless Chromium for the report test (apt-get installs it when run as root)
	@if [ -n "$${CHROMIUM:-}" ] && [ -x "$${CHROMIUM}" ]; then echo "browser: $$CHROMIUM"; exit 0; fi; \
	for b in $(BROWSERS); do \
		if command -v "$$b" >/dev/null; then echo "browser: $$(command -v "$$b")"; exit 0; fi; \
	done; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; \
	else \
		echo "No Chromium found for the HTML report test. Install it (Debian/Ubuntu:" \
			"sudo apt-get install -y chromium) or set CHROMIUM=/path/to/chrome."; \
		exit 1; \
	fi

check-export: $(STAMP)  ## The library is exactly what the notebooks export
	$(BIN)/nbdev_export
	git diff --exit-code -- numerai_nb
	test -z "$$(git status --porcelain -- numerai_nb)" || \
		{ git status --porcelain -- numerai_nb; echo "untracked exported files: commit them"; exit 1; }

check-clean: $(STAMP)  ## Notebooks are committed clean
	$(BIN)/nbdev_clean
	git diff --exit-code -- nbs

lint: $(STAMP)  ## ruff over notebooks, library and tests
	$(BIN)/ruff check nbs numerai_nb tests

readme-check: $(STAMP)  ## README.md is in step with nbs/index.ipynb
	$(BIN)/numerai-nb readme --check

docs-check: $(STAMP)  ## nbdev's docs processing (the part that needs no Quarto)
	$(BIN)/numerai-nb docs-check

nbtest: $(STAMP)  ## Run every notebook's examples and assertions
	$(BIN)/nbdev_test --n_workers 2

pytest: $(STAMP)  ## End-to-end tests, then the workflow lint, ending with the pytest summary
	$(BIN)/python -m pytest -n 2 --dist loadfile tests

bench: $(STAMP)  ## Side-by-side benchmark against the official example pipeline
	$(BIN)/numerai-nb bench

bench-quick: $(STAMP)  ## The benchmark at a tiny scale
	$(BIN)/numerai-nb bench --quick

export: $(STAMP)  ## Export the library from the notebooks
	$(BIN)/nbdev_export

clean-nbs: $(STAMP)  ## Strip outputs and ids from the notebooks
	$(BIN)/nbdev_clean

readme: $(STAMP)  ## Regenerate README.md from nbs/index.ipynb
	$(BIN)/numerai-nb readme

docs: $(STAMP)  ## Process the notebooks for the docs site into _proc/
	$(BIN)/numerai-nb docs-check

clean:  ## Remove the virtual environment and build outputs
	rm -rf $(VENV) _proc _docs build *.egg-info
