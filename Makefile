# Two commands for a fresh machine: `make demo` and `make test`. Both install into .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The tests make shards with the real img2dataset, whose pins (webdataset<0.3) clash with ours: its own venv.
IMG2DATASET_VENV := .venv-img2dataset
IMG2DATASET_STAMP := $(IMG2DATASET_VENV)/.installed
# The tests read MLflow's web UI as a browser renders it: Debian's headless Chromium (86 MB, about 10 s)
BROWSER := chromium-headless-shell
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: install demo test lint clean browser

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

$(IMG2DATASET_STAMP):
	test -x $(IMG2DATASET_VENV)/bin/python || $(PYTHON) -m venv $(IMG2DATASET_VENV)
	$(IMG2DATASET_VENV)/bin/python -m pip install -q 'img2dataset==1.47.0'
	touch $(IMG2DATASET_STAMP)

# pretrain on the embedded digits, fine-tune that run at twice the resolution, compare the two in MLflow
demo: $(STAMP)
	$(BIN)/python jobs/pretrain.py
	$(BIN)/python jobs/finetune.py
	$(BIN)/python jobs/compare.py --last 2 --out runs/demo-compare.png
	@echo "enter the environment for the README's other commands: source $(BIN)/activate"

browser:
	@command -v $(BROWSER) >/dev/null || $(SUDO) apt-get install -y -q --no-install-recommends $(BROWSER) || \
		{ $(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q --no-install-recommends $(BROWSER); }

test: $(STAMP) $(IMG2DATASET_STAMP) browser
	$(BIN)/python -m pytest -q --durations=15

lint: $(STAMP)
	$(BIN)/ruff check pipeline jobs tests

clean:
	rm -rf $(VENV) $(IMG2DATASET_VENV) build *.egg-info .pytest_cache
