# Two commands on a fresh machine: `make serve` and `make test`. Both install what they need
# first (idempotent) and print progress.
SHELL := /bin/bash
PY := .venv/bin/python

.PHONY: help setup serve test test-unit lint bench chat clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' Makefile | sed 's/:.*## /\t/' | expand -t 12

setup:  ## install everything (.venv, Triton, perf_analyzer, GenAI-Perf, weights cache)
	@bash scripts/setup.sh

serve: setup  ## run the local serving stack in the foreground (Ctrl-C stops it)
	@$(PY) -m python_backends.tools.serve $(ARGS)

test: setup  ## lint, then every test (starts real tritonserver processes)
	@$(PY) -m ruff check .
	@$(PY) -m pytest -q -ra $(ARGS)

test-unit: setup  ## only the tests that need no server
	@$(PY) -m pytest -q -m "not server" $(ARGS)

lint: setup  ## ruff
	@$(PY) -m ruff check .

bench: setup  ## engine benchmark: GenAI-Perf against llm vs transformers generate()
	@$(PY) scripts/bench_engine.py $(ARGS)

chat: setup  ## interactive streaming chat against a running stack
	@$(PY) scripts/chat.py $(ARGS)

clean:  ## remove the installed environment and caches
	rm -rf .venv tools .cache
