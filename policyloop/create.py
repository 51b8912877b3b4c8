"""``policyloop create SPEC``: start a policy from nothing.

Publishes version 1 of the spec's policy, built by ``policyloop/registry/cold_start.py``, after
opening it with serving's own checks; a server serving the registry's policies picks it up,
and ``policyloop learn --policy NAME`` improves it from the first rewards.
"""

from __future__ import annotations

import json
from pathlib import Path

from policyloop.contract.errors import InvalidArgument
from policyloop.contract.signature import Manifest
from policyloop.contract.spec import load_spec
from policyloop.registry.cold_start import cold_start
from policyloop.registry.interface import ModelVersion, open_registry
from policyloop.registry.onnx_model import choose_providers, open_model


def create_command(spec_path: Path, *, registry: Path, registry_kafka: str = "",
                   prior: float = 1.0, force: bool = False) -> int:
    """Build, check and publish the spec's first version; prints one JSON line."""
    spec = load_spec(spec_path)
    model, manifest, posterior = cold_start(spec, prior=prior)
    open_model(model, manifest, posterior, providers=choose_providers(False))  # serving's checks
    version = publish_new_policy(spec.name, model, manifest,
                                 {"head.npz": posterior.to_npz_bytes()}, registry=registry,
                                 registry_kafka=registry_kafka, force=force)
    print(json.dumps({"policy": spec.name, "version": version.version, "kind": spec.kind,
                      "embedding_width": manifest.head.dim, "prior": prior}))
    return 0


def publish_new_policy(policy: str, model: bytes, manifest: Manifest, files: dict[str, bytes],
                       *, registry: Path, registry_kafka: str, force: bool) -> ModelVersion:
    """Publish a policy's start (``create``, ``import``): refused when the policy already has
    versions, unless ``force`` makes this its next version."""
    target = open_registry(registry, kafka=registry_kafka)
    try:
        if policy in target.policies() and target.versions(policy) and not force:
            raise InvalidArgument(f"policy {policy!r} already exists in {registry}; --force "
                                  "publishes this as its next version")
        return target.publish(policy, model, manifest, files)
    finally:
        target.close()
