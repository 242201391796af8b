# Two entry points, each doing its own set-up on a fresh clone: `make quickstart` and `make test`.
# The virtual environment is built once from pyproject.toml, constrained by requirements.lock (the exact
# stack the project was tested with), and rebuilt when either file changes.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
BASE ?= build/tiny-base
REAL_BASE ?= build/real-base
PORT ?= 8000

.PHONY: quickstart quickstart-270m real-base test lint clean client-matrix llama-cpp peer-serve peer-serve-270m

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
# own venv (llama-cpp-python compiles llama.cpp, about 3 minutes on 2 cores).
LLAMA_VENV := build/llama-venv
# llama.cpp's native build (-march=native) uses AMX tiles wherever /proc/cpuinfo lists them and faults on the first
# `ldtilecfg` on VMs that list AMX without granting its register state (seen here, 2026-12-01): build for the CPU's
# AVX2 / AVX512 features as listed, AMX off.
cpu_has = $(shell grep -m1 -qw $(1) /proc/cpuinfo 2>/dev/null && echo ON || echo OFF)
LLAMA_CMAKE := -DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF \
  -DGGML_AVX=$(call cpu_has,avx) -DGGML_AVX2=$(call cpu_has,avx2) -DGGML_FMA=$(call cpu_has,fma) \
  -DGGML_F16C=$(call cpu_has,f16c) -DGGML_BMI2=$(call cpu_has,bmi2) -DGGML_AVX512=$(call cpu_has,avx512f) \
  -DGGML_AVX512_VBMI=$(call cpu_has,avx512vbmi) -DGGML_AVX512_VNNI=$(call cpu_has,avx512_vnni) \
  -DGGML_AVX512_BF16=$(call cpu_has,avx512_bf16)
$(LLAMA_VENV)/.installed:
	$(PYTHON) -m venv $(LLAMA_VENV)
	CMAKE_ARGS="$(LLAMA_CMAKE)" $(LLAMA_VENV)/bin/pip install --quiet --no-cache-dir "llama-cpp-python[server]==0.3.36"
	@touch $@

llama-cpp: $(LLAMA_VENV)/.installed

peer-serve: $(VENV)/.installed
	$(BIN)/python bench/peer_serve.py --out docs/BENCHMARKS.md

peer-serve-270m: real-base llama-cpp
	$(BIN)/python bench/peer_serve.py --base $(REAL_BASE) --out docs/BENCHMARKS.md \
	  --llama-cpp "$$($(BIN)/python -c 'from toolkit.base.real_weights import weights_file; print(weights_file())')"

clean:
	rm -rf build $(VENV)
