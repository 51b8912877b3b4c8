"""From nothing, on real data: policyloop's online learner beside Vowpal Wabbit and LinUCB.

Supervised-to-bandit streams from datasets scikit-learn ships in its wheel (no download):
``digits`` (1,797 images, 64 pixel features scaled to [0, 1], 10 classes) and
``breast_cancer`` (569 cases, 30 features standardised, 2 classes), each shuffled and
repeated (``--passes``). Each event a learner sees the features, picks one class as its
action, and gets reward 1 if it is the right class, else 0 (bandit feedback: nothing about the
other classes). And ``routing_drift``: the built-in routing simulator (17 ticket features, 8
queues, 3,000 events a pass) whose queues' skills rotate halfway; a ticket resolved is reward 1,
drawn with the simulator's true probability. And ``recsys``: the built-in recommendation
simulator as a ranking stream (16 user features; each request 20 candidate items with 16
features; a click drawn with the simulator's true probability, which depends on how user and
item match), where a learner needs context-by-item interactions: policyloop a created
``kind = "ranking"`` policy, VW the items' features as ADF lines crossed by ``-q sa``, LinUCB
one shared model on the same products. Every learner sees the same events in the same
order, the same reward draws, and starts from nothing. One row forgets (``learn --gamma
0.999``, as the demo's drift runs do), for the drift.

- policyloop: the code ``policyloop create`` + ``serve`` + ``learn`` run, in one process and
  without the bus: version 1 built from a spec by ``policyloop/registry/cold_start.py`` (a
  linear model per action, zero head, the learner's prior), decisions drawn by serving's
  exploration strategies (``serving/exploration.py``) from the scores and posterior of the
  version being served (narrowed by each decision made since that version and moved by its
  reward, as serve's pending decisions do when each reward reaches the replica before its next
  decision; the row that says so narrows only; ``--no-pending-decisions`` rows: as published),
  every example given to the learner (``online/learners.py`` LinearHeadLearner, the default
  prior; the real loop holds one event in five out for its promotion gate, none with
  ``--no-gate``), and a new version served as often as ``policyloop learn`` publishes by default
  (a young learner sooner, then every 500 examples) or, in the rows that say so, every 10
  events; a real loop adds the reward window and the bus on top.
- Vowpal Wabbit ``--cb_explore_adf`` with epsilon-greedy (0.1) and with SquareCB, the action as
  an ADF feature crossed with every context feature (``-q sa``), through its Python API.
- LinUCB (disjoint, Li et al. 2010), one ridge regression per action, alpha 0.5 and 1.

Reported per stream and learner: the progressive average reward (the mean true expected
reward of every decision made while learning: the drawn reward itself on the datasets), the
same over the last part (the datasets' last pass; after the drift), events per second (decide
+ update, this process, after every learner ran once on 40 events of two streams so no row
pays the imports), the oracle and uniform values, and a learning curve
(``bench/results/bandit.png``).

Usage: python bench/bandit_bench.py [--passes 3] [--out bench/results/bandit.json]
(about seven minutes on a 2-core machine)
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from policyloop.contract.posterior import LinearPosterior

ROOT = Path(__file__).resolve().parents[1]
# features float32[n, d]; expected float64[n, K], each action's true expected reward (a class's
# one-hot for the datasets); uniforms float64[n], the draws every learner's rewards share;
# items float32[n, K, Da], each candidate's features (a ranking stream) or None (fixed actions)
Stream = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]


def _reward(expected: np.ndarray, uniforms: np.ndarray, i: int, chosen: int) -> float:
    return float(uniforms[i] < expected[i, chosen])


def streams(passes: int, seed: int) -> dict[str, Stream]:
    from sklearn.datasets import load_breast_cancer, load_digits

    digits = load_digits()
    cancer = load_breast_cancer()
    raw = {"digits": (digits.data / 16.0, digits.target),
           "breast_cancer": ((cancer.data - cancer.data.mean(0)) / cancer.data.std(0),
                             cancer.target)}
    rng = np.random.default_rng(seed)
    out: dict[str, Stream] = {}
    for name, (x, y) in raw.items():
        order = np.concatenate([rng.permutation(len(y)) for _ in range(passes)])
        out[name] = (x[order].astype(np.float32), np.eye(int(y.max()) + 1)[y[order]],
                     rng.random(len(order)), None)
    out["routing_drift"] = _routing_drift(3000 * passes, seed)
    out["recsys"] = _recsys(3000 * passes, seed)
    return out


def _recsys(n: int, seed: int) -> Stream:
    """The recommendation simulator as a ranking stream: 16 user features, 20 candidates a
    request drawn from 500 items with 16 features each; a click is reward 1, with the
    simulator's true probability (which depends on the user-item match, so a learner needs
    context-by-item interactions)."""
    from policyloop.simulators.recsys import RecsysEnv

    env, rng = RecsysEnv(seed=seed), np.random.default_rng(seed + 1)
    arrivals = env.sample_arrivals(n, rng)
    assert arrivals.action_features is not None
    return (arrivals.context.astype(np.float32), arrivals.expected, rng.random(n),
            arrivals.action_features.astype(np.float32))


def _routing_drift(n: int, seed: int) -> Stream:
    """The routing simulator (17 ticket features, 8 queues), its queues' skills rotated
    halfway: a resolved ticket is reward 1, with the simulator's true probability."""
    from policyloop.simulators.routing import RoutingEnv

    env, rng = RoutingEnv(seed=seed), np.random.default_rng(seed + 1)
    first = env.sample_arrivals(n // 2, rng)
    env.drift()
    second = env.sample_arrivals(n - n // 2, rng)
    return (np.concatenate([first.context, second.context]).astype(np.float32),
            np.concatenate([first.expected, second.expected]), rng.random(n), None)


def run_policyloop(x: np.ndarray, expected: np.ndarray, uniforms: np.ndarray,
                   items: np.ndarray | None, *, strategy: str, publish_every: int | None,
                   seed: int, gamma: float = 1.0, pending: bool = True,
                   rewards: bool = True) -> np.ndarray:
    """``publish_every`` None: the learner's default cadence (``online/learner.py``
    publish_threshold: a young learner publishes sooner, then every 500 examples). A ranking
    stream is a ``kind = "ranking"`` spec, whose created model scores each candidate on its
    features, the context's and their products (``policyloop/registry/cold_start.py``)."""
    from online.config import LearnConfig
    from online.join import Example
    from online.learner import publish_threshold
    from online.learners import LinearHeadLearner, Serving
    from policyloop.contract.events import DecisionEvent
    from policyloop.contract.spec import parse_spec
    from policyloop.registry.cold_start import cold_start
    from policyloop.registry.onnx_model import open_model
    from serving.exploration import for_version, strategy_from_spec

    n_actions = expected.shape[1]
    actions = [f"action-{a}" for a in range(n_actions)]
    context = json.dumps([f"x{i}" for i in range(x.shape[1])])
    spec = parse_spec(
        f'name = "bench"\nkind = "actions"\nactions = {json.dumps(actions)}\n'
        f'[features]\ncontext = {context}\n' if items is None else
        f'name = "bench"\nkind = "ranking"\n[features]\ncontext = {context}\n'
        f'action = {json.dumps([f"a{i}" for i in range(items.shape[2])])}\n')
    data, manifest, prior = cold_start(spec)
    providers = ["CPUExecutionProvider"]
    serving = Serving(open_model(data, manifest, prior, providers=providers), data)
    learner = LinearHeadLearner(serving, gamma=gamma)  # learn --gamma: forgetting
    schedule = strategy_from_spec(strategy)
    explore = for_version(schedule, 0)  # a growing SquareCB's gamma: the version's examples
    rng = np.random.default_rng(seed)
    values = np.empty(len(x))
    model = serving.model
    posterior = model.posterior  # narrowed by each decision, as serve's pending_decisions
    defaults = LearnConfig(registry=Path("unused"), policy="bench")
    last = 0  # examples learned at the last version
    for i in range(len(x)):
        if items is None:
            scores, embedding = model.run(x[i:i + 1])
            per_action = np.broadcast_to(embedding[0], (n_actions, embedding.shape[-1]))
        else:
            scores, embedding = model.run(x[i:i + 1], items[i:i + 1])
            per_action = embedding[0]
        decision = explore.decide(
            scores[0], 1, rng, embedding=per_action,
            posterior=posterior if explore.needs_posterior else None)
        chosen = int(decision.chosen[0])
        reward = _reward(expected, uniforms, i, chosen)
        if explore.needs_posterior and pending:  # serving/dataplane.py DataPlane._observe
            assert posterior is not None
            if posterior is model.posterior:  # the version's private copy, narrowed in place
                posterior = posterior.narrowable()
            head = 0 if items is not None else chosen
            predicted = posterior.narrow(per_action[chosen], head)
            if rewards:  # the reward reaches the replica before its next decision
                posterior.nudge(per_action[chosen], head, reward - predicted)
        values[i] = expected[i, chosen]
        event = DecisionEvent(
            event_id=f"e{i}", policy="bench", model_version=model.version, timestamp_ms=i,
            context=x[i], action_ids=actions,
            action_features=None if items is None else items[i], chosen=[chosen],
            propensities=[float(decision.propensities[0])],
            probabilities=decision.probabilities, strategy=explore.name, active=True,
            baseline_action=None, policy_action=None)
        learner.learn_one(Example(event, reward, True, i))
        due = (publish_every if publish_every is not None else publish_threshold(
            defaults.publish_every, defaults.publish_ramp, last))
        if i + 1 - last >= due:  # the learner publishes, the server swaps it in
            last = i + 1
            candidate = learner.candidate()
            model = open_model(candidate.model, manifest, _posterior(candidate.extras),
                               providers=providers)
            posterior = model.posterior
            explore = for_version(schedule, last)
    return values


def _posterior(extras: dict[str, bytes]) -> LinearPosterior:
    from policyloop.contract.posterior import LinearPosterior

    return LinearPosterior.from_npz_bytes(extras["head.npz"])


def run_vw(x: np.ndarray, expected: np.ndarray, uniforms: np.ndarray,
           items: np.ndarray | None, *, options: str, seed: int) -> np.ndarray:
    """The action is an ADF feature (fixed actions) or its candidate's features (ranking),
    crossed with every context feature by ``-q sa``."""
    import vowpalwabbit

    n_actions = expected.shape[1]
    vw = vowpalwabbit.Workspace(f"--cb_explore_adf {options} -q sa --quiet --random_seed {seed}")
    rng = np.random.default_rng(seed)
    values = np.empty(len(x))
    for i in range(len(x)):
        shared = "shared |s " + " ".join(f"f{j}:{v:.5g}" for j, v in enumerate(x[i]) if v)
        lines = [shared] + ([f"|a a{a}" for a in range(n_actions)] if items is None else
                            ["|a " + " ".join(f"i{j}:{v:.5g}" for j, v in enumerate(item) if v)
                             for item in items[i]])
        pmf = np.asarray(vw.predict(lines), np.float64)
        pmf /= pmf.sum()
        chosen = int(rng.choice(n_actions, p=pmf))
        reward = _reward(expected, uniforms, i, chosen)
        values[i] = expected[i, chosen]
        lines[chosen + 1] = f"0:{-reward}:{pmf[chosen]} {lines[chosen + 1]}"
        vw.learn(lines)
    vw.finish()
    return values


def run_linucb(x: np.ndarray, expected: np.ndarray, uniforms: np.ndarray,
               items: np.ndarray | None, *, alpha: float, seed: int) -> np.ndarray:
    """Disjoint LinUCB: per action A = I + sum x x^T, b = sum r x; pick the largest
    theta.x + alpha * sqrt(x A^-1 x), ties to the lowest index (the inverse kept by
    Sherman-Morrison updates). A ranking stream: one shared model on each candidate's
    [a, c, vec(c a^T)], the features policyloop's created ranking model reads."""
    del seed  # deterministic
    if items is not None:
        return _shared_linucb(x, expected, uniforms, items, alpha=alpha)
    n_actions, d = expected.shape[1], x.shape[1]
    a_inv = np.stack([np.eye(d)] * n_actions)
    b = np.zeros((n_actions, d))
    values = np.empty(len(x))
    for i in range(len(x)):
        v = x[i].astype(np.float64)
        theta = np.einsum("aij,aj->ai", a_inv, b)
        width = np.sqrt(np.einsum("i,aij,j->a", v, a_inv, v))
        chosen = int(np.argmax(theta @ v + alpha * width))
        reward = _reward(expected, uniforms, i, chosen)
        values[i] = expected[i, chosen]
        u = a_inv[chosen] @ v
        a_inv[chosen] -= np.outer(u, u) / (1.0 + v @ u)
        b[chosen] += reward * v
    return values


def _shared_linucb(x: np.ndarray, expected: np.ndarray, uniforms: np.ndarray,
                   items: np.ndarray, *, alpha: float) -> np.ndarray:
    n, k, da = items.shape
    d = da + x.shape[1] + x.shape[1] * da
    a_inv, b = np.eye(d), np.zeros(d)
    values = np.empty(n)
    for i in range(n):
        c = x[i].astype(np.float64)
        z = np.concatenate([items[i], np.broadcast_to(c, (k, len(c))),
                            (c[None, :, None] * items[i][:, None, :]).reshape(k, -1)], axis=1)
        width = np.sqrt(np.einsum("ki,ij,kj->k", z, a_inv, z))
        chosen = int(np.argmax(z @ (a_inv @ b) + alpha * width))
        reward = _reward(expected, uniforms, i, chosen)
        values[i] = expected[i, chosen]
        u = a_inv @ z[chosen]
        a_inv -= np.outer(u, u) / (1.0 + z[chosen] @ u)
        b += reward * z[chosen]
    return values


def learners() -> dict[str, Callable[..., np.ndarray]]:
    def pl(strategy: str, every: int | None = None, gamma: float = 1.0,
           pending: bool = True, rewards: bool = True) -> Callable[..., np.ndarray]:
        return lambda *stream, seed: run_policyloop(
            *stream, strategy=strategy, publish_every=every, seed=seed, gamma=gamma,
            pending=pending, rewards=rewards)

    return {
        "policyloop epsilon_greedy:0.1 (serve --strategy default)": pl("epsilon_greedy:0.1"),
        "policyloop thompson": pl("thompson"),
        "policyloop ucb:1 (create's default)": pl("ucb:1"),
        "policyloop ucb:2": pl("ucb:2"),
        "policyloop ucb:2, pending decisions without their rewards": pl("ucb:2",
                                                                         rewards=False),
        "policyloop ucb:1, --no-pending-decisions": pl("ucb:1", pending=False),
        "policyloop thompson, --no-pending-decisions": pl("thompson", pending=False),
        "policyloop squarecb:10 (gamma fixed)": pl("squarecb:10"),
        "policyloop squarecb (gamma 10 t^0.5, VW's schedule)": pl("squarecb"),
        "policyloop thompson, a version every 10": pl("thompson", 10),
        "policyloop ucb:1, a version every 10": pl("ucb:1", 10),
        "policyloop thompson, a version every 500 (before publish_ramp)": pl("thompson", 500),
        "policyloop thompson, --gamma 0.999": pl("thompson", gamma=0.999),
        "vowpalwabbit --epsilon 0.1": lambda *stream, seed: run_vw(
            *stream, options="--epsilon 0.1", seed=seed),
        "vowpalwabbit --squarecb": lambda *stream, seed: run_vw(
            *stream, options="--squarecb", seed=seed),
        "linucb alpha 0.5": lambda *stream, seed: run_linucb(*stream, alpha=0.5, seed=seed),
        "linucb alpha 1": lambda *stream, seed: run_linucb(*stream, alpha=1.0, seed=seed),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "bandit.json")
    args = parser.parse_args()
    results: dict[str, dict] = {}
    curves: dict[str, dict[str, np.ndarray]] = {}
    data = streams(args.passes, args.seed)
    for kind in ("digits", "recsys"):  # imports and first calls, paid before any row is timed
        for run in learners().values():
            run(*(None if a is None else a[:40] for a in data[kind]), seed=args.seed)
    for name, (x, expected, uniforms, items) in data.items():
        n = len(x)
        # the datasets' last pass; the drift stream's second half, after the switch
        last = n // 2 if name == "routing_drift" else n // args.passes
        results[name] = {"events": n, "features": x.shape[1], "actions": expected.shape[1],
                         "candidate_features": None if items is None else items.shape[2],
                         "oracle": round(float(expected.max(1).mean()), 4),
                         "uniform": round(float(expected.mean()), 4), "learners": {}}
        curves[name] = {}
        for learner, run in learners().items():
            start = time.perf_counter()
            values = run(x, expected, uniforms, items, seed=args.seed)
            elapsed = time.perf_counter() - start
            results[name]["learners"][learner] = {
                "progressive_reward": round(float(values.mean()), 4),
                "last_part_reward": round(float(values[-last:].mean()), 4),
                "events_per_s": round(n / elapsed, 1)}
            curves[name][learner] = np.cumsum(values) / np.arange(1, n + 1)
            print(name, learner, results[name]["learners"][learner], flush=True)
    results["settings"] = {"passes": args.passes, "seed": args.seed}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    _plot(curves, args.out.with_suffix(".png"))


def _plot(curves: dict[str, dict[str, np.ndarray]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 4.5))
    for ax, (stream, by_learner) in zip(np.atleast_1d(axes), curves.items(), strict=True):
        for learner, curve in by_learner.items():
            ax.plot(curve, label=learner, lw=1.2)
        ax.set_title(f"{stream}: progressive average reward")
        ax.set_xlabel("events")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    np.atleast_1d(axes)[0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
