# Single entry point for developers. Everything runs inside .venv (scripts/bootstrap.sh).
#   make serve ARGS="--base-model ./my-model"   make test ARGS="-k lora"
SHELL := /bin/bash
VENV := .venv
ARGS ?=

.PHONY: help bootstrap serve test lint format clean distclean

help:
	@echo "make bootstrap  set up / update .venv (idempotent)"
	@echo "make serve      run the server: ARGS='--base-model ... --port ...'"
	@echo "make test       run the test suite: ARGS='pytest arguments'"
	@echo "make lint       ruff check + ruff format --check"
	@echo "make format     ruff --fix + ruff format"
	@echo "make clean      remove build and tool caches (keeps .venv and converted models)"
	@echo "make distclean  clean, plus .venv and the converted-model cache in .cache/"

bootstrap:
	bash scripts/bootstrap.sh

serve: bootstrap
	$(VENV)/bin/adapterhub-server serve $(ARGS)

test:
	bash scripts/test.sh $(ARGS)

lint: bootstrap
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: bootstrap
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

clean:
	rm -rf build dist .pytest_cache .ruff_cache
	find . -path ./$(VENV) -prune -o -name '*.egg-info' -type d -prune -exec rm -rf {} +
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) .cache
