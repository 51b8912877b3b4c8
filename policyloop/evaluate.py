"""``policyloop evaluate``: off-policy estimates on your own logged bandit feedback.

Input: a CSV file (one row per event; columns ``action``, ``reward``, ``propensity`` and the
context features, by default every column named ``x<i>``) or a JSONL file (one object per line
with those keys and ``context`` as a list, optionally ``candidates`` as
``[{"id": ..., "features": [...]}]`` and ``position``). The target policy is either

- a column giving, per row, the probability the target policy assigns to the logged action
  (``--target-column``), or
- a registered model version served with an exploration strategy (``--registry``, ``--policy``,
  ``--version``, ``--strategy``): its probability of each logged action is computed exactly as
  the server would (rows of a ranking policy need ``candidates``).

With ``--spec SPEC`` the log is read as ``policyloop train --spec`` reads it (CSV, JSONL or
Parquet, in the columns the spec names, every row checked where it enters and a bad one
dropped with its line and field), and the target defaults to the spec's policy.

DR uses a cross-fitted ridge regression of the reward on the context as its reward model.
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from online import ope
from policyloop.contract.errors import InvalidArgument, Unavailable
from policyloop.contract.signature import FeatureSchema
from policyloop.contract.spec import PolicySpec, load_spec


@dataclass(frozen=True)
class LoggedEvents:
    action: list[str]
    reward: np.ndarray  # float64[n]
    propensity: np.ndarray  # float64[n]
    context: np.ndarray  # float32[n, d]
    target: np.ndarray | None  # float64[n] from --target-column
    candidates: list[list[dict]] | None  # per row, for ranking policies


def read_events(path: Path, *, target_column: str | None = None,
                context_prefix: str = "x") -> LoggedEvents:
    """Parse a CSV or JSONL log; InvalidArgument names the row and the column at fault."""
    rows = _read_rows(path)
    if not rows:
        raise InvalidArgument(f"{path}: no events")
    for required in ("action", "reward", "propensity"):
        if required not in rows[0]:
            raise InvalidArgument(f"{path}: column {required!r} is missing")
    if target_column is not None and target_column not in rows[0]:
        raise InvalidArgument(f"{path}: target column {target_column!r} is missing")
    if "context" in rows[0]:
        context = [r["context"] for r in rows]
    else:
        names = sorted((k for k in rows[0] if k.startswith(context_prefix)
                        and k[len(context_prefix):].isdigit()),
                       key=lambda k: int(k[len(context_prefix):]))
        context = [[r[k] for k in names] for r in rows]

    def column(name: str) -> np.ndarray:
        try:
            return np.array([float(r[name]) for r in rows], np.float64)
        except (TypeError, ValueError) as exc:
            raise InvalidArgument(f"{path}: column {name!r} is not numeric: {exc}") from exc

    try:
        ctx = np.array(context, np.float32).reshape(len(rows), -1)
    except (TypeError, ValueError) as exc:
        raise InvalidArgument(f"{path}: context features are not numeric or ragged") from exc
    return LoggedEvents(
        action=[str(r["action"]) for r in rows], reward=column("reward"),
        propensity=column("propensity"), context=ctx,
        target=column(target_column) if target_column else None,
        candidates=[r.get("candidates") or [] for r in rows] if "candidates" in rows[0] else None)


def read_spec_events(path: Path, spec: PolicySpec) -> tuple[LoggedEvents, dict]:
    """A log in the spec's columns (``policyloop/simulators/logfile.py``), as the events
    evaluation reads, and the summary of what was read and dropped."""
    from policyloop.simulators.logfile import read_logs

    data, report = read_logs(path, spec)
    if data.action_ids is None:  # a fixed action set: the action is its column
        actions = [spec.actions[int(a)] for a in data.action]
        candidates = None
    else:
        assert data.action_features is not None
        actions, candidates = [], []
        for i, ids in enumerate(data.action_ids):
            actions.append(ids[int(data.action[i])])
            candidates.append([{"id": c, "features": data.action_features[i, k].tolist()}
                               for k, c in enumerate(ids)])
    events = LoggedEvents(action=actions, reward=data.reward, propensity=data.propensity,
                          context=data.context.astype(np.float32), target=None,
                          candidates=candidates)
    return events, report.summary()


def _read_rows(path: Path) -> list[dict]:
    if path.suffix == ".csv":
        with path.open(newline="") as f:
            return list(csv.DictReader(f))
    rows = []
    for i, line in enumerate(path.read_text().splitlines()):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise InvalidArgument(f"{path}: line {i + 1} is not JSON: {exc}") from exc
    return rows


def target_from_model(events: LoggedEvents, registry: Path, policy: str, version: int | None,
                      strategy: str, features: FeatureSchema | None = None) -> np.ndarray:
    """Probability the registered model, explored with ``strategy``, gives each logged action.
    ``features``: the names and order the events' columns follow (a spec's), which must be the
    model's."""
    from policyloop.registry.local import LocalRegistry
    from policyloop.registry.onnx_model import choose_providers, load_model
    from serving.exploration import for_version, strategy_from_spec

    reg = LocalRegistry(registry)
    mv = reg.get(policy, version) if version else reg.current(policy)
    served = mv.manifest.features
    if features is not None and features.hash != served.hash:
        raise InvalidArgument(
            f"{policy} v{mv.version} reads features {list(served.context + served.action)}, "
            f"not the spec's {list(features.context + features.action)}: evaluating it on the "
            "spec's columns would feed it the wrong features")
    model = load_model(mv, expected=None, providers=choose_providers(False))
    explore = for_version(strategy_from_spec(strategy), mv.manifest.examples_learned)
    rng = np.random.default_rng(0)
    out = np.empty(len(events.action))
    for i, action in enumerate(events.action):
        ctx = events.context[i:i + 1]
        if not model.manifest.policy_kind.per_action_features:  # a fixed action set
            ids = list(model.manifest.actions)
            scores, emb = model.run(ctx)
            embedding = np.broadcast_to(emb[0], (len(ids), emb.shape[-1]))
            posterior = model.posterior
        else:
            if events.candidates is None or not events.candidates[i]:
                raise InvalidArgument(f"row {i}: a ranking policy needs the row's candidates")
            ids = [str(c["id"]) for c in events.candidates[i]]
            feats = np.array([c["features"] for c in events.candidates[i]], np.float32)
            scores, emb = model.run(ctx, feats[None])
            embedding, posterior = emb[0], model.posterior
        if action not in ids:
            raise InvalidArgument(f"row {i}: logged action {action!r} is not among {ids[:5]}...")
        decision = explore.decide(scores[0], 1, rng, embedding=embedding,
                                  posterior=posterior if explore.needs_posterior else None)
        out[i] = decision.probabilities[0, ids.index(action)]
    return out


