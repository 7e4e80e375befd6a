# Two commands for a fresh machine: `make demo` and `make test`. Both install into .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

# pretrain on the embedded digits, fine-tune that run at twice the resolution, compare the two in MLflow
demo: $(STAMP)
	$(BIN)/python jobs/pretrain.py
	$(BIN)/python jobs/finetune.py
	$(BIN)/python jobs/compare.py --last 2 --out runs/demo-compare.png

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15

lint: $(STAMP)
	$(BIN)/ruff check pipeline jobs tests

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
