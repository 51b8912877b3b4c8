"""``policyloop import MODEL.onnx --spec SPEC``: bring your own model.

Checks the file against the spec and the model contract (``docs/model-contract.md``), finds its
learnable head, opens it with serving's own checks and publishes it with the learner's prior
around its head as the posterior, so UCB and Thompson sampling work from the first request and
``policyloop learn`` refreshes it. Nothing is published when a check fails.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from policyloop.contract.errors import InvalidArgument
from policyloop.contract.spec import load_spec
from policyloop.create import check_exploration, publish_new_policy
from policyloop.registry.model_import import import_onnx


def import_command(model_path: Path, *, spec_path: Path, registry: Path,
                   registry_kafka: str = "", head_weight: str = "", head_bias: str = "",
                   prior: float = 1.0, force: bool = False) -> int:
    """Check and publish ``model_path`` as the spec's policy; prints one JSON line."""
    spec = load_spec(spec_path)
    check_exploration(spec, spec_path)
    try:
        data = model_path.read_bytes()
    except OSError as exc:
        raise InvalidArgument(f"{model_path}: cannot read it: {exc}") from exc
    try:
        imported = import_onnx(data, spec, head_weight=head_weight, head_bias=head_bias,
                               prior=prior, training={"source": model_path.name})
    except InvalidArgument as exc:
        raise InvalidArgument(f"{model_path}: {exc}") from exc
    version = publish_new_policy(spec.name, imported.model, imported.manifest, imported.extras,
                                 registry=registry, registry_kafka=registry_kafka, force=force)
    head = imported.manifest.head
    print(json.dumps({"policy": spec.name, "version": version.version, "kind": spec.kind,
                      "embedding_width": head.dim,
                      "head": asdict(head) if head.learnable else None,
                      **({"no_head": imported.no_head_reason} if not head.learnable else {})}))
    return 0
