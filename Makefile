# The two commands: `make speedrun` and `make test`. Each builds .venv from scratch if needed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# torch first. runs/torch_install.py prints the pip arguments for this machine: torch==2.13.0 (a CPU
# wheel, on local disk here) without a working nvidia-smi; with one, a pinned torch built for the
# newest CUDA that the driver supports and the GPUs have kernels in (e.g. torch==2.9.1 --index-url
# https://download.pytorch.org/whl/cu128). When it cannot choose (driver or GPU too old) it says
# why, and make stops before touching .venv.
# Overrides: TORCH_VARIANT=cpu|cu126|cu128|cu130 picks the build of the pinned version;
# TORCH_SPEC="torch==2.9.1 --index-url https://download.pytorch.org/whl/cu126" replaces the choice
# (its words go to pip unquoted: quote a specifier with < or > inside, TORCH_SPEC="'torch>=2.9'").
TORCH_SPEC ?= $(shell TORCH_VARIANT="$(TORCH_VARIANT)" $(PYTHON) runs/torch_install.py)
PRESET ?= auto
RECIPE ?=

.PHONY: speedrun test venv clean-venv

$(VENV)/.installed: pyproject.toml
	$(eval TORCH_ARGS := $(strip $(TORCH_SPEC)))
	$(if $(TORCH_ARGS),,$(error no torch build chosen (see above); set TORCH_SPEC to choose one))
	$(info torch: $(TORCH_ARGS))
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_ARGS)
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

speedrun: $(VENV)/.installed
	PATH="$(abspath $(VENV))/bin:$$PATH" bash runs/speedrun.sh $(PRESET) $(if $(RECIPE),--recipe $(RECIPE))

test: $(VENV)/.installed
	$(PY) -m pytest -q -ra tests

clean-venv:
	rm -rf $(VENV)
