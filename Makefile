# offloadkit: set-up and the main jobs. Every target installs what it needs into .venv first,
# idempotently (a stamp file remembers what was installed for which pyproject.toml).
#
#   make demo   set up, then run the demo (the main job)
#   make test   set up with the test extra, then ruff, the pytest suite and nbval over notebooks/
#   make lab    set up with the lab extra and start JupyterLab on the notebooks

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch first, pinned to the CPU build that lies on disk: a bare `torch` requirement would pull a
# multi-GB CUDA build. GPU users: see README ("Using a GPU").
TORCH  ?= torch==2.13.0
PIP    := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: setup setup-test setup-lab demo test lint nbtest lab clean demo-model

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.stamp-base: pyproject.toml | $(BIN)/python
	$(PIP) install "$(TORCH)"
	$(PIP) install -e .
	touch $@

$(VENV)/.stamp-test: pyproject.toml $(VENV)/.stamp-base
	$(PIP) install -e ".[test]"
	touch $@

$(VENV)/.stamp-lab: pyproject.toml $(VENV)/.stamp-base
	$(PIP) install -e ".[lab,test]"
	touch $@

setup: $(VENV)/.stamp-base
setup-test: $(VENV)/.stamp-test
setup-lab: $(VENV)/.stamp-lab

demo: setup
	$(BIN)/offloadkit demo

lint: setup-test
	$(BIN)/ruff check .

nbtest: setup-test
	for nb in notebooks/*.ipynb; do $(BIN)/nbstripout --verify "$$nb" || { echo "$$nb is stored with outputs: run nbstripout on it"; exit 1; }; done
	$(BIN)/pytest -q --nbval-lax --nbval-current-env -p no:cacheprovider notebooks/

test: setup-test
	$(BIN)/ruff check .
	$(BIN)/pytest -q
	$(MAKE) --no-print-directory nbtest

lab: setup-lab
	$(BIN)/jupyter lab notebooks/

# Re-train the committed demo checkpoint (about 15 minutes on 2 cores).
demo-model: setup-test
	$(BIN)/python data/models/demo-mixtral/train.py --out data/models/demo-mixtral

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
