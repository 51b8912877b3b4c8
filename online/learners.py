"""What an online learner is, and the default one: Bayesian linear regression on the serving
model's neural-linear head.

A learner is a stateful object in the manner of river: ``learn_one`` takes one joined example
and returns nothing; ``candidate`` builds the model it would publish now; ``adopt`` tells it
that a candidate (its own, once the gate promoted it) now serves; ``state`` and
``load_state`` save and restore everything it learned, as JSON-able data, so a restarted
learner continues exactly where the checkpoint left it. The consume loop, the reward join, the
promotion gate, checkpointing and publishing (``online/learner.py``) are the same for every
learner; ``tests/test_learner_conformance.py`` holds every implementation to this contract.

Implementations: ``LinearHeadLearner`` here (contextual bandit; LinUCB and Thompson sampling
state), ``QLearner`` (``online/qlearning.py``, sequential decisions) and ``NetworkLearner``
(``models/network_learner.py``, the whole torch network, in the trainer image).
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from online.join import Example
from online.linear import LinearHeads
from policyloop.contract.errors import InvalidArgument
from policyloop.contract.kinds import Logged, example
from policyloop.contract.signature import Manifest
from policyloop.registry.onnx_head import read_head, replace_head
from policyloop.registry.onnx_model import LoadedModel


@dataclass(frozen=True)
class Serving:
    """The version serving now, as a learner sees it: opened, and its ONNX bytes."""

    model: LoadedModel
    model_bytes: bytes

    @property
    def head(self) -> tuple[np.ndarray, np.ndarray]:
        """The serving head: weight [A, H], bias [A]."""
        manifest = self.model.manifest
        if not manifest.head.learnable:
            raise InvalidArgument(
                f"policy {manifest.policy!r} v{manifest.version} has no learnable head "
                f"({manifest.training.get('no_head', 'imported without one')}): learn cannot "
                "refresh this model")
        return read_head(self.model_bytes, self.model.manifest.head)

    def example(self, decision_example: Example) -> tuple[np.ndarray, Logged]:
        """Embeddings of a joined decision under the serving body, and its model inputs."""
        model = self.model
        return example(model.manifest.policy_kind, model.run, model.action_positions,
                       decision_example.decision)


@dataclass(frozen=True)
class Candidate:
    """A model a learner would publish: the ONNX file, the files stored beside it (the
    posterior ``head.npz``), its manifest when the signature is the learner's own (None: the
    serving version's), what the learner adds to the manifest's ``training``, and the
    learner's own handle on it (the network learner's torch module), given back in
    ``adopt``."""

    model: bytes
    extras: dict[str, bytes]
    manifest: Manifest | None = None
    training: dict[str, Any] = field(default_factory=dict)
    handle: object = None


class OnlineLearner(Protocol):
    """The contract every learner meets (see the module docstring)."""

    learned: int  # examples fitted so far (Q-learning fits an example once its successor came)

    def learn_one(self, example: Example, *, train: bool = True) -> None:
        """One joined example in event-time order. ``train=False``: the loop holds it out
        for the gate; it must not be fitted on, but may serve as context (a next state)."""

    def candidate(self) -> Candidate:
        """The model this learner would publish now."""

    def adopt(self, candidate: Candidate, serving: Serving) -> None:
        """``candidate`` was promoted: ``serving`` is now the version it became."""

    def state(self) -> dict[str, Any]:
        """Everything learned, JSON-able; ``load_state`` of it continues exactly."""

    def load_state(self, state: dict[str, Any], serving: Serving) -> None:
        """Restore ``state`` (written by the same learner); ``serving`` is the version the
        checkpoint was embedding with."""


class LinearHeadLearner:
    """The contextual bandit learner: the serving body is fixed, the head and its Gaussian
    posterior (``online/linear.py``) are refitted on every example. Its statistics are sums,
    so shards of it merge exactly (``online/shards.py``)."""

    def __init__(self, serving: Serving, *, prior: float = 1.0, gamma: float = 1.0) -> None:
        self.serving = serving
        self.prior = prior
        self.gamma = gamma
        weight, bias = serving.head
        self.heads = LinearHeads.from_head(weight, bias, prior=prior, gamma=gamma)
        self.learned = 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}(prior={self.prior}, gamma={self.gamma})"

    def learn_one(self, example: Example, *, train: bool = True) -> None:
        if not train:
            return
        embeddings, logged = self.serving.example(example)
        x = embeddings if logged.allowed is not None else embeddings[logged.column]
        self.heads.update(x, example.reward, head=logged.head)
        self.learned += 1

    def candidate(self, heads: LinearHeads | None = None) -> Candidate:
        """The serving body with the head's posterior mean, and the posterior; ``heads``:
        statistics merged from several shards instead of this learner's own."""
        heads = self.heads if heads is None else heads
        weight, bias = heads.head()
        manifest = self.serving.model.manifest
        return Candidate(replace_head(self.serving.model_bytes, manifest.head, weight, bias),
                         {"head.npz": heads.posterior().to_npz_bytes()})

    def adopt(self, candidate: Candidate, serving: Serving) -> None:
        self.serving = serving

    def state(self) -> dict[str, Any]:
        buffer = io.BytesIO()
        arrays: dict[str, Any] = self.heads.to_npz_arrays()  # Any: numpy's stub would let a **
        np.savez(buffer, **arrays)  # of arrays fill allow_pickle
        return {"heads": base64.b64encode(buffer.getvalue()).decode(), "learned": self.learned}

    def load_state(self, state: dict[str, Any], serving: Serving) -> None:
        self.serving = serving
        with np.load(io.BytesIO(base64.b64decode(state["heads"]))) as arrays:
            self.heads = LinearHeads.from_npz_arrays({k: arrays[k] for k in arrays.files})
        self.learned = int(state.get("learned", 0))
