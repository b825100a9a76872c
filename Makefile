# Entry points for developers and CI. `make test PG_MAJORS="14 18"` picks the server majors.

VENV := .venv
PY := $(VENV)/bin/python
PG_MAJORS ?= 17
export PG_MAJORS

.PHONY: setup lint test demo bench

setup: $(VENV)/.installed

# The stamp makes a repeated setup free; editing pyproject.toml reinstalls.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy app

test: setup lint
	$(PY) -m pytest $(PYTEST_ARGS)

demo: setup
	$(PY) -m tests.demo

# The job against a raw pg_dump on a throwaway PostgreSQL 18 (docs/performance.md); slow.
bench: setup
	$(PY) -m bench.run $(BENCH_ARGS)
