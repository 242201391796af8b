# Two entry points, each doing its own set-up on a fresh clone: `make quickstart` and `make test`.
# The virtual environment is built once from pyproject.toml, constrained by requirements.lock (the exact
# stack the project was tested with), and rebuilt when either file changes.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
BASE ?= build/tiny-base
REAL_BASE ?= build/real-base
PORT ?= 8000

.PHONY: quickstart quickstart-270m real-base test lint clean client-matrix llama-cpp peer-serve peer-serve-270m playground \
	playground-screenshot export-gguf-270m export-merged-270m grpo-270m

$(VENV)/.installed: pyproject.toml requirements.lock
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else "Python 3.11 is required (set PYTHON=...)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c requirements.lock -e ".[dev,real]"
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

# The browser playground (docs/PLAYGROUND.md) after `make quickstart`: the tiny base and the quickstart adapter side by
# side, the quickstart's run and its eval report (build/eval). Ctrl-C stops it.
playground: $(VENV)/.installed
	@test -f adapters/quickstart/adapter_model.safetensors || { echo "no adapters/quickstart: run 'make quickstart' first" >&2; exit 2; }
	$(BIN)/toolkit serve --adapter quickstart --port $(PORT) --eval-dir build/eval

# docs/playground.png from a running `make playground` (Debian's chromium + chromium-driver).
playground-screenshot: $(VENV)/.installed
	$(BIN)/python examples/playground_screenshot.py --url http://127.0.0.1:$(PORT) --out docs/playground.png

# The same quickstart on the real Gemma 3 270M (the `real` extra; GPTQ build cached per machine, minutes the first time).
real-base: $(VENV)/.installed
	$(BIN)/toolkit tiny-base $(REAL_BASE) --weights gemma-3-270m --overwrite

quickstart-270m: real-base
	$(BIN)/toolkit info $(REAL_BASE)
	$(BIN)/toolkit make-image build/red-square.png --color red
	$(BIN)/toolkit chat $(REAL_BASE) "What is the capital of France?"
	$(BIN)/toolkit validate recipes/quickstart-270m.yaml --show 1
	$(BIN)/toolkit train recipes/quickstart-270m.yaml --overwrite
	$(BIN)/toolkit chat $(REAL_BASE) "Which city is the capital of Japan?" --adapter quickstart-270m
	@$(BIN)/toolkit serve --adapter quickstart-270m --port $(PORT) & echo $$! > build/serve.pid; \
	  $(BIN)/python examples/openai_client.py --url http://127.0.0.1:$(PORT)/v1 --model quickstart-270m \
	  --image build/red-square.png --wait 180; status=$$?; kill $$(cat build/serve.pid); exit $$status
	$(BIN)/toolkit eval recipes/quickstart-270m.yaml --min exact_match.text=0.5

test: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

# The clients people build on (openai, Agents SDK, LangChain, LiteLLM, pydantic-ai) against `toolkit serve`:
# installs them into build/client-venv (not project dependencies); docs/CLIENTS.md records a run.
client-matrix: $(VENV)/.installed
	$(BIN)/python bench/client_matrix.py

# Peer benchmarks (docs/BENCHMARKS.md). llama.cpp's OpenAI server is a benchmark peer, not a dependency: it gets its
# own venv (llama-cpp-python compiles llama.cpp, about 3-5 minutes on 2 cores). bench/llama_build.py builds it as its
# users do (plain `pip install`: -march=native) and smoke-tests it on the 270M GGUF; only if that test dies by a
# signal (a VM that lists AMX in /proc/cpuinfo without granting its state faults on the first `ldtilecfg`) it
# rebuilds for the SIMD features /proc/cpuinfo lists, AMX off. build/llama-venv/BUILD.json says which and why (delete
# it to rebuild).
LLAMA_VENV := build/llama-venv
GGUF = $$($(BIN)/python -c 'from toolkit.base.real_weights import weights_file; print(weights_file())')
$(LLAMA_VENV)/BUILD.json: | $(VENV)/.installed
	$(PYTHON) bench/llama_build.py --venv $(LLAMA_VENV) --gguf "$(GGUF)"

llama-cpp: $(LLAMA_VENV)/BUILD.json

# Exports checked on the real 270M (docs/EXPORT.md): the answer-style SFT adapter of the preference task, exported to a
# GGUF LoRA and run by llama.cpp beside the toolkit (build/export-gguf-270m.json), and merged into a plain transformers
# model (build/export-merged-270m.json).
build/preference-task/sft_eval.jsonl: | $(VENV)/.installed
	$(BIN)/python bench/preference_task.py

adapters/sft-270m/adapter_model.safetensors: build/preference-task/sft_eval.jsonl | real-base
	$(BIN)/toolkit train bench/recipes/sft-270m.yaml

export-gguf-270m: real-base llama-cpp adapters/sft-270m/adapter_model.safetensors
	$(BIN)/python bench/export_gguf_270m.py --base $(REAL_BASE) --llama-python $(LLAMA_VENV)/bin/python

export-merged-270m: real-base adapters/sft-270m/adapter_model.safetensors
	$(BIN)/python bench/export_merged_270m.py
	$(BIN)/python bench/export_merged_270m.py --quantize
	$(BIN)/python bench/export_merged_270m.py --plan-27b

peer-serve: $(VENV)/.installed
	$(BIN)/python bench/peer_serve.py --out docs/BENCHMARKS.md

peer-serve-270m: real-base llama-cpp
	$(BIN)/python bench/peer_serve.py --base $(REAL_BASE) --out docs/BENCHMARKS.md \
	  --llama-cpp "$(GGUF)"

clean:
	rm -rf build $(VENV)

# GRPO on the real 270M (docs/BENCHMARKS.md, "GRPO"): the task's prompts, a short SFT warm start, GRPO from it, then
# the held-out rewards of base, warm start and GRPO adapter (about 20 minutes on 2 CPU cores).
grpo-270m: real-base
	$(BIN)/python bench/grpo_task.py
	$(BIN)/toolkit train bench/recipes/grpo-270m-warmup.yaml --overwrite
	$(BIN)/toolkit train bench/recipes/grpo-270m.yaml --overwrite
	$(BIN)/toolkit eval bench/recipes/grpo-270m.yaml --adapter grpo-270m-warmup --adapter grpo-270m
