# The two commands: `make speedrun` and `make test`. Each builds .venv from scratch if needed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# torch first: on this kind of machine torch==2.13.0 is a CPU wheel on local disk; on a machine with
# an NVIDIA GPU the default PyPI build (CUDA) is what we want. Override with TORCH_SPEC=...
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch>=2.9" || echo "torch==2.13.0")
PRESET ?= auto

.PHONY: speedrun test venv clean-venv

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

speedrun: $(VENV)/.installed
	PATH="$(abspath $(VENV))/bin:$$PATH" bash runs/speedrun.sh $(PRESET)

test: $(VENV)/.installed
	$(PY) -m pytest -q -ra tests

clean-venv:
	rm -rf $(VENV)
