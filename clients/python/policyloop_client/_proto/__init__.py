"""The decision service's stubs, generated from protos/decision.proto by scripts/gen_protos.sh
(imports rewritten to resolve inside this package). Do not edit; tests/test_protos.py fails
when they are stale."""
