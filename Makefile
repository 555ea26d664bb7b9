# Two commands for a fresh machine: `make run` (execute every notebook into reports/) and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
KERNEL := workbench

.PHONY: run test lab lint bench images clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

# Reinstall only when the project's metadata changes: a second `make run` installs nothing.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e '.[dev,ray]'
	$(BIN)/python -m ipykernel install --sys-prefix --name $(KERNEL) --display-name "Python (workbench)" >/dev/null
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/workbench run

test: $(STAMP)
	$(BIN)/ruff check workbench tests scripts
	$(BIN)/python -m pytest -q

lab: $(STAMP)
	$(BIN)/workbench lab

bench: $(STAMP)
	$(BIN)/workbench bench all

lint: $(STAMP)
	$(BIN)/ruff check workbench tests scripts

clean-venv:
	rm -rf $(VENV)

# README pictures: the main figure of each notebook from the newest run, exported through Chromium.
images: $(STAMP)
	$(BIN)/python scripts/export_figures.py
