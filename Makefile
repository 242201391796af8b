# Two entry points, each doing its own set-up on a fresh clone: `make quickstart` and `make test`.
# The virtual environment is built once from pyproject.toml, constrained by requirements.lock (the exact
# stack the project was tested with), and rebuilt when either file changes.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
BASE ?= build/tiny-base
PORT ?= 8000

.PHONY: quickstart test lint clean

$(VENV)/.installed: pyproject.toml requirements.lock
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "Python 3.11 is required (set PYTHON=...)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c requirements.lock -e ".[dev]"
	@touch $@

quickstart: $(VENV)/.installed
	$(BIN)/toolkit tiny-base $(BASE) --overwrite
	$(BIN)/toolkit info $(BASE)
	$(BIN)/toolkit make-image build/red-square.png --color red
	$(BIN)/toolkit chat $(BASE) "What is the capital of France?"
	$(BIN)/toolkit chat $(BASE) "What colour is the square?" --image build/red-square.png
	$(BIN)/toolkit validate recipes/quickstart.yaml
	$(BIN)/toolkit train recipes/quickstart.yaml --overwrite
	$(BIN)/toolkit chat $(BASE) "Which city is the capital of Japan?" --adapter quickstart
	$(BIN)/toolkit chat $(BASE) "What color is the square?" --image build/red-square.png --adapter quickstart
	@$(BIN)/toolkit serve --adapter quickstart --port $(PORT) & echo $$! > build/serve.pid; \
	  $(BIN)/python examples/openai_client.py --url http://127.0.0.1:$(PORT)/v1 --wait 120; status=$$?; \
	  kill $$(cat build/serve.pid); exit $$status
	$(BIN)/toolkit eval recipes/quickstart.yaml --min exact_match.text=0.25 --min exact_match.image=0.5

test: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

clean:
	rm -rf build $(VENV)
