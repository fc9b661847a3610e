# The two commands a user needs: `make demo` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast venv bench clean

venv: $(STAMP)

# pip (not uv/poetry): it takes torch/torchvision from the machine's local wheels when present.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

# -q: on a failure Accelerate adds no traceback of its own below the toolkit's one-line error.
demo: $(STAMP)
	$(VENV)/bin/accelerate launch -q --config_file launch/cpu.yaml toolkit/train.py --config configs/digits_lenet.yaml

# The whole suite, as CI runs it: 3 workers (the end-to-end tests wait on start-up, SLURM and Ray as
# much as they compute, so a third worker on 2 cores fills the waits); SLURM and Ray tests share one worker.
# TEST_WORKERS=0 runs it in this process, one test at a time.
TEST_WORKERS ?= 3
test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup

# The unit tests only: no CLI launches (tests marked slow are left out); under 2 minutes on 2 CPU cores.
test-fast: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) -m "not slow"

bench: $(STAMP)
	$(PY) benchmarks/engine_vs_plain.py

clean:
	rm -rf runs .pytest_cache
