# Two commands are the whole setup: `make demo` and `make test`. Each creates .venv when missing.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test lint install

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	WANDB_MODE=offline $(PY) -m recipes demo

test: $(STAMP)
	WANDB_MODE=disabled $(PY) -m pytest -q -n auto --maxprocesses=4 --dist loadgroup

lint: $(STAMP)
	$(PY) -m ruff check .
