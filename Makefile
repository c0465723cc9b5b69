# Two commands do everything from a fresh clone:
#   make demo   create .venv if missing, install, run the main job on CPU
#   make test   create .venv if missing, install, run the whole test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO_OUT ?= demo-output

.PHONY: env test demo lint clean gpu-check

env: $(STAMP)

# Re-install only when the pins or the package metadata change; otherwise `make env` is a no-op.
$(STAMP): requirements.lock pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $(STAMP)

test: env
	$(PY) -m pytest

demo: env
	$(VENV)/bin/openmm-reversible demo --output $(DEMO_OUT)

# The benchmarks gpu-check runs, each quoted item one `openmm-reversible benchmark` command
# (its JSON line goes to gpu-check/benchmarks.jsonl). The epoch samples with OpenMM on CUDA at
# the paper's box size and window shape (895 waters, one loss per 200-step window); the torch
# windows and forces run where the code runs them (the fused kernels on the CPU).
GPU_BENCHMARKS ?= "forces --nonbonded PME" "gradient --nonbonded PME --fused" \
  "epoch --config examples/water/water.toml --platform CUDA --fused --waters 895 --windows 2 \
  --window-steps 200 --snapshot-every 200 --equilibration-steps 5000 --bulk-steps 500"

# On a machine with a CUDA GPU: the gpu-marked tests (they skip without one) and the benchmarks,
# results in gpu-check/ (pytest report, JUnit XML, benchmarks.jsonl and their log
# benchmarks.txt). Under 10 minutes.
gpu-check: env
	@mkdir -p gpu-check
	-nvidia-smi > gpu-check/nvidia-smi.txt 2>&1
	@status=0; \
	$(PY) -m pytest -m gpu -rA --junitxml=gpu-check/pytest.xml > gpu-check/pytest.txt 2>&1 \
	  || status=$$?; \
	cat gpu-check/pytest.txt; \
	rm -f gpu-check/benchmarks.jsonl gpu-check/benchmarks.txt; \
	for args in $(GPU_BENCHMARKS); do \
	  echo "openmm-reversible benchmark $$args --json" | tee -a gpu-check/benchmarks.txt; \
	  $(VENV)/bin/openmm-reversible benchmark $$args --json --no-progress \
	    >> gpu-check/benchmarks.jsonl 2>> gpu-check/benchmarks.txt || status=1; \
	done; \
	cat gpu-check/benchmarks.jsonl; exit $$status

lint: env
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) $(DEMO_OUT) gpu-check build *.egg-info
