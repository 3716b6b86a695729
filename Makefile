# The README's two commands: `make serve` (install + run the server on the embedded default model) and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
HOST ?= 127.0.0.1
PORT ?= 50051
BRIDGE_PORT ?= 8765

.PHONY: setup serve test test-slow bench lint clean

setup:
	@VENV=$(VENV) bash scripts/setup.sh

serve: setup
	$(VENV)/bin/npc-server serve --host $(HOST) --port $(PORT) --bridge-port $(BRIDGE_PORT) --insecure-loopback

test: setup
	$(PY) -m pytest -q

test-slow: setup
	$(PY) -m pytest -q -m slow

bench: setup
	$(VENV)/bin/npc-server bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
