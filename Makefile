# Two commands a newcomer needs: `make demo` (the main job on embedded defaults) and `make test`.
# Both create the virtual environment themselves from pyproject.toml.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.merv-installed

.PHONY: demo test test-fast check-wheels install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/merv demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

# the unit layer only (no Ray, no multi-process runs, no servers): the inner loop
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not integration"

# the base install resolves to wheels on Linux x86_64 / aarch64 and macOS arm64 (needs the package index)
check-wheels: $(STAMP)
	$(BIN)/python tools/check_wheels.py

clean:
	rm -rf $(VENV) runs .pytest_cache
