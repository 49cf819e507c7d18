# The README's two commands: `make demo` (install + fit, assign, serve, tokenize) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install demo test lint clean system-deps eval

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev,eval]'
	touch $@

demo: install
	$(BIN)/python jobs/demo.py --output outputs

# The paper's comparison on Amazon Beauty (docs/evaluation.md); needs ../shared/data or DATA=<dir>.
DATA ?= ../shared/data/amazon-beauty-5core
eval: install
	$(BIN)/python jobs/evaluate.py --data $(DATA) --output outputs/eval

# Prometheus and the Pushgateway are started by the monitoring tests (Debian packages).
system-deps:
	@if ! command -v prometheus-pushgateway >/dev/null || ! command -v prometheus >/dev/null; then \
	  if command -v apt-get >/dev/null; then \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus prometheus-pushgateway >/dev/null; \
	  else echo "install prometheus and prometheus-pushgateway (Debian/Ubuntu packages) first" >&2; exit 1; fi; \
	fi

# two pytest-xdist workers: the Ray tests one after another on one (they share a cluster and
# Serve's fixed ports), everything else beside them on the other (tests/conftest.py)
test: install system-deps
	$(BIN)/ruff check sidserve jobs tests bench
	$(BIN)/python -m pytest -n 2

lint: install
	$(BIN)/ruff check sidserve jobs tests bench

clean:
	rm -rf $(VENV) outputs .pytest_cache
