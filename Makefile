# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
# Each creates the virtual environment it needs in .venv on first use, with the extras it needs.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

# pip shows its progress: a first install takes a few minutes (torch is large).
$(VENV)/.installed-%: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --progress-bar on -e '.[$*]'
	touch $@

demo: $(VENV)/.installed-demo
	$(BIN)/modelkeep demo

test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -q

bench: $(VENV)/.installed-dev
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info
