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

# On a machine with a CUDA GPU: the gpu-marked tests (they skip without one), results in
# gpu-check/ (pytest report and JUnit XML). Under 10 minutes.
gpu-check: env
	@mkdir -p gpu-check
	-nvidia-smi > gpu-check/nvidia-smi.txt 2>&1
	$(PY) -m pytest -m gpu -rA --junitxml=gpu-check/pytest.xml > gpu-check/pytest.txt 2>&1; \
	  status=$$?; cat gpu-check/pytest.txt; exit $$status

lint: env
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) $(DEMO_OUT) gpu-check build *.egg-info
