"""``policyloop create SPEC``: start a policy from nothing.

Publishes version 1 of the spec's policy after opening it with serving's own checks; a server
serving the registry's policies picks it up, and ``policyloop learn --policy NAME`` improves it
from the first rewards. A ``linear`` model is built by ``policyloop/registry/cold_start.py``
(no torch); an ``mlp`` is the spec's network with a seeded random body and a zero head, so
that every action starts alike, exported with the parity check of ``models/own_model.py``.
"""

from __future__ import annotations

import json
from pathlib import Path

from policyloop.contract.errors import InvalidArgument
from policyloop.contract.posterior import LinearPosterior
from policyloop.contract.signature import Manifest
from policyloop.contract.spec import PolicySpec, load_spec
from policyloop.registry.cold_start import cold_start
from policyloop.registry.interface import ModelVersion, open_registry
from policyloop.registry.onnx_model import choose_providers, open_model


def create_command(spec_path: Path, *, registry: Path, registry_kafka: str = "",
                   prior: float = 1.0, force: bool = False, seed: int = 0) -> int:
    """Build, check and publish the spec's first version; prints one JSON line."""
    spec = load_spec(spec_path)
    check_exploration(spec, spec_path)
    if spec.model.type == "mlp":
        model, manifest, posterior = _mlp(spec, prior=prior, seed=seed)
    else:
        model, manifest, posterior = cold_start(spec, prior=prior)
    open_model(model, manifest, posterior, providers=choose_providers(False))  # serving's checks
    version = publish_new_policy(spec.name, model, manifest,
                                 {"head.npz": posterior.to_npz_bytes()}, registry=registry,
                                 registry_kafka=registry_kafka, force=force)
    print(json.dumps({"policy": spec.name, "version": version.version, "kind": spec.kind,
                      "embedding_width": manifest.head.dim, "prior": prior}))
    return 0


def check_exploration(spec: PolicySpec, path: Path) -> None:
    """The spec's ``[exploration] strategy`` read by serving's grammar, before anything is
    published: the spec's own layer may not import serving, so each command that publishes
    from a spec (create, import, train --spec) asks here."""
    from serving.exploration import strategy_from_spec

    if spec.defaults.strategy:
        try:
            strategy_from_spec(spec.defaults.strategy)
        except InvalidArgument as exc:
            raise InvalidArgument(f"spec {path}: exploration.strategy: {exc}") from exc


def _mlp(spec: PolicySpec, *, prior: float, seed: int,
         ) -> tuple[bytes, Manifest, LinearPosterior]:
    from models.own_model import cold_start_mlp  # torch: not in the serving image

    return cold_start_mlp(spec, prior=prior, seed=seed)


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
