# offloadkit: set-up and the main jobs. Every target installs what it needs into .venv first,
# idempotently (a stamp file remembers what was installed for which pyproject.toml).
#
#   make demo   set up, then run the demo (the main job)
#   make test   set up with the test extra, then ruff, the pytest suite and nbval over notebooks/
#   make lab    set up with the lab extra and start JupyterLab on the notebooks
#   make browser-test  the notebooks in a real browser: JupyterLab + Debian's Chromium (screenshots in build/screenshots)
#   make bench  build llama.cpp, then offloadkit vs llama.cpp on bench-moe (table, build/bench/report.html)

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build. On plain PyPI,
# Linux x86_64 wheels of torch *are* CUDA builds; for the CPU build there, run
#   make TORCH_INDEX=https://download.pytorch.org/whl/cpu test
# GPU users: see README ("Using a GPU").
TORCH  ?= torch==2.13.0
TORCH_INDEX ?=
PIP    := $(BIN)/python -m pip --disable-pip-version-check -q

.PHONY: setup setup-test setup-lab demo test lint nbtest lab clean demo-model llamacpp bench setup-bench \
	setup-browser browser-test chromium

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.stamp-base: pyproject.toml | $(BIN)/python
	$(PIP) install "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install -e .
	touch $@

$(VENV)/.stamp-test: pyproject.toml $(VENV)/.stamp-base
	$(PIP) install -e ".[test]"
	touch $@

$(VENV)/.stamp-bench: pyproject.toml $(VENV)/.stamp-base
	$(PIP) install -e ".[bench]"
	touch $@

$(VENV)/.stamp-lab: pyproject.toml $(VENV)/.stamp-base
	$(PIP) install -e ".[lab,test]"
	touch $@

$(VENV)/.stamp-browser: pyproject.toml $(VENV)/.stamp-base
	$(PIP) install -e ".[browser,test]"
	touch $@

setup: $(VENV)/.stamp-base
setup-test: $(VENV)/.stamp-test
setup-lab: $(VENV)/.stamp-lab
setup-bench: $(VENV)/.stamp-bench
setup-browser: $(VENV)/.stamp-browser chromium

demo: setup
	$(BIN)/offloadkit demo

lint: setup-test
	$(BIN)/ruff check .

# The notebooks: each .py/.ipynb pair in sync and stored in git without outputs (tests/test_notebooks.py
# reads what git stores, not the working file), then nbval runs every notebook top to bottom, rebuilt
# from its .py source in a temporary folder: outputs JupyterLab saved into notebooks/ change nothing.
nbtest: setup-test
	$(BIN)/pytest -q -p no:cacheprovider tests/test_notebooks.py
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && cp notebooks/conftest.py "$$tmp/" && \
	for py in notebooks/[0-9][0-9]_*.py; do \
	  $(BIN)/jupytext --quiet --to ipynb --output "$$tmp/$$(basename "$$py" .py).ipynb" "$$py" || exit 1; \
	done && \
	$(BIN)/pytest -q --nbval-lax --nbval-current-env -p no:cacheprovider --rootdir "$$tmp" "$$tmp"

test: setup-test
	$(BIN)/ruff check .
	$(BIN)/pytest -q -m "not browser"
	$(MAKE) --no-print-directory nbtest

# The notebooks in a real browser (tests/browser): JupyterLab on 127.0.0.1 (free port, random token) over the
# notebooks rebuilt from their .py, Debian's Chromium driven by playwright (the system browser, through
# executable_path: never `playwright install`, which downloads one). Runs all cells of 00, 06 and 08, checks the
# figures and widgets, moves a slider; screenshots in build/screenshots/ (docs/img/dashboard.png is a copy of
# build/screenshots/06_partitioning-dashboard.png). `make test` deselects these tests. CHROMIUM names another binary.
CHROMIUM ?=
chromium:
	@bin="$(CHROMIUM)"; [ -n "$$bin" ] || bin=$$(command -v chromium || command -v chromium-browser || true); \
	if [ -n "$$bin" ] && [ -x "$$bin" ]; then echo "chromium: $$bin"; \
	elif [ -z "$(CHROMIUM)" ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "chromium is missing: apt-get install -y chromium"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	else \
	  echo "error: Chromium is missing$(if $(CHROMIUM), (CHROMIUM=$(CHROMIUM) is not executable)) and cannot be installed here (needs root and apt-get)." >&2; \
	  echo "  Debian/Ubuntu: sudo apt-get install -y chromium, then rerun make browser-test" >&2; \
	  echo "  elsewhere: install Chromium, then make browser-test CHROMIUM=/path/to/chromium" >&2; \
	  exit 1; fi

browser-test: setup-browser
	@mkdir -p build/screenshots
	OFFLOADKIT_BROWSER_REQUIRED=1 $(if $(CHROMIUM),OFFLOADKIT_CHROMIUM="$(CHROMIUM)") \
	  $(BIN)/pytest -q -p no:cacheprovider -m browser tests/browser
	@ls -l build/screenshots/*.png

# JupyterLab on the course. Inside a git checkout it first installs the nbstripout filter that
# .gitattributes names (`git add` then stores notebooks without the outputs a run saves into them);
# jupytext pairs each .ipynb with its .py (notebooks/jupytext.toml). Jupyter refuses root without
# --allow-root (containers, VMs), so it gets that flag there.
lab: setup-lab
	@if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then \
	  $(BIN)/nbstripout --install --attributes .gitattributes; fi
	$(BIN)/jupyter lab notebooks/ $$([ "$$(id -u)" = 0 ] && echo --allow-root)

# llama.cpp's llama-bench and llama-simple, built from source natively optimised (pip downloads the pinned
# llama-cpp-python sdist, whose vendor/llama.cpp is llama.cpp's tree), into build/llamacpp; a few minutes on
# 2 cores the first time, then skipped while the build matches (offloadkit/bench/llamacpp_build.py).
llamacpp: setup
	$(BIN)/python -m offloadkit.bench.llamacpp_build

# offloadkit's CPU engine against the real llama.cpp on the same weights (bench-moe, llama-bench's protocol,
# alternated): prints the table and writes $(BENCH_OUT)/report.html and run.json. BENCH_ARGS adds flags
# (e.g. BENCH_ARGS="-t 1,2 --dtype bf16,f32"); see `offloadkit bench --help`.
BENCH_OUT  ?= build/bench
BENCH_ARGS ?=
bench: setup-bench llamacpp
	@mkdir -p $(BENCH_OUT)
	$(BIN)/offloadkit bench --require-llamacpp $(BENCH_ARGS) --json $(BENCH_OUT)/run.json --html $(BENCH_OUT)/report.html

# Re-train the committed demo checkpoint (about 15 minutes on 2 cores).
demo-model: setup-test
	$(BIN)/python data/models/demo-mixtral/train.py --out data/models/demo-mixtral

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
