# The README's two commands: `make demo` (install + run the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $@

demo: install
	$(BIN)/python jobs/train.py --output outputs/model

test: install
	$(BIN)/ruff check sidserve jobs tests bench
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check sidserve jobs tests bench

clean:
	rm -rf $(VENV) outputs .pytest_cache
