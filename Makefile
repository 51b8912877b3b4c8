# The README's two commands: `make demo` and `make test`. Both set everything up first.
SHELL := /bin/bash
RUN := scripts/run.sh

.PHONY: setup demo test lint protos kafka-start kafka-stop

setup:
	bash scripts/bootstrap.sh

# The closed loop on the embedded defaults (no broker): train, serve, learn, simulate, summarise.
demo: setup
	$(RUN) policyloop --log-level WARNING demo

# Lint and type check first, as they fail sooner than the suite; pytest runs the docstring
# examples too (--doctest-modules in pyproject.toml).
test: setup lint
	$(RUN) pytest

lint:
	$(RUN) ruff check .
	$(RUN) mypy

protos:
	$(RUN) bash scripts/gen_protos.sh

kafka-start:
	bash scripts/kafka.sh start

kafka-stop:
	bash scripts/kafka.sh stop
