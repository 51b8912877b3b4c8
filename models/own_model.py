"""Your own torch network as a policy: exported for a spec, proven equal in onnxruntime, and
checked against the model contract (``docs/model-contract.md``) exactly as
``policyloop import`` checks a file.

The module takes the kind's inputs (``context`` float32[B, Dc]; a ranking policy also
``action_features`` float32[B, K, Da]) and returns ``(scores, embedding)``, its scores a final
``nn.Linear`` of the embedding: the head, named by ``head`` (an attribute path such as
``"head"`` or ``"net.out"``) or given as the module itself; ``head=None`` exports a model
without a learnable head (served, never refreshed).

>>> from policyloop.contract.spec import parse_spec
>>> class Mine(torch.nn.Module):
...     def __init__(self) -> None:
...         super().__init__()
...         self.body, self.head = torch.nn.Linear(2, 4), torch.nn.Linear(4, 3)
...     def forward(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
...         embedding = torch.tanh(self.body(context))
...         return self.head(embedding), embedding
>>> spec = parse_spec('name = "r"\\nkind = "actions"\\nactions = ["a", "b", "c"]\\n'
...                   '[features]\\ncontext = ["x", "y"]\\n')
>>> imported = export_module(Mine(), spec)
>>> imported.manifest.head.dim, imported.manifest.head.learnable
(4, True)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch
from torch import nn

from models.export import OPSET, head_by_value, parity, torch_to_onnx
from policyloop.contract.errors import InvalidArgument
from policyloop.contract.posterior import LinearPosterior
from policyloop.contract.signature import Manifest
from policyloop.contract.spec import PolicySpec
from policyloop.registry.cold_start import created_defaults
from policyloop.registry.interface import ModelVersion, Registry
from policyloop.registry.model_import import Imported, import_onnx


def export_module(module: nn.Module, spec: PolicySpec, *, head: str | nn.Linear | None = "head",
                  prior: float = 1.0, training: dict[str, Any] | None = None,
                  seed: int = 0) -> Imported:
    """Export ``module`` for ``spec``: the ONNX bytes, manifest and prior posterior that
    ``Registry.publish`` takes (``Imported.extras``). Raises ExportParityError when
    onnxruntime's outputs differ from torch's by more than 1e-5 on random spec-shaped inputs,
    InvalidArgument when the module breaks the contract."""
    module.eval()
    kind = spec.policy_kind
    dc, da, n = len(spec.features.context), len(spec.features.action), len(spec.actions)
    linear = _head_module(module, head)
    rng = np.random.default_rng(seed)
    context = torch.from_numpy(rng.standard_normal((2, dc), dtype=np.float32))
    args: tuple[torch.Tensor, ...] = (context,)
    if kind.per_action_features:
        args += (torch.from_numpy(rng.standard_normal((2, 3, da), dtype=np.float32)),)
    inputs, outputs = kind.signature(context_dim=dc, action_dim=da, n_actions=n, head_dim=0)
    axes = {t.name: {axis: ("batch", "candidates")[axis] for axis, d in enumerate(t.shape)
                     if d == -1} for t in (*inputs, *outputs)}
    data = torch_to_onnx(module, args, [t.name for t in inputs], axes)
    worst = parity(module, kind, data, context_dim=dc, action_dim=da, seed=seed)
    names = {}
    if linear is not None:
        found = head_by_value(data, linear.weight.detach().numpy(),
                              linear.bias.detach().numpy())
        names = {"head_weight": found.weight, "head_bias": found.bias}
    return import_onnx(data, spec, prior=prior, **names,
                       training={**(training or {}), "exported": type(module).__name__,
                                 "opset": OPSET, "parity_max_abs_diff": worst})


def publish_module(module: nn.Module, spec: PolicySpec, registry: Registry, *,
                   head: str | nn.Linear | None = "head", prior: float = 1.0,
                   training: dict[str, Any] | None = None, seed: int = 0) -> ModelVersion:
    """``export_module``, then publish it as the spec's policy's next version."""
    imported = export_module(module, spec, head=head, prior=prior, training=training, seed=seed)
    return registry.publish(spec.name, imported.model, imported.manifest, imported.extras)


def _head_module(module: nn.Module, head: str | nn.Linear | None) -> nn.Linear | None:
    if head is None or isinstance(head, nn.Linear):
        linear = head
    else:
        try:
            linear = module.get_submodule(head)  # type: ignore[assignment]
        except AttributeError as exc:
            raise InvalidArgument(f"head: the module has no submodule {head!r}") from exc
    if linear is not None and (not isinstance(linear, nn.Linear) or linear.bias is None):
        raise InvalidArgument(f"head: {head!r} must be an nn.Linear with a bias")
    return linear


def cold_start_mlp(spec: PolicySpec, *, prior: float = 1.0, seed: int = 0,
                   ) -> tuple[bytes, Manifest, LinearPosterior]:
    """``policyloop create`` of a ``[model] type = "mlp"`` spec: its network (the spec's
    ``hidden`` and ``embedding`` widths) with a seeded random body and a zero head, so every
    action starts alike, exported with the parity check and its prior posterior."""
    from models.training import TrainConfig, new_network

    torch.manual_seed(seed)
    network = new_network(spec.features, len(spec.actions),
                          TrainConfig(hidden=spec.model.hidden,
                                      embedding_dim=spec.model.embedding))
    with torch.no_grad():
        network.head.weight.zero_()
        network.head.bias.zero_()
    imported = export_module(network, spec, head="head", prior=prior, seed=seed,
                             training={"cold_start": True, "model": "mlp", "seed": seed,
                                       "hidden": spec.model.hidden,
                                       "embedding": spec.model.embedding})
    assert imported.posterior is not None  # the head was found, or export_module raised
    manifest = dataclasses.replace(imported.manifest, defaults=created_defaults(spec))
    return imported.model, manifest, imported.posterior
