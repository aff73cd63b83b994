# Two commands do everything on a fresh machine:  `make demo`  and  `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
DEMO_OUT ?= demo_out

.PHONY: demo test test-all labs lint format bench clean

$(VENV)/.installed: requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	touch $@

## demo: the shipped models measured on fresh synthetic scans, then every stage trained briefly (demo_out/)
demo: $(VENV)/.installed
	$(PY) -m integration demo --out $(DEMO_OUT)

## test: lint + format check, then the fast test suite
test: $(VENV)/.installed lint
	$(PY) -m pytest -q

## test-all: also the slow tests (training runs, whole real scans)
test-all: $(VENV)/.installed lint
	$(PY) -m pytest -q -m "slow or not slow"

## labs: run every lab notebook top to bottom as a student would (labs/), HTML copies in labs/html/
labs: $(VENV)/.installed
	$(PY) scripts/run_labs.py

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(VENV)/.installed
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: $(VENV)/.installed
	for f in bench/bench_*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

clean:
	rm -rf $(DEMO_OUT) .pytest_cache .ruff_cache labs/html
