# `make run` (default pipeline on digits), `make test` (the suite) and `make test-faults` (faults
# injected on the fake autoscaler's cluster, ~5 min; CI runs both test targets).
# Both build or update .venv by themselves first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
CONFIG ?= kd_ray/configs/digits.yaml
SET    ?=
export RAY_AUTH_MODE ?= disabled

.PHONY: venv run test test-faults bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

run: venv
	$(VENV)/bin/kd-ray run $(CONFIG) $(SET)

test: venv
	$(PY) -m pytest tests -m "not faults" $(PYTEST_ARGS)

test-faults: venv
	$(PY) -m pytest tests -m faults -s $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache

bench: venv
	$(PY) jobs/bench/bench_teachers.py
	$(PY) jobs/bench/bench_soft_targets.py
	$(PY) jobs/bench/bench_distill.py
