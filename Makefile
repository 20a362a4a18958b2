# The two commands of the README: `make lab` and `make test`. Both create .venv if it is missing and
# install napo into it (idempotent: a stamp file is renewed only when pyproject.toml changes).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.napo-installed
export OMP_NUM_THREADS ?= 2
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: lab test install clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# torch first, on its own: it resolves to the local CPU wheel
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[dev]"
	touch $(STAMP)

lab: $(STAMP)
	$(BIN)/napo lab

# Lint and format check first (seconds), so a style error fails before the ~9 min suite starts.
test: $(STAMP)
	$(BIN)/ruff check napo scripts tests && $(BIN)/ruff format --check napo scripts tests
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV)