def evaluate(events: LoggedEvents, target: np.ndarray, *, clip: float | None,
             alpha: float = 0.05) -> list[ope.Estimate]:
    baseline = ope.ridge_baseline(events.context, events.reward)
    return [
        ope.ips(events.reward, events.propensity, target, clip=clip, alpha=alpha),
        ope.snips(events.reward, events.propensity, target, clip=clip, alpha=alpha),
        ope.dr(events.reward, events.propensity, target, baseline, baseline, clip=clip,
               alpha=alpha),
    ]


def format_table(estimates: Sequence[ope.Estimate], alpha: float) -> str:
    level = f"{100 * (1 - alpha):g}%"
    lines = [f"{'estimator':<10}{'value':>10}{level + ' CI':>24}{'n':>9}{'clipped':>9}"
             f"{'max w':>11}{'ESS':>10}"]
    for e in estimates:
        ci = f"[{e.ci_low:.4f}, {e.ci_high:.4f}]"
        lines.append(f"{e.estimator:<10}{e.value:>10.4f}{ci:>24}{e.n:>9}{e.clipped:>9}"
                     f"{e.max_weight:>11.4g}{e.effective_sample_size:>10.1f}")
    return "\n".join(lines)


TlsFiles = tuple[Path | None, Path | None, Path | None]  # --tls-ca, --tls-cert, --tls-key


def served(target: str, policy: str, *, token: str = "", timeout: float = 10.0,
           tls: TlsFiles = (None, None, None)) -> tuple[int, str]:
    """The version and the strategy spec a running server serves ``policy`` with (its
    ``GetPolicyInfo``: a pinned, rolled back or fallback version included), over plaintext or
    TLS (``policyloop/channels.py``)."""
    import grpc

    from policyloop.channels import open_channel
    from protos import decision_pb2 as pb
    from protos import decision_pb2_grpc as pb_grpc
    from serving.exploration import spec_from_name

    metadata = (("authorization", f"Bearer {token}"),) if token else None
    try:
        with open_channel(target, tls_ca=tls[0], tls_cert=tls[1], tls_key=tls[2]) as channel:
            info = pb_grpc.DecisionServiceStub(channel).GetPolicyInfo(
                pb.GetPolicyInfoRequest(policy=policy), timeout=timeout, metadata=metadata)
    except grpc.RpcError as exc:
        raise Unavailable(f"--target {target}: GetPolicyInfo({policy!r}) failed: "
                          f"{exc.code().name}: {exc.details()}") from exc
    return int(info.model_version), spec_from_name(info.strategy)


def evaluate_command(path: Path, *, target_column: str | None, registry: Path | None,
                     policy: str | None, version: int | None, strategy: str,
                     clip: float | None, alpha: float, as_json: bool,
                     spec_path: Path | None = None, target: str = "", token: str = "",
                     tls: TlsFiles = (None, None, None)) -> int:
    if spec_path is not None:
        if target_column is not None:
            raise InvalidArgument("--spec reads the spec's columns; evaluate a registered "
                                  "policy (--policy, default the spec's) instead of "
                                  "--target-column")
        spec = load_spec(spec_path)
        policy = policy or spec.name
        events, summary = read_spec_events(path, spec)
        print(json.dumps({"data": summary}), file=sys.stderr)
    elif (target_column is None) == (policy is None):
        raise InvalidArgument("give exactly one target: --target-column or --policy")
    else:
        events = read_events(path, target_column=target_column)
    if target_column is not None:
        assert events.target is not None
        probabilities = events.target
    else:
        assert policy is not None and registry is not None
        if target:
            if version is not None:
                raise InvalidArgument("--target evaluates the version the server serves; give "
                                      "--version without --target for another one")
            version, strategy = served(target, policy, token=token, tls=tls)
            print(json.dumps({"served": {"target": target, "policy": policy,
                                         "version": version, "strategy": strategy}}),
                  file=sys.stderr)
        probabilities = target_from_model(events, registry, policy, version, strategy,
                                          None if spec_path is None else spec.features)
    estimates = evaluate(events, probabilities, clip=clip, alpha=alpha)
    if as_json:
        print(json.dumps([asdict(e) for e in estimates], indent=2))
    else:
        print(format_table(estimates, alpha))
    return 0
