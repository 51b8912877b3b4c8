# The README's two commands: `make demo` and `make test`. Both set everything up first.
SHELL := /bin/bash
RUN := scripts/run.sh

.PHONY: setup demo test lint protos kafka-start kafka-stop

setup:
	bash scripts/bootstrap.sh

# Until the closed-loop demo lands: train both scenarios offline, export, register.
demo: setup
	$(RUN) policyloop train --scenario recsys --registry var/registry
	$(RUN) policyloop train --scenario routing --registry var/registry
	$(RUN) policyloop registry list --registry var/registry

test: setup
	$(RUN) pytest

lint:
	$(RUN) ruff check .

protos:
	$(RUN) bash scripts/gen_protos.sh

kafka-start:
	bash scripts/kafka.sh start

kafka-stop:
	bash scripts/kafka.sh stop
