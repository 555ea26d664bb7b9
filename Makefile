# Two commands for a fresh machine: `make run` (execute every notebook into reports/) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# One stamp per install set: each target installs what it needs, and only when pyproject.toml changed
# (a second `make run` reinstalls nothing).
RUN_STAMP := $(VENV)/.installed-run
TEST_STAMP := $(VENV)/.installed-test
IMAGES_STAMP := $(VENV)/.installed-images
KERNEL := workbench

.PHONY: run test lab lint bench images clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Running: torch, the project and its kernel. No Ray, playwright or kaleido (extras below).
$(RUN_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e .
	$(BIN)/python -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "Python (workbench)" >/dev/null
	touch $@

# Testing: pytest, ruff, playwright, and Ray (the Ray executor's tests run instead of skipping).
$(TEST_STAMP): $(RUN_STAMP)
	$(BIN)/pip install -q -e '.[test,ray]'
	touch $@

$(IMAGES_STAMP): $(RUN_STAMP)
	$(BIN)/pip install -q -e '.[images]'
	touch $@

run: $(RUN_STAMP)
	$(BIN)/workbench run

test: $(TEST_STAMP)
	$(BIN)/ruff check workbench tests scripts
	$(BIN)/python -m pytest -q

lab: $(RUN_STAMP)
	$(BIN)/workbench lab

bench: $(RUN_STAMP)
	$(BIN)/workbench bench all

lint: $(TEST_STAMP)
	$(BIN)/ruff check workbench tests scripts

clean-venv:
	rm -rf $(VENV)

# README pictures: the main figure of each notebook from the newest run, exported through Chromium.
images: $(IMAGES_STAMP)
	$(BIN)/python scripts/export_figures.py
